// Tests of csrc/ref/dispatch_ref: the properties of the routing plan, permute / unpermute_combine as data
// movement (bitwise) and as math (against double), and combine_score_grad against a double dot product.
// Row widths are d = 13 (not a multiple of 8) throughout.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ref/dispatch_ref.h"
#include "test_util.h"

namespace fastmoe {
namespace test {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr int64_t kSentinel = -7777;  // pre-fills plan outputs so that an unwritten entry shows up
constexpr int64_t kWidth = 13;

struct Plan {
  std::vector<int64_t> counts;       // [E]
  std::vector<int64_t> offsets;      // [E + 1]
  std::vector<int64_t> sorted_pair;  // [num_pairs]
  std::vector<int64_t> pair_pos;     // [num_pairs]
};

Plan make_plan(const std::vector<int64_t>& topk_idx, int64_t num_experts) {
  const int64_t num_pairs = static_cast<int64_t>(topk_idx.size());
  Plan plan{std::vector<int64_t>(num_experts, kSentinel), std::vector<int64_t>(num_experts + 1, kSentinel),
            std::vector<int64_t>(num_pairs, kSentinel), std::vector<int64_t>(num_pairs, kSentinel)};
  make_plan_ref(topk_idx.data(), num_pairs, num_experts, plan.counts.data(), plan.offsets.data(),
                plan.sorted_pair.data(), plan.pair_pos.data());
  return plan;
}

// Each token picks k experts (distinct ones when `distinct`, which needs k <= E); each slot is then dropped (-1)
// with probability drop_prob.
std::vector<int64_t> random_routing(int64_t num_tokens, int64_t k, int64_t num_experts, double drop_prob, bool distinct,
                                    std::mt19937& rng) {
  std::vector<int64_t> topk_idx(num_tokens * k);
  std::vector<int64_t> experts(num_experts);
  std::iota(experts.begin(), experts.end(), 0);
  std::uniform_int_distribution<int64_t> any_expert(0, num_experts - 1);
  std::bernoulli_distribution drop(drop_prob);
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (distinct) std::shuffle(experts.begin(), experts.end(), rng);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t expert = distinct ? experts[j] : any_expert(rng);
      topk_idx[t * k + j] = drop(rng) ? -1 : expert;
    }
  }
  return topk_idx;
}

