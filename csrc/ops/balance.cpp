// Balance stage: capacity_limit's schema lives in library.cpp; here its checks, CPU/CUDA/Meta kernels, the C++ op
// API, and an Autograd kernel that only runs it below autograd (its outputs are integers, so nothing flows back;
// the caller's scores keep their own gradient path).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "fastmoe/ops.h"
#include "ops/common.h"
#include "ref/balance_ref.h"
#ifdef FASTMOE_WITH_CUDA_OPS
#include "kernels/balance/balance.h"
#endif

namespace fastmoe {
namespace {

using namespace ops_detail;

void check_capacity_limit(const at::Tensor& topk_idx, const at::Tensor& topk_score, const at::Tensor& expert_capacity) {
  check_int64(topk_idx, "topk_idx");
  check_dim(topk_idx, 2, "topk_idx", "[num_tokens, k]");
  check_float(topk_score, "topk_score");
  TORCH_CHECK(topk_score.sym_sizes() == topk_idx.sym_sizes(), "topk_score must match topk_idx's shape ",
              topk_idx.sym_sizes(), ", got ", topk_score.sym_sizes());
  check_int64(expert_capacity, "expert_capacity");
  check_dim(expert_capacity, 1, "expert_capacity", "[num_experts]");
  TORCH_CHECK(expert_capacity.sym_size(0) >= 1, "expert_capacity must have at least one expert, got shape ",
              expert_capacity.sym_sizes());
  check_same_device(topk_score, "topk_score", topk_idx, "topk_idx");
  check_same_device(expert_capacity, "expert_capacity", topk_idx, "topk_idx");
}

std::tuple<at::Tensor, at::Tensor> capacity_limit_meta(const at::Tensor& topk_idx, const at::Tensor& topk_score,
                                                       const at::Tensor& expert_capacity) {
  check_capacity_limit(topk_idx, topk_score, expert_capacity);
  return {at::empty_like(topk_idx, at::MemoryFormat::Contiguous), topk_idx.new_empty({})};
}

std::tuple<at::Tensor, at::Tensor> capacity_limit_kernel(const at::Tensor& topk_idx, const at::Tensor& topk_score,
                                                         const at::Tensor& expert_capacity) {
  check_capacity_limit(topk_idx, topk_score, expert_capacity);
  const c10::OptionalDeviceGuard guard(topk_idx.device());
  const at::Tensor idx = topk_idx.contiguous(), score = topk_score.contiguous(), cap = expert_capacity.contiguous();
  at::Tensor kept = at::empty_like(idx, at::MemoryFormat::Contiguous);
  at::Tensor num_dropped = idx.new_empty({});
  const int64_t num_experts = cap.size(0);
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (idx.is_cuda()) {
      const size_t bytes = capacity_limit_cuda_workspace_bytes(idx.numel(), num_experts);
      at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, idx.options().dtype(at::kByte));
      return capacity_limit_cuda(idx.const_data_ptr<int64_t>(), score.const_data_ptr(), to_dtype(score, "topk_score"),
                                 idx.numel(), cap.const_data_ptr<int64_t>(), num_experts,
                                 kept.mutable_data_ptr<int64_t>(), num_dropped.mutable_data_ptr<int64_t>(),
                                 workspace.mutable_data_ptr(), bytes, current_stream(idx));
    }
#endif
    capacity_limit_ref(idx.const_data_ptr<int64_t>(), score.const_data_ptr(), to_dtype(score, "topk_score"),
                       idx.numel(), cap.const_data_ptr<int64_t>(), num_experts, kept.mutable_data_ptr<int64_t>(),
                       num_dropped.mutable_data_ptr<int64_t>());
  });
  return {kept, num_dropped};
}

std::tuple<at::Tensor, at::Tensor> capacity_limit_autograd(const at::Tensor& topk_idx, const at::Tensor& topk_score,
                                                           const at::Tensor& expert_capacity) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::capacity_limit(topk_idx, topk_score, expert_capacity);
}

}  // namespace

namespace ops {

std::tuple<at::Tensor, at::Tensor> capacity_limit(const at::Tensor& topk_idx, const at::Tensor& topk_score,
                                                  const at::Tensor& expert_capacity) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmoe::capacity_limit", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(topk_idx, topk_score, expert_capacity);
}

}  // namespace ops

TORCH_LIBRARY_IMPL(fastmoe, CPU, m) {
  m.impl("capacity_limit", &capacity_limit_kernel);
}
TORCH_LIBRARY_IMPL(fastmoe, Meta, m) {
  m.impl("capacity_limit", &capacity_limit_meta);
}
TORCH_LIBRARY_IMPL(fastmoe, Autograd, m) {
  m.impl("capacity_limit", &capacity_limit_autograd);
}
#ifdef FASTMOE_WITH_CUDA_OPS
TORCH_LIBRARY_IMPL(fastmoe, CUDA, m) {
  m.impl("capacity_limit", &capacity_limit_kernel);
}
#endif

}  // namespace fastmoe
