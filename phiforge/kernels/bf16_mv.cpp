// bf16 matrix x skinny matrix for x86 AVX2 CPUs: out[M, N] = x[M, K] @ W[N, K]^T for the few rows of a decode step.
//
// Why: at M = 1..4 a bf16 linear is a pure weight stream, yet aten's bf16 GEMV on CPU reads it at about half the
// bandwidth its fp32 GEMV reaches (17.6 vs 36.8 GB/s measured on the 2-core dev box). Here a weight row is read once
// for all M activation rows: 8 bf16 weights are widened to fp32 by a 16-bit left shift (bf16 is the top half of an
// fp32, so the widening is exact) and FMA'd into fp32 accumulators; the activations are widened to fp32 once up front.
// Each output is one fp32 dot product rounded once to bf16 (round to nearest even), as aten's fp32-accumulating GEMM
// does; only the summation order differs.
//
// Registers (AVX2 has 16 ymm): R activation rows x T weight rows of accumulators, T weight vectors, R activation
// vectors. R <= 2 takes T = 4 (8 + 4 + 2 = 14 registers), R = 3, 4 takes T = 2 (up to 8 + 2 + 4 = 14).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>
#include "simd.h"
#include <algorithm>
#include <cstdint>

namespace {

using phiforge_simd::hsum;

inline __m256 load_bf16(const uint16_t* p) {  // 8 bf16 -> 8 fp32, exact
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// Rows n0 .. n0+T-1 of W against R activation rows; K a multiple of 8.
template <int R, int T>
inline void tile(const float* x, const uint16_t* w, c10::BFloat16* out, int64_t n0, int64_t N, int64_t K) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const uint16_t* wr = w + n0 * K;
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[T];
    for (int t = 0; t < T; ++t) wv[t] = load_bf16(wr + t * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(wv[t], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r * N + n0 + t] = c10::BFloat16(hsum(acc[r][t]));
}

template <int R>
void run(const float* x, const uint16_t* w, c10::BFloat16* out, int64_t N, int64_t K) {
  constexpr int T = R <= 2 ? 4 : 2;
  const int64_t tiles = N / T;
  // ~64 KiB of weights per task at least, so threads do not split tiny layers
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / (T * K));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) tile<R, T>(x, w, out, t * T, N, K);
  });
  for (int64_t n = tiles * T; n < N; ++n) tile<R, 1>(x, w, out, n, N, K);  // the last N % T rows
}

at::Tensor bf16_mv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be bf16 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "w must be contiguous bf16 [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && K % 8 == 0 && M >= 1 && M <= 4, "bf16_mv: needs K % 8 == 0 and 1 <= M <= 4");
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // [M, K] fp32, exact
  auto out = at::empty({M, N}, x.options());
  const float* xp = xf.data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* op = out.data_ptr<at::BFloat16>();
  switch (M) {
    case 1: run<1>(xp, wp, op, N, K); break;
    case 2: run<2>(xp, wp, op, N, K); break;
    case 3: run<3>(xp, wp, op, N, K); break;
    default: run<4>(xp, wp, op, N, K);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(phiforge, m) {
  m.def("bf16_mv(Tensor x, Tensor w) -> Tensor");
}
TORCH_LIBRARY_IMPL(phiforge, CPU, m) { m.impl("bf16_mv", &bf16_mv); }
