// index_topk_d128.cu — instantiates the fused index kernel for d_idx = 128 (both block sizes, with
// and without index_lse); one file per d_idx so the configurations compile in parallel.
#include "index_topk.cuh"

namespace msa::cuda {

template void launch_index_topk<128, 64, false>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);
template void launch_index_topk<128, 64, true>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);
template void launch_index_topk<128, 128, false>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);
template void launch_index_topk<128, 128, true>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);

}  // namespace msa::cuda
