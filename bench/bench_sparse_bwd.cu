// bench_sparse_bwd — times msa::sparse_attention_backward on the CUDA backend at the M3 shape
// (h_q = 64, h_kv = 4, d = 128, bk = 128, topk = 16, bf16, one causal sequence) for n = 32K and
// 128K, with a synthetic selection built on the GPU: own block + sink block 0 + 14 distinct random
// visible blocks per (query, group). o and lse come from the CUDA sparse forward on the same inputs.
// Reports the median time of the public call (atomic and deterministic modes), the split of a
// one-pass call into schedule / main kernel / rest, effective TFLOP/s, and spot checks of dq (a few
// rows) and dk, dv (the last block, which only its own queries can attend) against float64 on the
// host.
// Cost model: FLOPs = 2.5 * 4 * g * d * sum over (query, group) of |T| (the backward's five
// products against the forward's two, over the attended (query, key) pairs only).
//
//   bench_sparse_bwd [--iters N] [--quick] [--n N] [--chunk C1,C2,...] [--pass P1,P2,...] [--no-exchange]
//   (--chunk / --pass: also time the atomic mode with these work-item sizes / query passes, in
//   queries; --no-exchange: also time both warpgroups sending dQ atomically)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench_util.h"
#include "cuda/sparse_bwd.h"
#include "msa/msa.h"

namespace {

using msa::bench::hash_at;
using msa::bench::mix64;
using msa::bench::normal_from_hash;
using msa::bench::ok;

__global__ void fill(__nv_bfloat16* x, int64_t n, uint64_t seed, float sigma) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16(sigma * normal_from_hash(hash_at(seed, i)));
}

