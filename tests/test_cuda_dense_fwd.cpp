// Tests of msa::dense_attention_forward on the CUDA backend against the CPU backend run in float64
// on the same bf16-exact inputs: single sequences of awkward lengths, every group size and head
// dim, varlen batches mixing tiny, empty and long sequences, chunked queries (bottom-right and
// explicit positions), decode, strided and misaligned operands, all CTA schedules (bitwise equal;
// the persistent one also with many tiles per CTA), and 20 bitwise-identical repeats. Outputs are poisoned before every run.
//
// Tolerances (derived, per element of o): the kernel rounds P to bf16 (unit roundoff 2^-8) for
// the P V product while its normaliser sums the fp32 P, so o moves by at most
// 2^-8 * sum_j p_j |v_j| / l (computed exactly by a second CPU run with |v|); fp32 accumulation and
// the exp2 approximation add well under 2^-11 of the same scale at these lengths; the bf16 store
// rounds by at most 2^-8 |o|. Rows with few keys come close to the P term (one dominant key).
// lse is fp32 throughout: 1e-4 absolute (an extra or missing key moves it by ~1/n).
// GPU tests skip with a message when no device is visible.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda_test_util.h"
#include "test_util.h"

#ifdef MSA_WITH_CUDA
#include "cuda/dense_fwd.h"
#endif

namespace msa::test {
namespace {

TEST(CudaDenseFwd, BadArgumentsThrowBeforeLaunch) {
  REQUIRE_CUDA_BUILD();
  AttentionParams p;
  p.seq.n_q = p.seq.n_k = 8;
  p.h_q = 4;
  p.h_kv = 2;
  p.d = 96;
  Exec ex;
  ex.backend = Backend::cuda;
  EXPECT_TRUE(throws_error([&] { dense_attention_forward(p, ex); }, {"msa::dense_attention_forward", "d = 96"}));
  p.d = 64;
  p.h_q = 6;  // g = 3
  EXPECT_TRUE(throws_error([&] { dense_attention_forward(p, ex); }, {"h_q / h_kv = 3"}));
  p.h_q = 4;
  p.dtype = DType::f32;
  EXPECT_TRUE(throws_error([&] { dense_attention_forward(p, ex); }, {"bfloat16"}));
  p.dtype = DType::bf16;
  EXPECT_TRUE(throws_error([&] { dense_attention_forward(p, ex); }, {"q is null"}));
  p.seq.batch = 2;  // several sequences need cu_seqlens_q, even as device pointers
  EXPECT_TRUE(throws_error([&] { dense_attention_forward(p, ex); }, {"cu_seqlens_q"}));
}

#ifndef MSA_WITH_CUDA

TEST(CudaDenseFwd, GpuTests) { GTEST_SKIP() << "built without the CUDA backend: no GPU tests"; }

#else

// Outputs are filled with this byte before every run: bf16 0xffff and float 0xffffffff are NaN.
constexpr unsigned char kPoisonByte = 0xff;

// One problem: lengths, heads, layout. Strides and offsets are in elements; 0 = contiguous.
struct Case {
  std::vector<int32_t> lens_q, lens_k;
  std::vector<int32_t> q_pos;  // empty: bottom-right aligned
  int64_t h_q = 4, h_kv = 1, d = 128;
  float scale = 0.f;
  bool pass_cu_q = true, pass_cu_k = true;
  int64_t q_tok = 0, q_head = 0, k_tok = 0, k_head = 0, v_tok = 0, v_head = 0, o_tok = 0, o_head = 0;
  int64_t q_off = 0, k_off = 0, v_off = 0, o_off = 0;
  uint64_t seed = 1;

