// index_topk.cuh — the fused CUDA index kernel for sm_90a (scores on wgmma, causal block max in
// the epilogue, running top-k per query row in shared memory, index_lse) and its launcher
// template. Instantiated per (d_idx, bk, lse) in index_topk_d64.cu / index_topk_d128.cu.
// Design and measurements: docs/index_kernel.md.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "hopper.cuh"
#include "host.h"
#include "tile_size.h"

namespace msa::cuda {

// The public operation, for error messages.
constexpr const char* kIndexOp = "index_topk";

// Everything the kernel reads besides the K tensor map. Rows are the flattened (token, head)
// pairs R = tok * h_kv + head of q_idx, so any h_kv tiles the same way.
struct IndexKernelParams {
  int64_t n_q = 0, n_k = 0, batch = 1, h_kv = 1;
  int64_t n_rows = 0;                // n_q * h_kv
  const int32_t* cu_q = nullptr;     // [batch+1] device, or null (one sequence)
  const int32_t* cu_k = nullptr;     // [batch+1] device, or null (then cu_q)
  const int32_t* q_pos = nullptr;    // [n_q] device, or null (bottom-right aligned)
  const uint16_t* q = nullptr;       // [n_q, h_kv, d] bf16 bits
  int64_t stride_q_tok = 0, stride_q_head = 0;
  int q_vec = 0;                     // rows of q are 16-byte aligned: vector loads
  int topk = 16;
  float scale = 1.f;                 // index_scale
  int32_t* topk_idx = nullptr;       // [n_rows, topk]
  float* block_scores = nullptr;     // optional [n_rows, n_blocks]
  int64_t n_blocks = 0;
  float* lse = nullptr;              // [n_rows] when the kernel is built with LSE
  int stages = 2;                    // K pipeline depth
};

// Shared-memory map, identical on host (sizing) and device. Q and the K stages sit at multiples
// of 1024 bytes from a 1024-aligned base, which the 128-byte swizzle of TMA and wgmma needs.
struct IdxSmemLayout {
  uint32_t q, k, stage_bytes, list_comp, list_se, seg_kb, seg_nt, misc, bar_full, bar_empty, total;
};

__host__ __device__ inline IdxSmemLayout idx_smem_layout(int d, bool lse, int list_len, int stages) {
  IdxSmemLayout l{};
  uint32_t off = 0;
  l.q = off;
  off += uint32_t(kIdxBlockM) * d * 2;
  l.k = off;
  l.stage_bytes = uint32_t(kIdxBlockN) * d * 2;
  off += uint32_t(stages) * l.stage_bytes;
  l.list_comp = off;
  off += uint32_t(kIdxBlockM) * list_len * 8;
  l.list_se = off;
  if (lse) off += uint32_t(kIdxBlockM) * list_len * 4;
  l.seg_kb = off;
  off += kIdxBlockM * 4;
  l.seg_nt = off;
  off += kIdxBlockM * 4;
  l.misc = off;
  off += 16;
  off = (off + 7) & ~7u;
  l.bar_full = off;
  off += uint32_t(stages) * 8;
  l.bar_empty = off;
  off += uint32_t(stages) * 8;
  l.total = off;
  return l;
}

namespace idx_detail {

using namespace hopper;  // the shared sm_90a PTX wrappers

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fffffff); }

