// Tests of the hot-expert replication policy (csrc/ref/replication.h): skewed routers get their hot expert
// copied, balanced ones get nothing, the costs and the cap are respected, the greedy choice is never worse than
// copying nothing or the best single expert, copies cost the rounds of the broadcast tree, and only the 16 experts
// with the most remote slots are candidates.
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
  // no copy: compute max(15, 80) = 80, moved max(30, 5, 5, 30) = 30, no copy rounds
  EXPECT_DOUBLE_EQ(replication_step_cost(load.data(), 2, 1, c, {}), 80.0 + 300.0);
  // copy expert 1: rank 0 computes 10 + 5 + 30 = 45, rank 1 computes 50; moved 5; the tree's one round (step 1):
  // rank 1 sends expert 1 to rank 0, the busiest rank moves one row
  EXPECT_DOUBLE_EQ(replication_step_cost(load.data(), 2, 1, c, {1}), 50.0 + 50.0 + 100.0);
  // then expert 0 too: rank 0 computes 40, rank 1 55, nothing moves; in the one round each rank sends one row and
  // receives one, so the busiest still moves one
  EXPECT_DOUBLE_EQ(replication_step_cost(load.data(), 2, 1, c, {0, 1}), 55.0 + 0.0 + 100.0);
  EXPECT_EQ(replication_plan(load.data(), 2, 1, c, 1), std::vector<int64_t>{1});
  EXPECT_EQ(replication_plan(load.data(), 2, 1, c, 2), (std::vector<int64_t>{0, 1}));
}

TEST(ReplicationPlan, CopiesCostTheTreesRoundsAtEightRanks) {
  // W = 8, one local expert each, no slots anywhere: the step is the copy term alone. Rounds of step 1, 2, 4.
  const std::vector<int64_t> zero(8 * 8, 0);
  ReplicationCosts c;
  c.slot_cost = 1.0;
  c.row_cost = 10.0;
  c.expert_cost = 1.0;
  // expert 0: 0 -> 1; 0 -> 2, 1 -> 3; 0..3 -> 4..7: one row per rank per round (one all-to-all from the owner
  // would put 7 rows on rank 0's link)
  EXPECT_DOUBLE_EQ(replication_step_cost(zero.data(), 8, 1, c, {0}), 3.0);
  // experts 0 and 4: 0 -> 1 and 4 -> 5; 0, 1 -> 2, 3 and 4, 5 -> 6, 7; 0..3 -> 4..7 and 4..7 -> 0..3, each rank
  // sending one row and receiving one in the last round
  EXPECT_DOUBLE_EQ(replication_step_cost(zero.data(), 8, 1, c, {0, 4}), 1.0 + 1.0 + 1.0);
  // experts 0 and 1: round 1 (step 1) 0 -> 1 and 1 -> 2; round 2 (step 2) 0, 1 -> 2, 3 and 1, 2 -> 3, 4, so rank 1
  // sends both to rank 3; round 3 (step 4) 0..3 -> 4..7 and 1..4 -> 5, 6, 7, 0, rank 1 sending two rows again
  EXPECT_DOUBLE_EQ(replication_step_cost(zero.data(), 8, 1, c, {0, 1}), 1.0 + 2.0 + 2.0);
  // experts 0, 1 and 4: round 1 as {0, 1} plus 4 -> 5, one row each; round 2 rank 1 sends two; round 3 rank 1
  // sends 0 and 1, rank 4 sends 1 and 4, rank 5 receives 0 and 1: two
  EXPECT_DOUBLE_EQ(replication_step_cost(zero.data(), 8, 1, c, {0, 1, 4}), 1.0 + 2.0 + 2.0);

  // Every other rank sends 100 slots to expert 0: rank 0 receives 700 rows, the step's moved term. A copy saves
  // them for 3 rounds of expert_cost = 150 (450 < 700), where 7 rows from the owner (1050) would not.
  std::vector<int64_t> load(8 * 8, 0);
  for (int64_t s = 1; s < 8; ++s) load[s * 8] = 100;
  c.slot_cost = 0.0;
  c.row_cost = 1.0;
  c.expert_cost = 150.0;
  EXPECT_DOUBLE_EQ(replication_step_cost(load.data(), 8, 1, c, {}), 700.0);
  EXPECT_DOUBLE_EQ(replication_step_cost(load.data(), 8, 1, c, {0}), 450.0);
  EXPECT_EQ(replication_plan(load.data(), 8, 1, c, 4), std::vector<int64_t>{0});
  c.expert_cost = 240.0;  // 3 rounds cost 720 > 700: no copy
  EXPECT_TRUE(replication_plan(load.data(), 8, 1, c, 4).empty());
}

TEST(ReplicationPlan, ANonPowerOfTwoWorldTakesCeilLog2Rounds) {
  // W = 3: 0 -> 1, then 0 -> 2 (rank 1 has no rank 3 to send to); W = 5: three rounds, the last 0 -> 4
  for (const auto& [world, rounds] : {std::pair<int64_t, double>{3, 2.0}, {5, 3.0}, {6, 3.0}}) {
    const std::vector<int64_t> zero(world * world, 0);
    ReplicationCosts c;
    c.expert_cost = 1.0;
    EXPECT_DOUBLE_EQ(replication_step_cost(zero.data(), world, 1, c, {world - 1}), rounds) << "world=" << world;
  }
}

TEST(ReplicationPlan, OnlyTheSixteenExpertsWithTheMostRemoteSlotsAreCandidates) {
  const int64_t world = 24;
  ReplicationCosts c;
  c.row_cost = 1.0;  // free copies, only moved rows count
  // Every rank sends 100 * (20 - e) slots to expert e < 20 (one local expert each): each copy, hottest first,
  // lowers the busiest receiver's rows by more than 1%, but only experts 0..15 are candidates.
  std::vector<int64_t> load(world * world, 0);
  for (int64_t s = 0; s < world; ++s) {
    for (int64_t e = 0; e < 20; ++e) load[s * world + e] = s == e ? 0 : 100 * (20 - e);
  }
  std::vector<int64_t> first16(16);
  for (int64_t e = 0; e < 16; ++e) first16[e] = e;
  EXPECT_EQ(replication_plan(load.data(), world, 1, c, world), first16);
  std::vector<int64_t> first17 = first16;
  first17.push_back(16);
  EXPECT_LT(replication_step_cost(load.data(), world, 1, c, first17),
            0.99 * replication_step_cost(load.data(), world, 1, c, first16));  // the 17th would have been copied

  // 17 experts tie at 10 slots from every other rank, and rank 16 also routes 1000 slots to its own expert 16:
  // only copying expert 16 lowers the busiest rank's compute, but the tie leaves it out (ids 0..15 win).
  c = ReplicationCosts{};
  c.slot_cost = 1.0;
  std::fill(load.begin(), load.end(), 0);
  for (int64_t s = 0; s < world; ++s) {
    for (int64_t e = 0; e <= 16; ++e) load[s * world + e] = s == e ? 0 : 10;
  }
  load[16 * world + 16] = 1000;
  EXPECT_LT(replication_step_cost(load.data(), world, 1, c, {16}),
            0.99 * replication_step_cost(load.data(), world, 1, c, {}));
  EXPECT_TRUE(replication_plan(load.data(), world, 1, c, 4).empty());
  // one more remote slot for expert 16 puts it first among the candidates
  load[3 * world + 16] += 1;
  EXPECT_EQ(replication_plan(load.data(), world, 1, c, 4), std::vector<int64_t>{16});
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
