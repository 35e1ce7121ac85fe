// Device-side random inputs for `msa bench` (see bench_fill.h).
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "bench_fill.h"

namespace msa::cli {
namespace {

void ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("msa bench: ") + what + ": " + cudaGetErrorString(e));
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Box-Muller on two 24-bit uniforms in (0, 1) of one hash: tails to ~5.8 sigma, plenty here.
__device__ __forceinline__ float normal_at(uint64_t seed, int64_t i) {
  const uint64_t h = splitmix64(seed ^ splitmix64(uint64_t(i)));
  const float u1 = (float(h >> 40) + 0.5f) * 0x1p-24f;
  const float u2 = (float((h >> 8) & 0xffffff) + 0.5f) * 0x1p-24f;
  return sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
}

__global__ void fill_bf16_kernel(__nv_bfloat16* dst, int64_t n, uint64_t seed, float sigma) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = __float2bfloat16_rn(sigma * normal_at(seed, i));
}

__global__ void fill_f32_kernel(float* dst, int64_t n, uint64_t seed, float sigma) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = sigma * normal_at(seed, i);
}

// One warp per row: lane l draws elements l, l + 32, ...; the row max by shuffles.
__global__ void fill_e4m3_rows_kernel(uint8_t* bytes, float* scale, int64_t tokens, int d_idx, uint64_t seed) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t t = blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5); t < tokens; t += warps) {
    float a = 0.f;
    for (int e = lane; e < d_idx; e += 32) a = fmaxf(a, fabsf(normal_at(seed, t * d_idx + e)));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    const float inv = __fdiv_rn(448.f, a);
    for (int e = lane; e < d_idx; e += 32)
      bytes[t * d_idx + e] =
          uint8_t(__nv_cvt_float_to_fp8(__fmul_rn(normal_at(seed, t * d_idx + e), inv), __NV_SATFINITE, __NV_E4M3));
    if (lane == 0) scale[t] = __fdiv_rn(a, 448.f);
  }
}

constexpr float kSink = 5.f;          // sqrt(25)
constexpr float kLocal = 2.44948974f;  // sqrt(6)
constexpr int kPeriods = 4;
__constant__ float kPeriodBlocks[kPeriods] = {16.f, 26.f, 42.f, 68.f};

// One thread per (row, planted column); rows [0, n * h_kv) are queries, then n key rows.
__global__ void plant_kernel(__nv_bfloat16* q_idx, __nv_bfloat16* k_idx, int64_t n, int64_t h_kv, int64_t d_idx,
                             int64_t bk) {
  constexpr int cols = 1 + 2 * kPeriods;
  const int64_t total = (n * h_kv + n) * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int c = int(e % cols);
    const int64_t row = e / cols;
    const bool is_q = row < n * h_kv;
    const int64_t pos = is_q ? row / h_kv : row - n * h_kv;
    float val;
    if (c == 0) {
      val = is_q ? kSink : (pos < bk ? kSink : 0.f);
    } else {
      const int f = (c - 1) / 2;
      // The angle in turns, reduced before the multiply so that float keeps it exact at 1M.
      const double period = double(kPeriodBlocks[f]) * double(bk);
      const float turns = float(fmod(double(pos), period) / period);
      val = kLocal * ((c - 1) % 2 == 0 ? cospif(2.f * turns) : sinpif(2.f * turns));
    }
    __nv_bfloat16* dst = is_q ? q_idx + row * d_idx : k_idx + pos * d_idx;
    dst[c] = __float2bfloat16_rn(val);
  }
}

unsigned blocks_for(int64_t n) { return unsigned(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 132 * 64))); }

}  // namespace

void fill_normal_bf16(void* dst, int64_t n, uint64_t seed, float sigma, void* stream) {
  if (n == 0) return;
  fill_bf16_kernel<<<blocks_for(n), 256, 0, static_cast<cudaStream_t>(stream)>>>(static_cast<__nv_bfloat16*>(dst), n,
                                                                                  seed, sigma);
  ok(cudaGetLastError(), "fill launch");
}

void fill_normal_f32(float* dst, int64_t n, uint64_t seed, float sigma, void* stream) {
  if (n == 0) return;
  fill_f32_kernel<<<blocks_for(n), 256, 0, static_cast<cudaStream_t>(stream)>>>(dst, n, seed, sigma);
  ok(cudaGetLastError(), "fill launch");
}

void fill_normal_e4m3_rows(void* bytes, float* scale, int64_t tokens, int64_t d_idx, uint64_t seed, void* stream) {
  if (tokens == 0) return;
  if (d_idx % 32 != 0) throw std::runtime_error("msa bench: fill_normal_e4m3_rows needs d_idx % 32 == 0");
  fill_e4m3_rows_kernel<<<blocks_for(tokens * 32), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<uint8_t*>(bytes), scale, tokens, int(d_idx), seed);
  ok(cudaGetLastError(), "fill launch");
}

void plant_sink_and_local(void* q_idx, void* k_idx, int64_t n, int64_t h_kv, int64_t d_idx, int64_t bk,
                          void* stream) {
  if (d_idx < 16) throw std::runtime_error("msa bench: plant_sink_and_local needs d_idx >= 16");
  const int64_t total = (n * h_kv + n) * (1 + 2 * kPeriods);
  if (total == 0) return;
  plant_kernel<<<blocks_for(total), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<__nv_bfloat16*>(q_idx), static_cast<__nv_bfloat16*>(k_idx), n, h_kv, d_idx, bk);
  ok(cudaGetLastError(), "plant launch");
}

}  // namespace msa::cli
