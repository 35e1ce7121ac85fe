// Helpers shared by the `msa bench` subcommands (CUDA builds only): CUDA error checks, a device
// allocation that reports failure, event timing of calls queued on one stream, and the JSON /
// markdown / file helpers of the results.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cli.h"
#include "msa/msa.h"

namespace msa::cli {

inline void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("msa bench: ") + what + ": " + cudaGetErrorString(e));
}

// A device allocation that reports failure instead of throwing (the caller skips the size).
struct DevMem {
  void* ptr = nullptr;
  DevMem() = default;
  DevMem(const DevMem&) = delete;
  DevMem& operator=(const DevMem&) = delete;
  ~DevMem() {
    if (ptr) cudaFree(ptr);
  }
  bool alloc(size_t bytes) {
    if (cudaMalloc(&ptr, bytes) != cudaSuccess) {
      ptr = nullptr;
      cudaGetLastError();  // an out-of-memory error is not sticky: clear it
      return false;
    }
    return true;
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

struct Timing {
  double median_ms = 0, min_ms = 0;
  int runs = 0;
  bool separate_warmup = true;  // false: the one timed call was also the first call at this size
};

// CUDA events around each call, queued back to back on the stream. The first call warms up (module
// load, allocator pool, TMA descriptors) and sizes the repetitions: up to iters runs within about
// budget_ms; a call longer than the budget is measured once, by that first call.
inline Timing time_calls(const std::function<void()>& call, cudaStream_t stream, int iters, double budget_ms) {
  cudaEvent_t a, b;
  ok(cudaEventCreate(&a), "cudaEventCreate");
  ok(cudaEventCreate(&b), "cudaEventCreate");
  ok(cudaEventRecord(a, stream), "cudaEventRecord");
  call();
  ok(cudaEventRecord(b, stream), "cudaEventRecord");
  ok(cudaEventSynchronize(b), "first call");
  float first = 0;
  ok(cudaEventElapsedTime(&first, a, b), "cudaEventElapsedTime");
  Timing t;
  if (first >= budget_ms) {
    t.median_ms = t.min_ms = first;
    t.runs = 1;
    t.separate_warmup = false;
  } else {
    const int reps = std::max(1, std::min(iters, int(budget_ms / std::max(first, 1e-3f))));
    std::vector<cudaEvent_t> ev(2 * reps);
    for (auto& e : ev) ok(cudaEventCreate(&e), "cudaEventCreate");
    for (int r = 0; r < reps; ++r) {
      ok(cudaEventRecord(ev[2 * r], stream), "cudaEventRecord");
      call();
      ok(cudaEventRecord(ev[2 * r + 1], stream), "cudaEventRecord");
    }
    ok(cudaStreamSynchronize(stream), "timed calls");
    std::vector<double> ms(reps);
    for (int r = 0; r < reps; ++r) {
      float x = 0;
      ok(cudaEventElapsedTime(&x, ev[2 * r], ev[2 * r + 1]), "cudaEventElapsedTime");
      ms[r] = x;
    }
    for (auto& e : ev) cudaEventDestroy(e);
    std::sort(ms.begin(), ms.end());
    t.median_ms = reps % 2 ? ms[reps / 2] : 0.5 * (ms[reps / 2 - 1] + ms[reps / 2]);
    t.min_ms = ms[0];
    t.runs = reps;
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return t;
}

// One measurement, or why it did not run (an operation without a CUDA kernel in this build, a
// workspace that did not fit): such rows are reported as unavailable and the benchmark goes on.
struct Meas {
  Timing t;
  std::string error;
  bool ran() const { return error.empty() && t.runs > 0; }
  double ms() const { return ran() ? t.median_ms : NAN; }
};

inline std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

inline Meas measure(const char* label, const std::function<void()>& call, cudaStream_t stream, int iters,
                    double budget_ms) {
  std::printf(" %s", label);
  std::fflush(stdout);
  Meas m;
  try {
    m.t = time_calls(call, stream, iters, budget_ms);
  } catch (const std::exception& e) {
    m.error = first_line(e.what());
    cudaStreamSynchronize(stream);
    cudaGetLastError();  // clear a non-sticky error (an allocation failure) before the next call
    std::printf(" (unavailable)");
  }
  std::printf(m.ran() ? "," : ";");
  std::fflush(stdout);
  return m;
}

inline double tflops(double flops, double ms) { return ms > 0 ? flops / (ms * 1e-3) / 1e12 : 0; }

inline std::string jstr(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\')
      out += '\\', out += c;
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out + "\"";
}

inline std::string jnum(double x, int prec = 6) {
  if (!std::isfinite(x)) return "null";
  return strf("%.*g", prec, x);
}

inline std::string jtiming(const Timing& t, double flops) {
  std::string s = strf("{\"median_ms\": %s, \"min_ms\": %s, \"runs\": %d, \"separate_warmup\": %s",
                       jnum(t.median_ms).c_str(), jnum(t.min_ms).c_str(), t.runs, t.separate_warmup ? "true" : "false");
  if (flops > 0)
    s += strf(", \"flops\": %s, \"tflops\": %s", jnum(flops, 10).c_str(), jnum(tflops(flops, t.median_ms), 5).c_str());
  return s + "}";
}

inline std::string fmt_ms(double ms) {
  return ms >= 100 ? strf("%.1f", ms) : ms >= 10 ? strf("%.2f", ms) : strf("%.3f", ms);
}

inline std::string runs_note(const Timing& t) {
  return t.runs >= 5 ? "" : strf(" (%d%s)", t.runs, t.separate_warmup ? "" : "*");
}

inline void write_file(const std::string& path, const std::string& text) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) throw std::runtime_error("msa bench: cannot write " + path);
  std::fputs(text.c_str(), f);
  std::fclose(f);
}

inline std::string today_utc() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d", &tm);
  return buf;
}

