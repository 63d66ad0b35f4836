// Decode attention on the CPU for every sequence of a step in one call, reading each cached K/V row once
// where it lies in the pool.
//
// A sequence's context is a few runs of consecutive slots (the block manager keeps sequences contiguous),
// given as [start, end) slot ranges. For one sequence and one KV head, the query heads that share the KV
// head are attended together: a tile of keys is scored against each of them, and an online softmax
// (running max and sum, rescaled per tile) accumulates the values, so K and V are read once, in place, in
// float32 or bfloat16 (widened in registers), and the cost is the context actually cached. One PyTorch
// call per layer replaces one fused-attention call per sequence (and its views), which is what a step of
// many short streams spends most of its attention time on.
//
// Rows of one sequence at consecutive positions (the drafts of a speculative verify step, each a decode of
// its own) can be given as one group: each row's runs are then a prefix of the group's last row's runs, and
// the group's queries are attended together, every query up to its own length, so K and V are read once
// for the group instead of once per row. Each query's arithmetic is the one it has alone (the same tiles,
// its keys past its length neither scored nor accumulated), so a grouped row equals the row by itself bit
// for bit.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include "avx2_math.h"
#include "avx512_math.h"
#include "clex_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kTile = 64;     // keys scored before their values are accumulated (whole 16s)
constexpr int64_t kMaxGroup = 16;  // query heads per KV head handled together
constexpr int64_t kMaxDim = 256;
constexpr int64_t kShortTask = 4 * kTile;  // a task of at most these keys prefetches the next one's first rows
constexpr int64_t kNextTaskRows = 2 * kTile;  // the rows of the next task it asks for

AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Vector v of a cached row, in float32. Plain: elements 16v .. 16v+15. PAIRS (bfloat16 rows of whole 32s): one
// 64-byte load holds 32 elements as 16 pairs, and a pair's even element is its low half shifted up, its odd
// element its high half masked, so vector 2c holds the even elements of the c-th 32 and vector 2c+1 the odd
// ones: one ALU operation per vector instead of a widening shuffle and a shift (the shuffle port, shared with
// half of the multiply-adds, bounded bfloat16 attention below memory speed). Queries and outputs are held
// in the same order (``pair_position``).
template <bool PAIRS, typename T>
AVX512 inline __m512 row_vector(const T* row, int64_t v, __mmask16 mask) {
  if constexpr (PAIRS) {
    __m512i raw = _mm512_loadu_si512(row + (v / 2) * 32);
    return _mm512_castsi512_ps(v % 2 == 0 ? _mm512_slli_epi32(raw, 16)
                                          : _mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  } else {
    return load16(row + v * 16, mask);
  }
}

// Index of element d of a row in the PAIRS order: within its 32, evens first, then odds.
inline int64_t pair_position(int64_t d) { return d / 32 * 32 + (d % 2) * 16 + (d % 32) / 2; }

// The cache lines of a K or V row, into L2 a tile ahead: the hardware prefetcher alone keeps too few reads
// in flight for one core to stream a head's keys at memory speed, and so did prefetches into L1 (Zen 4, one
// sequence of 7,000 keys, 8 layers' caches from memory, alternating in one process: bfloat16 12-14 GB/s
// into L1 against 14-19 into L2, float32 11-13 against 22-27).
template <typename T>
inline void prefetch_row(const T* row, int64_t dim) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < dim * static_cast<int64_t>(sizeof(T)); offset += 64)
    _mm_prefetch(bytes + offset, _MM_HINT_T1);
}

// The first rows of a task's K and V into L2, asked for while the task before it runs. attend_head
// prefetches a tile ahead of itself, so without this a task's first tile would be read at the memory's
// latency; with many short sequences (a step of 16 streams at 128 keys is two tiles a head) that was half
// their keys, and their attention ran at 15-19 GB/s with the cache in the last-level cache.
template <typename T>
inline void prefetch_first_rows(const T* k_row, const T* v_row, int64_t rows, int64_t slot_stride, int64_t dim) {
  for (int64_t j = 0; j < rows; ++j) {
    prefetch_row(k_row + j * slot_stride, dim);
    prefetch_row(v_row + j * slot_stride, dim);
  }
}

