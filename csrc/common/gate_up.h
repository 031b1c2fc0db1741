// Gated MLP (Megatron linear_fc1) <-> HF gate, up: argument checks and layout walk, shared by csrc/cpu/gate_up.cpp
// and csrc/cuda/gate_up.cu (conversion_semantics.md section 2).
//
// TP rank t holds [gate[t*f:(t+1)*f]; up[t*f:(t+1)*f]], f = F / tp; the gathered tensor is [g0; u0; g1; u1; ...].
// Tensors have any trailing dims and any strides: row-interleaved (x[0::2]) and transposed (x.t()) HF layouts
// arrive as strided views and the executors copy them as such.
#pragma once
#include "../checks.h"
#include "strided.h"

namespace bridge {

// Validates gate_up_pack(_out) inputs; returns f = F / tp_size.
inline int64_t gate_up_pack_check(const char* op, const at::Tensor& gate, const at::Tensor& up, int64_t tp_size,
                                  int64_t tp_rank) {
  BRIDGE_CHECK_RANK(op, "tp_rank", tp_rank, "tp_size", tp_size);
  TORCH_CHECK(gate.dim() >= 1, op, ": gate must have at least 1 dim, got shape ", gate.sizes());
  check_like(op, up, "up", gate, "gate");
  TORCH_CHECK(up.size(0) == gate.size(0), op, ": up has ", up.size(0), " rows but gate has ", gate.size(0),
              " (gate and up must both be [F, ...])");
  BRIDGE_CHECK_DIVISIBLE(op, "F (gate rows)", gate.size(0), "tp_size", tp_size);
  return gate.size(0) / tp_size;
}

// Shape of TP rank's [gate_t; up_t]: [2f, trailing dims of gate...].
inline std::vector<int64_t> gate_up_shard_shape(const at::Tensor& gate, int64_t f) {
  return shape_with_rows(gate, 2 * f);
}

// Validates the destination of gate_up_pack_out.
inline void gate_up_pack_out_check(const char* op, const at::Tensor& gate, int64_t f, const at::Tensor& out) {
  check_out(op, out, "out", gate_up_shard_shape(gate, f), gate, "gate");
}

// Validates the packed tensor of gate_up_unpack(_out); returns f = rows / (2 * tp_size).
inline int64_t gate_up_unpack_check(const char* op, const at::Tensor& packed, int64_t tp_size) {
  BRIDGE_CHECK_POSITIVE(op, "tp_size", tp_size);
  TORCH_CHECK(packed.dim() >= 1, op, ": packed must have at least 1 dim, got shape ", packed.sizes());
  BRIDGE_CHECK_DIVISIBLE(op, "packed rows", packed.size(0), "2*tp_size", 2 * tp_size);
  return packed.size(0) / (2 * tp_size);
}

// Validates the destinations of gate_up_unpack_out.
inline void gate_up_unpack_out_check(const char* op, const at::Tensor& packed, int64_t tp_size, int64_t f,
                                     const at::Tensor& gate, const at::Tensor& up) {
  check_like(op, gate, "gate", packed, "packed");
  check_like(op, up, "up", packed, "packed");
  check_rows(op, gate, "gate", f * tp_size, "packed rows / 2");
  check_rows(op, up, "up", f * tp_size, "packed rows / 2");
}

// gate_up_pack(_out): emit(src, dst) for TP rank tp_rank's gate rows and up rows (views of any kind: the
// quantized ops of csrc/common/quant_ops.h walk index-space views of their sources through it).
template <class Emit>
void gate_up_pack_walk(const View& gate, const View& up, int64_t f, int64_t tp_rank, const View& out, Emit&& emit) {
  emit(gate.rows(tp_rank * f, f), out.rows(0, f));
  emit(up.rows(tp_rank * f, f), out.rows(f, f));
}

template <class Emit>
void gate_up_pack_walk(const at::Tensor& gate, const at::Tensor& up, int64_t f, int64_t tp_rank,
                       const at::Tensor& out, Emit&& emit) {
  gate_up_pack_walk(src_view(gate), src_view(up), f, tp_rank, dst_view(out), emit);
}

// gate_up_unpack(_out): emit(src, dst) for every TP shard's halves of the gathered tensor.
template <class Emit>
void gate_up_unpack_walk(const View& p, int64_t tp_size, int64_t f, const View& g, const View& u, Emit&& emit) {
  for (int64_t t = 0; t < tp_size; ++t) {
    emit(p.rows(2 * t * f, f), g.rows(t * f, f));
    emit(p.rows(2 * t * f + f, f), u.rows(t * f, f));
  }
}

template <class Emit>
void gate_up_unpack_walk(const at::Tensor& packed, int64_t tp_size, int64_t f, const at::Tensor& gate,
                         const at::Tensor& up, Emit&& emit) {
  gate_up_unpack_walk(src_view(packed), tp_size, f, dst_view(gate), dst_view(up), emit);
}

}  // namespace bridge