// The M3 shape (MiniMax M3 attention layer), batch 1, bf16: what both benchmarks measure.
constexpr int64_t kHq = 64, kHkv = 4, kG = kHq / kHkv, kD = 128, kDidx = 128, kBk = 128, kTopk = 16;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// Where and how a benchmark ran, recorded in its outputs.
struct Context {
  std::string gpu, date, commit, commit_source, command, runtime;
  int sms = 0;
  double mem_gib = 0;
  int iters = 0;
  double budget_s = 0;
};

// The current device's name, SMs and memory, the CUDA runtime, today's date, and the commit: --commit
// when given, else the one the build was configured at (configured_commit).
inline Context bench_context(const std::string& commit, const char* configured_commit, const std::string& command,
                             int iters, double budget_s, int* dev_out) {
  Context cx;
  int dev = 0;
  ok(cudaGetDevice(&dev), "cudaGetDevice");
  cudaDeviceProp prop{};
  ok(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
  int rt = 0;
  ok(cudaRuntimeGetVersion(&rt), "cudaRuntimeGetVersion");
  cx.gpu = prop.name;
  cx.sms = prop.multiProcessorCount;
  cx.mem_gib = double(prop.totalGlobalMem) / kGiB;
  cx.runtime = strf("%d.%d", rt / 1000, (rt % 1000) / 10);
  cx.date = today_utc();
  cx.commit = commit.empty() ? configured_commit : commit;
  cx.commit_source = commit.empty() ? "recorded when the build was configured" : "--commit";
  cx.command = command;
  cx.iters = iters;
  cx.budget_s = budget_s;
  *dev_out = dev;
  return cx;
}

// The JSON fields of the context, from "benchmark" to "command", one per line.
inline std::string jcontext(const Context& cx, const char* benchmark) {
  std::string j = std::string("  \"benchmark\": ") + jstr(benchmark) + ",\n";
  j += "  \"date\": " + jstr(cx.date) + ",\n";
  j += "  \"gpu\": " + jstr(cx.gpu) + ",\n";
  j += strf("  \"sms\": %d,\n  \"gpu_memory_gib\": %s,\n", cx.sms, jnum(cx.mem_gib, 4).c_str());
  j += "  \"cuda_runtime\": " + jstr(cx.runtime) + ",\n";
  j += "  \"msa_version\": " + jstr(version()) + ",\n";
  j += "  \"commit\": " + jstr(cx.commit) + ",\n";
  j += "  \"commit_source\": " + jstr(cx.commit_source) + ",\n";
  j += "  \"command\": " + jstr(cx.command) + ",\n";
  return j;
}

// Exit code 2 with a message unless every selection is random or planted (0: all known).
inline int check_selections(const std::vector<std::string>& selections) {
  for (const std::string& s : selections)
    if (s != "random" && s != "planted") {
      std::fprintf(stderr, "msa bench: unknown selection '%s' (random, planted)\n", s.c_str());
      return 2;
    }
  return 0;
}

// The operations take their workspaces from the device's default stream-ordered pool on every call:
// keep that memory mapped between calls, as a serving engine or a training framework's caching
// allocator would (docs/sparse_attention.md).
inline cudaMemPool_t keep_pool_mapped(int dev) {
  cudaMemPool_t pool;
  ok(cudaDeviceGetDefaultMemPool(&pool, dev), "cudaDeviceGetDefaultMemPool");
  uint64_t keep = UINT64_MAX;
  ok(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolSetAttribute");
  return pool;
}

// Tokens attended per (query, group) summed from a selection [n, kHkv, kTopk] of one causal sequence
// of n tokens at the M3 shape, and how often it holds block 0 (the sink) and the block before the
// query's own, over the queries that see more than topk blocks (the others keep every block).
struct SelectionStats {
  double attended = 0;
  double sink_frac = 0, prev_frac = 0;
};

inline SelectionStats selection_stats(const std::vector<int32_t>& idx, int64_t n) {
  double attended = 0, rows = 0, sink = 0, prev = 0;
#pragma omp parallel for reduction(+ : attended, rows, sink, prev) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t own = i / kBk;
    for (int64_t r = 0; r < kHkv; ++r) {
      const int32_t* row = idx.data() + (i * kHkv + r) * kTopk;
      bool has_sink = false, has_prev = false;
      for (int64_t t = 0; t < kTopk; ++t) {
        const int64_t b = row[t];
        if (b < 0 || b > own) continue;
        attended += double(std::min<int64_t>(kBk, i - b * kBk + 1));
        has_sink |= b == 0;
        has_prev |= b == own - 1;
      }
      if (own >= kTopk) {
        rows += 1;
        sink += has_sink;
        prev += has_prev;
      }
    }
  }
  SelectionStats st;
  st.attended = attended;
  st.sink_frac = rows > 0 ? sink / rows : 0;
  st.prev_frac = rows > 0 ? prev / rows : 0;
  return st;
}

}  // namespace msa::cli
