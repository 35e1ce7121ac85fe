// The msa operators for PyTorch (torch.ops.msa.*): schemas, and one device-generic implementation
// per operator that checks its tensors, fills the core params struct and calls the core API on
// the backend of the tensors' device (registered for the CPU and, with CUDA, the CUDA key).
// msa::Error from the core becomes c10::ValueError with the same message.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "msa_torch.h"
#ifdef MSA_TORCH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

#include <msa/msa.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

namespace msa_torch {

namespace {

[[noreturn]] void fail(const char* fn, const std::string& what) {
  TORCH_CHECK_VALUE(false, "msa::", fn, ": ", what);
  throw;  // unreachable: the check above always throws
}

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kBFloat16:
      return "bfloat16";
    case at::kDouble:
      return "float64";
    case at::kHalf:
      return "float16";
    case at::kInt:
      return "int32";
    case at::kLong:
      return "int64";
    case at::kFloat8_e4m3fn:
      return "float8_e4m3fn";
    default:
      return c10::toString(t);
  }
}

// Runs a core call; its argument errors become ValueError with the same message.
template <class F>
auto core(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const msa::Error& e) {
    TORCH_CHECK_VALUE(false, e.what());
    throw;  // unreachable
  }
}

msa::DType float_dtype(const char* fn, const char* name, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return msa::DType::f32;
    case at::kBFloat16:
      return msa::DType::bf16;
    case at::kDouble:
      return msa::DType::f64;
    default:
      fail(fn,
           std::string(name) + " dtype = " + dtype_str(t.scalar_type()) + ", expected float32, bfloat16 or float64");
  }
}

void check_dtype(const char* fn, const char* name, const Tensor& t, at::ScalarType want, const char* why) {
  if (t.scalar_type() != want)
    fail(fn, std::string(name) + " dtype = " + dtype_str(t.scalar_type()) + ", expected " + dtype_str(want) + why);
}

void check_device(const char* fn, const char* name, const Tensor& t, const Tensor& ref, const char* ref_name) {
  if (t.device() != ref.device())
    fail(fn,
         std::string(name) + " is on " + t.device().str() + ", expected " + ref.device().str() + " like " + ref_name);
}

// want: expected sizes, -1 for "any"; layout names the dims, e.g. "[n_k, h_kv, d]".
void check_shape(const char* fn, const char* name, const Tensor& t, std::vector<int64_t> want, const char* layout) {
  bool ok = t.dim() == int64_t(want.size());
  for (size_t i = 0; ok && i < want.size(); ++i) ok = want[i] < 0 || t.size(i) == want[i];
  if (ok) return;
  std::string w = layout;
  bool concrete = std::any_of(want.begin(), want.end(), [](int64_t x) { return x >= 0; });
  if (concrete) {
    w += " = [";
    for (size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + (want[i] < 0 ? "*" : std::to_string(want[i]));
    w += "]";
  }
  fail(fn, std::string(name) + " shape = " + shape_str(t.sizes()) + ", expected " + w);
}

// The core takes any positive strides with a contiguous last dim; torch may hand over stride 0
// (expand) or a strided last dim, which the core would misread (0 means "default" there).
Tensor rows(const Tensor& t) {
  bool ok = t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1;
  for (int64_t i = 0; ok && i + 1 < t.dim(); ++i) ok = t.size(i) <= 1 || t.stride(i) > 0;
  return ok ? t : t.contiguous();
}

msa::Exec exec_for(const char* fn, const Tensor& t) {
  msa::Exec ex;
  if (t.is_cpu()) {
    ex.backend = msa::Backend::cpu;
    ex.num_threads = at::get_num_threads();  // torch.set_num_threads applies to msa too
    return ex;
  }
  if (t.is_cuda()) {
#ifdef MSA_TORCH_CUDA
    ex.backend = msa::Backend::cuda;
    ex.stream = c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
    return ex;
#else
    fail(fn, "tensors are on " + t.device().str() + ", but this build of msa_torch has no CUDA support");
#endif
  }
  fail(fn, "tensors are on " + t.device().str() + ", expected cpu or cuda");
}

// Varlen description; keeps the int32 tensors it points into alive.
struct Seq {
  msa::Varlen v;
  Tensor cu_q, cu_k, pos;
};

Tensor int_vector(const char* fn, const char* name, const Tensor& t, const Tensor& ref, const char* ref_name,
                  int64_t size, const char* layout) {
  check_device(fn, name, t, ref, ref_name);
  check_dtype(fn, name, t, at::kInt, "");
  check_shape(fn, name, t, {size}, layout);
  return t.contiguous();
}

Tensor cu_seqlens(const char* fn, const char* name, const Tensor& t, const Tensor& ref, const char* ref_name,
                  int64_t size) {
  Tensor c = int_vector(fn, name, t, ref, ref_name, size, "[batch + 1]");
  if (c.size(0) < 2)
    fail(fn, std::string(name) + " shape = " + shape_str(c.sizes()) + ", expected [batch + 1] with batch >= 1");
  return c;
}

Seq make_seq(const char* fn, int64_t n_q, int64_t n_k, const OptTensor& cu_q, const OptTensor& cu_k,
             const OptTensor& q_pos, const Tensor& ref, const char* ref_name) {
  Seq s;
  s.v.n_q = n_q;
  s.v.n_k = n_k;
  if (cu_q.has_value()) {
    s.cu_q = cu_seqlens(fn, "cu_seqlens_q", *cu_q, ref, ref_name, -1);
    s.v.cu_seqlens_q = s.cu_q.data_ptr<int32_t>();
    s.v.batch = s.cu_q.size(0) - 1;
  }
  if (cu_k.has_value()) {
    s.cu_k = cu_seqlens(fn, "cu_seqlens_k", *cu_k, ref, ref_name, s.cu_q.defined() ? s.cu_q.size(0) : -1);
    s.v.cu_seqlens_k = s.cu_k.data_ptr<int32_t>();
    s.v.batch = s.cu_k.size(0) - 1;
  }
  if (q_pos.has_value()) {
    s.pos = int_vector(fn, "q_pos", *q_pos, ref, ref_name, n_q, "[n_q]");
    s.v.q_pos = s.pos.data_ptr<int32_t>();
  }
  return s;
}

// k_idx as [n_k, d_idx] (a [n_k, 1, d_idx] single-head view is accepted too).
Tensor index_keys(const char* fn, const Tensor& k_idx, int64_t d_idx) {
  if (k_idx.dim() == 3) {
    check_shape(fn, "k_idx", k_idx, {-1, 1, d_idx}, "[n_k, 1, d_idx]");
    return k_idx.select(1, 0);
  }
  check_shape(fn, "k_idx", k_idx, {-1, d_idx}, "[n_k, d_idx]");
  return k_idx;
}

Tensor selection(const char* fn, const Tensor& topk_idx, const Tensor& ref, const char* ref_name, int64_t n_q,
                 int64_t h_kv) {
  check_device(fn, "topk_idx", topk_idx, ref, ref_name);
  check_dtype(fn, "topk_idx", topk_idx, at::kInt, "");
  check_shape(fn, "topk_idx", topk_idx, {n_q, h_kv, -1}, "[n_q, h_kv, topk]");
  return topk_idx.contiguous();
}

// Points a params slot and its strides at a [tok, head, ...] tensor already passed through rows().
template <class Ptr>
void bind3(const Tensor& t, Ptr*& ptr, int64_t& stride_tok, int64_t& stride_head) {
  ptr = t.data_ptr();
  stride_tok = t.stride(0);
  stride_head = t.stride(1);
}

// The same for a [tok, ...] tensor with one shared head (the index keys).
template <class Ptr>
void bind2(const Tensor& t, Ptr*& ptr, int64_t& stride_tok) {
  ptr = t.data_ptr();
  stride_tok = t.stride(0);
}

// Binds the block selection of a sparse call; sel keeps the int32 tensor alive.
template <class P>
void bind_selection(const char* fn, P& p, Tensor& sel, const Tensor& topk_idx, const Tensor& ref, const char* ref_name,
                    int64_t n_q, int64_t h_kv, int64_t bk) {
  sel = selection(fn, topk_idx, ref, ref_name, n_q, h_kv);
  p.topk_idx = sel.data_ptr<int32_t>();
  p.topk = sel.size(2);
  p.bk = bk;
}

Tensor stats(const char* fn, const char* name, const Tensor& t, const Tensor& ref, const char* ref_name, int64_t n_q,
             int64_t h, const char* layout) {
  check_device(fn, name, t, ref, ref_name);
  check_dtype(fn, name, t, at::kFloat, "");
  check_shape(fn, name, t, {n_q, h}, layout);
  return t.contiguous();
}

// q [n_q, h_q, d], k and v [n_k, h_kv, d] of one dtype and device, ready for the core.
struct Attn {
  Tensor q, k, v;
  int64_t n_q, h_q, d, n_k, h_kv;
  msa::DType dtype;
};

Attn attention_inputs(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v) {
  Attn a;
  check_shape(fn, "q", q, {-1, -1, -1}, "[n_q, h_q, d]");
  a.dtype = float_dtype(fn, "q", q);
  a.n_q = q.size(0);
  a.h_q = q.size(1);
  a.d = q.size(2);
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_device(fn, name, *t, q, "q");
    check_dtype(fn, name, *t, q.scalar_type(), " like q");
  }
  check_shape(fn, "k", k, {-1, -1, a.d}, "[n_k, h_kv, d]");
  a.n_k = k.size(0);
  a.h_kv = k.size(1);
  check_shape(fn, "v", v, {a.n_k, a.h_kv, a.d}, "[n_k, h_kv, d]");
  a.q = rows(q);
  a.k = rows(k);
  a.v = rows(v);
  return a;
}

