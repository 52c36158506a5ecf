// What brisk's kernel files share: cpu_kernels.cpp (the ops' registration, bf16 and int8 row
// products), cpu_attend.cpp (attention) and cpu_int4.cpp (int4 products), built in parallel by
// cpu.py. Here: the instruction-set attributes, the ops the other files define, a few AVX2 loads,
// and the one quantizer of activations to int8 per block of 32. Lean headers: <ATen/ATen.h> costs
// seconds in every file.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// each function compiled for its own set by a target attribute (no global -m flags): one build
// runs both paths
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni")))
#define AVX2 __attribute__((target("avx2,fma,f16c")))

// The highest path this CPU runs: 2 AVX-512 (F, BW, VL, BF16, VNNI), 1 AVX2 (FMA, F16C), 0 none
int64_t cpu_isa();
// refuses a path this CPU does not run (isa 1 or 2 only)
void check_isa(int64_t isa, const char* op);

// the ops of cpu_attend.cpp and cpu_int4.cpp (their comments there), registered in cpu_kernels.cpp
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& mask, const std::optional<at::Tensor>& prefix, int64_t isa);
at::Tensor int4_product(const at::Tensor& x, const at::Tensor& w, int64_t groupsize,
                        int64_t isa);
at::Tensor int4_pack(const at::Tensor& q, const at::Tensor& scales_and_zeros,
                     int64_t groupsize);

// 8 fp32 lanes summed in one order: the halves, then pairs
AVX2 static inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 8 fp32 lanes from the values c * 8 .. c * 8 + 7 of p (activations, or a cache position's):
// fp32, or bf16 widened (exactly)
AVX2 static inline __m256 load8(const float* p, int c) { return _mm256_loadu_ps(p + 8 * c); }
AVX2 static inline __m256 load8(const at::BFloat16* p, int c) {
  const __m128i v = _mm_loadu_si128((const __m128i*)(p + 8 * c));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// Activations as int8 in blocks of 32, as llama.cpp's Q8_0 (brisk's int8 and int4 products): x ~
// d * q, d = max |x| / 127, q = x / d rounded to nearest (ties to even) in -127..127; a block of
// zeros: d 0, q 0. Divided, not multiplied by 1 / d: correctly rounded, the round(x / d) of torch
// (the tests' references, cpu.kv_store). Writes q [32], returns d. The scalar reference:
constexpr int QK8 = 32;

template <typename X>
static inline float quantize_q8_ref(const X* x, int8_t* q) {
  float amax = 0.0f;
  for (int i = 0; i < QK8; i++) amax = std::max(amax, std::fabs((float)x[i]));
  const float d = amax / 127.0f;
  for (int i = 0; i < QK8; i++) q[i] = d != 0.0f ? (int8_t)std::nearbyint((float)x[i] / d) : 0;
  return d;
}

// Bytes of activations a block of rows holds (brisk's products): they stay in the L2 cache while
// each thread's tiles of weight rows pass over them
constexpr int64_t ROW_BLOCK_BYTES = 1 << 18;

// Values of activations a thread quantizes at least: a prompt's rows in parallel, the few rows of a
// decode step inline (a parallel region's start would cost more)
constexpr int64_t QUANT_GRAIN = 16384;

// AVX2 (both SIMD paths use it): the same roundings
template <typename X>
AVX2 static inline float quantize_q8(const X* x, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], mx = _mm256_setzero_ps();
  for (int i = 0; i < 4; i++) {
    v[i] = load8(x, i);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float d = _mm_cvtss_f32(m4) / 127.0f;
  if (d == 0.0f) {
    _mm256_storeu_si256((__m256i*)q, _mm256_setzero_si256());
    return d;
  }
  __m256i n[4];
  for (int i = 0; i < 4; i++)
    n[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(v[i], _mm256_set1_ps(d)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  // int32 -> int8, in order: the packs interleave 128-bit lanes, the permute puts them back
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256((__m256i*)q, _mm256_permutevar8x32_epi32(b, perm));
  return d;
}
