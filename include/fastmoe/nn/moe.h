// fastmoe::nn: Mixture-of-Experts modules for libtorch users. They call the same registered ops as the Python
// front end (include/fastmoe/ops.h), so they compute the same values and gradients.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/pimpl.h>
#include <torch/ordered_dict.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "fastmoe/nn/gates.h"

namespace fastmoe::nn {

// What one forward of an MoE layer leaves for load statistics, as device tensors that nothing in the forward reads
// on the host (fastmoe.balance.BalanceRecord in Python).
struct BalanceRecord {
  int64_t num_tokens = 0;       // T
  int64_t num_slots = 0;        // T * k (k = slots per token of the routing)
  torch::Tensor expert_counts;  // [E] int64: slots of this rank's tokens per global expert
  torch::Tensor num_dropped;    // [] int64: slots the gate dropped for capacity (undefined if it reports none)
  torch::OrderedDict<std::string, torch::Tensor> losses;  // the gate's loss terms (detached)
};

// Experts' linear layers fused into one grouped GEMM: weight [E, out, in], bias [E, out]. `rank` is the layer's rank
// in its expert-parallel group: local expert e is global expert rank * E + e, which picks its initial values.
class GroupedLinearImpl : public torch::nn::Module {
 public:
  GroupedLinearImpl(int64_t num_experts, int64_t in_features, int64_t out_features, bool bias = true, int64_t rank = 0);
  // x [N, in] with rows grouped by expert as expert_offsets [E + 1] says -> [N, out].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& expert_offsets);
  // Draws one base seed from the CPU default generator (one draw, whatever E and rank), then fills each expert's
  // weight uniformly in +-1/sqrt(in_features) from its global expert's own generator; biases become zero. The
  // same values as fastmoe.FMoELinear's for the same seed (docs/distributed.md, "Initialisation").
  void reset_parameters();

  torch::Tensor weight;
  torch::Tensor bias;
  int64_t rank = 0;
};
TORCH_MODULE(GroupedLinear);

struct MoEOptions {
  MoEOptions(int64_t num_experts, int64_t d_model) : num_experts_(num_experts), d_model_(d_model) {}
  // Routes with `gate` (any gate over num_experts experts and d_model, e.g. SwitchGate(...)) instead of the default
  // NaiveGate. The layer takes top_k from that gate, and gate_bias does not apply.
  MoEOptions(int64_t num_experts, int64_t d_model, Gate gate)
      : num_experts_(num_experts), d_model_(d_model), gate_(std::move(gate)) {}
  TORCH_ARG(int64_t, num_experts);
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, top_k) = 2;
  TORCH_ARG(bool, gate_bias) = true;
  // Empty: NaiveGate(d_model, num_experts * world_size).top_k(top_k).bias(gate_bias). The layer registers the gate
  // itself (not a copy), so options reused for a second layer share it.
  TORCH_ARG(Gate, gate) = nullptr;
  // Expert parallelism: with world_size > 1 this layer holds num_experts of the num_experts * world_size experts;
  // global expert g lives on rank g / num_experts of the process group registered as group_name (see
  // fastmoe/distributed.h), whose size must be world_size. The gate routes over all of them. Construction checks
  // that every rank has the same configuration (a collective).
  TORCH_ARG(int64_t, world_size) = 1;
  TORCH_ARG(std::string, group_name) = "";
  // Expert parallelism: cut the tokens into this many chunks whose exchanges and experts run on their own CUDA
  // streams, so one chunk's all-to-all overlaps another chunk's experts (fastmoe.FMoE's ep_chunks). The result does
  // not depend on it.
  TORCH_ARG(int64_t, ep_chunks) = 1;
  // Expert parallelism: the hierarchical exchange, as TransformerMLPOptions' node_group and rail_group.
  TORCH_ARG(std::string, node_group) = "";
  TORCH_ARG(std::string, rail_group) = "";
};

// An MoE layer over arbitrary expert modules: each expert is any module whose forward takes the [rows, d_model]
// block routed to it and returns [rows, d_out]. Experts are registered as expert0, expert1, ... (the local ones:
// num_experts modules on each rank).
// The loop over experts reads the expert counts on the host once per forward.
class MoEImpl : public torch::nn::Module {
 public:
  // Takes the experts as they are: their initial values are the caller's (with expert parallelism, seed each rank's
  // experts differently, or use the factory constructor).
  MoEImpl(const MoEOptions& options, std::vector<torch::nn::AnyModule> experts);
  // Builds the num_experts local experts with make_expert(d_model), as fastmoe.FMoE(expert=callable) does: after one
  // base-seed draw from the CPU default generator, global expert g is made with that generator seeded for g alone,
  // and the generator gets its state back afterwards. So the ranks' experts differ and equal the experts of a
  // one-rank layer built from the same seed. The factory should make its parameters on the CPU (libtorch's
  // default); other devices' generators are not seeded.
  MoEImpl(const MoEOptions& options, const std::function<torch::nn::AnyModule(int64_t d_model)>& make_expert);
  // x [..., d_model] -> [..., d_out]
  torch::Tensor forward(const torch::Tensor& x);
  // The gate's balance loss of the last forward (a zero scalar for gates without one): add it to the task loss.
  torch::Tensor loss() const { return gate->loss(); }
  // The balance record of the last forward (empty counts before the first).
  const BalanceRecord& balance_record() const { return record_; }

