// CUDA kernels of the dispatch stage. Torch-free host API; same contract as csrc/ref/dispatch_ref.h, with all
// pointers on the device and the work enqueued on `stream` (no host synchronisation).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "ref/dispatch_ref.h"

namespace fastmoe {

// Bytes of device scratch that make_plan_cuda needs for these sizes (CUB's temporary storage and friends); 0 for a
// plan small enough for make_plan_cuda's one-block path, which needs none.
size_t make_plan_cuda_workspace_bytes(int64_t num_pairs, int64_t num_experts);

// As make_plan_ref. An id outside [-1, num_experts) cannot be reported without a host sync, so it is treated as
// dropped and counted into *invalid_count (device int64, may be nullptr), which callers may check lazily.
void make_plan_cuda(const int64_t* topk_idx, int64_t num_pairs, int64_t num_experts, int64_t* expert_counts,
                    int64_t* expert_offsets, int64_t* sorted_pair, int64_t* pair_pos, int64_t* invalid_count,
                    void* workspace, size_t workspace_bytes, cudaStream_t stream);

// As permute_ref. pair_pos ([num_tokens, k], the plan's other half) may be nullptr; given, each token's row is
// read once and stored to its rows, which moves far fewer bytes once x outgrows the L2 cache. The output is the
// same bits either way, even where pair_pos does not invert sorted_pair.
void permute_cuda(DType dtype, const void* x, int64_t num_tokens, int64_t d, const int64_t* sorted_pair,
                  int64_t num_rows, const int64_t* pair_pos, int64_t k, const void* pair_scale, DType scale_dtype,
                  void* x_sorted, cudaStream_t stream);

void unpermute_combine_cuda(DType dtype, const void* y_sorted, int64_t num_rows, int64_t d, const int64_t* pair_pos,
                            int64_t num_tokens, int64_t k, const void* topk_score, DType score_dtype, void* y,
                            cudaStream_t stream);

// The combine's backward in one kernel (permute_cuda of grad_y scaled by topk_score, given pair_pos, and
// combine_score_grad_cuda), reading each token's row of grad_y once for both outputs. topk_score, pair_pos and
// grad_score must be given; grad_y_sorted gets permute_ref's bits, grad_score combine_score_grad_cuda's sums when
// grad_y_sorted is 16-byte aligned like grad_y and y_sorted (as the op's fresh tensors are; otherwise the same terms
// may be added in another order).
void unpermute_combine_backward_cuda(DType dtype, const void* grad_y, const void* y_sorted, int64_t d,
                                     const int64_t* sorted_pair, int64_t num_rows, const int64_t* pair_pos,
                                     int64_t num_tokens, int64_t k, const void* topk_score, DType score_dtype,
                                     void* grad_y_sorted, void* grad_score, cudaStream_t stream);

void combine_score_grad_cuda(DType dtype, const void* grad_y, const void* y_sorted, int64_t num_rows, int64_t d,
                             const int64_t* pair_pos, int64_t num_tokens, int64_t k, DType score_dtype,
                             void* grad_score, cudaStream_t stream);

// As ep_route_ref, without a host sync: an id outside [-1, W * num_local) is treated as dropped. Deterministic
// (integer atomics). dest_counts is zeroed here.
void ep_route_cuda(const int64_t* topk_idx, int64_t num_tokens, int64_t k, int64_t num_local, int64_t world,
                   int64_t* token_ranks, int64_t* dest_counts, cudaStream_t stream);

}  // namespace fastmoe
