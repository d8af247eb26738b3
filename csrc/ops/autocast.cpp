// Autocast kernels: under torch.autocast the expert GEMM runs in the autocast dtype, like at::linear. The inputs
// are cast with autocast's cache (so the fp32 weights are cast once per forward), autocast is switched off for
// the call, and the op then meets its Autograd kernel: the casts are differentiable, so the fp32 weights get
// fp32 gradients. The other ops need no autocast kernel: routing and permute keep their input's dtype, and the
// combine takes scores of any float dtype.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "fastmoe/ops.h"

namespace fastmoe {
namespace {

template <c10::DeviceType device_type>
at::Tensor grouped_linear_autocast(const at::Tensor& x, const at::Tensor& expert_offsets, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  return ops::grouped_linear(at::autocast::cached_cast(dtype, x, device_type), expert_offsets,
                             at::autocast::cached_cast(dtype, weight, device_type),
                             at::autocast::cached_cast(dtype, bias, device_type));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmoe, AutocastCPU, m) {
  m.impl("grouped_linear", &grouped_linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(fastmoe, AutocastCUDA, m) {
  m.impl("grouped_linear", &grouped_linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace fastmoe
