// The grouped linear layer's GEMMs on CUTLASS's SM90 grouped GEMM, templated on the kernel configurations: the
// library's entry points (cutlass_grouped.cu, contract: cutlass_grouped.h) instantiate it with the configurations
// they ship, and benchmarks/cutlass_configs/ with each candidate configuration, to measure them on the same code
// path. Include it only from files compiled for sm_90a.
//
// Per configuration: CUTLASS's ptr-array grouped GEMM with a warp-specialized schedule (a TMA producer warp group
// and two WGMMA consumer warp groups per CTA), clusters of CTAs that share operand tiles through TMA multicast, and
// persistent CTAs (one per SM) that walk every expert's tiles with a device-side scheduler. Three operand layouts
// (below) and two dtypes. The epilogue stores D = accumulator (alpha 1, no C operand) with TMA stores clipped to
// each expert's rows, so no tile writes into the next expert's rows. The forward GEMM with a bias has its own
// kernel, whose epilogue adds the expert's bias row to the fp32 accumulator before the one rounding to the output
// dtype (an epilogue visitor tree: accumulator + a row broadcast read through a per-expert pointer array), so a
// bias costs no pass over the output.
//
// Per call: (1) a setup kernel writes, for each expert, the problem size (M, N, K), the operand pointers and the
// leading dimensions (and, with a bias, the bias rows) into the workspace, from expert_offsets, and its other blocks
// zero what the GEMMs will not write: the output's tail rows past offsets[E] and the weight gradient of experts
// without rows (zero_fill.cuh), and, in the backward with a bias, compute the bias gradient (bias_grad.cuh);
// (2) the grouped GEMM reads the arrays there (its host problem shapes are nullptr: the host never learns the row
// counts, and the grid is one CTA per SM).
//
// The GEMMs, as D[m, n] = sum_k A[m, k] B[n, k] on expert e's rows b = offsets[e] .. offsets[e + 1] (R rows):
//   forward      M = R,   N = out, K = in:  A = x[b + m, k] (k contiguous),  B = W[e][n, k] (k contiguous),
//                D = y[b + m, n]
//   grad_x       M = R,   N = in,  K = out: A = dy[b + m, k] (k contiguous), B = W[e][k, n] (n contiguous),
//                D = dx[b + m, n]
//   grad_weight  M = out, N = in,  K = R:   A = dy[b + k, m] (m contiguous), B = x[b + k, n] (n contiguous),
//                D = dW[e][m, n]
// An expert without rows gets the problem (0, 0, 0), which has no tiles: a K = 0 tile would store accumulators
// that no MMA ever cleared, so the setup launch zeroes its weight gradient instead (zero_fill.cuh).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "core/check.h"
#include "core/cuda_check.h"
#include "cute/tensor.hpp"
#include "cutlass/cluster_launch.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "kernels/expert/bias_grad.cuh"
#include "kernels/expert/expert.h"
#include "kernels/expert/zero_fill.cuh"

#if !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "the CUTLASS SM90 grouped GEMM needs CUDA 12.3 or newer"
#endif

