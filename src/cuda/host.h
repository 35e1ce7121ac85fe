// host.h — host-side helpers the msa CUDA launchers share: CUDA error checks that throw with the
// public operation's name, pointer alignment, stream-ordered scratch that is freed on every path,
// programmatic dependent launches, and TMA tensor maps (the driver's encoder found through the
// runtime, bf16 maps in the 128-byte swizzle). Header-only; internal to src/cuda.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "msa/common.h"

namespace msa::cuda {

// op is the public function without the namespace ("index_topk"): messages read
// "msa::<op>: <what>: <CUDA error string>".
[[noreturn]] inline void throw_cuda_error(const char* op, const std::string& what, cudaError_t e) {
  throw std::runtime_error(std::string("msa::") + op + ": " + what + ": " + cudaGetErrorString(e));
}

inline void check_cuda(const char* op, cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw_cuda_error(op, what, e);
}

// bytes is a power of two.
inline bool is_aligned(const void* ptr, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(ptr) & (bytes - 1)) == 0; }

// Workspace pieces start at 256-byte boundaries.
inline size_t align256(size_t x) { return (x + 255) & ~size_t(255); }

// Raises a kernel's dynamic shared-memory limit to bytes on the current device once (per size
// reached), not on every launch: launchers called every decode step stay cheap and capturable.
inline void ensure_smem(const char* op, const void* kernel, size_t bytes) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> done;
  int dev = 0;
  check_cuda(op, cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  size_t& have = done[{kernel, dev}];
  if (have >= bytes) return;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess)
    throw_cuda_error(op, "cudaFuncSetAttribute(" + std::to_string(bytes) + " bytes of shared memory) failed", err);
  have = bytes;
}

// Calls f(std::integral_constant<int, 64>{}) when v is 64, else f(std::integral_constant<int, 128>{}):
// the compile-time sizes (d, d_idx, bk) the CUDA kernels are instantiated for; callers reject other
// values first. Nested for several sizes:
//   with_64_or_128(d, [&](auto D) { with_64_or_128(bk, [&](auto BK) { launch<D(), BK()>(...); }); });
template <class F>
void with_64_or_128(int v, F&& f) {
  if (v == 64)
    f(std::integral_constant<int, 64>{});
  else
    f(std::integral_constant<int, 128>{});
}

// A kernel's dynamic shared memory, checked against the device's opt-in limit (a clear error that
// names what needs it) and then granted through ensure_smem. what: "phase 1", "the kernel", ...
inline void require_smem(const char* op, const char* what, const void* kernel, size_t bytes, int smem_optin) {
  if (bytes > size_t(smem_optin))
    throw std::runtime_error(std::string("msa::") + op + ": " + what + " needs " + std::to_string(bytes) +
                             " bytes of shared memory per block, the device has " + std::to_string(smem_optin));
  ensure_smem(op, kernel, bytes);
}

// Launches kernel as a programmatic dependent of the stream's previous kernel (programmatic
// dependent launch): its CTAs may start while that grid's last CTAs finish, and it calls
// griddepcontrol.wait before it reads what that grid wrote.
template <class... Params, class... Args>
void launch_programmatic(const char* op, const char* what, void (*kernel)(Params...), dim3 grid, dim3 block,
                         size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  check_cuda(op, cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...), what);
}

// The smallest l with 2^l >= x: log2 of a power of two (group sizes, block sizes).
inline int log2_exact(int64_t x) {
  int l = 0;
  while ((int64_t(1) << l) < x) ++l;
  return l;
}

// The documented default of a zero stride in a [tokens, h, d] tensor: contiguous heads of d
// elements, tokens of h heads.
inline void default_strides(int64_t& tok, int64_t& head, int64_t h, int64_t d) {
  if (head == 0) head = d;
  if (tok == 0) tok = h * head;
}

// The workspace plan of the largest query pass in [1, max_pass] that fits limit bytes, for ops
// whose workspace grows with the pass: plan(pass) builds a plan, bytes(plan) is its size. fn is the
// error prefix ("msa::op: "); a budget below one query's plan throws msa::Error.
template <class MakePlan, class Bytes>
auto largest_fitting_plan(const std::string& fn, size_t limit, int64_t max_pass, MakePlan plan, Bytes bytes) {
  auto best = plan(int64_t(1));
  if (bytes(best) > limit)
    throw Error(fn + "max_workspace_bytes = " + std::to_string(limit) + ", expected at least " +
                std::to_string(bytes(best)) + " (one query per pass)");
  int64_t lo = 1, hi = max_pass > 1 ? max_pass : 1;  // lo fits
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    auto cand = plan(mid);
    if (bytes(cand) <= limit) {
      lo = mid;
      best = cand;
    } else {
      hi = mid - 1;
    }
  }
  return best;
}

// Frees stream-ordered scratch once the work queued before it is done, also on a throw.
struct ScratchGuard {
  void* ptr = nullptr;
  cudaStream_t stream = nullptr;
  ScratchGuard() = default;
  ScratchGuard(const ScratchGuard&) = delete;
  ScratchGuard& operator=(const ScratchGuard&) = delete;
  ~ScratchGuard() {
    if (ptr) cudaFreeAsync(ptr, stream);
  }
};

// The driver's tensor-map encoder, found through the runtime so that msa needs no libcuda link.
// Looked up once per process; throws (naming op) when the driver lacks it.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder(const char* op) {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found);
    if (e != cudaSuccess || found != cudaDriverEntryPointSuccess) ptr = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  if (fn == nullptr)
    throw std::runtime_error(std::string("msa::") + op +
                             ": the CUDA driver has no cuTensorMapEncodeTiled (driver too old?)");
  return fn;
}

// Tiled map over a RANK-dimensional bf16 tensor: dims innermost first, byte strides of dims
// 1 .. RANK-1, box in elements; 128-byte swizzle (the layout wgmma's SW128 descriptors read),
// 256-byte L2 promotion, no out-of-bounds fill. base needs 16-byte alignment and strides
// multiples of 16 bytes.
template <int RANK>
CUtensorMap make_bf16_tensor_map_sw128(const char* op, const void* base, const cuuint64_t (&dims)[RANK],
                                       const cuuint64_t (&byte_strides)[RANK - 1], const cuuint32_t (&box)[RANK]) {
  CUtensorMap map;
  std::memset(&map, 0, sizeof(map));
  cuuint32_t elem_strides[RANK];
  for (int i = 0; i < RANK; ++i) elem_strides[i] = 1;
  CUresult r = tensor_map_encoder(op)(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, RANK, const_cast<void*>(base), dims,
                                      byte_strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error(std::string("msa::") + op + ": cuTensorMapEncodeTiled failed with error " +
                             std::to_string(int(r)));
  return map;
}

}  // namespace msa::cuda
