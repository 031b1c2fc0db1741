// C++ declarations shared by the CPU and CUDA kernels of torch.ops.bridge.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace bridge {

// Shape helpers shared by CPU and CUDA kernels (defined in csrc/cpu/*.cpp). Each validates its arguments with
// TORCH_CHECK messages that name the op, the argument and the values, so both devices report errors alike.

// ---- common ----------------------------------------------------------------------------------------------------
// `t` has dims >= 1 and the same dtype, device and trailing dims (all but dim 0) as `ref`.
inline void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least 1 dim, got shape ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.dim() == ref.dim() && t.sizes().slice(1) == ref.sizes().slice(1), op, ": ", name, " has shape ",
              t.sizes(), " but ", ref_name, " has shape ", ref.sizes(), " (trailing dims must match)");
}
// `t` has exactly `sizes`.
inline void check_shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " has shape ", t.sizes(), ", expected ", sizes);
}
// `t` has `rows` rows (dim 0); `what` spells the expectation, e.g. "H*d".
inline void check_rows(const char* op, const at::Tensor& t, const char* name, int64_t rows, const char* what) {
  TORCH_CHECK(t.dim() >= 1 && t.size(0) == rows, op, ": ", name, " has ", (t.dim() >= 1 ? t.size(0) : 0),
              " rows (shape ", t.sizes(), "), expected ", what, " = ", rows);
}

// ---- fused QKV (csrc/cpu/qkv.cpp) ------------------------------------------------------------------------------
struct QkvGeometry {
  int64_t heads, groups, head_dim;
  int64_t q_rows_per_group;  // n*d, or 2*n*d with the output gate
  int64_t block_rows;        // P = q_rows_per_group + 2*d
  int64_t q_rows;            // H*d (2*H*d with the output gate)
  int64_t kv_rows;           // G*d
  int64_t packed_rows;       // G*P
  bool output_gate;
};
QkvGeometry qkv_geometry(const char* op, int64_t num_heads, int64_t num_query_groups, int64_t head_dim,
                         bool output_gate);
// Validates qkv_pack(_out) inputs; returns the geometry. The shard has packed_rows / tp_size rows.
QkvGeometry qkv_pack_check(const char* op, const std::optional<at::Tensor>& q, const at::Tensor& k,
                           const at::Tensor& v, int64_t num_heads, int64_t num_query_groups, int64_t head_dim,
                           int64_t tp_size, int64_t tp_rank, bool output_gate);
// Validates the packed tensor of qkv_unpack(_out); returns the geometry.
QkvGeometry qkv_unpack_check(const char* op, const at::Tensor& packed, int64_t num_heads, int64_t num_query_groups,
                             int64_t head_dim, bool output_gate);

// ---- gate/up (csrc/cpu/gate_up.cpp) ----------------------------------------------------------------------------
// Validates gate_up_pack(_out) inputs; returns f = F / tp_size.
int64_t gate_up_pack_check(const char* op, const at::Tensor& gate, const at::Tensor& up, int64_t tp_size,
                           int64_t tp_rank);
// Validates the packed tensor of gate_up_unpack(_out); returns f = rows / (2 * tp_size).
int64_t gate_up_unpack_check(const char* op, const at::Tensor& packed, int64_t tp_size);

// ---- experts (csrc/cpu/experts.cpp) ----------------------------------------------------------------------------
// Validates an expert list (length, same shape/dtype/device) and the EP/ETP sizes; returns E.
int64_t expert_list_check(const char* op, at::TensorList xs, const char* name, int64_t ep_size, int64_t etp_size);
// Validates the ep*etp shard list of expert_unpack_*: same shape/dtype/device, length ep*etp.
void expert_shards_check(const char* op, at::TensorList shards, int64_t ep_size, int64_t etp_size);

// ---- DTensor shards (csrc/cpu/dtensor_copy.cpp) ----------------------------------------------------------------
// For each tensor dim, (offset, length) of the shard of `sizes` owned by mesh_coord (torch.chunk, nested in mesh-dim
// order); validates the mesh arguments.
std::vector<std::pair<int64_t, int64_t>> shard_box(const char* op, at::IntArrayRef sizes, at::IntArrayRef mesh_shape,
                                                   at::IntArrayRef mesh_coord, at::IntArrayRef shard_dims);

}  // namespace bridge