namespace fastmoe {
namespace cutlass_grouped {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K) per expert
using ProblemSize = ProblemShape::UnderlyingProblemShape;

// The two stride types of CUTLASS's grouped operands (modes (rows, columns, batch)): the leading dimension on the
// first mode with the second contiguous, or the first mode contiguous with the leading dimension on the second.
using SecondContiguous = cute::Stride<int64_t, cute::Int<1>, cute::Int<0>>;
using FirstContiguous = cute::Stride<cute::Int<1>, int64_t, cute::Int<0>>;
static_assert(sizeof(SecondContiguous) == sizeof(int64_t) && sizeof(FirstContiguous) == sizeof(int64_t),
              "a grouped stride holds one int64 leading dimension");

inline constexpr int kAlignmentBytes = 16;  // TMA: base addresses and row pitches

// One kernel configuration: CTA tile (M, N, K), cluster shape, schedule (cooperative: two consumer warp groups
// share each tile; pingpong: each consumer warp group owns a tile, and one's epilogue overlaps the other's MMAs), and
// the columns of the epilogue's subtile: the tile's output goes to shared memory and out by TMA in subtiles of 128
// (cooperative) or 64 (pingpong) rows by kEpilogueN columns, two in flight; 0 leaves it to CUTLASS (32 columns for
// 16-bit outputs). Fewer, larger subtiles mean fewer barriers and waits a tile, and more shared memory.
template <int kTileM, int kTileN, int kTileK, int kClusterM, int kClusterN, bool kPingpong, int kEpilogueN = 0>
struct GemmConfig {
  using TileShape = cute::Shape<cute::Int<kTileM>, cute::Int<kTileN>, cute::Int<kTileK>>;
  using ClusterShape = cute::Shape<cute::Int<kClusterM>, cute::Int<kClusterN>, cute::_1>;
  using KernelSchedule = std::conditional_t<kPingpong, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                                            cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>;
  using EpilogueSchedule = std::conditional_t<kPingpong, cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
                                              cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
  static_assert(kTileM % (kPingpong ? 64 : 128) == 0,
                "a cooperative tile's rows are a multiple of 128 (its two warp groups' 64 each, and the epilogue "
                "subtile's 128), a pingpong tile's a multiple of 64");
  static_assert(kEpilogueN == 0 || (kEpilogueN % 16 == 0 && kTileN % kEpilogueN == 0),
                "the epilogue's subtile must be a multiple of 16 columns that divides the tile");
  using EpilogueTile =
      std::conditional_t<kEpilogueN == 0, cutlass::epilogue::collective::EpilogueTileAuto,
                         cute::Shape<cute::Int<kPingpong ? 64 : 128>, cute::Int<kEpilogueN == 0 ? 32 : kEpilogueN>>>;
};

// The configurations of the three GEMMs of a layer (forward, grad_x, grad_weight), and of the weight gradient of
// a tall weight (tall_weight: out_features at least 3x in_features, such as a Mixtral expert's first linear), whose
// GEMM has a long M and a short N.
template <typename ForwardConfig, typename GradInputConfig, typename GradWeightConfig,
          typename TallGradWeightConfig = GradWeightConfig>
struct GemmConfigs {
  using Forward = ForwardConfig;
  using GradInput = GradInputConfig;
  using GradWeight = GradWeightConfig;
  using TallGradWeight = TallGradWeightConfig;
};

inline bool tall_weight(int64_t in_features, int64_t out_features) {
  return out_features >= 3 * in_features;
}

// The epilogue of a GEMM with a bias: D[m, n] = Element(acc[m, n] + float(bias[n])), in fp32, rounded once. The
// bias is a row vector broadcast over the tile's rows, read through an array of per-expert pointers (entry l for
// expert l, the grouped GEMM's batch coordinate).
template <typename Element, typename TileShape>
using BiasEpilogue = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, Element, float, cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90AccFetch,
    cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, Element*, float,
                                                cute::Stride<cute::_0, cute::_1, cute::_0>>>;

// One grouped GEMM: Element operands and output, fp32 accumulation; A and B layouts as CUTLASS's tags (for A,
// RowMajor = k contiguous; for B, ColumnMajor = k contiguous, RowMajor = n contiguous); D row-major. kBias: the
// epilogue adds a per-expert bias row (BiasEpilogue); otherwise it stores the accumulator.
template <typename Element, typename LayoutA, typename LayoutB, typename Config, bool kBias = false>
struct GroupedGemm {
  using TileShape = typename Config::TileShape;
  using ClusterShape = typename Config::ClusterShape;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignment = kAlignmentBytes / static_cast<int>(sizeof(Element));
  using FusionOp = std::conditional_t<kBias, BiasEpilogue<Element, TileShape>,
                                      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape, typename Config::EpilogueTile,
      float, float, void, LayoutD*, kAlignment, Element, LayoutD*, kAlignment, typename Config::EpilogueSchedule,
      FusionOp>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element, LayoutB*, kAlignment,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Config::KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// The three GEMMs of one dtype and one set of configurations, and the forward with a bias.
template <typename Element, typename Configs>
struct Gemms {
  using Forward = typename GroupedGemm<Element, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor,
                                       typename Configs::Forward>::Gemm;
  using ForwardBias = typename GroupedGemm<Element, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor,
                                           typename Configs::Forward, true>::Gemm;
  using GradInput = typename GroupedGemm<Element, cutlass::layout::RowMajor, cutlass::layout::RowMajor,
                                         typename Configs::GradInput>::Gemm;
  using GradWeight = typename GroupedGemm<Element, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor,
                                          typename Configs::GradWeight>::Gemm;
  using TallGradWeight = typename GroupedGemm<Element, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor,
                                              typename Configs::TallGradWeight>::Gemm;
};

// The device arrays (num_experts entries each) that one grouped GEMM reads; bias: the forward GEMM's bias rows,
// read only by the kernel with a bias epilogue.
template <typename Element, typename StrideA, typename StrideB>
struct GemmArrays {
  ProblemSize* sizes;
  const Element** a;
  const Element** b;
  Element** d;
  const Element** bias;
  StrideA* stride_a;
  StrideB* stride_b;
  SecondContiguous* stride_d;
};
template <typename Element>
using ForwardArrays = GemmArrays<Element, SecondContiguous, SecondContiguous>;
template <typename Element>
using GradInputArrays = GemmArrays<Element, SecondContiguous, FirstContiguous>;
template <typename Element>
using GradWeightArrays = GemmArrays<Element, FirstContiguous, FirstContiguous>;

// The arrays must have the stride types that the kernels read.
template <typename Gemm, typename Arrays>
constexpr bool arrays_match() {
  using Kernel = typename Gemm::GemmKernel;
  using StrideA = std::remove_pointer_t<decltype(Arrays::stride_a)>;
  using StrideB = std::remove_pointer_t<decltype(Arrays::stride_b)>;
  return std::is_same_v<typename Kernel::InternalStrideA, StrideA> &&
         std::is_same_v<typename Kernel::InternalStrideB, StrideB> &&
         std::is_same_v<typename Kernel::InternalStrideD, SecondContiguous>;
}

// What the setup kernel reads and writes; a null output skips its GEMM. tail_rows (the output whose rows past
// offsets[E] no GEMM writes) and empty_groups (the weight gradient, whose experts without rows no GEMM writes) are
// zeroed by the blocks past setup_blocks; null: nothing to zero.
template <typename Element>
struct SetupParams {
  const int64_t* offsets;
  int64_t num_experts, num_rows, in_features, out_features;
  const Element* x;
  const Element* weight;
  const Element* grad_y;
  Element* y;
  Element* grad_x;
  Element* grad_weight;
  ForwardArrays<Element> forward;
  GradInputArrays<Element> grad_input;
  GradWeightArrays<Element> grad_wt;
  int64_t setup_blocks, zero_blocks;
  char* tail_rows;
  int64_t tail_row_bytes;
  char* empty_groups;
  int64_t group_bytes;
  Element* grad_bias;   // [E, out_features]: the blocks after the zeroing ones compute it from grad_y, or nullptr
  const Element* bias;  // [E, out_features]: the forward's bias, whose rows go to forward.bias, or nullptr
};

// The CUDA type of a CUTLASS 16-bit element (the same bits), for the kernels shared with fastmoe's own.
template <typename Element>
struct NativeHalf;
template <>
struct NativeHalf<cutlass::half_t> {
  using type = __half;
};
template <>
struct NativeHalf<cutlass::bfloat16_t> {
  using type = __nv_bfloat16;
};

// The zeroing blocks of the setup kernel (zero_blocks of them, this one is z): the tail rows over all of them;
// the empty groups with about zero_blocks / E blocks per group (at least one), as zero_empty_groups_cuda does.
template <typename Element>
__device__ void setup_zeroing(const SetupParams<Element>& p, int64_t z, int64_t zero_blocks) {
  const int64_t threads = blockDim.x;
  if (p.tail_rows != nullptr) {
    cuda::zero_tail_rows(p.tail_rows, p.num_rows, p.tail_row_bytes, p.offsets, p.num_experts, z * threads + threadIdx.x,
                         zero_blocks * threads);
  }
  if (p.empty_groups != nullptr) {
    const int64_t per_group = zero_blocks / p.num_experts > 1 ? zero_blocks / p.num_experts : 1;
    const int64_t group_slots = zero_blocks / per_group;
    if (z >= group_slots * per_group) return;
    for (int64_t g = z / per_group; g < p.num_experts; g += group_slots) {
      cuda::zero_group_if_empty(p.empty_groups, p.num_experts, g, p.group_bytes, p.offsets, p.num_rows,
                                (z % per_group) * threads + threadIdx.x, per_group * threads);
    }
  }
}

// In the first setup_blocks blocks, thread e fills entry e of every requested GEMM's arrays. Offsets are clamped
// into [0, num_rows] (as in the tiled kernel), so malformed offsets cannot send a GEMM outside the buffers. The
// blocks after them zero what the GEMMs will not write (setup_zeroing): before the GEMMs rather than after, one
// launch instead of one or two more per call, since nothing the GEMMs write overlaps it.
// With grad_bias, the blocks after those compute the bias gradient, one block per (expert, 32 columns), as the tiled
// backend's kernel does (cuda::bias_grad_block: the same sums in the same order).
template <typename Element>
__global__ void __launch_bounds__(cuda::kBiasThreads) cutlass_grouped_setup_kernel(SetupParams<Element> p) {
  const int64_t block = blockIdx.x;
  if (block >= p.setup_blocks + p.zero_blocks) {
    using T = typename NativeHalf<Element>::type;
    cuda::bias_grad_block(reinterpret_cast<const T*>(p.grad_y), p.num_rows, p.offsets, p.num_experts, p.out_features,
                          reinterpret_cast<T*>(p.grad_bias), block - p.setup_blocks - p.zero_blocks,
                          static_cast<int>(threadIdx.x));
    return;
  }
  if (block >= p.setup_blocks) {
    setup_zeroing(p, block - p.setup_blocks, p.zero_blocks);
    return;
  }
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.num_experts) return;
  int64_t begin, end;
  cuda::group_rows(p.offsets, p.num_experts, p.num_rows, e, &begin, &end);
  const int rows = static_cast<int>(end - begin);
  const int in = static_cast<int>(p.in_features), out = static_cast<int>(p.out_features);
  const int64_t weight_offset = e * p.out_features * p.in_features;
  if (p.y != nullptr) {
    p.forward.sizes[e] = cute::make_shape(rows, out, in);
    p.forward.a[e] = p.x + begin * p.in_features;
    p.forward.b[e] = p.weight + weight_offset;
    p.forward.d[e] = p.y + begin * p.out_features;
    if (p.bias != nullptr) p.forward.bias[e] = p.bias + e * p.out_features;
    p.forward.stride_a[e] = cute::make_stride(p.in_features, cute::Int<1>{}, cute::Int<0>{});
    p.forward.stride_b[e] = cute::make_stride(p.in_features, cute::Int<1>{}, cute::Int<0>{});
    p.forward.stride_d[e] = cute::make_stride(p.out_features, cute::Int<1>{}, cute::Int<0>{});
  }
  if (p.grad_x != nullptr) {
    p.grad_input.sizes[e] = cute::make_shape(rows, in, out);
    p.grad_input.a[e] = p.grad_y + begin * p.out_features;
    p.grad_input.b[e] = p.weight + weight_offset;
    p.grad_input.d[e] = p.grad_x + begin * p.in_features;
    p.grad_input.stride_a[e] = cute::make_stride(p.out_features, cute::Int<1>{}, cute::Int<0>{});
    p.grad_input.stride_b[e] = cute::make_stride(cute::Int<1>{}, p.in_features, cute::Int<0>{});
    p.grad_input.stride_d[e] = cute::make_stride(p.in_features, cute::Int<1>{}, cute::Int<0>{});
  }
  if (p.grad_weight != nullptr) {
    p.grad_wt.sizes[e] = rows == 0 ? cute::make_shape(0, 0, 0) : cute::make_shape(out, in, rows);
    p.grad_wt.a[e] = p.grad_y + begin * p.out_features;
    p.grad_wt.b[e] = p.x + begin * p.in_features;
    p.grad_wt.d[e] = p.grad_weight + weight_offset;
    p.grad_wt.stride_a[e] = cute::make_stride(cute::Int<1>{}, p.out_features, cute::Int<0>{});
    p.grad_wt.stride_b[e] = cute::make_stride(cute::Int<1>{}, p.in_features, cute::Int<0>{});
    p.grad_wt.stride_d[e] = cute::make_stride(p.in_features, cute::Int<1>{}, cute::Int<0>{});
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Workspace: [CUTLASS's workspace (per-SM TMA descriptors), shared by the GEMMs of a call, which run one after
// the other on one stream][forward arrays][grad_x arrays][grad_weight arrays], each part 256-byte aligned, plus
// 256 bytes of slack to align the caller's pointer.

inline constexpr size_t kPartAlignment = 256;

inline size_t round_up(size_t bytes) {
  return (bytes + kPartAlignment - 1) / kPartAlignment * kPartAlignment;
}

inline size_t arrays_bytes(int64_t num_experts) {
  const size_t n = static_cast<size_t>(num_experts);
  return round_up(n * sizeof(ProblemSize)) + 4 * round_up(n * sizeof(void*)) + 3 * round_up(n * sizeof(int64_t));
}

// Carves one GEMM's arrays out of the workspace at *cursor and advances it.
template <typename Arrays>
Arrays carve_arrays(char** cursor, int64_t num_experts) {
  const size_t n = static_cast<size_t>(num_experts);
  Arrays arrays;
  auto take = [&](auto*& field, size_t bytes) {
    field = reinterpret_cast<std::remove_reference_t<decltype(field)>>(*cursor);
    *cursor += round_up(bytes);
  };
  take(arrays.sizes, n * sizeof(ProblemSize));
  take(arrays.a, n * sizeof(void*));
  take(arrays.b, n * sizeof(void*));
  take(arrays.d, n * sizeof(void*));
  take(arrays.bias, n * sizeof(void*));
  take(arrays.stride_a, n * sizeof(int64_t));
  take(arrays.stride_b, n * sizeof(int64_t));
  take(arrays.stride_d, n * sizeof(int64_t));
  return arrays;
}

// The current device and its SM count (the persistent grid's size, and the count of per-SM TMA descriptors in
// CUTLASS's workspace). Refuses devices other than compute capability 9.0, which cannot run sm_90a code.
struct DeviceInfo {
  int device = 0;
  int sm_count = 0;
};

inline DeviceInfo current_device(const char* caller) {
  DeviceInfo info;
  FMOE_CHECK_CUDA(cudaGetDevice(&info.device));
  int major = 0, minor = 0;
  FMOE_CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, info.device));
  FMOE_CHECK_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, info.device));
  FMOE_CHECK(major == 9 && minor == 0, caller, ": the CUTLASS SM90 kernels need a device of compute capability 9.0, ",
             "device ", info.device, " has ", major, ".", minor);
  FMOE_CHECK_CUDA(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, info.device));
  return info;
}

