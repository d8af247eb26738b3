// Dispatch stage: CPU, CUDA and Meta kernels of make_plan, permute, unpermute_combine and its backward, and
// ep_route.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>

#include "fastmoe/ops.h"
#include "ops/common.h"
#include "ops/internal.h"
#include "ref/dispatch_ref.h"
#ifdef FASTMOE_WITH_CUDA_OPS
#include <cstdlib>

#include "kernels/dispatch/dispatch.h"
#endif

namespace fastmoe {
namespace {

using namespace ops_detail;

// ------------------------------------------------------------------------------------------------ make_plan

void check_make_plan(const at::Tensor& topk_idx, int64_t num_experts) {
  check_int64(topk_idx, "topk_idx");
  check_dim(topk_idx, 2, "topk_idx", "[num_tokens, k]");
  TORCH_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  // The CUDA plan sorts 32-bit keys; checking here, before the [num_experts] outputs are allocated, gives every
  // device (Meta included) the same error instead of an allocator failure.
  TORCH_CHECK(num_experts < std::numeric_limits<int32_t>::max(), "num_experts must be < 2^31 - 1, got ", num_experts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_plan_meta(const at::Tensor& topk_idx,
                                                                          int64_t num_experts) {
  check_make_plan(topk_idx, num_experts);
  const auto opts = topk_idx.options();
  return {topk_idx.new_empty({num_experts}, opts), topk_idx.new_empty({num_experts + 1}, opts),
          topk_idx.new_empty_symint({topk_idx.sym_numel()}, opts),
          at::empty_like(topk_idx, at::MemoryFormat::Contiguous)};
}

#ifdef FASTMOE_WITH_CUDA_OPS
// The CUDA plan cannot raise on an expert id outside [-1, E) without a host sync, so it drops such pairs and
// counts them on the device. FASTMOE_CHECK_IDS=1 makes every plan read that count (one sync) and raise.
bool check_ids_on_cuda() {
  static const bool enabled = [] {
    const char* value = std::getenv("FASTMOE_CHECK_IDS");
    return value != nullptr && std::string(value) != "0" && std::string(value) != "";
  }();
  return enabled;
}

void make_plan_cuda_op(const at::Tensor& idx, int64_t num_experts, at::Tensor& counts, at::Tensor& offsets,
                       at::Tensor& sorted_pair, at::Tensor& pair_pos) {
  const size_t workspace_bytes = make_plan_cuda_workspace_bytes(idx.numel(), num_experts);
  // A small plan runs in one block without scratch (dispatch.h): no allocation then.
  at::Tensor workspace = workspace_bytes == 0
                             ? at::Tensor()
                             : at::empty({static_cast<int64_t>(workspace_bytes)}, idx.options().dtype(at::kByte));
  // The count of bad ids only when it is read (a zeroed tensor is a kernel launch; the plan runs every forward).
  const bool check_ids = check_ids_on_cuda();
  at::Tensor invalid = check_ids ? at::zeros({1}, idx.options()) : at::Tensor();
  make_plan_cuda(idx.const_data_ptr<int64_t>(), idx.numel(), num_experts, counts.mutable_data_ptr<int64_t>(),
                 offsets.mutable_data_ptr<int64_t>(), sorted_pair.mutable_data_ptr<int64_t>(),
                 pair_pos.mutable_data_ptr<int64_t>(), check_ids ? invalid.mutable_data_ptr<int64_t>() : nullptr,
                 workspace.defined() ? workspace.mutable_data_ptr() : nullptr, workspace_bytes, current_stream(idx));
  if (check_ids) {
    const int64_t num_invalid = invalid.item<int64_t>();
    TORCH_CHECK(num_invalid == 0, "topk_idx holds ", num_invalid, " expert ids outside [-1, num_experts=", num_experts,
                ")");
  }
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_plan_kernel(const at::Tensor& topk_idx,
                                                                            int64_t num_experts) {
  check_make_plan(topk_idx, num_experts);
  const c10::OptionalDeviceGuard guard(topk_idx.device());
  const at::Tensor idx = topk_idx.contiguous();
  const auto opts = idx.options();
  at::Tensor counts = at::empty({num_experts}, opts), offsets = at::empty({num_experts + 1}, opts);
  at::Tensor sorted_pair = at::empty({idx.numel()}, opts), pair_pos = at::empty(idx.sizes(), opts);
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (idx.is_cuda()) return make_plan_cuda_op(idx, num_experts, counts, offsets, sorted_pair, pair_pos);
#endif
    make_plan_ref(idx.const_data_ptr<int64_t>(), idx.numel(), num_experts, counts.mutable_data_ptr<int64_t>(),
                  offsets.mutable_data_ptr<int64_t>(), sorted_pair.mutable_data_ptr<int64_t>(),
                  pair_pos.mutable_data_ptr<int64_t>());
  });
  return {counts, offsets, sorted_pair, pair_pos};
}

// ------------------------------------------------------------------------------------------------ shared checks

// sorted_pair [R] int64 and pair_pos [T, k] int64 describe one plan: R == T * k, or R < T * k when the caller
// keeps only the first R rows (at least the routed pairs, which come first; expert parallelism knows that count).
void check_plan_tensors(const at::Tensor& sorted_pair, const at::Tensor& pair_pos) {
  check_int64(sorted_pair, "sorted_pair");
  check_dim(sorted_pair, 1, "sorted_pair", "[num_tokens * k]");
  check_int64(pair_pos, "pair_pos");
  check_dim(pair_pos, 2, "pair_pos", "[num_tokens, k]");
  TORCH_CHECK(sorted_pair.sym_numel() <= pair_pos.sym_numel(), "sorted_pair has ", sorted_pair.sym_numel(),
              " entries but pair_pos has shape ", pair_pos.sym_sizes(),
              "; both must come from one make_plan (sorted_pair possibly cut to its first routed rows)");
  check_same_device(sorted_pair, "sorted_pair", pair_pos, "pair_pos");
}

void check_rows(const at::Tensor& rows, const char* name, const at::Tensor& sorted_pair) {
  check_float(rows, name);
  check_dim(rows, 2, name, "[num_tokens * k, d]");
  TORCH_CHECK(rows.sym_size(0) == sorted_pair.sym_size(0), name, " has ", rows.sym_size(0), " rows but the plan has ",
              sorted_pair.sym_size(0), " (sorted_pair's length)");
  check_same_device(rows, name, sorted_pair, "sorted_pair");
}

void check_scores(const std::optional<at::Tensor>& topk_score, const at::Tensor& pair_pos) {
  if (!topk_score.has_value() || !topk_score->defined()) return;
  check_float(*topk_score, "topk_score");
  TORCH_CHECK(topk_score->sym_sizes() == pair_pos.sym_sizes(),
              "topk_score must be [num_tokens, k] = ", pair_pos.sym_sizes(), ", got ", topk_score->sym_sizes());
  check_same_device(*topk_score, "topk_score", pair_pos, "pair_pos");
}

// ------------------------------------------------------------------------------------------------ permute
// The ops read sorted_pair one way and pair_pos the other (permute's backward is a combine), so a plan whose two
// halves disagree would give gradients that belong to another forward. On the CPU every call checks them (O(T k),
// beside O(T k d) of data movement); on CUDA that needs a host sync, so FASTMOE_CHECK_IDS=1 turns it on there.
void check_plan_inverse(const at::Tensor& sorted_pair, const at::Tensor& pair_pos) {
  if (sorted_pair.is_meta()) return;
#ifdef FASTMOE_WITH_CUDA_OPS
  if (sorted_pair.is_cuda() && !check_ids_on_cuda()) return;
#endif
  if (!sorted_pair.is_cpu() && !sorted_pair.is_cuda()) return;
  const at::Tensor order = sorted_pair.to(at::kCPU).contiguous(), pos = pair_pos.to(at::kCPU).contiguous();
  call_kernel([&] {
    check_plan_ref(order.const_data_ptr<int64_t>(), order.numel(), pos.const_data_ptr<int64_t>(), pos.numel(),
                   pos.size(1));
  });
}

void check_permute(const at::Tensor& x, const at::Tensor& sorted_pair, const at::Tensor& pair_pos) {
  check_float(x, "x");
  check_dim(x, 2, "x", "[num_tokens, d]");
  check_plan_tensors(sorted_pair, pair_pos);
  TORCH_CHECK(x.sym_size(0) == pair_pos.sym_size(0), "x has ", x.sym_size(0), " tokens but pair_pos has ",
              pair_pos.sym_size(0));
  check_same_device(x, "x", sorted_pair, "sorted_pair");
}

at::Tensor permute_meta(const at::Tensor& x, const at::Tensor& sorted_pair, const at::Tensor& pair_pos) {
  check_permute(x, sorted_pair, pair_pos);
  return x.new_empty_symint({sorted_pair.sym_size(0), x.sym_size(1)});
}

// Shared by permute and the combine's backward (which permutes grad_y scaled by the scores).
at::Tensor permute_scaled(const at::Tensor& x, const at::Tensor& sorted_pair, const at::Tensor& pair_pos,
                          const std::optional<at::Tensor>& pair_scale) {
  const c10::OptionalDeviceGuard guard(x.device());
  const at::Tensor in = x.contiguous(), order = sorted_pair.contiguous();
  const int64_t k = pair_pos.size(1);
  std::optional<at::Tensor> scale;
  if (pair_scale.has_value() && pair_scale->defined()) scale = pair_scale->contiguous();
  at::Tensor out = at::empty({order.size(0), in.size(1)}, in.options());
  const DType scale_dtype = scale.has_value() ? to_dtype(*scale, "topk_score") : DType::kFloat32;
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (in.is_cuda()) {  // with pair_pos: each token's row is read once (dispatch.h)
      const at::Tensor pos = pair_pos.contiguous();
      return permute_cuda(to_dtype(in, "x"), in.const_data_ptr(), in.size(0), in.size(1),
                          order.const_data_ptr<int64_t>(), order.size(0), pos.const_data_ptr<int64_t>(), k,
                          data_or_null(scale), scale_dtype, out.mutable_data_ptr(), current_stream(in));
    }
#endif
    permute_ref(to_dtype(in, "x"), in.const_data_ptr(), in.size(0), in.size(1), order.const_data_ptr<int64_t>(),
                order.size(0), k, data_or_null(scale), scale_dtype, out.mutable_data_ptr());
  });
  return out;
}

at::Tensor permute_kernel(const at::Tensor& x, const at::Tensor& sorted_pair, const at::Tensor& pair_pos) {
  check_permute(x, sorted_pair, pair_pos);
  check_plan_inverse(sorted_pair, pair_pos);
  return permute_scaled(x, sorted_pair, pair_pos, std::nullopt);
}

// ------------------------------------------------------------------------------------------------ combine

void check_combine(const at::Tensor& y_sorted, const at::Tensor& sorted_pair, const at::Tensor& pair_pos,
                   const std::optional<at::Tensor>& topk_score) {
  check_plan_tensors(sorted_pair, pair_pos);
  check_rows(y_sorted, "y_sorted", sorted_pair);
  check_scores(topk_score, pair_pos);
}

at::Tensor unpermute_combine_meta(const at::Tensor& y_sorted, const at::Tensor& sorted_pair, const at::Tensor& pair_pos,
                                  const std::optional<at::Tensor>& topk_score) {
  check_combine(y_sorted, sorted_pair, pair_pos, topk_score);
  return y_sorted.new_empty_symint({pair_pos.sym_size(0), y_sorted.sym_size(1)});
}

at::Tensor unpermute_combine_kernel(const at::Tensor& y_sorted, const at::Tensor& sorted_pair,
                                    const at::Tensor& pair_pos, const std::optional<at::Tensor>& topk_score) {
  check_combine(y_sorted, sorted_pair, pair_pos, topk_score);
  check_plan_inverse(sorted_pair, pair_pos);
  const c10::OptionalDeviceGuard guard(y_sorted.device());
  const at::Tensor rows = y_sorted.contiguous(), pos = pair_pos.contiguous();
  std::optional<at::Tensor> score;
  if (topk_score.has_value() && topk_score->defined()) score = topk_score->contiguous();
  at::Tensor y = at::empty({pos.size(0), rows.size(1)}, rows.options());
  const DType score_dtype = score.has_value() ? to_dtype(*score, "topk_score") : DType::kFloat32;
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (rows.is_cuda()) {
      return unpermute_combine_cuda(to_dtype(rows, "y_sorted"), rows.const_data_ptr(), rows.size(0), rows.size(1),
                                    pos.const_data_ptr<int64_t>(), pos.size(0), pos.size(1), data_or_null(score),
                                    score_dtype, y.mutable_data_ptr(), current_stream(rows));
    }
#endif
    unpermute_combine_ref(to_dtype(rows, "y_sorted"), rows.const_data_ptr(), rows.size(0), rows.size(1),
                          pos.const_data_ptr<int64_t>(), pos.size(0), pos.size(1), data_or_null(score), score_dtype,
                          y.mutable_data_ptr());
  });
  return y;
}

