// Gated-MLP gate/up pack/unpack on CUDA (conversion_semantics.md section 2): rank t's [gate_t; up_t], and the
// gathered [g0; u0; g1; u1; ...] back to (gate, up), in one launch for any strides and dtype.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../checks.h"
#include "copy_plan.cuh"

namespace bridge {
namespace {

using cuda_detail::CopyPlan;
using cuda_detail::View;

void gate_up_check_pair(const char* op, const at::Tensor& gate, const at::Tensor& up) {
  cuda_detail::check_cuda(op, gate, "gate");
  cuda_detail::check_like(op, up, "up", gate, "gate");
  TORCH_CHECK(gate.dim() == 1 || gate.dim() == 2, op, ": gate must be 1-D or 2-D, got shape ", gate.sizes());
  cuda_detail::check_shape(op, up, "up", gate.sizes());
}

}  // namespace

void gate_up_pack_out_cuda(const at::Tensor& gate, const at::Tensor& up, int64_t tp_size, int64_t tp_rank,
                           const at::Tensor& out) {
  const char* op = "gate_up_pack_out";
  gate_up_check_pair(op, gate, up);
  BRIDGE_CHECK_RANK(op, "tp_rank", tp_rank, "tp_size", tp_size);
  BRIDGE_CHECK_DIVISIBLE(op, "gate rows F", gate.size(0), "tp_size", tp_size);
  const int64_t f = gate.size(0) / tp_size;
  cuda_detail::check_like(op, out, "out", gate, "gate");
  cuda_detail::check_shape(op, out, "out", cuda_detail::with_rows(gate, 2 * f));
  CopyPlan plan(gate.element_size());
  const View o = View::of(out);
  plan.add(View::of(gate).rows(tp_rank * f, f), o.rows(0, f));
  plan.add(View::of(up).rows(tp_rank * f, f), o.rows(f, f));
  plan.launch(gate.device());
}

at::Tensor gate_up_pack_cuda(const at::Tensor& gate, const at::Tensor& up, int64_t tp_size, int64_t tp_rank) {
  const char* op = "gate_up_pack";
  gate_up_check_pair(op, gate, up);
  BRIDGE_CHECK_DIVISIBLE(op, "gate rows F", gate.size(0), "tp_size", tp_size);
  at::Tensor out = at::empty(cuda_detail::with_rows(gate, 2 * (gate.size(0) / tp_size)), gate.options());
  gate_up_pack_out_cuda(gate, up, tp_size, tp_rank, out);
  return out;
}

void gate_up_unpack_out_cuda(const at::Tensor& packed, int64_t tp_size, const at::Tensor& gate,
                             const at::Tensor& up) {
  const char* op = "gate_up_unpack_out";
  cuda_detail::check_cuda(op, packed, "packed");
  TORCH_CHECK(packed.dim() == 1 || packed.dim() == 2, op, ": packed must be 1-D or 2-D, got shape ",
              packed.sizes());
  TORCH_CHECK(tp_size >= 1, op, ": tp_size = ", tp_size, " must be >= 1");
  BRIDGE_CHECK_DIVISIBLE(op, "packed rows", packed.size(0), "2*tp_size", 2 * tp_size);
  const int64_t f = packed.size(0) / (2 * tp_size);
  cuda_detail::check_like(op, gate, "gate", packed, "packed");
  cuda_detail::check_like(op, up, "up", packed, "packed");
  cuda_detail::check_shape(op, gate, "gate", cuda_detail::with_rows(packed, tp_size * f));
  cuda_detail::check_shape(op, up, "up", cuda_detail::with_rows(packed, tp_size * f));
  CopyPlan plan(packed.element_size());
  const View p = View::of(packed), g = View::of(gate), u = View::of(up);
  for (int64_t i = 0; i < tp_size; ++i) {
    plan.add(p.rows(2 * i * f, f), g.rows(i * f, f));
    plan.add(p.rows(2 * i * f + f, f), u.rows(i * f, f));
  }
  plan.launch(packed.device());
}

std::tuple<at::Tensor, at::Tensor> gate_up_unpack_cuda(const at::Tensor& packed, int64_t tp_size) {
  const char* op = "gate_up_unpack";
  cuda_detail::check_cuda(op, packed, "packed");
  TORCH_CHECK(packed.dim() == 1 || packed.dim() == 2, op, ": packed must be 1-D or 2-D, got shape ",
              packed.sizes());
  BRIDGE_CHECK_DIVISIBLE(op, "packed rows", packed.size(0), "2*tp_size", 2 * tp_size);
  at::Tensor gate = at::empty(cuda_detail::with_rows(packed, packed.size(0) / 2), packed.options());
  at::Tensor up = at::empty_like(gate);
  gate_up_unpack_out_cuda(packed, tp_size, gate, up);
  return {gate, up};
}

TORCH_LIBRARY_IMPL(bridge, CUDA, m) {
  m.impl("gate_up_pack", &gate_up_pack_cuda);
  m.impl("gate_up_pack_out", &gate_up_pack_out_cuda);
  m.impl("gate_up_unpack", &gate_up_unpack_cuda);
  m.impl("gate_up_unpack_out", &gate_up_unpack_out_cuda);
}

}  // namespace bridge
