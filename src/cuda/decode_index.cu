// decode_index.cu — the CUDA decode index pass: scores of the new query tokens against the paged
// index-key cache, block max (and block sum-exp for index_lse) per (row, block) into the
// workspace, then the exact top-k per row with the own block forced (the block_topk kernel) and
// the index_lse from the selected blocks' partial sums.
//
// Kernel 1 (score), grid = (request, chunk of plan.index_split logical blocks), 8 warps: warp w
// scores blocks w, w + 8, ... of the chunk for every (query token, group) row of the request. Each
// warp streams its blocks as one sequence of 16-key slices through its own cp.async ring in
// shared memory (3 stages of 4 KB at d_idx = 128, 6 of 2 KB at 64: two slices in flight per warp,
// ~128 KB per SM with two CTAs), with no CTA barrier between slices, and scores them with
// mma.sync m16n8k16 (bf16 in, fp32 accumulate). The dot product may run over the d_idx slots in
// any order as long as Q uses the same one, so each lane reads 16 contiguous bytes of one key row
// and uses them as the B halves of two k-steps; Q rows (padded to 16 per m16 tile) are staged
// once per CTA in the matching order and, for one tile, kept in registers. The bytes of the keys
// are the whole cost at decode (a few rows per request), so everything is arranged around
// streaming each page once: several tiles of rows re-read the slice from shared memory.
//
// With IndexKeyFormat::fp8_e4m3 a sibling score kernel streams 1-byte keys and their per-token
// scales through the same ring, quantizes the query rows in the kernel exactly as append_kv
// quantizes keys, and scores with mma.sync m16n8k32 e4m3 (keys on M, query rows on N); the block
// statistics, the top-k and the lse stages are shared.
//
// Device arrays are read only in the kernels and clamped: lengths to 0 .. max_blocks * bk,
// offsets to 0 .. n_q, a token whose position is negative sees nothing (all -1). A page id
// outside 0 .. n_pages - 1 is never dereferenced: its block gets the block score NaN (ranked below
// every number, as the reference ranks NaN) and no mass in index_lse. Key slots at or past
// seq_lens[b] are never read (the row index is clamped to the last valid slot and masked).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "block_topk.h"
#include "common.cuh"
#include "decode.h"
#include "host.h"

namespace msa::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxTiles = 4;  // m16 row tiles scored per pass over the keys (64 rows)
constexpr const char* kFn = "decode_index_topk";

struct Args {
  const uint16_t* q;  // [n_q, h_kv, D], strides in elements
  int64_t stride_q_tok, stride_q_head;
  const void* k_cache;     // [n_pages, bk, D]: bf16, or e4m3 bytes (fp8 kernel)
  const float* k_scale;    // [n_pages, bk] per-token scales of the e4m3 keys (fp8 kernel)
  const int32_t* block_table;
  const int32_t* seq_lens;
  const int32_t* cu_q;  // null: one request
  int64_t n_q, batch, n_pages, max_blocks;
  int bk, h_kv, split, n_chunks;
  float scale;
  bool lse;
  float* ws_m;        // [n_q * h_kv, max_blocks] block max
  float* ws_l;        // [n_q * h_kv, max_blocks] block sum of exp(S - max), NaN if any S is NaN
  int32_t* ws_nvis;   // [n_q * h_kv] visible blocks of the row
};

__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

// 16 bytes global -> shared through L2 only (each key is read once), zero-free: the source row is
// always a valid slot.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}

// Running block statistics of one row held by one lane (its share of the keys).
struct RowStat {
  float m;    // max of the visible scores so far (NaN: none that is a number)
  float l;    // this lane's sum of exp(S - m) over its visible scores
  bool nan;   // this lane saw a NaN score
};

__device__ __forceinline__ void stat_reset(RowStat& s) {
  s.m = __int_as_float(0x7fc00000);
  s.l = 0.f;
  s.nan = false;
}

// The max of four scores of this lane over the visible ones (NaN: none visible is a number).
__device__ __forceinline__ float max4(float x0, bool v0, float x1, bool v1, float x2, bool v2, float x3, bool v3) {
  const float qnan = __int_as_float(0x7fc00000);
  return fmaxf(fmaxf(v0 ? x0 : qnan, v1 ? x1 : qnan), fmaxf(v2 ? x2 : qnan, v3 ? x3 : qnan));
}

// Moves s to the new max m_new (>= s.m and every visible score) and adds the four scores' mass.
__device__ __forceinline__ void stat_fold(RowStat& s, float m_new, float x0, bool v0, float x1, bool v1, float x2,
                                          bool v2, float x3, bool v3, bool lse) {
  if (lse) {
    s.nan |= (v0 && isnan(x0)) || (v1 && isnan(x1)) || (v2 && isnan(x2)) || (v3 && isnan(x3));
    // Only a finite max carries mass that a sum can hold; +inf and all -inf are settled from the
    // block max alone when the row's lse is combined.
    if (isfinite(m_new)) {
      float l = isfinite(s.m) ? s.l * __expf(s.m - m_new) : 0.f;
      if (v0 && !isnan(x0)) l += __expf(x0 - m_new);
      if (v1 && !isnan(x1)) l += __expf(x1 - m_new);
      if (v2 && !isnan(x2)) l += __expf(x2 - m_new);
      if (v3 && !isnan(x3)) l += __expf(x3 - m_new);
      s.l = l;
    }
  }
  s.m = m_new;
}

