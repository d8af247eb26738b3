// fastmoe::nn modules: thin compositions of the registered ops (include/fastmoe/ops.h).
#include <torch/torch.h>

#include <cmath>

#include "fastmoe/nn/gates.h"
#include "fastmoe/nn/moe.h"
#include "fastmoe/ops.h"
#include "nn/checks.h"
#include "runtime/communicator.h"

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

// Expert parallelism: checks world_size against the group and the configuration across ranks (a collective).
void check_expert_parallel(int64_t world_size, const std::string& group_name, const char* layer,
                           std::vector<std::string> names, std::vector<int64_t> values) {
  check_positive(world_size, "world_size");
  if (world_size == 1) return;
  TORCH_CHECK(!group_name.empty(), layer, ": world_size=", world_size,
              " needs group_name, the name of a registered process group (fastmoe/distributed.h)");
  const int size = runtime::group_size(group_name);
  TORCH_CHECK(size == world_size, layer, ": world_size=", world_size, " but group '", group_name, "' has ", size,
              " ranks; they must be equal");
  runtime::check_same_config(group_name, names, values,
                             std::string(layer) + "(world_size=" + std::to_string(world_size) + ")");
}

// Rows of x_sorted (ordered by global expert = by owner rank, then local expert) travel to their owners, through
// run_local(x_local [M, d] expert-major, local_offsets [local + 1] on the device, host bounds [local + 1]) and
// back. One host read of the counts: the all-to-all needs its split sizes on the host.
template <typename RunLocal>
torch::Tensor exchange_and_run(const torch::Tensor& x_sorted, const torch::Tensor& expert_counts, int64_t world,
                               int64_t local, const std::string& group, RunLocal&& run_local) {
  const torch::Tensor received = ops::exchange_counts(expert_counts, group);
  const torch::Tensor both = torch::cat({expert_counts, received}).cpu();
  const int64_t* sent_h = both.const_data_ptr<int64_t>();
  const int64_t* recv_h = sent_h + world * local;
  std::vector<int64_t> send(world, 0), recv(world, 0), bounds(local + 1, 0);
  for (int64_t p = 0; p < world; ++p) {
    for (int64_t e = 0; e < local; ++e) {
      send[p] += sent_h[p * local + e];
      recv[p] += recv_h[p * local + e];
      bounds[e + 1] += recv_h[p * local + e];
    }
  }
  for (int64_t e = 0; e < local; ++e) bounds[e + 1] += bounds[e];
  const torch::Tensor x_local = ops::regroup(ops::exchange(x_sorted, send, recv, group), received, world);
  const torch::Tensor local_counts = received.view({world, local}).sum(0);
  const torch::Tensor local_offsets = torch::cat({torch::zeros({1}, local_counts.options()), local_counts.cumsum(0)});
  const torch::Tensor y_local = run_local(x_local, local_offsets, bounds);
  return ops::exchange(ops::regroup(y_local, received, world, /*inverse=*/true), recv, send, group, x_sorted.size(0));
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
  check_positive(options.world_size(), "world_size");
  TORCH_CHECK(static_cast<int64_t>(experts.size()) == options.num_experts(), "MoE got ", experts.size(),
              " expert modules but num_experts=", options.num_experts());
  gate = register_module("gate", make_gate(options.gate(), options.num_experts() * options.world_size(),
                                           options.d_model(), options.top_k(), options.gate_bias()));
  options.top_k(gate->top_k());
  check_expert_parallel(options.world_size(), options.group_name(), "MoE",
                        {"num_experts", "d_model", "top_k", "slots_per_token"},
                        {options.num_experts(), options.d_model(), options.top_k(), gate->slots_per_token()});
  for (size_t e = 0; e < experts.size(); ++e) {
    TORCH_CHECK(!experts[e].is_empty(), "expert ", e, " is an empty AnyModule");
    register_module("expert" + std::to_string(e), experts[e].ptr());
  }
}

