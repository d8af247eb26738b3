// Deterministic mode: every op takes a path whose results are bitwise reproducible from run to run on the same
// machine, or raises when it has none (docs/reliability.md lists what changes). Torch-free, so fastmoe._C and
// libtorch users can include it alone.
#pragma once

namespace fastmoe {

// fastmoe's own switch (default off). Python: fastmoe.use_deterministic(flag).
void set_deterministic(bool enabled);
bool deterministic_flag();

// True when fastmoe's switch is on or torch.use_deterministic_algorithms(True) (at::globalContext()) is in
// effect. The ops read this on every call.
bool deterministic();

}  // namespace fastmoe
