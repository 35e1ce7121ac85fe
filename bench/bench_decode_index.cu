// bench_decode_index — times msa::decode_index_topk (planned form, workspace allocated once) on
// the CUDA backend at the M3 decode index shape (h_kv = 4, d_idx = 128, bk = 128, topk = 16, bf16):
// batch 32 x 128K context x 1 query token, batch 1 x 1M x 1 and x 8 tokens, and a few variants
// (index_lse off, 4 tokens, d_idx 64 / bk 64), each eagerly and replayed from a CUDA graph, with a
// sweep of blocks-per-CTA splits around the plan's choice at the main shapes. Effective GB/s =
// index-key bytes the pass must read (every visible token of every request, d_idx bf16 each) /
// median time; a device-to-device copy of the same byte count is printed as the ceiling. Pages are
// shuffled in the pool; keys and queries are random bf16. With --format fp8 (or both) the index
// keys are an fp8_e4m3 cache (random finite e4m3 bytes, random positive scales) and the bytes the
// pass must read are d_idx + 4 (the scale) per visible token; --main times only b32 x 128K and
// b1 x 1M (1 token, with the split sweep).
//
//   bench_decode_index [--iters N] [--format bf16|fp8|both] [--main]
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

__global__ void fill_normal_f32_kernel(float* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = msa::bench::normal_from_hash(msa::bench::hash_at(seed, i));
}

// Random finite e4m3 bytes (0x7F / 0xFF, the NaN codes, become +-448) and scales in [1, 2) / 448.
__global__ void fill_e4m3_kernel(uint8_t* x, int64_t n, float* sc, int64_t n_sc, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint8_t b = uint8_t(msa::bench::hash_at(seed, i));
    if ((b & 0x7F) == 0x7F) b = uint8_t((b & 0x80) | 0x7E);
    x[i] = b;
  }
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_sc; i += int64_t(gridDim.x) * blockDim.x)
    sc[i] = (1.f + float(msa::bench::hash_at(seed + 1, i) >> 40) * 0x1p-24f) / 448.f;
}

struct Shape {
  const char* name;
  int64_t batch, ctx, n_q_per_req, h_kv, d_idx, bk, topk;
  bool lse;
  bool sweep;
};

std::pair<float, float> time_call(const msa::DecodeIndexParams& p, const msa::DecodePlan& plan, void* ws, int iters) {
  return msa::bench::eager_and_graph_ms([&](const msa::Exec& ex) { msa::decode_index_topk(p, plan, ws, ex); }, iters);
}

float copy_ms(size_t bytes, int iters) {
  void *a = nullptr, *b = nullptr;
  ok(cudaMalloc(&a, bytes), "malloc copy src");
  ok(cudaMalloc(&b, bytes), "malloc copy dst");
  ok(cudaMemset(a, 1, bytes), "memset");
  const float ms = msa::bench::upper_median(msa::bench::time_queued_ms(
      [&](int) { ok(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0), "copy"); }, 3, iters));
  cudaFree(a);
  cudaFree(b);
  return ms;
}

