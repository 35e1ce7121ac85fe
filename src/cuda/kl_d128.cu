// kl_d128.cu — the KL main kernel instantiated for d = 128 (every d_idx and bk).
#include "kl.cuh"

namespace msa::cuda {
template void launch_kl_main<128, 64, 64>(const KlKernelParams&, const char*, int, int, cudaStream_t);
template void launch_kl_main<128, 64, 128>(const KlKernelParams&, const char*, int, int, cudaStream_t);
template void launch_kl_main<128, 128, 64>(const KlKernelParams&, const char*, int, int, cudaStream_t);
template void launch_kl_main<128, 128, 128>(const KlKernelParams&, const char*, int, int, cudaStream_t);
}  // namespace msa::cuda
