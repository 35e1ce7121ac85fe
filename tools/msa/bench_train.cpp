// `msa bench train` (CUDA builds only): the Hopper training benchmark of one MSA layer at the M3
// shape through the public API — the index branch forward (index_topk with index_lse), the sparse
// attention forward and backward (atomic and deterministic), the indexer KL backward and loss, the
// whole MSA training step, and the dense warm-up step against our dense forward + backward — over
// several sequence lengths; prints a table and writes JSON + markdown. Method: docs/train_bench.md.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
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

// Device memory kept free beyond the tensors for the stream-ordered workspaces the calls take: the
// largest are the sparse forward's (8.7 GB, one pass of 32768 queries) and the KL backward's (~7 GB
// at 128K, docs/kl_backward.md); the pool keeps each operation's workspace mapped between calls
// (the sparse phase's are trimmed before the dense one).
constexpr double kWorkspaceReserve = 16e9;

// Cheap sanity of the outputs (the tests cover correctness): named values, and what failed.
struct Sanity {
  std::vector<std::pair<std::string, double>> values;
  std::vector<std::string> failures;
  void value(const std::string& name, double x) { values.emplace_back(name, x); }
  void require(bool cond, const std::string& what) {
    if (!cond) failures.push_back(what);
  }
  bool pass() const { return failures.empty(); }
};

// Finite and nonzero counts of a bf16 tensor read as rows of `row` elements.
struct Scan {
  int64_t rows = 0, nonfinite = 0, zero_rows = 0;
  double max_abs = 0;
  double nonzero_frac() const { return rows ? 1.0 - double(zero_rows) / double(rows) : 0; }
};

Scan scan_bf16(const std::vector<uint16_t>& h, int64_t row) {
  Scan s;
  s.rows = int64_t(h.size()) / row;
  int64_t nonfinite = 0, zero_rows = 0;
  double max_abs = 0;
#pragma omp parallel for reduction(+ : nonfinite, zero_rows) reduction(max : max_abs) schedule(static)
  for (int64_t r = 0; r < s.rows; ++r) {
    bool all_zero = true;
    for (int64_t c = 0; c < row; ++c) {
      const float x = bf16_to_float(bf16{h[size_t(r * row + c)]});
      if (!std::isfinite(x)) {
        ++nonfinite;
        continue;
      }
      all_zero &= x == 0.f;
      max_abs = std::max(max_abs, double(std::abs(x)));
    }
    zero_rows += all_zero;
  }
  s.nonfinite = nonfinite;
  s.zero_rows = zero_rows;
  s.max_abs = max_abs;
  return s;
}

std::vector<uint16_t> download_bf16(const void* src, size_t count) {
  std::vector<uint16_t> h(count);
  ok(cudaMemcpy(h.data(), src, count * 2, cudaMemcpyDeviceToHost), "download");
  return h;
}

// Largest |a - b| over the largest |a| (bf16 tensors of equal size).
double max_rel_diff(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  double diff = 0, scale = 0;
  const int64_t count = int64_t(a.size());
#pragma omp parallel for reduction(max : diff, scale) schedule(static)
  for (int64_t e = 0; e < count; ++e) {
    const double x = bf16_to_float(bf16{a[size_t(e)]}), y = bf16_to_float(bf16{b[size_t(e)]});
    diff = std::max(diff, std::abs(x - y));
    scale = std::max(scale, std::abs(x));
  }
  return scale > 0 ? diff / scale : diff;
}

// Records a tensor's scan: every element finite, and at least min_nonzero of its rows nonzero.
void check_scan(Sanity& s, const std::string& name, const Scan& sc, double min_nonzero) {
  s.value(name + "_nonzero_rows", sc.nonzero_frac());
  s.value(name + "_max_abs", sc.max_abs);
  s.require(sc.nonfinite == 0, strf("%s: %lld non-finite elements", name.c_str(), (long long)sc.nonfinite));
  s.require(sc.nonzero_frac() >= min_nonzero,
            strf("%s: %.4f of rows nonzero, expected >= %g", name.c_str(), sc.nonzero_frac(), min_nonzero));
}

