// Row-wise softmax work: over a vocabulary of logits, the training loss's cross-entropy and its
// gradient, and sampling's draw of a token; over the KV cache, a decode step's attention.
//
// Cross-entropy of a block of logit rows and its gradient in the logits, in one pass over memory.
// gemmakit's training loss (src/gemmakit/loss.py) makes the logits a block of rows at a time.
// In torch ops each row then goes through memory five times (to float32, log-softmax's write,
// exp, scatter, back to the matmul dtype); here a row is copied once into a float32 buffer that
// stays in L1/L2, and the gradient overwrites the logits in place. 2 threads: 256 rows x 8192,
// 0.83 against 2.56 ms in bfloat16; 128 rows of Gemma's 262,144-token vocabulary, 12 against 155 ms.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // light headers, as int8_matmul.cpp says why
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

template <typename T>
inline float load1(const T* p, int64_t j) { return static_cast<float>(p[j]); }

// Row j of the logits into float32, soft-capped where asked (cap * tanh(z / cap); the tanh is
// kept in `t` for the gradient).
template <typename T>
void load_row(const T* z, float* buf, float* t, int64_t V, float cap) {
  int64_t j = 0;
#ifdef __AVX512F__
  for (; j + 16 <= V; j += 16) {
    __m512 v;
    if constexpr (std::is_same_v<T, float>) {
      v = _mm512_loadu_ps(z + j);
    } else {  // bfloat16: the upper half of a float32
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(z + j));
      v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    if (cap > 0) {  // tanh(y) = 1 - 2 / (e^{2y} + 1)
      const __m512 e = exp512(_mm512_mul_ps(v, _mm512_set1_ps(2.f / cap)));
      const __m512 th = _mm512_sub_ps(_mm512_set1_ps(1.f),
                                      _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, _mm512_set1_ps(1.f))));
      _mm512_storeu_ps(t + j, th);
      v = _mm512_mul_ps(th, _mm512_set1_ps(cap));
    }
    _mm512_storeu_ps(buf + j, v);
  }
#endif
  for (; j < V; ++j) {
    float v = load1(z, j);
    if (cap > 0) {
      t[j] = std::tanh(v / cap);
      v = cap * t[j];
    }
    buf[j] = v;
  }
}

// buf <- exp(buf - m); returns the sum.
float exp_sum(float* buf, int64_t V, float m) {
  int64_t j = 0;
  float s = 0.f;
#ifdef __AVX512F__
  __m512 vs = _mm512_setzero_ps();
  const __m512 vm = _mm512_set1_ps(m);
  for (; j + 16 <= V; j += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(buf + j), vm));
    _mm512_storeu_ps(buf + j, e);
    vs = _mm512_add_ps(vs, e);
  }
  s = _mm512_reduce_add_ps(vs);
#endif
  for (; j < V; ++j) {
    buf[j] = std::exp(buf[j] - m);
    s += buf[j];
  }
  return s;
}

float row_max(const float* buf, int64_t V) {
  int64_t j = 0;
  float m = -std::numeric_limits<float>::infinity();
#ifdef __AVX512F__
  __m512 vm = _mm512_set1_ps(m);
  for (; j + 16 <= V; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(buf + j));
  m = _mm512_reduce_max_ps(vm);
#endif
  for (; j < V; ++j) m = std::max(m, buf[j]);
  return m;
}

// out <- buf * inv (* (1 - t^2) when capped), in out's dtype (bfloat16 rounded to nearest even).
template <typename T>
void store_grad(const float* buf, const float* t, T* out, int64_t V, float inv, bool capped) {
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; j + 16 <= V; j += 16) {
    __m512 g = _mm512_mul_ps(_mm512_loadu_ps(buf + j), vinv);
    if (capped) {
      const __m512 th = _mm512_loadu_ps(t + j);
      g = _mm512_mul_ps(g, _mm512_fnmadd_ps(th, th, _mm512_set1_ps(1.f)));
    }
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(out + j, g);
    } else {
#ifdef __AVX512BF16__
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), (__m256i)_mm512_cvtneps_pbh(g));
#else
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, g);
      for (int i = 0; i < 16; ++i) out[j + i] = T(tmp[i]);
#endif
    }
  }
#endif
  for (; j < V; ++j) {
    float g = buf[j] * inv;
    if (capped) g *= 1.f - t[j] * t[j];
    out[j] = T(g);
  }
}

