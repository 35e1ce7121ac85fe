// Tests of argument validation for the four main-branch calls (sparse / dense, forward /
// backward): each rule throws msa::Error naming the call and the argument and writes nothing;
// empty problems are no-ops, and a backward without queries zeroes dk and dv.
#include <cmath>
#include <functional>

#include "test_util.h"

namespace msa::test {
namespace {

enum class Call { sparse_fwd, dense_fwd, sparse_bwd, dense_bwd };
constexpr Call kAll[] = {Call::sparse_fwd, Call::dense_fwd, Call::sparse_bwd, Call::dense_bwd};
constexpr Call kSparse[] = {Call::sparse_fwd, Call::sparse_bwd};
constexpr Call kBwd[] = {Call::sparse_bwd, Call::dense_bwd};

const char* name(Call c) {
  switch (c) {
    case Call::sparse_fwd:
      return "msa::sparse_attention_forward: ";
    case Call::dense_fwd:
      return "msa::dense_attention_forward: ";
    case Call::sparse_bwd:
      return "msa::sparse_attention_backward: ";
    case Call::dense_bwd:
      return "msa::dense_attention_backward: ";
  }
  return "";
}
bool is_sparse(Call c) { return c == Call::sparse_fwd || c == Call::sparse_bwd; }
bool is_bwd(Call c) { return c == Call::sparse_bwd || c == Call::dense_bwd; }

void call(Call c, const AttentionBwdParams& p, const Exec& ex) {
  switch (c) {
    case Call::sparse_fwd:
      sparse_attention_forward(p, ex);
      break;
    case Call::dense_fwd:
      dense_attention_forward(p, ex);
      break;
    case Call::sparse_bwd:
      sparse_attention_backward(p, ex);
      break;
    case Call::dense_bwd:
      dense_attention_backward(p, ex);
      break;
  }
}

// A valid problem: two sequences of 12 and 8 tokens, h_q = 4, h_kv = 2, d = 8, bk = 8, topk = 2
// selecting every visible block. Outputs (o, lse for the forward; dq, dk, dv for the backward)
// start as NaN so any write shows; the backward reads finite o and lse from separate buffers, so
// its outputs would come out finite.
struct Fixture {
  static constexpr int64_t n = 20, h_q = 4, h_kv = 2, d = 8, bk = 8, topk = 2;
  std::mt19937_64 rng{1};
  std::vector<int32_t> cu = {0, 12, 20}, idx;
  Buf q{DType::f32, randn(rng, n*h_q*d)}, k{DType::f32, randn(rng, n*h_kv*d)}, v{DType::f32, randn(rng, n*h_kv*d)},
      dout{DType::f32, randn(rng, n*h_q*d)}, o_in{DType::f32, randn(rng, n*h_q*d)};
  Buf o{DType::f32, size_t(n*h_q*d)}, dq{DType::f32, size_t(n*h_q*d)}, dk{DType::f32, size_t(n*h_kv*d)},
      dv{DType::f32, size_t(n*h_kv*d)};
  std::vector<float> lse = std::vector<float>(n * h_q, std::nanf(""));
  std::vector<float> lse_in = std::vector<float>(n * h_q, 2.f);

  Fixture() {
    for (Buf* b : {&o, &dq, &dk, &dv}) b->poison();
    idx.assign(n * h_kv * topk, -1);
    for (int64_t i = 0; i < n; ++i) {
      int64_t pos = i < 12 ? i : i - 12;
      for (int64_t r = 0; r < h_kv; ++r)
        for (int64_t b = 0; b <= pos / bk; ++b) idx[(i * h_kv + r) * topk + b] = int32_t(b);
    }
  }

  AttentionBwdParams params(Call c) {
    AttentionBwdParams p;
    p.seq.n_q = p.seq.n_k = n;
    p.seq.batch = 2;
    p.seq.cu_seqlens_q = p.seq.cu_seqlens_k = cu.data();
    p.h_q = h_q;
    p.h_kv = h_kv;
    p.d = d;
    p.dtype = DType::f32;
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.o = is_bwd(c) ? o_in.data() : o.data();
    p.lse = is_bwd(c) ? lse_in.data() : lse.data();
    if (is_sparse(c)) {
      p.topk_idx = idx.data();
      p.topk = topk;
      p.bk = bk;
    }
    p.do_ = dout.data();
    p.dq = dq.data();
    p.dk = dk.data();
    p.dv = dv.data();
    return p;
  }

