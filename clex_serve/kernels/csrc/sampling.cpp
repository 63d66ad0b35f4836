// Temperature sampling on the CPU in one call: softmax(x / T) and the inverse of its cumulative
// distribution at one uniform draw per row, without a probability tensor or a float64 cumulative one.
//
// The PyTorch way (engine/sampler.py) divides, takes the softmax, widens to float64, sums cumulatively and
// searches: five vocabulary-sized passes and three temporaries, about 1.2 ms of a 16-stream step at a
// vocabulary of 32,000 (5% of it). Here a row is read twice: once for its maximum, once for the
// exponentials, which are summed in float64 per 16 and overall; the draw then walks the 16-sums and one
// 16 of exponentials. A token of probability zero (a logit of -inf) is never drawn.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "avx512_math.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// The row's token for the uniform draw u in [0, 1): the first whose cumulative weight exceeds u times the
// total. ``weights`` and ``sums`` are scratch space of the row's length and of its 16s.
AVX512 int64_t sample_row(const float* x, int64_t vocab, float temperature, double u, float* weights,
                          double* sums) {
  const int64_t full = vocab / 16 * 16;
  const __m512 t = _mm512_set1_ps(temperature);
  __m512 largest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < full; i += 16) largest = _mm512_max_ps(largest, _mm512_div_ps(_mm512_loadu_ps(x + i), t));
  float top = _mm512_reduce_max_ps(largest);
  for (int64_t i = full; i < vocab; ++i) top = std::max(top, x[i] / temperature);
  if (!(top > -std::numeric_limits<float>::infinity())) return 0;  // nothing to draw from (all -inf or NaN)
  const __m512 top_vector = _mm512_set1_ps(top);
  double total = 0.0;
  int64_t chunk = 0;
  for (int64_t i = 0; i < full; i += 16, ++chunk) {
    __m512 w = clex_cpu::exp16(_mm512_sub_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), t), top_vector));
    _mm512_storeu_ps(weights + i, w);
    // Sixteen float32 weights summed in float64: rounding moves no mass between tokens.
    __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(w));
    __m512d high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1)));
    sums[chunk] = _mm512_reduce_add_pd(_mm512_add_pd(low, high));
    total += sums[chunk];
  }
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
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    std::vector<float> weights(vocab);
    std::vector<double> sums((vocab + 15) / 16);
    for (int64_t r = first; r < last; ++r)
      out[r] = sample_row(x + r * vocab, vocab, t[r], u[r], weights.data(), sums.data());
  });
  return tokens;
}

}  // namespace clex_cpu

TORCH_LIBRARY_FRAGMENT(clex_cpu, m) {
  m.def("sample_rows(Tensor logits, Tensor temperatures, Tensor uniforms) -> Tensor");
}

TORCH_LIBRARY_IMPL(clex_cpu, CPU, m) { m.impl("sample_rows", &clex_cpu::sample_rows); }
