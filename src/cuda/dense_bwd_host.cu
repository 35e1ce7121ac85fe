// dense_bwd_host.cu — host side of the CUDA dense attention backward and its two small kernels:
// the pre-pass (per (head, token) lse * log2(e) and delta = rowsum(do * o), written where the main
// kernel's producer reads a tile's rows contiguously), the post-pass (dq = scale * fp32
// accumulator, to bf16 in the caller's layout), repacking of operands TMA cannot read in place,
// the per-sequence key-tile prefix for varlen batches, the tensor maps, and the flat dispatch to
// the compiled head dims.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "dense_bwd.cuh"
#include "dense_bwd.h"
#include "host.h"

namespace msa::cuda {

// Compiled in dense_bwd_d64.cu and dense_bwd_d128.cu.
#define MSA_DENSE_BWD_EXTERN(D)                                                                                 \
  extern template void launch_dense_bwd<D>(const CUtensorMap&, const CUtensorMap&, const CUtensorMap&,          \
                                           const CUtensorMap&, const CUtensorMap&, const DenseBwdKernelParams&, \
                                           cudaStream_t);
MSA_DENSE_BWD_EXTERN(64)
MSA_DENSE_BWD_EXTERN(128)
#undef MSA_DENSE_BWD_EXTERN

namespace {

// row_stats[h, i] = (lse[i, h] * log2(e), sum_c do[i, h, c] * o[i, h, c]) in fp32; d / 8 threads
// per (token, head) row, reduced by shuffles. The loop bound is uniform per block so every lane
// reaches the shuffles.
constexpr int kPreThreads = 256;
__global__ void __launch_bounds__(kPreThreads)
    bwd_row_stats_kernel(const uint16_t* o, int64_t so_tok, int64_t so_head, const uint16_t* dout, int64_t sdo_tok,
                         int64_t sdo_head, const float* lse, int64_t n_q, int h_q, int d, int vec, float2* row_stats) {
  const int tpr = d / 8;  // 8 or 16: a power of two dividing 32
  const int rows_per_block = kPreThreads / tpr;
  const int sub = threadIdx.x % tpr;
  const int64_t rows = n_q * h_q;
  for (int64_t base = int64_t(blockIdx.x) * rows_per_block; base < rows; base += int64_t(gridDim.x) * rows_per_block) {
    const int64_t row = base + threadIdx.x / tpr;
    float acc = 0.f;
    int64_t tok = 0, h = 0;
    if (row < rows) {
      tok = row / h_q;
      h = row - tok * h_q;
      float a[8], b[8];
      load8_as_float(o + tok * so_tok + h * so_head + sub * 8, vec, a);
      load8_as_float(dout + tok * sdo_tok + h * sdo_head + sub * 8, vec, b);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc = fmaf(a[e], b[e], acc);
    }
    for (int off = tpr / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (row < rows && sub == 0) row_stats[h * n_q + tok] = make_float2(lse[tok * h_q + h] * 1.4426950408889634f, acc);
  }
}

// dq[i, h, :] = bf16(scale * acc[h, i, :]), eight elements per thread in dq's order.
__global__ void bwd_dq_store_kernel(const float* acc, uint16_t* dq, int64_t s_tok, int64_t s_head, int64_t n_q, int h_q,
                                    int d, float scale, int vec) {
  const int chunks = d / 8;
  const int64_t total = n_q * h_q * chunks;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t tok = e / (int64_t(h_q) * chunks), rem = e - tok * h_q * chunks, h = rem / chunks,
                  c = rem - h * chunks;
    const float4* src = reinterpret_cast<const float4*>(acc + (h * n_q + tok) * d + c * 8);
    const float4 x0 = src[0], x1 = src[1];
    const float v[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
    uint16_t* dst = dq + tok * s_tok + h * s_head + c * 8;
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = db_detail::pack_bf16(v[2 * k] * scale, v[2 * k + 1] * scale);
    if (vec) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        dst[2 * k] = uint16_t(w[k] & 0xffffu);
        dst[2 * k + 1] = uint16_t(w[k] >> 16);
      }
    }
  }
}

// TMA needs a 16-byte aligned base and strides; other layouts of q, do, k, v are first copied to a
// packed [n, h, d] buffer (one extra pass, only for such layouts).
__global__ void bwd_repack_kernel(const uint16_t* src, int64_t stride_tok, int64_t stride_head, uint16_t* dst,
                                  int64_t n, int64_t h, int64_t d) {
  const int64_t total = n * h * d;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t tok = e / (h * d), rem = e - tok * h * d, head = rem / d, c = rem - head * d;
    dst[e] = src[tok * stride_tok + head * stride_head + c];
  }
}

