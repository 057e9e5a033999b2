// AVX-512 helpers shared by the CPU kernels (cpu_attention.cpp, cpu_layer_ops.cpp): float32 vectors loaded from and
// stored to float32 or bfloat16 memory, and exp for softmax and SiLU.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace kvcake {

constexpr int LANES = 16;

// exp(x) for x <= 0: Cephes' range reduction and polynomial, exactly 1 at 0 and exactly 0 below -87.3 (and for
// -inf, a masked score).
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

// Floats from float32 or bfloat16 memory (a uint16_t's bits): all LANES, or the first `count` and zeros after them.
inline __mmask16 first_lanes(int count) { return static_cast<__mmask16>((1u << count) - 1u); }

inline __m512 widen_bf16(__m256i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)); }

inline __m512 load_floats(const float* at) { return _mm512_loadu_ps(at); }
inline __m512 load_floats(const uint16_t* at) { return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at))); }
inline __m512 load_floats(const float* at, int count) { return _mm512_maskz_loadu_ps(first_lanes(count), at); }
inline __m512 load_floats(const uint16_t* at, int count) { return widen_bf16(_mm256_maskz_loadu_epi16(first_lanes(count), at)); }

// Round to bfloat16, to nearest even, as c10::BFloat16 does (a NaN stays a NaN), with integer instructions only.
inline __m256i round_to_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

// The first `count` floats stored as float32 or bfloat16.
inline void store_floats(float* at, __m512 x, int count) { _mm512_mask_storeu_ps(at, first_lanes(count), x); }
inline void store_floats(uint16_t* at, __m512 x, int count) { _mm256_mask_storeu_epi16(at, first_lanes(count), round_to_bf16(x)); }

// A value rounded as it would be stored in Elem (float32: as it is).
inline __m512 as_stored(__m512 x, const float*) { return x; }
inline __m512 as_stored(__m512 x, const uint16_t*) { return widen_bf16(round_to_bf16(x)); }

}  // namespace kvcake
