// The CPU kernels' C++ entry points, for kernels that compose them (decoder_layer.cpp); each is also
// registered as torch.ops.clex_cpu.<name>, where its file documents it.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace clex_cpu {

at::Tensor blocked_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t N);
bool cpu_supported();
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, double eps);
at::Tensor silu_and_mul(const at::Tensor& gate_up);
at::Tensor argmax_rows(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor> rotate_and_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& cos, const at::Tensor& sin,
                                                    const std::optional<at::Tensor>& query_scale,
                                                    const at::Tensor& slots, at::Tensor k_cache, at::Tensor v_cache);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& runs, const at::Tensor& run_offsets, double scale);

}  // namespace clex_cpu