msa::AttentionParams attention_params(const Attn& a, const Seq& s, double scale) {
  msa::AttentionParams p;
  p.seq = s.v;
  p.h_q = a.h_q;
  p.h_kv = a.h_kv;
  p.d = a.d;
  p.scale = float(scale);
  p.dtype = a.dtype;
  bind3(a.q, p.q, p.stride_q_tok, p.stride_q_head);
  bind3(a.k, p.k, p.stride_k_tok, p.stride_k_head);
  bind3(a.v, p.v, p.stride_v_tok, p.stride_v_head);
  return p;
}

std::tuple<Tensor, Tensor> attention_fwd(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v,
                                         const Tensor* topk_idx, const OptTensor& cu_q, const OptTensor& cu_k,
                                         const OptTensor& q_pos, int64_t bk, double scale) {
  Attn a = attention_inputs(fn, q, k, v);
  c10::DeviceGuard guard(q.device());
  Seq s = make_seq(fn, a.n_q, a.n_k, cu_q, cu_k, q_pos, q, "q");
  msa::AttentionParams p = attention_params(a, s, scale);
  Tensor sel;
  if (topk_idx) {
    bind_selection(fn, p, sel, *topk_idx, q, "q", a.n_q, a.h_kv, bk);
  }
  Tensor o = at::empty({a.n_q, a.h_q, a.d}, q.options());
  Tensor lse = at::empty({a.n_q, a.h_q}, q.options().dtype(at::kFloat));
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  msa::Exec ex = exec_for(fn, q);
  core([&] { topk_idx ? msa::sparse_attention_forward(p, ex) : msa::dense_attention_forward(p, ex); });
  return {o, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd(const char* fn, const Tensor& do_, const Tensor& q, const Tensor& k,
                                                 const Tensor& v, const Tensor& o, const Tensor& lse,
                                                 const Tensor* topk_idx, const OptTensor& cu_q, const OptTensor& cu_k,
                                                 const OptTensor& q_pos, int64_t bk, double scale) {
  Attn a = attention_inputs(fn, q, k, v);
  for (auto [t, name] : {std::pair{&do_, "do_"}, std::pair{&o, "o"}}) {
    check_device(fn, name, *t, q, "q");
    check_dtype(fn, name, *t, q.scalar_type(), " like q");
    check_shape(fn, name, *t, {a.n_q, a.h_q, a.d}, "[n_q, h_q, d]");
  }
  c10::DeviceGuard guard(q.device());
  Tensor lse_c = stats(fn, "lse", lse, q, "q", a.n_q, a.h_q, "[n_q, h_q]");
  Seq s = make_seq(fn, a.n_q, a.n_k, cu_q, cu_k, q_pos, q, "q");
  msa::AttentionBwdParams p;
  static_cast<msa::AttentionParams&>(p) = attention_params(a, s, scale);
  Tensor sel;
  if (topk_idx) {
    bind_selection(fn, p, sel, *topk_idx, q, "q", a.n_q, a.h_kv, bk);
  }
  Tensor o_r = rows(o), do_r = rows(do_);
  bind3(o_r, p.o, p.stride_o_tok, p.stride_o_head);
  p.lse = lse_c.data_ptr<float>();
  bind3(do_r, p.do_, p.stride_do_tok, p.stride_do_head);
  Tensor dq = at::empty({a.n_q, a.h_q, a.d}, q.options());
  Tensor dk = at::empty({a.n_k, a.h_kv, a.d}, q.options());
  Tensor dv = at::empty({a.n_k, a.h_kv, a.d}, q.options());
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  msa::Exec ex = exec_for(fn, q);
  core([&] { topk_idx ? msa::sparse_attention_backward(p, ex) : msa::dense_attention_backward(p, ex); });
  return {dq, dk, dv};
}

// The KL inputs and params shared by the loss and its backward; holds the tensors it points into.
struct KL {
  msa::IndexKLParams p;
  Seq s;
  Tensor q, k, q_idx, k_idx, sel, lse, index_lse;
};

KL kl_inputs(const char* fn, const Tensor& q, const Tensor& k, const Tensor& q_idx, const Tensor& k_idx,
             const OptTensor& topk_idx, const OptTensor& cu_q, const OptTensor& cu_k, const OptTensor& q_pos,
             const OptTensor& lse, const OptTensor& index_lse, int64_t bk, double scale, double index_scale) {
  KL kl;
  msa::IndexKLParams& p = kl.p;
  check_shape(fn, "q", q, {-1, -1, -1}, "[n_q, h_q, d]");
  p.dtype = float_dtype(fn, "q", q);
  const int64_t n_q = q.size(0), h_q = q.size(1), d = q.size(2);
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&q_idx, "q_idx"}, std::pair{&k_idx, "k_idx"}}) {
    check_device(fn, name, *t, q, "q");
    check_dtype(fn, name, *t, q.scalar_type(), " like q");
  }
  check_shape(fn, "k", k, {-1, -1, d}, "[n_k, h_kv, d]");
  const int64_t n_k = k.size(0), h_kv = k.size(1);
  check_shape(fn, "q_idx", q_idx, {n_q, h_kv, -1}, "[n_q, h_kv, d_idx]");
  const int64_t d_idx = q_idx.size(2);
  Tensor k2 = index_keys(fn, k_idx, d_idx);
  check_shape(fn, "k_idx", k2, {n_k, d_idx}, "[n_k, d_idx]");
  kl.s = make_seq(fn, n_q, n_k, cu_q, cu_k, q_pos, q, "q");
  kl.q = rows(q);
  kl.k = rows(k);
  kl.q_idx = rows(q_idx);
  kl.k_idx = rows(k2);
  p.seq = kl.s.v;
  p.h_q = h_q;
  p.h_kv = h_kv;
  p.d = d;
  p.d_idx = d_idx;
  p.scale = float(scale);
  p.index_scale = float(index_scale);
  bind3(kl.q, p.q, p.stride_q_tok, p.stride_q_head);
  bind3(kl.k, p.k, p.stride_k_tok, p.stride_k_head);
  bind3(kl.q_idx, p.q_idx, p.stride_q_idx_tok, p.stride_q_idx_head);
  bind2(kl.k_idx, p.k_idx, p.stride_k_idx_tok);
  if (topk_idx.has_value()) {
    bind_selection(fn, p, kl.sel, *topk_idx, q, "q", n_q, h_kv, bk);
  }
  if (lse.has_value()) {
    kl.lse = stats(fn, "lse", *lse, q, "q", n_q, h_q, "[n_q, h_q]");
    p.lse = kl.lse.data_ptr<float>();
  }
  if (index_lse.has_value()) {
    kl.index_lse = stats(fn, "index_lse", *index_lse, q, "q", n_q, h_kv, "[n_q, h_kv]");
    p.index_lse = kl.index_lse.data_ptr<float>();
  }
  return kl;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> index_topk(const Tensor& q_idx, const Tensor& k_idx, const OptTensor& cu_seqlens_q,
                                              const OptTensor& cu_seqlens_k, const OptTensor& q_pos, int64_t bk,
                                              int64_t topk, double index_scale, bool return_block_scores,
                                              bool return_index_lse, std::optional<int64_t> max_seqlen_k) {
  const char* fn = "index_topk";
  check_shape(fn, "q_idx", q_idx, {-1, -1, -1}, "[n_q, h_kv, d_idx]");
  msa::IndexTopkParams p;
  p.dtype = float_dtype(fn, "q_idx", q_idx);
  check_device(fn, "k_idx", k_idx, q_idx, "q_idx");
  check_dtype(fn, "k_idx", k_idx, q_idx.scalar_type(), " like q_idx");
  const int64_t n_q = q_idx.size(0), h_kv = q_idx.size(1), d_idx = q_idx.size(2);
  Tensor k2 = rows(index_keys(fn, k_idx, d_idx));
  const int64_t n_k = k2.size(0);
  if (max_seqlen_k && *max_seqlen_k < 0)
    fail(fn, "max_seqlen_k = " + std::to_string(*max_seqlen_k) + ", expected >= 0");
  c10::DeviceGuard guard(q_idx.device());
  Seq s = make_seq(fn, n_q, n_k, cu_seqlens_q, cu_seqlens_k, q_pos, q_idx, "q_idx");
  Tensor q2 = rows(q_idx);
  auto f32 = q_idx.options().dtype(at::kFloat);
  // Sizes are clamped so that a bad topk or bk reaches the core's validation, not at::empty's.
  Tensor topk_idx = at::empty({n_q, h_kv, std::max<int64_t>(topk, 0)}, q_idx.options().dtype(at::kInt));
  const int64_t n_blocks = bk > 0 ? (max_seqlen_k.value_or(n_k) + bk - 1) / bk : 0;
  // Outputs not asked for are empty: the schema has no optional returns.
  Tensor block_scores =
      at::empty(return_block_scores ? std::vector<int64_t>{n_q, h_kv, n_blocks} : std::vector<int64_t>{0}, f32);
  Tensor index_lse = at::empty(return_index_lse ? std::vector<int64_t>{n_q, h_kv} : std::vector<int64_t>{0}, f32);
  p.seq = s.v;
  p.h_kv = h_kv;
  p.d_idx = d_idx;
  p.bk = bk;
  p.topk = topk;
  p.index_scale = float(index_scale);
  bind3(q2, p.q_idx, p.stride_q_idx_tok, p.stride_q_idx_head);
  bind2(k2, p.k_idx, p.stride_k_idx_tok);
  p.topk_idx = topk_idx.data_ptr<int32_t>();
  if (return_block_scores) {
    p.block_scores = block_scores.data_ptr<float>();
    p.n_blocks = n_blocks;
  }
  if (return_index_lse) p.index_lse = index_lse.data_ptr<float>();
  msa::Exec ex = exec_for(fn, q_idx);
  core([&] { msa::index_topk(p, ex); });
  return {topk_idx, block_scores, index_lse};
}

