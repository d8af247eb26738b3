// GELU's backward with the bias gradient summed as it is made (gelu_backward_bias_cuda, at the end), then SwiGLU
// between a gated expert's two GEMMs, forward and backward, one pass over memory each way: the forward
// reads [gate | up] once and writes the product; the backward recomputes the sigmoid from [gate | up] (the only
// thing saved) and writes both halves of the gradient. Same contract as swiglu_ref / swiglu_backward_ref.
//
// One thread per chunk of a row's hidden columns: 16 bytes (8 halves, 4 floats, 2 doubles) when every row of
// every operand is 16-byte aligned, one element otherwise. Elementwise, so deterministic. The backward with a
// per-row scale also sums grad * silu(g) * u over each row for the scale's gradient: one warp per row there, each
// lane over its own chunks and then the warp's fixed butterfly, in fp64 like the reference, so that is
// deterministic too (in an order that differs from the reference's sequential sum).
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/common.cuh"
#include "kernels/expert/bias_grad.cuh"
#include "kernels/expert/expert.h"

namespace fastmoe {
namespace {

using cuda::dacc_t;
using cuda::load_chunk;
using cuda::store_chunk;

constexpr int kThreads = 256;

// Calls body(r, col) for every chunk of kN columns (col, col + kN) of every row r of [num_rows, hidden], a
// grid-stride loop over num_rows * hidden / kN chunks (chunk i: row i / chunks, columns (i % chunks) * kN ...).
template <int kN, typename Body>
__device__ __forceinline__ void for_each_chunk(int64_t num_rows, int64_t hidden, Body&& body) {
  const int64_t chunks = hidden / kN, total = num_rows * chunks;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / chunks;
    body(r, (i - r * chunks) * kN);
  }
}

// h [rows, 2 * hidden] -> out [rows, hidden], times scale[r] (accumulation type) when scale is not null.
template <typename T, int kN>
__global__ void swiglu_kernel(const T* __restrict__ h, const dacc_t<T>* __restrict__ scale, int64_t num_rows,
                              int64_t hidden, T* __restrict__ out) {
  using A = dacc_t<T>;
  for_each_chunk<kN>(num_rows, hidden, [&](int64_t r, int64_t col) {
    const T* row = h + r * 2 * hidden;
    T gate[kN], up[kN], result[kN];
    load_chunk<T, kN>(row + col, gate);
    load_chunk<T, kN>(row + hidden + col, up);
#pragma unroll
    for (int v = 0; v < kN; ++v) {
      const A g = cuda::to_acc(gate[v]);
      const A silu = g / (A(1) + cuda::exp_acc(-g));
      const A value = silu * cuda::to_acc(up[v]);
      result[v] = cuda::from_acc<T>(scale == nullptr ? value : value * scale[r]);
    }
    store_chunk<T, kN>(out + r * hidden + col, result);
  });
}

// One chunk of row r's gradient, columns [col, col + kN) of each half: with kScaled the row's factor `sc`
// multiplies the incoming gradient (grad_h's formulas as the reference's), and the return value is the chunk's
// sum of grad * silu(g) * u in fp64 (0 without kScaled).
template <typename T, int kN, bool kScaled>
__device__ __forceinline__ double swiglu_grad_chunk(const T* __restrict__ grad, const T* __restrict__ h, int64_t r,
                                                    int64_t hidden, int64_t col, dacc_t<T> sc, T* __restrict__ grad_h) {
  using A = dacc_t<T>;
  const T* row = h + r * 2 * hidden;
  T gate[kN], up[kN], dy[kN], grad_gate[kN], grad_up[kN];
  load_chunk<T, kN>(row + col, gate);
  load_chunk<T, kN>(row + hidden + col, up);
  load_chunk<T, kN>(grad + r * hidden + col, dy);
  double dot = 0;
#pragma unroll
  for (int v = 0; v < kN; ++v) {
    const A g = cuda::to_acc(gate[v]), u = cuda::to_acc(up[v]), gy = cuda::to_acc(dy[v]);
    const A s = A(1) / (A(1) + cuda::exp_acc(-g));
    const A d = kScaled ? gy * sc : gy;
    grad_gate[v] = cuda::from_acc<T>(d * u * (s * (A(1) + g * (A(1) - s))));
    grad_up[v] = cuda::from_acc<T>(d * (g * s));
    if constexpr (kScaled) dot += static_cast<double>(gy) * (static_cast<double>(g) * s * u);
  }
  T* grad_row = grad_h + r * 2 * hidden;
  store_chunk<T, kN>(grad_row + col, grad_gate);
  store_chunk<T, kN>(grad_row + hidden + col, grad_up);
  return dot;
}

template <typename T, int kN>
__global__ void swiglu_backward_kernel(const T* __restrict__ grad, const T* __restrict__ h, int64_t num_rows,
                                       int64_t hidden, T* __restrict__ grad_h) {
  for_each_chunk<kN>(num_rows, hidden, [&](int64_t r, int64_t col) {
    swiglu_grad_chunk<T, kN, false>(grad, h, r, hidden, col, dacc_t<T>(1), grad_h);
  });
}

// The backward with a row scale: warp w of the grid takes rows w, w + warps, ...; lane l its chunks l, l + 32, ...
// of the row; grad_scale[r] is the warp's sum of its lanes' partial sums of grad * silu(g) * u (fp64, as the
// reference).
template <typename T, int kN>
__global__ void swiglu_scaled_backward_kernel(const T* __restrict__ grad, const T* __restrict__ h,
                                              const dacc_t<T>* __restrict__ scale, int64_t num_rows, int64_t hidden,
                                              T* __restrict__ grad_h, dacc_t<T>* __restrict__ grad_scale) {
  const int lane = static_cast<int>(threadIdx.x) % cuda::kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / cuda::kWarpSize;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / cuda::kWarpSize; r < num_rows;
       r += warps) {
    const dacc_t<T> sc = scale[r];
    double dot = 0;
    for (int64_t col = static_cast<int64_t>(lane) * kN; col < hidden; col += int64_t{cuda::kWarpSize} * kN) {
      dot += swiglu_grad_chunk<T, kN, true>(grad, h, r, hidden, col, sc, grad_h);
    }
    dot = cuda::warp_sum(dot);
    if (lane == 0) grad_scale[r] = static_cast<dacc_t<T>>(dot);
  }
}

