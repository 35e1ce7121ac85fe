// Tests of msa::block_topk on the CUDA backend: every output array equal, element for element, to
// the CPU backend and to an oracle written here (a stable sort by rank), on random rows with ties,
// NaN, +-inf and +-0 planted on purpose, short and clamped row_blocks, strided and misaligned
// rows, long rows, many rows per warp, and 20 bitwise-identical repeats. GPU tests skip with a
// message when no device is visible.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "test_util.h"

namespace msa::test {
namespace {

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

// --- checks that need no GPU --------------------------------------------------------------------

TEST(CudaBlockTopk, ZeroRowsIsNoOp) {
  BlockTopkParams p;
  p.rows = 0;
  p.n_blocks = 1024;
  p.topk = 16;  // scores, row_blocks and topk_idx stay null: nothing may be touched
  Exec ex;
  ex.backend = Backend::cuda;
  if (!cuda_compiled()) {
    EXPECT_TRUE(throws_error([&] { block_topk(p, ex); }, {"msa::block_topk", "CUDA"}));
    return;
  }
  EXPECT_NO_THROW(block_topk(p, ex));
}

TEST(CudaBlockTopk, BadArgumentsThrowBeforeLaunch) {
  REQUIRE_CUDA_BUILD();
  BlockTopkParams p;
  p.rows = 4;
  p.n_blocks = 64;
  p.topk = 33;
  Exec ex;
  ex.backend = Backend::cuda;
  EXPECT_TRUE(throws_error([&] { block_topk(p, ex); }, {"msa::block_topk", "topk = 33"}));
  p.topk = 0;
  EXPECT_TRUE(throws_error([&] { block_topk(p, ex); }, {"topk = 0"}));
  p.topk = 8;  // null scores with rows and columns to read
  EXPECT_TRUE(throws_error([&] { block_topk(p, ex); }, {"scores"}));
}

// --- the oracle ----------------------------------------------------------------------------------

// Larger first, NaN after every number, equal (and NaN against NaN) keep column order under the
// stable sort.
std::vector<int32_t> oracle_row(const float* m, int64_t n_vis, int64_t topk, bool force_last) {
  std::vector<int32_t> out;
  if (n_vis <= topk) {
    for (int32_t b = 0; b < n_vis; ++b) out.push_back(b);
  } else {
    const int64_t n_cand = force_last ? n_vis - 1 : n_vis, n_best = force_last ? topk - 1 : topk;
    std::vector<int32_t> idx(static_cast<size_t>(n_cand));
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) {
      const bool na = std::isnan(m[a]), nb = std::isnan(m[b]);
      if (na || nb) return !na && nb;
      return m[a] > m[b];
    });
    out.assign(idx.begin(), idx.begin() + n_best);
    std::sort(out.begin(), out.end());
    if (force_last) out.push_back(int32_t(n_vis - 1));
  }
  out.resize(size_t(topk), -1);
  return out;
}

struct Case {
  int64_t rows = 0, n_blocks = 0, topk = 16, stride = 0;  // stride: resolved row stride (>= n_blocks)
  int64_t offset = 0;                                     // elements before row 0 (1: misaligned base)
  bool force_last = true;
  std::vector<float> scores;        // [offset + rows * stride]
  std::vector<int32_t> row_blocks;  // empty: all n_blocks; may hold out-of-range values (clamped)
  std::string name;
};

int32_t clamped(const Case& c, int64_t i) {
  if (c.row_blocks.empty()) return int32_t(c.n_blocks);
  return std::min<int32_t>(std::max<int32_t>(c.row_blocks[i], 0), int32_t(c.n_blocks));
}

// Row values: a mix of kinds so one launch takes the fast path on some rows and the exact
// (many-candidates) path on others.
void fill_row(std::mt19937_64& rng, float* m, int64_t n, int kind) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_int_distribution<int> pick(0, 99);
  const float pool[] = {1.5f, -0.f, 0.f, -2.f, 7.f, kInf, -kInf, kNaN};
  switch (kind) {
    case 0:  // plain random
      for (int64_t j = 0; j < n; ++j) m[j] = normal(rng);
      break;
    case 1:  // random with NaN, +-inf, +-0 and repeats of earlier values planted
      for (int64_t j = 0; j < n; ++j) {
        int r = pick(rng);
        m[j] = r < 4 ? kNaN : r < 6 ? kInf : r < 9 ? -kInf : r < 12 ? (r & 1 ? 0.f : -0.f) : normal(rng);
        if (r >= 12 && r < 30 && j > 0) m[j] = m[std::uniform_int_distribution<int64_t>(0, j - 1)(rng)];
      }
      break;
    case 2:  // a handful of distinct values: ties everywhere
      for (int64_t j = 0; j < n; ++j) m[j] = pool[pick(rng) % 8];
      break;
    case 3:  // all equal
      for (int64_t j = 0; j < n; ++j) m[j] = 0.25f;
      break;
    case 4:  // increasing: every later tile beats the selection carried so far
      for (int64_t j = 0; j < n; ++j) m[j] = float(j) * 0.5f - 3.f;
      break;
    case 5:  // decreasing
      for (int64_t j = 0; j < n; ++j) m[j] = 100.f - float(j) * 0.25f;
      break;
    case 6:  // mostly NaN, a few numbers
      for (int64_t j = 0; j < n; ++j) m[j] = pick(rng) < 90 ? kNaN : normal(rng);
      break;
    default:  // mostly -inf (as block_scores hold for invisible blocks), a few numbers
      for (int64_t j = 0; j < n; ++j) m[j] = pick(rng) < 95 ? -kInf : normal(rng);
      break;
  }
}

