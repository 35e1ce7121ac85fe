// Helpers shared by the GPU tests (tests/test_cuda_*.cpp): the skips for builds without the CUDA
// backend and machines without a GPU, bitwise comparison of repeated results, and, in CUDA builds,
// a device buffer that owns its memory, copies to and from host vectors and poisons itself.
#pragma once

#include <cstddef>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "test_util.h"

#ifdef MSA_WITH_CUDA
#include <cuda_runtime.h>
#endif

// Skips the current test in a build without the CUDA backend.
#define REQUIRE_CUDA_BUILD()                                                      \
  do {                                                                            \
    if (!::msa::cuda_compiled()) GTEST_SKIP() << "built without the CUDA backend"; \
  } while (0)

// Skips the current test when no GPU is visible (a CUDA build on a machine without one), so that
// the GPU tests pass vacuously only where they cannot run, and say so.
#define REQUIRE_GPU()                                                                                 \
  do {                                                                                                \
    if (::msa::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device visible: GPU test skipped"; \
  } while (0)

namespace msa::test {

// got and ref hold the same bits (floats as bits: NaN payloads and -0 count). On failure names
// the first differing element.
template <class T>
::testing::AssertionResult bitwise_equal(const std::vector<T>& got, const std::vector<T>& ref) {
  if (got.size() != ref.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " != " << ref.size();
  if (got.empty() || std::memcmp(got.data(), ref.data(), got.size() * sizeof(T)) == 0)
    return ::testing::AssertionSuccess();
  size_t i = 0;
  while (std::memcmp(&got[i], &ref[i], sizeof(T)) == 0) ++i;
  return ::testing::AssertionFailure() << "first bitwise difference at element " << i << " of " << got.size();
}

#ifdef MSA_WITH_CUDA

// Throws std::runtime_error naming what failed: a failed CUDA call ends the test with a message
// instead of letting later checks read garbage.
inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// n elements of device memory (none when n = 0, ptr then stays null), freed on scope exit.
template <class T>
struct DevBuf {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) {
    if (n) cuda_check(cudaMalloc(&ptr, n * sizeof(T)), "cudaMalloc");
  }
  // A device copy of h.
  explicit DevBuf(const std::vector<T>& h) : DevBuf(h.size()) {
    if (n) cuda_check(cudaMemcpy(ptr, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  ~DevBuf() { cudaFree(ptr); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  // Sets every byte to `byte` before a run, so that an output the kernel fails to write shows.
  void poison(unsigned char byte) {
    if (n) cuda_check(cudaMemset(ptr, byte, n * sizeof(T)), "cudaMemset");
  }
  // A host copy of all n elements.
  std::vector<T> get() const {
    std::vector<T> h(n);
    if (n) cuda_check(cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return h;
  }
};

#endif  // MSA_WITH_CUDA

}  // namespace msa::test