Tensor block_topk(const Tensor& scores, int64_t topk, bool force_last, const OptTensor& row_blocks) {
  const char* fn = "block_topk";
  check_shape(fn, "scores", scores, {-1, -1}, "[rows, n_blocks]");
  check_dtype(fn, "scores", scores, at::kFloat, "");
  c10::DeviceGuard guard(scores.device());
  Tensor sc = rows(scores);
  msa::BlockTopkParams p;
  p.rows = sc.size(0);
  p.n_blocks = sc.size(1);
  p.topk = topk;
  p.force_last = force_last;
  p.scores = sc.data_ptr<float>();
  p.stride_row = sc.stride(0);
  Tensor rb;
  if (row_blocks.has_value()) {
    rb = int_vector(fn, "row_blocks", *row_blocks, scores, "scores", p.rows, "[rows]");
    p.row_blocks = rb.data_ptr<int32_t>();
  }
  Tensor topk_idx = at::empty({p.rows, std::max<int64_t>(topk, 0)}, scores.options().dtype(at::kInt));
  p.topk_idx = topk_idx.data_ptr<int32_t>();
  msa::Exec ex = exec_for(fn, scores);
  core([&] { msa::block_topk(p, ex); });
  return topk_idx;
}

std::tuple<Tensor, Tensor> sparse_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const Tensor& topk_idx, const OptTensor& cu_seqlens_q,
                                                const OptTensor& cu_seqlens_k, const OptTensor& q_pos, int64_t bk,
                                                double scale) {
  return attention_fwd("sparse_attention_fwd", q, k, v, &topk_idx, cu_seqlens_q, cu_seqlens_k, q_pos, bk, scale);
}

