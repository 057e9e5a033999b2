// A decoder layer's elementwise steps on an x86 CPU with AVX-512, each one pass over its rows where torch runs 3 to 8
// ops (a pass over memory each, and a dispatch each: ~1000 per decode step). Built and loaded with
// cpu_attention.cpp by cpu_kernels.py. Every row is computed the same way whichever call and thread it is in, so
// a token's result never depends on its pass. float32 throughout, rounded to the activation dtype once at the end,
// and where the reference models' result depends on it: RMSNorm's normalised rows before the weight. RoPE's two
// products and SiLU before its product with `up` are not rounded in between (the torch path rounds them in bf16),
// which is closer to float32; a bf16 model's bits depend on whether the kernels are built, as with attention.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu_vector.h"

namespace {

using kvcake::LANES;
using kvcake::load_floats;
using kvcake::store_floats;

constexpr int64_t GRAIN_ELEMENTS = 1 << 15;  // a thread's share is at least this many elements: decode rows stay on one thread

int64_t rows_per_grain(int64_t row_elements) { return std::max<int64_t>(1, GRAIN_ELEMENTS / std::max<int64_t>(1, row_elements)); }

int lanes_from(int64_t index, int64_t width) { return static_cast<int>(std::min<int64_t>(LANES, width - index)); }

template <typename Elem>
void rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, float eps) {
  const int64_t rows = x.size(0), width = x.size(1), x_stride = x.stride(0);
  const auto* source = static_cast<const Elem*>(x.data_ptr());
  const auto* scale_by = static_cast<const Elem*>(weight.data_ptr());
  auto* target = static_cast<Elem*>(out.data_ptr());
  at::parallel_for(0, rows, rows_per_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Elem* row = source + r * x_stride;
      __m512 squares = _mm512_setzero_ps();
      for (int64_t i = 0; i < width; i += LANES) {
        const __m512 value = load_floats(row + i, lanes_from(i, width));
        squares = _mm512_fmadd_ps(value, value, squares);
      }
      const __m512 inverse = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(width) + eps));
      for (int64_t i = 0; i < width; i += LANES) {
        const int n = lanes_from(i, width);
        const __m512 normed = kvcake::as_stored(_mm512_mul_ps(load_floats(row + i, n), inverse), row);
        store_floats(target + r * width + i, _mm512_mul_ps(load_floats(scale_by + i, n), normed), n);
      }
    }
  });
}

// Rotary embedding, the halves of each head rotated (x * cos + rotate_half(x) * sin).
template <typename Elem>
void rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const int64_t heads = x.size(0), tokens = x.size(1), head_dim = x.size(2), half = head_dim / 2;
  const auto* source = static_cast<const Elem*>(x.data_ptr());
  const auto* cosines = static_cast<const Elem*>(cos.data_ptr());
  const auto* sines = static_cast<const Elem*>(sin.data_ptr());
  auto* target = static_cast<Elem*>(out.data_ptr());
  const int64_t head_stride = x.stride(0), token_stride = x.stride(1);
  at::parallel_for(0, heads * tokens, rows_per_grain(head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t head = index / tokens, token = index % tokens;
      const Elem* row = source + head * head_stride + token * token_stride;
      const Elem* c = cosines + token * head_dim;
      const Elem* s = sines + token * head_dim;
      Elem* result = target + index * head_dim;
      for (int64_t i = 0; i < half; i += LANES) {
        const int n = lanes_from(i, half);
        const __m512 first = load_floats(row + i, n), second = load_floats(row + half + i, n);
        store_floats(result + i, _mm512_fnmadd_ps(second, load_floats(s + i, n), _mm512_mul_ps(first, load_floats(c + i, n))), n);
        store_floats(result + half + i,
                     _mm512_fmadd_ps(first, load_floats(s + half + i, n), _mm512_mul_ps(second, load_floats(c + half + i, n))), n);
      }
    }
  });
}

// silu(gate) * up for rows holding [gate | up]; sigmoid from exp of -|gate| so it never overflows.
template <typename Elem>
void silu_mul_rows(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2, stride = gate_up.stride(0);
  const auto* source = static_cast<const Elem*>(gate_up.data_ptr());
  auto* target = static_cast<Elem*>(out.data_ptr());
  const __m512 one = _mm512_set1_ps(1.0f);
  at::parallel_for(0, rows, rows_per_grain(2 * width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Elem* gate = source + r * stride;
      for (int64_t i = 0; i < width; i += LANES) {
        const int n = lanes_from(i, width);
        const __m512 g = load_floats(gate + i, n);
        const __m512 e = kvcake::exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
        const __mmask16 positive = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ);
        const __m512 sigmoid = _mm512_div_ps(_mm512_mask_mov_ps(e, positive, one), _mm512_add_ps(one, e));
        store_floats(target + r * width + i, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid), load_floats(gate + width + i, n)), n);
      }
    }
  });
}

void check_dtype(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": float32 or bfloat16");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_dtype("rms_norm", x);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x (T, hidden), rows contiguous");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight (hidden,) in x's dtype");
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kFloat) rms_norm_rows<float>(x, weight, out, static_cast<float>(eps));
  else rms_norm_rows<uint16_t>(x, weight, out, static_cast<float>(eps));
  return out;
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_dtype("rope", x);
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rope: x (H, T, d), d even and contiguous");
  for (const at::Tensor* table : {&cos, &sin})
    TORCH_CHECK(table->dim() == 2 && table->is_contiguous() && table->size(0) == x.size(1) && table->size(1) == x.size(2) &&
                    table->scalar_type() == x.scalar_type(),
                "rope: cos and sin (T, d), contiguous, in x's dtype");
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kFloat) rope_rows<float>(x, cos, sin, out);
  else rope_rows<uint16_t>(x, cos, sin, out);
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_dtype("silu_mul", gate_up);
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0, "silu_mul: gate_up (T, 2I), rows contiguous");
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) silu_mul_rows<float>(gate_up, out);
  else silu_mul_rows<uint16_t>(gate_up, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvcake, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvcake, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("rope", rope);
  m.impl("silu_mul", silu_mul);
}
