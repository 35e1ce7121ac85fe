// common.cuh — device helpers the msa CUDA kernels share that need no Hopper-only instruction:
// shared-memory addresses, and the varlen lookup and clamp that keep garbage device-side
// cu_seqlens inside the tensors. Internal to src/cuda; the sm_90a PTX wrappers and the 128-byte
// swizzle layout live in hopper.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace msa::cuda {

// Shared-window address of a generic pointer into shared memory (what cp.async, mbarrier, TMA and
// wgmma descriptors take).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Largest b in [0, batch) with start[b] <= x: the sequence of a packed token (start = cu_seqlens)
// or of a query tile (start = per-sequence tile offsets). The last of several empty entries
// sharing an offset is the owner. Safe for any contents.
__device__ __forceinline__ int64_t find_seq(const int32_t* start, int64_t batch, int64_t x) {
  int64_t lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (start[mid] <= x)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

}  // namespace msa::cuda