// Monotone map of a score to uint32 for ranking: NaN -> 0 (below everything), -0 -> +0 (so the
// two zeros tie, as they compare equal), otherwise larger float -> larger key.
__device__ __forceinline__ uint32_t order_key(float x) {
  if (x != x) return 0u;
  uint32_t u = __float_as_uint(x);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_to_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// A top-k entry as one comparable word: score key above, the complemented block number below,
// so equal scores rank the lower block higher. 0 marks an empty slot (it ranks below any entry,
// a NaN score included, since the complement of a block number < 2^31 is >= 2^31).
__device__ __forceinline__ uint64_t make_comp(float score, int block) {
  return (uint64_t(order_key(score)) << 32) | uint64_t(~uint32_t(block));
}
__device__ __forceinline__ int comp_block(uint64_t c) { return int(~uint32_t(c)); }

// Where a row stands, known to all 4 threads (a quad) that hold its columns in the wgmma layout.
struct RowPos {
  int p;    // absolute position, -1 if the row sees nothing (or does not exist)
  int seg;  // segment (sequence run) of the CTA the row belongs to, -1 if none
};

// Top-k state of the one row a thread owns: thread q of a quad owns the quad's row
// (half h = q / 2, i = q % 2), so the 32 lanes of a warp own its 32 rows and a warp-wide
// insertion step serves every row that needs one at once.
struct OwnState {
  int p, seg, own;  // position, segment and local block floor(p / bk) of the owned row
  int n_fill;       // entries in the row's heap
  uint64_t worst;   // heap root: smallest kept entry (0 while the heap is not full)
  float own_m;      // block score of the local block
  float own_se;     // sum over the local block of exp(S - own_m) (LSE only)
};

struct EpiCtx {
  int lane;
  int list_len;             // topk - 1
  float scale, scale_log2;  // index_scale and index_scale * log2(e)
  uint64_t* list_comp;      // [kIdxBlockM, list_len]: per row a min-heap, heap slot k + 1 at index k
  float* list_se;           // [kIdxBlockM, list_len]: exp-sums beside the heap entries (LSE only)
  float* block_scores;      // global, may be null
  int64_t n_blocks;
  int64_t row0;
};

// Inserts cand into the owned row's top-(k-1) min-heap h[1..L] (1-based views of the row's
// list; hs holds the exp-sums beside the entries). While the heap fills, sift up; once full, cand
// replaces the root and sifts down. Entries are distinct words, so no comparison ties.
template <bool LSE>
__device__ __forceinline__ void heap_insert(uint64_t* h, float* hs, int L, OwnState& os, uint64_t cand, float se) {
  if (os.n_fill < L) {
    int i = ++os.n_fill;
    while (i > 1) {
      const int par = i >> 1;
      const uint64_t cp = h[par];
      if (cp < cand) break;
      h[i] = cp;
      if constexpr (LSE) hs[i] = hs[par];
      i = par;
    }
    h[i] = cand;
    if constexpr (LSE) hs[i] = se;
    if (os.n_fill == L) os.worst = h[1];
  } else {
    int i = 1;
    for (;;) {
      const int l = 2 * i;
      if (l > L) break;
      uint64_t cc = h[l];
      int c = l;
      if (l < L) {
        const uint64_t cr = h[l + 1];
        if (cr < cc) {
          cc = cr;
          c = l + 1;
        }
      }
      if (cand < cc) break;
      h[i] = cc;
      if constexpr (LSE) hs[i] = hs[c];
      i = c;
    }
    h[i] = cand;
    if constexpr (LSE) hs[i] = se;
    os.worst = h[1];
  }
}

// Block max of one m64 x 128 accumulator half h, then the running top-k update of the rows it
// holds. Columns of tile t are key positions t * 128 + col; row i of this thread sees
// col <= lim. acc[j * 4 + i * 2 + c] holds row (lane / 4 + 8 i), column 8 j + 2 (lane % 4) + c.
// The 4 threads of a quad reduce each row's max together; the row's owner (OwnState) alone then
// ranks it, so the per-row logic runs once per row instead of once per thread.
template <int BK, bool LSE>
__device__ __forceinline__ void epilogue_half(const float (&acc)[64], const RowPos (&rp)[2], int h, OwnState& os,
                                              int r_own, int t, int seg, const EpiCtx& c) {
  constexpr int NB = kIdxBlockN / BK;  // blocks per key tile
  constexpr int JB = 16 / NB;          // 8-column chunks per block
  const unsigned full = 0xffffffffu;
  const int q4 = c.lane & 3;
  float m[2][NB];
  int lim[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    lim[i] = rp[i].p - t * kIdxBlockN;
    const bool active = rp[i].seg == seg && lim[i] >= 0;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) m[i][nb] = nan_f();
    // Invisible columns become NaN, which fmaxf ignores; a block is NaN only if nothing visible
    // in it is a number, which is the NaN-ignoring max of the contract.
    if (__any_sync(full, active && lim[i] < kIdxBlockN - 1)) {
#pragma unroll
      for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * j + 2 * q4 + cc;
          const float v = col <= lim[i] ? acc[j * 4 + i * 2 + cc] : nan_f();
          m[i][j / JB] = fmaxf(m[i][j / JB], v);
        }
    } else {
#pragma unroll
      for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) m[i][j / JB] = fmaxf(m[i][j / JB], acc[j * 4 + i * 2 + cc]);
    }
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      m[i][nb] = fmaxf(m[i][nb], __shfl_xor_sync(full, m[i][nb], 1));
      m[i][nb] = fmaxf(m[i][nb], __shfl_xor_sync(full, m[i][nb], 2));
    }
  }
  const bool mine = (q4 >> 1) == h;
  const int my_i = q4 & 1;
  const int lim_own = os.p - t * kIdxBlockN;
  const bool active_own = mine && os.seg == seg && lim_own >= 0;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    const int b = t * NB + nb;
    const bool vis = active_own && nb * BK <= lim_own;
    // max(S) = index_scale * max(dot) since index_scale > 0.
    const float score = (my_i ? m[1][nb] : m[0][nb]) * c.scale;
    if (c.block_scores != nullptr && vis && b < c.n_blocks) c.block_scores[(c.row0 + r_own) * c.n_blocks + b] = score;
    const bool is_own = vis && b == os.own;
    const uint64_t cand = make_comp(score, b);
    // A strict > against the heap root is the whole rule: the words order by score, then lower
    // block, and a non-full heap has root 0, below every entry.
    const bool enter = vis && !is_own && cand > os.worst;
    float se = 0.f;
    if constexpr (LSE) {
      // exp-sums are needed only for blocks that (so far) make the selection; late in the sweep
      // that is rare, so the MUFU work stays far below one exp per score. Each quad thread sums
      // its columns of the row; the owner keeps the total.
      const bool need = is_own || enter;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const bool need_i = __shfl_sync(full, need, (c.lane & ~3) | (2 * h + i));
        if (__any_sync(full, need_i)) {
          const float off = -m[i][nb] * c.scale_log2;
          float sum = 0.f;
#pragma unroll
          for (int j = nb * JB; j < (nb + 1) * JB; ++j)
#pragma unroll
            for (int cc = 0; cc < 2; ++cc) {
              const int col = 8 * j + 2 * q4 + cc;
              const float e = ex2_approx(fmaf(acc[j * 4 + i * 2 + cc], c.scale_log2, off));
              sum += col <= lim[i] ? e : 0.f;
            }
          sum += __shfl_xor_sync(full, sum, 1);
          sum += __shfl_xor_sync(full, sum, 2);
          if (my_i == i) se = sum;
        }
      }
    }
    if (is_own) {
      os.own_m = score;
      os.own_se = se;
    }
    if (__any_sync(full, enter)) {
      if (enter)
        heap_insert<LSE>(c.list_comp + r_own * c.list_len - 1, c.list_se + r_own * c.list_len - 1, c.list_len, os,
                         cand, se);
    }
  }
}

