// MoE experts (Megatron linear_fc1 / linear_fc2 per local expert) <-> HF per-expert tensors on CUDA: allocation, the
// copy plan (all blocks of all experts of one call in one launch per kind of segment) and registration. Geometry,
// checks and the layout walks are in csrc/common/experts.h.
#include <torch/library.h>

#include <tuple>

#include "../common/experts.h"
#include "copy_plan.cuh"

namespace bridge {

// ---- pack ---------------------------------------------------------------------------------------------------------

at::Tensor expert_pack_fc1_cuda(at::TensorList gate, at::TensorList up, int64_t ep_size, int64_t ep_rank,
                                int64_t etp_size, int64_t etp_rank) {
  const char* op = "expert_pack_fc1";
  const auto g = expert_fc1_pack_check(op, gate, up, ep_size, ep_rank, etp_size, etp_rank);
  check_device_type(op, gate[0], "gate[0]", c10::DeviceType::CUDA);
  at::Tensor out = at::empty(shape_stacked(g.local, expert_fc1_shard_shape(g, gate)), gate[0].options());
  cuda_detail::CopyPlan plan(op, gate[0].element_size());
  expert_fc1_pack_walk(g, gate, up, ep_rank, etp_rank, dst_slices(out), plan);
  plan.launch(gate[0].device());
  return out;
}

void expert_pack_fc1_out_cuda(at::TensorList gate, at::TensorList up, int64_t ep_size, int64_t ep_rank,
                              int64_t etp_size, int64_t etp_rank, const at::Tensor& out) {
  const char* op = "expert_pack_fc1_out";
  const auto g = expert_fc1_pack_check(op, gate, up, ep_size, ep_rank, etp_size, etp_rank);
  check_device_type(op, gate[0], "gate[0]", c10::DeviceType::CUDA);
  expert_fc1_pack_out_check(op, g, gate, out);
  cuda_detail::CopyPlan plan(op, gate[0].element_size());
  expert_fc1_pack_walk(g, gate, up, ep_rank, etp_rank, dst_slices(out), plan);
  plan.launch(gate[0].device());
}

void expert_pack_fc1_out_list_cuda(at::TensorList gate, at::TensorList up, int64_t ep_size, int64_t ep_rank,
                                   int64_t etp_size, int64_t etp_rank, at::TensorList out) {
  const char* op = "expert_pack_fc1_out.list";
  const auto g = expert_fc1_pack_check(op, gate, up, ep_size, ep_rank, etp_size, etp_rank);
  check_device_type(op, gate[0], "gate[0]", c10::DeviceType::CUDA);
  expert_fc1_pack_out_list_check(op, g, gate, out);
  cuda_detail::CopyPlan plan(op, gate[0].element_size());
  expert_fc1_pack_walk(g, gate, up, ep_rank, etp_rank, dst_views(out), plan);
  plan.launch(gate[0].device());
}

at::Tensor expert_pack_fc2_cuda(at::TensorList down, int64_t ep_size, int64_t ep_rank, int64_t etp_size,
                                int64_t etp_rank) {
  const char* op = "expert_pack_fc2";
  const auto g = expert_fc2_pack_check(op, down, ep_size, ep_rank, etp_size, etp_rank);
  check_device_type(op, down[0], "down[0]", c10::DeviceType::CUDA);
  at::Tensor out = at::empty(shape_stacked(g.local, expert_fc2_shard_shape(g, down)), down[0].options());
  cuda_detail::CopyPlan plan(op, down[0].element_size());
  expert_fc2_pack_walk(g, down, ep_rank, etp_rank, dst_slices(out), plan);
  plan.launch(down[0].device());
  return out;
}

void expert_pack_fc2_out_cuda(at::TensorList down, int64_t ep_size, int64_t ep_rank, int64_t etp_size,
                              int64_t etp_rank, const at::Tensor& out) {
  const char* op = "expert_pack_fc2_out";
  const auto g = expert_fc2_pack_check(op, down, ep_size, ep_rank, etp_size, etp_rank);
  check_device_type(op, down[0], "down[0]", c10::DeviceType::CUDA);
  expert_fc2_pack_out_check(op, g, down, out);
  cuda_detail::CopyPlan plan(op, down[0].element_size());
  expert_fc2_pack_walk(g, down, ep_rank, etp_rank, dst_slices(out), plan);
  plan.launch(down[0].device());
}

void expert_pack_fc2_out_list_cuda(at::TensorList down, int64_t ep_size, int64_t ep_rank, int64_t etp_size,
                                   int64_t etp_rank, at::TensorList out) {
  const char* op = "expert_pack_fc2_out.list";
  const auto g = expert_fc2_pack_check(op, down, ep_size, ep_rank, etp_size, etp_rank);
  check_device_type(op, down[0], "down[0]", c10::DeviceType::CUDA);
  expert_fc2_pack_out_list_check(op, g, down, out);
  cuda_detail::CopyPlan plan(op, down[0].element_size());
  expert_fc2_pack_walk(g, down, ep_rank, etp_rank, dst_views(out), plan);
  plan.launch(down[0].device());
}

// ---- unpack -------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> expert_unpack_fc1_cuda(at::TensorList shards, int64_t ep_size,
                                                          int64_t etp_size) {
  const char* op = "expert_unpack_fc1";
  expert_fc1_unpack_check(op, shards, ep_size, etp_size);
  check_device_type(op, shards[0], "shards[0]", c10::DeviceType::CUDA);
  const auto shape =
      shape_stacked(expert_unpack_num_experts(shards, ep_size), expert_fc1_expert_shape(shards, etp_size));
  at::Tensor gate = at::empty(shape, shards[0].options());
  at::Tensor up = at::empty(shape, shards[0].options());
  cuda_detail::CopyPlan plan(op, shards[0].element_size());
  expert_fc1_unpack_walk(shards, ep_size, etp_size, dst_slices(gate), dst_slices(up), plan);
  plan.launch(shards[0].device());
  return {gate, up};
}

