// Tests of the CUDA kernels (csrc/kernels/**) against the CPU references (csrc/ref/), without torch.
//
// Every test generates inputs on the host from a fixed seed, runs the reference and the kernel on the same inputs
// and compares under the numerics policy (docs/numerics.md): ids, plans and data movement bit for bit; the
// deterministic combine within the rounding of its accumulation type; math (softmax, GEMM) within a relative
// tolerance, or a few ulps of the 16-bit output types. Kernel outputs are filled with 0xFF bytes (NaN for every
// float type, -1 for ids) before each run, so an element a kernel forgets to write fails the comparison.
//
// Without a usable CUDA device (the CI machine) every test is skipped with the reason.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/cuda_check.h"
#include "cuda_test_util.h"
#include "kernels/dispatch/dispatch.h"
#include "kernels/expert/expert.h"
#include "kernels/routing/routing.h"
#include "test_util.h"

namespace fastmoe {
namespace test {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Comparisons.

// Spacing of T just above |x| (x rounded to T first).
template <typename T>
double ulp_at(double x) {
  const T value = from_double<T>(std::fabs(x));
  if constexpr (kIs16Bit<T>) {
    return to_double(T{static_cast<uint16_t>(value.bits + 1)}) - to_double(value);
  } else {
    return static_cast<double>(std::nextafter(value, std::numeric_limits<T>::infinity())) - static_cast<double>(value);
  }
}

// Unit roundoff of the accumulation type of T.
template <typename T>
constexpr double acc_roundoff() {
  return std::is_same_v<T, double> ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
}

// Element i passes when it has the same bits as want[i], or both are NaN, or |got - want| <= allowed(i, want).
template <typename T, typename Allowed>
::testing::AssertionResult elements_close(const std::vector<T>& got, const std::vector<T>& want, Allowed&& allowed) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " != expected size " << want.size();
  }
  size_t failures = 0, first = 0;
  double first_allowed = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (raw_bits(got[i]) == raw_bits(want[i])) continue;
    const double g = to_double(got[i]), w = to_double(want[i]);
    if (std::isnan(g) && std::isnan(w)) continue;
    const double tolerance = allowed(i, w);
    if (std::fabs(g - w) <= tolerance) continue;  // false for a NaN on one side only
    if (failures++ == 0) {
      first = i;
      first_allowed = tolerance;
    }
  }
  if (failures == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << failures << " of " << got.size() << " elements off; first at [" << first
                                       << "]: got " << describe(got[first]) << ", want " << describe(want[first])
                                       << ", allowed difference " << first_allowed;
}

// Math against the reference: relative rtol per element for fp32/fp64, `ulps` steps of the 16-bit types, plus an
// absolute floor for results that cancel to near zero.
template <typename T>
::testing::AssertionResult math_close(const std::vector<T>& got, const std::vector<T>& want, double rtol_fp64,
                                      double rtol_fp32, int ulps, double abs_floor) {
  return elements_close(got, want, [&](size_t, double w) {
    if constexpr (kIs16Bit<T>) {
      return ulps * ulp_at<T>(w) + abs_floor;
    } else {
      return (std::is_same_v<T, double> ? rtol_fp64 : rtol_fp32) * std::fabs(w) + abs_floor;
    }
  });
}

// GEMM outputs (inputs in [-1, 1], reductions of length reduction_len): fp32 and fp64 by the norm-wise relative
// error ||got - want|| / ||want|| (< 1e-5 and < 1e-12); 16-bit types element-wise within 2 ulps or 1e-2 relative,
// with a floor for the fp32 accumulation error of results that cancel.
template <typename T>
::testing::AssertionResult gemm_close(const std::vector<T>& got, const std::vector<T>& want, int64_t reduction_len) {
  if constexpr (kIs16Bit<T>) {
    const double floor = 4.0 * static_cast<double>(reduction_len) * acc_roundoff<float>();
    return elements_close(got, want,
                          [&](size_t, double w) { return std::max(2 * ulp_at<T>(w), 1e-2 * std::fabs(w)) + floor; });
  } else {
    if (got.size() != want.size()) return ::testing::AssertionFailure() << "size mismatch";
    double diff2 = 0, ref2 = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double g = to_double(got[i]), w = to_double(want[i]);
      if (std::isnan(g) != std::isnan(w)) {
        return ::testing::AssertionFailure()
               << "element " << i << ": got " << describe(got[i]) << ", want " << describe(want[i]);
      }
      diff2 += (g - w) * (g - w);
      ref2 += w * w;
    }
    const double tolerance = std::is_same_v<T, double> ? 1e-12 : 1e-5;
    if (ref2 == 0 ? diff2 == 0 : std::sqrt(diff2 / ref2) < tolerance) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "||got - want|| = " << std::sqrt(diff2)
                                         << ", ||want|| = " << std::sqrt(ref2) << ", relative tolerance " << tolerance;
  }
}

template <typename T>
std::vector<T> random_values(size_t count, std::mt19937& rng, double low = -1.0, double high = 1.0) {
  return to_type<T>(random_uniform(count, rng, low, high));
}

// Calls fn(S{}) for each of the four score dtypes.
template <typename Fn>
void for_each_score_type(Fn&& fn) {
  fn(float{});
  fn(double{});
  fn(fp16_t{});
  fn(bf16_t{});
}

// Random routing ids in [0, num_experts) with a fraction dropped (-1).
std::vector<int64_t> random_routing(int64_t num_pairs, int64_t num_experts, double drop_fraction, std::mt19937& rng) {
  std::uniform_int_distribution<int64_t> expert(0, num_experts - 1);
  std::bernoulli_distribution dropped(drop_fraction);
  std::vector<int64_t> idx(num_pairs);
  for (int64_t& id : idx) id = dropped(rng) ? -1 : expert(rng);
  return idx;
}

struct Plan {
  std::vector<int64_t> counts, offsets, sorted_pair, pair_pos;
};

Plan plan_ref(const std::vector<int64_t>& idx, int64_t num_experts) {
  const int64_t num_pairs = static_cast<int64_t>(idx.size());
  Plan plan{std::vector<int64_t>(num_experts), std::vector<int64_t>(num_experts + 1), std::vector<int64_t>(num_pairs),
            std::vector<int64_t>(num_pairs)};
  make_plan_ref(idx.data(), num_pairs, num_experts, plan.counts.data(), plan.offsets.data(), plan.sorted_pair.data(),
                plan.pair_pos.data());
  return plan;
}

constexpr ScoreFn kScoreFns[] = {ScoreFn::kTopkThenSoftmax, ScoreFn::kSoftmaxThenTopk};

// ---------------------------------------------------------------------------------------------------------------
// Routing.

