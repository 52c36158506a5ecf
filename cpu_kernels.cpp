// brisk's hand-written CPU kernels, built by cpu.py (torch.utils.cpp_extension) on first use: products of any number
// of rows of activations (a decode step's, a prompt's) with a bf16 or an int8 weight, and attention (attend, below).
// Each op takes the instruction set to run as its last argument (cpu.kernel_isa: 2 the AVX-512 path, 1 the AVX2 one),
// so that one process can run both; each function is compiled for its own set by a target attribute (no global -m
// flags).
// Why the products (BENCHMARKS.md, "A kernel for bf16 rows", "Kernels for AVX2 and int8 rows"):
// - each weight element is loaded once for all rows (bf16: multiplied in pairs by `vdpbf16ps`, or widened to fp32
//   by a shift on AVX2; int8: integer dots with activations quantized to int8 per block of 32, as llama.cpp's Q8_0);
// - each output y[m, n] is reduced in one order whatever the number of rows (per instruction set): a row's result
//   never depends on the rows beside it (batch invariance), nor a prompt's on how it is split (split invariance).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni")))  // only these functions
#define AVX2 __attribute__((target("avx2,fma,f16c")))

constexpr int R = 4;            // weight rows a tile reads side by side, a quarter of the weight apart
constexpr int64_t AHEAD = 1024;  // elements prefetched ahead in each of them: four far streams need the help

// The highest path this CPU runs: 2 AVX-512 (F, BW, VL, BF16, VNNI), 1 AVX2 (with FMA, F16C), 0 none
int64_t cpu_isa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
      && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni"))
    return 2;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

static void check_isa(int64_t isa, const char* op) {
  static const int64_t best = cpu_isa();
  TORCH_CHECK(isa >= 1 && isa <= best, op, ": instruction set ", isa, " is not one this CPU runs (1 to ", best, ")");
}

constexpr int64_t ROW_BLOCK_BYTES = 1 << 18;  // activations a block of rows holds: they stay in the L2 cache

// Every weight row once per block of rows, in tiles the threads share out: rows(n, ld, RR, m0, m1) computes weight
// rows n, n + ld, ... (RR of them) for the rows m0..m1-1 of activations; tiles of R rows a quarter of the weight apart
// (four memory streams), the last N % R rows one by one. Many rows (a prompt's) go in blocks of row_bytes each up to
// ROW_BLOCK_BYTES, which each thread's tiles of weight rows pass in turn: a block is read from the L2 cache, not
// memory, once per tile
template <typename Rows>
static void over_weight(int64_t N, int64_t M, int64_t row_bytes, const Rows& rows) {
  const int64_t nb = N / R, mb = std::max<int64_t>(4, ROW_BLOCK_BYTES / row_bytes / 4 * 4);
  at::parallel_for(0, nb + N % R, 8, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += mb)
      for (int64_t n = begin; n < end; n++) {
        if (n < nb) rows(n, nb, std::integral_constant<int, R>{}, m0, std::min(M, m0 + mb));
        else rows(n + (R - 1) * nb, 0, std::integral_constant<int, 1>{}, m0, std::min(M, m0 + mb));
      }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// bf16 weights: y[t, r] = x[t] . w[r * ldw] for T rows of x and RR rows of w (ldw apart); K elements each.

// The 16 lanes of each of 16 vectors v summed, in _mm512_reduce_add_ps's order (lanes j and j + 8, then j and j + 4,
// j and j + 2, j and j + 1), but the 16 vectors at once: 15 adds instead of 64. Returns lane 4k + m = v[4m + k]'s sum.
AVX512 static inline __m512 reduce_add_16(const __m512 (&v)[16]) {
  __m512 c[8], e[4], g[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; i++)  // halves: v[2i]'s in the low 8 lanes, v[2i + 1]'s in the high ones
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
#pragma GCC unroll 4
  for (int i = 0; i < 4; i++)  // quarters: block b holds v[4i + b]'s 4 sums
    e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xdd));
#pragma GCC unroll 2
  for (int i = 0; i < 2; i++)  // eighths: block b holds v[8i + b]'s 2 sums, then v[8i + 4 + b]'s
    g[i] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * i], e[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(e[2 * i], e[2 * i + 1], 0xee));
  return _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], 0x88), _mm512_shuffle_ps(g[0], g[1], 0xdd));
}

// y[t * ldy_t + r * ldy_r] = the sum of acc[t][r]'s 16 lanes (each as _mm512_reduce_add_ps sums it: the same bits
// whatever the tile), a whole 4 x 4 tile at once
template <int T, int RR>
AVX512 static inline void store_sums(const __m512 (&acc)[T][RR], float* y, int64_t ldy_t, int64_t ldy_r) {
  if constexpr (T * RR == 16) {
    alignas(64) float sums[16];
    _mm512_store_ps(sums, reduce_add_16(reinterpret_cast<const __m512(&)[16]>(acc)));
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
#pragma GCC unroll 4
      for (int r = 0; r < RR; r++) y[t * ldy_t + r * ldy_r] = sums[4 * r + t];  // acc[t][r] is v[4t + r]
  } else {
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
#pragma GCC unroll 4
      for (int r = 0; r < RR; r++) y[t * ldy_t + r * ldy_r] = _mm512_reduce_add_ps(acc[t][r]);
  }
}

// AVX-512: 32 products a step into 16 fp32 lanes along k (`vdpbf16ps`), then the 16 lanes
template <int T, int RR>
AVX512 static inline void tile_bf16_avx512(const at::BFloat16* x, const at::BFloat16* w, float* y, int64_t K,
                                           int64_t ldw, int64_t ldy_t, int64_t ldy_r) {
  __m512 acc[T][RR];  // [T, RR] x 16 fp32 lanes; unrolled loops keep them in registers (else stored every step)
#pragma GCC unroll 4
  for (int t = 0; t < T; t++)
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) acc[t][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~0u : (1u << (K - k)) - 1;  // the tail reads zeros, which add nothing
    __m512bh wv[RR];
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
      wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * ldw + k);
      _mm_prefetch((const char*)(w + r * ldw + k + AHEAD), _MM_HINT_T0);
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; t++) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + t * K + k);
#pragma GCC unroll 4
      for (int r = 0; r < RR; r++) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv, wv[r]);
    }
  }
  store_sums<T, RR>(acc, y, ldy_t, ldy_r);
}

