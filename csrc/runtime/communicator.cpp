#include "runtime/communicator.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>
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

// "5 s", "0.5 s": the timeout as the user wrote it.
std::string timeout_text() {
  std::ostringstream text;
  text << static_cast<double>(exchange_timeout().count()) / 1000.0 << " s";
  return text.str();
}

// Waits for `work` at most exchange_timeout(); on a timeout or a failure raises an error that names the
// collective, the group and the timeout (a gloo error alone names neither).
void wait_for(c10d::Work& work, const std::string& what, const std::string& group_name,
              const c10d::ProcessGroup& group) {
  std::string cause;
  try {
    if (work.wait(exchange_timeout())) return;
    cause = "the wait returned without completing";
  } catch (const c10::Error& error) {
    cause = error.what_without_backtrace();
  } catch (const std::exception& error) {
    cause = error.what();
  }
  TORCH_CHECK(false, "fastmoe: the ", what, " on group '", group_name, "' (rank ", group.getRank(), " of ",
              group.getSize(), ") failed or did not complete within ", timeout_text(),
              " (FASTMOE_COMM_TIMEOUT): a peer failed, exited, or is not calling the same collectives: ", cause);
}

// ------------------------------------------------------------------------------------------------ headers

constexpr int64_t kHeaderMagic = 0x464d4f4501;  // "FMOE", then the header's version

// The words of one header (what this rank tells one peer about the exchange both are about to run).
enum HeaderField : int64_t {
  kMagic,
  kPhase,
  kSequence,  // exchanges this process issued on the group before this one
  kDtype,     // of the payload (c10::ScalarType)
  kWidth,     // elements per payload row
  kSendRows,  // rows this rank sends the peer
  kRecvRows,  // rows this rank expects from the peer
  kRowDtype,  // counts exchanges: RowsInfo
  kRowWidth,
  kChunks,
  kHeaderWords
};

thread_local ExchangePhase current_phase = ExchangePhase::kForwardRows;

// The sequence number of the next exchange on `group`. Keyed by name, with the group itself held weakly so that
// a new group that reuses a destroyed one's name starts again from 0 on every rank.
int64_t next_sequence(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const std::string& group_name) {
  static auto* mutex = new std::mutex();
  static auto* counters = new std::map<std::string, std::pair<c10::weak_intrusive_ptr<c10d::ProcessGroup>, int64_t>>();
  std::lock_guard<std::mutex> lock(*mutex);
  auto found = counters->find(group_name);
  if (found == counters->end() || found->second.first.lock().get() != group.get()) {
    found = counters
                ->insert_or_assign(group_name,
                                   std::make_pair(c10::weak_intrusive_ptr<c10d::ProcessGroup>(group), int64_t{0}))
                .first;
  }
  return found->second.second++;
}

int64_t row_width(const at::Tensor& t) {
  int64_t width = 1;
  for (int64_t d = 1; d < t.dim(); ++d) width *= t.size(d);
  return width;
}

// headers [world, kHeaderWords]: row p is what this rank tells rank p.
std::vector<int64_t> make_headers(ExchangePhase phase, int64_t sequence, at::ScalarType dtype, int64_t width,
                                  const std::vector<int64_t>& send_rows, const std::vector<int64_t>& recv_rows,
                                  const RowsInfo& rows) {
  std::vector<int64_t> headers(send_rows.size() * kHeaderWords);
  for (size_t p = 0; p < send_rows.size(); ++p) {
    int64_t* h = headers.data() + p * kHeaderWords;
    h[kMagic] = kHeaderMagic;
    h[kPhase] = static_cast<int64_t>(phase);
    h[kSequence] = sequence;
    h[kDtype] = static_cast<int64_t>(dtype);
    h[kWidth] = width;
    h[kSendRows] = send_rows[p];
    h[kRecvRows] = recv_rows[p];
    h[kRowDtype] = rows.dtype;
    h[kRowWidth] = rows.width;
    h[kChunks] = rows.chunks;
  }
  return headers;
}

