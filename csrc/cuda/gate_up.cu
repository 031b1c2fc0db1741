// Gated MLP (Megatron linear_fc1) <-> HF gate, up on CUDA: allocation, the copy plan (one launch per kind of
// segment) and registration. Checks and the layout walk are in csrc/common/gate_up.h.
#include <torch/library.h>

#include <tuple>

#include "../common/gate_up.h"
#include "copy_plan.cuh"

namespace bridge {

void gate_up_pack_out_cuda(const at::Tensor& gate, const at::Tensor& up, int64_t tp_size, int64_t tp_rank,
                           const at::Tensor& out) {
  const char* op = "gate_up_pack_out";
  check_device_type(op, gate, "gate", c10::DeviceType::CUDA);
  const int64_t f = gate_up_pack_check(op, gate, up, tp_size, tp_rank);
  gate_up_pack_out_check(op, gate, f, out);
  cuda_detail::CopyPlan plan(op, gate.element_size());
  gate_up_pack_walk(gate, up, f, tp_rank, out, plan);
  plan.launch(gate.device());
}

at::Tensor gate_up_pack_cuda(const at::Tensor& gate, const at::Tensor& up, int64_t tp_size, int64_t tp_rank) {
  const char* op = "gate_up_pack";
  check_device_type(op, gate, "gate", c10::DeviceType::CUDA);
  const int64_t f = gate_up_pack_check(op, gate, up, tp_size, tp_rank);
  at::Tensor out = at::empty(gate_up_shard_shape(gate, f), gate.options());
  cuda_detail::CopyPlan plan(op, gate.element_size());
  gate_up_pack_walk(gate, up, f, tp_rank, out, plan);
  plan.launch(gate.device());
  return out;
}

void gate_up_unpack_out_cuda(const at::Tensor& packed, int64_t tp_size, const at::Tensor& gate,
                             const at::Tensor& up) {
  const char* op = "gate_up_unpack_out";
  check_device_type(op, packed, "packed", c10::DeviceType::CUDA);
  const int64_t f = gate_up_unpack_check(op, packed, tp_size);
  gate_up_unpack_out_check(op, packed, tp_size, f, gate, up);
  cuda_detail::CopyPlan plan(op, packed.element_size());
  gate_up_unpack_walk(packed, tp_size, f, gate, up, plan);
  plan.launch(packed.device());
}

std::tuple<at::Tensor, at::Tensor> gate_up_unpack_cuda(const at::Tensor& packed, int64_t tp_size) {
  const char* op = "gate_up_unpack";
  check_device_type(op, packed, "packed", c10::DeviceType::CUDA);
  const int64_t f = gate_up_unpack_check(op, packed, tp_size);
  at::Tensor gate = at::empty(shape_with_rows(packed, f * tp_size), packed.options());
  at::Tensor up = at::empty(shape_with_rows(packed, f * tp_size), packed.options());
  cuda_detail::CopyPlan plan(op, packed.element_size());
  gate_up_unpack_walk(packed, tp_size, f, gate, up, plan);
  plan.launch(packed.device());
  return {gate, up};
}

TORCH_LIBRARY_IMPL(bridge, CUDA, m) {
  m.impl("gate_up_pack", &gate_up_pack_cuda);
  m.impl("gate_up_pack_out", &gate_up_pack_out_cuda);
  m.impl("gate_up_unpack", &gate_up_unpack_cuda);
  m.impl("gate_up_unpack_out", &gate_up_unpack_out_cuda);
}

}  // namespace bridge
