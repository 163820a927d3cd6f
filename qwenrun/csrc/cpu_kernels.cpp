// Decode-time CPU kernels: matrix-vector products over bf16 / int8 / int4 weights and single-query
// paged attention, written for AVX-512 (with AVX512-BF16 for bf16 weights) and for AVX2 + FMA.
//
// Why by hand: a decode step multiplies one activation row by every weight once, so it is bound by
// how fast the weights stream from memory. oneDNN, `_weight_int8pack_mm` and the int4 pack kernel
// stream at 15-24 GB/s on this class of machine; these loops read the weights once, in order, with
// every row block's dot products kept in registers. Prefill-sized batches do not come here: they
// are compute-bound and go to oneDNN GEMMs.
//
// Threads come from ATen's pool (at::parallel_for), so the extension shares torch's OpenMP runtime.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// The instruction set, fixed at build time by -march=native: AVX-512 where the CPU has BF16 and VNNI,
// else AVX2 + FMA (Haswell, Zen 1-3 and every x86 laptop of the last decade), whose inner loops sit in
// the #else branches below; the argument checks, threading and bindings around them are shared.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__) && \
    defined(__AVX512VNNI__)
#define QWENRUN_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QWENRUN_AVX512 0
#else
#error "qwenrun's CPU kernels need AVX512-BF16 and VNNI, or AVX2, FMA and F16C"
#endif

namespace {
// Software prefetch distance (bytes ahead in the weight stream) for the integer kernels: their
// arithmetic per byte is high enough that the hardware prefetcher alone leaves the stream at ~19-24
// GB/s; 4 KiB ahead measured ~28 (int8) and ~26 (int4) GB/s. bf16 is faster without it.
constexpr int kPrefetch = 4096;
// bf16 with several activation rows: the extra arithmetic per weight byte stalls the stream behind
// the hardware prefetcher (5 rows cost ~2x one), while prefetching 8 KiB ahead into L2 keeps it
// at ~1.0-1.1x (Zen 4); with one row the hardware prefetcher alone is as fast or faster
constexpr int kPrefetchL2 = 8192;

using bf16 = at::BFloat16;

// weight readers of 16-row slabs (their `dot` fills 16 outputs a row; `gemv_tile` has its own form for them)
template <class W, class = void>
struct is_slab : std::false_type {};
template <class W>
struct is_slab<W, std::void_t<decltype(W::kSlab)>> : std::true_type {};

#if QWENRUN_AVX512
// ---------------------------------------------------------------------------------------------
// loads and stores between fp32 registers and bf16 / fp32 memory

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16* p, __mmask16 m) {
  __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(bf16* p, __m512 v, __mmask16 m) {
  // round to nearest even, as c10::BFloat16 does
  __m512i i = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(i, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(i, _mm512_set1_epi32(0x400000)));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
// v rounded to the nearest bf16 (ties to even) and widened back: what a bf16 op would have stored
inline __m512 round_bf16(__m512 v) {
  __m512i i = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(i, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
template <class T>
inline __m512 vrnd(__m512 v) {
  if constexpr (std::is_same_v<T, bf16>) return round_bf16(v);
  else return v;
}
inline __mmask16 tail16(int64_t n) { return n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1); }

// exp for x <= 0 (softmax after subtracting the max): 2^n * p(r), |r| <= ln2/2, relative error ~2e-7
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// the lane sums of NB accumulators (NB <= 4) into out[0..NB): for four, a shuffle tree that shares
// its steps between them instead of four separate reductions (a tile's epilogue is a sizeable part of
// its work when K is ~1-3K)
template <int NB>
inline void hsum(const __m512 (&acc)[NB], float* out) {
  if constexpr (NB == 4) {
    __m256 s[4];
    for (int j = 0; j < 4; ++j) s[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[j]), _mm512_extractf32x8_ps(acc[j], 1));
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  } else {
    for (int j = 0; j < NB; ++j) out[j] = _mm512_reduce_add_ps(acc[j]);
  }
}

// ---------------------------------------------------------------------------------------------
// weight formats. Each computes out[i][j] = x_i . W[rows[j]] for MB activation rows and NB weight
// rows, keeping all MB*NB accumulators in registers so every weight byte is loaded once.

// bf16 weights [N, K], bf16 activations: AVX512-BF16 pair dot products, fp32 accumulation
struct Bf16Weights {
  const uint16_t* w;
  int64_t K;
  const uint16_t* x;  // [M, K] bf16 activations

  template <int MB, int NB>
  void dot(int64_t m0, const int64_t* rows, float (*out)[4]) const {
    __m512 acc[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
    const uint16_t* wr[NB];
    for (int j = 0; j < NB; ++j) wr[j] = w + rows[j] * K;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m512bh wv[NB];
      if constexpr (MB > 1)
        for (int j = 0; j < NB; ++j) _mm_prefetch(reinterpret_cast<const char*>(wr[j] + k) + kPrefetchL2, _MM_HINT_T1);
      for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(wr[j] + k);
      for (int i = 0; i < MB; ++i) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m0 + i) * K + k);
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
      }
    }
    if (k < K) {
      __mmask32 m = static_cast<__mmask32>((1ull << (K - k)) - 1);
      __m512bh wv[NB];
      for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(m, wr[j] + k);
      for (int i = 0; i < MB; ++i) {
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + (m0 + i) * K + k);
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
      }
    }
    for (int i = 0; i < MB; ++i) hsum<NB>(acc[i], out[i]);
  }
};

// Integer formats use AVX512-VNNI (`vpdpbusd`, 64 multiply-adds of u8 x s8 per instruction), as
// llama.cpp's Q8_0/Q4_0 do: the activations are quantized per token in blocks of 32 (fp32 scale per
// block, round to nearest), which costs far less accuracy than the weights' own quantization and
// turns ~12 convert-and-FMA instructions per 64 weights into one.
struct QuantizedActivations {
  at::Tensor q;     // [M, K] int8
  at::Tensor s;     // [M, ceil(K/64), 16] fp32: per 64-wide chunk, lanes 0-7 the scale of its first
                    // 32 inputs, lanes 8-15 of its second (the lanes their int32 dot products land in)
  at::Tensor comp;  // [M] fp32: 128 * sum_b s_b * sum_{k in b} q_k (undoes the int8 weights' +128 offset)
  at::Tensor gsum;  // [M, K/G] fp32 sums of the quantized x per weight group (int4's minimums); G = 0: none
};

template <class T>
QuantizedActivations quantize_activations(const at::Tensor& x, int64_t G, int64_t AB) {
  const int64_t M = x.size(0), K = x.size(1), nb = K / 32, nc = (K + 63) / 64;
  const auto f32 = x.options().dtype(at::kFloat);
  QuantizedActivations a{at::empty({M, K}, x.options().dtype(at::kChar)), at::zeros({M, nc, 16}, f32),
                         at::empty({M}, f32), G ? at::zeros({M, K / G}, f32) : at::Tensor()};
  const T* xp = x.data_ptr<T>();
  int8_t* qp = a.q.data_ptr<int8_t>();
  float* sp = a.s.data_ptr<float>();
  float* cp = a.comp.data_ptr<float>();
  float* gp = G ? a.gsum.data_ptr<float>() : nullptr;
  for (int64_t m = 0; m < M; ++m) {
    float comp = 0.f;
    const int64_t per = AB / 32;  // 32-wide pieces per scale block
    for (int64_t b0 = 0; b0 < nb; b0 += per) {
      __m512 amax = _mm512_setzero_ps();
      for (int64_t b = b0; b < b0 + per; ++b) {
        const T* xb = xp + m * K + b * 32;
        amax = _mm512_max_ps(amax, _mm512_max_ps(_mm512_abs_ps(load16(xb)), _mm512_abs_ps(load16(xb + 16))));
      }
      const float mx = _mm512_reduce_max_ps(amax), scale = mx / 127.f, inv = mx > 0.f ? 127.f / mx : 0.f;
      for (int64_t b = b0; b < b0 + per; ++b) {
        const T* xb = xp + m * K + b * 32;
        __m512 v0 = load16(xb), v1 = load16(xb + 16);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
        const float qsum = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
        // sums of the quantized x: then the rounding error meets the zero-mean w, not the all-positive codes
        if (G) gp[m * (K / G) + b * 32 / G] += scale * qsum;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qp + m * K + b * 32), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qp + m * K + b * 32 + 16), _mm512_cvtsepi32_epi8(q1));
        std::fill_n(sp + (m * nc + b / 2) * 16 + (b % 2) * 8, 8, scale);
        comp += 128.f * scale * qsum;
      }
    }
    cp[m] = comp;
  }
  return a;
}

// AB: inputs sharing one activation scale (32, or 128 where the weights' groups are at least that long)
QuantizedActivations quantize_activations(const at::Tensor& x, int64_t G, int64_t AB) {
  return x.scalar_type() == at::kBFloat16 ? quantize_activations<bf16>(x, G, AB) : quantize_activations<float>(x, G, AB);
}

inline __mmask64 tail64(int64_t n) { return n >= 64 ? ~0ull : (1ull << n) - 1; }

// the 128 4-bit codes of one packed block (64 bytes, see Int4Weights): inputs 0-63 and 64-127 as bytes
inline void unpack_int4_block(const uint8_t* p, __m512i& lo, __m512i& hi) {
  const __m512i low = _mm512_set1_epi8(0xf), b = _mm512_loadu_si512(p);
  lo = _mm512_and_si512(b, low);
  hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
}

// int8 weights [N, K] with a per-row scale, read as u8 = w ^ 0x80 = w + 128
struct Int8Weights {
  const int8_t* w;
  const float* scale;  // [N]
  int64_t K;
  const int8_t* xq;
  const float* xs;  // [M, K/64, 16]
  const float* comp;

  template <int MB, int NB>
  void dot(int64_t m0, const int64_t* rows, float (*out)[4]) const {
    const int64_t lds = (K + 63) / 64 * 16;
    __m512 acc[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int64_t k = 0; k < K; k += 64) {
      const __mmask64 m = tail64(K - k);
      __m512i wv[NB];
      // a 32-wide tail loads zero activations for the missing half, so it adds nothing
      for (int j = 0; j < NB; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(w + rows[j] * K + k) + kPrefetch, _MM_HINT_T0);
        wv[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + rows[j] * K + k), flip);
      }
      for (int i = 0; i < MB; ++i) {
        const __m512i xv = _mm512_maskz_loadu_epi8(m, xq + (m0 + i) * K + k);
        const __m512 sv = _mm512_loadu_ps(xs + (m0 + i) * lds + k / 4);
        for (int j = 0; j < NB; ++j)
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[j], xv)), sv, acc[i][j]);
      }
    }
    for (int i = 0; i < MB; ++i) {
      hsum<NB>(acc[i], out[i]);
      for (int j = 0; j < NB; ++j) out[i][j] = (out[i][j] - comp[m0 + i]) * scale[rows[j]];
    }
  }
};

// int4 weights, groups of G inputs: w = q * scale + min with q in [0, 15]. Each row is K/2 bytes;
// within every 128 inputs, byte t holds input t in its low nibble and input t + 64 in its high one,
// so one 64-byte load and two masks give two 64-wide chunks lined up with contiguous activations.
// Σ w x = Σ_g scale_g Σ_{k in g} q x + min_g Σ_{k in g} x.
struct Int4Weights {
  const uint8_t* w;
  const float* scale;  // [N, K/G]
  const float* mins;   // [N, K/G]
  int64_t K, G, ng;  // ng = K / G, precomputed: an integer division per row costs as much as the row
  const int8_t* xq;
  const float* xs;    // [M, K/64, 16]
  const float* xsum;  // [M, K/G] per-group sums of the quantized x

  template <int MB, int NB>
  void dot(int64_t m0, const int64_t* rows, float (*out)[4]) const {
    const int64_t lds = K / 64 * 16;
    __m512 acc[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
    if (G >= 128) {
      // activations share one scale per 128 inputs here, so both chunks of a block accumulate in
      // int32 and take the combined activation x weight scale once
      const int64_t blocks_per_group = G / 128;
      for (int64_t k0 = 0, g = 0, bg = 0; k0 < K; k0 += 128) {
        __m512i lo[NB], hi[NB];
        for (int j = 0; j < NB; ++j) {
          const uint8_t* wp = w + rows[j] * (K / 2) + k0 / 2;
          _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetch, _MM_HINT_T0);
          unpack_int4_block(wp, lo[j], hi[j]);
        }
        for (int i = 0; i < MB; ++i) {
          const int8_t* xr = xq + (m0 + i) * K + k0;
          const __m512i x0 = _mm512_loadu_si512(xr), x1 = _mm512_loadu_si512(xr + 64);
          const float sa = xs[(m0 + i) * lds + k0 / 4];
          for (int j = 0; j < NB; ++j) {
            const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], x0), hi[j], x1);
            acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(sa * scale[rows[j] * ng + g]), acc[i][j]);
          }
        }
        if (++bg == blocks_per_group) bg = 0, ++g;
      }
    }
    // groups of 32 or 64: activation scales per 32 inputs, weight scales per lane of each chunk
    for (int64_t k0 = 0; G < 128 && k0 < K; k0 += 128) {
      __m512i lo[NB], hi[NB];
      __m512 ws0[NB], ws1[NB];
      for (int j = 0; j < NB; ++j) {
        unpack_int4_block(w + rows[j] * (K / 2) + k0 / 2, lo[j], hi[j]);
        const float* sr = scale + rows[j] * ng + (G == 64 ? k0 / 64 : k0 / 32);
        ws0[j] = G == 64 ? _mm512_set1_ps(sr[0]) : _mm512_insertf32x8(_mm512_set1_ps(sr[0]), _mm256_set1_ps(sr[1]), 1);
        ws1[j] = G == 64 ? _mm512_set1_ps(sr[1]) : _mm512_insertf32x8(_mm512_set1_ps(sr[2]), _mm256_set1_ps(sr[3]), 1);
      }
      for (int i = 0; i < MB; ++i) {
        const int8_t* xr = xq + (m0 + i) * K + k0;
        const __m512i x0 = _mm512_loadu_si512(xr), x1 = _mm512_loadu_si512(xr + 64);
        const __m512 s0 = _mm512_loadu_ps(xs + (m0 + i) * lds + k0 / 4), s1 = _mm512_loadu_ps(xs + (m0 + i) * lds + k0 / 4 + 16);
        for (int j = 0; j < NB; ++j) {
          const __m512 d0 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], x0));
          const __m512 d1 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[j], x1));
          acc[i][j] = _mm512_fmadd_ps(d0, _mm512_mul_ps(s0, ws0[j]), acc[i][j]);
          acc[i][j] = _mm512_fmadd_ps(d1, _mm512_mul_ps(s1, ws1[j]), acc[i][j]);
        }
      }
    }
    // the minimums' part, sum_g min_g xsum_g, 16 groups a step into the lanes the sum above reduces
    for (int64_t g = 0; g < ng; g += 16) {
      const __mmask16 mk = tail16(ng - g);
      for (int i = 0; i < MB; ++i) {
        const __m512 xg = _mm512_maskz_loadu_ps(mk, xsum + (m0 + i) * ng + g);
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, mins + rows[j] * ng + g), xg, acc[i][j]);
      }
    }
    for (int i = 0; i < MB; ++i) hsum<NB>(acc[i], out[i]);
  }
};

// int4 weights interleaved in slabs of 16 rows (format "int4_x16", groups a multiple of 128; made from
// the layout above by `qwenrun.quant.linear.interleave_int4`): for slab s and 128-input block b, 1 KiB
// at (s K/128 + b) 1024 holds 16 vectors c of 64 bytes, vector c being rows 0-15 times the 4 bytes of
// inputs 4c..4c+3 (low nibbles; the high ones 64 + 4c..), and scales and minimums are [N/16, K/G, 16].
// One `vpdpbusd` with 4 activation bytes broadcast then advances all 16 rows, so a block costs 32 of them
// and one convert and FMA per activation row for the 16 rows, where a row at a time costs two, a
// convert, an FMA and a lane sum per row: the difference when several activation rows (verified drafts,
// a small batch) make the arithmetic, not the bytes, the bound. llama.cpp repacks Q4_0 the same way.
struct Int4SlabWeights {
  static constexpr bool kSlab = true;
  const uint8_t* w;
  const float* scale;  // [N/16, K/G, 16]
  const float* mins;   // [N/16, K/G, 16]
  int64_t K, G, ng;
  const int8_t* xq;
  const float* xs;    // [M, K/64, 16]
  const float* xsum;  // [M, K/G]

