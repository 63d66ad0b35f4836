// Which instruction set the kernels run on. Every kernel has an AVX-512 (F, BW) body and an AVX2 + FMA one,
// each compiled for its own target (avx512_math.h, avx2_math.h) and chosen per call by ``avx512_active``:
// AVX-512 where the CPU has it, AVX2 otherwise (most laptops and desktops, AMD before Zen 4), and AVX2 on
// an AVX-512 CPU when asked (``select_cpu_isa``: CLEX_SERVE_CPU_ISA=avx2, and the tests of both bodies).
#include "clex_cpu.h"

#include <atomic>

namespace clex_cpu {

namespace {

bool avx512_present() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }

std::atomic<bool>& use_avx512() {
  static std::atomic<bool> flag{avx512_present()};
  return flag;
}

}  // namespace

bool cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

bool avx512_active() { return use_avx512().load(std::memory_order_relaxed); }

std::string cpu_isa() { return avx512_active() ? "avx512" : "avx2"; }

std::string select_cpu_isa(const std::string& isa) {
  TORCH_CHECK(isa == "avx512" || isa == "avx2", "select_cpu_isa: 'avx512' or 'avx2', not '", isa, "'");
  use_avx512().store(isa == "avx512" && avx512_present(), std::memory_order_relaxed);
  return cpu_isa();
}

}  // namespace clex_cpu
