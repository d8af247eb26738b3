// The fastmoe::nn gates against plain-libtorch transcriptions of their papers' formulas in fp64 (selections as
// explicit loops with ties to the lower id, scores and losses as libtorch expressions so autograd gives the
// reference gradients), the capacity and bias behaviour, the layers with each gate, and the argument checks.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "fastmoe/fastmoe.h"

namespace {

namespace fnn = fastmoe::nn;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr double kTol = 1e-12;
const auto kF64 = torch::kFloat64;

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.numel() == 0 && b.numel() == 0) return 0.0;
  return (a - b).abs().max().item<double>();
}

std::vector<std::string> parameter_names(const torch::nn::Module& module) {
  std::vector<std::string> names;
  for (const auto& item : module.named_parameters()) names.push_back(item.key());
  return names;
}

std::vector<std::string> buffer_names(const torch::nn::Module& module) {
  std::vector<std::string> names;
  for (const auto& item : module.named_buffers()) names.push_back(item.key());
  return names;
}

// Runs `body`, which must throw c10::Error; returns the message (empty, with a failure, if it did not throw).
std::string error_of(const std::function<void()>& body) {
  try {
    body();
  } catch (const c10::Error& error) {
    return error.what();
  }
  ADD_FAILURE() << "expected a c10::Error";
  return "";
}

// Copies values into a parameter or buffer without recording it in autograd.
void assign(torch::Tensor& target, const torch::Tensor& values) {
  torch::NoGradGuard no_grad;
  target.copy_(values);
}

// Random fp64 parameters (scaled), so routings and losses are not trivial.
void randomize(torch::nn::Module& module, uint64_t seed, double scale = 0.7) {
  torch::manual_seed(seed);
  for (auto& param : module.parameters()) assign(param, torch::randn(param.sizes(), kF64) * scale);
}

std::vector<std::vector<double>> rows_of(const torch::Tensor& t) {
  const torch::Tensor c = t.detach().to(kF64).contiguous();
  std::vector<std::vector<double>> rows(c.size(0), std::vector<double>(c.size(1)));
  for (int64_t i = 0; i < c.size(0); ++i)
    for (int64_t j = 0; j < c.size(1); ++j) rows[i][j] = c[i][j].item<double>();
  return rows;
}

// `ids` by descending value, ties to the lower id.
std::vector<int64_t> ranked(const std::vector<double>& values, std::vector<int64_t> ids) {
  std::stable_sort(ids.begin(), ids.end(), [&](int64_t a, int64_t b) { return values[a] > values[b]; });
  return ids;
}

std::vector<int64_t> all_ids(int64_t n) {
  std::vector<int64_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  return ids;
}

torch::Tensor index_matrix(const std::vector<std::vector<int64_t>>& rows, int64_t width) {
  std::vector<int64_t> flat;
  for (const auto& row : rows) flat.insert(flat.end(), row.begin(), row.end());
  return torch::tensor(flat, torch::kInt64).view({static_cast<int64_t>(rows.size()), width});
}

// [T, k] ids of the k largest entries per row, ties to the lower id.
torch::Tensor topk_rows(const torch::Tensor& values, int64_t k) {
  std::vector<std::vector<int64_t>> out;
  for (const auto& row : rows_of(values)) {
    auto ids = ranked(row, all_ids(static_cast<int64_t>(row.size())));
    out.emplace_back(ids.begin(), ids.begin() + k);
  }
  return index_matrix(out, k);
}

// Each expert keeps its `capacity` highest-scored (token, slot) pairs, ties to the lower token * k + slot.
torch::Tensor capacity_limit(const torch::Tensor& topk_idx, const torch::Tensor& topk_score, int64_t capacity) {
  const int64_t num_tokens = topk_idx.size(0), k = topk_idx.size(1);
  const auto score = rows_of(topk_score);
  std::map<int64_t, std::vector<int64_t>> pairs_of_expert;
  for (int64_t t = 0; t < num_tokens; ++t)
    for (int64_t j = 0; j < k; ++j)
      if (topk_idx[t][j].item<int64_t>() >= 0) pairs_of_expert[topk_idx[t][j].item<int64_t>()].push_back(t * k + j);
  std::vector<std::vector<int64_t>> kept(num_tokens, std::vector<int64_t>(k, -1));
  std::vector<double> flat_score(num_tokens * k);
  for (int64_t p = 0; p < num_tokens * k; ++p) flat_score[p] = score[p / k][p % k];
  for (const auto& [expert, pairs] : pairs_of_expert) {
    const auto order = ranked(flat_score, pairs);
    for (size_t i = 0; i < order.size() && static_cast<int64_t>(i) < capacity; ++i)
      kept[order[i] / k][order[i] % k] = expert;
  }
  return index_matrix(kept, k);
}

int64_t ceil_capacity(double factor, int64_t num_tokens, int64_t k, int64_t num_experts) {
  return static_cast<int64_t>(std::ceil(factor * num_tokens * k / num_experts));
}

torch::Tensor softmax_rows(const torch::Tensor& logits) {
  const torch::Tensor e = torch::exp(logits - std::get<0>(logits.max(-1, true)));
  return e / e.sum(-1, true);
}

// Squared coefficient of variation with the population variance.
torch::Tensor cv2(const torch::Tensor& v) {
  const torch::Tensor mean = v.mean();
  return (v - mean).pow(2).mean() / (mean.pow(2) + 1e-10);
}

torch::Tensor z_loss(const torch::Tensor& logits) {
  return torch::log(torch::exp(logits).sum(-1)).pow(2).mean();
}

// f_e: fraction of the tokens whose first choice is e.
torch::Tensor first_choice_fraction(const torch::Tensor& idx, int64_t num_experts) {
  torch::Tensor f = torch::zeros({num_experts}, kF64);
  for (int64_t t = 0; t < idx.size(0); ++t) f[idx[t][0].item<int64_t>()] += 1.0 / idx.size(0);
  return f;
}

torch::Tensor zero_empty(const torch::Tensor& idx, const torch::Tensor& score) {
  return torch::where(idx >= 0, score, torch::zeros_like(score));
}

// Forward under a fixed seed, then backward of sum(score * w) + loss: the values and gradients to compare.
struct GateRun {
  torch::Tensor idx, score, loss;
};
GateRun run_and_backward(fnn::GateImpl& gate, const torch::Tensor& x, uint64_t seed) {
  torch::manual_seed(seed);
  auto [idx, score] = gate.forward(x);
  const torch::Tensor w = torch::linspace(-1.0, 1.5, score.numel(), kF64).view(score.sizes());
  (score * w).sum().add(gate.loss()).backward();
  return {idx, score, gate.loss()};
}

