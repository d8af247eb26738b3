// Expert stage: CPU, CUDA and Meta kernels of grouped_linear, swiglu and their backwards.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "fastmoe/determinism.h"
#include "fastmoe/ops.h"
#include "ops/common.h"
#include "ops/internal.h"
#include "ref/expert_ref.h"
#ifdef FASTMOE_WITH_CUDA_OPS
#include <ATen/cuda/CUDAContext.h>

#include "kernels/expert/expert.h"
#include "ops/expert_backend.h"
#ifdef FASTMOE_WITH_CUTLASS
#include "kernels/expert/cutlass_grouped.h"
#endif
#endif

namespace fastmoe {
namespace {

using namespace ops_detail;

void check_grouped_linear(const at::Tensor& x, const at::Tensor& expert_offsets, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  check_float(x, "x");
  check_dim(x, 2, "x", "[num_rows, in_features]");
  check_float(weight, "weight");
  check_dim(weight, 3, "weight", "[num_experts, out_features, in_features]");
  check_int64(expert_offsets, "expert_offsets");
  check_dim(expert_offsets, 1, "expert_offsets", "[num_experts + 1]");
  TORCH_CHECK(expert_offsets.sym_size(0) == weight.sym_size(0) + 1,
              "expert_offsets must have num_experts + 1 = ", weight.sym_size(0) + 1, " entries for weight of shape ",
              weight.sym_sizes(), ", got ", expert_offsets.sym_size(0));
  TORCH_CHECK(x.sym_size(1) == weight.sym_size(2), "x has ", x.sym_size(1), " features but weight expects ",
              weight.sym_size(2), " (weight shape ", weight.sym_sizes(), ")");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must share a dtype, got ", x.scalar_type(),
              " and ", weight.scalar_type());
  check_same_device(x, "x", weight, "weight");
  check_same_device(x, "x", expert_offsets, "expert_offsets");
  if (bias.has_value() && bias->defined()) {
    check_float(*bias, "bias");
    TORCH_CHECK(bias->dim() == 2 && bias->sym_size(0) == weight.sym_size(0) && bias->sym_size(1) == weight.sym_size(1),
                "bias must be [num_experts, out_features] = [", weight.sym_size(0), ", ", weight.sym_size(1), "], got ",
                bias->sym_sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "bias must have weight's dtype ", weight.scalar_type(),
                ", got ", bias->scalar_type());
    check_same_device(*bias, "bias", weight, "weight");
  }
}

at::Tensor grouped_linear_meta(const at::Tensor& x, const at::Tensor& expert_offsets, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
  check_grouped_linear(x, expert_offsets, weight, bias);
  return x.new_empty_symint({x.sym_size(0), weight.sym_size(1)});
}

#ifdef FASTMOE_WITH_CUDA_OPS
// The backend for x and weight (and grad_y in the backward) on their GPU (expert_backend.h).
GroupedGemmBackend backend_for(const at::Tensor& in, const at::Tensor& w, const at::Tensor* gy) {
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(in.device().index());
  return choose_grouped_gemm_backend(in, w, gy, props->major, props->minor);
}

// torch's grouped GEMM takes the cumulative end of each group as int32: offsets[1:], converted on the device.
at::Tensor group_ends_int32(const at::Tensor& offsets) {
  return offsets.slice(0, 1).to(at::kInt);
}

// y = x @ W[e]^T per expert through at::_grouped_mm, then bias and zero tail rows (expert_backend.h).
at::Tensor grouped_linear_grouped_mm(const at::Tensor& in, const at::Tensor& offsets, const at::Tensor& w,
                                     const std::optional<at::Tensor>& b) {
  at::Tensor y = at::_grouped_mm(in, w.transpose(1, 2), group_ends_int32(offsets));
  grouped_bias_epilogue_cuda(to_dtype(y, "x"), y.mutable_data_ptr(), y.size(0), y.size(1),
                             offsets.const_data_ptr<int64_t>(), w.size(0), data_or_null(b), current_stream(y));
  return y;
}

#ifdef FASTMOE_WITH_CUTLASS
// The CUTLASS kernels' workspace (per-expert problem sizes, pointers, strides and per-SM TMA descriptors): one
// allocation per call from the caching allocator, which hands the block out again only to work ordered after
// these kernels on the stream.
at::Tensor cutlass_workspace(const at::Tensor& in, int64_t num_experts) {
  const size_t bytes = cutlass_grouped_linear_workspace_bytes(to_dtype(in, "x"), num_experts);
  return at::empty({static_cast<int64_t>(bytes)}, in.options().dtype(at::kByte));
}

// y = x @ W[e]^T + b[e] per expert on CUTLASS's SM90 grouped GEMM, tail rows zero (expert_backend.h).
at::Tensor grouped_linear_cutlass(const at::Tensor& in, const at::Tensor& offsets, const at::Tensor& w,
                                  const std::optional<at::Tensor>& b) {
  at::Tensor y = at::empty({in.size(0), w.size(1)}, in.options());
  at::Tensor workspace = cutlass_workspace(in, w.size(0));
  cutlass_grouped_linear_cuda(to_dtype(in, "x"), in.const_data_ptr(), in.size(0), in.size(1),
                              offsets.const_data_ptr<int64_t>(), w.size(0), w.const_data_ptr(), w.size(1),
                              data_or_null(b), y.mutable_data_ptr(), workspace.mutable_data_ptr(),
                              static_cast<size_t>(workspace.numel()), current_stream(in));
  return y;
}
#endif
#endif

// CPU path: per-expert GEMMs through ATen's BLAS (at::mm / at::addmm) on the row slices of each expert. The
// offsets live on the CPU, so reading them costs nothing; they are validated first with the reference's check.
// Rows past offsets[E] get zeros, as in the reference (csrc/ref/expert_ref.cpp stays the ground truth of the
// tests). Each output row block is a contiguous slice, so the GEMMs write in place without copies.
void check_offsets_cpu(const at::Tensor& offsets, int64_t num_experts, int64_t num_rows) {
  call_kernel([&] { check_expert_offsets_ref(offsets.const_data_ptr<int64_t>(), num_experts, num_rows); });
}

at::Tensor grouped_linear_cpu(const at::Tensor& in, const at::Tensor& offsets, const at::Tensor& w,
                              const std::optional<at::Tensor>& b) {
  const int64_t num_rows = in.size(0), num_experts = w.size(0);
  check_offsets_cpu(offsets, num_experts, num_rows);
  const int64_t* bounds = offsets.const_data_ptr<int64_t>();
  at::Tensor y = at::empty({num_rows, w.size(1)}, in.options());
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t rows = bounds[e + 1] - bounds[e];
    if (rows == 0) continue;
    at::Tensor y_e = y.narrow(0, bounds[e], rows);
    const at::Tensor x_e = in.narrow(0, bounds[e], rows), w_t = w.select(0, e).t();
    if (b.has_value()) {
      at::addmm_out(y_e, b->select(0, e), x_e, w_t);
    } else {
      at::mm_out(y_e, x_e, w_t);
    }
  }
  y.narrow(0, bounds[num_experts], num_rows - bounds[num_experts]).zero_();
  return y;
}

