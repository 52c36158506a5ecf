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

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))  // only these functions

constexpr int R = 4;            // weight rows a tile reads side by side, a quarter of the weight apart
constexpr int64_t AHEAD = 1024;  // elements prefetched ahead in each of them: four far streams need the help

// y[t, r] = x[t] . w[r * ldw] for T rows of x and RR rows of w (ldw apart); K elements each.
template <int T, int RR>
AVX512_BF16 static inline void tile(const at::BFloat16* x, const at::BFloat16* w, float* y, int64_t K, int64_t ldw,
                                    int64_t ldy_t, int64_t ldy_r) {
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
#pragma GCC unroll 4
  for (int t = 0; t < T; t++)
#pragma GCC unroll 4
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

// 16 fp32 lanes from 16 cache values: fp32, or bf16 widened (exactly)
AVX512_BF16 static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512_BF16 static inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// Where a row's keys (or values) are: positions below n in row src (beams that share a prompt read it from one row,
// so that it comes from memory once for all of them), the others in the row's own.
template <typename C>
struct Keys {
  const C *src, *own;
  int64_t n, ld;
  const C* at(int64_t j) const { return (j < n ? src : own) + j * ld; }
};

// One query of decode attention: q [D], its row's keys and values, its mask (m[j * ms], j < S), its output y [D]
template <typename C, typename Mask>
struct Query {
  const float* q;
  Keys<C> k, v;
  const Mask* m;
  int64_t ms;
  float* y;
};

constexpr int64_t TILES_AHEAD = 2;  // prefetched: the memory of one key/value head is read in one stream

// positions j0..j0+15 of keys (or values) as fp32 t [16, 16 NC]; those past S repeat position S - 1 (they weigh 0)
template <int NC, typename C>
AVX512_BF16 static inline void load_tile(const Keys<C>& k, int64_t j0, int64_t S, float* t) {
  for (int j = 0; j < 16; j++) {
    const C* kj = k.at(std::min(j0 + j, S - 1));
    const char* ahead = (const char*)k.at(std::min(j0 + j + TILES_AHEAD * 16, S - 1));
    for (int64_t b = 0; b < 16 * NC * (int64_t)sizeof(C); b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
#pragma GCC unroll 16
    for (int c = 0; c < NC; c++) _mm512_storeu_ps(t + (j * NC + c) * 16, load16(kj + 16 * c));
  }
}

// q . k for the 16 keys of a tile t: each key's products in 16 lanes, then the 16 keys' lanes summed in one tree (four
// rounds of pairwise halving), so that lane j holds key j's score
template <int NC>
AVX512_BF16 static inline __m512 tile_scores(const float* q, const float* t) {
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

// The lanes of positions j0..j0+15 that the mask lets through (false where it is false, or -inf, or past S), and
// what it adds to their scores (a float mask: ALiBi)
template <typename Mask>
AVX512_BF16 static inline __mmask16 mask_tile(const Mask* m, int64_t ms, int64_t j0, int64_t S, __m512& add) {
  const __mmask16 live = S - j0 >= 16 ? 0xffff : (1u << (S - j0)) - 1;
  add = _mm512_setzero_ps();
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

// Queries qs[0..Q) of one key/value head, each computed alone and in one order whatever the other queries and the
// positions past its mask (model.attend's contract); together only in that a tile of keys or values is loaded once
// for consecutive queries that read the same one. s: [Q, S rounded up to 16], t: [16, 16 NC], total: [Q], scratch.
template <int NC, typename C, typename Mask>
AVX512_BF16 static void attend_queries(const Query<C, Mask>* qs, int64_t Q, int64_t S, float* s, float* t,
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
    __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < S16; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(si + j));
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    for (int64_t j = 0; j < S16; j += 16) {
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
      if (!_mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_setzero_ps(), _CMP_NEQ_OQ)) continue;  // weighs nothing
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

// Every query of attend's arguments, in runs that the threads share out: queries in the order (key/value head, row,
// head of its group, position), cut into runs within a key/value head, of a length that gives each thread two runs
template <int NC, typename C, typename Mask>
static void attend_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& m,
                       const int64_t* prefix, at::Tensor& y) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Hkv = k.size(1), S = k.size(2), D = 16 * NC;
  const int64_t G = H / Hkv, per = B * G * T;  // queries per key/value head
  const int64_t cuts = std::max<int64_t>(1, (2 * at::get_num_threads() + Hkv - 1) / Hkv);
  const int64_t run = (per + cuts - 1) / cuts, runs = (per + run - 1) / run;  // runs per key/value head
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
        const int64_t ko = b * k.stride(0) + hk * k.stride(1), ks = src * k.stride(0) + hk * k.stride(1);
        const int64_t qi = ((b * H + h) * T + pos) * D;
        qs[i] = {q.data_ptr<float>() + qi,
                 {k.data_ptr<C>() + ks, k.data_ptr<C>() + ko, n, k.stride(2)},
                 {v.data_ptr<C>() + ks, v.data_ptr<C>() + ko, n, v.stride(2)},
                 m.data_ptr<Mask>() + b * m.stride(0) + h * m.stride(1) + pos * m.stride(2), m.stride(3),
                 y.data_ptr<float>() + qi};
      }
      attend_queries<NC>(qs.data(), Q, S, s.data(), t.data(), total.data());
    }
  });
}

