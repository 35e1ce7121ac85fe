// recall.cu — msa::selection_recall on CUDA: the paper's block recall and score recall of a
// selection against the main branch's own top-k blocks by group-mean attention mass.
//
// 1. The dense forward gives every (query, head) its lse over the visible keys (our dense kernel,
//    with k in place of v: lse does not depend on v; o goes to scratch).
// 2. recall_mass_kernel, per chunk of (query, group) rows, one CTA per row: P_b of every visible
//    block, one warp per block, keys over the lanes, the group's heads in order, a butterfly sum
//    over the lanes: deterministic.
// 3. block_topk (own block forced) over the masses: I*, the oracle selection.
// 4. recall_rows_kernel: per row |I* n I| / |I*| and sum_{I* n I} P_b / sum_{I*} P_b in float64.
// The means are summed on the host in row order, as the CPU backend sums them.
// The masses are float32 sums of exp(s - lse) with s on the CUDA cores in float32; the CPU backend
// sums in float64, so blocks whose masses are within float rounding may rank the other way.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "block_topk.h"
#include "common.cuh"
#include "dense_fwd.h"
#include "host.h"
#include "recall.h"

namespace msa::cuda {
namespace {

constexpr const char* kOp = "selection_recall";
constexpr int kMassThreads = 128;  // 4 warps, one block of keys each at a time
// Most float32 masses per chunk of rows (the mass buffer is chunk rows x blocks of the longest
// possible sequence): 256 MB.
constexpr int64_t kMassBudget = int64_t(1) << 26;

struct RecallParams {
  const uint16_t* q = nullptr;  // bf16 [n_q, h_q, d]
  int64_t stride_q_tok = 0, stride_q_head = 0;
  const uint16_t* k = nullptr;  // bf16 [n_k, h_kv, d]
  int64_t stride_k_tok = 0, stride_k_head = 0;
  int k_vec = 0;  // k rows 16-byte aligned: vector loads
  const int32_t *cu_q = nullptr, *cu_k = nullptr, *q_pos = nullptr;
  int64_t n_q = 0, n_k = 0, batch = 1;
  int h_q = 1, h_kv = 1, g = 1, topk = 1;
  int64_t bk = 128;
  float scale = 1.f;
  const float* lse = nullptr;         // [n_q, h_q] natural log
  float* mass = nullptr;              // [chunk rows, n_blocks]
  int32_t* row_blocks = nullptr;      // [chunk rows] visible blocks of the row
  int64_t n_blocks = 1;               // columns of mass: blocks of the longest possible sequence
  const int32_t* best = nullptr;      // [chunk rows, topk] I*
  const int32_t* topk_idx = nullptr;  // [n_q * h_kv, topk] I
  double* rows_out = nullptr;         // [n_q * h_kv][2] block, score recall
  float* block_rows = nullptr;        // optional [n_q * h_kv]
  float* score_rows = nullptr;        // optional [n_q * h_kv]
};

// Row row0 + blockIdx.x = i * h_kv + r: the masses of its visible blocks (row_blocks = their count).
template <int D>
__global__ void __launch_bounds__(kMassThreads) recall_mass_kernel(const RecallParams p, int64_t row0) {
  extern __shared__ float smem[];  // q * scale [g][D], then lse [g]
  const int64_t row = row0 + blockIdx.x;
  const int64_t i = row / p.h_kv;
  const int r = int(row - i * p.h_kv);
  const int64_t b = p.cu_q ? find_seq(p.cu_q, p.batch, i) : 0;
  const SeqRows sr = seq_rows(p.cu_q, p.cu_k, b, p.n_q, p.n_k);
  const int64_t pos = query_pos(p.q_pos, sr, i);
  const int64_t nb = pos < 0 ? 0 : min(pos / p.bk + 1, p.n_blocks);
  if (threadIdx.x == 0) p.row_blocks[blockIdx.x] = int32_t(nb);
  if (nb == 0) return;
  float* qs = smem;
  float* ls = smem + p.g * D;
  for (int e = threadIdx.x; e < p.g * D; e += kMassThreads) {
    const int h = e / D, c = e - h * D;
    const uint16_t x = p.q[i * p.stride_q_tok + int64_t(r * p.g + h) * p.stride_q_head + c];
    qs[e] = bf16_bits_to_float(x) * p.scale;
  }
  for (int h = threadIdx.x; h < p.g; h += kMassThreads) ls[h] = p.lse[i * p.h_q + r * p.g + h];
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* mass = p.mass + int64_t(blockIdx.x) * p.n_blocks;
  const float inv_g = 1.f / float(p.g);
  for (int64_t blk = warp; blk < nb; blk += kMassThreads / 32) {
    const int64_t j_end = min(pos, (blk + 1) * p.bk - 1);
    float acc = 0.f;
    for (int64_t j = blk * p.bk + lane; j <= j_end; j += 32) {
      const uint16_t* kr = p.k + (sr.k_lo + j) * p.stride_k_tok + int64_t(r) * p.stride_k_head;
      float kf[D / 8][8];
#pragma unroll
      for (int c8 = 0; c8 < D / 8; ++c8) load8_as_float(kr + 8 * c8, p.k_vec != 0, kf[c8]);
      float pj = 0.f;
      for (int h = 0; h < p.g; ++h) {
        const float* qh = qs + h * D;
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < D; ++c) s = fmaf(qh[c], kf[c / 8][c % 8], s);
        pj += expf(s - ls[h]);
      }
      acc += pj;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) mass[blk] = acc * inv_g;
  }
}

// One thread per row of the chunk: the recalls of I (topk_idx) against I* (best).
__global__ void recall_rows_kernel(const RecallParams p, int64_t row0, int64_t rows) {
  const int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (x >= rows) return;
  const int64_t row = row0 + x;
  const int32_t* best = p.best + x * p.topk;
  const int32_t* sel = p.topk_idx + row * p.topk;
  const float* mass = p.mass + x * p.n_blocks;
  int n_best = 0, n_hit = 0;
  double mass_best = 0.0, mass_hit = 0.0;
  for (int t = 0; t < p.topk; ++t) {
    const int32_t bb = best[t];
    if (bb < 0) break;
    const double m = double(mass[bb]);
    ++n_best;
    mass_best += m;
    bool hit = false;
    for (int u = 0; u < p.topk; ++u) hit |= sel[u] == bb;
    if (hit) {
      ++n_hit;
      mass_hit += m;
    }
  }
  // No visible block (a row that sees no key): nothing to recall.
  const double block = n_best > 0 ? double(n_hit) / double(n_best) : 1.0;
  // As on the CPU: with topk = 1 the local block's mass can underflow to 0; the block ratio then
  // stands in for the undefined mass ratio.
  const double score = mass_best > 0.0 ? mass_hit / mass_best : block;
  p.rows_out[2 * row] = block;
  p.rows_out[2 * row + 1] = score;
  if (p.block_rows) p.block_rows[row] = float(block);
  if (p.score_rows) p.score_rows[row] = float(score);
}

}  // namespace

