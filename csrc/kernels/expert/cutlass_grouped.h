// The grouped linear layer's GEMMs on CUTLASS's SM90 grouped GEMM (TMA loads, WGMMA tensor cores, fp32
// accumulation), for fp16 and bf16. Built only when CMake finds the CUTLASS headers and compiles for sm_90
// (FASTMOE_WITH_CUTLASS); the kernels run only on devices of compute capability 9.0 (sm_90a code).
//
// No host synchronisation: one small kernel turns expert_offsets into the per-expert problem sizes, operand
// pointers and strides, written into the caller's workspace, and the grouped GEMM reads them on the device (the
// host never sees the row counts). Same contract as csrc/ref/expert_ref.h: rows past offsets[E] come out zero, an
// expert without rows gets an exactly zero weight gradient. Torch-free host API; every pointer is device memory.
//
// Conditions (checked, with an error naming the value): dtype fp16 or bf16; in_features and out_features
// multiples of 8 and, like num_rows, below 2^31; x, weight, y, grad_y, grad_x and grad_weight 16-byte aligned.
// TMA needs 16-byte aligned base addresses and row pitches, and each expert's rows start at
// x + offsets[e] * in_features, which is 16-byte aligned for 2-byte elements when in_features % 8 == 0 (the same
// for out_features and the rows of y and grad_y).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

namespace fastmoe {

// Bytes of device workspace that one call below needs for num_experts experts on the current device (the
// CUTLASS kernels keep TMA descriptors per SM there).
size_t cutlass_grouped_linear_workspace_bytes(DType dtype, int64_t num_experts);

// y = x @ weight[e]^T + bias[e] on the rows of expert e, zero on rows past expert_offsets[E]. bias may be nullptr.
// x [num_rows, in_features], weight [num_experts, out_features, in_features], bias [num_experts, out_features],
// y [num_rows, out_features]; workspace holds workspace_bytes >= cutlass_grouped_linear_workspace_bytes(...).
void cutlass_grouped_linear_cuda(DType dtype, const void* x, int64_t num_rows, int64_t in_features,
                                 const int64_t* expert_offsets, int64_t num_experts, const void* weight,
                                 int64_t out_features, const void* bias, void* y, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream);

// grad_x = grad_y[rows of e] @ weight[e] (zero past expert_offsets[E]) and grad_weight[e] = grad_y[rows of e]^T @
// x[rows of e] (zero for an expert without rows), and grad_bias[e] = the column sums of grad_y[rows of e] ([E,
// out_features]; the sums of grouped_linear_backward_cuda in expert.h, in the same order, computed by the launch that
// prepares the GEMMs); any output may be nullptr to skip it.
void cutlass_grouped_linear_backward_cuda(DType dtype, const void* grad_y, const void* x, int64_t num_rows,
                                          int64_t in_features, const int64_t* expert_offsets, int64_t num_experts,
                                          const void* weight, int64_t out_features, void* grad_x, void* grad_weight,
                                          void* grad_bias, void* workspace, size_t workspace_bytes,
                                          cudaStream_t stream);

}  // namespace fastmoe