// One (query, group) row per thread, query i at position i: a query that sees <= topk blocks takes
// them all; otherwise its own block, the sink 0 and topk - 2 distinct blocks of 1 .. own - 1 drawn
// by Floyd's sampling, ascending. Adds the row's attended tokens to *attended.
__global__ void make_selection(int32_t* idx, int64_t n, int h_kv, int topk, int bk, uint64_t seed,
                               unsigned long long* attended) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  unsigned long long tokens = 0;
  if (row < n * h_kv) {
    const int64_t i = row / h_kv;
    const int own = int(i / bk);
    int sel[32], cnt = 0;
    if (own < topk) {
      for (int b = 0; b <= own; ++b) sel[cnt++] = b;
    } else {
      sel[cnt++] = 0;
      const int m = topk - 2, range = own - 1;  // m distinct values of 1 .. range
      for (int j = range - m + 1; j <= range; ++j) {
        const int t = 1 + int(mix64(seed + uint64_t(row) * 977 + uint64_t(j)) % uint64_t(j));
        bool dup = false;
        for (int u = 1; u < cnt; ++u) dup |= sel[u] == t;
        sel[cnt++] = dup ? j : t;
      }
      sel[cnt++] = own;
      for (int a = 1; a < cnt; ++a)
        for (int b = a; b > 0 && sel[b - 1] > sel[b]; --b) {
          const int x = sel[b];
          sel[b] = sel[b - 1];
          sel[b - 1] = x;
        }
    }
    for (int s = 0; s < topk; ++s) {
      const int b = s < cnt ? sel[s] : -1;
      idx[row * topk + s] = b;
      if (b >= 0) tokens += unsigned(i - int64_t(b) * bk + 1 < bk ? i - int64_t(b) * bk + 1 : bk);
    }
  }
  for (int o = 16; o > 0; o >>= 1) tokens += __shfl_xor_sync(0xffffffffu, tokens, o);
  if ((threadIdx.x & 31) == 0 && tokens) atomicAdd(attended, tokens);
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double bf(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <class T>
std::vector<T> download(const void* src, int64_t count) {
  std::vector<T> h(count);
  ok(cudaMemcpy(h.data(), src, count * sizeof(T), cudaMemcpyDeviceToHost), "download");
  return h;
}

// Worst error over its bf16 bound u |ref| + (2u + 1e-4) abs (the tests' bound) of dq on a few query
// rows, and of dk, dv on the last block (attended only by the queries inside it).
struct Check {
  double dq = 0, dkv = 0;
};

Check spot_check(const msa::AttentionBwdParams& a, int64_t n) {
  const int64_t h_q = a.h_q, h_kv = a.h_kv, d = a.d, g = h_q / h_kv, topk = a.topk, bk = a.bk;
  const double u = 1.0 / 256, scale = a.scale;
  Check c;
  auto ratio = [&](double got, double ref, double abs) {
    return std::abs(got - ref) / (u * std::abs(ref) + (2 * u + 1e-4) * abs + 1e-30);
  };
  const std::vector<uint16_t> hk = download<uint16_t>(a.k, n * h_kv * d), hv = download<uint16_t>(a.v, n * h_kv * d);
  // Rows of query i: q, o, do, dq (all heads), lse, selection.
  auto rows = [&](const void* base, int64_t i) {
    return download<uint16_t>(static_cast<const uint16_t*>(base) + i * h_q * d, h_q * d);
  };
  // P, dP, delta of (i, h) over key j of group r; returns false past the query.
  struct RowData {
    std::vector<uint16_t> q, o, dout, dq;
    std::vector<float> lse;
    std::vector<int32_t> sel;
  };
  auto load = [&](int64_t i) {
    RowData R;
    R.q = rows(a.q, i);
    R.o = rows(a.o, i);
    R.dout = rows(a.do_, i);
    R.dq = rows(a.dq, i);
    R.lse = download<float>(a.lse + i * h_q, h_q);
    R.sel = download<int32_t>(a.topk_idx + i * h_kv * topk, h_kv * topk);
    return R;
  };
  auto pair = [&](const RowData& R, int64_t h, int64_t r, int64_t j, double delta, double* p, double* ds) {
    double s = 0, dp = 0;
    for (int64_t x = 0; x < d; ++x) {
      s += bf(R.q[h * d + x]) * bf(hk[(j * h_kv + r) * d + x]);
      dp += bf(R.dout[h * d + x]) * bf(hv[(j * h_kv + r) * d + x]);
    }
    *p = std::exp(s * scale - double(R.lse[h]));
    *ds = *p * (dp - delta);
    return std::abs(dp) + std::abs(delta);
  };
  auto delta_of = [&](const RowData& R, int64_t h) {
    double x = 0;
    for (int64_t e = 0; e < d; ++e) x += bf(R.dout[h * d + e]) * bf(R.o[h * d + e]);
    return x;
  };
  for (int64_t i : {int64_t(0), int64_t(129), int64_t(4095), n / 2 + 3, n - 1}) {
    const RowData R = load(i);
    for (int64_t h = 0; h < h_q; ++h) {
      const int64_t r = h / g;
      const double delta = delta_of(R, h);
      std::vector<double> ref(d, 0.0), abs(d, 0.0);
      for (int64_t s = 0; s < topk; ++s) {
        const int32_t b = R.sel[r * topk + s];
        if (b < 0) continue;
        for (int64_t j = b * bk; j < std::min<int64_t>((b + 1) * bk, i + 1); ++j) {
          double p, ds;
          const double mag = pair(R, h, r, j, delta, &p, &ds);
          for (int64_t x = 0; x < d; ++x) {
            ref[x] += scale * ds * bf(hk[(j * h_kv + r) * d + x]);
            abs[x] += scale * p * mag * std::abs(bf(hk[(j * h_kv + r) * d + x]));
          }
        }
      }
      for (int64_t x = 0; x < d; ++x) c.dq = std::max(c.dq, ratio(bf(R.dq[h * d + x]), ref[x], abs[x]));
    }
  }
  // The last block: keys [kb, n), attended by queries [kb, n) through their own block.
  const int64_t kb = (n - 1) / bk * bk, nk = n - kb;
  std::vector<double> dk(nk * h_kv * d, 0.0), dv(dk.size(), 0.0), dka(dk.size(), 0.0), dva(dk.size(), 0.0);
  for (int64_t i = kb; i < n; ++i) {
    const RowData R = load(i);
    for (int64_t h = 0; h < h_q; ++h) {
      const int64_t r = h / g;
      const double delta = delta_of(R, h);
      for (int64_t j = kb; j <= i; ++j) {
        double p, ds;
        const double mag = pair(R, h, r, j, delta, &p, &ds);
        const int64_t o = ((j - kb) * h_kv + r) * d;
        for (int64_t x = 0; x < d; ++x) {
          dv[o + x] += p * bf(R.dout[h * d + x]);
          dva[o + x] += p * std::abs(bf(R.dout[h * d + x]));
          dk[o + x] += scale * ds * bf(R.q[h * d + x]);
          dka[o + x] += scale * p * mag * std::abs(bf(R.q[h * d + x]));
        }
      }
    }
  }
  const std::vector<uint16_t> gk =
      download<uint16_t>(static_cast<const uint16_t*>(a.dk) + kb * h_kv * d, nk * h_kv * d);
  const std::vector<uint16_t> gv =
      download<uint16_t>(static_cast<const uint16_t*>(a.dv) + kb * h_kv * d, nk * h_kv * d);
  for (size_t e = 0; e < dk.size(); ++e)
    c.dkv = std::max({c.dkv, ratio(bf(gk[e]), dk[e], dka[e]), ratio(bf(gv[e]), dv[e], dva[e])});
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 5;
  bool quick = false;
  int64_t only_n = 0;
  std::vector<int64_t> chunks, passes;
  bool no_exchange = false;
  for (int a = 1; a < argc; ++a) {
    if (!std::strcmp(argv[a], "--iters") && a + 1 < argc)
      iters = std::atoi(argv[++a]);
    else if (!std::strcmp(argv[a], "--quick"))
      quick = true;
    else if (!std::strcmp(argv[a], "--n") && a + 1 < argc)
      only_n = std::atoll(argv[++a]);
    else if (!std::strcmp(argv[a], "--chunk") && a + 1 < argc)
      for (char* t = std::strtok(argv[++a], ","); t; t = std::strtok(nullptr, ",")) chunks.push_back(std::atoll(t));
    else if (!std::strcmp(argv[a], "--pass") && a + 1 < argc)
      for (char* t = std::strtok(argv[++a], ","); t; t = std::strtok(nullptr, ",")) passes.push_back(std::atoll(t));
    else if (!std::strcmp(argv[a], "--no-exchange"))
      no_exchange = true;
  }
  // Extra atomic-mode variants after the three fixed modes: {chunk, pass, exchange}.
  struct Variant {
    int64_t chunk, pass;
    bool exchange;
  };
  std::vector<Variant> variants;
  for (int64_t c : chunks) variants.push_back({c, 0, true});
  for (int64_t p : passes) variants.push_back({0, p, true});
  if (no_exchange) variants.push_back({0, 0, false});
  if (msa::cuda_device_count() == 0) {
    std::printf("no CUDA device\n");
    return 1;
  }
  const cudaDeviceProp prop = msa::bench::device_props();
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  // Keep the stream-ordered workspace mapped between calls, as a training loop would.
  cudaMemPool_t pool;
  ok(cudaDeviceGetDefaultMemPool(&pool, 0), "pool");
  uint64_t threshold = UINT64_MAX;
  ok(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold), "pool attr");

  const int64_t h_q = 64, h_kv = 4, d = 128, bk = 128, topk = 16, g = h_q / h_kv;
  std::vector<int64_t> sizes = {32768};
  if (!quick) sizes.push_back(131072);
  if (only_n > 0) sizes = {only_n};
  cudaStream_t stream;
  ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  cudaEvent_t ev[4];
  for (auto& e : ev) ok(cudaEventCreate(&e), "event");

  std::printf("%-7s %-14s %9s %9s %9s %9s %9s %9s %9s %9s\n", "n", "mode", "total_ms", "sched_ms", "main_ms", "rest_ms",
              "TFLOP/s", "attended", "dq_err", "dkv_err");
  for (int64_t n : sizes) {
    const int64_t nq = n * h_q * d, nk = n * h_kv * d;
    __nv_bfloat16 *q, *k, *v, *o, *dout, *dq, *dk, *dv;
    float* lse;
    int32_t* idx;
    unsigned long long* attended;
    for (auto* pp : {&q, &o, &dout, &dq}) ok(cudaMalloc(pp, nq * 2), "malloc");
    for (auto* pp : {&k, &v, &dk, &dv}) ok(cudaMalloc(pp, nk * 2), "malloc");
    ok(cudaMalloc(&lse, n * h_q * 4), "malloc lse");
    ok(cudaMalloc(&idx, n * h_kv * topk * 4), "malloc idx");
    ok(cudaMalloc(&attended, 8), "malloc");
    fill<<<4096, 256>>>(q, nq, 1, 2.f);
    fill<<<4096, 256>>>(k, nk, 2, 1.f);
    fill<<<4096, 256>>>(v, nk, 3, 1.f);
    fill<<<4096, 256>>>(dout, nq, 4, 1.f);
    ok(cudaMemset(attended, 0, 8), "memset");
    make_selection<<<unsigned((n * h_kv + 255) / 256), 256>>>(idx, n, int(h_kv), int(topk), int(bk), 7, attended);
    ok(cudaGetLastError(), "fill / selection");
    unsigned long long tokens = 0;
    ok(cudaMemcpy(&tokens, attended, 8, cudaMemcpyDeviceToHost), "attended");
    const double flops = 2.5 * 4.0 * double(g) * double(d) * double(tokens);

    msa::AttentionBwdParams a;
    a.seq.n_q = a.seq.n_k = n;
    a.h_q = h_q;
    a.h_kv = h_kv;
    a.d = d;
    a.bk = bk;
    a.topk = topk;
    a.scale = float(1.0 / std::sqrt(double(d)));
    a.q = q;
    a.k = k;
    a.v = v;
    a.o = o;
    a.lse = lse;
    a.topk_idx = idx;
    a.do_ = dout;
    a.dq = dq;
    a.dk = dk;
    a.dv = dv;
    msa::Exec ex;
    ex.backend = msa::Backend::cuda;
    ex.stream = stream;
    msa::sparse_attention_forward(a, ex);
    ok(cudaStreamSynchronize(stream), "forward");

    // mode: 0 atomics (public call), 1 deterministic (public call), 2 atomics in one pass with the
    // split into schedule / main kernel / the rest (delta before, conversions after), 3.. atomics
    // with the --chunk work-item sizes.
    for (int mode = 0; mode < 3 + int(variants.size()); ++mode) {
      a.deterministic = mode == 1;
      msa::cuda::SparseBwdOptions opt;
      opt.pass_queries = mode == 2 ? n : 0;
      if (mode >= 3) {
        opt.chunk_queries = variants[mode - 3].chunk;
        opt.pass_queries = variants[mode - 3].pass;
        opt.dq_exchange = variants[mode - 3].exchange;
      }
      opt.after_schedule = ev[1];
      opt.after_main = ev[2];
      auto call = [&] {
        if (mode >= 2)
          msa::cuda::run_sparse_attention_backward(a, stream, opt);
        else
          msa::sparse_attention_backward(a, ex);
      };
      call();
      ok(cudaStreamSynchronize(stream), "warm-up");
      std::vector<float> tot, sch, mainv, rest;
      for (int it = 0; it < iters; ++it) {
        ok(cudaEventRecord(ev[0], stream), "record");
        call();
        ok(cudaEventRecord(ev[3], stream), "record");
        ok(cudaEventSynchronize(ev[3]), "sync");
        float t0 = 0;
        ok(cudaEventElapsedTime(&t0, ev[0], ev[3]), "elapsed");
        tot.push_back(t0);
        if (mode == 2) {
          float t1 = 0, t2 = 0, t3 = 0;
          ok(cudaEventElapsedTime(&t1, ev[0], ev[1]), "elapsed");
          ok(cudaEventElapsedTime(&t2, ev[1], ev[2]), "elapsed");
          ok(cudaEventElapsedTime(&t3, ev[2], ev[3]), "elapsed");
          sch.push_back(t1);
          mainv.push_back(t2);
          rest.push_back(t3);
        }
      }
      const Check c = spot_check(a, n);
      const double ms = median(tot);
      char label[32];
      if (mode >= 3) {
        const Variant& v = variants[mode - 3];
        std::snprintf(label, sizeof label, "atomics/%s%lld",
                      v.chunk  ? "c"
                      : v.pass ? "p"
                               : "nox",
                      (long long)(v.chunk ? v.chunk : v.pass));
      } else
        std::snprintf(label, sizeof label, "%s", mode == 0 ? "atomics" : mode == 1 ? "deterministic" : "atomics/1pass");
      std::printf("%-7lld %-14s %9.3f %9.3f %9.3f %9.3f %9.1f %9.0f %9.3f %9.3f\n", (long long)n, label, ms,
                  mode == 2 ? median(sch) : 0.f, mode == 2 ? median(mainv) : 0.f, mode == 2 ? median(rest) : 0.f,
                  flops / (ms * 1e-3) / 1e12, double(tokens) / double(n * h_kv), c.dq, c.dkv);
      std::fflush(stdout);
    }
    for (void* ptr : {(void*)q, (void*)k, (void*)v, (void*)o, (void*)dout, (void*)dq, (void*)dk, (void*)dv, (void*)lse,
                      (void*)idx, (void*)attended})
      cudaFree(ptr);
  }
  std::printf(
      "columns: sched/main/rest only for the one-pass call (rest: delta before the schedule is in sched_ms; dq/dk/dv "
      "conversions after the main kernel in rest_ms); attended = mean |T| per (query, group); dq_err, dkv_err = worst "
      "spot-check error over its bf16 bound (<= 1 passes)\n");
  return 0;
}
