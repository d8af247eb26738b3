#include "runtime/communicator.h"

#include <chrono>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <utility>

#include "fastmoe/distributed.h"
#include "ops/common.h"

#ifdef FASTMOE_WITH_NCCL
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "kernels/comm/nccl_comm.h"
#endif

namespace fastmoe::runtime {

c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const std::string& group_name) {
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  try {
    group = c10d::resolve_process_group(group_name);
  } catch (const std::exception& error) {
    TORCH_CHECK(false, "group_name '", group_name,
                "' names no torch.distributed process group in this process (create it with "
                "torch.distributed.init_process_group / new_group first): ",
                error.what());
  }
  TORCH_CHECK(group, "group_name '", group_name, "' names no torch.distributed process group in this process");
  return group;
}

int group_rank(const std::string& group_name) {
  return resolve_group(group_name)->getRank();
}

int group_size(const std::string& group_name) {
  return resolve_group(group_name)->getSize();
}

// True when the group can run collectives on CPU tensors (gloo, alone or beside NCCL); a NCCL-only group needs
// its small control messages (the NCCL id, configuration checks) on a CUDA device instead.
namespace {
bool has_cpu_backend(const c10d::ProcessGroup& group) {
  for (const auto& device : group.getDeviceTypes()) {
    if (device.is_cpu()) return true;
  }
  return false;
}
}  // namespace

std::chrono::milliseconds exchange_timeout() {
  static const std::chrono::milliseconds timeout = [] {
    const char* value = std::getenv("FASTMOE_COMM_TIMEOUT");
    double seconds = 60.0;
    if (value != nullptr && *value != '\0') {
      char* end = nullptr;
      seconds = std::strtod(value, &end);
      TORCH_CHECK(end != value && *end == '\0' && seconds > 0, "FASTMOE_COMM_TIMEOUT must be a positive number of ",
                  "seconds, got '", value, "'");
    }
    return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
  }();
  return timeout;
}

namespace {

void all_to_all_rows_pg(const at::Tensor& input, const at::Tensor& output, const std::vector<int64_t>& send_rows,
                        const std::vector<int64_t>& recv_rows, const std::string& group_name) {
  auto group = resolve_group(group_name);
  at::Tensor in = input, out = output;
  std::vector<int64_t> in_splits = send_rows, out_splits = recv_rows;
  c10d::AllToAllOptions options;
  options.timeout = exchange_timeout();
  auto work = group->alltoall_base(out, in, out_splits, in_splits, options);
  work->wait(exchange_timeout());
}

#ifdef FASTMOE_WITH_NCCL
// One NCCL communicator per (group, device), with its stream and the event that orders it after the caller's
// stream. Created on first use by every rank of the group at the same exchange.
//
// NCCL never times out by itself: a peer that raised, exited or stopped calling the exchanges leaves this rank's
// NCCL kernels waiting forever. So every exchange records an event with a deadline, and a watchdog thread checks
// them: when one misses its deadline (FASTMOE_COMM_TIMEOUT) or NCCL reports an asynchronous error, the watchdog
// aborts the communicator, which ends its kernels (their outputs are then garbage), and every later exchange on
// the group raises the reason instead of touching the broken communicator.
struct Pending {
  cudaEvent_t done;
  std::chrono::steady_clock::time_point deadline;
};

struct NcclState {
  std::string group;
  int device = 0, rank = 0, world = 1;
  comm::NcclComm* comm = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t ready = nullptr;
  std::mutex mutex;  // guards the fields below (the watchdog runs on another thread)
  std::deque<Pending> pending;
  std::string error;
};

// Never destroyed: the detached watchdog thread may still read them while the process exits.
std::mutex& states_mutex() {
  static auto* mutex = new std::mutex();
  return *mutex;
}
std::map<std::pair<std::string, int>, std::unique_ptr<NcclState>>& states() {
  static auto* map = new std::map<std::pair<std::string, int>, std::unique_ptr<NcclState>>();
  return *map;
}

void fail_locked(NcclState& state, const std::string& why) {
  if (!state.error.empty()) return;
  state.error = "fastmoe: the NCCL exchange on group '" + state.group + "' (rank " + std::to_string(state.rank) +
                " of " + std::to_string(state.world) + ", cuda:" + std::to_string(state.device) + ") " + why +
                "; the communicator was aborted and this group cannot exchange any more";
  comm::nccl_comm_destroy(state.comm);  // ncclCommAbort: ends the waiting kernels
  state.comm = nullptr;
  for (auto& p : state.pending) cudaEventDestroy(p.done);  // released by CUDA once complete
  state.pending.clear();
}

void watchdog_loop() {
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    std::lock_guard<std::mutex> lock(states_mutex());
    const auto now = std::chrono::steady_clock::now();
    for (auto& entry : states()) {
      NcclState& state = *entry.second;
      std::lock_guard<std::mutex> state_lock(state.mutex);
      if (!state.error.empty()) continue;
      cudaSetDevice(state.device);
      while (!state.pending.empty() && cudaEventQuery(state.pending.front().done) == cudaSuccess) {
        cudaEventDestroy(state.pending.front().done);
        state.pending.pop_front();
      }
      const std::string async = comm::nccl_comm_async_error(state.comm);
      if (!async.empty()) {
        fail_locked(state, "failed: NCCL reported '" + async + "' (a peer may have exited)");
      } else if (!state.pending.empty() && now > state.pending.front().deadline) {
        const auto seconds = std::chrono::duration_cast<std::chrono::milliseconds>(exchange_timeout()).count() / 1e3;
        fail_locked(state, "did not complete within " + std::to_string(seconds) +
                               " s (FASTMOE_COMM_TIMEOUT): a peer failed, exited or stopped calling the exchanges");
      }
    }
  }
}

