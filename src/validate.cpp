// Argument validation shared by every public msa call.
#include "validate.h"

#include <algorithm>
#include <cmath>
#include <sstream>

namespace msa::detail {

void fail(const char* fn, const std::string& what) { throw Error(std::string("msa::") + fn + ": " + what); }

void check_range(const char* fn, const char* name, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi) {
    std::ostringstream os;
    os << name << " = " << v << ", expected " << lo << " <= " << name << " <= " << hi;
    fail(fn, os.str());
  }
}

void check_one_of(const char* fn, const char* name, int64_t v, std::initializer_list<int64_t> allowed) {
  for (int64_t a : allowed)
    if (v == a) return;
  std::ostringstream os;
  os << name << " = " << v << ", expected one of {";
  bool first = true;
  for (int64_t a : allowed) {
    os << (first ? "" : ", ") << a;
    first = false;
  }
  os << "}";
  fail(fn, os.str());
}

void check_ptr(const char* fn, const char* name, const void* ptr, bool needed) {
  if (needed && ptr == nullptr) fail(fn, std::string(name) + " is null, expected a pointer to its data");
}

void resolve_scale(const char* fn, const char* name, float& scale, float default_value) {
  if (scale == 0.f) scale = default_value;
  if (!std::isfinite(scale) || scale <= 0.f) {
    std::ostringstream os;
    os << name << " = " << scale << ", expected a finite positive number (or 0 for the default)";
    fail(fn, os.str());
  }
}

void check_dtype(const char* fn, DType t, const Exec& ex) {
  if (t != DType::f32 && t != DType::bf16 && t != DType::f64)
    fail(fn, "dtype = " + std::to_string(int(t)) + ", expected float32, bfloat16 or float64");
  if (ex.backend == Backend::cuda && t != DType::bf16)
    fail(fn, std::string("dtype = ") + dtype_name(t) + ", expected bfloat16 on the cuda backend");
}

void check_backend(const char* fn, const Exec& ex, bool cuda_implemented) {
  if (ex.backend == Backend::cpu) {
    if (ex.num_threads < 0) fail(fn, "num_threads = " + std::to_string(ex.num_threads) + ", expected >= 0");
    return;
  }
  if (ex.backend != Backend::cuda) fail(fn, "backend = " + std::to_string(int(ex.backend)) + ", expected cpu or cuda");
  if (!cuda_compiled()) fail(fn, "backend = cuda, but this build of msa has no CUDA backend (rebuild with CUDA)");
  if (!cuda_implemented) fail(fn, "backend = cuda, but this operation has no CUDA kernel yet; use backend = cpu");
}

void check_heads(const char* fn, int64_t h_q, int64_t h_kv) {
  check_range(fn, "h_kv", h_kv, 1, 1024);
  check_range(fn, "h_q", h_q, 1, 1 << 16);
  if (h_q % h_kv != 0) {
    std::ostringstream os;
    os << "h_q = " << h_q << ", expected a multiple of h_kv = " << h_kv;
    fail(fn, os.str());
  }
}

namespace {
// Two outer dims (n0, s0), (n1, s1) with a contiguous inner dim d: positive strides, and for
// outputs, nested without overlap once sorted by stride (dims of size 1 do not matter).
void check_outer(const char* fn, const char* name, int64_t n0, int64_t s0, int64_t n1, int64_t s1, int64_t d,
                 bool is_output) {
  if (s0 <= 0 || s1 <= 0) {
    std::ostringstream os;
    os << name << " strides = (" << s0 << ", " << s1 << "), expected positive strides in elements";
    fail(fn, os.str());
  }
  if (!is_output) return;
  struct Dim { int64_t n, s; };
  std::vector<Dim> dims;
  if (n0 > 1) dims.push_back({n0, s0});
  if (n1 > 1) dims.push_back({n1, s1});
  std::sort(dims.begin(), dims.end(), [](Dim a, Dim b) { return a.s < b.s; });
  int64_t extent = d;  // elements spanned by the inner dims so far
  for (Dim dm : dims) {
    if (dm.s < extent) {
      std::ostringstream os;
      os << name << " strides = (" << s0 << ", " << s1 << ") make the output overlap itself, expected stride >= "
         << extent;
      fail(fn, os.str());
    }
    extent = (dm.n - 1) * dm.s + extent;
  }
}
}  // namespace