// The arguments type of BiasEpilogue for Gemm's element and tile shape.
template <typename Gemm>
struct BiasArguments {
  using type = typename BiasEpilogue<typename Gemm::ElementD, typename Gemm::GemmKernel::TileShape>::Arguments;
};

template <typename Gemm, typename Arrays>
typename Gemm::Arguments gemm_arguments(const Arrays& arrays, int64_t num_experts, const DeviceInfo& device) {
  static_assert(arrays_match<Gemm, Arrays>(), "the arrays' stride types must be the kernel's");
  typename Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = ProblemShape{static_cast<int32_t>(num_experts), arrays.sizes, nullptr};
  args.mainloop.ptr_A = arrays.a;
  args.mainloop.dA = arrays.stride_a;
  args.mainloop.ptr_B = arrays.b;
  args.mainloop.dB = arrays.stride_b;
  if constexpr (std::is_same_v<decltype(args.epilogue.thread), typename BiasArguments<Gemm>::type>) {
    // BiasEpilogue's arguments, children first: the accumulator (none), the bias row (its pointer array, the
    // value for a null pointer, the stride), then the addition (none).
    args.epilogue.thread = {{}, {arrays.bias, typename Gemm::ElementD(0), {}}, {}};
  } else {
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
  }
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = nullptr;
  args.epilogue.ptr_D = arrays.d;
  args.epilogue.dD = arrays.stride_d;
  args.hw_info.device_id = device.device;
  args.hw_info.sm_count = device.sm_count;
  return args;
}

