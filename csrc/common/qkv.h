// Fused QKV (Megatron linear_qkv / linear_kv) <-> HF q, k, v: geometry, argument checks and layout walk, shared by
// csrc/cpu/qkv.cpp and csrc/cuda/qkv.cu (conversion_semantics.md section 1).
//
// Packed row layout: G group blocks of P rows, block g = [q heads of group g (n*d rows); k_g (d); v_g (d)]; with the
// output gate [q (n*d); z (n*d); k_g; v_g] where HF q holds per head [q_h; z_h]. TP rank t holds rows
// [t*G*P/tp, (t+1)*G*P/tp) of the packed tensor (megatron's column-parallel split): whole groups
// [t*G/tp, (t+1)*G/tp) when tp divides G, and the (t mod tp/G)-th of tp/G equal slices of group t / (tp/G)'s block
// when G divides tp (fewer key/value heads than TP ranks). Tensors have any trailing dims (weights [rows, D], biases
// [rows], ...) and any strides.
#pragma once
#include <algorithm>
#include <optional>

#include "../checks.h"
#include "strided.h"

namespace bridge {

struct QkvGeometry {
  int64_t heads, groups, head_dim;
  int64_t n;                 // query heads per group, H / G
  int64_t q_rows_per_group;  // n*d, or 2*n*d with the output gate
  int64_t block_rows;        // P = q_rows_per_group + 2*d
  int64_t q_rows;            // H*d (2*H*d with the output gate)
  int64_t kv_rows;           // G*d
  int64_t packed_rows;       // G*P
  bool output_gate;
};

inline QkvGeometry qkv_geometry(const char* op, int64_t num_heads, int64_t num_query_groups, int64_t head_dim,
                                bool output_gate) {
  TORCH_CHECK(num_query_groups >= 1, op, ": num_query_groups = ", num_query_groups, " must be >= 1");
  TORCH_CHECK(head_dim >= 1, op, ": head_dim = ", head_dim, " must be >= 1");
  TORCH_CHECK(num_heads >= 0, op, ": num_heads = ", num_heads, " must be >= 0 (0 for a KV-only layout)");
  if (num_heads > 0) BRIDGE_CHECK_DIVISIBLE(op, "num_heads", num_heads, "num_query_groups", num_query_groups);
  QkvGeometry g;
  g.heads = num_heads;
  g.groups = num_query_groups;
  g.head_dim = head_dim;
  g.output_gate = output_gate;
  g.n = num_heads / num_query_groups;
  g.q_rows_per_group = g.n * head_dim * (output_gate ? 2 : 1);
  g.block_rows = g.q_rows_per_group + 2 * head_dim;
  g.q_rows = num_heads * head_dim * (output_gate ? 2 : 1);
  g.kv_rows = num_query_groups * head_dim;
  g.packed_rows = num_query_groups * g.block_rows;
  return g;
}

inline bool qkv_has_q(const std::optional<at::Tensor>& q) { return q.has_value() && q->defined(); }

// q (optional), k, v of the HF side against the geometry; `ref` / `ref_name` is the tensor whose dtype, device and
// trailing dims they must share (k for pack, packed for unpack).
inline void qkv_check_hf(const char* op, const QkvGeometry& g, const std::optional<at::Tensor>& q,
                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& ref, const char* ref_name) {
  check_like(op, k, "k", ref, ref_name);
  check_like(op, v, "v", ref, ref_name);
  check_rows(op, k, "k", g.kv_rows, "G*d");
  check_rows(op, v, "v", g.kv_rows, "G*d");
  if (qkv_has_q(q)) {
    check_like(op, *q, "q", ref, ref_name);
    check_rows(op, *q, "q", g.q_rows, g.output_gate ? "2*H*d" : "H*d");
  } else {
    TORCH_CHECK(g.heads == 0, op, ": q is None but num_heads = ", g.heads,
                " (q may be None only for a KV-only layout with num_heads = 0)");
  }
}

// The TP split of the packed rows: tp divides G (whole groups per rank), or G divides tp and the tp/G slices of a
// group block have whole rows (megatron-core's layout for fewer key/value heads than TP ranks).
inline void qkv_check_tp(const char* op, const QkvGeometry& g, int64_t tp_size, int64_t tp_rank) {
  BRIDGE_CHECK_RANK(op, "tp_rank", tp_rank, "tp_size", tp_size);
  if (g.groups >= tp_size) {
    BRIDGE_CHECK_DIVISIBLE(op, "num_query_groups", g.groups, "tp_size", tp_size);
  } else {
    TORCH_CHECK(tp_size % g.groups == 0, op, ": num_query_groups = ", g.groups, " is not divisible by tp_size = ",
                tp_size, ", nor tp_size by num_query_groups (fewer query groups than TP ranks need tp_size to be a "
                "multiple of num_query_groups)");
    const int64_t split = tp_size / g.groups;
    TORCH_CHECK(g.block_rows % split == 0, op, ": a query group's ", g.block_rows, " packed rows ((n + 2)*d",
                g.output_gate ? " with n doubled by the output gate" : "", ") do not split into tp_size / ",
                "num_query_groups = ", split, " equal parts");
  }
}

// Validates qkv_pack(_out) inputs; returns the geometry. The shard has packed_rows / tp_size rows.
inline QkvGeometry qkv_pack_check(const char* op, const std::optional<at::Tensor>& q, const at::Tensor& k,
                                  const at::Tensor& v, int64_t num_heads, int64_t num_query_groups, int64_t head_dim,
                                  int64_t tp_size, int64_t tp_rank, bool output_gate) {
  QkvGeometry g = qkv_geometry(op, num_heads, num_query_groups, head_dim, output_gate);
  qkv_check_tp(op, g, tp_size, tp_rank);
  qkv_check_hf(op, g, q, k, v, k, "k");
  return g;
}

// Shape of TP rank's shard: [packed_rows / tp_size, trailing dims of k...].
inline std::vector<int64_t> qkv_shard_shape(const QkvGeometry& g, const at::Tensor& k, int64_t tp_size) {
  return shape_with_rows(k, g.packed_rows / tp_size);
}

// Validates the destination of qkv_pack_out.
inline void qkv_pack_out_check(const char* op, const QkvGeometry& g, const at::Tensor& k, int64_t tp_size,
                               const at::Tensor& out) {
  check_out(op, out, "out", qkv_shard_shape(g, k, tp_size), k, "k");
}

// Validates the packed tensor of qkv_unpack(_out); returns the geometry.
inline QkvGeometry qkv_unpack_check(const char* op, const at::Tensor& packed, int64_t num_heads,
                                    int64_t num_query_groups, int64_t head_dim, bool output_gate) {
  QkvGeometry g = qkv_geometry(op, num_heads, num_query_groups, head_dim, output_gate);
  check_rows(op, packed, "packed", g.packed_rows, output_gate ? "(2*H + 2*G)*d" : "(H + 2*G)*d");
  return g;
}

// Validates the destinations of qkv_unpack_out.
inline void qkv_unpack_out_check(const char* op, const QkvGeometry& g, const at::Tensor& packed,
                                 const std::optional<at::Tensor>& q, const at::Tensor& k, const at::Tensor& v) {
  qkv_check_hf(op, g, q, k, v, packed, "packed");
}

// The layout walk: emit(src, dst) once per row block between the HF views and rows [r0, r1) of the full packed
// tensor, whose row r0 is row 0 of `packed`. to_packed: HF -> packed (pack), else packed -> HF (unpack). q may be
// null when the geometry has no query heads. A block cut by the window is emitted in its covered part only (with
// the output gate, head by head).
template <class Emit>
void qkv_walk(const QkvGeometry& g, int64_t r0, int64_t r1, const View* q, const View& k, const View& v,
              const View& packed, bool to_packed, Emit&& emit) {
  const int64_t n = g.n, d = g.head_dim, P = g.block_rows;
  auto move = [&](const View& hf, const View& pk) {
    if (to_packed) {
      emit(hf, pk);
    } else {
      emit(pk, hf);
    }
  };
  // packed rows [at, at + rows) <-> HF rows [hf_row, hf_row + rows) of `hf`, clipped to the window
  auto span = [&](const View& hf, int64_t hf_row, int64_t at, int64_t rows) {
    const int64_t lo = std::max(at, r0), hi = std::min(at + rows, r1);
    if (lo < hi) move(hf.rows(hf_row + (lo - at), hi - lo), packed.rows(lo - r0, hi - lo));
  };
  for (int64_t grp = r0 / P; grp * P < r1; ++grp) {
    const int64_t base = grp * P;
    if (q != nullptr && n > 0) {
      if (!g.output_gate) {
        span(*q, grp * n * d, base, n * d);
      } else if (base >= r0 && base + 2 * n * d <= r1) {  // HF per head [q_h; z_h] -> packed [q (n*d); z (n*d)]
        move(q->heads(grp * n * 2 * d, n, 2 * d, d), packed.heads(base - r0, n, d, d));
        move(q->heads(grp * n * 2 * d + d, n, 2 * d, d), packed.heads(base - r0 + n * d, n, d, d));
      } else {  // the window cuts this group's q / z rows: head by head
        for (int64_t s = 0; s < n; ++s) {
          span(*q, (grp * n + s) * 2 * d, base + s * d, d);
          span(*q, (grp * n + s) * 2 * d + d, base + (n + s) * d, d);
        }
      }
    }
    span(k, grp * d, base + g.q_rows_per_group, d);
    span(v, grp * d, base + g.q_rows_per_group + d, d);
  }
}

// qkv_pack(_out): TP rank tp_rank's rows of the packed tensor from the HF tensors into `out` (checked by
// qkv_pack_check).
template <class Emit>
void qkv_pack_walk(const QkvGeometry& g, const std::optional<at::Tensor>& q, const at::Tensor& k,
                   const at::Tensor& v, int64_t tp_size, int64_t tp_rank, const at::Tensor& out, Emit&& emit) {
  const int64_t rows = g.packed_rows / tp_size;
  const bool has_q = qkv_has_q(q) && g.heads > 0;
  const View qv = has_q ? src_view(*q) : View{};
  qkv_walk(g, tp_rank * rows, (tp_rank + 1) * rows, has_q ? &qv : nullptr, src_view(k), src_view(v), dst_view(out),
           true, emit);
}

// qkv_unpack(_out): the full packed tensor into q (optional), k, v.
template <class Emit>
void qkv_unpack_walk(const QkvGeometry& g, const at::Tensor& packed, const std::optional<at::Tensor>& q,
                     const at::Tensor& k, const at::Tensor& v, Emit&& emit) {
  const bool has_q = qkv_has_q(q) && g.heads > 0;
  const View qv = has_q ? dst_view(*q) : View{};
  qkv_walk(g, 0, g.packed_rows, has_q ? &qv : nullptr, dst_view(k), dst_view(v), src_view(packed), false, emit);
}

}  // namespace bridge
