// y = x @ W^T + bias on the CPU for the few rows of a decode step, with W stored in column blocks.
//
// A decode step multiplies one to a few dozen rows by every weight matrix, so it is bound by reading the
// weights, not by arithmetic. The blocked layout [N / 64, K, 64] makes each block of 64 outputs one
// contiguous stream: for every k, 64 consecutive weights are multiplied by the broadcast x[m, k] into 64
// float32 accumulators held in registers (four AVX-512 vectors per row of x), with no horizontal sums.
// bfloat16 weights are widened to float32 in registers (a shift), so both dtypes accumulate in float32 and
// bfloat16 reads half the bytes. Rows of x are taken six at a time; a block (at most a few hundred KB), or
// a slice of it, stays in cache while the next six rows pass over it, so weights come from memory once per
// step.
//
// Without AVX-512 (16 vector registers of 8 lanes) a row's 64 sums take 8 registers: one row walks the whole
// block (a decode step of one stream, bound by the stream of weights), and more rows walk it in halves of 32
// columns, three rows at a time (12 sums), the block's slice held in L1 for the passes after the first. Each
// output sums the same products in the same order as the AVX-512 body: the results are equal bit for bit.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/_to_copy.h>
#include <c10/util/BFloat16.h>

#include "avx2_math.h"
#include "avx512_math.h"
#include "balanced_tasks.h"
#include "clex_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace {

constexpr int64_t kBlock = 64;       // outputs per block: four 16-lane vectors
constexpr int kVectors = kBlock / 16;
constexpr int64_t kPrefetchRows = 128;  // k rows of a block ahead that are prefetched into L2 (32 KB in float32)
constexpr int kMaxRows = 6;             // rows of x sharing one pass over a block (24 accumulators)
// From 7 to kMaxSlicedRows rows, a block is walked in slices of kSliceRows k: every group of six rows takes
// a slice in turn (from L1), the groups' float32 sums kept between slices, and the memory stream goes on
// through all of them. Whole, the first group streamed the block from memory and the later ones re-read
// it from L2 with memory idle. Past 32 rows a step is bound by its multiply-adds and slicing gained nothing.
constexpr int64_t kSliceRows = 64;
constexpr int64_t kMaxSlicedRows = 32;
// The most bfloat16 rows the AVX2 body slices and widens (cpu_linear's BLOCKED_MAX_ROWS_WITHOUT_ONEDNN_BF16;
// 8 layers of the benchmark model at 16 rows: 10.6 ms widening every pass, 6.4 ms widening once a slice).
constexpr int64_t kMaxWidenedRows = 256;
constexpr int64_t kMinWidenedRows = 4;  // at 2 rows widening a slice cost more than it saved

using clex_cpu::load16;
using clex_cpu::store16;

// Where one pass of rows [0, ROWS) over k rows [k_begin, k_end) of a block starts and ends its 64 sums per
// row: from the bias (or zero) or from float32 partial sums of the slices before, to partial sums or to
// the block's columns of y. Partial sums are float32, so slicing does not change what is rounded or when.
template <typename T>
struct BlockPass {
  const T* bias;        // at the first slice; null for zero
  const float* from;    // partial sums [ROWS, 64] of earlier slices, or null at the first
  float* to;            // partial sums for later slices, or null at the last
  T* out;               // y's rows at the block's first column (written at the last slice)
  int64_t out_stride;
  int64_t out_cols;     // 64, or fewer in the last block of a matrix padded to whole blocks
  // The stream kPrefetchRows ahead is asked for into L2 by a pass over the slice: its k with k % every ==
  // phase. Sliced (AVX-512), every group of rows asks for its share: when the first group asked for all of
  // it, its pass issued a slice's prefetches in one burst and the later groups none, and 8 and 16 rows ran
  // 6-8% slower (the benchmark model's 33 matrices in float32: 7.12 against 6.53 ms at 8 rows, 11.09 against
  // 10.47 at 16, medians of five alternating rounds; 32 rows unchanged). Whole blocks: none with AVX-512
  // nor for one row with AVX2; the first group of AVX2's sliced passes.
  bool prefetch;
  int64_t phase, every;
};

