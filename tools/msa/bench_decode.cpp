// `msa bench decode` (CUDA builds only): one MSA layer's decode step at the M3 shape over a paged
// cache — the index pass (decode_index_topk) and the sparse decode attention — against dense decode
// over the same cache (decode_attention with every visible block), for several context lengths,
// batch sizes and query tokens per request; prints a table and writes JSON + markdown.
// Method: docs/decode_bench.md.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <numeric>
#include <random>
#include <set>
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

// Bytes of one cached token: K and V of every KV head, and the shared index key (bf16, or e4m3
// bytes plus a float32 scale).
constexpr double kKvBytesPerToken = 2.0 * kHkv * kD * 2;
double idx_bytes_per_token(IndexKeyFormat f) { return f == IndexKeyFormat::fp8_e4m3 ? kDidx + 4.0 : kDidx * 2.0; }
const char* fmt_name(IndexKeyFormat f) { return f == IndexKeyFormat::fp8_e4m3 ? "fp8" : "bf16"; }
// Device memory left free beyond the cache and the tensors of a step (workspaces, the pool).
constexpr double kReserve = 2e9;
// Spot checks against the CPU reference copy one request's cache to the host: only up to here.
constexpr int64_t kCheckMaxContext = 131072;

struct Case {
  int64_t context = 0, batch = 0, q_tokens = 0;
  bool largest_batch = false;  // the largest batch that fits at this context
  IndexKeyFormat fmt = IndexKeyFormat::native;  // of the index-key cache
};

struct CheckResult {
  bool ran = false;
  int64_t rows = 0, selection_mismatch = 0;
  // bf16 cases: the CPU's fp8 selection of the same keys (quantized on the host) against its bf16
  // selection: selected blocks in common / blocks selected, over the checked rows.
  int64_t fp8_common = 0, fp8_selected = 0;
  double o_worst = 0, lse_worst = 0, dense_o_worst = 0, dense_lse_worst = 0;  // in units of the tolerance
  bool pass() const {
    return !ran || (selection_mismatch * 64 <= rows && o_worst <= 1 && lse_worst <= 1 && dense_o_worst <= 1 &&
                    dense_lse_worst <= 1);
  }
};

struct CaseResult {
  Case c;
  std::string skipped;
  Meas index, attention, step, step_graph, dense;
  double index_bytes = 0, attention_bytes = 0, dense_bytes = 0;
  int64_t index_split = 0, attention_split = 0;
  CheckResult check;
};

double gbps(double bytes, double ms) { return ms > 0 && std::isfinite(ms) ? bytes / (ms * 1e-3) / 1e9 : NAN; }

// The device-to-device copy rate of a 2 GB buffer (read + write bytes per second): the ceiling the
// effective rates are read against.
double copy_ceiling_gbps(cudaStream_t stream) {
  const size_t bytes = size_t(1) << 31;
  DevMem a, b;
  if (!a.alloc(bytes) || !b.alloc(bytes)) return NAN;
  ok(cudaMemsetAsync(a.ptr, 1, bytes, stream), "cudaMemsetAsync");
  Timing t = time_calls([&] { ok(cudaMemcpyAsync(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice, stream), "copy"); },
                        stream, 10, 1000);
  return gbps(2.0 * bytes, t.median_ms);
}

std::vector<uint16_t> download_u16(const void* src, size_t count) {
  std::vector<uint16_t> h(count);
  ok(cudaMemcpy(h.data(), src, count * 2, cudaMemcpyDeviceToHost), "download");
  return h;
}

