// bench_kl — times msa::index_kl_backward and msa::index_kl_loss on the CUDA backend at the M3 shape
// (h_q = 64, h_kv = 4, d = d_idx = 128, bk = 128, topk = 16, bf16, one causal sequence), in the pipeline
// a training step runs: index_topk (selection and the saved index lse) and the sparse forward (the
// saved lse) feed the KL backward. Sparse phase at n = 32K and 128K, with the index lse given and
// recomputed, split into the index-lse pre-pass / main kernel / dK + combines; the warm-up phase
// (full causal prefix, the dense forward's lse, index lse recomputed) at 8K and 32K. The sparse
// forward, the dense forward and, where this build has them on CUDA, the sparse and dense
// backwards are timed in the same run for scale. A few rows of dq_idx are checked against a float64
// host computation.
// Cost model (FLOPs): teacher 2 h_q d |T| (the scores only), student 2 h_kv d_idx |T| per product
// (scores, dq, dK: 3; +1 for the lse pre-pass), |T| = attended (query, key) pairs per group.
//
//   bench_kl [--iters N] [--quick]     (--quick: 32K sparse and 8K warm-up only)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bench_util.h"
#include "cuda/kl.h"
#include "msa/msa.h"

namespace {

using msa::bench::ok;

__global__ void fill_scaled(__nv_bfloat16* x, int64_t n, uint64_t seed, float sigma) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16(sigma * msa::bench::normal_from_hash(msa::bench::hash_at(seed, i)));
}

__nv_bfloat16* device_normal(int64_t n, uint64_t seed, float sigma) {
  __nv_bfloat16* p = nullptr;
  ok(cudaMalloc(&p, size_t(n) * 2), "cudaMalloc");
  fill_scaled<<<4096, 256>>>(p, n, seed, sigma);
  ok(cudaGetLastError(), "fill");
  return p;
}

// Attended (query, key) pairs of one group summed over the groups: sum over (i, r) of |T(i, r)|.
__global__ void count_attended(const int32_t* idx, int64_t n, int h_kv, int topk, int bk, unsigned long long* total) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  unsigned long long t = 0;
  if (row < n * h_kv) {
    const int64_t i = row / h_kv;
    for (int s = 0; s < topk; ++s) {
      const int b = idx[row * topk + s];
      if (b >= 0) t += unsigned(bk < i - int64_t(b) * bk + 1 ? int64_t(bk) : i - int64_t(b) * bk + 1);
    }
  }
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  if ((threadIdx.x & 31) == 0 && t) atomicAdd(total, t);
}

