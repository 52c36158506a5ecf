// brisk's hand-written CPU kernels, built by cpu.py (torch.utils.cpp_extension) for CPUs with AVX512_BF16: products
// of 1 to 16 rows of bf16 activations with a bf16 weight, and decode attention (attend, below). Why the products
// (BENCHMARKS.md, "A kernel for bf16 rows"):
// - each weight element is loaded once for all rows and multiplied in pairs by `vdpbf16ps`, where Inductor's loop
//   converts it to fp32 once per row: 4 rows cost 2.6x one row;
// - each output y[m, n] is reduced in one order whatever the number of rows: 32 products a step into 16 fp32
//   lanes along k, then the 16 lanes. A row's result never depends on the rows beside it (batch invariance).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <type_traits>
#include <vector>

#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))  // only these functions

constexpr int R = 4;            // weight rows a tile reads side by side, a quarter of the weight apart
constexpr int64_t AHEAD = 512;  // elements prefetched ahead in each of them: four far streams need the help

// y[t, r] = x[t] . w[r * ldw] for T rows of x and RR rows of w (ldw apart); K elements each.
template <int T, int RR>
AVX512_BF16 static inline void tile(const at::BFloat16* x, const at::BFloat16* w, float* y, int64_t K, int64_t ldw,
                                    int64_t ldy_t, int64_t ldy_r) {
  __m512 acc[T][RR];  // [T, RR] x 16 fp32 lanes
  for (int t = 0; t < T; t++)
    for (int r = 0; r < RR; r++) acc[t][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~0u : (1u << (K - k)) - 1;  // the tail reads zeros, which add nothing
    __m512bh wv[RR];
    for (int r = 0; r < RR; r++) {
      wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * ldw + k);
      _mm_prefetch((const char*)(w + r * ldw + k + AHEAD), _MM_HINT_T0);
    }
    for (int t = 0; t < T; t++) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + t * K + k);
      for (int r = 0; r < RR; r++) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv, wv[r]);
    }
  }
  for (int t = 0; t < T; t++)
    for (int r = 0; r < RR; r++) y[t * ldy_t + r * ldy_r] = _mm512_reduce_add_ps(acc[t][r]);
}

// all M rows of x against RR weight rows: in tiles of 4, 2 and 1 rows, each row's sums the same
template <int RR>
AVX512_BF16 static void rows(const at::BFloat16* x, const at::BFloat16* w, float* y, int64_t M, int64_t K, int64_t N,
                             int64_t ldw, int64_t ldy_r) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, RR>(x + m * K, w, y + m * N, K, ldw, N, ldy_r);
  for (; m + 2 <= M; m += 2) tile<2, RR>(x + m * K, w, y + m * N, K, ldw, N, ldy_r);
  for (; m < M; m++) tile<1, RR>(x + m * K, w, y + m * N, K, ldw, N, ldy_r);
}

static void product(const at::BFloat16* x, const at::BFloat16* w, float* y, int64_t M, int64_t K, int64_t N) {
  const int64_t nb = N / R;  // a tile's rows are n, n + nb, n + 2 nb, n + 3 nb; the last N % R rows one by one
  at::parallel_for(0, nb + N % R, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++) {
      if (n < nb) rows<R>(x, w + n * K, y + n, M, K, N, nb * K, nb);
      else rows<1>(x, w + (n + (R - 1) * nb) * K, y + n + (R - 1) * nb, M, K, N, 0, 0);
    }
  });
}

// x [..., K] bf16 (M rows), w [N, K] bf16 -> x w^T [M, N] fp32
at::Tensor rows_product(const at::Tensor& x_, const at::Tensor& w_) {
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16 && w_.scalar_type() == at::kBFloat16, "rows_product: bf16 only");
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  const int64_t N = w.size(0), K = w.size(1), M = x.numel() / K;
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  product(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), y.data_ptr<float>(), M, K, N);
  return y;
}

