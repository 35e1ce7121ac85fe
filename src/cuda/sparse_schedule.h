// sparse_schedule.h — the reverse index and work schedule of the CUDA sparse attention forward
// (internal, CUDA sources only): per query its key offset and position, the (query, slot) entries
// of the selection grouped by (kv head, kv block) in query order (a CSR built by a stable sort),
// and the work items (chunks of at most `chunk` entries of one group) that phase 1 walks. Built
// for one pass: a contiguous range of packed query rows (sparse_tiles.h, kSpPassRows).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace msa::cuda {

struct SparseScheduleParams {
  int64_t n_q = 0;       // query rows of this pass
  int64_t q0 = 0;        // packed row of the pass's first query
  int64_t n_q_all = 0;   // packed query rows of the call (what cu_q and q_pos describe)
  int64_t n_k = 0, batch = 1;
  const int32_t* cu_q = nullptr;      // [batch+1] device, or null (one sequence)
  const int32_t* cu_k = nullptr;      // [batch+1] device, or null (then cu_q)
  const int32_t* q_pos = nullptr;     // [n_q_all] device, or null (bottom-right aligned)
  const int32_t* topk_idx = nullptr;  // [n_q, h_kv, topk] device, the pass's rows, any contents
  int h_kv = 1, topk = 1, bk = 128;
  int bk_shift = 7;  // log2(bk): bk is a power of two
  int chunk = 1;     // most entries (queries) per work item
  int rank_step = 0;  // the work order ranks groups by size in steps of this many entries; 0: chunk
  int band_shift = 62;  // items are ordered by query band (2^band_shift pass rows) first; 62: one band
  // 1: the local pass attends each query's sink block (0) and own block (p / bk) and merges the
  // partials: those entries get no work item, and the schedule also lists the local units.
  int local = 0;
};

// Views into the workspace, valid once build_sparse_schedule's work has run on the stream.
// An entry id is e = (i * h_kv + r) * topk + s: query i of the pass, kv head r, slot s of its
// selection row. Groups chosen by at least `rank_step` queries come first (the more steps, the
// earlier), the others in key order: phase 1 takes items in this order, so the items of hot blocks
// start first instead of finishing last.
struct SparseSchedule {
  int2* qinfo = nullptr;        // [n_q] {first key row k0 of the query's sequence, position p}; p = -1: sees nothing
  uint64_t* keys = nullptr;     // [n_e] group key r * n_k + (first key row of the block) of each sorted entry; invalid = h_kv * n_k
  uint32_t* entries = nullptr;  // [n_e] entry ids in group order, ascending e within a group (valid ones first)
  int32_t* lims = nullptr;      // [n_e] per sorted valid entry: its query's last visible key row k0 + p
  int32_t* item_start = nullptr;  // [n_e] first sorted position of each work item
  // Local units (local = 1): runs of consecutive pass queries with the same sequence, own block and
  // 1024-query window; unit u is queries [unit_start[u], unit_start[u + 1]) (the last ends at n_q).
  int32_t* unit_start = nullptr;  // [n_q]
  // [8] n_valid, n_items, phase-1 work counter (0), n_units, local work counter (0), spare
  int32_t* counters = nullptr;
};

// Bytes of workspace build_sparse_schedule needs (queries CUB, so it needs the current device).
size_t sparse_schedule_bytes(const SparseScheduleParams& p);

// Enqueues the schedule kernels on stream into ws (at least sparse_schedule_bytes, 256-aligned).
// Deterministic: a stable radix sort keeps each group's entries in ascending entry order, so the
// same selection always gives the same items, tiles and rows. Throws std::runtime_error on CUDA
// failures.
SparseSchedule build_sparse_schedule(const SparseScheduleParams& p, void* ws, size_t ws_bytes, cudaStream_t stream);

#ifdef __CUDACC__
// The one validity rule for a selected block b of a query at position p (phase 1 computes exactly
// the entries that the combine merges): a visible block of a query that sees something.
// Invalid entries (padding, out of range, garbage) are skipped everywhere.
__device__ __forceinline__ bool sp_entry_valid(int32_t b, int32_t p, int bk_shift) {
  return p >= 0 && b >= 0 && b <= (p >> bk_shift);
}
// With the local pass: a valid entry that phase 1 computes and the local pass merges as a partial
// (every valid block but the sink block 0 and the query's own block, which the local pass attends).
__device__ __forceinline__ bool sp_entry_remote(int32_t b, int32_t p, int bk_shift) {
  return sp_entry_valid(b, p, bk_shift) && b != 0 && b != (p >> bk_shift);
}
#endif

}  // namespace msa::cuda
