// The machine's own yardsticks for the CPU benchmark: read bandwidth and compute peaks, measured by kernels
// that do what a decode and a prompt do at their best, so that a fraction of them says how far from the
// machine's limit a step is (bench/cpu_benchmark.py times them).
//
// - stream_read: every thread sums its own contiguous share of a buffer with 64-byte loads into eight
//   independent accumulators (as the blocked linear kernel streams its weight blocks), so that no thread
//   waits on another and the loads are limited by the memory system, not by one add chain. A float
//   tensor's sum in PyTorch does less well (a reduction tree, fewer loads in flight).
// - fma_peak / bf16_dot_peak: every thread runs 24 independent chains of vfmadd (float32: 2 FLOPs per lane)
//   or vdpbf16ps (bfloat16 pairs into float32: 4 FLOPs per lane) on registers only, enough chains to cover
//   the instructions' latency on two ports.
// - amx_bf16_peak: where the CPU has AMX (bfloat16 tile multiplies, which oneDNN uses for bfloat16 GEMMs),
//   every thread runs four independent tdpbf16ps chains on tiles (16 x 16 float32 += 16 x 32 bf16 times
//   32 x 16 bf16: 16,384 FLOPs each), so that bfloat16 prompt GEMMs have the peak of the units they run on.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <immintrin.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <vector>

#include "avx2_math.h"
#include "avx512_math.h"
#include "clex_cpu.h"

namespace {

constexpr int kChains = 24;

AVX512 float sum_share(const float* p, int64_t n) {
  __m512 acc[8];
#pragma GCC unroll 8
  for (auto& a : acc) a = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 128 <= n; i += 128)
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_add_ps(acc[j], _mm512_loadu_ps(p + i + 16 * j));
  for (int j = 1; j < 8; ++j) acc[0] = _mm512_add_ps(acc[0], acc[j]);
  float total = _mm512_reduce_add_ps(acc[0]);
  for (; i < n; ++i) total += p[i];
  return total;
}

AVX512 float fma_chains(int64_t iterations) {
  __m512 acc[kChains];
#pragma GCC unroll 24
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(0.001f * c);
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-4f);
  for (int64_t i = 0; i < iterations; ++i)
#pragma GCC unroll 24
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
  for (int c = 1; c < kChains; ++c) acc[0] = _mm512_add_ps(acc[0], acc[c]);
  return _mm512_reduce_add_ps(acc[0]);
}

// The AVX2 bodies (32-byte loads and 8-lane FMAs; 16 vector registers hold 12 chains, which cover the FMA's
// latency on two ports, run twice an iteration so that an iteration is 24 instructions as above).
AVX2 float sum_share_avx2(const float* p, int64_t n) {
  __m256 acc[8];
#pragma GCC unroll 8
  for (auto& a : acc) a = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_add_ps(acc[j], _mm256_loadu_ps(p + i + 8 * j));
  for (int j = 1; j < 8; ++j) acc[0] = _mm256_add_ps(acc[0], acc[j]);
  float total = clex_cpu::sum8(acc[0]);
  for (; i < n; ++i) total += p[i];
  return total;
}

AVX2 float fma_chains_avx2(int64_t iterations) {
  constexpr int kAvx2Chains = kChains / 2;
  __m256 acc[kAvx2Chains];
#pragma GCC unroll 12
  for (int c = 0; c < kAvx2Chains; ++c) acc[c] = _mm256_set1_ps(0.001f * c);
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-4f);
  for (int64_t i = 0; i < iterations; ++i)
#pragma GCC unroll 24
    for (int c = 0; c < kChains; ++c) acc[c % kAvx2Chains] = _mm256_fmadd_ps(acc[c % kAvx2Chains], a, b);
  for (int c = 1; c < kAvx2Chains; ++c) acc[0] = _mm256_add_ps(acc[0], acc[c]);
  return clex_cpu::sum8(acc[0]);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) float dot_chains(int64_t iterations) {
  __m512 acc[kChains];
#pragma GCC unroll 24
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(0.001f * c);
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3F80);  // bfloat16 1.0
  const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3800);  // bfloat16 2^-15
  for (int64_t i = 0; i < iterations; ++i)
