// The bodies of the quantized ops (schemas in csrc/bridge.cpp), written once for CPU and CUDA: argument checks,
// allocation, and the layout walk of the matching byte-moving op (qkv_walk, gate_up_*_walk, expert_*_walk) run over
// index-space views of the quantized HF matrices (quant.h), so that a rank reads and converts only the rows and
// columns it keeps. `Exec` is the device's executor (csrc/cpu/quant.cpp, csrc/cuda/quant.cu):
//   Exec::kDevice                          the device type every tensor must have;
//   Exec::dequant(const QPlan&)            checks the scales it reads (NaN / Inf), then writes the plan's rectangles;
//   Exec::quant(const QPlan&, int32_t rule)  per block of every matrix: amax, scale, FP8 values (blocks with NaN / Inf
//                                          raise after the pass).
#pragma once
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <torch/library.h>

#include "experts.h"
#include "gate_up.h"
#include "qkv.h"
#include "quant.h"

namespace bridge {
namespace quant {

// ---- shared pieces -----------------------------------------------------------------------------------------------

// The matrices of a tensor whose trailing `inner` dims form one matrix (leading dims enumerated row-major).
inline std::vector<at::Tensor> split_leading(const at::Tensor& t, int64_t inner) {
  std::vector<at::Tensor> out;
  if (t.dim() <= inner) {
    out.push_back(t);
    return out;
  }
  for (int64_t i = 0; i < t.size(0); ++i) {
    auto sub = split_leading(t.select(0, i), inner);
    out.insert(out.end(), sub.begin(), sub.end());
  }
  return out;
}

inline std::string leading_name(const std::string& name, const at::Tensor& t, int64_t inner, size_t i) {
  return t.dim() > inner ? indexed(name, static_cast<int64_t>(i)) : name;
}

inline at::ScalarType wide_dtype(const std::optional<at::ScalarType>& dtype) {
  return dtype.has_value() ? *dtype : at::kBFloat16;
}

inline at::ScalarType fp8_dtype(const char* op, const std::optional<at::ScalarType>& dtype) {
  const at::ScalarType t = dtype.has_value() ? *dtype : at::kFloat8_e4m3fn;
  TORCH_CHECK(is_fp8(t), op, ": dtype = ", t, ", expected float8_e4m3fn or float8_e5m2");
  return t;
}

// A high-precision destination: `dtype` bfloat16 / float16 / float32, `ref`'s device, exactly `sizes`.
inline void check_wide_out(const char* op, const at::Tensor& out, const char* name, at::IntArrayRef sizes,
                           const at::Tensor& ref, const char* ref_name) {
  wide_format(op, out.scalar_type(), (std::string(name) + "'s dtype").c_str());
  BRIDGE_CHECK_SAME_DEVICE(op, out, name, ref, ref_name);
  check_shape(op, out, name, sizes);
}

// The (TP) slice of an [N, K] matrix: rows (tp_dim 0, a column-parallel linear) or columns (tp_dim 1, a row-parallel
// linear) [rank * n / tp, (rank + 1) * n / tp).
struct Slice {
  int64_t dim, start, len;
};

inline Slice tp_slice(const char* op, int64_t N, int64_t K, int64_t tp_size, int64_t tp_rank, int64_t tp_dim) {
  BRIDGE_CHECK_RANK(op, "tp_rank", tp_rank, "tp_size", tp_size);
  TORCH_CHECK(tp_dim == 0 || tp_dim == 1, op, ": tp_dim = ", tp_dim,
              ", expected 0 (rows: a column-parallel linear) or 1 (columns: a row-parallel linear)");
  const int64_t n = tp_dim == 0 ? N : K;
  BRIDGE_CHECK_DIVISIBLE(op, tp_dim == 0 ? "N (weight rows)" : "K (weight columns)", n, "tp_size", tp_size);
  return {tp_dim, tp_rank * (n / tp_size), n / tp_size};
}

inline View apply_slice(const View& v, const Slice& s) { return v.narrow(s.dim, s.start, s.len); }

// A quantized source: FP8 (data float8 [N, K] + scale grid) or MXFP4 (blocks uint8 [N, G, 16] + scales [N, G]).
struct SourceKind {
  bool mxfp4;
  Block block;  // FP8 only
  int64_t inner() const { return mxfp4 ? 3 : 2; }
  const char* scale_suffix() const { return mxfp4 ? "_scales" : "_scale_inv"; }
  QTensor make(const char* op, const at::Tensor& w, const std::string& name, const at::Tensor& s,
               const std::string& sname) const {
    return mxfp4 ? mxfp4_source(op, w, name, s, sname) : fp8_source(op, w, name, s, sname, block);
  }
};

inline SourceKind fp8_kind(const char* op, at::IntArrayRef block_size) { return {false, block_of(op, block_size)}; }
inline SourceKind mxfp4_kind() { return {true, {1, kMxfp4Group}}; }

// The logical rows / columns of a quantized source tensor (checked by SourceKind::make later).
inline int64_t q_rows(const at::Tensor& w) { return w.dim() >= 1 ? w.size(0) : 0; }
inline int64_t q_cols(const SourceKind& kind, const at::Tensor& w) {
  if (kind.mxfp4) return w.dim() >= 2 ? w.size(1) * kMxfp4Group : 0;
  return w.dim() >= 2 ? w.size(1) : 0;
}

// The scale of an optional pair must be present exactly when its weight is.
inline void check_pair(const char* op, bool has_w, bool has_s, const char* w, const char* s) {
  TORCH_CHECK(has_w == has_s, op, ": ", has_w ? s : w, " is missing (", w, " and ", s,
              " come together: a quantized weight needs its scales)");
}

inline void check_list_pair(const char* op, at::TensorList w, const char* wname, at::TensorList s,
                            const char* sname) {
  TORCH_CHECK(!w.empty(), op, ": ", wname, " is an empty list (expected one tensor per global expert)");
  TORCH_CHECK(w.size() == s.size(), op, ": ", sname, " has ", s.size(), " tensors but ", wname, " has ", w.size(),
              " (one scale tensor per expert)");
}

// Every expert of a list has the first one's dtype, shape and device (metadata only: only local experts are read).
inline void check_same_experts(const char* op, at::TensorList xs, const char* name) {
  for (size_t e = 1; e < xs.size(); ++e) {
    TORCH_CHECK(xs[e].scalar_type() == xs[0].scalar_type() && xs[e].sizes() == xs[0].sizes() &&
                    xs[e].device() == xs[0].device(),
                op, ": ", name, "[", e, "] is ", xs[e].scalar_type(), " ", xs[e].sizes(), " on ", xs[e].device(),
                " but ", name, "[0] is ", xs[0].scalar_type(), " ", xs[0].sizes(), " on ", xs[0].device());
  }
}

// ---- the ops -----------------------------------------------------------------------------------------------------

template <class Exec>
struct Ops {
  // -- plain (de)quantization, optionally one TP slice --------------------------------------------------------------

  // weight [..., N, K] (FP8) or [..., N, G, 16] (MXFP4) -> out [..., rows, cols] of the slice.
  static std::vector<int64_t> dequant_shape(const char* op, const SourceKind& kind, const at::Tensor& w,
                                            const at::Tensor& s, int64_t tp_size, int64_t tp_rank, int64_t tp_dim,
                                            const char* wname, const char* sname) {
    const int64_t inner = kind.inner();
    TORCH_CHECK(w.dim() >= inner, op, ": ", wname, " has shape ", w.sizes(), ", expected ",
                kind.mxfp4 ? "[..., N, K/32, 16]" : "[..., N, K]");
    TORCH_CHECK(s.dim() == w.dim() - (kind.mxfp4 ? 1 : 0) &&
                    s.sizes().slice(0, w.dim() - inner) == w.sizes().slice(0, w.dim() - inner),
                op, ": ", sname, " has shape ", s.sizes(), " but ", wname, " has shape ", w.sizes(),
                " (the leading dims must match)");
    const int64_t N = w.size(w.dim() - inner);
    const int64_t K = kind.mxfp4 ? w.size(w.dim() - 2) * kMxfp4Group : w.size(w.dim() - 1);
    const Slice sl = tp_slice(op, N, K, tp_size, tp_rank, tp_dim);
    std::vector<int64_t> shape(w.sizes().begin(), w.sizes().begin() + (w.dim() - inner));
    shape.push_back(sl.dim == 0 ? sl.len : N);
    shape.push_back(sl.dim == 1 ? sl.len : K);
    return shape;
  }

