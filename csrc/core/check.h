// Torch-free error checking shared by the kernels, the references and the ops.
//
// FMOE_CHECK(cond, parts...) throws fastmoe::Error with the parts streamed into one message, so a failed
// check always names the argument and the value that broke it. The op layer lets these propagate: the
// dispatcher turns any std::exception into a Python RuntimeError with the same text.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace fastmoe {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {

template <typename... Parts>
std::string str_cat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

[[noreturn]] inline void fail(const char* file, int line, const char* cond, const std::string& message) {
  throw Error(str_cat("fastmoe: ", message, " (check `", cond, "` failed at ", file, ":", line, ")"));
}

}  // namespace detail
}  // namespace fastmoe

#define FMOE_CHECK(cond, ...)                                                                      \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      ::fastmoe::detail::fail(__FILE__, __LINE__, #cond, ::fastmoe::detail::str_cat(__VA_ARGS__)); \
    }                                                                                              \
  } while (0)