// tile_start[b] = sum over b' < b of ceil(len(b') / 128) key tiles; one block scanning the batch
// in chunks of its width. Offsets are clamped like the kernel clamps them; the total saturates at
// INT32_MAX (only garbage cu_seqlens get near it).
constexpr int kScanThreads = 1024;
__global__ void __launch_bounds__(kScanThreads)
    bwd_key_tile_prefix_kernel(const int32_t* cu, int64_t batch, int64_t n, int32_t* tile_start) {
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
      const int64_t lo = min(max(int64_t(cu[b]), int64_t(0)), n);
      const int64_t hi = min(max(int64_t(cu[b + 1]), lo), n);
      cnt = (hi - lo + kDbBlockN - 1) / kDbBlockN;
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
      warp_sums[lane] = w;
    }
    __syncthreads();
    const int64_t total = carry + (warp > 0 ? warp_sums[warp - 1] : 0) + incl;
    if (b < batch) tile_start[b + 1] = int32_t(min(total, int64_t(INT32_MAX)));
    __syncthreads();
    if (tid == kScanThreads - 1) carry = total;
    __syncthreads();
  }
}

// 3D map over a [n, h, d] bf16 tensor, box = 64 columns x 1 head x rows, 128-byte swizzle.
CUtensorMap make_bf16_map(const uint16_t* base, int64_t n, int64_t h, int64_t d, int64_t stride_tok,
                          int64_t stride_head, int rows) {
  return make_bf16_tensor_map_sw128<3>(kDenseBwdOp, base, {cuuint64_t(d), cuuint64_t(h), cuuint64_t(n)},
                                       {cuuint64_t(stride_head) * 2, cuuint64_t(stride_tok) * 2},
                                       {cuuint32_t(kDbAtom), 1, cuuint32_t(rows)});
}

// 3D map over the fp32 accumulator [h_q, n_q, d], box = 32 columns (128 bytes) x 64 rows x 1 head
// in the 128-byte swizzle, as the kernel stages its partials. Rows past n_q are clipped by the
// reduce.
CUtensorMap make_dq_map(const float* base, int64_t n_q, int64_t h_q, int64_t d) {
  CUtensorMap map;
  std::memset(&map, 0, sizeof(map));
  const cuuint64_t dims[3] = {cuuint64_t(d), cuuint64_t(n_q), cuuint64_t(h_q)};
  const cuuint64_t strides[2] = {cuuint64_t(d) * 4, cuuint64_t(n_q) * cuuint64_t(d) * 4};
  const cuuint32_t box[3] = {cuuint32_t(kDbDqBoxCols), cuuint32_t(kDbBlockM), 1};
  const cuuint32_t elem[3] = {1, 1, 1};
  const CUresult r =
      tensor_map_encoder(kDenseBwdOp)(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3, const_cast<float*>(base), dims, strides,
                                      box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error(std::string("msa::") + kDenseBwdOp + ": cuTensorMapEncodeTiled (dq) failed with error " +
                             std::to_string(int(r)));
  return map;
}

int grid_for(int64_t work, int64_t per_block) {
  return int(std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, 8192)));
}

}  // namespace

