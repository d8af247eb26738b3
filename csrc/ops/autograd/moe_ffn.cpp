// moe_ffn: the single-process MoE FFN layer of the training run (FMoETransformerMLP with NaiveGate) as one op with one
// autograd node. Its forward is the same composition of the registered ops the layer makes through TokenDispatch
// (gate linear, naive_gate, make_plan, permute, grouped_linear, activation, grouped_linear, unpermute_combine), run
// below autograd; its backward chains their backward ops by hand. The values are those of the composed layer bit for
// bit: the same kernels on the same operands, and each gradient the same function of the same tensors. What it saves
// is host time: one autograd node instead of about twenty, and no Python between the ops (docs/ops.md).
//
// Autocast: under torch.autocast the op casts as the composed layer would (the gate's linear and the grouped GEMMs
// follow autocast, fp64 stays), then runs with autocast off; the gradients of the fp32 inputs are cast back.
//
// Gradients of gradients: a backward under create_graph recomputes the forward with autograd recording (the same
// function, so the same graph as the composed layer) and differentiates it, so every order is exact.
#include <ATen/ATen.h>
#include <ATen/SavedTensorHooks.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>

#include "fastmoe/ops.h"
#include "ops/common.h"
#include "ops/internal.h"

namespace fastmoe {
namespace {

using ops_detail::shape_of;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum class Act { kGELU, kReLU, kSiLU, kSwiGLU };

// naive_gate's score function: the scores are the softmax of the k selected logits.
constexpr const char* kScoreFn = "topk_softmax";

Act parse_activation(c10::string_view name) {
  if (name == "gelu") return Act::kGELU;
  if (name == "relu") return Act::kReLU;
  if (name == "silu") return Act::kSiLU;
  if (name == "swiglu") return Act::kSwiGLU;
  TORCH_CHECK_VALUE(false, "activation must be one of 'gelu', 'relu', 'silu', 'swiglu', got '", std::string(name), "'");
}

// The op's tensor arguments, in schema order (gate_bias, b1 and b2 may be undefined).
struct Inputs {
  at::Tensor x, gate_weight, gate_bias, w1, b1, w2, b2;
  std::vector<at::Tensor> list() const { return {x, gate_weight, gate_bias, w1, b1, w2, b2}; }
  static Inputs of(const std::vector<at::Tensor>& t) { return {t[0], t[1], t[2], t[3], t[4], t[5], t[6]}; }
};

struct Options {
  int64_t top_k = 1;
  Act act = Act::kGELU;
  double balance_coef = 0, z_loss_coef = 0;
  bool recompute_activation = false;   // recompute a large activation in the backward instead of keeping it
  std::optional<at::ScalarType> cast;  // the autocast dtype the floating inputs (but fp64) are cast to
};

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The dtype the layer computes t in: autocast's for floating tensors but fp64 (as autocast casts them), else t's own.
at::ScalarType compute_dtype(const at::Tensor& t, const Options& o) {
  return o.cast && t.scalar_type() != at::kDouble ? *o.cast : t.scalar_type();
}

void check_inputs(const Inputs& in, const Options& o) {
  const at::Tensor& x = in.x;
  TORCH_CHECK(x.defined() && x.dim() == 2 && at::isFloatingType(x.scalar_type()),
              "x must be a floating [tokens, d_model] tensor, got ", shape_of(x),
              x.defined() ? " of dtype " + std::string(c10::toString(x.scalar_type())) : "");
  const c10::SymInt d = x.sym_size(1);
  const at::Tensor &wg = in.gate_weight, &w1 = in.w1, &w2 = in.w2;
  TORCH_CHECK(wg.defined() && wg.dim() == 2 && wg.sym_size(1) == d, "gate_weight must be [num_experts, d_model=", d,
              "], got ", shape_of(wg));
  const c10::SymInt experts = wg.sym_size(0);
  TORCH_CHECK_VALUE(o.top_k >= 1 && experts >= o.top_k, "top_k must be in [1, num_experts=", experts, "], got ",
                    o.top_k);
  ops::check_naive_gate_coefs(o.balance_coef, o.z_loss_coef);
  const auto is = [](const at::Tensor& t, std::initializer_list<c10::SymInt> sizes) {
    if (t.dim() != static_cast<int64_t>(sizes.size())) return false;
    int64_t dim = 0;
    for (const c10::SymInt& size : sizes) {
      if (t.sym_size(dim++) != size) return false;
    }
    return true;
  };
  TORCH_CHECK(!in.gate_bias.defined() || is(in.gate_bias, {experts}), "gate_bias must be [num_experts=", experts,
              "], got ", shape_of(in.gate_bias));
  TORCH_CHECK(w1.defined() && w1.dim() == 3 && w1.sym_size(0) == experts && w1.sym_size(2) == d,
              "w1 must be [num_experts=", experts, ", hidden, d_model=", d, "], got ", shape_of(w1));
  const c10::SymInt hidden1 = w1.sym_size(1);
  TORCH_CHECK(o.act != Act::kSwiGLU || hidden1 % 2 == 0,
              "activation='swiglu' needs w1 with an even number of rows per expert ([gate | up]), got ", hidden1);
  const c10::SymInt hidden = o.act == Act::kSwiGLU ? hidden1 / 2 : hidden1;
  TORCH_CHECK(!in.b1.defined() || is(in.b1, {experts, hidden1}), "b1 must be [num_experts=", experts, ", ", hidden1,
              "], got ", shape_of(in.b1));
  TORCH_CHECK(w2.defined() && w2.dim() == 3 && w2.sym_size(0) == experts && w2.sym_size(2) == hidden,
              "w2 must be [num_experts=", experts, ", d_out, hidden=", hidden, "], got ", shape_of(w2));
  TORCH_CHECK(!in.b2.defined() || is(in.b2, {experts, w2.sym_size(1)}), "b2 must be [num_experts=", experts,
              ", d_out=", w2.sym_size(1), "], got ", shape_of(in.b2));
  // What the composed layer's ops would meet after autocast: one dtype and one device throughout.
  const char* names[] = {"x", "gate_weight", "gate_bias", "w1", "b1", "w2", "b2"};
  const auto list = in.list();
  for (size_t i = 1; i < list.size(); ++i) {
    if (!list[i].defined()) continue;
    TORCH_CHECK(list[i].device() == x.device(), names[i], " is on ", list[i].device(), " but x is on ", x.device());
    TORCH_CHECK(compute_dtype(list[i], o) == compute_dtype(x, o), names[i], " has dtype ", list[i].scalar_type(),
                " but x has ", x.scalar_type(), o.cast ? " (under autocast)" : "");
  }
}

// The forward's tensors.
struct Forward {
  at::Tensor xc, wg, bg, logits, topk_idx, topk_score, balance, z_loss, counts, offsets, sorted_pair, pair_pos;
  at::Tensor rows, w1, b1, h, a, w2, b2, ys, y;
  // Each row's routing score, where the activation applies it (scores_in_activation); undefined otherwise.
  at::Tensor row_score;

