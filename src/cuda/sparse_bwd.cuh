// sparse_bwd.cuh — the CUDA sm_90a kernels of the sparse attention backward: the KV-outer main
// kernel (per work item: one K/V block in shared memory, gathered Q and dO tiles, S = Q K^T and
// dP = dO V^T recomputed on wgmma, dV += P^T dO and dK += dS^T Q accumulated in registers over the
// item, dQ = dS K sent out per tile), the row preprocess delta = rowsum(dO o), and the conversions
// and fixed-order reductions that turn the float32 accumulators into bf16 dq, dk, dv. The main
// kernel is instantiated per (d, bk) in sparse_bwd_d64.cu and sparse_bwd_d128.cu; the rest in
// sparse_bwd.cu. Design and measurements: docs/sparse_backward.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "hopper.cuh"
#include "host.h"
#include "sparse_schedule.h"
#include "sparse_tiles.h"

namespace msa::cuda {

// Rows of a score tile: 64 / g gathered queries x g heads, query-major (as in the forward). All
// warpgroups of a CTA work on the same tile; warpgroup w owns keys [64 w, 64 w + 64) of the block.
constexpr int kSbRows = 64;
// Q + dO tile stages: the gathers of the next two tiles are in flight under a tile's math.
constexpr int kSbStages = 3;
// Work items hold at most kSbChunkFactor * topk * bk queries in atomic mode (the forward splits
// at twice that): a backward tile costs ~2.5x a forward one, so hot groups need smaller pieces to
// spread over the SMs (M3 shape: 2048 queries 1-4% faster than 4096, 16384 2x slower).
// Deterministic mode keeps the forward's factor: every item adds a 2 * bk * d float32 partial
// that is reduced afterwards (4096 measured 4% faster there at 128K). Speed only.
constexpr int kSbChunkFactor = 1;
constexpr int kSbChunkFactorDeterministic = 2;
// Query passes (bounded workspace, as in the forward). Atomic mode: at most kSbPassRowsAtomic
// (query, head) rows, i.e. a float32 dq accumulator of 2^22 * d * 4 bytes (2 GB at d = 128; 65536
// queries at h_q = 64), and at most 2 * kSpPassRows (query, head, slot) selection entries of
// schedule. Deterministic mode: at most kSbPassRowsDeterministic (query, head, slot) rows of
// per-slot float32 partials (4.3 GB at d = 128; 8192 queries at the M3 shape). Results do not
// depend on the pass size in atomic mode beyond summation order; bigger passes measured 2% faster
// at 128K (fewer pass tails). Speed and memory only.
constexpr int64_t kSbPassRowsAtomic = int64_t(1) << 22;
constexpr int64_t kSbPassRowsDeterministic = int64_t(1) << 23;

// Everything the main kernel reads. Strides are in elements; tensors are bf16 bit patterns.
struct SparseBwdKernelParams {
  const uint16_t* q = nullptr;  // [n_q, h_q, d] (this pass), rows 16-byte aligned (repacked otherwise)
  int64_t stride_q_tok = 0, stride_q_head = 0;
  const uint16_t* dout = nullptr;  // [n_q, h_q, d] gradient of o (this pass), rows 16-byte aligned
  int64_t stride_do_tok = 0, stride_do_head = 0;
  const uint16_t* k = nullptr;  // [n_k, h_kv, d]
  int64_t stride_k_tok = 0, stride_k_head = 0;
  const uint16_t* v = nullptr;  // [n_k, h_kv, d]
  int64_t stride_v_tok = 0, stride_v_head = 0;
  int kv_vec = 0;  // k and v rows are 16-byte aligned: vector loads
  int64_t n_q = 0, n_k = 0;
  int h_q = 1, h_kv = 1, g = 1, log2g = 0, topk = 1, bk_shift = 7;
  float scale_log2 = 1.f;               // scale * log2(e)
  const float* lse = nullptr;           // [n_q, h_q] (this pass), natural log
  const float* delta = nullptr;         // [n_q, h_q] (this pass): rowsum(do * o)
  const uint64_t* keys = nullptr;       // [n_e] sorted group keys (schedule)
  const uint32_t* entries = nullptr;    // [n_e] sorted entry ids (schedule)
  const int32_t* lims = nullptr;        // [n_e] last visible key row of each sorted entry's query (schedule)
  const int32_t* item_start = nullptr;  // [n_items] (schedule)
  int32_t* counters = nullptr;          // n_valid, n_items, work counter (schedule)
  int deterministic = 0;
  int dq_exchange = 1;  // warpgroup 1 adds its dQ to warpgroup 0's before one output (else both output; atomics only)
  float* dq_acc = nullptr;     // non-deterministic: [n_q, h_q, d] float32, atomically accumulated
  float* dq_part = nullptr;    // deterministic: [n_q, h_q, topk, d] float32 per-slot partials (plain stores)
  float* dk_acc = nullptr;     // [n_k, h_kv, d] float32 (unscaled dS^T Q), whole call
  float* dv_acc = nullptr;     // [n_k, h_kv, d] float32, whole call
  float* item_part = nullptr;  // deterministic: [item_cap][2][bk][d] float32 per-item dK, dV partials
  int item_cap = 0;            // items past it (only possible for invalid varlen contents) use atomics
};

// Shared-memory map of the main kernel, identical on host (sizing) and device. Every operand tile
// starts at a multiple of 1024 bytes from a 1024-aligned base, as the 128-byte swizzle needs.
struct SbSmemLayout {
  uint32_t k, v, stage, stage_bytes, p, ds, ent, lim, lse, delta, misc, total;
};

__host__ __device__ inline SbSmemLayout sb_smem_layout(int d, int bk) {
  SbSmemLayout l{};
  uint32_t off = 0;
  l.k = off;  // [d / 64][bk][64] SW128, K-major
  off += uint32_t(bk) * d * 2;
  l.v = off;  // same as K: dP = dO V^T reads V K-major too
  off += uint32_t(bk) * d * 2;
  l.stage = off;  // [stage]{Q [d / 64][64][64], dO [d / 64][64][64]}; also the dQ exchange
  l.stage_bytes = 2u * kSbRows * d * 2;
  off += kSbStages * l.stage_bytes;
  l.p = off;  // P [bk / 64][64 rows][64 keys] bf16 SW128
  off += uint32_t(kSbRows) * bk * 2;
  l.ds = off;  // dS, same layout
  off += uint32_t(kSbRows) * bk * 2;
  l.ent = off;  // uint32 [stage][64]: entry id per tile entry (0xffffffff: none)
  off += kSbStages * kSbRows * 4;
  l.lim = off;  // int [stage][64]: last visible key row per tile entry
  off += kSbStages * kSbRows * 4;
  l.lse = off;  // float [stage][64 rows]
  off += kSbStages * kSbRows * 4;
  l.delta = off;  // float [stage][64 rows]
  off += kSbStages * kSbRows * 4;
  l.misc = off;
  off += 16;
  l.total = off;
  return l;
}

namespace sb_detail {

using hopper::cp_async_16;
using hopper::cp_async_commit;
using hopper::cp_async_wait;
using hopper::ex2_approx;
using hopper::fence_proxy_async;
using hopper::load8;
using hopper::pack_bf16;
using hopper::sw128_desc;
using hopper::sw128_desc_mn;
using hopper::sw128_offset;
using hopper::wgmma_commit;
using hopper::wgmma_fence;

__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

// Barrier of the 128 threads of warpgroup wg (ids 1, 2; 0 is __syncthreads). Immediate ids, as in
// the forward (racecheck cannot tell register-id named barriers from __syncthreads).
__device__ __forceinline__ void wg_barrier(int wg) {
  if (wg == 0)
    asm volatile("bar.sync 1, 128;" ::: "memory");
  else
    asm volatile("bar.sync 2, 128;" ::: "memory");
}

// D (+)= A B on wgmma with both operands in shared memory; TA / TB = 1 reads that operand MN-major
// (the transposed products dV += P^T dO, dK += dS^T Q and the B side of dQ = dS K).
template <int TA, int TB>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "
      "%24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, %35, %36;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(scale_d), "n"(TA), "n"(TB));
}

template <int TA, int TB>
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "
      "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "
      "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, %67, %68;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(scale_d), "n"(TA), "n"(TB));
}

