// brisk's hand-written CPU kernels, built by cpu.py (torch.utils.cpp_extension) on first use:
// here products of any number of rows of activations (a decode step's, a prompt's) with a bf16 or
// an int8 weight, and the registration of every op (attention: cpu_attend.cpp, int4: cpu_int4.cpp;
// what they share: cpu_kernels.h). Each op takes the instruction set to run as its last argument
// (cpu.kernel_isa: 2 the AVX-512 path, 1 the AVX2 one), so that one process can run both.
// Why the products (BENCHMARKS.md, "A kernel for bf16 rows", "Kernels for AVX2 and int8 rows"):
// - each weight element is loaded once for all rows (bf16: multiplied in pairs by `vdpbf16ps`, or widened to fp32
//   by a shift on AVX2; int8: integer dots with activations quantized to int8 per block of 32, as llama.cpp's Q8_0);
// - each output y[m, n] is reduced in one order whatever the number of rows (per instruction set): a row's result
//   never depends on the rows beside it (batch invariance), nor a prompt's on how it is split (split invariance).
#include <torch/library.h>

#include "cpu_kernels.h"

constexpr int R = 4;            // weight rows a tile reads side by side, a quarter of the weight apart
constexpr int64_t AHEAD = 1024;  // elements prefetched ahead in each of them: four far streams need the help

int64_t cpu_isa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
      && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni"))
    return 2;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

void check_isa(int64_t isa, const char* op) {
  static const int64_t best = cpu_isa();
  TORCH_CHECK(isa >= 1 && isa <= best, op, ": instruction set ", isa, " is not one this CPU runs (1 to ", best, ")");
}


// Tiles whose outputs are gathered before they are written: a cache line per row and stream.
// Written as computed, the R streams of M rows, a quarter of the weight and a row of y apart, fell
// in one set of the L1 cache where N is a multiple of 1024 (a vocabulary: 49152).
constexpr int64_t CH = 16;

