// The small element-wise steps of a layer, fused for the CPU: RMSNorm (with the residual add before it),
// silu(gate) * up, and rotary + CLEX log scale + K/V cache write; and a vectorised argmax for greedy sampling.
//
// At decode a layer's tensors are a few KB, so each PyTorch operator costs its dispatch, not its
// arithmetic: unfused these are about forty operators per layer. Each function here computes what its
// PyTorch equivalent computes, with the same roundings to the model's dtype between steps (the CUDA Triton
// kernels in ``kernels/`` follow the same rules), so float32 and bfloat16 results match the eager path.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "avx512_math.h"
#include "clex_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <initializer_list>
#include <tuple>

namespace {

// What a PyTorch operator stores when its float32 result is written to a tensor of dtype T.
template <typename T> inline float rounded(float v) { return static_cast<float>(static_cast<T>(v)); }

constexpr int64_t kRowsPerTask = 16;  // rows per thread task: a decode step's few rows stay on one thread

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, ": rows with contiguous columns");
}

// normalise in float32, round, multiply by the weight (Llama's reference order)
template <typename T, typename W>
void rms_norm_rows(const T* x, const W* weight, T* out, int64_t cols, float eps) {
  float sum = 0.f;
  for (int64_t c = 0; c < cols; ++c) sum += static_cast<float>(x[c]) * static_cast<float>(x[c]);
  const float inverse_rms = 1.f / std::sqrt(sum / cols + eps);
  for (int64_t c = 0; c < cols; ++c) {
    float normed = rounded<T>(static_cast<float>(x[c]) * inverse_rms);
    out[c] = static_cast<T>(normed * static_cast<float>(weight[c]));
  }
}

template <typename T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
                   at::Tensor& out, at::Tensor& sum) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const bool add = residual.defined();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const T* row = x.data_ptr<T>() + r * x.stride(0);
      if (add) {  // the sum is rounded to the dtype, returned as the new residual, then normalised
        const T* res = residual.data_ptr<T>() + r * residual.stride(0);
        T* total = sum.data_ptr<T>() + r * sum.stride(0);
        for (int64_t c = 0; c < cols; ++c) total[c] = static_cast<T>(static_cast<float>(row[c]) + static_cast<float>(res[c]));
        row = total;
      }
      rms_norm_rows<T, T>(row, weight.data_ptr<T>(), out.data_ptr<T>() + r * out.stride(0), cols,
                          static_cast<float>(eps));
    }
  });
}

}  // namespace

namespace clex_cpu {

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() && weight.numel() == x.size(1),
              "rms_norm: weight [hidden] of the dtype of x");
  at::Tensor res = residual.has_value() ? *residual : at::Tensor();
  if (res.defined()) {
    check_rows(res, "rms_norm residual");
    TORCH_CHECK(res.sizes() == x.sizes() && res.scalar_type() == x.scalar_type(), "rms_norm: residual like x");
  }
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor sum = res.defined() ? at::empty(x.sizes(), x.options()) : at::Tensor();
  if (x.scalar_type() == at::kFloat) rms_norm_impl<float>(x, res, weight, eps, out, sum);
  else if (x.scalar_type() == at::kBFloat16) rms_norm_impl<c10::BFloat16>(x, res, weight, eps, out, sum);
  else TORCH_CHECK(false, "rms_norm: float32 or bfloat16");
  return {out, sum};
}

}  // namespace clex_cpu

namespace {

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

template <typename T>
void silu_and_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), width = out.size(1);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const T* gate = gate_up.data_ptr<T>() + r * gate_up.stride(0);
      silu_and_mul_row<T>(gate, gate + width, out.data_ptr<T>() + r * out.stride(0), width);
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

namespace {

// One head of one token: x * cos + rotate_half(x) * sin over the rotary channels (each product and the sum
// rounded to the dtype, as the eager ops do), then times the query scale if any; other channels pass
// (scaled too, for queries).
template <typename T>
inline void rotate_head(const T* source, T* target, const T* cos, const T* sin, int64_t head_dim,
                        int64_t rotary_dim, const float* scale) {
  const int64_t half = rotary_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    float x1 = static_cast<float>(source[i]), x2 = static_cast<float>(source[half + i]);
    float c = static_cast<float>(cos[i]), s = static_cast<float>(sin[i]);
    float out1 = rounded<T>(rounded<T>(x1 * c) + rounded<T>(-x2 * s));
    float out2 = rounded<T>(rounded<T>(x2 * c) + rounded<T>(x1 * s));
    if (scale) out1 = rounded<T>(out1 * *scale), out2 = rounded<T>(out2 * *scale);
    target[i] = static_cast<T>(out1);
    target[half + i] = static_cast<T>(out2);
  }
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
  at::parallel_for(0, tokens, kRowsPerTask, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const T* c = cos.data_ptr<T>() + t * cos.stride(0);
      const T* s = sin.data_ptr<T>() + t * sin.stride(0);
      // The scale as the eager path holds it: a tensor of the model dtype.
      float scale_value = query_scale.defined() ? static_cast<float>(query_scale.data_ptr<T>()[t]) : 1.f;
      const float* scale = query_scale.defined() ? &scale_value : nullptr;
      for (int64_t h = 0; h < heads; ++h)
        rotate_head<T>(q.data_ptr<T>() + t * q.stride(0) + h * q.stride(1),
                       q_out.data_ptr<T>() + t * q_out.stride(0) + h * q_out.stride(1), c, s, head_dim, rotary_dim,
                       scale);
      for (int64_t h = 0; h < kv_heads; ++h) {
        T* key = k_out.data_ptr<T>() + t * k_out.stride(0) + h * k_out.stride(1);
        rotate_head<T>(k.data_ptr<T>() + t * k.stride(0) + h * k.stride(1), key, c, s, head_dim, rotary_dim,
                       nullptr);
        T* cached_key = k_cache.data_ptr<T>() + slot[t] * k_cache.stride(0) + h * k_cache.stride(1);
        T* cached_value = v_cache.data_ptr<T>() + slot[t] * v_cache.stride(0) + h * v_cache.stride(1);
        const T* value = v.data_ptr<T>() + t * v.stride(0) + h * v.stride(1);
        for (int64_t i = 0; i < head_dim; ++i) cached_key[i] = key[i], cached_value[i] = value[i];
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

namespace {

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

}  // namespace

namespace clex_cpu {

// x [B, V] float32 -> [B] int64: torch.argmax(x, dim=-1), whose CPU kernel compares one element at a time
// (3 ms for 64 rows of 32,000; this 0.2).
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) > 0,
              "argmax_rows: x [rows, columns] float32, contiguous");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  const float* data = x.data_ptr<float>();
  int64_t* index = out.data_ptr<int64_t>();
  const int64_t columns = x.size(1);
  at::parallel_for(0, x.size(0), 4, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) index[r] = argmax_row(data + r * columns, columns);
  });
  return out;
}

}  // namespace clex_cpu

TORCH_LIBRARY_FRAGMENT(clex_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("rotate_and_cache(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor? query_scale, "
        "Tensor slots, Tensor(a!) k_cache, Tensor(b!) v_cache) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(clex_cpu, CPU, m) {
  m.impl("rms_norm", &clex_cpu::rms_norm);
  m.impl("silu_and_mul", &clex_cpu::silu_and_mul);
  m.impl("argmax_rows", &clex_cpu::argmax_rows);
  m.impl("rotate_and_cache", &clex_cpu::rotate_and_cache);
}
