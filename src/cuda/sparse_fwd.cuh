// sparse_fwd.cuh — the CUDA sm_90a kernels of the sparse attention forward: phase 1 (per work item:
// one K/V block in shared memory, gathered query tiles, S = Q K^T and O = P V on wgmma, per-slot
// partial o and lse) and phase 2 (per (query, head): log-sum-exp merge of the valid slots), with
// the launcher template of phase 1. Phase 1 is instantiated per (d, bk) in sparse_fwd_d64.cu and
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
};

// Shared-memory map of phase 1, identical on host (sizing) and device. K, V^T and every Q buffer
// start at multiples of 1024 bytes from a 1024-aligned base, as the 128-byte swizzle needs.
struct SpSmemLayout {
  uint32_t k, vt, q, q_bytes, meta_base, meta_lim, meta_src, misc, total;
};

__host__ __device__ inline SpSmemLayout sp_smem_layout(int d, int bk) {
  SpSmemLayout l{};
  uint32_t off = 0;
  l.k = off;
  off += uint32_t(bk) * d * 2;
  l.vt = off;
  off += uint32_t(d) * bk * 2;
  l.q = off;
  l.q_bytes = uint32_t(kSpRows) * d * 2;
  off += uint32_t(kSpWarpgroups * kSpQStages) * l.q_bytes;
  l.meta_base = off;  // int64 [warpgroup][stage][kSpRows]: partial row of the (query, slot), head 0 of the group
  off += uint32_t(kSpWarpgroups * kSpQStages * kSpRows) * 8;
  l.meta_lim = off;  // int [warpgroup][stage][kSpRows]: last visible key row (-1: padding)
  off += uint32_t(kSpWarpgroups * kSpQStages * kSpRows) * 4;
  l.meta_src = off;  // int64 [warpgroup][stage][kSpRows]: q offset of the entry's token row (-1: padding)
  off += uint32_t(kSpWarpgroups * kSpQStages * kSpRows) * 8;
  l.misc = off;
  off += 16;
  l.total = off;
  return l;
}

namespace sp_detail {

using hopper::cp_async_16;
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

// The register-A forms stay here: hopper.cuh's read B MN-major (imm-trans-b = 1), these read the
// K-major V^T tile (imm-trans-b = 0).
//
// D[64 x 64] (+)= A[64 x 16] * B[64 x 16]^T, A from registers (the m16n8k16 A-fragment layout per
// warp), B K-major in shared memory (SW128).
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "
      "%24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}

// D[64 x 128] (+)= A[64 x 16] * B[128 x 16]^T, A from registers (the m16n8k16 A-fragment layout per
// warp), B K-major in shared memory (SW128).
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "
      "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "
      "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}

template <int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (N == 64)
    hopper::wgmma_m64n64k16(d, da, db, scale_d);
  else
    hopper::wgmma_m64n128k16(d, da, db, scale_d);
}
template <int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  if constexpr (N == 64)
    wgmma_rs_n64(d, a, db, scale_d);
  else
    wgmma_rs_n128(d, a, db, scale_d);
}

// K block rows [kstart, kstart + BK) of kv head r as a K-major SW128 tile [BK][D], and V^T as a
// K-major SW128 tile [D][BK] (the B operand of O = P V wants keys contiguous). Rows past n_k are
// zeros (no query can see them). Each thread stores with st.shared; the caller fences and syncs.
template <int D, int BK>
__device__ __forceinline__ void load_kv(const SparseFwdKernelParams& p, uint8_t* sk, uint8_t* svt, int r,
                                        int64_t kstart, int tid) {
  constexpr int CH = D / 8;
  const bool vec = p.kv_vec != 0;
  for (int c = tid; c < BK * CH; c += kSpThreads) {
    const int row = c / CH, ch = c % CH;
    const int64_t kr = kstart + row;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (kr < p.n_k) val = load8(p.k + kr * p.stride_k_tok + int64_t(r) * p.stride_k_head + ch * 8, vec);
    *reinterpret_cast<uint4*>(sk + sw128_offset(BK, row, ch * 8)) = val;
  }
  // Key pairs vary fastest across the warp: the 32 lanes then store 32 different words of one V^T
  // row (no bank conflicts); the strided global reads happen once per work item.
  for (int c = tid; c < (BK / 2) * CH; c += kSpThreads) {
    const int kp = c % (BK / 2), ch = c / (BK / 2);
    const int64_t kr = kstart + 2 * kp;
    uint4 v0 = make_uint4(0, 0, 0, 0), v1 = v0;
    const uint16_t* src = p.v + kr * p.stride_v_tok + int64_t(r) * p.stride_v_head + ch * 8;
    if (kr < p.n_k) v0 = load8(src, vec);
    if (kr + 1 < p.n_k) v1 = load8(src + p.stride_v_tok, vec);
    const uint16_t* a = reinterpret_cast<const uint16_t*>(&v0);
    const uint16_t* b = reinterpret_cast<const uint16_t*>(&v1);
#pragma unroll
    for (int dd = 0; dd < 8; ++dd)
      *reinterpret_cast<uint32_t*>(svt + sw128_offset(D, ch * 8 + dd, 2 * kp)) =
          uint32_t(a[dd]) | (uint32_t(b[dd]) << 16);
  }
}

