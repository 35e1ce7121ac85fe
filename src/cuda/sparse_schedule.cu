// sparse_schedule.cu — the reverse index (query -> blocks becomes (kv head, block) -> queries) and
// the chunked work items of the CUDA sparse attention forward, built on the stream without any
// host synchronisation: per-query positions, per-group counts, one sort key per selection entry, a
// stable CUB radix sort, then bucket heads, chunk heads and their compaction by two scans.
#include <algorithm>
#include <cub/cub.cuh>
#include <stdexcept>

#include "common.cuh"
#include "host.h"
#include "sparse_schedule.h"
#include "sparse_tiles.h"

namespace msa::cuda {
namespace {

constexpr const char* kOp = "sparse_attention_forward";

constexpr int kThreads = 256;

// Entries per step of the work order's size rank (rank_step, or the item size when 0).
__host__ __device__ inline int rank_step(const SparseScheduleParams& p) {
  return p.rank_step > 0 ? p.rank_step : p.chunk;
}

// Grid of a grid-stride loop over n elements: enough blocks to fill the GPU, no more.
unsigned grid_for(int64_t n) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 8192)));
}

// qinfo[i] = {k0, p} for the pass's query i (packed row q0 + i). Offsets are clamped into [0, n]
// and positions into [-1, len_k), so garbage varlen contents give garbage attention but never an
// access outside the tensors: every key row a valid entry can touch is k0 + j with
// 0 <= j <= p < len_k, inside [0, n_k).
__global__ void query_info_kernel(SparseScheduleParams p, int2* qinfo) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.n_q; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = p.q0 + i;
    const int64_t b = p.cu_q ? find_seq(p.cu_q, p.batch, row) : 0;
    const SeqRows sr = seq_rows(p.cu_q, p.cu_k, b, p.n_q_all, p.n_k);
    qinfo[i] = make_int2(int(sr.k_lo), int(query_pos(p.q_pos, sr, row)));
  }
}

// The group of entry e: (kv head, first key row of the block) as r * n_k + row, or h_kv * n_k
// (`invalid`) for an entry that is skipped.
__device__ __forceinline__ uint64_t entry_group(const SparseScheduleParams& p, const int2* qinfo, int64_t e,
                                                uint64_t invalid) {
  const int64_t row = e / p.topk;  // i * h_kv + r
  const int64_t i = row / p.h_kv, r = row - i * p.h_kv;
  const int32_t b = p.topk_idx[e];
  const int2 qi = qinfo[i];
  if (p.local ? !sp_entry_remote(b, qi.y, p.bk_shift) : !sp_entry_valid(b, qi.y, p.bk_shift)) return invalid;
  return uint64_t(r) * uint64_t(p.n_k) + uint64_t(qi.x + int64_t(b) * p.bk);
}

// Queries per group (the counts are exact, so the order they give is deterministic).
__global__ void group_counts_kernel(SparseScheduleParams p, const int2* qinfo, int64_t n_e, int32_t* counts) {
  const uint64_t invalid = uint64_t(p.h_kv) * uint64_t(p.n_k);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n_e; e += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t grp = entry_group(p, qinfo, e, invalid);
    if (grp < invalid) atomicAdd(counts + grp, 1);
  }
}

// One sort key per entry: on top the query band (the pass's queries in runs of 2^band_shift), then
// the complement of the group's size in steps of rank_step entries (capped at heavy_max), then the
// group. Bands keep the q rows that the running items gather inside L2 (each row is gathered once
// per selected block); inside a band, groups of more steps sort first and the rest keep the group
// order. Invalid entries get the largest key so they sort behind every valid one.
__global__ void entry_keys_kernel(SparseScheduleParams p, const int2* qinfo, const int32_t* counts, int64_t n_e,
                                  int group_bits, int rank_bits, int band_shift, uint64_t heavy_max, uint64_t band_max,
                                  uint64_t* keys, uint32_t* vals) {
  const uint64_t invalid = uint64_t(p.h_kv) * uint64_t(p.n_k);
  const int64_t per_query = int64_t(p.h_kv) * p.topk;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n_e; e += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t grp = entry_group(p, qinfo, e, invalid);
    uint64_t rank = heavy_max, band = band_max;
    if (grp < invalid) {
      rank -= min(uint64_t(counts[grp] / rank_step(p)), heavy_max);
      band = uint64_t(e / per_query) >> band_shift;
    }
    keys[e] = (band << (group_bits + rank_bits)) | (rank << group_bits) | grp;
    vals[e] = uint32_t(e);
  }
}

