// Several greedy decode steps of a Llama-family model on the CPU in one call, each step's argmax the next
// step's token.
//
// With a step fused into one call (decode_step.cpp), what is left between two steps is the engine's Python:
// planning the step, packing its tensors, sampling, taking the token in and building its output. On the
// benchmark model's single stream that was 0.55-0.65 ms of a 3.85 ms bfloat16 step, and it runs cold, after
// the step's weights have streamed through the caches. A greedy sequence's next steps depend on nothing but
// their own tokens, so the engine plans a run of them (engine/core/decode_runs.py) and this loops over
// llama_decode_step, taking each row's argmax (argmax_rows, what the sampler takes) as its next token. Each
// step computes exactly what it computes alone, so the tokens are those of the steps one by one.
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>

#include "clex_cpu.h"

namespace clex_cpu {

// As llama_decode_step, for ``steps`` = slots.size(0) steps: positions [B] of the first step (step j's are
// positions + j); query_scales [steps, B] or None; slots [steps, B]; run_offsets [steps, B + 1], step j's
// offsets into ``runs``. -> the tokens [steps, B] int64.
at::Tensor llama_decode_greedy_run(const at::Tensor& ids, const at::Tensor& embedding,
                                   const c10::List<std::optional<at::Tensor>>& layers, double eps, int64_t heads,
                                   int64_t kv_heads, int64_t head_dim, int64_t hidden_size,
                                   int64_t intermediate_size, const at::Tensor& final_norm, double final_eps,
                                   const at::Tensor& head, const std::optional<at::Tensor>& head_bias, int64_t vocab,
                                   const at::Tensor& positions, const at::Tensor& inv_freq, double attention_scaling,
                                   const std::optional<at::Tensor>& query_scales, const at::Tensor& slots,
                                   at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& runs,
                                   const at::Tensor& run_offsets) {
  TORCH_CHECK(slots.dim() == 2 && slots.size(1) == ids.size(0) && ids.dim() == 1,
              "llama_decode_greedy_run: ids [B], slots [steps, B]");
  const int64_t steps = slots.size(0), batch = ids.size(0);
  TORCH_CHECK(run_offsets.dim() == 2 && run_offsets.size(0) == steps && run_offsets.size(1) == batch + 1,
              "llama_decode_greedy_run: run_offsets [steps, B + 1]");
  TORCH_CHECK(!query_scales.has_value() || (query_scales->dim() == 2 && query_scales->size(0) == steps &&
                                             query_scales->size(1) == batch),
              "llama_decode_greedy_run: query_scales [steps, B]");
  at::Tensor tokens = at::empty({steps, batch}, ids.options());
  at::Tensor current = ids;
  for (int64_t step = 0; step < steps; ++step) {
    std::optional<at::Tensor> query_scale;
    if (query_scales.has_value()) query_scale = query_scales->select(0, step).contiguous();
    at::Tensor logits = llama_decode_step(
        current, embedding, layers, eps, heads, kv_heads, head_dim, hidden_size, intermediate_size, final_norm,
        final_eps, head, head_bias, vocab, step == 0 ? positions : at::add(positions, step), inv_freq,
        attention_scaling, query_scale, slots.select(0, step).contiguous(), k_caches, v_caches, runs,
        run_offsets.select(0, step).contiguous());
    current = argmax_rows(logits);
    tokens.select(0, step).copy_(current);
  }
  return tokens;
}

}  // namespace clex_cpu
