// Block-quantized HF weights (FP8 with per-block scales, MXFP4) <-> high-precision tensors: the number formats, the
// descriptor of one quantized matrix, the argument checks, and the plan that turns a layout walk into rectangles of
// HF rows x columns. Shared by csrc/cpu/quant.cpp and csrc/cuda/quant.cu; the op bodies are in quant_ops.h.
//
// Formats (the HF side is always a logical matrix [N, K], rows = output features):
//  - FP8 block: data float8_e4m3fn or float8_e5m2 [N, K]; scale ("weight_scale_inv") [ceil(N/bn), ceil(K/bk)] in
//    float32, bfloat16, float16 or E8M0 (float8_e8m0fnu); element (r, c) = fp32(data) * fp32(scale[r/bn][c/bk]).
//    Blocks at the bottom / right edge are partial when bn / bk do not divide N / K (DeepSeek-V3's kernel and its
//    576-row kv_a_proj_with_mqa).
//  - MXFP4 (GPT-OSS): blocks uint8 [N, K/32, 16], two E2M1 values per byte, the low nibble first; scales uint8
//    [N, K/32], E8M0 (2^(b - 127)); element (r, c) = e2m1(nibble) * 2^(scale[r][c/32] - 127), exactly as
//    transformers' convert_moe_packed_tensors computes it (before its final transpose).
// The high-precision ("wide") side is float32, bfloat16 or float16; results are rounded to it once, to nearest even.
//
// Index-space views. A layout walk (qkv_walk, gate_up_*_walk, expert_*_walk) only slices views affinely. The
// quantized ops hand it, for every HF matrix, a View whose "pointer" encodes (matrix id, row-major logical offset):
// element size 1, strides [K, 1]. Each (source, destination) pair the walk emits then says exactly which HF rows and
// columns meet which elements of the real high-precision tensor; for_each_rect() turns it into QRects, and the
// executors read / write the quantized bytes through the matrix's own (any) strides. These views are never
// dereferenced.
#pragma once
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "../checks.h"
#include "strided.h"