// dq rows of three queries (all heads): the last, one in the middle, and one that sees fewer than
// topk blocks. Query 0 is avoided: it attends only itself, so its dq is exactly zero.
std::vector<uint16_t> dq_sample(const void* dq, int64_t n) {
  std::vector<uint16_t> out;
  for (int64_t i : {n - 1, n / 2 + 3, std::min<int64_t>(n - 1, 1000)}) {
    const auto rows = download_bf16(static_cast<const uint16_t*>(dq) + i * kHq * kD, size_t(kHq * kD));
    out.insert(out.end(), rows.begin(), rows.end());
  }
  return out;
}

// What one selection variant measured at one size.
struct SelectionResult {
  std::string name;
  double attended = 0;  // sum over (query, group) of the tokens attended
  double sink_frac = 0, prev_frac = 0;
  Meas index, sparse_fwd, sparse_bwd, sparse_bwd_det, kl_bwd, kl_loss, step;
  double kl_value = NAN;
  Sanity sanity;
};

struct SizeResult {
  int64_t n = 0;
  std::string skipped;  // non-empty: why this size did not run
  double input_gib = 0;
  std::vector<SelectionResult> sel;
  bool dense_ran = false;
  Meas dense_fwd_bwd, dense_bwd, kl_warm_bwd, warm_step;
  double kl_warm_value = NAN;
  Sanity dense_sanity;
};

// FLOP conventions (docs/train_bench.md). n: one causal sequence, position = row.
double causal_pairs(int64_t n) { return double(n) * double(n + 1) / 2; }
double index_flops(int64_t n) { return 2.0 * kHkv * kDidx * causal_pairs(n); }
double dense_fwd_flops(int64_t n) { return 4.0 * kHq * kD * causal_pairs(n); }
double sparse_fwd_flops(double attended) { return 4.0 * kG * kD * attended; }
// The backward recomputes S and P and computes dV, dP, dQ, dK: 2.5x the forward's two products.
double sparse_bwd_flops(double attended) { return 2.5 * sparse_fwd_flops(attended); }
double dense_bwd_flops(int64_t n) { return 2.5 * dense_fwd_flops(n); }
// docs/kl_backward.md: per (query, group, key) the teacher's g heads (2 g d) and k student products
// of 2 d_idx (3 with the index lse given, 4 with its pre-pass).
double kl_flops(double pairs, int products) { return pairs * (2.0 * kG * kD + products * 2.0 * kDidx); }


// The buffers of one size: [n, heads, d] contiguous; k_idx and dk_idx [n, d_idx].
struct Buffers {
  DevMem q, k, v, o, lse, do_, dq, dk, dv, q_idx, k_idx, topk_idx, index_lse, dq_idx, dk_idx;
};

Varlen one_sequence(int64_t n) {
  Varlen s;
  s.n_q = s.n_k = n;
  s.batch = 1;
  return s;
}

// ---- output ----

std::string jmeas(const Meas& m, double flops) {
  if (!m.ran()) return "{\"unavailable\": " + jstr(m.error) + "}";
  return jtiming(m.t, flops);
}

std::string jsanity(const Sanity& s) {
  std::string j = strf("{\"pass\": %s, \"failures\": [", s.pass() ? "true" : "false");
  for (size_t i = 0; i < s.failures.size(); ++i) j += (i ? ", " : "") + jstr(s.failures[i]);
  j += "], \"values\": {";
  for (size_t i = 0; i < s.values.size(); ++i)
    j += (i ? ", " : "") + jstr(s.values[i].first) + ": " + jnum(s.values[i].second, 5);
  return j + "}}";
}

double ratio(double a, double b) { return std::isfinite(a) && std::isfinite(b) && b > 0 ? a / b : NAN; }

