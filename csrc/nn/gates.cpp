// fastmoe::nn gates: compositions of the registered routing and balance ops (route_topk, capacity_limit) with the
// libtorch expressions each paper's formula needs. Each transcribes its namesake in python/fastmoe/gates/, in the
// same operation order and with the same random draws, so both front ends give the same values.
#include "fastmoe/nn/gates.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "fastmoe/ops.h"
#include "nn/checks.h"

namespace fastmoe::nn {
namespace {

using detail::check_positive;

constexpr double kInf = std::numeric_limits<double>::infinity();

void check_top_k(int64_t top_k, int64_t num_experts) {
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "top_k must be in [1, num_experts=", num_experts, "], got ", top_k);
}

void check_non_negative(double value, const char* name) {
  TORCH_CHECK(std::isfinite(value) && value >= 0, name, " must be a finite number >= 0, got ", value);
}

void check_positive_real(double value, const char* name) {
  TORCH_CHECK(std::isfinite(value) && value > 0, name, " must be a finite number > 0, got ", value);
}

void check_capacity_factor(const std::optional<double>& factor, const char* name) {
  if (factor.has_value()) check_positive_real(*factor, name);
}

torch::nn::Linear make_logits_layer(int64_t d_model, int64_t num_experts, bool bias) {
  return torch::nn::Linear(torch::nn::LinearOptions(d_model, num_experts).bias(bias));
}

// Losses and router probabilities are computed in at least fp32 (fp64 stays fp64).
torch::ScalarType loss_dtype(const torch::Tensor& t) {
  return c10::promoteTypes(t.scalar_type(), torch::kFloat32);
}

// ST-MoE's router z-loss without its coefficient: mean_t logsumexp_e(logits[t, e])^2, 0 (with a gradient path)
// for 0 tokens, where the mean is undefined.
torch::Tensor router_z_loss(const torch::Tensor& logits) {
  if (logits.size(0) == 0) return logits.sum().to(loss_dtype(logits));
  return torch::logsumexp(logits.to(loss_dtype(logits)), -1).square().mean();
}

// Squared coefficient of variation var / (mean^2 + 1e-10) with the population variance, as in the authors' code:
// one expert gives 0 and all-zero values give 0, never NaN.
torch::Tensor cv_squared(const torch::Tensor& values) {
  return values.var(/*dim=*/std::nullopt, /*correction=*/c10::Scalar(0), /*keepdim=*/false) /
         (values.mean().square() + 1e-10);
}

// Per-expert number of assignments of topk_idx [T, k] (no -1 in it) as [E] in `dtype`. scatter_add rather than
// bincount, which reads its maximum on the host.
torch::Tensor count_assignments(const torch::Tensor& topk_idx, int64_t num_experts, torch::ScalarType dtype) {
  const auto options = topk_idx.options().dtype(dtype);
  return torch::zeros({num_experts}, options)
      .scatter_add(0, topk_idx.reshape({-1}), torch::ones({topk_idx.numel()}, options));
}

// E * sum_e f_e * P_e in `dtype`: f_e the fraction of the T tokens whose first choice (topk_idx[:, 0]) is e, P_e
// the mean softmax probability of e. 1 when routing is uniform; GShard's E^2 * mean_e(f_e m_e) and Switch's
// E * sum_e f_e P_e are both this term (0 for T = 0).
torch::Tensor load_balance_term(const torch::Tensor& logits, const torch::Tensor& topk_idx, torch::ScalarType dtype) {
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
  const int64_t denominator = std::max<int64_t>(num_tokens, 1);
  const torch::Tensor fraction = count_assignments(topk_idx.select(1, 0), num_experts, dtype) / denominator;
  const torch::Tensor mean_prob = torch::softmax(logits.to(dtype), -1).sum(0) / denominator;
  return (fraction * mean_prob).sum() * static_cast<double>(num_experts);
}

// Drops each expert's lowest-scored assignments beyond ceil(capacity_factor * T * k / E) (nothing when the factor
// is std::nullopt) through ops::capacity_limit, and zeroes the scores of all empty slots. The capacity comes from
// sizes on the host, so nothing syncs. Returns (topk_idx, topk_score, num_dropped [] int64).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> drop_by_capacity(torch::Tensor topk_idx,
                                                                         const torch::Tensor& topk_score,
                                                                         const std::optional<double>& capacity_factor,
                                                                         int64_t num_experts) {
  torch::Tensor num_dropped;
  if (!capacity_factor.has_value()) {
    num_dropped = torch::zeros({}, topk_idx.options());
  } else {
    const double capacity = std::ceil(*capacity_factor * static_cast<double>(topk_idx.size(0)) *
                                      static_cast<double>(topk_idx.size(1)) / static_cast<double>(num_experts));
    const torch::Tensor expert_capacity =
        torch::full({num_experts}, static_cast<int64_t>(capacity), topk_idx.options());
    std::tie(topk_idx, num_dropped) = ops::capacity_limit(topk_idx, topk_score.detach(), expert_capacity);
  }
  return {topk_idx, torch::where(topk_idx >= 0, topk_score, torch::zeros_like(topk_score)), num_dropped};
}

