// trainer/commands.cpp — command-line options of msa train, eval, viz and generate (CLI11), built
// into the msa tool when the trainer is.
#include "commands.h"

#include <CLI/CLI.hpp>

namespace msa::train {

void add_commands(CLI::App& app, Commands& c) {
  TrainOptions& t = c.train;
  auto* tr =
      app.add_subcommand("train", "Train a small LM: dense, or with MSA (msa-pt from scratch, msa-cpt from dense)");
  c.train_cmd = tr;
  tr->add_option("--config", t.config, "Named configuration: tiny (CPU), gpu-40m-16k, gpu-40m-32k")
      ->check(CLI::IsMember({"tiny", "gpu-40m-16k", "gpu-40m-32k"}))
      ->capture_default_str();
  tr->add_option("--route", t.route,
                 "dense | msa-pt (warm-up, then sparse) | msa-cpt (convert --init, warm-up, sparse)")
      ->check(CLI::IsMember({"dense", "msa-pt", "msa-cpt"}))
      ->capture_default_str();
  tr->add_option("--out", t.out, "Run folder: metrics.jsonl, checkpoints, log")->capture_default_str();
  tr->add_option("--init", t.init, "msa-cpt: the dense checkpoint to start from");
  tr->add_option("--resume", t.resume, "Continue this run from a checkpoint (exact: data position, optimizer, RNG)");
  tr->add_option("--corpus", t.corpus, "Text file or folder (default: the built-in text)");
  tr->add_option("--device", t.device, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  tr->add_option("--seed", t.seed, "Seed of the initialisation and the data order")->capture_default_str();
  tr->add_option("--data-seed", t.data_seed, "Seed of the data order alone (default: --seed)");
  tr->add_flag("--continue-schedule", t.continue_schedule,
               "msa-cpt: continue the --init run where it stopped (its step, LR schedule, data position and the "
               "LM's AdamW moments; the index starts fresh and the warm-up counts from there)");
  tr->add_option("--threads", t.threads, "CPU threads (0: torch's default); fix it for bitwise reruns")
      ->check(CLI::Range(0, 4096));
  tr->add_option("--steps", t.steps, "Optimizer steps (default: the config's)")->check(CLI::PositiveNumber);
  tr->add_option("--batch", t.batch, "Sequences per step")->check(CLI::PositiveNumber);
  tr->add_option("--seq-len", t.seq_len, "Tokens per sequence")->check(CLI::Range(int64_t(64), int64_t(1) << 22));
  tr->add_option("--warmup-tokens", t.warmup_tokens, "T_warm: tokens of indexer warm-up (msa routes)")
      ->check(CLI::NonNegativeNumber);
  tr->add_option("--lr", t.lr, "Peak learning rate")->check(CLI::PositiveNumber);
  tr->add_option("--index-lr", t.index_lr, "Peak learning rate of the index projections (default: --lr)")
      ->check(CLI::PositiveNumber);
  tr->add_option("--kl-lambda", t.kl_lambda, "Weight of the KL term")->check(CLI::NonNegativeNumber);
  tr->add_option("--retrieval-fraction", t.retrieval_fraction, "Share of retrieval documents in the mix")
      ->check(CLI::Range(0.0, 1.0));
  tr->add_option("--topk", t.topk, "Blocks kept per (query, group)")->check(CLI::Range(1, 32));
  tr->add_option("--dense-layers", t.dense_layers, "First L layers stay dense")->check(CLI::NonNegativeNumber);
  tr->add_option("--log-every", t.log_every, "Steps between metrics lines")->check(CLI::PositiveNumber);
  tr->add_option("--save-every", t.save_every, "Steps between checkpoints (0: only the final one)")
      ->check(CLI::NonNegativeNumber);
  tr->add_option("--eval-every", t.eval_every, "Steps between validation losses in the metrics (0: only at the end)")
      ->check(CLI::NonNegativeNumber);
  tr->add_option("--valid-samples", t.valid_samples, "Validation sequences at the end")->check(CLI::NonNegativeNumber);
  tr->add_option("--stop-at", t.stop_at, "Stop with a checkpoint after this step (an interrupted run)")
      ->check(CLI::PositiveNumber);
  tr->add_flag("-q,--quiet", t.quiet, "No progress line");

  EvalOptions& e = c.eval;
  auto* ev = app.add_subcommand(
      "eval", "Validation loss, retrieval accuracy and selection recall of checkpoints, side by side");
  c.eval_cmd = ev;
  ev->add_option("checkpoints", e.checkpoints, "Checkpoints (final.ckpt of msa train runs)")->required();
  ev->add_option("--corpus", e.corpus, "Text file or folder (default: the built-in text)");
  ev->add_option("--device", e.device, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  ev->add_option("--threads", e.threads, "CPU threads (0: torch's default)")->check(CLI::Range(0, 4096));
  ev->add_option("--valid-samples", e.valid_samples, "Validation sequences")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  ev->add_option("--seq-len", e.seq_len, "Validation length (default: the training length)")
      ->check(CLI::Range(int64_t(64), int64_t(1) << 22));
  ev->add_option("--contexts", e.contexts, "Retrieval context lengths (default: seq_len/2, seq_len)")
      ->delimiter(',')
      ->check(CLI::Range(int64_t(256), int64_t(1) << 22));
  ev->add_option("--depths", e.depths, "Needle depths in [0, 1]")
      ->delimiter(',')
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  ev->add_option("--tasks", e.tasks, "Retrieval tasks, comma separated, or all")->capture_default_str();
  ev->add_option("--cases", e.cases, "Cases per (task, context, depth)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  ev->add_option("--recall-queries", e.recall_queries, "Selection recall over the last this many queries")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  ev->add_option("--mode", e.mode, "auto (MSA checkpoints sparse, dense ones dense) | dense | sparse")
      ->check(CLI::IsMember({"auto", "dense", "sparse"}))
      ->capture_default_str();
  ev->add_option("--json", e.json, "Also write the results as JSON here");
  ev->add_option("--seed", e.seed, "Seed of the retrieval cases")->capture_default_str();

  VizOptions& v = c.viz;
  auto* vz = app.add_subcommand("viz", "PNG pictures: selected-block heat-map of a checkpoint, metric curves of a run");
  c.viz_cmd = vz;
  vz->require_subcommand(1);
  auto* hm = vz->add_subcommand("heatmap", "Key blocks selected per query for one layer and KV head");
  hm->add_option("checkpoint", v.input, "An MSA checkpoint")->required();
  hm->add_option("--out", v.out, "PNG file")->required();
  hm->add_option("--layer", v.layer, "Layer (default: the first MSA layer)")->check(CLI::NonNegativeNumber);
  hm->add_option("--group", v.group, "KV head")->check(CLI::NonNegativeNumber)->capture_default_str();
  hm->add_option("--seq-len", v.seq_len, "Sample length (default: the training length)")
      ->check(CLI::Range(int64_t(256), int64_t(1) << 22));
  hm->add_option("--sample", v.sample, "Validation sample index")->check(CLI::NonNegativeNumber);
  hm->add_option("--task", v.task, "text, or a retrieval task (needle at depth 0.5)")->capture_default_str();
  hm->add_option("--corpus", v.corpus, "Text file or folder (default: the built-in text)");
  hm->add_option("--device", v.device, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  hm->add_option("--threads", v.threads, "CPU threads (0: torch's default)")->check(CLI::Range(0, 4096));
  auto* cv = vz->add_subcommand("curves", "Loss / KL / LR curves from a metrics.jsonl");
  cv->add_option("metrics", v.inputs, "metrics.jsonl of one or more runs (several: drawn together, named by run folder)")
      ->required();
  cv->add_option("--out", v.out, "PNG file")->required();
  cv->add_option("--keys", v.keys, "Metric keys (default: lm_loss, kl, val_loss, lr)")->delimiter(',');

  GenerateOptions& g = c.generate;
  auto* gn =
      app.add_subcommand("generate", "Continue a prompt with a checkpoint: prefill, then decode over the KV cache");
  c.generate_cmd = gn;
  gn->add_option("checkpoint", g.checkpoint, "A checkpoint (final.ckpt of an msa train run)")->required();
  gn->add_option("--prompt", g.prompt, "Prompt text (byte tokens after <bos>)")->required();
  gn->add_option("--tokens", g.tokens, "New tokens at most")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20))
      ->capture_default_str();
  gn->add_option("--temperature", g.temperature, "Sampling temperature (0: greedy)")
      ->check(CLI::Range(0.0, 100.0))
      ->capture_default_str();
  gn->add_option("--seed", g.seed, "Seed of the sampling")->capture_default_str();
  gn->add_option("--mode", g.mode, "auto (MSA checkpoints sparse, dense ones dense) | dense | sparse")
      ->check(CLI::IsMember({"auto", "dense", "sparse"}))
      ->capture_default_str();
  gn->add_option("--index-cache", g.index_cache,
                 "Index-key cache of the MSA layers in sparse mode: bf16 (the attention dtype; the model's dtype on "
                 "the CPU) | fp8 (float8_e4m3fn + a float32 scale per token: half the bytes the decode index pass "
                 "reads, approximate selection)")
      ->check(CLI::IsMember({"bf16", "fp8"}))
      ->capture_default_str();
  gn->add_flag("!--no-stop", g.stop_at_eos, "Do not stop at <eos>");
  gn->add_flag("--echo", g.echo, "Print the prompt before the continuation");
  gn->add_option("--device", g.device, "cpu | cuda")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  gn->add_option("--threads", g.threads, "CPU threads (0: torch's default)")->check(CLI::Range(0, 4096));
}

int dispatch(const Commands& c) {
  if (c.train_cmd && c.train_cmd->parsed()) return run_train(c.train);
  if (c.eval_cmd && c.eval_cmd->parsed()) return run_eval(c.eval);
  if (c.generate_cmd && c.generate_cmd->parsed()) return run_generate(c.generate);
  if (c.viz_cmd && c.viz_cmd->parsed()) {
    VizOptions v = c.viz;
    v.what = c.viz_cmd->get_subcommand("heatmap")->parsed() ? "heatmap" : "curves";
    return run_viz(v);
  }
  return -1;
}

}  // namespace msa::train