// 8 fp32 lanes summed in one order: the halves, then pairs
AVX2 static inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 16 bf16 as fp32: the even elements (shifted up) and the odd ones (their low half cleared), exact
AVX2 static inline void widen_bf16(const at::BFloat16* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)p);
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xffff0000)));
}

// one step of 16 elements of the AVX2 tile: two FMAs into each output's 8 lanes, the even elements first
template <int T, int RR>
AVX2 static inline void step_bf16_avx2(__m256 (&acc)[T][RR], const at::BFloat16* const* x,
                                       const at::BFloat16* const* w) {
  __m256 xe[T], xo[T];
#pragma GCC unroll 4
  for (int t = 0; t < T; t++) widen_bf16(x[t], xe[t], xo[t]);
#pragma GCC unroll 4
  for (int r = 0; r < RR; r++) {
    __m256 we, wo;
    widen_bf16(w[r], we, wo);
#pragma GCC unroll 4
    for (int t = 0; t < T; t++) acc[t][r] = _mm256_fmadd_ps(xo[t], wo, _mm256_fmadd_ps(xe[t], we, acc[t][r]));
  }
}

// AVX2: 16 elements a step into 8 fp32 lanes (two FMAs), the tail from zero-padded copies, then the 8 lanes
template <int T, int RR>
AVX2 static inline void tile_bf16_avx2(const at::BFloat16* x, const at::BFloat16* w, float* y, int64_t K,
                                       int64_t ldw, int64_t ldy_t, int64_t ldy_r) {
  __m256 acc[T][RR];
#pragma GCC unroll 4
  for (int t = 0; t < T; t++)
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) acc[t][r] = _mm256_setzero_ps();
  const at::BFloat16 *xs[T], *ws[RR];
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
#pragma GCC unroll 4
    for (int t = 0; t < T; t++) xs[t] = x + t * K + k;
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
      ws[r] = w + r * ldw + k;
      _mm_prefetch((const char*)(ws[r] + AHEAD), _MM_HINT_T0);
    }
    step_bf16_avx2<T, RR>(acc, xs, ws);
  }
  if (k < K) {  // the tail: zeros past K add nothing
    at::BFloat16 xt[T][16] = {}, wt[RR][16] = {};
    for (int t = 0; t < T; t++) std::memcpy(xt[t], x + t * K + k, (K - k) * sizeof(at::BFloat16)), xs[t] = xt[t];
    for (int r = 0; r < RR; r++) std::memcpy(wt[r], w + r * ldw + k, (K - k) * sizeof(at::BFloat16)), ws[r] = wt[r];
    step_bf16_avx2<T, RR>(acc, xs, ws);
  }
  for (int t = 0; t < T; t++)
    for (int r = 0; r < RR; r++) y[t * ldy_t + r * ldy_r] = sum8(acc[t][r]);
}

// all M rows of x against RR weight rows (ldw apart) in tiles of 4 (AVX-512 only: its 32 registers), 2 and 1 rows;
// each row's sums the same in any tile
template <int RR, bool Wide>
static void rows_bf16(const at::BFloat16* x, const at::BFloat16* w, float* y, int64_t M, int64_t K, int64_t N,
                      int64_t ldw, int64_t ldy_r) {
  int64_t m = 0;
  if constexpr (Wide) {
    for (; m + 4 <= M; m += 4) tile_bf16_avx512<4, RR>(x + m * K, w, y + m * N, K, ldw, N, ldy_r);
    for (; m + 2 <= M; m += 2) tile_bf16_avx512<2, RR>(x + m * K, w, y + m * N, K, ldw, N, ldy_r);
    for (; m < M; m++) tile_bf16_avx512<1, RR>(x + m * K, w, y + m * N, K, ldw, N, ldy_r);
  } else {
    for (; m + 2 <= M; m += 2) tile_bf16_avx2<2, RR>(x + m * K, w, y + m * N, K, ldw, N, ldy_r);
    for (; m < M; m++) tile_bf16_avx2<1, RR>(x + m * K, w, y + m * N, K, ldw, N, ldy_r);
  }
}