// Every documented property of a plan, checked from scratch; the message names the first violation.
::testing::AssertionResult plan_is_valid(const std::vector<int64_t>& topk_idx, int64_t num_experts, const Plan& plan) {
  const int64_t num_pairs = static_cast<int64_t>(topk_idx.size());
  std::vector<int64_t> histogram(num_experts, 0);
  int64_t num_routed = 0;
  for (int64_t id : topk_idx) {
    if (id >= 0) {
      ++histogram[id];
      ++num_routed;
    }
  }
  for (int64_t e = 0; e < num_experts; ++e) {
    if (plan.counts[e] != histogram[e]) {
      return ::testing::AssertionFailure()
             << "counts[" << e << "] = " << plan.counts[e] << ", histogram " << histogram[e];
    }
  }
  if (plan.offsets[0] != 0) return ::testing::AssertionFailure() << "offsets[0] = " << plan.offsets[0];
  for (int64_t e = 0; e < num_experts; ++e) {
    if (plan.offsets[e + 1] != plan.offsets[e] + histogram[e]) {
      return ::testing::AssertionFailure() << "offsets[" << e + 1 << "] = " << plan.offsets[e + 1]
                                           << " is not the exclusive scan " << plan.offsets[e] + histogram[e];
    }
  }
  if (plan.offsets[num_experts] != num_routed) {
    return ::testing::AssertionFailure() << "offsets[E] = " << plan.offsets[num_experts] << ", routed pairs "
                                         << num_routed;
  }
  std::vector<bool> seen(num_pairs, false);
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t r = plan.offsets[e]; r < plan.offsets[e + 1]; ++r) {
      const int64_t pair = plan.sorted_pair[r];
      if (pair < 0 || pair >= num_pairs) {
        return ::testing::AssertionFailure() << "sorted_pair[" << r << "] = " << pair << " is not a pair id";
      }
      if (topk_idx[pair] != e) {
        return ::testing::AssertionFailure() << "sorted_pair[" << r << "] = pair " << pair << " of expert "
                                             << topk_idx[pair] << " sits in the rows of expert " << e;
      }
      if (seen[pair]) return ::testing::AssertionFailure() << "pair " << pair << " appears twice";
      seen[pair] = true;
      if (r > plan.offsets[e] && plan.sorted_pair[r - 1] >= pair) {
        return ::testing::AssertionFailure() << "not stable: sorted_pair[" << r - 1 << "] = " << plan.sorted_pair[r - 1]
                                             << " before sorted_pair[" << r << "] = " << pair << " inside expert " << e;
      }
    }
  }
  for (int64_t r = num_routed; r < num_pairs; ++r) {
    if (plan.sorted_pair[r] != -1) {
      return ::testing::AssertionFailure() << "tail sorted_pair[" << r << "] = " << plan.sorted_pair[r] << ", want -1";
    }
  }
  for (int64_t p = 0; p < num_pairs; ++p) {
    if (topk_idx[p] < 0) {
      if (plan.pair_pos[p] != -1) {
        return ::testing::AssertionFailure() << "dropped pair " << p << " has pair_pos " << plan.pair_pos[p];
      }
    } else if (plan.pair_pos[p] < 0 || plan.pair_pos[p] >= num_routed || plan.sorted_pair[plan.pair_pos[p]] != p) {
      return ::testing::AssertionFailure()
             << "pair_pos[" << p << "] = " << plan.pair_pos[p] << " is not the inverse of sorted_pair";
    }
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------------------------
// make_plan_ref.

TEST(MakePlanTest, RandomRoutingsWithDroppedSlots) {
  std::mt19937 rng(17);
  struct Shape {
    int64_t num_tokens, k, num_experts;
  };
  for (const Shape& s :
       {Shape{1, 1, 1}, Shape{7, 2, 4}, Shape{33, 3, 8}, Shape{100, 2, 16}, Shape{64, 4, 5}, Shape{50, 6, 3}}) {
    for (double drop_prob : {0.0, 0.25, 0.9}) {
      for (bool distinct : {true, false}) {
        if (distinct && s.k > s.num_experts) continue;
        SCOPED_TRACE("T=" + std::to_string(s.num_tokens) + " k=" + std::to_string(s.k) +
                     " E=" + std::to_string(s.num_experts) + " drop=" + std::to_string(drop_prob) +
                     (distinct ? " distinct" : " repeats"));
        const std::vector<int64_t> topk_idx =
            random_routing(s.num_tokens, s.k, s.num_experts, drop_prob, distinct, rng);
        EXPECT_TRUE(plan_is_valid(topk_idx, s.num_experts, make_plan(topk_idx, s.num_experts)));
      }
    }
  }
}

TEST(MakePlanTest, ZeroPairs) {
  const Plan plan = make_plan({}, 3);
  EXPECT_EQ(plan.counts, (std::vector<int64_t>{0, 0, 0}));
  EXPECT_EQ(plan.offsets, (std::vector<int64_t>{0, 0, 0, 0}));
}

TEST(MakePlanTest, AllPairsToOneExpert) {
  const std::vector<int64_t> topk_idx(10, 2);
  const Plan plan = make_plan(topk_idx, 4);
  EXPECT_EQ(plan.counts, (std::vector<int64_t>{0, 0, 10, 0}));
  EXPECT_EQ(plan.offsets, (std::vector<int64_t>{0, 0, 0, 10, 10}));
  std::vector<int64_t> identity(10);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(plan.sorted_pair, identity);
  EXPECT_EQ(plan.pair_pos, identity);
}

TEST(MakePlanTest, AllPairsDropped) {
  const std::vector<int64_t> topk_idx(6, -1);
  const Plan plan = make_plan(topk_idx, 3);
  EXPECT_EQ(plan.counts, (std::vector<int64_t>{0, 0, 0}));
  EXPECT_EQ(plan.offsets, (std::vector<int64_t>{0, 0, 0, 0}));
  EXPECT_EQ(plan.sorted_pair, std::vector<int64_t>(6, -1));
  EXPECT_EQ(plan.pair_pos, std::vector<int64_t>(6, -1));
}

TEST(MakePlanTest, KEqualsNumExperts) {
  std::mt19937 rng(2);
  const int64_t num_tokens = 9, num_experts = 5, k = 5;
  const std::vector<int64_t> topk_idx = random_routing(num_tokens, k, num_experts, 0.0, true, rng);
  const Plan plan = make_plan(topk_idx, num_experts);
  EXPECT_TRUE(plan_is_valid(topk_idx, num_experts, plan));
  EXPECT_EQ(plan.counts, std::vector<int64_t>(num_experts, num_tokens));
  // Every token reaches every expert once, so expert e's rows are the tokens in order.
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t t = 0; t < num_tokens; ++t) {
      const int64_t pair = plan.sorted_pair[e * num_tokens + t];
      EXPECT_EQ(pair / k, t);
      EXPECT_EQ(topk_idx[pair], e);
    }
  }
}