void run_dense_bwd(const AttentionBwdParams& p, cudaStream_t stream, DenseBwdDq dq_mode) {
  const int d = int(p.d);
  const int64_t g = p.h_q / p.h_kv;
  int log2_g = 0;
  while ((int64_t(1) << log2_g) < g) ++log2_g;
  if ((int64_t(1) << log2_g) != g || g > 16)
    throw std::runtime_error("msa::dense_attention_backward: no CUDA kernel for h_q / h_kv = " + std::to_string(g) +
                             " (compiled: powers of two up to 16)");
  if (d != 64 && d != 128)
    throw std::runtime_error("msa::dense_attention_backward: no CUDA kernel for d = " + std::to_string(d) +
                             " (compiled: d in {64, 128})");
  const int64_t n_q = p.seq.n_q, n_k = p.seq.n_k, h_q = p.h_q, h_kv = p.h_kv;

  DenseBwdKernelParams kp;
  kp.n_q = n_q;
  kp.n_k = n_k;
  kp.batch = p.seq.batch;
  kp.h_q = int(h_q);
  kp.h_kv = int(h_kv);
  kp.log2_g = log2_g;
  kp.cu_q = p.seq.cu_seqlens_q;
  kp.cu_k = p.seq.cu_seqlens_k;
  kp.q_pos = p.seq.q_pos;
  kp.dk = static_cast<uint16_t*>(p.dk);
  kp.stride_dk_tok = p.stride_dk_tok;
  kp.stride_dk_head = p.stride_dk_head;
  kp.dv = static_cast<uint16_t*>(p.dv);
  kp.stride_dv_tok = p.stride_dv_tok;
  kp.stride_dv_head = p.stride_dv_head;
  kp.dkv_vec = is_aligned(p.dk, 4) && is_aligned(p.dv, 4) && p.stride_dk_tok % 2 == 0 && p.stride_dk_head % 2 == 0 &&
               p.stride_dv_tok % 2 == 0 && p.stride_dv_head % 2 == 0;
  if (p.deterministic) dq_mode = DenseBwdDq::ordered;
  kp.dq_mode = dq_mode == DenseBwdDq::tma_reduce ? 0 : dq_mode == DenseBwdDq::atomic ? 1 : 2;
  kp.scale = p.scale;
  kp.scale_log2 = float(double(p.scale) * 1.4426950408889634);

  // Key tiles: each sequence starts a new one; with cu_seqlens the grid covers n_k / 128 + batch
  // tiles per head and the surplus CTAs exit at once.
  const int32_t* cu_keys = kp.cu_k != nullptr ? kp.cu_k : kp.cu_q;
  int64_t tiles = (n_k + kDbBlockN - 1) / kDbBlockN;
  if (cu_keys != nullptr) tiles += kp.batch;
  if (tiles * h_kv > INT32_MAX)
    throw std::runtime_error("msa::dense_attention_backward: " + std::to_string(tiles * h_kv) +
                             " key tiles exceed the CUDA grid");
  kp.tiles_per_head = int(tiles);

  // One workspace: the fp32 dq accumulator [h_q, n_q, d] (followed, in the ordered mode, by the
  // turn counters [h_q, n_q, 2], zeroed with it), the row statistics [h_q, n_q], the key tile
  // prefix [batch + 1].
  const size_t order_bytes = kp.dq_mode == 2 ? size_t(n_q * h_q) * 8 : 0;
  const size_t acc_bytes = size_t(n_q * h_q * d) * 4 + order_bytes, stats_bytes = size_t(n_q * h_q) * 8;
  const size_t prefix_bytes = cu_keys != nullptr ? size_t(kp.batch + 1) * 4 : 0;
  ScratchGuard ws, rq, rdo, rk, rv;
  ws.stream = stream;
  if (acc_bytes + stats_bytes + prefix_bytes > 0)
    check_cuda(kDenseBwdOp, cudaMallocAsync(&ws.ptr, acc_bytes + stats_bytes + prefix_bytes, stream),
               "cudaMallocAsync (workspace)");
  uint8_t* wsb = static_cast<uint8_t*>(ws.ptr);
  kp.dq_acc = reinterpret_cast<float*>(wsb);
  kp.row_stats = reinterpret_cast<const float2*>(wsb + acc_bytes);
  if (order_bytes > 0) kp.dq_order = reinterpret_cast<int*>(wsb + acc_bytes - order_bytes);
  if (cu_keys != nullptr) {
    int32_t* prefix = reinterpret_cast<int32_t*>(wsb + acc_bytes + stats_bytes);
    bwd_key_tile_prefix_kernel<<<1, kScanThreads, 0, stream>>>(cu_keys, kp.batch, n_k, prefix);
    check_cuda(kDenseBwdOp, cudaGetLastError(), "key tile prefix launch");
    kp.tile_start = prefix;
  }

  if (n_q > 0) {
    check_cuda(kDenseBwdOp, cudaMemsetAsync(kp.dq_acc, 0, acc_bytes, stream), "cudaMemsetAsync (dq accumulator)");
    const bool vec = is_aligned(p.o, 16) && is_aligned(p.do_, 16) && p.stride_o_tok % 8 == 0 &&
                     p.stride_o_head % 8 == 0 && p.stride_do_tok % 8 == 0 && p.stride_do_head % 8 == 0;
    bwd_row_stats_kernel<<<grid_for(n_q * h_q, kPreThreads / (d / 8)), kPreThreads, 0, stream>>>(
        static_cast<const uint16_t*>(p.o), p.stride_o_tok, p.stride_o_head, static_cast<const uint16_t*>(p.do_),
        p.stride_do_tok, p.stride_do_head, p.lse, n_q, int(h_q), d, int(vec),
        reinterpret_cast<float2*>(wsb + acc_bytes));
    check_cuda(kDenseBwdOp, cudaGetLastError(), "row statistics launch");
  }

  // Operands as TMA reads them: in place when aligned, else repacked. Empty tensors keep a zeroed
  // map: no CTA loads from them (no query tiles, or no key tiles).
  auto prepare = [&](const void* ptr, int64_t n, int64_t h, int64_t stride_tok, int64_t stride_head, int rows,
                     ScratchGuard& scratch) {
    CUtensorMap map;
    std::memset(&map, 0, sizeof(map));
    if (n == 0) return map;
    const uint16_t* src = static_cast<const uint16_t*>(ptr);
    if (!is_aligned(src, 16) || stride_tok % 8 != 0 || stride_head % 8 != 0) {
      scratch.stream = stream;
      const int64_t total = n * h * d;
      check_cuda(kDenseBwdOp, cudaMallocAsync(&scratch.ptr, size_t(total) * 2, stream), "cudaMallocAsync (repack)");
      bwd_repack_kernel<<<grid_for(total, 256), 256, 0, stream>>>(src, stride_tok, stride_head,
                                                                  static_cast<uint16_t*>(scratch.ptr), n, h, d);
      check_cuda(kDenseBwdOp, cudaGetLastError(), "repack launch");
      return make_bf16_map(static_cast<const uint16_t*>(scratch.ptr), n, h, d, h * d, d, rows);
    }
    return make_bf16_map(src, n, h, d, stride_tok, stride_head, rows);
  };
  const CUtensorMap tmap_q = prepare(p.q, n_q, h_q, p.stride_q_tok, p.stride_q_head, kDbBlockM, rq);
  const CUtensorMap tmap_do = prepare(p.do_, n_q, h_q, p.stride_do_tok, p.stride_do_head, kDbBlockM, rdo);
  const CUtensorMap tmap_k = prepare(p.k, n_k, h_kv, p.stride_k_tok, p.stride_k_head, kDbBlockN, rk);
  const CUtensorMap tmap_v = prepare(p.v, n_k, h_kv, p.stride_v_tok, p.stride_v_head, kDbBlockN, rv);
  CUtensorMap tmap_dq;
  std::memset(&tmap_dq, 0, sizeof(tmap_dq));
  if (n_q > 0) tmap_dq = make_dq_map(kp.dq_acc, n_q, h_q, d);

  // One flat dispatch over the compiled head dims (d was checked above).
  if (d == 64)
    launch_dense_bwd<64>(tmap_q, tmap_do, tmap_k, tmap_v, tmap_dq, kp, stream);
  else
    launch_dense_bwd<128>(tmap_q, tmap_do, tmap_k, tmap_v, tmap_dq, kp, stream);

  if (n_q > 0) {
    const bool vec = is_aligned(p.dq, 16) && p.stride_dq_tok % 8 == 0 && p.stride_dq_head % 8 == 0;
    bwd_dq_store_kernel<<<grid_for(n_q * h_q * (d / 8), 256), 256, 0, stream>>>(kp.dq_acc, static_cast<uint16_t*>(p.dq),
                                                                                p.stride_dq_tok, p.stride_dq_head, n_q,
                                                                                int(h_q), d, p.scale, int(vec));
    check_cuda(kDenseBwdOp, cudaGetLastError(), "dq store launch");
  }
}

}  // namespace msa::cuda