  template <int MB>
  void dot(int64_t m0, int64_t s, float (*out)[16]) const {
    const int64_t nblk = K / 128, lds = K / 64 * 16, blocks_per_group = G / 128;
    const __m512i low = _mm512_set1_epi8(0xf);
    const uint8_t* ws = w + s * nblk * 1024;
    __m512 acc[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
    // independent vpdpbusd chains a row (low and high nibbles; a lone row splits each in two more):
    // with one row the chains' latency, not the instructions' throughput, would bind
    constexpr int CH = MB == 1 ? 4 : 2;
    for (int64_t b = 0, g = 0, bg = 0; b < nblk; ++b) {
      __m512i d[MB][CH];
      for (int i = 0; i < MB; ++i)
        for (int h = 0; h < CH; ++h) d[i][h] = _mm512_setzero_si512();
      const uint8_t* wb = ws + b * 1024;
      const int8_t* xb = xq + m0 * K + b * 128;
      for (int c = 0; c < 16; ++c) {
        // one row streams fastest on the hardware prefetcher alone (a slab is one sequential stream);
        // more, whose arithmetic per byte stalls it, prefetch into L2 (Zen 4, ad-hoc A/B: 1 row 0.82x of
        // the plain layout's time without, 0.95x with T0; 5 rows 1.23x of its one row with T1, 1.37x T0)
        if constexpr (MB > 1) _mm_prefetch(reinterpret_cast<const char*>(wb + c * 64) + kPrefetch, _MM_HINT_T1);
        const __m512i v = _mm512_loadu_si512(wb + c * 64);
        const __m512i wl = _mm512_and_si512(v, low), wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        const int h = CH == 4 ? 2 * (c & 1) : 0;
        for (int i = 0; i < MB; ++i) {
          int32_t x0, x1;
          std::memcpy(&x0, xb + i * K + 4 * c, 4);
          std::memcpy(&x1, xb + i * K + 64 + 4 * c, 4);
          d[i][h] = _mm512_dpbusd_epi32(d[i][h], wl, _mm512_set1_epi32(x0));
          d[i][h + 1] = _mm512_dpbusd_epi32(d[i][h + 1], wh, _mm512_set1_epi32(x1));
        }
      }
      const __m512 sv = _mm512_loadu_ps(scale + (s * ng + g) * 16);
      for (int i = 0; i < MB; ++i) {
        __m512i sum = _mm512_add_epi32(d[i][0], d[i][1]);
        if constexpr (CH == 4) sum = _mm512_add_epi32(sum, _mm512_add_epi32(d[i][2], d[i][3]));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(sv, _mm512_set1_ps(xs[(m0 + i) * lds + b * 32])),
                                 acc[i]);
      }
      if (++bg == blocks_per_group) bg = 0, ++g;
    }
    for (int64_t g = 0; g < ng; ++g) {
      const __m512 mv = _mm512_loadu_ps(mins + (s * ng + g) * 16);
      for (int i = 0; i < MB; ++i) acc[i] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[(m0 + i) * ng + g]), acc[i]);
    }
    for (int i = 0; i < MB; ++i) _mm512_storeu_ps(out[i], acc[i]);
  }
};

// int8 weights interleaved in slabs of 16 rows (format "int8_x16", `interleave_int8`): slab s is 16 K bytes
// at 16 s K, 64 bytes per 4 inputs (rows 0-15 times inputs 4v..4v+3), the per-row scales as they are.
// As for int4_x16, one `vpdpbusd` with 4 activation bytes broadcast advances all 16 rows, and a block of
// 32 inputs (one activation scale) takes one convert and FMA for the 16 rows, not one per row plus a
// lane sum.
struct Int8SlabWeights {
  static constexpr bool kSlab = true;
  const int8_t* w;
  const float* scale;  // [N]
  int64_t K;
  const int8_t* xq;
  const float* xs;  // [M, K/64, 16]
  const float* comp;

  template <int MB>
  void dot(int64_t m0, int64_t s, float (*out)[16]) const {
    const int64_t lds = (K + 63) / 64 * 16;
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    constexpr int CH = MB == 1 ? 2 : 1;  // a lone row's chain split in two, as Int4SlabWeights
    const int8_t* ws = w + s * 16 * K;
    __m512 acc[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
      __m512i d[MB][CH];
      for (int i = 0; i < MB; ++i)
        for (int h = 0; h < CH; ++h) d[i][h] = _mm512_setzero_si512();
      const int8_t* wb = ws + k0 * 16;
      for (int v = 0; v < 8; ++v) {
        if constexpr (MB > 1) _mm_prefetch(reinterpret_cast<const char*>(wb + v * 64) + kPrefetch, _MM_HINT_T1);
        const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(wb + v * 64), flip);
        for (int i = 0; i < MB; ++i) {
          int32_t x;
          std::memcpy(&x, xq + (m0 + i) * K + k0 + 4 * v, 4);
          d[i][v % CH] = _mm512_dpbusd_epi32(d[i][v % CH], wv, _mm512_set1_epi32(x));
        }
      }
      for (int i = 0; i < MB; ++i) {
        __m512i sum = d[i][0];
        if constexpr (CH == 2) sum = _mm512_add_epi32(sum, d[i][1]);
        const float sa = xs[(m0 + i) * lds + (k0 / 64) * 16 + (k0 % 64 ? 8 : 0)];
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(sa), acc[i]);
      }
    }
    const __m512 sv = _mm512_loadu_ps(scale + s * 16);
    for (int i = 0; i < MB; ++i)
      _mm512_storeu_ps(out[i], _mm512_mul_ps(_mm512_sub_ps(acc[i], _mm512_set1_ps(comp[m0 + i])), sv));
  }
};

#else  // AVX2 + FMA: 8 fp32 lanes, no masked 16-bit loads and no VNNI

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
// the first min(n, 8) values and zeros: AVX2 masks no 16-bit loads or stores, so a tail goes through a buffer
template <class T>
inline __m256 load8(const T* p, int64_t n) {
  if (n >= 8) return load8(p);
  T buf[8];
  std::fill_n(buf, 8, static_cast<T>(0.f));
  std::copy(p, p + n, buf);
  return load8(static_cast<const T*>(buf));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) {
  // round to nearest even, as c10::BFloat16 does
  __m256i i = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(i, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_srli_epi32(_mm256_blendv_epi8(r, _mm256_or_si256(i, _mm256_set1_epi32(0x400000)), nan), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
template <class T>
inline void store8(T* p, __m256 v, int64_t n) {
  if (n >= 8) return store8(p, v);
  T buf[8];
  store8(buf, v);
  std::copy(buf, buf + n, p);
}
// v rounded to the nearest bf16 (ties to even) and widened back: what a bf16 op would have stored
inline __m256 round_bf16(__m256 v) {
  __m256i i = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(i, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
template <class T>
inline __m256 vrnd(__m256 v) {
  if constexpr (std::is_same_v<T, bf16>) return round_bf16(v);
  else return v;
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline int hsum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)));
}
// lanes below n (as the mask of _mm256_maskload_ps)
inline __m256i first8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// exp for x <= 0 as exp512: 2^n * p(r), with 2^n built in the exponent field (n >= -126, a normal)
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// ---------------------------------------------------------------------------------------------
// weight formats, as above: out[i][j] = x_i . W[rows[j]] for MB activation rows and NB weight rows

// bf16 weights [N, K], bf16 activations. A bf16 in the high half of a 32-bit lane is its fp32 value,
// so 16 weights split into their even (shifted up) and odd (masked) halves at two instructions; the
// activations are split the same way once, up front. Products of bf16 are exact in fp32, as with
// AVX512-BF16.
struct Bf16Weights {
  const uint16_t* w;
  int64_t K;
  const uint16_t* x;      // [M, K] bf16 activations
  std::vector<float> xf;  // [M, K / 16 * 16] x in fp32, per 16 inputs the 8 even ones, then the 8 odd

  Bf16Weights(const uint16_t* w_, int64_t K_, const uint16_t* x_, int64_t M) : w(w_), K(K_), x(x_), xf(M * (K_ / 16 * 16)) {
    const int64_t K16 = K / 16 * 16;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K16; k += 16)
        for (int t = 0; t < 8; ++t) {
          xf[m * K16 + k + t] = c10::detail::f32_from_bits(x[m * K + k + 2 * t]);
          xf[m * K16 + k + 8 + t] = c10::detail::f32_from_bits(x[m * K + k + 2 * t + 1]);
        }
  }

  template <int MB, int NB>
  void dot(int64_t m0, const int64_t* rows, float (*out)[4]) const {
    __m256 acc[MB][NB][2];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j][0] = acc[i][j][1] = _mm256_setzero_ps();
    const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    const uint16_t* wr[NB];
    for (int j = 0; j < NB; ++j) wr[j] = w + rows[j] * K;
    const int64_t K16 = K / 16 * 16;
    int64_t k = 0;
    for (; k < K16; k += 16) {
      __m256 we[NB], wo[NB];
      for (int j = 0; j < NB; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[j] + k));
        we[j] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        wo[j] = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
      }
      for (int i = 0; i < MB; ++i) {
        const float* xr = xf.data() + (m0 + i) * K16 + k;
        for (int j = 0; j < NB; ++j) {
          acc[i][j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), we[j], acc[i][j][0]);
          acc[i][j][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), wo[j], acc[i][j][1]);
        }
      }
    }
    const auto f = [](uint16_t b) { return c10::detail::f32_from_bits(b); };
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) {
        float s = hsum8(_mm256_add_ps(acc[i][j][0], acc[i][j][1]));
        for (int64_t t = k; t < K; ++t) s += f(x[(m0 + i) * K + t]) * f(wr[j][t]);
        out[i][j] = s;
      }
  }
};

// Integer formats, as llama.cpp's AVX2 Q8_0/Q4_0 dots: activations quantized per token in blocks of 32
// (see the AVX-512 path), `vpmaddubsw` (u8 x s8 pairs summed to s16) then `vpmaddwd` by ones to s32.
struct QuantizedActivations {
  at::Tensor q;     // [M, K] int8
  at::Tensor s;     // [M, K/32] fp32 scale of each block of 32 inputs
  at::Tensor gsum;  // [M, K/G] fp32 sums of the quantized x per weight group (int4's minimums); G = 0: none
};

template <class T>
QuantizedActivations quantize_activations(const at::Tensor& x, int64_t G, int64_t AB) {
  const int64_t M = x.size(0), K = x.size(1), nb = K / 32;
  const auto f32 = x.options().dtype(at::kFloat);
  QuantizedActivations a{at::empty({M, K}, x.options().dtype(at::kChar)), at::empty({M, nb}, f32),
                         G ? at::zeros({M, K / G}, f32) : at::Tensor()};
  const T* xp = x.data_ptr<T>();
  int8_t* qp = a.q.data_ptr<int8_t>();
  float* sp = a.s.data_ptr<float>();
  float* gp = G ? a.gsum.data_ptr<float>() : nullptr;
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' per-lane interleave
  for (int64_t m = 0; m < M; ++m) {
    const int64_t per = AB / 32;  // 32-wide pieces per scale block
    for (int64_t b0 = 0; b0 < nb; b0 += per) {
      __m256 amax = _mm256_setzero_ps();
      for (int64_t k = b0 * 32; k < (b0 + per) * 32; k += 8)
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, load8(xp + m * K + k)));
      const float mx = hmax8(amax), scale = mx / 127.f, inv = mx > 0.f ? 127.f / mx : 0.f;
      for (int64_t b = b0; b < b0 + per; ++b) {
        const T* xb = xp + m * K + b * 32;
        __m256i q[4];
        for (int c = 0; c < 4; ++c) q[c] = _mm256_cvtps_epi32(_mm256_mul_ps(load8(xb + 8 * c), _mm256_set1_ps(inv)));
        const float qsum = static_cast<float>(hsum8(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]))));
        if (G) gp[m * (K / G) + b * 32 / G] += scale * qsum;
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qp + m * K + b * 32), _mm256_permutevar8x32_epi32(packed, order));
        sp[m * nb + b] = scale;
      }
    }
  }
  return a;
}

// AB: inputs sharing one activation scale (32, or 128 where the weights' groups are at least that long)
QuantizedActivations quantize_activations(const at::Tensor& x, int64_t G, int64_t AB) {
  return x.scalar_type() == at::kBFloat16 ? quantize_activations<bf16>(x, G, AB) : quantize_activations<float>(x, G, AB);
}

// the s32 dot products of u8 `u` and s8 `s` (32 each), in 8 lanes: pairs meet in s16 first, so |u s| sums of
// two must stay below 2^15 (int4 codes, or int8 magnitudes against int8)
inline __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// int8 weights [N, K] with a per-row scale. `vpmaddubsw` wants one unsigned side, so the weights give
// their magnitudes and their signs move onto the activations (|w| <= 128 and |x| <= 127: no saturation)
struct Int8Weights {
  const int8_t* w;
  const float* scale;  // [N]
  int64_t K;
  const int8_t* xq;
  const float* xs;  // [M, K/32]

  template <int MB, int NB>
  void dot(int64_t m0, const int64_t* rows, float (*out)[4]) const {
    const int64_t nb = K / 32;
    __m256 acc[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256i wv[NB], wa[NB];
      for (int j = 0; j < NB; ++j) {
        const int8_t* wp = w + rows[j] * K + b * 32;
        _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetch, _MM_HINT_T0);
        wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
        wa[j] = _mm256_abs_epi8(wv[j]);
      }
      for (int i = 0; i < MB; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (m0 + i) * K + b * 32));
        const __m256 sv = _mm256_set1_ps(xs[(m0 + i) * nb + b]);
        for (int j = 0; j < NB; ++j)
          acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(wa[j], _mm256_sign_epi8(xv, wv[j]))), sv, acc[i][j]);
      }
    }
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) out[i][j] = hsum8(acc[i][j]) * scale[rows[j]];
  }
};

// int4 weights in the AVX-512 path's layout (byte t of every 128 inputs: input t low, t + 64 high), read
// as two 32-byte halves: their low nibbles are inputs 0-31 and 32-63, their high ones 64-95 and 96-127
struct Int4Weights {
  const uint8_t* w;
  const float* scale;  // [N, K/G]
  const float* mins;   // [N, K/G]
  int64_t K, G, ng;  // ng = K / G, precomputed: an integer division per row costs as much as the row
  const int8_t* xq;
  const float* xs;    // [M, K/32]
  const float* xsum;  // [M, K/G] per-group sums of the quantized x