// The keys of a tile of n that each of ``group`` queries sees (valid[g]), ``seen`` keys of the runs lying
// before it; returns the first query that sees any (queries come in increasing length, so those that see
// none of the tile come first).
inline int64_t tile_queries(const int64_t* limits, int64_t group, int64_t seen, int64_t n, int64_t* valid) {
  for (int64_t g = 0; g < group; ++g) valid[g] = std::clamp<int64_t>(limits[g] - seen, 0, n);
  int64_t first = 0;
  while (first < group && valid[first] == 0) ++first;
  return first;
}

// r[j] = sum of the 16 lanes of v[j], for 16 vectors: three rounds of pairwise shuffles and adds instead
// of sixteen horizontal sums.
AVX512 inline __m512 sum_each(const __m512* v) {
  __m512 s[8], u[4];
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: the lane's sums of v[4i .. 4i+3]
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Attention of `group` queries (float32, [group][dim], already multiplied by the softmax scale) over the
// runs of one KV head: out [group][dim] float32. Query g sees the first limits[g] keys of the runs (counted
// along them; at least one). VECTORS bounds dim / 16 at compile time, so that a query's vectors and its
// running sums of values sit in registers: indexed at run time, they lived on the stack, and every key's
// multiply-adds into the sums waited on a store and a reload of the one before (a key cost some 60 cycles,
// the memory stream about as much again).
template <bool PAIRS, int VECTORS, typename T>
AVX512 void attend_head(const float* queries, int64_t group, int64_t dim, const T* k_base, const T* v_base,
                        int64_t slot_stride, const int64_t* runs, int64_t num_runs, const int64_t* limits,
                        float* out) {
  const int64_t vectors = (dim + 15) / 16;
  __mmask16 masks[VECTORS];
  for (int v = 0; v < VECTORS; ++v) {
    int64_t left = std::clamp<int64_t>(dim - v * 16, 0, 16);
    masks[v] = (__mmask16)((1u << left) - 1);
  }
  float running_max[kMaxGroup], running_sum[kMaxGroup];
  alignas(64) float acc[kMaxGroup][VECTORS * 16];  // each query's weighted sum of values so far
  for (int64_t g = 0; g < group; ++g) {
    running_max[g] = -std::numeric_limits<float>::infinity();
    running_sum[g] = 0.f;
    for (int v = 0; v < VECTORS; ++v) _mm512_store_ps(acc[g] + v * 16, _mm512_setzero_ps());
  }
  alignas(64) float scores[kMaxGroup][kTile];
  int64_t seen = 0;  // keys of the runs before this tile
  for (int64_t r = 0; r < num_runs; ++r) {
    const int64_t run_end = runs[2 * r + 1];
    for (int64_t tile = runs[2 * r]; tile < run_end; tile += kTile) {
      const int64_t n = std::min(kTile, run_end - tile);
      int64_t valid[kMaxGroup];  // keys of this tile that query g sees
      const int64_t first = tile_queries(limits, group, seen, n, valid);
      seen += n;
      for (int64_t g = first; g < group; ++g) {
        __m512 q[VECTORS];
        for (int v = 0; v < VECTORS; ++v) q[v] = _mm512_maskz_loadu_ps(masks[v], queries + g * dim + v * 16);
        for (int64_t j0 = 0; j0 < valid[g]; j0 += 16) {
          __m512 dots[16];
          for (int64_t j = 0; j < 16; ++j) {
            if (j0 + j >= valid[g]) { dots[j] = _mm512_setzero_ps(); continue; }
            const T* key = k_base + (tile + j0 + j) * slot_stride;
            // Only rows of the run: past its end lie other sequences' slots, or none (a short run's
            // prefetches were half wasted, and slower than none).
            if (g == first && tile + j0 + j + kTile < run_end) prefetch_row(key + kTile * slot_stride, dim);
            __m512 dot = _mm512_mul_ps(q[0], row_vector<PAIRS>(key, 0, masks[0]));
            for (int v = 1; v < VECTORS; ++v)
              if (v < vectors) dot = _mm512_fmadd_ps(q[v], row_vector<PAIRS>(key, v, masks[v]), dot);
            dots[j] = dot;
          }
          _mm512_store_ps(scores[g] + j0, sum_each(dots));
        }
      }
      for (int64_t g = first; g < group; ++g) {
        const int64_t n = valid[g];
        if (n == 0) continue;  // exp(-inf - -inf) would make the sums NaN
        __m512 tile_max = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
          __mmask16 valid = (__mmask16)(n - j0 >= 16 ? 0xFFFF : (1u << (n - j0)) - 1);
          tile_max = _mm512_mask_max_ps(tile_max, valid, tile_max, _mm512_load_ps(scores[g] + j0));
        }
        float new_max = std::max(running_max[g], _mm512_reduce_max_ps(tile_max));
        float correction = std::exp(running_max[g] - new_max);  // 0 on the first tile (exp(-inf))
        running_sum[g] *= correction;
        __m512 max_vector = _mm512_set1_ps(new_max), sum = _mm512_setzero_ps();
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
          __mmask16 valid = (__mmask16)(n - j0 >= 16 ? 0xFFFF : (1u << (n - j0)) - 1);
          __m512 p = clex_cpu::exp16(_mm512_sub_ps(_mm512_load_ps(scores[g] + j0), max_vector));
          p = _mm512_maskz_mov_ps(valid, p);
          _mm512_store_ps(scores[g] + j0, p);
          sum = _mm512_add_ps(sum, p);
        }
        running_sum[g] += _mm512_reduce_add_ps(sum);
        running_max[g] = new_max;
        // The values, query by query: the tile's rows come from L1 after the first query's pass.
        __m512 c = _mm512_set1_ps(correction), a[VECTORS];
        for (int v = 0; v < VECTORS; ++v) a[v] = _mm512_mul_ps(_mm512_load_ps(acc[g] + v * 16), c);
        for (int64_t j = 0; j < n; ++j) {
          const T* value = v_base + (tile + j) * slot_stride;
          if (g == first && tile + j + kTile < run_end) prefetch_row(value + kTile * slot_stride, dim);
          __m512 p = _mm512_set1_ps(scores[g][j]);
          for (int v = 0; v < VECTORS; ++v)
            if (v < vectors) a[v] = _mm512_fmadd_ps(p, row_vector<PAIRS>(value, v, masks[v]), a[v]);
        }
        for (int v = 0; v < VECTORS; ++v) _mm512_store_ps(acc[g] + v * 16, a[v]);
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    __m512 inverse = _mm512_set1_ps(running_sum[g] > 0.f ? 1.f / running_sum[g] : 0.f);
    for (int v = 0; v < VECTORS; ++v)
      if (v < vectors)
        _mm512_mask_storeu_ps(out + g * dim + v * 16, masks[v],
                              _mm512_mul_ps(_mm512_load_ps(acc[g] + v * 16), inverse));
  }
}

// ---- The AVX2 body (CPUs without AVX-512): the same algorithm, tiles and prefetches in 8-lane vectors ----

// Vector v of a cached row in float32, as row_vector: plain, elements 8v .. 8v+7 (the last vector of a head
// size that is not a whole 8 read lane by lane); PAIRS (bfloat16 rows of whole 16s), a 32-byte load of 16
// elements as 8 pairs, vector 2c the even elements of the c-th 16 and 2c+1 the odd ones.
template <bool PAIRS, typename T>
AVX2 inline __m256 row_vector8(const T* row, int64_t v, int64_t dim) {
  if constexpr (PAIRS) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (v / 2) * 16));
    return _mm256_castsi256_ps(v % 2 == 0 ? _mm256_slli_epi32(raw, 16)
                                          : _mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  } else {
    return clex_cpu::load_part(row + v * 8, std::min<int64_t>(8, dim - v * 8));
  }
}

