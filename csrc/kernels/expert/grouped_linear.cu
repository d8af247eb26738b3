// CUDA grouped linear layer: a portable shared-memory tiled GEMM over rows sorted by expert, for every dtype
// (fp64 included). Same contract as csrc/ref/expert_ref.h. Library GEMM backends for bf16/fp16 are picked in the op
// layer; this one is the always-available, deterministic fallback.
//
// Tiles are 64 (rows or out features) x 64 (columns) with 16-deep k-slices, 256 threads, 4x4 accumulators per
// thread in the accumulation type (fp32, fp64 for fp64). Each thread owns rows ty + 16 i and columns tx + 16 j,
// so shared-memory reads are broadcast or conflict-free and output stores are coalesced. Each k-slice goes
// global -> registers -> shared memory, the next slice's loads issued before the current slice's math.
//
// Row tiles are mapped to experts on the device: the grid covers the worst-case number of row tiles,
// ceil(num_rows / 64) + num_experts + 1 (each expert, and the tail of rows past offsets[E], wastes at most one
// partial tile), and each block finds its expert with a block-wide scan of the per-expert tile counts. Blocks
// past the last tile exit at once. No host synchronisation, no atomics: every output has one writer that sums
// in a fixed order, so results are deterministic.
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <limits>
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/expert/bias_grad.cuh"
#include "kernels/expert/expert.h"

namespace fastmoe {
namespace {

using cuda::dacc_t;

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreadsPerBlock = 256;
constexpr int kThreadsX = 16;  // threads along the 64 columns; 16 along the 64 rows
constexpr int kMicro = 4;      // accumulators per thread along each dimension
// Padding of the tile rows: with a pitch of 66 words the transposed stores of a K-contiguous operand hit 32
// distinct banks.
constexpr int kPad = 2;
constexpr int kLoadsPerThread = kTileM * kTileK / kThreadsPerBlock;  // elements each thread stages per operand
static_assert(kTileM == kTileN, "the staging code assumes square output tiles");
static_assert(kThreadsX * kMicro == kTileN && (kThreadsPerBlock / kThreadsX) * kMicro == kTileM, "thread layout");
static_assert(kLoadsPerThread * kThreadsPerBlock == kTileM * kTileK, "staging layout");

template <typename A>
struct GemmTiles {
  A a[kTileK][kTileM + kPad];  // a[kk][m]: the row operand, k-major
  A b[kTileK][kTileN + kPad];  // b[kk][n]: the column operand, k-major
};

using cuda::group_rows;

struct RowTile {
  int64_t group;  // -1: this block has no tile
  int64_t row_begin;
  int64_t row_end;
};

// Finds the rows of row tile `tile_index`, where tiles are numbered expert by expert (ceil(count / kTileM) each)
// and then over the tail rows. Called by every thread of the block; returns the same tile on all of them.
__device__ RowTile find_row_tile(const int64_t* offsets, int64_t num_experts, int64_t num_rows, int64_t tile_index) {
  using BlockScan = cub::BlockScan<int64_t, kThreadsPerBlock>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ RowTile found;
  if (threadIdx.x == 0) found.group = -1;
  __syncthreads();
  int64_t tiles_before = 0;
  // Groups 0..num_experts, kThreadsPerBlock at a time: one scan per chunk, so a block costs O(E / 256) steps.
  for (int64_t chunk = 0; chunk <= num_experts; chunk += kThreadsPerBlock) {
    const int64_t group = chunk + threadIdx.x;
    int64_t begin = 0, end = 0;
    if (group <= num_experts) group_rows(offsets, num_experts, num_rows, group, &begin, &end);
    const int64_t tiles = (end - begin + kTileM - 1) / kTileM;
    int64_t tiles_in_front = 0, chunk_tiles = 0;
    BlockScan(scan_storage).ExclusiveSum(tiles, tiles_in_front, chunk_tiles);
    const int64_t first = tiles_before + tiles_in_front;
    if (tile_index >= first && tile_index < first + tiles) {  // exactly one thread, if any, owns the tile
      const int64_t row_begin = begin + (tile_index - first) * kTileM;
      found.group = group;
      found.row_begin = row_begin;
      found.row_end = row_begin + kTileM < end ? row_begin + kTileM : end;
    }
    tiles_before += chunk_tiles;
    __syncthreads();  // publishes `found` and frees scan_storage for the next chunk
    if (found.group >= 0) break;
  }
  return found;
}

// acc[i][j] += sum_kk a[kk][ty + 16 i] * b[kk][tx + 16 j] over one staged k-slice.
template <typename A>
__device__ __forceinline__ void multiply_slice(const GemmTiles<A>& tiles, int tx, int ty, A (&acc)[kMicro][kMicro]) {
#pragma unroll
  for (int kk = 0; kk < kTileK; ++kk) {
    A a_frag[kMicro], b_frag[kMicro];
#pragma unroll
    for (int i = 0; i < kMicro; ++i) a_frag[i] = tiles.a[kk][ty + i * (kTileM / kMicro)];
#pragma unroll
    for (int j = 0; j < kMicro; ++j) b_frag[j] = tiles.b[kk][tx + j * kThreadsX];
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] += a_frag[i] * b_frag[j];
    }
  }
}