template <int ROWS, typename T>
AVX512 void block_rows(const float* x, int64_t x_stride, const T* block, int64_t k_begin, int64_t k_end,
                       const BlockPass<T>& pass) {
  __m512 acc[ROWS][kVectors];
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < kVectors; ++v)
      acc[m][v] = pass.from ? _mm512_load_ps(pass.from + m * kBlock + v * 16)
                  : pass.bias ? load16(pass.bias + v * 16)
                              : _mm512_setzero_ps();
  // The first k of this pass's share of the prefetches (no division per k: this is the decode's inner loop).
  int64_t next_prefetch = k_begin + ((pass.phase - k_begin % pass.every) % pass.every + pass.every) % pass.every;
  for (int64_t k = k_begin; k < k_end; ++k) {
    const T* w = block + k * kBlock;
    // Into L2, not L1: a prefetch to L1 holds one of the core's few line-fill buffers until memory
    // answers, and with the later passes running from L1 those were what limited the stream.
    if (pass.prefetch && k == next_prefetch) {
      const char* ahead = reinterpret_cast<const char*>(w + kPrefetchRows * kBlock);
      for (int64_t line = 0; line < static_cast<int64_t>(kBlock * sizeof(T)); line += 64)
        _mm_prefetch(ahead + line, _MM_HINT_T1);
      next_prefetch += pass.every;
    }
    __m512 wv[kVectors];
    for (int v = 0; v < kVectors; ++v) wv[v] = load16(w + v * 16);
    for (int m = 0; m < ROWS; ++m) {
      __m512 xv = _mm512_set1_ps(x[m * x_stride + k]);
      for (int v = 0; v < kVectors; ++v) acc[m][v] = _mm512_fmadd_ps(xv, wv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    if (pass.to) {
      for (int v = 0; v < kVectors; ++v) _mm512_store_ps(pass.to + m * kBlock + v * 16, acc[m][v]);
    } else if (pass.out_cols == kBlock) {
      for (int v = 0; v < kVectors; ++v) store16(pass.out + m * pass.out_stride + v * 16, acc[m][v]);
    } else {  // the last block of a matrix whose rows were padded to a whole block
      alignas(64) T tmp[kBlock];
      for (int v = 0; v < kVectors; ++v) store16(tmp + v * 16, acc[m][v]);
      std::memcpy(pass.out + m * pass.out_stride, tmp, pass.out_cols * sizeof(T));
    }
  }
}

template <typename T>
AVX512 void rows_pass(int64_t rows, const float* x, int64_t x_stride, const T* block, int64_t k_begin,
                      int64_t k_end, const BlockPass<T>& pass) {
  switch (rows) {
    case 1: block_rows<1>(x, x_stride, block, k_begin, k_end, pass); break;
    case 2: block_rows<2>(x, x_stride, block, k_begin, k_end, pass); break;
    case 3: block_rows<3>(x, x_stride, block, k_begin, k_end, pass); break;
    case 4: block_rows<4>(x, x_stride, block, k_begin, k_end, pass); break;
    case 5: block_rows<5>(x, x_stride, block, k_begin, k_end, pass); break;
    default: block_rows<6>(x, x_stride, block, k_begin, k_end, pass); break;
  }
}

// The AVX2 body of block_rows for rows [0, ROWS) and the COLS columns from ``column`` of the block.
template <int ROWS, int COLS, typename W, typename T>
AVX2 void block_rows_avx2(const float* x, int64_t x_stride, const W* block, int64_t k_begin, int64_t k_end,
                          const BlockPass<T>& pass, int64_t column) {
  constexpr int kLanes = 8, kColumnVectors = COLS / kLanes;
  __m256 acc[ROWS][kColumnVectors];
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < kColumnVectors; ++v) {
      const int64_t c = column + v * kLanes;
      acc[m][v] = pass.from ? _mm256_load_ps(pass.from + m * kBlock + c)
                  : pass.bias ? clex_cpu::load8(pass.bias + c)
                              : _mm256_setzero_ps();
    }
  for (int64_t k = k_begin; k < k_end; ++k) {
    const W* w = block + k * kBlock + column;
    if (pass.prefetch && column == 0) {  // into L2, as the AVX-512 body (its comment says why)
      const char* ahead = reinterpret_cast<const char*>(block + (k + kPrefetchRows) * kBlock);
      for (int64_t line = 0; line < static_cast<int64_t>(kBlock * sizeof(W)); line += 64)
        _mm_prefetch(ahead + line, _MM_HINT_T1);
    }
    for (int m = 0; m < ROWS; ++m) {
      __m256 xv = _mm256_set1_ps(x[m * x_stride + k]);
      for (int v = 0; v < kColumnVectors; ++v)
        acc[m][v] = _mm256_fmadd_ps(xv, clex_cpu::load8(w + v * kLanes), acc[m][v]);
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    for (int v = 0; v < kColumnVectors; ++v) {
      const int64_t c = column + v * kLanes;
      if (pass.to) {
        _mm256_store_ps(pass.to + m * kBlock + c, acc[m][v]);
      } else if (c + kLanes <= pass.out_cols) {
        clex_cpu::store8(pass.out + m * pass.out_stride + c, acc[m][v]);
      } else if (c < pass.out_cols) {  // the last block of a matrix whose rows were padded to a whole block
        clex_cpu::store_first(pass.out + m * pass.out_stride + c, clex_cpu::round8<T>(acc[m][v]),
                              pass.out_cols - c);
      }
    }
  }
}

// Even and odd elements of 16 bfloat16s at p, as float32: a pair's even element is its low half shifted
// up, its odd element its high half masked, one ALU operation each (decode_attention's PAIRS order).
AVX2 inline void load_pairs(const c10::BFloat16* p, __m256& even, __m256& odd) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// One row over a whole bfloat16 block (a decode step of one stream), the weights widened in pairs: each 16
// columns' sums held as their even and odd columns, and put back in order once, at the end. Widened 8 at a
// time (a zero-extending load and a shift), a k took a third more instructions, and fewer of its loads
// were in flight (Zen 3, the benchmark model's 33 matrices against a read of the same bytes, alternating
// processes, medians of nine: 0.73-0.84 -> 0.81-0.85). Every output sums the same products in the same
// order, so the bits are block_rows_avx2's.
template <typename T>
AVX2 void block_row_bf16_pairs_avx2(const float* x, const c10::BFloat16* block, int64_t k_begin, int64_t k_end,
                                    const BlockPass<T>& pass) {
  constexpr int kGroups = kBlock / 16;
  __m256 even[kGroups], odd[kGroups];
  for (int c = 0; c < kGroups; ++c) {
    if (pass.bias) {
      load_pairs(pass.bias + c * 16, even[c], odd[c]);
    } else {
      even[c] = _mm256_setzero_ps();
      odd[c] = _mm256_setzero_ps();
    }
  }
  for (int64_t k = k_begin; k < k_end; ++k) {
    const c10::BFloat16* w = block + k * kBlock;
    if (pass.prefetch) {
      const char* ahead = reinterpret_cast<const char*>(block + (k + kPrefetchRows) * kBlock);
      _mm_prefetch(ahead, _MM_HINT_T1);
      _mm_prefetch(ahead + 64, _MM_HINT_T1);
    }
    const __m256 xv = _mm256_set1_ps(x[k]);
    for (int c = 0; c < kGroups; ++c) {
      __m256 e, o;
      load_pairs(w + c * 16, e, o);
      even[c] = _mm256_fmadd_ps(xv, e, even[c]);
      odd[c] = _mm256_fmadd_ps(xv, o, odd[c]);
    }
  }
  for (int c = 0; c < kGroups; ++c) {
    // Per 128-bit lane, unpacking interleaves evens and odds: columns 0-3 and 8-11 of the 16, then 4-7 and
    // 12-15; the lanes' halves put together give the columns in order.
    const __m256 low = _mm256_unpacklo_ps(even[c], odd[c]), high = _mm256_unpackhi_ps(even[c], odd[c]);
    const __m256 halves[2] = {_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31)};
    for (int h = 0; h < 2; ++h) {
      const int64_t column = c * 16 + h * 8;
      if (column + 8 <= pass.out_cols) {
        clex_cpu::store8(pass.out + column, halves[h]);
      } else if (column < pass.out_cols) {  // the last block of a matrix padded to whole blocks
        clex_cpu::store_first(pass.out + column, clex_cpu::round8<T>(halves[h]), pass.out_cols - column);
      }
    }
  }
}

