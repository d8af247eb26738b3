// The token path of an MoE layer, composed once, in C++: both front ends (fastmoe.FMoE in Python, fastmoe::nn::MoE
// and TransformerMLP in libtorch) build a TokenDispatch from the gate's routing, run their experts on each chunk of
// rows it hands out, give the outputs back and call combine. Everything between the gate and the experts, and
// between the experts and the layer's output, happens here:
//
//   one process:      plan -> permute                  | experts |  weighted combine
//   expert parallel:  route to ranks -> counts exchange (one host read) -> per chunk: permute, row exchange,
//                     plan by local expert, permute    | experts |  weighted combine of this rank's slots,
//                     exchange back; then the per-token sum of what came back
//
// Every step is a registered op (include/fastmoe/ops.h) with its C++ autograd, so gradients flow through the
// object to the input rows and the scores. With chunks > 1 on CUDA, chunk c > 0 runs on a side stream from the
// device's stream pool, so one chunk's exchange overlaps another chunk's experts; the object orders the streams by
// events and keeps the tensors alive for the streams that use them (docs/distributed.md, "Overlap").
//
// Python: torch.classes.fastmoe.TokenDispatch(x, topk_idx, topk_score, num_local, world, group_name, chunks,
// cast_to_autocast, debug_name, node_group="", rail_group="", replicate_max=0, expert_params=0, param_bytes=4,
// gemm_flops=0.0, link_bytes=0.0), with the methods below (docs/ops.md, "Token path").
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Stream.h>
#include <torch/custom_class.h>

#include <optional>
#include <string>
#include <vector>

#include "fastmoe/debug.h"

namespace fastmoe {

// Debug mode's check of one tensor: raises (c10::Error) when floating-point `t` holds NaN or Inf, naming `owner`
// (the layer or gate), `what`, the NaN and Inf counts and the first such index and value; returns for finite,
// non-float, meta and empty tensors. One host read. Callers check debug_enabled() first. Python:
// torch.ops.fastmoe.check_finite, which fastmoe.debug.check_finite turns into NonFiniteError.
void check_finite(const at::Tensor& t, const std::string& owner, const std::string& what);

// Hot-expert replication for one forward (docs/distributed.md, "Hot-expert replication"). With max_experts > 0
// under expert parallelism the ranks gather each other's slots per global expert (one small exchange and a host
// read), run the policy of csrc/ref/replication.h on them, and each rank then computes its own slots of the chosen
// experts itself, with copies of their weights (ops::replicate_experts, whose backward sums the copies' gradients
// back into the owner's), instead of sending those rows to the owners. The policy's costs come from these numbers.
struct Replication {
  int64_t max_experts = 0;    // experts copied per forward at most; 0: off
  int64_t expert_params = 0;  // parameters of one expert: 6 * expert_params FLOPs per row, forward and backward
  int64_t param_bytes = 4;    // bytes per parameter as copied
  double gemm_flops = 0.0;    // the experts' GEMM rate, FLOP/s; 0: the rows' device's default (replication.cpp)
  double link_bytes = 0.0;    // bytes/s from one rank to each other; 0: the rows' device's default
};

class TokenDispatch : public torch::CustomClassHolder {
 public:
  // x [T, width] (the rows the experts get), topk_idx [T, k] int64 global expert ids (-1 = empty slot), topk_score
  // [T, k]. The layer holds num_local experts of num_local * world; global expert g lives on rank g / num_local of
  // the process group registered as group_name ("" = no expert parallelism, then world must be 1). chunks >= 1
  // cuts the tokens into that many pieces for overlap (expert parallelism only; the result does not depend on it).
  // cast_to_autocast: under autocast the rows are cast to the autocast dtype before they move (the experts' first
  // op would cast them anyway; fp64 rows stay). debug_name: with debug mode on (fastmoe/debug.h), the routing
  // and the experts' outputs are checked and errors name this layer. node_group and rail_group (both or neither):
  // the row exchanges are hierarchical over these sub-groups of group_name (ops::exchange_hierarchical,
  // docs/distributed.md), with results equal to the flat exchange's bit for bit. replication: see Replication.
  TokenDispatch(const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_score, int64_t num_local,
                int64_t world = 1, std::string group_name = "", int64_t chunks = 1, bool cast_to_autocast = false,
                std::string debug_name = "", std::string node_group = "", std::string rail_group = "",
                Replication replication = {});

  int64_t num_chunks() const { return static_cast<int64_t>(chunks_.size()); }
  // The rows chunk c's local experts must process, grouped by local expert: [N_c, width]. On one process N_c is
  // T * k and the rows past the routed ones are zero; with expert parallelism N_c is exactly the routed slots.
  at::Tensor rows(int64_t chunk) const;
  // Rows per local expert [num_local] and their exclusive prefix sum [num_local + 1] (int64, on the rows' device).
  at::Tensor expert_counts(int64_t chunk) const;
  at::Tensor expert_offsets(int64_t chunk) const;
  // The same offsets on the host: known without a device read under expert parallelism; on one process the first
  // call reads them (one sync).
  std::vector<int64_t> expert_bounds(int64_t chunk);
  // [num_local * world] int64: the slots of this rank's tokens per global expert (the load the gate asked for).
  at::Tensor routed_counts() const { return routed_counts_; }