// Index of element d of a row in the AVX2 PAIRS order: within its 16, evens first, then odds.
inline int64_t pair_position8(int64_t d) { return d / 16 * 16 + (d % 2) * 8 + (d % 16) / 2; }

// r[j] = sum of the 8 lanes of v[j], for 8 vectors (sum_each's counterpart).
AVX2 inline __m256 sum_each8(const __m256* v) {
  __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// Lanes [0, n) set (n clamped to [0, 8]), as a float mask.
AVX2 inline __m256 first_lanes(int64_t n) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))), index));
}

// attend_head's AVX2 body. 16 registers do not hold a head's running sums of values past 64 elements, so
// the values are accumulated 64 elements (8 vectors) at a time over the tile, its rows from L1 after the
// first pass; VECTORS bounds dim / 8.
// FULL: the head size is VECTORS whole vectors, known when compiled. Bounded at run time, every vector's
// load and multiply-add was tested against it and the sums of values were kept on the stack, stored and
// reloaded at every key (Zen 3, float32, heads of 64, from the cache: some 40 ns a key and head a thread).
template <bool PAIRS, int VECTORS, bool FULL, typename T>
AVX2 void attend_head_avx2(const float* queries, int64_t group, int64_t head_size, const T* k_base,
                           const T* v_base, int64_t slot_stride, const int64_t* runs, int64_t num_runs,
                           const int64_t* limits, float* out) {
  const int64_t dim = FULL ? VECTORS * 8 : head_size;
  constexpr int kChunk = VECTORS < 8 ? VECTORS : 8;  // value vectors accumulated in registers at once
  const int64_t vectors = (dim + 7) / 8;
  float running_max[kMaxGroup], running_sum[kMaxGroup];
  alignas(32) float acc[kMaxGroup][VECTORS * 8];  // each query's weighted sum of values so far
  for (int64_t g = 0; g < group; ++g) {
    running_max[g] = -std::numeric_limits<float>::infinity();
    running_sum[g] = 0.f;
    for (int v = 0; v < VECTORS; ++v) _mm256_store_ps(acc[g] + v * 8, _mm256_setzero_ps());
  }
  alignas(32) float scores[kMaxGroup][kTile];
  int64_t seen = 0;  // keys of the runs before this tile
  for (int64_t r = 0; r < num_runs; ++r) {
    const int64_t run_end = runs[2 * r + 1];
    for (int64_t tile = runs[2 * r]; tile < run_end; tile += kTile) {
      const int64_t n = std::min(kTile, run_end - tile);
      int64_t valid[kMaxGroup];  // keys of this tile that query g sees
      const int64_t first = tile_queries(limits, group, seen, n, valid);
      seen += n;
      for (int64_t g = first; g < group; ++g) {
        const float* q = queries + g * dim;
        for (int64_t j0 = 0; j0 < valid[g]; j0 += 8) {
          __m256 dots[8];
          for (int64_t j = 0; j < 8; ++j) {
            if (j0 + j >= valid[g]) { dots[j] = _mm256_setzero_ps(); continue; }
            const T* key = k_base + (tile + j0 + j) * slot_stride;
            if (g == first && tile + j0 + j + kTile < run_end) prefetch_row(key + kTile * slot_stride, dim);
            __m256 dot = _mm256_mul_ps(clex_cpu::load_part(q, std::min<int64_t>(8, dim)), row_vector8<PAIRS>(key, 0, dim));
            for (int v = 1; v < VECTORS; ++v)
              if (v < vectors)
                dot = _mm256_fmadd_ps(clex_cpu::load_part(q + v * 8, std::min<int64_t>(8, dim - v * 8)),
                                      row_vector8<PAIRS>(key, v, dim), dot);
            dots[j] = dot;
          }
          _mm256_store_ps(scores[g] + j0, sum_each8(dots));
        }
      }
      for (int64_t g = first; g < group; ++g) {
        const int64_t n = valid[g];
        if (n == 0) continue;  // exp(-inf - -inf) would make the sums NaN
        const __m256 minus_infinity = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
        __m256 tile_max = minus_infinity;
        for (int64_t j0 = 0; j0 < n; j0 += 8)
          tile_max = _mm256_max_ps(tile_max, _mm256_blendv_ps(minus_infinity, _mm256_load_ps(scores[g] + j0),
                                                              first_lanes(n - j0)));
        float new_max = std::max(running_max[g], clex_cpu::max8(tile_max));
        float correction = std::exp(running_max[g] - new_max);  // 0 on the first tile (exp(-inf))
        running_sum[g] *= correction;
        __m256 max_vector = _mm256_set1_ps(new_max), sum = _mm256_setzero_ps();
        for (int64_t j0 = 0; j0 < n; j0 += 8) {
          __m256 p = clex_cpu::exp8(_mm256_sub_ps(_mm256_load_ps(scores[g] + j0), max_vector));
          p = _mm256_and_ps(p, first_lanes(n - j0));
          _mm256_store_ps(scores[g] + j0, p);
          sum = _mm256_add_ps(sum, p);
        }
        running_sum[g] += clex_cpu::sum8(sum);
        running_max[g] = new_max;
        const __m256 c = _mm256_set1_ps(correction);
        for (int chunk = 0; chunk < VECTORS; chunk += kChunk) {
          if (chunk >= vectors) break;
          __m256 a[kChunk];
          for (int v = 0; v < kChunk; ++v) a[v] = _mm256_mul_ps(_mm256_load_ps(acc[g] + (chunk + v) * 8), c);
          for (int64_t j = 0; j < n; ++j) {
            const T* value = v_base + (tile + j) * slot_stride;
            if (g == first && chunk == 0 && tile + j + kTile < run_end) prefetch_row(value + kTile * slot_stride, dim);
            __m256 p = _mm256_set1_ps(scores[g][j]);
            for (int v = 0; v < kChunk; ++v)
              if (chunk + v < vectors) a[v] = _mm256_fmadd_ps(p, row_vector8<PAIRS>(value, chunk + v, dim), a[v]);
          }
          for (int v = 0; v < kChunk; ++v) _mm256_store_ps(acc[g] + (chunk + v) * 8, a[v]);
        }
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    __m256 inverse = _mm256_set1_ps(running_sum[g] > 0.f ? 1.f / running_sum[g] : 0.f);
    for (int v = 0; v < VECTORS; ++v)
      if (v < vectors)
        clex_cpu::store_part(out + g * dim + v * 8, _mm256_mul_ps(_mm256_load_ps(acc[g] + v * 8), inverse),
                             std::min<int64_t>(8, dim - v * 8));
  }
}

// attend_head with rows read in PAIRS order where ``pairs`` (bfloat16 only), plainly otherwise, and its
// vectors bounded by the head size: 64 and 128 (most models) in registers, up to 256 otherwise.
template <int VECTORS, typename T>
void attend_head_sized(bool pairs, const float* queries, int64_t group, int64_t dim, const T* k_base,
                       const T* v_base, int64_t slot_stride, const int64_t* runs, int64_t num_runs,
                       const int64_t* limits, float* out) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (pairs)
      return attend_head<true, VECTORS>(queries, group, dim, k_base, v_base, slot_stride, runs, num_runs, limits,
                                        out);
  }
  attend_head<false, VECTORS>(queries, group, dim, k_base, v_base, slot_stride, runs, num_runs, limits, out);
}

