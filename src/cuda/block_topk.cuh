// block_topk.cuh — the sm_90 kernels behind msa::block_topk and their launcher (internal; included
// by block_topk.cu only). One warp owns one row at a time; few long rows get a CTA each, its warps
// splitting the row (block_topk_split_kernel). The design and its measurements are in docs/topk.md.
//
// Per row: the visible candidate columns are streamed through shared memory in tiles of 1024
// (cp.async into two buffers: the next tile is in flight while this one is ranked); each lane
// takes a run of consecutive columns into registers. Ranking is on an order-preserving uint32 key
// (NaN lowest, -0 = +0). A lower bound on the k-th largest key (the k-th largest of the lanes'
// top-2 keys) leaves ~k candidates, found with one compare per column (on the floats themselves
// when the tile holds no NaN), which are appended in column order to a small per-warp list after
// the selection carried from earlier tiles; an exact bitwise search for the k-th largest key of
// that list, ties resolved toward the lower column by ballot prefix counts, keeps exactly k of
// them, still in column order. The output is that list's columns, already ascending. No sort.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "block_topk.h"
#include "common.cuh"
#include "host.h"

namespace msa::cuda::topk {

// Columns a warp ranks at once, up to 32 per lane held in registers. 1024 blocks (128K tokens
// at bk = 128) fit one tile; longer rows loop over tiles carrying the selection so far.
constexpr int kTile = 1024;
constexpr int kPerLane = kTile / 32;
// A lane's 32 consecutive columns in shared memory, padded by 4 words: the 16-byte reads of the 8
// lanes of one shared-memory wavefront (lane stride 36 words) then hit distinct banks.
constexpr int kSegStride = kPerLane + 4;
constexpr int kTileWords = 32 * kSegStride;
constexpr int kTileBytes = kTileWords * 4;
// Candidate list entries (key, column): the carried selection (<= 32) plus one tile's candidates.
// Random rows need ~k + 4 even at k = 32; more (many equal scores) takes the exact register path.
constexpr int kCap = 128;
// Speed only: 4 warps a block at 10 KiB of shared memory each gives 5 blocks (20 warps) an SM,
// ~80 KiB of loads in flight per SM, several times what saturates HBM.
constexpr int kWarps = 4;
constexpr int kMinBlocks = 5;
constexpr int kWarpSmem = 2 * kTileBytes + kCap * 8;
constexpr int kBlockSmem = kWarps * kWarpSmem;
// Speed only: the lower-bound search stops at this bit; the bits below tighten the bound by less
// than 2^-11 relative and cost an iteration each.
constexpr int kBoundLowBit = 12;

constexpr unsigned kFull = 0xffffffffu;

struct Args {
  const float* scores;        // [rows, stride_row], device
  const int32_t* row_blocks;  // [rows] or null, device; clamped to [0, n_blocks]
  int32_t* topk_idx;          // [rows, topk], device
  int64_t rows, stride_row;
  int n_blocks, topk;
  bool force_last;
};

// Order-preserving key: a > b as floats (NaN aside) iff key(a) > key(b). -0 becomes +0 first
// because they compare equal and must tie toward the lower column. NaN maps to 1, below -inf
// (0x007fffff); 0 is kept for columns that are not candidates.
__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t u = __float_as_uint(__fadd_rn(x, 0.0f));
  uint32_t k = u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);
  return isnan(x) ? 1u : k;
}

// The smallest float x with order_key(x) >= k, so that x >= key_to_float(k) iff order_key(x) >= k
// for every number x; -inf for keys at or below -inf's, NaN (nothing passes) above +inf's.
__device__ __forceinline__ float key_to_float(uint32_t k) {
  if (k <= 0x007fffffu) return -__int_as_float(0x7f800000);
  return __uint_as_float((k & 0x80000000u) ? (k ^ 0x80000000u) : ~k);
}

