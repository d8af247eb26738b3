// The CUTLASS SM90 grouped GEMM backend of grouped_linear (csrc/kernels/expert/cutlass_grouped.cu) against the CPU
// reference (csrc/ref/expert_ref.h), as test_kernels_cuda.cpp tests the tiled kernel: fp16 and bf16 inputs from a
// fixed seed, outputs pre-filled with NaN so that an element the kernels forget to write fails, each 16-bit output
// within 2 ulps or 1% of the reference plus a floor for the fp32 accumulation error of sums that cancel. The tail
// rows and the weight gradient of experts without rows must be exact zeros.
//
// Skipped without a CUDA device, on devices other than compute capability 9.0 (the kernels are sm_90a code), and
// in builds without the CUTLASS backend.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "core/cuda_check.h"
#include "cuda_test_util.h"
#include "test_util.h"
#ifdef FASTMOE_WITH_CUTLASS
#include "kernels/expert/cutlass_grouped.h"
#include "kernels/expert/expert.h"
#include "ref/expert_ref.h"
#endif

namespace fastmoe {
namespace test {
namespace {

#ifndef FASTMOE_WITH_CUTLASS

TEST(CudaCutlassGroupedLinear, BuiltWithoutCutlass) {
  GTEST_SKIP() << "fastmoe was built without the CUTLASS backend (CMake found no CUTLASS headers or no sm_90 "
                  "architecture)";
}

#else

// Spacing of the 16-bit type T just above |x| (x rounded to T first).
template <typename T>
double ulp_above(double x) {
  const T value = from_double<T>(std::fabs(x));
  return to_double(T{static_cast<uint16_t>(value.bits + 1)}) - to_double(value);
}

// 16-bit GEMM outputs against the reference (inputs in [-1, 1], sums of reduction_len products): element-wise
// within max(2 ulps, 1%) plus 4 * reduction_len fp32 roundoffs for results that cancel; NaN only against NaN.
template <typename T>
::testing::AssertionResult gemm_close(const std::vector<T>& got, const std::vector<T>& want, int64_t reduction_len) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " != expected size " << want.size();
  }
  const double floor = 4.0 * static_cast<double>(reduction_len) * std::ldexp(1.0, -24);
  size_t failures = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i].bits == want[i].bits) continue;
    const double g = to_double(got[i]), w = to_double(want[i]);
    if (std::fabs(g - w) <= std::max(2 * ulp_above<T>(w), 1e-2 * std::fabs(w)) + floor) continue;
    if (failures++ == 0) first = i;
  }
  if (failures == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << failures << " of " << got.size() << " elements off; first at [" << first
                                       << "]: got " << describe(got[first]) << ", want " << describe(want[first]);
}

// Elements [begin, end) of values are +0 bit for bit.
template <typename T>
::testing::AssertionResult exact_zeros(const std::vector<T>& values, size_t begin, size_t end) {
  for (size_t i = begin; i < end; ++i) {
    if (values[i].bits != 0) return ::testing::AssertionFailure() << "element " << i << " is " << describe(values[i]);
  }
  return ::testing::AssertionSuccess();
}

struct CutlassCase {
  std::vector<int64_t> counts;        // rows per expert
  int64_t tail_rows;                  // rows past offsets[E]
  int64_t in_features, out_features;  // multiples of 8
  bool bias;
};

std::vector<CutlassCase> cutlass_cases(std::mt19937& rng) {
  std::uniform_int_distribution<int64_t> count(0, 5);
  std::vector<int64_t> many(300);
  for (int64_t& c : many) c = count(rng);
  return {
      {{37, 0, 64, 5}, 7, 40, 72, true},         // an empty expert, a tail, sizes off the 128x256x64 tile grid
      {{37, 0, 64, 5}, 7, 40, 72, false},        // no bias
      {{1, 2, 3}, 0, 8, 16, true},               // the narrowest rows TMA takes, K below one k-tile
      {{0, 0, 200, 0}, 0, 64, 48, true},         // every row to one expert
      {{0, 0, 0}, 10, 8, 8, true},               // every row in the tail: no GEMM tile at all
      {many, 3, 24, 16, true},                   // more experts than the scheduler's warp scans at once
      {{300, 129, 0, 1000}, 5, 264, 520, true},  // several tiles along M, N and K in every GEMM
      {{300, 0, 129, 40}, 3, 64, 520, true},     // a tall weight (out >= 3x in): its own weight-gradient kernel
  };
}

template <typename T>
class CudaCutlassGroupedLinear : public CudaKernelTest {
 protected:
  void SetUp() override {
    CudaKernelTest::SetUp();
    if (IsSkipped()) return;
    int device = 0, major = 0, minor = 0;
    FMOE_CHECK_CUDA(cudaGetDevice(&device));
    FMOE_CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    FMOE_CHECK_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    if (major != 9 || minor != 0) {
      GTEST_SKIP() << "the CUTLASS kernels are sm_90a code; device " << device << " has compute capability " << major
                   << "." << minor;
    }
  }

