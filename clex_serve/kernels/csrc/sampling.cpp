// Sampling on the CPU: the greedy rows' argmax, vectorised, and temperature sampling in one call:
// softmax(x / T) and the inverse of its cumulative distribution at one uniform draw per row, without a
// probability tensor or a float64 cumulative one.
//
// The PyTorch way (engine/sampler.py) divides, takes the softmax, widens to float64, sums cumulatively and
// searches: five vocabulary-sized passes and three temporaries, about 1.2 ms of a 16-stream step at a
// vocabulary of 32,000 (5% of it). Here a row is read twice: once for its maximum, once for the
// exponentials, which are summed in float64 per 16 and overall; the draw then walks the 16-sums and one
// 16 of exponentials. A token of probability zero (a logit of -inf) is never drawn.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "avx2_math.h"
#include "avx512_math.h"
#include "clex_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// The row's largest x / T (its tail included) and, where it is finite, the weights exp(x / T - top) of its
// whole 16s with their float64 sums per 16 in ``sums``.
AVX512 float weigh_row(const float* x, int64_t vocab, float temperature, float* weights, double* sums) {
  const int64_t full = vocab / 16 * 16;
  const __m512 t = _mm512_set1_ps(temperature);
  __m512 largest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < full; i += 16) largest = _mm512_max_ps(largest, _mm512_div_ps(_mm512_loadu_ps(x + i), t));
  float top = _mm512_reduce_max_ps(largest);
  for (int64_t i = full; i < vocab; ++i) top = std::max(top, x[i] / temperature);
  if (!(top > -std::numeric_limits<float>::infinity())) return top;
  const __m512 top_vector = _mm512_set1_ps(top);
  // Weights below float32's smallest normal are 0: exp16 clamps at -100, so a token masked to -inf (a
  // structured output's mask leaves most of a row so) would weigh a denormal, which is never to be drawn
  // and made this loop five times slower.
  const __m512 smallest_normal_exponent = _mm512_set1_ps(-87.f);
  for (int64_t i = 0, chunk = 0; i < full; i += 16, ++chunk) {
    const __m512 shifted = _mm512_sub_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), t), top_vector);
    const __mmask16 weighed = _mm512_cmp_ps_mask(shifted, smallest_normal_exponent, _CMP_GE_OQ);
    __m512 w = _mm512_maskz_mov_ps(weighed, clex_cpu::exp16(shifted));
    _mm512_storeu_ps(weights + i, w);
    // Sixteen float32 weights summed in float64: rounding moves no mass between tokens.
    __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(w));
    __m512d high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1)));
    sums[chunk] = _mm512_reduce_add_pd(_mm512_add_pd(low, high));
  }
  return top;
}

// weigh_row's AVX2 body: the same weights (exp8 is exp16 bit for bit), each 16's sum in float64 from two
// halves of 8 (the float64 additions in another order: a sum may differ in its last bit).
AVX2 float weigh_row_avx2(const float* x, int64_t vocab, float temperature, float* weights, double* sums) {
  const int64_t full = vocab / 16 * 16;
  const __m256 t = _mm256_set1_ps(temperature);
  __m256 largest = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < full; i += 8) largest = _mm256_max_ps(largest, _mm256_div_ps(_mm256_loadu_ps(x + i), t));
  float top = clex_cpu::max8(largest);
  for (int64_t i = full; i < vocab; ++i) top = std::max(top, x[i] / temperature);
  if (!(top > -std::numeric_limits<float>::infinity())) return top;
  const __m256 top_vector = _mm256_set1_ps(top), smallest_normal_exponent = _mm256_set1_ps(-87.f);
  for (int64_t i = 0, chunk = 0; i < full; i += 16, ++chunk) {
    __m256d sum = _mm256_setzero_pd();
    for (int64_t h = 0; h < 16; h += 8) {
      const __m256 shifted = _mm256_sub_ps(_mm256_div_ps(_mm256_loadu_ps(x + i + h), t), top_vector);
      const __m256 weighed = _mm256_cmp_ps(shifted, smallest_normal_exponent, _CMP_GE_OQ);
      const __m256 w = _mm256_and_ps(weighed, clex_cpu::exp8(shifted));
      _mm256_storeu_ps(weights + i + h, w);
      sum = _mm256_add_pd(sum, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(w)),
                                             _mm256_cvtps_pd(_mm256_extractf128_ps(w, 1))));
    }
    __m128d pair = _mm_add_pd(_mm256_castpd256_pd128(sum), _mm256_extractf128_pd(sum, 1));
    sums[chunk] = _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
  }
  return top;
}

