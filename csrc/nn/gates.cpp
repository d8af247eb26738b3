// fastmoe::nn gates: each holds its parameters, computes its logits and calls its registered gate op
// (csrc/ops/gates.cpp), the same op python/fastmoe/gates/ calls; no routing or loss formula lives here.
#include "fastmoe/nn/gates.h"

#include <torch/torch.h>

#include <cmath>

#include "fastmoe/ops.h"
#include "fastmoe/token_dispatch.h"
#include "nn/checks.h"

namespace fastmoe::nn {
namespace {

using detail::check_positive;

// Logits of 0 tokens: running a gate's op on them checks the options with the op's own messages, at the cost of a
// few empty tensors. (Not on the meta device: libtorch without Python lacks Meta kernels of some ATen ops.)
torch::Tensor no_tokens(int64_t num_experts) {
  return torch::empty({0, num_experts});
}

// The per-mode capacity options keep their own names in the message (the op knows one factor).
void check_capacity_factor(const std::optional<double>& factor, const char* name) {
  TORCH_CHECK(!factor.has_value() || (std::isfinite(*factor) && *factor > 0), name,
              " must be a finite number > 0, got ", factor.value_or(0.0));
}

torch::nn::Linear make_logits_layer(int64_t d_model, int64_t num_experts, bool bias) {
  return torch::nn::Linear(torch::nn::LinearOptions(d_model, num_experts).bias(bias));
}

// Debug mode checks each gate's logits before its op, as fastmoe.debug does for the Python gates; the message names
// the gate's class ("NaiveGate").
torch::Tensor checked_logits(const GateImpl& gate, torch::Tensor logits) {
  if (debug_enabled()) {
    std::string name = gate.name();
    if (const auto colon = name.rfind("::"); colon != std::string::npos) name.erase(0, colon + 2);
    if (name.size() > 4 && name.compare(name.size() - 4, 4, "Impl") == 0) name.resize(name.size() - 4);
    check_finite(logits, name, "gate logits");
  }
  return logits;
}

}  // namespace

// ---------------------------------------------------------------- GateImpl

GateImpl::GateImpl(int64_t d_model, int64_t num_experts, int64_t top_k, int64_t slots_per_token)
    : d_model_(d_model),
      num_experts_(num_experts),
      top_k_(top_k),
      slots_per_token_(slots_per_token < 0 ? top_k : slots_per_token) {
  check_positive(d_model, "d_model");
  check_positive(num_experts, "num_experts");
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "top_k must be in [1, num_experts=", num_experts, "], got ", top_k);
}

torch::Tensor GateImpl::loss() const {
  torch::Tensor total;
  for (const auto& term : losses_) total = total.defined() ? total + term.value() : term.value();
  if (total.defined()) return total;
  const auto params = parameters();
  if (params.empty()) return torch::zeros({});
  // Losses are at least fp32, as the ops compute them.
  return torch::zeros({},
                      params.front().options().dtype(c10::promoteTypes(params.front().scalar_type(), torch::kFloat)));
}

void GateImpl::add_loss(const std::string& name, torch::Tensor loss) {
  if (torch::Tensor* existing = losses_.find(name)) {
    *existing = std::move(loss);
  } else {
    losses_.insert(name, std::move(loss));
  }
}

void GateImpl::reset_stats() {
  losses_.clear();
  num_dropped_ = torch::Tensor();
}

std::tuple<torch::Tensor, torch::Tensor> GateImpl::record(const ops::GateRouting& routing) {
  reset_stats();
  if (routing.balance_loss.dim() == 0) add_loss("balance", routing.balance_loss);
  if (routing.z_loss.dim() == 0) add_loss("z", routing.z_loss);
  if (routing.num_dropped.dim() == 0) set_num_dropped(routing.num_dropped);
  return {routing.topk_idx, routing.topk_score};
}

torch::Tensor GateImpl::token_matrix(const torch::Tensor& x) const {
  const torch::Tensor tokens = detail::token_matrix(x, d_model_);
  const auto params = parameters();
  if (!params.empty()) {
    const torch::Tensor& param = params.front();
    TORCH_CHECK(x.device() == param.device(), "x is on device ", x.device(), " but the gate's parameters are on ",
                param.device());
    TORCH_CHECK(x.scalar_type() == param.scalar_type(), "x has dtype ", x.scalar_type(),
                " but the gate's parameters are ", param.scalar_type());
  }
  return tokens;
}

// ---------------------------------------------------------------- NaiveGate

NaiveGateImpl::NaiveGateImpl(const NaiveGateOptions& options_)
    : GateImpl(options_.d_model(), options_.num_experts(), options_.top_k()), options(options_) {
  ops::naive_gate(no_tokens(options.num_experts()), options.top_k(), options.balance_coef(), options.z_loss_coef());
  gate = register_module("gate", make_logits_layer(options.d_model(), options.num_experts(), options.bias()));
}

