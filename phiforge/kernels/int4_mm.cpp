// Weight-only int4 matmul for x86 AVX2 CPUs: out[M, N] = x[M, K] @ dequant(W)[N, K]^T.
//
// Packed layout (phiforge/quant.py `pack_int4`): row n of W is K/2 bytes; each 32-weight block holds 16 bytes,
// byte j = q[j] | q[j + 16] << 4 (the ggml block_q4_0 nibble order), q in 0..15. Per group of G weights:
// fp16 scale s and fp16 offset m, so w = s * q + m (symmetric quantization is m = -8 s).
//
// Like llama.cpp, activations are quantized to int8 on the fly (here per weight group, absmax / 127) so the inner
// loop is vpmaddubsw (u8 x s8 -> s16). Products of one group are summed in s16: |q x| <= 15 * 127 and a group of
// <= 256 weights adds at most 8 pair-sums of 3810 = 30480 < 32767, so nothing saturates. The offset term
// m * sum(x) is computed from the fp32 activations, exactly.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>

namespace {

inline __m256i unpack32(const uint8_t* p) {  // 16 bytes -> 32 nibbles in 0..15, in q order
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

struct Args {
  const uint8_t* w; const uint16_t* s; const uint16_t* mn;  // packed weight, fp16 scales, fp16 offsets
  const int8_t* xq; const float* xd; const float* xs;       // int8 activations, their scales, fp32 group sums
  float* out; int64_t N, K, G;
};

// R activation rows x C weight rows; the s16 accumulators stay in registers for a whole group.
template <int R, int C>
void tile(const Args& a, int64_t m0, int64_t n0) {
  const int64_t ng = a.K / a.G, bpg = a.G / 32, kb = a.K / 2;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 accf[R][C];
  for (int r = 0; r < R; r++) for (int c = 0; c < C; c++) accf[r][c] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; g++) {
    __m256i acc[R][C];
    for (int r = 0; r < R; r++) for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_si256();
    for (int64_t b = 0; b < bpg; b++) {
      const int64_t k = g * a.G + b * 32;
      __m256i w[C];
      for (int c = 0; c < C; c++) w[c] = unpack32(a.w + (n0 + c) * kb + k / 2);
      for (int r = 0; r < R; r++) {
        __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m0 + r) * a.K + k));
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_add_epi16(acc[r][c], _mm256_maddubs_epi16(w[c], x));
      }
    }
    // R + C broadcasts per group instead of R * C scalar products (the epilogue dominates at G = 32).
    __m256 dw[C];
    for (int c = 0; c < C; c++) dw[c] = _mm256_set1_ps(h2f(a.s[(n0 + c) * ng + g]));
    for (int r = 0; r < R; r++) {
      const __m256 dx = _mm256_set1_ps(a.xd[(m0 + r) * ng + g]);
      for (int c = 0; c < C; c++) {
        __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(acc[r][c], ones)), dx);
        accf[r][c] = _mm256_fmadd_ps(p, dw[c], accf[r][c]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) {
      float off = 0.f;
      for (int64_t g = 0; g < ng; g++) off += h2f(a.mn[(n0 + c) * ng + g]) * a.xs[(m0 + r) * ng + g];
      a.out[(m0 + r) * a.N + n0 + c] = hsum(accf[r][c]) + off;
    }
}

template <int R>
void rows(const Args& a, int64_t m0, int64_t n_begin, int64_t n_end) {
  constexpr int C = R == 1 ? 4 : 2;  // decode: 4 weight rows for ILP; prefill: 4x2 fits the 16 ymm registers
  int64_t n = n_begin;
  for (; n + C <= n_end; n += C) tile<R, C>(a, m0, n);
  for (; n < n_end; n++) tile<R, 1>(a, m0, n);
}

// Per (row, group): int8 codes, scale absmax/127 and the exact fp32 sum.
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t G, int8_t* xq, float* xd, float* xs) {
  const int64_t ng = K / G;
  at::parallel_for(0, M * ng, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
      const float* p = x + i * G;  // rows are contiguous, so group i of the flat array is (i / ng, i % ng)
      const __m256 sign = _mm256_set1_ps(-0.f);
      __m256 vmax = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
      for (int64_t j = 0; j < G; j += 8) {
        __m256 v = _mm256_loadu_ps(p + j);
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
        vsum = _mm256_add_ps(vsum, v);
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      const __m256 vid = _mm256_set1_ps(id);
      for (int64_t j = 0; j < G; j += 8) {  // cvtps rounds to nearest even; |v * id| <= 127, so packs never clip
        __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + j), vid));
        __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(xq + i * G + j), _mm_packs_epi16(q16, q16));
      }
      xd[i] = d;
      xs[i] = hsum(vsum);
    }
  });
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& offsets,
                   int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous(), "qweight must be contiguous uint8");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && offsets.scalar_type() == at::kHalf, "scales/offsets must be fp16");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), G = group_size;
  TORCH_CHECK(G % 32 == 0 && G <= 256 && K % G == 0 && qweight.size(1) == K / 2, "bad int4 shapes or group size");
  TORCH_CHECK(scales.numel() == N * (K / G) && offsets.numel() == N * (K / G), "scales/offsets must be [N, K/G]");
  auto out = at::empty({M, N}, x.options());
  auto xq = at::empty({M, K}, x.options().dtype(at::kChar));
  auto xd = at::empty({M, K / G}, x.options()), xs = at::empty({M, K / G}, x.options());
  quantize_rows(x.data_ptr<float>(), M, K, G, xq.data_ptr<int8_t>(), xd.data_ptr<float>(), xs.data_ptr<float>());
  Args a{qweight.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
         reinterpret_cast<const uint16_t*>(offsets.data_ptr<at::Half>()), xq.data_ptr<int8_t>(), xd.data_ptr<float>(),
         xs.data_ptr<float>(), out.data_ptr<float>(), N, K, G};
  // Activation rows in blocks that stay in L2; weight rows split over threads (torch's pool, so no second
  // OpenMP runtime spins against it). Tiles of 4 weight rows are the unit of work.
  const int64_t MB = 32, ntile = (N + 3) / 4;
  for (int64_t mb = 0; mb < M; mb += MB) {
    const int64_t me = std::min(M, mb + MB);
    at::parallel_for(0, ntile, 8, [&](int64_t t0, int64_t t1) {
      const int64_t n0 = t0 * 4, n1 = std::min(N, t1 * 4);
      int64_t m = mb;
      for (; m + 4 <= me; m += 4) rows<4>(a, m, n0, n1);
      for (; m < me; m++) rows<1>(a, m, n0, n1);
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(phiforge, m) {
  m.def("int4_mm(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_size) -> Tensor");
}
TORCH_LIBRARY_IMPL(phiforge, CPU, m) { m.impl("int4_mm", &int4_mm); }
