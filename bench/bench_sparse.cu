// bench_sparse — times msa::sparse_attention_forward on the CUDA backend at the M3 shape (h_q = 64,
// h_kv = 4, d = 128, bk = 128, topk = 16, bf16, one causal sequence) for n = 32K and 128K, with two
// selections built on the GPU: "random" (own block + sink block 0 + 14 random visible blocks per
// (query, group), ascending; with --sink P only a fraction P of the rows holds the sink, the others
// take 15 random blocks) and "window" (own block + the 15 before it). Reports the median time
// of the whole call, its split into schedule / phase 1 / local pass (or combine: comb_ms), effective
// TFLOP/s and a bytes rate, and spot-checks a few rows against a float64 host computation.
// Cost model: FLOPs = 4 * g * d * sum over (query, group) of |T| (attended tokens); bytes (the
// combine design's, kept as a fixed yardstick across versions) = Q rows gathered once per selected
// block, the bf16 partial o + lse written and read back, o written. The local pass moves less: the
// sink and own blocks' partials are neither written nor read.
//
//   bench_sparse [--iters N] [--quick] [--n N] [--pass P1,P2,...] [--band B1,B2,...] [--malloc-ws] [--no-local]
//                [--sink P]
//   (--quick: n = 32K only; --pass: the default variant with each query-pass size instead of the
//   partial/chunk variants; --band: each of these query-band sizes (-1: one band) with each pass
//   size (default passes if --pass is not given); --malloc-ws: run each variant a second time on a workspace from
//   cudaMalloc passed in, instead of the call's stream-ordered allocation)
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
#include "cuda/sparse_fwd.h"
#include "msa/msa.h"

namespace {

using msa::bench::mix64;
using msa::bench::ok;

// sigma * standard normal bf16 values of stream seed. Not bench_util.h's normal_from_hash: there
// sigma would multiply the product sqrt * cos instead of sqrt first, which changes the kernel's
// machine code.
__global__ void fill_normal(__nv_bfloat16* x, int64_t n, uint64_t seed, float sigma) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t h = msa::bench::hash_at(seed, i);
    const float u1 = (float(h >> 40) + 0.5f) * (1.f / 16777216.f);
    const float u2 = (float(h & 0xffffff) + 0.5f) * (1.f / 16777216.f);
    x[i] = __float2bfloat16(sigma * sqrtf(-2.f * logf(u1)) * cospif(2.f * u2));
  }
}

