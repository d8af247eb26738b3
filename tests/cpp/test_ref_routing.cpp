// Tests of csrc/ref/routing_ref: route_topk_ref against a straightforward double implementation written here
// (a stable sort of the logits with NaN first, then softmax), and route_topk_backward_ref against central finite
// differences of the forward and against the softmax Jacobian in double.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "ref/routing_ref.h"
#include "test_util.h"

namespace fastmoe {
namespace test {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr ScoreFn kScoreFns[] = {ScoreFn::kTopkThenSoftmax, ScoreFn::kSoftmaxThenTopk};

struct Routing {
  std::vector<int64_t> idx;   // [num_tokens, k]
  std::vector<double> score;  // [num_tokens, k]
};

// Softmax in double; a NaN anywhere makes every output NaN (as torch.softmax).
std::vector<double> softmax_double(const std::vector<double>& values) {
  double max_value = -HUGE_VAL;
  bool any_nan = false;
  for (double v : values) {
    any_nan = any_nan || std::isnan(v);
    max_value = std::max(max_value, v);
  }
  std::vector<double> out(values.size(), kNaN);
  if (any_nan) return out;
  double total = 0;
  for (size_t i = 0; i < values.size(); ++i) total += (out[i] = std::exp(values[i] - max_value));
  for (double& v : out) v /= total;
  return out;
}

// The experts of one row in selection order: NaN first, then by value descending; the stable sort keeps equal
// values in ascending id order.
std::vector<int64_t> rank_experts(const std::vector<double>& values) {
  std::vector<int64_t> order(values.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const bool a_nan = std::isnan(values[a]), b_nan = std::isnan(values[b]);
    if (a_nan || b_nan) return a_nan && !b_nan;
    return values[a] > values[b];
  });
  return order;
}

Routing route_topk_double(const std::vector<double>& logits, int64_t num_tokens, int64_t num_experts, int64_t k,
                          ScoreFn fn) {
  Routing out{std::vector<int64_t>(num_tokens * k), std::vector<double>(num_tokens * k)};
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::vector<double> row(logits.begin() + t * num_experts, logits.begin() + (t + 1) * num_experts);
    // Both score functions rank the logits; kSoftmaxThenTopk scores the picks by the full-row softmax.
    const std::vector<int64_t> order = rank_experts(row);
    if (fn == ScoreFn::kSoftmaxThenTopk) row = softmax_double(row);
    std::vector<double> selected(k);
    for (int64_t j = 0; j < k; ++j) selected[j] = row[order[j]];
    if (fn == ScoreFn::kTopkThenSoftmax) selected = softmax_double(selected);
    for (int64_t j = 0; j < k; ++j) {
      out.idx[t * k + j] = order[j];
      out.score[t * k + j] = selected[j];
    }
  }
  return out;
}

// Runs the reference on T data; the scores come back as doubles, the raw T scores in *raw_score if given.
template <typename T>
Routing run_route_topk(const std::vector<T>& logits, int64_t num_tokens, int64_t num_experts, int64_t k, ScoreFn fn,
                       std::vector<T>* raw_score = nullptr) {
  std::vector<int64_t> idx(num_tokens * k, -7);
  std::vector<T> score(num_tokens * k, garbage<T>());
  route_topk_ref(dtype_of<T>(), logits.data(), num_tokens, num_experts, k, fn, idx.data(), score.data());
  if (raw_score != nullptr) *raw_score = score;
  return Routing{idx, to_doubles(score)};
}

// A routing score in T against the double value: 16-bit types within 1 ulp of the rounded value (the reference
// computes in fp32 and rounds once); fp32 and fp64 within a few units of their rounding, relative.
template <typename T>
::testing::AssertionResult score_close(double got, double want) {
  if (std::isnan(want) || std::isnan(got)) {
    if (std::isnan(want) && std::isnan(got)) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "got " << got << ", want " << want;
  }
  if constexpr (kIs16Bit<T>) {
    return within_ulps(from_double<T>(got), want, 1);
  } else {
    const double rtol = std::is_same_v<T, double> ? 1e-13 : 2e-6;
    if (std::fabs(got - want) <= rtol * std::fabs(want)) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << std::setprecision(17) << "got " << got << ", want " << want
                                         << ", relative error " << std::fabs(got - want) / std::fabs(want);
  }
}

