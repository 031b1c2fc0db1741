// Fused QKV pack/unpack on CUDA (conversion_semantics.md section 1): one launch per call that moves each group's
// q (and z), k and v rows between the HF tensors and the packed Megatron layout, for any strides and dtype.
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "copy_plan.cuh"

namespace bridge {
namespace {

using cuda_detail::CopyPlan;
using cuda_detail::View;

struct QkvDims {
  int64_t heads, groups, head_dim, n, q_rows, kv_rows, block, total;
  bool gate;
};

QkvDims qkv_dims(const char* op, int64_t H, int64_t G, int64_t d, bool gate) {
  TORCH_CHECK(G >= 1, op, ": num_query_groups = ", G, " must be >= 1");
  TORCH_CHECK(d >= 1, op, ": head_dim = ", d, " must be >= 1");
  TORCH_CHECK(H >= 0 && H % G == 0, op, ": num_heads = ", H, " is not a non-negative multiple of num_query_groups = ",
              G);
  QkvDims q{H, G, d, H / G, H * d * (gate ? 2 : 1), G * d, 0, 0, gate};
  q.block = (q.n * (gate ? 2 : 1) + 2) * d;
  q.total = G * q.block;
  return q;
}

// Checks HF-side q (optional), k, v against the dims; `ref` is the tensor whose dtype/device everything must match.
void check_hf(const char* op, const QkvDims& dims, const std::optional<at::Tensor>& q, const at::Tensor& k,
              const at::Tensor& v, bool q_required) {
  cuda_detail::check_cuda(op, k, "k");
  cuda_detail::check_like(op, v, "v", k, "k");
  TORCH_CHECK(k.dim() == 1 || k.dim() == 2, op, ": k must be 1-D or 2-D, got shape ", k.sizes());
  TORCH_CHECK(k.size(0) == dims.kv_rows, op, ": k has ", k.size(0), " rows, expected G*d = ", dims.groups, "*",
              dims.head_dim, " = ", dims.kv_rows);
  cuda_detail::check_shape(op, v, "v", k.sizes());
  if (q.has_value()) {
    cuda_detail::check_like(op, *q, "q", k, "k");
    cuda_detail::check_shape(op, *q, "q", cuda_detail::with_rows(k, dims.q_rows));
  } else {
    TORCH_CHECK(!q_required || dims.heads == 0, op, ": q is None but num_heads = ", dims.heads,
                " (None means the KV-only layout, num_heads = 0)");
  }
}

// Every (HF view, packed view) pair of groups [g0, g1); packed rows are counted from the start of `packed`.
template <typename F>
void for_each_piece(const QkvDims& dims, const View* q, const View& k, const View& v, const View& packed,
                    int64_t g0, int64_t g1, F&& f) {
  const int64_t n = dims.n, d = dims.head_dim;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = (g - g0) * dims.block;
    int64_t o = base;
    if (q != nullptr && n > 0) {
      if (dims.gate) {  // HF per head [q_h; z_h]; packed [q (n*d); z (n*d)]
        f(q->heads(g * n * 2 * d, n, 2 * d, d), packed.heads(o, n, d, d));
        f(q->heads(g * n * 2 * d + d, n, 2 * d, d), packed.heads(o + n * d, n, d, d));
        o += 2 * n * d;
      } else {
        f(q->rows(g * n * d, n * d), packed.rows(o, n * d));
        o += n * d;
      }
    }
    f(k.rows(g * d, d), packed.rows(o, d));
    f(v.rows(g * d, d), packed.rows(o + d, d));
  }
}

void pack_into(const char* op, const std::optional<at::Tensor>& q, const at::Tensor& k, const at::Tensor& v,
               const QkvDims& dims, int64_t tp_size, int64_t tp_rank, const at::Tensor& out) {
  const int64_t per = dims.groups / tp_size;
  CopyPlan plan(k.element_size());
  const View qv = q.has_value() ? View::of(*q) : View{};
  for_each_piece(dims, q.has_value() ? &qv : nullptr, View::of(k), View::of(v), View::of(out), tp_rank * per,
                 (tp_rank + 1) * per, [&](const View& hf, const View& pk) { plan.add(hf, pk); });
  plan.launch(k.device());
}

void check_tp(const char* op, const QkvDims& dims, int64_t tp_size, int64_t tp_rank) {
  BRIDGE_CHECK_RANK(op, "tp_rank", tp_rank, "tp_size", tp_size);
  BRIDGE_CHECK_DIVISIBLE(op, "num_query_groups", dims.groups, "tp_size", tp_size);
}

}  // namespace

