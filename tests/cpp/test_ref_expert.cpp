// Tests of csrc/ref/expert_ref: grouped_linear_ref and its backward against per-expert matrix products in
// double and against central finite differences in fp64, the offset checks, the epilogues, and swiglu_ref and its
// backward against closed forms and finite differences, and gelu_backward_bias_ref against its closed form and the
// sums of its own rows.
#include <cmath>
#include <cstdint>
#include <iomanip>
#include <limits>
#include <random>
#include <string>
#include <utility>
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

// (loss(values[i] + eps) - loss(values[i] - eps)) / (2 eps), values[i] restored.
template <typename Loss>
double central_difference(std::vector<double>& values, size_t i, double eps, Loss&& loss) {
  const double saved = values[i];
  values[i] = saved + eps;
  const double plus = loss();
  values[i] = saved - eps;
  const double minus = loss();
  values[i] = saved;
  return (plus - minus) / (2 * eps);
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
    auto numeric = [&](std::vector<double>& values, size_t i) { return central_difference(values, i, eps, loss); };
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

// ---------------------------------------------------------------------------------------------------------------
// swiglu_ref and its backward against closed forms evaluated in long double, and the fp64 backward against
// central finite differences of the fp64 forward.

namespace fastmoe {
namespace test {
namespace {

// Closed forms at one element, in long double (at least as wide as double): silu(g) = g s, s = 1 / (1 + e^-g).
struct SwigluExact {
  long double out, grad_gate, grad_up;
  // Magnitudes the accumulation-type rounding errors scale with: grad_gate = dy u s (1 + g (1 - s)) loses its
  // relative accuracy where 1 + g (1 - s) cancels (g near -1.28) or 1 - s does (large g), so its scale is
  // |dy u| s (1 + |g|) rather than its own value.
  long double out_scale, grad_gate_scale, grad_up_scale;
};

SwigluExact swiglu_exact(double gate, double up, double dy) {
  const long double g = gate, u = up, d = dy;
  const long double s = 1.0L / (1.0L + std::exp(-g));
  const long double silu = g * s;
  return {silu * u,
          d * u * s * (1.0L + g * (1.0L - s)),
          d * silu,
          std::fabs(silu * u),
          std::fabs(d * u) * s * (1.0L + std::fabs(g)),
          std::fabs(d * silu)};
}

// |got - exact| <= eps_T |exact| + kAccUlps eps_A scale + (smallest subnormal of T) + floor, element-wise: the
// final rounding to T, the rounding errors of the accumulation-type chain (exp within an ulp, then at most a few
// adds, multiplies and a divide, each within half an ulp: under 8 eps_A of the scale), and underflow.
constexpr double kSwigluAccUlps = 8;

template <typename T>
::testing::AssertionResult swiglu_within_bound(const std::vector<T>& got, const std::vector<long double>& exact,
                                               const std::vector<long double>& scale, double floor = 0) {
  if (got.size() != exact.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " != expected size " << exact.size();
  }
  const double eps_a = std::numeric_limits<acc_t<T>>::epsilon();
  size_t failures = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const long double bound =
        epsilon_of<T>() * std::fabs(exact[i]) + kSwigluAccUlps * eps_a * scale[i] + smallest_subnormal<T>() + floor;
    const long double error = std::fabs(static_cast<long double>(to_double(got[i])) - exact[i]);
    if (!(error <= bound) && failures++ == 0) first = i;  // a NaN fails too
  }
  if (failures == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << failures << " of " << got.size() << " elements off; first at [" << first
                                       << "]: got " << describe(got[first]) << ", exact " << std::setprecision(20)
                                       << exact[first];
}

// Inputs of one SwiGLU problem as T holds them: h = [gate | up] per row, and the output gradient.
template <typename T>
struct SwigluCase {
  int64_t rows, hidden;
  std::vector<T> h, dy;

  double gate(int64_t r, int64_t j) const { return to_double(h[r * 2 * hidden + j]); }
  double up(int64_t r, int64_t j) const { return to_double(h[r * 2 * hidden + hidden + j]); }
};

template <typename T>
SwigluCase<T> random_swiglu_case(int64_t rows, int64_t hidden, std::mt19937& rng) {
  SwigluCase<T> c{rows, hidden, {}, to_type<T>(random_uniform(rows * hidden, rng, -2.0, 2.0))};
  c.h.resize(rows * 2 * hidden);
  const std::vector<double> gate = random_uniform(rows * hidden, rng, -8.0, 8.0);
  const std::vector<double> up = random_uniform(rows * hidden, rng, -2.0, 2.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < hidden; ++j) {
      c.h[r * 2 * hidden + j] = from_double<T>(gate[r * hidden + j]);
      c.h[r * 2 * hidden + hidden + j] = from_double<T>(up[r * hidden + j]);
    }
  }
  return c;
}

// The closed forms laid out as the outputs: out [rows, hidden] and grad_h [rows, 2 * hidden] = [gate | up].
struct SwigluExpected {
  std::vector<long double> out, out_scale, grad_h, grad_h_scale;
};

template <typename T>
SwigluExpected swiglu_expected(const SwigluCase<T>& c) {
  SwigluExpected e;
  e.out.resize(c.rows * c.hidden);
  e.out_scale.resize(c.rows * c.hidden);
  e.grad_h.resize(c.rows * 2 * c.hidden);
  e.grad_h_scale.resize(c.rows * 2 * c.hidden);
  for (int64_t r = 0; r < c.rows; ++r) {
    for (int64_t j = 0; j < c.hidden; ++j) {
      const SwigluExact x = swiglu_exact(c.gate(r, j), c.up(r, j), to_double(c.dy[r * c.hidden + j]));
      e.out[r * c.hidden + j] = x.out;
      e.out_scale[r * c.hidden + j] = x.out_scale;
      e.grad_h[r * 2 * c.hidden + j] = x.grad_gate;
      e.grad_h_scale[r * 2 * c.hidden + j] = x.grad_gate_scale;
      e.grad_h[r * 2 * c.hidden + c.hidden + j] = x.grad_up;
      e.grad_h_scale[r * 2 * c.hidden + c.hidden + j] = x.grad_up_scale;
    }
  }
  return e;
}

template <typename T>
std::vector<T> swiglu_forward(const SwigluCase<T>& c) {
  std::vector<T> out(c.rows * c.hidden, garbage<T>());
  swiglu_ref(dtype_of<T>(), c.h.data(), c.rows, c.hidden, out.data());
  return out;
}

template <typename T>
std::vector<T> swiglu_backward(const SwigluCase<T>& c) {
  std::vector<T> grad_h(c.rows * 2 * c.hidden, garbage<T>());
  swiglu_backward_ref(dtype_of<T>(), c.dy.data(), c.h.data(), c.rows, c.hidden, grad_h.data());
  return grad_h;
}

template <typename T>
class SwigluRefTest : public ::testing::Test {};
TYPED_TEST_SUITE(SwigluRefTest, AllFloatTypes, DTypeNames);

// The forward is a chain of four operations on exact inputs, so it is held to ulps of the exact value: 1 ulp for
// the 16-bit types (the fp32 chain's error is far below their rounding), and 6 for fp32 and fp64 (exp within an
// ulp and three roundings of half an ulp: under 5 unit roundoffs, i.e. 5 ulps at the bottom of a binade, plus the
// half ulp of rounding the exact value).
TYPED_TEST(SwigluRefTest, ForwardMatchesClosedForm) {
  using T = TypeParam;
  std::mt19937 rng(101);
  for (const auto& [rows, hidden] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {5, 7}, {3, 16}, {64, 33}}) {
    SCOPED_TRACE("rows=" + std::to_string(rows) + " hidden=" + std::to_string(hidden));
    const SwigluCase<T> c = random_swiglu_case<T>(rows, hidden, rng);
    const SwigluExpected want = swiglu_expected(c);
    std::vector<double> exact(want.out.begin(), want.out.end());
    EXPECT_TRUE(all_within_ulps(swiglu_forward(c), exact, kIs16Bit<T> ? 1 : 6));
  }
}

TYPED_TEST(SwigluRefTest, BackwardMatchesClosedForm) {
  using T = TypeParam;
  std::mt19937 rng(103);
  for (const auto& [rows, hidden] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {5, 7}, {3, 16}, {64, 33}}) {
    SCOPED_TRACE("rows=" + std::to_string(rows) + " hidden=" + std::to_string(hidden));
    const SwigluCase<T> c = random_swiglu_case<T>(rows, hidden, rng);
    const SwigluExpected want = swiglu_expected(c);
    EXPECT_TRUE(swiglu_within_bound(swiglu_backward(c), want.grad_h, want.grad_h_scale));
  }
}

// Gates at 0 and far out on both sides: every result finite. silu(0) = 0 and silu'(0) = 1/2 exactly; silu(-100)
// (about -3.7e-42) is below fp32's normal range (and exp(100) overflows fp32), so results there only need to be
// within 1e-30 of the exact value; elsewhere the usual bound holds.
TYPED_TEST(SwigluRefTest, EdgeGatesGiveFiniteResults) {
  using T = TypeParam;
  const std::vector<double> gates = {0.0, 30.0, -30.0, 100.0, -100.0};
  const std::vector<double> ups = {1.5, -0.75}, dys = {-1.25, 0.5};
  const int64_t hidden = static_cast<int64_t>(gates.size()), rows = static_cast<int64_t>(ups.size());
  SwigluCase<T> c{rows, hidden, std::vector<T>(rows * 2 * hidden), std::vector<T>(rows * hidden)};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < hidden; ++j) {
      c.h[r * 2 * hidden + j] = from_double<T>(gates[j]);
      c.h[r * 2 * hidden + hidden + j] = from_double<T>(ups[r]);
      c.dy[r * hidden + j] = from_double<T>(dys[r]);
    }
  }
  const SwigluExpected want = swiglu_expected(c);
  const std::vector<T> out = swiglu_forward(c), grad_h = swiglu_backward(c);
  for (size_t i = 0; i < out.size(); ++i) EXPECT_TRUE(std::isfinite(to_double(out[i]))) << "out " << i;
  for (size_t i = 0; i < grad_h.size(); ++i) EXPECT_TRUE(std::isfinite(to_double(grad_h[i]))) << "grad_h " << i;
  EXPECT_TRUE(swiglu_within_bound(out, want.out, want.out_scale, 1e-30)) << "out";
  EXPECT_TRUE(swiglu_within_bound(grad_h, want.grad_h, want.grad_h_scale, 1e-30)) << "grad_h";
  for (int64_t r = 0; r < rows; ++r) {
    SCOPED_TRACE("row " + std::to_string(r));
    EXPECT_EQ(to_double(out[r * hidden + 0]), 0.0) << "silu(0) * u";
    EXPECT_EQ(to_double(grad_h[r * 2 * hidden + 0]), 0.5 * dys[r] * ups[r]) << "d/dg at g = 0";
    EXPECT_EQ(to_double(grad_h[r * 2 * hidden + hidden + 0]), 0.0) << "d/du at g = 0";
    EXPECT_LE(std::fabs(to_double(out[r * hidden + 4])), 1e-30) << "silu(-100) * u";
    EXPECT_EQ(to_double(out[r * hidden + 3]), to_double(from_double<T>(100.0 * ups[r]))) << "silu(100) * u";
  }
}

