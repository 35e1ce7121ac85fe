// sparse_bwd.h — entry point of the CUDA sm_90a sparse attention backward (MSA_SPEC "Main branch",
// backward: dq, dk, dv over the selected blocks), called by src/attention_api.cpp on Backend::cuda
// and by bench/bench_sparse_bwd.cu. KV-outer over the forward's reverse index; design and numbers:
// docs/sparse_backward.md.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "msa/attention.h"

namespace msa::cuda {

// Knobs for tests and measurements; the defaults are what the public API runs.
struct SparseBwdOptions {
  int64_t chunk_queries = 0;  // most queries per work item; 0: kSbChunkFactor(Deterministic) * topk * bk
  int64_t pass_queries = 0;   // most query rows per pass; 0: from kSbPassRowsAtomic / kSbPassRowsDeterministic
  bool dq_exchange = true;    // false (measurement): at bk = 128 both warpgroups send their dQ atomically
  // Recorded in the last pass when set: after the schedule and after the main kernel.
  cudaEvent_t after_schedule = nullptr;
  cudaEvent_t after_main = nullptr;
};

// p arrives validated by attention_api.cpp for shapes only (strides and scale resolved, d and bk in
// {64, 128}, g in {1, 2, 4, 8, 16}, 1 <= topk <= 32, bf16). Every pointer is device memory and its
// contents are never read on the host; invalid, invisible or garbage entries are skipped and
// positions clamped as in the forward. dk and dv are overwritten (zeros for keys nobody attends).
// The queries run in passes (each its own schedule and dq reduction; dk and dv accumulate in float32
// across passes), so the workspace is bounded as in the forward. p.deterministic: bitwise-repeatable
// results (per-slot dq partials and per-item dk / dv partials reduced in a fixed order) instead of
// float32 atomics. Asynchronous on stream; throws msa::Error for shapes the kernels cannot index and
// std::runtime_error for CUDA failures.
void run_sparse_attention_backward(const AttentionBwdParams& p, cudaStream_t stream, const SparseBwdOptions& opt = {});

// Bytes of workspace run_sparse_attention_backward takes for p (shapes only).
size_t sparse_bwd_workspace_bytes(const AttentionBwdParams& p, const SparseBwdOptions& opt = {});

}  // namespace msa::cuda