// Every weight row once per block of rows, in tiles the threads share out: rows(n, ld, RR, m0, m1,
// out) computes weight rows n, n + ld, ... (RR of them) for the rows m0..m1-1 of activations into
// out[(m - m0) * R * CH + r * CH]; tiles of R rows a quarter of the weight apart (four memory
// streams), the last N % R rows one by one; every CH tiles, their outputs to y [M, N]. Many rows (a
// prompt's) go in blocks of row_bytes each up to ROW_BLOCK_BYTES, which each thread's tiles of
// weight rows pass in turn: a block is read from the L2 cache, not memory, once per tile
template <typename Rows>
static void over_weight(float* y, int64_t N, int64_t M, int64_t row_bytes, const Rows& rows) {
  const int64_t nb = N / R, mb = std::max<int64_t>(4, ROW_BLOCK_BYTES / row_bytes / 4 * 4);
  at::parallel_for(0, nb + N % R, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::min(M, mb) * R * CH);
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
      const int64_t m1 = std::min(M, m0 + mb);
      for (int64_t n0 = begin; n0 < end; n0 += CH) {
        const int64_t n1 = std::min(end, n0 + CH);
        for (int64_t n = n0; n < n1; n++) {
          float* out = buf.data() + n - n0;
          if (n < nb) rows(n, nb, std::integral_constant<int, R>{}, m0, m1, out);
          else rows(n + (R - 1) * nb, 0, std::integral_constant<int, 1>{}, m0, m1, out);
        }
        const int64_t split = std::clamp(nb, n0, n1);  // tiles of R streams before, of 1 row after
        for (int64_t m = m0; m < m1; m++) {
          const float* b = buf.data() + (m - m0) * R * CH - n0;
          float* ym = y + m * N;
          for (int r = 0; r < R; r++)
            for (int64_t n = n0; n < split; n++) ym[n + r * nb] = b[r * CH + n];
          for (int64_t n = split; n < n1; n++) ym[n + (R - 1) * nb] = b[n];
        }
      }
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
static void rows_bf16(const at::BFloat16* x, const at::BFloat16* w, float* y, int64_t M, int64_t K,
                      int64_t ldw) {
  constexpr int64_t N = R * CH, ldy_r = CH;  // over_weight's out
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
  at::Tensor y = x.new_empty({M, N}, x.options().dtype(at::kFloat));
  const at::BFloat16 *xp = x.data_ptr<at::BFloat16>(), *wp = w.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = K * sizeof(at::BFloat16);
  over_weight(yp, N, M, row_bytes, [&](int64_t n, int64_t ld, auto rr, int64_t m0, int64_t m1, float* out) {
    constexpr int RR = decltype(rr)::value;
    if (isa == 2) rows_bf16<RR, true>(xp + m0 * K, wp + n * K, out, m1 - m0, K, ld * K);
    else rows_bf16<RR, false>(xp + m0 * K, wp + n * K, out, m1 - m0, K, ld * K);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------------------
// int8 weights with a scale per output channel (quant.WeightOnlyInt8Linear), activations quantized per block of 32:
// y[m, n] = sw[n] * sum over blocks b of sx[m, b] * (xq[m, b] . w[n, b]), each block's dot exact in int32.

constexpr int64_t QPAD = 64;    // rows of quantized activations padded to this many (zeros): whole AVX-512 steps

// The rows of activations as the kernels read them (Kp = K rounded up to QPAD): xq [Kp] and d
// [Kp / 32] per row, each block's values and scale (quantize_q8: xq = round(x / d), d = max |x| /
// 127); xa, what the instruction set multiplies: xq + 128 (AVX-512's unsigned operand) or |xq|
// (AVX2's). One scale per block, spread over the lanes in registers (not stored 8 times: half the
// bytes). One buffer per thread, reused: a product of a few rows is short enough that allocating
// them would show.
struct QuantRows {
  std::vector<int8_t> xq;
  std::vector<uint8_t> xa;
  std::vector<float> d;
  int64_t Kp;
};

// One block of 32 activations into xq and d (quantize_q8), and xa, both paths
template <typename X>
AVX2 static inline void quantize_block(const X* x, int8_t* xq, uint8_t* xa, float* d, bool wide) {
  *d = quantize_q8(x, xq);
  const __m256i q = _mm256_loadu_si256((const __m256i*)xq);
  const __m256i a = wide ? _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80)) : _mm256_abs_epi8(q);
  _mm256_storeu_si256((__m256i*)xa, a);
}

// x [M, K] fp32 or bf16 -> the calling thread's QuantRows (many rows quantized by all threads); a last
// block shorter than 32 from a zero-padded copy
template <typename X>
static const QuantRows& quantize_rows(const X* x, int64_t M, int64_t K, int64_t isa) {
  thread_local QuantRows mine;
  QuantRows& q = mine;  // the calling thread's, which the lambda below writes from every thread
  q.Kp = (K + QPAD - 1) / QPAD * QPAD;
  q.xq.assign(M * q.Kp, 0), q.xa.assign(M * q.Kp, isa == 2 ? 128 : 0);
  q.d.assign(M * q.Kp / QK8, 0.0f);
  at::parallel_for(0, M, std::max<int64_t>(1, QUANT_GRAIN / K), [&](int64_t m0, int64_t m1) {
    X tail[QK8] = {};  // a short last block copied over its front (the same length in every row)
    for (int64_t m = m0; m < m1; m++)
      for (int64_t b = 0; b < K; b += QK8) {
        const int64_t at = m * q.Kp + b;
        const X* xb = x + m * K + b;
        if (K - b < QK8) xb = (const X*)std::memcpy(tail, xb, (K - b) * sizeof(X));
        quantize_block(xb, q.xq.data() + at, q.xa.data() + at, q.d.data() + at / QK8, isa == 2);
      }
  });
  return q;
}

// AVX-512 (VNNI): 64 products a step, two blocks. `vpdpbusd` sums 4 products of xq + 128
// (unsigned) and w (signed) into each int32 lane; started from minus the same sums of 128 and w
// (once per weight row and step), they are xq . w exactly. Lanes 0-7 hold the first block, 8-15 the
// second: as fp32 times their block's scale into 16 fp32 lanes, then the lanes, then the weight's
// scale.
template <int T, int RR>
AVX512 static inline void tile_int8_avx512(const uint8_t* xa, const float* d, const int8_t* w,
                                           const float* sw, int64_t lds, float* y, int64_t K,
                                           int64_t Kp, int64_t ldw, int64_t ldy_t, int64_t ldy_r) {
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
      const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), k128, wv[r]);
      bias[r] = _mm512_sub_epi32(_mm512_setzero_si512(), sums);
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; t++) {
      const __m512i xv = _mm512_loadu_si512(xa + t * Kp + k);
      const float* dt = d + (t * Kp + k) / QK8;  // the two blocks' scales, on lanes 0-7 and 8-15
      const __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(dt[0]), 0xff00, _mm512_set1_ps(dt[1]));