// The wgmma chain of one m64 accumulator half (64 rows of the 256-row Q tile) over one K stage.
template <int D>
__device__ __forceinline__ void issue_half(float (&acc)[64], uint32_t q_half, uint32_t k_stage) {
  wgmma_chain_m64n128<D, kIdxBlockM, kIdxBlockN>(acc, q_half, k_stage);
}

}  // namespace idx_detail

// One CTA: kIdxBlockM consecutive query rows against every key tile any of them can see.
// Warpgroups 0-1 are consumers (128 rows each); one thread of warpgroup 2 issues the K loads (TMA).
// The rows of a CTA may span several sequences; each run of rows of one sequence ("segment")
// sweeps that sequence's key tiles 0 .. max(p) / 128 with the other rows masked.
template <int D, int BK, bool LSE>
__global__ void __launch_bounds__(kIdxThreads, 1)
    index_topk_kernel(const __grid_constant__ CUtensorMap tmap_k, const IndexKernelParams p) {
  using namespace idx_detail;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int list_len = p.topk - 1;
  const int n_stages = p.stages;
  const IdxSmemLayout lay = idx_smem_layout(D, LSE, list_len, n_stages);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // Later rows sweep more key tiles: start them first so the short ones fill the tail.
  const int64_t row0 = (int64_t(gridDim.x) - 1 - blockIdx.x) * kIdxBlockM;

  const uint32_t s_base = smem_addr(smem);
  const uint32_t sq = s_base + lay.q, sk = s_base + lay.k;
  uint64_t* list_comp = reinterpret_cast<uint64_t*>(smem + lay.list_comp);
  float* list_se = reinterpret_cast<float*>(smem + lay.list_se);
  int* seg_kb = reinterpret_cast<int*>(smem + lay.seg_kb);
  int* seg_nt = reinterpret_cast<int*>(smem + lay.seg_nt);
  int* misc = reinterpret_cast<int*>(smem + lay.misc);
  const uint32_t bar_full = s_base + lay.bar_full, bar_empty = s_base + lay.bar_empty;
  // Per-row scratch for the set-up; it lives in the K stages, which no TMA writes before the
  // third barrier below.
  int* row_seq = reinterpret_cast<int*>(smem + lay.k);
  int* row_p = row_seq + kIdxBlockM;
  int* row_kb = row_p + kIdxBlockM;
  int* row_seg = row_kb + kIdxBlockM;

  if (tid == 0) {
    for (int s = 0; s < n_stages; ++s) {
      mbar_init(bar_full + 8 * s, 1);
      // One arrival per consumer warp, each after its own wgmma wait (256 per-thread arrivals
      // would be 256 shared-memory atomics per stage).
      mbar_init(bar_empty + 8 * s, kIdxConsumerWarpgroups * 4);
    }
    fence_mbarrier_init();
  }
  if (tid < kIdxBlockM) {
    // Position of each row. Offsets are clamped into [0, n], positions into [-1, len_k): garbage
    // varlen contents give garbage selections but never an access outside the tensors.
    const int64_t R = row0 + tid;
    int64_t seq = -1, pos = -1, kb = 0;
    if (R < p.n_rows) {
      const int64_t tok = R / p.h_kv;
      const int64_t b = p.cu_q ? find_seq(p.cu_q, p.batch, tok) : 0;
      const SeqRows sr = seq_rows(p.cu_q, p.cu_k, b, p.n_q, p.n_k);
      seq = b;
      pos = query_pos(p.q_pos, sr, tok);
      kb = sr.k_lo;
    }
    row_seq[tid] = int(seq);
    row_p[tid] = int(pos);
    row_kb[tid] = int(kb);
  }
  if (tid < kIdxConsumerWarpgroups * 128) {
    // Q tile, swizzled as TMA would: 16-byte chunk ch of row r lands at chunk (ch ^ r % 8).
    constexpr int kChunks = D / 8;
    for (int ci = tid; ci < kIdxBlockM * kChunks; ci += kIdxConsumerWarpgroups * 128) {
      const int r = ci / kChunks, ch = ci % kChunks;
      const int64_t R = row0 + r;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (R < p.n_rows) {
        const int64_t tok = R / p.h_kv, head = R - tok * p.h_kv;
        const uint16_t* src = p.q + tok * p.stride_q_tok + head * p.stride_q_head + ch * 8;
        if (p.q_vec) {
          v = __ldg(reinterpret_cast<const uint4*>(src));
        } else {
          uint32_t w[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) w[e] = uint32_t(__ldg(src + 2 * e)) | (uint32_t(__ldg(src + 2 * e + 1)) << 16);
          v = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
      *reinterpret_cast<uint4*>(smem + lay.q + sw128_chunk_offset<kIdxBlockM>(r, ch)) = v;
    }
  }
  for (int e = tid; e < kIdxBlockM * list_len; e += kIdxThreads) list_comp[e] = 0;
  fence_proxy_async();
  __syncthreads();

  if (warp == 0) {
    // Segments: maximal runs of rows of one sequence, with their key offset and tile count.
    for (int e = lane; e < kIdxBlockM; e += 32) seg_nt[e] = 0;
    __syncwarp();
    int n_seg = 0;
    for (int chunk = 0; chunk < kIdxBlockM / 32; ++chunk) {
      const int r = chunk * 32 + lane;
      const bool valid = row0 + r < p.n_rows;
      const int sq_r = row_seq[r];
      const bool first = valid && (r == 0 || row_seq[r - 1] != sq_r);
      const unsigned bal = __ballot_sync(0xffffffffu, first);
      const int my = n_seg + __popc(bal & (0xffffffffu >> (31 - lane))) - 1;
      if (first) seg_kb[my] = row_kb[r];
      if (valid) {
        row_seg[r] = my;
        atomicMax(&seg_nt[my], row_p[r] >= 0 ? row_p[r] / kIdxBlockN + 1 : 0);
      } else {
        row_seg[r] = -1;
      }
      n_seg += __popc(bal);
    }
    __syncwarp();
    int64_t jobs = 0;
    for (int e = lane; e < n_seg; e += 32) jobs += seg_nt[e];
    for (int o = 16; o > 0; o >>= 1) jobs += __shfl_xor_sync(0xffffffffu, jobs, o);
    if (lane == 0) {
      misc[0] = n_seg;
      misc[1] = int(jobs > INT32_MAX ? INT32_MAX : jobs);
    }
  }
  __syncthreads();

  // Broadcast from lane 0 so that ptxas sees warp-uniform values: a wgmma under a branch it
  // cannot prove uniform is serialized (C7518).
  const unsigned full = 0xffffffffu;
  const int n_seg = __shfl_sync(full, misc[0], 0);
  const int n_jobs = __shfl_sync(full, misc[1], 0);
  const int wg = __shfl_sync(full, tid / 128, 0);
  const int cg = warp >> 2;  // consumer warpgroup
  const int r_base = cg * kIdxRowsPerConsumer + (warp & 3) * 16 + (lane >> 2);
  const int q4 = lane & 3;
  const int r_own = r_base + (q4 >> 1) * 64 + 8 * (q4 & 1);  // the row this thread ranks
  RowPos rp[2][2];
  OwnState os;
  if (wg < kIdxConsumerWarpgroups) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = r_base + h * 64 + 8 * i;
        rp[h][i].p = row_p[r];
        rp[h][i].seg = row_seg[r];
      }
    os.p = row_p[r_own];
    os.seg = row_seg[r_own];
    os.own = os.p >= 0 ? os.p / BK : -1;
    os.n_fill = 0;
    // With topk = 1 the heap has no slot and nothing may enter it.
    os.worst = list_len > 0 ? 0 : ~uint64_t(0);
    os.own_m = nan_f();
    os.own_se = 0.f;
  }
  __syncthreads();  // the row scratch is dead from here: the K stages may be filled

  int seg = 0, t = 0;  // cursor of the current job (segment, key tile)
  while (seg < n_seg && seg_nt[seg] == 0) ++seg;

  if (wg == kIdxConsumerWarpgroups) {
    setmaxnreg_dec<kIdxProducerRegs>();
    if (warp == kIdxConsumerWarpgroups * 4 && lane == 0) {
      // The K stages held the generic-proxy row scratch; order those reads before the
      // async-proxy writes of TMA.
      fence_proxy_async();
      int s = 0;
      uint32_t phase = 0;
      for (int g = 0; g < n_jobs; ++g) {
        mbar_wait(bar_empty + 8 * s, phase ^ 1);
        mbar_arrive_expect_tx(bar_full + 8 * s, lay.stage_bytes);
        const int key_row = seg_kb[seg] + t * kIdxBlockN;
#pragma unroll
        for (int a = 0; a < D / kIdxAtomK; ++a)
          tma_load_2d(sk + s * lay.stage_bytes + a * (kIdxBlockN * 128), &tmap_k, a * kIdxAtomK, key_row,
                      bar_full + 8 * s);
        if (++s == n_stages) {
          s = 0;
          phase ^= 1;
        }
        if (++t == seg_nt[seg]) {
          t = 0;
          do ++seg;
          while (seg < n_seg && seg_nt[seg] == 0);
        }
      }
    }
  } else {
    setmaxnreg_inc<kIdxConsumerRegs>();
    EpiCtx ctx;
    ctx.lane = lane;
    ctx.list_len = list_len;
    ctx.scale = p.scale;
    ctx.scale_log2 = p.scale * 1.4426950408889634f;
    ctx.list_comp = list_comp;
    ctx.list_se = list_se;
    ctx.block_scores = p.block_scores;
    ctx.n_blocks = p.n_blocks;
    ctx.row0 = row0;

    const uint32_t q_half0 = sq + uint32_t(cg * kIdxRowsPerConsumer) * 128;
    const uint32_t q_half1 = q_half0 + 64 * 128;
    float acc0[64], acc1[64];
    // Two accumulator halves: while one half's block max runs, the tensor cores work on the other
    // half. Each iteration retires both halves of its job before the back-edge, and the block max
    // of the second half runs under the next job's first-half wgmma. Nothing is in flight across
    // the loop back-edge and no wgmma sits under a condition, so ptxas keeps the wgmmas async
    // (otherwise it serializes every one of them: C7514 / C7518).
    if (n_jobs > 0) {
      int s = 0, s_prev = 0;
      uint32_t phase = 0;
      mbar_wait(bar_full, 0);
      issue_half<D>(acc0, q_half0, sk);
      issue_half<D>(acc1, q_half1, sk);
      wgmma_wait<1>();
      fence_acc(acc0);
      epilogue_half<BK, LSE>(acc0, rp[0], 0, os, r_own, t, seg, ctx);
      wgmma_wait<0>();
      fence_acc(acc1);
      __syncwarp();
      if (lane == 0) mbar_arrive(bar_empty);
      int t_prev = t, seg_prev = seg;
      for (int g = 1; g < n_jobs; ++g) {
        if (++t == seg_nt[seg]) {
          t = 0;
          do ++seg;
          while (seg < n_seg && seg_nt[seg] == 0);
        }
        s_prev = s;
        if (++s == n_stages) {
          s = 0;
          phase ^= 1;
        }
        mbar_wait(bar_full + 8 * s, phase);
        const uint32_t k_stage = sk + s * lay.stage_bytes;
        issue_half<D>(acc0, q_half0, k_stage);
        epilogue_half<BK, LSE>(acc1, rp[1], 1, os, r_own, t_prev, seg_prev, ctx);
        issue_half<D>(acc1, q_half1, k_stage);
        wgmma_wait<1>();
        fence_acc(acc0);
        epilogue_half<BK, LSE>(acc0, rp[0], 0, os, r_own, t, seg, ctx);
        wgmma_wait<0>();
        fence_acc(acc1);
        __syncwarp();
        if (lane == 0) mbar_arrive(bar_empty + 8 * s);
        t_prev = t;
        seg_prev = seg;
      }
      (void)s_prev;
      epilogue_half<BK, LSE>(acc1, rp[1], 1, os, r_own, t_prev, seg_prev, ctx);
    }
    __syncwarp();

    // Final selection of the owned row: the heap entries ranked by block number (the heap is
    // ordered by score), then the local block, which is the last visible block, then -1.
    {
      const int64_t R = row0 + r_own;
      const bool valid = R < p.n_rows;
      const bool alive = valid && os.p >= 0;
      const uint64_t* lc = list_comp + r_own * list_len;
      const int n = os.n_fill;
      if (valid) {
        int32_t* out = p.topk_idx + R * p.topk;
        if (alive) {
          for (int k = 0; k < n; ++k) {
            const int b = comp_block(lc[k]);
            int rank = 0;
            for (int u = 0; u < n; ++u) rank += comp_block(lc[u]) < b ? 1 : 0;
            out[rank] = b;
          }
          out[n] = os.own;
          for (int k = n + 1; k < p.topk; ++k) out[k] = -1;
        } else {
          for (int k = 0; k < p.topk; ++k) out[k] = -1;
        }
        if constexpr (LSE) {
          // logsumexp over the support = the selected blocks' (score, exp-sum) pairs.
          float mx = alive ? os.own_m : -INFINITY;
          for (int k = 0; k < n; ++k) mx = fmaxf(mx, key_to_float(uint32_t(lc[k] >> 32)));
          float sum = alive ? os.own_se * expf(os.own_m - mx) : 0.f;
          for (int k = 0; k < n; ++k)
            sum += list_se[r_own * list_len + k] * expf(key_to_float(uint32_t(lc[k] >> 32)) - mx);
          p.lse[R] = alive ? mx + logf(sum) : -INFINITY;
        }
        if (p.block_scores != nullptr) {
          float* bs = p.block_scores + R * p.n_blocks;
          for (int64_t b = alive ? os.own + 1 : 0; b < p.n_blocks; ++b) bs[b] = -INFINITY;
        }
      }
    }
  }
}

