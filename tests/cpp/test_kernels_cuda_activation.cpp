// swiglu_cuda and swiglu_backward_cuda (csrc/kernels/expert/activation.cu) against swiglu_ref and
// swiglu_backward_ref (gelu_backward_bias_cuda at the end of the file). Both evaluate the same formulas in the same
// accumulation type, but exp rounds differently on the host and the device (and the device may fuse a multiply-add), so
// the results are compared within the rounding of the dtype plus a few ulps of the accumulation type; two runs on the
// device must agree bit for bit. Each case runs with every operand 16-byte aligned (the vector path whenever hidden *
// sizeof(T) is a multiple of 16), with every operand one element off (the scalar path), and with only the output one
// element off (the scalar path as well: every pointer must be aligned for the vector one); one poisoned element on
// either side of each output catches a store out of bounds. Every case runs without and with a row scale (the routing
// scores an MoE layer applies before the second GEMM), whose gradient, a sum per row in fp64 on both sides, is compared
// within kAccUlps accumulation-type ulps of the sum of its terms' magnitudes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda_test_util.h"
#include "kernels/expert/expert.h"
#include "test_util.h"

namespace fastmoe {
namespace test {
namespace {

// Where the operands start: one element past an aligned allocation moves them off 16-byte alignment.
struct Layout {
  const char* name;
  int64_t input_shift, output_shift;
};
constexpr Layout kLayouts[] = {{"aligned", 0, 0}, {"all operands shifted", 1, 1}, {"output shifted", 0, 1}};

// Bound on |device - reference| per element: eps_T |ref| for the two sides rounding to neighbouring values of T,
// kAccUlps eps_A scale for the two accumulation-type chains (each under 8 eps_A of its scale), and one subnormal
// step of T for underflow.
constexpr double kAccUlps = 16;

template <typename T>
::testing::AssertionResult close_to_reference(const std::vector<T>& got, const std::vector<T>& want,
                                              const std::vector<double>& scale) {
  const double eps_a = std::numeric_limits<acc_t<T>>::epsilon();
  size_t failures = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double ref = to_double(want[i]);
    const double bound = epsilon_of<T>() * std::fabs(ref) + kAccUlps * eps_a * scale[i] + smallest_subnormal<T>();
    if (!(std::fabs(to_double(got[i]) - ref) <= bound) && failures++ == 0) first = i;  // a NaN fails too
  }
  if (failures == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << failures << " of " << got.size() << " elements off; first at [" << first
                                       << "]: got " << describe(got[first]) << ", reference " << describe(want[first])
                                       << ", scale " << scale[first];
}

class CudaSwiglu : public CudaKernelTest {
 protected:
  // `data` at element `shift` of a buffer with one poisoned element on each side of it.
  template <typename T>
  DeviceBuffer upload_shifted(const std::vector<T>& data, int64_t shift) {
    std::vector<T> padded(data.size() + 2, garbage<T>());
    std::copy(data.begin(), data.end(), padded.begin() + shift);
    return DeviceBuffer(padded, stream_);
  }

  // The `count` elements at `shift`; fails the test if a byte around them changed.
  template <typename T>
  std::vector<T> download_checked(const DeviceBuffer& buffer, size_t count, int64_t shift, const std::string& what) {
    const std::vector<uint8_t> bytes = buffer.download<uint8_t>((count + 2) * sizeof(T));
    const size_t begin = shift * sizeof(T), end = begin + count * sizeof(T);
    for (size_t i = 0; i < bytes.size(); ++i) {
      if (i >= begin && i < end) continue;
      EXPECT_EQ(bytes[i], 0xFF) << what << ": byte " << i << " outside the " << count << " elements at " << shift
                                << " was written";
    }
    std::vector<T> values(count);
    if (count > 0) std::memcpy(values.data(), bytes.data() + begin, count * sizeof(T));
    return values;
  }

  template <typename T>
  void check(int64_t rows, int64_t hidden, bool scaled, std::mt19937& rng) {
    using A = acc_t<T>;
    const DType dtype = dtype_of<T>();
    const std::string where = std::string(dtype_name(dtype)) + " rows=" + std::to_string(rows) +
                              " hidden=" + std::to_string(hidden) + (scaled ? " scaled" : "");
    const size_t n_out = rows * hidden, n_h = 2 * n_out;
    // Gates in [-8, 8] reach both tails of the sigmoid; up values and gradients in [-2, 2].
    std::vector<T> h(n_h);
    const std::vector<double> gate = random_uniform(n_out, rng, -8.0, 8.0), up = random_uniform(n_out, rng, -2.0, 2.0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < hidden; ++j) {
        h[r * 2 * hidden + j] = from_double<T>(gate[r * hidden + j]);
        h[r * 2 * hidden + hidden + j] = from_double<T>(up[r * hidden + j]);
      }
    }
    const std::vector<T> dy = to_type<T>(random_uniform(n_out, rng, -2.0, 2.0));
    std::vector<A> scale;
    if (scaled) {
      for (double v : random_uniform(rows, rng, 0.25, 1.25)) scale.push_back(static_cast<A>(v));
    }
    const A* scale_host = scaled ? scale.data() : nullptr;