template <typename T>
void rows(T* z, const int64_t* targets, float* loss, int64_t n, int64_t V, float cap) {
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(V), t(cap > 0 ? V : 0);
    for (int64_t r = r0; r < r1; ++r) {
      T* row = z + r * V;
      const int64_t target = targets[r];
      load_row(row, buf.data(), t.data(), V, cap);
      const float m = row_max(buf.data(), V);
      const float picked = buf[target];
      const float s = exp_sum(buf.data(), V, m);
      loss[r] = m + std::log(s) - picked;
      // d loss / d capped logit = softmax - one_hot(target); the cap's derivative is 1 - tanh^2.
      buf[target] -= s;
      store_grad(buf.data(), t.data(), row, V, 1.f / s, cap > 0);
    }
  });
}

}  // namespace

// z (n, V) float32 or bfloat16, contiguous; targets (n,) int64 in [0, V); softcap <= 0 for none.
// Returns each row's loss (float32, (n,)); z is overwritten by d loss / d z in its own dtype.
at::Tensor softmax_cross_entropy_(at::Tensor z, const at::Tensor& targets, double softcap) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous() && (z.scalar_type() == at::kFloat || z.scalar_type() == at::kBFloat16),
              "z: contiguous (n, V) float32 or bfloat16");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == z.size(0) && targets.scalar_type() == at::kLong &&
              targets.is_contiguous(), "targets: contiguous int64 (n,)");
  const int64_t n = z.size(0), V = z.size(1);
  const int64_t* tp = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) TORCH_CHECK(tp[r] >= 0 && tp[r] < V, "target ", tp[r], " out of [0, ", V, ")");
  auto loss = at::empty({n}, at::kFloat);
  if (z.scalar_type() == at::kFloat)
    rows(z.data_ptr<float>(), tp, loss.data_ptr<float>(), n, V, static_cast<float>(softcap));
  else
    rows(z.data_ptr<c10::BFloat16>(), tp, loss.data_ptr<float>(), n, V, static_cast<float>(softcap));
  return loss;
}

// -- Sampling: one token drawn from softmax(logits / temperature) ------------------------------------
// By inverse CDF: the first token whose cumulative probability exceeds u * total, for a uniform u
// the caller draws with the request's own generator. In torch ops a row of 262k logits went
// through memory six times (float32 copy, softmax, float64 copy, cumulative sum, search) and took
// ~0.5 ms; here it is read into a buffer once, exponentiated in place with each block's sum kept
// (float64 across blocks), and only the block the draw falls in is searched. min_p: a token whose
// probability is below min_p times the largest one is left out (p = 0), as Sampling says.

namespace {

constexpr int64_t kDrawBlock = 256;

template <typename T>
int64_t draw_row(const T* z, float* buf, std::vector<double>& sums, int64_t V, float inv_t, float min_p, double u) {
  load_row(z, buf, nullptr, V, 0.f);
  const float m = row_max(buf, V);
  const int64_t blocks = (V + kDrawBlock - 1) / kDrawBlock;
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * kDrawBlock, n = std::min(kDrawBlock, V - j0);
    float* e = buf + j0;
    for (int64_t j = 0; j < n; ++j) e[j] = (e[j] - m) * inv_t;  // <= 0: exp never overflows
    const float s = exp_sum(e, n, 0.f);
    double kept = s;
    if (min_p > 0.f) {  // the largest probability is exp(0) = 1
      kept = 0.0;
      for (int64_t j = 0; j < n; ++j) kept += e[j] < min_p ? (e[j] = 0.f) : e[j];
    }
    sums[b] = kept;
    total += kept;
  }
  double target = u * total, run = 0.0;
  int64_t last = -1;  // the last token of nonzero probability seen, where rounding runs past the end
  for (int64_t b = 0; b < blocks; ++b) {
    if (sums[b] <= 0.0) continue;
    if (run + sums[b] <= target) {
      run += sums[b];
      for (int64_t j = std::min(kDrawBlock, V - b * kDrawBlock) - 1; j >= 0; --j)
        if (buf[b * kDrawBlock + j] > 0.f) { last = b * kDrawBlock + j; break; }
      continue;
    }
    for (int64_t j = b * kDrawBlock, end = std::min(V, j + kDrawBlock); j < end; ++j) {
      if (buf[j] <= 0.f) continue;
      run += buf[j];
      last = j;
      if (run > target) return j;
    }
  }
  return last;  // the block's own sum and its tokens' running sum differ in the last bits
}

