// capacity_limit_ref: keeps each expert's highest-scored assignments (NaN last, ties to the lower pair), checked
// against hand-worked cases and an independent model built on std::stable_sort. balance_loss_ref and its
// backward: against the formula evaluated in double, hand-worked uniform and one-expert cases, and central
// differences.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

#include "ref/balance_ref.h"
#include "test_util.h"

namespace fastmoe {
namespace {

using ::testing::HasSubstr;

struct Limited {
  std::vector<int64_t> kept;
  int64_t dropped;
};

Limited run(const std::vector<int64_t>& idx, const std::vector<float>& score, const std::vector<int64_t>& cap) {
  Limited out{std::vector<int64_t>(idx.size()), -7};
  capacity_limit_ref(idx.data(), score.data(), DType::kFloat32, static_cast<int64_t>(idx.size()), cap.data(),
                     static_cast<int64_t>(cap.size()), out.kept.data(), &out.dropped);
  return out;
}

// Independent model: per expert, stable-sort its pairs (in pair order) by score descending with NaN last.
Limited model(const std::vector<int64_t>& idx, const std::vector<float>& score, const std::vector<int64_t>& cap) {
  Limited out{idx, 0};
  for (size_t e = 0; e < cap.size(); ++e) {
    std::vector<size_t> pairs;
    for (size_t p = 0; p < idx.size(); ++p) {
      if (idx[p] == static_cast<int64_t>(e)) pairs.push_back(p);
    }
    std::stable_sort(pairs.begin(), pairs.end(), [&](size_t a, size_t b) {
      const float sa = score[a], sb = score[b];
      if (std::isnan(sa) || std::isnan(sb)) return !std::isnan(sa) && std::isnan(sb);
      return sa > sb;
    });
    for (size_t i = static_cast<size_t>(cap[e]); i < pairs.size(); ++i) {
      out.kept[pairs[i]] = -1;
      ++out.dropped;
    }
  }
  return out;
}

TEST(CapacityLimitRef, KeepsTheHighestScoresWithTiesToTheLowerPair) {
  // Expert 0 holds pairs 0, 2, 3, 5 (scores .1 .9 .5 .9): capacity 2 keeps pairs 2 and 5.
  const Limited out = run({0, 1, 0, 0, 1, 0}, {0.1f, 0.3f, 0.9f, 0.5f, 0.2f, 0.9f}, {2, 1});
  EXPECT_EQ(out.kept, (std::vector<int64_t>{-1, 1, 0, -1, -1, 0}));
  EXPECT_EQ(out.dropped, 3);
}

TEST(CapacityLimitRef, NaNGoesFirstAndDroppedSlotsStayDropped) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const Limited out = run({0, -1, 0, 0}, {nan, 5.0f, -1.0f, 2.0f}, {2});
  EXPECT_EQ(out.kept, (std::vector<int64_t>{-1, -1, 0, 0}));
  EXPECT_EQ(out.dropped, 1);
}

TEST(CapacityLimitRef, NegativeZeroTiesWithPositiveZero) {
  const Limited out = run({0, 0}, {0.0f, -0.0f}, {1});
  EXPECT_EQ(out.kept, (std::vector<int64_t>{0, -1}));
}

TEST(CapacityLimitRef, MatchesAStableSortModelOnRandomRoutings) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t num_pairs = 1 + rng() % 300, num_experts = 1 + rng() % 9;
    std::vector<int64_t> idx(num_pairs), cap(num_experts);
    std::vector<float> score(num_pairs);
    for (auto& id : idx) id = static_cast<int64_t>(rng() % (num_experts + 1)) - 1;
    for (auto& s : score) s = static_cast<float>(rng() % 6) / 4.0f;  // many ties
    for (auto& c : cap) c = rng() % 40;
    const Limited got = run(idx, score, cap), want = model(idx, score, cap);
    ASSERT_EQ(got.kept, want.kept) << "trial " << trial;
    ASSERT_EQ(got.dropped, want.dropped) << "trial " << trial;
  }
}

TEST(CapacityLimitRef, EveryScoreDtypeRanksTheSame) {
  const std::vector<int64_t> idx = {1, 1, 1, 0, 1};
  const std::vector<double> values = {0.25, -1.5, 3.0, 2.0, 0.5};
  const std::vector<int64_t> cap = {0, 2};
  const std::vector<int64_t> want = {-1, -1, 1, -1, 1};
  for (DType dtype : {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16}) {
    std::vector<int64_t> kept(idx.size());
    int64_t dropped = 0;
    FMOE_DISPATCH_FLOAT_TYPES(dtype, "test", [&] {
      std::vector<scalar_t> score;
      for (double v : values) score.push_back(from_acc<scalar_t>(static_cast<acc_t<scalar_t>>(v)));
      capacity_limit_ref(idx.data(), score.data(), dtype, 5, cap.data(), 2, kept.data(), &dropped);
    });
    EXPECT_EQ(kept, want) << dtype_name(dtype);
    EXPECT_EQ(dropped, 3) << dtype_name(dtype);
  }
}

