// brisk's attention on the CPU (a decode step's, a prompt's), built with cpu_kernels.cpp by cpu.py:
// AVX-512 (a tile of keys loaded once for the queries that read it), AVX2 (one query at a time) and
// the scalar reference, each query reduced alone and in one order (model.attend's contract).
#include "cpu_kernels.h"

// e^x as Cephes' expf: x = n ln2 + r (ln2 in a high and a low part), e^r = 1 + r + r^2 p(r), scaled by 2^n;
// x clamped below at EXP_MIN, e^-inf = 0. The constants of both paths' exp:
constexpr float EXP_MIN = -87.3f, LOG2E = 1.44269504088896341f;
constexpr float LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
constexpr float EXP_P[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                            1.6666665459e-1f, 5.0000001201e-1f};

// e^x, 16 lanes
AVX512 static inline __m512 exp16(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
  __m512 p = _mm512_set1_ps(EXP_P[0]);
  for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P[i]));
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

// Where a row's keys (or values) are: positions below n in row src (beams that share a prompt read
// it from one row, so that it comes from memory once for all of them), the others in the row's
// own; ld bytes from one position to the next. Position j's values of type C: at<C>(j).
struct Keys {
  const char *src, *own;
  int64_t n, ld;
  template <typename C>
  const C* at(int64_t j) const { return (const C*)((j < n ? src : own) + j * ld); }
};

// One query of attention: q [D], its row's keys and values, its mask (m[j * ms], j < S: fp32, or
// int64 where last), its output y [D], and the positions it reads, n: S, or up to its last position
// (an int64 mask: the rest would weigh 0, adding nothing). Untyped: one function (attend_all) fills
// them for every kernel.
struct Query {
  const float* q;
  Keys k, v;
  const void* m;
  int64_t ms;
  bool last;
  float* y;
  int64_t n;
};

// the bytes of one position of a head, D = 16 NC values of C (an int8 block holds them all)
template <int NC, typename C>
constexpr int64_t row_bytes() { return std::is_same_v<C, block_kv8<NC>> ? sizeof(C) : 16 * NC * sizeof(C); }

constexpr int64_t TILES_AHEAD = 2;  // prefetched: the memory of one key/value head is read in one stream