// grad_x[rows of e] = grad_y[rows of e] @ W[e]; grad_W[e] = grad_y[rows of e]^T @ x[rows of e]; grad_b[e] = the
// column sums of grad_y[rows of e]. Experts without rows get exactly zero weight and bias gradients.
void grouped_linear_backward_cpu(const at::Tensor& gy, const at::Tensor& in, const at::Tensor& offsets,
                                 const at::Tensor& w, at::Tensor* grad_x, at::Tensor* grad_w, at::Tensor* grad_b) {
  const int64_t num_rows = in.size(0), num_experts = w.size(0);
  check_offsets_cpu(offsets, num_experts, num_rows);
  const int64_t* bounds = offsets.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t rows = bounds[e + 1] - bounds[e];
    if (rows == 0) {
      if (grad_w != nullptr) grad_w->select(0, e).zero_();
      if (grad_b != nullptr) grad_b->select(0, e).zero_();
      continue;
    }
    const at::Tensor gy_e = gy.narrow(0, bounds[e], rows), x_e = in.narrow(0, bounds[e], rows);
    if (grad_x != nullptr) {
      at::Tensor gx_e = grad_x->narrow(0, bounds[e], rows);
      at::mm_out(gx_e, gy_e, w.select(0, e));
    }
    if (grad_w != nullptr) {
      at::Tensor gw_e = grad_w->select(0, e);
      at::mm_out(gw_e, gy_e.t(), x_e);
    }
    if (grad_b != nullptr) {
      at::Tensor gb_e = grad_b->select(0, e);
      at::sum_out(gb_e, gy_e, {0});
    }
  }
  if (grad_x != nullptr) grad_x->narrow(0, bounds[num_experts], num_rows - bounds[num_experts]).zero_();
}

