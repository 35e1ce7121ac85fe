// `msa check`: randomized self-checks of one backend. The cpu backend is compared with the naive
// float64 formulas of naive.h (and with float64 finite differences for gradients); the cuda
// backend is compared with the cpu backend on the same inputs. Every case draws fresh inputs from
// (seed, case number), so a failure line can be reproduced alone with --only.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cli.h"
#include "device.h"
#include "msa/msa.h"
#include "naive.h"

namespace msa::cli {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int32_t kPoisonIdx = -7;  // fills topk_idx outputs so entries the op never wrote show up
using Rng = std::mt19937_64;

// ---------------------------------------------------------------------------------------------
// Random choices.

int64_t uni(Rng& rng, int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }
double unif(Rng& rng, double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }
bool coin(Rng& rng, double p) { return std::bernoulli_distribution(p)(rng); }
template <class T>
T pick(Rng& rng, std::initializer_list<T> xs) {
  return *(xs.begin() + uni(rng, 0, int64_t(xs.size()) - 1));
}

// topk in 1..32, weighted toward the edges where selection code breaks (1, a few, the maximum).
int64_t pick_topk(Rng& rng) {
  switch (uni(rng, 0, 5)) {
    case 0:
      return 1;
    case 1:
      return uni(rng, 2, 4);
    case 2:
      return 32;
    default:
      return uni(rng, 5, 31);
  }
}

uint64_t case_seed(uint64_t seed, int64_t c) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + uint64_t(c) + 0x632BE59BD9B4E019ull;  // splitmix64
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// ---------------------------------------------------------------------------------------------
// Typed storage: a tensor in its API dtype next to the exact values it holds, as double.

struct Tensor {
  DType dtype = DType::f32;
  std::vector<uint8_t> bytes;
  Tensor() = default;
  Tensor(DType t, size_t n) : dtype(t), bytes(n * size_t(dtype_size(t))) {}
  size_t size() const { return bytes.size() / size_t(dtype_size(dtype)); }
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  void set(size_t i, double x) {
    switch (dtype) {
      case DType::f32:
        reinterpret_cast<float*>(bytes.data())[i] = float(x);
        return;
      case DType::bf16:
        reinterpret_cast<bf16*>(bytes.data())[i] = float_to_bf16(float(x));
        return;
      case DType::f64:
        reinterpret_cast<double*>(bytes.data())[i] = x;
        return;
    }
  }
  double get(size_t i) const {
    switch (dtype) {
      case DType::f32:
        return reinterpret_cast<const float*>(bytes.data())[i];
      case DType::bf16:
        return bf16_to_float(reinterpret_cast<const bf16*>(bytes.data())[i]);
      case DType::f64:
        return reinterpret_cast<const double*>(bytes.data())[i];
    }
    return 0;
  }
  Vec values() const {
    Vec v(size());
    for (size_t i = 0; i < v.size(); ++i) v[i] = get(i);
    return v;
  }
};

// An input: its storage and the rounded values the reference must see.
struct Input {
  Tensor t;
  Vec v;
  void set(size_t i, double x) {
    t.set(i, x);
    v[i] = t.get(i);
  }
};

Input randn(Rng& rng, DType dt, size_t n, double sigma = 1.0) {
  std::normal_distribution<double> dist(0.0, sigma);
  Input in{Tensor(dt, n), Vec(n)};
  for (size_t i = 0; i < n; ++i) in.set(i, dist(rng));
  return in;
}

// An output poisoned with NaN so entries the op never wrote cannot pass.
Tensor poisoned(DType dt, size_t n) {
  Tensor t(dt, n);
  for (size_t i = 0; i < n; ++i) t.set(i, std::nan(""));
  return t;
}

Vec to_vec(const std::vector<float>& x) { return Vec(x.begin(), x.end()); }

// ---------------------------------------------------------------------------------------------
// Failure reports.

// Names the coordinates of a flat index, e.g. "row 3 (pos 130), head 1, col 5".
struct Dims {
  std::vector<std::pair<const char*, int64_t>> dims;
  const Seq* seq = nullptr;  // when set, the first dim is a query row and its position is shown
  std::string at(size_t flat) const {
    std::vector<int64_t> idx(dims.size());
    for (size_t k = dims.size(); k-- > 0;) {
      idx[k] = int64_t(flat % size_t(dims[k].second));
      flat /= size_t(dims[k].second);
    }
    std::string s;
    for (size_t k = 0; k < dims.size(); ++k) {
      s += strf("%s%s %lld", k ? ", " : "", dims[k].first, (long long)idx[k]);
      if (k == 0 && seq) s += strf(" (pos %d)", seq->pos[idx[0]]);
    }
    return s;
  }
};

struct Report {
  std::vector<std::string> problems;
  void fail(const std::string& s) { problems.push_back(s); }
};

// Element tolerance rtol * |ref| + atol * scale(i). Non-finite values must match exactly.
template <class Scale>
void expect_close(Report& rep, const char* what, const Vec& got, const Vec& ref, double rtol, double atol, Scale scale,
                  const Dims& dims) {
  if (got.size() != ref.size()) {
    rep.fail(strf("%s: %zu values, expected %zu", what, got.size(), ref.size()));
    return;
  }
  double worst = 0, worst_tol = 0;
  size_t wi = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    double g = got[i], r = ref[i];
    if (!std::isfinite(g) || !std::isfinite(r)) {
      if ((std::isnan(g) && std::isnan(r)) || g == r) continue;
      rep.fail(strf("%s at %s: got %.9g, expected %.9g", what, dims.at(i).c_str(), g, r));
      return;
    }
    double tol = rtol * std::abs(r) + atol * scale(i);
    double excess = std::abs(g - r) - tol;
    if (excess > 0 && std::abs(g - r) / std::max(tol, 1e-300) > worst / std::max(worst_tol, 1e-300)) {
      worst = std::abs(g - r);
      worst_tol = tol;
      wi = i;
    }
  }
  if (worst > 0)
    rep.fail(strf("%s worst at %s: got %.9g, expected %.9g (|diff| %.3g > tol %.3g)", what, dims.at(wi).c_str(),
                  got[wi], ref[wi], worst, worst_tol));
}

void expect_close(Report& rep, const char* what, const Vec& got, const Vec& ref, double rtol, double atol, double scale,
                  const Dims& dims) {
  expect_close(
      rep, what, got, ref, rtol, atol, [scale](size_t) { return scale; }, dims);
}

double max_abs(const Vec& v) {
  double m = 0;
  for (double x : v)
    if (std::isfinite(x)) m = std::max(m, std::abs(x));
  return m;
}

// Largest |x| of each last-dim row, the scale "a few ulps of the row" refers to.
Vec row_scales(const Vec& v, int64_t row_len) {
  Vec s(v.size() / size_t(row_len), 0.0);
  for (size_t i = 0; i < v.size(); ++i)
    if (std::isfinite(v[i])) s[i / row_len] = std::max(s[i / row_len], std::abs(v[i]));
  return s;
}

std::string list_str(const std::vector<int32_t>& xs) {
  std::string s = "{";
  for (size_t i = 0; i < xs.size(); ++i) s += strf("%s%d", i ? " " : "", xs[i]);
  return s + "}";
}

// ---------------------------------------------------------------------------------------------
// Shapes.

// Lengths at and around block boundaries, the degenerate 1, and random ones up to max_len.
int64_t pick_len(Rng& rng, int64_t max_len, int64_t bk) {
  std::vector<int64_t> special = {1, bk - 1, bk, bk + 1, 2 * bk + 1, 127, 128, 129, 1023, 4097};
  special.erase(std::remove_if(special.begin(), special.end(), [&](int64_t x) { return x < 1 || x > max_len; }),
                special.end());
  if (!special.empty() && coin(rng, 0.45)) return special[uni(rng, 0, int64_t(special.size()) - 1)];
  return uni(rng, std::min<int64_t>(2, max_len), max_len);
}

// A varlen layout: one sequence, a batch (empty sequences included), chunks with explicit
// positions, bottom-right aligned chunks, decode, or scattered positions. Full sequences are at
// most max_len long; the layouts with few queries per sequence reach long_len.
Seq gen_seq(Rng& rng, int64_t max_len, int64_t bk, int64_t long_len) {
  Seq s;
  auto lens_str = [](const std::vector<int64_t>& xs) {
    std::string t;
    for (size_t i = 0; i < xs.size(); ++i) t += strf("%s%lld", i ? "," : "", (long long)xs[i]);
    return t;
  };
  std::vector<int64_t> lq, lk;
  switch (uni(rng, 0, 5)) {
    case 0: {  // one full sequence
      int64_t L = pick_len(rng, max_len, bk);
      lq = lk = {L};
      s.desc = strf("len %lld", (long long)L);
      break;
    }
    case 1: {  // a batch of full sequences
      int64_t b = uni(rng, 2, 4);
      for (int64_t x = 0; x < b; ++x)
        lq.push_back(coin(rng, 0.12) ? 0 : pick_len(rng, std::max<int64_t>(1, max_len / 2), bk));
      lk = lq;
      s.desc = "varlen [" + lens_str(lq) + "]";
      break;
    }
    case 2: {  // chunks with explicit q_pos
      int64_t b = uni(rng, 1, 2);
      std::string d;
      for (int64_t x = 0; x < b; ++x) {
        int64_t L = pick_len(rng, long_len, bk), st = uni(rng, 0, L - 1),
                c = uni(rng, 1, std::min<int64_t>(48, L - st));
        lk.push_back(L);
        lq.push_back(c);
        for (int64_t t = 0; t < c; ++t) s.q_pos.push_back(int32_t(st + t));
        d += strf("%s%lld..%lld of %lld", x ? ", " : "", (long long)st, (long long)(st + c - 1), (long long)L);
      }
      s.desc = "chunks [" + d + "] (q_pos)";
      break;
    }
    case 3: {  // chunks aligned to the end of their sequence (chunked prefill, no q_pos)
      int64_t b = uni(rng, 1, 3);
      for (int64_t x = 0; x < b; ++x) {
        int64_t L = pick_len(rng, long_len, bk);
        lk.push_back(L);
        lq.push_back(uni(rng, 1, std::min<int64_t>(L, 64)));
      }
      s.desc = "last [" + lens_str(lq) + "] of [" + lens_str(lk) + "]";
      break;
    }
    case 4: {  // decode: one query per sequence
      int64_t b = uni(rng, 1, 4);
      for (int64_t x = 0; x < b; ++x) {
        lk.push_back(pick_len(rng, long_len, bk));
        lq.push_back(1);
      }
      s.desc = "decode [" + lens_str(lk) + "]";
      break;
    }
    default: {  // scattered positions, repeats allowed
      int64_t L = pick_len(rng, long_len, bk), c = uni(rng, 1, 24);
      lk = {L};
      lq = {c};
      for (int64_t t = 0; t < c; ++t) s.q_pos.push_back(int32_t(uni(rng, 0, L - 1)));
      s.desc = strf("%lld scattered queries of len %lld (q_pos)", (long long)c, (long long)L);
      break;
    }
  }
  s.batch = int64_t(lq.size());
  s.cu_q.assign(1, 0);
  s.cu_k.assign(1, 0);
  for (int64_t b = 0; b < s.batch; ++b) {
    s.cu_q.push_back(int32_t(s.cu_q.back() + lq[b]));
    s.cu_k.push_back(int32_t(s.cu_k.back() + lk[b]));
  }
  s.n_q = s.cu_q.back();
  s.n_k = s.cu_k.back();
  // The API's defaults for absent arrays, exercised whenever they describe the same layout.
  s.pass_cu_q = s.batch > 1 || coin(rng, 0.5);
  s.pass_cu_k = !(s.cu_k == s.cu_q && coin(rng, 0.5));
  s.finish();
  return s;
}

