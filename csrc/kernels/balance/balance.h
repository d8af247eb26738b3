// CUDA kernels of the balance stage. Torch-free host API; same contract as csrc/ref/balance_ref.h, with all
// pointers on the device and the work enqueued on `stream` (no host synchronisation).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "ref/balance_ref.h"

namespace fastmoe {

// Bytes of device scratch that capacity_limit_cuda needs (needs a CUDA device: CUB sizes it).
size_t capacity_limit_cuda_workspace_bytes(int64_t num_pairs, int64_t num_experts);

// As capacity_limit_ref. Ids outside [-1, num_experts) cannot raise without a host sync: they become -1 and
// count as dropped. A negative capacity is treated as 0.
void capacity_limit_cuda(const int64_t* topk_idx, const void* topk_score, DType score_dtype, int64_t num_pairs,
                         const int64_t* expert_capacity, int64_t num_experts, int64_t* kept_idx, int64_t* num_dropped,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Bytes of device scratch that balance_loss_cuda needs (per-block partial sums and a counter).
size_t balance_loss_cuda_workspace_bytes(int64_t num_tokens, int64_t num_experts);

// As balance_loss_ref, in one kernel (plus a memset of the workspace's counter): each block sums its tokens in a
// fixed order and the last block to finish adds the blocks' sums in block order, so the result is deterministic
// (the grid depends on num_tokens only, not on the device). grad_loss, in the backward, is read on the device.
void balance_loss_cuda(DType dtype, const void* logits, int64_t num_tokens, int64_t num_experts, const int64_t* counts,
                       double scale, DType loss_dtype, void* loss, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream);
void balance_loss_backward_cuda(DType dtype, const void* logits, int64_t num_tokens, int64_t num_experts,
                                const int64_t* counts, double scale, DType loss_dtype, const void* grad_loss,
                                void* grad_logits, cudaStream_t stream);

}  // namespace fastmoe
