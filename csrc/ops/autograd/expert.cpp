// Autograd of grouped_linear: dx, dW and db from one grouped_linear_backward call, each computed only when an
// input needs it.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "fastmoe/ops.h"
#include "ops/internal.h"

namespace fastmoe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class GroupedLinearFunction : public torch::autograd::Function<GroupedLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& expert_offsets,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, expert_offsets, weight});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return ops::grouped_linear(x, expert_offsets, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(2),
                                      has_bias && ctx->needs_input_grad(3)};
    auto [grad_x, grad_w, grad_b] = ops::grouped_linear_backward(grads[0], saved[0], saved[1], saved[2], mask);
    return {mask[0] ? grad_x : at::Tensor(), at::Tensor(), mask[1] ? grad_w : at::Tensor(),
            mask[2] ? grad_b : at::Tensor()};
  }
};

at::Tensor grouped_linear_autograd(const at::Tensor& x, const at::Tensor& expert_offsets, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias) {
  return GroupedLinearFunction::apply(x, expert_offsets, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmoe, Autograd, m) {
  m.impl("grouped_linear", &grouped_linear_autograd);
}

}  // namespace fastmoe
