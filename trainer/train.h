// trainer/train.h — pieces of msa train shared with msa eval / viz and the tests: the run's
// configuration after command-line overrides, checkpoints (exact resume), batches from the data
// stream, the learning-rate schedule and the attention mode of a step.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "commands.h"
#include "data.h"
#include "model.h"

namespace msa::train {

enum class Route { dense, msa_pt, msa_cpt };
Route parse_route(const std::string& s);  // throws msa::Error naming the expected values
const char* route_name(Route r);

// The named config with the options' overrides applied; for msa routes warmup_tokens defaults to
// 20% of the run's tokens.
TrainConfig resolve_config(const TrainOptions& o);

// Everything a run needs to continue bit for bit: parameters, AdamW moments, the step (the data
// position is step * batch: the stream is a pure function of the sample index), the CPU
// generator's state, and the configuration it was trained with.
struct Checkpoint {
  TrainConfig cfg;
  Route route = Route::dense;
  uint64_t seed = 1;
  uint64_t data_seed = 1;  // of the training data order (= seed unless --data-seed said otherwise)
  int64_t step = 0;    // optimizer steps done
  // Tokens seen when this route began: 0, or the dense run's tokens for an msa-cpt run that
  // continues the dense schedule (--continue-schedule); the warm-up counts from here.
  int64_t route_start_tokens = 0;
  int64_t tokens = 0;  // training tokens seen
  std::string corpus;  // Corpus::load argument
  std::vector<std::pair<std::string, at::Tensor>> params, adam_m, adam_v;
  at::Tensor rng_state;  // CPU generator state (uint8)
};
// Binary format: a text header of key=value lines ending in "end\n", then per tensor its name,
// dtype, sizes and raw little-endian bytes. Throws msa::Error naming the file on any problem.
void save_checkpoint(const std::string& path, const Checkpoint& c);
Checkpoint load_checkpoint(const std::string& path, bool with_optimizer = true);

// The model of a checkpoint on a device (parameters copied in, requires_grad set). With
// index_optional, index parameters the checkpoint lacks keep their fresh initialisation.
LM model_from_checkpoint(const Checkpoint& c, at::Device device, bool index_optional = false);

// The validation stream: plain text of the valid split, one fixed seed, so every run and
// checkpoint is measured on the same sequences whatever its training seed.
constexpr uint64_t kValidSeed = 20261126;
data::Stream validation_stream(const data::Corpus& corpus, int64_t seq_len);

// inputs int64 [batch * seq_len], targets int64 [same], cu_seqlens int32 [batch + 1], and the
// answer mask (uint8, 1 at retrieval answer targets).
struct Batch {
  at::Tensor inputs, targets, cu_seqlens, answer_mask;
};
Batch make_batch(const std::vector<data::Sample>& samples, at::Device device);
Batch make_batch(const data::Stream& stream, int64_t first_index, int64_t batch, at::Device device);

double lr_at(const TrainConfig& c, int64_t step, double peak);  // linear warm-up, cosine to min_lr_ratio
AttnMode mode_at(Route r, int64_t tokens_before_step, int64_t warmup_tokens);

at::Device parse_device(const std::string& s);  // cpu | cuda; throws when CUDA is unavailable
void set_threads(int threads);                  // 0 keeps torch's default

// Validation loss of a model over `samples` sequences of the valid split: mean over all targets,
// and over the last `tail` targets of each sequence.
struct ValidLoss {
  double all = 0, tail = 0;
  int64_t tail_tokens = 0;
};
ValidLoss validation_loss(const LM& model, const data::Stream& valid, int64_t samples, AttnMode mode, int64_t tail);

// Runs a command body; msa::Error and torch errors are printed as "msa CMD: message" (torch's
// without its C++ backtrace) and give exit code 1.
int report_errors(const char* cmd, const std::function<int()>& body);

}  // namespace msa::train