TEST(MakePlanTest, RejectsIdsOutsideMinusOneToNumExperts) {
  std::vector<int64_t> topk_idx = {0, 1, -1, 3, 2, 1, 0, 0};
  std::vector<int64_t> counts(4), offsets(5), sorted_pair(8), pair_pos(8);
  for (const std::pair<int64_t, int64_t>& bad : {std::pair<int64_t, int64_t>{5, -2}, {3, 4}, {7, 1000}}) {
    std::vector<int64_t> ids = topk_idx;
    ids[bad.first] = bad.second;
    auto call = [&] {
      make_plan_ref(ids.data(), 8, 4, counts.data(), offsets.data(), sorted_pair.data(), pair_pos.data());
    };
    EXPECT_THROW(call(), Error);
    EXPECT_THAT(error_text(call),
                AllOf(HasSubstr("expert id " + std::to_string(bad.second)),
                      HasSubstr("at flat position " + std::to_string(bad.first)), HasSubstr("num_experts=4")));
  }
  auto no_experts = [&] {
    make_plan_ref(topk_idx.data(), 8, 0, counts.data(), offsets.data(), sorted_pair.data(), pair_pos.data());
  };
  EXPECT_THROW(no_experts(), Error);
  EXPECT_THAT(error_text(no_experts), HasSubstr("num_experts must be >= 1, got 0"));
  auto negative_pairs = [&] {
    make_plan_ref(topk_idx.data(), -1, 4, counts.data(), offsets.data(), sorted_pair.data(), pair_pos.data());
  };
  EXPECT_THROW(negative_pairs(), Error);
  EXPECT_THAT(error_text(negative_pairs), HasSubstr("num_pairs must be >= 0, got -1"));
}

// ---------------------------------------------------------------------------------------------------------------
// permute_ref / unpermute_combine_ref / combine_score_grad_ref on one dtype.

// A quiet NaN with payload bits, which a copy keeps and arithmetic need not.
template <typename T>
T nan_with_payload() {
  if constexpr (std::is_same_v<T, double>) {
    const uint64_t bits = 0x7ff800000000beefull;
    double value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
  } else if constexpr (std::is_same_v<T, float>) {
    const uint32_t bits = 0x7fc0beefu;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
  } else {
    return T{static_cast<uint16_t>(HalfFormat<T>::kQuietNaNBits | 0x5u)};
  }
}

// A routing and its plan, with num_rows = num_pairs so that the -1 tail of sorted_pair is part of the rows.
struct Dispatch {
  int64_t num_tokens, k, num_experts, num_rows;
  std::vector<int64_t> topk_idx;
  Plan plan;
};

Dispatch make_dispatch(int64_t num_tokens, int64_t k, int64_t num_experts, double drop_prob, std::mt19937& rng) {
  Dispatch out{num_tokens,
               k,
               num_experts,
               num_tokens * k,
               random_routing(num_tokens, k, num_experts, drop_prob,
                              /*distinct=*/true, rng),
               Plan{}};
  out.plan = make_plan(out.topk_idx, num_experts);
  return out;
}

template <typename T>
std::vector<T> permute(const Dispatch& dispatch, const std::vector<T>& x, const void* pair_scale = nullptr,
                       DType scale_dtype = dtype_of<T>()) {
  std::vector<T> x_sorted(dispatch.num_rows * kWidth, garbage<T>());
  permute_ref(dtype_of<T>(), x.data(), dispatch.num_tokens, kWidth, dispatch.plan.sorted_pair.data(), dispatch.num_rows,
              dispatch.k, pair_scale, scale_dtype, x_sorted.data());
  return x_sorted;
}

template <typename T>
std::vector<T> unpermute_combine(const Dispatch& dispatch, const std::vector<T>& y_sorted,
                                 const void* topk_score = nullptr, DType score_dtype = dtype_of<T>()) {
  std::vector<T> y(dispatch.num_tokens * kWidth, garbage<T>());
  unpermute_combine_ref(dtype_of<T>(), y_sorted.data(), dispatch.num_rows, kWidth, dispatch.plan.pair_pos.data(),
                        dispatch.num_tokens, dispatch.k, topk_score, score_dtype, y.data());
  return y;
}

