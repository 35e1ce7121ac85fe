// bench_index — times msa::index_topk on the CUDA backend at the M3 index shape (h_kv = 4,
// d_idx = 128, bk = 128, topk = 16, bf16, one causal sequence) for n = 32K and 128K, with and
// without index_lse (and block_scores at 32K), beside a cuBLAS 8192^3 bf16 GEMM measured in the
// same run as the machine's matrix ceiling. CUDA events, warm-up, median of the timed runs.
// Cost model: h_kv * d_idx * 2 * (causal visible pairs n (n + 1) / 2) FLOPs (~512 n^2).
//
//   bench_index [--iters N] [--quick]   (--quick: n = 32K only)
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench_util.h"
#include "msa/msa.h"

namespace {

using namespace msa::bench;

float gemm_ceiling_tflops(int iters) {
  const int n = 8192;
  __nv_bfloat16 *a, *b, *c;
  ok(cudaMalloc(&a, size_t(n) * n * 2), "malloc");
  ok(cudaMalloc(&b, size_t(n) * n * 2), "malloc");
  ok(cudaMalloc(&c, size_t(n) * n * 2), "malloc");
  fill_normal_bf16<<<1024, 256>>>(a, int64_t(n) * n, 1);
  fill_normal_bf16<<<1024, 256>>>(b, int64_t(n) * n, 2);
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return 0.f;
  const float alpha = 1.f, beta = 0.f;
  float ms = median_ms(
      [&](int) {
        cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF, n, b, CUDA_R_16BF, n, &beta, c,
                     CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      },
      3, iters);
  cublasDestroy(h);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return float(2.0 * n * double(n) * n / (ms * 1e-3) / 1e12);
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 10;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) iters = std::atoi(argv[++i]);
    if (!std::strcmp(argv[i], "--quick")) quick = true;
  }
  if (msa::cuda_device_count() == 0) {
    std::printf("bench_index: no CUDA device\n");
    return 0;
  }
  const cudaDeviceProp prop = device_props();
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  std::printf("cuBLAS bf16 GEMM 8192^3: %.0f TFLOP/s\n", gemm_ceiling_tflops(iters));

  const int64_t h_kv = 4, d = 128, bk = 128, topk = 16;
  std::vector<int64_t> sizes = {32768, 131072};
  if (quick) sizes = {32768};
  std::printf("%-8s %-24s %10s %10s\n", "n", "variant", "median ms", "TFLOP/s");
  for (int64_t n : sizes) {
    __nv_bfloat16 *q, *k;
    int32_t* idx;
    float *lse, *bs = nullptr;
    ok(cudaMalloc(&q, size_t(n * h_kv * d) * 2), "malloc q");
    ok(cudaMalloc(&k, size_t(n * d) * 2), "malloc k");
    ok(cudaMalloc(&idx, size_t(n * h_kv * 32) * 4), "malloc idx");
    ok(cudaMalloc(&lse, size_t(n * h_kv) * 4), "malloc lse");
    const int64_t n_blocks = (n + bk - 1) / bk;
    const bool with_bs = n <= 32768;
    if (with_bs) ok(cudaMalloc(&bs, size_t(n * h_kv * n_blocks) * 4), "malloc bs");
    fill_normal_bf16<<<1024, 256>>>(q, n * h_kv * d, 11);
    fill_normal_bf16<<<1024, 256>>>(k, n * d, 12);
    ok(cudaDeviceSynchronize(), "fill");
    const double flops = double(h_kv) * d * 2 * (double(n) * (n + 1) / 2);
    struct Variant {
      const char* name;
      int64_t topk;
      bool lse, bs;
    };
    // topk = 1 keeps no list: scores, causal block max and the local block only.
    std::vector<Variant> variants = {{"topk16", topk, false, false},
                                     {"topk16+lse", topk, true, false},
                                     {"topk1 (scores+max)", 1, false, false},
                                     {"topk32", 32, false, false}};
    if (with_bs) variants.push_back({"topk16+lse+block_scores", topk, true, true});
    for (const Variant& v : variants) {
      msa::IndexTopkParams p;
      p.seq.n_q = p.seq.n_k = n;
      p.h_kv = h_kv;
      p.d_idx = d;
      p.bk = bk;
      p.topk = v.topk;
      p.q_idx = q;
      p.k_idx = k;
      p.topk_idx = idx;
      p.index_lse = v.lse ? lse : nullptr;
      p.block_scores = v.bs ? bs : nullptr;
      p.n_blocks = v.bs ? n_blocks : 0;
      msa::Exec ex;
      ex.backend = msa::Backend::cuda;
      const float ms = median_ms([&](int) { msa::index_topk(p, ex); }, 2, iters);
      std::printf("%-8lld %-24s %10.3f %10.1f\n", (long long)n, v.name, ms, flops / (ms * 1e-3) / 1e12);
    }
    cudaFree(q);
    cudaFree(k);
    cudaFree(idx);
    cudaFree(lse);
    if (bs) cudaFree(bs);
  }
  return 0;
}