  // Those the backward reads, in the order they are saved after the inputs. The activation a where keep_activation
  // says so: otherwise it is undefined and the backward recomputes it from h where it needs it (one elementwise
  // kernel, the same bits), so the op keeps T * k * hidden fewer values. ys only by its sizes where the combine has
  // no weights.
  std::array<at::Tensor*, 18> saved() {
    return {&xc,   &wg, &logits, &topk_idx, &topk_score, &counts,  &offsets, &sorted_pair, &pair_pos,
            &rows, &w1, &h,      &w2,       &ys,         &balance, &z_loss,  &a,           &row_score};
  }

  // Those the op may keep apart from its saved tensors (keep_apart), by their keys in ctx->saved_data.
  std::array<std::pair<const char*, at::Tensor*>, 4> apart() {
    return {{{"rows", &rows}, {"h", &h}, {"a", &a}, {"ys", &ys}}};
  }
};

// Whether the routing scores scale the activation's rows (swiglu with a scale) instead of weighting the combine: for
// SwiGLU experts without a second bias, where W2 (s a) = s (W2 a). The combine then only sums, and its backward
// reads neither the experts' output nor writes weighted rows; the scores' gradient comes out of swiglu's backward.
// The composed layer makes the same choice (FMoETransformerMLP, TransformerMLP: TokenDispatch::row_scores).
bool scores_in_activation(Act act, const at::Tensor& b2) {
  return act == Act::kSwiGLU && !b2.defined();
}

// A layer whose [T * k, ...] tensors are below this size has a step that waits on the host, where each launch and
// allocation costs time: the op spends none to save such a tensor's memory. The activation is then kept for the
// backward even where the call asks to recompute it, and a GEMM's backward is not split to free its input early
// (gemm_backward).
constexpr int64_t kHostBoundBytes = int64_t{32} << 20;

int64_t bytes_of(const at::Tensor& t) {
  return t.numel() * static_cast<int64_t>(t.element_size());
}

// The first GEMM's output h is the largest tensor the backward reads, and only up to the activation's backward; the
// first GEMM's backward, where the backward's memory peaks (grad_h and grad_w1 are made there), no longer needs it.
// Saved tensors live until the node's backward returns, so h is kept apart (ctx->saved_data["h"]) and dropped as
// soon as it is read, unless the graph is kept for another backward; so are the activation a and the rows, each
// read by one GEMM's weight gradient alone (gemm_backward drops them before that GEMM's input gradient is made),
// and the second GEMM's output ys where the combine's backward reads it (for the scores' gradient), at the
// backward's start. A kept activation so costs the backward's peak nothing: it is gone before the second GEMM's
// input gradient is made, as a recomputed one would be. Saved-tensor hooks (offloading, checkpointing) see only the
// saved tensors, and a traced call has symbolic sizes: both keep them among those.
bool keep_apart(const at::Tensor& t) {
  return !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
         !at::SavedTensorDefaultHooks::get_hooks().has_value();
}

// Whether the forward keeps the activation a for the backward. Only the second GEMM's weight gradient reads it
// back, so never with w2 frozen; otherwise always, unless the call asks to recompute it (recompute_activation),
// which one of under kHostBoundBytes still skips. A traced call (symbolic sizes under torch.compile) that asks
// to recompute does, whatever the sizes: the saved set does not depend on sizes the trace leaves open.
bool keep_activation(const at::Tensor& a, const at::Tensor& w2, const Options& o) {
  if (!w2.requires_grad()) return false;
  if (!o.recompute_activation) return true;
  if (a.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return false;
  return bytes_of(a) < kHostBoundBytes;
}

// One grouped GEMM's backward (grouped_linear_backward's gradients, for `need`), taking the input x: `frees` says
// that releasing it frees its memory (no one else holds it). x's only reader is the weight gradient, so then, with x
// at least kHostBoundBytes, the weight and bias gradients are made first, x is released, and the input gradient is
// made after, from a shape_only stand-in (grouped_linear_backward reads x only for the weight gradient): the same
// GEMMs and bits as one call, with one fewer [rows, in_features] tensor held when the input gradient is allocated,
// where a layer's backward peaks. Otherwise one call, then x released; always so when x has symbolic sizes (a trace
// with dynamic shapes, whose graph frees each tensor after its last use by itself). A trace with static sizes
// records the two calls, which run as they do in eager mode.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gemm_backward(const at::Tensor& grad_y, at::Tensor&& x, bool frees,
                                                             const at::Tensor& offsets, const at::Tensor& w,
                                                             std::array<bool, 3> need) {
  const bool split = frees && need[0] && need[1] && !x.unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
                     bytes_of(x) >= kHostBoundBytes;
  if (!split) {
    auto grads = ops::grouped_linear_backward(grad_y, x, offsets, w, need);
    x = at::Tensor();
    return grads;
  }
  auto [unused, grad_w, grad_b] = ops::grouped_linear_backward(grad_y, x, offsets, w, {false, true, need[2]});
  const at::Tensor stand_in = ops::shape_only(x);
  x = at::Tensor();  // read for the last time
  auto grad_x = std::get<0>(ops::grouped_linear_backward(grad_y, stand_in, offsets, w, {true, false, false}));
  return {grad_x, grad_w, grad_b};
}

// Each defined ts[i] in dtypes[i]: what ts[i].to(dtypes[i]) gives, bit for bit and with the same strides, but the
// tensors that change dtype are converted together by one foreach copy (one kernel on CUDA when they share their
// source and their target dtypes) instead of one copy each. Below autograd only.
// With `one_block`, contiguous targets of one dtype are carved from one allocation (each at a 256-byte boundary, as
// the allocator aligns its blocks) instead of one allocation each. Only for tensors the op keeps to itself: the
// forward's casts, never the gradients it returns (autograd may keep those as .grad, whose storage must be their own).
std::vector<at::Tensor> convert_all(std::vector<at::Tensor> ts, const std::vector<at::ScalarType>& dtypes,
                                    bool one_block) {
  std::vector<size_t> changed;
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i].defined() && dtypes[i] != ts[i].scalar_type()) changed.push_back(i);
  }
  if (changed.empty()) return ts;
  bool carve = one_block && changed.size() > 1;
  for (size_t i : changed) {
    // (symbolic sizes, under torch.compile's dynamic shapes, keep one allocation each)
    carve = carve && !ts[i].unsafeGetTensorImpl()->has_symbolic_sizes_strides() && ts[i].is_contiguous() &&
            dtypes[i] == dtypes[changed[0]];
  }
  std::vector<at::Tensor> sources, targets;
  if (carve) {
    const int64_t element = static_cast<int64_t>(c10::elementSize(dtypes[changed[0]]));
    const int64_t align = 256 / element;
    std::vector<int64_t> offsets;
    int64_t total = 0;
    for (size_t i : changed) {
      offsets.push_back(total);
      total += (ts[i].numel() + align - 1) / align * align;
    }
    const at::Tensor block = at::empty({total}, ts[changed[0]].options().dtype(dtypes[changed[0]]));
    for (size_t j = 0; j < changed.size(); ++j) {
      at::Tensor& t = ts[changed[j]];
      sources.push_back(t);
      targets.push_back(block.as_strided(t.sizes(), t.strides(), offsets[j]));
    }
  } else {
    for (size_t i : changed) {
      sources.push_back(ts[i]);
      targets.push_back(at::empty_like(ts[i], ts[i].options().dtype(dtypes[i]), at::MemoryFormat::Preserve));
    }
  }
  at::_foreach_copy_(targets, sources);
  for (size_t j = 0; j < changed.size(); ++j) ts[changed[j]] = targets[j];
  return ts;
}