Case make_case(uint64_t seed, int64_t rows, int64_t n_blocks, int64_t topk, bool force_last, int64_t stride_extra,
               int64_t offset, bool with_row_blocks, bool plain_only = false) {
  std::mt19937_64 rng(seed);
  Case c;
  c.rows = rows;
  c.n_blocks = n_blocks;
  c.topk = topk;
  c.force_last = force_last;
  c.stride = n_blocks + stride_extra;
  c.offset = offset;
  std::ostringstream os;
  os << "rows " << rows << " n_blocks " << n_blocks << " topk " << topk << " force_last " << force_last << " stride "
     << c.stride << " offset " << offset << " row_blocks " << with_row_blocks << " seed " << seed;
  c.name = os.str();
  // Padding and the base offset hold huge values: a kernel reading past a row would pick them.
  c.scores.assign(size_t(offset + rows * c.stride), 3.0e38f);
  std::uniform_int_distribution<int> kind(0, 7);
  for (int64_t i = 0; i < rows; ++i)
    fill_row(rng, c.scores.data() + offset + i * c.stride, n_blocks, plain_only ? 0 : kind(rng));
  if (with_row_blocks) {
    c.row_blocks.resize(size_t(rows));
    const int64_t special[] = {0, 1, topk - 1, topk, topk + 1, n_blocks - 1, n_blocks, n_blocks};
    std::uniform_int_distribution<int> which(0, 11);
    for (int64_t i = 0; i < rows; ++i) {
      int w = which(rng);
      int64_t v = w < 8 ? special[w] : std::uniform_int_distribution<int64_t>(0, n_blocks)(rng);
      c.row_blocks[size_t(i)] = int32_t(std::clamp<int64_t>(v, 0, n_blocks));
      // Columns past the visible ones get +inf on some rows: selecting one is visible at once.
      if (w % 3 == 0)
        for (int64_t j = c.row_blocks[size_t(i)]; j < n_blocks; ++j) c.scores[size_t(offset + i * c.stride + j)] = kInf;
    }
  }
  return c;
}

std::vector<int32_t> run_cpu(const Case& c) {
  std::vector<int32_t> rb(c.row_blocks.size());
  for (size_t i = 0; i < rb.size(); ++i) rb[i] = clamped(c, int64_t(i));  // the CPU backend rejects bad entries
  BlockTopkParams p;
  p.rows = c.rows;
  p.n_blocks = c.n_blocks;
  p.topk = c.topk;
  p.force_last = c.force_last;
  p.scores = c.scores.empty() ? nullptr : c.scores.data() + c.offset;
  p.stride_row = c.stride;
  p.row_blocks = rb.empty() ? nullptr : rb.data();
  std::vector<int32_t> out(size_t(c.rows * c.topk), -777);
  p.topk_idx = out.data();
  block_topk(p);
  return out;
}

std::vector<int32_t> run_oracle(const Case& c) {
  std::vector<int32_t> out;
  for (int64_t i = 0; i < c.rows; ++i) {
    auto r = oracle_row(c.scores.data() + c.offset + i * c.stride, clamped(c, i), c.topk, c.force_last);
    out.insert(out.end(), r.begin(), r.end());
  }
  return out;
}

std::string row_str(const std::vector<int32_t>& v, int64_t i, int64_t topk) {
  std::ostringstream os;
  for (int64_t t = 0; t < topk; ++t) os << (t ? " " : "") << v[size_t(i * topk + t)];
  return os.str();
}

