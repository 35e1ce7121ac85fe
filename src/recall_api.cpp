// Public entry point of the selection-quality metrics: validation, then dispatch.
#include <cmath>

#include "cpu/cpu_ops.h"
#include "validate.h"

namespace msa {

using namespace detail;

SelectionRecall selection_recall(const SelectionRecallParams& p0, const Exec& ex) {
  const char* fn = "selection_recall";
  SelectionRecallParams p = p0;
  check_backend(fn, ex, false);
  check_dtype(fn, p.dtype, ex);
  check_heads(fn, p.h_q, p.h_kv);
  check_range(fn, "d", p.d, 1, 512);
  check_range(fn, "bk", p.bk, 1, 4096);
  check_range(fn, "topk", p.topk, 1, kMaxTopk);
  resolve_scale(fn, "scale", p.scale, float(1.0 / std::sqrt(double(p.d))));
  SeqInfo s = resolve_varlen(fn, p.seq);
  resolve_strides3(fn, "q", s.n_q, p.h_q, p.d, p.stride_q_tok, p.stride_q_head, false);
  resolve_strides3(fn, "k", s.n_k, p.h_kv, p.d, p.stride_k_tok, p.stride_k_head, false);
  check_ptr(fn, "q", p.q, s.n_q > 0);
  check_ptr(fn, "k", p.k, s.n_q > 0);
  if (ex.backend == Backend::cpu) check_topk_idx(fn, s, p.topk_idx, p.h_kv, p.topk, p.bk);
  if (s.n_q == 0) return SelectionRecall{1.0, 1.0};
  return cpu::selection_recall(p, s, ex.num_threads);
}

}  // namespace msa