// head[e] = e at the first entry of a group, else 0 (the max-scan then gives each entry its group's
// start). The last valid entry also records the valid count. lims[e] puts each valid entry's
// causal limit beside it, so the phase-1 gather reads it with the entry id instead of after it.
__global__ void group_heads_kernel(const uint64_t* keys, const uint32_t* entries, const int2* qinfo, uint32_t per_query,
                                   int64_t n_e, uint64_t invalid, int32_t* head, int32_t* lims, int32_t* counters) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n_e; e += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t k = keys[e];
    const bool valid = k < invalid;
    head[e] = valid && (e == 0 || keys[e - 1] != k) ? int32_t(e) : 0;
    if (valid && (e + 1 == n_e || keys[e + 1] >= invalid)) counters[0] = int32_t(e + 1);
    if (valid) {
      const int2 qi = qinfo[entries[e] / per_query];
      lims[e] = qi.x + qi.y;
    }
  }
}

// An item starts every `chunk` entries from its group's start.
__global__ void item_flags_kernel(const uint64_t* keys, const int32_t* group_start, int64_t n_e, uint64_t invalid,
                                  int chunk, int32_t* flags) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n_e; e += int64_t(gridDim.x) * blockDim.x)
    flags[e] = keys[e] < invalid && (int32_t(e) - group_start[e]) % chunk == 0 ? 1 : 0;
}

// Also drops the band and the order rank from the sorted keys (nothing after this reads it): phase 1 decodes
// the kv head and block from a plain group key.
__global__ void item_scatter_kernel(const int32_t* flags, const int32_t* slot, int64_t n_e, uint64_t group_mask,
                                    int32_t* item_start, int32_t* counters, uint64_t* keys) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n_e; e += int64_t(gridDim.x) * blockDim.x) {
    if (flags[e]) item_start[slot[e]] = int32_t(e);
    if (e + 1 == n_e) counters[1] = slot[e] + flags[e];
    keys[e] &= group_mask;
  }
}

// Local units: a unit starts where the sequence (k0), the own block or the kSpUnitQueries window
// changes (positions are clamped into [-1, len_k), so own = p >> bk_shift is -1 for a query that
// sees nothing: those form units with no block).
constexpr int kUnitWindowShift = 10;
static_assert(kSpUnitQueries == 1 << kUnitWindowShift, "the local pass sizes its tile flags by the unit window");
__global__ void unit_flags_kernel(const int2* qinfo, int64_t n_q, int bk_shift, int32_t* flags) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_q; i += int64_t(gridDim.x) * blockDim.x) {
    int f = 1;
    if (i > 0 && ((i - 1) >> kUnitWindowShift) == (i >> kUnitWindowShift)) {
      const int2 a = qinfo[i - 1], b = qinfo[i];
      f = a.x != b.x || (a.y >> bk_shift) != (b.y >> bk_shift);
    }
    flags[i] = f;
  }
}

__global__ void unit_scatter_kernel(const int32_t* flags, const int32_t* slot, int64_t n_q, int32_t* unit_start,
                                    int32_t* counters) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_q; i += int64_t(gridDim.x) * blockDim.x) {
    if (flags[i]) unit_start[slot[i]] = int32_t(i);
    if (i + 1 == n_q) counters[3] = slot[i] + flags[i];
  }
}

struct MaxOp {
  __device__ __forceinline__ int32_t operator()(int32_t a, int32_t b) const { return a > b ? a : b; }
};

int key_bits(uint64_t invalid) {
  int bits = 1;
  while (bits < 64 && (uint64_t(1) << bits) <= invalid) ++bits;
  return bits;
}

// Bits of the sort key: the group (room for `invalid` = h_kv * n_k), above it the order rank
// (0 .. heavy_max, heavy_max = 2^rank_bits - 1 >= the most rank steps a group can have), and on
// top the query band (0 .. band_max, band_max = 2^band_bits - 1 >= the last band).
struct KeyBits {
  int group = 1, rank = 1, band = 1;
  int band_shift = 62;  // the bands in effect (62: one band)
  uint64_t heavy_max() const { return (uint64_t(1) << rank) - 1; }
  uint64_t band_max() const { return (uint64_t(1) << band) - 1; }
  int end() const { return group + rank + band; }
};