template <typename T>
void draw_all(const T* z, int64_t stride, const int64_t* rows, const double* u, const float* inv_t,
              const float* min_p, int64_t* out, int64_t n, int64_t V) {
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(V);
    std::vector<double> sums((V + kDrawBlock - 1) / kDrawBlock);
    for (int64_t r = r0; r < r1; ++r)
      out[r] = draw_row(z + rows[r] * stride, buf.data(), sums, V, inv_t[r], min_p[r], u[r]);
  });
}

}  // namespace

// logits (B, V) float32 or bfloat16 with unit stride along V; rows (n,) int64: the rows to draw
// for, each with its uniform u in [0, 1) (float64), 1 / temperature and min_p (float32; 0: none).
// Returns (n,) int64 tokens; a row whose logits are all -inf gives -1.
at::Tensor draw_rows(const at::Tensor& logits, const at::Tensor& rows, const at::Tensor& u,
                     const at::Tensor& inv_t, const at::Tensor& min_p) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0 &&
              (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              "logits: (B, V) float32 or bfloat16 with unit stride along V");
  const int64_t n = rows.numel(), V = logits.size(1);
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && u.scalar_type() == at::kDouble &&
              u.is_contiguous() && u.numel() == n && inv_t.scalar_type() == at::kFloat && inv_t.is_contiguous() &&
              inv_t.numel() == n && min_p.scalar_type() == at::kFloat && min_p.is_contiguous() && min_p.numel() == n,
              "rows (n,) int64, u (n,) float64, inv_t and min_p (n,) float32, contiguous");
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) TORCH_CHECK(rp[r] >= 0 && rp[r] < logits.size(0), "row ", rp[r], " out of range");
  auto out = at::empty({n}, at::kLong);
  if (logits.scalar_type() == at::kFloat)
    draw_all(logits.data_ptr<float>(), logits.stride(0), rp, u.data_ptr<double>(), inv_t.data_ptr<float>(),
             min_p.data_ptr<float>(), out.data_ptr<int64_t>(), n, V);
  else
    draw_all(logits.data_ptr<c10::BFloat16>(), logits.stride(0), rp, u.data_ptr<double>(), inv_t.data_ptr<float>(),
             min_p.data_ptr<float>(), out.data_ptr<int64_t>(), n, V);
  return out;
}

// -- Attention of a few queries per row against the KV cache (decode) -----------------------------
// torch's CPU attention runs a decode step's (B, KV, G, D) queries against a 2,000-slot cache at
// ~9 GB/s and reads every slot, masked or not (a sliding layer's ring is half masked). Here each
// (row, KV head) streams its keys and values once for all G queries of the head, and skips slots
// the mask removes for every query. Slots are cut into parts of kPart at fixed offsets (the parts
// run on the threads; each keeps its own max, sum and weighted values, merged in part order), so a
// row's result depends on its own queries, keys and mask only: not on the other rows, the span
// read or the threads.