  template <int MB, int NB>
  void dot(int64_t m0, const int64_t* rows, float (*out)[4]) const {
    const int64_t nb = K / 32, blocks_per_group = G / 128;
    const int shift = G == 64 ? 1 : 0;  // groups of 32 or 64: a 32-input block's group is its index >> shift
    const __m256i low = _mm256_set1_epi8(0xf);
    __m256 acc[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int64_t k0 = 0, g = 0, bg = 0; k0 < K; k0 += 128) {
      __m256i q[NB][4];  // codes of inputs k0 + 32 c ...
      for (int j = 0; j < NB; ++j) {
        const uint8_t* wp = w + rows[j] * (K / 2) + k0 / 2;
        _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetch, _MM_HINT_T0);
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
        const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32));
        q[j][0] = _mm256_and_si256(b0, low);
        q[j][1] = _mm256_and_si256(b1, low);
        q[j][2] = _mm256_and_si256(_mm256_srli_epi16(b0, 4), low);
        q[j][3] = _mm256_and_si256(_mm256_srli_epi16(b1, 4), low);
      }
      for (int i = 0; i < MB; ++i) {
        const int8_t* xr = xq + (m0 + i) * K + k0;
        __m256i xv[4];
        for (int c = 0; c < 4; ++c) xv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32 * c));
        const float* sa = xs + (m0 + i) * nb + k0 / 32;
        for (int j = 0; j < NB; ++j) {
          if (G >= 128) {
            // one activation and one weight scale for all 128: the four s16 pair sums (each |.| <= 2*15*127)
            // add up before widening
            const __m256i p = _mm256_add_epi16(
                _mm256_add_epi16(_mm256_maddubs_epi16(q[j][0], xv[0]), _mm256_maddubs_epi16(q[j][1], xv[1])),
                _mm256_add_epi16(_mm256_maddubs_epi16(q[j][2], xv[2]), _mm256_maddubs_epi16(q[j][3], xv[3])));
            const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
            acc[i][j] = _mm256_fmadd_ps(d, _mm256_set1_ps(sa[0] * scale[rows[j] * ng + g]), acc[i][j]);
            continue;
          }
          const float* sr = scale + rows[j] * ng;
          for (int c = 0; c < 4; ++c)
            acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(q[j][c], xv[c])),
                                        _mm256_set1_ps(sa[c] * sr[(k0 / 32 + c) >> shift]), acc[i][j]);
        }
      }
      if (G >= 128 && ++bg == blocks_per_group) bg = 0, ++g;
    }
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) {
        const float* mr = mins + rows[j] * ng;
        const float* xr = xsum + (m0 + i) * ng;
        float minpart = 0.f;
        for (int64_t g = 0; g < ng; ++g) minpart += mr[g] * xr[g];
        out[i][j] = hsum8(acc[i][j]) + minpart;
      }
  }
};
#endif

// ---------------------------------------------------------------------------------------------
// the GEMV driver: output rows split over threads in blocks; `epilogue` sees finished dot products

enum class Epilogue { kPlain, kSiluMul };

// a tile of NB weight rows (a run of columns, or their gate rows then their up rows) times mb <= 8
// activation rows
template <class W, int NB>
inline void dot_tile(const W& wt, int64_t m0, int mb, const int64_t* rows, float (*out)[4]) {
  switch (mb) {
    case 1: return wt.template dot<1, NB>(m0, rows, out);
    case 2: return wt.template dot<2, NB>(m0, rows, out);
    case 3: return wt.template dot<3, NB>(m0, rows, out);
#if QWENRUN_AVX512
    case 4: return wt.template dot<4, NB>(m0, rows, out);
    case 5: return wt.template dot<5, NB>(m0, rows, out);
    case 6: return wt.template dot<6, NB>(m0, rows, out);
    case 7: return wt.template dot<7, NB>(m0, rows, out);
    default: return wt.template dot<8, NB>(m0, rows, out);
#else
    default: return wt.template dot<4, NB>(m0, rows, out);
#endif
  }
}

template <class W>
inline void dot_rows(const W& wt, int64_t m0, int mb, const int64_t* rows, int nb, float (*out)[4]) {
  switch (nb) {
    case 1: return dot_tile<W, 1>(wt, m0, mb, rows, out);
#if QWENRUN_AVX512
    case 2: return dot_tile<W, 2>(wt, m0, mb, rows, out);
    case 3: return dot_tile<W, 3>(wt, m0, mb, rows, out);
    default: return dot_tile<W, 4>(wt, m0, mb, rows, out);
#else
    default: return dot_tile<W, 2>(wt, m0, mb, rows, out);
#endif
  }
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// Tile shape: weight rows x activation rows per pass, all accumulators in registers. One or two
// activation rows stream one weight row at a time (two gated): a tile of 4 rows is four interleaved
// streams, which the hardware prefetcher serves ~25% slower. With more rows the arithmetic per weight byte
// binds instead (the integer formats' most), so AVX-512 (32 registers) takes 4 weight rows by up to 4
// activation rows, then 2 by up to 8: independent dot products in flight hide the latency of each
// accumulator's chain, and each activation vector loaded serves several weight rows (int4 at 5 rows:
// ~2.6x fewer ns per weight row, L2-resident). AVX2 (16 registers) keeps one row (two gated) by 4.
struct TileShape {
  int weight_rows, act_rows;
};
inline TileShape tile_shape(int64_t M, bool gated) {
#if QWENRUN_AVX512
  if (M <= 2) return TileShape{gated ? 2 : 1, 2};
  return M <= 4 ? TileShape{4, 4} : TileShape{2, 8};
#else
  return TileShape{gated ? 2 : 1, 4};
#endif
}

// Tile t of y [M, N_out] (T) = epilogue(x W^T + bias): output columns t * cols .. for all M rows.
// kPlain: W has N_out rows from `row0`. kSiluMul: W holds [gate; up] (2 * N_out rows from `row0`), and
// y = silu(gate) * up, computed from the fp32 dot products. A tile's columns are adjacent rows of W
// (gated: their gate rows and their up rows), so consecutive tiles read the weight as one or two
// sequential streams; the activation rows (from `x_row0` of what `wt` reads) go in passes over the
// tile, which the first pass left in L1.
template <class W, class T, std::enable_if_t<!is_slab<W>::value, int> = 0>
inline void gemv_tile(const W& wt, int64_t x_row0, int64_t M, int64_t row0, int64_t N_out, bool gated, TileShape shape,
                      int64_t t, const float* bias, T* y) {
  const int cols = gated ? shape.weight_rows / 2 : shape.weight_rows;
  const int64_t c = t * cols;
  const int nc = static_cast<int>(std::min<int64_t>(cols, N_out - c));
  int64_t rows[4];
  for (int q = 0; q < nc; ++q) {
    rows[q] = row0 + c + q;
    if (gated) rows[nc + q] = row0 + N_out + c + q;
  }
  for (int64_t m0 = 0; m0 < M; m0 += shape.act_rows) {
    const int mb = static_cast<int>(std::min<int64_t>(shape.act_rows, M - m0));
    float out[8][4];
    dot_rows(wt, x_row0 + m0, mb, rows, gated ? 2 * nc : nc, out);
    for (int i = 0; i < mb; ++i)
      for (int q = 0; q < nc; ++q) {
        float v = out[i][q] + (bias ? bias[c + q] : 0.f);
        if (gated) v = silu(v) * (out[i][nc + q] + (bias ? bias[N_out + c + q] : 0.f));
        y[(m0 + i) * N_out + c + q] = static_cast<T>(v);
      }
  }
}

#if QWENRUN_AVX512
template <class W>
inline void slab_dot(const W& wt, int64_t m0, int mb, int64_t s, float (*out)[16]) {
  switch (mb) {
    case 1: return wt.template dot<1>(m0, s, out);
    case 2: return wt.template dot<2>(m0, s, out);
    case 3: return wt.template dot<3>(m0, s, out);
    case 4: return wt.template dot<4>(m0, s, out);
    case 5: return wt.template dot<5>(m0, s, out);
    case 6: return wt.template dot<6>(m0, s, out);
    case 7: return wt.template dot<7>(m0, s, out);
    default: return wt.template dot<8>(m0, s, out);
  }
}

// gemv_tile for slab weights: a tile is one slab of output columns (16 t ..), gated its gate slab and
// its up slab, all its activation rows in passes of 8 (N_out and row0 are multiples of 16)
template <class W, class T, std::enable_if_t<is_slab<W>::value, int> = 0>
inline void gemv_tile(const W& wt, int64_t x_row0, int64_t M, int64_t row0, int64_t N_out, bool gated, TileShape,
                      int64_t t, const float* bias, T* y) {
  const int64_t c = t * 16, gate = (row0 + c) / 16, up = (row0 + N_out + c) / 16;
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int mb = static_cast<int>(std::min<int64_t>(8, M - m0));
    float g[8][16], u[8][16];
    slab_dot(wt, x_row0 + m0, mb, gate, g);
    if (gated) slab_dot(wt, x_row0 + m0, mb, up, u);
    for (int i = 0; i < mb; ++i)
      for (int q = 0; q < 16; ++q) {
        float v = g[i][q] + (bias ? bias[c + q] : 0.f);
        if (gated) v = silu(v) * (u[i][q] + (bias ? bias[N_out + c + q] : 0.f));
        y[(m0 + i) * N_out + c + q] = static_cast<T>(v);
      }
  }
}
#endif

// the tile shape of W's gemv_tile: a slab's 16 columns (gated: 32 weight rows) for slab weights
template <class W>
inline TileShape tile_shape_for(int64_t M, bool gated) {
#if QWENRUN_AVX512
  if constexpr (is_slab<W>::value) return TileShape{gated ? 32 : 16, 8};
#endif
  return tile_shape(M, gated);
}

inline int64_t tile_count(int64_t N_out, bool gated, TileShape shape) {
  const int cols = gated ? shape.weight_rows / 2 : shape.weight_rows;
  return (N_out + cols - 1) / cols;
}

template <class W, class T>
void gemv(const W& wt, int64_t M, int64_t N_out, Epilogue ep, const float* bias, T* y) {
  const bool gated = ep == Epilogue::kSiluMul;
  const TileShape shape = tile_shape_for<W>(M, gated);
  const int cols = gated ? shape.weight_rows / 2 : shape.weight_rows;
  at::parallel_for(0, tile_count(N_out, gated, shape), std::max(1, 8 / cols), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) gemv_tile(wt, 0, M, 0, N_out, gated, shape, t, bias, y);
  });
}

Epilogue parse_epilogue(const std::string& act) {
  if (act == "none") return Epilogue::kPlain;
  TORCH_CHECK(act == "silu_mul", "unknown epilogue ", act);
  return Epilogue::kSiluMul;
}

at::Tensor new_output(const at::Tensor& x, int64_t N, Epilogue ep) {
  TORCH_CHECK(ep == Epilogue::kPlain || N % 2 == 0, "silu_mul needs an even number of weight rows");
  return at::empty({x.size(0), ep == Epilogue::kSiluMul ? N / 2 : N}, x.options());
}

std::vector<float> bias_f32(const c10::optional<at::Tensor>& bias) {
  if (!bias || !bias->defined()) return {};
  at::Tensor b = bias->to(at::kFloat).contiguous();
  return std::vector<float>(b.data_ptr<float>(), b.data_ptr<float>() + b.numel());
}

template <class W>
void run(const W& wt, const at::Tensor& x, Epilogue ep, const std::vector<float>& bias, at::Tensor& y) {
  const float* b = bias.empty() ? nullptr : bias.data();
  if (y.scalar_type() == at::kBFloat16)
    gemv(wt, x.size(0), y.size(1), ep, b, y.data_ptr<bf16>());
  else
    gemv(wt, x.size(0), y.size(1), ep, b, y.data_ptr<float>());
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "activations must be [M, ", K, "]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "activations must be bf16 or fp32");
}

// ---------------------------------------------------------------------------------------------
// entry points

inline bool int4_shape_ok(int64_t K, int64_t group_size) {
  return (group_size == 32 || group_size == 64 || group_size % 128 == 0) && K % group_size == 0 && K % 128 == 0;
}

#if QWENRUN_AVX512
// gather offsets of one row's 64 bytes in a slab: 16 dwords (4 inputs each, or 8 int4 codes) 64 bytes apart
inline __m512i slab_row_offsets() {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(64));
}
#endif

// The slab layouts (int8_x16 / int4_x16, Int8SlabWeights / Int4SlabWeights) of a matrix of N rows: AVX-512
// only, N % 32 == 0 (a gated half is whole slabs), int8 inputs in 32-input blocks, int4 groups of 128k
inline void check_interleaved(int64_t N, int64_t K, int64_t group_size, bool int4) {
#if QWENRUN_AVX512
  TORCH_CHECK(N % 32 == 0 && (int4 ? group_size % 128 == 0 : K % 32 == 0),
              int4 ? "int4_x16 needs N divisible by 32 and groups of a multiple of 128" : "int8_x16 needs N and K divisible by 32");
#else
  TORCH_CHECK(false, "the int8_x16 / int4_x16 weight layouts are AVX-512 only");
#endif
}

at::Tensor gemv_bf16(const at::Tensor& x_, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                     const std::string& act) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous(), "weight must be contiguous bf16 [N, K]");
  check_x(x_, w.size(1));
  at::Tensor x = x_.to(at::kBFloat16).contiguous();
  Epilogue ep = parse_epilogue(act);
  at::Tensor y = new_output(x_, w.size(0), ep);
#if QWENRUN_AVX512
  Bf16Weights wt{reinterpret_cast<const uint16_t*>(w.data_ptr()), w.size(1), reinterpret_cast<const uint16_t*>(x.data_ptr())};
#else
  Bf16Weights wt(reinterpret_cast<const uint16_t*>(w.data_ptr()), w.size(1), reinterpret_cast<const uint16_t*>(x.data_ptr()), x.size(0));
#endif
  run(wt, x, ep, bias_f32(bias), y);
  return y;
}

// interleaved: w in the int8_x16 layout (Int8SlabWeights)
at::Tensor gemv_int8(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& bias, const std::string& act, bool interleaved) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous(), "weight must be contiguous int8 [N, K]");
  TORCH_CHECK(w.size(1) % 32 == 0, "int8 kernel needs K divisible by 32");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == w.size(0) && scale.is_contiguous(), "scale must be fp32 [N]");
  if (interleaved) check_interleaved(w.size(0), w.size(1), 0, false);
  check_x(x_, w.size(1));
  at::Tensor x = x_.contiguous();
  QuantizedActivations a = quantize_activations(x, 0, 32);
  Epilogue ep = parse_epilogue(act);
  at::Tensor y = new_output(x_, w.size(0), ep);
#if QWENRUN_AVX512
  if (interleaved) {
    run(Int8SlabWeights{w.data_ptr<int8_t>(), scale.data_ptr<float>(), w.size(1), a.q.data_ptr<int8_t>(),
                        a.s.data_ptr<float>(), a.comp.data_ptr<float>()}, x, ep, bias_f32(bias), y);
    return y;
  }
  Int8Weights wt{w.data_ptr<int8_t>(), scale.data_ptr<float>(), w.size(1), a.q.data_ptr<int8_t>(),
                 a.s.data_ptr<float>(), a.comp.data_ptr<float>()};
#else
  Int8Weights wt{w.data_ptr<int8_t>(), scale.data_ptr<float>(), w.size(1), a.q.data_ptr<int8_t>(), a.s.data_ptr<float>()};
#endif
  run(wt, x, ep, bias_f32(bias), y);
  return y;
}

// interleaved: w, scale and mins in the int4_x16 layout (Int4SlabWeights)
at::Tensor gemv_int4(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& mins,
                     int64_t group_size, const c10::optional<at::Tensor>& bias, const std::string& act, bool interleaved) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "weight must be contiguous uint8 [N, K/2]");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(int4_shape_ok(K, group_size), "int4 needs K divisible by 128 and by the group (32, 64 or a multiple of 128)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && mins.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  mins.is_contiguous() && scale.numel() == N * (K / group_size) && mins.numel() == scale.numel(),
              "scales and mins must be fp32 [N, K/group]");
  if (interleaved) check_interleaved(N, K, group_size, true);
  check_x(x_, K);
  at::Tensor x = x_.contiguous();
  QuantizedActivations a = quantize_activations(x, group_size, group_size >= 128 ? 128 : 32);
  Epilogue ep = parse_epilogue(act);
  at::Tensor y = new_output(x_, N, ep);
#if QWENRUN_AVX512
  if (interleaved) {
    run(Int4SlabWeights{w.data_ptr<uint8_t>(), scale.data_ptr<float>(), mins.data_ptr<float>(), K, group_size,
                        K / group_size, a.q.data_ptr<int8_t>(), a.s.data_ptr<float>(), a.gsum.data_ptr<float>()},
        x, ep, bias_f32(bias), y);
    return y;
  }
#endif
  Int4Weights wt{w.data_ptr<uint8_t>(), scale.data_ptr<float>(), mins.data_ptr<float>(), K, group_size, K / group_size,
                 a.q.data_ptr<int8_t>(), a.s.data_ptr<float>(), a.gsum.data_ptr<float>()};
  run(wt, x, ep, bias_f32(bias), y);
  return y;
}


