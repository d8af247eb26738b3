// fastmoe::nn modules: thin compositions of the registered ops (include/fastmoe/ops.h).
#include <torch/torch.h>

#include <cmath>

#include "fastmoe/nn/gates.h"
#include "fastmoe/nn/moe.h"
#include "fastmoe/ops.h"
#include "nn/checks.h"

namespace fastmoe::nn {
namespace {

using detail::check_positive;
using detail::token_matrix;

torch::Tensor apply_activation(const torch::Tensor& h, Activation activation) {
  switch (activation) {
    case Activation::kGELU: return torch::gelu(h);
    case Activation::kReLU: return torch::relu(h);
    case Activation::kSiLU: return torch::silu(h);
    case Activation::kSwiGLU: {
      auto halves = h.chunk(2, -1);
      return torch::silu(halves[0]) * halves[1];
    }
  }
  TORCH_CHECK(false, "unknown activation ", static_cast<int>(activation));
}

// The layer's gate: the one the options carry, checked against the layer's sizes, or FastMoE's default NaiveGate.
Gate make_gate(const Gate& given, int64_t num_experts, int64_t d_model, int64_t top_k, bool gate_bias) {
  check_positive(num_experts, "num_experts");
  check_positive(d_model, "d_model");
  if (given.is_empty()) return NaiveGate(NaiveGateOptions(d_model, num_experts).top_k(top_k).bias(gate_bias));
  TORCH_CHECK(given->num_experts() == num_experts, "the gate routes over num_experts=", given->num_experts(),
              " but the layer has num_experts=", num_experts);
  TORCH_CHECK(given->d_model() == d_model, "the gate takes d_model=", given->d_model(),
              " but the layer has d_model=", d_model);
  return given;
}

// The routed output of one layer: plan, permute, run experts, combine. `run_experts` maps the permuted rows
// [T*k, d_model] (grouped by expert per the plan) to [T*k, d_out].
template <typename RunExperts>
torch::Tensor route_and_combine(const torch::Tensor& input, int64_t d_model, int64_t num_experts, GateImpl& gate,
                                RunExperts&& run_experts) {
  const torch::Tensor x = token_matrix(input, d_model);
  auto [topk_idx, topk_score] = gate.forward(x);
  // A user-written gate is only known through the interface: its outputs are checked before they index anything.
  const int64_t slots = gate.slots_per_token();
  TORCH_CHECK(topk_idx.dim() == 2 && topk_idx.size(0) == x.size(0) && topk_idx.size(1) == slots,
              "the gate returned topk_idx of shape ", topk_idx.sizes(), ", expected [tokens, ",
              slots == gate.top_k() ? "top_k" : "gate.slots_per_token()", "] = [", x.size(0), ", ", slots, "]");
  TORCH_CHECK(topk_score.sizes() == topk_idx.sizes(), "the gate returned topk_score of shape ", topk_score.sizes(),
              ", expected the shape of topk_idx ", topk_idx.sizes());
  const ops::Plan plan = ops::make_plan(topk_idx, num_experts);
  const torch::Tensor y_sorted = run_experts(ops::permute(x, plan.sorted_pair, plan.pair_pos), plan);
  const torch::Tensor y = ops::unpermute_combine(y_sorted, plan.sorted_pair, plan.pair_pos, topk_score);
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = y.size(1);
  return y.reshape(shape);
}

}  // namespace

GroupedLinearImpl::GroupedLinearImpl(int64_t num_experts, int64_t in_features, int64_t out_features, bool with_bias) {
  check_positive(num_experts, "num_experts");
  check_positive(in_features, "in_features");
  check_positive(out_features, "out_features");
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
  weight = register_parameter("weight", torch::empty({num_experts, out_features, in_features}).uniform_(-bound, bound));
  if (with_bias) bias = register_parameter("bias", torch::zeros({num_experts, out_features}));
}

torch::Tensor GroupedLinearImpl::forward(const torch::Tensor& x, const torch::Tensor& expert_offsets) {
  return ops::grouped_linear(x, expert_offsets, weight,
                             bias.defined() ? std::optional<torch::Tensor>(bias) : std::nullopt);
}

MoEImpl::MoEImpl(const MoEOptions& options_, std::vector<torch::nn::AnyModule> experts_)
    : options(options_), experts(std::move(experts_)) {
  check_positive(options.num_experts(), "num_experts");
  TORCH_CHECK(static_cast<int64_t>(experts.size()) == options.num_experts(), "MoE got ", experts.size(),
              " expert modules but num_experts=", options.num_experts());
  gate = register_module("gate", make_gate(options.gate(), options.num_experts(), options.d_model(), options.top_k(),
                                           options.gate_bias()));
  options.top_k(gate->top_k());
  for (size_t e = 0; e < experts.size(); ++e) {
    TORCH_CHECK(!experts[e].is_empty(), "expert ", e, " is an empty AnyModule");
    register_module("expert" + std::to_string(e), experts[e].ptr());
  }
}

torch::Tensor MoEImpl::forward(const torch::Tensor& x) {
  return route_and_combine(
      x, options.d_model(), options.num_experts(), *gate, [&](const torch::Tensor& x_sorted, const ops::Plan& plan) {
        // One host read of the offsets: a loop over arbitrary modules needs the row ranges.
        const torch::Tensor offsets = plan.expert_offsets.cpu();
        const int64_t* bounds = offsets.const_data_ptr<int64_t>();
        std::vector<torch::Tensor> outputs;
        for (int64_t e = 0; e < options.num_experts(); ++e) {
          if (bounds[e + 1] > bounds[e]) {
            outputs.push_back(experts[e].forward(x_sorted.slice(0, bounds[e], bounds[e + 1])));
          }
        }
        const int64_t routed = bounds[options.num_experts()];
        const int64_t width = outputs.empty() ? options.d_model() : outputs.front().size(1);
        outputs.push_back(torch::zeros({x_sorted.size(0) - routed, width},
                                       outputs.empty() ? x_sorted.options() : outputs.front().options()));
        return torch::cat(outputs, 0);
      });
}

TransformerMLPImpl::TransformerMLPImpl(const TransformerMLPOptions& options_) : options(options_) {
  check_positive(options.d_hidden(), "d_hidden");
  gate = register_module("gate", make_gate(options.gate(), options.num_experts(), options.d_model(), options.top_k(),
                                           options.gate_bias()));
  options.top_k(gate->top_k());
  auto experts = register_module("experts", std::make_shared<torch::nn::Module>());
  const int64_t hidden_rows = options.activation() == Activation::kSwiGLU ? 2 * options.d_hidden() : options.d_hidden();
  htoh4 = experts->register_module(
      "htoh4", GroupedLinear(options.num_experts(), options.d_model(), hidden_rows, options.bias()));
  h4toh = experts->register_module(
      "h4toh", GroupedLinear(options.num_experts(), options.d_hidden(), options.d_model(), options.bias()));
}

torch::Tensor TransformerMLPImpl::forward(const torch::Tensor& x) {
  return route_and_combine(x, options.d_model(), options.num_experts(), *gate,
                           [&](const torch::Tensor& x_sorted, const ops::Plan& plan) {
                             torch::Tensor h = htoh4->forward(x_sorted, plan.expert_offsets);
                             return h4toh->forward(apply_activation(h, options.activation()), plan.expert_offsets);
                           });
}

}  // namespace fastmoe::nn