at::Tensor grouped_linear_kernel(const at::Tensor& x, const at::Tensor& expert_offsets, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias) {
  check_grouped_linear(x, expert_offsets, weight, bias);
  const c10::OptionalDeviceGuard guard(x.device());
  const at::Tensor in = x.contiguous(), offsets = expert_offsets.contiguous(), w = weight.contiguous();
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
#ifdef FASTMOE_WITH_CUDA_OPS
  if (in.is_cuda()) {
    const GroupedGemmBackend backend = backend_for(in, w, nullptr);
    if (backend == GroupedGemmBackend::kTorchGroupedMm) {
      return call_kernel([&] { return grouped_linear_grouped_mm(in, offsets, w, b); });
    }
#ifdef FASTMOE_WITH_CUTLASS
    if (backend == GroupedGemmBackend::kCutlass) {
      return call_kernel([&] { return grouped_linear_cutlass(in, offsets, w, b); });
    }
#endif
  }
#endif
  // Deterministic mode takes the reference on the CPU: its rows do not depend on how many rows an expert has,
  // while a BLAS GEMM's blocking (and so its rounding) can.
  if (!in.is_cuda() && !fastmoe::deterministic()) return grouped_linear_cpu(in, offsets, w, b);
  at::Tensor y = at::empty({in.size(0), w.size(1)}, in.options());
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (in.is_cuda()) {
      return grouped_linear_cuda(to_dtype(in, "x"), in.const_data_ptr(), in.size(0), in.size(1),
                                 offsets.const_data_ptr<int64_t>(), w.size(0), w.const_data_ptr(), w.size(1),
                                 data_or_null(b), y.mutable_data_ptr(), current_stream(in));
    }
#endif
    grouped_linear_ref(to_dtype(in, "x"), in.const_data_ptr(), in.size(0), in.size(1),
                       offsets.const_data_ptr<int64_t>(), w.size(0), w.const_data_ptr(), w.size(1), data_or_null(b),
                       y.mutable_data_ptr());
  });
  return y;
}