void backward_reference(const torch::Tensor& score, const torch::Tensor& loss) {
  const torch::Tensor w = torch::linspace(-1.0, 1.5, score.numel(), kF64).view(score.sizes());
  (score * w).sum().add(loss).backward();
}

torch::Tensor leaf(const torch::Tensor& t) {
  return t.detach().clone().requires_grad_(true);
}

constexpr int64_t kDModel = 6, kExperts = 5, kTokens = 13;

torch::Tensor tokens(uint64_t seed = 1, int64_t num_tokens = kTokens) {
  torch::manual_seed(seed);
  return torch::randn({num_tokens, kDModel}, kF64);
}

// ---------------------------------------------------------------- NaiveGate

TEST(NaiveGate, IsAGateWithTheFastMoENamesAndNoLoss) {
  fnn::NaiveGate naive(fnn::NaiveGateOptions(6, 4));
  fnn::Gate gate(naive);
  EXPECT_THAT(parameter_names(*gate), ElementsAre("gate.weight", "gate.bias"));
  EXPECT_EQ(gate->top_k(), 2);
  EXPECT_EQ(gate->slots_per_token(), 2);
  gate->forward(torch::randn({5, 6}));
  EXPECT_EQ(gate->loss().dim(), 0);
  EXPECT_EQ(gate->loss().item<double>(), 0.0);
  EXPECT_TRUE(gate->losses().is_empty());
  EXPECT_FALSE(gate->num_dropped().defined());
}

TEST(NaiveGate, MatchesSoftmaxOverTheTopKLogitsAndItsZLoss) {
  fnn::NaiveGate gate(fnn::NaiveGateOptions(kDModel, kExperts).top_k(3).z_loss_coef(0.1));
  gate->to(kF64);
  randomize(*gate, 2);
  const torch::Tensor x = tokens();
  const GateRun got = run_and_backward(*gate, x, 7);

  const torch::Tensor weight = leaf(gate->gate->weight), bias = leaf(gate->gate->bias);
  const torch::Tensor logits = torch::addmm(bias, x, weight.t());
  const torch::Tensor idx = topk_rows(logits, 3);
  const torch::Tensor score = softmax_rows(logits.gather(1, idx));
  const torch::Tensor loss = 0.1 * z_loss(logits);
  backward_reference(score, loss);

  EXPECT_TRUE(torch::equal(got.idx, idx));
  EXPECT_LT(max_abs_diff(got.score, score), kTol);
  EXPECT_THAT(gate->losses().keys(), ElementsAre("z"));
  EXPECT_LT(max_abs_diff(got.loss, loss), kTol);
  EXPECT_LT(max_abs_diff(gate->gate->weight.grad(), weight.grad()), 1e-10);
  EXPECT_LT(max_abs_diff(gate->gate->bias.grad(), bias.grad()), 1e-10);
}

// ---------------------------------------------------------------- NoisyGate

// Shazeer et al. 2017, eq. 3-5 and 8-10; noise = the standard normal draws ([T, E]), undefined in eval.
GateRun reference_noisy(const torch::Tensor& x, const torch::Tensor& w_gate, const torch::Tensor& w_noise, int64_t k,
                        const torch::Tensor& noise) {
  const int64_t num_tokens = x.size(0), num_experts = w_gate.size(1);
  const torch::Tensor clean = x.mm(w_gate);
  const torch::Tensor std = torch::log1p(torch::exp(x.mm(w_noise))) + 1e-2;
  const torch::Tensor h = noise.defined() ? clean + noise * std : clean;
  const torch::Tensor idx = topk_rows(h, k);
  const torch::Tensor in_topk = torch::zeros({num_tokens, num_experts}, torch::kBool).scatter(1, idx, true);
  const torch::Tensor gates = softmax_rows(torch::where(in_topk, h, torch::full_like(h, -INFINITY)));
  torch::Tensor load;
  if (noise.defined() && k < num_experts) {
    std::vector<torch::Tensor> columns;
    for (int64_t e = 0; e < num_experts; ++e) {
      const torch::Tensor others = torch::cat({h.slice(1, 0, e), h.slice(1, e + 1)}, 1);
      const torch::Tensor kth_excluding = std::get<0>(others.sort(1, /*descending=*/true)).select(1, k - 1);
      const torch::Tensor z = (clean.select(1, e) - kth_excluding) / std.select(1, e);
      columns.push_back(0.5 * torch::erfc(-z / std::sqrt(2.0)));
    }
    load = torch::stack(columns, 1).sum(0);
  } else {
    load = in_topk.to(kF64).sum(0);
  }
  return {idx, gates.gather(1, idx), cv2(gates.sum(0)) + cv2(load)};
}

class NoisyGateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    gate = fnn::NoisyGate(fnn::NoisyGateOptions(kDModel, kExperts).top_k(2));
    gate->to(kF64);
    randomize(*gate, 3);
  }
  fnn::NoisyGate gate{nullptr};
  torch::Tensor x = tokens();
};

TEST_F(NoisyGateTest, HasTheFastMoEParameterNames) {
  EXPECT_THAT(parameter_names(*gate), ElementsAre("w_gate", "w_noise"));
  EXPECT_EQ(gate->w_gate.sizes(), (std::vector<int64_t>{kDModel, kExperts}));
  EXPECT_TRUE(gate->gate.is_empty());
}

TEST_F(NoisyGateTest, InTrainingMatchesThePaperInOutputsLossAndGradients) {
  gate->train();
  const GateRun got = run_and_backward(*gate, x, 11);
  torch::manual_seed(11);
  const torch::Tensor noise = torch::randn({kTokens, kExperts}, kF64);  // the gate's one draw
  const torch::Tensor w_gate = leaf(gate->w_gate), w_noise = leaf(gate->w_noise);
  const GateRun want = reference_noisy(x, w_gate, w_noise, 2, noise);
  backward_reference(want.score, want.loss);

  EXPECT_TRUE(torch::equal(got.idx, want.idx));
  EXPECT_LT(max_abs_diff(got.score, want.score), kTol);
  EXPECT_THAT(gate->losses().keys(), ElementsAre("balance"));
  EXPECT_LT(max_abs_diff(got.loss, want.loss), kTol);
  EXPECT_LT(max_abs_diff(gate->w_gate.grad(), w_gate.grad()), 1e-10);
  EXPECT_LT(max_abs_diff(gate->w_noise.grad(), w_noise.grad()), 1e-10);
  EXPECT_GT(gate->w_noise.grad().abs().sum().item<double>(), 0.0);  // the load estimator reaches w_noise
}

TEST_F(NoisyGateTest, InEvalRoutesOnTheCleanLogitsAndCountsTheLoad) {
  gate->eval();
  const GateRun got = run_and_backward(*gate, x, 11);
  const GateRun want = reference_noisy(x, gate->w_gate.detach(), gate->w_noise.detach(), 2, torch::Tensor());
  EXPECT_TRUE(torch::equal(got.idx, want.idx));
  EXPECT_LT(max_abs_diff(got.score, want.score), kTol);
  EXPECT_LT(max_abs_diff(got.loss, want.loss), kTol);
}