// The same for the AVX2 body, VECTORS bounding dim / 8.
template <int VECTORS, typename T>
void attend_head_sized_avx2(bool pairs, const float* queries, int64_t group, int64_t dim, const T* k_base,
                            const T* v_base, int64_t slot_stride, const int64_t* runs, int64_t num_runs,
                            const int64_t* limits, float* out) {
  const bool full = dim == VECTORS * 8;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (pairs && full)
      return attend_head_avx2<true, VECTORS, true>(queries, group, dim, k_base, v_base, slot_stride, runs,
                                                   num_runs, limits, out);
    if (pairs)
      return attend_head_avx2<true, VECTORS, false>(queries, group, dim, k_base, v_base, slot_stride, runs,
                                                    num_runs, limits, out);
  }
  if (full)
    return attend_head_avx2<false, VECTORS, true>(queries, group, dim, k_base, v_base, slot_stride, runs, num_runs,
                                                  limits, out);
  attend_head_avx2<false, VECTORS, false>(queries, group, dim, k_base, v_base, slot_stride, runs, num_runs, limits,
                                          out);
}

template <typename T>
void attend_head_in_order(bool avx512, bool pairs, const float* queries, int64_t group, int64_t dim,
                          const T* k_base, const T* v_base, int64_t slot_stride, const int64_t* runs,
                          int64_t num_runs, const int64_t* limits, float* out) {
  if (!avx512) {
    if (dim <= 64)
      attend_head_sized_avx2<8>(pairs, queries, group, dim, k_base, v_base, slot_stride, runs, num_runs, limits, out);
    else if (dim <= 128)
      attend_head_sized_avx2<16>(pairs, queries, group, dim, k_base, v_base, slot_stride, runs, num_runs, limits,
                                 out);
    else
      attend_head_sized_avx2<kMaxDim / 8>(pairs, queries, group, dim, k_base, v_base, slot_stride, runs, num_runs,
                                          limits, out);
    return;
  }
  if (dim <= 64)
    attend_head_sized<4>(pairs, queries, group, dim, k_base, v_base, slot_stride, runs, num_runs, limits, out);
  else if (dim <= 128)
    attend_head_sized<8>(pairs, queries, group, dim, k_base, v_base, slot_stride, runs, num_runs, limits, out);
  else
    attend_head_sized<kMaxDim / 16>(pairs, queries, group, dim, k_base, v_base, slot_stride, runs, num_runs,
                                    limits, out);
}