  MoEOptions options;
  Gate gate{nullptr};
  std::vector<torch::nn::AnyModule> experts;

 private:
  void make_gate_and_check();
  void register_experts();
  torch::Tensor run_experts(const torch::Tensor& rows, const std::vector<int64_t>& bounds);
  BalanceRecord record_;
};
TORCH_MODULE(MoE);

enum class Activation { kGELU, kReLU, kSiLU, kSwiGLU };

struct TransformerMLPOptions {
  TransformerMLPOptions(int64_t num_experts, int64_t d_model, int64_t d_hidden)
      : num_experts_(num_experts), d_model_(d_model), d_hidden_(d_hidden) {}
  // Routes with `gate` instead of the default NaiveGate, as MoEOptions does.
  TransformerMLPOptions(int64_t num_experts, int64_t d_model, int64_t d_hidden, Gate gate)
      : num_experts_(num_experts), d_model_(d_model), d_hidden_(d_hidden), gate_(std::move(gate)) {}
  TORCH_ARG(int64_t, num_experts);
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, d_hidden);
  TORCH_ARG(int64_t, top_k) = 2;
  TORCH_ARG(Activation, activation) = Activation::kGELU;
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(bool, gate_bias) = true;
  // Empty: NaiveGate(d_model, num_experts * world_size).top_k(top_k).bias(gate_bias); otherwise top_k comes from
  // the gate.
  TORCH_ARG(Gate, gate) = nullptr;
  // On one process with a NaiveGate (and debug mode off) the layer runs as the one op ops::moe_ffn: one autograd
  // node, the composed path's values bit for bit (fastmoe.FMoETransformerMLP's fused_forward). false: always the
  // composed path.
  TORCH_ARG(bool, fused) = true;
  // The one op keeps the activation between the experts' GEMMs for the backward; true recomputes it there instead
  // (fastmoe.FMoETransformerMLP's recompute_activation: less memory held between forward and backward, one more
  // elementwise pass).
  TORCH_ARG(bool, recompute_activation) = false;
  // Expert parallelism: with world_size > 1 this layer holds num_experts of the num_experts * world_size experts;
  // global expert g lives on rank g / num_experts of the process group registered as group_name (see
  // fastmoe/distributed.h), whose size must be world_size. The gate routes over all of them. Construction checks
  // that every rank has the same configuration (a collective).
  TORCH_ARG(int64_t, world_size) = 1;
  TORCH_ARG(std::string, group_name) = "";
  // Expert parallelism: cut the tokens into this many chunks whose exchanges and experts run on their own CUDA
  // streams, so one chunk's all-to-all overlaps another chunk's experts (fastmoe.FMoE's ep_chunks). The result does
  // not depend on it.
  TORCH_ARG(int64_t, ep_chunks) = 1;
  // Expert parallelism: the hierarchical exchange over these two sub-groups of group_name, both or neither
  // (fastmoe.FMoE's ep_exchange="hierarchical"; docs/distributed.md, "Hierarchical exchange"): node_group holds
  // this rank's node, rail_group the ranks of its local index on every node (Python's
  // fastmoe._groups.hierarchical_groups makes both). The result is the flat exchange's, bit for bit.
  TORCH_ARG(std::string, node_group) = "";
  TORCH_ARG(std::string, rail_group) = "";
  // Expert parallelism: hot-expert replication (fastmoe.FMoE's ep_replicate and ep_replicate_rates; docs/
  // distributed.md, "Hot-expert replication"): each forward, copy up to ep_replicate experts to every rank where
  // the cost model finds it cheaper than moving their tokens. ep_gemm_flops and ep_link_bytes are the model's rates
  // (FLOP/s of the experts' GEMMs, bytes/s from one rank to another; 0: the device's defaults).
  TORCH_ARG(int64_t, ep_replicate) = 0;
  TORCH_ARG(double, ep_gemm_flops) = 0.0;
  TORCH_ARG(double, ep_link_bytes) = 0.0;
};

// The Transformer FFN with fused experts: h4toh(act(htoh4(x))) as grouped GEMMs. Parameter names match
// fastmoe.FMoETransformerMLP: gate.gate.{weight,bias}, experts.htoh4.{weight,bias}, experts.h4toh.{weight,bias}.
// Each global expert's weights come from its own generator (GroupedLinear), so for the same seed the layer starts
// with fastmoe.FMoETransformerMLP's values, and a rank of a world_size=W layer with the matching experts of the
// one-rank layer of num_experts * W experts.
class TransformerMLPImpl : public torch::nn::Module {
 public:
  explicit TransformerMLPImpl(const TransformerMLPOptions& options);
  // x [..., d_model] -> [..., d_model]
  torch::Tensor forward(const torch::Tensor& x);
  // The gate's balance loss of the last forward (a zero scalar for gates without one): add it to the task loss.
  torch::Tensor loss() const { return gate->loss(); }
  // The balance record of the last forward (empty counts before the first).
  const BalanceRecord& balance_record() const { return record_; }

  TransformerMLPOptions options;
  Gate gate{nullptr};
  GroupedLinear htoh4{nullptr};
  GroupedLinear h4toh{nullptr};

 private:
  BalanceRecord record_;
};
TORCH_MODULE(TransformerMLP);

}  // namespace fastmoe::nn