// Request 0 of the batch against the CPU reference: its pages, queries and the GPU's outputs copied
// to the host. The selection is compared as sets (rows that differ are counted: near-ties may
// legitimately flip between float32 orders); the attention is checked on the GPU's own selection,
// so it is exact whatever the ties, and the dense output too.
CheckResult spot_check(const Case& c, const PagedKvCache& gc, const std::vector<int32_t>& table, const void* q,
                       const void* q_idx, const std::vector<int32_t>& sel, const void* o, const float* lse,
                       const void* o_dense, const float* lse_dense) {
  CheckResult r;
  r.ran = true;
  const int64_t nb = (c.context + kBk - 1) / kBk, T = c.q_tokens;
  const size_t page_kv = size_t(kBk) * kHkv * kD, page_idx = size_t(kBk) * kDidx;
  const bool fp8 = c.fmt == IndexKeyFormat::fp8_e4m3;
  const size_t idx_es = fp8 ? 1 : 2;
  std::vector<uint16_t> k(nb * page_kv), v(nb * page_kv);
  std::vector<uint8_t> kidx(nb * page_idx * idx_es);
  std::vector<float> kscale(fp8 ? nb * kBk : 0);
  for (int64_t j = 0; j < nb; ++j) {
    const size_t page = size_t(table[j]);
    ok(cudaMemcpy(k.data() + j * page_kv, static_cast<const uint16_t*>(gc.k_cache) + page * page_kv, page_kv * 2,
                  cudaMemcpyDeviceToHost), "download k");
    ok(cudaMemcpy(v.data() + j * page_kv, static_cast<const uint16_t*>(gc.v_cache) + page * page_kv, page_kv * 2,
                  cudaMemcpyDeviceToHost), "download v");
    ok(cudaMemcpy(kidx.data() + j * page_idx * idx_es,
                  static_cast<const uint8_t*>(gc.k_idx_cache) + page * page_idx * idx_es, page_idx * idx_es,
                  cudaMemcpyDeviceToHost), "download k_idx");
    if (fp8)
      ok(cudaMemcpy(kscale.data() + j * kBk, gc.k_idx_scale + page * kBk, kBk * 4, cudaMemcpyDeviceToHost),
         "download k_idx_scale");
  }
  std::vector<int32_t> ident(nb);
  std::iota(ident.begin(), ident.end(), 0);
  const int32_t len = int32_t(c.context);
  PagedKvCache hc;
  hc.batch = 1;
  hc.n_pages = nb;
  hc.bk = kBk;
  hc.h_kv = kHkv;
  hc.d = kD;
  hc.d_idx = kDidx;
  hc.k_cache = k.data();
  hc.v_cache = v.data();
  hc.k_idx_cache = kidx.data();
  if (fp8) {
    hc.k_idx_format = IndexKeyFormat::fp8_e4m3;
    hc.k_idx_scale = kscale.data();
  }
  hc.block_table = ident.data();
  hc.max_blocks = nb;
  hc.seq_lens = &len;
  std::vector<uint16_t> hq = download_u16(q, size_t(T) * kHq * kD);
  std::vector<uint16_t> hqi = download_u16(q_idx, size_t(T) * kHkv * kDidx);

  DecodeIndexParams ip;
  ip.cache = hc;
  ip.topk = kTopk;
  ip.n_q = T;
  ip.q_idx = hqi.data();
  std::vector<int32_t> ref_sel(size_t(T) * kHkv * kTopk);
  ip.topk_idx = ref_sel.data();
  decode_index_topk(ip);
  r.rows = T * kHkv;
  for (int64_t row = 0; row < r.rows; ++row) {
    std::set<int32_t> a(sel.begin() + row * kTopk, sel.begin() + (row + 1) * kTopk);
    std::set<int32_t> b(ref_sel.begin() + row * kTopk, ref_sel.begin() + (row + 1) * kTopk);
    r.selection_mismatch += a != b;
  }
  if (!fp8) {
    // The same keys through an fp8 cache: quantized per token as append_kv would.
    std::vector<uint8_t> k8(kidx.size() / 2);
    std::vector<float> ks(size_t(nb) * kBk), row(kDidx);
    const uint16_t* k16 = reinterpret_cast<const uint16_t*>(kidx.data());
    for (int64_t t = 0; t < nb * kBk; ++t) {
      for (int64_t e = 0; e < kDidx; ++e) row[e] = bf16_to_float(bf16{k16[t * kDidx + e]});
      ks[t] = quantize_e4m3_row(row.data(), kDidx, k8.data() + t * kDidx);
    }
    DecodeIndexParams fp = ip;
    fp.cache.k_idx_cache = k8.data();
    fp.cache.k_idx_format = IndexKeyFormat::fp8_e4m3;
    fp.cache.k_idx_scale = ks.data();
    std::vector<int32_t> sel8(ref_sel.size());
    fp.topk_idx = sel8.data();
    decode_index_topk(fp);
    for (int64_t row_i = 0; row_i < r.rows; ++row_i) {
      std::set<int32_t> a(ref_sel.begin() + row_i * kTopk, ref_sel.begin() + (row_i + 1) * kTopk);
      a.erase(-1);
      for (int64_t x = 0; x < kTopk; ++x) r.fp8_common += a.count(sel8[row_i * kTopk + x]);
      r.fp8_selected += int64_t(a.size());
    }
  }

  // o within u |ref| + 4u max|o_ref| of the row (u = 2^-8: bf16 output and P rounding), lse within
  // 1e-3 + 1e-5 |ref| (float32 accumulation over up to a million keys).
  auto compare = [&](const void* o_dev, const float* lse_dev, const int32_t* selection, double& o_worst,
                     double& lse_worst) {
    DecodeAttentionParams ap;
    ap.cache = hc;
    ap.h_q = kHq;
    ap.n_q = T;
    ap.q = hq.data();
    ap.topk_idx = selection;
    ap.topk = kTopk;
    std::vector<float> ref_o(size_t(T) * kHq * kD), ref_lse(size_t(T) * kHq);
    ap.dtype = DType::bf16;
    std::vector<uint16_t> ref_o16(ref_o.size());
    ap.o = ref_o16.data();
    ap.lse = ref_lse.data();
    decode_attention(ap);
    std::vector<uint16_t> got = download_u16(o_dev, ref_o16.size());
    std::vector<float> got_lse(ref_lse.size());
    ok(cudaMemcpy(got_lse.data(), lse_dev, got_lse.size() * 4, cudaMemcpyDeviceToHost), "download lse");
    const double u = 1.0 / 256;
    for (int64_t row = 0; row < T * kHq; ++row) {
      double amax = 0;
      for (int64_t x = 0; x < kD; ++x) amax = std::max(amax, std::fabs(double(bf16_to_float(bf16{ref_o16[row * kD + x]}))));
      for (int64_t x = 0; x < kD; ++x) {
        const double a = bf16_to_float(bf16{got[row * kD + x]}), b = bf16_to_float(bf16{ref_o16[row * kD + x]});
        o_worst = std::max(o_worst, std::fabs(a - b) / (u * std::fabs(b) + 4 * u * amax + 1e-6));
      }
      const double a = got_lse[row], b = ref_lse[row];
      lse_worst = std::max(lse_worst, a == b ? 0.0 : std::fabs(a - b) / (1e-3 + 1e-5 * std::fabs(b)));
    }
  };
  compare(o, lse, sel.data(), r.o_worst, r.lse_worst);
  compare(o_dense, lse_dense, nullptr, r.dense_o_worst, r.dense_lse_worst);
  return r;
}

