// sparse_bwd_d128.cu — instantiates the CUDA sparse attention backward main kernel for d = 128
// (bk = 64 and 128), so the configurations compile in parallel.
#include "sparse_bwd.cuh"

namespace msa::cuda {

template void launch_sparse_bwd<128, 64>(const SparseBwdKernelParams&, int, int64_t, int, cudaStream_t);
template void launch_sparse_bwd<128, 128>(const SparseBwdKernelParams&, int, int64_t, int, cudaStream_t);

}  // namespace msa::cuda
