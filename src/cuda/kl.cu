// kl.cu — host side of the CUDA KL alignment loss and backward: the passes over the queries (and,
// in the warm-up phase, over ranges of key blocks) with their stream-ordered workspace, the sparse
// forward's schedule reused as the reverse index, the flat dispatch of the main kernel over the
// compiled (d, d_idx, bk), the dK kernel, and the small kernels that combine the per-slot partials
// (index lse, dq_idx), finish dk_idx and reduce the loss in a fixed order. Design:
// docs/kl_backward.md.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "host.h"
#include "kl.cuh"
#include "kl.h"
#include "msa/common.h"

namespace msa::cuda {

// Compiled in kl_d64.cu and kl_d128.cu.
extern template void launch_kl_main<64, 64, 64>(const KlKernelParams&, const char*, int, int, cudaStream_t);
extern template void launch_kl_main<64, 64, 128>(const KlKernelParams&, const char*, int, int, cudaStream_t);
extern template void launch_kl_main<64, 128, 64>(const KlKernelParams&, const char*, int, int, cudaStream_t);
extern template void launch_kl_main<64, 128, 128>(const KlKernelParams&, const char*, int, int, cudaStream_t);
extern template void launch_kl_main<128, 64, 64>(const KlKernelParams&, const char*, int, int, cudaStream_t);
extern template void launch_kl_main<128, 64, 128>(const KlKernelParams&, const char*, int, int, cudaStream_t);
extern template void launch_kl_main<128, 128, 64>(const KlKernelParams&, const char*, int, int, cudaStream_t);
extern template void launch_kl_main<128, 128, 128>(const KlKernelParams&, const char*, int, int, cudaStream_t);

namespace {

unsigned grid_for(int64_t n) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>((n + kKlSmallThreads - 1) / kKlSmallThreads, 16384)));
}

__device__ __forceinline__ uint16_t to_bf16_bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }

// cp.async gathers q and q_idx in 16-byte pieces; other layouts are first copied to a packed
// [n, h, d] buffer (one extra pass, only for such layouts).
__global__ void kl_repack_kernel(const uint16_t* src, int64_t stride_tok, int64_t stride_head, uint16_t* dst, int64_t n,
                                 int64_t h, int64_t d) {
  const int64_t total = n * h * d;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e % d, row = e / d;
    dst[e] = src[(row / h) * stride_tok + (row % h) * stride_head + c];
  }
}

// Warm-up range m: every (query, group) row selects blocks m * slots .. m * slots + slots - 1; the
// schedule drops the ones a query cannot see.
__global__ void kl_range_selection_kernel(int32_t* idx, int64_t n, int slots, int32_t first_block) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x)
    idx[e] = first_block + int32_t(e % slots);
}

// Per (query, group) row: the log2-unit partial lse of its valid slots merged (in slot order) into
// the running value of the earlier block ranges; the last range writes the natural-log index lse.
__global__ void kl_lse_combine_kernel(const float* part_lse, const int32_t* idx, const int2* qinfo, int64_t rows,
                                      int h_kv, int topk, int bk_shift, float* acc, float* out, int first, int last) {
  for (int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; row < rows;
       row += int64_t(gridDim.x) * blockDim.x) {
    const int pos = qinfo[row / h_kv].y;
    const float prev = first ? -INFINITY : acc[row];
    float mx = prev;
    for (int s = 0; s < topk; ++s)
      if (sp_entry_valid(idx[row * topk + s], pos, bk_shift)) mx = fmaxf(mx, part_lse[row * topk + s]);
    float res = -INFINITY;
    if (mx != -INFINITY) {
      float sum = exp2f(prev - mx);
      for (int s = 0; s < topk; ++s)
        if (sp_entry_valid(idx[row * topk + s], pos, bk_shift)) sum += exp2f(part_lse[row * topk + s] - mx);
      res = mx + log2f(sum);
    }
    if (last)
      out[row] = res * 0.6931471805599453f;
    else
      acc[row] = res;
  }
}

