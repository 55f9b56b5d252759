// CPU kernels for the decode hot path, built on first use by llmos/models/native/__init__.py.
//
// - linear: y = x @ W.T with W stored 4-bit (asymmetric, groups of 32 along K, as GGUF's Q4_1)
//   or 8-bit (symmetric, groups of 32, as Q8_0), dequantized in registers; scales in fp32, or
//   in fp16 as the file has them. At small batch a linear layer is bound by streaming its
//   weights, and these read 5-6x fewer bytes than fp32.
//   Steps of many rows read W in panels of 32 output columns instead (panel_linear). Where the
//   CPU has AVX-512 VNNI, 4-bit weights take integer dot products at every step size instead
//   (q4_vnni.h): the activations split into three int8 digits, about fp32's precision.
// - paged_decode: one query per row against its paged K/V, without gathering the blocks into
//   a padded copy first.
// - decode_layer: a whole decoder layer in one call for rows that each attend over their own
//   paged context (decode rows, and short prefill chunks).
//
// Vectors are AVX-512 or AVX2 intrinsics (chosen by -march=native), with a generic fallback
// for other CPUs. Threads come from ATen (at::parallel_for), so torch.set_num_threads applies.
//
// Batch invariance by construction: every output element of a linear layer is one sum in one
// fixed order, whatever the step's row count and whichever kernel (rows or panels) serves it.
// For K = 32 * G inputs, leaf l (0..31) is the FMA chain over g = 0..G-1 of w[32g + l] *
// x[32g + l], from zero; the output is the tree over the 32 leaves that a 16-lane register's
// halving sum gives: (l, l + 16), then + 8, + 4, + 2, + 1 (tree_sum). The row kernel keeps the
// leaves in two registers' lanes; the panel kernel runs each leaf as a chain of its own over 32
// output columns (x and the panels stored in leaf order) and sums them in the same tree.
// Attention and the norms are per row, over the row's own context, in an order set by its
// length alone.

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t GROUP = 32;  // weights per scale (and per min, for q4)
constexpr int64_t MT = 8;      // rows of x per pass over a weight row
constexpr int64_t PF_AHEAD = 2;  // blocks of weight rows to prefetch ahead (linear_rows)

// Sixteen floats: one AVX-512 register, two AVX2 registers, or a generic vector elsewhere.
#if defined(__AVX512F__)
#include <immintrin.h>
struct V16 {
  __m512 v;
  static V16 zero() { return {_mm512_setzero_ps()}; }
  static V16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static V16 splat(float f) { return {_mm512_set1_ps(f)}; }
  static V16 from_u8(__m128i b) { return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b))}; }
  static V16 from_i8(__m128i b) { return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))}; }
  static V16 fma(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static V16 add(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
  static V16 load_half(const c10::Half* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  float sum() const {  // (the tree of tree_sum: lanes i + 8, then + 4, + 2, + 1)
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    const __m256 s = _mm256_add_ps(lo, hi);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
struct V16 {
  __m256 a, b;
  static V16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static V16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static V16 splat(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
  static V16 from_u8(__m128i x) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(x, 8)))};
  }
  static V16 from_i8(__m128i x) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(x, 8)))};
  }
  static V16 fma(V16 x, V16 y, V16 z) {
    return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)};
  }
  static V16 add(V16 x, V16 y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
  static V16 load_half(const c10::Half* p) {
    const __m128i* h = reinterpret_cast<const __m128i*>(p);
    return {_mm256_cvtph_ps(_mm_loadu_si128(h)), _mm256_cvtph_ps(_mm_loadu_si128(h + 1))};
  }
  void store(float* p) const {
    _mm256_storeu_ps(p, a);
    _mm256_storeu_ps(p + 8, b);
  }
  float sum() const {
    __m256 s = _mm256_add_ps(a, b);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
  }
};
#else
#define LLMOS_GENERIC 1
#endif

#ifdef LLMOS_GENERIC
struct V16 {
  float v[16];
  static V16 zero() { return V16{}; }
  static V16 load(const float* p) { V16 r; std::memcpy(r.v, p, sizeof r.v); return r; }
  static V16 splat(float f) { V16 r; for (float& x : r.v) x = f; return r; }
  static V16 fma(V16 a, V16 b, V16 c) {
    for (int i = 0; i < 16; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static V16 add(V16 a, V16 b) {
    for (int i = 0; i < 16; ++i) a.v[i] += b.v[i];
    return a;
  }
  static V16 load_half(const c10::Half* p) {
    V16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = static_cast<float>(p[i]);
    return r;
  }
  void store(float* p) const { std::memcpy(p, v, sizeof v); }
  float sum() const {  // the same halving tree as the vector versions
    float t[16];
    std::memcpy(t, v, sizeof t);
    for (int w = 8; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) t[i] = t[i] + t[i + w];
    return t[0];
  }
};
inline void dequant_q4(const uint8_t* q, float d, float m, V16& lo, V16& hi) {
  for (int i = 0; i < 16; ++i) {
    lo.v[i] = (q[i] & 15) * d + m;
    hi.v[i] = (q[i] >> 4) * d + m;
  }
}
inline void dequant_q8(const int8_t* q, float d, V16& lo, V16& hi) {
  for (int i = 0; i < 16; ++i) {
    lo.v[i] = q[i] * d;
    hi.v[i] = q[i + 16] * d;
  }
}
#elif defined(__AVX512F__)
// The two halves (k..k+15, k+16..k+31) of one 4-bit group as floats, dequantized: the 16
// possible values d*q + m form one register, and each nibble picks its value with a permute
// (which reads only the low 4 bits of each lane), so no lane is converted from integer.
inline void dequant_q4(const uint8_t* q, float d, float m, V16& lo, V16& hi) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(d), _mm512_set1_ps(m));
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  lo = {_mm512_permutexvar_ps(b, table)};
  hi = {_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table)};
}
#else
// The two halves (k..k+15, k+16..k+31) of one 4-bit group as floats, dequantized.
inline void dequant_q4(const uint8_t* q, float d, float m, V16& lo, V16& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i mask = _mm_set1_epi8(15);
  const V16 vd = V16::splat(d), vm = V16::splat(m);
  lo = V16::fma(V16::from_u8(_mm_and_si128(b, mask)), vd, vm);
  hi = V16::fma(V16::from_u8(_mm_and_si128(_mm_srli_epi16(b, 4), mask)), vd, vm);
}
#endif
#ifndef LLMOS_GENERIC  // (AVX-512 and AVX2 alike)
inline void dequant_q8(const int8_t* q, float d, V16& lo, V16& hi) {
  const V16 vd = V16::splat(d), z = V16::zero();
  lo = V16::fma(V16::from_i8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))), vd, z);
  hi = V16::fma(V16::from_i8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))), vd, z);
}
#endif

