// Helpers for the CPU reference backend (internal): typed element access and a parallel loop.
// The reference computes in double; these convert at the edges.
#pragma once

#include <cstdint>

#include "msa/common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace msa::cpu {

inline double load(const void* base, DType t, int64_t off) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(base)[off];
    case DType::bf16: return bf16_to_float(static_cast<const bf16*>(base)[off]);
    case DType::f64: return static_cast<const double*>(base)[off];
  }
  return 0.0;
}

// Rounds to the storage type (float32 and bf16 round to nearest even).
inline void store(void* base, DType t, int64_t off, double v) {
  switch (t) {
    case DType::f32: static_cast<float*>(base)[off] = float(v); return;
    case DType::bf16: static_cast<bf16*>(base)[off] = float_to_bf16(float(v)); return;
    case DType::f64: static_cast<double*>(base)[off] = v; return;
  }
}

// Loads row [off, off + d) into dst as double.
inline void load_row(const void* base, DType t, int64_t off, int64_t d, double* dst) {
  for (int64_t c = 0; c < d; ++c) dst[c] = load(base, t, off + c);
}

inline double dot(const double* a, const double* b, int64_t d) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < d; ++c) s += a[c] * b[c];
  return s;
}

// Runs f(i) for i in [0, n) on num_threads threads (0: all), dynamically scheduled.
template <class F>
void parallel_for(int64_t n, int num_threads, F&& f) {
#ifdef _OPENMP
  int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t i = 0; i < n; ++i) f(i);
#else
  (void)num_threads;
  for (int64_t i = 0; i < n; ++i) f(i);
#endif
}

}  // namespace msa::cpu