std::string phase_name(int64_t phase) {
  switch (phase) {
    case static_cast<int64_t>(ExchangePhase::kForwardCounts): return "forward counts";
    case static_cast<int64_t>(ExchangePhase::kForwardRows): return "forward row";
    case static_cast<int64_t>(ExchangePhase::kBackwardRows): return "backward row";
    default: return "unknown (" + std::to_string(phase) + ")";
  }
}

std::string dtype_name(int64_t code) {
  if (code < 0) return "unstated";
  if (code >= static_cast<int64_t>(at::ScalarType::NumOptions)) return "unknown (" + std::to_string(code) + ")";
  switch (static_cast<at::ScalarType>(code)) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    default: return c10::toString(static_cast<at::ScalarType>(code));
  }
}

// Compares what this rank told each peer (`sent`, [world, kHeaderWords]) with what each peer told it
// (`received`, row p from rank p), and raises naming every field that differs, with both values. Every rank runs
// this on the same headers, so a difference between two ranks raises on both.
void check_headers(const int64_t* sent, const int64_t* received, int world, int rank, const std::string& group_name,
                   ExchangePhase phase) {
  std::ostringstream problems;
  for (int p = 0; p < world; ++p) {
    if (p == rank) continue;
    const int64_t* mine = sent + static_cast<int64_t>(p) * kHeaderWords;
    const int64_t* theirs = received + static_cast<int64_t>(p) * kHeaderWords;
    std::vector<std::string> diffs;
    const auto differ = [&](HeaderField field) { return mine[field] != theirs[field]; };
    if (theirs[kMagic] != kHeaderMagic) {
      diffs.push_back("sent no fastmoe exchange header (it is in another collective, or runs another fastmoe)");
    } else {
      if (differ(kPhase)) {
        diffs.push_back("is in a " + phase_name(theirs[kPhase]) + " exchange but this rank is in a " +
                        phase_name(mine[kPhase]) + " exchange");
      }
      if (differ(kSequence)) {
        diffs.push_back("is at exchange #" + std::to_string(theirs[kSequence]) + " of the group but this rank at #" +
                        std::to_string(mine[kSequence]));
      }
      if (!differ(kPhase)) {
        const bool counts = mine[kPhase] == static_cast<int64_t>(ExchangePhase::kForwardCounts);
        if (differ(kDtype)) {
          diffs.push_back("sends " + dtype_name(theirs[kDtype]) + " rows but this rank " + dtype_name(mine[kDtype]));
        }
        if (differ(kWidth)) {
          diffs.push_back(counts ? "sends " + std::to_string(theirs[kWidth]) + " counts per rank but this rank " +
                                       std::to_string(mine[kWidth])
                                 : "sends rows of width " + std::to_string(theirs[kWidth]) +
                                       " but this rank of width " + std::to_string(mine[kWidth]));
        }
        if (theirs[kSendRows] != mine[kRecvRows]) {
          diffs.push_back("sends this rank " + std::to_string(theirs[kSendRows]) + " rows but this rank expects " +
                          std::to_string(mine[kRecvRows]));
        }
        if (theirs[kRecvRows] != mine[kSendRows]) {
          diffs.push_back("expects " + std::to_string(theirs[kRecvRows]) + " rows from this rank but this rank sends " +
                          std::to_string(mine[kSendRows]));
        }
        if (differ(kRowDtype)) {
          diffs.push_back("exchanges " + dtype_name(theirs[kRowDtype]) + " token rows but this rank " +
                          dtype_name(mine[kRowDtype]) + " (the layer's parameters differ in dtype)");
        }
        if (differ(kRowWidth)) {
          diffs.push_back("exchanges token rows of width " + std::to_string(theirs[kRowWidth]) +
                          " but this rank of width " + std::to_string(mine[kRowWidth]));
        }
        if (differ(kChunks)) {
          diffs.push_back("cuts its tokens into ep_chunks=" + std::to_string(theirs[kChunks]) +
                          " but this rank into ep_chunks=" + std::to_string(mine[kChunks]));
        }
      }
    }
    if (diffs.empty()) continue;
    problems << (problems.tellp() > 0 ? "; " : "") << "rank " << p << " ";
    for (size_t i = 0; i < diffs.size(); ++i) problems << (i > 0 ? ", " : "") << diffs[i];
  }
  const std::string text = problems.str();
  TORCH_CHECK(text.empty(), "fastmoe: exchange #", sent[kSequence], " on group '", group_name, "' (rank ", rank, " of ",
              world, ", a ", phase_name(static_cast<int64_t>(phase)),
              " exchange) does not match its peers, so nothing was exchanged: ", text,
              ". Every rank of the group must issue the same exchanges in the same order: the same forward and "
              "backward passes, through layers of the same configuration and parameter dtype (a rank that skipped "
              "a backward or ran an extra forward is out of step with the others)");
}