  static void dequant_into(const char* op, const SourceKind& kind, const at::Tensor& w, const at::Tensor& s,
                           int64_t tp_size, int64_t tp_rank, int64_t tp_dim, const at::Tensor& out,
                           const char* wname, const char* sname) {
    QPlan plan(op, true, wide_format(op, out.scalar_type(), "out's dtype"), out.element_size(), out.device());
    const auto ws = split_leading(w, kind.inner());
    const auto ss = split_leading(s, kind.inner() - (kind.mxfp4 ? 1 : 0));
    const auto os = split_leading(out, 2);
    for (size_t l = 0; l < ws.size(); ++l) {
      const std::string n = leading_name(wname, w, kind.inner(), l);
      const QTensor t = kind.make(op, ws[l], n, ss[l], leading_name(sname, w, kind.inner(), l));
      const View lv = plan.add(t, n);
      plan(apply_slice(lv, tp_slice(op, t.N, t.K, tp_size, tp_rank, tp_dim)), dst_view(os[l]));
    }
    Exec::dequant(plan);
  }

  static at::Tensor fp8_block_dequant(const at::Tensor& weight, const at::Tensor& scale_inv,
                                      at::IntArrayRef block_size, std::optional<at::ScalarType> dtype,
                                      int64_t tp_size, int64_t tp_rank, int64_t tp_dim) {
    const char* op = "fp8_block_dequant";
    check_device_type(op, weight, "weight", Exec::kDevice);
    const SourceKind kind = fp8_kind(op, block_size);
    const auto shape = dequant_shape(op, kind, weight, scale_inv, tp_size, tp_rank, tp_dim, "weight", "scale_inv");
    wide_format(op, wide_dtype(dtype), "dtype");
    at::Tensor out = at::empty(shape, weight.options().dtype(wide_dtype(dtype)));
    dequant_into(op, kind, weight, scale_inv, tp_size, tp_rank, tp_dim, out, "weight", "scale_inv");
    return out;
  }

  static void fp8_block_dequant_out(const at::Tensor& weight, const at::Tensor& scale_inv, at::IntArrayRef block_size,
                                    int64_t tp_size, int64_t tp_rank, int64_t tp_dim, const at::Tensor& out) {
    const char* op = "fp8_block_dequant_out";
    check_device_type(op, weight, "weight", Exec::kDevice);
    const SourceKind kind = fp8_kind(op, block_size);
    const auto shape = dequant_shape(op, kind, weight, scale_inv, tp_size, tp_rank, tp_dim, "weight", "scale_inv");
    check_wide_out(op, out, "out", shape, weight, "weight");
    dequant_into(op, kind, weight, scale_inv, tp_size, tp_rank, tp_dim, out, "weight", "scale_inv");
  }

  static at::Tensor mxfp4_dequant(const at::Tensor& blocks, const at::Tensor& scales,
                                  std::optional<at::ScalarType> dtype, int64_t tp_size, int64_t tp_rank,
                                  int64_t tp_dim) {
    const char* op = "mxfp4_dequant";
    check_device_type(op, blocks, "blocks", Exec::kDevice);
    const SourceKind kind = mxfp4_kind();
    const auto shape = dequant_shape(op, kind, blocks, scales, tp_size, tp_rank, tp_dim, "blocks", "scales");
    wide_format(op, wide_dtype(dtype), "dtype");
    at::Tensor out = at::empty(shape, blocks.options().dtype(wide_dtype(dtype)));
    dequant_into(op, kind, blocks, scales, tp_size, tp_rank, tp_dim, out, "blocks", "scales");
    return out;
  }

  static void mxfp4_dequant_out(const at::Tensor& blocks, const at::Tensor& scales, int64_t tp_size, int64_t tp_rank,
                                int64_t tp_dim, const at::Tensor& out) {
    const char* op = "mxfp4_dequant_out";
    check_device_type(op, blocks, "blocks", Exec::kDevice);
    const SourceKind kind = mxfp4_kind();
    const auto shape = dequant_shape(op, kind, blocks, scales, tp_size, tp_rank, tp_dim, "blocks", "scales");
    check_wide_out(op, out, "out", shape, blocks, "blocks");
    dequant_into(op, kind, blocks, scales, tp_size, tp_rank, tp_dim, out, "blocks", "scales");
  }

  static std::vector<int64_t> scale_shape(const at::Tensor& w, Block b) {
    std::vector<int64_t> s(w.sizes().begin(), w.sizes().end() - 2);
    const auto grid = scale_grid(w.size(w.dim() - 2), w.size(w.dim() - 1), b);
    s.insert(s.end(), grid.begin(), grid.end());
    return s;
  }

  static void quant_into(const char* op, const at::Tensor& w, Block b, int32_t rule, const at::Tensor& out,
                         const at::Tensor& scale_inv) {
    check_device_type(op, w, "weight", Exec::kDevice);
    TORCH_CHECK(w.dim() >= 2, op, ": weight has shape ", w.sizes(), ", expected [..., N, K]");
    QPlan plan(op, false, wide_format(op, w.scalar_type(), "weight's dtype"), w.element_size(), w.device());
    check_shape(op, out, "out", w.sizes());
    const auto grid = scale_shape(w, b);
    check_shape(op, scale_inv, "scale_inv", grid);
    const auto ws = split_leading(w, 2), qs = split_leading(out, 2), ss = split_leading(scale_inv, 2);
    for (size_t l = 0; l < ws.size(); ++l) {
      const std::string n = leading_name("weight", w, 2, l);
      const QTensor t = fp8_target(op, qs[l], leading_name("out", w, 2, l), ss[l],
                                   leading_name("scale_inv", w, 2, l), ws[l].size(0), ws[l].size(1), b, w, "weight");
      plan(src_view(ws[l]), plan.add(t, n));
    }
    Exec::quant(plan, rule);
  }

  static std::tuple<at::Tensor, at::Tensor> fp8_block_quant(const at::Tensor& weight, at::IntArrayRef block_size,
                                                            std::optional<at::ScalarType> dtype,
                                                            c10::string_view rule) {
    const char* op = "fp8_block_quant";
    const Block b = block_of(op, block_size);
    const int32_t r = rule_of(op, rule);
    TORCH_CHECK(weight.dim() >= 2, op, ": weight has shape ", weight.sizes(), ", expected [..., N, K]");
    at::Tensor q = at::empty(weight.sizes(), weight.options().dtype(fp8_dtype(op, dtype)));
    at::Tensor s = at::empty(scale_shape(weight, b), weight.options().dtype(at::kFloat));
    quant_into(op, weight, b, r, q, s);
    return {q, s};
  }

  static void fp8_block_quant_out(const at::Tensor& weight, at::IntArrayRef block_size, c10::string_view rule,
                                  const at::Tensor& out, const at::Tensor& scale_inv) {
    const char* op = "fp8_block_quant_out";
    quant_into(op, weight, block_of(op, block_size), rule_of(op, rule), out, scale_inv);
  }

  // -- fused QKV --------------------------------------------------------------------------------------------------