TYPED_TEST(SwigluRefTest, ZeroRowsOrZeroHiddenWriteNothing) {
  using T = TypeParam;
  const std::vector<T> h(8, from_double<T>(1.0)), dy(4, from_double<T>(1.0));
  std::vector<T> out(4, garbage<T>()), grad_h(8, garbage<T>());
  const std::vector<T> out_before = out, grad_h_before = grad_h;
  for (const auto& [rows, hidden] : std::vector<std::pair<int64_t, int64_t>>{{0, 4}, {4, 0}, {0, 0}}) {
    swiglu_ref(dtype_of<T>(), h.data(), rows, hidden, out.data());
    swiglu_backward_ref(dtype_of<T>(), dy.data(), h.data(), rows, hidden, grad_h.data());
    EXPECT_TRUE(same_bits(out.data(), out_before.data(), out.size())) << "rows=" << rows << " hidden=" << hidden;
    EXPECT_TRUE(same_bits(grad_h.data(), grad_h_before.data(), grad_h.size()))
        << "rows=" << rows << " hidden=" << hidden;
  }
}

TEST(SwigluRefSizesTest, NegativeSizesThrowNamingTheFunctionAndValues) {
  const std::vector<float> h(8, 1.0f), dy(4, 1.0f);
  std::vector<float> out(4), grad_h(8);
  EXPECT_THAT(error_text([&] { swiglu_ref(DType::kFloat32, h.data(), -1, 4, out.data()); }),
              HasSubstr("swiglu_ref: num_rows and hidden must be >= 0, got -1 and 4"));
  EXPECT_THAT(error_text([&] { swiglu_ref(DType::kFloat32, h.data(), 2, -3, out.data()); }),
              HasSubstr("swiglu_ref: num_rows and hidden must be >= 0, got 2 and -3"));
  EXPECT_THAT(error_text([&] { swiglu_backward_ref(DType::kFloat32, dy.data(), h.data(), -2, 4, grad_h.data()); }),
              HasSubstr("swiglu_backward_ref: num_rows and hidden must be >= 0, got -2 and 4"));
  EXPECT_THAT(error_text([&] { swiglu_backward_ref(DType::kFloat32, dy.data(), h.data(), 2, -1, grad_h.data()); }),
              HasSubstr("swiglu_backward_ref: num_rows and hidden must be >= 0, got 2 and -1"));
  EXPECT_THAT(error_text([] { check_swiglu_sizes("some_kernel", 0, -5); }),
              HasSubstr("some_kernel: num_rows and hidden must be >= 0, got 0 and -5"));
  EXPECT_NO_THROW(check_swiglu_sizes("some_kernel", 0, 0));
}

