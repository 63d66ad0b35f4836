// Prompt attention on the CPU, flash-style: the queries of a prompt chunk over one run of cached keys (its
// cached prefix and its own keys, one run of consecutive slots), causal and aligned to the end of the run, in
// place in the pool.
//
// A task is one KV head and 64 query rows (consecutive positions times the query heads that share the KV
// head). It walks the keys a tile of 64 at a time up to its last row's diagonal, so K and V are read once per
// task, and keeps an online softmax per row, as FlashAttention-2 does. Both products run transposed, so that
// a vector's 16 lanes are 16 query rows:
//   S^T [keys][rows] = K [keys][D] * Q^T [D][rows]    (Q^T scaled, transposed once per task)
//   O^T [D][rows]   += V^T [D][keys] * P^T [keys][rows]
// Each is C += A * B with B's rows 64 floats (4 vectors, in L1) and A read as broadcast scalars in place
// (K and V as the pool holds them in float32; a tile widened once from bfloat16): no horizontal sums, no
// transposed copy of K or V, and the softmax's running maximum, its sums and the rescaling of O are all
// per lane. A row's max over a tile is a vertical max over the tile's 64 rows of S^T.
//
// Numerics: float32 throughout (bfloat16 inputs widen exactly; P stays float32, where PyTorch's bfloat16
// flash kernel rounds it to bfloat16), the output rounded once to the dtype. The sums run in another order
// than PyTorch's kernel, so results agree within float32 rounding, not bit for bit.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include "avx2_math.h"
#include "avx512_math.h"
#include "clex_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kKeys = 64;  // keys per tile: the rows of S^T
constexpr int64_t kRows = 64;  // query rows per task: the lanes of every product's B and C
constexpr int64_t kMaxDim = 256;
constexpr int64_t kMaxGroup = 64;

// Everything a task works on, per thread, on the heap (aligned new: C++17); for head size 64 each array's
// used part is 16 KB, in L1 and L2.
struct Scratch {
  alignas(64) float queries[kMaxDim * kRows];  // Q^T [D][rows], times the softmax scale
  alignas(64) float scores[kKeys * kRows];     // S^T, then P^T [keys][rows]
  alignas(64) float out[kMaxDim * kRows];      // O^T [D][rows], unnormalised
  alignas(64) float keys[kKeys * kMaxDim];     // a bfloat16 tile widened [keys][D]
  alignas(64) float values[kKeys * kMaxDim];
  // The bfloat16 dot-product body's operands, two bfloat16 in each 32-bit word:
  alignas(64) uint32_t query_pairs[kMaxDim / 2 * kRows];  // [D / 2][rows]: (Q[r][2i], Q[r][2i + 1])
  alignas(64) uint32_t weight_pairs[kKeys / 2 * kRows];   // [keys / 2][rows]: P^T rows 2j and 2j + 1
  alignas(64) uint32_t value_pairs[kKeys / 2 * kMaxDim];  // [keys / 2][D]: V rows 2j and 2j + 1
  alignas(64) float running_max[kRows];
  alignas(64) float running_sum[kRows];
  alignas(64) float correction[kRows];  // exp(old max - new max) of the tile
  alignas(64) int32_t limits[kRows];    // keys each row sees, counted from the run's start
};

// ---- The AVX-512 body ----