TEST(NoisyGate, WithKEqualToTheExpertsTheLoadIsTheCountAndOneExpertHasNoLoss) {
  fnn::NoisyGate all(fnn::NoisyGateOptions(kDModel, 3).top_k(3));
  all->to(kF64);
  randomize(*all, 6);
  const torch::Tensor x = tokens();
  const GateRun got = run_and_backward(*all, x, 7);
  torch::manual_seed(7);
  const torch::Tensor noise = torch::randn({kTokens, 3}, kF64);
  const GateRun want = reference_noisy(x, all->w_gate.detach(), all->w_noise.detach(), 3, noise);
  EXPECT_LT(max_abs_diff(got.loss, want.loss), kTol);

  fnn::NoisyGate one(fnn::NoisyGateOptions(kDModel, 1).top_k(1));
  one->to(kF64);
  randomize(*one, 6);
  one->forward(x);
  EXPECT_EQ(one->loss().item<double>(), 0.0);
}

// ---------------------------------------------------------------- GShardGate

// GShard Algorithm 1 (uniform: the random-routing draws, undefined without random routing).
GateRun reference_gshard(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                         const torch::Tensor& uniform, std::optional<int64_t> capacity, double aux_loss_coef = 1.0) {
  const torch::Tensor logits = torch::addmm(bias, x, weight.t());
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
  const torch::Tensor p = softmax_rows(logits);
  torch::Tensor idx = topk_rows(logits, 2);
  const torch::Tensor p1 = p.gather(1, idx.slice(1, 0, 1)), p2 = p.gather(1, idx.slice(1, 1, 2));
  const torch::Tensor score = torch::cat({p1 / (p1 + p2), p2 / (p1 + p2)}, 1);
  const torch::Tensor loss =
      aux_loss_coef * num_experts * num_experts * (first_choice_fraction(idx, num_experts) * p.mean(0)).mean();
  if (uniform.defined()) {
    idx = idx.clone();
    for (int64_t t = 0; t < num_tokens; ++t)
      if (!(2 * score[t][1].item<double>() > uniform[t].item<double>())) idx[t][1] = -1;
  }
  if (capacity.has_value()) idx = capacity_limit(idx, score, *capacity);
  return {idx, zero_empty(idx, score), loss};
}

class GShardGateTest : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

TEST_P(GShardGateTest, MatchesThePaperInOutputsLossAndGradients) {
  const auto [training, random_routing] = GetParam();
  // Tight factors, so the capacity drops something: ceil(0.6 * 13 * 2 / 5) = 4, ceil(0.8 * 13 * 2 / 5) = 5.
  fnn::GShardGate gate(fnn::GShardGateOptions(kDModel, kExperts)
                           .capacity_factor_train(0.8)
                           .capacity_factor_eval(0.6)
                           .random_routing(random_routing)
                           .aux_loss_coef(0.5));
  gate->to(kF64);
  randomize(*gate, 8);
  training ? gate->train() : gate->eval();
  const torch::Tensor x = tokens();
  const GateRun got = run_and_backward(*gate, x, 21);

  torch::manual_seed(21);
  const torch::Tensor uniform = training && random_routing ? torch::rand({kTokens}, kF64) : torch::Tensor();
  const torch::Tensor weight = leaf(gate->gate->weight), bias = leaf(gate->gate->bias);
  const int64_t capacity = ceil_capacity(training ? 0.8 : 0.6, kTokens, 2, kExperts);
  const GateRun want = reference_gshard(x, weight, bias, uniform, capacity, 0.5);
  backward_reference(want.score, want.loss);

  EXPECT_TRUE(torch::equal(got.idx, want.idx)) << got.idx << want.idx;
  EXPECT_LT(max_abs_diff(got.score, want.score), kTol);
  EXPECT_LT(max_abs_diff(got.loss, want.loss), kTol);
  EXPECT_LT(max_abs_diff(gate->gate->weight.grad(), weight.grad()), 1e-10);
  EXPECT_LT(max_abs_diff(gate->gate->bias.grad(), bias.grad()), 1e-10);
  // num_dropped counts the capacity drops only, not the random-routing ones.
  torch::manual_seed(21);
  const GateRun undropped = reference_gshard(x, weight, bias, uniform, std::nullopt, 0.5);
  EXPECT_EQ(gate->num_dropped().item<int64_t>(),
            (got.idx == -1).sum().item<int64_t>() - (undropped.idx == -1).sum().item<int64_t>());
  EXPECT_GT(gate->num_dropped().item<int64_t>(), 0);
}

INSTANTIATE_TEST_SUITE_P(Modes, GShardGateTest, ::testing::Combine(::testing::Bool(), ::testing::Bool()),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param) ? "train" : "eval") +
                                  (std::get<1>(info.param) ? "_random" : "_norandom");
                         });

TEST(GShardGate, CapacityDropsTheLowestScoredAssignments) {
  // Every token's first choice is expert 0 (a large bias): its capacity keeps the highest g1 only.
  fnn::GShardGate gate(fnn::GShardGateOptions(kDModel, kExperts).capacity_factor_eval(1.0));
  gate->to(kF64);
  randomize(*gate, 9);
  assign(gate->gate->bias, torch::tensor({8.0, 0.0, 0.0, 0.0, 0.0}, kF64));
  gate->eval();
  const torch::Tensor x = tokens();
  auto [idx, score] = gate->forward(x);
  const torch::Tensor logits = gate->gate->forward(x).detach();
  const torch::Tensor ref_g1 = softmax_rows(std::get<0>(logits.topk(2, -1))).select(1, 0);
  const torch::Tensor kept = idx.select(1, 0) == 0;
  const int64_t capacity = ceil_capacity(1.0, kTokens, 2, kExperts);  // 6 of the 13 first choices stay
  ASSERT_EQ(kept.sum().item<int64_t>(), capacity);
  EXPECT_TRUE((idx.select(1, 0) == 0).logical_or(idx.select(1, 0) == -1).all().item<bool>());
  EXPECT_GE(ref_g1.masked_select(kept).min().item<double>(),
            ref_g1.masked_select(kept.logical_not()).max().item<double>());
  EXPECT_TRUE((score.select(1, 0).masked_select(kept.logical_not()) == 0).all().item<bool>());
}

TEST(GShardGate, WithoutACapacityNothingIsDropped) {
  fnn::GShardGate gate(fnn::GShardGateOptions(kDModel, kExperts).capacity_factor_eval(std::nullopt));
  gate->eval();
  auto [idx, score] = gate->forward(torch::randn({40, kDModel}));
  EXPECT_TRUE((idx >= 0).all().item<bool>());
  EXPECT_EQ(gate->num_dropped().item<int64_t>(), 0);
}