void all_to_all_rows_pg(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const at::Tensor& input,
                        const at::Tensor& output, const std::vector<int64_t>& send_rows,
                        const std::vector<int64_t>& recv_rows, const std::string& group_name, const std::string& what) {
  at::Tensor in = input, out = output;
  std::vector<int64_t> in_splits = send_rows, out_splits = recv_rows;
  c10d::AllToAllOptions options;
  options.timeout = exchange_timeout();
  auto work = group->alltoall_base(out, in, out_splits, in_splits, options);
  wait_for(*work, what, group_name, *group);
}

// gloo: the headers travel in an all-to-all of their own, kHeaderWords int64 per peer whatever the exchange,
// so two ranks that are out of step still meet with equal sizes; then both compare them.
void check_with_peers_pg(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const std::string& group_name,
                         std::vector<int64_t> sent, ExchangePhase phase) {
  const int64_t world = group->getSize();
  const at::Tensor in = at::from_blob(sent.data(), {world, kHeaderWords}, at::kLong).clone();
  const at::Tensor out = at::empty_like(in);
  const std::vector<int64_t> ones(world, 1);
  all_to_all_rows_pg(group, in, out, ones, ones, group_name,
                     "header all-to-all of a " + phase_name(static_cast<int64_t>(phase)) + " exchange");
  check_headers(sent.data(), out.const_data_ptr<int64_t>(), static_cast<int>(world), group->getRank(), group_name,
                phase);
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

// The header of the group's last counts exchange, not compared yet: its received copy lands in pinned host memory
// when `done` completes on the caller's stream.
struct HeaderCheck {
  std::vector<int64_t> sent;  // [world, kHeaderWords]
  at::Tensor received;        // [world, kHeaderWords] int64, pinned
  cudaEvent_t done = nullptr;
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
  std::optional<HeaderCheck> header_check;
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
  wait_for(*group->broadcast(bcast), "broadcast of the NCCL id", group_name, *group);
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

// Compares the header of the group's last counts exchange with the peers' (see communicator.h). The layers read
// the counts on the host right after that exchange, so by the next exchange the copy has landed and this does not
// wait; called before anything else is sent, so a mismatch raises before mismatched sizes meet in NCCL.
void check_pending_header(NcclState& state) {
  std::optional<HeaderCheck> check;
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    check.swap(state.header_check);
  }
  if (!check.has_value()) return;
  // Not under the state's lock: if the counts exchange stalled, this waits until the watchdog aborts it.
  const cudaError_t waited = cudaEventSynchronize(check->done);
  cudaEventDestroy(check->done);
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    TORCH_CHECK(state.error.empty(), state.error);
  }
  C10_CUDA_CHECK(waited);
  check_headers(check->sent.data(), check->received.const_data_ptr<int64_t>(), state.world, state.rank, state.group,
                ExchangePhase::kForwardCounts);
}

