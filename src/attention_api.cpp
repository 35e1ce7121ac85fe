// Public entry points of the main branch (sparse and dense attention): validation, then dispatch.
#include <cmath>

#include "cpu/cpu_ops.h"
#include "validate.h"
#ifdef MSA_WITH_CUDA
#include "cuda/dense_fwd.h"
#include "cuda/sparse_fwd.h"
#endif

namespace msa {

using namespace detail;

namespace {

// Checks and resolves the fields shared by the forward and the backward.
SeqInfo check_attention(const char* fn, AttentionParams& p, const Exec& ex, bool sparse, bool backward) {
  check_backend(fn, ex, false);
  check_dtype(fn, p.dtype, ex);
  check_heads(fn, p.h_q, p.h_kv);
  if (ex.backend == Backend::cuda) {
    check_one_of(fn, "d", p.d, {64, 128});
    check_one_of(fn, "h_q / h_kv", p.h_q / p.h_kv, {1, 2, 4, 8, 16});
  } else {
    check_range(fn, "d", p.d, 1, 512);
  }
  resolve_scale(fn, "scale", p.scale, float(1.0 / std::sqrt(double(p.d))));
  SeqInfo s = resolve_varlen(fn, p.seq);
  resolve_strides3(fn, "q", s.n_q, p.h_q, p.d, p.stride_q_tok, p.stride_q_head, false);
  resolve_strides3(fn, "k", s.n_k, p.h_kv, p.d, p.stride_k_tok, p.stride_k_head, false);
  resolve_strides3(fn, "v", s.n_k, p.h_kv, p.d, p.stride_v_tok, p.stride_v_head, false);
  resolve_strides3(fn, "o", s.n_q, p.h_q, p.d, p.stride_o_tok, p.stride_o_head, !backward);
  bool any = s.n_q > 0;
  check_ptr(fn, "q", p.q, any);
  check_ptr(fn, "k", p.k, any);
  check_ptr(fn, "v", p.v, any);
  check_ptr(fn, "o", p.o, any);
  check_ptr(fn, "lse", p.lse, any);
  if (sparse) {
    check_range(fn, "topk", p.topk, 1, kMaxTopk);
    if (ex.backend == Backend::cuda)
      check_one_of(fn, "bk", p.bk, {64, 128});
    else
      check_range(fn, "bk", p.bk, 1, 4096);
    if (ex.backend == Backend::cpu) check_topk_idx(fn, s, p.topk_idx, p.h_kv, p.topk, p.bk);
    check_ptr(fn, "topk_idx", p.topk_idx, any);
  } else if (p.topk_idx != nullptr) {
    fail(fn, "topk_idx is set, expected nullptr for dense attention (use sparse_attention_*)");
  }
  return s;
}

// The CUDA sparse forward: every pointer is device memory, so the checks are for shapes only; the
// varlen arrays and topk_idx are never read on the host (the kernels skip invalid block ids and
// clamp positions and offsets instead).
void check_sparse_cuda(const char* fn, AttentionParams& p, const Exec& ex) {
  check_backend(fn, ex, true);
  check_dtype(fn, p.dtype, ex);
  check_heads(fn, p.h_q, p.h_kv);
  check_one_of(fn, "d", p.d, {64, 128});
  check_one_of(fn, "h_q / h_kv", p.h_q / p.h_kv, {1, 2, 4, 8, 16});
  resolve_scale(fn, "scale", p.scale, float(1.0 / std::sqrt(double(p.d))));
  const Varlen& v = p.seq;
  check_varlen_shape(fn, v);
  resolve_strides3(fn, "q", v.n_q, p.h_q, p.d, p.stride_q_tok, p.stride_q_head, false);
  resolve_strides3(fn, "k", v.n_k, p.h_kv, p.d, p.stride_k_tok, p.stride_k_head, false);
  resolve_strides3(fn, "v", v.n_k, p.h_kv, p.d, p.stride_v_tok, p.stride_v_head, false);
  resolve_strides3(fn, "o", v.n_q, p.h_q, p.d, p.stride_o_tok, p.stride_o_head, true);
  check_range(fn, "topk", p.topk, 1, kMaxTopk);
  check_one_of(fn, "bk", p.bk, {64, 128});
  const bool any = v.n_q > 0;
  check_ptr(fn, "q", p.q, any);
  check_ptr(fn, "k", p.k, any && v.n_k > 0);
  check_ptr(fn, "v", p.v, any && v.n_k > 0);
  check_ptr(fn, "o", p.o, any);
  check_ptr(fn, "lse", p.lse, any);
  check_ptr(fn, "topk_idx", p.topk_idx, any);
}

void forward(const char* fn, const AttentionParams& p0, const Exec& ex, bool sparse) {
  AttentionParams p = p0;
  if (sparse && ex.backend == Backend::cuda) {
    check_sparse_cuda(fn, p, ex);
    if (p.seq.n_q == 0) return;
#ifdef MSA_WITH_CUDA
    cuda::run_sparse_attention_forward(p, static_cast<cudaStream_t>(ex.stream));
#endif
    return;
  }
  SeqInfo s = check_attention(fn, p, ex, sparse, false);
  if (s.n_q == 0) return;
  cpu::attention_forward(p, s, ex.num_threads);
}

#ifdef MSA_WITH_CUDA
// The CUDA dense forward: every pointer is device memory, so the checks are for shapes only; the
// varlen arrays are never read on the host (the kernel clamps offsets and positions instead).
void dense_forward_cuda(const char* fn, const AttentionParams& p0, const Exec& ex) {
  AttentionParams p = p0;
  check_backend(fn, ex, true);
  check_dtype(fn, p.dtype, ex);
  check_heads(fn, p.h_q, p.h_kv);
  check_one_of(fn, "d", p.d, {64, 128});
  check_one_of(fn, "h_q / h_kv", p.h_q / p.h_kv, {1, 2, 4, 8, 16});
  if (p.topk_idx != nullptr) fail(fn, "topk_idx is set, expected nullptr for dense attention (use sparse_attention_*)");
  resolve_scale(fn, "scale", p.scale, float(1.0 / std::sqrt(double(p.d))));
  const Varlen& v = p.seq;
  check_varlen_shape(fn, v);
  resolve_strides3(fn, "q", v.n_q, p.h_q, p.d, p.stride_q_tok, p.stride_q_head, false);
  resolve_strides3(fn, "k", v.n_k, p.h_kv, p.d, p.stride_k_tok, p.stride_k_head, false);
  resolve_strides3(fn, "v", v.n_k, p.h_kv, p.d, p.stride_v_tok, p.stride_v_head, false);
  resolve_strides3(fn, "o", v.n_q, p.h_q, p.d, p.stride_o_tok, p.stride_o_head, true);
  const bool any = v.n_q > 0;
  check_ptr(fn, "q", p.q, any);
  check_ptr(fn, "k", p.k, any && v.n_k > 0);
  check_ptr(fn, "v", p.v, any && v.n_k > 0);
  check_ptr(fn, "o", p.o, any);
  check_ptr(fn, "lse", p.lse, any);
  if (!any) return;
  cuda::run_dense_fwd(p, static_cast<cudaStream_t>(ex.stream));
}
#endif

void backward(const char* fn, const AttentionBwdParams& p0, const Exec& ex, bool sparse) {
  AttentionBwdParams p = p0;
  SeqInfo s = check_attention(fn, p, ex, sparse, true);
  resolve_strides3(fn, "do", s.n_q, p.h_q, p.d, p.stride_do_tok, p.stride_do_head, false);
  resolve_strides3(fn, "dq", s.n_q, p.h_q, p.d, p.stride_dq_tok, p.stride_dq_head, true);
  resolve_strides3(fn, "dk", s.n_k, p.h_kv, p.d, p.stride_dk_tok, p.stride_dk_head, true);
  resolve_strides3(fn, "dv", s.n_k, p.h_kv, p.d, p.stride_dv_tok, p.stride_dv_head, true);
  check_ptr(fn, "do", p.do_, s.n_q > 0);
  check_ptr(fn, "dq", p.dq, s.n_q > 0);
  check_ptr(fn, "dk", p.dk, s.n_k > 0);
  check_ptr(fn, "dv", p.dv, s.n_k > 0);
  if (s.n_q == 0 && s.n_k == 0) return;
  cpu::attention_backward(p, s, ex.num_threads);
}

}  // namespace

void sparse_attention_forward(const AttentionParams& p, const Exec& ex) {
  forward("sparse_attention_forward", p, ex, true);
}
void dense_attention_forward(const AttentionParams& p, const Exec& ex) {
#ifdef MSA_WITH_CUDA
  if (ex.backend == Backend::cuda) return dense_forward_cuda("dense_attention_forward", p, ex);
#endif
  forward("dense_attention_forward", p, ex, false);
}
void sparse_attention_backward(const AttentionBwdParams& p, const Exec& ex) {
  backward("sparse_attention_backward", p, ex, true);
}
void dense_attention_backward(const AttentionBwdParams& p, const Exec& ex) {
  backward("dense_attention_backward", p, ex, false);
}

}  // namespace msa