void resolve_strides3(const char* fn, const char* name, int64_t n, int64_t h, int64_t d, int64_t& stride_tok,
                      int64_t& stride_head, bool is_output) {
  // max(.., 1): an empty dim still gets a valid (positive) default stride.
  if (stride_head == 0) stride_head = std::max<int64_t>(d, 1);
  if (stride_tok == 0) stride_tok = std::max<int64_t>(h, 1) * stride_head;
  check_outer(fn, name, n, stride_tok, h, stride_head, d, is_output);
}

void resolve_strides2(const char* fn, const char* name, int64_t n, int64_t d, int64_t& stride_tok, bool is_output) {
  if (stride_tok == 0) stride_tok = std::max<int64_t>(d, 1);
  check_outer(fn, name, n, stride_tok, 1, 1, d, is_output);
}

SeqInfo resolve_varlen(const char* fn, const Varlen& seq) {
  SeqInfo s;
  check_range(fn, "seq.n_q", seq.n_q, 0, INT32_MAX);
  check_range(fn, "seq.n_k", seq.n_k, 0, INT32_MAX);
  check_range(fn, "seq.batch", seq.batch, 1, INT32_MAX);
  s.n_q = seq.n_q;
  s.n_k = seq.n_k;
  s.batch = seq.batch;
  if (seq.cu_seqlens_q == nullptr) {
    if (seq.batch != 1) fail(fn, "seq.cu_seqlens_q is null with batch = " + std::to_string(seq.batch) +
                                     ", expected cu_seqlens_q for a batch of several sequences");
    s.cu_q = {0, int32_t(seq.n_q)};
  } else {
    s.cu_q.assign(seq.cu_seqlens_q, seq.cu_seqlens_q + seq.batch + 1);
  }
  if (seq.cu_seqlens_k == nullptr) {
    if (seq.n_k != seq.n_q) {
      std::ostringstream os;
      os << "seq.cu_seqlens_k is null with n_k = " << seq.n_k << " != n_q = " << seq.n_q
         << ", expected cu_seqlens_k when queries and keys differ";
      fail(fn, os.str());
    }
    s.cu_k = s.cu_q;
  } else {
    s.cu_k.assign(seq.cu_seqlens_k, seq.cu_seqlens_k + seq.batch + 1);
  }
  auto check_cu = [&](const std::vector<int32_t>& cu, const char* name, int64_t n) {
    if (cu[0] != 0) fail(fn, std::string(name) + "[0] = " + std::to_string(cu[0]) + ", expected 0");
    for (int64_t b = 0; b < seq.batch; ++b)
      if (cu[b + 1] < cu[b]) {
        std::ostringstream os;
        os << name << "[" << b + 1 << "] = " << cu[b + 1] << " < " << name << "[" << b << "] = " << cu[b]
           << ", expected non-decreasing offsets";
        fail(fn, os.str());
      }
    if (cu[seq.batch] != n) {
      std::ostringstream os;
      os << name << "[" << seq.batch << "] = " << cu[seq.batch] << ", expected the token count " << n;
      fail(fn, os.str());
    }
  };
  check_cu(s.cu_q, "seq.cu_seqlens_q", seq.n_q);
  check_cu(s.cu_k, "seq.cu_seqlens_k", seq.n_k);
  s.seq_of_q.resize(seq.n_q);
  s.pos.resize(seq.n_q);
  for (int64_t b = 0; b < seq.batch; ++b) {
    int64_t len_q = s.cu_q[b + 1] - s.cu_q[b], len_k = s.len_k(b);
    s.max_len_k = std::max(s.max_len_k, len_k);
    if (seq.q_pos == nullptr && len_q > len_k) {
      std::ostringstream os;
      os << "sequence " << b << " has " << len_q << " queries but " << len_k
         << " keys, expected len_q <= len_k (or q_pos for explicit positions)";
      fail(fn, os.str());
    }
    for (int64_t i = s.cu_q[b]; i < s.cu_q[b + 1]; ++i) {
      s.seq_of_q[i] = int32_t(b);
      int64_t p = seq.q_pos ? seq.q_pos[i] : len_k - len_q + (i - s.cu_q[b]);
      if (p < 0 || p >= len_k) {
        std::ostringstream os;
        os << "seq.q_pos[" << i << "] = " << p << ", expected 0 <= q_pos < " << len_k
           << " (the key count of sequence " << b << ")";
        fail(fn, os.str());
      }
      s.pos[i] = int32_t(p);
    }
  }
  return s;
}

