// sparse_fwd.cuh — the CUDA sm_90a kernels of the sparse attention forward: phase 1 (per work item:
// one K/V block in shared memory, gathered query tiles, S = Q K^T and O = P V on wgmma, per-slot
// partial o and lse), the local pass (per run of queries with one own block: the sink and own
// blocks on wgmma, then the log-sum-exp merge with the other slots' partials) and the combine (the
// merge alone, for the internal option without the local pass), with the launcher templates of
// phase 1 and the local pass. Those two are instantiated per (d, bk) in sparse_fwd_d64.cu and
// sparse_fwd_d128.cu; the combine in sparse_fwd.cu. Design: docs/sparse_attention.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "hopper.cuh"
#include "host.h"
#include "sparse_schedule.h"
#include "sparse_tiles.h"

namespace msa::cuda {

// Everything the two phases read. Strides are in elements; tensors are bf16 bit patterns.
struct SparseFwdKernelParams {
  const uint16_t* q = nullptr;  // [n_q, h_q, d], rows 16-byte aligned (the launcher repacks otherwise)
  int64_t stride_q_tok = 0, stride_q_head = 0;
  const uint16_t* k = nullptr;  // [n_k, h_kv, d]
  int64_t stride_k_tok = 0, stride_k_head = 0;
  const uint16_t* v = nullptr;  // [n_k, h_kv, d]
  int64_t stride_v_tok = 0, stride_v_head = 0;
  int kv_vec = 0;  // k and v rows are 16-byte aligned: vector loads
  int64_t n_q = 0, n_k = 0;
  int h_q = 1, h_kv = 1, g = 1, log2g = 0, topk = 1, bk_shift = 7;  // bk = 1 << bk_shift
  float scale_log2 = 1.f;                                           // scale * log2(e): softmax in base 2
  FastDiv div_per_query, div_topk;  // entry id / (h_kv * topk) = query, entry id / topk
  const int2* qinfo = nullptr;                                      // [n_q] {k0, p} (schedule)
  const uint64_t* keys = nullptr;                                   // [n_e] sorted group keys (schedule)
  const uint32_t* entries = nullptr;                                // [n_e] sorted entry ids (schedule)
  const int32_t* lims = nullptr;        // [n_e] last visible key row of each sorted entry's query (schedule)
  const int32_t* item_start = nullptr;  // [n_items] (schedule)
  int32_t* counters = nullptr;          // n_valid, n_items, work counter (schedule)
  // Slot-major per query: a tile writes the g heads of one (query, slot) as one contiguous run
  // (g rows of o, g floats of lse: whole sectors), instead of g rows topk apart and lone floats.
  void* partial_o = nullptr;            // [n_q, topk, h_q, d] bf16 or f32; slot rows of invalid entries unwritten
  float* partial_lse = nullptr;         // [n_q, topk, h_q]
  int partial_f32 = 0;
  const int32_t* topk_idx = nullptr;  // [n_q, h_kv, topk] (combine: which slots are valid)
  uint16_t* o = nullptr;              // [n_q, h_q, d]
  int64_t stride_o_tok = 0, stride_o_head = 0;
  int o_vec = 0;         // o rows are 16-byte aligned: vector stores
  float* lse = nullptr;  // [n_q, h_q]
  const int32_t* unit_start = nullptr;  // [n_units] local units (schedule, local pass)
};

// Shared-memory map of the local pass: the sink block's K and V, the own block's K and V (each as
// issue_kv writes them), then kSpLocalStages Q stages per warpgroup and the claimed units.
struct SpLocalLayout {
  uint32_t kv_a, kv_b, q, q_bytes, rows, misc, total;
};

__host__ __device__ inline SpLocalLayout sp_local_layout(int d, int bk) {
  SpLocalLayout l{};
  const uint32_t kv = 2 * uint32_t(bk) * d * 2;
  l.kv_a = 0;
  l.kv_b = kv;
  l.q = 2 * kv;
  l.q_bytes = uint32_t(kSpRows) * d * 2;
  l.rows = l.q + uint32_t(kSpLocalWarpgroups * kSpLocalStages) * l.q_bytes;  // float2 [warpgroup][row]
  // int4 {item, q_lo, q_hi, own} [2], int k0 [2], then at + 48 the tile flags u32 [2][kSpUnitTileWords]
  l.misc = l.rows + uint32_t(kSpLocalWarpgroups * kSpRows) * 8;
  l.total = l.misc + 48 + 2 * kSpUnitTileWords * 4;
  return l;
}

// Shared-memory map of phase 1, identical on host (sizing) and device. K, V and every Q buffer
// start at multiples of 1024 bytes from a 1024-aligned base, as the 128-byte swizzle needs.
struct SpSmemLayout {
  uint32_t k, v, q, q_bytes, meta_base, meta_lim, meta_src, misc, total;
};

__host__ __device__ inline SpSmemLayout sp_smem_layout(int d, int bk) {
  SpSmemLayout l{};
  uint32_t off = 0;
  l.k = off;
  off += uint32_t(bk) * d * 2;
  l.v = off;  // right after K: issue_kv writes both from l.k
  off += uint32_t(d) * bk * 2;
  l.q = off;
  l.q_bytes = uint32_t(kSpRows) * d * 2;
  off += uint32_t(kSpWarpgroups * kSpQStages) * l.q_bytes;
  constexpr uint32_t kMeta = uint32_t(kSpWarpgroups * kSpMetaSlots * kSpRows);  // [warpgroup][slot][entry]
  l.meta_src = off;  // u64: address of the entry's first q row (head r g)
  off += kMeta * 8;
  l.meta_base = off;  // int64: byte offset of the entry's head-0 bf16 partial row (-1: padding)
  off += kMeta * 8;
  l.meta_lim = off;  // int: last visible key row of the entry's query (-1: padding)
  off += kMeta * 4;
  // the claimed work items: int4 {item, e0, e1, -} [2], their group keys u64 [2], then one mbarrier
  // per claim slot (the claim's arrival)
  l.misc = off;
  off += 48 + 16;
  l.total = off;
  return l;
}

namespace sp_detail {

using hopper::cp_async_16_full;
using hopper::desc_add;
using hopper::rcp_approx;
using hopper::stmatrix_x4;
using hopper::cp_async_commit;
using hopper::cp_async_wait;
using hopper::ex2_approx;
using hopper::fence_proxy_async;
using hopper::lg2_approx;
using hopper::load8;
using hopper::pack_bf16;
using hopper::sw128_desc;
using hopper::sw128_offset;
using hopper::wgmma_commit;
using hopper::wgmma_fence;

// Barrier of the 128 threads of one warpgroup (ids 1..3; 0 is __syncthreads). The ids are
// immediates: with a register id ptxas reserves all 16 barriers and compute-sanitizer's racecheck
// cannot tell the named barriers from __syncthreads (it then reports hazards across the latter).
static_assert(kSpWarpgroups == 3, "wg_barrier names one barrier per consumer warpgroup");
__device__ __forceinline__ void wg_barrier(int wg) {
  if (wg == 0)
    asm volatile("bar.sync 1, 128;" ::: "memory");
  else if (wg == 1)
    asm volatile("bar.sync 2, 128;" ::: "memory");
  else
    asm volatile("bar.sync 3, 128;" ::: "memory");
}

template <int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (N == 64)
    hopper::wgmma_m64n64k16(d, da, db, scale_d);
  else
    hopper::wgmma_m64n128k16(d, da, db, scale_d);
}
// O (+)= P V with P from registers and V MN-major in shared memory (key rows of 128 bytes, as
// loaded: the same layout as K).
template <int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  if constexpr (N == 64)
    hopper::wgmma_m64n64k16_rs(d, a, db, scale_d);
  else
    hopper::wgmma_m64n128k16_rs(d, a, db, scale_d);
}

