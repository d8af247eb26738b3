// Balance stage: capacity_limit's and balance_loss's schemas live in library.cpp; here their checks, CPU/CUDA/Meta
// kernels and C++ op API, and capacity_limit's Autograd kernel, which only runs it below autograd (its outputs are
// integers, so nothing flows back; the caller's scores keep their own gradient path). balance_loss's autograd is in
// ops/autograd/routing.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>

#include "fastmoe/ops.h"
#include "ops/common.h"
#include "ops/internal.h"
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

// ------------------------------------------------------------------------------------------------ balance_loss

void check_balance_loss(const at::Tensor& logits, const at::Tensor& expert_counts, int64_t num_pairs, double coef) {
  check_float(logits, "logits");
  check_dim(logits, 2, "logits", "[num_tokens, num_experts]");
  TORCH_CHECK(logits.sym_size(1) >= 1, "logits must have at least one expert column, got shape ", logits.sym_sizes());
  check_int64(expert_counts, "expert_counts");
  check_dim(expert_counts, 1, "expert_counts", "[num_experts]");
  TORCH_CHECK(expert_counts.sym_size(0) == logits.sym_size(1),
              "expert_counts must be [num_experts=", logits.sym_size(1), "], got shape ", expert_counts.sym_sizes());
  check_same_device(expert_counts, "expert_counts", logits, "logits");
  TORCH_CHECK_VALUE(num_pairs >= 0, "num_pairs must be >= 0, got ", num_pairs);
  TORCH_CHECK_VALUE(std::isfinite(coef) && coef >= 0, "coef must be a finite number >= 0, got ", coef);
}

at::Tensor balance_loss_meta(const at::Tensor& logits, const at::Tensor& expert_counts, int64_t num_pairs,
                             double coef) {
  check_balance_loss(logits, expert_counts, num_pairs, coef);
  return at::empty({}, logits.options().dtype(ops::loss_dtype(logits)));
}

at::Tensor balance_loss_kernel(const at::Tensor& logits, const at::Tensor& expert_counts, int64_t num_pairs,
                               double coef) {
  check_balance_loss(logits, expert_counts, num_pairs, coef);
  const c10::OptionalDeviceGuard guard(logits.device());
  const at::Tensor z = logits.contiguous(), counts = expert_counts.contiguous();
  at::Tensor loss = at::empty({}, z.options().dtype(ops::loss_dtype(z)));
  const double scale = ops::balance_scale(z.size(0), z.size(1), num_pairs, coef);
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (z.is_cuda()) {
      const size_t bytes = balance_loss_cuda_workspace_bytes(z.size(0), z.size(1));
      at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, z.options().dtype(at::kByte));
      return balance_loss_cuda(to_dtype(z, "logits"), z.const_data_ptr(), z.size(0), z.size(1),
                               counts.const_data_ptr<int64_t>(), scale, to_dtype(loss, "loss"), loss.mutable_data_ptr(),
                               workspace.mutable_data_ptr(), bytes, current_stream(z));
    }
#endif
    balance_loss_ref(to_dtype(z, "logits"), z.const_data_ptr(), z.size(0), z.size(1), counts.const_data_ptr<int64_t>(),
                     scale, to_dtype(loss, "loss"), loss.mutable_data_ptr());
  });
  return loss;
}

at::Tensor balance_loss_backward_meta(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& expert_counts,
                                      int64_t num_pairs, double coef) {
  ops::check_balance_loss_backward(grad, logits, expert_counts, num_pairs, coef);
  return at::empty_like(logits, at::MemoryFormat::Contiguous);
}

at::Tensor balance_loss_backward_kernel(const at::Tensor& grad, const at::Tensor& logits,
                                        const at::Tensor& expert_counts, int64_t num_pairs, double coef) {
  ops::check_balance_loss_backward(grad, logits, expert_counts, num_pairs, coef);
  const c10::OptionalDeviceGuard guard(logits.device());
  const at::Tensor z = logits.contiguous(), counts = expert_counts.contiguous();
  at::Tensor grad_logits = at::empty_like(z, at::MemoryFormat::Contiguous);
  const double scale = ops::balance_scale(z.size(0), z.size(1), num_pairs, coef);
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (z.is_cuda()) {
      return balance_loss_backward_cuda(to_dtype(z, "logits"), z.const_data_ptr(), z.size(0), z.size(1),
                                        counts.const_data_ptr<int64_t>(), scale, to_dtype(grad, "grad"),
                                        grad.const_data_ptr(), grad_logits.mutable_data_ptr(), current_stream(z));
    }
#endif
    balance_loss_backward_ref(to_dtype(z, "logits"), z.const_data_ptr(), z.size(0), z.size(1),
                              counts.const_data_ptr<int64_t>(), scale, to_dtype(grad, "grad"), grad.const_data_ptr(),
                              grad_logits.mutable_data_ptr());
  });
  return grad_logits;
}

}  // namespace

namespace ops {

void check_balance_loss_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& expert_counts,
                                 int64_t num_pairs, double coef) {
  check_balance_loss(logits, expert_counts, num_pairs, coef);
  TORCH_CHECK(grad.dim() == 0 && grad.scalar_type() == ops::loss_dtype(logits), "grad must be a 0-dim ",
              ops::loss_dtype(logits), " tensor (the loss's), got shape ", grad.sym_sizes(), " of dtype ",
              grad.scalar_type());
  check_same_device(grad, "grad", logits, "logits");
}

std::tuple<at::Tensor, at::Tensor> capacity_limit(const at::Tensor& topk_idx, const at::Tensor& topk_score,
                                                  const at::Tensor& expert_capacity) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmoe::capacity_limit", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(topk_idx, topk_score, expert_capacity);
}

at::Tensor balance_loss(const at::Tensor& logits, const at::Tensor& expert_counts, int64_t num_pairs, double coef) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::balance_loss", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double)>();
  return op.call(logits, expert_counts, num_pairs, coef);
}

at::Tensor balance_loss_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& expert_counts,
                                 int64_t num_pairs, double coef) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::balance_loss_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double)>();
  return op.call(grad, logits, expert_counts, num_pairs, coef);
}

}  // namespace ops

TORCH_LIBRARY_IMPL(fastmoe, CPU, m) {
  m.impl("capacity_limit", &capacity_limit_kernel);
  m.impl("balance_loss", &balance_loss_kernel);
  m.impl("balance_loss_backward", &balance_loss_backward_kernel);
}
TORCH_LIBRARY_IMPL(fastmoe, Meta, m) {
  m.impl("capacity_limit", &capacity_limit_meta);
  m.impl("balance_loss", &balance_loss_meta);
  m.impl("balance_loss_backward", &balance_loss_backward_meta);
}
TORCH_LIBRARY_IMPL(fastmoe, Autograd, m) {
  m.impl("capacity_limit", &capacity_limit_autograd);
}
#ifdef FASTMOE_WITH_CUDA_OPS
TORCH_LIBRARY_IMPL(fastmoe, CUDA, m) {
  m.impl("capacity_limit", &capacity_limit_kernel);
  m.impl("balance_loss", &balance_loss_kernel);
  m.impl("balance_loss_backward", &balance_loss_backward_kernel);
}
#endif

}  // namespace fastmoe