void check_grouped_linear_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& expert_offsets,
                                   const at::Tensor& weight) {
  check_grouped_linear(x, expert_offsets, weight, std::nullopt);
  check_float(grad_y, "grad_y");
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.sym_size(0) == x.sym_size(0) && grad_y.sym_size(1) == weight.sym_size(1),
              "grad_y must be [num_rows, out_features] = [", x.sym_size(0), ", ", weight.sym_size(1), "], got ",
              grad_y.sym_sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "grad_y must have x's dtype ", x.scalar_type(), ", got ",
              grad_y.scalar_type());
  check_same_device(grad_y, "grad_y", x, "x");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_linear_backward_meta(const at::Tensor& grad_y,
                                                                            const at::Tensor& x,
                                                                            const at::Tensor& expert_offsets,
                                                                            const at::Tensor& weight,
                                                                            std::array<bool, 3> output_mask) {
  check_grouped_linear_backward(grad_y, x, expert_offsets, weight);
  return {output_mask[0] ? x.new_empty_symint(x.sym_sizes()) : x.new_empty({0}),
          output_mask[1] ? weight.new_empty_symint(weight.sym_sizes()) : weight.new_empty({0}),
          output_mask[2] ? weight.new_empty_symint({weight.sym_size(0), weight.sym_size(1)}) : weight.new_empty({0})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_linear_backward_kernel(const at::Tensor& grad_y,
                                                                              const at::Tensor& x,
                                                                              const at::Tensor& expert_offsets,
                                                                              const at::Tensor& weight,
                                                                              std::array<bool, 3> output_mask) {
  // 1. Allocate only the masked-in gradients.  2. On the grouped_mm and cutlass backends: grad_x = grad_y @ W[e]
  // and grad_W[e] = grad_y[rows of e]^T @ x[rows of e] as grouped GEMMs, then the epilogues; grad_b (and every
  // gradient on the tiled backend) from fastmoe's tiled kernel or the reference.
  check_grouped_linear_backward(grad_y, x, expert_offsets, weight);
  const c10::OptionalDeviceGuard guard(x.device());
  // x's values are read for grad_weight alone: without it x stays as it is (a shape_only tensor is not copied out).
  const at::Tensor gy = grad_y.contiguous(), in = output_mask[1] ? x.contiguous() : x,
                   offsets = expert_offsets.contiguous(), w = weight.contiguous();
  const int64_t num_experts = w.size(0), out_features = w.size(1);
  at::Tensor grad_x = output_mask[0] ? at::empty(in.sizes(), in.options()) : in.new_empty({0});
  at::Tensor grad_w = output_mask[1] ? at::empty_like(w) : w.new_empty({0});
  at::Tensor grad_b = output_mask[2] ? at::empty({num_experts, out_features}, w.options()) : w.new_empty({0});
  if (!in.is_cuda() && !fastmoe::deterministic()) {
    grouped_linear_backward_cpu(gy, in, offsets, w, output_mask[0] ? &grad_x : nullptr,
                                output_mask[1] ? &grad_w : nullptr, output_mask[2] ? &grad_b : nullptr);
    return {grad_x, grad_w, grad_b};
  }
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (in.is_cuda()) {
      bool library_x = false, library_w = false, library_b = false;
      const GroupedGemmBackend backend = backend_for(in, w, &gy);
      if (backend == GroupedGemmBackend::kTorchGroupedMm) {
        const at::Tensor ends = group_ends_int32(offsets);
        const auto stream = current_stream(in);
        if (output_mask[0]) {
          grad_x = at::_grouped_mm(gy, w, ends);
          grouped_bias_epilogue_cuda(to_dtype(in, "x"), grad_x.mutable_data_ptr(), grad_x.size(0), grad_x.size(1),
                                     offsets.const_data_ptr<int64_t>(), num_experts, nullptr, stream);
          library_x = true;
        }
        if (output_mask[1]) {
          grad_w = at::_grouped_mm(gy.t(), in, ends);
          zero_empty_groups_cuda(grad_w.mutable_data_ptr(), num_experts,
                                 out_features * in.size(1) * static_cast<int64_t>(grad_w.element_size()),
                                 offsets.const_data_ptr<int64_t>(), stream);
          library_w = true;
        }
      }
#ifdef FASTMOE_WITH_CUTLASS
      if (backend == GroupedGemmBackend::kCutlass && (output_mask[0] || output_mask[1])) {
        // The bias gradient comes from the launch that prepares the GEMMs (cutlass_grouped.h).
        at::Tensor workspace = cutlass_workspace(in, num_experts);
        cutlass_grouped_linear_backward_cuda(
            to_dtype(in, "x"), gy.const_data_ptr(), in.const_data_ptr(), in.size(0), in.size(1),
            offsets.const_data_ptr<int64_t>(), num_experts, w.const_data_ptr(), out_features,
            output_mask[0] ? grad_x.mutable_data_ptr() : nullptr, output_mask[1] ? grad_w.mutable_data_ptr() : nullptr,
            output_mask[2] ? grad_b.mutable_data_ptr() : nullptr, workspace.mutable_data_ptr(),
            static_cast<size_t>(workspace.numel()), current_stream(in));
        library_x = output_mask[0];
        library_w = output_mask[1];
        library_b = output_mask[2];
      }
#endif
      if ((output_mask[0] && !library_x) || (output_mask[1] && !library_w) || (output_mask[2] && !library_b)) {
        grouped_linear_backward_cuda(to_dtype(in, "x"), gy.const_data_ptr(), in.const_data_ptr(), in.size(0),
                                     in.size(1), offsets.const_data_ptr<int64_t>(), num_experts, w.const_data_ptr(),
                                     out_features, output_mask[0] && !library_x ? grad_x.mutable_data_ptr() : nullptr,
                                     output_mask[1] && !library_w ? grad_w.mutable_data_ptr() : nullptr,
                                     output_mask[2] && !library_b ? grad_b.mutable_data_ptr() : nullptr,
                                     current_stream(in));
      }
      return;
    }
#endif
    grouped_linear_backward_ref(to_dtype(in, "x"), gy.const_data_ptr(), in.const_data_ptr(), in.size(0), in.size(1),
                                offsets.const_data_ptr<int64_t>(), num_experts, w.const_data_ptr(), out_features,
                                output_mask[0] ? grad_x.mutable_data_ptr() : nullptr,
                                output_mask[1] ? grad_w.mutable_data_ptr() : nullptr,
                                output_mask[2] ? grad_b.mutable_data_ptr() : nullptr);
  });
  return {grad_x, grad_w, grad_b};
}