// x [..., K] bf16 (M rows), w [N, K] bf16 -> x w^T [M, N] fp32
at::Tensor rows_product(const at::Tensor& x_, const at::Tensor& w_, int64_t isa) {
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16 && w_.scalar_type() == at::kBFloat16, "rows_product: bf16 only");
  check_isa(isa, "rows_product");
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  const int64_t N = w.size(0), K = w.size(1), M = x.numel() / K;
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const at::BFloat16 *xp = x.data_ptr<at::BFloat16>(), *wp = w.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  over_weight(N, M, K * sizeof(at::BFloat16), [&](int64_t n, int64_t ld, auto rr, int64_t m0, int64_t m1) {
    constexpr int RR = decltype(rr)::value;
    if (isa == 2) rows_bf16<RR, true>(xp + m0 * K, wp + n * K, yp + m0 * N + n, m1 - m0, K, N, ld * K, ld);
    else rows_bf16<RR, false>(xp + m0 * K, wp + n * K, yp + m0 * N + n, m1 - m0, K, N, ld * K, ld);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------------------
// int8 weights with a scale per output channel (quant.WeightOnlyInt8Linear), activations quantized per block of 32:
// y[m, n] = sw[n] * sum over blocks b of sx[m, b] * (xq[m, b] . w[n, b]), each block's dot exact in int32.

constexpr int64_t QBLOCK = 32;  // activations per scale
constexpr int64_t QPAD = 64;    // rows of quantized activations padded to this many (zeros): whole AVX-512 steps

// The rows of activations as the kernels read them (Kp = K rounded up to QPAD): xq = round(x / s) in -127..127, s =
// max |x| / 127 per block (a block of zeros: 0, s 0); xa, what the instruction set multiplies: xq + 128 (AVX-512's
// unsigned operand) or |xq| (AVX2's); se [Kp / 4]: each block's scale 8 times, one per lane of its 4-product sums.
// One buffer per thread, reused: a product of a few rows is short enough that allocating them would show.
struct QuantRows {
  std::vector<int8_t> xq;
  std::vector<uint8_t> xa;
  std::vector<float> se;
  int64_t Kp;
};

// 8 fp32 lanes from the values c * 8 .. c * 8 + 7 of p (activations, or a cache position's): fp32, or bf16 widened
// (exactly)
AVX2 static inline __m256 load8(const float* p, int c) { return _mm256_loadu_ps(p + 8 * c); }
AVX2 static inline __m256 load8(const at::BFloat16* p, int c) {
  const __m128i v = _mm_loadu_si128((const __m128i*)(p + 8 * c));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// One block of 32 activations into xq, xa and se (8 lanes), both paths: x / s divided and rounded to nearest even,
// as the scalar std::nearbyint(x / s) does
template <typename X>
AVX2 static inline void quantize_block(const X* x, int8_t* xq, uint8_t* xa, float* se, bool wide) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], mx = _mm256_setzero_ps();
  for (int i = 0; i < 4; i++) {
    v[i] = load8(x, i);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float s = _mm_cvtss_f32(m4) / 127.0f;
  _mm256_storeu_ps(se, _mm256_set1_ps(s));
  if (s == 0.0f) return;  // the buffers' zeros (xa: 128 where wide) stand
  __m256i n[4];
  for (int i = 0; i < 4; i++)
    n[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(v[i], _mm256_set1_ps(s)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  // int32 -> int8, in order: the packs interleave 128-bit lanes, the permute puts them back
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
  const __m256i q = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256((__m256i*)xq, q);
  _mm256_storeu_si256((__m256i*)xa, wide ? _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80)) : _mm256_abs_epi8(q));
}

// x [M, K] fp32 or bf16 -> the thread's QuantRows; a last block shorter than 32 from a zero-padded copy
template <typename X>
static const QuantRows& quantize_rows(const X* x, int64_t M, int64_t K, int64_t isa) {
  thread_local QuantRows q;
  q.Kp = (K + QPAD - 1) / QPAD * QPAD;
  q.xq.assign(M * q.Kp, 0), q.xa.assign(M * q.Kp, isa == 2 ? 128 : 0), q.se.assign(M * q.Kp / 4, 0.0f);
  X tail[QBLOCK] = {};  // a short last block copied over its front (the same length in every row): zeros past K
  for (int64_t m = 0; m < M; m++)
    for (int64_t b = 0; b < K; b += QBLOCK) {
      const int64_t at = m * q.Kp + b;
      const X* xb = x + m * K + b;
      if (K - b < QBLOCK) xb = (const X*)std::memcpy(tail, xb, (K - b) * sizeof(X));
      quantize_block(xb, q.xq.data() + at, q.xa.data() + at, q.se.data() + at / 4, isa == 2);
    }
  return q;
}

// AVX-512 (VNNI): 64 products a step, two blocks. `vpdpbusd` sums 4 products of xq + 128 (unsigned) and w (signed)
// into each int32 lane; minus the same sums of 128 and w, they are xq . w exactly. Lanes 0-7 hold the first block,
// 8-15 the second: as fp32 times their block's scale into 16 fp32 lanes, then the lanes, then the weight's scale.
template <int T, int RR, typename S>
AVX512 static inline void tile_int8_avx512(const uint8_t* xa, const float* se, const int8_t* w, const S* sw,
                                           float* y, int64_t K, int64_t Kp, int64_t ldw, int64_t ldy_t,
                                           int64_t ldy_r) {
  __m512 acc[T][RR];
#pragma GCC unroll 4
  for (int t = 0; t < T; t++)
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) acc[t][r] = _mm512_setzero_ps();
  const __m512i k128 = _mm512_set1_epi8((char)0x80);
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~0ull : (1ull << (K - k)) - 1;  // the tail's weights read as zeros
    __m512i wv[RR], bias[RR];
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
      wv[r] = _mm512_maskz_loadu_epi8(mask, w + r * ldw + k);
      _mm_prefetch((const char*)(w + r * ldw + k + 2 * AHEAD), _MM_HINT_T0);
      bias[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), k128, wv[r]);
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; t++) {
      const __m512i xv = _mm512_loadu_si512(xa + t * Kp + k);
      const __m512 sv = _mm512_loadu_ps(se + (t * Kp + k) / 4);
#pragma GCC unroll 4
      for (int r = 0; r < RR; r++) {
        const __m512i d = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xv, wv[r]), bias[r]);
        acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, acc[t][r]);
      }
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; t++)
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) y[t * ldy_t + r * ldy_r] = _mm512_reduce_add_ps(acc[t][r]) * (float)sw[r * ldy_r];
}

// one block of the AVX2 tile: w takes xq's signs (`vpsignb`), `vpmaddubsw` multiplies it by |xq| into int16 pairs
// (at most 2 * 127 * 127: no saturation; w in -127..127, as quant.int8_quantize makes it: -128 has no sign to
// take), `vpmaddwd` sums those into 8 int32 lanes, as fp32 times the block's scale
template <int T, int RR>
AVX2 static inline void step_int8_avx2(__m256 (&acc)[T][RR], const int8_t* xq, const uint8_t* xa, const float* se,
                                       int64_t Kp, const int8_t* const* w) {
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 4
  for (int r = 0; r < RR; r++) {
    const __m256i wv = _mm256_loadu_si256((const __m256i*)w[r]);
#pragma GCC unroll 4
    for (int t = 0; t < T; t++) {
      const __m256i s = _mm256_sign_epi8(wv, _mm256_loadu_si256((const __m256i*)(xq + t * Kp)));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i*)(xa + t * Kp)), s),
                                          ones);
      acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_loadu_ps(se + t * Kp / 4), acc[t][r]);
    }
  }
}