template <typename T>
class CudaRouteTopk : public CudaKernelTest {
 protected:
  // Runs reference and kernel on the same logits: ids bit for bit, scores within the softmax's rounding.
  void expect_matches_reference(const std::vector<T>& logits, int64_t num_tokens, int64_t num_experts, int64_t k,
                                ScoreFn fn) {
    SCOPED_TRACE(::testing::Message() << score_fn_name(fn) << " tokens=" << num_tokens << " E=" << num_experts
                                      << " k=" << k);
    const size_t n = static_cast<size_t>(num_tokens * k);
    std::vector<int64_t> ref_idx(n);
    std::vector<T> ref_score(n);
    route_topk_ref(dtype_of<T>(), logits.data(), num_tokens, num_experts, k, fn, ref_idx.data(), ref_score.data());

    DeviceBuffer d_logits(logits, stream_), d_idx(n * sizeof(int64_t), stream_), d_score(n * sizeof(T), stream_);
    d_idx.poison();
    d_score.poison();
    route_topk_cuda(dtype_of<T>(), d_logits.get(), num_tokens, num_experts, k, fn, d_idx.as<int64_t>(), d_score.get(),
                    stream_);
    const std::vector<int64_t> idx = d_idx.download<int64_t>(n);
    const std::vector<T> score = d_score.download<T>(n);
    EXPECT_TRUE(same_bits(idx.data(), ref_idx.data(), n));
    EXPECT_TRUE(math_close(score, ref_score, 1e-12, 1e-5, 1, 0.0));
  }
};
TYPED_TEST_SUITE(CudaRouteTopk, AllFloatTypes, DTypeNames);

TYPED_TEST(CudaRouteTopk, MatchesReferenceOnRandomLogits) {
  using T = TypeParam;
  std::mt19937 rng(11);
  struct Shape {
    int64_t tokens, experts, k;
  };
  for (const Shape s : {Shape{37, 8, 2}, Shape{128, 64, 6}, Shape{20, 256, 8}, Shape{6, 1000, 3}, Shape{3000, 16, 4}}) {
    const std::vector<T> logits = random_values<T>(s.tokens * s.experts, rng, -4.0, 4.0);
    for (ScoreFn fn : kScoreFns) this->expect_matches_reference(logits, s.tokens, s.experts, s.k, fn);
  }
}

TYPED_TEST(CudaRouteTopk, KEqualsNumExperts) {
  using T = TypeParam;
  std::mt19937 rng(12);
  for (int64_t experts : {1, 4, 40, 70}) {
    const int64_t tokens = 9;
    const std::vector<T> logits = random_values<T>(tokens * experts, rng, -4.0, 4.0);
    for (ScoreFn fn : kScoreFns) this->expect_matches_reference(logits, tokens, experts, experts, fn);
  }
}

TYPED_TEST(CudaRouteTopk, TiesNaNAndInfinityFollowReference) {
  using T = TypeParam;
  std::mt19937 rng(13);
  const int64_t tokens = 64, experts = 12, k = 5;
  // Small integers: many exact ties. Every fourth row gets NaNs, +inf, or -inf entries.
  std::vector<double> values = random_dyadic(tokens * experts, rng, -2, 2, 1);
  std::uniform_int_distribution<int64_t> position(0, experts - 1);
  for (int64_t t = 0; t < tokens; ++t) {
    double* row = values.data() + t * experts;
    if (t % 4 == 1) {
      for (int i = 0; i < 1 + t % 3; ++i) row[position(rng)] = std::numeric_limits<double>::quiet_NaN();
    } else if (t % 4 == 2) {
      row[position(rng)] = HUGE_VAL;
    } else if (t % 8 == 3) {
      for (int i = 0; i < 4; ++i) row[position(rng)] = -HUGE_VAL;
    } else if (t % 8 == 7) {
      for (int64_t e = 0; e < experts; ++e) row[e] = -HUGE_VAL;
    }
  }
  const std::vector<T> logits = to_type<T>(values);
  for (ScoreFn fn : kScoreFns) this->expect_matches_reference(logits, tokens, experts, k, fn);
}

TYPED_TEST(CudaRouteTopk, ZeroTokensLaunchesNothing) {
  using T = TypeParam;
  for (ScoreFn fn : kScoreFns) {
    EXPECT_NO_THROW(route_topk_cuda(dtype_of<T>(), nullptr, 0, 8, 2, fn, nullptr, nullptr, this->stream_));
    EXPECT_NO_THROW(route_topk_backward_cuda(dtype_of<T>(), nullptr, nullptr, nullptr, nullptr, 0, 8, 2, fn, nullptr,
                                             this->stream_));
  }
  FMOE_CHECK_CUDA(cudaStreamSynchronize(this->stream_));
}

template <typename T>
class CudaRouteTopkBackward : public CudaKernelTest {};
TYPED_TEST_SUITE(CudaRouteTopkBackward, AllFloatTypes, DTypeNames);