struct Heads {
  int64_t h_q = 1, h_kv = 1, d = 64;
};

// Heads and head dim whose naive cost (visible pairs * h_q * d) fits the budget, so large g and
// long sequences both appear without any one case getting slow.
Heads pick_heads(Rng& rng, const Seq& s, double budget, int64_t max_h_kv, std::initializer_list<int64_t> ds) {
  double w = double(std::max<int64_t>(1, s.visible_pairs()));
  std::vector<Heads> fits;
  for (int64_t g : {1, 2, 4, 8, 16})
    for (int64_t h_kv = 1; h_kv <= max_h_kv; ++h_kv)
      for (int64_t d : ds)
        if (w * double(g * h_kv * d) <= budget) fits.push_back({g * h_kv, h_kv, d});
  if (fits.empty()) return {1, 1, *ds.begin()};
  // Uniform over g first, so the many small-head combinations do not crowd out g = 16.
  std::vector<int64_t> gs;
  for (const Heads& h : fits)
    if (std::find(gs.begin(), gs.end(), h.h_q / h.h_kv) == gs.end()) gs.push_back(h.h_q / h.h_kv);
  int64_t g = gs[uni(rng, 0, int64_t(gs.size()) - 1)];
  std::vector<Heads> of_g;
  for (const Heads& h : fits)
    if (h.h_q / h.h_kv == g) of_g.push_back(h);
  return of_g[uni(rng, 0, int64_t(of_g.size()) - 1)];
}

// A valid selection in arbitrary order: the own block plus random other visible blocks.
std::vector<int32_t> random_selection(Rng& rng, const Seq& s, int64_t h_kv, int64_t topk, int64_t bk) {
  std::vector<int32_t> sel(s.n_q * h_kv * topk, -1);
  for (int64_t i = 0; i < s.n_q; ++i)
    for (int64_t r = 0; r < h_kv; ++r) {
      int64_t own = s.own_block(i, bk);
      std::vector<int32_t> others(own);
      std::iota(others.begin(), others.end(), 0);
      std::shuffle(others.begin(), others.end(), rng);
      int64_t m = uni(rng, 0, std::min<int64_t>(topk - 1, own));
      std::vector<int32_t> row(others.begin(), others.begin() + m);
      row.push_back(int32_t(own));
      std::shuffle(row.begin(), row.end(), rng);
      std::copy(row.begin(), row.end(), sel.begin() + (i * h_kv + r) * topk);
    }
  return sel;
}

// ---------------------------------------------------------------------------------------------
// The case context and the calls on the backend under test (target) or on the cpu reference.

struct Ctx {
  Rng rng;
  bool cuda = false;
  Report rep;
  std::string desc;

  Exec exec(bool target) const {
    Exec ex;
    ex.backend = (target && cuda) ? Backend::cuda : Backend::cpu;
    return ex;
  }
  DType pick_dtype() {
    if (cuda) return DType::bf16;
    return pick(rng, {DType::f32, DType::f32, DType::bf16, DType::f64});
  }
  // Small blocks on the cpu give many blocks with few tokens; the cuda backend supports 64 and 128.
  int64_t pick_bk() { return cuda ? pick<int64_t>(rng, {64, 128}) : pick<int64_t>(rng, {16, 16, 64, 128}); }
  void describe(const std::string& s) { desc += (desc.empty() ? "" : " ") + s; }
};

// Output-rounding tolerance of a tensor in dtype dt: rtol on the element, atol on its row scale.
struct Tol {
  double rtol, atol;
};
Tol out_tol(const Ctx& c, DType dt) {
  if (c.cuda) return {1.0 / 128, 1.0 / 64};  // bf16 kernel: bf16 P in the PV product and bf16 output
  switch (dt) {
    case DType::f64:
      return {1e-10, 1e-12};
    case DType::f32:
      return {1e-5, 1e-6};
    case DType::bf16:
      return {1.0 / 256, 1.0 / 4096};  // one bf16 ulp of the element
  }
  return {0, 0};
}
// lse is float32 whatever the inputs.
Tol lse_tol(const Ctx& c) { return c.cuda ? Tol{2e-3, 2e-3} : Tol{2e-6, 2e-6}; }

void op_index_topk(Ctx& c, bool target, IndexTopkParams p) {
  if (!(target && c.cuda)) return index_topk(p, c.exec(false));
  DeviceArena a;
  size_t es = size_t(dtype_size(p.dtype)), n_q = size_t(p.seq.n_q), n_k = size_t(p.seq.n_k), h = size_t(p.h_kv);
  p.seq = a.varlen(p.seq);
  p.q_idx = a.in(p.q_idx, n_q * h * p.d_idx * es);
  p.k_idx = a.in(p.k_idx, n_k * p.d_idx * es);
  p.topk_idx = static_cast<int32_t*>(a.out(p.topk_idx, n_q * h * p.topk * 4));
  p.block_scores = static_cast<float*>(a.out(p.block_scores, n_q * h * p.n_blocks * 4));
  p.index_lse = static_cast<float*>(a.out(p.index_lse, n_q * h * 4));
  index_topk(p, c.exec(true));
  a.fetch();
}

void op_block_topk(Ctx& c, bool target, BlockTopkParams p) {
  if (!(target && c.cuda)) return block_topk(p, c.exec(false));
  DeviceArena a;
  int64_t stride = p.stride_row ? p.stride_row : p.n_blocks;
  size_t span = p.rows && p.n_blocks ? size_t((p.rows - 1) * stride + p.n_blocks) : 0;
  p.scores = static_cast<const float*>(a.in(p.scores, span * 4));
  p.row_blocks = static_cast<const int32_t*>(a.in(p.row_blocks, size_t(p.rows) * 4));
  p.topk_idx = static_cast<int32_t*>(a.out(p.topk_idx, size_t(p.rows * p.topk) * 4));
  block_topk(p, c.exec(true));
  a.fetch();
}

// Uploads the fields shared by the forward and the backward.
void upload_attention(DeviceArena& a, AttentionParams& p, bool backward) {
  size_t es = size_t(dtype_size(p.dtype)), n_q = size_t(p.seq.n_q), n_k = size_t(p.seq.n_k);
  size_t q_elems = n_q * p.h_q * p.d, k_elems = n_k * p.h_kv * p.d;
  p.seq = a.varlen(p.seq);
  p.q = a.in(p.q, q_elems * es);
  p.k = a.in(p.k, k_elems * es);
  p.v = a.in(p.v, k_elems * es);
  p.topk_idx = static_cast<const int32_t*>(a.in(p.topk_idx, n_q * p.h_kv * p.topk * 4));
  if (backward) {
    p.o = const_cast<void*>(a.in(p.o, q_elems * es));
    p.lse = static_cast<float*>(const_cast<void*>(a.in(p.lse, n_q * p.h_q * 4)));
  } else {
    p.o = a.out(p.o, q_elems * es);
    p.lse = static_cast<float*>(a.out(p.lse, n_q * p.h_q * 4));
  }
}

void op_attention_forward(Ctx& c, bool target, AttentionParams p) {
  bool sparse = p.topk_idx != nullptr;
  if (!(target && c.cuda))
    return sparse ? sparse_attention_forward(p, c.exec(false)) : dense_attention_forward(p, c.exec(false));
  DeviceArena a;
  upload_attention(a, p, false);
  sparse ? sparse_attention_forward(p, c.exec(true)) : dense_attention_forward(p, c.exec(true));
  a.fetch();
}

void op_attention_backward(Ctx& c, bool target, AttentionBwdParams p) {
  bool sparse = p.topk_idx != nullptr;
  if (!(target && c.cuda))
    return sparse ? sparse_attention_backward(p, c.exec(false)) : dense_attention_backward(p, c.exec(false));
  DeviceArena a;
  size_t es = size_t(dtype_size(p.dtype)), q_elems = size_t(p.seq.n_q * p.h_q * p.d),
         k_elems = size_t(p.seq.n_k * p.h_kv * p.d);
  upload_attention(a, p, true);
  p.do_ = a.in(p.do_, q_elems * es);
  p.dq = a.out(p.dq, q_elems * es);
  p.dk = a.out(p.dk, k_elems * es);
  p.dv = a.out(p.dv, k_elems * es);
  sparse ? sparse_attention_backward(p, c.exec(true)) : dense_attention_backward(p, c.exec(true));
  a.fetch();
}

double op_kl(Ctx& c, bool target, IndexKLParams p, bool backward) {
  if (!(target && c.cuda)) {
    if (!backward) return index_kl_loss(p, c.exec(false));
    index_kl_backward(p, c.exec(false));
    return 0;
  }
  DeviceArena a;
  size_t es = size_t(dtype_size(p.dtype)), n_q = size_t(p.seq.n_q), n_k = size_t(p.seq.n_k);
  p.seq = a.varlen(p.seq);
  p.q = a.in(p.q, n_q * p.h_q * p.d * es);
  p.k = a.in(p.k, n_k * p.h_kv * p.d * es);
  p.q_idx = a.in(p.q_idx, n_q * p.h_kv * p.d_idx * es);
  p.k_idx = a.in(p.k_idx, n_k * p.d_idx * es);
  p.topk_idx = static_cast<const int32_t*>(a.in(p.topk_idx, n_q * p.h_kv * p.topk * 4));
  p.lse = static_cast<const float*>(a.in(p.lse, n_q * p.h_q * 4));
  p.index_lse = static_cast<const float*>(a.in(p.index_lse, n_q * p.h_kv * 4));
  double loss = 0;
  if (backward) {
    p.dq_idx = a.out(p.dq_idx, n_q * p.h_kv * p.d_idx * es);
    p.dk_idx = a.out(p.dk_idx, n_k * p.d_idx * es);
    index_kl_backward(p, c.exec(true));
  } else {
    loss = index_kl_loss(p, c.exec(true));
  }
  a.fetch();
  return loss;
}