void start_watchdog() {
  static std::once_flag once;
  std::call_once(once, [] { std::thread(watchdog_loop).detach(); });
}

NcclState& nccl_state(const std::string& group_name, int device) {
  std::lock_guard<std::mutex> lock(states_mutex());
  auto& slot = states()[{group_name, device}];
  if (slot) return *slot;
  auto group = resolve_group(group_name);
  // Rank 0 makes the id; the group broadcasts it, on the CPU when the group has a CPU backend (gloo), else on
  // this device (a NCCL-only group).
  const bool has_cpu = has_cpu_backend(*group);
  at::Tensor id = at::zeros({static_cast<int64_t>(comm::kNcclUniqueIdBytes)}, at::kByte);
  if (group->getRank() == 0) comm::nccl_unique_id(id.mutable_data_ptr<uint8_t>());
  std::vector<at::Tensor> bcast{has_cpu ? id : id.to(at::Device(at::kCUDA, device))};
  group->broadcast(bcast)->wait();
  id = bcast[0].cpu();
  auto state = std::make_unique<NcclState>();
  state->group = group_name;
  state->device = device;
  state->rank = group->getRank();
  state->world = group->getSize();
  ops_detail::call_kernel(
      [&] { state->comm = comm::nccl_comm_create(id.const_data_ptr<uint8_t>(), state->world, state->rank, device); });
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  int low = 0, high = 0;
  C10_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&low, &high));
  C10_CUDA_CHECK(cudaStreamCreateWithPriority(&state->stream, cudaStreamNonBlocking, high));
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&state->ready, cudaEventDisableTiming));
  slot = std::move(state);
  start_watchdog();
  return *slot;
}

void all_to_all_rows_nccl(const at::Tensor& input, const at::Tensor& output, const std::vector<int64_t>& send_rows,
                          const std::vector<int64_t>& recv_rows, const std::string& group_name) {
  const int device = input.device().index();
  const c10::cuda::CUDAGuard guard(input.device());
  NcclState& state = nccl_state(group_name, device);
  std::lock_guard<std::mutex> lock(state.mutex);
  TORCH_CHECK(state.error.empty(), state.error);
  int64_t row_bytes = input.element_size();
  for (int64_t d = 1; d < input.dim(); ++d) row_bytes *= input.size(d);
  const size_t world = send_rows.size();
  std::vector<int64_t> send_offset(world), send_bytes(world), recv_offset(world), recv_bytes(world);
  int64_t send_at = 0, recv_at = 0;
  for (size_t p = 0; p < world; ++p) {
    send_offset[p] = send_at;
    send_bytes[p] = send_rows[p] * row_bytes;
    send_at += send_bytes[p];
    recv_offset[p] = recv_at;
    recv_bytes[p] = recv_rows[p] * row_bytes;
    recv_at += recv_bytes[p];
  }
  const cudaStream_t caller = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  C10_CUDA_CHECK(cudaEventRecord(state.ready, caller));
  C10_CUDA_CHECK(cudaStreamWaitEvent(state.stream, state.ready, 0));
  // The buffers were allocated on the caller's stream; tell the caching allocator they are also used here.
  const auto comm_stream = c10::cuda::getStreamFromExternal(state.stream, static_cast<c10::DeviceIndex>(device));
  if (input.numel() > 0) c10::cuda::CUDACachingAllocator::recordStream(input.storage().data_ptr(), comm_stream);
  if (output.numel() > 0) c10::cuda::CUDACachingAllocator::recordStream(output.storage().data_ptr(), comm_stream);
  ops_detail::call_kernel([&] {
    comm::nccl_all_to_all(state.comm, input.const_data_ptr(), send_offset.data(), send_bytes.data(),
                          output.mutable_data_ptr(), recv_offset.data(), recv_bytes.data(), state.stream);
  });
  cudaEvent_t done = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(done, state.stream));
  C10_CUDA_CHECK(cudaStreamWaitEvent(caller, done, 0));
  state.pending.push_back({done, std::chrono::steady_clock::now() + exchange_timeout()});
}
#endif

}  // namespace

