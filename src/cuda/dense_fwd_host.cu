// dense_fwd_host.cu — host side of the CUDA dense attention forward: layout checks that pick the
// load and store paths, the K/V tensor maps, the per-sequence query-tile prefix for varlen
// batches, and the flat dispatch to the compiled head dims.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "dense_fwd.cuh"
#include "dense_fwd.h"
#include "host.h"

namespace msa::cuda {

// Compiled in dense_fwd_d64.cu and dense_fwd_d128.cu.
#define MSA_DENSE_FWD_EXTERN(D, PP)                                                                               \
  extern template void launch_dense_fwd<D, PP>(const CUtensorMap&, const CUtensorMap&, const DenseFwdKernelParams&, \
                                               cudaStream_t);
MSA_DENSE_FWD_EXTERN(64, false)
MSA_DENSE_FWD_EXTERN(64, true)
MSA_DENSE_FWD_EXTERN(128, false)
MSA_DENSE_FWD_EXTERN(128, true)
#undef MSA_DENSE_FWD_EXTERN
#define MSA_DENSE_FWD_PERSISTENT_EXTERN(D, PP)                                                   \
  extern template void launch_dense_fwd_persistent<D, PP>(const CUtensorMap&, const CUtensorMap&, \
                                                          const CUtensorMap&, const DenseFwdKernelParams&, int, \
                                                          cudaStream_t);
MSA_DENSE_FWD_PERSISTENT_EXTERN(64, false)
MSA_DENSE_FWD_PERSISTENT_EXTERN(64, true)
MSA_DENSE_FWD_PERSISTENT_EXTERN(128, false)
MSA_DENSE_FWD_PERSISTENT_EXTERN(128, true)
#undef MSA_DENSE_FWD_PERSISTENT_EXTERN

namespace {

// TMA needs a 16-byte aligned base and strides; other K/V layouts are first copied to a packed
// [n_k, h_kv, d] buffer (one extra pass, only for such layouts).
__global__ void repack_kv_kernel(const uint16_t* src, int64_t stride_tok, int64_t stride_head, uint16_t* dst,
                                 int64_t n, int64_t h, int64_t d) {
  const int64_t total = n * h * d;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t tok = e / (h * d), rem = e - tok * h * d, head = rem / d, c = rem - head * d;
    dst[e] = src[tok * stride_tok + head * stride_head + c];
  }
}

// tile_start[b] = sum over b' < b of ceil(len_q(b') / tok_per_tile), one block scanning the
// batch in chunks of its width. Offsets are clamped like the kernel clamps them; the total
// saturates at INT32_MAX (only garbage cu_seqlens get near it).
constexpr int kScanThreads = 1024;
__global__ void __launch_bounds__(kScanThreads) tile_prefix_kernel(const int32_t* cu_q, int64_t batch, int64_t n_q,
                                                                 int tok_per_tile, int32_t* tile_start) {
  __shared__ int64_t warp_sums[kScanThreads / 32];
  __shared__ int64_t carry;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) {
    carry = 0;
    tile_start[0] = 0;
  }
  __syncthreads();
  for (int64_t base = 0; base < batch; base += kScanThreads) {
    const int64_t b = base + tid;
    int64_t cnt = 0;
    if (b < batch) {
      const int64_t lo = min(max(int64_t(cu_q[b]), int64_t(0)), n_q);
      const int64_t hi = min(max(int64_t(cu_q[b + 1]), lo), n_q);
      cnt = (hi - lo + tok_per_tile - 1) / tok_per_tile;
    }
    int64_t incl = cnt;
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int64_t w = warp_sums[lane];
      for (int o = 1; o < 32; o <<= 1) {
        const int64_t y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += y;
      }
      warp_sums[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    const int64_t total = carry + (warp > 0 ? warp_sums[warp - 1] : 0) + incl;
    if (b < batch) tile_start[b + 1] = int32_t(min(total, int64_t(INT32_MAX)));
    __syncthreads();
    if (tid == kScanThreads - 1) carry = total;
    __syncthreads();
  }
}

// 3D map over a [n, h, d] bf16 tensor, box = 64 columns x 1 head x 128 rows, 128-byte swizzle:
// one box lands as 128 rows of 128 bytes, the K-major (for K) / MN-major (for V) wgmma atom.
CUtensorMap make_kv_map(const uint16_t* base, int64_t n, int64_t h, int64_t d, int64_t stride_tok,
                        int64_t stride_head) {
  return make_bf16_tensor_map_sw128<3>(kDenseFwdOp, base, {cuuint64_t(d), cuuint64_t(h), cuuint64_t(n)},
                                       {cuuint64_t(stride_head) * 2, cuuint64_t(stride_tok) * 2},
                                       {cuuint32_t(kDnAtom), 1, cuuint32_t(kDnBlockN)});
}

}  // namespace

