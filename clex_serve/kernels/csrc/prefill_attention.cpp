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
  alignas(64) float running_max[kRows];
  alignas(64) float running_sum[kRows];
  alignas(64) float correction[kRows];  // exp(old max - new max) of the tile
  alignas(64) int32_t limits[kRows];    // keys each row sees, counted from the run's start
};

// A tile of keys or values as the products read it: float32 rows [keys][D] with a row stride.
struct Tile {
  const float* data;
  int64_t stride;
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
AVX512 void softmax_tile(Scratch& s, int64_t first, int64_t n, bool masked) {
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
    const __m512 old_max = _mm512_load_ps(s.running_max + 16 * v);
    const __m512 new_max = _mm512_max_ps(old_max, tile_max);
    const __m512 correction = clex_cpu::exp16(_mm512_sub_ps(old_max, new_max));
    __m512 sum = _mm512_mul_ps(_mm512_load_ps(s.running_sum + 16 * v), correction);
    for (int64_t j = 0; j < n; ++j) {
      __m512 p = clex_cpu::exp16(_mm512_sub_ps(_mm512_load_ps(scores + j * kRows), new_max));
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

AVX2 void softmax_tile_avx2(Scratch& s, int64_t first, int64_t n, bool masked) {
  const __m256 minus_infinity = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t v = 0; v < kRows / 8; ++v) {
    const __m256i limits = _mm256_load_si256(reinterpret_cast<const __m256i*>(s.limits + 8 * v));
    float* scores = s.scores + 8 * v;
    __m256 tile_max = minus_infinity;
    for (int64_t j = 0; j < n; ++j) {
      const __m256 x = _mm256_load_ps(scores + j * kRows);
      tile_max = _mm256_max_ps(tile_max, masked ? _mm256_blendv_ps(minus_infinity, x, sees_key(limits, first + j)) : x);
    }
    const __m256 old_max = _mm256_load_ps(s.running_max + 8 * v);
    const __m256 new_max = _mm256_max_ps(old_max, tile_max);
    const __m256 correction = clex_cpu::exp8(_mm256_sub_ps(old_max, new_max));
    __m256 sum = _mm256_mul_ps(_mm256_load_ps(s.running_sum + 8 * v), correction);
    for (int64_t j = 0; j < n; ++j) {
      __m256 p = clex_cpu::exp8(_mm256_sub_ps(_mm256_load_ps(scores + j * kRows), new_max));
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

// The calls of one ISA's body.
struct Body {
  void (*scores)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, const float*);
  void (*accumulate)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, const float*);
  void (*softmax)(Scratch&, int64_t, int64_t, bool);
};

const Body kAvx512 = {product<false>, product<true>, softmax_tile};
const Body kAvx2 = {product_avx2<false>, product_avx2<true>, softmax_tile_avx2};

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

template <typename T>
void attend_task(const Problem<T>& p, const Task& task, const Body& body, bool avx512, Scratch& s) {
  const int64_t dim = p.dim, rows = task.positions * p.group;
  // Q^T, scaled; rows past the task's (when 64 is not a whole number of positions) score against zeros.
  std::fill(s.queries, s.queries + dim * kRows, 0.f);
  for (int64_t i = 0; i < task.positions; ++i)
    for (int64_t g = 0; g < p.group; ++g) {
      const T* row = p.q + (task.first + i) * p.q_position + (task.head * p.group + g) * p.q_head;
      const int64_t r = i * p.group + g;
      for (int64_t d = 0; d < dim; ++d) s.queries[d * kRows + r] = static_cast<float>(row[d]) * p.scale;
    }
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
    Tile keys{nullptr, 0}, values{nullptr, 0};
    if constexpr (std::is_same_v<T, float>) {
      keys = {k_head + first * p.slot_stride, p.slot_stride};
      values = {v_head + first * p.slot_stride, p.slot_stride};
    } else {
      auto widen = avx512 ? widen_tile<T> : widen_tile_avx2<T>;
      widen(k_head + first * p.slot_stride, p.slot_stride, n, dim, s.keys);
      widen(v_head + first * p.slot_stride, p.slot_stride, n, dim, s.values);
      keys = {s.keys, dim};
      values = {s.values, dim};
    }
    body.scores(n, keys.data, keys.stride, 1, s.queries, dim, s.scores, nullptr);
    body.softmax(s, first, n, first + n > seen_by_all);
    // O^T[d][r] = O^T[d][r] * correction[r] + sum_j V[j][d] * P^T[j][r]: A = V^T, read along V's columns.
    body.accumulate(dim, values.data, 1, values.stride, s.scores, n, s.out, s.correction);
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
  const bool avx512 = clex_cpu::avx512_active();
  const Body& body = avx512 ? kAvx512 : kAvx2;
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
    auto scratch = std::make_unique<Scratch>();
    for (int64_t worker = begin; worker < end; ++worker)
      for (int64_t t = next.fetch_add(1); t < count; t = next.fetch_add(1))
        attend_task(p, tasks[t], body, avx512, *scratch);
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
