// trainer/generate.cpp — generation over the KV cache (generate.h) and msa generate.
#include "generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <chrono>
#include <cstdio>
#include <limits>

#include "commands.h"
#include "data.h"
#include "msa/common.h"
#include "train.h"

namespace msa::train {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Sampling runs on the CPU in float64 so a seed gives the same tokens whatever the device.
int64_t pick(const at::Tensor& logits_row, const SampleConfig& s, at::Generator& gen) {
  at::Tensor z = logits_row.to(at::kCPU, at::kDouble).flatten().clone();
  if (s.vocab_limit >= 0 && s.vocab_limit < z.size(0))
    z.narrow(0, s.vocab_limit, z.size(0) - s.vocab_limit).fill_(-std::numeric_limits<double>::infinity());
  if (s.temperature <= 0) return z.argmax().item<int64_t>();
  at::Tensor prob = at::softmax(z / s.temperature, 0);
  return at::multinomial(prob, 1, false, gen).item<int64_t>();
}

}  // namespace

Generation generate(const LM& model, const std::vector<int64_t>& prompt, AttnMode mode, const SampleConfig& s,
                    IndexCache index) {
  if (prompt.empty()) throw Error("msa generate: empty prompt, expected at least one token");
  if (s.max_new < 0) throw Error("msa generate: max_new = " + std::to_string(s.max_new) + ", expected >= 0");
  at::NoGradGuard ng;
  Generation g;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(s.seed);
  const int64_t n = int64_t(prompt.size());
  KvCache cache = model.new_cache(n + std::max<int64_t>(s.max_new, 1), mode, index);
  std::vector<at::Tensor> rows;
  auto t0 = std::chrono::steady_clock::now();
  at::Tensor last = model.prefill(at::tensor(prompt, at::kLong).to(model.device()), cache).narrow(0, n - 1, 1);
  g.prefill_s = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < s.max_new; ++i) {
    if (s.keep_logits) rows.push_back(last.to(at::kCPU));
    const int64_t tok = pick(last, s, gen);
    g.tokens.push_back(tok);
    if (tok == s.stop_token || i + 1 == s.max_new) break;
    last = model.decode_step(at::full({1}, tok, at::kLong).to(model.device()), cache);
  }
  g.decode_s = seconds_since(t0);
  if (s.keep_logits && !rows.empty()) g.logits = at::cat(rows, 0);
  return g;
}

int run_generate(const GenerateOptions& o) {
  return report_errors("generate", [&] {
    set_threads(o.threads);
    const at::Device device = parse_device(o.device);
    Checkpoint ck = load_checkpoint(o.checkpoint, false);
    LM model = model_from_checkpoint(ck, device);
    AttnMode mode = ck.route == Route::dense ? AttnMode::dense : AttnMode::sparse;
    if (o.mode == "dense") mode = AttnMode::dense;
    if (o.mode == "sparse") {
      if (ck.route == Route::dense)
        throw Error("msa generate: --mode sparse, but " + o.checkpoint + " is a dense checkpoint (no trained index)");
      mode = AttnMode::sparse;
    }
    std::vector<int64_t> prompt{data::kBos};
    for (int32_t t : data::encode(o.prompt)) prompt.push_back(t);
    SampleConfig s;
    s.max_new = o.tokens;
    s.temperature = o.temperature;
    s.seed = o.seed;
    s.vocab_limit = data::kVocab;  // the padding rows of the embedding were never targets
    s.stop_token = o.stop_at_eos ? data::kEos : -1;
    const IndexCache index = o.index_cache == "fp8" ? IndexCache::fp8 : IndexCache::native;
    Generation g = generate(model, prompt, mode, s, index);
    std::vector<int32_t> out(g.tokens.begin(), g.tokens.end());
    const std::string text = (o.echo ? o.prompt : std::string()) + data::decode(out);
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fputc('\n', stdout);
    const int64_t steps = int64_t(g.tokens.size()) - 1;
    // What the index-key cache held: the native one is the attention dtype (float on the CPU).
    std::string index_desc = "no";
    if (mode == AttnMode::sparse)
      index_desc = index == IndexCache::fp8                                ? "fp8"
                   : device.is_cuda()                                      ? "bf16"
                   : model.params()[0].second.scalar_type() == at::kDouble ? "float64"
                                                                           : "float32";
    std::fprintf(stderr,
                 "msa generate: %s attention, %s index cache, prompt %lld tokens (prefill %.3f s), %lld new tokens "
                 "(%.1f ms/token)\n",
                 mode_name(mode), index_desc.c_str(), (long long)prompt.size(), g.prefill_s, (long long)g.tokens.size(),
                 steps > 0 ? 1e3 * g.decode_s / double(steps) : 0.0);
    return 0;
  });
}

}  // namespace msa::train