  // Make chunk c's stream current for its experts, and give the caller's stream back afterwards. Nothing happens
  // off CUDA or with one chunk.
  void enter(int64_t chunk);
  void leave(int64_t chunk);
  // The routing score of each of rows(c): [N_c] in topk_score's dtype, 0 for the zero rows; differentiable with
  // respect to topk_score. Experts that multiply their rows by these themselves (ops::swiglu's scale, before the
  // second GEMM) give their output with scored = true, and the combine then only sums.
  at::Tensor row_scores(int64_t chunk) const;
  // The experts' output for chunk c: [N_c, width_out] in the order of rows(c); scored: the rows already carry their
  // row_scores(c) factor (weights of 1 in the combine). Under expert parallelism this sends the (weighted) partial
  // sums back right away (on the chunk's stream).
  void give(int64_t chunk, const at::Tensor& y, bool scored = false);
  // Hot-expert replication: the global ids of the experts copied this forward (ascending; empty when replication
  // is off or the policy copied none), the rows of this rank's slots that the copies must process, grouped by
  // copy in the order of replicated() ([N_r, width], exactly the routed slots), their counts and offsets [m] and
  // [m + 1] (device), the same offsets on the host, their scores (as row_scores), and give_replicas for the
  // copies' output [N_r, width_out] (scored as in give).
  std::vector<int64_t> replicated() const { return replicated_; }
  at::Tensor replica_rows() const;
  at::Tensor replica_counts() const;
  at::Tensor replica_offsets() const;
  std::vector<int64_t> replica_bounds() const;
  at::Tensor replica_scores() const;
  void give_replicas(const at::Tensor& y, bool scored = false);

  // y [T, width_out]: each token's slots summed, weighted by its scores (unless given scored). Needs every chunk's
  // output (and the copies' output when replicated() is not empty).
  at::Tensor combine();

 private:
  struct Chunk {
    int64_t begin = 0, end = 0;                 // the chunk's tokens
    std::optional<c10::Stream> stream;          // side stream (chunk > 0, CUDA, chunks > 1)
    at::Tensor sorted_pair, pair_pos;           // one process: the plan; expert parallel: the plan by destination rank
    std::vector<int64_t> send, recv;            // rows sent to / received from each rank
    at::Tensor score_in, slot_order, slot_pos;  // expert parallel: received scores, plan by local expert
    at::Tensor rows, counts, offsets;
    std::vector<int64_t> bounds;  // empty until known
    at::Tensor output;            // give(): experts' output (one process) or what came back (expert parallel)
    bool scored = false;          // give(): the output carries the scores
    // hierarchical exchange: the node peers' counts ([2, L, N]) of the chunk's dispatch exchanges and of give's
    at::Tensor peer_out, peer_back;
  };
  // The copies' share of the token path: their slots as one process runs them.
  struct Replicas {
    at::Tensor sorted_pair, pair_pos, rows, counts, offsets;
    std::vector<int64_t> bounds;
    at::Tensor output;
    bool scored = false;
  };
  const Chunk& chunk_at(int64_t chunk) const;
  // Gathers the loads, runs the policy and plans the copies' rows; returns topk_idx without the copied slots.
  at::Tensor replicate_hot(const at::Tensor& x, const at::Tensor& topk_idx, const Replication& replication);
  const Replicas& replicas_checked() const;
  void check_routing(const at::Tensor& topk_idx, const at::Tensor& topk_score) const;
  void expert_parallel(const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_score);
  // The row exchange over group_ (ops::exchange), or its hierarchical form when node_group_ is set, given the node
  // peers' counts (`peers`, asked once per forward for every exchange of every chunk).
  at::Tensor exchange(const at::Tensor& x, const std::vector<int64_t>& send, const std::vector<int64_t>& recv,
                      const at::Tensor& peers) const;
  // The node peers' counts of every chunk's exchanges, in one collective over node_group_.
  void ask_node_peers(const c10::Device& device);

  int64_t num_tokens_ = 0, num_local_ = 0, world_ = 1, rank_ = 0;
  std::string group_;
  std::string node_group_, rail_group_;  // both empty: the flat exchange
  std::string debug_name_;
  at::Tensor topk_score_;  // one process, and the copies' slots: the combine's weights
  at::Tensor routed_counts_;
  std::vector<Chunk> chunks_;
  std::vector<int64_t> replicated_;
  Replicas replicas_;
  std::optional<c10::Stream> caller_stream_;  // the stream current at construction (CUDA, chunks > 1)
  std::optional<c10::Stream> entered_from_;   // the stream enter() replaced
};

}  // namespace fastmoe