// y_sorted with its unreferenced tail rows set to NaN, to show that nothing reads them.
template <typename T>
std::vector<T> poison_tail_rows(const Dispatch& dispatch, std::vector<T> y_sorted) {
  const int64_t num_routed = dispatch.plan.offsets[dispatch.num_experts];
  std::fill(y_sorted.begin() + num_routed * kWidth, y_sorted.end(), garbage<T>());
  return y_sorted;
}

// Double references.
std::vector<double> permute_double(const Dispatch& dispatch, const std::vector<double>& x,
                                   const std::vector<double>* pair_scale) {
  std::vector<double> out(dispatch.num_rows * kWidth, 0.0);
  for (int64_t r = 0; r < dispatch.num_rows; ++r) {
    const int64_t pair = dispatch.plan.sorted_pair[r];
    if (pair < 0) continue;
    const double scale = pair_scale != nullptr ? (*pair_scale)[pair] : 1.0;
    for (int64_t c = 0; c < kWidth; ++c) out[r * kWidth + c] = scale * x[(pair / dispatch.k) * kWidth + c];
  }
  return out;
}

// y[t] = sum_j score[t, j] * y_sorted[pair_pos[t, j]] over kept slots; *abs_sum gets sum_j |each term|.
std::vector<double> unpermute_combine_double(const Dispatch& dispatch, const std::vector<double>& y_sorted,
                                             const std::vector<double>* score, std::vector<double>* abs_sum = nullptr) {
  std::vector<double> y(dispatch.num_tokens * kWidth, 0.0), magnitude(y.size(), 0.0);
  for (int64_t t = 0; t < dispatch.num_tokens; ++t) {
    for (int64_t j = 0; j < dispatch.k; ++j) {
      const int64_t pos = dispatch.plan.pair_pos[t * dispatch.k + j];
      if (pos < 0) continue;
      const double weight = score != nullptr ? (*score)[t * dispatch.k + j] : 1.0;
      for (int64_t c = 0; c < kWidth; ++c) {
        const double term = weight * y_sorted[pos * kWidth + c];
        y[t * kWidth + c] += term;
        magnitude[t * kWidth + c] += std::fabs(term);
      }
    }
  }
  if (abs_sum != nullptr) *abs_sum = magnitude;
  return y;
}

// grad_score[t, j] = <grad_y[t], y_sorted[pair_pos[t, j]]>, 0 when dropped; *abs_sum gets sum_c |each term|.
std::vector<double> combine_score_grad_double(const Dispatch& dispatch, const std::vector<double>& grad_y,
                                              const std::vector<double>& y_sorted,
                                              std::vector<double>* abs_sum = nullptr) {
  std::vector<double> grad(dispatch.num_tokens * dispatch.k, 0.0), magnitude(grad.size(), 0.0);
  for (int64_t p = 0; p < dispatch.num_tokens * dispatch.k; ++p) {
    const int64_t pos = dispatch.plan.pair_pos[p];
    if (pos < 0) continue;
    for (int64_t c = 0; c < kWidth; ++c) {
      const double term = grad_y[(p / dispatch.k) * kWidth + c] * y_sorted[pos * kWidth + c];
      grad[p] += term;
      magnitude[p] += std::fabs(term);
    }
  }
  if (abs_sum != nullptr) *abs_sum = magnitude;
  return grad;
}

// The ulps allowed for an output of type T whose exact value is computed without error in the accumulation type
// and rounded once: none for fp32 / fp64, one for the 16-bit types (the tolerance of the numerics policy).
template <typename T>
constexpr uint64_t kRoundedOnceUlps = kIs16Bit<T> ? 1 : 0;

template <typename T>
class DispatchTest : public ::testing::Test {};
TYPED_TEST_SUITE(DispatchTest, AllFloatTypes, DTypeNames);

TYPED_TEST(DispatchTest, PermuteWithoutScaleIsABitwiseCopyAndDroppedRowsAreZero) {
  using T = TypeParam;
  std::mt19937 rng(31);
  const Dispatch dispatch = make_dispatch(21, 3, 6, 0.3, rng);
  std::vector<T> x = to_type<T>(random_uniform(dispatch.num_tokens * kWidth, rng, -4.0, 4.0));
  // Values that arithmetic would not carry through unchanged: -0 and a NaN with a payload.
  x[0] = from_double<T>(-0.0);
  x[kWidth + 1] = nan_with_payload<T>();
  const std::vector<T> x_sorted = permute(dispatch, x);
  int64_t zero_rows = 0;
  for (int64_t r = 0; r < dispatch.num_rows; ++r) {
    const int64_t pair = dispatch.plan.sorted_pair[r];
    if (pair >= 0) {
      ASSERT_TRUE(same_bits(&x_sorted[r * kWidth], &x[(pair / dispatch.k) * kWidth], kWidth)) << "row " << r;
    } else {
      ++zero_rows;
      for (int64_t c = 0; c < kWidth; ++c) ASSERT_EQ(to_double(x_sorted[r * kWidth + c]), 0.0) << "row " << r;
    }
  }
  EXPECT_GT(zero_rows, 0);  // the case exercises the -1 tail
}

