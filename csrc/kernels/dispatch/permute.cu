// CUDA permute / unpermute-combine / combine score gradient. Same contract as csrc/ref/dispatch_ref.h.
//
// The permute's gather and unpermute_combine run one thread per (row, chunk), where a chunk is 16 bytes of a row
// (8 halves, 4 floats, 2 doubles) when every row of every operand is 16-byte aligned, and one element otherwise;
// the permute's scatter (given pair_pos) runs one warp per token or group of rows (permute_scatter_kernel). The
// combine is a gather over the k slots in order 0..k-1 with separately rounded multiply and add, the reference's
// exact arithmetic, so it is deterministic. combine_score_grad runs one warp per (token, slot) dot product.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/dispatch/dispatch.h"

namespace fastmoe {
namespace {

using cuda::dacc_t;
using cuda::kWarpSize;
using cuda::load_chunk;
using cuda::store_chunk;

constexpr int kThreadsPerBlock = 256;

// Block shape for the (row, chunk) kernels: x runs along the chunks of a row, y over rows, so a narrow row
// still fills the block. A row of under a warp's chunks takes the next power of two of threads (one for a row of
// one value, such as a routing score), not a warp with idle lanes: these kernels share nothing within a warp.
struct RowLaunch {
  dim3 block;
  unsigned int grid;
};

RowLaunch row_launch(int64_t num_rows, int64_t chunks_per_row) {
  int64_t threads_x = 1;
  while (threads_x < chunks_per_row && threads_x < kWarpSize) threads_x *= 2;
  if (chunks_per_row > kWarpSize) threads_x = (chunks_per_row + kWarpSize - 1) / kWarpSize * kWarpSize;
  if (threads_x > kThreadsPerBlock) threads_x = kThreadsPerBlock;
  const int64_t threads_y = kThreadsPerBlock / threads_x;
  RowLaunch launch;
  launch.block = dim3(static_cast<unsigned int>(threads_x), static_cast<unsigned int>(threads_y));
  launch.grid = cuda::grid_for(num_rows, threads_y);
  return launch;
}

// A chunk of a row times `scale`, or its bits untouched without a scale.
template <typename T, typename A, int kN>
__device__ __forceinline__ void scale_chunk(const T (&in)[kN], bool scaled, A scale, T (&out)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) out[i] = scaled ? cuda::from_acc<T>(scale * cuda::to_acc(in[i])) : in[i];
}

// Row `row` of x_sorted from pair `pair` (x[pair / k] times pair_scale[pair]), or zeros for an invalid pair; the
// chunks from `first` in steps of `step`.
template <typename T, typename S, int kN>
__device__ __forceinline__ void gather_row(const T* __restrict__ x, int64_t d, int64_t pair, int64_t num_pairs,
                                           int64_t k, const S* __restrict__ pair_scale, T* __restrict__ out_row,
                                           int64_t first, int64_t step) {
  using A = dacc_t<T>;
  const bool valid = pair >= 0 && pair < num_pairs;
  const bool scaled = pair_scale != nullptr;
  const T* in = x + (valid ? pair / k : 0) * d;
  const A scale = valid && scaled ? static_cast<A>(cuda::to_acc(pair_scale[pair])) : A(1);
  for (int64_t c = first; c < d / kN; c += step) {
    T values[kN];
    if (!valid) {
#pragma unroll
      for (int i = 0; i < kN; ++i) values[i] = cuda::from_acc<T>(A(0));
      store_chunk<T, kN>(out_row + c * kN, values);
      continue;
    }
    load_chunk<T, kN>(in + c * kN, values);
    T result[kN];
    scale_chunk<T, A, kN>(values, scaled, scale, result);
    store_chunk<T, kN>(out_row + c * kN, result);
  }
}

// x:           [num_tokens, d]
// sorted_pair: [num_rows], pair ids or -1 (ids outside [0, num_tokens * k), which the reference rejects, also
//              give a zero row here rather than a wild read)
// pair_scale:  [num_tokens * k] or nullptr
// x_sorted:    [num_rows, d], written
// The gather: one block-row of threads per row of x_sorted.
template <typename T, typename S, int kN>
__global__ void __launch_bounds__(kThreadsPerBlock)
    permute_gather_kernel(const T* __restrict__ x, int64_t num_tokens, int64_t d,
                          const int64_t* __restrict__ sorted_pair, int64_t num_rows, int64_t k,
                          const S* __restrict__ pair_scale, T* __restrict__ x_sorted) {
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < num_rows; row += row_stride) {
    gather_row<T, S, kN>(x, d, sorted_pair[row], num_tokens * k, k, pair_scale, x_sorted + row * d, threadIdx.x,
                         blockDim.x);
  }
}