// Folds four scores of this lane (with their visibility) into s; the group max is shared by the
// quad (the 4 lanes holding one row), so m stays equal across the quad.
__device__ __forceinline__ void stat_update(RowStat& s, float x0, bool v0, float x1, bool v1, float x2, bool v2,
                                            float x3, bool v3, bool lse) {
  float gm = max4(x0, v0, x1, v1, x2, v2, x3, v3);
  gm = fmaxf(gm, __shfl_xor_sync(0xffffffffu, gm, 1));
  gm = fmaxf(gm, __shfl_xor_sync(0xffffffffu, gm, 2));
  stat_fold(s, fmaxf(s.m, gm), x0, v0, x1, v1, x2, v2, x3, v3, lse);
}

// The request of a score kernel's CTA (grid = request b x chunk c): its first packed query token
// lo, its query count nq_b and its cached length len (clamped); chunk 0 also writes the visible
// block count of each of the request's rows for the top-k. False: the request has no queries.
__device__ __forceinline__ bool request_rows(const Args& a, int64_t b, int c, int64_t& lo, int64_t& nq_b,
                                             int64_t& len) {
  int64_t hi = a.n_q;
  lo = 0;
  if (a.cu_q) {
    lo = clamp64(a.cu_q[b], 0, a.n_q);
    hi = clamp64(a.cu_q[b + 1], lo, a.n_q);
  }
  nq_b = hi - lo;
  if (nq_b == 0) return false;
  const int64_t bk = a.bk;
  len = clamp64(a.seq_lens[b], 0, a.max_blocks * bk);
  if (c == 0) {
    const int64_t rows = nq_b * a.h_kv, row0 = lo * a.h_kv;
    for (int64_t rr = threadIdx.x; rr < rows; rr += kThreads) {
      const int64_t pos = len - nq_b + rr / a.h_kv;
      a.ws_nvis[row0 + rr] = pos >= 0 ? int32_t(pos / bk + 1) : 0;
    }
  }
  return true;
}

// Shared memory of the score kernel: per warp a ring of kStages slices of 16 keys (16 rows of D
// bf16, the 16-byte chunks of odd rows swapped by 64 bytes so that the two rows one 8-lane phase
// of ldmatrix-like 16-byte reads touches fall in different banks), then the Q rows of a pass (row
// stride D + 32 elements for the same reason).
template <int D, int NT>
struct Smem {
  static constexpr int kSliceBytes = 16 * D * 2;
  static constexpr int kStages = (D == 128 ? 3 : 6);  // 12 KB of keys per warp
  static constexpr int kRingBytes = kWarps * kStages * kSliceBytes;
  static constexpr int kQStride = D + 32;
  static constexpr int kQBytes = NT * 16 * kQStride * 2;
  static constexpr int kBytes = kRingBytes + kQBytes;
};

__device__ __forceinline__ uint32_t slice_off(int row, int ch, int row_bytes) {
  return uint32_t(row * row_bytes + ((ch ^ ((row & 1) << 2)) << 4));
}

