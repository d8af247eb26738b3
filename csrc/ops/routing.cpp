// Routing stage: schema, CPU and Meta kernels of route_topk and route_topk_backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "fastmoe/ops.h"
#include "ops/common.h"
#include "ops/internal.h"
#include "ref/routing_ref.h"
#ifdef FASTMOE_WITH_CUDA_OPS
#include "kernels/routing/routing.h"
#endif

namespace fastmoe {
namespace {

using namespace ops_detail;

void check_route_topk(const at::Tensor& logits, int64_t k, c10::string_view score_fn) {
  check_float(logits, "logits");
  check_dim(logits, 2, "logits", "[num_tokens, num_experts]");
  const c10::SymInt num_experts = logits.sym_size(1);
  TORCH_CHECK(num_experts >= 1, "logits must have at least one expert column, got shape ", logits.sym_sizes());
  TORCH_CHECK(k >= 1 && num_experts >= k, "k must be in [1, num_experts=", num_experts, "], got k=", k);
  parse_score_fn(score_fn);
}

std::tuple<at::Tensor, at::Tensor> route_topk_meta(const at::Tensor& logits, int64_t k, c10::string_view score_fn) {
  check_route_topk(logits, k, score_fn);
  const c10::SymInt num_tokens = logits.sym_size(0);
  return {logits.new_empty_symint({num_tokens, k}, logits.options().dtype(at::kLong)),
          logits.new_empty_symint({num_tokens, k})};
}

// CPU and CUDA: the same checks and allocation, then the reference or the CUDA kernel on the current stream.
std::tuple<at::Tensor, at::Tensor> route_topk_kernel(const at::Tensor& logits, int64_t k, c10::string_view score_fn) {
  check_route_topk(logits, k, score_fn);
  const c10::OptionalDeviceGuard guard(logits.device());
  const at::Tensor input = logits.contiguous();
  const int64_t num_tokens = input.size(0), num_experts = input.size(1);
  at::Tensor topk_idx = at::empty({num_tokens, k}, input.options().dtype(at::kLong));
  at::Tensor topk_score = at::empty({num_tokens, k}, input.options());
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (input.is_cuda()) {
      return route_topk_cuda(to_dtype(input, "logits"), input.const_data_ptr(), num_tokens, num_experts, k,
                             parse_score_fn(score_fn), topk_idx.mutable_data_ptr<int64_t>(),
                             topk_score.mutable_data_ptr(), current_stream(input));
    }
#endif
    route_topk_ref(to_dtype(input, "logits"), input.const_data_ptr(), num_tokens, num_experts, k,
                   parse_score_fn(score_fn), topk_idx.mutable_data_ptr<int64_t>(), topk_score.mutable_data_ptr());
  });
  return {topk_idx, topk_score};
}

void check_route_topk_backward(const at::Tensor& grad_score, const at::Tensor& logits, const at::Tensor& topk_idx,
                               const at::Tensor& topk_score, c10::string_view score_fn) {
  check_float(logits, "logits");
  check_dim(logits, 2, "logits", "[num_tokens, num_experts]");
  check_float(grad_score, "grad_score");
  check_float(topk_score, "topk_score");
  check_int64(topk_idx, "topk_idx");
  check_dim(topk_idx, 2, "topk_idx", "[num_tokens, k]");
  TORCH_CHECK(topk_idx.sym_size(0) == logits.sym_size(0), "topk_idx has ", topk_idx.sym_size(0),
              " tokens but logits has ", logits.sym_size(0));
  TORCH_CHECK(grad_score.sym_sizes() == topk_idx.sym_sizes(), "grad_score must match topk_idx's shape ",
              topk_idx.sym_sizes(), ", got ", grad_score.sym_sizes());
  TORCH_CHECK(topk_score.sym_sizes() == topk_idx.sym_sizes(), "topk_score must match topk_idx's shape ",
              topk_idx.sym_sizes(), ", got ", topk_score.sym_sizes());
  TORCH_CHECK(grad_score.scalar_type() == logits.scalar_type() && topk_score.scalar_type() == logits.scalar_type(),
              "grad_score and topk_score must have logits' dtype ", logits.scalar_type(), ", got ",
              grad_score.scalar_type(), " and ", topk_score.scalar_type());
  check_same_device(grad_score, "grad_score", logits, "logits");
  check_same_device(topk_idx, "topk_idx", logits, "logits");
  check_same_device(topk_score, "topk_score", logits, "logits");
  parse_score_fn(score_fn);
}

