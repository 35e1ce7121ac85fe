// Public entry points of decode (append_kv, decode_index_topk, decode_attention): validation of
// the paged cache and the packed requests, then dispatch to the CPU reference or the CUDA kernels.
// On the CPU the device arrays (seq_lens, block table, offsets, selections) are host memory and
// are checked entry by entry; on CUDA they are device memory and only shapes are checked on the
// host (the kernels clamp what the arrays hold), which keeps the run calls capturable.
#include <cmath>
#include <sstream>
#include <unordered_map>
#include <vector>

#include "cpu/decode.h"
#include "validate.h"
#ifdef MSA_WITH_CUDA
#include "cuda/decode.h"
#include "cuda/host.h"
#endif

namespace msa {

using namespace detail;

namespace {

constexpr bool kCudaDecode = true;

int64_t blocks_of(int64_t len, int64_t bk) { return (len + bk - 1) / bk; }

void check_index_format(const char* fn, const char* name, IndexKeyFormat f) {
  if (f != IndexKeyFormat::native && f != IndexKeyFormat::fp8_e4m3)
    fail(fn, std::string(name) + " = " + std::to_string(int(f)) + ", expected native (0) or fp8_e4m3 (1)");
}

// Dimensions of the cache, checked on the host for both backends.
void check_cache_dims(const char* fn, const PagedKvCache& c, bool need_kv, bool need_idx) {
  check_range(fn, "cache.batch", c.batch, 1, INT32_MAX);
  check_range(fn, "cache.n_pages", c.n_pages, 0, INT32_MAX);
  check_range(fn, "cache.bk", c.bk, 1, 4096);
  check_range(fn, "cache.h_kv", c.h_kv, 1, 1024);
  if (need_kv) check_range(fn, "cache.d", c.d, 1, 512);
  if (need_idx) check_range(fn, "cache.d_idx", c.d_idx, 1, 512);
  check_range(fn, "cache.max_blocks", c.max_blocks, 0, INT32_MAX);
  check_ptr(fn, "cache.seq_lens", c.seq_lens);
  if (need_idx) check_index_format(fn, "cache.k_idx_format", c.k_idx_format);
}

// The index-key cache's scale pool: set exactly when the format is fp8_e4m3 (and the call touches
// the cache).
void check_index_scale(const char* fn, const PagedKvCache& c, bool any) {
  if (c.k_idx_format == IndexKeyFormat::fp8_e4m3) {
    check_ptr(fn, "cache.k_idx_scale", c.k_idx_scale, any);
  } else if (c.k_idx_scale != nullptr) {
    fail(fn, std::string("cache.k_idx_scale is set with cache.k_idx_format = ") +
                 index_key_format_name(c.k_idx_format) + ", expected null (scales belong to fp8_e4m3 only)");
  }
}

// The cache's seq_lens, read as host memory (CPU backend) after check_cache_dims.
std::vector<int32_t> read_seq_lens(const char* fn, const PagedKvCache& c) {
  std::vector<int32_t> lens(c.seq_lens, c.seq_lens + c.batch);
  const int64_t cap = c.max_blocks * c.bk;
  for (int64_t b = 0; b < c.batch; ++b)
    if (lens[b] < 0 || lens[b] > cap) {
      std::ostringstream os;
      os << "cache.seq_lens[" << b << "] = " << lens[b] << ", expected 0 <= seq_lens[" << b
         << "] <= max_blocks * bk = " << cap << " (the block table's capacity)";
      fail(fn, os.str());
    }
  return lens;
}

// Entries [j0, j1) of request b's row of the block table must be page ids.
void check_table_row(const char* fn, const PagedKvCache& c, int64_t b, int64_t j0, int64_t j1, int32_t len) {
  if (j1 <= j0) return;
  check_ptr(fn, "cache.block_table", c.block_table);
  for (int64_t j = j0; j < j1; ++j) {
    int32_t page = c.block_table[b * c.max_blocks + j];
    if (page < 0 || page >= c.n_pages) {
      std::ostringstream os;
      os << "cache.block_table[" << b << ", " << j << "] = " << page
         << ", expected a page id 0 <= id < n_pages = " << c.n_pages << " (block " << j << " holds tokens of request "
         << b << ", seq_lens[" << b << "] = " << len << ")";
      fail(fn, os.str());
    }
  }
}

// Packed offsets [batch+1] from 0 to n (nullptr: batch == 1, {0, n}); request b gets at most
// seq_lens[b] rows, the last tokens of its cache.
std::vector<int32_t> check_cu(const char* fn, const char* name, const int32_t* cu_ptr, int64_t n, const char* n_name,
                              const std::vector<int32_t>& lens, const char* what) {
  const int64_t batch = int64_t(lens.size());
  check_range(fn, n_name, n, 0, INT32_MAX);
  std::vector<int32_t> cu;
  if (cu_ptr == nullptr) {
    if (batch != 1)
      fail(fn, std::string(name) + " is null with batch = " + std::to_string(batch) +
                   ", expected offsets for a batch of several requests");
    cu = {0, int32_t(n)};
  } else {
    cu.assign(cu_ptr, cu_ptr + batch + 1);
  }
  if (cu[0] != 0) fail(fn, std::string(name) + "[0] = " + std::to_string(cu[0]) + ", expected 0");
  for (int64_t b = 0; b < batch; ++b)
    if (cu[b + 1] < cu[b]) {
      std::ostringstream os;
      os << name << "[" << b + 1 << "] = " << cu[b + 1] << " < " << name << "[" << b << "] = " << cu[b]
         << ", expected non-decreasing offsets";
      fail(fn, os.str());
    }
  if (cu[batch] != n) {
    std::ostringstream os;
    os << name << "[" << batch << "] = " << cu[batch] << ", expected " << n_name << " = " << n;
    fail(fn, os.str());
  }
  for (int64_t b = 0; b < batch; ++b) {
    int64_t cnt = cu[b + 1] - cu[b];
    if (cnt > lens[b]) {
      std::ostringstream os;
      os << name << ": request " << b << " has " << cnt << " " << what << " but cache.seq_lens[" << b
         << "] = " << lens[b] << ", expected at most seq_lens[" << b << "] (they are the last tokens of its cache)";
      fail(fn, os.str());
    }
  }
  return cu;
}

// The query side of a decode call as a SeqInfo (n_k and cu_k unused), after checking the block
// table of every request that has queries: they see all its cached tokens.
SeqInfo resolve_queries(const char* fn, const PagedKvCache& c, const std::vector<int32_t>& lens, int64_t n_q,
                        const int32_t* cu_seqlens_q) {
  SeqInfo s;
  s.cu_q = check_cu(fn, "cu_seqlens_q", cu_seqlens_q, n_q, "n_q", lens, "query tokens");
  s.n_q = n_q;
  s.batch = c.batch;
  s.seq_of_q.resize(n_q);
  s.pos.resize(n_q);
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t len_q = s.cu_q[b + 1] - s.cu_q[b];
    if (len_q == 0) continue;
    check_table_row(fn, c, b, 0, blocks_of(lens[b], c.bk), lens[b]);
    s.max_len_k = std::max<int64_t>(s.max_len_k, lens[b]);
    for (int64_t t = 0; t < len_q; ++t) {
      s.seq_of_q[s.cu_q[b] + t] = int32_t(b);
      s.pos[s.cu_q[b] + t] = int32_t(lens[b] - len_q + t);
    }
  }
  return s;
}

void check_plan_backend(const char* fn, const DecodePlan& plan, const Exec& ex) {
  if (plan.backend != ex.backend)
    fail(fn, std::string("plan.backend = ") + backend_name(plan.backend) + ", expected the call's backend " +
                 backend_name(ex.backend) + " (plan_decode with the same Exec)");
}

// What the CUDA attention kernel supports (any g, any topk up to kMaxTopk, dense): head dims of
// its instantiations and pages of whole 16-key chunks.
void check_cuda_attention_dims(const char* fn, const char* d_name, int64_t d, const char* bk_name, int64_t bk) {
  if (d != 64 && d != 128)
    fail(fn, std::string(d_name) + " = " + std::to_string(d) + ", expected 64 or 128 on the cuda backend");
  if (bk < 16 || bk > 256 || bk % 16 != 0)
    fail(fn, std::string(bk_name) + " = " + std::to_string(bk) +
                 ", expected a multiple of 16 from 16 to 256 on the cuda backend");
}

// On CUDA a null offsets array means one request, as on the CPU; its contents are not read.
void check_offsets_ptr(const char* fn, const char* name, const int32_t* cu, int64_t batch) {
  if (cu == nullptr && batch != 1)
    fail(fn, std::string(name) + " is null with batch = " + std::to_string(batch) +
                 ", expected offsets for a batch of several requests");
}

#ifdef MSA_WITH_CUDA
// Checks of the CUDA run calls, which see device arrays: shapes and the plan fit only.

void check_plan_eq(const char* fn, const char* arg, int64_t value, const char* field, int64_t planned) {
  if (value != planned)
    fail(fn, std::string(arg) + " = " + std::to_string(value) + ", expected plan.shape." + field + " = " +
                 std::to_string(planned) + " (the shape the plan was made for)");
}

void check_plan_le(const char* fn, const char* arg, int64_t value, const char* field, int64_t planned) {
  if (value > planned)
    fail(fn, std::string(arg) + " = " + std::to_string(value) + ", expected at most plan.shape." + field + " = " +
                 std::to_string(planned) + " (the bound the plan was made for)");
}

// What every run call shares: the batch, query and table bounds and the cache layout.
void check_plan_fit(const char* fn, const DecodePlan& plan, const PagedKvCache& c, int64_t n_q, DType dtype) {
  const DecodeShape& s = plan.shape;
  if (dtype != s.dtype)
    fail(fn, std::string("dtype = ") + dtype_name(dtype) + ", expected plan.shape.dtype = " + dtype_name(s.dtype));
  check_plan_le(fn, "cache.batch", c.batch, "batch", s.batch);
  check_plan_le(fn, "n_q", n_q, "n_q", s.n_q);
  check_plan_le(fn, "cache.max_blocks", c.max_blocks, "max_blocks", s.max_blocks);
  check_plan_eq(fn, "cache.bk", c.bk, "bk", s.bk);
  check_plan_eq(fn, "cache.h_kv", c.h_kv, "h_kv", s.h_kv);
}

void check_workspace(const char* fn, const DecodePlan& plan, const void* workspace) {
  if (plan.workspace_bytes > 0 && workspace == nullptr)
    fail(fn, "workspace is null, expected plan.workspace_bytes = " + std::to_string(plan.workspace_bytes) +
                 " bytes of device memory");
  if (reinterpret_cast<uintptr_t>(workspace) % 256 != 0)
    fail(fn,
         "workspace is not 256-byte aligned, expected an allocation of plan.workspace_bytes with 256-byte alignment");
}

void check_aligned16(const char* fn, const char* name, const void* ptr) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
    fail(fn, std::string(name) + " is not 16-byte aligned, expected the page pool at a 16-byte boundary");
}
#endif  // MSA_WITH_CUDA

