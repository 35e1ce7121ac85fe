// dense_fwd.h — entry point of the CUDA dense causal GQA attention forward (MSA_SPEC "Main
// branch" with every visible key selected: the warm-up phase and rows that see <= topk blocks),
// called by src/attention_api.cpp on Backend::cuda.
#pragma once

#include <cuda_runtime_api.h>

#include "msa/attention.h"

namespace msa::cuda {

// How the two consumer warpgroups of a CTA share the tensor cores: each on its own, overlapping
// its softmax with its own P V GEMM (overlap), or additionally taking turns to issue GEMMs so that
// one's softmax runs under the other's GEMMs (pingpong); one CTA per query tile. persistent and
// persistent_pingpong run the same in at most one CTA per SM that takes query tiles from an atomic
// counter and loads the next tile's Q and K/V while finishing the current one (they need 16-byte
// aligned q rows and strides; other q layouts run overlap / pingpong). Speed only: the outputs are
// bitwise the same. All stay compiled so that benchmarks and tests can compare them. automatic
// picks by head dim what measured fastest (docs/dense_attention.md): persistent_pingpong at d = 64
// (the exposed softmax is hidden under the other warpgroup's GEMMs), persistent at d = 128.
enum class DenseSchedule { overlap, pingpong, persistent, persistent_pingpong, automatic };
constexpr DenseSchedule kDenseDefaultSchedule = DenseSchedule::automatic;

// p arrives validated by attention_api.cpp for shapes only (strides and scale resolved, d in
// {64, 128}, h_q / h_kv in {1, 2, 4, 8, 16}, topk_idx null, n_q > 0). Every pointer, the varlen
// arrays included, is device memory; their contents are never read on the host, and the kernel
// clamps whatever they hold so that no access leaves the tensors. Asynchronous on stream; throws
// std::runtime_error for CUDA failures and shapes the grid cannot hold.
void run_dense_fwd(const AttentionParams& p, cudaStream_t stream, DenseSchedule schedule = kDenseDefaultSchedule);

}  // namespace msa::cuda
