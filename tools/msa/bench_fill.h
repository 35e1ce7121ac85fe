// Device-side random inputs for `msa bench` (CUDA builds only): counter-based normal fills, so
// a 16 GB tensor is filled in milliseconds on the GPU with no host staging, and the planted
// index-branch pattern (sink + local bias). Stream arguments are cudaStream_t.
#pragma once

#include <cstdint>

namespace msa::cli {

// dst[i] = sigma * N(0, 1) drawn from a hash of (seed, i): the same values for the same seed,
// whatever n and launch shape; never all zero. Throws std::runtime_error on a CUDA failure.
void fill_normal_bf16(void* dst, int64_t n, uint64_t seed, float sigma, void* stream);
void fill_normal_f32(float* dst, int64_t n, uint64_t seed, float sigma, void* stream);

// Overwrites the first 9 of the d_idx >= 16 columns of the index queries q_idx [n, h_kv, d_idx]
// and the shared index keys k_idx [n, d_idx] (bf16, one sequence, position = row) so that
//   <q_idx[i, r], k_idx[j]> = (random part over the other columns)
//                            + 25 * [j < bk]                                  (a sink: block 0)
//                            + 6 * sum_f cos(2 pi (i - j) / P_f)              (local bias)
// with periods P_f = bk * {16, 26, 42, 68}: near keys gain up to +24, the sink +25, against a
// random part of standard deviation ~11 (block maxima ~ +29 +- 3), so the selections look like a
// trained indexer's: the sink, the neighbourhood, then scattered blocks.
// An FP8 index-key cache of `tokens` rows (IndexKeyFormat::fp8_e4m3): each row is d_idx draws of
// N(0, 1) quantized by the contract of msa/decode.h (scale = max|x| / 448, e4m3 bytes rounded to
// nearest even), the bytes to bytes [tokens, d_idx] and the scales to scale [tokens]; one warp per
// row, d_idx a multiple of 32.
void fill_normal_e4m3_rows(void* bytes, float* scale, int64_t tokens, int64_t d_idx, uint64_t seed, void* stream);

void plant_sink_and_local(void* q_idx, void* k_idx, int64_t n, int64_t h_kv, int64_t d_idx, int64_t bk, void* stream);

}  // namespace msa::cli
