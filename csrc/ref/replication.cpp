#include "ref/replication.h"

#include <algorithm>
#include <utility>

#include "core/check.h"

namespace fastmoe {
namespace {

constexpr double kMinGain = 0.01;

// Per-rank totals of the model, in slots and rows (integers, so every rank gets the same numbers).
struct Loads {
  std::vector<int64_t> compute, send, recv;
  // the copies' rows each rank sends and receives in each round of the tree, [rounds * world]
  std::vector<int64_t> tree_sent, tree_recv;
};

void check_args(const int64_t* load, int64_t world, int64_t num_local, const ReplicationCosts& costs) {
  FMOE_CHECK(world >= 1, "world must be >= 1, got ", world);
  FMOE_CHECK(num_local >= 1, "num_local must be >= 1, got ", num_local);
  FMOE_CHECK(load != nullptr, "load must not be null");
  FMOE_CHECK(costs.slot_cost >= 0.0 && costs.row_cost >= 0.0 && costs.expert_cost >= 0.0,
             "the replication costs must be >= 0, got slot_cost=", costs.slot_cost, ", row_cost=", costs.row_cost,
             ", expert_cost=", costs.expert_cost);
  const int64_t experts = world * num_local;
  for (int64_t i = 0; i < world * experts; ++i) {
    FMOE_CHECK(load[i] >= 0, "load[", i / experts, "][", i % experts, "] must be >= 0, got ", load[i]);
  }
}

Loads initial_loads(const int64_t* load, int64_t world, int64_t num_local) {
  const int64_t experts = world * num_local, tree = static_cast<int64_t>(tree_steps(world).size()) * world;
  Loads l{std::vector<int64_t>(world, 0), std::vector<int64_t>(world, 0), std::vector<int64_t>(world, 0),
          std::vector<int64_t>(tree, 0), std::vector<int64_t>(tree, 0)};
  for (int64_t s = 0; s < world; ++s) {
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t o = e / num_local, n = load[s * experts + e];
      l.compute[o] += n;
      if (o != s) {
        l.send[s] += n;
        l.recv[o] += n;
      }
    }
  }
  return l;
}

// Copies expert e to every rank: each rank computes its own slots of e, which no longer travel, and e's weights
// go down the tree from its owner.
void add_copy(Loads& l, const int64_t* load, int64_t world, int64_t num_local, int64_t e) {
  const int64_t experts = world * num_local, o = e / num_local;
  for (int64_t s = 0; s < world; ++s) {
    if (s == o) continue;
    const int64_t n = load[s * experts + e];
    l.compute[o] -= n;
    l.compute[s] += n;
    l.send[s] -= n;
    l.recv[o] -= n;
  }
  const std::vector<int64_t> steps = tree_steps(world);
  for (size_t round = 0; round < steps.size(); ++round) {
    // the senders are the first ranks from the owner on: rel = 0, 1, ... while tree_sends holds
    for (int64_t rel = 0; tree_sends(rel, steps[round], world); ++rel) {
      l.tree_sent[round * world + (o + rel) % world] += 1;
      l.tree_recv[round * world + (o + rel + steps[round]) % world] += 1;
    }
  }
}

double step_of(const Loads& l, const ReplicationCosts& costs) {
  const int64_t world = static_cast<int64_t>(l.compute.size());
  int64_t compute = 0, moved = 0, copies = 0;
  for (int64_t r = 0; r < world; ++r) {
    compute = std::max(compute, l.compute[r]);
    moved = std::max({moved, l.send[r], l.recv[r]});
  }
  // the rounds follow one another; in each, the busiest rank's rows sent or received
  const int64_t rounds = static_cast<int64_t>(l.tree_sent.size()) / world;
  for (int64_t round = 0; round < rounds; ++round) {
    int64_t busiest = 0;
    for (int64_t r = 0; r < world; ++r) {
      busiest = std::max({busiest, l.tree_sent[round * world + r], l.tree_recv[round * world + r]});
    }
    copies += busiest;
  }
  return costs.slot_cost * static_cast<double>(compute) + costs.row_cost * static_cast<double>(moved) +
         costs.expert_cost * static_cast<double>(copies);
}

}  // namespace

std::vector<int64_t> replication_plan(const int64_t* load, int64_t world, int64_t num_local,
                                      const ReplicationCosts& costs, int64_t max_experts) {
  check_args(load, world, num_local, costs);
  FMOE_CHECK(max_experts >= 0, "max_experts must be >= 0, got ", max_experts);
  const int64_t experts = world * num_local;
  std::vector<int64_t> chosen;
  if (world == 1) return chosen;  // nothing travels
  // Only an expert that other ranks send slots to can gain from a copy; of those, the kMaxCandidates with the most
  // such slots (the lower id on a tie), tried in ascending id.
  std::vector<std::pair<int64_t, int64_t>> remote;  // (-slots from other ranks, id): ascending = most first
  for (int64_t e = 0; e < experts; ++e) {
    int64_t n = 0;
    for (int64_t s = 0; s < world; ++s) n += s == e / num_local ? 0 : load[s * experts + e];
    if (n > 0) remote.emplace_back(-n, e);
  }
  const size_t kept = std::min(remote.size(), static_cast<size_t>(kMaxCandidates));
  std::partial_sort(remote.begin(), remote.begin() + kept, remote.end());
  std::vector<int64_t> candidates;
  for (size_t i = 0; i < kept; ++i) candidates.push_back(remote[i].second);
  std::sort(candidates.begin(), candidates.end());
  Loads current = initial_loads(load, world, num_local);
  double best = step_of(current, costs);
  std::vector<bool> taken(experts, false);
  while (static_cast<int64_t>(chosen.size()) < max_experts) {
    int64_t pick = -1;
    double pick_step = best;
    for (int64_t e : candidates) {
      if (taken[e]) continue;
      Loads trial = current;
      add_copy(trial, load, world, num_local, e);
      const double step = step_of(trial, costs);
      if (step < pick_step) {  // strictly lower; candidates go by id, so a tie keeps the lower id
        pick = e;
        pick_step = step;
      }
    }
    // A copy must earn more than kMinGain of the step: the model is not exact enough to move weights for less.
    if (pick < 0 || pick_step > best * (1.0 - kMinGain)) break;
    add_copy(current, load, world, num_local, pick);
    taken[pick] = true;
    best = pick_step;
    chosen.push_back(pick);
  }
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

double replication_step_cost(const int64_t* load, int64_t world, int64_t num_local, const ReplicationCosts& costs,
                             const std::vector<int64_t>& replicated) {
  check_args(load, world, num_local, costs);
  Loads l = initial_loads(load, world, num_local);
  std::vector<bool> seen(world * num_local, false);
  for (int64_t e : replicated) {
    FMOE_CHECK(e >= 0 && e < world * num_local && !seen[e], "replicated holds ", e,
               ", which is not a new expert id in [0, ", world * num_local, ")");
    seen[e] = true;
    add_copy(l, load, world, num_local, e);
  }
  return step_of(l, costs);
}

}  // namespace fastmoe
