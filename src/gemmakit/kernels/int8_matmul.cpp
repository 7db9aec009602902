// y = x W^T for weights stored as int8 with one float16 scale per group of 32 input features
// (llama.cpp's Q8_0 layout).
//
// Decoding multiplies one or a few activation rows by every weight, so the time is the time to
// stream the weights from memory: one byte per weight here against two for bfloat16 and four for
// float32. Where the CPU has VNNI the activations are rounded to int8 too, at every row count, and
// every output is formed by one formula (the VNNI and AMX loops further down): a row's result does
// not depend on the rows beside it. Without VNNI (AVX2 CPUs) the FMA loop keeps float32
// activations for a few rows, and dense blocks take many.

// Only the headers the kernels use: <torch/extension.h> (pybind11 and all of torch's C++ API)
// takes ~20 s of a first run's build, these ~4 s.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <sys/syscall.h>
#include <unistd.h>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kPrefetch = 4096;  // bytes ahead of the weights being read
#ifdef __AVX512F__
constexpr bool kWide = true;  // 512-bit vectors (32 registers): the FMA loop takes tiles of 8 activation rows
#else
constexpr bool kWide = false;
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define GEMMAKIT_AVX2 1
#endif

#ifdef __AVX512F__
// NB weight rows times MT activation rows, over all groups; NB * MT independent accumulators keep
// the FMA units busy while the weights stream in. The work is bound by the two vector ports, so
// every uop counts: the float16 scales of 16 groups are converted in one instruction and read
// back as memory broadcasts (load ports, not vector ports). Each group's scale multiplies its
// weights as they are converted, whatever the tile (scaling a row's dot product instead saves an
// op at 1-2 rows, but a row's result would then depend on the tile it came in: issue 18). Only
// CPUs without VNNI run this loop (AVX-512 before Cascade Lake).
template <int NB, int MT>
inline void block(const float* x, const int8_t* w, const c10::Half* s, float* y,
                  int64_t N, int64_t K, int64_t n, int64_t m0) {
  const int64_t G = K / kGroup;
  __m512 acc[NB][MT];
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_setzero_ps();
  alignas(64) float scales[NB][16];
  for (int64_t g0 = 0; g0 < G; g0 += 16) {
    const int64_t gn = std::min<int64_t>(16, G - g0);
    const __mmask16 mask = static_cast<__mmask16>((1u << gn) - 1);
    for (int r = 0; r < NB; ++r)
      _mm512_store_ps(scales[r], _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, s + (n + r) * G + g0)));
    for (int64_t j = 0; j < gn; ++j) {
      const int64_t g = g0 + j;
      __m512 w0[NB], w1[NB], scale[NB];
      for (int r = 0; r < NB; ++r) {
        const int8_t* wg = w + (n + r) * K + g * kGroup;
        _mm_prefetch(reinterpret_cast<const char*>(wg) + kPrefetch, _MM_HINT_T0);
        scale[r] = _mm512_set1_ps(scales[r][j]);
        w0[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg))));
        w1[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 16))));
        w0[r] = _mm512_mul_ps(scale[r], w0[r]);
        w1[r] = _mm512_mul_ps(scale[r], w1[r]);
      }
      for (int i = 0; i < MT; ++i) {
        const float* xg = x + (m0 + i) * K + g * kGroup;
        const __m512 x0 = _mm512_loadu_ps(xg), x1 = _mm512_loadu_ps(xg + 16);
        for (int r = 0; r < NB; ++r) acc[r][i] = _mm512_fmadd_ps(w1[r], x1, _mm512_fmadd_ps(w0[r], x0, acc[r][i]));
      }
    }
  }
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MT; ++i) y[(m0 + i) * N + n + r] = _mm512_reduce_add_ps(acc[r][i]);
}

