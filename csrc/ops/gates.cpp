// Gate stage: every gate's routing rule and loss terms, written once. Each op takes the logits a gate's parameters
// give (the front ends, python/fastmoe/gates/ and csrc/nn/gates.cpp, compute them and call these ops) and returns
// (topk_idx [T, k] int64, -1 = empty slot; topk_score [T, k] in the logits' dtype; balance_loss and z_loss, 0-dim
// in at least fp32 with their coefficients applied, or [0] where the gate records no such term; num_dropped, [] int64
// on the device, or [0] for a gate that never drops). The schemas live in library.cpp, the papers' formulas in
// docs/gates.md.
//
// Every op is a composition of ATen ops and fastmoe's route_topk and capacity_limit, registered as
// CompositeImplicitAutograd: CPU, CUDA and Meta (with Python's ATen meta functions loaded; libtorch alone has no Meta
// kernel of where or var), and the gradients, come from the components. Random draws (GShard's random routing,
// NoisyGate's noise, Switch's jitter) use the default generator of the logits' device, so a seeded run routes the
// same from Python and C++. Sizes come from shapes and int arguments, never from tensor data, and nothing reads the
// device on the host.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "fastmoe/ops.h"
#include "ops/common.h"
#include "ops/internal.h"

namespace fastmoe {
namespace {

using namespace ops_detail;
using ops::loss_dtype;
using Routing = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr double kInf = std::numeric_limits<double>::infinity();

// A size as an int: concrete sizes pass through, and a symbolic one (torch.compile with dynamic shapes) is
// specialised, since capacities and loop counts are host integers.
int64_t size_of(const at::Tensor& t, int64_t dim) {
  return t.sym_size(dim).guard_int(__FILE__, __LINE__);
}

int64_t numel_of(const at::Tensor& t) {
  return t.sym_numel().guard_int(__FILE__, __LINE__);
}

// A double as Python's repr writes it (-1.0, 0.001, 1e-20, nan), so a message shows the value a Python caller gave:
// the fewest significant digits that read back exactly, in fixed notation for exponents in [-4, 16).
std::string repr(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char text[64];
  int digits = 1;
  for (; digits < 17; ++digits) {
    std::snprintf(text, sizeof(text), "%.*e", digits - 1, value);
    if (std::strtod(text, nullptr) == value) break;
  }
  std::snprintf(text, sizeof(text), "%.*e", digits - 1, value);
  const int exponent = std::atoi(std::strchr(text, 'e') + 1);
  if (exponent >= -4 && exponent < 16)
    std::snprintf(text, sizeof(text), "%.*f", std::max(digits - 1 - exponent, 1), value);
  return text;
}

void check_non_negative(double value, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0, name, " must be a finite number >= 0, got ", repr(value));
}

void check_positive(double value, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value > 0, name, " must be a finite number > 0, got ", repr(value));
}

void check_capacity_factor(const std::optional<double>& factor) {
  if (factor.has_value()) check_positive(*factor, "capacity_factor");
}

// logits [T, E] with E >= 1; k in [1, E] when given.
void check_logits(const at::Tensor& logits, const char* name = "logits") {
  check_float(logits, name);
  check_dim(logits, 2, name, "[num_tokens, num_experts]");
  TORCH_CHECK(logits.sym_size(1) >= 1, name, " must have at least one expert column, got shape ", logits.sym_sizes());
}

void check_k(int64_t k, const at::Tensor& logits, const char* name = "k") {
  const int64_t num_experts = size_of(logits, 1);
  TORCH_CHECK_VALUE(k >= 1 && k <= num_experts, name, " must be in [1, num_experts=", num_experts, "], got ", k);
}

// The [0] placeholder of a loss term a gate does not record.
at::Tensor no_loss(const at::Tensor& logits) {
  return at::empty({0}, logits.options().dtype(loss_dtype(logits)));
}

// The [0] placeholder of num_dropped for a gate that never drops.
at::Tensor no_drop_count(const at::Tensor& logits) {
  return at::empty({0}, logits.options().dtype(at::kLong));
}

// ST-MoE's router z-loss, z_loss_coef * mean_t logsumexp_e(logits[t, e])^2 (0 with a gradient path for 0 tokens,
// where the mean is undefined); [0] when the coefficient is 0.
at::Tensor z_loss_term(const at::Tensor& logits, double z_loss_coef) {
  if (z_loss_coef <= 0) return no_loss(logits);
  if (size_of(logits, 0) == 0) return logits.sum().to(loss_dtype(logits)) * z_loss_coef;
  return at::logsumexp(logits.to(loss_dtype(logits)), -1).square().mean() * z_loss_coef;
}

