// sparse_bwd.cu — host side of the CUDA sparse attention backward: the passes over the queries with
// their stream-ordered workspace, the row preprocess (delta = rowsum(do * o)), the forward's
// schedule, the flat dispatch of the main kernel over the compiled (d, bk) configurations, and the
// reductions and conversions that produce bf16 dq, dk and dv.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "host.h"
#include "msa/common.h"
#include "sparse_bwd.cuh"
#include "sparse_bwd.h"

namespace msa::cuda {

// Compiled in sparse_bwd_d64.cu and sparse_bwd_d128.cu.
extern template void launch_sparse_bwd<64, 64>(const SparseBwdKernelParams&, int, int64_t, int, cudaStream_t);
extern template void launch_sparse_bwd<64, 128>(const SparseBwdKernelParams&, int, int64_t, int, cudaStream_t);
extern template void launch_sparse_bwd<128, 64>(const SparseBwdKernelParams&, int, int64_t, int, cudaStream_t);
extern template void launch_sparse_bwd<128, 128>(const SparseBwdKernelParams&, int, int64_t, int, cudaStream_t);

namespace {

constexpr const char* kOp = "sparse_attention_backward";
constexpr int kThreads = 256;

unsigned grid_for(int64_t threads) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>((threads + kThreads - 1) / kThreads, 16384)));
}

using sb_detail::load8;
using sb_detail::pack_bf16;

// cp.async gathers Q and dO in 16-byte pieces; other layouts are first copied into a packed
// [n, h, d] buffer (only for such layouts).
__global__ void repack_kernel(const uint16_t* src, int64_t stride_tok, int64_t stride_head, uint16_t* dst, int64_t n,
                              int64_t h, int64_t d) {
  const int64_t total = n * h * d;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e % d, row = e / d;
    dst[e] = src[(row / h) * stride_tok + (row % h) * stride_head + c];
  }
}

// delta[i, h] = sum_c do[i, h, c] o[i, h, c] in float32, d / 8 threads per row (8 columns each, the
// fixed shuffle tree makes it deterministic).
template <int D>
__global__ void delta_kernel(const uint16_t* o, int64_t so_tok, int64_t so_head, const uint16_t* dout, int64_t sd_tok,
                             int64_t sd_head, int vec, int64_t n, int h, float* delta) {
  constexpr int TPR = D / 8;
  const int64_t rows = n * h;
  // Every thread runs the same number of iterations (the shuffles need whole groups).
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = blockIdx.x * int64_t(blockDim.x); base < rows * TPR; base += stride) {
    const int64_t gt = base + threadIdx.x;
    const int64_t row = gt / TPR;
    const int c8 = int(gt % TPR);
    float acc = 0.f;
    if (row < rows) {
      const int64_t i = row / h, e = row % h;
      const uint4 a = load8(o + i * so_tok + e * so_head + c8 * 8, vec != 0);
      const uint4 b = load8(dout + i * sd_tok + e * sd_head + c8 * 8, vec != 0);
      const uint32_t wa[4] = {a.x, a.y, a.z, a.w}, wb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        acc = fmaf(__uint_as_float(wa[w] << 16), __uint_as_float(wb[w] << 16), acc);
        acc = fmaf(__uint_as_float(wa[w] & 0xffff0000u), __uint_as_float(wb[w] & 0xffff0000u), acc);
      }
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (row < rows && c8 == 0) delta[row] = acc;
  }
}

// 8 floats * scale to bf16 at dst (16-byte store when aligned). + 0.f turns -0 into +0, so that
// a sum of exact zeros has one sign whatever order it was added in.
__device__ __forceinline__ void store8(uint16_t* dst, const float (&x)[8], float scale, bool vec) {
  uint32_t w[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) w[c] = pack_bf16(x[2 * c] * scale + 0.f, x[2 * c + 1] * scale + 0.f);
  if (vec) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      dst[2 * c] = uint16_t(w[c] & 0xffffu);
      dst[2 * c + 1] = uint16_t(w[c] >> 16);
    }
  }
}