    std::vector<T> want_out(n_out, garbage<T>()), want_grad_h(n_h, garbage<T>());
    std::vector<A> want_grad_scale(rows, std::numeric_limits<A>::quiet_NaN());
    swiglu_ref(dtype, h.data(), rows, hidden, want_out.data(), scale_host);
    swiglu_backward_ref(dtype, dy.data(), h.data(), rows, hidden, want_grad_h.data(), scale_host,
                        scaled ? want_grad_scale.data() : nullptr);

    // Magnitudes of the accumulation-type errors: |silu(g) u| for the output, |dy silu(g)| for the up half of
    // the gradient, and |dy u| s (1 + |g|) for its gate half, whose factor 1 + g (1 - s) cancels near g = -1.28
    // and whose 1 - s cancels for large g.
    std::vector<double> out_scale(n_out), grad_h_scale(n_h), grad_scale_scale(rows, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const double f = scaled ? static_cast<double>(scale[r]) : 1.0;
      for (int64_t j = 0; j < hidden; ++j) {
        const double g = to_double(h[r * 2 * hidden + j]), u = to_double(h[r * 2 * hidden + hidden + j]);
        const double d = to_double(dy[r * hidden + j]), s = 1.0 / (1.0 + std::exp(-g));
        out_scale[r * hidden + j] = std::fabs(g * s * u) * f;
        grad_h_scale[r * 2 * hidden + j] = std::fabs(d * u) * s * (1.0 + std::fabs(g)) * f;
        grad_h_scale[r * 2 * hidden + hidden + j] = std::fabs(d * g * s) * f;
        grad_scale_scale[r] += std::fabs(d * g * s * u);
      }
    }
    const DeviceBuffer d_scale(scale, stream_);
    const A* scale_ptr = d_scale.as<A>();  // nullptr without a scale (and for 0 rows)