// C[r][0:64] = C[r][0:64] * scale + sum_k A[r][k] * B[k][0:64] for ROWS rows (or = sum, without SCALED),
// A[r][k] = a[r * a_row + k * a_k]. 6 rows x 4 vectors: 24 accumulators, and per k 4 loads of B and 6
// broadcasts of A for 24 multiply-adds.
template <int ROWS, bool SCALED>
AVX512 inline void product_rows(const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t depth, float* c,
                                const float* scale) {
  __m512 acc[ROWS][4];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < 4; ++v)
      acc[r][v] = SCALED ? _mm512_mul_ps(_mm512_load_ps(c + r * kRows + 16 * v), _mm512_load_ps(scale + 16 * v))
                         : _mm512_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    const float* row = b + k * kRows;
    const __m512 b0 = _mm512_load_ps(row), b1 = _mm512_load_ps(row + 16), b2 = _mm512_load_ps(row + 32),
                 b3 = _mm512_load_ps(row + 48);
    const float* column = a + k * a_k;
    for (int r = 0; r < ROWS; ++r) {
      const __m512 x = _mm512_set1_ps(column[r * a_row]);
      acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(x, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(x, b3, acc[r][3]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < 4; ++v) _mm512_store_ps(c + r * kRows + 16 * v, acc[r][v]);
}

template <bool SCALED>
AVX512 void product(int64_t rows, const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t depth, float* c,
                    const float* scale) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) product_rows<6, SCALED>(a + r * a_row, a_row, a_k, b, depth, c + r * kRows, scale);
  const float* a_rest = a + r * a_row;
  float* c_rest = c + r * kRows;
  switch (rows - r) {
    case 5: return product_rows<5, SCALED>(a_rest, a_row, a_k, b, depth, c_rest, scale);
    case 4: return product_rows<4, SCALED>(a_rest, a_row, a_k, b, depth, c_rest, scale);
    case 3: return product_rows<3, SCALED>(a_rest, a_row, a_k, b, depth, c_rest, scale);
    case 2: return product_rows<2, SCALED>(a_rest, a_row, a_k, b, depth, c_rest, scale);
    case 1: return product_rows<1, SCALED>(a_rest, a_row, a_k, b, depth, c_rest, scale);
    default: return;
  }
}

// The online softmax over one tile of n keys, the first of which is key ``first`` of the run: each row's
// maximum, its correction exp(old - new), its running sum, and S^T turned into P^T in place. ``masked``:
// some row does not see every key of the tile (the diagonal); a key it does not see weighs 0.
AVX512 void softmax_tile(Scratch& s, int64_t first, int64_t n, bool masked, float scale) {
  const __m512 minus_infinity = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t v = 0; v < kRows / 16; ++v) {
    const __m512i limits = _mm512_load_si512(s.limits + 16 * v);
    float* scores = s.scores + 16 * v;
    __m512 tile_max = minus_infinity;
    for (int64_t j = 0; j < n; ++j) {
      const __m512 x = _mm512_load_ps(scores + j * kRows);
      if (masked) {
        const __mmask16 seen = _mm512_cmpgt_epi32_mask(limits, _mm512_set1_epi32(static_cast<int>(first + j)));
        tile_max = _mm512_mask_max_ps(tile_max, seen, tile_max, x);
      } else {
        tile_max = _mm512_max_ps(tile_max, x);
      }
    }
    // Every row sees the run's first key, so its maximum is finite from the first tile on; exp16 clamps
    // the -inf of the running maximum before it to exp(-100), which multiplies sums of 0.
    const __m512 old_max = _mm512_load_ps(s.running_max + 16 * v), factor = _mm512_set1_ps(scale);
    const __m512 new_max = _mm512_max_ps(old_max, _mm512_mul_ps(tile_max, factor));
    const __m512 correction = clex_cpu::exp16(_mm512_sub_ps(old_max, new_max));
    __m512 sum = _mm512_mul_ps(_mm512_load_ps(s.running_sum + 16 * v), correction);
    for (int64_t j = 0; j < n; ++j) {
      __m512 p = clex_cpu::exp16(_mm512_fmsub_ps(_mm512_load_ps(scores + j * kRows), factor, new_max));
      if (masked)
        p = _mm512_maskz_mov_ps(_mm512_cmpgt_epi32_mask(limits, _mm512_set1_epi32(static_cast<int>(first + j))), p);
      _mm512_store_ps(scores + j * kRows, p);
      sum = _mm512_add_ps(sum, p);
    }
    _mm512_store_ps(s.running_max + 16 * v, new_max);
    _mm512_store_ps(s.running_sum + 16 * v, sum);
    _mm512_store_ps(s.correction + 16 * v, correction);
  }
}

// Rows [0, n) of a tile widened to float32 (bfloat16) into ``to`` [n][dim].
template <typename T>
AVX512 void widen_tile(const T* from, int64_t stride, int64_t n, int64_t dim, float* to) {
  for (int64_t j = 0; j < n; ++j) {
    const T* row = from + j * stride;
    float* target = to + j * dim;
    int64_t d = 0;
    for (; d + 16 <= dim; d += 16) _mm512_storeu_ps(target + d, clex_cpu::load16(row + d));
    for (; d < dim; ++d) target[d] = static_cast<float>(row[d]);
  }
}

