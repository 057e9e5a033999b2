// Causal attention of a float32 or bfloat16 prefill pass on an x86 CPU with AVX-512 (bfloat16: AVX512-BF16): one pass over the keys per block of
// queries (online softmax), the scores never leaving the core's cache; each KV head's query heads are stacked
// as rows, so grouped-query attention reads every key once per block. Built and loaded by cpu_kernels.py.
//
// Exactness: a query's result depends only on its position, never on which other queries share its pass or
// its block, nor on how many keys follow it. Key blocks sit at multiples of KEY_BLOCK from position 0; every
// query row goes through the same operations in the same order whatever lane or block it occupies; keys after
// a query enter as exact zeros (max unchanged, scale exactly 1, zero weight times a finite value).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "cpu_vector.h"

namespace {

using kvcake::exp_nonpositive;
using kvcake::LANES;
using kvcake::load_floats;

constexpr int KEY_BLOCK = 96;        // keys per online-softmax step, aligned to absolute key positions
constexpr int ROW_SLAB = 48;         // query rows (a query position times one head) per work item
constexpr int SMALL_SLAB = LANES;    // the rows of a pass that has at most this many (a one-token pass): one vector
constexpr int SCORE_KEYS = 8;        // keys per score micro-tile: V x SCORE_KEYS accumulators

struct Pass {
  const void* q;
  const void* k;
  const void* v;  // float32: the values; bfloat16: the values packed in key pairs (pack_value_pairs)
  void* out;
  int64_t q_head_stride, q_row_stride;
  int64_t k_head_stride, k_row_stride;
  int64_t v_head_stride, v_row_stride;  // bfloat16: per head, per key pair
  int64_t heads, kv_heads, group, num_queries, num_keys, first_position;
  int64_t queries_per_item;
  float scale;
  const int64_t* visible;  // nullptr: query i sees keys up to first_position + i; else the first visible[i] keys
};

// The last key a query sees.
inline int64_t last_visible_key(const Pass& pass, int64_t query) {
  return pass.visible ? pass.visible[query] - 1 : pass.first_position + query;
}

// One slab's working set, V vectors of LANES rows, transposed so that a vector holds rows: scores and weights are
// [key][row]. bfloat16 keeps its query rows and weights as pairs of bf16 in 32 bits, the unit of one VDPBF16PS lane.
// A row's operations are the same whichever V: a slab of one vector (SMALL_SLAB) gives a row the bits of ROW_SLAB's.
template <int D, int V>
struct Slab {
  static constexpr int ROWS_IN = V * LANES;
  alignas(64) float q_t[D][ROWS_IN];
  alignas(64) uint32_t q_pairs[D / 2][ROWS_IN];
  alignas(64) float scores[KEY_BLOCK][ROWS_IN];
  alignas(64) uint32_t weight_pairs[KEY_BLOCK / 2][ROWS_IN];
  alignas(64) float acc[ROWS_IN][D];
  alignas(64) float row_max[ROWS_IN];
  alignas(64) float row_sum[ROWS_IN];
  alignas(64) float row_scale[ROWS_IN];
  int64_t row_position[ROWS_IN];
};

inline __m512bh as_bf16(__m512i bits) { return reinterpret_cast<__m512bh>(bits); }

inline uint32_t bf16_pair(const uint16_t* at) {
  uint32_t pair;
  std::memcpy(&pair, at, sizeof(pair));
  return pair;
}

// scores[first_key + j][rows] = q . k_j for SCORE_KEYS keys from `key` (float32).
template <int D, int V>
inline void score_tile(Slab<D, V>& slab, const float* key, int64_t key_stride, int first_key, int count) {
  __m512 sums[SCORE_KEYS][V];
  for (int j = 0; j < SCORE_KEYS; ++j)
    for (int c = 0; c < V; ++c) sums[j][c] = _mm512_setzero_ps();
  for (int d = 0; d < D; ++d) {
    __m512 rows[V];
    for (int c = 0; c < V; ++c) rows[c] = _mm512_load_ps(&slab.q_t[d][c * LANES]);
    for (int j = 0; j < SCORE_KEYS; ++j) {
      const __m512 kd = _mm512_set1_ps(key[std::min(j, count - 1) * key_stride + d]);
      for (int c = 0; c < V; ++c) sums[j][c] = _mm512_fmadd_ps(rows[c], kd, sums[j][c]);
    }
  }
  for (int j = 0; j < count; ++j)
    for (int c = 0; c < V; ++c) _mm512_store_ps(&slab.scores[first_key + j][c * LANES], sums[j][c]);
}

// The same in bfloat16, two dims per VDPBF16PS lane, summed in float32.
template <int D, int V>
inline void score_tile(Slab<D, V>& slab, const uint16_t* key, int64_t key_stride, int first_key, int count) {
  __m512 sums[SCORE_KEYS][V];
  for (int j = 0; j < SCORE_KEYS; ++j)
    for (int c = 0; c < V; ++c) sums[j][c] = _mm512_setzero_ps();
  for (int d = 0; d < D / 2; ++d) {
    __m512bh rows[V];
    for (int c = 0; c < V; ++c) rows[c] = as_bf16(_mm512_load_si512(&slab.q_pairs[d][c * LANES]));
    for (int j = 0; j < SCORE_KEYS; ++j) {
      const __m512bh kd = as_bf16(_mm512_set1_epi32(static_cast<int>(bf16_pair(key + std::min(j, count - 1) * key_stride + 2 * d))));
      for (int c = 0; c < V; ++c) sums[j][c] = _mm512_dpbf16_ps(sums[j][c], rows[c], kd);
    }
  }
  for (int j = 0; j < count; ++j)
    for (int c = 0; c < V; ++c) _mm512_store_ps(&slab.scores[first_key + j][c * LANES], sums[j][c]);
}

// Keys after each row's position get -inf.
template <int D, int V>
void hide_future(Slab<D, V>& slab, int64_t block_start, int keys) {
  const int64_t last_key = block_start + keys - 1;
  for (int r = 0; r < Slab<D, V>::ROWS_IN; ++r) {
    if (slab.row_position[r] >= last_key) continue;
    for (int j = std::max<int64_t>(0, slab.row_position[r] + 1 - block_start); j < keys; ++j)
      slab.scores[j][r] = -std::numeric_limits<float>::infinity();
  }
}

// Online softmax over one key block: scores (times score_scale where SCALE, else as they are) become weights
// exp(s - max); row_max, row_sum and row_scale (the factor for the sums so far) are updated.
template <int D, int V, bool SCALE>
void softmax_block(Slab<D, V>& slab, int keys, float score_scale) {
  const __m512 scale = _mm512_set1_ps(score_scale);
  for (int c = 0; c < V; ++c) {
    __m512 block_max = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int j = 0; j < keys; ++j) {
      __m512 score = _mm512_load_ps(&slab.scores[j][c * LANES]);
      if constexpr (SCALE) {
        score = _mm512_mul_ps(score, scale);
        _mm512_store_ps(&slab.scores[j][c * LANES], score);
      }
      block_max = _mm512_max_ps(block_max, score);
    }
    const __m512 old_max = _mm512_load_ps(&slab.row_max[c * LANES]);
    const __m512 new_max = _mm512_max_ps(old_max, block_max);
    const __m512 rescale = exp_nonpositive(_mm512_sub_ps(old_max, new_max));
    __m512 block_sum = _mm512_setzero_ps();
    for (int j = 0; j < keys; ++j) {
      const __m512 w = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(&slab.scores[j][c * LANES]), new_max));
      _mm512_store_ps(&slab.scores[j][c * LANES], w);
      block_sum = _mm512_add_ps(block_sum, w);
    }
    _mm512_store_ps(&slab.row_max[c * LANES], new_max);
    _mm512_store_ps(&slab.row_scale[c * LANES], rescale);
    _mm512_store_ps(&slab.row_sum[c * LANES], _mm512_fmadd_ps(_mm512_load_ps(&slab.row_sum[c * LANES]), rescale, block_sum));
  }
}