// Squared coefficient of variation var / (mean^2 + 1e-10) with the population variance, as in Shazeer et al.'s
// code: one expert gives 0 and all-zero values give 0, never NaN.
at::Tensor cv_squared(const at::Tensor& values) {
  return values.var(/*dim=*/std::nullopt, /*correction=*/c10::Scalar(0), /*keepdim=*/false) /
         (values.mean().square() + 1e-10);
}

// Per-expert number of assignments of topk_idx (no -1 in it) as [E] in `dtype`. scatter_add rather than bincount,
// which reads its maximum on the host.
at::Tensor count_assignments(const at::Tensor& topk_idx, int64_t num_experts, at::ScalarType dtype) {
  const auto options = topk_idx.options().dtype(dtype);
  return at::zeros({num_experts}, options)
      .scatter_add(0, topk_idx.reshape({-1}), at::ones({numel_of(topk_idx)}, options));
}

// coef * E * sum_e f_e * P_e, the balance term of GShard (E^2 * mean_e(f_e m_e)), Switch and the naive gate: f_e the
// share of the chosen (token, slot) pairs `chosen` (ids, no -1) on e, P_e the mean softmax probability of e over the
// T tokens; 1 when routing is uniform, 0 for T = 0; in the loss dtype. The op balance_loss computes it from the
// per-expert counts of the pairs, in one kernel each way on CUDA (the gate runs in every forward, and each kernel costs
// host time).
at::Tensor balance_term(const at::Tensor& logits, const at::Tensor& chosen, double coef) {
  return ops::balance_loss(logits, count_assignments(chosen, size_of(logits, 1), at::kLong), numel_of(chosen), coef);
}

// The term over the tokens' first choices (topk_idx[:, 0]): GShard and Switch.
at::Tensor first_choice_balance(const at::Tensor& logits, const at::Tensor& topk_idx, double coef) {
  return balance_term(logits, topk_idx.select(1, 0), coef);
}

// The Switch Transformer's term over every slot (the naive gate's balance loss).
at::Tensor slot_balance(const at::Tensor& logits, const at::Tensor& topk_idx, double coef) {
  return balance_term(logits, topk_idx, coef);
}

// ceil(capacity_factor * T * k / E), from sizes on the host.
int64_t capacity_of(double capacity_factor, int64_t num_tokens, int64_t k, int64_t num_experts) {
  return static_cast<int64_t>(std::ceil(capacity_factor * static_cast<double>(num_tokens) * static_cast<double>(k) /
                                        static_cast<double>(num_experts)));
}