// Attended K/V bytes of a step: per (request, group), the distinct selected blocks over the
// request's query tokens, each read once for all its heads (visible tokens of the block only).
double attention_bytes(const std::vector<int32_t>& sel, const Case& c) {
  double bytes = 0;
  const int64_t T = c.q_tokens;
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t r = 0; r < kHkv; ++r) {
      std::set<int32_t> blocks;
      for (int64_t t = 0; t < T; ++t)
        for (int64_t x = 0; x < kTopk; ++x) {
          const int32_t j = sel[((b * T + t) * kHkv + r) * kTopk + x];
          if (j >= 0) blocks.insert(j);
        }
      for (int32_t j : blocks) bytes += double(std::min<int64_t>(kBk, c.context - int64_t(j) * kBk));
    }
  return bytes * 2.0 * kD * 2;  // K and V, bf16
}

CaseResult run_case(const Case& c, const BenchDecodeOptions& opt, cudaStream_t stream, void* k_cache, void* v_cache,
                    void* kidx_cache, float* kidx_scale, int64_t n_pages, const std::vector<int32_t>& table_h, const int32_t* table_d,
                    const int32_t* lens_d) {
  CaseResult res;
  res.c = c;
  const int64_t nb = (c.context + kBk - 1) / kBk, T = c.q_tokens, n_q = c.batch * T;
  std::printf("  %s index keys, context %lld, batch %lld, %lld query token%s:", fmt_name(c.fmt), (long long)c.context,
              (long long)c.batch, (long long)T, T == 1 ? "" : "s");
  std::fflush(stdout);

  PagedKvCache cache;
  cache.batch = c.batch;
  cache.n_pages = n_pages;
  cache.bk = kBk;
  cache.h_kv = kHkv;
  cache.d = kD;
  cache.d_idx = kDidx;
  cache.k_cache = k_cache;
  cache.v_cache = v_cache;
  cache.k_idx_cache = kidx_cache;
  cache.k_idx_format = c.fmt;
  cache.k_idx_scale = kidx_scale;
  cache.block_table = table_d;
  cache.max_blocks = nb;
  cache.seq_lens = lens_d;

  Exec ex;
  ex.backend = Backend::cuda;
  ex.stream = stream;
  DecodeShape s;
  s.batch = c.batch;
  s.n_q = n_q;
  s.max_q = T;
  s.max_blocks = nb;
  s.bk = kBk;
  s.h_kv = kHkv;
  s.h_q = kHq;
  s.d = kD;
  s.d_idx = kDidx;
  s.topk = kTopk;
  s.k_idx_format = c.fmt;
  const DecodePlan plan = plan_decode(s, ex);
  DecodeShape sd = s;
  sd.d_idx = 0;
  sd.topk = 0;
  sd.k_idx_format = IndexKeyFormat::native;
  const DecodePlan plan_dense = plan_decode(sd, ex);
  res.index_split = plan.index_split;
  res.attention_split = plan.attention_split;

  DevMem q, q_idx, o_buf, lse, sel, cu, ws, ws_dense, o_dense, lse_dense;
  const bool fit = q.alloc(size_t(n_q) * kHq * kD * 2) && q_idx.alloc(size_t(n_q) * kHkv * kDidx * 2) &&
                   o_buf.alloc(size_t(n_q) * kHq * kD * 2) && lse.alloc(size_t(n_q) * kHq * 4) &&
                   sel.alloc(size_t(n_q) * kHkv * kTopk * 4) && cu.alloc(size_t(c.batch + 1) * 4) &&
                   (plan.workspace_bytes == 0 || ws.alloc(plan.workspace_bytes)) &&
                   (plan_dense.workspace_bytes == 0 || ws_dense.alloc(plan_dense.workspace_bytes)) &&
                   o_dense.alloc(size_t(n_q) * kHq * kD * 2) && lse_dense.alloc(size_t(n_q) * kHq * 4);
  if (!fit) {
    res.skipped = "the step's tensors and workspaces do not fit next to the cache";
    std::printf(" skipped (%s)\n", res.skipped.c_str());
    return res;
  }
  fill_normal_bf16(q.ptr, n_q * kHq * kD, opt.seed * 7 + 4, 1.f, stream);
  fill_normal_bf16(q_idx.ptr, n_q * kHkv * kDidx, opt.seed * 7 + 5, 1.f, stream);
  std::vector<int32_t> cu_h(c.batch + 1);
  for (int64_t b = 0; b <= c.batch; ++b) cu_h[b] = int32_t(b * T);
  ok(cudaMemcpyAsync(cu.ptr, cu_h.data(), cu_h.size() * 4, cudaMemcpyHostToDevice, stream), "upload cu");

  DecodeIndexParams ip;
  ip.cache = cache;
  ip.topk = kTopk;
  ip.n_q = n_q;
  ip.cu_seqlens_q = cu.as<int32_t>();
  ip.q_idx = q_idx.ptr;
  ip.topk_idx = sel.as<int32_t>();
  DecodeAttentionParams ap;
  ap.cache = cache;
  ap.h_q = kHq;
  ap.n_q = n_q;
  ap.cu_seqlens_q = cu.as<int32_t>();
  ap.q = q.ptr;
  ap.topk_idx = sel.as<int32_t>();
  ap.topk = kTopk;
  ap.o = o_buf.ptr;
  ap.lse = lse.as<float>();
  DecodeAttentionParams dp = ap;
  dp.topk_idx = nullptr;
  dp.topk = 0;
  dp.o = o_dense.ptr;
  dp.lse = lse_dense.as<float>();

  const double budget_ms = opt.budget_s * 1e3;
  res.index = measure("index", [&] { decode_index_topk(ip, plan, ws.ptr, ex); }, stream, opt.iters, budget_ms);
  res.attention = measure("attention", [&] { decode_attention(ap, plan, ws.ptr, ex); }, stream, opt.iters, budget_ms);
  auto step = [&] {
    decode_index_topk(ip, plan, ws.ptr, ex);
    decode_attention(ap, plan, ws.ptr, ex);
  };
  res.step = measure("step", step, stream, opt.iters, budget_ms);
  // The same step captured once in a CUDA graph and replayed (what a serving engine does).
  cudaGraphExec_t exec = nullptr;
  try {
    cudaGraph_t graph;
    ok(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    try {
      step();
    } catch (...) {
      cudaStreamEndCapture(stream, &graph);
      throw;
    }
    ok(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
    ok(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    cudaGraphDestroy(graph);
    res.step_graph = measure("graph", [&] { ok(cudaGraphLaunch(exec, stream), "cudaGraphLaunch"); }, stream, opt.iters,
                             budget_ms);
  } catch (const std::exception& e) {
    res.step_graph.error = e.what();
    cudaGetLastError();
    std::printf(" graph (unavailable: %s);", e.what());
  }
  if (exec) cudaGraphExecDestroy(exec);
  res.dense = measure("dense", [&] { decode_attention(dp, plan_dense, ws_dense.ptr, ex); }, stream, opt.iters, budget_ms);
  ok(cudaStreamSynchronize(stream), "step");

  std::vector<int32_t> sel_h(size_t(n_q) * kHkv * kTopk);
  ok(cudaMemcpy(sel_h.data(), sel.ptr, sel_h.size() * 4, cudaMemcpyDeviceToHost), "download selection");
  res.index_bytes = double(c.batch) * c.context * idx_bytes_per_token(c.fmt);
  res.attention_bytes = attention_bytes(sel_h, c);
  res.dense_bytes = double(c.batch) * c.context * kKvBytesPerToken;
  if (c.context <= kCheckMaxContext && res.step.ran() && res.dense.ran()) {
    std::printf(" check");
    std::fflush(stdout);
    std::vector<int32_t> row0(table_h.begin(), table_h.begin() + nb);
    std::vector<int32_t> sel0(sel_h.begin(), sel_h.begin() + T * kHkv * kTopk);
    res.check = spot_check(c, cache, row0, q.ptr, q_idx.ptr, sel0, o_buf.ptr, lse.as<float>(), o_dense.ptr,
                           lse_dense.as<float>());
    std::printf(res.check.pass() ? " ok" : " FAILED");
  }
  std::printf("\n");
  return res;
}

std::string fmt_gbps(double x) { return std::isfinite(x) ? strf("%.0f", x) : "-"; }
std::string fmt_meas(const Meas& m) { return m.ran() ? fmt_ms(m.ms()) + runs_note(m.t) : "n/a"; }

std::string to_markdown(const Context& cx, double copy, const std::vector<CaseResult>& rs) {
  std::string md = "# msa bench decode\n\n";
  md += strf("%s (%d SMs, %.1f GiB), CUDA runtime %s, %s, commit %s (%s).\n\n", cx.gpu.c_str(), cx.sms, cx.mem_gib,
             cx.runtime.c_str(), cx.date.c_str(), cx.commit.c_str(), cx.commit_source.c_str());
  md += "Command: `" + cx.command + "`\n\n";
  md += strf("M3 shape: h_q %lld, h_kv %lld, d %lld, d_idx %lld, bk %lld, topk %lld, bf16; contexts are the cached "
             "tokens of every request (the step's query tokens included), pages scattered in the pool. Index keys: bf16 "
             "(256 B per token) or fp8 (e4m3 bytes + a float32 scale, 132 B per token; the K/V cache stays bf16). "
             "Device-to-device copy of 2 GB (read + write): %s GB/s. Times: median of up to %d runs (fewer, marked, "
             "when a run is long); GB/s = bytes that must be read / time (index: the index keys of every visible "
             "token; attention: K and V of the distinct selected blocks per request and group; dense: K and V of every "
             "visible token).\n\n",
             (long long)kHq, (long long)kHkv, (long long)kD, (long long)kDidx, (long long)kBk, (long long)kTopk,
             fmt_gbps(copy).c_str(), cx.iters);
  md += "| index keys | context | batch | q tokens | index ms (GB/s) | attention ms (GB/s) | MSA step ms | step, graph ms | dense "
        "ms (GB/s) | speed-up | check |\n";
  md += "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n";
  for (const CaseResult& r : rs) {
    if (!r.skipped.empty()) {
      md += strf("| %s | %lld | %lld | %lld | skipped: %s | | | | | | |\n", fmt_name(r.c.fmt), (long long)r.c.context,
                 (long long)r.c.batch, (long long)r.c.q_tokens, r.skipped.c_str());
      continue;
    }
    const double best = std::min(r.step.ms(), r.step_graph.ran() ? r.step_graph.ms() : INFINITY);
    std::string chk = !r.check.ran ? "-"
                      : strf("%s (sel %lld/%lld, o %.2f, lse %.2f, dense o %.2f)", r.check.pass() ? "ok" : "FAILED",
                             (long long)r.check.selection_mismatch, (long long)r.check.rows, r.check.o_worst,
                             r.check.lse_worst, r.check.dense_o_worst) +
                            (r.check.fp8_selected > 0
                                 ? strf("; fp8 keeps %.3f of the bf16 blocks",
                                        double(r.check.fp8_common) / double(r.check.fp8_selected))
                                 : std::string());
    md += strf("| %s | %lld | %lld%s | %lld | %s (%s) | %s (%s) | %s | %s | %s (%s) | %s | %s |\n", fmt_name(r.c.fmt),
               (long long)r.c.context,
               (long long)r.c.batch, r.c.largest_batch ? " (largest)" : "", (long long)r.c.q_tokens,
               fmt_meas(r.index).c_str(), fmt_gbps(gbps(r.index_bytes, r.index.ms())).c_str(),
               fmt_meas(r.attention).c_str(), fmt_gbps(gbps(r.attention_bytes, r.attention.ms())).c_str(),
               fmt_meas(r.step).c_str(), fmt_meas(r.step_graph).c_str(), fmt_meas(r.dense).c_str(),
               fmt_gbps(gbps(r.dense_bytes, r.dense.ms())).c_str(),
               std::isfinite(best) && r.dense.ran() ? strf("%.2fx", r.dense.ms() / best).c_str() : "-", chk.c_str());
  }
  md += "\nSpeed-up = dense / the faster of the MSA step eager and replayed from a graph. check: request 0 against the "
        "CPU reference (contexts up to 131072): selection rows whose set differs (near-ties may flip), and the worst "
        "attention errors in units of the tolerance (<= 1 passes); on bf16 rows also the CPU's selection through an fp8 "
        "cache of the same keys against its bf16 selection (share of the bf16 blocks fp8 also picks).\n";
  return md;
}

std::string jmeas(const Meas& m, double bytes) {
  if (!m.ran()) return "{\"error\": " + jstr(m.error.empty() ? "not run" : m.error) + "}";
  std::string s = jtiming(m.t, 0);
  s.pop_back();
  if (bytes > 0) s += ", \"bytes\": " + jnum(bytes, 10) + ", \"gbps\": " + jnum(gbps(bytes, m.ms()), 5);
  return s + "}";
}

std::string to_json(const Context& cx, double copy, const std::vector<CaseResult>& rs) {
  std::string j = "{\n" + jcontext(cx, "msa bench decode");
  j += strf("  \"shape\": {\"h_q\": %lld, \"h_kv\": %lld, \"d\": %lld, \"d_idx\": %lld, \"bk\": %lld, \"topk\": %lld, "
            "\"dtype\": \"bf16\"},\n",
            (long long)kHq, (long long)kHkv, (long long)kD, (long long)kDidx, (long long)kBk, (long long)kTopk);
  j += "  \"copy_gbps\": " + jnum(copy, 5) + ",\n  \"cases\": [\n";
  for (size_t i = 0; i < rs.size(); ++i) {
    const CaseResult& r = rs[i];
    j += strf("    {\"index_keys\": \"%s\", \"context\": %lld, \"batch\": %lld, \"largest_batch\": %s, \"q_tokens\": %lld",
              fmt_name(r.c.fmt), (long long)r.c.context, (long long)r.c.batch, r.c.largest_batch ? "true" : "false",
              (long long)r.c.q_tokens);
    if (!r.skipped.empty()) {
      j += ", \"skipped\": " + jstr(r.skipped) + "}";
    } else {
      j += strf(", \"index_split\": %lld, \"attention_split\": %lld", (long long)r.index_split,
                (long long)r.attention_split);
      j += ",\n     \"index\": " + jmeas(r.index, r.index_bytes);
      j += ",\n     \"attention\": " + jmeas(r.attention, r.attention_bytes);
      j += ",\n     \"step\": " + jmeas(r.step, r.index_bytes + r.attention_bytes);
      j += ",\n     \"step_graph\": " + jmeas(r.step_graph, r.index_bytes + r.attention_bytes);
      j += ",\n     \"dense\": " + jmeas(r.dense, r.dense_bytes);
      if (r.check.ran)
        j += strf(",\n     \"check\": {\"pass\": %s, \"rows\": %lld, \"selection_mismatch\": %lld, \"o_worst\": %s, "
                  "\"lse_worst\": %s, \"dense_o_worst\": %s, \"dense_lse_worst\": %s, \"fp8_common\": %lld, "
                  "\"fp8_selected\": %lld}",
                  r.check.pass() ? "true" : "false", (long long)r.check.rows, (long long)r.check.selection_mismatch,
                  jnum(r.check.o_worst, 4).c_str(), jnum(r.check.lse_worst, 4).c_str(),
                  jnum(r.check.dense_o_worst, 4).c_str(), jnum(r.check.dense_lse_worst, 4).c_str(),
                  (long long)r.check.fp8_common, (long long)r.check.fp8_selected);
      j += "}";
    }
    j += i + 1 < rs.size() ? ",\n" : "\n";
  }
  return j + "  ]\n}\n";
}

}  // namespace

int run_bench_decode(const BenchDecodeOptions& o) {
  if (cuda_device_count() == 0) {
    std::fprintf(stderr, "msa bench: no CUDA device is visible\n");
    return 2;
  }
  int dev = 0;
  const Context cx = bench_context(o.commit, MSA_CLI_COMMIT, o.command, o.iters, o.budget_s, &dev);
  cudaMemPool_t pool = keep_pool_mapped(dev);
  cudaStream_t stream;
  ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  std::printf("msa bench decode on %s (%d SMs), commit %s\n", cx.gpu.c_str(), cx.sms, cx.commit.c_str());
  const double copy = copy_ceiling_gbps(stream);
  std::printf("  device-to-device copy (read + write): %.0f GB/s\n", copy);

  std::vector<CaseResult> rs;
  auto save = [&] {
    if (o.out.empty()) return;
    write_file(o.out + ".json", to_json(cx, copy, rs));
    write_file(o.out + ".md", to_markdown(cx, copy, rs));
  };
  bool all_pass = true;
  std::mt19937_64 rng(o.seed);
  for (const std::string& fname : o.index_keys)
  for (int64_t n : o.contexts) {
    const IndexKeyFormat fmt = fname == "fp8" ? IndexKeyFormat::fp8_e4m3 : IndexKeyFormat::native;
    const bool fp8 = fmt == IndexKeyFormat::fp8_e4m3;
    const int64_t nb = (n + kBk - 1) / kBk;
    const double per_request = double(nb) * kBk * (kKvBytesPerToken + idx_bytes_per_token(fmt));
    size_t free_b = 0, total_b = 0;
    ok(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    const int64_t fits = int64_t(std::max(0.0, (double(free_b) - kReserve) / per_request));
    std::vector<int64_t> batches;
    for (int64_t b : o.batches)
      if (b <= fits) batches.push_back(b);
      else {
        for (int64_t t : o.q_tokens) {
          CaseResult r;
          r.c = {n, b, t, false, fmt};
          r.skipped = strf("cache of %.1f GB does not fit", per_request * b / 1e9);
          rs.push_back(r);
        }
      }
    const bool add_largest = o.largest_batch && n == *std::max_element(o.contexts.begin(), o.contexts.end()) &&
                             fits > 0 && std::find(batches.begin(), batches.end(), fits) == batches.end();
    if (add_largest) batches.push_back(fits);
    if (batches.empty()) continue;
    const int64_t bmax = *std::max_element(batches.begin(), batches.end());
    // One cache for the largest batch of this context; smaller batches use its first requests.
    const int64_t n_pages = bmax * nb;
    DevMem k, v, kidx, kscale, table, lens;
    if (!k.alloc(size_t(n_pages) * kBk * kHkv * kD * 2) || !v.alloc(size_t(n_pages) * kBk * kHkv * kD * 2) ||
        !kidx.alloc(size_t(n_pages) * kBk * kDidx * (fp8 ? 1 : 2)) || (fp8 && !kscale.alloc(size_t(n_pages) * kBk * 4)) ||
        !table.alloc(size_t(n_pages) * 4) || !lens.alloc(size_t(bmax) * 4)) {
      std::printf("  context %lld: the cache for batch %lld did not fit\n", (long long)n, (long long)bmax);
      continue;
    }
    fill_normal_bf16(k.ptr, n_pages * kBk * kHkv * kD, o.seed * 7 + 1, 1.f, stream);
    fill_normal_bf16(v.ptr, n_pages * kBk * kHkv * kD, o.seed * 7 + 2, 1.f, stream);
    if (fp8)
      fill_normal_e4m3_rows(kidx.ptr, kscale.as<float>(), n_pages * kBk, kDidx, o.seed * 7 + 3, stream);
    else
      fill_normal_bf16(kidx.ptr, n_pages * kBk * kDidx, o.seed * 7 + 3, 1.f, stream);
    // Pages scattered: the block table is a random permutation of the pool.
    std::vector<int32_t> table_h(n_pages);
    std::iota(table_h.begin(), table_h.end(), 0);
    std::shuffle(table_h.begin(), table_h.end(), rng);
    std::vector<int32_t> lens_h(bmax, int32_t(n));
    ok(cudaMemcpyAsync(table.ptr, table_h.data(), table_h.size() * 4, cudaMemcpyHostToDevice, stream), "upload table");
    ok(cudaMemcpyAsync(lens.ptr, lens_h.data(), lens_h.size() * 4, cudaMemcpyHostToDevice, stream), "upload lens");
    ok(cudaStreamSynchronize(stream), "fill");
    for (int64_t b : batches)
      for (int64_t t : o.q_tokens) {
        Case c{n, b, t, add_largest && b == fits, fmt};
        rs.push_back(run_case(c, o, stream, k.ptr, v.ptr, kidx.ptr, fp8 ? kscale.as<float>() : nullptr, n_pages, table_h,
                              table.as<int32_t>(),
                              lens.as<int32_t>()));
        all_pass &= rs.back().check.pass();
        save();
      }
    ok(cudaStreamSynchronize(stream), "sizes");
    cudaMemPoolTrimTo(pool, 0);
  }
  ok(cudaStreamDestroy(stream), "cudaStreamDestroy");
  std::printf("\n%s", to_markdown(cx, copy, rs).c_str());
  if (!o.out.empty()) std::printf("\nwrote %s.json and %s.md\n", o.out.c_str(), o.out.c_str());
  if (!all_pass) {
    std::fprintf(stderr, "msa bench: a spot check against the CPU reference failed (see the check column)\n");
    return 1;
  }
  return 0;
}

}  // namespace msa::cli
