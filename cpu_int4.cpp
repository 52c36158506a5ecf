// brisk's int4 CPU kernel, built with cpu_kernels.cpp by cpu.py (which registers the ops):
// products of any number of rows of activations (a decode step, a batch's step, a verify pass, a
// prompt) with an int4 weight in brisk's own layout (block_q4x16 below), repacked at load from the
// file's device-neutral values. As llama.cpp's Q4_0 x Q8_0 (BENCHMARKS.md, "An int4 kernel"):
// - each row of activations is quantized once per product to int8 in blocks of 32 inputs (x ~ d * q, d = max|x| / 127);
// - the weight's values (0..15) are the unsigned operand of the integer dot: `vpdpbusd` (AVX-512 VNNI) or
//   `vpmaddubsw` + `vpmaddwd` (AVX2) adds 4 products into each of 16 rows' int32 lanes, with no nibble table: the
//   file's w = (q - 8) * scale + zero is q * scale + m, m = zero - 8 * scale, and m multiplies the activations' sum;
// - then in fp32, per group of g inputs (g / 32 blocks): t = scale * sum_b d_b * dot_b + m * sum_b d_b * sum(q_b),
//   and y += t: one add on the chain from group to group.
// Each row of activations is reduced alone and in one order (integer sums are exact; the float steps are the same on
// every path), so a row's result is bitwise the same whatever rows are beside it and on both SIMD paths as in the
// scalar reference.
#include "cpu_kernels.h"

constexpr int NR = 16;  // weight rows interleaved in a block: the int32 lanes of one 512-bit dot
constexpr int QK = QK8;  // inputs per block, and per int8 block of the activations

// 16 rows x 32 inputs of values 0..15. Byte 4r + c of qs[p] holds row r's input 4p + c in its low nibble and input
// 16 + 4p + c in its high one: the low (high) nibbles of qs[p] are the 16 rows' input quad p (p + 4), which one
// vpdpbusd multiplies with that quad of the activations broadcast to every lane.
struct block_q4x16 {
  uint8_t qs[4][64];
};
// g = 32 G inputs of 16 rows: G blocks, then the rows' scales and zeros (the file's bf16 values)
template <int G>
struct group_q4x16 {
  block_q4x16 b[G];
  at::BFloat16 scale[NR], zero[NR];
};
// The packed weight: [N / 16, K / g] groups, row block by row block (each streams its K inputs in one run).

// One row of activations quantized in blocks of 32: q [K] int8, d [K/32] (x ~ d * q), and c [K/g] = the sum over
// the group's blocks of d * sum(q) (an fma chain in block order)
struct Acts {
  const int8_t* q;
  const float* d;
  const float* c;
};