TYPED_TEST(DispatchTest, PermuteThenUnpermuteWithTopOneIsTheIdentity) {
  using T = TypeParam;
  std::mt19937 rng(37);
  for (int64_t num_experts : {1, 4, 9}) {
    const Dispatch dispatch = make_dispatch(40, 1, num_experts, 0.0, rng);
    const std::vector<T> x = to_type<T>(random_uniform(dispatch.num_tokens * kWidth, rng, -100.0, 100.0));
    const std::vector<T> y = unpermute_combine(dispatch, permute(dispatch, x));
    EXPECT_TRUE(same_bits(y.data(), x.data(), x.size())) << "E=" << num_experts;
  }
}

// Unpermute without weights is data movement, so it must be bitwise (docs/numerics.md) for every value,
// including -0.
TYPED_TEST(DispatchTest, PermuteThenUnpermuteWithTopOneKeepsNegativeZero) {
  using T = TypeParam;
  std::mt19937 rng(41);
  const Dispatch dispatch = make_dispatch(4, 1, 3, 0.0, rng);
  std::vector<T> x = to_type<T>(random_uniform(dispatch.num_tokens * kWidth, rng, -1.0, 1.0));
  for (int64_t i = 0; i < static_cast<int64_t>(x.size()); i += 3) x[i] = from_double<T>(-0.0);
  const std::vector<T> y = unpermute_combine(dispatch, permute(dispatch, x));
  EXPECT_TRUE(same_bits(y.data(), x.data(), x.size()));
}

TYPED_TEST(DispatchTest, UnpermuteWithoutScoresSumsTheKeptSlots) {
  using T = TypeParam;
  std::mt19937 rng(43);
  const Dispatch dispatch = make_dispatch(30, 3, 5, 0.4, rng);
  const std::vector<double> x = to_doubles(to_type<T>(random_dyadic(dispatch.num_tokens * kWidth, rng, -16, 16, 2)));
  const std::vector<T> y_sorted = poison_tail_rows(dispatch, permute(dispatch, to_type<T>(x)));
  const std::vector<T> y = unpermute_combine(dispatch, y_sorted);
  std::vector<double> want(x.size());
  for (int64_t t = 0; t < dispatch.num_tokens; ++t) {
    const auto begin = dispatch.topk_idx.begin() + t * dispatch.k;
    const int64_t kept = dispatch.k - std::count(begin, begin + dispatch.k, int64_t{-1});
    for (int64_t c = 0; c < kWidth; ++c) want[t * kWidth + c] = kept * x[t * kWidth + c];
  }
  EXPECT_TRUE(all_within_ulps(y, want, 0));
}

TYPED_TEST(DispatchTest, PermuteWithScaleIsTheRoundedProduct) {
  using T = TypeParam;
  std::mt19937 rng(47);
  const Dispatch dispatch = make_dispatch(17, 2, 4, 0.2, rng);
  const std::vector<T> x = to_type<T>(random_uniform(dispatch.num_tokens * kWidth, rng, -3.0, 3.0));
  const std::vector<T> scale = to_type<T>(random_uniform(dispatch.num_tokens * dispatch.k, rng, 0.0, 1.0));
  const std::vector<T> x_sorted = permute(dispatch, x, scale.data());
  const std::vector<double> scale_double = to_doubles(scale);
  // The product of two values of T is exact in the accumulation type, so it is rounded once.
  EXPECT_TRUE(all_within_ulps(x_sorted, permute_double(dispatch, to_doubles(x), &scale_double), kRoundedOnceUlps<T>));
}

TYPED_TEST(DispatchTest, UnpermuteCombineWithScoresIsExactOnSmallIntegers) {
  using T = TypeParam;
  std::mt19937 rng(53);
  const Dispatch dispatch = make_dispatch(25, 3, 7, 0.3, rng);
  // Quarters up to 16 and eighths up to 2: every product and sum is exact in fp32, so only the output rounds.
  const std::vector<T> y_sorted =
      poison_tail_rows(dispatch, to_type<T>(random_dyadic(dispatch.num_rows * kWidth, rng, -64, 64, 4)));
  const std::vector<T> score = to_type<T>(random_dyadic(dispatch.num_tokens * dispatch.k, rng, 0, 16, 8));
  const std::vector<T> y = unpermute_combine(dispatch, y_sorted, score.data());
  const std::vector<double> score_double = to_doubles(score);
  EXPECT_TRUE(
      all_within_ulps(y, unpermute_combine_double(dispatch, to_doubles(y_sorted), &score_double), kRoundedOnceUlps<T>));
}