__device__ __forceinline__ uint32_t lanemask_lt() {
  uint32_t m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// 16 bytes global -> shared, bypassing L1: each score is read once.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_prev() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Exclusive prefix sum over the warp of small non-negative v, one ballot per bit that any lane
// has set: the counts here are 0..32 and mostly 0 or 1, so this is 1-2 ballots.
__device__ __forceinline__ int warp_excl_scan(int v, int& total) {
  uint32_t bits = __reduce_or_sync(kFull, uint32_t(v));
  const uint32_t lt = lanemask_lt();
  int excl = 0;
  total = 0;
  while (bits) {
    int b = __ffs(bits) - 1;
    bits &= bits - 1;
    uint32_t bal = __ballot_sync(kFull, (v >> b) & 1);
    excl += __popc(bal & lt) << b;
    total += __popc(bal) << b;
  }
  return excl;
}

// Largest T (bits below low_bit zero) with count(T) >= k, where count(c) is the number of keys
// >= c, non-increasing in c. Every key that matters lies in [lo, hi] and count(lo) >= k, so T
// shares the bits above the highest one where lo and hi differ: the search starts there.
template <class Count>
__device__ __forceinline__ uint32_t kth_largest(uint32_t lo, uint32_t hi, int k, int low_bit, Count count) {
  uint32_t d = lo ^ hi;
  if (d == 0) return hi;
  int hb = 31 - __clz(d);
  uint32_t t = hi & ~((2u << hb) - 1u);  // hb == 31: 2u << 31 == 0, so t = 0
  for (int b = hb; b >= low_bit; --b) {
    uint32_t c = t | (1u << b);
    if (count(c) >= k) t = c;
  }
  return t;
}

__device__ __forceinline__ void top2(uint32_t& m1, uint32_t& m2, uint32_t x) {
  uint32_t lo = min(m1, x);
  m1 = max(m1, x);
  m2 = max(m2, lo);
}

// Shared-memory slot of tile column c: a lane's 32 consecutive columns, padded by 4 words.
__device__ __forceinline__ int tile_slot(int c) { return c + 4 * (c >> 5); }

// Appends this lane's candidates (set bits of mask: tile columns c0 + bit) at list[pos...] with
// their row columns t0 + c0 + bit. Keys are recomputed from the shared tile because registers
// cannot be indexed at run time.
__device__ __forceinline__ void append_candidates(uint32_t mask, int pos, const float* tile, int t0, int c0,
                                                  uint2* list) {
  while (mask) {
    int i = __ffs(mask) - 1;
    mask &= mask - 1;
    list[pos++] = make_uint2(order_key(tile[tile_slot(c0 + i)]), uint32_t(t0 + c0 + i));
  }
}

// Keeps the k best of list[0, n) (n > k, entries in column order, keys >= 1): larger key first,
// equal keys toward the lower index (= lower column). Compacts them to list[0, k) in order and
// returns the k-th largest key. E entries per lane, n <= 32 * E.
template <int E>
__device__ __forceinline__ uint32_t select_list(uint2* list, int n, int k, int lane) {
  uint32_t key[E];
  uint32_t col[E];
  uint32_t mx = 0, mn = ~0u;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    int idx = lane + 32 * e;
    key[e] = 0;  // never counted: every probe is >= 1
    col[e] = 0;
    if (idx < n) {
      uint2 v = list[idx];
      key[e] = v.x;
      col[e] = v.y;
      mn = min(mn, v.x);
    }
    mx = max(mx, key[e]);
  }
  const uint32_t hi = __reduce_max_sync(kFull, mx), lo = __reduce_min_sync(kFull, mn);
  const uint32_t t = kth_largest(lo, hi, k, 0, [&](uint32_t c) {
    int cnt = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) cnt += __popc(__ballot_sync(kFull, key[e] >= c));
    return cnt;
  });
  const uint32_t lt = lanemask_lt();
  int gt = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) gt += __popc(__ballot_sync(kFull, key[e] > t));
  const int ties = k - gt;  // >= 1 entries equal to t are kept, the lowest-index ones
  int eq_before = 0, kept_before = 0;
  bool keep[E];
  int pos[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    bool eq = key[e] == t;
    uint32_t beq = __ballot_sync(kFull, eq);
    keep[e] = key[e] > t || (eq && eq_before + __popc(beq & lt) < ties);
    eq_before += __popc(beq);
    uint32_t bk = __ballot_sync(kFull, keep[e]);
    pos[e] = kept_before + __popc(bk & lt);
    kept_before += __popc(bk);
  }
  __syncwarp();  // every lane has read its entries before any is overwritten