// Per (query, group) row and 4 columns: dq = sum over the valid slots (in slot order) of the
// partials, added to the earlier ranges' sum; the last range writes index_scale * dq in bf16.
__global__ void kl_dq_combine_kernel(const float* part_dq, const int32_t* idx, const int2* qinfo, int64_t rows,
                                     int h_kv, int topk, int bk_shift, int di, float* acc, uint16_t* dq,
                                     int64_t stride_tok, int64_t stride_head, float iscale, int first, int last) {
  const int c4s = di / 4;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < rows * c4s;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = t / c4s;
    const int c = int(t % c4s) * 4;
    const int pos = qinfo[row / h_kv].y;
    float4 a = first ? make_float4(0.f, 0.f, 0.f, 0.f) : *reinterpret_cast<const float4*>(acc + row * di + c);
    for (int s = 0; s < topk; ++s) {
      if (!sp_entry_valid(idx[row * topk + s], pos, bk_shift)) continue;
      const float4 v = __ldcs(reinterpret_cast<const float4*>(part_dq + (row * topk + s) * di + c));
      a.x += v.x, a.y += v.y, a.z += v.z, a.w += v.w;
    }
    if (last) {
      const int64_t i = row / h_kv, r = row % h_kv;
      uint16_t* dst = dq + i * stride_tok + r * stride_head + c;
      dst[0] = to_bf16_bits(a.x * iscale);
      dst[1] = to_bf16_bits(a.y * iscale);
      dst[2] = to_bf16_bits(a.z * iscale);
      dst[3] = to_bf16_bits(a.w * iscale);
    } else {
      *reinterpret_cast<float4*>(acc + row * di + c) = a;
    }
  }
}

__global__ void kl_dk_finalize_kernel(const float* acc, int64_t n_k, int di, uint16_t* dk, int64_t stride_tok,
                                      float iscale) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n_k * di; e += int64_t(gridDim.x) * blockDim.x)
    dk[(e / di) * stride_tok + e % di] = to_bf16_bits(acc[e] * iscale);
}

// Deterministic sum of part[0, n): block b sums a fixed strided subset in a fixed order and a fixed
// tree; the final kernel adds the block sums in order to *total.
constexpr int kKlReduceBlocks = 512;

__global__ void kl_reduce_blocks_kernel(const double* part, int64_t n, double* block_sums) {
  __shared__ double sh[kKlSmallThreads];
  double s = 0.0;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x)
    s += part[e];
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int w = kKlSmallThreads / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) block_sums[blockIdx.x] = sh[0];
}

__global__ void kl_reduce_final_kernel(const double* block_sums, int nb, double* total) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    double s = 0.0;
    for (int b = 0; b < nb; ++b) s += block_sums[b];
    *total += s;
  }
}

// Zero strides and scales get their documented defaults here too, so that a direct caller (the
// benchmark) cannot hand the kernels stride-0 tensors.
IndexKLParams resolved(const IndexKLParams& p0) {
  IndexKLParams p = p0;
  default_strides(p.stride_q_tok, p.stride_q_head, p.h_q, p.d);
  default_strides(p.stride_k_tok, p.stride_k_head, p.h_kv, p.d);
  default_strides(p.stride_q_idx_tok, p.stride_q_idx_head, p.h_kv, p.d_idx);
  default_strides(p.stride_dq_idx_tok, p.stride_dq_idx_head, p.h_kv, p.d_idx);
  if (p.stride_k_idx_tok == 0) p.stride_k_idx_tok = p.d_idx;
  if (p.stride_dk_idx_tok == 0) p.stride_dk_idx_tok = p.d_idx;
  if (p.scale == 0.f) p.scale = float(1.0 / std::sqrt(double(p.d)));
  if (p.index_scale == 0.f) p.index_scale = float(1.0 / std::sqrt(double(p.d_idx)));
  return p;
}

void launch_main(const KlKernelParams& kp, const char* op, int d, int di, int bk, int grid, int smem_optin,
                 cudaStream_t stream) {
  with_64_or_128(d, [&](auto D) {
    with_64_or_128(di, [&](auto DI) {
      with_64_or_128(bk, [&](auto BK) { launch_kl_main<D(), DI(), BK()>(kp, op, grid, smem_optin, stream); });
    });
  });
}