#pragma GCC unroll 24
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  for (int c = 1; c < kChains; ++c) acc[0] = _mm512_add_ps(acc[0], acc[c]);
  return _mm512_reduce_add_ps(acc[0]);
}

// The tile configuration of palette 1: eight tiles of 16 rows of 64 bytes.
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile,amx-bf16"))) float tile_chains(int64_t iterations) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.bytes_per_row[t] = 64;
  alignas(64) uint16_t ones[16 * 32];
  for (auto& value : ones) value = 0x3C00;  // bfloat16 2^-7: sums stay finite
  alignas(64) float out[16 * 16];
  _tile_loadconfig(&config);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  for (int64_t i = 0; i < iterations; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  _tile_release();
  return out[0];
}

// Runs body(thread) once on every one of torch's threads at the same time; the results summed.
template <typename Body>
double on_every_thread(Body body) {
  const int64_t threads = at::get_num_threads();
  std::vector<double> parts(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) parts[t] = body(t, threads);
  });
  double total = 0;
  for (double part : parts) total += part;
  return total;
}

}  // namespace

namespace clex_cpu {

bool bf16_dot_supported() { return avx512_active() && __builtin_cpu_supports("avx512bf16"); }

// Linux hands out the tile registers' state only to a process that asks for it (arch_prctl
// ARCH_REQ_XCOMP_PERM for XTILEDATA); asking again is harmless. False where the CPU or the kernel has none.
bool amx_bf16_supported() {
  constexpr int kRequestPermission = 0x1023, kTileData = 18;
  return avx512_active() && __builtin_cpu_supports("amx-bf16") && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}

// Whether vdpbf16ps issues as often as a float32 FMA on this core (Zen 4: then it does twice an FMA's work),
// or at half its rate (the AMX Xeon of docs/cpu.md), measured once on the calling thread: the fastest of 5 runs of each
// chain kernel, 20,000 iterations (a fraction of a millisecond each).
bool bf16_dot_at_fma_rate() {
  static const bool answer = [] {
    if (!bf16_dot_supported()) return false;
    auto fastest = [](float (*chains)(int64_t)) {
      double best = 1e30;
      for (int run = 0; run < 5; ++run) {
        const auto start = std::chrono::steady_clock::now();
        volatile float sink = chains(20000);
        (void)sink;
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
      return best;
    };
    return fastest(dot_chains) < 1.3 * fastest(fma_chains);
  }();
  return answer;
}

double stream_read(const at::Tensor& data) {
  TORCH_CHECK(data.scalar_type() == at::kFloat && data.is_contiguous(), "stream_read: contiguous float32");
  const float* p = data.data_ptr<float>();
  const int64_t n = data.numel();
  const bool avx512 = avx512_active();
  return on_every_thread([&](int64_t t, int64_t threads) {
    // Shares of whole 4 KB pages, so that no two threads read one line.
    const int64_t share = (n / threads + 1023) / 1024 * 1024;
    const int64_t begin = std::min(n, t * share), end = std::min(n, begin + share);
    return double(avx512 ? sum_share(p + begin, end - begin) : sum_share_avx2(p + begin, end - begin));
  });
}

double fma_peak(int64_t iterations) {
  const bool avx512 = avx512_active();
  return on_every_thread([&](int64_t, int64_t) {
    return double(avx512 ? fma_chains(iterations) : fma_chains_avx2(iterations));
  });
}

double bf16_dot_peak(int64_t iterations) {
  TORCH_CHECK(bf16_dot_supported(), "bf16_dot_peak: this CPU has no AVX512_BF16");
  return on_every_thread([&](int64_t, int64_t) { return double(dot_chains(iterations)); });
}

double amx_bf16_peak(int64_t iterations) {
  TORCH_CHECK(amx_bf16_supported(), "amx_bf16_peak: this CPU (or kernel) offers no AMX bfloat16 tiles");
  return on_every_thread([&](int64_t, int64_t) { return double(tile_chains(iterations)); });
}

}  // namespace clex_cpu