#pragma unroll
  for (int e = 0; e < E; ++e)
    if (keep[e]) list[pos[e]] = make_uint2(key[e], col[e]);
  __syncwarp();
  return t;
}

struct RowInfo {
  int n_vis = 0;    // visible columns
  int n_cand = 0;   // columns ranked: n_vis, less the forced last one
  int n_tiles = 0;  // 0: nothing to rank (short row, or only the forced column)
};

__device__ __forceinline__ RowInfo row_info(const Args& a, int64_t row, int k_sel) {
  RowInfo r;
  r.n_vis = a.n_blocks;
  if (a.row_blocks) r.n_vis = min(max(__ldg(a.row_blocks + row), 0), a.n_blocks);
  r.n_cand = r.n_vis - (a.force_last ? 1 : 0);
  if (r.n_vis > a.topk && k_sel > 0) r.n_tiles = (r.n_cand + kTile - 1) / kTile;
  return r;
}

// Starts the copy of columns [t0, t0 + kTile) of the row's candidates into a padded tile (tile:
// its generic address, dst: its shared-window address). Slots past the row's candidates get -inf,
// so the float path needs no per-column mask; the key path masks them itself.
__device__ __forceinline__ void issue_tile(const Args& a, int64_t row, int n_cand, int t0, float* tile, uint32_t dst,
                                           int lane) {
  const float* src = a.scores + row * a.stride_row + t0;
  const int nv = min(kTile, n_cand - t0);
  const float neg_inf = -__int_as_float(0x7f800000);
  if ((reinterpret_cast<uintptr_t>(src) & 15) == 0) {
#pragma unroll
    for (int j = 0; j < kTile / 128; ++j) {
      const int c = 128 * j + 4 * lane;
      const int slot = c + 4 * (c >> 5);
      if (c + 4 <= nv) {
        cp_async16(dst + 4 * slot, src + c);
      } else {  // the row ends in or before this chunk: never read past it
        for (int e = 0; e < 4; ++e) {
          if (c + e < nv)
            cp_async4(dst + 4 * (slot + e), src + c + e);
          else
            tile[slot + e] = neg_inf;
        }
      }
    }
  } else {  // odd stride or offset base: 4-byte copies, still coalesced across the warp
#pragma unroll 8
    for (int q = 0; q < kPerLane; ++q) {
      const int c = 32 * q + lane;
      if (c < nv)
        cp_async4(dst + 4 * (kSegStride * q + lane), src + c);
      else
        tile[kSegStride * q + lane] = neg_inf;
    }
  }
}

// Rows with nothing to rank: all visible columns (n_vis <= topk), or only the forced one.
__device__ __forceinline__ void write_short_row(const Args& a, int64_t row, int n_vis, int lane) {
  if (lane < a.topk) {
    int v = n_vis <= a.topk ? (lane < n_vis ? lane : -1) : n_vis - 1;
    a.topk_idx[row * a.topk + lane] = v;
  }
}

// This lane's g consecutive tile columns c0 .. c0 + g - 1 (g = 32 for a full tile, fewer when the
// tile is short, so that short rows still spread over all lanes and the top-2 bound stays tight);
// the other registers get -inf.
__device__ __forceinline__ void load_values(const float* tile, int lane, int g, float (&v)[kPerLane]) {
  if (g == kPerLane) {
    const float4* seg = reinterpret_cast<const float4*>(tile + lane * kSegStride);
#pragma unroll
    for (int q = 0; q < kPerLane / 4; ++q) {
      float4 x = seg[q];
      v[4 * q + 0] = x.x;
      v[4 * q + 1] = x.y;
      v[4 * q + 2] = x.z;
      v[4 * q + 3] = x.w;
    }
  } else {
    const int c0 = lane * g;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) v[i] = i < g ? tile[tile_slot(c0 + i)] : -__int_as_float(0x7f800000);
  }
}

