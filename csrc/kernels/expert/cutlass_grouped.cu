// The grouped linear layer's GEMMs on CUTLASS's SM90 grouped GEMM (contract: cutlass_grouped.h; the kernels and
// the per-call steps: cutlass_grouped.cuh; when the op layer takes this backend: csrc/ops/expert_backend.h).
// Compiled for sm_90a only (CMakeLists.txt).
//
// The configurations shipped, instantiated for fp16 and bf16 (8 kernels), chosen with benchmarks/cutlass_configs/
// among 11 candidates on the layer shapes of the benchmarks (docs/benchmarks.md has the measurements):
//   - every GEMM: cooperative, 128x256x64 tiles, clusters of 2 CTAs along M that share their B tile. The fastest
//     or within 2% of it on all but a few shapes, where no other single candidate was better everywhere;
//   - the weight gradient of a tall weight (out_features >= 3x in_features): the same tiles with the cluster along
//     N, 1.09x to 1.14x faster on the Mixtral experts' first linear (and no slower on the other tall shapes);
//   - both with an epilogue that stores a tile in 128x64 subtiles (CUTLASS's own choice is 128x32): four trips
//     through shared memory a tile instead of eight, in the same number of mainloop stages. 1.003x to 1.093x on
//     every GEMM of the paper, E = 32, E = 128 and train layers, most on the weight gradients of about 128 rows an
//     expert, whose mainloop is two k-steps (run M in docs/benchmarks.md).
#include "kernels/expert/cutlass_grouped.cuh"
#include "kernels/expert/cutlass_grouped.h"

namespace fastmoe {
namespace {

using Cooperative128x256 = cutlass_grouped::GemmConfig<128, 256, 64, 2, 1, false, 64>;
using Cooperative128x256AlongN = cutlass_grouped::GemmConfig<128, 256, 64, 1, 2, false, 64>;
using ShippedConfigs =
    cutlass_grouped::GemmConfigs<Cooperative128x256, Cooperative128x256, Cooperative128x256, Cooperative128x256AlongN>;

}  // namespace

size_t cutlass_grouped_linear_workspace_bytes(DType dtype, int64_t num_experts) {
  return cutlass_grouped::workspace_bytes<ShippedConfigs>(dtype, num_experts);
}

void cutlass_grouped_linear_cuda(DType dtype, const void* x, int64_t num_rows, int64_t in_features,
                                 const int64_t* expert_offsets, int64_t num_experts, const void* weight,
                                 int64_t out_features, const void* bias, void* y, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream) {
  cutlass_grouped::linear<ShippedConfigs>(dtype, x, num_rows, in_features, expert_offsets, num_experts, weight,
                                          out_features, bias, y, workspace, workspace_bytes, stream);
}

void cutlass_grouped_linear_backward_cuda(DType dtype, const void* grad_y, const void* x, int64_t num_rows,
                                          int64_t in_features, const int64_t* expert_offsets, int64_t num_experts,
                                          const void* weight, int64_t out_features, void* grad_x, void* grad_weight,
                                          void* grad_bias, void* workspace, size_t workspace_bytes,
                                          cudaStream_t stream) {
  cutlass_grouped::linear_backward<ShippedConfigs>(dtype, grad_y, x, num_rows, in_features, expert_offsets, num_experts,
                                                   weight, out_features, grad_x, grad_weight, grad_bias, workspace,
                                                   workspace_bytes, stream);
}

}  // namespace fastmoe
