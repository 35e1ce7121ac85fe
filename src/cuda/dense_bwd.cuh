// dense_bwd.cuh — the main kernel of the CUDA dense causal GQA attention backward for sm_90a
// (KV-outer, FlashAttention-2/3 structure: a CTA keeps one 128-key K/V block of one kv head and
// its dk, dv accumulators in registers and sweeps the query tiles of all g heads of the group
// that see the block; dq partials go to an fp32 accumulator by TMA reduce-add) and its launcher
// template. Instantiated per head dim in dense_bwd_d64.cu / dense_bwd_d128.cu; pre- and
// post-processing and the host side in dense_bwd_host.cu. Design: docs/dense_backward.md.
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
constexpr const char* kDenseBwdOp = "dense_attention_backward";

// ---- tile shapes -------------------------------------------------------------------------------
// kDbBlockM, kDbBlockN, kDbConsumers and the stage count fix register and shared-memory layouts;
// the register split only moves speed.

// Query rows (tokens of one head) per step. Each consumer holds S^T and dP^T [64 keys x 64 rows]
// (32 fp32 each) beside dk and dv [64 keys x d] (d / 2 each): 64 rows is what fits 240 registers
// at d = 128 with two m64 accumulators.
constexpr int kDbBlockM = 64;
// Keys per CTA: two consumer warpgroups of one wgmma M (64 keys) each. The dq product contracts
// over all 128, so every dq partial written to the accumulator sums 128 keys.
constexpr int kDbBlockN = 128;
constexpr int kDbConsumers = 2;
constexpr int kDbKeysPerConsumer = kDbBlockN / kDbConsumers;
// Consumers + one producer warpgroup (registers are granted per warpgroup).
constexpr int kDbThreads = (kDbConsumers + 1) * 128;
// setmaxnreg split: dk, dv (2 x 64), S, dP (2 x 32), two bf16 fragments (2 x 16) and addressing
// at d = 128; the producer warp loads positions and per-row statistics besides issuing TMA.
constexpr int kDbConsumerRegs = 240;
constexpr int kDbProducerRegs = 24;
// Q/dO ring depth: a d = 128 stage is 32 KB and K, V, the dS double buffer and the dq staging take
// 128 KB, so two stages fit; d = 64 stages are half the size and half the work, so three.
template <int D>
constexpr int db_stages() {
  return D == 64 ? 3 : 2;
}
// bf16 elements per 128-byte swizzle row (the TMA box width and the wgmma SW128 atom).
constexpr int kDbAtom = 64;
// fp32 dq staging tile per consumer: 64 rows x 64 columns, as two 128-byte-swizzled boxes of 32
// columns (the reduce-add's TMA box; the swizzle spreads a warp's stores over the banks).
constexpr int kDbDqCols = 64;
constexpr int kDbDqBoxCols = 32;

// Everything the main kernel reads besides the tensor maps.
struct DenseBwdKernelParams {
  int64_t n_q = 0, n_k = 0, batch = 1;
  int h_q = 0, h_kv = 0, log2_g = 0;
  const int32_t* cu_q = nullptr;        // [batch+1] device, or null (one sequence)
  const int32_t* cu_k = nullptr;        // [batch+1] device, or null (then cu_q)
  const int32_t* q_pos = nullptr;       // [n_q] device, or null (bottom-right aligned)
  const int32_t* tile_start = nullptr;  // [batch+1] device: first key tile of each sequence; null iff no cu array
  int tiles_per_head = 0;               // grid = h_kv * tiles_per_head (an upper bound when tile_start is set)
  const float2* row_stats = nullptr;    // [h_q, n_q]: (lse * log2(e), rowsum(do * o)) per (head, token)
  float* dq_acc = nullptr;              // [h_q, n_q, d] fp32, zeroed; dq / scale accumulates here
  uint16_t* dk = nullptr;               // [n_k, h_kv, d] bf16 bits
  int64_t stride_dk_tok = 0, stride_dk_head = 0;
  uint16_t* dv = nullptr;  // [n_k, h_kv, d] bf16 bits
  int64_t stride_dv_tok = 0, stride_dv_head = 0;
  int dkv_vec = 0;          // element pairs of dk and dv are 4-byte aligned: bf16x2 stores
  int dq_mode = 0;          // 0: TMA reduce-add, 1: red.global.add, 2: ordered (deterministic)
  int* dq_order = nullptr;  // [h_q, n_q, 2] zeroed turn counters of the ordered mode, else null
  float scale = 0.f;        // softmax scale (folded into dk here, into dq by the post-pass)
  float scale_log2 = 0.f;   // scale * log2(e): P = 2^(s * scale_log2 - lse * log2(e))
};