// out[m0:m0+R, n] for weight rows [n0, n1): each group is dequantized once for R rows of x,
// and NR weight rows go side by side so that few rows of x still give independent FMA chains.
// Every output is the same sum in the same order whatever R and NR are.
// n values from fp16 to fp32 (exactly: every fp16 value is an fp32 value).
inline void widen(const c10::Half* src, int64_t n, float* dst) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// The scales (S = float) or the fp16 scales widened into `buf` (S = c10::Half, as a GGUF stores
// them: a 4-bit group is 20 bytes, not 24) of `count` consecutive groups from `first`.
template <typename S>
inline const float* scales_at(const S* s, int64_t first, int64_t count, float* buf) {
  if constexpr (std::is_same_v<S, float>) {
    return s + first;
  } else {
    widen(s + first, count, buf);
    return buf;
  }
}

template <bool Q4, int R, int NR, typename S>
void linear_rows(const float* x, int64_t K, int64_t m0, const uint8_t* qw, const S* scales_in,
                 const S* mins_in, int64_t n0, int64_t n1, float* out, int64_t N, float* buf) {
  const int64_t groups = K / GROUP;
  const int64_t row_bytes = Q4 ? K / 2 : K;
  const float* xr[R];
  for (int i = 0; i < R; ++i) xr[i] = x + (m0 + i) * K;
  // The weight rows PF_AHEAD blocks on are prefetched a slice per group: the hardware
  // prefetcher alone kept a core's 8-bit stream at about 7 GB/s
  const int64_t pf_slice = (NR * row_bytes + groups * 64 - 1) / (groups * 64) * 64;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    V16 acc[NR][R][2];
    for (int j = 0; j < NR; ++j)
      for (int i = 0; i < R; ++i) acc[j][i][0] = acc[j][i][1] = V16::zero();
    // this block's NR rows of scales (and mins): rows n..n+NR-1 are one run of NR * groups
    const float* scales = scales_at(scales_in, n * groups, NR * groups, buf);
    const float* mins =
        Q4 ? scales_at(mins_in, n * groups, NR * groups, buf + NR * groups) : nullptr;
    const char* pf = n + (PF_AHEAD + 1) * NR <= N
                         ? reinterpret_cast<const char*>(qw + (n + PF_AHEAD * NR) * row_bytes)
                         : nullptr;
    for (int64_t g = 0; g < groups; ++g) {
      if (pf != nullptr) {
        for (int64_t off = g * pf_slice; off < (g + 1) * pf_slice; off += 64) {
          __builtin_prefetch(pf + off, 0, 3);
        }
      }
      for (int j = 0; j < NR; ++j) {
        const int64_t row = n + j;
        V16 lo, hi;
        if constexpr (Q4) {
          dequant_q4(qw + row * row_bytes + g * 16, scales[j * groups + g],
                     mins[j * groups + g], lo, hi);
        } else {
          dequant_q8(reinterpret_cast<const int8_t*>(qw + row * row_bytes) + g * GROUP,
                     scales[j * groups + g], lo, hi);
        }
        for (int i = 0; i < R; ++i) {
          acc[j][i][0] = V16::fma(lo, V16::load(xr[i] + g * GROUP), acc[j][i][0]);
          acc[j][i][1] = V16::fma(hi, V16::load(xr[i] + g * GROUP + 16), acc[j][i][1]);
        }
      }
    }
    for (int j = 0; j < NR; ++j)
      for (int i = 0; i < R; ++i)
        out[(m0 + i) * N + n + j] = V16::add(acc[j][i][0], acc[j][i][1]).sum();
  }
  if constexpr (NR > 1) {
    if (n < n1) linear_rows<Q4, R, 1>(x, K, m0, qw, scales_in, mins_in, n, n1, out, N, buf);
  }
}

template <bool Q4, typename S>
void linear_tile(const float* x, int64_t K, int64_t m0, int64_t rows, const uint8_t* qw,
                 const S* sc, const S* mn, int64_t n0, int64_t n1, float* out, int64_t N,
                 float* buf) {
  switch (rows) {
    case 1: return linear_rows<Q4, 1, 4>(x, K, m0, qw, sc, mn, n0, n1, out, N, buf);
    case 2: return linear_rows<Q4, 2, 2>(x, K, m0, qw, sc, mn, n0, n1, out, N, buf);
    case 3: return linear_rows<Q4, 3, 1>(x, K, m0, qw, sc, mn, n0, n1, out, N, buf);
    case 4: return linear_rows<Q4, 4, 1>(x, K, m0, qw, sc, mn, n0, n1, out, N, buf);
    case 5: return linear_rows<Q4, 5, 1>(x, K, m0, qw, sc, mn, n0, n1, out, N, buf);
    case 6: return linear_rows<Q4, 6, 1>(x, K, m0, qw, sc, mn, n0, n1, out, N, buf);
    case 7: return linear_rows<Q4, 7, 1>(x, K, m0, qw, sc, mn, n0, n1, out, N, buf);
    default: return linear_rows<Q4, 8, 1>(x, K, m0, qw, sc, mn, n0, n1, out, N, buf);
  }
}