    for (const Layout& layout : kLayouts) {
      SCOPED_TRACE(where + ", " + layout.name);
      const DeviceBuffer d_h = upload_shifted(h, layout.input_shift), d_dy = upload_shifted(dy, layout.input_shift);
      const T* h_ptr = d_h.as<T>() + layout.input_shift;
      const T* dy_ptr = d_dy.as<T>() + layout.input_shift;

      auto forward = [&] {
        DeviceBuffer d_out((n_out + 2) * sizeof(T), stream_);
        d_out.poison();  // 0xFF bytes (NaN) until written
        swiglu_cuda(dtype, h_ptr, rows, hidden, d_out.as<T>() + layout.output_shift, stream_, scale_ptr);
        return download_checked<T>(d_out, n_out, layout.output_shift, "out");
      };
      const std::vector<T> out = forward();
      EXPECT_TRUE(close_to_reference(out, want_out, out_scale)) << "out";
      const std::vector<T> out_again = forward();
      EXPECT_TRUE(same_bits(out_again.data(), out.data(), n_out)) << "out: a second run differs";

      std::vector<A> grad_scale;
      auto backward = [&] {
        DeviceBuffer d_grad_h((n_h + 2) * sizeof(T), stream_), d_grad_scale((rows + 2) * sizeof(A), stream_);
        d_grad_h.poison();
        d_grad_scale.poison();
        swiglu_backward_cuda(dtype, dy_ptr, h_ptr, rows, hidden, d_grad_h.as<T>() + layout.output_shift, stream_,
                             scale_ptr, scale_ptr != nullptr ? d_grad_scale.as<A>() + 1 : nullptr);
        grad_scale = download_checked<A>(d_grad_scale, scaled ? rows : 0, 1, "grad_scale");
        return download_checked<T>(d_grad_h, n_h, layout.output_shift, "grad_h");
      };
      const std::vector<T> grad_h = backward();
      const std::vector<A> first_grad_scale = grad_scale;
      EXPECT_TRUE(close_to_reference(grad_h, want_grad_h, grad_h_scale)) << "grad_h";
      const std::vector<T> grad_h_again = backward();
      EXPECT_TRUE(same_bits(grad_h_again.data(), grad_h.data(), n_h)) << "grad_h: a second run differs";
      EXPECT_TRUE(same_bits(grad_scale.data(), first_grad_scale.data(), grad_scale.size()))
          << "grad_scale: a second run differs";
      if (scaled) {
        const double eps_a = std::numeric_limits<A>::epsilon();
        for (int64_t r = 0; r < rows; ++r) {
          const double got = first_grad_scale[r], want = want_grad_scale[r];
          EXPECT_LE(std::fabs(got - want),
                    kAccUlps * eps_a * grad_scale_scale[r] + std::numeric_limits<A>::denorm_min())
              << "grad_scale[" << r << "]: device " << got << ", reference " << want;
        }
      }
    }
  }
};

// hidden 1 and 3 never allow 16-byte chunks; 8, 768 and 1000 do for every dtype (8 halves, 2 doubles or 4 floats
// per chunk) when aligned. 0 rows and 0 hidden launch nothing and must write nothing (but grad_scale, which is 0
// for a row of no columns).
TEST_F(CudaSwiglu, MatchesReferenceForEveryDtypeShapeAndAlignment) {
  std::mt19937 rng(29);
  for (int64_t rows : {0, 1, 7, 1000}) {
    for (int64_t hidden : {0, 1, 3, 8, 768, 1000}) {
      for (bool scaled : {false, true}) {
        check<float>(rows, hidden, scaled, rng);
        check<double>(rows, hidden, scaled, rng);
        check<fp16_t>(rows, hidden, scaled, rng);
        check<bf16_t>(rows, hidden, scaled, rng);
      }
    }
  }
}

// The size check runs on the host before anything touches the device, so this needs no GPU.
TEST(CudaSwigluSizes, NegativeSizesThrowNamingTheFunctionAndValues) {
  EXPECT_THAT(error_text([] { swiglu_cuda(DType::kFloat32, nullptr, -1, 4, nullptr, nullptr); }),
              ::testing::HasSubstr("swiglu_cuda: num_rows and hidden must be >= 0, got -1 and 4"));
  EXPECT_THAT(error_text([] { swiglu_backward_cuda(DType::kBFloat16, nullptr, nullptr, 3, -2, nullptr, nullptr); }),
              ::testing::HasSubstr("swiglu_backward_cuda: num_rows and hidden must be >= 0, got 3 and -2"));
  const float scale = 1.0f;
  EXPECT_THAT(error_text([&] {
                swiglu_backward_cuda(DType::kFloat32, nullptr, nullptr, 3, 2, nullptr, nullptr, &scale, nullptr);
              }),
              ::testing::HasSubstr("swiglu_backward_cuda: scale and grad_scale must be given together"));
}

// gelu_backward_bias_cuda against gelu_backward_bias_ref: grad_h within the rounding of T plus kAccUlps ulps of the
// accumulation type (erf and exp round differently on the host and the device); grad_bias bit for bit the bias
// gradient grouped_linear_backward_cuda sums from the kernel's own grad_h (the kernel's purpose: the same sums,
// without reading grad_h back), and within rounding of the reference's sums. Aligned operands (the 16-byte path
// when hidden allows) and every operand one element off (the scalar path); poisoned bytes around each output; two
// runs give the same bits. The cases: an expert without rows, rows past the last expert, rows beyond one pass of
// the kernel's lanes, no rows, no experts.
class CudaGeluBackwardBias : public CudaSwiglu {  // its shifted, poison-checked buffers
 protected:
  template <typename T>
  void check(int64_t rows, int64_t hidden, const std::vector<int64_t>& offsets, std::mt19937& rng) {
    const DType dtype = dtype_of<T>();
    const int64_t num_experts = static_cast<int64_t>(offsets.size()) - 1;
    const size_t n = rows * hidden, n_bias = num_experts * hidden;
    const std::string where = std::string(dtype_name(dtype)) + " rows=" + std::to_string(rows) +
                              " hidden=" + std::to_string(hidden) + " experts=" + std::to_string(num_experts);
    const std::vector<T> dy = to_type<T>(random_uniform(n, rng, -2.0, 2.0));
    const std::vector<T> x = to_type<T>(random_uniform(n, rng, -6.0, 6.0));
    std::vector<T> want_h(n, garbage<T>()), want_bias(n_bias, garbage<T>());
    gelu_backward_bias_ref(dtype, dy.data(), x.data(), rows, hidden, offsets.data(), num_experts, want_h.data(),
                           want_bias.data());
    // |dy| (|cdf| + |x pdf|) bounds the terms whose accumulation-type roundings differ
    std::vector<double> h_scale(n);
    for (size_t i = 0; i < n; ++i) h_scale[i] = std::fabs(to_double(dy[i])) * (1.0 + std::fabs(to_double(x[i])));
    const DeviceBuffer d_offsets(offsets, stream_);
    for (const Layout& layout : {kLayouts[0], kLayouts[1]}) {
      SCOPED_TRACE(where + ", " + layout.name);
      const DeviceBuffer d_dy = upload_shifted(dy, layout.input_shift), d_x = upload_shifted(x, layout.input_shift);
      auto run = [&](std::vector<T>* grad_bias, std::vector<T>* summed_back) {
        DeviceBuffer d_h((n + 2) * sizeof(T), stream_), d_bias((n_bias + 2) * sizeof(T), stream_);
        DeviceBuffer d_summed((n_bias + 2) * sizeof(T), stream_);
        d_h.poison();
        d_bias.poison();
        d_summed.poison();
        T* h_ptr = d_h.as<T>() + layout.output_shift;
        gelu_backward_bias_cuda(dtype, d_dy.as<T>() + layout.input_shift, d_x.as<T>() + layout.input_shift, rows,
                                hidden, d_offsets.as<int64_t>(), num_experts, h_ptr, d_bias.as<T>() + 1, stream_);
        grouped_linear_backward_cuda(dtype, h_ptr, nullptr, rows, 0, d_offsets.as<int64_t>(), num_experts, nullptr,
                                     hidden, nullptr, nullptr, d_summed.as<T>() + 1, stream_);
        *grad_bias = download_checked<T>(d_bias, n_bias, 1, "grad_bias");
        *summed_back = download_checked<T>(d_summed, n_bias, 1, "grouped_linear_backward's grad_bias");
        return download_checked<T>(d_h, n, layout.output_shift, "grad_h");
      };
      std::vector<T> grad_bias, summed_back, again_bias, again_summed;
      const std::vector<T> grad_h = run(&grad_bias, &summed_back);
      EXPECT_TRUE(close_to_reference(grad_h, want_h, h_scale)) << "grad_h";
      EXPECT_TRUE(same_bits(grad_bias.data(), summed_back.data(), n_bias))
          << "grad_bias differs from grouped_linear_backward's sums of the same grad_h";
      // against the reference's sums: each term may differ by its own bound (eps_T |term| and the accumulation
      // type's ulps of h_scale), and the two sums' orders by n eps_A of the terms' magnitudes; in units of
      // kAccUlps eps_A, as close_to_reference takes them
      const double eps_a = std::numeric_limits<acc_t<T>>::epsilon();
      std::vector<double> sum_scale(n_bias, 0.0);
      for (int64_t e = 0; e < num_experts; ++e) {
        const double terms = static_cast<double>(offsets[e + 1] - offsets[e]);
        for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
          for (int64_t j = 0; j < hidden; ++j) {
            const double magnitude = std::fabs(to_double(want_h[r * hidden + j]));
            sum_scale[e * hidden + j] +=
                magnitude * (epsilon_of<T>() / (kAccUlps * eps_a) + terms / kAccUlps) + h_scale[r * hidden + j];
          }
        }
      }
      EXPECT_TRUE(close_to_reference(grad_bias, want_bias, sum_scale)) << "grad_bias";
      const std::vector<T> grad_h_again = run(&again_bias, &again_summed);
      EXPECT_TRUE(same_bits(grad_h_again.data(), grad_h.data(), n)) << "grad_h: a second run differs";
      EXPECT_TRUE(same_bits(again_bias.data(), grad_bias.data(), n_bias)) << "grad_bias: a second run differs";
    }
  }
};

TEST_F(CudaGeluBackwardBias, MatchesReferenceAndTheBiasGradientOfItsOwnOutput) {
  std::mt19937 rng(43);
  const std::vector<std::pair<int64_t, std::vector<int64_t>>> row_cases = {
      {40, {0, 10, 10, 25, 40}},  // an expert without rows
      {33, {0, 5, 20, 30}},       // three rows past the last expert
      {700, {0, 300, 310, 700}},  // more rows than one pass of the lanes (8 rows in flight each)
      {0, {0, 0, 0}},             // no rows: zero bias gradients
      {12, {0}},                  // no experts: every row is past the last one
  };
  for (const auto& [rows, offsets] : row_cases) {
    for (int64_t hidden : {1, 37, 64, 200}) {
      check<float>(rows, hidden, offsets, rng);
      check<double>(rows, hidden, offsets, rng);
      check<fp16_t>(rows, hidden, offsets, rng);
      check<bf16_t>(rows, hidden, offsets, rng);
    }
  }
}

TEST(CudaGeluBackwardBiasSizes, NegativeSizesThrowNamingTheFunctionAndValues) {
  EXPECT_THAT(error_text([] {
                gelu_backward_bias_cuda(DType::kBFloat16, nullptr, nullptr, 3, -2, nullptr, 1, nullptr, nullptr,
                                        nullptr);
              }),
              ::testing::HasSubstr("gelu_backward_bias_cuda: sizes must be >= 0, got num_rows 3, hidden -2"));
}

}  // namespace
}  // namespace test
}  // namespace fastmoe
