// Row-wise softmax work over a vocabulary of logits: the training loss's cross-entropy and its
// gradient, and sampling's draw of a token.
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

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>

namespace {

// exp(x) to ~1 ulp for x in float range: 2^n * e^r with |r| <= ln2 / 2, e^r by its Taylor
// polynomial of degree 6 (error < r^7 / 7! = 1.2e-7 relative), 2^n by scalef (also gives 0 and
// inf at the ends).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // below: 0 either way; keeps n in int range
  x = _mm512_min_ps(x, _mm512_set1_ps(89.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2, split in two
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace
#endif

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

// (declared with the other ops in int8_matmul.cpp)
TORCH_LIBRARY_IMPL(GEMMAKIT_NS, CPU, m) {
  m.impl("softmax_cross_entropy_", &softmax_cross_entropy_);
  m.impl("draw_rows", &draw_rows);
}
