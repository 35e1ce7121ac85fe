// decode_attention.cu — CUDA sparse (and dense) decode attention over the paged K/V cache:
// split over the selected blocks across CTAs (partial o, lse per split in the workspace) and an
// lse merge; all g query heads of a group share each K/V page read through mma.sync m16n8k16.
//
// Work item (one CTA, 4 warps): query token i, KV head r, a slice of at most 16 query heads of the
// group (one m16 tile; g > 16 takes several slices), and a split s = the selected blocks
// [s * split, (s + 1) * split) of the token's row (sparse) or of its visible blocks (dense). The
// CTA resolves its blocks (logical block -> page, visible keys) once into shared memory; then each
// warp independently streams 16-key chunks of K and V (chunks w, w + 4, ... of the CTA) through
// its own cp.async ring and keeps a private online softmax, so no CTA barrier stands between
// chunks. The four warps' (m, l, o) are combined in shared memory at the end; a plan with one
// split writes o and lse directly, otherwise a merge kernel combines the splits by their lse.
//
// Device arrays (cu_seqlens_q, seq_lens, block_table, topk_idx) are read only here and clamped:
// a garbage entry gives a garbage result but no access outside the tensors. Keys past a query's
// position (and past seq_lens) are zero-filled in shared memory, never read from the page, so NaN
// in unused slots cannot leak through 0 * NaN.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "common.cuh"
#include "decode.h"
#include "hopper.cuh"
#include "host.h"

namespace msa::cuda {
namespace {

using namespace hopper;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 16;               // keys per pipeline stage of one warp
constexpr int kRows = 16;                // query heads per CTA (one m16 tile)
constexpr int kStageBudget = 96 * 1024;  // ring bytes per CTA: two CTAs per SM
constexpr int kMaxSplit = 1024;          // blocks per CTA at most (shared-memory table of the CTA's blocks)

template <int D>
struct Cfg {
  static constexpr int kStageBytes = 2 * kChunk * D * 2;  // K and V of one chunk
  static constexpr int kStages = kStageBudget / (kWarps * kStageBytes);
  static constexpr int kRing = kWarps * kStages * kStageBytes;
  static constexpr int kReduceBytes = kWarps * kRows * (D + 2) * 4;
  static constexpr int kMain = kRing > kReduceBytes ? kRing : kReduceBytes;
  static_assert(kStages >= 2, "at least double buffering");
};

struct Args {
  const uint16_t* q;
  int64_t stride_q_tok, stride_q_head;
  const uint16_t* k_cache;
  const uint16_t* v_cache;
  const int32_t* block_table;
  const int32_t* seq_lens;
  const int32_t* cu_q;      // null: one request
  const int32_t* topk_idx;  // null: dense
  int64_t n_q, batch, n_pages, max_blocks, bk, h_kv, h_q, g, topk;
  float scale_log2;  // softmax scale times log2(e)
  int split;         // blocks per CTA
  int n_splits;      // CTAs per (token, head slice)
  int n_blocks;      // entries per row: topk (sparse) or max_blocks (dense)
  int m_tiles;       // ceil(g / 16)
  // Direct (one split): o, lse. Split: partials at ws_o [split][ws_n_q][h_q][D], ws_lse [split][ws_n_q][h_q].
  bool direct;
  uint16_t* o;
  int64_t stride_o_tok, stride_o_head;
  float* lse;
  float* ws_o;
  float* ws_lse;
  int64_t ws_n_q;
};

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// c[16 x 8] += a[16 x 16] * b[16 x 8], bf16 in, fp32 accumulate.
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Row of D bf16 in shared memory (D * 2 bytes), 16-byte chunks XOR-swizzled by the row so that
// the 8 rows one ldmatrix reads fall in distinct banks.
template <int D>
__device__ __forceinline__ uint32_t chunk_off(int row, int ch) {
  return uint32_t(row * D * 2 + ((ch ^ (row & 7)) << 4));
}

template <int D>
__global__ void __launch_bounds__(kThreads, 2) decode_attn_kernel(const Args a) {
  using C = Cfg<D>;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* ring = smem;
  int2* blk = reinterpret_cast<int2*>(smem + C::kMain);  // per entry: page, visible keys (0: skip)

  // x: split-major within a token (the splits of one token, then the next token of the request),
  // so neighbouring CTAs tend to read neighbouring pages; y: (KV head, head slice).
  const int s = int(blockIdx.x % unsigned(a.n_splits));
  const int64_t i = blockIdx.x / unsigned(a.n_splits);
  const int r = blockIdx.y / a.m_tiles, mt = blockIdx.y % a.m_tiles;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // The merge grid (launched as a programmatic dependent) may get resident now: it waits for this
  // grid's completion in griddepcontrol.wait, so its launch gap overlaps this grid's tail.
  launch_dependents();
  const int h0 = int(r * a.g + mt * kRows);
  const int rows = int(a.g - mt * kRows < kRows ? a.g - mt * kRows : kRows);

  // The request of token i and its position; p < 0: the token sees nothing.
  int64_t p = -1;
  int64_t b = 0;
  {
    int64_t lo = 0, hi = a.n_q;
    if (a.cu_q) {
      b = find_seq(a.cu_q, a.batch, i);
      lo = clamp64(a.cu_q[b], 0, a.n_q);
      hi = clamp64(a.cu_q[b + 1], lo, a.n_q);
    }
    if (i >= lo && i < hi) {
      const int64_t len = clamp64(a.seq_lens[b], 0, a.max_blocks * a.bk);
      p = len - (hi - lo) + (i - lo);
    }
  }
  const int64_t own = p >= 0 ? p / a.bk : -1;
  const int e0 = s * a.split;
  const int n_e = max(0, min(a.split, a.n_blocks - e0));
  const int32_t* sel = a.topk_idx ? a.topk_idx + (i * a.h_kv + r) * a.topk : nullptr;
  const int32_t* table = a.block_table + b * a.max_blocks;
  for (int e = threadIdx.x; e < n_e; e += kThreads) {
    const int64_t j = sel ? int64_t(sel[e0 + e]) : int64_t(e0 + e);
    int2 v = make_int2(0, 0);
    if (j >= 0 && j <= own) {
      const int32_t page = table[j];
      if (page >= 0 && page < a.n_pages) v = make_int2(page, int(a.bk < p - j * a.bk + 1 ? a.bk : p - j * a.bk + 1));
    }
    blk[e] = v;
  }
  __syncthreads();

  // Q fragments of the slice (rows past the group's heads are zero).
  const int qr = lane >> 2, qc = (lane & 3) * 2;
  uint32_t qa[D / 16][4];
  {
    auto ld = [&](int row, int col) -> uint32_t {
      if (row >= rows) return 0u;
      const uint16_t* src = a.q + i * a.stride_q_tok + int64_t(h0 + row) * a.stride_q_head + col;
      return uint32_t(src[0]) | (uint32_t(src[1]) << 16);
    };
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qa[kk][0] = ld(qr, kk * 16 + qc);
      qa[kk][1] = ld(qr + 8, kk * 16 + qc);
      qa[kk][2] = ld(qr, kk * 16 + 8 + qc);
      qa[kk][3] = ld(qr + 8, kk * 16 + 8 + qc);
    }
  }