  bool all_nan(const Buf& b) const {
    for (size_t x = 0; x < b.size(); ++x)
      if (!std::isnan(b.get(x))) return false;
    return true;
  }
  bool outputs_untouched() const {
    for (float x : lse)
      if (!std::isnan(x)) return false;
    return all_nan(o) && all_nan(dq) && all_nan(dk) && all_nan(dv);
  }
};

using Mutation = std::function<void(AttentionBwdParams&, Exec&, Fixture&)>;

// For each call: a fresh valid problem, one mutation, then the call must throw msa::Error whose
// message names the call and contains every fragment, leaving every output untouched.
template <size_t N>
void expect_rejected(const Call (&calls)[N], const Mutation& mutate, std::vector<std::string> fragments) {
  for (Call c : calls) {
    Fixture f;
    AttentionBwdParams p = f.params(c);
    Exec ex;
    mutate(p, ex, f);
    try {
      call(c, p, ex);
      ADD_FAILURE() << name(c) << "did not throw; expected \"" << fragments[0] << "\"";
    } catch (const Error& e) {
      std::string m = e.what();
      EXPECT_EQ(m.rfind(name(c), 0), 0u) << "message \"" << m << "\" does not start with \"" << name(c) << "\"";
      for (const std::string& frag : fragments)
        EXPECT_NE(m.find(frag), std::string::npos) << "message \"" << m << "\" lacks \"" << frag << "\"";
    } catch (const std::exception& e) {
      ADD_FAILURE() << name(c) << "threw a non-msa exception: " << e.what();
    }
    EXPECT_TRUE(f.outputs_untouched()) << name(c) << "wrote an output before rejecting \"" << fragments[0] << "\"";
  }
}

TEST(AttentionValidation, ValidProblemIsAccepted) {
  // The fixture itself must pass, or every rejection below would prove nothing.
  for (Call c : kAll) {
    Fixture f;
    EXPECT_NO_THROW(call(c, f.params(c), Exec{})) << name(c);
  }
}

TEST(AttentionValidation, Heads) {
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.h_q = 6, p.h_kv = 4; },
                  {"h_q = 6, expected a multiple of h_kv = 4"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.h_kv = 0; }, {"h_kv = 0"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.h_q = 0; }, {"h_q = 0"});
}

TEST(AttentionValidation, HeadDim) {
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.d = 0; }, {"d = 0, expected 1 <= d <= 512"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.d = 513; }, {"d = 513"});
}

TEST(AttentionValidation, Scale) {
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.scale = -0.5f; }, {"scale = -0.5", "finite positive"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.scale = std::nanf(""); }, {"scale = nan"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.scale = INFINITY; }, {"scale = inf"});
}

TEST(AttentionValidation, DtypeBackendThreads) {
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.dtype = DType(7); }, {"dtype = 7"});
  expect_rejected(kAll, [](auto&, auto& ex, auto&) { ex.num_threads = -1; }, {"num_threads = -1"});
  expect_rejected(kAll, [](auto&, auto& ex, auto&) { ex.backend = Backend(5); }, {"backend = 5"});
  if (!cuda_compiled())
    expect_rejected(kAll, [](auto&, auto& ex, auto&) { ex.backend = Backend::cuda; },
                    {"backend = cuda", "no CUDA backend"});
  else
    // A CUDA build rejects float64 on the GPU, or the operation while it has no kernel.
    expect_rejected(kAll, [](auto& p, auto& ex, auto&) { ex.backend = Backend::cuda, p.dtype = DType::f64; }, {"cuda"});
}