  static QkvGeometry qkv_dequant_check(const char* op, const std::optional<at::Tensor>& q,
                                       const std::optional<at::Tensor>& q_s, const at::Tensor& k,
                                       const at::Tensor& v, int64_t num_heads, int64_t num_query_groups,
                                       int64_t head_dim, int64_t tp_size, int64_t tp_rank, bool output_gate) {
    check_device_type(op, k, "k", Exec::kDevice);
    check_pair(op, qkv_has_q(q), qkv_has_q(q_s), "q", "q_scale_inv");
    QkvGeometry g = qkv_geometry(op, num_heads, num_query_groups, head_dim, output_gate);
    qkv_check_tp(op, g, tp_size, tp_rank);
    check_rows(op, k, "k", g.kv_rows, "G*d");
    check_rows(op, v, "v", g.kv_rows, "G*d");
    if (qkv_has_q(q)) {
      check_rows(op, *q, "q", g.q_rows, output_gate ? "2*H*d" : "H*d");
    } else {
      TORCH_CHECK(g.heads == 0, op, ": q is None but num_heads = ", g.heads,
                  " (q may be None only for a KV-only layout with num_heads = 0)");
    }
    return g;
  }

  static void qkv_dequant_into(const char* op, const QkvGeometry& g, const std::optional<at::Tensor>& q,
                               const std::optional<at::Tensor>& q_s, const at::Tensor& k, const at::Tensor& k_s,
                               const at::Tensor& v, const at::Tensor& v_s, Block b, int64_t tp_size, int64_t tp_rank,
                               const at::Tensor& out) {
    QPlan plan(op, true, wide_format(op, out.scalar_type(), "out's dtype"), out.element_size(), out.device());
    const View kv = plan.add(fp8_source(op, k, "k", k_s, "k_scale_inv", b), "k");
    const View vv = plan.add(fp8_source(op, v, "v", v_s, "v_scale_inv", b), "v");
    TORCH_CHECK(v.size(1) == k.size(1), op, ": v has ", v.size(1), " columns but k has ", k.size(1));
    View qv;
    const bool has_q = qkv_has_q(q) && g.heads > 0;
    if (has_q) {
      qv = plan.add(fp8_source(op, *q, "q", *q_s, "q_scale_inv", b), "q");
      TORCH_CHECK(q->size(1) == k.size(1), op, ": q has ", q->size(1), " columns but k has ", k.size(1));
    }
    const int64_t rows = g.packed_rows / tp_size;
    qkv_walk(g, tp_rank * rows, (tp_rank + 1) * rows, has_q ? &qv : nullptr, kv, vv, dst_view(out), true, plan);
    Exec::dequant(plan);
  }

  static at::Tensor fp8_qkv_pack(const std::optional<at::Tensor>& q, const std::optional<at::Tensor>& q_scale_inv,
                                 const at::Tensor& k, const at::Tensor& k_scale_inv, const at::Tensor& v,
                                 const at::Tensor& v_scale_inv, at::IntArrayRef block_size, int64_t num_heads,
                                 int64_t num_query_groups, int64_t head_dim, int64_t tp_size, int64_t tp_rank,
                                 bool output_gate, std::optional<at::ScalarType> dtype) {
    const char* op = "fp8_qkv_pack";
    const Block b = block_of(op, block_size);
    const auto g = qkv_dequant_check(op, q, q_scale_inv, k, v, num_heads, num_query_groups, head_dim, tp_size,
                                     tp_rank, output_gate);
    wide_format(op, wide_dtype(dtype), "dtype");
    TORCH_CHECK(k.dim() == 2, op, ": k has shape ", k.sizes(), ", expected a matrix [G*d, K]");
    at::Tensor out = at::empty({g.packed_rows / tp_size, k.size(1)}, k.options().dtype(wide_dtype(dtype)));
    qkv_dequant_into(op, g, q, q_scale_inv, k, k_scale_inv, v, v_scale_inv, b, tp_size, tp_rank, out);
    return out;
  }

  static void fp8_qkv_pack_out(const std::optional<at::Tensor>& q, const std::optional<at::Tensor>& q_scale_inv,
                               const at::Tensor& k, const at::Tensor& k_scale_inv, const at::Tensor& v,
                               const at::Tensor& v_scale_inv, at::IntArrayRef block_size, int64_t num_heads,
                               int64_t num_query_groups, int64_t head_dim, int64_t tp_size, int64_t tp_rank,
                               bool output_gate, const at::Tensor& out) {
    const char* op = "fp8_qkv_pack_out";
    const Block b = block_of(op, block_size);
    const auto g = qkv_dequant_check(op, q, q_scale_inv, k, v, num_heads, num_query_groups, head_dim, tp_size,
                                     tp_rank, output_gate);
    TORCH_CHECK(k.dim() == 2, op, ": k has shape ", k.sizes(), ", expected a matrix [G*d, K]");
    check_wide_out(op, out, "out", {g.packed_rows / tp_size, k.size(1)}, k, "k");
    qkv_dequant_into(op, g, q, q_scale_inv, k, k_scale_inv, v, v_scale_inv, b, tp_size, tp_rank, out);
  }

  struct QkvTargets {
    at::Tensor q, q_s, k, k_s, v, v_s;
  };

  static QkvGeometry qkv_quant_check(const char* op, const at::Tensor& packed, int64_t num_heads,
                                     int64_t num_query_groups, int64_t head_dim, bool output_gate) {
    check_device_type(op, packed, "packed", Exec::kDevice);
    TORCH_CHECK(packed.dim() == 2, op, ": packed has shape ", packed.sizes(), ", expected a matrix [rows, K]");
    return qkv_unpack_check(op, packed, num_heads, num_query_groups, head_dim, output_gate);
  }