// Non-deterministic dq: the float32 accumulator of the pass, times scale, to bf16.
__global__ void dq_convert_kernel(const float* acc, int64_t rows, int h, int d, float scale, uint16_t* dq,
                                  int64_t s_tok, int64_t s_head, int vec) {
  const int tpr = d / 8;
  for (int64_t gt = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; gt < rows * tpr;
       gt += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = gt / tpr;
    const int c8 = int(gt % tpr);
    const float4 a = *reinterpret_cast<const float4*>(acc + row * d + c8 * 8);
    const float4 b = *reinterpret_cast<const float4*>(acc + row * d + c8 * 8 + 4);
    const float x[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    store8(dq + (row / h) * s_tok + (row % h) * s_head + c8 * 8, x, scale, vec != 0);
  }
}

// Deterministic dq: the row's valid slot partials summed in slot order (the same validity rule as
// the schedule, so exactly the written slots), times scale, to bf16. No valid slot: 0.
__global__ void dq_combine_kernel(const float* part, const int32_t* topk_idx, const int2* qinfo, int64_t rows, int h_q,
                                  int log2g, int h_kv, int topk, int bk_shift, int d, float scale, uint16_t* dq,
                                  int64_t s_tok, int64_t s_head, int vec) {
  const int tpr = d / 8;
  for (int64_t gt = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; gt < rows * tpr;
       gt += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = gt / tpr;
    const int c8 = int(gt % tpr);
    const int64_t i = row / h_q;
    const int hh = int(row % h_q);
    const int pos = qinfo[i].y;
    const int32_t* sel = topk_idx + (i * h_kv + (hh >> log2g)) * topk;
    float x[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < topk; ++s) {
      if (!sp_entry_valid(sel[s], pos, bk_shift)) continue;
      const float* src = part + (row * topk + s) * d + c8 * 8;
      const float4 a = *reinterpret_cast<const float4*>(src);
      const float4 b = *reinterpret_cast<const float4*>(src + 4);
      x[0] += a.x, x[1] += a.y, x[2] += a.z, x[3] += a.w, x[4] += b.x, x[5] += b.y, x[6] += b.z, x[7] += b.w;
    }
    store8(dq + i * s_tok + int64_t(hh) * s_head + c8 * 8, x, scale, vec != 0);
  }
}

// Deterministic dk / dv of one pass: the first item of each group sums its group's item partials in
// item order and adds them to the float32 accumulators. Groups own disjoint key rows except where a
// block runs past its sequence into the next one; those rows hold exact zeros in one of the two
// groups, so the atomic add is exact and its order does not matter.
__global__ void dkv_combine_kernel(const float* part, const uint64_t* keys, const int32_t* item_start,
                                   const int32_t* counters, int item_cap, int64_t n_k, int h_kv, int bk, int d,
                                   float* dk_acc, float* dv_acc) {
  const int n_items = min(counters[1], item_cap);
  for (int it = blockIdx.x; it < n_items; it += gridDim.x) {
    const uint64_t key = keys[item_start[it]];
    if (it > 0 && keys[item_start[it - 1]] == key) continue;
    int end = it + 1;
    while (end < n_items && keys[item_start[end]] == key) ++end;
    const int r = int(key / uint64_t(n_k));
    const int64_t kstart = int64_t(key - uint64_t(r) * uint64_t(n_k));
    for (int e = threadIdx.x; e < 2 * bk * d; e += blockDim.x) {
      const int which = e / (bk * d), rem = e % (bk * d), row = rem / d, c = rem % d;
      if (kstart + row >= n_k) continue;
      float s = 0.f;
      for (int j = it; j < end; ++j) s += part[int64_t(j) * 2 * bk * d + e];
      atomicAdd((which == 0 ? dk_acc : dv_acc) + ((kstart + row) * h_kv + r) * d + c, s);
    }
  }
}

// dk = scale * dk_acc, dv = dv_acc, to bf16 with the output strides.
__global__ void dkv_convert_kernel(const float* dk_acc, const float* dv_acc, int64_t n_k, int h_kv, int d, float scale,
                                   uint16_t* dk, int64_t sk_tok, int64_t sk_head, uint16_t* dv, int64_t sv_tok,
                                   int64_t sv_head, int vec_k, int vec_v) {
  const int tpr = d / 8;
  const int64_t rows = n_k * h_kv;
  for (int64_t gt = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; gt < 2 * rows * tpr;
       gt += int64_t(gridDim.x) * blockDim.x) {
    const bool is_v = gt >= rows * tpr;
    const int64_t t = is_v ? gt - rows * tpr : gt;
    const int64_t row = t / tpr;
    const int c8 = int(t % tpr);
    const float* src = (is_v ? dv_acc : dk_acc) + row * d + c8 * 8;
    const float4 a = *reinterpret_cast<const float4*>(src);
    const float4 b = *reinterpret_cast<const float4*>(src + 4);
    const float x[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    const int64_t tok = row / h_kv, hh = row % h_kv;
    if (is_v)
      store8(dv + tok * sv_tok + hh * sv_head + c8 * 8, x, 1.f, vec_v != 0);
    else
      store8(dk + tok * sk_tok + hh * sk_head + c8 * 8, x, scale, vec_k != 0);
  }
}

// Zero strides and scale get their documented defaults here too (a direct caller such as the
// benchmark cannot hand the kernels stride-0 tensors).
AttentionBwdParams resolved(const AttentionBwdParams& p0) {
  AttentionBwdParams p = p0;
  default_strides(p.stride_q_tok, p.stride_q_head, p.h_q, p.d);
  default_strides(p.stride_k_tok, p.stride_k_head, p.h_kv, p.d);
  default_strides(p.stride_v_tok, p.stride_v_head, p.h_kv, p.d);
  default_strides(p.stride_o_tok, p.stride_o_head, p.h_q, p.d);
  default_strides(p.stride_do_tok, p.stride_do_head, p.h_q, p.d);
  default_strides(p.stride_dq_tok, p.stride_dq_head, p.h_q, p.d);
  default_strides(p.stride_dk_tok, p.stride_dk_head, p.h_kv, p.d);
  default_strides(p.stride_dv_tok, p.stride_dv_head, p.h_kv, p.d);
  if (p.scale == 0.f) p.scale = float(1.0 / std::sqrt(double(p.d)));
  return p;
}

bool rows_aligned(const void* ptr, int64_t s_tok, int64_t s_head) {
  return is_aligned(ptr, 16) && s_tok % 8 == 0 && s_head % 8 == 0;
}

// Pass size, work-item size and the workspace map; one function so that the call and
// sparse_bwd_workspace_bytes agree.
struct Plan {
  int64_t pass = 0, chunk = 0;
  int item_cap = 0;
  bool q_vec = false, do_vec = false;
  SparseScheduleParams sp;
  size_t delta = 0, dkv = 0, sched = 0, dq = 0, items = 0, q = 0, dout = 0;
  size_t total() const { return delta + 2 * dkv + sched + dq + items + q + dout; }
};

Plan make_plan(const AttentionBwdParams& p, const SparseBwdOptions& opt) {
  const char* fn = "msa::sparse_attention_backward: ";
  const int64_t n_q = p.seq.n_q, n_k = p.seq.n_k, g = p.h_q / p.h_kv, topk = p.topk, d = p.d;
  Plan plan;
  const int64_t auto_pass = p.deterministic ? kSbPassRowsDeterministic / (p.h_q * topk)
                                            : std::min(kSbPassRowsAtomic / p.h_q, 2 * kSpPassRows / (p.h_q * topk));
  const int64_t pass = opt.pass_queries > 0 ? opt.pass_queries : std::max<int64_t>(1, auto_pass);
  plan.pass = std::max<int64_t>(1, std::min(pass, n_q));
  const int64_t n_e = plan.pass * p.h_kv * topk;
  if (n_e >= INT32_MAX)
    throw Error(std::string(fn) + std::to_string(plan.pass) + " queries per pass * h_kv * topk = " +
                std::to_string(n_e) + " selection entries, expected fewer than 2^31 on the cuda backend");
  if (n_q * p.h_q >= (int64_t(1) << 40) || n_k * p.h_kv >= (int64_t(1) << 40))
    throw Error(std::string(fn) + "too many rows for the cuda backend");
  const int64_t queries_per_tile = kSbRows / g;
  const int64_t factor = p.deterministic ? kSbChunkFactorDeterministic : kSbChunkFactor;
  const int64_t chunk = opt.chunk_queries > 0 ? opt.chunk_queries : factor * topk * p.bk;
  plan.chunk = std::min<int64_t>((chunk + queries_per_tile - 1) / queries_per_tile * queries_per_tile, INT32_MAX / 2);

  SparseScheduleParams& sp = plan.sp;
  sp.n_q_all = n_q;
  sp.n_k = n_k;
  sp.batch = p.seq.batch;
  sp.cu_q = p.seq.cu_seqlens_q;
  sp.cu_k = p.seq.cu_seqlens_k;
  sp.q_pos = p.seq.q_pos;
  sp.h_kv = int(p.h_kv);
  sp.topk = int(topk);
  sp.bk = int(p.bk);
  sp.bk_shift = log2_exact(p.bk);
  sp.chunk = int(plan.chunk);

  plan.delta = align256(size_t(std::max<int64_t>(n_q, 1)) * p.h_q * 4);
  plan.dkv = align256(size_t(std::max<int64_t>(n_k, 1)) * p.h_kv * d * 4);
  if (n_q > 0) {
    SparseScheduleParams full = sp, tail = sp;
    full.n_q = plan.pass;
    tail.n_q = n_q % plan.pass == 0 ? plan.pass : n_q % plan.pass;
    plan.sched = align256(std::max(sparse_schedule_bytes(full), sparse_schedule_bytes(tail)));
    plan.dq = align256(size_t(plan.pass) * p.h_q * d * 4 * (p.deterministic ? topk : 1));
    if (p.deterministic) {
      // Work items of a pass: at most one partial item per group plus one per full chunk. Groups are
      // (kv head, block of a sequence): at most h_kv * (n_k / bk + batch) for valid varlen contents.
      const int64_t groups = p.h_kv * ((n_k + p.bk - 1) / p.bk + p.seq.batch);
      const int64_t cap = std::min<int64_t>(n_e, groups + n_e / plan.chunk + 1);
      plan.item_cap = int(std::min<int64_t>(cap, INT32_MAX));
      plan.items = align256(size_t(plan.item_cap) * 2 * p.bk * d * 4);
    }
    plan.q_vec = rows_aligned(p.q, p.stride_q_tok, p.stride_q_head);
    plan.do_vec = rows_aligned(p.do_, p.stride_do_tok, p.stride_do_head);
    plan.q = plan.q_vec ? 0 : align256(size_t(plan.pass) * p.h_q * d * 2);
    plan.dout = plan.do_vec ? 0 : align256(size_t(plan.pass) * p.h_q * d * 2);
  }
  return plan;
}

}  // namespace

size_t sparse_bwd_workspace_bytes(const AttentionBwdParams& p0, const SparseBwdOptions& opt) {
  return make_plan(resolved(p0), opt).total();
}

void run_sparse_attention_backward(const AttentionBwdParams& p0, cudaStream_t stream, const SparseBwdOptions& opt) {
  const char* fn = "msa::sparse_attention_backward: ";
  const AttentionBwdParams p = resolved(p0);
  const int d = int(p.d), bk = int(p.bk), topk = int(p.topk);
  const int64_t n_q = p.seq.n_q, n_k = p.seq.n_k, g = p.h_q / p.h_kv;
  if (!((d == 64 || d == 128) && (bk == 64 || bk == 128)))
    throw Error(std::string(fn) + "no CUDA kernel for d = " + std::to_string(d) + ", bk = " + std::to_string(bk) +
                " (compiled: d in {64, 128}, bk in {64, 128})");
  if (n_q == 0 && n_k == 0) return;
  const Plan plan = make_plan(p, opt);

  ScratchGuard ws;
  ws.stream = stream;
  check_cuda(kOp, cudaMallocAsync(&ws.ptr, plan.total(), stream), "cudaMallocAsync");
  uint8_t* at = static_cast<uint8_t*>(ws.ptr);
  auto take = [&](size_t bytes) {
    uint8_t* x = at;
    at += bytes;
    return x;
  };
  float* delta = reinterpret_cast<float*>(take(plan.delta));
  float* dk_acc = reinterpret_cast<float*>(take(plan.dkv));
  float* dv_acc = reinterpret_cast<float*>(take(plan.dkv));
  uint8_t* sched_ws = take(plan.sched);
  float* dq_buf = reinterpret_cast<float*>(take(plan.dq));
  float* item_part = reinterpret_cast<float*>(take(plan.items));
  uint16_t* packed_q = reinterpret_cast<uint16_t*>(take(plan.q));
  uint16_t* packed_do = reinterpret_cast<uint16_t*>(take(plan.dout));

  int device = 0, num_sms = 0, smem_optin = 0;
  check_cuda(kOp, cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(kOp, cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check_cuda(kOp, cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");

  check_cuda(kOp, cudaMemsetAsync(dk_acc, 0, 2 * plan.dkv, stream), "cudaMemsetAsync");
  if (n_q > 0) {
    const int vec = rows_aligned(p.o, p.stride_o_tok, p.stride_o_head) && plan.do_vec;
    const unsigned blocks = grid_for(n_q * p.h_q * (d / 8));
    const auto* o = static_cast<const uint16_t*>(p.o);
    const auto* dout = static_cast<const uint16_t*>(p.do_);
    if (d == 64)
      delta_kernel<64><<<blocks, kThreads, 0, stream>>>(o, p.stride_o_tok, p.stride_o_head, dout, p.stride_do_tok,
                                                        p.stride_do_head, vec, n_q, int(p.h_q), delta);
    else
      delta_kernel<128><<<blocks, kThreads, 0, stream>>>(o, p.stride_o_tok, p.stride_o_head, dout, p.stride_do_tok,
                                                         p.stride_do_head, vec, n_q, int(p.h_q), delta);
    check_cuda(kOp, cudaGetLastError(), "delta launch");
  }

  SparseBwdKernelParams kp;
  kp.k = static_cast<const uint16_t*>(p.k);
  kp.stride_k_tok = p.stride_k_tok;
  kp.stride_k_head = p.stride_k_head;
  kp.v = static_cast<const uint16_t*>(p.v);
  kp.stride_v_tok = p.stride_v_tok;
  kp.stride_v_head = p.stride_v_head;
  kp.kv_vec = rows_aligned(p.k, p.stride_k_tok, p.stride_k_head) && rows_aligned(p.v, p.stride_v_tok, p.stride_v_head);
  kp.n_k = n_k;
  kp.h_q = int(p.h_q);
  kp.h_kv = int(p.h_kv);
  kp.g = int(g);
  kp.log2g = log2_exact(g);
  kp.topk = topk;
  kp.bk_shift = log2_exact(bk);
  kp.scale_log2 = p.scale * 1.4426950408889634f;
  kp.deterministic = p.deterministic ? 1 : 0;
  kp.dq_exchange = (opt.dq_exchange || p.deterministic) ? 1 : 0;  // deterministic partials need one writer
  kp.dk_acc = dk_acc;
  kp.dv_acc = dv_acc;
  kp.item_part = item_part;
  kp.item_cap = plan.item_cap;
  const int dq_vec = rows_aligned(p.dq, p.stride_dq_tok, p.stride_dq_head);

  for (int64_t q0 = 0; q0 < n_q; q0 += plan.pass) {
    const int64_t len = std::min(plan.pass, n_q - q0);
    const int32_t* topk_idx = p.topk_idx + q0 * p.h_kv * topk;
    SparseScheduleParams sp = plan.sp;
    sp.q0 = q0;
    sp.n_q = len;
    sp.topk_idx = topk_idx;
    const SparseSchedule sched = build_sparse_schedule(sp, sched_ws, plan.sched, stream);
    if (opt.after_schedule) check_cuda(kOp, cudaEventRecord(opt.after_schedule, stream), "cudaEventRecord");

    kp.q = static_cast<const uint16_t*>(p.q) + q0 * p.stride_q_tok;
    kp.stride_q_tok = p.stride_q_tok;
    kp.stride_q_head = p.stride_q_head;
    kp.dout = static_cast<const uint16_t*>(p.do_) + q0 * p.stride_do_tok;
    kp.stride_do_tok = p.stride_do_tok;
    kp.stride_do_head = p.stride_do_head;
    const unsigned rblocks = grid_for(len * p.h_q * d);
    if (!plan.q_vec) {
      repack_kernel<<<rblocks, kThreads, 0, stream>>>(kp.q, p.stride_q_tok, p.stride_q_head, packed_q, len, p.h_q, d);
      check_cuda(kOp, cudaGetLastError(), "repack launch");
      kp.q = packed_q;
      kp.stride_q_head = d;
      kp.stride_q_tok = p.h_q * d;
    }
    if (!plan.do_vec) {
      repack_kernel<<<rblocks, kThreads, 0, stream>>>(kp.dout, p.stride_do_tok, p.stride_do_head, packed_do, len, p.h_q,
                                                      d);
      check_cuda(kOp, cudaGetLastError(), "repack launch");
      kp.dout = packed_do;
      kp.stride_do_head = d;
      kp.stride_do_tok = p.h_q * d;
    }
    kp.n_q = len;
    kp.lse = p.lse + q0 * p.h_q;
    kp.delta = delta + q0 * p.h_q;
    kp.keys = sched.keys;
    kp.entries = sched.entries;
    kp.lims = sched.lims;
    kp.item_start = sched.item_start;
    kp.counters = sched.counters;
    kp.dq_acc = p.deterministic ? nullptr : dq_buf;
    kp.dq_part = p.deterministic ? dq_buf : nullptr;
    // Deterministic partials of invalid slots stay unwritten and are never read.
    if (!p.deterministic)
      check_cuda(kOp, cudaMemsetAsync(dq_buf, 0, size_t(len) * p.h_q * d * 4, stream), "cudaMemsetAsync");

    const int64_t max_ctas = len * p.h_kv * topk;
    with_64_or_128(d, [&](auto D) {
      with_64_or_128(bk, [&](auto BK) { launch_sparse_bwd<D(), BK()>(kp, num_sms, max_ctas, smem_optin, stream); });
    });
    if (opt.after_main) check_cuda(kOp, cudaEventRecord(opt.after_main, stream), "cudaEventRecord");

    uint16_t* dq = static_cast<uint16_t*>(p.dq) + q0 * p.stride_dq_tok;
    const unsigned cblocks = grid_for(len * p.h_q * (d / 8));
    if (p.deterministic) {
      dq_combine_kernel<<<cblocks, kThreads, 0, stream>>>(dq_buf, topk_idx, sched.qinfo, len * p.h_q, int(p.h_q),
                                                          kp.log2g, int(p.h_kv), topk, kp.bk_shift, d, p.scale, dq,
                                                          p.stride_dq_tok, p.stride_dq_head, dq_vec);
      check_cuda(kOp, cudaGetLastError(), "dq combine launch");
      dkv_combine_kernel<<<unsigned(std::max(1, std::min(plan.item_cap, 65535))), kThreads, 0, stream>>>(
          item_part, sched.keys, sched.item_start, sched.counters, plan.item_cap, n_k, int(p.h_kv), bk, d, dk_acc,
          dv_acc);
      check_cuda(kOp, cudaGetLastError(), "dk/dv combine launch");
    } else {
      dq_convert_kernel<<<cblocks, kThreads, 0, stream>>>(dq_buf, len * p.h_q, int(p.h_q), d, p.scale, dq,
                                                          p.stride_dq_tok, p.stride_dq_head, dq_vec);
      check_cuda(kOp, cudaGetLastError(), "dq convert launch");
    }
  }

  if (n_k > 0) {
    dkv_convert_kernel<<<grid_for(2 * n_k * p.h_kv * (d / 8)), kThreads, 0, stream>>>(
        dk_acc, dv_acc, n_k, int(p.h_kv), d, p.scale, static_cast<uint16_t*>(p.dk), p.stride_dk_tok, p.stride_dk_head,
        static_cast<uint16_t*>(p.dv), p.stride_dv_tok, p.stride_dv_head,
        rows_aligned(p.dk, p.stride_dk_tok, p.stride_dk_head), rows_aligned(p.dv, p.stride_dv_tok, p.stride_dv_head));
    check_cuda(kOp, cudaGetLastError(), "dk/dv convert launch");
  }
}

}  // namespace msa::cuda