// L = sum(dy * swiglu(h)); its central differences against the fp64 backward, element by element.
TEST(SwigluFp64Test, BackwardMatchesCentralFiniteDifferences) {
  std::mt19937 rng(107);
  const int64_t rows = 3, hidden = 4;
  const double eps = 1e-5, tolerance = 1e-8;
  // Gates in [-4, 4] (one at 0), up values in [-1, 1]: |L| stays below 50, so its rounding moves a difference
  // quotient by well under the tolerance.
  std::vector<double> h = random_uniform(rows * 2 * hidden, rng, -1.0, 1.0);
  const std::vector<double> gates = random_uniform(rows * hidden, rng, -4.0, 4.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < hidden; ++j) h[r * 2 * hidden + j] = gates[r * hidden + j];
  }
  h[0] = 0.0;
  const std::vector<double> dy = random_uniform(rows * hidden, rng, -1.0, 1.0);
  auto loss = [&] {
    std::vector<double> out(rows * hidden);
    swiglu_ref(DType::kFloat64, h.data(), rows, hidden, out.data());
    double sum = 0;
    for (size_t i = 0; i < out.size(); ++i) sum += dy[i] * out[i];
    return sum;
  };
  std::vector<double> grad_h(h.size(), std::numeric_limits<double>::quiet_NaN());
  swiglu_backward_ref(DType::kFloat64, dy.data(), h.data(), rows, hidden, grad_h.data());
  for (size_t i = 0; i < h.size(); ++i) {
    EXPECT_NEAR(grad_h[i], central_difference(h, i, eps, loss), tolerance) << "grad_h " << i;
  }
}