// weight_pairs[j / 2][row] = the bf16 weights of keys j and j + 1 (zero past the block's keys).
template <int D, int V>
void pair_weights(Slab<D, V>& slab, int keys) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int j = 0; j < keys; j += 2)
    for (int c = 0; c < V; ++c) {
      const __m512 even = _mm512_load_ps(&slab.scores[j][c * LANES]);
      const __m512 odd = j + 1 < keys ? _mm512_load_ps(&slab.scores[j + 1][c * LANES]) : _mm512_setzero_ps();
      const __m512i halves = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even));
      _mm512_store_si512(&slab.weight_pairs[j / 2][c * LANES], _mm512_permutexvar_epi16(interleave, halves));
    }
}

// ROWS rows of the slab's sums into registers, times each row's rescale factor, and back.
template <int D, int V, int ROWS>
inline void load_rescaled(const Slab<D, V>& slab, int row, __m512 (&acc)[ROWS][D / LANES]) {
  for (int r = 0; r < ROWS; ++r) {
    const __m512 s = _mm512_set1_ps(slab.row_scale[row + r]);
    for (int c = 0; c < D / LANES; ++c) acc[r][c] = _mm512_mul_ps(_mm512_load_ps(&slab.acc[row + r][c * LANES]), s);
  }
}