void expert_unpack_fc1_out_cuda(at::TensorList shards, int64_t ep_size, int64_t etp_size, at::TensorList gate,
                                at::TensorList up) {
  const char* op = "expert_unpack_fc1_out";
  expert_fc1_unpack_check(op, shards, ep_size, etp_size);
  check_device_type(op, shards[0], "shards[0]", c10::DeviceType::CUDA);
  expert_fc1_unpack_out_check(op, shards, ep_size, etp_size, gate, up);
  cuda_detail::CopyPlan plan(op, shards[0].element_size());
  expert_fc1_unpack_walk(shards, ep_size, etp_size, dst_views(gate), dst_views(up), plan);
  plan.launch(shards[0].device());
}

at::Tensor expert_unpack_fc2_cuda(at::TensorList shards, int64_t ep_size, int64_t etp_size) {
  const char* op = "expert_unpack_fc2";
  expert_fc2_unpack_check(op, shards, ep_size, etp_size);
  check_device_type(op, shards[0], "shards[0]", c10::DeviceType::CUDA);
  at::Tensor down = at::empty(
      shape_stacked(expert_unpack_num_experts(shards, ep_size), expert_fc2_expert_shape(shards, etp_size)),
      shards[0].options());
  cuda_detail::CopyPlan plan(op, shards[0].element_size());
  expert_fc2_unpack_walk(shards, ep_size, etp_size, dst_slices(down), plan);
  plan.launch(shards[0].device());
  return down;
}

void expert_unpack_fc2_out_cuda(at::TensorList shards, int64_t ep_size, int64_t etp_size, at::TensorList down) {
  const char* op = "expert_unpack_fc2_out";
  expert_fc2_unpack_check(op, shards, ep_size, etp_size);
  check_device_type(op, shards[0], "shards[0]", c10::DeviceType::CUDA);
  expert_fc2_unpack_out_check(op, shards, ep_size, etp_size, down);
  cuda_detail::CopyPlan plan(op, shards[0].element_size());
  expert_fc2_unpack_walk(shards, ep_size, etp_size, dst_views(down), plan);
  plan.launch(shards[0].device());
}

TORCH_LIBRARY_IMPL(bridge, CUDA, m) {
  m.impl("expert_pack_fc1", &expert_pack_fc1_cuda);
  m.impl("expert_pack_fc1_out", &expert_pack_fc1_out_cuda);
  m.impl("expert_pack_fc1_out.list", &expert_pack_fc1_out_list_cuda);
  m.impl("expert_pack_fc2", &expert_pack_fc2_cuda);
  m.impl("expert_pack_fc2_out", &expert_pack_fc2_out_cuda);
  m.impl("expert_pack_fc2_out.list", &expert_pack_fc2_out_list_cuda);
  m.impl("expert_unpack_fc1", &expert_unpack_fc1_cuda);
  m.impl("expert_unpack_fc1_out", &expert_unpack_fc1_out_cuda);
  m.impl("expert_unpack_fc2", &expert_unpack_fc2_cuda);
  m.impl("expert_unpack_fc2_out", &expert_unpack_fc2_out_cuda);
}

}  // namespace bridge
