// DTensor local shards and Megatron-FSDP flat ranges on CUDA: the copy plan (one launch per kind of segment; flat
// ranges between two multi-dim layouts through the N-d kernel) and registration. Checks and the layout walks are in
// csrc/common/dtensor.h.
#include <torch/library.h>

#include "../common/dtensor.h"
#include "copy_plan.cuh"

namespace bridge {

void shard_copy_cuda(const at::Tensor& src, const at::Tensor& dst, at::IntArrayRef mesh_shape,
                     at::IntArrayRef mesh_coord, at::IntArrayRef shard_dims) {
  const char* op = "shard_copy";
  check_device_type(op, src, "src", c10::DeviceType::CUDA);
  const ShardBox box = shard_copy_check(op, src, dst, mesh_shape, mesh_coord, shard_dims);
  cuda_detail::CopyPlan plan(op, src.element_size());
  shard_copy_walk(box, src, dst, plan);
  plan.launch(src.device());
}

void flat_range_copy_cuda(const at::Tensor& src, const at::Tensor& dst, int64_t start) {
  const char* op = "flat_range_copy";
  check_device_type(op, src, "src", c10::DeviceType::CUDA);
  flat_range_copy_check(op, src, dst, start);
  cuda_detail::CopyPlan plan(op, src.element_size());
  flat_range_copy_walk(src, dst, start, plan,
                       [&](const View& s, int64_t s_start, const View& d) { plan.add_nd(s, s_start, d); });
  plan.launch(src.device());
}

TORCH_LIBRARY_IMPL(bridge, CUDA, m) {
  m.impl("shard_copy", &shard_copy_cuda);
  m.impl("flat_range_copy", &flat_range_copy_cuda);
}

}  // namespace bridge