TYPED_TEST(DispatchTest, CombineScoreGradIsTheDotProduct) {
  using T = TypeParam;
  std::mt19937 rng(59);
  const Dispatch dispatch = make_dispatch(19, 4, 6, 0.3, rng);
  const std::vector<T> grad_y = to_type<T>(random_dyadic(dispatch.num_tokens * kWidth, rng, -64, 64, 4));
  const std::vector<T> y_sorted =
      poison_tail_rows(dispatch, to_type<T>(random_dyadic(dispatch.num_rows * kWidth, rng, -64, 64, 4)));
  std::vector<T> grad_score(dispatch.num_tokens * dispatch.k, garbage<T>());
  combine_score_grad_ref(dtype_of<T>(), grad_y.data(), y_sorted.data(), dispatch.num_rows, kWidth,
                         dispatch.plan.pair_pos.data(), dispatch.num_tokens, dispatch.k, dtype_of<T>(),
                         grad_score.data());
  const std::vector<double> want = combine_score_grad_double(dispatch, to_doubles(grad_y), to_doubles(y_sorted));
  EXPECT_TRUE(all_within_ulps(grad_score, want, kRoundedOnceUlps<T>));
  for (size_t p = 0; p < grad_score.size(); ++p) {
    if (dispatch.topk_idx[p] < 0) {
      EXPECT_EQ(to_double(grad_score[p]), 0.0) << "dropped pair " << p;
    }
  }
}

TYPED_TEST(DispatchTest, EmptyInputsWriteNothing) {
  using T = TypeParam;
  T out = garbage<T>();
  const int64_t none = -1;
  EXPECT_NO_THROW(permute_ref(dtype_of<T>(), nullptr, 0, kWidth, &none, 0, 2, nullptr, dtype_of<T>(), &out));
  EXPECT_NO_THROW(unpermute_combine_ref(dtype_of<T>(), nullptr, 0, kWidth, &none, 0, 2, nullptr, dtype_of<T>(), &out));
  EXPECT_NO_THROW(combine_score_grad_ref(dtype_of<T>(), nullptr, nullptr, 0, kWidth, &none, 0, 2, dtype_of<T>(), &out));
  EXPECT_TRUE(is_nan_value(out));
}

// ---------------------------------------------------------------------------------------------------------------
// fp32 / fp64 on random data: within the rounding error bound of a k- (or d-) term sum, gamma_{n+1} sum|terms|.

template <typename T>
void expect_within_sum_bound(const std::vector<T>& got, const std::vector<double>& want,
                             const std::vector<double>& abs_sum, int64_t num_terms) {
  const double unit_roundoff = epsilon_of<T>() / 2;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_LE(std::fabs(to_double(got[i]) - want[i]), (num_terms + 1) * unit_roundoff * abs_sum[i])
        << "element " << i << ": got " << to_double(got[i]) << ", want " << want[i];
  }
}

template <typename T>
void check_combine_on_random_data() {
  std::mt19937 rng(61);
  const Dispatch dispatch = make_dispatch(23, 4, 6, 0.25, rng);
  const std::vector<T> y_sorted = to_type<T>(random_uniform(dispatch.num_rows * kWidth, rng, -1.0, 1.0));
  const std::vector<T> score = to_type<T>(random_uniform(dispatch.num_tokens * dispatch.k, rng, 0.0, 1.0));
  const std::vector<T> y = unpermute_combine(dispatch, y_sorted, score.data());
  std::vector<double> abs_sum;
  const std::vector<double> score_double = to_doubles(score);
  const std::vector<double> want = unpermute_combine_double(dispatch, to_doubles(y_sorted), &score_double, &abs_sum);
  expect_within_sum_bound(y, want, abs_sum, 2 * dispatch.k);

  const std::vector<T> grad_y = to_type<T>(random_uniform(dispatch.num_tokens * kWidth, rng, -1.0, 1.0));
  std::vector<T> grad_score(dispatch.num_tokens * dispatch.k, garbage<T>());
  combine_score_grad_ref(dtype_of<T>(), grad_y.data(), y_sorted.data(), dispatch.num_rows, kWidth,
                         dispatch.plan.pair_pos.data(), dispatch.num_tokens, dispatch.k, dtype_of<T>(),
                         grad_score.data());
  const std::vector<double> want_grad =
      combine_score_grad_double(dispatch, to_doubles(grad_y), to_doubles(y_sorted), &abs_sum);
  expect_within_sum_bound(grad_score, want_grad, abs_sum, 2 * kWidth);
}