// AVX2: a block of 32 a step into 8 fp32 lanes, the tail's weights from a zero-padded copy, then the 8 lanes
template <int T, int RR, typename S>
AVX2 static inline void tile_int8_avx2(const int8_t* xq, const uint8_t* xa, const float* se, const int8_t* w,
                                       const S* sw, float* y, int64_t K, int64_t Kp, int64_t ldw, int64_t ldy_t,
                                       int64_t ldy_r) {
  __m256 acc[T][RR];
#pragma GCC unroll 4
  for (int t = 0; t < T; t++)
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) acc[t][r] = _mm256_setzero_ps();
  const int8_t* ws[RR];
  int64_t k = 0;
  for (; k + QBLOCK <= K; k += QBLOCK) {
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
      ws[r] = w + r * ldw + k;
      _mm_prefetch((const char*)(ws[r] + 2 * AHEAD), _MM_HINT_T0);
    }
    step_int8_avx2<T, RR>(acc, xq + k, xa + k, se + k / 4, Kp, ws);
  }
  if (k < K) {
    int8_t wt[RR][QBLOCK] = {};
    for (int r = 0; r < RR; r++) std::memcpy(wt[r], w + r * ldw + k, K - k), ws[r] = wt[r];
    step_int8_avx2<T, RR>(acc, xq + k, xa + k, se + k / 4, Kp, ws);
  }
  for (int t = 0; t < T; t++)
    for (int r = 0; r < RR; r++) y[t * ldy_t + r * ldy_r] = sum8(acc[t][r]) * (float)sw[r * ldy_r];
}

// rows m0..m1-1 of the quantized activations against RR weight rows (ldw apart), in tiles of 4 (AVX-512), 2 and 1
template <int RR, bool Wide, typename S>
static void rows_int8(const QuantRows& q, const int8_t* w, const S* sw, float* y, int64_t m0, int64_t m1,
                      int64_t K, int64_t N, int64_t ldw, int64_t ldy_r) {
  const int64_t Kp = q.Kp;
  auto tile = [&](auto tt, int64_t m) {
    constexpr int T = decltype(tt)::value;
    const int8_t* xq = q.xq.data() + m * Kp;
    const uint8_t* xa = q.xa.data() + m * Kp;
    const float* se = q.se.data() + m * Kp / 4;
    if constexpr (Wide) tile_int8_avx512<T, RR>(xa, se, w, sw, y + m * N, K, Kp, ldw, N, ldy_r);
    else tile_int8_avx2<T, RR>(xq, xa, se, w, sw, y + m * N, K, Kp, ldw, N, ldy_r);
  };
  int64_t m = m0;
  if constexpr (Wide)
    for (; m + 4 <= m1; m += 4) tile(std::integral_constant<int, 4>{}, m);
  for (; m + 2 <= m1; m += 2) tile(std::integral_constant<int, 2>{}, m);
  for (; m < m1; m++) tile(std::integral_constant<int, 1>{}, m);
}

template <typename X, typename S>
static void int8_rows(const X* x, const int8_t* w, const S* sw, float* y, int64_t M, int64_t K, int64_t N,
                      int64_t isa) {
  const QuantRows& q = quantize_rows(x, M, K, isa);
  over_weight(N, M, q.Kp * 2, [&](int64_t n, int64_t ld, auto rr, int64_t m0, int64_t m1) {  // xq or xa, and se
    constexpr int RR = decltype(rr)::value;
    if (isa == 2) rows_int8<RR, true>(q, w + n * K, sw + n, y + n, m0, m1, K, N, ld * K, ld);
    else rows_int8<RR, false>(q, w + n * K, sw + n, y + n, m0, m1, K, N, ld * K, ld);
  });
}

// x [..., K] fp32 or bf16 (M rows), w [N, K] int8, scales [N] fp32 or bf16 -> (x w^T) * scales [M, N] fp32, x
// quantized per block of 32; both read as they are (a conversion would be a call and a copy per product)
at::Tensor int8_rows_product(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& sw_, int64_t isa) {
  TORCH_CHECK(w_.scalar_type() == at::kChar, "int8_rows_product: int8 weights");
  check_isa(isa, "int8_rows_product");
  const auto fp32_or_bf16 = [](const at::Tensor& t) {
    return t.scalar_type() == at::kBFloat16 ? t.contiguous() : t.to(at::kFloat).contiguous();
  };
  const at::Tensor w = w_.contiguous(), x = fp32_or_bf16(x_), sw = fp32_or_bf16(sw_);
  const int64_t N = w.size(0), K = w.size(1), M = x.numel() / K;
  TORCH_CHECK(sw.numel() == N, "int8_rows_product: a scale per output channel");
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const int8_t* wp = w.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  const auto with_scales = [&](const auto* xp) {
    if (sw.scalar_type() == at::kBFloat16) int8_rows(xp, wp, sw.data_ptr<at::BFloat16>(), yp, M, K, N, isa);
    else int8_rows(xp, wp, sw.data_ptr<float>(), yp, M, K, N, isa);
  };
  if (x.scalar_type() == at::kBFloat16) with_scales(x.data_ptr<at::BFloat16>());
  else with_scales(x.data_ptr<float>());
  return y;
}

// ---------------------------------------------------------------------------------------------------------------
// Decode attention: AVX-512 (below), AVX2 (attend_query_avx2), the scalar reference (attend_query_ref)