  struct Inputs {
    std::vector<int64_t> offsets;
    int64_t num_rows = 0, num_experts = 0;
    std::vector<T> x, weight, bias, grad_y;
  };

  static Inputs make_inputs(const CutlassCase& c, std::mt19937& rng) {
    Inputs in;
    in.num_experts = static_cast<int64_t>(c.counts.size());
    in.offsets.assign(in.num_experts + 1, 0);
    for (int64_t e = 0; e < in.num_experts; ++e) in.offsets[e + 1] = in.offsets[e] + c.counts[e];
    in.num_rows = in.offsets[in.num_experts] + c.tail_rows;
    auto values = [&](int64_t count) { return to_type<T>(random_uniform(static_cast<size_t>(count), rng, -1, 1)); };
    in.x = values(in.num_rows * c.in_features);
    in.weight = values(in.num_experts * c.out_features * c.in_features);
    if (c.bias) in.bias = values(in.num_experts * c.out_features);
    in.grad_y = values(in.num_rows * c.out_features);
    return in;
  }

  DeviceBuffer workspace(int64_t num_experts) {
    return DeviceBuffer(cutlass_grouped_linear_workspace_bytes(dtype_of<T>(), num_experts), this->stream_);
  }
};
TYPED_TEST_SUITE(CudaCutlassGroupedLinear, HalfTypes, DTypeNames);

TYPED_TEST(CudaCutlassGroupedLinear, ForwardMatchesReference) {
  using T = TypeParam;
  std::mt19937 rng(81);
  for (const CutlassCase& c : cutlass_cases(rng)) {
    const auto in = this->make_inputs(c, rng);
    SCOPED_TRACE(::testing::Message() << "E=" << in.num_experts << " rows=" << in.num_rows << " in=" << c.in_features
                                      << " out=" << c.out_features << " tail=" << c.tail_rows << " bias=" << c.bias);
    const T* bias = c.bias ? in.bias.data() : nullptr;
    std::vector<T> want(in.num_rows * c.out_features);
    grouped_linear_ref(dtype_of<T>(), in.x.data(), in.num_rows, c.in_features, in.offsets.data(), in.num_experts,
                       in.weight.data(), c.out_features, bias, want.data());
    // The bias is added to the fp32 accumulator in the GEMM's epilogue and the sum rounded once, as the reference
    // does: no allowance for a rounding of the product before the bias.
    DeviceBuffer d_x(in.x, this->stream_), d_offsets(in.offsets, this->stream_), d_w(in.weight, this->stream_),
        d_b(in.bias, this->stream_), d_y(want.size() * sizeof(T), this->stream_);
    DeviceBuffer ws = this->workspace(in.num_experts);
    d_y.poison();
    ws.poison();  // the setup kernel must write every entry the GEMM reads
    cutlass_grouped_linear_cuda(dtype_of<T>(), d_x.get(), in.num_rows, c.in_features, d_offsets.as<int64_t>(),
                                in.num_experts, d_w.get(), c.out_features, c.bias ? d_b.get() : nullptr, d_y.get(),
                                ws.get(), cutlass_grouped_linear_workspace_bytes(dtype_of<T>(), in.num_experts),
                                this->stream_);
    const std::vector<T> got = d_y.download<T>(want.size());
    EXPECT_TRUE(gemm_close(got, want, c.in_features + 1));
    const size_t routed = static_cast<size_t>(in.offsets.back() * c.out_features);
    EXPECT_TRUE(exact_zeros(got, routed, got.size())) << "tail rows";
  }
}

