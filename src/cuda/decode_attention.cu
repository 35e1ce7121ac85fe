// decode_attention.cu — CUDA sparse (and dense) decode attention over the paged K/V cache.
// Placeholder until the kernel lands.
#include <stdexcept>

#include "decode.h"

namespace msa::cuda {

size_t plan_decode_attention(DecodePlan& plan) {
  plan.attention_split = 0;
  return 0;
}

void run_decode_attention(const DecodeAttentionParams&, const DecodePlan&, void*, cudaStream_t) {
  throw std::runtime_error("msa::decode_attention: the CUDA kernel is not built yet");
}

}  // namespace msa::cuda