void all_to_all_rows_nccl(const at::Tensor& input, const at::Tensor& output, const std::vector<int64_t>& send_rows,
                          const std::vector<int64_t>& recv_rows, const std::string& group_name) {
  const int device = input.device().index();
  const c10::cuda::CUDAGuard guard(input.device());
  NcclState& state = nccl_state(group_name, device);
  check_pending_header(state);
  std::lock_guard<std::mutex> lock(state.mutex);
  TORCH_CHECK(state.error.empty(), state.error);
  const int64_t row_bytes = row_width(input) * static_cast<int64_t>(input.element_size());
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

// NCCL: the header rides in front of the counts ([world, kHeaderWords + per_rank] per exchange, one message as
// before) and is compared at the group's next exchange (check_pending_header): no extra message, no host sync.
void all_to_all_counts_nccl(const at::Tensor& input, const at::Tensor& output, const RowsInfo& rows,
                            const std::string& group_name, int64_t sequence) {
  const int64_t world = input.size(0), per_rank = input.size(1);
  const std::vector<int64_t> ones(world, 1);
  const c10::cuda::CUDAGuard guard(input.device());
  HeaderCheck check;
  check.sent = make_headers(ExchangePhase::kForwardCounts, sequence, at::kLong, per_rank, ones, ones, rows);
  // Through pinned memory, so the copy to the device does not wait for the stream.
  const auto pinned = at::TensorOptions().dtype(at::kLong).pinned_memory(true);
  at::Tensor headers = at::empty({world, kHeaderWords}, pinned);
  std::copy(check.sent.begin(), check.sent.end(), headers.mutable_data_ptr<int64_t>());
  const at::Tensor send = at::cat({headers.to(input.device(), /*non_blocking=*/true), input}, 1);
  const at::Tensor recv = at::empty_like(send);
  all_to_all_rows_nccl(send, recv, ones, ones, group_name);
  output.copy_(recv.narrow(1, kHeaderWords, per_rank));
  check.received = at::empty({world, kHeaderWords}, pinned);
  check.received.copy_(recv.narrow(1, 0, kHeaderWords), /*non_blocking=*/true);
  const int device = input.device().index();
  const cudaStream_t caller = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&check.done, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(check.done, caller));
  NcclState& state = nccl_state(group_name, device);
  std::lock_guard<std::mutex> lock(state.mutex);
  if (state.header_check.has_value()) cudaEventDestroy(state.header_check->done);  // checked at the exchange above
  state.header_check = std::move(check);
}
#endif

}  // namespace

ExchangePhaseGuard::ExchangePhaseGuard(ExchangePhase phase) : previous_(current_phase) {
  current_phase = phase;
}

ExchangePhaseGuard::~ExchangePhaseGuard() {
  current_phase = previous_;
}

void all_to_all_rows(const at::Tensor& input, const at::Tensor& output, const std::vector<int64_t>& send_rows,
                     const std::vector<int64_t>& recv_rows, const std::string& group_name) {
  TORCH_CHECK(input.is_contiguous() && output.is_contiguous(), "all_to_all_rows needs contiguous tensors");
  if (send_rows.size() == 1) {  // a one-rank group exchanges with itself: a copy on the caller's stream
    TORCH_CHECK(send_rows[0] == recv_rows[0], "a one-rank group sends ", send_rows[0], " rows to itself but expects ",
                recv_rows[0]);
    output.copy_(input);
    return;
  }
  auto group = resolve_group(group_name);
  const int64_t sequence = next_sequence(group, group_name);
  if (input.is_cuda()) {
#ifdef FASTMOE_WITH_NCCL
    // No header of its own (communicator.h); the sequence number counts it for the next counts header.
    return all_to_all_rows_nccl(input, output, send_rows, recv_rows, group_name);
#else
    TORCH_CHECK(false, "this fastmoe build has no NCCL, so it cannot exchange CUDA tensors (rebuild with NCCL found)");
#endif
  }
  const ExchangePhase phase = current_phase;
  check_with_peers_pg(
      group, group_name,
      make_headers(phase, sequence, input.scalar_type(), row_width(input), send_rows, recv_rows, RowsInfo{}), phase);
  all_to_all_rows_pg(group, input, output, send_rows, recv_rows, group_name,
                     phase_name(static_cast<int64_t>(phase)) + " exchange (all-to-all)");
}

