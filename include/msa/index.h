// msa/index.h — the index branch: token scores, causal block max-pool and top-k block selection
// (MSA_SPEC "Index branch"), plus the selection-quality metrics of the paper.
#pragma once

#include "msa/common.h"

namespace msa {

constexpr int64_t kMaxTopk = 32;

// Index scoring and top-k selection.
//   S[r][i][j] = <q_idx[i, r], k_idx[j]> * index_scale   for visible keys j (positions 0..p_i)
//   M[r][i][b] = max over visible j in block b of S (NaN-ignoring; NaN if all are NaN)
//   topk_idx[i, r] = the local block floor(p_i / bk) plus the topk - 1 largest M among the other
//   visible blocks (ties toward the lower block, NaN below every number); all visible blocks if
//   there are <= topk of them. Ascending, then -1 padding.
struct IndexTopkParams {
  Varlen seq;
  int64_t h_kv = 0;            // index-query heads (one per KV group)
  int64_t d_idx = 0;           // index head dim (64 or 128)
  int64_t bk = 128;            // block size in tokens (64 or 128)
  int64_t topk = 16;           // blocks kept per (query, group), 1..kMaxTopk
  float index_scale = 0.f;     // 0: 1/sqrt(d_idx)
  DType dtype = DType::bf16;   // of q_idx and k_idx

  const void* q_idx = nullptr;  // [n_q, h_kv, d_idx]
  int64_t stride_q_idx_tok = 0, stride_q_idx_head = 0;
  const void* k_idx = nullptr;  // [n_k, d_idx] (the one shared index-key head)
  int64_t stride_k_idx_tok = 0;

  int32_t* topk_idx = nullptr;  // [n_q, h_kv, topk] out, contiguous; block numbers within the sequence, -1 padded

  float* block_scores = nullptr;  // optional [n_q, h_kv, n_blocks] out, contiguous: M, -inf for blocks the query cannot see
  int64_t n_blocks = 0;           // last dim of block_scores; >= index_block_count(...) when block_scores is set
                                  // (cuda with cu_seqlens: the host cannot read the lengths, so it is not
                                  // checked; columns at or past n_blocks are then left unwritten)
  float* index_lse = nullptr;     // optional [n_q, h_kv] out: natural-log logsumexp of S over the selected support
};

void index_topk(const IndexTopkParams& p, const Exec& ex = {});

// Standalone top-k over given block scores (scores produced elsewhere, decode, benchmarks).
// Row i has row_blocks[i] visible columns (all n_blocks when row_blocks is null). With
// force_last, the last visible column (the local block) is always kept and takes one of the topk
// slots, as index_topk does; without it, a plain top-k. Ranking, ties, NaN, ascending order and
// -1 padding as in index_topk; rows with <= topk visible columns keep all of them.
struct BlockTopkParams {
  int64_t rows = 0;
  int64_t n_blocks = 0;                 // columns of scores
  int64_t topk = 16;                    // 1..kMaxTopk
  bool force_last = true;
  const float* scores = nullptr;        // [rows, n_blocks], row stride stride_row (0: n_blocks)
  int64_t stride_row = 0;
  const int32_t* row_blocks = nullptr;  // optional [rows], 0 <= row_blocks[i] <= n_blocks
  int32_t* topk_idx = nullptr;          // [rows, topk] out, contiguous
};

void block_topk(const BlockTopkParams& p, const Exec& ex = {});

// Number of blocks of the longest key sequence: the minimum n_blocks for block_scores.
// Reads seq.cu_seqlens_k (host memory).
int64_t index_block_count(const Varlen& seq, int64_t bk);

// Selection quality against the main branch (paper's metrics). For each (query i, group r):
//   P_b = sum over visible j in block b of the group-mean dense attention probability
//         (1/G) sum_{h in r} softmax_j(<q[i,h], k[j,r]> * scale) over all visible keys;
//   I*  = top-k blocks by P_b, chosen with the same rule as index_topk (local block forced,
//         ties toward the lower block); I = the valid entries of topk_idx[i, r];
//   block recall = |I* n I| / |I*|,  score recall = sum_{b in I* n I} P_b / sum_{b in I*} P_b.
// The means over all (i, r) rows are returned; per-row values optionally.
// cuda (bf16, d in {64, 128}, h_q / h_kv in {1, 2, 4, 8, 16}, any bk): every pointer is device
// memory, the call waits for ex.stream (the means come back to the host), the block masses are
// float32 (so blocks whose masses agree to float rounding may rank either way against the cpu's
// float64), and entries of topk_idx that are not visible blocks simply never match.
struct SelectionRecallParams {
  Varlen seq;
  int64_t h_q = 0, h_kv = 0, d = 0;
  int64_t bk = 128, topk = 16;
  float scale = 0.f;            // 0: 1/sqrt(d)
  DType dtype = DType::bf16;    // of q and k
  const void* q = nullptr;      // [n_q, h_q, d]
  int64_t stride_q_tok = 0, stride_q_head = 0;
  const void* k = nullptr;      // [n_k, h_kv, d]
  int64_t stride_k_tok = 0, stride_k_head = 0;
  const int32_t* topk_idx = nullptr;  // [n_q, h_kv, topk] selection to judge, -1 padded
  float* block_recall_rows = nullptr; // optional [n_q, h_kv] out
  float* score_recall_rows = nullptr; // optional [n_q, h_kv] out
};

struct SelectionRecall {
  double block_recall = 0.0;  // mean over rows (1 when n_q == 0)
  double score_recall = 0.0;  // mean over rows (1 when n_q == 0)
};

SelectionRecall selection_recall(const SelectionRecallParams& p, const Exec& ex = {});

}  // namespace msa
