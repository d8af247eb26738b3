#include "ref/replication.h"

#include <algorithm>

#include "core/check.h"

namespace fastmoe {
namespace {

constexpr double kMinGain = 0.01;

// Per-rank totals of the model, in slots (integers, so every rank gets the same numbers).
struct Loads {
  std::vector<int64_t> compute, send, recv;
  std::vector<int64_t> owned;  // copied experts each rank owns
  int64_t copied = 0;
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
  const int64_t experts = world * num_local;
  Loads l{std::vector<int64_t>(world, 0), std::vector<int64_t>(world, 0), std::vector<int64_t>(world, 0),
          std::vector<int64_t>(world, 0), 0};
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

// Copies expert e to every rank: each rank computes its own slots of e, which no longer travel.
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
  l.owned[o] += 1;
  l.copied += 1;
}

double step_of(const Loads& l, const ReplicationCosts& costs) {
  const int64_t world = static_cast<int64_t>(l.compute.size());
  int64_t compute = 0, moved = 0, copies = 0;
  for (int64_t r = 0; r < world; ++r) {
    compute = std::max(compute, l.compute[r]);
    moved = std::max({moved, l.send[r], l.recv[r]});
    // an owner sends each of its copies to the W - 1 others; every rank receives the copies it does not own
    copies = std::max({copies, l.owned[r] * (world - 1), l.copied - l.owned[r]});
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
  // Only an expert that other ranks send slots to can gain from a copy.
  std::vector<int64_t> candidates;
  for (int64_t e = 0; e < experts; ++e) {
    int64_t remote = 0;
    for (int64_t s = 0; s < world; ++s) remote += s == e / num_local ? 0 : load[s * experts + e];
    if (remote > 0) candidates.push_back(e);
  }
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
