// AVX2 + FMA helpers shared by the kernels' AVX2 bodies (the CPUs without AVX-512): the target attribute,
// 8-lane loads and stores of float32 and bfloat16 (computed in float32), roundings, a vectorised exp and
// horizontal reductions. The counterpart of avx512_math.h, lane for lane the same arithmetic.
#pragma once

#include <c10/util/BFloat16.h>

#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma")))

namespace clex_cpu {

AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

AVX2 inline __m256 load8(const c10::BFloat16* p) {
  // bfloat16 is the high half of a float32: widen to 32 bits and shift into place.
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// v rounded to T's precision (to nearest even, as c10::BFloat16's conversion; finite inputs), as float32.
template <typename T> AVX2 inline __m256 round8(__m256 v) { return v; }

template <> AVX2 inline __m256 round8<c10::BFloat16>(__m256 v) {
  __m256i bits = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  return _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// The high halves of v's lanes (already rounded) as 8 bfloat16s.
AVX2 inline __m128i high_halves(__m256 v) {
  __m256i halves = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(halves), _mm256_extracti128_si256(halves, 1));
}

AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), high_halves(round8<c10::BFloat16>(v)));
}

// The first n (< 8) lanes of a row, the others zero; and v's first n lanes stored (v already rounded).
template <typename T> AVX2 inline __m256 load_first(const T* p, int64_t n) {
  alignas(32) float lanes[8] = {};
  for (int64_t i = 0; i < n; ++i) lanes[i] = static_cast<float>(p[i]);
  return _mm256_load_ps(lanes);
}
template <typename T> AVX2 inline void store_first(T* p, __m256 v, int64_t n) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(lanes[i]);
}

// n (at most 8) lanes of a row: a whole vector, or its first n. (No lambdas in AVX2 bodies: a lambda does
// not inherit its function's target.)
template <typename T> AVX2 inline __m256 load_part(const T* p, int64_t n) {
  return n == 8 ? load8(p) : load_first(p, n);
}
template <typename T> AVX2 inline void store_part(T* p, __m256 v, int64_t n) {
  if (n == 8) store8(p, v);
  else store_first(p, v, n);
}

// 2^k for k in float32's normal exponents, built in the exponent bits.
AVX2 inline __m256 power_of_two(__m256i k) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
}

// exp(x) as avx512_math.h's exp16, bit for bit: x clamped to [-100, 88], 2^n * 2^f with |f| <= 1/2, 2^f by
// its Taylor series to degree 7. AVX2 has no scalef: 2^n (n in [-144, 127]) is built in the exponent bits
// as two normal halves, 2^(n/2) twice, so that results below 2^-126 round once into denormals as scalef's.
AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-100.f)), _mm256_set1_ps(88.f));
  __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
  __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.6931471805599453f));  // f * ln 2
  __m256 p = _mm256_set1_ps(1.f / 5040);
  const float coefficients[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
  for (float c : coefficients) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
  __m256i e = _mm256_cvtps_epi32(n);
  __m256i high = _mm256_srai_epi32(e, 1), low = _mm256_sub_epi32(e, high);
  return _mm256_mul_ps(_mm256_mul_ps(p, power_of_two(high)), power_of_two(low));
}

AVX2 inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

AVX2 inline float max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

}  // namespace clex_cpu