namespace {

constexpr int64_t kPart = 256;

template <typename T>
inline void to_float(const T* x, float* out, int64_t D) {
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(x[d]);
}

// The slots of [j0, j1) that the mask keeps for at least one query.
template <typename T>
std::vector<int64_t> kept_slots(const T* mask, int64_t mstride, int64_t Q, int64_t j0, int64_t j1) {
  std::vector<int64_t> kept;
  kept.reserve(j1 - j0);
  for (int64_t j = j0; j < j1; ++j) {
    bool any = false;
    for (int64_t i = 0; i < Q && !any; ++i) any = static_cast<float>(mask[i * mstride + j]) != -INFINITY;
    if (any) kept.push_back(j);
  }
  return kept;
}

// scores (Q, kPart) -> exp(score - max) in place; each query's max and sum into out. A part's
// share of query i, as merge_parts reads it: out[i * (D + 2)] = max score, + 1 = sum of
// exp(score - max), + 2 .. D + 2 = the exp-weighted values.
inline void exp_scores(float* scores, int64_t Q, int64_t n, int64_t D, float* out) {
  for (int64_t i = 0; i < Q; ++i) {
    float top = -INFINITY, total = 0.f;
    for (int64_t t = 0; t < n; ++t) top = std::max(top, scores[i * kPart + t]);
    for (int64_t t = 0; t < n; ++t) {
      float& e = scores[i * kPart + t];
      e = top == -INFINITY ? 0.f : std::exp(e - top);
      total += e;
    }
    out[i * (D + 2)] = top;
    out[i * (D + 2) + 1] = total;
  }
}

// One (row, KV head, part), any Q and D: queries q (Q, D) float32, keys/values rows `kstride`
// apart, mask rows `mstride` apart; the part's share of each query into out.
template <typename T>
void attend_part(const float* q, int64_t Q, const T* k, const T* v, int64_t kstride, const T* mask,
                 int64_t mstride, int64_t j0, int64_t j1, int64_t D, float scale, float* out) {
  const std::vector<int64_t> kept = kept_slots(mask, mstride, Q, j0, j1);
  const int64_t n = static_cast<int64_t>(kept.size());
  std::vector<float> scores(Q * kPart), buf(D);
  for (int64_t t = 0; t < n; ++t) {  // scores: each key read once for every query
    to_float(k + kept[t] * kstride, buf.data(), D);
    for (int64_t i = 0; i < Q; ++i) {
      float lanes[16] = {};  // lane l: the d with d % 16 == l, in order; then summed pairwise
      for (int64_t d = 0; d < D; d += 16)
        for (int l = 0; l < 16; ++l) lanes[l] += q[i * D + d + l] * buf[d + l];
      for (int w = 8; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
      scores[i * kPart + t] = lanes[0] * scale + static_cast<float>(mask[i * mstride + kept[t]]);
    }
  }
  exp_scores(scores.data(), Q, n, D, out);
  for (int64_t i = 0; i < Q; ++i) std::fill(out + i * (D + 2) + 2, out + (i + 1) * (D + 2), 0.f);
  for (int64_t t = 0; t < n; ++t) {  // values: each read once for every query
    to_float(v + kept[t] * kstride, buf.data(), D);
    for (int64_t i = 0; i < Q; ++i)
      for (int64_t d = 0; d < D; ++d) out[i * (D + 2) + 2 + d] += scores[i * kPart + t] * buf[d];
  }
}

#ifdef __AVX512F__
template <typename T>
inline __m512 load16(const T* x) {
  if constexpr (std::is_same_v<T, float>)
    return _mm512_loadu_ps(x);
  else
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
}

// Streams from DRAM run at a fraction of its speed here without being asked for ahead (no
// hardware prefetcher follows the kept slots); kAhead slots on, into L2.
constexpr int64_t kAhead = 8;

template <typename T>
inline void prefetch_row(const T* x, int64_t D) {
  for (int64_t b = 0; b < D * int64_t{sizeof(T)}; b += 64) _mm_prefetch(reinterpret_cast<const char*>(x) + b, _MM_HINT_T1);
}

// The same for NQ queries (Gemma's 1, 2, 4 or 8 a KV head), in registers: a key's dot products
// in NQ running vectors; the values CP vectors of D at a time for all NQ queries, over every key.
template <typename T, int NQ>
void attend_part_nq(const float* q, const T* k, const T* v, int64_t kstride, const T* mask, int64_t mstride,
                    int64_t j0, int64_t j1, int64_t D, float scale, float* out) {
  constexpr int CP = NQ >= 8 ? 2 : 4;
  const std::vector<int64_t> kept = kept_slots(mask, mstride, NQ, j0, j1);
  const int64_t n = static_cast<int64_t>(kept.size());
  alignas(64) float scores[NQ * kPart];
  // Two keys at a time: 2 * NQ independent running sums keep the FMA units busy.
#ifdef __AVX512BF16__
  // bfloat16 keys against the queries (bfloat16 numbers, see attend) two elements an instruction.
  alignas(64) uint16_t qb[NQ * 512];
  if constexpr (!std::is_same_v<T, float>) {
    for (int64_t x = 0; x < NQ * D; ++x) qb[x] = c10::BFloat16(q[x]).x;
  }
#endif
  for (int64_t t = 0; t < n; t += 2) {
    const bool two = t + 1 < n;
    const T* kj0 = k + kept[t] * kstride;
    const T* kj1 = k + kept[two ? t + 1 : t] * kstride;
    __m512 acc0[NQ], acc1[NQ];
    for (int i = 0; i < NQ; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
    if (t + kAhead + 1 < n) {  // memory runs ahead: the keys and values of a few slots on
      prefetch_row(k + kept[t + kAhead] * kstride, D);
      prefetch_row(k + kept[t + kAhead + 1] * kstride, D);
      prefetch_row(v + kept[t + kAhead] * kstride, D);
      prefetch_row(v + kept[t + kAhead + 1] * kstride, D);
    }
#ifdef __AVX512BF16__
    if (!std::is_same_v<T, float> && D % 32 == 0) {
      for (int64_t d = 0; d < D; d += 32) {
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kj0 + d), k1 = (__m512bh)_mm512_loadu_si512(kj1 + d);
        for (int i = 0; i < NQ; ++i) {
          const __m512bh qd = (__m512bh)_mm512_loadu_si512(qb + i * D + d);
          acc0[i] = _mm512_dpbf16_ps(acc0[i], qd, k0);
          acc1[i] = _mm512_dpbf16_ps(acc1[i], qd, k1);
        }
      }
    } else
#endif
    {
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 k0 = load16(kj0 + d), k1 = load16(kj1 + d);
        for (int i = 0; i < NQ; ++i) {
          const __m512 qd = _mm512_loadu_ps(q + i * D + d);
          acc0[i] = _mm512_fmadd_ps(qd, k0, acc0[i]);
          acc1[i] = _mm512_fmadd_ps(qd, k1, acc1[i]);
        }
      }
    }
    for (int i = 0; i < NQ; ++i) {
      scores[i * kPart + t] = _mm512_reduce_add_ps(acc0[i]) * scale + static_cast<float>(mask[i * mstride + kept[t]]);
      if (two)
        scores[i * kPart + t + 1] = _mm512_reduce_add_ps(acc1[i]) * scale + static_cast<float>(mask[i * mstride + kept[t + 1]]);
    }
  }
  exp_scores(scores, NQ, n, D, out);
  for (int64_t d0 = 0; d0 < D; d0 += 16 * CP) {
    const int chunks = static_cast<int>(std::min<int64_t>(CP, (D - d0) / 16));
    __m512 acc[NQ][CP];
    for (int i = 0; i < NQ; ++i)
      for (int c = 0; c < CP; ++c) acc[i][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const T* vj = v + kept[t] * kstride + d0;
      __m512 p[NQ];
      for (int i = 0; i < NQ; ++i) p[i] = _mm512_set1_ps(scores[i * kPart + t]);
      for (int c = 0; c < chunks; ++c) {
        const __m512 vd = load16(vj + 16 * c);
        for (int i = 0; i < NQ; ++i) acc[i][c] = _mm512_fmadd_ps(p[i], vd, acc[i][c]);
      }
    }
    for (int i = 0; i < NQ; ++i)
      for (int c = 0; c < chunks; ++c) _mm512_storeu_ps(out + i * (D + 2) + 2 + d0 + 16 * c, acc[i][c]);
  }
}
#endif

// Queries [0, Q) of one (row, KV head) against the slots of one part. On AVX-512 in blocks of 8,
// 4, 2, 1 queries: a query's numbers are the same in any block (a slot kept for others and masked
// for it adds exact zeros), so they do not depend on how many queries a call has (a decode
// step's G, a prompt chunk's G * T).
template <typename T>
void attend_one(const float* q, int64_t Q, const T* k, const T* v, int64_t kstride, const T* mask, int64_t mstride,
                int64_t j0, int64_t j1, int64_t D, float scale, float* out) {
#ifdef __AVX512F__
  if (D <= 512) {
    for (int64_t i = 0; i < Q;) {
      const int64_t left = Q - i;
      const float* qi = q + i * D;
      const T* mi = mask + i * mstride;
      if (left >= 8) attend_part_nq<T, 8>(qi, k, v, kstride, mi, mstride, j0, j1, D, scale, out + i * (D + 2)), i += 8;
      else if (left >= 4) attend_part_nq<T, 4>(qi, k, v, kstride, mi, mstride, j0, j1, D, scale, out + i * (D + 2)), i += 4;
      else if (left >= 2) attend_part_nq<T, 2>(qi, k, v, kstride, mi, mstride, j0, j1, D, scale, out + i * (D + 2)), i += 2;
      else attend_part_nq<T, 1>(qi, k, v, kstride, mi, mstride, j0, j1, D, scale, out + i * (D + 2)), i += 1;
    }
    return;
  }
#endif
  attend_part(q, Q, k, v, kstride, mask, mstride, j0, j1, D, scale, out);
}

// out (Q, D) from the partials of `parts` parts, each (Q, D + 2): in part order, empty ones left out.
inline void merge_parts(const float* partials, int64_t parts, int64_t Q, int64_t D, float* out) {
  const int64_t stride = Q * (D + 2);
  for (int64_t i = 0; i < Q; ++i) {
    float top = -INFINITY;
    for (int64_t p = 0; p < parts; ++p) top = std::max(top, partials[p * stride + i * (D + 2)]);
    float* o = out + i * D;
    std::fill(o, o + D, 0.f);
    if (top == -INFINITY) continue;  // no slot left for this query: zeros
    float total = 0.f;
    for (int64_t p = 0; p < parts; ++p) {
      const float* pp = partials + p * stride + i * (D + 2);
      if (pp[0] == -INFINITY) continue;
      const float w = std::exp(pp[0] - top);
      total += w * pp[1];
      for (int64_t d = 0; d < D; ++d) o[d] += w * pp[2 + d];
    }
    for (int64_t d = 0; d < D; ++d) o[d] /= total;
  }
}

template <typename T>
at::Tensor attend_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                        double scale) {
  const int64_t B = q.size(0), KV = q.size(1), Q = q.size(2), D = q.size(3), S = k.size(2);
  const int64_t parts = (S + kPart - 1) / kPart;
  constexpr int64_t kBlock = 64;  // queries a unit of work takes (of a prompt chunk's many)
  const int64_t blocks = (Q + kBlock - 1) / kBlock, units = B * KV * blocks;
  const auto qf = q.to(at::kFloat).contiguous();
  auto out = at::empty({B, KV, Q, D}, at::kFloat);
  const float* qp = qf.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* mp = mask.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // Unit u: row b, KV head h, queries [i0, i0 + n). Its part p's partials into dst; its merge.
  auto unit = [&](int64_t u, int64_t& b, int64_t& h, int64_t& i0) {
    b = u / (KV * blocks), h = u / blocks % KV, i0 = u % blocks * kBlock;
    return std::min(kBlock, Q - i0);
  };
  auto partials_of = [&](int64_t u, int64_t p, float* dst) {
    int64_t b, h, i0;
    const int64_t n = unit(u, b, h, i0);
    attend_one(qp + ((b * KV + h) * Q + i0) * D, n, kp + b * k.stride(0) + h * k.stride(1),
               vp + b * v.stride(0) + h * v.stride(1), k.stride(2), mp + b * mask.stride(0) + i0 * mask.stride(2),
               mask.stride(2), p * kPart, std::min(S, (p + 1) * kPart), D, sc, dst + p * n * (D + 2));
  };
  auto merged = [&](int64_t u, const float* partials) {
    int64_t b, h, i0;
    const int64_t n = unit(u, b, h, i0);
    merge_parts(partials, parts, n, D, op + ((b * KV + h) * Q + i0) * D);
  };
  const int64_t slab = parts * kBlock * (D + 2);  // a unit's partials
  if (units >= 2 * at::get_num_threads()) {  // enough units for the threads: each one's parts in turn
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
      std::vector<float> partials(slab);
      for (int64_t u = u0; u < u1; ++u) {
        for (int64_t p = 0; p < parts; ++p) partials_of(u, p, partials.data());
        merged(u, partials.data());
      }
    });
  } else {  // few (a decode step of a row or two): the parts themselves on the threads
    std::vector<float> partials(units * slab);
    at::parallel_for(0, units * parts, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) partials_of(t / parts, t % parts, partials.data() + t / parts * slab);
    });
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) merged(u, partials.data() + u * slab);
    });
  }
  return out;
}

}  // namespace

