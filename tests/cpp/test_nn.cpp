// The fastmoe::nn C++ modules and the C++ op API, against references composed from plain libtorch ops.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>

#include "fastmoe/fastmoe.h"

namespace {

using fastmoe::nn::Activation;
using ::testing::HasSubstr;

// A plain-libtorch MoE: every expert runs on every token; each token sums its top-k outputs weighted by the
// softmax over its k selected logits. No fastmoe op is used.
torch::Tensor reference_moe(const torch::Tensor& x, const torch::Tensor& gate_w, const torch::Tensor& gate_b,
                            int64_t top_k, const std::function<torch::Tensor(int64_t, const torch::Tensor&)>& expert,
                            int64_t num_experts) {
  const torch::Tensor logits = torch::addmm(gate_b, x, gate_w.t());
  auto [values, idx] = torch::topk(logits, top_k, -1);
  const torch::Tensor scores = torch::softmax(values, -1);
  torch::Tensor y;
  for (int64_t e = 0; e < num_experts; ++e) {
    const torch::Tensor weight = (scores * (idx == e)).sum(-1, true);
    const torch::Tensor out = weight * expert(e, x);
    y = y.defined() ? y + out : out;
  }
  return y;
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

class TransformerMLPTest : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, Activation>> {};

TEST_P(TransformerMLPTest, MatchesPlainLibtorchMoEInOutputsAndGradients) {
  const auto [num_experts, top_k, activation] = GetParam();
  torch::manual_seed(7);
  const int64_t d_model = 12, d_hidden = 20;
  fastmoe::nn::TransformerMLP moe(
      fastmoe::nn::TransformerMLPOptions(num_experts, d_model, d_hidden).top_k(top_k).activation(activation));
  moe->to(torch::kFloat64);
  torch::Tensor x = torch::randn({3, 9, d_model}, torch::kFloat64).requires_grad_(true);
  torch::Tensor y = moe->forward(x);
  ASSERT_EQ(y.sizes(), x.sizes());

  // The same parameters, detached and re-leafed, through the plain reference.
  std::vector<torch::Tensor> params;
  for (const auto& p : moe->parameters()) params.push_back(p.detach().clone().requires_grad_(true));
  const auto& gw = params[0];
  const auto& gb = params[1];
  const auto& w1 = params[2];
  const auto& b1 = params[3];
  const auto& w2 = params[4];
  const auto& b2 = params[5];
  torch::Tensor x_ref = x.detach().clone().requires_grad_(true);
  auto expert = [&](int64_t e, const torch::Tensor& t) {
    torch::Tensor h = torch::addmm(b1[e], t, w1[e].t());
    switch (activation) {
      case Activation::kGELU: h = torch::gelu(h); break;
      case Activation::kReLU: h = torch::relu(h); break;
      case Activation::kSiLU: h = torch::silu(h); break;
      case Activation::kSwiGLU: {
        auto halves = h.chunk(2, -1);
        h = torch::silu(halves[0]) * halves[1];
        break;
      }
    }
    return torch::addmm(b2[e], h, w2[e].t());
  };
  torch::Tensor y_ref = reference_moe(x_ref.reshape({-1, d_model}), gw, gb, top_k, expert, num_experts);
  EXPECT_LT(max_abs_diff(y.reshape({-1, d_model}), y_ref), 1e-10);

  const torch::Tensor grad_out = torch::randn_like(y);
  y.backward(grad_out);
  y_ref.backward(grad_out.reshape({-1, d_model}));
  EXPECT_LT(max_abs_diff(x.grad(), x_ref.grad()), 1e-10);
  const auto moe_params = moe->parameters();
  ASSERT_EQ(moe_params.size(), params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_LT(max_abs_diff(moe_params[i].grad(), params[i].grad()), 1e-10) << "parameter " << i;
  }
}

std::string config_name(const ::testing::TestParamInfo<TransformerMLPTest::ParamType>& info) {
  static const char* const names[] = {"gelu", "relu", "silu", "swiglu"};
  return "E" + std::to_string(std::get<0>(info.param)) + "_top" + std::to_string(std::get<1>(info.param)) + "_" +
         names[static_cast<int>(std::get<2>(info.param))];
}

INSTANTIATE_TEST_SUITE_P(Configs, TransformerMLPTest,
                         ::testing::Values(std::make_tuple(1, 1, Activation::kGELU),
                                           std::make_tuple(4, 2, Activation::kGELU),
                                           std::make_tuple(8, 4, Activation::kReLU),
                                           std::make_tuple(3, 3, Activation::kSiLU),
                                           std::make_tuple(16, 2, Activation::kSwiGLU)),
                         config_name);

TEST(TransformerMLP, ParameterNamesMatchThePythonLayer) {
  fastmoe::nn::TransformerMLP moe(fastmoe::nn::TransformerMLPOptions(4, 8, 16));
  std::vector<std::string> names;
  for (const auto& item : moe->named_parameters()) names.push_back(item.key());
  EXPECT_THAT(names, ::testing::ElementsAre("gate.gate.weight", "gate.gate.bias", "experts.htoh4.weight",
                                            "experts.htoh4.bias", "experts.h4toh.weight", "experts.h4toh.bias"));
  EXPECT_EQ(moe->htoh4->weight.sizes(), (std::vector<int64_t>{4, 16, 8}));
  EXPECT_EQ(moe->h4toh->weight.sizes(), (std::vector<int64_t>{4, 8, 16}));
}

TEST(TransformerMLP, ZeroTokensGiveAnEmptyOutputAndZeroGradients) {
  fastmoe::nn::TransformerMLP moe(fastmoe::nn::TransformerMLPOptions(4, 8, 16));
  torch::Tensor x = torch::randn({0, 8}).requires_grad_(true);
  torch::Tensor y = moe->forward(x);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{0, 8}));
  y.sum().backward();
  EXPECT_EQ(moe->htoh4->weight.grad().abs().sum().item<float>(), 0.0f);
}

