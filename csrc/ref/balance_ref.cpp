#include "ref/balance_ref.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastmoe {
namespace {

// True when (a, pair a_id) is kept before (b, b_id): larger score first, NaN last, ties to the lower pair id.
bool keeps_before(double a, int64_t a_id, double b, int64_t b_id) {
  const bool a_nan = std::isnan(a), b_nan = std::isnan(b);
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return a > b;
  return a_id < b_id;
}

}  // namespace

void capacity_limit_ref(const int64_t* topk_idx, const void* topk_score, DType score_dtype, int64_t num_pairs,
                        const int64_t* expert_capacity, int64_t num_experts, int64_t* kept_idx, int64_t* num_dropped) {
  // 1. Validate ids and capacities.  2. Bucket the pairs by expert (in pair order).  3. Per expert, order its
  // pairs by keeps_before and drop all past its capacity.
  FMOE_CHECK(num_pairs >= 0, "num_pairs must be >= 0, got ", num_pairs);
  FMOE_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  for (int64_t e = 0; e < num_experts; ++e) {
    FMOE_CHECK(expert_capacity[e] >= 0, "expert_capacity[", e, "] = ", expert_capacity[e], " must be >= 0");
  }
  std::vector<double> score(num_pairs);
  FMOE_DISPATCH_FLOAT_TYPES(score_dtype, "capacity_limit_ref", [&] {
    const auto* s = static_cast<const scalar_t*>(topk_score);
    for (int64_t p = 0; p < num_pairs; ++p) score[p] = static_cast<double>(to_acc(s[p]));
  });
  std::vector<std::vector<int64_t>> pairs_of(num_experts);
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t id = topk_idx[p];
    FMOE_CHECK(id >= -1 && id < num_experts, "topk_idx holds expert id ", id, " at flat position ", p,
               ", outside [-1, num_experts=", num_experts, ")");
    kept_idx[p] = id;
    if (id >= 0) pairs_of[id].push_back(p);
  }
  int64_t dropped = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    std::vector<int64_t>& pairs = pairs_of[e];
    if (static_cast<int64_t>(pairs.size()) <= expert_capacity[e]) continue;
    std::sort(pairs.begin(), pairs.end(), [&](int64_t a, int64_t b) { return keeps_before(score[a], a, score[b], b); });
    for (size_t i = static_cast<size_t>(expert_capacity[e]); i < pairs.size(); ++i) {
      kept_idx[pairs[i]] = -1;
      ++dropped;
    }
  }
  *num_dropped = dropped;
}

}  // namespace fastmoe