  float acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  const int cpb = int(a.bk) / kChunk;  // chunks per block
  const int total = n_e * cpb;
  // Visible keys of chunk c (0: nothing to read).
  auto keys_of = [&](int c) -> int {
    const int2 v = blk[c / cpb];
    return min(kChunk, v.y - (c % cpb) * kChunk);
  };
  auto next = [&](int c) -> int {
    while (c < total && keys_of(c) <= 0) c += kWarps;
    return c;
  };
  uint8_t* wring = ring + warp * C::kStages * C::kStageBytes;
  const int64_t row_stride = a.h_kv * D;  // elements between consecutive tokens of a page
  auto load = [&](int c, int stage) {
    const int2 v = blk[c / cpb];
    const int key0 = (c % cpb) * kChunk, nk = min(kChunk, v.y - key0);
    const int64_t base = (int64_t(v.x) * a.bk + key0) * row_stride + int64_t(r) * D;
    const uint32_t dk = smem_addr(wring + stage * C::kStageBytes), dv = dk + kChunk * D * 2;
    constexpr int kPieces = kChunk * D / 8;  // 16-byte pieces of K (and of V)
#pragma unroll
    for (int u = 0; u < kPieces / 32; ++u) {
      const int idx = lane + 32 * u, row = idx / (D / 8), ch = idx % (D / 8);
      const bool ok = row < nk;
      const int64_t off = ok ? base + row * row_stride + ch * 8 : base;
      cp_async_16(dk + chunk_off<D>(row, ch), a.k_cache + off, ok ? 16 : 0);
      cp_async_16(dv + chunk_off<D>(row, ch), a.v_cache + off, ok ? 16 : 0);
    }
  };

