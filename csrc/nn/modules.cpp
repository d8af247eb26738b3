// fastmoe::nn modules: thin compositions of the registered ops (include/fastmoe/ops.h).
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <numeric>
#include <typeinfo>

#include "fastmoe/expert_seed.h"
#include "fastmoe/nn/gates.h"
#include "fastmoe/nn/moe.h"
#include "fastmoe/ops.h"
#include "fastmoe/token_dispatch.h"
#include "nn/checks.h"
#include "runtime/communicator.h"

namespace fastmoe::nn {
namespace {

using detail::check_positive;
using detail::token_matrix;

// The activation's name in ops::moe_ffn.
std::string activation_name(Activation activation) {
  switch (activation) {
    case Activation::kGELU: return "gelu";
    case Activation::kReLU: return "relu";
    case Activation::kSiLU: return "silu";
    case Activation::kSwiGLU: return "swiglu";
  }
  TORCH_CHECK(false, "unknown activation ", static_cast<int>(activation));
}

// What balance_record() reports of a forward: sizes, the rows per expert and the gate's terms, detached.
void keep_record(BalanceRecord& record, int64_t num_tokens, int64_t num_slots, const torch::Tensor& expert_counts,
                 const GateImpl& gate) {
  record = BalanceRecord();
  record.num_tokens = num_tokens;
  record.num_slots = num_slots;
  record.expert_counts = expert_counts.detach();
  if (gate.num_dropped().defined()) record.num_dropped = gate.num_dropped().detach();
  for (const auto& term : gate.losses()) record.losses.insert(term.key(), term.value().detach());
}

torch::Tensor apply_activation(const torch::Tensor& h, Activation activation) {
  switch (activation) {
    case Activation::kGELU: return torch::gelu(h);
    case Activation::kReLU: return torch::relu(h);
    case Activation::kSiLU: return torch::silu(h);
    case Activation::kSwiGLU: return ops::swiglu(h);
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

// The routed output of one layer: the gate, then the token path (fastmoe::TokenDispatch, the same object the Python
// layer uses) around `run_experts(rows, offsets [E_local + 1] on the device, dispatch, chunk)`, which maps the rows
// of a chunk, grouped by local expert, to [rows, d_out]. Keeps the forward's balance record.
// How the rows travel under expert parallelism: the group, chunks, the hierarchical sub-groups and replication.
struct Exchange {
  int64_t world = 1;
  std::string group;
  int64_t chunks = 1;
  std::string node_group, rail_group;
  Replication replication;
};

// run_replicas(rows, offsets [m + 1], replicated ids, scores) runs copies of the experts `replicated` (hot-expert
// replication) on the rows grouped by copy. With `scored` the experts apply each row's routing score themselves
// (TokenDispatch::row_scores; run_replicas gets the copies' rows' scores, undefined otherwise) and the combine only
// sums.
template <typename RunExperts, typename RunReplicas>
torch::Tensor route_and_combine(const torch::Tensor& input, int64_t d_model, int64_t num_local, const Exchange& ex,
                                bool cast_to_autocast, const char* name, GateImpl& gate, BalanceRecord& record,
                                bool scored, RunExperts&& run_experts, RunReplicas&& run_replicas) {
  const torch::Tensor x = token_matrix(input, d_model);
  auto [topk_idx, topk_score] = gate.forward(x);
  // A user-written gate is only known through the interface: its outputs are checked before they index anything.
  const int64_t slots = gate.slots_per_token();
  TORCH_CHECK(topk_idx.dim() == 2 && topk_idx.size(0) == x.size(0) && topk_idx.size(1) == slots,
              "the gate returned topk_idx of shape ", topk_idx.sizes(), ", expected [tokens, ",
              slots == gate.top_k() ? "top_k" : "gate.slots_per_token()", "] = [", x.size(0), ", ", slots, "]");
  const bool parallel = ex.world > 1;
  auto tokens = c10::make_intrusive<TokenDispatch>(
      x, topk_idx, topk_score, num_local, ex.world, parallel ? ex.group : std::string(), ex.chunks, cast_to_autocast,
      debug_enabled() ? std::string(name) : std::string(), parallel ? ex.node_group : std::string(),
      parallel ? ex.rail_group : std::string(), parallel ? ex.replication : Replication{});
  keep_record(record, x.size(0), topk_idx.numel(), tokens->routed_counts(), gate);
  // The copies first (their exchanges queue behind the chunks' dispatch).
  if (!tokens->replicated().empty()) {
    tokens->give_replicas(run_replicas(tokens->replica_rows(), tokens->replica_offsets(), tokens->replicated(),
                                       scored ? tokens->replica_scores() : torch::Tensor()),
                          scored);
  }
  for (int64_t c = 0; c < tokens->num_chunks(); ++c) {
    tokens->enter(c);  // the chunk's CUDA stream (expert parallelism with chunks > 1)
    torch::Tensor y;
    try {
      y = run_experts(tokens->rows(c), tokens->expert_offsets(c), *tokens, c);
    } catch (...) {
      tokens->leave(c);
      throw;
    }
    tokens->leave(c);
    tokens->give(c, y, scored);
  }
  const torch::Tensor y = tokens->combine();
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
  check_positive(options.ep_chunks(), "ep_chunks");
  gate = register_module("gate", make_gate(options.gate(), options.num_experts() * options.world_size(),
                                           options.d_model(), options.top_k(), options.gate_bias()));
  options.top_k(gate->top_k());
  check_expert_parallel(options.world_size(), options.group_name(), "MoE",
                        {"num_experts", "d_model", "top_k", "slots_per_token", "ep_chunks", "hierarchical"},
                        {options.num_experts(), options.d_model(), options.top_k(), gate->slots_per_token(),
                         options.ep_chunks(), !options.node_group().empty()});
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
  const Exchange ex{options.world_size(), options.group_name(), options.ep_chunks(),
                    options.node_group(), options.rail_group(), Replication{}};
  return route_and_combine(
      x, options.d_model(), options.num_experts(), ex, /*cast_to_autocast=*/false, "MoE", *gate, record_,
      /*scored=*/false,
      [&](const torch::Tensor& rows, const torch::Tensor&, TokenDispatch& tokens, int64_t c) {
        // The loop over arbitrary modules needs the row ranges on the host (one read on one process; known
        // already under expert parallelism).
        return run_experts(rows, tokens.expert_bounds(c));
      },
      [](const torch::Tensor&, const torch::Tensor&, const std::vector<int64_t>&,
         const torch::Tensor&) -> torch::Tensor {
        TORCH_CHECK(false, "MoE copies no experts (hot-expert replication is TransformerMLP's)");
      });
}

TransformerMLPImpl::TransformerMLPImpl(const TransformerMLPOptions& options_) : options(options_) {
  check_positive(options.d_hidden(), "d_hidden");
  check_positive(options.world_size(), "world_size");
  check_positive(options.ep_chunks(), "ep_chunks");
  gate = register_module("gate", make_gate(options.gate(), options.num_experts() * options.world_size(),
                                           options.d_model(), options.top_k(), options.gate_bias()));
  options.top_k(gate->top_k());
  TORCH_CHECK(options.ep_replicate() >= 0, "ep_replicate must be >= 0, got ", options.ep_replicate());
  TORCH_CHECK(options.ep_replicate() == 0 || options.world_size() > 1, "ep_replicate=", options.ep_replicate(),
              " copies experts between the ranks of expert parallelism, but world_size=1");
  TORCH_CHECK(options.ep_gemm_flops() >= 0 && options.ep_link_bytes() >= 0,
              "ep_gemm_flops and ep_link_bytes must be >= 0 (0: the device's defaults), got ep_gemm_flops=",
              options.ep_gemm_flops(), ", ep_link_bytes=", options.ep_link_bytes());
  check_expert_parallel(options.world_size(), options.group_name(), "TransformerMLP",
                        {"num_experts", "d_model", "d_hidden", "top_k", "slots_per_token", "activation", "bias",
                         "ep_chunks", "hierarchical", "ep_replicate", "ep_gemm_flops", "ep_link_bytes"},
                        {options.num_experts(), options.d_model(), options.d_hidden(), options.top_k(),
                         gate->slots_per_token(), static_cast<int64_t>(options.activation()), options.bias(),
                         options.ep_chunks(), !options.node_group().empty(), options.ep_replicate(),
                         // ranks that price copies differently would choose different ones (whole units suffice)
                         static_cast<int64_t>(std::llround(options.ep_gemm_flops())),
                         static_cast<int64_t>(std::llround(options.ep_link_bytes()))});
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
  // One process with the built-in NaiveGate: the whole layer as the one op ops::moe_ffn (one autograd node, the
  // composed path's values bit for bit). Debug mode keeps the composed path, which checks each stage.
  auto* naive = dynamic_cast<NaiveGateImpl*>(gate.get());
  if (options.fused() && options.world_size() == 1 && !debug_enabled() && naive != nullptr &&
      typeid(*naive) == typeid(NaiveGateImpl)) {
    const torch::Tensor tokens = token_matrix(x, options.d_model());
    const ops::MoEFFN out =
        naive->forward_with_experts(tokens, htoh4->weight, htoh4->bias, h4toh->weight, h4toh->bias,
                                    activation_name(options.activation()), options.recompute_activation());
    keep_record(record_, tokens.size(0), tokens.size(0) * naive->top_k(), out.expert_counts, *naive);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = out.y.size(1);
    return out.y.reshape(shape);
  }
  Replication replication;
  if (options.ep_replicate() > 0) {
    int64_t params = 0;
    for (const torch::Tensor& p : {htoh4->weight, htoh4->bias, h4toh->weight, h4toh->bias}) {
      if (p.defined()) params += p.numel();
    }
    replication = Replication{options.ep_replicate(), params / options.num_experts(),
                              static_cast<int64_t>(htoh4->weight.element_size()), options.ep_gemm_flops(),
                              options.ep_link_bytes()};
  }
  const Exchange ex{options.world_size(), options.group_name(), options.ep_chunks(),
                    options.node_group(), options.rail_group(), replication};
  // SwiGLU experts without a second bias apply the routing scores in the activation (as ops::moe_ffn does):
  // W2 (s a) = s (W2 a), so the combine only sums.
  const bool scored = options.activation() == Activation::kSwiGLU && !h4toh->bias.defined();
  const auto experts = [&](const torch::Tensor& rows, const torch::Tensor& offsets, const torch::Tensor& scores,
                           const GroupedLinearImpl& in, const GroupedLinearImpl& out,
                           const std::function<torch::Tensor(const torch::Tensor&)>& w) {
    const auto bias = [&](const torch::Tensor& b) {
      return b.defined() ? std::optional<torch::Tensor>(w(b)) : std::nullopt;
    };
    // one at a time, in a fixed order: w may be a collective (the copies of replication)
    const torch::Tensor w_in = w(in.weight);
    const std::optional<torch::Tensor> b_in = bias(in.bias);
    torch::Tensor h = ops::grouped_linear(rows, offsets, w_in, b_in);
    const torch::Tensor w_out = w(out.weight);
    const std::optional<torch::Tensor> b_out = bias(out.bias);
    const torch::Tensor a = scores.defined() ? ops::swiglu(h, scores) : apply_activation(h, options.activation());
    return ops::grouped_linear(a, offsets, w_out, b_out);
  };
  // Under autocast the rows are cast before they move: the first grouped GEMM would cast them anyway.
  return route_and_combine(
      x, options.d_model(), options.num_experts(), ex, /*cast_to_autocast=*/true, "TransformerMLP", *gate, record_,
      scored,
      [&](const torch::Tensor& rows, const torch::Tensor& offsets, TokenDispatch& tokens, int64_t c) {
        const torch::Tensor scores = scored ? tokens.row_scores(c) : torch::Tensor();
        return experts(rows, offsets, scores, *htoh4, *h4toh, [](const torch::Tensor& t) { return t; });
      },
      [&](const torch::Tensor& rows, const torch::Tensor& offsets, const std::vector<int64_t>& replicated,
          const torch::Tensor& scores) {
        // copies of the replicated experts' weights; their gradients flow back to the owners'
        return experts(rows, offsets, scores, *htoh4, *h4toh, [&](const torch::Tensor& t) {
          return ops::replicate_experts(t, replicated, options.num_experts(), options.group_name());
        });
      });
}

}  // namespace fastmoe::nn