// Moves one operand's 64 x 16 slices from global memory to shared memory through registers, so that the global
// loads of slice s + 1 are in flight while slice s is multiplied (software pipelining across the k loop).
// The slice at (m0, k0) is tile[kk][m] = element (m0 + m, k0 + kk) of the operand, zero outside
// [m0, m_end) x [k0, k_end). kKContiguous: element (m, k) is src[m * ld + k], and consecutive threads read
// consecutive k; otherwise it is src[k * ld + m], and consecutive threads read consecutive m. Either way the
// global reads coalesce.
template <typename T, bool kKContiguous>
struct SliceLoader {
  T staged[kLoadsPerThread];

  __device__ __forceinline__ static void position(int s, int* m, int* kk) {
    const int idx = threadIdx.x + s * kThreadsPerBlock;
    *m = kKContiguous ? idx / kTileK : idx % kTileM;
    *kk = kKContiguous ? idx % kTileK : idx / kTileM;
  }

  __device__ __forceinline__ void fetch(const T* __restrict__ src, int64_t ld, int64_t m0, int64_t m_end, int64_t k0,
                                        int64_t k_end) {
#pragma unroll
    for (int s = 0; s < kLoadsPerThread; ++s) {
      int m, kk;
      position(s, &m, &kk);
      const int64_t mi = m0 + m, ki = k0 + kk;
      const bool inside = mi < m_end && ki < k_end;
      staged[s] = inside ? src[kKContiguous ? mi * ld + ki : ki * ld + mi] : cuda::from_acc<T>(dacc_t<T>(0));
    }
  }

  template <typename A>
  __device__ __forceinline__ void store(A (&tile)[kTileK][kTileM + kPad]) const {
#pragma unroll
    for (int s = 0; s < kLoadsPerThread; ++s) {
      int m, kk;
      position(s, &m, &kk);
      tile[kk][m] = cuda::to_acc(staged[s]);
    }
  }
};

// out[r] = a[r] @ W[e]^T (+ bias[e]) for the rows r of expert e; zero for rows past offsets[E].
// a:       [num_rows, K]            (x in the forward, grad_y in the backward)
// offsets: [num_experts + 1]
// weight:  kWeightNK: [E, N, K] (forward: W[e] is [out, in]); else [E, K, N] (backward grad_x: W[e] is [out, in]
//          read as K = out, N = in)
// bias:    [E, N] or nullptr
// out:     [num_rows, N], written
// grid: (ceil(num_rows / 64) + E + 1, ceil(N / 64))
template <typename T, bool kWeightNK>
__global__ void __launch_bounds__(kThreadsPerBlock)
    grouped_rows_gemm_kernel(const T* __restrict__ a, int64_t num_rows, int64_t K, const int64_t* __restrict__ offsets,
                             int64_t num_experts, const T* __restrict__ weight, int64_t N, const T* __restrict__ bias,
                             T* __restrict__ out) {
  using A = dacc_t<T>;
  __shared__ GemmTiles<A> tiles;
  const RowTile tile = find_row_tile(offsets, num_experts, num_rows, blockIdx.x);
  if (tile.group < 0) return;  // uniform over the block
  const int tx = threadIdx.x % kThreadsX, ty = threadIdx.x / kThreadsX;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTileN;

  if (tile.group == num_experts) {  // rows no expert owns
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int64_t row = tile.row_begin + ty + i * (kTileM / kMicro);
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int64_t col = col0 + tx + j * kThreadsX;
        if (row < tile.row_end && col < N) out[row * N + col] = cuda::from_acc<T>(A(0));
      }
    }
    return;
  }

  const T* w = weight + tile.group * N * K;
  A acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = 0;
  }
  SliceLoader<T, true> a_loader;
  SliceLoader<T, kWeightNK> w_loader;
  const int64_t w_ld = kWeightNK ? K : N;
  if (K > 0) {
    a_loader.fetch(a, K, tile.row_begin, tile.row_end, 0, K);
    w_loader.fetch(w, w_ld, col0, N, 0, K);
  }
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    a_loader.store(tiles.a);
    w_loader.store(tiles.b);
    __syncthreads();
    if (k0 + kTileK < K) {  // next slice's loads overlap this slice's math
      a_loader.fetch(a, K, tile.row_begin, tile.row_end, k0 + kTileK, K);
      w_loader.fetch(w, w_ld, col0, N, k0 + kTileK, K);
    }
    multiply_slice(tiles, tx, ty, acc);
    __syncthreads();  // the next slice overwrites the tiles
  }