std::tuple<torch::Tensor, torch::Tensor> NaiveGateImpl::forward(const torch::Tensor& x) {
  const torch::Tensor logits = checked_logits(*this, gate->forward(token_matrix(x)));
  return record(ops::naive_gate(logits, options.top_k(), options.balance_coef(), options.z_loss_coef()));
}

ops::MoEFFN NaiveGateImpl::forward_with_experts(const torch::Tensor& x, const torch::Tensor& w1,
                                                const torch::Tensor& b1, const torch::Tensor& w2,
                                                const torch::Tensor& b2, const std::string& activation,
                                                bool recompute_activation) {
  const auto optional = [](const torch::Tensor& t) {
    return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt;
  };
  ops::MoEFFN out =
      ops::moe_ffn(token_matrix(x), gate->weight, optional(gate->bias), w1, optional(b1), w2, optional(b2),
                   options.top_k(), activation, options.balance_coef(), options.z_loss_coef(), recompute_activation);
  record(ops::GateRouting{{}, {}, out.balance_loss, out.z_loss, torch::empty({0}), {}});
  return out;
}

// ---------------------------------------------------------------- NoisyGate

NoisyGateImpl::NoisyGateImpl(const NoisyGateOptions& options_)
    : GateImpl(options_.d_model(), options_.num_experts(), options_.top_k()), options(options_) {
  ops::noisy_gate(no_tokens(options.num_experts()), std::nullopt, options.top_k(), options.noise_epsilon(),
                  options.w_importance(), options.w_load(), options.z_loss_coef());
  w_gate = register_parameter("w_gate", torch::zeros({options.d_model(), options.num_experts()}));
  w_noise = register_parameter("w_noise", torch::zeros({options.d_model(), options.num_experts()}));
}

// In training the op adds noise scaled by softplus(x w_noise) + noise_epsilon; eval routes on x w_gate alone.
std::tuple<torch::Tensor, torch::Tensor> NoisyGateImpl::forward(const torch::Tensor& input) {
  const torch::Tensor x = token_matrix(input);
  const torch::Tensor clean = checked_logits(*this, torch::matmul(x, w_gate));
  std::optional<torch::Tensor> noise_logits;
  if (is_training()) noise_logits = torch::matmul(x, w_noise);
  return record(ops::noisy_gate(clean, noise_logits, options.top_k(), options.noise_epsilon(), options.w_importance(),
                                options.w_load(), options.z_loss_coef()));
}

// ---------------------------------------------------------------- GShardGate

GShardGateImpl::GShardGateImpl(const GShardGateOptions& options_)
    : GateImpl(options_.d_model(), options_.num_experts(), options_.top_k()), options(options_) {
  TORCH_CHECK(options.top_k() == 2, "GShardGate routes each token to 2 experts: top_k must be 2, got ",
              options.top_k());
  check_capacity_factor(options.capacity_factor_train(), "capacity_factor_train");
  check_capacity_factor(options.capacity_factor_eval(), "capacity_factor_eval");
  ops::gshard_gate(no_tokens(options.num_experts()), /*training=*/false, options.capacity_factor_eval(),
                   options.random_routing(), options.aux_loss_coef(), options.z_loss_coef());
  gate = register_module("gate", make_logits_layer(options.d_model(), options.num_experts(), options.bias()));
}

std::tuple<torch::Tensor, torch::Tensor> GShardGateImpl::forward(const torch::Tensor& input) {
  const torch::Tensor logits = checked_logits(*this, gate->forward(token_matrix(input)));
  const auto& factor = is_training() ? options.capacity_factor_train() : options.capacity_factor_eval();
  return record(ops::gshard_gate(logits, is_training(), factor, options.random_routing(), options.aux_loss_coef(),
                                 options.z_loss_coef()));
}

// ---------------------------------------------------------------- SwitchGate

SwitchGateImpl::SwitchGateImpl(const SwitchGateOptions& options_)
    : GateImpl(options_.d_model(), options_.num_experts(), /*top_k=*/1), options(options_) {
  check_capacity_factor(options.capacity_factor_train(), "capacity_factor_train");
  check_capacity_factor(options.capacity_factor_eval(), "capacity_factor_eval");
  ops::switch_jitter(no_tokens(options.d_model()), options.switch_eps());
  ops::switch_gate(no_tokens(options.num_experts()), options.capacity_factor_eval(), options.aux_loss_coef(),
                   options.z_loss_coef());
  gate = register_module("gate", make_logits_layer(options.d_model(), options.num_experts(), options.bias()));
}