  int prod = next(warp);
  int cons = prod;
#pragma unroll
  for (int st = 0; st < C::kStages - 1; ++st) {
    if (prod < total) {
      load(prod, st);
      prod = next(prod + kWarps);
    }
    cp_async_commit();
  }
  int slot = 0, pslot = C::kStages - 1;
  while (cons < total) {
    if (prod < total) {
      load(prod, pslot);
      prod = next(prod + kWarps);
    }
    cp_async_commit();
    cp_async_wait<C::kStages - 1>();
    __syncwarp();
    const int nk = keys_of(cons);
    const uint32_t sk = smem_addr(wring + slot * C::kStageBytes), sv = sk + kChunk * D * 2;

    float sc[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t) sc[t][0] = sc[t][1] = sc[t][2] = sc[t][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t bf[4];
      const int key = ((lane >> 4) << 3) + (lane & 7), ch = kk * 2 + ((lane >> 3) & 1);
      ldsm_x4(bf, sk + chunk_off<D>(key, ch));
      mma_16816(sc[0], qa[kk], bf[0], bf[1]);
      mma_16816(sc[1], qa[kk], bf[2], bf[3]);
    }
    // Scale, mask the keys past the visible ones, online softmax per row (two rows per thread).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = t * 8 + qc + (e & 1);
        const float x = col < nk ? sc[t][e] * a.scale_log2 : -INFINITY;
        sc[t][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    float resc[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m_run[h], mx[h]);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      resc[h] = ex2_approx(m_run[h] - m_use);
      m_run[h] = m_new;
      mx[h] = m_use;
      l_run[h] *= resc[h];
    }
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = ex2_approx(sc[t][e] - mx[e >> 1]);
        sc[t][e] = pe;
        l_run[e >> 1] += pe;
      }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      acc[n][0] *= resc[0];
      acc[n][1] *= resc[0];
      acc[n][2] *= resc[1];
      acc[n][3] *= resc[1];
    }
    uint32_t pa[4];
    pa[0] = pack_bf16(sc[0][0], sc[0][1]);
    pa[1] = pack_bf16(sc[0][2], sc[0][3]);
    pa[2] = pack_bf16(sc[1][0], sc[1][1]);
    pa[3] = pack_bf16(sc[1][2], sc[1][3]);
#pragma unroll
    for (int nn = 0; nn < D / 16; ++nn) {
      uint32_t bf[4];
      const int key = (((lane >> 3) & 1) << 3) + (lane & 7), ch = nn * 2 + (lane >> 4);
      ldsm_x4_t(bf, sv + chunk_off<D>(key, ch));
      mma_16816(acc[2 * nn], pa, bf[0], bf[1]);
      mma_16816(acc[2 * nn + 1], pa, bf[2], bf[3]);
    }
    __syncwarp();
    cons = next(cons + kWarps);
    slot = slot + 1 == C::kStages ? 0 : slot + 1;
    pslot = pslot + 1 == C::kStages ? 0 : pslot + 1;
  }
  cp_async_wait<0>();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
  }
  __syncthreads();  // every warp is done with its ring: the reduction reuses it

  // Combine the warps: red_o [warp][row][D], red_m / red_l [warp][row].
  float* red_o = reinterpret_cast<float*>(smem);
  float* red_m = red_o + kWarps * kRows * D;
  float* red_l = red_m + kWarps * kRows;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int col = n * 8 + qc;
    red_o[(warp * kRows + qr) * D + col] = acc[n][0];
    red_o[(warp * kRows + qr) * D + col + 1] = acc[n][1];
    red_o[(warp * kRows + qr + 8) * D + col] = acc[n][2];
    red_o[(warp * kRows + qr + 8) * D + col + 1] = acc[n][3];
  }
  if ((lane & 3) == 0) {
    red_m[warp * kRows + qr] = m_run[0];
    red_m[warp * kRows + qr + 8] = m_run[1];
    red_l[warp * kRows + qr] = l_run[0];
    red_l[warp * kRows + qr + 8] = l_run[1];
  }
  __syncthreads();
  constexpr float kLn2 = 0.6931471805599453f;
  for (int e = threadIdx.x; e < rows * D; e += kThreads) {
    const int row = e / D, col = e % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, red_m[w * kRows + row]);
    float L = 0.f, O = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = ex2_approx(red_m[w * kRows + row] - M);
        L += red_l[w * kRows + row] * f;
        O += red_o[(w * kRows + row) * D + col] * f;
      }
    }
    const bool empty = !(L > 0.f);
    const float o = empty ? 0.f : O / L;
    const float lse = empty ? -INFINITY : (M + log2f(L)) * kLn2;
    const int64_t h = h0 + row;
    if (a.direct) {
      a.o[i * a.stride_o_tok + h * a.stride_o_head + col] = __bfloat16_as_ushort(__float2bfloat16_rn(o));
      if (col == 0) a.lse[i * a.h_q + h] = lse;
    } else {
      const int64_t rowi = (int64_t(s) * a.ws_n_q + i) * a.h_q + h;
      if (col == 0) a.ws_lse[rowi] = lse;
      if (!empty) a.ws_o[rowi * D + col] = o;
    }
  }
}