template <typename Gemm>
size_t gemm_workspace_bytes(int64_t num_experts, const DeviceInfo& device) {
  using Arrays = GemmArrays<typename Gemm::ElementA, typename Gemm::GemmKernel::InternalStrideA,
                            typename Gemm::GemmKernel::InternalStrideB>;
  Arrays none{};
  return Gemm::get_workspace_size(gemm_arguments<Gemm>(none, num_experts, device));
}

template <typename Element, typename Configs>
size_t cutlass_part_bytes(int64_t num_experts, const DeviceInfo& device) {
  using G = Gemms<Element, Configs>;
  return std::max({gemm_workspace_bytes<typename G::Forward>(num_experts, device),
                   gemm_workspace_bytes<typename G::ForwardBias>(num_experts, device),
                   gemm_workspace_bytes<typename G::GradInput>(num_experts, device),
                   gemm_workspace_bytes<typename G::GradWeight>(num_experts, device),
                   gemm_workspace_bytes<typename G::TallGradWeight>(num_experts, device)});
}

template <typename Element, typename Configs>
size_t workspace_bytes_for(int64_t num_experts, const DeviceInfo& device) {
  return kPartAlignment + round_up(cutlass_part_bytes<Element, Configs>(num_experts, device)) +
         3 * arrays_bytes(num_experts);
}

