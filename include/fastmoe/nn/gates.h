// Gates for the fastmoe::nn modules. A gate maps x [T, d_model] to (topk_idx [T, slots] int64, topk_score
// [T, slots]): global expert ids, -1 for an empty slot (an assignment dropped by a capacity limit, or not made),
// and the weights the layer combines the expert outputs with (0 in an empty slot). A gate also keeps the loss
// terms and the drop count of its last forward.
//
// A gate holds its parameters and computes its logits; the routing rule and the loss terms are the registered gate
// ops (fastmoe/ops.h, csrc/ops/gates.cpp), which python/fastmoe/gates/ calls too. So each gate computes the same
// function as its Python namesake (same defaults, random draws and parameter and buffer names, so state_dicts
// interchange). Differences of API: `num_experts` is the global expert count (Python's num_expert * world_size),
// `bias` is Python's gate_bias, a capacity factor of std::nullopt is Python's capacity=None (per mode here), and
// loss() does not clear the loss. The constructors check their options by running the gate's op on 0 tokens, so
// the op's messages are the only ones.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/ordered_dict.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "fastmoe/ops.h"

namespace fastmoe::nn {

// The interface the MoE layers route through.
class GateImpl : public torch::nn::Module {
 public:
  // x [..., d_model] viewed as [T, d_model] -> (topk_idx [T, slots_per_token()] int64, topk_score of the same
  // shape in x's dtype).
  virtual std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) = 0;

  // The sum of the loss terms of the last forward: a scalar with gradients into the gate's parameters, to add to
  // the training objective. A zero scalar (in the gate's loss dtype and device) when there is none.
  torch::Tensor loss() const;
  // The loss terms of the last forward by name ("balance", "z"), in the order they were recorded.
  const torch::OrderedDict<std::string, torch::Tensor>& losses() const { return losses_; }
  // Assignments the last forward dropped ([] int64 on the device, never read on the host); undefined for gates
  // that drop nothing (NaiveGate, NoisyGate, SigmoidGate).
  const torch::Tensor& num_dropped() const { return num_dropped_; }

  int64_t d_model() const { return d_model_; }
  int64_t num_experts() const { return num_experts_; }
  int64_t top_k() const { return top_k_; }
  // The width of topk_idx: top_k, except for expert choice, where a token may get more experts.
  int64_t slots_per_token() const { return slots_per_token_; }

  // The logits projection, Linear(d_model -> num_experts), registered as "gate" by every gate but NoisyGate
  // (parameters gate.weight [E, d_model], gate.bias [E] when biased). Empty in NoisyGate, which holds w_gate and
  // w_noise instead.
  torch::nn::Linear gate{nullptr};

 protected:
  // Checks the sizes shared by every gate; each error names the argument and its value. slots_per_token < 0
  // means top_k.
  GateImpl(int64_t d_model, int64_t num_experts, int64_t top_k, int64_t slots_per_token = -1);

  // x [..., d_model] viewed as [T, d_model], after checking its shape, dtype and device against the gate's first
  // parameter (so a mismatch is reported by name, not by the first matmul).
  torch::Tensor token_matrix(const torch::Tensor& x) const;

  // Each forward starts by forgetting the previous forward's losses and drop count.
  void reset_stats();
  // What a gate op returned: replaces the recorded loss terms ("balance", "z") and the drop count by the ones it
  // has (0-dim outputs; [0] means none), and returns (topk_idx, topk_score).
  std::tuple<torch::Tensor, torch::Tensor> record(const ops::GateRouting& routing);
  // Records the loss term `name` of this forward, replacing a term of the same name.
  void add_loss(const std::string& name, torch::Tensor loss);
  void set_num_dropped(torch::Tensor num_dropped) { num_dropped_ = std::move(num_dropped); }

 private:
  int64_t d_model_;
  int64_t num_experts_;
  int64_t top_k_;
  int64_t slots_per_token_;
  torch::OrderedDict<std::string, torch::Tensor> losses_;
  torch::Tensor num_dropped_;
};