// The gather source of one Q tile row for this thread: thread wtid copies half of row wtid / 2, whose
// entry is (wtid / 2) / g of the tile. Loaded one tile ahead of its cp.async so that the gather never
// waits on these loads (cp.async is an asm with a memory clobber: a load after it cannot be hoisted).
struct RowSrc {
  uint32_t id;  // entry id; 0xffffffff: the row is past the item's entries
  int lim;      // last visible key row of the entry's query
};

__device__ __forceinline__ RowSrc load_row_src(const SparseFwdKernelParams& p, int e_begin, int e_end, int wtid) {
  const int e = e_begin + ((wtid >> 1) >> p.log2g);
  RowSrc rs{0xffffffffu, -1};
  if (e < e_end) {
    rs.id = p.entries[e];
    rs.lim = p.lims[e];
  }
  return rs;
}

// Publishes where the entries of a tile start in q (element offset of the query's token row, -1
// past the item's entries) into the tile's slot of meta_src, for the gather of issue_q. One thread
// per entry writes (the entry's head-0, first-half thread); the gather reads after a barrier.
__device__ __forceinline__ void publish_src(const SparseFwdKernelParams& p, int64_t* meta_src, RowSrc rs, int wtid) {
  const int row = wtid >> 1;
  if ((wtid & 1) == 0 && (row & (p.g - 1)) == 0) {
    const uint32_t per_query = uint32_t(p.h_kv) * uint32_t(p.topk);
    meta_src[row >> p.log2g] = rs.id != 0xffffffffu ? int64_t(rs.id / per_query) * p.stride_q_tok : -1;
  }
}

// Issues the cp.async gather of one Q tile into a K-major SW128 tile [kSpRows][D] (rows past the
// entries zero-filled), and stores the per-entry metadata the softmax and the epilogue need.
// Consecutive threads copy consecutive 16-byte chunks, so one warp instruction reads 512
// contiguous bytes of q (whole rows, and the g heads of a query are adjacent rows): every 32-byte
// sector is fetched from L2 once. (Thread-per-half-row had each instruction touch 32 sectors for
// 16 bytes each, and fetch every sector twice.) The entries' sources come from meta_src, published
// a tile earlier; rs is this thread's own entry, for the metadata.
template <int D>
__device__ __forceinline__ void issue_q(const SparseFwdKernelParams& p, uint32_t sq, int64_t* meta_base, int* meta_lim,
                                        const int64_t* meta_src, RowSrc rs, int r, int wtid) {
  constexpr int CH = D / 8;            // 16-byte chunks per row
  constexpr int kRowStep = 128 / CH;   // rows between a thread's chunks; a multiple of 8, so the
                                       // swizzle term (row & 7) is the same for all of them
  const int ch = wtid % CH, row0 = wtid / CH;
  const uint32_t dst0 = sq + uint32_t((ch >> 3) * kSpRows * 128 + row0 * 128 + (((ch & 7) ^ (row0 & 7)) << 4));
  const uint16_t* qh = p.q + int64_t(r * p.g) * p.stride_q_head + ch * 8;
#pragma unroll
  for (int k = 0; k < kSpRows / kRowStep; ++k) {
    const int row = row0 + k * kRowStep;
    const int64_t src = meta_src[row >> p.log2g];
    const uint16_t* ptr = qh + src + int(row & (p.g - 1)) * int(p.stride_q_head);  // < 2^31 (launcher)
    cp_async_16(dst0 + uint32_t(k * kRowStep * 128), src >= 0 ? static_cast<const void*>(ptr) : p.q, src >= 0 ? 16 : 0);
  }
  const int row = wtid >> 1;
  if ((wtid & 1) == 0 && (row & (p.g - 1)) == 0) {
    const int ent = row >> p.log2g;
    const bool valid = rs.id != 0xffffffffu;
    const uint32_t per_query = uint32_t(p.h_kv) * uint32_t(p.topk);
    const int64_t i = valid ? int64_t(rs.id / per_query) : 0;
    // Byte offset of the bf16 partial row of head 0 (the lse index and the float32 row follow by shifts).
    meta_base[ent] = valid ? ((i * p.topk + int64_t(rs.id % uint32_t(p.topk))) * p.h_q + int64_t(r) * p.g) * (2 * D) : -1;
    meta_lim[ent] = valid ? rs.lim : -1;
  }
}

