// Tests of the CPU reference of the KL alignment loss (index_kl_loss, index_kl_backward): finite
// differences, an independent closed-form reference built from explicit probability matrices,
// properties of the KL, saved-lse inputs, determinism and reduced-precision inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "msa/msa.h"
#include "test_util.h"

namespace msa::test {
namespace {

// ---------------------------------------------------------------------------------------------
// Problems

struct Shape {
  std::vector<int32_t> lens_q;
  std::vector<int32_t> lens_k;  // empty: same as lens_q
  std::vector<int32_t> q_pos;   // empty: bottom-right aligned (no q_pos passed)
  int64_t h_kv = 2, g = 2, d = 8, d_idx = 8, bk = 8;
  int64_t topk = 0;             // 0: warm-up (topk_idx == nullptr)
  bool full_selection = false;  // topk_idx = every visible block, in shuffled order
  int empty_rows = 0;           // rows (i, r) whose selection is all padding
  bool padded = false;          // non-contiguous strides for every tensor
  double sigma = 1.0;
  float scale = 0.f, index_scale = 0.f;  // 0: library defaults
};

struct Problem {
  Shape sh;
  int64_t n_q = 0, n_k = 0, h_q = 0, batch = 0, topk = 0;
  std::vector<int32_t> cu_q, cu_k, pos, seq;
  std::vector<double> q, k, q_idx, k_idx;  // logical contiguous [n, h, d] layouts
  std::vector<int32_t> topk_idx;           // [n_q, h_kv, topk]; empty in warm-up
  double scale = 0, index_scale = 0;       // resolved
};

// Random valid selection: mostly the local block plus random others, sometimes without the local
// block, sometimes fewer than topk blocks (padding), always in shuffled order.
std::vector<int32_t> random_selection(std::mt19937_64& rng, const Problem& pb, int64_t topk) {
  std::vector<int32_t> sel(pb.n_q * pb.sh.h_kv * topk, -1);
  std::uniform_int_distribution<int> coin(0, 4);
  for (int64_t i = 0; i < pb.n_q; ++i)
    for (int64_t r = 0; r < pb.sh.h_kv; ++r) {
      const int32_t own = int32_t(pb.pos[i] / pb.sh.bk);
      std::vector<int32_t> others(own);
      std::iota(others.begin(), others.end(), 0);
      std::shuffle(others.begin(), others.end(), rng);
      std::vector<int32_t> row;
      const bool keep_local = coin(rng) != 0 || own == 0;
      if (keep_local) row.push_back(own);
      int64_t want = std::min<int64_t>(topk, own + 1);
      if (coin(rng) == 0) want = std::uniform_int_distribution<int64_t>(1, want)(rng);
      for (int32_t b : others)
        if (int64_t(row.size()) < want) row.push_back(b);
      std::shuffle(row.begin(), row.end(), rng);
      std::copy(row.begin(), row.end(), sel.begin() + (i * pb.sh.h_kv + r) * topk);
    }
  return sel;
}

Problem make_problem(const Shape& sh, uint64_t seed, DType round_to = DType::f64) {
  std::mt19937_64 rng(seed);
  Problem pb;
  pb.sh = sh;
  const std::vector<int32_t>& lens_k = sh.lens_k.empty() ? sh.lens_q : sh.lens_k;
  pb.batch = int64_t(sh.lens_q.size());
  pb.cu_q = cu_from_lengths(sh.lens_q);
  pb.cu_k = cu_from_lengths(lens_k);
  pb.n_q = pb.cu_q.back();
  pb.n_k = pb.cu_k.back();
  pb.h_q = sh.h_kv * sh.g;
  for (int64_t b = 0; b < pb.batch; ++b)
    for (int32_t t = 0; t < sh.lens_q[b]; ++t) {
      const int64_t i = pb.cu_q[b] + t;
      pb.seq.push_back(int32_t(b));
      pb.pos.push_back(sh.q_pos.empty() ? lens_k[b] - sh.lens_q[b] + t : sh.q_pos[i]);
    }
  pb.q = randn(rng, pb.n_q * pb.h_q * sh.d, sh.sigma, round_to);
  pb.k = randn(rng, pb.n_k * sh.h_kv * sh.d, sh.sigma, round_to);
  pb.q_idx = randn(rng, pb.n_q * sh.h_kv * sh.d_idx, sh.sigma, round_to);
  pb.k_idx = randn(rng, pb.n_k * sh.d_idx, sh.sigma, round_to);
  pb.scale = sh.scale != 0.f ? double(sh.scale) : double(float(1.0 / std::sqrt(double(sh.d))));
  pb.index_scale = sh.index_scale != 0.f ? double(sh.index_scale) : double(float(1.0 / std::sqrt(double(sh.d_idx))));
  if (sh.full_selection) {
    int64_t max_blocks = 1;
    for (int32_t p : pb.pos) max_blocks = std::max<int64_t>(max_blocks, p / sh.bk + 1);
    pb.topk = max_blocks;
    pb.topk_idx.assign(pb.n_q * sh.h_kv * pb.topk, -1);
    for (int64_t i = 0; i < pb.n_q; ++i)
      for (int64_t r = 0; r < sh.h_kv; ++r) {
        std::vector<int32_t> row(pb.pos[i] / sh.bk + 1);
        std::iota(row.begin(), row.end(), 0);
        std::shuffle(row.begin(), row.end(), rng);
        std::copy(row.begin(), row.end(), pb.topk_idx.begin() + (i * sh.h_kv + r) * pb.topk);
      }
  } else if (sh.topk > 0) {
    pb.topk = sh.topk;
    pb.topk_idx = random_selection(rng, pb, sh.topk);
  }
  for (int e = 0; e < sh.empty_rows; ++e) {
    const int64_t row = std::uniform_int_distribution<int64_t>(0, pb.n_q * sh.h_kv - 1)(rng);
    std::fill_n(pb.topk_idx.begin() + row * pb.topk, pb.topk, -1);
  }
  return pb;
}

// ---------------------------------------------------------------------------------------------
// Independent reference: per row (i, r), dense masked probability rows over the whole sequence.

struct Ref {
  double loss = 0;
  double mean_abs_terms = 0;  // (1/(n_q h_kv)) sum_{i,r,j} P |log P - log P_idx|, for error bounds
  std::vector<double> dq_idx, dk_idx;
  std::vector<double> lse, index_lse;      // [n_q, h_q], [n_q, h_kv] over the support (computed, not given)
  double max_abs_t = 0, max_abs_s = 0;     // max over supports of scale * sum_c |q_c k_c| (teacher / student)
  std::vector<double> bound_dq, bound_dk;  // with rho_t, rho_s, u set: error bounds (no first-order approximation)
};

struct RefOpts {
  double lambda = 1.0;
  const float* lse = nullptr;  // given lse values, used instead of the computed ones
  const float* index_lse = nullptr;
  // For error bounds of perturbed inputs: relative error of P (rho_t) and P_idx (rho_s), and the
  // relative rounding u of k_idx / q_idx and of the stored gradients.
  double rho_t = 0, rho_s = 0, u = 0;
};

bool in_support(const Problem& pb, int64_t i, int64_t r, int64_t j) {
  if (j > pb.pos[i]) return false;
  if (pb.topk_idx.empty()) return true;
  for (int64_t t = 0; t < pb.topk; ++t)
    if (pb.topk_idx[(i * pb.sh.h_kv + r) * pb.topk + t] == j / pb.sh.bk) return true;
  return false;
}

// One row's logits scale * q . k_j over the support `in` of a sequence whose keys start at k0,
// k_stride apart; max_abs takes the largest scale * sum_c |q_c k_c| (for the error bounds).
struct Logits {
  std::vector<double> x;  // -inf off the support
  double lse;
};

Logits logits(const std::vector<char>& in, const double* q, const double* k0, int64_t k_stride, int64_t dd,
              double scale, double& max_abs) {
  const int64_t len = int64_t(in.size());
  Logits l{std::vector<double>(len, -INFINITY), 0};
  double m = -INFINITY;
  for (int64_t j = 0; j < len; ++j) {
    if (!in[j]) continue;
    double s = 0, sa = 0;
    for (int64_t c = 0; c < dd; ++c) {
      const double a = q[c], kk = k0[j * k_stride + c];
      s += a * kk;
      sa += std::abs(a * kk);
    }
    l.x[j] = s * scale;
    max_abs = std::max(max_abs, sa * scale);
    m = std::max(m, l.x[j]);
  }
  double z = 0;
  for (int64_t j = 0; j < len; ++j)
    if (in[j]) z += std::exp(l.x[j] - m);
  l.lse = m + std::log(z);
  return l;
}

Ref reference(const Problem& pb, const RefOpts& o = {}) {
  const Shape& sh = pb.sh;
  const int64_t d = sh.d, di = sh.d_idx, g = sh.g;
  Ref ref;
  ref.dq_idx.assign(pb.q_idx.size(), 0.0);
  ref.dk_idx.assign(pb.k_idx.size(), 0.0);
  ref.bound_dq.assign(pb.q_idx.size(), 0.0);
  ref.bound_dk.assign(pb.k_idx.size(), 0.0);
  ref.lse.assign(pb.n_q * pb.h_q, 0.0);
  ref.index_lse.assign(pb.n_q * sh.h_kv, 0.0);
  const double rows = double(pb.n_q) * double(sh.h_kv);
  for (int64_t i = 0; i < pb.n_q; ++i)
    for (int64_t r = 0; r < sh.h_kv; ++r) {
      const int64_t b = pb.seq[i], base = pb.cu_k[b], len = pb.cu_k[b + 1] - base;
      std::vector<char> in(len);
      bool any = false;
      for (int64_t j = 0; j < len; ++j) any |= (in[j] = in_support(pb, i, r, j));
      if (!any) continue;
      std::vector<double> P(len, 0.0), Pidx(len, 0.0);
      for (int64_t t = 0; t < g; ++t) {
        const int64_t h = r * g + t;
        const Logits x = logits(in, &pb.q[(i * pb.h_q + h) * d], &pb.k[(base * sh.h_kv + r) * d], sh.h_kv * d, d,
                                pb.scale, ref.max_abs_t);
        ref.lse[i * pb.h_q + h] = x.lse;
        const double lse = o.lse ? double(o.lse[i * pb.h_q + h]) : x.lse;
        for (int64_t j = 0; j < len; ++j)
          if (in[j]) P[j] += std::exp(x.x[j] - lse) / double(g);
      }
      const Logits y =
          logits(in, &pb.q_idx[(i * sh.h_kv + r) * di], &pb.k_idx[base * di], di, di, pb.index_scale, ref.max_abs_s);
      ref.index_lse[i * sh.h_kv + r] = y.lse;
      const double ilse = o.index_lse ? double(o.index_lse[i * sh.h_kv + r]) : y.lse;
      for (int64_t j = 0; j < len; ++j)
        if (in[j]) Pidx[j] = std::exp(y.x[j] - ilse);

      const double c0 = o.lambda / rows;
      for (int64_t j = 0; j < len; ++j) {
        if (!in[j]) continue;
        if (P[j] > 0) {  // 0 log 0 = 0
          const double lr = std::log(P[j]) - std::log(Pidx[j]);
          ref.loss += P[j] * lr / rows;
          ref.mean_abs_terms += P[j] * std::abs(lr) / rows;
        }
        const double ds = c0 * (Pidx[j] - P[j]);
        const double dds = std::abs(c0) * (o.rho_s * Pidx[j] + o.rho_t * P[j]);  // bound on |dS error|
        for (int64_t c = 0; c < di; ++c) {
          const double qi = pb.q_idx[(i * sh.h_kv + r) * di + c], kj = pb.k_idx[(base + j) * di + c];
          ref.dq_idx[(i * sh.h_kv + r) * di + c] += pb.index_scale * ds * kj;
          ref.dk_idx[(base + j) * di + c] += pb.index_scale * ds * qi;
          const double e = dds * (1 + o.u) + (std::abs(ds) + dds) * o.u;
          ref.bound_dq[(i * sh.h_kv + r) * di + c] += pb.index_scale * e * std::abs(kj);
          ref.bound_dk[(base + j) * di + c] += pb.index_scale * e * std::abs(qi);
        }
      }
    }
  return ref;
}

// ---------------------------------------------------------------------------------------------
// Calling the library with (optionally padded) strided buffers

struct Layout {
  int64_t st_tok = 0, st_head = 0;
  size_t size = 0;
};

// A [n, h, dd] tensor; padded layouts leave gaps between heads and tokens.
Layout layout(int64_t n, int64_t h, int64_t dd, bool padded) {
  Layout l;
  l.st_head = padded ? dd + 3 : dd;
  l.st_tok = padded ? h * l.st_head + 5 : h * dd;
  l.size = n == 0 ? 0 : size_t((n - 1) * l.st_tok + (h - 1) * l.st_head + dd);
  return l;
}

// Gaps are NaN so that reading them poisons the result.
Buf pack(const std::vector<double>& v, int64_t n, int64_t h, int64_t dd, const Layout& l, DType t) {
  Buf b(t, l.size);
  b.poison();
  for (int64_t a = 0; a < n; ++a)
    for (int64_t e = 0; e < h; ++e)
      for (int64_t c = 0; c < dd; ++c) b.set(a * l.st_tok + e * l.st_head + c, v[(a * h + e) * dd + c]);
  return b;
}

std::vector<double> unpack(const Buf& b, int64_t n, int64_t h, int64_t dd, const Layout& l) {
  std::vector<double> v(n * h * dd);
  for (int64_t a = 0; a < n; ++a)
    for (int64_t e = 0; e < h; ++e)
      for (int64_t c = 0; c < dd; ++c) v[(a * h + e) * dd + c] = b.get(a * l.st_tok + e * l.st_head + c);
  return v;
}

// Elements of b outside the logical tensor that are not NaN any more (written by the call).
int64_t gaps_written(const Buf& b, int64_t n, int64_t h, int64_t dd, const Layout& l) {
  std::vector<char> logical(b.size(), 0);
  for (int64_t a = 0; a < n; ++a)
    for (int64_t e = 0; e < h; ++e)
      for (int64_t c = 0; c < dd; ++c) logical[a * l.st_tok + e * l.st_head + c] = 1;
  int64_t bad = 0;
  for (size_t x = 0; x < b.size(); ++x) bad += !logical[x] && !std::isnan(b.get(x));
  return bad;
}

struct CallOpts {
  DType dtype = DType::f64;
  double lambda = 1.0;
  int threads = 1;
  const float* lse = nullptr;
  const float* index_lse = nullptr;
  bool backward = true;
};

struct LibOut {
  double loss = 0;
  std::vector<double> dq_idx, dk_idx;
  Buf dq_buf, dk_buf;  // raw outputs, for bitwise comparisons
};

IndexKLParams params(const Problem& pb, DType t) {
  IndexKLParams p;
  p.seq.n_q = pb.n_q;
  p.seq.n_k = pb.n_k;
  p.seq.batch = pb.batch;
  p.seq.cu_seqlens_q = pb.cu_q.data();
  p.seq.cu_seqlens_k = pb.cu_k.data();
  p.seq.q_pos = pb.sh.q_pos.empty() ? nullptr : pb.sh.q_pos.data();
  p.h_q = pb.h_q;
  p.h_kv = pb.sh.h_kv;
  p.d = pb.sh.d;
  p.d_idx = pb.sh.d_idx;
  p.scale = pb.sh.scale;
  p.index_scale = pb.sh.index_scale;
  p.dtype = t;
  p.topk_idx = pb.topk_idx.empty() ? nullptr : pb.topk_idx.data();
  p.topk = pb.topk;
  p.bk = pb.sh.bk;
  return p;
}

LibOut call_lib(const Problem& pb, const CallOpts& o = {}) {
  const Shape& sh = pb.sh;
  const bool pad = sh.padded;
  const Layout lq = layout(pb.n_q, pb.h_q, sh.d, pad), lk = layout(pb.n_k, sh.h_kv, sh.d, pad);
  const Layout lqi = layout(pb.n_q, sh.h_kv, sh.d_idx, pad), lki = layout(pb.n_k, 1, sh.d_idx, pad);
  Buf q = pack(pb.q, pb.n_q, pb.h_q, sh.d, lq, o.dtype);
  Buf k = pack(pb.k, pb.n_k, sh.h_kv, sh.d, lk, o.dtype);
  Buf qi = pack(pb.q_idx, pb.n_q, sh.h_kv, sh.d_idx, lqi, o.dtype);
  Buf ki = pack(pb.k_idx, pb.n_k, 1, sh.d_idx, lki, o.dtype);
  IndexKLParams p = params(pb, o.dtype);
  p.lambda = float(o.lambda);
  p.q = q.data();
  p.k = k.data();
  p.q_idx = qi.data();
  p.k_idx = ki.data();
  if (pad) {  // unpadded calls leave the strides at 0: the contiguous defaults
    p.stride_q_tok = lq.st_tok, p.stride_q_head = lq.st_head;
    p.stride_k_tok = lk.st_tok, p.stride_k_head = lk.st_head;
    p.stride_q_idx_tok = lqi.st_tok, p.stride_q_idx_head = lqi.st_head;
    p.stride_k_idx_tok = lki.st_tok;
    p.stride_dq_idx_tok = lqi.st_tok, p.stride_dq_idx_head = lqi.st_head;
    p.stride_dk_idx_tok = lki.st_tok;
  }
  p.lse = o.lse;
  p.index_lse = o.index_lse;
  Exec ex;
  ex.num_threads = o.threads;
  LibOut out;
  out.loss = index_kl_loss(p, ex);
  if (o.backward) {
    out.dq_buf = Buf(o.dtype, lqi.size);
    out.dk_buf = Buf(o.dtype, lki.size);
    out.dq_buf.poison();
    out.dk_buf.poison();
    p.dq_idx = out.dq_buf.data();
    p.dk_idx = out.dk_buf.data();
    index_kl_backward(p, ex);
    out.dq_idx = unpack(out.dq_buf, pb.n_q, sh.h_kv, sh.d_idx, lqi);
    out.dk_idx = unpack(out.dk_buf, pb.n_k, 1, sh.d_idx, lki);
    EXPECT_EQ(gaps_written(out.dq_buf, pb.n_q, sh.h_kv, sh.d_idx, lqi), 0) << "dq_idx written outside its tensor";
    EXPECT_EQ(gaps_written(out.dk_buf, pb.n_k, 1, sh.d_idx, lki), 0) << "dk_idx written outside its tensor";
  }
  return out;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

// Elementwise |got - ref| <= bound[e]; reports the worst element relative to its bound.
::testing::AssertionResult within_bounds(const std::vector<double>& got, const std::vector<double>& ref,
                                         const std::vector<double>& bound, const char* what) {
  double worst = 0;
  size_t at = 0;
  for (size_t e = 0; e < got.size(); ++e) {
    if (!std::isfinite(got[e])) return ::testing::AssertionFailure() << what << "[" << e << "] = " << got[e];
    const double ratio = std::abs(got[e] - ref[e]) / bound[e];
    if (!(ratio <= worst)) worst = ratio, at = e;
  }
  if (worst > 1.0)
    return ::testing::AssertionFailure() << what << ": worst element " << at << ": got " << got[at] << ", expected "
                                         << ref[at] << ", error " << std::abs(got[at] - ref[at]) << " > bound "
                                         << bound[at];
  return ::testing::AssertionSuccess();
}

// Library vs reference, both in double with different summation orders: a few hundred ulps of
// the loss and of the largest gradient element.
void expect_matches_ref(const LibOut& lib, const Ref& ref) {
  EXPECT_NEAR(lib.loss, ref.loss, 1e-12 * std::max(1.0, std::abs(ref.loss)));
  const double sq = max_abs(ref.dq_idx), sk = max_abs(ref.dk_idx);
  EXPECT_TRUE(allclose(lib.dq_idx, ref.dq_idx, 1e-12 * sq, 1e-10, "dq_idx"));
  EXPECT_TRUE(allclose(lib.dk_idx, ref.dk_idx, 1e-12 * sk, 1e-10, "dk_idx"));
}

// lambda is a float in the params: tests use a value whose float rounding is exact in double.
const double kLambda = double(0.37f);

struct Named {
  const char* name;
  Shape sh;
};

// The small shapes of the gradient checks: sparse and full-prefix supports, G = 2 and 4, a
// varlen batch, a chunk of queries (n_q < n_k), explicit positions, padded strides.
std::vector<Named> grad_cases() {
  std::vector<Named> c;
  {
    Shape s;
    s.lens_q = {37};
    s.g = 2, s.topk = 3;
    c.push_back({"sparse_g2", s});
  }
  {
    Shape s;
    s.lens_q = {29};
    s.g = 4, s.topk = 2;
    c.push_back({"sparse_g4", s});
  }
  {
    Shape s;
    s.lens_q = {40};
    s.g = 4;
    c.push_back({"warmup_g4", s});
  }
  {
    Shape s;
    s.lens_q = {33};
    s.g = 2, s.full_selection = true;
    c.push_back({"full_selection_g2", s});
  }
  {
    Shape s;
    s.lens_q = {21, 17};
    s.g = 2, s.topk = 2;
    c.push_back({"varlen_sparse_g2", s});
  }
  {
    Shape s;
    s.lens_q = {11};
    s.lens_k = {40};
    s.g = 4, s.topk = 3;
    c.push_back({"chunk_sparse_g4", s});
  }
  {
    Shape s;
    s.lens_q = {5, 4};
    s.lens_k = {30, 19};
    s.q_pos = {3, 29, 8, 16, 17, 0, 18, 9, 7};
    s.g = 2, s.topk = 2, s.h_kv = 1, s.padded = true;
    c.push_back({"varlen_chunk_qpos_padded", s});
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// (1) float64 central finite differences of the loss match the backward

TEST(KLGrad, FiniteDifferences) {
  uint64_t seed = 100;
  for (const Named& nc : grad_cases()) {
    SCOPED_TRACE(nc.name);
    Problem pb = make_problem(nc.sh, ++seed);
    const double lambda = kLambda, e = 1e-5;
    const LibOut an = call_lib(pb, {.lambda = lambda});
    ASSERT_GT(max_abs(an.dq_idx), 1e-6);
    ASSERT_GT(max_abs(an.dk_idx), 1e-6);
    // Rounding of the two loss values over the step, plus the e^2 truncation term of a smooth
    // function whose third derivative is O(1) in these units.
    const double atol = lambda * (64 * DBL_EPSILON * std::max(1.0, std::abs(an.loss)) / e + e * e);
    auto fd = [&](std::vector<double>& x) {
      std::vector<double> g(x.size());
      for (size_t t = 0; t < x.size(); ++t) {
        const double x0 = x[t];
        x[t] = x0 + e;
        const double lp = call_lib(pb, {.backward = false}).loss;
        x[t] = x0 - e;
        const double lm = call_lib(pb, {.backward = false}).loss;
        x[t] = x0;
        g[t] = lambda * (lp - lm) / (2 * e);
      }
      return g;
    };
    const std::vector<double> fd_dq = fd(pb.q_idx), fd_dk = fd(pb.k_idx);
    EXPECT_TRUE(allclose(an.dq_idx, fd_dq, atol, 1e-6, "dq_idx vs finite differences"));
    EXPECT_TRUE(allclose(an.dk_idx, fd_dk, atol, 1e-6, "dk_idx vs finite differences"));
  }
}

// ---------------------------------------------------------------------------------------------
// (2) the loss and gradient equal the closed form built from explicit probability matrices

TEST(KLGrad, MatchesClosedForm) {
  std::vector<Named> cases = grad_cases();
  {
    Shape s;
    s.lens_q = {45, 1, 30};
    s.g = 4, s.topk = 3, s.empty_rows = 4;  // all-padding rows: no term, zero dq_idx
    cases.push_back({"varlen_with_empty_rows", s});
  }
  {
    Shape s;
    s.lens_q = {70};
    s.h_kv = 3, s.g = 1, s.d = 16, s.d_idx = 12, s.bk = 16, s.topk = 2, s.padded = true;
    s.scale = 0.21f, s.index_scale = 0.4f;
    cases.push_back({"g1_explicit_scales_padded", s});
  }
  uint64_t seed = 200;
  for (const Named& nc : cases) {
    SCOPED_TRACE(nc.name);
    const Problem pb = make_problem(nc.sh, ++seed);
    for (double lambda : {1.0, kLambda, -2.5}) {
      const LibOut lib = call_lib(pb, {.lambda = lambda, .threads = 2});
      expect_matches_ref(lib, reference(pb, {.lambda = lambda}));
    }
  }
}

// A selection given in another order within each row describes the same support.
TEST(KLGrad, SelectionOrderIsIrrelevant) {
  Shape s;
  s.lens_q = {50, 26};
  s.g = 2, s.topk = 4;
  Problem pb = make_problem(s, 7);
  const LibOut a = call_lib(pb, {.lambda = kLambda});
  std::mt19937_64 rng(8);
  for (int64_t row = 0; row < pb.n_q * s.h_kv; ++row) {
    auto first = pb.topk_idx.begin() + row * pb.topk;
    std::shuffle(first, std::find(first, first + pb.topk, -1), rng);
  }
  const LibOut b = call_lib(pb, {.lambda = kLambda});
  EXPECT_NEAR(a.loss, b.loss, 1e-14 * std::abs(a.loss));
  EXPECT_TRUE(allclose(a.dq_idx, b.dq_idx, 1e-14 * max_abs(a.dq_idx), 1e-12, "dq_idx"));
  EXPECT_TRUE(allclose(a.dk_idx, b.dk_idx, 1e-14 * max_abs(a.dk_idx), 1e-12, "dk_idx"));
}

// ---------------------------------------------------------------------------------------------
// (3) KL >= 0

TEST(KLValue, NonNegative) {
  uint64_t seed = 300;
  for (double sigma : {0.3, 1.0, 3.0})
    for (int64_t topk : {0, 1, 3}) {
      // One row (a single decode query, h_kv = 1): each row's KL is seen on its own.
      Shape one;
      one.lens_q = {1};
      one.lens_k = {35};
      one.h_kv = 1, one.g = 4, one.topk = topk, one.sigma = sigma;
      Shape many;
      many.lens_q = {24, 31};
      many.g = 2, many.topk = topk, many.sigma = sigma;
      for (const Shape& s : {one, many}) {
        SCOPED_TRACE(testing::Message() << "sigma " << sigma << " topk " << topk << " n_q " << s.lens_q.size());
        const Problem pb = make_problem(s, ++seed);
        const double loss = call_lib(pb, {.backward = false}).loss;
        EXPECT_GT(loss, 0.0);  // random teacher and student never coincide
        EXPECT_NEAR(loss, reference(pb).loss, 1e-12 * std::max(1.0, loss));
      }
    }
}

// ---------------------------------------------------------------------------------------------
// (4) KL == 0 when the student equals the teacher (g = 1; index scores = teacher logits up to a
// per-row constant), and > 0 for a group mean (g > 1)

// q_idx[i, r] = [q[i, r], shift[i, r]], k_idx[j] = [k[j, .], 1] (every k head equal to k_idx), so
// S_idx = scale * (<q, k> + shift): the teacher's logits plus a per-row constant.
Problem student_equals_teacher(int64_t h_kv, int64_t topk, bool shift, uint64_t seed) {
  Shape s;
  s.lens_q = {27, 36};
  s.h_kv = h_kv, s.g = 1, s.d = 8, s.d_idx = shift ? 9 : 8, s.topk = topk;
  s.scale = 0.3f, s.index_scale = 0.3f;
  Problem pb = make_problem(s, seed);
  std::mt19937_64 rng(seed + 1);
  const std::vector<double> sh = randn(rng, pb.n_q * h_kv, 3.0);
  for (int64_t j = 0; j < pb.n_k; ++j)
    for (int64_t c = 0; c < s.d_idx; ++c) {
      pb.k_idx[j * s.d_idx + c] = c < s.d ? pb.k[(j * h_kv) * s.d + c] : 1.0;
      for (int64_t r = 1; r < h_kv; ++r)
        if (c < s.d) pb.k[(j * h_kv + r) * s.d + c] = pb.k[(j * h_kv) * s.d + c];
    }
  for (int64_t i = 0; i < pb.n_q; ++i)
    for (int64_t r = 0; r < h_kv; ++r)
      for (int64_t c = 0; c < s.d_idx; ++c)
        pb.q_idx[(i * h_kv + r) * s.d_idx + c] = c < s.d ? pb.q[(i * h_kv + r) * s.d + c] : sh[i * h_kv + r];
  return pb;
}

TEST(KLValue, ZeroWhenStudentEqualsTeacher) {
  uint64_t seed = 400;
  for (int64_t h_kv : {1, 2})
    for (int64_t topk : {0, 2})
      for (bool shift : {false, true}) {
        SCOPED_TRACE(testing::Message() << "h_kv " << h_kv << " topk " << topk << " shift " << shift);
        const Problem pb = student_equals_teacher(h_kv, topk, shift, seed += 2);
        const LibOut lib = call_lib(pb, {.lambda = kLambda});
        EXPECT_NEAR(lib.loss, 0.0, 1e-12);
        // dS = lambda * (P_idx - P) / (n h_kv) is rounding only: far below the gradients of random
        // inputs (~1e-3 here).
        EXPECT_LT(max_abs(lib.dq_idx), 1e-13);
        EXPECT_LT(max_abs(lib.dk_idx), 1e-13);
      }
}

TEST(KLValue, PositiveForGroupMean) {
  // The student can match one head's softmax but not the mean of g > 1 different heads.
  Problem pb = student_equals_teacher(2, 2, false, 450);
  Shape s = pb.sh;
  s.g = 2;
  Problem pg = make_problem(s, 451);
  pg.k = pb.k, pg.k_idx = pb.k_idx;
  for (int64_t i = 0; i < pg.n_q; ++i)
    for (int64_t r = 0; r < s.h_kv; ++r)
      for (int64_t c = 0; c < s.d; ++c)
        pg.q_idx[(i * s.h_kv + r) * s.d + c] = pg.q[((i * s.h_kv + r) * s.g) * s.d + c];  // head 0 of the group
  pg.topk_idx = pb.topk_idx;
  const LibOut lib = call_lib(pg, {.lambda = kLambda});
  EXPECT_GT(lib.loss, 1e-3);
  expect_matches_ref(lib, reference(pg, {.lambda = kLambda}));
}

// ---------------------------------------------------------------------------------------------
// (5) saved lse / index_lse

// With the float32-rounded lse values of the same support, loss and gradient move by no more than
// the rounding of lse allows; with any given values the library follows them exactly.
TEST(KLSavedLse, SameAsRecomputed) {
  Shape s;
  s.lens_q = {38, 23};
  s.g = 4, s.topk = 3;
  const Problem pb = make_problem(s, 500);
  const double lambda = kLambda;
  const Ref ref = reference(pb, {.lambda = lambda});
  std::vector<float> lse(ref.lse.begin(), ref.lse.end()), index_lse(ref.index_lse.begin(), ref.index_lse.end());
  double dt = 0, ds = 0;  // largest lse rounding errors
  for (size_t e = 0; e < lse.size(); ++e) dt = std::max(dt, std::abs(double(lse[e]) - ref.lse[e]));
  for (size_t e = 0; e < index_lse.size(); ++e) ds = std::max(ds, std::abs(double(index_lse[e]) - ref.index_lse[e]));
  ASSERT_GT(dt + ds, 0.0);
  const LibOut recomputed = call_lib(pb, {.lambda = lambda});
  for (int which = 0; which < 3; ++which) {
    SCOPED_TRACE(which == 0 ? "lse and index_lse" : which == 1 ? "lse only" : "index_lse only");
    const float* pl = which != 2 ? lse.data() : nullptr;
    const float* pi = which != 1 ? index_lse.data() : nullptr;
    const double et = pl ? dt : 0, es = pi ? ds : 0;
    const LibOut saved = call_lib(pb, {.lambda = lambda, .lse = pl, .index_lse = pi});
    expect_matches_ref(saved, reference(pb, {.lambda = lambda, .lse = pl, .index_lse = pi}));
    // An lse error e scales P by at most exp(e): |dKL| <= rho_t A + (1 + rho_t)(e_t + e_s).
    const double rho_t = std::expm1(et), rho_s = std::expm1(es);
    EXPECT_NEAR(saved.loss, recomputed.loss, rho_t * ref.mean_abs_terms + (1 + rho_t) * (et + es) + 1e-14);
    const Ref bounds = reference(pb, {.lambda = lambda, .rho_t = rho_t, .rho_s = rho_s});
    std::vector<double> bq = bounds.bound_dq, bk = bounds.bound_dk;
    for (double& x : bq) x += 1e-16;
    for (double& x : bk) x += 1e-16;
    EXPECT_TRUE(within_bounds(saved.dq_idx, recomputed.dq_idx, bq, "dq_idx"));
    EXPECT_TRUE(within_bounds(saved.dk_idx, recomputed.dk_idx, bk, "dk_idx"));
  }
  // Values off by much more than rounding: followed exactly, and visibly different.
  std::mt19937_64 rng(501);
  std::vector<float> lse2 = lse, index_lse2 = index_lse;
  for (float& x : lse2) x += float(0.05 * std::normal_distribution<double>()(rng));
  for (float& x : index_lse2) x += float(0.05 * std::normal_distribution<double>()(rng));
  const LibOut off = call_lib(pb, {.lambda = lambda, .lse = lse2.data(), .index_lse = index_lse2.data()});
  expect_matches_ref(off, reference(pb, {.lambda = lambda, .lse = lse2.data(), .index_lse = index_lse2.data()}));
  EXPECT_GT(std::abs(off.loss - recomputed.loss), 1e-4);
}

// ---------------------------------------------------------------------------------------------
// (6) a selection of every visible block is the warm-up

TEST(KLValue, FullSelectionEqualsWarmup) {
  for (int64_t g : {1, 4}) {
    Shape s;
    s.lens_q = {40, 9, 17};
    s.g = g, s.full_selection = true;
    Problem pb = make_problem(s, 600 + g);
    const LibOut sel = call_lib(pb, {.lambda = kLambda});
    pb.topk_idx.clear();
    pb.topk = 0;
    const LibOut warm = call_lib(pb, {.lambda = kLambda});
    EXPECT_NEAR(sel.loss, warm.loss, 1e-14 * warm.loss);
    EXPECT_TRUE(allclose(sel.dq_idx, warm.dq_idx, 1e-14 * max_abs(warm.dq_idx), 1e-12, "dq_idx"));
    EXPECT_TRUE(allclose(sel.dk_idx, warm.dk_idx, 1e-14 * max_abs(warm.dk_idx), 1e-12, "dk_idx"));
  }
}

// ---------------------------------------------------------------------------------------------
// (7) determinism over thread counts

TEST(KLDeterminism, ThreadCountsBitwise) {
  for (DType t : {DType::f64, DType::f32}) {
    for (int64_t topk : {0, 4}) {
      SCOPED_TRACE(testing::Message() << dtype_name(t) << " topk " << topk);
      Shape s;
      s.lens_q = {70, 3, 90};
      s.g = 2, s.d = 16, s.d_idx = 16, s.topk = topk;
      const Problem pb = make_problem(s, 700 + topk);
      const LibOut base = call_lib(pb, {.dtype = t, .lambda = kLambda, .threads = 1});
      for (int threads : {2, 2, 2, 0}) {
        const LibOut o = call_lib(pb, {.dtype = t, .lambda = kLambda, .threads = threads});
        EXPECT_EQ(std::memcmp(&o.loss, &base.loss, sizeof(double)), 0) << threads << " threads";
        EXPECT_EQ(o.dq_buf.bytes, base.dq_buf.bytes) << "dq_idx, " << threads << " threads";
        EXPECT_EQ(o.dk_buf.bytes, base.dk_buf.bytes) << "dk_idx, " << threads << " threads";
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// (8) float32 and bfloat16 inputs

// Unit roundoff of a storage type.
double unit_roundoff(DType t) { return t == DType::f32 ? std::ldexp(1.0, -24) : std::ldexp(1.0, -8); }

// Inputs exactly representable in bf16: every dtype hands the same values to the double math, so
// the loss is bitwise the float64 loss and the gradients differ by their output rounding only.
// bf16 outputs are rounded twice (double -> float -> bf16), hence u_bf16 + u_f32.
TEST(KLPrecision, RepresentableInputs) {
  Shape s;
  s.lens_q = {33, 20};
  s.g = 2, s.topk = 3, s.padded = true;
  const Problem pb = make_problem(s, 800, DType::bf16);
  const LibOut ref = call_lib(pb, {.dtype = DType::f64, .lambda = kLambda});
  for (DType t : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(t));
    const LibOut o = call_lib(pb, {.dtype = t, .lambda = kLambda});
    EXPECT_EQ(o.loss, ref.loss);
    const double rtol = unit_roundoff(t) + (t == DType::bf16 ? unit_roundoff(DType::f32) : 0.0);
    EXPECT_TRUE(allclose(o.dq_idx, ref.dq_idx, 0.0, rtol, "dq_idx"));
    EXPECT_TRUE(allclose(o.dk_idx, ref.dk_idx, 0.0, rtol, "dk_idx"));
  }
}

// Inputs rounded to the dtype by the call: against the float64 result on the unrounded inputs,
// within bounds derived from the input rounding. A product of two rounded inputs has relative
// error <= 2u + u^2, so every logit moves by at most delta = (2u + u^2) * max scale * sum|q_c k_c|,
// every log-probability by <= 2 delta and every probability by a factor within exp(+-2 delta).
TEST(KLPrecision, RoundedInputsWithinDerivedBounds) {
  Shape s;
  s.lens_q = {33, 20};
  s.g = 4, s.topk = 3;
  const Problem pb = make_problem(s, 801);
  const double lambda = kLambda;
  const Ref ref0 = reference(pb, {.lambda = lambda});
  for (DType t : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(t));
    const double u = unit_roundoff(t), uo = u + (t == DType::bf16 ? unit_roundoff(DType::f32) : 0.0);
    const double dt = (2 * u + u * u) * ref0.max_abs_t, ds = (2 * u + u * u) * ref0.max_abs_s;
    const double rho_t = std::expm1(2 * dt), rho_s = std::expm1(2 * ds);
    const LibOut o = call_lib(pb, {.dtype = t, .lambda = lambda});
    // |dKL| <= sum |dP| |log P - log P_idx| + sum (P + |dP|)(|d log P| + |d log P_idx|)
    EXPECT_NEAR(o.loss, ref0.loss, rho_t * ref0.mean_abs_terms + (1 + rho_t) * 2 * (dt + ds) + 1e-14);
    const Ref b = reference(pb, {.lambda = lambda, .rho_t = rho_t, .rho_s = rho_s, .u = u});
    // Plus the rounding of the stored gradient itself.
    std::vector<double> bq(b.bound_dq.size()), bk(b.bound_dk.size());
    for (size_t e = 0; e < bq.size(); ++e) bq[e] = b.bound_dq[e] * (1 + uo) + uo * std::abs(ref0.dq_idx[e]) + 1e-300;
    for (size_t e = 0; e < bk.size(); ++e) bk[e] = b.bound_dk[e] * (1 + uo) + uo * std::abs(ref0.dk_idx[e]) + 1e-300;
    EXPECT_TRUE(within_bounds(o.dq_idx, ref0.dq_idx, bq, "dq_idx"));
    EXPECT_TRUE(within_bounds(o.dk_idx, ref0.dk_idx, bk, "dk_idx"));
    // The bounds are not vacuous: the gradients are resolved to a few percent at worst.
    EXPECT_LT(rel_l2(o.dq_idx, ref0.dq_idx), t == DType::f32 ? 1e-5 : 5e-2);
    EXPECT_LT(rel_l2(o.dk_idx, ref0.dk_idx), t == DType::f32 ? 1e-5 : 5e-2);
  }
}

}  // namespace
}  // namespace msa::test