std::tuple<Tensor, Tensor, Tensor> sparse_attention_bwd(const Tensor& do_, const Tensor& q, const Tensor& k,
                                                        const Tensor& v, const Tensor& o, const Tensor& lse,
                                                        const Tensor& topk_idx, const OptTensor& cu_seqlens_q,
                                                        const OptTensor& cu_seqlens_k, const OptTensor& q_pos,
                                                        int64_t bk, double scale) {
  return attention_bwd("sparse_attention_bwd", do_, q, k, v, o, lse, &topk_idx, cu_seqlens_q, cu_seqlens_k, q_pos, bk,
                       scale);
}

std::tuple<Tensor, Tensor> dense_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
                                               const OptTensor& q_pos, double scale) {
  return attention_fwd("dense_attention_fwd", q, k, v, nullptr, cu_seqlens_q, cu_seqlens_k, q_pos, 0, scale);
}

std::tuple<Tensor, Tensor, Tensor> dense_attention_bwd(const Tensor& do_, const Tensor& q, const Tensor& k,
                                                       const Tensor& v, const Tensor& o, const Tensor& lse,
                                                       const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
                                                       const OptTensor& q_pos, double scale) {
  return attention_bwd("dense_attention_bwd", do_, q, k, v, o, lse, nullptr, cu_seqlens_q, cu_seqlens_k, q_pos, 0,
                       scale);
}

Tensor index_kl_loss(const Tensor& q, const Tensor& k, const Tensor& q_idx, const Tensor& k_idx,
                     const OptTensor& topk_idx, const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
                     const OptTensor& q_pos, const OptTensor& lse, const OptTensor& index_lse, int64_t bk, double scale,
                     double index_scale) {
  const char* fn = "index_kl_loss";
  c10::DeviceGuard guard(q.device());
  KL kl = kl_inputs(fn, q, k, q_idx, k_idx, topk_idx, cu_seqlens_q, cu_seqlens_k, q_pos, lse, index_lse, bk, scale,
                    index_scale);
  msa::Exec ex = exec_for(fn, q);
  double loss = core([&] { return msa::index_kl_loss(kl.p, ex); });
  Tensor out = at::empty({}, q.options().dtype(at::kDouble));
  out.fill_(loss);
  return out;
}