TEST(TransformerMLP, KeepsTheBalanceRecordOfItsLastForward) {
  torch::manual_seed(3);
  fastmoe::nn::TransformerMLP moe(fastmoe::nn::TransformerMLPOptions(4, 8, 16));
  EXPECT_FALSE(moe->balance_record().expert_counts.defined());
  moe->forward(torch::randn({10, 8}));
  const auto& record = moe->balance_record();
  EXPECT_EQ(record.num_tokens, 10);
  EXPECT_EQ(record.num_slots, 20);  // top-2
  EXPECT_EQ(record.expert_counts.sizes(), (std::vector<int64_t>{4}));
  EXPECT_EQ(record.expert_counts.sum().item<int64_t>(), 20);  // the naive gate drops nothing

  // A gate with a capacity: every slot is either processed or counted as dropped, and the loss is recorded.
  auto gate = fastmoe::nn::SwitchGate(fastmoe::nn::SwitchGateOptions(8, 4).capacity_factor_train(0.5));
  fastmoe::nn::TransformerMLP switched(fastmoe::nn::TransformerMLPOptions(4, 8, 16, gate));
  switched->forward(torch::randn({12, 8}));
  const auto& capped = switched->balance_record();
  ASSERT_TRUE(capped.num_dropped.defined());
  EXPECT_GT(capped.num_dropped.item<int64_t>(), 0);  // 4 experts of capacity ceil(0.5 * 12 / 4) = 2 for 12 tokens
  EXPECT_EQ(capped.expert_counts.sum().item<int64_t>() + capped.num_dropped.item<int64_t>(), 12);
  EXPECT_TRUE(capped.losses.contains("balance"));
}

