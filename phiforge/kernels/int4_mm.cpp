// Weight-only int4 matmul for x86 AVX2 CPUs: out[M, Np] = x[M, K] @ dequant(W)[Np, K]^T.
//
// Tiled layout (phiforge/quant.py `tile_int4`), like llama.cpp's repacked q4_0_4x8 (read, not copied): weight rows in
// tiles of 4. wt: for tile t and 32-weight block b, 64 contiguous bytes (one cache line) hold bytes 0..7 of the four
// rows' 16-byte blocks, then bytes 8..15 of the four rows; within a row's block byte j = q[j] | q[j + 16] << 4 (the
// ggml block_q4_0 nibble order), q in 0..15. A tile is ONE sequential stream (the plain row layout's four streams
// plus scale reads stalled on loads at half of llama.cpp's bandwidth), and one ymm of nibbles holds 8 weights of each of the 4 rows,
// so each activation row needs a single s16 accumulator per tile: with 4 activation rows, 4 accumulators, 4
// unpacked weight registers and the fp32 sums fit AVX2's 16 registers (the 16-byte-per-row layout needed two
// accumulators per row and spilled). sm: [Np/4, K/G, 8] fp16, per tile and group the four rows' scales s then their
// offsets m; w = s * q + m (symmetric quantization is m = -8 s).
//
// Like llama.cpp, activations are quantized to int8 on the fly (here per weight group, absmax / 127) so the inner
// loop is vpmaddubsw (u8 x s8 -> s16) against 8 activation bytes broadcast to all four rows. Per 32-weight block each
// s16 lane gains 4 pair-sums of |q x| <= 15 * 127 * 2; two blocks reach at most 30480 < 32767, so nothing saturates;
// then widened to s32 (vpmaddwd) and, once per group, to fp32. The offset term m * sum(x) uses the exact fp32 sums.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>
#include "simd.h"
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

using phiforge_simd::hsum;

struct Args {
  const uint8_t* w; const uint16_t* sm;               // tiled packed weight, tiled fp16 scales + offsets
  const int8_t* xq; const float* xd; const float* xs;  // int8 activations, their scales, fp32 group sums
  float* out; int64_t N, K, G;                         // N: rows of wt (a multiple of 4)
};

