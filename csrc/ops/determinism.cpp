// fastmoe's deterministic-mode switch (include/fastmoe/determinism.h). The ops read deterministic(), which also
// honours torch's global setting, so either switch is enough.
#include "fastmoe/determinism.h"

#include <ATen/Context.h>

#include <atomic>

namespace fastmoe {
namespace {

std::atomic<bool> deterministic_enabled{false};

}  // namespace

void set_deterministic(bool enabled) {
  deterministic_enabled.store(enabled, std::memory_order_relaxed);
}

bool deterministic_flag() {
  return deterministic_enabled.load(std::memory_order_relaxed);
}

bool deterministic() {
  return deterministic_flag() || at::globalContext().deterministicAlgorithms();
}

}  // namespace fastmoe