// rows_pass's AVX2 body: one row over the whole block, or up to three rows per half of it. W, the weights'
// type, is T's, or float32 for a bfloat16 slice widened once (widen_slice).
template <typename W, typename T>
AVX2 void rows_pass_avx2(int64_t rows, const float* x, int64_t x_stride, const W* block, int64_t k_begin,
                         int64_t k_end, const BlockPass<T>& pass) {
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    if (rows == 1 && !pass.from && !pass.to) return block_row_bf16_pairs_avx2(x, block, k_begin, k_end, pass);
  }
  if (rows == 1) return block_rows_avx2<1, kBlock>(x, x_stride, block, k_begin, k_end, pass, 0);
  for (int64_t m = 0; m < rows; m += 3) {
    BlockPass<T> part = pass;
    part.from = pass.from ? pass.from + m * kBlock : nullptr;
    part.to = pass.to ? pass.to + m * kBlock : nullptr;
    part.out = pass.out + m * pass.out_stride;
    part.prefetch = pass.prefetch && m == 0;
    const float* xm = x + m * x_stride;
    for (int64_t column = 0; column < kBlock; column += kBlock / 2) {
      if (rows - m >= 3) block_rows_avx2<3, kBlock / 2>(xm, x_stride, block, k_begin, k_end, part, column);
      else if (rows - m == 2) block_rows_avx2<2, kBlock / 2>(xm, x_stride, block, k_begin, k_end, part, column);
      else block_rows_avx2<1, kBlock / 2>(xm, x_stride, block, k_begin, k_end, part, column);
    }
  }
}