SelectionRecall op_recall(Ctx& c, bool target, SelectionRecallParams p) {
  if (!(target && c.cuda)) return selection_recall(p, c.exec(false));
  DeviceArena a;
  size_t es = size_t(dtype_size(p.dtype)), n_q = size_t(p.seq.n_q), n_k = size_t(p.seq.n_k);
  p.seq = a.varlen(p.seq);
  p.q = a.in(p.q, n_q * p.h_q * p.d * es);
  p.k = a.in(p.k, n_k * p.h_kv * p.d * es);
  p.topk_idx = static_cast<const int32_t*>(a.in(p.topk_idx, n_q * p.h_kv * p.topk * 4));
  p.block_recall_rows = static_cast<float*>(a.out(p.block_recall_rows, n_q * p.h_kv * 4));
  p.score_recall_rows = static_cast<float*>(a.out(p.score_recall_rows, n_q * p.h_kv * 4));
  SelectionRecall r = selection_recall(p, c.exec(true));
  a.fetch();
  return r;
}

// ---------------------------------------------------------------------------------------------
// Selection checks shared by index_topk and block_topk.

// A row of a selection output: ascending valid entries in [0, n_vis), exactly min(topk, n_vis)
// of them, then -1; the forced last column present. Returns the valid entries or a problem.
std::string row_structure(const int32_t* row, int64_t topk, int64_t n_vis, bool force_last,
                          std::vector<int32_t>& valid) {
  valid.clear();
  int64_t t = 0;
  for (; t < topk && row[t] != -1; ++t) {
    if (row[t] < 0 || row[t] >= n_vis)
      return strf("entry %lld = %d is not a visible block (0..%lld)", (long long)t, row[t], (long long)(n_vis - 1));
    if (!valid.empty() && row[t] <= valid.back())
      return strf("entries not strictly ascending: %s", list_str(std::vector<int32_t>(row, row + topk)).c_str());
    valid.push_back(row[t]);
  }
  for (; t < topk; ++t)
    if (row[t] != -1) return strf("entry %lld = %d after the -1 padding began", (long long)t, row[t]);
  if (int64_t(valid.size()) != std::min(topk, n_vis))
    return strf("%zu blocks selected, expected min(topk, visible blocks) = %lld: %s", valid.size(),
                (long long)std::min(topk, n_vis), list_str(valid).c_str());
  if (force_last && n_vis > 0 && valid.back() != n_vis - 1)
    return strf("own block %lld missing from %s", (long long)(n_vis - 1), list_str(valid).c_str());
  return "";
}

// got and want are both valid selections of scores m; they may differ only among blocks whose
// scores are equal within tol (rounding of the scores decides near-ties).
std::string judge_selection(const std::vector<int32_t>& got, const std::vector<int32_t>& want, const Vec& m,
                            double tol) {
  if (got == want) return "";
  std::vector<int32_t> extra, missing;
  std::set_difference(got.begin(), got.end(), want.begin(), want.end(), std::back_inserter(extra));
  std::set_difference(want.begin(), want.end(), got.begin(), got.end(), std::back_inserter(missing));
  auto desc_scores = [&](const std::vector<int32_t>& bs) {
    Vec v;
    for (int32_t b : bs) v.push_back(m[b]);
    std::sort(v.begin(), v.end(), [](double a, double b) { return std::isnan(b) ? !std::isnan(a) : a > b; });
    return v;
  };
  Vec ge = desc_scores(extra), gm = desc_scores(missing);
  for (size_t t = 0; t < ge.size(); ++t) {
    bool same = (std::isnan(ge[t]) && std::isnan(gm[t])) || std::abs(ge[t] - gm[t]) <= tol;
    if (!same)
      return strf("selected %s, expected %s: block %d (score %.9g) taken instead of block %d (score %.9g)",
                  list_str(got).c_str(), list_str(want).c_str(), extra[0], m[extra[0]], missing[0], m[missing[0]]);
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// The cases.

void case_index_topk(Ctx& c) {
  Rng& rng = c.rng;
  DType dt = c.pick_dtype();
  int64_t bk = c.pick_bk(), topk = pick_topk(rng), d_idx = pick<int64_t>(rng, {64, 128}), h_kv = uni(rng, 1, 4);
  Seq s = gen_seq(rng, 1100, bk, 4097);
  // Half the cases keep fewer blocks than most queries see, so the top-k cut decides something.
  if (coin(rng, 0.5)) topk = std::min<int64_t>(kMaxTopk, uni(rng, 1, std::max<int64_t>(1, s.max_blocks(bk) / 2)));
  while (h_kv > 1 && double(s.visible_pairs() * h_kv * d_idx) > 2e7) --h_kv;
  float index_scale = coin(rng, 0.7) ? 0.f : float(unif(rng, 0.05, 0.3));
  // The API takes scales as float: the reference uses the same rounded value.
  double scale = index_scale ? index_scale : double(float(1.0 / std::sqrt(double(d_idx))));
  bool want_scores = coin(rng, 0.7), want_lse = coin(rng, 0.7);
  Input qi = randn(rng, dt, s.n_q * h_kv * d_idx), ki = randn(rng, dt, s.n_k * d_idx);
  // Exact ties on purpose: later full blocks repeat an earlier one key for key, so they score
  // the same bits for every query that sees them whole and the lower ones must win. Copies to
  // about a third of the blocks make the top-k cut fall inside such a tie often.
  struct Dup {
    int64_t b, lo, hi;
  };
  // With a direction u added to every index query and to the repeated block, the copies
  // outscore the random blocks and compete for the same slots, so ties decide the cut.
  std::vector<Dup> dups;
  Vec u = randn(rng, DType::f64, d_idx).v;
  bool boosted = false;
  int64_t max_group = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    int64_t full = s.len_k(b) / bk;
    if (full < 2 || !coin(rng, 0.7)) continue;
    int64_t lo = uni(rng, 0, full - 2);
    std::vector<int64_t> copies = {uni(rng, lo + 1, full - 1)};
    if (coin(rng, 0.5)) {
      for (int64_t hi = lo + 1; hi < full; ++hi)
        if (hi != copies[0] && coin(rng, 0.33)) copies.push_back(hi);
      for (int64_t t = 0; t < bk; ++t)
        for (int64_t x = 0; x < d_idx; ++x) {
          size_t e = size_t((s.cu_k[b] + lo * bk + t) * d_idx + x);
          ki.set(e, ki.v[e] + u[x]);
        }
      boosted = true;
      max_group = std::max<int64_t>(max_group, int64_t(copies.size()) + 1);
    }
    for (int64_t hi : copies) {
      for (int64_t t = 0; t < bk; ++t)
        for (int64_t x = 0; x < d_idx; ++x)
          ki.set((s.cu_k[b] + hi * bk + t) * d_idx + x, ki.v[(s.cu_k[b] + lo * bk + t) * d_idx + x]);
      dups.push_back({b, lo, hi});
    }
    for (size_t x = 0; x < copies.size(); ++x)  // copies tie with each other as well
      for (size_t y = 0; y < copies.size(); ++y)
        if (copies[x] < copies[y]) dups.push_back({b, copies[x], copies[y]});
  }
  if (boosted) {
    for (size_t e = 0; e < qi.v.size(); ++e) qi.set(e, qi.v[e] + u[e % size_t(d_idx)]);
    topk = uni(rng, 2, std::clamp<int64_t>(max_group, 2, kMaxTopk));  // fewer free slots than tied blocks
  }
  int64_t n_blocks = index_block_count(s.varlen(), bk);
  if (n_blocks != s.max_blocks(bk))
    c.rep.fail(strf("index_block_count = %lld, expected %lld", (long long)n_blocks, (long long)s.max_blocks(bk)));
  n_blocks += uni(rng, 0, 2);  // extra columns must come back -inf
  c.describe(strf("n_q=%lld n_k=%lld [%s] h_kv=%lld d_idx=%lld bk=%lld topk=%lld %s%s%s%s", (long long)s.n_q,
                  (long long)s.n_k, s.desc.c_str(), (long long)h_kv, (long long)d_idx, (long long)bk, (long long)topk,
                  dtype_name(dt), index_scale ? strf(" index_scale=%g", index_scale).c_str() : "",
                  dups.empty() ? ""
                  : boosted    ? " tied-top-blocks"
                               : " tied-blocks",
                  want_scores ? "" : " no-block-scores"));

  auto run = [&](bool target, std::vector<int32_t>& sel, std::vector<float>& bs, std::vector<float>& lse) {
    sel.assign(s.n_q * h_kv * topk, kPoisonIdx);
    bs.assign(want_scores ? s.n_q * h_kv * n_blocks : 0, std::nanf(""));
    lse.assign(want_lse ? s.n_q * h_kv : 0, std::nanf(""));
    IndexTopkParams p;
    p.seq = s.varlen();
    p.h_kv = h_kv;
    p.d_idx = d_idx;
    p.bk = bk;
    p.topk = topk;
    p.index_scale = index_scale;
    p.dtype = dt;
    p.q_idx = qi.t.data();
    p.k_idx = ki.t.data();
    p.topk_idx = sel.data();
    p.block_scores = want_scores ? bs.data() : nullptr;
    p.n_blocks = want_scores ? n_blocks : 0;
    p.index_lse = want_lse ? lse.data() : nullptr;
    op_index_topk(c, target, p);
  };
  std::vector<int32_t> sel, ref_sel;
  std::vector<float> bs, ref_bs, lse, ref_lse;
  run(true, sel, bs, lse);
  if (c.cuda) run(false, ref_sel, ref_bs, ref_lse);

  Vec srow, got_m, want_m, got_lse, ref_lse_v;
  std::vector<int32_t> valid, ref_valid;
  int64_t bad_rows = 0;
  std::string first_bad;
  for (int64_t i = 0; i < s.n_q; ++i)
    for (int64_t r = 0; r < h_kv; ++r) {
      naive_index_scores(s, qi.v, ki.v, h_kv, d_idx, scale, i, r, srow);
      Vec m = naive_block_max(srow, bk);
      int64_t n_vis = int64_t(m.size()), row = i * h_kv + r;
      // Scores are float32 sums of d_idx products: allow their rounding plus float accumulation.
      double qn = 0, kn = 0;
      for (int64_t x = 0; x < d_idx; ++x) qn += qi.v[row * d_idx + x] * qi.v[row * d_idx + x];
      for (int64_t j = 0; j <= s.pos[i]; ++j) {
        double t = 0;
        for (int64_t x = 0; x < d_idx; ++x) t += ki.v[s.key_row(i, j) * d_idx + x] * ki.v[s.key_row(i, j) * d_idx + x];
        kn = std::max(kn, t);
      }
      double mag = scale * std::sqrt(qn * kn), tol = (c.cuda ? 1e-5 : 1e-6) * mag + 3e-7 * max_abs(m);

      std::string why = row_structure(&sel[row * topk], topk, n_vis, true, valid);
      if (why.empty()) {
        std::vector<int32_t> want;
        if (c.cuda) {
          std::string ref_why = row_structure(&ref_sel[row * topk], topk, n_vis, true, ref_valid);
          want = ref_why.empty() ? ref_valid : naive_select(m.data(), n_vis, topk, true);
        } else {
          want = naive_select(m.data(), n_vis, topk, true);
        }
        why = judge_selection(valid, want, m, 2 * tol);
      }
      if (why.empty())
        for (const Dup& dp : dups)
          if (s.seq_of[i] == dp.b && dp.hi < n_vis - 1 &&
              std::binary_search(valid.begin(), valid.end(), int32_t(dp.hi)) &&
              !std::binary_search(valid.begin(), valid.end(), int32_t(dp.lo)))
            why = strf("blocks %lld and %lld hold the same keys (equal scores); selected %s keeps the higher one",
                       (long long)dp.lo, (long long)dp.hi, list_str(valid).c_str());
      if (!why.empty() && bad_rows++ == 0)
        first_bad =
            strf("topk_idx row %lld (pos %d) group %lld: %s", (long long)i, s.pos[i], (long long)r, why.c_str());

      if (want_scores) {
        for (int64_t b = 0; b < n_blocks; ++b) {
          got_m.push_back(bs[row * n_blocks + b]);
          if (c.cuda)
            want_m.push_back(ref_bs[row * n_blocks + b]);
          else
            want_m.push_back(b < n_vis ? (std::isnan(m[b]) ? m[b] : double(float(m[b]))) : -kInf);
        }
      }
      if (want_lse && why.empty()) {
        Vec sup;
        for (int32_t b : valid)
          for (int64_t j = b * bk; j < (b + 1) * bk && j <= s.pos[i]; ++j) sup.push_back(srow[j]);
        got_lse.push_back(lse[row]);
        ref_lse_v.push_back(logsumexp(sup));
      } else if (want_lse) {
        got_lse.push_back(0);
        ref_lse_v.push_back(0);
      }
    }
  if (bad_rows) c.rep.fail(first_bad + (bad_rows > 1 ? strf(" (and %lld more rows)", (long long)(bad_rows - 1)) : ""));
  // Block scores: float32 rounding of the float64 score (cpu), or the cpu scores (cuda).
  if (want_scores)
    expect_close(c.rep, "block_scores", got_m, want_m, c.cuda ? 1e-5 : 2e-7, c.cuda ? 1e-5 : 1e-6,
                 std::sqrt(double(d_idx)) * scale, Dims{{{"row", s.n_q}, {"group", h_kv}, {"block", n_blocks}}, &s});
  if (want_lse)
    expect_close(c.rep, "index_lse", got_lse, ref_lse_v, lse_tol(c).rtol, lse_tol(c).atol, 1.0,
                 Dims{{{"row", s.n_q}, {"group", h_kv}}, &s});
}

void case_block_topk(Ctx& c) {
  Rng& rng = c.rng;
  int64_t rows = uni(rng, 1, 48), n_blocks = coin(rng, 0.05) ? 0 : uni(rng, 1, 80), topk = pick_topk(rng);
  bool force_last = coin(rng, 0.5), use_row_blocks = coin(rng, 0.5);
  int64_t stride = (n_blocks > 0 && coin(rng, 0.4)) ? n_blocks + uni(rng, 1, 5) : 0;
  int64_t row_stride = stride ? stride : n_blocks;
  std::vector<int32_t> row_blocks(rows, int32_t(n_blocks));
  if (use_row_blocks)
    for (auto& x : row_blocks)
      x = int32_t(pick<int64_t>(rng, {0, std::min(topk, n_blocks), uni(rng, 0, n_blocks), n_blocks, n_blocks}));
  // Scores on a coarse grid so that ties are common, with NaN and infinities mixed in; columns
  // past a row's visible count hold values that would win if they were read.
  std::vector<float> scores(std::max<int64_t>(rows * row_stride, 1), 1e30f);
  std::normal_distribution<double> dist(0, 1);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t b = 0; b < row_blocks[i]; ++b) {
      double u = unif(rng, 0, 1);
      float x = float(std::floor(dist(rng) * 3) / 3);
      if (u < 0.05)
        x = std::nanf("");
      else if (u < 0.08)
        x = -std::numeric_limits<float>::infinity();
      else if (u < 0.09)
        x = std::numeric_limits<float>::infinity();
      scores[i * row_stride + b] = x;
    }
  c.describe(strf("rows=%lld n_blocks=%lld topk=%lld force_last=%d row_blocks=%s stride_row=%lld", (long long)rows,
                  (long long)n_blocks, (long long)topk, int(force_last), use_row_blocks ? "yes" : "no",
                  (long long)stride));
  auto run = [&](bool target, std::vector<int32_t>& out) {
    out.assign(rows * topk, kPoisonIdx);
    BlockTopkParams p;
    p.rows = rows;
    p.n_blocks = n_blocks;
    p.topk = topk;
    p.force_last = force_last;
    p.scores = n_blocks ? scores.data() : nullptr;
    p.stride_row = stride;
    p.row_blocks = use_row_blocks ? row_blocks.data() : nullptr;
    p.topk_idx = out.data();
    op_block_topk(c, target, p);
  };
  std::vector<int32_t> got, ref;
  run(true, got);
  if (c.cuda) run(false, ref);
  std::vector<int32_t> valid;
  for (int64_t i = 0; i < rows; ++i) {
    int64_t n_vis = row_blocks[i];
    std::vector<int32_t> want;
    if (c.cuda) {
      want.assign(ref.begin() + i * topk, ref.begin() + (i + 1) * topk);
    } else {
      Vec m(scores.begin() + i * row_stride, scores.begin() + i * row_stride + n_vis);
      want = naive_select(m.data(), n_vis, topk, force_last);
      want.resize(topk, -1);
    }
    std::vector<int32_t> row(got.begin() + i * topk, got.begin() + (i + 1) * topk);
    std::string why = row_structure(row.data(), topk, n_vis, force_last, valid);
    if (why.empty() && row != want)
      why = strf("selected %s, expected %s", list_str(row).c_str(), list_str(want).c_str());
    if (!why.empty()) {
      std::string sc;
      for (int64_t b = 0; b < n_vis && b < 40; ++b) sc += strf("%s%g", b ? " " : "", scores[i * row_stride + b]);
      c.rep.fail(strf("row %lld (%lld visible; scores %s%s): %s", (long long)i, (long long)n_vis, sc.c_str(),
                      n_vis > 40 ? " ..." : "", why.c_str()));
      return;
    }
  }
}

