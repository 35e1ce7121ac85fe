// decode.h — entry points of the CUDA decode kernels (append to the paged cache, the decode index
// pass, sparse decode attention), called by src/decode_api.cpp on Backend::cuda.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "msa/decode.h"

namespace msa::cuda {

// Every params struct arrives validated for shapes by decode_api.cpp (strides and scales
// resolved); every pointer, seq_lens, block_table and cu arrays included, is device memory whose
// contents are never read on the host. Kernels clamp what those arrays hold so that no access
// leaves the tensors. All calls are asynchronous on stream, allocate nothing and are capturable.

// Index pass (decode_index.cu). plan_decode_index fills plan.index_split and returns the bytes of
// workspace the index pass needs for plan.shape; the run call uses workspace + plan.index_workspace_offset.
size_t plan_decode_index(DecodePlan& plan);
void run_decode_index_topk(const DecodeIndexParams& p, const DecodePlan& plan, void* workspace, cudaStream_t stream);

// Attention (decode_attention.cu). Same pattern with plan.attention_split and
// plan.attention_workspace_offset.
size_t plan_decode_attention(DecodePlan& plan);
void run_decode_attention(const DecodeAttentionParams& p, const DecodePlan& plan, void* workspace,
                          cudaStream_t stream);

// Append (decode_append.cu): no workspace.
void run_append_kv(const AppendKvParams& p, cudaStream_t stream);

// Stream-ordered scratch for the convenience (unplanned) forms (decode_append.cu); throws
// std::runtime_error when the allocation fails.
void* scratch_alloc(size_t bytes, cudaStream_t stream);
void scratch_free(void* ptr, cudaStream_t stream);

#ifdef __CUDACC__
// The fp8_e4m3 row quantization of msa/decode.h on the device, for one row spread over a warp (V
// values per lane, in any placement): the same float32 steps as detail::e4m3_quantize_row (IEEE
// division and product, round to nearest even with saturation in the conversion), so the bytes and
// the scale equal the host's bit for bit. Writes V bytes to q8 and returns the row's scale (0 for a
// row whose max |x| < 2^-100, NaN with zero bytes if any value is not finite). All 32 lanes call.
template <int V>
__device__ __forceinline__ float e4m3_quantize_row_warp(const float (&x)[V], uint8_t (&q8)[V]) {
  float a = 0.f;
  bool finite = true;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    finite = finite && isfinite(x[i]);
    a = fmaxf(a, fabsf(x[i]));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
  finite = __all_sync(0xffffffffu, finite);
  if (!finite || a < 0x1p-100f) {
#pragma unroll
    for (int i = 0; i < V; ++i) q8[i] = 0;
    return finite ? 0.f : __int_as_float(0x7fc00000);
  }
  const float inv = __fdiv_rn(448.f, a);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    uint16_t pair;
    // e4m3x2: the first source lands in the upper byte.
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.f), "f"(__fmul_rn(x[i], inv)));
    q8[i] = uint8_t(pair & 0xff);
  }
  return __fdiv_rn(a, 448.f);
}
#endif

}  // namespace msa::cuda
