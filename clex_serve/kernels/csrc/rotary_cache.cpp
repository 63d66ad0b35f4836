// Rotary embedding, CLEX log scale of the queries and the K/V cache write on the CPU, in one pass over a
// step's tokens: about thirteen PyTorch operators per layer otherwise.
//
// At decode a layer's tensors are a few KB, so each PyTorch operator costs its dispatch, not its
// arithmetic. The kernel computes what its PyTorch equivalent computes, with the same roundings to the
// model's dtype between steps (the CUDA Triton kernels in ``kernels/`` follow the same rules), so float32
// and bfloat16 results match the eager path.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include "avx2_math.h"
#include "avx512_math.h"
#include "clex_cpu.h"
#include "elementwise.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <tuple>

namespace {

using clex_cpu::kRowsPerTask;
using clex_cpu::round16;

AVX512 inline __m512 load_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
AVX512 inline __m512 load_masked(const c10::BFloat16* p, __mmask16 m) {
  __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
AVX512 inline void store_masked(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
AVX512 inline void store_masked(c10::BFloat16* p, __m512 v, __mmask16 m) {  // v already rounded
  __m256i half = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
  _mm256_mask_storeu_epi16(p, m, half);
}

// One head of one token: x * cos + rotate_half(x) * sin over the rotary channels (each product and the sum
// rounded to the dtype, as the eager ops do), then times the query scale if any (rotate_head_on_cpu passes
// the other channels). Sixteen channels of each half at a time; the rounding is c10's to nearest
// even (``round16``), so the results are the scalar ones bit for bit.
template <typename T>
AVX512 void rotate_head(const T* source, T* target, const T* cos, const T* sin, int64_t rotary_dim,
                        const float* scale) {
  const int64_t half = rotary_dim / 2;
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512 factor = _mm512_set1_ps(scale ? *scale : 1.f);
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 m = static_cast<__mmask16>(half - i >= 16 ? 0xFFFF : (1u << (half - i)) - 1);
    __m512 x1 = load_masked(source + i, m), x2 = load_masked(source + half + i, m);
    __m512 c = load_masked(cos + i, m), s = load_masked(sin + i, m);
    __m512 minus_x2 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x2), sign));
    __m512 out1 = round16<T>(_mm512_add_ps(round16<T>(_mm512_mul_ps(x1, c)), round16<T>(_mm512_mul_ps(minus_x2, s))));
    __m512 out2 = round16<T>(_mm512_add_ps(round16<T>(_mm512_mul_ps(x2, c)), round16<T>(_mm512_mul_ps(x1, s))));
    if (scale) out1 = round16<T>(_mm512_mul_ps(out1, factor)), out2 = round16<T>(_mm512_mul_ps(out2, factor));
    store_masked(target + i, out1, m);
    store_masked(target + half + i, out2, m);
  }
}

// rotate_head's AVX2 body: eight channels of each half at a time, the last few of a half in scalar lanes
// (load_first), with the same roundings.
template <typename T>
AVX2 void rotate_head_avx2(const T* source, T* target, const T* cos, const T* sin, int64_t rotary_dim,
                           const float* scale) {
  using clex_cpu::round8;
  const int64_t half = rotary_dim / 2;
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256 factor = _mm256_set1_ps(scale ? *scale : 1.f);
  for (int64_t i = 0; i < half; i += 8) {
    const int64_t n = std::min<int64_t>(8, half - i);
    __m256 x1 = clex_cpu::load_part(source + i, n), x2 = clex_cpu::load_part(source + half + i, n);
    __m256 c = clex_cpu::load_part(cos + i, n), s = clex_cpu::load_part(sin + i, n);
    __m256 minus_x2 = _mm256_xor_ps(x2, sign);
    __m256 out1 = round8<T>(_mm256_add_ps(round8<T>(_mm256_mul_ps(x1, c)), round8<T>(_mm256_mul_ps(minus_x2, s))));
    __m256 out2 = round8<T>(_mm256_add_ps(round8<T>(_mm256_mul_ps(x2, c)), round8<T>(_mm256_mul_ps(x1, s))));
    if (scale) out1 = round8<T>(_mm256_mul_ps(out1, factor)), out2 = round8<T>(_mm256_mul_ps(out2, factor));
    clex_cpu::store_part(target + i, out1, n);  // rounded already: store8's rounding changes nothing
    clex_cpu::store_part(target + half + i, out2, n);
  }
}

// One head on the ISA's body; the channels past the rotary ones pass (scaled too, for queries).
template <typename T>
void rotate_head_on_cpu(bool avx512, const T* source, T* target, const T* cos, const T* sin, int64_t head_dim,
                        int64_t rotary_dim, const float* scale) {
  if (avx512) rotate_head<T>(source, target, cos, sin, rotary_dim, scale);
  else rotate_head_avx2<T>(source, target, cos, sin, rotary_dim, scale);
  for (int64_t i = rotary_dim; i < head_dim; ++i)
    target[i] = scale ? static_cast<T>(static_cast<float>(source[i]) * *scale) : source[i];
}