// Stream-ordered scratch for the convenience forms (CUDA only), freed after the launches of f.
template <class F>
void with_scratch(size_t bytes, const Exec& ex, F&& f) {
#ifdef MSA_WITH_CUDA
  auto stream = static_cast<cudaStream_t>(ex.stream);
  void* ws = bytes ? cuda::scratch_alloc(bytes, stream) : nullptr;
  try {
    f(ws);
  } catch (...) {
    if (ws) cuda::scratch_free(ws, stream);
    throw;
  }
  if (ws) cuda::scratch_free(ws, stream);
#else
  (void)bytes, (void)ex;
  f(nullptr);
#endif
}

}  // namespace

// Each run call checks, in this order: the cache's dimensions; on the CPU its seq_lens, offsets
// and table rows (host memory), on CUDA only their shapes; strides and pointers (both); then the
// CPU's entry checks or CUDA's plan fit, and runs.

void append_kv(const AppendKvParams& p0, const Exec& ex) {
  const char* fn = "append_kv";
  AppendKvParams p = p0;
  check_backend(fn, ex, kCudaDecode);
  check_dtype(fn, p.dtype, ex);
  const PagedKvCache& c = p.cache;
  const bool cuda = ex.backend == Backend::cuda;
  const bool with_idx = p.k_idx != nullptr || c.k_idx_cache != nullptr;
  check_cache_dims(fn, c, true, with_idx);
  std::vector<int32_t> lens, cu;
  if (cuda) {
    check_range(fn, "n_new", p.n_new, 0, INT32_MAX);
    check_offsets_ptr(fn, "cu_new", p.cu_new, c.batch);
  } else {
    lens = read_seq_lens(fn, c);
    cu = check_cu(fn, "cu_new", p.cu_new, p.n_new, "n_new", lens, "new tokens");
  }
  resolve_strides3(fn, "k", p.n_new, c.h_kv, c.d, p.stride_k_tok, p.stride_k_head, false);
  resolve_strides3(fn, "v", p.n_new, c.h_kv, c.d, p.stride_v_tok, p.stride_v_head, false);
  const bool any = p.n_new > 0;
  check_ptr(fn, "k", p.k, any);
  check_ptr(fn, "v", p.v, any);
  check_ptr(fn, "cache.k_cache", c.k_cache, any);
  check_ptr(fn, "cache.v_cache", c.v_cache, any);
  if (cuda) check_ptr(fn, "cache.block_table", c.block_table, any);
  if (with_idx) {
    if (p.k_idx == nullptr || c.k_idx_cache == nullptr)
      fail(fn, std::string(p.k_idx ? "cache.k_idx_cache" : "k_idx") +
                   " is null but the other is set, expected k_idx and cache.k_idx_cache both set (or both null "
                   "for a layer without an index branch)");
    resolve_strides2(fn, "k_idx", p.n_new, c.d_idx, p.stride_k_idx_tok, false);
    check_index_scale(fn, c, any);
  }
  if (cuda) {
#ifdef MSA_WITH_CUDA
    if (any) cuda::run_append_kv(p, static_cast<cudaStream_t>(ex.stream));
#endif
    return;
  }
  // Only the blocks that receive tokens are read from the table; each must be a distinct page,
  // or two writers would race for its slots.
  std::unordered_map<int32_t, std::pair<int64_t, int64_t>> writer;  // page -> (request, block)
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t n_new_b = cu[b + 1] - cu[b];
    if (n_new_b == 0) continue;
    const int64_t j0 = (lens[b] - n_new_b) / c.bk, j1 = blocks_of(lens[b], c.bk);
    check_table_row(fn, c, b, j0, j1, lens[b]);
    for (int64_t j = j0; j < j1; ++j) {
      int32_t page = c.block_table[b * c.max_blocks + j];
      auto [it, fresh] = writer.emplace(page, std::make_pair(b, j));
      if (!fresh) {
        std::ostringstream os;
        os << "cache.block_table[" << b << ", " << j << "] = " << page
           << ", expected a page that no other block writes in this call (block_table[" << it->second.first << ", "
           << it->second.second << "] = " << page << " also receives new tokens)";
        fail(fn, os.str());
      }
    }
  }
  if (p.n_new == 0) return;
  cpu::append_kv(p, cu, lens, ex.num_threads);
}