TEST(AttentionValidation, NullPointers) {
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.q = nullptr; }, {"q is null"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.k = nullptr; }, {"k is null"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.v = nullptr; }, {"v is null"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.o = nullptr; }, {"o is null"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.lse = nullptr; }, {"lse is null"});
  expect_rejected(kSparse, [](auto& p, auto&, auto&) { p.topk_idx = nullptr; }, {"topk_idx is null"});
  expect_rejected(kBwd, [](auto& p, auto&, auto&) { p.do_ = nullptr; }, {"do is null"});
  expect_rejected(kBwd, [](auto& p, auto&, auto&) { p.dq = nullptr; }, {"dq is null"});
  expect_rejected(kBwd, [](auto& p, auto&, auto&) { p.dk = nullptr; }, {"dk is null"});
  expect_rejected(kBwd, [](auto& p, auto&, auto&) { p.dv = nullptr; }, {"dv is null"});
}

TEST(AttentionValidation, NegativeStrides) {
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.stride_q_tok = -32; }, {"q strides = (-32, 8)", "positive"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.stride_k_head = -8; }, {"k strides", "positive"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.stride_v_tok = -1; }, {"v strides", "positive"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.stride_o_head = -8; }, {"o strides", "positive"});
  expect_rejected(kBwd, [](auto& p, auto&, auto&) { p.stride_do_tok = -32; }, {"do strides", "positive"});
  expect_rejected(kBwd, [](auto& p, auto&, auto&) { p.stride_dq_tok = -32; }, {"dq strides", "positive"});
  expect_rejected(kBwd, [](auto& p, auto&, auto&) { p.stride_dk_head = -8; }, {"dk strides", "positive"});
  expect_rejected(kBwd, [](auto& p, auto&, auto&) { p.stride_dv_tok = -16; }, {"dv strides", "positive"});
}

TEST(AttentionValidation, OverlappingOutputs) {
  constexpr Call kFwd[] = {Call::sparse_fwd, Call::dense_fwd};
  // Token stride d with 4 heads of stride d: token t+1 head 0 is token t head 1.
  expect_rejected(kFwd, [](auto& p, auto&, auto&) { p.stride_o_tok = 8; }, {"o strides = (8, 8)", "overlap"});
  expect_rejected(kFwd, [](auto& p, auto&, auto&) { p.stride_o_head = 4; }, {"o strides", "overlap"});
  expect_rejected(kBwd, [](auto& p, auto&, auto&) { p.stride_dq_tok = 8; }, {"dq strides", "overlap"});
  expect_rejected(kBwd, [](auto& p, auto&, auto&) { p.stride_dk_tok = 8; }, {"dk strides", "overlap"});
  expect_rejected(kBwd, [](auto& p, auto&, auto&) { p.stride_dv_head = 20 * 8, p.stride_dv_tok = 4; },
                  {"dv strides", "overlap"});
}

TEST(AttentionValidation, OverlappingInputsAreAccepted) {
  // Inputs may alias themselves (every head of k reads the same rows here); only outputs may not.
  for (Call c : kAll) {
    Fixture f;
    AttentionBwdParams p = f.params(c);
    p.stride_k_tok = 8;
    p.stride_k_head = 8;
    if (is_bwd(c)) p.stride_o_tok = 8;  // o is an input of the backward
    EXPECT_NO_THROW(call(c, p, Exec{})) << name(c);
  }
}

TEST(AttentionValidation, TopkAndBlockSize) {
  expect_rejected(kSparse, [](auto& p, auto&, auto&) { p.topk = 0; }, {"topk = 0, expected 1 <= topk <= 32"});
  expect_rejected(kSparse, [](auto& p, auto&, auto&) { p.topk = 33; }, {"topk = 33"});
  expect_rejected(kSparse, [](auto& p, auto&, auto&) { p.bk = 0; }, {"bk = 0"});
  expect_rejected(kSparse, [](auto& p, auto&, auto&) { p.bk = 4097; }, {"bk = 4097"});
}

