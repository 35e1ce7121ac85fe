// CUDA backend discovery: whether a GPU is visible at run time.
#include <cuda_runtime.h>

#include "msa/common.h"

namespace msa {

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error so later calls start clean
    return 0;
  }
  return n;
}

}  // namespace msa
