// capacity_limit_cuda against capacity_limit_ref: the kept ids and the dropped count must match bit for bit
// (the order is a total order on (score, pair), so there is no tolerance). balance_loss_cuda and its backward
// against balance_loss_ref: within rounding, and run to run bitwise.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_test_util.h"
#include "kernels/balance/balance.h"
#include "test_util.h"

namespace fastmoe {
namespace test {
namespace {

class CudaCapacity : public CudaKernelTest {
 protected:
  // Runs both on the same inputs and compares.
  template <typename S>
  void check(const std::vector<int64_t>& idx, const std::vector<S>& score, const std::vector<int64_t>& cap,
             DType dtype) {
    const int64_t num_pairs = static_cast<int64_t>(idx.size()), num_experts = static_cast<int64_t>(cap.size());
    std::vector<int64_t> want(idx.size());
    int64_t want_dropped = 0;
    capacity_limit_ref(idx.data(), score.data(), dtype, num_pairs, cap.data(), num_experts, want.data(), &want_dropped);
    DeviceBuffer d_idx(idx, stream_), d_score(score, stream_), d_cap(cap, stream_);
    DeviceBuffer d_kept(idx.size() * sizeof(int64_t), stream_), d_dropped(sizeof(int64_t), stream_);
    d_kept.poison();
    d_dropped.poison();
    const size_t bytes = capacity_limit_cuda_workspace_bytes(num_pairs, num_experts);
    DeviceBuffer workspace(bytes, stream_);
    capacity_limit_cuda(d_idx.as<int64_t>(), d_score.get(), dtype, num_pairs, d_cap.as<int64_t>(), num_experts,
                        d_kept.as<int64_t>(), d_dropped.as<int64_t>(), workspace.get(), bytes, stream_);
    EXPECT_EQ(d_kept.download<int64_t>(idx.size()), want) << dtype_name(dtype);
    EXPECT_EQ(d_dropped.download<int64_t>(1)[0], want_dropped) << dtype_name(dtype);
  }
};

TEST_F(CudaCapacity, MatchesReferenceOnRandomRoutingsForEveryScoreDtype) {
  std::mt19937 rng(17);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t num_pairs = 1 + rng() % 5000, num_experts = 1 + rng() % 70;
    std::vector<int64_t> idx(num_pairs), cap(num_experts);
    for (auto& id : idx) id = static_cast<int64_t>(rng() % (num_experts + 1)) - 1;
    for (auto& c : cap) c = rng() % (2 * num_pairs / num_experts + 2);
    std::vector<double> values(num_pairs);
    for (auto& v : values) v = static_cast<double>(rng() % 64) / 16.0 - 2.0;  // many ties, both signs
    if (trial % 4 == 0) values[rng() % num_pairs] = std::numeric_limits<double>::quiet_NaN();
    for (DType dtype : {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16}) {
      FMOE_DISPATCH_FLOAT_TYPES(dtype, "test", [&] {
        std::vector<scalar_t> score;
        for (double v : values) score.push_back(from_acc<scalar_t>(static_cast<acc_t<scalar_t>>(v)));
        check(idx, score, cap, dtype);
      });
    }
  }
}

TEST_F(CudaCapacity, ZeroPairsWritesZeroDropped) {
  check<float>({}, {}, {3, 1}, DType::kFloat32);
}

TEST_F(CudaCapacity, ZeroCapacityDropsEverything) {
  check<float>({0, 1, 0, -1, 1}, {0.5f, 0.25f, 1.0f, 2.0f, 0.0f}, {0, 0}, DType::kFloat32);
}

// ---------------------------------------------------------------------------------------------------------------
// balance_loss_cuda and its backward against the references: the loss within a relative 1e-5 (fp32 accumulation)
// or 1e-12 (fp64), the gradient element-wise within the dtype's rounding plus the accumulation type's error,
// and two runs of the forward bitwise equal.

class CudaBalanceLoss : public CudaKernelTest {
 protected:
  template <typename T>
  void check(int64_t num_tokens, int64_t num_experts, std::mt19937& rng) {
    using A = acc_t<T>;
    const DType dtype = dtype_of<T>();
    const DType loss_dtype = std::is_same_v<A, double> ? DType::kFloat64 : DType::kFloat32;
    const std::string where =
        std::string(dtype_name(dtype)) + " T=" + std::to_string(num_tokens) + " E=" + std::to_string(num_experts);
    const std::vector<T> logits = to_type<T>(random_uniform(num_tokens * num_experts, rng, -5.0, 5.0));
    std::vector<int64_t> counts(num_experts);
    for (auto& c : counts) c = rng() % 1001;
    const double scale = random_uniform(1, rng, 1e-4, 2e-3)[0];
    // |g| >= 0.5 keeps max|u| well above the 16-bit types' subnormal steps for most counts.
    const A grad_loss = static_cast<A>(random_uniform(1, rng, 0.5, 2.0)[0] * (rng() % 2 ? 1.0 : -1.0));

    A want_loss = std::numeric_limits<A>::quiet_NaN();
    balance_loss_ref(dtype, logits.data(), num_tokens, num_experts, counts.data(), scale, loss_dtype, &want_loss);
    std::vector<T> want_grad(logits.size());
    balance_loss_backward_ref(dtype, logits.data(), num_tokens, num_experts, counts.data(), scale, loss_dtype,
                              &grad_loss, want_grad.data());

    DeviceBuffer d_logits(logits, stream_), d_counts(counts, stream_);
    DeviceBuffer d_grad_loss(std::vector<A>{grad_loss}, stream_);
    DeviceBuffer d_loss(sizeof(A), stream_), d_grad(logits.size() * sizeof(T), stream_);
    const size_t bytes = balance_loss_cuda_workspace_bytes(num_tokens, num_experts);
    DeviceBuffer workspace(bytes, stream_);
    auto forward = [&] {
      d_loss.poison();
      workspace.poison();
      balance_loss_cuda(dtype, d_logits.get(), num_tokens, num_experts, d_counts.as<int64_t>(), scale, loss_dtype,
                        d_loss.get(), workspace.get(), bytes, stream_);
      return d_loss.download<A>(1)[0];
    };
    const A got_loss = forward();
    const double loss_tol = std::is_same_v<A, double> ? 1e-12 : 1e-5;
    EXPECT_LE(std::fabs(static_cast<double>(got_loss) - static_cast<double>(want_loss)),
              loss_tol * std::fabs(static_cast<double>(want_loss)))
        << where << ": got " << describe(got_loss) << ", want " << describe(want_loss);
    const A again = forward();
    EXPECT_TRUE(same_bits(&again, &got_loss, 1)) << where << ": a second run gave another loss";

    d_grad.poison();
    balance_loss_backward_cuda(dtype, d_logits.get(), num_tokens, num_experts, d_counts.as<int64_t>(), scale,
                               loss_dtype, d_grad_loss.get(), d_grad.get(), stream_);
    const std::vector<T> got_grad = d_grad.download<T>(logits.size());
    // |grad| <= 2 * p * max|u| with u_e = g * scale * counts[e]: both sides' errors in p and <p, u> scale with
    // max|u|, and the 16-bit results may round to neighbouring values (one subnormal step apart at the least).
    double u_max = 0;
    for (int64_t c : counts) {
      u_max = std::max(u_max, std::fabs(static_cast<double>(grad_loss) * scale * static_cast<double>(c)));
    }
    const double eps_t = epsilon_of<T>(), eps_a = std::numeric_limits<A>::epsilon();
    double tiny = 0;
    if constexpr (kIs16Bit<T>) tiny = to_double(T{uint16_t{1}});
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < got_grad.size(); ++i) {
      const double got = to_double(got_grad[i]), want = to_double(want_grad[i]);
      if (!(std::fabs(got - want) <= eps_t * std::fabs(want) + 64 * eps_a * u_max + tiny) && bad++ == 0) first = i;
    }
    EXPECT_EQ(bad, 0u) << where << ": first at " << first << ": got "
                       << (bad ? describe(got_grad[first]) : std::string()) << ", want "
                       << (bad ? describe(want_grad[first]) : std::string()) << " (max|u| " << u_max << ")";
  }