// Keys of the values; registers past the lane's lane_valid columns get key 0 (not a column).
__device__ __forceinline__ void to_keys(const float (&v)[kPerLane], int lane_valid, uint32_t (&key)[kPerLane]) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) key[i] = i < lane_valid ? order_key(v[i]) : 0u;
}

// Lower bound on the k-th largest key of the tile: the k-th largest of the 64 lane top-2 keys (64
// distinct columns, so at least k keys reach it), to kBoundLowBit; at least 1 (0 is no column).
__device__ __forceinline__ uint32_t tile_bound(uint32_t t1, uint32_t t2, int k) {
  uint32_t m = kth_largest(__reduce_min_sync(kFull, t2), __reduce_max_sync(kFull, t1), k, kBoundLowBit, [&](uint32_t c) {
    return __popc(__ballot_sync(kFull, t1 >= c)) + __popc(__ballot_sync(kFull, t2 >= c));
  });
  return max(m, 1u);
}

// Ranks one tile into the warp's list. s: entries carried from earlier tiles of the row (0 or
// k_sel); key_w: the smallest carried key. On return list[0, s) holds the best s <= k_sel so far.
__device__ __forceinline__ void rank_tile(const float* tile, int t0, int n_cand, int k_sel, uint2* list, int& s,
                                          uint32_t& key_w, int lane) {
  const int nv = min(kTile, n_cand - t0);
  const int g = (nv + 31) / 32;  // columns per lane
  const int c0 = lane * g;
  const int lane_valid = min(g, nv - c0);  // real columns in this lane
  const uint32_t valid_bits = lane_valid >= 32 ? ~0u : lane_valid <= 0 ? 0u : (1u << lane_valid) - 1u;

  // Candidates: columns whose key reaches m, a lower bound on the k-th largest key of the row so
  // far (the tile's bound, and above the worst carried key: a tile column must beat it outright,
  // having the higher column).
  float v[kPerLane];
  load_values(tile, lane, g, v);
  // The sum is NaN if some value is NaN (also when +inf meets -inf, which only costs speed): one
  // FMA-pipe add per column decides whether the tile can be ranked on the floats themselves, which
  // saves the ALU work of keys.
  float part[4] = {v[0], v[1], v[2], v[3]};
#pragma unroll
  for (int i = 4; i < kPerLane; ++i) part[i % 4] += v[i];
  const float sum = (part[0] + part[1]) + (part[2] + part[3]);
  uint32_t m_tile, mask = 0;
  if (!__any_sync(kFull, isnan(sum))) {
    const float neg_inf = -__int_as_float(0x7f800000);
    float a1 = neg_inf, a2 = neg_inf, b1 = neg_inf, b2 = neg_inf;
#pragma unroll
    for (int i = 0; i < kPerLane; i += 2) {
      a2 = fmaxf(a2, fminf(a1, v[i]));
      a1 = fmaxf(a1, v[i]);
      b2 = fmaxf(b2, fminf(b1, v[i + 1]));
      b1 = fmaxf(b1, v[i + 1]);
    }
    // The -inf padding may stand among the 64: a bound above -inf is still reached by k real
    // columns, and a bound of -inf admits every column, as it must.
    m_tile = tile_bound(order_key(fmaxf(a1, b1)), order_key(fmaxf(fminf(a1, b1), fmaxf(a2, b2))), k_sel);
    const float mf = key_to_float(s > 0 ? max(m_tile, key_w + 1) : m_tile);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) mask |= (v[i] >= mf ? 1u : 0u) << i;
    mask &= valid_bits;
  } else {
    uint32_t key[kPerLane];
    to_keys(v, lane_valid, key);
    uint32_t a1 = 0, a2 = 0, b1 = 0, b2 = 0;
#pragma unroll
    for (int i = 0; i < kPerLane; i += 2) {
      top2(a1, a2, key[i]);
      top2(b1, b2, key[i + 1]);
    }
    m_tile = tile_bound(max(a1, b1), max(min(a1, b1), max(a2, b2)), k_sel);
    const uint32_t m = s > 0 ? max(m_tile, key_w + 1) : m_tile;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) mask |= (key[i] >= m ? 1u : 0u) << i;
  }

  int total;
  const int excl = warp_excl_scan(__popc(mask), total);
  if (s + total <= kCap) {
    append_candidates(mask, s + excl, tile, t0, c0, list);
    s += total;
  } else {
    // Too many candidates (many equal keys, or an adversarial row): exact k-th largest key t over
    // the carried entries and the whole tile in registers, then keep the ties at t in column
    // order: carried ones first, then the tile's by lane.
    uint32_t key[kPerLane];
    load_values(tile, lane, g, v);
    to_keys(v, lane_valid, key);
    uint32_t sk = 0, sc = 0;
    if (lane < s) {
      uint2 v = list[lane];
      sk = v.x;
      sc = v.y;
    }
    const uint32_t lo = s > 0 ? max(m_tile, key_w) : m_tile;
    uint32_t lane_max = sk;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) lane_max = max(lane_max, key[i]);
    const uint32_t hi = __reduce_max_sync(kFull, lane_max);
    const uint32_t t = kth_largest(lo, hi, k_sel, 0, [&](uint32_t c) {
      uint32_t cnt = sk >= c ? 1u : 0u;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) cnt += key[i] >= c ? 1u : 0u;
      return int(__reduce_add_sync(kFull, cnt));
    });
    uint32_t mgt = 0, meq = 0;
    uint32_t gt = sk > t ? 1u : 0u;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      mgt |= (key[i] > t ? 1u : 0u) << i;
      meq |= (key[i] == t ? 1u : 0u) << i;
    }
    gt += __popc(mgt);
    const int ties = k_sel - int(__reduce_add_sync(kFull, gt));
    const uint32_t lt = lanemask_lt();
    const bool s_eq = lane < s && sk == t;
    const uint32_t bse = __ballot_sync(kFull, s_eq);
    const bool s_keep = lane < s && (sk > t || (s_eq && __popc(bse & lt) < ties));
    const int ties_tile = ties - min(ties, __popc(bse));
    int eq_total;
    const int eq_excl = warp_excl_scan(__popc(meq), eq_total);
    int take = min(max(ties_tile - eq_excl, 0), __popc(meq));
    uint32_t chosen = 0;
    for (; take > 0; --take) {
      uint32_t low = meq & (0u - meq);
      chosen |= low;
      meq ^= low;
    }
    mask = mgt | chosen;
    const uint32_t bsk = __ballot_sync(kFull, s_keep);
    __syncwarp();  // carried entries are in registers before the list is rewritten
    if (s_keep) list[__popc(bsk & lt)] = make_uint2(sk, sc);
    const int s_kept = __popc(bsk);
    int tile_total;
    const int tile_excl = warp_excl_scan(__popc(mask), tile_total);
    append_candidates(mask, s_kept + tile_excl, tile, t0, c0, list);
    s = s_kept + tile_total;  // == k_sel
  }
  __syncwarp();

  if (s > k_sel) {
    if (s <= 32)
      key_w = select_list<1>(list, s, k_sel, lane);
    else if (s <= 64)
      key_w = select_list<2>(list, s, k_sel, lane);
    else
      key_w = select_list<4>(list, s, k_sel, lane);
    s = k_sel;
  } else {
    key_w = __reduce_min_sync(kFull, lane < s ? list[lane].x : ~0u);
  }
}