namespace bridge {
namespace quant {

// ---- number formats (host and device) --------------------------------------------------------------------------

enum Format : int32_t { kFp8E4M3 = 0, kFp8E5M2 = 1, kMxfp4 = 2 };
enum ScaleFormat : int32_t { kScaleF32 = 0, kScaleBF16 = 1, kScaleF16 = 2, kScaleE8M0 = 3 };
enum Wide : int32_t { kWideF32 = 0, kWideBF16 = 1, kWideF16 = 2 };
// How fp8_block_quant derives a block's scale from its amax (see quant_scale below).
enum Rule : int32_t { kRuleDeepSeek = 0, kRuleTransformers = 1 };

// MXFP4 values per scale, bytes per block.
constexpr int64_t kMxfp4Group = 32;
constexpr int64_t kMxfp4Bytes = 16;

C10_HOST_DEVICE inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

C10_HOST_DEVICE inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// E8M0: 2^(b - 127); 0 is 2^-127 (an fp32 subnormal, exact), 255 is NaN.
C10_HOST_DEVICE inline float e8m0_to_float(uint8_t b) {
  if (b == 0xff) return bits_to_float(0x7fc00000u);
  if (b == 0) return bits_to_float(0x00400000u);
  return bits_to_float(static_cast<uint32_t>(b) << 23);
}

// E2M1 (FP4) of the low 4 bits: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (-0 included).
C10_HOST_DEVICE inline float e2m1_to_float(uint32_t nibble) {
  const uint32_t mag = nibble & 7u;
  // mag 0: 0; 1: 0.5 (subnormal); 2..7: 2^(e-1) * (1 + m/2) with e = mag >> 1, m = mag & 1
  float v = mag == 0 ? 0.0f : (mag == 1 ? 0.5f : bits_to_float(((126u + (mag >> 1)) << 23) | ((mag & 1u) << 22)));
  return (nibble & 8u) ? -v : v;
}

C10_HOST_DEVICE inline float fp8_to_float(uint8_t b, int32_t format) {
  if (format == kFp8E4M3) return static_cast<float>(c10::Float8_e4m3fn(b, c10::Float8_e4m3fn::from_bits()));
  return static_cast<float>(c10::Float8_e5m2(b, c10::Float8_e5m2::from_bits()));
}

// torch's float -> fp8 cast (round to nearest even; c10's conversion, the one tensor.to() uses).
C10_HOST_DEVICE inline uint8_t float_to_fp8(float v, int32_t format) {
  if (format == kFp8E4M3) return c10::Float8_e4m3fn(v).x;
  return c10::Float8_e5m2(v).x;
}

// The largest finite value of an FP8 format (torch.finfo(dtype).max).
C10_HOST_DEVICE inline float fp8_max(int32_t format) { return format == kFp8E4M3 ? 448.0f : 57344.0f; }

C10_HOST_DEVICE inline float load_scale(const char* p, int32_t sf) {
  switch (sf) {
    case kScaleF32: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    case kScaleBF16: {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return bits_to_float(static_cast<uint32_t>(h) << 16);
    }
    case kScaleF16: {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
    }
    default:
      return e8m0_to_float(static_cast<uint8_t>(*p));
  }
}

C10_HOST_DEVICE inline float load_wide(const char* p, int32_t w) {
  if (w == kWideF32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  if (w == kWideBF16) return bits_to_float(static_cast<uint32_t>(h) << 16);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// float -> bfloat16 bits, round to nearest even; NaN -> 0x7fc0 (c10::BFloat16's conversion, branch-free).
C10_HOST_DEVICE inline uint16_t float_to_bf16_bits(float v) {
  const uint32_t b = float_to_bits(v);
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  return (b & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : static_cast<uint16_t>(rounded);
}

C10_HOST_DEVICE inline void store_wide(char* p, float v, int32_t w) {
  if (w == kWideF32) {
    std::memcpy(p, &v, 4);
    return;
  }
  const uint16_t h = w == kWideBF16 ? float_to_bf16_bits(v) : c10::Half(v).x;
  std::memcpy(p, &h, 2);
}

// The scale of one block from its amax (finite, >= 0), and the factor the block's values are divided by (kRuleDeepSeek)
// or multiplied by (kRuleTransformers) before the cast:
//  - kRuleDeepSeek (DeepSeek-V3's act_quant: amax clamped to >= 1e-4, so an all-zero block gets scale 1e-4 / max and
//    quantizes to zeros): scale = max(amax, 1e-4) / max, q = cast(w / scale);
//  - kRuleTransformers (transformers 5.24's Fp8Quantize): f = (1 / amax) * max (1 for amax == 0),
//    q = cast(clamp(w * f, -max, max)), scale = 1 / f.
// `factor` receives the divisor or the multiplier; returns the stored weight_scale_inv.
C10_HOST_DEVICE inline float quant_scale(float amax, float fmax, int32_t rule, float* factor) {
  if (rule == kRuleDeepSeek) {
    const float s = (amax > 1e-4f ? amax : 1e-4f) / fmax;
    *factor = s;
    return s;
  }
  const float f = amax > 0.0f ? (1.0f / amax) * fmax : 1.0f;
  *factor = f;
  return 1.0f / f;
}

C10_HOST_DEVICE inline uint8_t quantize_value(float w, float factor, float fmax, int32_t rule, int32_t format) {
  if (rule == kRuleDeepSeek) return float_to_fp8(w / factor, format);
  float v = w * factor;
  v = v < -fmax ? -fmax : (v > fmax ? fmax : v);  // torch.clamp (NaN cannot occur: amax is finite)
  return float_to_fp8(v, format);
}

// ---- one quantized matrix ----------------------------------------------------------------------------------------

// A quantized HF matrix [N, K] (plain data, also uploaded to the GPU). Byte strides.
struct QTensor {
  char* data;  // FP8: element (r, c) at data + r*dr + c*dc; MXFP4: byte at data + r*dr + (c/32)*dg + ((c%32)/2)*db
  int64_t dr, dc, dg, db;
  char* scale;  // scale (i, j) at scale + i*sr + j*sc
  int64_t sr, sc;
  int64_t N, K;
  int64_t bn, bk;  // block rows / columns (MXFP4: 1 x 32)
  int32_t format;
  int32_t scale_format;
};

C10_HOST_DEVICE inline float qtensor_scale(const QTensor& t, int64_t r, int64_t c) {
  return load_scale(t.scale + (r / t.bn) * t.sr + (c / t.bk) * t.sc, t.scale_format);
}

// The unscaled value of element (r, c).
C10_HOST_DEVICE inline float qtensor_value(const QTensor& t, int64_t r, int64_t c) {
  if (t.format == kMxfp4) {
    const int64_t g = c / kMxfp4Group, o = c - g * kMxfp4Group;
    const uint8_t byte = static_cast<uint8_t>(t.data[r * t.dr + g * t.dg + (o >> 1) * t.db]);
    return e2m1_to_float((o & 1) ? (byte >> 4) : (byte & 15u));
  }
  return fp8_to_float(static_cast<uint8_t>(t.data[r * t.dr + c * t.dc]), t.format);
}

// ---- dtypes ------------------------------------------------------------------------------------------------------

inline bool is_fp8(at::ScalarType t) { return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2; }

inline int32_t fp8_format(at::ScalarType t) { return t == at::kFloat8_e4m3fn ? kFp8E4M3 : kFp8E5M2; }

inline int32_t wide_format(const char* op, at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return kWideF32;
    case at::kBFloat16: return kWideBF16;
    case at::kHalf: return kWideF16;
    default:
      TORCH_CHECK(false, op, ": ", what, " is ", t, ", expected bfloat16, float16 or float32");
  }
  return kWideF32;
}

inline int32_t rule_of(const char* op, c10::string_view rule) {
  if (rule == "deepseek") return kRuleDeepSeek;
  if (rule == "transformers") return kRuleTransformers;
  TORCH_CHECK(false, op, ": rule = '", std::string(rule), "', expected 'deepseek' or 'transformers'");
  return kRuleDeepSeek;
}

// ---- argument checks ---------------------------------------------------------------------------------------------

struct Block {
  int64_t n, k;
};

inline Block block_of(const char* op, at::IntArrayRef block_size) {
  TORCH_CHECK(block_size.size() == 2 && block_size[0] >= 1 && block_size[1] >= 1, op, ": block_size = ", block_size,
              " must be two positive ints [block rows, block columns] (quantization_config.weight_block_size)");
  return {block_size[0], block_size[1]};
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The scale grid of an [N, K] matrix: [ceil(N / bn), ceil(K / bk)].
inline std::vector<int64_t> scale_grid(int64_t N, int64_t K, Block b) { return {ceil_div(N, b.n), ceil_div(K, b.k)}; }

inline std::string indexed(const std::string& name, int64_t i) { return name + "[" + std::to_string(i) + "]"; }

// An FP8 matrix and its scale: `weight` float8_e4m3fn / e5m2 [N, K], `scale` [ceil(N/bn), ceil(K/bk)] of a scale
// dtype, on `weight`'s device.
inline QTensor fp8_source(const char* op, const at::Tensor& weight, const std::string& name, const at::Tensor& scale,
                          const std::string& scale_name, Block b) {
  TORCH_CHECK(is_fp8(weight.scalar_type()), op, ": ", name, " has dtype ", weight.scalar_type(),
              ", expected float8_e4m3fn or float8_e5m2 (an FP8 block-quantized weight)");
  TORCH_CHECK(weight.dim() == 2, op, ": ", name, " has shape ", weight.sizes(), ", expected a matrix [N, K]");
  const at::ScalarType st = scale.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kFloat8_e8m0fnu, op, ": ",
              scale_name, " has dtype ", st, ", expected float32 (or bfloat16, float16, float8_e8m0fnu)");
  BRIDGE_CHECK_SAME_DEVICE(op, scale, scale_name.c_str(), weight, name.c_str());
  const int64_t N = weight.size(0), K = weight.size(1);
  const auto grid = scale_grid(N, K, b);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == grid[0] && scale.size(1) == grid[1], op, ": ", scale_name,
              " has shape ", scale.sizes(), ", expected ", at::IntArrayRef(grid), " = [ceil(", N, " / ", b.n,
              "), ceil(", K, " / ", b.k, ")] for ", name, " ", weight.sizes(), " with block_size [", b.n, ", ", b.k,
              "]");
  QTensor t{};
  t.data = const_cast<char*>(static_cast<const char*>(weight.const_data_ptr()));
  t.dr = weight.stride(0);
  t.dc = weight.stride(1);
  t.scale = const_cast<char*>(static_cast<const char*>(scale.const_data_ptr()));
  const int64_t se = static_cast<int64_t>(scale.element_size());
  t.sr = scale.stride(0) * se;
  t.sc = scale.stride(1) * se;
  t.N = N;
  t.K = K;
  t.bn = b.n;
  t.bk = b.k;
  t.format = fp8_format(weight.scalar_type());
  t.scale_format = st == at::kFloat ? kScaleF32 : (st == at::kBFloat16 ? kScaleBF16 : (st == at::kHalf ? kScaleF16
                                                                                                        : kScaleE8M0));
  return t;
}

// An MXFP4 matrix: `blocks` uint8 [N, G, 16], `scales` uint8 (or float8_e8m0fnu) [N, G]; logical [N, 32*G].
inline QTensor mxfp4_source(const char* op, const at::Tensor& blocks, const std::string& name,
                            const at::Tensor& scales, const std::string& scale_name) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte, op, ": ", name, " has dtype ", blocks.scalar_type(),
              ", expected uint8 (MXFP4 *_blocks: two E2M1 values a byte)");
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(2) == kMxfp4Bytes, op, ": ", name, " has shape ", blocks.sizes(),
              ", expected [N, K/32, 16] (MXFP4 *_blocks of one matrix)");
  TORCH_CHECK(scales.scalar_type() == at::kByte || scales.scalar_type() == at::kFloat8_e8m0fnu, op, ": ",
              scale_name, " has dtype ", scales.scalar_type(), ", expected uint8 (MXFP4 *_scales, E8M0)");
  BRIDGE_CHECK_SAME_DEVICE(op, scales, scale_name.c_str(), blocks, name.c_str());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == blocks.size(0) && scales.size(1) == blocks.size(1), op, ": ",
              scale_name, " has shape ", scales.sizes(), ", expected [", blocks.size(0), ", ", blocks.size(1),
              "] (one scale per 32 values of ", name, " ", blocks.sizes(), ")");
  QTensor t{};
  t.data = const_cast<char*>(static_cast<const char*>(blocks.const_data_ptr()));
  t.dr = blocks.stride(0);
  t.dg = blocks.stride(1);
  t.db = blocks.stride(2);
  t.scale = const_cast<char*>(static_cast<const char*>(scales.const_data_ptr()));
  t.sr = scales.stride(0);
  t.sc = scales.stride(1);
  t.N = blocks.size(0);
  t.K = blocks.size(1) * kMxfp4Group;
  t.bn = 1;
  t.bk = kMxfp4Group;
  t.format = kMxfp4;
  t.scale_format = kScaleE8M0;
  return t;
}