TEST(DispatchRoundingTest, Fp32CombineAndScoreGradWithinRoundingOnRandomData) {
  check_combine_on_random_data<float>();
}

TEST(DispatchRoundingTest, Fp64CombineAndScoreGradWithinRoundingOnRandomData) {
  check_combine_on_random_data<double>();
}

// ---------------------------------------------------------------------------------------------------------------
// Values and scores of different dtypes.

template <typename Pair>
class MixedDtypeDispatchTest : public ::testing::Test {};
using MixedDtypes = ::testing::Types<std::pair<bf16_t, float>, std::pair<fp16_t, float>, std::pair<float, bf16_t>,
                                     std::pair<double, float>, std::pair<bf16_t, double>>;
struct MixedDtypeNames {
  template <typename Pair>
  static std::string GetName(int) {
    return std::string(TypeInfo<typename Pair::first_type>::kName) + "_values_" +
           TypeInfo<typename Pair::second_type>::kName + "_scores";
  }
};
TYPED_TEST_SUITE(MixedDtypeDispatchTest, MixedDtypes, MixedDtypeNames);

TYPED_TEST(MixedDtypeDispatchTest, PermuteCombineAndScoreGradMatchDouble) {
  using V = typename TypeParam::first_type;
  using S = typename TypeParam::second_type;
  std::mt19937 rng(67);
  const Dispatch dispatch = make_dispatch(15, 2, 5, 0.2, rng);
  // Dyadic data, exact in both types and in every accumulation: each output is rounded once.
  const std::vector<V> x = to_type<V>(random_dyadic(dispatch.num_tokens * kWidth, rng, -64, 64, 4));
  const std::vector<S> score = to_type<S>(random_dyadic(dispatch.num_tokens * dispatch.k, rng, 0, 16, 8));
  const std::vector<double> score_double = to_doubles(score);

  const std::vector<V> x_sorted = permute(dispatch, x, score.data(), dtype_of<S>());
  EXPECT_TRUE(all_within_ulps(x_sorted, permute_double(dispatch, to_doubles(x), &score_double), kRoundedOnceUlps<V>));

  const std::vector<V> y_sorted =
      poison_tail_rows(dispatch, to_type<V>(random_dyadic(dispatch.num_rows * kWidth, rng, -64, 64, 4)));
  const std::vector<V> y = unpermute_combine(dispatch, y_sorted, score.data(), dtype_of<S>());
  EXPECT_TRUE(
      all_within_ulps(y, unpermute_combine_double(dispatch, to_doubles(y_sorted), &score_double), kRoundedOnceUlps<V>));

  std::vector<S> grad_score(dispatch.num_tokens * dispatch.k, garbage<S>());
  combine_score_grad_ref(dtype_of<V>(), x.data(), y_sorted.data(), dispatch.num_rows, kWidth,
                         dispatch.plan.pair_pos.data(), dispatch.num_tokens, dispatch.k, dtype_of<S>(),
                         grad_score.data());
  EXPECT_TRUE(all_within_ulps(grad_score, combine_score_grad_double(dispatch, to_doubles(x), to_doubles(y_sorted)),
                              kRoundedOnceUlps<S>));
}

// ---------------------------------------------------------------------------------------------------------------
// Out-of-range row indices.

