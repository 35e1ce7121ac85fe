// `msa bench prefill` (CUDA builds only): the Hopper prefill benchmark of one MSA layer at the M3
// shape through the public API — index_topk, sparse_attention_forward, the two back to back, and
// dense_attention_forward — over several sequence lengths, plus the standalone block_topk; prints
// a table and writes JSON + markdown. Method and conventions: docs/prefill_bench.md.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_common.h"
#include "bench_fill.h"
#include "cli.h"
#include "msa/msa.h"

#ifndef MSA_CLI_COMMIT
#define MSA_CLI_COMMIT "unknown"
#endif

namespace msa::cli {
namespace {

// Device memory kept free beyond the tensors: the sparse forward's workspace (one pass of 32768
// queries at this shape, 8.7 GB, docs/sparse_attention.md) plus slack for CUB and the allocator.
constexpr double kWorkspaceReserve = 10e9;

double bf16_bits_to_double(uint16_t bits) { return double(bf16_to_float(bf16{bits})); }

// Worst error of a spot check, as a fraction of its bound (<= 1 passes).
struct Check {
  double o_worst = 0, lse_worst = 0;
  int64_t rows = 0;
  bool pass() const { return rows > 0 && o_worst <= 1.0 && lse_worst <= 1.0; }
};

// Float64 attention of one query row q (d values) over keys/values given row by row (one kv head),
// folded into the check: o error against |o - ref| <= u |ref| + (2u + 1e-4) o_abs + 1e-6 with
// u = 2^-8 (bf16 store, P rounded to bf16 for P V, bf16 partials; o_abs = the same attention of
// |v|), lse against 1e-4 + 1e-6 |ref| (float32 throughout).
struct RowRef {
  std::vector<double> o, o_abs;
  double lse = -INFINITY;
};

RowRef attend(const std::vector<double>& q, const std::vector<const uint16_t*>& krows,
              const std::vector<const uint16_t*>& vrows) {
  const double scale = 1.0 / std::sqrt(double(kD));
  const int64_t n = int64_t(krows.size());
  std::vector<double> s(n);
  double m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    double dot = 0;
    for (int64_t c = 0; c < kD; ++c) dot += q[c] * bf16_bits_to_double(krows[j][c]);
    s[j] = dot * scale;
    m = std::max(m, s[j]);
  }
  RowRef r;
  r.o.assign(kD, 0.0);
  r.o_abs.assign(kD, 0.0);
  if (n == 0) return r;
  double l = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double p = std::exp(s[j] - m);
    l += p;
    for (int64_t c = 0; c < kD; ++c) {
      const double v = bf16_bits_to_double(vrows[j][c]);
      r.o[c] += p * v;
      r.o_abs[c] += p * std::abs(v);
    }
  }
  for (int64_t c = 0; c < kD; ++c) {
    r.o[c] /= l;
    r.o_abs[c] /= l;
  }
  r.lse = m + std::log(l);
  return r;
}

void fold(Check& ck, const RowRef& ref, const uint16_t* o_got, float lse_got) {
  const double u = 1.0 / 256;
  for (int64_t c = 0; c < kD; ++c) {
    const double got = bf16_bits_to_double(o_got[c]);
    const double bound = u * std::abs(ref.o[c]) + (2 * u + 1e-4) * ref.o_abs[c] + 1e-6;
    const double err = std::isfinite(got) ? std::abs(got - ref.o[c]) / bound : INFINITY;
    ck.o_worst = std::max(ck.o_worst, err);
  }
  const double lerr = std::isfinite(lse_got) ? std::abs(double(lse_got) - ref.lse) / (1e-4 + 1e-6 * std::abs(ref.lse))
                                             : INFINITY;
  ck.lse_worst = std::max(ck.lse_worst, lerr);
  ++ck.rows;
}

std::vector<uint16_t> download_bf16(const void* src, size_t count) {
  std::vector<uint16_t> h(count);
  ok(cudaMemcpy(h.data(), src, count * 2, cudaMemcpyDeviceToHost), "download");
  return h;
}

// What one selection variant measured at one size.
struct SelectionResult {
  std::string name;
  Timing index, sparse, layer;
  double attended = 0;  // sum over (query, group) of the tokens attended
  double sink_frac = 0, local_frac = 0;
  Check check;
};

