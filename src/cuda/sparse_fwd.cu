// sparse_fwd.cu — host side of the CUDA sparse attention forward: layout checks that pick the load
// paths, the passes over the queries with their stream-ordered workspace (schedule, partials), the
// schedule, the flat dispatch of phase 1 and the local pass over the compiled (d, bk)
// configurations, and the combine (without the local pass).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "host.h"
#include "msa/common.h"
#include "msa/index.h"
#include "sparse_fwd.cuh"
#include "sparse_fwd.h"

namespace msa::cuda {

// Compiled in sparse_fwd_d64.cu and sparse_fwd_d128.cu.
extern template void launch_sparse_phase1<64, 64>(const SparseFwdKernelParams&, int, int, cudaStream_t);
extern template void launch_sparse_phase1<64, 128>(const SparseFwdKernelParams&, int, int, cudaStream_t);
extern template void launch_sparse_phase1<128, 64>(const SparseFwdKernelParams&, int, int, cudaStream_t);
extern template void launch_sparse_phase1<128, 128>(const SparseFwdKernelParams&, int, int, cudaStream_t);
extern template void launch_sparse_local<64, 64>(const SparseFwdKernelParams&, int, int, cudaStream_t);
extern template void launch_sparse_local<64, 128>(const SparseFwdKernelParams&, int, int, cudaStream_t);
extern template void launch_sparse_local<128, 64>(const SparseFwdKernelParams&, int, int, cudaStream_t);
extern template void launch_sparse_local<128, 128>(const SparseFwdKernelParams&, int, int, cudaStream_t);

static_assert(kSpMaxTopk == kMaxTopk, "the local pass's selection scan covers the API's largest topk");

namespace {

constexpr const char* kOp = "sparse_attention_forward";

// cp.async gathers Q in 16-byte pieces; other layouts are first copied to a packed [n_q, h_q, d]
// buffer (one extra pass over q, only for such layouts).
__global__ void repack_q_kernel(const uint16_t* src, int64_t stride_tok, int64_t stride_head, uint16_t* dst, int64_t n,
                                int64_t h, int64_t d) {
  const int64_t total = n * h * d;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e % d, row = e / d;
    dst[e] = src[(row / h) * stride_tok + (row % h) * stride_head + c];
  }
}

// Zero strides and scale get their documented defaults here too, so that a direct caller (the
// benchmark) cannot hand the kernels stride-0 tensors.
AttentionParams resolved(const AttentionParams& p0) {
  AttentionParams p = p0;
  default_strides(p.stride_q_tok, p.stride_q_head, p.h_q, p.d);
  default_strides(p.stride_k_tok, p.stride_k_head, p.h_kv, p.d);
  default_strides(p.stride_v_tok, p.stride_v_head, p.h_kv, p.d);
  default_strides(p.stride_o_tok, p.stride_o_head, p.h_q, p.d);
  if (p.scale == 0.f) p.scale = float(1.0 / std::sqrt(double(p.d)));
  return p;
}

// Pass size, work-item size and the workspace map; one function so that the call and
// sparse_fwd_workspace_bytes agree.
struct Plan {
  int64_t pass = 0;  // query rows per pass (the last one may be shorter)
  int64_t chunk = 0;
  bool q_vec = false;
  SparseScheduleParams sp;  // the fields every pass shares
  size_t sched_bytes = 0, po_bytes = 0, pl_bytes = 0, q_bytes = 0;
  int sched_copies = 1;  // two when there are several passes: pass p + 1's schedule is built during pass p
  size_t sched_total() const { return sched_bytes * size_t(sched_copies); }
  size_t total() const { return sched_total() + po_bytes + pl_bytes + q_bytes; }
};

Plan make_plan_for(const AttentionParams& p, const SparseFwdOptions& opt, int64_t pass) {
  const char* fn = "msa::sparse_attention_forward: ";
  const int64_t n_q = p.seq.n_q, g = p.h_q / p.h_kv, topk = p.topk, d = p.d;
  Plan plan;
  plan.pass = std::min(pass, n_q);
  // Entry ids, sorted positions and item starts are 32-bit (per pass).
  const int64_t n_e = plan.pass * p.h_kv * topk;
  if (n_e >= INT32_MAX)
    throw Error(std::string(fn) + std::to_string(plan.pass) + " queries per pass * h_kv * topk = " +
                std::to_string(n_e) + " selection entries, expected fewer than 2^31 on the cuda backend");
  if (n_q * p.h_q >= (int64_t(1) << 40))
    throw Error(std::string(fn) + "n_q * h_q = " + std::to_string(n_q * p.h_q) +
                " rows, too many for the cuda backend");

  const int64_t queries_per_tile = kSpRows / g;
  const int64_t chunk = opt.chunk_queries > 0 ? opt.chunk_queries : int64_t(kSpItemRows) / g;
  plan.chunk = std::min<int64_t>((chunk + queries_per_tile - 1) / queries_per_tile * queries_per_tile, INT32_MAX / 2);

  SparseScheduleParams& sp = plan.sp;
  sp.n_q_all = n_q;
  sp.n_k = p.seq.n_k;
  sp.batch = p.seq.batch;
  sp.cu_q = p.seq.cu_seqlens_q;
  sp.cu_k = p.seq.cu_seqlens_k;
  sp.q_pos = p.seq.q_pos;
  sp.h_kv = int(p.h_kv);
  sp.topk = int(topk);
  sp.bk = int(p.bk);
  sp.bk_shift = log2_exact(p.bk);
  sp.chunk = int(plan.chunk);
  sp.rank_step = int(std::min<int64_t>(int64_t(kSpRankFactor) * topk * p.bk, INT32_MAX / 2));
  // bf16 partials: the local pass attends the sink and own blocks and merges (no combine kernel).
  sp.local = opt.partial_f32 || !opt.local_pass ? 0 : 1;
  // Query bands: the q rows one kv head's items gather in a band, band * g * d * 2 bytes, stay
  // within kSpBandBytes (a power of two of queries, at least one tile's worth).
  int64_t band = opt.band_queries;
  if (band == 0) band = std::max<int64_t>(queries_per_tile, int64_t(kSpBandBytes) / (g * d * 2));
  sp.band_shift = 62;
  if (band > 0) {
    int shift = 0;
    while (shift < 61 && (int64_t(2) << shift) <= band) ++shift;
    sp.band_shift = shift;
  }

  // CUB's temporary storage need not grow monotonically with the length: size for both pass lengths,
  // and for every band a pass may take (pass_band_shift: the plan's, up to kSpBandHalvings halvings,
  // doublings up to the pass).
  SparseScheduleParams full = sp, tail = sp;
  full.n_q = plan.pass;
  tail.n_q = n_q % plan.pass == 0 ? plan.pass : n_q % plan.pass;
  plan.sched_bytes = align256(std::max(sparse_schedule_bytes(full), sparse_schedule_bytes(tail)));
  if (sp.band_shift > kSpBandHalvings && sp.band_shift < 61) {
    int top = sp.band_shift;
    while (top < 60 && (int64_t(1) << top) < plan.pass) ++top;
    for (int shift = sp.band_shift - kSpBandHalvings; shift <= top; ++shift) {
      full.band_shift = tail.band_shift = shift;
      plan.sched_bytes =
          std::max(plan.sched_bytes, align256(std::max(sparse_schedule_bytes(full), sparse_schedule_bytes(tail))));
    }
  }
  plan.sched_copies = n_q > plan.pass ? 2 : 1;
  // The gather copies 16-byte chunks: q rows must be 16-byte aligned, else a packed copy is gathered.
  plan.q_vec = is_aligned(p.q, 16) && p.stride_q_tok % 8 == 0 && p.stride_q_head % 8 == 0;
  const size_t n_partial = size_t(plan.pass) * p.h_q * topk;
  plan.po_bytes = align256(n_partial * d * (opt.partial_f32 ? 4 : 2));
  plan.pl_bytes = align256(n_partial * 4);
  plan.q_bytes = plan.q_vec ? 0 : align256(size_t(plan.pass) * p.h_q * d * 2);
  return plan;
}

// The band of the pass with rows [q0, q0 + len) from the average entries of its work items, band x
// topk / blocks per (band, kv head, block) with `blocks` the key blocks the pass's last query sees:
// the plan's band halved (at most kSpBandHalvings times) while the half band's items still hold
// kSpBandMinEntries entries (its q rows then stay in L2 at little K/V cost: the first passes of a
// long prompt), or doubled (up to the pass) while it leaves its items fewer than kSpBandMaxEntries
// (each band reads every visible block's K and V once, which then costs more than the gathers that
// miss L2: the later passes).
// Known only for one sequence with implicit positions; the band never changes a value.
int pass_band_shift(const Plan& plan, const AttentionParams& p, const SparseFwdOptions& opt, int64_t q0, int64_t len) {
  int shift = plan.sp.band_shift;
  if (opt.band_queries != 0 || shift <= kSpBandHalvings || shift >= 61 || p.seq.batch != 1 || p.seq.q_pos)
    return shift;
  const int64_t keys = p.seq.n_k - p.seq.n_q + q0 + len;  // the pass's last query sees this many keys
  const int64_t blocks = std::max<int64_t>(1, (keys + p.bk - 1) / p.bk);
  auto band = [](int s) { return int64_t(1) << s; };
  const int plan_shift = shift;
  while (shift < 60 && band(shift) < len && band(shift) * p.topk < blocks * kSpBandMaxEntries) ++shift;
  if (shift > plan_shift) return shift;
  const int64_t queries_per_tile = kSpRows / (p.h_q / p.h_kv);
  for (int h = 0; h < kSpBandHalvings; ++h) {
    const int64_t half = band(shift - 1);
    if (half < queries_per_tile || half * p.topk < blocks * kSpBandMinEntries) break;
    --shift;
  }
  return shift;
}

// The pass size: given, else the largest whose workspace fits max_workspace_bytes (the workspace
// grows with the pass), else the default bound of kSpPassRows partial rows.
Plan make_plan(const AttentionParams& p, const SparseFwdOptions& opt) {
  if (opt.pass_queries > 0) return make_plan_for(p, opt, opt.pass_queries);
  if (opt.max_workspace_bytes == 0)
    return make_plan_for(p, opt, std::max<int64_t>(1, kSpPassRows / (p.h_q * p.topk)));
  // Passes past the 32-bit entry-id bound are not candidates.
  return largest_fitting_plan(
      "msa::sparse_attention_forward: ", opt.max_workspace_bytes,
      std::min<int64_t>(p.seq.n_q, (INT32_MAX - 1) / (p.h_kv * p.topk)),
      [&](int64_t pass) { return make_plan_for(p, opt, pass); }, [](const Plan& plan) { return plan.total(); });
}

}  // namespace

