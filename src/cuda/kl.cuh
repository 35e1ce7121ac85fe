// kl.cuh — the CUDA sm_90a kernels of the KL alignment loss and its backward (MSA_SPEC "KL alignment
// loss"): the main KV-outer kernel (per work item one K block and one K_idx block in shared memory;
// gathered teacher sub-tiles give the group-mean probabilities P, gathered student tiles give
// P_idx, dS, the per-slot dq_idx partials and the loss terms; or, in the lse mode, the per-slot
// partial index lse), the dK kernel (dk_idx of a work item's block from the stored dS tiles), and
// their launcher templates. Instantiated per d in kl_d64.cu and kl_d128.cu (main) and in kl.cu
// (dK). Design and numbers: docs/kl_backward.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "hopper.cuh"
#include "host.h"
#include "kl_tiles.h"
#include "sparse_schedule.h"

namespace msa::cuda {

// What one launch of the main kernel computes.
enum KlMode : int {
  kKlModeLse = 0,   // per-slot partial index lse over each selected block (student only)
  kKlModeGrad = 1,  // dS tiles, per-slot dq_idx partials
  kKlModeLoss = 2,  // per-tile sums of P (log P - log P_idx)
};

// Everything the kernels read. Query-side pointers are moved to the pass's first row; strides are in
// elements; tensors are bf16 bit patterns.
struct KlKernelParams {
  const uint16_t* q = nullptr;  // [n_q, h_q, d], rows 16-byte aligned (the host repacks otherwise)
  int64_t stride_q_tok = 0, stride_q_head = 0;
  const uint16_t* k = nullptr;  // [n_k, h_kv, d]
  int64_t stride_k_tok = 0, stride_k_head = 0;
  const uint16_t* q_idx = nullptr;  // [n_q, h_kv, d_idx], rows 16-byte aligned
  int64_t stride_qi_tok = 0, stride_qi_head = 0;
  const uint16_t* k_idx = nullptr;  // [n_k, d_idx]
  int64_t stride_ki_tok = 0;
  int k_vec = 0, ki_vec = 0;  // k / k_idx rows are 16-byte aligned: vector loads
  int64_t n_q = 0, n_k = 0;   // n_q: rows of this pass
  int h_q = 1, h_kv = 1, g = 1, log2g = 0, topk = 1, bk_shift = 7;
  float scale_log2 = 1.f, iscale_log2 = 1.f;  // scale * log2(e), index_scale * log2(e)
  const float* lse = nullptr;                 // [n_q, h_q] natural log (grad, loss)
  const float* index_lse = nullptr;           // [n_q, h_kv] natural log (grad, loss)
  float ds_coef = 0.f;                        // lambda / (n_q of the call * h_kv)
  int mode = kKlModeGrad;
  const int2* qinfo = nullptr;          // [n_q] {k0, p} (schedule)
  const uint64_t* keys = nullptr;       // [n_e] sorted group keys (schedule)
  const uint32_t* entries = nullptr;    // [n_e] sorted entry ids (schedule)
  const int32_t* lims = nullptr;        // [n_e] last visible key row of each sorted entry's query (schedule)
  const int32_t* item_start = nullptr;  // [n_items] (schedule)
  int32_t* counters = nullptr;          // n_valid, n_items, work counter (schedule)
  float* part_lse = nullptr;            // [n_e] per entry id, log2 units (lse mode)
  float* part_dq = nullptr;             // [n_e, d_idx] per entry id, sum_j dS k_idx (grad)
  uint16_t* ds = nullptr;               // [n_e, bk] bf16 dS per sorted position (grad)
  double* kl_part = nullptr;            // [n_e] per sorted position of a tile's first entry, zeroed (loss)
  float* dk_acc = nullptr;              // [n_k, d_idx] sum dS q_idx (dK kernel), zeroed
};

// Shared-memory map of the main kernel, identical on host (sizing) and device. K, K_idx and the
// gather stages start at multiples of 1024 bytes from a 1024-aligned base (128-byte swizzle).
struct KlSmemLayout {
  uint32_t k, ki, ring, stage_bytes, pbuf, meta_id, meta_lim, meta_ilse, misc, total;
};

__host__ __device__ inline KlSmemLayout kl_smem_layout(int d, int d_idx, int bk) {
  KlSmemLayout l{};
  uint32_t off = 0;
  l.k = off;
  off += uint32_t(bk) * d * 2;
  l.ki = off;
  off += uint32_t(bk) * d_idx * 2;
  l.ring = off;
  l.stage_bytes = uint32_t(kKlRows) * uint32_t(d > d_idx ? d : d_idx) * 2;
  off += uint32_t(kKlWarpgroups * kKlStages) * l.stage_bytes;
  l.pbuf = off;  // float [warpgroup][64][bk]: teacher P of the current student tile
  off += uint32_t(kKlWarpgroups * kKlRows) * bk * 4;
  l.meta_id = off;  // int [warpgroup][64]: entry id of each tile row (-1: past the item)
  off += uint32_t(kKlWarpgroups * kKlRows) * 4;
  l.meta_lim = off;  // int [warpgroup][64]: last visible key row
  off += uint32_t(kKlWarpgroups * kKlRows) * 4;
  l.meta_ilse = off;  // float [warpgroup][64]: index lse in log2 units
  off += uint32_t(kKlWarpgroups * kKlRows) * 4;
  l.misc = off;  // int claimed work item; float [warpgroup][4] loss sums of the warps
  off += 16 + kKlWarpgroups * 16;
  l.total = off;
  return l;
}

// dK kernel: two stages of (dS tile [64][bk], Q_idx tile [64][d_idx]).
__host__ __device__ inline uint32_t kl_dk_stage_bytes(int d_idx, int bk) {
  return uint32_t(kKlRows) * uint32_t(bk + d_idx) * 2;
}

namespace kl_detail {

using hopper::cp_async_16;
using hopper::cp_async_commit;
using hopper::cp_async_wait;
using hopper::ex2_approx;
using hopper::fence_proxy_async;
using hopper::lg2_approx;
using hopper::load8;
using hopper::pack_bf16;
using hopper::sw128_desc;
using hopper::sw128_desc_mn;
using hopper::sw128_offset;
using hopper::wgmma_commit;
using hopper::wgmma_fence;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Barrier of one consumer warpgroup (ids 1, 2; 0 is __syncthreads), immediate ids so that racecheck
// can tell them from __syncthreads.
static_assert(kKlWarpgroups == 2, "wg_barrier names one barrier per consumer warpgroup");
__device__ __forceinline__ void wg_barrier(int wg) {
  if (wg == 0)
    asm volatile("bar.sync 1, 128;" ::: "memory");
  else
    asm volatile("bar.sync 2, 128;" ::: "memory");
}

// Teacher-P tile index of (row, col): rows of bk floats, bits 3..4 of the column flipped by row % 4,
// so that the float2 accesses of a half warp (4 rows x 4 lanes) hit 4 different 32-byte segments.
template <int BK>
__device__ __forceinline__ int pidx(int row, int col) {
  return row * BK + (col ^ ((row & 3) << 3));
}

// Rows [kstart, kstart + ROWS) of a [n, COLS] bf16 tensor (row stride `stride`, rows past n zero) as a
// K-major SW128 tile [ROWS][COLS], stored with st.shared by `nthreads` threads.
template <int ROWS, int COLS>
__device__ __forceinline__ void load_tile(uint8_t* dst, const uint16_t* base, int64_t stride, int64_t kstart, int64_t n,
                                          bool vec, int tid, int nthreads) {
  constexpr int CH = COLS / 8;
  for (int c = tid; c < ROWS * CH; c += nthreads) {
    const int row = c / CH, ch = c % CH;
    const int64_t kr = kstart + row;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (kr < n) val = load8(base + kr * stride + ch * 8, vec);
    *reinterpret_cast<uint4*>(dst + sw128_offset(ROWS, row, ch * 8)) = val;
  }
}

// acc[64 x N] = A[64 x K] * B[N x K]^T, both K-major SW128 tiles (A of 64 rows, B of N rows).
template <int K, int N>
__device__ __forceinline__ void issue_ss(float (&acc)[N / 2], uint32_t sa, uint32_t sb) {
  hopper::fence_acc(acc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    const uint32_t a = sa + (kk / 4) * (kKlRows * 128) + (kk % 4) * 32;
    const uint32_t b = sb + (kk / 4) * (N * 128) + (kk % 4) * 32;
    if constexpr (N == 64)
      hopper::wgmma_m64n64k16(acc, sw128_desc(a), sw128_desc(b), kk > 0 ? 1 : 0);
    else
      hopper::wgmma_m64n128k16(acc, sw128_desc(a), sw128_desc(b), kk > 0 ? 1 : 0);
  }
  wgmma_commit();
}

// D[64 x 64] += A[64 x 16] * B[16 x 64], both operands MN-major in shared memory (imm-trans-a = 1,
// imm-trans-b = 1): dK = dS^T Q_idx reads the dS tile ([queries][keys]) and the Q_idx tile
// ([queries][d_idx]) as they are stored.
__device__ __forceinline__ void wgmma_tt_n64(float (&d)[32], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, 1, 1;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(1));
}

__device__ __forceinline__ void wgmma_tt_n128(float (&d)[64], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 1, 1;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(1));
}

