// y = x @ W^T + bias for the few rows of a decode step, bfloat16 x and W, with AVX512_BF16's vdpbf16ps.
//
// The blocked kernel (blocked_linear.cpp) widens every bfloat16 weight to float32 (a zero-extension and a
// shift per 16 values) before its FMAs. vdpbf16ps takes bfloat16 as it is stored: 32 values of W times 32
// of x, each adjacent pair's two products summed into one float32 lane. So W is laid out in pairs of
// inputs, [N / 64, ceil(K / 2), 64, 2] (W[n, 2p] and W[n, 2p + 1] side by side, K padded with a zero
// column), and each pair of x is broadcast as one 32-bit value: for every pair, four 64-byte loads of W
// and four vdpbf16ps per row of x into 64 float32 accumulators.
//
// Calls of more rows (several streams) share each load of W among more rows, and where the CPU issues
// vdpbf16ps at half an FMA's rate (the AMX Xeon of docs/cpu.md) they multiply the same layout with float32 FMAs instead,
// past 2 rows; where it issues as often (Zen 4) every row count takes vdpbf16ps (``bf16_dot_rows``,
// measured once per process; docs/cpu.md).
//
// What rounds where: bfloat16 x and W enter as they are (no rounding), every product of two bfloat16 is
// exact in float32, the sums accumulate in float32 in order of k, and the output rounds once to bfloat16
// (to nearest even), as PyTorch's bfloat16 linear (oneDNN) stores its float32 accumulators. With FMAs the
// sums are the blocked kernel's bit for bit; vdpbf16ps adds a pair's two products to the accumulator as
// the instruction defines (each rounded, the odd input's first) and flushes denormals to zero, so a row can
// differ in the last bit between a call of 1-2 rows and a larger one.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_to_copy.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include "avx512_math.h"
#include "balanced_tasks.h"
#include "clex_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <cstring>
#include <type_traits>

#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace {

constexpr int64_t kBlock = 64;
constexpr int kVectors = kBlock / 16;
constexpr int64_t kPrefetchPairs = 32;  // pairs of a block ahead that are prefetched (8 KB)
constexpr int kMaxRows = 6;
constexpr int64_t kDotRowsAtHalfRate = 2;  // calls up to this many rows use vdpbf16ps there (measured, docs/cpu.md)
constexpr int64_t kEveryRow = std::numeric_limits<int64_t>::max();

std::atomic<int64_t>& dot_rows() {
  static std::atomic<int64_t> rows{clex_cpu::bf16_dot_at_fma_rate() ? kEveryRow : kDotRowsAtHalfRate};
  return rows;
}
constexpr bool AMX_ROWS = true;  // 3-16 rows on AMX tiles where the CPU has them (amx_pair_linear.cpp)

using clex_cpu::load16;
using clex_cpu::store16;

// x's row as 32-bit pairs of bfloat16, the last one padded with a zero where K is odd.
inline uint32_t pair_of(const c10::BFloat16* x, int64_t p, int64_t K) {
  uint16_t lo = x[2 * p].x, hi = 2 * p + 1 < K ? x[2 * p + 1].x : 0;
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

// Rows [0, ROWS) of x times one block of W in pairs. kDot: vdpbf16ps on x in bfloat16 pairs. Otherwise float32
// FMAs (where vdpbf16ps issues at half an FMA's rate, more rows share each load of W better so), with each
// 64-byte load split into its even inputs (a shift) and odd ones (a mask): fewer instructions than widening
// the plain blocked layout, and the same sums in the same order as the blocked kernel, bit for bit.
template <int ROWS, bool kDot>
AVX512_BF16 void pair_block_rows(const c10::BFloat16* x, const float* x_float, int64_t K,
                                 const c10::BFloat16* block, int64_t pairs, const c10::BFloat16* bias,
                                 c10::BFloat16* out, int64_t out_stride, int64_t out_cols) {
  __m512 acc[ROWS][kVectors];
  for (int v = 0; v < kVectors; ++v) {
    __m512 start = bias ? load16(bias + v * 16) : _mm512_setzero_ps();
    for (int m = 0; m < ROWS; ++m) acc[m][v] = start;
  }
  const bool even = K % 2 == 0;
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t p = 0; p < pairs; ++p) {
    const c10::BFloat16* w = block + p * kBlock * 2;
    const char* ahead = reinterpret_cast<const char*>(w + kPrefetchPairs * kBlock * 2);
    for (int line = 0; line < kVectors * 64; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    if constexpr (kDot) {
      __m512i wv[kVectors];
      for (int v = 0; v < kVectors; ++v) wv[v] = _mm512_loadu_si512(w + v * 32);
      for (int m = 0; m < ROWS; ++m) {
        uint32_t bits;
        if (even || p + 1 < pairs) std::memcpy(&bits, x + m * K + 2 * p, 4);
        else bits = pair_of(x + m * K, p, K);
        __m512bh xv = (__m512bh)_mm512_set1_epi32(int(bits));
        for (int v = 0; v < kVectors; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)wv[v], xv);
      }
    } else {
      // The even inputs of all rows, then the odd ones, reloading W (from L1) rather than holding both
      // halves: 24 accumulators, 4 weights and a broadcast fit the 32 registers; the odd input of a padded
      // last pair is not there (nor in the blocked kernel's sums).
      const int64_t odd_inputs = even || p + 1 < pairs ? 2 : 1;
#pragma GCC unroll 2
      for (int half = 0; half < odd_inputs; ++half) {
        __m512 wf[kVectors];
        for (int v = 0; v < kVectors; ++v) {
          __m512i raw = _mm512_loadu_si512(w + v * 32);
          wf[v] = _mm512_castsi512_ps(half ? _mm512_and_si512(raw, high_half) : _mm512_slli_epi32(raw, 16));
        }
        for (int m = 0; m < ROWS; ++m) {
          __m512 xv = _mm512_set1_ps(x_float[m * K + 2 * p + half]);
          for (int v = 0; v < kVectors; ++v) acc[m][v] = _mm512_fmadd_ps(xv, wf[v], acc[m][v]);
        }
      }
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    if (out_cols == kBlock) {
      for (int v = 0; v < kVectors; ++v) store16(out + m * out_stride + v * 16, acc[m][v]);
    } else {
      alignas(64) c10::BFloat16 tmp[kBlock];
      for (int v = 0; v < kVectors; ++v) store16(tmp + v * 16, acc[m][v]);
      std::memcpy(out + m * out_stride, tmp, out_cols * sizeof(c10::BFloat16));
    }
  }
}

}  // namespace