// An FP8 destination of fp8_block_quant: `out` float8 [N, K], `scale` float32 [ceil(N/bn), ceil(K/bk)], on the
// device of `ref`.
inline QTensor fp8_target(const char* op, const at::Tensor& out, const std::string& name, const at::Tensor& scale,
                          const std::string& scale_name, int64_t N, int64_t K, Block b, const at::Tensor& ref,
                          const char* ref_name) {
  TORCH_CHECK(is_fp8(out.scalar_type()), op, ": ", name, " has dtype ", out.scalar_type(),
              ", expected float8_e4m3fn or float8_e5m2");
  BRIDGE_CHECK_SAME_DEVICE(op, out, name.c_str(), ref, ref_name);
  BRIDGE_CHECK_SAME_DEVICE(op, scale, scale_name.c_str(), ref, ref_name);
  check_shape(op, out, name.c_str(), {N, K});
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": ", scale_name, " has dtype ", scale.scalar_type(),
              ", expected float32 (weight_scale_inv)");
  const auto grid = scale_grid(N, K, b);
  TORCH_CHECK(scale.sizes() == at::IntArrayRef(grid), op, ": ", scale_name, " has shape ", scale.sizes(),
              ", expected ", at::IntArrayRef(grid), " = [ceil(", N, " / ", b.n, "), ceil(", K, " / ", b.k, ")]");
  QTensor t{};
  t.data = static_cast<char*>(out.mutable_data_ptr());
  t.dr = out.stride(0);
  t.dc = out.stride(1);
  t.scale = static_cast<char*>(scale.mutable_data_ptr());
  t.sr = scale.stride(0) * 4;
  t.sc = scale.stride(1) * 4;
  t.N = N;
  t.K = K;
  t.bn = b.n;
  t.bk = b.k;
  t.format = fp8_format(out.scalar_type());
  t.scale_format = kScaleF32;
  return t;
}