// Exact arrays (ascending, -1 tail, ties by column are part of the contract). On a mismatch the
// first rows are reported with whether the sets differ and the scores of the columns involved.
::testing::AssertionResult same_rows(const Case& c, const std::vector<int32_t>& got, const std::vector<int32_t>& ref,
                                     const char* ref_name) {
  if (got.size() != ref.size()) return ::testing::AssertionFailure() << c.name << ": size mismatch";
  int64_t bad = 0;
  std::ostringstream os;
  for (int64_t i = 0; i < c.rows; ++i) {
    bool eq = std::equal(got.begin() + i * c.topk, got.begin() + (i + 1) * c.topk, ref.begin() + i * c.topk);
    if (eq) continue;
    if (++bad <= 3) {
      std::vector<int32_t> a(got.begin() + i * c.topk, got.begin() + (i + 1) * c.topk);
      std::vector<int32_t> b(ref.begin() + i * c.topk, ref.begin() + (i + 1) * c.topk);
      std::sort(a.begin(), a.end());
      std::sort(b.begin(), b.end());
      os << "\n  row " << i << " (n_vis " << clamped(c, i) << "): gpu [" << row_str(got, i, c.topk) << "] " << ref_name
         << " [" << row_str(ref, i, c.topk) << "]" << (a == b ? " same set, wrong order" : " different sets");
      const float* m = c.scores.data() + c.offset + i * c.stride;
      for (int64_t t = 0; t < c.topk; ++t) {
        int32_t g = got[size_t(i * c.topk + t)], r = ref[size_t(i * c.topk + t)];
        if (g != r) {
          os << "\n    slot " << t << ": got col " << g << " score " << (g >= 0 && g < c.n_blocks ? m[g] : NAN)
             << ", " << ref_name << " col " << r << " score " << (r >= 0 && r < c.n_blocks ? m[r] : NAN);
          break;
        }
      }
    }
  }
  if (bad) return ::testing::AssertionFailure() << c.name << ": " << bad << " of " << c.rows << " rows differ" << os.str();
  return ::testing::AssertionSuccess();
}

// The oracle and the CPU backend agree on the same generated rows (no GPU needed), so a GPU
// mismatch below points at the kernel.
TEST(CudaBlockTopk, OracleAgreesWithCpuBackend) {
  uint64_t seed = 900;
  for (int64_t n : {1, 7, 1023, 4097})
    for (int64_t k : {1, 16, 32})
      for (bool force_last : {false, true}) {
        const Case c = make_case(++seed, 40, n, k, force_last, seed % 3, 0, seed % 2 == 0);
        EXPECT_TRUE(same_rows(c, run_oracle(c), run_cpu(c), "cpu"));
      }
}

#ifdef MSA_WITH_CUDA

std::vector<int32_t> run_gpu(const Case& c, cudaStream_t stream = nullptr) {
  DevBuf<float> d_scores(c.scores);
  DevBuf<int32_t> d_row_blocks(c.row_blocks);
  DevBuf<int32_t> d_out(size_t(c.rows * c.topk));
  d_out.poison(0xab);  // every entry must be written
  BlockTopkParams p;
  p.rows = c.rows;
  p.n_blocks = c.n_blocks;
  p.topk = c.topk;
  p.force_last = c.force_last;
  p.scores = c.scores.empty() ? nullptr : d_scores.ptr + c.offset;
  p.stride_row = c.stride;
  p.row_blocks = c.row_blocks.empty() ? nullptr : d_row_blocks.ptr;
  p.topk_idx = d_out.ptr;
  Exec ex;
  ex.backend = Backend::cuda;
  ex.stream = stream;
  block_topk(p, ex);
  cuda_check(cudaStreamSynchronize(stream), "kernel");
  cuda_check(cudaGetLastError(), "kernel");
  return d_out.get();
}

void check_case(const Case& c, cudaStream_t stream = nullptr) {
  const auto gpu = run_gpu(c, stream);
  const auto oracle = run_oracle(c);
  EXPECT_TRUE(same_rows(c, gpu, oracle, "oracle"));
  EXPECT_TRUE(same_rows(c, gpu, run_cpu(c), "cpu"));
}

TEST(CudaBlockTopk, SweepShapesTopkModes) {
  REQUIRE_GPU();
  const int64_t n_list[] = {1, 7, 128, 1023, 1024, 4097};
  const int64_t k_list[] = {1, 2, 16, 31, 32};
  uint64_t seed = 1000;
  for (int64_t n : n_list)
    for (int64_t k : k_list)
      for (bool force_last : {false, true}) {
        ++seed;
        // Layout varies with the seed: contiguous, odd stride (rows alternate 16-byte alignment),
        // stride a multiple of 4 with slack, and a misaligned base (every row on 4-byte copies).
        const int layout = int(seed % 4);
        const int64_t extra = layout == 1 ? 3 : layout == 2 ? 8 : 0;
        const int64_t offset = layout == 3 ? 1 : 0;
        const int64_t rows = n > 1024 ? 48 : 130;
        SCOPED_TRACE(seed);
        check_case(make_case(seed, rows, n, k, force_last, extra, offset, seed % 2 == 0));
        if (HasFailure()) return;
      }
}