template <int N, int TA, int TB>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (N == 64)
    wgmma_ss_n64<TA, TB>(d, da, db, scale_d);
  else
    wgmma_ss_n128<TA, TB>(d, da, db, scale_d);
}

// The accumulator fragment gives lane (lane % 4 = q) columns 2 q, 2 q + 1 of two rows (a0, a1 of
// the first, b0, b1 of the one 8 below). Returns 4 consecutive columns 4 (q / 2) .. + 3 of the first
// row (hi = q % 2 = 0) or of the second (hi = 1), swapping one pair with the neighbouring lane.
__device__ __forceinline__ float4 quad_v4(float a0, float a1, float b0, float b1, int hi) {
  const float s0 = hi ? a0 : b0, s1 = hi ? a1 : b1;
  const float r0 = __shfl_xor_sync(0xffffffffu, s0, 1), r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
  return hi ? make_float4(r0, r1, b0, b1) : make_float4(a0, a1, r0, r1);
}

// K and V block rows [kstart, kstart + BK) of kv head r, both as K-major SW128 tiles [BK][D]. Rows
// past n_k are zeros (no query can see them).
template <int D, int BK, int NT>
__device__ __forceinline__ void load_kv(const SparseBwdKernelParams& p, uint8_t* sk, uint8_t* sv, int r, int64_t kstart,
                                        int tid) {
  constexpr int CH = D / 8;
  const bool vec = p.kv_vec != 0;
  for (int c = tid; c < BK * CH; c += NT) {
    const int row = c / CH, ch = c % CH;
    const int64_t kr = kstart + row;
    uint4 kx = make_uint4(0, 0, 0, 0), vx = kx;
    if (kr < p.n_k) {
      kx = load8(p.k + kr * p.stride_k_tok + int64_t(r) * p.stride_k_head + ch * 8, vec);
      vx = load8(p.v + kr * p.stride_v_tok + int64_t(r) * p.stride_v_head + ch * 8, vec);
    }
    const uint32_t off = sw128_offset(BK, row, ch * 8);
    *reinterpret_cast<uint4*>(sk + off) = kx;
    *reinterpret_cast<uint4*>(sv + off) = vx;
  }
}