template <int D, int NT>
__global__ void __launch_bounds__(kThreads, NT <= 2 ? 2 : 1) decode_index_score_kernel(const Args a) {
  using S = Smem<D, NT>;
  constexpr int kSlices = D / 32;     // 16-byte fragments per key row per lane
  constexpr int kChunks = D / 8;      // 16-byte chunks per key row
  constexpr int kCopies = 16 * kChunks / 32;  // cp.async per lane per slice
  extern __shared__ __align__(128) uint8_t smem[];
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem + S::kRingBytes);

  const int64_t b = blockIdx.x / unsigned(a.n_chunks);
  const int c = int(blockIdx.x % unsigned(a.n_chunks));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const uint32_t ring = smem_addr(smem) + uint32_t(warp * S::kStages * S::kSliceBytes);

  int64_t lo = 0, nq_b = 0, len = 0;
  if (!request_rows(a, b, c, lo, nq_b, len)) return;
  const int64_t bk = a.bk, rows = nq_b * a.h_kv, row0 = lo * a.h_kv;
  const int64_t n_blk = (len + bk - 1) / bk;
  const int64_t blk0 = int64_t(c) * a.split;
  if (blk0 >= n_blk) return;  // a plan for longer contexts: this chunk has nothing yet
  const int64_t blk1 = min64(blk0 + a.split, n_blk);
  const int32_t* table = a.block_table + b * a.max_blocks;
  // This warp's blocks blk0 + warp, + 8, ...; each is bk / 16 slices, walked as one sequence so
  // that the copies run ahead across block boundaries.
  const int gpb = int(bk / 16);
  const int64_t n_mine = blk1 - blk0 > warp ? (blk1 - blk0 - warp + kWarps - 1) / kWarps : 0;
  const int64_t n_slices = n_mine * gpb;

  // Copies slice g of this warp into its ring stage; nothing for a skipped page or past the
  // valid slots (the group is still committed, so the wait counts stay uniform).
  auto issue = [&](int64_t g) {
    const int64_t blk = blk0 + warp + (g / gpb) * kWarps;
    const int k0 = int(g % gpb) * 16;
    const int32_t page = table[blk];
    const int64_t kv = min64(bk, len - blk * bk);
    if (page < 0 || int64_t(page) >= a.n_pages || k0 >= kv) return;
    const uint16_t* base = static_cast<const uint16_t*>(a.k_cache) + int64_t(page) * bk * D;
    const uint32_t dst = ring + uint32_t(int(g % S::kStages) * S::kSliceBytes);
#pragma unroll
    for (int u = 0; u < kCopies; ++u) {
      const int e = u * 32 + lane, row = e / kChunks, ch = e % kChunks;
      const int64_t kr = min64(k0 + row, kv - 1);  // never a slot at or past seq_lens
      cp_async16(dst + slice_off(row, ch, D * 2), base + kr * D + ch * 8);
    }
  };

  for (int64_t pass0 = 0; pass0 < rows; pass0 += NT * 16) {
    const int pass_rows = int(min64(rows - pass0, NT * 16));
    __syncthreads();  // the previous pass's Q is no longer read
    // Stage this pass's Q rows; rows past the request are zero (their scores are never used).
    for (int e = threadIdx.x; e < NT * 16 * kChunks; e += kThreads) {
      const int rr = e / kChunks, ch = e % kChunks;
      uint16_t v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (rr < pass_rows) {
        const int64_t gr = row0 + pass0 + rr;
        const uint16_t* src = a.q + (gr / a.h_kv) * a.stride_q_tok + (gr % a.h_kv) * a.stride_q_head + ch * 8;
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = src[u];
      }
      uint4 w;
      w.x = uint32_t(v[0]) | (uint32_t(v[1]) << 16);
      w.y = uint32_t(v[2]) | (uint32_t(v[3]) << 16);
      w.z = uint32_t(v[4]) | (uint32_t(v[5]) << 16);
      w.w = uint32_t(v[6]) | (uint32_t(v[7]) << 16);
      *reinterpret_cast<uint4*>(q_s + rr * S::kQStride + ch * 8) = w;
    }
    __syncthreads();

    // This lane's rows (gid and gid + 8 of each tile) and the last key position each may see.
    int64_t lim[NT][2];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rr = t * 16 + h * 8 + gid;
        lim[t][h] = rr < pass_rows ? len - nq_b + (pass0 + rr) / a.h_kv : -1;
      }
    // Q fragments of one tile stay in registers for the whole chunk; with several tiles they are
    // reloaded from shared memory per key slice.
    uint4 qa[NT == 1 ? kSlices : 1], qb[NT == 1 ? kSlices : 1];
    if constexpr (NT == 1) {
#pragma unroll
      for (int j = 0; j < kSlices; ++j) {
        qa[j] = *reinterpret_cast<const uint4*>(q_s + gid * S::kQStride + (j * 4 + tig) * 8);
        qb[j] = *reinterpret_cast<const uint4*>(q_s + (gid + 8) * S::kQStride + (j * 4 + tig) * 8);
      }
    }

    RowStat st[NT][2];
#pragma unroll
    for (int t = 0; t < NT; ++t) stat_reset(st[t][0]), stat_reset(st[t][1]);
#pragma unroll
    for (int s = 0; s < S::kStages - 1; ++s) {
      if (s < n_slices) issue(s);
      cp_async_commit();
    }
    for (int64_t g = 0; g < n_slices; ++g) {
      if (g + S::kStages - 1 < n_slices) issue(g + S::kStages - 1);
      cp_async_commit();
      cp_async_wait<S::kStages - 1>();
      __syncwarp();  // every lane's copies of slice g have landed

      const int64_t blk = blk0 + warp + (g / gpb) * kWarps;
      const int k0 = int(g % gpb) * 16;
      const int32_t page = table[blk];
      const int64_t kv = min64(bk, len - blk * bk);
      if (page >= 0 && int64_t(page) < a.n_pages && k0 < kv) {
        const uint32_t stage = ring + uint32_t(int(g % S::kStages) * S::kSliceBytes);
        const int64_t kp0 = blk * bk + k0 + 2 * tig;  // position of this lane's first column
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          if (t * 16 >= pass_rows) break;
          float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
          for (int j = 0; j < kSlices; ++j) {
            uint4 xa, xb;
            if constexpr (NT == 1) {
              xa = qa[j];
              xb = qb[j];
            } else {
              xa = *reinterpret_cast<const uint4*>(q_s + (t * 16 + gid) * S::kQStride + (j * 4 + tig) * 8);
              xb = *reinterpret_cast<const uint4*>(q_s + (t * 16 + gid + 8) * S::kQStride + (j * 4 + tig) * 8);
            }
            // Key fragments straight from the stage per k-step (few live registers; with several
            // tiles the re-reads hit shared memory, not the page).
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint4 kw = lds128(stage + slice_off(h * 8 + gid, j * 4 + tig, D * 2));
              mma_16816(acc[h], xa.x, xb.x, xa.y, xb.y, kw.x, kw.y);
              mma_16816(acc[h], xa.z, xb.z, xa.w, xb.w, kw.z, kw.w);
            }
          }
          // acc[h][0..1]: row gid, keys kp0 + 8h + {0, 1}; acc[h][2..3]: row gid + 8 (only
          // scored when the tile has more than 8 rows).
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            if (r == 1 && pass_rows - t * 16 <= 8) break;
            const int64_t L = lim[t][r];
            stat_update(st[t][r], acc[0][2 * r] * a.scale, kp0 <= L, acc[0][2 * r + 1] * a.scale, kp0 + 1 <= L,
                        acc[1][2 * r] * a.scale, kp0 + 8 <= L, acc[1][2 * r + 1] * a.scale, kp0 + 9 <= L, a.lse);
          }
        }
      }
      __syncwarp();  // every lane is done with this stage before it is refilled

      if (g % gpb == gpb - 1) {
        // The block is complete: the quad's lanes share m; their l and NaN flags are summed.
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float l = st[t][r].l;
            int nan = st[t][r].nan ? 1 : 0;
            if (a.lse) {
              l += __shfl_xor_sync(0xffffffffu, l, 1);
              l += __shfl_xor_sync(0xffffffffu, l, 2);
              nan |= __shfl_xor_sync(0xffffffffu, nan, 1);
              nan |= __shfl_xor_sync(0xffffffffu, nan, 2);
            }
            const int rr = t * 16 + r * 8 + gid;
            if (tig == 0 && rr < pass_rows) {
              const int64_t off = (row0 + pass0 + rr) * a.max_blocks + blk;
              a.ws_m[off] = st[t][r].m;
              if (a.lse) a.ws_l[off] = nan ? __int_as_float(0x7fc00000) : l;
            }
            stat_reset(st[t][r]);
          }
      }
    }
    cp_async_wait<0>();
  }
}