// K and V block rows [kstart, kstart + BK) of kv head r, each as a SW128 tile [D / 64][BK][64]
// (key rows of 128 bytes): K-major for S = Q K^T, MN-major for O = P V, so neither is transposed.
// Rows past n_k are zeros (no query can see them). With 16-byte aligned rows every thread issues
// its chunks as cp.async (one commit group, all in flight at once, so the load costs one memory
// round trip, not one per chunk); otherwise plain loads and st.shared. The caller waits, fences
// and syncs.
template <int D, int BK, int NT = kSpThreads>
__device__ __forceinline__ void issue_kv(const SparseFwdKernelParams& p, uint8_t* skv, uint32_t skv_addr, int r,
                                         int64_t kstart, int tid) {
  constexpr int CH = D / 8;
  constexpr int kChunks = 2 * BK * CH;  // K then V
  constexpr int kIters = (kChunks + NT - 1) / NT;
  const int64_t k_head = int64_t(r) * p.stride_k_head, v_head = int64_t(r) * p.stride_v_head;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int c = tid + it * NT;
    if (kChunks % NT != 0 && c >= kChunks) break;
    const int tensor = c / (BK * CH), rem = c % (BK * CH);
    const int row = rem / CH, ch = rem % CH;
    const int64_t kr = kstart + row;
    const uint16_t* src = tensor == 0 ? p.k + kr * p.stride_k_tok + k_head + ch * 8
                                      : p.v + kr * p.stride_v_tok + v_head + ch * 8;
    const uint32_t dst = uint32_t(tensor * BK * D * 2) + sw128_offset(BK, row, ch * 8);
    if (p.kv_vec) {
      hopper::cp_async_16(skv_addr + dst, kr < p.n_k ? static_cast<const void*>(src) : p.k, kr < p.n_k ? 16 : 0);
    } else {
      uint4 val = make_uint4(0, 0, 0, 0);
      if (kr < p.n_k) val = load8(src, false);
      *reinterpret_cast<uint4*>(skv + dst) = val;
    }
  }
  cp_async_commit();
}

// A schedule group key r * n_k + (first key row of the block) as the kv head and that row.
__device__ __forceinline__ void split_group_key(const SparseFwdKernelParams& p, uint64_t key, int& r, int64_t& kstart) {
  r = int(key / uint64_t(p.n_k));
  kstart = int64_t(key - uint64_t(r) * uint64_t(p.n_k));
}

// Which chunks of a 64-row tile a thread moves, in the Q gather and in the partial copy-out alike:
// thread wtid takes 16-byte chunk c = wtid % 8 of each 64-column atom, in rows row_lo + 16 k
// (row_lo = wtid / 8, k = 0..3). Rows 16 apart belong to the same head of a query for every
// g <= 16, so a thread's head (row_lo % g), its swizzle term (row_lo % 8) and its byte offsets are
// fixed for the whole kernel; only the entry, (row_lo / g) + k * (16 / g), changes with k. A warp
// instruction covers 4 rows x 128 contiguous bytes (whole sectors).
constexpr int kSpRowGroups = kSpRows / 16;  // k = 0..3

// This thread's fixed part of the gather and the copy-out. Recomputed where used (a few integer
// operations) rather than kept live across the tile loop, where the registers are all taken: the
// thread index is read through a volatile asm so that the compiler cannot hoist it out of the loop.
struct ThreadChunks {
  int ent0, ent_step;  // entry of row group k: ent0 + k * ent_step
  int src_off;         // byte offset of the thread's first chunk in a Q stage (also the copy-out's)
  int64_t q_off;       // byte offset inside an entry's q rows (head row_lo % g, chunk c)
  uint32_t out_off;    // byte offset inside an entry's partial o rows (head row_lo % g, chunk c)
};

template <int D>
__device__ __forceinline__ ThreadChunks thread_chunks(const SparseFwdKernelParams& p) {
  uint32_t tid;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
  const int wtid = int(tid & 127u), row_lo = wtid >> 3, c16 = wtid & 7, head = row_lo & (p.g - 1);
  ThreadChunks t;
  t.ent0 = row_lo >> p.log2g;
  t.ent_step = 16 >> p.log2g;
  t.src_off = row_lo * 128 + ((c16 ^ (row_lo & 7)) << 4);
  t.q_off = int64_t(head) * p.stride_q_head * 2 + c16 * 16;
  t.out_off = uint32_t((head * D + c16 * 8) * 2);
  return t;
}

// The sorted entries of one tile: thread wtid < 64 / g owns entry e_begin + wtid (its id and the
// last visible key row of its query), loaded a tile ahead of use.
struct RowSrc {
  uint32_t id;  // entry id; 0xffffffff: no entry (past the item's end, or a non-owner thread)
  int lim;      // last visible key row of the entry's query
};

__device__ __forceinline__ RowSrc load_row_src(const SparseFwdKernelParams& p, int e_begin, int e_end, int wtid) {
  const int e = e_begin + wtid;
  RowSrc rs{0xffffffffu, -1};
  if (wtid < (kSpRows >> p.log2g) && e < e_end) {
    rs.id = p.entries[e];
    rs.lim = p.lims[e];
  }
  return rs;
}

// Publishes an owned entry's metadata into its tile's slot: the address of its query's head-(r g)
// q row (for the gather), the byte offset of its head-0 bf16 partial row and the last visible key
// row (for the softmax and the epilogue). Entries past the item's end gather a valid but unused
// row (query 0; their rows are masked out and never stored) and get base = lim = -1.
template <int D>
__device__ __forceinline__ void publish_meta(const SparseFwdKernelParams& p, uint64_t* meta_src, int64_t* meta_base,
                                             int* meta_lim, RowSrc rs, int r, int wtid) {
  if (wtid >= (kSpRows >> p.log2g)) return;
  const uint16_t* qr = p.q + int64_t(r * p.g) * p.stride_q_head;
  if (rs.id != 0xffffffffu) {
    const uint32_t i = p.div_per_query.div(rs.id);
    const uint32_t slot = rs.id - p.div_topk.div(rs.id) * uint32_t(p.topk);
    meta_src[wtid] = reinterpret_cast<uint64_t>(qr + int64_t(i) * p.stride_q_tok);
    meta_base[wtid] = ((int64_t(i) * p.topk + slot) * p.h_q + int64_t(r) * p.g) * (2 * D);
    meta_lim[wtid] = rs.lim;
  } else {
    meta_src[wtid] = reinterpret_cast<uint64_t>(qr);
    meta_base[wtid] = -1;
    meta_lim[wtid] = -1;
  }
}

// Issues the cp.async gather of one Q tile into a K-major SW128 tile [kSpRows][D]: this thread's
// chunks (see kSpRowGroups), each from its entry's row published in meta_src.
template <int D>
__device__ __forceinline__ void issue_q(const SparseFwdKernelParams& p, const uint64_t* meta_src, uint32_t stage) {
  const ThreadChunks tc = thread_chunks<D>(p);
  const uint32_t dst0 = stage + uint32_t(tc.src_off);
#pragma unroll
  for (int k = 0; k < kSpRowGroups; ++k) {
    const uint8_t* src = reinterpret_cast<const uint8_t*>(meta_src[tc.ent0 + k * tc.ent_step]) + tc.q_off;
#pragma unroll
    for (int h = 0; h < D / kSpAtomK; ++h)
      cp_async_16_full(dst0 + uint32_t(h * kSpRows * 128 + k * 16 * 128), src + h * 128);
  }
}

// S = Q K^T of one 64-row tile on wgmma (both operands in shared memory); committed, not waited.
// dq, dk: descriptors of the tiles' first byte; the k-steps add constant offsets (no carry out of
// the 14-bit address field: every tile lies inside the first 256 KB of shared memory).
template <int D, int BK>
__device__ __forceinline__ void issue_scores(float (&s)[BK / 2], uint64_t dq, uint64_t dk) {
  hopper::fence_acc(s);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    wgmma_ss<BK>(s, desc_add(dq, (kk / 4) * (kSpRows * 128) + (kk % 4) * 32),
                 desc_add(dk, (kk / 4) * (BK * 128) + (kk % 4) * 32), kk > 0 ? 1 : 0);
  wgmma_commit();
}

