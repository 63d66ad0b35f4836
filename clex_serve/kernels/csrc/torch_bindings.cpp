// Every schema of torch.ops.clex_cpu and its CPU implementation, in one place (as vLLM's
// csrc/cpu/torch_bindings.cpp). The kernels live one family per file and are declared in clex_cpu.h;
// Python calls them through clex_serve/kernels/cpu_ops.py alone.
#include <torch/library.h>

#include "clex_cpu.h"

TORCH_LIBRARY(clex_cpu, m) {
  m.def("cpu_supported() -> bool", &clex_cpu::cpu_supported);
  m.def("cpu_isa() -> str", &clex_cpu::cpu_isa);
  m.def("select_cpu_isa(str isa) -> str", &clex_cpu::select_cpu_isa);
  m.def("blocked_linear(Tensor x, Tensor w, Tensor? bias, int N) -> Tensor");
  m.def("amx_gemm(Tensor x, Tensor w, Tensor? bias, int N) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("rotate_and_cache(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor? query_scale, "
        "Tensor slots, Tensor(a!) k_cache, Tensor(b!) v_cache) -> (Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor runs, Tensor run_offsets, "
        "float scale, Tensor? row_groups=None) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, int start, int context, float scale) -> Tensor");
  m.def("llama_decode_layer(Tensor hidden, Tensor input_norm, Tensor post_norm, float eps, Tensor qkv, "
        "Tensor? qkv_bias, Tensor o, Tensor? o_bias, Tensor gate_up, Tensor? gate_up_bias, Tensor down, "
        "Tensor? down_bias, int heads, int kv_heads, int head_dim, int hidden_size, int intermediate_size, "
        "Tensor cos, Tensor sin, Tensor? query_scale, Tensor slots, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor runs, Tensor run_offsets, Tensor? row_groups=None) -> Tensor");
  m.def("llama_decode_step(Tensor ids, Tensor embedding, Tensor?[] layers, float eps, int heads, int kv_heads, "
        "int head_dim, int hidden_size, int intermediate_size, Tensor final_norm, float final_eps, Tensor head, "
        "Tensor? head_bias, int vocab, Tensor positions, Tensor inv_freq, float attention_scaling, "
        "Tensor? query_scale, Tensor slots, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor runs, "
        "Tensor run_offsets) -> Tensor");
  m.def("llama_decode_run(Tensor ids, Tensor embedding, Tensor?[] layers, float eps, int heads, "
        "int kv_heads, int head_dim, int hidden_size, int intermediate_size, Tensor final_norm, float final_eps, "
        "Tensor head, Tensor? head_bias, int vocab, Tensor positions, Tensor inv_freq, float attention_scaling, "
        "Tensor? query_scales, Tensor slots, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor runs, "
        "Tensor run_offsets, Tensor? temperatures=None, Tensor? uniforms=None, Tensor? greedy_rows=None) -> Tensor");
  m.def("bf16_dot_supported() -> bool", &clex_cpu::bf16_dot_supported);
  m.def("bf16_dot_at_fma_rate() -> bool", &clex_cpu::bf16_dot_at_fma_rate);
  m.def("bf16_dot_rows() -> int", &clex_cpu::bf16_dot_rows);
  m.def("select_bf16_dot_rows(int rows) -> int", &clex_cpu::select_bf16_dot_rows);
  m.def("stream_read(Tensor data) -> float", &clex_cpu::stream_read);
  m.def("fma_peak(int iterations) -> float", &clex_cpu::fma_peak);
  m.def("bf16_dot_peak(int iterations) -> float", &clex_cpu::bf16_dot_peak);
  m.def("amx_bf16_supported() -> bool", &clex_cpu::amx_bf16_supported);
  m.def("amx_bf16_peak(int iterations) -> float", &clex_cpu::amx_bf16_peak);
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("apply_token_bitmask(Tensor(a!) logits, Tensor bitmask, int[] rows) -> ()");
  m.def("sample_rows(Tensor logits, Tensor temperatures, Tensor uniforms) -> Tensor");
  m.def("apply_penalties(Tensor(a!) logits, Tensor counts, Tensor in_prompt, Tensor picked, Tensor table_rows, "
        "Tensor repetition, Tensor frequency, Tensor presence) -> ()");
}

TORCH_LIBRARY_IMPL(clex_cpu, CPU, m) {
  m.impl("blocked_linear", &clex_cpu::blocked_linear);
  m.impl("amx_gemm", &clex_cpu::amx_gemm);
  m.impl("rms_norm", &clex_cpu::rms_norm);
  m.impl("silu_and_mul", &clex_cpu::silu_and_mul);
  m.impl("rotate_and_cache", &clex_cpu::rotate_and_cache);
  m.impl("decode_attention", &clex_cpu::decode_attention);
  m.impl("prefill_attention", &clex_cpu::prefill_attention);
  m.impl("llama_decode_layer", &clex_cpu::llama_decode_layer);
  m.impl("llama_decode_step", &clex_cpu::llama_decode_step);
  m.impl("llama_decode_run", &clex_cpu::llama_decode_run);
  m.impl("argmax_rows", &clex_cpu::argmax_rows);
  m.impl("apply_token_bitmask", &clex_cpu::apply_token_bitmask);
  m.impl("sample_rows", &clex_cpu::sample_rows);
  m.impl("apply_penalties", &clex_cpu::apply_penalties);
}
