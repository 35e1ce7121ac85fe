// fp8.h — the e4m3 codec of the FP8 index-key cache on the host: exact encode (round to nearest
// even, saturating at +-448) and decode, and the per-row quantization contract of
// IndexKeyFormat::fp8_e4m3 (msa/decode.h). The CUDA kernels use the hardware conversion
// (cvt.rn.satfinite.e4m3x2.f32), which rounds the same way; the tests hold them to equal bytes.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace msa::detail {

constexpr float kE4m3Max = 448.f;
constexpr float kE4m3MinAmax = 0x1p-100f;  // rows whose max |x| is below this quantize to zero

// float -> e4m3 byte (sign bit 7, exponent bits 6..3 with bias 7, mantissa bits 2..0), round to
// nearest even, finite results only (|x| >= 448 gives +-448). x must be finite.
inline uint8_t e4m3_encode(float x) {
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  const float a = std::fabs(x);
  if (a >= kE4m3Max) return uint8_t(sign | 0x7E);
  if (a < 0x1p-6f) {  // subnormal range: multiples of 2^-9 (8 * 2^-9 is the smallest normal, byte 8)
    const int m = int(std::nearbyint(a * 0x1p9f));
    return uint8_t(sign | m);
  }
  int e = 0;
  const float f = std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1)
  e -= 1;                             // a = (2 f) * 2^e, 2 f in [1, 2)
  int m = int(std::nearbyint((2.f * f - 1.f) * 8.f));  // exact: 2 f - 1 has at most 23 bits
  if (m == 8) m = 0, e += 1;
  return uint8_t(sign | ((e + 7) << 3) | m);  // e <= 8 here, and e = 8 keeps m <= 6 (a < 448)
}

inline float e4m3_decode(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  float a;
  if (e == 0)
    a = std::ldexp(float(m), -9);
  else if (e == 15 && m == 7)
    a = std::numeric_limits<float>::quiet_NaN();
  else
    a = std::ldexp(1.f + float(m) / 8.f, e - 7);
  return (b & 0x80) ? -a : a;
}

// Quantizes n float32 values to e4m3 bytes with one scale (the contract of IndexKeyFormat::fp8_e4m3):
// returns the scale, 0 (with zero bytes) when max |x| < 2^-100 (an all-zero row; the bound keeps
// 448 / max finite), and NaN (with zero bytes) when any value is not finite.
inline float e4m3_quantize_row(const float* x, int64_t n, uint8_t* out) {
  float a = 0.f;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    finite = finite && std::isfinite(x[i]);
    a = std::fmax(a, std::fabs(x[i]));
  }
  if (!finite || a < kE4m3MinAmax) {
    for (int64_t i = 0; i < n; ++i) out[i] = 0;
    return finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
  }
  const float inv = kE4m3Max / a;
  for (int64_t i = 0; i < n; ++i) out[i] = e4m3_encode(x[i] * inv);
  return a / kE4m3Max;
}

}  // namespace msa::detail