TYPED_TEST(CudaCutlassGroupedLinear, BackwardMatchesReference) {
  using T = TypeParam;
  std::mt19937 rng(82);
  for (const CutlassCase& c : cutlass_cases(rng)) {
    const auto in = this->make_inputs(c, rng);
    const size_t x_size = in.x.size(), w_size = in.weight.size();
    std::vector<T> want_x(x_size), want_w(w_size);
    grouped_linear_backward_ref(dtype_of<T>(), in.grad_y.data(), in.x.data(), in.num_rows, c.in_features,
                                in.offsets.data(), in.num_experts, in.weight.data(), c.out_features, want_x.data(),
                                want_w.data(), nullptr);
    const size_t b_size = static_cast<size_t>(in.num_experts * c.out_features);
    DeviceBuffer d_grad_y(in.grad_y, this->stream_), d_x(in.x, this->stream_), d_offsets(in.offsets, this->stream_),
        d_w(in.weight, this->stream_), d_gx(x_size * sizeof(T), this->stream_), d_gw(w_size * sizeof(T), this->stream_),
        d_gb(b_size * sizeof(T), this->stream_), d_gb_tiled(b_size * sizeof(T), this->stream_);
    DeviceBuffer ws = this->workspace(in.num_experts);
    // The bias gradient the tiled backend computes (itself tested against the reference): the same sums in the
    // same order, so the same bits.
    grouped_linear_backward_cuda(dtype_of<T>(), d_grad_y.get(), d_x.get(), in.num_rows, c.in_features,
                                 d_offsets.as<int64_t>(), in.num_experts, d_w.get(), c.out_features, nullptr, nullptr,
                                 d_gb_tiled.get(), this->stream_);
    const std::vector<T> want_b = d_gb_tiled.download<T>(b_size);
    const size_t ws_bytes = cutlass_grouped_linear_workspace_bytes(dtype_of<T>(), in.num_experts);
    const int64_t longest = std::max({in.num_rows, c.in_features, c.out_features});
    const size_t routed_x = static_cast<size_t>(in.offsets.back() * c.in_features);
    const size_t expert_w = static_cast<size_t>(c.out_features * c.in_features);
    // mask bit 0: grad_x, bit 1: grad_weight, bit 2: grad_bias. All at once, then each alone (the others null).
    for (int mask : {7, 1, 2, 4}) {
      SCOPED_TRACE(::testing::Message() << "E=" << in.num_experts << " rows=" << in.num_rows << " in=" << c.in_features
                                        << " out=" << c.out_features << " tail=" << c.tail_rows
                                        << " outputs mask=" << mask);
      d_gx.poison();
      d_gw.poison();
      d_gb.poison();
      ws.poison();
      cutlass_grouped_linear_backward_cuda(dtype_of<T>(), d_grad_y.get(), d_x.get(), in.num_rows, c.in_features,
                                           d_offsets.as<int64_t>(), in.num_experts, d_w.get(), c.out_features,
                                           (mask & 1) ? d_gx.get() : nullptr, (mask & 2) ? d_gw.get() : nullptr,
                                           (mask & 4) ? d_gb.get() : nullptr, ws.get(), ws_bytes, this->stream_);
      if (mask & 4) {
        const std::vector<T> gb = d_gb.download<T>(b_size);
        EXPECT_TRUE(same_bits(gb.data(), want_b.data(), b_size)) << "grad_bias";
      }
      if (mask & 1) {
        const std::vector<T> gx = d_gx.download<T>(x_size);
        EXPECT_TRUE(gemm_close(gx, want_x, longest)) << "grad_x";
        EXPECT_TRUE(exact_zeros(gx, routed_x, gx.size())) << "grad_x of the tail rows";
      }
      if (mask & 2) {
        const std::vector<T> gw = d_gw.download<T>(w_size);
        EXPECT_TRUE(gemm_close(gw, want_w, longest)) << "grad_weight";
        for (int64_t e = 0; e < in.num_experts; ++e) {
          if (c.counts[e] == 0) {
            EXPECT_TRUE(exact_zeros(gw, e * expert_w, (e + 1) * expert_w)) << "grad_weight of empty expert " << e;
          }
        }
      }
    }
  }
}

TYPED_TEST(CudaCutlassGroupedLinear, ZeroRowsWriteZeroWeightAndBiasGrads) {
  using T = TypeParam;
  const int64_t experts = 3, in_features = 16, out_features = 8;
  const std::vector<int64_t> offsets(experts + 1, 0);
  DeviceBuffer d_offsets(offsets, this->stream_), d_w(experts * out_features * in_features * sizeof(T), this->stream_),
      d_gw(experts * out_features * in_features * sizeof(T), this->stream_),
      d_gb(experts * out_features * sizeof(T), this->stream_);
  DeviceBuffer ws = this->workspace(experts);
  const size_t ws_bytes = cutlass_grouped_linear_workspace_bytes(dtype_of<T>(), experts);
  d_gw.poison();
  d_gb.poison();
  EXPECT_NO_THROW(cutlass_grouped_linear_cuda(dtype_of<T>(), nullptr, 0, in_features, d_offsets.as<int64_t>(), experts,
                                              d_w.get(), out_features, nullptr, nullptr, ws.get(), ws_bytes,
                                              this->stream_));
  cutlass_grouped_linear_backward_cuda(dtype_of<T>(), nullptr, nullptr, 0, in_features, d_offsets.as<int64_t>(),
                                       experts, d_w.get(), out_features, nullptr, d_gw.get(), d_gb.get(), ws.get(),
                                       ws_bytes, this->stream_);
  const std::vector<T> gw = d_gw.download<T>(experts * out_features * in_features);
  EXPECT_TRUE(exact_zeros(gw, 0, gw.size()));
  const std::vector<T> gb = d_gb.download<T>(experts * out_features);
  EXPECT_TRUE(exact_zeros(gb, 0, gb.size())) << "grad_bias";
}

