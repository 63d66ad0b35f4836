// A whole Llama-family decoder layer for a decode step on the CPU, in one call.
//
// With the weights streamed at memory speed and attention reading the cache in place, what is left of a
// small model's decode step is Python: a layer is nine module calls and some twenty tensor views and
// dispatches around its five kernels, about as long as reading its weights. This runs the same kernels in
// the same order with the same roundings (so results equal the layer-by-layer path bit for bit), called
// once per layer: the CPU's counterpart of replaying a captured CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <cmath>

#include "clex_cpu.h"

namespace {

// a + b in float32, rounded to the dtype: what PyTorch's add stores.
template <typename T>
void add_rows(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const T* x = a.data_ptr<T>();
  const T* y = b.data_ptr<T>();
  T* z = out.data_ptr<T>();
  for (int64_t i = 0, n = out.numel(); i < n; ++i) z[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(y[i]));
}

}  // namespace

namespace clex_cpu {

// hidden [B, hidden] (one token per row, rows as decode_attention takes them) -> the layer's output [B, hidden].
// Linear weights in the blocked layout with their output sizes (and padded biases or none); k_cache/v_cache
// [slots, Hkv, D] views.
at::Tensor llama_decode_layer(const at::Tensor& hidden, const at::Tensor& input_norm, const at::Tensor& post_norm,
                              double eps, const at::Tensor& qkv, const std::optional<at::Tensor>& qkv_bias,
                              const at::Tensor& o, const std::optional<at::Tensor>& o_bias, const at::Tensor& gate_up,
                              const std::optional<at::Tensor>& gate_up_bias, const at::Tensor& down,
                              const std::optional<at::Tensor>& down_bias, int64_t heads, int64_t kv_heads,
                              int64_t head_dim, int64_t hidden_size, int64_t intermediate_size,
                              const at::Tensor& cos, const at::Tensor& sin,
                              const std::optional<at::Tensor>& query_scale, const at::Tensor& slots,
                              at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& runs,
                              const at::Tensor& run_offsets, const std::optional<at::Tensor>& row_groups) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous() && hidden.size(1) == hidden_size,
              "llama_decode_layer: hidden [B, hidden_size] contiguous");
  const int64_t batch = hidden.size(0), q_size = heads * head_dim, kv_size = kv_heads * head_dim;
  at::Tensor normed = std::get<0>(rms_norm(hidden, std::nullopt, input_norm, eps));
  at::Tensor packed = blocked_linear(normed, qkv, qkv_bias, q_size + 2 * kv_size);
  at::Tensor q = packed.narrow(1, 0, q_size).view({batch, heads, head_dim});
  at::Tensor k = packed.narrow(1, q_size, kv_size).view({batch, kv_heads, head_dim});
  at::Tensor v = packed.narrow(1, q_size + kv_size, kv_size).view({batch, kv_heads, head_dim});
  at::Tensor rotated = std::get<0>(rotate_and_cache(q, k, v, cos, sin, query_scale, slots, k_cache, v_cache));
  at::Tensor attended = decode_attention(rotated, k_cache, v_cache, runs, run_offsets,
                                          1.0 / std::sqrt(double(head_dim)), row_groups);
  at::Tensor projected = blocked_linear(attended.view({batch, q_size}), o, o_bias, hidden_size);
  auto [mlp_in, residual] = rms_norm(projected, hidden, post_norm, eps);
  at::Tensor activated = silu_and_mul(blocked_linear(mlp_in, gate_up, gate_up_bias, 2 * intermediate_size));
  at::Tensor mlp_out = blocked_linear(activated, down, down_bias, hidden_size);
  at::Tensor out = at::empty(hidden.sizes(), hidden.options());
  if (hidden.scalar_type() == at::kFloat) add_rows<float>(residual, mlp_out, out);
  else add_rows<c10::BFloat16>(residual, mlp_out, out);
  return out;
}

}  // namespace clex_cpu