// Writes this warpgroup's 64 x D accumulator rows, scaled per row (inv0: the thread's row0, inv1:
// row0 + 8), as bf16 into a Q-stage-shaped tile (same SW128 swizzle as Q): stmatrix, four 8 x 8
// matrices per instruction (rows 16 w .. + 7 and + 8 .. + 15, chunks j and j + 1). Lane L addresses
// row (L % 8) + 8 ((L / 8) % 2) of chunk j + L / 16; the swizzled chunk is (j % 8) ^ x with
// x = (L / 16) ^ (L % 8) (j is even), so one XOR per j gives the address.
template <int D>
__device__ __forceinline__ void stage_rows_bf16(const float (&o)[D / 2], float inv0, float inv1, uint8_t* stage,
                                                int warp_in_wg, int lane) {
  const uint32_t st_lane = smem_addr(stage) +
                           uint32_t((warp_in_wg * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * 128 +
                                    ((((lane >> 4) ^ (lane & 7)) & 7) << 4));
#pragma unroll
  for (int j = 0; j < D / 8; j += 2) {
    const uint32_t a = (st_lane ^ uint32_t((j & 7) << 4)) + uint32_t((j >> 3) * kSpRows * 128);
    stmatrix_x4(a, pack_bf16(o[4 * j] * inv0, o[4 * j + 1] * inv0), pack_bf16(o[4 * j + 2] * inv1, o[4 * j + 3] * inv1),
                pack_bf16(o[4 * j + 4] * inv0, o[4 * j + 5] * inv0),
                pack_bf16(o[4 * j + 6] * inv1, o[4 * j + 7] * inv1));
  }
}

// Asks L2 (evict-last, until the merge's evict-first read) for partial row prow: its o lines and,
// for the row of a query's first head, the lse line of the query's g heads.
template <int D>
__device__ __forceinline__ void prefetch_partial_row(const SparseFwdKernelParams& p, int64_t prow, bool first_head) {
  const uint8_t* line = static_cast<const uint8_t*>(p.partial_o) + prow * (2 * D);
#pragma unroll
  for (int h = 0; h < D / kSpAtomK; ++h) hopper::prefetch_l2_last(line + h * 128);
  if (first_head) hopper::prefetch_l2_last(p.partial_lse + prow);
}

// Masks columns past lim[i] of this thread's rows i (row0 = 16 w + lane / 4 and row0 + 8) in an S
// tile (lim = -1: the row sees nothing of this block). Warp-uniform (a vote): most warps of phase 1
// skip it, and the accumulator stays in registers either way.
template <int BK>
__device__ __forceinline__ void mask_columns(float (&s)[BK / 2], const int (&lim)[2], int lane) {
  const int q4 = lane & 3;
  if (__any_sync(0xffffffffu, lim[0] < BK - 1 || lim[1] < BK - 1)) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < BK / 8; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float& x = s[4 * j + 2 * i + c];
          x = 8 * j + 2 * q4 + c <= lim[i] ? x : -INFINITY;
        }
  }
}

// Element e (0..7) of eight bf16 values packed in a uint4, as float (e is a constant after unrolling).
__device__ __forceinline__ float bf16_at(const uint4& x, int e) {
  const uint32_t w = e < 2 ? x.x : e < 4 ? x.y : e < 6 ? x.z : x.w;
  return __uint_as_float(e % 2 == 0 ? w << 16 : w & 0xffff0000u);
}

// One batch of the slot-ordered log-sum-exp merge (the combine and the local pass): ls[u] is slot
// u's lse (-inf: a skipped slot, whose values are 0), value(u, c) its element c. Updates the running
// max mx, the sum of weights and acc (weighted sum of the values) in place; slots in order, so the
// result is deterministic.
template <int KB, int NV, class Value>
__device__ __forceinline__ void merge_batch(float& mx, float& sum, float (&acc)[NV], const float (&ls)[KB],
                                            Value value) {
  float bm = mx;
#pragma unroll
  for (int u = 0; u < KB; ++u) bm = fmaxf(bm, ls[u]);
  if (bm == -INFINITY) return;
  const float rescale = expf(mx - bm);  // mx = -inf: 0 (sum and acc are 0 then)
  sum *= rescale;
#pragma unroll
  for (int c = 0; c < NV; ++c) acc[c] *= rescale;
  mx = bm;
#pragma unroll
  for (int u = 0; u < KB; ++u) {
    const float w = expf(ls[u] - mx);  // skipped slots: exp(-inf) = 0
    sum += w;
#pragma unroll
    for (int c = 0; c < NV; ++c) acc[c] = fmaf(w, value(u, c), acc[c]);
  }
}

// The softmax (base 2) of one masked S tile, as phase 1 and the local pass's own-block-only tiles
// take it: the row max m (a row with nothing visible keeps m = -inf, its reference point 0 and
// P = 0), the thread-partial sums l (the caller adds the quad's), P packed as the bf16 A fragments
// pb of the P V product. For a tile whose block-A columns are all masked it does local_softmax2's
// operations on the B columns (fmaxf(-inf, y) = y, 0 + y = y), so every row gets the same bits.
template <int BK>
__device__ __forceinline__ void softmax_rows(float (&sb)[BK / 2], float (&m)[2], float (&l)[2],
                                               uint32_t (&pb)[BK / 16][4], float scale_log2) {
  const unsigned full = 0xffffffffu;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < BK / 8; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) mx = fmaxf(mx, sb[4 * j + 2 * i + c]);
    mx = fmaxf(mx, __shfl_xor_sync(full, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(full, mx, 2));
    const float off = mx == -INFINITY ? 0.f : mx * scale_log2;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < BK / 8; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float& y = sb[4 * j + 2 * i + c];
        y = ex2_approx(fmaf(y, scale_log2, -off));
        sum += y;
      }
    l[i] = sum;
    m[i] = mx;
  }
  hopper::pack_a_frags<BK>(sb, pb);
}

// The rest of one tile once S is issued: the causal mask of the block and its softmax in
// registers, O = P V (wgmma, P from registers), then the per-slot partial o (normalised) and lse of
// every row that holds an entry.
template <int D, int BK>
__device__ __forceinline__ void finish_tile(const SparseFwdKernelParams& p, float (&s)[BK / 2], uint64_t dv,
                                            const int64_t* meta_base, const int* meta_lim, int64_t kstart,
                                            int warp_in_wg, int lane) {
  hopper::wgmma_wait<0>();
  hopper::fence_acc(s);

  // This thread's rows (wgmma accumulator layout): row0 = 16 w + lane / 4 and row0 + 8; it holds
  // columns 8 j + 2 (lane % 4) + {0, 1} of each in s[4 j + 2 i + {0, 1}].
  const unsigned full = 0xffffffffu;
  const int q4 = lane & 3;
  int lim[2];
  float m[2], l[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = warp_in_wg * 16 + (lane >> 2) + 8 * i;
    const int ent = row >> p.log2g;
    const int64_t lm = int64_t(meta_lim[ent]) - kstart;  // key column c is visible iff c <= lm
    lim[i] = meta_lim[ent] < 0 ? -1 : int(lm < BK ? lm : BK);
  }
  // Only the query's own block (and padding rows) needs the causal mask: most warps skip it.
  mask_columns<BK>(s, lim, lane);
  uint32_t pa[BK / 16][4];
  softmax_rows<BK>(s, m, l, pa, p.scale_log2);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(full, l[i], 1);
    l[i] += __shfl_xor_sync(full, l[i], 2);
  }
  float o[D / 2];
  hopper::fence_acc(o);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BK / 16; ++kk)
    wgmma_rs<D>(o, pa[kk], desc_add(dv, kk * 16 * 128), kk > 0 ? 1 : 0);
  wgmma_commit();
  hopper::wgmma_wait<0>();
  hopper::fence_acc(o);

  // lse = scale * max + ln(sum exp(scale * (s - max))), from base-2 terms.
  if (q4 == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = warp_in_wg * 16 + (lane >> 2) + 8 * i;
      const int64_t b = meta_base[row >> p.log2g];
      if (b >= 0)
        __stcs(p.partial_lse + b / (2 * D) + (row & (p.g - 1)),
               (m[i] * p.scale_log2 + lg2_approx(l[i])) * 0.6931471805599453f);
    }
  }
  const float inv0 = l[0] > 0.f ? rcp_approx(l[0]) : 0.f, inv1 = l[1] > 0.f ? rcp_approx(l[1]) : 0.f;

  if (p.partial_f32) {
    // Measurement path: float2 stores straight from the fragments (a quad writes one 32-byte sector).
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = warp_in_wg * 16 + (lane >> 2) + 8 * i;
      const int64_t b = meta_base[row >> p.log2g];
      if (b < 0) continue;
      const float inv = i == 0 ? inv0 : inv1;
      float* dst = static_cast<float*>(p.partial_o) + (b / (2 * D) + (row & (p.g - 1))) * D + 2 * q4;
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
    }
    return;
  }
  // bf16 partials straight from the accumulator fragments: per row and group G of four 8-column
  // chunks, a 4 x 4 transpose of bf16x2 words inside the quad (two shfl_xor stages) gives lane q4
  // chunk 4 G + q4 of the row whole, so each warp store writes 8 rows x 64 contiguous bytes (whole
  // sectors), with no staging in shared memory and no warpgroup barrier.
  const int q4b0 = q4 & 1, q4b1 = q4 & 2;
  uint8_t* po = static_cast<uint8_t*>(p.partial_o) + q4 * 16;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = warp_in_wg * 16 + (lane >> 2) + 8 * i;
    const int64_t b = meta_base[row >> p.log2g];  // byte offset of the entry's head-0 row, -1: padding
    const float inv = i == 0 ? inv0 : inv1;
    const int64_t off = b + int64_t(row & (p.g - 1)) * (2 * D);