TYPED_TEST(CudaCutlassGroupedLinear, OffsetsPastTheRowsLeaveZeroGradients) {
  // Offsets the op layer does not check on CUDA: the GEMMs clamp them into [0, num_rows], and an expert left with
  // no rows by that clamp gets zero weight and bias gradients, not whatever the buffers held.
  using T = TypeParam;
  const int64_t experts = 3, rows = 4, in_features = 16, out_features = 8;
  const std::vector<int64_t> offsets = {0, 4, 6, 9};
  std::mt19937 rng(83);
  const std::vector<T> grad_y = to_type<T>(random_uniform(rows * out_features, rng, -1, 1));
  const std::vector<T> x = to_type<T>(random_uniform(rows * in_features, rng, -1, 1));
  const std::vector<T> w = to_type<T>(random_uniform(experts * out_features * in_features, rng, -1, 1));
  const size_t w_size = w.size(), b_size = static_cast<size_t>(experts * out_features);
  DeviceBuffer d_offsets(offsets, this->stream_), d_grad_y(grad_y, this->stream_), d_x(x, this->stream_),
      d_w(w, this->stream_), d_gw(w_size * sizeof(T), this->stream_), d_gb(b_size * sizeof(T), this->stream_);
  DeviceBuffer ws = this->workspace(experts);
  const size_t ws_bytes = cutlass_grouped_linear_workspace_bytes(dtype_of<T>(), experts);
  for (int64_t num_rows : {rows, int64_t{0}}) {
    SCOPED_TRACE(::testing::Message() << "num_rows=" << num_rows);
    d_gw.poison();
    d_gb.poison();
    cutlass_grouped_linear_backward_cuda(dtype_of<T>(), d_grad_y.get(), d_x.get(), num_rows, in_features,
                                         d_offsets.as<int64_t>(), experts, d_w.get(), out_features, nullptr, d_gw.get(),
                                         d_gb.get(), ws.get(), ws_bytes, this->stream_);
    const std::vector<T> gw = d_gw.download<T>(w_size), gb = d_gb.download<T>(b_size);
    const size_t expert_w = static_cast<size_t>(out_features * in_features);
    const size_t first_empty = num_rows == 0 ? 0 : 1;  // with 4 rows expert 0 keeps them all
    EXPECT_TRUE(exact_zeros(gw, first_empty * expert_w, w_size)) << "grad_weight";
    EXPECT_TRUE(exact_zeros(gb, first_empty * out_features, b_size)) << "grad_bias";
  }
}

TYPED_TEST(CudaCutlassGroupedLinear, RejectsWhatTmaCannotLoad) {
  using T = TypeParam;
  const int64_t experts = 2, rows = 16, out_features = 8;
  const std::vector<int64_t> offsets = {0, 8, 16};
  DeviceBuffer d_offsets(offsets, this->stream_), d_x(rows * 24 * sizeof(T), this->stream_),
      d_w(experts * out_features * 24 * sizeof(T), this->stream_), d_y(rows * out_features * sizeof(T), this->stream_);
  DeviceBuffer ws = this->workspace(experts);
  const size_t ws_bytes = cutlass_grouped_linear_workspace_bytes(dtype_of<T>(), experts);
  auto forward = [&](const void* x, int64_t in_features, size_t bytes) {
    return error_text([&] {
      cutlass_grouped_linear_cuda(dtype_of<T>(), x, rows, in_features, d_offsets.as<int64_t>(), experts, d_w.get(),
                                  out_features, nullptr, d_y.get(), ws.get(), bytes, this->stream_);
    });
  };
  EXPECT_THAT(forward(d_x.get(), 12, ws_bytes), ::testing::HasSubstr("in_features must be a positive multiple of 8"));
  EXPECT_THAT(forward(d_x.as<T>() + 1, 16, ws_bytes), ::testing::HasSubstr("x must be 16-byte aligned"));
  EXPECT_THAT(forward(d_x.get(), 16, ws_bytes - 1), ::testing::HasSubstr("the workspace must hold"));
  EXPECT_THAT(error_text([&] {
                cutlass_grouped_linear_cuda(DType::kFloat32, d_x.get(), rows, 16, d_offsets.as<int64_t>(), experts,
                                            d_w.get(), out_features, nullptr, d_y.get(), ws.get(), ws_bytes,
                                            this->stream_);
              }),
              ::testing::HasSubstr("dtype must be float16 or bfloat16, got float32"));
}

#endif  // FASTMOE_WITH_CUTLASS

}  // namespace
}  // namespace test
}  // namespace fastmoe