// Weights back to a dense matrix for prefill GEMMs (compute-bound, so one conversion per call pays).
// interleaved: w in the int8_x16 layout (Int8SlabWeights), read back row by row
at::Tensor dequantize_int8(const at::Tensor& w, const at::Tensor& scale, at::ScalarType dtype, bool interleaved) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous() && scale.scalar_type() == at::kFloat,
              "int8 weight [N, K] and fp32 scale [N] expected");
  const int64_t N = w.size(0), K = w.size(1);
  if (interleaved) check_interleaved(N, K, 0, false);
  at::Tensor out = at::empty({N, K}, w.options().dtype(dtype));
  const int8_t* q = w.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
#if QWENRUN_AVX512
    const __m512i gather = slab_row_offsets();  // a row's 64 inputs of a slab
    alignas(64) int8_t row[64];
    for (int64_t n = n0; n < n1; ++n) {
      const __m512 sv = _mm512_set1_ps(s[n]);
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 m = tail16(K - k);
        if (interleaved && k % 64 == 0)
          _mm512_store_si512(row, _mm512_i32gather_epi32(gather, q + (n / 16) * 16 * K + k * 16 + (n % 16) * 4, 1));
        const __m128i codes = interleaved ? _mm_load_si128(reinterpret_cast<const __m128i*>(row + k % 64))
                                          : _mm_maskz_loadu_epi8(m, q + n * K + k);
        const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)), sv);
        if (dtype == at::kBFloat16)
          store16(out.data_ptr<bf16>() + n * K + k, v, m);
        else
          store16(out.data_ptr<float>() + n * K + k, v, m);
      }
    }
#else
    for (int64_t n = n0; n < n1; ++n) {
      const __m256 sv = _mm256_set1_ps(s[n]);
      for (int64_t k = 0; k < K; k += 8) {
        int8_t tail[8] = {};
        const int8_t* src = q + n * K + k;
        if (K - k < 8) {
          std::copy(src, src + (K - k), tail);
          src = tail;
        }
        const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)))), sv);
        if (dtype == at::kBFloat16)
          store8(out.data_ptr<bf16>() + n * K + k, v, K - k);
        else
          store8(out.data_ptr<float>() + n * K + k, v, K - k);
      }
    }
#endif
  });
  return out;
}

// interleaved: w, scale and mins in the int4_x16 layout (Int4SlabWeights), read back row by row
at::Tensor dequantize_int4(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& mins, int64_t group_size,
                           at::ScalarType dtype, bool interleaved) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() && int4_shape_ok(w.size(1) * 2, group_size),
              "packed int4 weight [N, K/2] with K divisible by 128 and the group expected");
  const int64_t N = w.size(0), K = w.size(1) * 2, ng = K / group_size;
  if (interleaved) check_interleaved(N, K, group_size, true);
  at::Tensor out = at::empty({N, K}, w.options().dtype(dtype));
  const uint8_t* q = w.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  const float* mn = mins.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
#if QWENRUN_AVX512
    alignas(64) uint8_t codes[128];
    const __m512i gather = slab_row_offsets();  // a row's 64 bytes of a slab's block
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t k0 = 0; k0 < K; k0 += 128) {
        __m512i lo, hi;
        if (interleaved) {
          const __m512i b = _mm512_i32gather_epi32(gather, q + ((n / 16) * (K / 128) + k0 / 128) * 1024 + (n % 16) * 4, 1);
          lo = _mm512_and_si512(b, _mm512_set1_epi8(0xf));
          hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(0xf));
        } else {
          unpack_int4_block(q + n * (K / 2) + k0 / 2, lo, hi);
        }
        _mm512_store_si512(codes, lo);
        _mm512_store_si512(codes + 64, hi);
        for (int64_t t = 0; t < 128; t += 16) {  // 16 inputs, all in one group (groups are >= 32)
          const int64_t gi = (k0 + t) / group_size;
          const int64_t g = interleaved ? ((n / 16) * ng + gi) * 16 + n % 16 : n * ng + gi;
          const __m512 r = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(codes + t)))),
                                           _mm512_set1_ps(s[g]), _mm512_set1_ps(mn[g]));
          if (dtype == at::kBFloat16)
            store16(out.data_ptr<bf16>() + n * K + k0 + t, r, 0xffff);
          else
            store16(out.data_ptr<float>() + n * K + k0 + t, r, 0xffff);
        }
      }
    }
#else
    alignas(32) uint8_t codes[128];
    const __m256i low = _mm256_set1_epi8(0xf);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t k0 = 0; k0 < K; k0 += 128) {
        const uint8_t* p = q + n * (K / 2) + k0 / 2;
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
        _mm256_store_si256(reinterpret_cast<__m256i*>(codes), _mm256_and_si256(b0, low));
        _mm256_store_si256(reinterpret_cast<__m256i*>(codes + 32), _mm256_and_si256(b1, low));
        _mm256_store_si256(reinterpret_cast<__m256i*>(codes + 64), _mm256_and_si256(_mm256_srli_epi16(b0, 4), low));
        _mm256_store_si256(reinterpret_cast<__m256i*>(codes + 96), _mm256_and_si256(_mm256_srli_epi16(b1, 4), low));
        for (int64_t t = 0; t < 128; t += 8) {  // 8 inputs, all in one group (groups are >= 32)
          const int64_t g = n * ng + (k0 + t) / group_size;
          const __m256 r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + t)))),
                                           _mm256_set1_ps(s[g]), _mm256_set1_ps(mn[g]));
          if (dtype == at::kBFloat16)
            store8(out.data_ptr<bf16>() + n * K + k0 + t, r);
          else
            store8(out.data_ptr<float>() + n * K + k0 + t, r);
        }
      }
    }
#endif
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// single-query attention over a paged, head-major cache

// The cache holds T (the query's dtype) or int8_t: an int8 cache's rows come with one fp32 scale per
// (head, slot) in ks / vs [nkv, S], folded into each key's score and each value's weight, so the int8
// rows are read as they are stored (half the bytes of bf16), never expanded in memory.
#if QWENRUN_AVX512
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Rows of one sequence at consecutive positions over the same cache slots (1 + k verified drafts, a
// short prefill tail) form a run: each key and value row is loaded once for all of the run's queries,
// instead of once per row (5 rows cost ~3.5x one row; a run costs about one row's key reads).
constexpr int64_t kRunMax = 8;

// [first row, rows] of each run: row b + r joins b's run if it attends to r more positions, all of
// them at the slots row b's slot row names (the kernel reads every row's keys through row b's)
inline std::vector<std::pair<int64_t, int64_t>> query_runs(const int64_t* sp, const int64_t* lp, int64_t B, int64_t L) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t b = 0; b < B;) {
    int64_t r = 1;
    while (b + r < B && r < kRunMax && lp[b + r] == lp[b] + r &&
           std::equal(sp + b * L, sp + b * L + lp[b + r], sp + (b + r) * L))
      ++r;
    runs.emplace_back(b, r);
    b += r;
  }
  return runs;
}

// the lanes of q . k for one key row (in registers) and one query head, two FMA chains deep
template <int ND>
inline __m512 head_dot(const __m512 (&kv)[ND], const float* qg) {
  __m512 s0 = _mm512_mul_ps(kv[0], _mm512_loadu_ps(qg));
  __m512 s1 = _mm512_setzero_ps();
  for (int c = 1; c < ND; ++c) {
    if (c & 1) s1 = _mm512_fmadd_ps(kv[c], _mm512_loadu_ps(qg + c * 16), s1);
    else s0 = _mm512_fmadd_ps(kv[c], _mm512_loadu_ps(qg + c * 16), s0);
  }
  return _mm512_add_ps(s0, s1);
}

// The weighted values of QH query heads (probabilities `scores`, rows of L, zero past each head's
// context) over bf16 value rows, with the probabilities rounded to bf16 as transformers' eager
// attention casts them before its value product. Two positions per vdpbf16ps: rows pos and pos + 1
// interleaved by 16-bit unpacks against the pair of their weights, half the instructions of fp32
// FMAs on widened values (5 verify rows cost ~2.8x one row's attention with those). An unpack
// leaves chunk c's accumulator lanes in the order [cols 8j..8j+3 (lo), 8j+4..8j+7 (hi)] per 128-bit
// lane j; one permute per head puts them back.
template <int ND, class Dst>
inline void bf16_weighted_values(const float* scores, bf16* probs, int64_t QH, int64_t G, int64_t L, int64_t first,
                                 int64_t last, const int64_t* srow, const uint16_t* vh, Dst dst) {
  constexpr int64_t d = ND * 16;
  constexpr int NC = ND / 2;  // chunks of 32 columns
  const int64_t P = L + 2;
  for (int64_t qh = 0; qh < QH; ++qh) {
    bf16* pb = probs + qh * P;
    const float* sc = scores + qh * L;
    for (int64_t p = 0; p < last; p += 16) store16(pb + p, _mm512_maskz_loadu_ps(tail16(last - p), sc + p), tail16(last - p));
    pb[last] = pb[last + 1] = bf16(0.f);
  }
  const __m512i first_half = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second_half = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t q0 = 0; q0 < QH; q0 += 2) {
    const bool two = q0 + 1 < QH;
    const int32_t* w0 = reinterpret_cast<const int32_t*>(probs + q0 * P);
    const int32_t* w1 = reinterpret_cast<const int32_t*>(probs + (two ? q0 + 1 : q0) * P);
    const int64_t n = first + (two ? q0 + 1 : q0) / G;
    __m512 a0[ND], a1[ND];
    for (int c = 0; c < ND; ++c) a0[c] = a1[c] = _mm512_setzero_ps();
    const auto step = [&](int64_t pos, bool pair) {
      const uint16_t* v0 = vh + srow[pos] * d;
      const uint16_t* v1 = pair ? vh + srow[pos + 1] * d : v0;
      const __m512bh p0 = (__m512bh)_mm512_set1_epi32(w0[pos / 2]), p1 = (__m512bh)_mm512_set1_epi32(w1[pos / 2]);
      for (int c = 0; c < NC; ++c) {
        const __m512i x = _mm512_loadu_si512(v0 + c * 32);
        const __m512i y = pair ? _mm512_loadu_si512(v1 + c * 32) : _mm512_setzero_si512();
        const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(x, y), hi = (__m512bh)_mm512_unpackhi_epi16(x, y);
        a0[2 * c] = _mm512_dpbf16_ps(a0[2 * c], lo, p0);
        a0[2 * c + 1] = _mm512_dpbf16_ps(a0[2 * c + 1], hi, p0);
        a1[2 * c] = _mm512_dpbf16_ps(a1[2 * c], lo, p1);
        a1[2 * c + 1] = _mm512_dpbf16_ps(a1[2 * c + 1], hi, p1);
      }
    };
    int64_t pos = 0;
    for (; pos + 1 < n; pos += 2) step(pos, true);
    if (pos < n) step(pos, false);  // odd n: the pair's second weight is the zero padding
    for (int c = 0; c < NC; ++c) {
      store16(dst(q0) + c * 32, _mm512_permutex2var_ps(a0[2 * c], first_half, a0[2 * c + 1]), 0xffff);
      store16(dst(q0) + c * 32 + 16, _mm512_permutex2var_ps(a0[2 * c], second_half, a0[2 * c + 1]), 0xffff);
      if (two) {
        store16(dst(q0 + 1) + c * 32, _mm512_permutex2var_ps(a1[2 * c], first_half, a1[2 * c + 1]), 0xffff);
        store16(dst(q0 + 1) + c * 32 + 16, _mm512_permutex2var_ps(a1[2 * c], second_half, a1[2 * c + 1]), 0xffff);
      }
    }
  }
}