template <int NC>
static void attend_nc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& m,
                      const int64_t* prefix, at::Tensor& y) {
  const bool bf16 = k.scalar_type() == at::kBFloat16, flags = m.scalar_type() == at::kBool;
  if (bf16 && flags) attend_all<NC, at::BFloat16, bool>(q, k, v, m, prefix, y);
  else if (bf16) attend_all<NC, at::BFloat16, float>(q, k, v, m, prefix, y);
  else if (flags) attend_all<NC, float, bool>(q, k, v, m, prefix, y);
  else attend_all<NC, float, float>(q, k, v, m, prefix, y);
}

// Decode attention: q [B, H, T, D] fp32, k v [B, Hkv, S, D] fp32 or bf16 (D contiguous; D 16, 32, 48, 64, 80, 96, 128
// or 256), a mask that broadcasts to [B, H, T, S], bool or float -> [B, H, T, D] fp32. As model.attend: each (row,
// head, query) alone, in one order. prefix: none, or [B, 2] ints: row b's first prefix[b, 1] positions are alike in
// row b + prefix[b, 0] (a hint: where that row is outside 0..B-1 the row's own are read).
at::Tensor attend(const at::Tensor& q_, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                  const std::optional<at::Tensor>& prefix_) {
  const at::Tensor q = q_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), S = k.size(2);
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == v.scalar_type()
              && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16)
              && (mask.scalar_type() == at::kBool || mask.scalar_type() == at::kFloat)
              && k.stride(3) == 1 && v.stride(3) == 1 && k.strides() == v.strides(),
              "attend: fp32 queries, an fp32 or bf16 cache, a bool or fp32 mask");
  at::Tensor prefix;
  if (prefix_.has_value()) {
    prefix = prefix_->to(at::kLong).contiguous();
    TORCH_CHECK(prefix.dim() == 2 && prefix.size(0) == B && prefix.size(1) == 2, "attend: prefix [B, 2]");
  }
  at::Tensor y = at::empty_like(q);
  const at::Tensor m = mask.expand({B, H, T, S});  // broadcast dims get stride 0 (ALiBi's mask has heads)
  const int64_t* p = prefix.defined() ? prefix.data_ptr<int64_t>() : nullptr;
  switch (D) {
    case 16: attend_nc<1>(q, k, v, m, p, y); break;
    case 32: attend_nc<2>(q, k, v, m, p, y); break;
    case 48: attend_nc<3>(q, k, v, m, p, y); break;
    case 64: attend_nc<4>(q, k, v, m, p, y); break;
    case 80: attend_nc<5>(q, k, v, m, p, y); break;
    case 96: attend_nc<6>(q, k, v, m, p, y); break;
    case 128: attend_nc<8>(q, k, v, m, p, y); break;
    case 256: attend_nc<16>(q, k, v, m, p, y); break;
    default: TORCH_CHECK(false, "attend: head size ", D, " is not one of 16, 32, 48, 64, 80, 96, 128, 256");
  }
  return y;
}

bool rows_product_supported() { return __builtin_cpu_supports("avx512bf16"); }

TORCH_LIBRARY(brisk, m) {
  m.def("rows_product(Tensor x, Tensor w) -> Tensor");
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor? prefix=None) -> Tensor");
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
