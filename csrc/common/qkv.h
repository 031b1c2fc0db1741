// Fused QKV (Megatron linear_qkv / linear_kv) <-> HF q, k, v: geometry, argument checks and layout walk, shared by
// csrc/cpu/qkv.cpp and csrc/cuda/qkv.cu (conversion_semantics.md section 1).
//
// Packed row layout: G group blocks of P rows, block g = [q heads of group g (n*d rows); k_g (d); v_g (d)]; with the
// output gate [q (n*d); z (n*d); k_g; v_g] where HF q holds per head [q_h; z_h]. TP rank t holds groups
// [t*G/tp, (t+1)*G/tp). Tensors have any trailing dims (weights [rows, D], biases [rows], ...) and any strides.
#pragma once
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

// Validates qkv_pack(_out) inputs; returns the geometry. The shard has packed_rows / tp_size rows.
inline QkvGeometry qkv_pack_check(const char* op, const std::optional<at::Tensor>& q, const at::Tensor& k,
                                  const at::Tensor& v, int64_t num_heads, int64_t num_query_groups, int64_t head_dim,
                                  int64_t tp_size, int64_t tp_rank, bool output_gate) {
  QkvGeometry g = qkv_geometry(op, num_heads, num_query_groups, head_dim, output_gate);
  BRIDGE_CHECK_RANK(op, "tp_rank", tp_rank, "tp_size", tp_size);
  BRIDGE_CHECK_DIVISIBLE(op, "num_query_groups", num_query_groups, "tp_size", tp_size);
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

// The layout walk: for groups [g0, g1), emit(src, dst) once per row block, between the HF views and `packed`
// (whose row 0 is the first row of group g0). to_packed: HF -> packed (pack), else packed -> HF (unpack).
// q may be null when the geometry has no query heads.
template <class Emit>
void qkv_walk(const QkvGeometry& g, int64_t g0, int64_t g1, const View* q, const View& k, const View& v,
              const View& packed, bool to_packed, Emit&& emit) {
  const int64_t n = g.n, d = g.head_dim;
  auto move = [&](const View& hf, const View& pk) {
    if (to_packed) {
      emit(hf, pk);
    } else {
      emit(pk, hf);
    }
  };
  for (int64_t grp = g0; grp < g1; ++grp) {
    const int64_t base = (grp - g0) * g.block_rows;
    if (q != nullptr && n > 0) {
      if (g.output_gate) {  // HF per head [q_h; z_h] -> packed [q (n*d); z (n*d)]
        move(q->heads(grp * n * 2 * d, n, 2 * d, d), packed.heads(base, n, d, d));
        move(q->heads(grp * n * 2 * d + d, n, 2 * d, d), packed.heads(base + n * d, n, d, d));
      } else {
        move(q->rows(grp * n * d, n * d), packed.rows(base, n * d));
      }
    }
    move(k.rows(grp * d, d), packed.rows(base + g.q_rows_per_group, d));
    move(v.rows(grp * d, d), packed.rows(base + g.q_rows_per_group + d, d));
  }
}

// qkv_pack(_out): TP rank tp_rank's groups of the HF tensors into `out` (checked by qkv_pack_check).
template <class Emit>
void qkv_pack_walk(const QkvGeometry& g, const std::optional<at::Tensor>& q, const at::Tensor& k,
                   const at::Tensor& v, int64_t tp_size, int64_t tp_rank, const at::Tensor& out, Emit&& emit) {
  const int64_t local = g.groups / tp_size;
  const bool has_q = qkv_has_q(q) && g.heads > 0;
  const View qv = has_q ? src_view(*q) : View{};
  qkv_walk(g, tp_rank * local, (tp_rank + 1) * local, has_q ? &qv : nullptr, src_view(k), src_view(v),
           dst_view(out), true, emit);
}

// qkv_unpack(_out): the full packed tensor into q (optional), k, v.
template <class Emit>
void qkv_unpack_walk(const QkvGeometry& g, const at::Tensor& packed, const std::optional<at::Tensor>& q,
                     const at::Tensor& k, const at::Tensor& v, Emit&& emit) {
  const bool has_q = qkv_has_q(q) && g.heads > 0;
  const View qv = has_q ? dst_view(*q) : View{};
  qkv_walk(g, 0, g.groups, has_q ? &qv : nullptr, dst_view(k), dst_view(v), src_view(packed), false, emit);
}

}  // namespace bridge