void all_to_all_rows(const at::Tensor& input, const at::Tensor& output, const std::vector<int64_t>& send_rows,
                     const std::vector<int64_t>& recv_rows, const std::string& group_name) {
  TORCH_CHECK(input.is_contiguous() && output.is_contiguous(), "all_to_all_rows needs contiguous tensors");
  if (send_rows.size() == 1) {  // a one-rank group exchanges with itself: a copy on the caller's stream
    TORCH_CHECK(send_rows[0] == recv_rows[0], "a one-rank group sends ", send_rows[0], " rows to itself but expects ",
                recv_rows[0]);
    output.copy_(input);
    return;
  }
  if (input.is_cuda()) {
#ifdef FASTMOE_WITH_NCCL
    return all_to_all_rows_nccl(input, output, send_rows, recv_rows, group_name);
#else
    TORCH_CHECK(false, "this fastmoe build has no NCCL, so it cannot exchange CUDA tensors (rebuild with NCCL found)");
#endif
  }
  all_to_all_rows_pg(input, output, send_rows, recv_rows, group_name);
}

void check_same_config(const std::string& group_name, const std::vector<std::string>& names,
                       const std::vector<int64_t>& values, const std::string& what) {
  TORCH_CHECK(names.size() == values.size(), "check_same_config: ", names.size(), " names for ", values.size(),
              " values");
  auto group = resolve_group(group_name);
  const bool has_cpu = has_cpu_backend(*group);
  at::Tensor mine = at::tensor(values, at::kLong);
  if (!has_cpu) mine = mine.cuda();
  std::vector<at::Tensor> input{mine};
  std::vector<std::vector<at::Tensor>> output(1);
  for (int r = 0; r < group->getSize(); ++r) output[0].push_back(at::empty_like(mine));
  group->allgather(output, input)->wait();
  std::string problems;
  const at::Tensor reference = output[0][0].cpu();
  for (int r = 1; r < group->getSize(); ++r) {
    const at::Tensor other = output[0][r].cpu();
    for (size_t i = 0; i < names.size(); ++i) {
      const int64_t a = reference[i].item<int64_t>(), b = other[i].item<int64_t>();
      if (a != b) {
        problems += (problems.empty() ? "" : "; ") + std::string("rank ") + std::to_string(r) + " has " + names[i] +
                    "=" + std::to_string(b) + " but rank 0 has " + names[i] + "=" + std::to_string(a);
      }
    }
  }
  TORCH_CHECK_VALUE(
      problems.empty(), what,
      " must be built with the same configuration on every rank of its expert-parallel group: ", problems);
}

bool has_nccl() {
#ifdef FASTMOE_WITH_NCCL
  return true;
#else
  return false;
#endif
}

}  // namespace fastmoe::runtime

namespace fastmoe::distributed {

void register_group(const std::string& name, const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
  TORCH_CHECK(group, "register_group('", name, "') got an empty process group");
  c10d::register_process_group(name, group);
}

int rank(const std::string& group_name) {
  return runtime::group_rank(group_name);
}

int world_size(const std::string& group_name) {
  return runtime::group_size(group_name);
}

bool has_nccl() {
  return runtime::has_nccl();
}

}  // namespace fastmoe::distributed