// One process with a NaiveGate runs as the one op ops::moe_ffn: outputs, the gate's loss terms, the balance record
// and every gradient (the loss terms backpropagated too) equal the composed path's bit for bit.
TEST(TransformerMLP, FusedPathEqualsTheComposedPathBitwise) {
  for (const Activation activation : {Activation::kGELU, Activation::kReLU, Activation::kSiLU, Activation::kSwiGLU}) {
    for (const bool bias : {true, false}) {
      std::vector<std::vector<torch::Tensor>> results;
      std::vector<fastmoe::nn::BalanceRecord> records;
      for (const bool fused : {true, false}) {
        torch::manual_seed(11);
        auto gate = fastmoe::nn::NaiveGate(
            fastmoe::nn::NaiveGateOptions(8, 4).top_k(2).bias(bias).balance_coef(0.01).z_loss_coef(1e-3));
        fastmoe::nn::TransformerMLP moe(
            fastmoe::nn::TransformerMLPOptions(4, 8, 6, gate).activation(activation).bias(bias).fused(fused));
        {
          torch::NoGradGuard no_grad;
          for (auto& p : moe->parameters()) p.add_(torch::randn_like(p) * 0.1);
        }
        const torch::Tensor x = torch::randn({3, 5, 8}, torch::requires_grad());
        const torch::Tensor y = moe->forward(x);
        (y * torch::linspace(-1, 1, y.numel()).reshape(y.sizes())).sum().add(moe->loss()).backward();
        std::vector<torch::Tensor> tensors = {y.detach(), moe->loss().detach(), x.grad()};
        for (const auto& p : moe->parameters()) tensors.push_back(p.grad());
        results.push_back(tensors);
        records.push_back(moe->balance_record());
      }
      ASSERT_EQ(results[0].size(), results[1].size());
      for (size_t i = 0; i < results[0].size(); ++i) {
        ASSERT_TRUE(results[0][i].defined() && results[1][i].defined()) << "tensor " << i;
        EXPECT_TRUE(torch::equal(results[0][i], results[1][i]))
            << "tensor " << i << " differs, activation " << static_cast<int>(activation) << ", bias " << bias;
      }
      EXPECT_TRUE(torch::equal(records[0].expert_counts, records[1].expert_counts));
      EXPECT_EQ(records[0].num_slots, records[1].num_slots);
      EXPECT_EQ(records[0].losses.size(), 2u);  // "balance" and "z"
      EXPECT_EQ(records[1].losses.size(), 2u);
    }
  }
}

// recompute_activation: the one op recomputes the activation in its backward instead of keeping it (here 32 MiB:
// 2048 tokens * top-2 * 2048 fp32 values, past the size it keeps all the same), with the same bits.
TEST(TransformerMLP, RecomputedActivationGivesTheSameBits) {
  for (const Activation activation : {Activation::kGELU, Activation::kSwiGLU}) {
    std::vector<std::vector<torch::Tensor>> results;
    for (const bool recompute : {false, true}) {
      torch::manual_seed(5);
      fastmoe::nn::TransformerMLP moe(
          fastmoe::nn::TransformerMLPOptions(4, 8, 2048).activation(activation).recompute_activation(recompute));
      const torch::Tensor x = torch::randn({2048, 8}, torch::requires_grad());
      const torch::Tensor y = moe->forward(x);
      (y * torch::linspace(-1, 1, y.numel()).reshape(y.sizes())).sum().backward();
      std::vector<torch::Tensor> tensors = {y.detach(), x.grad()};
      for (const auto& p : moe->parameters()) tensors.push_back(p.grad());
      results.push_back(tensors);
    }
    for (size_t i = 0; i < results[0].size(); ++i) {
      ASSERT_TRUE(results[0][i].defined() && results[1][i].defined()) << "tensor " << i;
      EXPECT_TRUE(torch::equal(results[0][i], results[1][i]))
          << "tensor " << i << " differs, activation " << static_cast<int>(activation);
    }
  }
}

