// block_topk.h — the CUDA sm_90 launcher of msa::block_topk (internal): exact top-k over rows of
// float32 block scores, one warp per row (a CTA per row for few long rows). For
// src/index_api.cpp and the benchmark.
#pragma once

#include <cuda_runtime.h>

#include "msa/index.h"

namespace msa::cuda {

// p arrives validated (src/index_api.cpp) with stride_row resolved and rows > 0; p.scores,
// p.row_blocks and p.topk_idx are device pointers. row_blocks entries are clamped to
// [0, n_blocks] in the kernel. Asynchronous on stream; throws std::runtime_error when the launch
// fails.
void run_block_topk(const BlockTopkParams& p, cudaStream_t stream);

}  // namespace msa::cuda
