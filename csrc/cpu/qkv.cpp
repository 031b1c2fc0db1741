// Fused QKV (Megatron linear_qkv / linear_kv) <-> HF q, k, v on CPU: allocation, the copy job and registration.
// Geometry, checks and the layout walk are in csrc/common/qkv.h; the copy engine in block_copy.h.
#include <torch/library.h>

#include <tuple>

#include "../common/qkv.h"
#include "block_copy.h"

namespace bridge {

void qkv_pack_out_cpu(const std::optional<at::Tensor>& q, const at::Tensor& k, const at::Tensor& v,
                      int64_t num_heads, int64_t num_query_groups, int64_t head_dim, int64_t tp_size,
                      int64_t tp_rank, bool output_gate, const at::Tensor& out) {
  const char* op = "qkv_pack_out";
  const auto g = qkv_pack_check(op, q, k, v, num_heads, num_query_groups, head_dim, tp_size, tp_rank, output_gate);
  qkv_pack_out_check(op, g, k, tp_size, out);
  cpu::CopyJob job(op, k.element_size());
  qkv_pack_walk(g, q, k, v, tp_size, tp_rank, out, job);
  job.run();
}

at::Tensor qkv_pack_cpu(const std::optional<at::Tensor>& q, const at::Tensor& k, const at::Tensor& v,
                        int64_t num_heads, int64_t num_query_groups, int64_t head_dim, int64_t tp_size,
                        int64_t tp_rank, bool output_gate) {
  const char* op = "qkv_pack";
  const auto g = qkv_pack_check(op, q, k, v, num_heads, num_query_groups, head_dim, tp_size, tp_rank, output_gate);
  at::Tensor out = at::empty(qkv_shard_shape(g, k, tp_size), k.options());
  cpu::CopyJob job(op, k.element_size());
  qkv_pack_walk(g, q, k, v, tp_size, tp_rank, out, job);
  job.run();
  return out;
}

void qkv_unpack_out_cpu(const at::Tensor& packed, int64_t num_heads, int64_t num_query_groups, int64_t head_dim,
                        bool output_gate, const std::optional<at::Tensor>& q, const at::Tensor& k,
                        const at::Tensor& v) {
  const char* op = "qkv_unpack_out";
  const auto g = qkv_unpack_check(op, packed, num_heads, num_query_groups, head_dim, output_gate);
  qkv_unpack_out_check(op, g, packed, q, k, v);
  cpu::CopyJob job(op, packed.element_size());
  qkv_unpack_walk(g, packed, q, k, v, job);
  job.run();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_unpack_cpu(const at::Tensor& packed, int64_t num_heads,
                                                              int64_t num_query_groups, int64_t head_dim,
                                                              bool output_gate) {
  const char* op = "qkv_unpack";
  const auto g = qkv_unpack_check(op, packed, num_heads, num_query_groups, head_dim, output_gate);
  at::Tensor q = at::empty(shape_with_rows(packed, g.q_rows), packed.options());
  at::Tensor k = at::empty(shape_with_rows(packed, g.kv_rows), packed.options());
  at::Tensor v = at::empty(shape_with_rows(packed, g.kv_rows), packed.options());
  cpu::CopyJob job(op, packed.element_size());
  qkv_unpack_walk(g, packed, q, k, v, job);
  job.run();
  return {q, k, v};
}

TORCH_LIBRARY_IMPL(bridge, CPU, m) {
  m.impl("qkv_pack", &qkv_pack_cpu);
  m.impl("qkv_pack_out", &qkv_pack_out_cpu);
  m.impl("qkv_unpack", &qkv_unpack_cpu);
  m.impl("qkv_unpack_out", &qkv_unpack_out_cpu);
}

}  // namespace bridge