// Stable descending order along dim 1 (ties to the lower index), the tie rule of every selection below.
torch::Tensor descending_order(const torch::Tensor& values) {
  return std::get<1>(values.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
}

// SwipeGate's greedy capacity-bounded assignment of logits [T, E] to [T, k] expert ids (-1 = no room). E rounds:
// in round r every token with a free slot proposes to the r-th expert of its preference list (by logit); each
// expert accepts its proposals by descending softmax probability (ties to the lower token) while it holds fewer
// than `capacity`; acceptances are final. Fixed shapes and E rounds of two stable sorts: no host sync.
torch::Tensor balanced_assignment(const torch::Tensor& logits, int64_t top_k, int64_t capacity) {
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
  const auto index_options = logits.options().dtype(torch::kInt64);
  const torch::Tensor ranked = logits.detach().to(loss_dtype(logits));
  const torch::Tensor preference = descending_order(ranked);  // [T, E]
  const torch::Tensor probs = torch::softmax(ranked, 1);

  torch::Tensor assigned = torch::full({num_tokens, top_k}, -1, index_options);
  torch::Tensor filled = torch::zeros({num_tokens}, index_options);
  // remaining[E] is a sentinel expert with no room, where tokens that propose nothing are sorted.
  torch::Tensor remaining =
      torch::cat({torch::full({num_experts}, capacity, index_options), torch::zeros({1}, index_options)});
  const torch::Tensor positions = torch::arange(num_tokens, index_options);
  const torch::Tensor ones = torch::ones({num_tokens}, index_options);
  for (int64_t r = 0; r < num_experts; ++r) {
    const torch::Tensor candidate = preference.select(1, r);
    const torch::Tensor proposed = torch::where(filled < top_k, candidate, torch::full_like(candidate, num_experts));
    const torch::Tensor strength = probs.gather(1, candidate.unsqueeze(1)).squeeze(1);
    // Proposals ordered by expert, then by strength (descending), then by token: two stable sorts.
    const torch::Tensor by_strength = std::get<1>(strength.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
    const torch::Tensor order = by_strength.index_select(
        0, std::get<1>(proposed.index_select(0, by_strength).sort(/*stable=*/true, /*dim=*/0, /*descending=*/false)));
    const torch::Tensor sorted_expert = proposed.index_select(0, order);
    const torch::Tensor per_expert = torch::zeros({num_experts + 1}, index_options).scatter_add(0, proposed, ones);
    const torch::Tensor starts = torch::cumsum(per_expert, 0) - per_expert;
    const torch::Tensor rank_in_expert = positions - starts.index_select(0, sorted_expert);
    const torch::Tensor accepted_sorted = rank_in_expert < remaining.index_select(0, sorted_expert);
    const torch::Tensor accepted =
        torch::zeros({num_tokens}, index_options.dtype(torch::kBool)).scatter(0, order, accepted_sorted);

    const torch::Tensor slot = filled.clamp_max(top_k - 1).unsqueeze(1);
    const torch::Tensor current = assigned.gather(1, slot).squeeze(1);
    assigned = assigned.scatter(1, slot, torch::where(accepted, candidate, current).unsqueeze(1));
    filled = filled + accepted.to(torch::kInt64);
    // Rejected proposals add 0 to the sentinel, so remaining[E] stays 0.
    remaining = remaining - torch::zeros_like(remaining).scatter_add(0, proposed, accepted.to(torch::kInt64));
  }
  return assigned;
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
  check_top_k(top_k, num_experts);
}

torch::Tensor GateImpl::loss() const {
  torch::Tensor total;
  for (const auto& term : losses_) total = total.defined() ? total + term.value() : term.value();
  if (total.defined()) return total;
  const auto params = parameters();
  if (params.empty()) return torch::zeros({});
  return torch::zeros({}, params.front().options().dtype(loss_dtype(params.front())));
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
  check_non_negative(options.z_loss_coef(), "z_loss_coef");
  gate = register_module("gate", make_logits_layer(options.d_model(), options.num_experts(), options.bias()));
}

std::tuple<torch::Tensor, torch::Tensor> NaiveGateImpl::forward(const torch::Tensor& x) {
  reset_stats();
  const torch::Tensor logits = gate->forward(token_matrix(x));
  auto routed = ops::route_topk(logits, options.top_k(), "topk_softmax");
  if (options.z_loss_coef() > 0) add_loss("z", router_z_loss(logits) * options.z_loss_coef());
  return routed;
}

// ---------------------------------------------------------------- NoisyGate

NoisyGateImpl::NoisyGateImpl(const NoisyGateOptions& options_)
    : GateImpl(options_.d_model(), options_.num_experts(), options_.top_k()), options(options_) {
  check_positive_real(options.noise_epsilon(), "noise_epsilon");
  check_non_negative(options.w_importance(), "w_importance");
  check_non_negative(options.w_load(), "w_load");
  check_non_negative(options.z_loss_coef(), "z_loss_coef");
  w_gate = register_parameter("w_gate", torch::zeros({options.d_model(), options.num_experts()}));
  w_noise = register_parameter("w_noise", torch::zeros({options.d_model(), options.num_experts()}));
}

// 1. Clean logits; in training add noise_std * randn_like(clean) (the one random draw).
// 2. Route: the k largest logits, softmax over them.
// 3. importance = per-expert sum of the scores. load = per-expert sum of P(t, e) = Phi((clean - threshold) /
//    noise_std), threshold = the k-th largest of the other logits: the (k+1)-th largest if e is in the top k,
//    else the k-th (training with k < E); otherwise the per-expert count, as there is no noise to smooth over.
// 4. The cv^2 loss, then the optional z-loss.
std::tuple<torch::Tensor, torch::Tensor> NoisyGateImpl::forward(const torch::Tensor& input) {
  reset_stats();
  const torch::Tensor x = token_matrix(input);
  const int64_t num_tokens = x.size(0), num_experts = options.num_experts(), k = options.top_k();

  const torch::Tensor clean = torch::matmul(x, w_gate);
  const bool noisy = is_training();
  torch::Tensor noise_std, logits = clean;
  if (noisy) {
    noise_std = torch::softplus(torch::matmul(x, w_noise)) + options.noise_epsilon();
    logits = clean + torch::randn_like(clean) * noise_std;
  }

  auto [topk_idx, topk_score] = ops::route_topk(logits, k, "topk_softmax");

  const torch::ScalarType ldt = loss_dtype(logits);
  const auto loss_options = x.options().dtype(ldt);
  const torch::Tensor importance =
      torch::zeros({num_tokens, num_experts}, loss_options).scatter(1, topk_idx, topk_score.to(ldt)).sum(0);
  torch::Tensor load;
  if (noisy && k < num_experts) {
    const torch::Tensor top_values = std::get<0>(torch::topk(logits.to(ldt), k + 1, 1));  // [T, k + 1]
    const torch::Tensor in_topk =
        torch::zeros({num_tokens, num_experts}, loss_options.dtype(torch::kBool)).scatter(1, topk_idx, true);
    const torch::Tensor threshold = torch::where(in_topk, top_values.slice(1, k, k + 1), top_values.slice(1, k - 1, k));
    load = torch::special::ndtr((clean.to(ldt) - threshold) / noise_std.to(ldt)).sum(0);
  } else {
    load = count_assignments(topk_idx, num_experts, ldt);
  }

  add_loss("balance", cv_squared(importance) * options.w_importance() + cv_squared(load) * options.w_load());
  if (options.z_loss_coef() > 0) add_loss("z", router_z_loss(logits) * options.z_loss_coef());
  return {topk_idx, topk_score};
}

// ---------------------------------------------------------------- GShardGate

GShardGateImpl::GShardGateImpl(const GShardGateOptions& options_)
    : GateImpl(options_.d_model(), options_.num_experts(), options_.top_k()), options(options_) {
  TORCH_CHECK(options.top_k() == 2, "GShardGate routes each token to 2 experts: top_k must be 2, got ",
              options.top_k());
  check_capacity_factor(options.capacity_factor_train(), "capacity_factor_train");
  check_capacity_factor(options.capacity_factor_eval(), "capacity_factor_eval");
  check_non_negative(options.aux_loss_coef(), "aux_loss_coef");
  check_non_negative(options.z_loss_coef(), "z_loss_coef");
  gate = register_module("gate", make_logits_layer(options.d_model(), options.num_experts(), options.bias()));
}

// 1. logits = gate(x); the two largest; scores = softmax over those two.
// 2. The balance loss from the routing before anything is dropped, then the optional z-loss.
// 3. Random routing (training): u = torch::rand(T) in the loss dtype (the one random draw); the second expert
//    stays where u < 2 * g2.
// 4. Capacity; empty slots get score 0.
std::tuple<torch::Tensor, torch::Tensor> GShardGateImpl::forward(const torch::Tensor& input) {
  reset_stats();
  const torch::Tensor logits = gate->forward(token_matrix(input));
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
  auto [topk_idx, topk_score] = ops::route_topk(logits, 2, "topk_softmax");

  const torch::ScalarType ldt = loss_dtype(logits);
  add_loss("balance", load_balance_term(logits, topk_idx, ldt) * options.aux_loss_coef());
  if (options.z_loss_coef() > 0) add_loss("z", router_z_loss(logits) * options.z_loss_coef());

  if (is_training() && options.random_routing()) {
    const torch::Tensor uniform = torch::rand({num_tokens}, logits.options().dtype(ldt));
    const torch::Tensor keep_second = uniform < 2 * topk_score.select(1, 1).detach().to(ldt);
    const torch::Tensor first = topk_idx.select(1, 0), second = topk_idx.select(1, 1);
    topk_idx = torch::stack({first, torch::where(keep_second, second, torch::full_like(second, -1))}, 1);
  }

  const auto& factor = is_training() ? options.capacity_factor_train() : options.capacity_factor_eval();
  auto [kept_idx, kept_score, num_dropped] = drop_by_capacity(topk_idx, topk_score, factor, num_experts);
  set_num_dropped(num_dropped);
  return {kept_idx, kept_score};
}

// ---------------------------------------------------------------- SwitchGate

SwitchGateImpl::SwitchGateImpl(const SwitchGateOptions& options_)
    : GateImpl(options_.d_model(), options_.num_experts(), /*top_k=*/1), options(options_) {
  TORCH_CHECK(std::isfinite(options.switch_eps()) && options.switch_eps() >= 0 && options.switch_eps() < 1,
              "switch_eps must be in [0, 1), got ", options.switch_eps());
  check_capacity_factor(options.capacity_factor_train(), "capacity_factor_train");
  check_capacity_factor(options.capacity_factor_eval(), "capacity_factor_eval");
  check_non_negative(options.aux_loss_coef(), "aux_loss_coef");
  check_non_negative(options.z_loss_coef(), "z_loss_coef");
  gate = register_module("gate", make_logits_layer(options.d_model(), options.num_experts(), options.bias()));
}

// 1. Training: x * U[1 - eps, 1 + eps] (one uniform_ draw of x's shape), for the router's input only.
// 2. logits; score = the largest softmax probability over all E.
// 3. The balance loss from the choices before capacity, then the optional z-loss.
// 4. Capacity; dropped tokens get score 0.
std::tuple<torch::Tensor, torch::Tensor> SwitchGateImpl::forward(const torch::Tensor& input) {
  reset_stats();
  torch::Tensor x = token_matrix(input);
  const double eps = options.switch_eps();
  if (is_training() && eps > 0) x = x * torch::empty_like(x).uniform_(1.0 - eps, 1.0 + eps);
  const torch::Tensor logits = gate->forward(x);
  const int64_t num_experts = logits.size(1);
  auto [topk_idx, topk_score] = ops::route_topk(logits, 1, "softmax_topk");

  add_loss("balance", load_balance_term(logits, topk_idx, loss_dtype(logits)) * options.aux_loss_coef());
  if (options.z_loss_coef() > 0) add_loss("z", router_z_loss(logits) * options.z_loss_coef());

  const auto& factor = is_training() ? options.capacity_factor_train() : options.capacity_factor_eval();
  auto [kept_idx, kept_score, num_dropped] = drop_by_capacity(topk_idx, topk_score, factor, num_experts);
  set_num_dropped(num_dropped);
  return {kept_idx, kept_score};
}

// ---------------------------------------------------------------- SwipeGate

SwipeGateImpl::SwipeGateImpl(const SwipeGateOptions& options_)
    : GateImpl(options_.d_model(), options_.num_experts(), options_.top_k()), options(options_) {
  check_non_negative(options.z_loss_coef(), "z_loss_coef");
  gate = register_module("gate", make_logits_layer(options.d_model(), options.num_experts(), options.bias()));
}

// Eval: NaiveGate's routing. Training: balanced_assignment with capacity ceil(T * k / E); scores = softmax over
// the logits of the assigned experts, 0 in an empty slot (counted in num_dropped).
std::tuple<torch::Tensor, torch::Tensor> SwipeGateImpl::forward(const torch::Tensor& input) {
  reset_stats();
  const torch::Tensor logits = gate->forward(token_matrix(input));
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1), k = options.top_k();
  torch::Tensor topk_idx, topk_score;
  if (!is_training()) {
    std::tie(topk_idx, topk_score) = ops::route_topk(logits, k, "topk_softmax");
    set_num_dropped(torch::zeros({}, logits.options().dtype(torch::kInt64)));
  } else {
    const auto capacity =
        static_cast<int64_t>(std::ceil(static_cast<double>(num_tokens * k) / static_cast<double>(num_experts)));
    topk_idx = balanced_assignment(logits, k, capacity);
    const torch::Tensor routed = topk_idx >= 0;
    torch::Tensor chosen = logits.gather(1, topk_idx.clamp_min(0)).to(loss_dtype(logits));
    chosen = torch::where(routed, chosen, torch::full_like(chosen, -kInf));
    topk_score = torch::softmax(chosen, 1);
    topk_score = torch::where(routed, topk_score, torch::zeros_like(topk_score)).to(logits.scalar_type());
    set_num_dropped(routed.logical_not().sum());
  }
  if (options.z_loss_coef() > 0) add_loss("z", router_z_loss(logits) * options.z_loss_coef());
  return {topk_idx, topk_score};
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
  check_positive_real(options.capacity_factor(), "capacity_factor");
  check_non_negative(options.z_loss_coef(), "z_loss_coef");
  gate = register_module("gate", make_logits_layer(options.d_model(), options.num_experts(), options.bias()));
}

// 1. probs = softmax(logits) over experts.
// 2. Each expert picks its C tokens with the largest probability (ties to the lower token).
// 3. Each token's chosen experts, by descending probability, fill its slots; -1 / 0 where empty, and chosen
//    experts beyond the slots count in num_dropped.
std::tuple<torch::Tensor, torch::Tensor> ExpertChoiceGateImpl::forward(const torch::Tensor& input) {
  reset_stats();
  const torch::Tensor logits = gate->forward(token_matrix(input));
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
  const torch::Tensor probs = torch::softmax(logits.to(loss_dtype(logits)), -1);
  const torch::Tensor ranked = probs.detach();

  const int64_t capacity = std::min<int64_t>(
      num_tokens,
      static_cast<int64_t>(std::ceil(options.capacity_factor() * static_cast<double>(num_tokens) *
                                     static_cast<double>(options.top_k()) / static_cast<double>(num_experts))));
  const torch::Tensor picked = descending_order(ranked.t()).slice(1, 0, capacity);  // [E, C]
  const torch::Tensor chosen = torch::zeros({num_experts, num_tokens}, logits.options().dtype(torch::kBool))
                                   .scatter(1, picked, true)
                                   .t();  // [T, E]

  const torch::Tensor key = torch::where(chosen, ranked, torch::full_like(ranked, -1.0));
  const torch::Tensor slot_expert = descending_order(key).slice(1, 0, slots_per_token());
  const torch::Tensor filled = chosen.gather(1, slot_expert);
  const torch::Tensor topk_idx = torch::where(filled, slot_expert, torch::full_like(slot_expert, -1));
  const torch::Tensor score = probs.gather(1, slot_expert);
  const torch::Tensor topk_score = torch::where(filled, score, torch::zeros_like(score)).to(logits.scalar_type());
  set_num_dropped(chosen.sum() - filled.sum());
  if (options.z_loss_coef() > 0) add_loss("z", router_z_loss(logits) * options.z_loss_coef());
  return {topk_idx, topk_score};
}

// ---------------------------------------------------------------- SigmoidGate

SigmoidGateImpl::SigmoidGateImpl(const SigmoidGateOptions& options_)
    : GateImpl(options_.d_model(), options_.num_experts(), options_.top_k()), options(options_) {
  const int64_t num_experts = options.num_experts(), n_groups = options.n_groups();
  check_positive(n_groups, "n_groups");
  TORCH_CHECK(num_experts % n_groups == 0, "n_groups must divide num_experts=", num_experts,
              ", got n_groups=", n_groups);
  TORCH_CHECK(options.topk_groups() >= 1 && options.topk_groups() <= n_groups,
              "topk_groups must be in [1, n_groups=", n_groups, "], got ", options.topk_groups());
  const int64_t reachable = options.topk_groups() * (num_experts / n_groups);
  TORCH_CHECK(n_groups == 1 || options.top_k() <= reachable,
              "top_k must be at most topk_groups * experts per group = ", reachable, ", got top_k=", options.top_k());
  check_positive_real(options.routed_scaling_factor(), "routed_scaling_factor");
  check_non_negative(options.bias_update_rate(), "bias_update_rate");
  check_non_negative(options.aux_loss_coef(), "aux_loss_coef");
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

// 1. Affinities s = sigmoid(logits) in the loss dtype.
// 2. Selection by s + expert_bias (no gradient): with groups, keep each token's topk_groups best groups by the
//    sum of their top-2 selection scores (ties to the lower group); then the k best experts (ties to the lower id).
// 3. Weights = the unbiased s there, / (their sum + 1e-20) when normalize, * routed_scaling_factor.
// 4. The optional sequence-wise loss.
// 5. Training: expert_bias += rate * sign(T * k / E - load), under no_grad.
std::tuple<torch::Tensor, torch::Tensor> SigmoidGateImpl::forward(const torch::Tensor& input) {
  reset_stats();
  const torch::Tensor logits = gate->forward(token_matrix(input));
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1), k = options.top_k();
  const int64_t n_groups = options.n_groups(), topk_groups = options.topk_groups();
  const torch::Tensor affinity = torch::sigmoid(logits.to(loss_dtype(logits)));

  torch::Tensor selection = affinity.detach() + expert_bias;
  if (n_groups > 1 && topk_groups < n_groups) {
    const int64_t group_size = num_experts / n_groups;
    const torch::Tensor group_score =
        std::get<0>(selection.view({num_tokens, n_groups, group_size}).topk(std::min<int64_t>(2, group_size), -1))
            .sum(-1);  // [T, n_groups]
    const torch::Tensor kept = descending_order(group_score).slice(1, 0, topk_groups);
    const torch::Tensor keep_group = torch::zeros_like(group_score, torch::kBool).scatter(1, kept, true);
    const torch::Tensor keep_expert = keep_group.repeat_interleave(group_size, 1);
    selection = selection.masked_fill(keep_expert.logical_not(), -kInf);
  }
  const torch::Tensor topk_idx = descending_order(selection).slice(1, 0, k);

  torch::Tensor weight = affinity.gather(1, topk_idx);
  if (options.normalize()) weight = weight / (weight.sum(-1, /*keepdim=*/true) + 1e-20);
  const torch::Tensor topk_score = (weight * options.routed_scaling_factor()).to(logits.scalar_type());

  if (options.aux_loss_coef() > 0) {
    const double per_token =
        static_cast<double>(num_experts) / static_cast<double>(k * std::max<int64_t>(num_tokens, 1));
    const torch::Tensor fraction = count_assignments(topk_idx, num_experts, affinity.scalar_type()) * per_token;
    const torch::Tensor share = affinity / (affinity.sum(-1, /*keepdim=*/true) + 1e-20);
    const torch::Tensor mean_share = share.sum(0) / std::max<int64_t>(num_tokens, 1);
    add_loss("balance", (fraction * mean_share).sum() * options.aux_loss_coef());
  }

  if (is_training() && options.bias_update_rate() > 0) {
    torch::NoGradGuard no_grad;
    const torch::Tensor load = count_assignments(topk_idx, num_experts, torch::kFloat32);
    const double mean_load = static_cast<double>(num_tokens * k) / static_cast<double>(num_experts);
    expert_bias.add_(torch::sign(mean_load - load) * options.bias_update_rate());
  }
  return {topk_idx, topk_score};
}

}  // namespace fastmoe::nn