template <int D, int V, int ROWS>
inline void store_rows(Slab<D, V>& slab, int row, const __m512 (&acc)[ROWS][D / LANES]) {
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < D / LANES; ++c) _mm512_store_ps(&slab.acc[row + r][c * LANES], acc[r][c]);
}

// acc[rows] = acc[rows] * row_scale + weights^T . v over the block's keys, ROWS rows at a time in registers.
template <int D, int V, int ROWS>
inline void accumulate_tile(Slab<D, V>& slab, int row, const float* value, int64_t value_stride, int keys) {
  constexpr int DV = D / LANES;
  __m512 acc[ROWS][DV];
  load_rescaled<D, V, ROWS>(slab, row, acc);
  for (int j = 0; j < keys; ++j) {
    __m512 vj[DV];
    for (int c = 0; c < DV; ++c) vj[c] = _mm512_loadu_ps(value + j * value_stride + c * LANES);
    for (int r = 0; r < ROWS; ++r) {
      const __m512 w = _mm512_set1_ps(slab.scores[j][row + r]);
      for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_fmadd_ps(w, vj[c], acc[r][c]);
    }
  }
  store_rows<D, V, ROWS>(slab, row, acc);
}

// The same in bfloat16 over key pairs: value_pairs[p][d] holds the values of keys 2p and 2p + 1 at dim d.
template <int D, int V, int ROWS>
inline void accumulate_tile(Slab<D, V>& slab, int row, const uint32_t* value_pairs, int64_t pair_stride, int keys) {
  constexpr int DV = D / LANES;
  __m512 acc[ROWS][DV];
  load_rescaled<D, V, ROWS>(slab, row, acc);
  for (int p = 0; p < (keys + 1) / 2; ++p) {
    __m512bh vp[DV];
    for (int c = 0; c < DV; ++c) vp[c] = as_bf16(_mm512_loadu_si512(value_pairs + p * pair_stride + c * LANES));
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh w = as_bf16(_mm512_set1_epi32(static_cast<int>(slab.weight_pairs[p][row + r])));
      for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w, vp[c]);
    }
  }
  store_rows<D, V, ROWS>(slab, row, acc);
}