// Shapes of an attention case.
struct AttnCase {
  Seq s;
  AttnShape a;
  DType dt = DType::f32;
  float scale_param = 0.f;
  Input q, k, v;
  std::vector<int32_t> sel;  // empty for dense

  AttentionParams params(Tensor& o, std::vector<float>& lse) {
    AttentionParams p;
    p.seq = s.varlen();
    p.h_q = a.h_q;
    p.h_kv = a.h_kv;
    p.d = a.d;
    p.scale = scale_param;
    p.dtype = dt;
    p.q = q.t.data();
    p.k = k.t.data();
    p.v = v.t.data();
    p.topk_idx = sel.empty() ? nullptr : sel.data();
    p.topk = sel.empty() ? 0 : a.topk;
    p.bk = a.bk;
    p.o = o.data();
    p.lse = lse.data();
    return p;
  }
  const int32_t* sel_ptr() const { return sel.empty() ? nullptr : sel.data(); }
  std::string describe(bool sparse) const {
    return strf("n_q=%lld n_k=%lld [%s] h_q=%lld h_kv=%lld d=%lld%s %s%s", (long long)s.n_q, (long long)s.n_k,
                s.desc.c_str(), (long long)a.h_q, (long long)a.h_kv, (long long)a.d,
                sparse ? strf(" bk=%lld topk=%lld", (long long)a.bk, (long long)a.topk).c_str() : "", dtype_name(dt),
                scale_param ? strf(" scale=%g", scale_param).c_str() : "");
  }
};

// Draws an attention case: layout, heads within budget, inputs, and a selection when sparse.
AttnCase make_attn(Ctx& c, bool sparse, DType dt, int64_t max_len, int64_t long_len, int64_t bk, int64_t topk,
                   double budget, int64_t max_h_kv) {
  Rng& rng = c.rng;
  AttnCase t;
  t.dt = dt;
  t.s = gen_seq(rng, max_len, bk, long_len);
  Heads h = pick_heads(rng, t.s, budget, max_h_kv, {64, 128});
  t.a.h_q = h.h_q;
  t.a.h_kv = h.h_kv;
  t.a.d = h.d;
  t.a.bk = bk;
  t.a.topk = topk;
  t.scale_param = coin(rng, 0.75) ? 0.f : float(unif(rng, 0.04, 0.2));
  t.a.scale = t.scale_param ? t.scale_param : double(float(1.0 / std::sqrt(double(h.d))));  // float in the API
  double q_sigma = pick(rng, {1.0, 1.0, 2.0});                                              // 2: sharper softmax rows
  t.q = randn(rng, dt, t.s.n_q * h.h_q * h.d, q_sigma);
  t.k = randn(rng, dt, t.s.n_k * h.h_kv * h.d);
  t.v = randn(rng, dt, t.s.n_k * h.h_kv * h.d);
  if (sparse) t.sel = random_selection(rng, t.s, h.h_kv, topk, bk);
  return t;
}

void compare_forward(Ctx& c, const AttnCase& t, const Tensor& o, const std::vector<float>& lse, const Vec& ref_o,
                     const Vec& ref_lse) {
  Tol to = out_tol(c, t.dt), tl = lse_tol(c);
  Vec scales = row_scales(ref_o, t.a.d);
  int64_t d = t.a.d;
  expect_close(
      c.rep, "o", o.values(), ref_o, to.rtol, to.atol, [&](size_t i) { return scales[i / d]; },
      Dims{{{"row", t.s.n_q}, {"head", t.a.h_q}, {"col", d}}, &t.s});
  expect_close(c.rep, "lse", to_vec(lse), ref_lse, tl.rtol, tl.atol, 1.0,
               Dims{{{"row", t.s.n_q}, {"head", t.a.h_q}}, &t.s});
}

