// What the element-wise kernels (rms_norm.cpp, activation.cpp, rotary_cache.cpp) share: PyTorch's rounding
// between steps, the row layout they take, and how many rows a thread task gets.
#pragma once

#include <ATen/core/Tensor.h>

namespace clex_cpu {

// What a PyTorch operator stores when its float32 result is written to a tensor of dtype T.
template <typename T> inline float rounded(float v) { return static_cast<float>(static_cast<T>(v)); }

constexpr int64_t kRowsPerTask = 16;  // rows per thread task: a decode step's few rows stay on one thread

inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, ": rows with contiguous columns");
}

}  // namespace clex_cpu