// positions j0..j0+15 of keys (or values) as fp32 t [16, 16 NC]; those past S repeat position S - 1 (they weigh 0)
template <int NC, typename C>
AVX512 static inline void load_tile(const Keys& k, int64_t j0, int64_t S, float* t) {
  for (int j = 0; j < 16; j++) {
    const C* kj = k.at<C>(std::min(j0 + j, S - 1));
    const char* ahead = (const char*)k.at<C>(std::min(j0 + j + TILES_AHEAD * 16, S - 1));
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

// Whether query q attends position j, and what its mask adds to the score: a float mask (not -inf;
// ALiBi's bias), or an int64 one, its last position (j <= m[0]: causal attention, no [T, S] mask)
static inline bool attended(const Query& q, int64_t j, float& add) {
  add = 0.0f;
  if (q.last) return j <= *(const int64_t*)q.m;
  return (add = ((const float*)q.m)[j * q.ms]) != -INFINITY;
}

// The lanes of positions j0..j0+15 that q's mask lets through (attended, and before S), and what
// it adds to their scores (a float mask: ALiBi)
AVX512 static inline __mmask16 mask_tile(const Query& q, int64_t j0, int64_t S, __m512& add) {
  const __mmask16 live = S - j0 >= 16 ? 0xffff : (1u << (S - j0)) - 1;
  add = _mm512_setzero_ps();
  if (q.last) {
    const int64_t n = std::clamp<int64_t>(*(const int64_t*)q.m - j0 + 1, 0, 16);
    return live & ((1u << n) - 1);
  }
  const float* m = (const float*)q.m;
  if (q.ms == 1) {
    add = _mm512_maskz_loadu_ps(live, m + j0);
  } else {  // a mask broadcast along positions
    alignas(64) float f[16];
    for (int j = 0; j < 16; j++) f[j] = j0 + j < S ? m[(j0 + j) * q.ms] : 0.0f;
    add = _mm512_load_ps(f);
  }
  return live & _mm512_cmp_ps_mask(add, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
}

// Queries qs[0..Q) of one key/value head, each computed alone and in one order whatever the other queries and the
// positions past its mask (model.attend's contract); together only in that a tile of keys or values is loaded once
// for consecutive queries that read the same one. s: [Q, S rounded up to 16], t: [16, 16 NC], total: [Q], scratch.
template <int NC, typename C>
AVX512 static void attend_queries(const Query* qs, int64_t Q, int64_t S, float* s, float* t,
                                       float* total) {
  const int64_t S16 = (S + 15) / 16 * 16;
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(16.0f * NC));
  const C* held = nullptr;  // the positions t holds, unless a tile straddles a shared prefix's end
  auto load = [&](const Keys& k, int64_t j0) {
    const C* first = k.at<C>(j0);
    const bool whole = j0 + 16 <= k.n || j0 >= k.n;  // the tile's positions all in one row
    if (whole && first == held) return;
    load_tile<NC, C>(k, j0, S, t);
    held = whole ? first : nullptr;
  };
  for (int64_t j0 = 0; j0 < S; j0 += 16)
    for (int64_t i = 0; i < Q; i++) {
      if (j0 >= qs[i].n) continue;
      __m512 add, sj = _mm512_set1_ps(-INFINITY);
      const __mmask16 keep = mask_tile(qs[i], j0, S, add);
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
  x = _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
  __m256 p = _mm256_set1_ps(EXP_P[0]);
  for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P[i]));
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
template <int NC, typename C>
AVX2 static void attend_query_avx2(const Query& q, int64_t S, float* s) {
  constexpr int NV = 2 * NC;  // vectors of 8 along the head
  const float scale = 1.0f / std::sqrt(16.0f * NC);
  __m256 qv[NV];
#pragma GCC unroll 32
  for (int c = 0; c < NV; c++) qv[c] = _mm256_loadu_ps(q.q + 8 * c);
  float mx = -INFINITY;
  for (int64_t j = 0; j < S; j++) {
    float add;
    if (!attended(q, j, add)) {
      s[j] = -INFINITY;
      continue;
    }
    const C* kj = q.k.at<C>(j);
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
    const C* vj = q.v.at<C>(j);
#pragma GCC unroll 32
    for (int c = 0; c < NV; c++) a[c] = _mm256_fmadd_ps(pj, load8(vj, c), a[c]);
  }
  const __m256 total = _mm256_set1_ps(sum8(sum));
#pragma GCC unroll 32
  for (int c = 0; c < NV; c++) _mm256_storeu_ps(q.y + 8 * c, _mm256_div_ps(a[c], total));
}

// The scalar reference (isa 0): one query against S positions, one value at a time, e^x from std::exp; s: [S]
template <int NC, typename C>
static void attend_query_ref(const Query& q, int64_t S, float* s) {
  constexpr int D = 16 * NC;
  const float scale = 1.0f / std::sqrt((float)D);
  float mx = -INFINITY, total = 0.0f;
  for (int64_t j = 0; j < S; j++) {
    float add;
    s[j] = -INFINITY;
    if (!attended(q, j, add)) continue;
    float dot = 0.0f;
    for (int i = 0; i < D; i++) dot += q.q[i] * value(q.k.at<C>(j), i);
    s[j] = dot * scale + add;
    mx = std::max(mx, s[j]);
  }
  for (int64_t j = 0; j < S; j++) total += s[j] = std::exp(s[j] - mx);
  for (int i = 0; i < D; i++) q.y[i] = 0.0f;
  for (int64_t j = 0; j < S; j++)
    for (int i = 0; i < D; i++) q.y[i] += s[j] * value(q.v.at<C>(j), i);
  for (int i = 0; i < D; i++) q.y[i] /= total;
}

constexpr int64_t MAX_RUN = 64;  // queries per run at most: a prompt's scores [run, S] do not grow with its length

// The queries qs[0..Q) of one run (attend_all), each alone and in one order; s: [Q, S rounded up
// to 16], t: [16, 16 NC], total: [Q], scratch. AVX-512 takes them together (attend_queries), AVX2
// and the reference one by one.
using Kernel = void (*)(const Query* qs, int64_t Q, int64_t S, float* s, float* t, float* total);

template <int NC, typename C>
static void queries_avx2(const Query* qs, int64_t Q, int64_t S, float* s, float*, float*) {
  const int64_t S16 = (S + 15) / 16 * 16;
  for (int64_t i = 0; i < Q; i++) attend_query_avx2<NC, C>(qs[i], qs[i].n, s + i * S16);
}

template <int NC, typename C>
static void queries_ref(const Query* qs, int64_t Q, int64_t S, float* s, float*, float*) {
  const int64_t S16 = (S + 15) / 16 * 16;
  for (int64_t i = 0; i < Q; i++) attend_query_ref<NC, C>(qs[i], qs[i].n, s + i * S16);
}

// Every query of attend's arguments, in runs that the threads share out: queries in the order
// (key/value head, row, head of its group, position), cut into runs within a key/value head, of a
// length that gives each thread two runs (at most MAX_RUN). One function for every kernel: its
// instantiations per kernel were most of this file's build time.
static void attend_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& m, const int64_t* prefix, at::Tensor& y, Kernel kernel) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2);
  const int64_t G = H / Hkv, per = B * G * T;  // queries per key/value head
  const int64_t cuts = std::max<int64_t>(1, (2 * at::get_num_threads() + Hkv - 1) / Hkv);
  const int64_t run = std::min(MAX_RUN, (per + cuts - 1) / cuts);
  const int64_t runs = (per + run - 1) / run;  // runs per key/value head
  const int64_t e = k.element_size(), me = m.element_size();  // strides in bytes
  const char *kp = (const char*)k.data_ptr(), *vp = (const char*)v.data_ptr();
  const char* mp = (const char*)m.data_ptr();
  const bool last = m.scalar_type() == at::kLong;
  at::parallel_for(0, Hkv * runs, 1, [&](int64_t begin, int64_t end) {
    const int64_t S16 = (S + 15) / 16 * 16;
    std::vector<float> s(run * S16), t(16 * D), total(run);
    std::vector<Query> qs(run);
    for (int64_t r = begin; r < end; r++) {
      const int64_t hk = r / runs, first = r % runs * run, Q = std::min(per, first + run) - first;
      for (int64_t i = 0; i < Q; i++) {
        const int64_t b = (first + i) / (G * T), h = hk * G + (first + i) / T % G;
        const int64_t pos = (first + i) % T, other = prefix ? b + prefix[2 * b] : b;
        const int64_t src = other >= 0 && other < B ? other : b;
        const int64_t n = src == b ? 0 : prefix[2 * b + 1];
        const int64_t ko = (b * k.stride(0) + hk * k.stride(1)) * e;
        const int64_t ks = (src * k.stride(0) + hk * k.stride(1)) * e;
        const int64_t qi = ((b * H + h) * T + pos) * D;
        const char* mi = mp + (b * m.stride(0) + h * m.stride(1) + pos * m.stride(2)) * me;
        const int64_t reads = last ? std::clamp<int64_t>(*(const int64_t*)mi + 1, 1, S) : S;
        qs[i] = {q.data_ptr<float>() + qi, {kp + ks, kp + ko, n, k.stride(2) * e},
                 {vp + ks, vp + ko, n, v.stride(2) * e}, mi, m.stride(3), last,
                 y.data_ptr<float>() + qi, reads};
      }
      kernel(qs.data(), Q, S, s.data(), t.data(), total.data());
    }
  });
}