// S = Q K^T of one 64-row tile on wgmma (both operands in shared memory); committed, not waited.
template <int D, int BK>
__device__ __forceinline__ void issue_scores(float (&s)[BK / 2], uint32_t sq, uint32_t sk) {
  hopper::fence_acc(s);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t a = sq + (kk / 4) * (kSpRows * 128) + (kk % 4) * 32;
    const uint32_t b = sk + (kk / 4) * (BK * 128) + (kk % 4) * 32;
    wgmma_ss<BK>(s, sw128_desc(a), sw128_desc(b), kk > 0 ? 1 : 0);
  }
  wgmma_commit();
}

// The rest of one tile once S is issued: the causal mask of the block and its softmax in
// registers, O = P V (wgmma, P from registers), then the per-slot partial o (normalised) and lse of
// every row that holds an entry.
template <int D, int BK>
__device__ __forceinline__ void finish_tile(const SparseFwdKernelParams& p, float (&s)[BK / 2], uint32_t svt,
                                            uint8_t* stage, const int64_t* meta_base, const int* meta_lim,
                                            int64_t kstart, int wg, int warp_in_wg, int lane) {
  hopper::wgmma_wait<0>();
  hopper::fence_acc(s);

  // This thread's rows (wgmma accumulator layout): row0 = 16 w + lane / 4 and row0 + 8; it holds
  // columns 8 j + 2 (lane % 4) + {0, 1} of each in s[4 j + 2 i + {0, 1}].
  const unsigned full = 0xffffffffu;
  const int q4 = lane & 3;
  int lim[2], head[2];
  int64_t base[2];
  float m[2], l[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = warp_in_wg * 16 + (lane >> 2) + 8 * i;
    const int ent = row >> p.log2g;
    head[i] = row & (p.g - 1);
    base[i] = meta_base[ent] >= 0 ? meta_base[ent] / (2 * D) : -1;  // partial row of head 0 (D: a power of 2)
    const int64_t lm = int64_t(meta_lim[ent]) - kstart;  // key column c is visible iff c <= lm
    lim[i] = meta_lim[ent] < 0 ? -1 : int(lm < BK ? lm : BK);
  }
  // Only the query's own block (and padding rows) needs the causal mask: most warps skip it.
  // Warp-uniform (a vote), so the accumulator stays in registers either way.
  if (__any_sync(full, lim[0] < BK - 1 || lim[1] < BK - 1)) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < BK / 8; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = 8 * j + 2 * q4 + c;
          float& x = s[4 * j + 2 * i + c];
          x = col <= lim[i] ? x : -INFINITY;
        }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    m[i] = -INFINITY;
#pragma unroll
    for (int j = 0; j < BK / 8; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) m[i] = fmaxf(m[i], s[4 * j + 2 * i + c]);
    m[i] = fmaxf(m[i], __shfl_xor_sync(full, m[i], 1));
    m[i] = fmaxf(m[i], __shfl_xor_sync(full, m[i], 2));
    // A row with nothing visible (padding) keeps P = 0 instead of exp(-inf + inf) = NaN.
    const float off = m[i] == -INFINITY ? 0.f : m[i] * p.scale_log2;
    l[i] = 0.f;