template <bool Q4, typename S>
void quant_linear_into(const float* xp, int64_t M, int64_t K, int64_t N, const uint8_t* wp,
                       const S* sp, const S* mp, float* op) {
  constexpr int64_t NR_MAX = 4;  // (linear_tile's widest block of weight rows)
  // Split the weight rows among threads: each weight byte is read once per MT rows of x.
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(std::is_same_v<S, float> ? 0 : 2 * NR_MAX * (K / GROUP));
    // 16 weight rows at a time stay in L1 while every tile of x passes over them
    for (int64_t nb = n0; nb < n1; nb += 16) {
      const int64_t ne = std::min(nb + 16, n1);
      for (int64_t m0 = 0; m0 < M; m0 += MT) {
        linear_tile<Q4, S>(xp, K, m0, std::min(MT, M - m0), wp, sp, mp, nb, ne, op, N,
                           buf.data());
      }
    }
  });
}

// Scales (and q4's mins) come as fp32, or as fp16 where that holds them exactly (a GGUF's).
template <bool Q4>
torch::Tensor quant_linear(const torch::Tensor& x_in, const torch::Tensor& qw,
                           const torch::Tensor& scales, const torch::Tensor& mins) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == torch::kFloat, "x must be [M, K] float32");
  auto x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0);
  TORCH_CHECK(K % GROUP == 0, "K must be a multiple of 32, got ", K);
  TORCH_CHECK(qw.is_contiguous() && qw.size(1) == (Q4 ? K / 2 : K), "packed weight shape");
  TORCH_CHECK(scales.is_contiguous() && scales.size(0) == N && scales.size(1) == K / GROUP,
              "scales must be [N, K/32]");
  const auto st = scales.scalar_type();
  TORCH_CHECK(st == torch::kFloat || st == torch::kHalf, "scales must be float32 or float16");
  TORCH_CHECK(!Q4 || (mins.scalar_type() == st && mins.is_contiguous() &&
                      mins.sizes() == scales.sizes()),
              "mins must be shaped and typed as the scales");
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = static_cast<const uint8_t*>(qw.data_ptr());
  float* op = out.data_ptr<float>();
  if (st == torch::kFloat) {
    quant_linear_into<Q4, float>(xp, M, K, N, wp, scales.data_ptr<float>(),
                                 Q4 ? mins.data_ptr<float>() : nullptr, op);
  } else {
    quant_linear_into<Q4, c10::Half>(xp, M, K, N, wp, scales.data_ptr<c10::Half>(),
                                     Q4 ? mins.data_ptr<c10::Half>() : nullptr, op);
  }
  return out;
}

// -- weights in panels, for big steps ------------------------------------------------------
// For steps of many rows, where the math and not the weight bytes is the cost: W is read as
// panels of PW output columns, [N/PW][K][PW], so the kernel broadcasts one x value against a
// row of the panel and no horizontal sums are needed. A library GEMM re-packs W on every call;
// these are packed once at load (fp32, or 4/8-bit unpacked per panel into a buffer). The K
// rows of a panel, and the columns of x, are in leaf order (k' = l * G + g for k = 32 g + l),
// so each of the 32 leaves of the fixed order (see the top) is one run of G rows; the leaves
// are summed in that order's tree as they finish, so every output is bitwise what the row
// kernel gives.
constexpr int64_t PW = 32;  // output columns per panel (two AVX-512 registers)
constexpr int64_t PR = 12;  // rows of x per tile: 24 accumulators

// 5-bit bit reversal: leaves in this order pair up as the tree wants (l with l + 16, ...)
constexpr int BITREV5[32] = {0, 16, 8, 24, 4, 20, 12, 28, 2, 18, 10, 26, 6, 22, 14, 30,
                             1, 17, 9,  25, 5, 21, 13, 29, 3, 19, 11, 27, 7, 23, 15, 31};