// e^x, 16 lanes (Cephes' expf: x = n ln2 + r, e^r by a polynomial, scaled by 2^n); e^-inf = 0
AVX512 static inline __m512 exp16(__m512 x) {
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

// A [position, head] vector of an int8 cache (cpu.kv_store): D = 16 NC values q in -127..127, then their fp32
// scale d (max |x| / 127): x = q * d. As llama.cpp's block_q8_0, a block per vector, its scale after the values.
template <int NC>
struct block_kv8 {
  int8_t q[16 * NC];
  float d;
};
static_assert(sizeof(block_kv8<4>) == 68, "no padding: the cache's rows are D + 4 bytes");

// The value i of a position p, in the scalar reference (attend_query_ref): int8 ones as torch dequantizes them
// (cpu.kv_load), one fp32 product each, which the SIMD loads below compute alike
static inline float value(const float* p, int i) { return p[i]; }
static inline float value(const at::BFloat16* p, int i) { return (float)p[i]; }
template <int NC>
static inline float value(const block_kv8<NC>* p, int i) { return (float)p->q[i] * p->d; }

// 16 fp32 lanes from the cache values c * 16 .. c * 16 + 15 of a position p: fp32, bf16 widened (exactly), or int8
// times the vector's scale (value)
AVX512 static inline __m512 load16(const float* p, int c) { return _mm512_loadu_ps(p + 16 * c); }
AVX512 static inline __m512 load16(const at::BFloat16* p, int c) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)(p + 16 * c));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
template <int NC>
AVX512 static inline __m512 load16(const block_kv8<NC>* p, int c) {
  const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p->q + 16 * c))));
  return _mm512_mul_ps(q, _mm512_set1_ps(p->d));
}

// Where a row's keys (or values) are: positions below n in row src (beams that share a prompt read it from one row,
// so that it comes from memory once for all of them), the others in the row's own.
template <typename C>
struct Keys {
  const C *src, *own;
  int64_t n, ld;
  const C* at(int64_t j) const { return (j < n ? src : own) + j * ld; }
};

// One query of attention: q [D], its row's keys and values, its mask (m[j * ms], j < S), its output y [D], and the
// positions it reads, n: S, or up to its last position (an int64 mask: the rest would weigh 0, adding nothing)
template <typename C, typename Mask>
struct Query {
  const float* q;
  Keys<C> k, v;
  const Mask* m;
  int64_t ms;
  float* y;
  int64_t n;
};

// the bytes of one position of a head, D = 16 NC values of C (an int8 block holds them all)
template <int NC, typename C>
constexpr int64_t row_bytes() { return std::is_same_v<C, block_kv8<NC>> ? sizeof(C) : 16 * NC * sizeof(C); }

constexpr int64_t TILES_AHEAD = 2;  // prefetched: the memory of one key/value head is read in one stream

// positions j0..j0+15 of keys (or values) as fp32 t [16, 16 NC]; those past S repeat position S - 1 (they weigh 0)
template <int NC, typename C>
AVX512 static inline void load_tile(const Keys<C>& k, int64_t j0, int64_t S, float* t) {
  for (int j = 0; j < 16; j++) {
    const C* kj = k.at(std::min(j0 + j, S - 1));
    const char* ahead = (const char*)k.at(std::min(j0 + j + TILES_AHEAD * 16, S - 1));
    for (int64_t b = 0; b < row_bytes<NC, C>(); b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
#pragma GCC unroll 16
    for (int c = 0; c < NC; c++) _mm512_storeu_ps(t + (j * NC + c) * 16, load16(kj, c));
  }
}

// q . k for the 16 keys of a tile t: each key's products in 16 lanes, then the 16 keys' lanes summed in one tree (four
// rounds of pairwise halving), so that lane j holds key j's score
template <int NC>
AVX512 static inline __m512 tile_scores(const float* q, const float* t) {
  __m512 qv[NC], acc[16];
#pragma GCC unroll 16
  for (int c = 0; c < NC; c++) qv[c] = _mm512_loadu_ps(q + 16 * c);
#pragma GCC unroll 16
  for (int j = 0; j < 16; j++) {
    acc[j] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(t + j * NC * 16));
#pragma GCC unroll 16
    for (int c = 1; c < NC; c++) acc[j] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(t + (j * NC + c) * 16), acc[j]);
  }
  // 16 -> 8: in each 128-bit block [a0+a2, b0+b2, a1+a3, b1+b3]
#pragma GCC unroll 8
  for (int i = 0; i < 8; i++)
    acc[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                           _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
  // 8 -> 4: in each block [a, b, c, d]
#pragma GCC unroll 4
  for (int i = 0; i < 4; i++)
    acc[i] = _mm512_add_ps(_mm512_shuffle_ps(acc[2 * i], acc[2 * i + 1], 0x44),
                           _mm512_shuffle_ps(acc[2 * i], acc[2 * i + 1], 0xee));
  // 4 -> 2 -> 1: the blocks pairwise, until block i holds keys 4i..4i+3 in full
#pragma GCC unroll 2
  for (int i = 0; i < 2; i++)
    acc[i] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0xdd));
  acc[0] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[0], acc[1], 0x88), _mm512_shuffle_f32x4(acc[0], acc[1], 0xdd));
  return acc[0];
}

// Whether a query attends position j, and what its mask adds to the score: a bool mask (true), a float one (not -inf;
// ALiBi's bias), or a last position (j <= m[0]: causal attention without a [T, S] mask)
template <typename Mask>
static inline bool attended(const Mask* m, int64_t ms, int64_t j, float& add) {
  add = 0.0f;
  if constexpr (std::is_same_v<Mask, int64_t>) return j <= m[0];
  else if constexpr (std::is_same_v<Mask, bool>) return m[j * ms];
  else return (add = m[j * ms]) != -INFINITY;
}

