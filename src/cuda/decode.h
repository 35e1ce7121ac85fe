// decode.h — entry points of the CUDA decode kernels (append to the paged cache, the decode index
// pass, sparse decode attention), called by src/decode_api.cpp on Backend::cuda.
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "msa/decode.h"

namespace msa::cuda {

// Every params struct arrives validated for shapes by decode_api.cpp (strides and scales
// resolved); every pointer, seq_lens, block_table and cu arrays included, is device memory whose
// contents are never read on the host. Kernels clamp what those arrays hold so that no access
// leaves the tensors. All calls are asynchronous on stream, allocate nothing and are capturable.

// Index pass (decode_index.cu). plan_decode_index fills plan.index_split and returns the bytes of
// workspace the index pass needs for plan.shape; the run call uses workspace + plan.index_workspace_offset.
size_t plan_decode_index(DecodePlan& plan);
void run_decode_index_topk(const DecodeIndexParams& p, const DecodePlan& plan, void* workspace, cudaStream_t stream);

// Attention (decode_attention.cu). Same pattern with plan.attention_split and
// plan.attention_workspace_offset.
size_t plan_decode_attention(DecodePlan& plan);
void run_decode_attention(const DecodeAttentionParams& p, const DecodePlan& plan, void* workspace,
                          cudaStream_t stream);

// Append (decode_append.cu): no workspace.
void run_append_kv(const AppendKvParams& p, cudaStream_t stream);

// Stream-ordered scratch for the convenience (unplanned) forms (decode_append.cu); throws
// std::runtime_error when the allocation fails.
void* scratch_alloc(size_t bytes, cudaStream_t stream);
void scratch_free(void* ptr, cudaStream_t stream);

}  // namespace msa::cuda
