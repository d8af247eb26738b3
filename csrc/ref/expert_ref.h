// CPU reference for the expert stage: the grouped linear layer over rows sorted by expert.
// Torch-free. Accumulates in fp32 for 16/32-bit types and fp64 for fp64, rounding once at the end.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace fastmoe {

// Checks that expert_offsets is a valid partition of at most num_rows rows: offsets[0] == 0, non-decreasing,
// offsets[num_experts] <= num_rows. Throws fastmoe::Error naming the first bad entry.
void check_expert_offsets_ref(const int64_t* expert_offsets, int64_t num_experts, int64_t num_rows);

// x:              [num_rows, in_features], dtype
// expert_offsets: [num_experts + 1] int64; rows [offsets[e], offsets[e+1]) belong to expert e
// weight:         [num_experts, out_features, in_features], dtype
// bias:           [num_experts, out_features], dtype, or nullptr
// y:              [num_rows, out_features], written: y[r] = weight[e] @ x[r] + bias[e]; zero for r >= offsets[E]
void grouped_linear_ref(DType dtype, const void* x, int64_t num_rows, int64_t in_features,
                        const int64_t* expert_offsets, int64_t num_experts, const void* weight, int64_t out_features,
                        const void* bias, void* y);

// grad_y: [num_rows, out_features]. Each output may be nullptr to skip it:
// grad_x [num_rows, in_features] (zero past offsets[E]), grad_weight [E, out, in] and grad_bias [E, out]
// (zero for an expert with no rows).
void grouped_linear_backward_ref(DType dtype, const void* grad_y, const void* x, int64_t num_rows, int64_t in_features,
                                 const int64_t* expert_offsets, int64_t num_experts, const void* weight,
                                 int64_t out_features, void* grad_x, void* grad_weight, void* grad_bias);

// Epilogue for library grouped GEMMs that write only the routed rows and take no per-expert bias:
// y: [num_rows, out_features], updated in place: rows of expert e get bias[e] added (rounded once; bias may be
// nullptr), rows past expert_offsets[E] become zero.
void grouped_bias_epilogue_ref(DType dtype, void* y, int64_t num_rows, int64_t out_features,
                               const int64_t* expert_offsets, int64_t num_experts, const void* bias);

// Zero-fill for library GEMMs that leave empty groups unwritten (byte-wise, so one function serves every dtype).
// groups: [num_groups, group_bytes]; zeroes group g when expert_offsets[g + 1] == expert_offsets[g].
void zero_empty_groups_ref(void* groups, int64_t num_groups, int64_t group_bytes, const int64_t* expert_offsets);

// SwiGLU over rows of [gate | up] (the first GEMM of a gated expert writes both halves), optionally scaled per row:
//   out[r, j] = silu(g) * u * scale[r],  g = h[r, j], u = h[r, hidden + j],  silu(g) = g / (1 + exp(-g)),
// in the accumulation type (fp32; fp64 for fp64) and rounded once. With scale == nullptr there is no factor (the
// same bits as a factor of 1). The scale is how an MoE layer applies each row's routing score before the second
// GEMM instead of in the combine.
// h:     [num_rows, 2 * hidden], dtype
// scale: [num_rows] in the accumulation type (float; double for fp64), or nullptr
// out:   [num_rows, hidden], written
void swiglu_ref(DType dtype, const void* h, int64_t num_rows, int64_t hidden, void* out, const void* scale = nullptr);
// Its gradients, recomputing the sigmoid s = 1 / (1 + exp(-g)) from h (nothing else is saved); with d = grad[r, j] *
// scale[r] (grad[r, j] without a scale):
//   grad_h[r, j] = d * u * s * (1 + g * (1 - s)),   grad_h[r, hidden + j] = d * silu(g),
// each in the accumulation type and rounded once, and, when scale is given,
//   grad_scale[r] = sum_j grad[r, j] * silu(g) * u   (each term and the sum in fp64, j in order; then rounded to
//   the accumulation type: a row of thousands of terms keeps the accuracy of one rounding).
// grad:       [num_rows, hidden], dtype
// grad_h:     [num_rows, 2 * hidden], written
// grad_scale: [num_rows] in the accumulation type, written; needs scale (nullptr without one)
void swiglu_backward_ref(DType dtype, const void* grad, const void* h, int64_t num_rows, int64_t hidden, void* grad_h,
                         const void* scale = nullptr, void* grad_scale = nullptr);
// GELU's gradient (the exact form, erf) for an expert's first GEMM output h, with that GEMM's bias gradient summed
// from it in the same pass, so the bias gradient does not read grad_h back from memory:
//   grad_h[r, j] = grad[r, j] * (cdf + x * pdf),  x = h[r, j],  cdf = (1 + erf(x / sqrt(2))) / 2,
//   pdf = exp(-x * x / 2) / sqrt(2 pi),
// in the accumulation type and rounded once (the formula of torch.nn.functional.gelu's gradient), and
//   grad_bias[e, j] = the sum over the rows r of expert e of grad_h[r, j] as rounded, in row order in the wide
//   accumulation type, rounded once (zero for an expert without rows); rows past expert_offsets[E] get grad_h and
//   belong to no expert.
// grad, h:        [num_rows, hidden], dtype
// expert_offsets: [E + 1], checked as grouped_linear_ref checks them
// grad_h:         [num_rows, hidden], written; grad_bias: [E, hidden], written
void gelu_backward_bias_ref(DType dtype, const void* grad, const void* h, int64_t num_rows, int64_t hidden,
                            const int64_t* expert_offsets, int64_t num_experts, void* grad_h, void* grad_bias);
// Its constants as torch writes them, in double and rounded to the accumulation type where used: 1 / sqrt(2), and
// 2 / sqrt(pi) * 1 / sqrt(2) * 1 / 2 = 1 / sqrt(2 pi) (the reference and the CUDA kernel both read these).
constexpr double kGeluAlpha = 0.70710678118654752440;
constexpr double kGeluBeta = 1.12837916709551257390 * 0.70710678118654752440 * 0.5;
// The checks both implementations make: sizes >= 0. `name` is the function whose message it is.
void check_swiglu_sizes(const char* name, int64_t num_rows, int64_t hidden);

}  // namespace fastmoe