__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) block_topk_kernel(const Args a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* tiles = reinterpret_cast<float*>(smem + warp * kWarpSmem);
  uint2* list = reinterpret_cast<uint2*>(smem + warp * kWarpSmem + 2 * kTileBytes);
  const uint32_t tiles_s = smem_addr(tiles);
  const int64_t n_warps = int64_t(gridDim.x) * kWarps;
  const int k_sel = a.topk - (a.force_last ? 1 : 0);

  // Persistent warps walk rows row, row + n_warps, ...; the copy of the next tile (of this row or
  // of the next row) is issued before the current one is ranked, into the other buffer.
  int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  RowInfo cur;
  int buf = 0;
  if (row < a.rows) {
    cur = row_info(a, row, k_sel);
    if (cur.n_tiles > 0) issue_tile(a, row, cur.n_cand, 0, tiles, tiles_s, lane);
  }
  cp_async_commit();
  int t = 0, s = 0;
  uint32_t key_w = 0;
  while (row < a.rows) {
    if (cur.n_tiles == 0) {
      write_short_row(a, row, cur.n_vis, lane);
      row += n_warps;
      if (row < a.rows) {
        cur = row_info(a, row, k_sel);
        if (cur.n_tiles > 0) issue_tile(a, row, cur.n_cand, 0, tiles + buf * kTileWords, tiles_s + buf * kTileBytes, lane);
      }
      cp_async_commit();
      continue;
    }
    int64_t next_row = row;
    int next_t = t + 1;
    RowInfo next = cur;
    if (next_t == cur.n_tiles) {
      next_row = row + n_warps;
      next_t = 0;
      if (next_row < a.rows) next = row_info(a, next_row, k_sel);
    }
    if (next_row < a.rows && next.n_tiles > 0)
      issue_tile(a, next_row, next.n_cand, next_t * kTile, tiles + (buf ^ 1) * kTileWords,
                 tiles_s + (buf ^ 1) * kTileBytes, lane);
    cp_async_commit();
    cp_async_wait_prev();
    __syncwarp();  // the whole tile has landed, whichever lane copied it

    rank_tile(tiles + buf * kTileWords, t * kTile, cur.n_cand, k_sel, list, s, key_w, lane);
    if (t == cur.n_tiles - 1) {
      int32_t* out = a.topk_idx + row * a.topk;
      if (lane < k_sel) out[lane] = int32_t(list[lane].y);
      if (a.force_last && lane == k_sel) out[lane] = cur.n_vis - 1;
      s = 0;
    }
    __syncwarp();  // done with this buffer and the list before they are refilled
    buf ^= 1;
    row = next_row;
    t = next_t;
    cur = next;
  }
  cp_async_wait_all();
}

