// 4-bit weights against fp32 activations through AVX-512 VNNI integer dot products (format 6),
// included by kernels.cpp. The fp32 row kernel spends about 7 vector ops on each 32-weight
// group of each output (unpack, a table per group, two FMAs): on a core that is about 16 GB/s
// of weights, under what memory can deliver. Here one VPDPBUSD multiplies 64 weight bytes and
// sums them in fours: about 3 ops per group-output.
//
// The activations are not rounded to int8 (as llama.cpp's q8_1 does): each value is split into
// three int8 digits over its group's range, x = amax / 127 * (a + b / 2^7 + c / 2^14), which
// holds it to 2^-22 of the group's largest value, about fp32's own rounding. The integer sums
// are exact, so a group's dot product is exact for those digits; the float steps after it run
// in one fixed order per output (see vnni_block), whatever the step's row count or the
// thread that serves the block: every size of step reads q4 weights through this kernel, so a
// row's result does not depend on the rows beside it.
//
// Weight layout, blocks of 16 output rows (one int32 lane each): packed [N/16, G, 4, 16, 4]
// bytes, byte (g, c, j, t) = q[16 rb + j][32 g + 8 c + t] | q[...][32 g + 8 c + 4 + t] << 4;
// scales and mins [N/16, G, 16] (fp16 where that holds them, else fp32). quant.py packs them.

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LLMOS_VNNI 1

constexpr int64_t VR = 16;  // weight rows per block (int32 lanes of one register)

// The digits of one row of x: planes a, b, c ([K] int8 each, at d, d + K, d + 2K); per group
// its scale e = amax / 127 / 2^14, the sum of its values (fp32, in a fixed order) and the sum
// of its digits as one integer (a << 14 + b << 7 + c), which centres the weights (vnni_block).
void digits_of(const float* x, int64_t K, int8_t* d, float* e, float* s, int32_t* ds) {
  const int64_t G = K / GROUP;
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t g = 0; g < G; ++g) {
    const __m512 v0 = _mm512_loadu_ps(x + g * GROUP), v1 = _mm512_loadu_ps(x + g * GROUP + 16);
    const float amax = _mm512_reduce_max_ps(
        _mm512_max_ps(_mm512_and_ps(v0, abs_mask), _mm512_and_ps(v1, abs_mask)));
    s[g] = V16::add({v0}, {v1}).sum();
    e[g] = amax / 127.f / 16384.f;
    // (a group below 1e-30 counts as zeros: 127 / amax would overflow for subnormal values)
    const __m512 inv = _mm512_set1_ps(amax > 1e-30f ? 127.f / amax : 0.f);
    const __m512 radix = _mm512_set1_ps(128.f);
    const __m512 v[2] = {v0, v1};
    for (int h = 0; h < 2; ++h) {
      constexpr int RN = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      const __m512 t = _mm512_mul_ps(v[h], inv);  // in [-127, 127]
      const __m512 a = _mm512_roundscale_ps(t, RN);
      const __m512 r1 = _mm512_mul_ps(_mm512_sub_ps(t, a), radix);  // in [-64, 64]
      const __m512 b = _mm512_roundscale_ps(r1, RN);
      const __m512 c = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(r1, b), radix), RN);
      const int64_t at = g * GROUP + 16 * h;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + at),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(a)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + K + at),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(b)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * K + at),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(c)));
    }
    int32_t sum = 0;
    for (int64_t i = g * GROUP; i < (g + 1) * GROUP; ++i) {
      sum += (int32_t{d[i]} << 14) + (int32_t{d[K + i]} << 7) + d[2 * K + i];
    }
    ds[g] = sum;
  }
}

inline __m512i bcast4(const int8_t* p) {  // four int8 digits, in every int32 lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <typename S>
inline __m512 load16s(const S* p) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm512_loadu_ps(p);
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

// Outputs [16] of R rows of x for one block of weight rows. Per output and group g, in this
// order: I = sum over the group of (q - 8) (a << 14 + b << 7 + c) (int32, exact: the sum
// against q less 8 times the digits' sum); acc = fma(float(I), d * e, acc); acc = fma(m + 8 d,
// sum of x, acc). Centring q at 8 keeps the two terms from cancelling (w = d q + m is centred
// near 0, d q alone is not), which would cost several bits.
template <int R, typename S>
void vnni_block(const uint8_t* wq, const S* wd, const S* wm, int64_t G, int64_t K,
                const int8_t* const* xd, const float* const* xe, const float* const* xs,
                const int32_t* const* xds, float* out, int64_t N, const uint8_t* next) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i nib = _mm512_set1_epi8(15);
  for (int64_t g = 0; g < G; ++g) {
    if (next != nullptr) {
      for (int c = 0; c < 4; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(next + g * 256 + 64 * c), _MM_HINT_T0);
      }
    }
    __m512i lo[4], hi[4];
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(wq + g * 256 + 64 * c);
      lo[c] = _mm512_and_si512(v, nib);
      hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
    }
    const __m512 dv = load16s(wd + g * VR);
    const __m512 mv = _mm512_fmadd_ps(_mm512_set1_ps(8.f), dv, load16s(wm + g * VR));
    for (int r = 0; r < R; ++r) {
      __m512i sum[3];
      for (int p = 0; p < 3; ++p) {  // digit planes a, b, c; lo and hi chains run side by side
        const int8_t* xp = xd[r] + p * K + g * GROUP;
        __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
        for (int c = 0; c < 4; ++c) {
          s0 = _mm512_dpbusd_epi32(s0, lo[c], bcast4(xp + 8 * c));
          s1 = _mm512_dpbusd_epi32(s1, hi[c], bcast4(xp + 8 * c + 4));
        }
        sum[p] = _mm512_add_epi32(s0, s1);
      }
      const __m512i I = _mm512_sub_epi32(
          _mm512_add_epi32(_mm512_slli_epi32(sum[0], 14),
                           _mm512_add_epi32(_mm512_slli_epi32(sum[1], 7), sum[2])),
          _mm512_set1_epi32(8 * xds[r][g]));
      const __m512 de = _mm512_mul_ps(dv, _mm512_set1_ps(xe[r][g]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I), de, acc[r]);
      acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xs[r][g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * N, acc[r]);
}