// The gather of one ring load: a teacher sub-tile (u < nsub: 64 / g entries x g heads of q) or the
// student tile (64 entries of q_idx). Thread wtid copies half of row wtid / 2.
struct RowSrc {
  uint32_t id;  // entry id; 0xffffffff: the row is past the tile's entries
};

struct Cursor {
  int t, u;  // student tile of the item, load within it (u == nsub(t): the Q_idx tile)
};

template <int D, int DI>
__device__ __forceinline__ void issue_gather(const KlKernelParams& p, uint32_t stage, bool teacher, RowSrc rs, int r,
                                             int wtid) {
  const int row = wtid >> 1, half = wtid & 1;
  const bool valid = rs.id != 0xffffffffu;
  const int64_t i = valid ? int64_t(rs.id / uint32_t(p.h_kv * p.topk)) : 0;
  if (teacher) {
    constexpr int kHalf = D / 16;
    const int h = row & (p.g - 1);
    const uint16_t* src = p.q + i * p.stride_q_tok + int64_t(r * p.g + h) * p.stride_q_head;
#pragma unroll
    for (int k = 0; k < kHalf; ++k) {
      const int ch = half * kHalf + k;
      cp_async_16(stage + sw128_offset(kKlRows, row, ch * 8), valid ? static_cast<const void*>(src + ch * 8) : p.q,
                  valid ? 16 : 0);
    }
  } else {
    constexpr int kHalf = DI / 16;
    const uint16_t* src = p.q_idx + i * p.stride_qi_tok + int64_t(r) * p.stride_qi_head;
#pragma unroll
    for (int k = 0; k < kHalf; ++k) {
      const int ch = half * kHalf + k;
      cp_async_16(stage + sw128_offset(kKlRows, row, ch * 8), valid ? static_cast<const void*>(src + ch * 8) : p.q_idx,
                  valid ? 16 : 0);
    }
  }
}

