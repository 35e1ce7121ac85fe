// recall.h — the CUDA sm_90 path of msa::selection_recall (internal), for src/recall_api.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include "msa/index.h"

namespace msa::cuda {

// p arrives validated (src/recall_api.cpp): bf16, d in {64, 128}, h_q / h_kv in {1, 2, 4, 8, 16},
// strides and scale resolved, n_q > 0. Every pointer is device memory (q, k, the varlen arrays,
// topk_idx, the optional per-row outputs); the kernels clamp the varlen contents, and entries of
// topk_idx that are not visible blocks never match a block (they are compared, never dereferenced).
// Waits for the stream: the means are returned on the host.
SelectionRecall run_selection_recall(const SelectionRecallParams& p, cudaStream_t stream);

}  // namespace msa::cuda