// the kernel of a head size (16 NC) and cache type C on path isa
template <int NC, typename C>
static Kernel kernel_for(int64_t isa) {
  return isa == 2 ? attend_queries<NC, C> : isa == 1 ? queries_avx2<NC, C> : queries_ref<NC, C>;
}

template <int NC>
static Kernel kernel_for(const at::Tensor& k, int64_t isa) {
  if (k.scalar_type() == at::kBFloat16) return kernel_for<NC, at::BFloat16>(isa);
  if (k.scalar_type() == at::kChar) return kernel_for<NC, block_kv8<NC>>(isa);
  return kernel_for<NC, float>(isa);
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
  at::Tensor y = q.new_empty(q.sizes());
  // a bool mask (the tests') as the fp32 one it means, 0 or -inf: bitwise alike, no kernel of its own
  const at::Tensor f = mask.scalar_type() != at::kBool
      ? mask
      : mask.new_zeros(mask.sizes(), mask.options().dtype(at::kFloat))
            .masked_fill_(mask.logical_not(), -INFINITY);
  const at::Tensor m = f.expand({B, H, T, S});  // broadcast dims get stride 0 (ALiBi's mask has heads)
  const int64_t* p = prefix.defined() ? prefix.data_ptr<int64_t>() : nullptr;
  Kernel kernel;
  switch (D) {
    case 16: kernel = kernel_for<1>(k, isa); break;
    case 32: kernel = kernel_for<2>(k, isa); break;
    case 48: kernel = kernel_for<3>(k, isa); break;
    case 64: kernel = kernel_for<4>(k, isa); break;
    case 80: kernel = kernel_for<5>(k, isa); break;
    case 96: kernel = kernel_for<6>(k, isa); break;
    case 128: kernel = kernel_for<8>(k, isa); break;
    case 256: kernel = kernel_for<16>(k, isa); break;
    default: TORCH_CHECK(false, "attend: head size ", D, " is not one of 16, 32, 48, 64, 80, 96, 128, 256");
  }
  attend_all(q, k, v, m, p, y, kernel);
  return y;
}