void decode_index_topk(const DecodeIndexParams& p0, const DecodePlan& plan, void* workspace, const Exec& ex) {
  const char* fn = "decode_index_topk";
  DecodeIndexParams p = p0;
  check_backend(fn, ex, kCudaDecode);
  check_dtype(fn, p.dtype, ex);
  check_plan_backend(fn, plan, ex);
  const PagedKvCache& c = p.cache;
  const bool cuda = ex.backend == Backend::cuda;
  check_range(fn, "topk", p.topk, 1, kMaxTopk);
  check_cache_dims(fn, c, false, true);
  std::vector<int32_t> lens;
  if (!cuda) lens = read_seq_lens(fn, c);
  resolve_scale(fn, "index_scale", p.index_scale, float(1.0 / std::sqrt(double(c.d_idx))));
  SeqInfo s;
  if (cuda) {
    check_range(fn, "n_q", p.n_q, 0, INT32_MAX);
    check_offsets_ptr(fn, "cu_seqlens_q", p.cu_seqlens_q, c.batch);
  } else {
    s = resolve_queries(fn, c, lens, p.n_q, p.cu_seqlens_q);
  }
  resolve_strides3(fn, "q_idx", p.n_q, c.h_kv, c.d_idx, p.stride_q_idx_tok, p.stride_q_idx_head, false);
  const bool any = p.n_q > 0;
  check_ptr(fn, "q_idx", p.q_idx, any);
  check_ptr(fn, "cache.k_idx_cache", c.k_idx_cache, any);
  check_index_scale(fn, c, any);
  if (cuda) check_ptr(fn, "cache.block_table", c.block_table, any);
  check_ptr(fn, "topk_idx", p.topk_idx, any);
  if (cuda) {
#ifdef MSA_WITH_CUDA
    const DecodeShape& sh = plan.shape;
    if (sh.d_idx == 0) fail(fn, "plan.shape.d_idx = 0: the plan has no index pass, expected a plan made with d_idx > 0");
    check_plan_fit(fn, plan, c, p.n_q, p.dtype);
    check_plan_eq(fn, "cache.d_idx", c.d_idx, "d_idx", sh.d_idx);
    check_plan_eq(fn, "topk", p.topk, "topk", sh.topk);
    if (c.k_idx_format != sh.k_idx_format)
      fail(fn, std::string("cache.k_idx_format = ") + index_key_format_name(c.k_idx_format) +
                   ", expected plan.shape.k_idx_format = " + index_key_format_name(sh.k_idx_format));
    if (c.k_idx_format == IndexKeyFormat::fp8_e4m3 && reinterpret_cast<uintptr_t>(c.k_idx_scale) % 16 != 0)
      fail(fn, "cache.k_idx_scale is not 16-byte aligned, expected the scale pool at a 16-byte boundary");
    if (!any) return;
    check_workspace(fn, plan, workspace);
    cuda::run_decode_index_topk(p, plan, workspace, static_cast<cudaStream_t>(ex.stream));
#endif
    return;
  }
  (void)workspace;  // the CPU needs none
  if (!any) return;
  cpu::decode_index_topk(p, s, lens, ex.num_threads);
}