// The lanes of positions j0..j0+15 that the mask lets through (attended, and before S), and what it adds to their
// scores (a float mask: ALiBi)
template <typename Mask>
AVX512 static inline __mmask16 mask_tile(const Mask* m, int64_t ms, int64_t j0, int64_t S, __m512& add) {
  const __mmask16 live = S - j0 >= 16 ? 0xffff : (1u << (S - j0)) - 1;
  add = _mm512_setzero_ps();
  if constexpr (std::is_same_v<Mask, int64_t>) {
    return live & ((1u << std::clamp<int64_t>(m[0] - j0 + 1, 0, 16)) - 1);
  } else {
    if (ms == 1 && std::is_same_v<Mask, bool>) {
      const __m128i b = _mm_maskz_loadu_epi8(live, m + j0);
      return _mm_test_epi8_mask(b, b);
    }
    __m512 mj;
    if (ms == 1) {
      mj = _mm512_maskz_loadu_ps(live, m + j0);
    } else {  // a mask broadcast along positions
      alignas(64) float f[16];
      for (int j = 0; j < 16; j++) f[j] = j0 + j < S ? (float)m[(j0 + j) * ms] : 0.0f;
      mj = _mm512_load_ps(f);
    }
    if constexpr (std::is_same_v<Mask, bool>) return live & _mm512_cmp_ps_mask(mj, add, _CMP_NEQ_OQ);
    add = mj;
    return live & _mm512_cmp_ps_mask(mj, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
  }
}

// Queries qs[0..Q) of one key/value head, each computed alone and in one order whatever the other queries and the
// positions past its mask (model.attend's contract); together only in that a tile of keys or values is loaded once
// for consecutive queries that read the same one. s: [Q, S rounded up to 16], t: [16, 16 NC], total: [Q], scratch.
template <int NC, typename C, typename Mask>
AVX512 static void attend_queries(const Query<C, Mask>* qs, int64_t Q, int64_t S, float* s, float* t,
                                       float* total) {
  const int64_t S16 = (S + 15) / 16 * 16;
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(16.0f * NC));
  const C* held = nullptr;  // the positions t holds, unless a tile straddles a shared prefix's end
  auto load = [&](const Keys<C>& k, int64_t j0) {
    const C* first = k.at(j0);
    const bool whole = j0 + 16 <= k.n || j0 >= k.n;  // the tile's positions all in one row
    if (whole && first == held) return;
    load_tile<NC>(k, j0, S, t);
    held = whole ? first : nullptr;
  };
  for (int64_t j0 = 0; j0 < S; j0 += 16)
    for (int64_t i = 0; i < Q; i++) {
      if (j0 >= qs[i].n) continue;
      __m512 add, sj = _mm512_set1_ps(-INFINITY);
      const __mmask16 keep = mask_tile(qs[i].m, qs[i].ms, j0, S, add);
      if (keep) {  // a tile masked out in full (a shorter row's, an idle row's) is neither loaded nor computed
        load(qs[i].k, j0);
        sj = _mm512_mask_add_ps(sj, keep, _mm512_mul_ps(tile_scores<NC>(qs[i].q, t), scale), add);
      }
      _mm512_storeu_ps(s + i * S16 + j0, sj);
    }
  for (int64_t i = 0; i < Q; i++) {  // the weights e^(s - max) and their total
    float* si = s + i * S16;
    const int64_t n16 = (qs[i].n + 15) / 16 * 16;
    __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n16; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(si + j));
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    for (int64_t j = 0; j < n16; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(si + j), top));
      _mm512_storeu_ps(si + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    total[i] = _mm512_reduce_add_ps(sum);
  }
  constexpr int U = NC <= 4 ? 4 : NC <= 8 ? 2 : 1;  // keys summed in U chains (FMAs in flight), then the chains
  held = nullptr;
  for (int64_t i = 0; i < Q; i++)
    for (int c = 0; c < NC; c++) _mm512_storeu_ps(qs[i].y + 16 * c, _mm512_setzero_ps());
  for (int64_t j0 = 0; j0 < S; j0 += 16)
    for (int64_t i = 0; i < Q; i++) {
      const float* p = s + i * S16 + j0;
      if (j0 >= qs[i].n || !_mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_setzero_ps(), _CMP_NEQ_OQ))
        continue;  // weighs nothing
      load(qs[i].v, j0);
      __m512 a[U][NC];
#pragma GCC unroll 4
      for (int u = 0; u < U; u++)
#pragma GCC unroll 16
        for (int c = 0; c < NC; c++) a[u][c] = _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int j = 0; j < 16; j++) {
        const __m512 pj = _mm512_set1_ps(p[j]);
#pragma GCC unroll 16
        for (int c = 0; c < NC; c++)
          a[j % U][c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(t + (j * NC + c) * 16), a[j % U][c]);
      }
      float* y = qs[i].y;
#pragma GCC unroll 16
      for (int c = 0; c < NC; c++) {
        __m512 r = a[0][c];
        for (int u = 1; u < U; u++) r = _mm512_add_ps(r, a[u][c]);
        _mm512_storeu_ps(y + 16 * c, _mm512_add_ps(_mm512_loadu_ps(y + 16 * c), r));
      }
    }
  for (int64_t i = 0; i < Q; i++)
    for (int c = 0; c < NC; c++)
      _mm512_storeu_ps(qs[i].y + 16 * c, _mm512_div_ps(_mm512_loadu_ps(qs[i].y + 16 * c), _mm512_set1_ps(total[i])));
}

// AVX2: one query at a time (no tiles shared between queries), each key's score along the head dimension in 8
// lanes, the weights e^(s - max) 8 at a time, then the values weighed in place; one order per query as above.

// e^x, 8 lanes, as exp16 (2^n built in the exponent bits: x <= 0 here, so n is -126..0); e^-inf = 0
AVX2 static inline __m256 exp8(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(two_n)), live);
}

// 8 fp32 lanes from an int8 cache position's values c * 8 .. c * 8 + 7, times its scale (load8 for fp32 and bf16
// caches: above)
template <int NC>
AVX2 static inline __m256 load8(const block_kv8<NC>* p, int c) {
  const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p->q + 8 * c))));
  return _mm256_mul_ps(q, _mm256_set1_ps(p->d));
}

