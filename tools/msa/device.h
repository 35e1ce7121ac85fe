// Device copies for `msa check --backend cuda`: uploads host inputs, allocates outputs and brings
// them back. Built on the CUDA runtime when the library has its CUDA backend; otherwise every
// call reports that the backend is not compiled in.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "msa/common.h"

namespace msa::cli {

// Why the CUDA backend cannot run here ("" when it can).
std::string cuda_unavailable_reason();

// Owns the device buffers of one call; frees them on destruction.
class DeviceArena {
 public:
  DeviceArena() = default;
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;
  ~DeviceArena();

  // Copy of bytes of host memory (nullptr stays nullptr).
  const void* in(const void* host, size_t bytes);
  // Output buffer initialised from host (so unwritten entries keep the host's poison) and copied
  // back to host by fetch().
  void* out(void* host, size_t bytes);
  // The varlen arrays of v uploaded (n_q, n_k, batch from v).
  Varlen varlen(const Varlen& v);
  // Waits for the device and copies every out() buffer back to its host memory.
  void fetch();

 private:
  struct Out {
    void* host;
    void* dev;
    size_t bytes;
  };
  std::vector<void*> allocs_;
  std::vector<Out> outs_;
  void* alloc(size_t bytes);
};

}  // namespace msa::cli