// The jitter (training) enters the router's input only.
std::tuple<torch::Tensor, torch::Tensor> SwitchGateImpl::forward(const torch::Tensor& input) {
  torch::Tensor x = token_matrix(input);
  if (is_training() && options.switch_eps() > 0) x = ops::switch_jitter(x, options.switch_eps());
  const auto& factor = is_training() ? options.capacity_factor_train() : options.capacity_factor_eval();
  return record(ops::switch_gate(checked_logits(*this, gate->forward(x)), factor, options.aux_loss_coef(),
                                 options.z_loss_coef()));
}

// ---------------------------------------------------------------- SwipeGate

SwipeGateImpl::SwipeGateImpl(const SwipeGateOptions& options_)
    : GateImpl(options_.d_model(), options_.num_experts(), options_.top_k()), options(options_) {
  ops::swipe_gate(no_tokens(options.num_experts()), options.top_k(), /*training=*/false, options.z_loss_coef());
  gate = register_module("gate", make_logits_layer(options.d_model(), options.num_experts(), options.bias()));
}

std::tuple<torch::Tensor, torch::Tensor> SwipeGateImpl::forward(const torch::Tensor& input) {
  const torch::Tensor logits = checked_logits(*this, gate->forward(token_matrix(input)));
  return record(ops::swipe_gate(logits, options.top_k(), is_training(), options.z_loss_coef()));
}

// ---------------------------------------------------------------- ExpertChoiceGate

namespace {
int64_t expert_choice_slots(const ExpertChoiceGateOptions& options) {
  if (!options.max_experts_per_token().has_value()) return options.num_experts();
  const int64_t slots = *options.max_experts_per_token();
  TORCH_CHECK(slots >= 1 && slots <= options.num_experts(),
              "max_experts_per_token must be in [1, num_experts=", options.num_experts(), "], got ", slots);
  return slots;
}
}  // namespace

ExpertChoiceGateImpl::ExpertChoiceGateImpl(const ExpertChoiceGateOptions& options_)
    : GateImpl(options_.d_model(), options_.num_experts(), options_.top_k(), expert_choice_slots(options_)),
      options(options_) {
  ops::expert_choice_gate(no_tokens(options.num_experts()), options.top_k(), options.capacity_factor(),
                          slots_per_token(), options.z_loss_coef());
  gate = register_module("gate", make_logits_layer(options.d_model(), options.num_experts(), options.bias()));
}

std::tuple<torch::Tensor, torch::Tensor> ExpertChoiceGateImpl::forward(const torch::Tensor& input) {
  const torch::Tensor logits = checked_logits(*this, gate->forward(token_matrix(input)));
  return record(ops::expert_choice_gate(logits, options.top_k(), options.capacity_factor(), slots_per_token(),
                                        options.z_loss_coef()));
}

// ---------------------------------------------------------------- SigmoidGate

SigmoidGateImpl::SigmoidGateImpl(const SigmoidGateOptions& options_)
    : GateImpl(options_.d_model(), options_.num_experts(), options_.top_k()), options(options_) {
  const int64_t num_experts = options.num_experts();
  ops::sigmoid_gate(no_tokens(num_experts), torch::zeros({num_experts}), options.top_k(), options.n_groups(),
                    options.topk_groups(), options.normalize(), options.routed_scaling_factor(),
                    options.aux_loss_coef(), /*training=*/false, options.bias_update_rate());
  gate = register_module("gate", make_logits_layer(options.d_model(), num_experts, options.bias()));
  expert_bias = register_buffer("expert_bias", torch::zeros({num_experts}, torch::kFloat32));
}

void SigmoidGateImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  const torch::Tensor bias = expert_bias.detach().clone();
  Module::to(device, dtype, non_blocking);
  expert_bias.set_data(bias.to(device, torch::kFloat32));
}

void SigmoidGateImpl::to(torch::Dtype dtype, bool non_blocking) {
  const torch::Tensor bias = expert_bias.detach().clone();
  Module::to(dtype, non_blocking);
  expert_bias.set_data(bias.to(expert_bias.device(), torch::kFloat32));
}

// The op returns the bias update of a training forward ([0] otherwise); it is applied here, outside autograd.
std::tuple<torch::Tensor, torch::Tensor> SigmoidGateImpl::forward(const torch::Tensor& input) {
  const torch::Tensor logits = checked_logits(*this, gate->forward(token_matrix(input)));
  const ops::GateRouting routing = ops::sigmoid_gate(
      logits, expert_bias, options.top_k(), options.n_groups(), options.topk_groups(), options.normalize(),
      options.routed_scaling_factor(), options.aux_loss_coef(), is_training(), options.bias_update_rate());
  if (routing.expert_bias_update.numel() > 0) {
    torch::NoGradGuard no_grad;
    expert_bias.add_(routing.expert_bias_update);
  }
  return record(routing);
}

}  // namespace fastmoe::nn