#pragma unroll
    for (int j = 0; j < BK / 8; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float& x = s[4 * j + 2 * i + c];
        x = ex2_approx(fmaf(x, p.scale_log2, -off));
        l[i] += x;
      }
    l[i] += __shfl_xor_sync(full, l[i], 1);
    l[i] += __shfl_xor_sync(full, l[i], 2);
  }

  // P as bf16 A fragments: for k-step kk the accumulator columns 16 kk .. 16 kk + 15 are exactly
  // the m16n8k16 A layout (rows lane / 4 and + 8, column pairs 2 (lane % 4) and + 8).
  uint32_t pa[BK / 16][4];
#pragma unroll
  for (int kk = 0; kk < BK / 16; ++kk) {
    pa[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
    pa[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
    pa[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
    pa[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
  }
  float o[D / 2];
  hopper::fence_acc(o);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BK / 16; ++kk) {
    const uint32_t b = svt + (kk / 4) * (D * 128) + (kk % 4) * 32;
    wgmma_rs<D>(o, pa[kk], sw128_desc(b), kk > 0 ? 1 : 0);
  }
  wgmma_commit();
  hopper::wgmma_wait<0>();
  hopper::fence_acc(o);

  // lse = scale * max + ln(sum exp(scale * (s - max))), from base-2 terms.
#pragma unroll
  for (int i = 0; i < 2; ++i)
    if (base[i] >= 0 && q4 == 0)
      __stcs(p.partial_lse + base[i] + head[i],
             (m[i] * p.scale_log2 + lg2_approx(l[i])) * 0.6931471805599453f);

  if (p.partial_f32) {
    // Measurement path: float2 stores straight from the fragments (a quad writes one 32-byte sector).
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (base[i] < 0) continue;
      const float inv = 1.f / l[i];
      float* dst = static_cast<float*>(p.partial_o) + (base[i] + head[i]) * D + 2 * q4;
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
    }
    return;
  }
  // bf16 partials leave through shared memory: fragment stores hit 8 half-sectors per warp
  // instruction, the staged copy writes whole rows with 16-byte stores (an eighth of the L1 store
  // transactions). The tile's Q stage is free once every warp's S product is done (the barrier),
  // and nothing refills it before the next tile's barrier. Same swizzle as Q: conflict-free.
  wg_barrier(wg);
  // Row 16 w + lane / 4 (+ 8), columns 8 j + 2 (lane % 4): the swizzled chunk is j ^ (row & 7), and
  // row & 7 = (lane / 4) & 7 for both rows, so one XOR per j gives the address of all four stores
  // of that j (the other row and the other 64-column atom are immediate offsets). The stage is
  // 1024-byte aligned, so the XOR only touches the chunk bits.
  const uint32_t row_off = uint32_t((warp_in_wg * 16 + (lane >> 2)) * 128 + (((lane >> 2) & 7) << 4) + q4 * 4);
  const float inv0 = l[0] > 0.f ? 1.f / l[0] : 0.f, inv1 = l[1] > 0.f ? 1.f / l[1] : 0.f;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    uint8_t* a = stage + ((row_off ^ uint32_t((j & 7) << 4)) + uint32_t((j >> 3) * kSpRows * 128));
    *reinterpret_cast<uint32_t*>(a) = pack_bf16(o[4 * j] * inv0, o[4 * j + 1] * inv0);
    *reinterpret_cast<uint32_t*>(a + 8 * 128) = pack_bf16(o[4 * j + 2] * inv1, o[4 * j + 3] * inv1);
  }
  wg_barrier(wg);
  constexpr int CH = D / 8;
  constexpr int kRowStep = 128 / CH;
  const int wtid = warp_in_wg * 32 + lane;
  const int ch = wtid % CH, row0 = wtid / CH;
  const uint8_t* src0 = stage + ((ch >> 3) * kSpRows * 128 + row0 * 128 + (((ch & 7) ^ (row0 & 7)) << 4));
#pragma unroll
  for (int k = 0; k < kSpRows / kRowStep; ++k) {
    const int row = row0 + k * kRowStep;
    const int64_t b = meta_base[row >> p.log2g];  // byte offset of the entry's head-0 row, -1: padding
    if (b < 0) continue;
    const uint4 val = *reinterpret_cast<const uint4*>(src0 + k * kRowStep * 128);
    // Streaming store: the partials are read once, by the combine, long after; L2 is better spent
    // on the Q rows that neighbouring work items gather again.
    __stcs(reinterpret_cast<uint4*>(static_cast<uint8_t*>(p.partial_o) + b + uint32_t(((row & (p.g - 1)) * D + ch * 8) * 2)),
           val);
  }
}

}  // namespace sp_detail