#pragma unroll
    for (int G = 0; G < D / 32; ++G) {
      uint32_t w[4];  // w[jj]: this lane's column pair of chunk 4 G + jj
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int j = 4 * G + jj;
        w[jj] = pack_bf16(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
      }
      // Stage 1 swaps with lane ^ 1 the words whose chunk parity differs from the lane's, stage 2
      // with lane ^ 2 likewise on bit 1: then w[k] is lane k's pair of chunk 4 G + q4.
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const uint32_t r = __shfl_xor_sync(full, q4b0 ? w[2 * u] : w[2 * u + 1], 1);
        if (q4b0) w[2 * u] = r; else w[2 * u + 1] = r;
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const uint32_t r = __shfl_xor_sync(full, q4b1 ? w[u] : w[u + 2], 2);
        if (q4b1) w[u] = r; else w[u + 2] = r;
      }
      // Streaming stores: the partials are read once, by the local pass (or the combine), long
      // after; L2 is better spent on the Q rows that neighbouring work items gather again.
      if (b >= 0) __stcs(reinterpret_cast<uint4*>(po + off + G * 64), make_uint4(w[0], w[1], w[2], w[3]));
    }
  }
}

}  // namespace sp_detail

// Phase 1: a persistent grid; each CTA takes work items (one (kv head, kv block) group's chunk of
// entries) from an atomic counter, loads the block's K and V^T once, and its warpgroups walk the
// item's 64-row tiles (t = wg, wg + 3, ...) with the gathers of the next two tiles in flight. Every
// (query, head, slot) row is written by exactly one tile, so no atomics touch the outputs and the
// result does not depend on which CTA ran which item.
template <int D, int BK>
__global__ void __launch_bounds__(kSpThreads, 1) sparse_fwd_phase1_kernel(const SparseFwdKernelParams p) {
  using namespace sp_detail;
  extern __shared__ uint8_t smem_raw[];
  // Aligned by an offset from the __shared__ array (not by casting through an integer), so that
  // the compiler still knows every derived pointer is shared memory: LDS/STS with 32-bit addresses
  // instead of generic loads and stores with 64-bit address arithmetic.
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const SpSmemLayout lay = sp_smem_layout(D, BK);
  const unsigned full = 0xffffffffu;
  const int tid = threadIdx.x;
  // Broadcast from lane 0 so that ptxas sees warp-uniform values: a wgmma under a branch it cannot
  // prove uniform is serialized (C7518).
  const int wg = __shfl_sync(full, tid >> 7, 0);
  const int warp_in_wg = __shfl_sync(full, (tid >> 5) & 3, 0);
  const int wtid = tid & 127, lane = tid & 31;
  const uint32_t s_base = smem_addr(smem);
  const uint64_t dk = sw128_desc(s_base + lay.k), dv = hopper::sw128_desc_mn(s_base + lay.v, BK * 128);
  int4* claimed = reinterpret_cast<int4*>(smem + lay.misc);
  uint64_t* claimed_key = reinterpret_cast<uint64_t*>(smem + lay.misc + 32);
  const uint32_t claim_bar = smem_addr(smem + lay.misc + 48);  // [2] u64: phase u of slot s = claim of item 2 u + s
  uint64_t* meta_src = reinterpret_cast<uint64_t*>(smem + lay.meta_src) + wg * kSpMetaSlots * kSpRows;
  int64_t* meta_base = reinterpret_cast<int64_t*>(smem + lay.meta_base) + wg * kSpMetaSlots * kSpRows;
  int* meta_lim = reinterpret_cast<int*>(smem + lay.meta_lim) + wg * kSpMetaSlots * kSpRows;
  uint8_t* sq_ptr = smem + lay.q + uint32_t(wg * kSpQStages) * lay.q_bytes;
  const uint32_t sq = smem_addr(sq_ptr);
  const int n_valid = p.counters[0];
  const int n_items = p.counters[1];
  const int queries_per_tile = kSpRows >> p.log2g;


  // Work items are claimed one ahead, into slot (local item n + 1) % 2 while item n runs, by the
  // first thread of the warpgroup that finishes item n first (the one whose last tile has the
  // lowest index, n_tiles % 3): the atomic and the two dependent loads (item start, group key) then
  // run under the other warpgroups' last tiles instead of between two items, and a claimed item
  // waits at most about one tile for this CTA (claiming at the start of item n would hold it for
  // the whole of item n, which lengthens the tail). Slot (n + 1) % 2 is read by each warpgroup's
  // prologue after the claim's mbarrier arrival and by everyone after the barrier that opens item
  // n + 1; its previous item's readers all passed the barrier that opens item n.
  // One warp claims: lane 0 takes the item and reads where it starts, then the warp asks L2 for the
  // item's K and V rows (2 x bk rows of d bf16), so that the cp.async of issue_kv finds them there.
  auto claim = [&](int slot) {
    int it = 0, e0 = 0, e1 = 0;
    uint64_t key = 0;
    if (lane == 0) {
      it = atomicAdd(p.counters + 2, 1);
      if (it < n_items) {
        e0 = p.item_start[it];
        e1 = it + 1 < n_items ? p.item_start[it + 1] : n_valid;
        key = p.keys[e0];
      }
      claimed[slot] = make_int4(it, e0, e1, 0);
      claimed_key[slot] = key;
      hopper::mbar_arrive(claim_bar + 8 * slot);  // releases the two writes above
    }
    it = __shfl_sync(full, it, 0);
    key = __shfl_sync(full, key, 0);
    if (it >= n_items) return;
    e0 = __shfl_sync(full, e0, 0);
    e1 = __shfl_sync(full, e1, 0);
    int r;
    int64_t kstart;
    split_group_key(p, key, r, kstart);
    static_assert(D * 2 <= 2 * 128, "a key row is at most two 128-byte lines");
    // The q rows of the entries the item's prologue gathers (its first kSpQStages tiles per
    // warpgroup) and the lines of their causal limits into L2 as well: the prologue's dependent
    // round trips after the barrier (entry -> metadata -> gather) then hit L2.
    const int e_pre = min(e1, e0 + kSpQStages * kSpWarpgroups * queries_per_tile);
#pragma unroll 1
    for (int e = e0 + lane; e < e_pre; e += 32) {
      const uint32_t i = p.div_per_query.div(p.entries[e]);
      const uint8_t* qrow =
          reinterpret_cast<const uint8_t*>(p.q + int64_t(i) * p.stride_q_tok + int64_t(r * p.g) * p.stride_q_head);
#pragma unroll 1
      for (int h = 0; h < p.g; ++h)
#pragma unroll
        for (int l = 0; l < D * 2 / 128; ++l) hopper::prefetch_l2(qrow + int64_t(h) * p.stride_q_head * 2 + l * 128);
      hopper::prefetch_l2(p.lims + e);  // one line per 32 entries after coalescing
    }
    const uint16_t* kb = p.k + int64_t(r) * p.stride_k_head + (lane & 1) * 64;
    const uint16_t* vb = p.v + int64_t(r) * p.stride_v_head + (lane & 1) * 64;
    if (D * 2 <= 128 && (lane & 1)) return;
#pragma unroll 1
    for (int row = lane >> 1; row < BK; row += 16) {
      const int64_t kr = kstart + row;
      if (kr >= p.n_k) break;
      hopper::prefetch_l2(kb + kr * p.stride_k_tok);
      hopper::prefetch_l2(vb + kr * p.stride_v_tok);
    }
  };
  // This warpgroup's prologue of the item in claim slot cs: the metadata of its first kSpQStages
  // tiles and the gathers of the first kSpQStages - 1 (one cp.async group each). It touches only the
  // warpgroup's own Q stages and metadata slots, so it runs before the barrier that opens the item,
  // while other warpgroups still finish the previous one; the claim has put the entries and the
  // q rows in L2.
  auto prologue = [&](int cs) {
    const int4 c = claimed[cs];
    const int item = __shfl_sync(full, c.x, 0);
    if (item >= n_items) return;
    const int e0 = __shfl_sync(full, c.y, 0);
    const int e1 = __shfl_sync(full, c.z, 0);
    int r;
    int64_t kstart;
    split_group_key(p, claimed_key[cs], r, kstart);
    const int n_tiles = (e1 - e0 + queries_per_tile - 1) / queries_per_tile;
#pragma unroll
    for (int u = 0; u < kSpQStages; ++u) {
      const int tt = wg + u * kSpWarpgroups;
      const RowSrc rs = load_row_src(p, e0 + tt * queries_per_tile, min(e1, e0 + (tt + 1) * queries_per_tile), wtid);
      publish_meta<D>(p, meta_src + u * kSpRows, meta_base + u * kSpRows, meta_lim + u * kSpRows, rs, r, wtid);
    }
    wg_barrier(wg);
#pragma unroll
    for (int u = 0; u < kSpQStages - 1; ++u) {
      if (wg + u * kSpWarpgroups < n_tiles) issue_q<D>(p, meta_src + u * kSpRows, sq + uint32_t(u) * lay.q_bytes);
      cp_async_commit();
    }
  };
  if (tid == 0) {
    hopper::mbar_init(claim_bar, 1);
    hopper::mbar_init(claim_bar + 8, 1);
    hopper::fence_mbarrier_init();
  }
  __syncthreads();
  if (tid < 32) claim(0);
  hopper::mbar_wait(claim_bar, 0);  // claim slot 0 is visible (and every phase of a slot is waited on)
  prologue(0);

  for (int n = 0;; ++n) {
    // Every warpgroup is done with the previous item's K/V and has issued its prologue of item n;
    // claim slot n % 2 is visible.
    __syncthreads();
    const int4 c = claimed[n & 1];
    const int item = __shfl_sync(full, c.x, 0);
    if (item >= n_items) {
      hopper::launch_dependents();  // the local pass's CTAs may take this SM while others finish
      break;
    }
    const int e0 = __shfl_sync(full, c.y, 0);
    const int e1 = __shfl_sync(full, c.z, 0);
    int r;
    int64_t kstart;
    split_group_key(p, claimed_key[n & 1], r, kstart);
    issue_kv<D, BK>(p, smem + lay.k, s_base + lay.k, r, kstart, tid);

    const int n_tiles = (e1 - e0 + queries_per_tile - 1) / queries_per_tile;
    // Tile tt of the item holds entries [e0 + tt * qpt, min(e1, e0 + (tt + 1) * qpt)). This
    // warpgroup runs tiles wg, wg + 3, ...; its local tile j sits in Q stage j % kSpQStages and
    // metadata slot j % kSpMetaSlots (one more slot than stages: the metadata of tile j + 3 is
    // published while the other threads may still read tile j - 1's, before the next barrier).
    auto first = [&](int tt) { return e0 + tt * queries_per_tile; };
    auto last = [&](int tt) { return min(e1, e0 + (tt + 1) * queries_per_tile); };
    auto meta = [&](int slot, RowSrc rs) {
      publish_meta<D>(p, meta_src + slot * kSpRows, meta_base + slot * kSpRows, meta_lim + slot * kSpRows, rs, r, wtid);
    };
    auto gather = [&](int stage, int slot) {
      issue_q<D>(p, meta_src + slot * kSpRows, sq + uint32_t(stage) * lay.q_bytes);
    };
    cp_async_wait<0>();  // the K/V group and the prologue's gathers
    fence_proxy_async();
    __syncthreads();  // K and V are visible to every warpgroup
    int t_next = wg + kSpQStages * kSpWarpgroups;  // the tile whose metadata is published next
    RowSrc next = load_row_src(p, first(t_next), last(t_next), wtid);
    int st = 0, slot = 0;
    for (int t = wg; t < n_tiles; t += kSpWarpgroups) {
      cp_async_wait<kSpQStages - 2>();
      fence_proxy_async();
      // Tile t's Q and metadata are visible, and every thread of the warpgroup is past the previous
      // tile, whose stage the gather below overwrites.
      wg_barrier(wg);
      float s[BK / 2];
      issue_scores<D, BK>(s, sw128_desc(sq + uint32_t(st) * lay.q_bytes), dk);
      // Under the S product: the gather of tile t + 2 warpgroup strides (its metadata is in slot + 2).
      const int st_g = st == 0 ? kSpQStages - 1 : st - 1;
      const int slot_g = slot + 2 >= kSpMetaSlots ? slot + 2 - kSpMetaSlots : slot + 2;
      if (t + (kSpQStages - 1) * kSpWarpgroups < n_tiles) gather(st_g, slot_g);
      cp_async_commit();
      finish_tile<D, BK>(p, s, dv, meta_base + slot * kSpRows, meta_lim + slot * kSpRows, kstart, warp_in_wg, lane);
      // Tile t_next's metadata goes to slot + 3, the slot tile t - 1 used: every thread is past that
      // tile (this tile's opening barrier), and the gather reads it after a later barrier.
      meta(slot == 0 ? kSpMetaSlots - 1 : slot - 1, next);
      t_next += kSpWarpgroups;
      next = load_row_src(p, first(t_next), last(t_next), wtid);
      st = st + 1 == kSpQStages ? 0 : st + 1;
      slot = slot + 1 == kSpMetaSlots ? 0 : slot + 1;
    }
    // The next item: claimed by the first warp of the warpgroup that finishes first (its last tile
    // has the lowest index). Each warpgroup, once all its warps are past this item's tiles (its
    // metadata slots and Q stages are free) and the claim has arrived on the slot's mbarrier,
    // issues its prologue of the next item and then waits at the barrier that opens it.
    if (wg == n_tiles % kSpWarpgroups && warp_in_wg == 0) claim((n + 1) & 1);
    wg_barrier(wg);
    hopper::mbar_wait(claim_bar + 8 * ((n + 1) & 1), uint32_t(((n + 1) >> 1) & 1));
    prologue((n + 1) & 1);
  }
}