std::string to_json(const Context& cx, const std::vector<SizeResult>& sizes) {
  std::string j = "{\n";
  j += jcontext(cx, "msa bench train");
  j += strf(
      "  \"shape\": {\"h_q\": %lld, \"h_kv\": %lld, \"d\": %lld, \"d_idx\": %lld, \"bk\": %lld, \"topk\": %lld, "
      "\"dtype\": \"bf16\", \"batch\": 1, \"causal\": true, \"lambda\": 1},\n",
      (long long)kHq, (long long)kHkv, (long long)kD, (long long)kDidx, (long long)kBk, (long long)kTopk);
  j += strf(
      "  \"timing\": {\"method\": \"CUDA events around each call (or each group of calls: step rows), queued "
      "back to back on one stream; the first call is a warm-up that also sizes the repetitions: up to %d runs "
      "within ~%g s per measurement, median reported; a call longer than that budget is measured once (runs = "
      "1, separate_warmup = false)\", \"iters\": %d, \"budget_s\": %g},\n",
      cx.iters, cx.budget_s, cx.iters, cx.budget_s);
  j += "  \"flop_conventions\": {\"index_topk\": \"exact causal count 2 * h_kv * d_idx * n (n + 1) / 2\", "
       "\"sparse_forward\": \"effective: 4 * g * d * A, A = sum over (query, group) of the visible tokens of the "
       "selected blocks, counted from the selection\", \"sparse_backward\": \"2.5 x sparse_forward\", "
       "\"dense_forward\": \"exact causal count 4 * h_q * d * n (n + 1) / 2\", \"dense_backward\": \"2.5 x "
       "dense_forward\", \"dense_fwd_bwd\": \"3.5 x dense_forward\", \"kl_backward\": \"A * (2 g d + 3 * 2 d_idx) "
       "(teacher heads + 3 student products, index lse given)\", \"kl_warmup_backward\": \"h_kv n (n + 1) / 2 * "
       "(2 g d + 4 * 2 d_idx) (index lse recomputed by a pre-pass)\"},\n";
  j += "  \"steps\": {\"msa_step\": \"index_topk (with index_lse) + sparse_attention_forward + "
       "sparse_attention_backward (default, non-deterministic) + index_kl_backward on the selected support\", "
       "\"warmup_step\": \"dense_attention_forward + dense_attention_backward + index_kl_backward over the full "
       "causal prefix (topk_idx = null, index_lse = null: recomputed)\", \"dense_fwd_bwd\": "
       "\"dense_attention_forward + dense_attention_backward\"},\n";
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
    j += ",\n     \"selections\": [";
    for (size_t k = 0; k < z.sel.size(); ++k) {
      const SelectionResult& s = z.sel[k];
      j += k ? ",\n       {" : "\n       {";
      j += "\"name\": " + jstr(s.name);
      j += strf(", \"attended_tokens_per_query_group\": %s, \"sink_fraction\": %s, \"prev_block_fraction\": %s",
                jnum(s.attended / double(z.n * kHkv), 6).c_str(), jnum(s.sink_frac, 4).c_str(),
                jnum(s.prev_frac, 4).c_str());
      j += ",\n        \"index_topk\": " + jmeas(s.index, index_flops(z.n));
      j += ",\n        \"sparse_forward\": " + jmeas(s.sparse_fwd, sparse_fwd_flops(s.attended));
      j += ",\n        \"sparse_backward\": " + jmeas(s.sparse_bwd, sparse_bwd_flops(s.attended));
      j += ",\n        \"sparse_backward_deterministic\": " + jmeas(s.sparse_bwd_det, sparse_bwd_flops(s.attended));
      j += ",\n        \"kl_backward\": " + jmeas(s.kl_bwd, kl_flops(s.attended, 3));
      j += ",\n        \"kl_loss\": " + jmeas(s.kl_loss, 0) + ", \"kl_value\": " + jnum(s.kl_value, 8);
      j += ",\n        \"msa_step\": " + jmeas(s.step, 0);
      j += strf(",\n        \"kl_bwd_over_sparse_bwd\": %s, \"msa_step_speedup_vs_our_dense_fwd_bwd\": %s",
                jnum(ratio(s.kl_bwd.ms(), s.sparse_bwd.ms()), 4).c_str(),
                jnum(ratio(z.dense_fwd_bwd.ms(), s.step.ms()), 4).c_str());
      j += ",\n        \"sanity\": " + jsanity(s.sanity) + "}";
    }
    j += "]";
    if (z.dense_ran) {
      const double pairs = kHkv * causal_pairs(z.n);
      j += ",\n     \"dense\": {\"fwd_bwd\": " + jmeas(z.dense_fwd_bwd, 3.5 * dense_fwd_flops(z.n));
      j += ",\n       \"backward\": " + jmeas(z.dense_bwd, dense_bwd_flops(z.n));
      j += ",\n       \"kl_warmup_backward\": " + jmeas(z.kl_warm_bwd, kl_flops(pairs, 4));
      j += ", \"kl_warmup_value\": " + jnum(z.kl_warm_value, 8);
      j += ",\n       \"warmup_step\": " + jmeas(z.warm_step, 0);
      j += strf(",\n       \"warmup_step_over_dense_fwd_bwd\": %s",
                jnum(ratio(z.warm_step.ms(), z.dense_fwd_bwd.ms()), 4).c_str());
      j += ",\n       \"sanity\": " + jsanity(z.dense_sanity) + "}";
    }
    j += "}";
  }
  j += "\n  ]\n}\n";
  return j;
}

