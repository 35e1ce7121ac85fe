// The subcommands of the msa command-line tool (info, check, demo) and their options.
#pragma once

#include <cstdint>
#include <string>

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

// Each returns the process exit code: 0 ok, 1 a check failed, 2 the request cannot run here.
int run_info();
int run_check(const CheckOptions& o);
int run_demo(const DemoOptions& o);

// printf into a std::string.
std::string strf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace msa::cli
