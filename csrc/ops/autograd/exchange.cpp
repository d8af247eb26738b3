// Autograd of the expert-parallel exchange. Its backward is the reverse exchange (splits swapped, back to the
// input's row count): it moves rows without arithmetic, so the gradient rows arrive bit for bit.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "fastmoe/ops.h"
#include "runtime/communicator.h"

namespace fastmoe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class ExchangeFunction : public torch::autograd::Function<ExchangeFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, c10::IntArrayRef send_splits,
                            c10::IntArrayRef recv_splits, c10::string_view group_name,
                            std::optional<int64_t> out_rows) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["send"] = send_splits.vec();
    ctx->saved_data["recv"] = recv_splits.vec();
    ctx->saved_data["group"] = std::string(group_name);
    ctx->saved_data["rows"] = x.size(0);
    at::Tensor y = ops::exchange(x, send_splits.vec(), recv_splits.vec(), std::string(group_name), out_rows);
    ctx->saved_data["out_like"] = at::empty({0, y.size(1)}, y.options());
    ctx->saved_data["out_rows"] = y.size(0);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Every rank must join the reverse exchange, so an undefined gradient is sent as zeros.
    const auto send = ctx->saved_data["send"].toIntVector();
    const auto recv = ctx->saved_data["recv"].toIntVector();
    at::Tensor grad = grads[0];
    if (!grad.defined()) {
      const at::Tensor like = ctx->saved_data["out_like"].toTensor();
      grad = at::zeros({ctx->saved_data["out_rows"].toInt(), like.size(1)}, like.options());
    }
    const int64_t rows = ctx->saved_data["rows"].toInt();
    // Marked as a backward exchange, so a peer still in a forward (it skipped this backward) raises on both ranks.
    const runtime::ExchangePhaseGuard phase(runtime::ExchangePhase::kBackwardRows);
    return {ops::exchange(grad.contiguous(), recv, send, ctx->saved_data["group"].toStringRef(), rows), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor exchange_autograd(const at::Tensor& x, c10::IntArrayRef send_splits, c10::IntArrayRef recv_splits,
                             c10::string_view group_name, std::optional<int64_t> out_rows) {
  return ExchangeFunction::apply(x, send_splits, recv_splits, group_name, out_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmoe, Autograd, m) {
  m.impl("exchange", &exchange_autograd);
}

}  // namespace fastmoe
