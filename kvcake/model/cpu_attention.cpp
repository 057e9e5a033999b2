// Causal float32 attention of a prefill pass on an x86 CPU with AVX-512: one pass over the keys per block of
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

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int LANES = 16;
constexpr int KEY_BLOCK = 96;        // keys per online-softmax step, aligned to absolute key positions
constexpr int ROW_SLAB = 48;         // query rows (a query position times one head) per work item
constexpr int SLAB_VECTORS = ROW_SLAB / LANES;
constexpr int SCORE_KEYS = 8;        // keys per score micro-tile: SLAB_VECTORS x SCORE_KEYS accumulators

// exp(x) for the x <= 0 of softmax: Cephes' range reduction and polynomial, exactly 1 at 0 and exactly 0 below
// -87.3 (and for -inf, a masked score).
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 lowest = _mm512_set1_ps(-87.3f);
  const __mmask16 alive = _mm512_cmp_ps_mask(x, lowest, _CMP_GE_OQ);
  x = _mm512_max_ps(x, lowest);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(alive, _mm512_scalef_ps(p, n));
}

struct Pass {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  int64_t q_head_stride, q_row_stride;
  int64_t k_head_stride, k_row_stride;
  int64_t v_head_stride, v_row_stride;
  int64_t heads, kv_heads, group, num_queries, num_keys, first_position;
  int64_t queries_per_item;
  float scale;
};

// One slab's working set, transposed so that a vector holds LANES rows: scores and weights are [key][row].
template <int D>
struct Slab {
  alignas(64) float q_t[D][ROW_SLAB];
  alignas(64) float scores[KEY_BLOCK][ROW_SLAB];
  alignas(64) float acc[ROW_SLAB][D];
  alignas(64) float row_max[ROW_SLAB];
  alignas(64) float row_sum[ROW_SLAB];
  alignas(64) float row_scale[ROW_SLAB];
  int64_t row_position[ROW_SLAB];
};

// scores[j][rows] = q_t . k_j for SCORE_KEYS keys from `key`.
template <int D>
inline void score_tile(Slab<D>& slab, const float* key, int64_t key_stride, int first_key) {
  __m512 sums[SCORE_KEYS][SLAB_VECTORS];
  for (int j = 0; j < SCORE_KEYS; ++j)
    for (int c = 0; c < SLAB_VECTORS; ++c) sums[j][c] = _mm512_setzero_ps();
  for (int d = 0; d < D; ++d) {
    __m512 rows[SLAB_VECTORS];
    for (int c = 0; c < SLAB_VECTORS; ++c) rows[c] = _mm512_load_ps(&slab.q_t[d][c * LANES]);
    for (int j = 0; j < SCORE_KEYS; ++j) {
      const __m512 kd = _mm512_set1_ps(key[j * key_stride + d]);
      for (int c = 0; c < SLAB_VECTORS; ++c) sums[j][c] = _mm512_fmadd_ps(rows[c], kd, sums[j][c]);
    }
  }
  for (int j = 0; j < SCORE_KEYS; ++j)
    for (int c = 0; c < SLAB_VECTORS; ++c) _mm512_store_ps(&slab.scores[first_key + j][c * LANES], sums[j][c]);
}

// The same for one key (the block's tail when fewer than SCORE_KEYS keys remain).
template <int D>
inline void score_one(Slab<D>& slab, const float* key, int j) {
  __m512 sums[SLAB_VECTORS];
  for (int c = 0; c < SLAB_VECTORS; ++c) sums[c] = _mm512_setzero_ps();
  for (int d = 0; d < D; ++d) {
    const __m512 kd = _mm512_set1_ps(key[d]);
    for (int c = 0; c < SLAB_VECTORS; ++c) sums[c] = _mm512_fmadd_ps(_mm512_load_ps(&slab.q_t[d][c * LANES]), kd, sums[c]);
  }
  for (int c = 0; c < SLAB_VECTORS; ++c) _mm512_store_ps(&slab.scores[j][c * LANES], sums[c]);
}

