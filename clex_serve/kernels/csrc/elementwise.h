// What the element-wise kernels (rms_norm.cpp, activation.cpp, rotary_cache.cpp) share: PyTorch's rounding
// between steps, the row layout they take, and how many rows a thread task gets.
#pragma once

#include <ATen/core/Tensor.h>

namespace clex_cpu {

// What a PyTorch operator stores when its float32 result is written to a tensor of dtype T.
template <typename T> inline float rounded(float v) { return static_cast<float>(static_cast<T>(v)); }

// Rows per thread task: a decode step of a few streams stays on one thread, 16 streams split in two (16 a
// task kept them on one thread while the other waited: 16 decoding streams of the benchmark model, one
// engine alternating the two in one process, median step 14.54 -> 13.97 ms in float32, 9.03 -> 8.78 in
// bfloat16).
constexpr int64_t kRowsPerTask = 8;

inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, ": rows with contiguous columns");
}

}  // namespace clex_cpu
