// block_topk.cu — instantiates the block top-k kernel (block_topk.cuh) and defines its launcher.
#include "block_topk.cuh"

namespace msa::cuda {

void run_block_topk(const BlockTopkParams& p, cudaStream_t stream) { topk::launch(p, stream); }

}  // namespace msa::cuda