// acc[rows] = acc[rows] * row_scale + weights^T . v over the block's keys, ROWS rows at a time in registers.
template <int D, int ROWS>
inline void accumulate_tile(Slab<D>& slab, int row, const float* value, int64_t value_stride, int keys) {
  constexpr int DV = D / LANES;
  __m512 acc[ROWS][DV];
  for (int r = 0; r < ROWS; ++r) {
    const __m512 s = _mm512_set1_ps(slab.row_scale[row + r]);
    for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_mul_ps(_mm512_load_ps(&slab.acc[row + r][c * LANES]), s);
  }
  for (int j = 0; j < keys; ++j) {
    __m512 vj[DV];
    for (int c = 0; c < DV; ++c) vj[c] = _mm512_loadu_ps(value + j * value_stride + c * LANES);
    for (int r = 0; r < ROWS; ++r) {
      const __m512 w = _mm512_set1_ps(slab.scores[j][row + r]);
      for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_fmadd_ps(w, vj[c], acc[r][c]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < DV; ++c) _mm512_store_ps(&slab.acc[row + r][c * LANES], acc[r][c]);
}

// Online softmax over one key block: hide keys after each row's position, update max and sum, turn scores into
// weights, and rescale-and-accumulate the values.
template <int D>
void attend_block(Slab<D>& slab, const Pass& pass, const float* key, const float* value, int64_t block_start, int keys) {
  int j = 0;
  for (; j + SCORE_KEYS <= keys; j += SCORE_KEYS) score_tile<D>(slab, key + j * pass.k_row_stride, pass.k_row_stride, j);
  for (; j < keys; ++j) score_one<D>(slab, key + j * pass.k_row_stride, j);
  const int64_t last_key = block_start + keys - 1;
  for (int r = 0; r < ROW_SLAB; ++r) {
    if (slab.row_position[r] >= last_key) continue;
    for (int jj = std::max<int64_t>(0, slab.row_position[r] + 1 - block_start); jj < keys; ++jj)
      slab.scores[jj][r] = -std::numeric_limits<float>::infinity();
  }
  for (int c = 0; c < SLAB_VECTORS; ++c) {
    __m512 block_max = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int jj = 0; jj < keys; ++jj) block_max = _mm512_max_ps(block_max, _mm512_load_ps(&slab.scores[jj][c * LANES]));
    const __m512 old_max = _mm512_load_ps(&slab.row_max[c * LANES]);
    const __m512 new_max = _mm512_max_ps(old_max, block_max);
    const __m512 rescale = exp_nonpositive(_mm512_sub_ps(old_max, new_max));
    __m512 block_sum = _mm512_setzero_ps();
    for (int jj = 0; jj < keys; ++jj) {
      const __m512 w = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(&slab.scores[jj][c * LANES]), new_max));
      _mm512_store_ps(&slab.scores[jj][c * LANES], w);
      block_sum = _mm512_add_ps(block_sum, w);
    }
    _mm512_store_ps(&slab.row_max[c * LANES], new_max);
    _mm512_store_ps(&slab.row_scale[c * LANES], rescale);
    _mm512_store_ps(&slab.row_sum[c * LANES], _mm512_fmadd_ps(_mm512_load_ps(&slab.row_sum[c * LANES]), rescale, block_sum));
  }
  constexpr int ROWS = D <= 64 ? 6 : (D <= 128 ? 3 : 1);
  static_assert(ROW_SLAB % ROWS == 0, "row tiles must fill the slab");
  for (int r = 0; r < ROW_SLAB; r += ROWS) accumulate_tile<D, ROWS>(slab, r, value, pass.v_row_stride, keys);
}