#if defined(__AVX512F__)
// x: R rows in leaf order (row stride K); panel: [K][PW] in leaf order; stack: 5 * R * PW.
template <int R>
void dense_tile(const float* x, int64_t K, const float* panel, float* out, int64_t N,
                const float* next, float* stack) {
  const int64_t G = K / GROUP;
  int level[6];
  int depth = 0;
  for (int j = 0; j < 32; ++j) {
    const int64_t l = BITREV5[j];
    __m512 acc[R][2];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const float* w = panel + l * G * PW;
    const float* xl = x + l * G;
    for (int64_t g = 0; g < G; ++g) {
      if (next != nullptr) {  // the next panel, on its way from memory while this one computes
        _mm_prefetch(reinterpret_cast<const char*>(next + (l * G + g) * PW), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(next + (l * G + g) * PW + 16), _MM_HINT_T0);
      }
      const __m512 w0 = _mm512_loadu_ps(w + g * PW);
      const __m512 w1 = _mm512_loadu_ps(w + g * PW + 16);
      for (int i = 0; i < R; ++i) {
        const __m512 xv = _mm512_set1_ps(xl[i * K + g]);
        acc[i][0] = _mm512_fmadd_ps(xv, w0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(xv, w1, acc[i][1]);
      }
    }
    // a binary counter over the leaves: equal levels merge (left + right, as the tree does)
    int lev = 0;
    while (depth > 0 && level[depth - 1] == lev) {
      const float* left = stack + (depth - 1) * R * PW;
      for (int i = 0; i < R; ++i) {
        acc[i][0] = _mm512_add_ps(_mm512_loadu_ps(left + i * PW), acc[i][0]);
        acc[i][1] = _mm512_add_ps(_mm512_loadu_ps(left + i * PW + 16), acc[i][1]);
      }
      --depth;
      ++lev;
    }
    float* dst = j == 31 ? nullptr : stack + depth * R * PW;
    for (int i = 0; i < R; ++i) {
      if (dst == nullptr) {
        _mm512_storeu_ps(out + i * N, acc[i][0]);
        _mm512_storeu_ps(out + i * N + 16, acc[i][1]);
      } else {
        _mm512_storeu_ps(dst + i * PW, acc[i][0]);
        _mm512_storeu_ps(dst + i * PW + 16, acc[i][1]);
      }
    }
    if (dst != nullptr) level[depth++] = lev;
  }
}

template <int R = PR>
void dense_rows(const float* x, int64_t rows, int64_t K, const float* panel, float* out,
                int64_t N, const float* next, float* stack) {
  if constexpr (R > 0) {
    if (rows == R) return dense_tile<R>(x, K, panel, out, N, next, stack);
    return dense_rows<R - 1>(x, rows, K, panel, out, N, next, stack);
  }
}

// Panel p of a 4-bit weight stored in panels ([N/32, K, 16] bytes, K in leaf order: byte j
// of row k' holds weight rows j (low nibble) and j + 16 (high); scales and mins [N/32, K/32,
// 32]) as fp32, in leaf order: written in sequence.
void unpack_q4_panel(const uint8_t* pq, const float* pd, const float* pm, int64_t p, int64_t K,
                     float* buf) {
  const int64_t groups = K / GROUP;
  const uint8_t* q = pq + p * K * 16;
  const float* d = pd + p * groups * PW;
  const float* m = pm + p * groups * PW;
  const __m128i mask = _mm_set1_epi8(15);
  for (int64_t k = 0; k < K; ++k) {  // k = l * groups + g
    const int64_t g = k % groups;
    const __m512 d0 = _mm512_loadu_ps(d + g * PW), d1 = _mm512_loadu_ps(d + g * PW + 16);
    const __m512 m0 = _mm512_loadu_ps(m + g * PW), m1 = _mm512_loadu_ps(m + g * PW + 16);
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k * 16));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)));
    const __m512 hi =
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
    _mm512_storeu_ps(buf + k * PW, _mm512_fmadd_ps(lo, d0, m0));  // (as the row kernel's table)
    _mm512_storeu_ps(buf + k * PW + 16, _mm512_fmadd_ps(hi, d1, m1));
  }
}

// Panel p of an 8-bit weight stored in panels ([N/32, K, 32] int8, K in leaf order; scales
// [N/32, K/32, 32]), as fp32 in leaf order.
void unpack_q8_panel(const int8_t* pq, const float* pd, int64_t p, int64_t K, float* buf) {
  const int64_t groups = K / GROUP;
  const int8_t* q = pq + p * K * PW;
  const float* d = pd + p * groups * PW;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {  // k = l * groups + g
    const int64_t g = k % groups;
    const __m512 d0 = _mm512_loadu_ps(d + g * PW), d1 = _mm512_loadu_ps(d + g * PW + 16);
    const __m128i* src = reinterpret_cast<const __m128i*>(q + k * PW);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src + 1)));
    _mm512_storeu_ps(buf + k * PW, _mm512_fmadd_ps(lo, d0, zero));  // (as dequant_q8: q*d + 0)
    _mm512_storeu_ps(buf + k * PW + 16, _mm512_fmadd_ps(hi, d1, zero));
  }
}

// x @ W.T for W in panels of 32 output columns. `fmt` 1: fp32 panels [N/32, K, 32] in `a`
// (leaf order, see pack_dense); 5: 4-bit panels (a, b, c = bytes, scales, mins); 9: 8-bit
// panels (a, b = int8, scales). A quantized panel is unpacked to fp32 once per chunk of x, so
// it reads 4-8x fewer bytes than fp32 panels and then runs the same tiles: the result is what
// fp32 panels would give, and what the row kernel gives.
torch::Tensor panel_linear(int64_t fmt, const torch::Tensor& x_in, const torch::Tensor& a,
                           const torch::Tensor& b, const torch::Tensor& c) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == torch::kFloat, "x must be [M, K] float32");
  const int64_t M = x_in.size(0), K = x_in.size(1), panels = a.size(0);
  TORCH_CHECK(K % GROUP == 0, "K must be a multiple of 32, got ", K);
  TORCH_CHECK(a.dim() == 3 && a.is_contiguous() && a.size(1) == K &&
                  a.size(2) == (fmt == 5 ? PW / 2 : PW),
              "panels must be [N/32, K, 32] (4-bit: [N/32, K, 16])");
  TORCH_CHECK(fmt == 1 || (b.is_contiguous() && b.size(0) == panels && b.size(1) == K / GROUP),
              "panel scales must be [N/32, K/32, 32]");
  // x in leaf order: [M, 32, G], column 32 g + l at l * G + g
  auto x = x_in.view({M, K / GROUP, GROUP}).transpose(1, 2).contiguous();
  const int64_t N = panels * PW;
  auto out = torch::empty({M, N}, x_in.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Threads split the panels; each panel stays in cache while every tile of a chunk of x (a
  // chunk small enough to stay in cache too) passes over it.
  constexpr int64_t CHUNK = 16 * PR;
  for (int64_t c0 = 0; c0 < M; c0 += CHUNK) {
    const int64_t c1 = std::min(M, c0 + CHUNK);
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> buf(fmt == 1 ? 0 : K * PW);
      std::vector<float> stack(5 * PR * PW);
      for (int64_t p = p0; p < p1; ++p) {
        const float* panel = buf.data();
        const float* next = nullptr;  // (fp32 panels: the next one, to prefetch)
        if (fmt == 1) {
          panel = a.data_ptr<float>() + p * K * PW;
          if (p + 1 < p1) next = panel + K * PW;
        } else if (fmt == 5) {
          unpack_q4_panel(a.data_ptr<uint8_t>(), b.data_ptr<float>(), c.data_ptr<float>(), p, K,
                          buf.data());
        } else {
          unpack_q8_panel(a.data_ptr<int8_t>(), b.data_ptr<float>(), p, K, buf.data());
        }
        for (int64_t m0 = c0; m0 < c1; m0 += PR) {
          dense_rows(xp + m0 * K, std::min(PR, c1 - m0), K, panel, op + m0 * N + p * PW, N,
                     m0 == c0 ? next : nullptr, stack.data());
        }
      }
    });
  }
  return out;
}
#endif

