// tile_size.h — compile-time tile shapes of the CUDA index kernel (index_topk.cuh), each with the
// reason for its value. kIdxBlockN, kIdxConsumerWarpgroups and kIdxThreads fix register and
// shared-memory layouts; the stage bounds only move speed (the launcher picks the stage count
// that fits the shared memory left after Q and the per-row top-k lists).
#pragma once

namespace msa::cuda {

// Query rows ((token, head) pairs) per CTA. Q stays in shared memory for the whole key sweep, so
// every key byte read from L2 feeds kIdxBlockM rows: 256 FLOP per byte keeps the K stream under
// the L2 bandwidth at full tensor-core rate. Two consumer warpgroups x 2 wgmma M=64 halves.
constexpr int kIdxBlockM = 256;

// Keys per pipeline stage (one wgmma N). 128 is a multiple of both block sizes (64, 128), so a
// stage never splits a block, and m64n128 keeps the two accumulator halves at 64 registers each.
constexpr int kIdxBlockN = 128;

// Rows per consumer warpgroup: two m64 accumulator halves, software-pipelined so one half's
// block-max epilogue overlaps the other half's wgmma.
constexpr int kIdxRowsPerConsumer = 128;
constexpr int kIdxConsumerWarpgroups = kIdxBlockM / kIdxRowsPerConsumer;

// Two consumer warpgroups + one producer warpgroup (one thread issues the TMA loads). Registers
// are granted per warpgroup, so a lone producer warp would cost as much as a full warpgroup.
constexpr int kIdxThreads = (kIdxConsumerWarpgroups + 1) * 128;

// setmaxnreg split of the 64K registers: 128 accumulators + epilogue state per consumer thread
// need ~200; the producer loop needs ~20. 2 * 240 + 24 <= 512 per thread slot.
constexpr int kIdxConsumerRegs = 240;
constexpr int kIdxProducerRegs = 24;

// K pipeline depth bounds: 2 is the least that overlaps a load with compute; past 4 the L2
// latency is already hidden (a stage holds ~2000 cycles of tensor work).
constexpr int kIdxMinStages = 2;
constexpr int kIdxMaxStages = 4;

// Inner extent of one 128-byte-swizzled operand atom in bf16 elements (the TMA box width and
// the wgmma K-major SW128 row).
constexpr int kIdxAtomK = 64;

}  // namespace msa::cuda