void decode_attention(const DecodeAttentionParams& p0, const DecodePlan& plan, void* workspace, const Exec& ex) {
  const char* fn = "decode_attention";
  DecodeAttentionParams p = p0;
  check_backend(fn, ex, kCudaDecode);
  check_dtype(fn, p.dtype, ex);
  check_plan_backend(fn, plan, ex);
  const PagedKvCache& c = p.cache;
  const bool cuda = ex.backend == Backend::cuda;
  const bool dense = p.topk_idx == nullptr;  // every visible block (dense decode)
  if (!dense) check_range(fn, "topk", p.topk, 1, kMaxTopk);
  check_cache_dims(fn, c, true, false);
  std::vector<int32_t> lens;
  if (!cuda) lens = read_seq_lens(fn, c);
  check_heads(fn, p.h_q, c.h_kv);
  resolve_scale(fn, "scale", p.scale, float(1.0 / std::sqrt(double(c.d))));
  SeqInfo s;
  if (cuda) {
    check_range(fn, "n_q", p.n_q, 0, INT32_MAX);
    check_offsets_ptr(fn, "cu_seqlens_q", p.cu_seqlens_q, c.batch);
  } else {
    s = resolve_queries(fn, c, lens, p.n_q, p.cu_seqlens_q);
  }
  resolve_strides3(fn, "q", p.n_q, p.h_q, c.d, p.stride_q_tok, p.stride_q_head, false);
  resolve_strides3(fn, "o", p.n_q, p.h_q, c.d, p.stride_o_tok, p.stride_o_head, true);
  const bool any = p.n_q > 0;
  check_ptr(fn, "q", p.q, any);
  check_ptr(fn, "cache.k_cache", c.k_cache, any);
  check_ptr(fn, "cache.v_cache", c.v_cache, any);
  if (cuda) check_ptr(fn, "cache.block_table", c.block_table, any);
  check_ptr(fn, "o", p.o, any);
  check_ptr(fn, "lse", p.lse, any);
  if (cuda) {
#ifdef MSA_WITH_CUDA
    const DecodeShape& sh = plan.shape;
    if (sh.h_q == 0 || sh.d == 0)
      fail(fn, "plan.shape.h_q = " + std::to_string(sh.h_q) + ", plan.shape.d = " + std::to_string(sh.d) +
                   ": the plan has no attention, expected a plan made with h_q > 0 and d > 0");
    check_plan_fit(fn, plan, c, p.n_q, p.dtype);
    check_plan_eq(fn, "h_q", p.h_q, "h_q", sh.h_q);
    check_plan_eq(fn, "cache.d", c.d, "d", sh.d);
    check_plan_eq(fn, "topk (0: topk_idx is null, dense decode)", dense ? 0 : p.topk, "topk", sh.topk);
    check_cuda_attention_dims(fn, "cache.d", c.d, "cache.bk", c.bk);
    check_aligned16(fn, "cache.k_cache", c.k_cache);
    check_aligned16(fn, "cache.v_cache", c.v_cache);
    if (!any) return;
    check_workspace(fn, plan, workspace);
    cuda::run_decode_attention(p, plan, workspace, static_cast<cudaStream_t>(ex.stream));
#endif
    return;
  }
  (void)workspace;  // the CPU needs none
  if (!dense) check_topk_idx(fn, s, p.topk_idx, c.h_kv, p.topk, c.bk);
  if (!any) return;
  cpu::decode_attention(p, s, lens, ex.num_threads);
}