// The row's token for the uniform draw u in [0, 1): the first whose cumulative weight exceeds u times the
// total. ``weights`` and ``sums`` are scratch space of the row's length and of its 16s.
int64_t sample_row(const float* x, int64_t vocab, float temperature, double u, float* weights, double* sums,
                   bool avx512) {
  const float top = avx512 ? weigh_row(x, vocab, temperature, weights, sums)
                           : weigh_row_avx2(x, vocab, temperature, weights, sums);
  if (!(top > -std::numeric_limits<float>::infinity())) return 0;  // nothing to draw from (all -inf or NaN)
  const int64_t full = vocab / 16 * 16;
  double total = 0.0;
  int64_t chunk = 0;
  for (; chunk < full / 16; ++chunk) total += sums[chunk];
  if (full < vocab) {
    double tail = 0.0;
    for (int64_t i = full; i < vocab; ++i) {
      weights[i] = std::exp(x[i] / temperature - top);
      tail += weights[i];
    }
    sums[chunk++] = tail;
    total += tail;
  }
  const double target = u * total;
  double before = 0.0;
  for (int64_t c = 0; c < chunk; ++c) {
    if (before + sums[c] > target) {
      double cumulative = before;
      for (int64_t i = c * 16, end = std::min(vocab, (c + 1) * 16); i < end; ++i) {
        cumulative += weights[i];
        if (cumulative > target && weights[i] > 0.f) return i;
      }
      before = cumulative;  // the 16-sum rounded above the token-by-token one: go on from the latter
      continue;
    }
    before += sums[c];
  }
  // The target was not passed (u close to 1, and rounding): the last token that has weight.
  for (int64_t i = vocab - 1; i > 0; --i)
    if (weights[i] > 0.f) return i;
  return 0;
}

// The first index of a row's largest value, or of its first NaN (torch.argmax's answer): one pass for the
// maximum, one that stops at the first lane equal to it.
AVX512 int64_t argmax_row(const float* row, int64_t n) {
  const int64_t full = n / 16 * 16;
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  for (int64_t i = 0; i < full && !nan; i += 16) {
    __m512 v = _mm512_loadu_ps(row + i);
    nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    best = _mm512_max_ps(best, v);
  }
  float largest = _mm512_reduce_max_ps(best);
  for (int64_t i = full; i < n; ++i) {
    if (std::isnan(row[i])) nan = 1;
    largest = std::max(largest, row[i]);
  }
  for (int64_t i = 0; i < full; i += 16) {
    __m512 v = _mm512_loadu_ps(row + i);
    __mmask16 hit = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, _mm512_set1_ps(largest), _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(static_cast<unsigned>(hit));
  }
  for (int64_t i = full; i < n; ++i)
    if (nan ? std::isnan(row[i]) : row[i] == largest) return i;
  return 0;
}

// argmax_row's AVX2 body.
AVX2 int64_t argmax_row_avx2(const float* row, int64_t n) {
  const int64_t full = n / 8 * 8;
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int nan = 0;
  for (int64_t i = 0; i < full && !nan; i += 8) {
    __m256 v = _mm256_loadu_ps(row + i);
    nan = _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    best = _mm256_max_ps(best, v);
  }
  float largest = clex_cpu::max8(best);
  for (int64_t i = full; i < n; ++i) {
    if (std::isnan(row[i])) nan = 1;
    largest = std::max(largest, row[i]);
  }
  const __m256 target = _mm256_set1_ps(largest);
  for (int64_t i = 0; i < full; i += 8) {
    __m256 v = _mm256_loadu_ps(row + i);
    int hit = _mm256_movemask_ps(nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, target, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(static_cast<unsigned>(hit));
  }
  for (int64_t i = full; i < n; ++i)
    if (nan ? std::isnan(row[i]) : row[i] == largest) return i;
  return 0;
}

}  // namespace