template <class T, class C, int ND>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const float* ks,
                           const float* vs, const at::Tensor& slots, const at::Tensor& lens, double scale,
                           at::Tensor& out) {
  constexpr int64_t d = ND * 16;
  constexpr bool quantized = std::is_same_v<C, int8_t>;
  constexpr bool bf16_dot = std::is_same_v<T, bf16> && std::is_same_v<C, bf16> && ND % 2 == 0;
  const int64_t B = q.size(0), nh = q.size(1), nkv = kc.size(0), S = kc.size(1);
  const int64_t G = nh / nkv, L = slots.size(1);
  const T* qp = q.data_ptr<T>();
  const C* kp = kc.data_ptr<C>();
  const C* vp = vc.data_ptr<C>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const auto runs = query_runs(sp, lp, B, L);
  const int64_t nruns = static_cast<int64_t>(runs.size());
  int64_t longest = 1;
  for (const auto& run : runs) longest = std::max(longest, run.second);
  at::parallel_for(0, nruns * nkv, 1, [&](int64_t t0, int64_t t1) {
    // the run's queries as R * G heads, qh = r * G + g (a plain decode batch's runs are all 1 row)
    std::vector<float> qf(bf16_dot ? 0 : longest * G * d), scores(longest * G * L);
    std::vector<const uint16_t*> qrows(bf16_dot ? longest * G : 0);
    // bf16 probabilities, a row of L + 2 per query head (even, zero-padded): two positions' weights are
    // one 32-bit pair, as vdpbf16ps takes them
    std::vector<bf16> probs(bf16_dot ? longest * G * (L + 2) : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const auto [b0, R] = runs[t / nkv];
      const int64_t h = t % nkv, QH = R * G, first = lp[b0], last = lp[b0 + R - 1];
      const int64_t* srow = sp + b0 * L;
      const C* kh = kp + h * S * d;
      const C* vh = vp + h * S * d;
      const float* ksh = quantized ? ks + h * S : nullptr;
      const float* vsh = quantized ? vs + h * S : nullptr;
      if constexpr (bf16_dot) {
        // bf16 queries against bf16 keys: AVX512-BF16 pair products (exact in fp32, as the fp32 FMAs
        // below), half the instructions and no widening of the keys; the scale goes on the score
        for (int64_t qh = 0; qh < QH; ++qh)
          qrows[qh] = reinterpret_cast<const uint16_t*>(qp) + ((b0 + qh / G) * nh + h * G + qh % G) * d;
        const float sc = static_cast<float>(scale);
        for (int64_t pos = 0; pos < last; ++pos) {
          const uint16_t* kr = reinterpret_cast<const uint16_t*>(kh + srow[pos] * d);
          __m512bh kb[ND / 2];
          for (int c = 0; c < ND / 2; ++c) kb[c] = (__m512bh)_mm512_loadu_si512(kr + c * 32);
          const auto dot = [&](int64_t qh) {
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            for (int c = 0; c < ND / 2; ++c) {
              const __m512bh qv = (__m512bh)_mm512_loadu_si512(qrows[qh] + c * 32);
              if (c & 1) a1 = _mm512_dpbf16_ps(a1, kb[c], qv);
              else a0 = _mm512_dpbf16_ps(a0, kb[c], qv);
            }
            return _mm512_add_ps(a0, a1);
          };
          int64_t qh = pos < first ? 0 : (pos - first + 1) * G;
          for (; qh + 4 <= QH; qh += 4) {
            __m512 acc[4];
            for (int u = 0; u < 4; ++u) acc[u] = dot(qh + u);
            float sc4[4];
            hsum<4>(acc, sc4);
            for (int u = 0; u < 4; ++u) scores[(qh + u) * L + pos] = sc4[u] * sc;
          }
          for (; qh < QH; ++qh) scores[qh * L + pos] = _mm512_reduce_add_ps(dot(qh)) * sc;
        }
      } else {
        for (int64_t r = 0; r < R; ++r)
          for (int64_t g = 0; g < G; ++g)
            for (int c = 0; c < ND; ++c)
              _mm512_storeu_ps(&qf[(r * G + g) * d + c * 16],
                               _mm512_mul_ps(load16(qp + ((b0 + r) * nh + h * G + g) * d + c * 16), _mm512_set1_ps(float(scale))));
        // scores: each key row is loaded once into registers and serves every query head of the run
        // that reaches its position (row r sees positions below first + r)
        for (int64_t pos = 0; pos < last; ++pos) {
          const C* kr = kh + srow[pos] * d;
          __m512 kv[ND];
          for (int c = 0; c < ND; ++c) kv[c] = load16(kr + c * 16);
          if constexpr (quantized) {
            const __m512 sk = _mm512_set1_ps(ksh[srow[pos]]);
            for (int c = 0; c < ND; ++c) kv[c] = _mm512_mul_ps(kv[c], sk);
          }
          // four heads at a time: their lane sums share one shuffle tree
          int64_t qh = pos < first ? 0 : (pos - first + 1) * G;
          for (; qh + 4 <= QH; qh += 4) {
            __m512 acc[4];
            for (int u = 0; u < 4; ++u) acc[u] = head_dot<ND>(kv, &qf[(qh + u) * d]);
            float sc4[4];
            hsum<4>(acc, sc4);
            for (int u = 0; u < 4; ++u) scores[(qh + u) * L + pos] = sc4[u];
          }
          for (; qh < QH; ++qh) scores[qh * L + pos] = _mm512_reduce_add_ps(head_dot<ND>(kv, &qf[qh * d]));
        }
      }
      // softmax in fp32 over each row's own context; the positions past it weigh 0 in the value pass
      for (int64_t qh = 0; qh < QH; ++qh) {
        const int64_t n = first + qh / G;
        float* sc = &scores[qh * L];
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t p = 0; p < n; p += 16) mx = _mm512_mask_max_ps(mx, tail16(n - p), mx, _mm512_maskz_loadu_ps(tail16(n - p), sc + p));
        const __m512 mxv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t p = 0; p < n; p += 16) {
          __mmask16 m = tail16(n - p);
          __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + p), mxv));
          sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
          _mm512_mask_storeu_ps(sc + p, m, e);
        }
        const float inv = 1.f / _mm512_reduce_add_ps(sum);
        for (int64_t p = 0; p < n; ++p) sc[p] *= inv;
        std::fill(sc + n, sc + last, 0.f);
      }
      if constexpr (bf16_dot) {
        bf16_weighted_values<ND>(scores.data(), probs.data(), QH, G, L, first, last, srow,
                                 reinterpret_cast<const uint16_t*>(vh), [&](int64_t qh) {
                                   return op + ((b0 + qh / G) * nh + h * G + qh % G) * d;
                                 });
        continue;
      }
      // weighted values, two query heads at a time with their accumulators in registers
      for (int64_t q0 = 0; q0 < QH; q0 += 2) {
        const bool two = q0 + 1 < QH;
        const float* p0 = &scores[q0 * L];
        const float* p1 = two ? &scores[(q0 + 1) * L] : p0;
        const int64_t n = first + (two ? q0 + 1 : q0) / G;
        __m512 a0[ND], a1[ND];
        for (int c = 0; c < ND; ++c) a0[c] = a1[c] = _mm512_setzero_ps();
        for (int64_t pos = 0; pos < n; ++pos) {
          const C* vr = vh + srow[pos] * d;
          const float sv = quantized ? vsh[srow[pos]] : 1.f;
          const __m512 w0 = _mm512_set1_ps(p0[pos] * sv), w1 = _mm512_set1_ps(p1[pos] * sv);
          for (int c = 0; c < ND; ++c) {
            const __m512 vv = load16(vr + c * 16);
            a0[c] = _mm512_fmadd_ps(w0, vv, a0[c]);
            a1[c] = _mm512_fmadd_ps(w1, vv, a1[c]);
          }
        }
        // query head qh of the run is row b0 + qh / G, head h * G + qh % G
        const auto dst = [&](int64_t qh) { return op + ((b0 + qh / G) * nh + h * G + qh % G) * d; };
        for (int c = 0; c < ND; ++c) {
          store16(dst(q0) + c * 16, a0[c], 0xffff);
          if (two) store16(dst(q0 + 1) + c * 16, a1[c], 0xffff);
        }
      }
    }
  });
}
#else
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <class T, class C, int ND>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const float* ks,
                           const float* vs, const at::Tensor& slots, const at::Tensor& lens, double scale,
                           at::Tensor& out) {
  constexpr int64_t d = ND * 16;
  constexpr int NV = 2 * ND;              // 8-wide vectors per head
  constexpr int CV = NV < 4 ? NV : 4;     // vectors of value columns per pass: two heads' sums fit the 16 registers
  constexpr bool quantized = std::is_same_v<C, int8_t>;
  const int64_t B = q.size(0), nh = q.size(1), nkv = kc.size(0), S = kc.size(1);
  const int64_t G = nh / nkv, L = slots.size(1);
  const T* qp = q.data_ptr<T>();
  const C* kp = kc.data_ptr<C>();
  const C* vp = vc.data_ptr<C>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * nkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf(G * d), scores(G * L);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nkv, h = t % nkv, n = lp[b];
      const int64_t* srow = sp + b * L;
      const C* kh = kp + h * S * d;
      const C* vh = vp + h * S * d;
      const float* ksh = quantized ? ks + h * S : nullptr;
      const float* vsh = quantized ? vs + h * S : nullptr;
      for (int64_t g = 0; g < G; ++g)
        for (int c = 0; c < NV; ++c)
          _mm256_storeu_ps(&qf[g * d + c * 8], _mm256_mul_ps(load8(qp + (b * nh + h * G + g) * d + c * 8), _mm256_set1_ps(float(scale))));
      // scores: the key row stays in L1 for all G query heads
      for (int64_t pos = 0; pos < n; ++pos) {
        const C* kr = kh + srow[pos] * d;
        const float sk = quantized ? ksh[srow[pos]] : 1.f;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = &qf[g * d];
          __m256 s0 = _mm256_mul_ps(load8(kr), _mm256_loadu_ps(qg)), s1 = _mm256_setzero_ps();
          for (int c = 1; c < NV; ++c) {
            if (c & 1) s1 = _mm256_fmadd_ps(load8(kr + c * 8), _mm256_loadu_ps(qg + c * 8), s1);
            else s0 = _mm256_fmadd_ps(load8(kr + c * 8), _mm256_loadu_ps(qg + c * 8), s0);
          }
          scores[g * L + pos] = quantized ? hsum8(_mm256_add_ps(s0, s1)) * sk : hsum8(_mm256_add_ps(s0, s1));
        }
      }
      // softmax in fp32
      for (int64_t g = 0; g < G; ++g) {
        float* sc = &scores[g * L];
        __m256 mx = _mm256_set1_ps(-INFINITY);
        for (int64_t p = 0; p < n; p += 8) {
          const __m256i m = first8(n - p);
          mx = _mm256_max_ps(mx, _mm256_blendv_ps(mx, _mm256_maskload_ps(sc + p, m), _mm256_castsi256_ps(m)));
        }
        const __m256 mxv = _mm256_set1_ps(hmax8(mx));
        __m256 sum = _mm256_setzero_ps();
        for (int64_t p = 0; p < n; p += 8) {
          const __m256i m = first8(n - p);
          const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_maskload_ps(sc + p, m), mxv)), _mm256_castsi256_ps(m));
          sum = _mm256_add_ps(sum, e);
          _mm256_maskstore_ps(sc + p, m, e);
        }
        const float inv = 1.f / hsum8(sum);
        for (int64_t p = 0; p < n; ++p) sc[p] *= inv;
      }
      // weighted values, two query heads and CV vectors of columns at a time with their sums in registers;
      // each pass reads its columns' cache lines of every value row, so the rows are read once in all
      for (int64_t g0 = 0; g0 < G; g0 += 2) {
        const bool two = g0 + 1 < G;
        const float* p0 = &scores[g0 * L];
        const float* p1 = two ? &scores[(g0 + 1) * L] : p0;
        for (int c0 = 0; c0 < NV; c0 += CV) {
          __m256 a0[CV], a1[CV];
          for (int c = 0; c < CV; ++c) a0[c] = a1[c] = _mm256_setzero_ps();
          for (int64_t pos = 0; pos < n; ++pos) {
            const C* vr = vh + srow[pos] * d + c0 * 8;
            const float sv = quantized ? vsh[srow[pos]] : 1.f;
            const __m256 w0 = _mm256_set1_ps(p0[pos] * sv), w1 = _mm256_set1_ps(p1[pos] * sv);
            for (int c = 0; c < CV; ++c) {
              const __m256 vv = load8(vr + c * 8);
              a0[c] = _mm256_fmadd_ps(w0, vv, a0[c]);
              a1[c] = _mm256_fmadd_ps(w1, vv, a1[c]);
            }
          }
          for (int c = 0; c < CV; ++c) {
            store8(op + (b * nh + h * G + g0) * d + (c0 + c) * 8, a0[c]);
            if (two) store8(op + (b * nh + h * G + g0 + 1) * d + (c0 + c) * 8, a1[c]);
          }
        }
      }
    }
  });
}
#endif

template <class T, class C>
void decode_attention_dispatch(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const float* ks,
                               const float* vs, const at::Tensor& slots, const at::Tensor& lens, double scale,
                               at::Tensor& out) {
  switch (q.size(2)) {
    case 16: return decode_attention_impl<T, C, 1>(q, kc, vc, ks, vs, slots, lens, scale, out);
    case 32: return decode_attention_impl<T, C, 2>(q, kc, vc, ks, vs, slots, lens, scale, out);
    case 64: return decode_attention_impl<T, C, 4>(q, kc, vc, ks, vs, slots, lens, scale, out);
    case 128: return decode_attention_impl<T, C, 8>(q, kc, vc, ks, vs, slots, lens, scale, out);
    case 256: return decode_attention_impl<T, C, 16>(q, kc, vc, ks, vs, slots, lens, scale, out);
    default: TORCH_CHECK(false, "decode attention supports head_dim 16, 32, 64, 128 or 256");
  }
}

// the checks both entry points share; returns the output [B, nh, d]
at::Tensor decode_attention_checks(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& slots, const at::Tensor& lens) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "bad attention shapes");
  TORCH_CHECK(q.size(1) % k_cache.size(0) == 0 && q.size(2) == k_cache.size(2), "heads do not match the cache");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && lens.scalar_type() == at::kLong && slots.dim() == 2 &&
                  slots.size(0) == q.size(0) && lens.numel() == q.size(0), "slots [B, L] and lens [B] must be int64");
  TORCH_CHECK(slots.is_contiguous() && lens.is_contiguous(), "slots and lens must be contiguous");
  for (int64_t b = 0; b < lens.numel(); ++b) {
    const int64_t n = lens.data_ptr<int64_t>()[b];
    TORCH_CHECK(n > 0 && n <= slots.size(1), "context length ", n, " out of range");
  }
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat, "decode attention supports bf16 and fp32");
  return at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
}

// q [B, nh, d]; caches [nkv, S, d]; slots [B, L] int64 cache slot of each context position; lens [B]
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& lens, double scale) {
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "q and cache dtypes differ");
  at::Tensor qc = q.contiguous(), sc = slots.contiguous(), lc = lens.contiguous();
  at::Tensor out = decode_attention_checks(qc, k_cache, v_cache, sc, lc);
  if (q.scalar_type() == at::kBFloat16)
    decode_attention_dispatch<bf16, bf16>(qc, k_cache, v_cache, nullptr, nullptr, sc, lc, scale, out);
  else
    decode_attention_dispatch<float, float>(qc, k_cache, v_cache, nullptr, nullptr, sc, lc, scale, out);
  return out.view({q.size(0), q.size(1) * q.size(2)});
}

// an int8 cache: caches [nkv, S, d] int8 with scales [nkv, S] fp32 (slot s of head h is k[h, s] * k_scale[h, s])
at::Tensor decode_attention_int8(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& slots,
                                 const at::Tensor& lens, double scale) {
  TORCH_CHECK(k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar, "int8 caches expected");
  TORCH_CHECK(k_scale.scalar_type() == at::kFloat && v_scale.scalar_type() == at::kFloat && k_scale.is_contiguous() &&
                  v_scale.is_contiguous() && k_scale.dim() == 2 && k_scale.sizes() == v_scale.sizes() &&
                  k_scale.size(0) == k_cache.size(0) && k_scale.size(1) == k_cache.size(1),
              "scales must be contiguous fp32 [nkv, S]");
  at::Tensor qc = q.contiguous(), sc = slots.contiguous(), lc = lens.contiguous();
  at::Tensor out = decode_attention_checks(qc, k_cache, v_cache, sc, lc);
  const float* ks = k_scale.data_ptr<float>();
  const float* vs = v_scale.data_ptr<float>();
  if (q.scalar_type() == at::kBFloat16)
    decode_attention_dispatch<bf16, int8_t>(qc, k_cache, v_cache, ks, vs, sc, lc, scale, out);
  else
    decode_attention_dispatch<float, int8_t>(qc, k_cache, v_cache, ks, vs, sc, lc, scale, out);
  return out.view({q.size(0), q.size(1) * q.size(2)});
}

// ---------------------------------------------------------------------------------------------
// normalisation and rotary embedding, rounding where transformers' bf16 ops round

// the value an op producing T would store: bf16 rounds to nearest even, fp32 is exact
template <class T>
inline float rnd(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// Qwen3RMSNorm: w * T(x * rsqrt(mean(x^2) + eps)), statistics in fp32; with a residual, x = T(x + res)
// is normalised and also written to res_out (the next residual stream)
#if QWENRUN_AVX512
template <class T>
void rms_norm_impl(const T* x, const T* res, T* res_out, const T* w, T* y, int64_t rows, int64_t H, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * H;
      T* src = res ? res_out + r * H : const_cast<T*>(xr);  // the values being normalised
      __m512 ss = _mm512_setzero_ps();
      for (int64_t i = 0; i < H; i += 16) {
        const __mmask16 m = tail16(H - i);
        __m512 v = load16(xr + i, m);
        if (res) {
          v = vrnd<T>(_mm512_add_ps(v, load16(res + r * H + i, m)));
          store16(src + i, v, m);
        }
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / H + eps));
      for (int64_t i = 0; i < H; i += 16) {
        const __mmask16 m = tail16(H - i);
        store16(y + r * H + i, _mm512_mul_ps(vrnd<T>(_mm512_mul_ps(load16(src + i, m), inv)), load16(w + i, m)), m);
      }
    }
  });
}
#else
template <class T>
void rms_norm_impl(const T* x, const T* res, T* res_out, const T* w, T* y, int64_t rows, int64_t H, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * H;
      T* src = res ? res_out + r * H : const_cast<T*>(xr);  // the values being normalised
      __m256 ss = _mm256_setzero_ps();
      for (int64_t i = 0; i < H; i += 8) {
        __m256 v = load8(xr + i, H - i);
        if (res) {
          v = vrnd<T>(_mm256_add_ps(v, load8(res + r * H + i, H - i)));
          store8(src + i, v, H - i);
        }
        ss = _mm256_fmadd_ps(v, v, ss);
      }
      const __m256 inv = _mm256_set1_ps(1.f / std::sqrt(hsum8(ss) / H + eps));
      for (int64_t i = 0; i < H; i += 8)
        store8(y + r * H + i, _mm256_mul_ps(vrnd<T>(_mm256_mul_ps(load8(src + i, H - i), inv)), load8(w + i, H - i)), H - i);
    }
  });
}
#endif

// returns (normed, x + residual); residual may be None (then the second output is x itself)
std::vector<at::Tensor> rms_norm(const at::Tensor& x_, const c10::optional<at::Tensor>& residual, const at::Tensor& w,
                                 double eps) {
  TORCH_CHECK(x_.scalar_type() == w.scalar_type() && w.dim() == 1 && x_.size(-1) == w.size(0), "norm weight must match x");
  at::Tensor x = x_.contiguous(), y = at::empty_like(x);
  const bool has_res = residual && residual->defined();
  at::Tensor res = has_res ? residual->contiguous() : x;
  TORCH_CHECK(res.sizes() == x.sizes() && res.scalar_type() == x.scalar_type(), "residual must match x");
  at::Tensor res_out = has_res ? at::empty_like(x) : x;
  const int64_t H = x.size(-1), rows = x.numel() / H;
  if (x.scalar_type() == at::kBFloat16)
    rms_norm_impl<bf16>(x.data_ptr<bf16>(), has_res ? res.data_ptr<bf16>() : nullptr, res_out.data_ptr<bf16>(),
                        w.contiguous().data_ptr<bf16>(), y.data_ptr<bf16>(), rows, H, float(eps));
  else if (x.scalar_type() == at::kFloat)
    rms_norm_impl<float>(x.data_ptr<float>(), has_res ? res.data_ptr<float>() : nullptr, res_out.data_ptr<float>(),
                         w.contiguous().data_ptr<float>(), y.data_ptr<float>(), rows, H, float(eps));
  else
    TORCH_CHECK(false, "rms_norm supports bf16 and fp32");
  return {y, res_out};
}

