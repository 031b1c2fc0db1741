// The bridge operator library: every schema of torch.ops.bridge, one comment line each.
// Each concern's geometry, argument checks and layout walk are in csrc/common/<concern>.h, shared by its CPU kernels
// (csrc/cpu/<concern>.cpp) and CUDA kernels (csrc/cuda/<concern>.cu); fake (meta) kernels in
// megatron_bridge_ext/ops.py. Tensors may be non-contiguous views of any dtype: the ops move bytes.
#include <Python.h>
#include <torch/library.h>

// Importing megatron_bridge_ext._C runs the static registrations below; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(bridge, m) {
  // HF q [H*d(,D)] (per head [q_h; z_h] when output_gate), k, v [G*d(,D)] -> TP rank's fused QKV shard; q=None: KV only.
  m.def("qkv_pack(Tensor? q, Tensor k, Tensor v, int num_heads, int num_query_groups, int head_dim, int tp_size=1, int tp_rank=0, bool output_gate=False) -> Tensor");
  // qkv_pack writing into an existing tensor (e.g. the Megatron parameter).
  m.def("qkv_pack_out(Tensor? q, Tensor k, Tensor v, int num_heads, int num_query_groups, int head_dim, int tp_size, int tp_rank, bool output_gate, Tensor(a!) out) -> ()");
  // Full packed QKV (all TP shards concatenated) -> (q, k, v); q has 0 rows when num_heads == 0 (KV only).
  m.def("qkv_unpack(Tensor packed, int num_heads, int num_query_groups, int head_dim, bool output_gate=False) -> (Tensor, Tensor, Tensor)");
  // qkv_unpack writing into existing (possibly strided) q, k, v.
  m.def("qkv_unpack_out(Tensor packed, int num_heads, int num_query_groups, int head_dim, bool output_gate, Tensor(a!)? q, Tensor(b!) k, Tensor(c!) v) -> ()");

  // HF gate, up [F(,D)] -> TP rank's [gate_t; up_t] (2F/tp rows).
  m.def("gate_up_pack(Tensor gate, Tensor up, int tp_size=1, int tp_rank=0) -> Tensor");
  // gate_up_pack writing into an existing tensor.
  m.def("gate_up_pack_out(Tensor gate, Tensor up, int tp_size, int tp_rank, Tensor(a!) out) -> ()");
  // Gathered [g0; u0; g1; u1; ...] -> (gate, up).
  m.def("gate_up_unpack(Tensor packed, int tp_size=1) -> (Tensor, Tensor)");
  // gate_up_unpack writing into existing (possibly strided) gate and up.
  m.def("gate_up_unpack_out(Tensor packed, int tp_size, Tensor(a!) gate, Tensor(b!) up) -> ()");

  // E global per-expert gate/up [F(,D)] -> this (EP, ETP) rank's stacked linear_fc1 [E/ep, 2F/etp(, D)].
  m.def("expert_pack_fc1(Tensor[] gate, Tensor[] up, int ep_size=1, int ep_rank=0, int etp_size=1, int etp_rank=0) -> Tensor");
  // expert_pack_fc1 writing into an existing tensor.
  m.def("expert_pack_fc1_out(Tensor[] gate, Tensor[] up, int ep_size, int ep_rank, int etp_size, int etp_rank, Tensor(a!) out) -> ()");
  // expert_pack_fc1_out into E/ep separate per-local-expert tensors (sequential experts), out[e] [2F/etp(, D)].
  m.def("expert_pack_fc1_out.list(Tensor[] gate, Tensor[] up, int ep_size, int ep_rank, int etp_size, int etp_rank, Tensor(a!)[] out) -> ()");
  // E global per-expert down [D, F] -> this rank's stacked linear_fc2 [E/ep, D, F/etp] (columns sharded).
  m.def("expert_pack_fc2(Tensor[] down, int ep_size=1, int ep_rank=0, int etp_size=1, int etp_rank=0) -> Tensor");
  // expert_pack_fc2 writing into an existing tensor.
  m.def("expert_pack_fc2_out(Tensor[] down, int ep_size, int ep_rank, int etp_size, int etp_rank, Tensor(a!) out) -> ()");
  // expert_pack_fc2_out into E/ep separate per-local-expert tensors (sequential experts), out[e] [D, F/etp] or [D].
  m.def("expert_pack_fc2_out.list(Tensor[] down, int ep_size, int ep_rank, int etp_size, int etp_rank, Tensor(a!)[] out) -> ()");
  // Gathered linear_fc1 shards (index ep_rank*etp + etp_rank, each [E/ep, 2F/etp(, D)]) -> (gate, up) [E, F(, D)].
  m.def("expert_unpack_fc1(Tensor[] shards, int ep_size, int etp_size) -> (Tensor, Tensor)");
  // expert_unpack_fc1 writing into E existing (possibly strided) per-expert gate and up tensors.
  m.def("expert_unpack_fc1_out(Tensor[] shards, int ep_size, int etp_size, Tensor(a!)[] gate, Tensor(b!)[] up) -> ()");
  // Gathered linear_fc2 shards (index ep_rank*etp + etp_rank, each [E/ep, D, F/etp]) -> down [E, D, F].
  m.def("expert_unpack_fc2(Tensor[] shards, int ep_size, int etp_size) -> Tensor");
  // expert_unpack_fc2 writing into E existing (possibly strided) per-expert down tensors.
  m.def("expert_unpack_fc2_out(Tensor[] shards, int ep_size, int etp_size, Tensor(a!)[] down) -> ()");

  // Full tensor -> this mesh coordinate's local shard; shard_dims[i] = tensor dim split over mesh dim i (torch.chunk), -1 = Replicate.
  m.def("shard_copy(Tensor src, Tensor(a!) dst, int[] mesh_shape, int[] mesh_coord, int[] shard_dims) -> ()");
  // dst (any shape) <- src flattened row-major, elements [start, start + dst.numel()) (Megatron FSDP flat slices).
  m.def("flat_range_copy(Tensor src, Tensor(a!) dst, int start) -> ()");

  // Every rank's names -> the same de-duplicated list on all ranks of the c10d group, sorted by param_sort_key then name.
  m.def("gather_param_names(str[] names, str group_name, Device? device=None) -> str[]");
  // (layer, expert) sort key: first `layers.(\d+)`, then `(bias|weight)(\d+)` or `local_experts.(\d+)`; -1 when absent.
  m.def("param_sort_key(str name) -> (int, int)");
  // Local -> global name: first layer index + layer_offset; grouped/sequential expert index + expert_offset.
  m.def("local_to_global_name(str name, int layer_offset, int expert_offset) -> str");
}
