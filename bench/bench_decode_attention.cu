// bench_decode_attention — times msa::decode_attention (planned form, workspace allocated once)
// on the CUDA backend at the M3 decode shapes (h_q = 64, h_kv = 4, d = 128, bk = 128, bf16, one
// query token per request unless said): sparse top-16 at batch 32 x 128K context, dense at batch 1
// x 1M (the dense decode baseline) and batch 32 x 128K, and a few smaller variants; plus a device
// copy of the same bytes as the bandwidth ceiling. Effective GB/s = the K/V bytes the call must
// read (visible tokens of the selected blocks, K and V of each (token, KV head)) / median time.
// Pages are shuffled in the pool; K/V hold random bf16. Each shape is timed eagerly (host launch
// cost included when the call is short) and replayed from a CUDA graph; some shapes also with other
// blocks-per-CTA splits than the plan's, to check its choice.
//
//   bench_decode_attention [--iters N] [--quick]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "bench_util.h"
#include "msa/msa.h"

namespace {

using msa::bench::ok;

struct Shape {
  const char* name;
  int64_t batch, ctx, n_q_per_req, h_kv, g, d, bk, topk;  // topk 0: dense
  std::vector<int64_t> sweep = {};  // other blocks-per-CTA splits to time (checks the plan's choice)
};

// Median ms of the call issued eagerly, and of the same call replayed from a CUDA graph (no host
// launch cost between calls: the GPU time of a captured decode step).
std::pair<float, float> time_call(const msa::DecodeAttentionParams& p, const msa::DecodePlan& plan, void* ws,
                                  int iters) {
  return msa::bench::eager_and_graph_ms([&](const msa::Exec& ex) { msa::decode_attention(p, plan, ws, ex); }, iters);
}

struct Result {
  double ms, gbs;
  int64_t split, ws;
};

Result run(const Shape& s, int iters) {
  const int64_t h_q = s.h_kv * s.g, n_q = s.batch * s.n_q_per_req;
  const int64_t blocks = (s.ctx + s.bk - 1) / s.bk, n_pages = s.batch * blocks;
  const size_t pool = size_t(n_pages) * s.bk * s.h_kv * s.d;
  __nv_bfloat16 *kc, *vc, *q, *o;
  ok(cudaMalloc(&kc, pool * 2), "k cache");
  ok(cudaMalloc(&vc, pool * 2), "v cache");
  ok(cudaMalloc(&q, size_t(n_q) * h_q * s.d * 2), "q");
  ok(cudaMalloc(&o, size_t(n_q) * h_q * s.d * 2), "o");
  msa::bench::fill_normal_bf16<<<1024, 256>>>(kc, int64_t(pool), 1);
  msa::bench::fill_normal_bf16<<<1024, 256>>>(vc, int64_t(pool), 2);
  msa::bench::fill_normal_bf16<<<1024, 256>>>(q, n_q * h_q * s.d, 3);
  ok(cudaGetLastError(), "fill");
  float* lse;
  ok(cudaMalloc(&lse, size_t(n_q) * h_q * 4), "lse");

  std::mt19937_64 rng(42);
  std::vector<int32_t> perm(n_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> table(perm), lens(s.batch, int32_t(s.ctx)), cu(s.batch + 1);
  for (int64_t b = 0; b <= s.batch; ++b) cu[b] = int32_t(b * s.n_q_per_req);
  // Selection: the own block and topk - 1 random earlier ones per (token, KV head); bytes counted
  // over the visible tokens of each selected block.
  std::vector<int32_t> idx;
  double bytes = 0;
  const double tok_bytes = 2.0 * s.d * 2;  // K and V of one token of one KV head
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t t = 0; t < s.n_q_per_req; ++t) {
      const int64_t pos = s.ctx - s.n_q_per_req + t, own = pos / s.bk;
      for (int64_t r = 0; r < s.h_kv; ++r) {
        if (s.topk == 0) {
          bytes += double(pos + 1) * tok_bytes;
          continue;
        }
        std::vector<int32_t> cand(own);
        std::iota(cand.begin(), cand.end(), 0);
        std::shuffle(cand.begin(), cand.end(), rng);
        cand.resize(std::min<int64_t>(int64_t(cand.size()), s.topk - 1));
        cand.push_back(int32_t(own));
        std::sort(cand.begin(), cand.end());
        for (int32_t j : cand) bytes += double(std::min<int64_t>(s.bk, pos - j * s.bk + 1)) * tok_bytes;
        cand.resize(s.topk, -1);
        idx.insert(idx.end(), cand.begin(), cand.end());
      }
    }
  int32_t *dt, *dl, *dc, *di = nullptr;
  ok(cudaMalloc(&dt, table.size() * 4), "table");
  ok(cudaMalloc(&dl, lens.size() * 4), "lens");
  ok(cudaMalloc(&dc, cu.size() * 4), "cu");
  ok(cudaMemcpy(dt, table.data(), table.size() * 4, cudaMemcpyHostToDevice), "table");
  ok(cudaMemcpy(dl, lens.data(), lens.size() * 4, cudaMemcpyHostToDevice), "lens");
  ok(cudaMemcpy(dc, cu.data(), cu.size() * 4, cudaMemcpyHostToDevice), "cu");
  if (!idx.empty()) {
    ok(cudaMalloc(&di, idx.size() * 4), "idx");
    ok(cudaMemcpy(di, idx.data(), idx.size() * 4, cudaMemcpyHostToDevice), "idx");
  }

  msa::DecodeShape sh;
  sh.batch = s.batch;
  sh.n_q = n_q;
  sh.max_q = s.n_q_per_req;
  sh.max_blocks = blocks;
  sh.bk = s.bk;
  sh.h_kv = s.h_kv;
  sh.h_q = h_q;
  sh.d = s.d;
  sh.d_idx = 0;
  sh.topk = s.topk;
  msa::Exec ex;
  ex.backend = msa::Backend::cuda;
  const msa::DecodePlan plan = msa::plan_decode(sh, ex);
  void* ws = nullptr;
  if (plan.workspace_bytes) ok(cudaMalloc(&ws, plan.workspace_bytes), "workspace");

  msa::DecodeAttentionParams p;
  p.cache.batch = s.batch;
  p.cache.n_pages = n_pages;
  p.cache.bk = s.bk;
  p.cache.h_kv = s.h_kv;
  p.cache.d = s.d;
  p.cache.k_cache = kc;
  p.cache.v_cache = vc;
  p.cache.block_table = dt;
  p.cache.max_blocks = blocks;
  p.cache.seq_lens = dl;
  p.dtype = msa::DType::bf16;
  p.h_q = h_q;
  p.n_q = n_q;
  p.cu_seqlens_q = dc;
  p.q = q;
  p.topk_idx = di;
  p.topk = s.topk;
  p.o = o;
  p.lse = lse;
  const auto [ms, gms] = time_call(p, plan, ws, iters);
  Result r{ms, bytes / (ms * 1e-3) / 1e9, plan.attention_split, int64_t(plan.workspace_bytes)};
  std::printf(
      "%-34s batch %3lld ctx %8lld q/req %2lld g %2lld d %3lld bk %3lld topk %2lld: %8.1f us  %7.1f GB/s  "
      "graph %8.1f us  %7.1f GB/s  (%.1f MB, split %lld, workspace %lld B)\n",
      s.name, (long long)s.batch, (long long)s.ctx, (long long)s.n_q_per_req, (long long)s.g, (long long)s.d,
      (long long)s.bk, (long long)s.topk, ms * 1e3, r.gbs, gms * 1e3, bytes / (gms * 1e-3) / 1e9, bytes / 1e6,
      (long long)r.split, (long long)r.ws);
  // Other splits: the plan with attention_split replaced, a workspace sized for it.
  const int64_t n_b = s.topk ? s.topk : blocks;
  for (int64_t split : s.sweep) {
    msa::DecodePlan alt = plan;
    alt.attention_split = split;
    const int64_t n_splits = (n_b + split - 1) / split;
    const size_t rows = size_t(n_splits) * size_t(n_q) * size_t(h_q);
    const size_t need = n_splits > 1 ? ((rows * s.d * 4 + 255) / 256 * 256 + (rows * 4 + 255) / 256 * 256) : 0;
    alt.workspace_bytes = need;
    void* aws = nullptr;
    if (need) ok(cudaMalloc(&aws, need), "sweep workspace");
    const auto [ams, ags] = time_call(p, alt, aws, iters);
    std::printf("    split %4lld (%5lld CTAs): %8.1f us  %7.1f GB/s   graph %8.1f us  %7.1f GB/s\n", (long long)split,
                (long long)(n_splits * n_q * s.h_kv * ((s.g + 15) / 16)), ams * 1e3, bytes / (ams * 1e-3) / 1e9,
                ags * 1e3, bytes / (ags * 1e-3) / 1e9);
    if (aws) cudaFree(aws);
  }
  for (void* ptr :
       {(void*)kc, (void*)vc, (void*)q, (void*)o, (void*)lse, (void*)dt, (void*)dl, (void*)dc, (void*)di, ws})
    cudaFree(ptr);
  std::fflush(stdout);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 20;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) iters = std::atoi(argv[++i]);
    if (!std::strcmp(argv[i], "--quick")) quick = true;
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // every finished line reaches a log, even if a later shape fails
  const cudaDeviceProp prop = msa::bench::device_props();
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);

  // Copy ceiling: read + write of 2 GB (counted as the bytes read, like the attention).
  {
    const size_t n = size_t(1) << 31;
    void *a, *b;
    ok(cudaMalloc(&a, n), "copy src");
    ok(cudaMalloc(&b, n), "copy dst");
    ok(cudaMemset(a, 1, n), "memset");
    const float ms = msa::bench::upper_median(msa::bench::time_queued_ms(
        [&](int) { ok(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice), "copy"); }, 2, iters));
    std::printf("%-34s %.1f us: %.1f GB/s read (+ as much written)\n", "device copy 2 GB", ms * 1e3,
                n / (ms * 1e-3) / 1e9);
    cudaFree(a);
    cudaFree(b);
  }
  std::vector<Shape> shapes = {
      {"sparse b32 x 128K (M3)", 32, 131072, 1, 4, 16, 128, 128, 16, {1, 2, 4, 16}},
      {"dense  b1 x 1M (dense baseline)", 1, 1048576, 1, 4, 16, 128, 128, 0, {32, 64, 256, 512}},
  };
  if (!quick) {
    const std::vector<Shape> more = {
        {"dense  b32 x 128K", 32, 131072, 1, 4, 16, 128, 128, 0},
        {"sparse b1 x 1M", 1, 1048576, 1, 4, 16, 128, 128, 16, {2, 4, 16}},
        {"sparse b32 x 128K, 4 tokens/req", 32, 131072, 4, 4, 16, 128, 128, 16},
        {"sparse b128 x 32K", 128, 32768, 1, 4, 16, 128, 128, 16},
        {"sparse b32 x 128K g8 d64 bk64", 32, 131072, 1, 8, 8, 64, 64, 16},
        {"dense  b8 x 1M", 8, 1048576, 1, 4, 16, 128, 128, 0},
    };
    shapes.insert(shapes.end(), more.begin(), more.end());
  }
  for (const Shape& s : shapes) run(s, iters);
  return 0;
}