TEST(CapacityLimitRef, RejectsBadIdsAndCapacities) {
  std::vector<int64_t> kept(2);
  int64_t dropped = 0;
  const std::vector<float> score = {1.0f, 2.0f};
  const std::vector<int64_t> bad_id = {0, 3}, ok_id = {0, 1}, cap = {1, 1}, bad_cap = {1, -2};
  EXPECT_THAT(test::error_text([&] {
                capacity_limit_ref(bad_id.data(), score.data(), DType::kFloat32, 2, cap.data(), 2, kept.data(),
                                   &dropped);
              }),
              HasSubstr("expert id 3 at flat position 1"));
  EXPECT_THAT(test::error_text([&] {
                capacity_limit_ref(ok_id.data(), score.data(), DType::kFloat32, 2, bad_cap.data(), 2, kept.data(),
                                   &dropped);
              }),
              HasSubstr("expert_capacity[1] = -2"));
}

// ---------------------------------------------------------------------------------------------------------------
// balance_loss_ref and balance_loss_backward_ref, against the formula evaluated in double from the decoded inputs.

constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16};

DType loss_dtype_of(DType dtype) {
  return dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
}

// The loss and dL/dlogits * g, computed directly in double: p = exp(l - max) / sum, u = g * scale * counts.
struct BalanceExact {
  double loss = 0;
  std::vector<double> grad;
  double u_max = 0;  // max_e |u_e|, the scale of the gradient's rounding error
};

BalanceExact balance_exact(const std::vector<double>& logits, int64_t num_tokens, int64_t num_experts,
                           const std::vector<int64_t>& counts, double scale, double g) {
  BalanceExact out;
  out.grad.resize(logits.size());
  std::vector<double> p(num_experts), u(num_experts);
  for (int64_t e = 0; e < num_experts; ++e) {
    u[e] = g * scale * static_cast<double>(counts[e]);
    out.u_max = std::max(out.u_max, std::fabs(u[e]));
  }
  for (int64_t t = 0; t < num_tokens; ++t) {
    const double* row = logits.data() + t * num_experts;
    const double max_value = *std::max_element(row, row + num_experts);
    double total = 0;
    for (int64_t e = 0; e < num_experts; ++e) total += std::exp(row[e] - max_value);
    double dot = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      p[e] = std::exp(row[e] - max_value) / total;
      out.loss += scale * p[e] * static_cast<double>(counts[e]);
      dot += p[e] * u[e];
    }
    for (int64_t e = 0; e < num_experts; ++e) out.grad[t * num_experts + e] = p[e] * (u[e] - dot);
  }
  return out;
}

// Runs both references on `logits` rounded to scalar_t; the loss comes back as a double, the gradient decoded.
struct BalanceGot {
  double loss = 0;
  std::vector<double> grad;
};

template <typename T>
BalanceGot run_balance(const std::vector<T>& logits, int64_t num_tokens, int64_t num_experts,
                       const std::vector<int64_t>& counts, double scale, double g) {
  using A = acc_t<T>;
  const DType dtype = test::dtype_of<T>();
  BalanceGot out;
  A loss = std::numeric_limits<A>::quiet_NaN();
  balance_loss_ref(dtype, logits.data(), num_tokens, num_experts, counts.data(), scale, loss_dtype_of(dtype), &loss);
  out.loss = static_cast<double>(loss);
  const A grad_loss = static_cast<A>(g);
  std::vector<T> grad(logits.size(), test::garbage<T>());
  balance_loss_backward_ref(dtype, logits.data(), num_tokens, num_experts, counts.data(), scale, loss_dtype_of(dtype),
                            &grad_loss, grad.data());
  out.grad = test::to_doubles(grad);
  return out;
}