TEST(DispatchArgsTest, RejectsRowIndicesOutOfRange) {
  const int64_t num_tokens = 3, k = 2, d = 4, num_rows = 4;
  const std::vector<float> x(num_tokens * d, 1.0f), y_sorted(num_rows * d, 1.0f);
  std::vector<float> out(num_rows * d), y(num_tokens * d), grad_score(num_tokens * k);

  const std::vector<int64_t> sorted_pair = {0, 5, 6, -1};  // 6 is past num_tokens * k
  auto bad_permute = [&] {
    permute_ref(DType::kFloat32, x.data(), num_tokens, d, sorted_pair.data(), num_rows, k, nullptr, DType::kFloat32,
                out.data());
  };
  EXPECT_THROW(bad_permute(), Error);
  EXPECT_THAT(error_text(bad_permute), HasSubstr("sorted_pair[2] = 6 is outside [-1, num_tokens*k=6)"));

  const std::vector<int64_t> pair_pos = {0, 1, 7, -1, 2, 3};  // pair_pos[1, 0] = 7 is past num_rows
  auto bad_unpermute = [&] {
    unpermute_combine_ref(DType::kFloat32, y_sorted.data(), num_rows, d, pair_pos.data(), num_tokens, k, nullptr,
                          DType::kFloat32, y.data());
  };
  EXPECT_THROW(bad_unpermute(), Error);
  EXPECT_THAT(error_text(bad_unpermute), HasSubstr("pair_pos[1, 0] = 7 is outside [-1, num_rows=4)"));
  auto bad_score_grad = [&] {
    combine_score_grad_ref(DType::kFloat32, x.data(), y_sorted.data(), num_rows, d, pair_pos.data(), num_tokens, k,
                           DType::kFloat32, grad_score.data());
  };
  EXPECT_THROW(bad_score_grad(), Error);
  EXPECT_THAT(error_text(bad_score_grad), HasSubstr("pair_pos[1, 0] = 7 is outside [-1, num_rows=4)"));
}

TEST(CheckPlanTest, AcceptsEveryPlanMakePlanWritesAndItsRoutedPrefix) {
  std::mt19937_64 rng(21);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t num_tokens = 1 + trial, k = 1 + trial % 3, num_experts = 4, num_pairs = num_tokens * k;
    std::vector<int64_t> idx(num_pairs), counts(num_experts), offsets(num_experts + 1), sorted_pair(num_pairs),
        pair_pos(num_pairs);
    for (auto& id : idx) id = static_cast<int64_t>(rng() % (num_experts + 1)) - 1;  // -1 = dropped
    make_plan_ref(idx.data(), num_pairs, num_experts, counts.data(), offsets.data(), sorted_pair.data(),
                  pair_pos.data());
    EXPECT_NO_THROW(check_plan_ref(sorted_pair.data(), num_pairs, pair_pos.data(), num_pairs, k));
    // Expert parallelism keeps only the routed rows: still one plan.
    EXPECT_NO_THROW(check_plan_ref(sorted_pair.data(), offsets[num_experts], pair_pos.data(), num_pairs, k));
  }
}

TEST(CheckPlanTest, RejectsHalvesThatAreNotInverses) {
  const int64_t k = 2, num_pairs = 4;
  // Tokens 0 and 1, two slots each; pair 3 dropped. A consistent plan: rows 0..2 hold pairs 2, 0, 1.
  const std::vector<int64_t> sorted_pair = {2, 0, 1, -1}, pair_pos = {1, 2, 0, -1};
  EXPECT_NO_THROW(check_plan_ref(sorted_pair.data(), num_pairs, pair_pos.data(), num_pairs, k));

  const std::vector<int64_t> swapped_rows = {0, 2, 1, -1};  // rows 0 and 1 swapped in sorted_pair only
  auto swapped = [&] { check_plan_ref(swapped_rows.data(), num_pairs, pair_pos.data(), num_pairs, k); };
  EXPECT_THROW(swapped(), Error);
  EXPECT_THAT(error_text(swapped),
              AllOf(HasSubstr("not inverses"), HasSubstr("pair_pos[0, 0] = 1 but sorted_pair[1] = 2")));

  const std::vector<int64_t> twice = {2, 0, 0, -1}, pos_twice = {1, -1, 0, -1};  // pair 0 on two rows
  auto duplicate = [&] { check_plan_ref(twice.data(), num_pairs, pos_twice.data(), num_pairs, k); };
  EXPECT_THROW(duplicate(), Error);
  EXPECT_THAT(error_text(duplicate), HasSubstr("sorted_pair[2] = 0 but pair_pos[0, 0] = 1"));

  const std::vector<int64_t> lost = {2, 0, -1, -1};  // pair 1 has a row that does not name it
  auto unnamed = [&] { check_plan_ref(lost.data(), num_pairs, pair_pos.data(), num_pairs, k); };
  EXPECT_THROW(unnamed(), Error);
  EXPECT_THAT(error_text(unnamed), HasSubstr("pair_pos[0, 1] = 2 but sorted_pair[2] = -1"));

  const std::vector<int64_t> far = {1, 2, 9, -1};  // a row past the cut
  auto outside = [&] { check_plan_ref(sorted_pair.data(), 2, far.data(), num_pairs, k); };
  EXPECT_THROW(outside(), Error);
  EXPECT_THAT(error_text(outside), HasSubstr("pair_pos[0, 1] = 2 is outside [-1, num_rows=2)"));
}

}  // namespace
}  // namespace test
}  // namespace fastmoe