  void check_all_dtypes(int64_t num_tokens, int64_t num_experts, std::mt19937& rng) {
    check<float>(num_tokens, num_experts, rng);
    check<double>(num_tokens, num_experts, rng);
    check<fp16_t>(num_tokens, num_experts, rng);
    check<bf16_t>(num_tokens, num_experts, rng);
  }
};

TEST_F(CudaBalanceLoss, MatchesReferenceOnChosenShapes) {
  std::mt19937 rng(5);
  // E = 1 (p = 1), one warp's width and one past it, a wide row, and T = 40000, whose capped grid gives each
  // warp several tokens.
  for (const auto& [num_tokens, num_experts] :
       std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {9, 1}, {7, 32}, {100, 33}, {513, 300}, {40000, 3}}) {
    check_all_dtypes(num_tokens, num_experts, rng);
  }
}

TEST_F(CudaBalanceLoss, MatchesReferenceOnRandomShapes) {
  std::mt19937 rng(23);
  for (int trial = 0; trial < 8; ++trial) {
    const int64_t num_tokens = rng() % 5001, num_experts = 1 + rng() % 300;
    check_all_dtypes(num_tokens, num_experts, rng);
  }
}

TEST_F(CudaBalanceLoss, NoTokensWritesZeroLossAndNoGradient) {
  DeviceBuffer d_counts(std::vector<int64_t>{2, 5}, stream_), d_grad_loss(std::vector<double>{1.0}, stream_);
  DeviceBuffer d_loss(sizeof(double), stream_), d_grad(sizeof(double), stream_);
  EXPECT_EQ(balance_loss_cuda_workspace_bytes(0, 2), 0u);
  for (DType dtype : {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16}) {
    const bool wide = dtype == DType::kFloat64;
    const DType loss_dtype = wide ? DType::kFloat64 : DType::kFloat32;
    d_loss.poison();
    d_grad.poison();
    balance_loss_cuda(dtype, nullptr, 0, 2, d_counts.as<int64_t>(), -3.0, loss_dtype, d_loss.get(), nullptr, 0,
                      stream_);
    balance_loss_backward_cuda(dtype, nullptr, 0, 2, d_counts.as<int64_t>(), -3.0, loss_dtype, d_grad_loss.get(),
                               d_grad.get(), stream_);
    if (wide) {
      const double zero = 0.0, loss = d_loss.download<double>(1)[0];
      EXPECT_TRUE(same_bits(&loss, &zero, 1)) << dtype_name(dtype);
    } else {
      const float zero = 0.0f, loss = d_loss.download<float>(1)[0];
      EXPECT_TRUE(same_bits(&loss, &zero, 1)) << dtype_name(dtype);
    }
    EXPECT_EQ(d_grad.download<uint64_t>(1)[0], ~uint64_t{0}) << dtype_name(dtype) << ": the gradient was written";
  }
}