std::tuple<Tensor, Tensor> index_kl_bwd(const Tensor& q, const Tensor& k, const Tensor& q_idx, const Tensor& k_idx,
                                        const OptTensor& topk_idx, const OptTensor& cu_seqlens_q,
                                        const OptTensor& cu_seqlens_k, const OptTensor& q_pos, const OptTensor& lse,
                                        const OptTensor& index_lse, int64_t bk, double scale, double index_scale,
                                        const OptTensor& lambda_) {
  const char* fn = "index_kl_bwd";
  c10::DeviceGuard guard(q.device());
  KL kl = kl_inputs(fn, q, k, q_idx, k_idx, topk_idx, cu_seqlens_q, cu_seqlens_k, q_pos, lse, index_lse, bk, scale,
                    index_scale);
  if (lambda_.has_value()) {
    if (lambda_->numel() != 1)
      fail(fn, "lambda_ shape = " + shape_str(lambda_->sizes()) + ", expected a single element");
    kl.p.lambda = float(lambda_->item<double>());
  }
  Tensor dq_idx = at::empty(kl.q_idx.sizes(), q_idx.options());
  Tensor dk_idx = at::empty(kl.k_idx.sizes(), q_idx.options());
  kl.p.dq_idx = dq_idx.data_ptr();
  kl.p.dk_idx = dk_idx.data_ptr();
  msa::Exec ex = exec_for(fn, q);
  core([&] { msa::index_kl_backward(kl.p, ex); });
  return {dq_idx, dk_idx.view(k_idx.sizes())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> selection_recall(const Tensor& q, const Tensor& k, const Tensor& topk_idx,
                                                            const OptTensor& cu_seqlens_q,
                                                            const OptTensor& cu_seqlens_k, const OptTensor& q_pos,
                                                            int64_t bk, double scale) {
  const char* fn = "selection_recall";
  check_shape(fn, "q", q, {-1, -1, -1}, "[n_q, h_q, d]");
  msa::SelectionRecallParams p;
  p.dtype = float_dtype(fn, "q", q);
  check_device(fn, "k", k, q, "q");
  check_dtype(fn, "k", k, q.scalar_type(), " like q");
  p.h_q = q.size(1);
  p.d = q.size(2);
  check_shape(fn, "k", k, {-1, -1, p.d}, "[n_k, h_kv, d]");
  p.h_kv = k.size(1);
  c10::DeviceGuard guard(q.device());
  Seq s = make_seq(fn, q.size(0), k.size(0), cu_seqlens_q, cu_seqlens_k, q_pos, q, "q");
  Tensor sel = selection(fn, topk_idx, q, "q", q.size(0), p.h_kv);
  Tensor q2 = rows(q), k2 = rows(k);
  p.seq = s.v;
  p.bk = bk;
  p.topk = sel.size(2);
  p.scale = float(scale);
  bind3(q2, p.q, p.stride_q_tok, p.stride_q_head);
  bind3(k2, p.k, p.stride_k_tok, p.stride_k_head);
  p.topk_idx = sel.data_ptr<int32_t>();
  auto f32 = q.options().dtype(at::kFloat);
  Tensor block_rows = at::empty({q.size(0), p.h_kv}, f32), score_rows = at::empty({q.size(0), p.h_kv}, f32);
  p.block_recall_rows = block_rows.data_ptr<float>();
  p.score_recall_rows = score_rows.data_ptr<float>();
  msa::Exec ex = exec_for(fn, q);
  msa::SelectionRecall r = core([&] { return msa::selection_recall(p, ex); });
  Tensor block = at::empty({}, q.options().dtype(at::kDouble)), score = at::empty({}, q.options().dtype(at::kDouble));
  block.fill_(r.block_recall);
  score.fill_(r.score_recall);
  return {block, score, block_rows, score_rows};
}

// ---- decode over a paged KV cache (msa/decode.h) ----

namespace {

// The block table and seq_lens of a paged cache, on the device of ref. They are handed to the core
// as they are: their contents are validated there (on the CPU) and never read here, so a CUDA
// call needs no device-to-host copy (and can be captured in a CUDA graph).
struct Table {
  Tensor block_table, seq_lens;
};

Table paged_table(const char* fn, const Tensor& block_table, const Tensor& seq_lens, const Tensor& ref,
                  const char* ref_name) {
  check_device(fn, "block_table", block_table, ref, ref_name);
  check_dtype(fn, "block_table", block_table, at::kInt, "");
  check_shape(fn, "block_table", block_table, {-1, -1}, "[batch, max_blocks]");
  if (block_table.size(0) < 1)
    fail(fn,
         "block_table shape = " + shape_str(block_table.sizes()) + ", expected [batch, max_blocks] with batch >= 1");
  Table t;
  t.block_table = block_table.contiguous();  // the core reads rows of stride max_blocks
  t.seq_lens = int_vector(fn, "seq_lens", seq_lens, ref, ref_name, block_table.size(0), "[batch]");
  return t;
}

void bind_table(msa::PagedKvCache& c, const Table& t) {
  c.batch = t.block_table.size(0);
  c.max_blocks = t.block_table.size(1);
  c.block_table = t.block_table.data_ptr<int32_t>();
  c.seq_lens = t.seq_lens.data_ptr<int32_t>();
}

// The bk argument must be the page size of the cache: a page is one MSA block.
void check_bk(const char* fn, int64_t bk, const Tensor& cache, const char* cache_name) {
  if (bk != cache.size(1))
    fail(fn, "bk = " + std::to_string(bk) + ", expected the page size " + cache_name +
                 ".shape[1] = " + std::to_string(cache.size(1)) + " (a page holds one block)");
}

// The K/V cache pages [n_pages, bk, h_kv, d] of one dtype and device as ref.
void check_kv_cache(const char* fn, const Tensor& k_cache, const Tensor& v_cache, const Tensor& ref,
                    const char* ref_name, int64_t h_kv, int64_t d) {
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    check_device(fn, name, *t, ref, ref_name);
    check_dtype(fn, name, *t, ref.scalar_type(), (std::string(" like ") + ref_name).c_str());
  }
  check_shape(fn, "k_cache", k_cache, {-1, -1, h_kv, d}, "[n_pages, bk, h_kv, d]");
  check_shape(fn, "v_cache", v_cache, {k_cache.size(0), k_cache.size(1), h_kv, d}, "[n_pages, bk, h_kv, d]");
}

// The index-key cache as [n_pages, bk, d_idx] (a [n_pages, bk, 1, d_idx] single-head view is
// accepted too, as for k_idx).
Tensor index_cache(const char* fn, const Tensor& k_idx_cache, int64_t n_pages, int64_t bk, int64_t d_idx) {
  if (k_idx_cache.dim() == 4) {
    check_shape(fn, "k_idx_cache", k_idx_cache, {n_pages, bk, 1, d_idx}, "[n_pages, bk, 1, d_idx]");
    return k_idx_cache.select(2, 0);
  }
  check_shape(fn, "k_idx_cache", k_idx_cache, {n_pages, bk, d_idx}, "[n_pages, bk, d_idx]");
  return k_idx_cache;
}

// The plan of a decode call made of exactly its sizes. The per-request query count lives in the
// device offsets, so the packed count (at most 16) is the hint, as in the core's convenience forms.
msa::DecodeShape decode_shape(const msa::PagedKvCache& c, int64_t n_q, msa::DType dtype) {
  msa::DecodeShape s;
  s.batch = c.batch;
  s.n_q = n_q;
  s.max_q = std::max<int64_t>(1, std::min<int64_t>(n_q, 16));
  s.max_blocks = c.max_blocks;
  s.bk = c.bk;
  s.h_kv = c.h_kv;
  s.h_q = 0;
  s.d = 0;
  s.d_idx = 0;
  s.dtype = dtype;
  s.k_idx_format = c.k_idx_format;
  return s;
}

// On CUDA, runs f(&plan, workspace) with the workspace from torch's caching allocator on the
// current stream (reused stream-ordered, and legal under torch.cuda.graphs capture); where no plan
// can be made for these arguments, or on the CPU, f(nullptr, nullptr): the convenience form, whose
// validation names the call's own arguments.
template <class F>
void with_decode_plan(const msa::DecodeShape& shape, const msa::Exec& ex, const Tensor& ref, F&& f) {
  if (ex.backend == msa::Backend::cuda && shape.n_q > 0) {
    msa::DecodePlan plan;
    bool planned = true;
    try {
      plan = msa::plan_decode(shape, ex);
    } catch (const msa::Error&) {
      planned = false;
    }
    if (planned) {
      Tensor ws;
      if (plan.workspace_bytes > 0) ws = at::empty({int64_t(plan.workspace_bytes)}, ref.options().dtype(at::kByte));
      core([&] { f(&plan, ws.defined() ? ws.data_ptr() : nullptr); });
      return;
    }
  }
  core([&] { f(nullptr, nullptr); });
}

// A cache written in place cannot be copied to make it contiguous.
void check_writable(const char* fn, const char* name, const Tensor& t) {
  if (!t.is_contiguous())
    fail(fn, std::string(name) + " is not contiguous (strides " + shape_str(t.strides()) +
                 "), expected a contiguous cache, which append_kv writes in place");
}

// The format of an index-key cache follows its dtype: the calls' dtype (like ref) is native,
// float8_e4m3fn is IndexKeyFormat::fp8_e4m3 and needs its scale pool k_idx_scale, float32
// [n_pages, bk] on the same device (which the native format must not be given). Returns the
// scale pool ready for the core (writable: must already be contiguous; read only: made so), or an
// undefined tensor for the native format.
Tensor index_scale_pool(const char* fn, const Tensor& k_idx_cache, const OptTensor& k_idx_scale, const Tensor& ref,
                        const char* ref_name, int64_t n_pages, int64_t bk, bool writable, msa::IndexKeyFormat& format) {
  if (k_idx_cache.scalar_type() != at::kFloat8_e4m3fn) {
    if (k_idx_cache.scalar_type() != ref.scalar_type())
      fail(fn, "k_idx_cache dtype = " + dtype_str(k_idx_cache.scalar_type()) + ", expected " +
                   dtype_str(ref.scalar_type()) + " like " + ref_name +
                   " (or float8_e4m3fn with k_idx_scale for an fp8 index-key cache)");
    if (k_idx_scale.has_value())
      fail(fn, "k_idx_scale is given with a " + dtype_str(k_idx_cache.scalar_type()) +
                   " k_idx_cache, expected None (scales belong to a float8_e4m3fn index-key cache only)");
    format = msa::IndexKeyFormat::native;
    return Tensor();
  }
  if (!k_idx_scale.has_value())
    fail(fn, "k_idx_scale is None with a float8_e4m3fn k_idx_cache, expected its float32 [n_pages, bk] scale pool");
  const Tensor& s = *k_idx_scale;
  check_device(fn, "k_idx_scale", s, ref, ref_name);
  check_dtype(fn, "k_idx_scale", s, at::kFloat, "");
  check_shape(fn, "k_idx_scale", s, {n_pages, bk}, "[n_pages, bk]");
  format = msa::IndexKeyFormat::fp8_e4m3;
  if (writable) {
    check_writable(fn, "k_idx_scale", s);
    return s;
  }
  return s.contiguous();
}

}  // namespace

void append_kv(const Tensor& k_cache, const Tensor& v_cache, const OptTensor& k_idx_cache, const Tensor& block_table,
               const Tensor& seq_lens, const Tensor& k, const Tensor& v, const OptTensor& k_idx,
               const OptTensor& cu_new, const OptTensor& k_idx_scale) {
  const char* fn = "append_kv";
  check_shape(fn, "k", k, {-1, -1, -1}, "[n_new, h_kv, d]");
  msa::AppendKvParams p;
  p.dtype = float_dtype(fn, "k", k);
  const int64_t n_new = k.size(0), h_kv = k.size(1), d = k.size(2);
  check_device(fn, "v", v, k, "k");
  check_dtype(fn, "v", v, k.scalar_type(), " like k");
  check_shape(fn, "v", v, {n_new, h_kv, d}, "[n_new, h_kv, d]");
  check_kv_cache(fn, k_cache, v_cache, k, "k", h_kv, d);
  check_writable(fn, "k_cache", k_cache);
  check_writable(fn, "v_cache", v_cache);
  const int64_t n_pages = k_cache.size(0), bk = k_cache.size(1);
  c10::DeviceGuard guard(k.device());
  Table table = paged_table(fn, block_table, seq_lens, k, "k");
  msa::PagedKvCache& c = p.cache;
  bind_table(c, table);
  c.n_pages = n_pages;
  c.bk = bk;
  c.h_kv = h_kv;
  c.d = d;
  c.k_cache = k_cache.data_ptr();
  c.v_cache = v_cache.data_ptr();
  Tensor cu, k2 = rows(k), v2 = rows(v), k_idx2, scale;
  p.n_new = n_new;
  if (cu_new.has_value()) {
    cu = cu_seqlens(fn, "cu_new", *cu_new, k, "k", c.batch + 1);
    p.cu_new = cu.data_ptr<int32_t>();
  }
  bind3(k2, p.k, p.stride_k_tok, p.stride_k_head);
  bind3(v2, p.v, p.stride_v_tok, p.stride_v_head);
  // The index branch: k_idx and k_idx_cache both given, or neither (a layer without one).
  if (k_idx.has_value() != k_idx_cache.has_value())
    fail(fn, std::string(k_idx ? "k_idx_cache is None but k_idx is given" : "k_idx is None but k_idx_cache is given") +
                 ", expected both (or neither, for a layer without an index branch)");
  if (k_idx_scale.has_value() && !k_idx_cache.has_value())
    fail(fn,
         "k_idx_scale is given but k_idx_cache is None, expected None (a layer without an index branch has no "
         "scale pool)");
  if (k_idx_cache.has_value()) {
    const Tensor& kc = *k_idx_cache;
    check_device(fn, "k_idx_cache", kc, k, "k");
    scale = index_scale_pool(fn, kc, k_idx_scale, k, "k", n_pages, bk, true, c.k_idx_format);
    if (kc.dim() != 3 && kc.dim() != 4) check_shape(fn, "k_idx_cache", kc, {n_pages, bk, -1}, "[n_pages, bk, d_idx]");
    c.d_idx = kc.size(-1);
    if (c.d_idx < 1) fail(fn, "k_idx_cache shape = " + shape_str(kc.sizes()) + ", expected d_idx >= 1");
    Tensor kc2 = index_cache(fn, kc, n_pages, bk, c.d_idx);
    check_writable(fn, "k_idx_cache", kc);
    check_device(fn, "k_idx", *k_idx, k, "k");
    check_dtype(fn, "k_idx", *k_idx, k.scalar_type(), " like k");
    Tensor k_idx_2d = index_keys(fn, *k_idx, c.d_idx);
    check_shape(fn, "k_idx", k_idx_2d, {n_new, c.d_idx}, "[n_new, d_idx]");
    // An empty tensor has no data pointer, which the core reads as "no index branch"; with no new
    // token nothing is written, so the branch is left out then.
    if (n_new > 0) {
      c.k_idx_cache = kc2.data_ptr();
      if (scale.defined()) c.k_idx_scale = scale.data_ptr<float>();
      k_idx2 = rows(k_idx_2d);
      bind2(k_idx2, p.k_idx, p.stride_k_idx_tok);
    }
  }
  msa::Exec ex = exec_for(fn, k);
  core([&] { msa::append_kv(p, ex); });
}

std::tuple<Tensor, Tensor> decode_index_topk(const Tensor& q_idx, const Tensor& k_idx_cache, const Tensor& block_table,
                                             const Tensor& seq_lens, const OptTensor& cu_seqlens_q, int64_t bk,
                                             int64_t topk, double index_scale, bool return_index_lse,
                                             const OptTensor& k_idx_scale) {
  const char* fn = "decode_index_topk";
  check_shape(fn, "q_idx", q_idx, {-1, -1, -1}, "[n_q, h_kv, d_idx]");
  msa::DecodeIndexParams p;
  p.dtype = float_dtype(fn, "q_idx", q_idx);
  const int64_t n_q = q_idx.size(0), h_kv = q_idx.size(1), d_idx = q_idx.size(2);
  check_device(fn, "k_idx_cache", k_idx_cache, q_idx, "q_idx");
  msa::IndexKeyFormat format = msa::IndexKeyFormat::native;
  if (k_idx_cache.dim() != 3 && k_idx_cache.dim() != 4)
    check_shape(fn, "k_idx_cache", k_idx_cache, {-1, -1, d_idx}, "[n_pages, bk, d_idx]");
  Tensor kc = index_cache(fn, k_idx_cache, k_idx_cache.size(0), k_idx_cache.size(1), d_idx);
  check_bk(fn, bk, k_idx_cache, "k_idx_cache");
  Tensor scale = index_scale_pool(fn, k_idx_cache, k_idx_scale, q_idx, "q_idx", k_idx_cache.size(0),
                                  k_idx_cache.size(1), false, format);
  c10::DeviceGuard guard(q_idx.device());
  Table table = paged_table(fn, block_table, seq_lens, q_idx, "q_idx");
  Tensor cu;
  if (cu_seqlens_q.has_value()) {
    cu = cu_seqlens(fn, "cu_seqlens_q", *cu_seqlens_q, q_idx, "q_idx", table.block_table.size(0) + 1);
    p.cu_seqlens_q = cu.data_ptr<int32_t>();
  }
  Tensor q2 = rows(q_idx);
  kc = kc.contiguous();  // read only: a strided cache may be copied
  // Sizes are clamped so that a bad topk reaches the core's validation, not at::empty's.
  Tensor topk_idx = at::empty({n_q, h_kv, std::max<int64_t>(topk, 0)}, q_idx.options().dtype(at::kInt));
  Tensor index_lse = at::empty(return_index_lse ? std::vector<int64_t>{n_q, h_kv} : std::vector<int64_t>{0},
                               q_idx.options().dtype(at::kFloat));
  msa::PagedKvCache& c = p.cache;
  bind_table(c, table);
  c.n_pages = kc.size(0);
  c.bk = kc.size(1);
  c.h_kv = h_kv;
  c.d_idx = d_idx;
  c.k_idx_cache = kc.data_ptr();
  c.k_idx_format = format;
  if (scale.defined()) c.k_idx_scale = scale.data_ptr<float>();
  p.topk = topk;
  p.index_scale = float(index_scale);
  p.n_q = n_q;
  bind3(q2, p.q_idx, p.stride_q_idx_tok, p.stride_q_idx_head);
  p.topk_idx = topk_idx.data_ptr<int32_t>();
  if (return_index_lse) p.index_lse = index_lse.data_ptr<float>();
  msa::Exec ex = exec_for(fn, q_idx);
  msa::DecodeShape shape = decode_shape(c, n_q, p.dtype);
  shape.d_idx = d_idx;
  shape.topk = topk;
  with_decode_plan(shape, ex, q_idx, [&](const msa::DecodePlan* plan, void* ws) {
    if (plan)
      msa::decode_index_topk(p, *plan, ws, ex);
    else
      msa::decode_index_topk(p, ex);
  });
  return {topk_idx, index_lse};
}

std::tuple<Tensor, Tensor> decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                            const Tensor& block_table, const Tensor& seq_lens,
                                            const OptTensor& topk_idx, const OptTensor& cu_seqlens_q, int64_t bk,
                                            double scale) {
  const char* fn = "decode_attention";
  check_shape(fn, "q", q, {-1, -1, -1}, "[n_q, h_q, d]");
  msa::DecodeAttentionParams p;
  p.dtype = float_dtype(fn, "q", q);
  const int64_t n_q = q.size(0), h_q = q.size(1), d = q.size(2);
  check_shape(fn, "k_cache", k_cache, {-1, -1, -1, d}, "[n_pages, bk, h_kv, d]");
  const int64_t h_kv = k_cache.size(2);
  check_kv_cache(fn, k_cache, v_cache, q, "q", h_kv, d);
  check_bk(fn, bk, k_cache, "k_cache");
  c10::DeviceGuard guard(q.device());
  Table table = paged_table(fn, block_table, seq_lens, q, "q");
  Tensor cu;
  if (cu_seqlens_q.has_value()) {
    cu = cu_seqlens(fn, "cu_seqlens_q", *cu_seqlens_q, q, "q", table.block_table.size(0) + 1);
    p.cu_seqlens_q = cu.data_ptr<int32_t>();
  }
  // No selection: dense decode over every visible block.
  Tensor sel = topk_idx.has_value() ? selection(fn, *topk_idx, q, "q", n_q, h_kv) : Tensor();
  // An empty selection has no data pointer, which the core would read as "dense".
  if (sel.defined() && sel.size(2) == 0)
    fail(fn, "topk_idx shape = " + shape_str(sel.sizes()) + ", expected topk >= 1 (None for dense decode)");
  Tensor q2 = rows(q), kc = k_cache.contiguous(), vc = v_cache.contiguous();
  Tensor o = at::empty({n_q, h_q, d}, q.options());
  Tensor lse = at::empty({n_q, h_q}, q.options().dtype(at::kFloat));
  msa::PagedKvCache& c = p.cache;
  bind_table(c, table);
  c.n_pages = kc.size(0);
  c.bk = kc.size(1);
  c.h_kv = h_kv;
  c.d = d;
  c.k_cache = kc.data_ptr();
  c.v_cache = vc.data_ptr();
  p.h_q = h_q;
  p.scale = float(scale);
  p.n_q = n_q;
  bind3(q2, p.q, p.stride_q_tok, p.stride_q_head);
  p.topk_idx = sel.defined() ? sel.data_ptr<int32_t>() : nullptr;
  p.topk = sel.defined() ? sel.size(2) : 0;
  bind3(o, p.o, p.stride_o_tok, p.stride_o_head);
  p.lse = lse.data_ptr<float>();
  msa::Exec ex = exec_for(fn, q);
  msa::DecodeShape shape = decode_shape(p.cache, n_q, p.dtype);
  shape.h_q = h_q;
  shape.d = d;
  shape.topk = p.topk;
  with_decode_plan(shape, ex, q, [&](const msa::DecodePlan* plan, void* ws) {
    if (plan)
      msa::decode_attention(p, *plan, ws, ex);
    else
      msa::decode_attention(p, ex);
  });
  return {o, lse};
}

}  // namespace msa_torch

