// The msa command-line tool: `msa info`, `msa check`, `msa demo`, `msa bench` and, in builds with
// the trainer, `msa train`, `msa eval`, `msa viz` (argument parsing and info).
#include <CLI/CLI.hpp>
#include <cstdarg>
#include <cstdio>
#include <string>

#include "cli.h"
#include "msa/msa.h"
#ifdef MSA_WITH_TRAINER
#include "commands.h"  // trainer/: msa train, eval, viz (builds with the torch layer)
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace msa::cli {

std::string strf(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  va_list ap2;
  va_copy(ap2, ap);
  int len = std::vsnprintf(nullptr, 0, fmt, ap);
  va_end(ap);
  std::string s(len > 0 ? size_t(len) : 0, '\0');
  if (len > 0) std::vsnprintf(s.data(), size_t(len) + 1, fmt, ap2);
  va_end(ap2);
  return s;
}

int run_info() {
  std::printf("msa %s (MiniMax Sparse Attention)\n", version());
  std::printf("backends: cpu%s\n", cuda_compiled() ? ", cuda" : " (this build has no CUDA backend)");
  std::printf("CUDA devices visible: %d\n", cuda_device_count());
#ifdef _OPENMP
  std::printf("OpenMP threads: %d\n", omp_get_max_threads());
#else
  std::printf("OpenMP threads: 1 (built without OpenMP)\n");
#endif
  return 0;
}

}  // namespace msa::cli

