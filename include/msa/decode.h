// msa/decode.h — decode for serving: a paged KV cache with its index-key cache, the append of new
// tokens, and the decode index pass (top-k blocks) and sparse decode attention over the cache.
// The semantics are those of the prefill calls (index_topk, sparse_attention_forward) for the new
// query tokens of each request, whose keys are all in the cache (MSA_SPEC; docs/decode.md).
#pragma once

#include "msa/common.h"
#include "msa/index.h"

namespace msa {

// How the index keys are stored in the cache.
//   native:   k_idx_cache holds the calls' dtype (bf16 on CUDA).
//   fp8_e4m3: one byte per element (OCP e4m3, finite values only) and one float32 scale per token
//             in k_idx_scale, halving the bytes the decode index pass reads (the pass is bound by
//             that read). The key of a token is e4m3(k_idx_cache) * k_idx_scale. append_kv
//             quantizes: x = float(k_idx row), a = max |x|; a < 2^-100 gives scale 0 and zero bytes, a
//             non-finite a gives scale NaN (the token's scores become NaN, ranked below every
//             number); otherwise scale = a / 448 and byte i = e4m3(x_i * (448 / a)) rounded to nearest
//             even, saturating at +-448 (float32 arithmetic throughout). decode_index_topk quantizes
//             each query row q_idx[i, r] the same way to (q8, s_q) and scores
//               S[j] = index_scale * s_q * scale(j) * sum_d e4m3(q8[d]) * e4m3(k8(j)[d]),
//             the sum in float32 on the GPU (tensor cores) and in float64 on the CPU.
//             The selection approximates the native one; docs/decode_index.md gives the measured
//             agreement. Attention K/V stay in the calls' dtype. On CUDA the scale pool must be
//             16-byte aligned; on both backends k_idx_scale is [n_pages, bk] contiguous.
enum class IndexKeyFormat : int32_t { native = 0, fp8_e4m3 = 1 };

const char* index_key_format_name(IndexKeyFormat f);

// The fp8_e4m3 quantization of one row of n values on the host, exactly as append_kv stores an
// index key: writes n e4m3 bytes to out and returns the row's scale.
float quantize_e4m3_row(const float* x, int64_t n, uint8_t* out);

// The cache: a pool of pages of bk tokens each. A page is exactly one MSA block, so the block
// table maps the logical block j of request b (its tokens at positions j*bk .. j*bk + bk - 1) to
// one page, and selecting a block never splits a page. Every pointer lives in the memory of the
// backend that runs the call; the cache tensors are contiguous.
struct PagedKvCache {
  int64_t batch = 1;     // requests B
  int64_t n_pages = 0;   // pages in the pool
  int64_t bk = 128;      // tokens per page = MSA block size (cpu: 1..4096; cuda: 16..256, x16)
  int64_t h_kv = 0;      // KV heads (= index-query heads, one per group)
  int64_t d = 0;         // head dim of k and v (cuda attention: 64 or 128)
  int64_t d_idx = 0;     // index head dim

  void* k_cache = nullptr;      // [n_pages, bk, h_kv, d]
  void* v_cache = nullptr;      // [n_pages, bk, h_kv, d]
  void* k_idx_cache = nullptr;  // [n_pages, bk, d_idx] (the one shared index-key head)
  IndexKeyFormat k_idx_format = IndexKeyFormat::native;
  float* k_idx_scale = nullptr;  // [n_pages, bk] with fp8_e4m3 (null otherwise)

  // [batch, max_blocks], row stride max_blocks: block_table[b, j] = page of logical block j of
  // request b. Entries j < ceil(seq_lens[b] / bk) must be page ids 0 <= id < n_pages; the rest are
  // never read (-1 by convention). Requests may share pages they only read (a common prefix).
  const int32_t* block_table = nullptr;
  int64_t max_blocks = 0;
  // [batch]: tokens in the cache of request b, the new tokens of this step included;
  // 0 <= seq_lens[b] <= max_blocks * bk. Slots at or past seq_lens[b] are never read.
  const int32_t* seq_lens = nullptr;
};

// Writes the new tokens of each request into the cache: token t of request b (packed row
// cu_new[b] + t) goes to position seq_lens[b] - n_new_b + t, i.e. to slot pos % bk of page
// block_table[b, pos / bk]. seq_lens already counts the new tokens. No page may receive tokens of
// two different (request, block) pairs in one call. Nothing else in the cache is touched.
struct AppendKvParams {
  PagedKvCache cache;
  DType dtype = DType::bf16;  // of the cache and of k, v, k_idx

