// CPU reference for the routing stage: logits -> top-k expert ids and scores, and its backward.
// Torch-free. The CUDA kernels in csrc/kernels/routing/ must match these bit-for-bit on the ids and within the
// numerics policy on the scores (docs/numerics.md).
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace fastmoe {

// How the k scores are normalised.
enum class ScoreFn : int {
  // top-k of the raw logits, then softmax over the k selected logits (FastMoE's NaiveGate).
  kTopkThenSoftmax = 0,
  // softmax over all E logits, then top-k of the probabilities (GShard/Switch style; scores not renormalised).
  kSoftmaxThenTopk = 1,
};

const char* score_fn_name(ScoreFn fn);

// Selection order: larger logit first; NaN ranks above every number (as torch.topk); ties go to the lower id.
// logits:     [num_tokens, num_experts] contiguous, dtype
// topk_idx:   [num_tokens, k] int64, written
// topk_score: [num_tokens, k] dtype, written
void route_topk_ref(DType dtype, const void* logits, int64_t num_tokens, int64_t num_experts, int64_t k, ScoreFn fn,
                    int64_t* topk_idx, void* topk_score);

// grad_score: [num_tokens, k]; logits: [num_tokens, num_experts], read only for kSoftmaxThenTopk (kTopkThenSoftmax's
// gradient comes from the scores alone: there logits is not dereferenced); topk_idx, topk_score: the forward outputs.
// grad_logits: [num_tokens, num_experts], written (zero outside the softmax's support). route_topk_backward_cuda
// (kernels/routing/routing.h) has the same contract.
void route_topk_backward_ref(DType dtype, const void* grad_score, const void* logits, const int64_t* topk_idx,
                             const void* topk_score, int64_t num_tokens, int64_t num_experts, int64_t k, ScoreFn fn,
                             void* grad_logits);

}  // namespace fastmoe