// one query (head size 16 NC) against S positions; s: [S rounded up to 16], scratch
template <int NC, typename C, typename Mask>
AVX2 static void attend_query_avx2(const Query<C, Mask>& q, int64_t S, float* s) {
  constexpr int NV = 2 * NC;  // vectors of 8 along the head
  const float scale = 1.0f / std::sqrt(16.0f * NC);
  __m256 qv[NV];
#pragma GCC unroll 32
  for (int c = 0; c < NV; c++) qv[c] = _mm256_loadu_ps(q.q + 8 * c);
  float mx = -INFINITY;
  for (int64_t j = 0; j < S; j++) {
    float add;
    if (!attended(q.m, q.ms, j, add)) {
      s[j] = -INFINITY;
      continue;
    }
    const C* kj = q.k.at(j);
    __m256 acc = _mm256_mul_ps(qv[0], load8(kj, 0));
#pragma GCC unroll 32
    for (int c = 1; c < NV; c++) acc = _mm256_fmadd_ps(qv[c], load8(kj, c), acc);
    s[j] = sum8(acc) * scale + add;
    mx = std::max(mx, s[j]);
  }
  const int64_t S8 = (S + 7) / 8 * 8;
  std::fill(s + S, s + S8, -INFINITY);
  const __m256 top = _mm256_set1_ps(mx);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < S8; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), top));
    _mm256_storeu_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  __m256 a[NV];
#pragma GCC unroll 32
  for (int c = 0; c < NV; c++) a[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < S; j++) {
    if (s[j] == 0.0f) continue;  // weighs nothing
    const __m256 pj = _mm256_set1_ps(s[j]);
    const C* vj = q.v.at(j);
#pragma GCC unroll 32
    for (int c = 0; c < NV; c++) a[c] = _mm256_fmadd_ps(pj, load8(vj, c), a[c]);
  }
  const __m256 total = _mm256_set1_ps(sum8(sum));
#pragma GCC unroll 32
  for (int c = 0; c < NV; c++) _mm256_storeu_ps(q.y + 8 * c, _mm256_div_ps(a[c], total));
}

// The scalar reference (isa 0): one query against S positions, one value at a time, e^x from std::exp; s: [S]
template <int NC, typename C, typename Mask>
static void attend_query_ref(const Query<C, Mask>& q, int64_t S, float* s) {
  constexpr int D = 16 * NC;
  const float scale = 1.0f / std::sqrt((float)D);
  float mx = -INFINITY, total = 0.0f;
  for (int64_t j = 0; j < S; j++) {
    float add;
    s[j] = -INFINITY;
    if (!attended(q.m, q.ms, j, add)) continue;
    float dot = 0.0f;
    for (int i = 0; i < D; i++) dot += q.q[i] * value(q.k.at(j), i);
    s[j] = dot * scale + add;
    mx = std::max(mx, s[j]);
  }
  for (int64_t j = 0; j < S; j++) total += s[j] = std::exp(s[j] - mx);
  for (int i = 0; i < D; i++) q.y[i] = 0.0f;
  for (int64_t j = 0; j < S; j++)
    for (int i = 0; i < D; i++) q.y[i] += s[j] * value(q.v.at(j), i);
  for (int i = 0; i < D; i++) q.y[i] /= total;
}

constexpr int64_t MAX_RUN = 64;  // queries per run at most: a prompt's scores [run, S] do not grow with its length

// Every query of attend's arguments, in runs that the threads share out: queries in the order (key/value head, row,
// head of its group, position), cut into runs within a key/value head, of a length that gives each thread two runs
// (at most MAX_RUN)
template <int NC, typename C, typename Mask, int Isa>
static void attend_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& m,
                       const int64_t* prefix, at::Tensor& y) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Hkv = k.size(1), S = k.size(2), D = 16 * NC;
  const int64_t G = H / Hkv, per = B * G * T;  // queries per key/value head
  const int64_t cuts = std::max<int64_t>(1, (2 * at::get_num_threads() + Hkv - 1) / Hkv);
  const int64_t run = std::min(MAX_RUN, (per + cuts - 1) / cuts);
  const int64_t runs = (per + run - 1) / run;  // runs per key/value head
  const int64_t unit = sizeof(C) / k.element_size();  // elements of the cache per C: an int8 block's D + 4, else 1
  const C *kp = (const C*)k.data_ptr(), *vp = (const C*)v.data_ptr();
  at::parallel_for(0, Hkv * runs, 1, [&](int64_t begin, int64_t end) {
    const int64_t S16 = (S + 15) / 16 * 16;
    std::vector<float> s(run * S16), t(16 * D), total(run);
    std::vector<Query<C, Mask>> qs(run);
    for (int64_t r = begin; r < end; r++) {
      const int64_t hk = r / runs, first = r % runs * run, Q = std::min(per, first + run) - first;
      for (int64_t i = 0; i < Q; i++) {
        const int64_t b = (first + i) / (G * T), h = hk * G + (first + i) / T % G, pos = (first + i) % T;
        const int64_t other = prefix ? b + prefix[2 * b] : b;
        const int64_t src = other >= 0 && other < B ? other : b, n = src == b ? 0 : prefix[2 * b + 1];
        const int64_t ko = (b * k.stride(0) + hk * k.stride(1)) / unit;
        const int64_t ks = (src * k.stride(0) + hk * k.stride(1)) / unit;
        const int64_t qi = ((b * H + h) * T + pos) * D;
        const Mask* mi = m.data_ptr<Mask>() + b * m.stride(0) + h * m.stride(1) + pos * m.stride(2);
        int64_t reads = S;
        if constexpr (std::is_same_v<Mask, int64_t>) reads = std::clamp<int64_t>(mi[0] + 1, 1, S);
        qs[i] = {q.data_ptr<float>() + qi, {kp + ks, kp + ko, n, k.stride(2) / unit},
                 {vp + ks, vp + ko, n, v.stride(2) / unit}, mi, m.stride(3), y.data_ptr<float>() + qi, reads};
      }
      if constexpr (Isa == 2) attend_queries<NC>(qs.data(), Q, S, s.data(), t.data(), total.data());
      else if constexpr (Isa == 1)
        for (int64_t i = 0; i < Q; i++) attend_query_avx2<NC>(qs[i], qs[i].n, s.data() + i * S16);
      else
        for (int64_t i = 0; i < Q; i++) attend_query_ref<NC>(qs[i], qs[i].n, s.data() + i * S16);
    }
  });
}

