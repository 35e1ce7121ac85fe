// Library-wide helpers: names, bf16 conversion, version and backend discovery.
#include <cstring>

#include "msa/common.h"
#include "msa/decode.h"
#include "fp8.h"

#ifndef MSA_VERSION_STRING
#define MSA_VERSION_STRING "0.0.0"
#endif

namespace msa {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::bf16: return "bfloat16";
    case DType::f64: return "float64";
  }
  return "unknown";
}

const char* backend_name(Backend b) {
  switch (b) {
    case Backend::cpu: return "cpu";
    case Backend::cuda: return "cuda";
  }
  return "unknown";
}

const char* index_key_format_name(IndexKeyFormat f) {
  switch (f) {
    case IndexKeyFormat::native: return "native";
    case IndexKeyFormat::fp8_e4m3: return "fp8_e4m3";
  }
  return "unknown";
}

float quantize_e4m3_row(const float* x, int64_t n, uint8_t* out) { return detail::e4m3_quantize_row(x, n, out); }

int64_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::f64: return 8;
  }
  return 0;
}

float bf16_to_float(bf16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

bf16 float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return bf16{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{uint16_t(u >> 16)};
}

const char* version() { return MSA_VERSION_STRING; }

#ifndef MSA_WITH_CUDA
bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }
#endif

}  // namespace msa
