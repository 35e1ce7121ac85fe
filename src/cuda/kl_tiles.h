// kl_tiles.h — compile-time tile shapes of the CUDA KL alignment loss and backward (kl.cuh, kl.cu),
// each with the reason for its value. kKlRows, kKlWarpgroups and kKlStages fix the register and
// shared-memory layouts; kKlChunkFactor, kKlWarmSlots and kKlPassBytes only move speed and memory.
#pragma once

#include <cstdint>

namespace msa::cuda {

// Rows of one wgmma M: a student tile is 64 selection entries (query, group, block); a teacher
// sub-tile is 64 / g of those entries x their g heads (query-major, as in the sparse forward).
constexpr int kKlRows = 64;

// Consumer warpgroups of the main kernel. Each owns a 64-row fp32 teacher-probability tile in
// shared memory (the group mean of the g heads, read back in the student's accumulator layout):
// two of them, K, K_idx and three gather stages each fill the 227 KB at d = d_idx = bk = 128.
constexpr int kKlWarpgroups = 2;
constexpr int kKlThreads = kKlWarpgroups * 128;

// Gather stages per warpgroup (teacher Q sub-tiles and the student Q_idx tile share the ring):
// two gathers in flight under each tile's math.
constexpr int kKlStages = 3;

// A (kv head, kv block) group chosen by more entries than kKlChunkFactor * topk * bk is split into
// work items of at most that many entries (whole student tiles), so hot blocks (the sink) spread
// over several CTAs. Speed only.
constexpr int kKlChunkFactor = 2;

// Warm-up (full causal prefix): the visible blocks are walked in ranges of kKlWarmSlots blocks, each
// range a synthetic selection of that many slots, so the per-slot dq partials stay bounded.
constexpr int kKlWarmSlots = 32;

// Query rows per pass: the per-slot fp32 dq partials (rows * h_kv * slots * d_idx * 4 bytes) stay
// under this many bytes (the bf16 dS rows add half as much). 4 GB: 131072 queries at the M3 shape
// (h_kv = 4, topk = 16, d_idx = 128), i.e. one pass at 128K (34.0 ms there against 35.2 ms in two
// passes on an H100); the workspace is then ~7 GB, bounded for longer prompts.
constexpr int64_t kKlPassBytes = int64_t(1) << 32;

// Threads per block of the small elementwise kernels (combines, finalise, reductions). Speed only.
constexpr int kKlSmallThreads = 256;

}  // namespace msa::cuda