// One key block: scores, hidden future, online softmax, weighted values. Key is the element type's pointer.
template <int D, int V, typename Key, typename Value>
void attend_block(Slab<D, V>& slab, const Pass& pass, const Key* key, const Value* value, int64_t block_start, int keys) {
  for (int j = 0; j < keys; j += SCORE_KEYS)
    score_tile<D, V>(slab, key + j * pass.k_row_stride, pass.k_row_stride, j, std::min(SCORE_KEYS, keys - j));
  hide_future<D, V>(slab, block_start, keys);
  constexpr bool bf16 = std::is_same<Key, uint16_t>::value;
  softmax_block<D, V, bf16>(slab, keys, pass.scale);
  constexpr int ROWS = V == 3 ? (D <= 64 ? 6 : (D <= 128 ? 3 : 1)) : (D <= 64 ? 4 : (D <= 128 ? 2 : 1));
  static_assert(Slab<D, V>::ROWS_IN % ROWS == 0, "row tiles must fill the slab");
  if constexpr (bf16) pair_weights<D, V>(slab, keys);
  for (int r = 0; r < Slab<D, V>::ROWS_IN; r += ROWS) accumulate_tile<D, V, ROWS>(slab, r, value, pass.v_row_stride, keys);
}

// One work item: `queries_per_item` query positions of one KV head, their group's heads stacked as rows.
// float32 queries are scaled here; bfloat16 ones stay as given and their scores are scaled in float32.
template <int D, int V, typename Elem, typename Value>
void attend_item(Slab<D, V>& slab, const Pass& pass, int64_t kv_head, int64_t first_query) {
  constexpr bool bf16 = std::is_same<Elem, uint16_t>::value;
  const int64_t queries = std::min(pass.queries_per_item, pass.num_queries - first_query);
  const int64_t rows = queries * pass.group;
  for (int r = 0; r < Slab<D, V>::ROWS_IN; ++r) {
    const bool real = r < rows;
    const int64_t query = first_query + (real ? r / pass.group : queries - 1);
    const int64_t head = kv_head * pass.group + (real ? r % pass.group : 0);
    const Elem* q_row = static_cast<const Elem*>(pass.q) + head * pass.q_head_stride + query * pass.q_row_stride;
    if constexpr (bf16) {
      for (int d = 0; d < D / 2; ++d) slab.q_pairs[d][r] = real ? bf16_pair(q_row + 2 * d) : 0u;
    } else {
      for (int d = 0; d < D; ++d) slab.q_t[d][r] = real ? q_row[d] * pass.scale : 0.0f;
    }
    slab.row_position[r] = last_visible_key(pass, query);
    slab.row_max[r] = -std::numeric_limits<float>::infinity();
    slab.row_sum[r] = 0.0f;
    for (int d = 0; d < D; ++d) slab.acc[r][d] = 0.0f;
  }
  const Elem* key = static_cast<const Elem*>(pass.k) + kv_head * pass.k_head_stride;
  const Value* value = static_cast<const Value*>(pass.v) + kv_head * pass.v_head_stride;
  const int64_t value_step = bf16 ? KEY_BLOCK / 2 : KEY_BLOCK;
  int64_t last_position = 0;
  for (int64_t query = first_query; query < first_query + queries; ++query)
    last_position = std::max(last_position, last_visible_key(pass, query));
  // The last block ends at the item's last visible key: the keys after it would add exact zeros to every row.
  for (int64_t start = 0, block = 0; start <= last_position; start += KEY_BLOCK, ++block) {
    const int keys = static_cast<int>(std::min<int64_t>({KEY_BLOCK, pass.num_keys - start, last_position + 1 - start}));
    attend_block<D, V>(slab, pass, key + start * pass.k_row_stride, value + block * value_step * pass.v_row_stride, start, keys);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t query = first_query + r / pass.group;
    const int64_t head = kv_head * pass.group + r % pass.group;
    Elem* out_row = static_cast<Elem*>(pass.out) + query * pass.heads * D + head * D;
    const float inverse = 1.0f / slab.row_sum[r];
    for (int d = 0; d < D; ++d) {
      const float x = slab.acc[r][d] * inverse;
      if constexpr (bf16) {
        out_row[d] = c10::BFloat16(x).x;
      } else {
        out_row[d] = x;
      }
    }
  }
}

