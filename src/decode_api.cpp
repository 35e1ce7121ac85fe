// Public entry points of decode (append_kv, decode_index_topk, decode_attention): validation of
// the paged cache and the packed requests, then dispatch. Only the CPU reference exists so far.
#include <cmath>
#include <sstream>
#include <unordered_map>
#include <vector>

#include "cpu/decode.h"
#include "validate.h"

namespace msa {

using namespace detail;

namespace {

// The CUDA kernels come later behind the same API; until then the cuda backend throws before any
// pointer (device memory there) is read on the host.
constexpr bool kCudaDecode = false;

int64_t blocks_of(int64_t len, int64_t bk) { return (len + bk - 1) / bk; }

// Dimensions of the cache and its seq_lens, read as host memory. Returns seq_lens.
std::vector<int32_t> check_cache(const char* fn, const PagedKvCache& c, bool need_kv, bool need_idx) {
  check_range(fn, "cache.batch", c.batch, 1, INT32_MAX);
  check_range(fn, "cache.n_pages", c.n_pages, 0, INT32_MAX);
  check_range(fn, "cache.bk", c.bk, 1, 4096);
  check_range(fn, "cache.h_kv", c.h_kv, 1, 1024);
  if (need_kv) check_range(fn, "cache.d", c.d, 1, 512);
  if (need_idx) check_range(fn, "cache.d_idx", c.d_idx, 1, 512);
  check_range(fn, "cache.max_blocks", c.max_blocks, 0, INT32_MAX);
  check_ptr(fn, "cache.seq_lens", c.seq_lens);
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
      os << "cache.block_table[" << b << ", " << j << "] = " << page << ", expected a page id 0 <= id < n_pages = "
         << c.n_pages << " (block " << j << " holds tokens of request " << b << ", seq_lens[" << b << "] = " << len
         << ")";
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

}  // namespace

void append_kv(const AppendKvParams& p0, const Exec& ex) {
  const char* fn = "append_kv";
  AppendKvParams p = p0;
  check_backend(fn, ex, kCudaDecode);
  check_dtype(fn, p.dtype, ex);
  const PagedKvCache& c = p.cache;
  const bool with_idx = p.k_idx != nullptr || c.k_idx_cache != nullptr;
  std::vector<int32_t> lens = check_cache(fn, c, true, with_idx);
  std::vector<int32_t> cu = check_cu(fn, "cu_new", p.cu_new, p.n_new, "n_new", lens, "new tokens");
  resolve_strides3(fn, "k", p.n_new, c.h_kv, c.d, p.stride_k_tok, p.stride_k_head, false);
  resolve_strides3(fn, "v", p.n_new, c.h_kv, c.d, p.stride_v_tok, p.stride_v_head, false);
  const bool any = p.n_new > 0;
  check_ptr(fn, "k", p.k, any);
  check_ptr(fn, "v", p.v, any);
  check_ptr(fn, "cache.k_cache", c.k_cache, any);
  check_ptr(fn, "cache.v_cache", c.v_cache, any);
  if (with_idx) {
    if (p.k_idx == nullptr || c.k_idx_cache == nullptr)
      fail(fn, std::string(p.k_idx ? "cache.k_idx_cache" : "k_idx") +
                   " is null but the other is set, expected k_idx and cache.k_idx_cache both set (or both null "
                   "for a layer without an index branch)");
    resolve_strides2(fn, "k_idx", p.n_new, c.d_idx, p.stride_k_idx_tok, false);
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

void decode_index_topk(const DecodeIndexParams& p0, const Exec& ex) {
  const char* fn = "decode_index_topk";
  DecodeIndexParams p = p0;
  check_backend(fn, ex, kCudaDecode);
  check_dtype(fn, p.dtype, ex);
  const PagedKvCache& c = p.cache;
  std::vector<int32_t> lens = check_cache(fn, c, false, true);
  check_range(fn, "topk", p.topk, 1, kMaxTopk);
  resolve_scale(fn, "index_scale", p.index_scale, float(1.0 / std::sqrt(double(c.d_idx))));
  SeqInfo s = resolve_queries(fn, c, lens, p.n_q, p.cu_seqlens_q);
  resolve_strides3(fn, "q_idx", s.n_q, c.h_kv, c.d_idx, p.stride_q_idx_tok, p.stride_q_idx_head, false);
  const bool any = s.n_q > 0;
  check_ptr(fn, "q_idx", p.q_idx, any);
  check_ptr(fn, "cache.k_idx_cache", c.k_idx_cache, any);
  check_ptr(fn, "topk_idx", p.topk_idx, any);
  if (!any) return;
  cpu::decode_index_topk(p, s, lens, ex.num_threads);
}

void decode_attention(const DecodeAttentionParams& p0, const Exec& ex) {
  const char* fn = "decode_attention";
  DecodeAttentionParams p = p0;
  check_backend(fn, ex, kCudaDecode);
  check_dtype(fn, p.dtype, ex);
  const PagedKvCache& c = p.cache;
  std::vector<int32_t> lens = check_cache(fn, c, true, false);
  check_heads(fn, p.h_q, c.h_kv);
  check_range(fn, "topk", p.topk, 1, kMaxTopk);
  resolve_scale(fn, "scale", p.scale, float(1.0 / std::sqrt(double(c.d))));
  SeqInfo s = resolve_queries(fn, c, lens, p.n_q, p.cu_seqlens_q);
  resolve_strides3(fn, "q", s.n_q, p.h_q, c.d, p.stride_q_tok, p.stride_q_head, false);
  resolve_strides3(fn, "o", s.n_q, p.h_q, c.d, p.stride_o_tok, p.stride_o_head, true);
  const bool any = s.n_q > 0;
  check_ptr(fn, "q", p.q, any);
  check_ptr(fn, "cache.k_cache", c.k_cache, any);
  check_ptr(fn, "cache.v_cache", c.v_cache, any);
  check_ptr(fn, "o", p.o, any);
  check_ptr(fn, "lse", p.lse, any);
  check_topk_idx(fn, s, p.topk_idx, c.h_kv, p.topk, c.bk);
  if (!any) return;
  cpu::decode_attention(p, s, lens, ex.num_threads);
}

}  // namespace msa
