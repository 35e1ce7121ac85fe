// Tests of msa::dense_attention_backward on the CUDA backend against the CPU backend run in float64
// on the same bf16-exact inputs (q, k, v, do, the bf16 o and the float32 lse of a float64
// forward): single sequences of awkward lengths, every group size and head dim, varlen batches
// mixing empty, tiny and long sequences, chunked queries (bottom-right and explicit unordered
// positions), strided and misaligned operands, and both ways of adding the dq partials. Outputs
// are poisoned before every run; the padding of strided outputs must stay poisoned.
//
// Tolerances (derived, per element, relative to the row scale of each gradient): the kernel
// rounds P (for dv = P^T do) and dS (for dk = scale dS^T q, dq = scale dS k) to bf16, unit
// roundoff u = 2^-8 per term. The rounding errors of the terms of one sum are independent with
// random sign, so an element's error is about u / sqrt(3) times the root sum of squares of its
// terms, which for these random inputs is the size of a typical entry of the row; the largest
// of ~10^6 elements stays under 6 such standard deviations, ~3.5 u typical, and the row max is
// at least ~2.5 typical entries for d >= 64: ~1.4 u row max. The bf16 store adds u |x| <= u row
// max. fp32 accumulation, ex2.approx and the fp32 delta are ~2^-20 relative. Bound: 4 u row max
// (about 1.7x margin). Rows that cancel to ~0 (one query seeing one key: dS = P (dP - delta) with
// delta = dP exactly) keep the fp32 rounding of dP - delta, two length-d dot products of size up
// to d max|do| max|v|: 2^-22 d max|do| max|v| per dS, times scale max|k| (dq) or scale max|q|
// (dk) per term; plus 2^-14 of the tensor's max. A wrong or missing key or query tile moves
// elements by a typical entry, 30x this bound. A global relative L2 error bound of 2^-7 besides.
// GPU tests skip with a message when no device is visible.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_test_util.h"
#include "test_util.h"

#ifdef MSA_WITH_CUDA
#include "cuda/dense_bwd.h"
#endif

namespace msa::test {
namespace {

TEST(CudaDenseBwd, BadArgumentsThrowBeforeLaunch) {
  REQUIRE_CUDA_BUILD();
  AttentionBwdParams p;
  p.seq.n_q = p.seq.n_k = 8;
  p.h_q = 4;
  p.h_kv = 2;
  p.d = 96;
  Exec ex;
  ex.backend = Backend::cuda;
  EXPECT_TRUE(throws_error([&] { dense_attention_backward(p, ex); }, {"msa::dense_attention_backward", "d = 96"}));
  p.d = 64;
  p.h_q = 6;  // g = 3
  EXPECT_TRUE(throws_error([&] { dense_attention_backward(p, ex); }, {"h_q / h_kv = 3"}));
  p.h_q = 4;
  p.dtype = DType::f32;
  EXPECT_TRUE(throws_error([&] { dense_attention_backward(p, ex); }, {"bfloat16"}));
  p.dtype = DType::bf16;
  EXPECT_TRUE(throws_error([&] { dense_attention_backward(p, ex); }, {"q is null"}));
}

#ifndef MSA_WITH_CUDA

TEST(CudaDenseBwd, GpuTests) { GTEST_SKIP() << "built without the CUDA backend: no GPU tests"; }

#else

constexpr unsigned char kPoisonByte = 0xff;  // bf16 0xffff is NaN

// One problem. Strides and offsets in elements; 0 = contiguous.
struct Case {
  std::vector<int32_t> lens_q, lens_k;
  std::vector<int32_t> q_pos;  // empty: bottom-right aligned
  int64_t h_q = 4, h_kv = 1, d = 128;
  float scale = 0.f;
  bool pass_cu_q = true, pass_cu_k = true;
  // Inputs q, k, v, o, do and outputs dq, dk, dv: token stride, head stride, offset.
  int64_t q_tok = 0, q_head = 0, q_off = 0, k_tok = 0, k_head = 0, k_off = 0, v_tok = 0, v_head = 0, v_off = 0;
  int64_t o_tok = 0, o_head = 0, o_off = 0, do_tok = 0, do_head = 0, do_off = 0;
  int64_t dq_tok = 0, dq_head = 0, dq_off = 0, dk_tok = 0, dk_head = 0, dk_off = 0, dv_tok = 0, dv_head = 0, dv_off = 0;
  uint64_t seed = 1;