// One row of an int8 cache: scale = absmax / 127, values round(x / scale) (ties to even), as
// qwenrun.layers.attention.quantize_kv computes them, division and all, so both store the same bytes.
template <class T>
inline void quantize_row(const T* x, int64_t d, int8_t* q, float* scale) {
  float amax = 0.f;
  for (int64_t j = 0; j < d; ++j) amax = std::max(amax, std::fabs(static_cast<float>(x[j])));
  const float s = amax / 127.f;
  *scale = s;
  for (int64_t j = 0; j < d; ++j)
    q[j] = s > 0.f ? static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(static_cast<float>(x[j]) / s))))
                   : int8_t{0};
}

// RMSNorm one head x [d] (weight w), rotate it with c / sn [d] (NeoX halves) into dst; nw: d floats of scratch
template <class T>
inline void norm_rope_head(const T* x, const T* w, const T* c, const T* sn, int64_t d, float eps, float* nw, T* dst) {
  const int64_t half = d / 2;
#if QWENRUN_AVX512
  if (d % 32 == 0) {  // whole vectors in each half
    __m512 ssv = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 16) ssv = _mm512_fmadd_ps(load16(x + j), load16(x + j), ssv);
    const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ssv) / d + eps));
    for (int64_t j = 0; j < d; j += 16)
      _mm512_storeu_ps(&nw[j], vrnd<T>(_mm512_mul_ps(vrnd<T>(_mm512_mul_ps(load16(x + j), inv)), load16(w + j))));
    for (int64_t j = 0; j < d; j += 16) {
      const __m512 rot = j < half ? _mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(&nw[j + half])) : _mm512_loadu_ps(&nw[j - half]);
      const __m512 v = _mm512_add_ps(vrnd<T>(_mm512_mul_ps(_mm512_loadu_ps(&nw[j]), load16(c + j))),
                                     vrnd<T>(_mm512_mul_ps(rot, load16(sn + j))));
      store16(dst + j, v, 0xffff);
    }
    return;
  }
#else
  if (d % 16 == 0) {  // whole vectors in each half
    __m256 ssv = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j += 8) ssv = _mm256_fmadd_ps(load8(x + j), load8(x + j), ssv);
    const __m256 inv = _mm256_set1_ps(1.f / std::sqrt(hsum8(ssv) / d + eps));
    for (int64_t j = 0; j < d; j += 8)
      _mm256_storeu_ps(&nw[j], vrnd<T>(_mm256_mul_ps(vrnd<T>(_mm256_mul_ps(load8(x + j), inv)), load8(w + j))));
    for (int64_t j = 0; j < d; j += 8) {
      const __m256 rot = j < half ? _mm256_sub_ps(_mm256_setzero_ps(), _mm256_loadu_ps(&nw[j + half])) : _mm256_loadu_ps(&nw[j - half]);
      const __m256 v = _mm256_add_ps(vrnd<T>(_mm256_mul_ps(_mm256_loadu_ps(&nw[j]), load8(c + j))),
                                     vrnd<T>(_mm256_mul_ps(rot, load8(sn + j))));
      store8(dst + j, v);
    }
    return;
  }
#endif
  float ss = 0.f;
  for (int64_t j = 0; j < d; ++j) ss += static_cast<float>(x[j]) * static_cast<float>(x[j]);
  const float inv = 1.f / std::sqrt(ss / d + eps);
  for (int64_t j = 0; j < d; ++j) nw[j] = rnd<T>(rnd<T>(static_cast<float>(x[j]) * inv) * static_cast<float>(w[j]));
  for (int64_t j = 0; j < d; ++j) {
    const float rot = j < half ? -nw[j + half] : nw[j - half];
    dst[j] = static_cast<T>(rnd<T>(nw[j] * static_cast<float>(c[j])) + rnd<T>(rot * static_cast<float>(sn[j])));
  }
}

// Per token of qkv [T, (nh + 2 nkv) d]: RMSNorm each q and k head (q_w / k_w), rotate with cos/sin
// [T, d] (NeoX halves), write k and v into the head-major caches at slots[t]; returns q [T, nh, d].
// C is T, or int8_t for an int8 cache, whose rows are quantized from the values a T cache would hold,
// with their scales written to ks / vs [nkv, S].
template <class T, class C>
void qk_norm_rope_impl(const at::Tensor& qkv, const at::Tensor& qw, const at::Tensor& kw, const at::Tensor& cos,
                       const at::Tensor& sin, float eps, int64_t nh, int64_t nkv, at::Tensor& kc, at::Tensor& vc,
                       float* ks, float* vs, const at::Tensor& slots, at::Tensor& q) {
  constexpr bool quantized = std::is_same_v<C, int8_t>;
  const int64_t T_ = qkv.size(0), d = kc.size(2), S = kc.size(1), width = qkv.size(1);
  const T* src = qkv.data_ptr<T>();
  const T* qwp = qw.data_ptr<T>();
  const T* kwp = kw.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  T* qp = q.data_ptr<T>();
  C* kp = kc.data_ptr<C>();
  C* vp = vc.data_ptr<C>();
  at::parallel_for(0, T_ * (nh + 2 * nkv), 32, [&](int64_t i0, int64_t i1) {
    std::vector<float> nw(d);
    std::vector<T> row(quantized ? d : 0);  // a rotated k head before it is quantized
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / (nh + 2 * nkv), h = i % (nh + 2 * nkv);
      const T* x = src + t * width + h * d;
      if (h >= nh + nkv) {  // a value head: straight into the cache
        const int64_t cell = (h - nh - nkv) * S + slot[t];
        if constexpr (quantized) quantize_row(x, d, vp + cell * d, vs + cell);
        else std::copy(x, x + d, vp + cell * d);
        continue;
      }
      const T* w = h < nh ? qwp : kwp;
      const int64_t cell = (h - nh) * S + slot[t];  // a key head's cache row
      T* dst;
      if constexpr (quantized) dst = h < nh ? qp + (t * nh + h) * d : row.data();
      else dst = h < nh ? qp + (t * nh + h) * d : kp + cell * d;
      norm_rope_head(x, w, cp + t * d, sp + t * d, d, eps, nw.data(), dst);
      if constexpr (quantized) {
        if (h >= nh) quantize_row(row.data(), d, kp + cell * d, ks + cell);
      }
    }
  });
}

// the checks both entry points share; returns q [T, nh, d]
at::Tensor qk_norm_rope_checks(const at::Tensor& qkv, const at::Tensor& q_w, const at::Tensor& k_w, const at::Tensor& cos,
                               const at::Tensor& sin, int64_t nh, int64_t nkv, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& slots) {
  const int64_t d = k_cache.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (nh + 2 * nkv) * d && k_cache.size(0) == nkv && d % 2 == 0,
              "qkv must be [T, (nh + 2 nkv) head_dim] for this cache");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes(), "caches must be contiguous");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == qkv.size(0) && cos.size(1) == d,
              "cos/sin must be [T, head_dim]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == qkv.size(0), "one int64 slot per token");
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(q_w.scalar_type() == dt && k_w.scalar_type() == dt && cos.scalar_type() == dt, "dtypes must match");
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kFloat, "qk_norm_rope supports bf16 and fp32");
  return at::empty({qkv.size(0), nh, d}, qkv.options());
}

at::Tensor qk_norm_rope(const at::Tensor& qkv_, const at::Tensor& q_w, const at::Tensor& k_w, const at::Tensor& cos,
                        const at::Tensor& sin, double eps, int64_t nh, int64_t nkv, at::Tensor& k_cache,
                        at::Tensor& v_cache, const at::Tensor& slots) {
  at::Tensor qkv = qkv_.contiguous(), sl = slots.contiguous();
  at::Tensor q = qk_norm_rope_checks(qkv, q_w, k_w, cos, sin, nh, nkv, k_cache, v_cache, sl);
  TORCH_CHECK(k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type(), "dtypes must match");
  if (qkv.scalar_type() == at::kBFloat16)
    qk_norm_rope_impl<bf16, bf16>(qkv, q_w.contiguous(), k_w.contiguous(), cos, sin, float(eps), nh, nkv, k_cache, v_cache,
                                  nullptr, nullptr, sl, q);
  else
    qk_norm_rope_impl<float, float>(qkv, q_w.contiguous(), k_w.contiguous(), cos, sin, float(eps), nh, nkv, k_cache,
                                    v_cache, nullptr, nullptr, sl, q);
  return q;
}

// into an int8 cache: k_cache / v_cache [nkv, S, d] int8, their scales [nkv, S] fp32
at::Tensor qk_norm_rope_int8(const at::Tensor& qkv_, const at::Tensor& q_w, const at::Tensor& k_w, const at::Tensor& cos,
                             const at::Tensor& sin, double eps, int64_t nh, int64_t nkv, at::Tensor& k_cache,
                             at::Tensor& v_cache, at::Tensor& k_scale, at::Tensor& v_scale, const at::Tensor& slots) {
  at::Tensor qkv = qkv_.contiguous(), sl = slots.contiguous();
  at::Tensor q = qk_norm_rope_checks(qkv, q_w, k_w, cos, sin, nh, nkv, k_cache, v_cache, sl);
  TORCH_CHECK(k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar, "int8 caches expected");
  TORCH_CHECK(k_scale.scalar_type() == at::kFloat && v_scale.scalar_type() == at::kFloat && k_scale.is_contiguous() &&
                  v_scale.is_contiguous() && k_scale.dim() == 2 && k_scale.sizes() == v_scale.sizes() &&
                  k_scale.size(0) == k_cache.size(0) && k_scale.size(1) == k_cache.size(1),
              "scales must be contiguous fp32 [nkv, S]");
  float* ks = k_scale.data_ptr<float>();
  float* vs = v_scale.data_ptr<float>();
  if (qkv.scalar_type() == at::kBFloat16)
    qk_norm_rope_impl<bf16, int8_t>(qkv, q_w.contiguous(), k_w.contiguous(), cos, sin, float(eps), nh, nkv, k_cache,
                                    v_cache, ks, vs, sl, q);
  else
    qk_norm_rope_impl<float, int8_t>(qkv, q_w.contiguous(), k_w.contiguous(), cos, sin, float(eps), nh, nkv, k_cache,
                                     v_cache, ks, vs, sl, q);
  return q;
}

// ---------------------------------------------------------------------------------------------
// MoE experts for decode-sized batches. The (token, chosen expert) pairs are grouped by expert, so an
// expert chosen by several tokens (a batch, or a verify step's drafted tokens) is read once for all
// of them; then SiLU·up and down run as two passes over every chosen expert's rows, each one parallel
// region with the activations quantized once, and each token sums its experts' outputs with their
// routing weights in fp32, in the router's order. A call per expert instead cost two thread
// fork/joins, two activation quantizations and a restarted weight stream each: at 8 experts of
// 30B-A3B's size, ~40% of the layer on top of the bytes.

// Calls f(wt) with format `fmt`'s weight reader over `parts` stacked [E, N, ...] (contiguous: expert
// e's row r is row e N + r of one [E N, K] matrix) and activations x [M, K].
template <class F>
void with_stacked_weights(const std::string& fmt, const std::vector<at::Tensor>& parts, const at::Tensor& x,
                          int64_t group, F&& f) {
  const int64_t K = x.size(1);
  if (fmt == "bf16") {
    TORCH_CHECK(parts.size() == 1 && parts[0].scalar_type() == at::kBFloat16 && parts[0].size(2) == K,
                "bf16 experts must be [E, N, K] bf16");
    const at::Tensor xb = x.to(at::kBFloat16).contiguous();
    const auto* w = reinterpret_cast<const uint16_t*>(parts[0].data_ptr());
    const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr());
#if QWENRUN_AVX512
    f(Bf16Weights{w, K, xp});
#else
    f(Bf16Weights(w, K, xp, x.size(0)));
#endif
    return;
  }
  const bool interleaved = fmt == "int8_x16" || fmt == "int4_x16";
  if (fmt == "int8" || fmt == "int8_x16") {
    TORCH_CHECK(parts.size() == 2 && parts[0].scalar_type() == at::kChar && parts[0].size(2) == K && K % 32 == 0 &&
                    parts[1].scalar_type() == at::kFloat && parts[1].numel() == parts[0].size(0) * parts[0].size(1),
                "int8 experts must be [E, N, K] int8 (K divisible by 32) with fp32 scales [E, N]");
    if (interleaved) check_interleaved(parts[0].size(1), K, 0, false);
    QuantizedActivations a = quantize_activations(x, 0, 32);
#if QWENRUN_AVX512
    if (interleaved)
      f(Int8SlabWeights{parts[0].data_ptr<int8_t>(), parts[1].data_ptr<float>(), K, a.q.data_ptr<int8_t>(),
                        a.s.data_ptr<float>(), a.comp.data_ptr<float>()});
    else
      f(Int8Weights{parts[0].data_ptr<int8_t>(), parts[1].data_ptr<float>(), K, a.q.data_ptr<int8_t>(),
                    a.s.data_ptr<float>(), a.comp.data_ptr<float>()});
#else
    f(Int8Weights{parts[0].data_ptr<int8_t>(), parts[1].data_ptr<float>(), K, a.q.data_ptr<int8_t>(), a.s.data_ptr<float>()});
#endif
    return;
  }
  TORCH_CHECK(fmt == "int4" || fmt == "int4_x16", "unknown expert format ", fmt);
  TORCH_CHECK(parts.size() == 3 && parts[0].scalar_type() == at::kByte && parts[0].size(2) * 2 == K &&
                  int4_shape_ok(K, group) && parts[1].scalar_type() == at::kFloat && parts[2].scalar_type() == at::kFloat &&
                  parts[1].numel() == parts[0].size(0) * parts[0].size(1) * (K / group) &&
                  parts[2].numel() == parts[1].numel(),
              "int4 experts must be [E, N, K/2] uint8 with fp32 scales and mins [E, N, K/group]");
  if (interleaved) check_interleaved(parts[0].size(1), K, group, true);
  QuantizedActivations a = quantize_activations(x, group, group >= 128 ? 128 : 32);
#if QWENRUN_AVX512
  if (interleaved)
    return f(Int4SlabWeights{parts[0].data_ptr<uint8_t>(), parts[1].data_ptr<float>(), parts[2].data_ptr<float>(), K,
                             group, K / group, a.q.data_ptr<int8_t>(), a.s.data_ptr<float>(), a.gsum.data_ptr<float>()});
#endif
  f(Int4Weights{parts[0].data_ptr<uint8_t>(), parts[1].data_ptr<float>(), parts[2].data_ptr<float>(), K, group,
                K / group, a.q.data_ptr<int8_t>(), a.s.data_ptr<float>(), a.gsum.data_ptr<float>()});
}

// the pairs of one expert: rows start .. start + count of the grouped activations
struct ExpertRun {
  int64_t expert, start, count;
};

// y [P, N_out] (T): for every run, its rows times its expert's matrix (N rows of the stack; gated:
// [gate; up], N = 2 N_out), every run's tiles in one parallel region
template <class W, class T>
void grouped_gemv(const W& wt, const std::vector<ExpertRun>& runs, int64_t N_out, bool gated, T* y) {
  std::vector<int64_t> first(runs.size() + 1, 0);  // each run's first tile
  std::vector<TileShape> shapes;
  for (size_t r = 0; r < runs.size(); ++r) {
    shapes.push_back(tile_shape_for<W>(runs[r].count, gated));
    first[r + 1] = first[r] + tile_count(N_out, gated, shapes[r]);
  }
  const int64_t N = gated ? 2 * N_out : N_out;
  at::parallel_for(0, first.back(), 4, [&](int64_t t0, int64_t t1) {
    size_t r = std::upper_bound(first.begin(), first.end(), t0) - first.begin() - 1;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= first[r + 1]) ++r;
      const ExpertRun& run = runs[r];
      gemv_tile(wt, run.start, run.count, run.expert * N, N_out, gated, shapes[r], t - first[r], nullptr,
                y + run.start * N_out);
    }
  });
}

