// index_topk.h — entry point of the CUDA index branch (fused index scores, causal block max and
// top-k selection, MSA_SPEC "Index branch"), called by src/index_api.cpp on Backend::cuda.
#pragma once

#include <cuda_runtime_api.h>

#include "msa/index.h"

namespace msa::cuda {

// p arrives validated by index_api.cpp for shapes only (strides and index_scale resolved,
// d_idx and bk in {64, 128}, 1 <= topk <= 32, n_q > 0). Every pointer, the varlen arrays
// included, is device memory; their contents are never read on the host, and the kernel clamps
// whatever they hold so that no access leaves the tensors. block_scores entries with
// b >= p.n_blocks are not written. Asynchronous on stream; throws msa::Error for shapes the
// kernel cannot tile and std::runtime_error for CUDA failures.
void run_index_topk(const IndexTopkParams& p, cudaStream_t stream);

}  // namespace msa::cuda
