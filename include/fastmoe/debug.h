// Debug mode: fastmoe::TokenDispatch checks the gate's routing (scores finite, expert ids in [-1, num_experts)) and
// the experts' outputs, one host read per check, and raises naming the layer (docs/reliability.md). Off by default;
// Python: fastmoe.set_debug(True) or FASTMOE_DEBUG=1. Torch-free, so fastmoe._C and libtorch users can include it.
#pragma once

namespace fastmoe {

void set_debug(bool enabled);
bool debug_enabled();

}  // namespace fastmoe