// Rows [first, first + count) of the step attended together (one sequence's consecutive positions).
struct RowSpan {
  int64_t first, count;
};

// The spans of rows attended together: each group of ``row_groups`` (every row alone without it), cut so
// that a span's queries (its rows times the query heads of a KV head) fit the kernel's registers.
std::vector<RowSpan> row_spans(int64_t batch, int64_t group, const std::optional<at::Tensor>& row_groups) {
  const int64_t most = std::max<int64_t>(1, kMaxGroup / group);
  std::vector<RowSpan> spans;
  if (!row_groups.has_value()) {
    for (int64_t b = 0; b < batch; ++b) spans.push_back({b, 1});
    return spans;
  }
  const int64_t* bounds = row_groups->data_ptr<int64_t>();
  for (int64_t g = 0; g + 1 < row_groups->numel(); ++g)
    for (int64_t b = bounds[g]; b < bounds[g + 1]; b += most) spans.push_back({b, std::min(most, bounds[g + 1] - b)});
  return spans;
}

template <typename T>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& runs, const at::Tensor& run_offsets, double scale,
                           const std::optional<at::Tensor>& row_groups, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(1);
  const int64_t group = heads / kv_heads;
  const bool avx512 = clex_cpu::avx512_active();
  // bfloat16 rows in pairs: whole 64-byte loads (AVX-512) or 32-byte ones (AVX2).
  const bool pairs = std::is_same_v<T, c10::BFloat16> && dim % (avx512 ? 32 : 16) == 0;
  auto position = [&](int64_t d) { return !pairs ? d : avx512 ? pair_position(d) : pair_position8(d); };
  const int64_t* run_data = runs.data_ptr<int64_t>();
  const int64_t* offsets = run_offsets.data_ptr<int64_t>();
  const std::vector<RowSpan> spans = row_spans(batch, group, row_groups);
  const int64_t span_count = static_cast<int64_t>(spans.size());
  at::parallel_for(0, span_count * kv_heads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> queries(kMaxGroup * dim), result(kMaxGroup * dim);
    int64_t limits[kMaxGroup];
    auto prefetch_task = [&](int64_t task) {
      const RowSpan span = spans[task / kv_heads];
      const int64_t h = task % kv_heads, longest = span.first + span.count - 1;
      if (offsets[longest + 1] == offsets[longest]) return;
      const int64_t start = run_data[2 * offsets[longest]];
      const int64_t rows = std::min(kNextTaskRows, run_data[2 * offsets[longest] + 1] - start);
      prefetch_first_rows(k_cache.data_ptr<T>() + h * k_cache.stride(1) + start * k_cache.stride(0),
                          v_cache.data_ptr<T>() + h * v_cache.stride(1) + start * v_cache.stride(0), rows,
                          k_cache.stride(0), dim);
    };
    for (int64_t task = first; task < last; ++task) {
      const RowSpan span = spans[task / kv_heads];
      const int64_t h = task % kv_heads;
      for (int64_t r = 0; r < span.count; ++r) {
        const int64_t b = span.first + r;
        int64_t keys = 0;
        for (int64_t run = offsets[b]; run < offsets[b + 1]; ++run) keys += run_data[2 * run + 1] - run_data[2 * run];
        for (int64_t g = 0; g < group; ++g) {
          const int64_t query = r * group + g;
          limits[query] = keys;
          const T* row = q.data_ptr<T>() + b * q.stride(0) + (h * group + g) * q.stride(1);
          for (int64_t d = 0; d < dim; ++d)
            queries[query * dim + position(d)] =
                static_cast<float>(row[d]) * static_cast<float>(scale);
        }
      }
      // The next task's first rows, where this one is short enough to leave them in L2 (a long one
      // streams past the next's latency anyway).
      if (task + 1 < last && limits[span.count * group - 1] <= kShortTask) prefetch_task(task + 1);
      const int64_t longest = span.first + span.count - 1;  // every row's runs are a prefix of its runs
      const T* keys = k_cache.data_ptr<T>() + h * k_cache.stride(1);
      const T* values = v_cache.data_ptr<T>() + h * v_cache.stride(1);
      attend_head_in_order<T>(avx512, pairs, queries.data(), span.count * group, dim, keys, values, k_cache.stride(0),
                              run_data + 2 * offsets[longest], offsets[longest + 1] - offsets[longest], limits,
                              result.data());
      for (int64_t r = 0; r < span.count; ++r) {
        for (int64_t g = 0; g < group; ++g) {
          const int64_t query = r * group + g;
          T* target = out.data_ptr<T>() + (span.first + r) * out.stride(0) + (h * group + g) * out.stride(1);
          for (int64_t d = 0; d < dim; ++d)
            target[d] = static_cast<T>(result[query * dim + position(d)]);
        }
      }
    }
  });
}

}  // namespace