// ---------------------------------------------------------------- SwitchGate

class SwitchGateTest : public ::testing::TestWithParam<bool> {};

TEST_P(SwitchGateTest, MatchesThePaperInOutputsLossAndGradients) {
  const bool training = GetParam();
  fnn::SwitchGate gate(fnn::SwitchGateOptions(kDModel, kExperts).capacity_factor_train(0.9).capacity_factor_eval(1.1));
  gate->to(kF64);
  randomize(*gate, 12);
  training ? gate->train() : gate->eval();
  const torch::Tensor x = tokens();
  const GateRun got = run_and_backward(*gate, x, 77);
  EXPECT_EQ(gate->top_k(), 1);

  torch::manual_seed(77);
  const torch::Tensor jitter = training ? torch::empty_like(x).uniform_(0.9, 1.1) : torch::ones_like(x);
  const torch::Tensor weight = leaf(gate->gate->weight), bias = leaf(gate->gate->bias);
  const torch::Tensor logits = torch::addmm(bias, x * jitter, weight.t());
  const torch::Tensor p = softmax_rows(logits);
  const torch::Tensor top1 = topk_rows(logits, 1);
  const torch::Tensor score = p.gather(1, top1);
  const torch::Tensor loss = 1e-2 * kExperts * (first_choice_fraction(top1, kExperts) * p.mean(0)).sum();
  const torch::Tensor idx = capacity_limit(top1, score, ceil_capacity(training ? 0.9 : 1.1, kTokens, 1, kExperts));
  backward_reference(zero_empty(idx, score), loss);

  EXPECT_TRUE(torch::equal(got.idx, idx)) << got.idx << idx;
  EXPECT_LT(max_abs_diff(got.score, zero_empty(idx, score)), kTol);
  EXPECT_LT(max_abs_diff(got.loss, loss), kTol);
  EXPECT_LT(max_abs_diff(gate->gate->weight.grad(), weight.grad()), 1e-10);
  EXPECT_LT(max_abs_diff(gate->gate->bias.grad(), bias.grad()), 1e-10);
  EXPECT_EQ(gate->num_dropped().item<int64_t>(), (idx == -1).sum().item<int64_t>());
}

INSTANTIATE_TEST_SUITE_P(Modes, SwitchGateTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "train" : "eval"; });

TEST(SwitchGate, CapacityDropsTheLowestScoredTokens) {
  fnn::SwitchGate gate(fnn::SwitchGateOptions(kDModel, 3));
  gate->to(kF64);
  randomize(*gate, 13);
  assign(gate->gate->bias, torch::tensor({0.0, 9.0, 0.0}, kF64));
  gate->eval();
  const torch::Tensor x = tokens(1, 10);
  auto [idx, score] = gate->forward(x);
  const torch::Tensor p1 = softmax_rows(gate->gate->forward(x).detach()).select(1, 1);
  const torch::Tensor kept = idx.squeeze(1) == 1;
  ASSERT_EQ(kept.sum().item<int64_t>(), ceil_capacity(2.4, 10, 1, 3));  // 8 of the 10 tokens stay
  EXPECT_GE(p1.masked_select(kept).min().item<double>(), p1.masked_select(kept.logical_not()).max().item<double>());
  EXPECT_EQ(gate->num_dropped().item<int64_t>(), 2);
}

// ---------------------------------------------------------------- SwipeGate

// The documented greedy: in round r every token with a free slot proposes its r-th expert by logit; each expert
// accepts by descending softmax probability (ties: lower token) while it has room.
torch::Tensor reference_swipe_assign(const torch::Tensor& logits, int64_t k, int64_t capacity) {
  const auto rows = rows_of(logits);
  const auto probs = rows_of(softmax_rows(logits.detach()));
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
  std::vector<int64_t> remaining(num_experts, capacity);
  std::vector<std::vector<int64_t>> assigned(num_tokens);
  for (int64_t r = 0; r < num_experts; ++r) {
    std::map<int64_t, std::vector<int64_t>> proposals;
    for (int64_t t = 0; t < num_tokens; ++t)
      if (static_cast<int64_t>(assigned[t].size()) < k)
        proposals[ranked(rows[t], all_ids(num_experts))[r]].push_back(t);
    for (auto& [e, proposers] : proposals) {
      std::vector<double> strength(num_tokens);
      for (int64_t t : proposers) strength[t] = probs[t][e];
      for (int64_t t : ranked(strength, proposers)) {
        if (remaining[e] == 0) break;
        assigned[t].push_back(e);
        --remaining[e];
      }
    }
  }
  for (auto& a : assigned) a.resize(k, -1);
  return index_matrix(assigned, k);
}

TEST(SwipeGate, InTrainingMatchesTheGreedyBalancedAssignment) {
  fnn::SwipeGate gate(fnn::SwipeGateOptions(kDModel, kExperts).top_k(2));
  gate->to(kF64);
  randomize(*gate, 14);
  // Skew the logits, so the first choices overflow and tokens move on.
  assign(gate->gate->bias, torch::tensor({2.0, 1.0, 0.0, 0.0, -1.0}, kF64));
  gate->train();
  const torch::Tensor x = tokens();
  const GateRun got = run_and_backward(*gate, x, 5);

  const torch::Tensor weight = leaf(gate->gate->weight), bias = leaf(gate->gate->bias);
  const torch::Tensor logits = torch::addmm(bias, x, weight.t());
  const torch::Tensor idx = reference_swipe_assign(logits, 2, ceil_capacity(1.0, kTokens, 2, kExperts));
  const torch::Tensor gathered = logits.gather(1, idx.clamp_min(0));
  const torch::Tensor chosen = torch::where(idx >= 0, gathered, torch::full_like(gathered, -INFINITY));
  const torch::Tensor score = zero_empty(idx, softmax_rows(chosen));
  backward_reference(score, torch::zeros({}, kF64));

  EXPECT_TRUE(torch::equal(got.idx, idx)) << got.idx << idx;
  EXPECT_FALSE(torch::equal(idx, topk_rows(logits, 2)));  // the capacity moved someone
  EXPECT_LT(max_abs_diff(got.score, score), kTol);
  EXPECT_LT(max_abs_diff(gate->gate->weight.grad(), weight.grad()), 1e-10);
  const torch::Tensor load = torch::zeros({kExperts + 1}, torch::kInt64)
                                 .index_add_(0, idx.reshape(-1) + 1, torch::ones({idx.numel()}, torch::kInt64));
  EXPECT_LE(load.slice(0, 1).max().item<int64_t>(), ceil_capacity(1.0, kTokens, 2, kExperts));
  EXPECT_EQ(gate->num_dropped().item<int64_t>(), (idx == -1).sum().item<int64_t>());
}