// The local experts on rows grouped by expert (bounds: [num_experts + 1] row offsets on the host); rows past the
// last bound come out zero.
torch::Tensor MoEImpl::run_experts(const torch::Tensor& rows, const std::vector<int64_t>& bounds) {
  std::vector<torch::Tensor> outputs;
  for (int64_t e = 0; e < options.num_experts(); ++e) {
    if (bounds[e + 1] > bounds[e]) outputs.push_back(experts[e].forward(rows.slice(0, bounds[e], bounds[e + 1])));
  }
  const int64_t routed = bounds[options.num_experts()];
  const int64_t width = outputs.empty() ? options.d_model() : outputs.front().size(1);
  outputs.push_back(
      torch::zeros({rows.size(0) - routed, width}, outputs.empty() ? rows.options() : outputs.front().options()));
  return torch::cat(outputs, 0);
}

torch::Tensor MoEImpl::forward(const torch::Tensor& x) {
  const int64_t world = options.world_size(), local = options.num_experts();
  return route_and_combine(
      x, options.d_model(), local * world, *gate, [&](const torch::Tensor& x_sorted, const ops::Plan& plan) {
        if (world > 1) {
          return exchange_and_run(x_sorted, plan.expert_counts, world, local, options.group_name(),
                                  [&](const torch::Tensor& rows, const torch::Tensor&,
                                      const std::vector<int64_t>& bounds) { return run_experts(rows, bounds); });
        }
        // One host read of the offsets: a loop over arbitrary modules needs the row ranges.
        const torch::Tensor offsets = plan.expert_offsets.cpu();
        const int64_t* b = offsets.const_data_ptr<int64_t>();
        return run_experts(x_sorted, std::vector<int64_t>(b, b + local + 1));
      });
}

TransformerMLPImpl::TransformerMLPImpl(const TransformerMLPOptions& options_) : options(options_) {
  check_positive(options.d_hidden(), "d_hidden");
  check_positive(options.world_size(), "world_size");
  gate = register_module("gate", make_gate(options.gate(), options.num_experts() * options.world_size(),
                                           options.d_model(), options.top_k(), options.gate_bias()));
  options.top_k(gate->top_k());
  check_expert_parallel(options.world_size(), options.group_name(), "TransformerMLP",
                        {"num_experts", "d_model", "d_hidden", "top_k", "slots_per_token", "activation", "bias"},
                        {options.num_experts(), options.d_model(), options.d_hidden(), options.top_k(),
                         gate->slots_per_token(), static_cast<int64_t>(options.activation()), options.bias()});
  auto experts = register_module("experts", std::make_shared<torch::nn::Module>());
  const int64_t hidden_rows = options.activation() == Activation::kSwiGLU ? 2 * options.d_hidden() : options.d_hidden();
  htoh4 = experts->register_module(
      "htoh4", GroupedLinear(options.num_experts(), options.d_model(), hidden_rows, options.bias()));
  h4toh = experts->register_module(
      "h4toh", GroupedLinear(options.num_experts(), options.d_hidden(), options.d_model(), options.bias()));
}

torch::Tensor TransformerMLPImpl::forward(const torch::Tensor& x) {
  const int64_t world = options.world_size(), local = options.num_experts();
  auto experts = [&](const torch::Tensor& rows, const torch::Tensor& offsets) {
    torch::Tensor h = htoh4->forward(rows, offsets);
    return h4toh->forward(apply_activation(h, options.activation()), offsets);
  };
  return route_and_combine(
      x, options.d_model(), local * world, *gate, [&](const torch::Tensor& x_sorted, const ops::Plan& plan) {
        if (world > 1) {
          return exchange_and_run(x_sorted, plan.expert_counts, world, local, options.group_name(),
                                  [&](const torch::Tensor& rows, const torch::Tensor& offsets,
                                      const std::vector<int64_t>&) { return experts(rows, offsets); });
        }
        return experts(x_sorted, plan.expert_offsets);
      });
}

}  // namespace fastmoe::nn