template <int D, int V, typename Elem, typename Value>
void attend_pass(const Pass& pass) {
  const int64_t query_blocks = (pass.num_queries + pass.queries_per_item - 1) / pass.queries_per_item;
  const int64_t items = query_blocks * pass.kv_heads;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::unique_ptr<Slab<D, V>> slab(new Slab<D, V>);
    for (int64_t item = next++; item < items; item = next++) {
      // The latest queries (the most keys) first, so the threads finish together.
      const int64_t block = query_blocks - 1 - item / pass.kv_heads;
      attend_item<D, V, Elem, Value>(*slab, pass, item % pass.kv_heads, block * pass.queries_per_item);
    }
  });
}

// bfloat16 values (Hkv, Tk, d) as (Hkv, ceil(Tk / 2), d) pairs: element [p][d] holds keys 2p (low half) and 2p + 1.
at::Tensor pack_value_pairs(const at::Tensor& v) {
  const int64_t kv_heads = v.size(0), num_keys = v.size(1), head_dim = v.size(2), pairs = (num_keys + 1) / 2;
  at::Tensor packed = at::empty({kv_heads, pairs, head_dim}, v.options().dtype(at::kInt));
  const auto* source = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  auto* target = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  at::parallel_for(0, kv_heads * pairs, 256, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t head = index / pairs, p = index % pairs;
      const uint16_t* even = source + head * v.stride(0) + 2 * p * v.stride(1);
      const uint16_t* odd = even + v.stride(1);
      const bool has_odd = 2 * p + 1 < num_keys;
      uint32_t* row = target + index * head_dim;
      for (int64_t d = 0; d < head_dim; ++d)
        row[d] = static_cast<uint32_t>(even[d]) | (has_odd ? static_cast<uint32_t>(odd[d]) << 16 : 0u);
    }
  });
  return packed;
}

// A pass whose rows all fit one vector (SMALL_SLAB: a one-token pass) runs in slabs of one vector, else of ROW_SLAB.
template <int D, typename Elem, typename Value>
void attend_pass_in_slabs(const Pass& pass) {
  if (pass.queries_per_item * pass.group <= SMALL_SLAB) attend_pass<D, SMALL_SLAB / LANES, Elem, Value>(pass);
  else attend_pass<D, ROW_SLAB / LANES, Elem, Value>(pass);
}

template <typename Elem, typename Value>
void dispatch(const Pass& pass, int64_t head_dim) {
  switch (head_dim) {  // the head dims of cpu_kernels.HEAD_DIMS
    case 16: attend_pass_in_slabs<16, Elem, Value>(pass); break;
    case 32: attend_pass_in_slabs<32, Elem, Value>(pass); break;
    case 48: attend_pass_in_slabs<48, Elem, Value>(pass); break;
    case 64: attend_pass_in_slabs<64, Elem, Value>(pass); break;
    case 80: attend_pass_in_slabs<80, Elem, Value>(pass); break;
    case 96: attend_pass_in_slabs<96, Elem, Value>(pass); break;
    case 128: attend_pass_in_slabs<128, Elem, Value>(pass); break;
    case 256: attend_pass_in_slabs<256, Elem, Value>(pass); break;
    default: TORCH_CHECK(false, "attend_causal: head dim ", head_dim, " not built");
  }
}

// Queries per work item: as many as fill one slab with their group's heads (one vector when the whole pass fits it).
int64_t queries_per_item(int64_t num_queries, int64_t group) {
  const int64_t slab_rows = num_queries * group <= SMALL_SLAB ? SMALL_SLAB : ROW_SLAB;
  return std::max<int64_t>(1, slab_rows / group);
}