// softmax(q k^T * scale + mask) v for q (B, KV, Q, D), k and v (B, KV, S, D), mask (B, 1, Q, S)
// additive (0 or -inf), all float32 or all bfloat16, unit stride along D and S; (B, KV, Q, D) float32.
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && mask.dim() == 4, "q, k, v, mask: 4 dimensions");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) && q.size(3) % 16 == 0,
              "k, v (B, KV, S, D) for q (B, KV, Q, D), D a multiple of 16");
  TORCH_CHECK(mask.size(0) == q.size(0) && mask.size(1) == 1 && mask.size(2) == q.size(2) && mask.size(3) == k.size(2),
              "mask (B, 1, Q, S)");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && mask.stride(3) == 1 && k.strides() == v.strides(),
              "k, v, mask: unit stride along the last dimension, k and v alike");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
              mask.scalar_type() == k.scalar_type() &&
              (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "q, k, v, mask: all float32 or all bfloat16");
  return k.scalar_type() == at::kFloat ? attend_cache<float>(q, k, v, mask, scale)
                                       : attend_cache<c10::BFloat16>(q, k, v, mask, scale);
}

// (declared with the other ops in int8_matmul.cpp)
TORCH_LIBRARY_IMPL(GEMMAKIT_NS, CPU, m) {
  m.impl("softmax_cross_entropy_", &softmax_cross_entropy_);
  m.impl("draw_rows", &draw_rows);
  m.impl("attend", &attend);
}