TYPED_TEST(CudaRouteTopkBackward, MatchesReference) {
  using T = TypeParam;
  std::mt19937 rng(21);
  struct Shape {
    int64_t tokens, experts, k;
  };
  for (const Shape s : {Shape{37, 8, 2}, Shape{64, 64, 6}, Shape{5, 40, 40}, Shape{7, 300, 4}}) {
    for (ScoreFn fn : kScoreFns) {
      SCOPED_TRACE(::testing::Message() << score_fn_name(fn) << " tokens=" << s.tokens << " E=" << s.experts
                                        << " k=" << s.k);
      const size_t n = static_cast<size_t>(s.tokens * s.k), m = static_cast<size_t>(s.tokens * s.experts);
      const std::vector<T> logits = random_values<T>(m, rng, -4.0, 4.0);
      const std::vector<T> grad_score = random_values<T>(n, rng);
      std::vector<int64_t> idx(n);
      std::vector<T> score(n), ref_grad(m);
      route_topk_ref(dtype_of<T>(), logits.data(), s.tokens, s.experts, s.k, fn, idx.data(), score.data());
      route_topk_backward_ref(dtype_of<T>(), grad_score.data(), logits.data(), idx.data(), score.data(), s.tokens,
                              s.experts, s.k, fn, ref_grad.data());

      DeviceBuffer d_grad_score(grad_score, this->stream_), d_logits(logits, this->stream_), d_idx(idx, this->stream_),
          d_score(score, this->stream_), d_grad(m * sizeof(T), this->stream_);
      d_grad.poison();
      route_topk_backward_cuda(dtype_of<T>(), d_grad_score.get(), d_logits.get(), d_idx.as<int64_t>(), d_score.get(),
                               s.tokens, s.experts, s.k, fn, d_grad.get(), this->stream_);
      const std::vector<T> got = d_grad.download<T>(m);
      EXPECT_TRUE(math_close(got, ref_grad, 1e-12, 1e-5, 1, 1e-6));
      if (fn == ScoreFn::kTopkThenSoftmax) {  // the logits are not read: a null pointer gives the same bits
        d_grad.poison();
        route_topk_backward_cuda(dtype_of<T>(), d_grad_score.get(), nullptr, d_idx.as<int64_t>(), d_score.get(),
                                 s.tokens, s.experts, s.k, fn, d_grad.get(), this->stream_);
        EXPECT_EQ(std::memcmp(d_grad.download<T>(m).data(), got.data(), m * sizeof(T)), 0);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Plan.

class CudaPlan : public CudaKernelTest {
 protected:
  // Runs make_plan_cuda with a workspace `misalign` bytes past a cudaMalloc'd base and an invalid counter that
  // starts at `invalid_start`; returns the plan and the final counter.
  Plan run_cuda(const std::vector<int64_t>& idx, int64_t num_experts, int64_t* invalid_out = nullptr,
                int64_t invalid_start = 0, size_t misalign = 0) {
    const int64_t num_pairs = static_cast<int64_t>(idx.size());
    const size_t workspace_bytes = make_plan_cuda_workspace_bytes(num_pairs, num_experts);
    DeviceBuffer d_idx(idx, stream_), d_counts(num_experts * sizeof(int64_t), stream_),
        d_offsets((num_experts + 1) * sizeof(int64_t), stream_), d_sorted(num_pairs * sizeof(int64_t), stream_),
        d_pos(num_pairs * sizeof(int64_t), stream_), d_invalid(std::vector<int64_t>{invalid_start}, stream_),
        d_workspace(workspace_bytes + misalign, stream_);
    for (DeviceBuffer* out : {&d_counts, &d_offsets, &d_sorted, &d_pos, &d_workspace}) out->poison();
    void* workspace = workspace_bytes > 0 ? static_cast<char*>(d_workspace.get()) + misalign : nullptr;
    make_plan_cuda(d_idx.as<int64_t>(), num_pairs, num_experts, d_counts.as<int64_t>(), d_offsets.as<int64_t>(),
                   d_sorted.as<int64_t>(), d_pos.as<int64_t>(), invalid_out ? d_invalid.as<int64_t>() : nullptr,
                   workspace, workspace_bytes, stream_);
    Plan plan{d_counts.download<int64_t>(num_experts), d_offsets.download<int64_t>(num_experts + 1),
              d_sorted.download<int64_t>(num_pairs), d_pos.download<int64_t>(num_pairs)};
    if (invalid_out != nullptr) *invalid_out = d_invalid.download<int64_t>(1)[0];
    return plan;
  }

  // The kernel's plan of `idx` equals the reference plan of `idx` with its invalid ids replaced by -1, and the
  // invalid counter grew by the number of invalid ids.
  void expect_matches_reference(const std::vector<int64_t>& idx, int64_t num_experts, size_t misalign = 0) {
    SCOPED_TRACE(::testing::Message() << "pairs=" << idx.size() << " E=" << num_experts << " misalign=" << misalign);
    std::vector<int64_t> sanitized = idx;
    int64_t invalid = 0;
    for (int64_t& id : sanitized) {
      if (id < -1 || id >= num_experts) {
        id = -1;
        ++invalid;
      }
    }
    const Plan want = plan_ref(sanitized, num_experts);
    int64_t counter = -1;
    const Plan got = run_cuda(idx, num_experts, &counter, 7, misalign);
    EXPECT_EQ(got.counts, want.counts);
    EXPECT_EQ(got.offsets, want.offsets);
    EXPECT_EQ(got.sorted_pair, want.sorted_pair);
    EXPECT_EQ(got.pair_pos, want.pair_pos);
    EXPECT_EQ(counter, 7 + invalid) << "invalid_count is added to, not reset";
  }
};

TEST_F(CudaPlan, MatchesReferenceWithDroppedSlots) {
  std::mt19937 rng(31);
  expect_matches_reference(random_routing(1024 * 4, 16, 0.2, rng), 16);
  expect_matches_reference(random_routing(777, 5, 0.5, rng), 5);
}

TEST_F(CudaPlan, AllPairsToOneExpert) {
  expect_matches_reference(std::vector<int64_t>(5000, 5), 8);
  expect_matches_reference(std::vector<int64_t>(300, 0), 1);
}

TEST_F(CudaPlan, ExpertsWithZeroPairs) {
  std::mt19937 rng(32);
  expect_matches_reference(random_routing(40, 10, 0.1, rng), 64);  // experts 10..63 get nothing
}

TEST_F(CudaPlan, KEqualsNumExperts) {
  std::mt19937 rng(33);
  const int64_t tokens = 50, experts = 8;
  std::vector<int64_t> idx;
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<int64_t> row(experts);
    std::iota(row.begin(), row.end(), 0);
    std::shuffle(row.begin(), row.end(), rng);
    idx.insert(idx.end(), row.begin(), row.end());
  }
  expect_matches_reference(idx, experts);
}

TEST_F(CudaPlan, EveryPairDropped) {
  expect_matches_reference(std::vector<int64_t>(100, -1), 4);
}

TEST_F(CudaPlan, ZeroPairsZeroesCountsAndOffsets) {
  EXPECT_EQ(make_plan_cuda_workspace_bytes(0, 5), 0u);
  expect_matches_reference({}, 5);
}

TEST_F(CudaPlan, ManyExpertsAndPairs) {
  std::mt19937 rng(34);
  expect_matches_reference(random_routing(300000, 3000, 0.1, rng), 3000);
}

TEST_F(CudaPlan, OutOfRangeIdsAreDroppedAndCounted) {
  std::mt19937 rng(35);
  const int64_t experts = 6;
  std::vector<int64_t> idx = random_routing(500, experts, 0.1, rng);
  const int64_t bad[] = {-2, experts, experts + 5, std::numeric_limits<int64_t>::min(),
                         std::numeric_limits<int64_t>::max()};
  for (size_t i = 0; i < idx.size(); i += 17) idx[i] = bad[(i / 17) % 5];
  expect_matches_reference(idx, experts);
  // A null counter is allowed.
  std::vector<int64_t> sanitized = idx;
  for (int64_t& id : sanitized) id = (id < -1 || id >= experts) ? -1 : id;
  EXPECT_EQ(run_cuda(idx, experts).sorted_pair, plan_ref(sanitized, experts).sorted_pair);
}

// The plan runs in one block up to 16384 pairs and 64 experts (no workspace then), and as a radix sort above.
constexpr int64_t kOneBlockPairs = 16384, kOneBlockExperts = 64;

TEST_F(CudaPlan, OneBlockAndSortedPathsMatchAtTheirBoundary) {
  std::mt19937 rng(37);
  for (int64_t pairs : {kOneBlockPairs - 1, kOneBlockPairs, kOneBlockPairs + 1}) {
    for (int64_t experts : {int64_t{1}, kOneBlockExperts - 1, kOneBlockExperts, kOneBlockExperts + 1}) {
      const bool one_block = pairs <= kOneBlockPairs && experts <= kOneBlockExperts;
      EXPECT_EQ(make_plan_cuda_workspace_bytes(pairs, experts) == 0, one_block) << pairs << " pairs, E=" << experts;
      expect_matches_reference(random_routing(pairs, experts, 0.2, rng), experts);
    }
  }
  // Out-of-range ids on the one-block path, one pair per thread and uneven chunks.
  std::vector<int64_t> idx = random_routing(kOneBlockPairs, 9, 0.1, rng);
  for (size_t i = 0; i < idx.size(); i += 101) idx[i] = (i % 2 == 0) ? -7 : 9;
  expect_matches_reference(idx, 9);
  expect_matches_reference(random_routing(256, 3, 0.3, rng), 3);
  expect_matches_reference(random_routing(257, 3, 0.3, rng), 3);
  expect_matches_reference(random_routing(1, 64, 0.0, rng), 64);
}

TEST_F(CudaPlan, UnalignedWorkspaceIsAccepted) {
  std::mt19937 rng(36);
  ASSERT_GT(make_plan_cuda_workspace_bytes(kOneBlockPairs + 2000, 12), 0u);
  expect_matches_reference(random_routing(kOneBlockPairs + 2000, 12, 0.2, rng), 12, 8);
}

TEST_F(CudaPlan, RejectsTooSmallWorkspace) {
  const int64_t num_pairs = kOneBlockPairs + 100, experts = 4;
  const size_t bytes = make_plan_cuda_workspace_bytes(num_pairs, experts);
  ASSERT_GT(bytes, 0u);
  DeviceBuffer d_idx(std::vector<int64_t>(num_pairs, 1), stream_), d_out(4 * num_pairs * sizeof(int64_t), stream_),
      d_workspace(bytes, stream_);
  int64_t* out = d_out.as<int64_t>();
  const std::string message = error_text([&] {
    make_plan_cuda(d_idx.as<int64_t>(), num_pairs, experts, out, out + num_pairs, out + 2 * num_pairs,
                   out + 3 * num_pairs, nullptr, d_workspace.get(), bytes - 1, stream_);
  });
  EXPECT_NE(message.find("workspace"), std::string::npos) << message;
}

// ---------------------------------------------------------------------------------------------------------------
// Permute, unpermute-combine, combine score gradient.

// A routing of num_tokens x k with drops, and its reference plan.
struct Routing {
  int64_t num_tokens, k, num_experts;
  std::vector<int64_t> idx;
  Plan plan;
};

Routing make_routing(int64_t num_tokens, int64_t k, int64_t num_experts, std::mt19937& rng) {
  Routing routing{num_tokens, k, num_experts, random_routing(num_tokens * k, num_experts, 0.15, rng), {}};
  routing.plan = plan_ref(routing.idx, num_experts);
  return routing;
}

constexpr int64_t kWidths[] = {1, 3, 8, 13, 64, 100};

// How a permute test hands the kernel pair_pos: none (each row gathers), the plan's own (each token scatters its
// row), or one that disagrees with sorted_pair in places (tokens scatter what they own, rows gather the rest).
enum class PairPos { kNone, kPlan, kDisagreeing };

template <typename T>
class CudaPermute : public CudaKernelTest {
 protected:
  // Permutes x (scaled by `scale` of type S when non-empty) through `routing`, keeping the plan's first `num_rows`
  // rows (all when negative), with the kernel's x and x_sorted pointers `offset` elements into their buffers, and
  // expects the reference's bits for each way of passing pair_pos.
  template <typename S>
  void expect_matches_reference(const Routing& routing, int64_t d, const std::vector<S>& scale, size_t offset,
                                std::mt19937& rng, int64_t num_rows = -1) {
    if (num_rows < 0) num_rows = static_cast<int64_t>(routing.plan.sorted_pair.size());
    const std::vector<int64_t> sorted(routing.plan.sorted_pair.begin(), routing.plan.sorted_pair.begin() + num_rows);
    const std::vector<T> x = random_values<T>(routing.num_tokens * d, rng);
    const void* scale_ptr = scale.empty() ? nullptr : scale.data();
    std::vector<T> want(num_rows * d);
    permute_ref(dtype_of<T>(), x.data(), routing.num_tokens, d, sorted.data(), num_rows, routing.k, scale_ptr,
                dtype_of<S>(), want.data());

    // Every third entry of the disagreeing pair_pos points at another row, -1 or past the end.
    std::vector<int64_t> disagreeing = routing.plan.pair_pos;
    std::uniform_int_distribution<int64_t> any_row(-1, num_rows);
    for (size_t i = 0; i < disagreeing.size(); i += 3) disagreeing[i] = any_row(rng);

    std::vector<T> x_padded(offset);
    x_padded.insert(x_padded.end(), x.begin(), x.end());
    DeviceBuffer d_x(x_padded, this->stream_), d_sorted(sorted, this->stream_), d_scale(scale, this->stream_),
        d_pos(routing.plan.pair_pos, this->stream_), d_disagreeing(disagreeing, this->stream_),
        d_out((offset + want.size()) * sizeof(T), this->stream_);
    for (PairPos mode : {PairPos::kNone, PairPos::kPlan, PairPos::kDisagreeing}) {
      SCOPED_TRACE(::testing::Message() << "d=" << d << " offset=" << offset << " scaled=" << !scale.empty()
                                        << " rows=" << num_rows << " pair_pos mode=" << static_cast<int>(mode));
      const int64_t* pos = mode == PairPos::kNone   ? nullptr
                           : mode == PairPos::kPlan ? d_pos.as<int64_t>()
                                                    : d_disagreeing.as<int64_t>();
      d_out.poison();
      permute_cuda(dtype_of<T>(), d_x.as<T>() + offset, routing.num_tokens, d, d_sorted.as<int64_t>(), num_rows, pos,
                   routing.k, scale.empty() ? nullptr : d_scale.get(), dtype_of<S>(), d_out.as<T>() + offset,
                   this->stream_);
      const std::vector<T> got = d_out.download<T>(want.size(), offset);
      EXPECT_TRUE(same_bits(got.data(), want.data(), want.size()));
    }
  }
};
TYPED_TEST_SUITE(CudaPermute, AllFloatTypes, DTypeNames);

TYPED_TEST(CudaPermute, CopyIsBitwiseEqualToReference) {
  using T = TypeParam;
  std::mt19937 rng(41);
  const Routing routing = make_routing(50, 2, 4, rng);
  for (int64_t d : kWidths) this->expect_matches_reference(routing, d, std::vector<T>{}, 0, rng);
}

TYPED_TEST(CudaPermute, ScaledMatchesReferenceForEveryScoreDtype) {
  // One multiply in the accumulation type and one rounding, as the reference: bit for bit too.
  std::mt19937 rng(42);
  const Routing routing = make_routing(40, 3, 5, rng);
  for_each_score_type([&](auto tag) {
    using S = decltype(tag);
    const std::vector<S> scale = random_values<S>(routing.num_tokens * routing.k, rng, 0.0, 2.0);
    for (int64_t d : kWidths) this->expect_matches_reference(routing, d, scale, 0, rng);
  });
}

TYPED_TEST(CudaPermute, KeepsOnlyTheFirstRowsOfAPlan) {
  // Expert parallelism keeps the routed rows and cuts the dropped tail: tokens must not store past the kept rows.
  using T = TypeParam;
  std::mt19937 rng(44);
  const Routing routing = make_routing(60, 3, 5, rng);
  const int64_t routed = routing.plan.offsets.back();
  ASSERT_LT(routed, routing.num_tokens * routing.k);
  for (int64_t rows : {routed, routed / 2, int64_t{0}}) {
    for (int64_t d : {int64_t{8}, int64_t{13}})
      this->expect_matches_reference(routing, d, std::vector<T>{}, 0, rng, rows);
    this->expect_matches_reference(routing, 64, random_values<float>(180, rng), 0, rng, rows);
  }
}

TYPED_TEST(CudaPermute, MoreSlotsThanAWarpHasLanes) {
  // k > 32: a token's slots are found 32 at a time.
  using T = TypeParam;
  std::mt19937 rng(45);
  const Routing routing = make_routing(9, 40, 64, rng);
  for (int64_t d : {int64_t{8}, int64_t{13}}) this->expect_matches_reference(routing, d, std::vector<T>{}, 0, rng);
  this->expect_matches_reference(routing, 64, random_values<float>(360, rng), 0, rng);
}

TYPED_TEST(CudaPermute, OneSlotPerTokenGathersWithNarrowBlocks) {
  // k = 1 gathers even when given pair_pos, and rows of a few values run a block of that many threads per row
  // (one for a routing score: pair_scores permutes [T * k, 1] through a plan read with k = 1).
  using T = TypeParam;
  std::mt19937 rng(46);
  const Routing routing = make_routing(1000, 1, 4, rng);
  for (int64_t d : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{8}}) {
    this->expect_matches_reference(routing, d, std::vector<T>{}, 0, rng);
  }
  this->expect_matches_reference(routing, 1, random_values<float>(1000, rng), 0, rng);
}

TYPED_TEST(CudaPermute, UnalignedRowsFallBackToScalarPath) {
  using T = TypeParam;
  std::mt19937 rng(43);
  const Routing routing = make_routing(30, 2, 3, rng);
  this->expect_matches_reference(routing, 64, std::vector<T>{}, 1, rng);
  this->expect_matches_reference(routing, 64, random_values<float>(60, rng), 1, rng);
}

TYPED_TEST(CudaPermute, EmptyShapesLaunchNothing) {
  using T = TypeParam;
  EXPECT_NO_THROW(permute_cuda(dtype_of<T>(), nullptr, 0, 16, nullptr, 0, nullptr, 2, nullptr, dtype_of<T>(), nullptr,
                               this->stream_));
  EXPECT_NO_THROW(unpermute_combine_cuda(dtype_of<T>(), nullptr, 0, 16, nullptr, 0, 2, nullptr, dtype_of<T>(), nullptr,
                                         this->stream_));
  EXPECT_NO_THROW(combine_score_grad_cuda(dtype_of<T>(), nullptr, nullptr, 0, 16, nullptr, 0, 2, dtype_of<T>(), nullptr,
                                          this->stream_));
  EXPECT_NO_THROW(unpermute_combine_backward_cuda(dtype_of<T>(), nullptr, nullptr, 16, nullptr, 0, nullptr, 0, 2,
                                                  nullptr, dtype_of<T>(), nullptr, nullptr, this->stream_));
  FMOE_CHECK_CUDA(cudaStreamSynchronize(this->stream_));
}

template <typename T>
class CudaUnpermuteCombine : public CudaKernelTest {
 protected:
  // Combines random y_sorted rows back through `routing` with weights `score` (empty: weights of 1).
  template <typename S>
  void expect_matches_reference(const Routing& routing, int64_t d, const std::vector<S>& score, std::mt19937& rng) {
    SCOPED_TRACE(::testing::Message() << "d=" << d << " weighted=" << !score.empty());
    const int64_t num_rows = static_cast<int64_t>(routing.plan.sorted_pair.size());
    const int64_t tokens = routing.num_tokens, k = routing.k;
    const std::vector<T> y_sorted = random_values<T>(num_rows * d, rng);
    const void* score_ptr = score.empty() ? nullptr : score.data();
    std::vector<T> want(tokens * d);
    unpermute_combine_ref(dtype_of<T>(), y_sorted.data(), num_rows, d, routing.plan.pair_pos.data(), tokens, k,
                          score_ptr, dtype_of<S>(), want.data());

    DeviceBuffer d_y_sorted(y_sorted, this->stream_), d_pos(routing.plan.pair_pos, this->stream_),
        d_score(score, this->stream_), d_y(want.size() * sizeof(T), this->stream_);
    d_y.poison();
    unpermute_combine_cuda(dtype_of<T>(), d_y_sorted.get(), num_rows, d, d_pos.as<int64_t>(), tokens, k,
                           score.empty() ? nullptr : d_score.get(), dtype_of<S>(), d_y.get(), this->stream_);
    // The kernel sums the same terms in the same order with the same roundings, so it matches bit for bit where
    // the reference's compiler does not fuse multiply-adds; allow the fused rounding (k roundings of the sum of
    // |terms|) and, for 16-bit outputs, one step of the final rounding.
    EXPECT_TRUE(elements_close(d_y.download<T>(want.size()), want, [&](size_t i, double w) {
      const int64_t t = static_cast<int64_t>(i) / d, c = static_cast<int64_t>(i) % d;
      double magnitude = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t pos = routing.plan.pair_pos[t * k + j];
        if (pos < 0) continue;
        const double weight = score.empty() ? 1.0 : to_double(score[t * k + j]);
        magnitude += std::fabs(weight * to_double(y_sorted[pos * d + c]));
      }
      const double final_step = kIs16Bit<T> ? ulp_at<T>(w) : 0.0;
      return static_cast<double>(k) * acc_roundoff<T>() * magnitude + final_step;
    }));
  }
};
TYPED_TEST_SUITE(CudaUnpermuteCombine, AllFloatTypes, DTypeNames);

TYPED_TEST(CudaUnpermuteCombine, MatchesReferenceForEveryScoreDtype) {
  using T = TypeParam;
  std::mt19937 rng(51);
  const Routing routing = make_routing(40, 3, 5, rng);
  for (int64_t d : kWidths) this->expect_matches_reference(routing, d, std::vector<T>{}, rng);
  for_each_score_type([&](auto tag) {
    using S = decltype(tag);
    const std::vector<S> score = random_values<S>(routing.num_tokens * routing.k, rng, 0.0, 1.0);
    for (int64_t d : kWidths) this->expect_matches_reference(routing, d, score, rng);
  });
}

TYPED_TEST(CudaUnpermuteCombine, OneSlotPerTokenWithNarrowBlocks) {
  // The backward of pair_scores: a combine of one-value rows with k = 1, zero for a dropped pair.
  using T = TypeParam;
  std::mt19937 rng(53);
  const Routing routing = make_routing(1000, 1, 4, rng);
  for (int64_t d : {int64_t{1}, int64_t{3}}) {
    this->expect_matches_reference(routing, d, std::vector<T>{}, rng);
    this->expect_matches_reference(routing, d, random_values<float>(1000, rng, 0.0, 1.0), rng);
  }
}

TYPED_TEST(CudaUnpermuteCombine, PermuteThenUnpermuteIsIdentityForTopOne) {
  // k = 1 without drops and weights of 1: the combine of the permuted rows gives x back exactly.
  using T = TypeParam;
  std::mt19937 rng(52);
  const int64_t tokens = 70, d = 24, experts = 6;
  const std::vector<int64_t> idx = random_routing(tokens, experts, 0.0, rng);
  const Plan plan = plan_ref(idx, experts);
  const std::vector<T> x = random_values<T>(tokens * d, rng);
  DeviceBuffer d_x(x, this->stream_), d_sorted(plan.sorted_pair, this->stream_), d_pos(plan.pair_pos, this->stream_),
      d_x_sorted(x.size() * sizeof(T), this->stream_), d_y(x.size() * sizeof(T), this->stream_);
  d_x_sorted.poison();
  d_y.poison();
  permute_cuda(dtype_of<T>(), d_x.get(), tokens, d, d_sorted.as<int64_t>(), tokens, d_pos.as<int64_t>(), 1, nullptr,
               dtype_of<T>(), d_x_sorted.get(), this->stream_);
  unpermute_combine_cuda(dtype_of<T>(), d_x_sorted.get(), tokens, d, d_pos.as<int64_t>(), tokens, 1, nullptr,
                         dtype_of<T>(), d_y.get(), this->stream_);
  const std::vector<T> y = d_y.download<T>(x.size());
  EXPECT_TRUE(same_bits(y.data(), x.data(), x.size()));
}

// The bound on a score gradient grad_score[i] = <grad_y[i / k], y_sorted[pair_pos[i]]>: a warp-shuffle tree instead of
// a left-to-right sum, so within d roundings of the sum of |terms|, plus one step of the score type's rounding.
template <typename T, typename S>
auto score_grad_bound(const std::vector<T>& grad_y, const std::vector<T>& y_sorted,
                      const std::vector<int64_t>& pair_pos, int64_t d, int64_t k) {
  return [&grad_y, &y_sorted, &pair_pos, d, k](size_t i, double w) {
    const int64_t row = pair_pos[i];
    double magnitude = 0;
    for (int64_t c = 0; row >= 0 && c < d; ++c) {
      magnitude += std::fabs(to_double(grad_y[(i / k) * d + c]) * to_double(y_sorted[row * d + c]));
    }
    return static_cast<double>(d) * acc_roundoff<T>() * magnitude + ulp_at<S>(w);
  };
}

template <typename T>
class CudaCombineScoreGrad : public CudaKernelTest {};
TYPED_TEST_SUITE(CudaCombineScoreGrad, AllFloatTypes, DTypeNames);

TYPED_TEST(CudaCombineScoreGrad, MatchesReferenceForEveryScoreDtype) {
  using T = TypeParam;
  std::mt19937 rng(61);
  const Routing routing = make_routing(40, 3, 5, rng);
  const int64_t tokens = routing.num_tokens, k = routing.k;
  const int64_t num_rows = static_cast<int64_t>(routing.plan.sorted_pair.size());
  for (int64_t d : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{8}, int64_t{64}, int64_t{200}}) {
    const std::vector<T> grad_y = random_values<T>(tokens * d, rng);
    const std::vector<T> y_sorted = random_values<T>(num_rows * d, rng);
    for_each_score_type([&](auto tag) {
      using S = decltype(tag);
      SCOPED_TRACE(::testing::Message() << "d=" << d << " score dtype=" << dtype_name(dtype_of<S>()));
      std::vector<S> want(tokens * k);
      combine_score_grad_ref(dtype_of<T>(), grad_y.data(), y_sorted.data(), num_rows, d, routing.plan.pair_pos.data(),
                             tokens, k, dtype_of<S>(), want.data());
      DeviceBuffer d_grad_y(grad_y, this->stream_), d_y_sorted(y_sorted, this->stream_),
          d_pos(routing.plan.pair_pos, this->stream_), d_out(want.size() * sizeof(S), this->stream_);
      d_out.poison();
      combine_score_grad_cuda(dtype_of<T>(), d_grad_y.get(), d_y_sorted.get(), num_rows, d, d_pos.as<int64_t>(), tokens,
                              k, dtype_of<S>(), d_out.get(), this->stream_);
      EXPECT_TRUE(elements_close(d_out.download<S>(want.size()), want,
                                 score_grad_bound<T, S>(grad_y, y_sorted, routing.plan.pair_pos, d, k)));
    });
  }
}

