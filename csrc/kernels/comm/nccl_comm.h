// The NCCL side of the expert-parallel exchange, torch-free. A communicator is created from a unique id that
// the caller distributes (csrc/runtime bootstraps it through a torch.distributed process group), and the
// all-to-all is one NCCL group of point-to-point sends and receives of byte ranges, enqueued on a given stream.
// Available when the build found NCCL (FASTMOE_WITH_NCCL).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace fastmoe::comm {

constexpr size_t kNcclUniqueIdBytes = 128;

// Writes a fresh ncclUniqueId (kNcclUniqueIdBytes bytes) into id.
void nccl_unique_id(uint8_t* id);

// The NCCL version this build was compiled against and the one loaded at run time, as "2.28.9".
std::string nccl_versions();

struct NcclComm;  // opaque: ncclComm_t plus its rank and size

// Joins the communicator of `world_size` ranks named by id as `rank`, on CUDA device `device`. Blocks until every
// rank has joined (a collective over the ranks). Throws fastmoe::Error with NCCL's message on failure.
NcclComm* nccl_comm_create(const uint8_t* id, int world_size, int rank, int device);

// Aborts outstanding work and frees the communicator (safe after an error).
void nccl_comm_destroy(NcclComm* comm);

// Non-empty when the communicator reported an asynchronous error (for example a peer that went away).
std::string nccl_comm_async_error(NcclComm* comm);

// All-to-all of byte ranges: for every peer p, send_bytes[p] bytes from send + send_offset[p] go to p, and
// recv_bytes[p] bytes from p land at recv + recv_offset[p]. Enqueued on `stream`; returns without waiting.
void nccl_all_to_all(NcclComm* comm, const void* send, const int64_t* send_offset, const int64_t* send_bytes,
                     void* recv, const int64_t* recv_offset, const int64_t* recv_bytes, cudaStream_t stream);

}  // namespace fastmoe::comm