// Few long rows (a decode step at long context: h_kv rows of thousands of blocks) leave most of
// the GPU idle with one warp per row. Here a CTA of kSplitWarps warps owns one row: warp w ranks
// its own run of whole tiles into its list exactly as above, then warp 0 ranks the concatenated
// lists (in column order, since the runs are) once more. Exact: a column of the row's best k_sel
// is among the best k_sel of its run under the same (key, lower column) order.
constexpr int kSplitWarps = 8;
constexpr int kSplitMerge = kSplitWarps * 32;  // merged candidates: k_sel <= 32 per warp
constexpr int kSplitSmem = kSplitWarps * kWarpSmem + kSplitMerge * 8 + kSplitWarps * 4;
// A row this long (in blocks) with this few rows takes the split kernel (speed only; the results
// are identical).
constexpr int kSplitMinBlocks = 4 * kTile;

__global__ void __launch_bounds__(kSplitWarps * 32) block_topk_split_kernel(const Args a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* tiles = reinterpret_cast<float*>(smem + warp * kWarpSmem);
  uint2* list = reinterpret_cast<uint2*>(smem + warp * kWarpSmem + 2 * kTileBytes);
  uint2* merged = reinterpret_cast<uint2*>(smem + kSplitWarps * kWarpSmem);
  int* counts = reinterpret_cast<int*>(smem + kSplitWarps * kWarpSmem + kSplitMerge * 8);
  const uint32_t tiles_s = smem_addr(tiles);
  const int k_sel = a.topk - (a.force_last ? 1 : 0);

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const RowInfo cur = row_info(a, row, k_sel);
    if (cur.n_tiles == 0) {
      if (warp == 0) write_short_row(a, row, cur.n_vis, lane);
      continue;  // uniform over the CTA: no barrier skipped by some warps only
    }
    // Warp w ranks tiles [t_begin, t_end): the row's tiles dealt out in contiguous runs.
    const int per_warp = (cur.n_tiles + kSplitWarps - 1) / kSplitWarps;
    const int t_begin = min(warp * per_warp, cur.n_tiles), t_end = min(t_begin + per_warp, cur.n_tiles);
    int s = 0, buf = 0;
    uint32_t key_w = 0;
    if (t_begin < t_end) issue_tile(a, row, cur.n_cand, t_begin * kTile, tiles, tiles_s, lane);
    cp_async_commit();
    for (int t = t_begin; t < t_end; ++t) {
      if (t + 1 < t_end)
        issue_tile(a, row, cur.n_cand, (t + 1) * kTile, tiles + (buf ^ 1) * kTileWords, tiles_s + (buf ^ 1) * kTileBytes,
                   lane);
      cp_async_commit();
      cp_async_wait_prev();
      __syncwarp();  // the whole tile has landed, whichever lane copied it
      rank_tile(tiles + buf * kTileWords, t * kTile, cur.n_cand, k_sel, list, s, key_w, lane);
      __syncwarp();  // done with this buffer before it is refilled
      buf ^= 1;
    }
    cp_async_wait_all();
    if (lane == 0) counts[warp] = s;
    __syncthreads();  // every warp's list and count are final
    int base = 0;
    for (int w = 0; w < warp; ++w) base += counts[w];
    if (lane < s) merged[base + lane] = list[lane];
    __syncthreads();  // the merged list is complete
    if (warp == 0) {
      int n = 0;
      for (int w = 0; w < kSplitWarps; ++w) n += counts[w];
      if (n > k_sel) select_list<kSplitMerge / 32>(merged, n, k_sel, lane);
      int32_t* out = a.topk_idx + row * a.topk;
      if (lane < k_sel) out[lane] = int32_t(merged[lane].y);
      if (a.force_last && lane == k_sel) out[lane] = cur.n_vis - 1;
    }
    __syncthreads();  // lists, counts and the merged list are free for the next row
  }
}

