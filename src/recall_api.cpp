// Public entry point of the selection-quality metrics: validation, then dispatch.
#include <cmath>

#include "cpu/cpu_ops.h"
#include "validate.h"
#ifdef MSA_WITH_CUDA
#include "cuda/recall.h"
#endif

namespace msa {

using namespace detail;

SelectionRecall selection_recall(const SelectionRecallParams& p0, const Exec& ex) {
  const char* fn = "selection_recall";
  SelectionRecallParams p = p0;
  check_backend(fn, ex, true);
  check_dtype(fn, p.dtype, ex);
  check_heads(fn, p.h_q, p.h_kv);
  const bool cuda = ex.backend == Backend::cuda;
  if (cuda) {
    // The dense forward gives the lse: its head dims and group sizes.
    check_one_of(fn, "d", p.d, {64, 128});
    check_one_of(fn, "h_q / h_kv", p.h_q / p.h_kv, {1, 2, 4, 8, 16});
  } else {
    check_range(fn, "d", p.d, 1, 512);
  }
  check_range(fn, "bk", p.bk, 1, 4096);
  check_range(fn, "topk", p.topk, 1, kMaxTopk);
  resolve_scale(fn, "scale", p.scale, float(1.0 / std::sqrt(double(p.d))));
  // cuda: every pointer is device memory, the varlen arrays are checked for shape only.
  SeqInfo s = check_varlen(fn, p.seq, cuda);
  resolve_strides3(fn, "q", s.n_q, p.h_q, p.d, p.stride_q_tok, p.stride_q_head, false);
  resolve_strides3(fn, "k", s.n_k, p.h_kv, p.d, p.stride_k_tok, p.stride_k_head, false);
  check_ptr(fn, "q", p.q, s.n_q > 0);
  check_ptr(fn, "k", p.k, s.n_q > 0);
  if (cuda)
    check_ptr(fn, "topk_idx", p.topk_idx, s.n_q > 0);
  else
    check_topk_idx(fn, s, p.topk_idx, p.h_kv, p.topk, p.bk);
  if (s.n_q == 0) return SelectionRecall{1.0, 1.0};
#ifdef MSA_WITH_CUDA
  if (cuda) return cuda::run_selection_recall(p, static_cast<cudaStream_t>(ex.stream));
#endif
  return cpu::selection_recall(p, s, ex.num_threads);
}

}  // namespace msa
