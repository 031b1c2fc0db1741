// AVX2 inner loops of the CPU quantized ops (csrc/cpu/quant.cpp), eight values at a time, for the common case of
// contiguous runs: FP8 e4m3 and MXFP4 -> float32 / bfloat16 / float16, and float32 / bfloat16 / float16 -> e4m3
// (amax pass and value pass). Each conversion is the branch-free form of the scalar one in csrc/common/quant.h and
// c10 (e4m3 decode: torch's values, NaN = sign | 0x7ff00000; encode: c10's fp8e4m3fn_from_fp32_value, round to
// nearest even with its float add for subnormals; bfloat16: round to nearest even, NaN -> 0x7fc0; float16: F16C's
// round to nearest even, NaN -> sign | 0x7e00 as c10::Half), so the results
// are bit-identical to the scalar path; tests/test_quant_ops.py checks both against torch's own casts. Compiled with
// __attribute__((target("avx2"))) and used only when the CPU has AVX2 (supported()).
#pragma once
#include <cstdint>

#include "../common/quant.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define BRIDGE_QUANT_AVX2 1
#endif

namespace bridge {
namespace quant {
namespace avx2 {

#if defined(BRIDGE_QUANT_AVX2)

// AVX2 and F16C (float16 conversions; every AVX2 CPU has it).
inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}

#define BRIDGE_AVX2 __attribute__((target("avx2,f16c"))) inline

// 8 e4m3fn bytes (low 8 of `bytes`) -> 8 floats.
BRIDGE_AVX2 __m256 e4m3_to_f32(__m128i bytes) {
  const __m256i b = _mm256_cvtepu8_epi32(bytes);
  const __m256i em = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(em, 20), _mm256_set1_epi32(120 << 23));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(em), _mm256_set1_ps(1.0f / 512.0f));  // m * 2^-9
  __m256i v = _mm256_blendv_epi8(normal, _mm256_castps_si256(sub), _mm256_cmpgt_epi32(_mm256_set1_epi32(8), em));
  v = _mm256_blendv_epi8(v, _mm256_set1_epi32(0x7ff00000), _mm256_cmpeq_epi32(em, _mm256_set1_epi32(0x7f)));
  return _mm256_castsi256_ps(_mm256_or_si256(v, sign));
}

// 8 nibbles (one per byte of the low 8 bytes of `nibbles`) -> 8 E2M1 floats.
BRIDGE_AVX2 __m256 e2m1_to_f32(__m128i nibbles) {
  const __m256i n = _mm256_cvtepu8_epi32(nibbles);
  const __m256 mag = _mm256_permutevar8x32_ps(_mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f), n);
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(n, _mm256_set1_epi32(8)), 28);
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(mag), sign));
}

BRIDGE_AVX2 void store_f32(float* d, __m256 v) { _mm256_storeu_ps(d, v); }

BRIDGE_AVX2 void store_bf16(uint16_t* d, __m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(d),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

// float16, round to nearest even (IEEE, as c10::Half); NaN -> sign | 0x7e00 as c10::Half.
BRIDGE_AVX2 void store_f16(uint16_t* d, __m256 v) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16), _mm256_set1_epi32(0x8000));
  const __m256i nan32 = _mm256_or_si256(sign, _mm256_set1_epi32(0x7e00));
  const __m256i mask32 = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m128i nan16 = _mm_packus_epi32(_mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
  const __m128i mask16 = _mm_packs_epi32(_mm256_castsi256_si128(mask32), _mm256_extracti128_si256(mask32, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm_blendv_epi8(h, nan16, mask16));
}

BRIDGE_AVX2 __m256 load_f32(const float* s) { return _mm256_loadu_ps(s); }

BRIDGE_AVX2 __m256 load_f16(const uint16_t* s) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
}

BRIDGE_AVX2 __m256 load_bf16(const uint16_t* s) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

// 8 floats -> 8 e4m3fn bytes, c10's conversion.
BRIDGE_AVX2 void store_e4m3(uint8_t* d, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i sign = _mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256i a = _mm256_xor_si256(bits, sign);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(a, _mm256_set1_epi32(static_cast<int>((uint32_t(7 - 127) << 23) + 0x7FFFFu)));
  r = _mm256_srli_epi32(_mm256_add_epi32(r, odd), 20);
  const __m256i denorm_mask = _mm256_set1_epi32(141 << 23);
  const __m256 sum = _mm256_add_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(denorm_mask));
  const __m256i den = _mm256_sub_epi32(_mm256_castps_si256(sum), denorm_mask);
  r = _mm256_blendv_epi8(r, den, _mm256_cmpgt_epi32(_mm256_set1_epi32(121 << 23), a));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7f), _mm256_cmpgt_epi32(a, _mm256_set1_epi32((1087 << 20) - 1)));
  r = _mm256_or_si256(_mm256_and_si256(r, _mm256_set1_epi32(0xff)), _mm256_srli_epi32(sign, 24));
  const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(d), _mm_packus_epi16(w16, w16));
}