std::string cell(const Meas& m) { return m.ran() ? fmt_ms(m.t.median_ms) + runs_note(m.t) : "n/a"; }
std::string tf_cell(const Meas& m, double flops) { return m.ran() ? strf("%.0f", tflops(flops, m.t.median_ms)) : "-"; }
std::string x_cell(double r, const char* fmt) { return std::isfinite(r) ? strf(fmt, r) : "-"; }

std::string to_markdown(const Context& cx, const std::vector<SizeResult>& sizes) {
  std::string m = "# msa bench train — " + cx.date + "\n\n";
  m += "- GPU: " + cx.gpu + strf(" (%d SMs, %.1f GiB), CUDA runtime ", cx.sms, cx.mem_gib) + cx.runtime + "\n";
  m += "- Commit: " + cx.commit + " (" + cx.commit_source + "), msa " + version() + "\n";
  m += "- Command: `" + cx.command + "`\n";
  m += strf(
      "- Shape: M3 (h_q = %lld, h_kv = %lld, d = d_idx = %lld, bk = %lld, topk = %lld), bf16, one causal "
      "sequence of n tokens, batch 1, lambda = 1.\n",
      (long long)kHq, (long long)kHkv, (long long)kD, (long long)kBk, (long long)kTopk);
  m += strf(
      "- Timing: CUDA events, one warm-up call, median of up to %d runs within ~%g s per measurement; fewer "
      "runs are marked (runs), * = a single call that was also the first at that size.\n",
      cx.iters, cx.budget_s);
  m += "- MSA step = index_topk (+ index_lse) + sparse fwd + sparse bwd (atomic) + KL bwd (selected support). "
       "Warm-up step = dense fwd + dense bwd + KL bwd over the full prefix. Sparse bwd TFLOP/s: effective, 2.5 x "
       "4 g d x (tokens attended, from the selection); dense fwd+bwd: 3.5 x 2 h_q d n (n + 1).\n\n";
  m += "| n | selection | index_topk ms | sparse fwd ms | sparse bwd ms | eff. TFLOP/s | det. bwd ms | eff. TFLOP/s | "
       "KL bwd ms | KL / sparse bwd | KL loss ms | MSA step ms | dense fwd+bwd ms | step vs dense | sanity |\n";
  m += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
  std::vector<std::string> notes;
  auto note = [&](int64_t n, const std::string& what, const Meas& x) {
    if (!x.ran()) notes.push_back(strf("n = %lld, ", (long long)n) + what + ": " + x.error);
  };
  for (const SizeResult& z : sizes) {
    if (!z.skipped.empty()) {
      m += strf("| %lld | skipped: %s | | | | | | | | | | | | | |\n", (long long)z.n, z.skipped.c_str());
      continue;
    }
    for (const SelectionResult& s : z.sel) {
      m += strf("| %lld | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", (long long)z.n,
                s.name.c_str(), cell(s.index).c_str(), cell(s.sparse_fwd).c_str(), cell(s.sparse_bwd).c_str(),
                tf_cell(s.sparse_bwd, sparse_bwd_flops(s.attended)).c_str(), cell(s.sparse_bwd_det).c_str(),
                tf_cell(s.sparse_bwd_det, sparse_bwd_flops(s.attended)).c_str(), cell(s.kl_bwd).c_str(),
                x_cell(100 * ratio(s.kl_bwd.ms(), s.sparse_bwd.ms()), "%.1f%%").c_str(), cell(s.kl_loss).c_str(),
                cell(s.step).c_str(), cell(z.dense_fwd_bwd).c_str(),
                x_cell(ratio(z.dense_fwd_bwd.ms(), s.step.ms()), "%.2fx").c_str(), s.sanity.pass() ? "pass" : "FAIL");
      const std::string sel = s.name + " selection";
      note(z.n, sel + " index_topk", s.index);
      note(z.n, sel + " sparse forward", s.sparse_fwd);
      note(z.n, sel + " sparse backward", s.sparse_bwd);
      note(z.n, sel + " deterministic sparse backward", s.sparse_bwd_det);
      note(z.n, sel + " KL backward", s.kl_bwd);
      note(z.n, sel + " KL loss", s.kl_loss);
      note(z.n, sel + " MSA step", s.step);
      for (const std::string& f : s.sanity.failures)
        notes.push_back(strf("n = %lld, ", (long long)z.n) + sel + " sanity: " + f);
    }
  }
  m += "\nWarm-up (dense) phase:\n\n";
  m += "| n | dense fwd+bwd ms | TFLOP/s | dense bwd ms | TFLOP/s | KL warm-up bwd ms | KL / dense bwd | warm-up step "
       "ms | warm-up vs dense fwd+bwd | KL value | sanity |\n";
  m += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
  for (const SizeResult& z : sizes) {
    if (!z.skipped.empty() || !z.dense_ran) continue;
    m += strf("| %lld | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", (long long)z.n,
              cell(z.dense_fwd_bwd).c_str(), tf_cell(z.dense_fwd_bwd, 3.5 * dense_fwd_flops(z.n)).c_str(),
              cell(z.dense_bwd).c_str(), tf_cell(z.dense_bwd, dense_bwd_flops(z.n)).c_str(),
              cell(z.kl_warm_bwd).c_str(), x_cell(100 * ratio(z.kl_warm_bwd.ms(), z.dense_bwd.ms()), "%.0f%%").c_str(),
              cell(z.warm_step).c_str(), x_cell(ratio(z.warm_step.ms(), z.dense_fwd_bwd.ms()), "%.2fx").c_str(),
              std::isfinite(z.kl_warm_value) ? strf("%.4g", z.kl_warm_value).c_str() : "-",
              z.dense_sanity.pass() ? "pass" : "FAIL");
    note(z.n, "dense fwd+bwd", z.dense_fwd_bwd);
    note(z.n, "dense bwd", z.dense_bwd);
    note(z.n, "KL warm-up backward", z.kl_warm_bwd);
    note(z.n, "warm-up step", z.warm_step);
    for (const std::string& f : z.dense_sanity.failures)
      notes.push_back(strf("n = %lld, dense sanity: ", (long long)z.n) + f);
  }
  if (!notes.empty()) {
    m += "\nUnavailable rows and sanity failures:\n\n";
    for (const std::string& s : notes) m += "- " + s + "\n";
  }
  return m;
}

