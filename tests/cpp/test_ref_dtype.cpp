// Tests of csrc/core/dtype.h and csrc/core/check.h: the 16-bit float conversions (against an independent
// bit-layout model in test_util.h and known constants), the accumulation types, the dtype dispatch and the error
// messages of FMOE_CHECK.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "core/check.h"
#include "core/dtype.h"
#include "test_util.h"

namespace fastmoe {
namespace test {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

uint32_t bits_of_float(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// ---------------------------------------------------------------------------------------------------------------
// Both 16-bit types.

template <typename T>
class HalfConversionTest : public ::testing::Test {};
TYPED_TEST_SUITE(HalfConversionTest, HalfTypes, DTypeNames);

TYPED_TEST(HalfConversionTest, ToFloatMatchesIndependentDecoderForEveryBitPattern) {
  using T = TypeParam;
  for (uint32_t bits = 0; bits <= 0xffffu; ++bits) {
    const T value{static_cast<uint16_t>(bits)};
    const float got = value.to_float();
    const double want = HalfFormat<T>::decode(value.bits);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << "bits 0x" << std::hex << bits;
      ASSERT_EQ(std::signbit(got), (bits & 0x8000u) != 0) << "bits 0x" << std::hex << bits;
    } else {
      ASSERT_EQ(static_cast<double>(got), want) << "bits 0x" << std::hex << bits;
      ASSERT_EQ(std::signbit(got), std::signbit(want)) << "bits 0x" << std::hex << bits;
    }
  }
}

TYPED_TEST(HalfConversionTest, RoundTripsEveryBitPattern) {
  using T = TypeParam;
  int nan_patterns = 0;
  for (uint32_t bits = 0; bits <= 0xffffu; ++bits) {
    const T value{static_cast<uint16_t>(bits)};
    const T back = T::from_float(value.to_float());
    if (HalfFormat<T>::is_nan(value.bits)) {
      ++nan_patterns;
      ASSERT_TRUE(HalfFormat<T>::is_nan(back.bits))
          << "NaN bits 0x" << std::hex << bits << " came back as 0x" << back.bits;
      ASSERT_EQ(back.bits & 0x8000u, bits & 0x8000u) << "sign of NaN bits 0x" << std::hex << bits;
    } else {
      ASSERT_EQ(back.bits, bits) << "bits 0x" << std::hex << bits << " came back as 0x" << back.bits;
    }
  }
  // 2 signs x (2^mantissa_bits - 1) NaN payloads.
  EXPECT_EQ(nan_patterns, 2 * HalfFormat<T>::kMantMask);
}

// Every halfway point between neighbouring values, one float step either side of it, and the values themselves:
// from_float must agree with the nearest-even search of the independent model.
TYPED_TEST(HalfConversionTest, FromFloatRoundsToNearestEvenAtEveryHalfwayPoint) {
  using T = TypeParam;
  const std::vector<double>& table = HalfFormat<T>::magnitudes();
  int ties_down = 0, ties_up = 0;
  for (size_t i = 0; i + 1 < table.size(); ++i) {
    const float low = static_cast<float>(table[i]);
    const float midpoint = static_cast<float>((table[i] + table[i + 1]) / 2);
    ASSERT_EQ(static_cast<double>(midpoint), (table[i] + table[i + 1]) / 2) << "midpoint not exact in float";
    const float samples[] = {low, std::nextafter(low, HUGE_VALF), std::nextafter(midpoint, 0.0f), midpoint,
                             std::nextafter(midpoint, HUGE_VALF)};
    for (float sample : samples) {
      for (float value : {sample, -sample}) {
        const uint16_t want = HalfFormat<T>::round_bits(value);
        const uint16_t got = T::from_float(value).bits;
        ASSERT_EQ(got, want) << "from_float(" << std::setprecision(9) << value << ") between bits 0x" << std::hex << i
                             << " and 0x" << i + 1;
      }
    }
    const uint16_t tie = T::from_float(midpoint).bits;
    ASSERT_EQ(tie % 2, 0) << "tie at " << midpoint << " did not go to the even neighbour";
    (tie == i ? ties_down : ties_up)++;
  }
  // Nearest even sends half of the ties each way (the gaps alternate even/odd lower neighbours and their number
  // is even); truncation or round-half-up would send them all one way.
  EXPECT_EQ(ties_down, ties_up);
}

TYPED_TEST(HalfConversionTest, FromFloatMatchesModelOnRandomFloats) {
  using T = TypeParam;
  std::mt19937 rng(1234);
  for (int n = 0; n < (1 << 18); ++n) {
    const float value = float_from_bits(static_cast<uint32_t>(rng()));
    const uint16_t got = T::from_float(value).bits;
    if (std::isnan(value)) {
      ASSERT_TRUE(HalfFormat<T>::is_nan(got)) << "float bits 0x" << std::hex << bits_of_float(value);
      ASSERT_EQ(got & 0x8000u, (bits_of_float(value) >> 16) & 0x8000u);
    } else {
      ASSERT_EQ(got, HalfFormat<T>::round_bits(value)) << "float bits 0x" << std::hex << bits_of_float(value);
    }
  }
}

TYPED_TEST(HalfConversionTest, NaNStaysNaNWithItsSign) {
  using T = TypeParam;
  // Quiet, signalling with the payload only in the low bits (truncation would make it an infinity), negative.
  for (uint32_t nan_bits : {0x7fc00000u, 0x7f800001u, 0x7f802000u, 0x7fffffffu, 0xffc00000u, 0xff800001u}) {
    const T value = T::from_float(float_from_bits(nan_bits));
    EXPECT_TRUE(HalfFormat<T>::is_nan(value.bits)) << "float bits 0x" << std::hex << nan_bits << " -> 0x" << value.bits;
    EXPECT_EQ(value.bits & 0x8000u, (nan_bits >> 16) & 0x8000u) << "float bits 0x" << std::hex << nan_bits;
    EXPECT_TRUE(std::isnan(value.to_float()));
  }
}

TYPED_TEST(HalfConversionTest, InfinitiesAndSignedZeros) {
  using T = TypeParam;
  const uint16_t inf = HalfFormat<T>::kInfBits;
  EXPECT_EQ(T::from_float(HUGE_VALF).bits, inf);
  EXPECT_EQ(T::from_float(-HUGE_VALF).bits, inf | 0x8000u);
  EXPECT_EQ(T::from_float(std::numeric_limits<float>::max()).bits, inf);
  EXPECT_EQ(T::from_float(-std::numeric_limits<float>::max()).bits, inf | 0x8000u);
  EXPECT_EQ(T{inf}.to_float(), HUGE_VALF);
  EXPECT_EQ(T{static_cast<uint16_t>(inf | 0x8000u)}.to_float(), -HUGE_VALF);
  EXPECT_EQ(T::from_float(0.0f).bits, 0x0000u);
  EXPECT_EQ(T::from_float(-0.0f).bits, 0x8000u);
  EXPECT_TRUE(std::signbit(T{0x8000u}.to_float()));
  EXPECT_EQ(T{0x8000u}.to_float(), 0.0f);
  // The smallest float subnormal is far below half the smallest subnormal of either type.
  EXPECT_EQ(T::from_float(std::numeric_limits<float>::denorm_min()).bits, 0x0000u);
  EXPECT_EQ(T::from_float(-std::numeric_limits<float>::denorm_min()).bits, 0x8000u);
}

// ---------------------------------------------------------------------------------------------------------------
// float16 known constants.

struct Fp16Case {
  float value;
  uint16_t bits;
};

TEST(Fp16Test, KnownConstantsFromFloat) {
  const Fp16Case cases[] = {
      {1.0f, 0x3c00},
      {-2.0f, 0xc000},
      {0.1f, 0x2e66},
      {65504.0f, 0x7bff},                              // largest finite
      {std::nextafter(65520.0f, 0.0f), 0x7bff},        // just below the halfway point to 2^16
      {65520.0f, 0x7c00},                              // halfway: ties to even, which is infinity
      {-65520.0f, 0xfc00},                             // the same, negative
      {1.0e6f, 0x7c00},                                // overflow
      {6.1035156e-05f, 0x0400},                        // 2^-14, smallest normal
      {6.0975552e-05f, 0x03ff},                        // 1023 * 2^-24, largest subnormal
      {5.9604645e-08f, 0x0001},                        // 2^-24, smallest subnormal
      {2.9802322e-08f, 0x0000},                        // 2^-25: halfway between 0 and 2^-24, even is 0
      {std::nextafter(2.9802322e-08f, 1.0f), 0x0001},  // just above that halfway point
      {std::ldexp(3.0f, -25), 0x0002},                 // halfway between subnormals 1 and 2, even is 2
      {std::ldexp(5.0f, -25), 0x0002},                 // halfway between subnormals 2 and 3, even is 2
      {1.0e-8f, 0x0000},                               // underflow
      {-1.0e-8f, 0x8000},                              // underflow keeps the sign
      {1.00048828125f, 0x3c00},                        // 1 + 2^-11: halfway, even is 1
      {1.00146484375f, 0x3c02},                        // 1 + 3 * 2^-11: halfway, even is 1 + 2^-9
      {std::nextafter(1.00048828125f, 2.0f), 0x3c01},  // just above halfway
      {2047.5f, 0x6800},                               // halfway between 2047 and 2048 (odd, even)
      {2048.0f + 1.0f, 0x6800},                        // halfway between 2048 and 2050 (spacing 2), even is 2048
      {2048.0f + 3.0f, 0x6802},                        // halfway between 2050 and 2052, even is 2052
  };
  for (const Fp16Case& c : cases) {
    EXPECT_EQ(fp16_t::from_float(c.value).bits, c.bits) << std::setprecision(10) << c.value;
  }
  // The decimal literals above are the exact powers of two they name.
  EXPECT_EQ(6.1035156e-05f, std::ldexp(1.0f, -14));
  EXPECT_EQ(5.9604645e-08f, std::ldexp(1.0f, -24));
  EXPECT_EQ(2.9802322e-08f, std::ldexp(1.0f, -25));
  EXPECT_EQ(6.0975552e-05f, std::ldexp(1023.0f, -24));
}

TEST(Fp16Test, KnownConstantsToFloat) {
  EXPECT_EQ(fp16_t{0x7bff}.to_float(), 65504.0f);
  EXPECT_EQ(fp16_t{0xfbff}.to_float(), -65504.0f);
  EXPECT_EQ(fp16_t{0x0400}.to_float(), 6.1035156e-05f);
  EXPECT_EQ(fp16_t{0x03ff}.to_float(), 6.0975552e-05f);
  EXPECT_EQ(fp16_t{0x0001}.to_float(), 5.9604645e-08f);
  EXPECT_EQ(fp16_t{0x3c00}.to_float(), 1.0f);
  EXPECT_EQ(fp16_t{0x3555}.to_float(), 0.333251953125f);
  EXPECT_EQ(fp16_t{0xc000}.to_float(), -2.0f);
  EXPECT_TRUE(std::isnan(fp16_t{0x7e00}.to_float()));
  EXPECT_TRUE(std::isnan(fp16_t{0x7c01}.to_float()));
}

TEST(Fp16Test, EverySubnormalIsAMultipleOfTwoToTheMinus24) {
  const float step = std::ldexp(1.0f, -24);
  for (uint16_t m = 1; m < 0x400; ++m) {
    ASSERT_EQ(fp16_t{m}.to_float(), m * step) << m;
    ASSERT_EQ(fp16_t::from_float(m * step).bits, m) << m;
    ASSERT_EQ(fp16_t::from_float(-m * step).bits, 0x8000u | m) << m;
    // Halfway up to the next subnormal (or to the smallest normal): the even one of m and m + 1 wins.
    const float halfway = (m + 0.5f) * step;
    ASSERT_EQ(fp16_t::from_float(halfway).bits, (m % 2 == 0) ? m : m + 1) << m;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// bfloat16: the top 16 bits of a float, rounded to nearest even.

// Independent of the code under test: keep the top half, then add one when the dropped half is above 0x8000, or
// exactly 0x8000 with an odd kept half.
uint16_t bf16_by_truncation(uint32_t bits) {
  const uint32_t kept = bits >> 16, dropped = bits & 0xffffu;
  const bool round_up = dropped > 0x8000u || (dropped == 0x8000u && (kept & 1u) != 0);
  return static_cast<uint16_t>(kept + (round_up ? 1 : 0));
}

TEST(Bf16Test, KnownConstantsFromFloatBits) {
  const std::pair<uint32_t, uint16_t> cases[] = {
      {0x3f800000u, 0x3f80},                         // 1.0
      {0x3f807fffu, 0x3f80},                         // just below halfway
      {0x3f808000u, 0x3f80},                         // halfway, even is down
      {0x3f808001u, 0x3f81},                         // just above halfway
      {0x3f818000u, 0x3f82},                         // halfway, even is up
      {0xbf818000u, 0xbf82},                         // the same, negative
      {0x7f7f7fffu, 0x7f7f},                         // stays at the largest finite bf16
      {0x7f7f8000u, 0x7f80},                         // halfway between the largest finite (odd) and 2^128: infinity
      {0x7f7fffffu, 0x7f80},                         // FLT_MAX rounds to infinity
      {0xff7fffffu, 0xff80},                         // -FLT_MAX rounds to -infinity
      {0x7f800000u, 0x7f80},                         // infinity
      {0x00000001u, 0x0000},                         // float subnormals
      {0x00008000u, 0x0000},                         // halfway between 0 and the smallest bf16 subnormal: even is 0
      {0x00018000u, 0x0002},                         // halfway between subnormals 1 and 2
      {0x0000ffffu, 0x0001}, {0x007fffffu, 0x0080},  // the largest float subnormal rounds up to the smallest normal
      {0x80000000u, 0x8000},                         // -0
  };
  for (const auto& c : cases) {
    EXPECT_EQ(bf16_t::from_float(float_from_bits(c.first)).bits, c.second) << "float bits 0x" << std::hex << c.first;
  }
  EXPECT_EQ(bf16_t{0x3f80}.to_float(), 1.0f);
  EXPECT_EQ(bf16_t{0x7f7f}.to_float(), float_from_bits(0x7f7f0000u));
  EXPECT_EQ(bf16_t{0x0001}.to_float(), std::ldexp(1.0f, -133));
}

TEST(Bf16Test, MatchesTruncateAndRoundOnRandomFloats) {
  std::mt19937 rng(99);
  for (int n = 0; n < (1 << 20); ++n) {
    const uint32_t bits = static_cast<uint32_t>(rng());
    const float value = float_from_bits(bits);
    if (std::isnan(value)) continue;  // NaN is covered by NaNStaysNaNWithItsSign
    ASSERT_EQ(bf16_t::from_float(value).bits, bf16_by_truncation(bits)) << "float bits 0x" << std::hex << bits;
  }
}

TEST(Bf16Test, ToFloatIsTheTopHalfOfAFloat) {
  for (uint32_t bits = 0; bits <= 0xffffu; ++bits) {
    ASSERT_EQ(bits_of_float(bf16_t{static_cast<uint16_t>(bits)}.to_float()), bits << 16) << std::hex << bits;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Accumulation types, dtype names and dispatch.

TEST(DTypeTest, AccumulationTypes) {
  EXPECT_TRUE((std::is_same_v<acc_t<float>, float>));
  EXPECT_TRUE((std::is_same_v<acc_t<double>, double>));
  EXPECT_TRUE((std::is_same_v<acc_t<fp16_t>, float>));
  EXPECT_TRUE((std::is_same_v<acc_t<bf16_t>, float>));
  EXPECT_EQ(sizeof(fp16_t), 2u);
  EXPECT_EQ(sizeof(bf16_t), 2u);
  EXPECT_EQ(to_acc(bf16_t{0x4049}), 3.140625f);
  EXPECT_EQ(to_acc(fp16_t{0x4248}), 3.140625f);
  EXPECT_EQ(from_acc<bf16_t>(3.140625f).bits, 0x4049);
  EXPECT_EQ(from_acc<fp16_t>(3.140625f).bits, 0x4248);
  EXPECT_EQ(from_acc<double>(0.1), 0.1);
  EXPECT_EQ(from_acc<float>(0.1f), 0.1f);
}

TEST(DTypeTest, Names) {
  EXPECT_STREQ(dtype_name(DType::kFloat32), "float32");
  EXPECT_STREQ(dtype_name(DType::kFloat64), "float64");
  EXPECT_STREQ(dtype_name(DType::kFloat16), "float16");
  EXPECT_STREQ(dtype_name(DType::kBFloat16), "bfloat16");
  EXPECT_STREQ(dtype_name(static_cast<DType>(42)), "unknown");
}

std::string name_of_dispatched(DType dtype) {
  return FMOE_DISPATCH_FLOAT_TYPES(dtype, "name_of_dispatched", [&] { return std::string(TypeInfo<scalar_t>::kName); });
}

TEST(DTypeTest, DispatchBindsTheMatchingScalarType) {
  for (DType dtype : {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16}) {
    EXPECT_EQ(name_of_dispatched(dtype), dtype_name(dtype));
  }
  const size_t size = FMOE_DISPATCH_FLOAT_TYPES(DType::kFloat16, "size", [&] { return sizeof(scalar_t); });
  EXPECT_EQ(size, 2u);
}

TEST(DTypeTest, DispatchRejectsAnUnknownCode) {
  auto call = [] { name_of_dispatched(static_cast<DType>(7)); };
  EXPECT_THROW(call(), Error);
  EXPECT_THAT(error_text(call), HasSubstr("name_of_dispatched: unsupported dtype code 7"));
}

TEST(CheckTest, MessageNamesTheValueAndTheCondition) {
  const int64_t num_experts = 4;
  auto call = [&] { FMOE_CHECK(num_experts == 3, "num_experts must be 3, got ", num_experts); };
  EXPECT_THROW(call(), Error);
  EXPECT_THAT(error_text(call), AllOf(HasSubstr("fastmoe: num_experts must be 3, got 4"),
                                      HasSubstr("`num_experts == 3`"), HasSubstr("test_ref_dtype.cpp")));
  EXPECT_NO_THROW(FMOE_CHECK(num_experts == 4, "unused"));
  // Error is a std::runtime_error, so the op layer's generic handlers see the same text.
  EXPECT_THROW(call(), std::runtime_error);
}

}  // namespace
}  // namespace test
}  // namespace fastmoe
