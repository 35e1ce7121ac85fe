// Tests of msa::sparse_attention_backward on the CUDA backend against the CPU backend (float64) on
// the same bf16 inputs (q, k, v, do, and the forward's o rounded to bf16 with its float32 lse):
// awkward lengths (1 .. 4097), every (d, g, bk), topk 1 .. 32, varlen batches with empty and tiny
// sequences, chunked queries (bottom-right and explicit positions), rows with fewer than topk or no
// entries, a sink chosen by every query (its group splits into many work items) next to a block
// chosen by none (exact zero dk, dv), no queries at all, strided and misaligned operands, query
// passes and tiny work items (internal options), deterministic mode (20 bitwise-identical runs),
// the non-deterministic mode's spread, garbage contents (memory safety), and shape errors.
// GPU tests skip with a message when no device is visible.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "test_util.h"
#ifdef MSA_WITH_CUDA
#include "cuda/sparse_bwd.h"
#endif

namespace msa::test {
namespace {

TEST(CudaSparseBwd, BadArgumentsThrowBeforeLaunch) {
  REQUIRE_CUDA_BUILD();
  int32_t dummy[4] = {0, 0, 0, 0};
  AttentionBwdParams p;
  p.seq.n_q = p.seq.n_k = 8;
  p.h_q = 4;
  p.h_kv = 2;
  p.d = 128;
  p.bk = 128;
  p.topk = 4;
  p.q = p.k = p.v = p.do_ = dummy;
  p.o = dummy;
  p.dq = p.dk = p.dv = dummy;
  p.lse = reinterpret_cast<float*>(dummy);
  p.topk_idx = dummy;
  Exec ex;
  ex.backend = Backend::cuda;
  auto with = [&](auto change, std::initializer_list<const char*> frags) {
    AttentionBwdParams a = p;
    change(a);
    return throws_error([&] { sparse_attention_backward(a, ex); }, frags);
  };
  EXPECT_TRUE(with([](AttentionBwdParams& a) { a.d = 96; }, {"msa::sparse_attention_backward", "d = 96"}));
  EXPECT_TRUE(with([](AttentionBwdParams& a) { a.bk = 32; }, {"bk = 32"}));
  EXPECT_TRUE(with([](AttentionBwdParams& a) { a.h_q = 6, a.h_kv = 2; }, {"h_q / h_kv = 3"}));
  EXPECT_TRUE(with([](AttentionBwdParams& a) { a.dtype = DType::f32; }, {"bfloat16"}));
  EXPECT_TRUE(with([](AttentionBwdParams& a) { a.topk = 33; }, {"topk = 33"}));
  EXPECT_TRUE(with([](AttentionBwdParams& a) { a.topk_idx = nullptr; }, {"topk_idx"}));
  EXPECT_TRUE(with([](AttentionBwdParams& a) { a.do_ = nullptr; }, {"do"}));
  EXPECT_TRUE(with([](AttentionBwdParams& a) { a.dk = nullptr; }, {"dk"}));
}

#ifndef MSA_WITH_CUDA

TEST(CudaSparseBwd, GpuTests) { GTEST_SKIP() << "built without the CUDA backend: no GPU tests"; }

#else

constexpr double kU = 1.0 / 256;  // bf16 unit roundoff, 2^-8

// One problem: lengths, heads, the selection and the logical data (doubles exact in bf16), plus
// the forward's o (rounded to bf16) and lse (rounded to float32) that both backends consume.
struct Problem {
  int64_t h_q = 4, h_kv = 2, d = 128, bk = 128, topk = 8;
  std::vector<int32_t> cu_q, cu_k;
  std::vector<int32_t> q_pos;  // empty: bottom-right aligned
  bool pass_cu = true;         // false: one sequence, null cu_seqlens
  std::vector<double> q, k, v, dout, o, lse;
  std::vector<int32_t> idx;