// As permute_gather_kernel, given pair_pos [num_tokens, k] too. A gather in expert order reads each token's row k
// times, from memory once x outgrows the L2 cache; here a token's row is read once and stored to the rows it owns.
// Token t owns row r = pair_pos[t, j] when sorted_pair[r] == t * k + j. One warp per work item:
//   - a token: lane j finds slot j's row (two loads for all slots at once), then the warp loads x[t] once into
//     registers (in passes of kTile chunks a lane) and stores it (scaled) to each owned row, the slots in order;
//   - a group of 32 rows: lane i checks row i; the rows no token owns (a dropped slot's zero row, or a row of a
//     plan whose halves disagree) are gathered by the warp, as permute_gather_kernel would.
// Both tests are the same condition, so every row is written once, with the gather's bits whatever pair_pos holds.
//
// With kScoreGrad this is the combine's whole backward: x is grad_y, pair_scale the scores, and the warp also
// writes grad_score[t, j] = <grad_y[t], y_sorted[pair_pos[t, j]]> (0 where that row is out of range), each lane
// summing its chunks in order and the warp adding its lanes as combine_score_grad_kernel does, so grad_y's row is
// read once for both.
template <typename T, typename S, int kN, bool kScoreGrad>
__global__ void __launch_bounds__(kThreadsPerBlock)
    permute_scatter_kernel(const T* __restrict__ x, int64_t num_tokens, int64_t d,
                           const int64_t* __restrict__ sorted_pair, int64_t num_rows,
                           const int64_t* __restrict__ pair_pos, int64_t k, const S* __restrict__ pair_scale,
                           T* __restrict__ x_sorted, const T* __restrict__ y_sorted, S* __restrict__ grad_score) {
  using A = dacc_t<T>;
  constexpr int kWarps = kThreadsPerBlock / kWarpSize;
  constexpr int kTile = 8;  // chunks a lane loads at once: a 2048-wide bf16 row is one pass
  const int lane = threadIdx.x % kWarpSize;
  const int64_t chunks = d / kN;
  const int64_t num_pairs = num_tokens * k;
  const int64_t row_groups = (num_rows + kWarpSize - 1) / kWarpSize;
  const int64_t num_items = num_tokens + row_groups;
  const bool scaled = pair_scale != nullptr;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  // The loops below run alike on every lane of a warp (item, slot group and bit masks are warp-uniform), so the
  // shuffles see the full warp.
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; item < num_items;
       item += warp_stride) {
    if (item < num_tokens) {
      const int64_t token = item;
      const T* in = x + token * d;
      for (int64_t first = 0; first < k; first += kWarpSize) {
        const int64_t pair = token * k + first + lane;
        int64_t pos = -1;
        bool owns = false;
        A scale = 1;
        if (first + lane < k) {
          pos = pair_pos[pair];
          if (pos < 0 || pos >= num_rows) pos = -1;
          owns = pos >= 0 && sorted_pair[pos] == pair;
          if ((owns || kScoreGrad) && pos >= 0 && scaled) scale = static_cast<A>(cuda::to_acc(pair_scale[pair]));
          if (kScoreGrad && pos < 0) grad_score[pair] = cuda::round_to<S>(A(0));
        }
        const unsigned int owners = __ballot_sync(0xffffffffu, owns);
        if constexpr (!kScoreGrad) {
          // The permute: a pass loads kTile chunks of the lane's share of x[t] (kTile loads in flight) and stores
          // them to every owned row from registers, so the row is read from memory once whatever k is. The pass
          // loop runs alike on every lane (chunks past the row's end are skipped), so the shuffles see the warp.
          for (int64_t base = 0; owners != 0 && base < chunks; base += int64_t{kWarpSize} * kTile) {
            T values[kTile][kN];
#pragma unroll
            for (int t = 0; t < kTile; ++t) {
              const int64_t c = base + lane + t * kWarpSize;
              if (c < chunks) load_chunk<T, kN>(in + c * kN, values[t]);
            }
            unsigned int slots = owners;
            while (slots != 0) {
              const int j = __ffs(slots) - 1;
              slots &= slots - 1;
              const int64_t slot_row = __shfl_sync(0xffffffffu, pos, j);
              const A slot_scale = __shfl_sync(0xffffffffu, scale, j);
              T* out = x_sorted + slot_row * d;
#pragma unroll
              for (int t = 0; t < kTile; ++t) {
                const int64_t c = base + lane + t * kWarpSize;
                if (c >= chunks) continue;
                T result[kN];
                scale_chunk<T, A, kN>(values[t], scaled, slot_scale, result);
                store_chunk<T, kN>(out + c * kN, result);
              }
            }
          }
        } else {
          // The combine's backward: every slot with a row, for its score's gradient; the owners also store.
          unsigned int visit = __ballot_sync(0xffffffffu, pos >= 0);
          while (visit != 0) {
            const int j = __ffs(visit) - 1;
            visit &= visit - 1;
            const bool store = ((owners >> j) & 1u) != 0;
            const int64_t slot_row = __shfl_sync(0xffffffffu, pos, j);
            const A slot_scale = __shfl_sync(0xffffffffu, scale, j);
            T* out = x_sorted + slot_row * d;
            const T* row_in = y_sorted + slot_row * d;
            A partial = 0;
            // The lane's chunks c = lane, lane + 32, ... in passes of kTile: a pass issues all its loads before it
            // uses any, so a lane has kTile loads in flight instead of one. The sum keeps the lane's chunk order.
            for (int64_t pass = lane; pass < chunks; pass += kWarpSize * kTile) {
              T values[kTile][kN];
              T rows[kTile][kN];
#pragma unroll
              for (int t = 0; t < kTile; ++t) {
                const int64_t c = pass + t * kWarpSize;
                if (c >= chunks) continue;
                load_chunk<T, kN>(in + c * kN, values[t]);  // from L1 after the first slot
                load_chunk<T, kN>(row_in + c * kN, rows[t]);
              }
#pragma unroll
              for (int t = 0; t < kTile; ++t) {
                const int64_t c = pass + t * kWarpSize;
                if (c >= chunks) continue;
                if (store) {
                  T result[kN];
                  scale_chunk<T, A, kN>(values[t], scaled, slot_scale, result);
                  store_chunk<T, kN>(out + c * kN, result);
                }
#pragma unroll
                for (int i = 0; i < kN; ++i) partial += cuda::to_acc(values[t][i]) * cuda::to_acc(rows[t][i]);
              }
            }
            const A dot = cuda::warp_sum(partial);
            if (lane == j) grad_score[pair] = cuda::round_to<S>(dot);
          }
        }
      }
      continue;
    }
    const int64_t row = (item - num_tokens) * kWarpSize + lane;
    int64_t pair = -1;
    bool gather = false;
    if (row < num_rows) {
      pair = sorted_pair[row];
      gather = !(pair >= 0 && pair < num_pairs && pair_pos[pair] == row);
    }
    unsigned int unowned = __ballot_sync(0xffffffffu, gather);
    while (unowned != 0) {
      const int i = __ffs(unowned) - 1;
      unowned &= unowned - 1;
      const int64_t gather_row_index = __shfl_sync(0xffffffffu, row, i);
      const int64_t gather_pair = __shfl_sync(0xffffffffu, pair, i);
      gather_row<T, S, kN>(x, d, gather_pair, num_pairs, k, pair_scale, x_sorted + gather_row_index * d, lane,
                           kWarpSize);
    }
  }
}