// Shared-memory map, identical on host (sizing) and device. Every operand tile starts at a multiple
// of 1024 bytes from a 1024-aligned base, as the 128-byte swizzle needs.
struct DbSmemLayout {
  uint32_t k, v, q, dout, tile_bytes, ds, ds_bytes, dq, dq_bytes, info, info_bytes, bar_full, bar_free, bar_kv, total;
};

__host__ __device__ constexpr DbSmemLayout db_smem_layout(int d, int stages) {
  DbSmemLayout l{};
  uint32_t off = 0;
  l.k = off;
  off += uint32_t(kDbBlockN) * d * 2;
  l.v = off;
  off += uint32_t(kDbBlockN) * d * 2;
  l.tile_bytes = uint32_t(kDbBlockM) * d * 2;
  l.q = off;
  off += uint32_t(stages) * l.tile_bytes;
  l.dout = off;
  off += uint32_t(stages) * l.tile_bytes;
  l.ds_bytes = uint32_t(kDbBlockN) * kDbBlockM * 2;  // dS^T [128 keys][64 rows] bf16
  l.ds = off;
  off += 2 * l.ds_bytes;
  l.dq_bytes = uint32_t(kDbBlockM) * kDbDqCols * 4;
  l.dq = off;
  off += kDbConsumers * l.dq_bytes;
  // Per stage: (lse2, delta) float2 [64], position int [64], the tile's max position.
  l.info_bytes = kDbBlockM * 8 + kDbBlockM * 4 + 16;
  l.info = off;
  off += uint32_t(stages) * l.info_bytes;
  l.bar_full = off;
  off += uint32_t(stages) * 8;
  l.bar_free = off;
  off += uint32_t(stages) * 8;
  l.bar_kv = off;
  off += 8;
  l.total = off;
  return l;
}

namespace db_detail {

using namespace hopper;

// D[64 x 64] (+)= A[64 x 16] B[16 x 64], both operands MN-major in shared memory (imm-trans-a =
// imm-trans-b = 1): A is dS stored key-major (its M = query rows contiguous), B is K as TMA left it
// (its N = head dim contiguous).
__device__ __forceinline__ void wgmma_m64n64k16_ss_tt(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {
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
      : "l"(da), "l"(db), "r"(scale_d));
}

// acc[64 x 64] = A[64 x D] B[64 x D]^T, both K-major SW128 tiles of D / 64 atoms; an atom of A has
// A_ROWS rows and one of B has 64 (A may be a 64-row slice of its tile). One commit.
template <int D, int A_ROWS>
__device__ __forceinline__ void chain_m64n64(float (&acc)[32], uint32_t a_tile, uint32_t b_tile) {
  fence_acc(acc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t a = a_tile + (kk / 4) * (A_ROWS * 128) + (kk % 4) * 32;
    const uint32_t b = b_tile + (kk / 4) * (kDbBlockM * 128) + (kk % 4) * 32;
    wgmma_m64n64k16(acc, sw128_desc(a), sw128_desc(b), kk > 0 ? 1 : 0);
  }
  wgmma_commit();
}

// acc[64 keys x D] += F[64 keys x 64 rows] T[64 rows x D]: F from registers (four k16 fragments of
// the m64n64 accumulator layout), T a Q or dO stage tile, MN-major for this product (rows of
// 128 bytes along D, 64 columns per atom of 64 rows).
template <int D>
__device__ __forceinline__ void issue_rs(float (&acc)[D / 2], uint32_t (&f)[16], uint32_t tile) {
  fence_acc(acc);
  fence_regs(f);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kDbBlockM / 16; ++kk) {
    const uint32_t a[4] = {f[4 * kk], f[4 * kk + 1], f[4 * kk + 2], f[4 * kk + 3]};
    const uint64_t db = sw128_desc_mn(tile + kk * 16 * 128, kDbBlockM * 128);
    if constexpr (D == 128)
      wgmma_m64n128k16_rs(acc, a, db, 1);
    else
      wgmma_m64n64k16_rs(acc, a, db, 1);
  }
  wgmma_commit();
}

