// CPU reference for the dispatch stage: the routing plan, permute, and the weighted unpermute-combine.
// Torch-free. A "pair" is one (token, slot) of the routing, flattened as pair = token * k + slot.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace fastmoe {

// Builds the plan of one routing.
// topk_idx:       [num_pairs] int64, expert id in [0, num_experts) or -1 (dropped)
// expert_counts:  [num_experts] int64, written: pairs routed to each expert
// expert_offsets: [num_experts + 1] int64, written: exclusive prefix sum of expert_counts
// sorted_pair:    [num_pairs] int64, written: the pairs ordered by expert, stable (by pair) inside an expert;
//                 positions >= expert_offsets[num_experts] hold -1
// pair_pos:       [num_pairs] int64, written: position of each pair in sorted_pair, -1 for a dropped pair
// Throws fastmoe::Error naming the position and value of an id outside [-1, num_experts).
void make_plan_ref(const int64_t* topk_idx, int64_t num_pairs, int64_t num_experts, int64_t* expert_counts,
                   int64_t* expert_offsets, int64_t* sorted_pair, int64_t* pair_pos);

// Checks that sorted_pair and pair_pos describe one plan, as make_plan writes them: permute reads sorted_pair and
// its backward reads pair_pos (the combine the other way round), so a hand-made pair that disagrees would give a
// forward from one and a backward from the other. sorted_pair may be cut to its first num_rows entries (expert
// parallelism keeps the routed rows only).
// sorted_pair: [num_rows] int64, each a pair id in [0, num_pairs) or -1, no pair twice
// pair_pos:    [num_pairs / k, k] int64, each a row in [0, num_rows) or -1
// Holds when: pair_pos[sorted_pair[r]] == r for every r with sorted_pair[r] >= 0, and sorted_pair[pair_pos[p]] == p
// for every p with pair_pos[p] >= 0. Throws fastmoe::Error naming the first row or pair where it does not.
void check_plan_ref(const int64_t* sorted_pair, int64_t num_rows, const int64_t* pair_pos, int64_t num_pairs,
                    int64_t k);

// Gathers token rows into plan order, optionally scaled per pair.
// x:          [num_tokens, d], dtype
// sorted_pair:[num_rows] int64 (pair ids or -1)
// pair_scale: [num_tokens * k], scale_dtype, or nullptr for 1
// x_sorted:   [num_rows, d], written: row r = pair_scale[p] * x[p / k] for p = sorted_pair[r], zero where p < 0
void permute_ref(DType dtype, const void* x, int64_t num_tokens, int64_t d, const int64_t* sorted_pair,
                 int64_t num_rows, int64_t k, const void* pair_scale, DType scale_dtype, void* x_sorted);

// Weighted combine back to token order, a gather: no two writers share an output, so the sum is deterministic
// and runs over the slots in order 0..k-1 in the accumulation type.
// y_sorted:   [num_rows, d], dtype
// pair_pos:   [num_tokens, k] int64 (row in y_sorted, or -1 for a dropped slot, which adds nothing)
// topk_score: [num_tokens, k], score_dtype, or nullptr for weights of 1 (the backward of permute)
// y:          [num_tokens, d], written
void unpermute_combine_ref(DType dtype, const void* y_sorted, int64_t num_rows, int64_t d, const int64_t* pair_pos,
                           int64_t num_tokens, int64_t k, const void* topk_score, DType score_dtype, void* y);

// Gradient of the combine with respect to the scores: grad_score[t, j] = <grad_y[t], y_sorted[pair_pos[t, j]]>,
// zero for a dropped slot. Accumulates in the accumulation type of dtype.
// grad_y: [num_tokens, d] dtype; y_sorted: [num_rows, d] dtype; grad_score: [num_tokens, k] score_dtype, written
void combine_score_grad_ref(DType dtype, const void* grad_y, const void* y_sorted, int64_t num_rows, int64_t d,
                            const int64_t* pair_pos, int64_t num_tokens, int64_t k, DType score_dtype,
                            void* grad_score);

// Where the tokens of one rank go under expert parallelism (W ranks, num_local experts each; global expert g on
// rank g / num_local). A token is sent once to every rank that owns one of its experts.
// topk_idx:    [num_tokens, k] int64, global expert ids in [0, W * num_local) or -1 (dropped)
// token_ranks: [num_tokens, W] int64, written: entry p is p when a slot of the token goes to rank p, else -1
// dest_counts: [W, num_local + 1] int64, written: [p][e] slots for local expert e of rank p, [p][num_local] tokens
//              sent to rank p
// Throws fastmoe::Error naming the position and value of an id outside [-1, W * num_local).
void ep_route_ref(const int64_t* topk_idx, int64_t num_tokens, int64_t k, int64_t num_local, int64_t world,
                  int64_t* token_ranks, int64_t* dest_counts);

}  // namespace fastmoe