void run_dense_fwd(const AttentionParams& p, cudaStream_t stream, DenseSchedule schedule) {
  const int d = int(p.d);
  if (schedule == DenseSchedule::automatic)
    schedule = d == 64 ? DenseSchedule::persistent_pingpong : DenseSchedule::persistent;
  const int64_t g = p.h_q / p.h_kv;
  int log2_g = 0;
  while ((int64_t(1) << log2_g) < g) ++log2_g;
  if ((int64_t(1) << log2_g) != g || g > kDnBlockM)
    throw std::runtime_error("msa::dense_attention_forward: no CUDA kernel for h_q / h_kv = " + std::to_string(g) +
                             " (compiled: powers of two up to 16)");

  DenseFwdKernelParams kp;
  kp.n_q = p.seq.n_q;
  kp.n_k = p.seq.n_k;
  kp.batch = p.seq.batch;
  kp.h_q = int(p.h_q);
  kp.h_kv = int(p.h_kv);
  kp.log2_g = log2_g;
  kp.cu_q = p.seq.cu_seqlens_q;
  kp.cu_k = p.seq.cu_seqlens_k;
  kp.q_pos = p.seq.q_pos;
  kp.q = static_cast<const uint16_t*>(p.q);
  kp.stride_q_tok = p.stride_q_tok;
  kp.stride_q_head = p.stride_q_head;
  kp.q_vec = is_aligned(p.q, 16) && p.stride_q_tok % 8 == 0 && p.stride_q_head % 8 == 0;
  kp.o = static_cast<uint16_t*>(p.o);
  kp.stride_o_tok = p.stride_o_tok;
  kp.stride_o_head = p.stride_o_head;
  kp.o_vec = is_aligned(p.o, 4) && p.stride_o_tok % 2 == 0 && p.stride_o_head % 2 == 0;
  kp.lse = p.lse;
  kp.scale_log2 = float(double(p.scale) * 1.4426950408889634);

  const int64_t tok_per_tile = kDnBlockM / g;
  // Without cu_seqlens_q the tiles are known here; with it, each sequence starts a new tile, so
  // the grid covers n_q / tok_per_tile + batch tiles per head and the surplus CTAs exit at once.
  int64_t tiles = (kp.n_q + tok_per_tile - 1) / tok_per_tile;
  if (kp.cu_q != nullptr) tiles += kp.batch;
  if (tiles * kp.h_kv > INT32_MAX)
    throw std::runtime_error("msa::dense_attention_forward: " + std::to_string(tiles * kp.h_kv) +
                             " query tiles exceed the CUDA grid");
  kp.tiles_per_head = int(tiles);

  // The persistent kernels load Q by TMA; other q layouts take the one-CTA-per-tile kernel of the
  // same GEMM order (same math).
  const bool want_persistent =
      schedule == DenseSchedule::persistent || schedule == DenseSchedule::persistent_pingpong;
  const bool want_pp = schedule == DenseSchedule::pingpong || schedule == DenseSchedule::persistent_pingpong;
  const bool persistent = want_persistent && kp.q_vec;

  // One scratch block: the varlen tile prefix [batch + 1] (with cu_seqlens_q), then the persistent
  // kernel's tile counter.
  ScratchGuard tile_scratch, k_scratch, v_scratch;
  const int64_t n_prefix = kp.cu_q != nullptr ? kp.batch + 1 : 0;
  if (n_prefix > 0 || persistent) {
    tile_scratch.stream = stream;
    check_cuda(kDenseFwdOp,
               cudaMallocAsync(&tile_scratch.ptr, size_t(n_prefix + (persistent ? 1 : 0)) * sizeof(int32_t), stream),
               "cudaMallocAsync");
  }
  int32_t* scratch = static_cast<int32_t*>(tile_scratch.ptr);
  if (kp.cu_q != nullptr) {
    tile_prefix_kernel<<<1, kScanThreads, 0, stream>>>(kp.cu_q, kp.batch, kp.n_q, int(tok_per_tile), scratch);
    check_cuda(kDenseFwdOp, cudaGetLastError(), "tile prefix launch");
    kp.tile_start = scratch;
  }
  if (persistent) {
    kp.tile_counter = reinterpret_cast<unsigned*>(scratch + n_prefix);
    check_cuda(kDenseFwdOp, cudaMemsetAsync(kp.tile_counter, 0, sizeof(unsigned), stream), "cudaMemsetAsync");
  }

  // With n_k == 0 every row sees nothing: no tile is loaded and the maps stay empty.
  CUtensorMap tmap_k, tmap_v;
  std::memset(&tmap_k, 0, sizeof(tmap_k));
  std::memset(&tmap_v, 0, sizeof(tmap_v));
  if (kp.n_k > 0) {
    auto prepare = [&](const void* ptr, int64_t stride_tok, int64_t stride_head, ScratchGuard& scratch) {
      const uint16_t* src = static_cast<const uint16_t*>(ptr);
      if (!is_aligned(src, 16) || stride_tok % 8 != 0 || stride_head % 8 != 0) {
        scratch.stream = stream;
        const int64_t total = kp.n_k * kp.h_kv * d;
        check_cuda(kDenseFwdOp, cudaMallocAsync(&scratch.ptr, size_t(total) * 2, stream), "cudaMallocAsync");
        const int blocks = int(std::min<int64_t>((total + 255) / 256, 4096));
        repack_kv_kernel<<<blocks, 256, 0, stream>>>(src, stride_tok, stride_head, static_cast<uint16_t*>(scratch.ptr),
                                                     kp.n_k, kp.h_kv, d);
        check_cuda(kDenseFwdOp, cudaGetLastError(), "repack launch");
        return make_kv_map(static_cast<const uint16_t*>(scratch.ptr), kp.n_k, kp.h_kv, d, kp.h_kv * d, d);
      }
      return make_kv_map(src, kp.n_k, kp.h_kv, d, stride_tok, stride_head);
    };
    tmap_k = prepare(p.k, p.stride_k_tok, p.stride_k_head, k_scratch);
    tmap_v = prepare(p.v, p.stride_v_tok, p.stride_v_head, v_scratch);
  }

  if (persistent) {
    // Q as a 3D map over [n_q, h_q, d]: box 64 columns x g heads x 128 / g tokens is one query
    // tile's 128 rows in the kernel's row order (token-major, head within the group minor).
    const CUtensorMap tmap_q = make_bf16_tensor_map_sw128<3>(
        kDenseFwdOp, kp.q, {cuuint64_t(d), cuuint64_t(kp.h_q), cuuint64_t(kp.n_q)},
        {cuuint64_t(kp.stride_q_head) * 2, cuuint64_t(kp.stride_q_tok) * 2},
        {cuuint32_t(kDnAtom), cuuint32_t(g), cuuint32_t(tok_per_tile)});
    int device = 0, sms = 0;
    check_cuda(kDenseFwdOp, cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(kDenseFwdOp, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute");
    const int grid = int(std::max<int64_t>(1, std::min<int64_t>(int64_t(sms), tiles * kp.h_kv)));
    if (d == 64 && !want_pp) return launch_dense_fwd_persistent<64, false>(tmap_q, tmap_k, tmap_v, kp, grid, stream);
    if (d == 64 && want_pp) return launch_dense_fwd_persistent<64, true>(tmap_q, tmap_k, tmap_v, kp, grid, stream);
    if (d == 128 && !want_pp) return launch_dense_fwd_persistent<128, false>(tmap_q, tmap_k, tmap_v, kp, grid, stream);
    if (d == 128 && want_pp) return launch_dense_fwd_persistent<128, true>(tmap_q, tmap_k, tmap_v, kp, grid, stream);
  }

  // One flat dispatch over the compiled head dims.
  const bool pp = want_pp;
  if (d == 64 && !pp) return launch_dense_fwd<64, false>(tmap_k, tmap_v, kp, stream);
  if (d == 64 && pp) return launch_dense_fwd<64, true>(tmap_k, tmap_v, kp, stream);
  if (d == 128 && !pp) return launch_dense_fwd<128, false>(tmap_k, tmap_v, kp, stream);
  if (d == 128 && pp) return launch_dense_fwd<128, true>(tmap_k, tmap_v, kp, stream);
  throw std::runtime_error("msa::dense_attention_forward: no CUDA kernel for d = " + std::to_string(d) +
                           " (compiled: d in {64, 128})");
}

}  // namespace msa::cuda
