// Shared helpers of the op layer: tensor -> kernel-argument conversion and input checks whose messages name
// the argument and its value. The checks run in every backend kernel, Meta included, so a bad call fails the
// same way under torch.compile as in eager mode.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <sstream>
#include <string>

#include "core/dtype.h"
#include "ref/routing_ref.h"

namespace fastmoe::ops_detail {

inline bool is_supported_float(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

inline DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, name, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// A tensor's shape for a message ("[4, 8]", symbolic sizes too), or "an undefined tensor".
inline std::string shape_of(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  std::ostringstream out;
  out << t.sym_sizes();
  return out.str();
}

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor, got None/undefined");
}

inline void check_float(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(is_supported_float(t.scalar_type()), name, " must be float32, float64, float16 or bfloat16, got ",
              t.scalar_type());
}

inline void check_int64(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", layout, ", got a tensor of shape ", t.sym_sizes());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " and ", b_name, " must be on one device, got ", a.device(), " and ",
              b.device());
}

inline ScoreFn parse_score_fn(c10::string_view name) {
  if (name == "topk_softmax") return ScoreFn::kTopkThenSoftmax;
  if (name == "softmax_topk") return ScoreFn::kSoftmaxThenTopk;
  TORCH_CHECK(false, "score_fn must be 'topk_softmax' or 'softmax_topk', got '", name, "'");
}

// Whether route_topk_backward reads the logits' values: softmax_topk recomputes the E-way softmax from them, while
// topk_softmax's gradient comes from the scores and needs only the logits' sizes (so a backward may keep a
// shape_only tensor in their place, and route_topk_backward does not copy one out).
inline bool score_grad_reads_logits(c10::string_view score_fn) {
  return parse_score_fn(score_fn) == ScoreFn::kSoftmaxThenTopk;
}

// Raw pointers for the torch-free kernels; callers pass contiguous tensors.
inline const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr() : nullptr;
}

// Converts fastmoe::Error (the torch-free kernels' and references' validation) into c10::Error so Python sees a plain
// RuntimeError whose text starts with the reference's message.
template <typename Fn>
auto call_kernel(Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const fastmoe::Error& error) {
    TORCH_CHECK(false, error.what());
  }
}

}  // namespace fastmoe::ops_detail

#ifdef FASTMOE_WITH_CUDA_OPS
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace fastmoe::ops_detail {

// The stream every CUDA kernel of an op is enqueued on: the caller's current stream on the tensor's device.
inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index());
}

}  // namespace fastmoe::ops_detail
#endif