TEST(SwipeGate, InEvalIsTheNaiveGate) {
  fnn::SwipeGate gate(fnn::SwipeGateOptions(kDModel, kExperts).top_k(2));
  gate->to(kF64);
  randomize(*gate, 15);
  gate->eval();
  const torch::Tensor x = tokens();
  auto [idx, score] = gate->forward(x);
  const torch::Tensor logits = gate->gate->forward(x).detach();
  EXPECT_TRUE(torch::equal(idx, topk_rows(logits, 2)));
  EXPECT_LT(max_abs_diff(score, softmax_rows(logits.gather(1, idx))), kTol);
  EXPECT_EQ(gate->num_dropped().item<int64_t>(), 0);
}

// ---------------------------------------------------------------- ExpertChoiceGate

class ExpertChoiceGateTest : public ::testing::TestWithParam<std::optional<int64_t>> {};

TEST_P(ExpertChoiceGateTest, EachExpertTakesItsTopTokens) {
  const std::optional<int64_t> max_experts = GetParam();
  fnn::ExpertChoiceGate gate(
      fnn::ExpertChoiceGateOptions(kDModel, kExperts).capacity_factor(1.5).max_experts_per_token(max_experts));
  gate->to(kF64);
  randomize(*gate, 16, 1.5);
  const int64_t width = max_experts.value_or(kExperts);
  EXPECT_EQ(gate->slots_per_token(), width);
  const torch::Tensor x = tokens();
  const GateRun got = run_and_backward(*gate, x, 5);

  const torch::Tensor weight = leaf(gate->gate->weight), bias = leaf(gate->gate->bias);
  const torch::Tensor s = softmax_rows(torch::addmm(bias, x, weight.t()));
  const int64_t capacity = std::min<int64_t>(kTokens, ceil_capacity(1.5, kTokens, 2, kExperts));  // 8
  const auto columns = rows_of(s.t());
  const auto rows = rows_of(s);
  std::vector<std::vector<int64_t>> chosen_by(kTokens);
  for (int64_t e = 0; e < kExperts; ++e) {
    const auto picked = ranked(columns[e], all_ids(kTokens));
    for (int64_t i = 0; i < capacity; ++i) chosen_by[picked[i]].push_back(e);
  }
  std::vector<std::vector<int64_t>> slots;
  int64_t cut = 0;
  for (int64_t t = 0; t < kTokens; ++t) {
    auto experts = ranked(rows[t], chosen_by[t]);
    cut += std::max<int64_t>(0, static_cast<int64_t>(experts.size()) - width);
    experts.resize(width, -1);
    slots.push_back(experts);
  }
  const torch::Tensor idx = index_matrix(slots, width);
  const torch::Tensor score = zero_empty(idx, s.gather(1, idx.clamp_min(0)));
  backward_reference(score, torch::zeros({}, kF64));

  EXPECT_TRUE(torch::equal(got.idx, idx)) << got.idx << idx;
  EXPECT_LT(max_abs_diff(got.score, score), kTol);
  EXPECT_LT(max_abs_diff(gate->gate->weight.grad(), weight.grad()), 1e-10);
  EXPECT_EQ(gate->num_dropped().item<int64_t>(), cut);
  if (max_experts.has_value()) EXPECT_GT(cut, 0);
}

INSTANTIATE_TEST_SUITE_P(Widths, ExpertChoiceGateTest, ::testing::Values(std::nullopt, std::optional<int64_t>(1)),
                         [](const auto& info) { return info.param ? "capped1" : "uncapped"; });

// ---------------------------------------------------------------- SigmoidGate

// DeepSeek-V3 eq. 12-16 with group-limited selection and the optional eq. 17-20 over the batch.
GateRun reference_sigmoid(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& expert_bias,
                          int64_t k, int64_t n_groups, int64_t topk_groups, double scale, double aux_loss_coef) {
  const torch::Tensor logits = x.mm(weight.t());
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1), size = num_experts / n_groups;
  const torch::Tensor s = 1 / (1 + torch::exp(-logits));
  const auto select = rows_of(s.detach() + expert_bias.to(kF64));
  std::vector<std::vector<int64_t>> out;
  for (const auto& row : select) {
    std::vector<int64_t> allowed = all_ids(num_experts);
    if (n_groups > 1) {
      std::vector<double> group_score(n_groups);
      for (int64_t g = 0; g < n_groups; ++g) {
        std::vector<double> members(row.begin() + g * size, row.begin() + (g + 1) * size);
        std::sort(members.rbegin(), members.rend());
        group_score[g] = members[0] + (size > 1 ? members[1] : 0.0);
      }
      auto groups = ranked(group_score, all_ids(n_groups));
      groups.resize(topk_groups);
      allowed.erase(
          std::remove_if(allowed.begin(), allowed.end(),
                         [&](int64_t e) { return std::find(groups.begin(), groups.end(), e / size) == groups.end(); }),
          allowed.end());
    }
    auto picked = ranked(row, allowed);
    out.emplace_back(picked.begin(), picked.begin() + k);
  }
  const torch::Tensor idx = index_matrix(out, k);
  const torch::Tensor w = s.gather(1, idx);
  torch::Tensor loss = torch::zeros({}, kF64);
  if (aux_loss_coef > 0) {
    torch::Tensor f = torch::zeros({num_experts}, kF64);
    for (const auto& row : out)
      for (int64_t e : row) f[e] += static_cast<double>(num_experts) / (k * num_tokens);
    loss = aux_loss_coef * (f * (s / s.sum(1, true)).mean(0)).sum();
  }
  return {idx, scale * w / w.sum(1, true), loss};
}

TEST(SigmoidGate, HasTheDeepSeekNamesAndAnFp32Bias) {
  fnn::SigmoidGate gate(fnn::SigmoidGateOptions(4, 8));
  EXPECT_THAT(parameter_names(*gate), ElementsAre("gate.weight"));
  EXPECT_THAT(buffer_names(*gate), ElementsAre("expert_bias"));
  gate->to(kF64);
  EXPECT_EQ(gate->gate->weight.scalar_type(), kF64);
  EXPECT_EQ(gate->expert_bias.scalar_type(), torch::kFloat32);
  // Also when a parent module is cast.
  fnn::TransformerMLP moe(fnn::TransformerMLPOptions(8, 4, 8, fnn::SigmoidGate(fnn::SigmoidGateOptions(4, 8))));
  moe->to(torch::kBFloat16);
  EXPECT_EQ(moe->gate->named_buffers()["expert_bias"].scalar_type(), torch::kFloat32);
  gate->forward(torch::randn({3, 4}, kF64));
  EXPECT_EQ(gate->loss().item<double>(), 0.0);
}

