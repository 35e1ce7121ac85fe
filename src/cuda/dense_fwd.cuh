// dense_fwd.cuh — the CUDA dense causal GQA attention forward for sm_90a (FlashAttention-3 style:
// a TMA producer warp streams K/V tiles into a shared-memory ring, two consumer warpgroups run
// S = Q K^T and O += P V on wgmma with the online softmax in registers), one CTA per query tile or
// persistent (one CTA per SM taking tiles from a counter), and the launcher templates.
// Instantiated per head dim in dense_fwd_d64.cu / dense_fwd_d128.cu; host side in
// dense_fwd_host.cu. Design and measurements: docs/dense_attention.md.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "hopper.cuh"
#include "host.h"

namespace msa::cuda {

// The public operation, for error messages.
constexpr const char* kDenseFwdOp = "dense_attention_forward";

// ---- tile shapes -------------------------------------------------------------------------------
// kDnBlockM, kDnBlockN, kDnConsumers and the stage count fix register and shared-memory layouts;
// the register split only moves speed.

// Rows per CTA. A row is a (token, head) pair of one GQA group: 128 / g tokens x g heads, so a
// K/V tile loaded once serves every head of the group (g times less K/V traffic than a CTA per
// head) and all g heads of a token share one causal frontier.
constexpr int kDnBlockM = 128;
// Keys per pipeline stage: one wgmma N for S = Q K^T, eight k16 steps for O += P V.
constexpr int kDnBlockN = 128;
// Consumer warpgroups, each owning 64 rows (one wgmma M): while one runs its softmax the tensor
// cores work on the other's GEMMs.
constexpr int kDnConsumers = 2;
constexpr int kDnRowsPerConsumer = kDnBlockM / kDnConsumers;
// Consumers + one producer warpgroup (a single thread issues TMA; registers are granted per
// warpgroup, so a lone producer warp would cost as much).
constexpr int kDnThreads = (kDnConsumers + 1) * 128;
// setmaxnreg split: a consumer holds S (64 fp32), O (d/2 fp32) and two P fragments (2 x 32 bf16x2)
// plus softmax state, ~210 registers at d = 128; the producer loop needs ~20. 2*240 + 24 <= 512.
constexpr int kDnConsumerRegs = 240;
constexpr int kDnProducerRegs = 24;
// The persistent producer also claims tiles and computes their row metadata: at 24 registers ptxas
// spilled 124 bytes there (4 at 32), so it gets 40 and the consumers 232 (2*232 + 40 <= 512; no
// spill either side).
constexpr int kDnPersistProducerRegs = 40;
constexpr int kDnPersistConsumerRegs = 232;
// K/V ring depth: two stages hide the L2 latency behind the ~2000 cycles of tensor work of a
// d = 128 stage; a d = 64 stage is half the work, so it gets a third stage (shared memory allows).
template <int D>
constexpr int dn_stages() {
  return D == 64 ? 3 : 2;
}
// bf16 elements per 128-byte swizzle row (the TMA box width and the wgmma SW128 atom).
constexpr int kDnAtom = 64;

// Everything the kernel reads besides the K and V tensor maps.
struct DenseFwdKernelParams {
  int64_t n_q = 0, n_k = 0, batch = 1;
  int h_q = 0, h_kv = 0, log2_g = 0;
  const int32_t* cu_q = nullptr;        // [batch+1] device, or null (one sequence)
  const int32_t* cu_k = nullptr;        // [batch+1] device, or null (then cu_q)
  const int32_t* q_pos = nullptr;       // [n_q] device, or null (bottom-right aligned)
  const int32_t* tile_start = nullptr;  // [batch+1] device: first query tile of each sequence; null iff cu_q is
  int tiles_per_head = 0;               // grid = h_kv * tiles_per_head (an upper bound when tile_start is set)
  const uint16_t* q = nullptr;          // [n_q, h_q, d] bf16 bits
  int64_t stride_q_tok = 0, stride_q_head = 0;
  int q_vec = 0;                        // rows of q are 16-byte aligned: vector loads
  uint16_t* o = nullptr;                // [n_q, h_q, d] bf16 bits
  int64_t stride_o_tok = 0, stride_o_head = 0;
  int o_vec = 0;                        // element pairs of o are 4-byte aligned: bf16x2 stores
  float* lse = nullptr;                 // [n_q, h_q]
  float scale_log2 = 0.f;               // scale * log2(e): the softmax runs in base 2
  unsigned* tile_counter = nullptr;     // persistent schedule: next query tile to hand out, zero at launch
};

// Shared-memory map, identical on host (sizing) and device. Q and every K/V stage start at
// multiples of 1024 bytes from a 1024-aligned base, as the 128-byte swizzle needs.
struct DnSmemLayout {
  uint32_t q, k, v, stage_bytes, row_p, row_tok, misc, bar_k, bar_v, bar_free_k, bar_free_v, total;
};

__host__ __device__ constexpr DnSmemLayout dn_smem_layout(int d, int stages) {
  DnSmemLayout l{};
  uint32_t off = 0;
  l.q = off;
  off += uint32_t(kDnBlockM) * d * 2;
  l.stage_bytes = uint32_t(kDnBlockN) * d * 2;
  l.k = off;
  off += uint32_t(stages) * l.stage_bytes;
  l.v = off;
  off += uint32_t(stages) * l.stage_bytes;
  l.row_p = off;
  off += kDnBlockM * 4;
  l.row_tok = off;
  off += kDnBlockM * 4;
  l.misc = off;
  off += 16;
  l.bar_k = off;
  off += uint32_t(stages) * 8;
  l.bar_v = off;
  off += uint32_t(stages) * 8;
  l.bar_free_k = off;
  off += uint32_t(stages) * 8;
  l.bar_free_v = off;
  off += uint32_t(stages) * 8;
  l.total = off;
  return l;
}

// Shared-memory map of the persistent kernel: two Q buffers, each with the metadata of its query
// tile (row positions and tokens, then head_kv, n_kt, n_full), so that the producer fills the next
// tile's while the consumers still work on the current one; the K/V ring as above.
constexpr int kDnQBufs = 2;
struct DnPersistLayout {
  uint32_t q, q_bytes, k, v, stage_bytes, row_p, row_tok, info, bar_k, bar_v, bar_free_k, bar_free_v, bar_q,
      bar_free_q, total;
};

__host__ __device__ constexpr DnPersistLayout dn_persist_layout(int d, int stages) {
  DnPersistLayout l{};
  uint32_t off = 0;
  l.q_bytes = uint32_t(kDnBlockM) * d * 2;
  l.q = off;
  off += kDnQBufs * l.q_bytes;
  l.stage_bytes = uint32_t(kDnBlockN) * d * 2;
  l.k = off;
  off += uint32_t(stages) * l.stage_bytes;
  l.v = off;
  off += uint32_t(stages) * l.stage_bytes;
  l.row_p = off;
  off += kDnQBufs * kDnBlockM * 4;
  l.row_tok = off;
  off += kDnQBufs * kDnBlockM * 4;
  l.info = off;
  off += kDnQBufs * 16;
  l.bar_k = off;
  off += uint32_t(stages) * 8;
  l.bar_v = off;
  off += uint32_t(stages) * 8;
  l.bar_free_k = off;
  off += uint32_t(stages) * 8;
  l.bar_free_v = off;
  off += uint32_t(stages) * 8;
  l.bar_q = off;
  off += kDnQBufs * 8;
  l.bar_free_q = off;
  off += kDnQBufs * 8;
  l.total = off;
  return l;
}

namespace dn_detail {

using namespace hopper;

// S[64 x 128] = Q_wg[64 x D] K_stage[128 x D]^T (Q_wg: this warpgroup's 64 rows of the Q tile).
template <int D>
__device__ __forceinline__ void issue_qk(float (&s)[64], uint32_t q_wg, uint32_t k_stage) {
  wgmma_chain_m64n128<D, kDnBlockM, kDnBlockN>(s, q_wg, k_stage);
}

// O[64 x D] += P[64 x 128] V_stage[128 x D]: P from registers (the S accumulator layout is the
// k16 A-fragment layout, so k-step kk takes fragment registers 4 kk .. 4 kk + 3), V as TMA left
// it: key rows of 128 bytes, i.e. MN-major for this product, 64 columns per atom.
template <int D>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], uint32_t (&pf)[32], uint32_t v_stage) {
  fence_acc(o);
  fence_regs(pf);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kDnBlockN / 16; ++kk) {
    const uint32_t a[4] = {pf[4 * kk], pf[4 * kk + 1], pf[4 * kk + 2], pf[4 * kk + 3]};
    const uint64_t db = sw128_desc_mn(v_stage + kk * 16 * 128, kDnBlockN * 128);
    if constexpr (D == 128)
      wgmma_m64n128k16_rs(o, a, db, 1);
    else
      wgmma_m64n64k16_rs(o, a, db, 1);
  }
  wgmma_commit();
}