// Round K of the reduce-scatter in teacher_finish: lanes that differ in lane bit (2 + R - 1 - K) swap
// the halves of columns y[0, 2 half) and each keeps the sum of one half in y[0, half). A template
// per round, so that every index is a compile-time constant (a loop over rounds left the column
// loop rolled and y in local memory).
template <int NJ, int K, int R>
__device__ __forceinline__ void reduce_scatter_rounds(float (&y)[NJ][2], int lane) {
  if constexpr (K < R) {
    constexpr int half = NJ >> (K + 1);
    constexpr int m = 4 << (R - 1 - K);
    const bool upper = (lane & m) != 0;
#pragma unroll
    for (int jj = 0; jj < half; ++jj)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float lo = y[jj][c], hi = y[jj + half][c];
        y[jj][c] = (upper ? hi : lo) + __shfl_xor_sync(0xffffffffu, upper ? lo : hi, m);
      }
    reduce_scatter_rounds<NJ, K + 1, R>(y, lane);
  }
}

// Teacher sub-tile u of the current student tile once S = Q K^T is issued: P_h = exp(s scale - lse_h)
// on the visible keys, the mean over the g heads of each entry (rows of one entry are g consecutive
// accumulator rows: a sum inside the thread for g = 16, then a reduce-scatter over lane / 4), stored
// to the warpgroup's P tile, each value by one lane.
// The lse of this thread's two rows comes from lse_pre (loaded by sub-tile u - 1) except for u = 0;
// the rows of sub-tile u + 1 (when n_sub > u + 1) are loaded into lse_pre under this one's math.
template <int BK, int LOG2G>
__device__ __forceinline__ void teacher_finish(const KlKernelParams& p, float (&s)[BK / 2], float* pb,
                                               const int* meta_id, const int* meta_lim, float (&lse_pre)[2], int u,
                                               int n_sub, int r, int64_t kstart, int warp_in_wg, int lane) {
  constexpr int G = 1 << LOG2G;
  constexpr int QPT = kKlRows >> LOG2G;
  const int q4 = lane & 3;
  int lim[2];
  float lse2[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = warp_in_wg * 16 + (lane >> 2) + 8 * i;
    const int ql = u * QPT + (row >> LOG2G);
    const int id = meta_id[ql];
    const int64_t lm = int64_t(meta_lim[ql]) - kstart;  // key column c is visible iff c <= lm
    lim[i] = id < 0 ? -1 : int(lm < BK ? lm : BK);
    lse2[i] = lse_pre[i];
    if (u == 0 && id >= 0) lse2[i] = p.lse[int64_t(id / (p.h_kv * p.topk)) * p.h_q + r * G + (row & (G - 1))] * kLog2e;
    if (u + 1 < n_sub) {
      const int idn = meta_id[ql + QPT];
      lse_pre[i] = idn < 0 ? 0.f : p.lse[int64_t(idn / (p.h_kv * p.topk)) * p.h_q + r * G + (row & (G - 1))] * kLog2e;
    }
  }
  hopper::wgmma_wait<0>();
  hopper::fence_acc(s);
#pragma unroll
  for (int j = 0; j < BK / 8; ++j)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = 8 * j + 2 * q4 + c;
        float& x = s[4 * j + 2 * i + c];
        x = col <= lim[i] ? ex2_approx(fmaf(x, p.scale_log2, -lse2[i])) : 0.f;
      }
  // Mean over the g heads of each entry as a reduce-scatter over the GG lanes (bits 2.. of the lane)
  // that hold its rows: each round swaps half of the remaining columns with the partner lane and
  // adds, so log2(GG) rounds leave each lane the full sums of NJ / GG column pairs (j = sub * NJ / GG
  // + jj), 28 shuffles per row set at g >= 8 instead of 96 for an all-reduce.
  constexpr float inv_g = 1.f / float(G);
  constexpr int GG = G < 8 ? G : 8;
  constexpr int R = LOG2G < 3 ? LOG2G : 3;
  constexpr int NJ = BK / 8;
  const int sub = (lane >> 2) & (GG - 1);