template <class T>
void moe_gemv_impl(const at::Tensor& x, const int64_t* ids, const float* rw, int64_t k, const std::string& fmt,
                   const std::vector<at::Tensor>& w13, const std::vector<at::Tensor>& w2, int64_t group, int64_t E,
                   int64_t I, at::Tensor& out) {
  const int64_t T_ = x.size(0), H = x.size(1), P = T_ * k;
  std::vector<int64_t> order(P), pos(P);  // order: pairs by expert (stable); pos: a pair's grouped row
  for (int64_t p = 0; p < P; ++p) order[p] = p;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  std::vector<ExpertRun> runs;
  std::vector<int64_t> tokens;
  for (int64_t i = 0; i < P; ++i) {
    const int64_t p = order[i], e = ids[p];
    TORCH_CHECK(e >= 0 && e <= E, "expert id ", e, " out of range for ", E, " experts");
    pos[p] = -1;
    if (e == E) continue;  // no expert here (another rank's, as grouped_experts skips it)
    if (runs.empty() || runs.back().expert != e) runs.push_back(ExpertRun{e, static_cast<int64_t>(tokens.size()), 0});
    ++runs.back().count;
    pos[p] = static_cast<int64_t>(tokens.size());
    tokens.push_back(p / k);
  }
  const int64_t P_used = static_cast<int64_t>(tokens.size());
  const at::Tensor xg = x.index_select(0, at::tensor(tokens, x.options().dtype(at::kLong))).contiguous();
  at::Tensor h = at::empty({P_used, I}, x.options());
  with_stacked_weights(fmt, w13, xg, group, [&](const auto& wt) { grouped_gemv(wt, runs, I, true, h.data_ptr<T>()); });
  at::Tensor y = at::empty({P_used, H}, x.options());
  with_stacked_weights(fmt, w2, h, group, [&](const auto& wt) { grouped_gemv(wt, runs, H, false, y.data_ptr<T>()); });
  const T* yp = y.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, T_, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < k; ++j) {
        if (pos[t * k + j] < 0) continue;
        const T* yr = yp + pos[t * k + j] * H;
        const float w = rw[t * k + j];
        for (int64_t i = 0; i < H; ++i) acc[i] += w * static_cast<float>(yr[i]);
      }
      for (int64_t i = 0; i < H; ++i) op[t * H + i] = static_cast<T>(acc[i]);
    }
  });
}

at::Tensor moe_gemv(const at::Tensor& x_, const at::Tensor& ids, const at::Tensor& weights, const std::string& fmt,
                    const std::vector<at::Tensor>& w13_, const std::vector<at::Tensor>& w2_, int64_t group) {
  TORCH_CHECK(x_.dim() == 2 && ids.dim() == 2 && ids.sizes() == weights.sizes() && ids.size(0) == x_.size(0) &&
                  ids.scalar_type() == at::kLong, "x [T, H], ids and weights [T, k]");
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16 || x_.scalar_type() == at::kFloat, "activations must be bf16 or fp32");
  TORCH_CHECK(!w13_.empty() && !w2_.empty() && w13_[0].dim() == 3 && w2_[0].dim() == 3, "stacked expert parts expected");
  std::vector<at::Tensor> w13, w2;
  for (const auto& t : w13_) w13.push_back(t.contiguous());
  for (const auto& t : w2_) w2.push_back(t.contiguous());
  const int64_t E = w13[0].size(0), I = w13[0].size(1) / 2, H = x_.size(1);
  TORCH_CHECK(w13[0].size(1) == 2 * I && w2[0].size(0) == E && w2[0].size(1) == H,
              "experts must be w13 [E, 2I, H] and w2 [E, H, I]");
  const at::Tensor x = x_.contiguous(), idc = ids.contiguous(), wf = weights.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16)
    moe_gemv_impl<bf16>(x, idc.data_ptr<int64_t>(), wf.data_ptr<float>(), ids.size(1), fmt, w13, w2, group, E, I, out);
  else
    moe_gemv_impl<float>(x, idc.data_ptr<int64_t>(), wf.data_ptr<float>(), ids.size(1), fmt, w13, w2, group, E, I, out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// greedy sampling: torch's CPU argmax takes ~0.5 ms over a 152k vocabulary, 2% of a decode step

#if QWENRUN_AVX512
template <class T>
int64_t argmax_row(const T* x, int64_t V) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 t = tail16(V - i);
    mx = _mm512_mask_max_ps(mx, t, mx, load16(x + i, t));
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(tail16(V - i), load16(x + i, tail16(V - i)), m, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  return 0;  // all NaN or empty: torch would return a NaN's index; logits never are
}
#else
template <class T>
int64_t argmax_row(const T* x, int64_t V) {
  __m256 mx = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) mx = _mm256_max_ps(mx, load8(x + i));
  float m = hmax8(mx);
  for (int64_t j = i; j < V; ++j) m = std::max(m, static_cast<float>(x[j]));
  const __m256 mv = _mm256_set1_ps(m);
  for (i = 0; i + 8 <= V; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(load8(x + i), mv, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
  for (; i < V; ++i)
    if (static_cast<float>(x[i]) == m) return i;
  return 0;  // all NaN or empty: torch would return a NaN's index; logits never are
}
#endif

// first index of each row's maximum, as torch.argmax(dim=-1)
at::Tensor argmax(const at::Tensor& x_) {
  TORCH_CHECK(x_.dim() == 2, "argmax takes [B, V]");
  at::Tensor x = x_.contiguous();
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  for (int64_t b = 0; b < x.size(0); ++b) {
    if (x.scalar_type() == at::kBFloat16)
      out.data_ptr<int64_t>()[b] = argmax_row(x.data_ptr<bf16>() + b * x.size(1), x.size(1));
    else if (x.scalar_type() == at::kFloat)
      out.data_ptr<int64_t>()[b] = argmax_row(x.data_ptr<float>() + b * x.size(1), x.size(1));
    else
      TORCH_CHECK(false, "argmax supports bf16 and fp32");
  }
  return out;
}

// In place: -inf in logits[r][j] for each token j whose bit (j % 32 of int32 word j / 32) is clear in
// bitmask[r], for the listed rows. A grammar row is a few thousand words, nearly all 0 or all -1, so a
// word-at-a-time scan with a branch on whole words costs microseconds where unpacking every bit costs
// a millisecond (the sampler's numpy path, xgrammar's CPU kernel).
void apply_token_bitmask(at::Tensor& logits, const at::Tensor& bitmask, const at::Tensor& rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
              "apply_token_bitmask takes contiguous fp32 logits [B, V]");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.is_contiguous() && bitmask.scalar_type() == at::kInt &&
              bitmask.size(0) == logits.size(0), "bitmask must be contiguous int32 [B, W]");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "rows must be int64 [R]");
  const int64_t V = logits.size(1), W = bitmask.size(1), B = logits.size(0);
  const int64_t words = std::min(W, (V + 31) / 32);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i) {
    const int64_t r = row_ids[i];
    TORCH_CHECK(0 <= r && r < B, "row out of range");
    float* out = logits.data_ptr<float>() + r * V;
    const uint32_t* mask = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>() + r * W);
    for (int64_t w = 0; w < words; ++w) {
      const uint32_t bits = mask[w];
      if (bits == 0xFFFFFFFFu) continue;
      const int64_t base = w * 32, n = std::min<int64_t>(32, V - base);
      if (bits == 0) {
        for (int64_t j = 0; j < n; ++j) out[base + j] = neg_inf;
        continue;
      }
      for (int64_t j = 0; j < n; ++j)
        if (!((bits >> j) & 1u)) out[base + j] = neg_inf;
    }
    for (int64_t j = words * 32; j < V; ++j) out[j] = neg_inf;  // columns past the mask: never allowed
  }
}

#if QWENRUN_AVX512  // no AVX2 version yet: the Gated DeltaNet operations run torch's there
// ---------------------------------------------------------------------------------------------
// Gated DeltaNet decode: one new token per sequence through the causal depthwise conv, the delta rule
// on the sequence's fp32 state and the gated RMSNorm, rounding where transformers' ops in the model
// dtype round (`causal_conv1d_update`, `torch_recurrent_gated_delta_rule`, `Qwen3NextRMSNormGated`).
//
// The state (Hv·dk·dv fp32 per sequence: 2 MiB per layer at Qwen3-Next dims) is what bounds the step,
// so each value head's state is streamed from memory once and written once. One read gives both Sᵀk
// and Sᵀq of the old state; with α the decay, kv = α Sᵀk, δ = β (v − kv) and the output after the
// update is o = α Sᵀq + (q·k) δ, so the rank-1 update S ← α S + k δᵀ is a second sweep over the same
// block of columns while it is still in L1/L2.

// one channel's conv over its window [src (K-1 older inputs), x], in fp32; the shifted window goes to
// dst (src itself, or another slot's row)
template <class T>
inline float conv_channel(const T* src, T* dst, T x, const T* w, int64_t K) {
  float acc = 0.f;
  for (int64_t i = 0; i + 1 < K; ++i) acc += static_cast<float>(w[i]) * static_cast<float>(src[i]);
  acc += static_cast<float>(w[K - 1]) * static_cast<float>(x);
  for (int64_t i = 0; i + 2 < K; ++i) dst[i] = src[i + 1];
  dst[K - 2] = x;
  return acc;
}

inline __m512 silu512(__m512 v) {
  return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}

// conv outputs y[n] (n a multiple of 16) -> T(silu(T(y))): the conv's output, then SiLU's, stored in T
template <class T>
inline void silu_rounded(float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(y + i, vrnd<T>(silu512(vrnd<T>(_mm512_loadu_ps(y + i)))));
}

// one block of NC*16 columns of one value head's state, whose columns are independent: S [dk, dv] (row
// stride dv, at the block's first column) read, the new state written to S_out (S itself, or another
// slot's), o (the block's outputs) out; v, o at the block's first column
template <int NC>
void delta_rule_block(const float* S, float* S_out, int64_t dk, int64_t dv, const float* q, const float* k,
                      const float* v, float alpha, float beta, float qk, float* o) {
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta), vqk = _mm512_set1_ps(qk);
  __m512 sq[NC], sk[NC];
  for (int c = 0; c < NC; ++c) sq[c] = sk[c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < dk; ++i) {
    const float* row = S + i * dv;
    const __m512 qi = _mm512_set1_ps(q[i]), ki = _mm512_set1_ps(k[i]);
    for (int c = 0; c < NC; ++c) {
      const __m512 s = _mm512_loadu_ps(row + c * 16);
      sq[c] = _mm512_fmadd_ps(s, qi, sq[c]);
      sk[c] = _mm512_fmadd_ps(s, ki, sk[c]);
    }
  }
  __m512 d[NC];
  for (int c = 0; c < NC; ++c) {
    d[c] = _mm512_mul_ps(_mm512_fnmadd_ps(va, sk[c], _mm512_loadu_ps(v + c * 16)), vb);  // β (v − α Sᵀk)
    _mm512_storeu_ps(o + c * 16, _mm512_fmadd_ps(va, sq[c], _mm512_mul_ps(vqk, d[c])));
  }
  for (int64_t i = 0; i < dk; ++i) {
    const float* row = S + i * dv;
    float* dst = S_out + i * dv;
    const __m512 ki = _mm512_set1_ps(k[i]);
    for (int c = 0; c < NC; ++c)
      _mm512_storeu_ps(dst + c * 16, _mm512_fmadd_ps(ki, d[c], _mm512_mul_ps(_mm512_loadu_ps(row + c * 16), va)));
  }
}

using DeltaRuleBlock = void (*)(const float*, float*, int64_t, int64_t, const float*, const float*, const float*, float,
                                float, float, float*);

// the widest block of at most max_nc vectors (and at least one) that divides dv
int block_vectors(int64_t dv, int64_t max_nc) {
  int nc = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(8, max_nc)));
  while (nc > 1 && (dv / 16) % nc) --nc;
  return nc;
}

DeltaRuleBlock delta_rule_block_of(int nc) {
  switch (nc) {
    case 8: return delta_rule_block<8>;
    case 7: return delta_rule_block<7>;
    case 6: return delta_rule_block<6>;
    case 5: return delta_rule_block<5>;
    case 4: return delta_rule_block<4>;
    case 3: return delta_rule_block<3>;
    case 2: return delta_rule_block<2>;
    default: return delta_rule_block<1>;
  }
}

inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }  // torch's threshold 20

// a head's decay α = exp(−exp(A_log)·softplus(a + dt_bias)) in fp32 and β = sigmoid(b) in the model dtype
template <class T>
inline void gates(T a, T b, float A_log, float dt_bias, float& alpha, float& beta) {
  alpha = std::exp(-std::exp(A_log) * softplus(static_cast<float>(a) + dt_bias));
  beta = rnd<T>(1.f / (1.f + std::exp(-static_cast<float>(b))));
}

// a q or k head in fp32, as FLA's l2norm: x * rsqrt(sum x^2 + 1e-6), then * scale (q's dk^-1/2, k's 1)
inline void l2normalise(float* p, int64_t dk, float scale) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < dk; i += 16) ss = _mm512_fmadd_ps(_mm512_loadu_ps(p + i), _mm512_loadu_ps(p + i), ss);
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) + 1e-6f)), sc = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < dk; i += 16) {
    const __m512 u = _mm512_mul_ps(_mm512_loadu_ps(p + i), inv);
    _mm512_storeu_ps(p + i, _mm512_mul_ps(u, sc));  // * 1 is exact
  }
}

template <class T>
void gdn_decode_impl(const at::Tensor& x, at::Tensor& conv_states, const at::Tensor& conv_w, const at::Tensor& slots,
                     const at::Tensor& out_slots, const at::Tensor& a, const at::Tensor& b, const at::Tensor& A_log,
                     const at::Tensor& dt_bias, at::Tensor& states, const at::Tensor& z, const at::Tensor& norm_w, float eps, int64_t Hk,
                     at::Tensor& out) {
  const int64_t B = x.size(0), C = x.size(1), K = conv_w.size(1), Hv = states.size(1), dk = states.size(2),
                dv = states.size(3), r = Hv / Hk, km1 = K - 1;
  const T* xp = x.data_ptr<T>();
  T* csp = conv_states.data_ptr<T>();
  const T* wp = conv_w.data_ptr<T>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t* osl = out_slots.data_ptr<int64_t>();
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  const float* Ap = A_log.data_ptr<float>();
  const float* dtp = dt_bias.data_ptr<float>();
  float* Sp = states.data_ptr<float>();
  const T* zp = z.data_ptr<T>();
  const T* nw = norm_w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  // q and k channels are shared by the r value heads of a key head, so they (and their conv state) go
  // first, one task per key head; each value head then owns its v channels
  std::vector<float> qk(B * Hk * 2 * dk);
  const float scale = 1.f / std::sqrt(static_cast<float>(dk));
  at::parallel_for(0, B * Hk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bi = t / Hk, g = t % Hk;
      float* y = qk.data() + t * 2 * dk;  // [q dk | k dk]
      for (int part = 0; part < 2; ++part)
        for (int64_t c = 0; c < dk; ++c) {
          const int64_t ch = part * Hk * dk + g * dk + c;
          y[part * dk + c] = conv_channel(csp + (sl[bi] * C + ch) * km1, csp + (osl[bi] * C + ch) * km1,
                                          xp[bi * C + ch], wp + ch * K, K);
        }
      silu_rounded<T>(y, 2 * dk);
      l2normalise(y, dk, scale);
      l2normalise(y + dk, dk, 1.f);
    }
  });
  // blocks of up to a whole 128-column row, so the state streams from memory in order
  const int64_t cols = 16 * block_vectors(dv, 8);
  const DeltaRuleBlock block = delta_rule_block_of(cols / 16);
  at::parallel_for(0, B * Hv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> v(dv), o(dv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bi = t / Hv, h = t % Hv, s = sl[bi];
      for (int64_t c = 0; c < dv; ++c) {
        const int64_t ch = 2 * Hk * dk + h * dv + c;
        v[c] = conv_channel(csp + (s * C + ch) * km1, csp + (osl[bi] * C + ch) * km1, xp[bi * C + ch], wp + ch * K, K);
      }
      silu_rounded<T>(v.data(), dv);
      const float* q = qk.data() + (bi * Hk + h / r) * 2 * dk;
      const float* k = q + dk;
      float qdk = 0.f;
      for (int64_t i = 0; i < dk; ++i) qdk += q[i] * k[i];
      float alpha, beta;
      gates(ap[bi * Hv + h], bp[bi * Hv + h], Ap[h], dtp[h], alpha, beta);
      const float* S_in = Sp + (s * Hv + h) * dk * dv;
      float* S_out = Sp + (osl[bi] * Hv + h) * dk * dv;
      for (int64_t c0 = 0; c0 < dv; c0 += cols)
        block(S_in + c0, S_out + c0, dk, dv, q, k, v.data() + c0, alpha, beta, qdk, o.data() + c0);
      // gated RMSNorm: o leaves the delta rule in T; w * T(o * rsqrt(mean(o^2) + eps)) in T; * silu(z) in fp32
      __m512 ss = _mm512_setzero_ps();
      for (int64_t i = 0; i < dv; i += 16) {
        const __m512 u = vrnd<T>(_mm512_loadu_ps(&o[i]));
        _mm512_storeu_ps(&o[i], u);
        ss = _mm512_fmadd_ps(u, u, ss);
      }
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / dv + eps));
      for (int64_t i = 0; i < dv; i += 16) {
        const __m512 n = vrnd<T>(_mm512_mul_ps(load16(nw + i), vrnd<T>(_mm512_mul_ps(_mm512_loadu_ps(&o[i]), inv))));
        store16(op + t * dv + i, _mm512_mul_ps(n, silu512(load16(zp + t * dv + i))), 0xffff);
      }
    }
  });
}