// Phase 2: one (query, head) row per d / 8 threads, each owning 8 columns. Walks the row's slots in
// order (batches of 16 (bf16) or 8 (f32) slots, all loads of a batch issued before any use) with a
// running max, so the merge is deterministic: lse = logsumexp_s lse_s, o = sum_s exp(lse_s - lse) o_s.
// No valid slot: o = 0, lse = -inf.
template <int D, bool F32>
__global__ void __launch_bounds__(kSpCombineThreads, 2) sparse_fwd_combine_kernel(const SparseFwdKernelParams p) {
  using namespace sp_detail;
  constexpr int TPR = D / 8;
  constexpr int kBatch = F32 ? 8 : 16;
  constexpr int kWords = F32 ? 8 : 4;  // 32-bit words per slot and thread
  const int64_t n_rows = p.n_q * p.h_q;
  hopper::grid_dependency_wait();  // launched as a programmatic dependent of phase 1
  for (int64_t gt = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; gt < n_rows * TPR;
       gt += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = gt / TPR;
    const int c8 = int(gt % TPR);
    const int64_t i = row / p.h_q;
    const int h = int(row - i * p.h_q);
    const int r = h >> p.log2g;
    // Both depend on i only: one round trip.
    const int pos = p.qinfo[i].y;
    const int32_t* sel = p.topk_idx + (i * p.h_kv + r) * p.topk;
    float mx = -INFINITY, sum = 0.f, acc[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[c] = 0.f;
    for (int s0 = 0; s0 < p.topk; s0 += kBatch) {
      int32_t blk[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) blk[u] = s0 + u < p.topk ? sel[s0 + u] : -1;
      float ls[kBatch];
      uint32_t raw[kBatch][kWords];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        ls[u] = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWords; ++w) raw[u][w] = 0;
        if (sp_entry_valid(blk[u], pos, p.bk_shift)) {
          const int64_t prow = (i * p.topk + s0 + u) * p.h_q + h;
          ls[u] = __ldcs(p.partial_lse + prow);
          const uint4* src = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(p.partial_o) +
                                                            (prow * D + c8 * 8) * (F32 ? 4 : 2));
#pragma unroll
          for (int w = 0; w < kWords; w += 4) {
            const uint4 x = __ldcs(src + w / 4);  // read once: do not keep in L2
            raw[u][w] = x.x, raw[u][w + 1] = x.y, raw[u][w + 2] = x.z, raw[u][w + 3] = x.w;
          }
        }
      }
      merge_batch<kBatch, 8>(mx, sum, acc, ls, [&](int u, int c) {
        return F32 ? __uint_as_float(raw[u][c])
                   : __uint_as_float(c % 2 == 0 ? raw[u][c / 2] << 16 : raw[u][c / 2] & 0xffff0000u);
      });
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    uint32_t out[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) out[c] = pack_bf16(acc[2 * c] * inv, acc[2 * c + 1] * inv);
    uint16_t* dst = p.o + i * p.stride_o_tok + int64_t(h) * p.stride_o_head + c8 * 8;
    if (p.o_vec) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(out[0], out[1], out[2], out[3]);
    } else {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        dst[2 * c] = uint16_t(out[c] & 0xffffu);
        dst[2 * c + 1] = uint16_t(out[c] >> 16);
      }
    }
    if (c8 == 0) p.lse[row] = sum > 0.f ? mx + logf(sum) : -INFINITY;
  }
}

