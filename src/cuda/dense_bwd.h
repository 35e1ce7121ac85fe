// dense_bwd.h — entry point of the CUDA dense causal GQA attention backward (dq, dk, dv of the
// dense forward, MSA_SPEC "Main branch"), called by src/attention_api.cpp on Backend::cuda.
#pragma once

#include <cuda_runtime_api.h>

#include "msa/attention.h"

namespace msa::cuda {

// How the main kernel adds its dq partials into the fp32 accumulator: one TMA bulk reduce-add per
// 64 x 64 tile staged in shared memory (tma_reduce), 8-byte red.global.add from registers (atomic),
// or plain adds in key-tile order, one key tile at a time per query tile (ordered: bitwise
// repeatable, slower). The first two sum the same partials in an order that varies from run to
// run. All stay compiled so that the benchmark and the tests can compare them.
enum class DenseBwdDq { tma_reduce, atomic, ordered };
constexpr DenseBwdDq kDenseBwdDefaultDq = DenseBwdDq::tma_reduce;

// p arrives validated by attention_api.cpp for shapes only (strides and scale resolved, d in
// {64, 128}, h_q / h_kv in {1, 2, 4, 8, 16}, topk_idx null, not both n_q and n_k zero). Every
// pointer, the varlen arrays included, is device memory; their contents are never read on the
// host and the kernels clamp whatever they hold. Allocates its workspace (fp32 dq accumulator,
// per-row lse and rowsum(do * o)) stream-ordered on `stream` and frees it the same way.
// p.deterministic selects DenseBwdDq::ordered whatever dq_mode says (dk and dv are summed in a
// fixed order in registers in every mode). Asynchronous; throws std::runtime_error for CUDA
// failures and shapes the grid cannot hold.
void run_dense_bwd(const AttentionBwdParams& p, cudaStream_t stream, DenseBwdDq dq_mode = kDenseBwdDefaultDq);

}  // namespace msa::cuda