// Online softmax of one S tile for the two rows i of this thread (row = lane / 4 + 8 i of the
// warp's 16; s[jj * 4 + i * 2 + c] is column 8 jj + 2 (lane % 4) + c). Masks keys past each row's
// position on diagonal tiles, updates the running max m (raw dot units) and the thread-partial
// sum l, returns the factor alpha that rescales O, and packs P = 2^(s * scale_log2 - m') as the
// bf16 A fragment of the P V product. A row that has seen no key keeps m = -inf; its reference
// point is 0 so that nothing becomes NaN and P = 0.
__device__ __forceinline__ void softmax_tile(float (&s)[64], float (&m)[2], float (&l)[2],
                                             float (&alpha)[2], const int (&lim)[2], bool mask, int q4,
                                             float scale_log2) {
  if (mask) {
#pragma unroll
    for (int jj = 0; jj < 16; ++jj)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          if (8 * jj + 2 * q4 + c > lim[i]) s[jj * 4 + i * 2 + c] = -INFINITY;
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    // Two independent chains halve the dependent fmax latency.
    float mx0 = m[i], mx1 = -INFINITY;
#pragma unroll
    for (int jj = 0; jj < 16; ++jj) {
      mx0 = fmaxf(mx0, s[jj * 4 + i * 2]);
      mx1 = fmaxf(mx1, s[jj * 4 + i * 2 + 1]);
    }
    float mx = fmaxf(mx0, mx1);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float ms = mx == -INFINITY ? 0.f : mx * scale_log2;
    // An unchanged max must rescale by exactly 1: nvcc contracts m * c - ms into fma(m, c, -ms),
    // the rounding residual of m * c (up to ~2^-22) rather than 0, and that same 2^residual then
    // scaled l and O on every later key tile. o cancels it; lse drifted linearly with the number of
    // key tiles (9e-4 at 1M keys, found by msa bench prefill's float64 check).
    alpha[i] = mx == m[i] && mx != -INFINITY ? 1.f : ex2_approx(m[i] * scale_log2 - ms);
    m[i] = mx;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int jj = 0; jj < 16; ++jj) {
      const float p0 = ex2_approx(fmaf(s[jj * 4 + i * 2], scale_log2, -ms));
      const float p1 = ex2_approx(fmaf(s[jj * 4 + i * 2 + 1], scale_log2, -ms));
      s[jj * 4 + i * 2] = p0;
      s[jj * 4 + i * 2 + 1] = p1;
      sum0 += p0;
      sum1 += p1;
    }
    l[i] = l[i] * alpha[i] + (sum0 + sum1);
  }
}