// The gate's logits are checked first (as in Python), so a NaN input stops there, naming the gate.
TEST(TransformerMLP, DebugModeStopsANonFiniteInputAtTheGatesLogits) {
  fastmoe::nn::TransformerMLP moe(fastmoe::nn::TransformerMLPOptions(4, 8, 16));
  torch::Tensor x = torch::randn({6, 8});
  x[2][5] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_NO_THROW(moe->forward(x));  // off by default: NaN stays in its token's row
  fastmoe::set_debug(true);
  try {
    moe->forward(x);
    ADD_FAILURE() << "debug mode let a NaN score through";
  } catch (const c10::Error& error) {
    EXPECT_THAT(error.what(), HasSubstr("NaiveGate: gate logits of shape [6, 4]"));
    EXPECT_THAT(error.what(), HasSubstr("4 NaN"));  // token 2's logits for the 4 experts
  }
  fastmoe::set_debug(false);
}

TEST(TransformerMLP, RejectsEpChunksBelowOne) {
  try {
    fastmoe::nn::TransformerMLP moe(fastmoe::nn::TransformerMLPOptions(4, 8, 16).ep_chunks(0));
    ADD_FAILURE() << "ep_chunks=0 was accepted";
  } catch (const c10::Error& error) {
    EXPECT_THAT(error.what(), HasSubstr("ep_chunks"));
  }
}

TEST(MoE, AnyModuleExpertsMatchAPlainLoop) {
  torch::manual_seed(3);
  const int64_t num_experts = 5, d_model = 6;
  std::vector<torch::nn::AnyModule> experts;
  std::vector<torch::nn::Linear> linears;
  for (int64_t e = 0; e < num_experts; ++e) {
    linears.emplace_back(torch::nn::LinearOptions(d_model, 3));
    linears.back()->to(torch::kFloat64);
    experts.emplace_back(linears.back());
  }
  fastmoe::nn::MoE moe(fastmoe::nn::MoEOptions(num_experts, d_model).top_k(2), experts);
  moe->gate->to(torch::kFloat64);
  const torch::Tensor x = torch::randn({17, d_model}, torch::kFloat64);
  const torch::Tensor y = moe->forward(x);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{17, 3}));
  const torch::Tensor y_ref = reference_moe(
      x, moe->gate->gate->weight, moe->gate->gate->bias, 2,
      [&](int64_t e, const torch::Tensor& t) { return linears[e]->forward(t); }, num_experts);
  EXPECT_LT(max_abs_diff(y, y_ref), 1e-12);
  const auto names = moe->named_parameters().keys();
  EXPECT_THAT(names, ::testing::Contains("expert4.weight"));
}

// Expert initialisation (docs/distributed.md, "Initialisation"): one base seed per layer, then one stream per global
// expert, so a rank's experts equal the matching experts of a one-rank layer built from the same seed.
TEST(GroupedLinear, RankHoldsTheMatchingExpertsOfTheOneRankLayer) {
  for (int64_t rank = 0; rank < 3; ++rank) {
    torch::manual_seed(5);
    fastmoe::nn::GroupedLinear part(2, 7, 3, true, rank);
    torch::manual_seed(5);
    fastmoe::nn::GroupedLinear whole(6, 7, 3);
    EXPECT_TRUE(torch::equal(part->weight, whole->weight.slice(0, 2 * rank, 2 * rank + 2))) << "rank " << rank;
    EXPECT_TRUE(torch::equal(part->bias, torch::zeros({2, 3})));
  }
}

TEST(GroupedLinear, RanksSeededAlikeHoldDifferentExperts) {
  torch::manual_seed(5);
  fastmoe::nn::GroupedLinear rank0(2, 7, 3, true, 0);
  torch::manual_seed(5);
  fastmoe::nn::GroupedLinear rank1(2, 7, 3, true, 1);
  const torch::Tensor all = torch::cat({rank0->weight, rank1->weight});
  for (int64_t i = 0; i < 4; ++i) {
    for (int64_t j = i + 1; j < 4; ++j) EXPECT_FALSE(torch::equal(all[i], all[j])) << "experts " << i << ", " << j;
  }
}