// Forward of the target backend, and the reference (naive float64, or the cpu backend).
void case_attention_forward(Ctx& c, bool sparse) {
  Rng& rng = c.rng;
  DType dt = c.pick_dtype();
  int64_t bk = c.pick_bk(), topk = pick_topk(rng);
  AttnCase t = make_attn(c, sparse, dt, 600, 4097, bk, topk, 2e7, 2);
  c.describe(t.describe(sparse));
  size_t n_o = t.s.n_q * t.a.h_q * t.a.d;
  Tensor o = poisoned(dt, n_o);
  std::vector<float> lse(t.s.n_q * t.a.h_q, std::nanf(""));
  op_attention_forward(c, true, t.params(o, lse));
  Vec ref_o, ref_lse;
  if (c.cuda) {
    Tensor o2 = poisoned(dt, n_o);
    std::vector<float> lse2(lse.size(), std::nanf(""));
    op_attention_forward(c, false, t.params(o2, lse2));
    ref_o = o2.values();
    ref_lse = to_vec(lse2);
  } else {
    naive_attention_forward(t.s, t.a, t.q.v, t.k.v, t.v.v, t.sel_ptr(), ref_o, ref_lse);
  }
  compare_forward(c, t, o, lse, ref_o, ref_lse);
}

// With topk >= the visible blocks of every query, index_topk selects everything and sparse
// attention must equal dense attention.
void case_sparse_eq_dense(Ctx& c) {
  Rng& rng = c.rng;
  DType dt = c.pick_dtype();
  int64_t bk = c.pick_bk();
  AttnCase t = make_attn(c, false, dt, std::min<int64_t>(600, 32 * bk), 32 * bk, bk, 0, 2e7, 2);
  int64_t nb = std::max<int64_t>(1, t.s.max_blocks(bk));
  t.a.topk = uni(rng, nb, 32);
  int64_t d_idx = pick<int64_t>(rng, {64, 128});
  c.describe(t.describe(true));
  Input qi = randn(rng, dt, t.s.n_q * t.a.h_kv * d_idx), ki = randn(rng, dt, t.s.n_k * d_idx);
  std::vector<int32_t> sel(t.s.n_q * t.a.h_kv * t.a.topk, kPoisonIdx);
  IndexTopkParams ip;
  ip.seq = t.s.varlen();
  ip.h_kv = t.a.h_kv;
  ip.d_idx = d_idx;
  ip.bk = bk;
  ip.topk = t.a.topk;
  ip.dtype = dt;
  ip.q_idx = qi.t.data();
  ip.k_idx = ki.t.data();
  ip.topk_idx = sel.data();
  op_index_topk(c, true, ip);
  for (int64_t i = 0; i < t.s.n_q; ++i)
    for (int64_t r = 0; r < t.a.h_kv; ++r) {
      std::vector<int32_t> want(t.a.topk, -1),
          got(sel.begin() + (i * t.a.h_kv + r) * t.a.topk, sel.begin() + (i * t.a.h_kv + r + 1) * t.a.topk);
      std::iota(want.begin(), want.begin() + t.s.own_block(i, bk) + 1, 0);
      if (got != want) {
        c.rep.fail(strf("index_topk row %lld (pos %d) group %lld with topk >= visible blocks: got %s, expected %s",
                        (long long)i, t.s.pos[i], (long long)r, list_str(got).c_str(), list_str(want).c_str()));
        return;
      }
    }
  t.sel = sel;
  size_t n_o = t.s.n_q * t.a.h_q * t.a.d;
  Tensor o = poisoned(dt, n_o), o_dense = poisoned(dt, n_o);
  std::vector<float> lse(t.s.n_q * t.a.h_q, std::nanf("")), lse_dense = lse;
  op_attention_forward(c, true, t.params(o, lse));
  t.sel.clear();
  op_attention_forward(c, false, t.params(o_dense, lse_dense));  // dense on the cpu backend
  t.sel = sel;
  compare_forward(c, t, o, lse, o_dense.values(), to_vec(lse_dense));
}

// Central difference of f at x[i], in float64.
double finite_diff(Input& x, size_t i, const std::function<double()>& f) {
  double x0 = x.v[i], h = 1e-5 * std::max(1.0, std::abs(x0));
  x.set(i, x0 + h);
  double up = f();
  x.set(i, x0 - h);
  double down = f();
  x.set(i, x0);
  return (up - down) / (2 * h);
}

// Finite differences of f at a few random coordinates of x against the analytical gradient.
// scale: the natural size of a gradient entry; rel_atol: known error of the analytical gradient
// relative to that scale.
void expect_fd(Ctx& c, const char* what, Input& x, const Vec& grad, const std::function<double()>& f, int samples,
               double scale, double rel_atol) {
  if (x.v.empty()) return;
  for (int t = 0; t < samples; ++t) {
    size_t i = size_t(uni(c.rng, 0, int64_t(x.v.size()) - 1));
    double fd = finite_diff(x, i, f);
    // float64 central differences with h = 1e-5: truncation and cancellation both near 1e-9.
    double tol = 1e-6 * (std::abs(fd) + scale) + rel_atol * scale + 1e-9;
    if (!(std::abs(fd - grad[i]) <= tol)) {
      c.rep.fail(strf("%s[%zu]: analytical %.12g, finite difference %.12g (|diff| %.3g > tol %.3g)", what, i, grad[i],
                      fd, std::abs(fd - grad[i]), tol));
      return;
    }
  }
}

void case_attention_backward(Ctx& c, bool sparse) {
  Rng& rng = c.rng;
  // On the cpu: half the cases are tiny float64 ones checked by finite differences as well.
  bool fd = !c.cuda && coin(rng, 0.5);
  DType dt = fd ? DType::f64 : c.pick_dtype();
  int64_t bk = fd ? pick<int64_t>(rng, {4, 8, 16}) : c.pick_bk();
  int64_t topk = fd ? uni(rng, 1, 6) : pick_topk(rng);
  AttnCase t = make_attn(c, sparse, dt, fd ? 40 : 400, fd ? 40 : 1100, bk, topk, fd ? 2e5 : 1e7, 2);
  c.describe(t.describe(sparse) + (fd ? " +finite-differences" : ""));
  size_t n_o = t.s.n_q * t.a.h_q * t.a.d, n_kv = t.s.n_k * t.a.h_kv * t.a.d;
  Input dout = randn(rng, dt, n_o);

  struct Grads {
    Tensor dq, dk, dv;
    Vec o, lse;  // the forward outputs the backward was given
  };
  auto run = [&](bool target) {
    Tensor o = poisoned(dt, n_o);
    std::vector<float> lse(t.s.n_q * t.a.h_q, std::nanf(""));
    AttentionParams fp = t.params(o, lse);
    op_attention_forward(c, target, fp);
    Grads g{poisoned(dt, n_o), poisoned(dt, n_kv), poisoned(dt, n_kv), o.values(), to_vec(lse)};
    AttentionBwdParams bp;
    static_cast<AttentionParams&>(bp) = fp;
    bp.do_ = dout.t.data();
    bp.dq = g.dq.data();
    bp.dk = g.dk.data();
    bp.dv = g.dv.data();
    op_attention_backward(c, target, bp);
    return g;
  };
  Grads got = run(true);
  Vec rdq, rdk, rdv;
  if (c.cuda) {
    Grads ref = run(false);
    rdq = ref.dq.values();
    rdk = ref.dk.values();
    rdv = ref.dv.values();
  } else {
    // D = <do, o> from the o the backward was given: in bf16 its rounding alone moves dq by
    // about 2^-9 |do| |o| scale, far more than the gradient's own rounding.
    naive_attention_backward(t.s, t.a, t.q.v, t.k.v, t.v.v, t.sel_ptr(), dout.v, rdq, rdk, rdv, &got.o, &got.lse);
  }
  // Gradients sum many terms: tolerance relative to the tensor's largest entry. The backward
  // rebuilds P = exp(s - lse) from the float32 lse of the forward, so against the exact function
  // (finite differences) every P carries a relative error up to half an ulp of lse (sums of such
  // terms may cancel: x16); the reference above uses the same lse, this is slack for a backward
  // that recomputes it.
  double lse_err = 16 * std::ldexp(std::max(1.0, max_abs(got.lse)), -24);
  Tol tol = out_tol(c, dt);
  tol.atol += lse_err;
  if (c.cuda) tol = {2e-2, 2e-2};
  Dims qd{{{"row", t.s.n_q}, {"head", t.a.h_q}, {"col", t.a.d}}, &t.s};
  Dims kd{{{"key", t.s.n_k}, {"head", t.a.h_kv}, {"col", t.a.d}}};
  Vec gdq = got.dq.values(), gdk = got.dk.values(), gdv = got.dv.values();
  // A gradient can vanish (one visible key: dq = dk = 0); its scale is then the size an entry
  // would have with all the probability on one key, not zero.
  double sq = max_abs(t.q.v), sk = max_abs(t.k.v), sv = max_abs(t.v.v), sdo = max_abs(dout.v);
  double scale_dq = std::max(max_abs(rdq), t.a.scale * sdo * sv * sk);
  double scale_dk = std::max(max_abs(rdk), t.a.scale * sdo * sv * sq), scale_dv = std::max(max_abs(rdv), sdo);
  expect_close(c.rep, "dq", gdq, rdq, tol.rtol, tol.atol, scale_dq, qd);
  expect_close(c.rep, "dk", gdk, rdk, tol.rtol, tol.atol, scale_dk, kd);
  expect_close(c.rep, "dv", gdv, rdv, tol.rtol, tol.atol, scale_dv, kd);
  if (fd && c.rep.problems.empty()) {
    auto loss = [&]() {
      Tensor o = poisoned(dt, n_o);
      std::vector<float> lse(t.s.n_q * t.a.h_q);
      op_attention_forward(c, true, t.params(o, lse));
      double l = 0;
      for (size_t x = 0; x < n_o; ++x) l += dout.v[x] * o.get(x);
      return l;
    };
    expect_fd(c, "dq", t.q, gdq, loss, 4, scale_dq, lse_err);
    expect_fd(c, "dk", t.k, gdk, loss, 4, scale_dk, lse_err);
    expect_fd(c, "dv", t.v, gdv, loss, 4, scale_dv, lse_err);
  }
}