// ---- The bfloat16 dot-product body (AVX512_BF16, bfloat16 caches) ----
//
// vdpbf16ps multiplies pairs of bfloat16 and adds both products to a float32 lane: twice the work of an FMA
// per instruction, and on Zen 4 it issues as often (460 against 227 GFLOP/s here, two threads). Both
// products then take pairs along their depth: S^T's along D, where a K row's pair (K[j][2i], K[j][2i + 1])
// is one 32-bit word of the row as the pool holds it, broadcast in place, against Q^T in pairs; O^T's along
// the keys, with P rounded to bfloat16 in pairs of keys (as PyTorch's bfloat16 flash kernel rounds P) and
// each tile's V rows interleaved in pairs. Every product of two bfloat16 is exact in float32; the sums are
// float32, a pair's two products added as the instruction defines.

#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// C[r][0:64] (float32) = C[r][0:64] * scale + sum_k A[r][k] . B[k][0:64], A and B pairs of bfloat16 in 32-bit
// words, A[r][k] = a[r * a_row + k * a_k]; or = the sum, without SCALED.
template <int ROWS, bool SCALED>
AVX512_BF16 inline void pair_product_rows(const uint32_t* a, int64_t a_row, int64_t a_k, const uint32_t* b,
                                          int64_t depth, float* c, const float* scale) {
  __m512 acc[ROWS][4];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < 4; ++v)
      acc[r][v] = SCALED ? _mm512_mul_ps(_mm512_load_ps(c + r * kRows + 16 * v), _mm512_load_ps(scale + 16 * v))
                         : _mm512_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    const uint32_t* row = b + k * kRows;
    const __m512bh b0 = (__m512bh)_mm512_load_si512(row), b1 = (__m512bh)_mm512_load_si512(row + 16),
                   b2 = (__m512bh)_mm512_load_si512(row + 32), b3 = (__m512bh)_mm512_load_si512(row + 48);
    const uint32_t* column = a + k * a_k;
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(column[r * a_row]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], x, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], x, b3);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < 4; ++v) _mm512_store_ps(c + r * kRows + 16 * v, acc[r][v]);
}

template <bool SCALED>
AVX512_BF16 void pair_product(int64_t rows, const uint32_t* a, int64_t a_row, int64_t a_k, const uint32_t* b,
                              int64_t depth, float* c, const float* scale) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) pair_product_rows<6, SCALED>(a + r * a_row, a_row, a_k, b, depth, c + r * kRows, scale);
  const uint32_t* a_rest = a + r * a_row;
  float* c_rest = c + r * kRows;
  switch (rows - r) {
    case 5: return pair_product_rows<5, SCALED>(a_rest, a_row, a_k, b, depth, c_rest, scale);
    case 4: return pair_product_rows<4, SCALED>(a_rest, a_row, a_k, b, depth, c_rest, scale);
    case 3: return pair_product_rows<3, SCALED>(a_rest, a_row, a_k, b, depth, c_rest, scale);
    case 2: return pair_product_rows<2, SCALED>(a_rest, a_row, a_k, b, depth, c_rest, scale);
    case 1: return pair_product_rows<1, SCALED>(a_rest, a_row, a_k, b, depth, c_rest, scale);
    default: return;
  }
}

// Two float32 vectors rounded to bfloat16 (to nearest even) and interleaved: lane i holds (low[i], high[i]).
AVX512_BF16 inline __m512i bf16_pairs(__m512 low, __m512 high) {
  const __m512i lows = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(low));
  const __m512i highs = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(high));
  return _mm512_or_si512(lows, _mm512_slli_epi32(highs, 16));
}

// P^T [n][rows] (float32) as bfloat16 pairs of keys [n / 2 rounded up][rows], an odd last key paired with 0.
AVX512_BF16 void pack_weights(const float* weights, int64_t n, uint32_t* pairs) {
  for (int64_t j = 0; j < n; j += 2)
    for (int64_t v = 0; v < kRows / 16; ++v) {
      const __m512 low = _mm512_load_ps(weights + j * kRows + 16 * v);
      const __m512 high = j + 1 < n ? _mm512_load_ps(weights + (j + 1) * kRows + 16 * v) : _mm512_setzero_ps();
      _mm512_store_si512(pairs + (j / 2) * kRows + 16 * v, bf16_pairs(low, high));
    }
}

