// Tests of argument validation for index_topk, block_topk, index_block_count and
// selection_recall: each bad input throws msa::Error naming the function and the argument, and
// leaves the outputs untouched; empty inputs are no-ops.
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "test_util.h"

namespace msa::test {
namespace {

constexpr int32_t kPoisonIdx = -777;
constexpr float kPoison = 12345.f;

bool all_equal(const std::vector<int32_t>& v, int32_t x) {
  return std::all_of(v.begin(), v.end(), [&](int32_t y) { return y == x; });
}
bool all_equal(const std::vector<float>& v, float x) {
  return std::all_of(v.begin(), v.end(), [&](float y) { return y == x; });
}

// A valid index_topk call (10 tokens, h_kv 2, d_idx 8, bk 4, topk 2) whose fields the cases
// break one at a time.
struct IndexCall {
  std::vector<float> q, k;
  std::vector<int32_t> cu_q = {0, 10}, cu_k = {0, 10}, q_pos;
  std::vector<int32_t> topk_idx = std::vector<int32_t>(40, kPoisonIdx);  // [10, 2, 2]
  std::vector<float> block_scores = std::vector<float>(60, kPoison), lse = std::vector<float>(20, kPoison);
  IndexTopkParams p;
  Exec ex;
  IndexCall() {
    std::mt19937_64 rng(1);
    std::vector<double> qd = randn(rng, 10 * 2 * 8), kd = randn(rng, 10 * 8);
    q.assign(qd.begin(), qd.end());
    k.assign(kd.begin(), kd.end());
    p.seq.n_q = p.seq.n_k = 10;
    p.h_kv = 2;
    p.d_idx = 8;
    p.bk = 4;
    p.topk = 2;
    p.dtype = DType::f32;
    p.q_idx = q.data();
    p.k_idx = k.data();
    p.topk_idx = topk_idx.data();
    p.block_scores = block_scores.data();
    p.n_blocks = 3;
    p.index_lse = lse.data();
  }
  bool untouched() const {
    return all_equal(topk_idx, kPoisonIdx) && all_equal(block_scores, kPoison) && all_equal(lse, kPoison);
  }
};

// Applies one change to a fresh valid call, expects the error, and checks nothing was written.
void expect_index_error(const std::function<void(IndexCall&)>& change, std::initializer_list<const char*> frags) {
  IndexCall c;
  change(c);
  EXPECT_TRUE(throws_error([&] { index_topk(c.p, c.ex); }, frags));
  EXPECT_TRUE(c.untouched()) << "an output was written by a call that failed validation";
}

TEST(ValidationIndexTopk, BaselineIsValid) {
  IndexCall c;
  index_topk(c.p, c.ex);
  EXPECT_FALSE(all_equal(c.topk_idx, kPoisonIdx));
  for (int32_t b : c.topk_idx) EXPECT_NE(b, kPoisonIdx);
  for (float x : c.lse) EXPECT_NE(x, kPoison);
}

TEST(ValidationIndexTopk, Sizes) {
  expect_index_error([](IndexCall& c) { c.p.topk = 0; }, {"msa::index_topk", "topk = 0, expected 1 <= topk <= 32"});
  expect_index_error([](IndexCall& c) { c.p.topk = 33; }, {"msa::index_topk", "topk = 33"});
  expect_index_error([](IndexCall& c) { c.p.d_idx = 0; }, {"msa::index_topk", "d_idx = 0"});
  expect_index_error([](IndexCall& c) { c.p.d_idx = 513; }, {"msa::index_topk", "d_idx = 513"});
  expect_index_error([](IndexCall& c) { c.p.bk = 0; }, {"msa::index_topk", "bk = 0"});
  expect_index_error([](IndexCall& c) { c.p.bk = -4; }, {"msa::index_topk", "bk = -4"});
  expect_index_error([](IndexCall& c) { c.p.bk = 4097; }, {"msa::index_topk", "bk = 4097"});
  expect_index_error([](IndexCall& c) { c.p.h_kv = 0; }, {"msa::index_topk", "h_kv = 0"});
  expect_index_error([](IndexCall& c) { c.p.index_scale = -1.f; }, {"msa::index_topk", "index_scale = -1"});
  expect_index_error([](IndexCall& c) { c.p.index_scale = std::nanf(""); }, {"msa::index_topk", "index_scale"});
  expect_index_error([](IndexCall& c) { c.p.index_scale = std::numeric_limits<float>::infinity(); },
                     {"msa::index_topk", "index_scale"});
  expect_index_error([](IndexCall& c) { c.p.n_blocks = 2; },
                     {"msa::index_topk", "n_blocks = 2, expected >= 3", "block_scores"});
}

TEST(ValidationIndexTopk, DtypeAndBackend) {
  expect_index_error([](IndexCall& c) { c.p.dtype = DType(7); }, {"msa::index_topk", "dtype = 7"});
  expect_index_error([](IndexCall& c) { c.ex.num_threads = -1; }, {"msa::index_topk", "num_threads = -1"});
  expect_index_error([](IndexCall& c) { c.ex.backend = Backend(5); }, {"msa::index_topk", "backend = 5"});
  if (!cuda_compiled()) {
    expect_index_error([](IndexCall& c) { c.ex.backend = Backend::cuda; },
                       {"msa::index_topk", "backend = cuda", "no CUDA backend"});
    return;
  }
  // A CUDA build rejects on the host, before any launch, what its kernels cannot take (the call's
  // pointers are host memory here, so reaching a launch would be a bug of its own).
  expect_index_error([](IndexCall& c) { c.ex.backend = Backend::cuda; },
                     {"msa::index_topk", "dtype = float32, expected bfloat16 on the cuda backend"});
  expect_index_error(
      [](IndexCall& c) {
        c.ex.backend = Backend::cuda;
        c.p.dtype = DType::bf16;
        c.p.d_idx = 96;
      },
      {"msa::index_topk", "d_idx = 96, expected one of {64, 128}"});
  expect_index_error(
      [](IndexCall& c) {
        c.ex.backend = Backend::cuda;
        c.p.dtype = DType::bf16;
        c.p.d_idx = 64;
        c.p.bk = 32;
      },
      {"msa::index_topk", "bk = 32, expected one of {64, 128}"});
}

TEST(ValidationIndexTopk, PointersAndStrides) {
  expect_index_error([](IndexCall& c) { c.p.q_idx = nullptr; }, {"msa::index_topk", "q_idx is null"});
  expect_index_error([](IndexCall& c) { c.p.k_idx = nullptr; }, {"msa::index_topk", "k_idx is null"});
  expect_index_error([](IndexCall& c) { c.p.topk_idx = nullptr; }, {"msa::index_topk", "topk_idx is null"});
  expect_index_error([](IndexCall& c) { c.p.stride_q_idx_tok = -16; }, {"msa::index_topk", "q_idx strides = (-16"});
  expect_index_error([](IndexCall& c) { c.p.stride_q_idx_head = -8; }, {"msa::index_topk", "q_idx strides", "-8)"});
  expect_index_error([](IndexCall& c) { c.p.stride_k_idx_tok = -8; }, {"msa::index_topk", "k_idx strides = (-8"});
  // Inputs may overlap themselves (e.g. every head reading the same row); only outputs may not,
  // and the outputs of index_topk are contiguous by contract.
  IndexCall c;
  c.p.stride_q_idx_head = 1;
  c.p.stride_q_idx_tok = 8;
  EXPECT_NO_THROW(index_topk(c.p, c.ex));
}

TEST(ValidationIndexTopk, Varlen) {
  expect_index_error([](IndexCall& c) { c.p.seq.n_q = -1; }, {"msa::index_topk", "seq.n_q = -1"});
  expect_index_error([](IndexCall& c) { c.p.seq.batch = 0; }, {"msa::index_topk", "seq.batch = 0"});
  expect_index_error([](IndexCall& c) { c.p.seq.batch = 2; },
                     {"msa::index_topk", "seq.cu_seqlens_q is null with batch = 2"});
  expect_index_error([](IndexCall& c) { c.p.seq.n_k = 12; },
                     {"msa::index_topk", "seq.cu_seqlens_k is null with n_k = 12 != n_q = 10"});
  expect_index_error(
      [](IndexCall& c) {
        c.cu_q = {1, 10};
        c.p.seq.cu_seqlens_q = c.cu_q.data();
      },
      {"msa::index_topk", "seq.cu_seqlens_q[0] = 1, expected 0"});
  expect_index_error(
      [](IndexCall& c) {
        c.cu_q = {0, 6, 4, 10};
        c.p.seq.batch = 3;
        c.p.seq.cu_seqlens_q = c.cu_q.data();
      },
      {"msa::index_topk", "seq.cu_seqlens_q[2] = 4 < seq.cu_seqlens_q[1] = 6"});
  expect_index_error(
      [](IndexCall& c) {
        c.cu_q = {0, 9};
        c.p.seq.cu_seqlens_q = c.cu_q.data();
      },
      {"msa::index_topk", "seq.cu_seqlens_q[1] = 9, expected the token count 10"});
  expect_index_error(
      [](IndexCall& c) {
        c.cu_k = {2, 10};
        c.p.seq.cu_seqlens_k = c.cu_k.data();
      },
      {"msa::index_topk", "seq.cu_seqlens_k[0] = 2, expected 0"});
  expect_index_error(
      [](IndexCall& c) {
        c.cu_q = {0, 5, 10};
        c.cu_k = {0, 7, 6};
        c.p.seq.batch = 2;
        c.p.seq.n_k = 6;
        c.p.seq.cu_seqlens_q = c.cu_q.data();
        c.p.seq.cu_seqlens_k = c.cu_k.data();
      },
      {"msa::index_topk", "seq.cu_seqlens_k[2] = 6 < seq.cu_seqlens_k[1] = 7"});
  expect_index_error(
      [](IndexCall& c) {
        c.cu_k = {0, 11};
        c.p.seq.cu_seqlens_k = c.cu_k.data();
      },
      {"msa::index_topk", "seq.cu_seqlens_k[1] = 11, expected the token count 10"});
  // More queries than keys without explicit positions.
  expect_index_error(
      [](IndexCall& c) {
        c.cu_k = {0, 6};
        c.p.seq.n_k = 6;
        c.p.seq.cu_seqlens_k = c.cu_k.data();
      },
      {"msa::index_topk", "sequence 0 has 10 queries but 6 keys"});
  for (int32_t bad : {-1, 10}) {
    expect_index_error(
        [&](IndexCall& c) {
          c.q_pos = {0, 1, 2, bad, 4, 5, 6, 7, 8, 9};
          c.p.seq.q_pos = c.q_pos.data();
        },
        {"msa::index_topk", ("seq.q_pos[3] = " + std::to_string(bad)).c_str(), "expected 0 <= q_pos < 10"});
  }
}

TEST(ValidationIndexTopk, EmptyIsNoOp) {
  // No queries: nothing is read (null inputs are fine) and nothing is written.
  IndexCall c;
  c.p.seq.n_q = c.p.seq.n_k = 0;
  c.cu_q = c.cu_k = {0, 0};
  c.p.q_idx = c.p.k_idx = nullptr;
  EXPECT_NO_THROW(index_topk(c.p, c.ex));
  EXPECT_TRUE(c.untouched());
  // No queries but keys (a chunk with nothing to do).
  IndexCall d;
  d.cu_q = {0, 0};
  d.p.seq.n_q = 0;
  d.p.seq.cu_seqlens_q = d.cu_q.data();
  d.p.seq.cu_seqlens_k = d.cu_k.data();
  d.p.q_idx = nullptr;
  d.p.topk_idx = nullptr;
  EXPECT_NO_THROW(index_topk(d.p, d.ex));
  EXPECT_TRUE(d.untouched());
}

// A valid block_topk call: 5 rows of 6 columns, topk 2.
struct BlockCall {
  std::vector<float> scores;
  std::vector<int32_t> row_blocks = {6, 0, 3, 6, 1};
  std::vector<int32_t> topk_idx = std::vector<int32_t>(10, kPoisonIdx);
  BlockTopkParams p;
  Exec ex;
  BlockCall() {
    std::mt19937_64 rng(2);
    std::vector<double> v = randn(rng, 30);
    scores.assign(v.begin(), v.end());
    p.rows = 5;
    p.n_blocks = 6;
    p.topk = 2;
    p.scores = scores.data();
    p.row_blocks = row_blocks.data();
    p.topk_idx = topk_idx.data();
  }
};

void expect_block_error(const std::function<void(BlockCall&)>& change, std::initializer_list<const char*> frags) {
  BlockCall c;
  change(c);
  EXPECT_TRUE(throws_error([&] { block_topk(c.p, c.ex); }, frags));
  EXPECT_TRUE(all_equal(c.topk_idx, kPoisonIdx)) << "an output was written by a call that failed validation";
}

TEST(ValidationBlockTopk, Arguments) {
  BlockCall ok;
  EXPECT_NO_THROW(block_topk(ok.p, ok.ex));
  for (int32_t b : ok.topk_idx) EXPECT_NE(b, kPoisonIdx);

  expect_block_error([](BlockCall& c) { c.p.topk = 0; }, {"msa::block_topk", "topk = 0, expected 1 <= topk <= 32"});
  expect_block_error([](BlockCall& c) { c.p.topk = 33; }, {"msa::block_topk", "topk = 33"});
  expect_block_error([](BlockCall& c) { c.p.rows = -1; }, {"msa::block_topk", "rows = -1"});
  expect_block_error([](BlockCall& c) { c.p.n_blocks = -1; }, {"msa::block_topk", "n_blocks = -1"});
  expect_block_error([](BlockCall& c) { c.p.stride_row = -6; }, {"msa::block_topk", "scores strides = (-6"});
  expect_block_error([](BlockCall& c) { c.p.scores = nullptr; }, {"msa::block_topk", "scores is null"});
  expect_block_error([](BlockCall& c) { c.p.topk_idx = nullptr; }, {"msa::block_topk", "topk_idx is null"});
  expect_block_error([](BlockCall& c) { c.row_blocks[2] = -1; },
                     {"msa::block_topk", "row_blocks[2] = -1", "row_blocks <= n_blocks = 6"});
  expect_block_error([](BlockCall& c) { c.row_blocks[4] = 7; }, {"msa::block_topk", "row_blocks[4] = 7"});
  expect_block_error([](BlockCall& c) { c.ex.num_threads = -2; }, {"msa::block_topk", "num_threads = -2"});
  if (cuda_compiled()) GTEST_SKIP() << "the cuda-backend message depends on which kernels this build has";
  expect_block_error([](BlockCall& c) { c.ex.backend = Backend::cuda; },
                     {"msa::block_topk", "backend = cuda", "no CUDA backend"});
}

TEST(ValidationBlockTopk, EmptyIsNoOp) {
  BlockCall c;
  c.p.rows = 0;
  c.p.scores = nullptr;
  c.p.row_blocks = nullptr;
  EXPECT_NO_THROW(block_topk(c.p, c.ex));
  EXPECT_TRUE(all_equal(c.topk_idx, kPoisonIdx));
  // Rows without columns are not empty: they select nothing, written as -1.
  BlockCall d;
  d.p.n_blocks = 0;
  d.p.stride_row = 1;
  d.p.scores = nullptr;
  d.p.row_blocks = nullptr;
  EXPECT_NO_THROW(block_topk(d.p, d.ex));
  EXPECT_TRUE(all_equal(d.topk_idx, -1));
}

TEST(ValidationIndexBlockCount, ArgumentsAndValues) {
  Varlen seq;
  seq.n_q = seq.n_k = 10;
  EXPECT_EQ(index_block_count(seq, 4), 3);
  EXPECT_EQ(index_block_count(seq, 10), 1);
  EXPECT_TRUE(throws_error([&] { index_block_count(seq, 0); }, {"msa::index_block_count", "bk = 0"}));
  std::vector<int32_t> cu_q = {0, 1, 3}, cu_k = {0, 300, 305};
  Varlen v;
  v.n_q = 3;
  v.n_k = 305;
  v.batch = 2;
  v.cu_seqlens_q = cu_q.data();
  v.cu_seqlens_k = cu_k.data();
  EXPECT_EQ(index_block_count(v, 128), 3);
  cu_k = {1, 300, 305};
  EXPECT_TRUE(throws_error([&] { index_block_count(v, 128); },
                           {"msa::index_block_count", "seq.cu_seqlens_k[0] = 1, expected 0"}));
  v.cu_seqlens_q = nullptr;
  EXPECT_TRUE(throws_error([&] { index_block_count(v, 128); },
                           {"msa::index_block_count", "seq.cu_seqlens_q is null with batch = 2"}));
  Varlen empty;
  EXPECT_EQ(index_block_count(empty, 128), 0);
}

// A valid selection_recall call: 10 tokens, h_q 4, h_kv 2, d 8, bk 4, topk 2, selecting the own
// block of every row.
struct RecallCall {
  std::vector<float> q, k;
  std::vector<int32_t> cu = {0, 10}, q_pos;
  std::vector<int32_t> topk_idx;
  std::vector<float> block_rows = std::vector<float>(20, kPoison), score_rows = std::vector<float>(20, kPoison);
  SelectionRecallParams p;
  Exec ex;
  RecallCall() {
    std::mt19937_64 rng(3);
    std::vector<double> qd = randn(rng, 10 * 4 * 8), kd = randn(rng, 10 * 2 * 8);
    q.assign(qd.begin(), qd.end());
    k.assign(kd.begin(), kd.end());
    for (int32_t i = 0; i < 10; ++i)
      for (int r = 0; r < 2; ++r) {
        topk_idx.push_back(i / 4);
        topk_idx.push_back(-1);
      }
    p.seq.n_q = p.seq.n_k = 10;
    p.h_q = 4;
    p.h_kv = 2;
    p.d = 8;
    p.bk = 4;
    p.topk = 2;
    p.dtype = DType::f32;
    p.q = q.data();
    p.k = k.data();
    p.topk_idx = topk_idx.data();
    p.block_recall_rows = block_rows.data();
    p.score_recall_rows = score_rows.data();
  }
  // Entry t of row (i, r).
  int32_t& sel(int i, int r, int t) { return topk_idx[(i * 2 + r) * 2 + t]; }
};

void expect_recall_error(const std::function<void(RecallCall&)>& change, std::initializer_list<const char*> frags) {
  RecallCall c;
  change(c);
  EXPECT_TRUE(throws_error([&] { selection_recall(c.p, c.ex); }, frags));
  EXPECT_TRUE(all_equal(c.block_rows, kPoison) && all_equal(c.score_rows, kPoison))
      << "an output was written by a call that failed validation";
}

TEST(ValidationSelectionRecall, Arguments) {
  RecallCall ok;
  EXPECT_NO_THROW(selection_recall(ok.p, ok.ex));
  for (float x : ok.block_rows) EXPECT_NE(x, kPoison);

  const char* fn = "msa::selection_recall";
  expect_recall_error([](RecallCall& c) { c.p.topk = 0; }, {fn, "topk = 0, expected 1 <= topk <= 32"});
  expect_recall_error([](RecallCall& c) { c.p.topk = 33; }, {fn, "topk = 33"});
  expect_recall_error([](RecallCall& c) { c.p.d = 0; }, {fn, "d = 0"});
  expect_recall_error([](RecallCall& c) { c.p.d = 513; }, {fn, "d = 513"});
  expect_recall_error([](RecallCall& c) { c.p.bk = 0; }, {fn, "bk = 0"});
  expect_recall_error([](RecallCall& c) { c.p.h_kv = 0; }, {fn, "h_kv = 0"});
  expect_recall_error([](RecallCall& c) { c.p.h_q = 3; }, {fn, "h_q = 3, expected a multiple of h_kv = 2"});
  expect_recall_error([](RecallCall& c) { c.p.scale = -0.5f; }, {fn, "scale = -0.5"});
  expect_recall_error([](RecallCall& c) { c.p.dtype = DType(9); }, {fn, "dtype = 9"});
  expect_recall_error([](RecallCall& c) { c.ex.num_threads = -1; }, {fn, "num_threads = -1"});
  expect_recall_error([](RecallCall& c) { c.p.q = nullptr; }, {fn, "q is null"});
  expect_recall_error([](RecallCall& c) { c.p.k = nullptr; }, {fn, "k is null"});
  expect_recall_error([](RecallCall& c) { c.p.topk_idx = nullptr; }, {fn, "topk_idx is null"});
  expect_recall_error([](RecallCall& c) { c.p.stride_q_tok = -32; }, {fn, "q strides = (-32"});
  expect_recall_error([](RecallCall& c) { c.p.stride_k_head = -8; }, {fn, "k strides", "-8)"});
  expect_recall_error([](RecallCall& c) { c.p.seq.batch = 3; }, {fn, "seq.cu_seqlens_q is null with batch = 3"});
  expect_recall_error([](RecallCall& c) { c.p.seq.n_k = 11; }, {fn, "seq.cu_seqlens_k is null with n_k = 11"});
  expect_recall_error(
      [](RecallCall& c) {
        c.q_pos = {0, 1, 2, 3, 4, 5, 6, 7, 8, 10};
        c.p.seq.q_pos = c.q_pos.data();
      },
      {fn, "seq.q_pos[9] = 10"});
  if (!cuda_compiled()) {
    expect_recall_error([](RecallCall& c) { c.ex.backend = Backend::cuda; }, {fn, "backend = cuda", "no CUDA backend"});
    return;
  }
  // A CUDA build rejects on the host, before any launch, what its kernels cannot take (the call's
  // pointers are host memory here, so reaching a launch would be a bug of its own).
  expect_recall_error([](RecallCall& c) { c.ex.backend = Backend::cuda; },
                      {fn, "dtype = float32, expected bfloat16 on the cuda backend"});
  expect_recall_error(
      [](RecallCall& c) {
        c.ex.backend = Backend::cuda;
        c.p.dtype = DType::bf16;
      },
      {fn, "d = 8, expected one of {64, 128}"});
  expect_recall_error(
      [](RecallCall& c) {
        c.ex.backend = Backend::cuda;
        c.p.dtype = DType::bf16;
        c.p.d = 64;
        c.p.h_q = 6;
      },
      {fn, "h_q / h_kv = 3, expected one of {1, 2, 4, 8, 16}"});
}

TEST(ValidationSelectionRecall, InvalidSelections) {
  const char* fn = "msa::selection_recall";
  // Query 1 (position 1) sees only block 0; block 2 exists in the sequence but is invisible.
  expect_recall_error([](RecallCall& c) { c.sel(1, 0, 0) = 2; },
                      {fn, "topk_idx[1, 0, 0] = 2", "expected -1 or a visible block 0 <= b <= 0"});
  expect_recall_error([](RecallCall& c) { c.sel(9, 1, 1) = 3; },
                      {fn, "topk_idx[9, 1, 1] = 3", "expected -1 or a visible block 0 <= b <= 2"});
  expect_recall_error([](RecallCall& c) { c.sel(5, 1, 0) = -2; }, {fn, "topk_idx[5, 1, 0] = -2"});
  expect_recall_error([](RecallCall& c) { c.sel(8, 0, 1) = 2; },
                      {fn, "topk_idx[8, 0, 1] = 2", "expected no duplicate blocks"});
  expect_recall_error(
      [](RecallCall& c) {
        c.sel(6, 1, 0) = -1;
        c.sel(6, 1, 1) = 1;
      },
      {fn, "topk_idx[6, 1, 1] = 1", "padding must be a tail"});
  // Order within a row is free, and the own block may be missing: both are valid selections.
  RecallCall c;
  c.sel(9, 0, 0) = 2;
  c.sel(9, 0, 1) = 0;
  c.sel(9, 1, 0) = 1;
  EXPECT_NO_THROW(selection_recall(c.p, c.ex));
}

TEST(ValidationSelectionRecall, EmptyIsNoOp) {
  RecallCall c;
  c.p.seq.n_q = c.p.seq.n_k = 0;
  c.p.q = c.p.k = nullptr;
  c.p.topk_idx = nullptr;
  SelectionRecall r = selection_recall(c.p, c.ex);
  EXPECT_EQ(r.block_recall, 1.0);
  EXPECT_EQ(r.score_recall, 1.0);
  EXPECT_TRUE(all_equal(c.block_rows, kPoison) && all_equal(c.score_rows, kPoison));
}

}  // namespace
}  // namespace msa::test
