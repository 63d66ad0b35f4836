// A pure decode step of a Llama-family model on the CPU, from the token ids to float32 logits, in one call.
//
// With every layer one call (decoder_layer.cpp), a small model's decode step still spent about a sixth of
// its time in Python around them: the rotary rows, eight calls of 26 arguments each, the embedding, the
// final norm and the head. This makes the same calls from C++ in the same order: the embedding rows of the
// step's tokens (at::embedding, what nn.Embedding calls), the rotary rows with the ATen operators of
// RotaryEmbedding.cos_sin (so the same kernels round them), every layer, the final RMSNorm, the head in the
// blocked layout and the float32 copy of its logits. The results are those of the Python path bit for bit.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cos.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sin.h>
#include <ATen/ops/to.h>
#include <ATen/ops/unsqueeze.h>

#include "clex_cpu.h"

namespace clex_cpu {

// ids, positions, slots [B] int64; inv_freq [1 or B, rotary_dim / 2] float32 (each row's frequencies at its
// scale); layers: ten tensors a layer (input_norm, post_norm, qkv, its bias, o, its bias, gate_up, its bias,
// down, its bias; biases may be None), every layer of the same shapes and eps; k_caches / v_caches: each
// layer's [slots, Hkv, D] views; runs / run_offsets as decode_attention takes them. -> [B, vocab] float32.
at::Tensor llama_decode_step(const at::Tensor& ids, const at::Tensor& embedding,
                             const c10::List<std::optional<at::Tensor>>& layers, double eps, int64_t heads,
                             int64_t kv_heads, int64_t head_dim, int64_t hidden_size, int64_t intermediate_size,
                             const at::Tensor& final_norm, double final_eps, const at::Tensor& head,
                             const std::optional<at::Tensor>& head_bias, int64_t vocab, const at::Tensor& positions,
                             const at::Tensor& inv_freq, double attention_scaling,
                             const std::optional<at::Tensor>& query_scale, const at::Tensor& slots,
                             at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& runs,
                             const at::Tensor& run_offsets) {
  constexpr int64_t kPerLayer = 10;
  const int64_t count = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == kPerLayer * count && v_caches.size() == k_caches.size(),
              "llama_decode_step: ten tensors and a K and V cache per layer");
  const at::ScalarType dtype = embedding.scalar_type();
  // RotaryEmbedding.cos_sin, operator for operator.
  at::Tensor angles = positions.to(at::kFloat).unsqueeze(1) * inv_freq;
  at::Tensor emb = at::cat({angles, angles}, -1);
  at::Tensor cos = emb.cos(), sin = emb.sin();
  if (attention_scaling != 1.0) {
    cos = cos * attention_scaling;
    sin = sin * attention_scaling;
  }
  cos = cos.to(dtype);
  sin = sin.to(dtype);
  at::Tensor hidden = at::embedding(embedding, ids);
  auto required = [&](int64_t i) -> at::Tensor {
    std::optional<at::Tensor> tensor = layers.get(i);
    TORCH_CHECK(tensor.has_value(), "llama_decode_step: a layer's norm or weight is None");
    return *tensor;
  };
  for (int64_t layer = 0; layer < count; ++layer) {
    const int64_t at = layer * kPerLayer;
    hidden = llama_decode_layer(hidden, required(at), required(at + 1), eps, required(at + 2), layers.get(at + 3),
                                required(at + 4), layers.get(at + 5), required(at + 6), layers.get(at + 7),
                                required(at + 8), layers.get(at + 9), heads, kv_heads, head_dim, hidden_size,
                                intermediate_size, cos, sin, query_scale, slots, k_caches[layer], v_caches[layer],
                                runs, run_offsets, std::nullopt);
  }
  hidden = std::get<0>(rms_norm(hidden, std::nullopt, final_norm, final_eps));
  return blocked_linear(hidden, head, head_bias, vocab).to(at::kFloat);
}

}  // namespace clex_cpu