#pragma GCC unroll 4
      for (int r = 0; r < RR; r++) {
        const __m512i dot = _mm512_dpbusd_epi32(bias[r], xv, wv[r]);
        acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sv, acc[t][r]);
      }
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; t++)
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++)
      y[t * ldy_t + r * ldy_r] = _mm512_reduce_add_ps(acc[t][r]) * sw[r * lds];
}

// one block of the AVX2 tile: w takes xq's signs (`vpsignb`), `vpmaddubsw` multiplies it by |xq| into int16 pairs
// (at most 2 * 127 * 127: no saturation; w in -127..127, as quant.int8_quantize makes it: -128 has no sign to
// take), `vpmaddwd` sums those into 8 int32 lanes, as fp32 times the block's scale
template <int T, int RR>
AVX2 static inline void step_int8_avx2(__m256 (&acc)[T][RR], const int8_t* xq, const uint8_t* xa,
                                       const float* d, int64_t Kp, const int8_t* const* w) {
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 4
  for (int r = 0; r < RR; r++) {
    const __m256i wv = _mm256_loadu_si256((const __m256i*)w[r]);
#pragma GCC unroll 4
    for (int t = 0; t < T; t++) {
      const __m256i s = _mm256_sign_epi8(wv, _mm256_loadu_si256((const __m256i*)(xq + t * Kp)));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i*)(xa + t * Kp)), s),
                                          ones);
      const __m256 dt = _mm256_broadcast_ss(d + t * Kp / QK8);
      acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dt, acc[t][r]);
    }
  }
}

// AVX2: a block of 32 a step into 8 fp32 lanes, the tail's weights from a zero-padded copy, then the 8 lanes
template <int T, int RR>
AVX2 static inline void tile_int8_avx2(const int8_t* xq, const uint8_t* xa, const float* d,
                                       const int8_t* w, const float* sw, int64_t lds, float* y,
                                       int64_t K, int64_t Kp, int64_t ldw, int64_t ldy_t,
                                       int64_t ldy_r) {
  __m256 acc[T][RR];
#pragma GCC unroll 4
  for (int t = 0; t < T; t++)
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) acc[t][r] = _mm256_setzero_ps();
  const int8_t* ws[RR];
  int64_t k = 0;
  for (; k + QK8 <= K; k += QK8) {
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
      ws[r] = w + r * ldw + k;
      _mm_prefetch((const char*)(ws[r] + 2 * AHEAD), _MM_HINT_T0);
    }
    step_int8_avx2<T, RR>(acc, xq + k, xa + k, d + k / QK8, Kp, ws);
  }
  if (k < K) {
    int8_t wt[RR][QK8] = {};
    for (int r = 0; r < RR; r++) std::memcpy(wt[r], w + r * ldw + k, K - k), ws[r] = wt[r];
    step_int8_avx2<T, RR>(acc, xq + k, xa + k, d + k / QK8, Kp, ws);
  }
  for (int t = 0; t < T; t++)
    for (int r = 0; r < RR; r++) y[t * ldy_t + r * ldy_r] = sum8(acc[t][r]) * sw[r * lds];
}

// rows m0..m1-1 of the quantized activations against RR weight rows (ldw apart, their scales lds
// apart) into over_weight's out, in tiles of 4 (AVX-512), 2 and 1
template <int RR, bool Wide>
static void rows_int8(const QuantRows& q, const int8_t* w, const float* sw, int64_t lds, float* y,
                      int64_t m0, int64_t m1, int64_t K, int64_t ldw) {
  constexpr int64_t ldy_t = R * CH, ldy_r = CH;
  const int64_t Kp = q.Kp;
  auto tile = [&](auto tt, int64_t m) {
    constexpr int T = decltype(tt)::value;
    const int8_t* xq = q.xq.data() + m * Kp;
    const uint8_t* xa = q.xa.data() + m * Kp;
    const float* d = q.d.data() + m * Kp / QK8;
    float* yt = y + (m - m0) * ldy_t;
    if constexpr (Wide) tile_int8_avx512<T, RR>(xa, d, w, sw, lds, yt, K, Kp, ldw, ldy_t, ldy_r);
    else tile_int8_avx2<T, RR>(xq, xa, d, w, sw, lds, yt, K, Kp, ldw, ldy_t, ldy_r);
  };
  int64_t m = m0;
  if constexpr (Wide)
    for (; m + 4 <= m1; m += 4) tile(std::integral_constant<int, 4>{}, m);
  for (; m + 2 <= m1; m += 2) tile(std::integral_constant<int, 2>{}, m);
  for (; m < m1; m++) tile(std::integral_constant<int, 1>{}, m);
}