// The Python package msa_torch holds the fake (meta) implementations and the autograd formulas.
TORCH_LIBRARY(msa, m) {
  m.set_python_module("msa_torch");
  m.def(
      "index_topk(Tensor q_idx, Tensor k_idx, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
      "Tensor? q_pos=None, int bk=128, int topk=16, float index_scale=0.0, bool return_block_scores=False, "
      "bool return_index_lse=False, int? max_seqlen_k=None) -> (Tensor topk_idx, Tensor block_scores, "
      "Tensor index_lse)");
  m.def("block_topk(Tensor scores, int topk=16, bool force_last=True, Tensor? row_blocks=None) -> Tensor");
  m.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor topk_idx, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, Tensor? q_pos=None, int bk=128, float scale=0.0) -> (Tensor o, Tensor lse)");
  m.def(
      "sparse_attention_bwd(Tensor do_, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor topk_idx, "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? q_pos=None, int bk=128, float scale=0.0) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "dense_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
      "Tensor? q_pos=None, float scale=0.0) -> (Tensor o, Tensor lse)");
  m.def(
      "dense_attention_bwd(Tensor do_, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? q_pos=None, float scale=0.0) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "index_kl_loss(Tensor q, Tensor k, Tensor q_idx, Tensor k_idx, Tensor? topk_idx=None, "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? q_pos=None, Tensor? lse=None, "
      "Tensor? index_lse=None, int bk=128, float scale=0.0, float index_scale=0.0) -> Tensor");
  m.def(
      "index_kl_bwd(Tensor q, Tensor k, Tensor q_idx, Tensor k_idx, Tensor? topk_idx=None, "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? q_pos=None, Tensor? lse=None, "
      "Tensor? index_lse=None, int bk=128, float scale=0.0, float index_scale=0.0, Tensor? lambda_=None) "
      "-> (Tensor dq_idx, Tensor dk_idx)");
  m.def(
      "selection_recall(Tensor q, Tensor k, Tensor topk_idx, Tensor? cu_seqlens_q=None, "
      "Tensor? cu_seqlens_k=None, Tensor? q_pos=None, int bk=128, float scale=0.0) "
      "-> (Tensor block_recall, Tensor score_recall, Tensor block_recall_rows, Tensor score_recall_rows)");
  // Decode over a paged KV cache (inference only: no backward). append_kv writes the caches in place.
  m.def(
      "append_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!)? k_idx_cache, Tensor block_table, "
      "Tensor seq_lens, Tensor k, Tensor v, Tensor? k_idx=None, Tensor? cu_new=None, "
      "Tensor(d!)? k_idx_scale=None) -> ()");
  m.def(
      "decode_index_topk(Tensor q_idx, Tensor k_idx_cache, Tensor block_table, Tensor seq_lens, "
      "Tensor? cu_seqlens_q=None, int bk=128, int topk=16, float index_scale=0.0, bool return_index_lse=False, "
      "Tensor? k_idx_scale=None) -> (Tensor topk_idx, Tensor index_lse)");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
      "Tensor? topk_idx, Tensor? cu_seqlens_q=None, int bk=128, float scale=0.0) -> (Tensor o, Tensor lse)");
}