// y_sorted:   [num_rows, d]
// pair_pos:   [num_tokens, k], rows of y_sorted or -1 (dropped; positions >= num_rows are skipped as well)
// topk_score: [num_tokens, k] or nullptr (weights of 1)
// y:          [num_tokens, d], written
template <typename T, typename S, int kN, int kBatch>
__global__ void __launch_bounds__(kThreadsPerBlock)
    unpermute_combine_kernel(const T* __restrict__ y_sorted, int64_t num_rows, int64_t d,
                             const int64_t* __restrict__ pair_pos, int64_t num_tokens, int64_t k,
                             const S* __restrict__ topk_score, T* __restrict__ y) {
  using A = dacc_t<T>;
  const int64_t chunks = d / kN;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; token < num_tokens;
       token += row_stride) {
    // As the reference: an unweighted token with one kept slot is a bitwise row copy; otherwise the sum starts
    // from the first kept slot's term (not from +0, which would turn a lone -0 into +0) in slot order.
    int kept = 0;
    int64_t only_pos = -1;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t pos = pair_pos[token * k + j];
      if (pos < 0 || pos >= num_rows) continue;
      ++kept;
      only_pos = pos;
    }
    const bool copy_row = topk_score == nullptr && kept == 1;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      if (copy_row) {
        T values[kN];
        load_chunk<T, kN>(y_sorted + only_pos * d + c * kN, values);
        store_chunk<T, kN>(y + token * d + c * kN, values);
        continue;
      }
      A acc[kN];
