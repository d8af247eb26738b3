// capacity_limit_ref: keeps each expert's highest-scored assignments (NaN last, ties to the lower pair), checked
// against hand-worked cases and an independent model built on std::stable_sort.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "ref/balance_ref.h"
#include "test_util.h"

namespace fastmoe {
namespace {

using ::testing::HasSubstr;

struct Limited {
  std::vector<int64_t> kept;
  int64_t dropped;
};

Limited run(const std::vector<int64_t>& idx, const std::vector<float>& score, const std::vector<int64_t>& cap) {
  Limited out{std::vector<int64_t>(idx.size()), -7};
  capacity_limit_ref(idx.data(), score.data(), DType::kFloat32, static_cast<int64_t>(idx.size()), cap.data(),
                     static_cast<int64_t>(cap.size()), out.kept.data(), &out.dropped);
  return out;
}

// Independent model: per expert, stable-sort its pairs (in pair order) by score descending with NaN last.
Limited model(const std::vector<int64_t>& idx, const std::vector<float>& score, const std::vector<int64_t>& cap) {
  Limited out{idx, 0};
  for (size_t e = 0; e < cap.size(); ++e) {
    std::vector<size_t> pairs;
    for (size_t p = 0; p < idx.size(); ++p) {
      if (idx[p] == static_cast<int64_t>(e)) pairs.push_back(p);
    }
    std::stable_sort(pairs.begin(), pairs.end(), [&](size_t a, size_t b) {
      const float sa = score[a], sb = score[b];
      if (std::isnan(sa) || std::isnan(sb)) return !std::isnan(sa) && std::isnan(sb);
      return sa > sb;
    });
    for (size_t i = static_cast<size_t>(cap[e]); i < pairs.size(); ++i) {
      out.kept[pairs[i]] = -1;
      ++out.dropped;
    }
  }
  return out;
}

TEST(CapacityLimitRef, KeepsTheHighestScoresWithTiesToTheLowerPair) {
  // Expert 0 holds pairs 0, 2, 3, 5 (scores .1 .9 .5 .9): capacity 2 keeps pairs 2 and 5.
  const Limited out = run({0, 1, 0, 0, 1, 0}, {0.1f, 0.3f, 0.9f, 0.5f, 0.2f, 0.9f}, {2, 1});
  EXPECT_EQ(out.kept, (std::vector<int64_t>{-1, 1, 0, -1, -1, 0}));
  EXPECT_EQ(out.dropped, 3);
}

TEST(CapacityLimitRef, NaNGoesFirstAndDroppedSlotsStayDropped) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const Limited out = run({0, -1, 0, 0}, {nan, 5.0f, -1.0f, 2.0f}, {2});
  EXPECT_EQ(out.kept, (std::vector<int64_t>{-1, -1, 0, 0}));
  EXPECT_EQ(out.dropped, 1);
}

TEST(CapacityLimitRef, NegativeZeroTiesWithPositiveZero) {
  const Limited out = run({0, 0}, {0.0f, -0.0f}, {1});
  EXPECT_EQ(out.kept, (std::vector<int64_t>{0, -1}));
}

TEST(CapacityLimitRef, MatchesAStableSortModelOnRandomRoutings) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t num_pairs = 1 + rng() % 300, num_experts = 1 + rng() % 9;
    std::vector<int64_t> idx(num_pairs), cap(num_experts);
    std::vector<float> score(num_pairs);
    for (auto& id : idx) id = static_cast<int64_t>(rng() % (num_experts + 1)) - 1;
    for (auto& s : score) s = static_cast<float>(rng() % 6) / 4.0f;  // many ties
    for (auto& c : cap) c = rng() % 40;
    const Limited got = run(idx, score, cap), want = model(idx, score, cap);
    ASSERT_EQ(got.kept, want.kept) << "trial " << trial;
    ASSERT_EQ(got.dropped, want.dropped) << "trial " << trial;
  }
}

TEST(CapacityLimitRef, EveryScoreDtypeRanksTheSame) {
  const std::vector<int64_t> idx = {1, 1, 1, 0, 1};
  const std::vector<double> values = {0.25, -1.5, 3.0, 2.0, 0.5};
  const std::vector<int64_t> cap = {0, 2};
  const std::vector<int64_t> want = {-1, -1, 1, -1, 1};
  for (DType dtype : {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16}) {
    std::vector<int64_t> kept(idx.size());
    int64_t dropped = 0;
    FMOE_DISPATCH_FLOAT_TYPES(dtype, "test", [&] {
      std::vector<scalar_t> score;
      for (double v : values) score.push_back(from_acc<scalar_t>(static_cast<acc_t<scalar_t>>(v)));
      capacity_limit_ref(idx.data(), score.data(), dtype, 5, cap.data(), 2, kept.data(), &dropped);
    });
    EXPECT_EQ(kept, want) << dtype_name(dtype);
    EXPECT_EQ(dropped, 3) << dtype_name(dtype);
  }
}

TEST(CapacityLimitRef, RejectsBadIdsAndCapacities) {
  std::vector<int64_t> kept(2);
  int64_t dropped = 0;
  const std::vector<float> score = {1.0f, 2.0f};
  const std::vector<int64_t> bad_id = {0, 3}, ok_id = {0, 1}, cap = {1, 1}, bad_cap = {1, -2};
  EXPECT_THAT(test::error_text([&] {
                capacity_limit_ref(bad_id.data(), score.data(), DType::kFloat32, 2, cap.data(), 2, kept.data(),
                                   &dropped);
              }),
              HasSubstr("expert id 3 at flat position 1"));
  EXPECT_THAT(test::error_text([&] {
                capacity_limit_ref(ok_id.data(), score.data(), DType::kFloat32, 2, bad_cap.data(), 2, kept.data(),
                                   &dropped);
              }),
              HasSubstr("expert_capacity[1] = -2"));
}

}  // namespace
}  // namespace fastmoe
