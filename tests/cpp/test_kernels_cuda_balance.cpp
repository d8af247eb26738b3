// capacity_limit_cuda against capacity_limit_ref: the kept ids and the dropped count must match bit for bit
// (the order is a total order on (score, pair), so there is no tolerance).
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <random>
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

}  // namespace
}  // namespace test
}  // namespace fastmoe
