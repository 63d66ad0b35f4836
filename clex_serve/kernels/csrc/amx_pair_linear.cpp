// bfloat16 y = x @ W^T + bias for 3-16 rows (a step of several decoding streams) on AMX tiles, where the
// CPU has them, from the same pair layout that vdpbf16ps reads (bf16_pair_linear.cpp).
//
// [N / 64, K / 2, 64, 2] is AMX's layout for the right-hand tile as it stands: 16 input pairs of 16
// columns are 16 rows of 64 bytes, 256 bytes apart. So a block of 64 outputs is four float32 tiles of
// 16 x 16; every 32 inputs, the rows of x (up to 16, read in place as a tile of M rows of 64 bytes) times
// four weight tiles are added to them by tdpbf16ps. One tile multiply does the work of 16 rows x 32 FMAs
// on 16 lanes, so at 3-16 rows the weights stream at memory speed where FMAs (bit for bit the blocked
// kernel's sums) become bound by their issue rate.
//
// What rounds where: as oneDNN's bfloat16 GEMM on the same units: exact bfloat16 products, float32 sums
// (the pairs as the instruction adds them; denormals flushed), one rounding to bfloat16 at the store. A
// row's result does not depend on the other rows of the call (each is its own row of the tiles).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include "avx512_math.h"
#include "clex_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#define AMX_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-bf16")))

namespace {

constexpr int64_t kBlock = 64;
constexpr int64_t kStep = 32;  // inputs per tile multiply

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: the block's four 16-column groups of float32 sums, M rows; 4: x, M rows of 32 inputs; 5: a
// weight tile, 16 input pairs of 16 columns.
AMX_BF16 void configure(int64_t M) {
  TileConfig config;
  for (int t = 0; t < 4; ++t) config.rows[t] = uint8_t(M), config.bytes_per_row[t] = 64;
  config.rows[4] = uint8_t(M), config.bytes_per_row[4] = 64;
  config.rows[5] = 16, config.bytes_per_row[5] = 64;
  _tile_loadconfig(&config);
}

AMX_BF16 void amx_block(const c10::BFloat16* x, int64_t M, int64_t K, const c10::BFloat16* block,
                        const c10::BFloat16* bias, c10::BFloat16* out, int64_t out_stride, int64_t out_cols) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  constexpr int64_t pair_row = kBlock * 2;  // elements per input pair of a block (256 bytes)
  for (int64_t k = 0; k < K; k += kStep) {
    _tile_loadd(4, x + k, K * 2);
    const c10::BFloat16* w = block + (k / 2) * pair_row;
    _tile_loadd(5, w, pair_row * 2);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(5, w + 32, pair_row * 2);
    _tile_dpbf16ps(1, 4, 5);
    _tile_loadd(5, w + 64, pair_row * 2);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(5, w + 96, pair_row * 2);
    _tile_dpbf16ps(3, 4, 5);
  }
  alignas(64) float sums[16 * kBlock];
  _tile_stored(0, sums, kBlock * 4);
  _tile_stored(1, sums + 16, kBlock * 4);
  _tile_stored(2, sums + 32, kBlock * 4);
  _tile_stored(3, sums + 48, kBlock * 4);
  for (int64_t m = 0; m < M; ++m) {
    alignas(64) c10::BFloat16 row[kBlock];
    for (int v = 0; v < kBlock / 16; ++v) {
      __m512 sum = _mm512_load_ps(sums + m * kBlock + v * 16);
      if (bias) sum = _mm512_add_ps(sum, clex_cpu::load16(bias + v * 16));
      clex_cpu::store16(row + v * 16, sum);
    }
    std::memcpy(out + m * out_stride, row, out_cols * sizeof(c10::BFloat16));
  }
}

// Blocks [first, last) on this thread: the tile configuration is each thread's own.
AMX_BF16 void amx_blocks(int64_t first, int64_t last, const c10::BFloat16* x, int64_t M, int64_t K, int64_t pairs,
                         const c10::BFloat16* w, const c10::BFloat16* bias, c10::BFloat16* y, int64_t N) {
  configure(M);
  for (int64_t b = first; b < last; ++b) {
    amx_block(x, M, K, w + b * pairs * kBlock * 2, bias ? bias + b * kBlock : nullptr, y + b * kBlock, N,
              std::min(kBlock, N - b * kBlock));
  }
  _tile_release();
}

}  // namespace

namespace clex_cpu {

bool amx_pair_linear_fits(int64_t M, int64_t K) {
  static const bool amx = amx_bf16_supported();  // asks the OS for the tiles' state once
  return amx && M >= 3 && M <= 16 && K % kStep == 0;
}

// x [M, K] bfloat16 contiguous (3 <= M <= 16, K a multiple of 32), w [N_blocks, K / 2, 64, 2].
at::Tensor amx_pair_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0), pairs = w.size(1);
  TORCH_CHECK(amx_pair_linear_fits(M, K) && pairs * 2 == K, "amx_pair_linear: 3-16 rows, K a multiple of 32");
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  const auto* bp = bias ? bias->data_ptr<c10::BFloat16>() : nullptr;
  auto* yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    amx_blocks(first, last, xp, M, K, pairs, wp, bp, yp, N);
  });
  return y;
}

}  // namespace clex_cpu