// Holds any gate: what TORCH_MODULE would give for the abstract GateImpl, plus implicit conversions from each
// concrete gate's holder and shared_ptr (SwitchGate(...), std::make_shared<MyGateImpl>(...)).
class Gate : public torch::nn::ModuleHolder<GateImpl> {
 public:
  Gate(std::nullptr_t) : ModuleHolder(nullptr) {}
  template <typename GateType, typename = std::enable_if_t<std::is_base_of_v<GateImpl, GateType>>>
  Gate(std::shared_ptr<GateType> gate) : ModuleHolder(std::shared_ptr<GateImpl>(std::move(gate))) {}
  template <typename GateType, typename = std::enable_if_t<std::is_base_of_v<GateImpl, GateType>>>
  Gate(const torch::nn::ModuleHolder<GateType>& gate) : Gate(gate.ptr()) {}
};

// ---------------------------------------------------------------- NaiveGate

struct NaiveGateOptions {
  NaiveGateOptions(int64_t d_model, int64_t num_experts) : d_model_(d_model), num_experts_(num_experts) {}
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, num_experts);  // global expert count
  TORCH_ARG(int64_t, top_k) = 2;
  TORCH_ARG(bool, bias) = true;
  // > 0 records ST-MoE's router z-loss "z" = z_loss_coef * mean_t logsumexp(logits[t])^2.
  TORCH_ARG(double, z_loss_coef) = 0.0;
  // > 0 records the Switch Transformer's balance loss over every slot, "balance" = balance_coef * E * sum_e f_e P_e.
  TORCH_ARG(double, balance_coef) = 0.0;
};

// FastMoE's NaiveGate: logits = gate(x); keep the top-k logits; softmax over those k only. No balance loss unless
// balance_coef > 0. Parameters: gate.weight [E, d_model], gate.bias [E].
class NaiveGateImpl : public GateImpl {
 public:
  explicit NaiveGateImpl(const NaiveGateOptions& options);
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) override;
  // This gate and fused experts (w1 [E, h1, d_model], w2 [E, d_out, hidden]) on one process as the one op
  // ops::moe_ffn (TransformerMLP's forward); records the loss terms as forward does.
  ops::MoEFFN forward_with_experts(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& b1,
                                   const torch::Tensor& w2, const torch::Tensor& b2, const std::string& activation,
                                   bool recompute_activation = false);

  NaiveGateOptions options;
};
TORCH_MODULE(NaiveGate);

// ---------------------------------------------------------------- NoisyGate

struct NoisyGateOptions {
  NoisyGateOptions(int64_t d_model, int64_t num_experts) : d_model_(d_model), num_experts_(num_experts) {}
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, num_experts);  // global expert count
  TORCH_ARG(int64_t, top_k) = 2;
  // Floor of the noise standard deviation, so the smooth load estimator never divides by zero.
  TORCH_ARG(double, noise_epsilon) = 1e-2;
  // Weights of the two cv^2 terms of the loss (FastMoE's unweighted sum by default).
  TORCH_ARG(double, w_importance) = 1.0;
  TORCH_ARG(double, w_load) = 1.0;
  TORCH_ARG(double, z_loss_coef) = 0.0;  // on the (noisy) logits
};

// Noisy top-k gating (Shazeer et al. 2017):
//   clean = x w_gate; in training H = clean + randn_like(clean) * (softplus(x w_noise) + noise_epsilon), in eval
//   H = clean; topk_score = softmax over the k largest H.
//   loss "balance" = w_importance * cv^2(importance) + w_load * cv^2(load), cv^2 = var / (mean^2 + 1e-10) with
//   the population variance; importance = per-expert sum of the scores; load = per-expert sum of the smooth
//   P(in top k) in training with k < E, else the per-expert count of assignments.
// Parameters: w_gate [d_model, E], w_noise [d_model, E], zero-initialised.
class NoisyGateImpl : public GateImpl {
 public:
  explicit NoisyGateImpl(const NoisyGateOptions& options);
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) override;

  NoisyGateOptions options;
  torch::Tensor w_gate;
  torch::Tensor w_noise;
};
TORCH_MODULE(NoisyGate);

