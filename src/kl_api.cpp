// Public entry points of the KL alignment loss: validation, then dispatch.
#include <cmath>

#include "cpu/cpu_ops.h"
#include "validate.h"
#ifdef MSA_WITH_CUDA
#include "cuda/kl.h"
#endif

namespace msa {

using namespace detail;

namespace {

// On CUDA the varlen arrays and topk_idx are device memory: only shapes are checked here (the
// kernels skip invalid block ids and clamp positions), and the saved lse is required.
SeqInfo check_kl(const char* fn, IndexKLParams& p, const Exec& ex, bool backward) {
  const bool cuda = ex.backend == Backend::cuda;
  check_backend(fn, ex, true);
  check_dtype(fn, p.dtype, ex);
  check_heads(fn, p.h_q, p.h_kv);
  if (cuda) {
    check_one_of(fn, "d", p.d, {64, 128});
    check_one_of(fn, "d_idx", p.d_idx, {64, 128});
    check_one_of(fn, "h_q / h_kv", p.h_q / p.h_kv, {1, 2, 4, 8, 16});
  } else {
    check_range(fn, "d", p.d, 1, 512);
    check_range(fn, "d_idx", p.d_idx, 1, 512);
  }
  resolve_scale(fn, "scale", p.scale, float(1.0 / std::sqrt(double(p.d))));
  resolve_scale(fn, "index_scale", p.index_scale, float(1.0 / std::sqrt(double(p.d_idx))));
  if (backward && !std::isfinite(p.lambda))
    fail(fn, "lambda = " + std::to_string(p.lambda) + ", expected a finite number");
  SeqInfo s = check_varlen(fn, p.seq, cuda);
  bool any = s.n_q > 0;
  resolve_strides3(fn, "q", s.n_q, p.h_q, p.d, p.stride_q_tok, p.stride_q_head, false);
  resolve_strides3(fn, "k", s.n_k, p.h_kv, p.d, p.stride_k_tok, p.stride_k_head, false);
  resolve_strides3(fn, "q_idx", s.n_q, p.h_kv, p.d_idx, p.stride_q_idx_tok, p.stride_q_idx_head, false);
  resolve_strides2(fn, "k_idx", s.n_k, p.d_idx, p.stride_k_idx_tok, false);
  check_ptr(fn, "q", p.q, any);
  check_ptr(fn, "k", p.k, any);
  check_ptr(fn, "q_idx", p.q_idx, any);
  check_ptr(fn, "k_idx", p.k_idx, any);
  if (cuda && any && p.lse == nullptr)
    fail(fn, "lse is null, expected the main branch's saved lse [n_q, h_q] on the cuda backend (it is not recomputed)");
  if (p.topk_idx != nullptr) {
    check_range(fn, "topk", p.topk, 1, kMaxTopk);
    if (ex.backend == Backend::cuda)
      check_one_of(fn, "bk", p.bk, {64, 128});
    else
      check_range(fn, "bk", p.bk, 1, 4096);
    if (ex.backend == Backend::cpu) check_topk_idx(fn, s, p.topk_idx, p.h_kv, p.topk, p.bk);
  }
  if (backward) {
    resolve_strides3(fn, "dq_idx", s.n_q, p.h_kv, p.d_idx, p.stride_dq_idx_tok, p.stride_dq_idx_head, true);
    resolve_strides2(fn, "dk_idx", s.n_k, p.d_idx, p.stride_dk_idx_tok, true);
    check_ptr(fn, "dq_idx", p.dq_idx, any);
    check_ptr(fn, "dk_idx", p.dk_idx, s.n_k > 0);
  }
  return s;
}

}  // namespace

double index_kl_loss(const IndexKLParams& p0, const Exec& ex) {
  IndexKLParams p = p0;
  SeqInfo s = check_kl("index_kl_loss", p, ex, false);
  if (s.n_q == 0) return 0.0;
#ifdef MSA_WITH_CUDA
  if (ex.backend == Backend::cuda) {
    cuda::KlOptions opt;
    opt.max_workspace_bytes = ex.max_workspace_bytes;
    return cuda::run_index_kl(p, static_cast<cudaStream_t>(ex.stream), false, opt);
  }
#endif
  return cpu::index_kl_loss(p, s, ex.num_threads);
}

void index_kl_backward(const IndexKLParams& p0, const Exec& ex) {
  IndexKLParams p = p0;
  SeqInfo s = check_kl("index_kl_backward", p, ex, true);
  if (s.n_q == 0 && s.n_k == 0) return;
#ifdef MSA_WITH_CUDA
  if (ex.backend == Backend::cuda) {
    cuda::KlOptions opt;
    opt.max_workspace_bytes = ex.max_workspace_bytes;
    cuda::run_index_kl(p, static_cast<cudaStream_t>(ex.stream), true, opt);
    return;
  }
#endif
  cpu::index_kl_backward(p, s, ex.num_threads);
}

}  // namespace msa