  int64_t n_q() const { return std::accumulate(lens_q.begin(), lens_q.end(), int64_t(0)); }
  int64_t n_k() const { return std::accumulate(lens_k.begin(), lens_k.end(), int64_t(0)); }
  int64_t g() const { return h_q / h_kv; }
  std::string name() const {
    std::ostringstream os;
    os << "lens_q {";
    for (auto l : lens_q) os << l << " ";
    os << "} lens_k {";
    for (auto l : lens_k) os << l << " ";
    os << "} h_q " << h_q << " h_kv " << h_kv << " d " << d << (q_pos.empty() ? "" : " explicit q_pos")
       << " seed " << seed;
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

// A [n, h, d] tensor laid out with strides and an offset; the padding holds random numbers, so a
// kernel that reads it produces wrong values rather than a NaN that might be masked away.
struct Strided {
  int64_t tok, head, off;
  std::vector<bf16> data;
  Strided(const std::vector<double>& v, int64_t n, int64_t h, int64_t d, int64_t tok_, int64_t head_, int64_t off_,
          std::mt19937_64& rng)
      : head(head_ ? head_ : d), off(off_) {
    tok = tok_ ? tok_ : h * head;
    const size_t size = size_t(off + std::max<int64_t>(n, 1) * tok);
    std::vector<double> pad = randn(rng, size, 3.0, DType::bf16);
    data.resize(size);
    for (size_t e = 0; e < size; ++e) data[e] = float_to_bf16(float(pad[e]));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < h; ++r)
        for (int64_t e = 0; e < d; ++e) data[off + i * tok + r * head + e] = float_to_bf16(float(v[(i * h + r) * d + e]));
  }
};

struct Ref {
  std::vector<double> o, o_absv;  // [n_q, h_q, d]: o and the attention-weighted |v|
  std::vector<float> lse;         // [n_q, h_q]
};

struct Data {
  std::vector<double> q, k, v;  // logical, bf16-exact
  std::vector<int32_t> cu_q, cu_k;
};

Data make_data(const Case& c) {
  std::mt19937_64 rng(c.seed);
  Data x;
  x.q = randn(rng, size_t(c.n_q() * c.h_q * c.d), 1.0, DType::bf16);
  x.k = randn(rng, size_t(c.n_k() * c.h_kv * c.d), 1.0, DType::bf16);
  x.v = randn(rng, size_t(c.n_k() * c.h_kv * c.d), 1.0, DType::bf16);
  x.cu_q = cu_from_lengths(c.lens_q);
  x.cu_k = cu_from_lengths(c.lens_k);
  return x;
}

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

// CPU backend in float64: o, lse, and o with |v| in place of v (the scale of the P rounding error).
Ref run_cpu(const Case& c, const Data& x) {
  Ref r;
  AttentionParams p;
  p.seq = host_varlen(c, x);
  p.h_q = c.h_q;
  p.h_kv = c.h_kv;
  p.d = c.d;
  p.scale = c.scale;
  p.dtype = DType::f64;
  p.q = x.q.data();
  p.k = x.k.data();
  r.o.assign(x.q.size(), std::nan(""));
  r.lse.assign(size_t(c.n_q() * c.h_q), std::nanf(""));
  std::vector<float> lse2(r.lse.size());
  p.v = x.v.data();
  p.o = r.o.data();
  p.lse = r.lse.data();
  dense_attention_forward(p, Exec{});
  std::vector<double> absv(x.v.size());
  for (size_t e = 0; e < absv.size(); ++e) absv[e] = std::abs(x.v[e]);
  r.o_absv.assign(x.q.size(), std::nan(""));
  p.v = absv.data();
  p.o = r.o_absv.data();
  p.lse = lse2.data();
  dense_attention_forward(p, Exec{});
  return r;
}

struct Gpu {
  std::vector<double> o;   // [n_q, h_q, d] logical
  std::vector<float> lse;  // [n_q, h_q]
  std::vector<bf16> o_raw; // whole o storage, padding included
};

// Runs the CUDA backend reps times through the public API (outputs poisoned before each run) and
// once more through each explicit schedule (the default, automatic, picks one of them by d);
// returns the first result. Every later run, and every schedule, must match it bitwise.
Gpu run_gpu(const Case& c, const Data& x, int reps, ::testing::AssertionResult* same) {
  std::mt19937_64 rng(c.seed ^ 0x9e3779b97f4a7c15ull);
  Strided hq(x.q, c.n_q(), c.h_q, c.d, c.q_tok, c.q_head, c.q_off, rng);
  Strided hk(x.k, c.n_k(), c.h_kv, c.d, c.k_tok, c.k_head, c.k_off, rng);
  Strided hv(x.v, c.n_k(), c.h_kv, c.d, c.v_tok, c.v_head, c.v_off, rng);
  const int64_t o_head = c.o_head ? c.o_head : c.d, o_tok = c.o_tok ? c.o_tok : c.h_q * o_head;
  const size_t o_size = size_t(c.o_off + std::max<int64_t>(c.n_q(), 1) * o_tok);
  DevBuf<bf16> q(hq.data), k(hk.data), v(hv.data), o(o_size);
  DevBuf<float> lse(size_t(c.n_q() * c.h_q));
  DevBuf<int32_t> cu_q(x.cu_q), cu_k(x.cu_k), q_pos(c.q_pos);

  AttentionParams p;
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
  p.q = q.ptr + c.q_off;
  p.stride_q_tok = c.q_tok;
  p.stride_q_head = c.q_head;
  p.k = k.ptr + c.k_off;
  p.stride_k_tok = c.k_tok;
  p.stride_k_head = c.k_head;
  p.v = v.ptr + c.v_off;
  p.stride_v_tok = c.v_tok;
  p.stride_v_head = c.v_head;
  p.o = o.ptr + c.o_off;
  p.stride_o_tok = c.o_tok;
  p.stride_o_head = c.o_head;
  p.lse = lse.ptr;
  Exec ex;
  ex.backend = Backend::cuda;

  Gpu first;
  *same = ::testing::AssertionSuccess();
  auto check_same = [&](const std::vector<bf16>& o_raw, const std::vector<float>& l, const char* what) {
    if (!bitwise_equal(o_raw, first.o_raw) || !bitwise_equal(l, first.lse))
      *same = ::testing::AssertionFailure() << what << " differs bitwise from the first run";
  };
  for (int rep = 0; rep < reps; ++rep) {
    o.poison(kPoisonByte);
    lse.poison(kPoisonByte);
    dense_attention_forward(p, ex);
    cuda_check(cudaDeviceSynchronize(), "dense_attention_forward kernel");
    if (rep == 0) {
      first.o_raw = o.get();
      first.lse = lse.get();
    } else {
      check_same(o.get(), lse.get(), "a repeated run");
    }
  }
  // Every schedule, through the internal entry (params resolved as the API would).
  AttentionParams r = p;
  if (r.scale == 0.f) r.scale = float(1.0 / std::sqrt(double(c.d)));
  r.stride_q_head = hq.head;
  r.stride_q_tok = hq.tok;
  r.stride_k_head = hk.head;
  r.stride_k_tok = hk.tok;
  r.stride_v_head = hv.head;
  r.stride_v_tok = hv.tok;
  r.stride_o_head = o_head;
  r.stride_o_tok = o_tok;
  const std::pair<cuda::DenseSchedule, const char*> schedules[] = {
      {cuda::DenseSchedule::overlap, "the overlap schedule"},
      {cuda::DenseSchedule::pingpong, "the pingpong schedule"},
      {cuda::DenseSchedule::persistent, "the persistent schedule"},
      {cuda::DenseSchedule::persistent_pingpong, "the persistent pingpong schedule"}};
  for (const auto& [other, what] : schedules) {
    if (other == cuda::kDenseDefaultSchedule) continue;
    o.poison(kPoisonByte);
    lse.poison(kPoisonByte);
    if (c.n_q() > 0) cuda::run_dense_fwd(r, nullptr, other);
    cuda_check(cudaDeviceSynchronize(), what);
    check_same(o.get(), lse.get(), what);
  }

  first.o.resize(size_t(c.n_q() * c.h_q * c.d));
  for (int64_t i = 0; i < c.n_q(); ++i)
    for (int64_t h = 0; h < c.h_q; ++h)
      for (int64_t e = 0; e < c.d; ++e)
        first.o[(i * c.h_q + h) * c.d + e] = bf16_to_float(first.o_raw[c.o_off + i * o_tok + h * o_head + e]);
  return first;
}

// Elementwise o check with the derived per-element tolerance, reporting the worst element's
// coordinates; a global normalised error bound besides.
::testing::AssertionResult check_o(const Case& c, const std::vector<double>& got, const Ref& ref) {
  const double kStore = std::ldexp(1.0, -8), kP = std::ldexp(1.0, -8) + std::ldexp(1.0, -11);
  double worst = -1;
  size_t wi = 0;
  for (size_t e = 0; e < got.size(); ++e) {
    if (!std::isfinite(got[e]) || !std::isfinite(ref.o[e]))
      return ::testing::AssertionFailure() << "non-finite o at token " << e / (c.h_q * c.d) << " head "
                                           << (e / c.d) % c.h_q << " col " << e % c.d << ": got " << got[e]
                                           << ", expected " << ref.o[e];
    const double tol = kStore * std::abs(ref.o[e]) + kP * ref.o_absv[e] + 1e-6;
    const double excess = std::abs(got[e] - ref.o[e]) - tol;
    if (excess > worst) {
      worst = excess;
      wi = e;
    }
  }
  if (worst > 0)
    return ::testing::AssertionFailure() << "o: worst element token " << wi / (c.h_q * c.d) << " head "
                                         << (wi / c.d) % c.h_q << " col " << wi % c.d << ": got " << got[wi]
                                         << ", expected " << ref.o[wi] << " (|v|-weighted scale " << ref.o_absv[wi]
                                         << ", excess " << worst << ")";
  const double err = rel_l2(got, ref.o);
  if (err > std::ldexp(1.0, -8)) return ::testing::AssertionFailure() << "o: relative L2 error " << err;
  return ::testing::AssertionSuccess();
}

void run_case(const Case& c, int reps = 1) {
  SCOPED_TRACE(c.name());
  const Data x = make_data(c);
  const Ref ref = run_cpu(c, x);
  ::testing::AssertionResult same = ::testing::AssertionSuccess();
  const Gpu got = run_gpu(c, x, reps, &same);
  EXPECT_TRUE(same);
  EXPECT_TRUE(check_o(c, got.o, ref));
  std::vector<double> lg(got.lse.begin(), got.lse.end()), lr(ref.lse.begin(), ref.lse.end());
  EXPECT_TRUE(allclose(lg, lr, 1e-4, 0.0, "lse"));
  // Padding of a strided o keeps its poison: the kernel writes nothing outside the tensor.
  const int64_t o_head = c.o_head ? c.o_head : c.d, o_tok = c.o_tok ? c.o_tok : c.h_q * o_head;
  std::vector<char> inside(got.o_raw.size(), 0);
  for (int64_t i = 0; i < c.n_q(); ++i)
    for (int64_t h = 0; h < c.h_q; ++h)
      for (int64_t e = 0; e < c.d; ++e) inside[c.o_off + i * o_tok + h * o_head + e] = 1;
  size_t bad = 0;
  for (size_t e = 0; e < inside.size(); ++e)
    if (!inside[e] && got.o_raw[e].bits != 0xffff) ++bad;
  EXPECT_EQ(bad, 0u) << "elements outside o were written";
}

TEST(CudaDenseFwd, SingleSequenceLengths) {
  REQUIRE_GPU();
  uint64_t seed = 100;
  for (int32_t n : {1, 127, 128, 129, 1023}) {
    run_case(make_self(++seed, {n}, 8, 2, 128));
    Case c = make_self(++seed, {n}, 3, 3, 64);
    c.pass_cu_q = c.pass_cu_k = false;  // the no-cu_seqlens path
    run_case(c);
  }
}

TEST(CudaDenseFwd, GroupSizesAndHeadDims) {
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

TEST(CudaDenseFwd, Long4097FewHeads) {
  REQUIRE_GPU();
  run_case(make_self(301, {4097}, 2, 1, 128));
  run_case(make_self(302, {4097}, 4, 1, 64));
}

TEST(CudaDenseFwd, VarlenTinyEmptyAndLong) {
  REQUIRE_GPU();
  run_case(make_self(401, {1, 700, 3, 128, 0, 257, 1, 129}, 8, 1, 128));
  run_case(make_self(402, {5, 0, 0, 1030, 2, 64}, 2, 2, 64));
  run_case(make_self(403, {9, 300, 1, 16, 17}, 16, 1, 64));
}

TEST(CudaDenseFwd, ChunkedQueriesBottomRight) {
  REQUIRE_GPU();
  run_case(make(501, {64, 1, 200, 0, 5}, {1000, 37, 200, 10, 130}, 16, 1, 128));
  run_case(make(502, {64, 1, 200, 0, 5}, {1000, 37, 200, 10, 130}, 4, 2, 64));
  // One chunk without cu_seqlens_q: queries are the last 100 of 777 keys.
  Case c = make(503, {100}, {777}, 8, 2, 128);
  c.pass_cu_q = false;
  run_case(c);
}

TEST(CudaDenseFwd, ExplicitPositions) {
  REQUIRE_GPU();
  for (auto [seed, h_q, d] : {std::tuple<uint64_t, int64_t, int64_t>{601, 4, 128}, {602, 16, 64}}) {
    Case c = make(seed, {40, 7, 1}, {900, 300, 50}, h_q, 1, d);
    std::mt19937_64 rng(seed);
    for (size_t b = 0; b < c.lens_q.size(); ++b)
      for (int32_t t = 0; t < c.lens_q[b]; ++t) {
        // Unordered, with repeats and both ends of the range.
        int32_t p = int32_t(rng() % uint64_t(c.lens_k[b]));
        if (t == 0) p = c.lens_k[b] - 1;
        if (t == 1) p = 0;
        c.q_pos.push_back(p);
      }
    run_case(c);
  }
}

TEST(CudaDenseFwd, DecodeBatch) {
  REQUIRE_GPU();
  run_case(make(701, {1, 1, 1, 1, 1, 1}, {1, 128, 129, 1000, 77, 3000}, 16, 1, 128));
  run_case(make(702, {1, 1, 1}, {2, 255, 513}, 8, 4, 64));
}

TEST(CudaDenseFwd, StridedAndMisalignedLayouts) {
  REQUIRE_GPU();
  {
    // q, k, v as views into one packed qkv projection [n, h_q + 2 h_kv, d]; o with padded rows.
    Case c = make_self(801, {70, 300}, 8, 2, 128);
    const int64_t row = (c.h_q + 2 * c.h_kv) * c.d;
    c.q_tok = c.k_tok = c.v_tok = row;
    c.q_off = 0;
    c.k_off = c.h_q * c.d;
    c.v_off = (c.h_q + c.h_kv) * c.d;
    c.o_tok = c.h_q * c.d + 64;
    c.o_head = c.d + 8;
    run_case(c);
  }
  {
    // Odd offsets and strides: scalar q loads, repacked K/V for TMA, scalar o stores.
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
    run_case(c);
  }
}

// Small enough for compute-sanitizer (memcheck, racecheck, synccheck) to run in seconds.
TEST(CudaDenseFwd, SanitizerSmall) {
  REQUIRE_GPU();
  run_case(make_self(901, {1, 130, 5}, 4, 1, 128));
  run_case(make(902, {3, 64}, {300, 64}, 2, 2, 64));
}

// Many more query tiles than SMs, so that every persistent CTA takes several tiles: its two Q
// buffers and the K/V ring wrap their phases many times, tiles of 0 to 6 key tiles alternate, and
// with cu_seqlens the surplus tile numbers are skipped.
TEST(CudaDenseFwd, PersistentManyTilesPerCta) {
  REQUIRE_GPU();
  std::mt19937_64 rng(1101);
  std::vector<int32_t> lens;
  for (int b = 0; b < 150; ++b) lens.push_back(b % 17 == 0 ? 0 : int32_t(rng() % 700));
  run_case(make_self(1102, lens, 4, 1, 64));
  Case c = make_self(1103, {1100}, 16, 16, 128);
  c.pass_cu_q = c.pass_cu_k = false;
  run_case(c);
  std::vector<int32_t> ones(300, 1), keys;
  for (int b = 0; b < 300; ++b) keys.push_back(1 + int32_t(rng() % 600));
  run_case(make(1104, ones, keys, 16, 1, 128));  // decode: one tile per sequence
}

// As SanitizerSmall, with 4 times more tiles than a CTA-per-SM grid holds.
TEST(CudaDenseFwd, SanitizerPersistentWraps) {
  REQUIRE_GPU();
  std::mt19937_64 rng(1201);
  std::vector<int32_t> lens;
  for (int b = 0; b < 270; ++b) lens.push_back(1 + int32_t(rng() % 40));
  run_case(make_self(1202, lens, 2, 2, 64));
}

TEST(CudaDenseFwd, TwentyRunsBitwiseIdentical) {
  REQUIRE_GPU();
  run_case(make_self(1001, {1000, 300}, 8, 1, 128), 20);
}

TEST(CudaDenseFwd, NoQueriesIsANoOp) {
  REQUIRE_GPU();
  AttentionParams p;
  p.seq.n_q = 0;
  p.seq.n_k = 0;
  p.h_q = 4;
  p.h_kv = 1;
  p.d = 128;
  Exec ex;
  ex.backend = Backend::cuda;
  EXPECT_NO_THROW(dense_attention_forward(p, ex));
}

#endif

}  // namespace
}  // namespace msa::test
