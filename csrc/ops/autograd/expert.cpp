// Autograd of grouped_linear and swiglu (with or without a row scale), and of their backwards. grouped_linear: dx,
// dW and db from one grouped_linear_backward call, each computed only when an input needs it;
// grouped_linear_backward is differentiable too (written with the same two ops), so gradients of gradients
// (create_graph=True) are exact to any order.
#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
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

// grouped_linear_backward(gy [N, out], x [N, in], offsets, W [E, out, in]) -> (gx, gW, gb) with, for a row r of
// expert e: gx[r] = W[e]^T gy[r], gW[e] = sum_r gy[r] x[r]^T, gb[e] = sum_r gy[r]. Each is bilinear in (gy, x) or
// (gy, W), so for upstream (Ax [N, in], AW [E, out, in], Ab [E, out]):
//   d gy[r] = W[e] Ax[r] + AW[e] x[r] + Ab[e],   d x[r] = AW[e]^T gy[r],   d W[e] = sum_r gy[r] Ax[r]^T,
// which are grouped_linear and grouped_linear_backward again. Rows past the last offset belong to no expert.
class GroupedLinearBackwardFunction : public torch::autograd::Function<GroupedLinearBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_y, const at::Tensor& x,
                               const at::Tensor& expert_offsets, const at::Tensor& weight,
                               std::array<bool, 3> output_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({grad_y, x, expert_offsets, weight});
    auto [grad_x, grad_w, grad_b] = ops::grouped_linear_backward(grad_y, x, expert_offsets, weight, output_mask);
    const std::array<at::Tensor, 3> outputs = {grad_x, grad_w, grad_b};
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (!output_mask[i]) ctx->mark_non_differentiable({outputs[i]});  // an empty placeholder
    }
    ctx->saved_data["output_mask"] = std::vector<bool>(output_mask.begin(), output_mask.end());
    return {grad_x, grad_w, grad_b};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &gy = saved[0], &x = saved[1], &offsets = saved[2], &weight = saved[3];
    const auto output_mask = ctx->saved_data["output_mask"].toBoolList();
    auto upstream = [&](size_t i) { return output_mask.get(i) && grads[i].defined() ? grads[i] : at::Tensor(); };
    const at::Tensor up_x = upstream(0), up_w = upstream(1), up_b = upstream(2);
    at::Tensor d_gy, d_x, d_w;
    auto add = [](at::Tensor& sum, const at::Tensor& term) { sum = sum.defined() ? sum + term : term; };
    if (ctx->needs_input_grad(0)) {
      if (up_x.defined()) add(d_gy, ops::grouped_linear(up_x, offsets, weight, std::nullopt));
      if (up_w.defined()) add(d_gy, ops::grouped_linear(x, offsets, up_w, std::nullopt));
      if (up_b.defined()) {
        // Ab[e] on every row of expert e, zero on the tail rows: a gather from Ab with one zero row appended.
        const at::Tensor rows = at::arange(gy.size(0), offsets.options());
        const at::Tensor expert_of_row = at::searchsorted(offsets.slice(0, 1), rows, /*out_int32=*/false,
                                                          /*right=*/true);
        add(d_gy, at::cat({up_b, at::zeros({1, up_b.size(1)}, up_b.options())}).index_select(0, expert_of_row));
      }
    }
    if (ctx->needs_input_grad(1) && up_w.defined()) {
      d_x = ops::grouped_linear(gy, offsets, up_w.transpose(1, 2), std::nullopt);
    }
    if (ctx->needs_input_grad(3) && up_x.defined()) {
      d_w = std::get<1>(ops::grouped_linear_backward(gy, up_x, offsets, weight, {false, true, false}));
    }
    return {d_gy, d_x, at::Tensor(), d_w, at::Tensor()};
  }
};