// mixed_qkv [B, conv_dim] (channels q | k | v, head-major); conv_states [S, conv_dim, K-1] and states
// [S, Hv, dk, dv] fp32 are read at rows slots[b] and written at rows out_slots[b]; returns [B, Hv, dv].
// Sequences run concurrently, so no sequence may write a row another one reads or writes.
at::Tensor gdn_decode(const at::Tensor& mixed_qkv, at::Tensor& conv_states, const at::Tensor& conv_weight,
                      const at::Tensor& slots, const at::Tensor& out_slots, const at::Tensor& a, const at::Tensor& b, const at::Tensor& A_log,
                      const at::Tensor& dt_bias, at::Tensor& states, const at::Tensor& z, const at::Tensor& norm_weight,
                      double eps, int64_t num_k_heads) {
  TORCH_CHECK(states.dim() == 4 && states.scalar_type() == at::kFloat && states.is_contiguous(),
              "states must be contiguous fp32 [S, Hv, dk, dv]");
  const int64_t S = states.size(0), Hv = states.size(1), dk = states.size(2), dv = states.size(3), Hk = num_k_heads;
  TORCH_CHECK(Hk > 0 && Hv % Hk == 0 && dk % 16 == 0 && dv % 16 == 0, "value heads must be a multiple of key heads, "
              "head dims multiples of 16");
  TORCH_CHECK(mixed_qkv.dim() == 2 && mixed_qkv.size(1) == 2 * Hk * dk + Hv * dv, "mixed_qkv must be [B, 2 Hk dk + Hv dv]");
  const int64_t B = mixed_qkv.size(0), C = mixed_qkv.size(1);
  TORCH_CHECK(conv_weight.dim() == 2 && conv_weight.size(0) == C && conv_weight.size(1) >= 2, "conv weight must be [conv_dim, K >= 2]");
  TORCH_CHECK(conv_states.dim() == 3 && conv_states.is_contiguous() && conv_states.size(0) == S &&
                  conv_states.size(1) == C && conv_states.size(2) == conv_weight.size(1) - 1,
              "conv_states must be contiguous [S, conv_dim, K-1]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == B &&
                  out_slots.scalar_type() == at::kLong && out_slots.sizes() == slots.sizes(),
              "one int64 slot and out slot per sequence");
  TORCH_CHECK(a.sizes() == b.sizes() && a.dim() == 2 && a.size(0) == B && a.size(1) == Hv, "a and b must be [B, Hv]");
  TORCH_CHECK(z.dim() == 3 && z.size(0) == B && z.size(1) == Hv && z.size(2) == dv, "z must be [B, Hv, dv]");
  TORCH_CHECK(A_log.numel() == Hv && dt_bias.numel() == Hv && norm_weight.numel() == dv, "A_log, dt_bias [Hv], norm weight [dv]");
  const auto dt = mixed_qkv.scalar_type();
  for (const at::Tensor& t : {conv_states, conv_weight, a, b, z, norm_weight})
    TORCH_CHECK(t.scalar_type() == dt, "conv state and weight, a, b, z and the norm weight must be in the model dtype");
  at::Tensor sl = slots.contiguous(), osl = out_slots.contiguous();
  const int64_t* in = sl.data_ptr<int64_t>();
  const int64_t* to = osl.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK(in[i] >= 0 && in[i] < S && to[i] >= 0 && to[i] < S, "slot out of range");
    for (int64_t j = 0; j < B; ++j)
      TORCH_CHECK(j == i || (to[i] != to[j] && to[i] != in[j]), "sequence ", i, " writes slot ", to[i],
                  ", which another sequence of the batch reads or writes");
  }
  at::Tensor out = at::empty({B, Hv, dv}, mixed_qkv.options());
  if (B == 0) return out;
  at::Tensor x = mixed_qkv.contiguous(), w = conv_weight.contiguous(), ac = a.contiguous(), bc = b.contiguous(),
             zc = z.contiguous(), nwc = norm_weight.contiguous();
  at::Tensor Af = A_log.to(at::kFloat).contiguous(), dtf = dt_bias.to(at::kFloat).contiguous();  // fp32 in the reference too
  if (dt == at::kBFloat16)
    gdn_decode_impl<bf16>(x, conv_states, w, sl, osl, ac, bc, Af, dtf, states, zc, nwc, float(eps), Hk, out);
  else if (dt == at::kFloat)
    gdn_decode_impl<float>(x, conv_states, w, sl, osl, ac, bc, Af, dtf, states, zc, nwc, float(eps), Hk, out);
  else
    TORCH_CHECK(false, "gdn_decode supports bf16 and fp32");
  return out;
}

// Gated DeltaNet prefill of one sequence as a token loop: per value head the state stays in L1/L2 for
// the whole chunk and each token costs one fused step (the decode's). transformers and the torch path
// use the chunked (UT-transform) form because it turns the loop into matrix products, which pays on a
// GPU; on a CPU the loop in registers is several times faster at every chunk length, and it does the
// same work whatever the scheduler's chunk boundaries, so a resumed prefill continues bitwise.
template <class T>
void gdn_prefill_impl(const at::Tensor& x, const T* win, const at::Tensor& conv_w, const at::Tensor& a,
                      const at::Tensor& b, const at::Tensor& A_log, const at::Tensor& dt_bias, const float* S0,
                      int64_t Hk, at::Tensor& o, at::Tensor& new_win, at::Tensor& new_state) {
  const int64_t n = x.size(0), C = x.size(1), K = conv_w.size(1), km1 = K - 1, Hv = new_state.size(0),
                dk = new_state.size(1), dv = new_state.size(2), r = Hv / Hk;
  const T* xp = x.data_ptr<T>();
  const T* wp = conv_w.data_ptr<T>();
  // the K-1 inputs before the chunk, token-major like x (zeros without a window)
  std::vector<T> head(km1 * C, static_cast<T>(0.f));
  if (win)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < km1; ++j) head[j * C + c] = win[c * km1 + j];
  auto row = [&](int64_t p) { return p < km1 ? head.data() + p * C : xp + (p - km1) * C; };  // input p of [head | x]
  std::vector<float> wt(K * C);  // taps channel-minor, for vectors of 16 channels
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < K; ++i) wt[i * C + c] = static_cast<float>(wp[c * K + i]);
  std::vector<float> y(n * C);  // conv + SiLU of every token (in T's precision); q and k then l2-normalised
  const float scale = 1.f / std::sqrt(static_cast<float>(dk));
  at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* yt = y.data() + t * C;
      for (int64_t c = 0; c < C; c += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < K; ++i) acc = _mm512_fmadd_ps(_mm512_loadu_ps(&wt[i * C + c]), load16(row(t + i) + c), acc);
        _mm512_storeu_ps(yt + c, acc);
      }
      silu_rounded<T>(yt, C);
      for (int64_t hd = 0; hd < 2 * Hk; ++hd) l2normalise(yt + hd * dk, dk, hd < Hk ? scale : 1.f);  // q heads, k heads
    }
  });
  T* nwp = new_win.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < km1; ++j) nwp[c * km1 + j] = row(n + j)[c];
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  const float* Ap = A_log.data_ptr<float>();
  const float* dtp = dt_bias.data_ptr<float>();
  T* op = o.data_ptr<T>();
  float* Sp = new_state.data_ptr<float>();
  // a block of columns (dk x cols fp32, at most 32 KiB) stays in L1 while every token of the chunk passes
  const int64_t cols = 16 * block_vectors(dv, std::min<int64_t>(4, 32768 / (dk * 64)));
  const DeltaRuleBlock block = delta_rule_block_of(cols / 16);
  const int64_t nb = dv / cols;
  at::parallel_for(0, Hv * nb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> alpha(n), beta(n), qk(n), ob(n * cols);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t h = task / nb, c0 = task % nb * cols;
      for (int64_t t = 0; t < n; ++t) {
        const float* q = y.data() + t * C + (h / r) * dk;
        const float* k = q + Hk * dk;
        float d = 0.f;
        for (int64_t i = 0; i < dk; ++i) d += q[i] * k[i];
        qk[t] = d;
        gates(ap[t * Hv + h], bp[t * Hv + h], Ap[h], dtp[h], alpha[t], beta[t]);
      }
      float* S = Sp + h * dk * dv + c0;
      for (int64_t i = 0; i < dk; ++i) {
        float* row = S + i * dv;
        if (S0)
          std::copy(S0 + h * dk * dv + i * dv + c0, S0 + h * dk * dv + i * dv + c0 + cols, row);
        else
          std::fill(row, row + cols, 0.f);
      }
      for (int64_t t = 0; t < n; ++t) {
        const float* q = y.data() + t * C + (h / r) * dk;
        block(S, S, dk, dv, q, q + Hk * dk, y.data() + t * C + 2 * Hk * dk + h * dv + c0, alpha[t], beta[t], qk[t],
              ob.data() + t * cols);
      }
      for (int64_t t = 0; t < n; ++t)
        for (int64_t i = 0; i < cols; i += 16)
          store16(op + (t * Hv + h) * dv + c0 + i, _mm512_loadu_ps(&ob[t * cols + i]), 0xffff);
    }
  });
}

// mixed [n, C] one sequence's new pre-conv inputs, window [C, K-1] and state [Hv, dk, dv] fp32 before them
// (None: zeros) -> (o [n, Hv, dv] in the model dtype, before the gated norm; window and state after them)
std::vector<at::Tensor> gdn_prefill(const at::Tensor& mixed_, const c10::optional<at::Tensor>& window,
                                    const at::Tensor& conv_weight, const at::Tensor& a_, const at::Tensor& b_,
                                    const at::Tensor& A_log, const at::Tensor& dt_bias,
                                    const c10::optional<at::Tensor>& state, int64_t num_v_heads, int64_t k_head_dim,
                                    int64_t num_k_heads) {
  const int64_t Hk = num_k_heads, Hv = num_v_heads, dk = k_head_dim;
  TORCH_CHECK(Hk > 0 && Hv % Hk == 0 && dk % 16 == 0, "value heads must be a multiple of key heads, dk of 16");
  TORCH_CHECK(mixed_.dim() == 2 && (mixed_.size(1) - 2 * Hk * dk) % Hv == 0, "mixed must be [n, 2 Hk dk + Hv dv]");
  const int64_t n = mixed_.size(0), C = mixed_.size(1), dv = (C - 2 * Hk * dk) / Hv, K = conv_weight.size(-1);
  TORCH_CHECK(dv > 0 && dv % 16 == 0, "dv must be a multiple of 16");
  TORCH_CHECK(conv_weight.dim() == 2 && conv_weight.size(0) == C && K >= 2, "conv weight must be [conv_dim, K >= 2]");
  TORCH_CHECK(a_.dim() == 2 && a_.size(0) == n && a_.size(1) == Hv && b_.sizes() == a_.sizes(), "a and b must be [n, Hv]");
  TORCH_CHECK(A_log.numel() == Hv && dt_bias.numel() == Hv, "A_log and dt_bias must be [Hv]");
  const auto dt = mixed_.scalar_type();
  TORCH_CHECK(conv_weight.scalar_type() == dt && a_.scalar_type() == dt && b_.scalar_type() == dt,
              "conv weight, a and b must be in the model dtype");
  const bool has_win = window && window->defined(), has_state = state && state->defined();
  at::Tensor w, s;
  if (has_win) {
    TORCH_CHECK(window->dim() == 2 && window->size(0) == C && window->size(1) == K - 1 && window->scalar_type() == dt,
                "window must be [conv_dim, K-1] in the model dtype");
    w = window->contiguous();
  }
  if (has_state) {
    TORCH_CHECK(state->dim() == 3 && state->size(0) == Hv && state->size(1) == dk && state->size(2) == dv &&
                    state->scalar_type() == at::kFloat, "state must be fp32 [Hv, dk, dv]");
    s = state->contiguous();
  }
  at::Tensor x = mixed_.contiguous(), cw = conv_weight.contiguous(), a = a_.contiguous(), b = b_.contiguous();
  at::Tensor Af = A_log.to(at::kFloat).contiguous(), dtf = dt_bias.to(at::kFloat).contiguous();
  at::Tensor o = at::empty({n, Hv, dv}, x.options()), new_win = at::empty({C, K - 1}, x.options());
  at::Tensor new_state = at::empty({Hv, dk, dv}, x.options().dtype(at::kFloat));
  const float* S0 = has_state ? s.data_ptr<float>() : nullptr;
  if (dt == at::kBFloat16)
    gdn_prefill_impl<bf16>(x, has_win ? w.data_ptr<bf16>() : nullptr, cw, a, b, Af, dtf, S0, Hk, o, new_win, new_state);
  else if (dt == at::kFloat)
    gdn_prefill_impl<float>(x, has_win ? w.data_ptr<float>() : nullptr, cw, a, b, Af, dtf, S0, Hk, o, new_win, new_state);
  else
    TORCH_CHECK(false, "gdn_prefill supports bf16 and fp32");
  return {o, new_win, new_state};
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_bf16", &gemv_bf16, "y = act(x W^T + b), bf16 W", py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("act"));
  m.def("gemv_int8", &gemv_int8, "y = act(x (W*s)^T + b), int8 W", py::arg("x"), py::arg("w"), py::arg("scale"),
        py::arg("bias"), py::arg("act"), py::arg("interleaved") = false);
  m.def("gemv_int4", &gemv_int4, "y = act(x W^T + b), group-wise int4 W", py::arg("x"), py::arg("w"), py::arg("scale"),
        py::arg("mins"), py::arg("group_size"), py::arg("bias"), py::arg("act"), py::arg("interleaved") = false);
  m.def("dequantize_int8", &dequantize_int8);
  m.def("dequantize_int4", &dequantize_int4);
  // whether the int8_x16 / int4_x16 slab layouts run here (`interleaved` arguments, expert formats)
  m.attr("interleaved_layouts") = py::bool_(QWENRUN_AVX512 != 0);
  m.def("decode_attention", &decode_attention);
  m.def("decode_attention_int8", &decode_attention_int8);
  m.def("rms_norm", &rms_norm);
  m.def("qk_norm_rope", &qk_norm_rope);
  m.def("qk_norm_rope_int8", &qk_norm_rope_int8);
  m.def("argmax", &argmax);
  m.def("apply_token_bitmask", &apply_token_bitmask);
  m.def("moe_gemv", &moe_gemv);
#if QWENRUN_AVX512
  m.def("gdn_decode", &gdn_decode);
  m.def("gdn_prefill", &gdn_prefill);
#endif
}
