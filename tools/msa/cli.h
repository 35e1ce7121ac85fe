// The subcommands of the msa command-line tool (info, check, demo, bench) and their options.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "msa/common.h"

namespace msa::cli {

struct CheckOptions {
  Backend backend = Backend::cpu;
  int64_t cases = 200;
  uint64_t seed = 1;
  int64_t only = -1;  // run just this case number (reproduce a failure)
  bool verbose = false;
};

struct DemoOptions {
  int64_t n = 16384;
  uint64_t seed = 1;
  int threads = 0;  // 0: all hardware threads
};

// `msa bench prefill` (GPU only; bench.cpp, compiled in CUDA builds).
struct BenchOptions {
  std::vector<int64_t> ns = {8192, 32768, 131072, 524288, 1048576};
  std::vector<std::string> selections = {"random", "planted"};
  int iters = 5;          // most timed runs per measurement (median reported)
  double budget_s = 20;   // rough time cap per measurement; longer calls run fewer times
  uint64_t seed = 1;
  bool block_topk = true;
  std::string out;        // file prefix: writes out.json and out.md; empty: print only
  std::string commit;     // recorded as the measured commit; empty: the one seen at configure time
  std::string command;    // the command line, recorded in the outputs
};

// `msa bench train` (GPU only; bench_train.cpp, compiled in CUDA builds).
struct BenchTrainOptions {
  std::vector<int64_t> ns = {32768, 131072};
  std::vector<std::string> selections = {"planted", "random"};
  int iters = 5;          // most timed runs per measurement (median reported)
  double budget_s = 20;   // rough time cap per measurement; longer calls run fewer times
  uint64_t seed = 1;
  bool dense = true;      // the warm-up phase: our dense forward + backward and the full-prefix KL
  std::string out;        // file prefix: writes out.json and out.md; empty: print only
  std::string commit;     // recorded as the measured commit; empty: the one seen at configure time
  std::string command;    // the command line, recorded in the outputs
};

// `msa bench decode` (GPU only; bench_decode.cpp, compiled in CUDA builds).
struct BenchDecodeOptions {
  std::vector<int64_t> contexts = {32768, 131072, 524288, 1048576};
  std::vector<int64_t> batches = {1, 32, 128};
  std::vector<int64_t> q_tokens = {1, 8};
  std::vector<std::string> index_keys = {"bf16", "fp8"};  // index-key cache formats, each a pass
  bool largest_batch = true;  // also the largest batch whose cache fits, at the longest context
  int iters = 20;             // most timed runs per measurement (median reported)
  double budget_s = 2;        // rough time cap per measurement
  uint64_t seed = 1;
  std::string out;            // file prefix: writes out.json and out.md; empty: print only
  std::string commit;         // recorded as the measured commit; empty: the one seen at configure time
  std::string command;        // the command line, recorded in the outputs
};

// Each returns the process exit code: 0 ok, 1 a check failed, 2 the request cannot run here.
int run_info();
int run_check(const CheckOptions& o);
int run_demo(const DemoOptions& o);
int run_bench_prefill(const BenchOptions& o);
int run_bench_train(const BenchTrainOptions& o);
int run_bench_decode(const BenchDecodeOptions& o);

// printf into a std::string.
std::string strf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace msa::cli
