// sparse_fwd_d128.cu — instantiates phase 1 of the CUDA sparse attention forward for d = 128 (both block
// sizes); one file per d so the configurations compile in parallel.
#include "sparse_fwd.cuh"

namespace msa::cuda {

template void launch_sparse_phase1<128, 64>(const SparseFwdKernelParams&, int, int, cudaStream_t);
template void launch_sparse_phase1<128, 128>(const SparseFwdKernelParams&, int, int, cudaStream_t);
template void launch_sparse_local<128, 64>(const SparseFwdKernelParams&, int, int, cudaStream_t);
template void launch_sparse_local<128, 128>(const SparseFwdKernelParams&, int, int, cudaStream_t);

}  // namespace msa::cuda
