// Device plumbing shared by the CUDA kernel tests: a skip-without-GPU fixture with its own stream, and a device
// buffer that uploads, poisons and downloads on that stream. Torch-free.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/cuda_check.h"

namespace fastmoe {
namespace test {
namespace {

// Empty when a CUDA device is usable, else why not.
std::string cuda_unavailable_reason() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls report their own
    return std::string("cudaGetDeviceCount failed with ") + cudaGetErrorName(status) + ": " +
           cudaGetErrorString(status);
  }
  if (count == 0) return "cudaGetDeviceCount reports 0 devices";
  return "";
}

// Base fixture: skips without a device, and gives each test its own non-blocking stream so that a kernel that
// ignored its stream argument would race with the transfers and show up.
class CudaKernelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string reason = cuda_unavailable_reason();
    if (!reason.empty()) GTEST_SKIP() << "no CUDA device: " << reason;
    FMOE_CHECK_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  void TearDown() override {
    if (stream_ != nullptr) {
      FMOE_CHECK_CUDA(cudaStreamSynchronize(stream_));
      FMOE_CHECK_CUDA(cudaStreamDestroy(stream_));
    }
  }
  cudaStream_t stream_ = nullptr;
};

// Device memory; every transfer runs on the test's stream.
class DeviceBuffer {
 public:
  DeviceBuffer(size_t bytes, cudaStream_t stream) : bytes_(bytes), stream_(stream) {
    if (bytes_ > 0) FMOE_CHECK_CUDA(cudaMalloc(&ptr_, bytes_));
  }
  template <typename U>
  DeviceBuffer(const std::vector<U>& host, cudaStream_t stream) : DeviceBuffer(host.size() * sizeof(U), stream) {
    if (bytes_ > 0) {
      FMOE_CHECK_CUDA(cudaMemcpyAsync(ptr_, host.data(), bytes_, cudaMemcpyHostToDevice, stream_));
      FMOE_CHECK_CUDA(cudaStreamSynchronize(stream_));  // `host` may go away after this
    }
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);  // unchecked: a destructor must not throw
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  template <typename U>
  U* as() const {
    return static_cast<U*>(ptr_);
  }
  void* get() const { return ptr_; }

  // 0xFF bytes: NaN in every float type, -1 in int64.
  void poison() {
    if (bytes_ > 0) FMOE_CHECK_CUDA(cudaMemsetAsync(ptr_, 0xFF, bytes_, stream_));
  }

  // Waits for the stream, then copies `count` elements starting `offset` elements in.
  template <typename U>
  std::vector<U> download(size_t count, size_t offset = 0) const {
    std::vector<U> host(count);
    if (count > 0) {
      FMOE_CHECK_CUDA(
          cudaMemcpyAsync(host.data(), as<U>() + offset, count * sizeof(U), cudaMemcpyDeviceToHost, stream_));
    }
    FMOE_CHECK_CUDA(cudaStreamSynchronize(stream_));
    return host;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;
};

}  // namespace
}  // namespace test
}  // namespace fastmoe