void check_combine_backward(const at::Tensor& grad_y, const at::Tensor& y_sorted, const at::Tensor& sorted_pair,
                            const at::Tensor& pair_pos, const std::optional<at::Tensor>& topk_score,
                            bool need_score_grad) {
  check_combine(y_sorted, sorted_pair, pair_pos, topk_score);
  check_float(grad_y, "grad_y");
  check_dim(grad_y, 2, "grad_y", "[num_tokens, d]");
  TORCH_CHECK(grad_y.sym_size(0) == pair_pos.sym_size(0) && grad_y.sym_size(1) == y_sorted.sym_size(1),
              "grad_y must be [num_tokens, d] = [", pair_pos.sym_size(0), ", ", y_sorted.sym_size(1), "], got ",
              grad_y.sym_sizes());
  TORCH_CHECK(grad_y.scalar_type() == y_sorted.scalar_type(), "grad_y must have y_sorted's dtype ",
              y_sorted.scalar_type(), ", got ", grad_y.scalar_type());
  check_same_device(grad_y, "grad_y", y_sorted, "y_sorted");
  TORCH_CHECK(!need_score_grad || (topk_score.has_value() && topk_score->defined()),
              "need_score_grad=True requires topk_score");
}

std::tuple<at::Tensor, at::Tensor> unpermute_combine_backward_meta(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                                                                   const at::Tensor& sorted_pair,
                                                                   const at::Tensor& pair_pos,
                                                                   const std::optional<at::Tensor>& topk_score,
                                                                   bool need_score_grad) {
  check_combine_backward(grad_y, y_sorted, sorted_pair, pair_pos, topk_score, need_score_grad);
  at::Tensor grad_score =
      need_score_grad ? at::empty_like(*topk_score, at::MemoryFormat::Contiguous) : grad_y.new_empty({0});
  return {y_sorted.new_empty_symint(y_sorted.sym_sizes()), grad_score};
}

