// Test of a whole decode step captured in a CUDA graph (append_kv, decode_index_topk,
// decode_attention; planned forms, one workspace) and replayed while contexts grow and new pages
// enter the block table: each replay equals the same calls made eagerly (bitwise: same kernels,
// same inputs) and the CPU reference (cache bytes exactly; attention within the derived bf16
// bounds on the GPU's own selection; the selection against the CPU index pass). When the CUDA
// index pass is not built yet, the captured step is append + attention on a host-made selection,
// and the test says so. The same step runs with an fp8_e4m3 index-key cache (bytes and scales
// equal to the CPU append bit for bit, the selection against the CPU's fp8 index pass). Skips
// with a message when no GPU is visible.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "test_util.h"

namespace msa::test {
namespace {

#ifndef MSA_WITH_CUDA

TEST(CudaDecodeGraph, GpuTests) { GTEST_SKIP() << "built without the CUDA backend: no GPU tests"; }

#else

constexpr double kU = 1.0 / 256;

Exec on(cudaStream_t s) {
  Exec ex;
  ex.backend = Backend::cuda;
  ex.stream = s;
  return ex;
}

std::vector<double> bf16_bytes_to_double(const std::vector<uint8_t>& bytes) {
  Buf b(DType::bf16, bytes.size() / 2);
  b.bytes = bytes;
  return b.to_double();
}

// One decode batch: the device caches of the graph and of the eager calls, the CPU cache, and the
// step inputs at fixed device addresses (a graph replays with the same pointers).
struct Step {
  static constexpr int64_t bk = 64, h_kv = 2, g = 8, h_q = h_kv * g, d = 128, d_idx = 64, topk = 4;
  static constexpr int64_t row = h_kv * d;
  std::vector<int32_t> lens, nq, cu;  // nq: new (= query) tokens per request and step
  int64_t batch, n_q, max_blocks, n_pages;
  std::vector<int32_t> table, free_pages;
  bool fp8;                                 // index keys as e4m3 bytes + float32 scales
  Buf kc, vc, xc;                           // CPU cache (bf16; xc holds the e4m3 bytes with fp8)
  std::vector<float> xsc;                   // CPU scale pool (fp8)
  DevBuf<float> gsc, esc;                   // graph and eager scale pools (fp8)
  DevBuf<uint8_t> gk, gv, gx, ek, ev, ex_;  // graph and eager caches
  DevBuf<int32_t> dtable, dlens, dcu, didx, eidx;
  DevBuf<uint8_t> k, v, x, q, qi, go, eo;
  DevBuf<float> glse, else_;
  std::mt19937_64 rng{2024};

  Step(std::vector<int32_t> prompt, std::vector<int32_t> nq_, int steps, bool fp8_ = false)
      : lens(std::move(prompt)),
        nq(std::move(nq_)),
        cu(cu_from_lengths(nq)),
        batch(int64_t(lens.size())),
        n_q(cu.back()),
        max_blocks(mb(lens, nq, steps)),
        n_pages(batch * max_blocks + 3),
        fp8(fp8_),
        kc(DType::bf16, size_t(n_pages * bk * row)),
        vc(DType::bf16, kc.size()),
        xc(DType::bf16, size_t(n_pages * bk * d_idx / (fp8 ? 2 : 1))),
        xsc(fp8 ? size_t(n_pages * bk) : 0, std::numeric_limits<float>::quiet_NaN()),
        gsc(xsc),
        esc(xsc),
        gk(kc.bytes.size()),
        gv(kc.bytes.size()),
        gx(xc.bytes.size()),
        ek(kc.bytes.size()),
        ev(kc.bytes.size()),
        ex_(xc.bytes.size()),
        dtable(size_t(batch * max_blocks)),
        dlens(size_t(batch)),
        dcu(cu),
        didx(size_t(n_q * h_kv * topk)),
        eidx(size_t(n_q * h_kv * topk)),
        k(size_t(n_q * row * 2)),
        v(size_t(n_q * row * 2)),
        x(size_t(n_q * d_idx * 2)),
        q(size_t(n_q * h_q * d * 2)),
        qi(size_t(n_q * h_kv * d_idx * 2)),
        go(size_t(n_q * h_q * d * 2)),
        eo(size_t(n_q * h_q * d * 2)),
        glse(size_t(n_q * h_q)),
        else_(size_t(n_q * h_q)) {
    kc.poison(), vc.poison(), xc.poison();
    for (DevBuf<uint8_t>* b : {&gk, &gv, &ek, &ev})
      cuda_check(cudaMemcpy(b->ptr, kc.data(), kc.bytes.size(), cudaMemcpyHostToDevice), "upload");
    for (DevBuf<uint8_t>* b : {&gx, &ex_})
      cuda_check(cudaMemcpy(b->ptr, xc.data(), xc.bytes.size(), cudaMemcpyHostToDevice), "upload");
    free_pages.resize(n_pages);
    std::iota(free_pages.begin(), free_pages.end(), 0);
    std::shuffle(free_pages.begin(), free_pages.end(), rng);
    table.assign(batch * max_blocks, -1);
    // The prompt: written through append_kv on every copy (one eager step without queries).
    std::vector<int32_t> zero(batch, 0);
    grow_table(lens);
    append_all(zero, lens);
  }

