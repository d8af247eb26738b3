// Device helpers shared by the CUDA kernels: native element types, conversions to and from the accumulation
// type, a DType dispatch onto native CUDA types, warp reductions and launch-size helpers.
// Torch-free; include only from .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "core/check.h"
#include "core/cuda_check.h"
#include "core/dtype.h"

namespace fastmoe {
namespace cuda {

// fastmoe::fp16_t / bf16_t carry the same bits as __half / __nv_bfloat16, so device pointers are reinterpreted.
static_assert(sizeof(__half) == sizeof(fp16_t), "__half and fp16_t must share a layout");
static_assert(sizeof(__nv_bfloat16) == sizeof(bf16_t), "__nv_bfloat16 and bf16_t must share a layout");

// Accumulation type on the device: fp64 for fp64, fp32 for everything else (docs/numerics.md).
template <typename T>
struct DeviceAcc {
  using type = float;
};
template <>
struct DeviceAcc<double> {
  using type = double;
};
template <typename T>
using dacc_t = typename DeviceAcc<T>::type;

// Widening is exact for every type, so loads through to_acc never lose bits.
__device__ __forceinline__ float to_acc(float value) {
  return value;
}
__device__ __forceinline__ double to_acc(double value) {
  return value;
}
__device__ __forceinline__ float to_acc(__half value) {
  return __half2float(value);
}
__device__ __forceinline__ float to_acc(__nv_bfloat16 value) {
  return __bfloat162float(value);
}

// Narrowing rounds to nearest even, the same rule as fp16_t/bf16_t::from_float in core/dtype.h.
template <typename T>
__device__ __forceinline__ T from_acc(dacc_t<T> value);
template <>
__device__ __forceinline__ float from_acc<float>(float value) {
  return value;
}
template <>
__device__ __forceinline__ double from_acc<double>(double value) {
  return value;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float value) {
  return __float2half_rn(value);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);
}

// Converts a value held in any accumulation type into T the way the references do: first to T's accumulation
// type (a plain cast, e.g. double -> float), then one rounding into T.
template <typename T, typename V>
__device__ __forceinline__ T round_to(V value) {
  return from_acc<T>(static_cast<dacc_t<T>>(value));
}

// a * b and a + b rounded separately. nvcc would otherwise contract `acc += w * v` into one FMA, which rounds
// differently from the CPU references; the deterministic reductions use these to keep the reference's rounding.
__device__ __forceinline__ float mul_rn(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ double mul_rn(double a, double b) {
  return __dmul_rn(a, b);
}
__device__ __forceinline__ float add_rn(float a, float b) {
  return __fadd_rn(a, b);
}
__device__ __forceinline__ double add_rn(double a, double b) {
  return __dadd_rn(a, b);
}

constexpr int kWarpSize = 32;

// Sum over the 32 lanes of a full warp; every lane gets the result. The butterfly order is fixed, so the result
// is deterministic for a given input layout.
template <typename A>
__device__ __forceinline__ A warp_sum(A value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// exp in the accumulation type (the precise expf/exp: the kernels are not built with --use_fast_math).
__device__ __forceinline__ float exp_acc(float value) {
  return expf(value);
}
__device__ __forceinline__ double exp_acc(double value) {
  return exp(value);
}

// Max over a full warp, ignoring NaN (fmax semantics); every lane gets the result.
__device__ __forceinline__ float warp_max(float value) {
  for (int offset = 16; offset > 0; offset >>= 1) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}
__device__ __forceinline__ double warp_max(double value) {
  for (int offset = 16; offset > 0; offset >>= 1) value = fmax(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// Max of row[0 .. n) over a full warp, each lane striding over the row (NaN ignored, as fmax does); every lane
// gets the result. The row max of the kernels' max-subtracted softmaxes.
template <typename T>
__device__ __forceinline__ dacc_t<T> warp_row_max(const T* row, int64_t n, int lane) {
  dacc_t<T> max_value =
      -static_cast<dacc_t<T>>(INFINITY);  // INFINITY, unlike numeric_limits, needs no relaxed constexpr
  for (int64_t e = lane; e < n; e += kWarpSize) max_value = fmax(max_value, to_acc(row[e]));
  return warp_max(max_value);
}

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

// Loads / stores kN consecutive elements; a 16-byte chunk goes through one vector access (the caller has
// checked the alignment, e.g. with rows_are_vec16).
template <typename T, int kN>
__device__ __forceinline__ void load_chunk(const T* src, T (&out)[kN]) {
  if constexpr (kN * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    memcpy(out, &raw, sizeof(raw));
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) out[i] = src[i];
  }
}

template <typename T, int kN>
__device__ __forceinline__ void store_chunk(T* dst, const T (&in)[kN]) {
  if constexpr (kN * sizeof(T) == 16) {
    uint4 raw;
    memcpy(&raw, in, sizeof(raw));
    *reinterpret_cast<uint4*>(dst) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) dst[i] = in[i];
  }
}

// True when rows of `d` elements of T starting at p can be moved as 16-byte vectors: p is 16-byte aligned (nullptr
// counts as aligned) and the row pitch is a multiple of 16 bytes. On the device too (a kernel that decides there).
template <typename T>
__host__ __device__ __forceinline__ bool row_is_vec16(int64_t d, const void* p) {
  return (d * static_cast<int64_t>(sizeof(T))) % 16 == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// row_is_vec16 for every listed pointer (the pitch tested once, as nullptr's row).
template <typename T>
inline bool rows_are_vec16(int64_t d, std::initializer_list<const void*> pointers) {
  if (!row_is_vec16<T>(d, nullptr)) return false;
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Calls launch(std::integral_constant<int, kN>{}) with the widest chunk of T that rows of `width` elements at every
// listed pointer allow: kVec16<T> (16 bytes) when rows_are_vec16, else 1.
template <typename T, typename Launch>
void with_chunk(int64_t width, std::initializer_list<const void*> pointers, Launch&& launch) {
  if (rows_are_vec16<T>(width, pointers)) {
    launch(std::integral_constant<int, kVec16<T>>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// Grid size for a grid-stride loop over `work_items` with `per_block` items per block, capped so that it fits
// gridDim.x with room to spare; the kernels loop over whatever the cap leaves.
inline unsigned int grid_for(int64_t work_items, int64_t per_block) {
  const int64_t blocks = (work_items + per_block - 1) / per_block;
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? (blocks < 1 ? 1 : blocks) : kMaxBlocks);
}

// First position in sorted keys[0, n) whose key is >= value (binary search; used to find segment starts in
// radix-sorted keys without atomics).
template <typename K>
__device__ __forceinline__ int64_t lower_bound(const K* keys, int64_t n, K value) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace cuda
}  // namespace fastmoe

// Calls `__VA_ARGS__` (a lambda taking no arguments) with `type_name` bound to the native CUDA type of
// `dtype`: float, double, __half or __nv_bfloat16. `type_name` is a parameter so that two dispatches can nest.
#define FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, name, type_name, ...)                \
  [&] {                                                                            \
    switch (dtype) {                                                               \
      case ::fastmoe::DType::kFloat32: {                                           \
        using type_name = float;                                                   \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      case ::fastmoe::DType::kFloat64: {                                           \
        using type_name = double;                                                  \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      case ::fastmoe::DType::kFloat16: {                                           \
        using type_name = __half;                                                  \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      case ::fastmoe::DType::kBFloat16: {                                          \
        using type_name = __nv_bfloat16;                                           \
        return __VA_ARGS__();                                                      \
      }                                                                            \
    }                                                                              \
    FMOE_CHECK(false, name, ": unsupported dtype code ", static_cast<int>(dtype)); \
  }()
