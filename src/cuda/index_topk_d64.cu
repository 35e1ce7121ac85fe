// index_topk_d64.cu — instantiates the fused index kernel for d_idx = 64 (both block sizes, with
// and without index_lse); one file per d_idx so the configurations compile in parallel.
#include "index_topk.cuh"

namespace msa::cuda {

template void launch_index_topk<64, 64, false>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);
template void launch_index_topk<64, 64, true>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);
template void launch_index_topk<64, 128, false>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);
template void launch_index_topk<64, 128, true>(const CUtensorMap&, IndexKernelParams, int, cudaStream_t);

}  // namespace msa::cuda