#elif defined(GEMMAKIT_AVX2)
// The FMA loop on 256-bit vectors, for CPUs without AVX-512 (AMD before Zen 4, most Intel
// desktops). 16 registers: NB * MT accumulators, NB converted weight chunks, one activation chunk.
// Each group's scale multiplies its weights as they are converted, whatever the tile: a row's
// result is formed the same way in every batch it comes in, as in the AVX-512 loop above.
template <int NB, int MT>
inline void block(const float* x, const int8_t* w, const c10::Half* s, float* y,
                  int64_t N, int64_t K, int64_t n, int64_t m0) {
  const int64_t G = K / kGroup;
  __m256 acc[NB][MT];
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MT; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 scale[NB];
    for (int r = 0; r < NB; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (n + r) * K + g * kGroup) + kPrefetch, _MM_HINT_T0);
      scale[r] = _mm256_set1_ps(_cvtsh_ss(s[(n + r) * G + g].x));
    }
    for (int c = 0; c < kGroup; c += 8) {
      __m256 wv[NB];
      for (int r = 0; r < NB; ++r)
        wv[r] = _mm256_mul_ps(scale[r], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + (n + r) * K + g * kGroup + c)))));
      for (int i = 0; i < MT; ++i) {
        const __m256 xv = _mm256_loadu_ps(x + (m0 + i) * K + g * kGroup + c);
        for (int r = 0; r < NB; ++r) acc[r][i] = _mm256_fmadd_ps(wv[r], xv, acc[r][i]);
      }
    }
  }
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MT; ++i) {
      const __m128 four = _mm_add_ps(_mm256_castps256_ps128(acc[r][i]), _mm256_extractf128_ps(acc[r][i], 1));
      const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
      y[(m0 + i) * N + n + r] = _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
    }
}

#endif

#if defined(__AVX512F__) || defined(GEMMAKIT_AVX2)
template <int NB>
inline void block_rows(const float* x, const int8_t* w, const c10::Half* s, float* y,
                       int64_t M, int64_t N, int64_t K, int64_t n) {
  // The NB weight rows (NB * K bytes) stay in L1 while the activation rows pass over them in tiles
  // of as many rows as the registers hold accumulators for: 8 (NB <= 2), 4, 2, 1 with 512-bit
  // vectors; 4 (NB <= 2), 1 with 256-bit ones.
  int64_t m0 = 0;
  if constexpr (kWide && NB <= 2)
    for (; m0 + 8 <= M; m0 += 8) block<NB, 8>(x, w, s, y, N, K, n, m0);
  if constexpr (kWide || NB <= 2)
    for (; m0 + 4 <= M; m0 += 4) block<NB, 4>(x, w, s, y, N, K, n, m0);
  if constexpr (kWide)
    for (; m0 + 2 <= M; m0 += 2) block<NB, 2>(x, w, s, y, N, K, n, m0);
  for (; m0 < M; ++m0) block<NB, 1>(x, w, s, y, N, K, n, m0);
}
#endif

// Rows n0..n1 of y (M, N) = x (M, K) * w (N, K)^T, scales s (N, K / 32).
void rows(const float* x, const int8_t* w, const c10::Half* s, float* y,
          int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
#if defined(__AVX512F__) || defined(GEMMAKIT_AVX2)
  int64_t n = n0;
  if (M >= (kWide ? 8 : 4))
    for (; n + 2 <= n1; n += 2) block_rows<2>(x, w, s, y, M, N, K, n);
  else
    for (; n + 4 <= n1; n += 4) block_rows<4>(x, w, s, y, M, N, K, n);
  for (; n < n1; ++n) block_rows<1>(x, w, s, y, M, N, K, n);
#else
  // Portable path: the compiler vectorizes the inner loop (-fopenmp-simd).
  const int64_t G = K / kGroup;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const int8_t* wg = w + n * K + g * kGroup;
        const float* xg = x + m * K + g * kGroup;
        float t = 0.f;
#pragma omp simd reduction(+ : t)
        for (int64_t k = 0; k < kGroup; ++k) t += xg[k] * static_cast<float>(wg[k]);
        acc += static_cast<float>(s[n * G + g]) * t;
      }
      y[m * N + n] = acc;
    }
  }
#endif
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
// -- int8 activations: one formula for every number of rows (AVX512-VNNI, AMX below) ---------------
// The activations are quantized like the weights (int8, a float scale per group of 32: llama.cpp's
// Q8_0 x Q8_0), row by row, at every batch size: a row's output then does not depend on the rows
// beside it (a request's greedy text on what else is decoding). Each group's dot product d is an
// exact int32, and every loop forms output (m, n) as the same float sequence,
//   acc = fma(float(d_g) * xs_{m,g}, ws_{n,g}, acc) for g = 0 .. G - 1 in order,
// so the VNNI and AMX loops, and any split of the work between threads, give the same bits.
// VPDPBUSD wants one unsigned operand: the weights get +128 (a XOR of the sign bit), and each
// group's dot product starts from -128 * (sum of its activations).

