// The grouped-GEMM epilogue kernels (csrc/kernels/expert/epilogue.cu) against their references: the bias add is
// one rounding of (value + bias), so it must match bitwise; zeroing is data movement, so it must match bitwise.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda_test_util.h"
#include "kernels/expert/expert.h"
#include "test_util.h"

namespace fastmoe {
namespace test {
namespace {

class CudaEpilogue : public CudaKernelTest {};

// Offsets over num_rows rows with empty experts and a tail of unrouted rows.
std::vector<int64_t> offsets_with_gaps() {
  return {0, 5, 5, 12, 30, 30};
}

TEST_F(CudaEpilogue, BiasAndTailMatchReferenceBitwiseForEveryDtype) {
  const int64_t num_rows = 37, num_experts = 5;  // 7 tail rows
  const std::vector<int64_t> offsets = offsets_with_gaps();
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
  // An odd width (one element per access) and one of 16-byte rows for every dtype (the vector accesses).
  const std::vector<std::pair<DType, int64_t>> cases = {
      {DType::kFloat32, 19}, {DType::kFloat64, 19}, {DType::kFloat16, 19}, {DType::kBFloat16, 19},
      {DType::kFloat32, 40}, {DType::kFloat64, 40}, {DType::kFloat16, 40}, {DType::kBFloat16, 40}};
  for (const auto& c : cases) {
    const DType dtype = c.first;
    const int64_t out_features = c.second;
    FMOE_DISPATCH_FLOAT_TYPES(dtype, "test", [&] {
      std::vector<scalar_t> y(num_rows * out_features), bias(num_experts * out_features);
      for (auto& v : y) v = from_acc<scalar_t>(uniform(rng));
      for (auto& v : bias) v = from_acc<scalar_t>(uniform(rng));
      for (bool with_bias : {true, false}) {
        std::vector<scalar_t> want = y;
        grouped_bias_epilogue_ref(dtype, want.data(), num_rows, out_features, offsets.data(), num_experts,
                                  with_bias ? bias.data() : nullptr);
        DeviceBuffer d_y(y, stream_), d_bias(bias, stream_), d_offsets(offsets, stream_);
        grouped_bias_epilogue_cuda(dtype, d_y.get(), num_rows, out_features, d_offsets.as<int64_t>(), num_experts,
                                   with_bias ? d_bias.get() : nullptr, stream_);
        const std::vector<scalar_t> got = d_y.download<scalar_t>(y.size());
        ASSERT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(scalar_t)))
            << dtype_name(dtype) << " out_features=" << out_features << (with_bias ? " with bias" : " without bias");
      }
    });
  }
}

// Without a bias a small grid strides over the tail alone: a tail longer than the grid, an empty tail, and an
// all-tail output (offsets[E] = 0) must each zero exactly the rows past offsets[E].
TEST_F(CudaEpilogue, TailWithoutBiasCoversLongEmptyAndWholeTails) {
  const int64_t num_rows = 2500, out_features = 136, num_experts = 3;
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
  for (int64_t routed : {int64_t{700}, num_rows, int64_t{0}}) {
    const std::vector<int64_t> offsets = {0, routed / 3, routed / 2, routed};
    std::vector<float> y(num_rows * out_features);
    for (auto& v : y) v = uniform(rng);
    std::vector<float> want = y;
    grouped_bias_epilogue_ref(DType::kFloat32, want.data(), num_rows, out_features, offsets.data(), num_experts,
                              nullptr);
    DeviceBuffer d_y(y, stream_), d_offsets(offsets, stream_);
    grouped_bias_epilogue_cuda(DType::kFloat32, d_y.get(), num_rows, out_features, d_offsets.as<int64_t>(), num_experts,
                               nullptr, stream_);
    const std::vector<float> got = d_y.download<float>(y.size());
    ASSERT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(float))) << "routed=" << routed;
  }
}