// P (fp32, in the S accumulator layout) as the bf16 A fragment of the P V product: register
// jj * 2 + i holds row i's columns 8 jj + 2 (lane % 4) + {0, 1}.
__device__ __forceinline__ void pack_p(const float (&s)[64], uint32_t (&pf)[32]) {
#pragma unroll
  for (int jj = 0; jj < 16; ++jj)
#pragma unroll
    for (int i = 0; i < 2; ++i) pf[jj * 2 + i] = pack_bf16(s[jj * 4 + i * 2], s[jj * 4 + i * 2 + 1]);
}

// One consumer warpgroup's sweep over the n_kt > 0 key tiles of its query tile: O (zero on entry),
// the running max m and the thread-partial sum l are updated in place. The tile's first key tile
// sits in ring stage s (parity phase); on return (s, phase) name the stage after its last one, so
// a persistent CTA carries them on to its next query tile. pos: the positions of this thread's two
// rows; key tiles below n_full skip the causal mask.
//
// Software pipeline (FlashAttention-3's intra-warpgroup overlap): S of tile j is issued, then
// P V of tile j - 1; the softmax of tile j runs while the tensor cores do that P V. Every
// group is retired before the back-edge, so no wgmma is in flight across it (C7514). P is
// packed to bf16 only after the wait, not while the P V of tile j - 1 still reads the fragment
// registers: packing earlier made ptxas copy the fragment between the two GEMMs and
// serialize every wgmma (C7513).
// Pingpong turns: consumer wg waits on barrier 1 + wg and hands the turn to the other on
// 2 - wg. Each warpgroup has n_kt + 1 issue points; warpgroup 1 opens with one arrival and
// skips its last, so every sync has exactly one matching arrival and none is left over.
template <int D, bool PINGPONG>
__device__ __forceinline__ void consume_tile(float (&o)[D / 2], float (&m)[2], float (&l)[2], uint32_t q_wg,
                                             uint32_t sk, uint32_t sv, uint32_t stage_bytes, uint32_t bar_k,
                                             uint32_t bar_v, uint32_t bar_free_k, uint32_t bar_free_v,
                                             const int (&pos)[2], int n_kt, int n_full, int q4, int lane, int wg,
                                             float scale_log2, int& s, uint32_t& phase) {
  constexpr int S = dn_stages<D>();
  float alpha[2];
  float sacc[64];
  uint32_t pf[32];
  auto turn_begin = [&] {
    if constexpr (PINGPONG) named_bar_sync(1 + wg, 2 * 128);
  };
  auto turn_end = [&](bool last) {
    if constexpr (PINGPONG)
      if (!(last && wg == 1)) named_bar_arrive(2 - wg, 2 * 128);
  };
  if constexpr (PINGPONG)
    if (wg == 1) named_bar_arrive(1, 2 * 128);
  mbar_wait(bar_k + 8 * s, phase);
  turn_begin();
  issue_qk<D>(sacc, q_wg, sk + s * stage_bytes);
  turn_end(false);
  wgmma_wait<0>();
  fence_acc(sacc);
  __syncwarp();
  if (lane == 0) mbar_arrive(bar_free_k + 8 * s);
  {
    const int lim[2] = {pos[0], pos[1]};
    softmax_tile(sacc, m, l, alpha, lim, 0 >= n_full, q4, scale_log2);  // alpha = 0: O is still 0
    pack_p(sacc, pf);
  }
  // s, phase: the stage of tile j - 1 in the loop.
  for (int j = 1; j < n_kt; ++j) {
    int sn = s + 1;
    uint32_t phase_n = phase;
    if (sn == S) {
      sn = 0;
      phase_n ^= 1;
    }
    mbar_wait(bar_k + 8 * sn, phase_n);
    turn_begin();
    issue_qk<D>(sacc, q_wg, sk + sn * stage_bytes);
    // The rescale of O for tile j - 1 runs under the S GEMM of tile j.
#pragma unroll
    for (int e = 0; e < D / 2; ++e) o[e] *= alpha[(e >> 1) & 1];
    mbar_wait(bar_v + 8 * s, phase);
    issue_pv<D>(o, pf, sv + s * stage_bytes);
    turn_end(false);
    wgmma_wait<1>();
    fence_acc(sacc);
    __syncwarp();
    if (lane == 0) mbar_arrive(bar_free_k + 8 * sn);
    const int lim[2] = {pos[0] - j * kDnBlockN, pos[1] - j * kDnBlockN};
    softmax_tile(sacc, m, l, alpha, lim, j >= n_full, q4, scale_log2);
    wgmma_wait<0>();
    fence_acc(o);
    fence_regs(pf);
    __syncwarp();
    if (lane == 0) mbar_arrive(bar_free_v + 8 * s);
    pack_p(sacc, pf);
    s = sn;
    phase = phase_n;
  }
#pragma unroll
  for (int e = 0; e < D / 2; ++e) o[e] *= alpha[(e >> 1) & 1];
  mbar_wait(bar_v + 8 * s, phase);
  turn_begin();
  issue_pv<D>(o, pf, sv + s * stage_bytes);
  turn_end(true);
  wgmma_wait<0>();
  fence_acc(o);
  fence_regs(pf);
  __syncwarp();
  // The last tile's V stays held until every warp of the warpgroup has retired its P V.
  if (lane == 0) mbar_arrive(bar_free_v + 8 * s);
  if (++s == S) {
    s = 0;
    phase ^= 1;
  }
}