namespace clex_cpu {

// q [B, Hq, D]; k_cache/v_cache [slots, Hkv, D] views of the pool (unit last stride, same strides);
// runs [R, 2] int64 slot ranges; run_offsets [B + 1]: sequence b's runs are rows offsets[b]..offsets[b+1];
// row_groups [G + 1] int64 (optional): rows row_groups[g]..row_groups[g+1] are consecutive positions of one
// sequence, each row's runs a prefix of the next one's.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& runs, const at::Tensor& run_offsets, double scale,
                            const std::optional<at::Tensor>& row_groups) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && k_cache.dim() == 3 && k_cache.stride(2) == 1 &&
              v_cache.strides() == k_cache.strides() && v_cache.sizes() == k_cache.sizes(),
              "decode_attention: q [B, Hq, D], caches [slots, Hkv, D] with unit last strides");
  TORCH_CHECK(k_cache.size(2) == q.size(2) && q.size(2) <= kMaxDim && q.size(1) % k_cache.size(1) == 0 &&
              q.size(1) / k_cache.size(1) <= kMaxGroup, "decode_attention: head shapes not supported");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "decode_attention: one dtype");
  TORCH_CHECK(runs.scalar_type() == at::kLong && runs.is_contiguous() && run_offsets.scalar_type() == at::kLong &&
              run_offsets.is_contiguous() && run_offsets.numel() == q.size(0) + 1,
              "decode_attention: runs [R, 2] and run_offsets [B + 1] int64");
  TORCH_CHECK(!row_groups.has_value() ||
                  (row_groups->scalar_type() == at::kLong && row_groups->is_contiguous() && row_groups->numel() >= 1 &&
                   row_groups->data_ptr<int64_t>()[0] == 0 &&
                   row_groups->data_ptr<int64_t>()[row_groups->numel() - 1] == q.size(0)),
              "decode_attention: row_groups [G + 1] int64 from 0 to B");
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.scalar_type() == at::kFloat)
    decode_attention_impl<float>(q, k_cache, v_cache, runs, run_offsets, scale, row_groups, out);
  else if (q.scalar_type() == at::kBFloat16)
    decode_attention_impl<c10::BFloat16>(q, k_cache, v_cache, runs, run_offsets, scale, row_groups, out);
  else
    TORCH_CHECK(false, "decode_attention: float32 or bfloat16");
  return out;
}

}  // namespace clex_cpu