void run_shape(const Shape& s, int iters, bool fp8) {
  const int64_t n_blk = (s.ctx + s.bk - 1) / s.bk;
  const int64_t n_pages = s.batch * n_blk;
  const int64_t n_q = s.batch * s.n_q_per_req;
  const size_t key_elems = size_t(n_pages * s.bk * s.d_idx);
  void* kc = nullptr;
  float* ksc = nullptr;
  __nv_bfloat16* q = nullptr;
  ok(cudaMalloc(&kc, key_elems * (fp8 ? 1 : 2)), "malloc k_idx_cache");
  ok(cudaMalloc(&q, size_t(n_q * s.h_kv * s.d_idx) * 2), "malloc q_idx");
  if (fp8) {
    ok(cudaMalloc(&ksc, size_t(n_pages * s.bk) * 4), "malloc k_idx_scale");
    fill_e4m3_kernel<<<1024, 256>>>(static_cast<uint8_t*>(kc), int64_t(key_elems), ksc, n_pages * s.bk, 11);
  } else {
    msa::bench::fill_normal_bf16<<<1024, 256>>>(static_cast<__nv_bfloat16*>(kc), int64_t(key_elems), 11);
  }
  msa::bench::fill_normal_bf16<<<64, 256>>>(q, n_q * s.h_kv * s.d_idx, 12);
  ok(cudaGetLastError(), "fill");
  std::vector<int32_t> table(static_cast<size_t>(n_pages));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937_64(5));
  std::vector<int32_t> lens(size_t(s.batch), int32_t(s.ctx)), cu(size_t(s.batch + 1));
  for (int64_t b = 0; b <= s.batch; ++b) cu[b] = int32_t(b * s.n_q_per_req);
  int32_t *d_table, *d_lens, *d_cu, *d_idx;
  float* d_lse;
  ok(cudaMalloc(&d_table, table.size() * 4), "malloc");
  ok(cudaMalloc(&d_lens, lens.size() * 4), "malloc");
  ok(cudaMalloc(&d_cu, cu.size() * 4), "malloc");
  ok(cudaMalloc(&d_idx, size_t(n_q * s.h_kv * s.topk) * 4), "malloc");
  ok(cudaMalloc(&d_lse, size_t(n_q * s.h_kv) * 4), "malloc");
  ok(cudaMemcpy(d_table, table.data(), table.size() * 4, cudaMemcpyHostToDevice), "upload");
  ok(cudaMemcpy(d_lens, lens.data(), lens.size() * 4, cudaMemcpyHostToDevice), "upload");
  ok(cudaMemcpy(d_cu, cu.data(), cu.size() * 4, cudaMemcpyHostToDevice), "upload");

  msa::DecodeIndexParams p;
  p.cache.batch = s.batch;
  p.cache.n_pages = n_pages;
  p.cache.bk = s.bk;
  p.cache.h_kv = s.h_kv;
  p.cache.d_idx = s.d_idx;
  p.cache.k_idx_cache = kc;
  if (fp8) {
    p.cache.k_idx_format = msa::IndexKeyFormat::fp8_e4m3;
    p.cache.k_idx_scale = ksc;
  }
  p.cache.block_table = d_table;
  p.cache.max_blocks = n_blk;
  p.cache.seq_lens = d_lens;
  p.dtype = msa::DType::bf16;
  p.topk = s.topk;
  p.n_q = n_q;
  p.cu_seqlens_q = d_cu;
  p.q_idx = q;
  p.topk_idx = d_idx;
  p.index_lse = s.lse ? d_lse : nullptr;

  msa::DecodeShape sh;
  sh.batch = s.batch;
  sh.n_q = n_q;
  sh.max_q = s.n_q_per_req;
  sh.max_blocks = n_blk;
  sh.bk = s.bk;
  sh.h_kv = s.h_kv;
  sh.d_idx = s.d_idx;
  sh.topk = s.topk;
  sh.k_idx_format = p.cache.k_idx_format;
  msa::Exec ex;
  ex.backend = msa::Backend::cuda;
  msa::DecodePlan plan = msa::plan_decode(sh, ex);
  void* ws = nullptr;
  ok(cudaMalloc(&ws, std::max<size_t>(plan.workspace_bytes, 256)), "malloc workspace");

  const double bytes = double(s.batch) * double(s.ctx) * (fp8 ? double(s.d_idx) + 4.0 : double(s.d_idx) * 2.0);
  auto [eager, graph] = time_call(p, plan, ws, iters);
  std::printf("%-4s %-28s eager %8.1f us %7.1f GB/s   graph %8.1f us %7.1f GB/s  (%.1f MB keys, split %lld, "
              "%lld CTAs, workspace %lld B)\n",
              fp8 ? "fp8" : "bf16", s.name, eager * 1e3, bytes / (eager * 1e6), graph * 1e3, bytes / (graph * 1e6), bytes / 1e6,
              (long long)plan.index_split, (long long)(s.batch * ((n_blk + plan.index_split - 1) / plan.index_split)),
              (long long)plan.workspace_bytes);
  {
    // The top-k stage alone (msa::block_topk on the same rows and visible blocks, random scores):
    // what the pass costs beyond streaming the keys.
    float* sc = nullptr;
    const int64_t rows = n_q * s.h_kv;
    ok(cudaMalloc(&sc, size_t(rows * n_blk) * 4), "malloc scores");
    fill_normal_f32_kernel<<<256, 256>>>(sc, rows * n_blk, 13);
    msa::BlockTopkParams tp;
    tp.rows = rows;
    tp.n_blocks = n_blk;
    tp.topk = s.topk;
    tp.force_last = true;
    tp.scores = sc;
    tp.topk_idx = d_idx;
    const float tk = msa::bench::upper_median(
        msa::bench::time_queued_ms([&](int) { msa::block_topk(tp, ex); }, 3, iters));
    std::printf("    top-k stage alone (%lld rows x %lld blocks): %.1f us\n", (long long)rows, (long long)n_blk, tk * 1e3);
    cudaFree(sc);
  }
  if (s.sweep) {
    for (int64_t split = 8; split <= 1024 && split <= 2 * n_blk; split *= 2) {
      msa::DecodePlan alt = plan;
      alt.index_split = split;
      auto [e2, g2] = time_call(p, alt, ws, iters);
      std::printf("    split %4lld (%6lld CTAs): graph %8.1f us %7.1f GB/s\n", (long long)split,
                  (long long)(s.batch * ((n_blk + split - 1) / split)), g2 * 1e3, bytes / (g2 * 1e6));
      (void)e2;
    }
  }
  cudaFree(ws);
  cudaFree(kc);
  cudaFree(ksc);
  cudaFree(q);
  cudaFree(d_table);
  cudaFree(d_lens);
  cudaFree(d_cu);
  cudaFree(d_idx);
  cudaFree(d_lse);
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 20;
  bool do_bf16 = true, do_fp8 = false, main_only = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else if (!std::strcmp(argv[i], "--format") && i + 1 < argc) {
      const std::string f = argv[++i];
      do_bf16 = f == "bf16" || f == "both";
      do_fp8 = f == "fp8" || f == "both";
      if (!do_bf16 && !do_fp8) {
        std::fprintf(stderr, "bench_decode_index: --format %s, expected bf16, fp8 or both\n", f.c_str());
        return 2;
      }
    } else if (!std::strcmp(argv[i], "--main")) {
      main_only = true;
    } else {
      std::fprintf(stderr, "usage: bench_decode_index [--iters N] [--format bf16|fp8|both] [--main]\n");
      return 2;
    }
  }
  const cudaDeviceProp prop = msa::bench::device_props();
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  const int64_t K = 1024;
  const float cms = copy_ms(size_t(32) * 128 * K * 256, iters);
  std::printf("device copy of 1073.7 MB: %.1f us, %.1f GB/s (read bytes / time)\n", cms * 1e3,
              1073.741824e6 / (cms * 1e6));
  const Shape shapes[] = {
      {"b32 x 128K x 1 tok", 32, 128 * K, 1, 4, 128, 128, 16, true, true},
      {"b32 x 128K x 1 tok, no lse", 32, 128 * K, 1, 4, 128, 128, 16, false, false},
      {"b1 x 1M x 1 tok", 1, 1024 * K, 1, 4, 128, 128, 16, true, true},
      {"b1 x 1M x 8 tok", 1, 1024 * K, 8, 4, 128, 128, 16, true, false},
      {"b32 x 128K x 4 tok", 32, 128 * K, 4, 4, 128, 128, 16, true, false},
      {"b32 x 128K x 16 tok", 32, 128 * K, 16, 4, 128, 128, 16, true, false},
      {"b32 x 32K x 1 tok", 32, 32 * K, 1, 4, 128, 128, 16, true, false},
      {"b32 x 128K x 1, d64 bk64", 32, 128 * K, 1, 4, 64, 64, 16, true, false},
  };
  for (const Shape& s : shapes) {
    if (main_only && !s.sweep) continue;
    if (do_bf16) run_shape(s, iters, false);
    if (do_fp8) run_shape(s, iters, true);
  }
  return 0;
}