namespace sp_detail {

// The local pass's softmax (base 2) over the columns of two masked S tiles: the row max m, the
// thread-partial sums l, P packed as the bf16 A fragments pa, pb. A row with nothing visible keeps
// m = -inf, its reference point 0 and P = 0.
template <int BK>
__device__ __forceinline__ void local_softmax2(float (&sa)[BK / 2], float (&sb)[BK / 2], float (&m)[2], float (&l)[2],
                                               uint32_t (&pa)[BK / 16][4], uint32_t (&pb)[BK / 16][4],
                                               float scale_log2) {
  const unsigned full = 0xffffffffu;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < BK / 8; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) mx = fmaxf(mx, fmaxf(sa[4 * j + 2 * i + c], sb[4 * j + 2 * i + c]));
    mx = fmaxf(mx, __shfl_xor_sync(full, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(full, mx, 2));
    const float off = mx == -INFINITY ? 0.f : mx * scale_log2;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < BK / 8; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float& x = sa[4 * j + 2 * i + c];
        x = ex2_approx(fmaf(x, scale_log2, -off));
        float& y = sb[4 * j + 2 * i + c];
        y = ex2_approx(fmaf(y, scale_log2, -off));
        sum += x + y;
      }
    l[i] = sum;
    m[i] = mx;
  }
  hopper::pack_a_frags<BK>(sa, pa);
  hopper::pack_a_frags<BK>(sb, pb);
}


}  // namespace sp_detail

