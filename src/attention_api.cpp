// Public entry points of the main branch (sparse and dense attention): validation, then dispatch.
#include <cmath>

#include "cpu/cpu_ops.h"
#include "validate.h"
#ifdef MSA_WITH_CUDA
#include "cuda/dense_bwd.h"
#include "cuda/dense_fwd.h"
#include "cuda/sparse_bwd.h"
#include "cuda/sparse_fwd.h"
#endif

namespace msa {

using namespace detail;

namespace {

// The dense backward has a CUDA kernel (src/cuda/dense_bwd*).
constexpr bool kCudaDenseBackward = true;

// Checks and resolves the fields shared by the forward and the backward. On the CPU the varlen
// arrays and topk_idx are host memory and their contents are validated here; on CUDA they are
// device memory and only shapes are checked (the kernels skip invalid block ids and clamp
// positions and offsets instead). The forwards and the sparse backward have CUDA kernels so far.
SeqInfo check_attention(const char* fn, AttentionParams& p, const Exec& ex, bool sparse, bool backward) {
  const bool cuda = ex.backend == Backend::cuda;
  check_backend(fn, ex, /*cuda_implemented=*/!backward || sparse || kCudaDenseBackward);
  check_dtype(fn, p.dtype, ex);
  check_heads(fn, p.h_q, p.h_kv);
  if (cuda) {
    check_one_of(fn, "d", p.d, {64, 128});
    check_one_of(fn, "h_q / h_kv", p.h_q / p.h_kv, {1, 2, 4, 8, 16});
  } else {
    check_range(fn, "d", p.d, 1, 512);
  }
  if (!sparse && p.topk_idx != nullptr)
    fail(fn, "topk_idx is set, expected nullptr for dense attention (use sparse_attention_*)");
  resolve_scale(fn, "scale", p.scale, float(1.0 / std::sqrt(double(p.d))));
  SeqInfo s = check_varlen(fn, p.seq, cuda);
  resolve_strides3(fn, "q", s.n_q, p.h_q, p.d, p.stride_q_tok, p.stride_q_head, false);
  resolve_strides3(fn, "k", s.n_k, p.h_kv, p.d, p.stride_k_tok, p.stride_k_head, false);
  resolve_strides3(fn, "v", s.n_k, p.h_kv, p.d, p.stride_v_tok, p.stride_v_head, false);
  resolve_strides3(fn, "o", s.n_q, p.h_q, p.d, p.stride_o_tok, p.stride_o_head, !backward);
  const bool any = s.n_q > 0;
  check_ptr(fn, "q", p.q, any);
  check_ptr(fn, "k", p.k, any && s.n_k > 0);
  check_ptr(fn, "v", p.v, any && s.n_k > 0);
  check_ptr(fn, "o", p.o, any);
  check_ptr(fn, "lse", p.lse, any);
  if (sparse) {
    check_range(fn, "topk", p.topk, 1, kMaxTopk);
    if (cuda)
      check_one_of(fn, "bk", p.bk, {64, 128});
    else
      check_range(fn, "bk", p.bk, 1, 4096);
    check_ptr(fn, "topk_idx", p.topk_idx, any);
    if (!cuda) check_topk_idx(fn, s, p.topk_idx, p.h_kv, p.topk, p.bk);
  }
  return s;
}

void forward(const char* fn, const AttentionParams& p0, const Exec& ex, bool sparse) {
  AttentionParams p = p0;
  SeqInfo s = check_attention(fn, p, ex, sparse, false);
  if (s.n_q == 0) return;
  if (ex.backend == Backend::cuda) {
#ifdef MSA_WITH_CUDA
    const auto stream = static_cast<cudaStream_t>(ex.stream);
    if (sparse) {
      cuda::SparseFwdOptions opt;
      opt.max_workspace_bytes = ex.max_workspace_bytes;
      cuda::run_sparse_attention_forward(p, stream, opt);
    }
    else
      cuda::run_dense_fwd(p, stream);
#endif
    return;
  }
  cpu::attention_forward(p, s, ex.num_threads);
}

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
#ifdef MSA_WITH_CUDA
  if (ex.backend == Backend::cuda && sparse) {
    cuda::run_sparse_attention_backward(p, static_cast<cudaStream_t>(ex.stream));
    return;
  }
#endif
#ifdef MSA_WITH_CUDA
  if (ex.backend == Backend::cuda && !sparse) {
    cuda::run_dense_bwd(p, static_cast<cudaStream_t>(ex.stream));
    return;
  }
#endif
  cpu::attention_backward(p, s, ex.num_threads);
}

}  // namespace

void sparse_attention_forward(const AttentionParams& p, const Exec& ex) {
  forward("sparse_attention_forward", p, ex, true);
}
void dense_attention_forward(const AttentionParams& p, const Exec& ex) {
  forward("dense_attention_forward", p, ex, false);
}
void sparse_attention_backward(const AttentionBwdParams& p, const Exec& ex) {
  backward("sparse_attention_backward", p, ex, true);
}
void dense_attention_backward(const AttentionBwdParams& p, const Exec& ex) {
  backward("dense_attention_backward", p, ex, false);
}

}  // namespace msa
