// Gates for the fastmoe::nn modules. A gate maps x [T, d_model] to (topk_idx [T, k] int64, topk_score [T, k]).
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <tuple>

namespace fastmoe::nn {

struct NaiveGateOptions {
  NaiveGateOptions(int64_t d_model, int64_t num_experts) : d_model_(d_model), num_experts_(num_experts) {}
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, num_experts);  // global expert count
  TORCH_ARG(int64_t, top_k) = 2;
  TORCH_ARG(bool, bias) = true;
};

// FastMoE's NaiveGate: logits = gate(x); keep the top-k logits; softmax over those k only.
// Parameters: gate.weight [E, d_model], gate.bias [E] (the names match the Python NaiveGate).
class NaiveGateImpl : public torch::nn::Module {
 public:
  explicit NaiveGateImpl(const NaiveGateOptions& options);
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x);

  NaiveGateOptions options;
  torch::nn::Linear gate{nullptr};
};
TORCH_MODULE(NaiveGate);

}  // namespace fastmoe::nn
