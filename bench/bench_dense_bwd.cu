// bench_dense_bwd — times msa::dense_attention_backward on the CUDA backend (the whole call: the
// row-statistics pre-pass, the main kernel, the dq post-pass and the workspace allocation):
// causal GQA, bf16, one sequence, at the M3 shape (h_q = 64, h_kv = 4, d = 128) for each n asked,
// plus d = 64 and a g = 1 shape at the largest / smallest n. Both ways of adding the dq partials
// (TMA reduce-add, red.global.add, and the deterministic key-tile-ordered adds) are timed and their
// results compared. CUDA events, warm-up,
// median of the timed runs. Cost model: 2.5 x the forward's causal FLOPs,
// 2.5 * 4 * h_q * d * n (n + 1) / 2 (five GEMMs of the forward's two).
//
//   bench_dense_bwd [--n 8192,32768] [--iters N]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench_util.h"
#include "cuda/dense_bwd.h"
#include "msa/msa.h"

namespace {

using namespace msa::bench;

struct Shape {
  int64_t n, h_q, h_kv, d;
};

float bf16_bits(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// max |a - b| / max |b| over two bf16 device tensors of n elements.
double rel_max_diff(const __nv_bfloat16* a, const std::vector<uint16_t>& b_host, int64_t n) {
  std::vector<uint16_t> ah(static_cast<size_t>(n));
  ok(cudaMemcpy(ah.data(), a, n * 2, cudaMemcpyDeviceToHost), "download");
  double diff = 0, scale = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = bf16_bits(ah[i]), y = bf16_bits(b_host[i]);
    diff = std::max(diff, std::abs(x - y));
    scale = std::max(scale, std::abs(y));
  }
  return scale > 0 ? diff / scale : diff;
}

void run_shape(const Shape& s, int iters) {
  const int64_t nq = s.n * s.h_q * s.d, nkv = s.n * s.h_kv * s.d;
  __nv_bfloat16 *q, *k, *v, *o, *dout, *dq, *dk, *dv;
  float* lse;
  ok(cudaMalloc(&q, nq * 2), "malloc q");
  ok(cudaMalloc(&k, nkv * 2), "malloc k");
  ok(cudaMalloc(&v, nkv * 2), "malloc v");
  ok(cudaMalloc(&o, nq * 2), "malloc o");
  ok(cudaMalloc(&dout, nq * 2), "malloc do");
  ok(cudaMalloc(&dq, nq * 2), "malloc dq");
  ok(cudaMalloc(&dk, nkv * 2), "malloc dk");
  ok(cudaMalloc(&dv, nkv * 2), "malloc dv");
  ok(cudaMalloc(&lse, s.n * s.h_q * 4), "malloc lse");
  fill_normal_bf16<<<4096, 256>>>(q, nq, 1);
  fill_normal_bf16<<<4096, 256>>>(k, nkv, 2);
  fill_normal_bf16<<<4096, 256>>>(v, nkv, 3);
  fill_normal_bf16<<<4096, 256>>>(dout, nq, 4);
  ok(cudaGetLastError(), "fill");

  msa::AttentionBwdParams p;
  p.seq.n_q = p.seq.n_k = s.n;
  p.h_q = s.h_q;
  p.h_kv = s.h_kv;
  p.d = s.d;
  p.scale = float(1.0 / std::sqrt(double(s.d)));
  p.q = q;
  p.stride_q_head = p.stride_o_head = p.stride_do_head = p.stride_dq_head = s.d;
  p.stride_q_tok = p.stride_o_tok = p.stride_do_tok = p.stride_dq_tok = s.h_q * s.d;
  p.k = k;
  p.v = v;
  p.stride_k_head = p.stride_v_head = p.stride_dk_head = p.stride_dv_head = s.d;
  p.stride_k_tok = p.stride_v_tok = p.stride_dk_tok = p.stride_dv_tok = s.h_kv * s.d;
  p.o = o;
  p.lse = lse;
  p.do_ = dout;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  msa::Exec ex;
  ex.backend = msa::Backend::cuda;
  msa::dense_attention_forward(p, ex);  // o and lse of these inputs
  ok(cudaDeviceSynchronize(), "forward");

  const double flops = 2.5 * 4.0 * double(s.h_q) * double(s.d) * (double(s.n) * double(s.n + 1) / 2.0);
  std::vector<uint16_t> dq0(static_cast<size_t>(nq)), dk0(static_cast<size_t>(nkv)), dv0(static_cast<size_t>(nkv));
  for (auto mode : {msa::cuda::DenseBwdDq::tma_reduce, msa::cuda::DenseBwdDq::atomic, msa::cuda::DenseBwdDq::ordered}) {
    const bool tma = mode == msa::cuda::DenseBwdDq::tma_reduce;
    const char* name = tma ? "tma_reduce" : mode == msa::cuda::DenseBwdDq::atomic ? "atomic" : "ordered";
    const float ms = median_ms([&](int) { msa::cuda::run_dense_bwd(p, nullptr, mode); }, 2, iters);
    ok(cudaGetLastError(), "dense backward");
    std::string same = "-";
    if (tma) {
      ok(cudaMemcpy(dq0.data(), dq, nq * 2, cudaMemcpyDeviceToHost), "download dq");
      ok(cudaMemcpy(dk0.data(), dk, nkv * 2, cudaMemcpyDeviceToHost), "download dk");
      ok(cudaMemcpy(dv0.data(), dv, nkv * 2, cudaMemcpyDeviceToHost), "download dv");
    } else {
      char buf[96];
      std::snprintf(buf, sizeof(buf), "dq %.1e dk %.1e dv %.1e", rel_max_diff(dq, dq0, nq), rel_max_diff(dk, dk0, nkv),
                    rel_max_diff(dv, dv0, nkv));
      same = buf;
    }
    std::printf("| %6lld | %4lld | %4lld | %3lld | %-10s | %9.3f | %7.1f | %s |\n", (long long)s.n, (long long)s.h_q,
                (long long)s.h_kv, (long long)s.d, name, ms, flops / (ms * 1e-3) / 1e12, same.c_str());
    std::fflush(stdout);
  }
  for (void* ptr : {(void*)q, (void*)k, (void*)v, (void*)o, (void*)dout, (void*)dq, (void*)dk, (void*)dv, (void*)lse})
    cudaFree(ptr);
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
      std::fprintf(stderr, "usage: bench_dense_bwd [--n 8192,32768] [--iters N]\n");
      return 1;
    }
  }
  const cudaDeviceProp prop = device_props();
  std::printf("bench_dense_bwd: %s, %d SMs; causal, one sequence, bf16; median of %d runs after 2 warm-ups\n",
              prop.name, prop.multiProcessorCount, iters);
  std::printf("| n | h_q | h_kv | d | dq partials | ms | TFLOP/s | max diff vs tma_reduce (of max) |\n");
  std::printf("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
  std::sort(ns.begin(), ns.end());
  for (int64_t n : ns) run_shape({n, 64, 4, 128}, iters);
  run_shape({ns.back(), 64, 4, 64}, iters);
  run_shape({ns.front(), 16, 16, 128}, iters);
  return 0;
}
