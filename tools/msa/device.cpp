// Device copies for `msa check --backend cuda` (see device.h).
#include "device.h"

#include <stdexcept>

#ifdef MSA_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace msa::cli {

#ifdef MSA_WITH_CUDA

namespace {
void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}
}  // namespace

std::string cuda_unavailable_reason() {
  if (cuda_device_count() == 0) return "no CUDA device is visible";
  return "";
}

DeviceArena::~DeviceArena() {
  for (void* p : allocs_) cudaFree(p);
}

void* DeviceArena::alloc(size_t bytes) {
  void* p = nullptr;
  ok(cudaMalloc(&p, bytes == 0 ? 1 : bytes), "cudaMalloc");
  allocs_.push_back(p);
  return p;
}

const void* DeviceArena::in(const void* host, size_t bytes) {
  if (host == nullptr) return nullptr;
  void* p = alloc(bytes);
  if (bytes) ok(cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
  return p;
}

void* DeviceArena::out(void* host, size_t bytes) {
  if (host == nullptr) return nullptr;
  void* p = const_cast<void*>(in(host, bytes));
  outs_.push_back({host, p, bytes});
  return p;
}

void DeviceArena::fetch() {
  ok(cudaDeviceSynchronize(), "kernel execution");
  for (const Out& o : outs_)
    if (o.bytes) ok(cudaMemcpy(o.host, o.dev, o.bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
}

#else

std::string cuda_unavailable_reason() {
  return "this build of msa has no CUDA backend (configure with -DMSA_WITH_CUDA=ON and a CUDA toolkit)";
}

DeviceArena::~DeviceArena() = default;
void* DeviceArena::alloc(size_t) { throw std::runtime_error(cuda_unavailable_reason()); }
const void* DeviceArena::in(const void*, size_t) { throw std::runtime_error(cuda_unavailable_reason()); }
void* DeviceArena::out(void*, size_t) { throw std::runtime_error(cuda_unavailable_reason()); }
void DeviceArena::fetch() { throw std::runtime_error(cuda_unavailable_reason()); }

#endif

Varlen DeviceArena::varlen(const Varlen& v) {
  Varlen d = v;
  size_t cu = size_t(v.batch + 1) * sizeof(int32_t);
  d.cu_seqlens_q = static_cast<const int32_t*>(in(v.cu_seqlens_q, cu));
  d.cu_seqlens_k = static_cast<const int32_t*>(in(v.cu_seqlens_k, cu));
  d.q_pos = static_cast<const int32_t*>(in(v.q_pos, size_t(v.n_q) * sizeof(int32_t)));
  return d;
}

}  // namespace msa::cli