template <typename Element>
struct Workspace {
  void* cutlass;
  ForwardArrays<Element> forward;
  GradInputArrays<Element> grad_input;
  GradWeightArrays<Element> grad_wt;
};

template <typename Element, typename Configs>
Workspace<Element> carve_workspace(const char* caller, void* workspace, size_t workspace_bytes, int64_t num_experts,
                                   const DeviceInfo& device) {
  const size_t needed = workspace_bytes_for<Element, Configs>(num_experts, device);
  FMOE_CHECK(workspace != nullptr && workspace_bytes >= needed, caller, ": the workspace must hold ", needed,
             " bytes (cutlass_grouped_linear_workspace_bytes), got ", workspace_bytes, " bytes at ", workspace);
  const uintptr_t base = reinterpret_cast<uintptr_t>(workspace);
  char* cursor = reinterpret_cast<char*>((base + kPartAlignment - 1) / kPartAlignment * kPartAlignment);
  Workspace<Element> ws;
  ws.cutlass = cursor;
  cursor += round_up(cutlass_part_bytes<Element, Configs>(num_experts, device));
  ws.forward = carve_arrays<ForwardArrays<Element>>(&cursor, num_experts);
  ws.grad_input = carve_arrays<GradInputArrays<Element>>(&cursor, num_experts);
  ws.grad_wt = carve_arrays<GradWeightArrays<Element>>(&cursor, num_experts);
  return ws;
}