#pragma unroll
  for (int i = 0; i < (G == 16 ? 1 : 2); ++i) {
    float y[NJ][2];
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) y[j][c] = G == 16 ? s[4 * j + c] + s[4 * j + 2 + c] : s[4 * j + 2 * i + c];
    reduce_scatter_rounds<NJ, 0, R>(y, lane);
    const int row = warp_in_wg * 16 + (lane >> 2) + 8 * i;
    const int ql = u * QPT + (row >> LOG2G);
#pragma unroll
    for (int jj = 0; jj < NJ / GG; ++jj) {
      const int j = sub * (NJ / GG) + jj;
      *reinterpret_cast<float2*>(pb + pidx<BK>(ql, 8 * j + 2 * q4)) = make_float2(y[jj][0] * inv_g, y[jj][1] * inv_g);
    }
  }
}

// The student tile (64 entries) once S_idx = Q_idx K_idx^T is issued. lse mode: each entry's max and
// sum of exp over the visible keys, as one log2-unit partial lse per entry id. Grad / loss: P_idx,
// the teacher P of the tile, dS = coef (P_idx - P); grad stores the dS rows (bf16, for the dK
// kernel) and the per-slot partial dq = dS K_idx (wgmma, dS from registers); loss sums
// P (log P - log P_idx) over the tile into kl_part.
template <int DI, int BK>
__device__ __forceinline__ void student_finish(const KlKernelParams& p, float (&s)[BK / 2], const float* pb,
                                               const int* meta_id, const int* meta_lim, const float* meta_ilse,
                                               float* misc_f, uint32_t ski, int64_t kstart, int e_first, int wg,
                                               int warp_in_wg, int lane) {
  const unsigned full = 0xffffffffu;
  const int q4 = lane & 3;
  int lim[2], id[2], ql[2];
  float il2[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    ql[i] = warp_in_wg * 16 + (lane >> 2) + 8 * i;
    id[i] = meta_id[ql[i]];
    const int64_t lm = int64_t(meta_lim[ql[i]]) - kstart;
    lim[i] = id[i] < 0 ? -1 : int(lm < BK ? lm : BK);
    il2[i] = meta_ilse[ql[i]];
  }
  hopper::wgmma_wait<0>();
  hopper::fence_acc(s);

  if (p.mode == kKlModeLse) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float m = -INFINITY;
#pragma unroll
      for (int j = 0; j < BK / 8; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          if (8 * j + 2 * q4 + c <= lim[i]) m = fmaxf(m, s[4 * j + 2 * i + c]);
      m = fmaxf(m, __shfl_xor_sync(full, m, 1));
      m = fmaxf(m, __shfl_xor_sync(full, m, 2));
      const float off = m == -INFINITY ? 0.f : m * p.iscale_log2;
      float l = 0.f;
#pragma unroll
      for (int j = 0; j < BK / 8; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          if (8 * j + 2 * q4 + c <= lim[i]) l += ex2_approx(fmaf(s[4 * j + 2 * i + c], p.iscale_log2, -off));
      l += __shfl_xor_sync(full, l, 1);
      l += __shfl_xor_sync(full, l, 2);
      if (id[i] >= 0 && q4 == 0) p.part_lse[id[i]] = l > 0.f ? off + lg2_approx(l) : -INFINITY;
    }
    return;
  }

  const bool loss = p.mode == kKlModeLoss;
  float kl = 0.f;
#pragma unroll
  for (int j = 0; j < BK / 8; ++j)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int col = 8 * j + 2 * q4;
      float2 pt = make_float2(0.f, 0.f);
      if (col <= lim[i]) pt = *reinterpret_cast<const float2*>(pb + pidx<BK>(ql[i], col));
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float& x = s[4 * j + 2 * i + c];
        const bool vis = col + c <= lim[i];
        const float t2 = fmaf(x, p.iscale_log2, -il2[i]);  // log2 P_idx
        const float pi = vis ? ex2_approx(t2) : 0.f;
        const float pt_c = vis ? (c == 0 ? pt.x : pt.y) : 0.f;
        // Teacher terms below the smallest normal float contribute < 1e-36 each; skipping them keeps
        // lg2.approx.ftz from flushing a subnormal to log2(0) = -inf (a sharp teacher head averaged
        // over g heads lands there, and the loss of a training run turned non-finite).
        if (loss && pt_c >= 1.17549435e-38f) kl += pt_c * (lg2_approx(pt_c) - t2);
        x = p.ds_coef * (pi - pt_c);
      }
    }

  if (loss) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) kl += __shfl_xor_sync(full, kl, o);
    if (lane == 0) misc_f[warp_in_wg] = kl;
    wg_barrier(wg);
    if (warp_in_wg == 0 && lane == 0)
      p.kl_part[e_first] = double(((misc_f[0] + misc_f[1]) + misc_f[2]) + misc_f[3]) * double(kLn2);
    return;
  }

  // dS as bf16 A fragments.
  uint32_t a[BK / 16][4];
  hopper::pack_a_frags<BK>(s, a);
  // The dS rows for the dK kernel (the same bf16 values the dq product uses), stored before the
  // wgmma takes the fragments.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (id[i] < 0) continue;
    uint16_t* dst = p.ds + int64_t(e_first + ql[i]) * BK + 2 * q4;