DecodePlan plan_decode(const DecodeShape& s, const Exec& ex) {
  const char* fn = "plan_decode";
  check_backend(fn, ex, kCudaDecode);
  check_dtype(fn, s.dtype, ex);
  check_range(fn, "shape.batch", s.batch, 1, INT32_MAX);
  check_range(fn, "shape.n_q", s.n_q, 0, INT32_MAX);
  check_range(fn, "shape.max_q", s.max_q, 1, INT32_MAX);
  check_range(fn, "shape.max_blocks", s.max_blocks, 0, INT32_MAX);
  check_range(fn, "shape.bk", s.bk, 1, 4096);
  check_range(fn, "shape.h_kv", s.h_kv, 1, 1024);
  check_range(fn, "shape.d", s.d, 0, 512);
  check_range(fn, "shape.d_idx", s.d_idx, 0, 512);
  check_range(fn, "shape.topk", s.topk, 0, kMaxTopk);
  check_index_format(fn, "shape.k_idx_format", s.k_idx_format);
  const bool attn = s.h_q > 0 || s.d > 0;
  if (attn) {
    check_heads(fn, s.h_q, s.h_kv);
    check_range(fn, "shape.d", s.d, 1, 512);
  }
  if (s.d_idx > 0 && s.topk == 0)
    fail(fn, "shape.topk = 0 with shape.d_idx = " + std::to_string(s.d_idx) +
                 ", expected 1 <= topk <= " + std::to_string(kMaxTopk) + " for an index pass");
  if (!attn && s.d_idx == 0)
    fail(fn, "shape plans nothing (h_q, d and d_idx all 0), expected an attention, an index pass or both");
  DecodePlan plan;
  plan.shape = s;
  plan.backend = ex.backend;
  if (ex.backend == Backend::cuda) {
#ifdef MSA_WITH_CUDA
    if (attn) check_cuda_attention_dims(fn, "shape.d", s.d, "shape.bk", s.bk);
    const size_t idx = s.d_idx > 0 ? cuda::align256(cuda::plan_decode_index(plan)) : 0;
    const size_t att = attn ? cuda::align256(cuda::plan_decode_attention(plan)) : 0;
    plan.index_workspace_offset = 0;
    plan.attention_workspace_offset = idx;
    plan.workspace_bytes = idx + att;
#endif
  }
  return plan;
}