// The activation between the two grouped GEMMs, as the composed layer computes it.
at::Tensor activation(const at::Tensor& h, Act act) {
  switch (act) {
    case Act::kGELU: return at::gelu(h);
    case Act::kReLU: return at::relu(h);
    case Act::kSiLU: return at::silu(h);
    case Act::kSwiGLU: return ops::swiglu(h);
  }
  TORCH_CHECK(false, "unknown activation");
}

// The composed layer's forward. With autograd recording it builds the composed layer's graph (the backward under
// create_graph uses that); below autograd it is the op's forward.
Forward run_forward(const Inputs& in, const Options& o) {
  const bool recorded = at::GradMode::is_enabled();
  const auto cast = [&](const at::Tensor& t) { return t.defined() ? t.to(compute_dtype(t, o)) : t; };
  Forward f;
  std::vector<at::Tensor> cast_in = in.list();
  if (recorded) {
    for (at::Tensor& t : cast_in) t = cast(t);  // each cast a node, as the composed layer's
  } else {
    std::vector<at::ScalarType> dtypes;
    for (const at::Tensor& t : cast_in) dtypes.push_back(t.defined() ? compute_dtype(t, o) : at::kFloat);
    cast_in = convert_all(std::move(cast_in), dtypes, /*one_block=*/true);
  }
  f.xc = cast_in[0];
  f.wg = cast_in[1];
  f.bg = cast_in[2];
  f.logits = at::linear(f.xc, f.wg, opt(f.bg));
  // naive_gate (its balance term below autograd: after the plan).
  const ops::GateRouting r = ops::naive_gate(f.logits, o.top_k, recorded ? o.balance_coef : 0.0, o.z_loss_coef);
  f.topk_idx = r.topk_idx;
  f.topk_score = r.topk_score;
  f.z_loss = r.z_loss;
  const ops::Plan plan = ops::make_plan(f.topk_idx, f.wg.sym_size(0).guard_int(__FILE__, __LINE__));
  // Below autograd the balance term takes the plan's counts instead of counting the slots again (the same integers).
  f.balance = !recorded && o.balance_coef > 0
                  ? ops::balance_loss(f.logits, plan.expert_counts,
                                      f.topk_idx.sym_numel().guard_int(__FILE__, __LINE__), o.balance_coef)
                  : r.balance_loss;
  f.counts = plan.expert_counts;
  f.offsets = plan.expert_offsets;
  f.sorted_pair = plan.sorted_pair;
  f.pair_pos = plan.pair_pos;
  // The composed layer casts x twice (the gate's linear and the rows), so x's two gradients are added after each is
  // cast back. Only a recorded graph (create_graph) sees the difference; below autograd one cast serves both.
  const at::Tensor x_rows = recorded ? cast(in.x) : f.xc;
  f.rows = ops::permute(x_rows, f.sorted_pair, f.pair_pos);
  f.w1 = cast_in[3];
  f.b1 = cast_in[4];
  f.h = ops::grouped_linear(f.rows, f.offsets, f.w1, opt(f.b1));
  f.w2 = cast_in[5];
  f.b2 = cast_in[6];
  const bool scored = scores_in_activation(o.act, f.b2);
  if (scored) f.row_score = ops::pair_scores(f.topk_score, f.sorted_pair, f.pair_pos);
  f.a = scored ? ops::swiglu(f.h, f.row_score) : activation(f.h, o.act);
  f.ys = ops::grouped_linear(f.a, f.offsets, f.w2, opt(f.b2));
  f.y = ops::unpermute_combine(f.ys, f.sorted_pair, f.pair_pos, scored ? std::nullopt : opt(f.topk_score));
  return f;
}

