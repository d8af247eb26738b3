// Tests of ep_route_ref (csrc/ref/dispatch_ref.h): a hand example, random routings against a direct count, and
// errors that name the bad id.
#include <cstdint>
#include <random>
#include <vector>

#include "ref/dispatch_ref.h"
#include "test_util.h"

namespace fastmoe {
namespace test {
namespace {

using ::testing::HasSubstr;

TEST(EpRouteRef, HandExample) {
  // 2 ranks x 2 local experts; token 0 -> experts 0, 1 (both rank 0), token 1 -> 3, -1, token 2 -> 2, 0.
  const std::vector<int64_t> idx = {0, 1, 3, -1, 2, 0};
  std::vector<int64_t> ranks(6, -9), counts(6, -9);
  ep_route_ref(idx.data(), 3, 2, 2, 2, ranks.data(), counts.data());
  EXPECT_EQ(ranks, (std::vector<int64_t>{0, -1, -1, 1, 0, 1}));
  // rank 0: expert 0 twice, expert 1 once, tokens 0 and 2; rank 1: expert 2 (local 0) once, 3 (local 1) once,
  // tokens 1 and 2.
  EXPECT_EQ(counts, (std::vector<int64_t>{2, 1, 2, 1, 1, 2}));
}

TEST(EpRouteRef, RandomRoutingsCountEverySlotOnceAndEveryTokenOncePerRank) {
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t world = 1 + rng() % 5, local = 1 + rng() % 4, tokens = rng() % 30, k = 1 + rng() % 5;
    std::vector<int64_t> idx(tokens * k);
    for (auto& id : idx) id = static_cast<int64_t>(rng() % (world * local + 1)) - 1;
    std::vector<int64_t> ranks(tokens * world), counts(world * (local + 1));
    ep_route_ref(idx.data(), tokens, k, local, world, ranks.data(), counts.data());
    std::vector<int64_t> want(world * (local + 1), 0);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t p = 0; p < world; ++p) {
        bool hit = false;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t id = idx[t * k + j];
          if (id >= 0 && id / local == p) {
            hit = true;
            ++want[p * (local + 1) + id % local];
          }
        }
        EXPECT_EQ(ranks[t * world + p], hit ? p : -1) << "trial " << trial;
        if (hit) ++want[p * (local + 1) + local];
      }
    }
    EXPECT_EQ(counts, want) << "trial " << trial;
  }
}

TEST(EpRouteRef, RejectsAnIdOutsideTheExperts) {
  const std::vector<int64_t> idx = {0, 4};
  std::vector<int64_t> ranks(4), counts(6);
  EXPECT_THAT(error_text([&] { ep_route_ref(idx.data(), 1, 2, 2, 2, ranks.data(), counts.data()); }),
              HasSubstr("expert id 4 at [0, 1]"));
}

}  // namespace
}  // namespace test
}  // namespace fastmoe
