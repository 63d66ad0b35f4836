// RMSNorm on the CPU, optionally with the residual add before it (vLLM's fused_add_rms_norm): normalise in
// float32, round to the dtype, multiply by the weight; with a residual, the sum rounded to the dtype first.
//
// At decode a layer's tensors are a few KB, so each PyTorch operator costs its dispatch, not its
// arithmetic. The kernel computes what its PyTorch equivalent computes, with the same roundings to the
// model's dtype between steps (the CUDA Triton kernels in ``kernels/`` follow the same rules), so float32
// and bfloat16 results match the eager path.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include "clex_cpu.h"
#include "elementwise.h"

#include <cmath>
#include <tuple>

namespace {

using clex_cpu::check_rows;
using clex_cpu::kRowsPerTask;
using clex_cpu::rounded;

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
