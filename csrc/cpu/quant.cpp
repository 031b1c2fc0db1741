// The quantized ops on CPU: the executor of the rectangle plans of csrc/common/quant.h, and registration (the op
// bodies are csrc/common/quant_ops.h). Work is split by row groups (a row of FP8 scale blocks, or 32 MXFP4 rows) of
// each HF matrix and run with at::parallel_for; a group of a quantization owns its scale row, so amax, scale and the
// FP8 values of its blocks are computed by one task while its rows are in cache.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "../common/quant_ops.h"
#include "quant_avx2.h"

namespace bridge {
namespace quant {
namespace {

// Below this many elements a plan runs on the calling thread.
constexpr int64_t kInlineElements = int64_t(1) << 16;

struct Fp8Lut {
  std::array<float, 256> v;
  explicit Fp8Lut(int32_t format) {
    for (int i = 0; i < 256; ++i) v[i] = fp8_to_float(static_cast<uint8_t>(i), format);
  }
};

const float* fp8_lut(int32_t format) {
  static const Fp8Lut e4m3(kFp8E4M3), e5m2(kFp8E5M2);
  return format == kFp8E4M3 ? e4m3.v.data() : e5m2.v.data();
}

// E2M1 values of a nibble, and of both nibbles of a byte (low nibble first).
const float* e2m1_lut() {
  static const auto lut = [] {
    std::array<float, 16> v{};
    for (uint32_t i = 0; i < 16; ++i) v[i] = e2m1_to_float(i);
    return v;
  }();
  return lut.data();
}

template <int32_t W>
struct WideT;
template <>
struct WideT<kWideF32> {
  using type = float;
  static float to(float v) { return v; }
  static float from(float v) { return v; }
};
template <>
struct WideT<kWideBF16> {
  using type = uint16_t;
  static uint16_t to(float v) { return float_to_bf16_bits(v); }
  static float from(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }
};
template <>
struct WideT<kWideF16> {
  using type = uint16_t;
  static uint16_t to(float v) { return c10::Half(v).x; }
  static float from(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
};

template <class F>
void with_wide(int32_t w, F&& f) {
  switch (w) {
    case kWideF32: return f(std::integral_constant<int32_t, kWideF32>{});
    case kWideBF16: return f(std::integral_constant<int32_t, kWideBF16>{});
    default: return f(std::integral_constant<int32_t, kWideF16>{});
  }
}

// ---- dequantization --------------------------------------------------------------------------------------------

// Row i of clip c of an FP8 matrix into the high-precision elements.
template <int32_t W>
void dequant_fp8_row(const QTensor& t, const QRect& c, int64_t i, const float* lut) {
  using T = typename WideT<W>::type;
  const int64_t r = c.r0 + i * c.rstep;
  const uint8_t* src = reinterpret_cast<const uint8_t*>(t.data + r * t.dr);
  T* dst = reinterpret_cast<T*>(c.other) + i * c.ors;
  const char* srow = t.scale + (r / t.bn) * t.sr;
  const int64_t end = c.c0 + c.nc;
  for (int64_t col = c.c0; col < end;) {
    const int64_t cb = col / t.bk;
    const int64_t stop = std::min(end, (cb + 1) * t.bk);
    const float s = load_scale(srow + cb * t.sc, t.scale_format);
    T* d = dst + (col - c.c0) * c.ocs;
    if (t.dc == 1 && c.ocs == 1) {
      const uint8_t* sp = src + col;
      const int64_t n = stop - col;
      int64_t j = 0;
      if (t.format == kFp8E4M3 && avx2::supported()) j = avx2::dequant_e4m3<W>(sp, d, n, s);
      for (; j < n; ++j) d[j] = WideT<W>::to(lut[sp[j]] * s);
    } else {
      for (int64_t j = 0, n = stop - col; j < n; ++j) d[j * c.ocs] = WideT<W>::to(lut[src[(col + j) * t.dc]] * s);
    }
    col = stop;
  }
}

// Row i of clip c of an MXFP4 matrix: whole 32-value groups byte by byte, partial ones (a column slice that cuts a
// group) value by value.
template <int32_t W>
void dequant_mxfp4_row(const QTensor& t, const QRect& c, int64_t i, const float* lut) {
  using T = typename WideT<W>::type;
  const int64_t r = c.r0 + i * c.rstep;
  const char* row = t.data + r * t.dr;
  const char* srow = t.scale + r * t.sr;
  T* dst = reinterpret_cast<T*>(c.other) + i * c.ors;
  const int64_t end = c.c0 + c.nc;
  for (int64_t col = c.c0; col < end;) {
    const int64_t g = col / kMxfp4Group;
    const int64_t stop = std::min(end, (g + 1) * kMxfp4Group);
    const float s = e8m0_to_float(static_cast<uint8_t>(srow[g * t.sc]));
    T* d = dst + (col - c.c0) * c.ocs;
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(row + g * t.dg);
    const bool whole = col == g * kMxfp4Group && stop - col == kMxfp4Group && t.db == 1 && c.ocs == 1;
    if (whole && avx2::supported()) {
      avx2::dequant_mxfp4_group<W>(bytes, d, s);
    } else if (whole) {
      for (int64_t b = 0; b < kMxfp4Bytes; ++b) {
        d[2 * b] = WideT<W>::to(lut[bytes[b] & 15u] * s);
        d[2 * b + 1] = WideT<W>::to(lut[bytes[b] >> 4] * s);
      }
    } else {
      for (int64_t x = col; x < stop; ++x) {
        const int64_t o = x - g * kMxfp4Group;
        const uint8_t byte = bytes[(o >> 1) * t.db];
        d[(x - col) * c.ocs] = WideT<W>::to(lut[(o & 1) ? (byte >> 4) : (byte & 15u)] * s);
      }
    }
    col = stop;
  }
}

// Quantized bytes are prefetched about this far ahead of the row being converted (at least one row, at most 16).
constexpr int64_t kPrefetchBytes = 4096;

// Prefetches the quantized bytes of row i of clip c. A TP column slice (a row-parallel weight) reads a short run of
// every row of a much wider matrix: each row starts on another page, where the hardware prefetcher does not follow.
// Always inlined: GCC deems a function that only prefetches free of side effects and drops the calls to it.
__attribute__((always_inline)) inline void prefetch_quantized_row(const QTensor& t, const QRect& c, int64_t i) {
  const char* row = t.data + (c.r0 + i * c.rstep) * t.dr;
  int64_t first, last;  // byte range within the row
  if (t.format == kMxfp4) {
    if (t.db != 1 || t.dg != kMxfp4Bytes) return;
    first = c.c0 / kMxfp4Group * kMxfp4Bytes;
    last = (c.c0 + c.nc + kMxfp4Group - 1) / kMxfp4Group * kMxfp4Bytes;
  } else {
    if (t.dc != 1) return;
    first = c.c0;
    last = c.c0 + c.nc;
  }
  for (int64_t b = first & ~int64_t(63); b < last; b += 64) __builtin_prefetch(row + b);
}

template <int32_t W>
void dequant_group(const QPlan& plan, const QGroups& gs, const QGroup& grp) {
  const QTensor& t = plan.tensors()[static_cast<size_t>(grp.id)];
  const bool mx = t.format == kMxfp4;
  const float* lut = mx ? e2m1_lut() : fp8_lut(t.format);
  for (int64_t k = grp.first; k < grp.last; ++k) {
    const QRect& c = gs.clips[k];
    const int64_t row_bytes = mx ? c.nc / 2 : c.nc;
    const int64_t ahead = std::clamp<int64_t>(kPrefetchBytes / std::max<int64_t>(row_bytes, 1), 1, 16);
    for (int64_t i = 0; i < std::min(c.nr, ahead); ++i) prefetch_quantized_row(t, c, i);
    for (int64_t i = 0; i < c.nr; ++i) {
      if (i + ahead < c.nr) prefetch_quantized_row(t, c, i + ahead);
      if (mx) {
        dequant_mxfp4_row<W>(t, c, i, lut);
      } else {
        dequant_fp8_row<W>(t, c, i, lut);
      }
    }
  }
}

int64_t group_elements(const QGroups& gs, const QGroup& grp) {
  int64_t n = 0;
  for (int64_t k = grp.first; k < grp.last; ++k) n += gs.clips[k].nr * gs.clips[k].nc;
  return n;
}

template <class Body>
void run_groups(const QGroups& gs, Body&& body) {
  const int64_t n = static_cast<int64_t>(gs.groups.size());
  int64_t total = 0;
  for (const QGroup& g : gs.groups) total += group_elements(gs, g);
  if (total <= kInlineElements || n == 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) body(i);
  });
}

// ---- quantization ----------------------------------------------------------------------------------------------

// The high-precision bytes a quantization task keeps in cache between its amax pass and its value pass: a row group
// is done in chunks of column blocks of about this size.
constexpr int64_t kQuantChunkBytes = int64_t(192) << 10;

// Calls f(row i, first column, end column, column block) for every run of one column block of clip c within
// columns [lo, hi).
template <class F>
void for_each_block_run(const QRect& c, int64_t bk, int64_t lo, int64_t hi, F&& f) {
  const int64_t first = std::max(c.c0, lo), end = std::min(c.c0 + c.nc, hi);
  if (first >= end) return;
  for (int64_t i = 0; i < c.nr; ++i) {
    for (int64_t col = first; col < end;) {
      const int64_t cb = col / bk;
      const int64_t stop = std::min(end, (cb + 1) * bk);
      f(i, col, stop, cb);
      col = stop;
    }
  }
}

// One row group (= one row of scale blocks) of an FP8 target, chunk by chunk of column blocks: amax per block, the
// scales, then the FP8 values. Returns the first column block holding NaN / Inf (that chunk is not written; earlier
// chunks are), or -1.
template <int32_t W>
int64_t quant_group(const QPlan& plan, const QGroups& gs, const QGroup& grp, int32_t rule) {
  using T = typename WideT<W>::type;
  const QTensor& t = plan.tensors()[static_cast<size_t>(grp.id)];
  const int64_t kb = ceil_div(t.K, t.bk);
  const int64_t rows = std::min(t.bn, t.N - grp.row_block * t.bn);
  const int64_t chunk = std::max<int64_t>(1, kQuantChunkBytes / (rows * t.bk * int64_t(sizeof(T))));
  const float fmax = fp8_max(t.format);
  std::vector<float> amax(static_cast<size_t>(kb), 0.0f), factor(static_cast<size_t>(kb));
  std::vector<char> bad(static_cast<size_t>(kb), 0);
  for (int64_t cb0 = 0; cb0 < kb; cb0 += chunk) {
    const int64_t cb1 = std::min(kb, cb0 + chunk);
    const int64_t lo = cb0 * t.bk, hi = std::min(t.K, cb1 * t.bk);
    for (int64_t k = grp.first; k < grp.last; ++k) {
      const QRect& c = gs.clips[k];
      for_each_block_run(c, t.bk, lo, hi, [&](int64_t i, int64_t col, int64_t stop, int64_t cb) {
        const T* s = reinterpret_cast<const T*>(c.other) + i * c.ors + (col - c.c0) * c.ocs;
        const int64_t n = stop - col;
        float m = amax[cb];
        bool finite = true;
        int64_t j = 0;
        if (c.ocs == 1 && avx2::supported()) {
          bool nonfinite = false;
          j = avx2::amax<W>(s, n, &m, &nonfinite);
          finite = !nonfinite;
        }
        for (; j < n; ++j) {
          const float a = std::fabs(WideT<W>::from(s[j * c.ocs]));
          finite &= a <= std::numeric_limits<float>::max();
          m = a > m ? a : m;
        }
        amax[cb] = m;
        bad[cb] |= !finite;
      });
    }
    for (int64_t cb = cb0; cb < cb1; ++cb)
      if (bad[cb]) return cb;
    for (int64_t cb = cb0; cb < cb1; ++cb) {
      const float s = quant_scale(amax[cb], fmax, rule, &factor[cb]);
      std::memcpy(t.scale + grp.row_block * t.sr + cb * t.sc, &s, 4);
    }
    for (int64_t k = grp.first; k < grp.last; ++k) {
      const QRect& c = gs.clips[k];
      for_each_block_run(c, t.bk, lo, hi, [&](int64_t i, int64_t col, int64_t stop, int64_t cb) {
        const T* s = reinterpret_cast<const T*>(c.other) + i * c.ors + (col - c.c0) * c.ocs;
        uint8_t* dst = reinterpret_cast<uint8_t*>(t.data + (c.r0 + i * c.rstep) * t.dr);
        const int64_t n = stop - col;
        const float f = factor[cb];
        int64_t j = 0;
        if (c.ocs == 1 && t.dc == 1 && t.format == kFp8E4M3 && avx2::supported()) {
          j = avx2::quantize_e4m3<W>(s, dst + col, n, f, rule == kRuleDeepSeek);
        }
        for (; j < n; ++j) {
          dst[(col + j) * t.dc] = quantize_value(WideT<W>::from(s[j * c.ocs]), f, fmax, rule, t.format);
        }
      });
    }
  }
  return -1;
}

struct CpuExec {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;

  static void dequant(const QPlan& plan) {
    check_scales_host(plan);
    const QGroups gs = group_rects(plan);
    with_wide(plan.wide(), [&](auto w) {
      run_groups(gs, [&](int64_t i) { dequant_group<decltype(w)::value>(plan, gs, gs.groups[i]); });
    });
  }

  static void quant(const QPlan& plan, int32_t rule) {
    const QGroups gs = group_rects(plan);
    check_groups_cover(plan, gs);
    std::vector<int64_t> bad(gs.groups.size(), -1);
    with_wide(plan.wide(), [&](auto w) {
      run_groups(gs, [&](int64_t i) { bad[i] = quant_group<decltype(w)::value>(plan, gs, gs.groups[i], rule); });
    });
    for (size_t i = 0; i < bad.size(); ++i)
      if (bad[i] >= 0) fail_block(plan, gs.groups[i].id, gs.groups[i].row_block, bad[i]);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(bridge, CPU, m) { register_quant_ops<CpuExec>(m); }

}  // namespace quant
}  // namespace bridge