// Rows [k_begin, k_end) of a bfloat16 block widened to float32 into ``out`` (at most kSliceRows rows: 16 KB,
// in L1), the stream's rows kPrefetchRows ahead asked for into L2 on the way. A pass of several rows over
// bfloat16 weights widened every 8 weights for each group of rows and half: with 16 streams the widening,
// not the multiply-adds, bounded it; once per slice, the passes multiply float32 from L1.
AVX2 void widen_slice(const c10::BFloat16* block, int64_t k_begin, int64_t k_end, float* out) {
  for (int64_t k = k_begin; k < k_end; ++k) {
    const char* ahead = reinterpret_cast<const char*>(block + (k + kPrefetchRows) * kBlock);
    _mm_prefetch(ahead, _MM_HINT_T1);
    _mm_prefetch(ahead + 64, _MM_HINT_T1);
    for (int v = 0; v < kVectors * 2; ++v)
      _mm256_store_ps(out + (k - k_begin) * kBlock + v * 8, clex_cpu::load8(block + k * kBlock + v * 8));
  }
}

template <typename T>
void blocked_linear_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, at::Tensor& y,
                         int64_t N) {
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0);
  // x in float32 once, so that the inner loop broadcasts it straight from memory.
  const at::Tensor x_float = x.to(at::kFloat);
  const float* xp = x_float.data_ptr<float>();
  const T* wp = w.data_ptr<T>();
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  // A task per block, and where there are fewer blocks than threads (a 512-wide projection has 8) the rows
  // split too, in whole groups, so that every thread works; each share of a block reads it again (from
  // cache when the shares run together). The split does not change what any output sums, or in what order.
  const int64_t row_groups = (M + kMaxRows - 1) / kMaxRows;
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::max<int64_t>(1, std::min(row_groups, (threads + blocks - 1) / blocks));
  const int64_t rows_per_split = (row_groups + splits - 1) / splits * kMaxRows;
  const bool avx512 = clex_cpu::avx512_active();
  // The AVX2 body walks a block once per three rows and half: sliced from two rows on, so that it is in L1,
  // and bfloat16 slices widened once from 4 rows to the most it takes without oneDNN (kMaxWidenedRows).
  constexpr bool kBfloat16 = std::is_same_v<T, c10::BFloat16>;
  const bool sliced = avx512 ? M > kMaxRows && M <= kMaxSlicedRows
                             : M > 1 && M <= (kBfloat16 ? kMaxWidenedRows : kMaxSlicedRows);
  const bool widened = kBfloat16 && !avx512 && sliced && M >= kMinWidenedRows;
  const int64_t slice = sliced ? kSliceRows : K;
  // Tasks balanced between the threads (balanced_tasks.h). The 33 matrices of the benchmark model at 16
  // float32 rows, against even shares, alternating in one process, medians of six rounds: 11.07 -> 9.72
  // ms and, another time, 9.63 -> 9.42; 4 rows 6.89 -> 6.44, 8 rows 7.11 -> 7.00, 1 and 32 rows unchanged.
  clex_cpu::parallel_tasks(blocks * splits, [&](const auto& for_each) {
    alignas(64) float partial[kMaxWidenedRows * kBlock];
    alignas(64) float widened_slice[kSliceRows * kBlock];
    for_each([&](int64_t task) {
      const int64_t b = task / splits, begin = task % splits * rows_per_split;
      const int64_t end = std::min(M, begin + rows_per_split);
      const int64_t groups = (end - begin + kMaxRows - 1) / kMaxRows;
      const T* block = wp + b * K * kBlock;
      for (int64_t k = 0; k < K; k += slice) {
        const int64_t k_end = std::min(K, k + slice);
        if constexpr (kBfloat16) {
          if (widened) widen_slice(block, k, k_end, widened_slice);
        }
        for (int64_t m = begin; m < end; m += kMaxRows) {
          float* sums = partial + (m - begin) * kBlock;
          const bool shared = avx512 && sliced;  // every group asks for its share of the stream ahead
          // An AVX-512 pass over a whole block (up to six rows) asks for nothing ahead: with the weights in
          // 2 MB pages (huge_pages.py) the hardware prefetchers stream it faster than these prefetches
          // did (the 33 matrices of the benchmark model in float32, alternating in one process, medians
          // of six to eight rounds: 1 row 4.67 -> 3.95 ms, 4 rows 6.65 -> 5.89, 6 rows 7.66 -> 6.77).
          // Sliced passes still need them (16 rows without: 9.08 -> 11.44 ms). AVX2's single row does not
          // (Zen 3, the same 33 matrices against a read of their bytes, alternating processes, medians of
          // nine: float32 0.82-0.90 of the read with prefetches, 0.95 without; bfloat16 the same or better).
          const bool prefetch = shared || (!avx512 && m == begin && M > 1);
          const BlockPass<T> pass{bp ? bp + b * kBlock : nullptr, k > 0 ? sums : nullptr,
                                  k_end < K ? sums : nullptr, yp + m * N + b * kBlock, N,
                                  std::min(kBlock, N - b * kBlock), prefetch,
                                  shared ? (m - begin) / kMaxRows : 0, shared ? groups : 1};
          const int64_t rows = std::min<int64_t>(kMaxRows, end - m);
          if (avx512) {
            rows_pass(rows, xp + m * K, K, block, k, k_end, pass);
          } else if (widened) {  // the slice's k from 0, so x from its column k
            BlockPass<T> from_slice = pass;
            from_slice.prefetch = false;  // widen_slice asked for the stream ahead
            rows_pass_avx2(rows, xp + m * K + k, K, static_cast<const float*>(widened_slice), 0, k_end - k,
                           from_slice);
          } else {
            rows_pass_avx2(rows, xp + m * K, K, block, k, k_end, pass);
          }
        }
      }
    });
  });
}

}  // namespace