at::Tensor qkv_pack_cuda(const std::optional<at::Tensor>& q, const at::Tensor& k, const at::Tensor& v,
                         int64_t num_heads, int64_t num_query_groups, int64_t head_dim, int64_t tp_size,
                         int64_t tp_rank, bool output_gate) {
  const char* op = "qkv_pack";
  const QkvDims dims = qkv_dims(op, num_heads, num_query_groups, head_dim, output_gate);
  check_hf(op, dims, q, k, v, true);
  check_tp(op, dims, tp_size, tp_rank);
  at::Tensor out = at::empty(cuda_detail::with_rows(k, dims.total / tp_size), k.options());
  pack_into(op, q, k, v, dims, tp_size, tp_rank, out);
  return out;
}

void qkv_pack_out_cuda(const std::optional<at::Tensor>& q, const at::Tensor& k, const at::Tensor& v,
                       int64_t num_heads, int64_t num_query_groups, int64_t head_dim, int64_t tp_size,
                       int64_t tp_rank, bool output_gate, const at::Tensor& out) {
  const char* op = "qkv_pack_out";
  const QkvDims dims = qkv_dims(op, num_heads, num_query_groups, head_dim, output_gate);
  check_hf(op, dims, q, k, v, true);
  check_tp(op, dims, tp_size, tp_rank);
  cuda_detail::check_like(op, out, "out", k, "k");
  cuda_detail::check_shape(op, out, "out", cuda_detail::with_rows(k, dims.total / tp_size));
  pack_into(op, q, k, v, dims, tp_size, tp_rank, out);
}

void qkv_unpack_out_cuda(const at::Tensor& packed, int64_t num_heads, int64_t num_query_groups, int64_t head_dim,
                         bool output_gate, const std::optional<at::Tensor>& q, const at::Tensor& k,
                         const at::Tensor& v) {
  const char* op = "qkv_unpack_out";
  const QkvDims dims = qkv_dims(op, num_heads, num_query_groups, head_dim, output_gate);
  cuda_detail::check_cuda(op, packed, "packed");
  TORCH_CHECK(packed.dim() == 1 || packed.dim() == 2, op, ": packed must be 1-D or 2-D, got shape ",
              packed.sizes());
  TORCH_CHECK(packed.size(0) == dims.total, op, ": packed has ", packed.size(0), " rows, expected (H",
              output_gate ? "*2" : "", " + 2G)*d = ", dims.total, " (H=", num_heads, ", G=", num_query_groups,
              ", d=", head_dim, ")");
  cuda_detail::check_like(op, k, "k", packed, "packed");
  cuda_detail::check_shape(op, k, "k", cuda_detail::with_rows(packed, dims.kv_rows));
  check_hf(op, dims, q, k, v, true);
  CopyPlan plan(packed.element_size());
  const View qv = q.has_value() ? View::of(*q) : View{};
  for_each_piece(dims, q.has_value() ? &qv : nullptr, View::of(k), View::of(v), View::of(packed), 0, dims.groups,
                 [&](const View& hf, const View& pk) { plan.add(pk, hf); });
  plan.launch(packed.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_unpack_cuda(const at::Tensor& packed, int64_t num_heads,
                                                               int64_t num_query_groups, int64_t head_dim,
                                                               bool output_gate) {
  const char* op = "qkv_unpack";
  const QkvDims dims = qkv_dims(op, num_heads, num_query_groups, head_dim, output_gate);
  cuda_detail::check_cuda(op, packed, "packed");
  TORCH_CHECK(packed.dim() == 1 || packed.dim() == 2, op, ": packed must be 1-D or 2-D, got shape ",
              packed.sizes());
  at::Tensor q = at::empty(cuda_detail::with_rows(packed, dims.q_rows), packed.options());
  at::Tensor k = at::empty(cuda_detail::with_rows(packed, dims.kv_rows), packed.options());
  at::Tensor v = at::empty(cuda_detail::with_rows(packed, dims.kv_rows), packed.options());
  qkv_unpack_out_cuda(packed, num_heads, num_query_groups, head_dim, output_gate,
                      dims.heads > 0 ? std::optional<at::Tensor>(q) : std::nullopt, k, v);
  return {q, k, v};
}

TORCH_LIBRARY_IMPL(bridge, CUDA, m) {
  m.impl("qkv_pack", &qkv_pack_cuda);
  m.impl("qkv_pack_out", &qkv_pack_out_cuda);
  m.impl("qkv_unpack", &qkv_unpack_cuda);
  m.impl("qkv_unpack_out", &qkv_unpack_out_cuda);
}

}  // namespace bridge