struct SizeResult {
  int64_t n = 0;
  std::string skipped;  // non-empty: why this size did not run
  double input_gib = 0;
  std::vector<SelectionResult> sel;
  Timing dense;
  Check dense_check;
  std::string layer_path, layer_why;
  double layer_ms = 0;
};

struct TopkResult {
  bool ran = false;
  Timing t;
  double gbps = 0;
};

// The exact FLOP counts of one causal sequence of n tokens (position = row).
double index_flops(int64_t n) { return 2.0 * kHkv * kDidx * (double(n) * (n + 1) / 2); }
double dense_flops(int64_t n) { return 4.0 * kHq * kD * (double(n) * (n + 1) / 2); }
double sparse_flops(double attended) { return 4.0 * kG * kD * attended; }


// The buffers of one size. q/k/v/o are [n, heads, d] contiguous; k_idx [n, d_idx].
struct Buffers {
  DevMem q, k, v, o, lse, q_idx, k_idx, topk_idx;
};

Varlen one_sequence(int64_t n) {
  Varlen s;
  s.n_q = s.n_k = n;
  s.batch = 1;
  return s;
}

// Spot checks of the sparse forward against float64 on the host: all heads of a few queries (the
// last one, one in the middle, and one that sees fewer than topk blocks), over their selections.
Check check_sparse(const Buffers& B, int64_t n, const std::vector<int32_t>& idx) {
  Check ck;
  std::map<int64_t, std::vector<uint16_t>> kblk, vblk;  // block -> rows [bk, h_kv, d]
  auto block = [&](std::map<int64_t, std::vector<uint16_t>>& cache, const DevMem& src, int64_t b) -> const uint16_t* {
    auto it = cache.find(b);
    if (it == cache.end()) {
      const int64_t rows = std::min(kBk, n - b * kBk);
      it = cache.emplace(b, download_bf16(src.as<uint16_t>() + b * kBk * kHkv * kD, size_t(rows * kHkv * kD))).first;
    }
    return it->second.data();
  };
  for (int64_t i : {n - 1, n / 2 + 3, std::min<int64_t>(n - 1, 1000)}) {
    const std::vector<uint16_t> q = download_bf16(B.q.as<uint16_t>() + i * kHq * kD, size_t(kHq * kD));
    const std::vector<uint16_t> o = download_bf16(B.o.as<uint16_t>() + i * kHq * kD, size_t(kHq * kD));
    std::vector<float> lse(kHq);
    ok(cudaMemcpy(lse.data(), B.lse.as<float>() + i * kHq, kHq * 4, cudaMemcpyDeviceToHost), "download");
    for (int64_t r = 0; r < kHkv; ++r) {
      std::vector<const uint16_t*> krows, vrows;
      for (int64_t t = 0; t < kTopk; ++t) {
        const int64_t b = idx[(i * kHkv + r) * kTopk + t];
        if (b < 0 || b > i / kBk) continue;
        const uint16_t* kb = block(kblk, B.k, b);
        const uint16_t* vb = block(vblk, B.v, b);
        for (int64_t j = b * kBk; j <= std::min(i, b * kBk + kBk - 1); ++j) {
          krows.push_back(kb + ((j - b * kBk) * kHkv + r) * kD);
          vrows.push_back(vb + ((j - b * kBk) * kHkv + r) * kD);
        }
      }
      for (int64_t h = r * kG; h < (r + 1) * kG; ++h) {
        std::vector<double> qh(kD);
        for (int64_t c = 0; c < kD; ++c) qh[c] = bf16_bits_to_double(q[h * kD + c]);
        fold(ck, attend(qh, krows, vrows), o.data() + h * kD, lse[h]);
      }
    }
  }
  return ck;
}