void all_to_all_counts(const at::Tensor& input, const at::Tensor& output, const RowsInfo& rows,
                       const std::string& group_name) {
  TORCH_CHECK(input.dim() == 2 && input.is_contiguous() && output.is_contiguous() && input.scalar_type() == at::kLong,
              "all_to_all_counts needs contiguous [world, per_rank] int64 tensors, got ", input.sizes());
  const int64_t world = input.size(0);
  if (world == 1) {  // a one-rank group: nothing to agree on
    output.copy_(input);
    return;
  }
  auto group = resolve_group(group_name);
  const int64_t sequence = next_sequence(group, group_name);
  if (input.is_cuda()) {
#ifdef FASTMOE_WITH_NCCL
    return all_to_all_counts_nccl(input, output, rows, group_name, sequence);
#else
    TORCH_CHECK(false, "this fastmoe build has no NCCL, so it cannot exchange CUDA tensors (rebuild with NCCL found)");
#endif
  }
  const std::vector<int64_t> ones(world, 1);
  check_with_peers_pg(group, group_name,
                      make_headers(ExchangePhase::kForwardCounts, sequence, at::kLong, input.size(1), ones, ones, rows),
                      ExchangePhase::kForwardCounts);
  all_to_all_rows_pg(group, input, output, ones, ones, group_name, "forward counts exchange (all-to-all)");
}

namespace {

// The rows of `t`, stacked in blocks of sizes[i] rows (block i after block i - 1), restacked in the block order
// `order`. A pure gather of rows: each row keeps its bits.
at::Tensor restack(const at::Tensor& t, const std::vector<int64_t>& sizes, const std::vector<int64_t>& order) {
  std::vector<int64_t> start(sizes.size() + 1, 0);
  for (size_t i = 0; i < sizes.size(); ++i) start[i + 1] = start[i] + sizes[i];
  std::vector<at::Tensor> pieces;
  for (const int64_t i : order) {
    if (sizes[i] > 0) pieces.push_back(t.narrow(0, start[i], sizes[i]));
  }
  if (pieces.empty()) return t.narrow(0, 0, 0);
  if (pieces.size() == 1) return pieces[0].contiguous();
  return at::cat(pieces);
}

}  // namespace

at::Tensor rail_counts(const std::vector<int64_t>& rows, int64_t local_size) {
  const int64_t nodes = static_cast<int64_t>(rows.size()) / local_size;
  at::Tensor out = at::empty({local_size, nodes}, at::kLong);
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t j = 0; j < local_size; ++j) {
    for (int64_t m = 0; m < nodes; ++m) o[j * nodes + m] = rows[m * local_size + j];
  }
  return out;
}

at::Tensor exchange_peer_counts(const at::Tensor& mine, const std::string& node_group, const c10::Device& device) {
  const auto node = resolve_group(node_group);
  const int64_t local_size = node->getSize();
  TORCH_CHECK(mine.dim() == 2 && mine.size(0) == local_size && mine.scalar_type() == at::kLong && mine.is_cpu(),
              "the node peers' counts must be [", local_size, " (the ranks of node_group '", node_group,
              "'), K] int64 on the CPU, got ", mine.sizes(), " ", mine.scalar_type(), " on ", mine.device());
  const std::vector<int64_t> ones(local_size, 1);
  const at::Tensor sent = mine.contiguous();
  if (device.is_cuda() && local_size > 1 && !has_cpu_backend(*node)) {
    // A node group without a CPU backend: the counts go through NCCL and are read back (one device sync).
    const at::Tensor on_device = sent.to(device);
    const at::Tensor received = at::empty_like(on_device);
    all_to_all_rows(on_device, received, ones, ones, node_group);
    return received.cpu();
  }
  at::Tensor theirs = at::empty_like(sent);
  all_to_all_rows(sent, theirs, ones, ones, node_group);
  return theirs;
}