// ---- the measurements ----

// dk, dv and a dq sample of a backward just run, scanned; returned for the comparisons.
struct Grads {
  std::vector<uint16_t> dq, dk, dv;
};

Grads grab(const Buffers& B, int64_t n) {
  Grads g;
  g.dq = dq_sample(B.dq.ptr, n);
  g.dk = download_bf16(B.dk.ptr, size_t(n * kHkv * kD));
  g.dv = download_bf16(B.dv.ptr, size_t(n * kHkv * kD));
  return g;
}

void check_grads(Sanity& s, const std::string& tag, const Grads& g) {
  check_scan(s, tag + "dq_sample", scan_bf16(g.dq, kD), 1.0);
  // Keys nobody attends get zeros; here every key is seen at least by the queries of its own block.
  check_scan(s, tag + "dk", scan_bf16(g.dk, kD), 0.5);
  check_scan(s, tag + "dv", scan_bf16(g.dv, kD), 0.5);
}

void check_kl(Sanity& s, const std::string& tag, const Buffers& B, int64_t n) {
  check_scan(s, tag + "dq_idx", scan_bf16(download_bf16(B.dq_idx.ptr, size_t(n * kHkv * kDidx)), kDidx), 0.5);
  check_scan(s, tag + "dk_idx", scan_bf16(download_bf16(B.dk_idx.ptr, size_t(n * kDidx)), kDidx), 0.5);
}

void check_loss(Sanity& s, const std::string& name, double x) {
  s.value(name, x);
  // KL >= 0; float32 logits leave a rounding-sized negative value possible when it is ~0.
  s.require(std::isfinite(x) && x > -1e-4, strf("%s = %g, expected a finite value >= 0", name.c_str(), x));
}