at::Tensor attend_causal(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& visible) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "attend_causal: q (H, Tq, d), k and v (Hkv, Tk, d)");
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && k.scalar_type() == dtype && v.scalar_type() == dtype,
              "attend_causal: float32 or bfloat16, the same for q, k and v");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "attend_causal: the last dim must be contiguous");
  const int64_t heads = q.size(0), num_queries = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = k.size(0), num_keys = k.size(1);
  TORCH_CHECK(heads % kv_heads == 0 && v.size(0) == kv_heads && v.size(1) == num_keys && k.size(2) == head_dim &&
                  v.size(2) == head_dim && num_queries <= num_keys,
              "attend_causal: shapes do not match");
  TORCH_CHECK(heads / kv_heads <= ROW_SLAB, "attend_causal: at most ", ROW_SLAB, " query heads per KV head");
  if (visible) {
    TORCH_CHECK(visible->scalar_type() == at::kLong && visible->is_contiguous() && visible->numel() == num_queries,
                "attend_causal: visible is one int64 count per query");
    TORCH_CHECK(num_queries == 0 || (visible->min().item<int64_t>() >= 1 && visible->max().item<int64_t>() <= num_keys),
                "attend_causal: each query sees 1 to Tk keys");
  }
  at::Tensor out = at::empty({num_queries, heads * head_dim}, q.options());
  const bool bf16 = dtype == at::kBFloat16;
  const at::Tensor values = bf16 ? pack_value_pairs(v) : v;
  Pass pass{q.data_ptr(), k.data_ptr(), values.data_ptr(), out.data_ptr(),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), values.stride(0), values.stride(1),
            heads, kv_heads, heads / kv_heads, num_queries, num_keys, num_keys - num_queries,
            queries_per_item(num_queries, heads / kv_heads), 1.0f / std::sqrt(static_cast<float>(head_dim)),
            visible ? visible->data_ptr<int64_t>() : nullptr};
  if (bf16) {
    dispatch<uint16_t, uint32_t>(pass, head_dim);
  } else {
    dispatch<float, float>(pass, head_dim);
  }
  return out;
}

// Decode: one query token per row, each row over its own cache. A row's query heads of one KV head read each of its
// keys and values once; the dims are the vector lanes (a query's 1 x d against a key's d).
constexpr int DECODE_ACCUMULATORS = 24;

