// Tests of csrc/ref/expert_ref: grouped_linear_ref and its backward against per-expert matrix products in
// double and against central finite differences in fp64, and the offset checks.
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "ref/expert_ref.h"
#include "test_util.h"

namespace fastmoe {
namespace test {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

// One grouped-linear problem: rows [offsets[e], offsets[e+1]) of x belong to expert e, rows past offsets[E] to
// none. Feature sizes are not multiples of 8.
struct Experts {
  std::string name;
  int64_t num_rows, in_features, out_features, num_experts;
  std::vector<int64_t> offsets;

  int64_t expert_rows(int64_t e) const { return offsets[e + 1] - offsets[e]; }
};

const std::vector<Experts>& all_cases() {
  static const std::vector<Experts> cases = {
      {"empty_expert_and_trailing_rows", 13, 13, 7, 4, {0, 3, 3, 8, 11}},
      {"single_expert_is_dense", 6, 5, 3, 1, {0, 6}},
      {"first_and_last_experts_empty", 5, 4, 9, 3, {0, 0, 5, 5}},
      {"no_routed_rows", 3, 4, 2, 2, {0, 0, 0}},
      {"zero_rows", 0, 4, 2, 2, {0, 0, 0}},
  };
  return cases;
}

// Inputs as T holds them. The 16-bit types get eighths in [-2, 2], whose products and sums are exact in fp32,
// so the reference's only rounding is the final one and each element can be held to 1 ulp of the exact value.
template <typename T>
std::vector<T> random_input(size_t count, std::mt19937& rng) {
  if constexpr (kIs16Bit<T>) {
    return to_type<T>(random_dyadic(count, rng, -16, 16, 8));
  } else {
    return to_type<T>(random_uniform(count, rng, -1.0, 1.0));
  }
}

// y[r] = W[e] x[r] + b[e] in double, zero for rows past offsets[E].
std::vector<double> grouped_linear_double(const Experts& c, const std::vector<double>& x, const std::vector<double>& w,
                                          const std::vector<double>* bias) {
  std::vector<double> y(c.num_rows * c.out_features, 0.0);
  for (int64_t e = 0; e < c.num_experts; ++e) {
    for (int64_t r = c.offsets[e]; r < c.offsets[e + 1]; ++r) {
      for (int64_t o = 0; o < c.out_features; ++o) {
        double sum = bias != nullptr ? (*bias)[e * c.out_features + o] : 0.0;
        for (int64_t i = 0; i < c.in_features; ++i) {
          sum += w[(e * c.out_features + o) * c.in_features + i] * x[r * c.in_features + i];
        }
        y[r * c.out_features + o] = sum;
      }
    }
  }
  return y;
}

struct LinearGrads {
  std::vector<double> grad_x, grad_weight, grad_bias;
};

// grad_x[r] = W[e]^T grad_y[r]; grad_W[e] = sum_r grad_y[r] x[r]^T; grad_b[e] = sum_r grad_y[r].
LinearGrads grouped_linear_backward_double(const Experts& c, const std::vector<double>& grad_y,
                                           const std::vector<double>& x, const std::vector<double>& w) {
  LinearGrads g{std::vector<double>(c.num_rows * c.in_features, 0.0),
                std::vector<double>(c.num_experts * c.out_features * c.in_features, 0.0),
                std::vector<double>(c.num_experts * c.out_features, 0.0)};
  for (int64_t e = 0; e < c.num_experts; ++e) {
    for (int64_t r = c.offsets[e]; r < c.offsets[e + 1]; ++r) {
      for (int64_t o = 0; o < c.out_features; ++o) {
        const double gy = grad_y[r * c.out_features + o];
        g.grad_bias[e * c.out_features + o] += gy;
        for (int64_t i = 0; i < c.in_features; ++i) {
          const int64_t wi = (e * c.out_features + o) * c.in_features + i;
          g.grad_x[r * c.in_features + i] += gy * w[wi];
          g.grad_weight[wi] += gy * x[r * c.in_features + i];
        }
      }
    }
  }
  return g;
}

template <typename T>
std::vector<T> forward(const Experts& c, const std::vector<T>& x, const std::vector<T>& w, const T* bias) {
  std::vector<T> y(c.num_rows * c.out_features, garbage<T>());
  grouped_linear_ref(dtype_of<T>(), x.data(), c.num_rows, c.in_features, c.offsets.data(), c.num_experts, w.data(),
                     c.out_features, bias, y.data());
  return y;
}

template <typename T>
struct Grads {
  std::vector<T> grad_x, grad_weight, grad_bias;
};

// Runs the backward with the outputs selected by `mask` (bit 0 grad_x, bit 1 grad_weight, bit 2 grad_bias) and
// nullptr for the others; every buffer starts as NaN.
template <typename T>
Grads<T> backward(const Experts& c, const std::vector<T>& grad_y, const std::vector<T>& x, const std::vector<T>& w,
                  int mask = 7) {
  Grads<T> g{std::vector<T>(c.num_rows * c.in_features, garbage<T>()),
             std::vector<T>(c.num_experts * c.out_features * c.in_features, garbage<T>()),
             std::vector<T>(c.num_experts * c.out_features, garbage<T>())};
  grouped_linear_backward_ref(dtype_of<T>(), grad_y.data(), x.data(), c.num_rows, c.in_features, c.offsets.data(),
                              c.num_experts, w.data(), c.out_features, (mask & 1) ? g.grad_x.data() : nullptr,
                              (mask & 2) ? g.grad_weight.data() : nullptr, (mask & 4) ? g.grad_bias.data() : nullptr);
  return g;
}

// Elements [begin, end) of `values` are exactly zero.
template <typename T>
::testing::AssertionResult all_zero(const std::vector<T>& values, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    if (to_double(values[i]) != 0.0) {
      return ::testing::AssertionFailure() << "element " << i << " is " << describe(values[i]) << ", want 0";
    }
  }
  return ::testing::AssertionSuccess();
}

// Tolerances of the numerics policy for these math outputs: fp64 1e-12 and fp32 1e-5 relative; the 16-bit types
// within 1 ulp of the exact value rounded to the type.
constexpr double kRtolFp64 = 1e-12;
constexpr double kRtolFp32 = 1e-5;

template <typename T>
class GroupedLinearTest : public ::testing::Test {};
TYPED_TEST_SUITE(GroupedLinearTest, AllFloatTypes, DTypeNames);

TYPED_TEST(GroupedLinearTest, ForwardMatchesPerExpertMatmulInDouble) {
  using T = TypeParam;
  std::mt19937 rng(71);
  for (const Experts& c : all_cases()) {
    const std::vector<T> x = random_input<T>(c.num_rows * c.in_features, rng);
    const std::vector<T> w = random_input<T>(c.num_experts * c.out_features * c.in_features, rng);
    const std::vector<T> bias = random_input<T>(c.num_experts * c.out_features, rng);
    const std::vector<double> bias_double = to_doubles(bias);
    for (bool with_bias : {false, true}) {
      SCOPED_TRACE(c.name + (with_bias ? " with bias" : " without bias"));
      const std::vector<T> y = forward(c, x, w, with_bias ? bias.data() : nullptr);
      const std::vector<double> want =
          grouped_linear_double(c, to_doubles(x), to_doubles(w), with_bias ? &bias_double : nullptr);
      EXPECT_TRUE(matches_reference(y, want, kRtolFp64, kRtolFp32));
      EXPECT_TRUE(all_zero(y, c.offsets[c.num_experts] * c.out_features, c.num_rows * c.out_features))
          << "rows past offsets[E]";
    }
  }
}

TYPED_TEST(GroupedLinearTest, BackwardMatchesAnalyticGradientsInDouble) {
  using T = TypeParam;
  std::mt19937 rng(73);
  for (const Experts& c : all_cases()) {
    SCOPED_TRACE(c.name);
    const std::vector<T> x = random_input<T>(c.num_rows * c.in_features, rng);
    const std::vector<T> w = random_input<T>(c.num_experts * c.out_features * c.in_features, rng);
    const std::vector<T> grad_y = random_input<T>(c.num_rows * c.out_features, rng);
    const Grads<T> got = backward(c, grad_y, x, w);
    const LinearGrads want = grouped_linear_backward_double(c, to_doubles(grad_y), to_doubles(x), to_doubles(w));
    EXPECT_TRUE(matches_reference(got.grad_x, want.grad_x, kRtolFp64, kRtolFp32)) << "grad_x";
    EXPECT_TRUE(matches_reference(got.grad_weight, want.grad_weight, kRtolFp64, kRtolFp32)) << "grad_weight";
    EXPECT_TRUE(matches_reference(got.grad_bias, want.grad_bias, kRtolFp64, kRtolFp32)) << "grad_bias";
    EXPECT_TRUE(all_zero(got.grad_x, c.offsets[c.num_experts] * c.in_features, c.num_rows * c.in_features))
        << "grad_x rows past offsets[E]";
    for (int64_t e = 0; e < c.num_experts; ++e) {
      if (c.expert_rows(e) != 0) continue;
      const int64_t w_size = c.out_features * c.in_features;
      EXPECT_TRUE(all_zero(got.grad_weight, e * w_size, (e + 1) * w_size)) << "grad_weight of empty expert " << e;
      EXPECT_TRUE(all_zero(got.grad_bias, e * c.out_features, (e + 1) * c.out_features))
          << "grad_bias of empty expert " << e;
    }
  }
}

TYPED_TEST(GroupedLinearTest, BackwardSkipsNullOutputs) {
  using T = TypeParam;
  std::mt19937 rng(79);
  const Experts& c = all_cases()[0];
  const std::vector<T> x = random_input<T>(c.num_rows * c.in_features, rng);
  const std::vector<T> w = random_input<T>(c.num_experts * c.out_features * c.in_features, rng);
  const std::vector<T> grad_y = random_input<T>(c.num_rows * c.out_features, rng);
  const Grads<T> all = backward(c, grad_y, x, w, 7);
  for (int mask = 0; mask < 7; ++mask) {
    SCOPED_TRACE("mask " + std::to_string(mask));
    const Grads<T> some = backward(c, grad_y, x, w, mask);
    // Each requested output is the same as when all three are requested; the others were never passed.
    if (mask & 1) {
      EXPECT_TRUE(same_bits(some.grad_x.data(), all.grad_x.data(), all.grad_x.size())) << "grad_x";
    }
    if (mask & 2) {
      EXPECT_TRUE(same_bits(some.grad_weight.data(), all.grad_weight.data(), all.grad_weight.size())) << "grad_weight";
    }
    if (mask & 4) {
      EXPECT_TRUE(same_bits(some.grad_bias.data(), all.grad_bias.data(), all.grad_bias.size())) << "grad_bias";
    }
  }
}

// L = sum(grad_y * y(x, W, b)); its central differences against the fp64 backward, element by element.
TEST(GroupedLinearFp64Test, BackwardMatchesCentralFiniteDifferences) {
  std::mt19937 rng(83);
  const double eps = 1e-6, tolerance = 1e-8;
  for (const Experts& c : all_cases()) {
    SCOPED_TRACE(c.name);
    std::vector<double> x = random_uniform(c.num_rows * c.in_features, rng, -1.0, 1.0);
    std::vector<double> w = random_uniform(c.num_experts * c.out_features * c.in_features, rng, -1.0, 1.0);
    std::vector<double> bias = random_uniform(c.num_experts * c.out_features, rng, -1.0, 1.0);
    const std::vector<double> grad_y = random_uniform(c.num_rows * c.out_features, rng, -1.0, 1.0);
    auto loss = [&] {
      const std::vector<double> y = forward(c, x, w, bias.data());
      double sum = 0;
      for (size_t i = 0; i < y.size(); ++i) sum += grad_y[i] * y[i];
      return sum;
    };
    auto numeric = [&](std::vector<double>& values, size_t i) {
      const double saved = values[i];
      values[i] = saved + eps;
      const double plus = loss();
      values[i] = saved - eps;
      const double minus = loss();
      values[i] = saved;
      return (plus - minus) / (2 * eps);
    };
    const Grads<double> got = backward(c, grad_y, x, w);
    for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(got.grad_x[i], numeric(x, i), tolerance) << "grad_x " << i;
    for (size_t i = 0; i < w.size(); ++i) {
      EXPECT_NEAR(got.grad_weight[i], numeric(w, i), tolerance) << "grad_weight " << i;
    }
    for (size_t i = 0; i < bias.size(); ++i) {
      EXPECT_NEAR(got.grad_bias[i], numeric(bias, i), tolerance) << "grad_bias " << i;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// check_expert_offsets_ref.

TEST(ExpertOffsetsTest, AcceptsValidPartitions) {
  const std::vector<int64_t> zeros = {0, 0, 0}, partial = {0, 2, 2, 5};
  EXPECT_NO_THROW(check_expert_offsets_ref(zeros.data(), 2, 0));
  EXPECT_NO_THROW(check_expert_offsets_ref(partial.data(), 3, 5));
  EXPECT_NO_THROW(check_expert_offsets_ref(partial.data(), 3, 9));  // rows past offsets[E] are allowed
}

TEST(ExpertOffsetsTest, RejectsNonZeroStart) {
  for (int64_t first : {1, -1}) {
    const std::vector<int64_t> offsets = {first, 2, 3};
    auto call = [&] { check_expert_offsets_ref(offsets.data(), 2, 5); };
    EXPECT_THROW(call(), Error);
    EXPECT_THAT(error_text(call), HasSubstr("expert_offsets[0] must be 0, got " + std::to_string(first)));
  }
}

TEST(ExpertOffsetsTest, RejectsDecreasingOffsets) {
  const std::vector<int64_t> offsets = {0, 4, 2, 5};
  auto call = [&] { check_expert_offsets_ref(offsets.data(), 3, 8); };
  EXPECT_THROW(call(), Error);
  EXPECT_THAT(error_text(call), AllOf(HasSubstr("non-decreasing"), HasSubstr("offsets[1] = 4 > offsets[2] = 2")));
}

TEST(ExpertOffsetsTest, RejectsOffsetsPastNumRows) {
  const std::vector<int64_t> offsets = {0, 3, 5, 9};
  auto call = [&] { check_expert_offsets_ref(offsets.data(), 3, 8); };
  EXPECT_THROW(call(), Error);
  EXPECT_THAT(error_text(call), HasSubstr("expert_offsets[3] = 9 exceeds the 8 rows"));
}

TEST(ExpertOffsetsTest, ForwardAndBackwardCheckTheirOffsets) {
  const int64_t num_rows = 4, in_features = 3, out_features = 2, num_experts = 2;
  const std::vector<int64_t> offsets = {0, 3, 6};
  const std::vector<float> x(num_rows * in_features, 1.0f), w(num_experts * out_features * in_features, 1.0f),
      grad_y(num_rows * out_features, 1.0f);
  std::vector<float> y(num_rows * out_features), grad_x(x.size()), grad_w(w.size()), grad_b(num_experts * out_features);
  auto forward_call = [&] {
    grouped_linear_ref(DType::kFloat32, x.data(), num_rows, in_features, offsets.data(), num_experts, w.data(),
                       out_features, nullptr, y.data());
  };
  EXPECT_THROW(forward_call(), Error);
  EXPECT_THAT(error_text(forward_call), HasSubstr("expert_offsets[2] = 6 exceeds the 4 rows"));
  auto backward_call = [&] {
    grouped_linear_backward_ref(DType::kFloat32, grad_y.data(), x.data(), num_rows, in_features, offsets.data(),
                                num_experts, w.data(), out_features, grad_x.data(), grad_w.data(), grad_b.data());
  };
  EXPECT_THROW(backward_call(), Error);
  EXPECT_THAT(error_text(backward_call), HasSubstr("expert_offsets[2] = 6 exceeds the 4 rows"));
}

}  // namespace
}  // namespace test
}  // namespace fastmoe

namespace fastmoe {
namespace {

TEST(GroupedBiasEpilogueRef, AddsEachExpertsBiasOnceAndZeroesTheTail) {
  // 2 experts (rows 0-1 and 2), 2 tail rows; fp32 values where one rounding of v + b is exact.
  const std::vector<int64_t> offsets = {0, 2, 3};
  std::vector<float> y = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};  // [5, 2]
  const std::vector<float> bias = {0.5f, -1.0f, 10.0f, 20.0f};
  grouped_bias_epilogue_ref(DType::kFloat32, y.data(), 5, 2, offsets.data(), 2, bias.data());
  EXPECT_EQ(y, (std::vector<float>{1.5f, 1, 3.5f, 3, 15, 26, 0, 0, 0, 0}));
  std::vector<float> no_bias = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  grouped_bias_epilogue_ref(DType::kFloat32, no_bias.data(), 5, 2, offsets.data(), 2, nullptr);
  EXPECT_EQ(no_bias, (std::vector<float>{1, 2, 3, 4, 5, 6, 0, 0, 0, 0}));
}

TEST(GroupedBiasEpilogueRef, RejectsBadOffsets) {
  const std::vector<int64_t> offsets = {0, 4, 2};
  std::vector<float> y(8);
  EXPECT_THROW(grouped_bias_epilogue_ref(DType::kFloat32, y.data(), 4, 2, offsets.data(), 2, nullptr), Error);
}

TEST(ZeroEmptyGroupsRef, ZeroesOnlyGroupsWithoutRows) {
  const std::vector<int64_t> offsets = {0, 0, 3, 3, 4};
  std::vector<int32_t> groups = {1, 1, 2, 2, 3, 3, 4, 4};  // 4 groups of 8 bytes
  zero_empty_groups_ref(groups.data(), 4, 2 * sizeof(int32_t), offsets.data());
  EXPECT_EQ(groups, (std::vector<int32_t>{0, 0, 2, 2, 0, 0, 4, 4}));
}

}  // namespace
}  // namespace fastmoe