// ------------------------------------------------------------------------------------------------ swiglu

// h [..., 2 * hidden] -> [..., hidden]: the sizes of swiglu's output.
std::vector<c10::SymInt> swiglu_out_sizes(const at::Tensor& h) {
  std::vector<c10::SymInt> sizes(h.sym_sizes().begin(), h.sym_sizes().end());
  sizes.back() = sizes.back() / 2;
  return sizes;
}

// Rows of h viewed as [rows, 2 * hidden] (the product of the leading sizes; 1 for a 1-dim h).
int64_t swiglu_rows(const at::Tensor& h) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < h.dim(); ++i) rows *= h.size(i);
  return rows;
}

// The scale as the kernels read it: [rows] in the accumulation type of h's dtype, contiguous.
at::Tensor kernel_scale(const at::Tensor& h, const at::Tensor& scale) {
  return scale.to(h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

at::Tensor swiglu_meta(const at::Tensor& h, const std::optional<at::Tensor>& scale) {
  ops::check_swiglu(h, scale);
  return h.new_empty_symint(swiglu_out_sizes(h));
}

at::Tensor swiglu_kernel(const at::Tensor& h, const std::optional<at::Tensor>& scale) {
  ops::check_swiglu(h, scale);
  const c10::OptionalDeviceGuard guard(h.device());
  const at::Tensor in = h.contiguous();
  const at::Tensor sc = scale ? kernel_scale(in, *scale) : at::Tensor();
  const void* sc_ptr = sc.defined() ? sc.const_data_ptr() : nullptr;
  at::Tensor out = at::empty_symint(swiglu_out_sizes(in), in.options());
  const int64_t rows = swiglu_rows(in), hidden = in.size(-1) / 2;
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (in.is_cuda()) {
      return swiglu_cuda(to_dtype(in, "h"), in.const_data_ptr(), rows, hidden, out.mutable_data_ptr(),
                         current_stream(in), sc_ptr);
    }
#endif
    swiglu_ref(to_dtype(in, "h"), in.const_data_ptr(), rows, hidden, out.mutable_data_ptr(), sc_ptr);
  });
  return out;
}

at::Tensor swiglu_backward_meta(const at::Tensor& grad, const at::Tensor& h) {
  ops::check_swiglu_backward(grad, h);
  return at::empty_like(h, at::MemoryFormat::Contiguous);
}

// grad_h, and grad_scale in the accumulation type when scale is defined.
std::tuple<at::Tensor, at::Tensor> swiglu_backward_run(const at::Tensor& grad, const at::Tensor& h,
                                                       const at::Tensor& scale) {
  const c10::OptionalDeviceGuard guard(h.device());
  const at::Tensor in = h.contiguous(), gy = grad.contiguous();
  const at::Tensor sc = scale.defined() ? kernel_scale(in, scale) : at::Tensor();
  at::Tensor grad_h = at::empty_like(in, at::MemoryFormat::Contiguous);
  at::Tensor grad_sc = sc.defined() ? at::empty_like(sc) : at::Tensor();
  const void* sc_ptr = sc.defined() ? sc.const_data_ptr() : nullptr;
  void* grad_sc_ptr = grad_sc.defined() ? grad_sc.mutable_data_ptr() : nullptr;
  const int64_t rows = swiglu_rows(in), hidden = in.size(-1) / 2;
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (in.is_cuda()) {
      return swiglu_backward_cuda(to_dtype(in, "h"), gy.const_data_ptr(), in.const_data_ptr(), rows, hidden,
                                  grad_h.mutable_data_ptr(), current_stream(in), sc_ptr, grad_sc_ptr);
    }
#endif
    swiglu_backward_ref(to_dtype(in, "h"), gy.const_data_ptr(), in.const_data_ptr(), rows, hidden,
                        grad_h.mutable_data_ptr(), sc_ptr, grad_sc_ptr);
  });
  return {grad_h, grad_sc};
}

at::Tensor swiglu_backward_kernel(const at::Tensor& grad, const at::Tensor& h) {
  ops::check_swiglu_backward(grad, h);
  return std::get<0>(swiglu_backward_run(grad, h, at::Tensor()));
}

