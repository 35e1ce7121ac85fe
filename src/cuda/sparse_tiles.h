// sparse_tiles.h — compile-time tile shapes of the CUDA sparse attention forward (sparse_fwd.cuh,
// sparse_schedule.cu), each with the reason for its value. kSpRows and kSpWarpgroups fix the
// register and shared-memory layouts; kSpItemRows, kSpRankFactor and kSpCombineThreads only move speed;
// kSpPassRows bounds the workspace.
#pragma once

#include <cstdint>

namespace msa::cuda {

// Score-tile rows per consumer warpgroup: one wgmma M. Rows are (query, head) pairs, query-major,
// so a tile packs 64 / g gathered queries x g heads and every g in {1, 2, 4, 8, 16} fills it.
constexpr int kSpRows = 64;

// Consumer warpgroups per CTA. They share the CTA's K/V block (loaded once per work item) and
// each runs its own tiles with its own multi-buffered Q gather; 384 threads leave 168 registers each,
// enough for the S (bk / 2) and O (d / 2) accumulators plus the bf16 P fragments.
constexpr int kSpWarpgroups = 3;
constexpr int kSpThreads = kSpWarpgroups * 128;

// Q tile stages per warpgroup: the gathers of the next two tiles (cp.async) are in flight under a
// tile's math. With two stages the gather of one 16 KB tile per warpgroup (48 KB per SM) was not
// enough bytes in flight to cover HBM latency (measured twice: in the first kernel, and on
// 2026-11-27 with two K/V buffers, docs/sparse_attention.md); three fit the shared memory at
// d = bk = 128 with one K/V buffer (224 KB).
constexpr int kSpQStages = 3;

// The local pass (each query's sink and own block, then the merge of the partials of its other
// blocks): two warpgroups of up to 255 registers (a tile holds both blocks' S accumulators at once;
// 168 registers, i.e. three warpgroups, spilled ~400 bytes), each with kSpLocalStages Q stages.
// Its Q rows are contiguous, a sixteenth of phase 1's gathers; with the two K/V blocks the shared
// memory holds 2 x 2 x 16 KB of Q at d = 128 (193 KB in all).
constexpr int kSpLocalWarpgroups = 2;
constexpr int kSpLocalThreads = kSpLocalWarpgroups * 128;
constexpr int kSpLocalStages = 2;

// Slots whose partial loads (lse and a 16-byte chunk per 64 columns) the local pass's merge issues
// at once per row: one memory round trip per batch; 16 x 32 bytes per thread in flight at d = 128.
// Speed only (8: more round trips, measured slower).
constexpr int kSpLocalMergeSlots = 16;

// Merge rounds (16 rows each) of a tile whose partial rows the local pass asks L2 for at the row scan,
// before the tile's products; later rounds are asked for one round ahead. Speed only (1 and 3 or 4:
// measured slower; beyond 2 the prefetched lines overfill L2).
constexpr int kSpLocalScanRounds = 2;
static_assert(kSpLocalScanRounds >= 1 && kSpLocalScanRounds <= kSpRows / 16, "the row scan's warps hold one round each");

// Most queries of one local unit (the schedule cuts runs of one own block at this window), and the
// 32-bit words of a unit's per-tile flags (one bit per 64-row tile; g <= 16).
constexpr int kSpUnitQueries = 1024;
constexpr int kSpUnitTileWords = kSpUnitQueries * 16 / 64 / 32;

// The most selected blocks per (query, group): the API's limit on topk (kMaxTopk, asserted in
// sparse_fwd.cu).
constexpr int kSpMaxTopk = 32;

// Metadata slots per warpgroup (per-entry q address, partial offset, causal limit of a tile): one
// more than the Q stages, so the metadata of tile j + kSpQStages is written while other threads of
// the warpgroup may still read tile j - 1's.
constexpr int kSpMetaSlots = kSpQStages + 1;

// A (kv block, kv head) group is split into work items of at most kSpItemRows (query, head) rows,
// i.e. kSpItemRows / g queries (512 at g = 16: 128 tiles, ~43 per warpgroup), so that the blocks a
// local selection makes popular (each chosen by the next ~16 blocks' queries: up to 2048 per band)
// spread over several CTAs instead of ending each pass on a few long items. The paper's
// 2 * topk * bk queries (4096 at the M3 shape) left a window selection (own block + the 15 before)
// at 36.3 ms at 128K against 33.1 with 512 (256: the same, 1024: 34.2; docs/sparse_attention.md,
// 2026-11-27 morning). Speed only.
constexpr int kSpItemRows = 8192;
// The work order ranks groups by size in steps of kSpRankFactor * topk * bk queries (4096 at the
// M3 shape): only the groups of hot blocks move ahead; a finer step reorders the groups of one
// query band across kv heads, which measured slower on near-random and planted selections.
constexpr int kSpRankFactor = 2;

// The forward walks the packed queries in passes of at most kSpPassRows / (h_q * topk) query rows
// (at least one); the schedule, phase 1 and the combine run per pass over one reused workspace.
// The per-slot partials, n_q * h_q * topk * (2 d + 4) bytes, are what grows with the prompt: 34 GB
// for 128K queries at the M3 shape (h_q = 64, topk = 16, d = 128), more than the GPU at 512K. A
// pass of 2^25 (query, head, slot) rows keeps them at 8.7 GB (32768 queries at the M3 shape) and
// the schedule at ~70 MB. Results do not depend on it (every (query, head) row is computed the same
// way in any pass); fewer pass boundaries are faster: 2^25 against 2^24 measured 33.62 / 33.63 ms
// against 33.95 / 33.88 at 128K (random / planted, four boundaries fewer: ~75 us each), 144.1
// against 147.5 at 512K, 304.5 against 324.0 at 1M (docs/sparse_attention.md, 2026-11-27 evening).
// A caller bounds it with max_workspace_bytes.
constexpr int64_t kSpPassRows = int64_t(1) << 25;

// Phase 1 takes its work items band by band: the pass's queries in runs whose q rows for one kv
// head (band * g * d * 2 bytes) fill at most this much of the 50 MB L2. Every q row is gathered
// once per block its query selected; with the items of one kv head running together, a band keeps
// those gathers in L2 instead of DRAM, at the price of one K/V block load per (band, kv head,
// block). This sets the plan's band; each pass of one sequence then halves or doubles it (below).
// Speed only (the order of items never changes a value); measured in docs/sparse_attention.md.
constexpr int64_t kSpBandBytes = int64_t(32) << 20;

// A pass whose queries see few key blocks takes half that band when the half band's items still
// average at least kSpBandMinEntries entries (selected (query, block) pairs per (band, kv head,
// block)), and one whose queries see many doubles the band (up to the pass) while it leaves its
// items fewer than kSpBandMaxEntries. Measured at 128K (M3 shape, random selection, phase 1 per
// pass of 16384 queries with bands of 4096 / 8192 / 16384): 256 blocks 2.28 / 2.38 / 2.57 ms, 384
// blocks 2.42 / 2.37 / 2.58, 640 blocks 2.69 / 2.49 / 2.47, 768 blocks 2.76 / 2.57 / 2.50, 1024
// blocks 2.94 / 2.72 / 2.59; at 1M with passes of 32768, bands of 32768 against 16384: 309.6 ms
// against 322.6 (docs/sparse_attention.md, 2026-11-27 afternoon). Speed only.
constexpr int64_t kSpBandMinEntries = 256;
constexpr int64_t kSpBandMaxEntries = 192;
constexpr int kSpBandHalvings = 2;

// Threads of the combine (phase 2) kernel per block; each (query, head) row uses d / 8 threads
// (one 16-byte column chunk each). Speed only.
constexpr int kSpCombineThreads = 256;

// Inner extent of one 128-byte-swizzled operand atom in bf16 elements (the wgmma K-major SW128
// row): Q and K tiles are [d / 64] atoms of [rows][64], V^T is [bk / 64] atoms of [d][64].
constexpr int kSpAtomK = 64;

}  // namespace msa::cuda