// The gather source of one tile row for this thread, loaded one tile ahead of its cp.async (as in
// the forward: cp.async carries a memory clobber, so a later load cannot be hoisted above it).
struct RowSrc {
  uint32_t id;  // entry id; 0xffffffff: the row is past the item's entries
  int lim;      // last visible key row of the entry's query
};

__device__ __forceinline__ RowSrc load_row_src(const SparseBwdKernelParams& p, int e_begin, int e_end, int row) {
  const int e = e_begin + (row >> p.log2g);
  RowSrc rs{0xffffffffu, -1};
  if (e < e_end) {
    rs.id = p.entries[e];
    rs.lim = p.lims[e];
  }
  return rs;
}

// Thread tid of NT gathers part tid / 128 of tensor (tid & 1: 0 = Q, 1 = dO) of tile row
// (tid & 127) / 2: D / 8 / (NT / 128) 16-byte chunks into the stage's K-major SW128 tiles (rows past
// the entries zero-filled), plus the row's lse or delta, and the per-entry metadata.
template <int D, int NT>
__device__ __forceinline__ void issue_tile(const SparseBwdKernelParams& p, uint32_t s_stage, uint32_t s_lse,
                                           uint32_t s_delta, uint32_t* ent, int* lim, RowSrc rs, int r, int tid) {
  constexpr int kParts = NT / 128;
  constexpr int kChunks = D / 8 / kParts;
  const int pair = tid & 127, part = tid >> 7;
  const int row = pair >> 1, tensor = pair & 1;
  const int e_in_tile = row >> p.log2g, h = row & (p.g - 1);
  const bool valid = rs.id != 0xffffffffu;
  const uint32_t per_query = uint32_t(p.h_kv) * uint32_t(p.topk);
  const int64_t i = valid ? int64_t(rs.id / per_query) : 0;
  const int head = r * p.g + h;
  const uint16_t* src = tensor == 0 ? p.q + i * p.stride_q_tok + int64_t(head) * p.stride_q_head
                                    : p.dout + i * p.stride_do_tok + int64_t(head) * p.stride_do_head;
  const uint32_t dst = s_stage + uint32_t(tensor) * (kSbRows * D * 2);
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int ch = part * kChunks + c;
    cp_async_16(dst + sw128_offset(kSbRows, row, ch * 8), valid ? static_cast<const void*>(src + ch * 8) : p.q,
                valid ? 16 : 0);
  }
  if (part == 0) {
    const float* rsrc = (tensor == 0 ? p.lse : p.delta) + (valid ? i * p.h_q + head : 0);
    cp_async_4((tensor == 0 ? s_lse : s_delta) + row * 4, rsrc, valid ? 4 : 0);
    if (tensor == 0 && h == 0) {
      ent[e_in_tile] = rs.id;
      lim[e_in_tile] = valid ? rs.lim : -1;
    }
  }
}

}  // namespace sb_detail