// ---- The FP8 score kernel (IndexKeyFormat::fp8_e4m3) ----
// The same grid, warps and per-warp cp.async ring as the bf16 kernel, with 1-byte keys: a slice is
// 32 keys x D bytes plus their 32 float32 scales (4 KB at D = 128, as the bf16 slice, so the
// per-slice work of the copy loop is spread over as many bytes). The keys sit on the M side of
// mma.sync m16n8k32 (e4m3 x e4m3 -> f32), two m16 tiles per slice, and the query rows of a pass on
// N in tiles of 8, so one MMA covers 16 keys x 32 dims for up to 8 rows (the usual step: 1 token x
// 4 groups) and the key fragments are shared by all tiles. On sm_90 ptxas lowers this mma.sync to
// an exact e4m3 -> f16 unpack and f16 HMMAs with fp32 accumulation (Hopper's FP8 tensor path is
// wgmma), so the products are exact and the sum is fp32. The copy loop's bookkeeping is kept in
// shifts and 32-bit arithmetic: with the 64-bit divisions of the bf16 kernel's loop the fp8 pass
// was issue bound (2.2 TB/s at b32 x 128K against 2.65 with the 32-key slices and shifts, H100). A lane's 16-byte read of a key row is 16 dims = the A halves
// of two k32 steps; the query rows are quantized in the kernel (exactly as the host does) into
// shared memory as bytes, read back in the same order as B fragments. Scores are
// acc * (s_q * index_scale) * s_k. Each lane keeps the running max / sum-exp of its two keys per
// slice for each of its rows; the 8 lanes sharing a row combine them once per block.

