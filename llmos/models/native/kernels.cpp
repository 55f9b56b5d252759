// CPU kernels for the decode hot path, built on first use by llmos/models/native/__init__.py.
//
// - q4_linear / q8_linear: y = x @ W.T with W stored 4-bit (asymmetric, groups of 32 along K,
//   as GGUF's Q4_1) or 8-bit (symmetric, groups of 32, as Q8_0), dequantized in registers.
//   At small batch a linear layer is bound by streaming its weights, and these read 5-6x fewer
//   bytes than fp32.
// - paged_decode: one new query per sequence against its paged K/V, without gathering the
//   blocks into a padded copy first.
//
// Vectors use GCC's vector extensions, so the same source compiles to AVX-512, AVX2 or NEON
// with -march=native. Threads come from ATen (at::parallel_for), so torch.set_num_threads
// applies. Every output element is reduced in a fixed order that does not depend on the batch.

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t GROUP = 32;  // weights per scale (and per min, for q4)
constexpr int64_t MT = 4;      // rows of x per pass over a weight row

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
  float sum() const { return _mm512_reduce_add_ps(v); }
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
  float sum() const { float s = 0.f; for (float x : v) s += x; return s; }
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
#else
// The two halves (k..k+15, k+16..k+31) of one 4-bit group as floats, dequantized.
inline void dequant_q4(const uint8_t* q, float d, float m, V16& lo, V16& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i mask = _mm_set1_epi8(15);
  const V16 vd = V16::splat(d), vm = V16::splat(m);
  lo = V16::fma(V16::from_u8(_mm_and_si128(b, mask)), vd, vm);
  hi = V16::fma(V16::from_u8(_mm_and_si128(_mm_srli_epi16(b, 4), mask)), vd, vm);
}
inline void dequant_q8(const int8_t* q, float d, V16& lo, V16& hi) {
  const V16 vd = V16::splat(d), z = V16::zero();
  lo = V16::fma(V16::from_i8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))), vd, z);
  hi = V16::fma(V16::from_i8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))), vd, z);
}
#endif

// out[m0:m0+R, n] for weight rows [n0, n1): each group is dequantized once for R rows of x.
template <bool Q4, int R>
void linear_rows(const float* x, int64_t K, int64_t m0, const uint8_t* qw, const float* scales,
                 const float* mins, int64_t n0, int64_t n1, float* out, int64_t N) {
  const int64_t groups = K / GROUP;
  const int64_t row_bytes = Q4 ? K / 2 : K;
  const float* xr[R];
  for (int i = 0; i < R; ++i) xr[i] = x + (m0 + i) * K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = qw + n * row_bytes;
    const float* d = scales + n * groups;
    V16 acc[R][2];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = V16::zero();
    for (int64_t g = 0; g < groups; ++g) {
      V16 lo, hi;
      if constexpr (Q4) {
        dequant_q4(w + g * 16, d[g], mins[n * groups + g], lo, hi);
      } else {
        dequant_q8(reinterpret_cast<const int8_t*>(w) + g * GROUP, d[g], lo, hi);
      }
      for (int i = 0; i < R; ++i) {
        acc[i][0] = V16::fma(lo, V16::load(xr[i] + g * GROUP), acc[i][0]);
        acc[i][1] = V16::fma(hi, V16::load(xr[i] + g * GROUP + 16), acc[i][1]);
      }
    }
    for (int i = 0; i < R; ++i) out[(m0 + i) * N + n] = acc[i][0].sum() + acc[i][1].sum();
  }
}