// Spot check of the dense forward: the last query (it sees every key), the heads of kv group 0.
Check check_dense(const Buffers& B, int64_t n) {
  Check ck;
  std::vector<uint16_t> k(size_t(n * kD)), v(size_t(n * kD));
  ok(cudaMemcpy2D(k.data(), kD * 2, B.k.ptr, kHkv * kD * 2, kD * 2, size_t(n), cudaMemcpyDeviceToHost), "download");
  ok(cudaMemcpy2D(v.data(), kD * 2, B.v.ptr, kHkv * kD * 2, kD * 2, size_t(n), cudaMemcpyDeviceToHost), "download");
  const int64_t i = n - 1;
  const std::vector<uint16_t> q = download_bf16(B.q.as<uint16_t>() + i * kHq * kD, size_t(kG * kD));
  const std::vector<uint16_t> o = download_bf16(B.o.as<uint16_t>() + i * kHq * kD, size_t(kG * kD));
  std::vector<float> lse(kG);
  ok(cudaMemcpy(lse.data(), B.lse.as<float>() + i * kHq, kG * 4, cudaMemcpyDeviceToHost), "download");
  const double scale = 1.0 / std::sqrt(double(kD));
  // Scores of all heads first (parallel over keys), then the softmax sums per head.
  std::vector<double> s(size_t(kG * n));
  std::vector<double> qd(kG * kD);
  for (int64_t e = 0; e < kG * kD; ++e) qd[e] = bf16_bits_to_double(q[e]);
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    double kj[kD];
    for (int64_t c = 0; c < kD; ++c) kj[c] = bf16_bits_to_double(k[j * kD + c]);
    for (int64_t h = 0; h < kG; ++h) {
      double dot = 0;
      for (int64_t c = 0; c < kD; ++c) dot += qd[h * kD + c] * kj[c];
      s[h * n + j] = dot * scale;
    }
  }
  for (int64_t h = 0; h < kG; ++h) {
    const double* sh = s.data() + h * n;
    double m = -INFINITY;
    for (int64_t j = 0; j < n; ++j) m = std::max(m, sh[j]);
    RowRef ref;
    ref.o.assign(kD, 0.0);
    ref.o_abs.assign(kD, 0.0);
    double l = 0;
#pragma omp parallel
    {
      std::vector<double> o_t(kD, 0.0), a_t(kD, 0.0);
      double l_t = 0;
#pragma omp for schedule(static) nowait
      for (int64_t j = 0; j < n; ++j) {
        const double p = std::exp(sh[j] - m);
        l_t += p;
        for (int64_t c = 0; c < kD; ++c) {
          const double x = bf16_bits_to_double(v[j * kD + c]);
          o_t[c] += p * x;
          a_t[c] += p * std::abs(x);
        }
      }
#pragma omp critical
      {
        l += l_t;
        for (int64_t c = 0; c < kD; ++c) {
          ref.o[c] += o_t[c];
          ref.o_abs[c] += a_t[c];
        }
      }
    }
    for (int64_t c = 0; c < kD; ++c) {
      ref.o[c] /= l;
      ref.o_abs[c] /= l;
    }
    ref.lse = m + std::log(l);
    fold(ck, ref, o.data() + h * kD, lse[h]);
  }
  return ck;
}

// ---- output ----

std::string jcheck(const Check& c) {
  return strf("{\"rows\": %lld, \"o_worst_over_bound\": %s, \"lse_worst_over_bound\": %s, \"pass\": %s}",
              (long long)c.rows, jnum(c.o_worst, 4).c_str(), jnum(c.lse_worst, 4).c_str(), c.pass() ? "true" : "false");
}