// ---- with a row scale (an MoE layer's routing scores applied before the second GEMM)

// One factor per row in [0.25, 1.25], in the accumulation type as the kernels take it.
template <typename T>
std::vector<acc_t<T>> random_row_scale(int64_t rows, std::mt19937& rng) {
  std::vector<acc_t<T>> scale;
  for (double v : random_uniform(rows, rng, 0.25, 1.25)) scale.push_back(static_cast<acc_t<T>>(v));
  return scale;
}

// out = silu(g) u c and grad_h with d = dy c: the unscaled closed forms times the row's factor c (one more
// rounding in the chain, inside its bound); grad_scale[r] = sum_j dy silu(g) u, against the same sum in long double
// with a bound of kSwigluAccUlps accumulation-type ulps of the sum of the terms' magnitudes (the sigmoid is rounded
// to the accumulation type; the terms and their sum are fp64).
TYPED_TEST(SwigluRefTest, ScaledMatchesClosedForm) {
  using T = TypeParam;
  using A = acc_t<T>;
  std::mt19937 rng(109);
  for (const auto& [rows, hidden] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {5, 7}, {3, 16}, {64, 33}}) {
    SCOPED_TRACE("rows=" + std::to_string(rows) + " hidden=" + std::to_string(hidden));
    const SwigluCase<T> c = random_swiglu_case<T>(rows, hidden, rng);
    const std::vector<A> scale = random_row_scale<T>(rows, rng);
    SwigluExpected want = swiglu_expected(c);
    std::vector<long double> dot(rows, 0.0L), dot_scale(rows, 0.0L);
    for (int64_t r = 0; r < rows; ++r) {
      const long double f = scale[r];
      for (int64_t j = 0; j < hidden; ++j) {
        const long double term = want.out[r * hidden + j] * to_double(c.dy[r * hidden + j]);
        dot[r] += term;
        dot_scale[r] += std::fabs(term);
        want.out[r * hidden + j] *= f;
        want.out_scale[r * hidden + j] *= f;
      }
      for (int64_t j = 0; j < 2 * hidden; ++j) {
        want.grad_h[r * 2 * hidden + j] *= f;
        want.grad_h_scale[r * 2 * hidden + j] *= f;
      }
    }
    std::vector<T> out(rows * hidden, garbage<T>()), grad_h(rows * 2 * hidden, garbage<T>());
    std::vector<A> grad_scale(rows, std::numeric_limits<A>::quiet_NaN());
    swiglu_ref(dtype_of<T>(), c.h.data(), rows, hidden, out.data(), scale.data());
    swiglu_backward_ref(dtype_of<T>(), c.dy.data(), c.h.data(), rows, hidden, grad_h.data(), scale.data(),
                        grad_scale.data());
    EXPECT_TRUE(swiglu_within_bound(out, want.out, want.out_scale)) << "out";
    EXPECT_TRUE(swiglu_within_bound(grad_h, want.grad_h, want.grad_h_scale)) << "grad_h";
    const double eps_a = std::numeric_limits<A>::epsilon();
    for (int64_t r = 0; r < rows; ++r) {
      EXPECT_LE(std::fabs(static_cast<long double>(grad_scale[r]) - dot[r]),
                kSwigluAccUlps * eps_a * dot_scale[r] + std::numeric_limits<A>::denorm_min())
          << "grad_scale[" << r << "] = " << grad_scale[r] << ", exact " << static_cast<double>(dot[r]);
    }
  }
}