// A tile's V rows [n][D] (bfloat16, row stride ``stride``) interleaved in pairs of keys [n / 2 rounded up][D].
AVX512_BF16 void pack_values(const c10::BFloat16* values, int64_t stride, int64_t n, int64_t dim, uint32_t* pairs) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(values);
  for (int64_t j = 0; j < n; j += 2) {
    const uint16_t* low = bits + j * stride;
    const uint16_t* high = j + 1 < n ? low + stride : nullptr;
    uint32_t* target = pairs + (j / 2) * dim;
    int64_t d = 0;
    for (; d + 16 <= dim; d += 16) {
      const __m512i lows = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(low + d)));
      const __m512i highs = high ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(high + d)))
                                 : _mm512_setzero_si512();
      _mm512_storeu_si512(target + d, _mm512_or_si512(lows, _mm512_slli_epi32(highs, 16)));
    }
    for (; d < dim; ++d) target[d] = low[d] | (high ? static_cast<uint32_t>(high[d]) << 16 : 0u);
  }
}

// ---- The AVX2 body: the same products in 8-lane vectors, 3 rows x 4 vectors over each half of the rows ----

template <int ROWS, bool SCALED>
AVX2 inline void product_rows_avx2(const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t depth, float* c,
                                   const float* scale) {
  for (int half = 0; half < 2; ++half) {
    const int64_t lane = half * 32;
    __m256 acc[ROWS][4];
    for (int r = 0; r < ROWS; ++r)
      for (int v = 0; v < 4; ++v)
        acc[r][v] = SCALED ? _mm256_mul_ps(_mm256_load_ps(c + r * kRows + lane + 8 * v),
                                           _mm256_load_ps(scale + lane + 8 * v))
                           : _mm256_setzero_ps();
    for (int64_t k = 0; k < depth; ++k) {
      const float* row = b + k * kRows + lane;
      const __m256 b0 = _mm256_load_ps(row), b1 = _mm256_load_ps(row + 8), b2 = _mm256_load_ps(row + 16),
                   b3 = _mm256_load_ps(row + 24);
      const float* column = a + k * a_k;
      for (int r = 0; r < ROWS; ++r) {
        const __m256 x = _mm256_broadcast_ss(column + r * a_row);
        acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
        acc[r][2] = _mm256_fmadd_ps(x, b2, acc[r][2]);
        acc[r][3] = _mm256_fmadd_ps(x, b3, acc[r][3]);
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int v = 0; v < 4; ++v) _mm256_store_ps(c + r * kRows + lane + 8 * v, acc[r][v]);
  }
}

template <bool SCALED>
AVX2 void product_avx2(int64_t rows, const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t depth,
                       float* c, const float* scale) {
  int64_t r = 0;
  for (; r + 3 <= rows; r += 3) product_rows_avx2<3, SCALED>(a + r * a_row, a_row, a_k, b, depth, c + r * kRows, scale);
  if (rows - r == 2) product_rows_avx2<2, SCALED>(a + r * a_row, a_row, a_k, b, depth, c + r * kRows, scale);
  if (rows - r == 1) product_rows_avx2<1, SCALED>(a + r * a_row, a_row, a_k, b, depth, c + r * kRows, scale);
}

// Lanes whose row sees key ``key`` of the run, as a float mask (a lambda would not take the target attribute).
AVX2 inline __m256 sees_key(__m256i limits, int64_t key) {
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(limits, _mm256_set1_epi32(static_cast<int>(key))));
}