// Eight values of the high-precision dtype W (quant.h's Wide) to / from floats.
template <int32_t W>
BRIDGE_AVX2 __m256 load_wide8(const void* s) {
  if constexpr (W == kWideBF16) {
    return load_bf16(static_cast<const uint16_t*>(s));
  } else if constexpr (W == kWideF16) {
    return load_f16(static_cast<const uint16_t*>(s));
  } else {
    return load_f32(static_cast<const float*>(s));
  }
}

template <int32_t W>
BRIDGE_AVX2 void store_wide8(void* d, __m256 v) {
  if constexpr (W == kWideBF16) {
    store_bf16(static_cast<uint16_t*>(d), v);
  } else if constexpr (W == kWideF16) {
    store_f16(static_cast<uint16_t*>(d), v);
  } else {
    store_f32(static_cast<float*>(d), v);
  }
}

template <int32_t W>
constexpr int64_t kWideBytes = W == kWideF32 ? 4 : 2;

// d[j] = e4m3(src[j]) * s for j < n - n % 8; returns the number of values done.
template <int32_t W>
BRIDGE_AVX2 int64_t dequant_e4m3(const uint8_t* src, void* dst, int64_t n, float s) {
  const __m256 sv = _mm256_set1_ps(s);
  const int64_t es = kWideBytes<W>;
  char* d = static_cast<char*>(dst);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + j));
    store_wide8<W>(d + j * es, _mm256_mul_ps(e4m3_to_f32(b), sv));
  }
  return j;
}

// One whole MXFP4 group: 16 bytes -> 32 values (low nibble first) * s.
template <int32_t W>
BRIDGE_AVX2 void dequant_mxfp4_group(const uint8_t* bytes, void* dst, float s) {
  const __m256 sv = _mm256_set1_ps(s);
  const int64_t es = kWideBytes<W>;
  char* d = static_cast<char*>(dst);
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  const __m128i n0 = _mm_unpacklo_epi8(lo, hi), n1 = _mm_unpackhi_epi8(lo, hi);
  store_wide8<W>(d, _mm256_mul_ps(e2m1_to_f32(n0), sv));
  store_wide8<W>(d + 8 * es, _mm256_mul_ps(e2m1_to_f32(_mm_srli_si128(n0, 8)), sv));
  store_wide8<W>(d + 16 * es, _mm256_mul_ps(e2m1_to_f32(n1), sv));
  store_wide8<W>(d + 24 * es, _mm256_mul_ps(e2m1_to_f32(_mm_srli_si128(n1, 8)), sv));
}

// max |src[j]| over j < n - n % 8 into *amax; returns the number of values done; *bad |= any NaN / Inf.
template <int32_t W>
BRIDGE_AVX2 int64_t amax(const void* src, int64_t n, float* amax_io, bool* bad) {
  const char* s = static_cast<const char*>(src);
  const int64_t es = kWideBytes<W>;
  __m256 m = _mm256_setzero_ps();
  __m256i nonfinite = _mm256_setzero_si256();
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f7fffff);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i a = _mm256_and_si256(_mm256_castps_si256(load_wide8<W>(s + j * es)), abs_mask);
    nonfinite = _mm256_or_si256(nonfinite, _mm256_cmpgt_epi32(a, inf));
    m = _mm256_max_ps(m, _mm256_castsi256_ps(a));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float r = *amax_io;
  for (const float x : lanes) r = x > r ? x : r;
  *amax_io = r;
  *bad = *bad || !_mm256_testz_si256(nonfinite, nonfinite);
  return j;
}

// dst[j] = e4m3(src[j] / factor) (DeepSeek) or e4m3(clamp(src[j] * factor, -448, 448)) (transformers) for
// j < n - n % 8; returns the number of values done.
template <int32_t W>
BRIDGE_AVX2 int64_t quantize_e4m3(const void* src, uint8_t* dst, int64_t n, float factor, bool divide) {
  const char* s = static_cast<const char*>(src);
  const int64_t es = kWideBytes<W>;
  const __m256 f = _mm256_set1_ps(factor), hi = _mm256_set1_ps(448.0f), lo = _mm256_set1_ps(-448.0f);
  int64_t j = 0;
  if (divide) {
    for (; j + 8 <= n; j += 8) store_e4m3(dst + j, _mm256_div_ps(load_wide8<W>(s + j * es), f));
  } else {
    for (; j + 8 <= n; j += 8) {
      store_e4m3(dst + j, _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(load_wide8<W>(s + j * es), f), lo), hi));
    }
  }
  return j;
}

#undef BRIDGE_AVX2

#else  // no AVX2 build: the scalar loops do everything

inline bool supported() { return false; }
template <int32_t W>
int64_t dequant_e4m3(const uint8_t*, void*, int64_t, float) { return 0; }
template <int32_t W>
void dequant_mxfp4_group(const uint8_t*, void*, float) {}
template <int32_t W>
int64_t amax(const void*, int64_t, float*, bool*) { return 0; }
template <int32_t W>
int64_t quantize_e4m3(const void*, uint8_t*, int64_t, float, bool) { return 0; }

#endif

}  // namespace avx2
}  // namespace quant
}  // namespace bridge
