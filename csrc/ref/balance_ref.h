// CPU reference for the balance stage: capacity limiting by score. Torch-free.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace fastmoe {

// Of the pairs (pair = token * k + slot) routed to expert e, keeps the expert_capacity[e] with the highest score
// and sets the others to -1. Order: larger score first, NaN below every number (a NaN-scored assignment is the
// first to go), ties to the lower pair id, so the result is deterministic.
// topk_idx:        [num_pairs] int64, expert id in [0, num_experts) or -1 (already dropped; stays -1)
// topk_score:      [num_pairs], score_dtype
// expert_capacity: [num_experts] int64, >= 0
// kept_idx:        [num_pairs] int64, written (may alias nothing)
// num_dropped:     [1] int64, written: pairs this call set to -1
// Throws fastmoe::Error naming the position and value of a bad id or capacity.
void capacity_limit_ref(const int64_t* topk_idx, const void* topk_score, DType score_dtype, int64_t num_pairs,
                        const int64_t* expert_capacity, int64_t num_experts, int64_t* kept_idx, int64_t* num_dropped);

}  // namespace fastmoe