at::Tensor route_topk_backward_meta(const at::Tensor& grad_score, const at::Tensor& logits, const at::Tensor& topk_idx,
                                    const at::Tensor& topk_score, c10::string_view score_fn) {
  check_route_topk_backward(grad_score, logits, topk_idx, topk_score, score_fn);
  return at::empty_like(logits, at::MemoryFormat::Contiguous);
}

at::Tensor route_topk_backward_kernel(const at::Tensor& grad_score, const at::Tensor& logits,
                                      const at::Tensor& topk_idx, const at::Tensor& topk_score,
                                      c10::string_view score_fn) {
  check_route_topk_backward(grad_score, logits, topk_idx, topk_score, score_fn);
  const c10::OptionalDeviceGuard guard(logits.device());
  // Where the logits' values are not read, the caller may pass a tensor that holds just their sizes
  // (ops::shape_only: strides 0), which must not be copied out to [T, E] here.
  const at::Tensor l = score_grad_reads_logits(score_fn) ? logits.contiguous() : logits, g = grad_score.contiguous(),
                   idx = topk_idx.contiguous(), s = topk_score.contiguous();
  at::Tensor grad_logits = at::empty(l.sizes(), l.options());
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (l.is_cuda()) {
      return route_topk_backward_cuda(to_dtype(l, "logits"), g.const_data_ptr(), l.const_data_ptr(),
                                      idx.const_data_ptr<int64_t>(), s.const_data_ptr(), l.size(0), l.size(1),
                                      idx.size(1), parse_score_fn(score_fn), grad_logits.mutable_data_ptr(),
                                      current_stream(l));
    }
#endif
    route_topk_backward_ref(to_dtype(l, "logits"), g.const_data_ptr(), l.const_data_ptr(),
                            idx.const_data_ptr<int64_t>(), s.const_data_ptr(), l.size(0), l.size(1), idx.size(1),
                            parse_score_fn(score_fn), grad_logits.mutable_data_ptr());
  });
  return grad_logits;
}

}  // namespace

namespace ops {

std::tuple<at::Tensor, at::Tensor> route_topk(const at::Tensor& logits, int64_t k, const std::string& score_fn) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::route_topk", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, c10::string_view)>();
  return op.call(logits, k, score_fn);
}

at::Tensor route_topk_backward(const at::Tensor& grad_score, const at::Tensor& logits, const at::Tensor& topk_idx,
                               const at::Tensor& topk_score, const std::string& score_fn) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::route_topk_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         c10::string_view)>();
  return op.call(grad_score, logits, topk_idx, topk_score, score_fn);
}

}  // namespace ops

TORCH_LIBRARY_IMPL(fastmoe, CPU, m) {
  m.impl("route_topk", &route_topk_kernel);
  m.impl("route_topk_backward", &route_topk_backward_kernel);
}

#ifdef FASTMOE_WITH_CUDA_OPS
TORCH_LIBRARY_IMPL(fastmoe, CUDA, m) {
  m.impl("route_topk", &route_topk_kernel);
  m.impl("route_topk_backward", &route_topk_backward_kernel);
}
#endif

TORCH_LIBRARY_IMPL(fastmoe, Meta, m) {
  m.impl("route_topk", &route_topk_meta);
  m.impl("route_topk_backward", &route_topk_backward_meta);
}

}  // namespace fastmoe