// The matrices [..., N, K] of a tensor with leading dims, in row-major order of the leading index (views).
inline std::vector<at::Tensor> matrices(const at::Tensor& t) {
  std::vector<at::Tensor> out;
  if (t.dim() <= 2) {
    out.push_back(t);
    return out;
  }
  for (int64_t i = 0; i < t.size(0); ++i) {
    auto sub = matrices(t.select(0, i));
    out.insert(out.end(), sub.begin(), sub.end());
  }
  return out;
}

// ---- index-space views and the rectangle plan --------------------------------------------------------------------

constexpr int kIdShift = 40;  // up to 2^40 elements per matrix
constexpr uint64_t kOffsetMask = (uint64_t(1) << kIdShift) - 1;

// The index-space view of matrix `id` ([N, K], row-major logical offsets).
inline View logical_view(int64_t id, int64_t N, int64_t K) {
  View v;
  v.ptr = reinterpret_cast<char*>(static_cast<uintptr_t>((static_cast<uint64_t>(id) + 1) << kIdShift));
  v.elem = 1;
  v.sizes = {N, K};
  v.strides = {K, 1};
  return v;
}

// Rows r with stride 2 starting at `first` (row-interleaved halves: gate = rows 0::2, up = rows 1::2).
inline View every_other_row(const View& v, int64_t first) {
  View o = v;
  o.ptr += first * v.strides[0] * v.elem;
  o.sizes[0] = v.sizes[0] / 2;
  o.strides[0] = v.strides[0] * 2;
  return o;
}