// Stable descending order along dim 1 (ties to the lower index), the tie rule of every selection below.
at::Tensor descending_order(const at::Tensor& values) {
  return std::get<1>(values.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
}

// SwipeGate's greedy capacity-bounded assignment of logits [T, E] to [T, k] expert ids (-1 = no room). E rounds: in
// round r every token with a free slot proposes to the r-th expert of its preference list (by logit); each expert
// accepts its proposals by descending softmax probability (ties to the lower token) while it holds fewer than
// `capacity`; acceptances are final. Fixed shapes and E rounds of two stable sorts: no host sync.
at::Tensor balanced_assignment(const at::Tensor& logits, int64_t top_k, int64_t capacity) {
  const int64_t num_tokens = size_of(logits, 0), num_experts = size_of(logits, 1);
  const auto index_options = logits.options().dtype(at::kLong);
  const at::Tensor ranked = logits.detach().to(loss_dtype(logits));
  const at::Tensor preference = descending_order(ranked);  // [T, E]
  const at::Tensor probs = at::softmax(ranked, 1);

  at::Tensor assigned = at::full({num_tokens, top_k}, -1, index_options);
  at::Tensor filled = at::zeros({num_tokens}, index_options);
  // remaining[E] is a sentinel expert with no room, where tokens that propose nothing are sorted. (Built with cat,
  // not an indexed assignment, which would copy a host scalar and synchronise on CUDA.)
  at::Tensor remaining = at::cat({at::full({num_experts}, capacity, index_options), at::zeros({1}, index_options)});
  const at::Tensor positions = at::arange(num_tokens, index_options);
  const at::Tensor ones = at::ones({num_tokens}, index_options);
  for (int64_t r = 0; r < num_experts; ++r) {
    const at::Tensor candidate = preference.select(1, r);
    const at::Tensor proposed = at::where(filled < top_k, candidate, at::full_like(candidate, num_experts));
    const at::Tensor strength = probs.gather(1, candidate.unsqueeze(1)).squeeze(1);
    // Proposals ordered by expert, then by strength (descending), then by token: two stable sorts.
    const at::Tensor by_strength = std::get<1>(strength.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
    const at::Tensor order = by_strength.index_select(
        0, std::get<1>(proposed.index_select(0, by_strength).sort(/*stable=*/true, /*dim=*/0, /*descending=*/false)));
    const at::Tensor sorted_expert = proposed.index_select(0, order);
    const at::Tensor per_expert = at::zeros({num_experts + 1}, index_options).scatter_add(0, proposed, ones);
    const at::Tensor starts = at::cumsum(per_expert, 0) - per_expert;
    const at::Tensor rank_in_expert = positions - starts.index_select(0, sorted_expert);
    const at::Tensor accepted_sorted = rank_in_expert < remaining.index_select(0, sorted_expert);
    const at::Tensor accepted =
        at::zeros({num_tokens}, index_options.dtype(at::kBool)).scatter(0, order, accepted_sorted);

    const at::Tensor slot = filled.clamp_max(top_k - 1).unsqueeze(1);
    const at::Tensor current = assigned.gather(1, slot).squeeze(1);
    assigned = assigned.scatter(1, slot, at::where(accepted, candidate, current).unsqueeze(1));
    filled = filled + accepted.to(at::kLong);
    // Rejected proposals add 0 to the sentinel, so remaining[E] stays 0.
    remaining = remaining - at::zeros_like(remaining).scatter_add(0, proposed, accepted.to(at::kLong));
  }
  return assigned;
}

// ---------------------------------------------------------------- capacity

void check_gate_capacity(const at::Tensor& topk_idx, const at::Tensor& topk_score,
                         const std::optional<double>& capacity_factor, int64_t num_experts,
                         const std::optional<at::Tensor>& group_idx, const std::optional<at::Tensor>& group_score,
                         int64_t group_offset) {
  check_int64(topk_idx, "topk_idx");
  check_dim(topk_idx, 2, "topk_idx", "[num_tokens, k]");
  check_float(topk_score, "topk_score");
  TORCH_CHECK(topk_score.sym_sizes() == topk_idx.sym_sizes(), "topk_score must match topk_idx's shape ",
              topk_idx.sym_sizes(), ", got ", topk_score.sym_sizes());
  check_same_device(topk_score, "topk_score", topk_idx, "topk_idx");
  check_capacity_factor(capacity_factor);
  TORCH_CHECK_VALUE(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK_VALUE(group_idx.has_value() == group_score.has_value(),
                    "group_idx and group_score must be given together, got ", group_idx.has_value() ? "" : "no ",
                    "group_idx and ", group_score.has_value() ? "" : "no ", "group_score");
  if (!group_idx.has_value()) {
    TORCH_CHECK_VALUE(group_offset == 0, "group_offset needs group_idx, got group_offset=", group_offset);
    return;
  }
  check_int64(*group_idx, "group_idx");
  check_dim(*group_idx, 2, "group_idx", "[group_tokens, k]");
  TORCH_CHECK(group_idx->sym_size(1) == topk_idx.sym_size(1), "group_idx must have topk_idx's k=", topk_idx.sym_size(1),
              ", got shape ", group_idx->sym_sizes());
  check_float(*group_score, "group_score");
  TORCH_CHECK(group_score->sym_sizes() == group_idx->sym_sizes(), "group_score must match group_idx's shape ",
              group_idx->sym_sizes(), ", got ", group_score->sym_sizes());
  check_same_device(*group_idx, "group_idx", topk_idx, "topk_idx");
  check_same_device(*group_score, "group_score", topk_idx, "topk_idx");
  const int64_t group_tokens = size_of(*group_idx, 0), num_tokens = size_of(topk_idx, 0);
  TORCH_CHECK_VALUE(group_offset >= 0 && group_offset + num_tokens <= group_tokens, "group_offset must be in [0, ",
                    group_tokens - num_tokens, "] (group_idx has ", group_tokens, " rows, topk_idx ", num_tokens,
                    "), got ", group_offset);
}

// The capacity rule of GShardGate, SwitchGate and DCGate (see gate_capacity_impl); with no factor, kept_idx is
// topk_idx itself.
std::tuple<at::Tensor, at::Tensor, at::Tensor> drop_by_capacity(
    const at::Tensor& topk_idx, const at::Tensor& topk_score, const std::optional<double>& capacity_factor,
    int64_t num_experts, const std::optional<at::Tensor>& group_idx, const std::optional<at::Tensor>& group_score,
    int64_t group_offset) {
  at::Tensor kept_idx = topk_idx, num_dropped;
  if (!capacity_factor.has_value()) {
    num_dropped = at::zeros({}, topk_idx.options());
  } else if (!group_idx.has_value()) {
    const int64_t capacity = capacity_of(*capacity_factor, size_of(topk_idx, 0), size_of(topk_idx, 1), num_experts);
    std::tie(kept_idx, num_dropped) =
        ops::capacity_limit(topk_idx, topk_score.detach(), at::full({num_experts}, capacity, topk_idx.options()));
  } else {
    // The capacity counts the whole group's rows; this rank keeps its own rows of the group's decision.
    const int64_t group_tokens = size_of(*group_idx, 0), num_tokens = size_of(topk_idx, 0);
    const int64_t capacity = capacity_of(*capacity_factor, group_tokens, size_of(topk_idx, 1), num_experts);
    const at::Tensor group_kept = std::get<0>(
        ops::capacity_limit(*group_idx, group_score->detach(), at::full({num_experts}, capacity, topk_idx.options())));
    kept_idx = group_kept.slice(0, group_offset, group_offset + num_tokens);
    num_dropped = kept_idx.lt(0).logical_and(topk_idx.ge(0)).sum();
  }
  return {kept_idx, at::where(kept_idx >= 0, topk_score, at::zeros_like(topk_score)), num_dropped};
}

// Each expert keeps at most C = ceil(capacity_factor * T * k / E) assignments, its highest-scored (capacity_limit's
// rule); dropped slots get -1 and score 0. With group_idx / group_score (the routing of a whole expert-parallel
// group, whose rows [group_offset, group_offset + T) are topk_idx) T counts the group's rows and the group's
// decision is kept for these rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_capacity_impl(
    const at::Tensor& topk_idx, const at::Tensor& topk_score, std::optional<double> capacity_factor,
    int64_t num_experts, const std::optional<at::Tensor>& group_idx, const std::optional<at::Tensor>& group_score,
    int64_t group_offset) {
  check_gate_capacity(topk_idx, topk_score, capacity_factor, num_experts, group_idx, group_score, group_offset);
  auto outputs =
      drop_by_capacity(topk_idx, topk_score, capacity_factor, num_experts, group_idx, group_score, group_offset);
  // An op's output must not alias its input.
  if (!capacity_factor.has_value()) std::get<0>(outputs) = topk_idx.clone();
  return outputs;
}

// ---------------------------------------------------------------- gates

Routing naive_gate_impl(const at::Tensor& logits, int64_t k, double balance_coef, double z_loss_coef) {
  check_logits(logits);
  check_k(k, logits);
  ops::check_naive_gate_coefs(balance_coef, z_loss_coef);
  auto [topk_idx, topk_score] = ops::route_topk(logits, k, "topk_softmax");
  at::Tensor balance = balance_coef > 0 ? slot_balance(logits, topk_idx, balance_coef) : no_loss(logits);
  return {topk_idx, topk_score, balance, z_loss_term(logits, z_loss_coef), no_drop_count(logits)};
}

// 1. Training (noise_logits given): H = clean + randn(T, E) * (softplus(noise_logits) + noise_epsilon), the one
//    random draw; eval: H = clean.
// 2. Route: the k largest of H, softmax over them.
// 3. importance = per-expert sum of the scores. load = per-expert sum of P(t, e) = Phi((clean - threshold) /
//    noise_std), threshold = the k-th largest of the other entries of H[t]: the (k+1)-th largest if e is in the top
//    k, else the k-th (training with k < E); otherwise the per-expert count, as there is no noise to smooth over.
// 4. The cv^2 loss, and the optional z-loss on H.
Routing noisy_gate_impl(const at::Tensor& clean_logits, const std::optional<at::Tensor>& noise_logits, int64_t k,
                        double noise_epsilon, double w_importance, double w_load, double z_loss_coef) {
  check_logits(clean_logits, "clean_logits");
  check_k(k, clean_logits);
  check_positive(noise_epsilon, "noise_epsilon");
  check_non_negative(w_importance, "w_importance");
  check_non_negative(w_load, "w_load");
  check_non_negative(z_loss_coef, "z_loss_coef");
  const bool noisy = noise_logits.has_value();
  if (noisy) {
    check_float(*noise_logits, "noise_logits");
    TORCH_CHECK(noise_logits->sym_sizes() == clean_logits.sym_sizes() &&
                    noise_logits->scalar_type() == clean_logits.scalar_type(),
                "noise_logits must match clean_logits' shape ", clean_logits.sym_sizes(), " and dtype ",
                clean_logits.scalar_type(), ", got ", noise_logits->sym_sizes(), " ", noise_logits->scalar_type());
    check_same_device(*noise_logits, "noise_logits", clean_logits, "clean_logits");
  }
  const int64_t num_tokens = size_of(clean_logits, 0), num_experts = size_of(clean_logits, 1);
  at::Tensor noise_std, logits = clean_logits;
  if (noisy) {
    noise_std = at::softplus(*noise_logits) + noise_epsilon;
    // Drawn in row-major order whatever clean_logits' strides, so the noise of (t, e) does not depend on its layout.
    logits = clean_logits + at::randn_symint(clean_logits.sym_sizes(), clean_logits.options()) * noise_std;
  }
  auto [topk_idx, topk_score] = ops::route_topk(logits, k, "topk_softmax");

  const at::ScalarType ldt = loss_dtype(logits);
  const auto loss_options = logits.options().dtype(ldt);
  const at::Tensor importance =
      at::zeros({num_tokens, num_experts}, loss_options).scatter(1, topk_idx, topk_score.to(ldt)).sum(0);
  at::Tensor load;
  if (noisy && k < num_experts) {
    const at::Tensor top_values = std::get<0>(at::topk(logits.to(ldt), k + 1, 1));  // [T, k + 1]
    const at::Tensor in_topk =
        at::zeros({num_tokens, num_experts}, loss_options.dtype(at::kBool)).scatter(1, topk_idx, true);
    const at::Tensor threshold = at::where(in_topk, top_values.slice(1, k, k + 1), top_values.slice(1, k - 1, k));
    load = at::special_ndtr((clean_logits.to(ldt) - threshold) / noise_std.to(ldt)).sum(0);
  } else {
    load = count_assignments(topk_idx, num_experts, ldt);
  }
  const at::Tensor balance = cv_squared(importance) * w_importance + cv_squared(load) * w_load;
  return {topk_idx, topk_score, balance, z_loss_term(logits, z_loss_coef), no_drop_count(logits)};
}

// 1. The two largest logits; scores = softmax over those two (GShard's normalised g1, g2).
// 2. The balance loss from the routing before anything is dropped, and the optional z-loss.
// 3. Random routing (training): u = rand(T) in the loss dtype, the one random draw; the second expert stays where
//    u < 2 * g2.
// 4. Capacity ceil(capacity_factor * T * 2 / E) per expert (none for no factor); empty slots get score 0.
Routing gshard_gate_impl(const at::Tensor& logits, bool training, std::optional<double> capacity_factor,
                         bool random_routing, double aux_loss_coef, double z_loss_coef) {
  check_logits(logits);
  TORCH_CHECK_VALUE(size_of(logits, 1) >= 2,
                    "GShard's gate routes each token to 2 experts: logits must have at "
                    "least 2 expert columns, got shape ",
                    logits.sym_sizes());
  check_capacity_factor(capacity_factor);
  check_non_negative(aux_loss_coef, "aux_loss_coef");
  check_non_negative(z_loss_coef, "z_loss_coef");
  const int64_t num_tokens = size_of(logits, 0), num_experts = size_of(logits, 1);
  auto [topk_idx, topk_score] = ops::route_topk(logits, 2, "topk_softmax");
  const at::ScalarType ldt = loss_dtype(logits);
  const at::Tensor balance = first_choice_balance(logits, topk_idx, aux_loss_coef);
  const at::Tensor z_loss = z_loss_term(logits, z_loss_coef);

  if (training && random_routing) {
    const at::Tensor uniform = at::rand({num_tokens}, logits.options().dtype(ldt));
    const at::Tensor keep_second = uniform < 2 * topk_score.select(1, 1).detach().to(ldt);
    const at::Tensor first = topk_idx.select(1, 0), second = topk_idx.select(1, 1);
    topk_idx = at::stack({first, at::where(keep_second, second, at::full_like(second, -1))}, 1);
  }
  auto [kept_idx, kept_score, num_dropped] =
      drop_by_capacity(topk_idx, topk_score, capacity_factor, num_experts, std::nullopt, std::nullopt, 0);
  return {kept_idx, kept_score, balance, z_loss, num_dropped};
}

// 1. Top-1 of p = softmax(logits) over all E; the score is p there (not renormalised).
// 2. The balance loss from the choices before capacity, and the optional z-loss.
// 3. Capacity ceil(capacity_factor * T / E); dropped tokens get score 0.
Routing switch_gate_impl(const at::Tensor& logits, std::optional<double> capacity_factor, double aux_loss_coef,
                         double z_loss_coef) {
  check_logits(logits);
  check_capacity_factor(capacity_factor);
  check_non_negative(aux_loss_coef, "aux_loss_coef");
  check_non_negative(z_loss_coef, "z_loss_coef");
  auto [topk_idx, topk_score] = ops::route_topk(logits, 1, "softmax_topk");
  const at::Tensor balance = first_choice_balance(logits, topk_idx, aux_loss_coef);
  const at::Tensor z_loss = z_loss_term(logits, z_loss_coef);
  auto [kept_idx, kept_score, num_dropped] =
      drop_by_capacity(topk_idx, topk_score, capacity_factor, size_of(logits, 1), std::nullopt, std::nullopt, 0);
  return {kept_idx, kept_score, balance, z_loss, num_dropped};
}

at::Tensor switch_jitter_impl(const at::Tensor& x, double eps) {
  check_float(x, "x");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0 && eps < 1, "switch_eps must be in [0, 1), got ", repr(eps));
  // Drawn in row-major order whatever x's strides (torch.empty(x.shape).uniform_ in Python).
  return x * at::empty_symint(x.sym_sizes(), x.options()).uniform_(1.0 - eps, 1.0 + eps);
}

// Eval: NaiveGate's routing. Training: balanced_assignment with capacity ceil(T * k / E); scores = softmax over the
// logits of the assigned experts, 0 in an empty slot (counted in num_dropped).
Routing swipe_gate_impl(const at::Tensor& logits, int64_t k, bool training, double z_loss_coef) {
  check_logits(logits);
  check_k(k, logits);
  check_non_negative(z_loss_coef, "z_loss_coef");
  const int64_t num_tokens = size_of(logits, 0), num_experts = size_of(logits, 1);
  at::Tensor topk_idx, topk_score, num_dropped;
  if (!training) {
    std::tie(topk_idx, topk_score) = ops::route_topk(logits, k, "topk_softmax");
    num_dropped = at::zeros({}, logits.options().dtype(at::kLong));
  } else {
    const auto capacity =
        static_cast<int64_t>(std::ceil(static_cast<double>(num_tokens * k) / static_cast<double>(num_experts)));
    topk_idx = balanced_assignment(logits, k, capacity);
    const at::Tensor routed = topk_idx >= 0;
    at::Tensor chosen = logits.gather(1, topk_idx.clamp_min(0)).to(loss_dtype(logits));
    chosen = at::where(routed, chosen, at::full_like(chosen, -kInf));
    topk_score = at::where(routed, at::softmax(chosen, 1), at::zeros_like(chosen)).to(logits.scalar_type());
    num_dropped = routed.logical_not().sum();
  }
  return {topk_idx, topk_score, no_loss(logits), z_loss_term(logits, z_loss_coef), num_dropped};
}

// 1. probs = softmax(logits) over experts.
// 2. Each expert picks its C = min(T, ceil(capacity_factor * T * k / E)) tokens with the largest probability (ties
//    to the lower token).
// 3. Each token's chosen experts, by descending probability, fill its slots_per_token slots; -1 / 0 where empty,
//    and chosen experts beyond the slots count in num_dropped.
Routing expert_choice_gate_impl(const at::Tensor& logits, int64_t k, double capacity_factor, int64_t slots_per_token,
                                double z_loss_coef) {
  check_logits(logits);
  check_k(k, logits);
  check_positive(capacity_factor, "capacity_factor");
  check_k(slots_per_token, logits, "slots_per_token");
  check_non_negative(z_loss_coef, "z_loss_coef");
  const int64_t num_tokens = size_of(logits, 0), num_experts = size_of(logits, 1);
  const at::Tensor probs = at::softmax(logits.to(loss_dtype(logits)), -1);
  const at::Tensor ranked = probs.detach();

  const int64_t capacity = std::min(num_tokens, capacity_of(capacity_factor, num_tokens, k, num_experts));
  const at::Tensor picked = descending_order(ranked.t()).slice(1, 0, capacity);  // [E, C]
  const at::Tensor chosen =
      at::zeros({num_experts, num_tokens}, logits.options().dtype(at::kBool)).scatter(1, picked, true).t();  // [T, E]

  const at::Tensor key = at::where(chosen, ranked, at::full_like(ranked, -1.0));
  const at::Tensor slot_expert = descending_order(key).slice(1, 0, slots_per_token);
  const at::Tensor filled = chosen.gather(1, slot_expert);
  const at::Tensor topk_idx = at::where(filled, slot_expert, at::full_like(slot_expert, -1));
  const at::Tensor score = probs.gather(1, slot_expert);
  const at::Tensor topk_score = at::where(filled, score, at::zeros_like(score)).to(logits.scalar_type());
  const at::Tensor num_dropped = chosen.sum() - filled.sum();
  return {topk_idx, topk_score, no_loss(logits), z_loss_term(logits, z_loss_coef), num_dropped};
}

// 1. Affinities s = sigmoid(logits) in the loss dtype.
// 2. Selection by s + expert_bias (no gradient): with groups, keep each token's topk_groups best groups by the sum
//    of their top-2 selection scores (ties to the lower group); then the k best experts (ties to the lower id).
// 3. Weights = the unbiased s there, / (their sum + 1e-20) when normalize, * routed_scaling_factor.
// 4. The optional sequence-wise loss.
// 5. Training: the bias update rate * sign(T * k / E - load) [E] fp32, which the caller adds to expert_bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_gate_impl(
    const at::Tensor& logits, const at::Tensor& expert_bias, int64_t k, int64_t n_groups, int64_t topk_groups,
    bool normalize, double routed_scaling_factor, double aux_loss_coef, bool training, double bias_update_rate) {
  check_logits(logits);
  check_k(k, logits);
  const int64_t num_tokens = size_of(logits, 0), num_experts = size_of(logits, 1);
  check_float(expert_bias, "expert_bias");
  TORCH_CHECK(expert_bias.dim() == 1 && expert_bias.sym_size(0) == num_experts,
              "expert_bias must be [num_experts=", num_experts, "], got shape ", expert_bias.sym_sizes());
  check_same_device(expert_bias, "expert_bias", logits, "logits");
  TORCH_CHECK_VALUE(n_groups >= 1 && num_experts % n_groups == 0, "n_groups must divide num_experts=", num_experts,
                    ", got n_groups=", n_groups);
  TORCH_CHECK_VALUE(topk_groups >= 1 && topk_groups <= n_groups, "topk_groups must be in [1, n_groups=", n_groups,
                    "], got ", topk_groups);
  const int64_t group_size = num_experts / n_groups;
  TORCH_CHECK_VALUE(n_groups == 1 || k <= topk_groups * group_size,
                    "top_k must be at most topk_groups * experts per group = ", topk_groups * group_size,
                    ", got top_k=", k);
  check_positive(routed_scaling_factor, "routed_scaling_factor");
  check_non_negative(aux_loss_coef, "aux_loss_coef");
  check_non_negative(bias_update_rate, "bias_update_rate");

  const at::Tensor affinity = at::sigmoid(logits.to(loss_dtype(logits)));
  at::Tensor selection = affinity.detach() + expert_bias;
  if (n_groups > 1 && topk_groups < n_groups) {
    const at::Tensor group_score =
        std::get<0>(selection.view({num_tokens, n_groups, group_size}).topk(std::min<int64_t>(2, group_size), -1))
            .sum(-1);  // [T, n_groups]
    const at::Tensor kept = descending_order(group_score).slice(1, 0, topk_groups);
    const at::Tensor keep_group = at::zeros_like(group_score, at::kBool).scatter(1, kept, true);
    const at::Tensor keep_expert =
        keep_group.unsqueeze(2).expand({num_tokens, n_groups, group_size}).reshape({num_tokens, num_experts});
    selection = selection.masked_fill(keep_expert.logical_not(), -kInf);
  }
  const at::Tensor topk_idx = descending_order(selection).slice(1, 0, k);

  at::Tensor weight = affinity.gather(1, topk_idx);
  if (normalize) weight = weight / (weight.sum(-1, /*keepdim=*/true) + 1e-20);
  const at::Tensor topk_score = (weight * routed_scaling_factor).to(logits.scalar_type());

  at::Tensor balance = no_loss(logits);
  if (aux_loss_coef > 0) {
    const double per_token =
        static_cast<double>(num_experts) / static_cast<double>(k * std::max<int64_t>(num_tokens, 1));
    const at::Tensor fraction = count_assignments(topk_idx, num_experts, affinity.scalar_type()) * per_token;
    const at::Tensor share = affinity / (affinity.sum(-1, /*keepdim=*/true) + 1e-20);
    const at::Tensor mean_share = share.sum(0) / std::max<int64_t>(num_tokens, 1);
    balance = (fraction * mean_share).sum() * aux_loss_coef;
  }

  at::Tensor bias_update = at::empty({0}, logits.options().dtype(at::kFloat));
  if (training && bias_update_rate > 0) {
    const at::Tensor load = count_assignments(topk_idx, num_experts, at::kFloat);
    const double mean_load = static_cast<double>(num_tokens * k) / static_cast<double>(num_experts);
    bias_update = at::sign(mean_load - load) * bias_update_rate;
  }
  return {topk_idx, topk_score, balance, no_loss(logits), no_drop_count(logits), bias_update};
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

ops::GateRouting as_routing(const Routing& outputs) {
  return {std::get<0>(outputs), std::get<1>(outputs), std::get<2>(outputs),
          std::get<3>(outputs), std::get<4>(outputs), at::Tensor()};
}

}  // namespace