struct QuantizedRows {
  std::vector<int8_t> q;       // (M, K)
  std::vector<float> scale;    // (M, G): amax / 127 of each group
  std::vector<int32_t> start;  // (M, pairs of groups, 16): -128 * a group's sum, in lane 0 (even group) or 8 (odd)
};

inline int64_t group_pairs(int64_t K) { return (K / kGroup + 1) / 2; }

inline QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K) {
  const int64_t G = K / kGroup, P = group_pairs(K);
  QuantizedRows out{std::vector<int8_t>(M * K), std::vector<float>(M * G), std::vector<int32_t>(M * P * 16, 0)};
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {  // each row on its own: any split, the same values
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t g = 0; g < G; ++g) {
        const float* xg = x + m * K + g * kGroup;
        const __m512 a = _mm512_loadu_ps(xg), b = _mm512_loadu_ps(xg + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));  // round to nearest even
        const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + m * K + g * kGroup), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + m * K + g * kGroup + 16), _mm512_cvtsepi32_epi8(qb));
        out.scale[m * G + g] = amax / 127.f;
        out.start[(m * P + g / 2) * 16 + 8 * (g % 2)] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
      }
    }
  });
  return out;
}

// v[k]: input k's partial sums, lanes 0-7 of a first group, 8-15 of a second. Sums each half in
// three rounds of pairwise adds (integers: exact in any order); input k's totals land in lane
// kSlot[k] of `first` and `second`.
constexpr int kSlot[16] = {0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15};

inline void sum_halves(const __m512i v[16], __m512i& first, __m512i& second) {
  __m512i h4[8], h2[4], h1[2];
  for (int k = 0; k < 8; ++k)  // 128-bit blocks [first, first, second, second] -> 4 lanes a half, two inputs
    h4[k] = _mm512_add_epi32(_mm512_shuffle_i32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_i32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int k = 0; k < 4; ++k)  // 2 lanes, within each block
    h2[k] = _mm512_add_epi32(_mm512_unpacklo_epi64(h4[2 * k], h4[2 * k + 1]), _mm512_unpackhi_epi64(h4[2 * k], h4[2 * k + 1]));
  for (int k = 0; k < 2; ++k) {  // 1 lane
    const __m512 a = _mm512_castsi512_ps(h2[2 * k]), b = _mm512_castsi512_ps(h2[2 * k + 1]);
    h1[k] = _mm512_add_epi32(_mm512_castps_si512(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))),
                             _mm512_castps_si512(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))));
  }
  // h1[0]'s blocks: inputs 0 2 4 6 (first half), the same (second), 1 3 5 7 (first), (second); h1[1]: 8-15
  first = _mm512_shuffle_i32x4(h1[0], h1[1], _MM_SHUFFLE(2, 0, 2, 0));
  second = _mm512_shuffle_i32x4(h1[0], h1[1], _MM_SHUFFLE(3, 1, 3, 1));
}