void case_kl(Ctx& c, bool backward) {
  Rng& rng = c.rng;
  bool fd = backward && !c.cuda && coin(rng, 0.5);
  DType dt = fd ? DType::f64 : c.pick_dtype();
  int64_t bk = fd ? pick<int64_t>(rng, {4, 8, 16}) : c.pick_bk();
  int64_t topk = fd ? uni(rng, 1, 6) : pick_topk(rng);
  int phase = int(uni(rng, 0, 2));  // 0: given selection, 1: index_topk + saved lse, 2: warm-up (dense)
  AttnCase t = make_attn(c, phase == 0, dt, fd ? 40 : 400, fd ? 40 : 1100, bk, topk, fd ? 2e5 : 1e7, 2);
  int64_t d_idx = pick<int64_t>(rng, {64, 128});
  bool saved = phase == 1 || (phase == 2 && coin(rng, 0.5));
  if (c.cuda) saved = true;  // the cuda backend takes the main branch's lse from the forward, never recomputes it
  float index_scale = coin(rng, 0.7) ? 0.f : float(unif(rng, 0.05, 0.3));
  double lambda = backward ? double(float(unif(rng, 0.25, 4.0))) : 1.0;  // float in the API
  Input qi = randn(rng, dt, t.s.n_q * t.a.h_kv * d_idx), ki = randn(rng, dt, t.s.n_k * d_idx);
  c.describe(t.describe(phase != 2) + strf(" d_idx=%lld %s%s%s", (long long)d_idx,
                                           phase == 0   ? "given-selection"
                                           : phase == 1 ? "index_topk-selection"
                                                        : "warm-up",
                                           saved ? " saved-lse" : "", fd ? " +finite-differences" : ""));
  if (backward) c.describe(strf("lambda=%g", lambda));

  // The statistics a training step would have saved: main lse from the attention forward, index
  // lse from index_topk, both on the target backend.
  std::vector<float> lse, index_lse;
  if (phase == 1) {
    t.sel.assign(t.s.n_q * t.a.h_kv * topk, kPoisonIdx);
    index_lse.assign(t.s.n_q * t.a.h_kv, std::nanf(""));
    IndexTopkParams ip;
    ip.seq = t.s.varlen();
    ip.h_kv = t.a.h_kv;
    ip.d_idx = d_idx;
    ip.bk = bk;
    ip.topk = topk;
    ip.index_scale = index_scale;
    ip.dtype = dt;
    ip.q_idx = qi.t.data();
    ip.k_idx = ki.t.data();
    ip.topk_idx = t.sel.data();
    ip.index_lse = index_lse.data();
    op_index_topk(c, true, ip);
  }
  if (saved) {
    Tensor o = poisoned(dt, t.s.n_q * t.a.h_q * t.a.d);
    lse.assign(t.s.n_q * t.a.h_q, std::nanf(""));
    op_attention_forward(c, true, t.params(o, lse));
  }
  KlShape ks{t.a.h_q, t.a.h_kv, t.a.d,     d_idx,
             bk,      topk,     t.a.scale, index_scale ? index_scale : double(float(1.0 / std::sqrt(double(d_idx))))};
  auto params = [&](bool with_stats) {
    IndexKLParams p;
    p.seq = t.s.varlen();
    p.h_q = t.a.h_q;
    p.h_kv = t.a.h_kv;
    p.d = t.a.d;
    p.d_idx = d_idx;
    p.scale = t.scale_param;
    p.index_scale = index_scale;
    p.lambda = float(lambda);
    p.dtype = dt;
    p.q = t.q.t.data();
    p.k = t.k.t.data();
    p.q_idx = qi.t.data();
    p.k_idx = ki.t.data();
    p.topk_idx = t.sel_ptr();
    p.topk = t.sel.empty() ? 0 : topk;
    p.bk = bk;
    if (with_stats) {
      p.lse = lse.empty() ? nullptr : lse.data();
      p.index_lse = index_lse.empty() ? nullptr : index_lse.data();
    }
    return p;
  };
  // The saved lse are float32, so a loss using them carries their rounding.
  double rtol = c.cuda ? 2e-2 : (saved ? 1e-5 : (dt == DType::f64 ? 1e-10 : 1e-7));
  if (!backward) {
    double got = op_kl(c, true, params(true), false);
    double want =
        c.cuda ? op_kl(c, false, params(false), false) : naive_kl_loss(t.s, ks, t.q.v, t.k.v, qi.v, ki.v, t.sel_ptr());
    double tol = rtol * std::abs(want) + (c.cuda ? 1e-3 : saved ? 2e-6 : 1e-9);
    if (!(std::abs(got - want) <= tol))
      c.rep.fail(
          strf("loss: got %.12g, expected %.12g (|diff| %.3g > tol %.3g)", got, want, std::abs(got - want), tol));
    if (!(got >= -tol)) c.rep.fail(strf("loss %.12g is negative", got));
    return;
  }
  auto run = [&](bool target, Tensor& dqi, Tensor& dki) {
    dqi = poisoned(dt, qi.v.size());
    dki = poisoned(dt, ki.v.size());
    IndexKLParams p = params(target);
    p.dq_idx = dqi.data();
    p.dk_idx = dki.data();
    op_kl(c, target, p, true);
  };
  Tensor dqi, dki;
  run(true, dqi, dki);
  Vec rdq, rdk;
  if (c.cuda) {
    Tensor a, b;
    run(false, a, b);
    rdq = a.values();
    rdk = b.values();
  } else {
    naive_kl_backward(t.s, ks, t.q.v, t.k.v, qi.v, ki.v, t.sel_ptr(), lambda, rdq, rdk);
  }
  // Saved float32 lse leave the teacher normalised only to float precision.
  Tol tol = out_tol(c, dt);
  if (saved) tol = {std::max(tol.rtol, 1e-5), std::max(tol.atol, 1e-5)};
  if (c.cuda) tol = {2e-2, 2e-2};
  Vec gdq = dqi.values(), gdk = dki.values();
  // The gradient vanishes where teacher and student agree (a single visible key); its natural
  // size is that of one dS = lambda / (n_q * h_kv) term.
  double unit = lambda / double(t.s.n_q * t.a.h_kv) * ks.index_scale;
  double scale_q = std::max(max_abs(rdq), unit * max_abs(ki.v)), scale_k = std::max(max_abs(rdk), unit * max_abs(qi.v));
  expect_close(c.rep, "dq_idx", gdq, rdq, tol.rtol, tol.atol, scale_q,
               Dims{{{"row", t.s.n_q}, {"group", t.a.h_kv}, {"col", d_idx}}, &t.s});
  expect_close(c.rep, "dk_idx", gdk, rdk, tol.rtol, tol.atol, scale_k, Dims{{{"key", t.s.n_k}, {"col", d_idx}}});
  if (fd && c.rep.problems.empty()) {
    // index_lse depends on q_idx and k_idx, so the perturbed losses recompute it.
    auto loss = [&]() {
      IndexKLParams p = params(true);
      p.index_lse = nullptr;
      return lambda * op_kl(c, true, p, false);
    };
    expect_fd(c, "dq_idx", qi, gdq, loss, 4, scale_q, saved ? 1e-6 : 0.0);
    expect_fd(c, "dk_idx", ki, gdk, loss, 4, scale_k, saved ? 1e-6 : 0.0);
  }
}

void case_recall(Ctx& c) {
  Rng& rng = c.rng;
  DType dt = c.pick_dtype();
  int64_t bk = c.pick_bk(), topk = pick_topk(rng);
  AttnCase t = make_attn(c, true, dt, 600, 1100, bk, topk, 1e7, 2);
  int variant = int(uni(rng, 0, 2));  // 0: random selection, 1: the oracle I*, 2: index_topk
  c.describe(t.describe(true) + (variant == 0   ? " random-selection"
                                 : variant == 1 ? " oracle-selection"
                                                : " index_topk-selection"));
  int64_t h_kv = t.a.h_kv, rows = t.s.n_q * h_kv;
  // Group-mean block masses, the oracle, and rows whose oracle is decided by a near-tie.
  std::vector<Vec> mass(rows);
  std::vector<std::vector<int32_t>> oracle(rows);
  std::vector<char> ambiguous(rows, 0);
  for (int64_t i = 0; i < t.s.n_q; ++i)
    for (int64_t r = 0; r < h_kv; ++r) {
      int64_t row = i * h_kv + r;
      mass[row] = naive_block_mass(t.s, t.a, t.q.v, t.k.v, i, r);
      const Vec& m = mass[row];
      int64_t n_vis = int64_t(m.size());
      oracle[row] = naive_select(m.data(), n_vis, topk, true);
      if (n_vis > topk) {
        Vec others(m.begin(), m.end() - 1);
        std::sort(others.begin(), others.end(), std::greater<double>());
        // cuda: float32 masses (exp of float32 scores), good to a few 1e-6 of the largest.
        const double tie = c.cuda ? 1e-4 : 1e-6;
        if (topk >= 2 && others[topk - 2] - others[topk - 1] < tie * others[0]) ambiguous[row] = 1;
      }
    }
  if (variant == 1) {
    for (int64_t row = 0; row < rows; ++row) {
      std::fill(t.sel.begin() + row * topk, t.sel.begin() + (row + 1) * topk, -1);
      std::copy(oracle[row].begin(), oracle[row].end(), t.sel.begin() + row * topk);
    }
  } else if (variant == 2) {
    Input qi = randn(rng, dt, t.s.n_q * h_kv * 64), ki = randn(rng, dt, t.s.n_k * 64);
    IndexTopkParams ip;
    ip.seq = t.s.varlen();
    ip.h_kv = h_kv;
    ip.d_idx = 64;
    ip.bk = bk;
    ip.topk = topk;
    ip.dtype = dt;
    ip.q_idx = qi.t.data();
    ip.k_idx = ki.t.data();
    std::fill(t.sel.begin(), t.sel.end(), kPoisonIdx);
    ip.topk_idx = t.sel.data();
    op_index_topk(c, true, ip);
  }
  auto run = [&](bool target, std::vector<float>& br, std::vector<float>& sr) {
    br.assign(rows, std::nanf(""));
    sr.assign(rows, std::nanf(""));
    SelectionRecallParams p;
    p.seq = t.s.varlen();
    p.h_q = t.a.h_q;
    p.h_kv = h_kv;
    p.d = t.a.d;
    p.bk = bk;
    p.topk = topk;
    p.scale = t.scale_param;
    p.dtype = dt;
    p.q = t.q.t.data();
    p.k = t.k.t.data();
    p.topk_idx = t.sel.data();
    p.block_recall_rows = br.data();
    p.score_recall_rows = sr.data();
    return op_recall(c, target, p);
  };
  std::vector<float> br, sr;
  SelectionRecall got = run(true, br, sr);
  auto in01 = [](double x) { return x >= 0.0 && x <= 1.0; };
  if (!in01(got.block_recall) || !in01(got.score_recall))
    c.rep.fail(strf("mean recall out of [0, 1]: block %.9g, score %.9g", got.block_recall, got.score_recall));
  double mean_b = 0, mean_s = 0;
  for (int64_t row = 0; row < rows; ++row) {
    mean_b += br[row] / double(rows);
    mean_s += sr[row] / double(rows);
    if (!in01(br[row]) || !in01(sr[row])) {
      c.rep.fail(strf("row %lld group %lld: recall out of [0, 1]: block %.9g, score %.9g", (long long)(row / h_kv),
                      (long long)(row % h_kv), br[row], sr[row]));
      return;
    }
  }
  double mtol = c.cuda ? 1e-3 : 1e-5;
  // No rows (no queries): the means are 1 by definition.
  if (rows == 0) mean_b = mean_s = 1.0;
  if (std::abs(mean_b - got.block_recall) > mtol || std::abs(mean_s - got.score_recall) > mtol)
    c.rep.fail(strf("means (%.9g, %.9g) differ from the mean of the rows (%.9g, %.9g)", got.block_recall,
                    got.score_recall, mean_b, mean_s));
  if (c.cuda) {
    std::vector<float> br2, sr2;
    SelectionRecall ref = run(false, br2, sr2);
    if (std::abs(ref.block_recall - got.block_recall) > 2e-2 || std::abs(ref.score_recall - got.score_recall) > 2e-2)
      c.rep.fail(strf("means: got block %.6g score %.6g, cpu block %.6g score %.6g", got.block_recall, got.score_recall,
                      ref.block_recall, ref.score_recall));
  }
  Vec gb, wb, gs, ws;
  for (int64_t row = 0; row < rows; ++row) {
    if (ambiguous[row]) continue;
    std::vector<int32_t> chosen;
    for (int64_t x = 0; x < topk; ++x)
      if (t.sel[row * topk + x] >= 0) chosen.push_back(t.sel[row * topk + x]);
    std::sort(chosen.begin(), chosen.end());
    const std::vector<int32_t>& star = oracle[row];
    std::vector<int32_t> both;
    std::set_intersection(star.begin(), star.end(), chosen.begin(), chosen.end(), std::back_inserter(both));
    double num = 0, den = 0;
    for (int32_t b : both) num += mass[row][b];
    for (int32_t b : star) den += mass[row][b];
    gb.push_back(br[row]);
    wb.push_back(double(both.size()) / double(star.size()));
    gs.push_back(sr[row]);
    ws.push_back(den > 0 ? num / den : 1.0);
  }
  expect_close(c.rep, "block_recall_rows (unambiguous rows)", gb, wb, 1e-6, 1e-6, 1.0,
               Dims{{{"row", int64_t(gb.size())}}});
  expect_close(c.rep, "score_recall_rows (unambiguous rows)", gs, ws, c.cuda ? 1e-4 : 1e-5, 1e-6, 1.0,
               Dims{{{"row", int64_t(gs.size())}}});
}

