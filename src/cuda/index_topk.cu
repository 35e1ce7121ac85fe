// index_topk.cu — host side of the CUDA index branch: operand layout checks that decide the load
// paths, the TMA descriptor of k_idx, and the flat dispatch to the compiled configurations.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "host.h"
#include "index_topk.cuh"
#include "index_topk.h"

namespace msa::cuda {

// Compiled in index_topk_d64.cu and index_topk_d128.cu.
extern template void launch_index_topk<64, 64, false>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);
extern template void launch_index_topk<64, 64, true>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);
extern template void launch_index_topk<64, 128, false>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);
extern template void launch_index_topk<64, 128, true>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);
extern template void launch_index_topk<128, 64, false>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);
extern template void launch_index_topk<128, 64, true>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);
extern template void launch_index_topk<128, 128, false>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);
extern template void launch_index_topk<128, 128, true>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);

namespace {

// TMA needs a 16-byte aligned base and row stride; other layouts are first copied to a packed
// [n_k, d] buffer (one extra pass over k_idx, only for such layouts).
__global__ void repack_rows_kernel(const uint16_t* src, int64_t stride, uint16_t* dst, int64_t n, int64_t d) {
  const int64_t total = n * d;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x)
    dst[e] = src[(e / d) * stride + e % d];
}

}  // namespace

void run_index_topk(const IndexTopkParams& p, cudaStream_t stream) {
  const int d = int(p.d_idx), bk = int(p.bk);
  const bool lse = p.index_lse != nullptr;
  IndexKernelParams kp;
  kp.n_q = p.seq.n_q;
  kp.n_k = p.seq.n_k;
  kp.batch = p.seq.batch;
  kp.h_kv = p.h_kv;
  kp.n_rows = p.seq.n_q * p.h_kv;
  if ((kp.n_rows + kIdxBlockM - 1) / kIdxBlockM > INT32_MAX)
    throw std::runtime_error("msa::index_topk: n_q * h_kv = " + std::to_string(kp.n_rows) +
                             " query rows exceed the CUDA grid of the index kernel");
  kp.cu_q = p.seq.cu_seqlens_q;
  kp.cu_k = p.seq.cu_seqlens_k;
  kp.q_pos = p.seq.q_pos;
  kp.q = static_cast<const uint16_t*>(p.q_idx);
  kp.stride_q_tok = p.stride_q_idx_tok;
  kp.stride_q_head = p.stride_q_idx_head;
  kp.q_vec = is_aligned(p.q_idx, 16) && p.stride_q_idx_tok % 8 == 0 && p.stride_q_idx_head % 8 == 0;
  kp.topk = int(p.topk);
  kp.scale = p.index_scale;
  kp.topk_idx = p.topk_idx;
  kp.block_scores = p.block_scores;
  kp.n_blocks = p.block_scores ? p.n_blocks : 0;
  kp.lse = p.index_lse;

  int device = 0, smem_optin = 0;
  check_cuda(kIndexOp, cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(kIndexOp, cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");

  // With n_k == 0 every row sees nothing: no key tile is ever loaded and the map stays empty.
  CUtensorMap tmap;
  std::memset(&tmap, 0, sizeof(tmap));
  ScratchGuard scratch;
  if (kp.n_k > 0) {
    const uint16_t* k = static_cast<const uint16_t*>(p.k_idx);
    int64_t stride_k = p.stride_k_idx_tok;
    if (!is_aligned(k, 16) || (stride_k * 2) % 16 != 0) {
      scratch.stream = stream;
      check_cuda(kIndexOp, cudaMallocAsync(&scratch.ptr, size_t(kp.n_k) * d * 2, stream), "cudaMallocAsync");
      const int64_t total = kp.n_k * d;
      const int blocks = int(std::min<int64_t>((total + 255) / 256, 4096));
      repack_rows_kernel<<<blocks, 256, 0, stream>>>(k, stride_k, static_cast<uint16_t*>(scratch.ptr), kp.n_k, d);
      check_cuda(kIndexOp, cudaGetLastError(), "repack launch");
      k = static_cast<const uint16_t*>(scratch.ptr);
      stride_k = d;
    }
    tmap = make_bf16_tensor_map_sw128<2>(kIndexOp, k, {cuuint64_t(d), cuuint64_t(kp.n_k)}, {cuuint64_t(stride_k) * 2},
                                         {cuuint32_t(kIdxAtomK), cuuint32_t(kIdxBlockN)});
  }

  // One flat dispatch over the compiled configurations.
  if (d == 64 && bk == 64 && !lse) return launch_index_topk<64, 64, false>(tmap, kp, smem_optin, stream);
  if (d == 64 && bk == 64 && lse) return launch_index_topk<64, 64, true>(tmap, kp, smem_optin, stream);
  if (d == 64 && bk == 128 && !lse) return launch_index_topk<64, 128, false>(tmap, kp, smem_optin, stream);
  if (d == 64 && bk == 128 && lse) return launch_index_topk<64, 128, true>(tmap, kp, smem_optin, stream);
  if (d == 128 && bk == 64 && !lse) return launch_index_topk<128, 64, false>(tmap, kp, smem_optin, stream);
  if (d == 128 && bk == 64 && lse) return launch_index_topk<128, 64, true>(tmap, kp, smem_optin, stream);
  if (d == 128 && bk == 128 && !lse) return launch_index_topk<128, 128, false>(tmap, kp, smem_optin, stream);
  if (d == 128 && bk == 128 && lse) return launch_index_topk<128, 128, true>(tmap, kp, smem_optin, stream);
  throw std::runtime_error("msa::index_topk: no CUDA index kernel for d_idx = " + std::to_string(d) +
                           ", bk = " + std::to_string(bk) + " (compiled: d_idx in {64, 128}, bk in {64, 128})");
}

}  // namespace msa::cuda