std::tuple<at::Tensor, at::Tensor> unpermute_combine_backward_kernel(
    const at::Tensor& grad_y, const at::Tensor& y_sorted, const at::Tensor& sorted_pair, const at::Tensor& pair_pos,
    const std::optional<at::Tensor>& topk_score, bool need_score_grad) {
  // 1. grad_y_sorted[r] = score[p] * grad_y[p / k] for p = sorted_pair[r]: a permute scaled by the scores.
  // 2. grad_score[t, j] = <grad_y[t], y_sorted[pair_pos[t, j]]>, only when asked for.
  check_combine_backward(grad_y, y_sorted, sorted_pair, pair_pos, topk_score, need_score_grad);
  check_plan_inverse(sorted_pair, pair_pos);
  const c10::OptionalDeviceGuard guard(grad_y.device());
  const int64_t k = pair_pos.size(1);
#ifdef FASTMOE_WITH_CUDA_OPS
  if (need_score_grad && grad_y.is_cuda()) {  // both in one kernel, grad_y's rows read once
    const at::Tensor gy = grad_y.contiguous(), rows = y_sorted.contiguous(), pos = pair_pos.contiguous(),
                     order = sorted_pair.contiguous(), score = topk_score->contiguous();
    at::Tensor grad_y_sorted = at::empty({order.size(0), gy.size(1)}, gy.options());
    at::Tensor grad_score = at::empty(pos.sizes(), score.options());
    call_kernel([&] {
      unpermute_combine_backward_cuda(to_dtype(gy, "grad_y"), gy.const_data_ptr(), rows.const_data_ptr(), gy.size(1),
                                      order.const_data_ptr<int64_t>(), order.size(0), pos.const_data_ptr<int64_t>(),
                                      pos.size(0), k, score.const_data_ptr(), to_dtype(score, "topk_score"),
                                      grad_y_sorted.mutable_data_ptr(), grad_score.mutable_data_ptr(),
                                      current_stream(gy));
    });
    return {grad_y_sorted, grad_score};
  }
#endif
  at::Tensor grad_y_sorted = permute_scaled(grad_y, sorted_pair, pair_pos, topk_score);
  if (!need_score_grad) return {grad_y_sorted, grad_y.new_empty({0})};
  const at::Tensor gy = grad_y.contiguous(), rows = y_sorted.contiguous(), pos = pair_pos.contiguous();
  at::Tensor grad_score = at::empty(pos.sizes(), topk_score->options());
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (rows.is_cuda()) {
      return combine_score_grad_cuda(to_dtype(rows, "y_sorted"), gy.const_data_ptr(), rows.const_data_ptr(),
                                     rows.size(0), rows.size(1), pos.const_data_ptr<int64_t>(), pos.size(0), k,
                                     to_dtype(grad_score, "topk_score"), grad_score.mutable_data_ptr(),
                                     current_stream(rows));
    }
#endif
    combine_score_grad_ref(to_dtype(rows, "y_sorted"), gy.const_data_ptr(), rows.const_data_ptr(), rows.size(0),
                           rows.size(1), pos.const_data_ptr<int64_t>(), pos.size(0), k,
                           to_dtype(grad_score, "topk_score"), grad_score.mutable_data_ptr());
  });
  return {grad_y_sorted, grad_score};
}