void all_to_all_rows_hierarchical(const at::Tensor& input, const at::Tensor& output,
                                  const std::vector<int64_t>& send_rows, const std::vector<int64_t>& recv_rows,
                                  const std::string& node_group, const std::string& rail_group,
                                  const at::Tensor& peer_counts) {
  TORCH_CHECK(input.is_contiguous() && output.is_contiguous(), "all_to_all_rows_hierarchical needs contiguous tensors");
  const auto node = resolve_group(node_group);
  const int64_t local_size = node->getSize(), nodes = group_size(rail_group);
  const int64_t world = static_cast<int64_t>(send_rows.size());
  TORCH_CHECK(world == local_size * nodes && recv_rows.size() == send_rows.size(), "the hierarchical exchange over ",
              nodes, " nodes (rail_group '", rail_group, "') of ", local_size, " ranks (node_group '", node_group,
              "') needs ", local_size * nodes, " send and receive splits, got ", send_rows.size(), " and ",
              recv_rows.size());
  // mine[j, m]: the rows this rank sends to rank m * L + j, which pass through node peer j. What peer j tells this
  // rank, theirs[j, m], is what it sends through this rank to node m.
  at::Tensor theirs;
  if (peer_counts.defined()) {
    TORCH_CHECK(peer_counts.dim() == 2 && peer_counts.size(0) == local_size && peer_counts.size(1) == nodes &&
                    peer_counts.scalar_type() == at::kLong && peer_counts.is_cpu(),
                "peer_counts must be [", local_size, ", ", nodes, "] int64 on the CPU (node peers x nodes), got ",
                peer_counts.sizes(), " ", peer_counts.scalar_type(), " on ", peer_counts.device());
    theirs = peer_counts.contiguous();
  } else {
    theirs = exchange_peer_counts(rail_counts(send_rows, local_size), node_group, input.device());
  }
  const int64_t* theirs_h = theirs.const_data_ptr<int64_t>();
  std::vector<int64_t> node_send(local_size, 0), node_recv(local_size, 0), rail_send(nodes, 0), rail_recv(nodes, 0);
  std::vector<int64_t> to_peers(world), to_nodes(world);
  for (int64_t j = 0; j < local_size; ++j) {
    for (int64_t m = 0; m < nodes; ++m) {
      node_send[j] += send_rows[m * local_size + j];
      node_recv[j] += theirs_h[j * nodes + m];
      rail_send[m] += theirs_h[j * nodes + m];
      rail_recv[m] += recv_rows[m * local_size + j];
      to_peers[j * nodes + m] = m * local_size + j;  // input blocks (by destination rank), by node peer first
      to_nodes[m * local_size + j] = j * nodes + m;  // received blocks (by source peer), by destination node first
    }
  }
  // The node step: to the node peer on each destination's rail, each peer's rows ordered by destination node.
  const at::Tensor staged = restack(input, send_rows, to_peers);
  std::vector<int64_t> shape = input.sizes().vec();
  shape[0] = std::accumulate(node_recv.begin(), node_recv.end(), int64_t{0});
  const at::Tensor on_rail = at::empty(shape, input.options());
  all_to_all_rows(staged, on_rail, node_send, node_recv, node_group);
  // The rail step: to each destination node, its rows ordered by source peer, so that the destination stacks them by
  // source node, then source peer: by source rank.
  const at::Tensor across = restack(on_rail, std::vector<int64_t>(theirs_h, theirs_h + world), to_nodes);
  all_to_all_rows(across, output, rail_send, rail_recv, rail_group);
}