// One warp per (token, head): combine the splits' partial (o, lse). Splits whose lse is -inf
// saw nothing and wrote no o.
template <int D>
__global__ void __launch_bounds__(128)
    decode_merge_kernel(const float* ws_o, const float* ws_lse, int64_t ws_n_q, int n_splits, int64_t n_q, int64_t h_q,
                        uint16_t* o, int64_t stride_o_tok, int64_t stride_o_head, float* lse) {
  const int64_t row = int64_t(blockIdx.x) * 4 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  grid_dependency_wait();  // the partials of the attention grid are complete and visible
  if (row >= n_q * h_q) return;
  const int64_t i = row / h_q, h = row % h_q;
  const int64_t split_stride = ws_n_q * h_q;
  float M = -INFINITY;
  for (int s = lane; s < n_splits; s += 32) M = fmaxf(M, ws_lse[s * split_stride + row]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
  constexpr int kPer = D / 32;
  float acc[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) acc[u] = 0.f;
  float L = 0.f;
  if (M != -INFINITY) {
    for (int s = 0; s < n_splits; ++s) {
      const float ls = ws_lse[s * split_stride + row];
      if (ls == -INFINITY) continue;
      const float w = __expf(ls - M);
      L += w;
      const float* src = ws_o + (s * split_stride + row) * D;
#pragma unroll
      for (int u = 0; u < kPer; ++u) acc[u] += w * src[lane + 32 * u];
    }
  }
  const bool empty = !(L > 0.f);
#pragma unroll
  for (int u = 0; u < kPer; ++u)
    o[i * stride_o_tok + h * stride_o_head + lane + 32 * u] =
        __bfloat16_as_ushort(__float2bfloat16_rn(empty ? 0.f : acc[u] / L));
  if (lane == 0) lse[row] = empty ? -INFINITY : M + logf(L);
}

int num_sms() {
  int dev = 0, n = 0;
  check_cuda("decode_attention", cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda("decode_attention", cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev),
             "cudaDeviceGetAttribute(multiProcessorCount)");
  return n > 0 ? n : 1;
}

int64_t entries_per_row(const DecodeShape& s) { return s.topk > 0 ? s.topk : s.max_blocks; }

template <int D>
size_t smem_bytes(int split) {
  return size_t(Cfg<D>::kMain) + size_t(split) * sizeof(int2);
}

}  // namespace

size_t plan_decode_attention(DecodePlan& plan) {
  const DecodeShape& s = plan.shape;
  // Work: items (token, group, 16-head slice), each over n_b blocks. Pick the blocks per CTA that
  // minimises waves x (blocks per CTA + fixed cost): a CTA pays about one block's time for its
  // start (Q, table lookups, first loads' latency) and its share of the merge.
  const int64_t m_tiles = (s.h_q / s.h_kv + kRows - 1) / kRows;
  const int64_t items = std::max<int64_t>(1, s.n_q) * s.h_kv * m_tiles;
  const int64_t n_b = std::max<int64_t>(1, entries_per_row(s));
  const int64_t resident = int64_t(num_sms()) * 2;
  int64_t best = n_b, best_cost = INT64_MAX;
  for (int64_t split = 1; split <= std::min<int64_t>(n_b, kMaxSplit); ++split) {
    const int64_t ctas = items * ((n_b + split - 1) / split);
    const int64_t waves = (ctas + resident - 1) / resident;
    const int64_t merge = split < n_b ? 1 : 0;
    const int64_t cost = waves * (4 * split + 4) + 4 * merge;
    if (cost < best_cost) best_cost = cost, best = split;
  }
  if (best > kMaxSplit) best = kMaxSplit;
  plan.attention_split = best;
  const int64_t n_splits = (n_b + best - 1) / best;
  if (n_splits <= 1) return 0;
  const size_t rows = size_t(n_splits) * size_t(std::max<int64_t>(1, s.n_q)) * size_t(s.h_q);
  return align256(rows * size_t(s.d) * 4) + align256(rows * 4);
}