#pragma unroll
      for (int i = 0; i < kN; ++i) acc[i] = 0;
      bool first = true;
      // The slots in batches of kBatch (about k, so no registers idle): a batch issues all its loads, rows and
      // weights, before it adds any, so a thread has kBatch rows in flight instead of one. The adds keep the slot
      // order, so the bits are those of a slot-by-slot sum.
      for (int64_t j0 = 0; j0 < k; j0 += kBatch) {
        T values[kBatch][kN];
        A weight[kBatch];
        bool valid[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int64_t j = j0 + b;
          const int64_t pos = j < k ? pair_pos[token * k + j] : -1;
          valid[b] = pos >= 0 && pos < num_rows;
          weight[b] = A(1);
          if (!valid[b]) continue;
          load_chunk<T, kN>(y_sorted + pos * d + c * kN, values[b]);
          if (topk_score != nullptr) weight[b] = static_cast<A>(cuda::to_acc(topk_score[token * k + j]));
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          if (!valid[b]) continue;
#pragma unroll
          for (int i = 0; i < kN; ++i) {
            const A term = topk_score == nullptr ? cuda::to_acc(values[b][i])
                                                 : cuda::mul_rn(weight[b], cuda::to_acc(values[b][i]));
            acc[i] = first ? term : cuda::add_rn(acc[i], term);
          }
          first = false;
        }
      }
      T out[kN];
#pragma unroll
      for (int i = 0; i < kN; ++i) out[i] = cuda::from_acc<T>(acc[i]);
      store_chunk<T, kN>(y + token * d + c * kN, out);
    }
  }
}

// grad_y:     [num_tokens, d]
// y_sorted:   [num_rows, d]
// pair_pos:   [num_tokens, k]
// grad_score: [num_tokens, k], written; zero for a dropped slot
template <typename T, typename S, int kN>
__global__ void __launch_bounds__(kThreadsPerBlock)
    combine_score_grad_kernel(const T* __restrict__ grad_y, const T* __restrict__ y_sorted, int64_t num_rows, int64_t d,
                              const int64_t* __restrict__ pair_pos, int64_t num_tokens, int64_t k,
                              S* __restrict__ grad_score) {
  using A = dacc_t<T>;
  constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t chunks = d / kN;
  const int64_t num_pairs = num_tokens * k;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t pair = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; pair < num_pairs;
       pair += warps_total) {
    const int64_t pos = pair_pos[pair];
    A partial = 0;
    if (pos >= 0 && pos < num_rows) {
      const T* grad_row = grad_y + (pair / k) * d;
      const T* value_row = y_sorted + pos * d;
      for (int64_t c = lane; c < chunks; c += kWarpSize) {
        T grads[kN], values[kN];
        load_chunk<T, kN>(grad_row + c * kN, grads);
        load_chunk<T, kN>(value_row + c * kN, values);
#pragma unroll
        for (int i = 0; i < kN; ++i) partial += cuda::to_acc(grads[i]) * cuda::to_acc(values[i]);
      }
    }
    const A dot = cuda::warp_sum(partial);
    if (lane == 0) grad_score[pair] = cuda::round_to<S>(dot);
  }
}

void check_rows_args(const char* name, int64_t num_tokens, int64_t d, int64_t num_rows, int64_t k) {
  FMOE_CHECK(num_tokens >= 0, name, ": num_tokens must be >= 0, got ", num_tokens);
  FMOE_CHECK(d >= 0, name, ": d must be >= 0, got ", d);
  FMOE_CHECK(num_rows >= 0, name, ": num_rows must be >= 0, got ", num_rows);
  FMOE_CHECK(k >= 1, name, ": k must be >= 1, got ", k);
}

