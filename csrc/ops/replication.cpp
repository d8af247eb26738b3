// Hot-expert replication (docs/distributed.md, "Hot-expert replication"): the copies of the chosen experts'
// weights (ops::replicate_experts), the policy as an op (plan_replication, csrc/ref/replication.h), and
// TokenDispatch's share of it: gather the loads, choose, plan the copies' rows, take their output.
#include "ref/replication.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "fastmoe/ops.h"
#include "fastmoe/token_dispatch.h"
#include "ops/internal.h"
#include "runtime/communicator.h"

namespace fastmoe {
namespace {

// The policy's rates where the layer gives none. CUDA: the H200's fitted grouped-GEMM rate and NVLink all-to-all
// bandwidth of python/fastmoe/sim_calibration.json (gemm_tflops, nvlink_gbps). CPU: an assumption of the order of
// a many-core CPU's GEMMs and gloo over loopback TCP; pass the measured rates where they matter.
constexpr double kCudaGemmFlops = 684.4e12, kCudaLinkBytes = 337.5e9;
constexpr double kCpuGemmFlops = 1e11, kCpuLinkBytes = 1e9;

void check_experts(const at::Tensor& weight, c10::IntArrayRef experts, int64_t num_local, int64_t world) {
  TORCH_CHECK(num_local >= 1, "num_local must be >= 1, got ", num_local);
  TORCH_CHECK(weight.dim() >= 1 && weight.size(0) == num_local, "weight must be [num_local=", num_local, ", ...], got ",
              weight.sizes());
  for (size_t i = 0; i < experts.size(); ++i) {
    TORCH_CHECK(experts[i] >= 0 && experts[i] < num_local * world && (i == 0 || experts[i] > experts[i - 1]),
                "experts must be ascending global ids in [0, ", num_local * world, "), got ", experts);
  }
}

at::Tensor replicate_experts_impl(const at::Tensor& weight, c10::IntArrayRef experts, int64_t num_local,
                                  c10::string_view group_name) {
  const std::string group(group_name);
  const int64_t world = group.empty() ? 1 : runtime::group_size(group);
  const int64_t rank = group.empty() ? 0 : runtime::group_rank(group);
  check_experts(weight, experts, num_local, world);
  std::vector<int64_t> out_shape(weight.sizes().begin(), weight.sizes().end());
  out_shape[0] = static_cast<int64_t>(experts.size());
  const at::Tensor rows = weight.reshape({num_local, -1});
  if (world == 1) {
    return rows.index_select(0, at::tensor(experts.vec(), at::TensorOptions().dtype(at::kLong)).to(weight.device()))
        .view(out_shape);
  }
  // A binomial-tree broadcast per expert (tree_steps, tree_sends, tree_receives in ref/replication.h, the tree the
  // policy prices), all experts in the same exchanges. In round j (step = 2^j) rank r holds expert i's copy when
  // rel = (r - owner_i) mod W < step, and sends it to rank (r + step) mod W when rel + step < W; so rank r sends
  // only to r + step and receives only from r - step, each expert's row once.
  // The sender's rows go in ascending expert order, and the receiver gets them in that order (exchange stacks a
  // source's rows in its send order): the experts with rel in [step, 2 * step) on this side.
  // Autograd: each round's backward is the reverse exchange, and the gradients a copy gets from its own use and
  // from every rank it forwarded to add up at this rank before going back: a tree reduction to the owner.
  const int64_t m = static_cast<int64_t>(experts.size());
  const auto rel = [&](int64_t i) { return ((rank - experts[i] / num_local) % world + world) % world; };
  std::vector<at::Tensor> copies(m);  // this rank's copy of each expert, once it holds one
  for (int64_t i = 0; i < m; ++i) {
    if (rel(i) == 0) copies[i] = rows.select(0, experts[i] % num_local);
  }
  // A round that brings this rank nothing still has to take part in the backward: its empty output joins the
  // result, so every rank runs every round's reverse exchange.
  std::vector<at::Tensor> empty_rounds;
  for (const int64_t step : m > 0 ? tree_steps(world) : std::vector<int64_t>{}) {  // the same on every rank
    std::vector<at::Tensor> out;
    std::vector<int64_t> in;
    for (int64_t i = 0; i < m; ++i) {
      if (tree_sends(rel(i), step, world)) out.push_back(copies[i]);
      if (tree_receives(rel(i), step)) in.push_back(i);
    }
    std::vector<int64_t> send(world, 0), recv(world, 0);
    send[(rank + step) % world] = static_cast<int64_t>(out.size());
    recv[(rank - step + world) % world] = static_cast<int64_t>(in.size());
    // an empty send still comes from the weight, so this round's exchange is in every rank's backward
    const at::Tensor x = out.empty() ? rows.narrow(0, 0, 0) : at::stack(out);
    const at::Tensor got = ops::exchange(x, send, recv, group);
    if (in.empty()) empty_rounds.push_back(got);
    for (size_t k = 0; k < in.size(); ++k) copies[in[k]] = got.select(0, static_cast<int64_t>(k));
  }
  if (m == 0) return rows.narrow(0, 0, 0).view(out_shape);
  empty_rounds.insert(empty_rounds.begin(), at::stack(copies));
  return at::cat(empty_rounds).view(out_shape);
}

std::vector<int64_t> plan_replication_impl(const at::Tensor& load, int64_t num_local, double slot_cost, double row_cost,
                                           double expert_cost, int64_t max_experts) {
  TORCH_CHECK(load.dim() == 2 && load.size(1) == load.size(0) * num_local,
              "load must be [world, world * num_local=", num_local, "], got ", load.sizes());
  TORCH_CHECK(!at::isFloatingType(load.scalar_type()) && !at::isComplexType(load.scalar_type()) &&
                  load.scalar_type() != at::kBool,
              "load must hold integer slot counts, got dtype ", load.scalar_type());
  const at::Tensor host = load.to(at::kCPU, at::kLong).contiguous();
  return replication_plan(host.const_data_ptr<int64_t>(), load.size(0), num_local,
                          ReplicationCosts{slot_cost, row_cost, expert_cost}, max_experts);
}

}  // namespace

namespace ops {

at::Tensor replicate_experts(const at::Tensor& weight, const std::vector<int64_t>& experts, int64_t num_local,
                             const std::string& group_name) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmoe::replicate_experts", "")
                       .typed<at::Tensor(const at::Tensor&, c10::IntArrayRef, int64_t, c10::string_view)>();
  return op.call(weight, experts, num_local, group_name);
}

}  // namespace ops

