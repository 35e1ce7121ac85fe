// Helpers shared by the tests: typed random tensors, varlen layouts and a comparator that reports
// the worst element. Tests keep their data as std::vector<double> and convert at the API edge.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "msa/msa.h"

namespace msa::test {

// Storage for one tensor in a given dtype, built from doubles (rounded to the dtype).
struct Buf {
  DType dtype = DType::f32;
  std::vector<uint8_t> bytes;
  Buf() = default;
  Buf(DType t, size_t n) : dtype(t), bytes(n * dtype_size(t)) {}
  Buf(DType t, const std::vector<double>& v) : Buf(t, v.size()) {
    for (size_t i = 0; i < v.size(); ++i) set(i, v[i]);
  }
  size_t size() const { return bytes.size() / dtype_size(dtype); }
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  void set(size_t i, double x) {
    switch (dtype) {
      case DType::f32: reinterpret_cast<float*>(bytes.data())[i] = float(x); break;
      case DType::bf16: reinterpret_cast<bf16*>(bytes.data())[i] = float_to_bf16(float(x)); break;
      case DType::f64: reinterpret_cast<double*>(bytes.data())[i] = x; break;
    }
  }
  double get(size_t i) const {
    switch (dtype) {
      case DType::f32: return reinterpret_cast<const float*>(bytes.data())[i];
      case DType::bf16: return bf16_to_float(reinterpret_cast<const bf16*>(bytes.data())[i]);
      case DType::f64: return reinterpret_cast<const double*>(bytes.data())[i];
    }
    return 0;
  }
  std::vector<double> to_double() const {
    std::vector<double> v(size());
    for (size_t i = 0; i < v.size(); ++i) v[i] = get(i);
    return v;
  }
  // Fill with a poison value so unwritten outputs are visible.
  void poison() {
    for (size_t i = 0; i < size(); ++i) set(i, std::nan(""));
  }
};

// Normal(0, sigma) values, never all zero; the values are rounded to dtype so a reference
// computed from the returned doubles sees exactly what the kernel sees.
inline std::vector<double> randn(std::mt19937_64& rng, size_t n, double sigma = 1.0, DType round_to = DType::f64) {
  std::normal_distribution<double> dist(0.0, sigma);
  std::vector<double> v(n);
  for (auto& x : v) x = dist(rng);
  if (round_to != DType::f64) {
    Buf b(round_to, v);
    v = b.to_double();
  }
  return v;
}

// cu_seqlens from lengths.
inline std::vector<int32_t> cu_from_lengths(const std::vector<int32_t>& lens) {
  std::vector<int32_t> cu(lens.size() + 1, 0);
  for (size_t b = 0; b < lens.size(); ++b) cu[b + 1] = cu[b] + lens[b];
  return cu;
}

// Compares got against ref elementwise: |got - ref| <= atol + rtol * |ref|; non-finite values
// must match in position and kind. On failure reports the worst element's index and values.
inline ::testing::AssertionResult allclose(const std::vector<double>& got, const std::vector<double>& ref,
                                           double atol, double rtol, const std::string& what = "") {
  if (got.size() != ref.size())
    return ::testing::AssertionFailure() << what << ": size " << got.size() << " != " << ref.size();
  double worst = -1;
  size_t worst_i = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    double g = got[i], r = ref[i];
    if (!std::isfinite(r) || !std::isfinite(g)) {
      bool same = (std::isnan(r) && std::isnan(g)) || (g == r);
      if (!same)
        return ::testing::AssertionFailure()
               << what << ": non-finite mismatch at " << i << ": got " << g << ", expected " << r;
      continue;
    }
    double excess = std::abs(g - r) - (atol + rtol * std::abs(r));
    if (excess > worst) {
      worst = excess;
      worst_i = i;
    }
  }
  if (worst > 0)
    return ::testing::AssertionFailure() << what << ": worst element " << worst_i << ": got " << got[worst_i]
                                         << ", expected " << ref[worst_i] << " (atol " << atol << ", rtol " << rtol
                                         << ")";
  return ::testing::AssertionSuccess();
}

// ||got - ref|| / ||ref|| (0 when both are zero).
inline double rel_l2(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

// Expects fn() to throw msa::Error whose message contains every fragment.
template <class F>
::testing::AssertionResult throws_error(F&& fn, std::initializer_list<const char*> fragments) {
  try {
    fn();
  } catch (const msa::Error& e) {
    std::string m = e.what();
    for (const char* f : fragments)
      if (m.find(f) == std::string::npos)
        return ::testing::AssertionFailure() << "error message \"" << m << "\" lacks \"" << f << "\"";
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-msa exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

}  // namespace msa::test
