// Tests of the hot-expert replication policy (csrc/ref/replication.h): skewed routers get their hot expert
// copied, balanced ones get nothing, the costs and the cap are respected, and the greedy choice is never worse than
// copying nothing or the best single expert.
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "ref/replication.h"
#include "test_util.h"

namespace fastmoe {
namespace test {
namespace {

using ::testing::HasSubstr;

// Costs of the order of an H200 pair: a slot row's GEMMs against moving the row and the expert's weights.
ReplicationCosts h200_like() {
  ReplicationCosts c;
  c.slot_cost = 6.0 * 2 * 1024 * 4096 / 6e14;          // fwd + bwd FLOPs of a [1024 x 4096] GELU expert
  c.row_cost = 4.0 * 1024 * 2 / 1.5e11;                // 4 transfers of a bf16 row
  c.expert_cost = 2.0 * 2 * 1024 * 4096 * 2 / 1.5e11;  // weights out, gradients back
  return c;
}

// load[s][e] for W ranks: every rank sends `base` slots to each expert and `hot` more to expert `hot_expert`.
std::vector<int64_t> skewed(int64_t world, int64_t num_local, int64_t base, int64_t hot, int64_t hot_expert) {
  const int64_t experts = world * num_local;
  std::vector<int64_t> load(world * experts, base);
  for (int64_t s = 0; s < world; ++s) load[s * experts + hot_expert] += hot;
  return load;
}

TEST(ReplicationPlan, BalancedRoutingCopiesNothing) {
  for (int64_t world : {2, 4, 8}) {
    const std::vector<int64_t> load = skewed(world, 4, 1024, 0, 0);
    EXPECT_TRUE(replication_plan(load.data(), world, 4, h200_like(), 4).empty()) << "world=" << world;
  }
}

TEST(ReplicationPlan, AHotExpertIsCopiedEvenWhenEveryRankSendsTheSameTotal) {
  // Every source rank routes the same number of slots, so totals per source are equal; only the per-expert loads
  // show the hot expert (a policy that sums over the wrong axis of the load matrix never finds it).
  for (int64_t world : {2, 4}) {
    for (int64_t hot_expert : {0, 5}) {
      const std::vector<int64_t> load = skewed(world, 4, 256, 16384, hot_expert);
      const std::vector<int64_t> plan = replication_plan(load.data(), world, 4, h200_like(), 4);
      // the hot expert first; a cold one may follow where it evens out the compute (W = 2: the copies cross in
      // opposite directions, so the second costs no extra time on the links)
      ASSERT_FALSE(plan.empty()) << "world=" << world;
      EXPECT_NE(std::find(plan.begin(), plan.end(), hot_expert), plan.end()) << "world=" << world;
      EXPECT_LE(plan.size(), world == 2 ? 2u : 1u) << "world=" << world;
      const double with_plan = replication_step_cost(load.data(), world, 4, h200_like(), plan);
      EXPECT_LE(with_plan, replication_step_cost(load.data(), world, 4, h200_like(), {hot_expert}));
      EXPECT_LT(with_plan, 0.7 * replication_step_cost(load.data(), world, 4, h200_like(), {}));
    }
  }
}

TEST(ReplicationPlan, TwoHotExpertsOnOneRankAreBothCopiedUpToTheCap) {
  const int64_t world = 4, local = 2, experts = world * local;
  std::vector<int64_t> load = skewed(world, local, 100, 20000, 2);
  for (int64_t s = 0; s < world; ++s) load[s * experts + 3] += 20000;
  ReplicationCosts c = h200_like();
  EXPECT_EQ(replication_plan(load.data(), world, local, c, 4), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(replication_plan(load.data(), world, local, c, 1).size(), 1u);
  EXPECT_TRUE(replication_plan(load.data(), world, local, c, 0).empty());
}

TEST(ReplicationPlan, ExpensiveWeightsAreNotCopied) {
  const std::vector<int64_t> load = skewed(2, 4, 256, 16384, 1);
  ReplicationCosts c = h200_like();
  c.expert_cost = 1e3;  // far above any saving
  EXPECT_TRUE(replication_plan(load.data(), 2, 4, c, 4).empty());
  c.expert_cost = 0.0;  // free copies: the hot expert, and whatever else lowers the step
  const std::vector<int64_t> plan = replication_plan(load.data(), 2, 4, c, 8);
  EXPECT_NE(std::find(plan.begin(), plan.end(), 1), plan.end());
}

TEST(ReplicationPlan, OneRankHasNothingToCopyAndOwnSlotsAloneNeverTriggerACopy) {
  const std::vector<int64_t> one = skewed(1, 4, 10, 1000, 2);
  EXPECT_TRUE(replication_plan(one.data(), 1, 4, h200_like(), 4).empty());
  // rank 0's own expert 0 is hot, but only rank 0 sends to it: a copy moves nothing
  std::vector<int64_t> load(2 * 4, 10);
  load[0] = 100000;
  EXPECT_TRUE(replication_plan(load.data(), 2, 2, h200_like(), 4).empty());
}

TEST(ReplicationPlan, GreedyIsNeverWorseThanNoCopyNorMoreThanOnePercentAboveTheBestSingleCopy) {
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t world = 2 + rng() % 4, local = 1 + rng() % 3, experts = world * local;
    std::vector<int64_t> load(world * experts);
    const int64_t hot = rng() % experts;
    for (int64_t s = 0; s < world; ++s) {
      for (int64_t e = 0; e < experts; ++e) load[s * experts + e] = rng() % 200 + (e == hot ? rng() % 5000 : 0);
    }
    const ReplicationCosts c = h200_like();
    const std::vector<int64_t> plan = replication_plan(load.data(), world, local, c, experts);
    const double cost = replication_step_cost(load.data(), world, local, c, plan);
    EXPECT_LE(cost, replication_step_cost(load.data(), world, local, c, {})) << "trial " << trial;
    for (int64_t e = 0; e < experts; ++e) {
      // a copy that gains 1% or less is not made
      EXPECT_LE(cost * 0.99, replication_step_cost(load.data(), world, local, c, {e}))
          << "trial " << trial << " e " << e;
    }
    for (size_t i = 1; i < plan.size(); ++i) EXPECT_LT(plan[i - 1], plan[i]);  // ascending, no repeats
  }
}

TEST(ReplicationPlan, StepCostFollowsTheModel) {
  // W = 2, one local expert each: rank 0 sends 30 slots to expert 1 and keeps 10 for expert 0; rank 1 sends 5 to
  // expert 0 and keeps 50 for expert 1.
  const std::vector<int64_t> load = {10, 30, 5, 50};
  ReplicationCosts c;
  c.slot_cost = 1.0;
  c.row_cost = 10.0;
  c.expert_cost = 100.0;
  // no copy: compute max(15, 80) = 80, moved max(30, 5, 5, 30) = 30, copies 0
  EXPECT_DOUBLE_EQ(replication_step_cost(load.data(), 2, 1, c, {}), 80.0 + 300.0);
  // copy expert 1: rank 0 computes 10 + 5 + 30 = 45, rank 1 computes 50; moved 5; one copy
  EXPECT_DOUBLE_EQ(replication_step_cost(load.data(), 2, 1, c, {1}), 50.0 + 50.0 + 100.0);
  // then expert 0 too: rank 0 computes 40, rank 1 55, nothing moves; each rank sends one copy and receives one
  EXPECT_DOUBLE_EQ(replication_step_cost(load.data(), 2, 1, c, {0, 1}), 55.0 + 0.0 + 100.0);
  EXPECT_EQ(replication_plan(load.data(), 2, 1, c, 1), std::vector<int64_t>{1});
  EXPECT_EQ(replication_plan(load.data(), 2, 1, c, 2), (std::vector<int64_t>{0, 1}));
}

TEST(ReplicationPlan, BadArgumentsAreNamed) {
  std::vector<int64_t> load = {1, 2, 3, -4};
  EXPECT_THAT(error_text([&] { replication_plan(load.data(), 2, 1, ReplicationCosts{}, 1); }),
              HasSubstr("load[1][1] must be >= 0, got -4"));
  load[3] = 4;
  ReplicationCosts bad;
  bad.row_cost = -1.0;
  EXPECT_THAT(error_text([&] { replication_plan(load.data(), 2, 1, bad, 1); }), HasSubstr("row_cost=-1"));
  EXPECT_THAT(error_text([&] { replication_plan(load.data(), 2, 1, ReplicationCosts{}, -1); }),
              HasSubstr("max_experts must be >= 0, got -1"));
  EXPECT_THAT(error_text([&] { replication_step_cost(load.data(), 2, 1, ReplicationCosts{}, {2}); }),
              HasSubstr("replicated holds 2"));
}

}  // namespace
}  // namespace test
}  // namespace fastmoe