  static void qkv_quant_into(const char* op, const QkvGeometry& g, const at::Tensor& packed, Block b, int32_t rule,
                             const QkvTargets& t) {
    QPlan plan(op, false, wide_format(op, packed.scalar_type(), "packed's dtype"), packed.element_size(),
               packed.device());
    const int64_t K = packed.size(1);
    const View kv = plan.add(fp8_target(op, t.k, "k", t.k_s, "k_scale_inv", g.kv_rows, K, b, packed, "packed"), "k");
    const View vv = plan.add(fp8_target(op, t.v, "v", t.v_s, "v_scale_inv", g.kv_rows, K, b, packed, "packed"), "v");
    View qv;
    const bool has_q = g.heads > 0;
    if (has_q) qv = plan.add(fp8_target(op, t.q, "q", t.q_s, "q_scale_inv", g.q_rows, K, b, packed, "packed"), "q");
    qkv_walk(g, 0, g.packed_rows, has_q ? &qv : nullptr, kv, vv, src_view(packed), false, plan);
    Exec::quant(plan, rule);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fp8_qkv_unpack(
      const at::Tensor& packed, at::IntArrayRef block_size, int64_t num_heads, int64_t num_query_groups,
      int64_t head_dim, bool output_gate, std::optional<at::ScalarType> dtype, c10::string_view rule) {
    const char* op = "fp8_qkv_unpack";
    const Block b = block_of(op, block_size);
    const int32_t r = rule_of(op, rule);
    const auto g = qkv_quant_check(op, packed, num_heads, num_query_groups, head_dim, output_gate);
    const auto qo = packed.options().dtype(fp8_dtype(op, dtype));
    const auto so = packed.options().dtype(at::kFloat);
    const int64_t K = packed.size(1);
    QkvTargets t{at::empty({g.q_rows, K}, qo), at::empty(scale_grid(g.q_rows, K, b), so),
                 at::empty({g.kv_rows, K}, qo), at::empty(scale_grid(g.kv_rows, K, b), so),
                 at::empty({g.kv_rows, K}, qo), at::empty(scale_grid(g.kv_rows, K, b), so)};
    qkv_quant_into(op, g, packed, b, r, t);
    return {t.q, t.q_s, t.k, t.k_s, t.v, t.v_s};
  }

  static void fp8_qkv_unpack_out(const at::Tensor& packed, at::IntArrayRef block_size, int64_t num_heads,
                                 int64_t num_query_groups, int64_t head_dim, bool output_gate, c10::string_view rule,
                                 const std::optional<at::Tensor>& q, const std::optional<at::Tensor>& q_scale_inv,
                                 const at::Tensor& k, const at::Tensor& k_scale_inv, const at::Tensor& v,
                                 const at::Tensor& v_scale_inv) {
    const char* op = "fp8_qkv_unpack_out";
    const Block b = block_of(op, block_size);
    const int32_t r = rule_of(op, rule);
    const auto g = qkv_quant_check(op, packed, num_heads, num_query_groups, head_dim, output_gate);
    check_pair(op, qkv_has_q(q), qkv_has_q(q_scale_inv), "q", "q_scale_inv");
    TORCH_CHECK(g.heads == 0 || qkv_has_q(q), op, ": q is None but num_heads = ", g.heads);
    QkvTargets t{qkv_has_q(q) ? *q : at::Tensor(), qkv_has_q(q_scale_inv) ? *q_scale_inv : at::Tensor(), k,
                 k_scale_inv, v, v_scale_inv};
    qkv_quant_into(op, g, packed, b, r, t);
  }

  // -- gate / up --------------------------------------------------------------------------------------------------

  // gate (with up) or one fused gate_up (up None: halves, or interleaved rows) -> index-space views of gate and up.
  static std::pair<View, View> gate_up_sources(const char* op, QPlan& plan, const SourceKind& kind,
                                               const at::Tensor& gate, const at::Tensor& gate_s,
                                               const std::optional<at::Tensor>& up,
                                               const std::optional<at::Tensor>& up_s, bool interleaved,
                                               const std::string& gname, const std::string& uname,
                                               const std::string& fname) {
    const std::string sfx = kind.scale_suffix();
    if (up.has_value() && up->defined()) {
      TORCH_CHECK(!interleaved, op, ": interleaved = True needs one fused gate_up tensor (", uname, " must be None)");
      const QTensor tg = kind.make(op, gate, gname, gate_s, gname + sfx);
      const QTensor tu = kind.make(op, *up, uname, *up_s, uname + sfx);
      TORCH_CHECK(tu.N == tg.N && tu.K == tg.K, op, ": ", uname, " is [", tu.N, ", ", tu.K, "] but ", gname, " is [",
                  tg.N, ", ", tg.K, "] (logical shapes must match)");
      const View gv = plan.add(tg, gname);
      return {gv, plan.add(tu, uname)};
    }
    const QTensor t = kind.make(op, gate, fname, gate_s, fname + sfx);
    TORCH_CHECK(t.N % 2 == 0, op, ": the fused ", fname, " has ", t.N, " rows, expected an even 2F");
    const View lv = plan.add(t, fname);
    if (interleaved) return {every_other_row(lv, 0), every_other_row(lv, 1)};
    return {lv.rows(0, t.N / 2), lv.rows(t.N / 2, t.N / 2)};
  }

  static void gate_up_dequant_into(const char* op, const at::Tensor& gate, const at::Tensor& gate_s,
                                   const std::optional<at::Tensor>& up, const std::optional<at::Tensor>& up_s,
                                   Block b, int64_t tp_size, int64_t tp_rank, bool interleaved,
                                   const std::optional<at::ScalarType>& dtype, at::Tensor* out) {
    check_device_type(op, gate, "gate", Exec::kDevice);
    check_pair(op, up.has_value() && up->defined(), up_s.has_value() && up_s->defined(), "up", "up_scale_inv");
    BRIDGE_CHECK_RANK(op, "tp_rank", tp_rank, "tp_size", tp_size);
    TORCH_CHECK(gate.dim() == 2, op, ": gate has shape ", gate.sizes(), ", expected a matrix");
    const bool fused = !(up.has_value() && up->defined());
    TORCH_CHECK(!fused || gate.size(0) % 2 == 0, op, ": the fused gate_up has ", gate.size(0),
                " rows, expected an even 2F");
    const int64_t F = fused ? gate.size(0) / 2 : gate.size(0);
    BRIDGE_CHECK_DIVISIBLE(op, "F (gate rows)", F, "tp_size", tp_size);
    const int64_t f = F / tp_size;
    const std::vector<int64_t> shape{2 * f, gate.size(1)};
    if (out->defined()) {
      check_wide_out(op, *out, "out", shape, gate, "gate");
    } else {
      wide_format(op, wide_dtype(dtype), "dtype");
      *out = at::empty(shape, gate.options().dtype(wide_dtype(dtype)));
    }
    QPlan plan(op, true, wide_format(op, out->scalar_type(), "out's dtype"), out->element_size(),
               out->device());
    const auto [gv, uv] = gate_up_sources(op, plan, fp8_kind_of(b), gate, gate_s, up, up_s, interleaved, "gate", "up",
                                            "gate_up");
    gate_up_pack_walk(gv, uv, f, tp_rank, dst_view(*out), plan);
    Exec::dequant(plan);
  }

  static SourceKind fp8_kind_of(Block b) { return {false, b}; }

  static at::Tensor fp8_gate_up_pack(const at::Tensor& gate, const at::Tensor& gate_scale_inv,
                                     const std::optional<at::Tensor>& up, const std::optional<at::Tensor>& up_scale_inv,
                                     at::IntArrayRef block_size, int64_t tp_size, int64_t tp_rank, bool interleaved,
                                     std::optional<at::ScalarType> dtype) {
    const char* op = "fp8_gate_up_pack";
    at::Tensor out;
    gate_up_dequant_into(op, gate, gate_scale_inv, up, up_scale_inv, block_of(op, block_size), tp_size, tp_rank,
                         interleaved, dtype, &out);
    return out;
  }

  static void fp8_gate_up_pack_out(const at::Tensor& gate, const at::Tensor& gate_scale_inv,
                                   const std::optional<at::Tensor>& up, const std::optional<at::Tensor>& up_scale_inv,
                                   at::IntArrayRef block_size, int64_t tp_size, int64_t tp_rank, bool interleaved,
                                   const at::Tensor& out) {
    const char* op = "fp8_gate_up_pack_out";
    at::Tensor o = out;
    gate_up_dequant_into(op, gate, gate_scale_inv, up, up_scale_inv, block_of(op, block_size), tp_size, tp_rank,
                         interleaved, std::nullopt, &o);
  }

  static void gate_up_quant_into(const char* op, const at::Tensor& packed, int64_t tp_size, Block b, int32_t rule,
                                 const at::Tensor& gate, const at::Tensor& gate_s, const at::Tensor& up,
                                 const at::Tensor& up_s) {
    const int64_t f = packed.size(0) / (2 * tp_size);
    const int64_t K = packed.size(1);
    QPlan plan(op, false, wide_format(op, packed.scalar_type(), "packed's dtype"), packed.element_size(),
               packed.device());
    const View gv =
        plan.add(fp8_target(op, gate, "gate", gate_s, "gate_scale_inv", f * tp_size, K, b, packed, "packed"), "gate");
    const View uv = plan.add(fp8_target(op, up, "up", up_s, "up_scale_inv", f * tp_size, K, b, packed, "packed"), "up");
    gate_up_unpack_walk(src_view(packed), tp_size, f, gv, uv, plan);
    Exec::quant(plan, rule);
  }

  static void gate_up_quant_check(const char* op, const at::Tensor& packed, int64_t tp_size) {
    check_device_type(op, packed, "packed", Exec::kDevice);
    gate_up_unpack_check(op, packed, tp_size);
    TORCH_CHECK(packed.dim() == 2, op, ": packed has shape ", packed.sizes(), ", expected a matrix [2F, K]");
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fp8_gate_up_unpack(
      const at::Tensor& packed, at::IntArrayRef block_size, int64_t tp_size, std::optional<at::ScalarType> dtype,
      c10::string_view rule) {
    const char* op = "fp8_gate_up_unpack";
    const Block b = block_of(op, block_size);
    const int32_t r = rule_of(op, rule);
    gate_up_quant_check(op, packed, tp_size);
    const int64_t F = packed.size(0) / 2, K = packed.size(1);
    const auto qo = packed.options().dtype(fp8_dtype(op, dtype));
    const auto so = packed.options().dtype(at::kFloat);
    at::Tensor g = at::empty({F, K}, qo), gs = at::empty(scale_grid(F, K, b), so);
    at::Tensor u = at::empty({F, K}, qo), us = at::empty(scale_grid(F, K, b), so);
    gate_up_quant_into(op, packed, tp_size, b, r, g, gs, u, us);
    return {g, gs, u, us};
  }

  static void fp8_gate_up_unpack_out(const at::Tensor& packed, at::IntArrayRef block_size, int64_t tp_size,
                                     c10::string_view rule, const at::Tensor& gate, const at::Tensor& gate_scale_inv,
                                     const at::Tensor& up, const at::Tensor& up_scale_inv) {
    const char* op = "fp8_gate_up_unpack_out";
    const Block b = block_of(op, block_size);
    const int32_t r = rule_of(op, rule);
    gate_up_quant_check(op, packed, tp_size);
    gate_up_quant_into(op, packed, tp_size, b, r, gate, gate_scale_inv, up, up_scale_inv);
  }

  // -- experts: import ------------------------------------------------------------------------------------------------

  // fc1 of the local experts from per-expert gate (+ up) or fused gate_up sources; `out` views (stacked or list).
  static void fc1_dequant(const char* op, const SourceKind& kind, at::TensorList gate, at::TensorList gate_s,
                          at::TensorList up, at::TensorList up_s,
                          int64_t ep_size, int64_t ep_rank, int64_t etp_size, int64_t etp_rank, bool interleaved,
                          int32_t wide, int64_t wide_elem, const std::vector<View>& out) {
    QPlan plan(op, true, wide, wide_elem, gate[0].device());
    const int64_t local = static_cast<int64_t>(gate.size()) / ep_size;
    std::vector<View> gv, uv;
    for (int64_t e = 0; e < local; ++e) {
      const int64_t ge = ep_rank * local + e;
      std::optional<at::Tensor> u, us;
      if (!up.empty()) {
        u = up[ge];
        us = up_s[ge];
      }
      const auto [g, uu] = gate_up_sources(op, plan, kind, gate[ge], gate_s[ge], u, us, interleaved,
                                           indexed("gate", ge), indexed("up", ge), indexed("gate_up", ge));
      gv.push_back(g);
      uv.push_back(uu);
    }
    const ExpertFc1Geometry geo{static_cast<int64_t>(gate.size()), local, fc1_f(op, gate, up, etp_size)};
    expert_fc1_pack_walk_views(
        geo, [&](int64_t ge) { return gv[static_cast<size_t>(ge - ep_rank * local)]; },
        [&](int64_t ge) { return uv[static_cast<size_t>(ge - ep_rank * local)]; }, ep_rank, etp_rank, out, plan);
    Exec::dequant(plan);
  }

  // F / etp of the fc1 sources (checked: lists, ranks, divisibility).
  static int64_t fc1_f(const char* op, at::TensorList gate, at::TensorList up, int64_t etp_size) {
    const int64_t rows = q_rows(gate[0]);
    const int64_t F = up.empty() ? rows / 2 : rows;
    BRIDGE_CHECK_DIVISIBLE(op, "F (gate rows)", F, "etp_size", etp_size);
    return F / etp_size;
  }

  // Checks of the fc1 import; returns (E/ep, f, K).
  static std::tuple<int64_t, int64_t, int64_t> fc1_check(const char* op, const SourceKind& kind, at::TensorList gate,
                                                         at::TensorList gate_s, at::TensorList up,
                                                         at::TensorList up_s, int64_t ep_size, int64_t ep_rank,
                                                         int64_t etp_size, int64_t etp_rank, bool interleaved) {
    const std::string ws = std::string("gate") + kind.scale_suffix();
    check_list_pair(op, gate, "gate", gate_s, ws.c_str());
    check_device_type(op, gate[0], "gate[0]", Exec::kDevice);
    const std::string us = std::string("up") + kind.scale_suffix();
    TORCH_CHECK(up.size() == up_s.size(), op, ": ", us, " has ", up_s.size(), " tensors but up has ", up.size(),
                up.empty() ? " (an empty up means a fused gate_up: then its scales are in " : " (one per expert)",
                up.empty() ? ws + ")" : std::string());
    BRIDGE_CHECK_POSITIVE(op, "ep_size", ep_size);
    BRIDGE_CHECK_POSITIVE(op, "etp_size", etp_size);
    BRIDGE_CHECK_DIVISIBLE(op, "number of experts E", static_cast<int64_t>(gate.size()), "ep_size", ep_size);
    BRIDGE_CHECK_RANK(op, "ep_rank", ep_rank, "ep_size", ep_size);
    BRIDGE_CHECK_RANK(op, "etp_rank", etp_rank, "etp_size", etp_size);
    check_same_experts(op, gate, "gate");
    check_same_experts(op, gate_s, ws.c_str());
    TORCH_CHECK(gate[0].dim() == kind.inner(), op, ": gate[0] has shape ", gate[0].sizes(), ", expected ",
                kind.mxfp4 ? "[rows, K/32, 16]" : "[rows, K]");
    if (!up.empty()) {
      TORCH_CHECK(!interleaved, op, ": interleaved = True needs fused gate_up tensors (up must be empty)");
      TORCH_CHECK(up.size() == gate.size(), op, ": up has ", up.size(), " experts but gate has ", gate.size());
      check_same_experts(op, up, "up");
      check_same_experts(op, up_s, us.c_str());
    } else {
      TORCH_CHECK(q_rows(gate[0]) % 2 == 0, op, ": the fused gate_up[0] has ", q_rows(gate[0]),
                  " rows, expected an even 2F");
    }
    const int64_t local = static_cast<int64_t>(gate.size()) / ep_size;
    return {local, fc1_f(op, gate, up, etp_size), q_cols(kind, gate[0])};
  }

  static at::Tensor expert_fc1(const char* op, const SourceKind& kind, at::TensorList gate, at::TensorList gate_s,
                               at::TensorList up, at::TensorList up_s,
                               int64_t ep_size, int64_t ep_rank, int64_t etp_size, int64_t etp_rank, bool interleaved,
                               std::optional<at::ScalarType> dtype) {
    const auto [local, f, K] = fc1_check(op, kind, gate, gate_s, up, up_s, ep_size, ep_rank, etp_size, etp_rank,
                                               interleaved);
    const at::ScalarType wt = wide_dtype(dtype);
    const int32_t wide = wide_format(op, wt, "dtype");
    at::Tensor out = at::empty({local, 2 * f, K}, gate[0].options().dtype(wt));
    fc1_dequant(op, kind, gate, gate_s, up, up_s, ep_size, ep_rank, etp_size, etp_rank, interleaved, wide,
                out.element_size(), dst_slices(out));
    return out;
  }

  static void expert_fc1_out(const char* op, const SourceKind& kind, at::TensorList gate, at::TensorList gate_s,
                             at::TensorList up, at::TensorList up_s,
                             int64_t ep_size, int64_t ep_rank, int64_t etp_size, int64_t etp_rank, bool interleaved,
                             const at::Tensor& out) {
    const auto [local, f, K] = fc1_check(op, kind, gate, gate_s, up, up_s, ep_size, ep_rank, etp_size, etp_rank,
                                               interleaved);
    check_wide_out(op, out, "out", {local, 2 * f, K}, gate[0], "gate[0]");
    fc1_dequant(op, kind, gate, gate_s, up, up_s, ep_size, ep_rank, etp_size, etp_rank, interleaved,
                wide_format(op, out.scalar_type(), "out's dtype"), out.element_size(), dst_slices(out));
  }

  static void expert_fc1_out_list(const char* op, const SourceKind& kind, at::TensorList gate, at::TensorList gate_s,
                                  at::TensorList up, at::TensorList up_s,
                                  int64_t ep_size, int64_t ep_rank, int64_t etp_size, int64_t etp_rank,
                                  bool interleaved, at::TensorList out) {
    const auto [local, f, K] = fc1_check(op, kind, gate, gate_s, up, up_s, ep_size, ep_rank, etp_size, etp_rank,
                                               interleaved);
    check_wide_out_list(op, out, local, {2 * f, K}, gate[0], "gate[0]");
    fc1_dequant(op, kind, gate, gate_s, up, up_s, ep_size, ep_rank, etp_size, etp_rank, interleaved,
                wide_format(op, out[0].scalar_type(), "out[0]'s dtype"), out[0].element_size(), dst_views(out));
  }

  static void check_wide_out_list(const char* op, at::TensorList out, int64_t count, at::IntArrayRef sizes,
                                  const at::Tensor& ref, const char* ref_name) {
    TORCH_CHECK(static_cast<int64_t>(out.size()) == count, op, ": out has ", out.size(), " tensors, expected E/ep = ",
                count);
    for (size_t e = 0; e < out.size(); ++e) {
      const std::string n = indexed("out", static_cast<int64_t>(e));
      check_wide_out(op, out[e], n.c_str(), sizes, ref, ref_name);
      TORCH_CHECK(out[e].scalar_type() == out[0].scalar_type(), op, ": ", n, " has dtype ", out[e].scalar_type(),
                  " but out[0] has dtype ", out[0].scalar_type());
    }
  }

  // fc2: columns [t*F/etp, (t+1)*F/etp) of every local expert's down [D, F].
  static std::tuple<int64_t, int64_t, int64_t> fc2_check(const char* op, const SourceKind& kind, at::TensorList down,
                                                         at::TensorList down_s, int64_t ep_size, int64_t ep_rank,
                                                         int64_t etp_size, int64_t etp_rank) {
    const std::string ws = std::string("down") + kind.scale_suffix();
    check_list_pair(op, down, "down", down_s, ws.c_str());
    check_device_type(op, down[0], "down[0]", Exec::kDevice);
    BRIDGE_CHECK_POSITIVE(op, "ep_size", ep_size);
    BRIDGE_CHECK_POSITIVE(op, "etp_size", etp_size);
    BRIDGE_CHECK_DIVISIBLE(op, "number of experts E", static_cast<int64_t>(down.size()), "ep_size", ep_size);
    BRIDGE_CHECK_RANK(op, "ep_rank", ep_rank, "ep_size", ep_size);
    BRIDGE_CHECK_RANK(op, "etp_rank", etp_rank, "etp_size", etp_size);
    check_same_experts(op, down, "down");
    check_same_experts(op, down_s, ws.c_str());
    TORCH_CHECK(down[0].dim() == kind.inner(), op, ": down[0] has shape ", down[0].sizes(), ", expected ",
                kind.mxfp4 ? "[D, F/32, 16]" : "[D, F]");
    const int64_t F = q_cols(kind, down[0]);
    BRIDGE_CHECK_DIVISIBLE(op, "F (down columns)", F, "etp_size", etp_size);
    return {static_cast<int64_t>(down.size()) / ep_size, q_rows(down[0]), F / etp_size};
  }

  static void fc2_dequant(const char* op, const SourceKind& kind, at::TensorList down, at::TensorList down_s,
                          int64_t ep_size, int64_t ep_rank, int64_t etp_rank, int64_t cols, int32_t wide,
                          int64_t wide_elem, const std::vector<View>& out) {
    QPlan plan(op, true, wide, wide_elem, down[0].device());
    const int64_t local = static_cast<int64_t>(down.size()) / ep_size;
    std::vector<View> dv;
    for (int64_t e = 0; e < local; ++e) {
      const int64_t ge = ep_rank * local + e;
      const std::string n = indexed("down", ge);
      dv.push_back(plan.add(kind.make(op, down[ge], n, down_s[ge], n + kind.scale_suffix()), n));
    }
    const ExpertFc2Geometry geo{static_cast<int64_t>(down.size()), local, cols, true};
    expert_fc2_pack_walk_views(
        geo, [&](int64_t ge) { return dv[static_cast<size_t>(ge - ep_rank * local)]; }, ep_rank, etp_rank, out, plan);
    Exec::dequant(plan);
  }

  static at::Tensor expert_fc2(const char* op, const SourceKind& kind, at::TensorList down, at::TensorList down_s,
                               int64_t ep_size, int64_t ep_rank, int64_t etp_size, int64_t etp_rank,
                               std::optional<at::ScalarType> dtype) {
    const auto [local, D, c] = fc2_check(op, kind, down, down_s, ep_size, ep_rank, etp_size, etp_rank);
    const at::ScalarType wt = wide_dtype(dtype);
    const int32_t wide = wide_format(op, wt, "dtype");
    at::Tensor out = at::empty({local, D, c}, down[0].options().dtype(wt));
    fc2_dequant(op, kind, down, down_s, ep_size, ep_rank, etp_rank, c, wide, out.element_size(), dst_slices(out));
    return out;
  }

  static void expert_fc2_out(const char* op, const SourceKind& kind, at::TensorList down, at::TensorList down_s,
                             int64_t ep_size, int64_t ep_rank, int64_t etp_size, int64_t etp_rank,
                             const at::Tensor& out) {
    const auto [local, D, c] = fc2_check(op, kind, down, down_s, ep_size, ep_rank, etp_size, etp_rank);
    check_wide_out(op, out, "out", {local, D, c}, down[0], "down[0]");
    fc2_dequant(op, kind, down, down_s, ep_size, ep_rank, etp_rank, c,
                wide_format(op, out.scalar_type(), "out's dtype"), out.element_size(), dst_slices(out));
  }

  static void expert_fc2_out_list(const char* op, const SourceKind& kind, at::TensorList down, at::TensorList down_s,
                                  int64_t ep_size, int64_t ep_rank, int64_t etp_size, int64_t etp_rank,
                                  at::TensorList out) {
    const auto [local, D, c] = fc2_check(op, kind, down, down_s, ep_size, ep_rank, etp_size, etp_rank);
    check_wide_out_list(op, out, local, {D, c}, down[0], "down[0]");
    fc2_dequant(op, kind, down, down_s, ep_size, ep_rank, etp_rank, c,
                wide_format(op, out[0].scalar_type(), "out[0]'s dtype"), out[0].element_size(), dst_views(out));
  }

  // The registered entry points of the expert imports (FP8 and MXFP4).
  static at::Tensor fp8_expert_pack_fc1(at::TensorList gate, at::TensorList gate_scale_inv,
                                        at::TensorList up, at::TensorList up_scale_inv,
                                        at::IntArrayRef block_size, int64_t ep_size, int64_t ep_rank,
                                        int64_t etp_size, int64_t etp_rank, bool interleaved,
                                        std::optional<at::ScalarType> dtype) {
    const char* op = "fp8_expert_pack_fc1";
    return expert_fc1(op, fp8_kind(op, block_size), gate, gate_scale_inv, up, up_scale_inv, ep_size, ep_rank,
                      etp_size, etp_rank, interleaved, dtype);
  }

  static void fp8_expert_pack_fc1_out(at::TensorList gate, at::TensorList gate_scale_inv,
                                      at::TensorList up, at::TensorList up_scale_inv,
                                      at::IntArrayRef block_size, int64_t ep_size, int64_t ep_rank, int64_t etp_size,
                                      int64_t etp_rank, bool interleaved, const at::Tensor& out) {
    const char* op = "fp8_expert_pack_fc1_out";
    expert_fc1_out(op, fp8_kind(op, block_size), gate, gate_scale_inv, up, up_scale_inv, ep_size, ep_rank, etp_size,
                   etp_rank, interleaved, out);
  }

  static void fp8_expert_pack_fc1_out_list(at::TensorList gate, at::TensorList gate_scale_inv,
                                           at::TensorList up, at::TensorList up_scale_inv, at::IntArrayRef block_size,
                                           int64_t ep_size, int64_t ep_rank, int64_t etp_size, int64_t etp_rank,
                                           bool interleaved, at::TensorList out) {
    const char* op = "fp8_expert_pack_fc1_out.list";
    expert_fc1_out_list(op, fp8_kind(op, block_size), gate, gate_scale_inv, up, up_scale_inv, ep_size, ep_rank,
                        etp_size, etp_rank, interleaved, out);
  }

  static at::Tensor fp8_expert_pack_fc2(at::TensorList down, at::TensorList down_scale_inv,
                                        at::IntArrayRef block_size, int64_t ep_size, int64_t ep_rank,
                                        int64_t etp_size, int64_t etp_rank, std::optional<at::ScalarType> dtype) {
    const char* op = "fp8_expert_pack_fc2";
    return expert_fc2(op, fp8_kind(op, block_size), down, down_scale_inv, ep_size, ep_rank, etp_size, etp_rank,
                      dtype);
  }

  static void fp8_expert_pack_fc2_out(at::TensorList down, at::TensorList down_scale_inv, at::IntArrayRef block_size,
                                      int64_t ep_size, int64_t ep_rank, int64_t etp_size, int64_t etp_rank,
                                      const at::Tensor& out) {
    const char* op = "fp8_expert_pack_fc2_out";
    expert_fc2_out(op, fp8_kind(op, block_size), down, down_scale_inv, ep_size, ep_rank, etp_size, etp_rank, out);
  }

  static void fp8_expert_pack_fc2_out_list(at::TensorList down, at::TensorList down_scale_inv,
                                           at::IntArrayRef block_size, int64_t ep_size, int64_t ep_rank,
                                           int64_t etp_size, int64_t etp_rank, at::TensorList out) {
    const char* op = "fp8_expert_pack_fc2_out.list";
    expert_fc2_out_list(op, fp8_kind(op, block_size), down, down_scale_inv, ep_size, ep_rank, etp_size, etp_rank,
                        out);
  }

  static at::Tensor mxfp4_expert_pack_fc1(at::TensorList gate_blocks, at::TensorList gate_scales,
                                          at::TensorList up_blocks,
                                          at::TensorList up_scales, int64_t ep_size, int64_t ep_rank,
                                          int64_t etp_size, int64_t etp_rank, bool interleaved,
                                          std::optional<at::ScalarType> dtype) {
    return expert_fc1("mxfp4_expert_pack_fc1", mxfp4_kind(), gate_blocks, gate_scales, up_blocks, up_scales, ep_size,
                      ep_rank, etp_size, etp_rank, interleaved, dtype);
  }

  static void mxfp4_expert_pack_fc1_out(at::TensorList gate_blocks, at::TensorList gate_scales,
                                        at::TensorList up_blocks,
                                        at::TensorList up_scales, int64_t ep_size, int64_t ep_rank,
                                        int64_t etp_size, int64_t etp_rank, bool interleaved, const at::Tensor& out) {
    expert_fc1_out("mxfp4_expert_pack_fc1_out", mxfp4_kind(), gate_blocks, gate_scales, up_blocks, up_scales,
                   ep_size, ep_rank, etp_size, etp_rank, interleaved, out);
  }

  static void mxfp4_expert_pack_fc1_out_list(at::TensorList gate_blocks, at::TensorList gate_scales,
                                             at::TensorList up_blocks,
                                             at::TensorList up_scales, int64_t ep_size,
                                             int64_t ep_rank, int64_t etp_size, int64_t etp_rank, bool interleaved,
                                             at::TensorList out) {
    expert_fc1_out_list("mxfp4_expert_pack_fc1_out.list", mxfp4_kind(), gate_blocks, gate_scales, up_blocks,
                        up_scales, ep_size, ep_rank, etp_size, etp_rank, interleaved, out);
  }

  static at::Tensor mxfp4_expert_pack_fc2(at::TensorList down_blocks, at::TensorList down_scales, int64_t ep_size,
                                          int64_t ep_rank, int64_t etp_size, int64_t etp_rank,
                                          std::optional<at::ScalarType> dtype) {
    return expert_fc2("mxfp4_expert_pack_fc2", mxfp4_kind(), down_blocks, down_scales, ep_size, ep_rank, etp_size,
                      etp_rank, dtype);
  }

  static void mxfp4_expert_pack_fc2_out(at::TensorList down_blocks, at::TensorList down_scales, int64_t ep_size,
                                        int64_t ep_rank, int64_t etp_size, int64_t etp_rank, const at::Tensor& out) {
    expert_fc2_out("mxfp4_expert_pack_fc2_out", mxfp4_kind(), down_blocks, down_scales, ep_size, ep_rank, etp_size,
                   etp_rank, out);
  }

  static void mxfp4_expert_pack_fc2_out_list(at::TensorList down_blocks, at::TensorList down_scales, int64_t ep_size,
                                             int64_t ep_rank, int64_t etp_size, int64_t etp_rank,
                                             at::TensorList out) {
    expert_fc2_out_list("mxfp4_expert_pack_fc2_out.list", mxfp4_kind(), down_blocks, down_scales, ep_size, ep_rank,
                        etp_size, etp_rank, out);
  }

  // -- experts: export --------------------------------------------------------------------------------------------

  static void fc_shards_check(const char* op, at::TensorList shards, int64_t ep_size, int64_t etp_size) {
    TORCH_CHECK(!shards.empty(), op, ": shards is an empty list (expected ep_size*etp_size shards)");
    check_device_type(op, shards[0], "shards[0]", Exec::kDevice);
    expert_shards_check(op, shards, ep_size, etp_size);
    TORCH_CHECK(shards[0].dim() == 3, op, ": shards[0] has shape ", shards[0].sizes(),
                ", expected [E/ep, rows, cols] (expert weights; biases are not quantized)");
  }

  static void fc1_quant(const char* op, at::TensorList shards, int64_t ep_size, int64_t etp_size, Block b,
                        int32_t rule, at::TensorList gate, at::TensorList gate_s, at::TensorList up,
                        at::TensorList up_s) {
    const int64_t E = expert_unpack_num_experts(shards, ep_size);
    const auto shape = expert_fc1_expert_shape(shards, etp_size);
    for (const auto* l : {&gate, &up, &gate_s, &up_s}) {
      TORCH_CHECK(static_cast<int64_t>(l->size()) == E, op, ": got ", l->size(), " destination tensors for ", E,
                  " experts");
    }
    QPlan plan(op, false, wide_format(op, shards[0].scalar_type(), "shards' dtype"), shards[0].element_size(),
               shards[0].device());
    std::vector<View> gv, uv;
    for (int64_t e = 0; e < E; ++e) {
      gv.push_back(plan.add(fp8_target(op, gate[e], indexed("gate", e), gate_s[e], indexed("gate_scale_inv", e),
                                       shape[0], shape[1], b, shards[0], "shards[0]"),
                            indexed("gate", e)));
      uv.push_back(plan.add(fp8_target(op, up[e], indexed("up", e), up_s[e], indexed("up_scale_inv", e), shape[0],
                                       shape[1], b, shards[0], "shards[0]"),
                            indexed("up", e)));
    }
    expert_fc1_unpack_walk(shards, ep_size, etp_size, gv, uv, plan);
    Exec::quant(plan, rule);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fp8_expert_unpack_fc1(
      at::TensorList shards, at::IntArrayRef block_size, int64_t ep_size, int64_t etp_size,
      std::optional<at::ScalarType> dtype, c10::string_view rule) {
    const char* op = "fp8_expert_unpack_fc1";
    const Block b = block_of(op, block_size);
    const int32_t r = rule_of(op, rule);
    fc_shards_check(op, shards, ep_size, etp_size);
    expert_fc1_unpack_check(op, shards, ep_size, etp_size);
    const int64_t E = expert_unpack_num_experts(shards, ep_size);
    const auto shape = expert_fc1_expert_shape(shards, etp_size);
    const auto grid = scale_grid(shape[0], shape[1], b);
    const auto qo = shards[0].options().dtype(fp8_dtype(op, dtype));
    const auto so = shards[0].options().dtype(at::kFloat);
    at::Tensor g = at::empty({E, shape[0], shape[1]}, qo), u = at::empty({E, shape[0], shape[1]}, qo);
    at::Tensor gs = at::empty({E, grid[0], grid[1]}, so), us = at::empty({E, grid[0], grid[1]}, so);
    fc1_quant(op, shards, ep_size, etp_size, b, r, g.unbind(0), gs.unbind(0), u.unbind(0), us.unbind(0));
    return {g, gs, u, us};
  }

  static void fp8_expert_unpack_fc1_out(at::TensorList shards, at::IntArrayRef block_size, int64_t ep_size,
                                        int64_t etp_size, c10::string_view rule, at::TensorList gate,
                                        at::TensorList gate_scale_inv, at::TensorList up,
                                        at::TensorList up_scale_inv) {
    const char* op = "fp8_expert_unpack_fc1_out";
    const Block b = block_of(op, block_size);
    const int32_t r = rule_of(op, rule);
    fc_shards_check(op, shards, ep_size, etp_size);
    expert_fc1_unpack_check(op, shards, ep_size, etp_size);
    fc1_quant(op, shards, ep_size, etp_size, b, r, gate, gate_scale_inv, up, up_scale_inv);
  }

  static void fc2_quant(const char* op, at::TensorList shards, int64_t ep_size, int64_t etp_size, Block b,
                        int32_t rule, at::TensorList down, at::TensorList down_s) {
    const int64_t E = expert_unpack_num_experts(shards, ep_size);
    const auto shape = expert_fc2_expert_shape(shards, etp_size);
    for (const auto* l : {&down, &down_s}) {
      TORCH_CHECK(static_cast<int64_t>(l->size()) == E, op, ": got ", l->size(), " destination tensors for ", E,
                  " experts");
    }
    QPlan plan(op, false, wide_format(op, shards[0].scalar_type(), "shards' dtype"), shards[0].element_size(),
               shards[0].device());
    std::vector<View> dv;
    for (int64_t e = 0; e < E; ++e) {
      dv.push_back(plan.add(fp8_target(op, down[e], indexed("down", e), down_s[e], indexed("down_scale_inv", e),
                                       shape[0], shape[1], b, shards[0], "shards[0]"),
                            indexed("down", e)));
    }
    expert_fc2_unpack_walk(shards, ep_size, etp_size, dv, plan);
    Exec::quant(plan, rule);
  }

  static std::tuple<at::Tensor, at::Tensor> fp8_expert_unpack_fc2(at::TensorList shards, at::IntArrayRef block_size,
                                                                  int64_t ep_size, int64_t etp_size,
                                                                  std::optional<at::ScalarType> dtype,
                                                                  c10::string_view rule) {
    const char* op = "fp8_expert_unpack_fc2";
    const Block b = block_of(op, block_size);
    const int32_t r = rule_of(op, rule);
    fc_shards_check(op, shards, ep_size, etp_size);
    const int64_t E = expert_unpack_num_experts(shards, ep_size);
    const auto shape = expert_fc2_expert_shape(shards, etp_size);
    const auto grid = scale_grid(shape[0], shape[1], b);
    at::Tensor d = at::empty({E, shape[0], shape[1]}, shards[0].options().dtype(fp8_dtype(op, dtype)));
    at::Tensor ds = at::empty({E, grid[0], grid[1]}, shards[0].options().dtype(at::kFloat));
    fc2_quant(op, shards, ep_size, etp_size, b, r, d.unbind(0), ds.unbind(0));
    return {d, ds};
  }

  static void fp8_expert_unpack_fc2_out(at::TensorList shards, at::IntArrayRef block_size, int64_t ep_size,
                                        int64_t etp_size, c10::string_view rule, at::TensorList down,
                                        at::TensorList down_scale_inv) {
    const char* op = "fp8_expert_unpack_fc2_out";
    const Block b = block_of(op, block_size);
    const int32_t r = rule_of(op, rule);
    fc_shards_check(op, shards, ep_size, etp_size);
    fc2_quant(op, shards, ep_size, etp_size, b, r, down, down_scale_inv);
  }
};

// Registers every quantized op's kernel for one device.
template <class Exec>
void register_quant_ops(torch::Library& m) {
  using O = Ops<Exec>;
  m.impl("fp8_block_dequant", &O::fp8_block_dequant);
  m.impl("fp8_block_dequant_out", &O::fp8_block_dequant_out);
  m.impl("mxfp4_dequant", &O::mxfp4_dequant);
  m.impl("mxfp4_dequant_out", &O::mxfp4_dequant_out);
  m.impl("fp8_block_quant", &O::fp8_block_quant);
  m.impl("fp8_block_quant_out", &O::fp8_block_quant_out);
  m.impl("fp8_qkv_pack", &O::fp8_qkv_pack);
  m.impl("fp8_qkv_pack_out", &O::fp8_qkv_pack_out);
  m.impl("fp8_qkv_unpack", &O::fp8_qkv_unpack);
  m.impl("fp8_qkv_unpack_out", &O::fp8_qkv_unpack_out);
  m.impl("fp8_gate_up_pack", &O::fp8_gate_up_pack);
  m.impl("fp8_gate_up_pack_out", &O::fp8_gate_up_pack_out);
  m.impl("fp8_gate_up_unpack", &O::fp8_gate_up_unpack);
  m.impl("fp8_gate_up_unpack_out", &O::fp8_gate_up_unpack_out);
  m.impl("fp8_expert_pack_fc1", &O::fp8_expert_pack_fc1);
  m.impl("fp8_expert_pack_fc1_out", &O::fp8_expert_pack_fc1_out);
  m.impl("fp8_expert_pack_fc1_out.list", &O::fp8_expert_pack_fc1_out_list);
  m.impl("fp8_expert_pack_fc2", &O::fp8_expert_pack_fc2);
  m.impl("fp8_expert_pack_fc2_out", &O::fp8_expert_pack_fc2_out);
  m.impl("fp8_expert_pack_fc2_out.list", &O::fp8_expert_pack_fc2_out_list);
  m.impl("fp8_expert_unpack_fc1", &O::fp8_expert_unpack_fc1);
  m.impl("fp8_expert_unpack_fc1_out", &O::fp8_expert_unpack_fc1_out);
  m.impl("fp8_expert_unpack_fc2", &O::fp8_expert_unpack_fc2);
  m.impl("fp8_expert_unpack_fc2_out", &O::fp8_expert_unpack_fc2_out);
  m.impl("mxfp4_expert_pack_fc1", &O::mxfp4_expert_pack_fc1);
  m.impl("mxfp4_expert_pack_fc1_out", &O::mxfp4_expert_pack_fc1_out);
  m.impl("mxfp4_expert_pack_fc1_out.list", &O::mxfp4_expert_pack_fc1_out_list);
  m.impl("mxfp4_expert_pack_fc2", &O::mxfp4_expert_pack_fc2);
  m.impl("mxfp4_expert_pack_fc2_out", &O::mxfp4_expert_pack_fc2_out);
  m.impl("mxfp4_expert_pack_fc2_out.list", &O::mxfp4_expert_pack_fc2_out_list);
}

}  // namespace quant
}  // namespace bridge
