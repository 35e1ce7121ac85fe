// decode_index.cu — the CUDA decode index pass (scores against the paged index-key cache, block
// max, top-k with the own block forced). Placeholder until the kernel lands.
#include <stdexcept>

#include "decode.h"

namespace msa::cuda {

size_t plan_decode_index(DecodePlan& plan) {
  plan.index_split = 0;
  return 0;
}

void run_decode_index_topk(const DecodeIndexParams&, const DecodePlan&, void*, cudaStream_t) {
  throw std::runtime_error("msa::decode_index_topk: the CUDA kernel is not built yet");
}

}  // namespace msa::cuda