void run_decode_attention(const DecodeAttentionParams& p, const DecodePlan& plan, void* workspace,
                          cudaStream_t stream) {
  const PagedKvCache& c = p.cache;
  const DecodeShape& s = plan.shape;
  Args a{};
  a.q = static_cast<const uint16_t*>(p.q);
  a.stride_q_tok = p.stride_q_tok;
  a.stride_q_head = p.stride_q_head;
  a.k_cache = static_cast<const uint16_t*>(c.k_cache);
  a.v_cache = static_cast<const uint16_t*>(c.v_cache);
  a.block_table = c.block_table;
  a.seq_lens = c.seq_lens;
  a.cu_q = p.cu_seqlens_q;
  a.topk_idx = p.topk_idx;
  a.n_q = p.n_q;
  a.batch = c.batch;
  a.n_pages = c.n_pages;
  a.max_blocks = c.max_blocks;
  a.bk = c.bk;
  a.h_kv = c.h_kv;
  a.h_q = p.h_q;
  a.g = p.h_q / c.h_kv;
  a.topk = p.topk_idx ? p.topk : 0;
  a.scale_log2 = p.scale * 1.4426950408889634f;
  a.split = int(plan.attention_split);
  a.m_tiles = int((a.g + kRows - 1) / kRows);
  const int64_t n_b = p.topk_idx ? p.topk : c.max_blocks;
  a.n_blocks = int(n_b);
  const int n_splits = int(std::max<int64_t>(1, (n_b + a.split - 1) / a.split));
  if (int64_t(n_splits) * p.n_q > INT32_MAX)
    throw Error("msa::decode_attention: n_q = " + std::to_string(p.n_q) + " with " + std::to_string(n_splits) +
                " splits per token exceeds the grid, expected n_q * splits < 2^31 (plan with a smaller n_q)");
  a.n_splits = n_splits;
  a.direct = n_splits == 1;
  a.o = static_cast<uint16_t*>(p.o);
  a.stride_o_tok = p.stride_o_tok;
  a.stride_o_head = p.stride_o_head;
  a.lse = p.lse;
  a.ws_n_q = std::max<int64_t>(1, s.n_q);
  if (!a.direct) {
    uint8_t* ws = static_cast<uint8_t*>(workspace) + plan.attention_workspace_offset;
    const size_t rows = size_t(n_splits) * size_t(a.ws_n_q) * size_t(p.h_q);
    a.ws_o = reinterpret_cast<float*>(ws);
    a.ws_lse = reinterpret_cast<float*>(ws + align256(rows * size_t(c.d) * 4));
  }
  const dim3 grid(unsigned(int64_t(n_splits) * p.n_q), unsigned(c.h_kv * a.m_tiles));
  auto launch = [&](auto kernel, auto merge, size_t smem) {
    ensure_smem("decode_attention", reinterpret_cast<const void*>(kernel), smem);
    kernel<<<grid, kThreads, smem, stream>>>(a);
    check_cuda("decode_attention", cudaGetLastError(), "launch of the decode attention kernel");
    if (!a.direct) {
      const int64_t rows = p.n_q * p.h_q;
      launch_programmatic("decode_attention", "launch of the decode merge kernel", merge,
                          dim3(unsigned((rows + 3) / 4)), dim3(128), 0, stream, (const float*)a.ws_o,
                          (const float*)a.ws_lse, a.ws_n_q, n_splits, p.n_q, p.h_q, a.o, a.stride_o_tok,
                          a.stride_o_head, a.lse);
    }
  };
  if (c.d == 64)
    launch(decode_attn_kernel<64>, decode_merge_kernel<64>, smem_bytes<64>(a.split));
  else
    launch(decode_attn_kernel<128>, decode_merge_kernel<128>, smem_bytes<128>(a.split));
}

}  // namespace msa::cuda