// The activation's backward, as autograd differentiates the forward's calls (swiglu: its backward op).
at::Tensor activation_backward(const at::Tensor& grad, const Forward& f, Act act) {
  switch (act) {
    case Act::kGELU: return at::gelu_backward(grad, f.h);
    case Act::kReLU: return at::threshold_backward(grad, f.h, 0);  // relu(h) > 0 exactly where h > 0
    case Act::kSiLU: return at::silu_backward(grad, f.h);
    case Act::kSwiGLU: return ops::swiglu_backward(grad, f.h);
  }
  TORCH_CHECK(false, "unknown activation");
}

// mm's gradients as autograd computes them (a column-major operand gets its gradient column-major).
at::Tensor mm_grad_mat1(const at::Tensor& grad, const at::Tensor& mat1, const at::Tensor& mat2) {
  if (mat1.stride(0) == 1 && mat1.stride(1) == mat1.size(0)) return mat2.mm(grad.t()).t();
  return grad.mm(mat2.t());
}

at::Tensor mm_grad_mat2(const at::Tensor& grad, const at::Tensor& mat1, const at::Tensor& mat2) {
  if (mat2.stride(0) == 1 && mat2.stride(1) == mat2.size(0)) return grad.t().mm(mat1).t();
  return mat1.t().mm(grad);
}