#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t row = tile.row_begin + ty + i * (kTileM / kMicro);
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t col = col0 + tx + j * kThreadsX;
      if (row < tile.row_end && col < N) {
        A value = acc[i][j];
        if (bias != nullptr) value += cuda::to_acc(bias[tile.group * N + col]);
        out[row * N + col] = cuda::from_acc<T>(value);
      }
    }
  }
}

// grad_weight[e] = grad_y[rows of e]^T @ x[rows of e], summed over the expert's rows in row order.
// grad_y:      [num_rows, out_features]
// x:           [num_rows, in_features]
// grad_weight: [num_experts, out_features, in_features], written (zero for an expert without rows)
// grid: num_experts * ceil(out / 64) * ceil(in / 64), flattened
template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    grouped_weight_grad_kernel(const T* __restrict__ grad_y, const T* __restrict__ x, int64_t num_rows,
                               int64_t in_features, const int64_t* __restrict__ offsets, int64_t num_experts,
                               int64_t out_features, T* __restrict__ grad_weight) {
  using A = dacc_t<T>;
  __shared__ GemmTiles<A> tiles;
  const int64_t tiles_in = (in_features + kTileN - 1) / kTileN;
  const int64_t tiles_out = (out_features + kTileM - 1) / kTileM;
  const int64_t block = blockIdx.x;
  const int64_t expert = block / (tiles_out * tiles_in);
  const int64_t out0 = (block / tiles_in) % tiles_out * kTileM;
  const int64_t in0 = block % tiles_in * kTileN;
  const int tx = threadIdx.x % kThreadsX, ty = threadIdx.x / kThreadsX;
  int64_t row_begin, row_end;
  group_rows(offsets, num_experts, num_rows, expert, &row_begin, &row_end);

  A acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = 0;
  }
  // The reduction runs over rows: k is the row index, and both operands are contiguous along m / n.
  SliceLoader<T, false> grad_loader, x_loader;
  if (row_begin < row_end) {
    grad_loader.fetch(grad_y, out_features, out0, out_features, row_begin, row_end);
    x_loader.fetch(x, in_features, in0, in_features, row_begin, row_end);
  }
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kTileK) {
    grad_loader.store(tiles.a);
    x_loader.store(tiles.b);
    __syncthreads();
    if (r0 + kTileK < row_end) {
      grad_loader.fetch(grad_y, out_features, out0, out_features, r0 + kTileK, row_end);
      x_loader.fetch(x, in_features, in0, in_features, r0 + kTileK, row_end);
    }
    multiply_slice(tiles, tx, ty, acc);
    __syncthreads();
  }

  T* out = grad_weight + expert * out_features * in_features;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t o = out0 + ty + i * (kTileM / kMicro);
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t col = in0 + tx + j * kThreadsX;
      if (o < out_features && col < in_features) out[o * in_features + col] = cuda::from_acc<T>(acc[i][j]);
    }
  }
}

// grad_bias (cuda::bias_grad_block): one block of kBiasThreads per (expert, kBiasColumns columns); grid
// cuda::bias_grad_blocks, flattened.
using cuda::kBiasThreads;

template <typename T>
__global__ void __launch_bounds__(kBiasThreads)
    grouped_bias_grad_kernel(const T* __restrict__ grad_y, int64_t num_rows, const int64_t* __restrict__ offsets,
                             int64_t num_experts, int64_t out_features, T* __restrict__ grad_bias) {
  cuda::bias_grad_block(grad_y, num_rows, offsets, num_experts, out_features, grad_bias, blockIdx.x,
                        static_cast<int>(threadIdx.x));
}

void check_linear_args(const char* name, int64_t num_rows, int64_t in_features, int64_t num_experts,
                       int64_t out_features) {
  FMOE_CHECK(num_rows >= 0, name, ": num_rows must be >= 0, got ", num_rows);
  FMOE_CHECK(in_features >= 0, name, ": in_features must be >= 0, got ", in_features);
  FMOE_CHECK(out_features >= 0, name, ": out_features must be >= 0, got ", out_features);
  FMOE_CHECK(num_experts >= 0, name, ": num_experts must be >= 0, got ", num_experts);
}

