// decode_append.cu — append_kv on the GPU (new tokens' k, v, k_idx into their pages; k_idx
// quantized to e4m3 bytes + a float32 scale per token with IndexKeyFormat::fp8_e4m3) and the
// stream-ordered scratch of the unplanned decode calls.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "decode.h"
#include "host.h"

namespace msa::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxIdxPerLane = 16;  // d_idx <= 512 (validated)


struct AppendArgs {
  const uint16_t* k;
  const uint16_t* v;
  const uint16_t* k_idx;
  int64_t stride_k_tok, stride_k_head, stride_v_tok, stride_v_head, stride_k_idx_tok;
  uint16_t* k_cache;
  uint16_t* v_cache;
  void* k_idx_cache;    // bf16 [n_pages, bk, d_idx], or e4m3 bytes with k_idx_scale
  float* k_idx_scale;   // [n_pages, bk] with fp8_e4m3, else null
  const int32_t* block_table;
  const int32_t* seq_lens;
  const int32_t* cu_new;  // null: one request
  int64_t n_new, batch, n_pages, max_blocks, bk, h_kv, d, d_idx;
};

// One CTA per new token. The slot comes from the device arrays, clamped: a token whose position
// or page is out of range is dropped instead of written anywhere else. Element copies (2 bytes)
// keep any stride legal; a step writes a few KB per token, far from mattering next to attention.
__global__ void __launch_bounds__(kThreads) append_kernel(const AppendArgs a) {
  const int64_t i = blockIdx.x;
  int64_t b = 0, lo = 0, hi = a.n_new;
  if (a.cu_new) {
    b = find_seq(a.cu_new, a.batch, i);
    lo = clamp64(a.cu_new[b], 0, a.n_new);
    hi = clamp64(a.cu_new[b + 1], lo, a.n_new);
  }
  if (i < lo || i >= hi) return;
  const int64_t len = a.seq_lens[b];
  const int64_t pos = len - (hi - lo) + (i - lo);
  if (pos < 0 || pos >= a.max_blocks * a.bk) return;
  const int64_t page = a.block_table[b * a.max_blocks + pos / a.bk];
  if (page < 0 || page >= a.n_pages) return;
  const int64_t slot = page * a.bk + pos % a.bk;
  const int64_t row = a.h_kv * a.d;
  for (int64_t e = threadIdx.x; e < row; e += kThreads) {
    const int64_t r = e / a.d, c = e % a.d;
    a.k_cache[slot * row + e] = a.k[i * a.stride_k_tok + r * a.stride_k_head + c];
    a.v_cache[slot * row + e] = a.v[i * a.stride_v_tok + r * a.stride_v_head + c];
  }
  if (a.k_idx && a.k_idx_scale) {
    // One warp quantizes the row (d_idx <= 512: 16 values per lane, lane-strided; the padding
    // zeros change neither the max nor finiteness).
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      float x[kMaxIdxPerLane];
      uint8_t q8[kMaxIdxPerLane];
#pragma unroll
      for (int u = 0; u < kMaxIdxPerLane; ++u) {
        const int64_t e = lane + 32 * u;
        x[u] = e < a.d_idx ? bf16_bits_to_float(a.k_idx[i * a.stride_k_idx_tok + e]) : 0.f;
      }
      const float sc = e4m3_quantize_row_warp<kMaxIdxPerLane>(x, q8);
      uint8_t* dst = static_cast<uint8_t*>(a.k_idx_cache) + slot * a.d_idx;
#pragma unroll
      for (int u = 0; u < kMaxIdxPerLane; ++u) {
        const int64_t e = lane + 32 * u;
        if (e < a.d_idx) dst[e] = q8[u];
      }
      if (lane == 0) a.k_idx_scale[slot] = sc;
    }
  } else if (a.k_idx) {
    uint16_t* dst = static_cast<uint16_t*>(a.k_idx_cache) + slot * a.d_idx;
    for (int64_t e = threadIdx.x; e < a.d_idx; e += kThreads) dst[e] = a.k_idx[i * a.stride_k_idx_tok + e];
  }
}

}  // namespace

void run_append_kv(const AppendKvParams& p, cudaStream_t stream) {
  const PagedKvCache& c = p.cache;
  AppendArgs a{};
  a.k = static_cast<const uint16_t*>(p.k);
  a.v = static_cast<const uint16_t*>(p.v);
  a.k_idx = static_cast<const uint16_t*>(p.k_idx);
  a.stride_k_tok = p.stride_k_tok;
  a.stride_k_head = p.stride_k_head;
  a.stride_v_tok = p.stride_v_tok;
  a.stride_v_head = p.stride_v_head;
  a.stride_k_idx_tok = p.stride_k_idx_tok;
  a.k_cache = static_cast<uint16_t*>(c.k_cache);
  a.v_cache = static_cast<uint16_t*>(c.v_cache);
  a.k_idx_cache = c.k_idx_cache;
  a.k_idx_scale = c.k_idx_format == IndexKeyFormat::fp8_e4m3 ? c.k_idx_scale : nullptr;
  if (p.k_idx && c.k_idx_format == IndexKeyFormat::fp8_e4m3 && (c.d_idx > 32 * kMaxIdxPerLane || !c.k_idx_scale))
    throw Error("msa::append_kv: cache.d_idx = " + std::to_string(c.d_idx) +
                             " with fp8_e4m3 index keys, expected d_idx <= 512 and a scale pool");
  a.block_table = c.block_table;
  a.seq_lens = c.seq_lens;
  a.cu_new = p.cu_new;
  a.n_new = p.n_new;
  a.batch = c.batch;
  a.n_pages = c.n_pages;
  a.max_blocks = c.max_blocks;
  a.bk = c.bk;
  a.h_kv = c.h_kv;
  a.d = c.d;
  a.d_idx = c.d_idx;
  if (p.n_new > INT32_MAX) throw std::runtime_error("msa::append_kv: n_new exceeds the grid limit");
  append_kernel<<<unsigned(p.n_new), kThreads, 0, stream>>>(a);
  check_cuda("append_kv", cudaGetLastError(), "launch of the append kernel");
}

void* scratch_alloc(size_t bytes, cudaStream_t stream) {
  void* ptr = nullptr;
  cudaError_t e = cudaMallocAsync(&ptr, bytes, stream);
  if (e != cudaSuccess)
    throw std::runtime_error("msa decode: cudaMallocAsync of " + std::to_string(bytes) +
                             " bytes of workspace failed: " + cudaGetErrorString(e));
  return ptr;
}

void scratch_free(void* ptr, cudaStream_t stream) { cudaFreeAsync(ptr, stream); }

}  // namespace msa::cuda