  int64_t n_new = 0;                // packed new tokens
  const int32_t* cu_new = nullptr;  // [batch+1], 0 .. n_new, non-decreasing; nullptr: batch == 1, {0, n_new};
                                    // n_new_b = cu_new[b+1] - cu_new[b] <= seq_lens[b]

  const void* k = nullptr;  // [n_new, h_kv, d]
  int64_t stride_k_tok = 0, stride_k_head = 0;
  const void* v = nullptr;  // [n_new, h_kv, d]
  int64_t stride_v_tok = 0, stride_v_head = 0;
  // [n_new, d_idx]; nullptr together with cache.k_idx_cache == nullptr for a layer without an index
  // branch (both set or both null).
  const void* k_idx = nullptr;
  int64_t stride_k_idx_tok = 0;
};

// Decode index pass. The query tokens of request b are the packed rows
// [cu_seqlens_q[b], cu_seqlens_q[b+1]), bottom-right aligned: token t of the n_q_b tokens sits at
// position seq_lens[b] - n_q_b + t and sees positions 0 .. its own (causal). For each (token,
// group) the contract of index_topk over the request's index keys in the cache:
//   S[j] = <q_idx[i, r], k_idx(position j)> * index_scale, M[b'] = max over visible j in block b',
//   topk_idx[i, r] = the own block plus the topk - 1 largest other M (ties toward the lower
//   block, NaN below every number), all visible blocks if there are <= topk of them; ascending,
//   then -1 padding.
// Block numbers are LOGICAL (j of block_table[b, j]), not page ids: the selection means the same
// thing as a prefill selection of the same sequence and feeds decode_attention unchanged.
struct DecodeIndexParams {
  PagedKvCache cache;          // reads k_idx_cache, block_table, seq_lens
  DType dtype = DType::bf16;   // of q_idx and the index-key cache
  int64_t topk = 16;           // blocks kept per (token, group), 1..kMaxTopk
  float index_scale = 0.f;     // 0: 1/sqrt(d_idx)

  int64_t n_q = 0;                        // packed query tokens
  const int32_t* cu_seqlens_q = nullptr;  // [batch+1], 0 .. n_q, non-decreasing; nullptr: batch == 1, {0, n_q};
                                          // n_q_b <= seq_lens[b]

  const void* q_idx = nullptr;  // [n_q, h_kv, d_idx]
  int64_t stride_q_idx_tok = 0, stride_q_idx_head = 0;

  int32_t* topk_idx = nullptr;  // [n_q, h_kv, topk] out, contiguous; logical block numbers, -1 padded
  float* index_lse = nullptr;   // optional [n_q, h_kv] out: natural-log logsumexp of S over the selected support
};

// Sparse decode attention: for each query token i of request b at position p (placed as in
// DecodeIndexParams) and head h of group r = h / g,
//   o[i, h]   = sum_j softmax_j(<q[i,h], k(j, r)> * scale) v(j, r)
//   lse[i, h] = log sum_j exp(<q[i,h], k(j, r)> * scale)          (natural log, float32)
// over the visible positions j <= p of the logical blocks listed in topk_idx[i, r], read from the
// cache through block_table[b, .]. An all -1 row gives o = 0, lse = -inf. On CUDA (bf16) any
// g = h_q / h_kv works; the kernels read seq_lens, the offsets, the table and the selection on the
// device and skip (never dereference) page ids outside 0..n_pages-1 and blocks outside 0..p / bk.
struct DecodeAttentionParams {
  PagedKvCache cache;          // reads k_cache, v_cache, block_table, seq_lens
  DType dtype = DType::bf16;   // of q, o and the K/V cache
  int64_t h_q = 0;             // query heads, a multiple of h_kv; g = h_q / h_kv
  float scale = 0.f;           // 0: 1/sqrt(d)