// R activation rows x one tile of 4 weight rows. G > 0: the group size known at compile time (loops unroll); G == 0:
// any multiple of 32 up to 256, read from the arguments. acc[r] lanes are [w0 w0 w1 w1 | w2 w2 w3 w3].
template <int R, int G>
void tile(const Args& a, int64_t m0, int64_t t) {
  const int64_t gs = G ? G : a.G, bpg = gs / 32, ng = a.K / gs, nb = a.K / 32;
  const uint8_t* w = a.w + t * nb * 64;
  const uint16_t* sm = a.sm + t * ng * 8;
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i lo4 = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), hi4 = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
  const __m256 even = _mm256_castsi256_ps(_mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0));
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; g++) {
    __m256i i32[R];  // s32 sums of the group
    for (int r = 0; r < R; r++) i32[r] = _mm256_setzero_si256();
    for (int64_t st = 0; st < bpg; st += 2) {  // s16 stages of at most 2 blocks
      // A trip count the compiler sees when G is known (GCC otherwise keeps the s16 sums in memory: ~15 % slower).
      const int64_t nst = G % 64 == 0 && G > 0 ? 2 : std::min<int64_t>(2, bpg - st);
      __m256i s16[R];
      for (int r = 0; r < R; r++) s16[r] = _mm256_setzero_si256();
      for (int64_t b = g * bpg + st; b < g * bpg + st + nst; b++) {
        const uint8_t* p = w + b * 64;
        const __m256i vA = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));       // block bytes 0..7
        const __m256i vB = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));  // block bytes 8..15
        const __m256i lA = _mm256_and_si256(vA, mask), hA = _mm256_and_si256(_mm256_srli_epi16(vA, 4), mask);
        const __m256i lB = _mm256_and_si256(vB, mask), hB = _mm256_and_si256(_mm256_srli_epi16(vB, 4), mask);
        for (int r = 0; r < R; r++) {
          // lA: weights 0..7, lB: 8..15, hA: 16..23, hB: 24..31 of the block, each against its 8 activations.
          const int8_t* xp = a.xq + (m0 + r) * a.K + b * 32;
          const auto x8 = [xp](int k) {  // 8 activation bytes to all four lanes (__m128i loads may alias)
            return _mm256_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(xp + k)));
          };
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(lA, x8(0)));
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(lB, x8(8)));
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(hA, x8(16)));
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(hB, x8(24)));
          // Without this GCC 12 hoists every row's products ahead of the adds and spills them: 17 % slower.
          __asm__ volatile("" : "+x"(s16[r]));
        }
      }
      for (int r = 0; r < R; r++) i32[r] = _mm256_add_epi32(i32[r], _mm256_madd_epi16(s16[r], ones));
    }
    // Group epilogue: scales [s0 s0 s1 s1 | s2 s2 s3 s3] times the activation scale; offsets only in even lanes, so
    // the final pairwise add counts each once.
    const __m256 sm8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sm + g * 8)));
    const __m256 sv = _mm256_permutevar8x32_ps(sm8, lo4), mv = _mm256_and_ps(even, _mm256_permutevar8x32_ps(sm8, hi4));
    for (int r = 0; r < R; r++) {
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32[r]), _mm256_mul_ps(sv, _mm256_set1_ps(a.xd[(m0 + r) * ng + g])),
                               acc[r]);
      acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(a.xs[(m0 + r) * ng + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    const __m256 h = _mm256_hadd_ps(acc[r], acc[r]);  // [w0 w1 w0 w1 | w2 w3 w2 w3]
    _mm_storeu_ps(a.out + (m0 + r) * a.N + t * 4, _mm_movelh_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
}

// Activation rows in blocks of 32 that stay in L2 (16, 64 and 128 measured slower); tiles split over threads (torch's
// pool, so no second OpenMP runtime spins against it). 4 activation rows per tile call (3 measured 5 % slower).
template <int G>
void run(const Args& a, int64_t M) {
  const int64_t MB = 32, ntile = a.N / 4;
  for (int64_t mb = 0; mb < M; mb += MB) {
    const int64_t me = std::min(M, mb + MB);
    at::parallel_for(0, ntile, 8, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) {
        int64_t m = mb;
        for (; m + 4 <= me; m += 4) tile<4, G>(a, m, t);
        for (; m < me; m++) tile<1, G>(a, m, t);
      }
    });
  }
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

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& sm, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(wt.scalar_type() == at::kByte && wt.is_contiguous() && wt.dim() == 2, "wt must be contiguous uint8");
  TORCH_CHECK(sm.scalar_type() == at::kHalf && sm.is_contiguous(), "sm must be contiguous fp16");
  const int64_t M = x.size(0), K = x.size(1), N = wt.size(0), G = group_size;
  TORCH_CHECK(G % 32 == 0 && G <= 256 && K % G == 0 && wt.size(1) == K / 2, "bad int4 shapes or group size");
  TORCH_CHECK(N % 4 == 0 && sm.numel() == N * (K / G) * 2, "wt must have 4-row tiles and sm be [N/4, K/G, 8]");
  auto out = at::empty({M, N}, x.options());
  auto xq = at::empty({M, K}, x.options().dtype(at::kChar));
  auto xd = at::empty({M, K / G}, x.options()), xs = at::empty({M, K / G}, x.options());
  quantize_rows(x.data_ptr<float>(), M, K, G, xq.data_ptr<int8_t>(), xd.data_ptr<float>(), xs.data_ptr<float>());
  Args a{wt.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(sm.data_ptr<at::Half>()), xq.data_ptr<int8_t>(),
         xd.data_ptr<float>(), xs.data_ptr<float>(), out.data_ptr<float>(), N, K, G};
  switch (G) {  // the usual group sizes get unrolled loops; any other multiple of 32 the generic path
    case 32: run<32>(a, M); break;
    case 64: run<64>(a, M); break;
    case 128: run<128>(a, M); break;
    case 256: run<256>(a, M); break;
    default: run<0>(a, M);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(phiforge, m) {
  m.def("int4_mm(Tensor x, Tensor wt, Tensor sm, int group_size) -> Tensor");
}
TORCH_LIBRARY_IMPL(phiforge, CPU, m) { m.impl("int4_mm", &int4_mm); }