// Random logits in [-3, 3] with planted ties and NaNs: row 0 all equal, row 1 two pairs of equal values, row 2 one
// NaN, row 3 two NaNs (rows that exist for the given sizes).
std::vector<double> make_logits(int64_t num_tokens, int64_t num_experts, std::mt19937& rng) {
  std::vector<double> logits = random_uniform(num_tokens * num_experts, rng, -3.0, 3.0);
  auto at = [&](int64_t t, int64_t e) -> double& { return logits[t * num_experts + e]; };
  if (num_tokens > 0) std::fill(logits.begin(), logits.begin() + num_experts, 0.75);
  if (num_tokens > 1 && num_experts >= 4) {
    at(1, num_experts - 1) = at(1, 0);
    at(1, 2) = at(1, 1);
  }
  if (num_tokens > 2 && num_experts >= 2) at(2, num_experts / 2) = kNaN;
  if (num_tokens > 3 && num_experts >= 3) {
    at(3, num_experts - 1) = kNaN;
    at(3, 1) = kNaN;
  }
  return logits;
}

std::string case_name(int64_t num_experts, int64_t k, ScoreFn fn) {
  return "E=" + std::to_string(num_experts) + " k=" + std::to_string(k) + " fn=" + score_fn_name(fn);
}

// ---------------------------------------------------------------------------------------------------------------
// Forward.

template <typename T>
class RouteTopkTest : public ::testing::Test {};
TYPED_TEST_SUITE(RouteTopkTest, AllFloatTypes, DTypeNames);

TYPED_TEST(RouteTopkTest, MatchesDoubleReferenceForEveryK) {
  using T = TypeParam;
  std::mt19937 rng(7);
  const int64_t num_tokens = 11;
  for (int64_t num_experts : {1, 2, 5, 8, 16}) {
    // The logits as T sees them: the double reference starts from the same rounded values.
    const std::vector<T> logits = to_type<T>(make_logits(num_tokens, num_experts, rng));
    const std::vector<double> logits_double = to_doubles(logits);
    for (ScoreFn fn : kScoreFns) {
      for (int64_t k = 1; k <= num_experts; ++k) {
        SCOPED_TRACE(case_name(num_experts, k, fn));
        const Routing got = run_route_topk(logits, num_tokens, num_experts, k, fn);
        const Routing want = route_topk_double(logits_double, num_tokens, num_experts, k, fn);
        ASSERT_EQ(got.idx, want.idx);
        for (size_t i = 0; i < want.score.size(); ++i) {
          ASSERT_TRUE(score_close<T>(got.score[i], want.score[i])) << "score[" << i / k << ", " << i % k << "]";
        }
      }
    }
  }
}

TYPED_TEST(RouteTopkTest, TiesGoToTheLowerId) {
  using T = TypeParam;
  const std::vector<T> logits = to_type<T>({1.0, 2.0, 2.0, 0.0, 2.0, -1.0});
  for (ScoreFn fn : kScoreFns) {
    SCOPED_TRACE(score_fn_name(fn));
    const Routing got = run_route_topk(logits, 1, 6, 4, fn);
    EXPECT_EQ(got.idx, (std::vector<int64_t>{1, 2, 4, 0}));
    // Tied experts get bitwise-equal scores.
    EXPECT_EQ(got.score[0], got.score[1]);
    EXPECT_EQ(got.score[1], got.score[2]);
    EXPECT_GT(got.score[2], got.score[3]);
  }
  const std::vector<T> all_equal = to_type<T>(std::vector<double>(5, -0.5));
  const Routing got = run_route_topk(all_equal, 1, 5, 5, ScoreFn::kTopkThenSoftmax);
  EXPECT_EQ(got.idx, (std::vector<int64_t>{0, 1, 2, 3, 4}));
  for (double s : got.score) EXPECT_TRUE(score_close<T>(s, 0.2));
}