static void int8_rows(const QuantRows& q, const int8_t* w, const float* sw, float* y, int64_t M,
                      int64_t K, int64_t N, int64_t isa) {
  const int64_t row_bytes = q.Kp * 2;  // the activations' bytes per row: xq and xa, and d
  over_weight(y, N, M, row_bytes, [&](int64_t n, int64_t ld, auto rr, int64_t m0, int64_t m1, float* out) {
    constexpr int RR = decltype(rr)::value;
    if (isa == 2) rows_int8<RR, true>(q, w + n * K, sw + n, ld, out, m0, m1, K, ld * K);
    else rows_int8<RR, false>(q, w + n * K, sw + n, ld, out, m0, m1, K, ld * K);
  });
}

// x [..., K] fp32 or bf16 (M rows), w [N, K] int8, scales [N] fp32 or bf16 -> (x w^T) * scales [M, N] fp32, x
// quantized per block of 32; both read as they are (a conversion would be a call and a copy per
// product), bf16 scales widened here (exactly: one kernel for both)
at::Tensor int8_rows_product(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& sw_, int64_t isa) {
  TORCH_CHECK(w_.scalar_type() == at::kChar, "int8_rows_product: int8 weights");
  check_isa(isa, "int8_rows_product");
  const auto fp32_or_bf16 = [](const at::Tensor& t) {
    return t.scalar_type() == at::kBFloat16 ? t.contiguous() : t.to(at::kFloat).contiguous();
  };
  const at::Tensor w = w_.contiguous(), x = fp32_or_bf16(x_), sw = fp32_or_bf16(sw_);
  const int64_t N = w.size(0), K = w.size(1), M = x.numel() / K;
  TORCH_CHECK(sw.numel() == N, "int8_rows_product: a scale per output channel");
  at::Tensor y = x.new_empty({M, N}, x.options().dtype(at::kFloat));
  std::vector<float> wide;
  const float* sp = sw.scalar_type() == at::kFloat ? sw.data_ptr<float>() : nullptr;
  if (!sp) {
    const at::BFloat16* b = sw.data_ptr<at::BFloat16>();
    wide.assign(b, b + N);
    sp = wide.data();
  }
  const QuantRows& q = x.scalar_type() == at::kBFloat16
                           ? quantize_rows(x.data_ptr<at::BFloat16>(), M, K, isa)
                           : quantize_rows(x.data_ptr<float>(), M, K, isa);
  int8_rows(q, w.data_ptr<int8_t>(), sp, y.data_ptr<float>(), M, K, N, isa);
  return y;
}

TORCH_LIBRARY(brisk, m) {
  m.def("cpu_isa() -> int", cpu_isa);
  m.def("rows_product(Tensor x, Tensor w, int isa) -> Tensor");
  m.def("int8_rows_product(Tensor x, Tensor w, Tensor scales, int isa) -> Tensor");
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor? prefix, int isa) -> Tensor");
  m.def("int4_product(Tensor x, Tensor w, int groupsize, int isa) -> Tensor");
  m.def("int4_pack(Tensor q, Tensor scales_and_zeros, int groupsize) -> Tensor");
}
TORCH_LIBRARY_IMPL(brisk, CPU, m) {
  m.impl("rows_product", rows_product);
  m.impl("int8_rows_product", int8_rows_product);
  m.impl("attend", attend);
  m.impl("int4_product", int4_product);
  m.impl("int4_pack", int4_pack);
}
TORCH_LIBRARY_IMPL(brisk, Autograd, m) {  // inference only
  m.impl("rows_product", torch::CppFunction::makeFallthrough());
  m.impl("int8_rows_product", torch::CppFunction::makeFallthrough());
  m.impl("attend", torch::CppFunction::makeFallthrough());
  m.impl("int4_product", torch::CppFunction::makeFallthrough());
  m.impl("int4_pack", torch::CppFunction::makeFallthrough());
}