// A factor of 1 is no factor: the unscaled results bit for bit, forward and grad_h.
TYPED_TEST(SwigluRefTest, ScaleOfOneGivesTheUnscaledBits) {
  using T = TypeParam;
  std::mt19937 rng(113);
  const SwigluCase<T> c = random_swiglu_case<T>(6, 9, rng);
  const std::vector<acc_t<T>> ones(c.rows, acc_t<T>(1));
  std::vector<T> out(c.rows * c.hidden, garbage<T>()), grad_h(c.rows * 2 * c.hidden, garbage<T>());
  std::vector<acc_t<T>> grad_scale(c.rows);
  swiglu_ref(dtype_of<T>(), c.h.data(), c.rows, c.hidden, out.data(), ones.data());
  swiglu_backward_ref(dtype_of<T>(), c.dy.data(), c.h.data(), c.rows, c.hidden, grad_h.data(), ones.data(),
                      grad_scale.data());
  const std::vector<T> plain_out = swiglu_forward(c), plain_grad_h = swiglu_backward(c);
  EXPECT_TRUE(same_bits(out.data(), plain_out.data(), out.size()));
  EXPECT_TRUE(same_bits(grad_h.data(), plain_grad_h.data(), grad_h.size()));
}

// L = sum(dy * swiglu(h, scale)): its central differences in each row's factor against grad_scale (fp64).
TEST(SwigluFp64Test, ScaleGradientMatchesCentralFiniteDifferences) {
  std::mt19937 rng(127);
  const int64_t rows = 4, hidden = 5;
  const std::vector<double> h = random_uniform(rows * 2 * hidden, rng, -2.0, 2.0);
  const std::vector<double> dy = random_uniform(rows * hidden, rng, -1.0, 1.0);
  std::vector<double> scale = random_uniform(rows, rng, 0.25, 1.25);
  auto loss = [&] {
    std::vector<double> out(rows * hidden);
    swiglu_ref(DType::kFloat64, h.data(), rows, hidden, out.data(), scale.data());
    double sum = 0;
    for (size_t i = 0; i < out.size(); ++i) sum += dy[i] * out[i];
    return sum;
  };
  std::vector<double> grad_h(h.size()), grad_scale(rows, std::numeric_limits<double>::quiet_NaN());
  swiglu_backward_ref(DType::kFloat64, dy.data(), h.data(), rows, hidden, grad_h.data(), scale.data(),
                      grad_scale.data());
  const double eps = 1e-5;
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_GT(std::fabs(grad_scale[r]), 1e-3) << "row " << r << ": a zero would prove nothing";
    EXPECT_NEAR(grad_scale[r], central_difference(scale, r, eps, loss), 1e-8) << "grad_scale " << r;
  }
}