TEST(GroupedLinear, MovesTheDefaultGeneratorAlikeWhateverItsExperts) {
  std::vector<torch::Tensor> states;
  for (const auto& [num_experts, rank] : std::vector<std::pair<int64_t, int64_t>>{{1, 0}, {4, 0}, {2, 3}}) {
    torch::manual_seed(9);
    fastmoe::nn::GroupedLinear layer(num_experts, 7, 3, true, rank);
    states.push_back(at::detail::getDefaultCPUGenerator().get_state());
  }
  EXPECT_TRUE(torch::equal(states[1], states[0]));
  EXPECT_TRUE(torch::equal(states[2], states[0]));
}

TEST(GroupedLinear, KeepsTheUniformInitialisationAndRejectsANegativeRank) {
  torch::manual_seed(1);
  fastmoe::nn::GroupedLinear layer(4, 64, 48);
  const double bound = 1.0 / 8.0;
  EXPECT_LE(layer->weight.abs().max().item<double>(), bound);
  for (int64_t e = 0; e < 4; ++e) {
    EXPECT_GT(layer->weight[e].max().item<double>(), 0.99 * bound) << "expert " << e;
    // 3072 draws of U(-b, b): the variance is b^2 / 3 to within 5 standard errors (8%)
    EXPECT_NEAR(layer->weight[e].to(torch::kFloat64).var().item<double>() / (bound * bound / 3), 1.0, 0.08);
  }
  try {
    fastmoe::nn::GroupedLinear bad(2, 4, 4, true, -1);
    FAIL() << "expected an error";
  } catch (const c10::Error& error) {
    EXPECT_THAT(error.what(), HasSubstr("rank must be >= 0, got -1"));
  }
}

TEST(MoE, FactoryExpertsDifferAndMoveTheDefaultGeneratorAlikeWhateverTheirNumber) {
  std::vector<torch::Tensor> states;
  for (int64_t num_experts : {1, 3}) {
    fastmoe::nn::NaiveGate gate(fastmoe::nn::NaiveGateOptions(6, num_experts).top_k(1));
    torch::manual_seed(9);
    int64_t calls = 0;
    fastmoe::nn::MoE moe(fastmoe::nn::MoEOptions(num_experts, 6, gate), [&calls](int64_t d_model) {
      ++calls;
      return torch::nn::AnyModule(torch::nn::Linear(d_model, 4));
    });
    states.push_back(at::detail::getDefaultCPUGenerator().get_state());
    ASSERT_EQ(calls, num_experts);
    ASSERT_EQ(moe->experts.size(), static_cast<size_t>(num_experts));
    for (int64_t i = 0; i < num_experts; ++i) {
      for (int64_t j = i + 1; j < num_experts; ++j) {
        EXPECT_FALSE(torch::equal(moe->experts[i].ptr()->parameters()[0], moe->experts[j].ptr()->parameters()[0]));
      }
    }
    const torch::Tensor y = moe->forward(torch::randn({5, 6}));
    EXPECT_EQ(y.sizes(), (std::vector<int64_t>{5, 4}));
  }
  EXPECT_TRUE(torch::equal(states[1], states[0]));
}

TEST(MoE, RejectsAWrongNumberOfExperts) {
  std::vector<torch::nn::AnyModule> experts{torch::nn::AnyModule(torch::nn::Linear(4, 4))};
  try {
    fastmoe::nn::MoE moe(fastmoe::nn::MoEOptions(2, 4), experts);
    FAIL() << "expected an error";
  } catch (const c10::Error& error) {
    EXPECT_THAT(error.what(), HasSubstr("got 1 expert modules but num_experts=2"));
  }
}