// Host launcher of one configuration; defined here, instantiated in index_topk_d{64,128}.cu.
// smem_optin: the device's opt-in shared memory per block.
template <int D, int BK, bool LSE>
void launch_index_topk(const CUtensorMap& tmap_k, IndexKernelParams kp, int smem_optin, cudaStream_t stream) {
  const int list_len = kp.topk - 1;
  int stages = 0;
  size_t bytes = 0;
  for (int s = kIdxMaxStages; s >= kIdxMinStages; --s) {
    const size_t need = size_t(idx_smem_layout(D, LSE, list_len, s).total) + 1024;  // + base alignment
    if (need <= size_t(smem_optin)) {
      stages = s;
      bytes = need;
      break;
    }
  }
  if (stages == 0)
    throw std::runtime_error("msa::index_topk: the CUDA index kernel needs more shared memory than the device has (" +
                             std::to_string(smem_optin) + " bytes per block)");
  kp.stages = stages;
  auto kernel = index_topk_kernel<D, BK, LSE>;
  ensure_smem(kIndexOp, reinterpret_cast<const void*>(kernel), bytes);
  const int64_t grid = (kp.n_rows + kIdxBlockM - 1) / kIdxBlockM;
  kernel<<<dim3(unsigned(grid)), dim3(kIdxThreads), bytes, stream>>>(tmap_k, kp);
  check_cuda(kIndexOp, cudaGetLastError(), "kernel launch failed");
}

}  // namespace msa::cuda