std::string to_json(const Context& cx, const TopkResult& tk, const std::vector<SizeResult>& sizes) {
  std::string j = "{\n";
  j += jcontext(cx, "msa bench prefill");
  j += strf("  \"shape\": {\"h_q\": %lld, \"h_kv\": %lld, \"d\": %lld, \"d_idx\": %lld, \"bk\": %lld, \"topk\": %lld, "
            "\"dtype\": \"bf16\", \"batch\": 1, \"causal\": true},\n",
            (long long)kHq, (long long)kHkv, (long long)kD, (long long)kDidx, (long long)kBk, (long long)kTopk);
  j += strf("  \"timing\": {\"method\": \"CUDA events around each call, queued back to back on one stream; the first "
            "call is a warm-up that also sizes the repetitions: up to %d runs within ~%g s per measurement, median "
            "reported; a call longer than that budget is measured once (runs = 1, separate_warmup = false)\", "
            "\"iters\": %d, \"budget_s\": %g},\n",
            cx.iters, cx.budget_s, cx.iters, cx.budget_s);
  j += "  \"flop_conventions\": {\"index_topk\": \"exact causal count 2 * h_kv * d_idx * n (n + 1) / 2 = 512 n (n + "
       "1)\", \"sparse\": \"effective: 4 * g * d * sum over (query, group) of the visible tokens of the selected "
       "blocks, counted from the selection\", \"dense\": \"exact causal count 4 * h_q * d * n (n + 1) / 2\"},\n";
  j += "  \"layer_rule\": \"msa::prefer_dense(n, bk, topk) (every query sees <= topk blocks: dense is the same "
       "function) picks dense; otherwise the MSA layer (index_topk + sparse forward) unless our dense forward was "
       "measured faster at this size, which changes the math (all keys instead of the selected blocks) and is "
       "reported as such\",\n";
  if (tk.ran)
    j += strf("  \"block_topk\": {\"rows\": 131072, \"n_blocks\": 1024, \"topk\": 16, \"dtype\": \"f32\", "
              "\"force_last\": false, \"timing\": %s, \"gbps\": %s},\n",
              jtiming(tk.t, 0).c_str(), jnum(tk.gbps, 5).c_str());
  j += "  \"sizes\": [";
  for (size_t si = 0; si < sizes.size(); ++si) {
    const SizeResult& z = sizes[si];
    j += si ? ",\n    {" : "\n    {";
    j += strf("\"n\": %lld", (long long)z.n);
    if (!z.skipped.empty()) {
      j += ", \"skipped\": " + jstr(z.skipped) + "}";
      continue;
    }
    j += strf(", \"input_gib\": %s", jnum(z.input_gib, 4).c_str());
    j += ",\n     \"dense\": {\"timing\": " + jtiming(z.dense, dense_flops(z.n)) + ", \"check\": " + jcheck(z.dense_check) + "}";
    j += ",\n     \"selections\": [";
    for (size_t k = 0; k < z.sel.size(); ++k) {
      const SelectionResult& s = z.sel[k];
      j += k ? ",\n       {" : "\n       {";
      j += "\"name\": " + jstr(s.name);
      j += ",\n        \"index_topk\": " + jtiming(s.index, index_flops(z.n));
      j += ",\n        \"sparse_forward\": " + jtiming(s.sparse, sparse_flops(s.attended));
      j += ",\n        \"layer\": " + jtiming(s.layer, 0);
      j += strf(",\n        \"attended_tokens_per_query_group\": %s, \"sink_fraction\": %s, \"prev_block_fraction\": %s",
                jnum(s.attended / double(z.n * kHkv), 6).c_str(), jnum(s.sink_frac, 4).c_str(),
                jnum(s.local_frac, 4).c_str());
      j += ",\n        \"check\": " + jcheck(s.check) + "}";
    }
    j += "]";
    j += ",\n     \"layer_path\": " + jstr(z.layer_path) + ", \"layer_why\": " + jstr(z.layer_why);
    j += strf(", \"layer_ms\": %s, \"msa_layer_speedup_vs_our_dense\": %s}", jnum(z.layer_ms).c_str(),
              jnum(z.sel.empty() ? 0 : z.dense.median_ms / z.sel[0].layer.median_ms, 4).c_str());
  }
  j += "\n  ]\n}\n";
  return j;
}