bool defined_term(const at::Tensor& grad, const at::Tensor& term) {
  return grad.defined() && term.dim() == 0;
}

// The gate's loss terms' gradient with respect to the logits, as the composed layer's autograd gives it: the balance
// term's through its backward op, the z-loss's by recomputing that term with autograd on a leaf copy of the logits
// (the same ATen graph).
at::Tensor loss_grad(const Forward& f, const Options& o, const at::Tensor& grad_balance, const at::Tensor& grad_z) {
  at::Tensor grad;
  if (defined_term(grad_balance, f.balance)) {
    grad = ops::balance_loss_backward(grad_balance, f.logits, f.counts, f.topk_idx.numel(), o.balance_coef);
  }
  if (defined_term(grad_z, f.z_loss)) {
    at::AutoGradMode on(true);
    const at::Tensor leaf = f.logits.detach().requires_grad_(true);
    const at::Tensor from_z = torch::autograd::grad({ops::naive_gate_z_loss(leaf, o.z_loss_coef)}, {leaf}, {grad_z})[0];
    grad = grad.defined() ? grad + from_z : from_z;
  }
  return grad;
}

class MoEFFNFunction : public torch::autograd::Function<MoEFFNFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& gate_weight,
                               const std::optional<at::Tensor>& gate_bias, const at::Tensor& w1,
                               const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                               const std::optional<at::Tensor>& b2, const Options& o) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // Outputs left out of the loss get no gradient (not zeros): the experts' backward then does not run for a loss
    // of the gate's terms alone, and their parameters keep no gradient, as in the composed layer.
    ctx->set_materialize_grads(false);
    const Inputs in{
        x, gate_weight, gate_bias.value_or(at::Tensor()), w1, b1.value_or(at::Tensor()), w2, b2.value_or(at::Tensor())};
    Forward f = run_forward(in, o);
    ctx->mark_non_differentiable({f.counts});
    for (const at::Tensor& term : {f.balance, f.z_loss}) {
      if (term.dim() != 0) ctx->mark_non_differentiable({term});  // the [0] placeholder of a term not recorded
    }
    if (!keep_activation(f.a, w2, o)) f.a = at::Tensor();
    // The rows are read back only for the first GEMM's weight gradient (else only their sizes).
    if (!w1.requires_grad()) f.rows = ops::shape_only(f.rows);
    // Without a gate loss term to read them back, and with a score gradient that reads their sizes alone, the
    // [tokens, num_experts] logits are not kept for the backward.
    if (f.balance.dim() != 0 && f.z_loss.dim() != 0 && !ops_detail::score_grad_reads_logits(kScoreFn)) {
      f.logits = ops::shape_only(f.logits);
    }
    if (f.row_score.defined()) f.ys = ops::shape_only(f.ys);  // a combine without weights reads only its sizes
    for (auto [name, t] : f.apart()) {
      if (t->defined() && keep_apart(*t)) {
        ctx->saved_data[name] = *t;
        *t = at::Tensor();
      }
    }
    std::vector<at::Tensor> saved = in.list();
    for (const at::Tensor* t : f.saved()) saved.push_back(*t);
    ctx->save_for_backward(saved);
    ctx->saved_data["top_k"] = o.top_k;
    ctx->saved_data["act"] = static_cast<int64_t>(o.act);
    ctx->saved_data["balance_coef"] = o.balance_coef;
    ctx->saved_data["z_loss_coef"] = o.z_loss_coef;
    ctx->saved_data["cast"] = o.cast ? static_cast<int64_t>(*o.cast) : int64_t{-1};
    return {f.y, f.balance, f.z_loss, f.counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Inputs in = Inputs::of({saved.begin(), saved.begin() + 7});
    Options o;
    o.top_k = ctx->saved_data["top_k"].toInt();
    o.act = static_cast<Act>(ctx->saved_data["act"].toInt());
    o.balance_coef = ctx->saved_data["balance_coef"].toDouble();
    o.z_loss_coef = ctx->saved_data["z_loss_coef"].toDouble();
    if (const int64_t cast = ctx->saved_data["cast"].toInt(); cast >= 0) o.cast = static_cast<at::ScalarType>(cast);
    if (at::GradMode::is_enabled()) return backward_recorded(ctx, in, o, grads);

    Forward f;
    size_t i = 7;
    for (at::Tensor* t : f.saved()) *t = saved[i++];
    // rows, h, a and ys kept apart (keep_apart): taken out for this backward, unless the graph stays for another one.
    const bool drop_apart = !torch::autograd::get_current_graph_task_keep_graph();
    const bool drop_rows = !f.rows.defined() && drop_apart;
    const bool drop_h = !f.h.defined() && drop_apart;
    const bool drop_a = !f.a.defined() && drop_apart;
    const bool drop_ys = !f.ys.defined() && drop_apart;
    for (auto [name, t] : f.apart()) {
      if (t->defined() || ctx->saved_data.count(name) == 0) continue;
      *t = ctx->saved_data.at(name).toTensor();
      if (drop_apart) ctx->saved_data.erase(name);
    }
    const std::array<bool, 7> need = needs_grad(ctx, in);
    const bool need_logits = need[0] || need[1] || need[2];
    const bool need_rows = need[0] || need[3] || need[4];
    // Gradients in the dtype the forward computed in; x's two (through the rows and through the gate) apart.
    std::vector<at::Tensor> raw(8);
    at::Tensor grad_logits;
    if (grads[0].defined()) {
      at::Tensor grad_score, grad_h;
      const bool scored = f.row_score.defined();
      {  // grad_ys, a and grad_a live only here, so none is held during the first GEMM's backward
        auto [grad_ys, score_grad] =
            ops::unpermute_combine_backward(grads[0], f.ys, f.sorted_pair, f.pair_pos,
                                            scored ? std::nullopt : opt(f.topk_score), need_logits && !scored);
        if (!scored) grad_score = score_grad;
        if (drop_ys) f.ys = at::Tensor();  // read for the last time
        // The second GEMM's input a (kept, or recomputed on request) is read only for its weight gradient;
        // otherwise only its sizes are (a shape_only stand-in). Below autograd: this is a first-order backward.
        // A kept activation that may be dropped is given up by f.a, so gemm_backward frees it before the input
        // gradient is made; one kept for another backward stays in f.a.
        at::Tensor a;
        bool frees_a = true;
        if (f.a.defined()) {
          a = drop_a ? std::exchange(f.a, at::Tensor()) : f.a;
          frees_a = drop_a;
        } else if (need[5]) {
          at::AutoDispatchBelowADInplaceOrView below;
          a = scored ? ops::swiglu(f.h, f.row_score) : activation(f.h, o.act);
        } else {  // h's rows, except SwiGLU's, which are twice as wide
          a = ops::shape_only(o.act == Act::kSwiGLU ? f.h.narrow_symint(1, 0, f.h.sym_size(1) / 2) : f.h);
        }
        // With the scores in the activation, their gradient also comes through grad_a.
        const bool need_grad_a = need_rows || (scored && need_logits);
        auto [grad_a, grad_w2, grad_b2] =
            gemm_backward(grad_ys, std::move(a), frees_a, f.offsets, f.w2, {need_grad_a, need[5], need[6]});
        if (need[5]) raw[5] = grad_w2;
        if (need[6]) raw[6] = grad_b2;
        // Read for the last time: freed before the activation's backward makes grad_h (T * k * d_out values), as
        // autograd frees a node's tensors once its backward has run.
        grad_ys = at::Tensor();
        if (scored && need_grad_a) {
          auto [grad_h_scaled, grad_row_score] = ops::swiglu_scaled_backward(grad_a, f.h, f.row_score);
          if (need_rows) grad_h = grad_h_scaled;
          if (need_logits) {
            grad_score = ops::pair_scores_backward(grad_row_score, f.topk_score, f.sorted_pair, f.pair_pos);
          }
        } else if (need_rows && need[4] && o.act == Act::kGELU && grad_a.is_cuda()) {
          // On CUDA the first bias's gradient is summed as GELU's backward writes grad_h, not read back from it
          // (the same bits as the first GEMM's backward would give: ops.h). On the CPU the composed path's ops stay.
          std::tie(grad_h, raw[4]) = ops::gelu_backward_bias(grad_a, f.h, f.offsets);
        } else if (need_rows) {
          grad_h = activation_backward(grad_a, f, o.act);
        }
      }
      if (drop_h) f.h = at::Tensor();  // read for the last time above
      if (need_rows) {
        const bool need_b1 = need[4] && !raw[4].defined();
        at::Tensor rows = drop_rows ? std::exchange(f.rows, at::Tensor()) : f.rows;  // given up as `a` above
        auto [grad_rows, grad_w1, grad_b1] =
            gemm_backward(grad_h, std::move(rows), drop_rows, f.offsets, f.w1, {need[0], need[3], need_b1});
        // Read for the last time: freed before the combine makes x's gradient, as autograd frees a gradient once
        // the node that takes it has run (T * k * hidden values, the largest tensor still held otherwise).
        grad_h = at::Tensor();
        if (need[0]) raw[0] = ops::unpermute_combine(grad_rows, f.sorted_pair, f.pair_pos, std::nullopt);
        if (need[3]) raw[3] = grad_w1;
        if (need_b1) raw[4] = grad_b1;
      }
      if (need_logits) {
        grad_logits = ops::route_topk_backward(grad_score, f.logits, f.topk_idx, f.topk_score, kScoreFn);
      }
    }
    if (need_logits) {
      const at::Tensor from_losses = loss_grad(f, o, grads[1], grads[2]);
      if (from_losses.defined()) grad_logits = grad_logits.defined() ? grad_logits + from_losses : from_losses;
    }
    if (grad_logits.defined()) {
      // logits = addmm(bg, xc, wg^T) (mm without a bias): autograd's mm gradients, then the bias's sum over tokens.
      const at::Tensor wg_t = f.wg.t();
      if (need[0]) raw[7] = mm_grad_mat1(grad_logits, f.xc, wg_t);
      if (need[1]) raw[1] = mm_grad_mat2(grad_logits, f.xc, wg_t).t();
      if (need[2]) raw[2] = at::sum_to(grad_logits, in.gate_bias.sizes());
    }
    // Back to each input's dtype (autograd's casts back through autocast's .to()), all in one conversion; then x's
    // two gradients are added, as autograd adds the two casts' gradients.
    std::vector<at::ScalarType> dtypes;
    for (const at::Tensor& t : in.list()) dtypes.push_back(t.defined() ? t.scalar_type() : at::kFloat);
    dtypes.push_back(in.x.scalar_type());
    raw = convert_all(std::move(raw), dtypes, /*one_block=*/false);
    std::array<at::Tensor, 7> out;
    for (size_t j = 0; j < out.size(); ++j) out[j] = raw[j];
    if (raw[7].defined()) out[0] = out[0].defined() ? out[0] + raw[7] : raw[7];
    variable_list result(out.begin(), out.end());
    result.emplace_back();  // options
    return result;
  }

 private:
  // Per input, whether its gradient is needed. Absent optional inputs have no edge, so edges count the present ones.
  static std::array<bool, 7> needs_grad(AutogradContext* ctx, const Inputs& in) {
    std::array<bool, 7> need{};
    const auto list = in.list();
    size_t edge = 0;
    for (size_t j = 0; j < list.size(); ++j) {
      if (list[j].defined()) need[j] = ctx->needs_input_grad(edge++);
    }
    return need;
  }

  // create_graph: the forward again, recorded, and differentiated with a graph.
  static variable_list backward_recorded(AutogradContext* ctx, const Inputs& in, const Options& o,
                                         const variable_list& grads) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const Forward f = run_forward(in, o);
    variable_list outputs, upstream, wrt;
    if (grads[0].defined()) outputs.push_back(f.y), upstream.push_back(grads[0]);
    if (defined_term(grads[1], f.balance)) outputs.push_back(f.balance), upstream.push_back(grads[1]);
    if (defined_term(grads[2], f.z_loss)) outputs.push_back(f.z_loss), upstream.push_back(grads[2]);
    std::vector<size_t> slots;
    const auto list = in.list();
    const std::array<bool, 7> need = needs_grad(ctx, in);
    for (size_t j = 0; j < list.size(); ++j) {
      if (need[j]) wrt.push_back(list[j]), slots.push_back(j);
    }
    variable_list result(list.size() + 1);
    if (outputs.empty() || wrt.empty()) return result;
    const variable_list g = torch::autograd::grad(outputs, wrt, upstream, /*retain_graph=*/true,
                                                  /*create_graph=*/true, /*allow_unused=*/true);
    for (size_t j = 0; j < slots.size(); ++j) result[slots[j]] = g[j];
    return result;
  }
};

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The op's arguments, checked, with the autocast dtype read from the caller's state.
struct Call {
  Inputs in;
  Options o;
};