template <int D, typename Elem>
void decode_item(const Elem* query, int64_t query_head_stride, int64_t group, const Elem* key, int64_t key_stride,
                 const Elem* value, int64_t value_stride, int64_t length, float scale, Elem* out, std::vector<float>& weights) {
  constexpr int DV = D / LANES;
  constexpr int HEADS_PER_TILE = std::max(1, DECODE_ACCUMULATORS / DV);
  weights.resize(static_cast<size_t>(group * length));
  for (int64_t first = 0; first < group; first += HEADS_PER_TILE) {
    const int heads = static_cast<int>(std::min<int64_t>(HEADS_PER_TILE, group - first));
    __m512 q[HEADS_PER_TILE][DV];
    for (int h = 0; h < heads; ++h)
      for (int c = 0; c < DV; ++c) q[h][c] = _mm512_mul_ps(load_floats(query + (first + h) * query_head_stride + c * LANES), _mm512_set1_ps(scale));
    float max_score[HEADS_PER_TILE];
    for (int h = 0; h < heads; ++h) max_score[h] = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < length; ++j) {
      __m512 kj[DV];
      for (int c = 0; c < DV; ++c) kj[c] = load_floats(key + j * key_stride + c * LANES);
      for (int h = 0; h < heads; ++h) {
        __m512 sum = _mm512_mul_ps(q[h][0], kj[0]);
        for (int c = 1; c < DV; ++c) sum = _mm512_fmadd_ps(q[h][c], kj[c], sum);
        const float score = _mm512_reduce_add_ps(sum);
        weights[(first + h) * length + j] = score;
        max_score[h] = std::max(max_score[h], score);
      }
    }
    float total[HEADS_PER_TILE];
    for (int h = 0; h < heads; ++h) {
      float* row = weights.data() + (first + h) * length;
      const __m512 row_max = _mm512_set1_ps(max_score[h]);
      __m512 sums = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + LANES <= length; j += LANES) {
        const __m512 w = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + j), row_max));
        _mm512_storeu_ps(row + j, w);
        sums = _mm512_add_ps(sums, w);
      }
      if (j < length) {
        const __mmask16 tail = static_cast<__mmask16>((1u << (length - j)) - 1);
        const __m512 w = _mm512_maskz_mov_ps(tail, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + j), row_max)));
        _mm512_mask_storeu_ps(row + j, tail, w);
        sums = _mm512_add_ps(sums, w);
      }
      total[h] = _mm512_reduce_add_ps(sums);
    }
    __m512 acc[HEADS_PER_TILE][DV];
    for (int h = 0; h < heads; ++h)
      for (int c = 0; c < DV; ++c) acc[h][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < length; ++j) {
      __m512 vj[DV];
      for (int c = 0; c < DV; ++c) vj[c] = load_floats(value + j * value_stride + c * LANES);
      for (int h = 0; h < heads; ++h) {
        const __m512 w = _mm512_set1_ps(weights[(first + h) * length + j]);
        for (int c = 0; c < DV; ++c) acc[h][c] = _mm512_fmadd_ps(w, vj[c], acc[h][c]);
      }
    }
    for (int h = 0; h < heads; ++h) {
      alignas(64) float result[D];
      const __m512 inverse = _mm512_set1_ps(1.0f / total[h]);
      for (int c = 0; c < DV; ++c) _mm512_store_ps(result + c * LANES, _mm512_mul_ps(acc[h][c], inverse));
      Elem* target = out + (first + h) * D;
      for (int d = 0; d < D; ++d) {
        if constexpr (std::is_same<Elem, uint16_t>::value) {
          target[d] = c10::BFloat16(result[d]).x;
        } else {
          target[d] = result[d];
        }
      }
    }
  }
}

template <int D, typename Elem>
void decode_rows_typed(const at::Tensor& q, const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                       const std::vector<int64_t>& lengths, at::Tensor& out) {
  const int64_t rows = static_cast<int64_t>(keys.size()), heads = q.size(0), kv_heads = keys[0].size(0), group = heads / kv_heads;
  const int64_t items = rows * kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const auto* query = static_cast<const Elem*>(q.data_ptr());
  auto* target = static_cast<Elem*>(out.data_ptr());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> weights;
    for (int64_t item = next++; item < items; item = next++) {
      const int64_t row = item / kv_heads, kv_head = item % kv_heads;
      const at::Tensor& k = keys[row];
      const at::Tensor& v = values[row];
      decode_item<D, Elem>(query + kv_head * group * q.stride(0) + row * q.stride(1), q.stride(0), group,
                           static_cast<const Elem*>(k.data_ptr()) + kv_head * k.stride(0), k.stride(1),
                           static_cast<const Elem*>(v.data_ptr()) + kv_head * v.stride(0), v.stride(1), lengths[row], scale,
                           target + row * heads * D + kv_head * group * D, weights);
    }
  });
}