// Weight rows n .. n + 15, one a lane (rows from n + `rows` on repeat the last row; their outputs
// are not stored), times activation rows m0 .. m0 + MT - 1, two groups (64 bytes) at a time.
template <int MT>
inline void vnni_block(const QuantizedRows& xq, const int8_t* w, const c10::Half* s, float* y,
                       int64_t N, int64_t K, int64_t n, int rows, int64_t m0) {
  const int64_t G = K / kGroup, P = group_pairs(K);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* wk[16];  // sum_halves' input k: weight row n + kSlot[k], the lane its totals land in
  for (int k = 0; k < 16; ++k) wk[k] = w + (n + std::min(kSlot[k], rows - 1)) * K;
  // lane i: the offset of row n + i's scales, in float16s; a gather reads two groups' at once
  const __m512i scale_at = _mm512_mullo_epi32(
      _mm512_min_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(rows - 1)),
      _mm512_set1_epi32(static_cast<int>(G)));
  __m512 acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 2) {
    const bool pair = g + 1 < G;  // K an odd number of groups: the last one alone, the rest zero
    const __mmask64 bytes = pair ? ~__mmask64{0} : __mmask64{0xFFFFFFFF};
    __m512i wv[16];
    for (int k = 0; k < 16; ++k) {
      _mm_prefetch(reinterpret_cast<const char*>(wk[k] + 16 * K + g * kGroup), _MM_HINT_T1);  // the next block
      wv[k] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(bytes, wk[k] + g * kGroup), flip);
    }
    __m512 ws0, ws1;  // lane i: row n + i's scale of group g, g + 1
    if (pair) {
      const __m512i two = _mm512_i32gather_epi32(scale_at, reinterpret_cast<const int*>(s + n * G + g), 2);
      ws0 = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(two));
      ws1 = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(two, 16)));
    } else {  // a gather of two would read past the last row's scales
      alignas(64) float one[16];
      for (int i = 0; i < 16; ++i) one[i] = static_cast<float>(s[(n + std::min(i, rows - 1)) * G + g]);
      ws0 = ws1 = _mm512_load_ps(one);
    }
    for (int i = 0; i < MT; ++i) {
      const int64_t m = m0 + i;
      const __m512i xv = _mm512_maskz_loadu_epi8(bytes, xq.q.data() + m * K + g * kGroup);
      const __m512i start = _mm512_loadu_si512(xq.start.data() + (m * P + g / 2) * 16);
      __m512i dots[16];
      for (int k = 0; k < 16; ++k) dots[k] = _mm512_dpbusd_epi32(start, wv[k], xv);
      __m512i d0, d1;
      sum_halves(dots, d0, d1);
      const float* xs = xq.scale.data() + m * G + g;
      acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(xs[0])), ws0, acc[i]);
      if (pair) acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(xs[1])), ws1, acc[i]);
    }
  }
  const __mmask16 out = static_cast<__mmask16>((1u << rows) - 1);
  for (int i = 0; i < MT; ++i) _mm512_mask_storeu_ps(y + (m0 + i) * N + n, out, acc[i]);
}

// Weight rows n0..n1 (n0 a multiple of 16; n1 one too, or N) against every activation row.
void vnni_rows(const QuantizedRows& xq, const int8_t* w, const c10::Half* s, float* y,
               int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, n1 - n));
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) vnni_block<4>(xq, w, s, y, N, K, n, rows, m0);
    for (; m0 + 2 <= M; m0 += 2) vnni_block<2>(xq, w, s, y, N, K, n, rows, m0);
    for (; m0 < M; ++m0) vnni_block<1>(xq, w, s, y, N, K, n, rows, m0);
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define GEMMAKIT_AMX 1
// -- The same int8 x int8 products on the AMX tile unit (Sapphire Rapids and later) ---------------
// One TDPBSSD multiplies a 16 x 32 tile of weights (16 weight rows, one group, read in place with
// the row stride) by 16 activation rows' group, packed as the unit wants them (4 bytes of each
// row side by side), into 16 x 16 int32 sums: 8192 multiply-adds for one instruction. What is
// left for the vector units is each group's scaling, so the loop runs at memory speed where the
// VNNI loop was bound by arithmetic.

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out the tile registers only to a process that asks (once, for all its threads).
bool amx_granted() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return granted;
}

struct TiledRows {
  std::vector<int8_t> b;     // (chunks of 16 rows, G, 8, 16 rows x 4 bytes), rows past M zero
  std::vector<float> scale;  // (chunks, G, 16)
  int64_t chunks;
};

inline TiledRows tile_rows(const QuantizedRows& xq, int64_t M, int64_t K) {
  const int64_t G = K / kGroup, chunks = (M + 15) / 16;
  TiledRows out{std::vector<int8_t>(chunks * G * 512, 0), std::vector<float>(chunks * G * 16, 0.f), chunks};
  for (int64_t m = 0; m < M; ++m) {
    const int64_t c = m / 16, i = m % 16;
    for (int64_t g = 0; g < G; ++g) {
      int8_t* b = out.b.data() + (c * G + g) * 512 + 4 * i;
      const int8_t* q = xq.q.data() + m * K + g * kGroup;
      for (int64_t kk = 0; kk < 8; ++kk) std::memcpy(b + 64 * kk, q + 4 * kk, 4);
      out.scale[(c * G + g) * 16 + i] = xq.scale[m * G + g];
    }
  }
  return out;
}

// The sums of up to 4 groups at once, each in its own tile (tmm0-3, with two pairs of operand
// tiles taking turns), so the unit works on one while the next loads; then stored to out
// (count, 16, 16). (The tile intrinsics paste register numbers into assembly: literals only.)
#define GEMMAKIT_GROUP_TILE(T, A, B, wg, bg) \
  _tile_zero(T);                             \
  _tile_loadd(A, wg, K);                     \
  _tile_loadd(B, bg, 64);                    \
  _tile_dpbssd(T, A, B)