// ------------------------------------------------------------------------------------------------ ep_route

void check_ep_route(const at::Tensor& topk_idx, int64_t num_local, int64_t world) {
  check_int64(topk_idx, "topk_idx");
  check_dim(topk_idx, 2, "topk_idx", "[num_tokens, k]");
  TORCH_CHECK(num_local >= 1, "num_local must be >= 1, got ", num_local);
  TORCH_CHECK(world >= 1, "world must be >= 1, got ", world);
  TORCH_CHECK(num_local <= (int64_t{1} << 31) / world,
              "num_local * world must be below 2^31, got num_local=", num_local, ", world=", world);
}

std::tuple<at::Tensor, at::Tensor> ep_route_meta(const at::Tensor& topk_idx, int64_t num_local, int64_t world) {
  check_ep_route(topk_idx, num_local, world);
  return {topk_idx.new_empty_symint({topk_idx.sym_size(0), c10::SymInt(world)}),
          topk_idx.new_empty({world * (num_local + 1)})};
}

std::tuple<at::Tensor, at::Tensor> ep_route_kernel(const at::Tensor& topk_idx, int64_t num_local, int64_t world) {
  check_ep_route(topk_idx, num_local, world);
  const c10::OptionalDeviceGuard guard(topk_idx.device());
  const at::Tensor idx = topk_idx.contiguous();
  at::Tensor token_ranks = at::empty({idx.size(0), world}, idx.options());
  at::Tensor dest_counts = at::empty({world * (num_local + 1)}, idx.options());
  call_kernel([&] {
#ifdef FASTMOE_WITH_CUDA_OPS
    if (idx.is_cuda()) {
      return ep_route_cuda(idx.const_data_ptr<int64_t>(), idx.size(0), idx.size(1), num_local, world,
                           token_ranks.mutable_data_ptr<int64_t>(), dest_counts.mutable_data_ptr<int64_t>(),
                           current_stream(idx));
    }
#endif
    ep_route_ref(idx.const_data_ptr<int64_t>(), idx.size(0), idx.size(1), num_local, world,
                 token_ranks.mutable_data_ptr<int64_t>(), dest_counts.mutable_data_ptr<int64_t>());
  });
  return {token_ranks, dest_counts};
}

}  // namespace