#include "q4_vnni.h"  // (format 6)

// -- paged decode attention ----------------------------------------------------------------
template <typename T>
inline const float* as_floats(const T* src, float* buf, int64_t D) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
#if defined(__AVX512F__)
    for (int64_t i = 0; i + 16 <= D; i += 16) {
      _mm512_storeu_ps(buf + i, _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
    }
    for (int64_t i = D / 16 * 16; i < D; ++i) buf[i] = static_cast<float>(src[i]);
#else
    for (int64_t i = 0; i < D; ++i) buf[i] = static_cast<float>(src[i]);
#endif
    return buf;
  }
}

// The largest of p[0..n), n >= 1 (a max is the same in any order; as a scalar chain, which
// the compiler made of a plain loop, it was a quarter of a long context's attention).
inline float max_of(const float* p, int64_t n) {
  float mx = p[0];
  int64_t t = 0;
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(mx);
  for (; t + 16 <= n; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(p + t));
  mx = _mm512_reduce_max_ps(m);
#endif
  for (; t < n; ++t) mx = std::max(mx, p[t]);
  return mx;
}

// One query head of one sequence against its `len` cached keys and values (kv head g).
template <typename T>
void decode_head(const float* q, const T* kc, const T* vc, const int64_t* table, int64_t len,
                 int64_t bs, int64_t Hkv, int64_t D, int64_t g, float scale, float* out,
                 std::vector<float>& scores, std::vector<float>& row) {
  scores.resize(len);
  row.resize(D);
  float* s = scores.data();
  for (int64_t t = 0; t < len; ++t) {
    const int64_t slot = table[t / bs] * bs + t % bs;
    const float* k = as_floats(kc + (slot * Hkv + g) * D, row.data(), D);
    float dot = 0.f;
    for (int64_t i = 0; i < D; ++i) dot += q[i] * k[i];
    s[t] = dot * scale;
  }
  const float mx = max_of(s, len);  // (-ffast-math: no infinities)
  float sum = 0.f;
  for (int64_t t = 0; t < len; ++t) {
    s[t] = expf(s[t] - mx);
    sum += s[t];
  }
  std::memset(out, 0, D * sizeof(float));
  for (int64_t t = 0; t < len; ++t) {
    const int64_t slot = table[t / bs] * bs + t % bs;
    const float* v = as_floats(vc + (slot * Hkv + g) * D, row.data(), D);
    const float p = s[t];
    for (int64_t i = 0; i < D; ++i) out[i] += p * v[i];
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < D; ++i) out[i] *= inv;
}

template <typename T>
inline V16 load_v16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return V16::load(p);
  } else {
    return V16::load_half(p);
  }
}

