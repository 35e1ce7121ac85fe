// dense_bwd_d128.cu — instantiates the dense attention backward main kernel for d = 128; one file per
// head dim so the configurations compile in parallel.
#include "dense_bwd.cuh"

namespace msa::cuda {

template void launch_dense_bwd<128>(const CUtensorMap&, const CUtensorMap&, const CUtensorMap&, const CUtensorMap&,
                                    const CUtensorMap&, const DenseBwdKernelParams&, cudaStream_t);

}  // namespace msa::cuda
