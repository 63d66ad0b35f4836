// Several decode steps of a Llama-family model on the CPU in one call, each step's picked token the next
// step's input.
//
// With a step fused into one call (decode_step.cpp), what is left between two steps is the engine's Python:
// planning the step, packing its tensors, sampling, taking the token in and building its output. On the
// benchmark model's single stream that was 0.55-0.65 ms of a 3.85 ms bfloat16 step, and it runs cold, after
// the step's weights have streamed through the caches. A sequence that samples from the model's own logits
// alone (greedy, or at a temperature with no filter, penalty or grammar) needs nothing from Python between
// its steps, so the engine plans a run of them (engine/core/decode_runs.py) and this loops over
// llama_decode_step, picking each row's token as the sampler would: argmax_rows, or sample_rows with the
// uniform numbers the sampler would have drawn for that step (drawn ahead, in its order), and argmax for
// the greedy rows of a mixed batch. Each step computes exactly what it computes alone, so the tokens are
// those of the steps one by one.
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>

#include "clex_cpu.h"

namespace clex_cpu {

// As llama_decode_step, for ``steps`` = slots.size(0) steps: positions [B] of the first step (step j's are
// positions + j); query_scales [steps, B] or None; slots [steps, B]; run_offsets [steps, B + 1], step j's
// offsets into ``runs``. temperatures [B] float32 and uniforms [steps, B] float64: rows sampled (None: all
// greedy); greedy_rows [B] bool: the rows of a sampled batch that take the argmax. -> tokens [steps, B] int64.
at::Tensor llama_decode_run(const at::Tensor& ids, const at::Tensor& embedding,
                            const c10::List<std::optional<at::Tensor>>& layers, double eps, int64_t heads,
                            int64_t kv_heads, int64_t head_dim, int64_t hidden_size, int64_t intermediate_size,
                            const at::Tensor& final_norm, double final_eps, const at::Tensor& head,
                            const std::optional<at::Tensor>& head_bias, int64_t vocab, const at::Tensor& positions,
                            const at::Tensor& inv_freq, double attention_scaling,
                            const std::optional<at::Tensor>& query_scales, const at::Tensor& slots,
                            at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& runs,
                            const at::Tensor& run_offsets, const std::optional<at::Tensor>& temperatures,
                            const std::optional<at::Tensor>& uniforms,
                            const std::optional<at::Tensor>& greedy_rows) {
  TORCH_CHECK(slots.dim() == 2 && slots.size(1) == ids.size(0) && ids.dim() == 1,
              "llama_decode_run: ids [B], slots [steps, B]");
  const int64_t steps = slots.size(0), batch = ids.size(0);
  TORCH_CHECK(run_offsets.dim() == 2 && run_offsets.size(0) == steps && run_offsets.size(1) == batch + 1,
              "llama_decode_run: run_offsets [steps, B + 1]");
  TORCH_CHECK(!query_scales.has_value() || (query_scales->dim() == 2 && query_scales->size(0) == steps &&
                                             query_scales->size(1) == batch),
              "llama_decode_run: query_scales [steps, B]");
  TORCH_CHECK(temperatures.has_value() == uniforms.has_value() &&
                  (!uniforms.has_value() || (uniforms->dim() == 2 && uniforms->size(0) == steps)) &&
                  (!greedy_rows.has_value() || temperatures.has_value()),
              "llama_decode_run: temperatures [B] with uniforms [steps, B], greedy_rows only beside them");
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
    if (!temperatures.has_value()) {
      current = argmax_rows(logits);
    } else {
      current = sample_rows(logits, *temperatures, uniforms->select(0, step).contiguous());
      if (greedy_rows.has_value()) current = at::where(*greedy_rows, argmax_rows(logits), current);
    }
    tokens.select(0, step).copy_(current);
  }
  return tokens;
}

}  // namespace clex_cpu
