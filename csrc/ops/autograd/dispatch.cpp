// Autograd of permute and unpermute_combine. Each is the other's backward: permute's gradient is an unweighted
// combine (a gather-sum, deterministic), and the combine's gradient is a permute scaled by the scores.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "fastmoe/ops.h"
#include "ops/internal.h"

namespace fastmoe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class PermuteFunction : public torch::autograd::Function<PermuteFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& sorted_pair,
                            const at::Tensor& pair_pos) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({sorted_pair, pair_pos});
    return ops::permute(x, sorted_pair, pair_pos);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    return {ops::unpermute_combine(grads[0], saved[0], saved[1], std::nullopt), at::Tensor(), at::Tensor()};
  }
};

class UnpermuteCombineFunction : public torch::autograd::Function<UnpermuteCombineFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y_sorted, const at::Tensor& sorted_pair,
                            const at::Tensor& pair_pos, const std::optional<at::Tensor>& topk_score) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool has_score = topk_score.has_value() && topk_score->defined();
    ctx->save_for_backward({y_sorted, sorted_pair, pair_pos, has_score ? *topk_score : at::Tensor()});
    return ops::unpermute_combine(y_sorted, sorted_pair, pair_pos, topk_score);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    std::optional<at::Tensor> topk_score;
    if (saved[3].defined()) topk_score = saved[3];
    const bool need_score_grad = topk_score.has_value() && ctx->needs_input_grad(3);
    auto [grad_y_sorted, grad_score] =
        ops::unpermute_combine_backward(grads[0], saved[0], saved[1], saved[2], topk_score, need_score_grad);
    return {grad_y_sorted, at::Tensor(), at::Tensor(), need_score_grad ? grad_score : at::Tensor()};
  }
};

at::Tensor permute_autograd(const at::Tensor& x, const at::Tensor& sorted_pair, const at::Tensor& pair_pos) {
  return PermuteFunction::apply(x, sorted_pair, pair_pos);
}

at::Tensor unpermute_combine_autograd(const at::Tensor& y_sorted, const at::Tensor& sorted_pair,
                                      const at::Tensor& pair_pos, const std::optional<at::Tensor>& topk_score) {
  return UnpermuteCombineFunction::apply(y_sorted, sorted_pair, pair_pos, topk_score);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmoe, Autograd, m) {
  m.impl("permute", &permute_autograd);
  m.impl("unpermute_combine", &unpermute_combine_autograd);
}

}  // namespace fastmoe