SizeResult bench_size(int64_t n, const BenchTrainOptions& o, cudaStream_t stream, cudaMemPool_t pool) {
  SizeResult z;
  z.n = n;
  const size_t q_bytes = size_t(n * kHq * kD) * 2, kv_bytes = size_t(n * kHkv * kD) * 2;
  const size_t lse_bytes = size_t(n * kHq) * 4, qi_bytes = size_t(n * kHkv * kDidx) * 2,
               ki_bytes = size_t(n * kDidx) * 2;
  const size_t idx_bytes = size_t(n * kHkv * kTopk) * 4, ilse_bytes = size_t(n * kHkv) * 4;
  const double need =
      double(4 * q_bytes + 4 * kv_bytes + lse_bytes + 2 * qi_bytes + 2 * ki_bytes + idx_bytes + ilse_bytes);
  z.input_gib = need / kGiB;
  size_t free_b = 0, total_b = 0;
  ok(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  if (need + kWorkspaceReserve > double(free_b)) {
    z.skipped = strf("needs %.1f GiB of tensors + %.1f GiB of workspaces, %.1f GiB free", need / kGiB,
                     kWorkspaceReserve / kGiB, double(free_b) / kGiB);
    return z;
  }
  Buffers B;
  if (!B.q.alloc(q_bytes) || !B.k.alloc(kv_bytes) || !B.v.alloc(kv_bytes) || !B.o.alloc(q_bytes) ||
      !B.lse.alloc(lse_bytes) || !B.do_.alloc(q_bytes) || !B.dq.alloc(q_bytes) || !B.dk.alloc(kv_bytes) ||
      !B.dv.alloc(kv_bytes) || !B.q_idx.alloc(qi_bytes) || !B.k_idx.alloc(ki_bytes) || !B.topk_idx.alloc(idx_bytes) ||
      !B.index_lse.alloc(ilse_bytes) || !B.dq_idx.alloc(qi_bytes) || !B.dk_idx.alloc(ki_bytes)) {
    z.skipped = strf("cudaMalloc failed for %.1f GiB of tensors", need / kGiB);
    return z;
  }
  const uint64_t seed = o.seed * 1000003ull + uint64_t(n);
  fill_normal_bf16(B.q.ptr, n * kHq * kD, seed + 1, 1.f, stream);
  fill_normal_bf16(B.k.ptr, n * kHkv * kD, seed + 2, 1.f, stream);
  fill_normal_bf16(B.v.ptr, n * kHkv * kD, seed + 3, 1.f, stream);
  fill_normal_bf16(B.do_.ptr, n * kHq * kD, seed + 6, 1.f, stream);
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
  ip.index_lse = B.index_lse.as<float>();  // the KL backward's student normaliser, saved by the forward
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
  AttentionBwdParams dbp;
  static_cast<AttentionParams&>(dbp) = ap;
  dbp.do_ = B.do_.ptr;
  dbp.dq = B.dq.ptr;
  dbp.dk = B.dk.ptr;
  dbp.dv = B.dv.ptr;
  AttentionBwdParams sbp = dbp;
  static_cast<AttentionParams&>(sbp) = sp;
  AttentionBwdParams sbd = sbp;
  sbd.deterministic = true;
  IndexKLParams kp;
  kp.seq = one_sequence(n);
  kp.h_q = kHq;
  kp.h_kv = kHkv;
  kp.d = kD;
  kp.d_idx = kDidx;
  kp.lambda = 1.f;
  kp.dtype = DType::bf16;
  kp.q = B.q.ptr;
  kp.k = B.k.ptr;
  kp.q_idx = B.q_idx.ptr;
  kp.k_idx = B.k_idx.ptr;
  kp.topk_idx = B.topk_idx.as<int32_t>();
  kp.topk = kTopk;
  kp.bk = kBk;
  kp.lse = B.lse.as<float>();
  kp.index_lse = B.index_lse.as<float>();
  kp.dq_idx = B.dq_idx.ptr;
  kp.dk_idx = B.dk_idx.ptr;
  // Warm-up: the full causal prefix; index_topk's index_lse is over the selected support, so the
  // KL recomputes the prefix's; the teacher lse is the dense forward's.
  IndexKLParams kw = kp;
  kw.topk_idx = nullptr;
  kw.topk = 0;
  kw.index_lse = nullptr;
  const double budget_ms = o.budget_s * 1e3;
  auto sync = [&](const char* what) { ok(cudaStreamSynchronize(stream), what); };

  for (const std::string& name : o.selections) {
    SelectionResult s;
    s.name = name;
    fill_normal_bf16(B.q_idx.ptr, n * kHkv * kDidx, seed + 4, 1.f, stream);
    fill_normal_bf16(B.k_idx.ptr, n * kDidx, seed + 5, 1.f, stream);
    if (name == "planted") plant_sink_and_local(B.q_idx.ptr, B.k_idx.ptr, n, kHkv, kDidx, kBk, stream);
    std::printf("  n = %lld, %s selection:", (long long)n, name.c_str());
    s.index = measure(
        "index_topk", [&] { index_topk(ip, ex); }, stream, o.iters, budget_ms);
    if (!s.index.ran()) {  // everything else needs the selection
      std::printf(" stopped: %s\n", s.index.error.c_str());
      z.sel.push_back(std::move(s));
      continue;
    }
    std::vector<int32_t> idx(size_t(n * kHkv * kTopk));
    ok(cudaMemcpy(idx.data(), B.topk_idx.ptr, idx_bytes, cudaMemcpyDeviceToHost), "download");
    const SelectionStats st = selection_stats(idx, n);
    s.attended = st.attended;
    s.sink_frac = st.sink_frac;
    s.prev_frac = st.prev_frac;
    s.sparse_fwd = measure(
        "sparse fwd", [&] { sparse_attention_forward(sp, ex); }, stream, o.iters, budget_ms);
    s.sparse_bwd = measure(
        "sparse bwd", [&] { sparse_attention_backward(sbp, ex); }, stream, o.iters, budget_ms);
    Grads atomic;
    if (s.sparse_fwd.ran() && s.sparse_bwd.ran()) {
      sync("sparse backward");
      atomic = grab(B, n);
      check_grads(s.sanity, "sparse_", atomic);
    }
    s.sparse_bwd_det = measure(
        "deterministic bwd", [&] { sparse_attention_backward(sbd, ex); }, stream, o.iters, budget_ms);
    if (s.sparse_fwd.ran() && s.sparse_bwd_det.ran()) {
      sync("deterministic backward");
      const Grads a = grab(B, n);
      sparse_attention_backward(sbd, ex);
      sync("deterministic backward");
      const Grads b = grab(B, n);
      const bool same = a.dq == b.dq && a.dk == b.dk && a.dv == b.dv;
      s.sanity.value("det_repeat_bitwise", same ? 1 : 0);
      s.sanity.require(same, "deterministic backward: two calls differ bitwise (dq sample, dk or dv)");
      check_grads(s.sanity, "det_", a);
      if (!atomic.dk.empty()) {
        // Different summation orders, then a bf16 store: a few bf16 ulps of the largest element.
        const double rk = max_rel_diff(a.dk, atomic.dk), rv = max_rel_diff(a.dv, atomic.dv);
        const double rq = max_rel_diff(a.dq, atomic.dq);
        s.sanity.value("det_vs_atomic_dk", rk);
        s.sanity.value("det_vs_atomic_dv", rv);
        s.sanity.value("det_vs_atomic_dq_sample", rq);
        s.sanity.require(
            std::max({rk, rv, rq}) <= 1.0 / 16,
            strf("deterministic vs atomic backward differ by %.3g of the largest element", std::max({rk, rv, rq})));
      }
    }
    s.kl_bwd = measure(
        "KL bwd", [&] { index_kl_backward(kp, ex); }, stream, o.iters, budget_ms);
    if (s.sparse_fwd.ran() && s.kl_bwd.ran()) {
      sync("KL backward");
      check_kl(s.sanity, "kl_", B, n);
    }
    s.kl_loss = measure(
        "KL loss", [&] { s.kl_value = index_kl_loss(kp, ex); }, stream, o.iters, budget_ms);
    if (s.sparse_fwd.ran() && s.kl_loss.ran()) check_loss(s.sanity, "kl_value", s.kl_value);
    s.step = measure(
        "MSA step",
        [&] {
          index_topk(ip, ex);
          sparse_attention_forward(sp, ex);
          sparse_attention_backward(sbp, ex);
          index_kl_backward(kp, ex);
        },
        stream, o.iters, budget_ms);
    sync("MSA step");
    std::printf(" done (sanity %s)\n", s.sanity.pass() ? "pass" : "FAIL");
    z.sel.push_back(std::move(s));
  }
  // The sparse phase's workspaces go back before the dense phase takes its own.
  sync("sparse phase");
  ok(cudaMemPoolTrimTo(pool, 0), "cudaMemPoolTrimTo");

  if (!o.dense) return z;
  z.dense_ran = true;
  Sanity& ds = z.dense_sanity;
  std::printf("  n = %lld, warm-up (dense):", (long long)n);
  ok(cudaMemsetAsync(B.o.ptr, 0xff, q_bytes, stream), "cudaMemsetAsync");  // NaN: unwritten rows show
  z.dense_fwd_bwd = measure(
      "dense fwd+bwd",
      [&] {
        dense_attention_forward(ap, ex);
        dense_attention_backward(dbp, ex);
      },
      stream, o.iters, budget_ms);
  z.dense_bwd = measure(
      "dense bwd", [&] { dense_attention_backward(dbp, ex); }, stream, o.iters, budget_ms);
  if (z.dense_fwd_bwd.ran() && z.dense_bwd.ran()) {
    sync("dense backward");
    const Grads g = grab(B, n);
    // Every key is seen by every later query: no zero rows.
    check_scan(ds, "dense_dq_sample", scan_bf16(g.dq, kD), 1.0);
    check_scan(ds, "dense_dk", scan_bf16(g.dk, kD), 0.99);
    check_scan(ds, "dense_dv", scan_bf16(g.dv, kD), 0.99);
  }
  z.kl_warm_bwd = measure(
      "KL warm-up bwd", [&] { index_kl_backward(kw, ex); }, stream, o.iters, budget_ms);
  if (z.dense_fwd_bwd.ran() && z.kl_warm_bwd.ran()) {
    sync("KL warm-up backward");
    check_kl(ds, "kl_warmup_", B, n);
    try {
      z.kl_warm_value = index_kl_loss(kw, ex);
      check_loss(ds, "kl_warmup_value", z.kl_warm_value);
    } catch (const std::exception& e) {
      ds.require(false, "KL warm-up loss: " + first_line(e.what()));
      cudaStreamSynchronize(stream);
      cudaGetLastError();
    }
  }
  z.warm_step = measure(
      "warm-up step",
      [&] {
        dense_attention_forward(ap, ex);
        dense_attention_backward(dbp, ex);
        index_kl_backward(kw, ex);
      },
      stream, o.iters, budget_ms);
  sync("warm-up step");
  std::printf(" done (sanity %s)\n", ds.pass() ? "pass" : "FAIL");
  return z;
}

}  // namespace