#pragma unroll
    for (int j = 0; j < BK / 8; ++j) *reinterpret_cast<uint32_t*>(dst + 8 * j) = a[j / 2][(j % 2) * 2 + i];
  }
  float dq[DI / 2];
  hopper::fence_acc(dq);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BK / 16; ++kk) {
    // B = K_idx [keys][d_idx] read MN-major: d_idx contiguous, one 128-byte row per key.
    const uint64_t db = sw128_desc_mn(ski + kk * 16 * 128, BK * 128);
    if constexpr (DI == 64)
      hopper::wgmma_m64n64k16_rs(dq, a[kk], db, kk > 0 ? 1 : 0);
    else
      hopper::wgmma_m64n128k16_rs(dq, a[kk], db, kk > 0 ? 1 : 0);
  }
  wgmma_commit();
  hopper::wgmma_wait<0>();
  hopper::fence_acc(dq);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (id[i] < 0) continue;
    float* dst = p.part_dq + int64_t(id[i]) * DI + 2 * q4;
#pragma unroll
    for (int j = 0; j < DI / 8; ++j)
      __stcs(reinterpret_cast<float2*>(dst + 8 * j), make_float2(dq[4 * j + 2 * i], dq[4 * j + 2 * i + 1]));
  }
}

}  // namespace kl_detail

