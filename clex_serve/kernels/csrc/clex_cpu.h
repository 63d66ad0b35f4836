// Every CPU kernel's C++ entry point, one family per file (documented there); torch_bindings.cpp registers
// each as torch.ops.clex_cpu.<name>, and kernels that compose others (decoder_layer.cpp) call them here.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace clex_cpu {

// cpu_features.cpp
bool cpu_supported();  // AVX2 and FMA: the kernels run here
bool avx512_active();  // the AVX-512 bodies run (else the AVX2 ones)
std::string cpu_isa();
std::string select_cpu_isa(const std::string& isa);

// blocked_linear.cpp
at::Tensor blocked_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t N);

// bf16_pair_linear.cpp (blocked_linear's path for bfloat16 weights in pairs; needs AVX512_BF16)
at::Tensor bf16_pair_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, int64_t N);
int64_t bf16_dot_rows();  // calls of up to this many rows take vdpbf16ps, larger ones float32 FMAs
int64_t select_bf16_dot_rows(int64_t rows);  // for tests and measurements

// amx_pair_linear.cpp (bf16_pair_linear's path for 3-16 rows where the CPU has AMX)
bool amx_pair_linear_fits(int64_t M, int64_t K);
at::Tensor amx_pair_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, int64_t N);

// amx_gemm.cpp (bfloat16 prompts on AMX tiles, from the pair layout)
at::Tensor amx_gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t N);

// rms_norm.cpp
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, double eps);

// activation.cpp
at::Tensor silu_and_mul(const at::Tensor& gate_up);

// rotary_cache.cpp
std::tuple<at::Tensor, at::Tensor> rotate_and_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& cos, const at::Tensor& sin,
                                                    const std::optional<at::Tensor>& query_scale,
                                                    const at::Tensor& slots, at::Tensor k_cache, at::Tensor v_cache);

// decode_attention.cpp
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& runs, const at::Tensor& run_offsets, double scale,
                            const std::optional<at::Tensor>& row_groups);

// prefill_attention.cpp
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t start,
                             int64_t context, double scale);

// decoder_layer.cpp
at::Tensor llama_decode_layer(const at::Tensor& hidden, const at::Tensor& input_norm, const at::Tensor& post_norm,
                              double eps, const at::Tensor& qkv, const std::optional<at::Tensor>& qkv_bias,
                              const at::Tensor& o, const std::optional<at::Tensor>& o_bias, const at::Tensor& gate_up,
                              const std::optional<at::Tensor>& gate_up_bias, const at::Tensor& down,
                              const std::optional<at::Tensor>& down_bias, int64_t heads, int64_t kv_heads,
                              int64_t head_dim, int64_t hidden_size, int64_t intermediate_size,
                              const at::Tensor& cos, const at::Tensor& sin,
                              const std::optional<at::Tensor>& query_scale, const at::Tensor& slots,
                              at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& runs,
                              const at::Tensor& run_offsets, const std::optional<at::Tensor>& row_groups);

// decode_step.cpp
at::Tensor llama_decode_step(const at::Tensor& ids, const at::Tensor& embedding,
                             const c10::List<std::optional<at::Tensor>>& layers, double eps, int64_t heads,
                             int64_t kv_heads, int64_t head_dim, int64_t hidden_size, int64_t intermediate_size,
                             const at::Tensor& final_norm, double final_eps, const at::Tensor& head,
                             const std::optional<at::Tensor>& head_bias, int64_t vocab, const at::Tensor& positions,
                             const at::Tensor& inv_freq, double attention_scaling,
                             const std::optional<at::Tensor>& query_scale, const at::Tensor& slots,
                             at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& runs,
                             const at::Tensor& run_offsets);

// decode_run.cpp
at::Tensor llama_decode_run(const at::Tensor& ids, const at::Tensor& embedding,
                            const c10::List<std::optional<at::Tensor>>& layers, double eps, int64_t heads,
                            int64_t kv_heads, int64_t head_dim, int64_t hidden_size, int64_t intermediate_size,
                            const at::Tensor& final_norm, double final_eps, const at::Tensor& head,
                            const std::optional<at::Tensor>& head_bias, int64_t vocab, const at::Tensor& positions,
                            const at::Tensor& inv_freq, double attention_scaling,
                            const std::optional<at::Tensor>& query_scales, const at::Tensor& slots,
                            at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& runs,
                            const at::Tensor& run_offsets, const std::optional<at::Tensor>& temperatures,
                            const std::optional<at::Tensor>& uniforms, const std::optional<at::Tensor>& greedy_rows);

// sampling.cpp
at::Tensor argmax_rows(const at::Tensor& x);
void apply_token_bitmask(at::Tensor logits, const at::Tensor& bitmask, at::IntArrayRef rows);
at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& temperatures, const at::Tensor& uniforms);

// yardsticks.cpp (the benchmark's measures of the machine)
bool bf16_dot_supported();
bool bf16_dot_at_fma_rate();  // vdpbf16ps issues as often as an FMA (measured once)
double stream_read(const at::Tensor& data);
double fma_peak(int64_t iterations);
double bf16_dot_peak(int64_t iterations);
bool amx_bf16_supported();
double amx_bf16_peak(int64_t iterations);

// penalties.cpp
void apply_penalties(at::Tensor logits, const at::Tensor& counts, const at::Tensor& in_prompt,
                     const at::Tensor& picked, const at::Tensor& table_rows, const at::Tensor& repetition,
                     const at::Tensor& frequency, const at::Tensor& presence);

}  // namespace clex_cpu