std::tuple<at::Tensor, at::Tensor> swiglu_scaled_backward_meta(const at::Tensor& grad, const at::Tensor& h,
                                                               const at::Tensor& scale) {
  ops::check_swiglu_backward(grad, h, scale);
  return {at::empty_like(h, at::MemoryFormat::Contiguous), at::empty_like(scale, at::MemoryFormat::Contiguous)};
}

std::tuple<at::Tensor, at::Tensor> swiglu_scaled_backward_kernel(const at::Tensor& grad, const at::Tensor& h,
                                                                 const at::Tensor& scale) {
  ops::check_swiglu_backward(grad, h, scale);
  auto [grad_h, grad_sc] = swiglu_backward_run(grad, h, scale);
  return {grad_h, grad_sc.to(scale.scalar_type())};  // kernel_scale kept the scale's shape
}

// ------------------------------------------------------------------------------------------------ gelu_backward_bias

void check_gelu_backward_bias(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& expert_offsets) {
  check_float(h, "h");
  check_dim(h, 2, "h", "[num_rows, hidden]");
  check_float(grad, "grad");
  TORCH_CHECK(grad.sym_sizes() == h.sym_sizes(), "grad must have h's shape ", h.sym_sizes(), ", got ",
              grad.sym_sizes());
  TORCH_CHECK(grad.scalar_type() == h.scalar_type(), "grad must have h's dtype ", h.scalar_type(), ", got ",
              grad.scalar_type());
  check_int64(expert_offsets, "expert_offsets");
  check_dim(expert_offsets, 1, "expert_offsets", "[num_experts + 1]");
  TORCH_CHECK_VALUE(expert_offsets.sym_size(0) >= 1, "expert_offsets must have num_experts + 1 >= 1 entries, got ",
                    expert_offsets.sym_sizes());
  check_same_device(grad, "grad", h, "h");
  check_same_device(expert_offsets, "expert_offsets", h, "h");
}

std::tuple<at::Tensor, at::Tensor> gelu_backward_bias_meta(const at::Tensor& grad, const at::Tensor& h,
                                                           const at::Tensor& expert_offsets) {
  check_gelu_backward_bias(grad, h, expert_offsets);
  return {h.new_empty_symint(h.sym_sizes()), h.new_empty_symint({expert_offsets.sym_size(0) - 1, h.sym_size(1)})};
}

std::tuple<at::Tensor, at::Tensor> gelu_backward_bias_kernel(const at::Tensor& grad, const at::Tensor& h,
                                                             const at::Tensor& expert_offsets) {
  check_gelu_backward_bias(grad, h, expert_offsets);
  const c10::OptionalDeviceGuard guard(h.device());
  at::Tensor in = h.contiguous(), gy = grad.contiguous();
  const at::Tensor offsets = expert_offsets.contiguous();
#ifdef FASTMOE_WITH_CUDA_OPS
  // A view that starts off a 16-byte boundary is copied, so the kernel takes its 16-byte path (and that path's order
  // of sums) whenever the width allows, as the bias gradient of the freshly made grad_h does.
  if (in.is_cuda() && !ops_detail::is_16_byte_aligned(in)) in = in.clone();
  if (gy.is_cuda() && !ops_detail::is_16_byte_aligned(gy)) gy = gy.clone();
#endif
  const int64_t rows = in.size(0), hidden = in.size(1), num_experts = offsets.size(0) - 1;
  at::Tensor grad_h = at::empty_like(in, at::MemoryFormat::Contiguous);
  at::Tensor grad_b = at::empty({num_experts, hidden}, in.options());
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (in.is_cuda()) {
      return gelu_backward_bias_cuda(to_dtype(in, "h"), gy.const_data_ptr(), in.const_data_ptr(), rows, hidden,
                                     offsets.const_data_ptr<int64_t>(), num_experts, grad_h.mutable_data_ptr(),
                                     grad_b.mutable_data_ptr(), current_stream(in));
    }
#endif
    gelu_backward_bias_ref(to_dtype(in, "h"), gy.const_data_ptr(), in.const_data_ptr(), rows, hidden,
                           offsets.const_data_ptr<int64_t>(), num_experts, grad_h.mutable_data_ptr(),
                           grad_b.mutable_data_ptr());
  });
  return {grad_h, grad_b};
}

}  // namespace