KeyBits sort_key_bits(const SparseScheduleParams& p) {
  KeyBits kb;
  kb.group = key_bits(uint64_t(p.h_kv) * uint64_t(p.n_k));
  kb.rank = key_bits(uint64_t(p.n_q / std::max(rank_step(p), 1)));
  kb.band_shift = p.band_shift;
  kb.band = key_bits(p.band_shift >= 62 ? 0 : uint64_t(std::max<int64_t>(p.n_q - 1, 0)) >> p.band_shift);
  if (kb.end() > 64) {  // no room above the group and the rank: one band (order only, never values)
    kb.band_shift = 62;
    kb.band = 1;
  }
  return kb;
}

// Workspace map: the fixed arrays, then CUB's temporary storage.
struct Layout {
  size_t qinfo, keys_a, keys_b, vals_a, vals_b, lims, items, counts, units, unit_flags, unit_slots, counters, temp,
      temp_bytes, total;
};

Layout layout(const SparseScheduleParams& p) {
  const int64_t n_e = p.n_q * p.h_kv * p.topk;
  const int n = int(n_e);
  const int end_bit = sort_key_bits(p).end();
  size_t sort_bytes = 0, max_bytes = 0, sum_bytes = 0, unit_bytes = 0;
  check_cuda(kOp,
             cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const uint64_t*>(nullptr),
                                             static_cast<uint64_t*>(nullptr), static_cast<const uint32_t*>(nullptr),
                                             static_cast<uint32_t*>(nullptr), n, 0, end_bit),
             "cub radix sort (size query)");
  check_cuda(kOp,
             cub::DeviceScan::InclusiveScan(nullptr, max_bytes, static_cast<const int32_t*>(nullptr),
                                            static_cast<int32_t*>(nullptr), MaxOp{}, n),
             "cub max scan (size query)");
  check_cuda(kOp,
             cub::DeviceScan::ExclusiveSum(nullptr, sum_bytes, static_cast<const int32_t*>(nullptr),
                                           static_cast<int32_t*>(nullptr), n),
             "cub sum scan (size query)");
  if (p.local)
    check_cuda(kOp,
               cub::DeviceScan::ExclusiveSum(nullptr, unit_bytes, static_cast<const int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr), int(p.n_q)),
               "cub sum scan (size query)");
  Layout l{};
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off = align256(off + bytes);
    return at;
  };
  l.qinfo = take(size_t(p.n_q) * sizeof(int2));
  l.keys_a = take(size_t(n_e) * 8);
  l.keys_b = take(size_t(n_e) * 8);
  l.vals_a = take(size_t(n_e) * 4);
  l.vals_b = take(size_t(n_e) * 4);
  l.lims = take(size_t(n_e) * 4);
  l.items = take(size_t(n_e) * 4);
  l.counts = take(size_t(p.h_kv) * size_t(p.n_k) * 4);  // one counter per possible group key
  const size_t unit_arrays = p.local ? size_t(p.n_q) * 4 : 0;
  l.units = take(unit_arrays);
  l.unit_flags = take(unit_arrays);
  l.unit_slots = take(unit_arrays);
  l.counters = take(32);
  l.temp_bytes = std::max({sort_bytes, max_bytes, sum_bytes, unit_bytes, size_t(1)});
  l.temp = take(l.temp_bytes);
  l.total = off;
  return l;
}

}  // namespace

size_t sparse_schedule_bytes(const SparseScheduleParams& p) { return layout(p).total; }

