// Whether this CPU runs the kernels: they are compiled for AVX-512 (F and BW) and ask once, at load
// (kernels/cpu_extension.py), before any of them is called.
#include "clex_cpu.h"

namespace clex_cpu {

bool cpu_supported() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }

}  // namespace clex_cpu
