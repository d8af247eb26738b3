#include "kernels/comm/nccl_comm.h"

#include <nccl.h>

#include "core/check.h"
#include "core/cuda_check.h"

#define FMOE_CHECK_NCCL(expr)                                                                                        \
  do {                                                                                                               \
    const ncclResult_t fmoe_nccl_status_ = (expr);                                                                   \
    FMOE_CHECK(fmoe_nccl_status_ == ncclSuccess, "NCCL call `", #expr,                                               \
               "` failed: ", ncclGetErrorString(fmoe_nccl_status_), " (", static_cast<int>(fmoe_nccl_status_), ")"); \
  } while (0)

namespace fastmoe::comm {

static_assert(sizeof(ncclUniqueId) == kNcclUniqueIdBytes, "ncclUniqueId size changed");

struct NcclComm {
  ncclComm_t comm = nullptr;
  int rank = 0;
  int world_size = 1;
};

void nccl_unique_id(uint8_t* id) {
  ncclUniqueId unique;
  FMOE_CHECK_NCCL(ncclGetUniqueId(&unique));
  const auto* bytes = reinterpret_cast<const uint8_t*>(&unique);
  for (size_t i = 0; i < kNcclUniqueIdBytes; ++i) id[i] = bytes[i];
}

std::string nccl_versions() {
  int runtime = 0;
  ncclGetVersion(&runtime);
  auto text = [](int code) {
    // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch.
    return std::to_string(code / 10000) + "." + std::to_string(code / 100 % 100) + "." + std::to_string(code % 100);
  };
  return "compiled " + text(NCCL_VERSION_CODE) + ", loaded " + text(runtime);
}

NcclComm* nccl_comm_create(const uint8_t* id, int world_size, int rank, int device) {
  FMOE_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "rank ", rank, " is outside a world of ", world_size);
  ncclUniqueId unique;
  auto* bytes = reinterpret_cast<uint8_t*>(&unique);
  for (size_t i = 0; i < kNcclUniqueIdBytes; ++i) bytes[i] = id[i];
  int previous = 0;
  FMOE_CHECK_CUDA(cudaGetDevice(&previous));
  FMOE_CHECK_CUDA(cudaSetDevice(device));
  auto* comm = new NcclComm{nullptr, rank, world_size};
  const ncclResult_t status = ncclCommInitRank(&comm->comm, world_size, unique, rank);
  cudaSetDevice(previous);
  if (status != ncclSuccess) {
    delete comm;
    FMOE_CHECK(false, "ncclCommInitRank(world_size=", world_size, ", rank=", rank, ", device=", device,
               ") failed: ", ncclGetErrorString(status));
  }
  return comm;
}

void nccl_comm_destroy(NcclComm* comm) {
  if (comm == nullptr) return;
  if (comm->comm != nullptr) ncclCommAbort(comm->comm);
  delete comm;
}

std::string nccl_comm_async_error(NcclComm* comm) {
  ncclResult_t async = ncclSuccess;
  if (comm == nullptr || comm->comm == nullptr) return "";
  if (ncclCommGetAsyncError(comm->comm, &async) != ncclSuccess) return "ncclCommGetAsyncError failed";
  return async == ncclSuccess ? "" : ncclGetErrorString(async);
}

void nccl_all_to_all(NcclComm* comm, const void* send, const int64_t* send_offset, const int64_t* send_bytes,
                     void* recv, const int64_t* recv_offset, const int64_t* recv_bytes, cudaStream_t stream) {
  FMOE_CHECK(comm != nullptr && comm->comm != nullptr, "nccl_all_to_all on a destroyed communicator");
  const auto* in = static_cast<const char*>(send);
  auto* out = static_cast<char*>(recv);
  FMOE_CHECK_NCCL(ncclGroupStart());
  for (int peer = 0; peer < comm->world_size; ++peer) {
    if (send_bytes[peer] > 0) {
      FMOE_CHECK_NCCL(
          ncclSend(in + send_offset[peer], static_cast<size_t>(send_bytes[peer]), ncclChar, peer, comm->comm, stream));
    }
    if (recv_bytes[peer] > 0) {
      FMOE_CHECK_NCCL(
          ncclRecv(out + recv_offset[peer], static_cast<size_t>(recv_bytes[peer]), ncclChar, peer, comm->comm, stream));
    }
  }
  FMOE_CHECK_NCCL(ncclGroupEnd());
}

}  // namespace fastmoe::comm