// GELU's gradient (erf form) in the accumulation type, rounded by the caller: dy * (cdf(x) + x * pdf(x)), written
// as torch's CUDA gelu_backward computes it (the same operations in the same order), so the two give the same bits.
__device__ __forceinline__ float erf_acc(float value) {
  return erff(value);
}
__device__ __forceinline__ double erf_acc(double value) {
  return erf(value);
}

template <typename A>
__device__ __forceinline__ A gelu_grad(A dy, A x) {
  constexpr A kAlpha = static_cast<A>(kGeluAlpha), kBeta = static_cast<A>(kGeluBeta);
  const A cdf = A(0.5) * (A(1) + erf_acc(x * kAlpha));
  const A pdf = cuda::exp_acc(A(-0.5) * x * x) * kBeta;
  return dy * (cdf + x * pdf);
}

// bias_grad_block_of's rows: N chunks of grad_h made from grad and h (every load issued before the first store),
// stored, and handed to the sums.
template <typename T>
struct GeluGradRows {
  const T* __restrict__ grad;
  const T* __restrict__ h;
  T* __restrict__ grad_h;
  int64_t hidden;
  template <int V, int N>
  __device__ __forceinline__ void rows(int64_t first, int64_t step, int64_t column, T (&out)[N][V]) const {
    T dy[N][V], x[N][V];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int64_t at = (first + i * step) * hidden + column;
      load_chunk<T, V>(grad + at, dy[i]);
      load_chunk<T, V>(h + at, x[i]);
    }
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
      for (int v = 0; v < V; ++v)
        out[i][v] = cuda::from_acc<T>(gelu_grad(cuda::to_acc(dy[i][v]), cuda::to_acc(x[i][v])));
      store_chunk<T, V>(grad_h + (first + i * step) * hidden + column, out[i]);
    }
  }
};

// One block of kBiasThreads per (group, kBiasColumns columns), the groups being the experts and the tail past
// offsets[E]: the blocks of the bias gradient kernels (bias_grad.cuh), with the rows made instead of read.
template <typename T>
__global__ void __launch_bounds__(cuda::kBiasThreads)
    gelu_backward_bias_kernel(GeluGradRows<T> rows, bool vectors, int64_t num_rows, const int64_t* __restrict__ offsets,
                              int64_t num_experts, T* __restrict__ grad_bias) {
  cuda::bias_grad_block_of(rows, vectors, num_rows, offsets, num_experts, rows.hidden, grad_bias, blockIdx.x,
                           static_cast<int>(threadIdx.x));
}