// The scatter (or, with kScoreGrad, the combine's backward), in chunks as wide as the listed operands allow.
template <typename T, typename S, bool kScoreGrad>
void launch_scatter(const T* x, int64_t num_tokens, int64_t d, const int64_t* sorted_pair, int64_t num_rows,
                    const int64_t* pair_pos, int64_t k, const S* pair_scale, T* x_sorted, const T* y_sorted,
                    S* grad_score, std::initializer_list<const void*> operands, cudaStream_t stream) {
  const int64_t items = num_tokens + (num_rows + kWarpSize - 1) / kWarpSize;
  const unsigned int blocks = cuda::grid_for(items, kThreadsPerBlock / kWarpSize);
  cuda::with_chunk<T>(d, operands, [&](auto chunk) {
    permute_scatter_kernel<T, S, decltype(chunk)::value, kScoreGrad><<<blocks, kThreadsPerBlock, 0, stream>>>(
        x, num_tokens, d, sorted_pair, num_rows, pair_pos, k, pair_scale, x_sorted, y_sorted, grad_score);
  });
}

template <typename T, typename S>
void launch_permute(const T* x, int64_t num_tokens, int64_t d, const int64_t* sorted_pair, int64_t num_rows,
                    const int64_t* pair_pos, int64_t k, const S* pair_scale, T* x_sorted, cudaStream_t stream) {
  // The scatter saves reads of a token's row only where it has several slots; with one, the gather reads each row
  // once too, without the scatter's per-token lookups (the same bits either way).
  if (pair_pos != nullptr && k > 1) {
    launch_scatter<T, S, false>(x, num_tokens, d, sorted_pair, num_rows, pair_pos, k, pair_scale, x_sorted, nullptr,
                                nullptr, {x, x_sorted}, stream);
  } else {
    cuda::with_chunk<T>(d, {x, x_sorted}, [&](auto chunk) {
      constexpr int kN = decltype(chunk)::value;
      const RowLaunch launch = row_launch(num_rows, d / kN);
      permute_gather_kernel<T, S, kN>
          <<<launch.grid, launch.block, 0, stream>>>(x, num_tokens, d, sorted_pair, num_rows, k, pair_scale, x_sorted);
    });
  }
  FMOE_CHECK_LAUNCH();
}