std::string to_markdown(const Context& cx, const TopkResult& tk, const std::vector<SizeResult>& sizes) {
  std::string m = "# msa bench prefill — " + cx.date + "\n\n";
  m += "- GPU: " + cx.gpu + strf(" (%d SMs, %.1f GiB), CUDA runtime ", cx.sms, cx.mem_gib) + cx.runtime + "\n";
  m += "- Commit: " + cx.commit + " (" + cx.commit_source + "), msa " + version() + "\n";
  m += "- Command: `" + cx.command + "`\n";
  m += strf("- Shape: M3 (h_q = %lld, h_kv = %lld, d = d_idx = %lld, bk = %lld, topk = %lld), bf16, one causal "
            "sequence of n tokens, batch 1.\n",
            (long long)kHq, (long long)kHkv, (long long)kD, (long long)kBk, (long long)kTopk);
  m += strf("- Timing: CUDA events, one warm-up call, median of up to %d runs within ~%g s per measurement; fewer "
            "runs are marked (runs), * = a single call that was also the first at that size.\n",
            cx.iters, cx.budget_s);
  m += "- FLOPs: index_topk exact causal 512 n (n + 1); sparse effective 4 g d sum |T(i, r)| from the selection; dense "
       "exact causal 2 h_q d n (n + 1).\n";
  m += "- Selections: `random` = Gaussian index q/k (near-random blocks), `planted` = sink + local bias in the index "
       "q/k (tools/msa/bench_fill.h).\n\n";
  m += "| n | selection | index_topk ms | TFLOP/s | sparse fwd ms | eff. TFLOP/s | MSA layer ms | dense ms | dense "
       "TFLOP/s | layer path | MSA vs dense | checks |\n";
  m += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
  for (const SizeResult& z : sizes) {
    if (!z.skipped.empty()) {
      m += strf("| %lld | skipped: %s | | | | | | | | | | |\n", (long long)z.n, z.skipped.c_str());
      continue;
    }
    for (const SelectionResult& s : z.sel) {
      const bool ok_checks = s.check.pass() && z.dense_check.pass();
      m += strf("| %lld | %s | %s%s | %.0f | %s%s | %.0f | %s%s | %s%s | %.0f | %s | %.2fx | %s |\n", (long long)z.n,
                s.name.c_str(), fmt_ms(s.index.median_ms).c_str(), runs_note(s.index).c_str(),
                tflops(index_flops(z.n), s.index.median_ms), fmt_ms(s.sparse.median_ms).c_str(),
                runs_note(s.sparse).c_str(), tflops(sparse_flops(s.attended), s.sparse.median_ms),
                fmt_ms(s.layer.median_ms).c_str(), runs_note(s.layer).c_str(), fmt_ms(z.dense.median_ms).c_str(),
                runs_note(z.dense).c_str(), tflops(dense_flops(z.n), z.dense.median_ms), z.layer_path.c_str(),
                z.dense.median_ms / s.layer.median_ms, ok_checks ? "pass" : "FAIL");
    }
  }
  if (tk.ran)
    m += strf("\nblock_topk [131072 x 1024] fp32, k = 16, force_last off: %.4f ms median of %d (%.0f GB/s effective).\n",
              tk.t.median_ms, tk.t.runs, tk.gbps);
  return m;
}

// ---- the measurements ----

TopkResult bench_block_topk(cudaStream_t stream, int iters, double budget_ms) {
  TopkResult r;
  const int64_t rows = 131072, n_blocks = 1024;
  const size_t bytes = size_t(rows * n_blocks) * 4;
  DevMem s0, s1, out;
  if (!s0.alloc(bytes) || !s1.alloc(bytes) || !out.alloc(size_t(rows * kTopk) * 4)) return r;
  fill_normal_f32(s0.as<float>(), rows * n_blocks, 0xb10c0, 1.f, stream);
  fill_normal_f32(s1.as<float>(), rows * n_blocks, 0xb10c1, 1.f, stream);
  ok(cudaStreamSynchronize(stream), "fill");
  // Two 512 MiB input sets in turn, so that no call starts with its input in L2 (50 MB).
  int turn = 0;
  Exec ex;
  ex.backend = Backend::cuda;
  ex.stream = stream;
  r.t = time_calls(
      [&] {
        BlockTopkParams p;
        p.rows = rows;
        p.n_blocks = n_blocks;
        p.topk = kTopk;
        p.force_last = false;
        p.scores = (turn++ % 2) ? s1.as<float>() : s0.as<float>();
        p.topk_idx = out.as<int32_t>();
        block_topk(p, ex);
      },
      stream, std::max(iters, 20), budget_ms);
  r.gbps = (double(bytes) + double(rows * kTopk) * 4) / (r.t.median_ms * 1e-3) / 1e9;
  r.ran = true;
  return r;
}