// TMA reduce-add of a shared-memory tile into global memory (bulk async group of this thread).
__device__ __forceinline__ void tma_reduce_add_3d(const CUtensorMap* map, uint32_t src, int x, int y, int z) {
  asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(src), "r"(x), "r"(y), "r"(z)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Waits until this thread's bulk groups have finished reading shared memory (the source may be
// overwritten) / have completed.
__device__ __forceinline__ void bulk_wait_read0() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
__device__ __forceinline__ void bulk_wait0() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

}  // namespace db_detail

// One CTA: keys [128 t, 128 t + 128) of one sequence and kv head head_kv, against the query tiles
// of that sequence that can see them, for each of the g query heads of the group (head fastest, so
// the CTAs of one kv head walk the same query tiles). Warpgroups 0-1 are consumers (64 keys each);
// warp 8 is the producer: it loads K and V once, then per step one Q and one dO tile (TMA, 3D maps
// over [n, h, d]) and the tile's positions and row statistics (plain loads), and marks a step whose
// rows all lie before the keys (possible only with explicit q_pos) as skipped.
//
// Per step and consumer warpgroup (keys K_w = its 64 keys): S^T = K_w Q^T and dP^T = V_w dO^T
// (SS), P^T = 2^(S^T scale_log2 - lse2) masked to keys <= the row's position, dV += P^T dO (RS),
// dS^T = P^T (dP^T - delta), dK += dS^T Q (RS); dS^T also goes to shared memory (bf16) where,
// after both warpgroups wrote theirs, dQ = dS K (SS, both operands transposed) contracts all 128
// keys: at d = 128 each warpgroup computes 64 of the columns, at d = 64 the warpgroups alternate.
template <int D>
__global__ void __launch_bounds__(kDbThreads, 1)
    dense_bwd_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_do,
                     const __grid_constant__ CUtensorMap tmap_k, const __grid_constant__ CUtensorMap tmap_v,
                     const __grid_constant__ CUtensorMap tmap_dq, const DenseBwdKernelParams p) {
  using namespace db_detail;
  constexpr int S = db_stages<D>();
  constexpr DbSmemLayout lay = db_smem_layout(D, S);
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const unsigned full = 0xffffffffu;
  const int g = 1 << p.log2_g;

  // Which key tile: tile-major with the kv heads interleaved, so the first wave holds the first
  // key tiles of every head, which see the most query tiles under the causal mask (longest first:
  // the short ones fill the tail; heads outermost left a head's longest tiles for a second wave).
  const int head_kv = int(blockIdx.x % unsigned(p.h_kv));
  const int64_t t = int64_t(blockIdx.x / unsigned(p.h_kv));
  int64_t b = 0, t_in = t;
  if (p.tile_start != nullptr) {
    if (t >= p.tile_start[p.batch]) return;  // the grid over-counts by up to one tile per sequence
    b = find_seq(p.tile_start, p.batch, t);
    t_in = t - p.tile_start[b];
  }
  const SeqRows sr = seq_rows(p.cu_q, p.cu_k, b, p.n_q, p.n_k);
  const int64_t len_q = sr.q_hi - sr.q_lo, len_k = sr.k_hi - sr.k_lo;
  const int kpos0 = int(t_in * kDbBlockN);  // position of the CTA's first key in its sequence
  const int n_qt = int((len_q + kDbBlockM - 1) / kDbBlockM);
  // Without q_pos positions grow with the row (p = len_k - len_q + row), so the rows before the
  // first one that reaches kpos0 are skipped here; with q_pos every tile is visited and the
  // producer marks the tiles whose max position is below kpos0.
  int qt0 = 0;
  if (p.q_pos == nullptr) {
    const int64_t first = int64_t(kpos0) - (len_k - len_q);
    qt0 = first <= 0 ? 0 : int(min(first / kDbBlockM, int64_t(n_qt)));
  }
  const int n_it = (n_qt - qt0) << p.log2_g;
  // Query tiles are walked from the last down to qt0: the CTAs of a wave all start at the end of
  // their sequence and move in step, so a Q / dO tile read from HBM serves them all from L2.
  const int qt_last = n_qt - 1;

  const uint32_t s_base = smem_addr(smem);
  const uint32_t sk = s_base + lay.k, sv = s_base + lay.v, sq = s_base + lay.q, sdo = s_base + lay.dout;
  const uint32_t bar_full = s_base + lay.bar_full, bar_free = s_base + lay.bar_free, bar_kv = s_base + lay.bar_kv;

  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(bar_full + 8 * s, 32);  // every producer lane, after its info stores
      // Every consumer thread arrives after its last read of the stage's info (per-thread, not per
      // warp after __syncwarp, so that compute-sanitizer's racecheck sees the ordering too).
      mbar_init(bar_free + 8 * s, kDbConsumers * 128);
    }
    mbar_init(bar_kv, 1);
    fence_mbarrier_init();
  }
  __syncthreads();

  // Broadcast so that ptxas sees warp-uniform roles (a wgmma under a branch it cannot prove
  // uniform is serialized).
  const int wg = __shfl_sync(full, tid / 128, 0);

  if (wg == kDbConsumers) {
    setmaxnreg_dec<kDbProducerRegs>();
    if (warp == kDbConsumers * 4) {
      if (lane == 0 && n_it > 0) {
        mbar_arrive_expect_tx(bar_kv, 2 * lay.tile_bytes * (kDbBlockN / kDbBlockM));
        const int key_row = int(sr.k_lo) + kpos0;
#pragma unroll
        for (int a = 0; a < D / kDbAtom; ++a) {
          tma_load_3d(sk + a * (kDbBlockN * 128), &tmap_k, a * kDbAtom, head_kv, key_row, bar_kv);
          tma_load_3d(sv + a * (kDbBlockN * 128), &tmap_v, a * kDbAtom, head_kv, key_row, bar_kv);
        }
      }
      int s = 0;
      uint32_t phase = 0;
      for (int it = 0; it < n_it; ++it) {
        const int tile = qt_last - (it >> p.log2_g);
        const int h = head_kv * g + (it & (g - 1));
        const int64_t tok0 = sr.q_lo + int64_t(tile) * kDbBlockM;
        mbar_wait(bar_free + 8 * s, phase ^ 1);
        uint8_t* info = smem + lay.info + s * lay.info_bytes;
        float2* st = reinterpret_cast<float2*>(info);
        int* pos_s = reinterpret_cast<int*>(info + kDbBlockM * 8);
        int pmax = -1;
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int r = lane + 32 * u;
          const int64_t tok = tok0 + r;
          int pos = -1;
          float2 v = make_float2(0.f, 0.f);
          // Rows past the sequence (the next sequence's, or past n_q) see nothing: position -1.
          if (tok < sr.q_hi) {
            pos = int(query_pos(p.q_pos, sr, tok));
            v = p.row_stats[int64_t(h) * p.n_q + tok];
          }
          st[r] = v;
          pos_s[r] = pos;
          pmax = max(pmax, pos);
        }
        pmax = __reduce_max_sync(full, pmax);
        if (lane == 0) {
          reinterpret_cast<int*>(info + kDbBlockM * 12)[0] = pmax;
          if (pmax >= kpos0) {
            mbar_arrive_expect_tx(bar_full + 8 * s, 2 * lay.tile_bytes);
#pragma unroll
            for (int a = 0; a < D / kDbAtom; ++a) {
              tma_load_3d(sq + s * lay.tile_bytes + a * (kDbBlockM * 128), &tmap_q, a * kDbAtom, h, int(tok0),
                          bar_full + 8 * s);
              tma_load_3d(sdo + s * lay.tile_bytes + a * (kDbBlockM * 128), &tmap_do, a * kDbAtom, h, int(tok0),
                          bar_full + 8 * s);
            }
          } else {
            mbar_arrive(bar_full + 8 * s);
          }
        } else {
          mbar_arrive(bar_full + 8 * s);
        }
        if (++s == S) {
          s = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }

  setmaxnreg_inc<kDbConsumerRegs>();
  const int wr = (warp & 3) * 16 + (lane >> 2);  // this thread's key rows wr, wr + 8 of the warpgroup's 64
  const int q4 = lane & 3;
  const int kp[2] = {kpos0 + wg * kDbKeysPerConsumer + wr, kpos0 + wg * kDbKeysPerConsumer + wr + 8};
  const uint32_t k_wg = sk + uint32_t(wg * kDbKeysPerConsumer) * 128;
  const uint32_t v_wg = sv + uint32_t(wg * kDbKeysPerConsumer) * 128;
  const float scale_log2 = p.scale_log2;
  const bool leader = (tid & 127) == 0;

  float dv[D / 2], dk[D / 2];
#pragma unroll
  for (int e = 0; e < D / 2; ++e) dv[e] = dk[e] = 0.f;

  if (n_it > 0) mbar_wait(bar_kv, 0);
  // Every step retires all its GEMMs before the loop back-edge (a wgmma in flight across it, or
  // dq held in registers beside the next step's S^T and dP^T, made ptxas spill at d = 128 and
  // serialize the wgmma pipeline). The dq write-out is split so that little of it waits: the
  // partial is stored to the staging buffer at the end of a step, and the TMA reduce-add of it is
  // issued at the start of the next, after that step's S^T and dP^T GEMMs.
  int it = 0, s = 0;
  uint32_t phase = 0;
  auto advance = [&](int& it_, int& s_, uint32_t& phase_) {
    ++it_;
    if (++s_ == S) {
      s_ = 0;
      phase_ ^= 1;
    }
  };
  // Moves (it_, s_, phase_) to the first step at or after it_ that runs; false when none is left.
  // A step whose rows all lie before the keys (explicit q_pos only) is released unread.
  auto next_runnable = [&](int& it_, int& s_, uint32_t& phase_) -> bool {
    while (it_ < n_it) {
      mbar_wait(bar_full + 8 * s_, phase_);
      const uint8_t* info = smem + lay.info + s_ * lay.info_bytes;
      const int pmax = __shfl_sync(full, reinterpret_cast<const int*>(info + kDbBlockM * 12)[0], 0);
      if (pmax >= kpos0) return true;
      mbar_arrive(bar_free + 8 * s_);
      advance(it_, s_, phase_);
    }
    return false;
  };
  const uint32_t stg = s_base + lay.dq + uint32_t(wg) * lay.dq_bytes;  // this warpgroup's dq staging
  // Steps that ran: they alternate the dS buffers and, at d = 64, the warpgroup that computes dQ.
  // Counting only these keeps a named barrier between two writes of one buffer.
  int n_run = 0;
  bool have = next_runnable(it, s, phase);
  // The staged dq partial of the previous step, waiting for its reduce-add.
  bool dq_pending = false;
  int dq_tok0 = 0, dq_h = 0;
  auto flush_dq = [&] {
    if (dq_pending) {
      named_bar_sync(2 + wg, 128);  // every thread of the warpgroup has staged its part
      if (leader) {
        const int col0 = D == 128 ? wg * kDbDqCols : 0;
        tma_reduce_add_3d(&tmap_dq, stg, col0, dq_tok0, dq_h);
        tma_reduce_add_3d(&tmap_dq, stg + kDbBlockM * 128, col0 + kDbDqBoxCols, dq_tok0, dq_h);
        bulk_commit();
      }
      dq_pending = false;
    }
  };
  while (have) {
    const int tile = qt_last - (it >> p.log2_g);
    const int h = head_kv * g + (it & (g - 1));
    const int64_t tok0 = sr.q_lo + int64_t(tile) * kDbBlockM;
    const uint8_t* info = smem + lay.info + s * lay.info_bytes;
    const float2* st = reinterpret_cast<const float2*>(info);
    const int* pos_s = reinterpret_cast<const int*>(info + kDbBlockM * 8);
    const uint32_t q_s = sq + s * lay.tile_bytes, do_s = sdo + s * lay.tile_bytes;
    float sacc[32], dpacc[32];
    chain_m64n64<D, kDbBlockN>(sacc, k_wg, q_s);
    chain_m64n64<D, kDbBlockN>(dpacc, v_wg, do_s);
    flush_dq();
    wgmma_wait<1>();  // S^T done (dP^T may still run)
    fence_acc(sacc);
    // P^T: accumulator element jj * 4 + i * 2 + c is key row wr + 8 i, query column
    // 8 jj + 2 q4 + c. Masked entries are selected to 0 (never multiplied), so a row that sees
    // no key (lse = -inf) gives no inf and no NaN.
    uint32_t pf[16];
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      const int col = 8 * jj + 2 * q4;
      const float4 lt = *reinterpret_cast<const float4*>(st + col);  // (lse2, delta) of col, col + 1
      const int2 pc = *reinterpret_cast<const int2*>(pos_s + col);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float p0 = kp[i] <= pc.x ? ex2_approx(fmaf(sacc[jj * 4 + i * 2], scale_log2, -lt.x)) : 0.f;
        const float p1 = kp[i] <= pc.y ? ex2_approx(fmaf(sacc[jj * 4 + i * 2 + 1], scale_log2, -lt.z)) : 0.f;
        sacc[jj * 4 + i * 2] = p0;
        sacc[jj * 4 + i * 2 + 1] = p1;
        pf[jj * 2 + i] = pack_bf16(p0, p1);
      }
    }
    issue_rs<D>(dv, pf, do_s);  // dV += P^T dO
    wgmma_wait<1>();            // dP^T done (dV may still run)
    fence_acc(dpacc);
    uint32_t dsf[16];
    const uint32_t ds_buf = s_base + lay.ds + uint32_t(n_run & 1) * lay.ds_bytes;
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      const int col = 8 * jj + 2 * q4;
      const float4 lt = *reinterpret_cast<const float4*>(st + col);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float d0 = sacc[jj * 4 + i * 2] * (dpacc[jj * 4 + i * 2] - lt.y);
        const float d1 = sacc[jj * 4 + i * 2 + 1] * (dpacc[jj * 4 + i * 2 + 1] - lt.w);
        dsf[jj * 2 + i] = pack_bf16(d0, d1);
        // dS^T row = key (of the CTA's 128), 64 query columns = one 128-byte swizzled row: the
        // MN-major A operand of dQ = dS K. Column pair (col, col + 1) sits in 16-byte chunk jj.
        const int key = wg * kDbKeysPerConsumer + wr + 8 * i;
        const uint32_t addr = ds_buf + key * 128 + ((jj ^ (key & 7)) * 16) + q4 * 4;
        asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(dsf[jj * 2 + i]) : "memory");
      }
    }
    issue_rs<D>(dk, dsf, q_s);  // dK += dS^T Q
    // The reduce-add issued at the start of this step has read the staging buffer before anyone
    // passes the barrier below, after which this step's partial may be staged.
    if (leader) bulk_wait_read0();
    fence_proxy_async();
    named_bar_sync(1, kDbConsumers * 128);  // both halves of dS^T are in shared memory
    const bool do_dq = D == 128 || wg == (n_run & 1);
    ++n_run;
    float dq[32];
    if (do_dq) {
      // dQ[64 rows x 64 cols] = dS[64 x 128 keys] K[128 keys x 64 cols]; at d = 128 this
      // warpgroup's columns are K's atom wg.
      const uint32_t k_cols = sk + (D == 128 ? uint32_t(wg) * (kDbBlockN * 128) : 0u);
      fence_acc(dq);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kDbBlockN / 16; ++kk)
        wgmma_m64n64k16_ss_tt(dq, sw128_desc_mn(ds_buf + kk * 16 * 128, kDbBlockN * 128),
                              sw128_desc_mn(k_cols + kk * 16 * 128, kDbBlockN * 128), kk > 0 ? 1 : 0);
      wgmma_commit();
    }
    wgmma_wait<0>();
    fence_acc(dv);
    fence_acc(dk);
    fence_regs(pf);
    fence_regs(dsf);
    mbar_arrive(bar_free + 8 * s);  // Q, dO and the stage's info are read
    if (do_dq) {
      fence_acc(dq);
      const int col0 = D == 128 ? wg * kDbDqCols : 0;
      const int qrow = (warp & 3) * 16 + (lane >> 2);  // accumulator rows qrow, qrow + 8 (query rows)
      if (p.dq_mode == 1) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int64_t tok = tok0 + qrow + 8 * i;
          if (tok >= sr.q_hi) continue;
          float* dst = p.dq_acc + (int64_t(h) * p.n_q + tok) * D + col0;
#pragma unroll
          for (int jj = 0; jj < 8; ++jj)
            atomicAdd(reinterpret_cast<float2*>(dst + 8 * jj + 2 * q4),
                      make_float2(dq[jj * 4 + i * 2], dq[jj * 4 + i * 2 + 1]));
        }
      } else if (p.dq_mode == 2) {
        // Deterministic: the key tiles that see this query tile add their partials in key-tile
        // order, so every element sums the same terms in the same order on every run. Key tile
        // t_in is next once t_in partials are in: the tiles that see a query tile are exactly key
        // tiles 0 .. J (a tile seen by key tile j is seen by every j' < j), and each adds once.
        // A CTA only waits for CTAs of lower blockIdx (same head, lower key tile), which were
        // scheduled first, so the chain always ends.
        int* turn = p.dq_order + ((int64_t(h) * p.n_q + tok0) * 2 + (D == 128 ? wg : 0));
        if (leader) {
          int seen;
          do {
            asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(seen) : "l"(turn) : "memory");
          } while (seen != int(t_in));
        }
        named_bar_sync(2 + wg, 128);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int64_t tok = tok0 + qrow + 8 * i;
          if (tok >= sr.q_hi) continue;
          float* dst = p.dq_acc + (int64_t(h) * p.n_q + tok) * D + col0;
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) {
            float2* a = reinterpret_cast<float2*>(dst + 8 * jj + 2 * q4);
            float2 v = __ldcg(a);  // L2: the previous tile's sum, never a stale L1 line
            v.x += dq[jj * 4 + i * 2];
            v.y += dq[jj * 4 + i * 2 + 1];
            __stcg(a, v);
          }
        }
        __threadfence();
        named_bar_sync(2 + wg, 128);
        if (leader) asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(turn) : "memory");
      } else {
        // Stage the [64 rows][64 cols] fp32 partial as two [64 rows][128 bytes] boxes in the
        // 128-byte swizzle: columns 8 jj + 2 q4 + {0, 1} are 16-byte chunk 2 (jj % 4) + q4 / 2 of
        // box jj / 4, at byte 8 (q4 % 2). (Unswizzled 256-byte rows put a warp's four rows of a
        // store phase on the same banks.) Rows past the sequence hold exact zeros (dS = 0 there),
        // so adding them to the next sequence's rows changes nothing; rows past n_q are clipped.
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) {
            const int row = qrow + 8 * i, chunk = 2 * (jj & 3) + (q4 >> 1);
            const uint32_t addr = stg + uint32_t(jj >> 2) * (kDbBlockM * 128) + uint32_t(row) * 128 +
                                  uint32_t((chunk ^ (row & 7)) << 4) + uint32_t(q4 & 1) * 8;
            asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(dq[jj * 4 + i * 2]),
                         "f"(dq[jj * 4 + i * 2 + 1])
                         : "memory");
          }
        fence_proxy_async();
        dq_pending = true;
        dq_tok0 = int(tok0);
        dq_h = h;
      }
    }
    advance(it, s, phase);
    have = next_runnable(it, s, phase);
  }
  flush_dq();
  if (leader) bulk_wait0();

    // dk = scale * sum dS^T q (the scale of s = scale <q, k>), dv = sum P^T do. Keys past the
    // sequence (the next sequence's, or TMA zero fill) are not written.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t tok = sr.k_lo + kp[i];
    if (kp[i] >= len_k) continue;
    uint16_t* dst_k = p.dk + tok * p.stride_dk_tok + int64_t(head_kv) * p.stride_dk_head;
    uint16_t* dst_v = p.dv + tok * p.stride_dv_tok + int64_t(head_kv) * p.stride_dv_head;