// ---------------------------------------------------------------------------------------------
// Decode over a paged cache.

// The value of an OCP e4m3 byte (0x7f / 0xff: NaN).
double e4m3_value(uint8_t x) {
  const int e = (x >> 3) & 15, m = x & 7;
  if (e == 15 && m == 7) return std::nan("");
  const double v = e == 0 ? std::ldexp(double(m), -9) : std::ldexp(1.0 + m / 8.0, e - 7);
  return (x & 0x80) ? -v : v;
}

// A decode step of a batch whose whole contexts are appended to a shuffled page pool
// (append_kv), then the index pass and the attention for the last tokens of each request. cpu:
// against the prefill ops over the same sequences, contiguous (the decode contract); cuda: against
// the cpu decode, cache bytes included, with native or fp8 index keys. The attention of both
// backends runs over the target's selection; the selections are judged against block scores
// computed here from the cache, so that near-ties may go either way.
void case_decode(Ctx& c) {
  Rng& rng = c.rng;
  const DType dt = c.pick_dtype();
  const int64_t batch = uni(rng, 1, 4);
  const int64_t bk = c.pick_bk();  // the cuda index pass takes 64 and 128
  const int64_t h_kv = pick<int64_t>(rng, {1, 2, 4}), g = pick<int64_t>(rng, {1, 2, 4, 8, 16}), h_q = h_kv * g;
  const int64_t d = pick<int64_t>(rng, {64, 128}), d_idx = pick<int64_t>(rng, {64, 128}), topk = pick_topk(rng);
  const bool fp8 = c.cuda && coin(rng, 0.3);  // the prefill reference of the cpu case has no fp8 keys
  // Contexts (the first request non-empty with a query), 0..4 query tokens each.
  std::vector<int32_t> lens(batch), cu_k(batch + 1, 0), cu_q(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    lens[b] = b > 0 && coin(rng, 0.15) ? 0 : int32_t(uni(rng, 1, 900));
    const int64_t nq = lens[b] ? uni(rng, b == 0 ? 1 : 0, std::min<int64_t>(4, lens[b])) : 0;
    cu_k[b + 1] = cu_k[b] + lens[b];
    cu_q[b + 1] = cu_q[b] + int32_t(nq);
  }
  const int64_t n_k = cu_k[batch], n_q = cu_q[batch];
  // Pages: each request's blocks on a random permutation of the pool, spare pages unused.
  int64_t used = 0, max_blocks = 1;
  for (int64_t b = 0; b < batch; ++b) {
    used += (lens[b] + bk - 1) / bk;
    max_blocks = std::max<int64_t>(max_blocks, (lens[b] + bk - 1) / bk);
  }
  max_blocks += uni(rng, 0, 2);
  const int64_t n_pages = used + uni(rng, 1, 3);
  std::vector<int32_t> perm(n_pages), table(batch * max_blocks, -1);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  for (int64_t b = 0, next = 0; b < batch; ++b)
    for (int64_t j = 0; j < (lens[b] + bk - 1) / bk; ++j) table[b * max_blocks + j] = perm[next++];
  Input k = randn(rng, dt, n_k * h_kv * d), v = randn(rng, dt, n_k * h_kv * d), kx = randn(rng, dt, n_k * d_idx);
  Input q = randn(rng, dt, n_q * h_q * d, 2.0), qx = randn(rng, dt, n_q * h_kv * d_idx);
  std::string lens_s;
  for (int64_t b = 0; b < batch; ++b) lens_s += strf("%s%d/%d", b ? "," : "", lens[b], cu_q[b + 1] - cu_q[b]);
  c.describe(
      strf("batch=%lld contexts/queries=[%s] bk=%lld pages=%lld h_q=%lld h_kv=%lld d=%lld d_idx=%lld topk=%lld "
           "keys=%s %s",
           (long long)batch, lens_s.c_str(), (long long)bk, (long long)n_pages, (long long)h_q, (long long)h_kv,
           (long long)d, (long long)d_idx, (long long)topk, fp8 ? "fp8_e4m3" : "native", dtype_name(dt)));

  // One backend's cache (poisoned: a slot read before append_kv wrote it shows) and outputs.
  struct Step {
    Tensor kc, vc, kxc, o;
    std::vector<uint8_t> kx8;
    std::vector<float> scale, lse, ilse;
    std::vector<int32_t> sel;
  };
  auto make_step = [&]() {
    Step st;
    st.kc = poisoned(dt, size_t(n_pages * bk * h_kv * d));
    st.vc = poisoned(dt, size_t(n_pages * bk * h_kv * d));
    if (fp8) {
      st.kx8.assign(size_t(n_pages * bk * d_idx), 0x7f);
      st.scale.assign(size_t(n_pages * bk), std::nanf(""));
    } else {
      st.kxc = poisoned(dt, size_t(n_pages * bk * d_idx));
    }
    st.o = poisoned(dt, size_t(n_q * h_q * d));
    st.lse.assign(size_t(n_q * h_q), std::nanf(""));
    st.ilse.assign(size_t(n_q * h_kv), std::nanf(""));
    st.sel.assign(size_t(n_q * h_kv * topk), kPoisonIdx);
    return st;
  };
  // append_kv, decode_index_topk, then decode_attention over att_sel (nullptr: this selection).
  auto run = [&](bool target, Step& st, const std::vector<int32_t>* att_sel) {
    const bool dev = target && c.cuda;
    DeviceArena a;
    auto in = [&](const void* h, size_t bytes) { return dev ? a.in(h, bytes) : h; };
    auto out = [&](void* h, size_t bytes) { return dev ? a.out(h, bytes) : h; };
    const size_t es = size_t(dtype_size(dt));
    PagedKvCache pc;
    pc.batch = batch;
    pc.n_pages = n_pages;
    pc.bk = bk;
    pc.h_kv = h_kv;
    pc.d = d;
    pc.d_idx = d_idx;
    pc.k_cache = out(st.kc.data(), st.kc.bytes.size());
    pc.v_cache = out(st.vc.data(), st.vc.bytes.size());
    if (fp8) {
      pc.k_idx_format = IndexKeyFormat::fp8_e4m3;
      pc.k_idx_cache = out(st.kx8.data(), st.kx8.size());
      pc.k_idx_scale = static_cast<float*>(out(st.scale.data(), st.scale.size() * 4));
    } else {
      pc.k_idx_cache = out(st.kxc.data(), st.kxc.bytes.size());
    }
    pc.block_table = static_cast<const int32_t*>(in(table.data(), table.size() * 4));
    pc.max_blocks = max_blocks;
    pc.seq_lens = static_cast<const int32_t*>(in(lens.data(), lens.size() * 4));
    const auto* cuk = static_cast<const int32_t*>(in(cu_k.data(), cu_k.size() * 4));
    const auto* cuq = static_cast<const int32_t*>(in(cu_q.data(), cu_q.size() * 4));
    const Exec ex = c.exec(target);
    AppendKvParams ap;
    ap.cache = pc;
    ap.dtype = dt;
    ap.n_new = n_k;
    ap.cu_new = cuk;
    ap.k = in(k.t.data(), k.t.bytes.size());
    ap.v = in(v.t.data(), v.t.bytes.size());
    ap.k_idx = in(kx.t.data(), kx.t.bytes.size());
    append_kv(ap, ex);
    DecodeIndexParams ip;
    ip.cache = pc;
    ip.dtype = dt;
    ip.topk = topk;
    ip.n_q = n_q;
    ip.cu_seqlens_q = cuq;
    ip.q_idx = in(qx.t.data(), size_t(n_q * h_kv * d_idx) * es);
    ip.topk_idx = static_cast<int32_t*>(out(st.sel.data(), st.sel.size() * 4));
    ip.index_lse = static_cast<float*>(out(st.ilse.data(), st.ilse.size() * 4));
    decode_index_topk(ip, ex);
    DecodeAttentionParams dp;
    dp.cache = pc;
    dp.dtype = dt;
    dp.h_q = h_q;
    dp.n_q = n_q;
    dp.cu_seqlens_q = cuq;
    dp.q = in(q.t.data(), q.t.bytes.size());
    dp.topk = topk;
    dp.topk_idx = att_sel ? static_cast<const int32_t*>(in(att_sel->data(), att_sel->size() * 4)) : ip.topk_idx;
    dp.o = out(st.o.data(), st.o.bytes.size());
    dp.lse = static_cast<float*>(out(st.lse.data(), st.lse.size() * 4));
    decode_attention(dp, ex);
    if (dev) a.fetch();
  };

  Step got = make_step(), ref = make_step();
  run(true, got, nullptr);
  Vec ref_o, ref_lse, ref_ilse(size_t(n_q * h_kv), std::nan(""));
  std::vector<int32_t> ref_sel;
  if (c.cuda) {
    run(false, ref, &got.sel);
    auto same_bytes = [&](const char* what, const void* x, const void* y, size_t n) {
      const auto* p = static_cast<const uint8_t*>(x);
      const auto* r = static_cast<const uint8_t*>(y);
      for (size_t i = 0; i < n; ++i)
        if (p[i] != r[i])
          return c.rep.fail(strf("%s: byte %zu differs from the cpu append (%u vs %u)", what, i, p[i], r[i]));
    };
    same_bytes("k_cache", got.kc.data(), ref.kc.data(), got.kc.bytes.size());
    same_bytes("v_cache", got.vc.data(), ref.vc.data(), got.vc.bytes.size());
    if (fp8) {
      same_bytes("k_idx_cache", got.kx8.data(), ref.kx8.data(), got.kx8.size());
      same_bytes("k_idx_scale", got.scale.data(), ref.scale.data(), got.scale.size() * 4);
    } else {
      same_bytes("k_idx_cache", got.kxc.data(), ref.kxc.data(), got.kxc.bytes.size());
    }
    ref_o = ref.o.values();
    ref_lse = to_vec(ref.lse);
    ref_sel = ref.sel;
    ref_ilse = to_vec(ref.ilse);
  } else {
    // The prefill ops over the contiguous sequences: keys cu_k (the appended rows), queries the last
    // tokens of each (bottom-right aligned).
    Varlen vl;
    vl.n_q = n_q;
    vl.n_k = n_k;
    vl.batch = batch;
    vl.cu_seqlens_q = cu_q.data();
    vl.cu_seqlens_k = cu_k.data();
    IndexTopkParams ip;
    ip.seq = vl;
    ip.h_kv = h_kv;
    ip.d_idx = d_idx;
    ip.bk = bk;
    ip.topk = topk;
    ip.dtype = dt;
    ip.q_idx = qx.t.data();
    ip.k_idx = kx.t.data();
    ref_sel.assign(size_t(n_q * h_kv * topk), kPoisonIdx);
    std::vector<float> ilse(size_t(n_q * h_kv), std::nanf(""));
    ip.topk_idx = ref_sel.data();
    ip.index_lse = ilse.data();
    index_topk(ip, c.exec(false));
    ref_ilse = to_vec(ilse);
    AttentionParams p;
    p.seq = vl;
    p.h_q = h_q;
    p.h_kv = h_kv;
    p.d = d;
    p.bk = bk;
    p.topk = topk;
    p.dtype = dt;
    p.q = q.t.data();
    p.k = k.t.data();
    p.v = v.t.data();
    p.topk_idx = got.sel.data();
    Tensor o = poisoned(dt, size_t(n_q * h_q * d));
    std::vector<float> lse(size_t(n_q * h_q), std::nanf(""));
    p.o = o.data();
    p.lse = lse.data();
    sparse_attention_forward(p, c.exec(false));
    ref_o = o.values();
    ref_lse = to_vec(lse);
  }

  // Selections: structure, then against the reference up to near-ties of the block scores, computed
  // here from the reference cache as the contract defines them.
  const double iscale = double(float(1.0 / std::sqrt(double(d_idx))));
  const Step& rc = c.cuda ? ref : got;  // a cache written by the cpu backend
  std::vector<int32_t> valid, want_valid;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = cu_q[b]; i < cu_q[b + 1]; ++i) {
      const int64_t pos = lens[b] - (cu_q[b + 1] - cu_q[b]) + (i - cu_q[b]), n_vis = pos / bk + 1;
      for (int64_t r = 0; r < h_kv; ++r) {
        const size_t row = size_t(i * h_kv + r);
        const int32_t* gr = got.sel.data() + row * topk;
        std::string why = row_structure(gr, topk, n_vis, true, valid);
        if (why.empty()) {
          Vec qv(d_idx);
          double sq = 1.0;
          if (fp8) {
            std::vector<float> x(d_idx);
            std::vector<uint8_t> q8(d_idx);
            for (int64_t e = 0; e < d_idx; ++e) x[e] = float(qx.v[row * d_idx + e]);
            sq = quantize_e4m3_row(x.data(), d_idx, q8.data());
            for (int64_t e = 0; e < d_idx; ++e) qv[e] = e4m3_value(q8[e]);
          } else {
            for (int64_t e = 0; e < d_idx; ++e) qv[e] = qx.v[row * d_idx + e];
          }
          Vec m(n_vis, -kInf);
          for (int64_t j = 0; j <= pos; ++j) {
            const size_t slot = size_t(table[b * max_blocks + j / bk]) * bk + size_t(j % bk);
            double dot = 0;
            for (int64_t e = 0; e < d_idx; ++e)
              dot += qv[e] * (fp8 ? e4m3_value(rc.kx8[slot * d_idx + e]) : rc.kxc.get(slot * d_idx + e));
            const double sc = dot * iscale * (fp8 ? sq * double(rc.scale[slot]) : 1.0);
            m[j / bk] = std::max(m[j / bk], sc);
          }
          std::vector<int32_t> want(ref_sel.begin() + row * topk, ref_sel.begin() + (row + 1) * topk);
          why = row_structure(want.data(), topk, n_vis, true, want_valid);
          if (why.empty())
            why = judge_selection(valid, want_valid, m, 1e-4 * max_abs(m) + 1e-6);
          else
            why = "reference " + why;
          // The index lse of a row is comparable where both selected the same blocks.
          if (why.empty() && valid == want_valid && std::isfinite(ref_ilse[row])) {
            const Tol tl = lse_tol(c);
            if (!(std::abs(got.ilse[row] - ref_ilse[row]) <= tl.rtol * std::abs(ref_ilse[row]) + tl.atol))
              why = strf("index_lse %.9g, expected %.9g", got.ilse[row], ref_ilse[row]);
          }
        }
        if (!why.empty()) {
          c.rep.fail(strf("query %lld (request %lld, pos %lld), group %lld: %s", (long long)i, (long long)b,
                          (long long)pos, (long long)r, why.c_str()));
          return;
        }
      }
    }

  // The attention over the same selection.
  const Tol to = out_tol(c, dt), tl = lse_tol(c);
  const Vec scales = row_scales(ref_o, d);
  expect_close(
      c.rep, "o", got.o.values(), ref_o, to.rtol, to.atol, [&](size_t i) { return scales[i / d]; },
      Dims{{{"query", n_q}, {"head", h_q}, {"col", d}}});
  expect_close(c.rep, "lse", to_vec(got.lse), ref_lse, tl.rtol, tl.atol, 1.0, Dims{{{"query", n_q}, {"head", h_q}}});
}