// A second stream forked from the caller's (an event recorded there, waited on here, so that it
// also joins a graph capture) and joined back on destruction, also after a throw: the caller's
// stream then waits for everything enqueued on the side, before the workspace is freed.
struct SideStream {
  enum { kScheduled = 0, kCombined = 1 };
  cudaStream_t stream = nullptr, main = nullptr;
  cudaEvent_t ev[2][2] = {};  // [kind][buffer]
  cudaEvent_t fork = nullptr;
  SideStream() = default;
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  void open(cudaStream_t s) {
    main = s;
    check_cuda(kOp, cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    check_cuda(kOp, cudaEventCreateWithFlags(&fork, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    for (auto& kind : ev)
      for (auto& e : kind) check_cuda(kOp, cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    check_cuda(kOp, cudaEventRecord(fork, main), "cudaEventRecord");
    check_cuda(kOp, cudaStreamWaitEvent(stream, fork, 0), "cudaStreamWaitEvent");
  }
  void record(int kind, int b) { check_cuda(kOp, cudaEventRecord(ev[kind][b], stream), "cudaEventRecord"); }
  void record_main(int kind, int b) { check_cuda(kOp, cudaEventRecord(ev[kind][b], main), "cudaEventRecord"); }
  void wait_on_main(int kind, int b) { check_cuda(kOp, cudaStreamWaitEvent(main, ev[kind][b], 0), "cudaStreamWaitEvent"); }
  void wait_on_side(int kind, int b) { check_cuda(kOp, cudaStreamWaitEvent(stream, ev[kind][b], 0), "cudaStreamWaitEvent"); }
  ~SideStream() {
    if (!stream) return;
    // Join: record the side's tail and make the caller's stream wait for it (errors ignored here:
    // a destructor cannot throw, and the call has already failed if these fail).
    if (cudaEventRecord(fork, stream) == cudaSuccess) cudaStreamWaitEvent(main, fork, 0);
    for (auto& kind : ev)
      for (auto& e : kind)
        if (e) cudaEventDestroy(e);
    cudaEventDestroy(fork);
    cudaStreamDestroy(stream);
  }
};

size_t sparse_fwd_workspace_bytes(const AttentionParams& p0, const SparseFwdOptions& opt) {
  if (p0.seq.n_q == 0) return 0;
  return make_plan(resolved(p0), opt).total();
}

void run_sparse_attention_forward(const AttentionParams& p0, cudaStream_t stream, const SparseFwdOptions& opt) {
  const char* fn = "msa::sparse_attention_forward: ";
  const AttentionParams p = resolved(p0);
  const int d = int(p.d), bk = int(p.bk), topk = int(p.topk);
  const int64_t n_q = p.seq.n_q, g = p.h_q / p.h_kv;
  if (!((d == 64 || d == 128) && (bk == 64 || bk == 128)))
    throw Error(std::string(fn) + "no CUDA kernel for d = " + std::to_string(d) + ", bk = " + std::to_string(bk) +
                " (compiled: d in {64, 128}, bk in {64, 128})");
  Plan plan = make_plan(p, opt);

  ScratchGuard ws;
  ws.stream = stream;
  uint8_t* base = static_cast<uint8_t*>(opt.workspace);
  if (base) {
    if (opt.workspace_bytes < plan.total())
      throw Error(std::string(fn) + "workspace of " + std::to_string(opt.workspace_bytes) + " bytes, this call needs " +
                  std::to_string(plan.total()));
  } else {
    check_cuda(kOp, cudaMallocAsync(&ws.ptr, plan.total(), stream), "cudaMallocAsync");
    base = static_cast<uint8_t*>(ws.ptr);
  }
  uint16_t* packed_q = plan.q_vec ? nullptr : reinterpret_cast<uint16_t*>(base + plan.sched_total() + plan.po_bytes + plan.pl_bytes);

  int device = 0, num_sms = 0, smem_optin = 0;
  check_cuda(kOp, cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(kOp, cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check_cuda(kOp, cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");

  // The fields every pass shares; the query-side pointers move to each pass's first row below.
  SparseFwdKernelParams kp;
  kp.k = static_cast<const uint16_t*>(p.k);
  kp.stride_k_tok = p.stride_k_tok;
  kp.stride_k_head = p.stride_k_head;
  kp.v = static_cast<const uint16_t*>(p.v);
  kp.stride_v_tok = p.stride_v_tok;
  kp.stride_v_head = p.stride_v_head;
  kp.kv_vec = is_aligned(p.k, 16) && is_aligned(p.v, 16) && p.stride_k_tok % 8 == 0 && p.stride_k_head % 8 == 0 &&
              p.stride_v_tok % 8 == 0 && p.stride_v_head % 8 == 0;
  kp.n_k = p.seq.n_k;
  kp.h_q = int(p.h_q);
  kp.h_kv = int(p.h_kv);
  kp.g = int(g);
  kp.log2g = log2_exact(g);
  kp.topk = topk;
  kp.bk_shift = log2_exact(bk);
  kp.scale_log2 = p.scale * 1.4426950408889634f;
  kp.div_per_query = FastDiv(uint32_t(p.h_kv * topk));
  kp.div_topk = FastDiv(uint32_t(topk));
  kp.partial_o = base + plan.sched_total();
  kp.partial_lse = reinterpret_cast<float*>(base + plan.sched_total() + plan.po_bytes);
  kp.partial_f32 = opt.partial_f32 ? 1 : 0;
  kp.stride_o_tok = p.stride_o_tok;
  kp.stride_o_head = p.stride_o_head;
  kp.o_vec = is_aligned(p.o, 16) && p.stride_o_tok % 8 == 0 && p.stride_o_head % 8 == 0;

  // Passes run one after the other on the stream and share the partial buffers. A pass is a plain
  // sub-problem: its rows of q, o, lse and topk_idx, with positions from the whole call's varlen
  // arrays (the schedule reads them at packed row q0 + i); K and V are untouched. With several
  // passes, the schedule of pass p + 1 is built on a second stream into the other schedule buffer
  // while pass p's phase 1 and local pass run (it reads only topk_idx and the varlen arrays); pass
  // p + 1 waits for it, and it waits for pass p - 1's local pass (or combine), the last reader of
  // that buffer.
  auto schedule_of = [&](int64_t q0, int copy, cudaStream_t s) {
    SparseScheduleParams sp = plan.sp;
    sp.q0 = q0;
    sp.n_q = std::min(plan.pass, n_q - q0);
    sp.band_shift = pass_band_shift(plan, p, opt, q0, sp.n_q);
    sp.topk_idx = p.topk_idx + q0 * p.h_kv * topk;
    return build_sparse_schedule(sp, base + size_t(copy) * plan.sched_bytes, plan.sched_bytes, s);
  };
  SideStream side;
  const bool overlap = plan.sched_copies == 2;
  SparseSchedule next_sched;
  if (overlap) {
    side.open(stream);
    next_sched = schedule_of(0, 0, side.stream);
    side.record(SideStream::kScheduled, 0);
  }
  int64_t pass_index = 0;
  for (int64_t q0 = 0; q0 < n_q; q0 += plan.pass, ++pass_index) {
    const int64_t len = std::min(plan.pass, n_q - q0);
    const int32_t* topk_idx = p.topk_idx + q0 * p.h_kv * topk;
    const int copy = int(pass_index & 1);
    SparseSchedule sched;
    if (overlap) {
      sched = next_sched;
      side.wait_on_main(SideStream::kScheduled, copy);  // this pass's schedule is built
    } else {
      sched = schedule_of(q0, 0, stream);
    }
    if (opt.after_schedule) check_cuda(kOp, cudaEventRecord(opt.after_schedule, stream), "cudaEventRecord");

    const uint16_t* q = static_cast<const uint16_t*>(p.q) + q0 * p.stride_q_tok;
    kp.q = q;
    kp.stride_q_tok = p.stride_q_tok;
    kp.stride_q_head = p.stride_q_head;
    if (!plan.q_vec) {
      const int64_t total = len * p.h_q * d;
      const unsigned blocks = unsigned(std::min<int64_t>((total + 255) / 256, 8192));
      repack_q_kernel<<<blocks, 256, 0, stream>>>(q, p.stride_q_tok, p.stride_q_head, packed_q, len, p.h_q, d);
      check_cuda(kOp, cudaGetLastError(), "repack launch");
      kp.q = packed_q;
      kp.stride_q_head = d;
      kp.stride_q_tok = p.h_q * d;
    }
    kp.n_q = len;
    kp.qinfo = sched.qinfo;
    kp.keys = sched.keys;
    kp.entries = sched.entries;
    kp.lims = sched.lims;
    kp.item_start = sched.item_start;
    kp.counters = sched.counters;
    kp.unit_start = sched.unit_start;
    kp.topk_idx = topk_idx;
    kp.o = static_cast<uint16_t*>(p.o) + q0 * p.stride_o_tok;
    kp.lse = p.lse + q0 * p.h_q;

    // Phase 1: persistent CTAs, one per SM (its shared memory allows no second), never more than
    // there can be items.
    const int grid = int(std::min<int64_t>(num_sms, len * p.h_kv * topk));
    with_64_or_128(d, [&](auto D) {
      with_64_or_128(bk, [&](auto BK) { launch_sparse_phase1<D(), BK()>(kp, grid, smem_optin, stream); });
    });
    if (opt.after_phase1) check_cuda(kOp, cudaEventRecord(opt.after_phase1, stream), "cudaEventRecord");

    if (plan.sp.local) {
      // The local pass: one persistent CTA per SM at most (its shared memory allows one), never
      // more than there can be (unit, kv head) items.
      const int lgrid = int(std::min<int64_t>(num_sms, len * p.h_kv));
      with_64_or_128(d, [&](auto D) {
        with_64_or_128(bk, [&](auto BK) { launch_sparse_local<D(), BK()>(kp, lgrid, smem_optin, stream); });
      });
    } else {
      // The combine (the internal option without the local pass).
      const int64_t threads = len * p.h_q * (d / 8);
      const unsigned blocks =
          unsigned(std::min<int64_t>((threads + kSpCombineThreads - 1) / kSpCombineThreads, int64_t(num_sms) * 64));
      // Programmatic dependent launch: the combine's CTAs start as phase 1's persistent CTAs run out
      // of items and wait there for its completion, instead of after a full launch gap.
      auto combine = d == 64
                         ? (opt.partial_f32 ? sparse_fwd_combine_kernel<64, true> : sparse_fwd_combine_kernel<64, false>)
                         : (opt.partial_f32 ? sparse_fwd_combine_kernel<128, true> : sparse_fwd_combine_kernel<128, false>);
      launch_programmatic(kOp, "combine launch", combine, dim3(blocks), dim3(kSpCombineThreads), 0, stream, kp);
    }
    if (overlap && q0 + plan.pass < n_q) {
      // The next pass's schedule goes to the other buffer once pass p - 1's local pass (or combine)
      // is done with it.
      side.record_main(SideStream::kCombined, copy);
      if (pass_index >= 1) side.wait_on_side(SideStream::kCombined, copy ^ 1);
      next_sched = schedule_of(q0 + plan.pass, copy ^ 1, side.stream);
      side.record(SideStream::kScheduled, copy ^ 1);
    }
  }
}

}  // namespace msa::cuda