at::Tensor grouped_linear_autograd(const at::Tensor& x, const at::Tensor& expert_offsets, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias) {
  return GroupedLinearFunction::apply(x, expert_offsets, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_linear_backward_autograd(const at::Tensor& grad_y,
                                                                                const at::Tensor& x,
                                                                                const at::Tensor& expert_offsets,
                                                                                const at::Tensor& weight,
                                                                                std::array<bool, 3> output_mask) {
  if (!ops::records_graph({grad_y, x, weight})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::grouped_linear_backward(grad_y, x, expert_offsets, weight, output_mask);
  }
  auto outputs = GroupedLinearBackwardFunction::apply(grad_y, x, expert_offsets, weight, output_mask);
  return {outputs[0], outputs[1], outputs[2]};
}

// swiglu's backward as ATen ops, in the accumulation type (fp32; fp64 for fp64) like the kernels: with g, u the
// halves of h, s = sigmoid(g) and d = grad * scale (grad without a scale),
//   grad_h = [d * u * s * (1 + g * (1 - s)) | d * g * s],   grad_scale = sum over the row of grad * g * s * u
// (that one in fp64).
// Recorded under create_graph, where autograd differentiates it again.
std::tuple<at::Tensor, at::Tensor> swiglu_backward_graph(const at::Tensor& grad, const at::Tensor& h,
                                                         const at::Tensor& scale) {
  const at::ScalarType acc = c10::promoteTypes(h.scalar_type(), at::kFloat);
  const auto halves = h.to(acc).chunk(2, -1);
  const at::Tensor &g = halves[0], &u = halves[1], dy = grad.to(acc);
  const at::Tensor s = at::sigmoid(g);
  const at::Tensor d = scale.defined() ? dy * scale.to(acc).unsqueeze(-1) : dy;
  const at::Tensor grad_h = at::cat({d * u * (s * (1 + g * (1 - s))), d * (g * s)}, -1).to(h.scalar_type());
  if (!scale.defined()) return {grad_h, at::Tensor()};
  const at::Tensor terms = dy.to(at::kDouble) * (g.to(at::kDouble) * s * u);  // fp64 terms and sum, as the kernels
  return {grad_h, terms.sum(-1).to(scale.scalar_type())};
}

// swiglu: its gradient is swiglu_backward, or swiglu_scaled_backward with a scale (one kernel on CUDA,
// recomputing the sigmoid from the saved h); under create_graph those record swiglu_backward_graph.
class SwigluFunction : public torch::autograd::Function<SwigluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const std::optional<at::Tensor>& scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({h, scale.value_or(at::Tensor())});
    return ops::swiglu(h, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    if (!saved[1].defined()) return {ops::swiglu_backward(grads[0], saved[0]), at::Tensor()};
    auto [grad_h, grad_scale] = ops::swiglu_scaled_backward(grads[0], saved[0], saved[1]);
    return {grad_h, ctx->needs_input_grad(1) ? grad_scale : at::Tensor()};
  }
};

at::Tensor swiglu_autograd(const at::Tensor& h, const std::optional<at::Tensor>& scale) {
  return SwigluFunction::apply(h, scale);
}

at::Tensor swiglu_backward_autograd(const at::Tensor& grad, const at::Tensor& h) {
  ops::check_swiglu_backward(grad, h);
  if (!ops::records_graph({grad, h})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::swiglu_backward(grad, h);
  }
  return std::get<0>(swiglu_backward_graph(grad, h, at::Tensor()));
}

std::tuple<at::Tensor, at::Tensor> swiglu_scaled_backward_autograd(const at::Tensor& grad, const at::Tensor& h,
                                                                   const at::Tensor& scale) {
  ops::check_swiglu_backward(grad, h, scale);
  if (!ops::records_graph({grad, h, scale})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::swiglu_scaled_backward(grad, h, scale);
  }
  return swiglu_backward_graph(grad, h, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmoe, Autograd, m) {
  m.impl("grouped_linear", &grouped_linear_autograd);
  m.impl("grouped_linear_backward", &grouped_linear_backward_autograd);
  m.impl("swiglu", &swiglu_autograd);
  m.impl("swiglu_backward", &swiglu_backward_autograd);
  m.impl("swiglu_scaled_backward", &swiglu_scaled_backward_autograd);
}

}  // namespace fastmoe