TYPED_TEST(RouteTopkTest, NaNRanksAboveEveryNumber) {
  using T = TypeParam;
  const std::vector<T> logits = to_type<T>({1.0, kNaN, 3.0, kNaN, -1.0});
  const Routing topk_first = run_route_topk(logits, 1, 5, 4, ScoreFn::kTopkThenSoftmax);
  EXPECT_EQ(topk_first.idx, (std::vector<int64_t>{1, 3, 2, 0}));
  for (double s : topk_first.score) EXPECT_TRUE(std::isnan(s));
  // Selection ranks the logits for both score functions; a NaN logit makes every probability NaN.
  const Routing softmax_first = run_route_topk(logits, 1, 5, 3, ScoreFn::kSoftmaxThenTopk);
  EXPECT_EQ(softmax_first.idx, (std::vector<int64_t>{1, 3, 2}));
  for (double s : softmax_first.score) EXPECT_TRUE(std::isnan(s));
  // A NaN ranks above a larger number too, and a NaN-free row is unaffected by its neighbour's NaN.
  const std::vector<T> two_rows = to_type<T>({5.0, kNaN, 0.0, 1.0, 2.0, 0.0});
  const Routing rows = run_route_topk(two_rows, 2, 3, 2, ScoreFn::kTopkThenSoftmax);
  EXPECT_EQ(rows.idx, (std::vector<int64_t>{1, 0, 1, 0}));
  EXPECT_FALSE(std::isnan(rows.score[2]));
  EXPECT_FALSE(std::isnan(rows.score[3]));
}

TYPED_TEST(RouteTopkTest, ScoresOfTopkThenSoftmaxSumToOneAndKOneIsExactlyOne) {
  using T = TypeParam;
  std::mt19937 rng(11);
  const int64_t num_tokens = 6, num_experts = 7;
  const std::vector<T> logits = to_type<T>(random_uniform(num_tokens * num_experts, rng, -2.0, 2.0));
  const Routing top1 = run_route_topk(logits, num_tokens, num_experts, 1, ScoreFn::kTopkThenSoftmax);
  for (double s : top1.score) EXPECT_EQ(s, 1.0);
  const Routing top3 = run_route_topk(logits, num_tokens, num_experts, 3, ScoreFn::kTopkThenSoftmax);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const double sum = top3.score[t * 3] + top3.score[t * 3 + 1] + top3.score[t * 3 + 2];
    EXPECT_NEAR(sum, 1.0, 3 * epsilon_of<T>()) << "token " << t;
    EXPECT_GE(top3.score[t * 3], top3.score[t * 3 + 1]);
    EXPECT_GE(top3.score[t * 3 + 1], top3.score[t * 3 + 2]);
  }
}

TYPED_TEST(RouteTopkTest, ZeroTokensWritesNothing) {
  using T = TypeParam;
  int64_t idx = -7;
  T score = garbage<T>(), grad_logits = garbage<T>();
  for (ScoreFn fn : kScoreFns) {
    EXPECT_NO_THROW(route_topk_ref(dtype_of<T>(), nullptr, 0, 4, 2, fn, &idx, &score));
    EXPECT_NO_THROW(route_topk_backward_ref(dtype_of<T>(), nullptr, nullptr, &idx, nullptr, 0, 4, 2, fn, &grad_logits));
  }
  EXPECT_EQ(idx, -7);
  EXPECT_TRUE(is_nan_value(score));
  EXPECT_TRUE(is_nan_value(grad_logits));
}

// ---------------------------------------------------------------------------------------------------------------
// Backward.

// dL/dlogits for L = sum(grad_score * score), in double from the formulas of the softmax Jacobian.
// kTopkThenSoftmax reads the given scores s (the forward's outputs); kSoftmaxThenTopk recomputes p from logits.
std::vector<double> route_backward_double(const std::vector<double>& grad_score, const std::vector<double>& logits,
                                          const std::vector<int64_t>& idx, const std::vector<double>& score,
                                          int64_t num_tokens, int64_t num_experts, int64_t k, ScoreFn fn) {
  std::vector<double> grad(num_tokens * num_experts, 0.0);
  for (int64_t t = 0; t < num_tokens; ++t) {
    double* g_row = grad.data() + t * num_experts;
    if (fn == ScoreFn::kTopkThenSoftmax) {
      // d s_j / d l_i = s_j (delta_ij - s_i) over the selected logits.
      for (int64_t i = 0; i < k; ++i) {
        double sum = 0;
        for (int64_t j = 0; j < k; ++j) {
          const double jacobian = score[t * k + j] * ((i == j ? 1.0 : 0.0) - score[t * k + i]);
          sum += grad_score[t * k + j] * jacobian;
        }
        g_row[idx[t * k + i]] = sum;
      }
    } else {
      const std::vector<double> p =
          softmax_double(std::vector<double>(logits.begin() + t * num_experts, logits.begin() + (t + 1) * num_experts));
      for (int64_t e = 0; e < num_experts; ++e) {
        double sum = 0;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t chosen = idx[t * k + j];
          sum += grad_score[t * k + j] * p[chosen] * ((chosen == e ? 1.0 : 0.0) - p[e]);
        }
        g_row[e] = sum;
      }
    }
  }
  return grad;
}

