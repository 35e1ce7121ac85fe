// kl.h — entry point of the CUDA sm_90a KL alignment loss and its backward (MSA_SPEC "KL alignment
// loss"), called by src/kl_api.cpp on Backend::cuda and by bench/bench_kl.cu. Design and numbers:
// docs/kl_backward.md.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "msa/kl.h"

namespace msa::cuda {

// Knobs for measurements; the defaults are what the public API runs.
struct KlOptions {
  int64_t pass_queries = 0;        // most query rows per pass; 0: from max_workspace_bytes or kKlPassBytes
  size_t max_workspace_bytes = 0;  // Exec::max_workspace_bytes: the largest pass whose workspace fits
  // Recorded on the stream (in the last pass) when set: after the index-lse pre-pass (or at the
  // start when index_lse is given), and after the main kernels (before the dK kernel and combines).
  cudaEvent_t after_lse = nullptr;
  cudaEvent_t after_main = nullptr;
};

// p arrives validated by kl_api.cpp for shapes only (strides and scales resolved, d and d_idx in
// {64, 128}, g in {1, 2, 4, 8, 16}, bk in {64, 128} and 1 <= topk <= 32 when topk_idx is set, bf16,
// lse set, n_q > 0 or n_k > 0). Every pointer is device memory, the varlen arrays and topk_idx
// included; their contents are never read on the host (invalid block ids are skipped, positions
// clamped). topk_idx == nullptr is the warm-up phase (all visible keys). index_lse == nullptr: it is
// computed first over the same support (a student-only pre-pass).
//   backward: writes dq_idx and dk_idx (asynchronous on stream), returns 0.
//   loss:     returns L_KL; copies one double to the host and synchronises the stream.
// Throws msa::Error for shapes the kernels cannot index and std::runtime_error for CUDA failures.
double run_index_kl(const IndexKLParams& p, cudaStream_t stream, bool backward, const KlOptions& opt = {});

}  // namespace msa::cuda