  static int64_t mb(const std::vector<int32_t>& l, const std::vector<int32_t>& n, int steps) {
    int64_t m = 0;
    for (size_t b = 0; b < l.size(); ++b) m = std::max<int64_t>(m, (l[b] + n[b] * steps + bk - 1) / bk);
    return m;
  }

  // New pages for blocks that lens now reaches.
  void grow_table(const std::vector<int32_t>& upto) {
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t j = 0; j < (upto[b] + bk - 1) / bk; ++j)
        if (table[b * max_blocks + j] < 0) {
          table[b * max_blocks + j] = free_pages.back();
          free_pages.pop_back();
        }
    cuda_check(cudaMemcpy(dtable.ptr, table.data(), table.size() * 4, cudaMemcpyHostToDevice), "table");
  }

  AppendKvParams append_params(const int32_t* seq_lens, const int32_t* cu_new, int64_t n_new, const void* kk,
                               const void* vv, const void* xx, void* kcache, void* vcache, void* xcache,
                               const int32_t* tbl, float* xscale) {
    AppendKvParams p;
    p.cache.batch = batch;
    p.cache.n_pages = n_pages;
    p.cache.bk = bk;
    p.cache.h_kv = h_kv;
    p.cache.d = d;
    p.cache.d_idx = d_idx;
    p.cache.k_cache = kcache;
    p.cache.v_cache = vcache;
    p.cache.k_idx_cache = xcache;
    if (fp8) {
      p.cache.k_idx_format = IndexKeyFormat::fp8_e4m3;
      p.cache.k_idx_scale = xscale;
    }
    p.cache.block_table = tbl;
    p.cache.max_blocks = max_blocks;
    p.cache.seq_lens = seq_lens;
    p.dtype = DType::bf16;
    p.n_new = n_new;
    p.cu_new = cu_new;
    p.k = kk;
    p.v = vv;
    p.k_idx = xx;
    return p;
  }