// All G query heads of kv head g for n rows that share one block table (a sequence's verify
// rows under speculation, or one decode row: n = 1), head_dim D a multiple of 16; row r attends
// over its first lens[r] tokens. Each key and value row is loaded once for every row and head
// (the rows of a verify step used to read the whole context once each, from L3), and the
// cache is walked block by block. A row's sums are the same, in the same order, whatever rows
// are beside it: each score is one dot product, each row's softmax runs over its own scores,
// and each output accumulates over keys in order (kept in `out` between blocks).
#if defined(__AVX512F__)
// Lane j: V16::sum of v[j], by the same tree ((i, i + 8), then + 4, + 2, + 1), for 16 vectors
// at once: 45 shuffles and adds, not 16 x 9.
inline __m512 tree_sum16(const __m512* v) {
  __m512 c[8], e[4], g[2];
  for (int k = 0; k < 8; ++k) {  // c[k] = [v[2k] (i, i + 8) | v[2k + 1] (i, i + 8)]
    c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int k = 0; k < 4; ++k) {  // quarter p of e[k]: v[4k + p], lanes (i, i + 4)
    e[k] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (int k = 0; k < 2; ++k) {  // (i, i + 2)
    g[k] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * k], e[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(e[2 * k], e[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // (i, i + 1): lane 4p + i holds v[p + 4i]; the permute puts v[j] in lane j
  const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(g[0], g[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, f);
}
#endif

// Rows per group (up to 4 of a sequence's verify rows: two threads still split its 8 rows).
constexpr int64_t ROW_GROUP = 4;

template <typename T, int D>
void decode_group(const float* const* q, int64_t n, int64_t G, const T* kc, const T* vc,
                  const int64_t* table, const int64_t* lens, int64_t bs, int64_t Hkv, int64_t g,
                  float scale, float* const* out, std::vector<float>& scores) {
  constexpr int C = D / 16;
  const int64_t stride = Hkv * D;
  // each head's scores 64-byte aligned, so that the vectorized softmax below splits a row of
  // scores the same way wherever the buffer lies: its sums depend on the length alone
  int64_t total = 0, longest = 0;
  for (int64_t r = 0; r < n; ++r) {
    total += G * ((lens[r] + 15) / 16 * 16);
    longest = std::max(longest, lens[r]);
  }
  scores.resize(total + 16);
  float* base = scores.data() + (16 - reinterpret_cast<uintptr_t>(scores.data()) / 4 % 16) % 16;
  float* s[ROW_GROUP];
  int64_t ls[ROW_GROUP];
  for (int64_t r = 0, at = 0; r < n; ++r) {
    ls[r] = (lens[r] + 15) / 16 * 16;
    s[r] = base + at;
    at += G * ls[r];
  }
  for (int64_t t0 = 0; t0 < longest; t0 += bs) {
    const int64_t nb = std::min(bs, longest - t0);
    const T* kblock = kc + (table[t0 / bs] * bs * Hkv + g) * D;
#if defined(__AVX512F__)
    // 16 keys at a time: 16 dot products, then the 16 lane trees at once (tree_sum16)
    for (int64_t j0 = 0; j0 < nb; j0 += 16) {
      const int64_t nk = std::min<int64_t>(16, nb - j0);
      alignas(64) float kbuf[16 * D];
      const float* kr[16];
      for (int64_t j = 0; j < nk; ++j) {
        kr[j] = as_floats(kblock + (j0 + j) * stride, kbuf + j * D, D);
      }
      for (int64_t r = 0; r < n; ++r) {
        const int64_t m = std::min(nk, lens[r] - t0 - j0);
        if (m <= 0) continue;
        for (int64_t h = 0; h < G; ++h) {
          __m512 qv[C], acc[16];
          for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q[r] + h * D + 16 * c);
          for (int64_t j = 0; j < 16; ++j) {
            acc[j] = _mm512_setzero_ps();
            if (j >= m) continue;
            for (int c = 0; c < C; ++c) {
              acc[j] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kr[j] + 16 * c), acc[j]);
            }
          }
          const __m512 dots = _mm512_mul_ps(tree_sum16(acc), _mm512_set1_ps(scale));
          _mm512_mask_storeu_ps(s[r] + h * ls[r] + t0 + j0, static_cast<__mmask16>((1u << m) - 1),
                                dots);
        }
      }
    }
#else
    const T* krow = kblock;
    for (int64_t j = 0; j < nb; ++j, krow += stride) {
      V16 k[C];
      for (int c = 0; c < C; ++c) k[c] = load_v16(krow + 16 * c);
      for (int64_t r = 0; r < n; ++r) {
        if (t0 + j >= lens[r]) continue;
        for (int64_t h = 0; h < G; ++h) {
          V16 acc = V16::zero();
          for (int c = 0; c < C; ++c) acc = V16::fma(V16::load(q[r] + h * D + 16 * c), k[c], acc);
          s[r][h * ls[r] + t0 + j] = acc.sum() * scale;
        }
      }
    }
#endif
  }
  float inv[ROW_GROUP][16];  // (G <= 16: paged_decode_impl)
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t h = 0; h < G; ++h) {
      float* sh = s[r] + h * ls[r];
      const int64_t len = lens[r];
      const float mx = max_of(sh, len);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < len; ++t) {
        sh[t] = expf(sh[t] - mx);
        sum += sh[t];
      }
      inv[r][h] = 1.f / sum;
    }
  }
  for (int64_t t0 = 0; t0 < longest; t0 += bs) {
    const int64_t nb = std::min(bs, longest - t0);
    const T* vblock = vc + (table[t0 / bs] * bs * Hkv + g) * D;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t m = std::min(nb, lens[r] - t0);
      if (m <= 0) continue;
      // HT heads side by side: their accumulators are independent chains (one head's 4 would
      // wait on each FMA's latency), and each value row is loaded once for them
      constexpr int HT = C >= 16 ? 1 : 16 / C;
      for (int64_t h0 = 0; h0 < G; h0 += HT) {
        const int64_t nh = std::min<int64_t>(HT, G - h0);
        V16 o[HT][C];
        for (int64_t h = 0; h < nh; ++h) {
          for (int c = 0; c < C; ++c) {
            o[h][c] = t0 == 0 ? V16::zero() : V16::load(out[r] + (h0 + h) * D + 16 * c);
          }
        }
        const T* vrow = vblock;
        for (int64_t j = 0; j < m; ++j, vrow += stride) {
          V16 v[C];
          for (int c = 0; c < C; ++c) v[c] = load_v16(vrow + 16 * c);
          for (int64_t h = 0; h < nh; ++h) {
            const V16 p = V16::splat(s[r][(h0 + h) * ls[r] + t0 + j]);
            for (int c = 0; c < C; ++c) o[h][c] = V16::fma(p, v[c], o[h][c]);
          }
        }
        for (int64_t h = 0; h < nh; ++h) {
          for (int c = 0; c < C; ++c) o[h][c].store(out[r] + (h0 + h) * D + 16 * c);
        }
      }
    }
  }
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t h = 0; h < G; ++h) {
      float* oh = out[r] + h * D;
      const V16 iv = V16::splat(inv[r][h]);
      for (int c = 0; c < C; ++c) {
        V16::fma(V16::load(oh + 16 * c), iv, V16::zero()).store(oh + 16 * c);
      }
    }
  }
}

