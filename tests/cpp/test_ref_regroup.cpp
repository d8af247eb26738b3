// Tests of regroup_index_ref (csrc/ref/dispatch_ref.h): the gather between the rank-major rows an expert-parallel
// exchange delivers and the expert-major rows the experts use, checked against rows labelled by hand.
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#include "ref/dispatch_ref.h"
#include "test_util.h"

namespace fastmoe {
namespace test {
namespace {

using ::testing::HasSubstr;

// Labels of the rows in rank-major order: (source rank, local expert, index inside the block).
std::vector<std::tuple<int64_t, int64_t, int64_t>> rank_major_labels(const std::vector<int64_t>& counts, int64_t ranks,
                                                                     int64_t local) {
  std::vector<std::tuple<int64_t, int64_t, int64_t>> labels;
  for (int64_t s = 0; s < ranks; ++s)
    for (int64_t e = 0; e < local; ++e)
      for (int64_t i = 0; i < counts[s * local + e]; ++i) labels.emplace_back(s, e, i);
  return labels;
}

TEST(RegroupRef, HandExample) {
  // 2 ranks x 2 local experts; counts[s][e] = {{2, 1}, {0, 3}}: rank-major rows are
  // s0e0 s0e0 s0e1 | s1e1 s1e1 s1e1, expert-major: s0e0 s0e0 | s0e1 s1e1 s1e1 s1e1.
  const std::vector<int64_t> counts = {2, 1, 0, 3};
  std::vector<int64_t> fwd(8, -9), inv(8, -9);
  regroup_index_ref(counts.data(), 2, 2, false, 8, fwd.data());
  regroup_index_ref(counts.data(), 2, 2, true, 8, inv.data());
  EXPECT_EQ(fwd, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, -1, -1}));  // already in order here
  EXPECT_EQ(inv, fwd);
  const std::vector<int64_t> swapped = {1, 2, 3, 0};  // s0: e0 1, e1 2; s1: e0 3, e1 0
  regroup_index_ref(swapped.data(), 2, 2, false, 6, fwd.data());
  // rank-major: [s0e0][s0e1 s0e1][s1e0 s1e0 s1e0]; expert-major: s0e0, s1e0 x3, s0e1 x2
  EXPECT_EQ(std::vector<int64_t>(fwd.begin(), fwd.begin() + 6), (std::vector<int64_t>{0, 3, 4, 5, 1, 2}));
}

TEST(RegroupRef, RandomCountsRoundTripAndOrder) {
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t ranks = 1 + static_cast<int64_t>(rng() % 5), local = 1 + static_cast<int64_t>(rng() % 6);
    std::vector<int64_t> counts(ranks * local);
    for (auto& c : counts) c = (rng() % 3 == 0) ? 0 : static_cast<int64_t>(rng() % 7);
    const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
    const int64_t rows = total + static_cast<int64_t>(rng() % 4);
    std::vector<int64_t> fwd(rows), inv(rows);
    regroup_index_ref(counts.data(), ranks, local, false, rows, fwd.data());
    regroup_index_ref(counts.data(), ranks, local, true, rows, inv.data());
    const auto labels = rank_major_labels(counts, ranks, local);
    // Expert-major order: sorted by (expert, source rank, index).
    for (int64_t r = 1; r < total; ++r) {
      const auto [s0, e0, i0] = labels[fwd[r - 1]];
      const auto [s1, e1, i1] = labels[fwd[r]];
      EXPECT_TRUE(std::make_tuple(e0, s0, i0) < std::make_tuple(e1, s1, i1)) << "trial " << trial << " row " << r;
    }
    // inverse undoes forward, and the tail is -1 in both.
    for (int64_t r = 0; r < total; ++r) EXPECT_EQ(fwd[inv[r]], r) << "trial " << trial;
    for (int64_t r = total; r < rows; ++r) {
      EXPECT_EQ(fwd[r], -1);
      EXPECT_EQ(inv[r], -1);
    }
  }
}

TEST(RegroupRef, RejectsBadArguments) {
  const std::vector<int64_t> counts = {2, -1};
  std::vector<int64_t> out(4);
  EXPECT_THAT(error_text([&] { regroup_index_ref(counts.data(), 1, 2, false, 4, out.data()); }),
              HasSubstr("counts[1] = -1 is negative"));
  const std::vector<int64_t> big = {3, 3};
  EXPECT_THAT(error_text([&] { regroup_index_ref(big.data(), 2, 1, false, 4, out.data()); }),
              HasSubstr("sum to 6 rows but the input has only 4"));
  EXPECT_THAT(error_text([&] { regroup_index_ref(big.data(), 0, 2, false, 4, out.data()); }),
              HasSubstr("num_ranks must be >= 1, got 0"));
}

// Counts whose sum overflows int64 must not wrap to a small total that passes the row check (it then wrote far
// outside the index buffer).
TEST(RegroupRef, RejectsCountsWhoseSumOverflows) {
  std::vector<int64_t> out(4);
  const std::vector<int64_t> huge = {std::numeric_limits<int64_t>::max(), 1};
  EXPECT_THAT(error_text([&] { regroup_index_ref(huge.data(), 2, 1, false, 4, out.data()); }),
              HasSubstr("sum to more than 9223372036854775807 rows but the input has only 4"));
  const std::vector<int64_t> wraps = {int64_t{1} << 62, int64_t{1} << 62, int64_t{1} << 62, int64_t{1} << 62};
  EXPECT_THAT(error_text([&] { regroup_index_ref(wraps.data(), 2, 2, true, 4, out.data()); }),
              HasSubstr("the counts sum to more than"));
}

}  // namespace
}  // namespace test
}  // namespace fastmoe
