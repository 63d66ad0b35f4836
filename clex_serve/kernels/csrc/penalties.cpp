// Repetition, presence and frequency penalties on the CPU in one pass over each penalised row.
//
// The PyTorch formulation (engine/penalties.py) gathers the batch's rows of the count tables and makes some
// ten vocabulary-sized passes over them (compare, select, convert, multiply, subtract): at 64 streams of a
// 32,000-word vocabulary that is tens of milliseconds a step on one thread, more than rebuilding sparse
// counts from the token lists. Here each logit is read and written once, next to its count and prompt
// flag, with the same float32 operations in the same order, so the result is the same bit for bit.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "clex_cpu.h"

namespace clex_cpu {

// logits [B, V] float32, edited in place at rows ``picked`` [P]; counts [R, V] int32 and in_prompt [R, V] bool
// are the persistent tables, ``table_rows`` [P] the table row of each picked row; repetition, frequency and
// presence [P] float32.
void apply_penalties(at::Tensor logits, const at::Tensor& counts, const at::Tensor& in_prompt,
                     const at::Tensor& picked, const at::Tensor& table_rows, const at::Tensor& repetition,
                     const at::Tensor& frequency, const at::Tensor& presence) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
              "apply_penalties: logits [B, V] contiguous float32");
  TORCH_CHECK(counts.is_contiguous() && counts.scalar_type() == at::kInt && counts.size(1) == logits.size(1) &&
              in_prompt.is_contiguous() && in_prompt.scalar_type() == at::kBool && in_prompt.sizes() == counts.sizes(),
              "apply_penalties: counts [R, V] int32 and in_prompt [R, V] bool");
  const int64_t num_picked = picked.numel(), vocab = logits.size(1);
  for (const at::Tensor* t : {&picked, &table_rows})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == num_picked,
                "apply_penalties: picked and table_rows [P] int64");
  for (const at::Tensor* t : {&repetition, &frequency, &presence})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == num_picked,
                "apply_penalties: per-row penalties [P] float32");
  const int64_t* logit_row = picked.data_ptr<int64_t>();
  const int64_t* table_row = table_rows.data_ptr<int64_t>();
  for (int64_t p = 0; p < num_picked; ++p)
    TORCH_CHECK(logit_row[p] >= 0 && logit_row[p] < logits.size(0) && table_row[p] >= 0 &&
                table_row[p] < counts.size(0), "apply_penalties: row out of range");
  at::parallel_for(0, num_picked, 1, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      float* x = logits.data_ptr<float>() + logit_row[p] * vocab;
      const int32_t* count = counts.data_ptr<int32_t>() + table_row[p] * vocab;
      const bool* prompt = in_prompt.data_ptr<bool>() + table_row[p] * vocab;
      const float penalty = repetition.data_ptr<float>()[p];
      const float inverse = 1.0f / penalty, freq = frequency.data_ptr<float>()[p], pres = presence.data_ptr<float>()[p];
      for (int64_t v = 0; v < vocab; ++v) {
        const bool occurred = count[v] > 0;
        float value = x[v];
        if (prompt[v] || occurred) value = value * (value > 0 ? inverse : penalty);
        x[v] = value - freq * static_cast<float>(count[v]) - pres * (occurred ? 1.f : 0.f);
      }
    }
  });
}

}  // namespace clex_cpu
