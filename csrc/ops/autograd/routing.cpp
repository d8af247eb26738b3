// Autograd of route_topk: the gradient of the scores flows into the logits through route_topk_backward.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "fastmoe/ops.h"
#include "ops/internal.h"

namespace fastmoe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class RouteTopkFunction : public torch::autograd::Function<RouteTopkFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t k, const std::string& score_fn) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [topk_idx, topk_score] = ops::route_topk(logits, k, score_fn);
    ctx->mark_non_differentiable({topk_idx});
    ctx->save_for_backward({logits, topk_idx, topk_score});
    ctx->saved_data["score_fn"] = score_fn;
    return {topk_idx, topk_score};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_score = grads[1];
    if (!grad_score.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits =
        ops::route_topk_backward(grad_score, saved[0], saved[1], saved[2], ctx->saved_data["score_fn"].toStringRef());
    return {grad_logits, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> route_topk_autograd(const at::Tensor& logits, int64_t k, c10::string_view score_fn) {
  auto outputs = RouteTopkFunction::apply(logits, k, std::string(score_fn));
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmoe, Autograd, m) {
  m.impl("route_topk", &route_topk_autograd);
}

}  // namespace fastmoe