// Epilogue of one consumer thread: quad-sum of l, O / l and lse = m * scale + ln(l) for its two
// rows (row0, row0 + 8; tok < 0: a row past the sequence, not written). A row that saw no key
// gets o = 0 and lse = -inf (the CPU reference's empty support).
template <int D>
__device__ __forceinline__ void store_tile(const float (&o)[D / 2], const float (&m)[2], float (&l)[2],
                                           const int (&tok)[2], int row0, int head_kv, int g, int q4,
                                           const DenseFwdKernelParams& p) {
  const unsigned full = 0xffffffffu;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(full, l[i], 1);
    l[i] += __shfl_xor_sync(full, l[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row0 + 8 * i;
    if (tok[i] < 0) continue;
    const int64_t head = int64_t(head_kv) * g + (r & (g - 1));
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    uint16_t* dst = p.o + int64_t(tok[i]) * p.stride_o_tok + head * p.stride_o_head;
#pragma unroll
    for (int jj = 0; jj < D / 8; ++jj) {
      const int col = 8 * jj + 2 * q4;
      const float v0 = o[jj * 4 + i * 2] * inv, v1 = o[jj * 4 + i * 2 + 1] * inv;
      if (p.o_vec) {
        *reinterpret_cast<uint32_t*>(dst + col) = pack_bf16(v0, v1);
      } else {
        dst[col] = __bfloat16_as_ushort(__float2bfloat16_rn(v0));
        dst[col + 1] = __bfloat16_as_ushort(__float2bfloat16_rn(v1));
      }
    }
    if (q4 == 0)
      p.lse[int64_t(tok[i]) * p.h_q + head] =
          l[i] > 0.f ? (m[i] * p.scale_log2 + log2f(l[i])) * 0.6931471805599453f : -INFINITY;
  }
}

}  // namespace dn_detail