__device__ __forceinline__ void mma_16832_e4m3(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 4 bytes global -> shared (a scale; the row is clamped per lane like the keys').
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ float lds32f(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
  return v;
}

// Lane-local running statistics: folds four scores (with visibility) into s, no shuffles; the
// lanes of a row are combined once at the end of the block.
__device__ __forceinline__ void stat_update4(RowStat& s, float x0, bool v0, float x1, bool v1, float x2, bool v2,
                                             float x3, bool v3, bool lse) {
  stat_fold(s, fmaxf(s.m, max4(x0, v0, x1, v1, x2, v2, x3, v3)), x0, v0, x1, v1, x2, v2, x3, v3, lse);
}

// Shared memory of the fp8 kernel: per warp kStages slices (32 key rows of D bytes, the 16-byte
// chunks of odd rows swapped by 64 bytes at D = 128 so that one 8-lane phase of 16-byte reads
// covers all banks, then 32 scales), the pass's quantized Q rows (stride chosen for the same
// reason) and their scales.
template <int D, int NT>
struct SmemFp8 {
  static constexpr int kKeys = 32;
  static constexpr int kKeyBytes = kKeys * D;
  static constexpr int kSliceBytes = kKeyBytes + kKeys * 4;
  static constexpr int kStages = D == 128 ? 3 : 6;  // ~12.4 KB of keys per warp
  static constexpr int kRingBytes = kWarps * kStages * kSliceBytes;
  static constexpr int kQStride = D == 128 ? 192 : 64;
  static constexpr int kQBytes = NT * 8 * kQStride;
  static constexpr int kQScaleOff = kRingBytes + kQBytes;
  static constexpr int kBytes = kQScaleOff + NT * 8 * 4;
};

template <int D>
__device__ __forceinline__ uint32_t key_off8(int row, int ch) {
  if constexpr (D == 128) return uint32_t(row * 128 + ((ch ^ ((row & 1) << 2)) << 4));
  else return uint32_t(row * D + (ch << 4));
}

template <int D, int NT>
__global__ void __launch_bounds__(kThreads, NT <= 2 ? 2 : 1) decode_index_score_fp8_kernel(const Args a) {
  using S = SmemFp8<D, NT>;
  constexpr int kReads = D / 64;              // 16-byte reads per key row per lane (two k32 steps each)
  constexpr int kChunks = D / 16;             // 16-byte chunks per key row
  constexpr int kCopies = S::kKeys * kChunks / 32;  // cp.async of keys per lane per slice
  constexpr int kPerLane = D / 32;            // query values a lane quantizes
  constexpr bool kQRegs = NT == 1;            // Q fragments held in registers for the whole chunk
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* q_s = smem + S::kRingBytes;
  float* qsc_s = reinterpret_cast<float*>(smem + S::kQScaleOff);

  const int64_t b = blockIdx.x / unsigned(a.n_chunks);
  const int c = int(blockIdx.x % unsigned(a.n_chunks));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const uint32_t ring = smem_addr(smem) + uint32_t(warp * S::kStages * S::kSliceBytes);
  const uint32_t q_addr = smem_addr(q_s);

  int64_t lo = 0, nq_b = 0, len = 0;
  if (!request_rows(a, b, c, lo, nq_b, len)) return;
  const int64_t bk = a.bk, rows = nq_b * a.h_kv, row0 = lo * a.h_kv;
  const int64_t n_blk = (len + bk - 1) / bk;
  const int64_t blk0 = int64_t(c) * a.split;
  if (blk0 >= n_blk) return;  // a plan for longer contexts: this chunk has nothing yet
  const int64_t blk1 = min64(blk0 + a.split, n_blk);
  const int32_t* table = a.block_table + b * a.max_blocks;
  // Slice g of this warp is slot (g & gmask) * 32 of its block g >> gsh: shifts, not 64-bit
  // divisions, which would cost as much issue time as the slice's MMAs and epilogue together (bk
  // is 64 or 128, checked on the host).
  const int gsh = bk == 128 ? 2 : 1, gmask = (1 << gsh) - 1;
  const int64_t n_mine = blk1 - blk0 > warp ? (blk1 - blk0 - warp + kWarps - 1) / kWarps : 0;
  const int64_t n_slices = n_mine << gsh;
  const uint8_t* kc = static_cast<const uint8_t*>(a.k_cache);

  auto issue = [&](int64_t g) {
    const int64_t blk = blk0 + warp + (g >> gsh) * kWarps;
    const int k0 = (int(g) & gmask) * S::kKeys;
    const int32_t page = table[blk];
    const int64_t kv = min64(bk, len - blk * bk);
    if (page < 0 || int64_t(page) >= a.n_pages || k0 >= kv) return;
    const uint8_t* base = kc + int64_t(page) * bk * D;
    const uint32_t dst = ring + (uint32_t(g) % S::kStages) * S::kSliceBytes;
#pragma unroll
    for (int u = 0; u < kCopies; ++u) {
      const int e = u * 32 + lane, row = e / kChunks, ch = e % kChunks;
      const int64_t kr = min64(k0 + row, kv - 1);  // never a slot at or past seq_lens
      cp_async16(dst + key_off8<D>(row, ch), base + kr * D + ch * 16);
    }
    cp_async4(dst + S::kKeyBytes + lane * 4, a.k_scale + int64_t(page) * bk + min64(k0 + lane, kv - 1));
  };

  for (int64_t pass0 = 0; pass0 < rows; pass0 += NT * 8) {
    const int pass_rows = int(min64(rows - pass0, NT * 8));
    __syncthreads();  // the previous pass's Q is no longer read
    // Quantize this pass's Q rows, one warp per row; rows past the request are zero with scale 0.
    for (int rr = warp; rr < NT * 8; rr += kWarps) {
      uint8_t q8[kPerLane];
      float sc = 0.f;
      if (rr < pass_rows) {
        const int64_t gr = row0 + pass0 + rr;
        const uint16_t* src = a.q + (gr / a.h_kv) * a.stride_q_tok + (gr % a.h_kv) * a.stride_q_head + lane * kPerLane;
        float x[kPerLane];
#pragma unroll
        for (int u = 0; u < kPerLane; ++u) x[u] = __uint_as_float(uint32_t(src[u]) << 16);
        sc = e4m3_quantize_row_warp<kPerLane>(x, q8) * a.scale;
      } else {
#pragma unroll
        for (int u = 0; u < kPerLane; ++u) q8[u] = 0;
      }
      uint32_t w = 0;
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) w |= uint32_t(q8[u]) << (8 * u);
      if constexpr (kPerLane == 4)
        *reinterpret_cast<uint32_t*>(q_s + rr * S::kQStride + lane * 4) = w;
      else
        *reinterpret_cast<uint16_t*>(q_s + rr * S::kQStride + lane * 2) = uint16_t(w);
      if (lane == 0) qsc_s[rr] = sc;
    }
    __syncthreads();

    // This lane's rows (tig * 2 + r of each tile of 8): scale and the last key position each sees.
    // Positions fit int32 (seq_lens is int32); kept narrow to save registers.
    float qsc[NT][2];
    int32_t lim[NT][2];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int rr = t * 8 + tig * 2 + r;
        qsc[t][r] = qsc_s[rr];
        lim[t][r] = rr < pass_rows ? int32_t(len - nq_b + (pass0 + rr) / a.h_kv) : -1;
      }
    uint4 qf[kQRegs ? NT : 1][kReads];
    if constexpr (kQRegs) {
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int j = 0; j < kReads; ++j)
          qf[t][j] = lds128(q_addr + uint32_t((t * 8 + gid) * S::kQStride + (j * 4 + tig) * 16));
    }

    RowStat st[NT][2];
#pragma unroll
    for (int t = 0; t < NT; ++t) stat_reset(st[t][0]), stat_reset(st[t][1]);
#pragma unroll
    for (int s = 0; s < S::kStages - 1; ++s) {
      if (s < n_slices) issue(s);
      cp_async_commit();
    }
    for (int64_t g = 0; g < n_slices; ++g) {
      if (g + S::kStages - 1 < n_slices) issue(g + S::kStages - 1);
      cp_async_commit();
      cp_async_wait<S::kStages - 1>();
      __syncwarp();

      const int64_t blk = blk0 + warp + (g >> gsh) * kWarps;
      const int k0 = (int(g) & gmask) * S::kKeys;
      const int32_t page = table[blk];
      const int64_t kv = min64(bk, len - blk * bk);
      if (page >= 0 && int64_t(page) < a.n_pages && k0 < kv) {
        const uint32_t stage = ring + (uint32_t(g) % S::kStages) * S::kSliceBytes;
        float acc[2][NT][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int t = 0; t < NT; ++t) acc[mt][t][0] = acc[mt][t][1] = acc[mt][t][2] = acc[mt][t][3] = 0.f;
#pragma unroll
        for (int j = 0; j < kReads; ++j) {
          uint4 qv[NT];
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            if constexpr (kQRegs) qv[t] = qf[t][j];
            else if (t * 8 < pass_rows) qv[t] = lds128(q_addr + uint32_t((t * 8 + gid) * S::kQStride + (j * 4 + tig) * 16));
          }
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            // A: keys mt * 16 + gid (a0, a2) and + 8 (a1, a3); each 16-byte read is two k32 steps.
            const uint4 ka = lds128(stage + key_off8<D>(mt * 16 + gid, j * 4 + tig));
            const uint4 kb = lds128(stage + key_off8<D>(mt * 16 + gid + 8, j * 4 + tig));
#pragma unroll
            for (int t = 0; t < NT; ++t) {
              if (t * 8 >= pass_rows) break;
              mma_16832_e4m3(acc[mt][t], ka.x, kb.x, ka.y, kb.y, qv[t].x, qv[t].y);
              mma_16832_e4m3(acc[mt][t], ka.z, kb.z, ka.w, kb.w, qv[t].z, qv[t].w);
            }
          }
        }
        float sk[2][2];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) sk[mt][h] = lds32f(stage + S::kKeyBytes + (mt * 16 + h * 8 + gid) * 4);
        const int64_t kp = blk * bk + k0 + gid;  // position of key gid; key mt * 16 + h * 8 + gid is kp + 16 mt + 8 h
        // acc[mt][t][r]: key mt * 16 + gid, row t * 8 + tig * 2 + r; acc[mt][t][2 + r]: key + 8.
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          if (t * 8 >= pass_rows) break;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int64_t L = lim[t][r];
            const float qs = qsc[t][r];
            stat_update4(st[t][r], acc[0][t][r] * qs * sk[0][0], kp <= L, acc[0][t][2 + r] * qs * sk[0][1], kp + 8 <= L,
                         acc[1][t][r] * qs * sk[1][0], kp + 16 <= L, acc[1][t][2 + r] * qs * sk[1][1], kp + 24 <= L,
                         a.lse);
          }
        }
      }
      __syncwarp();  // every lane is done with this stage before it is refilled

      if ((int(g) & gmask) == gmask) {
        // The block is complete: the 8 lanes of a row (same tig) combine max, sum and NaN flag.
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float m = st[t][r].m;
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            float l = 0.f;
            int nan = 0;
            if (a.lse) {
              l = (isfinite(st[t][r].m) && isfinite(m)) ? st[t][r].l * __expf(st[t][r].m - m) : 0.f;
              nan = st[t][r].nan ? 1 : 0;
#pragma unroll
              for (int o = 4; o < 32; o <<= 1) {
                l += __shfl_xor_sync(0xffffffffu, l, o);
                nan |= __shfl_xor_sync(0xffffffffu, nan, o);
              }
            }
            const int rr = t * 8 + tig * 2 + r;
            if (gid == 0 && rr < pass_rows) {
              const int64_t off = (row0 + pass0 + rr) * a.max_blocks + blk;
              a.ws_m[off] = m;
              if (a.lse) a.ws_l[off] = nan ? __int_as_float(0x7fc00000) : l;
            }
            stat_reset(st[t][r]);
          }
      }
    }
    cp_async_wait<0>();
  }
}