TEST(BalanceLossRef, UniformLogitsGiveScaleTimesTokensTimesMeanCount) {
  // With equal logits in a row p = 1/E, so loss = scale * T * sum(counts) / E and, since u_e - <p, u> =
  // g * scale * (counts[e] - mean count), grad[t, e] = g * scale * (counts[e] - mean) / E. E = 4 and these values
  // are dyadic, so every step is exact in every dtype.
  const int64_t num_tokens = 3, num_experts = 4;
  const std::vector<int64_t> counts = {1, 2, 3, 6};
  const double scale = 0.5, g = 2.0;
  std::vector<double> logits;
  for (int64_t t = 0; t < num_tokens; ++t) logits.insert(logits.end(), num_experts, static_cast<double>(t) - 1.5);
  const double count_sum = std::accumulate(counts.begin(), counts.end(), 0.0);
  const double mean = count_sum / num_experts;
  std::vector<double> want_grad;
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t c : counts) want_grad.push_back(g * scale * (static_cast<double>(c) - mean) / num_experts);
  }
  for (DType dtype : kAllDTypes) {
    FMOE_DISPATCH_FLOAT_TYPES(dtype, "test", [&] {
      const BalanceGot got = run_balance(test::to_type<scalar_t>(logits), num_tokens, num_experts, counts, scale, g);
      EXPECT_EQ(got.loss, scale * num_tokens * count_sum / num_experts) << dtype_name(dtype);
      EXPECT_EQ(got.grad, want_grad) << dtype_name(dtype);
    });
  }
}

TEST(BalanceLossRef, MatchesTheFormulaInDoubleForEveryDtype) {
  std::mt19937 rng(29);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t num_tokens = 1 + rng() % 40, num_experts = 1 + rng() % 70;
    std::vector<int64_t> counts(num_experts);
    for (auto& c : counts) c = rng() % 51;
    const double scale = test::random_uniform(1, rng, 1e-3, 1.0)[0];
    const double g = test::random_uniform(1, rng, -2.0, 2.0)[0];
    const std::vector<double> values = test::random_uniform(num_tokens * num_experts, rng, -6.0, 6.0);
    for (DType dtype : kAllDTypes) {
      FMOE_DISPATCH_FLOAT_TYPES(dtype, "test", [&] {
        using A = acc_t<scalar_t>;
        const std::vector<scalar_t> logits = test::to_type<scalar_t>(values);
        const BalanceExact want = balance_exact(test::to_doubles(logits), num_tokens, num_experts, counts, scale,
                                                static_cast<double>(static_cast<A>(g)));
        const BalanceGot got = run_balance(logits, num_tokens, num_experts, counts, scale, g);
        // The loss is a sum of terms of one sign: its relative error is a few roundings of the accumulation type.
        const double loss_tol = std::is_same_v<A, double> ? 1e-13 : 1e-6;
        EXPECT_LE(std::fabs(got.loss - want.loss), loss_tol * std::fabs(want.loss))
            << dtype_name(dtype) << " trial " << trial << ": got " << got.loss << ", want " << want.loss;
        // Each element: the final rounding to the dtype, plus the accumulation type's error in p and <p, u>.
        const double eps_t = test::epsilon_of<scalar_t>(), eps_a = std::numeric_limits<A>::epsilon();
        for (size_t i = 0; i < got.grad.size(); ++i) {
          const double tol = eps_t * std::fabs(want.grad[i]) + 16 * eps_a * want.u_max;
          ASSERT_LE(std::fabs(got.grad[i] - want.grad[i]), tol)
              << dtype_name(dtype) << " trial " << trial << " element " << i << ": got " << got.grad[i] << ", want "
              << want.grad[i];
        }
      });
    }
  }
}

TEST(BalanceLossRef, GradientMatchesCentralDifferencesInFloat64) {
  std::mt19937 rng(41);
  const int64_t num_tokens = 4, num_experts = 37;
  std::vector<int64_t> counts(num_experts);
  for (auto& c : counts) c = rng() % 60;
  const double scale = 0.3, g = -1.5, h = 1e-5;
  std::vector<double> logits = test::random_uniform(num_tokens * num_experts, rng, -3.0, 3.0);
  auto loss_at = [&](const std::vector<double>& x) {
    double loss = std::numeric_limits<double>::quiet_NaN();
    balance_loss_ref(DType::kFloat64, x.data(), num_tokens, num_experts, counts.data(), scale, DType::kFloat64, &loss);
    return loss;
  };
  std::vector<double> grad(logits.size(), std::numeric_limits<double>::quiet_NaN());
  balance_loss_backward_ref(DType::kFloat64, logits.data(), num_tokens, num_experts, counts.data(), scale,
                            DType::kFloat64, &g, grad.data());
  const double u_max = std::fabs(g * scale * static_cast<double>(*std::max_element(counts.begin(), counts.end())));
  for (size_t i = 0; i < logits.size(); ++i) {
    std::vector<double> up = logits, down = logits;
    up[i] += h;
    down[i] -= h;
    const double numeric = g * (loss_at(up) - loss_at(down)) / (2 * h);
    // Truncation O(h^2) plus cancellation O(eps * loss / h): both far below 1e-7 * u_max here.
    EXPECT_NEAR(grad[i], numeric, 1e-7 * u_max) << "element " << i;
  }
}

