// fastmoe::nn modules: thin compositions of the registered ops (include/fastmoe/ops.h).
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <numeric>

#include "fastmoe/expert_seed.h"
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

// One random stream per global expert (docs/distributed.md, "Initialisation"; python/fastmoe/_rng.py follows the
// same rule, with the same expert_seed through fastmoe._C). Every rank of an expert-parallel group is usually seeded
// alike, so experts drawn from the default generator would repeat on every rank. Instead a layer draws one base seed
// from the CPU default generator (the same draw on every rank, and one draw whatever the number of experts, so the
// modules built after the layer are unchanged too) and gives global expert g a generator seeded with expert_seed(base,
// g).
uint64_t draw_base_seed() {
  // The op fastmoe._rng.draw_base_seed calls, with the same bounds: the same number for the same generator state.
  return static_cast<uint64_t>(
      torch::randint(0, std::numeric_limits<int64_t>::max(), {}, torch::TensorOptions(torch::kInt64)).item<int64_t>());
}

// Seeds the CPU default generator for its lifetime and then gives it back its state: the experts built meanwhile
// draw nothing from the caller's stream.
class DefaultCPUGeneratorSeeded {
 public:
  explicit DefaultCPUGeneratorSeeded(uint64_t seed) : generator_(at::detail::getDefaultCPUGenerator()) {
    std::lock_guard<std::mutex> lock(generator_.mutex());
    state_ = generator_.get_state();
    generator_.set_current_seed(seed);
  }
  ~DefaultCPUGeneratorSeeded() {
    std::lock_guard<std::mutex> lock(generator_.mutex());
    generator_.set_state(state_);
  }
  DefaultCPUGeneratorSeeded(const DefaultCPUGeneratorSeeded&) = delete;
  DefaultCPUGeneratorSeeded& operator=(const DefaultCPUGeneratorSeeded&) = delete;

 private:
  at::Generator generator_;
  torch::Tensor state_;
};