inline void group_sums(const int8_t* w, int64_t K, const int8_t* b, int count, int32_t* out) {
  GEMMAKIT_GROUP_TILE(0, 4, 6, w, b);
  if (count > 1) { GEMMAKIT_GROUP_TILE(1, 5, 7, w + kGroup, b + 512); }
  if (count > 2) { GEMMAKIT_GROUP_TILE(2, 4, 6, w + 2 * kGroup, b + 1024); }
  if (count > 3) { GEMMAKIT_GROUP_TILE(3, 5, 7, w + 3 * kGroup, b + 1536); }
  _tile_stored(0, out, 64);
  if (count > 1) _tile_stored(1, out + 256, 64);
  if (count > 2) _tile_stored(2, out + 512, 64);
  if (count > 3) _tile_stored(3, out + 768, 64);
}

// Weight rows n0..n1 (whole blocks of 16) against every activation row.
void amx_rows(const TiledRows& xt, const int8_t* w, const c10::Half* s, float* y,
              int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  const int64_t G = K / kGroup;
  TileConfig cfg;  // tmm0-3: sums (16 x 16 int32); tmm4-5: weights (16 x 32 bytes); tmm6-7: activations (8 x 64)
  for (int i = 0; i < 4; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
  for (int i = 4; i < 6; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 32;
  for (int i = 6; i < 8; ++i) cfg.rows[i] = 8, cfg.colsb[i] = 64;
  _tile_loadconfig(&cfg);  // per thread: tiles are registers
  alignas(64) int32_t sums[2][4][16][16];
  std::vector<float> ws(16 * G);
  // An output larger than L2 (prefill) is streamed past the caches: it would leave them before it
  // is read, and writing it through them reads every line first (M = 512, N = 2048, 2 threads:
  // 1.3 instead of 1.6 ms). Rows of y are 64-byte aligned where N is a multiple of 16.
  const bool stream = N % 16 == 0 && M * N * int64_t{sizeof(float)} >= (int64_t{1} << 21);
  const __m512i down = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
  for (int64_t n = n0; n < n1; n += 16) {
    for (int64_t r = 0; r < 16; ++r)
      for (int64_t g = 0; g < G; g += 16) {
        const __mmask16 some = static_cast<__mmask16>((1u << std::min<int64_t>(16, G - g)) - 1);
        _mm512_mask_storeu_ps(ws.data() + r * G + g, some, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(some, s + (n + r) * G + g)));
      }
    const int8_t* wn = w + n * K;
    for (int64_t c = 0; c < xt.chunks; ++c) {
      const int8_t* bc = xt.b.data() + c * G * 512;
      const float* xsc = xt.scale.data() + c * G * 16;
      __m512 acc[16];
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
      // Software pipeline: the tiles of groups g + 4 .. g + 7 are under way while the vector
      // units scale and add the sums of groups g .. g + 3.
      group_sums(wn, K, bc, static_cast<int>(std::min<int64_t>(4, G)), &sums[0][0][0][0]);
      for (int64_t g = 0; g < G; g += 4) {
        const int count = static_cast<int>(std::min<int64_t>(4, G - g));
        if (g + 4 < G)
          group_sums(wn + (g + 4) * kGroup, K, bc + (g + 4) * 512, static_cast<int>(std::min<int64_t>(4, G - g - 4)),
                     &sums[(g / 4 + 1) % 2][0][0][0]);
        // The next block's 16 * K bytes, a share each round, into L2 only: in L1 they pushed out
        // the activation tiles of a second chunk (head, 32 rows: 30 against 17 ms; 16 rows: 12.5
        // against 11.6).
        if (c == 0)
          for (int l = 0; l < 8 * count; ++l) _mm_prefetch(reinterpret_cast<const char*>(wn + 16 * K + g * 512 + 64 * l), _MM_HINT_T2);
        for (int j = 0; j < count; ++j) {
          const __m512 xs = _mm512_loadu_ps(xsc + (g + j) * 16);
          for (int r = 0; r < 16; ++r)
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[(g / 4) % 2][j][r])), xs),
                                     _mm512_set1_ps(ws[r * G + g + j]), acc[r]);
        }
      }
      // acc[r] holds column n + r for activation rows 16c ... 16c + 15
      alignas(64) float cols[16][16];  // [r][m], read back a row m (16 columns) at a time
      for (int r = 0; r < 16; ++r) _mm512_store_ps(cols[r], acc[r]);
      for (int64_t m = 0; m < std::min<int64_t>(16, M - 16 * c); ++m) {
        const __m512 row = _mm512_i32gather_ps(down, &cols[0][m], 4);
        if (stream)
          _mm512_stream_ps(y + (16 * c + m) * N + n, row);
        else
          _mm512_storeu_ps(y + (16 * c + m) * N + n, row);
      }
    }
  }
  if (stream) _mm_sfence();  // the streamed lines are in memory before the caller reads y
  _tile_release();
}
#endif

