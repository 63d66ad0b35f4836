// bfloat16 y = x @ W^T + bias for the many rows of a prompt on AMX tiles, from the pair layout the decode
// kernels read (bf16_pair_linear.cpp, amx_pair_linear.cpp), so a bfloat16 model keeps one copy of its weights.
//
// A prompt's GEMM can be bound by the tile multiplies rather than by memory only if every tile loaded is
// used more than once. The micro-kernel computes 32 rows x 32 columns: two tiles of x (16 rows of 32 inputs
// each), two tiles of W (16 input pairs of 16 columns, 256 bytes apart in the pair layout) and four
// float32 tiles of sums, so every 32 inputs four loads feed four tile multiplies (with one row tile of x,
// as the 3-16 row kernel has, five loads feed four). A thread takes 32 rows of x at a time (32 KB at
// K = 512, held in L1) past every 32 columns of W (32 KB, from L2): x is read from memory once, W once per
// 512 rows.
//
// What rounds where: as oneDNN's bfloat16 GEMM on the same units (and amx_pair_linear.cpp): exact bfloat16
// products, float32 sums (the pairs as the instruction adds them; denormals flushed), the bias added in
// float32, one rounding to bfloat16 (to nearest even) at the store. A row's result does not depend on the
// other rows; it can differ in the last bit from oneDNN's, which orders its sums differently.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include "avx512_math.h"
#include "clex_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#define AMX_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-bf16")))

namespace {

constexpr int64_t kBlock = 64;      // columns of a block of the pair layout
constexpr int64_t kStep = 32;       // inputs per tile multiply
constexpr int64_t kRows = 32;       // rows of x per micro-kernel: two row tiles
constexpr int64_t kColumns = 32;    // columns per micro-kernel: two column tiles
constexpr int64_t kPairRow = kBlock * 2;  // elements of one input pair of a block (256 bytes)
constexpr int64_t kPanel = 256;     // columns of W kept in L2 while the rows pass (256 KB at K = 512)
constexpr int64_t kGroupChunks = 16;  // chunks of rows (512 rows, 512 KB of x at K = 512) that pass each panel

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-1: sums of rows 0-15 for column tiles 0-1; 2-3: the same for rows 16-31 (``lower`` rows);
// 4-5: x, rows 0-15 and 16-31; 6-7: W, column tiles 0-1. ``upper`` + ``lower`` rows of x.
AMX_BF16 void configure(int upper, int lower) {
  TileConfig config;
  for (int t : {0, 1, 4}) config.rows[t] = uint8_t(upper), config.bytes_per_row[t] = 64;
  for (int t : {2, 3, 5}) config.rows[t] = uint8_t(lower), config.bytes_per_row[t] = 64;
  for (int t : {6, 7}) config.rows[t] = 16, config.bytes_per_row[t] = 64;
  _tile_loadconfig(&config);
}

// Rows [0, upper + lower) of x times columns [0, 32) at ``w`` (the first of the two column tiles, in the
// pair layout), stored with the bias to ``out`` (``columns`` <= 32 of them).
template <bool LOWER>
AMX_BF16 void micro_kernel(const c10::BFloat16* x, int64_t K, const c10::BFloat16* w, const c10::BFloat16* bias,
                           c10::BFloat16* out, int64_t out_stride, int upper, int lower, int64_t columns) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (LOWER) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < K; k += kStep) {
    const c10::BFloat16* pairs = w + (k / 2) * kPairRow;
    _tile_loadd(4, x + k, K * 2);
    _tile_loadd(6, pairs, kPairRow * 2);
    _tile_loadd(7, pairs + 32, kPairRow * 2);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (LOWER) {
      _tile_loadd(5, x + 16 * K + k, K * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  alignas(64) float sums[kRows * kColumns];
  _tile_stored(0, sums, kColumns * 4);
  _tile_stored(1, sums + 16, kColumns * 4);
  if constexpr (LOWER) {
    _tile_stored(2, sums + 16 * kColumns, kColumns * 4);
    _tile_stored(3, sums + 16 * kColumns + 16, kColumns * 4);
  }
  const __mmask32 keep = columns >= 32 ? ~__mmask32(0) : (__mmask32(1) << columns) - 1;
  for (int m = 0; m < upper + lower; ++m) {
    __m512 low = _mm512_load_ps(sums + m * kColumns), high = _mm512_load_ps(sums + m * kColumns + 16);
    if (bias) low = _mm512_add_ps(low, clex_cpu::load16(bias)), high = _mm512_add_ps(high, clex_cpu::load16(bias + 16));
    __m512i low_bits = _mm512_srli_epi32(_mm512_castps_si512(clex_cpu::round16<c10::BFloat16>(low)), 16);
    __m512i high_bits = _mm512_srli_epi32(_mm512_castps_si512(clex_cpu::round16<c10::BFloat16>(high)), 16);
    __m512i packed = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(low_bits)),
                                        _mm512_cvtepi32_epi16(high_bits), 1);
    _mm512_mask_storeu_epi16(out + m * out_stride, keep, packed);
  }
}