int main(int argc, char** argv) {
  using namespace msa::cli;
  CLI::App app{"msa: MiniMax Sparse Attention (CPU reference backend, CUDA backend for Hopper)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(msa::version()));

  app.add_subcommand("info", "Version, backends compiled in, GPUs visible, OpenMP threads");

  CheckOptions check;
  std::string backend = "cpu";
  auto* cmd_check = app.add_subcommand("check", "Randomized self-checks of a backend against reference formulas");
  cmd_check->add_option("--backend", backend, "Backend under test: cpu (vs naive float64 formulas) or cuda (vs cpu)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd_check->add_option("--cases", check.cases, "Number of random cases")
      ->check(CLI::Range(int64_t(1), int64_t(1000000)))
      ->capture_default_str();
  cmd_check->add_option("--seed", check.seed, "Seed; case i draws its inputs from (seed, i)")->capture_default_str();
  cmd_check->add_option("--only", check.only, "Run only case number I (to reproduce a failure)")
      ->check(CLI::NonNegativeNumber);
  cmd_check->add_flag("-v,--verbose", check.verbose, "Print every case, not only failures");

  DemoOptions demo;
  auto* cmd_demo = app.add_subcommand("demo", "MSA on a planted-needle example on the CPU");
  cmd_demo->add_option("--n", demo.n, "Tokens in the sequence")
      ->check(CLI::Range(int64_t(4096), int64_t(262144)))
      ->capture_default_str();
  cmd_demo->add_option("--seed", demo.seed, "Seed of the random inputs")->capture_default_str();
  cmd_demo->add_option("--threads", demo.threads, "CPU threads (0: all)")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();

  BenchOptions bench;
  auto* cmd_bench = app.add_subcommand("bench", "GPU benchmarks (CUDA builds with a GPU)");
  cmd_bench->require_subcommand(1);
  auto* cmd_prefill = cmd_bench->add_subcommand(
      "prefill", "One MSA layer at the M3 shape: index_topk, sparse and dense forward, block_topk");
  cmd_prefill->add_option("--n", bench.ns, "Sequence lengths, comma separated")
      ->delimiter(',')
      ->check(CLI::Range(int64_t(256), int64_t(1) << 22))
      ->capture_default_str();
  cmd_prefill->add_option("--selections", bench.selections, "Index inputs: random (Gaussian), planted (sink + local)")
      ->delimiter(',')
      ->check(CLI::IsMember({"random", "planted"}))
      ->capture_default_str();
  cmd_prefill->add_option("--iters", bench.iters, "Most timed runs per measurement (median reported)")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  cmd_prefill->add_option("--budget-s", bench.budget_s, "Rough seconds per measurement; slower calls run fewer times")
      ->check(CLI::Range(0.1, 3600.0))
      ->capture_default_str();
  cmd_prefill->add_option("--seed", bench.seed, "Seed of the random inputs")->capture_default_str();
  cmd_prefill->add_flag("!--no-block-topk", bench.block_topk, "Skip the standalone block_topk measurement");
  cmd_prefill->add_option("--out", bench.out, "Write OUT.json and OUT.md");
  cmd_prefill->add_option("--commit", bench.commit, "Commit to record (default: the one seen at configure time)");

  BenchTrainOptions bench_train;
  auto* cmd_train = cmd_bench->add_subcommand(
      "train", "One MSA layer's training step at the M3 shape: sparse and dense backward, KL backward, warm-up");
  cmd_train->add_option("--n", bench_train.ns, "Sequence lengths, comma separated")
      ->delimiter(',')
      ->check(CLI::Range(int64_t(256), int64_t(1) << 22))
      ->capture_default_str();
  cmd_train
      ->add_option("--selections", bench_train.selections, "Index inputs: planted (sink + local), random (Gaussian)")
      ->delimiter(',')
      ->check(CLI::IsMember({"random", "planted"}))
      ->capture_default_str();
  cmd_train->add_option("--iters", bench_train.iters, "Most timed runs per measurement (median reported)")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  cmd_train
      ->add_option("--budget-s", bench_train.budget_s, "Rough seconds per measurement; slower calls run fewer times")
      ->check(CLI::Range(0.1, 3600.0))
      ->capture_default_str();
  cmd_train->add_option("--seed", bench_train.seed, "Seed of the random inputs")->capture_default_str();
  cmd_train->add_flag("!--no-dense", bench_train.dense, "Skip the warm-up phase (dense forward + backward, full KL)");
  cmd_train->add_option("--out", bench_train.out, "Write OUT.json and OUT.md");
  cmd_train->add_option("--commit", bench_train.commit, "Commit to record (default: the one seen at configure time)");

  BenchDecodeOptions bench_decode;
  auto* cmd_decode = cmd_bench->add_subcommand(
      "decode", "One MSA layer's decode step at the M3 shape over a paged cache, against dense decode");
  cmd_decode->add_option("--contexts", bench_decode.contexts, "Cached tokens per request, comma separated")
      ->delimiter(',')
      ->check(CLI::Range(int64_t(128), int64_t(1) << 24))
      ->capture_default_str();
  cmd_decode->add_option("--batches", bench_decode.batches, "Requests per step, comma separated")
      ->delimiter(',')
      ->check(CLI::Range(int64_t(1), int64_t(1) << 16))
      ->capture_default_str();
  cmd_decode->add_option("--q-tokens", bench_decode.q_tokens, "Query tokens per request, comma separated")
      ->delimiter(',')
      ->check(CLI::Range(int64_t(1), int64_t(64)))
      ->capture_default_str();
  cmd_decode->add_option("--index-keys", bench_decode.index_keys,
                         "Index-key cache formats, comma separated (bf16: native, fp8: e4m3 + a scale per token)")
      ->delimiter(',')
      ->check(CLI::IsMember({"bf16", "fp8"}))
      ->capture_default_str();
  cmd_decode->add_flag("!--no-largest-batch", bench_decode.largest_batch,
                       "Skip the largest batch that fits at the longest context");
  cmd_decode->add_option("--iters", bench_decode.iters, "Most timed runs per measurement (median reported)")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  cmd_decode->add_option("--budget-s", bench_decode.budget_s, "Rough seconds per measurement")
      ->check(CLI::Range(0.1, 3600.0))
      ->capture_default_str();
  cmd_decode->add_option("--seed", bench_decode.seed, "Seed of the random inputs")->capture_default_str();
  cmd_decode->add_option("--out", bench_decode.out, "Write OUT.json and OUT.md");
  cmd_decode->add_option("--commit", bench_decode.commit, "Commit to record (default: the one seen at configure time)");

#ifdef MSA_WITH_TRAINER
  msa::train::Commands trainer;
  msa::train::add_commands(app, trainer);
#else
  const char* trainer_cmds[] = {"train", "eval", "viz", "generate"};
  for (const char* name : trainer_cmds)
    app.add_subcommand(name, "(needs the torch layer: not in this build)")->allow_extras()->prefix_command();
#endif

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // Help and --version exit 0; every malformed request exits 2.
    return app.exit(e) == 0 ? 0 : 2;
  }

  try {
    if (app.got_subcommand("info")) return run_info();
    if (app.got_subcommand("check")) {
      check.backend = backend == "cuda" ? msa::Backend::cuda : msa::Backend::cpu;
      if (check.only >= check.cases) {
        std::fprintf(stderr, "msa check: --only %lld is not below --cases %lld\n", (long long)check.only,
                     (long long)check.cases);
        return 2;
      }
      return run_check(check);
    }
    if (app.got_subcommand("demo")) return run_demo(demo);
#ifdef MSA_WITH_TRAINER
    if (int rc = msa::train::dispatch(trainer); rc >= 0) return rc;
#else
    for (const char* name : trainer_cmds) {
      if (!app.got_subcommand(name)) continue;
      std::fprintf(stderr,
                   "msa %s: this build has no trainer; install torch (bash scripts/setup_torch.sh) and rebuild with "
                   "the torch layer (-DMSA_BUILD_TORCH=ON)\n",
                   name);
      return 2;
    }
#endif
    if (app.got_subcommand("bench")) {
#ifdef MSA_WITH_CUDA
      bench.command = "msa";
      for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        bench.command += a.find_first_of(" \t'\"") == std::string::npos ? " " + a : " '" + a + "'";
      }
      if (cmd_train->parsed()) {
        bench_train.command = bench.command;
        return run_bench_train(bench_train);
      }
      if (cmd_decode->parsed()) {
        bench_decode.command = bench.command;
        return run_bench_decode(bench_decode);
      }
      return run_bench_prefill(bench);
#else
      std::fprintf(stderr,
                   "msa bench: this build of msa has no CUDA backend (configure with -DMSA_WITH_CUDA=ON and a CUDA "
                   "toolkit); the benchmarks run on a GPU only\n");
      return 2;
#endif
    }
  } catch (const msa::Error& e) {
    std::fprintf(stderr, "msa: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "msa: unexpected error: %s\n", e.what());
    return 1;
  }
  return 2;
}