// The main kernel: a persistent grid; each CTA takes work items (a chunk of one (kv head, kv block)
// group's entries) from an atomic counter, loads the block's K and V once, and walks the item's
// 64-row tiles with all its warpgroups (warpgroup w owns keys [64 w, 64 w + 64)), two tiles' gathers
// in flight. Per tile: S = Q K^T and dP = dO V^T (SS wgmma), P = exp(S scale - lse) on the visible
// keys, dS = P (dP - delta), both to shared memory as bf16, then dV += P^T dO, dK += dS^T Q (in
// registers for the whole item) and dQ = dS K (float32: atomics, or plain stores to the row's slot
// partial in deterministic mode). At the item's end dK and dV go to the float32 accumulators
// (atomics) or to the item's partial (deterministic).
template <int D, int BK>
__global__ void __launch_bounds__(BK * 2, 1) sparse_bwd_kernel(const SparseBwdKernelParams p) {
  using namespace sb_detail;
  constexpr int NWG = BK / 64;
  constexpr int NT = NWG * 128;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const SbSmemLayout lay = sb_smem_layout(D, BK);
  const unsigned full = 0xffffffffu;
  const int tid = threadIdx.x, lane = tid & 31;
  const int wg = __shfl_sync(full, tid >> 7, 0);
  const int warp_in_wg = __shfl_sync(full, (tid >> 5) & 3, 0);
  const int wtid = tid & 127;
  const int q4 = lane & 3;
  const uint32_t s_base = smem_addr(smem);
  const uint32_t sk = s_base + lay.k, sv = s_base + lay.v;
  const uint32_t sp = s_base + lay.p + uint32_t(wg) * (kSbRows * 128);    // this warpgroup's P atom
  const uint32_t sds = s_base + lay.ds + uint32_t(wg) * (kSbRows * 128);  // and dS atom
  uint8_t* gp = smem + lay.p + wg * (kSbRows * 128);
  uint8_t* gds = smem + lay.ds + wg * (kSbRows * 128);
  uint32_t* s_ent = reinterpret_cast<uint32_t*>(smem + lay.ent);
  int* s_lim = reinterpret_cast<int*>(smem + lay.lim);
  const float* s_lse = reinterpret_cast<const float*>(smem + lay.lse);
  const float* s_delta = reinterpret_cast<const float*>(smem + lay.delta);
  int* misc = reinterpret_cast<int*>(smem + lay.misc);
  const int n_valid = p.counters[0];
  const int n_items = p.counters[1];
  const int queries_per_tile = kSbRows >> p.log2g;
  const uint32_t per_query = uint32_t(p.h_kv) * uint32_t(p.topk);
  constexpr float kLog2e = 1.4426950408889634f;

  for (;;) {
    if (tid == 0) misc[0] = atomicAdd(p.counters + 2, 1);
    __syncthreads();  // everyone is done with the previous item's K/V; misc[0] is visible
    const int item = __shfl_sync(full, misc[0], 0);
    if (item >= n_items) break;
    const int e0 = __shfl_sync(full, p.item_start[item], 0);
    const int e1 = __shfl_sync(full, item + 1 < n_items ? p.item_start[item + 1] : n_valid, 0);
    const uint64_t key = p.keys[e0];
    const int r = int(key / uint64_t(p.n_k));
    const int64_t kstart = int64_t(key - uint64_t(r) * uint64_t(p.n_k));
    load_kv<D, BK, NT>(p, smem + lay.k, smem + lay.v, r, kstart, tid);
    fence_proxy_async();

    const int n_tiles = (e1 - e0 + queries_per_tile - 1) / queries_per_tile;
    auto first = [&](int tt) { return e0 + tt * queries_per_tile; };
    auto last = [&](int tt) { return min(e1, e0 + (tt + 1) * queries_per_tile); };
    const int my_row = (tid & 127) >> 1;
    auto issue = [&](int tt, int stg, RowSrc rs) {
      issue_tile<D, NT>(
          p, s_base + lay.stage + uint32_t(stg) * lay.stage_bytes, s_base + lay.lse + uint32_t(stg * kSbRows * 4),
          s_base + lay.delta + uint32_t(stg * kSbRows * 4), s_ent + stg * kSbRows, s_lim + stg * kSbRows, rs, r, tid);
    };
#pragma unroll
    for (int u = 0; u < kSbStages - 1; ++u) {
      if (u < n_tiles) issue(u, u, load_row_src(p, first(u), last(u), my_row));
      cp_async_commit();
    }
    int t_next = kSbStages - 1;
    RowSrc next = load_row_src(p, first(t_next), last(t_next), my_row);

    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int c = 0; c < D / 2; ++c) dk[c] = dv[c] = 0.f;

    int st = 0;
    for (int t = 0; t < n_tiles; ++t) {
      cp_async_wait<kSbStages - 2>();
      fence_proxy_async();
      // Tile t's Q, dO, lse, delta and metadata are visible; every thread is past tile t - 1 (its
      // stage, P, dS and the dQ exchange are free), and K / V are loaded (first tile).
      __syncthreads();
      const uint32_t sq = s_base + lay.stage + uint32_t(st) * lay.stage_bytes;
      const uint32_t sdo = sq + kSbRows * D * 2;

      float s[32], dp[32];
      hopper::fence_acc(s);
      hopper::fence_acc(dp);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t a = sq + (kk / 4) * (kSbRows * 128) + (kk % 4) * 32;
        const uint32_t b = sk + (kk / 4) * (BK * 128) + wg * (64 * 128) + (kk % 4) * 32;
        wgmma_ss<64, 0, 0>(s, sw128_desc(a), sw128_desc(b), kk > 0 ? 1 : 0);
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t a = sdo + (kk / 4) * (kSbRows * 128) + (kk % 4) * 32;
        const uint32_t b = sv + (kk / 4) * (BK * 128) + wg * (64 * 128) + (kk % 4) * 32;
        wgmma_ss<64, 0, 0>(dp, sw128_desc(a), sw128_desc(b), kk > 0 ? 1 : 0);
      }
      wgmma_commit();
      // Under the products: the gather of tile t + 2 into the stage of tile t - 1.
      const int st_next = st == 0 ? kSbStages - 1 : st - 1;
      if (t_next < n_tiles) issue(t_next, st_next, next);
      cp_async_commit();
      ++t_next;
      next = load_row_src(p, first(t_next), last(t_next), my_row);
      hopper::wgmma_wait<0>();
      hopper::fence_acc(s);
      hopper::fence_acc(dp);

      // This thread's rows (accumulator layout): 16 w + lane / 4 (+ 8); columns 8 j + 2 (lane % 4)
      // + {0, 1} of its 64 keys in s[4 j + 2 i + {0, 1}].
      const uint32_t* ent = s_ent + st * kSbRows;
      const int* lims = s_lim + st * kSbRows;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = warp_in_wg * 16 + (lane >> 2) + 8 * i;
        const int64_t lm = int64_t(lims[row >> p.log2g]) - (kstart + 64 * wg);  // column c visible iff c <= lm
        const int lim = lm < 0 ? -1 : int(lm < 64 ? lm : 64);
        const float lse2 = s_lse[st * kSbRows + row] * kLog2e;
        const float dl = s_delta[st * kSbRows + row];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          float pv[2], dsv[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int col = 8 * j + 2 * q4 + c;
            const float x = ex2_approx(fmaf(s[4 * j + 2 * i + c], p.scale_log2, -lse2));
            pv[c] = col <= lim ? x : 0.f;
            dsv[c] = pv[c] * (dp[4 * j + 2 * i + c] - dl);
          }
          const uint32_t off = uint32_t(row * 128 + ((j ^ (row & 7)) << 4) + q4 * 4);
          *reinterpret_cast<uint32_t*>(gp + off) = pack_bf16(pv[0], pv[1]);
          *reinterpret_cast<uint32_t*>(gds + off) = pack_bf16(dsv[0], dsv[1]);
        }
      }
      fence_proxy_async();
      wg_barrier(wg);  // this warpgroup's P and dS atoms are complete (only it reads them)

      float dq[D / 2];
      hopper::fence_acc(dk);
      hopper::fence_acc(dv);
      hopper::fence_acc(dq);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kSbRows / 16; ++kk)
        wgmma_ss<D, 1, 1>(dv, sw128_desc_mn(sp + kk * 2048, kSbRows * 128),
                          sw128_desc_mn(sdo + kk * 2048, kSbRows * 128), 1);