// Each row's new token K/V (Hkv, B, d) into its cache at lengths[row] - 1: one call instead of two small torch
// copies per row and layer, whose cost was per call.
void append_rows(const at::Tensor& new_keys, const at::Tensor& new_values, std::vector<at::Tensor>& keys,
                 std::vector<at::Tensor>& values, const std::vector<int64_t>& lengths) {
  const int64_t rows = static_cast<int64_t>(keys.size()), kv_heads = keys[0].size(0), head_dim = keys[0].size(2);
  for (const at::Tensor* fresh : {&new_keys, &new_values})
    TORCH_CHECK(fresh->dim() == 3 && fresh->size(0) == kv_heads && fresh->size(1) == rows && fresh->size(2) == head_dim &&
                    fresh->stride(2) == 1 && fresh->scalar_type() == keys[0].scalar_type(),
                "attend_rows: the new K/V are (Hkv, B, d) in the caches' dtype");
  const int64_t bytes = head_dim * static_cast<int64_t>(keys[0].element_size());
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t head = 0; head < kv_heads; ++head) {
      const int64_t slot = lengths[row] - 1;
      std::memcpy(static_cast<char*>(keys[row].data_ptr()) + (head * keys[row].stride(0) + slot * keys[row].stride(1)) * keys[row].element_size(),
                  static_cast<const char*>(new_keys.data_ptr()) + (head * new_keys.stride(0) + row * new_keys.stride(1)) * new_keys.element_size(),
                  bytes);
      std::memcpy(static_cast<char*>(values[row].data_ptr()) + (head * values[row].stride(0) + slot * values[row].stride(1)) * values[row].element_size(),
                  static_cast<const char*>(new_values.data_ptr()) + (head * new_values.stride(0) + row * new_values.stride(1)) * new_values.element_size(),
                  bytes);
    }
}

at::Tensor attend_rows(const at::Tensor& q, at::TensorList keys, at::TensorList values, at::IntArrayRef lengths,
                       const std::optional<at::Tensor>& new_keys, const std::optional<at::Tensor>& new_values) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "attend_rows: q (H, B, d), the last dim contiguous");
  const int64_t heads = q.size(0), rows = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == rows && static_cast<int64_t>(values.size()) == rows &&
                  static_cast<int64_t>(lengths.size()) == rows, "attend_rows: one cache and length per row");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "attend_rows: float32 or bfloat16");
  std::vector<at::Tensor> k(keys.begin(), keys.end()), v(values.begin(), values.end());
  std::vector<int64_t> length(lengths.begin(), lengths.end());
  for (int64_t row = 0; row < rows; ++row) {
    TORCH_CHECK(k[row].dim() == 3 && v[row].dim() == 3 && k[row].scalar_type() == dtype && v[row].scalar_type() == dtype &&
                    k[row].stride(2) == 1 && v[row].stride(2) == 1 && k[row].size(2) == head_dim &&
                    v[row].size(2) == head_dim && k[row].size(0) == k[0].size(0) && v[row].size(0) == k[0].size(0) &&
                    heads % k[row].size(0) == 0 && length[row] >= 1 && length[row] <= k[row].size(1) && length[row] <= v[row].size(1),
                "attend_rows: row ", row, "'s cache does not match the queries");
  }
  at::Tensor out = at::empty({rows, heads * head_dim}, q.options());
  if (rows == 0) return out;
  TORCH_CHECK(new_keys.has_value() == new_values.has_value(), "attend_rows: new keys and values go together");
  if (new_keys) append_rows(*new_keys, *new_values, k, v, length);
#define KVCAKE_DECODE(DIM)                                                                   \
  case DIM:                                                                                  \
    if (dtype == at::kFloat) decode_rows_typed<DIM, float>(q, k, v, length, out);            \
    else decode_rows_typed<DIM, uint16_t>(q, k, v, length, out);                             \
    break;
  switch (head_dim) {
    KVCAKE_DECODE(16) KVCAKE_DECODE(32) KVCAKE_DECODE(48) KVCAKE_DECODE(64)
    KVCAKE_DECODE(80) KVCAKE_DECODE(96) KVCAKE_DECODE(128) KVCAKE_DECODE(256)
    default: TORCH_CHECK(false, "attend_rows: head dim ", head_dim, " not built");
  }
#undef KVCAKE_DECODE
  return out;
}

}  // namespace

TORCH_LIBRARY(kvcake, m) {
  m.def("attend_causal(Tensor q, Tensor k, Tensor v, Tensor? visible=None) -> Tensor");
  m.def("attend_rows(Tensor q, Tensor(a!)[] keys, Tensor(b!)[] values, int[] lengths, Tensor? new_keys=None, Tensor? new_values=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvcake, CPU, m) {
  m.impl("attend_causal", attend_causal);
  m.impl("attend_rows", attend_rows);
}
