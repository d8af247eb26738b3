// fastmoe::nn: Mixture-of-Experts modules for libtorch users. They call the same registered ops as the Python
// front end (include/fastmoe/ops.h), so they compute the same values and gradients.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/pimpl.h>

#include <string>
#include <utility>
#include <vector>

#include "fastmoe/nn/gates.h"

namespace fastmoe::nn {

// Experts' linear layers fused into one grouped GEMM: weight [E, out, in], bias [E, out].
class GroupedLinearImpl : public torch::nn::Module {
 public:
  GroupedLinearImpl(int64_t num_experts, int64_t in_features, int64_t out_features, bool bias = true);
  // x [N, in] with rows grouped by expert as expert_offsets [E + 1] says -> [N, out].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& expert_offsets);

  torch::Tensor weight;
  torch::Tensor bias;
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
};

// An MoE layer over arbitrary expert modules: each expert is any module whose forward takes the [rows, d_model]
// block routed to it and returns [rows, d_out]. Experts are registered as expert0, expert1, ... (the local ones:
// num_experts modules on each rank).
// The loop over experts reads the expert counts on the host once per forward.
class MoEImpl : public torch::nn::Module {
 public:
  MoEImpl(const MoEOptions& options, std::vector<torch::nn::AnyModule> experts);
  // x [..., d_model] -> [..., d_out]
  torch::Tensor forward(const torch::Tensor& x);
  // The gate's balance loss of the last forward (a zero scalar for gates without one): add it to the task loss.
  torch::Tensor loss() const { return gate->loss(); }

  MoEOptions options;
  Gate gate{nullptr};
  std::vector<torch::nn::AnyModule> experts;

 private:
  torch::Tensor run_experts(const torch::Tensor& rows, const std::vector<int64_t>& bounds);
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
  // Expert parallelism: with world_size > 1 this layer holds num_experts of the num_experts * world_size experts;
  // global expert g lives on rank g / num_experts of the process group registered as group_name (see
  // fastmoe/distributed.h), whose size must be world_size. The gate routes over all of them. Construction checks
  // that every rank has the same configuration (a collective).
  TORCH_ARG(int64_t, world_size) = 1;
  TORCH_ARG(std::string, group_name) = "";
};

// The Transformer FFN with fused experts: h4toh(act(htoh4(x))) as grouped GEMMs. Parameter names match
// fastmoe.FMoETransformerMLP: gate.gate.{weight,bias}, experts.htoh4.{weight,bias}, experts.h4toh.{weight,bias}.
class TransformerMLPImpl : public torch::nn::Module {
 public:
  explicit TransformerMLPImpl(const TransformerMLPOptions& options);
  // x [..., d_model] -> [..., d_model]
  torch::Tensor forward(const torch::Tensor& x);
  // The gate's balance loss of the last forward (a zero scalar for gates without one): add it to the task loss.
  torch::Tensor loss() const { return gate->loss(); }

  TransformerMLPOptions options;
  Gate gate{nullptr};
  GroupedLinear htoh4{nullptr};
  GroupedLinear h4toh{nullptr};
};
TORCH_MODULE(TransformerMLP);

}  // namespace fastmoe::nn