// e^x, 16 lanes (Cephes' expf: x = n ln2 + r, e^r by a polynomial, scaled by 2^n); e^-inf = 0
AVX512_BF16 static inline __m512 exp16(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// one query q [D] against keys/values k, v [S, D] (rows ld apart), mask m [S] (bool, or float added: ALiBi) -> y [D]
template <typename Mask>
AVX512_BF16 static void attend_one(const float* q, const float* k, const float* v, int64_t ld, const Mask* m,
                                   int64_t ms, int64_t S, int64_t D, float* s, float* y) {
  const float scale = 1.0f / std::sqrt((float)D);
  float mx = -INFINITY;
  for (int64_t j = 0; j < S; j++) {  // scores: 16 lanes along D, then the lanes
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + j * ld + d), acc);
    float sj = _mm512_reduce_add_ps(acc) * scale;
    if constexpr (std::is_same_v<Mask, bool>) sj = m[j * ms] ? sj : -INFINITY;
    else sj += (float)m[j * ms];
    s[j] = sj;
    mx = std::max(mx, sj);
  }
  for (int64_t j = S; j % 16; j++) s[j] = -INFINITY;  // s holds a multiple of 16: the tail weighs nothing
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < S; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(mx)));
    _mm512_storeu_ps(s + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  const float total = _mm512_reduce_add_ps(sum);
  __m512 acc[16];  // D <= 256
  for (int64_t c = 0; c < D / 16; c++) acc[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < S; j++) {
    if (s[j] == 0.0f) continue;  // masked (or underflowed): adds nothing
    const __m512 pj = _mm512_set1_ps(s[j]);
    for (int64_t c = 0; c < D / 16; c++) acc[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + j * ld + 16 * c), acc[c]);
  }
  for (int64_t c = 0; c < D / 16; c++) _mm512_storeu_ps(y + 16 * c, _mm512_div_ps(acc[c], _mm512_set1_ps(total)));
}

// Decode attention: q [B, H, T, D], k v [B, Hkv, S, D] fp32 (D contiguous, D % 16 == 0, D <= 256), mask
// that broadcasts to [B, H, T, S], bool or float -> [B, H, T, D]. As model.attend: each (row, head, query) alone,
// in one order.
at::Tensor attend(const at::Tensor& q_, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  const at::Tensor q = q_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat
              && k.stride(3) == 1 && v.stride(3) == 1 && k.strides() == v.strides() && D % 16 == 0 && D <= 256,
              "attend: fp32, D a multiple of 16 up to 256");
  at::Tensor y = at::empty_like(q);
  const int64_t G = H / Hkv;
  const at::Tensor m = mask.expand({B, H, T, S});  // broadcast dims get stride 0 (ALiBi's mask has heads)
  at::parallel_for(0, B * H * T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s((S + 15) / 16 * 16);  // [S] scores, then weights, and a tail to a multiple of 16
    for (int64_t i = begin; i < end; i++) {
      const int64_t b = i / (H * T), h = i / T % H, t = i % T;
      const int64_t kv = b * k.stride(0) + h / G * k.stride(1);
      const float* qi = q.data_ptr<float>() + i * D;
      float* yi = y.data_ptr<float>() + i * D;
      const int64_t mo = b * m.stride(0) + h * m.stride(1) + t * m.stride(2), ms = m.stride(3);
      if (m.scalar_type() == at::kBool)
        attend_one(qi, k.data_ptr<float>() + kv, v.data_ptr<float>() + kv, k.stride(2), m.data_ptr<bool>() + mo,
                   ms, S, D, s.data(), yi);
      else
        attend_one(qi, k.data_ptr<float>() + kv, v.data_ptr<float>() + kv, k.stride(2), m.data_ptr<float>() + mo,
                   ms, S, D, s.data(), yi);
    }
  });
  return y;
}

bool rows_product_supported() { return __builtin_cpu_supports("avx512bf16"); }

TORCH_LIBRARY(brisk, m) {
  m.def("rows_product(Tensor x, Tensor w) -> Tensor");
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  m.def("rows_product_supported() -> bool", rows_product_supported);
}
TORCH_LIBRARY_IMPL(brisk, CPU, m) {
  m.impl("rows_product", rows_product);
  m.impl("attend", attend);
}
TORCH_LIBRARY_IMPL(brisk, Autograd, m) {  // inference only
  m.impl("rows_product", torch::CppFunction::makeFallthrough());
  m.impl("attend", torch::CppFunction::makeFallthrough());
}
