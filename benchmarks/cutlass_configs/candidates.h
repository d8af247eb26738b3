// The CUTLASS grouped-GEMM configurations that bench_cutlass_configs measures, and how each is reached from the
// driver. Torch-free; the driver (bench_cutlass_configs.cu) includes this header, and candidate.cu, compiled once
// per configuration with FASTMOE_CANDIDATE=<index>, instantiates the library's CUTLASS path
// (csrc/kernels/expert/cutlass_grouped.cuh) with that configuration for all three GEMMs and registers it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/dtype.h"

namespace fastmoe::bench {

// One configuration's entry points, with the signatures of cutlass_grouped.h.
struct Candidate {
  int index;
  const char* name;
  size_t (*workspace_bytes)(DType dtype, int64_t num_experts);
  void (*forward)(DType dtype, const void* x, int64_t num_rows, int64_t in_features, const int64_t* expert_offsets,
                  int64_t num_experts, const void* weight, int64_t out_features, const void* bias, void* y,
                  void* workspace, size_t workspace_bytes, cudaStream_t stream);
  void (*backward)(DType dtype, const void* grad_y, const void* x, int64_t num_rows, int64_t in_features,
                   const int64_t* expert_offsets, int64_t num_experts, const void* weight, int64_t out_features,
                   void* grad_x, void* grad_weight, void* grad_bias, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream);
};

// Every candidate linked into the driver, registered by static initializers of the candidate files (unordered).
std::vector<Candidate>& candidates();

struct RegisterCandidate {
  explicit RegisterCandidate(const Candidate& candidate) { candidates().push_back(candidate); }
};

}  // namespace fastmoe::bench
