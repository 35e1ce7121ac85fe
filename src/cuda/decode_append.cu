// decode_append.cu — append_kv on the GPU (new tokens' k, v, k_idx into their pages) and the
// stream-ordered scratch of the unplanned decode calls.
#include <stdexcept>
#include <string>

#include "decode.h"

namespace msa::cuda {

void run_append_kv(const AppendKvParams&, cudaStream_t) {
  throw std::runtime_error("msa::append_kv: the CUDA kernel is not built yet");
}

void* scratch_alloc(size_t bytes, cudaStream_t stream) {
  void* ptr = nullptr;
  cudaError_t e = cudaMallocAsync(&ptr, bytes, stream);
  if (e != cudaSuccess)
    throw std::runtime_error("msa decode: cudaMallocAsync of " + std::to_string(bytes) +
                             " bytes of workspace failed: " + cudaGetErrorString(e));
  return ptr;
}

void scratch_free(void* ptr, cudaStream_t stream) { cudaFreeAsync(ptr, stream); }

}  // namespace msa::cuda