template <bool Q4>
void linear_tile(const float* x, int64_t K, int64_t m0, int64_t rows, const uint8_t* qw,
                 const float* scales, const float* mins, int64_t n0, int64_t n1, float* out,
                 int64_t N) {
  switch (rows) {
    case 1: return linear_rows<Q4, 1>(x, K, m0, qw, scales, mins, n0, n1, out, N);
    case 2: return linear_rows<Q4, 2>(x, K, m0, qw, scales, mins, n0, n1, out, N);
    case 3: return linear_rows<Q4, 3>(x, K, m0, qw, scales, mins, n0, n1, out, N);
    default: return linear_rows<Q4, 4>(x, K, m0, qw, scales, mins, n0, n1, out, N);
  }
}

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
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = static_cast<const uint8_t*>(qw.data_ptr());
  const float* sp = scales.data_ptr<float>();
  const float* mp = Q4 ? mins.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // Split the weight rows among threads: each weight byte is read once per MT rows of x.
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
      linear_tile<Q4>(xp, K, m0, std::min(MT, M - m0), wp, sp, mp, n0, n1, op, N);
    }
  });
  return out;
}

torch::Tensor q4_linear(torch::Tensor x, torch::Tensor qw, torch::Tensor scales,
                        torch::Tensor mins) {
  return quant_linear<true>(x, qw, scales, mins);
}

torch::Tensor q8_linear(torch::Tensor x, torch::Tensor qw, torch::Tensor scales) {
  return quant_linear<false>(x, qw, scales, scales);
}

// -- paged decode attention ----------------------------------------------------------------
template <typename T>
inline void load_row(const T* src, float* dst, int64_t D) {
  for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void decode_one(const float* q, const T* kc, const T* vc, const int64_t* table, int64_t len,
                int64_t bs, int64_t Hkv, int64_t D, int64_t g, int64_t G, float scale, float* out,
                std::vector<float>& scores, std::vector<float>& row) {
  // q: the G query heads of kv head g, [G, D] contiguous; out likewise.
  scores.resize(G * len);
  row.resize(D);
  for (int64_t t = 0; t < len; ++t) {
    const int64_t slot = table[t / bs] * bs + t % bs;
    const T* k = kc + (slot * Hkv + g) * D;
    const float* kr;
    if constexpr (std::is_same_v<T, float>) {
      kr = k;
    } else {
      load_row(k, row.data(), D);
      kr = row.data();
    }
    for (int64_t h = 0; h < G; ++h) {
      const float* qh = q + h * D;
      float s = 0.f;
      for (int64_t i = 0; i < D; ++i) s += qh[i] * kr[i];
      scores[h * len + t] = s * scale;
    }
  }
  for (int64_t h = 0; h < G; ++h) {
    float* s = scores.data() + h * len;
    float mx = -INFINITY;
    for (int64_t t = 0; t < len; ++t) mx = std::max(mx, s[t]);
    float sum = 0.f;
    for (int64_t t = 0; t < len; ++t) {
      s[t] = std::exp(s[t] - mx);
      sum += s[t];
    }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
    std::memset(out + h * D, 0, D * sizeof(float));
  }
  for (int64_t t = 0; t < len; ++t) {
    const int64_t slot = table[t / bs] * bs + t % bs;
    const T* v = vc + (slot * Hkv + g) * D;
    const float* vr;
    if constexpr (std::is_same_v<T, float>) {
      vr = v;
    } else {
      load_row(v, row.data(), D);
      vr = row.data();
    }
    for (int64_t h = 0; h < G; ++h) {
      const float p = scores[h * len + t];
      float* o = out + h * D;
      for (int64_t i = 0; i < D; ++i) o[i] += p * vr[i];
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
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, row;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv;
      const int64_t len = lp[b];
      TORCH_CHECK(len >= 1 && len <= max_blocks * bs, "context length out of range");
      decode_one<T>(qp + (b * H + g * G) * D, kp, vp, tp + b * max_blocks, len, bs, Hkv, D, g,
                    G, scale, op + (b * H + g * G) * D, scores, row);
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_linear", &q4_linear, "x @ W.T, W 4-bit in groups of 32 with scales and mins");
  m.def("q8_linear", &q8_linear, "x @ W.T, W 8-bit in groups of 32 with scales");
  m.def("paged_decode", &paged_decode, "one query per sequence over its paged K/V");
}
