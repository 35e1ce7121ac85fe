// bench_topk — times msa::block_topk on the CUDA backend (CUDA events, warm-up, median of many
// runs, inputs rotated) for the prefill shape [131072 x 1024] fp32, k = 16, and a few variants,
// beside the device's own read floor (a read-only reduction and a device-to-device copy over the
// same bytes). Each case is checked against the CPU backend on a sample of rows.
//
//   bench_topk [--iters N] [--json FILE] [--quick]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench_util.h"
#include "msa/msa.h"

namespace {

using namespace msa::bench;

// kind 0: standard normal (Box-Muller on a counter hash); kind 1: one of 8 values (ties everywhere).
__global__ void fill_kernel(float* x, int64_t n, uint64_t seed, int kind) {
  const float pool[8] = {1.5f, -0.5f, 0.f, -2.f, 7.f, 3.25f, -1.f, 0.75f};
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t h = hash_at(seed, i);
    x[i] = kind == 1 ? pool[h & 7] : normal_from_hash(h);
  }
}

// The read floor: every float of [rows, n] (row stride `stride`) read once with 16-byte loads.
__global__ void read_kernel(const float4* x, int64_t n4, float* sink) {
  float acc = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
    float4 v = __ldcs(x + i);
    acc += (v.x + v.y) + (v.z + v.w);
  }
  if (acc == 1234.5f) *sink = acc;  // keeps the loads; practically never true
}

struct Config {
  std::string name;
  int64_t rows, n_blocks, topk, stride;
  bool force_last;
  int kind;           // fill_kernel kind
  bool causal;        // row_blocks[i] = i / (rows / n_blocks) + 1: a prefill's causal visible counts
  bool torch_shape;   // the shape and mode torch.topk is timed on
};

struct Result {
  Config cfg;
  double median_ms = 0, min_ms = 0, bytes = 0;
  int64_t checked_rows = 0, bad_rows = 0;
};