#pragma unroll
    for (int jj = 0; jj < D / 8; ++jj) {
      const int col = 8 * jj + 2 * q4;
      const float k0 = dk[jj * 4 + i * 2] * p.scale, k1 = dk[jj * 4 + i * 2 + 1] * p.scale;
      const float v0 = dv[jj * 4 + i * 2], v1 = dv[jj * 4 + i * 2 + 1];
      if (p.dkv_vec) {
        *reinterpret_cast<uint32_t*>(dst_k + col) = pack_bf16(k0, k1);
        *reinterpret_cast<uint32_t*>(dst_v + col) = pack_bf16(v0, v1);
      } else {
        dst_k[col] = __bfloat16_as_ushort(__float2bfloat16_rn(k0));
        dst_k[col + 1] = __bfloat16_as_ushort(__float2bfloat16_rn(k1));
        dst_v[col] = __bfloat16_as_ushort(__float2bfloat16_rn(v0));
        dst_v[col + 1] = __bfloat16_as_ushort(__float2bfloat16_rn(v1));
      }
    }
  }
}

// Host launcher of one head dim; defined here, instantiated in dense_bwd_d{64,128}.cu.
template <int D>
void launch_dense_bwd(const CUtensorMap& tmap_q, const CUtensorMap& tmap_do, const CUtensorMap& tmap_k,
                      const CUtensorMap& tmap_v, const CUtensorMap& tmap_dq, const DenseBwdKernelParams& kp,
                      cudaStream_t stream) {
  constexpr int S = db_stages<D>();
  const size_t bytes = size_t(db_smem_layout(D, S).total) + 1024;  // + base alignment
  auto kernel = dense_bwd_kernel<D>;
  ensure_smem(kDenseBwdOp, reinterpret_cast<const void*>(kernel), bytes);
  const int64_t grid = int64_t(kp.h_kv) * kp.tiles_per_head;
  if (grid == 0) return;
  kernel<<<dim3(unsigned(grid)), dim3(kDbThreads), bytes, stream>>>(tmap_q, tmap_do, tmap_k, tmap_v, tmap_dq, kp);
  check_cuda(kDenseBwdOp, cudaGetLastError(), "kernel launch failed");
}

}  // namespace msa::cuda