at::Tensor TokenDispatch::replicate_hot(const at::Tensor& x, const at::Tensor& topk_idx,
                                        const Replication& replication) {
  TORCH_CHECK(replication.expert_params >= 1 && replication.param_bytes >= 1 && replication.gemm_flops >= 0.0 &&
                  replication.link_bytes >= 0.0,
              "hot-expert replication needs expert_params >= 1, param_bytes >= 1, gemm_flops >= 0 and "
              "link_bytes >= 0, got expert_params=",
              replication.expert_params, ", param_bytes=", replication.param_bytes,
              ", gemm_flops=", replication.gemm_flops, ", link_bytes=", replication.link_bytes);
  const int64_t world = world_, local = num_local_, experts = world * local;
  // This rank's slots per global expert (the gate's load, kept for the balance record), then every rank's.
  const at::Tensor dest = std::get<1>(ops::ep_route(topk_idx, local, world)).view({world, local + 1});
  routed_counts_ = dest.slice(1, 0, local).flatten();
  const std::vector<int64_t> ones(world, 1);
  const at::Tensor gathered =
      ops::exchange(routed_counts_.view({1, experts}).expand({world, experts}).contiguous(), ones, ones, group_);
  const at::Tensor load = gathered.cpu();  // a host read: the policy runs on the host, the same on every rank
  const bool cuda = x.is_cuda();
  const double flops = replication.gemm_flops > 0 ? replication.gemm_flops : cuda ? kCudaGemmFlops : kCpuGemmFlops;
  const double link = replication.link_bytes > 0 ? replication.link_bytes : cuda ? kCudaLinkBytes : kCpuLinkBytes;
  ReplicationCosts costs;
  costs.slot_cost = 6.0 * static_cast<double>(replication.expert_params) / flops;
  costs.row_cost = 4.0 * static_cast<double>(x.size(1) * x.element_size()) / link;
  costs.expert_cost = 2.0 * static_cast<double>(replication.expert_params * replication.param_bytes) / link;
  const int64_t* l = load.const_data_ptr<int64_t>();
  replicated_ = replication_plan(l, world, local, costs, replication.max_experts);
  if (replicated_.empty()) return topk_idx;

  // Slot -> copy index (or -1); the copies' slots run here as one process runs its experts.
  const int64_t m = static_cast<int64_t>(replicated_.size());
  const auto long_opts = topk_idx.options().dtype(at::kLong);
  at::Tensor copy_of = at::full({experts + 1}, -1, long_opts);  // entry `experts` stands for an empty slot
  copy_of.index_put_({at::tensor(replicated_, at::kLong).to(topk_idx.device())}, at::arange(m, long_opts));
  const at::Tensor slot_copy =
      copy_of.index_select(0, at::where(topk_idx < 0, experts, topk_idx).flatten()).view_as(topk_idx);
  const ops::Plan plan = ops::make_plan(slot_copy, m);
  replicas_.bounds.assign(m + 1, 0);
  for (int64_t i = 0; i < m; ++i) replicas_.bounds[i + 1] = replicas_.bounds[i] + l[rank_ * experts + replicated_[i]];
  replicas_.sorted_pair = plan.sorted_pair.slice(0, 0, replicas_.bounds[m]);
  replicas_.pair_pos = plan.pair_pos;
  replicas_.rows = ops::permute(x, replicas_.sorted_pair, replicas_.pair_pos);
  replicas_.counts = plan.expert_counts;
  replicas_.offsets = plan.expert_offsets;
  return at::where(slot_copy >= 0, -1, topk_idx);
}