TEST(SwigluRefSizesTest, ScaleAndItsGradientComeTogether) {
  const std::vector<float> h(8, 1.0f), dy(4, 1.0f), scale(1, 1.0f);
  std::vector<float> grad_h(8), grad_scale(1);
  EXPECT_THAT(error_text([&] {
                swiglu_backward_ref(DType::kFloat32, dy.data(), h.data(), 1, 4, grad_h.data(), scale.data(), nullptr);
              }),
              HasSubstr("swiglu_backward_ref: scale and grad_scale must be given together"));
  EXPECT_THAT(error_text([&] {
                swiglu_backward_ref(DType::kFloat32, dy.data(), h.data(), 1, 4, grad_h.data(), nullptr,
                                    grad_scale.data());
              }),
              HasSubstr("swiglu_backward_ref: scale and grad_scale must be given together"));
}

// gelu_backward_bias_ref: grad_h against dy (Phi(x) + x phi(x)) in double, each expert's bias gradient the sum of
// its rows of grad_h as written (an expert without rows: zero), the tail past offsets[E] given grad_h but no bias.
template <typename T>
void check_gelu_backward_bias(std::mt19937& rng) {
  const int64_t rows = 37, hidden = 9, num_experts = 4;
  const std::vector<int64_t> offsets = {0, 10, 10, 25, 33};  // expert 1 has no rows; rows 33.. are the tail
  const std::vector<T> dy = to_type<T>(random_uniform(rows * hidden, rng, -2.0, 2.0));
  const std::vector<T> x = to_type<T>(random_uniform(rows * hidden, rng, -6.0, 6.0));
  std::vector<T> grad_h(rows * hidden, garbage<T>()), grad_bias(num_experts * hidden, garbage<T>());
  gelu_backward_bias_ref(dtype_of<T>(), dy.data(), x.data(), rows, hidden, offsets.data(), num_experts, grad_h.data(),
                         grad_bias.data());
  std::vector<double> want_h(rows * hidden);
  for (int64_t i = 0; i < rows * hidden; ++i) {
    const double v = to_double(x[i]);
    const double cdf = 0.5 * (1.0 + std::erf(v / std::sqrt(2.0))), pdf = std::exp(-0.5 * v * v) / std::sqrt(2 * M_PI);
    want_h[i] = to_double(dy[i]) * (cdf + v * pdf);
  }
  // cdf = (1 + erf) / 2 is computed as written, so for x far below 0 its error is that of 1 + erf: a few ulps of the
  // accumulation type absolute, times |dy|, on top of the rounding to T
  const double eps_a = std::numeric_limits<acc_t<T>>::epsilon();
  for (int64_t i = 0; i < rows * hidden; ++i) {
    const double bound =
        epsilon_of<T>() * std::fabs(want_h[i]) + 8 * eps_a * std::fabs(to_double(dy[i])) + smallest_subnormal<T>();
    EXPECT_LE(std::fabs(to_double(grad_h[i]) - want_h[i]), bound)
        << dtype_name(dtype_of<T>()) << " grad_h[" << i << "], x = " << to_double(x[i]);
  }
  std::vector<double> want_bias(num_experts * hidden, 0.0);
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      for (int64_t j = 0; j < hidden; ++j) want_bias[e * hidden + j] += to_double(grad_h[r * hidden + j]);
    }
  }
  EXPECT_TRUE(matches_reference(grad_bias, want_bias, 1e-14, 1e-6)) << dtype_name(dtype_of<T>()) << " grad_bias";
  for (int64_t j = 0; j < hidden; ++j) EXPECT_EQ(to_double(grad_bias[1 * hidden + j]), 0.0) << "expert 1, " << j;
}

