// common.cuh — device helpers the msa CUDA kernels share that need no Hopper-only instruction:
// shared-memory addresses, bf16 loads as floats, and the varlen lookup and clamp that keep garbage
// device-side cu_seqlens inside the tensors. Internal to src/cuda; the sm_90a PTX wrappers and the 128-byte
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

// The float value of bf16 bits (the low 16 bits of `bits`).
__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) { return __uint_as_float(bits << 16); }

// Eight consecutive bf16 of a row as floats: one 16-byte load when the layout allows it (vec: src
// 16-byte aligned), else eight 2-byte loads.
__device__ __forceinline__ void load8_as_float(const uint16_t* src, bool vec, float (&x)[8]) {
  if (vec) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      x[2 * e] = bf16_bits_to_float(w[e] & 0xffffu);
      x[2 * e + 1] = bf16_bits_to_float(w[e] >> 16);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = bf16_bits_to_float(__ldg(src + e));
  }
}

// Division of a non-negative 32-bit value below 2^31 by a divisor fixed at launch, as a multiply-high
// and a shift: mul = ceil(2^(31 + l) / d) with l = ceil(log2 d) fits 32 bits, and for n < 2^31 the
// rounding error of mul stays below one quotient step. d = 1 passes n through.
struct FastDiv {
  uint32_t d = 1, mul = 0, shr = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    if (d > 1) {
      uint32_t l = 0;
      while ((uint64_t(1) << l) < d) ++l;
      mul = uint32_t(((uint64_t(1) << (31 + l)) + d - 1) / d);
      shr = l - 1;
    }
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return d == 1 ? n : __umulhi(n, mul) >> shr; }
};

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

// The packed query and key rows [q_lo, q_hi), [k_lo, k_hi) of sequence b, clamped into [0, n]:
// garbage device-side cu_seqlens give garbage rows but never an access outside the tensors.
// cu_k null: cu_q serves both; both null: a single sequence.
struct SeqRows {
  int64_t q_lo, q_hi, k_lo, k_hi;
};

__device__ __forceinline__ SeqRows seq_rows(const int32_t* cu_q, const int32_t* cu_k, int64_t b, int64_t n_q,
                                            int64_t n_k) {
  SeqRows s;
  s.q_lo = cu_q ? clamp64(cu_q[b], 0, n_q) : 0;
  s.q_hi = cu_q ? clamp64(cu_q[b + 1], s.q_lo, n_q) : n_q;
  const int32_t* cuk = cu_k ? cu_k : cu_q;
  s.k_lo = cuk ? clamp64(cuk[b], 0, n_k) : 0;
  s.k_hi = cuk ? clamp64(cuk[b + 1], s.k_lo, n_k) : n_k;
  return s;
}

// Absolute position of packed query row `row` of a sequence with rows s: q_pos[row] when given,
// else bottom-right aligned to the keys; clamped into [-1, len_k) (-1: the row sees no key), so
// every key row it can touch, k_lo + j with 0 <= j <= pos, is inside the tensor.
__device__ __forceinline__ int64_t query_pos(const int32_t* q_pos, const SeqRows& s, int64_t row) {
  const int64_t len_k = s.k_hi - s.k_lo;
  int64_t pos = q_pos ? int64_t(q_pos[row]) : len_k - (s.q_hi - s.q_lo) + (row - s.q_lo);
  if (pos >= len_k) pos = len_k - 1;
  if (pos < 0) pos = -1;
  return pos;
}

}  // namespace msa::cuda