SizeResult bench_size(int64_t n, const BenchOptions& o, cudaStream_t stream) {
  SizeResult z;
  z.n = n;
  const size_t q_bytes = size_t(n * kHq * kD) * 2, kv_bytes = size_t(n * kHkv * kD) * 2;
  const size_t lse_bytes = size_t(n * kHq) * 4, qi_bytes = size_t(n * kHkv * kDidx) * 2, ki_bytes = size_t(n * kDidx) * 2;
  const size_t idx_bytes = size_t(n * kHkv * kTopk) * 4;
  const double need = double(2 * q_bytes + 2 * kv_bytes + lse_bytes + qi_bytes + ki_bytes + idx_bytes);
  z.input_gib = need / kGiB;
  size_t free_b = 0, total_b = 0;
  ok(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  if (need + kWorkspaceReserve > double(free_b)) {
    z.skipped = strf("needs %.1f GiB of tensors + %.1f GiB sparse workspace, %.1f GiB free", need / kGiB,
                     kWorkspaceReserve / kGiB, double(free_b) / kGiB);
    return z;
  }
  Buffers B;
  if (!B.q.alloc(q_bytes) || !B.k.alloc(kv_bytes) || !B.v.alloc(kv_bytes) || !B.o.alloc(q_bytes) ||
      !B.lse.alloc(lse_bytes) || !B.q_idx.alloc(qi_bytes) || !B.k_idx.alloc(ki_bytes) || !B.topk_idx.alloc(idx_bytes)) {
    z.skipped = strf("cudaMalloc failed for %.1f GiB of tensors", need / kGiB);
    return z;
  }
  const uint64_t seed = o.seed * 1000003ull + uint64_t(n);
  fill_normal_bf16(B.q.ptr, n * kHq * kD, seed + 1, 1.f, stream);
  fill_normal_bf16(B.k.ptr, n * kHkv * kD, seed + 2, 1.f, stream);
  fill_normal_bf16(B.v.ptr, n * kHkv * kD, seed + 3, 1.f, stream);
  ok(cudaStreamSynchronize(stream), "fill");

  Exec ex;
  ex.backend = Backend::cuda;
  ex.stream = stream;
  IndexTopkParams ip;
  ip.seq = one_sequence(n);
  ip.h_kv = kHkv;
  ip.d_idx = kDidx;
  ip.bk = kBk;
  ip.topk = kTopk;
  ip.dtype = DType::bf16;
  ip.q_idx = B.q_idx.ptr;
  ip.k_idx = B.k_idx.ptr;
  ip.topk_idx = B.topk_idx.as<int32_t>();
  AttentionParams ap;
  ap.seq = one_sequence(n);
  ap.h_q = kHq;
  ap.h_kv = kHkv;
  ap.d = kD;
  ap.dtype = DType::bf16;
  ap.q = B.q.ptr;
  ap.k = B.k.ptr;
  ap.v = B.v.ptr;
  ap.o = B.o.ptr;
  ap.lse = B.lse.as<float>();
  AttentionParams sp = ap;
  sp.topk_idx = B.topk_idx.as<int32_t>();
  sp.topk = kTopk;
  sp.bk = kBk;
  const double budget_ms = o.budget_s * 1e3;

  for (const std::string& name : o.selections) {
    SelectionResult s;
    s.name = name;
    fill_normal_bf16(B.q_idx.ptr, n * kHkv * kDidx, seed + 4, 1.f, stream);
    fill_normal_bf16(B.k_idx.ptr, n * kDidx, seed + 5, 1.f, stream);
    if (name == "planted") plant_sink_and_local(B.q_idx.ptr, B.k_idx.ptr, n, kHkv, kDidx, kBk, stream);
    std::printf("  n = %lld, %s selection: index_topk", (long long)n, name.c_str());
    std::fflush(stdout);
    s.index = time_calls([&] { index_topk(ip, ex); }, stream, o.iters, budget_ms);
    std::vector<int32_t> idx(size_t(n * kHkv * kTopk));
    ok(cudaMemcpy(idx.data(), B.topk_idx.ptr, idx_bytes, cudaMemcpyDeviceToHost), "download");
    const SelectionStats st = selection_stats(idx, n);
    s.attended = st.attended;
    s.sink_frac = st.sink_frac;
    s.local_frac = st.prev_frac;
    std::printf(", sparse forward");
    std::fflush(stdout);
    s.sparse = time_calls([&] { sparse_attention_forward(sp, ex); }, stream, o.iters, budget_ms);
    std::printf(", layer");
    std::fflush(stdout);
    s.layer = time_calls(
        [&] {
          index_topk(ip, ex);
          sparse_attention_forward(sp, ex);
        },
        stream, o.iters, budget_ms);
    ok(cudaStreamSynchronize(stream), "layer");
    s.check = check_sparse(B, n, idx);
    std::printf(" done (check %s)\n", s.check.pass() ? "pass" : "FAIL");
    z.sel.push_back(std::move(s));
  }

  std::printf("  n = %lld: dense forward", (long long)n);
  std::fflush(stdout);
  ok(cudaMemsetAsync(B.o.ptr, 0xff, q_bytes, stream), "cudaMemsetAsync");  // NaN: the check sees unwritten rows
  z.dense = time_calls([&] { dense_attention_forward(ap, ex); }, stream, o.iters, budget_ms);
  z.dense_check = check_dense(B, n);
  std::printf(" done (check %s)\n", z.dense_check.pass() ? "pass" : "FAIL");

  // The layer's path (docs/prefill_bench.md): the library's exact rule first, then speed.
  const double msa_ms = z.sel.empty() ? INFINITY : z.sel[0].layer.median_ms;
  if (prefer_dense(n, kBk, kTopk)) {
    z.layer_path = "dense";
    z.layer_why = "msa::prefer_dense: every query sees <= topk blocks";
    z.layer_ms = z.dense.median_ms;
  } else if (z.dense.median_ms < msa_ms) {
    z.layer_path = "dense";
    z.layer_why = "our dense forward measured faster (changes the math: all keys)";
    z.layer_ms = z.dense.median_ms;
  } else {
    z.layer_path = "msa";
    z.layer_why = "index_topk + sparse forward faster than dense";
    z.layer_ms = msa_ms;
  }
  return z;
}

}  // namespace