AVX2 void softmax_tile_avx2(Scratch& s, int64_t first, int64_t n, bool masked, float scale) {
  const __m256 minus_infinity = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t v = 0; v < kRows / 8; ++v) {
    const __m256i limits = _mm256_load_si256(reinterpret_cast<const __m256i*>(s.limits + 8 * v));
    float* scores = s.scores + 8 * v;
    __m256 tile_max = minus_infinity;
    for (int64_t j = 0; j < n; ++j) {
      const __m256 x = _mm256_load_ps(scores + j * kRows);
      tile_max = _mm256_max_ps(tile_max, masked ? _mm256_blendv_ps(minus_infinity, x, sees_key(limits, first + j)) : x);
    }
    const __m256 old_max = _mm256_load_ps(s.running_max + 8 * v), factor = _mm256_set1_ps(scale);
    const __m256 new_max = _mm256_max_ps(old_max, _mm256_mul_ps(tile_max, factor));
    const __m256 correction = clex_cpu::exp8(_mm256_sub_ps(old_max, new_max));
    __m256 sum = _mm256_mul_ps(_mm256_load_ps(s.running_sum + 8 * v), correction);
    for (int64_t j = 0; j < n; ++j) {
      __m256 p = clex_cpu::exp8(_mm256_fmsub_ps(_mm256_load_ps(scores + j * kRows), factor, new_max));
      if (masked) p = _mm256_and_ps(p, sees_key(limits, first + j));
      _mm256_store_ps(scores + j * kRows, p);
      sum = _mm256_add_ps(sum, p);
    }
    _mm256_store_ps(s.running_max + 8 * v, new_max);
    _mm256_store_ps(s.running_sum + 8 * v, sum);
    _mm256_store_ps(s.correction + 8 * v, correction);
  }
}

template <typename T>
AVX2 void widen_tile_avx2(const T* from, int64_t stride, int64_t n, int64_t dim, float* to) {
  for (int64_t j = 0; j < n; ++j) {
    const T* row = from + j * stride;
    float* target = to + j * dim;
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8) _mm256_storeu_ps(target + d, clex_cpu::load8(row + d));
    for (; d < dim; ++d) target[d] = static_cast<float>(row[d]);
  }
}

// ---- Shared ----

// Which body runs: float32 products in AVX-512 or AVX2 vectors (float32 caches, and bfloat16 ones widened a
// tile at a time), or bfloat16 dot products on bfloat16 caches where the CPU has AVX512_BF16.
enum class Body { avx512, avx2, bf16_pairs };

// The next tile's K and V rows into L2 while this one is multiplied: the products read K and V as broadcasts,
// which the hardware prefetcher does not run far enough ahead of (a head's K and V past a few thousand keys
// are in the last-level cache, not L2).
template <typename T>
void prefetch_tile(const T* k_head, const T* v_head, int64_t first, int64_t n, int64_t slot_stride, int64_t dim) {
  const int64_t bytes = dim * static_cast<int64_t>(sizeof(T));
  for (int64_t j = first; j < first + n; ++j) {
    const char* k_row = reinterpret_cast<const char*>(k_head + j * slot_stride);
    const char* v_row = reinterpret_cast<const char*>(v_head + j * slot_stride);
    for (int64_t offset = 0; offset < bytes; offset += 64) {
      _mm_prefetch(k_row + offset, _MM_HINT_T1);
      _mm_prefetch(v_row + offset, _MM_HINT_T1);
    }
  }
}

// A task: KV head ``head``, query positions [first, first + positions) of the chunk.
struct Task {
  int64_t head, first, positions;
};

template <typename T>
struct Problem {
  const T* q;
  int64_t q_position, q_head;  // strides
  const T* k;
  const T* v;
  int64_t slot_stride, head_stride;  // of the caches, from the run's first slot
  T* out;
  int64_t out_position, out_head;
  int64_t dim, group, offset;  // offset: keys of the run before the chunk's first query
  float scale;
};

// Rows [0, rows) of Q^T for a task: scaled float32 (``queries``) or bfloat16 pairs along D (``query_pairs``);
// rows past the task's (when 64 is not a whole number of positions) are zeros.
template <typename T>
void load_queries(const Problem<T>& p, const Task& task, Body body, Scratch& s) {
  const int64_t dim = p.dim;
  if (body == Body::bf16_pairs) std::fill(s.query_pairs, s.query_pairs + dim / 2 * kRows, 0u);
  else std::fill(s.queries, s.queries + dim * kRows, 0.f);
  for (int64_t i = 0; i < task.positions; ++i)
    for (int64_t g = 0; g < p.group; ++g) {
      const T* row = p.q + (task.first + i) * p.q_position + (task.head * p.group + g) * p.q_head;
      const int64_t r = i * p.group + g;
      if (body == Body::bf16_pairs) {
        for (int64_t k = 0; k < dim / 2; ++k) std::memcpy(s.query_pairs + k * kRows + r, row + 2 * k, 4);
      } else {
        for (int64_t d = 0; d < dim; ++d) s.queries[d * kRows + r] = static_cast<float>(row[d]) * p.scale;
      }
    }
}

