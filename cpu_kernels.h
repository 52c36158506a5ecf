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