TEST(CudaBlockTopk, SingleRow) {
  REQUIRE_GPU();
  uint64_t seed = 2000;
  for (int64_t n : {1, 16, 17, 1024, 4097})
    for (bool force_last : {false, true}) check_case(make_case(++seed, 1, n, 16, force_last, 0, 0, false));
}

// Far more rows than resident warps: each warp walks many rows, prefetching across short rows
// (nothing to load), long rows and rows of every value kind.
TEST(CudaBlockTopk, ManyRowsPerWarp) {
  REQUIRE_GPU();
  check_case(make_case(3001, 20000, 1024, 16, true, 0, 0, true));
  check_case(make_case(3002, 12000, 1100, 32, false, 5, 0, true));
  check_case(make_case(3003, 20000, 1024, 16, false, 0, 0, false, /*plain_only=*/true));
}

TEST(CudaBlockTopk, LongRows) {
  REQUIRE_GPU();
  check_case(make_case(4001, 200, 8192, 16, true, 0, 0, true));
  check_case(make_case(4002, 100, 8192, 32, false, 0, 0, false));
  check_case(make_case(4003, 60, 10000, 7, true, 1, 0, true));
}

// Few long rows (a decode step at long context) take the kernel that splits a row over the warps
// of a CTA and merges their lists: runs of whole tiles, uneven runs, warps without tiles, rows
// whose visible part is short, and every value kind (ties across the runs' boundaries included).
TEST(CudaBlockTopk, FewLongRowsSplitOverWarps) {
  REQUIRE_GPU();
  check_case(make_case(4101, 4, 8192, 16, true, 0, 0, false));           // b1 x 1M at bk 128
  check_case(make_case(4102, 4, 8192, 16, true, 0, 0, true));            // with short visible parts
  check_case(make_case(4103, 3, 65536, 32, false, 3, 0, true));          // 64 tiles, 8 per warp
  check_case(make_case(4104, 7, 4096, 31, true, 0, 1, false));           // 4 tiles: 4 warps idle
  check_case(make_case(4105, 5, 9217, 1, true, 0, 0, true));             // k_sel = 0: the own block
  check_case(make_case(4106, 264, 4100, 2, false, 0, 0, true));          // the most rows that split
  check_case(make_case(4107, 2, 12000, 16, true, 0, 0, false, true));    // plain random
}

TEST(CudaBlockTopk, NoBlocks) {
  REQUIRE_GPU();
  Case c;
  c.rows = 5;
  c.n_blocks = 0;
  c.topk = 4;
  c.stride = 0;
  c.name = "n_blocks 0";
  check_case(c);
}

// The kernel clamps row_blocks to [0, n_blocks] (it cannot validate device memory on the host).
TEST(CudaBlockTopk, RowBlocksClampedOnDevice) {
  REQUIRE_GPU();
  Case c = make_case(5001, 64, 300, 16, true, 0, 0, true);
  std::mt19937_64 rng(5002);
  for (auto& v : c.row_blocks) {
    int r = int(rng() % 4);
    v = r == 0 ? -5 : r == 1 ? std::numeric_limits<int32_t>::min() : r == 2 ? 301 : std::numeric_limits<int32_t>::max();
  }
  check_case(c);
}

TEST(CudaBlockTopk, OwnStream) {
  REQUIRE_GPU();
  cudaStream_t s = nullptr;
  cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  check_case(make_case(6001, 500, 1024, 16, true, 0, 0, true), s);
  cudaStreamDestroy(s);
}

TEST(CudaBlockTopk, TwentyRunsBitwiseIdentical) {
  REQUIRE_GPU();
  const Case c = make_case(7001, 3000, 2000, 16, true, 0, 0, true);
  const auto first = run_gpu(c);
  EXPECT_TRUE(same_rows(c, first, run_oracle(c), "oracle"));
  for (int run = 1; run < 20; ++run) {
    const auto again = run_gpu(c);
    ASSERT_TRUE(bitwise_equal(again, first)) << "run " << run;
  }
}

#else  // built without the CUDA backend

TEST(CudaBlockTopk, GpuTests) { GTEST_SKIP() << "built without the CUDA backend: GPU tests not run"; }

#endif

}  // namespace
}  // namespace msa::test