// index_lse of each row from its selection: log sum over the selected blocks of exp(M) * L, NaN if
// any selected block holds a NaN score, +inf if any holds +inf, -inf without mass. One warp per
// row, a lane per selected entry.
__global__ void __launch_bounds__(256) decode_index_lse_kernel(const float* ws_m, const float* ws_l,
                                                               const int32_t* ws_nvis, const int32_t* topk_idx,
                                                               float* index_lse, int64_t rows, int64_t max_blocks,
                                                               int topk) {
  const int64_t row = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int64_t n_vis = clamp64(ws_nvis[row], 0, max_blocks);
  float m = -__int_as_float(0x7f800000), l = 0.f;
  bool nan = false;
  if (lane < topk) {
    const int32_t j = topk_idx[row * topk + lane];
    if (j >= 0 && j < n_vis) {
      m = ws_m[row * max_blocks + j];
      l = ws_l[row * max_blocks + j];
      nan = isnan(l);
      if (isnan(m)) m = -__int_as_float(0x7f800000), l = 0.f;  // a skipped page: no mass
    }
  }
  nan = __any_sync(0xffffffffu, nan);
  float mx = m;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float s = (isfinite(mx) && isfinite(m)) ? l * expf(m - mx) : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) {
    float out;
    if (nan)
      out = __int_as_float(0x7fc00000);
    else if (!isfinite(mx))
      out = mx;  // +inf dominates; -inf: no mass
    else
      out = mx + logf(s);
    index_lse[row] = out;
  }
}