// Launches grouped_rows_gemm_kernel over a [num_rows, K] operand and N output columns.
template <typename T, bool kWeightNK>
void launch_rows_gemm(const T* a, int64_t num_rows, int64_t K, const int64_t* offsets, int64_t num_experts,
                      const T* weight, int64_t N, const T* bias, T* out, cudaStream_t stream) {
  const int64_t row_tiles = (num_rows + kTileM - 1) / kTileM + num_experts + 1;
  const int64_t col_tiles = (N + kTileN - 1) / kTileN;
  FMOE_CHECK(row_tiles <= std::numeric_limits<int32_t>::max(), "grouped linear: ", num_rows, " rows and ", num_experts,
             " experts need ", row_tiles, " row tiles, more than a grid holds");
  FMOE_CHECK(col_tiles <= 65535, "grouped linear: ", N, " output columns need ", col_tiles,
             " column tiles, more than 65535");
  const dim3 grid(static_cast<unsigned int>(row_tiles), static_cast<unsigned int>(col_tiles));
  grouped_rows_gemm_kernel<T, kWeightNK>
      <<<grid, kThreadsPerBlock, 0, stream>>>(a, num_rows, K, offsets, num_experts, weight, N, bias, out);
  FMOE_CHECK_LAUNCH();
}

}  // namespace

void grouped_linear_cuda(DType dtype, const void* x, int64_t num_rows, int64_t in_features,
                         const int64_t* expert_offsets, int64_t num_experts, const void* weight, int64_t out_features,
                         const void* bias, void* y, cudaStream_t stream) {
  check_linear_args("grouped_linear_cuda", num_rows, in_features, num_experts, out_features);
  if (num_rows == 0 || out_features == 0) return;
  FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, "grouped_linear_cuda", T, [&] {
    launch_rows_gemm<T, true>(static_cast<const T*>(x), num_rows, in_features, expert_offsets, num_experts,
                              static_cast<const T*>(weight), out_features, static_cast<const T*>(bias),
                              static_cast<T*>(y), stream);
  });
}

void grouped_linear_backward_cuda(DType dtype, const void* grad_y, const void* x, int64_t num_rows, int64_t in_features,
                                  const int64_t* expert_offsets, int64_t num_experts, const void* weight,
                                  int64_t out_features, void* grad_x, void* grad_weight, void* grad_bias,
                                  cudaStream_t stream) {
  // 1. grad_x = grad_y @ W[e] per row tile (the forward kernel with W read as [out, in] = [K, N]); zero past
  //    offsets[E].
  // 2. grad_weight[e] = grad_y[rows of e]^T @ x[rows of e], one block per (expert, 64x64 tile), looping over the
  //    expert's rows; experts without rows write zeros.
  // 3. grad_bias[e] = column sums of grad_y over the expert's rows (8 interleaved partial sums per column, added
  //    in a fixed order).
  // Each output is skipped when its pointer is null; the three are independent and run back to back on `stream`.
  check_linear_args("grouped_linear_backward_cuda", num_rows, in_features, num_experts, out_features);
  FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, "grouped_linear_backward_cuda", T, [&] {
    const T* grad_y_t = static_cast<const T*>(grad_y);
    if (grad_x != nullptr && num_rows > 0 && in_features > 0) {
      launch_rows_gemm<T, false>(grad_y_t, num_rows, out_features, expert_offsets, num_experts,
                                 static_cast<const T*>(weight), in_features, nullptr, static_cast<T*>(grad_x), stream);
    }
    if (grad_weight != nullptr && num_experts > 0 && out_features > 0 && in_features > 0) {
      const int64_t blocks =
          num_experts * ((out_features + kTileM - 1) / kTileM) * ((in_features + kTileN - 1) / kTileN);
      FMOE_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "grouped_linear_backward_cuda: grad_weight needs ",
                 blocks, " blocks, more than a grid holds");
      grouped_weight_grad_kernel<T><<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, stream>>>(
          grad_y_t, static_cast<const T*>(x), num_rows, in_features, expert_offsets, num_experts, out_features,
          static_cast<T*>(grad_weight));
      FMOE_CHECK_LAUNCH();
    }
    if (grad_bias != nullptr && num_experts > 0 && out_features > 0) {
      const int64_t blocks = cuda::bias_grad_blocks(num_experts, out_features);
      FMOE_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "grouped_linear_backward_cuda: grad_bias needs ",
                 blocks, " blocks, more than a grid holds");
      grouped_bias_grad_kernel<T><<<static_cast<unsigned int>(blocks), kBiasThreads, 0, stream>>>(
          grad_y_t, num_rows, expert_offsets, num_experts, out_features, static_cast<T*>(grad_bias));
      FMOE_CHECK_LAUNCH();
    }
  });
}

}  // namespace fastmoe