SelectionRecall run_selection_recall(const SelectionRecallParams& sp, cudaStream_t stream) {
  const int64_t n_q = sp.seq.n_q, n_k = sp.seq.n_k, h_q = sp.h_q, h_kv = sp.h_kv, d = sp.d;
  const int64_t n_rows = n_q * h_kv;
  const int64_t n_blocks = std::max<int64_t>(1, (n_k + sp.bk - 1) / sp.bk);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(n_rows, kMassBudget / n_blocks));

  // Scratch: lse [n_q, h_q], o [n_q, h_q, d] (discarded), the per-row recalls, and per chunk the
  // masses, their visible counts and I*.
  const size_t sizes[] = {size_t(n_q * h_q) * 4,        size_t(n_q * h_q * d) * 2, size_t(n_rows) * 16,
                          size_t(chunk * n_blocks) * 4, size_t(chunk) * 4,         size_t(chunk * sp.topk) * 4};
  size_t offsets[6], total = 0;
  for (int x = 0; x < 6; ++x) offsets[x] = total, total += align256(sizes[x]);
  ScratchGuard ws;
  ws.stream = stream;
  check_cuda(kOp, cudaMallocAsync(&ws.ptr, total, stream), "cudaMallocAsync");
  uint8_t* base = static_cast<uint8_t*>(ws.ptr);
  float* lse = reinterpret_cast<float*>(base + offsets[0]);
  void* o = base + offsets[1];
  double* rows_out = reinterpret_cast<double*>(base + offsets[2]);
  float* mass = reinterpret_cast<float*>(base + offsets[3]);
  int32_t* row_blocks = reinterpret_cast<int32_t*>(base + offsets[4]);
  int32_t* best = reinterpret_cast<int32_t*>(base + offsets[5]);

  // 1. lse of the dense attention over the visible keys.
  AttentionParams ap;
  ap.seq = sp.seq;
  ap.h_q = h_q;
  ap.h_kv = h_kv;
  ap.d = d;
  ap.scale = sp.scale;
  ap.dtype = DType::bf16;
  ap.q = sp.q;
  ap.stride_q_tok = sp.stride_q_tok;
  ap.stride_q_head = sp.stride_q_head;
  ap.k = sp.k;
  ap.stride_k_tok = sp.stride_k_tok;
  ap.stride_k_head = sp.stride_k_head;
  ap.v = sp.k;  // lse does not depend on v
  ap.stride_v_tok = sp.stride_k_tok;
  ap.stride_v_head = sp.stride_k_head;
  ap.o = o;
  ap.stride_o_tok = h_q * d;
  ap.stride_o_head = d;
  ap.lse = lse;
  run_dense_fwd(ap, stream);

  RecallParams p;
  p.q = static_cast<const uint16_t*>(sp.q);
  p.stride_q_tok = sp.stride_q_tok;
  p.stride_q_head = sp.stride_q_head;
  p.k = static_cast<const uint16_t*>(sp.k);
  p.stride_k_tok = sp.stride_k_tok;
  p.stride_k_head = sp.stride_k_head;
  p.k_vec = is_aligned(sp.k, 16) && sp.stride_k_tok % 8 == 0 && sp.stride_k_head % 8 == 0;
  p.cu_q = sp.seq.cu_seqlens_q;
  p.cu_k = sp.seq.cu_seqlens_k;
  p.q_pos = sp.seq.q_pos;
  p.n_q = n_q;
  p.n_k = n_k;
  p.batch = sp.seq.batch;
  p.h_q = int(h_q);
  p.h_kv = int(h_kv);
  p.g = int(h_q / h_kv);
  p.topk = int(sp.topk);
  p.bk = sp.bk;
  p.scale = sp.scale;
  p.lse = lse;
  p.mass = mass;
  p.row_blocks = row_blocks;
  p.n_blocks = n_blocks;
  p.best = best;
  p.topk_idx = sp.topk_idx;
  p.rows_out = rows_out;
  p.block_rows = sp.block_recall_rows;
  p.score_rows = sp.score_recall_rows;
  const size_t smem = size_t(p.g * d + p.g) * 4;

  for (int64_t row0 = 0; row0 < n_rows; row0 += chunk) {
    const int64_t rows = std::min(chunk, n_rows - row0);
    // 2. The masses.
    if (d == 64)
      recall_mass_kernel<64><<<unsigned(rows), kMassThreads, smem, stream>>>(p, row0);
    else
      recall_mass_kernel<128><<<unsigned(rows), kMassThreads, smem, stream>>>(p, row0);
    check_cuda(kOp, cudaGetLastError(), "mass kernel launch failed");
    // 3. I*: the top-k blocks by mass, own (last visible) block forced, as index_topk ranks.
    BlockTopkParams bp;
    bp.scores = mass;
    bp.stride_row = n_blocks;
    bp.n_blocks = n_blocks;
    bp.rows = rows;
    bp.row_blocks = row_blocks;
    bp.topk = sp.topk;
    bp.force_last = true;
    bp.topk_idx = best;
    run_block_topk(bp, stream);
    // 4. The recalls of the rows.
    recall_rows_kernel<<<unsigned((rows + 255) / 256), 256, 0, stream>>>(p, row0, rows);
    check_cuda(kOp, cudaGetLastError(), "recall kernel launch failed");
  }

  std::vector<double> host(size_t(n_rows) * 2);
  check_cuda(kOp, cudaMemcpyAsync(host.data(), rows_out, host.size() * 8, cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync");
  check_cuda(kOp, cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  SelectionRecall out;
  double block_sum = 0.0, score_sum = 0.0;
  for (int64_t x = 0; x < n_rows; ++x) {
    block_sum += host[size_t(2 * x)];
    score_sum += host[size_t(2 * x + 1)];
  }
  out.block_recall = block_sum / double(n_rows);
  out.score_recall = score_sum / double(n_rows);
  return out;
}

}  // namespace msa::cuda