Call prepare(const at::Tensor& x, const at::Tensor& gate_weight, const std::optional<at::Tensor>& gate_bias,
             const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
             const std::optional<at::Tensor>& b2, int64_t top_k, c10::string_view activation, double balance_coef,
             double z_loss_coef, bool recompute_activation) {
  Call call{
      {x, gate_weight, gate_bias.value_or(at::Tensor()), w1, b1.value_or(at::Tensor()), w2, b2.value_or(at::Tensor())},
      {}};
  Options& o = call.o;
  o.top_k = top_k;
  o.act = parse_activation(activation);
  o.balance_coef = balance_coef;
  o.z_loss_coef = z_loss_coef;
  o.recompute_activation = recompute_activation;
  const c10::DeviceType type = x.device().type();
  if ((type == c10::DeviceType::CPU || type == c10::DeviceType::CUDA) && at::autocast::is_autocast_enabled(type)) {
    o.cast = at::autocast::get_autocast_dtype(type);
  }
  check_inputs(call.in, o);
  return call;
}

Result moe_ffn_autograd(const at::Tensor& x, const at::Tensor& gate_weight, const std::optional<at::Tensor>& gate_bias,
                        const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                        const std::optional<at::Tensor>& b2, int64_t top_k, c10::string_view activation,
                        double balance_coef, double z_loss_coef, bool recompute_activation) {
  const Call call = prepare(x, gate_weight, gate_bias, w1, b1, w2, b2, top_k, activation, balance_coef, z_loss_coef,
                            recompute_activation);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto out = MoEFFNFunction::apply(x, gate_weight, gate_bias, w1, b1, w2, b2, call.o);
  return {out[0], out[1], out[2], out[3]};
}

