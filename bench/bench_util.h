// bench_util.h — the harness the CUDA benchmarks (bench/*.cu) share: CUDA checks that exit, random
// inputs from a counter hash (never zeros: zeros run faster than data), device properties, and
// CUDA-event timing after warm-up with the median of the timed runs. Header-only, for the one
// translation unit of each benchmark.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>

#include "msa/common.h"

namespace msa::bench {

// A benchmark cannot go on after a CUDA error: report it and exit with status 2.
inline void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(e));
    std::exit(2);
  }
}

inline cudaDeviceProp device_props(int device = 0) {
  cudaDeviceProp prop;
  ok(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  return prop;
}

// splitmix64 finaliser: a well-mixed 64-bit hash of a counter.
__host__ __device__ inline uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The random word of element i of the stream `seed`: the same on every launch shape.
__device__ __forceinline__ uint64_t hash_at(uint64_t seed, int64_t i) { return mix64(seed ^ mix64(uint64_t(i))); }

// A standard normal value from one hash word (Box-Muller on its two 24-bit halves, both in (0, 1)).
__device__ __forceinline__ float normal_from_hash(uint64_t h) {
  const float u1 = (float(h >> 40) + 0.5f) * (1.f / 16777216.f);
  const float u2 = (float(h & 0xffffff) + 0.5f) * (1.f / 16777216.f);
  return sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
}

// x[0, n) = standard normal bf16 values of stream seed.
__global__ void fill_normal_bf16(__nv_bfloat16* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16(normal_from_hash(hash_at(seed, i)));
}

// Milliseconds of each of `iters` calls fn(i) after `warmup` untimed calls fn(0 .. warmup - 1),
// one event pair per call on stream 0.
// synced: the host waits for each call before issuing the next, so calls never overlap.
template <class F>
std::vector<float> time_synced_ms(F&& fn, int warmup, int iters) {
  cudaEvent_t a, b;
  ok(cudaEventCreate(&a), "event");
  ok(cudaEventCreate(&b), "event");
  for (int i = 0; i < warmup; ++i) fn(i);
  ok(cudaDeviceSynchronize(), "warm-up");
  std::vector<float> t;
  for (int i = 0; i < iters; ++i) {
    ok(cudaEventRecord(a), "record");
    fn(i);
    ok(cudaEventRecord(b), "record");
    ok(cudaEventSynchronize(b), "sync");
    float ms = 0;
    ok(cudaEventElapsedTime(&ms, a, b), "elapsed");
    t.push_back(ms);
  }
  ok(cudaGetLastError(), "timed runs");
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return t;
}

// queued: every call and its events are issued back to back and waited for once at the end, so
// no host launch gap enters a measurement (for calls short enough that it would).
template <class F>
std::vector<float> time_queued_ms(F&& fn, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) fn(i);
  ok(cudaDeviceSynchronize(), "warm-up");
  std::vector<cudaEvent_t> ev(2 * size_t(iters));
  for (auto& e : ev) ok(cudaEventCreate(&e), "cudaEventCreate");
  for (int i = 0; i < iters; ++i) {
    ok(cudaEventRecord(ev[2 * i], 0), "record");
    fn(i);
    ok(cudaEventRecord(ev[2 * i + 1], 0), "record");
  }
  ok(cudaDeviceSynchronize(), "timed runs");
  std::vector<float> ms(static_cast<size_t>(iters));
  for (int i = 0; i < iters; ++i) ok(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]), "elapsed");
  for (auto& e : ev) cudaEventDestroy(e);
  return ms;
}

// The element at index n / 2 once sorted: the median for odd n, the upper of the two middle
// values for even n.
inline float upper_median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median ms of call(ex) issued eagerly on the legacy stream, and of the same call captured once
// into a CUDA graph and replayed (no host launch cost between calls: the GPU time of a captured
// decode step). ex is a CUDA Exec; the replay stream is a blocking one, ordered with the legacy
// stream the events use.
template <class F>
std::pair<float, float> eager_and_graph_ms(F&& call, int iters) {
  msa::Exec ex;
  ex.backend = msa::Backend::cuda;
  const float eager = upper_median(time_queued_ms([&](int) { call(ex); }, 3, iters));
  cudaStream_t st;
  ok(cudaStreamCreate(&st), "stream");
  ex.stream = st;
  cudaGraph_t g;
  cudaGraphExec_t ge;
  ok(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), "begin capture");
  call(ex);
  ok(cudaStreamEndCapture(st, &g), "end capture");
  ok(cudaGraphInstantiate(&ge, g, 0), "instantiate");
  const float graph = upper_median(time_queued_ms([&](int) { ok(cudaGraphLaunch(ge, st), "graph launch"); }, 3, iters));
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  cudaStreamDestroy(st);
  return {eager, graph};
}

// The median proper: the mean of the two middle values for even n.
inline double median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

// upper_median of time_synced_ms: the timing of the attention and index benchmarks.
template <class F>
float median_ms(F&& fn, int warmup, int iters) {
  return upper_median(time_synced_ms(fn, warmup, iters));
}

}  // namespace msa::bench