// One work item: `queries_per_item` query positions of one KV head, their group's heads stacked as rows.
template <int D>
void attend_item(Slab<D>& slab, const Pass& pass, int64_t kv_head, int64_t first_query) {
  const int64_t queries = std::min(pass.queries_per_item, pass.num_queries - first_query);
  const int64_t rows = queries * pass.group;
  for (int r = 0; r < ROW_SLAB; ++r) {
    const bool real = r < rows;
    const int64_t query = first_query + (real ? r / pass.group : queries - 1);
    const int64_t head = kv_head * pass.group + (real ? r % pass.group : 0);
    const float* q_row = pass.q + head * pass.q_head_stride + query * pass.q_row_stride;
    for (int d = 0; d < D; ++d) slab.q_t[d][r] = real ? q_row[d] * pass.scale : 0.0f;
    slab.row_position[r] = pass.first_position + query;
    slab.row_max[r] = -std::numeric_limits<float>::infinity();
    slab.row_sum[r] = 0.0f;
    for (int d = 0; d < D; ++d) slab.acc[r][d] = 0.0f;
  }
  const float* key = pass.k + kv_head * pass.k_head_stride;
  const float* value = pass.v + kv_head * pass.v_head_stride;
  const int64_t last_position = pass.first_position + first_query + queries - 1;
  for (int64_t start = 0; start <= last_position; start += KEY_BLOCK) {
    const int keys = static_cast<int>(std::min<int64_t>(KEY_BLOCK, pass.num_keys - start));
    attend_block<D>(slab, pass, key + start * pass.k_row_stride, value + start * pass.v_row_stride, start, keys);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t query = first_query + r / pass.group;
    const int64_t head = kv_head * pass.group + r % pass.group;
    float* out_row = pass.out + query * pass.heads * D + head * D;
    const float inverse = 1.0f / slab.row_sum[r];
    for (int d = 0; d < D; ++d) out_row[d] = slab.acc[r][d] * inverse;
  }
}

template <int D>
void attend_pass(const Pass& pass) {
  const int64_t query_blocks = (pass.num_queries + pass.queries_per_item - 1) / pass.queries_per_item;
  const int64_t items = query_blocks * pass.kv_heads;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::unique_ptr<Slab<D>> slab(new Slab<D>);
    for (int64_t item = next++; item < items; item = next++) {
      // The latest queries (the most keys) first, so the threads finish together.
      const int64_t block = query_blocks - 1 - item / pass.kv_heads;
      attend_item<D>(*slab, pass, item % pass.kv_heads, block * pass.queries_per_item);
    }
  });
}

at::Tensor attend_causal(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "attend_causal: q (H, Tq, d), k and v (Hkv, Tk, d)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "attend_causal: float32 only");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "attend_causal: the last dim must be contiguous");
  const int64_t heads = q.size(0), num_queries = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = k.size(0), num_keys = k.size(1);
  TORCH_CHECK(heads % kv_heads == 0 && v.size(0) == kv_heads && v.size(1) == num_keys && k.size(2) == head_dim &&
                  v.size(2) == head_dim && num_queries <= num_keys,
              "attend_causal: shapes do not match");
  at::Tensor out = at::empty({num_queries, heads * head_dim}, q.options());
  Pass pass{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            heads, kv_heads, heads / kv_heads, num_queries, num_keys, num_keys - num_queries,
            std::max<int64_t>(1, ROW_SLAB / (heads / kv_heads)), 1.0f / std::sqrt(static_cast<float>(head_dim))};
  TORCH_CHECK(pass.group <= ROW_SLAB, "attend_causal: at most ", ROW_SLAB, " query heads per KV head");
  switch (head_dim) {  // the head dims of cpu_kernels.HEAD_DIMS
    case 16: attend_pass<16>(pass); break;
    case 32: attend_pass<32>(pass); break;
    case 48: attend_pass<48>(pass); break;
    case 64: attend_pass<64>(pass); break;
    case 80: attend_pass<80>(pass); break;
    case 96: attend_pass<96>(pass); break;
    case 128: attend_pass<128>(pass); break;
    case 256: attend_pass<256>(pass); break;
    default: TORCH_CHECK(false, "attend_causal: head dim ", head_dim, " not built");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(kvcake, m) { m.def("attend_causal(Tensor q, Tensor k, Tensor v) -> Tensor"); }

TORCH_LIBRARY_IMPL(kvcake, CPU, m) { m.impl("attend_causal", attend_causal); }
