// silu(gate) * up over a packed [rows, 2 * width] gate/up projection on the CPU, in one pass, the activation
// rounded to the dtype before the product (F.silu's result).
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

#include <cmath>

namespace {

using clex_cpu::check_rows;
using clex_cpu::kRowsPerTask;
using clex_cpu::rounded;

// One row: silu(gate) rounded to the dtype (F.silu's result), times up. Sixteen lanes at a time with a
// vectorised exp (the scalar exp was most of a 16-stream step's MLP after the weights); the tail as before.
template <typename T>
AVX512 void silu_and_mul_row(const T* gate, const T* up, T* o, int64_t width) {
  int64_t c = 0;
  const __m512 one = _mm512_set1_ps(1.f);
  for (; c + 16 <= width; c += 16) {
    __m512 g = clex_cpu::load16(gate + c);
    __m512 activated = clex_cpu::round16<T>(
        _mm512_div_ps(g, _mm512_add_ps(one, clex_cpu::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
    clex_cpu::store16(o + c, _mm512_mul_ps(activated, clex_cpu::load16(up + c)));
  }
  for (; c < width; ++c) {
    float g = static_cast<float>(gate[c]);
    float activated = rounded<T>(g / (1.f + std::exp(-g)));
    o[c] = static_cast<T>(activated * static_cast<float>(up[c]));
  }
}

// The same on AVX2, a 16 as two vectors of 8 (exp8 is exp16 bit for bit) and the tail past the last whole
// 16 scalar, as above: the results are the AVX-512 body's bit for bit.
template <typename T>
AVX2 void silu_and_mul_row_avx2(const T* gate, const T* up, T* o, int64_t width) {
  int64_t c = 0;
  const __m256 one = _mm256_set1_ps(1.f);
  for (; c + 16 <= width; c += 16) {
    for (int64_t h = c; h < c + 16; h += 8) {
      __m256 g = clex_cpu::load8(gate + h);
      __m256 activated = clex_cpu::round8<T>(
          _mm256_div_ps(g, _mm256_add_ps(one, clex_cpu::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)))));
      clex_cpu::store8(o + h, _mm256_mul_ps(activated, clex_cpu::load8(up + h)));
    }
  }
  for (; c < width; ++c) {
    float g = static_cast<float>(gate[c]);
    float activated = rounded<T>(g / (1.f + std::exp(-g)));
    o[c] = static_cast<T>(activated * static_cast<float>(up[c]));
  }
}

template <typename T>
void silu_and_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), width = out.size(1);
  const bool avx512 = clex_cpu::avx512_active();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const T* gate = gate_up.data_ptr<T>() + r * gate_up.stride(0);
      T* o = out.data_ptr<T>() + r * out.stride(0);
      if (avx512) silu_and_mul_row<T>(gate, gate + width, o, width);
      else silu_and_mul_row_avx2<T>(gate, gate + width, o, width);
    }
  });
}

}  // namespace

namespace clex_cpu {

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_and_mul");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_and_mul: [rows, 2 * width]");
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) silu_and_mul_impl<float>(gate_up, out);
  else if (gate_up.scalar_type() == at::kBFloat16) silu_and_mul_impl<c10::BFloat16>(gate_up, out);
  else TORCH_CHECK(false, "silu_and_mul: float32 or bfloat16");
  return out;
}

}  // namespace clex_cpu
