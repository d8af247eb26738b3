// One candidate configuration of the CUTLASS grouped GEMM (FASTMOE_CANDIDATE selects it from the list below),
// used for the forward, grad_x and grad_weight GEMMs alike, on the library's own code path. Compiled for sm_90a.
// Candidate 0 is the library's shipped configuration (csrc/kernels/expert/cutlass_grouped.cu).
#include "benchmarks/cutlass_configs/candidates.h"
#include "kernels/expert/cutlass_grouped.cuh"

#ifndef FASTMOE_CANDIDATE
#error "compile with -DFASTMOE_CANDIDATE=<index>"
#endif

namespace fastmoe::bench {
namespace {

template <int kIndex>
struct Config;
// GemmConfig<tile M, tile N, tile K, cluster M, cluster N, pingpong[, epilogue subtile's columns]>
#define FASTMOE_CONFIG(INDEX, NAME, ...)                   \
  template <>                                              \
  struct Config<INDEX> {                                   \
    static const char* name() { return NAME; }             \
    using Type = cutlass_grouped::GemmConfig<__VA_ARGS__>; \
  };
FASTMOE_CONFIG(0, "coop 128x256x64 cluster 2x1 epilogue 128x64", 128, 256, 64, 2, 1, false, 64)
FASTMOE_CONFIG(1, "coop 128x256x64 cluster 1x2", 128, 256, 64, 1, 2, false)
FASTMOE_CONFIG(2, "coop 128x256x64 cluster 1x1", 128, 256, 64, 1, 1, false)
FASTMOE_CONFIG(3, "coop 256x128x64 cluster 2x1", 256, 128, 64, 2, 1, false)
FASTMOE_CONFIG(4, "coop 256x128x64 cluster 1x2", 256, 128, 64, 1, 2, false)
FASTMOE_CONFIG(5, "coop 128x128x64 cluster 2x1", 128, 128, 64, 2, 1, false)
FASTMOE_CONFIG(6, "coop 128x128x64 cluster 1x2", 128, 128, 64, 1, 2, false)
FASTMOE_CONFIG(7, "pingpong 128x128x64 cluster 2x1", 128, 128, 64, 2, 1, true)
FASTMOE_CONFIG(8, "pingpong 128x128x64 cluster 1x2", 128, 128, 64, 1, 2, true)
FASTMOE_CONFIG(9, "pingpong 64x256x64 cluster 2x1", 64, 256, 64, 2, 1, true)
FASTMOE_CONFIG(10, "pingpong 128x128x128 cluster 2x1", 128, 128, 128, 2, 1, true)
FASTMOE_CONFIG(11, "coop 128x256x64 cluster 2x1", 128, 256, 64, 2, 1, false)
FASTMOE_CONFIG(12, "coop 128x256x64 cluster 2x1 epilogue 128x128", 128, 256, 64, 2, 1, false, 128)
FASTMOE_CONFIG(13, "coop 128x256x64 cluster 1x2 epilogue 128x64", 128, 256, 64, 1, 2, false, 64)
FASTMOE_CONFIG(14, "pingpong 64x256x64 cluster 2x1 epilogue 64x64", 64, 256, 64, 2, 1, true, 64)
#undef FASTMOE_CONFIG

using C = typename Config<FASTMOE_CANDIDATE>::Type;
using Configs = cutlass_grouped::GemmConfigs<C, C, C, C>;

const RegisterCandidate kRegistered{
    Candidate{FASTMOE_CANDIDATE, Config<FASTMOE_CANDIDATE>::name(), &cutlass_grouped::workspace_bytes<Configs>,
              &cutlass_grouped::linear<Configs>, &cutlass_grouped::linear_backward<Configs>}};

}  // namespace
}  // namespace fastmoe::bench