namespace ops {

Plan make_plan(const at::Tensor& topk_idx, int64_t num_experts) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::make_plan", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  auto [counts, offsets, sorted_pair, pair_pos] = op.call(topk_idx, num_experts);
  return Plan{counts, offsets, sorted_pair, pair_pos};
}

at::Tensor permute(const at::Tensor& x, const at::Tensor& sorted_pair, const at::Tensor& pair_pos) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::permute", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, sorted_pair, pair_pos);
}

at::Tensor unpermute_combine(const at::Tensor& y_sorted, const at::Tensor& sorted_pair, const at::Tensor& pair_pos,
                             const std::optional<at::Tensor>& topk_score) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::unpermute_combine", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&)>();
  return op.call(y_sorted, sorted_pair, pair_pos, topk_score);
}

std::tuple<at::Tensor, at::Tensor> unpermute_combine_backward(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                                                              const at::Tensor& sorted_pair, const at::Tensor& pair_pos,
                                                              const std::optional<at::Tensor>& topk_score,
                                                              bool need_score_grad) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmoe::unpermute_combine_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const std::optional<at::Tensor>&, bool)>();
  return op.call(grad_y, y_sorted, sorted_pair, pair_pos, topk_score, need_score_grad);
}

std::tuple<at::Tensor, at::Tensor> ep_route(const at::Tensor& topk_idx, int64_t num_local, int64_t world) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::ep_route", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t)>();
  return op.call(topk_idx, num_local, world);
}

}  // namespace ops

TORCH_LIBRARY_IMPL(fastmoe, CPU, m) {
  m.impl("ep_route", &ep_route_kernel);
  m.impl("make_plan", &make_plan_kernel);
  m.impl("permute", &permute_kernel);
  m.impl("unpermute_combine", &unpermute_combine_kernel);
  m.impl("unpermute_combine_backward", &unpermute_combine_backward_kernel);
}

#ifdef FASTMOE_WITH_CUDA_OPS
TORCH_LIBRARY_IMPL(fastmoe, CUDA, m) {
  m.impl("ep_route", &ep_route_kernel);
  m.impl("make_plan", &make_plan_kernel);
  m.impl("permute", &permute_kernel);
  m.impl("unpermute_combine", &unpermute_combine_kernel);
  m.impl("unpermute_combine_backward", &unpermute_combine_backward_kernel);
}
#endif

TORCH_LIBRARY_IMPL(fastmoe, Meta, m) {
  m.impl("ep_route", &ep_route_meta);
  m.impl("make_plan", &make_plan_meta);
  m.impl("permute", &permute_meta);
  m.impl("unpermute_combine", &unpermute_combine_meta);
  m.impl("unpermute_combine_backward", &unpermute_combine_backward_meta);
}

}  // namespace fastmoe