unsigned int grid_of(int64_t num_rows, int64_t hidden, int chunk) {
  return cuda::grid_for(num_rows * (hidden / chunk), kThreads);
}

}  // namespace

void swiglu_cuda(DType dtype, const void* h, int64_t num_rows, int64_t hidden, void* out, cudaStream_t stream,
                 const void* scale) {
  check_swiglu_sizes("swiglu_cuda", num_rows, hidden);
  if (num_rows == 0 || hidden == 0) return;
  FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, "swiglu_cuda", T, [&] {
    cuda::with_chunk<T>(hidden, {h, out}, [&](auto chunk) {
      constexpr int kN = decltype(chunk)::value;
      swiglu_kernel<T, kN><<<grid_of(num_rows, hidden, kN), kThreads, 0, stream>>>(
          static_cast<const T*>(h), static_cast<const dacc_t<T>*>(scale), num_rows, hidden, static_cast<T*>(out));
    });
  });
  FMOE_CHECK_LAUNCH();
}

void swiglu_backward_cuda(DType dtype, const void* grad, const void* h, int64_t num_rows, int64_t hidden, void* grad_h,
                          cudaStream_t stream, const void* scale, void* grad_scale) {
  check_swiglu_sizes("swiglu_backward_cuda", num_rows, hidden);
  FMOE_CHECK((scale == nullptr) == (grad_scale == nullptr),
             "swiglu_backward_cuda: scale and grad_scale must be given together");
  if (num_rows == 0) return;
  FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, "swiglu_backward_cuda", T, [&] {
    cuda::with_chunk<T>(hidden, {grad, h, grad_h}, [&](auto chunk) {
      constexpr int kN = decltype(chunk)::value;
      if (scale != nullptr) {  // hidden == 0 still writes grad_scale (zeros)
        swiglu_scaled_backward_kernel<T, kN>
            <<<cuda::grid_for(num_rows, kThreads / cuda::kWarpSize), kThreads, 0, stream>>>(
                static_cast<const T*>(grad), static_cast<const T*>(h), static_cast<const dacc_t<T>*>(scale), num_rows,
                hidden, static_cast<T*>(grad_h), static_cast<dacc_t<T>*>(grad_scale));
        return;
      }
      if (hidden == 0) return;
      swiglu_backward_kernel<T, kN><<<grid_of(num_rows, hidden, kN), kThreads, 0, stream>>>(
          static_cast<const T*>(grad), static_cast<const T*>(h), num_rows, hidden, static_cast<T*>(grad_h));
    });
  });
  FMOE_CHECK_LAUNCH();
}

void gelu_backward_bias_cuda(DType dtype, const void* grad, const void* h, int64_t num_rows, int64_t hidden,
                             const int64_t* expert_offsets, int64_t num_experts, void* grad_h, void* grad_bias,
                             cudaStream_t stream) {
  FMOE_CHECK(num_rows >= 0 && hidden >= 0 && num_experts >= 0, "gelu_backward_bias_cuda: sizes must be >= 0, got ",
             "num_rows ", num_rows, ", hidden ", hidden, ", num_experts ", num_experts);
  if (hidden == 0) return;
  // The experts' blocks and the tail's (rows past offsets[E], usually none: those blocks return at once).
  const int64_t blocks = cuda::bias_grad_blocks(num_experts + 1, hidden);
  FMOE_CHECK(blocks <= int64_t{0x7fffffff}, "gelu_backward_bias_cuda: ", num_experts, " experts of ", hidden,
             " columns need ", blocks, " blocks, more than a grid holds");
  FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, "gelu_backward_bias_cuda", T, [&] {
    const bool vectors = cuda::rows_are_vec16<T>(hidden, {grad, h, grad_h});
    const GeluGradRows<T> rows{static_cast<const T*>(grad), static_cast<const T*>(h), static_cast<T*>(grad_h), hidden};
    gelu_backward_bias_kernel<T><<<static_cast<unsigned int>(blocks), cuda::kBiasThreads, 0, stream>>>(
        rows, vectors, num_rows, expert_offsets, num_experts, static_cast<T*>(grad_bias));
  });
  FMOE_CHECK_LAUNCH();
}

}  // namespace fastmoe
