// Autograd of the gate's ops on the logits: route_topk and balance_loss, and of their backwards. The gradient of the
// scores flows into the logits through route_topk_backward, the balance term's through balance_loss_backward; both
// backwards are differentiable too, so a gradient penalty (create_graph=True) gets exact second and higher
// derivatives.
#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "fastmoe/ops.h"
#include "ops/common.h"
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
    // Where the backward (and its own backward) reads the logits' sizes alone, keep only those, so the [T, E]
    // logits are not held until the backward on their account.
    ctx->save_for_backward(
        {ops_detail::score_grad_reads_logits(score_fn) ? logits : ops::shape_only(logits), topk_idx, topk_score});
    ctx->saved_data["score_fn"] = score_fn;
    return {topk_idx, topk_score};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_score = grads[1];
    if (!grad_score.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    // Under create_graph the saved scores carry this node as their grad_fn, so a second derivative that goes
    // through them (topk_softmax) reaches the logits through this function again.
    at::Tensor grad_logits =
        ops::route_topk_backward(grad_score, saved[0], saved[1], saved[2], ctx->saved_data["score_fn"].toStringRef());
    return {grad_logits, at::Tensor(), at::Tensor()};
  }
};

// route_topk_backward(g [T, k], logits [T, E], idx [T, k], s [T, k]) -> R [T, E], and its vector-Jacobian
// product for an upstream A [T, E]. Written with ATen ops (and, for the scores, route_topk's own autograd), so
// every derivative of it is differentiable again.
//   topk_softmax: R[idx_j] = s_j (g_j - <g, s>), no other dependence on the logits. With a = A[idx]:
//     dg_j = s_j (a_j - <a, s>),   ds_m = a_m (g_m - <g, s>) - <a, s> g_m.
//   softmax_topk: R = p (G - <G, p>), p = softmax(logits) over all E (recomputed, not read from s), G = g
//     scattered to idx. With v = p (A - <A, p>) and u = A (G - <G, p>) - <A, p> G:
//     dg_j = v[idx_j],   dlogits = p (u - <u, p>).
class RouteTopkBackwardFunction : public torch::autograd::Function<RouteTopkBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_score, const at::Tensor& logits,
                            const at::Tensor& topk_idx, const at::Tensor& topk_score, const std::string& score_fn) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({grad_score, logits, topk_idx, topk_score});
    ctx->saved_data["score_fn"] = score_fn;
    return ops::route_topk_backward(grad_score, logits, topk_idx, topk_score, score_fn);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& upstream = grads[0];
    if (!upstream.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &g = saved[0], &logits = saved[1], &idx = saved[2], &s = saved[3];
    if (ctx->saved_data["score_fn"].toStringRef() == "topk_softmax") {
      const at::Tensor a = upstream.gather(1, idx);
      const at::Tensor a_dot_s = (a * s).sum(-1, true), g_dot_s = (g * s).sum(-1, true);
      at::Tensor grad_g = s * (a - a_dot_s);
      at::Tensor grad_s = a * (g - g_dot_s) - a_dot_s * g;
      return {grad_g, at::Tensor(), at::Tensor(), grad_s, at::Tensor()};
    }
    const at::Tensor p = at::softmax(logits, -1);
    const at::Tensor scattered = at::zeros_like(logits).scatter(1, idx, g);
    const at::Tensor a_dot_p = (upstream * p).sum(-1, true), g_dot_p = (scattered * p).sum(-1, true);
    at::Tensor grad_g = (p * (upstream - a_dot_p)).gather(1, idx);
    const at::Tensor u = upstream * (scattered - g_dot_p) - a_dot_p * scattered;
    at::Tensor grad_logits = p * (u - (u * p).sum(-1, true));
    return {grad_g, grad_logits, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> route_topk_autograd(const at::Tensor& logits, int64_t k, c10::string_view score_fn) {
  auto outputs = RouteTopkFunction::apply(logits, k, std::string(score_fn));
  return {outputs[0], outputs[1]};
}

at::Tensor route_topk_backward_autograd(const at::Tensor& grad_score, const at::Tensor& logits,
                                        const at::Tensor& topk_idx, const at::Tensor& topk_score,
                                        c10::string_view score_fn) {
  if (!ops::records_graph({grad_score, logits, topk_score})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::route_topk_backward(grad_score, logits, topk_idx, topk_score, std::string(score_fn));
  }
  return RouteTopkBackwardFunction::apply(grad_score, logits, topk_idx, topk_score, std::string(score_fn));
}

// balance_loss: the gradient for the logits is balance_loss_backward (one kernel on CUDA). Under create_graph that
// backward is recorded as ATen ops (balance_backward_graph), which autograd differentiates again.
class BalanceLossFunction : public torch::autograd::Function<BalanceLossFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& expert_counts,
                            int64_t num_pairs, double coef) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({logits, expert_counts});
    ctx->saved_data["num_pairs"] = num_pairs;
    ctx->saved_data["coef"] = coef;
    return ops::balance_loss(logits, expert_counts, num_pairs, coef);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor grad_logits = ops::balance_loss_backward(
        grads[0], saved[0], saved[1], ctx->saved_data["num_pairs"].toInt(), ctx->saved_data["coef"].toDouble());
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// balance_loss_backward as ATen ops: grad_logits = p (u - <u, p>) with p = softmax(logits) in the loss dtype and
// u_e = grad * scale * counts_e, scale = coef * E / (pairs * T).
at::Tensor balance_backward_graph(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& expert_counts,
                                  int64_t num_pairs, double coef) {
  const at::ScalarType loss_type = grad.scalar_type();
  const double scale = ops::balance_scale(logits.size(0), logits.size(1), num_pairs, coef);
  const at::Tensor p = at::softmax(logits.to(loss_type), -1);
  const at::Tensor u = (grad * scale) * expert_counts.to(loss_type);
  return (p * (u - (p * u).sum(-1, true))).to(logits.scalar_type());
}

at::Tensor balance_loss_autograd(const at::Tensor& logits, const at::Tensor& expert_counts, int64_t num_pairs,
                                 double coef) {
  return BalanceLossFunction::apply(logits, expert_counts, num_pairs, coef);
}

at::Tensor balance_loss_backward_autograd(const at::Tensor& grad, const at::Tensor& logits,
                                          const at::Tensor& expert_counts, int64_t num_pairs, double coef) {
  ops::check_balance_loss_backward(grad, logits, expert_counts, num_pairs, coef);
  if (!ops::records_graph({grad, logits})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::balance_loss_backward(grad, logits, expert_counts, num_pairs, coef);
  }
  return balance_backward_graph(grad, logits, expert_counts, num_pairs, coef);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmoe, Autograd, m) {
  m.impl("route_topk", &route_topk_autograd);
  m.impl("route_topk_backward", &route_topk_backward_autograd);
  m.impl("balance_loss", &balance_loss_autograd);
  m.impl("balance_loss_backward", &balance_loss_backward_autograd);
}

}  // namespace fastmoe
