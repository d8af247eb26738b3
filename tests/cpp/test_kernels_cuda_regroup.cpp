// regroup_index_cuda against regroup_index_ref: the gather index must match exactly, for random block counts,
// empty blocks, tail rows, and the largest block count the kernel takes.
#include <gtest/gtest.h>

#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "cuda_test_util.h"
#include "kernels/dispatch/dispatch.h"
#include "test_util.h"

namespace fastmoe {
namespace test {
namespace {

class CudaRegroup : public CudaKernelTest {
 protected:
  void check(const std::vector<int64_t>& counts, int64_t ranks, int64_t local, int64_t extra_rows) {
    const int64_t rows = std::accumulate(counts.begin(), counts.end(), int64_t{0}) + extra_rows;
    for (bool inverse : {false, true}) {
      std::vector<int64_t> want(rows);
      regroup_index_ref(counts.data(), ranks, local, inverse, rows, want.data());
      DeviceBuffer d_counts(counts, stream_), d_out(rows * sizeof(int64_t), stream_);
      d_out.poison();
      regroup_index_cuda(d_counts.as<int64_t>(), ranks, local, inverse, rows, d_out.as<int64_t>(), stream_);
      EXPECT_EQ(d_out.download<int64_t>(rows), want) << ranks << "x" << local << " inverse=" << inverse;
    }
  }
};

TEST_F(CudaRegroup, MatchesReference) {
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 30; ++trial) {
    const int64_t ranks = 1 + static_cast<int64_t>(rng() % 8), local = 1 + static_cast<int64_t>(rng() % 40);
    std::vector<int64_t> counts(ranks * local);
    for (auto& c : counts) c = (rng() % 4 == 0) ? 0 : static_cast<int64_t>(rng() % 300);
    check(counts, ranks, local, static_cast<int64_t>(rng() % 5));
  }
}

TEST_F(CudaRegroup, LargestBlockCountAndManyRows) {
  std::mt19937_64 rng(12);
  std::vector<int64_t> counts(kRegroupMaxBlocks);
  for (auto& c : counts) c = static_cast<int64_t>(rng() % 64);
  check(counts, 8, kRegroupMaxBlocks / 8, 7);
}

TEST_F(CudaRegroup, EmptyAndAllEmpty) {
  check({0, 0, 0, 0}, 2, 2, 3);
  check({5}, 1, 1, 0);
}

}  // namespace
}  // namespace test
}  // namespace fastmoe
