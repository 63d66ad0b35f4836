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

// One row's whole 16s: silu(gate) rounded to the dtype (F.silu's result), times up, sixteen lanes at a time
// with a vectorised exp (the scalar exp was most of a 16-stream step's MLP after the weights).
template <typename T>
AVX512 void silu_and_mul_16s(const T* gate, const T* up, T* o, int64_t width) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t c = 0; c + 16 <= width; c += 16) {
    __m512 g = clex_cpu::load16(gate + c);
    __m512 activated = clex_cpu::round16<T>(
        _mm512_div_ps(g, _mm512_add_ps(one, clex_cpu::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
    clex_cpu::store16(o + c, _mm512_mul_ps(activated, clex_cpu::load16(up + c)));
  }
}

// The same on AVX2, a 16 as two vectors of 8 (exp8 is exp16 bit for bit): the AVX-512 body's bits.
template <typename T>
AVX2 void silu_and_mul_16s_avx2(const T* gate, const T* up, T* o, int64_t width) {
  const __m256 one = _mm256_set1_ps(1.f);
  for (int64_t c = 0; c + 8 <= width / 16 * 16; c += 8) {
    __m256 g = clex_cpu::load8(gate + c);
    __m256 activated = clex_cpu::round8<T>(
        _mm256_div_ps(g, _mm256_add_ps(one, clex_cpu::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)))));
    clex_cpu::store8(o + c, _mm256_mul_ps(activated, clex_cpu::load8(up + c)));
  }
}

// The row past its last whole 16, one element at a time.
template <typename T>
void silu_and_mul_tail(const T* gate, const T* up, T* o, int64_t width) {
  for (int64_t c = width / 16 * 16; c < width; ++c) {
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
      if (avx512) silu_and_mul_16s<T>(gate, gate + width, o, width);
      else silu_and_mul_16s_avx2<T>(gate, gate + width, o, width);
      silu_and_mul_tail<T>(gate, gate + width, o, width);
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