template <typename S, int R = 8>
void vnni_rows(int64_t rows, const uint8_t* wq, const S* wd, const S* wm, int64_t G, int64_t K,
               const int8_t* const* xd, const float* const* xe, const float* const* xs,
               const int32_t* const* xds, float* out, int64_t N, const uint8_t* next) {
  if constexpr (R > 0) {
    if (rows == R) return vnni_block<R, S>(wq, wd, wm, G, K, xd, xe, xs, xds, out, N, next);
    return vnni_rows<S, R - 1>(rows, wq, wd, wm, G, K, xd, xe, xs, xds, out, N, next);
  }
}

template <typename S>
torch::Tensor vnni_linear_as(const torch::Tensor& x, const torch::Tensor& qw,
                             const torch::Tensor& scales, const torch::Tensor& mins) {
  const int64_t M = x.size(0), K = x.size(1), G = K / GROUP;
  const int64_t blocks = qw.size(0), N = blocks * VR;
  auto out = torch::empty({M, N}, x.options());
  std::vector<int8_t> dig(M * 3 * K);
  std::vector<float> e(M * G), s(M * G);
  std::vector<int32_t> ds(M * G);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      digits_of(xp + m * K, K, dig.data() + m * 3 * K, e.data() + m * G, s.data() + m * G,
                ds.data() + m * G);
    }
  });
  const uint8_t* wq = qw.data_ptr<uint8_t>();
  const S* wd = scales.data_ptr<S>();
  const S* wm = mins.data_ptr<S>();
  float* op = out.data_ptr<float>();
  constexpr int64_t PF = 2;  // blocks ahead to prefetch
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* next = b + PF < b1 ? wq + (b + PF) * G * 256 : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int64_t rows = std::min(MT, M - m0);
        const int8_t* xd[MT];
        const float *xe[MT], *xs[MT];
        const int32_t* xds[MT];
        for (int64_t r = 0; r < rows; ++r) {
          xds[r] = ds.data() + (m0 + r) * G;
          xd[r] = dig.data() + (m0 + r) * 3 * K;
          xe[r] = e.data() + (m0 + r) * G;
          xs[r] = s.data() + (m0 + r) * G;
        }
        vnni_rows<S>(rows, wq + b * G * 256, wd + b * G * VR, wm + b * G * VR, G, K, xd, xe, xs,
                     xds, op + m0 * N + b * VR, N, m0 == 0 ? next : nullptr);
      }
    }
  });
  return out;
}

torch::Tensor vnni_linear(const torch::Tensor& x_in, const torch::Tensor& qw,
                          const torch::Tensor& scales, const torch::Tensor& mins) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == torch::kFloat, "x must be [M, K] float32");
  auto x = x_in.contiguous();
  const int64_t K = x.size(1), G = K / GROUP;
  TORCH_CHECK(K % GROUP == 0, "K must be a multiple of 32, got ", K);
  TORCH_CHECK(qw.dim() == 3 && qw.is_contiguous() && qw.scalar_type() == torch::kByte &&
                  qw.size(1) == G && qw.size(2) == 256,
              "VNNI-packed 4-bit weight must be [N/16, K/32, 256] uint8");
  const auto st = scales.scalar_type();
  TORCH_CHECK((st == torch::kFloat || st == torch::kHalf) && mins.scalar_type() == st,
              "scales and mins must both be float32 or both float16");
  TORCH_CHECK(scales.is_contiguous() && mins.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == qw.size(0) && scales.size(1) == G && scales.size(2) == VR &&
                  mins.sizes() == scales.sizes(),
              "scales and mins must be [N/16, K/32, 16]");
  if (st == torch::kFloat) return vnni_linear_as<float>(x, qw, scales, mins);
  return vnni_linear_as<c10::Half>(x, qw, scales, mins);
}
#endif