  int64_t n_q = 0;                        // packed query tokens
  const int32_t* cu_seqlens_q = nullptr;  // [batch+1] as in DecodeIndexParams

  const void* q = nullptr;  // [n_q, h_q, d]
  int64_t stride_q_tok = 0, stride_q_head = 0;

  // [n_q, h_kv, topk] contiguous, logical block numbers (decode_index_topk's output): -1 only as
  // tail padding, otherwise visible blocks 0 <= j <= p / bk, no duplicates in a row.
  // nullptr: dense decode, every visible block (a dense layer, or the baseline); topk is ignored.
  const int32_t* topk_idx = nullptr;
  int64_t topk = 0;  // 1..kMaxTopk

  void* o = nullptr;  // [n_q, h_q, d] out
  int64_t stride_o_tok = 0, stride_o_head = 0;
  float* lse = nullptr;  // [n_q, h_q] out, contiguous
};

// ---- Plan / run ----
// A decode step on the GPU is planned once on the host for a batch shape and then run any number
// of times. The run calls allocate nothing, never synchronise with the host and never read device
// memory on the host, so a whole step (append_kv, decode_index_topk, decode_attention) can be
// captured in a CUDA graph and replayed while contexts grow: seq_lens and the block table are
// read by the kernels at run time, only their upper bounds are fixed by the plan.

// Upper bounds of a step, all known on the host. A plan serves every step whose batch, n_q,
// largest per-request query count and max_blocks are at most the planned ones, with the same
// bk, heads, dims, topk and dtype.
struct DecodeShape {
  int64_t batch = 1;       // requests
  int64_t n_q = 1;         // packed query tokens of one step (all requests together)
  int64_t max_q = 1;       // most query tokens of one request in a step (speculative decoding)
  int64_t max_blocks = 0;  // width of the block table: a context is at most max_blocks * bk tokens
  int64_t bk = 128;
  int64_t h_kv = 0;
  int64_t h_q = 0;         // 0: plan the index pass only
  int64_t d = 0;           // 0: plan the index pass only
  int64_t d_idx = 0;       // 0: plan the attention only
  int64_t topk = 16;        // 0: the attention is dense (topk_idx = nullptr); needs d_idx = 0
  DType dtype = DType::bf16;
  IndexKeyFormat k_idx_format = IndexKeyFormat::native;  // of the index-key cache the index pass reads
};

// What plan_decode chose. workspace_bytes of device memory (256-byte aligned) serve both run calls
// of a step: the index pass and the attention use disjoint parts, so one buffer is passed to both.
// The other fields are the kernels' work split, recorded for benchmarks and logs.
struct DecodePlan {
  DecodeShape shape;
  Backend backend = Backend::cpu;
  size_t workspace_bytes = 0;
  size_t index_workspace_offset = 0;      // where the index pass's part starts
  size_t attention_workspace_offset = 0;  // where the attention's part starts
  int64_t index_split = 0;      // blocks of one request scored per CTA of the index pass (0 on the CPU)
  int64_t attention_split = 0;  // selected blocks per CTA of the attention (0 on the CPU)
};

DecodePlan plan_decode(const DecodeShape& shape, const Exec& ex = {});

// The run calls. p must fit plan (checked on the host from the fields of p; contents of device
// arrays are never read). workspace: plan.workspace_bytes of memory of the backend (nullptr when
// that is 0; the CPU needs none).
void decode_index_topk(const DecodeIndexParams& p, const DecodePlan& plan, void* workspace, const Exec& ex = {});
void decode_attention(const DecodeAttentionParams& p, const DecodePlan& plan, void* workspace, const Exec& ex = {});

// Convenience forms: plan for exactly this call and take the workspace from the stream-ordered
// allocator (CUDA) for its duration. Not for graph capture; the results equal the planned form's.
void append_kv(const AppendKvParams& p, const Exec& ex = {});
void decode_index_topk(const DecodeIndexParams& p, const Exec& ex = {});
void decode_attention(const DecodeAttentionParams& p, const Exec& ex = {});

}  // namespace msa