TEST(GeluBackwardBiasRef, MatchesTheClosedFormAndSumsItsOwnRows) {
  std::mt19937 rng(41);
  check_gelu_backward_bias<float>(rng);
  check_gelu_backward_bias<double>(rng);
  check_gelu_backward_bias<fp16_t>(rng);
  check_gelu_backward_bias<bf16_t>(rng);
}

TEST(GeluBackwardBiasRef, RejectsBadSizesAndOffsets) {
  std::vector<float> v(8), out(8), bias(8);
  const std::vector<int64_t> decreasing = {0, 4, 2}, past = {0, 2, 5};
  EXPECT_THAT(error_text([&] {
                gelu_backward_bias_ref(DType::kFloat32, v.data(), v.data(), -1, 2, decreasing.data(), 2, out.data(),
                                       bias.data());
              }),
              HasSubstr("gelu_backward_bias_ref: sizes must be >= 0, got num_rows -1, hidden 2, num_experts 2"));
  EXPECT_THAT(error_text([&] {
                gelu_backward_bias_ref(DType::kFloat32, v.data(), v.data(), 4, 2, decreasing.data(), 2, out.data(),
                                       bias.data());
              }),
              HasSubstr("offsets[1] = 4 > offsets[2] = 2"));
  EXPECT_THAT(error_text([&] {
                gelu_backward_bias_ref(DType::kFloat32, v.data(), v.data(), 4, 2, past.data(), 2, out.data(),
                                       bias.data());
              }),
              HasSubstr("expert_offsets[2] = 5 exceeds the 4 rows"));
}

}  // namespace
}  // namespace test
}  // namespace fastmoe
