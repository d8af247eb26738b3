// The fastmoe::nn gates, thinly: each forward is its registered gate op (fastmoe/ops.h) on the logits its
// parameters give, bitwise with the same seed, and records that op's loss terms and drop count. The ops' formulas
// are tested once, against the papers, in tests/gates/test_gates_formulas.py. Here too: what is C++-specific
// (parameter and buffer names, the fp32 bias under casts, the option checks) and the layers with each gate.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "fastmoe/fastmoe.h"

namespace {

namespace fnn = fastmoe::nn;
namespace fops = fastmoe::ops;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

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

constexpr int64_t kDModel = 6, kExperts = 6, kTokens = 13;

torch::Tensor tokens(uint64_t seed = 1, int64_t num_tokens = kTokens) {
  torch::manual_seed(seed);
  return torch::randn({num_tokens, kDModel}, kF64);
}

// The gate's forward against `op` (the registered op on the gate's logits), both run after seeding with the same
// seed: the routing is bitwise the op's, the recorded losses are the op's 0-dim terms, and num_dropped is the op's
// (undefined where the op returns [0]).
void expect_forward_is_op(fnn::GateImpl& gate, const torch::Tensor& x, const std::function<fops::GateRouting()>& op) {
  torch::manual_seed(5);
  const fops::GateRouting want = op();
  torch::manual_seed(5);
  const auto [idx, score] = gate.forward(x.view({-1, 1, kDModel}));  // [..., d_model] is flattened to tokens
  EXPECT_TRUE(torch::equal(idx, want.topk_idx)) << idx << want.topk_idx;
  EXPECT_TRUE(torch::equal(score, want.topk_score));
  std::vector<std::string> names;
  for (const auto& [name, term] : {std::pair{"balance", want.balance_loss}, std::pair{"z", want.z_loss}}) {
    if (term.dim() != 0) continue;
    names.emplace_back(name);
    ASSERT_NE(gate.losses().find(name), nullptr) << name;
    EXPECT_TRUE(torch::equal(*gate.losses().find(name), term)) << name;
  }
  EXPECT_EQ(gate.losses().keys(), names);
  ASSERT_EQ(gate.num_dropped().defined(), want.num_dropped.dim() == 0);
  if (gate.num_dropped().defined()) EXPECT_TRUE(torch::equal(gate.num_dropped(), want.num_dropped));
  if (!names.empty())
    EXPECT_TRUE(torch::equal(gate.loss().detach(), names.size() == 1 ? gate.losses()[names[0]].detach()
                                                                     : (want.balance_loss + want.z_loss).detach()));
}

class GateForwardTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override { training = GetParam(); }
  template <typename Holder>
  void prepare(Holder& gate, uint64_t seed) {
    gate->to(kF64);
    randomize(*gate, seed);
    training ? gate->train() : gate->eval();
  }
  bool training = true;
  torch::Tensor x = tokens();
};

TEST_P(GateForwardTest, NaiveGate) {
  fnn::NaiveGate gate(fnn::NaiveGateOptions(kDModel, kExperts).top_k(3).z_loss_coef(0.1).balance_coef(0.05));
  prepare(gate, 2);
  expect_forward_is_op(*gate, x, [&] { return fops::naive_gate(gate->gate->forward(x), 3, 0.05, 0.1); });
}

TEST_P(GateForwardTest, NoisyGate) {
  fnn::NoisyGate gate(fnn::NoisyGateOptions(kDModel, kExperts).w_importance(0.4).z_loss_coef(0.1));
  prepare(gate, 3);
  expect_forward_is_op(*gate, x, [&] {
    std::optional<torch::Tensor> noise_logits;
    if (training) noise_logits = x.matmul(gate->w_noise);
    return fops::noisy_gate(x.matmul(gate->w_gate), noise_logits, 2, 1e-2, 0.4, 1.0, 0.1);
  });
}

TEST_P(GateForwardTest, GShardGate) {
  fnn::GShardGate gate(
      fnn::GShardGateOptions(kDModel, kExperts).capacity_factor_train(0.8).capacity_factor_eval(0.6).z_loss_coef(0.1));
  prepare(gate, 8);
  expect_forward_is_op(*gate, x, [&] {
    return fops::gshard_gate(gate->gate->forward(x), training, training ? 0.8 : 0.6, true, 1.0, 0.1);
  });
}

TEST_P(GateForwardTest, SwitchGate) {
  fnn::SwitchGate gate(fnn::SwitchGateOptions(kDModel, kExperts).switch_eps(0.3).capacity_factor_eval(std::nullopt));
  prepare(gate, 12);
  EXPECT_EQ(gate->top_k(), 1);
  expect_forward_is_op(*gate, x, [&] {
    const torch::Tensor router_input = training ? fops::switch_jitter(x, 0.3) : x;
    return fops::switch_gate(gate->gate->forward(router_input), training ? std::optional<double>(1.2) : std::nullopt,
                             1e-2, 0.0);
  });
}

