// CUDA kernels of the expert stage: a portable grouped linear layer that reads the expert offsets on the device
// (no host synchronisation). It serves every dtype, including fp64; faster library backends for bf16/fp16 are
// chosen in the op layer. Torch-free host API; same contract as csrc/ref/expert_ref.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "ref/expert_ref.h"

namespace fastmoe {

void grouped_linear_cuda(DType dtype, const void* x, int64_t num_rows, int64_t in_features,
                         const int64_t* expert_offsets, int64_t num_experts, const void* weight, int64_t out_features,
                         const void* bias, void* y, cudaStream_t stream);

void grouped_linear_backward_cuda(DType dtype, const void* grad_y, const void* x, int64_t num_rows, int64_t in_features,
                                  const int64_t* expert_offsets, int64_t num_experts, const void* weight,
                                  int64_t out_features, void* grad_x, void* grad_weight, void* grad_bias,
                                  cudaStream_t stream);

// As grouped_bias_epilogue_ref / zero_empty_groups_ref, with expert_offsets read on the device.
void grouped_bias_epilogue_cuda(DType dtype, void* y, int64_t num_rows, int64_t out_features,
                                const int64_t* expert_offsets, int64_t num_experts, const void* bias,
                                cudaStream_t stream);
void zero_empty_groups_cuda(void* groups, int64_t num_groups, int64_t group_bytes, const int64_t* expert_offsets,
                            cudaStream_t stream);

// As swiglu_ref / swiglu_backward_ref (one elementwise kernel each; the backward with a scale takes a warp per
// row for the scale's gradient, summed in another order than the reference's).
void swiglu_cuda(DType dtype, const void* h, int64_t num_rows, int64_t hidden, void* out, cudaStream_t stream,
                 const void* scale = nullptr);
void swiglu_backward_cuda(DType dtype, const void* grad, const void* h, int64_t num_rows, int64_t hidden, void* grad_h,
                          cudaStream_t stream, const void* scale = nullptr, void* grad_scale = nullptr);

// As gelu_backward_bias_ref, expert_offsets read on the device. One kernel: the blocks of the bias gradient's
// kernels (bias_grad.cuh), each making its rows of grad_h and summing them as it stores them, so grad_bias has the
// bits grouped_linear_backward_cuda would give from grad_h whenever grad and h take the same 16-byte path as
// grad_h (the op copies views that start off a 16-byte boundary), and grad_h those of torch's gelu_backward.
void gelu_backward_bias_cuda(DType dtype, const void* grad, const void* h, int64_t num_rows, int64_t hidden,
                             const int64_t* expert_offsets, int64_t num_experts, void* grad_h, void* grad_bias,
                             cudaStream_t stream);

}  // namespace fastmoe