  int64_t n_q() const { return std::accumulate(lens_q.begin(), lens_q.end(), int64_t(0)); }
  int64_t n_k() const { return std::accumulate(lens_k.begin(), lens_k.end(), int64_t(0)); }
  std::string name() const {
    std::ostringstream os;
    os << "lens_q {";
    for (auto l : lens_q) os << l << " ";
    os << "} lens_k {";
    for (auto l : lens_k) os << l << " ";
    os << "} h_q " << h_q << " h_kv " << h_kv << " d " << d << (q_pos.empty() ? "" : " explicit q_pos") << " seed "
       << seed;
    return os.str();
  }
};

Case make(uint64_t seed, std::vector<int32_t> lens_q, std::vector<int32_t> lens_k, int64_t h_q, int64_t h_kv,
          int64_t d) {
  Case c;
  c.seed = seed;
  c.lens_q = std::move(lens_q);
  c.lens_k = std::move(lens_k);
  c.h_q = h_q;
  c.h_kv = h_kv;
  c.d = d;
  return c;
}
Case make_self(uint64_t seed, std::vector<int32_t> lens, int64_t h_q, int64_t h_kv, int64_t d) {
  return make(seed, lens, lens, h_q, h_kv, d);
}

// Layout of one [n, h, d] tensor inside its storage.
struct Lay {
  int64_t n, h, d, tok, head, off;
  Lay(int64_t n_, int64_t h_, int64_t d_, int64_t tok_, int64_t head_, int64_t off_)
      : n(n_), h(h_), d(d_), head(head_ ? head_ : d_), off(off_) {
    tok = tok_ ? tok_ : h * head;
  }
  size_t size() const { return size_t(off + std::max<int64_t>(n, 1) * tok); }
  size_t at(int64_t i, int64_t r, int64_t e) const { return size_t(off + i * tok + r * head + e); }
};

// bf16 storage of logical values v laid out by l; the padding holds random numbers, so a kernel
// that reads it produces wrong values rather than a NaN that might be masked away.
std::vector<bf16> store(const std::vector<double>& v, const Lay& l, std::mt19937_64& rng) {
  std::vector<double> pad = randn(rng, l.size(), 3.0, DType::bf16);
  std::vector<bf16> out(l.size());
  for (size_t e = 0; e < out.size(); ++e) out[e] = float_to_bf16(float(pad[e]));
  for (int64_t i = 0; i < l.n; ++i)
    for (int64_t r = 0; r < l.h; ++r)
      for (int64_t e = 0; e < l.d; ++e) out[l.at(i, r, e)] = float_to_bf16(float(v[(i * l.h + r) * l.d + e]));
  return out;
}

struct Data {
  std::vector<double> q, k, v, o, dout;  // logical, bf16-exact
  std::vector<float> lse;
  std::vector<int32_t> cu_q, cu_k;
};

struct Grads {
  std::vector<double> dq, dk, dv;  // logical
};

Varlen host_varlen(const Case& c, const Data& x) {
  Varlen s;
  s.n_q = c.n_q();
  s.n_k = c.n_k();
  s.batch = int64_t(c.lens_q.size());
  if (c.pass_cu_q) s.cu_seqlens_q = x.cu_q.data();
  if (c.pass_cu_k) s.cu_seqlens_k = x.cu_k.data();
  if (!c.q_pos.empty()) s.q_pos = c.q_pos.data();
  return s;
}

// Inputs, the float64 forward's o rounded to bf16 and its lse, and the float64 CPU backward of them.
Data make_data(const Case& c, Grads* ref) {
  std::mt19937_64 rng(c.seed);
  Data x;
  const size_t nq = size_t(c.n_q() * c.h_q * c.d), nk = size_t(c.n_k() * c.h_kv * c.d);
  x.q = randn(rng, nq, 1.0, DType::bf16);
  x.k = randn(rng, nk, 1.0, DType::bf16);
  x.v = randn(rng, nk, 1.0, DType::bf16);
  x.dout = randn(rng, nq, 1.0, DType::bf16);
  x.cu_q = cu_from_lengths(c.lens_q);
  x.cu_k = cu_from_lengths(c.lens_k);
  AttentionBwdParams p;
  p.seq = host_varlen(c, x);
  p.h_q = c.h_q;
  p.h_kv = c.h_kv;
  p.d = c.d;
  p.scale = c.scale;
  p.dtype = DType::f64;
  p.q = x.q.data();
  p.k = x.k.data();
  p.v = x.v.data();
  std::vector<double> o(nq, std::nan(""));
  x.lse.assign(size_t(c.n_q() * c.h_q), std::nanf(""));
  p.o = o.data();
  p.lse = x.lse.data();
  dense_attention_forward(p, Exec{});
  x.o.resize(nq);
  for (size_t e = 0; e < nq; ++e) x.o[e] = bf16_to_float(float_to_bf16(float(o[e])));
  p.o = x.o.data();
  p.do_ = x.dout.data();
  ref->dq.assign(nq, std::nan(""));
  ref->dk.assign(nk, std::nan(""));
  ref->dv.assign(nk, std::nan(""));
  p.dq = ref->dq.data();
  p.dk = ref->dk.data();
  p.dv = ref->dv.data();
  dense_attention_backward(p, Exec{});
  return x;
}

struct GpuOut {
  Grads g;
  std::vector<bf16> raw;       // dq, dk, dv storage, padding included, for bitwise comparisons
  size_t outside_written = 0;  // padding elements of dq, dk, dv that lost their poison
};

// How a run reaches the kernels: the public API (default dq mode, or p.deterministic), or the
// internal entry with an explicit dq mode (params resolved as the API would).
enum class Via { api, api_deterministic, atomic, ordered };
const char* via_name(Via v) {
  switch (v) {
    case Via::api:
      return "public API, default dq mode";
    case Via::api_deterministic:
      return "public API, deterministic";
    case Via::atomic:
      return "internal entry, atomic dq";
    case Via::ordered:
      return "internal entry, ordered dq";
  }
  return "";
}

// Runs the CUDA backward once, outputs poisoned first.
GpuOut run_gpu(const Case& c, const Data& x, Via via) {
  const bool other_mode = via == Via::atomic || via == Via::ordered;
  std::mt19937_64 rng(c.seed ^ 0x9e3779b97f4a7c15ull);
  const Lay lq(c.n_q(), c.h_q, c.d, c.q_tok, c.q_head, c.q_off), lk(c.n_k(), c.h_kv, c.d, c.k_tok, c.k_head, c.k_off),
      lv(c.n_k(), c.h_kv, c.d, c.v_tok, c.v_head, c.v_off), lo(c.n_q(), c.h_q, c.d, c.o_tok, c.o_head, c.o_off),
      ldo(c.n_q(), c.h_q, c.d, c.do_tok, c.do_head, c.do_off), ldq(c.n_q(), c.h_q, c.d, c.dq_tok, c.dq_head, c.dq_off),
      ldk(c.n_k(), c.h_kv, c.d, c.dk_tok, c.dk_head, c.dk_off),
      ldv(c.n_k(), c.h_kv, c.d, c.dv_tok, c.dv_head, c.dv_off);
  DevBuf<bf16> q(store(x.q, lq, rng)), k(store(x.k, lk, rng)), v(store(x.v, lv, rng)), o(store(x.o, lo, rng)),
      dout(store(x.dout, ldo, rng)), dq(ldq.size()), dk(ldk.size()), dv(ldv.size());
  DevBuf<float> lse(x.lse);
  DevBuf<int32_t> cu_q(x.cu_q), cu_k(x.cu_k), q_pos(c.q_pos);

  AttentionBwdParams p;
  p.seq.n_q = c.n_q();
  p.seq.n_k = c.n_k();
  p.seq.batch = int64_t(c.lens_q.size());
  if (c.pass_cu_q) p.seq.cu_seqlens_q = cu_q.ptr;
  if (c.pass_cu_k) p.seq.cu_seqlens_k = cu_k.ptr;
  if (!c.q_pos.empty()) p.seq.q_pos = q_pos.ptr;
  p.h_q = c.h_q;
  p.h_kv = c.h_kv;
  p.d = c.d;
  p.scale = c.scale;
  p.dtype = DType::bf16;
  auto bind = [](const DevBuf<bf16>& b, const Lay& l, const void*& ptr, int64_t& tok, int64_t& head, bool resolve) {
    ptr = b.ptr + l.off;
    tok = resolve ? l.tok : 0;
    head = resolve ? l.head : 0;
  };
  const void* tmp = nullptr;
  // Strides given only where the case sets them, so the API's defaults are exercised too; the
  // internal entry gets them resolved.
  const bool r = other_mode;
  bind(q, lq, p.q, p.stride_q_tok, p.stride_q_head, r || c.q_tok || c.q_head);
  bind(k, lk, p.k, p.stride_k_tok, p.stride_k_head, r || c.k_tok || c.k_head);
  bind(v, lv, p.v, p.stride_v_tok, p.stride_v_head, r || c.v_tok || c.v_head);
  bind(o, lo, tmp, p.stride_o_tok, p.stride_o_head, r || c.o_tok || c.o_head);
  p.o = const_cast<void*>(tmp);
  bind(dout, ldo, p.do_, p.stride_do_tok, p.stride_do_head, r || c.do_tok || c.do_head);
  bind(dq, ldq, tmp, p.stride_dq_tok, p.stride_dq_head, r || c.dq_tok || c.dq_head);
  p.dq = const_cast<void*>(tmp);
  bind(dk, ldk, tmp, p.stride_dk_tok, p.stride_dk_head, r || c.dk_tok || c.dk_head);
  p.dk = const_cast<void*>(tmp);
  bind(dv, ldv, tmp, p.stride_dv_tok, p.stride_dv_head, r || c.dv_tok || c.dv_head);
  p.dv = const_cast<void*>(tmp);
  p.lse = lse.ptr;
  dq.poison(kPoisonByte);
  dk.poison(kPoisonByte);
  dv.poison(kPoisonByte);
  if (!other_mode) {
    Exec ex;
    ex.backend = Backend::cuda;
    p.deterministic = via == Via::api_deterministic;
    dense_attention_backward(p, ex);
  } else {
    if (p.scale == 0.f) p.scale = float(1.0 / std::sqrt(double(c.d)));
    cuda::run_dense_bwd(p, nullptr, via == Via::atomic ? cuda::DenseBwdDq::atomic : cuda::DenseBwdDq::ordered);
  }
  cuda_check(cudaDeviceSynchronize(), "dense_attention_backward kernels");

  GpuOut out;
  auto fetch = [&](const DevBuf<bf16>& b, const Lay& l, std::vector<double>& dst) {
    const std::vector<bf16> raw = b.get();
    out.raw.insert(out.raw.end(), raw.begin(), raw.end());
    std::vector<char> inside(raw.size(), 0);
    dst.assign(size_t(l.n * l.h * l.d), 0.0);
    for (int64_t i = 0; i < l.n; ++i)
      for (int64_t r2 = 0; r2 < l.h; ++r2)
        for (int64_t e = 0; e < l.d; ++e) {
          inside[l.at(i, r2, e)] = 1;
          dst[size_t((i * l.h + r2) * l.d + e)] = bf16_to_float(raw[l.at(i, r2, e)]);
        }
    for (size_t e = 0; e < raw.size(); ++e)
      if (!inside[e] && raw[e].bits != 0xffff) ++out.outside_written;
  };
  fetch(dq, ldq, out.g.dq);
  fetch(dk, ldk, out.g.dk);
  fetch(dv, ldv, out.g.dv);
  return out;
}

// Per-element check with the derived row-scale tolerance (see the top of the file); reports the
// worst element's coordinates.
::testing::AssertionResult check_grad(const char* what, const std::vector<double>& got, const std::vector<double>& ref,
                                      int64_t h, int64_t d, double floor) {
  const double u = std::ldexp(1.0, -8);
  double gmax = 0;
  for (double r : ref) gmax = std::max(gmax, std::abs(r));
  double worst = -1, worst_tol = 0, worst_ratio = 0;
  size_t wi = 0, ri = 0;
  for (size_t row = 0; row * d < ref.size(); ++row) {
    double rmax = 0;
    for (int64_t e = 0; e < d; ++e) rmax = std::max(rmax, std::abs(ref[row * d + e]));
    const double tol = 4 * u * rmax + std::ldexp(gmax, -14) + floor;
    for (int64_t e = 0; e < d; ++e) {
      const size_t i = row * d + e;
      if (!std::isfinite(got[i]) || !std::isfinite(ref[i]))
        return ::testing::AssertionFailure()
               << what << ": non-finite at token " << i / (h * d) << " head " << (i / d) % h << " col " << e << ": got "
               << got[i] << ", expected " << ref[i];
      const double excess = std::abs(got[i] - ref[i]) - tol;
      if (excess > worst) {
        worst = excess;
        wi = i;
        worst_tol = tol;
      }
      if (std::abs(got[i] - ref[i]) > worst_ratio * tol) {
        worst_ratio = std::abs(got[i] - ref[i]) / tol;
        ri = i;
      }
    }
  }
  if (worst > 0)
    return ::testing::AssertionFailure() << what << ": worst element token " << wi / (h * d) << " head " << (wi / d) % h
                                         << " col " << wi % d << ": got " << got[wi] << ", expected " << ref[wi]
                                         << " (tolerance " << worst_tol << ", excess " << worst << ")";
  const double err = rel_l2(got, ref);
  // The worst element relative to its tolerance, for the record (the test output shows how close
  // the kernel comes to the bound).
  if (!ref.empty())
    std::printf("  %s: worst |err| / tol = %.3f at token %zu head %zu col %zu (got %.6g, expected %.6g); rel L2 %.2e\n",
                what, worst_ratio, ri / size_t(h * d), (ri / size_t(d)) % size_t(h), ri % size_t(d), got[ri], ref[ri],
                err);
  if (err > std::ldexp(1.0, -7)) return ::testing::AssertionFailure() << what << ": relative L2 error " << err;
  return ::testing::AssertionSuccess();
}

void run_case(const Case& c) {
  SCOPED_TRACE(c.name());
  std::printf("case %s\n", c.name().c_str());
  Grads ref;
  const Data x = make_data(c, &ref);
  auto max_abs = [](const std::vector<double>& v) {
    double m = 0;
    for (double e : v) m = std::max(m, std::abs(e));
    return m;
  };
  const double scale = c.scale != 0.f ? double(c.scale) : double(float(1.0 / std::sqrt(double(c.d))));
  const double ds_floor = std::ldexp(1.0, -22) * double(c.d) * max_abs(x.dout) * max_abs(x.v);
  const double floor_dq = ds_floor * scale * max_abs(x.k), floor_dk = ds_floor * scale * max_abs(x.q);
  const double floor_dv = std::ldexp(1.0, -22) * max_abs(x.dout);
  for (Via via : {Via::api, Via::atomic, Via::ordered}) {
    SCOPED_TRACE(via_name(via));
    const GpuOut got = run_gpu(c, x, via);
    EXPECT_TRUE(check_grad("dq", got.g.dq, ref.dq, c.h_q, c.d, floor_dq));
    EXPECT_TRUE(check_grad("dk", got.g.dk, ref.dk, c.h_kv, c.d, floor_dk));
    EXPECT_TRUE(check_grad("dv", got.g.dv, ref.dv, c.h_kv, c.d, floor_dv));
    EXPECT_EQ(got.outside_written, 0u) << "elements outside dq, dk, dv were written";
  }
}

TEST(CudaDenseBwd, SingleSequenceLengths) {
  REQUIRE_GPU();
  uint64_t seed = 100;
  for (int32_t n : {1, 127, 128, 129, 1023}) {
    run_case(make_self(++seed, {n}, 8, 2, 128));
    Case c = make_self(++seed, {n}, 3, 3, 64);
    c.pass_cu_q = c.pass_cu_k = false;  // the no-cu_seqlens path
    run_case(c);
  }
}

TEST(CudaDenseBwd, GroupSizesAndHeadDims) {
  REQUIRE_GPU();
  uint64_t seed = 200;
  for (int64_t d : {64, 128})
    for (int64_t g : {1, 2, 4, 8, 16}) {
      Case c = make_self(++seed, {300}, 2 * g, 2, d);
      c.pass_cu_q = c.pass_cu_k = (g % 4 == 0);
      if (g == 8) c.scale = 0.3f;  // a non-default scale
      run_case(c);
    }
}

TEST(CudaDenseBwd, Long4097) {
  REQUIRE_GPU();
  run_case(make_self(301, {4097}, 4, 1, 128));
  run_case(make_self(302, {4097}, 2, 2, 64));
}

TEST(CudaDenseBwd, VarlenTinyEmptyAndLong) {
  REQUIRE_GPU();
  run_case(make_self(401, {1, 700, 3, 128, 0, 257, 1, 129}, 8, 1, 128));
  run_case(make_self(402, {5, 0, 0, 1030, 2, 64}, 2, 2, 64));
  run_case(make_self(403, {9, 300, 1, 16, 17}, 16, 1, 64));
}

TEST(CudaDenseBwd, ChunkedQueriesBottomRight) {
  REQUIRE_GPU();
  // Sequences with no queries leave zeros in dk and dv of their keys.
  run_case(make(501, {64, 1, 200, 0, 5}, {1000, 37, 200, 10, 130}, 16, 1, 128));
  run_case(make(502, {64, 1, 200, 0, 5}, {1000, 37, 200, 10, 130}, 4, 2, 64));
  Case c = make(503, {100}, {777}, 8, 2, 128);  // one chunk without cu_seqlens_q
  c.pass_cu_q = false;
  run_case(c);
  run_case(make(504, {0}, {300}, 4, 1, 128));  // no queries at all: dk = dv = 0
}

TEST(CudaDenseBwd, ExplicitPositions) {
  REQUIRE_GPU();
  for (auto [seed, h_q, d] : {std::tuple<uint64_t, int64_t, int64_t>{601, 4, 128}, {602, 16, 64}}) {
    Case c = make(seed, {70, 7, 1}, {900, 300, 50}, h_q, 1, d);
    std::mt19937_64 rng(seed);
    for (size_t b = 0; b < c.lens_q.size(); ++b)
      for (int32_t t = 0; t < c.lens_q[b]; ++t) {
        // Unordered, with repeats and both ends of the range; the first sequence's positions are
        // all below 700, so its later key blocks see no query (tiles skipped, zeros).
        int32_t p = int32_t(rng() % uint64_t(b == 0 ? 700 : c.lens_k[b]));
        if (t == 0) p = b == 0 ? 699 : c.lens_k[b] - 1;
        if (t == 1) p = 0;
        c.q_pos.push_back(p);
      }
    run_case(c);
  }
}

TEST(CudaDenseBwd, StridedAndMisalignedLayouts) {
  REQUIRE_GPU();
  {
    // q, k, v as views into one packed qkv projection [n, h_q + 2 h_kv, d]; padded gradient rows.
    Case c = make_self(801, {70, 300}, 8, 2, 128);
    const int64_t row = (c.h_q + 2 * c.h_kv) * c.d;
    c.q_tok = c.k_tok = c.v_tok = row;
    c.k_off = c.h_q * c.d;
    c.v_off = (c.h_q + c.h_kv) * c.d;
    c.dq_tok = c.h_q * c.d + 64;
    c.dq_head = c.d + 8;
    c.dk_tok = c.h_kv * c.d + 16;
    c.dv_head = c.d + 8;
    c.dv_tok = c.h_kv * (c.d + 8);
    c.o_tok = c.h_q * c.d + 32;
    run_case(c);
  }
  {
    // Odd offsets and strides: repacked q, do, k, v for TMA, scalar o/do loads, scalar stores.
    Case c = make_self(802, {33, 200}, 4, 2, 64);
    c.q_off = 1;
    c.q_head = 67;
    c.q_tok = 4 * 67 + 3;
    c.k_off = 3;
    c.k_head = 65;
    c.k_tok = 2 * 65 + 1;
    c.v_off = 5;
    c.v_tok = 2 * 64 + 7;
    c.o_off = 1;
    c.o_head = 65;
    c.o_tok = 4 * 65 + 1;
    c.do_off = 3;
    c.do_tok = 4 * 64 + 5;
    c.dq_off = 1;
    c.dq_head = 65;
    c.dq_tok = 4 * 65 + 1;
    c.dk_off = 1;
    c.dk_tok = 2 * 64 + 3;
    c.dv_off = 3;
    c.dv_head = 67;
    c.dv_tok = 2 * 67 + 1;
    run_case(c);
  }
}

// p.deterministic: 20 runs bitwise identical (dq sums the key tiles in order; dk, dv are register
// sums in every mode), and as accurate as the other modes. Several key tiles per query tile, varlen.
TEST(CudaDenseBwd, DeterministicTwentyRunsBitwise) {
  REQUIRE_GPU();
  for (const Case& c : {make_self(1001, {1000, 300, 7}, 8, 1, 128), make_self(1002, {700, 129}, 4, 2, 64)}) {
    SCOPED_TRACE(c.name());
    Grads ref;
    const Data x = make_data(c, &ref);
    const GpuOut first = run_gpu(c, x, Via::api_deterministic);
    EXPECT_TRUE(check_grad("dq", first.g.dq, ref.dq, c.h_q, c.d, 0.0));
    EXPECT_TRUE(check_grad("dk", first.g.dk, ref.dk, c.h_kv, c.d, 0.0));
    EXPECT_TRUE(check_grad("dv", first.g.dv, ref.dv, c.h_kv, c.d, 0.0));
    for (int rep = 1; rep < 20; ++rep) EXPECT_TRUE(bitwise_equal(run_gpu(c, x, Via::api_deterministic).raw, first.raw));
  }
}

// Small enough for compute-sanitizer (memcheck, racecheck, synccheck) to run in seconds.
TEST(CudaDenseBwd, SanitizerSmall) {
  REQUIRE_GPU();
  run_case(make_self(901, {1, 130, 5}, 4, 1, 128));
  run_case(make(902, {3, 64}, {300, 64}, 2, 2, 64));
  run_case(make_self(903, {300}, 4, 1, 128));  // three key tiles per query tile: the ordered turns
}

TEST(CudaDenseBwd, NoTokensIsANoOp) {
  REQUIRE_GPU();
  AttentionBwdParams p;
  p.h_q = 4;
  p.h_kv = 1;
  p.d = 128;
  Exec ex;
  ex.backend = Backend::cuda;
  EXPECT_NO_THROW(dense_attention_backward(p, ex));
}

#endif

}  // namespace
}  // namespace msa::test