TEST_F(CudaBalanceLoss, RejectsASmallWorkspaceAndABadLossDtype) {
  const int64_t num_tokens = 100, num_experts = 4;
  DeviceBuffer d_logits(std::vector<float>(num_tokens * num_experts, 0.5f), stream_);
  DeviceBuffer d_counts(std::vector<int64_t>(num_experts, 3), stream_), d_loss(sizeof(double), stream_);
  const size_t bytes = balance_loss_cuda_workspace_bytes(num_tokens, num_experts);
  DeviceBuffer workspace(bytes, stream_);
  EXPECT_THAT(error_text([&] {
                balance_loss_cuda(DType::kFloat32, d_logits.get(), num_tokens, num_experts, d_counts.as<int64_t>(), 1.0,
                                  DType::kFloat32, d_loss.get(), workspace.get(), bytes - 1, stream_);
              }),
              ::testing::HasSubstr("balance_loss_cuda needs a workspace of " + std::to_string(bytes) + " bytes"));
  EXPECT_THAT(error_text([&] {
                balance_loss_cuda(DType::kFloat32, d_logits.get(), num_tokens, num_experts, d_counts.as<int64_t>(), 1.0,
                                  DType::kFloat64, d_loss.get(), workspace.get(), bytes, stream_);
              }),
              ::testing::HasSubstr("loss_dtype must be float32"));
  EXPECT_THAT(error_text([&] { balance_loss_cuda_workspace_bytes(-1, num_experts); }),
              ::testing::HasSubstr("num_tokens must be >= 0, got -1"));
}

}  // namespace
}  // namespace test
}  // namespace fastmoe