void check_supported(const char* fn, const char* prefix, int64_t d_idx, int64_t bk, int64_t topk) {
  if (d_idx != 64 && d_idx != 128)
    throw Error(std::string("msa::") + fn + ": " + prefix + "d_idx = " + std::to_string(d_idx) +
                ", expected 64 or 128 for the index pass on the cuda backend");
  if (bk != 64 && bk != 128)
    throw Error(std::string("msa::") + fn + ": " + prefix + "bk = " + std::to_string(bk) +
                ", expected 64 or 128 for the index pass on the cuda backend");
  if (topk < 1 || topk > kMaxTopk)
    throw Error(std::string("msa::") + fn + ": " + prefix + "topk = " + std::to_string(topk) + ", expected 1.." +
                std::to_string(kMaxTopk));
}

struct WsLayout {
  size_t m, l, nvis, total;
};

WsLayout ws_layout(int64_t n_q, int64_t h_kv, int64_t max_blocks) {
  const size_t rows = size_t(std::max<int64_t>(1, n_q)) * size_t(h_kv);
  const size_t mat = align256(rows * size_t(std::max<int64_t>(1, max_blocks)) * 4);
  WsLayout w;
  w.m = 0;
  w.l = mat;
  w.nvis = 2 * mat;
  w.total = 2 * mat + align256(rows * 4);
  return w;
}

template <int D, int NT>
void launch_score(const Args& a, int64_t grid, cudaStream_t stream) {
  constexpr int bytes = Smem<D, NT>::kBytes;
  ensure_smem(kFn, reinterpret_cast<const void*>(&decode_index_score_kernel<D, NT>), bytes);
  decode_index_score_kernel<D, NT><<<unsigned(grid), kThreads, bytes, stream>>>(a);
}

template <int D, int NT>
void launch_score_fp8(const Args& a, int64_t grid, cudaStream_t stream) {
  constexpr int bytes = SmemFp8<D, NT>::kBytes;
  ensure_smem(kFn, reinterpret_cast<const void*>(&decode_index_score_fp8_kernel<D, NT>), bytes);
  decode_index_score_fp8_kernel<D, NT><<<unsigned(grid), kThreads, bytes, stream>>>(a);
}

}  // namespace

size_t plan_decode_index(DecodePlan& plan) {
  const DecodeShape& s = plan.shape;
  check_supported("plan_decode", "shape.", s.d_idx, s.bk, s.topk);
  // Blocks per CTA: each warp takes about 32 KB of keys (one page at bk = d_idx = 128), so a
  // long context makes thousands of short CTAs. The pass is bandwidth bound and its CTAs start
  // whenever a slot frees, so many short CTAs balance the SMs and the memory channels better than
  // one even wave of long ones (H100, b32 x 128K: 375.9 us at 8 blocks per CTA against 396.2 us
  // at 128, 412.8 us at 256; b1 x 1M: 125.0 us at 8 against 127.5 us at 32, docs/decode_index.md).
  // With fp8_e4m3 keys a page is half the bytes, so a CTA takes twice the blocks.
  const int64_t page_bytes = s.bk * s.d_idx * (s.k_idx_format == IndexKeyFormat::fp8_e4m3 ? 1 : 2);
  const int64_t best = kWarps * std::max<int64_t>(1, 32768 / page_bytes);
  plan.index_split = best;
  return ws_layout(s.n_q, s.h_kv, s.max_blocks).total;
}