struct Kind {
  const char* name;
  std::function<void(Ctx&)> run;
};

const std::vector<Kind>& kinds() {
  static const std::vector<Kind> k = {
      {"index_topk", case_index_topk},
      {"block_topk", case_block_topk},
      {"sparse_forward", [](Ctx& c) { case_attention_forward(c, true); }},
      {"dense_forward", [](Ctx& c) { case_attention_forward(c, false); }},
      {"sparse_eq_dense", case_sparse_eq_dense},
      {"sparse_backward", [](Ctx& c) { case_attention_backward(c, true); }},
      {"dense_backward", [](Ctx& c) { case_attention_backward(c, false); }},
      {"kl_loss", [](Ctx& c) { case_kl(c, false); }},
      {"kl_backward", [](Ctx& c) { case_kl(c, true); }},
      {"selection_recall", case_recall},
      {"decode", case_decode},
  };
  return k;
}

// "msa::sparse_attention_backward: backend = cuda, but this operation has no CUDA kernel yet"
// -> "sparse_attention_backward"; empty when the message is not that one.
std::string missing_kernel(const std::string& what) {
  if (what.find("no CUDA kernel yet") == std::string::npos) return "";
  size_t a = what.find("msa::"), b = what.find(':', a == std::string::npos ? 0 : a + 5);
  if (a == std::string::npos || b == std::string::npos) return "an operation";
  return what.substr(a + 5, b - a - 5);
}

}  // namespace

int run_check(const CheckOptions& o) {
  bool cuda = o.backend == Backend::cuda;
  if (cuda) {
    std::string why = cuda_unavailable_reason();
    if (!why.empty()) {
      std::fprintf(stderr, "msa check: --backend cuda: %s\n", why.c_str());
      return 2;
    }
  }
  std::printf("msa check: backend %s, %lld cases, seed %llu (%s)\n", backend_name(o.backend), (long long)o.cases,
              (unsigned long long)o.seed,
              cuda ? "compared with the cpu backend" : "compared with naive float64 formulas");
  std::fflush(stdout);
  int64_t passed = 0, failed = 0, skipped = 0;
  std::map<std::string, int64_t> skipped_ops;
  const auto& ks = kinds();
  auto t_start = std::chrono::steady_clock::now();
  for (int64_t n = 0; n < o.cases; ++n) {
    if (o.only >= 0 && n != o.only) continue;
    const Kind& kind = ks[size_t(n) % ks.size()];
    Ctx c;
    c.rng.seed(case_seed(o.seed, n));
    c.cuda = cuda;
    auto t0 = std::chrono::steady_clock::now();
    std::string skip;
    try {
      kind.run(c);
    } catch (const Error& e) {
      skip = cuda ? missing_kernel(e.what()) : "";
      if (skip.empty()) c.rep.fail(std::string("threw msa::Error: ") + e.what());
    } catch (const std::exception& e) {
      c.rep.fail(std::string("threw: ") + e.what());
    }
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (!skip.empty()) {
      ++skipped;
      if (skipped_ops[skip]++ == 0)
        std::printf("SKIP case %lld (%s): %s has no CUDA kernel yet; its cases are counted as skipped\n", (long long)n,
                    kind.name, skip.c_str());
      else if (o.verbose)
        std::printf("skip case %lld (%s): %s has no CUDA kernel yet\n", (long long)n, kind.name, skip.c_str());
    } else if (c.rep.problems.empty()) {
      ++passed;
      if (o.verbose) std::printf("ok   case %lld (%s, %.0f ms): %s\n", (long long)n, kind.name, ms, c.desc.c_str());
    } else {
      ++failed;
      std::string all;
      for (size_t x = 0; x < c.rep.problems.size(); ++x) all += (x ? "; " + c.rep.problems[x] : c.rep.problems[x]);
      std::printf("FAIL case %lld (%s) [rerun: msa check --backend %s --seed %llu --only %lld]: %s: %s\n", (long long)n,
                  kind.name, backend_name(o.backend), (unsigned long long)o.seed, (long long)n, c.desc.c_str(),
                  all.c_str());
    }
    std::fflush(stdout);
  }
  for (const auto& [op, count] : skipped_ops)
    std::printf("skipped: %lld cases need %s, which has no CUDA kernel yet\n", (long long)count, op.c_str());
  if (o.verbose)
    std::printf("time: %.1f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count());
  std::printf("%lld passed, %lld failed", (long long)passed, (long long)failed);
  if (skipped) std::printf(", %lld skipped", (long long)skipped);
  std::printf("\n");
  return failed ? 1 : 0;
}

}  // namespace msa::cli