SparseSchedule build_sparse_schedule(const SparseScheduleParams& p, void* ws, size_t ws_bytes, cudaStream_t stream) {
  const Layout l = layout(p);
  if (ws_bytes < l.total) throw std::runtime_error("msa::sparse_attention_forward: schedule workspace too small");
  uint8_t* base = static_cast<uint8_t*>(ws);
  const int64_t n_e = p.n_q * p.h_kv * p.topk;
  const int n = int(n_e);
  const KeyBits kb = sort_key_bits(p);
  // The largest sort key (an invalid entry); every valid one is smaller.
  const uint64_t invalid = (kb.band_max() << (kb.group + kb.rank)) | (kb.heavy_max() << kb.group) |
                           (uint64_t(p.h_kv) * uint64_t(p.n_k));

  SparseSchedule s;
  s.qinfo = reinterpret_cast<int2*>(base + l.qinfo);
  uint64_t* keys_a = reinterpret_cast<uint64_t*>(base + l.keys_a);
  s.keys = reinterpret_cast<uint64_t*>(base + l.keys_b);
  uint32_t* vals_a = reinterpret_cast<uint32_t*>(base + l.vals_a);
  s.entries = reinterpret_cast<uint32_t*>(base + l.vals_b);
  s.lims = reinterpret_cast<int32_t*>(base + l.lims);
  s.item_start = reinterpret_cast<int32_t*>(base + l.items);
  s.counters = reinterpret_cast<int32_t*>(base + l.counters);
  s.unit_start = p.local ? reinterpret_cast<int32_t*>(base + l.units) : nullptr;
  int32_t* counts = reinterpret_cast<int32_t*>(base + l.counts);
  void* temp = base + l.temp;
  size_t temp_bytes = l.temp_bytes;
  // After the sort the unsorted keys and values are dead: their space holds the scans' arrays.
  int32_t* head = reinterpret_cast<int32_t*>(keys_a);
  int32_t* group_start = head + n_e;
  int32_t* flags = reinterpret_cast<int32_t*>(vals_a);
  int32_t* slot = head;  // the heads are dead once the group starts exist

  check_cuda(kOp, cudaMemsetAsync(s.counters, 0, 32, stream), "cudaMemsetAsync");
  check_cuda(kOp, cudaMemsetAsync(counts, 0, size_t(p.h_kv) * size_t(p.n_k) * 4, stream), "cudaMemsetAsync");
  query_info_kernel<<<grid_for(p.n_q), kThreads, 0, stream>>>(p, s.qinfo);
  check_cuda(kOp, cudaGetLastError(), "query_info_kernel launch");
  group_counts_kernel<<<grid_for(n_e), kThreads, 0, stream>>>(p, s.qinfo, n_e, counts);
  check_cuda(kOp, cudaGetLastError(), "group_counts_kernel launch");
  entry_keys_kernel<<<grid_for(n_e), kThreads, 0, stream>>>(p, s.qinfo, counts, n_e, kb.group, kb.rank,
                                                            kb.band_shift, kb.heavy_max(), kb.band_max(), keys_a, vals_a);
  check_cuda(kOp, cudaGetLastError(), "entry_keys_kernel launch");
  check_cuda(
      kOp, cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_a, s.keys, vals_a, s.entries, n, 0, kb.end(), stream),
      "cub radix sort");
  group_heads_kernel<<<grid_for(n_e), kThreads, 0, stream>>>(s.keys, s.entries, s.qinfo, uint32_t(p.h_kv * p.topk), n_e,
                                                             invalid, head, s.lims, s.counters);
  check_cuda(kOp, cudaGetLastError(), "group_heads_kernel launch");
  temp_bytes = l.temp_bytes;
  check_cuda(kOp, cub::DeviceScan::InclusiveScan(temp, temp_bytes, head, group_start, MaxOp{}, n, stream),
             "cub max scan");
  item_flags_kernel<<<grid_for(n_e), kThreads, 0, stream>>>(s.keys, group_start, n_e, invalid, p.chunk, flags);
  check_cuda(kOp, cudaGetLastError(), "item_flags_kernel launch");
  temp_bytes = l.temp_bytes;
  check_cuda(kOp, cub::DeviceScan::ExclusiveSum(temp, temp_bytes, flags, slot, n, stream), "cub sum scan");
  item_scatter_kernel<<<grid_for(n_e), kThreads, 0, stream>>>(flags, slot, n_e, (uint64_t(1) << kb.group) - 1,
                                                              s.item_start, s.counters, s.keys);
  check_cuda(kOp, cudaGetLastError(), "item_scatter_kernel launch");
  if (p.local) {
    int32_t* uflags = reinterpret_cast<int32_t*>(base + l.unit_flags);
    int32_t* uslots = reinterpret_cast<int32_t*>(base + l.unit_slots);
    unit_flags_kernel<<<grid_for(p.n_q), kThreads, 0, stream>>>(s.qinfo, p.n_q, p.bk_shift, uflags);
    check_cuda(kOp, cudaGetLastError(), "unit_flags_kernel launch");
    temp_bytes = l.temp_bytes;
    check_cuda(kOp, cub::DeviceScan::ExclusiveSum(temp, temp_bytes, uflags, uslots, int(p.n_q), stream),
               "cub sum scan");
    unit_scatter_kernel<<<grid_for(p.n_q), kThreads, 0, stream>>>(uflags, uslots, p.n_q, s.unit_start, s.counters);
    check_cuda(kOp, cudaGetLastError(), "unit_scatter_kernel launch");
  }
  return s;
}

}  // namespace msa::cuda