void run_decode_index_topk(const DecodeIndexParams& p, const DecodePlan& plan, void* workspace, cudaStream_t stream) {
  const PagedKvCache& c = p.cache;
  check_supported(kFn, "cache.", c.d_idx, c.bk, p.topk);
  if (p.dtype != DType::bf16) throw Error(std::string("msa::") + kFn + ": dtype is not bf16, expected bf16 on the cuda backend");
  if (plan.index_split < kWarps || plan.index_split % kWarps != 0)
    throw Error(std::string("msa::") + kFn + ": plan.index_split = " + std::to_string(plan.index_split) +
                ", expected a plan from plan_decode with d_idx > 0");
  if (reinterpret_cast<uintptr_t>(c.k_idx_cache) % 16 != 0)
    throw Error(std::string("msa::") + kFn +
                ": cache.k_idx_cache is not 16-byte aligned, expected the page pool at a 16-byte boundary");
  if (p.n_q <= 0 || c.batch <= 0) return;

  const WsLayout w = ws_layout(plan.shape.n_q, c.h_kv, plan.shape.max_blocks);
  char* ws = static_cast<char*>(workspace) + plan.index_workspace_offset;
  Args a{};
  a.q = static_cast<const uint16_t*>(p.q_idx);
  a.stride_q_tok = p.stride_q_idx_tok;
  a.stride_q_head = p.stride_q_idx_head;
  a.k_cache = c.k_idx_cache;
  a.k_scale = c.k_idx_scale;
  a.block_table = c.block_table;
  a.seq_lens = c.seq_lens;
  a.cu_q = p.cu_seqlens_q;
  a.n_q = p.n_q;
  a.batch = c.batch;
  a.n_pages = c.n_pages;
  a.max_blocks = c.max_blocks;
  a.bk = int(c.bk);
  a.h_kv = int(c.h_kv);
  a.split = int(plan.index_split);
  a.n_chunks = int(std::max<int64_t>(1, (c.max_blocks + a.split - 1) / a.split));
  a.scale = p.index_scale;
  a.lse = p.index_lse != nullptr;
  a.ws_m = reinterpret_cast<float*>(ws + w.m);
  a.ws_l = reinterpret_cast<float*>(ws + w.l);
  a.ws_nvis = reinterpret_cast<int32_t*>(ws + w.nvis);

  const int64_t grid = c.batch * a.n_chunks;
  if (grid > INT32_MAX)
    throw Error(std::string("msa::") + kFn + ": batch x chunks = " + std::to_string(grid) +
                " exceeds the grid, expected fewer than 2^31 CTAs");
  // The per-request query count is on the device: the tile count of a pass is chosen from the
  // planned hint, and any count is still correct (passes of up to 64 rows loop in the kernel,
  // and a pass of NT tiles scores NT * 16 rows at most; larger requests take several passes).
  const int64_t hint_rows = std::max<int64_t>(1, std::min(plan.shape.max_q, p.n_q)) * c.h_kv;
  const int nt = hint_rows <= 16 ? 1 : hint_rows <= 32 ? 2 : kMaxTiles;
  // The fp8 kernel's tiles are 8 rows (n8): 1, 2, 4 or 8 of them per pass.
  const int nt8 = hint_rows <= 8 ? 1 : hint_rows <= 16 ? 2 : hint_rows <= 32 ? 4 : 8;
  if (c.k_idx_format == IndexKeyFormat::fp8_e4m3) {
    if (c.d_idx == 128) {
      if (nt8 == 1) launch_score_fp8<128, 1>(a, grid, stream);
      else if (nt8 == 2) launch_score_fp8<128, 2>(a, grid, stream);
      else if (nt8 == 4) launch_score_fp8<128, 4>(a, grid, stream);
      else launch_score_fp8<128, 8>(a, grid, stream);
    } else {
      if (nt8 == 1) launch_score_fp8<64, 1>(a, grid, stream);
      else if (nt8 == 2) launch_score_fp8<64, 2>(a, grid, stream);
      else if (nt8 == 4) launch_score_fp8<64, 4>(a, grid, stream);
      else launch_score_fp8<64, 8>(a, grid, stream);
    }
  } else if (c.d_idx == 128) {
    if (nt == 1) launch_score<128, 1>(a, grid, stream);
    else if (nt == 2) launch_score<128, 2>(a, grid, stream);
    else launch_score<128, 4>(a, grid, stream);
  } else {
    if (nt == 1) launch_score<64, 1>(a, grid, stream);
    else if (nt == 2) launch_score<64, 2>(a, grid, stream);
    else launch_score<64, 4>(a, grid, stream);
  }
  check_cuda(kFn, cudaGetLastError(), "launch of the decode index score kernel");

  BlockTopkParams tp;
  tp.rows = p.n_q * c.h_kv;
  tp.n_blocks = std::max<int64_t>(1, c.max_blocks);
  tp.topk = p.topk;
  tp.force_last = true;
  tp.scores = a.ws_m;
  tp.stride_row = c.max_blocks;
  tp.row_blocks = a.ws_nvis;
  tp.topk_idx = p.topk_idx;
  run_block_topk(tp, stream);

  if (p.index_lse) {
    const int64_t rows = p.n_q * c.h_kv;
    decode_index_lse_kernel<<<unsigned((rows + 7) / 8), 256, 0, stream>>>(a.ws_m, a.ws_l, a.ws_nvis, p.topk_idx,
                                                                         p.index_lse, rows, c.max_blocks, int(p.topk));
    check_cuda(kFn, cudaGetLastError(), "launch of the decode index lse kernel");
  }
}

}  // namespace msa::cuda