// One implementation serves both devices: the core picks the kernel (or says it has none).
#define MSA_TORCH_IMPLS(m)                                                   \
  m.impl("index_topk", TORCH_FN(msa_torch::index_topk));                     \
  m.impl("block_topk", TORCH_FN(msa_torch::block_topk));                     \
  m.impl("sparse_attention_fwd", TORCH_FN(msa_torch::sparse_attention_fwd)); \
  m.impl("sparse_attention_bwd", TORCH_FN(msa_torch::sparse_attention_bwd)); \
  m.impl("dense_attention_fwd", TORCH_FN(msa_torch::dense_attention_fwd));   \
  m.impl("dense_attention_bwd", TORCH_FN(msa_torch::dense_attention_bwd));   \
  m.impl("index_kl_loss", TORCH_FN(msa_torch::index_kl_loss));               \
  m.impl("index_kl_bwd", TORCH_FN(msa_torch::index_kl_bwd));                 \
  m.impl("selection_recall", TORCH_FN(msa_torch::selection_recall));         \
  m.impl("append_kv", TORCH_FN(msa_torch::append_kv));                       \
  m.impl("decode_index_topk", TORCH_FN(msa_torch::decode_index_topk));       \
  m.impl("decode_attention", TORCH_FN(msa_torch::decode_attention))

TORCH_LIBRARY_IMPL(msa, CPU, m) { MSA_TORCH_IMPLS(m); }
#ifdef MSA_TORCH_CUDA
TORCH_LIBRARY_IMPL(msa, CUDA, m) { MSA_TORCH_IMPLS(m); }
#endif