TEST(TransformerMLP, RejectsInputOfTheWrongWidth) {
  fastmoe::nn::TransformerMLP moe(fastmoe::nn::TransformerMLPOptions(4, 8, 16));
  try {
    moe->forward(torch::randn({5, 7}));
    FAIL() << "expected an error";
  } catch (const c10::Error& error) {
    EXPECT_THAT(error.what(), HasSubstr("d_model=8"));
    EXPECT_THAT(error.what(), HasSubstr("[5, 7]"));
  }
}

TEST(NaiveGate, RejectsTopKLargerThanTheExperts) {
  try {
    fastmoe::nn::NaiveGate gate(fastmoe::nn::NaiveGateOptions(8, 4).top_k(5));
    FAIL() << "expected an error";
  } catch (const c10::Error& error) {
    EXPECT_THAT(error.what(), HasSubstr("top_k must be in [1, num_experts=4], got 5"));
  }
}

TEST(Ops, MakePlanOrdersPairsByExpertAndKeepsDroppedSlotsOut) {
  // Tokens 0..2, k = 2; token 1's second slot is dropped.
  const torch::Tensor idx = torch::tensor({2, 0, 1, -1, 2, 1}, torch::kInt64).view({3, 2});
  const fastmoe::ops::Plan plan = fastmoe::ops::make_plan(idx, 3);
  EXPECT_TRUE(torch::equal(plan.expert_counts, torch::tensor({1, 2, 2}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(plan.expert_offsets, torch::tensor({0, 1, 3, 5}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(plan.sorted_pair, torch::tensor({1, 2, 5, 0, 4, -1}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(plan.pair_pos, torch::tensor({3, 0, 1, -1, 4, 2}, torch::kInt64).view({3, 2})));
}

TEST(Ops, MakePlanRejectsAnOutOfRangeExpertId) {
  const torch::Tensor idx = torch::tensor({0, 3}, torch::kInt64).view({1, 2});
  try {
    fastmoe::ops::make_plan(idx, 3);
    FAIL() << "expected an error";
  } catch (const c10::Error& error) {
    EXPECT_THAT(error.what(), HasSubstr("expert id 3"));
  }
}

TEST(Ops, GroupedLinearGradientsReachEveryInput) {
  torch::manual_seed(1);
  const torch::Tensor x = torch::randn({6, 4}, torch::kFloat64).requires_grad_(true);
  const torch::Tensor w = torch::randn({3, 5, 4}, torch::kFloat64).requires_grad_(true);
  const torch::Tensor b = torch::randn({3, 5}, torch::kFloat64).requires_grad_(true);
  const torch::Tensor offsets = torch::tensor({0, 2, 2, 6}, torch::kInt64);
  fastmoe::ops::grouped_linear(x, offsets, w, b).pow(2).sum().backward();
  // Expert 1 has no rows: its gradients are exactly zero; the others are not.
  EXPECT_EQ(w.grad()[1].abs().sum().item<double>(), 0.0);
  EXPECT_EQ(b.grad()[1].abs().sum().item<double>(), 0.0);
  EXPECT_GT(w.grad()[0].abs().sum().item<double>(), 0.0);
  EXPECT_GT(x.grad().abs().sum().item<double>(), 0.0);
  // Against per-expert matmuls.
  const torch::Tensor x2 = x.detach().clone().requires_grad_(true);
  const torch::Tensor w2 = w.detach().clone().requires_grad_(true);
  const torch::Tensor b2 = b.detach().clone().requires_grad_(true);
  torch::Tensor ref = torch::cat(
      {torch::addmm(b2[0], x2.slice(0, 0, 2), w2[0].t()), torch::addmm(b2[2], x2.slice(0, 2, 6), w2[2].t())});
  ref.pow(2).sum().backward();
  EXPECT_LT(max_abs_diff(x.grad(), x2.grad()), 1e-12);
  EXPECT_LT(max_abs_diff(w.grad(), w2.grad()), 1e-12);
  EXPECT_LT(max_abs_diff(b.grad(), b2.grad()), 1e-12);
}

}  // namespace