// The rank of this process in the expert-parallel group, 0 without expert parallelism.
int64_t expert_parallel_rank(int64_t world_size, const std::string& group_name) {
  return world_size > 1 ? runtime::group_rank(group_name) : 0;
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

// Expert parallelism (docs/distributed.md): each token row travels once to every rank owning one of its experts,
// with its routing row; that rank runs its local experts on the token's slots through run_local(rows grouped by
// local expert, offsets [local + 1] on the device, the same bounds on the host) and adds the slots up weighted by
// the scores; the partial sums travel back and add up per token. One host read of the counts: the all-to-all
// takes its split sizes on the host.
template <typename RunLocal>
torch::Tensor expert_parallel(const torch::Tensor& x, const torch::Tensor& topk_idx, const torch::Tensor& topk_score,
                              int64_t world, int64_t local, const std::string& group, RunLocal&& run_local) {
  const int64_t rank = runtime::group_rank(group);
  // token_ranks [T, W]: rank p, or -1 if no slot goes to p; outgoing [W, local + 1]: per destination rank, the
  // slots per local expert, then the token rows.
  const auto [token_ranks, dest_counts] = ops::ep_route(topk_idx, local, world);
  const torch::Tensor outgoing = dest_counts.view({world, local + 1});
  const ops::Plan rank_plan = ops::make_plan(token_ranks, world);
  // The rows' dtype and width travel with the counts: ranks whose layers differ in them raise here, on every rank.
  const torch::Tensor incoming =
      ops::exchange_counts(outgoing.flatten(), group, x.scalar_type(), x.size(1), /*chunks=*/1)
          .view({world, local + 1});
  const torch::Tensor both = torch::cat({outgoing, incoming}).cpu();
  const int64_t* out_h = both.const_data_ptr<int64_t>();
  const int64_t* in_h = out_h + world * (local + 1);
  std::vector<int64_t> send(world), recv(world), bounds(local + 1, 0);
  for (int64_t p = 0; p < world; ++p) {
    send[p] = out_h[p * (local + 1) + local];
    recv[p] = in_h[p * (local + 1) + local];
    for (int64_t e = 0; e < local; ++e) bounds[e + 1] += in_h[p * (local + 1) + e];
  }
  for (int64_t e = 0; e < local; ++e) bounds[e + 1] += bounds[e];
  const int64_t n_send = std::accumulate(send.begin(), send.end(), int64_t{0});

  const torch::Tensor send_order = rank_plan.sorted_pair.slice(0, 0, n_send);  // pair = token * world + rank
  const torch::Tensor tokens = send_order.div(world, "floor");
  const torch::Tensor x_in = ops::exchange(ops::permute(x, send_order, rank_plan.pair_pos), send, recv, group);
  const torch::Tensor score_in =
      ops::exchange(ops::permute(topk_score, send_order, rank_plan.pair_pos), send, recv, group);
  const torch::Tensor idx_in = ops::exchange(topk_idx.index_select(0, tokens), send, recv, group);

  const torch::Tensor mine = idx_in.div(local, "floor") == rank;
  const ops::Plan local_plan = ops::make_plan(torch::where(mine, idx_in - rank * local, -1), local);
  const torch::Tensor slot_order = local_plan.sorted_pair.slice(0, 0, bounds[local]);
  const torch::Tensor y_local =
      run_local(ops::permute(x_in, slot_order, local_plan.pair_pos), local_plan.expert_offsets, bounds);
  const torch::Tensor partial = ops::unpermute_combine(y_local, slot_order, local_plan.pair_pos, score_in);
  const torch::Tensor y_back = ops::exchange(partial, recv, send, group);
  return ops::unpermute_combine(y_back, send_order, rank_plan.pair_pos, std::nullopt);
}

// The routed output of one layer: gate, then either plan, permute, run the experts and combine (one rank), or the
// expert-parallel exchange around them. `run_experts(rows, offsets, host_bounds)` maps rows grouped by expert
// (offsets [E + 1] on the device; host_bounds the same on the host, or empty when not read) to [rows, d_out].
template <typename RunExperts>
torch::Tensor route_and_combine(const torch::Tensor& input, int64_t d_model, int64_t num_local, int64_t world,
                                const std::string& group, GateImpl& gate, RunExperts&& run_experts) {
  const torch::Tensor x = token_matrix(input, d_model);
  auto [topk_idx, topk_score] = gate.forward(x);
  // A user-written gate is only known through the interface: its outputs are checked before they index anything.
  const int64_t slots = gate.slots_per_token();
  TORCH_CHECK(topk_idx.dim() == 2 && topk_idx.size(0) == x.size(0) && topk_idx.size(1) == slots,
              "the gate returned topk_idx of shape ", topk_idx.sizes(), ", expected [tokens, ",
              slots == gate.top_k() ? "top_k" : "gate.slots_per_token()", "] = [", x.size(0), ", ", slots, "]");
  TORCH_CHECK(topk_score.sizes() == topk_idx.sizes(), "the gate returned topk_score of shape ", topk_score.sizes(),
              ", expected the shape of topk_idx ", topk_idx.sizes());
  torch::Tensor y;
  if (world > 1) {
    y = expert_parallel(x, topk_idx, topk_score, world, num_local, group, run_experts);
  } else {
    const ops::Plan plan = ops::make_plan(topk_idx, num_local);
    const torch::Tensor y_sorted =
        run_experts(ops::permute(x, plan.sorted_pair, plan.pair_pos), plan.expert_offsets, std::vector<int64_t>{});
    y = ops::unpermute_combine(y_sorted, plan.sorted_pair, plan.pair_pos, topk_score);
  }
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = y.size(1);
  return y.reshape(shape);
}

}  // namespace

GroupedLinearImpl::GroupedLinearImpl(int64_t num_experts, int64_t in_features, int64_t out_features, bool with_bias,
                                     int64_t rank_)
    : rank(rank_) {
  check_positive(num_experts, "num_experts");
  check_positive(in_features, "in_features");
  check_positive(out_features, "out_features");
  TORCH_CHECK(rank >= 0, "rank must be >= 0, got ", rank);
  weight = register_parameter("weight", torch::empty({num_experts, out_features, in_features}));
  if (with_bias) bias = register_parameter("bias", torch::zeros({num_experts, out_features}));
  reset_parameters();
}