// ---------------------------------------------------------------- GShardGate

struct GShardGateOptions {
  GShardGateOptions(int64_t d_model, int64_t num_experts) : d_model_(d_model), num_experts_(num_experts) {}
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, num_experts);  // global expert count
  TORCH_ARG(int64_t, top_k) = 2;    // must be 2
  TORCH_ARG(bool, bias) = true;
  // Per-expert capacity ceil(factor * T * 2 / E) in training and in eval; std::nullopt: no limit in that mode.
  TORCH_ARG(std::optional<double>, capacity_factor_train) = 1.2;
  TORCH_ARG(std::optional<double>, capacity_factor_eval) = 2.4;
  // In training, keep each token's second expert only where u < 2 * g2, u ~ U[0, 1) (GShard's random routing).
  TORCH_ARG(bool, random_routing) = true;
  TORCH_ARG(double, aux_loss_coef) = 1.0;
  TORCH_ARG(double, z_loss_coef) = 0.0;
};

// GShard's top-2 gate (Lepikhin et al. 2020, Algorithm 1): the two largest logits, scores g1, g2 = softmax over
// those two (the paper's normalised weights); random routing of the second expert in training; each expert keeps
// its highest-scored assignments up to its capacity, and empty slots get score 0.
// loss "balance" = aux_loss_coef * E^2 * mean_e(f_e * m_e): f_e = fraction of tokens whose first choice is e
// (before any drop), m_e = mean softmax probability of e; 1 * aux_loss_coef when uniform.
// Parameters: gate.weight [E, d_model], gate.bias [E].
class GShardGateImpl : public GateImpl {
 public:
  explicit GShardGateImpl(const GShardGateOptions& options);
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) override;

  GShardGateOptions options;
};
TORCH_MODULE(GShardGate);

// ---------------------------------------------------------------- SwitchGate

struct SwitchGateOptions {
  SwitchGateOptions(int64_t d_model, int64_t num_experts) : d_model_(d_model), num_experts_(num_experts) {}
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, num_experts);  // global expert count
  TORCH_ARG(bool, bias) = true;
  // In training the router's input is multiplied by U[1 - switch_eps, 1 + switch_eps] noise.
  TORCH_ARG(double, switch_eps) = 0.1;
  // Per-expert capacity ceil(factor * T / E) in training and in eval; std::nullopt: no limit in that mode.
  TORCH_ARG(std::optional<double>, capacity_factor_train) = 1.2;
  TORCH_ARG(std::optional<double>, capacity_factor_eval) = 2.4;
  TORCH_ARG(double, aux_loss_coef) = 1e-2;
  TORCH_ARG(double, z_loss_coef) = 0.0;
};

// The Switch Transformer's top-1 gate (Fedus et al. 2021): jittered router input in training; score = the
// largest softmax probability over all E (not renormalised); capacity as GShardGate.
// loss "balance" = aux_loss_coef * E * sum_e f_e * P_e (f_e before capacity, P_e the mean probability).
// Parameters: gate.weight [E, d_model], gate.bias [E].
class SwitchGateImpl : public GateImpl {
 public:
  explicit SwitchGateImpl(const SwitchGateOptions& options);
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) override;

  SwitchGateOptions options;
};
TORCH_MODULE(SwitchGate);

// ---------------------------------------------------------------- SwipeGate

struct SwipeGateOptions {
  SwipeGateOptions(int64_t d_model, int64_t num_experts) : d_model_(d_model), num_experts_(num_experts) {}
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, num_experts);  // global expert count
  TORCH_ARG(int64_t, top_k) = 2;
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(double, z_loss_coef) = 0.0;
};