// The dense path's operand type: bfloat16 where the CPU multiplies it natively (AVX512-BF16; AMX
// implies it), else float32: without those units oneDNN's bfloat16 matmul runs ~6x slower than its
// float32 one (an AVX2 EPYC, 2 threads: 15 against 95 GFLOP/s).
#if defined(__AVX512F__) && defined(__AVX512BF16__)
using Dense = c10::BFloat16;
#else
using Dense = float;
#endif

// Rows of w, times their scales, as `Dense` (rows, K) in out.
void dequantize_rows(const int8_t* w, const c10::Half* s, Dense* out, int64_t rows, int64_t K) {
  const int64_t G = K / kGroup;
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const int8_t* wg = w + n * K + g * kGroup;
      Dense* og = out + n * K + g * kGroup;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
      const __m512 scale = _mm512_set1_ps(_cvtsh_ss(s[n * G + g].x));
      for (int h = 0; h < 2; ++h) {
        const __m512 v = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 16 * h)))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(og + 16 * h), (__m256i)_mm512_cvtneps_pbh(v));
      }
#elif defined(GEMMAKIT_AVX2)
      const __m256 scale = _mm256_set1_ps(_cvtsh_ss(s[n * G + g].x));
      for (int c = 0; c < kGroup; c += 8)
        _mm256_storeu_ps(og + c, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wg + c))))));
#else
      const float scale = static_cast<float>(s[n * G + g]);
      for (int64_t k = 0; k < kGroup; ++k) og[k] = Dense(scale * static_cast<float>(wg[k]));
#endif
    }
  }
}

}  // namespace

// The weight operand every entry point takes: int8 w (N, K) and its float16 scales s (N, K / 32).
void check_weights(const at::Tensor& w, const at::Tensor& s, int64_t K) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "w: contiguous int8 (N, K)");
  TORCH_CHECK(s.scalar_type() == at::kHalf && s.is_contiguous(), "s: contiguous float16 (N, K / 32)");
  TORCH_CHECK(w.size(1) == K && K % kGroup == 0, "w must be (N, K) with K a multiple of 32");
  TORCH_CHECK(s.numel() == w.size(0) * (K / kGroup), "s must hold N * K / 32 scales");
}

// y (M, N) = x (M, K) w^T for float32 x, split over the weight rows between torch's threads in
// blocks of `block` rows (the last one maybe short); each output is summed by one thread, in the
// same order whatever the split. `prepare(x, w, s, M, N, K)` readies the activations once and
// returns the work of one task, `work(y, n0, n1)`, which fills columns n0..n1 of y.
template <class Prepare>
at::Tensor over_weight_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t block, Prepare prepare) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 (M, K)");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_weights(w, s, K);
  const auto work = prepare(x.data_ptr<float>(), w.data_ptr<int8_t>(), s.data_ptr<c10::Half>(), M, N, K);
  auto y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  // A task of at least ~64 KiB of weights, in blocks of 4 rows: smaller ones cost more in scheduling than they save.
  const int64_t grain = std::max<int64_t>(4, 65536 / K / 4 * 4);
  at::parallel_for(0, (N + block - 1) / block, (grain + block - 1) / block,
                   [&](int64_t b0, int64_t b1) { work(yp, b0 * block, std::min(b1 * block, N)); });
  return y;
}

at::Tensor fma_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  return over_weight_rows(x, w, s, 1, [](const float* xp, const int8_t* wp, const c10::Half* sp,
                                         int64_t M, int64_t N, int64_t K) {
    return [=](float* yp, int64_t n0, int64_t n1) { rows(xp, wp, sp, yp, M, N, K, n0, n1); };
  });
}