namespace ops {

at::Tensor naive_gate_z_loss(const at::Tensor& logits, double z_loss_coef) {
  return z_loss_term(logits, z_loss_coef);
}

void check_naive_gate_coefs(double balance_coef, double z_loss_coef) {
  check_non_negative(balance_coef, "balance_coef");
  check_non_negative(z_loss_coef, "z_loss_coef");
}

GateRouting naive_gate(const at::Tensor& logits, int64_t k, double balance_coef, double z_loss_coef) {
  static auto op = find_op<Routing(const at::Tensor&, int64_t, double, double)>("fastmoe::naive_gate");
  return as_routing(op.call(logits, k, balance_coef, z_loss_coef));
}

GateRouting noisy_gate(const at::Tensor& clean_logits, const std::optional<at::Tensor>& noise_logits, int64_t k,
                       double noise_epsilon, double w_importance, double w_load, double z_loss_coef) {
  static auto op =
      find_op<Routing(const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double, double, double, double)>(
          "fastmoe::noisy_gate");
  return as_routing(op.call(clean_logits, noise_logits, k, noise_epsilon, w_importance, w_load, z_loss_coef));
}

GateRouting gshard_gate(const at::Tensor& logits, bool training, std::optional<double> capacity_factor,
                        bool random_routing, double aux_loss_coef, double z_loss_coef) {
  static auto op =
      find_op<Routing(const at::Tensor&, bool, std::optional<double>, bool, double, double)>("fastmoe::gshard_gate");
  return as_routing(op.call(logits, training, capacity_factor, random_routing, aux_loss_coef, z_loss_coef));
}

GateRouting switch_gate(const at::Tensor& logits, std::optional<double> capacity_factor, double aux_loss_coef,
                        double z_loss_coef) {
  static auto op = find_op<Routing(const at::Tensor&, std::optional<double>, double, double)>("fastmoe::switch_gate");
  return as_routing(op.call(logits, capacity_factor, aux_loss_coef, z_loss_coef));
}

at::Tensor switch_jitter(const at::Tensor& x, double eps) {
  static auto op = find_op<at::Tensor(const at::Tensor&, double)>("fastmoe::switch_jitter");
  return op.call(x, eps);
}

GateRouting swipe_gate(const at::Tensor& logits, int64_t k, bool training, double z_loss_coef) {
  static auto op = find_op<Routing(const at::Tensor&, int64_t, bool, double)>("fastmoe::swipe_gate");
  return as_routing(op.call(logits, k, training, z_loss_coef));
}

GateRouting expert_choice_gate(const at::Tensor& logits, int64_t k, double capacity_factor, int64_t slots_per_token,
                               double z_loss_coef) {
  static auto op = find_op<Routing(const at::Tensor&, int64_t, double, int64_t, double)>("fastmoe::expert_choice_gate");
  return as_routing(op.call(logits, k, capacity_factor, slots_per_token, z_loss_coef));
}

GateRouting sigmoid_gate(const at::Tensor& logits, const at::Tensor& expert_bias, int64_t k, int64_t n_groups,
                         int64_t topk_groups, bool normalize, double routed_scaling_factor, double aux_loss_coef,
                         bool training, double bias_update_rate) {
  using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static auto op = find_op<Outputs(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, bool, double,
                                   double, bool, double)>("fastmoe::sigmoid_gate");
  auto [idx, score, balance, z_loss, num_dropped, bias_update] =
      op.call(logits, expert_bias, k, n_groups, topk_groups, normalize, routed_scaling_factor, aux_loss_coef, training,
              bias_update_rate);
  return {idx, score, balance, z_loss, num_dropped, bias_update};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_capacity(const at::Tensor& topk_idx, const at::Tensor& topk_score,
                                                             std::optional<double> capacity_factor, int64_t num_experts,
                                                             const std::optional<at::Tensor>& group_idx,
                                                             const std::optional<at::Tensor>& group_score,
                                                             int64_t group_offset) {
  static auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, std::optional<double>, int64_t, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, int64_t)>("fastmoe::gate_capacity");
  return op.call(topk_idx, topk_score, capacity_factor, num_experts, group_idx, group_score, group_offset);
}

}  // namespace ops

TORCH_LIBRARY_IMPL(fastmoe, CompositeImplicitAutograd, m) {
  m.impl("naive_gate", &naive_gate_impl);
  m.impl("noisy_gate", &noisy_gate_impl);
  m.impl("gshard_gate", &gshard_gate_impl);
  m.impl("switch_gate", &switch_gate_impl);
  m.impl("switch_jitter", &switch_jitter_impl);
  m.impl("swipe_gate", &swipe_gate_impl);
  m.impl("expert_choice_gate", &expert_choice_gate_impl);
  m.impl("sigmoid_gate", &sigmoid_gate_impl);
  m.impl("gate_capacity", &gate_capacity_impl);
}

}  // namespace fastmoe