  int64_t n_q() const { return cu_q.back(); }
  int64_t n_k() const { return cu_k.back(); }
  int64_t batch() const { return int64_t(cu_q.size()) - 1; }
  int64_t g() const { return h_q / h_kv; }
  int64_t seq(int64_t i) const {
    int64_t b = 0;
    while (cu_q[b + 1] <= i) ++b;
    return b;
  }
  int64_t pos(int64_t i) const {
    if (!q_pos.empty()) return q_pos[i];
    const int64_t b = seq(i);
    return (cu_k[b + 1] - cu_k[b]) - (cu_q[b + 1] - cu_q[b]) + (i - cu_q[b]);
  }
  double scale() const { return 1.0 / std::sqrt(double(d)); }
};

Problem make_problem(uint64_t seed, const std::vector<int32_t>& lens_q, const std::vector<int32_t>& lens_k, int64_t h_q,
                     int64_t h_kv, int64_t d, int64_t bk, int64_t topk) {
  std::mt19937_64 rng(seed);
  Problem P;
  P.h_q = h_q;
  P.h_kv = h_kv;
  P.d = d;
  P.bk = bk;
  P.topk = topk;
  P.cu_q = cu_from_lengths(lens_q);
  P.cu_k = cu_from_lengths(lens_k);
  // q a little larger than k: many peaked softmax rows, so P and dS are not tiny averages.
  P.q = randn(rng, P.n_q() * h_q * d, 2.0, DType::bf16);
  P.k = randn(rng, P.n_k() * h_kv * d, 1.0, DType::bf16);
  P.v = randn(rng, P.n_k() * h_kv * d, 1.0, DType::bf16);
  P.dout = randn(rng, P.n_q() * h_q * d, 1.0, DType::bf16);
  return P;
}

// Random visible blocks per (query, group) as in the forward's tests: the local block most of the
// time, block `every` in every row that sees it, block `none` in no row; `fill` takes as many as
// fit, otherwise a random count; every `empty_every`-th row is all padding.
void select_random(Problem& P, uint64_t seed, bool fill, int32_t every = -1, int32_t none = -1, int empty_every = 0) {
  std::mt19937_64 rng(seed);
  P.idx.assign(P.n_q() * P.h_kv * P.topk, -1);
  std::bernoulli_distribution take_own(0.85);
  for (int64_t i = 0; i < P.n_q(); ++i) {
    const int32_t own = int32_t(P.pos(i) / P.bk);
    for (int64_t r = 0; r < P.h_kv; ++r) {
      const int64_t row_id = i * P.h_kv + r;
      if (empty_every > 0 && row_id % empty_every == 0) continue;
      std::vector<int32_t> row, cand;
      if (every >= 0 && every <= own) row.push_back(every);
      if (own != every && own != none && take_own(rng) && int64_t(row.size()) < P.topk) row.push_back(own);
      for (int32_t b = 0; b < own; ++b)
        if (b != every && b != none) cand.push_back(b);
      std::shuffle(cand.begin(), cand.end(), rng);
      const int64_t room = std::min<int64_t>(P.topk - int64_t(row.size()), int64_t(cand.size()));
      const int64_t c = fill ? room : std::uniform_int_distribution<int64_t>(0, room)(rng);
      row.insert(row.end(), cand.begin(), cand.begin() + c);
      std::shuffle(row.begin(), row.end(), rng);
      std::copy(row.begin(), row.end(), P.idx.begin() + row_id * P.topk);
    }
  }
}

AttentionBwdParams base_params(const Problem& P) {
  AttentionBwdParams a;
  a.seq.n_q = P.n_q();
  a.seq.n_k = P.n_k();
  a.seq.batch = P.batch();
  a.h_q = P.h_q;
  a.h_kv = P.h_kv;
  a.d = P.d;
  a.bk = P.bk;
  a.topk = P.topk;
  return a;
}

// The forward on the CPU in float64, its o rounded to bf16 and lse to float32: the inputs o and lse
// of both backward runs.
void forward_on_cpu(Problem& P) {
  AttentionParams a = base_params(P);
  a.seq.cu_seqlens_q = P.cu_q.data();
  a.seq.cu_seqlens_k = P.cu_k.data();
  a.seq.q_pos = P.q_pos.empty() ? nullptr : P.q_pos.data();
  a.dtype = DType::f64;
  a.topk_idx = P.idx.data();
  Buf q(DType::f64, P.q), k(DType::f64, P.k), v(DType::f64, P.v), o(DType::f64, P.n_q() * P.h_q * P.d);
  std::vector<float> lse(P.n_q() * P.h_q);
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.o = o.data();
  a.lse = lse.data();
  sparse_attention_forward(a, Exec{});
  P.o = Buf(DType::bf16, o.to_double()).to_double();
  P.lse.assign(lse.begin(), lse.end());
}

// Reference gradients from the CPU backend (float64) and, per element, the scale of the bf16
// errors of the GPU computation:
//   dv_abs = sum_i P |do_i|                                  (P rounded to bf16 for dV += P^T dO)
//   dk_abs = scale sum_i P (|dP| + |delta|) |q_i|            (dS rounded to bf16 for dK += dS^T Q)
//   dq_abs = scale sum_j P (|dP| + |delta|) |k_j|            (the same for dQ = dS K)
struct Ref {
  std::vector<double> dq, dk, dv, dq_abs, dk_abs, dv_abs;
};

Ref cpu_reference(const Problem& P) {
  Ref ref;
  AttentionBwdParams a = base_params(P);
  a.seq.cu_seqlens_q = P.cu_q.data();
  a.seq.cu_seqlens_k = P.cu_k.data();
  a.seq.q_pos = P.q_pos.empty() ? nullptr : P.q_pos.data();
  a.dtype = DType::f64;
  a.topk_idx = P.idx.data();
  std::vector<float> lse(P.lse.begin(), P.lse.end());
  Buf q(DType::f64, P.q), k(DType::f64, P.k), v(DType::f64, P.v), o(DType::f64, P.o), dout(DType::f64, P.dout);
  Buf dq(DType::f64, P.q.size()), dk(DType::f64, P.k.size()), dv(DType::f64, P.v.size());
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.o = o.data();
  a.lse = lse.data();
  a.do_ = dout.data();
  a.dq = dq.data();
  a.dk = dk.data();
  a.dv = dv.data();
  sparse_attention_backward(a, Exec{});
  ref.dq = dq.to_double();
  ref.dk = dk.to_double();
  ref.dv = dv.to_double();

  const int64_t d = P.d, g = P.g();
  const double scale = P.scale();
  ref.dq_abs.assign(P.q.size(), 0.0);
  ref.dk_abs.assign(P.k.size(), 0.0);
  ref.dv_abs.assign(P.v.size(), 0.0);
  for (int64_t i = 0; i < P.n_q(); ++i) {
    const int64_t b = P.seq(i), k0 = P.cu_k[b], pos = P.pos(i);
    for (int64_t r = 0; r < P.h_kv; ++r) {
      std::vector<int32_t> blocks;
      for (int64_t s = 0; s < P.topk; ++s) {
        const int32_t blk = P.idx[(i * P.h_kv + r) * P.topk + s];
        if (blk >= 0) blocks.push_back(blk);
      }
      for (int64_t e = 0; e < g; ++e) {
        const int64_t h = r * g + e;
        const double* qi = &P.q[(i * P.h_q + h) * d];
        const double* di = &P.dout[(i * P.h_q + h) * d];
        const double* oi = &P.o[(i * P.h_q + h) * d];
        double delta = 0;
        for (int64_t c = 0; c < d; ++c) delta += di[c] * oi[c];
        for (int32_t blk : blocks)
          for (int64_t j = blk * P.bk; j < std::min<int64_t>((blk + 1) * P.bk, pos + 1); ++j) {
            const double* kj = &P.k[((k0 + j) * P.h_kv + r) * d];
            const double* vj = &P.v[((k0 + j) * P.h_kv + r) * d];
            double s = 0, dp = 0;
            for (int64_t c = 0; c < d; ++c) s += qi[c] * kj[c], dp += di[c] * vj[c];
            const double pr = std::exp(s * scale - P.lse[i * P.h_q + h]);
            const double w = scale * pr * (std::abs(dp) + std::abs(delta));
            double* dka = &ref.dk_abs[((k0 + j) * P.h_kv + r) * d];
            double* dva = &ref.dv_abs[((k0 + j) * P.h_kv + r) * d];
            double* dqa = &ref.dq_abs[(i * P.h_q + h) * d];
            for (int64_t c = 0; c < d; ++c) {
              dva[c] += pr * std::abs(di[c]);
              dka[c] += w * std::abs(qi[c]);
              dqa[c] += w * std::abs(kj[c]);
            }
          }
      }
    }
  }
  return ref;
}

// Operand layouts of a GPU call: extra elements per head and per token and elements before the
// first row (a misaligned base when not a multiple of 8), for the query-side tensors (q, o, do,
// dq) and the key-side ones (k, v, dk, dv).
struct Layout {
  int64_t q_pad_head = 0, q_pad_tok = 0, q_off = 0;
  int64_t kv_pad_head = 0, kv_pad_tok = 0, kv_off = 0;
};

struct Out {
  std::vector<double> dq, dk, dv;
  std::vector<uint16_t> bits;  // dq, dk, dv bit patterns back to back
};

std::vector<uint16_t> to_strided(const std::vector<double>& x, int64_t n, int64_t h, int64_t d, int64_t s_head,
                                 int64_t s_tok, int64_t off) {
  std::vector<uint16_t> out(size_t(off + std::max<int64_t>(n, 1) * s_tok), 0x7fc0);  // gaps hold NaN
  for (int64_t t = 0; t < n; ++t)
    for (int64_t e = 0; e < h; ++e)
      for (int64_t c = 0; c < d; ++c)
        out[off + t * s_tok + e * s_head + c] = float_to_bf16(float(x[(t * h + e) * d + c])).bits;
  return out;
}

// Reads a strided bf16 tensor back; the gaps between rows must still hold the poison.
std::vector<double> from_strided(const std::vector<uint16_t>& buf, int64_t n, int64_t h, int64_t d, int64_t s_head,
                                 int64_t s_tok, int64_t off, std::vector<uint16_t>& bits, const char* name) {
  std::vector<double> x(n * h * d);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t e = 0; e < h; ++e) {
      for (int64_t c = 0; c < d; ++c) {
        const uint16_t b = buf[off + t * s_tok + e * s_head + c];
        bits.push_back(b);
        x[(t * h + e) * d + c] = bf16_to_float(bf16{b});
      }
      for (int64_t c = d; c < s_head && e + 1 < h; ++c)
        if (buf[off + t * s_tok + e * s_head + c] != 0xffff)
          throw std::runtime_error(std::string(name) + " padding was written");
    }
  return x;
}

struct RunOpts {
  bool deterministic = false;
  int64_t pass_queries = 0, chunk_queries = 0;  // > 0: the internal entry with these options
  cudaStream_t stream = nullptr;
};

Out run_gpu(const Problem& P, const Layout& L = {}, const RunOpts& ro = {}) {
  const int64_t n_q = P.n_q(), n_k = P.n_k(), d = P.d;
  const int64_t qh = d + L.q_pad_head, qt = P.h_q * qh + L.q_pad_tok;
  const int64_t kh = d + L.kv_pad_head, kt = P.h_kv * kh + L.kv_pad_tok;
  DevBuf<uint16_t> q(to_strided(P.q, n_q, P.h_q, d, qh, qt, L.q_off));
  DevBuf<uint16_t> o(to_strided(P.o, n_q, P.h_q, d, qh, qt, L.q_off));
  DevBuf<uint16_t> dout(to_strided(P.dout, n_q, P.h_q, d, qh, qt, L.q_off));
  DevBuf<uint16_t> k(to_strided(P.k, n_k, P.h_kv, d, kh, kt, L.kv_off));
  DevBuf<uint16_t> v(to_strided(P.v, n_k, P.h_kv, d, kh, kt, L.kv_off));
  std::vector<float> lse_f(P.lse.begin(), P.lse.end());
  DevBuf<float> lse(lse_f);
  DevBuf<uint16_t> dq(size_t(L.q_off + std::max<int64_t>(n_q, 1) * qt));
  DevBuf<uint16_t> dk(size_t(L.kv_off + std::max<int64_t>(n_k, 1) * kt)), dv(dk.n);
  DevBuf<int32_t> idx(P.idx), cu_q(P.cu_q), cu_k(P.cu_k), q_pos(P.q_pos);
  // All-ones bytes: NaN as bf16, so an unwritten output cannot pass.
  dq.poison(0xff);
  dk.poison(0xff);
  dv.poison(0xff);
  AttentionBwdParams a = base_params(P);
  if (P.pass_cu) {
    a.seq.cu_seqlens_q = cu_q.ptr;
    a.seq.cu_seqlens_k = cu_k.ptr;
  }
  a.seq.q_pos = P.q_pos.empty() ? nullptr : q_pos.ptr;
  a.q = q.ptr + L.q_off;
  a.o = o.ptr + L.q_off;
  a.do_ = dout.ptr + L.q_off;
  a.dq = dq.ptr + L.q_off;
  a.stride_q_head = a.stride_o_head = a.stride_do_head = a.stride_dq_head = qh;
  a.stride_q_tok = a.stride_o_tok = a.stride_do_tok = a.stride_dq_tok = qt;
  a.k = k.ptr + L.kv_off;
  a.v = v.ptr + L.kv_off;
  a.dk = dk.ptr + L.kv_off;
  a.dv = dv.ptr + L.kv_off;
  a.stride_k_head = a.stride_v_head = a.stride_dk_head = a.stride_dv_head = kh;
  a.stride_k_tok = a.stride_v_tok = a.stride_dk_tok = a.stride_dv_tok = kt;
  a.lse = lse.ptr;
  a.topk_idx = idx.ptr;
  a.deterministic = ro.deterministic;
  if (ro.pass_queries > 0 || ro.chunk_queries > 0) {
    cuda::SparseBwdOptions opt;
    opt.pass_queries = ro.pass_queries;
    opt.chunk_queries = ro.chunk_queries;
    a.scale = float(P.scale());
    cuda::run_sparse_attention_backward(a, ro.stream, opt);
  } else {
    Exec ex;
    ex.backend = Backend::cuda;
    ex.stream = ro.stream;
    sparse_attention_backward(a, ex);
  }
  cuda_check(cudaStreamSynchronize(ro.stream), "sparse_attention_backward");
  cuda_check(cudaGetLastError(), "sparse_attention_backward");
  Out out;
  out.dq = from_strided(dq.get(), n_q, P.h_q, d, qh, qt, L.q_off, out.bits, "dq");
  out.dk = from_strided(dk.get(), n_k, P.h_kv, d, kh, kt, L.kv_off, out.bits, "dk");
  out.dv = from_strided(dv.get(), n_k, P.h_kv, d, kh, kt, L.kv_off, out.bits, "dv");
  return out;
}

// Per element |got - ref| <= u |ref| + (2u + 1e-4) abs: the final bf16 rounding, the bf16 rounding
// of P (dv) or dS (dk, dq) before their products (u abs), and 1e-4 abs + u abs for the rest:
// second-order terms, float32 accumulation and atomics order, float32 S, dP, delta and the ex2
// approximation (all ~1e-6 relative to abs). An element no query reaches has abs = 0 and must be
// exactly 0. Reports the worst element as a multiple of its bound.
::testing::AssertionResult compare_one(const char* name, const std::vector<double>& got, const std::vector<double>& ref,
                                       const std::vector<double>& abs, int64_t h, int64_t d, const std::string& what,
                                       double* worst_out = nullptr) {
  double worst = 0;
  int64_t worst_e = -1;
  for (size_t e = 0; e < ref.size(); ++e) {
    const double g = got[e], r = ref[e];
    if (!std::isfinite(g))
      return ::testing::AssertionFailure() << what << ": " << name << " not finite at token " << e / d / h << ", head "
                                           << (e / d) % h << ", col " << e % d;
    const double tol = kU * std::abs(r) + (2 * kU + 1e-4) * abs[e];
    const double err = std::abs(g - r);
    const double excess = tol > 0 ? err / tol : (err > 0 ? INFINITY : 0.0);
    if (excess > worst) {
      worst = excess;
      worst_e = int64_t(e);
    }
  }
  if (worst_out) *worst_out = std::max(*worst_out, worst);
  if (worst > 1.0) {
    const int64_t e = worst_e;
    return ::testing::AssertionFailure() << what << ": " << name << " at token " << e / d / h << ", head "
                                         << (e / d) % h << ", col " << e % d << ": got " << got[e] << ", expected "
                                         << ref[e] << " (abs " << abs[e] << "), error " << worst << "x the bound";
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult compare(const Problem& P, const Out& got, const Ref& ref, const std::string& what,
                                   double* worst = nullptr) {
  auto r = compare_one("dq", got.dq, ref.dq, ref.dq_abs, P.h_q, P.d, what, worst);
  if (!r) return r;
  r = compare_one("dk", got.dk, ref.dk, ref.dk_abs, P.h_kv, P.d, what, worst);
  if (!r) return r;
  return compare_one("dv", got.dv, ref.dv, ref.dv_abs, P.h_kv, P.d, what, worst);
}

std::string describe(const Problem& P) {
  std::ostringstream os;
  os << "n_q=" << P.n_q() << " n_k=" << P.n_k() << " batch=" << P.batch() << " h_q=" << P.h_q << " h_kv=" << P.h_kv
     << " d=" << P.d << " bk=" << P.bk << " topk=" << P.topk;
  return os.str();
}

// Runs both modes against one reference; prints the worst error as a fraction of the bound.
void check(Problem& P, const std::string& what, const Layout& L = {}, const RunOpts& ro = {}) {
  forward_on_cpu(P);
  const Ref ref = cpu_reference(P);
  double worst = 0;
  RunOpts det = ro;
  det.deterministic = true;
  RunOpts nondet = ro;
  nondet.deterministic = false;
  EXPECT_TRUE(compare(P, run_gpu(P, L, nondet), ref, what + " (atomics)", &worst));
  EXPECT_TRUE(compare(P, run_gpu(P, L, det), ref, what + " (deterministic)", &worst));
  std::printf("  %s: worst error %.3f of the bound\n", what.c_str(), worst);
}

TEST(CudaSparseBwd, SingleSequenceLengths) {
  REQUIRE_GPU();
  struct C {
    int32_t len;
    int64_t h_q, h_kv, d, bk, topk;
  };
  const C cases[] = {{1, 8, 2, 128, 128, 8},     {127, 8, 2, 128, 64, 8},   {128, 8, 2, 64, 128, 4},
                     {129, 8, 2, 128, 64, 3},    {1023, 8, 2, 128, 128, 8}, {1023, 4, 1, 64, 64, 5},
                     {4097, 2, 1, 128, 128, 16}, {4097, 16, 1, 128, 128, 4}};
  uint64_t seed = 100;
  for (const C& c : cases) {
    Problem P = make_problem(seed, {c.len}, {c.len}, c.h_q, c.h_kv, c.d, c.bk, c.topk);
    P.pass_cu = (seed % 2) == 0;
    select_random(P, seed + 1, /*fill=*/true);
    check(P, describe(P));
    ++seed;
  }
}

TEST(CudaSparseBwd, AllHeadDimsGroupSizesAndBlockSizes) {
  REQUIRE_GPU();
  uint64_t seed = 200;
  for (int64_t d : {64, 128})
    for (int64_t g : {1, 2, 4, 8, 16})
      for (int64_t bk : {64, 128}) {
        const int64_t h_kv = g >= 8 ? 1 : 2;
        Problem P = make_problem(seed, {300, 77}, {300, 77}, g * h_kv, h_kv, d, bk, bk == 64 ? 5 : 3);
        select_random(P, seed + 1, /*fill=*/(seed % 2) == 0);
        check(P, describe(P));
        ++seed;
      }
}

TEST(CudaSparseBwd, TopkOneToThirtyTwo) {
  REQUIRE_GPU();
  uint64_t seed = 250;
  for (int64_t topk : {1, 2, 7, 16, 31, 32}) {
    Problem P = make_problem(seed, {2100}, {2100}, 4, 2, 64, 64, topk);
    select_random(P, seed + 1, /*fill=*/true);
    check(P, describe(P));
    ++seed;
  }
}

TEST(CudaSparseBwd, VarlenBatchTinyAndLong) {
  REQUIRE_GPU();
  const std::vector<int32_t> lens = {1, 0, 700, 3, 129, 1500, 2};
  Problem P = make_problem(300, lens, lens, 16, 2, 128, 128, 6);
  select_random(P, 301, false);
  check(P, describe(P));
  Problem P2 = make_problem(302, lens, lens, 8, 8, 64, 64, 4);
  select_random(P2, 303, true);
  check(P2, describe(P2));
}

TEST(CudaSparseBwd, ChunkedQueriesAndExplicitPositions) {
  REQUIRE_GPU();
  Problem P = make_problem(400, {100, 37, 1}, {1000, 37, 513}, 8, 2, 128, 64, 8);
  select_random(P, 401, true);
  check(P, describe(P) + " bottom-right");
  Problem E = make_problem(500, {50, 20}, {900, 300}, 4, 1, 128, 128, 4);
  std::mt19937_64 rng(501);
  E.q_pos.resize(E.n_q());
  for (int64_t i = 0; i < E.n_q(); ++i) {
    const int64_t len_k = E.seq(i) == 0 ? 900 : 300;
    E.q_pos[i] = int32_t(std::uniform_int_distribution<int64_t>(0, len_k - 1)(rng));
  }
  E.q_pos[0] = 899;  // decode position: the last key
  E.q_pos[1] = 0;    // sees exactly one key
  select_random(E, 502, false);
  check(E, describe(E) + " explicit positions");
}

TEST(CudaSparseBwd, FewerThanTopkAndEmptyRows) {
  REQUIRE_GPU();
  // Random counts (many rows below topk) and every 7th (query, group) row all padding: dq = 0.
  Problem P = make_problem(600, {800}, {800}, 8, 2, 64, 64, 12);
  select_random(P, 601, false, -1, -1, 7);
  check(P, describe(P));
}

TEST(CudaSparseBwd, SinkChosenByEveryQueryAndBlockChosenByNone) {
  REQUIRE_GPU();
  // Block 0 is in every row: with topk 4 and bk 64 a work item holds at most 256 queries (512 in
  // deterministic mode), so its 3000 queries span 12 (6) items whose dk, dv partials are reduced.
  // Block 2 is in no row: its dk, dv must be exactly zero (abs = 0 in the comparison).
  for (int64_t g : {1, 16}) {
    Problem P = make_problem(700 + g, {3000}, {3000}, g, 1, 128, 64, 4);
    select_random(P, 701 + g, true, /*every=*/0, /*none=*/2);
    check(P, describe(P));
    const Out out = run_gpu(P);
    for (int64_t j = 128; j < 192; ++j)
      for (int64_t c = 0; c < P.d; ++c) {
        ASSERT_EQ(out.dk[j * P.d + c], 0.0) << "key " << j;
        ASSERT_EQ(out.dv[j * P.d + c], 0.0) << "key " << j;
      }
  }
}

TEST(CudaSparseBwd, NoQueriesGivesZeroKeyGradients) {
  REQUIRE_GPU();
  Problem P = make_problem(750, {0}, {300}, 4, 2, 128, 128, 4);
  P.idx.clear();
  const Out out = run_gpu(P);
  for (double x : out.dk) ASSERT_EQ(x, 0.0);
  for (double x : out.dv) ASSERT_EQ(x, 0.0);
}

TEST(CudaSparseBwd, StridedAndMisalignedOperands) {
  REQUIRE_GPU();
  Problem P = make_problem(800, {200, 130}, {200, 130}, 8, 2, 128, 64, 4);
  select_random(P, 801, true);
  Layout aligned;  // padded but 16-byte aligned: vector paths
  aligned.q_pad_head = 8;
  aligned.q_pad_tok = 16;
  aligned.kv_pad_tok = 8;
  check(P, "aligned strides", aligned);
  Layout odd;  // rows not 16-byte aligned: q and do repacked, scalar K/V loads, scalar stores
  odd.q_pad_head = 3;
  odd.q_off = 1;
  odd.kv_pad_head = 1;
  odd.kv_pad_tok = 5;
  odd.kv_off = 3;
  check(P, "misaligned strides", odd);
}

TEST(CudaSparseBwd, QueryPassesAndSmallWorkItems) {
  REQUIRE_GPU();
  // Passes of a few queries (dk, dv accumulate across passes) and work items of 8 queries (hot
  // groups split into many items), on a varlen batch with chunked queries.
  Problem P = make_problem(850, {300, 0, 170, 45}, {600, 0, 170, 900}, 16, 2, 128, 128, 6);
  select_random(P, 851, true, 0);
  for (int64_t pass : {1, 7, 64, 129}) {
    RunOpts ro;
    ro.pass_queries = pass;
    ro.chunk_queries = pass == 7 ? 8 : 0;
    check(P, describe(P) + " pass " + std::to_string(pass), {}, ro);
  }
}

TEST(CudaSparseBwd, DeterministicTwentyRunsBitwiseIdentical) {
  REQUIRE_GPU();
  Problem P = make_problem(900, {2000, 333}, {2000, 333}, 32, 2, 128, 64, 8);
  select_random(P, 901, true, 0);
  forward_on_cpu(P);
  const Ref ref = cpu_reference(P);
  cudaStream_t stream;
  cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  RunOpts ro;
  ro.deterministic = true;
  ro.stream = stream;
  const Out first = run_gpu(P, {}, ro);
  EXPECT_TRUE(compare(P, first, ref, describe(P)));
  for (int run = 1; run < 20; ++run) {
    const Out again = run_gpu(P, {}, ro);
    ASSERT_TRUE(bitwise_equal(again.bits, first.bits)) << "run " << run;
  }
  // Atomics: every run within the bound; the spread between runs is reported.
  ro.deterministic = false;
  double spread = 0;
  for (int run = 0; run < 5; ++run) {
    const Out x = run_gpu(P, {}, ro);
    EXPECT_TRUE(compare(P, x, ref, describe(P) + " atomics run " + std::to_string(run)));
    for (size_t e = 0; e < x.dq.size(); ++e) spread = std::max(spread, std::abs(x.dq[e] - first.dq[e]));
  }
  std::printf("  largest dq difference between atomic and deterministic runs: %g\n", spread);
  cuda_check(cudaStreamDestroy(stream), "cudaStreamDestroy");
}

TEST(CudaSparseBwd, GarbageContentsStayInBounds) {
  REQUIRE_GPU();
  std::mt19937_64 rng(1000);
  Problem P = make_problem(1001, {100, 60, 40}, {300, 60, 40}, 8, 2, 128, 128, 6);
  select_random(P, 1002, true);
  P.o = P.dout;
  P.lse.assign(P.n_q() * P.h_q, 1.0);
  for (size_t e = 0; e < P.idx.size(); e += 3) {
    const int32_t garbage[] = {-7, 1 << 30, INT32_MIN, INT32_MAX, 5, P.idx[e], -1, 2};
    P.idx[e] = garbage[rng() % 8];
  }
  P.q_pos.resize(P.n_q());
  for (auto& x : P.q_pos) x = int32_t(rng() % 1000) - 200;
  P.cu_k = {0, 5000, 90, 400};
  for (bool det : {false, true}) {
    RunOpts ro;
    ro.deterministic = det;
    EXPECT_NO_THROW(run_gpu(P, {}, ro));
  }
  P.cu_q = {0, 180, -5, 200};
  P.q_pos.clear();
  EXPECT_NO_THROW(run_gpu(P));
}

#endif  // MSA_WITH_CUDA

}  // namespace
}  // namespace msa::test