int run_bench_train(const BenchTrainOptions& o) {
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

  std::printf("msa bench train on %s (%d SMs), commit %s\n", cx.gpu.c_str(), cx.sms, cx.commit.c_str());
  std::vector<SizeResult> sizes;
  bool all_pass = true;
  for (int64_t n : o.ns) {
    sizes.push_back(bench_size(n, o, stream, pool));
    const SizeResult& z = sizes.back();
    if (!z.skipped.empty()) std::printf("  n = %lld skipped: %s\n", (long long)n, z.skipped.c_str());
    for (const SelectionResult& s : z.sel) all_pass &= s.sanity.pass();
    all_pass &= z.dense_sanity.pass();
    cudaMemPoolTrimTo(pool, 0);  // the next size allocates its tensors with cudaMalloc
    if (!o.out.empty()) {        // results so far survive a failure at a larger size
      write_file(o.out + ".json", to_json(cx, sizes));
      write_file(o.out + ".md", to_markdown(cx, sizes));
    }
  }
  ok(cudaStreamDestroy(stream), "cudaStreamDestroy");
  std::printf("\n%s", to_markdown(cx, sizes).c_str());
  if (!o.out.empty()) std::printf("\nwrote %s.json and %s.md\n", o.out.c_str(), o.out.c_str());
  if (!all_pass) {
    std::fprintf(stderr, "msa bench: a sanity check failed (see the sanity column)\n");
    return 1;
  }
  return 0;
}

}  // namespace msa::cli