// The main kernel: a persistent grid; each CTA takes work items (one (kv head, kv block) group's chunk
// of entries) from an atomic counter, loads the block's K (head r) and K_idx once, and each warpgroup
// walks its student tiles (t = wg, wg + 2, ...): nsub(t) teacher sub-tiles, then the student tile,
// all gathered through one cp.async ring. Every (entry, key) is computed by exactly one tile and
// every output row (partial lse, partial dq, dS row, loss partial) is written by one thread group,
// so no atomics touch the outputs here.
template <int D, int DI, int BK>
__global__ void __launch_bounds__(kKlThreads, 1) kl_main_kernel(const KlKernelParams p) {
  using namespace kl_detail;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const KlSmemLayout lay = kl_smem_layout(D, DI, BK);
  const unsigned full = 0xffffffffu;
  const int tid = threadIdx.x, lane = tid & 31;
  // Warp-uniform in ptxas's eyes (a wgmma under a branch it cannot prove uniform is serialized).
  const int wg = __shfl_sync(full, tid >> 7, 0);
  const int warp_in_wg = __shfl_sync(full, (tid >> 5) & 3, 0);
  const int wtid = tid & 127;
  const uint32_t s_base = smem_addr(smem);
  const uint32_t sk = s_base + lay.k, ski = s_base + lay.ki;
  const uint32_t ring = s_base + lay.ring + uint32_t(wg * kKlStages) * lay.stage_bytes;
  float* pb = reinterpret_cast<float*>(smem + lay.pbuf) + wg * kKlRows * BK;
  int* meta_id = reinterpret_cast<int*>(smem + lay.meta_id) + wg * kKlRows;
  int* meta_lim = reinterpret_cast<int*>(smem + lay.meta_lim) + wg * kKlRows;
  float* meta_ilse = reinterpret_cast<float*>(smem + lay.meta_ilse) + wg * kKlRows;
  int* misc = reinterpret_cast<int*>(smem + lay.misc);
  float* misc_f = reinterpret_cast<float*>(smem + lay.misc + 16) + wg * 4;
  const int n_valid = p.counters[0];
  const int n_items = p.counters[1];
  const bool lse_mode = p.mode == kKlModeLse;
  const int qpt_shift = 6 - p.log2g;  // entries per teacher sub-tile: 64 >> log2g
  const uint32_t per_query = uint32_t(p.h_kv * p.topk);

  // compute-sanitizer's racecheck reports a RAW hazard on misc[0] between the write below and the
  // read after the __syncthreads, as it does for the sparse forward's identical broadcast: a false
  // positive when one warpgroup waits there while the other runs named barriers (docs/kl_backward.md).
  for (;;) {
    if (tid == 0) misc[0] = atomicAdd(p.counters + 2, 1);
    __syncthreads();  // every warpgroup is done with the previous item's K / K_idx; misc[0] is visible
    const int item = __shfl_sync(full, misc[0], 0);
    if (item >= n_items) break;
    const int e0 = __shfl_sync(full, p.item_start[item], 0);
    const int e1 = __shfl_sync(full, item + 1 < n_items ? p.item_start[item + 1] : n_valid, 0);
    const uint64_t key = p.keys[e0];
    const int r = int(key / uint64_t(p.n_k));
    const int64_t kstart = int64_t(key - uint64_t(r) * uint64_t(p.n_k));
    if (!lse_mode)
      load_tile<BK, D>(smem + lay.k, p.k + int64_t(r) * p.stride_k_head, p.stride_k_tok, kstart, p.n_k, p.k_vec != 0,
                       tid, kKlThreads);
    load_tile<BK, DI>(smem + lay.ki, p.k_idx, p.stride_ki_tok, kstart, p.n_k, p.ki_vec != 0, tid, kKlThreads);
    fence_proxy_async();
    __syncthreads();

    const int n_tiles = (e1 - e0 + kKlRows - 1) / kKlRows;
    auto first = [&](int t) { return e0 + t * kKlRows; };
    auto count = [&](int t) { return min(kKlRows, e1 - first(t)); };
    auto nsub = [&](int t) { return lse_mode ? 0 : (count(t) + (1 << qpt_shift) - 1) >> qpt_shift; };
    auto live = [&](const Cursor& c) { return c.t < n_tiles; };
    auto advance = [&](Cursor& c) {
      if (c.u < nsub(c.t))
        ++c.u;
      else
        c.t += kKlWarpgroups, c.u = 0;
    };
    // Row source of this thread for the load at cursor c, loaded one load ahead of its cp.async.
    auto row_src = [&](const Cursor& c) {
      RowSrc rs{0xffffffffu};
      if (!live(c)) return rs;
      const int row = wtid >> 1;
      const bool teacher = c.u < nsub(c.t);
      const int ent = teacher ? (c.u << qpt_shift) + (row >> p.log2g) : row;
      if (ent < count(c.t)) rs.id = p.entries[first(c.t) + ent];
      return rs;
    };

    Cursor issue{wg, 0};
#pragma unroll
    for (int s = 0; s < kKlStages - 1; ++s) {
      if (live(issue)) {
        issue_gather<D, DI>(p, ring + s * lay.stage_bytes, issue.u < nsub(issue.t), row_src(issue), r, wtid);
        advance(issue);
      }
      cp_async_commit();
    }
    RowSrc next = row_src(issue);
    // The metadata of a student tile (entry id, last visible key, index lse) is loaded one tile of this
    // warpgroup ahead into registers (the ids and limits at the top of the tile before, the index lse,
    // which depends on the id, after its first load), so the tile's top waits on no global load.
    auto meta_of = [&](int tt, int& id, int& lim) {
      id = -1, lim = -1;
      if (wtid < kKlRows && tt < n_tiles && wtid < count(tt)) {
        id = int(p.entries[first(tt) + wtid]);
        lim = p.lims[first(tt) + wtid];
      }
    };
    auto meta_ilse_of = [&](int id) {
      return !lse_mode && id >= 0 ? p.index_lse[int64_t(uint32_t(id) / per_query) * p.h_kv + r] * kLog2e : 0.f;
    };
    int pre_id, pre_lim;
    meta_of(wg, pre_id, pre_lim);
    float pre_il = meta_ilse_of(pre_id);
    float lse_pre[2] = {0.f, 0.f};  // the teacher lse of the next sub-tile's rows (teacher_finish)
    int st = 0;
    for (int t = wg; t < n_tiles; t += kKlWarpgroups) {
      wg_barrier(wg);  // the previous tile's readers of the metadata and the P tile are done
      if (wtid < kKlRows) {
        meta_id[wtid] = pre_id;
        meta_lim[wtid] = pre_lim;
        meta_ilse[wtid] = pre_il;
      }
      meta_of(t + kKlWarpgroups, pre_id, pre_lim);
      const int L = nsub(t) + 1;
      for (int u = 0; u < L; ++u) {
        cp_async_wait<kKlStages - 2>();
        fence_proxy_async();
        // This load's tile and the metadata are visible; every thread is past the previous load's
        // math, whose stage the gather below overwrites.
        wg_barrier(wg);
        const uint32_t stage = ring + st * lay.stage_bytes;
        // After the math: the gather of the load kKlStages - 1 ahead (into the stage the previous load
        // used), and the row source of the one after it. Issuing it before the wgmma instead (two full
        // loads of lead) measured the same (docs/kl_backward.md); issued between the wgmma and its
        // wait, it made ptxas serialize the wgmma (C7514).
        auto gather_next = [&] {
          const int st_next = st == 0 ? kKlStages - 1 : st - 1;
          if (live(issue)) {
            issue_gather<D, DI>(p, ring + st_next * lay.stage_bytes, issue.u < nsub(issue.t), next, r, wtid);
            advance(issue);
          }
          cp_async_commit();
          next = row_src(issue);
        };
        // Each path issues its product and its finish in straight-line code, so that ptxas sees every
        // accumulator's wgmma and wait together.
#define MSA_KL_TEACHER(LG)                                                                               \
  {                                                                                                      \
    float s[BK / 2];                                                                                     \
    issue_ss<D, BK>(s, stage, sk);                                                                       \
    teacher_finish<BK, LG>(p, s, pb, meta_id, meta_lim, lse_pre, u, L - 1, r, kstart, warp_in_wg, lane); \
    gather_next();                                                                                       \
  }
        if (u < L - 1) {
          switch (p.log2g) {
            case 0:
              MSA_KL_TEACHER(0) break;
            case 1:
              MSA_KL_TEACHER(1) break;
            case 2:
              MSA_KL_TEACHER(2) break;
            case 3:
              MSA_KL_TEACHER(3) break;
            default:
              MSA_KL_TEACHER(4) break;
          }
        } else {
          float s[BK / 2];
          issue_ss<DI, BK>(s, stage, ski);
          student_finish<DI, BK>(p, s, pb, meta_id, meta_lim, meta_ilse, misc_f, ski, kstart, first(t), wg, warp_in_wg,
                                 lane);
          gather_next();
        }
        if (u == 0) pre_il = meta_ilse_of(pre_id);
#undef MSA_KL_TEACHER
        st = st + 1 == kKlStages ? 0 : st + 1;
      }
    }
  }
}