class SigmoidGateTest : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, double>> {};

TEST_P(SigmoidGateTest, MatchesDeepSeekV3InOutputsLossAndGradients) {
  const auto [n_groups, topk_groups, aux_loss_coef] = GetParam();
  const int64_t num_experts = 12, k = 3;
  fnn::SigmoidGate gate(fnn::SigmoidGateOptions(kDModel, num_experts)
                            .top_k(k)
                            .n_groups(n_groups)
                            .topk_groups(topk_groups)
                            .routed_scaling_factor(2.5)
                            .aux_loss_coef(aux_loss_coef));
  gate->to(kF64);
  randomize(*gate, 17);
  gate->eval();
  torch::manual_seed(18);
  assign(gate->expert_bias, 0.3 * torch::randn({num_experts}));
  const torch::Tensor x = tokens();
  const GateRun got = run_and_backward(*gate, x, 5);

  const torch::Tensor weight = leaf(gate->gate->weight);
  const GateRun want = reference_sigmoid(x, weight, gate->expert_bias, k, n_groups, topk_groups, 2.5, aux_loss_coef);
  backward_reference(want.score, want.loss);
  EXPECT_TRUE(torch::equal(got.idx, want.idx)) << got.idx << want.idx;
  EXPECT_LT(max_abs_diff(got.score, want.score), kTol);
  EXPECT_LT(max_abs_diff(got.loss, want.loss), kTol);
  EXPECT_LT(max_abs_diff(gate->gate->weight.grad(), weight.grad()), 1e-10);
}

INSTANTIATE_TEST_SUITE_P(Groups, SigmoidGateTest,
                         ::testing::Values(std::make_tuple(1, 1, 0.0), std::make_tuple(4, 2, 0.0),
                                           std::make_tuple(6, 2, 0.0), std::make_tuple(3, 1, 1e-3)));

// Logits equal to the input: an identity projection, so the affinities are sigmoid(x) exactly.
fnn::SigmoidGate identity_sigmoid_gate(const fnn::SigmoidGateOptions& options) {
  fnn::SigmoidGate gate(options);
  gate->to(kF64);
  assign(gate->gate->weight, torch::eye(options.num_experts(), kF64));
  return gate;
}

TEST(SigmoidGate, GroupLimitedRoutingPicksFromTheBestGroups) {
  // Groups {0,1} {2,3} {4,5} {6,7}. By top-2 sums groups 1 and 2 win, although expert 0 has the largest score.
  fnn::SigmoidGate gate = identity_sigmoid_gate(
      fnn::SigmoidGateOptions(8, 8).top_k(2).n_groups(4).topk_groups(2).routed_scaling_factor(2.5));
  gate->eval();
  const torch::Tensor x = torch::tensor({{3.0, -5.0, 2.0, 1.9, 1.0, 0.9, -1.0, -1.0}}, kF64);
  auto [idx, score] = gate->forward(x);
  EXPECT_TRUE(torch::equal(idx, torch::tensor({{2, 3}}, torch::kInt64)));
  const torch::Tensor s = torch::sigmoid(torch::tensor({2.0, 1.9}, kF64));
  EXPECT_LT(max_abs_diff(score.view({2}), 2.5 * s / s.sum()), kTol);

  // Without the group limit the best two experts win.
  fnn::SigmoidGate flat = identity_sigmoid_gate(fnn::SigmoidGateOptions(8, 8).top_k(2));
  flat->eval();
  EXPECT_TRUE(torch::equal(std::get<0>(flat->forward(x)), torch::tensor({{0, 2}}, torch::kInt64)));
}

TEST(SigmoidGate, TheBiasSteersSelectionButNotTheWeightsOrGradients) {
  const torch::Tensor x = torch::tensor({{3.0, -5.0, 2.0, 1.9, 1.0, 0.9, -1.0, -1.0}}, kF64);
  auto run = [&](const torch::Tensor& bias) {
    fnn::SigmoidGate gate = identity_sigmoid_gate(fnn::SigmoidGateOptions(8, 8).top_k(2));
    gate->eval();
    assign(gate->expert_bias, bias);
    auto [idx, score] = gate->forward(x);
    (score * torch::tensor({{1.0, -2.0}}, kF64)).sum().backward();
    return std::make_tuple(idx, score, gate->gate->weight.grad().clone());
  };
  const auto [idx, score, grad] = run(torch::zeros({8}));
  // A uniform shift of the bias changes no ranking: everything is identical.
  const auto [idx_shifted, score_shifted, grad_shifted] = run(torch::full({8}, 0.5));
  EXPECT_TRUE(torch::equal(idx, idx_shifted));
  EXPECT_TRUE(torch::equal(score, score_shifted));
  EXPECT_TRUE(torch::equal(grad, grad_shifted));
  // A large bias on expert 7 makes it chosen first; its weight is still its unbiased sigmoid score, and the
  // gradient reaches only the selected experts' rows.
  const auto [idx_steered, score_steered, grad_steered] = run(torch::tensor({0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 10.f}));
  EXPECT_TRUE(torch::equal(idx_steered, torch::tensor({{7, 0}}, torch::kInt64)));
  const torch::Tensor s = torch::sigmoid(torch::tensor({-1.0, 3.0}, kF64));
  EXPECT_LT(max_abs_diff(score_steered.view({2}), s / s.sum()), kTol);
  EXPECT_GT(grad_steered[7].abs().sum().item<double>(), 0.0);
  EXPECT_EQ(grad_steered[2].abs().sum().item<double>(), 0.0);
}

TEST(SigmoidGate, TheBiasUpdatesOnlyInTrainingTowardsTheMeanLoad) {
  const double rate = 0.01;
  fnn::SigmoidGate gate(fnn::SigmoidGateOptions(kDModel, 6).top_k(2).bias_update_rate(rate));
  gate->to(kF64);
  randomize(*gate, 19);
  const torch::Tensor x = tokens(2, 20);

  gate->eval();
  gate->forward(x);
  EXPECT_EQ(gate->expert_bias.abs().sum().item<double>(), 0.0);

  gate->train();
  const torch::Tensor before = gate->expert_bias.clone();
  auto [idx, score] = gate->forward(x);
  const torch::Tensor load = torch::zeros({6}).index_add_(0, idx.reshape(-1), torch::ones({idx.numel()}));
  const torch::Tensor expected = before + torch::sign(20.0 * 2 / 6 - load) * rate;
  EXPECT_TRUE(torch::equal(gate->expert_bias, expected)) << gate->expert_bias << expected;
  EXPECT_GT(gate->expert_bias.abs().sum().item<double>(), 0.0);
  EXPECT_FALSE(gate->expert_bias.requires_grad());
}

// ---------------------------------------------------------------- the layers with each gate