// Logits whose values are at least 0.2 apart, so a perturbation of 1e-6 never changes the selection.
std::vector<double> spaced_logits(int64_t num_tokens, int64_t num_experts, std::mt19937& rng) {
  std::vector<double> logits(num_tokens * num_experts);
  std::uniform_real_distribution<double> jitter(0.0, 0.1);
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::vector<double> row(num_experts);
    for (int64_t e = 0; e < num_experts; ++e) row[e] = -1.5 + 0.3 * e + jitter(rng);
    std::shuffle(row.begin(), row.end(), rng);
    std::copy(row.begin(), row.end(), logits.begin() + t * num_experts);
  }
  return logits;
}

// Sum of grad_score * score after routing `logits` in fp64; *idx receives the selection.
double route_loss(const std::vector<double>& logits, const std::vector<double>& grad_score, int64_t num_tokens,
                  int64_t num_experts, int64_t k, ScoreFn fn, std::vector<int64_t>* idx) {
  const Routing routing = run_route_topk(logits, num_tokens, num_experts, k, fn);
  *idx = routing.idx;
  double loss = 0;
  for (size_t i = 0; i < grad_score.size(); ++i) loss += grad_score[i] * routing.score[i];
  return loss;
}

TEST(RouteTopkBackwardFp64Test, MatchesCentralFiniteDifferences) {
  std::mt19937 rng(21);
  const int64_t num_tokens = 4, num_experts = 6;
  const double eps = 1e-6;
  for (ScoreFn fn : kScoreFns) {
    for (int64_t k : {1, 2, 4, 6}) {
      SCOPED_TRACE(case_name(num_experts, k, fn));
      std::vector<double> logits = spaced_logits(num_tokens, num_experts, rng);
      const std::vector<double> grad_score = random_uniform(num_tokens * k, rng, -1.0, 1.0);
      std::vector<double> score(num_tokens * k);
      std::vector<int64_t> idx(num_tokens * k);
      route_topk_ref(DType::kFloat64, logits.data(), num_tokens, num_experts, k, fn, idx.data(), score.data());
      std::vector<double> grad_logits(num_tokens * num_experts, kNaN);
      route_topk_backward_ref(DType::kFloat64, grad_score.data(), logits.data(), idx.data(), score.data(), num_tokens,
                              num_experts, k, fn, grad_logits.data());
      for (size_t i = 0; i < logits.size(); ++i) {
        const double saved = logits[i];
        std::vector<int64_t> idx_plus, idx_minus;
        logits[i] = saved + eps;
        const double loss_plus = route_loss(logits, grad_score, num_tokens, num_experts, k, fn, &idx_plus);
        logits[i] = saved - eps;
        const double loss_minus = route_loss(logits, grad_score, num_tokens, num_experts, k, fn, &idx_minus);
        logits[i] = saved;
        ASSERT_EQ(idx_plus, idx);  // the selection is fixed, so the loss is smooth here
        ASSERT_EQ(idx_minus, idx);
        const double numeric = (loss_plus - loss_minus) / (2 * eps);
        EXPECT_NEAR(grad_logits[i], numeric, 1e-8)
            << "grad_logits[" << i / num_experts << ", " << i % num_experts << "]";
      }
    }
  }
}

template <typename T>
class RouteTopkBackwardTest : public ::testing::Test {};
TYPED_TEST_SUITE(RouteTopkBackwardTest, AllFloatTypes, DTypeNames);

