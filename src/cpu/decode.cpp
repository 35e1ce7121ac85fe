// CPU reference of decode: append into the paged cache, and the decode index pass and sparse (or
// dense, topk_idx = nullptr) decode attention by gathering each request's cached tokens into packed
// rows and running the prefill reference (index_topk, attention_forward) on them with the queries
// at the last positions.
//
// Shapes: k_cache, v_cache [n_pages, bk, h_kv, d]; k_idx_cache [n_pages, bk, d_idx];
// block_table [batch, max_blocks]; q_idx [n_q, h_kv, d_idx]; q, o [n_q, h_q, d]; lse [n_q, h_q];
// topk_idx [n_q, h_kv, topk]; new k, v [n_new, h_kv, d]; new k_idx [n_new, d_idx].
//
// Running the prefill code on the gathered rows makes "decode == prefill on the last tokens" hold
// bit for bit (the same values in the same summation order), which is what the CUDA kernels will
// be tested against. Only slots below seq_lens[b] of the pages the table names are read.
#include "decode.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_ops.h"
#include "cpu_util.h"
#include "../fp8.h"

namespace msa::cpu {
namespace {

// Gathered cache rows of one chunk of requests are capped near this many elements, so a batch of
// long contexts is processed a few requests at a time (one request is never split).
constexpr int64_t kChunkElems = int64_t(1) << 26;

// Byte address of (page, slot) in a cache of `row` elements per token.
inline const uint8_t* slot_ptr(const void* cache, int64_t page, int64_t slot, int64_t bk, int64_t row, int64_t es) {
  return static_cast<const uint8_t*>(cache) + ((page * bk + slot) * row) * es;
}

// Runs f(b0, b1) over consecutive chunks of requests whose gathered rows (keys of requests with
// queries, `row` elements per token) stay near kChunkElems.
template <class F>
void for_chunks(const detail::SeqInfo& s, const std::vector<int32_t>& lens, int64_t row, F&& f) {
  int64_t b0 = 0;
  while (b0 < s.batch) {
    int64_t b1 = b0, elems = 0;
    while (b1 < s.batch) {
      const bool has_q = s.cu_q[b1 + 1] > s.cu_q[b1];
      const int64_t e = has_q ? int64_t(lens[b1]) * row : 0;
      if (b1 > b0 && elems + e > kChunkElems) break;
      elems += e;
      ++b1;
    }
    f(b0, b1);
    b0 = b1;
  }
}

// The query side of requests [b0, b1) re-based to row 0, with key rows cu_k = the gathered tokens
// (all seq_lens[b] of a request with queries, none otherwise).
detail::SeqInfo chunk_info(const detail::SeqInfo& s, const std::vector<int32_t>& lens, int64_t b0, int64_t b1) {
  detail::SeqInfo c;
  c.batch = b1 - b0;
  const int32_t q0 = s.cu_q[b0];
  c.n_q = s.cu_q[b1] - q0;
  c.cu_q.resize(c.batch + 1);
  c.cu_k.assign(c.batch + 1, 0);
  for (int64_t b = b0; b <= b1; ++b) c.cu_q[b - b0] = s.cu_q[b] - q0;
  for (int64_t b = b0; b < b1; ++b) {
    const bool has_q = s.cu_q[b + 1] > s.cu_q[b];
    c.cu_k[b - b0 + 1] = c.cu_k[b - b0] + (has_q ? lens[b] : 0);
    if (has_q) c.max_len_k = std::max<int64_t>(c.max_len_k, lens[b]);
  }
  c.n_k = c.cu_k[c.batch];
  c.seq_of_q.resize(c.n_q);
  c.pos.assign(s.pos.begin() + q0, s.pos.begin() + q0 + c.n_q);
  for (int64_t i = 0; i < c.n_q; ++i) c.seq_of_q[i] = s.seq_of_q[q0 + i] - int32_t(b0);
  return c;
}

// Copies the cached tokens of request b (chunk-relative key rows from c.cu_k[b - b0]) into dst,
// `row` elements per token; only the logical blocks with use[j] set (all when use is empty).
void gather(const PagedKvCache& cache, const void* src, int64_t row, int64_t es, int64_t b, int32_t len,
            const std::vector<char>& use, uint8_t* dst, int num_threads) {
  const int64_t bk = cache.bk, n_blk = (len + bk - 1) / bk;
  const int32_t* table = cache.block_table + b * cache.max_blocks;
  parallel_for(n_blk, num_threads, [&](int64_t j) {
    if (!use.empty() && !use[j]) return;
    const int64_t n = std::min<int64_t>(bk, len - j * bk);  // the last page holds fewer valid slots
    std::memcpy(dst + j * bk * row * es, slot_ptr(src, table[j], 0, bk, row, es), size_t(n * row * es));
  });
}

}  // namespace

void append_kv(const AppendKvParams& p, const std::vector<int32_t>& cu_new, const std::vector<int32_t>& lens,
               int num_threads) {
  const PagedKvCache& c = p.cache;
  const int64_t es = dtype_size(p.dtype), bk = c.bk, h_kv = c.h_kv, d = c.d, d_idx = c.d_idx;
  const int64_t batch = c.batch;
  std::vector<int32_t> req(p.n_new);
  for (int64_t b = 0; b < batch; ++b)
    for (int32_t i = cu_new[b]; i < cu_new[b + 1]; ++i) req[i] = int32_t(b);
  // Every token owns its slot (distinct positions, pages checked distinct per written block).
  parallel_for(p.n_new, num_threads, [&](int64_t i) {
    const int64_t b = req[i], n_new_b = cu_new[b + 1] - cu_new[b];
    const int64_t pos = lens[b] - n_new_b + (i - cu_new[b]);
    const int64_t page = c.block_table[b * c.max_blocks + pos / bk], slot = pos % bk;
    uint8_t* k_dst = static_cast<uint8_t*>(c.k_cache) + ((page * bk + slot) * h_kv * d) * es;
    uint8_t* v_dst = static_cast<uint8_t*>(c.v_cache) + ((page * bk + slot) * h_kv * d) * es;
    for (int64_t r = 0; r < h_kv; ++r) {
      std::memcpy(k_dst + r * d * es,
                  static_cast<const uint8_t*>(p.k) + (i * p.stride_k_tok + r * p.stride_k_head) * es, size_t(d * es));
      std::memcpy(v_dst + r * d * es,
                  static_cast<const uint8_t*>(p.v) + (i * p.stride_v_tok + r * p.stride_v_head) * es, size_t(d * es));
    }
    if (p.k_idx && c.k_idx_format == IndexKeyFormat::fp8_e4m3) {
      std::vector<float> x(d_idx);
      for (int64_t e = 0; e < d_idx; ++e) x[e] = float(load(p.k_idx, p.dtype, i * p.stride_k_idx_tok + e));
      uint8_t* x_dst = static_cast<uint8_t*>(c.k_idx_cache) + (page * bk + slot) * d_idx;
      c.k_idx_scale[page * bk + slot] = detail::e4m3_quantize_row(x.data(), d_idx, x_dst);
    } else if (p.k_idx) {
      uint8_t* x_dst = static_cast<uint8_t*>(c.k_idx_cache) + ((page * bk + slot) * d_idx) * es;
      std::memcpy(x_dst, static_cast<const uint8_t*>(p.k_idx) + i * p.stride_k_idx_tok * es, size_t(d_idx * es));
    }
  });
}

namespace {

// The prefill index_topk on a chunk's gathered keys (rows d_idx apart) for its queries from packed
// row q0: the dtype and the q_idx layout are the caller's (the call's own, or float64 copies).
void run_chunk_index(const DecodeIndexParams& p, const detail::SeqInfo& cs, int64_t q0, DType dtype,
                     const void* q_idx, int64_t stride_q_tok, int64_t stride_q_head, const void* keys,
                     int num_threads) {
  const PagedKvCache& c = p.cache;
  IndexTopkParams ip;
  ip.seq.n_q = cs.n_q;
  ip.seq.n_k = cs.n_k;
  ip.seq.batch = cs.batch;
  ip.h_kv = c.h_kv;
  ip.d_idx = c.d_idx;
  ip.bk = c.bk;
  ip.topk = p.topk;
  ip.index_scale = p.index_scale;
  ip.dtype = dtype;
  ip.q_idx = q_idx;
  ip.stride_q_idx_tok = stride_q_tok;
  ip.stride_q_idx_head = stride_q_head;
  ip.k_idx = keys;
  ip.stride_k_idx_tok = c.d_idx;
  ip.topk_idx = p.topk_idx + q0 * c.h_kv * p.topk;
  ip.index_lse = p.index_lse ? p.index_lse + q0 * c.h_kv : nullptr;
  index_topk(ip, cs, num_threads);
}

// The FP8 index pass (IndexKeyFormat::fp8_e4m3): the query rows are quantized like the keys, both
// sides dequantized to float64 and the prefill reference runs on them in float64, so the scores
// are the contract's sum of e4m3 products times the scales, without float32 rounding.
void decode_index_topk_fp8(const DecodeIndexParams& p, const detail::SeqInfo& s, const std::vector<int32_t>& lens,
                           int num_threads) {
  const PagedKvCache& c = p.cache;
  const int64_t d_idx = c.d_idx, h_kv = c.h_kv, bk = c.bk;
  std::vector<double> keys, q;
  std::vector<float> x(d_idx);
  std::vector<uint8_t> q8(d_idx);
  for_chunks(s, lens, d_idx, [&](int64_t b0, int64_t b1) {
    detail::SeqInfo cs = chunk_info(s, lens, b0, b1);
    if (cs.n_q == 0) return;
    keys.assign(size_t(std::max<int64_t>(cs.n_k, 1) * d_idx), 0.0);
    for (int64_t b = b0; b < b1; ++b) {
      if (cs.cu_q[b - b0 + 1] == cs.cu_q[b - b0]) continue;
      const int32_t* table = c.block_table + b * c.max_blocks;
      double* dst = keys.data() + cs.cu_k[b - b0] * d_idx;
      parallel_for(lens[b], num_threads, [&](int64_t t) {
        const int64_t page = table[t / bk], slot = t % bk;
        const uint8_t* src = static_cast<const uint8_t*>(c.k_idx_cache) + (page * bk + slot) * d_idx;
        const double sc = c.k_idx_scale[page * bk + slot];
        for (int64_t e = 0; e < d_idx; ++e) dst[t * d_idx + e] = double(detail::e4m3_decode(src[e])) * sc;
      });
    }
    const int64_t q0 = s.cu_q[b0];
    q.assign(size_t(cs.n_q * h_kv * d_idx), 0.0);
    for (int64_t i = 0; i < cs.n_q; ++i)
      for (int64_t r = 0; r < h_kv; ++r) {
        const int64_t off = (q0 + i) * p.stride_q_idx_tok + r * p.stride_q_idx_head;
        for (int64_t e = 0; e < d_idx; ++e) x[e] = float(load(p.q_idx, p.dtype, off + e));
        const double sq = detail::e4m3_quantize_row(x.data(), d_idx, q8.data());
        double* dst = q.data() + (i * h_kv + r) * d_idx;
        for (int64_t e = 0; e < d_idx; ++e) dst[e] = double(detail::e4m3_decode(q8[e])) * sq;
      }
    run_chunk_index(p, cs, q0, DType::f64, q.data(), h_kv * d_idx, d_idx, keys.data(), num_threads);
  });
}

}  // namespace

void decode_index_topk(const DecodeIndexParams& p, const detail::SeqInfo& s, const std::vector<int32_t>& lens,
                       int num_threads) {
  if (p.cache.k_idx_format == IndexKeyFormat::fp8_e4m3) return decode_index_topk_fp8(p, s, lens, num_threads);
  const PagedKvCache& c = p.cache;
  const int64_t es = dtype_size(p.dtype), d_idx = c.d_idx;
  std::vector<uint8_t> keys;
  for_chunks(s, lens, d_idx, [&](int64_t b0, int64_t b1) {
    detail::SeqInfo cs = chunk_info(s, lens, b0, b1);
    if (cs.n_q == 0) return;
    keys.resize(size_t(std::max<int64_t>(cs.n_k, 1) * d_idx * es));
    for (int64_t b = b0; b < b1; ++b)
      if (cs.cu_q[b - b0 + 1] > cs.cu_q[b - b0])
        gather(c, c.k_idx_cache, d_idx, es, b, lens[b], {}, keys.data() + cs.cu_k[b - b0] * d_idx * es, num_threads);
    const int64_t q0 = s.cu_q[b0];
    run_chunk_index(p, cs, q0, p.dtype, static_cast<const uint8_t*>(p.q_idx) + q0 * p.stride_q_idx_tok * es,
                    p.stride_q_idx_tok, p.stride_q_idx_head, keys.data(), num_threads);
  });
}

void decode_attention(const DecodeAttentionParams& p, const detail::SeqInfo& s, const std::vector<int32_t>& lens,
                      int num_threads) {
  const PagedKvCache& c = p.cache;
  const int64_t es = dtype_size(p.dtype), h_kv = c.h_kv, d = c.d, row = h_kv * d;
  const bool dense_mode = p.topk_idx == nullptr;
  std::vector<uint8_t> k, v;
  for_chunks(s, lens, 2 * row, [&](int64_t b0, int64_t b1) {
    detail::SeqInfo cs = chunk_info(s, lens, b0, b1);
    if (cs.n_q == 0) return;
    // Rows of blocks no query selected stay zero: the attention reference never reads them.
    k.assign(size_t(std::max<int64_t>(cs.n_k, 1) * row * es), 0);
    v.assign(k.size(), 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t qa = s.cu_q[b], qb = s.cu_q[b + 1];
      if (qa == qb) continue;
      // Dense (no selection): the whole visible cache.
      std::vector<char> use;
      if (!dense_mode) {
        use.assign((lens[b] + c.bk - 1) / c.bk, 0);
        for (int64_t e = qa * h_kv * p.topk; e < qb * h_kv * p.topk; ++e)
          if (p.topk_idx[e] >= 0) use[p.topk_idx[e]] = 1;
      }
      const int64_t off = cs.cu_k[b - b0] * row * es;
      gather(c, c.k_cache, row, es, b, lens[b], use, k.data() + off, num_threads);
      gather(c, c.v_cache, row, es, b, lens[b], use, v.data() + off, num_threads);
    }
    const int64_t q0 = s.cu_q[b0];
    AttentionParams ap;
    ap.seq.n_q = cs.n_q;
    ap.seq.n_k = cs.n_k;
    ap.seq.batch = cs.batch;
    ap.h_q = p.h_q;
    ap.h_kv = h_kv;
    ap.d = d;
    ap.scale = p.scale;
    ap.dtype = p.dtype;
    ap.q = static_cast<const uint8_t*>(p.q) + q0 * p.stride_q_tok * es;
    ap.stride_q_tok = p.stride_q_tok;
    ap.stride_q_head = p.stride_q_head;
    ap.k = k.data();
    ap.stride_k_tok = row;
    ap.stride_k_head = d;
    ap.v = v.data();
    ap.stride_v_tok = row;
    ap.stride_v_head = d;
    ap.topk_idx = dense_mode ? nullptr : p.topk_idx + q0 * h_kv * p.topk;
    ap.topk = dense_mode ? 0 : p.topk;
    ap.bk = c.bk;
    ap.o = static_cast<uint8_t*>(p.o) + q0 * p.stride_o_tok * es;
    ap.stride_o_tok = p.stride_o_tok;
    ap.stride_o_head = p.stride_o_head;
    ap.lse = p.lse + q0 * p.h_q;
    attention_forward(ap, cs, num_threads);
  });
}

}  // namespace msa::cpu