// x [M, K] fp32 or bf16 -> the M rows' Acts (quantize_q8), in the buffers q [M, K], d [M, K/32], c
// [M, K/g] (many rows by all threads). bf16 read as it is: a separate conversion of x is a parallel region of its own, which
// costs more than the product when the machine's other threads are busy
template <typename T>
static void quantize_rows(const T* x, int64_t M, int64_t K, int G, bool simd, int8_t* q, float* d,
                          float* c) {
  const int64_t nb = K / QK, ng = nb / G;
  at::parallel_for(0, M, std::max<int64_t>(1, QUANT_GRAIN / K), [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0 * nb; i < m1 * nb; i++) {  // block i % nb of row i / nb
      d[i] = simd ? quantize_q8(x + i * QK, q + i * QK) : quantize_q8_ref(x + i * QK, q + i * QK);
      int32_t sum = 0;
      for (int k = 0; k < QK; k++) sum += q[i * QK + k];
      float& ci = c[i / nb * ng + i % nb / G];
      ci = std::fma(d[i], (float)sum, i % nb % G ? ci : 0.0f);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The product of T rows of activations with one block of 16 weight rows over all K inputs (ng groups):
// y[t, r] (ldy apart), in a scalar reference and two SIMD paths that round alike

template <int G>
static void rows_ref(const group_q4x16<G>* w, int64_t ng, const Acts* a, int T, float* y, int64_t ldy) {
  for (int t = 0; t < T; t++)
    for (int r = 0; r < NR; r++) {
      float acc = 0.0f;
      for (int64_t g = 0; g < ng; g++) {
        float gacc = 0.0f;
        for (int j = 0; j < G; j++) {
          const int64_t b = g * G + j;
          const int8_t* xq = a[t].q + b * QK;
          int32_t dot = 0;
          for (int p = 0; p < 4; p++)
            for (int c = 0; c < 4; c++) {
              const uint8_t v = w[g].b[j].qs[p][4 * r + c];
              dot += (v & 15) * xq[4 * p + c] + (v >> 4) * xq[16 + 4 * p + c];
            }
          gacc = j ? std::fma((float)dot, a[t].d[b], gacc) : (float)dot * a[t].d[b];
        }
        const float scale = w[g].scale[r], m = std::fma(-8.0f, scale, w[g].zero[r]);
        acc += std::fma(gacc, scale, m * a[t].c[g]);
      }
      y[t * ldy + r] = acc;
    }
}

AVX512 static inline __m512 bf16x16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

constexpr int64_t AHEAD = 8192;  // bytes prefetched ahead in a row block's stream

template <int T, int G>
AVX512 static void rows_avx512(const group_q4x16<G>* w, int64_t ng, const Acts* a, float* y, int64_t ldy) {
  const __m512i low = _mm512_set1_epi8(15);
  __m512 acc[T];
#pragma GCC unroll 8
  for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; g++) {
    __m512 gacc[T];
#pragma GCC unroll 8
    for (int j = 0; j < G; j++) {
      const block_q4x16& blk = w[g].b[j];
      for (int l = 0; l < 4; l++) _mm_prefetch((const char*)blk.qs[l] + AHEAD, _MM_HINT_T0);
      __m512i q[8];
#pragma GCC unroll 8
      for (int p = 0; p < 4; p++) {
        const __m512i v = _mm512_loadu_si512(blk.qs[p]);
        q[p] = _mm512_and_si512(v, low);
        q[p + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      const int64_t b = g * G + j;
#pragma GCC unroll 8
      for (int t = 0; t < T; t++) {
        const int32_t* xq = (const int32_t*)(a[t].q + b * QK);
        __m512i s[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};  // two chains: exact in any order
#pragma GCC unroll 8
        for (int p = 0; p < 8; p++) s[p & 1] = _mm512_dpbusd_epi32(s[p & 1], q[p], _mm512_set1_epi32(xq[p]));
        const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(s[0], s[1])), d = _mm512_set1_ps(a[t].d[b]);
        gacc[t] = j ? _mm512_fmadd_ps(f, d, gacc[t]) : _mm512_mul_ps(f, d);
      }
    }
    const __m512 scale = bf16x16(w[g].scale), m = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale, bf16x16(w[g].zero));
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
      const __m512 mc = _mm512_mul_ps(m, _mm512_set1_ps(a[t].c[g]));
      acc[t] = _mm512_add_ps(acc[t], _mm512_fmadd_ps(gacc[t], scale, mc));
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; t++) _mm512_storeu_ps(y + t * ldy, acc[t]);
}

AVX2 static inline __m256 bf16x8(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// As rows_avx512, in two halves of 8 rows (the first and last 32 bytes of each qs[p]); without VNNI the quads are
// multiplied in int16 pairs (vpmaddubsw: 15 * 127 * 2 at most), eight of them summed in int16 (30480 at most, in any
// order), then pairs summed into int32 (vpmaddwd). Quad by quad, the weight's nibbles and each row's two broadcasts
// serve both halves.
template <int T, int G>
AVX2 static void rows_avx2(const group_q4x16<G>* w, int64_t ng, const Acts* a, float* y, int64_t ldy) {
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 acc[T][2];
#pragma GCC unroll 4
  for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; g++) {
    __m256 gacc[T][2];
#pragma GCC unroll 8
    for (int j = 0; j < G; j++) {
      const block_q4x16& blk = w[g].b[j];
      for (int l = 0; l < 4; l++) _mm_prefetch((const char*)blk.qs[l] + AHEAD, _MM_HINT_T0);
      const int64_t b = g * G + j;
      __m256i s[T][2];
#pragma GCC unroll 4
      for (int p = 0; p < 4; p++) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i*)blk.qs[p]);
        const __m256i v1 = _mm256_loadu_si256((const __m256i*)(blk.qs[p] + 32));
        const __m256i q[4] = {_mm256_and_si256(v0, low), _mm256_and_si256(v1, low),  // [half]: low, then high nibbles
                              _mm256_and_si256(_mm256_srli_epi16(v0, 4), low),
                              _mm256_and_si256(_mm256_srli_epi16(v1, 4), low)};
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
          const int32_t* xq = (const int32_t*)(a[t].q + b * QK);
          const __m256i lo = _mm256_set1_epi32(xq[p]), hi = _mm256_set1_epi32(xq[p + 4]);
#pragma GCC unroll 2
          for (int h = 0; h < 2; h++) {
            const __m256i m = _mm256_add_epi16(_mm256_maddubs_epi16(q[h], lo), _mm256_maddubs_epi16(q[2 + h], hi));
            s[t][h] = p ? _mm256_add_epi16(s[t][h], m) : m;
          }
        }
      }
#pragma GCC unroll 4
      for (int t = 0; t < T; t++) {
        const __m256 d = _mm256_set1_ps(a[t].d[b]);
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
          const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[t][h], ones));
          gacc[t][h] = j ? _mm256_fmadd_ps(f, d, gacc[t][h]) : _mm256_mul_ps(f, d);
        }
      }
    }
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
      const __m256 scale = bf16x8(w[g].scale + 8 * h);
      const __m256 m = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), scale, bf16x8(w[g].zero + 8 * h));