// The convenience forms plan for exactly the call at hand. On CUDA the per-request query count is
// unknown on the host (the offsets are device memory): the plan takes the packed count, capped at
// 16, as its hint; the kernels are correct for any count.
namespace {

DecodeShape shape_of(const PagedKvCache& c, int64_t n_q, DType dtype) {
  DecodeShape s;
  s.batch = c.batch;
  s.n_q = n_q;
  s.max_q = std::max<int64_t>(1, std::min<int64_t>(n_q, 16));
  s.max_blocks = c.max_blocks;
  s.bk = c.bk;
  s.h_kv = c.h_kv;
  s.dtype = dtype;
  s.h_q = 0;
  s.d = 0;
  s.d_idx = 0;
  return s;
}

}  // namespace

void decode_index_topk(const DecodeIndexParams& p, const Exec& ex) {
  DecodePlan plan;
  plan.backend = Backend::cpu;
  if (ex.backend != Backend::cuda) return decode_index_topk(p, plan, nullptr, ex);
  check_backend("decode_index_topk", ex, kCudaDecode);
  DecodeShape s = shape_of(p.cache, p.n_q, p.dtype);
  s.d_idx = p.cache.d_idx;
  s.topk = p.topk;
  s.k_idx_format = p.cache.k_idx_format;
  // Argument errors surface from the planned call, which names the call's own fields.
  if (p.n_q <= 0 || s.d_idx <= 0 || p.topk < 1 || p.topk > kMaxTopk || p.cache.batch < 1 || p.cache.h_kv < 1 ||
      p.cache.bk < 1 || p.cache.max_blocks < 0 || p.dtype != DType::bf16 ||
      (p.cache.k_idx_format != IndexKeyFormat::native && p.cache.k_idx_format != IndexKeyFormat::fp8_e4m3) ||
      (p.cu_seqlens_q == nullptr && p.cache.batch != 1))
    return decode_index_topk(p, DecodePlan{s, Backend::cuda}, nullptr, ex);
  plan = plan_decode(s, ex);
  with_scratch(plan.workspace_bytes, ex, [&](void* ws) { decode_index_topk(p, plan, ws, ex); });
}

