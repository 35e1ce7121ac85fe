// trainer/generate.h — text generation with the trainer's LM over its paged KV cache: prefill the
// prompt with the forward, then decode one token at a time (LM::prefill / LM::decode_step),
// greedy or temperature sampling with a seed. msa generate is built on it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "model.h"

namespace msa::train {

struct SampleConfig {
  int64_t max_new = 64;      // tokens to generate at most
  double temperature = 0.0;  // 0: greedy (argmax); > 0: softmax(logits / temperature)
  uint64_t seed = 1;         // of the sampling generator
  int64_t vocab_limit = -1;  // tokens >= this are never produced (< 0: the whole vocabulary)
  int64_t stop_token = -1;   // generation ends after producing it (< 0: never)
  bool keep_logits = false;  // return the logits each new token was drawn from
};

struct Generation {
  std::vector<int64_t> tokens;  // the new tokens
  // With keep_logits: [tokens.size(), vocab] float (f64 for an f64 model); row i is the
  // distribution token i was drawn from (the prompt's last row for i = 0, then decode steps).
  at::Tensor logits;
  double prefill_s = 0, decode_s = 0;  // wall time of the prefill and of all decode steps
};

// mode: sparse (MSA layers select blocks) or dense. The prompt must not be empty. index: how the
// cache stores the index keys (IndexCache::fp8 only matters in sparse mode).
Generation generate(const LM& model, const std::vector<int64_t>& prompt, AttnMode mode, const SampleConfig& s,
                    IndexCache index = IndexCache::native);

}  // namespace msa::train