// The same product for many activation rows (prefill, many streams) on CPUs without VNNI, where
// the FMA loop above runs out of arithmetic: each thread turns an L2-sized block of weight rows
// into `Dense` (bfloat16 or float32) and hands it to torch's dense matmul (oneDNN), with the
// activations in the same type.
at::Tensor dense_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "x: floating point (M, K)");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_weights(w, s, K);
  const auto xb = x.to(c10::CppTypeToScalarType<Dense>::value).contiguous();
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const int8_t* wp = w.data_ptr<int8_t>();
  const c10::Half* sp = s.data_ptr<c10::Half>();
  const int64_t G = K / kGroup;
  const int64_t chunk = std::max<int64_t>(32, (int64_t{1} << 19) / (int64_t{sizeof(Dense)} * K) / 32 * 32);  // ~512 KiB
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, chunk, [&](int64_t n0, int64_t n1) {
    // Worker threads do not inherit the caller's inference mode, so y (maybe an inference
    // tensor) is written through its pointer, not by a torch op.
    auto buf = at::empty({chunk, K}, xb.options());
    for (int64_t c = n0; c < n1; c += chunk) {
      const int64_t rows = std::min(chunk, n1 - c);
      dequantize_rows(wp + c * K, sp + c * G, buf.data_ptr<Dense>(), rows, K);
      const auto yc = at::mm(xb, buf.narrow(0, 0, rows).t()).to(at::kFloat).contiguous();  // (M, rows)
      for (int64_t m = 0; m < M; ++m) std::memcpy(yp + m * N + c, yc.data_ptr<float>() + m * rows, rows * sizeof(float));
    }
  });
  return y;
}

// Whether this build has the int8 dot-product path (AVX512-VNNI).
bool has_vnni() {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  return true;
#else
  return false;
#endif
}

// Whether this build has the tile loop (AMX-INT8), the OS lets this process use it, and
// GEMMAKIT_NO_AMX=1 does not turn it off (for a machine that advertises AMX and then faults on it).
bool has_amx() {
#ifdef GEMMAKIT_AMX
  static const bool off = [] { const char* v = std::getenv("GEMMAKIT_NO_AMX"); return v && std::string(v) == "1"; }();
  return !off && amx_granted();
#else
  return false;
#endif
}

at::Tensor amx_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
#ifdef GEMMAKIT_AMX
  TORCH_CHECK(amx_granted(), "the OS did not grant this process the AMX tile registers");
  return over_weight_rows(x, w, s, 16, [](const float* xp, const int8_t* wp, const c10::Half* sp,
                                          int64_t M, int64_t N, int64_t K) {
    QuantizedRows xq = quantize_rows(xp, M, K);
    TiledRows xt = tile_rows(xq, M, K);
    return [xq = std::move(xq), xt = std::move(xt), wp, sp, M, N, K](float* yp, int64_t n0, int64_t n1) {
      const int64_t tiles = n0 + (n1 - n0) / 16 * 16;  // a last block of fewer than 16 rows: VNNI, the same sums
      amx_rows(xt, wp, sp, yp, M, N, K, n0, tiles);
      vnni_rows(xq, wp, sp, yp, M, N, K, tiles, n1);
    };
  });
#else
  TORCH_CHECK(false, "built without AMX-INT8");
#endif
}

at::Tensor vnni_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  return over_weight_rows(x, w, s, 16, [](const float* xp, const int8_t* wp, const c10::Half* sp,
                                          int64_t M, int64_t N, int64_t K) {
    return [xq = quantize_rows(xp, M, K), wp, sp, M, N, K](float* yp, int64_t n0, int64_t n1) {
      vnni_rows(xq, wp, sp, yp, M, N, K, n0, n1);
    };
  });
#else
  TORCH_CHECK(false, "built without AVX512-VNNI");
#endif
}

// The index of each row's largest value, the first of equal ones and the first NaN where there is
// one (torch's max(-1).indices), for greedy decoding: torch's max with indices reads the 262k
// logits of a row at ~1 GB/s (3.5 ms for 16 rows); its max without them runs 8x faster. So: the
// maximum first, vectorized, then the first place it occurs.
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.size(1) > 0,
              "x: float32 (M, N) with unit stride along N, N > 0");
  const int64_t M = x.size(0), N = x.size(1), stride = x.stride(0);
  auto out = at::empty({M}, at::kLong);
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* r = xp + m * stride;
      float best = r[0];
      bool nan = false;
      int64_t n = 0;