TEST(BalanceLossRef, OneExpertGivesScaleTimesTokensTimesCountAndZeroGradient) {
  // p = 1 whatever the logit, so loss = scale * T * counts[0] and grad = 1 * (u - 1 * u) = 0 exactly.
  const int64_t num_tokens = 5;
  const std::vector<int64_t> counts = {7};
  const std::vector<double> values = {-1000.0, -2.5, 0.0, 3.0, 1000.0};
  for (DType dtype : kAllDTypes) {
    FMOE_DISPATCH_FLOAT_TYPES(dtype, "test", [&] {
      const BalanceGot got = run_balance(test::to_type<scalar_t>(values), num_tokens, 1, counts, 0.25, 3.0);
      EXPECT_EQ(got.loss, 0.25 * num_tokens * 7) << dtype_name(dtype);
      EXPECT_EQ(got.grad, std::vector<double>(num_tokens, 0.0)) << dtype_name(dtype);
    });
  }
}

TEST(BalanceLossRef, NoTokensGivesPositiveZeroAndWritesNoGradient) {
  const std::vector<int64_t> counts = {4, 1, 0};
  for (DType dtype : kAllDTypes) {
    FMOE_DISPATCH_FLOAT_TYPES(dtype, "test", [&] {
      using A = acc_t<scalar_t>;
      A loss = std::numeric_limits<A>::quiet_NaN();
      balance_loss_ref(dtype, nullptr, 0, 3, counts.data(), -2.0, loss_dtype_of(dtype), &loss);
      EXPECT_EQ(loss, A(0)) << dtype_name(dtype);
      EXPECT_FALSE(std::signbit(loss)) << dtype_name(dtype) << ": a negative scale must not give -0";
      const A grad_loss = 1;
      const scalar_t sentinel = test::garbage<scalar_t>();
      scalar_t grad = sentinel;
      balance_loss_backward_ref(dtype, nullptr, 0, 3, counts.data(), -2.0, loss_dtype_of(dtype), &grad_loss, &grad);
      EXPECT_TRUE(test::same_bits(&grad, &sentinel, 1)) << dtype_name(dtype);
    });
  }
}

TEST(BalanceLossRef, RejectsBadSizesAndALossDtypeOtherThanTheAccumulationType) {
  const std::vector<float> logits = {0.5f, 1.0f};
  const std::vector<double> logits64 = {0.5, 1.0};
  const std::vector<int64_t> counts = {1, 2};
  double loss64 = 0, grad64[2] = {0, 0};
  float loss32 = 0, grad32[2] = {0, 0};
  const double one64 = 1;
  const float one32 = 1;
  using ::testing::AllOf;
  EXPECT_THAT(test::error_text([&] {
                balance_loss_ref(DType::kFloat32, logits.data(), 1, 2, counts.data(), 1.0, DType::kFloat64, &loss64);
              }),
              AllOf(HasSubstr("loss_dtype must be float32"), HasSubstr("got float64")));
  EXPECT_THAT(test::error_text([&] {
                balance_loss_ref(DType::kFloat64, logits64.data(), 1, 2, counts.data(), 1.0, DType::kFloat32, &loss32);
              }),
              AllOf(HasSubstr("loss_dtype must be float64"), HasSubstr("got float32")));
  EXPECT_THAT(test::error_text([&] {
                balance_loss_ref(DType::kBFloat16, logits.data(), 1, 1, counts.data(), 1.0, DType::kBFloat16, &loss32);
              }),
              AllOf(HasSubstr("loss_dtype must be float32"), HasSubstr("got bfloat16")));
  EXPECT_THAT(test::error_text([&] {
                balance_loss_backward_ref(DType::kFloat16, logits.data(), 1, 1, counts.data(), 1.0, DType::kFloat64,
                                          &one64, grad32);
              }),
              AllOf(HasSubstr("loss_dtype must be float32"), HasSubstr("got float64")));
  EXPECT_THAT(test::error_text([&] {
                balance_loss_ref(DType::kFloat32, logits.data(), -3, 2, counts.data(), 1.0, DType::kFloat32, &loss32);
              }),
              HasSubstr("num_tokens must be >= 0, got -3"));
  EXPECT_THAT(test::error_text([&] {
                balance_loss_backward_ref(DType::kFloat64, logits64.data(), 1, 0, counts.data(), 1.0, DType::kFloat64,
                                          &one64, grad64);
              }),
              HasSubstr("num_experts must be >= 1, got 0"));
  EXPECT_THAT(test::error_text([&] {
                balance_loss_backward_ref(DType::kFloat32, logits.data(), 1, -2, counts.data(), 1.0, DType::kFloat32,
                                          &one32, grad32);
              }),
              HasSubstr("num_experts must be >= 1, got -2"));
}

}  // namespace
}  // namespace fastmoe