#pragma GCC unroll 4
      for (int t = 0; t < T; t++) {
        const __m256 mc = _mm256_mul_ps(m, _mm256_set1_ps(a[t].c[g]));
        acc[t][h] = _mm256_add_ps(acc[t][h], _mm256_fmadd_ps(gacc[t][h], scale, mc));
      }
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; t++)
    for (int h = 0; h < 2; h++) _mm256_storeu_ps(y + t * ldy + 8 * h, acc[t][h]);
}

// All M rows against one row block, in tiles of 4, 2 and 1 rows (each row's arithmetic the same in any tile)
template <int G>
static void row_block(const group_q4x16<G>* w, int64_t ng, const Acts* a, int64_t M, float* y, int64_t N, int isa) {
  int64_t m = 0;
  if (isa == 2) {
    for (; m + 8 <= M; m += 8) rows_avx512<8, G>(w, ng, a + m, y + m * N, N);
    for (; m + 4 <= M; m += 4) rows_avx512<4, G>(w, ng, a + m, y + m * N, N);
    for (; m + 2 <= M; m += 2) rows_avx512<2, G>(w, ng, a + m, y + m * N, N);
    for (; m < M; m++) rows_avx512<1, G>(w, ng, a + m, y + m * N, N);
  } else if (isa == 1) {
    for (; m + 4 <= M; m += 4) rows_avx2<4, G>(w, ng, a + m, y + m * N, N);
    for (; m + 2 <= M; m += 2) rows_avx2<2, G>(w, ng, a + m, y + m * N, N);
    for (; m < M; m++) rows_avx2<1, G>(w, ng, a + m, y + m * N, N);
  } else {
    rows_ref<G>(w, ng, a, M, y, N);
  }
}

template <int G>
static void product(const at::Tensor& x, const uint8_t* w, float* y, int64_t M, int64_t K, int64_t N, int isa) {
  const int64_t nb = K / QK, ng = nb / G;
  std::vector<int8_t> q(M * K);
  std::vector<float> d(M * nb), c(M * ng);
  if (x.scalar_type() == at::kBFloat16)
    quantize_rows(x.data_ptr<at::BFloat16>(), M, K, G, isa > 0, q.data(), d.data(), c.data());
  else
    quantize_rows(x.data_ptr<float>(), M, K, G, isa > 0, q.data(), d.data(), c.data());
  std::vector<Acts> a(M);
  for (int64_t m = 0; m < M; m++) a[m] = {q.data() + m * K, d.data() + m * nb, c.data() + m * ng};
  const auto* groups = (const group_q4x16<G>*)w;
  // many rows (a prompt's) in blocks that each thread's row blocks of the weight pass in turn
  const int64_t mb = std::max<int64_t>(4, ROW_BLOCK_BYTES / K / 4 * 4);
  at::parallel_for(0, N / NR, 4, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += mb)
      for (int64_t rb = begin; rb < end; rb++)
        row_block<G>(groups + rb * ng, ng, a.data() + m0, std::min(mb, M - m0), y + m0 * N + rb * NR, N, isa);
  });
}

