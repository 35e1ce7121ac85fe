// Tests of msa::index_kl_backward and msa::index_kl_loss on the CUDA backend against the CPU backend
// (float64, the same bf16 inputs): both phases (selection and warm-up), saved and recomputed index
// lse, every (g, d, d_idx, bk), topk 1 .. 32, lengths 1 .. 4097, varlen batches with empty and tiny
// sequences, chunked queries (bottom-right and explicit positions), rows with few or no entries,
// garbage entries, a sink block split into many work items, strided / misaligned operands, lambda
// scaling, query passes, repeatability, and argument errors. Tolerances are derived per element
// from the float32 / bf16 steps of the kernels (see Bounds). GPU tests skip without a device.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "test_util.h"
#ifdef MSA_WITH_CUDA
#include "cuda/kl.h"
#endif

namespace msa::test {
namespace {

TEST(CudaKL, BadArgumentsThrowBeforeLaunch) {
  REQUIRE_CUDA_BUILD();
  int32_t dummy[4] = {0, 0, 0, 0};
  IndexKLParams p;
  p.seq.n_q = p.seq.n_k = 8;
  p.h_q = 4;
  p.h_kv = 2;
  p.d = 128;
  p.d_idx = 128;
  p.bk = 128;
  p.topk = 4;
  p.q = p.k = p.q_idx = p.k_idx = dummy;
  p.dq_idx = p.dk_idx = dummy;
  p.lse = reinterpret_cast<float*>(dummy);
  p.topk_idx = dummy;
  Exec ex;
  ex.backend = Backend::cuda;
  auto with = [&](auto change, std::initializer_list<const char*> frags) {
    IndexKLParams a = p;
    change(a);
    return throws_error([&] { index_kl_backward(a, ex); }, frags) && throws_error([&] { index_kl_loss(a, ex); }, frags);
  };
  EXPECT_TRUE(with([](IndexKLParams& a) { a.lse = nullptr; }, {"msa::index_kl_", "lse is null", "cuda"}));
  EXPECT_TRUE(with([](IndexKLParams& a) { a.d = 32; }, {"d = 32"}));
  EXPECT_TRUE(with([](IndexKLParams& a) { a.d_idx = 96; }, {"d_idx = 96"}));
  EXPECT_TRUE(with([](IndexKLParams& a) { a.bk = 32; }, {"bk = 32"}));
  EXPECT_TRUE(with([](IndexKLParams& a) { a.h_q = 6, a.h_kv = 2; }, {"h_q / h_kv = 3"}));
  EXPECT_TRUE(with([](IndexKLParams& a) { a.h_q = 64, a.h_kv = 2; }, {"h_q / h_kv = 32"}));
  EXPECT_TRUE(with([](IndexKLParams& a) { a.dtype = DType::f32; }, {"bfloat16"}));
  EXPECT_TRUE(with([](IndexKLParams& a) { a.topk = 33; }, {"topk = 33"}));
  EXPECT_TRUE(with([](IndexKLParams& a) { a.seq.batch = 2; }, {"cu_seqlens_q"}));
}

#ifndef MSA_WITH_CUDA

TEST(CudaKL, GpuTests) { GTEST_SKIP() << "built without the CUDA backend: no GPU tests"; }

#else

// One problem: lengths, heads, the selection and the logical data (doubles exact in bf16).
struct Problem {
  int64_t h_q = 4, h_kv = 2, d = 128, d_idx = 128, bk = 128, topk = 4;  // topk 0: warm-up
  std::vector<int32_t> cu_q, cu_k, q_pos;                               // q_pos empty: bottom-right aligned
  bool pass_cu = true;
  std::vector<double> q, k, q_idx, k_idx;
  std::vector<int32_t> idx;        // [n_q, h_kv, topk] as given to the GPU (may hold garbage)
  std::vector<int32_t> idx_clean;  // the same with every entry the GPU must skip set to -1, valid first
  std::vector<float> lse, ilse;    // saved statistics over the support (float32, as the forwards give)
  float lambda = 1.f;

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
  // Key rows of T(i, r), ascending.
  std::vector<int64_t> support(int64_t i, int64_t r) const {
    std::vector<int64_t> out;
    const int64_t k0 = cu_k[seq(i)], p = pos(i);
    if (topk == 0) {
      for (int64_t j = 0; j <= p; ++j) out.push_back(k0 + j);
      return out;
    }
    std::vector<int32_t> blocks;
    for (int64_t s = 0; s < topk; ++s) {
      const int32_t b = idx_clean[(i * h_kv + r) * topk + s];
      if (b >= 0) blocks.push_back(b);
    }
    std::sort(blocks.begin(), blocks.end());
    for (int32_t b : blocks)
      for (int64_t j = b * bk; j < std::min<int64_t>((b + 1) * bk, p + 1); ++j) out.push_back(k0 + j);
    return out;
  }
};

// q and q_idx a little larger than k and k_idx, so that the distributions are peaked and differ.
Problem make_problem(uint64_t seed, const std::vector<int32_t>& lens_q, const std::vector<int32_t>& lens_k, int64_t h_q,
                     int64_t h_kv, int64_t d, int64_t d_idx, int64_t bk, int64_t topk) {
  std::mt19937_64 rng(seed);
  Problem P;
  P.h_q = h_q;
  P.h_kv = h_kv;
  P.d = d;
  P.d_idx = d_idx;
  P.bk = bk;
  P.topk = topk;
  P.cu_q = cu_from_lengths(lens_q);
  P.cu_k = cu_from_lengths(lens_k);
  P.q = randn(rng, P.n_q() * h_q * d, 1.5, DType::bf16);
  P.k = randn(rng, P.n_k() * h_kv * d, 1.0, DType::bf16);
  P.q_idx = randn(rng, P.n_q() * h_kv * d_idx, 1.5, DType::bf16);
  P.k_idx = randn(rng, P.n_k() * d_idx, 1.0, DType::bf16);
  return P;
}

// Random visible blocks per (query, group): the local block most of the time, block `every` in
// every row that sees it; `fill` takes as many as fit, otherwise a random count; every
// `empty_every`-th row is all padding. Valid entries in random order, then -1.
void select_random(Problem& P, uint64_t seed, bool fill, int32_t every = -1, int empty_every = 0) {
  std::mt19937_64 rng(seed);
  P.idx.assign(P.n_q() * P.h_kv * P.topk, -1);
  std::bernoulli_distribution take_own(0.85);
  for (int64_t i = 0; i < P.n_q(); ++i) {
    const int64_t p = P.pos(i);
    if (p < 0) continue;
    const int32_t own = int32_t(p / P.bk);
    for (int64_t r = 0; r < P.h_kv; ++r) {
      const int64_t row_id = i * P.h_kv + r;
      if (empty_every > 0 && row_id % empty_every == 0) continue;
      std::vector<int32_t> row, cand;
      if (every >= 0 && every <= own) row.push_back(every);
      if (own != every && take_own(rng) && int64_t(row.size()) < P.topk) row.push_back(own);
      for (int32_t b = 0; b < own; ++b)
        if (b != every) cand.push_back(b);
      std::shuffle(cand.begin(), cand.end(), rng);
      const int64_t room = std::min<int64_t>(P.topk - int64_t(row.size()), int64_t(cand.size()));
      const int64_t c = fill ? room : std::uniform_int_distribution<int64_t>(0, room)(rng);
      row.insert(row.end(), cand.begin(), cand.begin() + c);
      std::shuffle(row.begin(), row.end(), rng);
      std::copy(row.begin(), row.end(), P.idx.begin() + row_id * P.topk);
    }
  }
  P.idx_clean = P.idx;
}

// float64 lse of the teacher heads and of the student over the support, rounded to float32.
void saved_stats(Problem& P) {
  const int64_t g = P.g();
  const double scale = 1.0 / std::sqrt(double(P.d)), iscale = 1.0 / std::sqrt(double(P.d_idx));
  P.lse.assign(P.n_q() * P.h_q, -INFINITY);
  P.ilse.assign(P.n_q() * P.h_kv, -INFINITY);
  for (int64_t i = 0; i < P.n_q(); ++i)
    for (int64_t r = 0; r < P.h_kv; ++r) {
      const std::vector<int64_t> T = P.support(i, r);
      if (T.empty()) continue;
      auto lse_of = [&](auto logit) {
        double m = -INFINITY, s = 0;
        for (int64_t j : T) m = std::max(m, logit(j));
        for (int64_t j : T) s += std::exp(logit(j) - m);
        return m + std::log(s);
      };
      for (int64_t e = 0; e < g; ++e) {
        const int64_t h = r * g + e;
        P.lse[i * P.h_q + h] = float(lse_of([&](int64_t j) {
          double acc = 0;
          for (int64_t c = 0; c < P.d; ++c) acc += P.q[(i * P.h_q + h) * P.d + c] * P.k[(j * P.h_kv + r) * P.d + c];
          return acc * scale;
        }));
      }
      P.ilse[i * P.h_kv + r] = float(lse_of([&](int64_t j) {
        double acc = 0;
        for (int64_t c = 0; c < P.d_idx; ++c) acc += P.q_idx[(i * P.h_kv + r) * P.d_idx + c] * P.k_idx[j * P.d_idx + c];
        return acc * iscale;
      }));
    }
}

// Per-element error bounds of the CUDA results, derived from the kernels' arithmetic:
// - a float32 logit of n bf16 products has absolute error <= n 2^-24 sum |q_c k_c| scale; the saved
//   lse (float32) enters with 2^-24 |lse|, ex2.approx with 2^-22 relative; a recomputed index lse
//   adds its own float32 error (2^-20 (1 + |lse|)). Each probability p is then off by p * err.
// - dS is rounded to bf16 (2^-9 relative; 2^-8 taken) before both products, whose float32
//   accumulation adds n_terms 2^-24 sum |dS x|; the result is rounded to bf16 (2^-8 |x| taken).
// - the loss sums float32 terms P (log2 P - log2 P_idx): the errors of P, of log2 (lg2.approx,
//   2^-21 (1 + |log2 P|)) and of log P_idx, plus the float32 tile sums.
struct Bounds {
  std::vector<double> dq, dk;  // absolute bound per element
  double loss = 0;
};

Bounds bounds(const Problem& P, bool ilse_given) {
  const int64_t g = P.g(), d = P.d, di = P.d_idx;
  const double scale = 1.0 / std::sqrt(double(d)), iscale = 1.0 / std::sqrt(double(di));
  const double u = std::ldexp(1.0, -24);
  const double coef = double(P.lambda) / (double(P.n_q()) * double(P.h_kv));
  Bounds B;
  B.dq.assign(P.n_q() * P.h_kv * di, 0.0);
  B.dk.assign(P.n_k() * di, 0.0);
  std::vector<double> dq_abs(B.dq.size(), 0.0), dk_abs(B.dk.size(), 0.0), dk_cnt(P.n_k(), 0.0);
  double loss_bound = 0;
  for (int64_t i = 0; i < P.n_q(); ++i)
    for (int64_t r = 0; r < P.h_kv; ++r) {
      const std::vector<int64_t> T = P.support(i, r);
      if (T.empty()) continue;
      const double ilse = P.ilse[i * P.h_kv + r];
      const double* qi = &P.q_idx[(i * P.h_kv + r) * di];
      for (int64_t j : T) {
        double pt = 0, pt_err = 0;
        for (int64_t e = 0; e < g; ++e) {
          const int64_t h = r * g + e;
          double acc = 0, mag = 0;
          for (int64_t c = 0; c < d; ++c) {
            const double x = P.q[(i * P.h_q + h) * d + c] * P.k[(j * P.h_kv + r) * d + c];
            acc += x;
            mag += std::abs(x);
          }
          const double lse = P.lse[i * P.h_q + h];
          const double ph = std::exp(acc * scale - lse) / double(g);
          pt += ph;
          pt_err += ph * (1.5 * (d * u * mag * scale + u * std::abs(lse)) + 4 * u);
        }
        double acc = 0, mag = 0;
        for (int64_t c = 0; c < di; ++c) {
          const double x = qi[c] * P.k_idx[j * di + c];
          acc += x;
          mag += std::abs(x);
        }
        const double ls = acc * iscale - ilse;
        const double pi = std::exp(ls);
        double es = 1.5 * (di * u * mag * iscale + u * std::abs(ilse)) + 4 * u;
        if (!ilse_given) es += 16 * u * (1 + std::abs(ilse));
        const double ds = coef * (pi - pt);
        const double dds = std::ldexp(std::abs(ds), -8) + coef * (pi * es + pt_err);
        for (int64_t c = 0; c < di; ++c) {
          B.dq[(i * P.h_kv + r) * di + c] += iscale * dds * std::abs(P.k_idx[j * di + c]);
          dq_abs[(i * P.h_kv + r) * di + c] += iscale * std::abs(ds * P.k_idx[j * di + c]);
          B.dk[j * di + c] += iscale * dds * std::abs(qi[c]);
          dk_abs[j * di + c] += iscale * std::abs(ds * qi[c]);
        }
        dk_cnt[j] += 1;
        if (pt > 0) {
          const double lp = std::log2(pt);
          loss_bound += pt * ((pt_err / pt) * (1.5 + std::abs(lp - ls / std::log(2.0))) + es / std::log(2.0) +
                              std::ldexp(1.0, -21) * (1 + std::abs(lp)) + 64 * u * std::abs(lp - ls / std::log(2.0)));
        }
      }
      for (int64_t c = 0; c < di; ++c)
        B.dq[(i * P.h_kv + r) * di + c] += double(T.size()) * u * dq_abs[(i * P.h_kv + r) * di + c];
    }
  for (int64_t j = 0; j < P.n_k(); ++j)
    for (int64_t c = 0; c < di; ++c) B.dk[j * di + c] += (dk_cnt[j] + 1) * u * dk_abs[j * di + c];
  B.loss = loss_bound * std::log(2.0) / (double(P.n_q()) * double(P.h_kv)) + 1e-12;
  return B;
}

struct Ref {
  std::vector<double> dq, dk;
  double loss = 0;
};

IndexKLParams base_params(const Problem& P) {
  IndexKLParams a;
  a.seq.n_q = P.n_q();
  a.seq.n_k = P.n_k();
  a.seq.batch = P.batch();
  a.h_q = P.h_q;
  a.h_kv = P.h_kv;
  a.d = P.d;
  a.d_idx = P.d_idx;
  a.bk = P.bk;
  a.topk = P.topk;
  a.lambda = P.lambda;
  return a;
}

// The CPU backend in float64 on the same (bf16-exact) values and the same float32 saved lse.
Ref cpu_reference(const Problem& P, bool ilse_given) {
  IndexKLParams a = base_params(P);
  a.dtype = DType::f64;
  a.seq.cu_seqlens_q = P.cu_q.data();
  a.seq.cu_seqlens_k = P.cu_k.data();
  a.seq.q_pos = P.q_pos.empty() ? nullptr : P.q_pos.data();
  a.topk_idx = P.topk == 0 ? nullptr : P.idx_clean.data();
  if (P.topk == 0) a.topk = 0;
  a.lse = P.lse.data();
  a.index_lse = ilse_given ? P.ilse.data() : nullptr;
  Ref ref;
  ref.dq.assign(P.n_q() * P.h_kv * P.d_idx, 0.0);
  ref.dk.assign(std::max<int64_t>(P.n_k(), 1) * P.d_idx, 0.0);
  a.q = P.q.data();
  a.k = P.k.data();
  a.q_idx = P.q_idx.data();
  a.k_idx = P.k_idx.data();
  a.dq_idx = ref.dq.data();
  a.dk_idx = ref.dk.data();
  index_kl_backward(a, Exec{});
  ref.dk.resize(P.n_k() * P.d_idx);
  ref.loss = P.n_q() > 0 ? index_kl_loss(a, Exec{}) : 0.0;
  return ref;
}

// Operand layouts of a GPU call: extra elements per head / token, elements before the first row.
struct Layout {
  int64_t pad_head = 0, pad_tok = 0, off = 0;
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

double bfd(uint16_t b) { return double(bf16_to_float(bf16{b})); }

struct Out {
  std::vector<double> dq, dk;
  std::vector<uint16_t> dq_bits, dk_bits;
  double loss = 0;
};

// Runs backward and loss on the GPU. pass_queries > 0 calls the internal entry with that pass size.
Out run_gpu(const Problem& P, bool ilse_given, const Layout& L = {}, cudaStream_t stream = nullptr,
            int64_t pass_queries = 0, size_t max_workspace_bytes = 0) {
  const int64_t n_q = P.n_q(), n_k = P.n_k(), d = P.d, di = P.d_idx;
  const int64_t qh = d + L.pad_head, qt = P.h_q * qh + L.pad_tok;
  const int64_t kh = d + L.pad_head, kt = P.h_kv * kh + L.pad_tok;
  const int64_t qih = di + L.pad_head, qit = P.h_kv * qih + L.pad_tok;
  const int64_t kit = di + L.pad_tok;
  DevBuf<uint16_t> q(to_strided(P.q, n_q, P.h_q, d, qh, qt, L.off));
  DevBuf<uint16_t> k(to_strided(P.k, n_k, P.h_kv, d, kh, kt, L.off));
  DevBuf<uint16_t> q_idx(to_strided(P.q_idx, n_q, P.h_kv, di, qih, qit, L.off));
  DevBuf<uint16_t> k_idx(to_strided(P.k_idx, n_k, 1, di, di, kit, L.off));
  DevBuf<uint16_t> dq(size_t(L.off + std::max<int64_t>(n_q, 1) * qit));
  DevBuf<uint16_t> dk(size_t(L.off + std::max<int64_t>(n_k, 1) * kit));
  DevBuf<float> lse(P.lse), ilse(P.ilse);
  DevBuf<int32_t> idx(P.idx), cu_q(P.cu_q), cu_k(P.cu_k), q_pos(P.q_pos);
  dq.poison(0xff);
  dk.poison(0xff);
  IndexKLParams a = base_params(P);
  if (P.pass_cu) {
    a.seq.cu_seqlens_q = cu_q.ptr;
    a.seq.cu_seqlens_k = cu_k.ptr;
  }
  a.seq.q_pos = P.q_pos.empty() ? nullptr : q_pos.ptr;
  a.q = q.ptr + L.off;
  a.stride_q_head = qh;
  a.stride_q_tok = qt;
  a.k = k.ptr + L.off;
  a.stride_k_head = kh;
  a.stride_k_tok = kt;
  a.q_idx = q_idx.ptr + L.off;
  a.stride_q_idx_head = qih;
  a.stride_q_idx_tok = qit;
  a.k_idx = k_idx.ptr + L.off;
  a.stride_k_idx_tok = kit;
  a.dq_idx = dq.ptr + L.off;
  a.stride_dq_idx_head = qih;
  a.stride_dq_idx_tok = qit;
  a.dk_idx = dk.ptr + L.off;
  a.stride_dk_idx_tok = kit;
  a.lse = lse.ptr;
  a.index_lse = ilse_given ? ilse.ptr : nullptr;
  a.topk_idx = P.topk == 0 ? nullptr : idx.ptr;
  if (P.topk == 0) a.topk = 0;
  Exec ex;
  ex.backend = Backend::cuda;
  ex.stream = stream;
  ex.max_workspace_bytes = max_workspace_bytes;
  Out out;
  if (pass_queries > 0) {
    cuda::KlOptions opt;
    opt.pass_queries = pass_queries;
    cuda::run_index_kl(a, stream, true, opt);
    out.loss = n_q > 0 ? cuda::run_index_kl(a, stream, false, opt) : 0.0;
  } else {
    index_kl_backward(a, ex);
    out.loss = index_kl_loss(a, ex);
  }
  cuda_check(cudaStreamSynchronize(stream), "index_kl");
  cuda_check(cudaGetLastError(), "index_kl");
  const std::vector<uint16_t> hdq = dq.get(), hdk = dk.get();
  for (int64_t t = 0; t < n_q; ++t)
    for (int64_t r = 0; r < P.h_kv; ++r)
      for (int64_t c = 0; c < di; ++c) {
        const uint16_t b = hdq[L.off + t * qit + r * qih + c];
        out.dq_bits.push_back(b);
        out.dq.push_back(bfd(b));
      }
  for (int64_t j = 0; j < n_k; ++j)
    for (int64_t c = 0; c < di; ++c) {
      const uint16_t b = hdk[L.off + j * kit + c];
      out.dk_bits.push_back(b);
      out.dk.push_back(bfd(b));
    }
  // Padding between rows must stay untouched (all-ones bytes).
  for (int64_t t = 0; t < n_q && (L.pad_head || L.pad_tok); ++t)
    for (int64_t c = P.h_kv * qih - L.pad_head; c < qit; ++c)
      if (hdq[L.off + t * qit + c] != 0xffff) ADD_FAILURE() << "dq_idx padding written at token " << t;
  return out;
}

// Worst element of |got - ref| / bound; fails when any exceeds 1 or is not finite.
::testing::AssertionResult within(const std::vector<double>& got, const std::vector<double>& ref,
                                  const std::vector<double>& bound, const char* what, double* worst_ratio = nullptr) {
  if (got.size() != ref.size()) return ::testing::AssertionFailure() << what << ": size mismatch";
  double worst = 0;
  size_t wi = 0;
  for (size_t e = 0; e < got.size(); ++e) {
    const double tol = bound[e] + std::ldexp(std::abs(ref[e]), -8) + 1e-30;
    const double ratio = std::abs(got[e] - ref[e]) / tol;
    if (!std::isfinite(got[e]) || !(ratio <= worst)) {
      if (!std::isfinite(got[e]))
        return ::testing::AssertionFailure()
               << what << ": element " << e << " is " << got[e] << " (ref " << ref[e] << ")";
      worst = ratio;
      wi = e;
    }
  }
  if (worst_ratio) *worst_ratio = worst;
  if (worst > 1.0)
    return ::testing::AssertionFailure() << what << ": worst element " << wi << ": got " << got[wi] << ", expected "
                                         << ref[wi] << ", bound " << bound[wi] << " (ratio " << worst << ")";
  return ::testing::AssertionSuccess();
}

// Runs P on the GPU (index lse given or recomputed) and compares with the CPU backend.
void check(Problem& P, bool ilse_given, const std::string& name, const Layout& L = {}) {
  SCOPED_TRACE(name + (ilse_given ? " (index_lse given)" : " (index_lse recomputed)"));
  saved_stats(P);
  const Ref ref = cpu_reference(P, ilse_given);
  const Bounds B = bounds(P, ilse_given);
  const Out out = run_gpu(P, ilse_given, L);
  double wq = 0, wk = 0;
  EXPECT_TRUE(within(out.dq, ref.dq, B.dq, "dq_idx", &wq));
  EXPECT_TRUE(within(out.dk, ref.dk, B.dk, "dk_idx", &wk));
  EXPECT_LE(std::abs(out.loss - ref.loss), B.loss) << "loss " << out.loss << " vs " << ref.loss;
  std::printf("  %-40s %s: worst |err|/bound dq %.3f dk %.3f, loss %.9g vs %.9g (bound %.2e)\n", name.c_str(),
              ilse_given ? "lse given" : "lse recomputed", wq, wk, out.loss, ref.loss, B.loss);
}

TEST(CudaKL, AwkwardLengthsSparse) {
  REQUIRE_GPU();
  uint64_t seed = 100;
  for (int32_t n : {1, 127, 128, 129, 1023}) {
    Problem P = make_problem(seed++, {n}, {n}, 8, 2, 128, 128, 128, 4);
    select_random(P, seed++, false);
    check(P, n % 2 == 1, "sparse n = " + std::to_string(n));
  }
  Problem P = make_problem(seed++, {4097}, {4097}, 2, 1, 64, 64, 64, 8);
  select_random(P, seed++, true);
  check(P, false, "sparse n = 4097");
}

// A sharp teacher: q scaled by 32 (exact in bf16) puts logit gaps of hundreds in every row, so the
// head-averaged teacher probabilities of far keys are subnormal floats. Their terms must vanish,
// not turn the loss into -inf (lg2.approx.ftz of a subnormal is log2(0)).
TEST(CudaKL, SharpTeacherLossStaysFinite) {
  REQUIRE_GPU();
  for (int64_t topk : {0, 4}) {
    Problem P = make_problem(150 + topk, {700}, {700}, 8, 2, 64, 64, 64, topk);
    for (double& x : P.q) x *= 32;
    if (topk) select_random(P, 151, true);
    check(P, true, topk ? "sharp teacher, sparse" : "sharp teacher, warm-up");
  }
}

TEST(CudaKL, AwkwardLengthsWarmup) {
  REQUIRE_GPU();
  uint64_t seed = 200;
  for (int32_t n : {1, 127, 129, 1023}) {
    Problem P = make_problem(seed++, {n}, {n}, 4, 2, 128, 128, 128, 0);
    check(P, n != 129, "warm-up n = " + std::to_string(n));
  }
  // More than kKlWarmSlots blocks of 128: several block ranges per query.
  Problem P = make_problem(seed++, {4097}, {4097}, 1, 1, 64, 64, 128, 0);
  check(P, false, "warm-up n = 4097");
}

TEST(CudaKL, EveryConfiguration) {
  REQUIRE_GPU();
  uint64_t seed = 300;
  for (int64_t g : {1, 2, 4, 8, 16})
    for (int64_t d : {64, 128})
      for (int64_t di : {64, 128})
        for (int64_t bk : {64, 128}) {
          const int64_t h_kv = g == 16 ? 1 : 2;
          Problem P = make_problem(seed++, {300}, {300}, g * h_kv, h_kv, d, di, bk, 3);
          select_random(P, seed++, (seed & 1) != 0);
          std::ostringstream os;
          os << "g " << g << " d " << d << " d_idx " << di << " bk " << bk;
          check(P, (seed & 2) != 0, os.str());
        }
}

TEST(CudaKL, TopkRange) {
  REQUIRE_GPU();
  uint64_t seed = 400;
  for (int64_t topk : {1, 2, 7, 16, 32}) {
    Problem P = make_problem(seed++, {1100}, {1100}, 8, 2, 128, 128, 64, topk);
    select_random(P, seed++, true);
    check(P, topk % 2 == 0, "topk " + std::to_string(topk));
  }
}

TEST(CudaKL, VarlenAndChunked) {
  REQUIRE_GPU();
  uint64_t seed = 500;
  for (int64_t topk : {0, 5}) {
    // An empty sequence, tiny ones, a long one; then chunked queries (bottom-right aligned).
    Problem P = make_problem(seed++, {3, 0, 1, 700, 129}, {3, 0, 1, 700, 129}, 8, 4, 128, 64, 64, topk);
    if (topk) select_random(P, seed++, false);
    check(P, true, topk ? "varlen sparse" : "varlen warm-up");
    Problem C = make_problem(seed++, {5, 64, 1, 300}, {900, 64, 77, 1300}, 4, 2, 64, 128, 128, topk);
    if (topk) select_random(C, seed++, true);
    check(C, false, topk ? "chunked sparse" : "chunked warm-up");
    // Explicit positions: decode-like single queries, position 0, and out-of-order positions.
    Problem E = make_problem(seed++, {4, 3}, {500, 260}, 4, 1, 128, 128, 128, topk);
    E.q_pos = {499, 0, 130, 257, 259, 1, 128};
    if (topk) select_random(E, seed++, true);
    check(E, true, topk ? "explicit positions sparse" : "explicit positions warm-up");
  }
}

TEST(CudaKL, DegenerateSelections) {
  REQUIRE_GPU();
  uint64_t seed = 600;
  // Rows with no entries and rows with a single one.
  Problem P = make_problem(seed++, {600}, {600}, 8, 2, 128, 128, 64, 6);
  select_random(P, seed++, false, -1, 3);
  check(P, true, "empty rows");
  // Garbage entries (out of range, invisible, negative) must be skipped; the CPU sees them cleaned.
  Problem G = make_problem(seed++, {500}, {500}, 4, 2, 64, 64, 64, 6);
  select_random(G, seed++, false);
  std::mt19937_64 rng(seed++);
  for (int64_t row = 0; row < G.n_q() * G.h_kv; ++row) {
    int32_t* sel = &G.idx[row * G.topk];
    const int64_t own = G.pos(row / G.h_kv) / G.bk;
    for (int64_t s = 0; s < G.topk; ++s)
      if (sel[s] < 0 && rng() % 2) sel[s] = int32_t(own + 2 + rng() % 50) * ((rng() % 3) ? 1 : -1) - (rng() % 2);
  }
  G.idx_clean = G.idx;
  for (int64_t row = 0; row < G.n_q() * G.h_kv; ++row) {
    const int64_t own = G.pos(row / G.h_kv) / G.bk;
    for (int64_t s = 0; s < G.topk; ++s) {
      int32_t& b = G.idx_clean[row * G.topk + s];
      if (b < 0 || b > own) b = -1;
    }
    std::stable_partition(&G.idx_clean[row * G.topk], &G.idx_clean[(row + 1) * G.topk],
                          [](int32_t b) { return b >= 0; });
  }
  check(G, false, "garbage entries");
  // A sink block chosen by every query: its group splits into many work items (chunk 2 topk bk).
  Problem S = make_problem(seed++, {3000}, {3000}, 16, 1, 128, 128, 64, 2);
  select_random(S, seed++, true, 0);
  check(S, true, "sink block, g 16");
  Problem S1 = make_problem(seed++, {3000}, {3000}, 2, 2, 64, 64, 64, 2);
  select_random(S1, seed++, true, 0);
  check(S1, false, "sink block, g 1");
}

TEST(CudaKL, StridedAndMisaligned) {
  REQUIRE_GPU();
  uint64_t seed = 700;
  Problem P = make_problem(seed++, {333}, {333}, 8, 2, 128, 64, 128, 3);
  select_random(P, seed++, true);
  check(P, true, "padded strides", Layout{8, 16, 0});
  Problem M = make_problem(seed++, {257}, {257}, 4, 2, 64, 128, 64, 3);
  select_random(M, seed++, false);
  check(M, false, "misaligned (scalar loads, repacked q)", Layout{3, 5, 1});
  Problem W = make_problem(seed++, {200}, {200}, 4, 2, 64, 64, 64, 0);
  check(W, true, "warm-up, misaligned", Layout{1, 1, 3});
}

TEST(CudaKL, LambdaScalesGradientsOnly) {
  REQUIRE_GPU();
  Problem P = make_problem(800, {700}, {700}, 8, 2, 128, 128, 128, 4);
  select_random(P, 801, true);
  saved_stats(P);
  const Out one = run_gpu(P, true);
  P.lambda = 0.25f;  // a power of two: the bf16 results scale exactly
  const Out quarter = run_gpu(P, true);
  EXPECT_EQ(one.loss, quarter.loss);
  for (size_t e = 0; e < one.dq.size(); ++e) ASSERT_EQ(quarter.dq[e], 0.25 * one.dq[e]) << "dq_idx element " << e;
  double spread = 0;
  for (size_t e = 0; e < one.dk.size(); ++e)
    spread = std::max(spread, std::abs(quarter.dk[e] - 0.25 * one.dk[e]) / (std::abs(one.dk[e]) * 0.25 + 1e-30));
  EXPECT_LE(spread, std::ldexp(1.0, -7)) << "dk_idx relative spread";
  P.lambda = 3.5f;
  check(P, true, "lambda 3.5");
}

TEST(CudaKL, QueryPassesAndRepeatability) {
  REQUIRE_GPU();
  for (int64_t topk : {5, 0}) {
    Problem P = make_problem(900 + topk, {1, 400, 77}, {40, 700, 77}, 8, 2, 128, 128, 64, topk);
    if (topk) select_random(P, 910, false);
    saved_stats(P);
    cudaStream_t stream;
    cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
    const Out first = run_gpu(P, false, {}, stream);
    const Bounds B = bounds(P, false);
    double dk_spread = 0;
    for (int rep = 0; rep < 5; ++rep) {
      const Out again = run_gpu(P, false, {}, stream);
      // dq_idx and the loss are reduced in a fixed order: bitwise. dk_idx adds work items with fp32
      // atomics: within the bounds, and reported.
      EXPECT_TRUE(bitwise_equal(again.dq_bits, first.dq_bits)) << "dq_idx, repetition " << rep;
      EXPECT_EQ(again.loss, first.loss) << "loss, repetition " << rep;
      for (size_t e = 0; e < first.dk.size(); ++e)
        dk_spread = std::max(
            dk_spread, std::abs(again.dk[e] - first.dk[e]) / (B.dk[e] + std::ldexp(std::abs(first.dk[e]), -8) + 1e-30));
    }
    EXPECT_LE(dk_spread, 2.0);
    std::printf("  repeatability (topk %lld): dk_idx spread / bound %.3f\n", (long long)topk, dk_spread);
    for (int64_t pass : {1, 7, 129}) {
      const Out o = run_gpu(P, false, {}, stream, pass);
      EXPECT_TRUE(bitwise_equal(o.dq_bits, first.dq_bits)) << "dq_idx with passes of " << pass;
      EXPECT_NEAR(o.loss, first.loss, B.loss) << "passes of " << pass;
      const Ref ref = cpu_reference(P, false);
      EXPECT_TRUE(within(o.dk, ref.dk, B.dk, "dk_idx (passes)"));
    }
    cudaStreamDestroy(stream);
  }
}

// Exec::max_workspace_bytes sizes the query passes: the results are those of the default (dq_idx
// bitwise, the loss within its bound); a budget below one query's workspace is an msa::Error.
TEST(CudaKL, WorkspaceBudget) {
  REQUIRE_GPU();
  for (int64_t topk : {4, 0}) {
    Problem P = make_problem(1100 + topk, {500, 300}, {500, 300}, 8, 2, 128, 128, 64, topk);
    if (topk) select_random(P, 1110, true);
    saved_stats(P);
    const Out ref = run_gpu(P, false);
    const Bounds B = bounds(P, false);
    int ran = 0;
    // Below or above the one-query minimum depending on the schedule's sort storage: either is fine,
    // as long as a budget that runs gives the default's results.
    for (size_t budget : {size_t(1) << 21, size_t(3) << 20, size_t(1) << 23, size_t(1) << 30}) {
      Out o;
      try {
        o = run_gpu(P, false, {}, nullptr, 0, budget);
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("max_workspace_bytes"), std::string::npos) << e.what();
        continue;
      }
      ++ran;
      EXPECT_TRUE(bitwise_equal(o.dq_bits, ref.dq_bits)) << "dq_idx with a budget of " << budget << " bytes";
      EXPECT_NEAR(o.loss, ref.loss, B.loss) << "budget " << budget;
      const Ref cpu = cpu_reference(P, false);
      EXPECT_TRUE(within(o.dk, cpu.dk, B.dk, "dk_idx (budget)"));
    }
    EXPECT_GE(ran, 1);
    EXPECT_TRUE(throws_error([&] { run_gpu(P, false, {}, nullptr, 0, 1000); },
                             {"msa::index_kl_backward", "max_workspace_bytes = 1000"}));
  }
}

TEST(CudaKL, NoQueriesZeroesDk) {
  REQUIRE_GPU();
  Problem P = make_problem(1000, {0}, {300}, 4, 2, 64, 64, 64, 2);
  P.idx.clear();
  P.idx_clean.clear();
  P.lse.clear();
  P.ilse.clear();
  DevBuf<uint16_t> k(to_strided(P.k, 300, 2, 64, 64, 128, 0)), ki(to_strided(P.k_idx, 300, 1, 64, 64, 64, 0));
  DevBuf<uint16_t> dk(300 * 64);
  DevBuf<int32_t> cu_q(P.cu_q), cu_k(P.cu_k);
  dk.poison(0xff);
  IndexKLParams a = base_params(P);
  a.seq.cu_seqlens_q = cu_q.ptr;
  a.seq.cu_seqlens_k = cu_k.ptr;
  a.k = k.ptr;
  a.k_idx = ki.ptr;
  a.dk_idx = dk.ptr;
  Exec ex;
  ex.backend = Backend::cuda;
  index_kl_backward(a, ex);
  cuda_check(cudaDeviceSynchronize(), "index_kl_backward");
  for (uint16_t b : dk.get()) ASSERT_EQ(b, 0);
  EXPECT_EQ(index_kl_loss(a, ex), 0.0);
}

#endif  // MSA_WITH_CUDA

}  // namespace
}  // namespace msa::test