// HF rows r0 + i*rstep (i < nr) and columns [c0, c0 + nc) of matrix `id`, against the high-precision elements at
// other + (i*ors + j*ocs) * elem.
struct QRect {
  int64_t id;
  int64_t r0, rstep, nr;
  int64_t c0, nc;
  char* other;
  int64_t ors, ocs;  // elements of the high-precision dtype
};

// Collects the rectangles of one op call. It is the Emit of the layout walks: emit(src, dst) with the index-space
// view on the quantized side (the source for dequantization, the destination for quantization).
class QPlan {
 public:
  QPlan(const char* op, bool quantized_is_src, int32_t wide, int64_t wide_elem, at::Device device)
      : op_(op), quantized_is_src_(quantized_is_src), wide_(wide), wide_elem_(wide_elem), device_(device) {}

  // Registers a matrix; returns its index-space view.
  View add(const QTensor& t, std::string name) {
    tensors_.push_back(t);
    names_.push_back(std::move(name));
    return logical_view(static_cast<int64_t>(tensors_.size()) - 1, t.N, t.K);
  }

  void operator()(const View& src, const View& dst) {
    if (quantized_is_src_) {
      add_pair(src, dst);
    } else {
      add_pair(dst, src);
    }
  }

  const char* op() const { return op_; }
  int32_t wide() const { return wide_; }
  int64_t wide_elem() const { return wide_elem_; }
  at::Device device() const { return device_; }
  const std::vector<QTensor>& tensors() const { return tensors_; }
  const std::string& name(int64_t id) const { return names_[static_cast<size_t>(id)]; }
  const std::vector<QRect>& rects() const { return rects_; }

  // The matrices some rectangle touches (the ones whose scales an op reads).
  std::vector<int64_t> used_ids() const {
    std::vector<char> used(tensors_.size(), 0);
    for (const QRect& r : rects_) used[static_cast<size_t>(r.id)] = 1;
    std::vector<int64_t> ids;
    for (size_t i = 0; i < used.size(); ++i)
      if (used[i]) ids.push_back(static_cast<int64_t>(i));
    return ids;
  }