TYPED_TEST(CudaCombineScoreGrad, FusedBackwardMatchesTheTwoReferences) {
  // unpermute_combine_backward_cuda: grad_y_sorted bit for bit as the scaled permute's reference, grad_score within
  // the dot products' bound above; with the plan's pair_pos and with one that disagrees with sorted_pair in places
  // (rows then gathered, scores from the rows pair_pos names).
  // Also k > 32, where a token's slots are taken 32 at a time.
  using T = TypeParam;
  std::mt19937 rng(62);
  const Routing routings[] = {make_routing(45, 3, 5, rng), make_routing(6, 40, 64, rng)};
  for (const Routing& routing : routings) {
    const int64_t tokens = routing.num_tokens, k = routing.k;
    const int64_t num_rows = static_cast<int64_t>(routing.plan.sorted_pair.size());
    std::vector<int64_t> disagreeing = routing.plan.pair_pos;
    std::uniform_int_distribution<int64_t> any_row(-1, num_rows - 1);
    for (size_t i = 0; i < disagreeing.size(); i += 4) disagreeing[i] = any_row(rng);
    for (int64_t d : {int64_t{0}, int64_t{1}, int64_t{8}, int64_t{13}, int64_t{64}, int64_t{200}}) {
      const std::vector<T> grad_y = random_values<T>(tokens * d, rng);
      const std::vector<T> y_sorted = random_values<T>(num_rows * d, rng);
      for_each_score_type([&](auto tag) {
        using S = decltype(tag);
        const std::vector<S> score = random_values<S>(tokens * k, rng, 0.0, 1.0);
        const std::vector<int64_t>* const pair_pos_cases[] = {&routing.plan.pair_pos, &disagreeing};
        for (const std::vector<int64_t>* pos : pair_pos_cases) {
          SCOPED_TRACE(::testing::Message() << "d=" << d << " score dtype=" << dtype_name(dtype_of<S>())
                                            << (pos == &disagreeing ? " disagreeing pair_pos" : " plan's pair_pos"));
          std::vector<T> want_rows(num_rows * d);
          permute_ref(dtype_of<T>(), grad_y.data(), tokens, d, routing.plan.sorted_pair.data(), num_rows, k,
                      score.data(), dtype_of<S>(), want_rows.data());
          std::vector<S> want_score(tokens * k);
          combine_score_grad_ref(dtype_of<T>(), grad_y.data(), y_sorted.data(), num_rows, d, pos->data(), tokens, k,
                                 dtype_of<S>(), want_score.data());
          DeviceBuffer d_grad_y(grad_y, this->stream_), d_y_sorted(y_sorted, this->stream_),
              d_sorted(routing.plan.sorted_pair, this->stream_), d_pos(*pos, this->stream_),
              d_score(score, this->stream_), d_rows(want_rows.size() * sizeof(T), this->stream_),
              d_grad_score(want_score.size() * sizeof(S), this->stream_);
          d_rows.poison();
          d_grad_score.poison();
          unpermute_combine_backward_cuda(dtype_of<T>(), d_grad_y.get(), d_y_sorted.get(), d, d_sorted.as<int64_t>(),
                                          num_rows, d_pos.as<int64_t>(), tokens, k, d_score.get(), dtype_of<S>(),
                                          d_rows.get(), d_grad_score.get(), this->stream_);
          const std::vector<T> got_rows = d_rows.download<T>(want_rows.size());
          EXPECT_TRUE(same_bits(got_rows.data(), want_rows.data(), want_rows.size())) << "grad_y_sorted";
          EXPECT_TRUE(elements_close(d_grad_score.download<S>(want_score.size()), want_score,
                                     score_grad_bound<T, S>(grad_y, y_sorted, *pos, d, k)))
              << "grad_score";
        }
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Grouped linear.

struct LinearCase {
  std::vector<int64_t> counts;  // rows per expert
  int64_t tail_rows;            // rows past offsets[E]
  int64_t in_features, out_features;
  bool bias;
};

// Per-expert counts drawn from [0, max_count].
std::vector<int64_t> random_counts(int64_t num_experts, int64_t max_count, std::mt19937& rng) {
  std::uniform_int_distribution<int64_t> count(0, max_count);
  std::vector<int64_t> counts(num_experts);
  for (int64_t& c : counts) c = count(rng);
  return counts;
}

std::vector<LinearCase> linear_cases(std::mt19937& rng) {
  return {
      {{37, 0, 64, 5}, 7, 40, 72, true},              // an empty expert, a tail, sizes off the tile grid
      {{37, 0, 64, 5}, 7, 40, 72, false},             // no bias
      {{1, 2, 3}, 0, 3, 5, true},                     // tiny, in_features below one k-slice
      {{0, 0, 200, 0}, 0, 64, 48, true},              // every row to one expert
      {{0, 0, 0}, 10, 8, 8, true},                    // every row in the tail
      {random_counts(300, 5, rng), 3, 24, 17, true},  // more experts than threads in the tile-mapping scan
      {{1000, 3, 700}, 2, 16, 136, true},             // bias gradient: rows past its unrolled loads, a part chunk
  };
}

template <typename T>
class CudaGroupedLinear : public CudaKernelTest {
 protected:
  struct Inputs {
    std::vector<int64_t> offsets;
    int64_t num_rows;
    std::vector<T> x, weight, bias, grad_y;
  };

  static Inputs make_inputs(const LinearCase& c, std::mt19937& rng) {
    Inputs in;
    const int64_t experts = static_cast<int64_t>(c.counts.size());
    in.offsets.assign(experts + 1, 0);
    for (int64_t e = 0; e < experts; ++e) in.offsets[e + 1] = in.offsets[e] + c.counts[e];
    in.num_rows = in.offsets[experts] + c.tail_rows;
    in.x = random_values<T>(in.num_rows * c.in_features, rng);
    in.weight = random_values<T>(experts * c.out_features * c.in_features, rng);
    if (c.bias) in.bias = random_values<T>(experts * c.out_features, rng);
    in.grad_y = random_values<T>(in.num_rows * c.out_features, rng);
    return in;
  }
};
TYPED_TEST_SUITE(CudaGroupedLinear, AllFloatTypes, DTypeNames);

TYPED_TEST(CudaGroupedLinear, ForwardMatchesReference) {
  using T = TypeParam;
  std::mt19937 rng(71);
  for (const LinearCase& c : linear_cases(rng)) {
    const int64_t experts = static_cast<int64_t>(c.counts.size());
    SCOPED_TRACE(::testing::Message() << "E=" << experts << " in=" << c.in_features << " out=" << c.out_features
                                      << " tail=" << c.tail_rows << " bias=" << c.bias);
    const auto in = this->make_inputs(c, rng);
    const T* bias = c.bias ? in.bias.data() : nullptr;
    std::vector<T> want(in.num_rows * c.out_features);
    grouped_linear_ref(dtype_of<T>(), in.x.data(), in.num_rows, c.in_features, in.offsets.data(), experts,
                       in.weight.data(), c.out_features, bias, want.data());

    DeviceBuffer d_x(in.x, this->stream_), d_offsets(in.offsets, this->stream_), d_w(in.weight, this->stream_),
        d_b(in.bias, this->stream_), d_y(want.size() * sizeof(T), this->stream_);
    d_y.poison();
    grouped_linear_cuda(dtype_of<T>(), d_x.get(), in.num_rows, c.in_features, d_offsets.as<int64_t>(), experts,
                        d_w.get(), c.out_features, c.bias ? d_b.get() : nullptr, d_y.get(), this->stream_);
    EXPECT_TRUE(gemm_close(d_y.download<T>(want.size()), want, c.in_features + 1));
  }
}

TYPED_TEST(CudaGroupedLinear, BackwardMatchesReference) {
  using T = TypeParam;
  std::mt19937 rng(72);
  for (const LinearCase& c : linear_cases(rng)) {
    const int64_t experts = static_cast<int64_t>(c.counts.size());
    const auto in = this->make_inputs(c, rng);
    const size_t x_size = in.x.size(), w_size = in.weight.size(), b_size = experts * c.out_features;
    std::vector<T> want_x(x_size), want_w(w_size), want_b(b_size);
    grouped_linear_backward_ref(dtype_of<T>(), in.grad_y.data(), in.x.data(), in.num_rows, c.in_features,
                                in.offsets.data(), experts, in.weight.data(), c.out_features, want_x.data(),
                                want_w.data(), want_b.data());
    DeviceBuffer d_grad_y(in.grad_y, this->stream_), d_x(in.x, this->stream_), d_offsets(in.offsets, this->stream_),
        d_w(in.weight, this->stream_), d_gx(x_size * sizeof(T), this->stream_), d_gw(w_size * sizeof(T), this->stream_),
        d_gb(b_size * sizeof(T), this->stream_);
    const int64_t longest = std::max({in.num_rows, c.in_features, c.out_features});
    // mask bit 0: grad_x, 1: grad_weight, 2: grad_bias. All three at once, then each alone (the others null).
    for (int mask : {7, 1, 2, 4}) {
      SCOPED_TRACE(::testing::Message() << "E=" << experts << " in=" << c.in_features << " out=" << c.out_features
                                        << " tail=" << c.tail_rows << " outputs mask=" << mask);
      d_gx.poison();
      d_gw.poison();
      d_gb.poison();
      grouped_linear_backward_cuda(dtype_of<T>(), d_grad_y.get(), d_x.get(), in.num_rows, c.in_features,
                                   d_offsets.as<int64_t>(), experts, d_w.get(), c.out_features,
                                   (mask & 1) ? d_gx.get() : nullptr, (mask & 2) ? d_gw.get() : nullptr,
                                   (mask & 4) ? d_gb.get() : nullptr, this->stream_);
      if (mask & 1) {
        EXPECT_TRUE(gemm_close(d_gx.download<T>(x_size), want_x, longest)) << "grad_x";
      }
      if (mask & 2) {
        EXPECT_TRUE(gemm_close(d_gw.download<T>(w_size), want_w, longest)) << "grad_weight";
      }
      if (mask & 4) {
        EXPECT_TRUE(gemm_close(d_gb.download<T>(b_size), want_b, longest)) << "grad_bias";
      }
    }
  }
}

TYPED_TEST(CudaGroupedLinear, RepeatedRunsAreBitwiseEqual) {
  // No atomics and fixed summation orders: the same inputs give the same bits, run after run.
  using T = TypeParam;
  std::mt19937 rng(74);
  const LinearCase c{{300, 0, 129, 1000}, 5, 96, 80, true};
  const int64_t experts = static_cast<int64_t>(c.counts.size());
  const auto in = this->make_inputs(c, rng);
  DeviceBuffer d_x(in.x, this->stream_), d_offsets(in.offsets, this->stream_), d_w(in.weight, this->stream_),
      d_b(in.bias, this->stream_), d_grad_y(in.grad_y, this->stream_), d_y(in.grad_y.size() * sizeof(T), this->stream_),
      d_gx(in.x.size() * sizeof(T), this->stream_), d_gw(in.weight.size() * sizeof(T), this->stream_),
      d_gb(in.bias.size() * sizeof(T), this->stream_);
  std::vector<T> first[4];
  for (int run = 0; run < 2; ++run) {
    for (DeviceBuffer* out : {&d_y, &d_gx, &d_gw, &d_gb}) out->poison();
    grouped_linear_cuda(dtype_of<T>(), d_x.get(), in.num_rows, c.in_features, d_offsets.as<int64_t>(), experts,
                        d_w.get(), c.out_features, d_b.get(), d_y.get(), this->stream_);
    grouped_linear_backward_cuda(dtype_of<T>(), d_grad_y.get(), d_x.get(), in.num_rows, c.in_features,
                                 d_offsets.as<int64_t>(), experts, d_w.get(), c.out_features, d_gx.get(), d_gw.get(),
                                 d_gb.get(), this->stream_);
    const std::vector<T> outputs[4] = {d_y.download<T>(in.grad_y.size()), d_gx.download<T>(in.x.size()),
                                       d_gw.download<T>(in.weight.size()), d_gb.download<T>(in.bias.size())};
    for (int i = 0; i < 4; ++i) {
      if (run == 0) {
        first[i] = outputs[i];
      } else {
        EXPECT_TRUE(same_bits(outputs[i].data(), first[i].data(), first[i].size())) << "output " << i;
      }
    }
  }
}

TYPED_TEST(CudaGroupedLinear, ZeroRowsWriteZeroWeightAndBiasGrads) {
  using T = TypeParam;
  const int64_t experts = 3, in_features = 5, out_features = 4;
  const std::vector<int64_t> offsets(experts + 1, 0);
  std::mt19937 rng(73);
  const std::vector<T> weight = random_values<T>(experts * out_features * in_features, rng);
  DeviceBuffer d_offsets(offsets, this->stream_), d_w(weight, this->stream_),
      d_gw(weight.size() * sizeof(T), this->stream_), d_gb(experts * out_features * sizeof(T), this->stream_);
  d_gw.poison();
  d_gb.poison();
  EXPECT_NO_THROW(grouped_linear_cuda(dtype_of<T>(), nullptr, 0, in_features, d_offsets.as<int64_t>(), experts,
                                      d_w.get(), out_features, nullptr, nullptr, this->stream_));
  grouped_linear_backward_cuda(dtype_of<T>(), nullptr, nullptr, 0, in_features, d_offsets.as<int64_t>(), experts,
                               d_w.get(), out_features, nullptr, d_gw.get(), d_gb.get(), this->stream_);
  const std::vector<T> zeros_w(weight.size(), from_double<T>(0.0)),
      zeros_b(experts * out_features, from_double<T>(0.0));
  const std::vector<T> gw = d_gw.download<T>(weight.size()), gb = d_gb.download<T>(zeros_b.size());
  EXPECT_TRUE(same_bits(gw.data(), zeros_w.data(), gw.size()));
  EXPECT_TRUE(same_bits(gb.data(), zeros_b.data(), gb.size()));
}

}  // namespace
}  // namespace test
}  // namespace fastmoe