inline void check_cutlass(cutlass::Status status, const char* caller, const char* step) {
  FMOE_CHECK(status == cutlass::Status::kSuccess, caller, ": CUTLASS ", step,
             " failed: ", cutlass::cutlassGetStatusString(status));
}

// CUTLASS's device adapter sets two attributes of its kernel (the dynamic shared memory size and non-portable
// cluster sizes) in every initialize() and run(): host calls of a few microseconds, 12 per MoE layer step. They are
// settings of the kernel in the device's context, so they are set once per kernel and device here.
template <typename Kernel>
void set_kernel_attributes_once(int device) {
  static std::atomic<uint64_t> done{0};  // bit d: set on device d (devices past 63 set them on every call)
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return;
  const void* kernel = reinterpret_cast<const void*>(&cutlass::device_kernel<Kernel>);
  FMOE_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(Kernel::SharedStorageSize)));
  FMOE_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  done.fetch_or(bit, std::memory_order_acq_rel);
}

// What GemmUniversalAdapter::initialize() + run() do, less the per-call attribute settings above: the kernel's
// workspace and parameters from the arguments, then one cluster launch.
template <typename Gemm, typename Arrays>
void run_gemm(const char* caller, const Arrays& arrays, int64_t num_experts, const DeviceInfo& device,
              void* cutlass_workspace, cudaStream_t stream) {
  using Kernel = typename Gemm::GemmKernel;
  const typename Gemm::Arguments args = gemm_arguments<Gemm>(arrays, num_experts, device);
  check_cutlass(Gemm::can_implement(args), caller, "can_implement");
  check_cutlass(Kernel::initialize_workspace(args, cutlass_workspace, stream), caller, "initialize_workspace");
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, cutlass_workspace);
  set_kernel_attributes_once<Kernel>(device.device);
  using Cluster = typename Kernel::DispatchPolicy::ClusterShape;
  const dim3 cluster(cute::size<0>(Cluster{}), cute::size<1>(Cluster{}), cute::size<2>(Cluster{}));
  const dim3 grid = Kernel::get_grid_shape(params);
  check_cutlass(cutlass::ClusterLauncher::check_cluster_dims(grid, cluster), caller, "cluster shape");
  auto config = cutlass::ClusterLauncher::make_cluster_launch_config(grid, cluster, Kernel::get_block_shape(),
                                                                     Kernel::SharedStorageSize, stream);
  config.launch_config.attrs = config.launch_attribute;  // (the copy returned still points into its source)
  void* kernel_params[] = {&params};
  FMOE_CHECK_CUDA(cudaLaunchKernelExC(&config.launch_config,
                                      reinterpret_cast<const void*>(&cutlass::device_kernel<Kernel>), kernel_params));
}

// The setup parameters every call shares; the caller adds its outputs and their arrays.
template <typename Element>
SetupParams<Element> setup_params(const int64_t* expert_offsets, int64_t num_experts, int64_t num_rows,
                                  int64_t in_features, int64_t out_features, const void* x, const void* weight) {
  SetupParams<Element> params{};
  params.offsets = expert_offsets;
  params.num_experts = num_experts;
  params.num_rows = num_rows;
  params.in_features = in_features;
  params.out_features = out_features;
  params.x = static_cast<const Element*>(x);
  params.weight = static_cast<const Element*>(weight);
  return params;
}

