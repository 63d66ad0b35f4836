// AVX-512 helpers shared by the kernels: the target attribute, 16-lane loads and stores of float32 and
// bfloat16 (computed in float32), and a vectorised exp.
#pragma once

#include <c10/util/BFloat16.h>

#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace clex_cpu {

AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

AVX512 inline __m512 load16(const c10::BFloat16* p) {
  // bfloat16 is the high half of a float32: widen to 32 bits and shift into place.
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// v rounded to T's precision (to nearest even, as c10::BFloat16's conversion; finite inputs), as float32.
template <typename T> AVX512 inline __m512 round16(__m512 v) { return v; }

template <> AVX512 inline __m512 round16<c10::BFloat16>(__m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  return _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

AVX512 inline void store16(c10::BFloat16* p, __m512 v) {
  __m512i bits = _mm512_castps_si512(round16<c10::BFloat16>(v));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

// exp(x), x clamped to [-100, 88] (beyond: 0 and float32's overflow): 2^n * 2^f with |f| <= 1/2, 2^f by its
// Taylor series to degree 7 (relative error below 1e-8, under float32's rounding; not always the same last
// bit as std::exp or PyTorch's vectorised exp).
AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-100.f)), _mm512_set1_ps(88.f));
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));  // f * ln 2
  __m512 p = _mm512_set1_ps(1.f / 5040);
  const float coefficients[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
  for (float c : coefficients) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

}  // namespace clex_cpu