// The local pass (replaces the combine when the partials are bf16): a persistent grid over work
// items (local unit, kv head); a unit is a run of consecutive queries of one sequence with the same
// own block (schedule). Per item the CTA loads the sink block's and the own block's K and V once;
// its two warpgroups walk the unit's 64-row tiles ((query, head) rows, query-major, t = wg, wg + 2,
// ...): S and P V against the sink block (for rows whose selection holds block 0) and the own block
// (those that hold it; causal), with the softmax in registers, then the merge of that result with
// the row's other valid slots, which phase 1 wrote as partials: lse = logsumexp, o = sum of
// exp(lse_s - lse) o_s, in slot order (deterministic). The sink and own entries get no work item in
// phase 1, so their partials are neither written nor read back. No valid entry: o = 0, lse = -inf.
template <int D, int BK>
__global__ void __launch_bounds__(kSpLocalThreads, 1) sparse_fwd_local_kernel(const SparseFwdKernelParams p) {
  using namespace sp_detail;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const SpLocalLayout lay = sp_local_layout(D, BK);
  const unsigned full = 0xffffffffu;
  const int tid = threadIdx.x;
  const int wg = __shfl_sync(full, tid >> 7, 0);
  const int warp_in_wg = __shfl_sync(full, (tid >> 5) & 3, 0);
  const int wtid = tid & 127, lane = tid & 31, q4 = lane & 3;
  const uint32_t s_base = smem_addr(smem);
  const uint64_t dk_a = sw128_desc(s_base + lay.kv_a);
  const uint64_t dv_a = hopper::sw128_desc_mn(s_base + lay.kv_a + BK * D * 2, BK * 128);
  const uint64_t dk_b = sw128_desc(s_base + lay.kv_b);
  const uint64_t dv_b = hopper::sw128_desc_mn(s_base + lay.kv_b + BK * D * 2, BK * 128);
  int4* claimed = reinterpret_cast<int4*>(smem + lay.misc);
  int* claimed_k0 = reinterpret_cast<int*>(smem + lay.misc + 32);
  uint32_t* sink_tiles = reinterpret_cast<uint32_t*>(smem + lay.misc + 48);  // [2][kSpUnitTileWords]
  const uint32_t sq = s_base + lay.q + uint32_t(wg * kSpLocalStages) * lay.q_bytes;
  float2* rinfo = reinterpret_cast<float2*>(smem + lay.rows) + wg * kSpRows;  // per row {local lse, remote mask}
  const int qpt = kSpRows >> p.log2g;  // queries per tile
  constexpr float kLn2 = 0.6931471805599453f;

  // Launched as a programmatic dependent of phase 1: everything up to the first read of a partial
  // (the schedule's arrays, K, V, Q) may run while phase 1's last CTAs finish.
  bool partials_ready = false;
  const int n_units = p.counters[3];
  const int n_work = n_units * p.h_kv;

  // Thread 0 claims the next item one ahead (slot (n + 1) % 2 during item n: read by everyone after
  // the barrier that opens item n + 1; its previous readers passed the barrier that opens item n).
  auto claim = [&](int slot) {
    const int w = atomicAdd(p.counters + 4, 1);
    int4 c = make_int4(w, 0, 0, -1);
    int k0 = 0;
    if (w < n_work) {
      const int u = w / p.h_kv;
      c.y = p.unit_start[u];
      c.z = u + 1 < n_units ? p.unit_start[u + 1] : int(p.n_q);
      const int2 qi = p.qinfo[c.y];
      k0 = qi.x;
      c.w = qi.y >> p.bk_shift;  // the unit's own block; -1: its queries see nothing
    }
    claimed[slot] = c;
    claimed_k0[slot] = k0;
#pragma unroll
    for (int w = 0; w < kSpUnitTileWords; ++w) sink_tiles[slot * kSpUnitTileWords + w] = 0u;
  };
  if (tid == 0) claim(0);

  for (int n = 0;; ++n) {
    __syncthreads();  // slot n % 2 is visible; every warpgroup is done with the previous item's K/V
    const int4 c = claimed[n & 1];
    if (c.x >= n_work) break;
    const int k0 = claimed_k0[n & 1];
    const int q_lo = c.y, q_hi = c.z, own = __shfl_sync(full, c.w, 0);
    const int r = c.x - (c.x / p.h_kv) * p.h_kv;
    // Blocks: A = the sink (block 0), B = the own block; own = 0: both are block 0 and A is masked
    // out entirely (the first block of a sequence: loaded twice, kept branch-free); own < 0: none.
    const bool blocks = own >= 0;
    if (blocks) {
      issue_kv<D, BK, kSpLocalThreads>(p, smem + lay.kv_a, s_base + lay.kv_a, r, k0, tid);
      issue_kv<D, BK, kSpLocalThreads>(p, smem + lay.kv_b, s_base + lay.kv_b, r,
                                       int64_t(k0) + (int64_t(own) << p.bk_shift), tid);
    }
    const int n_tiles = (((q_hi - q_lo) << p.log2g) + kSpRows - 1) / kSpRows;
    const uint8_t* q_head = reinterpret_cast<const uint8_t*>(p.q + int64_t(r * p.g) * p.stride_q_head);
    // The Q rows of local tile tt into stage st: this thread's chunks (thread_chunks); rows past the
    // unit gather its first query (never stored).
    auto gather = [&](int tt, int st) {
      const ThreadChunks tc = thread_chunks<D>(p);
      const uint32_t dst0 = sq + uint32_t(st) * lay.q_bytes + uint32_t(tc.src_off);
#pragma unroll
      for (int k = 0; k < kSpRowGroups; ++k) {
        int qq = q_lo + tt * qpt + tc.ent0 + k * tc.ent_step;
        if (qq >= q_hi) qq = q_lo;
        const uint8_t* src = q_head + int64_t(qq) * p.stride_q_tok * 2 + tc.q_off;
#pragma unroll
        for (int h = 0; h < D / kSpAtomK; ++h)
          cp_async_16_full(dst0 + uint32_t(h * kSpRows * 128 + k * 16 * 128), src + h * 128);
      }
    };
    if (blocks && wg < n_tiles) gather(wg, 0);
    cp_async_commit();
    // Which tiles hold a row whose selection has the sink block (own > 0; with own = 0 block A is
    // masked anyway): bit t of this item's flags. The other tiles skip block A's products, which
    // changes no bit of their rows (its columns are all masked: P = 0, and x + 0 = x).
    uint32_t* sink_bits = sink_tiles + (n & 1) * kSpUnitTileWords;
    if (own > 0) {
      for (int qi = tid; qi < q_hi - q_lo; qi += kSpLocalThreads) {
        const int32_t* sel = p.topk_idx + (int64_t(q_lo + qi) * p.h_kv + r) * p.topk;
        int32_t b[kSpMaxTopk];
#pragma unroll
        for (int s = 0; s < kSpMaxTopk; ++s) b[s] = s < p.topk ? sel[s] : -1;
        bool has = false;
#pragma unroll
        for (int s = 0; s < kSpMaxTopk; ++s) has |= b[s] == 0;
        const int tile = (qi << p.log2g) / kSpRows;
        if (has) atomicOr(sink_bits + (tile >> 5), 1u << (tile & 31));
      }
    }
    if (tid == 0) claim((n + 1) & 1);
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // K, V and every warpgroup's first Q tile are visible

    int st = 0;
    for (int t = wg; t < n_tiles; t += kSpLocalWarpgroups) {
      // Stage st holds tile t; the other stage was last read by the warpgroup's previous tile, which
      // every thread of the warpgroup finished (the barrier at the end of the previous tile).
      if (blocks && t + kSpLocalWarpgroups < n_tiles) gather(t + kSpLocalWarpgroups, st ^ 1);
      cp_async_commit();

      // This thread's rows (wgmma accumulator layout): row0 = 16 w + lane / 4 and row0 + 8: their
      // queries and heads, the selection's sink / own flags as per-block column limits, the mask of
      // remote slots (partials to merge). Runs under the first S product.
      int qq[2], hh[2], lim_a[2], lim_b[2];
      uint32_t remote[2];
      auto scan = [&]() {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int row = warp_in_wg * 16 + (lane >> 2) + 8 * i;
          qq[i] = q_lo + t * qpt + (row >> p.log2g);
          hh[i] = r * p.g + (row & (p.g - 1));
          remote[i] = 0;
          bool has_a = false, has_b = false;
          int pos = -1;
          if (qq[i] < q_hi) {
            // Every slot's load in flight at once (one round trip; topk <= kSpMaxTopk).
            const int32_t* sel = p.topk_idx + (int64_t(qq[i]) * p.h_kv + r) * p.topk;
            int32_t b[kSpMaxTopk];
#pragma unroll
            for (int s = 0; s < kSpMaxTopk; ++s) b[s] = s < p.topk ? sel[s] : -1;
            pos = p.qinfo[qq[i]].y;
#pragma unroll
            for (int s = 0; s < kSpMaxTopk; ++s) {
              has_a |= b[s] == 0;
              has_b |= b[s] == own;
              remote[i] |= sp_entry_remote(b[s], pos, p.bk_shift) ? 1u << s : 0u;
            }
          }
          lim_a[i] = has_a && own > 0 ? BK - 1 : -1;  // own = 0: block 0 is B
          lim_b[i] = has_b ? pos - (own << p.bk_shift) : -1;
        }
        if (!partials_ready) {
          hopper::grid_dependency_wait();
          partials_ready = true;
        }
        // Ask L2 for the partial rows of the merge's first kSpLocalScanRounds rounds (rows 0 .. 31 of
        // the tile: warps 0 and 1 hold them here) while the tile computes: lane q4 takes the slots
        // s = q4 mod 4 of both its rows, o lines and, from the row of a query's first head, the lse
        // line of its g heads (the merge's first loads wait on the lse otherwise). Later rounds are
        // prefetched one round ahead. The lines are marked evict-last so that the other SMs' streams
        // do not evict them before their (evict-first) read; prefetching further ahead overfills L2
        // (docs/sparse_attention.md, 2026-11-27 night and morning).
        if (warp_in_wg < kSpLocalScanRounds) {
#pragma unroll
          for (int i = 0; i < 2; ++i)
            for (uint32_t bits = remote[i] & (0x11111111u << q4); bits; bits &= bits - 1) {
              const int s = __ffs(bits) - 1;
              prefetch_partial_row<D>(p, (int64_t(qq[i]) * p.topk + s) * p.h_q + hh[i], (hh[i] & (p.g - 1)) == 0);
            }
        }
      };

      float o[D / 2];
      float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
      // Warpgroup-uniform, and broadcast so that ptxas sees it (a wgmma under a branch it cannot
      // prove uniform is serialized).
      const bool sink = __shfl_sync(full, (sink_bits[t >> 5] >> (t & 31)) & 1u, 0) != 0u;
      if (!blocks) {
        scan();
#pragma unroll
        for (int x = 0; x < D / 2; ++x) o[x] = 0.f;
      } else if (!sink) {
        // No row of the tile attends the sink: the own block alone, with the arithmetic of the
        // two-block softmax on its columns (bitwise the same rows).
        const uint64_t dq = sw128_desc(sq + uint32_t(st) * lay.q_bytes);
        float sb[BK / 2];
        issue_scores<D, BK>(sb, dq, dk_b);
        scan();  // under the product
        hopper::wgmma_wait<0>();
        hopper::fence_acc(sb);
        uint32_t pb[BK / 16][4];
        mask_columns<BK>(sb, lim_b, lane);
        softmax_rows<BK>(sb, m, l, pb, p.scale_log2);
        hopper::fence_acc(o);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) wgmma_rs<D>(o, pb[kk], desc_add(dv_b, kk * 16 * 128), kk > 0 ? 1 : 0);
        wgmma_commit();
        hopper::wgmma_wait<0>();
        hopper::fence_acc(o);
      } else {
        // Both S products in flight together (O is not live yet; the row scan runs under the
        // first), one softmax over the 2 x bk columns, then both P V products in one group.
        const uint64_t dq = sw128_desc(sq + uint32_t(st) * lay.q_bytes);
        float sa[BK / 2], sb[BK / 2];
        issue_scores<D, BK>(sa, dq, dk_a);
        scan();  // under the first product
        issue_scores<D, BK>(sb, dq, dk_b);
        hopper::wgmma_wait<0>();
        hopper::fence_acc(sa);
        hopper::fence_acc(sb);
        uint32_t pa[BK / 16][4], pb[BK / 16][4];
        mask_columns<BK>(sa, lim_a, lane);
        mask_columns<BK>(sb, lim_b, lane);
        local_softmax2<BK>(sa, sb, m, l, pa, pb, p.scale_log2);
        hopper::fence_acc(o);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) wgmma_rs<D>(o, pa[kk], desc_add(dv_a, kk * 16 * 128), kk > 0 ? 1 : 0);
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) wgmma_rs<D>(o, pb[kk], desc_add(dv_b, kk * 16 * 128), 1);
        wgmma_commit();
        hopper::wgmma_wait<0>();
        hopper::fence_acc(o);
      }

      // The merge with the remote slots' partials, in the combine's access pattern: the local result
      // (normalised, bf16) and each row's lse and remote-slot mask go to shared memory (the tile's Q
      // stage, free once every warp's S products are done, and the row-info area); then each thread
      // takes whole 16-byte chunks (thread_chunks: chunk wtid % 8 of each 64-column atom of rows
      // wtid / 8 + 16 k) and, per row, issues the lse and o loads of a batch of slots before using
      // any, with a running max in slot order (deterministic). One round trip per row and batch of
      // kSpLocalMergeSlots slots.
      float inv[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(full, l[i], 1);
        l[i] += __shfl_xor_sync(full, l[i], 2);
        inv[i] = l[i] > 0.f ? rcp_approx(l[i]) : 0.f;
      }
      uint8_t* stage = smem + lay.q + uint32_t(wg * kSpLocalStages + st) * lay.q_bytes;
      wg_barrier(wg);
      stage_rows_bf16<D>(o, inv[0], inv[1], stage, warp_in_wg, lane);
      if (q4 == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float lse_loc = l[i] > 0.f ? (m[i] * p.scale_log2 + lg2_approx(l[i])) * kLn2 : -INFINITY;
          rinfo[warp_in_wg * 16 + (lane >> 2) + 8 * i] = make_float2(lse_loc, __uint_as_float(remote[i]));
        }
      }
      wg_barrier(wg);
      const ThreadChunks tc = thread_chunks<D>(p);
      const int c16 = lane & 7;
