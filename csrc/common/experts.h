// MoE experts (Megatron linear_fc1 / linear_fc2 per local expert) <-> HF per-expert tensors: geometry, argument
// checks and layout walks, shared by csrc/cpu/experts.cpp and csrc/cuda/experts.cu (conversion_semantics.md
// section 4).
//
// EP rank r owns global experts [r*E/ep, (r+1)*E/ep); local expert e is global e + r*E/ep. linear_fc1 of an expert
// is the gate/up packing with etp (rows, any trailing dims), linear_fc2 [D, F] is sharded on its columns with etp;
// 1-D linear_fc2 tensors (row-parallel biases [D]) are replicated over ETP. Inputs are lists of per-expert views
// (possibly strided views of one fused HF tensor). The local experts' destinations are either the slices of one
// stacked tensor [E/ep, ...] (grouped GEMM) or E/ep separate tensors (sequential experts, the `.list` overloads);
// the walks take them as views, so both forms share one walk. Every block of every expert goes to the executor as
// one job.
#pragma once
#include "../checks.h"
#include "strided.h"

namespace bridge {

// ---- common ----------------------------------------------------------------------------------------------------

// Validates an expert list (non-empty, E divisible by ep_size, same shape/dtype/device) and the EP/ETP sizes;
// returns E.
inline int64_t expert_list_check(const char* op, at::TensorList xs, const char* name, int64_t ep_size,
                                 int64_t etp_size) {
  BRIDGE_CHECK_POSITIVE(op, "ep_size", ep_size);
  BRIDGE_CHECK_POSITIVE(op, "etp_size", etp_size);
  const int64_t E = static_cast<int64_t>(xs.size());
  TORCH_CHECK(E >= 1, op, ": ", name, " is an empty list (expected one tensor per global expert)");
  BRIDGE_CHECK_DIVISIBLE(op, "number of experts E", E, "ep_size", ep_size);
  TORCH_CHECK(xs[0].dim() >= 1, op, ": ", name, "[0] must have at least 1 dim, got shape ", xs[0].sizes());
  for (int64_t e = 1; e < E; ++e) {
    const at::Tensor& x = xs[e];
    TORCH_CHECK(x.device() == xs[0].device() && x.scalar_type() == xs[0].scalar_type() && x.sizes() == xs[0].sizes(),
                op, ": ", name, "[", e, "] is ", x.scalar_type(), " ", x.sizes(), " on ", x.device(), " but ", name,
                "[0] is ", xs[0].scalar_type(), " ", xs[0].sizes(), " on ", xs[0].device());
  }
  return E;
}

// Validates the ep*etp shard list of expert_unpack_*: length ep*etp, same shape/dtype/device, [E/ep, rows, ...].
inline void expert_shards_check(const char* op, at::TensorList shards, int64_t ep_size, int64_t etp_size) {
  BRIDGE_CHECK_POSITIVE(op, "ep_size", ep_size);
  BRIDGE_CHECK_POSITIVE(op, "etp_size", etp_size);
  TORCH_CHECK(static_cast<int64_t>(shards.size()) == ep_size * etp_size, op, ": got ", shards.size(),
              " shards, expected ep_size*etp_size = ", ep_size * etp_size);
  TORCH_CHECK(shards[0].dim() >= 2, op, ": shards[0] has shape ", shards[0].sizes(),
              ", expected [E/ep, rows(, cols)]");
  for (size_t i = 1; i < shards.size(); ++i) {
    const at::Tensor& x = shards[i];
    TORCH_CHECK(x.device() == shards[0].device() && x.scalar_type() == shards[0].scalar_type() &&
                    x.sizes() == shards[0].sizes(),
                op, ": shards[", i, "] is ", x.scalar_type(), " ", x.sizes(), " on ", x.device(),
                " but shards[0] is ", shards[0].scalar_type(), " ", shards[0].sizes(), " on ", shards[0].device());
  }
}

// Source views of xs[first, first + n).
inline std::vector<View> expert_src_views(at::TensorList xs, int64_t first, int64_t n) {
  std::vector<View> v;
  v.reserve(static_cast<size_t>(n));
  for (int64_t e = first; e < first + n; ++e) v.push_back(src_view(xs[e]));
  return v;
}

// ---- fc1 pack ----------------------------------------------------------------------------------------------------

struct ExpertFc1Geometry {
  int64_t E;      // global experts
  int64_t local;  // E / ep
  int64_t f;      // F / etp
};

inline ExpertFc1Geometry expert_fc1_pack_check(const char* op, at::TensorList gate, at::TensorList up,
                                               int64_t ep_size, int64_t ep_rank, int64_t etp_size,
                                               int64_t etp_rank) {
  const int64_t E = expert_list_check(op, gate, "gate", ep_size, etp_size);
  expert_list_check(op, up, "up", ep_size, etp_size);
  TORCH_CHECK(up.size() == gate.size(), op, ": up has ", up.size(), " experts but gate has ", gate.size());
  BRIDGE_CHECK_RANK(op, "ep_rank", ep_rank, "ep_size", ep_size);
  BRIDGE_CHECK_RANK(op, "etp_rank", etp_rank, "etp_size", etp_size);
  check_like(op, up[0], "up[0]", gate[0], "gate[0]");
  TORCH_CHECK(up[0].size(0) == gate[0].size(0), op, ": up[0] has ", up[0].size(0), " rows but gate[0] has ",
              gate[0].size(0));
  BRIDGE_CHECK_DIVISIBLE(op, "F (gate rows)", gate[0].size(0), "etp_size", etp_size);
  return {E, E / ep_size, gate[0].size(0) / etp_size};
}

// One local expert's linear_fc1 shard: [2F/etp, trailing dims of gate[0]...].
inline std::vector<int64_t> expert_fc1_shard_shape(const ExpertFc1Geometry& g, at::TensorList gate) {
  return shape_with_rows(gate[0], 2 * g.f);
}

// The stacked destination [E/ep, 2F/etp, ...] of expert_pack_fc1_out.
inline void expert_fc1_pack_out_check(const char* op, const ExpertFc1Geometry& g, at::TensorList gate,
                                      const at::Tensor& out) {
  check_out(op, out, "out", shape_stacked(g.local, expert_fc1_shard_shape(g, gate)), gate[0], "gate[0]");
}

// The E/ep per-expert destinations of expert_pack_fc1_out.list.
inline void expert_fc1_pack_out_list_check(const char* op, const ExpertFc1Geometry& g, at::TensorList gate,
                                           at::TensorList out) {
  check_out_list(op, out, "out", g.local, "E/ep", expert_fc1_shard_shape(g, gate),
                 "one local expert's linear_fc1 shard [2F/etp, ...]", gate[0], "gate[0]");
}

// emit(src, dst): rows [t*f, (t+1)*f) of gate and up of each local expert into rows [0, f) and [f, 2f) of out[e].
// gate(ge) / up(ge) give global expert ge's source view (of any kind: the quantized ops of csrc/common/quant_ops.h
// pass index-space views of their sources).
template <class GateSrc, class UpSrc, class Emit>
void expert_fc1_pack_walk_views(const ExpertFc1Geometry& g, GateSrc&& gate, UpSrc&& up, int64_t ep_rank,
                                int64_t etp_rank, const std::vector<View>& out, Emit&& emit) {
  for (int64_t e = 0; e < g.local; ++e) {
    const int64_t ge = ep_rank * g.local + e;
    emit(gate(ge).rows(etp_rank * g.f, g.f), out[e].rows(0, g.f));
    emit(up(ge).rows(etp_rank * g.f, g.f), out[e].rows(g.f, g.f));
  }
}

template <class Emit>
void expert_fc1_pack_walk(const ExpertFc1Geometry& g, at::TensorList gate, at::TensorList up, int64_t ep_rank,
                          int64_t etp_rank, const std::vector<View>& out, Emit&& emit) {
  expert_fc1_pack_walk_views(
      g, [&](int64_t ge) { return src_view(gate[ge]); }, [&](int64_t ge) { return src_view(up[ge]); }, ep_rank,
      etp_rank, out, emit);
}

// ---- fc2 pack ----------------------------------------------------------------------------------------------------

struct ExpertFc2Geometry {
  int64_t E;      // global experts
  int64_t local;  // E / ep
  int64_t cols;   // F / etp for a [D, F] weight; 0 for a replicated [D] bias
  bool sharded;   // 2-D weight (columns sharded over ETP)
};

inline ExpertFc2Geometry expert_fc2_pack_check(const char* op, at::TensorList down, int64_t ep_size,
                                               int64_t ep_rank, int64_t etp_size, int64_t etp_rank) {
  const int64_t E = expert_list_check(op, down, "down", ep_size, etp_size);
  BRIDGE_CHECK_RANK(op, "ep_rank", ep_rank, "ep_size", ep_size);
  BRIDGE_CHECK_RANK(op, "etp_rank", etp_rank, "etp_size", etp_size);
  const at::Tensor& d0 = down[0];
  TORCH_CHECK(d0.dim() == 1 || d0.dim() == 2, op, ": down[0] has shape ", d0.sizes(),
              ", expected [D, F] (weight) or [D] (bias)");
  const bool sharded = d0.dim() == 2;
  if (sharded) BRIDGE_CHECK_DIVISIBLE(op, "F (down columns)", d0.size(1), "etp_size", etp_size);
  return {E, E / ep_size, sharded ? d0.size(1) / etp_size : 0, sharded};
}

// One local expert's linear_fc2 shard: [D, F/etp], or [D] for a bias.
inline std::vector<int64_t> expert_fc2_shard_shape(const ExpertFc2Geometry& g, at::TensorList down) {
  if (g.sharded) return {down[0].size(0), g.cols};
  return {down[0].size(0)};
}

inline void expert_fc2_pack_out_check(const char* op, const ExpertFc2Geometry& g, at::TensorList down,
                                      const at::Tensor& out) {
  check_out(op, out, "out", shape_stacked(g.local, expert_fc2_shard_shape(g, down)), down[0], "down[0]");
}

// The E/ep per-expert destinations of expert_pack_fc2_out.list.
inline void expert_fc2_pack_out_list_check(const char* op, const ExpertFc2Geometry& g, at::TensorList down,
                                           at::TensorList out) {
  check_out_list(op, out, "out", g.local, "E/ep", expert_fc2_shard_shape(g, down),
                 g.sharded ? "one local expert's linear_fc2 shard [D, F/etp]"
                           : "one local expert's linear_fc2 bias [D]",
                 down[0], "down[0]");
}

// emit(src, dst): columns [t*c, (t+1)*c) of each local expert's down (all of it for a bias) into out[e]; down(ge)
// gives global expert ge's source view.
template <class Src, class Emit>
void expert_fc2_pack_walk_views(const ExpertFc2Geometry& g, Src&& down, int64_t ep_rank, int64_t etp_rank,
                                const std::vector<View>& out, Emit&& emit) {
  for (int64_t e = 0; e < g.local; ++e) {
    const View s = down(ep_rank * g.local + e);
    emit(g.sharded ? s.narrow(1, etp_rank * g.cols, g.cols) : s, out[e]);
  }
}

template <class Emit>
void expert_fc2_pack_walk(const ExpertFc2Geometry& g, at::TensorList down, int64_t ep_rank, int64_t etp_rank,
                          const std::vector<View>& out, Emit&& emit) {
  expert_fc2_pack_walk_views(g, [&](int64_t ge) { return src_view(down[ge]); }, ep_rank, etp_rank, out, emit);
}

// ---- fc1 unpack --------------------------------------------------------------------------------------------------

inline void expert_fc1_unpack_check(const char* op, at::TensorList shards, int64_t ep_size, int64_t etp_size) {
  expert_shards_check(op, shards, ep_size, etp_size);
  TORCH_CHECK(shards[0].size(1) % 2 == 0, op, ": shards have ", shards[0].size(1),
              " rows per expert (dim 1), expected an even 2F/etp");
}

// Number of global experts of the gathered shards.
inline int64_t expert_unpack_num_experts(at::TensorList shards, int64_t ep_size) {
  return shards[0].size(0) * ep_size;
}

// One expert's HF gate (or up): [F, trailing dims...].
inline std::vector<int64_t> expert_fc1_expert_shape(at::TensorList shards, int64_t etp_size) {
  std::vector<int64_t> s{shards[0].size(1) / 2 * etp_size};
  s.insert(s.end(), shards[0].sizes().begin() + 2, shards[0].sizes().end());
  return s;
}

inline void expert_fc1_unpack_out_check(const char* op, at::TensorList shards, int64_t ep_size, int64_t etp_size,
                                        at::TensorList gate, at::TensorList up) {
  const int64_t E = expert_unpack_num_experts(shards, ep_size);
  const auto shape = expert_fc1_expert_shape(shards, etp_size);
  check_out_list(op, gate, "gate", E, "E", shape, "one expert's [F, ...]", shards[0], "shards[0]");
  check_out_list(op, up, "up", E, "E", shape, "one expert's [F, ...]", shards[0], "shards[0]");
}

// emit(src, dst): both halves of every expert of every (EP, ETP) shard into rows [t*f, (t+1)*f) of gate / up.
template <class Emit>
void expert_fc1_unpack_walk(at::TensorList shards, int64_t ep_size, int64_t etp_size, const std::vector<View>& gate,
                            const std::vector<View>& up, Emit&& emit) {
  const int64_t local = shards[0].size(0);
  const int64_t f = shards[0].size(1) / 2;
  for (int64_t r = 0; r < ep_size; ++r) {
    for (int64_t t = 0; t < etp_size; ++t) {
      const View sv = src_view(shards[r * etp_size + t]);
      for (int64_t e = 0; e < local; ++e) {
        const View se = sv.select(e);
        const int64_t ge = r * local + e;
        emit(se.rows(0, f), gate[ge].rows(t * f, f));
        emit(se.rows(f, f), up[ge].rows(t * f, f));
      }
    }
  }
}

// ---- fc2 unpack --------------------------------------------------------------------------------------------------

inline void expert_fc2_unpack_check(const char* op, at::TensorList shards, int64_t ep_size, int64_t etp_size) {
  expert_shards_check(op, shards, ep_size, etp_size);
  TORCH_CHECK(shards[0].dim() == 2 || shards[0].dim() == 3, op, ": shards[0] has shape ", shards[0].sizes(),
              ", expected [E/ep, D, F/etp] (weight) or [E/ep, D] (bias)");
}

// One expert's HF down: [D, F], or [D] for a bias.
inline std::vector<int64_t> expert_fc2_expert_shape(at::TensorList shards, int64_t etp_size) {
  const at::Tensor& s0 = shards[0];
  if (s0.dim() == 3) return {s0.size(1), s0.size(2) * etp_size};
  return {s0.size(1)};
}

inline void expert_fc2_unpack_out_check(const char* op, at::TensorList shards, int64_t ep_size, int64_t etp_size,
                                        at::TensorList down) {
  check_out_list(op, down, "down", expert_unpack_num_experts(shards, ep_size), "E",
                 expert_fc2_expert_shape(shards, etp_size), "one expert's [D, F] or [D]", shards[0], "shards[0]");
}

// emit(src, dst): every expert of every shard into columns [t*c, (t+1)*c) of down; a 1-D (bias) shard is
// replicated over ETP, so only ETP rank 0's is read.
template <class Emit>
void expert_fc2_unpack_walk(at::TensorList shards, int64_t ep_size, int64_t etp_size, const std::vector<View>& down,
                            Emit&& emit) {
  const int64_t local = shards[0].size(0);
  const bool weight = shards[0].dim() == 3;
  for (int64_t r = 0; r < ep_size; ++r) {
    for (int64_t t = 0; t < (weight ? etp_size : 1); ++t) {
      const View sv = src_view(shards[r * etp_size + t]);
      for (int64_t e = 0; e < local; ++e) {
        const View se = sv.select(e);
        const View& de = down[r * local + e];
        emit(se, weight ? de.narrow(1, t * se.sizes[1], se.sizes[1]) : de);
      }
    }
  }
}

}  // namespace bridge