const TokenDispatch::Replicas& TokenDispatch::replicas_checked() const {
  TORCH_CHECK(!replicated_.empty(), "no expert is replicated in this forward (replicated() is empty)");
  return replicas_;
}

at::Tensor TokenDispatch::replica_rows() const {
  return replicas_checked().rows;
}

at::Tensor TokenDispatch::replica_counts() const {
  return replicas_checked().counts;
}

at::Tensor TokenDispatch::replica_offsets() const {
  return replicas_checked().offsets;
}

std::vector<int64_t> TokenDispatch::replica_bounds() const {
  return replicas_checked().bounds;
}

at::Tensor TokenDispatch::replica_scores() const {
  const Replicas& r = replicas_checked();
  return ops::pair_scores(topk_score_, r.sorted_pair, r.pair_pos);
}

void TokenDispatch::give_replicas(const at::Tensor& y, bool scored) {
  const Replicas& r = replicas_checked();
  TORCH_CHECK(!r.output.defined(), "give_replicas was already called");
  TORCH_CHECK(y.defined() && y.dim() == 2 && y.size(0) == r.rows.size(0), "the copies' output must be [",
              r.rows.size(0), ", d_out] (one row per input row), got ",
              y.defined() ? c10::str(y.sizes()) : std::string("an undefined tensor"));
  if (!debug_name_.empty() && debug_enabled()) check_finite(y, debug_name_, "replicated experts' outputs");
  replicas_.output = y;
  replicas_.scored = scored;
}

TORCH_LIBRARY_IMPL(fastmoe, CompositeImplicitAutograd, m) {
  m.impl("replicate_experts", &replicate_experts_impl);
  m.impl("plan_replication", &plan_replication_impl);
}

}  // namespace fastmoe
