// Torch-free element types. The kernels and references take `void*` plus a DType so that one header serves
// g++ (the op layer) and nvcc (the kernels) alike; 16-bit floats are carried as raw bits with the same layout
// as at::Half / __half and at::BFloat16 / __nv_bfloat16.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/check.h"

namespace fastmoe {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

// Bytes of one element.
inline size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
  }
  return 0;
}

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// bfloat16: the top half of a float32, rounded to nearest even (NaN stays a quiet NaN).
struct bf16_t {
  uint16_t bits;
  static bf16_t from_float(float value) {
    uint32_t raw = float_to_bits(value);
    if (std::isnan(value)) return bf16_t{static_cast<uint16_t>((raw >> 16) | 0x40u)};
    raw += 0x7fffu + ((raw >> 16) & 1u);
    return bf16_t{static_cast<uint16_t>(raw >> 16)};
  }
  float to_float() const { return bits_to_float(static_cast<uint32_t>(bits) << 16); }
};

// IEEE binary16, rounded to nearest even, with subnormals, infinities and NaN.
struct fp16_t {
  uint16_t bits;
  static fp16_t from_float(float value) {
    const uint32_t raw = float_to_bits(value);
    const uint32_t sign = (raw >> 16) & 0x8000u;
    const uint32_t abs_raw = raw & 0x7fffffffu;
    if (abs_raw >= 0x7f800000u) {  // inf or NaN
      return fp16_t{static_cast<uint16_t>(sign | 0x7c00u | (abs_raw > 0x7f800000u ? 0x200u : 0u))};
    }
    if (abs_raw >= 0x477ff000u) return fp16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
    if (abs_raw < 0x38800000u) {  // subnormal half (or zero): scale into the 10-bit mantissa
      const float scaled = bits_to_float(abs_raw) * 16777216.0f;  // 2^24, exact
      const float rounded = std::nearbyint(scaled);               // default mode: nearest even
      return fp16_t{static_cast<uint16_t>(sign | static_cast<uint32_t>(rounded))};
    }
    // Normal: re-bias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
    uint32_t mant_exp = abs_raw - 0x38000000u;
    mant_exp += 0x0fffu + ((mant_exp >> 13) & 1u);
    return fp16_t{static_cast<uint16_t>(sign | (mant_exp >> 13))};
  }
  float to_float() const {
    const uint32_t sign = (static_cast<uint32_t>(bits) & 0x8000u) << 16;
    const uint32_t exponent = (bits >> 10) & 0x1fu;
    const uint32_t mantissa = bits & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
      const float magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
      return sign ? -magnitude : magnitude;
    }
    if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
    return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  }
};

// Accumulation type: fp32 for every 16- and 32-bit type, fp64 for fp64 (docs/numerics.md).
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Accumulation type of the CPU references' long sequential reductions (softmax denominators over E, GEMM and dot
// products over d): fp64 for fp32 inputs, so a plain left-to-right sum stays as accurate as the blocked or
// tree-shaped fp32 sums of PyTorch and of the CUDA kernels (docs/numerics.md).
template <typename T>
struct WideAccType {
  using type = acc_t<T>;
};
template <>
struct WideAccType<float> {
  using type = double;
};
template <typename T>
using wide_acc_t = typename WideAccType<T>::type;

template <typename T>
inline acc_t<T> to_acc(T value) {
  return static_cast<acc_t<T>>(value);
}
template <>
inline float to_acc<bf16_t>(bf16_t value) {
  return value.to_float();
}
template <>
inline float to_acc<fp16_t>(fp16_t value) {
  return value.to_float();
}

template <typename T>
inline T from_acc(acc_t<T> value) {
  return static_cast<T>(value);
}
template <>
inline bf16_t from_acc<bf16_t>(float value) {
  return bf16_t::from_float(value);
}
template <>
inline fp16_t from_acc<fp16_t>(float value) {
  return fp16_t::from_float(value);
}

}  // namespace fastmoe

// Calls `__VA_ARGS__` with `scalar_t` bound to the C++ type of `dtype` (a generic lambda body works well).
#define FMOE_DISPATCH_FLOAT_TYPES(dtype, name, ...)                                \
  [&] {                                                                            \
    switch (dtype) {                                                               \
      case ::fastmoe::DType::kFloat32: {                                           \
        using scalar_t = float;                                                    \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      case ::fastmoe::DType::kFloat64: {                                           \
        using scalar_t = double;                                                   \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      case ::fastmoe::DType::kFloat16: {                                           \
        using scalar_t = ::fastmoe::fp16_t;                                        \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      case ::fastmoe::DType::kBFloat16: {                                          \
        using scalar_t = ::fastmoe::bf16_t;                                        \
        return __VA_ARGS__();                                                      \
      }                                                                            \
    }                                                                              \
    FMOE_CHECK(false, name, ": unsupported dtype code ", static_cast<int>(dtype)); \
  }()