#pragma unroll 1
      for (int k = 0; k < kSpRowGroups; ++k) {
        const int row = (wtid >> 3) + 16 * k;
        const int qk = q_lo + t * qpt + tc.ent0 + k * tc.ent_step;
        if (qk >= q_hi) continue;
        const int hk = r * p.g + (row & (p.g - 1));
        const float2 ri = rinfo[row];
        const uint32_t rm = __float_as_uint(ri.y);
        // The next round's rows into L2 unless the row scan asked for them (its slots s = c16 mod 8,
        // one line per 64 columns, and the lse line from the row of a query's first head).
        if (k + 1 < kSpRowGroups && k + 1 >= kSpLocalScanRounds) {
          const int qn = qk + tc.ent_step;
          if (qn < q_hi) {
            const uint32_t rn = __float_as_uint(rinfo[row + 16].y);
            for (uint32_t bits = rn & (0x01010101u << c16); bits; bits &= bits - 1)
              prefetch_partial_row<D>(p, (int64_t(qn) * p.topk + (__ffs(bits) - 1)) * p.h_q + hk,
                                      (hk & (p.g - 1)) == 0);
          }
        }
        constexpr int NA = D / kSpAtomK;  // 16-byte chunks of this thread per row
        constexpr int kB = kSpLocalMergeSlots;
        float acc[NA * 8];  // column c8 * 8 + e of 64-column atom h at [h * 8 + e]
#pragma unroll
        for (int h = 0; h < NA; ++h) {
          const uint4 x = *reinterpret_cast<const uint4*>(stage + tc.src_off + h * kSpRows * 128 + k * 16 * 128);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[h * 8 + e] = bf16_at(x, e);
        }
        float mx = ri.x, sum = ri.x == -INFINITY ? 0.f : 1.f;
        const int64_t prow0 = int64_t(qk) * p.topk * p.h_q + hk;
        for (int sb = 0; sb < p.topk; sb += kB) {
          float ls[kB];
          uint4 raw[kB][NA];
#pragma unroll
          for (int u = 0; u < kB; ++u) {
            const bool v = sb + u < p.topk && ((rm >> (sb + u)) & 1u);
            const int64_t prow = prow0 + int64_t(sb + u) * p.h_q;
            ls[u] = v ? __ldcs(p.partial_lse + prow) : -INFINITY;
            const uint4* src =
                reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(p.partial_o) + prow * (2 * D) + c16 * 16);
#pragma unroll
            for (int h = 0; h < NA; ++h) raw[u][h] = v ? __ldcs(src + h * 8) : make_uint4(0, 0, 0, 0);
          }
          merge_batch<kB, NA * 8>(mx, sum, acc, ls, [&](int u, int c) { return bf16_at(raw[u][c / 8], c % 8); });
        }
        const float is = sum > 0.f ? 1.f / sum : 0.f;
        uint16_t* dst = p.o + int64_t(qk) * p.stride_o_tok + int64_t(hk) * p.stride_o_head + c16 * 8;
#pragma unroll
        for (int h = 0; h < NA; ++h) {
          uint32_t out[4];
#pragma unroll
          for (int c = 0; c < 4; ++c) out[c] = pack_bf16(acc[h * 8 + 2 * c] * is, acc[h * 8 + 2 * c + 1] * is);
          if (p.o_vec) {
            *reinterpret_cast<uint4*>(dst + h * kSpAtomK) = make_uint4(out[0], out[1], out[2], out[3]);
          } else {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              dst[h * kSpAtomK + 2 * c] = uint16_t(out[c] & 0xffffu);
              dst[h * kSpAtomK + 2 * c + 1] = uint16_t(out[c] >> 16);
            }
          }
        }
        if (c16 == 0) p.lse[int64_t(qk) * p.h_q + hk] = sum > 0.f ? mx + logf(sum) : -INFINITY;
      }
      cp_async_wait<0>();
      fence_proxy_async();
      wg_barrier(wg);  // the next tile is visible; every thread is done with stage st
      st ^= 1;
    }
  }
}

// Host launcher of the local pass for one configuration (instantiated beside phase 1): persistent
// CTAs, launched as a programmatic dependent of phase 1.
template <int D, int BK>
void launch_sparse_local(const SparseFwdKernelParams& kp, int grid, int smem_optin, cudaStream_t stream) {
  const size_t bytes = size_t(sp_local_layout(D, BK).total) + 1024;  // + base alignment
  auto kernel = sparse_fwd_local_kernel<D, BK>;
  require_smem("sparse_attention_forward", "the local pass", reinterpret_cast<const void*>(kernel), bytes, smem_optin);
  launch_programmatic("sparse_attention_forward", "local pass launch failed", kernel, dim3(unsigned(grid)),
                      dim3(kSpLocalThreads), bytes, stream, kp);
}

// Host launcher of phase 1 for one configuration; defined here, instantiated in
// sparse_fwd_d{64,128}.cu. grid: persistent CTAs (one per SM at most; the shared memory allows one).
template <int D, int BK>
void launch_sparse_phase1(const SparseFwdKernelParams& kp, int grid, int smem_optin, cudaStream_t stream) {
  const size_t bytes = size_t(sp_smem_layout(D, BK).total) + 1024;  // + base alignment
  auto kernel = sparse_fwd_phase1_kernel<D, BK>;
  require_smem("sparse_attention_forward", "phase 1", reinterpret_cast<const void*>(kernel), bytes, smem_optin);
  kernel<<<dim3(unsigned(grid)), dim3(kSpThreads), bytes, stream>>>(kp);
  check_cuda("sparse_attention_forward", cudaGetLastError(), "phase 1 launch failed");
}

}  // namespace msa::cuda