namespace clex_cpu {

// x [M, K] bfloat16 contiguous, w [N_blocks, ceil(K / 2), 64, 2] bfloat16, bias [N_blocks * 64] or none.
at::Tensor bf16_pair_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, int64_t N) {
  TORCH_CHECK(bf16_dot_supported(), "blocked_linear: a weight in bfloat16 pairs needs AVX512_BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "blocked_linear: pairs are bfloat16");
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0), pairs = w.size(1);
  TORCH_CHECK(pairs == (K + 1) / 2, "blocked_linear: w [N/64, ceil(K/2), 64, 2]");
  if (AMX_ROWS && amx_pair_linear_fits(M, K)) return amx_pair_linear(x, w, bias, N);
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const bool dot = M <= dot_rows().load(std::memory_order_relaxed);
  // x in float32 once for the FMA path, as the blocked kernel does.
  const at::Tensor x_float = dot ? at::Tensor() : x.to(at::kFloat);
  const float* xf = dot ? nullptr : x_float.data_ptr<float>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  const auto* bp = bias ? bias->data_ptr<c10::BFloat16>() : nullptr;
  auto* yp = y.data_ptr<c10::BFloat16>();
  // As the blocked kernel: a task per block, rows split in whole groups where blocks are fewer than threads.
  const int64_t row_groups = (M + kMaxRows - 1) / kMaxRows;
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::max<int64_t>(1, std::min(row_groups, (threads + blocks - 1) / blocks));
  const int64_t rows_per_split = (row_groups + splits - 1) / splits * kMaxRows;
  auto run = [&](auto dot) {
    constexpr bool kDot = decltype(dot)::value;
    auto body = [&](int64_t task) {  // one task: a block (or its share of rows)
      const int64_t b = task / splits, begin = task % splits * rows_per_split;
      const c10::BFloat16* block = wp + b * pairs * kBlock * 2;
      const c10::BFloat16* block_bias = bp ? bp + b * kBlock : nullptr;
      const int64_t cols = std::min(kBlock, N - b * kBlock);
      for (int64_t m = begin; m < std::min(M, begin + rows_per_split); m += kMaxRows) {
        const c10::BFloat16* xm = xp + m * K;
        const float* xfm = xf ? xf + m * K : nullptr;
        c10::BFloat16* out = yp + m * N + b * kBlock;
        switch (std::min<int64_t>(kMaxRows, M - m)) {
          case 1: pair_block_rows<1, kDot>(xm, xfm, K, block, pairs, block_bias, out, N, cols); break;
          case 2: pair_block_rows<2, kDot>(xm, xfm, K, block, pairs, block_bias, out, N, cols); break;
          case 3: pair_block_rows<3, kDot>(xm, xfm, K, block, pairs, block_bias, out, N, cols); break;
          case 4: pair_block_rows<4, kDot>(xm, xfm, K, block, pairs, block_bias, out, N, cols); break;
          case 5: pair_block_rows<5, kDot>(xm, xfm, K, block, pairs, block_bias, out, N, cols); break;
          default: pair_block_rows<6, kDot>(xm, xfm, K, block, pairs, block_bias, out, N, cols); break;
        }
      }
    };
    // Balanced as the blocked kernel's (balanced_tasks.h); here it measured the same as even shares (the
    // 33 matrices of the benchmark model in one process, medians of six alternating rounds: 1 row 2.68 /
    // 2.67 ms, 16 rows 4.53 / 4.46), and it keeps a slow core from holding up the other.
    clex_cpu::parallel_tasks(blocks * splits, [&](const auto& for_each) { for_each(body); });
  };
  if (dot) run(std::true_type{});
  else run(std::false_type{});
  return y;
}

int64_t bf16_dot_rows() { return dot_rows().load(std::memory_order_relaxed); }

int64_t select_bf16_dot_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0, "select_bf16_dot_rows: a row count, or 0 for FMAs at every count");
  dot_rows().store(rows, std::memory_order_relaxed);
  return rows;
}

}  // namespace clex_cpu