// Launches the setup kernel: one thread per expert; then, when there is something to zero, blocks enough for the
// larger of the output's rows and one expert's weight gradient in 16-byte stores, at most kMaxZeroBlocks; then,
// with grad_bias, the bias gradient's blocks.
template <typename Element>
void launch_setup(SetupParams<Element> params, cudaStream_t stream) {
  constexpr int kThreads = cuda::kBiasThreads;
  constexpr int64_t kMaxZeroBlocks = 1024;
  params.setup_blocks = (params.num_experts + kThreads - 1) / kThreads;
  const int64_t zero_bytes = std::max(params.tail_rows != nullptr ? params.num_rows * params.tail_row_bytes : 0,
                                      params.empty_groups != nullptr ? params.group_bytes : 0);
  params.zero_blocks =
      zero_bytes == 0 ? 0 : std::clamp<int64_t>((zero_bytes / 16 + kThreads - 1) / kThreads, 1, kMaxZeroBlocks);
  const int64_t bias_blocks =
      params.grad_bias != nullptr ? cuda::bias_grad_blocks(params.num_experts, params.out_features) : 0;
  const int64_t blocks = params.setup_blocks + params.zero_blocks + bias_blocks;
  FMOE_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "the CUTLASS setup needs ", blocks,
             " blocks, more than a grid holds");
  cutlass_grouped_setup_kernel<Element><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(params);
  FMOE_CHECK_LAUNCH();
}

// Calls fn(Element{}) with the CUTLASS element type of dtype (fp16 or bf16).
template <typename Fn>
void dispatch_half_types(DType dtype, const char* caller, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16: return fn(cutlass::half_t{});
    case DType::kBFloat16: return fn(cutlass::bfloat16_t{});
    default: break;
  }
  FMOE_CHECK(false, caller, ": dtype must be float16 or bfloat16, got ", dtype_name(dtype));
}

inline bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kAlignmentBytes == 0;
}

inline void check_dtype(const char* caller, DType dtype) {
  FMOE_CHECK(dtype == DType::kFloat16 || dtype == DType::kBFloat16, caller, ": dtype must be float16 or bfloat16, got ",
             dtype_name(dtype));
}

inline void check_sizes(const char* caller, int64_t num_rows, int64_t in_features, int64_t out_features,
                        int64_t num_experts) {
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  FMOE_CHECK(num_rows >= 0 && num_rows <= kIntMax, caller, ": num_rows must be in [0, 2^31), got ", num_rows);
  FMOE_CHECK(in_features > 0 && in_features <= kIntMax && in_features % 8 == 0, caller,
             ": in_features must be a positive multiple of 8 below 2^31 (16-byte rows for TMA), got ", in_features);
  FMOE_CHECK(out_features > 0 && out_features <= kIntMax && out_features % 8 == 0, caller,
             ": out_features must be a positive multiple of 8 below 2^31 (16-byte rows for TMA), got ", out_features);
  FMOE_CHECK(num_experts >= 1 && num_experts <= kIntMax, caller, ": num_experts must be in [1, 2^31), got ",
             num_experts);
}

inline void check_aligned(const char* caller, const char* name, const void* p) {
  FMOE_CHECK(aligned(p), caller, ": ", name, " must be 16-byte aligned (TMA), got address ", p);
}

// The three entry points of cutlass_grouped.h, for the given configurations.
template <typename Configs>
size_t workspace_bytes(DType dtype, int64_t num_experts) {
  constexpr const char* kCaller = "cutlass_grouped_linear_workspace_bytes";
  check_dtype(kCaller, dtype);
  FMOE_CHECK(num_experts >= 1 && num_experts <= std::numeric_limits<int32_t>::max(), kCaller,
             ": num_experts must be in [1, 2^31), got ", num_experts);
  const DeviceInfo device = current_device(kCaller);
  size_t bytes = 0;
  dispatch_half_types(dtype, kCaller, [&](auto element) {
    bytes = workspace_bytes_for<decltype(element), Configs>(num_experts, device);
  });
  return bytes;
}

template <typename Configs>
void linear(DType dtype, const void* x, int64_t num_rows, int64_t in_features, const int64_t* expert_offsets,
            int64_t num_experts, const void* weight, int64_t out_features, const void* bias, void* y, void* workspace,
            size_t workspace_bytes, cudaStream_t stream) {
  constexpr const char* kCaller = "cutlass_grouped_linear_cuda";
  check_dtype(kCaller, dtype);
  check_sizes(kCaller, num_rows, in_features, out_features, num_experts);
  check_aligned(kCaller, "x", x);
  check_aligned(kCaller, "weight", weight);
  check_aligned(kCaller, "y", y);
  if (num_rows == 0) return;  // y has no elements
  const DeviceInfo device = current_device(kCaller);
  dispatch_half_types(dtype, kCaller, [&](auto element) {
    using Element = decltype(element);
    const Workspace<Element> ws =
        carve_workspace<Element, Configs>(kCaller, workspace, workspace_bytes, num_experts, device);
    SetupParams<Element> params =
        setup_params<Element>(expert_offsets, num_experts, num_rows, in_features, out_features, x, weight);
    params.y = static_cast<Element*>(y);
    params.forward = ws.forward;
    params.bias = static_cast<const Element*>(bias);
    params.tail_rows = static_cast<char*>(y);  // zeroed by the setup launch: no GEMM writes past offsets[E]
    params.tail_row_bytes = out_features * static_cast<int64_t>(sizeof(Element));
    launch_setup(params, stream);
    using G = Gemms<Element, Configs>;
    if (bias != nullptr) {
      run_gemm<typename G::ForwardBias>(kCaller, ws.forward, num_experts, device, ws.cutlass, stream);
    } else {
      run_gemm<typename G::Forward>(kCaller, ws.forward, num_experts, device, ws.cutlass, stream);
    }
  });
}