#pragma unroll
      for (int kk = 0; kk < kSbRows / 16; ++kk)
        wgmma_ss<D, 1, 1>(dk, sw128_desc_mn(sds + kk * 2048, kSbRows * 128),
                          sw128_desc_mn(sq + kk * 2048, kSbRows * 128), 1);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_ss<D, 0, 1>(dq, sw128_desc(sds + kk * 32), sw128_desc_mn(sk + (wg * 64 + kk * 16) * 128, BK * 128),
                          kk > 0 ? 1 : 0);
      wgmma_commit();
      hopper::wgmma_wait<0>();
      hopper::fence_acc(dk);
      hopper::fence_acc(dv);
      hopper::fence_acc(dq);

      if (NWG == 2 && p.dq_exchange) {
        // Warpgroup 1 hands its dQ (over keys 64..127) to warpgroup 0 through this tile's stage,
        // which every product is done reading after the barrier. [c][thread] order: conflict-free.
        float* xbuf = reinterpret_cast<float*>(smem + lay.stage + st * lay.stage_bytes);
        __syncthreads();
        if (wg == 1) {
#pragma unroll
          for (int c = 0; c < D / 2; ++c) xbuf[c * 128 + wtid] = dq[c];
        }
        __syncthreads();
        if (wg == 0) {
#pragma unroll
          for (int c = 0; c < D / 2; ++c) dq[c] += xbuf[c * 128 + wtid];
        }
      }
      if (wg == 0 || !p.dq_exchange) {
        // Lane pairs (lane % 4 = 2 m, 2 m + 1) swap halves so that each lane holds 4 consecutive
        // columns of one row (the even lane row 16 w + lane / 4, the odd one that row + 8): one
        // 16-byte reduction instead of two 8-byte ones (half the instructions; the bytes, which
        // dominate at 128K, stay the same: docs/sparse_backward.md).
        const int hi = q4 & 1;
        const int row = warp_in_wg * 16 + (lane >> 2) + 8 * hi;
        const uint32_t id = ent[row >> p.log2g];
        float* dst = nullptr;
        if (id != 0xffffffffu) {
          const int64_t qi = int64_t(id / per_query);
          const int64_t hrow = qi * p.h_q + r * p.g + (row & (p.g - 1));
          dst = (p.deterministic ? p.dq_part + (hrow * p.topk + int64_t(id % uint32_t(p.topk))) * D
                                 : p.dq_acc + hrow * D) +
                4 * (q4 >> 1);
        }
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          const float4 x = quad_v4(dq[4 * j], dq[4 * j + 1], dq[4 * j + 2], dq[4 * j + 3], hi);
          if (dst == nullptr) continue;
          if (p.deterministic)
            *reinterpret_cast<float4*>(dst + 8 * j) = x;
          else
            atomicAdd(reinterpret_cast<float4*>(dst + 8 * j), x);
        }
      }
      st = st + 1 == kSbStages ? 0 : st + 1;
    }

    // The item's dK, dV (keys 64 wg + row of the block), 4 consecutive columns per lane as for dQ.
    const bool to_part = p.deterministic && item < p.item_cap;
    {
      const int hi = q4 & 1;
      const int key = wg * 64 + warp_in_wg * 16 + (lane >> 2) + 8 * hi;
      const int64_t kr = kstart + key;
      const bool in = kr < p.n_k;
      float* dkp = to_part ? p.item_part + (int64_t(item) * 2 * BK + key) * D : p.dk_acc + (kr * p.h_kv + r) * D;
      float* dvp = to_part ? dkp + BK * D : p.dv_acc + (kr * p.h_kv + r) * D;
      dkp += 4 * (q4 >> 1);
      dvp += 4 * (q4 >> 1);
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const float4 xk = quad_v4(dk[4 * j], dk[4 * j + 1], dk[4 * j + 2], dk[4 * j + 3], hi);
        const float4 xv = quad_v4(dv[4 * j], dv[4 * j + 1], dv[4 * j + 2], dv[4 * j + 3], hi);
        if (!in) continue;
        if (to_part) {
          *reinterpret_cast<float4*>(dkp + 8 * j) = xk;
          *reinterpret_cast<float4*>(dvp + 8 * j) = xv;
        } else {
          atomicAdd(reinterpret_cast<float4*>(dkp + 8 * j), xk);
          atomicAdd(reinterpret_cast<float4*>(dvp + 8 * j), xv);
        }
      }
    }
  }
}

// Host launcher of the main kernel for one configuration; defined here, instantiated in
// sparse_bwd_d{64,128}.cu. Persistent CTAs: as many as are resident at once (occupancy), at most
// max_ctas (there is no point in more CTAs than selection entries).
template <int D, int BK>
void launch_sparse_bwd(const SparseBwdKernelParams& kp, int num_sms, int64_t max_ctas, int smem_optin,
                       cudaStream_t stream) {
  const size_t bytes = size_t(sb_smem_layout(D, BK).total) + 1024;  // + base alignment
  auto kernel = sparse_bwd_kernel<D, BK>;
  require_smem("sparse_attention_backward", "the kernel", reinterpret_cast<const void*>(kernel), bytes, smem_optin);
  int per_sm = 0;
  check_cuda("sparse_attention_backward", cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, BK * 2, bytes),
             "occupancy query failed");
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(int64_t(num_sms) * std::max(per_sm, 1), max_ctas));
  kernel<<<dim3(unsigned(grid)), dim3(unsigned(BK * 2)), bytes, stream>>>(kp);
  check_cuda("sparse_attention_backward", cudaGetLastError(), "main kernel launch failed");
}

}  // namespace msa::cuda
