// Hot-expert replication's policy: which experts to copy to every rank for one step of an expert-parallel layer.
// Torch-free host code, the one policy of both front ends (fastmoe::TokenDispatch runs it on the gathered loads;
// torch.ops.fastmoe.plan_replication exposes it). docs/distributed.md, "Hot-expert replication", gives the model.
//
// The cost model, for a set R of replicated experts, with load[s][e] the slots rank s routes to global expert e and
// owner(e) = e / num_local:
//   compute_r = slot_cost * (slots of r's own experts not in R, from every rank + slots r routes to experts in R)
//   moved_r   = max(slots r sends to other ranks' experts not in R, slots r's experts not in R get from others)
//   copied    = sum over rounds j < ceil(log2 W) of max_r max(sent_jr, received_jr)
//   step(R)   = max_r compute_r + row_cost * max_r moved_r + expert_cost * copied
// slot_cost: one slot row through an expert, forward and backward; row_cost: one row to another rank and back,
// forward and backward; expert_cost: one expert's weights over one link and their gradients back. The copies go
// as ops::replicate_experts sends them, a binomial tree per expert: in round j (step 2^j) the ranks with
// rel = (r - owner(e)) mod W < step hold e and send it to r + step while rel + step < W. sent_jr and received_jr
// count the experts of R that rank r sends and receives in round j (at most one row each per expert); the rounds
// follow one another and the ranks' links work in parallel, so each round costs its busiest rank. One copied
// expert costs ceil(log2 W) rounds of one row.
// Greedy: starting from R = {}, add the expert whose copy lowers step(R) most (the lower id on a tie), while that
// lowers it by more than 1% and R holds fewer than max_experts. The candidates are the kMaxCandidates experts with
// the most slots from ranks other than their owner (the lower id on a tie), those with none left out; so one call
// reads the loads once and then tries at most kMaxCandidates copies per pick, each O(W log W). Every rank computes
// the same R from the same loads: the loads are integers and the arithmetic is done in one fixed order.
#pragma once

#include <cstdint>
#include <vector>

namespace fastmoe {

// The experts the greedy considers at most: those with the most slots from other ranks.
constexpr int64_t kMaxCandidates = 16;

// The binomial tree that ops::replicate_experts copies an expert down, and that the policy prices: round j has
// step 2^j for every 2^j < world; in it the rank at rel = (r - owner) mod world sends the copy to the rank at
// rel + step when tree_sends, and receives it from rel - step when tree_receives.
inline std::vector<int64_t> tree_steps(int64_t world) {
  std::vector<int64_t> steps;
  for (int64_t step = 1; step < world; step *= 2) steps.push_back(step);
  return steps;
}
inline bool tree_sends(int64_t rel, int64_t step, int64_t world) {
  return rel < step && rel + step < world;
}
inline bool tree_receives(int64_t rel, int64_t step) {
  return rel >= step && rel < 2 * step;
}

struct ReplicationCosts {
  double slot_cost = 0.0;    // seconds per slot row of expert compute (forward + backward)
  double row_cost = 0.0;     // seconds per row moved to another rank and back (forward + backward)
  double expert_cost = 0.0;  // seconds to move one expert's weights over one link and its gradients back
};

// load: [world * num_experts] int64 row-major, load[s * num_experts + e] >= 0; num_experts = world * num_local.
// Returns the replicated global expert ids in ascending order (empty when none helps or max_experts is 0).
// Throws fastmoe::Error naming the argument on bad sizes, negative loads or negative costs.
std::vector<int64_t> replication_plan(const int64_t* load, int64_t world, int64_t num_local,
                                      const ReplicationCosts& costs, int64_t max_experts);

// The modelled step time of replicating `replicated` (the policy's objective, for tests and tools).
double replication_step_cost(const int64_t* load, int64_t world, int64_t num_local, const ReplicationCosts& costs,
                             const std::vector<int64_t>& replicated);

}  // namespace fastmoe