template <typename T>
void paged_decode_impl(const torch::Tensor& q, const torch::Tensor& k_cache,
                       const torch::Tensor& v_cache, const torch::Tensor& tables,
                       const torch::Tensor& lens, float scale, torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), G = H / Hkv;
  const int64_t max_blocks = tables.size(1);
  const float* qp = q.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= max_blocks * bs, "context length ", lp[b],
                " out of range for ", max_blocks, " blocks");
  }
  if ((D == 64 || D == 128) && G <= 16) {  // the fast path: G heads per task, rows loaded once
    // consecutive rows with the same block table (a sequence's verify rows) form groups of up
    // to ROW_GROUP, which read each key and value once; a task is one group's kv head g
    std::vector<int64_t> starts;
    for (int64_t b = 0; b < B; ++b) {
      const bool same = b > 0 && b - starts.back() < ROW_GROUP &&
                        std::memcmp(tp + b * max_blocks, tp + (b - 1) * max_blocks,
                                    max_blocks * sizeof(int64_t)) == 0;
      if (!same) starts.push_back(b);
    }
    const int64_t groups = starts.size();
    starts.push_back(B);
    at::parallel_for(0, groups * Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t grp = task / Hkv, g = task % Hkv;
        const int64_t b0 = starts[grp], n = starts[grp + 1] - b0;
        const float* qs[ROW_GROUP];
        float* os[ROW_GROUP];
        for (int64_t r = 0; r < n; ++r) {
          qs[r] = qp + ((b0 + r) * H + g * G) * D;
          os[r] = op + ((b0 + r) * H + g * G) * D;
        }
        if (D == 64) {
          decode_group<T, 64>(qs, n, G, kp, vp, tp + b0 * max_blocks, lp + b0, bs, Hkv, g,
                              scale, os, scores);
        } else {
          decode_group<T, 128>(qs, n, G, kp, vp, tp + b0 * max_blocks, lp + b0, bs, Hkv, g,
                               scale, os, scores);
        }
      }
    });
    return;
  }
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, row;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      decode_head<T>(qp + task * D, kp, vp, tp + b * max_blocks, lp[b], bs, Hkv, D, h / G,
                     scale, op + task * D, scores, row);
    }
  });
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor tables, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat, "q must be [B, H, D] float32");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches must be contiguous [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0,
              "head shapes of q and the cache do not match");
  TORCH_CHECK(tables.scalar_type() == torch::kLong && lens.scalar_type() == torch::kLong,
              "block tables and lengths must be int64");
  auto qc = q.contiguous();
  auto tc = tables.contiguous();
  auto lc = lens.contiguous();
  auto out = torch::empty_like(qc);
  if (k_cache.scalar_type() == torch::kFloat) {
    paged_decode_impl<float>(qc, k_cache, v_cache, tc, lc, static_cast<float>(scale), out);
  } else if (k_cache.scalar_type() == torch::kHalf) {
    paged_decode_impl<c10::Half>(qc, k_cache, v_cache, tc, lc, static_cast<float>(scale), out);
  } else {
    TORCH_CHECK(false, "paged_decode supports float32 and float16 caches");
  }
  return out;
}

// -- one decoder layer for a batch of decode rows -----------------------------------------
// A weight as Python hands it over: (format, a, b, c) with format 0 = dense fp32 (a = weight),
// 1 = dense fp32 packed in panels (a = packed, b = W as it was),
// 4 = q4 (a = packed, b = scales, c = mins), 8 = q8 (a = packed, b = scales),
// 5 and 9 = q4 and q8 stored in panels (see panel_linear), 6 = q4 in VNNI blocks (q4_vnni.h).
using Weight = std::tuple<int64_t, torch::Tensor, torch::Tensor, torch::Tensor>;

torch::Tensor weight_linear(const Weight& w, const torch::Tensor& x) {
  const auto& [fmt, a, b, c] = w;
  if (fmt == 4) return quant_linear<true>(x, a, b, c);
  if (fmt == 8) return quant_linear<false>(x, a, b, b);
#if defined(LLMOS_VNNI)
  if (fmt == 6) return vnni_linear(x, a, b, c);
#endif
  TORCH_CHECK(fmt != 6, "no VNNI kernel for 4-bit weights on this CPU");
#if defined(__AVX512F__)
  if (fmt == 1 || fmt == 5 || fmt == 9) return panel_linear(fmt, x, a, b, c);
#endif
  TORCH_CHECK(fmt != 5 && fmt != 9, "no kernel for weights in panels on this CPU");
  if (fmt == 1) return at::matmul(x, b.t());  // (no panel kernel on this CPU: b is W itself)
  return at::matmul(x, a.t());
}

inline void add_into(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

void rms_norm_rows(const float* x, const float* w, float eps, int64_t rows, int64_t n,
                   float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    // the sum of squares in one order set by n alone (16 lanes, the tree, then the tail)
    V16 acc = V16::zero();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const V16 v = V16::load(xr + i);
      acc = V16::fma(v, v, acc);
    }
    float ss = acc.sum();
    for (; i < n; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / n + eps);
    for (int64_t i = 0; i < n; ++i) out[r * n + i] = w[i] * (xr[i] * inv);
  }
}

// rotate-half RoPE in place on `heads` heads of row r: x*cos + rotate_half(x)*sin
void rope_row(float* x, const float* cos, const float* sin, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * D;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

template <typename T>
void store_kv(const float* k, const float* v, T* kc, T* vc, int64_t slot, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    kc[slot * n + i] = static_cast<T>(k[i]);
    vc[slot * n + i] = static_cast<T>(v[i]);
  }
}

