// ep_route_cuda against ep_route_ref: token ranks and counts must match exactly (shared-memory and global
// histogram paths, dropped slots, empty input).
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "cuda_test_util.h"
#include "kernels/dispatch/dispatch.h"
#include "test_util.h"

namespace fastmoe {
namespace test {
namespace {

class CudaEpRoute : public CudaKernelTest {
 protected:
  void check(int64_t tokens, int64_t k, int64_t local, int64_t world, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<int64_t> idx(tokens * k);
    for (auto& id : idx) id = static_cast<int64_t>(rng() % (world * local + 1)) - 1;
    std::vector<int64_t> ranks(tokens * world), counts(world * (local + 1));
    ep_route_ref(idx.data(), tokens, k, local, world, ranks.data(), counts.data());
    DeviceBuffer d_idx(idx, stream_), d_ranks(ranks.size() * sizeof(int64_t), stream_),
        d_counts(counts.size() * sizeof(int64_t), stream_);
    d_ranks.poison();
    d_counts.poison();
    ep_route_cuda(d_idx.as<int64_t>(), tokens, k, local, world, d_ranks.as<int64_t>(), d_counts.as<int64_t>(), stream_);
    EXPECT_EQ(d_ranks.download<int64_t>(ranks.size()), ranks);
    EXPECT_EQ(d_counts.download<int64_t>(counts.size()), counts);
  }
};

TEST_F(CudaEpRoute, MatchesReference) {
  check(5000, 6, 32, 2, 1);
  check(777, 2, 4, 8, 2);
  check(1, 1, 1, 1, 3);
}

TEST_F(CudaEpRoute, GlobalHistogramWhenCountsDoNotFitSharedMemory) {
  check(3000, 4, 1100, 4, 4);
}

TEST_F(CudaEpRoute, NoTokens) {
  check(0, 2, 3, 2, 5);
}

}  // namespace
}  // namespace test
}  // namespace fastmoe