namespace {

// All-gathers one byte string per rank (lengths first, then the strings padded to the longest).
std::vector<std::string> all_gather_strings(const std::string& mine, const std::string& what,
                                            const std::string& group_name) {
  auto group = resolve_group(group_name);
  const int world = group->getSize();
  const at::TensorOptions options = has_cpu_backend(*group) ? at::TensorOptions() : at::TensorOptions(at::kCUDA);
  auto gather = [&](const at::Tensor& input, const char* step) {
    std::vector<std::vector<at::Tensor>> output(1);
    for (int r = 0; r < world; ++r) output[0].push_back(at::empty_like(input));
    std::vector<at::Tensor> inputs{input};
    wait_for(*group->allgather(output, inputs), what + " (" + step + ")", group_name, *group);
    return output[0];
  };
  const auto lengths = gather(at::full({1}, static_cast<int64_t>(mine.size()), options.dtype(at::kLong)), "sizes");
  int64_t longest = 0;
  std::vector<int64_t> length(world);
  for (int r = 0; r < world; ++r) longest = std::max(longest, length[r] = lengths[r].cpu().item<int64_t>());
  at::Tensor bytes = at::zeros({std::max<int64_t>(longest, 1)}, at::kByte);
  std::copy(mine.begin(), mine.end(), bytes.data_ptr<uint8_t>());
  const auto gathered = gather(bytes.to(options.device()), "all-gather");
  std::vector<std::string> result;
  for (int r = 0; r < world; ++r) {
    const at::Tensor host = gathered[r].cpu();
    const auto* data = host.const_data_ptr<uint8_t>();
    result.emplace_back(data, data + length[r]);
  }
  return result;
}

// "name\x1fvalue\x1e" per entry, and back.
constexpr char kField = '\x1f', kEntry = '\x1e';
std::map<std::string, std::string> parse_config(const std::string& text) {
  std::map<std::string, std::string> entries;
  size_t start = 0;
  while (start < text.size()) {
    const size_t field = text.find(kField, start), end = text.find(kEntry, start);
    entries[text.substr(start, field - start)] = text.substr(field + 1, end - field - 1);
    start = end + 1;
  }
  return entries;
}

}  // namespace

void check_same_config(const std::string& group_name, const std::vector<std::string>& names,
                       const std::vector<std::string>& values, const std::string& what) {
  TORCH_CHECK(names.size() == values.size(), "check_same_config: ", names.size(), " names for ", values.size(),
              " values");
  std::string mine;
  for (size_t i = 0; i < names.size(); ++i) {
    for (const std::string* text : {&names[i], &values[i]}) {
      TORCH_CHECK(text->find(kField) == std::string::npos && text->find(kEntry) == std::string::npos,
                  "check_same_config: names and values may not hold the bytes 0x1e or 0x1f, got '", *text, "'");
    }
    mine += names[i] + kField + values[i] + kEntry;
  }
  const std::vector<std::string> configs = all_gather_strings(mine, "configuration check of " + what, group_name);
  const auto reference = parse_config(configs[0]);
  std::string problems;
  for (size_t r = 1; r < configs.size(); ++r) {
    const auto other = parse_config(configs[r]);
    std::set<std::string> keys;
    for (const auto& entry : reference) keys.insert(entry.first);
    for (const auto& entry : other) keys.insert(entry.first);
    for (const std::string& key : keys) {
      const auto a = reference.find(key), b = other.find(key);
      const std::string va = a == reference.end() ? "None" : a->second, vb = b == other.end() ? "None" : b->second;
      if (va != vb) {
        problems += (problems.empty() ? "" : "; ") + std::string("rank ") + std::to_string(r) + " has " + key + "=" +
                    vb + " but rank 0 has " + key + "=" + va;
      }
    }
  }
  TORCH_CHECK_VALUE(
      problems.empty(), what,
      " must be built with the same configuration on every rank of its expert-parallel group: ", problems);
}

void check_same_config(const std::string& group_name, const std::vector<std::string>& names,
                       const std::vector<int64_t>& values, const std::string& what) {
  std::vector<std::string> text;
  for (int64_t value : values) text.push_back(std::to_string(value));
  check_same_config(group_name, names, text, what);
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
