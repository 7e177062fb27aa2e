// Shared AVX2 helpers of the phiforge kernels (int4_mm.cpp, bf16_mv.cpp).
#pragma once
#include <immintrin.h>

namespace phiforge_simd {

inline float hsum(__m256 v) {  // the sum of 8 fp32 lanes
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace phiforge_simd