static int blocks_per_group(int64_t groupsize) {
  TORCH_CHECK(groupsize == 32 || groupsize == 64 || groupsize == 128 || groupsize == 256,
              "int4: group size 32, 64, 128 or 256, got ", groupsize);
  return groupsize / QK;
}

// x [..., K] fp32 or bf16 (M rows), w packed [N/16, K/g, bytes] (int4_pack) -> x w^T [M, N] fp32.
// isa: 2 AVX-512 with VNNI, 1 AVX2 + FMA, 0 the scalar reference
at::Tensor int4_product(const at::Tensor& x_, const at::Tensor& w, int64_t groupsize, int64_t isa) {
  const int G = blocks_per_group(groupsize);
  const int64_t N = w.size(0) * NR, K = w.size(1) * groupsize, M = x_.numel() / K;
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.size(2) == 256 * G + 4 * NR
              && x_.size(-1) == K, "int4_product: a weight from int4_pack and ", K, " inputs");
  TORCH_CHECK(isa >= 0 && isa <= 2, "int4_product: isa 0, 1 or 2");
  const at::Tensor x = (x_.scalar_type() == at::kBFloat16 ? x_ : x_.to(at::kFloat)).contiguous();
  at::Tensor y = x.new_empty({M, N}, x.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  switch (G) {
    case 1: product<1>(x, wp, yp, M, K, N, isa); break;
    case 2: product<2>(x, wp, yp, M, K, N, isa); break;
    case 4: product<4>(x, wp, yp, M, K, N, isa); break;
    default: product<8>(x, wp, yp, M, K, N, isa);
  }
  return y;
}

// The file's values q [N, K] (0..15, N a multiple of 16) and scales_and_zeros [K/g, N, 2] bf16 -> brisk's layout
at::Tensor int4_pack(const at::Tensor& q_, const at::Tensor& sz_, int64_t groupsize) {
  const int G = blocks_per_group(groupsize);
  const at::Tensor q = q_.to(at::kByte).contiguous(), sz = sz_.to(at::kBFloat16).contiguous();
  const int64_t N = q.size(0), K = q.size(1), ng = K / groupsize, bytes = 256 * G + 4 * NR;
  TORCH_CHECK(N % NR == 0 && K % groupsize == 0 && sz.size(0) == ng && sz.size(1) == N && sz.size(2) == 2,
              "int4_pack: q [N, K] with N a multiple of 16 and K of the group size, scales_and_zeros [K/g, N, 2]");
  at::Tensor w = q.new_empty({N / NR, ng, bytes});
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::BFloat16* s = sz.data_ptr<at::BFloat16>();
  uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, N / NR, 1, [&](int64_t begin, int64_t end) {
    for (int64_t rb = begin; rb < end; rb++)
      for (int64_t g = 0; g < ng; g++) {
        uint8_t* out = wp + (rb * ng + g) * bytes;
        for (int j = 0; j < G; j++)
          for (int p = 0; p < 4; p++)
            for (int i = 0; i < 64; i++) {
              const uint8_t* row = qp + (rb * NR + i / 4) * K + g * groupsize + j * QK + 4 * p + i % 4;
              out[(j * 4 + p) * 64 + i] = (row[0] & 15) | (row[16] & 15) << 4;
            }
        auto* params = (at::BFloat16*)(out + 256 * G);  // scale[16], zero[16]
        for (int r = 0; r < NR; r++)
          for (int k = 0; k < 2; k++) params[k * NR + r] = s[(g * N + rb * NR + r) * 2 + k];
      }
  });
  return w;
}