TEST_P(GateForwardTest, SwipeGate) {
  fnn::SwipeGate gate(fnn::SwipeGateOptions(kDModel, kExperts).z_loss_coef(0.2));
  prepare(gate, 14);
  expect_forward_is_op(*gate, x, [&] { return fops::swipe_gate(gate->gate->forward(x), 2, training, 0.2); });
}

TEST_P(GateForwardTest, ExpertChoiceGate) {
  fnn::ExpertChoiceGate gate(
      fnn::ExpertChoiceGateOptions(kDModel, kExperts).capacity_factor(1.5).max_experts_per_token(2));
  prepare(gate, 16);
  EXPECT_EQ(gate->slots_per_token(), 2);
  expect_forward_is_op(*gate, x, [&] { return fops::expert_choice_gate(gate->gate->forward(x), 2, 1.5, 2, 0.0); });
}

TEST_P(GateForwardTest, SigmoidGateAddsTheOpsBiasUpdateInTraining) {
  fnn::SigmoidGate gate(
      fnn::SigmoidGateOptions(kDModel, kExperts).n_groups(3).topk_groups(2).aux_loss_coef(0.2).bias_update_rate(0.01));
  prepare(gate, 17);
  assign(gate->expert_bias, torch::linspace(-0.2, 0.3, kExperts));
  const torch::Tensor before = gate->expert_bias.clone();
  fops::GateRouting want;
  expect_forward_is_op(*gate, x, [&] {
    want = fops::sigmoid_gate(gate->gate->forward(x), before, 2, 3, 2, true, 1.0, 0.2, training, 0.01);
    return want;
  });
  const torch::Tensor expected = training ? before + want.expert_bias_update : before;
  EXPECT_TRUE(torch::equal(gate->expert_bias, expected)) << gate->expert_bias << expected;
  EXPECT_EQ(training, !torch::equal(gate->expert_bias, before));
  EXPECT_FALSE(gate->expert_bias.requires_grad());
}

INSTANTIATE_TEST_SUITE_P(Modes, GateForwardTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "train" : "eval"; });

// ---------------------------------------------------------------- names and buffers

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

TEST(NoisyGate, HasTheFastMoEParameterNames) {
  fnn::NoisyGate gate(fnn::NoisyGateOptions(kDModel, 5));
  EXPECT_THAT(parameter_names(*gate), ElementsAre("w_gate", "w_noise"));
  EXPECT_EQ(gate->w_gate.sizes(), (std::vector<int64_t>{kDModel, 5}));
  EXPECT_TRUE(gate->gate.is_empty());
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

// Debug mode checks each gate's logits before its op, naming the gate, as the Python gates do; off, the NaN routes.
TEST_P(LayerWithGateTest, DebugModeNamesTheGateAndTheNonFiniteLogits) {
  const GateCase& gate_case = GetParam();
  torch::manual_seed(23);
  fnn::Gate gate = gate_case.make(4, 6);
  torch::Tensor x = torch::randn({5, 4});
  x[3][1] = std::numeric_limits<float>::infinity();
  EXPECT_NO_THROW(gate->forward(x));
  fastmoe::set_debug(true);
  const std::string message = error_of([&] { gate->forward(x); });
  fastmoe::set_debug(false);
  EXPECT_THAT(message, AllOf(HasSubstr("Gate: gate logits of shape [5, 6]"), HasSubstr("first at index [3, "),
                             HasSubstr("fastmoe debug mode is on")));
}

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
       "z_loss_coef must be a finite number >= 0, got -1.0"},
      {[] { fnn::NaiveGate(fnn::NaiveGateOptions(4, 4).balance_coef(-0.5)); },
       "balance_coef must be a finite number >= 0, got -0.5"},
      {[] { fnn::NoisyGate(fnn::NoisyGateOptions(4, -2)); }, "num_experts must be >= 1, got -2"},
      {[] { fnn::NoisyGate(fnn::NoisyGateOptions(4, 3).top_k(4)); }, "top_k must be in [1, num_experts=3], got 4"},
      {[] { fnn::NoisyGate(fnn::NoisyGateOptions(4, 3).noise_epsilon(0)); },
       "noise_epsilon must be a finite number > 0, got 0.0"},
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
       "capacity_factor must be a finite number > 0, got 0.0"},
      {[] { fnn::ExpertChoiceGate(fnn::ExpertChoiceGateOptions(4, 3).max_experts_per_token(4)); },
       "max_experts_per_token must be in [1, num_experts=3], got 4"},
      {[] { fnn::SigmoidGate(fnn::SigmoidGateOptions(4, 8).n_groups(3)); },
       "n_groups must divide num_experts=8, got n_groups=3"},
      {[] { fnn::SigmoidGate(fnn::SigmoidGateOptions(4, 8).n_groups(4).topk_groups(5)); },
       "topk_groups must be in [1, n_groups=4], got 5"},
      {[] { fnn::SigmoidGate(fnn::SigmoidGateOptions(4, 8).n_groups(4).topk_groups(1).top_k(3)); },
       "top_k must be at most topk_groups * experts per group = 2, got top_k=3"},
      {[] { fnn::SigmoidGate(fnn::SigmoidGateOptions(4, 8).routed_scaling_factor(0)); },
       "routed_scaling_factor must be a finite number > 0, got 0.0"},
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
