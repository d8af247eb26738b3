// The expert-parallel exchange runtime: one all-to-all of rows over the ranks of a torch.distributed process
// group, named as torch names groups (ProcessGroup::getGroupName, Python's `group.group_name`).
//
// CPU tensors go through the group's own backend (gloo) with ProcessGroup::alltoall_base and split sizes.
// CUDA tensors go through a NCCL communicator that fastmoe owns: created on first use per (group, device),
// bootstrapped by broadcasting an ncclUniqueId over the group, never by reaching into torch's ProcessGroupNCCL.
// The NCCL work runs on a fastmoe-owned stream, ordered after the caller's current stream by an event, and the
// caller's stream waits on it by another event, so the op behaves like any stream-ordered CUDA op.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace c10d {
class ProcessGroup;
}

namespace fastmoe::runtime {

// The process group registered under group_name; a clear error if there is none.
c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const std::string& group_name);

// Rank and size of the group.
int group_rank(const std::string& group_name);
int group_size(const std::string& group_name);

// The time an exchange or a configuration check may wait for its peers before it raises (FASTMOE_COMM_TIMEOUT
// seconds, default 60; read once per process).
std::chrono::milliseconds exchange_timeout();

// Exchange headers. Every rank of a group must issue the same exchanges in the same order with the same dtypes
// and matching split sizes. When they do not (a rank skipped a backward, a rank's layer holds float64 parameters
// and another's float32, ranks cut their tokens into a different number of chunks), gloo's transport aborts the
// process on the size mismatch and NCCL waits forever. So each exchange is described by a small fixed-size
// header per peer (the phase below, the exchange's sequence number on the group, the dtype and row width, the
// rows each side sends and expects, and for a counts exchange what the token rows after it will be), and the
// ranks compare them before any payload of a different size can meet:
// - gloo (CPU tensors): every exchange first all-to-alls the headers (kHeaderWords int64 per peer: the same size
//   on every rank whatever it is doing) and raises on every rank that sees a difference. It costs one small
//   all-to-all per exchange, which is little next to gloo's own cost.
// - NCCL (CUDA tensors): the header rides in the counts exchange, which happens once per forward anyway, so it
//   adds no message and no host sync: its received copy lands in pinned host memory behind an event and is
//   checked at the group's next exchange, by which time the layer has read the counts on the host. The row
//   exchanges carry none (checking them would take a host sync each); their sizes follow from the counts the
//   header vouched for, and a peer that is out of step there makes NCCL wait, which the watchdog turns into an
//   error after FASTMOE_COMM_TIMEOUT. The sequence number still counts them, so a drift that did not stall is
//   reported at the next forward.
enum class ExchangePhase : int64_t { kForwardCounts = 1, kForwardRows = 2, kBackwardRows = 3 };

// Sets the phase of the row exchanges this thread issues while it lives (default: forward rows). exchange's
// autograd backward sets kBackwardRows, so a rank still in a forward and one already in a backward tell which.
class ExchangePhaseGuard {
 public:
  explicit ExchangePhaseGuard(ExchangePhase phase);
  ~ExchangePhaseGuard();
  ExchangePhaseGuard(const ExchangePhaseGuard&) = delete;
  ExchangePhaseGuard& operator=(const ExchangePhaseGuard&) = delete;

 private:
  ExchangePhase previous_;
};

// What the row exchanges after a counts exchange will move, as the layer knows it; -1 where it does not say.
struct RowsInfo {
  int64_t dtype = -1;   // c10::ScalarType of the token rows
  int64_t width = -1;   // elements per token row (d_model)
  int64_t chunks = -1;  // chunks the counts describe (FMoE's ep_chunks)
};

// Sends rows [offset_p, offset_p + send_rows[p]) of `input` (contiguous, rows along dim 0, offsets the running
// sum of send_rows) to rank p, and receives recv_rows[p] rows from rank p into `output` (contiguous, rows
// stacked in rank order). input and output share dtype, device and row width; sum(send_rows) == input.size(0)
// and sum(recv_rows) == output.size(0). Checks the header first (see above) and raises on a mismatch.
void all_to_all_rows(const at::Tensor& input, const at::Tensor& output, const std::vector<int64_t>& send_rows,
                     const std::vector<int64_t>& recv_rows, const std::string& group_name);

// The same exchange in two levels, for W = N * L ranks on N nodes of L GPUs each, rank r = node * L + local:
// - the node step, over `node_group` (this node's L ranks, rank `local` in it): each row goes to the rank of this
//   node whose local index is its destination's (the destination's "rail");
// - the rail step, over `rail_group` (the N ranks of this local index, one per node, rank `node` in it): each row
//   crosses to its destination's node, so a row uses the links between nodes once, and only on its rail.
// Before them, each rank tells its node peers how many rows it sends to each rank of their rail (a [L, N] int64
// all-to-all over node_group, exchange_peer_counts), unless `peer_counts` ([L, N] int64 on the CPU: row j, what
// node peer j sends through this rank to each node) brings them already. The rows are
// restacked between the steps so that `output` comes out exactly as all_to_all_rows orders it (rows stacked by
// source rank, each source's rows in their send order): the result is the flat exchange's, bit for bit.
void all_to_all_rows_hierarchical(const at::Tensor& input, const at::Tensor& output,
                                  const std::vector<int64_t>& send_rows, const std::vector<int64_t>& recv_rows,
                                  const std::string& node_group, const std::string& rail_group,
                                  const at::Tensor& peer_counts = at::Tensor());

// `rows` (rows to each of the W = N * L ranks) by rail: [L, N] int64 on the CPU, entry [j, m] the rows to rank
// m * L + j, which the hierarchical exchange passes through node peer j.
at::Tensor rail_counts(const std::vector<int64_t>& rows, int64_t local_size);

// The node peers' counts of the hierarchical exchange: row j of `mine` ([L, K] int64 on the CPU) goes to node peer
// j, row j of the result comes from it. On the CPU where node_group has a CPU backend (no device sync); otherwise
// through NCCL on `device` and read back (one device sync). fastmoe::TokenDispatch sends the counts of all its
// exchanges this way once per forward.
at::Tensor exchange_peer_counts(const at::Tensor& mine, const std::string& node_group, const c10::Device& device);

// The counts exchange of a forward: row p of `input` ([world, per_rank] int64, contiguous) goes to rank p, and
// row p of `output` comes from rank p. Carries the header with `rows` (see above).
void all_to_all_counts(const at::Tensor& input, const at::Tensor& output, const RowsInfo& rows,
                       const std::string& group_name);

// True when this build has the NCCL path for CUDA tensors.
bool has_nccl();

// Raises ValueError on every rank of the group when the configuration (`values` named by `names`) differs between
// ranks, naming each rank, field and value that differs from rank 0's (a name missing on a rank reads "None").
// `what` names the thing being checked (e.g. "TransformerMLP(world_size=2)"). The one check of both front ends
// (Python: fastmoe.distributed.check_same_config, through the op of the same name). A collective over the group;
// raises after exchange_timeout() when a rank does not join it (for example one built its layer with a different
// world_size).
void check_same_config(const std::string& group_name, const std::vector<std::string>& names,
                       const std::vector<std::string>& values, const std::string& what);
// The same with integer values.
void check_same_config(const std::string& group_name, const std::vector<std::string>& names,
                       const std::vector<int64_t>& values, const std::string& what);

}  // namespace fastmoe::runtime
