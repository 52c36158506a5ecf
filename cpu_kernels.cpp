// brisk's one hand-written CPU kernel: products of 1 to 16 rows of bf16 activations with a bf16 weight, built by
// cpu.py (torch.utils.cpp_extension) for CPUs with AVX512_BF16. Why (BENCHMARKS.md, "A kernel for bf16 rows"):
// - each weight element is loaded once for all rows and multiplied in pairs by `vdpbf16ps`, where Inductor's loop
//   converts it to fp32 once per row: 4 rows cost 2.6x one row;
// - each output y[m, n] is reduced in one order whatever the number of rows: 32 products a step into 16 fp32
//   lanes along k, then the 16 lanes. A row's result never depends on the rows beside it (batch invariance).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

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

bool rows_product_supported() { return __builtin_cpu_supports("avx512bf16"); }

TORCH_LIBRARY(brisk, m) {
  m.def("rows_product(Tensor x, Tensor w) -> Tensor");
  m.def("rows_product_supported() -> bool", rows_product_supported);
}
TORCH_LIBRARY_IMPL(brisk, CPU, m) { m.impl("rows_product", rows_product); }
TORCH_LIBRARY_IMPL(brisk, Autograd, m) { m.impl("rows_product", torch::CppFunction::makeFallthrough()); }  // inference
