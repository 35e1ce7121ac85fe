// Consumer of an installed msa: selects blocks for a small random input with msa::index_topk
// and checks that every query keeps its own block (the one rule that holds for any input).
#include <msa/msa.h>

#include <cstdio>
#include <random>
#include <vector>

int main() {
  const int64_t n = 300, h_kv = 2, d_idx = 64, bk = 64, topk = 3;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> q_idx(n * h_kv * d_idx), k_idx(n * d_idx);
  for (float& x : q_idx) x = nd(rng);
  for (float& x : k_idx) x = nd(rng);
  std::vector<int32_t> topk_idx(n * h_kv * topk, -7);

  msa::IndexTopkParams p;
  p.seq.n_q = p.seq.n_k = n;
  p.h_kv = h_kv;
  p.d_idx = d_idx;
  p.bk = bk;
  p.topk = topk;
  p.dtype = msa::DType::f32;
  p.q_idx = q_idx.data();
  p.k_idx = k_idx.data();
  p.topk_idx = topk_idx.data();
  try {
    msa::index_topk(p);
  } catch (const msa::Error& e) {
    std::fprintf(stderr, "consumer: msa::index_topk threw: %s\n", e.what());
    return 1;
  }

  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = 0; r < h_kv; ++r) {
      const int32_t* row = &topk_idx[(i * h_kv + r) * topk];
      int64_t own = i / bk, expected = own + 1 < topk ? own + 1 : topk;
      int64_t valid = 0;
      bool has_own = false;
      for (int64_t t = 0; t < topk; ++t) {
        if (row[t] < 0) break;
        ++valid;
        has_own |= row[t] == own;
      }
      if (!has_own || valid != expected) {
        std::fprintf(stderr, "consumer: query %lld group %lld: %lld blocks, own block %s (expected %lld blocks)\n",
                     (long long)i, (long long)r, (long long)valid, has_own ? "present" : "missing",
                     (long long)expected);
        return 1;
      }
    }
  std::printf("consumer: msa %s from the installed package: index_topk kept the own block of all %lld rows\n",
              msa::version(), (long long)(n * h_kv));
  return 0;
}