// One CTA: 128 rows ((token, head) pairs of GQA group head_kv, all of one sequence) against the
// key tiles 0 .. max(p) / 128 of that sequence. Warpgroups 0-1 are consumers (64 rows each); one
// thread of warpgroup 2 issues the K and V loads (TMA, 3D maps over [n_k, h_kv, d]).
// PINGPONG orders the GEMM issues of the two consumer warpgroups with named barriers
// (FlashAttention-3's warp scheduling): each issues its S and P V GEMMs only after the other has
// issued its own, so one warpgroup's softmax runs under the other's GEMMs. It changes timing
// only: the arithmetic, and so every output bit, is the same either way.
template <int D, bool PINGPONG>
__global__ void __launch_bounds__(kDnThreads, 1)
    dense_fwd_kernel(const __grid_constant__ CUtensorMap tmap_k, const __grid_constant__ CUtensorMap tmap_v,
                     const DenseFwdKernelParams p) {
  using namespace dn_detail;
  constexpr int S = dn_stages<D>();
  constexpr DnSmemLayout lay = dn_smem_layout(D, S);
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const unsigned full = 0xffffffffu;
  const int g = 1 << p.log2_g;
  const int tok_per_tile = kDnBlockM >> p.log2_g;

  // Which tile: heads outermost so that the CTAs resident together read the same K/V head, and
  // within a head the last tiles (longest causal sweeps) first so that short ones fill the tail.
  const int head_kv = int(blockIdx.x / unsigned(p.tiles_per_head));
  const int64_t t = int64_t(p.tiles_per_head) - 1 - (int64_t(blockIdx.x) - int64_t(head_kv) * p.tiles_per_head);
  int64_t b = 0, t_in = t;
  if (p.tile_start != nullptr) {
    if (t >= p.tile_start[p.batch]) return;  // the grid over-counts by up to one tile per sequence
    b = find_seq(p.tile_start, p.batch, t);
    t_in = t - p.tile_start[b];
  }
  // Offsets are clamped into [0, n], positions into [-1, len_k): garbage varlen contents give
  // garbage rows but never an access outside the tensors.
  const SeqRows sr = seq_rows(p.cu_q, p.cu_k, b, p.n_q, p.n_k);
  const int64_t q_hi = sr.q_hi, k_lo = sr.k_lo;
  const int64_t tok0 = sr.q_lo + t_in * tok_per_tile;

  const uint32_t s_base = smem_addr(smem);
  const uint32_t sq = s_base + lay.q, sk = s_base + lay.k, sv = s_base + lay.v;
  int* row_p = reinterpret_cast<int*>(smem + lay.row_p);
  int* row_tok = reinterpret_cast<int*>(smem + lay.row_tok);
  int* misc = reinterpret_cast<int*>(smem + lay.misc);
  // K and V stages are filled (bar_k, bar_v) and freed (bar_free_k, bar_free_v) separately: K of
  // tile j is free once S of tile j is done, a whole softmax before its V, so the load of tile
  // j + 2 can start one iteration ahead with only two stages.
  const uint32_t bar_k = s_base + lay.bar_k, bar_v = s_base + lay.bar_v;
  const uint32_t bar_free_k = s_base + lay.bar_free_k, bar_free_v = s_base + lay.bar_free_v;

  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(bar_k + 8 * s, 1);
      mbar_init(bar_v + 8 * s, 1);
      // One arrival per consumer warp, after the wait that retires its last read of the stage.
      mbar_init(bar_free_k + 8 * s, kDnConsumers * 4);
      mbar_init(bar_free_v + 8 * s, kDnConsumers * 4);
    }
    fence_mbarrier_init();
    misc[0] = -1;       // max position of the tile's rows
    misc[1] = INT_MAX;  // min position
  }
  __syncthreads();

  if (tid < kDnBlockM) {
    const int64_t tok = tok0 + (tid >> p.log2_g);
    int pos = -1, tk = -1, pmax = -1, pmin = INT_MAX;
    if (tok < q_hi) {
      pos = int(query_pos(p.q_pos, sr, tok));
      tk = int(tok);
      pmax = pmin = pos;
    }
    row_p[tid] = pos;
    row_tok[tid] = tk;
    pmax = __reduce_max_sync(full, pmax);
    pmin = __reduce_min_sync(full, pmin);
    if (lane == 0) {
      atomicMax(&misc[0], pmax);
      atomicMin(&misc[1], pmin);
    }
  }
  if (tid < kDnConsumers * 128) {
    // Q tile, swizzled as TMA would: 16-byte chunk ch of row r lands at chunk (ch ^ r % 8) of the
    // row's 128 bytes in atom ch / 8. Rows past the sequence are zeros.
    constexpr int kChunks = D / 8;
    for (int ci = tid; ci < kDnBlockM * kChunks; ci += kDnConsumers * 128) {
      const int r = ci / kChunks, ch = ci % kChunks;
      const int64_t tok = tok0 + (r >> p.log2_g);
      uint4 v = make_uint4(0, 0, 0, 0);
      if (tok < q_hi) {
        const int64_t head = int64_t(head_kv) * g + (r & (g - 1));
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
      *reinterpret_cast<uint4*>(smem + lay.q + sw128_chunk_offset<kDnBlockM>(r, ch)) = v;
    }
  }
  fence_proxy_async();
  __syncthreads();

  // Broadcast from lane 0 so that ptxas sees warp-uniform loop bounds and roles: a wgmma under a
  // branch it cannot prove uniform is serialized (C7518).
  const int max_p = __shfl_sync(full, misc[0], 0);
  const int min_p = __shfl_sync(full, misc[1], 0);
  const int wg = __shfl_sync(full, tid / 128, 0);
  const int n_kt = max_p >= 0 ? max_p / kDnBlockN + 1 : 0;
  // Tiles below n_full are visible to every row of the CTA and skip the causal mask. (Rows past
  // the sequence are not counted: their results are never written.)
  const int n_full = n_kt > 0 ? (min_p + 1) / kDnBlockN : 0;

  if (wg == kDnConsumers) {
    setmaxnreg_dec<kDnProducerRegs>();
    if (warp == kDnConsumers * 4 && lane == 0) {
      int s = 0;
      uint32_t phase = 0;
      for (int j = 0; j < n_kt; ++j) {
        // Keys past the sequence are loaded (the next sequence's rows, or zeros past n_k) and
        // masked, since every row's position is < len_k.
        const int key_row = int(k_lo) + j * kDnBlockN;
        mbar_wait(bar_free_k + 8 * s, phase ^ 1);
        mbar_arrive_expect_tx(bar_k + 8 * s, lay.stage_bytes);
#pragma unroll
        for (int a = 0; a < D / kDnAtom; ++a)
          tma_load_3d(sk + s * lay.stage_bytes + a * (kDnBlockN * 128), &tmap_k, a * kDnAtom, head_kv, key_row,
                      bar_k + 8 * s);
        mbar_wait(bar_free_v + 8 * s, phase ^ 1);
        mbar_arrive_expect_tx(bar_v + 8 * s, lay.stage_bytes);
#pragma unroll
        for (int a = 0; a < D / kDnAtom; ++a)
          tma_load_3d(sv + s * lay.stage_bytes + a * (kDnBlockN * 128), &tmap_v, a * kDnAtom, head_kv, key_row,
                      bar_v + 8 * s);
        if (++s == S) {
          s = 0;
          phase ^= 1;
        }
      }
    }
  } else {
    setmaxnreg_inc<kDnConsumerRegs>();
    const int row0 = wg * kDnRowsPerConsumer + (warp & 3) * 16 + (lane >> 2);  // rows row0 and row0 + 8
    const int q4 = lane & 3;
    const int pos[2] = {row_p[row0], row_p[row0 + 8]};
    const uint32_t q_wg = sq + uint32_t(wg * kDnRowsPerConsumer) * 128;
    const float scale_log2 = p.scale_log2;

    float o[D / 2];
#pragma unroll
    for (int e = 0; e < D / 2; ++e) o[e] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    if (n_kt > 0) {
      int s = 0;
      uint32_t phase = 0;
      consume_tile<D, PINGPONG>(o, m, l, q_wg, sk, sv, lay.stage_bytes, bar_k, bar_v, bar_free_k, bar_free_v, pos,
                                n_kt, n_full, q4, lane, wg, scale_log2, s, phase);
    }
    const int tok[2] = {row_tok[row0], row_tok[row0 + 8]};
    store_tile<D>(o, m, l, tok, row0, head_kv, g, q4, p);
  }
}

