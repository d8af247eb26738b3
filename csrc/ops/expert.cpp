// Expert stage: CPU and Meta kernels of grouped_linear and grouped_linear_backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "fastmoe/ops.h"
#include "ops/common.h"
#include "ops/internal.h"
#include "ref/expert_ref.h"

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
  TORCH_CHECK(expert_offsets.sym_size(0) == weight.sym_size(0) + 1, "expert_offsets must have num_experts + 1 = ",
              weight.sym_size(0) + 1, " entries for weight of shape ", weight.sym_sizes(), ", got ",
              expert_offsets.sym_size(0));
  TORCH_CHECK(x.sym_size(1) == weight.sym_size(2), "x has ", x.sym_size(1), " features but weight expects ",
              weight.sym_size(2), " (weight shape ", weight.sym_sizes(), ")");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must share a dtype, got ", x.scalar_type(),
              " and ", weight.scalar_type());
  check_same_device(x, "x", weight, "weight");
  check_same_device(x, "x", expert_offsets, "expert_offsets");
  if (bias.has_value() && bias->defined()) {
    check_float(*bias, "bias");
    TORCH_CHECK(bias->dim() == 2 && bias->sym_size(0) == weight.sym_size(0) && bias->sym_size(1) == weight.sym_size(1),
                "bias must be [num_experts, out_features] = [", weight.sym_size(0), ", ", weight.sym_size(1),
                "], got ", bias->sym_sizes());
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

at::Tensor grouped_linear_cpu(const at::Tensor& x, const at::Tensor& expert_offsets, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  check_grouped_linear(x, expert_offsets, weight, bias);
  const at::Tensor in = x.contiguous(), offsets = expert_offsets.contiguous(), w = weight.contiguous();
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  at::Tensor y = at::empty({in.size(0), w.size(1)}, in.options());
  call_ref([&] {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_linear_backward_cpu(const at::Tensor& grad_y,
                                                                           const at::Tensor& x,
                                                                           const at::Tensor& expert_offsets,
                                                                           const at::Tensor& weight,
                                                                           std::array<bool, 3> output_mask) {
  check_grouped_linear_backward(grad_y, x, expert_offsets, weight);
  const at::Tensor gy = grad_y.contiguous(), in = x.contiguous(), offsets = expert_offsets.contiguous(),
                   w = weight.contiguous();
  const int64_t num_experts = w.size(0), out_features = w.size(1);
  at::Tensor grad_x = output_mask[0] ? at::empty_like(in) : in.new_empty({0});
  at::Tensor grad_w = output_mask[1] ? at::empty_like(w) : w.new_empty({0});
  at::Tensor grad_b = output_mask[2] ? at::empty({num_experts, out_features}, w.options()) : w.new_empty({0});
  call_ref([&] {
    grouped_linear_backward_ref(to_dtype(in, "x"), gy.const_data_ptr(), in.const_data_ptr(), in.size(0),
                                in.size(1), offsets.const_data_ptr<int64_t>(), num_experts, w.const_data_ptr(),
                                out_features, output_mask[0] ? grad_x.mutable_data_ptr() : nullptr,
                                output_mask[1] ? grad_w.mutable_data_ptr() : nullptr,
                                output_mask[2] ? grad_b.mutable_data_ptr() : nullptr);
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

namespace ops {

at::Tensor grouped_linear(const at::Tensor& x, const at::Tensor& expert_offsets, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::grouped_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&)>();
  return op.call(x, expert_offsets, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_linear_backward(const at::Tensor& grad_y,
                                                                       const at::Tensor& x,
                                                                       const at::Tensor& expert_offsets,
                                                                       const at::Tensor& weight,
                                                                       std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::grouped_linear_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           std::array<bool, 3>)>();
  return op.call(grad_y, x, expert_offsets, weight, output_mask);
}

}  // namespace ops

TORCH_LIBRARY_IMPL(fastmoe, CPU, m) {
  m.impl("grouped_linear", &grouped_linear_cpu);
  m.impl("grouped_linear_backward", &grouped_linear_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastmoe, Meta, m) {
  m.impl("grouped_linear", &grouped_linear_meta);
  m.impl("grouped_linear_backward", &grouped_linear_backward_meta);
}

}  // namespace fastmoe