// The public operation, for error messages.
constexpr const char* kOp = "block_topk";

inline void launch(const BlockTopkParams& p, cudaStream_t stream) {
  Args a;
  a.scores = p.scores;
  a.row_blocks = p.row_blocks;
  a.topk_idx = p.topk_idx;
  a.rows = p.rows;
  a.stride_row = p.stride_row;
  a.n_blocks = int(p.n_blocks);
  a.topk = int(p.topk);
  a.force_last = p.force_last;

  if constexpr (kBlockSmem > 48 * 1024) ensure_smem(kOp, reinterpret_cast<const void*>(&block_topk_kernel), kBlockSmem);
  int dev = 0, sms = 0, per_sm = 0;
  check_cuda(kOp, cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(kOp, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  // Fewer rows than the SMs could hold split rows, each long enough to split: a CTA per row.
  if (p.n_blocks >= kSplitMinBlocks && p.rows <= int64_t(sms) * 2) {
    ensure_smem(kOp, reinterpret_cast<const void*>(&block_topk_split_kernel), kSplitSmem);
    block_topk_split_kernel<<<int(p.rows), kSplitWarps * 32, kSplitSmem, stream>>>(a);
    check_cuda(kOp, cudaGetLastError(), "kernel launch");
    return;
  }
  check_cuda(kOp, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, block_topk_kernel, kWarps * 32, kBlockSmem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  const int64_t want = (p.rows + kWarps - 1) / kWarps;
  const int64_t resident = int64_t(sms) * (per_sm > 0 ? per_sm : 1);
  const int grid = int(want < resident ? want : resident);
  block_topk_kernel<<<grid, kWarps * 32, kBlockSmem, stream>>>(a);
  check_cuda(kOp, cudaGetLastError(), "kernel launch");
}

}  // namespace msa::cuda::topk