  // Tokens [from[b], to[b]) of every request appended to all three caches eagerly.
  void append_all(const std::vector<int32_t>& from, const std::vector<int32_t>& to) {
    std::vector<int32_t> n(batch);
    for (int64_t b = 0; b < batch; ++b) n[b] = to[b] - from[b];
    const std::vector<int32_t> c = cu_from_lengths(n);
    const int64_t tot = c.back();
    Buf bk_(DType::bf16, randn(rng, size_t(tot * row), 1.0, DType::bf16));
    Buf bv(DType::bf16, randn(rng, size_t(tot * row), 1.0, DType::bf16));
    Buf bx(DType::bf16, randn(rng, size_t(tot * d_idx), 1.0, DType::bf16));
    AppendKvParams p = append_params(to.data(), c.data(), tot, bk_.data(), bv.data(), bx.data(), kc.data(), vc.data(),
                                     xc.data(), table.data(), xsc.data());
    append_kv(p);
    DevBuf<int32_t> dl(to), dc(c);
    DevBuf<uint8_t> dk(bk_.bytes), dv(bv.bytes), dx(bx.bytes);
    for (int copy = 0; copy < 2; ++copy) {
      AppendKvParams pg = append_params(dl.ptr, dc.ptr, tot, dk.ptr, dv.ptr, dx.ptr, copy ? ek.ptr : gk.ptr,
                                        copy ? ev.ptr : gv.ptr, copy ? ex_.ptr : gx.ptr, dtable.ptr,
                                        copy ? esc.ptr : gsc.ptr);
      append_kv(pg, on(nullptr));
    }
    cuda_check(cudaDeviceSynchronize(), "prompt append");
  }
};

DecodeIndexParams index_params(Step& S, uint8_t* xcache, int32_t* idx, float* xscale) {
  DecodeIndexParams p;
  p.cache.batch = S.batch;
  p.cache.n_pages = S.n_pages;
  p.cache.bk = S.bk;
  p.cache.h_kv = S.h_kv;
  p.cache.d = S.d;
  p.cache.d_idx = S.d_idx;
  p.cache.k_idx_cache = xcache;
  if (S.fp8) {
    p.cache.k_idx_format = IndexKeyFormat::fp8_e4m3;
    p.cache.k_idx_scale = xscale;
  }
  p.cache.block_table = S.dtable.ptr;
  p.cache.max_blocks = S.max_blocks;
  p.cache.seq_lens = S.dlens.ptr;
  p.dtype = DType::bf16;
  p.topk = S.topk;
  p.n_q = S.n_q;
  p.cu_seqlens_q = S.dcu.ptr;
  p.q_idx = S.qi.ptr;
  p.topk_idx = idx;
  return p;
}

DecodeAttentionParams attention_params(Step& S, uint8_t* kcache, uint8_t* vcache, const int32_t* idx, uint8_t* o,
                                       float* lse) {
  DecodeAttentionParams p;
  p.cache.batch = S.batch;
  p.cache.n_pages = S.n_pages;
  p.cache.bk = S.bk;
  p.cache.h_kv = S.h_kv;
  p.cache.d = S.d;
  p.cache.k_cache = kcache;
  p.cache.v_cache = vcache;
  p.cache.block_table = S.dtable.ptr;
  p.cache.max_blocks = S.max_blocks;
  p.cache.seq_lens = S.dlens.ptr;
  p.dtype = DType::bf16;
  p.h_q = S.h_q;
  p.n_q = S.n_q;
  p.cu_seqlens_q = S.dcu.ptr;
  p.q = S.q.ptr;
  p.topk_idx = idx;
  p.topk = S.topk;
  p.o = o;
  p.lse = lse;
  return p;
}

// The CPU attention (float32 on the bf16 cache) over a given selection, and over |v|.
void cpu_attention(Step& S, const std::vector<int32_t>& idx, const std::vector<double>& q, std::vector<double>& o,
                   std::vector<double>& lse, std::vector<double>& o_abs) {
  std::vector<double> kd = S.kc.to_double(), vd = S.vc.to_double(), va(vd.size());
  for (size_t e = 0; e < vd.size(); ++e) va[e] = std::abs(vd[e]);
  Buf k(DType::f32, kd), v(DType::f32, vd), vab(DType::f32, va), qq(DType::f32, q);
  for (int pass = 0; pass < 2; ++pass) {
    Buf ob(DType::f32, size_t(S.n_q * S.h_q * S.d));
    std::vector<float> l(S.n_q * S.h_q);
    DecodeAttentionParams p;
    p.cache.batch = S.batch;
    p.cache.n_pages = S.n_pages;
    p.cache.bk = S.bk;
    p.cache.h_kv = S.h_kv;
    p.cache.d = S.d;
    p.cache.k_cache = k.data();
    p.cache.v_cache = pass ? vab.data() : v.data();
    p.cache.block_table = S.table.data();
    p.cache.max_blocks = S.max_blocks;
    p.cache.seq_lens = S.lens.data();
    p.dtype = DType::f32;
    p.h_q = S.h_q;
    p.n_q = S.n_q;
    p.cu_seqlens_q = S.cu.data();
    p.q = qq.data();
    p.topk_idx = idx.data();
    p.topk = S.topk;
    p.o = ob.data();
    p.lse = l.data();
    decode_attention(p);
    if (pass) {
      o_abs = ob.to_double();
    } else {
      o = ob.to_double();
      lse.assign(l.begin(), l.end());
    }
  }
}

// A host-made selection for when the CUDA index pass is missing: the own block and random
// visible others, ascending, -1 padded.
std::vector<int32_t> host_selection(Step& S) {
  std::vector<int32_t> idx(S.n_q * S.h_kv * S.topk, -1);
  for (int64_t b = 0; b < S.batch; ++b)
    for (int64_t t = 0; t < S.nq[b]; ++t) {
      const int64_t i = S.cu[b] + t, own = (S.lens[b] - S.nq[b] + t) / S.bk;
      for (int64_t r = 0; r < S.h_kv; ++r) {
        std::vector<int32_t> cand(own);
        std::iota(cand.begin(), cand.end(), 0);
        std::shuffle(cand.begin(), cand.end(), S.rng);
        cand.resize(std::min<int64_t>(cand.size(), S.topk - 1));
        cand.push_back(int32_t(own));
        std::sort(cand.begin(), cand.end());
        std::copy(cand.begin(), cand.end(), idx.begin() + (i * S.h_kv + r) * S.topk);
      }
    }
  return idx;
}

void captured_step_replays(bool fp8) {
  const int steps = 5;
  // Contexts at and around page boundaries, one request with 2 tokens per step (speculative).
  Step S({63, 127, 1000, 1, 256}, {1, 2, 1, 1, 1}, steps, fp8);
  cudaStream_t stream;
  cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");

  DecodeShape shape;
  shape.batch = S.batch;
  shape.n_q = S.n_q;
  shape.max_q = 2;
  shape.max_blocks = S.max_blocks;
  shape.bk = S.bk;
  shape.h_kv = S.h_kv;
  shape.h_q = S.h_q;
  shape.d = S.d;
  shape.d_idx = S.d_idx;
  shape.topk = S.topk;
  shape.k_idx_format = fp8 ? IndexKeyFormat::fp8_e4m3 : IndexKeyFormat::native;
  const DecodePlan plan = plan_decode(shape, on(stream));
  DevBuf<uint8_t> ws(plan.workspace_bytes), ews(plan.workspace_bytes);

  // Is the CUDA index pass there? Tried eagerly on the current (prompt) state, outside capture.
  bool with_index = true;
  {
    cuda_check(cudaMemcpy(S.dlens.ptr, S.lens.data(), S.batch * 4, cudaMemcpyHostToDevice), "lens");
    S.qi.poison(0);
    try {
      decode_index_topk(index_params(S, S.ex_.ptr, S.eidx.ptr, S.esc.ptr), plan, ews.ptr, on(stream));
      cuda_check(cudaStreamSynchronize(stream), "index probe");
    } catch (const msa::Error&) {
      throw;
    } catch (const std::exception& e) {
      with_index = false;
      std::cout << "[ NOTE     ] CUDA decode index pass unavailable (" << e.what()
                << "): capturing append_kv + decode_attention with a host-made selection\n";
    }
  }

  std::vector<int32_t> cur = S.lens;
  for (int64_t b = 0; b < S.batch; ++b) cur[b] += S.nq[b];
  // The step's pointers are fixed; its sizes (n_q, n_new) too. Everything else is device data.
  AppendKvParams ap = S.append_params(S.dlens.ptr, S.dcu.ptr, S.n_q, S.k.ptr, S.v.ptr, S.x.ptr, S.gk.ptr, S.gv.ptr,
                                      S.gx.ptr, S.dtable.ptr, S.gsc.ptr);
  DecodeIndexParams ip = index_params(S, S.gx.ptr, S.didx.ptr, S.gsc.ptr);
  DecodeAttentionParams tp = attention_params(S, S.gk.ptr, S.gv.ptr, S.didx.ptr, S.go.ptr, S.glse.ptr);

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cuda_check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
  append_kv(ap, on(stream));
  if (with_index) decode_index_topk(ip, plan, ws.ptr, on(stream));
  decode_attention(tp, plan, ws.ptr, on(stream));
  cuda_check(cudaStreamEndCapture(stream, &graph), "end capture");
  cuda_check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");

  int64_t idx_rows_same = 0, idx_rows = 0;
  double worst = 0;
  for (int step = 0; step < steps; ++step) {
    // The scheduler's part: grow seq_lens, give new blocks pages, upload this step's inputs.
    S.lens = cur;
    for (int64_t b = 0; b < S.batch; ++b) cur[b] += S.nq[b];
    S.grow_table(S.lens);
    cuda_check(cudaMemcpy(S.dlens.ptr, S.lens.data(), S.batch * 4, cudaMemcpyHostToDevice), "lens");
    const std::vector<double> kn = randn(S.rng, size_t(S.n_q * S.row), 1.0, DType::bf16);
    const std::vector<double> vn = randn(S.rng, kn.size(), 1.0, DType::bf16);
    const std::vector<double> xn = randn(S.rng, size_t(S.n_q * S.d_idx), 1.0, DType::bf16);
    const std::vector<double> qn = randn(S.rng, size_t(S.n_q * S.h_q * S.d), 2.0, DType::bf16);
    const std::vector<double> qin = randn(S.rng, size_t(S.n_q * S.h_kv * S.d_idx), 1.0, DType::bf16);
    Buf bk_(DType::bf16, kn), bv(DType::bf16, vn), bx(DType::bf16, xn), bq(DType::bf16, qn), bqi(DType::bf16, qin);
    cuda_check(cudaMemcpy(S.k.ptr, bk_.data(), bk_.bytes.size(), cudaMemcpyHostToDevice), "k");
    cuda_check(cudaMemcpy(S.v.ptr, bv.data(), bv.bytes.size(), cudaMemcpyHostToDevice), "v");
    cuda_check(cudaMemcpy(S.x.ptr, bx.data(), bx.bytes.size(), cudaMemcpyHostToDevice), "x");
    cuda_check(cudaMemcpy(S.q.ptr, bq.data(), bq.bytes.size(), cudaMemcpyHostToDevice), "q");
    cuda_check(cudaMemcpy(S.qi.ptr, bqi.data(), bqi.bytes.size(), cudaMemcpyHostToDevice), "q_idx");
    std::vector<int32_t> host_idx;
    if (!with_index) {
      host_idx = host_selection(S);
      cuda_check(cudaMemcpy(S.didx.ptr, host_idx.data(), host_idx.size() * 4, cudaMemcpyHostToDevice), "idx");
      cuda_check(cudaMemcpy(S.eidx.ptr, host_idx.data(), host_idx.size() * 4, cudaMemcpyHostToDevice), "idx");
    }
    S.go.poison(0xff);
    S.eo.poison(0xff);

    cuda_check(cudaGraphLaunch(exec, stream), "graph launch");
    // The same calls eagerly on the second cache.
    append_kv(S.append_params(S.dlens.ptr, S.dcu.ptr, S.n_q, S.k.ptr, S.v.ptr, S.x.ptr, S.ek.ptr, S.ev.ptr, S.ex_.ptr,
                              S.dtable.ptr, S.esc.ptr),
              on(stream));
    if (with_index) decode_index_topk(index_params(S, S.ex_.ptr, S.eidx.ptr, S.esc.ptr), plan, ews.ptr, on(stream));
    decode_attention(attention_params(S, S.ek.ptr, S.ev.ptr, S.eidx.ptr, S.eo.ptr, S.else_.ptr), plan, ews.ptr,
                     on(stream));
    cuda_check(cudaStreamSynchronize(stream), "step");

    // CPU: append, then the index pass and the attention on the GPU's selection.
    AppendKvParams cp = S.append_params(S.lens.data(), S.cu.data(), S.n_q, bk_.data(), bv.data(), bx.data(),
                                        S.kc.data(), S.vc.data(), S.xc.data(), S.table.data(), S.xsc.data());
    append_kv(cp);
    const std::string at = "step " + std::to_string(step);
    ASSERT_TRUE(bitwise_equal(S.gk.get(), S.kc.bytes)) << at << ": k cache (graph) vs CPU append";
    ASSERT_TRUE(bitwise_equal(S.gv.get(), S.vc.bytes)) << at << ": v cache";
    ASSERT_TRUE(bitwise_equal(S.gx.get(), S.xc.bytes)) << at << ": index-key cache";
    ASSERT_TRUE(bitwise_equal(S.ex_.get(), S.xc.bytes)) << at << ": index-key cache (eager)";
    if (fp8) {
      const std::vector<float> gs = S.gsc.get(), es = S.esc.get();
      ASSERT_EQ(0, std::memcmp(gs.data(), S.xsc.data(), gs.size() * 4)) << at << ": index-key scales (graph) vs CPU";
      ASSERT_EQ(0, std::memcmp(es.data(), S.xsc.data(), es.size() * 4)) << at << ": index-key scales (eager) vs CPU";
    }
    ASSERT_TRUE(bitwise_equal(S.ek.get(), S.kc.bytes)) << at << ": k cache (eager)";
    const std::vector<int32_t> gidx = S.didx.get(), eidx = S.eidx.get();
    ASSERT_EQ(gidx, eidx) << at << ": selection, graph vs eager";
    const std::vector<uint8_t> go = S.go.get(), eo = S.eo.get();
    ASSERT_TRUE(bitwise_equal(go, eo)) << at << ": o, graph vs eager";
    ASSERT_TRUE(bitwise_equal(S.glse.get(), S.else_.get())) << at << ": lse, graph vs eager";
    if (with_index) {
      std::vector<int32_t> cidx(gidx.size(), -7);
      DecodeIndexParams cip;
      cip.cache = cp.cache;
      cip.dtype = DType::bf16;
      cip.topk = S.topk;
      cip.n_q = S.n_q;
      cip.cu_seqlens_q = S.cu.data();
      cip.q_idx = bqi.data();
      cip.topk_idx = cidx.data();
      decode_index_topk(cip);
      for (int64_t rr = 0; rr < S.n_q * S.h_kv; ++rr, ++idx_rows)
        idx_rows_same +=
            std::equal(cidx.begin() + rr * S.topk, cidx.begin() + (rr + 1) * S.topk, gidx.begin() + rr * S.topk);
    }
    std::vector<double> o, lse, o_abs;
    cpu_attention(S, gidx, qn, o, lse, o_abs);
    const std::vector<double> got = bf16_bytes_to_double(go);
    const std::vector<float> glse = S.glse.get();
    for (size_t e = 0; e < o.size(); ++e) {
      const double tol = kU * std::abs(o[e]) + (2 * kU + 1e-4) * o_abs[e] + 1e-7;
      ASSERT_TRUE(std::isfinite(got[e])) << at << ": o[" << e << "] not finite";
      worst = std::max(worst, std::abs(got[e] - o[e]) / tol);
    }
    for (size_t e = 0; e < lse.size(); ++e) ASSERT_NEAR(glse[e], lse[e], 2e-5 + 1e-5 * std::abs(lse[e])) << at;
  }
  std::cout << "[ worst    ] o: " << worst << "x the bound over " << steps << " replays"
            << (with_index ? "" : " (host-made selection)") << "\n";
  EXPECT_LE(worst, 1.0);
  if (with_index) {
    std::cout << "[ index    ] " << idx_rows_same << " / " << idx_rows << " rows equal to the CPU selection\n";
    // Near-ties of bf16 scores summed in another order may swap a block; most rows must agree.
    EXPECT_GE(idx_rows_same * 100, idx_rows * 95);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

TEST(CudaDecodeGraph, CapturedStepReplaysWithGrowingContexts) {
  REQUIRE_GPU();
  captured_step_replays(false);
}

TEST(CudaDecodeGraph, CapturedStepReplaysWithFp8IndexKeys) {
  REQUIRE_GPU();
  captured_step_replays(true);
}

#endif  // MSA_WITH_CUDA

}  // namespace
}  // namespace msa::test
