// Public entry points of the index branch: validation, then dispatch to a backend.
#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/cpu_ops.h"
#include "validate.h"
#ifdef MSA_WITH_CUDA
#include "cuda/block_topk.h"
#include "cuda/index_topk.h"
#endif

namespace msa {

using namespace detail;

int64_t index_block_count(const Varlen& seq, int64_t bk) {
  const char* fn = "index_block_count";
  check_range(fn, "bk", bk, 1, 4096);
  SeqInfo s = resolve_varlen(fn, seq);
  return (s.max_len_k + bk - 1) / bk;
}

void index_topk(const IndexTopkParams& p0, const Exec& ex) {
  const char* fn = "index_topk";
  IndexTopkParams p = p0;
  check_backend(fn, ex, true);
  check_dtype(fn, p.dtype, ex);
  check_range(fn, "h_kv", p.h_kv, 1, 1024);
  if (ex.backend == Backend::cuda) {
    check_one_of(fn, "d_idx", p.d_idx, {64, 128});
    check_one_of(fn, "bk", p.bk, {64, 128});
  } else {
    check_range(fn, "d_idx", p.d_idx, 1, 512);
    check_range(fn, "bk", p.bk, 1, 4096);
  }
  check_range(fn, "topk", p.topk, 1, kMaxTopk);
  resolve_scale(fn, "index_scale", p.index_scale, float(1.0 / std::sqrt(double(p.d_idx))));
#ifdef MSA_WITH_CUDA
  if (ex.backend == Backend::cuda) {
    // Every pointer is device memory: the varlen arrays are checked for shape only, and the
    // kernel clamps their contents. n_blocks is checked exactly only when the host knows the
    // longest key sequence (no cu_seqlens); otherwise blocks >= n_blocks are not written.
    const Varlen& v = p.seq;
    check_varlen_shape(fn, v);
    resolve_strides3(fn, "q_idx", v.n_q, p.h_kv, p.d_idx, p.stride_q_idx_tok, p.stride_q_idx_head, false);
    resolve_strides2(fn, "k_idx", v.n_k, p.d_idx, p.stride_k_idx_tok, false);
    check_ptr(fn, "q_idx", p.q_idx, v.n_q > 0);
    check_ptr(fn, "k_idx", p.k_idx, v.n_q > 0 && v.n_k > 0);
    check_ptr(fn, "topk_idx", p.topk_idx, v.n_q > 0);
    if (p.block_scores) {
      int64_t need = v.cu_seqlens_q || v.cu_seqlens_k ? 1 : std::max<int64_t>((v.n_k + p.bk - 1) / p.bk, 1);
      if (p.n_blocks < need)
        fail(fn, "n_blocks = " + std::to_string(p.n_blocks) + ", expected >= " + std::to_string(need) +
                     " (blocks of the longest key sequence) when block_scores is set");
    }
    if (v.n_q == 0) return;
    cuda::run_index_topk(p, static_cast<cudaStream_t>(ex.stream));
    return;
  }
#endif
  SeqInfo s = resolve_varlen(fn, p.seq);
  resolve_strides3(fn, "q_idx", s.n_q, p.h_kv, p.d_idx, p.stride_q_idx_tok, p.stride_q_idx_head, false);
  resolve_strides2(fn, "k_idx", s.n_k, p.d_idx, p.stride_k_idx_tok, false);
  check_ptr(fn, "q_idx", p.q_idx, s.n_q > 0);
  check_ptr(fn, "k_idx", p.k_idx, s.n_q > 0 && s.n_k > 0);
  check_ptr(fn, "topk_idx", p.topk_idx, s.n_q > 0);
  if (p.block_scores) {
    int64_t need = (s.max_len_k + p.bk - 1) / p.bk;
    if (p.n_blocks < need)
      fail(fn, "n_blocks = " + std::to_string(p.n_blocks) + ", expected >= " + std::to_string(need) +
                   " (blocks of the longest key sequence) when block_scores is set");
  }
  if (s.n_q == 0) return;
  cpu::index_topk(p, s, ex.num_threads);
}

void block_topk(const BlockTopkParams& p0, const Exec& ex) {
  const char* fn = "block_topk";
  BlockTopkParams p = p0;
  check_backend(fn, ex, true);
  check_range(fn, "rows", p.rows, 0, std::numeric_limits<int32_t>::max());
  check_range(fn, "n_blocks", p.n_blocks, 0, std::numeric_limits<int32_t>::max());
  check_range(fn, "topk", p.topk, 1, kMaxTopk);
  resolve_strides2(fn, "scores", p.rows, p.n_blocks, p.stride_row, false);
  check_ptr(fn, "scores", p.scores, p.rows > 0 && p.n_blocks > 0);
  check_ptr(fn, "topk_idx", p.topk_idx, p.rows > 0);
  if (p.row_blocks && ex.backend == Backend::cpu)
    for (int64_t i = 0; i < p.rows; ++i)
      if (p.row_blocks[i] < 0 || p.row_blocks[i] > p.n_blocks)
        fail(fn, "row_blocks[" + std::to_string(i) + "] = " + std::to_string(p.row_blocks[i]) + ", expected 0 <= " +
                     "row_blocks <= n_blocks = " + std::to_string(p.n_blocks));
  if (p.rows == 0) return;
#ifdef MSA_WITH_CUDA
  // row_blocks is device memory here: the kernel clamps its entries instead.
  if (ex.backend == Backend::cuda) {
    cuda::run_block_topk(p, static_cast<cudaStream_t>(ex.stream));
    return;
  }
#endif
  cpu::block_topk(p, ex.num_threads);
}

}  // namespace msa