// Row chunks [first, last) (of 32 rows) on this thread, kGroupChunks at a time (their rows in L2), panel by
// panel of W: each panel of kPanel columns stays in L2 while the group's chunks pass it, each chunk's 32
// rows in L1 across the panel's micro-kernels. The tile configuration is each thread's own, set again for
// a last chunk of fewer rows.
AMX_BF16 void gemm_chunks(int64_t first, int64_t last, const c10::BFloat16* x, int64_t M, int64_t K, int64_t pairs,
                          const c10::BFloat16* w, const c10::BFloat16* bias, c10::BFloat16* y, int64_t N) {
  int configured = -1;
  for (int64_t g0 = first; g0 < last; g0 += kGroupChunks) {
    const int64_t g1 = std::min(last, g0 + kGroupChunks);
    for (int64_t p0 = 0; p0 < N; p0 += kPanel) {
      for (int64_t chunk = g0; chunk < g1; ++chunk) {
        const int64_t m0 = chunk * kRows, rows = std::min(kRows, M - m0);
        const int upper = int(std::min<int64_t>(16, rows)), lower = int(rows - upper);
        if (configured != rows) configure(upper, std::max(lower, 1)), configured = int(rows);
        for (int64_t n0 = p0; n0 < std::min(N, p0 + kPanel); n0 += kColumns) {
          const c10::BFloat16* columns = w + (n0 / kBlock) * pairs * kPairRow + (n0 % kBlock) * 2;
          const c10::BFloat16* column_bias = bias ? bias + n0 : nullptr;
          c10::BFloat16* out = y + m0 * N + n0;
          const int64_t count = std::min(kColumns, N - n0);
          if (lower)
            micro_kernel<true>(x + m0 * K, K, columns, column_bias, out, N, upper, lower, count);
          else
            micro_kernel<false>(x + m0 * K, K, columns, column_bias, out, N, upper, 0, count);
        }
      }
    }
  }
  _tile_release();
}

bool amx_gemm_fits(int64_t K) {
  static const bool amx = clex_cpu::amx_bf16_supported();  // asks the OS for the tiles' state once
  return amx && K % kStep == 0;
}

}  // namespace

namespace clex_cpu {

// x [M, K] bfloat16 contiguous (K a multiple of 32), w [N_blocks, K / 2, 64, 2], bias [N_blocks * 64] or none.
at::Tensor amx_gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, "amx_gemm: x [M, K] bfloat16");
  TORCH_CHECK(w.dim() == 4 && w.size(2) == kBlock && w.size(3) == 2 && w.is_contiguous() &&
                  w.scalar_type() == at::kBFloat16 && w.size(1) * 2 == x.size(1),
              "amx_gemm: w [N/64, K/2, 64, 2] bfloat16 with x's K");
  TORCH_CHECK(N > (w.size(0) - 1) * kBlock && N <= w.size(0) * kBlock, "amx_gemm: N does not match w");
  TORCH_CHECK(amx_gemm_fits(x.size(1)), "amx_gemm: needs AMX and K a multiple of 32");
  at::Tensor bias_contiguous;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == w.size(0) * kBlock,
                "amx_gemm: bias padded to whole blocks, bfloat16");
    bias_contiguous = bias->contiguous();
  }
  const int64_t M = x.size(0), K = x.size(1), pairs = w.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  const auto* bp = bias_contiguous.defined() ? bias_contiguous.data_ptr<c10::BFloat16>() : nullptr;
  auto* yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, (M + kRows - 1) / kRows, 1, [&](int64_t first, int64_t last) {
    gemm_chunks(first, last, xp, M, K, pairs, wp, bp, yp, N);
  });
  return y;
}

}  // namespace clex_cpu