TEST(AttentionValidation, TopkIdxEntries) {
  // Query row 3 is at position 3 (sees block 0 only); row 10 at position 10 (blocks 0 and 1).
  auto set_row = [](Fixture& f, int64_t i, int64_t r, int32_t a, int32_t b) {
    f.idx[(i * f.h_kv + r) * f.topk] = a;
    f.idx[(i * f.h_kv + r) * f.topk + 1] = b;
  };
  expect_rejected(kSparse, [&](auto&, auto&, auto& f) { set_row(f, 3, 0, 1, -1); },
                  {"topk_idx[3, 0, 0] = 1", "visible block 0 <= b <= 0"});
  expect_rejected(kSparse, [&](auto&, auto&, auto& f) { set_row(f, 3, 1, 0, -2); },
                  {"topk_idx[3, 1, 1] = -2", "expected -1 or a visible block"});
  expect_rejected(kSparse, [&](auto&, auto&, auto& f) { set_row(f, 19, 0, 1000, -1); }, {"topk_idx[19, 0, 0] = 1000"});
  // Row 12 is position 0 of the second sequence: block 1 exists in the packed layout but not there.
  expect_rejected(kSparse, [&](auto&, auto&, auto& f) { set_row(f, 12, 0, 1, -1); },
                  {"topk_idx[12, 0, 0] = 1", "(query position 0)"});
  expect_rejected(kSparse, [&](auto&, auto&, auto& f) { set_row(f, 10, 1, 1, 1); },
                  {"topk_idx[10, 1, 1] = 1", "no duplicate"});
  expect_rejected(kSparse, [&](auto&, auto&, auto& f) { set_row(f, 10, 0, -1, 0); },
                  {"topk_idx[10, 0, 1] = 0", "padding must be a tail"});
}

TEST(AttentionValidation, TopkIdxForDense) {
  constexpr Call kDense[] = {Call::dense_fwd, Call::dense_bwd};
  expect_rejected(kDense, [](auto& p, auto&, auto& f) { p.topk_idx = f.idx.data(), p.topk = 2; },
                  {"topk_idx is set, expected nullptr"});
}

TEST(AttentionValidation, CuSeqlens) {
  static std::vector<int32_t> bad;
  expect_rejected(kAll,
                  [](auto& p, auto&, auto&) {
                    bad = {1, 12, 20}, p.seq.cu_seqlens_q = bad.data();
                  },
                  {"seq.cu_seqlens_q[0] = 1, expected 0"});
  expect_rejected(kAll,
                  [](auto& p, auto&, auto&) {
                    bad = {0, 21, 20}, p.seq.cu_seqlens_k = bad.data();
                  },
                  {"seq.cu_seqlens_k[2] = 20 < seq.cu_seqlens_k[1] = 21", "non-decreasing"});
  expect_rejected(kAll,
                  [](auto& p, auto&, auto&) {
                    bad = {0, 12, 19}, p.seq.cu_seqlens_q = bad.data();
                  },
                  {"seq.cu_seqlens_q[2] = 19, expected the token count 20"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.seq.cu_seqlens_q = nullptr; },
                  {"seq.cu_seqlens_q is null with batch = 2"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.seq.cu_seqlens_k = nullptr, p.seq.n_k = 21; },
                  {"seq.cu_seqlens_k is null with n_k = 21 != n_q = 20"});
  expect_rejected(kAll,
                  [](auto& p, auto&, auto&) {
                    bad = {0, 6, 20}, p.seq.cu_seqlens_k = bad.data();
                  },
                  {"sequence 0 has 12 queries but 6 keys"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.seq.batch = 0; }, {"seq.batch = 0"});
  expect_rejected(kAll, [](auto& p, auto&, auto&) { p.seq.n_q = -1; }, {"seq.n_q = -1"});
}

TEST(AttentionValidation, QueryPositions) {
  static std::vector<int32_t> pos;
  auto with = [](int64_t row, int32_t value) {
    return [row, value](AttentionBwdParams& p, Exec&, Fixture&) {
      pos.resize(20);
      for (int32_t i = 0; i < 20; ++i) pos[i] = i < 12 ? i : i - 12;
      pos[row] = value;
      p.seq.q_pos = pos.data();
    };
  };
  expect_rejected(kAll, with(3, -1), {"seq.q_pos[3] = -1, expected 0 <= q_pos < 12"});
  expect_rejected(kAll, with(15, 8), {"seq.q_pos[15] = 8, expected 0 <= q_pos < 8", "sequence 1"});
}

