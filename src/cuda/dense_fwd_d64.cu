// dense_fwd_d64.cu — instantiates the dense attention forward for d = 64 (all schedules); one
// file per head dim so the configurations compile in parallel.
#include "dense_fwd.cuh"

namespace msa::cuda {

template void launch_dense_fwd<64, false>(const CUtensorMap&, const CUtensorMap&, const DenseFwdKernelParams&,
                                           cudaStream_t);
template void launch_dense_fwd<64, true>(const CUtensorMap&, const CUtensorMap&, const DenseFwdKernelParams&,
                                          cudaStream_t);

template void launch_dense_fwd_persistent<64, false>(const CUtensorMap&, const CUtensorMap&, const CUtensorMap&,
                                                      const DenseFwdKernelParams&, int, cudaStream_t);
template void launch_dense_fwd_persistent<64, true>(const CUtensorMap&, const CUtensorMap&, const CUtensorMap&,
                                                      const DenseFwdKernelParams&, int, cudaStream_t);

}  // namespace msa::cuda