// dK: a grid-stride walk over the work items (the same schedule as the main kernel); per item one
// warpgroup accumulates dK[bk][d_idx] = sum over the item's tiles of dS^T Q_idx (wgmma, both operands
// MN-major from shared memory, the tiles double-buffered with cp.async), then adds it into the fp32
// dk_acc rows of the block. Several items (kv heads, chunks of hot blocks) share key rows, so that
// add is an fp32 atomic: the one place of the backward whose summation order varies run to run.
template <int DI, int BK>
__global__ void __launch_bounds__(128) kl_dk_kernel(const KlKernelParams p) {
  using namespace kl_detail;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const unsigned full = 0xffffffffu;
  const int tid = threadIdx.x, lane = tid & 31;
  const int warp = __shfl_sync(full, tid >> 5, 0);
  const uint32_t s_base = smem_addr(smem);
  constexpr uint32_t kDs = uint32_t(kKlRows) * BK * 2, kStage = uint32_t(kKlRows) * (BK + DI) * 2;
  const int n_valid = p.counters[0];
  const int n_items = p.counters[1];
  const uint32_t per_query = uint32_t(p.h_kv * p.topk);

  for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int e0 = p.item_start[item];
    const int e1 = item + 1 < n_items ? p.item_start[item + 1] : n_valid;
    const uint64_t key = p.keys[e0];
    const int r = int(key / uint64_t(p.n_k));
    const int64_t kstart = int64_t(key - uint64_t(r) * uint64_t(p.n_k));
    const int n_tiles = (e1 - e0 + kKlRows - 1) / kKlRows;

    auto load = [&](int t, int stage) {
      const uint32_t sds = s_base + stage * kStage, sqi = sds + kDs;
      const int eb = e0 + t * kKlRows;
      constexpr int CD = BK / 8, CQ = DI / 8;
      for (int c = tid; c < kKlRows * CD; c += 128) {
        const int row = c / CD, ch = c % CD;
        const bool ok = eb + row < e1;
        cp_async_16(sds + sw128_offset(kKlRows, row, ch * 8), ok ? p.ds + int64_t(eb + row) * BK + ch * 8 : p.ds,
                    ok ? 16 : 0);
      }
      for (int c = tid; c < kKlRows * CQ; c += 128) {
        const int row = c / CQ, ch = c % CQ;
        const bool ok = eb + row < e1;
        const int64_t i = ok ? int64_t(p.entries[eb + row] / per_query) : 0;
        cp_async_16(sqi + sw128_offset(kKlRows, row, ch * 8),
                    ok ? p.q_idx + i * p.stride_qi_tok + int64_t(r) * p.stride_qi_head + ch * 8 : p.q_idx, ok ? 16 : 0);
      }
    };

    float acc[BK / 64][DI / 2];
#pragma unroll
    for (int a = 0; a < BK / 64; ++a)
#pragma unroll
      for (int v = 0; v < DI / 2; ++v) acc[a][v] = 0.f;

    load(0, 0);
    cp_async_commit();
    for (int t = 0; t < n_tiles; ++t) {
      if (t + 1 < n_tiles) load(t + 1, (t + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
      fence_proxy_async();
      __syncthreads();
      const uint32_t sds = s_base + (t & 1) * kStage, sqi = sds + kDs;
#pragma unroll
      for (int a = 0; a < BK / 64; ++a) {
        hopper::fence_acc(acc[a]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kKlRows / 16; ++kk) {
          // A = dS^T: keys 64 a .. 64 a + 63 are one 64-key atom of the dS tile, queries are K.
          const uint64_t da = sw128_desc_mn(sds + a * (kKlRows * 128) + kk * 16 * 128, kKlRows * 128);
          const uint64_t db = sw128_desc_mn(sqi + kk * 16 * 128, kKlRows * 128);
          if constexpr (DI == 64)
            wgmma_tt_n64(acc[a], da, db);
          else
            wgmma_tt_n128(acc[a], da, db);
        }
        wgmma_commit();
      }
      hopper::wgmma_wait<0>();
#pragma unroll
      for (int a = 0; a < BK / 64; ++a) hopper::fence_acc(acc[a]);
      __syncthreads();  // everyone is done with this stage before the load of tile t + 2 refills it
    }

    const int q4 = lane & 3;
#pragma unroll
    for (int a = 0; a < BK / 64; ++a)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int64_t kr = kstart + a * 64 + warp * 16 + (lane >> 2) + 8 * i;
        if (kr >= p.n_k) continue;
        float* dst = p.dk_acc + kr * DI + 2 * q4;
#pragma unroll
        for (int j = 0; j < DI / 8; ++j) {
          const float x0 = acc[a][4 * j + 2 * i], x1 = acc[a][4 * j + 2 * i + 1];
          if (x0 != 0.f || x1 != 0.f) atomicAdd(reinterpret_cast<float2*>(dst + 8 * j), make_float2(x0, x1));
        }
      }
  }
}