float bf(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <class T>
std::vector<T> fetch(const void* src, int64_t off, int64_t n) {
  std::vector<T> h(n);
  ok(cudaMemcpy(h.data(), static_cast<const T*>(src) + off, size_t(n) * sizeof(T), cudaMemcpyDeviceToHost), "copy");
  return h;
}

// Max over a few (query, group) rows of |dq_gpu - dq_ref| / (2^-7 |dq_ref| + 2^-8 sum_j (|dS_j| + coef 1e-4 (P_j +
// P_idx_j)) |k_j| iscale): the reference in float64 on the host from the same bf16 inputs and the same saved lse
// values.
double spot_check(const msa::IndexKLParams& a, int64_t n, const std::vector<int64_t>& rows) {
  const int64_t h_q = a.h_q, h_kv = a.h_kv, d = a.d, di = a.d_idx, g = h_q / h_kv, bk = a.bk, topk = a.topk;
  const double scale = 1.0 / std::sqrt(double(d)), iscale = 1.0 / std::sqrt(double(di));
  const double coef = double(a.lambda) / (double(n) * double(h_kv));
  double worst = 0;
  for (int64_t i : rows) {
    if (i < 0 || i >= n) continue;
    const auto q = fetch<uint16_t>(a.q, i * h_q * d, h_q * d);
    const auto qi = fetch<uint16_t>(a.q_idx, i * h_kv * di, h_kv * di);
    const auto dq = fetch<uint16_t>(a.dq_idx, i * h_kv * di, h_kv * di);
    const auto lse = fetch<float>(a.lse, i * h_q, h_q);
    const auto ilse = fetch<float>(a.index_lse, i * h_kv, h_kv);
    std::vector<int32_t> sel;
    if (a.topk_idx) sel = fetch<int32_t>(a.topk_idx, i * h_kv * topk, h_kv * topk);
    for (int64_t r = 0; r < h_kv; ++r) {
      std::vector<int64_t> keys;
      if (a.topk_idx) {
        for (int64_t s = 0; s < topk; ++s) {
          const int32_t b = sel[r * topk + s];
          if (b < 0) continue;
          for (int64_t j = b * bk; j < std::min<int64_t>((b + 1) * bk, i + 1); ++j) keys.push_back(j);
        }
      } else {
        for (int64_t j = 0; j <= i; ++j) keys.push_back(j);
      }
      std::vector<double> ref(di, 0.0), mag(di, 0.0);
      for (int64_t j : keys) {
        const auto kr = fetch<uint16_t>(a.k, (j * h_kv + r) * d, d);
        const auto ki = fetch<uint16_t>(a.k_idx, j * di, di);
        double pt = 0;
        for (int64_t e = 0; e < g; ++e) {
          double acc = 0;
          for (int64_t c = 0; c < d; ++c) acc += double(bf(q[(r * g + e) * d + c])) * bf(kr[c]);
          pt += std::exp(acc * scale - lse[r * g + e]) / double(g);
        }
        double acc = 0;
        for (int64_t c = 0; c < di; ++c) acc += double(bf(qi[r * di + c])) * bf(ki[c]);
        const double pi = std::exp(acc * iscale - ilse[r]), ds = coef * (pi - pt);
        // |dS| plus the float32 error of the two probabilities: d 2^-24 sum |q k| scale ~ 5e-5 relative
        // for unit-normal q, k at d = 128 (tests/test_cuda_kl.cpp derives it per element).
        const double err = std::abs(ds) + coef * (pi + pt) * 1e-4;
        for (int64_t c = 0; c < di; ++c) {
          ref[c] += iscale * ds * bf(ki[c]);
          mag[c] += iscale * err * std::abs(bf(ki[c]));
        }
      }
      for (int64_t c = 0; c < di; ++c)
        worst = std::max(worst, std::abs(bf(dq[r * di + c]) - ref[c]) /
                                    (std::ldexp(std::abs(ref[c]), -7) + std::ldexp(mag[c], -8) + 1e-30));
    }
  }
  return worst;
}

struct Split {
  float total = 0, lse = 0, main = 0, rest = 0;
};

// Median total of `iters` calls, and the phase split of the median-total call (events on stream 0).
// pass_queries: 0 for the library's default; the split is exact with one pass (the events mark the
// last pass's stages).
Split time_kl(const msa::IndexKLParams& a, bool backward, int iters, int64_t pass_queries = 0) {
  cudaEvent_t e0, e1, e2, e3;
  for (cudaEvent_t* e : {&e0, &e1, &e2, &e3}) ok(cudaEventCreate(e), "event");
  msa::cuda::KlOptions opt;
  opt.pass_queries = pass_queries;
  opt.after_lse = e1;
  opt.after_main = e2;
  for (int w = 0; w < 2; ++w) msa::cuda::run_index_kl(a, nullptr, backward, opt);
  ok(cudaDeviceSynchronize(), "warm-up");
  std::vector<Split> runs;
  for (int it = 0; it < iters; ++it) {
    ok(cudaEventRecord(e0), "record");
    msa::cuda::run_index_kl(a, nullptr, backward, opt);
    ok(cudaEventRecord(e3), "record");
    ok(cudaEventSynchronize(e3), "sync");
    Split s;
    ok(cudaEventElapsedTime(&s.total, e0, e3), "elapsed");
    ok(cudaEventElapsedTime(&s.lse, e0, e1), "elapsed");
    ok(cudaEventElapsedTime(&s.main, e1, e2), "elapsed");
    ok(cudaEventElapsedTime(&s.rest, e2, e3), "elapsed");
    runs.push_back(s);
  }
  std::sort(runs.begin(), runs.end(), [](const Split& x, const Split& y) { return x.total < y.total; });
  for (cudaEvent_t e : {e0, e1, e2, e3}) cudaEventDestroy(e);
  return runs[runs.size() / 2];
}

// Median ms of fn, or -1 when it throws (an operation this build has no CUDA kernel for).
float time_or_skip(const std::function<void()>& fn, int iters) {
  try {
    fn();
  } catch (const std::exception& e) {
    std::printf("    (skipped: %s)\n", e.what());
    return -1.f;
  }
  return msa::bench::median_ms([&](int) { fn(); }, 1, iters);
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 7;
  bool quick = false;
  for (int a = 1; a < argc; ++a) {
    if (!std::strcmp(argv[a], "--iters") && a + 1 < argc)
      iters = std::atoi(argv[++a]);
    else if (!std::strcmp(argv[a], "--quick"))
      quick = true;
  }
  if (msa::cuda_device_count() == 0) {
    std::printf("no CUDA device\n");
    return 1;
  }
  const cudaDeviceProp prop = msa::bench::device_props();
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  cudaMemPool_t pool;
  ok(cudaDeviceGetDefaultMemPool(&pool, 0), "pool");
  uint64_t threshold = UINT64_MAX;
  ok(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold), "pool attr");
  const int64_t h_q = 64, h_kv = 4, d = 128, di = 128, bk = 128, topk = 16;

  struct Case {
    int64_t n;
    bool sparse;
  };
  std::vector<Case> cases = {{32768, true}, {8192, false}};
  if (!quick) cases = {{32768, true}, {131072, true}, {8192, false}, {32768, false}};

  for (const Case& cs : cases) {
    const int64_t n = cs.n;
    __nv_bfloat16* q = device_normal(n * h_q * d, 1, 1.f);
    __nv_bfloat16* k = device_normal(n * h_kv * d, 2, 1.f);
    __nv_bfloat16* v = device_normal(n * h_kv * d, 3, 1.f);
    __nv_bfloat16* qi = device_normal(n * h_kv * di, 4, 1.f);
    __nv_bfloat16* ki = device_normal(n * di, 5, 1.f);
    __nv_bfloat16 *o, *dout, *dq, *dk, *dv, *dqi, *dki;
    float *lse, *ilse;
    int32_t* idx = nullptr;
    for (auto* pp : {&o, &dout, &dq}) ok(cudaMalloc(pp, size_t(n) * h_q * d * 2), "cudaMalloc");
    for (auto* pp : {&dk, &dv}) ok(cudaMalloc(pp, size_t(n) * h_kv * d * 2), "cudaMalloc");
    ok(cudaMalloc(&dqi, size_t(n) * h_kv * di * 2), "cudaMalloc");
    ok(cudaMalloc(&dki, size_t(n) * di * 2), "cudaMalloc");
    ok(cudaMalloc(&lse, size_t(n) * h_q * 4), "cudaMalloc");
    ok(cudaMalloc(&ilse, size_t(n) * h_kv * 4), "cudaMalloc");
    fill_scaled<<<4096, 256>>>(dout, n * h_q * d, 6, 1.f);
    msa::Exec ex;
    ex.backend = msa::Backend::cuda;

    // Main branch forward (its lse is the teacher's normaliser), and the selection with its index lse.
    msa::AttentionParams at;
    at.seq.n_q = at.seq.n_k = n;
    at.h_q = h_q;
    at.h_kv = h_kv;
    at.d = d;
    at.q = q;
    at.k = k;
    at.v = v;
    at.o = o;
    at.lse = lse;
    unsigned long long attended = 0;
    if (cs.sparse) {
      ok(cudaMalloc(&idx, size_t(n) * h_kv * topk * 4), "cudaMalloc");
      msa::IndexTopkParams ip;
      ip.seq = at.seq;
      ip.h_kv = h_kv;
      ip.d_idx = di;
      ip.bk = bk;
      ip.topk = topk;
      ip.q_idx = qi;
      ip.k_idx = ki;
      ip.topk_idx = idx;
      ip.index_lse = ilse;
      msa::index_topk(ip, ex);
      at.topk_idx = idx;
      at.topk = topk;
      at.bk = bk;
      unsigned long long* dtot;
      ok(cudaMalloc(&dtot, 8), "cudaMalloc");
      ok(cudaMemset(dtot, 0, 8), "memset");
      count_attended<<<unsigned((n * h_kv + 255) / 256), 256>>>(idx, n, int(h_kv), int(topk), int(bk), dtot);
      ok(cudaMemcpy(&attended, dtot, 8, cudaMemcpyDeviceToHost), "copy");
      cudaFree(dtot);
      msa::sparse_attention_forward(at, ex);
    } else {
      attended = (unsigned long long)(n) * (n + 1) / 2 * h_kv;
      msa::dense_attention_forward(at, ex);
    }
    ok(cudaDeviceSynchronize(), "forward");
    const float fwd_ms = msa::bench::median_ms(
        [&](int) { cs.sparse ? msa::sparse_attention_forward(at, ex) : msa::dense_attention_forward(at, ex); }, 1,
        iters);

    msa::IndexKLParams kp;
    kp.seq = at.seq;
    kp.h_q = h_q;
    kp.h_kv = h_kv;
    kp.d = d;
    kp.d_idx = di;
    kp.q = q;
    kp.k = k;
    kp.q_idx = qi;
    kp.k_idx = ki;
    kp.topk_idx = idx;
    kp.topk = cs.sparse ? topk : 0;
    kp.bk = bk;
    kp.lse = lse;
    kp.index_lse = cs.sparse ? ilse : nullptr;
    kp.dq_idx = dqi;
    kp.dk_idx = dki;

    const double per_pair_teacher = 2.0 * double(h_q / h_kv) * d, per_pair_student = 2.0 * di;
    const double pairs = double(attended);  // summed over groups
    std::printf("\n%s n = %lld: attended (query, key) pairs over groups %.4g; %s forward %.2f ms\n",
                cs.sparse ? "sparse" : "warm-up", (long long)n, pairs, cs.sparse ? "sparse" : "dense", fwd_ms);
    auto report = [&](const char* what, const Split& s, int student_products) {
      const double flops = pairs * (per_pair_teacher + student_products * per_pair_student);
      std::printf("  %-34s %9.2f ms  (index-lse pre-pass %.2f, main %.2f, dK + combines %.2f)  %.0f TFLOP/s\n", what,
                  s.total, s.lse, s.main, s.rest, flops / (s.total * 1e9));
    };
    if (cs.sparse) {
      const Split given = time_kl(kp, true, iters);
      report("KL backward, index lse given", given, 3);
      report("  the same in one query pass", time_kl(kp, true, iters, n), 3);
      std::vector<int64_t> rows = {0, 1, 127, 128, 4095, n / 2 + 3, n - 1};
      std::printf("  dq_idx spot check (float64 host reference): worst |err| / bound = %.3f\n",
                  spot_check(kp, n, rows));
      kp.index_lse = nullptr;
      report("KL backward, index lse recomputed (1 pass)", time_kl(kp, true, iters, n), 4);
      kp.index_lse = ilse;
      report("KL loss (value), index lse given (1 pass)", time_kl(kp, false, iters, n), 1);
      std::printf("  loss value %.6f\n", msa::index_kl_loss(kp, ex));
      msa::AttentionBwdParams bp;
      static_cast<msa::AttentionParams&>(bp) = at;
      bp.do_ = dout;
      bp.dq = dq;
      bp.dk = dk;
      bp.dv = dv;
      const float bwd = time_or_skip([&] { msa::sparse_attention_backward(bp, ex); }, iters);
      if (bwd > 0)
        std::printf("  sparse attention backward %.2f ms: KL backward (lse given) = %.1f%% of it\n", bwd,
                    100.0 * given.total / bwd);
    } else {
      const Split w = time_kl(kp, true, iters);
      report("KL backward (warm-up, index lse recomputed)", w, 4);
      const Split l = time_kl(kp, false, iters);
      report("KL loss (warm-up)", l, 2);
      msa::AttentionBwdParams bp;
      static_cast<msa::AttentionParams&>(bp) = at;
      bp.do_ = dout;
      bp.dq = dq;
      bp.dk = dk;
      bp.dv = dv;
      const float bwd = time_or_skip([&] { msa::dense_attention_backward(bp, ex); }, iters);
      if (bwd > 0)
        std::printf("  dense attention backward %.2f ms: KL warm-up backward = %.1f%% of it\n", bwd,
                    100.0 * w.total / bwd);
    }
    for (void* pp : {(void*)q, (void*)k, (void*)v, (void*)qi, (void*)ki, (void*)o, (void*)dout, (void*)dq, (void*)dk,
                     (void*)dv, (void*)dqi, (void*)dki, (void*)lse, (void*)ilse, (void*)idx})
      cudaFree(pp);
  }
  return 0;
}