TYPED_TEST(RouteTopkBackwardTest, MatchesSoftmaxJacobianInDouble) {
  using T = TypeParam;
  std::mt19937 rng(5);
  const int64_t num_tokens = 9;
  for (int64_t num_experts : {1, 4, 8}) {
    const std::vector<T> logits = to_type<T>(random_uniform(num_tokens * num_experts, rng, -3.0, 3.0));
    for (ScoreFn fn : kScoreFns) {
      for (int64_t k = 1; k <= num_experts; ++k) {
        SCOPED_TRACE(case_name(num_experts, k, fn));
        const std::vector<T> grad_score = to_type<T>(random_uniform(num_tokens * k, rng, -1.0, 1.0));
        std::vector<T> score;
        const Routing routing = run_route_topk(logits, num_tokens, num_experts, k, fn, &score);
        std::vector<T> grad_logits(num_tokens * num_experts, garbage<T>());
        route_topk_backward_ref(dtype_of<T>(), grad_score.data(), logits.data(), routing.idx.data(), score.data(),
                                num_tokens, num_experts, k, fn, grad_logits.data());
        const std::vector<double> want = route_backward_double(to_doubles(grad_score), to_doubles(logits), routing.idx,
                                                               routing.score, num_tokens, num_experts, k, fn);
        // Rounding of the output (relative) plus the fp32 (or fp64) arithmetic on terms of size <= max|g| = 1.
        const double atol = std::is_same_v<T, double> ? 1e-14 : 1e-5;
        for (size_t i = 0; i < want.size(); ++i) {
          const double got = to_double(grad_logits[i]);
          ASSERT_LE(std::fabs(got - want[i]), epsilon_of<T>() * std::fabs(want[i]) + atol)
              << "grad_logits[" << i / num_experts << ", " << i % num_experts << "] = " << got << ", want " << want[i];
        }
      }
    }
  }
}

TYPED_TEST(RouteTopkBackwardTest, UnselectedExpertsGetExactlyZeroUnderTopkThenSoftmax) {
  using T = TypeParam;
  std::mt19937 rng(3);
  const int64_t num_tokens = 5, num_experts = 8, k = 3;
  const std::vector<T> logits = to_type<T>(random_uniform(num_tokens * num_experts, rng, -3.0, 3.0));
  const std::vector<T> grad_score = to_type<T>(random_uniform(num_tokens * k, rng, 0.5, 1.0));
  std::vector<T> score;
  const Routing routing = run_route_topk(logits, num_tokens, num_experts, k, ScoreFn::kTopkThenSoftmax, &score);
  std::vector<T> grad_logits(num_tokens * num_experts, garbage<T>());
  route_topk_backward_ref(dtype_of<T>(), grad_score.data(), logits.data(), routing.idx.data(), score.data(), num_tokens,
                          num_experts, k, ScoreFn::kTopkThenSoftmax, grad_logits.data());
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t e = 0; e < num_experts; ++e) {
      const auto begin = routing.idx.begin() + t * k;
      const bool selected = std::find(begin, begin + k, e) != begin + k;
      const double grad = to_double(grad_logits[t * num_experts + e]);
      if (selected) {
        EXPECT_FALSE(std::isnan(grad)) << "token " << t << " expert " << e;
      } else {
        EXPECT_EQ(grad, 0.0) << "token " << t << " expert " << e;
      }
    }
  }
}