namespace ops {

void check_swiglu(const at::Tensor& h, const std::optional<at::Tensor>& scale) {
  check_float(h, "h");
  TORCH_CHECK(h.dim() >= 1, "h must be [..., 2 * hidden] ([gate | up]), got a 0-dim tensor");
  TORCH_CHECK_VALUE(h.sym_size(-1) % 2 == 0,
                    "h must be [..., 2 * hidden] ([gate | up]): its last size must be even, got ", h.sym_sizes());
  if (!scale) return;
  check_float(*scale, "scale");
  const c10::SymIntArrayRef rows = h.sym_sizes().slice(0, h.dim() - 1);
  TORCH_CHECK_VALUE(scale->sym_sizes() == rows, "scale must have h's leading shape ", rows,
                    " (one factor per row of h ", h.sym_sizes(), "), got ", scale->sym_sizes());
  check_same_device(*scale, "scale", h, "h");
}

void check_swiglu_backward(const at::Tensor& grad, const at::Tensor& h, const std::optional<at::Tensor>& scale) {
  check_swiglu(h, scale);
  check_float(grad, "grad");
  const std::vector<c10::SymInt> expected = swiglu_out_sizes(h);
  TORCH_CHECK(grad.sym_sizes() == c10::SymIntArrayRef(expected), "grad must have swiglu's output shape ",
              c10::SymIntArrayRef(expected), " for h of shape ", h.sym_sizes(), ", got ", grad.sym_sizes());
  TORCH_CHECK(grad.scalar_type() == h.scalar_type(), "grad must have h's dtype ", h.scalar_type(), ", got ",
              grad.scalar_type());
  check_same_device(grad, "grad", h, "h");
}

at::Tensor swiglu(const at::Tensor& h, const std::optional<at::Tensor>& scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::swiglu", "")
                       .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op.call(h, scale);
}

at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& h) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::swiglu_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad, h);
}

std::tuple<at::Tensor, at::Tensor> swiglu_scaled_backward(const at::Tensor& grad, const at::Tensor& h,
                                                          const at::Tensor& scale) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmoe::swiglu_scaled_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad, h, scale);
}

std::tuple<at::Tensor, at::Tensor> gelu_backward_bias(const at::Tensor& grad, const at::Tensor& h,
                                                      const at::Tensor& expert_offsets) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmoe::gelu_backward_bias", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad, h, expert_offsets);
}

at::Tensor grouped_linear(const at::Tensor& x, const at::Tensor& expert_offsets, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::grouped_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&)>();
  return op.call(x, expert_offsets, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_linear_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                       const at::Tensor& expert_offsets,
                                                                       const at::Tensor& weight,
                                                                       std::array<bool, 3> output_mask) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmoe::grouped_linear_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, std::array<bool, 3>)>();
  return op.call(grad_y, x, expert_offsets, weight, output_mask);
}

}  // namespace ops

TORCH_LIBRARY_IMPL(fastmoe, CPU, m) {
  m.impl("grouped_linear", &grouped_linear_kernel);
  m.impl("grouped_linear_backward", &grouped_linear_backward_kernel);
  m.impl("swiglu", &swiglu_kernel);
  m.impl("swiglu_backward", &swiglu_backward_kernel);
  m.impl("swiglu_scaled_backward", &swiglu_scaled_backward_kernel);
  m.impl("gelu_backward_bias", &gelu_backward_bias_kernel);
}

#ifdef FASTMOE_WITH_CUDA_OPS
TORCH_LIBRARY_IMPL(fastmoe, CUDA, m) {
  m.impl("grouped_linear", &grouped_linear_kernel);
  m.impl("grouped_linear_backward", &grouped_linear_backward_kernel);
  m.impl("swiglu", &swiglu_kernel);
  m.impl("swiglu_backward", &swiglu_backward_kernel);
  m.impl("swiglu_scaled_backward", &swiglu_scaled_backward_kernel);
  m.impl("gelu_backward_bias", &gelu_backward_bias_kernel);
}
#endif

TORCH_LIBRARY_IMPL(fastmoe, Meta, m) {
  m.impl("grouped_linear", &grouped_linear_meta);
  m.impl("grouped_linear_backward", &grouped_linear_backward_meta);
  m.impl("swiglu", &swiglu_meta);
  m.impl("swiglu_backward", &swiglu_backward_meta);
  m.impl("swiglu_scaled_backward", &swiglu_scaled_backward_meta);
  m.impl("gelu_backward_bias", &gelu_backward_bias_meta);
}

}  // namespace fastmoe