// One (query, group) row per thread: query i sits at position i of one sequence. random: own block,
// sink 0 and topk - 2 distinct random blocks of 1 .. own - 1 (Floyd's sampling), ascending (rows
// without the sink, a fraction 1 - sink_ppm / 1e6: topk - 1 random blocks); a query
// that sees <= topk blocks takes them all. window: the own block and the topk - 1 before it.
// Also adds the row's attended tokens |T| to *attended.
__global__ void make_selection(int32_t* idx, int64_t n, int h_kv, int topk, int bk, bool window, uint64_t seed,
                               uint32_t sink_ppm, unsigned long long* attended) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  unsigned long long tokens = 0;
  if (row < n * h_kv) {
    const int64_t i = row / h_kv;
    const int own = int(i / bk);
    int sel[32];
    int cnt = 0;
    if (own + 1 <= topk) {
      for (int b = 0; b <= own; ++b) sel[cnt++] = b;
    } else if (window) {
      for (int b = own - topk + 1; b <= own; ++b) sel[cnt++] = b;
    } else {
      const bool sink = mix64(seed ^ 0x5a5a5a5aull ^ mix64(uint64_t(row))) % 1000000u < sink_ppm;
      const int m = sink ? topk - 2 : topk - 1, range = own - 1;  // choose m of blocks 1 .. own - 1
      for (int j = range - m; j < range; ++j) {
        const int t = int(mix64(seed ^ mix64(uint64_t(row) * 64 + j)) % uint64_t(j + 1));
        bool seen = false;
        for (int u = 0; u < cnt; ++u) seen |= sel[u] == t + 1;
        sel[cnt++] = seen ? j + 1 : t + 1;
      }
      if (sink) sel[cnt++] = 0;
      sel[cnt++] = own;
      for (int a = 1; a < cnt; ++a)  // insertion sort, ascending
        for (int b = a; b > 0 && sel[b - 1] > sel[b]; --b) {
          const int tmp = sel[b];
          sel[b] = sel[b - 1];
          sel[b - 1] = tmp;
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

struct Timing {
  float total = 0, sched = 0, phase1 = 0, combine = 0;
};

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

float bf(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Max over a few (query, head) rows of |o_gpu - o_ref| / (u |o_ref| + 2u o_abs + 1e-4 o_abs), and
// of |lse_gpu - lse_ref|, with the reference in float64 on the host.
void spot_check(const msa::AttentionParams& a, int64_t n, const std::vector<uint16_t>& hk,
                const std::vector<uint16_t>& hv, double* o_ratio, double* lse_err) {
  const int64_t h_q = a.h_q, h_kv = a.h_kv, d = a.d, g = h_q / h_kv, topk = a.topk, bk = a.bk;
  *o_ratio = 0;
  *lse_err = 0;
  const int64_t rows[] = {0, 1, 127, 128, 4095, n / 2 + 3, n - 129, n - 1};
  for (int64_t i : rows) {
    if (i < 0 || i >= n) continue;
    std::vector<uint16_t> q(h_q * d), o(h_q * d);
    std::vector<float> lse(h_q);
    std::vector<int32_t> sel(h_kv * topk);
    ok(cudaMemcpy(q.data(), static_cast<const uint16_t*>(a.q) + i * h_q * d, q.size() * 2, cudaMemcpyDeviceToHost),
       "q");
    ok(cudaMemcpy(o.data(), static_cast<const uint16_t*>(a.o) + i * h_q * d, o.size() * 2, cudaMemcpyDeviceToHost),
       "o");
    ok(cudaMemcpy(lse.data(), a.lse + i * h_q, h_q * 4, cudaMemcpyDeviceToHost), "lse");
    ok(cudaMemcpy(sel.data(), a.topk_idx + i * h_kv * topk, sel.size() * 4, cudaMemcpyDeviceToHost), "idx");
    for (int64_t r = 0; r < h_kv; ++r) {
      std::vector<int64_t> keys;
      for (int64_t s = 0; s < topk; ++s) {
        const int32_t b = sel[r * topk + s];
        if (b < 0) continue;
        for (int64_t j = b * bk; j < std::min<int64_t>((b + 1) * bk, i + 1); ++j) keys.push_back(j);
      }
      std::vector<uint16_t> kr(keys.size() * d), vr(keys.size() * d);
      for (size_t t = 0; t < keys.size(); ++t) {
        std::memcpy(&kr[t * d], &hk[(keys[t] * h_kv + r) * d], d * 2);
        std::memcpy(&vr[t * d], &hv[(keys[t] * h_kv + r) * d], d * 2);
      }
      for (int64_t e = 0; e < g; ++e) {
        const int64_t h = r * g + e;
        std::vector<double> s(keys.size());
        double mx = -INFINITY;
        for (size_t t = 0; t < keys.size(); ++t) {
          double acc = 0;
          for (int64_t c = 0; c < d; ++c) acc += double(bf(q[h * d + c])) * bf(kr[t * d + c]);
          s[t] = acc * a.scale;
          mx = std::max(mx, s[t]);
        }
        double sum = 0;
        for (double& x : s) sum += (x = std::exp(x - mx));
        *lse_err = std::max(*lse_err, std::abs(double(lse[h]) - (mx + std::log(sum))));
        for (int64_t c = 0; c < d; ++c) {
          double ov = 0, oa = 0;
          for (size_t t = 0; t < keys.size(); ++t) {
            ov += s[t] * bf(vr[t * d + c]);
            oa += s[t] * std::abs(bf(vr[t * d + c]));
          }
          ov /= sum;
          oa /= sum;
          const double u = 1.0 / 256;
          *o_ratio =
              std::max(*o_ratio, std::abs(bf(o[h * d + c]) - ov) / (u * std::abs(ov) + (2 * u + 1e-4) * oa + 1e-7));
        }
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 10;
  bool quick = false;
  int64_t only_n = 0;
  std::vector<int64_t> passes, bands;
  bool malloc_ws = false;
  // --no-local: every block in phase 1, then the combine kernel (the design before the local pass)
  bool no_local = false;
  double sink_frac = 1.0;  // --sink P: the random selection holds block 0 in this fraction of rows
  for (int a = 1; a < argc; ++a) {
    if (!std::strcmp(argv[a], "--iters") && a + 1 < argc)
      iters = std::atoi(argv[++a]);
    else if (!std::strcmp(argv[a], "--quick"))
      quick = true;
    else if (!std::strcmp(argv[a], "--no-local"))
      no_local = true;
    else if (!std::strcmp(argv[a], "--malloc-ws"))
      malloc_ws = true;
    else if (!std::strcmp(argv[a], "--sink") && a + 1 < argc)
      sink_frac = std::atof(argv[++a]);
    else if (!std::strcmp(argv[a], "--n") && a + 1 < argc)
      only_n = std::atoll(argv[++a]);
    else if (!std::strcmp(argv[a], "--pass") && a + 1 < argc)
      for (char* t = std::strtok(argv[++a], ","); t; t = std::strtok(nullptr, ",")) passes.push_back(std::atoll(t));
    else if (!std::strcmp(argv[a], "--band") && a + 1 < argc)
      for (char* t = std::strtok(argv[++a], ","); t; t = std::strtok(nullptr, ",")) bands.push_back(std::atoll(t));
  }
  if (msa::cuda_device_count() == 0) {
    std::printf("no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop;
  ok(cudaGetDeviceProperties(&prop, 0), "props");
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  // The workspace (34 GB of partials at 128K) is stream-ordered memory: keep it mapped between calls,
  // as an application that calls the op repeatedly would.
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

  std::printf("%-7s %-7s %-10s %9s %9s %9s %9s %9s %8s %8s %10s %9s\n", "n", "select", "part/chunk", "total_ms",
              "sched_ms", "phase1_ms", "comb_ms", "TFLOP/s", "GB/s", "attended", "o_err/bnd", "lse_err");
  for (int64_t n : sizes) {
    __nv_bfloat16 *q, *k, *v, *o;
    float* lse;
    int32_t* idx;
    unsigned long long* attended;
    ok(cudaMalloc(&q, n * h_q * d * 2), "malloc q");
    ok(cudaMalloc(&k, n * h_kv * d * 2), "malloc k");
    ok(cudaMalloc(&v, n * h_kv * d * 2), "malloc v");
    ok(cudaMalloc(&o, n * h_q * d * 2), "malloc o");
    ok(cudaMalloc(&lse, n * h_q * 4), "malloc lse");
    ok(cudaMalloc(&idx, n * h_kv * topk * 4), "malloc idx");
    ok(cudaMalloc(&attended, 8), "malloc");
    // q a little larger than k: peaked rows, as in the tests.
    fill_normal<<<4096, 256>>>(q, n * h_q * d, 1, 2.f);
    fill_normal<<<4096, 256>>>(k, n * h_kv * d, 2, 1.f);
    fill_normal<<<4096, 256>>>(v, n * h_kv * d, 3, 1.f);
    ok(cudaGetLastError(), "fill");
    std::vector<uint16_t> hk(n * h_kv * d), hv(n * h_kv * d);
    ok(cudaMemcpy(hk.data(), k, hk.size() * 2, cudaMemcpyDeviceToHost), "download k");
    ok(cudaMemcpy(hv.data(), v, hv.size() * 2, cudaMemcpyDeviceToHost), "download v");

    msa::AttentionParams a;
    a.seq.n_q = a.seq.n_k = n;
    a.h_q = h_q;
    a.h_kv = h_kv;
    a.d = d;
    a.bk = bk;
    a.topk = topk;
    a.scale = float(1.0 / std::sqrt(double(d)));
    // Explicit contiguous strides: the timed loop calls the internal launcher, past the API's
    // resolution of zero strides.
    a.stride_q_head = a.stride_o_head = a.stride_k_head = a.stride_v_head = d;
    a.stride_q_tok = a.stride_o_tok = h_q * d;
    a.stride_k_tok = a.stride_v_tok = h_kv * d;
    a.q = q;
    a.k = k;
    a.v = v;
    a.o = o;
    a.lse = lse;
    a.topk_idx = idx;
    msa::Exec ex;
    ex.backend = msa::Backend::cuda;
    ex.stream = stream;

    for (int window = 0; window < 2; ++window) {
      ok(cudaMemset(attended, 0, 8), "memset");
      const int64_t rows = n * h_kv;
      make_selection<<<unsigned((rows + 255) / 256), 256>>>(idx, n, int(h_kv), int(topk), int(bk), window != 0, 7,
                                                            uint32_t(sink_frac * 1e6 + 0.5), attended);
      ok(cudaGetLastError(), "selection");
      unsigned long long tokens = 0;
      ok(cudaMemcpy(&tokens, attended, 8, cudaMemcpyDeviceToHost), "attended");
      const double flops = 4.0 * double(g) * double(d) * double(tokens);
      const double entries = double(tokens) / double(bk);  // ~ selected (query, group, block) triples
      // Variants: the default (bf16 partials, chunk 2 * topk * bk = 4096 queries), float32 partials
      // (32K only: they need n * h_q * topk * d * 4 bytes, 69 GB at 128K), and other chunk sizes.
      struct Variant {
        int f32;
        int64_t chunk;
        int64_t pass = 0;
        bool ext = false;
        int64_t band = 0;
      };
      std::vector<Variant> variants = {{0, 0}, {1, 0}, {0, 1024}, {0, 16384}};
      if (!passes.empty()) {
        variants.clear();
        for (int64_t p : passes) variants.push_back({0, 0, p});
      }
      if (!bands.empty()) {
        std::vector<Variant> with_bands;
        if (variants.size() == 4 && passes.empty()) variants = {{0, 0, 0}};
        for (const Variant& v0 : variants)
          for (int64_t b : bands) with_bands.push_back(v0), with_bands.back().band = b;
        variants = with_bands;
      }
      if (malloc_ws) {
        const size_t nv = variants.size();
        for (size_t u = 0; u < nv; ++u) variants.push_back(variants[u]), variants.back().ext = true;
      }
      for (const Variant& var : variants) {
        const int f32 = var.f32;
        if (f32 && n > 32768) continue;
        if (var.chunk && window) continue;
        msa::cuda::SparseFwdOptions opt;
        opt.partial_f32 = f32 != 0;
        opt.local_pass = !no_local;
        opt.chunk_queries = var.chunk;
        opt.pass_queries = var.pass;
        opt.band_queries = var.band;
        void* ext_ws = nullptr;
        if (var.ext) {
          opt.workspace_bytes = msa::cuda::sparse_fwd_workspace_bytes(a, opt);
          ok(cudaMalloc(&ext_ws, opt.workspace_bytes), "malloc workspace");
          opt.workspace = ext_ws;
        }
        opt.after_schedule = ev[1];
        opt.after_phase1 = ev[2];
        auto call = [&] {
          if (f32 || var.chunk || var.pass || var.ext || var.band || no_local)
            msa::cuda::run_sparse_attention_forward(a, stream, opt);
          else
            msa::sparse_attention_forward(a, ex);  // the public path (its validation included)
        };
        for (int w = 0; w < 2; ++w) call();
        ok(cudaStreamSynchronize(stream), "warm-up");
        std::vector<float> tot, sch, ph1, comb;
        for (int it = 0; it < iters; ++it) {
          ok(cudaEventRecord(ev[0], stream), "record");
          msa::cuda::run_sparse_attention_forward(a, stream, opt);
          ok(cudaEventRecord(ev[3], stream), "record");
          ok(cudaEventSynchronize(ev[3]), "sync");
          float t0 = 0, t1 = 0, t2 = 0, t3 = 0;
          ok(cudaEventElapsedTime(&t0, ev[0], ev[3]), "elapsed");
          ok(cudaEventElapsedTime(&t1, ev[0], ev[1]), "elapsed");
          ok(cudaEventElapsedTime(&t2, ev[1], ev[2]), "elapsed");
          ok(cudaEventElapsedTime(&t3, ev[2], ev[3]), "elapsed");
          tot.push_back(t0);
          sch.push_back(t1);
          ph1.push_back(t2);
          comb.push_back(t3);
        }
        // The public call once more for the spot check (same inputs, deterministic).
        call();
        ok(cudaStreamSynchronize(stream), "call");
        double o_ratio = 0, lse_err = 0;
        spot_check(a, n, hk, hv, &o_ratio, &lse_err);
        const double ms = median(tot);
        const double pbytes = f32 ? 4.0 : 2.0;
        const double bytes = entries * double(g) * (2.0 * d + 2 * (pbytes * d + 4)) + double(n) * h_q * d * 2;
        char label[48];
        if (ext_ws) cudaFree(ext_ws);
        if (var.band)
          std::snprintf(label, sizeof label, "p%lld/b%lld", (long long)var.pass, (long long)var.band);
        else if (var.pass)
          std::snprintf(label, sizeof label, "pass%lld%s", (long long)var.pass, var.ext ? "/m" : "");
        else
          std::snprintf(label, sizeof label, "%s/%lld", f32 ? "f32" : "bf16", (long long)(var.chunk ? var.chunk : 4096));
        std::printf("%-7lld %-7s %-10s %9.3f %9.3f %9.3f %9.3f %9.1f %8.0f %8.0f %10.3f %9.2e\n", (long long)n,
                    window ? "window" : "random", label, ms, median(sch), median(ph1), median(comb),
                    flops / (ms * 1e-3) / 1e12, bytes / (ms * 1e-3) / 1e9, double(tokens) / double(n * h_kv), o_ratio,
                    lse_err);
        std::fflush(stdout);
      }
    }
    cudaFree(q);
    cudaFree(k);
    cudaFree(v);
    cudaFree(o);
    cudaFree(lse);
    cudaFree(idx);
    cudaFree(attended);
  }
  std::printf(
      "columns: attended = mean |T| per (query, group); o_err/bnd = worst spot-check o error over its bf16 bound "
      "(<= 1 passes); GB/s under the combine design's bytes model above\n");
  return 0;
}