struct GateCase {
  std::string name;
  std::function<fnn::Gate(int64_t d_model, int64_t num_experts)> make;
  std::vector<std::string> gate_parameter_names;
};

void PrintTo(const GateCase& gate_case, std::ostream* os) {
  *os << gate_case.name;
}

std::vector<GateCase> gate_cases() {
  return {
      {"naive",
       [](int64_t d, int64_t e) { return fnn::NaiveGate(fnn::NaiveGateOptions(d, e).top_k(2).z_loss_coef(1e-2)); },
       {"gate.gate.weight", "gate.gate.bias"}},
      {"noisy",
       [](int64_t d, int64_t e) {
         fnn::NoisyGate gate(fnn::NoisyGateOptions(d, e).top_k(2));
         assign(gate->w_gate, torch::randn({d, e}));
         assign(gate->w_noise, torch::randn({d, e}));
         return gate;
       },
       {"gate.w_gate", "gate.w_noise"}},
      {"gshard",
       [](int64_t d, int64_t e) { return fnn::GShardGate(fnn::GShardGateOptions(d, e).capacity_factor_train(0.8)); },
       {"gate.gate.weight", "gate.gate.bias"}},
      {"switch",
       [](int64_t d, int64_t e) { return fnn::SwitchGate(fnn::SwitchGateOptions(d, e).capacity_factor_train(0.8)); },
       {"gate.gate.weight", "gate.gate.bias"}},
      {"swipe",
       [](int64_t d, int64_t e) { return fnn::SwipeGate(fnn::SwipeGateOptions(d, e)); },
       {"gate.gate.weight", "gate.gate.bias"}},
      {"expert_choice",
       [](int64_t d, int64_t e) { return fnn::ExpertChoiceGate(fnn::ExpertChoiceGateOptions(d, e)); },
       {"gate.gate.weight", "gate.gate.bias"}},
      {"sigmoid",
       [](int64_t d, int64_t e) {
         return fnn::SigmoidGate(fnn::SigmoidGateOptions(d, e).top_k(2).n_groups(2).topk_groups(1));
       },
       {"gate.gate.weight"}},
  };
}

class LayerWithGateTest : public ::testing::TestWithParam<GateCase> {};

TEST_P(LayerWithGateTest, TransformerMLPTrainsForwardAndBackward) {
  const GateCase& gate_case = GetParam();
  torch::manual_seed(17);
  const int64_t num_experts = 6, d_model = 8, d_hidden = 12;
  fnn::TransformerMLP moe(
      fnn::TransformerMLPOptions(num_experts, d_model, d_hidden, gate_case.make(d_model, num_experts)));
  EXPECT_EQ(moe->options.top_k(), moe->gate->top_k());
  std::vector<std::string> expected = gate_case.gate_parameter_names;
  for (const char* name : {"experts.htoh4.weight", "experts.htoh4.bias", "experts.h4toh.weight", "experts.h4toh.bias"})
    expected.push_back(name);
  EXPECT_EQ(parameter_names(*moe), expected);

  moe->train();
  const torch::Tensor x = torch::randn({2, 15, d_model}).requires_grad_(true);
  const torch::Tensor y = moe->forward(x);
  ASSERT_EQ(y.sizes(), x.sizes());
  const torch::Tensor balance_loss = moe->loss();
  ASSERT_EQ(balance_loss.dim(), 0);
  EXPECT_TRUE(torch::isfinite(balance_loss).item<bool>());
  (y.pow(2).mean() + balance_loss).backward();
  EXPECT_TRUE(torch::isfinite(x.grad()).all().item<bool>());
  EXPECT_GT(x.grad().abs().sum().item<double>(), 0.0);
  for (const auto& item : moe->named_parameters()) {
    ASSERT_TRUE(item.value().grad().defined()) << item.key();
    EXPECT_TRUE(torch::isfinite(item.value().grad()).all().item<bool>()) << item.key();
    EXPECT_GT(item.value().grad().abs().sum().item<double>(), 0.0) << item.key();
  }
}

TEST_P(LayerWithGateTest, TransformerMLPInEvalCombinesTheGatesChoices) {
  const GateCase& gate_case = GetParam();
  torch::manual_seed(18);
  const int64_t num_experts = 6, d_model = 8, d_hidden = 12;
  fnn::TransformerMLP moe(
      fnn::TransformerMLPOptions(num_experts, d_model, d_hidden, gate_case.make(d_model, num_experts)));
  moe->to(kF64);
  moe->eval();
  const torch::Tensor x = torch::randn({21, d_model}, kF64);
  const torch::Tensor y = moe->forward(x);

  // Eval routing is deterministic: route again, then add each kept slot's score times its expert's output.
  auto [idx, score] = moe->gate->forward(x);
  torch::Tensor y_ref = torch::zeros_like(x);
  for (int64_t e = 0; e < num_experts; ++e) {
    const torch::Tensor h = torch::gelu(torch::addmm(moe->htoh4->bias[e], x, moe->htoh4->weight[e].t()));
    const torch::Tensor out = torch::addmm(moe->h4toh->bias[e], h, moe->h4toh->weight[e].t());
    y_ref = y_ref + (score * (idx == e)).sum(-1, true) * out;
  }
  EXPECT_LT(max_abs_diff(y, y_ref), 1e-10);
}

TEST_P(LayerWithGateTest, MoEWithAnyModuleExpertsReportsTheGatesLoss) {
  const GateCase& gate_case = GetParam();
  torch::manual_seed(19);
  const int64_t num_experts = 4, d_model = 6;
  std::vector<torch::nn::AnyModule> experts;
  for (int64_t e = 0; e < num_experts; ++e) experts.emplace_back(torch::nn::Linear(d_model, d_model));
  fnn::MoE moe(fnn::MoEOptions(num_experts, d_model, gate_case.make(d_model, num_experts)), experts);
  const torch::Tensor y = moe->forward(torch::randn({9, d_model}));
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{9, d_model}));
  EXPECT_TRUE(torch::equal(moe->loss(), moe->gate->loss()));
  (y.sum() + moe->loss()).backward();
}

TEST_P(LayerWithGateTest, ZeroTokensGiveAnEmptyOutputAndAFiniteLoss) {
  const GateCase& gate_case = GetParam();
  for (bool training : {true, false}) {
    fnn::TransformerMLP moe(fnn::TransformerMLPOptions(4, 8, 16, gate_case.make(8, 4)));
    training ? moe->train() : moe->eval();
    const torch::Tensor x = torch::randn({0, 8}).requires_grad_(true);
    const torch::Tensor y = moe->forward(x);
    EXPECT_EQ(y.sizes(), (std::vector<int64_t>{0, 8}));
    EXPECT_TRUE(torch::isfinite(moe->loss()).item<bool>());
    (y.sum() + moe->loss()).backward();
  }
}