void check_varlen_shape(const char* fn, const Varlen& seq) {
  check_range(fn, "seq.n_q", seq.n_q, 0, INT32_MAX);
  check_range(fn, "seq.n_k", seq.n_k, 0, INT32_MAX);
  check_range(fn, "seq.batch", seq.batch, 1, INT32_MAX);
  if (seq.cu_seqlens_q == nullptr && seq.batch != 1)
    fail(fn, "seq.cu_seqlens_q is null with batch = " + std::to_string(seq.batch) +
                 ", expected cu_seqlens_q for a batch of several sequences");
  if (seq.cu_seqlens_k == nullptr && seq.n_k != seq.n_q) {
    std::ostringstream os;
    os << "seq.cu_seqlens_k is null with n_k = " << seq.n_k << " != n_q = " << seq.n_q
       << ", expected cu_seqlens_k when queries and keys differ";
    fail(fn, os.str());
  }
  if (seq.cu_seqlens_q == nullptr && seq.cu_seqlens_k == nullptr && seq.q_pos == nullptr && seq.n_q > seq.n_k) {
    std::ostringstream os;
    os << "sequence 0 has " << seq.n_q << " queries but " << seq.n_k
       << " keys, expected len_q <= len_k (or q_pos for explicit positions)";
    fail(fn, os.str());
  }
}

SeqInfo check_varlen(const char* fn, const Varlen& seq, bool device) {
  if (!device) return resolve_varlen(fn, seq);
  check_varlen_shape(fn, seq);
  SeqInfo s;
  s.n_q = seq.n_q;
  s.n_k = seq.n_k;
  s.batch = seq.batch;
  return s;
}

void check_topk_idx(const char* fn, const SeqInfo& s, const int32_t* topk_idx, int64_t h_kv, int64_t topk,
                    int64_t bk) {
  check_ptr(fn, "topk_idx", topk_idx, s.n_q > 0);
  for (int64_t i = 0; i < s.n_q; ++i) {
    int64_t own = s.pos[i] / bk;
    for (int64_t r = 0; r < h_kv; ++r) {
      const int32_t* row = topk_idx + (i * h_kv + r) * topk;
      bool padding = false;
      for (int64_t t = 0; t < topk; ++t) {
        int32_t b = row[t];
        // The message is built only on failure: this loop runs for every selected entry.
        auto bad = [&](const std::string& expected) {
          std::ostringstream os;
          os << "topk_idx[" << i << ", " << r << ", " << t << "] = " << b << ", expected " << expected;
          fail(fn, os.str());
        };
        if (b == -1) {
          padding = true;
          continue;
        }
        if (padding) bad("-1 (padding must be a tail)");
        if (b < 0 || b > own)
          bad("-1 or a visible block 0 <= b <= " + std::to_string(own) + " (query position " +
              std::to_string(s.pos[i]) + ")");
        for (int64_t u = 0; u < t; ++u)
          if (row[u] == b) bad("no duplicate blocks in a row");
      }
    }
  }
}

}  // namespace msa::detail