TEST_F(CudaEpilogue, ZeroEmptyGroupsTouchesOnlyEmptyExperts) {
  const std::vector<int64_t> offsets = offsets_with_gaps();
  const int64_t num_groups = 5;
  for (int64_t group_bytes : {int64_t{64}, int64_t{36}, int64_t{4096 + 6}}) {  // aligned and unaligned groups
    std::vector<uint8_t> data(num_groups * group_bytes);
    for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(1 + i % 251);
    std::vector<uint8_t> want = data;
    zero_empty_groups_ref(want.data(), num_groups, group_bytes, offsets.data());
    DeviceBuffer d_data(data, stream_), d_offsets(offsets, stream_);
    zero_empty_groups_cuda(d_data.get(), num_groups, group_bytes, d_offsets.as<int64_t>(), stream_);
    EXPECT_EQ(d_data.download<uint8_t>(data.size()), want) << "group_bytes=" << group_bytes;
  }
}

// The kernel gives each group at most 16 blocks of 256 threads and strides over the rest: a 1 MiB group takes 16
// passes of 16-byte stores, and a 256 KiB + 40 byte group (its size, and so the second group's start, not a
// multiple of 16) 65 passes of byte stores. An empty group in the middle, or at both ends, must be zeroed to its
// last byte and its neighbours left alone.
TEST_F(CudaEpilogue, ZeroEmptyGroupsZeroesGroupsLargerThanTheGrid) {
  // 65 groups share a grid of about 1024 blocks, 15 each: a 1 MiB group takes 18 passes of the 16-byte path, and
  // one of 256 KiB + 40 bytes (the byte path) 69 passes.
  const int64_t num_groups = 65;
  // Every other group empty (the first one included); or only the first and the last.
  std::vector<int64_t> alternate(num_groups + 1, 0), ends(num_groups + 1, 0);
  for (int64_t g = 0; g < num_groups; ++g) {
    alternate[g + 1] = alternate[g] + (g % 2 == 0 ? 0 : 3);
    ends[g + 1] = ends[g] + (g == 0 || g == num_groups - 1 ? 0 : 2);
  }
  for (int64_t group_bytes : {int64_t{1} << 20, (int64_t{256} << 10) + 40}) {
    for (const auto& [pattern, offsets] :
         {std::pair<const char*, std::vector<int64_t>>{"every other group empty", alternate},
          std::pair<const char*, std::vector<int64_t>>{"first and last group empty", ends}}) {
      const std::string where = "group_bytes=" + std::to_string(group_bytes) + ", " + pattern;
      std::vector<uint8_t> data(num_groups * group_bytes);
      for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(1 + i % 251);  // no zero byte
      std::vector<uint8_t> want = data;
      zero_empty_groups_ref(want.data(), num_groups, group_bytes, offsets.data());
      DeviceBuffer d_data(data, stream_), d_offsets(offsets, stream_);
      zero_empty_groups_cuda(d_data.get(), num_groups, group_bytes, d_offsets.as<int64_t>(), stream_);
      const std::vector<uint8_t> got = d_data.download<uint8_t>(data.size());
      for (int64_t g = 0; g < num_groups; ++g) {
        const bool empty = offsets[g + 1] == offsets[g];
        int64_t wrong = 0, first = -1;
        for (int64_t i = g * group_bytes; i < (g + 1) * group_bytes; ++i) {
          if (got[i] != (empty ? 0 : data[i]) && wrong++ == 0) first = i - g * group_bytes;
        }
        EXPECT_EQ(wrong, 0) << where << ": group " << g << (empty ? " (empty)" : " (with rows)") << " has " << wrong
                            << " wrong bytes, the first at byte " << first;
      }
      EXPECT_EQ(0, std::memcmp(got.data(), want.data(), got.size())) << where << ": differs from the reference";
    }
  }
}

}  // namespace
}  // namespace test
}  // namespace fastmoe