#ifdef __AVX512F__
      __m512 vbest = _mm512_set1_ps(r[0]);
      __mmask16 vnan = 0;
      for (; n + 16 <= N; n += 16) {
        const __m512 v = _mm512_loadu_ps(r + n);
        vnan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vbest = _mm512_max_ps(vbest, v);
      }
      best = _mm512_reduce_max_ps(vbest);
      nan = vnan != 0;
#endif
      for (; n < N; ++n) {
        nan |= std::isnan(r[n]);
        best = std::max(best, r[n]);
      }
      int64_t at = 0;
#ifdef __AVX512F__
      const __m512 target = _mm512_set1_ps(best);
      for (; at + 16 <= N; at += 16) {
        const __m512 v = _mm512_loadu_ps(r + at);
        const __mmask16 hit = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, target, _CMP_EQ_OQ);
        if (hit) {
          at += __builtin_ctz(hit);
          break;
        }
      }
#endif
      for (; at < N; ++at)
        if (nan ? std::isnan(r[at]) : r[at] == best) break;
      op[m] = at;
    }
  });
  return out;
}

// The op torch sees (eager and compiled alike, no Python in between). With VNNI: int8 activations
// at every row count (past fma_rows, 0 unless a test asks), on the VNNI loop, or the AMX loop from
// amx_rows rows where the CPU and OS offer it: the same bits, whichever runs. Without VNNI: the
// FMA loop up to fma_rows rows, the dense blocks above.
at::Tensor int8_group_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                             int64_t fma_rows, int64_t amx_rows, int64_t vnni_most_rows) {
  TORCH_CHECK(x.dim() == 2, "x: (M, K)");
  const int64_t M = x.size(0);
  if (M <= fma_rows) return fma_matmul(x.to(at::kFloat).contiguous(), w, s);
  if (!has_vnni()) return dense_matmul(x, w, s);
  // Without the tile unit, prompts' many rows on the dense blocks (kernels/__init__.py, VNNI_MOST_ROWS).
  if (!has_amx() && M > vnni_most_rows) return dense_matmul(x, w, s);
  const auto xf = x.to(at::kFloat).contiguous();
  return M >= amx_rows && has_amx() ? amx_matmul(xf, w, s) : vnni_matmul(xf, w, s);
}

// GEMMAKIT_NS: the ops' namespace, `gemmakit` for the build for this machine; tests build the
// same source for other instruction sets under other names (kernels/__init__.py, `variant`).
TORCH_LIBRARY(GEMMAKIT_NS, m) {
  m.def("int8_group_matmul(Tensor x, Tensor w, Tensor s, int fma_rows, int amx_rows, int vnni_most_rows) -> Tensor");
  // the loops one at a time and what the build has, for tests and `describe()`
  m.def("fma_matmul(Tensor x, Tensor w, Tensor s) -> Tensor");
  m.def("vnni_matmul(Tensor x, Tensor w, Tensor s) -> Tensor");
  m.def("amx_matmul(Tensor x, Tensor w, Tensor s) -> Tensor");
  m.def("dense_matmul(Tensor x, Tensor w, Tensor s) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("has_vnni() -> bool");
  m.def("has_amx() -> bool");
  m.def("softmax_cross_entropy_(Tensor(a!) z, Tensor targets, float softcap) -> Tensor");
  m.def("draw_rows(Tensor logits, Tensor rows, Tensor u, Tensor inv_t, Tensor min_p) -> Tensor");
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("geglu(Tensor gate, Tensor up) -> Tensor");
}

TORCH_LIBRARY_IMPL(GEMMAKIT_NS, CPU, m) {
  m.impl("int8_group_matmul", &int8_group_matmul);
  m.impl("fma_matmul", &fma_matmul);
  m.impl("vnni_matmul", &vnni_matmul);
  m.impl("amx_matmul", &amx_matmul);
  m.impl("dense_matmul", &dense_matmul);
  m.impl("argmax_rows", &argmax_rows);
}

// Ops without tensor arguments have no dispatch key to pick a backend by.
TORCH_LIBRARY_IMPL(GEMMAKIT_NS, CompositeExplicitAutograd, m) {
  m.impl("has_vnni", &has_vnni);
  m.impl("has_amx", &has_amx);
}