// One tile of n keys from key ``first`` of the run: S^T, the online softmax, and O^T += V^T P^T.
template <typename T>
void attend_tile(const Problem<T>& p, Body body, const T* k_tile, const T* v_tile, int64_t first, int64_t n,
                 bool masked, Scratch& s) {
  const int64_t dim = p.dim, stride = p.slot_stride;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (body == Body::bf16_pairs) {
      // K's pairs along D in place: a row is stride / 2 words apart.
      pair_product<false>(n, reinterpret_cast<const uint32_t*>(k_tile), stride / 2, 1, s.query_pairs, dim / 2,
                          s.scores, nullptr);
      softmax_tile(s, first, n, masked, p.scale);
      pack_weights(s.scores, n, s.weight_pairs);
      pack_values(v_tile, stride, n, dim, s.value_pairs);
      // O^T[d][r] = O^T[d][r] * correction[r] + sum over pairs of keys of V pairs [.][d] . P pairs [.][r].
      pair_product<true>(dim, s.value_pairs, 1, dim, s.weight_pairs, (n + 1) / 2, s.out, s.correction);
      return;
    }
  }
  const bool avx512 = body == Body::avx512;
  const float* keys;
  const float* values;
  int64_t row_stride;
  if constexpr (std::is_same_v<T, float>) {
    keys = k_tile, values = v_tile, row_stride = stride;
  } else {
    auto widen = avx512 ? widen_tile<T> : widen_tile_avx2<T>;
    widen(k_tile, stride, n, dim, s.keys);
    widen(v_tile, stride, n, dim, s.values);
    keys = s.keys, values = s.values, row_stride = dim;
  }
  // The queries are scaled already: the softmax's factor is 1.
  if (avx512) {
    product<false>(n, keys, row_stride, 1, s.queries, dim, s.scores, nullptr);
    softmax_tile(s, first, n, masked, 1.f);
    // O^T[d][r] = O^T[d][r] * correction[r] + sum_j V[j][d] * P^T[j][r]: A = V^T, read along V's columns.
    product<true>(dim, values, 1, row_stride, s.scores, n, s.out, s.correction);
  } else {
    product_avx2<false>(n, keys, row_stride, 1, s.queries, dim, s.scores, nullptr);
    softmax_tile_avx2(s, first, n, masked, 1.f);
    product_avx2<true>(dim, values, 1, row_stride, s.scores, n, s.out, s.correction);
  }
}

template <typename T>
void attend_task(const Problem<T>& p, const Task& task, Body body, Scratch& s) {
  const int64_t dim = p.dim, rows = task.positions * p.group;
  load_queries(p, task, body, s);
  for (int64_t r = 0; r < kRows; ++r) {
    // Row r's query is at key position offset + first + r / group of the run, and sees the keys up to it.
    const int64_t position = r < rows ? r / p.group : 0;
    s.limits[r] = static_cast<int32_t>(p.offset + task.first + position + 1);
    s.running_max[r] = -std::numeric_limits<float>::infinity();
    s.running_sum[r] = 0.f;
  }
  std::fill(s.out, s.out + dim * kRows, 0.f);
  const int64_t seen_by_all = p.offset + task.first + 1, seen_by_last = p.offset + task.first + task.positions;
  const T* k_head = p.k + task.head * p.head_stride;
  const T* v_head = p.v + task.head * p.head_stride;
  for (int64_t first = 0; first < seen_by_last; first += kKeys) {
    const int64_t n = std::min(kKeys, seen_by_last - first);
    if (first + kKeys < seen_by_last)
      prefetch_tile(k_head, v_head, first + kKeys, std::min(kKeys, seen_by_last - first - kKeys), p.slot_stride, dim);
    attend_tile(p, body, k_head + first * p.slot_stride, v_head + first * p.slot_stride, first, n,
                first + n > seen_by_all, s);
  }
  for (int64_t i = 0; i < task.positions; ++i)
    for (int64_t g = 0; g < p.group; ++g) {
      const int64_t r = i * p.group + g;
      const float inverse = 1.f / s.running_sum[r];
      T* row = p.out + (task.first + i) * p.out_position + (task.head * p.group + g) * p.out_head;
      for (int64_t d = 0; d < dim; ++d) row[d] = static_cast<T>(s.out[d * kRows + r] * inverse);
    }
}

