// Gated MLP (Megatron linear_fc1) <-> HF gate, up on CPU: allocation, the copy job and registration.
// Checks and the layout walk are in csrc/common/gate_up.h; the copy engine (per-row memcpy or cache-blocked tiles
// for strided and transposed views) in block_copy.h.
#include <torch/library.h>

#include <tuple>

#include "../common/gate_up.h"
#include "block_copy.h"

namespace bridge {

void gate_up_pack_out_cpu(const at::Tensor& gate, const at::Tensor& up, int64_t tp_size, int64_t tp_rank,
                          const at::Tensor& out) {
  const char* op = "gate_up_pack_out";
  const int64_t f = gate_up_pack_check(op, gate, up, tp_size, tp_rank);
  gate_up_pack_out_check(op, gate, f, out);
  cpu::CopyJob job(op, gate.element_size());
  gate_up_pack_walk(gate, up, f, tp_rank, out, job);
  job.run();
}

at::Tensor gate_up_pack_cpu(const at::Tensor& gate, const at::Tensor& up, int64_t tp_size, int64_t tp_rank) {
  const char* op = "gate_up_pack";
  const int64_t f = gate_up_pack_check(op, gate, up, tp_size, tp_rank);
  at::Tensor out = at::empty(gate_up_shard_shape(gate, f), gate.options());
  cpu::CopyJob job(op, gate.element_size());
  gate_up_pack_walk(gate, up, f, tp_rank, out, job);
  job.run();
  return out;
}

void gate_up_unpack_out_cpu(const at::Tensor& packed, int64_t tp_size, const at::Tensor& gate, const at::Tensor& up) {
  const char* op = "gate_up_unpack_out";
  const int64_t f = gate_up_unpack_check(op, packed, tp_size);
  gate_up_unpack_out_check(op, packed, tp_size, f, gate, up);
  cpu::CopyJob job(op, packed.element_size());
  gate_up_unpack_walk(packed, tp_size, f, gate, up, job);
  job.run();
}

std::tuple<at::Tensor, at::Tensor> gate_up_unpack_cpu(const at::Tensor& packed, int64_t tp_size) {
  const char* op = "gate_up_unpack";
  const int64_t f = gate_up_unpack_check(op, packed, tp_size);
  at::Tensor gate = at::empty(shape_with_rows(packed, f * tp_size), packed.options());
  at::Tensor up = at::empty(shape_with_rows(packed, f * tp_size), packed.options());
  cpu::CopyJob job(op, packed.element_size());
  gate_up_unpack_walk(packed, tp_size, f, gate, up, job);
  job.run();
  return {gate, up};
}

TORCH_LIBRARY_IMPL(bridge, CPU, m) {
  m.impl("gate_up_pack", &gate_up_pack_cpu);
  m.impl("gate_up_pack_out", &gate_up_pack_out_cpu);
  m.impl("gate_up_unpack", &gate_up_unpack_cpu);
  m.impl("gate_up_unpack_out", &gate_up_unpack_out_cpu);
}

}  // namespace bridge
