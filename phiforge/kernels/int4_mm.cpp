// Weight-only int4 matmul for x86 AVX2 CPUs: out[M, Np] = x[M, K] @ dequant(W)[Np, K]^T.
//
// Tiled layout (phiforge/quant.py `tile_int4`), like llama.cpp's repacked q4_0 (read, not copied): weight rows in
// tiles of 4. wt: for tile t and 32-weight block b, 64 contiguous bytes (one cache line) hold the four rows' 16-byte
// blocks, row-major; within a block byte j = q[j] | q[j + 16] << 4 (the ggml block_q4_0 nibble order), q in 0..15.
// A tile is therefore ONE sequential stream (the row layout was four streams plus scale reads per tile, and the
// kernel stalled on loads at half of llama.cpp's bandwidth). sm: [Np/4, K/G, 8] fp16, per tile and group the four
// rows' scales s then their offsets m; w = s * q + m (symmetric quantization is m = -8 s).
//
// Like llama.cpp, activations are quantized to int8 on the fly (here per weight group, absmax / 127) so the inner
// loop is vpmaddubsw (u8 x s8 -> s16). One ymm holds two weight rows' 16-byte blocks, so one and-mask gives 16 low
// nibbles of each row and a shift + mask their 16 high nibbles; the activations' two 16-byte halves are broadcast to
// both lanes and shared by all four rows. Products are summed in s16 for at most 4 blocks (128 weights):
// 8 pair-sums of |q x| <= 15 * 127, at most 30480 < 32767, so nothing saturates; then widened to s32.
// The offset term m * sum(x) is computed from the fp32 activations, exactly.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Args {
  const uint8_t* w; const uint16_t* sm;               // tiled packed weight, tiled fp16 scales + offsets
  const int8_t* xq; const float* xd; const float* xs;  // int8 activations, their scales, fp32 group sums
  float* out; int64_t N, K, G;                         // N: rows of wt (a multiple of 4)
};

// R activation rows x one tile of 4 weight rows. acc01 holds rows 0 and 1 of the tile (128-bit lanes), acc23 rows
// 2 and 3; each lane keeps 4 fp32 partial sums.
template <int R>
void tile(const Args& a, int64_t m0, int64_t t) {
  const int64_t ng = a.K / a.G, bpg = a.G / 32, nb = a.K / 32;
  const uint8_t* w = a.w + t * nb * 64;
  const uint16_t* sm = a.sm + t * ng * 8;
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i lo_rows = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), hi_rows = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  __m256 acc01[R], acc23[R];
  __m128 off[R];
  for (int r = 0; r < R; r++) acc01[r] = acc23[r] = _mm256_setzero_ps(), off[r] = _mm_setzero_ps();
  for (int64_t g = 0; g < ng; g++) {
    __m256i i01[R], i23[R];  // s32 sums of the group
    for (int r = 0; r < R; r++) i01[r] = i23[r] = _mm256_setzero_si256();
    for (int64_t b0 = 0; b0 < bpg; b0 += 4) {
      __m256i s01[R], s23[R];  // s16 sums of up to 4 blocks
      for (int r = 0; r < R; r++) s01[r] = s23[r] = _mm256_setzero_si256();
      const int64_t b1 = std::min(bpg, b0 + 4);
      for (int64_t b = b0; b < b1; b++) {
        const uint8_t* p = w + (g * bpg + b) * 64;
        const __m256i v01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i v23 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
        const __m256i l01 = _mm256_and_si256(v01, mask), h01 = _mm256_and_si256(_mm256_srli_epi16(v01, 4), mask);
        const __m256i l23 = _mm256_and_si256(v23, mask), h23 = _mm256_and_si256(_mm256_srli_epi16(v23, 4), mask);
        const int64_t k = (g * bpg + b) * 32;
        for (int r = 0; r < R; r++) {
          const int8_t* xp = a.xq + (m0 + r) * a.K + k;
          const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xp)));
          const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xp + 16)));
          s01[r] = _mm256_add_epi16(s01[r], _mm256_add_epi16(_mm256_maddubs_epi16(l01, xl), _mm256_maddubs_epi16(h01, xh)));
          s23[r] = _mm256_add_epi16(s23[r], _mm256_add_epi16(_mm256_maddubs_epi16(l23, xl), _mm256_maddubs_epi16(h23, xh)));
        }
      }
      for (int r = 0; r < R; r++) {
        i01[r] = _mm256_add_epi32(i01[r], _mm256_madd_epi16(s01[r], ones));
        i23[r] = _mm256_add_epi32(i23[r], _mm256_madd_epi16(s23[r], ones));
      }
    }
    // Group epilogue: lane-wise weight scales [s0 x4 | s1 x4] and [s2 x4 | s3 x4], times the activation scale.
    const __m128 s4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm + g * 8)));
    const __m128 m4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm + g * 8 + 4)));
    const __m256 s01 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s4), lo_rows);
    const __m256 s23 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s4), hi_rows);
    for (int r = 0; r < R; r++) {
      const __m256 dx = _mm256_set1_ps(a.xd[(m0 + r) * ng + g]);
      acc01[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i01[r]), _mm256_mul_ps(s01, dx), acc01[r]);
      acc23[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i23[r]), _mm256_mul_ps(s23, dx), acc23[r]);
      off[r] = _mm_fmadd_ps(m4, _mm_set1_ps(a.xs[(m0 + r) * ng + g]), off[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    // hadd twice: lane 0 of each 128-bit half = rows (0, 2) low half, (1, 3) high half; interleave to rows 0..3.
    __m256 h = _mm256_hadd_ps(acc01[r], acc23[r]);
    h = _mm256_hadd_ps(h, h);
    const __m128 rows4 = _mm_unpacklo_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(a.out + (m0 + r) * a.N + t * 4, _mm_add_ps(rows4, off[r]));
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
  // Activation rows in blocks that stay in L2; tiles split over threads (torch's pool, so no second OpenMP
  // runtime spins against it).
  const int64_t MB = 32, ntile = N / 4;
  for (int64_t mb = 0; mb < M; mb += MB) {
    const int64_t me = std::min(M, mb + MB);
    at::parallel_for(0, ntile, 8, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) {
        int64_t m = mb;
        for (; m + 4 <= me; m += 4) tile<4>(a, m, t);
        for (; m < me; m++) tile<1>(a, m, t);
      }
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(phiforge, m) {
  m.def("int4_mm(Tensor x, Tensor wt, Tensor sm, int group_size) -> Tensor");
}
TORCH_LIBRARY_IMPL(phiforge, CPU, m) { m.impl("int4_mm", &int4_mm); }
