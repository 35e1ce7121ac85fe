// sparse_fwd.h — entry point of the CUDA sm_90a sparse attention forward (MSA_SPEC "Main branch",
// KV-outer with query gathering, then a local pass that attends each query's sink and own block
// and merges the partials), called by src/attention_api.cpp on
// Backend::cuda and by bench/bench_sparse.cu. Design and numbers: docs/sparse_attention.md.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "msa/attention.h"

namespace msa::cuda {

// Knobs for measurements; the defaults are what the public API runs.
struct SparseFwdOptions {
  bool partial_f32 = false;              // per-slot partial o in float32 instead of bfloat16 (2x partial bytes)
  bool local_pass = true;                // bf16 partials: the sink and own blocks attended by the local pass, which
                                         // also merges (false: every block in phase 1, then the combine kernel)
  int64_t chunk_queries = 0;             // most queries per work item; 0: kSpItemRows / g
  int64_t pass_queries = 0;              // most query rows per pass; 0: from max_workspace_bytes
  int64_t band_queries = 0;              // query rows per band of the work order (a power of two); 0: from kSpBandBytes, -1: one band
  size_t max_workspace_bytes = 0;        // pass size when pass_queries is 0: the largest that fits; 0: kSpPassRows / (h_q * topk) query rows
  // Caller-provided device workspace of at least sparse_fwd_workspace_bytes(p, opt) bytes, used
  // instead of a stream-ordered allocation inside the call (nullptr: allocate).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  // Recorded in every pass, so with several passes they mark the last pass's stages.
  cudaEvent_t after_schedule = nullptr;  // recorded on the stream after the schedule kernels, when set
  cudaEvent_t after_phase1 = nullptr;    // recorded after phase 1 (before the local pass or the combine), when set
};

// p arrives validated by attention_api.cpp for shapes only (strides and scale resolved, d and bk in
// {64, 128}, g = h_q / h_kv in {1, 2, 4, 8, 16}, 1 <= topk <= 32, bf16, n_q > 0). Every pointer,
// the varlen arrays and topk_idx included, is device memory; their contents are never read on the
// host, and the kernels skip invalid, out-of-range or invisible block ids and clamp positions so
// that no access leaves the tensors. The queries run in passes of contiguous packed rows (each
// with its own schedule, phase 1 and local pass; the keys are the same for all), so the workspace
// (the pass's schedule and per-slot partials, about pass * h_q * topk * (2 d + 4) bytes with bf16
// partials) is bounded by kSpPassRows, not by n_q; it is taken once with cudaMallocAsync on the
// stream and given back with cudaFreeAsync before returning. The outputs are bitwise the same for
// any pass size. Asynchronous on stream; throws msa::Error for shapes the kernels cannot index and
// std::runtime_error for CUDA failures.
void run_sparse_attention_forward(const AttentionParams& p, cudaStream_t stream, const SparseFwdOptions& opt = {});

// Bytes of workspace run_sparse_attention_forward takes for p (shapes only; strides as the call
// would resolve them). Queries CUB, so it needs the current device.
size_t sparse_fwd_workspace_bytes(const AttentionParams& p, const SparseFwdOptions& opt = {});

}  // namespace msa::cuda