// Below autograd (inference mode, or tensors that need no gradient): the forward alone.
Result moe_ffn_forward(const at::Tensor& x, const at::Tensor& gate_weight, const std::optional<at::Tensor>& gate_bias,
                       const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                       const std::optional<at::Tensor>& b2, int64_t top_k, c10::string_view activation,
                       double balance_coef, double z_loss_coef, bool recompute_activation) {
  const Call call = prepare(x, gate_weight, gate_bias, w1, b1, w2, b2, top_k, activation, balance_coef, z_loss_coef,
                            recompute_activation);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Forward f = run_forward(call.in, call.o);
  return {f.y, f.balance, f.z_loss, f.counts};
}

}  // namespace

namespace ops {

MoEFFN moe_ffn(const at::Tensor& x, const at::Tensor& gate_weight, const std::optional<at::Tensor>& gate_bias,
               const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
               const std::optional<at::Tensor>& b2, int64_t top_k, const std::string& activation, double balance_coef,
               double z_loss_coef, bool recompute_activation) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmoe::moe_ffn", "")
          .typed<Result(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                        const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                        c10::string_view, double, double, bool)>();
  auto [y, balance, z_loss, counts] = op.call(x, gate_weight, gate_bias, w1, b1, w2, b2, top_k, activation,
                                              balance_coef, z_loss_coef, recompute_activation);
  return {y, balance, z_loss, counts};
}

}  // namespace ops

TORCH_LIBRARY_IMPL(fastmoe, Autograd, m) {
  m.impl("moe_ffn", &moe_ffn_autograd);
}

TORCH_LIBRARY_IMPL(fastmoe, CPU, m) {
  m.impl("moe_ffn", &moe_ffn_forward);
}

TORCH_LIBRARY_IMPL(fastmoe, Meta, m) {
  m.impl("moe_ffn", &moe_ffn_forward);
}

#ifdef FASTMOE_WITH_CUDA_OPS
TORCH_LIBRARY_IMPL(fastmoe, CUDA, m) {
  m.impl("moe_ffn", &moe_ffn_forward);
}
#endif

}  // namespace fastmoe
