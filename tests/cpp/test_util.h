// Shared helpers for the GoogleTest suites of the torch-free references (tests/cpp/test_ref_*.cpp).
//
// The expectations are computed independently of the code under test: 16-bit floats are decoded and rounded
// here from their bit layout (a table of every finite value, searched for the nearest one), and every reference
// result is computed in double. Random data comes from a fixed-seed std::mt19937, so a failure reproduces.
#pragma once

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "core/check.h"
#include "core/dtype.h"

namespace fastmoe {
namespace test {

// ---------------------------------------------------------------------------------------------------------------
// Element types.

template <typename T>
struct TypeInfo;
template <>
struct TypeInfo<double> {
  static constexpr DType kDType = DType::kFloat64;
  static constexpr const char* kName = "float64";
};
template <>
struct TypeInfo<float> {
  static constexpr DType kDType = DType::kFloat32;
  static constexpr const char* kName = "float32";
};
template <>
struct TypeInfo<fp16_t> {
  static constexpr DType kDType = DType::kFloat16;
  static constexpr const char* kName = "float16";
};
template <>
struct TypeInfo<bf16_t> {
  static constexpr DType kDType = DType::kBFloat16;
  static constexpr const char* kName = "bfloat16";
};

template <typename T>
constexpr DType dtype_of() {
  return TypeInfo<T>::kDType;
}

template <typename T>
constexpr bool kIs16Bit = std::is_same_v<T, fp16_t> || std::is_same_v<T, bf16_t>;

using AllFloatTypes = ::testing::Types<double, float, bf16_t, fp16_t>;
using HalfTypes = ::testing::Types<fp16_t, bf16_t>;

// Names typed-test instances by dtype ("RouteTopkTest/float16.X") instead of by index.
struct DTypeNames {
  template <typename T>
  static std::string GetName(int) {
    return TypeInfo<T>::kName;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Independent model of a 16-bit binary float: 1 sign bit, kExpBits exponent bits, kMantBits mantissa bits.

template <int kExpBits, int kMantBits>
struct HalfLayout {
  static constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  static constexpr uint16_t kExpMask = static_cast<uint16_t>(((1u << kExpBits) - 1u) << kMantBits);
  static constexpr uint16_t kMantMask = static_cast<uint16_t>((1u << kMantBits) - 1u);
  static constexpr uint16_t kInfBits = kExpMask;
  static constexpr uint16_t kQuietNaNBits = static_cast<uint16_t>(kExpMask | (1u << (kMantBits - 1)));
  // The spacing of values just above 1: 2^-kMantBits.
  static constexpr double kEpsilon = 1.0 / (1 << kMantBits);

  static bool is_nan(uint16_t bits) { return (bits & kExpMask) == kExpMask && (bits & kMantMask) != 0; }

  // Exact value of a bit pattern, in double (which holds every 16-bit value exactly).
  static double decode(uint16_t bits) {
    const double sign = (bits & 0x8000u) ? -1.0 : 1.0;
    const int exponent = (bits & kExpMask) >> kMantBits;
    const int mantissa = bits & kMantMask;
    if (exponent == (1 << kExpBits) - 1) {
      return mantissa != 0 ? std::numeric_limits<double>::quiet_NaN() : sign * HUGE_VAL;
    }
    if (exponent == 0) return sign * std::ldexp(mantissa, 1 - kBias - kMantBits);
    return sign * std::ldexp((1 << kMantBits) + mantissa, exponent - kBias - kMantBits);
  }

  // Magnitudes of the bit patterns 0 .. kInfBits in ascending order. The last entry stands in for infinity with
  // the value 2^(emax+1), the next step past the largest finite value: round-to-nearest-even sends a value to
  // infinity exactly when it would round up to that step.
  static const std::vector<double>& magnitudes() {
    static const std::vector<double> table = [] {
      std::vector<double> values(kInfBits + 1u);
      for (uint32_t bits = 0; bits < kInfBits; ++bits) values[bits] = decode(static_cast<uint16_t>(bits));
      values[kInfBits] = std::ldexp(1.0, (1 << kExpBits) - 1 - kBias);
      return values;
    }();
    return table;
  }

  // Round-to-nearest-even of a double to this format, by searching the nearest representable neighbours.
  static uint16_t round_bits(double value) {
    if (std::isnan(value)) return kQuietNaNBits;
    const uint16_t sign = std::signbit(value) ? 0x8000u : 0u;
    const double magnitude = std::fabs(value);
    const std::vector<double>& table = magnitudes();
    if (magnitude >= table.back()) return static_cast<uint16_t>(sign | kInfBits);
    const size_t above = static_cast<size_t>(std::upper_bound(table.begin(), table.end(), magnitude) - table.begin());
    const size_t below = above - 1;  // table[below] <= magnitude < table[above]
    const double gap_below = magnitude - table[below], gap_above = table[above] - magnitude;
    size_t pick = gap_below < gap_above ? below : above;
    if (gap_below == gap_above) pick = (below % 2 == 0) ? below : above;  // a tie goes to the even mantissa
    return static_cast<uint16_t>(sign | pick);
  }
};

template <typename T>
struct HalfFormat;
template <>
struct HalfFormat<fp16_t> : HalfLayout<5, 10> {};
template <>
struct HalfFormat<bf16_t> : HalfLayout<8, 7> {};

// ---------------------------------------------------------------------------------------------------------------
// Conversions and bit access, independent of dtype.h's own conversions.

template <typename T>
double to_double(T value) {
  if constexpr (kIs16Bit<T>) {
    return HalfFormat<T>::decode(value.bits);
  } else {
    return static_cast<double>(value);
  }
}

// The smallest positive value of T (a subnormal): one step of underflow, for error bounds near zero.
template <typename T>
double smallest_subnormal() {
  if constexpr (kIs16Bit<T>) {
    return to_double(T{uint16_t{1}});
  } else {
    return std::numeric_limits<T>::denorm_min();
  }
}

// Round-to-nearest-even of a double to T.
template <typename T>
T from_double(double value) {
  if constexpr (kIs16Bit<T>) {
    return T{HalfFormat<T>::round_bits(value)};
  } else {
    return static_cast<T>(value);
  }
}

template <typename T>
bool is_nan_value(T value) {
  if constexpr (kIs16Bit<T>) {
    return HalfFormat<T>::is_nan(value.bits);
  } else {
    return std::isnan(value);
  }
}

template <typename T>
auto raw_bits(T value) {
  if constexpr (kIs16Bit<T>) {
    return value.bits;
  } else if constexpr (std::is_same_v<T, float>) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    return bits;
  } else {
    uint64_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    return bits;
  }
}

// Spacing of T just above 1 (2^-52, 2^-23, 2^-10, 2^-7): ulp(x) <= epsilon * |x| for normal x.
template <typename T>
constexpr double epsilon_of() {
  if constexpr (kIs16Bit<T>) {
    return HalfFormat<T>::kEpsilon;
  } else {
    return std::numeric_limits<T>::epsilon();
  }
}

// A NaN that outputs are pre-filled with, so that an element the code under test never writes shows up.
template <typename T>
T garbage() {
  if constexpr (kIs16Bit<T>) {
    return T{HalfFormat<T>::kQuietNaNBits};
  } else {
    return std::numeric_limits<T>::quiet_NaN();
  }
}

// Number of representable values between two same-width bit patterns of a sign-magnitude float (+0 and -0 are
// 0 apart).
template <typename U>
uint64_t ulp_distance_bits(U a, U b) {
  constexpr U kSign = static_cast<U>(U(1) << (sizeof(U) * 8 - 1));
  const uint64_t magnitude_a = a & static_cast<U>(~kSign), magnitude_b = b & static_cast<U>(~kSign);
  if ((a & kSign) == (b & kSign))
    return magnitude_a > magnitude_b ? magnitude_a - magnitude_b : magnitude_b - magnitude_a;
  return magnitude_a + magnitude_b;
}

template <typename T>
std::string describe(T value) {
  std::ostringstream out;
  out << std::setprecision(17) << to_double(value) << " (bits 0x" << std::hex << +raw_bits(value) << ")";
  return out.str();
}

// `got` is at most max_ulps representable steps of T away from `exact` rounded to nearest even in T.
// A NaN `exact` requires a NaN `got`.
template <typename T>
::testing::AssertionResult within_ulps(T got, double exact, uint64_t max_ulps) {
  if (std::isnan(exact)) {
    if (is_nan_value(got)) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "expected NaN, got " << describe(got);
  }
  if (is_nan_value(got)) return ::testing::AssertionFailure() << "got NaN, expected " << exact;
  const T want = from_double<T>(exact);
  const uint64_t distance = ulp_distance_bits(raw_bits(got), raw_bits(want));
  if (distance <= max_ulps) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got " << describe(got) << ", exact " << std::setprecision(17) << exact
                                       << " rounds to " << describe(want) << ": " << distance << " ulps apart, allowed "
                                       << max_ulps;
}

template <typename T>
::testing::AssertionResult all_within_ulps(const std::vector<T>& got, const std::vector<double>& exact,
                                           uint64_t max_ulps) {
  if (got.size() != exact.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " != expected size " << exact.size();
  }
  size_t failures = 0, first = 0;
  ::testing::AssertionResult first_result = ::testing::AssertionSuccess();
  for (size_t i = 0; i < got.size(); ++i) {
    ::testing::AssertionResult result = within_ulps(got[i], exact[i], max_ulps);
    if (!result) {
      if (failures++ == 0) {
        first = i;
        first_result = result;
      }
    }
  }
  if (failures == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << failures << " of " << got.size() << " elements off; first at [" << first
                                       << "]: " << first_result.message();
}

// Norm-wise relative error max_i |got_i - ref_i| / max_i |ref_i|; NaN if any element is NaN.
inline double max_rel_error(const std::vector<double>& got, const std::vector<double>& ref) {
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < got.size() && i < ref.size(); ++i) {
    const double diff = std::fabs(got[i] - ref[i]);
    if (std::isnan(diff)) return std::numeric_limits<double>::quiet_NaN();
    max_diff = std::max(max_diff, diff);
    max_ref = std::max(max_ref, std::fabs(ref[i]));
  }
  if (max_diff == 0) return 0;
  return max_diff / (max_ref > 0 ? max_ref : std::numeric_limits<double>::min());
}

template <typename T>
std::vector<double> to_doubles(const std::vector<T>& values) {
  std::vector<double> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = to_double(values[i]);
  return out;
}

template <typename T>
std::vector<T> to_type(const std::vector<double>& values) {
  std::vector<T> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = from_double<T>(values[i]);
  return out;
}

// Math outputs against a double reference: norm-wise relative error within rtol_fp64 / rtol_fp32, and for the
// 16-bit types (where the references round once at the end) each element within max_ulps of the rounded value.
template <typename T>
::testing::AssertionResult matches_reference(const std::vector<T>& got, const std::vector<double>& ref,
                                             double rtol_fp64, double rtol_fp32, uint64_t max_ulps = 1) {
  if (got.size() != ref.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " != expected size " << ref.size();
  }
  if constexpr (kIs16Bit<T>) {
    return all_within_ulps(got, ref, max_ulps);
  } else {
    const double tolerance = std::is_same_v<T, double> ? rtol_fp64 : rtol_fp32;
    const double error = max_rel_error(to_doubles(got), ref);
    if (error <= tolerance) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "relative error " << error << " exceeds " << tolerance;
  }
}

// Same bytes, element by element; names the first differing element.
template <typename T>
::testing::AssertionResult same_bits(const T* got, const T* want, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      return ::testing::AssertionFailure()
             << "element " << i << ": got " << describe(got[i]) << ", want " << describe(want[i]);
    }
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------------------------
// Random data (callers own a std::mt19937 with a fixed seed).

inline std::vector<double> random_uniform(size_t count, std::mt19937& rng, double low, double high) {
  std::uniform_real_distribution<double> dist(low, high);
  std::vector<double> out(count);
  for (double& value : out) value = dist(rng);
  return out;
}

// Multiples of 1/denominator with numerators in [low, high]: few significant bits, so sums and products of a
// handful of them are exact in fp32 and the only rounding left is the final one to the output type.
inline std::vector<double> random_dyadic(size_t count, std::mt19937& rng, int low, int high, int denominator) {
  std::uniform_int_distribution<int> dist(low, high);
  std::vector<double> out(count);
  for (double& value : out) value = static_cast<double>(dist(rng)) / denominator;
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Errors.

// The what() of the fastmoe::Error that `call` throws, or a marker saying that it threw something else or nothing.
template <typename Call>
std::string error_text(Call&& call) {
  try {
    call();
  } catch (const Error& error) {
    return error.what();
  } catch (const std::exception& error) {
    return std::string("<not a fastmoe::Error: ") + error.what() + ">";
  }
  return "<nothing thrown>";
}

}  // namespace test
}  // namespace fastmoe