int run_bench_prefill(const BenchOptions& o) {
  if (cuda_device_count() == 0) {
    std::fprintf(stderr, "msa bench: no CUDA device is visible\n");
    return 2;
  }
  if (check_selections(o.selections) != 0) return 2;
  int dev = 0;
  const Context cx = bench_context(o.commit, MSA_CLI_COMMIT, o.command, o.iters, o.budget_s, &dev);
  cudaMemPool_t pool = keep_pool_mapped(dev);
  cudaStream_t stream;
  ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");

  std::printf("msa bench prefill on %s (%d SMs), commit %s\n", cx.gpu.c_str(), cx.sms, cx.commit.c_str());
  TopkResult tk;
  std::vector<SizeResult> sizes;
  auto save = [&] {
    if (o.out.empty()) return;
    write_file(o.out + ".json", to_json(cx, tk, sizes));
    write_file(o.out + ".md", to_markdown(cx, tk, sizes));
  };
  if (o.block_topk) {
    std::printf("  block_topk [131072 x 1024] fp32 k=16");
    std::fflush(stdout);
    tk = bench_block_topk(stream, o.iters, o.budget_s * 1e3);
    std::printf(tk.ran ? ": %.4f ms\n" : ": skipped (allocation failed)\n", tk.t.median_ms);
  }
  bool all_pass = true;
  for (int64_t n : o.ns) {
    sizes.push_back(bench_size(n, o, stream));
    const SizeResult& z = sizes.back();
    if (!z.skipped.empty()) std::printf("  n = %lld skipped: %s\n", (long long)n, z.skipped.c_str());
    for (const SelectionResult& s : z.sel) all_pass &= s.check.pass();
    if (z.skipped.empty()) all_pass &= z.dense_check.pass();
    cudaMemPoolTrimTo(pool, 0);  // the next size allocates its tensors with cudaMalloc
    save();                      // results so far survive a failure at a larger size
  }
  ok(cudaStreamDestroy(stream), "cudaStreamDestroy");
  std::printf("\n%s", to_markdown(cx, tk, sizes).c_str());
  if (!o.out.empty()) std::printf("\nwrote %s.json and %s.md\n", o.out.c_str(), o.out.c_str());
  if (!all_pass) {
    std::fprintf(stderr, "msa bench: a spot check against float64 failed (see the checks column)\n");
    return 1;
  }
  return 0;
}

}  // namespace msa::cli