// Persistent variant of the overlap schedule: gridDim.x <= #SMs CTAs, each taking query tiles
// from an atomic counter in the order of dense_fwd_kernel (heads outermost, longest causal sweep
// first within a head), so the CTAs that finish early take the short tiles of the tail. The
// producer warp computes a tile's metadata and loads its Q by TMA (3D map over [n_q, h_q, d], box
// 64 columns x g heads x 128 / g tokens: exactly the tile's 128 rows, row = token * g + head) into
// one of two Q buffers, then streams its K/V tiles through the ring, which runs on across tiles;
// so the barrier set-up is paid once per CTA, and the next tile's Q and first K/V tiles load while
// the consumers finish the current one (last P V, epilogue). Per-tile arithmetic is that of
// dense_fwd_kernel, so the outputs are bitwise the same. Needs a TMA-able q (16-byte aligned base
// and strides); rows of the box past the sequence hold other tokens (or TMA's zeros past n_q) and
// are never written. PINGPONG: the consumer warpgroups take GEMM turns as in dense_fwd_kernel
// (the turn protocol is balanced per tile, so it runs on across tiles unchanged).
template <int D, bool PINGPONG>
__global__ void __launch_bounds__(kDnThreads, 1)
    dense_fwd_persistent_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_k,
                                const __grid_constant__ CUtensorMap tmap_v, const DenseFwdKernelParams p) {
  using namespace dn_detail;
  constexpr int S = dn_stages<D>();
  constexpr DnPersistLayout lay = dn_persist_layout(D, S);
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const unsigned full = 0xffffffffu;
  const int g = 1 << p.log2_g;

  const uint32_t s_base = smem_addr(smem);
  const uint32_t sq = s_base + lay.q, sk = s_base + lay.k, sv = s_base + lay.v;
  int* row_p = reinterpret_cast<int*>(smem + lay.row_p);
  int* row_tok = reinterpret_cast<int*>(smem + lay.row_tok);
  int* info = reinterpret_cast<int*>(smem + lay.info);
  const uint32_t bar_k = s_base + lay.bar_k, bar_v = s_base + lay.bar_v;
  const uint32_t bar_free_k = s_base + lay.bar_free_k, bar_free_v = s_base + lay.bar_free_v;
  const uint32_t bar_q = s_base + lay.bar_q, bar_free_q = s_base + lay.bar_free_q;

  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(bar_k + 8 * s, 1);
      mbar_init(bar_v + 8 * s, 1);
      mbar_init(bar_free_k + 8 * s, kDnConsumers * 4);
      mbar_init(bar_free_v + 8 * s, kDnConsumers * 4);
    }
    // Every thread that wrote (producer lanes: the metadata) or read (consumer threads: their rows'
    // metadata, and Q through wgmma) a buffer arrives itself: an mbarrier arrive releases only the
    // arriving thread's own prior accesses.
    for (int b = 0; b < kDnQBufs; ++b) {
      mbar_init(bar_q + 8 * b, 32);
      mbar_init(bar_free_q + 8 * b, kDnConsumers * 128);
    }
    fence_mbarrier_init();
  }
  __syncthreads();

  const int wg = __shfl_sync(full, tid / 128, 0);
  if (wg == kDnConsumers) {
    setmaxnreg_dec<kDnPersistProducerRegs>();
    if (warp != kDnConsumers * 4) return;
    const int tok_per_tile = kDnBlockM >> p.log2_g;
    const int64_t total = int64_t(p.h_kv) * p.tiles_per_head;
    int s = 0, qb = 0;
    uint32_t phase = 0, qphase = 0;
    for (;;) {
      // A tile is claimed only once the previous one's loads are all issued (about two key tiles
      // before the consumers finish it): claimed any earlier, a long tile could queue behind a
      // long one while other CTAs run dry at the end.
      unsigned next = 0;
      if (lane == 0) next = atomicAdd(p.tile_counter, 1u);
      int64_t tile = __shfl_sync(full, next, 0);
      int head_kv = -1;
      int64_t b = 0, t_in = 0;
      while (tile < total) {
        head_kv = int(tile / p.tiles_per_head);
        const int64_t t = int64_t(p.tiles_per_head) - 1 - (tile - int64_t(head_kv) * p.tiles_per_head);
        t_in = t;
        if (p.tile_start == nullptr) break;
        if (t < p.tile_start[p.batch]) {
          b = find_seq(p.tile_start, p.batch, t);
          t_in = t - p.tile_start[b];
          break;
        }
        // The grid over-counts by up to one tile per sequence: claim another.
        head_kv = -1;
        if (lane == 0) next = atomicAdd(p.tile_counter, 1u);
        tile = __shfl_sync(full, next, 0);
      }
      mbar_wait(bar_free_q + 8 * qb, qphase ^ 1);
      int* rp = row_p + qb * kDnBlockM;
      int* rt = row_tok + qb * kDnBlockM;
      int* inf = info + qb * 4;
      if (head_kv < 0) {
        // No tile left: tell the consumers to stop.
        if (lane == 0) inf[0] = -1;
        mbar_arrive(bar_q + 8 * qb);
        break;
      }
      const SeqRows sr = seq_rows(p.cu_q, p.cu_k, b, p.n_q, p.n_k);
      const int64_t tok0 = sr.q_lo + t_in * tok_per_tile;
      int pmax = -1, pmin = INT_MAX;
      for (int r = lane; r < kDnBlockM; r += 32) {
        const int64_t tok = tok0 + (r >> p.log2_g);
        int pos = -1, tk = -1;
        if (tok < sr.q_hi) {
          pos = int(query_pos(p.q_pos, sr, tok));
          tk = int(tok);
          pmax = max(pmax, pos);
          pmin = min(pmin, pos);
        }
        rp[r] = pos;
        rt[r] = tk;
      }
      pmax = __reduce_max_sync(full, pmax);
      pmin = __reduce_min_sync(full, pmin);
      const int n_kt = pmax >= 0 ? pmax / kDnBlockN + 1 : 0;
      if (lane == 0) {
        inf[0] = head_kv;
        inf[1] = n_kt;
        inf[2] = n_kt > 0 ? (pmin + 1) / kDnBlockN : 0;
      }
      if (lane != 0) mbar_arrive(bar_q + 8 * qb);
      if (lane == 0) {
        mbar_arrive_expect_tx(bar_q + 8 * qb, lay.q_bytes);
#pragma unroll
        for (int a = 0; a < D / kDnAtom; ++a)
          tma_load_3d(sq + qb * lay.q_bytes + a * (kDnBlockM * 128), &tmap_q, a * kDnAtom, head_kv * g, int(tok0),
                      bar_q + 8 * qb);
        const int k_lo = int(sr.k_lo);
        for (int j = 0; j < n_kt; ++j) {
          const int key_row = k_lo + j * kDnBlockN;
          mbar_wait(bar_free_k + 8 * s, phase ^ 1);
          mbar_arrive_expect_tx(bar_k + 8 * s, lay.stage_bytes);
#pragma unroll
          for (int a = 0; a < D / kDnAtom; ++a)
            tma_load_3d(sk + s * lay.stage_bytes + a * (kDnBlockN * 128), &tmap_k, a * kDnAtom, head_kv, key_row,
                        bar_k + 8 * s);
          mbar_wait(bar_free_v + 8 * s, phase ^ 1);
          mbar_arrive_expect_tx(bar_v + 8 * s, lay.stage_bytes);
#pragma unroll
          for (int a = 0; a < D / kDnAtom; ++a)
            tma_load_3d(sv + s * lay.stage_bytes + a * (kDnBlockN * 128), &tmap_v, a * kDnAtom, head_kv, key_row,
                        bar_v + 8 * s);
          if (++s == S) {
            s = 0;
            phase ^= 1;
          }
        }
      }
      __syncwarp();
      if (++qb == kDnQBufs) {
        qb = 0;
        qphase ^= 1;
      }
    }
  } else {
    setmaxnreg_inc<kDnPersistConsumerRegs>();
    const int row0 = wg * kDnRowsPerConsumer + (warp & 3) * 16 + (lane >> 2);  // rows row0 and row0 + 8
    const int q4 = lane & 3;
    int s = 0, qb = 0;
    uint32_t phase = 0, qphase = 0;
    for (;;) {
      mbar_wait(bar_q + 8 * qb, qphase);
      const int* inf = info + qb * 4;
      // Lane 0's copy, so that ptxas sees warp-uniform bounds (C7518).
      const int head_kv = __shfl_sync(full, inf[0], 0);
      if (head_kv < 0) break;
      const int n_kt = __shfl_sync(full, inf[1], 0);
      const int n_full = __shfl_sync(full, inf[2], 0);
      const int pos[2] = {row_p[qb * kDnBlockM + row0], row_p[qb * kDnBlockM + row0 + 8]};
      const int tok[2] = {row_tok[qb * kDnBlockM + row0], row_tok[qb * kDnBlockM + row0 + 8]};
      const uint32_t q_wg = sq + qb * lay.q_bytes + uint32_t(wg * kDnRowsPerConsumer) * 128;

      float o[D / 2];
#pragma unroll
      for (int e = 0; e < D / 2; ++e) o[e] = 0.f;
      float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
      if (n_kt > 0)
        consume_tile<D, PINGPONG>(o, m, l, q_wg, sk, sv, lay.stage_bytes, bar_k, bar_v, bar_free_k, bar_free_v, pos, n_kt,
                               n_full, q4, lane, wg, p.scale_log2, s, phase);
      // Q and the metadata are no longer read: the producer may fill this buffer with the tile
      // after next while this warp stores its rows.
      mbar_arrive(bar_free_q + 8 * qb);
      store_tile<D>(o, m, l, tok, row0, head_kv, g, q4, p);
      if (++qb == kDnQBufs) {
        qb = 0;
        qphase ^= 1;
      }
    }
  }
}