// Phase 1: a persistent grid; each CTA takes work items (one (kv head, kv block) group's chunk of
// entries) from an atomic counter, loads the block's K and V^T once, and its warpgroups walk the
// item's 64-row tiles (t = wg, wg + 3, ...) with the next tile's Q gather in flight. Every (query,
// head, slot) row is written by exactly one tile, so no atomics touch the outputs and the result
// does not depend on which CTA ran which item.
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
  const int tid = threadIdx.x, lane = tid & 31;
  // Broadcast from lane 0 so that ptxas sees warp-uniform values: a wgmma under a branch it cannot
  // prove uniform is serialized (C7518).
  const int wg = __shfl_sync(full, tid >> 7, 0);
  const int warp_in_wg = __shfl_sync(full, (tid >> 5) & 3, 0);
  const int wtid = tid & 127;
  const uint32_t s_base = smem_addr(smem);
  const uint32_t sk = s_base + lay.k, svt = s_base + lay.vt;
  int* misc = reinterpret_cast<int*>(smem + lay.misc);
  int64_t* meta_base = reinterpret_cast<int64_t*>(smem + lay.meta_base) + wg * kSpQStages * kSpRows;
  int* meta_lim = reinterpret_cast<int*>(smem + lay.meta_lim) + wg * kSpQStages * kSpRows;
  int64_t* meta_src = reinterpret_cast<int64_t*>(smem + lay.meta_src) + wg * kSpQStages * kSpRows;
  const uint32_t sq = s_base + lay.q + uint32_t(wg * kSpQStages) * lay.q_bytes;
  const int n_valid = p.counters[0];
  const int n_items = p.counters[1];
  const int queries_per_tile = kSpRows >> p.log2g;

  // compute-sanitizer racecheck reports a RAW hazard on misc[0] between the write below and the read
  // after the __syncthreads (when a warpgroup without tiles waits there while another runs its named
  // barriers). It is a false positive: a race-free probe with the same pattern is flagged the same
  // way, and is clean without the named barriers (docs/sparse_attention.md, 2026-11-26).
  for (;;) {
    if (tid == 0) misc[0] = atomicAdd(p.counters + 2, 1);
    __syncthreads();  // every warpgroup is done with the previous item's K/V; misc[0] is visible
    const int item = __shfl_sync(full, misc[0], 0);
    if (item >= n_items) {
      hopper::launch_dependents();  // the combine's CTAs may take this SM while others finish
      break;
    }
    const int e0 = __shfl_sync(full, p.item_start[item], 0);
    const int e1 = __shfl_sync(full, item + 1 < n_items ? p.item_start[item + 1] : n_valid, 0);
    const uint64_t key = p.keys[e0];
    const int r = int(key / uint64_t(p.n_k));
    const int64_t kstart = int64_t(key - uint64_t(r) * uint64_t(p.n_k));
    load_kv<D, BK>(p, smem + lay.k, smem + lay.vt, r, kstart, tid);
    fence_proxy_async();
    __syncthreads();

    const int n_tiles = (e1 - e0 + queries_per_tile - 1) / queries_per_tile;
    // Tile tt of the item holds entries [e0 + tt * qpt, min(e1, e0 + (tt + 1) * qpt)); this warpgroup
    // runs tiles wg, wg + 3, ...; its local tile j sits in Q stage j % kSpQStages.
    auto first = [&](int tt) { return e0 + tt * queries_per_tile; };
    auto last = [&](int tt) { return min(e1, e0 + (tt + 1) * queries_per_tile); };
    // Prologue: the sources of the first kSpQStages tiles (local tile j uses stage j % kSpQStages,
    // for its Q, metadata and meta_src slot), then the gathers of all but the last.
    RowSrc pro[kSpQStages - 1];
#pragma unroll
    for (int u = 0; u < kSpQStages - 1; ++u) {
      const int tt = wg + u * kSpWarpgroups;
      pro[u] = load_row_src(p, first(tt), last(tt), wtid);
    }
    int t_next = wg + (kSpQStages - 1) * kSpWarpgroups;
    RowSrc next = load_row_src(p, first(t_next), last(t_next), wtid);
#pragma unroll
    for (int u = 0; u < kSpQStages - 1; ++u) publish_src(p, meta_src + u * kSpRows, pro[u], wtid);
    publish_src(p, meta_src + (kSpQStages - 1) * kSpRows, next, wtid);
    wg_barrier(wg);
#pragma unroll
    for (int u = 0; u < kSpQStages - 1; ++u) {
      const int tt = wg + u * kSpWarpgroups;
      if (tt < n_tiles)
        issue_q<D>(p, sq + u * lay.q_bytes, meta_base + u * kSpRows, meta_lim + u * kSpRows, meta_src + u * kSpRows,
                   pro[u], r, wtid);
      cp_async_commit();
    }
    int st = 0;
    for (int t = wg; t < n_tiles; t += kSpWarpgroups) {
      cp_async_wait<kSpQStages - 2>();
      fence_proxy_async();
      // Tile t's Q and metadata are visible, and every thread of the warpgroup is past the previous
      // tile, whose stage the gather below overwrites.
      wg_barrier(wg);
      float s[BK / 2];
      issue_scores<D, BK>(s, sq + st * lay.q_bytes, sk);
      // Under the S product: the gather of a later tile (ids loaded a tile ago), and the next ids.
      const int st_next = st == 0 ? kSpQStages - 1 : st - 1;
      if (t_next < n_tiles)
        issue_q<D>(p, sq + st_next * lay.q_bytes, meta_base + st_next * kSpRows, meta_lim + st_next * kSpRows,
                   meta_src + st_next * kSpRows, next, r, wtid);
      cp_async_commit();
      t_next += kSpWarpgroups;
      next = load_row_src(p, first(t_next), last(t_next), wtid);
      finish_tile<D, BK>(p, s, svt, smem + lay.q + (wg * kSpQStages + st) * lay.q_bytes, meta_base + st * kSpRows,
                         meta_lim + st * kSpRows, kstart, wg, warp_in_wg, lane);
      // The new t_next takes this tile's stage. Its meta_src slot was last read by this tile's gather,
      // long done; the next iteration's barrier publishes it before its gather reads it. Written
      // after finish_tile, when the load of next has long landed.
      publish_src(p, meta_src + st * kSpRows, next, wtid);
      st = st + 1 == kSpQStages ? 0 : st + 1;
    }
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
      float bm = mx;
#pragma unroll
      for (int u = 0; u < kBatch; ++u) bm = fmaxf(bm, ls[u]);
      if (bm == -INFINITY) continue;
      const float rescale = expf(mx - bm);  // mx = -inf: 0, and sum, acc are 0 anyway
      sum *= rescale;
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[c] *= rescale;
      mx = bm;
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const float w = expf(ls[u] - mx);  // invalid slots: exp(-inf) = 0, and their values are 0
        sum += w;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const float x = F32 ? __uint_as_float(raw[u][c])
                              : __uint_as_float(c % 2 == 0 ? raw[u][c / 2] << 16 : raw[u][c / 2] & 0xffff0000u);
          acc[c] = fmaf(w, x, acc[c]);
        }
      }
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

// Host launcher of phase 1 for one configuration; defined here, instantiated in
// sparse_fwd_d{64,128}.cu. grid: persistent CTAs (one per SM at most; the shared memory allows one).
template <int D, int BK>
void launch_sparse_phase1(const SparseFwdKernelParams& kp, int grid, int smem_optin, cudaStream_t stream) {
  const size_t bytes = size_t(sp_smem_layout(D, BK).total) + 1024;  // + base alignment
  if (bytes > size_t(smem_optin))
    throw std::runtime_error("msa::sparse_attention_forward: phase 1 needs " + std::to_string(bytes) +
                             " bytes of shared memory per block, the device has " + std::to_string(smem_optin));
  auto kernel = sparse_fwd_phase1_kernel<D, BK>;
  check_cuda("sparse_attention_forward",
             cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
             "cudaFuncSetAttribute failed");
  kernel<<<dim3(unsigned(grid)), dim3(kSpThreads), bytes, stream>>>(kp);
  check_cuda("sparse_attention_forward", cudaGetLastError(), "phase 1 launch failed");
}

}  // namespace msa::cuda