void decode_attention(const DecodeAttentionParams& p, const Exec& ex) {
  DecodePlan plan;
  plan.backend = Backend::cpu;
  if (ex.backend != Backend::cuda) return decode_attention(p, plan, nullptr, ex);
  check_backend("decode_attention", ex, kCudaDecode);
  DecodeShape s = shape_of(p.cache, p.n_q, p.dtype);
  s.h_q = p.h_q;
  s.d = p.cache.d;
  s.topk = p.topk_idx == nullptr ? 0 : p.topk;
  if (p.n_q <= 0 || s.d <= 0 || s.h_q <= 0 || p.cache.h_kv < 1 || s.h_q % p.cache.h_kv != 0 ||
      (p.topk_idx != nullptr && (p.topk < 1 || p.topk > kMaxTopk)) || p.cache.batch < 1 || p.cache.bk < 1 ||
      p.cache.max_blocks < 0 || p.dtype != DType::bf16 || (p.cu_seqlens_q == nullptr && p.cache.batch != 1))
    return decode_attention(p, DecodePlan{s, Backend::cuda}, nullptr, ex);
  check_cuda_attention_dims("decode_attention", "cache.d", s.d, "cache.bk", s.bk);
  plan = plan_decode(s, ex);
  with_scratch(plan.workspace_bytes, ex, [&](void* ws) { decode_attention(p, plan, ws, ex); });
}

}  // namespace msa