// Host launcher of one configuration; defined here, instantiated in dense_fwd_d{64,128}.cu.
template <int D, bool PINGPONG>
void launch_dense_fwd(const CUtensorMap& tmap_k, const CUtensorMap& tmap_v, const DenseFwdKernelParams& kp,
                      cudaStream_t stream) {
  constexpr int S = dn_stages<D>();
  const size_t bytes = size_t(dn_smem_layout(D, S).total) + 1024;  // + base alignment
  auto kernel = dense_fwd_kernel<D, PINGPONG>;
  ensure_smem(kDenseFwdOp, reinterpret_cast<const void*>(kernel), bytes);
  const int64_t grid = int64_t(kp.h_kv) * kp.tiles_per_head;
  kernel<<<dim3(unsigned(grid)), dim3(kDnThreads), bytes, stream>>>(tmap_k, tmap_v, kp);
  check_cuda(kDenseFwdOp, cudaGetLastError(), "kernel launch failed");
}

// Host launcher of the persistent kernel (grid CTAs, at most one per SM); same instantiation files.
template <int D, bool PINGPONG>
void launch_dense_fwd_persistent(const CUtensorMap& tmap_q, const CUtensorMap& tmap_k, const CUtensorMap& tmap_v,
                                 const DenseFwdKernelParams& kp, int grid, cudaStream_t stream) {
  constexpr int S = dn_stages<D>();
  const size_t bytes = size_t(dn_persist_layout(D, S).total) + 1024;  // + base alignment
  auto kernel = dense_fwd_persistent_kernel<D, PINGPONG>;
  ensure_smem(kDenseFwdOp, reinterpret_cast<const void*>(kernel), bytes);
  kernel<<<dim3(unsigned(grid)), dim3(kDnThreads), bytes, stream>>>(tmap_q, tmap_k, tmap_v, kp);
  check_cuda(kDenseFwdOp, cudaGetLastError(), "kernel launch failed");
}

}  // namespace msa::cuda