void GroupedLinearImpl::reset_parameters() {
  const uint64_t base_seed = draw_base_seed();
  const int64_t num_experts = weight.size(0);
  const double bound = 1.0 / std::sqrt(static_cast<double>(weight.size(2)));
  torch::NoGradGuard no_grad;
  if (!weight.is_meta()) {  // a meta tensor has no values to draw
    for (int64_t e = 0; e < num_experts; ++e) {
      // A fresh generator of the weight's device type (a clone of its default one, then reseeded), as
      // torch.Generator(device).manual_seed(seed) makes in Python.
      at::Generator generator = at::globalContext().defaultGenerator(weight.device()).clone();
      generator.set_current_seed(expert_seed(base_seed, rank * num_experts + e));
      weight[e].uniform_(-bound, bound, generator);
    }
  }
  if (bias.defined()) bias.zero_();
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
  make_gate_and_check();
  register_experts();
}

MoEImpl::MoEImpl(const MoEOptions& options_, const std::function<torch::nn::AnyModule(int64_t)>& make_expert)
    : options(options_) {
  check_positive(options.num_experts(), "num_experts");
  TORCH_CHECK(static_cast<bool>(make_expert), "MoE got an empty make_expert function");
  // The gate first, then the experts, as fastmoe.FMoE: the same draws in the same order for the same seed.
  make_gate_and_check();
  // Global expert rank * num_experts + e is made inside its own stream (draw_base_seed).
  const int64_t first = expert_parallel_rank(options.world_size(), options.group_name()) * options.num_experts();
  const uint64_t base_seed = draw_base_seed();
  for (int64_t e = 0; e < options.num_experts(); ++e) {
    DefaultCPUGeneratorSeeded seeded(expert_seed(base_seed, first + e));
    experts.push_back(make_expert(options.d_model()));
  }
  register_experts();
}

void MoEImpl::make_gate_and_check() {
  check_positive(options.world_size(), "world_size");
  gate = register_module("gate", make_gate(options.gate(), options.num_experts() * options.world_size(),
                                           options.d_model(), options.top_k(), options.gate_bias()));
  options.top_k(gate->top_k());
  check_expert_parallel(options.world_size(), options.group_name(), "MoE",
                        {"num_experts", "d_model", "top_k", "slots_per_token"},
                        {options.num_experts(), options.d_model(), options.top_k(), gate->slots_per_token()});
}

void MoEImpl::register_experts() {
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
  torch::Tensor tail =
      torch::zeros({rows.size(0) - routed, width}, outputs.empty() ? rows.options() : outputs.front().options());
  if (outputs.empty()) {
    // Stay on the input's autograd graph: with expert parallelism the backward of the exchange that delivered
    // `rows` is a collective that every rank must reach.
    return rows.requires_grad() ? tail + rows.sum() * 0 : tail;
  }
  outputs.push_back(tail);
  return torch::cat(outputs, 0);
}

torch::Tensor MoEImpl::forward(const torch::Tensor& x) {
  return route_and_combine(x, options.d_model(), options.num_experts(), options.world_size(), options.group_name(),
                           *gate,
                           [&](const torch::Tensor& rows, const torch::Tensor& offsets, std::vector<int64_t> bounds) {
                             if (bounds.empty()) {
                               // One host read of the offsets: a loop over arbitrary modules needs the row ranges.
                               const torch::Tensor host = offsets.cpu();
                               const int64_t* b = host.const_data_ptr<int64_t>();
                               bounds.assign(b, b + options.num_experts() + 1);
                             }
                             return run_experts(rows, bounds);
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
  // Global expert ids pick the experts' streams: the ranks' experts differ and equal the one-rank layer's.
  const int64_t rank = expert_parallel_rank(options.world_size(), options.group_name());
  htoh4 = experts->register_module(
      "htoh4", GroupedLinear(options.num_experts(), options.d_model(), hidden_rows, options.bias(), rank));
  h4toh = experts->register_module(
      "h4toh", GroupedLinear(options.num_experts(), options.d_hidden(), options.d_model(), options.bias(), rank));
}

torch::Tensor TransformerMLPImpl::forward(const torch::Tensor& x) {
  return route_and_combine(x, options.d_model(), options.num_experts(), options.world_size(), options.group_name(),
                           *gate,
                           [&](const torch::Tensor& rows, const torch::Tensor& offsets, const std::vector<int64_t>&) {
                             torch::Tensor h = htoh4->forward(rows, offsets);
                             return h4toh->forward(apply_activation(h, options.activation()), offsets);
                           });
}

}  // namespace fastmoe::nn