// Host launchers; defined here, instantiated in kl_d{64,128}.cu (main) and kl.cu (dK).
template <int D, int DI, int BK>
void launch_kl_main(const KlKernelParams& kp, const char* op, int grid, int smem_optin, cudaStream_t stream) {
  const size_t bytes = size_t(kl_smem_layout(D, DI, BK).total) + 1024;  // + base alignment
  auto kernel = kl_main_kernel<D, DI, BK>;
  require_smem(op, "the KL kernel", reinterpret_cast<const void*>(kernel), bytes, smem_optin);
  kernel<<<dim3(unsigned(grid)), dim3(kKlThreads), bytes, stream>>>(kp);
  check_cuda(op, cudaGetLastError(), "KL main kernel launch failed");
}

template <int DI, int BK>
void launch_kl_dk(const KlKernelParams& kp, const char* op, int grid, cudaStream_t stream) {
  const size_t bytes = 2 * size_t(kl_dk_stage_bytes(DI, BK)) + 1024;
  auto kernel = kl_dk_kernel<DI, BK>;
  ensure_smem(op, reinterpret_cast<const void*>(kernel), bytes);
  kernel<<<dim3(unsigned(grid)), dim3(128), bytes, stream>>>(kp);
  check_cuda(op, cudaGetLastError(), "KL dK kernel launch failed");
}

}  // namespace msa::cuda
