// fastmoe::TokenDispatch (include/fastmoe/token_dispatch.h): the token path between the gate and the experts and
// back, composed once from the registered ops, for both front ends. Registered as the custom class
// torch.classes.fastmoe.TokenDispatch.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <atomic>
#include <numeric>
#include <sstream>

#include "fastmoe/ops.h"
#include "fastmoe/token_dispatch.h"
#include "ops/common.h"
#include "ops/internal.h"
#include "runtime/communicator.h"

namespace fastmoe {
namespace {

using ops_detail::shape_of;

std::atomic<bool> debug_on{false};

// Autocast would cast the rows at the experts' first GEMM anyway; casting them before they move halves the bytes of
// the permute, the exchange and the combine's backward. fp64 rows stay (autocast leaves them alone too).
at::Tensor autocast_rows(const at::Tensor& x) {
  const c10::DeviceType type = x.device().type();
  if (type != c10::DeviceType::CPU && type != c10::DeviceType::CUDA) return x;
  if (!at::autocast::is_autocast_enabled(type) || x.scalar_type() == at::kDouble) return x;
  return x.to(at::autocast::get_autocast_dtype(type));
}

// Runs the current stream of `stream`'s device as `stream` until destroyed.
class StreamGuard {
 public:
  explicit StreamGuard(const std::optional<c10::Stream>& stream) {
    if (stream) previous_ = c10::impl::VirtualGuardImpl(stream->device_type()).exchangeStream(*stream);
  }
  ~StreamGuard() {
    if (previous_) c10::impl::VirtualGuardImpl(previous_->device_type()).exchangeStream(*previous_);
  }
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  std::optional<c10::Stream> previous_;
};

// The combine's weights for output given with `scored` (its rows already carry their scores: none) or not.
std::optional<at::Tensor> combine_weights(bool scored, const at::Tensor& score) {
  return scored ? std::nullopt : std::optional<at::Tensor>(score);
}

// `waiter` waits for the work queued so far on `producer`.
void wait_for(const c10::Stream& waiter, const c10::Stream& producer) {
  c10::Event event(producer.device_type());
  event.record(producer);
  event.block(waiter);
}

}  // namespace

void set_debug(bool enabled) {
  debug_on.store(enabled, std::memory_order_relaxed);
}

bool debug_enabled() {
  return debug_on.load(std::memory_order_relaxed);
}

TokenDispatch::TokenDispatch(const at::Tensor& x_in, const at::Tensor& topk_idx, const at::Tensor& topk_score,
                             int64_t num_local, int64_t world, std::string group_name, int64_t chunks,
                             bool cast_to_autocast, std::string debug_name, std::string node_group,
                             std::string rail_group, Replication replication)
    : num_local_(num_local),
      world_(world),
      group_(std::move(group_name)),
      node_group_(std::move(node_group)),
      rail_group_(std::move(rail_group)),
      debug_name_(std::move(debug_name)) {
  TORCH_CHECK(num_local >= 1, "num_local must be >= 1, got ", num_local);
  TORCH_CHECK(world >= 1, "world must be >= 1, got ", world);
  TORCH_CHECK(chunks >= 1, "chunks must be >= 1, got ", chunks);
  TORCH_CHECK(world == 1 || !group_.empty(), "world=", world, " needs group_name, the process group of the experts");
  TORCH_CHECK(node_group_.empty() == rail_group_.empty() && (node_group_.empty() || !group_.empty()),
              "the hierarchical exchange needs group_name, node_group and rail_group, got group_name='", group_,
              "', node_group='", node_group_, "' and rail_group='", rail_group_, "'");
  TORCH_CHECK(x_in.defined() && x_in.dim() == 2, "x must be [tokens, width], got ", shape_of(x_in));
  TORCH_CHECK(topk_idx.defined() && topk_idx.dim() == 2 && topk_idx.size(0) == x_in.size(0),
              "topk_idx must be [tokens, k] with tokens=", x_in.size(0), " (the rows of x), got ", shape_of(topk_idx));
  TORCH_CHECK(topk_score.defined() && topk_score.sizes() == topk_idx.sizes(), "topk_score must have the shape of ",
              "topk_idx ", topk_idx.sizes(), ", got ", shape_of(topk_score));
  TORCH_CHECK(replication.max_experts >= 0, "replicate_max must be >= 0, got ", replication.max_experts);
  TORCH_CHECK(replication.max_experts == 0 || !group_.empty(),
              "hot-expert replication needs expert parallelism (group_name), got replicate_max=",
              replication.max_experts, " on one process");
  num_tokens_ = x_in.size(0);
  if (!debug_name_.empty() && debug_enabled()) check_routing(topk_idx, topk_score);
  const at::Tensor x = cast_to_autocast ? autocast_rows(x_in) : x_in;
  if (group_.empty()) {
    // One process: the plan orders the (token, slot) pairs by expert, permute gathers the rows in that order.
    const ops::Plan plan = ops::make_plan(topk_idx, num_local);
    Chunk chunk;
    chunk.end = num_tokens_;
    chunk.sorted_pair = plan.sorted_pair;
    chunk.pair_pos = plan.pair_pos;
    chunk.rows = ops::permute(x, plan.sorted_pair, plan.pair_pos);
    chunk.counts = plan.expert_counts;
    chunk.offsets = plan.expert_offsets;
    chunks_.push_back(std::move(chunk));
    topk_score_ = topk_score;
    routed_counts_ = plan.expert_counts;
    return;
  }
  rank_ = runtime::group_rank(group_);
  const int64_t size = runtime::group_size(group_);
  TORCH_CHECK(size == world, "world=", world, " but process group '", group_, "' has ", size, " ranks");
  chunks_.resize(chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    chunks_[c].begin = num_tokens_ * c / chunks;
    chunks_[c].end = num_tokens_ * (c + 1) / chunks;
  }
  // With copies of hot experts, their slots stay here (replica_rows) and the exchanges carry the others.
  const at::Tensor routed_idx = replication.max_experts > 0 ? replicate_hot(x, topk_idx, replication) : topk_idx;
  if (!replicated_.empty()) topk_score_ = topk_score;
  expert_parallel(x, routed_idx, topk_score);
}

// Expert parallelism (docs/distributed.md): each token row travels once to every rank that owns one of its experts,
// with its scores and routing row; that rank runs its experts on the token's slots, adds them up weighted by the
// scores (give) and sends the partial sums back, which add up per token (combine). The counts of all chunks travel
// in one exchange and are read on the host once: the all-to-all takes its split sizes on the host. Then every
// chunk's dispatch is issued before any chunk's experts, chunk c > 0 on its own stream, so while one chunk's rows
// travel another chunk's experts run, in the forward and (autograd runs each op's backward on its forward's
// stream) in the backward.
void TokenDispatch::expert_parallel(const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_score) {
  const int64_t world = world_, local = num_local_, n = num_chunks();
  // token_ranks [T_c, W]: rank p, or -1 if no slot goes to p; dest_counts [W * (local + 1)]: per destination rank,
  // the slots per local expert, then the token rows.
  std::vector<at::Tensor> token_ranks(n), outgoing_per_chunk(n);
  for (int64_t c = 0; c < n; ++c) {
    auto [ranks, counts] = ops::ep_route(topk_idx.slice(0, chunks_[c].begin, chunks_[c].end), local, world);
    token_ranks[c] = ranks;
    outgoing_per_chunk[c] = counts.view({world, local + 1});
  }
  const at::Tensor outgoing = at::stack(outgoing_per_chunk, 1);  // [W, n, local + 1]
  // the gate's load; replicate_hot set it from the full routing already
  if (!routed_counts_.defined()) routed_counts_ = outgoing.slice(2, 0, local).sum(1).flatten();
  std::vector<ops::Plan> rank_plans;
  for (int64_t c = 0; c < n; ++c) rank_plans.push_back(ops::make_plan(token_ranks[c], world));
  // The rows' dtype, width and the chunk count travel with the counts, so ranks whose layers differ in them raise
  // here, on every rank, instead of exchanging rows of different sizes.
  const at::Tensor incoming =
      ops::exchange_counts(outgoing.flatten(), group_, x.scalar_type(), x.size(1), n).view({world, n, local + 1});
  const at::Tensor both = at::stack({outgoing, incoming}).cpu();  // the one host read of a forward
  const int64_t* out_h = both.const_data_ptr<int64_t>();
  const int64_t* in_h = out_h + world * n * (local + 1);
  for (int64_t c = 0; c < n; ++c) {
    Chunk& chunk = chunks_[c];
    chunk.send.assign(world, 0);
    chunk.recv.assign(world, 0);
    chunk.bounds.assign(local + 1, 0);
    for (int64_t p = 0; p < world; ++p) {
      const int64_t row = (p * n + c) * (local + 1);
      chunk.send[p] = out_h[row + local];
      chunk.recv[p] = in_h[row + local];
      for (int64_t e = 0; e < local; ++e) chunk.bounds[e + 1] += in_h[row + e];
    }
    for (int64_t e = 0; e < local; ++e) chunk.bounds[e + 1] += chunk.bounds[e];
  }
  if (!node_group_.empty()) ask_node_peers(x.device());

  if (n > 1 && x.is_cuda()) {
    c10::impl::VirtualGuardImpl impl(x.device().type());
    caller_stream_ = impl.getStream(x.device());
    for (int64_t c = 1; c < n; ++c) {
      chunks_[c].stream = impl.getStreamFromGlobalPool(x.device());
      wait_for(*chunks_[c].stream, *caller_stream_);
      // Made on the caller's stream, read on the side stream: the allocator must not reuse them before it is done.
      for (const at::Tensor& t : {x, topk_idx, topk_score, rank_plans[c].sorted_pair, rank_plans[c].pair_pos}) {
        t.record_stream(*chunks_[c].stream);
      }
    }
  }
  for (int64_t c = 0; c < n; ++c) {  // every chunk's dispatch first
    Chunk& chunk = chunks_[c];
    const StreamGuard on(chunk.stream);
    const int64_t n_send = std::accumulate(chunk.send.begin(), chunk.send.end(), int64_t{0});
    chunk.sorted_pair = rank_plans[c].sorted_pair.slice(0, 0, n_send);  // row r carries pair token * W + rank
    chunk.pair_pos = rank_plans[c].pair_pos;
    const at::Tensor x_c = x.slice(0, chunk.begin, chunk.end);
    const at::Tensor x_in =
        exchange(ops::permute(x_c, chunk.sorted_pair, chunk.pair_pos), chunk.send, chunk.recv, chunk.peer_out);
    chunk.score_in =
        exchange(ops::permute(topk_score.slice(0, chunk.begin, chunk.end), chunk.sorted_pair, chunk.pair_pos),
                 chunk.send, chunk.recv, chunk.peer_out);
    const at::Tensor tokens = chunk.sorted_pair.div(world, "floor");
    const at::Tensor idx_in = exchange(topk_idx.slice(0, chunk.begin, chunk.end).index_select(0, tokens), chunk.send,
                                       chunk.recv, chunk.peer_out);
    const at::Tensor mine = idx_in.div(local, "floor") == rank_;  // -1 / local < 0: never mine
    const ops::Plan local_plan = ops::make_plan(at::where(mine, idx_in - rank_ * local, -1), local);
    chunk.slot_order = local_plan.sorted_pair.slice(0, 0, chunk.bounds[local]);
    chunk.slot_pos = local_plan.pair_pos;
    chunk.rows = ops::permute(x_in, chunk.slot_order, chunk.slot_pos);  // [slots, width], grouped by local expert
    chunk.counts = local_plan.expert_counts;
    chunk.offsets = local_plan.expert_offsets;
  }
}

const TokenDispatch::Chunk& TokenDispatch::chunk_at(int64_t chunk) const {
  TORCH_CHECK(chunk >= 0 && chunk < num_chunks(), "chunk must be in [0, ", num_chunks(), "), got ", chunk);
  return chunks_[chunk];
}

at::Tensor TokenDispatch::rows(int64_t chunk) const {
  return chunk_at(chunk).rows;
}

at::Tensor TokenDispatch::expert_counts(int64_t chunk) const {
  return chunk_at(chunk).counts;
}

at::Tensor TokenDispatch::expert_offsets(int64_t chunk) const {
  return chunk_at(chunk).offsets;
}

std::vector<int64_t> TokenDispatch::expert_bounds(int64_t chunk) {
  chunk_at(chunk);  // checks the index
  Chunk& c = chunks_[chunk];
  if (c.bounds.empty()) {
    TORCH_CHECK(!c.offsets.is_meta(),
                "expert_bounds reads the expert offsets on the host, which a meta tensor has "
                "not; per-expert modules need real tensors");
    const at::Tensor host = c.offsets.cpu();
    const int64_t* b = host.const_data_ptr<int64_t>();
    c.bounds.assign(b, b + host.numel());
  }
  return c.bounds;
}

void TokenDispatch::enter(int64_t chunk) {
  const Chunk& c = chunk_at(chunk);
  TORCH_CHECK(!entered_from_, "enter(", chunk, ") while another chunk's stream is current; call leave first");
  if (c.stream) entered_from_ = c10::impl::VirtualGuardImpl(c.stream->device_type()).exchangeStream(*c.stream);
}

void TokenDispatch::leave(int64_t chunk) {
  const Chunk& c = chunk_at(chunk);
  if (c.stream && entered_from_) {
    c10::impl::VirtualGuardImpl(c.stream->device_type()).exchangeStream(*entered_from_);
    entered_from_.reset();
  }
}

at::Tensor ops::pair_scores(const at::Tensor& score, const at::Tensor& pairs, const at::Tensor& pair_pos) {
  // No scores (every pair -1): zeros, still on score's graph. Under expert parallelism `score` is what an exchange
  // delivered, whose backward is a collective: a rank that received no rows must reach it like the others.
  if (score.numel() == 0) return at::zeros({pairs.size(0)}, score.options()) + score.sum();
  // The plan read as one of k = 1 over the flattened pairs: permute's gather of one-value rows (zero for -1), whose
  // backward, a combine of one slot per pair (zero for a pair without a row), is the scores' gradient. One kernel
  // each way on CUDA, where indexing and masking in ATen took about five forward and four backward.
  return ops::permute(score.reshape({-1, 1}), pairs, pair_pos.reshape({-1, 1})).view({-1});
}

at::Tensor ops::pair_scores_backward(const at::Tensor& grad_rows, const at::Tensor& score, const at::Tensor& pairs,
                                     const at::Tensor& pair_pos) {
  if (score.numel() == 0) return at::zeros_like(score);
  return ops::unpermute_combine(grad_rows.reshape({-1, 1}), pairs, pair_pos.reshape({-1, 1}), std::nullopt)
      .view(score.sizes());
}

at::Tensor TokenDispatch::row_scores(int64_t chunk) const {
  const Chunk& c = chunk_at(chunk);
  return group_.empty() ? ops::pair_scores(topk_score_, c.sorted_pair, c.pair_pos)
                        : ops::pair_scores(c.score_in, c.slot_order, c.slot_pos);
}

void TokenDispatch::give(int64_t chunk, const at::Tensor& y, bool scored) {
  chunk_at(chunk);  // checks the index
  Chunk& c = chunks_[chunk];
  TORCH_CHECK(!c.output.defined(), "give(", chunk, ") was already called for this chunk");
  TORCH_CHECK(y.defined() && y.dim() == 2 && y.size(0) == c.rows.size(0), "the experts' output of chunk ", chunk,
              " must be [", c.rows.size(0), ", d_out] (one row per input row), got ", shape_of(y));
  if (!debug_name_.empty() && debug_enabled()) check_finite(y, debug_name_, "expert outputs (y_sorted)");
  c.scored = scored;
  if (group_.empty()) {
    c.output = y;
    return;
  }
  const StreamGuard on(c.stream);
  // This rank's share of each received token: its slots here, weighted by their scores; then back to the sender.
  const at::Tensor partial = ops::unpermute_combine(y, c.slot_order, c.slot_pos, combine_weights(scored, c.score_in));
  c.output = exchange(partial, c.recv, c.send, c.peer_back);
}

at::Tensor TokenDispatch::exchange(const at::Tensor& x, const std::vector<int64_t>& send,
                                   const std::vector<int64_t>& recv, const at::Tensor& peers) const {
  if (node_group_.empty()) return ops::exchange(x, send, recv, group_);
  return ops::exchange_hierarchical(x, send, recv, group_, node_group_, rail_group_, std::nullopt, peers);
}

// Each exchange of the hierarchical kind needs to know what its node peers send through this rank to each node
// (csrc/runtime/communicator.h). Every chunk's dispatch exchanges move `send` rows and give's moves `recv`, and
// each one's backward the other: so each rank tells node peer j, once, its send and recv counts towards the ranks
// on j's rail for every chunk, and every exchange of the forward and the backward takes its share of the answer.
void TokenDispatch::ask_node_peers(const c10::Device& device) {
  const int64_t local_size = runtime::group_size(node_group_), nodes = world_ / local_size;
  const int64_t n = num_chunks();
  std::vector<at::Tensor> per_chunk;  // [L, 2, N] each: send, then recv, by rail
  for (const Chunk& c : chunks_) {
    per_chunk.push_back(
        at::stack({runtime::rail_counts(c.send, local_size), runtime::rail_counts(c.recv, local_size)}, 1));
  }
  const at::Tensor mine = at::stack(per_chunk, 1);  // [L, n, 2, N]
  const at::Tensor theirs =
      runtime::exchange_peer_counts(mine.view({local_size, -1}), node_group_, device).view({local_size, n, 2, nodes});
  for (int64_t c = 0; c < n; ++c) {
    // [L, 2, N] -> [2, L, N]: [0] the dispatch direction, [1] give's
    chunks_[c].peer_out = theirs.select(1, c).transpose(0, 1).contiguous();
    chunks_[c].peer_back = chunks_[c].peer_out.flip(0);
  }
}

at::Tensor TokenDispatch::combine() {
  for (int64_t c = 0; c < num_chunks(); ++c) {
    TORCH_CHECK(chunks_[c].output.defined(), "combine() needs the experts' output of every chunk; chunk ", c,
                " has none (call give)");
  }
  if (group_.empty()) {
    const Chunk& c = chunks_[0];
    return ops::unpermute_combine(c.output, c.sorted_pair, c.pair_pos, combine_weights(c.scored, topk_score_));
  }
  std::vector<at::Tensor> ys;
  for (Chunk& c : chunks_) {
    if (c.stream) {
      wait_for(*caller_stream_, *c.stream);
      c.output.record_stream(*caller_stream_);
    }
    ys.push_back(ops::unpermute_combine(c.output, c.sorted_pair, c.pair_pos, std::nullopt));
  }
  const at::Tensor y = ys.size() == 1 ? ys[0] : at::cat(ys);
  if (replicated_.empty()) return y;
  TORCH_CHECK(replicas_.output.defined(), "combine() needs the copies' output (call give_replicas) for the ",
              replicated_.size(), " replicated experts");
  return y + ops::unpermute_combine(replicas_.output, replicas_.sorted_pair, replicas_.pair_pos,
                                    combine_weights(replicas_.scored, topk_score_));
}

// Debug mode. The message ends the way fastmoe.debug.raising_non_finite (python/fastmoe/debug.py) recognises to
// raise NonFiniteError.
void check_finite(const at::Tensor& t, const std::string& owner, const std::string& what) {
  if (!t.is_floating_point() || t.is_meta() || t.numel() == 0) return;
  const at::Tensor values = t.detach();
  const at::Tensor finite = at::isfinite(values);
  if (finite.all().item<bool>()) return;
  const int64_t num_nan = at::isnan(values).sum().item<int64_t>();
  const int64_t num_inf = at::isinf(values).sum().item<int64_t>();
  // nonzero() may be column-major: contiguous before the index is read as an array
  const at::Tensor first = at::logical_not(finite).nonzero()[0].cpu().contiguous();
  std::vector<int64_t> index(first.const_data_ptr<int64_t>(), first.const_data_ptr<int64_t>() + first.numel());
  at::Tensor value = values;
  for (int64_t i : index) value = value[i];
  TORCH_CHECK(false, owner, ": ", what, " of shape ", t.sizes(), " hold ", num_nan, " NaN and ", num_inf,
              " Inf values (first at index ", c10::IntArrayRef(index), ", value ", value.item<double>(),
              "); fastmoe debug mode is on (fastmoe.set_debug(False) lets them propagate, see docs/reliability.md)");
}

void TokenDispatch::check_routing(const at::Tensor& topk_idx, const at::Tensor& topk_score) const {
  check_finite(topk_score, debug_name_, "gate scores (topk_score)");
  if (topk_idx.is_meta() || topk_idx.numel() == 0) return;
  const int64_t num_experts = num_local_ * world_;
  const at::Tensor bad = at::logical_or(topk_idx < -1, topk_idx >= num_experts);
  if (!bad.any().item<bool>()) return;
  const at::Tensor first = bad.nonzero()[0].cpu();
  const int64_t t = first[0].item<int64_t>(), j = first[1].item<int64_t>();
  TORCH_CHECK_VALUE(false, debug_name_, ": the gate's topk_idx holds ", bad.sum().item<int64_t>(),
                    " expert ids outside [-1, num_experts=", num_experts, ") (first at index [", t, ", ", j,
                    "], value ", topk_idx[t][j].item<int64_t>(), ")");
}

TORCH_LIBRARY_FRAGMENT(fastmoe, m) {
  m.class_<TokenDispatch>("TokenDispatch")
      .def(torch::init([](const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_score,
                          int64_t num_local, int64_t world, std::string group_name, int64_t chunks,
                          bool cast_to_autocast, std::string debug_name, std::string node_group, std::string rail_group,
                          int64_t replicate_max, int64_t expert_params, int64_t param_bytes, double gemm_flops,
                          double link_bytes) {
             return c10::make_intrusive<TokenDispatch>(
                 x, topk_idx, topk_score, num_local, world, std::move(group_name), chunks, cast_to_autocast,
                 std::move(debug_name), std::move(node_group), std::move(rail_group),
                 Replication{replicate_max, expert_params, param_bytes, gemm_flops, link_bytes});
           }),
           "",
           {torch::arg("x"), torch::arg("topk_idx"), torch::arg("topk_score"), torch::arg("num_local"),
            torch::arg("world"), torch::arg("group_name"), torch::arg("chunks"), torch::arg("cast_to_autocast"),
            torch::arg("debug_name"), torch::arg("node_group") = "", torch::arg("rail_group") = "",
            torch::arg("replicate_max") = 0, torch::arg("expert_params") = 0, torch::arg("param_bytes") = 4,
            torch::arg("gemm_flops") = 0.0, torch::arg("link_bytes") = 0.0})
      .def("num_chunks", &TokenDispatch::num_chunks)
      .def("rows", &TokenDispatch::rows)
      .def("expert_counts", &TokenDispatch::expert_counts)
      .def("expert_offsets", &TokenDispatch::expert_offsets)
      .def("expert_bounds", &TokenDispatch::expert_bounds)
      .def("routed_counts", &TokenDispatch::routed_counts)
      .def("enter", &TokenDispatch::enter)
      .def("leave", &TokenDispatch::leave)
      .def("row_scores", &TokenDispatch::row_scores)
      .def("give", &TokenDispatch::give, "", {torch::arg("chunk"), torch::arg("y"), torch::arg("scored") = false})
      .def("replicated", &TokenDispatch::replicated)
      .def("replica_rows", &TokenDispatch::replica_rows)
      .def("replica_counts", &TokenDispatch::replica_counts)
      .def("replica_offsets", &TokenDispatch::replica_offsets)
      .def("replica_bounds", &TokenDispatch::replica_bounds)
      .def("replica_scores", &TokenDispatch::replica_scores)
      .def("give_replicas", &TokenDispatch::give_replicas, "", {torch::arg("y"), torch::arg("scored") = false})
      .def("combine", &TokenDispatch::combine);
}

TORCH_LIBRARY_IMPL(fastmoe, CompositeImplicitAutograd, m) {
  m.impl("check_finite", [](const at::Tensor& t, c10::string_view owner, c10::string_view what) {
    check_finite(t, std::string(owner), std::string(what));
  });
}

}  // namespace fastmoe
