// The seed of one global expert's random stream at initialisation (docs/distributed.md, "Initialisation"). Torch-free:
// the C++ modules (csrc/nn/modules.cpp) use it directly and fastmoe._C hands it to Python (fastmoe._rng), so both
// front ends give the same expert the same values.
#pragma once

#include <cstdint>

namespace fastmoe {

// SplitMix64 of the base seed advanced by the expert id: neighbouring experts, and layers whose base seeds are close,
// get unrelated streams (mt19937 keeps only a seed's low 32 bits, which this mixes too).
inline uint64_t expert_seed(uint64_t base_seed, int64_t global_expert) {
  uint64_t z = base_seed + (static_cast<uint64_t>(global_expert) + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace fastmoe
