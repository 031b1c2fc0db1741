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

  // Block-quantized HF weights (csrc/common/quant.h, quant_ops.h). FP8: float8_e4m3fn / e5m2 [N, K] + scale_inv
  // [ceil(N/bn), ceil(K/bk)] (block_size = quantization_config.weight_block_size); MXFP4: uint8 blocks [N, K/32, 16]
  // + uint8 E8M0 scales [N, K/32]. Dequantized outputs are bfloat16 / float16 / float32 (dtype=None: bfloat16);
  // quantized outputs float8_e4m3fn (dtype=None) or e5m2 with float32 scale_inv; rule 'deepseek' or 'transformers'.
  // FP8 [..., N, K] -> high precision, optionally one TP slice (tp_dim 0: rows, 1: columns).
  m.def("fp8_block_dequant(Tensor weight, Tensor scale_inv, int[] block_size, ScalarType? dtype=None, int tp_size=1, int tp_rank=0, int tp_dim=0) -> Tensor");
  m.def("fp8_block_dequant_out(Tensor weight, Tensor scale_inv, int[] block_size, int tp_size, int tp_rank, int tp_dim, Tensor(a!) out) -> ()");
  // MXFP4 [..., N, K/32, 16] -> high precision [..., N, K] (transformers' convert_moe_packed_tensors before its transpose), optionally one TP slice.
  m.def("mxfp4_dequant(Tensor blocks, Tensor scales, ScalarType? dtype=None, int tp_size=1, int tp_rank=0, int tp_dim=0) -> Tensor");
  m.def("mxfp4_dequant_out(Tensor blocks, Tensor scales, int tp_size, int tp_rank, int tp_dim, Tensor(a!) out) -> ()");
  // High precision [..., N, K] -> (FP8 [..., N, K], scale_inv [..., ceil(N/bn), ceil(K/bk)]).
  m.def("fp8_block_quant(Tensor weight, int[] block_size, ScalarType? dtype=None, str rule='deepseek') -> (Tensor, Tensor)");
  m.def("fp8_block_quant_out(Tensor weight, int[] block_size, str rule, Tensor(a!) out, Tensor(b!) scale_inv) -> ()");
  // FP8 q, k, v (+ scales) -> TP rank's fused QKV shard, dequantized (qkv_pack's layout).
  m.def("fp8_qkv_pack(Tensor? q, Tensor? q_scale_inv, Tensor k, Tensor k_scale_inv, Tensor v, Tensor v_scale_inv, int[] block_size, int num_heads, int num_query_groups, int head_dim, int tp_size=1, int tp_rank=0, bool output_gate=False, ScalarType? dtype=None) -> Tensor");
  m.def("fp8_qkv_pack_out(Tensor? q, Tensor? q_scale_inv, Tensor k, Tensor k_scale_inv, Tensor v, Tensor v_scale_inv, int[] block_size, int num_heads, int num_query_groups, int head_dim, int tp_size, int tp_rank, bool output_gate, Tensor(a!) out) -> ()");
  // Full packed QKV -> FP8 (q, q_scale_inv, k, k_scale_inv, v, v_scale_inv) (qkv_unpack's layout, quantized per HF block).
  m.def("fp8_qkv_unpack(Tensor packed, int[] block_size, int num_heads, int num_query_groups, int head_dim, bool output_gate=False, ScalarType? dtype=None, str rule='deepseek') -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("fp8_qkv_unpack_out(Tensor packed, int[] block_size, int num_heads, int num_query_groups, int head_dim, bool output_gate, str rule, Tensor(a!)? q, Tensor(b!)? q_scale_inv, Tensor(c!) k, Tensor(d!) k_scale_inv, Tensor(e!) v, Tensor(f!) v_scale_inv) -> ()");
  // FP8 gate, up (up=None: gate is one fused gate_up, halves or interleaved rows) -> TP rank's [gate_t; up_t].
  m.def("fp8_gate_up_pack(Tensor gate, Tensor gate_scale_inv, Tensor? up, Tensor? up_scale_inv, int[] block_size, int tp_size=1, int tp_rank=0, bool interleaved=False, ScalarType? dtype=None) -> Tensor");
  m.def("fp8_gate_up_pack_out(Tensor gate, Tensor gate_scale_inv, Tensor? up, Tensor? up_scale_inv, int[] block_size, int tp_size, int tp_rank, bool interleaved, Tensor(a!) out) -> ()");
  // Gathered [g0; u0; g1; u1; ...] -> FP8 (gate, gate_scale_inv, up, up_scale_inv).
  m.def("fp8_gate_up_unpack(Tensor packed, int[] block_size, int tp_size=1, ScalarType? dtype=None, str rule='deepseek') -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fp8_gate_up_unpack_out(Tensor packed, int[] block_size, int tp_size, str rule, Tensor(a!) gate, Tensor(b!) gate_scale_inv, Tensor(c!) up, Tensor(d!) up_scale_inv) -> ()");
  // E FP8 per-expert gate/up (up=[]: fused gate_up per expert) -> this (EP, ETP) rank's linear_fc1 [E/ep, 2F/etp, K].
  m.def("fp8_expert_pack_fc1(Tensor[] gate, Tensor[] gate_scale_inv, Tensor[] up, Tensor[] up_scale_inv, int[] block_size, int ep_size=1, int ep_rank=0, int etp_size=1, int etp_rank=0, bool interleaved=False, ScalarType? dtype=None) -> Tensor");
  m.def("fp8_expert_pack_fc1_out(Tensor[] gate, Tensor[] gate_scale_inv, Tensor[] up, Tensor[] up_scale_inv, int[] block_size, int ep_size, int ep_rank, int etp_size, int etp_rank, bool interleaved, Tensor(a!) out) -> ()");
  m.def("fp8_expert_pack_fc1_out.list(Tensor[] gate, Tensor[] gate_scale_inv, Tensor[] up, Tensor[] up_scale_inv, int[] block_size, int ep_size, int ep_rank, int etp_size, int etp_rank, bool interleaved, Tensor(a!)[] out) -> ()");
  // E FP8 per-expert down [D, F] -> this rank's linear_fc2 [E/ep, D, F/etp].
  m.def("fp8_expert_pack_fc2(Tensor[] down, Tensor[] down_scale_inv, int[] block_size, int ep_size=1, int ep_rank=0, int etp_size=1, int etp_rank=0, ScalarType? dtype=None) -> Tensor");
  m.def("fp8_expert_pack_fc2_out(Tensor[] down, Tensor[] down_scale_inv, int[] block_size, int ep_size, int ep_rank, int etp_size, int etp_rank, Tensor(a!) out) -> ()");
  m.def("fp8_expert_pack_fc2_out.list(Tensor[] down, Tensor[] down_scale_inv, int[] block_size, int ep_size, int ep_rank, int etp_size, int etp_rank, Tensor(a!)[] out) -> ()");
  // Gathered linear_fc1 shards -> FP8 (gate, gate_scale_inv, up, up_scale_inv) [E, F, K] / [E, ceil(F/bn), ceil(K/bk)].
  m.def("fp8_expert_unpack_fc1(Tensor[] shards, int[] block_size, int ep_size, int etp_size, ScalarType? dtype=None, str rule='deepseek') -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fp8_expert_unpack_fc1_out(Tensor[] shards, int[] block_size, int ep_size, int etp_size, str rule, Tensor(a!)[] gate, Tensor(b!)[] gate_scale_inv, Tensor(c!)[] up, Tensor(d!)[] up_scale_inv) -> ()");
  // Gathered linear_fc2 shards -> FP8 (down, down_scale_inv) [E, D, F] / [E, ceil(D/bn), ceil(F/bk)].
  m.def("fp8_expert_unpack_fc2(Tensor[] shards, int[] block_size, int ep_size, int etp_size, ScalarType? dtype=None, str rule='deepseek') -> (Tensor, Tensor)");
  m.def("fp8_expert_unpack_fc2_out(Tensor[] shards, int[] block_size, int ep_size, int etp_size, str rule, Tensor(a!)[] down, Tensor(b!)[] down_scale_inv) -> ()");
  // MXFP4 per-expert gate/up blocks + scales (up=[]: fused gate_up, GPT-OSS: interleaved) -> linear_fc1 [E/ep, 2F/etp, K].
  m.def("mxfp4_expert_pack_fc1(Tensor[] gate_blocks, Tensor[] gate_scales, Tensor[] up_blocks, Tensor[] up_scales, int ep_size=1, int ep_rank=0, int etp_size=1, int etp_rank=0, bool interleaved=False, ScalarType? dtype=None) -> Tensor");
  m.def("mxfp4_expert_pack_fc1_out(Tensor[] gate_blocks, Tensor[] gate_scales, Tensor[] up_blocks, Tensor[] up_scales, int ep_size, int ep_rank, int etp_size, int etp_rank, bool interleaved, Tensor(a!) out) -> ()");
  m.def("mxfp4_expert_pack_fc1_out.list(Tensor[] gate_blocks, Tensor[] gate_scales, Tensor[] up_blocks, Tensor[] up_scales, int ep_size, int ep_rank, int etp_size, int etp_rank, bool interleaved, Tensor(a!)[] out) -> ()");
  // MXFP4 per-expert down blocks [D, F/32, 16] + scales -> linear_fc2 [E/ep, D, F/etp].
  m.def("mxfp4_expert_pack_fc2(Tensor[] down_blocks, Tensor[] down_scales, int ep_size=1, int ep_rank=0, int etp_size=1, int etp_rank=0, ScalarType? dtype=None) -> Tensor");
  m.def("mxfp4_expert_pack_fc2_out(Tensor[] down_blocks, Tensor[] down_scales, int ep_size, int ep_rank, int etp_size, int etp_rank, Tensor(a!) out) -> ()");
  m.def("mxfp4_expert_pack_fc2_out.list(Tensor[] down_blocks, Tensor[] down_scales, int ep_size, int ep_rank, int etp_size, int etp_rank, Tensor(a!)[] out) -> ()");

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