// x: [T, hidden]; row i attends to the first lens[i] tokens of its own block table (a decode
// row, or one row of a short prefill chunk, whose keys this call writes first). Returns new x.
torch::Tensor decode_layer(const torch::Tensor& x, const torch::Tensor& input_norm,
                           const torch::Tensor& post_norm, double eps, const Weight& qkv,
                           const c10::optional<torch::Tensor>& qkv_bias, const Weight& o,
                           const Weight& gate_up, const Weight& down, const torch::Tensor& cos,
                           const torch::Tensor& sin, const torch::Tensor& k_cache,
                           const torch::Tensor& v_cache, const torch::Tensor& slots,
                           const torch::Tensor& tables, const torch::Tensor& lens,
                           int64_t num_heads, int64_t num_kv_heads, double scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "x must be contiguous [B, hidden] float32");
  const int64_t B = x.size(0), hidden = x.size(1);
  const int64_t D = k_cache.size(3), q_dim = num_heads * D, kv_dim = num_kv_heads * D;
  auto h = torch::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), input_norm.data_ptr<float>(), eps, B, hidden,
                h.data_ptr<float>());
  auto qkv_out = weight_linear(qkv, h).contiguous();  // [B, q + 2 kv]
  if (qkv_bias) qkv_out.add_(*qkv_bias);
  const int64_t width = qkv_out.size(1);
  auto q = torch::empty({B, num_heads, D}, x.options());
  float* qkvp = qkv_out.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    float* row = qkvp + b * width;
    rope_row(row, cp + b * D, sp + b * D, num_heads, D);
    rope_row(row + q_dim, cp + b * D, sp + b * D, num_kv_heads, D);
    std::memcpy(q.data_ptr<float>() + b * q_dim, row, q_dim * sizeof(float));
    if (k_cache.scalar_type() == torch::kFloat) {
      store_kv(row + q_dim, row + q_dim + kv_dim, k_cache.data_ptr<float>(),
               v_cache.data_ptr<float>(), slot[b], kv_dim);
    } else {
      store_kv(row + q_dim, row + q_dim + kv_dim, k_cache.data_ptr<c10::Half>(),
               v_cache.data_ptr<c10::Half>(), slot[b], kv_dim);
    }
  }
  auto attn = paged_decode(q, k_cache, v_cache, tables, lens, scale).view({B, q_dim});
  auto x1 = weight_linear(o, attn);  // + the residual, below (no ATen op per add)
  add_into(x1.data_ptr<float>(), x.data_ptr<float>(), B * hidden);
  rms_norm_rows(x1.data_ptr<float>(), post_norm.data_ptr<float>(), eps, B, hidden,
                h.data_ptr<float>());
  auto gu = weight_linear(gate_up, h).contiguous();  // [B, 2I]
  const int64_t inter = gu.size(1) / 2;
  auto act = torch::empty({B, inter}, x.options());
  const float* g = gu.data_ptr<float>();
  float* a = act.data_ptr<float>();
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {  // (a few rows: one thread)
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t i = 0; i < inter; ++i) {
        const float gv = g[b * 2 * inter + i];
        a[b * inter + i] = gv / (1.f + std::exp(-gv)) * g[b * 2 * inter + inter + i];
      }
    }
  });
  add_into(x1.data_ptr<float>(), weight_linear(down, act).data_ptr<float>(), B * hidden);
  return x1;
}

// The whole layer stack of a decode step in one call. Between layers a Python loop ran the
// interpreter and torch's dispatcher with caches that each layer's weight stream had just
// evicted: tens of µs per layer at batch 1, more than a layer's attention and norms. The
// stack holds each layer's weights in both forms (rows for small steps, panels for big).
class DecodeStack {
 public:
  DecodeStack(std::vector<torch::Tensor> input_norms, std::vector<torch::Tensor> post_norms,
              std::vector<c10::optional<torch::Tensor>> qkv_biases,
              std::vector<std::vector<Weight>> small, std::vector<std::vector<Weight>> big,
              double eps, int64_t num_heads, int64_t num_kv_heads, double scale)
      : input_norms_(std::move(input_norms)), post_norms_(std::move(post_norms)),
        qkv_biases_(std::move(qkv_biases)), small_(std::move(small)), big_(std::move(big)),
        eps_(eps), num_heads_(num_heads), num_kv_heads_(num_kv_heads), scale_(scale) {
    const size_t n = input_norms_.size();
    TORCH_CHECK(post_norms_.size() == n && qkv_biases_.size() == n && small_.size() == n &&
                    big_.size() == n,
                "one norm, bias and weight set per layer");
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK(small_[i].size() == 4 && big_[i].size() == 4,
                  "each layer has four weights: qkv, o, gate_up, down");
    }
  }

  // x: [T, hidden]; kv: each layer's (k_cache, v_cache); `big`: read the panel forms.
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const std::vector<std::tuple<torch::Tensor, torch::Tensor>>& kv,
                        const torch::Tensor& slots, const torch::Tensor& tables,
                        const torch::Tensor& lens, bool big) const {
    TORCH_CHECK(kv.size() == input_norms_.size(), "one KV cache pair per layer");
    x = x.contiguous();
    const auto cs = cos.contiguous(), sn = sin.contiguous();
    for (size_t i = 0; i < kv.size(); ++i) {
      const auto& w = big ? big_[i] : small_[i];
      x = decode_layer(x, input_norms_[i], post_norms_[i], eps_, w[0], qkv_biases_[i], w[1], w[2],
                       w[3], cs, sn, std::get<0>(kv[i]), std::get<1>(kv[i]), slots, tables,
                       lens, num_heads_, num_kv_heads_, scale_);
    }
    return x;
  }

 private:
  std::vector<torch::Tensor> input_norms_, post_norms_;
  std::vector<c10::optional<torch::Tensor>> qkv_biases_;
  std::vector<std::vector<Weight>> small_, big_;
  double eps_;
  int64_t num_heads_, num_kv_heads_;
  double scale_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &weight_linear, "x @ W.T for a weight given as (format, tensors...)",
        py::arg("weight"), py::arg("x"));
  m.def("has_panels", []() {
#if defined(__AVX512F__)
    return true;
#else
    return false;
#endif
  }, "whether the panel formats (1, 5, 9) have kernels here");
  m.def("has_vnni", []() {
#if defined(LLMOS_VNNI)
    return true;
#else
    return false;
#endif
  }, "whether format 6 (4-bit weights through VNNI integer dot products) has a kernel here");
  m.def("paged_decode", &paged_decode, "one query per sequence over its paged K/V");
  m.def("decode_layer", &decode_layer, "a decoder layer, each row over its own paged context");
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<c10::optional<torch::Tensor>>, std::vector<std::vector<Weight>>,
                    std::vector<std::vector<Weight>>, double, int64_t, int64_t, double>())
      .def("forward", &DecodeStack::forward, "every layer of a step, each row over its own "
           "paged context");
}