template <typename Configs>
void linear_backward(DType dtype, const void* grad_y, const void* x, int64_t num_rows, int64_t in_features,
                     const int64_t* expert_offsets, int64_t num_experts, const void* weight, int64_t out_features,
                     void* grad_x, void* grad_weight, void* grad_bias, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream) {
  constexpr const char* kCaller = "cutlass_grouped_linear_backward_cuda";
  check_dtype(kCaller, dtype);
  check_sizes(kCaller, num_rows, in_features, out_features, num_experts);
  FMOE_CHECK((grad_weight == nullptr && grad_bias == nullptr) || num_experts <= 65535, kCaller,
             ": num_experts must be at most 65535 for the weight and bias gradients (zero_empty_groups_cuda), got ",
             num_experts);
  check_aligned(kCaller, "grad_y", grad_y);
  check_aligned(kCaller, "x", x);
  check_aligned(kCaller, "weight", weight);
  check_aligned(kCaller, "grad_x", grad_x);
  check_aligned(kCaller, "grad_weight", grad_weight);
  if (grad_x == nullptr && grad_weight == nullptr && grad_bias == nullptr) return;
  if (num_rows > 0) {
    const DeviceInfo device = current_device(kCaller);
    dispatch_half_types(dtype, kCaller, [&](auto element) {
      using Element = decltype(element);
      const Workspace<Element> ws =
          carve_workspace<Element, Configs>(kCaller, workspace, workspace_bytes, num_experts, device);
      SetupParams<Element> params =
          setup_params<Element>(expert_offsets, num_experts, num_rows, in_features, out_features, x, weight);
      params.grad_y = static_cast<const Element*>(grad_y);
      params.grad_x = static_cast<Element*>(grad_x);
      params.grad_weight = static_cast<Element*>(grad_weight);
      params.grad_input = ws.grad_input;
      params.grad_wt = ws.grad_wt;
      if (grad_x != nullptr) {
        params.tail_rows = static_cast<char*>(grad_x);
        params.tail_row_bytes = in_features * static_cast<int64_t>(sizeof(Element));
      }
      if (grad_weight != nullptr) {
        params.empty_groups = static_cast<char*>(grad_weight);
        params.group_bytes = out_features * in_features * static_cast<int64_t>(sizeof(Element));
      }
      params.grad_bias = static_cast<Element*>(grad_bias);
      launch_setup(params, stream);
      // Both GEMMs share CUTLASS's workspace: the second starts after the first ends, on the same stream.
      if (grad_x != nullptr) {
        run_gemm<typename Gemms<Element, Configs>::GradInput>(kCaller, ws.grad_input, num_experts, device, ws.cutlass,
                                                              stream);
      }
      if (grad_weight != nullptr && tall_weight(in_features, out_features)) {
        run_gemm<typename Gemms<Element, Configs>::TallGradWeight>(kCaller, ws.grad_wt, num_experts, device, ws.cutlass,
                                                                   stream);
      } else if (grad_weight != nullptr) {
        run_gemm<typename Gemms<Element, Configs>::GradWeight>(kCaller, ws.grad_wt, num_experts, device, ws.cutlass,
                                                               stream);
      }
    });
    return;
  }
  // No rows: grad_x is empty, and every expert has no rows (offsets clamped into [0, 0], as the GEMMs clamp them), so
  // the weight and bias gradients are zero.
  if (grad_weight != nullptr) {
    FMOE_CHECK_CUDA(cudaMemsetAsync(grad_weight, 0, static_cast<size_t>(num_experts * out_features * in_features) * 2,
                                    stream));  // 2-byte elements
  }
  if (grad_bias != nullptr) {
    FMOE_CHECK_CUDA(cudaMemsetAsync(grad_bias, 0, static_cast<size_t>(num_experts * out_features) * 2, stream));
  }
}

}  // namespace cutlass_grouped
}  // namespace fastmoe