 private:
  // q: index-space view, w: the real high-precision view, of equal sizes. Leading dims are enumerated; the last two
  // are (HF rows, HF columns) of the matrix (a walk never moves the column dim).
  void add_pair(const View& q, const View& w) {
    TORCH_CHECK(q.sizes == w.sizes, op_, ": internal error: a layout walk paired views of different sizes");
    const int64_t m = q.dim();
    TORCH_CHECK(m >= 1, op_, ": internal error: a 0-d view of a quantized matrix");
    for (const int64_t s : q.sizes)
      if (s == 0) return;
    const int64_t lead = std::max<int64_t>(m - 2, 0);
    std::vector<int64_t> idx(static_cast<size_t>(lead), 0);
    int64_t qo = 0, wo = 0;
    while (true) {
      add_rect(q.ptr + qo, m >= 2 ? q.sizes[m - 2] : 1, m >= 2 ? q.strides[m - 2] : 0, q.sizes[m - 1],
               q.strides[m - 1], w.ptr + wo * w.elem, m >= 2 ? w.strides[m - 2] : 0, w.strides[m - 1]);
      int64_t k = lead - 1;
      for (; k >= 0; --k) {
        ++idx[k];
        qo += q.strides[k];
        wo += w.strides[k];
        if (idx[k] < q.sizes[k]) break;
        qo -= q.strides[k] * q.sizes[k];
        wo -= w.strides[k] * w.sizes[k];
        idx[k] = 0;
      }
      if (k < 0) break;
    }
  }

  void add_rect(const char* qp, int64_t rows, int64_t qrs, int64_t cols, int64_t qcs, char* wp, int64_t wrs,
                int64_t wcs) {
    const uint64_t a = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(qp));
    const int64_t id = static_cast<int64_t>(a >> kIdShift) - 1;
    const int64_t off = static_cast<int64_t>(a & kOffsetMask);
    TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(tensors_.size()), op_,
                ": internal error: a layout walk emitted a view that is not one of the quantized matrices");
    const QTensor& t = tensors_[static_cast<size_t>(id)];
    QRect r{};
    r.id = id;
    r.r0 = off / t.K;
    r.c0 = off % t.K;
    r.nr = rows;
    r.nc = cols;
    r.rstep = rows > 1 ? qrs / t.K : 1;
    TORCH_CHECK((cols == 1 || qcs == 1) && (rows == 1 || (qrs > 0 && qrs % t.K == 0)) && r.c0 + cols <= t.K &&
                    r.r0 + (rows - 1) * r.rstep < t.N,
                op_, ": internal error: a layout walk cut a quantized matrix along its columns' order");
    r.other = wp;
    r.ors = rows > 1 ? wrs : 0;
    r.ocs = wcs;
    rects_.push_back(r);
  }

  const char* op_;
  bool quantized_is_src_;
  int32_t wide_;
  int64_t wide_elem_;
  at::Device device_;
  std::vector<QTensor> tensors_;
  std::vector<std::string> names_;
  std::vector<QRect> rects_;
};

// ---- row groups --------------------------------------------------------------------------------------------------

// A plan's rectangles cut at the row groups of their matrices and sorted by (matrix, group): the unit of work of the
// executors. An FP8 group is one row of scale blocks (bn rows), so that a group owns its scale rows; MXFP4 groups are
// kMxfp4GroupRows rows.
constexpr int64_t kMxfp4GroupRows = 32;

inline int64_t group_rows(const QTensor& t) { return t.format == kMxfp4 ? kMxfp4GroupRows : t.bn; }

struct QGroup {
  int64_t id, row_block;
  int64_t first, last;  // clips [first, last)
};

struct QGroups {
  std::vector<QRect> clips;
  std::vector<QGroup> groups;
};

inline QGroups group_rects(const QPlan& plan) {
  struct Keyed {
    int64_t id, rb;
    QRect r;
  };
  std::vector<Keyed> cut;
  const int64_t we = plan.wide_elem();
  for (const QRect& r : plan.rects()) {
    const int64_t gr = group_rows(plan.tensors()[static_cast<size_t>(r.id)]);
    int64_t i = 0;
    while (i < r.nr) {
      const int64_t row = r.r0 + i * r.rstep;
      const int64_t rb = row / gr;
      // rows of this rectangle below (rb + 1) * gr: i' < i + ceil(((rb + 1) * gr - row) / rstep)
      const int64_t n = std::min(r.nr - i, ceil_div((rb + 1) * gr - row, r.rstep));
      QRect c = r;
      c.r0 = row;
      c.nr = n;
      c.other = r.other + i * r.ors * we;
      if (n == 1) c.rstep = 1;
      cut.push_back(Keyed{r.id, rb, c});
      i += n;
    }
  }
  std::stable_sort(cut.begin(), cut.end(),
                   [](const Keyed& a, const Keyed& b) { return a.id != b.id ? a.id < b.id : a.rb < b.rb; });
  QGroups g;
  g.clips.reserve(cut.size());
  for (size_t i = 0; i < cut.size(); ++i) {
    if (i == 0 || cut[i].id != cut[i - 1].id || cut[i].rb != cut[i - 1].rb) {
      g.groups.push_back(QGroup{cut[i].id, cut[i].rb, static_cast<int64_t>(i), static_cast<int64_t>(i)});
    }
    g.clips.push_back(cut[i].r);
    g.groups.back().last = static_cast<int64_t>(i) + 1;
  }
  return g;
}

