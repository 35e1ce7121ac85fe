// bench_dense — times msa::dense_attention_forward on the CUDA backend: causal GQA, bf16, one
// sequence, at the M3 shape (h_q = 64, h_kv = 4, d = 128) for each n asked, plus d = 64 and a
// g = 1 shape at the largest / smallest n. All CTA schedules (overlap, pingpong and their
// persistent variants) are timed and their outputs compared bitwise with overlap's. CUDA events,
// warm-up, median of the timed runs; the inputs (>= 150 MB) do not fit in L2. Cost model:
// 4 * h_q * d * n (n + 1) / 2 FLOPs (~2 h_q d n^2).
// bench/torch_dense.py times PyTorch SDPA (cuDNN, flash) on the same shapes for comparison.
//
//   bench_dense [--n 8192,32768] [--iters N]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "bench_util.h"
#include "cuda/dense_fwd.h"
#include "msa/msa.h"

namespace {

using namespace msa::bench;

struct Shape {
  int64_t n, h_q, h_kv, d;
};

void run_shape(const Shape& s, int iters) {
  const int64_t nq = s.n * s.h_q * s.d, nkv = s.n * s.h_kv * s.d;
  __nv_bfloat16 *q, *k, *v, *o;
  float* lse;
  ok(cudaMalloc(&q, nq * 2), "malloc q");
  ok(cudaMalloc(&k, nkv * 2), "malloc k");
  ok(cudaMalloc(&v, nkv * 2), "malloc v");
  ok(cudaMalloc(&o, nq * 2), "malloc o");
  ok(cudaMalloc(&lse, s.n * s.h_q * 4), "malloc lse");
  fill_normal_bf16<<<4096, 256>>>(q, nq, 1);
  fill_normal_bf16<<<4096, 256>>>(k, nkv, 2);
  fill_normal_bf16<<<4096, 256>>>(v, nkv, 3);
  ok(cudaGetLastError(), "fill");

  msa::AttentionParams p;
  p.seq.n_q = p.seq.n_k = s.n;
  p.h_q = s.h_q;
  p.h_kv = s.h_kv;
  p.d = s.d;
  p.scale = float(1.0 / std::sqrt(double(s.d)));
  p.q = q;
  p.stride_q_head = s.d;
  p.stride_q_tok = s.h_q * s.d;
  p.k = k;
  p.v = v;
  p.stride_k_head = p.stride_v_head = s.d;
  p.stride_k_tok = p.stride_v_tok = s.h_kv * s.d;
  p.o = o;
  p.stride_o_head = s.d;
  p.stride_o_tok = s.h_q * s.d;
  p.lse = lse;

  const double flops = 4.0 * double(s.h_q) * double(s.d) * (double(s.n) * double(s.n + 1) / 2.0);
  std::vector<uint16_t> o_first;
  std::vector<float> lse_first;
  using msa::cuda::DenseSchedule;
  const std::pair<DenseSchedule, const char*> schedules[] = {{DenseSchedule::overlap, "overlap"},
                                                             {DenseSchedule::pingpong, "pingpong"},
                                                             {DenseSchedule::persistent, "persist"},
                                                             {DenseSchedule::persistent_pingpong, "persist-pp"}};
  for (const auto& sn : schedules) {
    const DenseSchedule sched = sn.first;
    const char* name = sn.second;
    const bool first = sched == DenseSchedule::overlap;
    const float ms = median_ms([&](int) { msa::cuda::run_dense_fwd(p, nullptr, sched); }, 2, iters);
    ok(cudaGetLastError(), "dense forward");
    std::vector<uint16_t> oh(static_cast<size_t>(nq));
    std::vector<float> lh(static_cast<size_t>(s.n * s.h_q));
    ok(cudaMemcpy(oh.data(), o, nq * 2, cudaMemcpyDeviceToHost), "download o");
    ok(cudaMemcpy(lh.data(), lse, lh.size() * 4, cudaMemcpyDeviceToHost), "download lse");
    const char* same = "-";
    if (first) {
      o_first = oh;
      lse_first = lh;
    } else {
      same = (oh == o_first && std::memcmp(lh.data(), lse_first.data(), lh.size() * 4) == 0) ? "yes" : "NO";
    }
    std::printf("| %6lld | %4lld | %4lld | %3lld | %-8s | %9.3f | %7.1f | %s |\n", (long long)s.n, (long long)s.h_q,
                (long long)s.h_kv, (long long)s.d, name, ms, flops / (ms * 1e-3) / 1e12, same);
    std::fflush(stdout);
  }
  cudaFree(q);
  cudaFree(k);
  cudaFree(v);
  cudaFree(o);
  cudaFree(lse);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> ns = {8192, 32768};
  int iters = 10;
  for (int a = 1; a < argc; ++a) {
    if (!std::strcmp(argv[a], "--iters") && a + 1 < argc) {
      iters = std::atoi(argv[++a]);
    } else if (!std::strcmp(argv[a], "--n") && a + 1 < argc) {
      ns.clear();
      for (char* tok = std::strtok(argv[++a], ","); tok; tok = std::strtok(nullptr, ",")) ns.push_back(std::atoll(tok));
    } else {
      std::fprintf(stderr, "usage: bench_dense [--n 8192,32768] [--iters N]\n");
      return 1;
    }
  }
  const cudaDeviceProp prop = device_props();
  std::printf("bench_dense: %s, %d SMs; causal, one sequence, bf16; median of %d runs after 2 warm-ups\n",
              prop.name, prop.multiProcessorCount, iters);
  std::printf("| n | h_q | h_kv | d | schedule | ms | TFLOP/s | bitwise = overlap |\n");
  std::printf("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
  std::sort(ns.begin(), ns.end());
  for (int64_t n : ns) run_shape({n, 64, 4, 128}, iters);
  run_shape({ns.back(), 64, 4, 64}, iters);
  run_shape({ns.front(), 16, 16, 128}, iters);
  return 0;
}
