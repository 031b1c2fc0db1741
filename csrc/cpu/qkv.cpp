// Fused QKV (Megatron linear_qkv / linear_kv) <-> HF q, k, v on CPU.
//
// Packed row layout: G group blocks of P rows, block g = [q heads of group g (n*d rows); k_g (d); v_g (d)]; with the
// output gate [q (n*d); z (n*d); k_g; v_g] where HF q holds per head [q_h; z_h]. TP rank t holds groups
// [t*G/tp, (t+1)*G/tp). Each group contributes a few row blocks; they are copied in one parallel pass.
#include <torch/library.h>

#include "../checks.h"
#include "../ops.h"
#include "block_copy.h"

namespace bridge {

QkvGeometry qkv_geometry(const char* op, int64_t num_heads, int64_t num_query_groups, int64_t head_dim,
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
  const int64_t n = num_heads / num_query_groups;
  g.q_rows_per_group = n * head_dim * (output_gate ? 2 : 1);
  g.block_rows = g.q_rows_per_group + 2 * head_dim;
  g.q_rows = num_heads * head_dim * (output_gate ? 2 : 1);
  g.kv_rows = num_query_groups * head_dim;
  g.packed_rows = num_query_groups * g.block_rows;
  return g;
}

QkvGeometry qkv_pack_check(const char* op, const std::optional<at::Tensor>& q, const at::Tensor& k,
                           const at::Tensor& v, int64_t num_heads, int64_t num_query_groups, int64_t head_dim,
                           int64_t tp_size, int64_t tp_rank, bool output_gate) {
  QkvGeometry g = qkv_geometry(op, num_heads, num_query_groups, head_dim, output_gate);
  BRIDGE_CHECK_RANK(op, "tp_rank", tp_rank, "tp_size", tp_size);
  BRIDGE_CHECK_DIVISIBLE(op, "num_query_groups", num_query_groups, "tp_size", tp_size);
  TORCH_CHECK(k.dim() >= 1, op, ": k must have at least 1 dim, got shape ", k.sizes());
  check_like(op, v, "v", k, "k");
  check_rows(op, k, "k", g.kv_rows, "G*d");
  check_rows(op, v, "v", g.kv_rows, "G*d");
  const bool has_q = q.has_value() && q->defined();
  if (has_q) {
    check_like(op, *q, "q", k, "k");
    check_rows(op, *q, "q", g.q_rows, output_gate ? "2*H*d" : "H*d");
  } else {
    TORCH_CHECK(num_heads == 0, op, ": q is None but num_heads = ", num_heads,
                " (q may be None only for a KV-only layout with num_heads = 0)");
  }
  return g;
}

QkvGeometry qkv_unpack_check(const char* op, const at::Tensor& packed, int64_t num_heads, int64_t num_query_groups,
                             int64_t head_dim, bool output_gate) {
  QkvGeometry g = qkv_geometry(op, num_heads, num_query_groups, head_dim, output_gate);
  check_rows(op, packed, "packed", g.packed_rows, output_gate ? "(2*H + 2*G)*d" : "(H + 2*G)*d");
  return g;
}

namespace {

using cpu::View;

// Appends the row blocks of groups [g0, g1): packed rows (relative to `packed`, starting at group g0) <-> q, k, v.
void plan_groups(std::vector<cpu::Pair>& pairs, const QkvGeometry& g, int64_t g0, int64_t g1, const View& packed,
                 const View* q, const View& k, const View& v, bool to_packed) {
  const int64_t d = g.head_dim;
  const int64_t n = g.heads / g.groups;
  auto add = [&](const View& hf, int64_t hf_row, int64_t packed_row, int64_t rows) {
    if (to_packed) {
      cpu::add_pairs(pairs, hf.narrow(0, hf_row, rows), packed.narrow(0, packed_row, rows));
    } else {
      cpu::add_pairs(pairs, packed.narrow(0, packed_row, rows), hf.narrow(0, hf_row, rows));
    }
  };
  for (int64_t grp = g0; grp < g1; ++grp) {
    const int64_t base = (grp - g0) * g.block_rows;
    if (n > 0) {
      if (!g.output_gate) {
        add(*q, grp * n * d, base, n * d);
      } else {
        for (int64_t s = 0; s < n; ++s) {
          const int64_t head = grp * n + s;
          add(*q, head * 2 * d, base + s * d, d);              // q_h
          add(*q, head * 2 * d + d, base + (n + s) * d, d);    // z_h
        }
      }
    }
    add(k, grp * d, base + g.q_rows_per_group, d);
    add(v, grp * d, base + g.q_rows_per_group + d, d);
  }
}

void pack_into(const std::optional<at::Tensor>& q, const at::Tensor& k, const at::Tensor& v, const QkvGeometry& g,
               int64_t tp_size, int64_t tp_rank, const at::Tensor& out) {
  const int64_t local = g.groups / tp_size;
  const View kv = cpu::src_view(k), vv = cpu::src_view(v), ov = cpu::dst_view(out);
  View qv;
  const bool has_q = q.has_value() && q->defined() && g.heads > 0;
  if (has_q) qv = cpu::src_view(*q);
  std::vector<cpu::Pair> pairs;
  plan_groups(pairs, g, tp_rank * local, (tp_rank + 1) * local, ov, has_q ? &qv : nullptr, kv, vv, true);
  cpu::run_pairs(pairs, ov.elem);
}

std::vector<int64_t> with_rows(const at::Tensor& like, int64_t rows) {
  std::vector<int64_t> s(like.sizes().begin(), like.sizes().end());
  s[0] = rows;
  return s;
}

}  // namespace

at::Tensor qkv_pack_cpu(const std::optional<at::Tensor>& q, const at::Tensor& k, const at::Tensor& v,
                        int64_t num_heads, int64_t num_query_groups, int64_t head_dim, int64_t tp_size,
                        int64_t tp_rank, bool output_gate) {
  const auto g = qkv_pack_check("qkv_pack", q, k, v, num_heads, num_query_groups, head_dim, tp_size, tp_rank,
                                output_gate);
  at::Tensor out = at::empty(with_rows(k, g.packed_rows / tp_size), k.options());
  pack_into(q, k, v, g, tp_size, tp_rank, out);
  return out;
}

void qkv_pack_out_cpu(const std::optional<at::Tensor>& q, const at::Tensor& k, const at::Tensor& v,
                      int64_t num_heads, int64_t num_query_groups, int64_t head_dim, int64_t tp_size,
                      int64_t tp_rank, bool output_gate, const at::Tensor& out) {
  const char* op = "qkv_pack_out";
  const auto g = qkv_pack_check(op, q, k, v, num_heads, num_query_groups, head_dim, tp_size, tp_rank, output_gate);
  BRIDGE_CHECK_SAME_DEVICE(op, out, "out", k, "k");
  BRIDGE_CHECK_SAME_DTYPE(op, out, "out", k, "k");
  check_shape(op, out, "out", with_rows(k, g.packed_rows / tp_size));
  pack_into(q, k, v, g, tp_size, tp_rank, out);
}

namespace {

void unpack_into(const at::Tensor& packed, const QkvGeometry& g, const at::Tensor* q, const at::Tensor& k,
                 const at::Tensor& v) {
  const View pv = cpu::src_view(packed), kv = cpu::dst_view(k), vv = cpu::dst_view(v);
  View qv;
  if (q != nullptr) qv = cpu::dst_view(*q);
  std::vector<cpu::Pair> pairs;
  plan_groups(pairs, g, 0, g.groups, pv, q != nullptr ? &qv : nullptr, kv, vv, false);
  cpu::run_pairs(pairs, pv.elem);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_unpack_cpu(const at::Tensor& packed, int64_t num_heads,
                                                              int64_t num_query_groups, int64_t head_dim,
                                                              bool output_gate) {
  const auto g = qkv_unpack_check("qkv_unpack", packed, num_heads, num_query_groups, head_dim, output_gate);
  at::Tensor q = at::empty(with_rows(packed, g.q_rows), packed.options());
  at::Tensor k = at::empty(with_rows(packed, g.kv_rows), packed.options());
  at::Tensor v = at::empty(with_rows(packed, g.kv_rows), packed.options());
  unpack_into(packed, g, g.heads > 0 ? &q : nullptr, k, v);
  return {q, k, v};
}

void qkv_unpack_out_cpu(const at::Tensor& packed, int64_t num_heads, int64_t num_query_groups, int64_t head_dim,
                        bool output_gate, const std::optional<at::Tensor>& q, const at::Tensor& k,
                        const at::Tensor& v) {
  const char* op = "qkv_unpack_out";
  const auto g = qkv_unpack_check(op, packed, num_heads, num_query_groups, head_dim, output_gate);
  check_like(op, k, "k", packed, "packed");
  check_like(op, v, "v", packed, "packed");
  check_rows(op, k, "k", g.kv_rows, "G*d");
  check_rows(op, v, "v", g.kv_rows, "G*d");
  const bool has_q = q.has_value() && q->defined();
  if (has_q) {
    check_like(op, *q, "q", packed, "packed");
    check_rows(op, *q, "q", g.q_rows, output_gate ? "2*H*d" : "H*d");
  } else {
    TORCH_CHECK(num_heads == 0, op, ": q is None but num_heads = ", num_heads,
                " (q may be None only for a KV-only layout with num_heads = 0)");
  }
  unpack_into(packed, g, has_q && g.heads > 0 ? &*q : nullptr, k, v);
}

TORCH_LIBRARY_IMPL(bridge, CPU, m) {
  m.impl("qkv_pack", &qkv_pack_cpu);
  m.impl("qkv_pack_out", &qkv_pack_out_cpu);
  m.impl("qkv_unpack", &qkv_unpack_cpu);
  m.impl("qkv_unpack_out", &qkv_unpack_out_cpu);
}

}  // namespace bridge