// topk_softmax's gradient comes from the scores: the logits are not read (the ops pass a one-value, sizes-only
// tensor there), so a null pointer gives the same gradient, bit for bit.
TYPED_TEST(RouteTopkBackwardTest, TopkThenSoftmaxDoesNotReadTheLogits) {
  using T = TypeParam;
  std::mt19937 rng(8);
  const int64_t num_tokens = 6, num_experts = 7, k = 3;
  const std::vector<T> logits = to_type<T>(random_uniform(num_tokens * num_experts, rng, -3.0, 3.0));
  const std::vector<T> grad_score = to_type<T>(random_uniform(num_tokens * k, rng, -1.0, 1.0));
  std::vector<T> score;
  const Routing routing = run_route_topk(logits, num_tokens, num_experts, k, ScoreFn::kTopkThenSoftmax, &score);
  std::vector<T> with_logits(num_tokens * num_experts, garbage<T>()), without(with_logits);
  route_topk_backward_ref(dtype_of<T>(), grad_score.data(), logits.data(), routing.idx.data(), score.data(), num_tokens,
                          num_experts, k, ScoreFn::kTopkThenSoftmax, with_logits.data());
  route_topk_backward_ref(dtype_of<T>(), grad_score.data(), nullptr, routing.idx.data(), score.data(), num_tokens,
                          num_experts, k, ScoreFn::kTopkThenSoftmax, without.data());
  for (size_t i = 0; i < with_logits.size(); ++i) {
    EXPECT_EQ(std::memcmp(&with_logits[i], &without[i], sizeof(T)), 0) << "grad_logits[" << i << "]";
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Bad arguments.

TEST(RouteTopkArgsTest, RejectsKOutsideOneToNumExperts) {
  const std::vector<float> logits(8, 0.0f);
  std::vector<int64_t> idx(16);
  std::vector<float> score(16);
  for (int64_t k : {0, 5, -1}) {
    auto call = [&] {
      route_topk_ref(DType::kFloat32, logits.data(), 2, 4, k, ScoreFn::kTopkThenSoftmax, idx.data(), score.data());
    };
    EXPECT_THROW(call(), Error);
    EXPECT_THAT(error_text(call),
                AllOf(HasSubstr("k must be in [1, num_experts=4]"), HasSubstr("got " + std::to_string(k))));
  }
}

TEST(RouteTopkArgsTest, RejectsZeroExpertsAndNegativeTokens) {
  int64_t idx = 0;
  float score = 0, logit = 0;
  auto no_experts = [&] { route_topk_ref(DType::kFloat32, &logit, 1, 0, 1, ScoreFn::kSoftmaxThenTopk, &idx, &score); };
  EXPECT_THROW(no_experts(), Error);
  EXPECT_THAT(error_text(no_experts), HasSubstr("num_experts must be >= 1, got 0"));
  auto negative_tokens = [&] {
    route_topk_ref(DType::kFloat32, &logit, -3, 1, 1, ScoreFn::kSoftmaxThenTopk, &idx, &score);
  };
  EXPECT_THROW(negative_tokens(), Error);
  EXPECT_THAT(error_text(negative_tokens), HasSubstr("num_tokens must be >= 0, got -3"));
}

TEST(RouteTopkArgsTest, BackwardRejectsIdsOutOfRangeAndBadK) {
  const int64_t num_tokens = 3, num_experts = 4, k = 2;
  const std::vector<double> logits(num_tokens * num_experts, 0.0), score(num_tokens * k, 0.5),
      grad_score(num_tokens * k, 1.0);
  std::vector<double> grad_logits(num_tokens * num_experts);
  for (int64_t bad_id : {int64_t{4}, int64_t{-1}, int64_t{100}}) {
    std::vector<int64_t> idx = {0, 1, 2, 3, 1, 0};
    idx[5] = bad_id;  // token 2, slot 1
    auto call = [&] {
      route_topk_backward_ref(DType::kFloat64, grad_score.data(), logits.data(), idx.data(), score.data(), num_tokens,
                              num_experts, k, ScoreFn::kTopkThenSoftmax, grad_logits.data());
    };
    EXPECT_THROW(call(), Error);
    EXPECT_THAT(error_text(call),
                AllOf(HasSubstr("topk_idx[2, 1] = " + std::to_string(bad_id)), HasSubstr("outside [0, 4)")));
  }
  const std::vector<int64_t> idx = {0, 1, 2, 3, 1, 0};
  auto bad_k = [&] {
    route_topk_backward_ref(DType::kFloat64, grad_score.data(), logits.data(), idx.data(), score.data(), num_tokens,
                            num_experts, 0, ScoreFn::kSoftmaxThenTopk, grad_logits.data());
  };
  EXPECT_THROW(bad_k(), Error);
  EXPECT_THAT(error_text(bad_k), HasSubstr("k must be in [1, num_experts=4], got 0"));
}

}  // namespace
}  // namespace test
}  // namespace fastmoe