// A balanced-assignment gate after FastMoE's SwipeGate, per expert and on the device. In training each expert
// takes at most ceil(T * k / E) assignments: over E rounds every token that still has a free slot proposes to
// its next expert by logit, and each expert accepts the proposals with the highest softmax probability while it
// has room. Scores are the softmax over the logits of the assigned experts (0 in an empty slot). In eval it is
// NaiveGate. No balance loss. Parameters: gate.weight [E, d_model], gate.bias [E].
class SwipeGateImpl : public GateImpl {
 public:
  explicit SwipeGateImpl(const SwipeGateOptions& options);
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) override;

  SwipeGateOptions options;
};
TORCH_MODULE(SwipeGate);

// ---------------------------------------------------------------- ExpertChoiceGate

struct ExpertChoiceGateOptions {
  ExpertChoiceGateOptions(int64_t d_model, int64_t num_experts) : d_model_(d_model), num_experts_(num_experts) {}
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, num_experts);  // global expert count
  TORCH_ARG(int64_t, top_k) = 2;
  // Each expert takes C = min(T, ceil(capacity_factor * T * top_k / E)) tokens.
  TORCH_ARG(double, capacity_factor) = 1.0;
  // The width of the routing, slots_per_token(); std::nullopt: E (nothing is cut). A token chosen by more
  // experts keeps the highest-scored ones and the rest count in num_dropped.
  TORCH_ARG(std::optional<int64_t>, max_experts_per_token) = std::nullopt;
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(double, z_loss_coef) = 0.0;
};

// Expert-choice routing (Zhou et al. 2022): S = softmax(logits) over experts; each expert picks its C tokens with
// the largest S[:, e]; slot j of a token holds its j-th expert by score, with score S[t, e] (not renormalised),
// and -1 / 0 where empty. Balanced by construction: no balance loss. Not causal (it sees the whole batch).
// Parameters: gate.weight [E, d_model], gate.bias [E].
class ExpertChoiceGateImpl : public GateImpl {
 public:
  explicit ExpertChoiceGateImpl(const ExpertChoiceGateOptions& options);
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) override;

  ExpertChoiceGateOptions options;
};
TORCH_MODULE(ExpertChoiceGate);

// ---------------------------------------------------------------- SigmoidGate

struct SigmoidGateOptions {
  SigmoidGateOptions(int64_t d_model, int64_t num_experts) : d_model_(d_model), num_experts_(num_experts) {}
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, num_experts);  // global expert count
  TORCH_ARG(int64_t, top_k) = 2;
  // Group-limited routing: the experts form n_groups contiguous groups and each token picks its experts from the
  // topk_groups groups with the largest sum of their top-2 selection scores.
  TORCH_ARG(int64_t, n_groups) = 1;
  TORCH_ARG(int64_t, topk_groups) = 1;
  // The selected affinities are divided by their sum (when normalize), then multiplied by this.
  TORCH_ARG(bool, normalize) = true;
  TORCH_ARG(double, routed_scaling_factor) = 1.0;
  // After each training forward: expert_bias += bias_update_rate * sign(T * k / E - load of the expert).
  TORCH_ARG(double, bias_update_rate) = 1e-3;
  TORCH_ARG(bool, bias) = false;
  // > 0 records DeepSeek-V3's complementary sequence-wise loss "balance" (the batch as one sequence).
  TORCH_ARG(double, aux_loss_coef) = 0.0;
};

// DeepSeek-V3's gate: sigmoid affinities; selection by affinity + expert_bias (a buffer that only steers the
// choice and carries no gradient), group-limited top-k; weights from the unbiased affinities, normalised and
// scaled; auxiliary-loss-free balancing by the bias update in training. Parameters: gate.weight [E, d_model]
// (gate.bias [E] when biased); buffer expert_bias [E], which stays fp32 when the module is cast.
class SigmoidGateImpl : public GateImpl {
 public:
  explicit SigmoidGateImpl(const SigmoidGateOptions& options);
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) override;

  // Casts keep expert_bias in fp32, so updates of 1e-3 are not rounded away (only its device follows).
  using torch::nn::Module::to;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;

  SigmoidGateOptions options;
  torch::Tensor expert_bias;
};
TORCH_MODULE(SigmoidGate);

}  // namespace fastmoe::nn