// Quantization needs every element of a block: the walks of the unpack layouts cover each HF element exactly once,
// checked here group by group (elements covered == rows of the group x K).
inline void check_groups_cover(const QPlan& plan, const QGroups& g) {
  for (const QGroup& grp : g.groups) {
    const QTensor& t = plan.tensors()[static_cast<size_t>(grp.id)];
    const int64_t rows = std::min(t.bn, t.N - grp.row_block * t.bn);
    int64_t covered = 0;
    for (int64_t i = grp.first; i < grp.last; ++i) covered += g.clips[i].nr * g.clips[i].nc;
    TORCH_CHECK(covered == rows * t.K, plan.op(), ": internal error: the layout covers ", covered,
                " elements of row block ", grp.row_block, " of ", plan.name(grp.id), ", expected ", rows * t.K);
  }
  // every row block of every matrix must be present
  std::vector<int64_t> blocks(plan.tensors().size(), 0);
  for (const QGroup& grp : g.groups) ++blocks[static_cast<size_t>(grp.id)];
  for (size_t i = 0; i < blocks.size(); ++i) {
    const QTensor& t = plan.tensors()[i];
    TORCH_CHECK(t.N == 0 || t.K == 0 || blocks[i] == ceil_div(t.N, t.bn), plan.op(), ": internal error: ",
                plan.name(static_cast<int64_t>(i)), " has ", blocks[i], " of ", ceil_div(t.N, t.bn),
                " row blocks covered");
  }
}

// ---- errors on values --------------------------------------------------------------------------------------------

inline std::string scale_format_name(int32_t sf) {
  switch (sf) {
    case kScaleF32: return "float32";
    case kScaleBF16: return "bfloat16";
    case kScaleF16: return "float16";
    default: return "E8M0";
  }
}

// The error for a NaN / Inf scale (i, j) of matrix `id`.
[[noreturn]] inline void fail_scale(const QPlan& plan, int64_t id, int64_t i, int64_t j, float value) {
  const QTensor& t = plan.tensors()[static_cast<size_t>(id)];
  TORCH_CHECK(false, plan.op(), ": the scale of ", plan.name(id), " is ", value, " (",
              scale_format_name(t.scale_format), ") at [", i, ", ", j, "]: the block of rows [", i * t.bn, ", ", std::min(t.N, (i + 1) * t.bn),
              ") and columns [", j * t.bk, ", ", std::min(t.K, (j + 1) * t.bk),
              ") cannot be dequantized (scales must be finite)");
  std::abort();
}

// Scans the scales of every matrix the plan reads (host memory).
inline void check_scales_host(const QPlan& plan) {
  for (const int64_t id : plan.used_ids()) {
    const QTensor& t = plan.tensors()[static_cast<size_t>(id)];
    const int64_t nb = ceil_div(t.N, t.bn), kb = ceil_div(t.K, t.bk);
    for (int64_t i = 0; i < nb; ++i) {
      for (int64_t j = 0; j < kb; ++j) {
        const float s = load_scale(t.scale + i * t.sr + j * t.sc, t.scale_format);
        if (!std::isfinite(s)) fail_scale(plan, id, i, j, s);
      }
    }
  }
}

// The error for a block of a weight to quantize that holds NaN or Inf.
[[noreturn]] inline void fail_block(const QPlan& plan, int64_t id, int64_t i, int64_t j) {
  const QTensor& t = plan.tensors()[static_cast<size_t>(id)];
  TORCH_CHECK(false, plan.op(), ": ", plan.name(id), " has NaN or Inf values in block [", i, ", ", j, "] (rows [",
              i * t.bn, ", ", std::min(t.N, (i + 1) * t.bn), "), columns [", j * t.bk, ", ",
              std::min(t.K, (j + 1) * t.bk), ")): it cannot be quantized to FP8");
  std::abort();
}

}  // namespace quant
}  // namespace bridge