template <typename T>
void rotate_and_cache_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                           const at::Tensor& sin, const at::Tensor& query_scale, const at::Tensor& slots,
                           at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& q_out, at::Tensor& k_out) {
  const int64_t tokens = q.size(0), heads = q.size(1), kv_heads = k.size(1), head_dim = q.size(2);
  const int64_t rotary_dim = cos.size(1);
  const int64_t* slot = slots.data_ptr<int64_t>();
  const bool avx512 = clex_cpu::avx512_active();
  // The pointers once: data_ptr checks the dtype on every call, and this loop called it for every head.
  const T *q_in = q.data_ptr<T>(), *k_in = k.data_ptr<T>(), *v_in = v.data_ptr<T>();
  const T *cos_rows = cos.data_ptr<T>(), *sin_rows = sin.data_ptr<T>();
  const T* scales = query_scale.defined() ? query_scale.data_ptr<T>() : nullptr;
  T *q_rotated = q_out.data_ptr<T>(), *k_rotated = k_out.data_ptr<T>();
  T *k_slots = k_cache.data_ptr<T>(), *v_slots = v_cache.data_ptr<T>();
  const int64_t row_bytes = head_dim * static_cast<int64_t>(sizeof(T));
  auto cached_key = [&](int64_t t, int64_t h) {
    return k_slots + slot[t] * k_cache.stride(0) + h * k_cache.stride(1);
  };
  auto cached_value = [&](int64_t t, int64_t h) {
    return v_slots + slot[t] * v_cache.stride(0) + h * v_cache.stride(1);
  };
  at::parallel_for(0, tokens, kRowsPerTask, [&](int64_t first, int64_t last) {
    // The cache lines the keys and values go to, asked for (to write) before any is written: a slot's
    // lines are seldom in cache, and a copy into one waits for memory to hand them over; asked for
    // together, those waits overlap (perf at 16 float32 streams: the copies were half of this kernel).
    for (int64_t t = first; t < last; ++t)
      for (int64_t h = 0; h < kv_heads; ++h)
        for (int64_t line = 0; line < row_bytes; line += 64) {
          _m_prefetchw(reinterpret_cast<char*>(cached_key(t, h)) + line);
          _m_prefetchw(reinterpret_cast<char*>(cached_value(t, h)) + line);
        }
    for (int64_t t = first; t < last; ++t) {
      const T* c = cos_rows + t * cos.stride(0);
      const T* s = sin_rows + t * sin.stride(0);
      // The scale as the eager path holds it: a tensor of the model dtype.
      float scale_value = scales ? static_cast<float>(scales[t]) : 1.f;
      const float* scale = scales ? &scale_value : nullptr;
      for (int64_t h = 0; h < heads; ++h)
        rotate_head_on_cpu<T>(avx512, q_in + t * q.stride(0) + h * q.stride(1),
                              q_rotated + t * q_out.stride(0) + h * q_out.stride(1), c, s, head_dim, rotary_dim,
                              scale);
      for (int64_t h = 0; h < kv_heads; ++h) {
        T* key = k_rotated + t * k_out.stride(0) + h * k_out.stride(1);
        rotate_head_on_cpu<T>(avx512, k_in + t * k.stride(0) + h * k.stride(1), key, c, s, head_dim, rotary_dim,
                              nullptr);
        std::memcpy(cached_key(t, h), key, row_bytes);
        std::memcpy(cached_value(t, h), v_in + t * v.stride(0) + h * v.stride(1), row_bytes);
      }
    }
  });
}

}  // namespace

namespace clex_cpu {

// q [N, Hq, D], k/v [N, Hkv, D] (any strides, unit last), cos/sin [N, rotary_dim] (cat(angles, angles)),
// query_scale [N] or none, slots [N] int64; k_cache/v_cache [slots, Hkv, D] views of the pool (any layout,
// unit last stride). Returns the rotated (and scaled) queries and the rotated keys, [N, H, D] each; the
// keys and values are also written to their slots.
std::tuple<at::Tensor, at::Tensor> rotate_and_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& cos, const at::Tensor& sin,
                                                    const std::optional<at::Tensor>& query_scale,
                                                    const at::Tensor& slots, at::Tensor k_cache, at::Tensor v_cache) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &k_cache, &v_cache})
    TORCH_CHECK(t->dim() == 3 && t->stride(2) == 1 && t->scalar_type() == q.scalar_type(),
                "rotate_and_cache: 3-d tensors of one dtype with a unit last stride");
  TORCH_CHECK(cos.dim() == 2 && cos.stride(1) == 1 && sin.strides() == cos.strides() && cos.size(0) == q.size(0) &&
              cos.scalar_type() == q.scalar_type() && cos.size(1) <= q.size(2) && cos.size(1) % 2 == 0,
              "rotate_and_cache: cos/sin [tokens, rotary_dim] of the dtype of q");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == q.size(0),
              "rotate_and_cache: slots [tokens] int64");
  at::Tensor scale = query_scale.has_value() ? query_scale->contiguous() : at::Tensor();
  TORCH_CHECK(!scale.defined() || (scale.numel() == q.size(0) && scale.scalar_type() == q.scalar_type()),
              "rotate_and_cache: query_scale [tokens] of the dtype of q");
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  if (q.scalar_type() == at::kFloat)
    rotate_and_cache_impl<float>(q, k, v, cos, sin, scale, slots, k_cache, v_cache, q_out, k_out);
  else if (q.scalar_type() == at::kBFloat16)
    rotate_and_cache_impl<c10::BFloat16>(q, k, v, cos, sin, scale, slots, k_cache, v_cache, q_out, k_out);
  else
    TORCH_CHECK(false, "rotate_and_cache: float32 or bfloat16");
  return {q_out, k_out};
}

}  // namespace clex_cpu
