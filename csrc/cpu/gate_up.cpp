// Gated MLP (Megatron linear_fc1) <-> HF gate, up on CPU.
//
// TP rank t holds [gate[t*f:(t+1)*f]; up[t*f:(t+1)*f]], f = F / tp; the gathered tensor is [g0; u0; g1; u1; ...].
// Row-interleaved (x[0::2]) and transposed (x.t()) HF layouts arrive as strided views and are handled by the copy
// engine (per-row memcpy or cache-blocked tiles).
#include <torch/library.h>

#include "../checks.h"
#include "../ops.h"
#include "block_copy.h"

namespace bridge {

int64_t gate_up_pack_check(const char* op, const at::Tensor& gate, const at::Tensor& up, int64_t tp_size,
                           int64_t tp_rank) {
  BRIDGE_CHECK_RANK(op, "tp_rank", tp_rank, "tp_size", tp_size);
  TORCH_CHECK(gate.dim() >= 1, op, ": gate must have at least 1 dim, got shape ", gate.sizes());
  check_like(op, up, "up", gate, "gate");
  TORCH_CHECK(up.size(0) == gate.size(0), op, ": up has ", up.size(0), " rows but gate has ", gate.size(0),
              " (gate and up must both be [F, ...])");
  BRIDGE_CHECK_DIVISIBLE(op, "F (gate rows)", gate.size(0), "tp_size", tp_size);
  return gate.size(0) / tp_size;
}

int64_t gate_up_unpack_check(const char* op, const at::Tensor& packed, int64_t tp_size) {
  TORCH_CHECK(tp_size >= 1, op, ": tp_size = ", tp_size, " must be >= 1");
  TORCH_CHECK(packed.dim() >= 1, op, ": packed must have at least 1 dim, got shape ", packed.sizes());
  BRIDGE_CHECK_DIVISIBLE(op, "packed rows", packed.size(0), "2*tp_size", 2 * tp_size);
  return packed.size(0) / (2 * tp_size);
}

namespace {

using cpu::View;

std::vector<int64_t> with_rows(const at::Tensor& like, int64_t rows) {
  std::vector<int64_t> s(like.sizes().begin(), like.sizes().end());
  s[0] = rows;
  return s;
}

void pack_into(const at::Tensor& gate, const at::Tensor& up, int64_t f, int64_t tp_rank, const at::Tensor& out) {
  const View gv = cpu::src_view(gate), uv = cpu::src_view(up), ov = cpu::dst_view(out);
  std::vector<cpu::Pair> pairs;
  cpu::add_pairs(pairs, gv.narrow(0, tp_rank * f, f), ov.narrow(0, 0, f));
  cpu::add_pairs(pairs, uv.narrow(0, tp_rank * f, f), ov.narrow(0, f, f));
  cpu::run_pairs(pairs, ov.elem);
}

void unpack_into(const at::Tensor& packed, int64_t tp_size, int64_t f, const at::Tensor& gate, const at::Tensor& up) {
  const View pv = cpu::src_view(packed), gv = cpu::dst_view(gate), uv = cpu::dst_view(up);
  std::vector<cpu::Pair> pairs;
  for (int64_t t = 0; t < tp_size; ++t) {
    cpu::add_pairs(pairs, pv.narrow(0, 2 * t * f, f), gv.narrow(0, t * f, f));
    cpu::add_pairs(pairs, pv.narrow(0, 2 * t * f + f, f), uv.narrow(0, t * f, f));
  }
  cpu::run_pairs(pairs, pv.elem);
}

}  // namespace

at::Tensor gate_up_pack_cpu(const at::Tensor& gate, const at::Tensor& up, int64_t tp_size, int64_t tp_rank) {
  const int64_t f = gate_up_pack_check("gate_up_pack", gate, up, tp_size, tp_rank);
  at::Tensor out = at::empty(with_rows(gate, 2 * f), gate.options());
  pack_into(gate, up, f, tp_rank, out);
  return out;
}

void gate_up_pack_out_cpu(const at::Tensor& gate, const at::Tensor& up, int64_t tp_size, int64_t tp_rank,
                          const at::Tensor& out) {
  const char* op = "gate_up_pack_out";
  const int64_t f = gate_up_pack_check(op, gate, up, tp_size, tp_rank);
  BRIDGE_CHECK_SAME_DEVICE(op, out, "out", gate, "gate");
  BRIDGE_CHECK_SAME_DTYPE(op, out, "out", gate, "gate");
  check_shape(op, out, "out", with_rows(gate, 2 * f));
  pack_into(gate, up, f, tp_rank, out);
}

std::tuple<at::Tensor, at::Tensor> gate_up_unpack_cpu(const at::Tensor& packed, int64_t tp_size) {
  const int64_t f = gate_up_unpack_check("gate_up_unpack", packed, tp_size);
  at::Tensor gate = at::empty(with_rows(packed, f * tp_size), packed.options());
  at::Tensor up = at::empty(with_rows(packed, f * tp_size), packed.options());
  unpack_into(packed, tp_size, f, gate, up);
  return {gate, up};
}

void gate_up_unpack_out_cpu(const at::Tensor& packed, int64_t tp_size, const at::Tensor& gate, const at::Tensor& up) {
  const char* op = "gate_up_unpack_out";
  const int64_t f = gate_up_unpack_check(op, packed, tp_size);
  check_like(op, gate, "gate", packed, "packed");
  check_like(op, up, "up", packed, "packed");
  check_rows(op, gate, "gate", f * tp_size, "packed rows / 2");
  check_rows(op, up, "up", f * tp_size, "packed rows / 2");
  unpack_into(packed, tp_size, f, gate, up);
}

TORCH_LIBRARY_IMPL(bridge, CPU, m) {
  m.impl("gate_up_pack", &gate_up_pack_cpu);
  m.impl("gate_up_pack_out", &gate_up_pack_out_cpu);
  m.impl("gate_up_unpack", &gate_up_unpack_cpu);
  m.impl("gate_up_unpack_out", &gate_up_unpack_out_cpu);
}

}  // namespace bridge