namespace clex_cpu {

// logits [B, V] float32 contiguous, temperatures [B] float32 (> 0), uniforms [B] float64 in [0, 1) -> [B] int64.
at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& temperatures, const at::Tensor& uniforms) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
              "sample_rows: logits [B, V] contiguous float32");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(temperatures.scalar_type() == at::kFloat && temperatures.is_contiguous() && temperatures.numel() == rows,
              "sample_rows: temperatures [B] float32");
  TORCH_CHECK(uniforms.scalar_type() == at::kDouble && uniforms.is_contiguous() && uniforms.numel() == rows,
              "sample_rows: uniforms [B] float64");
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  const float* t = temperatures.data_ptr<float>();
  const double* u = uniforms.data_ptr<double>();
  int64_t* out = tokens.data_ptr<int64_t>();
  const bool avx512 = clex_cpu::avx512_active();
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    std::vector<float> weights(vocab);
    std::vector<double> sums((vocab + 15) / 16);
    for (int64_t r = first; r < last; ++r)
      out[r] = sample_row(x + r * vocab, vocab, t[r], u[r], weights.data(), sums.data(), avx512);
  });
  return tokens;
}

// Structured outputs' token mask: in each listed row, the logits of tokens whose bit is clear in the row's
// bitmask (xgrammar's layout: int32 words, bit j of word w is token 32 w + j) become -inf: 16 tokens per
// masked store, their 16 bits the store's mask inverted. xgrammar's own CPU kernel takes 1-2 ms for 16 rows
// of 32,000 (a tenth of a 16-stream step of the 58M model); this, a few microseconds a row.
namespace {

AVX512 void mask_row(float* x, const uint16_t* halves, int64_t vocab) {
  const __m512 minus_infinity = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t full = vocab / 16 * 16;
  for (int64_t token = 0; token < full; token += 16) {
    _mm512_mask_storeu_ps(x + token, static_cast<__mmask16>(~halves[token >> 4]), minus_infinity);
  }
  if (full < vocab) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (vocab - full)) - 1);
    _mm512_mask_storeu_ps(x + full, static_cast<__mmask16>(~halves[full >> 4]) & tail, minus_infinity);
  }
}

// mask_row's AVX2 body: eight tokens per masked store, their bits spread to lanes.
AVX2 void mask_row_avx2(float* x, const uint16_t* halves, int64_t vocab) {
  const __m256 minus_infinity = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const int64_t full = vocab / 8 * 8;
  for (int64_t token = 0; token < full; token += 8) {
    const int bits = (halves[token >> 4] >> (token & 8)) & 0xFF;
    if (bits == 0xFF) continue;
    // Lanes whose bit is clear: all ones.
    __m256i clear = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), bit), _mm256_setzero_si256());
    _mm256_maskstore_ps(x + token, clear, minus_infinity);
  }
  for (int64_t token = full; token < vocab; ++token)
    if (!((halves[token >> 4] >> (token & 15)) & 1)) x[token] = -std::numeric_limits<float>::infinity();
}

}  // namespace

void apply_token_bitmask(at::Tensor logits, const at::Tensor& bitmask, at::IntArrayRef rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
              "apply_token_bitmask: logits [rows, vocab] float32, contiguous");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.is_contiguous() && bitmask.scalar_type() == at::kInt &&
                  bitmask.size(0) >= logits.size(0) && bitmask.size(1) * 32 >= logits.size(1),
              "apply_token_bitmask: bitmask [rows, ceil(vocab / 32)] int32, contiguous");
  const int64_t vocab = logits.size(1), words = bitmask.size(1);
  float* data = logits.data_ptr<float>();
  // Little-endian: the low half of word w holds tokens 32 w .. 32 w + 15.
  const uint16_t* halves = reinterpret_cast<const uint16_t*>(bitmask.data_ptr<int32_t>());
  for (int64_t row : rows) {
    TORCH_CHECK(0 <= row && row < logits.size(0), "apply_token_bitmask: row ", row, " out of range");
    if (clex_cpu::avx512_active()) mask_row(data + row * vocab, halves + row * words * 2, vocab);
    else mask_row_avx2(data + row * vocab, halves + row * words * 2, vocab);
  }
}

// x [B, V] float32 -> [B] int64: torch.argmax(x, dim=-1), whose CPU kernel compares one element at a time
// (3 ms for 64 rows of 32,000; this 0.2).
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) > 0,
              "argmax_rows: x [rows, columns] float32, contiguous");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  const float* data = x.data_ptr<float>();
  int64_t* index = out.data_ptr<int64_t>();
  const int64_t columns = x.size(1);
  const bool avx512 = clex_cpu::avx512_active();
  at::parallel_for(0, x.size(0), 4, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r)
      index[r] = avx512 ? argmax_row(data + r * columns, columns) : argmax_row_avx2(data + r * columns, columns);
  });
  return out;
}

}  // namespace clex_cpu