// n_q = n_k = 0: every call returns without touching its (poisoned) outputs, with or without
// pointers.
TEST(AttentionValidation, EmptyProblemIsNoOp) {
  for (Call c : kAll) {
    Fixture f;
    AttentionBwdParams p = f.params(c);
    p.seq = Varlen{};
    EXPECT_NO_THROW(call(c, p, Exec{})) << name(c);
    EXPECT_TRUE(f.outputs_untouched()) << name(c);
    AttentionBwdParams bare;
    bare.h_q = 4;
    bare.h_kv = 2;
    bare.d = 8;
    bare.dtype = DType::f32;
    if (is_sparse(c)) bare.topk = 2;
    EXPECT_NO_THROW(call(c, bare, Exec{})) << name(c) << " with null pointers";
  }
}

// Keys without queries: a backward with n_q = 0 (and null query-side pointers) zeroes dk and dv;
// a forward is a no-op.
TEST(AttentionValidation, NoQueriesZeroesKeyGradients) {
  std::vector<int32_t> cu_q = {0, 0, 0}, cu_k = {0, 12, 20};
  for (Call c : kAll) {
    Fixture f;
    AttentionBwdParams p = f.params(c);
    p.seq.n_q = 0;
    p.seq.cu_seqlens_q = cu_q.data();
    p.seq.cu_seqlens_k = cu_k.data();
    p.q = nullptr;
    p.o = nullptr;
    p.lse = nullptr;
    p.do_ = nullptr;
    p.dq = nullptr;
    if (is_sparse(c)) p.topk_idx = nullptr;
    ASSERT_NO_THROW(call(c, p, Exec{})) << name(c);
    if (is_bwd(c)) {
      for (size_t x = 0; x < f.dk.size(); ++x) {
        ASSERT_EQ(f.dk.get(x), 0.0) << name(c) << "dk[" << x << "]";
        ASSERT_EQ(f.dv.get(x), 0.0) << name(c) << "dv[" << x << "]";
      }
    } else {
      EXPECT_TRUE(f.outputs_untouched()) << name(c);
    }
  }
}

// A sequence without queries inside a batch: its keys get zero dk and dv, the others real values.
TEST(AttentionValidation, SequenceWithoutQueriesGetsZeroKeyGradients) {
  std::vector<int32_t> cu_q = {0, 0, 8}, cu_k = {0, 12, 20};
  for (Call c : kBwd) {
    Fixture f;
    AttentionBwdParams p = f.params(c);
    p.seq.n_q = 8;
    p.seq.cu_seqlens_q = cu_q.data();
    p.seq.cu_seqlens_k = cu_k.data();
    // Queries 0..7 sit at positions 0..7 of the second sequence: row i + 12 of the fixture's selection.
    std::vector<int32_t> idx(f.idx.begin() + 12 * f.h_kv * f.topk, f.idx.end());
    if (is_sparse(c)) p.topk_idx = idx.data();
    std::vector<float> lse(8 * f.h_q, 0.f);  // any finite lse: this test is about which rows are written
    p.lse = lse.data();
    Buf o(DType::f32, randn(f.rng, 8 * f.h_q * f.d));
    p.o = o.data();
    ASSERT_NO_THROW(call(c, p, Exec{})) << name(c);
    for (int64_t x = 0; x < 12 * f.h_kv * f.d; ++x) {
      ASSERT_EQ(f.dk.get(x), 0.0) << name(c) << "dk[" << x << "]";
      ASSERT_EQ(f.dv.get(x), 0.0) << name(c) << "dv[" << x << "]";
    }
    for (int64_t x = 12 * f.h_kv * f.d; x < 20 * f.h_kv * f.d; ++x) {
      ASSERT_TRUE(std::isfinite(f.dk.get(x))) << name(c) << "dk[" << x << "]";
      ASSERT_TRUE(std::isfinite(f.dv.get(x))) << name(c) << "dv[" << x << "]";
    }
    EXPECT_GT(std::abs(f.dv.get(12 * f.h_kv * f.d)), 0.0) << "key 0 of the second sequence is attended";
  }
}

}  // namespace
}  // namespace msa::test
