// CUDA load-balancing loss term: loss = scale * sum_t sum_e softmax(logits[t])[e] * counts[e], and its gradient
// with respect to the logits. Same contract as balance_loss_ref / balance_loss_backward_ref.
//
// Forward: one warp per token (lanes stride over the experts), each warp adds its tokens in token order, each
// block adds its warps in warp order and stores its sum in the workspace; the last block to finish (a threadfence
// and an atomic ticket) adds the block sums in block order and writes the loss. Every summation order depends on
// num_tokens only (the grid is capped at kMaxLossBlocks whatever the device), so the loss is deterministic.
// Backward: one warp per token, the softmax recomputed from the logits; the upstream gradient is read on the
// device, so nothing synchronises with the host.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/balance/balance.h"
#include "kernels/common.cuh"

namespace fastmoe {
namespace {

using cuda::dacc_t;
using cuda::kWarpSize;

constexpr int kWarpsPerBlock = 8;
constexpr int kThreadsPerBlock = kWarpSize * kWarpsPerBlock;
constexpr int64_t kMaxLossBlocks = 1024;
constexpr size_t kSlot = 16;  // alignment of the workspace's counter and block sums (8-byte values)

// Blocks of the forward kernel: a function of num_tokens alone.
unsigned int loss_blocks(int64_t num_tokens) {
  const int64_t blocks = (num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<unsigned int>(blocks < kMaxLossBlocks ? (blocks < 1 ? 1 : blocks) : kMaxLossBlocks);
}

// Workspace: [slack to align the base][counter, one slot][one 8-byte sum per block].
size_t loss_workspace_bytes(int64_t num_tokens) {
  if (num_tokens == 0) return 0;
  return kSlot + kSlot + static_cast<size_t>(loss_blocks(num_tokens)) * sizeof(double);
}

// For one token, over the warp: total = sum_e exp(l_e - max) and weighted = sum_e exp(l_e - max) * w_e with
// w_e = factor * counts[e]; so sum_e p_e * w_e = weighted / total. Every lane gets both.
template <typename T>
__device__ __forceinline__ void row_sums(const T* row, int64_t num_experts, const int64_t* counts, dacc_t<T> factor,
                                         dacc_t<T> max_value, int lane, dacc_t<T>* total_out, dacc_t<T>* weighted_out) {
  using A = dacc_t<T>;
  A total = 0, weighted = 0;
  for (int64_t e = lane; e < num_experts; e += kWarpSize) {
    const A x = cuda::exp_acc(cuda::to_acc(row[e]) - max_value);
    total += x;
    weighted += x * (factor * static_cast<A>(counts[e]));
  }
  *total_out = cuda::warp_sum(total);
  *weighted_out = cuda::warp_sum(weighted);
}

// logits: [num_tokens, num_experts]; counts: [num_experts]
// block_sums: [gridDim.x] scratch; ticket: zeroed before the launch; loss: one A, written by the last block.
template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    balance_loss_kernel(const T* __restrict__ logits, int64_t num_tokens, int64_t num_experts,
                        const int64_t* __restrict__ counts, dacc_t<T> scale, dacc_t<T>* block_sums,
                        unsigned int* ticket, dacc_t<T>* loss) {
  using A = dacc_t<T>;
  __shared__ A warp_sums[kWarpsPerBlock];
  __shared__ bool is_last;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;

  // 1. Each warp: its tokens in ascending order.
  A warp_total = 0;
  for (int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; token < num_tokens;
       token += warps_total) {
    const T* row = logits + token * num_experts;
    const A max_value = cuda::warp_row_max(row, num_experts, lane);
    A total, weighted;
    row_sums(row, num_experts, counts, A(1), max_value, lane, &total, &weighted);
    warp_total += weighted / total;
  }
  if (lane == 0) warp_sums[warp] = warp_total;
  __syncthreads();

  // 2. The block: its warps in order; then publish the sum and take a ticket.
  if (threadIdx.x == 0) {
    A block_total = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) block_total += warp_sums[w];
    block_sums[blockIdx.x] = block_total;
    __threadfence();  // the sum is visible device-wide before the ticket says so
    is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;

  // 3. The last block: every block's sum, in a fixed order (each thread strides over the blocks in order, then
  // the warps' butterflies and the warps in order).
  __threadfence();
  const volatile A* sums = block_sums;
  A partial = 0;
  for (unsigned int b = threadIdx.x; b < gridDim.x; b += kThreadsPerBlock) partial += sums[b];
  partial = cuda::warp_sum(partial);
  if (lane == 0) warp_sums[warp] = partial;
  __syncthreads();
  if (threadIdx.x == 0) {
    A total = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) total += warp_sums[w];
    *loss = total * scale;
  }
}

// grad_loss: one A (the upstream gradient g); grad_logits: [num_tokens, num_experts], written
// grad[t, e] = p[t, e] * (u_e - sum_j p[t, j] * u_j), u_e = g * scale * counts[e].
template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    balance_loss_backward_kernel(const T* __restrict__ logits, int64_t num_tokens, int64_t num_experts,
                                 const int64_t* __restrict__ counts, dacc_t<T> scale,
                                 const dacc_t<T>* __restrict__ grad_loss, T* __restrict__ grad_logits) {
  using A = dacc_t<T>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const A grad_scale = *grad_loss * scale;
  for (int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; token < num_tokens;
       token += warps_total) {
    const T* row = logits + token * num_experts;
    T* out = grad_logits + token * num_experts;
    const A max_value = cuda::warp_row_max(row, num_experts, lane);
    A total, weighted;
    row_sums(row, num_experts, counts, grad_scale, max_value, lane, &total, &weighted);
    const A dot = weighted / total;
    for (int64_t e = lane; e < num_experts; e += kWarpSize) {
      const A prob = cuda::exp_acc(cuda::to_acc(row[e]) - max_value) / total;
      out[e] = cuda::from_acc<T>(prob * (grad_scale * static_cast<A>(counts[e]) - dot));
    }
  }
}

}  // namespace

size_t balance_loss_cuda_workspace_bytes(int64_t num_tokens, int64_t num_experts) {
  check_balance_loss_sizes("balance_loss_cuda_workspace_bytes", num_tokens, num_experts);
  return loss_workspace_bytes(num_tokens);
}

void balance_loss_cuda(DType dtype, const void* logits, int64_t num_tokens, int64_t num_experts, const int64_t* counts,
                       double scale, DType loss_dtype, void* loss, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream) {
  // 1. No tokens: the loss is +0 (a memset), nothing else runs.  2. Zero the ticket.  3. One kernel.
  check_balance_loss_args("balance_loss_cuda", dtype, num_tokens, num_experts, loss_dtype);
  if (num_tokens == 0) {
    FMOE_CHECK_CUDA(cudaMemsetAsync(loss, 0, dtype == DType::kFloat64 ? sizeof(double) : sizeof(float), stream));
    return;
  }
  const size_t needed = loss_workspace_bytes(num_tokens);
  FMOE_CHECK(workspace != nullptr && workspace_bytes >= needed, "balance_loss_cuda needs a workspace of ", needed,
             " bytes for num_tokens=", num_tokens, ", got workspace=", workspace,
             " with workspace_bytes=", workspace_bytes);
  const uintptr_t base = (reinterpret_cast<uintptr_t>(workspace) + kSlot - 1) / kSlot * kSlot;
  auto* ticket = reinterpret_cast<unsigned int*>(base);
  void* block_sums = reinterpret_cast<void*>(base + kSlot);
  FMOE_CHECK_CUDA(cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream));
  const unsigned int blocks = loss_blocks(num_tokens);
  FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, "balance_loss_cuda", T, [&] {
    using A = dacc_t<T>;
    balance_loss_kernel<T><<<blocks, kThreadsPerBlock, 0, stream>>>(
        static_cast<const T*>(logits), num_tokens, num_experts, counts, static_cast<A>(scale),
        static_cast<A*>(block_sums), ticket, static_cast<A*>(loss));
  });
  FMOE_CHECK_LAUNCH();
}

void balance_loss_backward_cuda(DType dtype, const void* logits, int64_t num_tokens, int64_t num_experts,
                                const int64_t* counts, double scale, DType loss_dtype, const void* grad_loss,
                                void* grad_logits, cudaStream_t stream) {
  check_balance_loss_args("balance_loss_backward_cuda", dtype, num_tokens, num_experts, loss_dtype);
  if (num_tokens == 0) return;
  const unsigned int blocks = cuda::grid_for(num_tokens, kWarpsPerBlock);
  FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, "balance_loss_backward_cuda", T, [&] {
    using A = dacc_t<T>;
    balance_loss_backward_kernel<T><<<blocks, kThreadsPerBlock, 0, stream>>>(
        static_cast<const T*>(logits), num_tokens, num_experts, counts, static_cast<A>(scale),
        static_cast<const A*>(grad_loss), static_cast<T*>(grad_logits));
  });
  FMOE_CHECK_LAUNCH();
}

}  // namespace fastmoe
