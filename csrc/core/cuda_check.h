// Torch-free checks for CUDA runtime calls and kernel launches. Include only from CUDA code.
#pragma once

#include <cuda_runtime_api.h>

#include "core/check.h"

// A failed call raises after clearing the runtime's last-error state (a no-op for sticky errors), so a later
// check does not report the same failure again against another call.
#define FMOE_CHECK_CUDA(expr)                                                                                         \
  do {                                                                                                                \
    const cudaError_t fmoe_status_ = (expr);                                                                          \
    if (fmoe_status_ != cudaSuccess) (void)cudaGetLastError();                                                        \
    FMOE_CHECK(fmoe_status_ == cudaSuccess, "CUDA call `", #expr, "` failed: ", cudaGetErrorName(fmoe_status_), ": ", \
               cudaGetErrorString(fmoe_status_));                                                                     \
  } while (0)

// After every kernel launch: reports a bad launch configuration at the launch site, not at a later sync.
#define FMOE_CHECK_LAUNCH() FMOE_CHECK_CUDA(cudaGetLastError())
