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

}  // namespace fastmoe