template <int NC, typename C, int Isa>
static void attend_masks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& m,
                         const int64_t* prefix, at::Tensor& y) {
  if (m.scalar_type() == at::kBool) attend_all<NC, C, bool, Isa>(q, k, v, m, prefix, y);
  else if (m.scalar_type() == at::kLong) attend_all<NC, C, int64_t, Isa>(q, k, v, m, prefix, y);
  else attend_all<NC, C, float, Isa>(q, k, v, m, prefix, y);
}

template <int NC, int Isa>
static void attend_types(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& m,
                         const int64_t* prefix, at::Tensor& y) {
  if (k.scalar_type() == at::kBFloat16) attend_masks<NC, at::BFloat16, Isa>(q, k, v, m, prefix, y);
  else if (k.scalar_type() == at::kChar) attend_masks<NC, block_kv8<NC>, Isa>(q, k, v, m, prefix, y);
  else attend_masks<NC, float, Isa>(q, k, v, m, prefix, y);
}

template <int NC>
static void attend_nc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& m,
                      const int64_t* prefix, at::Tensor& y, int64_t isa) {
  if (isa == 2) attend_types<NC, 2>(q, k, v, m, prefix, y);
  else if (isa == 1) attend_types<NC, 1>(q, k, v, m, prefix, y);
  else attend_types<NC, 0>(q, k, v, m, prefix, y);
}

// Attention (a decode step's, a prompt's): q [B, H, T, D] fp32, k v [B, Hkv, S, D] fp32 or bf16, or [B, Hkv, S, D + 4]
// int8 (block_kv8) (D contiguous; D 16, 32, 48, 64, 80, 96, 128 or 256), a mask that broadcasts to [B, H, T, S], bool
// or float, or int64: each query's last attended position (read at S's first; a stride 0 view along S, not a [T, S]
// tensor) -> [B, H, T, D] fp32. As model.attend: each (row, head, query) alone, in one order. prefix: none, or [B, 2]
// ints: row b's first prefix[b, 1] positions are alike in row b + prefix[b, 0] (a hint: where that row is outside
// 0..B-1 the row's own are read). isa: 2 AVX-512, 1 AVX2, 0 the scalar reference.
at::Tensor attend(const at::Tensor& q_, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                  const std::optional<at::Tensor>& prefix_, int64_t isa) {
  if (isa != 0) check_isa(isa, "attend");
  const at::Tensor q = q_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), S = k.size(2);
  const bool int8 = k.scalar_type() == at::kChar;
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == v.scalar_type()
              && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16 || int8)
              && (mask.scalar_type() == at::kBool || mask.scalar_type() == at::kFloat
                  || mask.scalar_type() == at::kLong)
              && k.size(3) == D + (int8 ? 4 : 0) && k.stride(3) == 1 && v.stride(3) == 1 && k.strides() == v.strides(),
              "attend: fp32 queries, an fp32, bf16 or int8 (D + 4 per position) cache, a bool, fp32 or int64 mask");
  at::Tensor prefix;
  if (prefix_.has_value()) {
    prefix = prefix_->to(at::kLong).contiguous();
    TORCH_CHECK(prefix.dim() == 2 && prefix.size(0) == B && prefix.size(1) == 2, "attend: prefix [B, 2]");
  }
  at::Tensor y = at::empty_like(q);
  const at::Tensor m = mask.expand({B, H, T, S});  // broadcast dims get stride 0 (ALiBi's mask has heads)
  const int64_t* p = prefix.defined() ? prefix.data_ptr<int64_t>() : nullptr;
  switch (D) {
    case 16: attend_nc<1>(q, k, v, m, p, y, isa); break;
    case 32: attend_nc<2>(q, k, v, m, p, y, isa); break;
    case 48: attend_nc<3>(q, k, v, m, p, y, isa); break;
    case 64: attend_nc<4>(q, k, v, m, p, y, isa); break;
    case 80: attend_nc<5>(q, k, v, m, p, y, isa); break;
    case 96: attend_nc<6>(q, k, v, m, p, y, isa); break;
    case 128: attend_nc<8>(q, k, v, m, p, y, isa); break;
    case 256: attend_nc<16>(q, k, v, m, p, y, isa); break;
    default: TORCH_CHECK(false, "attend: head size ", D, " is not one of 16, 32, 48, 64, 80, 96, 128, 256");
  }
  return y;
}

TORCH_LIBRARY(brisk, m) {
  m.def("cpu_isa() -> int", cpu_isa);
  m.def("rows_product(Tensor x, Tensor w, int isa) -> Tensor");
  m.def("int8_rows_product(Tensor x, Tensor w, Tensor scales, int isa) -> Tensor");
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor? prefix, int isa) -> Tensor");
}
TORCH_LIBRARY_IMPL(brisk, CPU, m) {
  m.impl("rows_product", rows_product);
  m.impl("int8_rows_product", int8_rows_product);
  m.impl("attend", attend);
}
TORCH_LIBRARY_IMPL(brisk, Autograd, m) {  // inference only
  m.impl("rows_product", torch::CppFunction::makeFallthrough());
  m.impl("int8_rows_product", torch::CppFunction::makeFallthrough());
  m.impl("attend", torch::CppFunction::makeFallthrough());
}