template <typename T>
void prefill_attention_impl(const Problem<T>& p, int64_t queries, int64_t kv_heads) {
  Body body = clex_cpu::avx512_active() ? Body::avx512 : Body::avx2;
  // K's pairs are read in place as 32-bit words: an even head size, even strides, a 4-byte aligned run.
  const bool whole_words = p.dim % 2 == 0 && p.slot_stride % 2 == 0 && p.head_stride % 2 == 0 &&
                           reinterpret_cast<uintptr_t>(p.k) % 4 == 0 && reinterpret_cast<uintptr_t>(p.v) % 4 == 0;
  if (std::is_same_v<T, c10::BFloat16> && clex_cpu::bf16_dot_supported() && whole_words) body = Body::bf16_pairs;
  const int64_t positions = std::max<int64_t>(1, kRows / p.group);
  const int64_t blocks = (queries + positions - 1) / positions;
  // Later blocks see more keys: handed out last block first, each thread taking the next task as it
  // finishes one, so that the threads finish together (a static split of a causal prompt gives one
  // thread three times the other's work).
  std::vector<Task> tasks;
  tasks.reserve(blocks * kv_heads);
  for (int64_t b = blocks - 1; b >= 0; --b)
    for (int64_t h = 0; h < kv_heads; ++h)
      tasks.push_back({h, b * positions, std::min(positions, queries - b * positions)});
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), count), 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<Scratch> scratch(new Scratch);  // not value-initialised: every array is written before read
    for (int64_t worker = begin; worker < end; ++worker)
      for (int64_t t = next.fetch_add(1); t < count; t = next.fetch_add(1))
        attend_task(p, tasks[t], body, *scratch);
  });
}

}  // namespace

namespace clex_cpu {

// q [L, Hq, D] (rotated and scaled as the model's attention takes them); k_cache/v_cache [slots, Hkv, D] views
// of the pool (unit last stride); the chunk's keys are slots [start, start + context), its L queries the last
// L of them: query i sees the keys up to context - L + i. -> [L, Hq, D].
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t start,
                             int64_t context, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && k_cache.dim() == 3 && k_cache.stride(2) == 1 &&
                  v_cache.strides() == k_cache.strides() && v_cache.sizes() == k_cache.sizes(),
              "prefill_attention: q [L, Hq, D], caches [slots, Hkv, D] with unit last strides");
  TORCH_CHECK(k_cache.size(2) == q.size(2) && q.size(2) <= kMaxDim && q.size(1) % k_cache.size(1) == 0 &&
                  q.size(1) / k_cache.size(1) <= kMaxGroup,
              "prefill_attention: head shapes not supported");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "prefill_attention: one dtype");
  TORCH_CHECK(start >= 0 && context >= q.size(0) && start + context <= k_cache.size(0),
              "prefill_attention: the run [start, start + context) must hold the chunk's keys");
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.size(0) == 0) return out;
  const int64_t kv_heads = k_cache.size(1), group = q.size(1) / kv_heads;
  auto run = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    Problem<T> p{q.data_ptr<T>(),
                 q.stride(0),
                 q.stride(1),
                 k_cache.data_ptr<T>() + start * k_cache.stride(0),
                 v_cache.data_ptr<T>() + start * v_cache.stride(0),
                 k_cache.stride(0),
                 k_cache.stride(1),
                 out.data_ptr<T>(),
                 out.stride(0),
                 out.stride(1),
                 q.size(2),
                 group,
                 context - q.size(0),
                 static_cast<float>(scale)};
    prefill_attention_impl<T>(p, q.size(0), kv_heads);
  };
  if (q.scalar_type() == at::kFloat)
    run(static_cast<float*>(nullptr));
  else if (q.scalar_type() == at::kBFloat16)
    run(static_cast<c10::BFloat16*>(nullptr));
  else
    TORCH_CHECK(false, "prefill_attention: float32 or bfloat16");
  return out;
}

}  // namespace clex_cpu
