// fastmoe::nn: Mixture-of-Experts modules for libtorch users. They call the same registered ops as the Python
// front end (include/fastmoe/ops.h), so they compute the same values and gradients.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/pimpl.h>

#include <string>
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
  TORCH_ARG(int64_t, num_experts);
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, top_k) = 2;
  TORCH_ARG(bool, gate_bias) = true;
};

// An MoE layer over arbitrary expert modules: each expert is any module whose forward takes the [rows, d_model]
// block routed to it and returns [rows, d_out]. Experts are registered as expert0, expert1, ...
// The loop over experts reads the expert counts on the host once per forward.
class MoEImpl : public torch::nn::Module {
 public:
  MoEImpl(const MoEOptions& options, std::vector<torch::nn::AnyModule> experts);
  // x [..., d_model] -> [..., d_out]
  torch::Tensor forward(const torch::Tensor& x);

  MoEOptions options;
  NaiveGate gate{nullptr};
  std::vector<torch::nn::AnyModule> experts;
};
TORCH_MODULE(MoE);

enum class Activation { kGELU, kReLU, kSiLU, kSwiGLU };

struct TransformerMLPOptions {
  TransformerMLPOptions(int64_t num_experts, int64_t d_model, int64_t d_hidden)
      : num_experts_(num_experts), d_model_(d_model), d_hidden_(d_hidden) {}
  TORCH_ARG(int64_t, num_experts);
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, d_hidden);
  TORCH_ARG(int64_t, top_k) = 2;
  TORCH_ARG(Activation, activation) = Activation::kGELU;
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(bool, gate_bias) = true;
};

// The Transformer FFN with fused experts: h4toh(act(htoh4(x))) as grouped GEMMs. Parameter names match
// fastmoe.FMoETransformerMLP: gate.gate.{weight,bias}, experts.htoh4.{weight,bias}, experts.h4toh.{weight,bias}.
class TransformerMLPImpl : public torch::nn::Module {
 public:
  explicit TransformerMLPImpl(const TransformerMLPOptions& options);
  // x [..., d_model] -> [..., d_model]
  torch::Tensor forward(const torch::Tensor& x);

  TransformerMLPOptions options;
  NaiveGate gate{nullptr};
  GroupedLinear htoh4{nullptr};
  GroupedLinear h4toh{nullptr};
};
TORCH_MODULE(TransformerMLP);

}  // namespace fastmoe::nn