template <typename T, typename S>
void launch_unpermute_combine(const T* y_sorted, int64_t num_rows, int64_t d, const int64_t* pair_pos,
                              int64_t num_tokens, int64_t k, const S* topk_score, T* y, cudaStream_t stream) {
  cuda::with_chunk<T>(d, {y_sorted, y}, [&](auto chunk) {
    constexpr int kN = decltype(chunk)::value;
    const RowLaunch launch = row_launch(num_tokens, d / kN);
    // Slots loaded at once: about k, at most 8 (more registers would cost occupancy).
    const auto run = [&](auto batch) {
      unpermute_combine_kernel<T, S, kN, decltype(batch)::value>
          <<<launch.grid, launch.block, 0, stream>>>(y_sorted, num_rows, d, pair_pos, num_tokens, k, topk_score, y);
    };
    if (k >= 8) {
      run(std::integral_constant<int, 8>{});
    } else if (k >= 4) {
      run(std::integral_constant<int, 4>{});
    } else if (k >= 2) {
      run(std::integral_constant<int, 2>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
  FMOE_CHECK_LAUNCH();
}

template <typename T, typename S>
void launch_combine_score_grad(const T* grad_y, const T* y_sorted, int64_t num_rows, int64_t d, const int64_t* pair_pos,
                               int64_t num_tokens, int64_t k, S* grad_score, cudaStream_t stream) {
  const unsigned int blocks = cuda::grid_for(num_tokens * k, kThreadsPerBlock / kWarpSize);
  cuda::with_chunk<T>(d, {grad_y, y_sorted}, [&](auto chunk) {
    combine_score_grad_kernel<T, S, decltype(chunk)::value>
        <<<blocks, kThreadsPerBlock, 0, stream>>>(grad_y, y_sorted, num_rows, d, pair_pos, num_tokens, k, grad_score);
  });
  FMOE_CHECK_LAUNCH();
}

}  // namespace

void permute_cuda(DType dtype, const void* x, int64_t num_tokens, int64_t d, const int64_t* sorted_pair,
                  int64_t num_rows, const int64_t* pair_pos, int64_t k, const void* pair_scale, DType scale_dtype,
                  void* x_sorted, cudaStream_t stream) {
  check_rows_args("permute_cuda", num_tokens, d, num_rows, k);
  if (num_rows == 0 || d == 0) return;
  FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, "permute_cuda", T, [&] {
    const T* x_t = static_cast<const T*>(x);
    T* out_t = static_cast<T*>(x_sorted);
    if (pair_scale == nullptr) {
      // The scale type is irrelevant without a scale; reuse one instantiation.
      launch_permute<T, T>(x_t, num_tokens, d, sorted_pair, num_rows, pair_pos, k, nullptr, out_t, stream);
      return;
    }
    FMOE_CUDA_DISPATCH_FLOAT_TYPES(scale_dtype, "permute_cuda", S, [&] {
      launch_permute<T, S>(x_t, num_tokens, d, sorted_pair, num_rows, pair_pos, k, static_cast<const S*>(pair_scale),
                           out_t, stream);
    });
  });
}

void unpermute_combine_backward_cuda(DType dtype, const void* grad_y, const void* y_sorted, int64_t d,
                                     const int64_t* sorted_pair, int64_t num_rows, const int64_t* pair_pos,
                                     int64_t num_tokens, int64_t k, const void* topk_score, DType score_dtype,
                                     void* grad_y_sorted, void* grad_score, cudaStream_t stream) {
  check_rows_args("unpermute_combine_backward_cuda", num_tokens, d, num_rows, k);
  if (num_tokens == 0 && num_rows == 0) return;
  // Without tokens the rows are all zero rows and nothing reads the per-pair arrays (empty tensors may have null
  // pointers).
  FMOE_CHECK(num_tokens == 0 || (topk_score != nullptr && grad_score != nullptr && pair_pos != nullptr),
             "unpermute_combine_backward_cuda: topk_score, grad_score and pair_pos must be given");
  FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, "unpermute_combine_backward_cuda", T, [&] {
    FMOE_CUDA_DISPATCH_FLOAT_TYPES(score_dtype, "unpermute_combine_backward_cuda", S, [&] {
      T* out = static_cast<T*>(grad_y_sorted);
      const T* rows = static_cast<const T*>(y_sorted);
      launch_scatter<T, S, true>(static_cast<const T*>(grad_y), num_tokens, d, sorted_pair, num_rows, pair_pos, k,
                                 static_cast<const S*>(topk_score), out, rows, static_cast<S*>(grad_score),
                                 {grad_y, grad_y_sorted, y_sorted}, stream);
    });
  });
  FMOE_CHECK_LAUNCH();
}

void unpermute_combine_cuda(DType dtype, const void* y_sorted, int64_t num_rows, int64_t d, const int64_t* pair_pos,
                            int64_t num_tokens, int64_t k, const void* topk_score, DType score_dtype, void* y,
                            cudaStream_t stream) {
  check_rows_args("unpermute_combine_cuda", num_tokens, d, num_rows, k);
  if (num_tokens == 0 || d == 0) return;
  FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, "unpermute_combine_cuda", T, [&] {
    const T* in_t = static_cast<const T*>(y_sorted);
    T* out_t = static_cast<T*>(y);
    if (topk_score == nullptr) {
      launch_unpermute_combine<T, T>(in_t, num_rows, d, pair_pos, num_tokens, k, nullptr, out_t, stream);
      return;
    }
    FMOE_CUDA_DISPATCH_FLOAT_TYPES(score_dtype, "unpermute_combine_cuda", S, [&] {
      launch_unpermute_combine<T, S>(in_t, num_rows, d, pair_pos, num_tokens, k, static_cast<const S*>(topk_score),
                                     out_t, stream);
    });
  });
}

void combine_score_grad_cuda(DType dtype, const void* grad_y, const void* y_sorted, int64_t num_rows, int64_t d,
                             const int64_t* pair_pos, int64_t num_tokens, int64_t k, DType score_dtype,
                             void* grad_score, cudaStream_t stream) {
  check_rows_args("combine_score_grad_cuda", num_tokens, d, num_rows, k);
  // d == 0 still writes the (zero) scores.
  if (num_tokens == 0) return;
  FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, "combine_score_grad_cuda", T, [&] {
    FMOE_CUDA_DISPATCH_FLOAT_TYPES(score_dtype, "combine_score_grad_cuda", S, [&] {
      launch_combine_score_grad<T, S>(static_cast<const T*>(grad_y), static_cast<const T*>(y_sorted), num_rows, d,
                                      pair_pos, num_tokens, k, static_cast<S*>(grad_score), stream);
    });
  });
}

}  // namespace fastmoe
