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

// The time an exchange may wait for its peers before it raises (FASTMOE_COMM_TIMEOUT seconds, default 60).
std::chrono::milliseconds exchange_timeout();

// Sends rows [offset_p, offset_p + send_rows[p]) of `input` (contiguous, rows along dim 0, offsets the running
// sum of send_rows) to rank p, and receives recv_rows[p] rows from rank p into `output` (contiguous, rows
// stacked in rank order). input and output share dtype, device and row width; sum(send_rows) == input.size(0)
// and sum(recv_rows) == output.size(0).
void all_to_all_rows(const at::Tensor& input, const at::Tensor& output, const std::vector<int64_t>& send_rows,
                     const std::vector<int64_t>& recv_rows, const std::string& group_name);

// True when this build has the NCCL path for CUDA tensors.
bool has_nccl();

}  // namespace fastmoe::runtime