namespace clex_cpu {

// x [M, K] (contiguous), w [N_blocks, K, 64], bias [N_blocks * 64] or none -> y [M, N].
at::Tensor blocked_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                          int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous(), "blocked_linear: x [M, K] contiguous");
  TORCH_CHECK((w.dim() == 3 && w.size(2) == kBlock) || (w.dim() == 4 && w.size(2) == kBlock && w.size(3) == 2),
              "blocked_linear: w [N/64, K, 64] or, bfloat16 in pairs, [N/64, ceil(K/2), 64, 2]");
  TORCH_CHECK(w.dim() == 4 || w.size(1) == x.size(1), "blocked_linear: w [N/64, K, 64] with x's K");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "blocked_linear: x and w of one dtype");
  TORCH_CHECK(N > (w.size(0) - 1) * kBlock && N <= w.size(0) * kBlock, "blocked_linear: N does not match w");
  const at::Tensor* b = nullptr;
  at::Tensor bias_contiguous;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == w.size(0) * kBlock,
                "blocked_linear: bias padded to whole blocks, dtype of x");
    bias_contiguous = bias->contiguous();
    b = &bias_contiguous;
  }
  if (w.dim() == 4) return bf16_pair_linear(x, w, b, N);  // bf16_pair_linear.cpp
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    blocked_linear_impl<float>(x, w, b, y, N);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "blocked_linear: float32 or bfloat16");
    blocked_linear_impl<c10::BFloat16>(x, w, b, y, N);
  }
  return y;
}

}  // namespace clex_cpu