void launch_dk(const KlKernelParams& kp, const char* op, int di, int bk, int grid, cudaStream_t stream) {
  with_64_or_128(
      di, [&](auto DI) { with_64_or_128(bk, [&](auto BK) { launch_kl_dk<DI(), BK()>(kp, op, grid, stream); }); });
}

}  // namespace

double run_index_kl(const IndexKLParams& p0, cudaStream_t stream, bool backward, const KlOptions& opt) {
  const char* op = backward ? "index_kl_backward" : "index_kl_loss";
  const std::string fn = std::string("msa::") + op + ": ";
  const IndexKLParams p = resolved(p0);
  const int d = int(p.d), di = int(p.d_idx);
  const bool sparse = p.topk_idx != nullptr;
  // The warm-up walks the prefix in 128-key blocks (the shape the main kernel is fastest at).
  const int bk = sparse ? int(p.bk) : 128;
  const int slots = sparse ? int(p.topk) : kKlWarmSlots;
  const int64_t n_q = p.seq.n_q, n_k = p.seq.n_k, h_kv = p.h_kv, g = p.h_q / p.h_kv;
  if (!((d == 64 || d == 128) && (di == 64 || di == 128) && (bk == 64 || bk == 128)))
    throw Error(fn + "no CUDA kernel for d = " + std::to_string(d) + ", d_idx = " + std::to_string(di) +
                ", bk = " + std::to_string(bk) + " (compiled: d, d_idx, bk in {64, 128})");
  if (!(g == 1 || g == 2 || g == 4 || g == 8 || g == 16))
    throw Error(fn + "h_q / h_kv = " + std::to_string(g) + ", expected one of 1, 2, 4, 8, 16 on the cuda backend");
  if (n_q > 0 && p.lse == nullptr)
    throw Error(fn +
                "lse is null, expected the main branch's saved lse [n_q, h_q] (the cuda backend does not "
                "recompute the teacher's normalisers)");

  const int64_t n_blocks = (n_k + bk - 1) / bk;
  const int n_ranges = sparse ? 1 : int(std::max<int64_t>(1, (n_blocks + slots - 1) / slots));
  const bool need_ilse = p.index_lse == nullptr;
  const int64_t chunk = (int64_t(kKlChunkFactor) * slots * bk + kKlRows - 1) / kKlRows * kKlRows;

  SparseScheduleParams sp;
  sp.n_q_all = n_q;
  sp.n_k = n_k;
  sp.batch = p.seq.batch;
  sp.cu_q = p.seq.cu_seqlens_q;
  sp.cu_k = p.seq.cu_seqlens_k;
  sp.q_pos = p.seq.q_pos;
  sp.h_kv = int(h_kv);
  sp.topk = slots;
  sp.bk = bk;
  sp.bk_shift = log2_exact(bk);
  sp.chunk = int(std::min<int64_t>(chunk, INT32_MAX / 2));
  const bool q_vec = is_aligned(p.q, 16) && p.stride_q_tok % 8 == 0 && p.stride_q_head % 8 == 0;
  const bool qi_vec = is_aligned(p.q_idx, 16) && p.stride_q_idx_tok % 8 == 0 && p.stride_q_idx_head % 8 == 0;

  // The workspace map of a pass size; the total grows with the pass.
  struct Map {
    int64_t pass = 0, n_e = 0;
    size_t sched_bytes = 0, o_sched, o_plse, o_ilse_acc, o_ilse, o_sel, o_pdq, o_ds, o_dq_acc, o_dk_acc, o_klp, o_kls,
           o_q, o_qi, total = 0;
  };
  auto map_for = [&](int64_t pass_rows) {
    Map m;
    m.pass = std::max<int64_t>(1, std::min<int64_t>(pass_rows, n_q));
    m.n_e = m.pass * h_kv * slots;
    if (n_q > 0) {
      SparseScheduleParams full = sp, tail = sp;
      full.n_q = m.pass;
      tail.n_q = n_q % m.pass == 0 ? m.pass : n_q % m.pass;
      m.sched_bytes = align256(std::max(sparse_schedule_bytes(full), sparse_schedule_bytes(tail)));
    }
    size_t off = 0;
    auto take = [&](size_t bytes, bool use) {
      const size_t at = off;
      if (use) off += align256(bytes);
      return at;
    };
    const size_t n_e = size_t(m.n_e), rows = size_t(m.pass * h_kv);
    m.o_sched = take(m.sched_bytes, true);
    m.o_plse = take(n_e * 4, need_ilse);
    m.o_ilse_acc = take(rows * 4, need_ilse && n_ranges > 1);
    m.o_ilse = take(rows * 4, need_ilse);
    m.o_sel = take(n_e * 4, !sparse);
    m.o_pdq = take(n_e * di * 4, backward);
    m.o_ds = take(n_e * bk * 2, backward);
    m.o_dq_acc = take(rows * di * 4, backward && n_ranges > 1);
    m.o_dk_acc = take(size_t(std::max<int64_t>(n_k, 1)) * di * 4, backward);
    m.o_klp = take(n_e * 8, !backward);
    m.o_kls = take(size_t(kKlReduceBlocks) * 8 + 8, !backward);
    m.o_q = take(size_t(m.pass) * p.h_q * d * 2, !q_vec);
    m.o_qi = take(rows * di * 2, !qi_vec);
    m.total = std::max<size_t>(off, 256);
    return m;
  };
  // Entry ids, sorted positions and item starts are 32-bit per pass.
  const int64_t max_pass = std::max<int64_t>(1, (INT32_MAX - 1) / (h_kv * slots));
  Map map;
  if (opt.pass_queries > 0) {
    map = map_for(std::min(opt.pass_queries, max_pass));
  } else if (opt.max_workspace_bytes == 0) {
    map = map_for(std::min(max_pass, std::max<int64_t>(1, kKlPassBytes / (h_kv * slots * int64_t(di) * 4))));
  } else {
    // The largest pass whose workspace fits the caller's budget.
    map = largest_fitting_plan(fn, opt.max_workspace_bytes, std::min(n_q, max_pass), map_for,
                               [](const Map& m) { return m.total; });
  }
  const int64_t pass = map.pass;
  const size_t sched_bytes = map.sched_bytes, o_sched = map.o_sched, o_plse = map.o_plse, o_ilse_acc = map.o_ilse_acc,
               o_ilse = map.o_ilse, o_sel = map.o_sel, o_pdq = map.o_pdq, o_ds = map.o_ds, o_dq_acc = map.o_dq_acc,
               o_dk_acc = map.o_dk_acc, o_klp = map.o_klp, o_kls = map.o_kls, o_q = map.o_q, o_qi = map.o_qi;

  ScratchGuard ws;
  ws.stream = stream;
  check_cuda(op, cudaMallocAsync(&ws.ptr, map.total, stream), "cudaMallocAsync");
  uint8_t* base = static_cast<uint8_t*>(ws.ptr);
  auto at = [&](size_t o) { return static_cast<void*>(base + o); };

  int device = 0, num_sms = 0, smem_optin = 0;
  check_cuda(op, cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(op, cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check_cuda(op, cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");

  KlKernelParams kp;
  kp.k = static_cast<const uint16_t*>(p.k);
  kp.stride_k_tok = p.stride_k_tok;
  kp.stride_k_head = p.stride_k_head;
  kp.k_idx = static_cast<const uint16_t*>(p.k_idx);
  kp.stride_ki_tok = p.stride_k_idx_tok;
  kp.k_vec = is_aligned(p.k, 16) && p.stride_k_tok % 8 == 0 && p.stride_k_head % 8 == 0;
  kp.ki_vec = is_aligned(p.k_idx, 16) && p.stride_k_idx_tok % 8 == 0;
  kp.n_k = n_k;
  kp.h_q = int(p.h_q);
  kp.h_kv = int(h_kv);
  kp.g = int(g);
  kp.log2g = log2_exact(g);
  kp.topk = slots;
  kp.bk_shift = sp.bk_shift;
  kp.scale_log2 = p.scale * 1.4426950408889634f;
  kp.iscale_log2 = p.index_scale * 1.4426950408889634f;
  kp.ds_coef = n_q > 0 ? float(double(p.lambda) / (double(n_q) * double(h_kv))) : 0.f;
  kp.part_lse = static_cast<float*>(at(o_plse));
  kp.part_dq = static_cast<float*>(at(o_pdq));
  kp.ds = static_cast<uint16_t*>(at(o_ds));
  kp.kl_part = static_cast<double*>(at(o_klp));
  kp.dk_acc = static_cast<float*>(at(o_dk_acc));
  double* kl_blocks = static_cast<double*>(at(o_kls));
  double* kl_total = kl_blocks + kKlReduceBlocks;

  if (backward && n_k > 0)
    check_cuda(op, cudaMemsetAsync(kp.dk_acc, 0, size_t(n_k) * di * 4, stream), "cudaMemsetAsync");
  if (!backward) check_cuda(op, cudaMemsetAsync(kl_total, 0, 8, stream), "cudaMemsetAsync");

  const int main_grid_cap = num_sms;
  for (int64_t q0 = 0; q0 < n_q; q0 += pass) {
    const int64_t len = std::min(pass, n_q - q0);
    const int64_t len_rows = len * h_kv, len_e = len_rows * slots;
    const uint16_t* q = static_cast<const uint16_t*>(p.q) + q0 * p.stride_q_tok;
    const uint16_t* qi = static_cast<const uint16_t*>(p.q_idx) + q0 * p.stride_q_idx_tok;
    kp.q = q;
    kp.stride_q_tok = p.stride_q_tok;
    kp.stride_q_head = p.stride_q_head;
    if (!q_vec) {
      uint16_t* dst = static_cast<uint16_t*>(at(o_q));
      kl_repack_kernel<<<grid_for(len * p.h_q * d), kKlSmallThreads, 0, stream>>>(q, p.stride_q_tok, p.stride_q_head,
                                                                                  dst, len, p.h_q, d);
      check_cuda(op, cudaGetLastError(), "repack launch");
      kp.q = dst;
      kp.stride_q_head = d;
      kp.stride_q_tok = p.h_q * d;
    }
    kp.q_idx = qi;
    kp.stride_qi_tok = p.stride_q_idx_tok;
    kp.stride_qi_head = p.stride_q_idx_head;
    if (!qi_vec) {
      uint16_t* dst = static_cast<uint16_t*>(at(o_qi));
      kl_repack_kernel<<<grid_for(len_rows * di), kKlSmallThreads, 0, stream>>>(
          qi, p.stride_q_idx_tok, p.stride_q_idx_head, dst, len, h_kv, di);
      check_cuda(op, cudaGetLastError(), "repack launch");
      kp.q_idx = dst;
      kp.stride_qi_head = di;
      kp.stride_qi_tok = h_kv * di;
    }
    kp.n_q = len;
    kp.lse = p.lse + q0 * p.h_q;

    int32_t* synth = static_cast<int32_t*>(at(o_sel));
    const int32_t* sel = sparse ? p.topk_idx + q0 * h_kv * slots : synth;
    int built = -1;  // block range whose schedule is in the workspace
    SparseSchedule sched{};
    auto schedule = [&](int m) {
      if (built == m) return;
      if (!sparse) {
        kl_range_selection_kernel<<<grid_for(len_e), kKlSmallThreads, 0, stream>>>(synth, len_e, slots, m * slots);
        check_cuda(op, cudaGetLastError(), "range selection launch");
      }
      SparseScheduleParams s = sp;
      s.q0 = q0;
      s.n_q = len;
      s.topk_idx = sel;
      sched = build_sparse_schedule(s, at(o_sched), sched_bytes, stream);
      built = m;
      kp.qinfo = sched.qinfo;
      kp.keys = sched.keys;
      kp.entries = sched.entries;
      kp.lims = sched.lims;
      kp.item_start = sched.item_start;
      kp.counters = sched.counters;
    };
    // The work counter of the main kernel starts at 0 with each schedule build; a second launch on
    // the same schedule needs it reset.
    auto reset_counter = [&] { check_cuda(op, cudaMemsetAsync(sched.counters + 2, 0, 4, stream), "cudaMemsetAsync"); };
    const int grid = int(std::min<int64_t>(main_grid_cap, len_e));

    // Index lse over the support, unless given.
    if (need_ilse) {
      float* ilse = static_cast<float*>(at(o_ilse));
      for (int m = 0; m < n_ranges; ++m) {
        schedule(m);
        kp.mode = kKlModeLse;
        launch_main(kp, op, d, di, bk, grid, smem_optin, stream);
        kl_lse_combine_kernel<<<grid_for(len_rows), kKlSmallThreads, 0, stream>>>(
            kp.part_lse, sel, sched.qinfo, len_rows, int(h_kv), slots, sp.bk_shift, static_cast<float*>(at(o_ilse_acc)),
            ilse, m == 0, m == n_ranges - 1);
        check_cuda(op, cudaGetLastError(), "lse combine launch");
      }
      kp.index_lse = ilse;
    } else {
      kp.index_lse = p.index_lse + q0 * h_kv;
    }
    if (opt.after_lse) check_cuda(op, cudaEventRecord(opt.after_lse, stream), "cudaEventRecord");

    for (int m = 0; m < n_ranges; ++m) {
      if (built == m)
        reset_counter();
      else
        schedule(m);
      kp.mode = backward ? kKlModeGrad : kKlModeLoss;
      if (!backward) check_cuda(op, cudaMemsetAsync(kp.kl_part, 0, size_t(len_e) * 8, stream), "cudaMemsetAsync");
      launch_main(kp, op, d, di, bk, grid, smem_optin, stream);
      if (opt.after_main) check_cuda(op, cudaEventRecord(opt.after_main, stream), "cudaEventRecord");
      if (backward) {
        launch_dk(kp, op, di, bk, 3 * num_sms, stream);
        kl_dq_combine_kernel<<<grid_for(len_rows * (di / 4)), kKlSmallThreads, 0, stream>>>(
            kp.part_dq, sel, sched.qinfo, len_rows, int(h_kv), slots, sp.bk_shift, di,
            static_cast<float*>(at(o_dq_acc)), static_cast<uint16_t*>(p.dq_idx) + q0 * p.stride_dq_idx_tok,
            p.stride_dq_idx_tok, p.stride_dq_idx_head, p.index_scale, m == 0, m == n_ranges - 1);
        check_cuda(op, cudaGetLastError(), "dq combine launch");
      } else {
        const int nb = int(std::min<int64_t>(kKlReduceBlocks, (len_e + kKlSmallThreads - 1) / kKlSmallThreads));
        kl_reduce_blocks_kernel<<<nb, kKlSmallThreads, 0, stream>>>(kp.kl_part, len_e, kl_blocks);
        kl_reduce_final_kernel<<<1, 32, 0, stream>>>(kl_blocks, nb, kl_total);
        check_cuda(op, cudaGetLastError(), "loss reduction launch");
      }
    }
  }

  if (backward) {
    if (n_k > 0) {
      kl_dk_finalize_kernel<<<grid_for(n_k * di), kKlSmallThreads, 0, stream>>>(
          kp.dk_acc, n_k, di, static_cast<uint16_t*>(p.dk_idx), p.stride_dk_idx_tok, p.index_scale);
      check_cuda(op, cudaGetLastError(), "dk finalize launch");
    }
    return 0.0;
  }
  double total = 0.0;
  check_cuda(op, cudaMemcpyAsync(&total, kl_total, 8, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
  check_cuda(op, cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  return n_q > 0 ? total / (double(n_q) * double(h_kv)) : 0.0;
}

}  // namespace msa::cuda
