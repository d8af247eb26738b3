// CUDA kernels of the routing stage. Torch-free host API; same contract as csrc/ref/routing_ref.h, with all
// pointers on the device and the work enqueued on `stream` (no host synchronisation).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "ref/routing_ref.h"

namespace fastmoe {

void route_topk_cuda(DType dtype, const void* logits, int64_t num_tokens, int64_t num_experts, int64_t k, ScoreFn fn,
                     int64_t* topk_idx, void* topk_score, cudaStream_t stream);

void route_topk_backward_cuda(DType dtype, const void* grad_score, const void* logits, const int64_t* topk_idx,
                              const void* topk_score, int64_t num_tokens, int64_t num_experts, int64_t k, ScoreFn fn,
                              void* grad_logits, cudaStream_t stream);

}  // namespace fastmoe