INSTANTIATE_TEST_SUITE_P(Gates, LayerWithGateTest, ::testing::ValuesIn(gate_cases()),
                         [](const ::testing::TestParamInfo<GateCase>& info) { return info.param.name; });

TEST(LayerWithGate, DefaultIsTheNaiveGate) {
  fnn::TransformerMLP moe(fnn::TransformerMLPOptions(4, 8, 16).top_k(3));
  EXPECT_NE(moe->gate->as<fnn::NaiveGateImpl>(), nullptr);
  EXPECT_EQ(moe->gate->top_k(), 3);
  EXPECT_EQ(moe->loss().item<double>(), 0.0);
}

// ---------------------------------------------------------------- argument checks

TEST(GateArguments, ConstructorsNameTheArgumentAndTheValue) {
  const std::vector<std::pair<std::function<void()>, std::string>> cases = {
      {[] { fnn::NaiveGate(fnn::NaiveGateOptions(0, 4)); }, "d_model must be >= 1, got 0"},
      {[] { fnn::NaiveGate(fnn::NaiveGateOptions(4, 4).z_loss_coef(-1)); },
       "z_loss_coef must be a finite number >= 0, got -1"},
      {[] { fnn::NoisyGate(fnn::NoisyGateOptions(4, -2)); }, "num_experts must be >= 1, got -2"},
      {[] { fnn::NoisyGate(fnn::NoisyGateOptions(4, 3).top_k(4)); }, "top_k must be in [1, num_experts=3], got 4"},
      {[] { fnn::NoisyGate(fnn::NoisyGateOptions(4, 3).noise_epsilon(0)); },
       "noise_epsilon must be a finite number > 0, got 0"},
      {[] { fnn::NoisyGate(fnn::NoisyGateOptions(4, 3).w_load(-0.5)); },
       "w_load must be a finite number >= 0, got -0.5"},
      {[] { fnn::GShardGate(fnn::GShardGateOptions(4, 3).top_k(3)); }, "top_k must be 2, got 3"},
      {[] { fnn::GShardGate(fnn::GShardGateOptions(4, 3).capacity_factor_train(-1)); },
       "capacity_factor_train must be a finite number > 0, got -1"},
      {[] { fnn::GShardGate(fnn::GShardGateOptions(4, 3).capacity_factor_eval(0)); },
       "capacity_factor_eval must be a finite number > 0, got 0"},
      {[] { fnn::GShardGate(fnn::GShardGateOptions(4, 3).aux_loss_coef(NAN)); },
       "aux_loss_coef must be a finite number >= 0, got nan"},
      {[] { fnn::SwitchGate(fnn::SwitchGateOptions(4, 3).switch_eps(1.5)); }, "switch_eps must be in [0, 1), got 1.5"},
      {[] { fnn::ExpertChoiceGate(fnn::ExpertChoiceGateOptions(4, 3).capacity_factor(0)); },
       "capacity_factor must be a finite number > 0, got 0"},
      {[] { fnn::ExpertChoiceGate(fnn::ExpertChoiceGateOptions(4, 3).max_experts_per_token(4)); },
       "max_experts_per_token must be in [1, num_experts=3], got 4"},
      {[] { fnn::SigmoidGate(fnn::SigmoidGateOptions(4, 8).n_groups(3)); },
       "n_groups must divide num_experts=8, got n_groups=3"},
      {[] { fnn::SigmoidGate(fnn::SigmoidGateOptions(4, 8).n_groups(4).topk_groups(5)); },
       "topk_groups must be in [1, n_groups=4], got 5"},
      {[] { fnn::SigmoidGate(fnn::SigmoidGateOptions(4, 8).n_groups(4).topk_groups(1).top_k(3)); },
       "top_k must be at most topk_groups * experts per group = 2, got top_k=3"},
      {[] { fnn::SigmoidGate(fnn::SigmoidGateOptions(4, 8).routed_scaling_factor(0)); },
       "routed_scaling_factor must be a finite number > 0, got 0"},
      {[] { fnn::SigmoidGate(fnn::SigmoidGateOptions(4, 8).bias_update_rate(-0.5)); },
       "bias_update_rate must be a finite number >= 0, got -0.5"},
  };
  for (const auto& [body, message] : cases) EXPECT_THAT(error_of(body), HasSubstr(message));
}

TEST(GateArguments, ForwardNamesTheInputAndItsValue) {
  fnn::SwitchGate gate(fnn::SwitchGateOptions(4, 3));
  EXPECT_THAT(error_of([&] {
                gate->forward(torch::randn({5, 6}));
              }),
              AllOf(HasSubstr("d_model=4"), HasSubstr("[5, 6]")));
  EXPECT_THAT(error_of([&] {
                gate->forward(torch::ones({5, 4}, torch::kInt64));
              }),
              HasSubstr("x must be a floating-point tensor, got Long"));
  EXPECT_THAT(error_of([&] {
                gate->forward(torch::randn({5, 4}, kF64));
              }),
              HasSubstr("x has dtype Double but the gate's parameters are Float"));
}

TEST(GateArguments, LayersRejectAGateOfOtherSizes) {
  EXPECT_THAT(error_of([] {
                fnn::TransformerMLP(fnn::TransformerMLPOptions(4, 8, 16, fnn::NaiveGate(fnn::NaiveGateOptions(8, 5))));
              }),
              HasSubstr("the gate routes over num_experts=5 but the layer has num_experts=4"));
  EXPECT_THAT(error_of([] {
                std::vector<torch::nn::AnyModule> experts{torch::nn::AnyModule(torch::nn::Linear(8, 8))};
                fnn::MoE(fnn::MoEOptions(1, 8, std::make_shared<fnn::SwitchGateImpl>(fnn::SwitchGateOptions(6, 1))),
                         experts);
              }),
              HasSubstr("the gate takes d_model=6 but the layer has d_model=8"));
}

// A user-written gate whose output has the wrong width is caught by the layer, not by an op.
class WrongWidthGateImpl : public fnn::GateImpl {
 public:
  WrongWidthGateImpl() : GateImpl(4, 3, 2) {}
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) override {
    return {torch::zeros({x.size(0), 1}, torch::kInt64), torch::ones({x.size(0), 1})};
  }
};

TEST(GateArguments, LayersCheckWhatAUserGateReturns) {
  fnn::TransformerMLP moe(fnn::TransformerMLPOptions(3, 4, 8, std::make_shared<WrongWidthGateImpl>()));
  EXPECT_THAT(error_of([&] {
                moe->forward(torch::randn({5, 4}));
              }),
              HasSubstr("the gate returned topk_idx of shape [5, 1], expected [tokens, top_k] = [5, 2]"));
}

}  // namespace
