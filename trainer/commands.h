// trainer/commands.h — the trainer's subcommands of the msa tool (msa train, eval, viz, generate):
// their options and entry points. Torch-free, so the command-line parser (commands.cpp, built
// into the msa tool) does not compile LibTorch headers. docs/trainer.md documents the commands.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace msa::train {

struct TrainOptions {
  std::string config = "tiny";   // named configuration (model.h named_config)
  std::string route = "msa-pt";  // dense | msa-pt | msa-cpt
  std::string out = "runs/run";  // folder: metrics.jsonl, step-N.ckpt, final.ckpt, log.txt
  std::string init;              // msa-cpt: the dense checkpoint to convert
  std::string resume;            // a checkpoint of this run to continue exactly
  std::string corpus;            // text file or folder (data.h Corpus::load); empty = built-in
  std::string device = "cpu";    // cpu | cuda
  uint64_t seed = 1;             // model init and data order
  int64_t data_seed = -1;        // data order only (< 0: seed), so seeds can vary the init alone
  bool continue_schedule = false;  // msa-cpt: keep the dense run's step, LR schedule, data position, LM Adam state
  int threads = 0;               // CPU threads (0: torch's default); fix it for bitwise reruns
  // Overrides of the named configuration; < 0 (or empty) keeps the config's value.
  int64_t steps = -1, batch = -1, seq_len = -1, warmup_tokens = -1, log_every = -1, save_every = -1;
  int64_t eval_every = -1;
  int64_t valid_samples = -1, topk = -1, dense_layers = -1;
  double lr = -1, index_lr = -1, kl_lambda = -1, retrieval_fraction = -1;
  int64_t stop_at = -1;  // stop (with a checkpoint) after this many steps, as an interrupted run
  bool quiet = false;    // no progress line
};

struct EvalOptions {
  std::vector<std::string> checkpoints;  // compared side by side
  std::string corpus;
  std::string device = "cpu";
  int threads = 0;
  int64_t valid_samples = 8;
  int64_t seq_len = -1;           // validation length; < 0: each checkpoint's training length
  std::vector<int64_t> contexts;  // retrieval context lengths; empty: seq_len / 2 and seq_len
  std::vector<double> depths = {0.0, 0.25, 0.5, 0.75, 1.0};
  std::string tasks = "niah_single,niah_multikey,mqar";
  int64_t cases = 2;              // retrieval cases per (task, context, depth)
  int64_t recall_queries = 2048;  // recall over the last this many queries of the sample
  std::string mode = "auto";      // auto (dense ckpt: dense, MSA ckpt: sparse) | dense | sparse
  std::string json;               // also write the results here
  uint64_t seed = 7;
};

struct VizOptions {
  std::string what;   // heatmap | curves
  std::string input;  // heatmap: a checkpoint; curves: a metrics.jsonl
  std::vector<std::string> inputs;  // curves: one or more metrics.jsonl (empty: input)
  std::string out;    // PNG path
  std::string corpus;
  int64_t layer = -1;             // heatmap: layer (default: the first MSA layer)
  int64_t group = 0;              // heatmap: KV head
  int64_t seq_len = -1;           // heatmap: sample length (default: the training length)
  int64_t sample = 0;             // heatmap: validation sample index
  std::string task = "text";      // heatmap: text or a retrieval task (a needle case at depth 0.5)
  std::vector<std::string> keys;  // curves: metric keys (default: lm_loss, val_loss, kl, lr)
  std::string device = "cpu";     // heatmap: where the forward runs
  int threads = 0;
};

struct GenerateOptions {
  std::string checkpoint;
  std::string prompt;          // text; the model sees kBos then its bytes
  int64_t tokens = 64;         // new tokens at most
  double temperature = 0.0;    // 0: greedy
  uint64_t seed = 1;           // of the sampling
  std::string mode = "auto";   // auto (dense ckpt: dense, MSA ckpt: sparse) | dense | sparse
  std::string index_cache = "bf16";  // bf16 (the attention dtype) | fp8 (float8_e4m3fn + a scale per token)
  bool stop_at_eos = true;     // end at the end-of-document token
  bool echo = false;           // print the prompt before the continuation
  std::string device = "cpu";  // cpu | cuda (CUDA needs a build with MSA_WITH_CUDA and the torch CUDA wheel)
  int threads = 0;
};

int run_train(const TrainOptions& o);
int run_eval(const EvalOptions& o);
int run_viz(const VizOptions& o);
int run_generate(const GenerateOptions& o);

// The parser side, used by the msa tool: registers the subcommands on app, then dispatch() runs
// the one that was given (returns its exit code), or returns -1 when none of them was.
struct Commands {
  TrainOptions train;
  EvalOptions eval;
  VizOptions viz;
  GenerateOptions generate;
  CLI::App* train_cmd = nullptr;
  CLI::App* eval_cmd = nullptr;
  CLI::App* viz_cmd = nullptr;
  CLI::App* generate_cmd = nullptr;
};
void add_commands(CLI::App& app, Commands& c);
int dispatch(const Commands& c);

}  // namespace msa::train