Result run_config(const Config& c, int iters) {
  Result r;
  r.cfg = c;
  const size_t elems = size_t(c.rows * c.stride);
  // Rotate input sets so that no run starts with its input in L2 (50 MB): at least 2 sets and
  // at least 4x the L2 size in total.
  const size_t bytes = elems * sizeof(float);
  const int n_sets = int(std::max<size_t>(2, (200u << 20) / bytes + 1));
  std::vector<float*> sets(static_cast<size_t>(n_sets));
  for (int s = 0; s < n_sets; ++s) {
    ok(cudaMalloc(&sets[s], bytes), "cudaMalloc scores");
    fill_kernel<<<2048, 256>>>(sets[s], int64_t(elems), 0x5eed0000ull + uint64_t(s) * 7919, c.kind);
  }
  ok(cudaGetLastError(), "fill");
  int32_t* d_rb = nullptr;
  std::vector<int32_t> h_rb;
  if (c.causal) {
    h_rb.resize(size_t(c.rows));
    const int64_t per_block = std::max<int64_t>(1, c.rows / c.n_blocks);
    for (int64_t i = 0; i < c.rows; ++i) h_rb[i] = int32_t(std::min<int64_t>(c.n_blocks, i / per_block + 1));
    ok(cudaMalloc(&d_rb, h_rb.size() * 4), "cudaMalloc row_blocks");
    ok(cudaMemcpy(d_rb, h_rb.data(), h_rb.size() * 4, cudaMemcpyHostToDevice), "upload row_blocks");
  }
  int32_t* d_out = nullptr;
  ok(cudaMalloc(&d_out, size_t(c.rows * c.topk) * 4), "cudaMalloc out");
  ok(cudaMemset(d_out, 0xab, size_t(c.rows * c.topk) * 4), "poison");

  msa::BlockTopkParams p;
  p.rows = c.rows;
  p.n_blocks = c.n_blocks;
  p.topk = c.topk;
  p.force_last = c.force_last;
  p.stride_row = c.stride;
  p.row_blocks = d_rb;
  p.topk_idx = d_out;
  msa::Exec ex;
  ex.backend = msa::Backend::cuda;

  auto ms = time_queued_ms(
      [&](int i) {
        p.scores = sets[size_t(i % n_sets)];
        msa::block_topk(p, ex);
      },
      5, iters);
  r.median_ms = median(ms);
  r.min_ms = *std::min_element(ms.begin(), ms.end());
  double cand = 0;  // columns actually ranked (the forced column is never read)
  for (int64_t i = 0; i < c.rows; ++i) {
    int64_t n_vis = c.causal ? h_rb[i] : c.n_blocks;
    int64_t n_cand = n_vis - (c.force_last ? 1 : 0);
    if (n_vis > c.topk) cand += double(n_cand);
  }
  r.bytes = cand * 4 + double(c.rows * c.topk) * 4;

  // The last timed run used set (iters - 1) % n_sets: check a sample of its rows on the CPU.
  const float* last = sets[size_t((iters - 1) % n_sets)];
  std::vector<int32_t> got(size_t(c.rows * c.topk));
  ok(cudaMemcpy(got.data(), d_out, got.size() * 4, cudaMemcpyDeviceToHost), "download out");
  const int64_t step = std::max<int64_t>(1, c.rows / 1500);
  std::vector<float> row(size_t(c.n_blocks));
  std::vector<int32_t> ref(size_t(c.topk));
  for (int64_t i = 0; i < c.rows; i += step) {
    ok(cudaMemcpy(row.data(), last + i * c.stride, row.size() * 4, cudaMemcpyDeviceToHost), "download row");
    msa::BlockTopkParams q;
    q.rows = 1;
    q.n_blocks = c.n_blocks;
    q.topk = c.topk;
    q.force_last = c.force_last;
    q.scores = row.data();
    int32_t rb = c.causal ? h_rb[i] : int32_t(c.n_blocks);
    q.row_blocks = &rb;
    q.topk_idx = ref.data();
    msa::block_topk(q);
    ++r.checked_rows;
    if (!std::equal(ref.begin(), ref.end(), got.begin() + i * c.topk)) ++r.bad_rows;
  }
  for (auto s : sets) cudaFree(s);
  cudaFree(d_rb);
  cudaFree(d_out);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 100;
  const char* json_path = nullptr;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) iters = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json_path = argv[++i];
    else if (!std::strcmp(argv[i], "--quick")) quick = true;
    else {
      std::fprintf(stderr, "usage: %s [--iters N] [--json FILE] [--quick]\n", argv[0]);
      return 1;
    }
  }
  if (msa::cuda_device_count() == 0) {
    std::fprintf(stderr, "no CUDA device visible\n");
    return 1;
  }
  const cudaDeviceProp prop = device_props();
  int clock_khz = 0, mem_khz = 0;
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0);
  cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, 0);
  std::printf("device: %s, %d SMs, L2 %d MB, msa %s\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20,
              msa::version());

  const int64_t R = 131072, N = 1024;
  std::vector<Config> cfgs = {
      {"prefill k16 plain", R, N, 16, N, false, 0, false, true},
      {"prefill k16 force_last", R, N, 16, N, true, 0, false, false},
      {"prefill k16 force_last causal row_blocks", R, N, 16, N, true, 0, true, false},
      {"prefill k32 plain", R, N, 32, N, false, 0, false, false},
      {"prefill k1 plain", R, N, 1, N, false, 0, false, false},
      {"prefill k16 odd stride 1025 (4-byte copies)", R, N, 16, N + 1, false, 0, false, false},
      {"long rows 16384x8192 k16 force_last", R / 8, N * 8, 16, N * 8, true, 0, false, false},
      {"ties: 8 distinct values k16 (exact path)", R, N, 16, N, false, 1, false, false},
  };
  if (quick) cfgs.resize(2);

  // Read floor on the main shape: 512 MiB read once; and a copy (read + write) for reference.
  const size_t floor_bytes = size_t(R * N) * 4;
  float *fa = nullptr, *fb = nullptr, *sink = nullptr;
  ok(cudaMalloc(&fa, floor_bytes), "cudaMalloc");
  ok(cudaMalloc(&fb, floor_bytes), "cudaMalloc");
  ok(cudaMalloc(&sink, 4), "cudaMalloc");
  fill_kernel<<<2048, 256>>>(fa, int64_t(R * N), 1, 0);
  auto read_ms = median(time_queued_ms(
      [&](int) { read_kernel<<<prop.multiProcessorCount * 8, 512>>>(reinterpret_cast<const float4*>(fa), int64_t(R * N / 4), sink); },
      5, iters));
  auto copy_ms = median(time_queued_ms([&](int) { cudaMemcpyAsync(fb, fa, floor_bytes, cudaMemcpyDeviceToDevice, 0); }, 5, iters));
  ok(cudaGetLastError(), "floor kernels");
  cudaFree(fa);
  cudaFree(fb);
  cudaFree(sink);
  std::printf("read floor   %8.4f ms  %7.1f GB/s (512 MiB read once)\n", read_ms, floor_bytes / read_ms * 1e-6);
  std::printf("d2d copy     %8.4f ms  %7.1f GB/s (read + write)\n", copy_ms, 2.0 * floor_bytes / copy_ms * 1e-6);

  std::vector<Result> results;
  for (const auto& c : cfgs) {
    results.push_back(run_config(c, iters));
    const Result& r = results.back();
    std::printf("%-46s median %8.4f ms  min %8.4f ms  %7.1f GB/s  check %lld/%lld rows %s\n", c.name.c_str(), r.median_ms,
                r.min_ms, r.bytes / r.median_ms * 1e-6, (long long)(r.checked_rows - r.bad_rows),
                (long long)r.checked_rows, r.bad_rows ? "MISMATCH" : "ok");
  }

  int bad = 0;
  for (const auto& r : results) bad += r.bad_rows > 0;
  if (json_path) {
    FILE* f = std::fopen(json_path, "w");
    if (!f) {
      std::perror(json_path);
      return 1;
    }
    std::fprintf(f, "{\n  \"device\": \"%s\", \"sms\": %d, \"sm_clock_mhz\": %d, \"mem_clock_mhz\": %d, \"iters\": %d,\n",
                 prop.name, prop.multiProcessorCount, clock_khz / 1000, mem_khz / 1000, iters);
    std::fprintf(f, "  \"read_floor_ms\": %.5f, \"read_floor_gbps\": %.1f, \"d2d_copy_ms\": %.5f, \"d2d_copy_gbps\": %.1f,\n",
                 read_ms, floor_bytes / read_ms * 1e-6, copy_ms, 2.0 * floor_bytes / copy_ms * 1e-6);
    std::fprintf(f, "  \"cases\": [\n");
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      const Config& c = r.cfg;
      std::fprintf(f,
                   "    {\"name\": \"%s\", \"rows\": %lld, \"n_blocks\": %lld, \"topk\": %lld, \"stride_row\": %lld, "
                   "\"force_last\": %s, \"causal_row_blocks\": %s, \"values\": \"%s\", \"median_ms\": %.5f, "
                   "\"min_ms\": %.5f, \"bytes\": %.0f, \"gbps\": %.1f, \"checked_rows\": %lld, \"bad_rows\": %lld, "
                   "\"torch_shape\": %s}%s\n",
                   c.name.c_str(), (long long)c.rows, (long long)c.n_blocks, (long long)c.topk, (long long)c.stride,
                   c.force_last ? "true" : "false", c.causal ? "true" : "false", c.kind ? "8 distinct" : "normal",
                   r.median_ms, r.min_ms, r.bytes, r.bytes / r.median_ms * 1e-6, (long long)r.checked_rows,
                   (long long)r.bad_rows, c.torch_shape ? "true" : "false", i + 1 < results.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
  }
  return bad ? 3 : 0;
}
