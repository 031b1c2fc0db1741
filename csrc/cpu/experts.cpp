// Grouped MoE experts (Megatron linear_fc1 / linear_fc2 stacked per local expert) <-> HF per-expert tensors on CPU.
//
// EP rank r owns global experts [r*E/ep, (r+1)*E/ep); local expert e is global e + r*E/ep. linear_fc1 of an expert
// is the gate/up packing with etp (rows), linear_fc2 [D, F] is sharded on its columns with etp; 1-D linear_fc2
// tensors (row-parallel biases) are not sharded. Inputs are lists of per-expert views (possibly strided views of
// one fused HF tensor); all blocks of all experts go to the copy engine as one parallel job.
#include <torch/library.h>

#include "../checks.h"
#include "../ops.h"
#include "block_copy.h"

namespace bridge {

int64_t expert_list_check(const char* op, at::TensorList xs, const char* name, int64_t ep_size, int64_t etp_size) {
  TORCH_CHECK(ep_size >= 1, op, ": ep_size = ", ep_size, " must be >= 1");
  TORCH_CHECK(etp_size >= 1, op, ": etp_size = ", etp_size, " must be >= 1");
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

void expert_shards_check(const char* op, at::TensorList shards, int64_t ep_size, int64_t etp_size) {
  TORCH_CHECK(ep_size >= 1, op, ": ep_size = ", ep_size, " must be >= 1");
  TORCH_CHECK(etp_size >= 1, op, ": etp_size = ", etp_size, " must be >= 1");
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

namespace {

using cpu::View;

void check_out_list(const char* op, at::TensorList outs, const char* name, int64_t E, at::IntArrayRef sizes,
                    const at::Tensor& ref) {
  TORCH_CHECK(static_cast<int64_t>(outs.size()) == E, op, ": ", name, " has ", outs.size(),
              " tensors, expected E = ", E);
  for (int64_t e = 0; e < E; ++e) {
    const at::Tensor& x = outs[e];
    TORCH_CHECK(x.device() == ref.device() && x.scalar_type() == ref.scalar_type(), op, ": ", name, "[", e, "] is ",
                x.scalar_type(), " on ", x.device(), " but the shards are ", ref.scalar_type(), " on ", ref.device());
    TORCH_CHECK(x.sizes() == sizes, op, ": ", name, "[", e, "] has shape ", x.sizes(), ", expected ", sizes);
  }
}

// ---- fc1 --------------------------------------------------------------------------------------------------------

struct Fc1 {
  int64_t E, f;
};

Fc1 fc1_pack_check(const char* op, at::TensorList gate, at::TensorList up, int64_t ep_size, int64_t ep_rank,
                   int64_t etp_size, int64_t etp_rank) {
  const int64_t E = expert_list_check(op, gate, "gate", ep_size, etp_size);
  expert_list_check(op, up, "up", ep_size, etp_size);
  TORCH_CHECK(up.size() == gate.size(), op, ": up has ", up.size(), " experts but gate has ", gate.size());
  BRIDGE_CHECK_RANK(op, "ep_rank", ep_rank, "ep_size", ep_size);
  BRIDGE_CHECK_RANK(op, "etp_rank", etp_rank, "etp_size", etp_size);
  check_like(op, up[0], "up[0]", gate[0], "gate[0]");
  TORCH_CHECK(up[0].size(0) == gate[0].size(0), op, ": up[0] has ", up[0].size(0), " rows but gate[0] has ",
              gate[0].size(0));
  BRIDGE_CHECK_DIVISIBLE(op, "F (gate rows)", gate[0].size(0), "etp_size", etp_size);
  return {E, gate[0].size(0) / etp_size};
}

std::vector<int64_t> fc1_shard_shape(const at::Tensor& g0, int64_t local, int64_t f) {
  std::vector<int64_t> s{local, 2 * f};
  s.insert(s.end(), g0.sizes().begin() + 1, g0.sizes().end());
  return s;
}

void fc1_pack_into(at::TensorList gate, at::TensorList up, const Fc1& c, int64_t ep_size, int64_t ep_rank,
                   int64_t etp_rank, const at::Tensor& out) {
  const int64_t local = c.E / ep_size;
  const View ov = cpu::dst_view(out);
  std::vector<cpu::Pair> pairs;
  pairs.reserve(2 * local);
  for (int64_t e = 0; e < local; ++e) {
    const int64_t ge = ep_rank * local + e;
    const View oe = ov.select(e);
    cpu::add_pairs(pairs, cpu::src_view(gate[ge]).narrow(0, etp_rank * c.f, c.f), oe.narrow(0, 0, c.f));
    cpu::add_pairs(pairs, cpu::src_view(up[ge]).narrow(0, etp_rank * c.f, c.f), oe.narrow(0, c.f, c.f));
  }
  cpu::run_pairs(pairs, ov.elem);
}

// ---- fc2 --------------------------------------------------------------------------------------------------------

std::vector<int64_t> fc2_shard_shape(const at::Tensor& d0, int64_t local, int64_t etp_size) {
  std::vector<int64_t> s{local};
  s.insert(s.end(), d0.sizes().begin(), d0.sizes().end());
  if (d0.dim() == 2) s[2] /= etp_size;
  return s;
}

void fc2_check_dims(const char* op, const at::Tensor& d0, const char* name, int64_t etp_size) {
  TORCH_CHECK(d0.dim() == 1 || d0.dim() == 2, op, ": ", name, " has shape ", d0.sizes(),
              ", expected [D, F] (weight) or [D] (bias)");
  if (d0.dim() == 2) BRIDGE_CHECK_DIVISIBLE(op, "F (down columns)", d0.size(1), "etp_size", etp_size);
}

}  // namespace

at::Tensor expert_pack_fc1_cpu(at::TensorList gate, at::TensorList up, int64_t ep_size, int64_t ep_rank,
                               int64_t etp_size, int64_t etp_rank) {
  const auto c = fc1_pack_check("expert_pack_fc1", gate, up, ep_size, ep_rank, etp_size, etp_rank);
  at::Tensor out = at::empty(fc1_shard_shape(gate[0], c.E / ep_size, c.f), gate[0].options());
  fc1_pack_into(gate, up, c, ep_size, ep_rank, etp_rank, out);
  return out;
}

void expert_pack_fc1_out_cpu(at::TensorList gate, at::TensorList up, int64_t ep_size, int64_t ep_rank,
                             int64_t etp_size, int64_t etp_rank, const at::Tensor& out) {
  const char* op = "expert_pack_fc1_out";
  const auto c = fc1_pack_check(op, gate, up, ep_size, ep_rank, etp_size, etp_rank);
  BRIDGE_CHECK_SAME_DEVICE(op, out, "out", gate[0], "gate[0]");
  BRIDGE_CHECK_SAME_DTYPE(op, out, "out", gate[0], "gate[0]");
  check_shape(op, out, "out", fc1_shard_shape(gate[0], c.E / ep_size, c.f));
  fc1_pack_into(gate, up, c, ep_size, ep_rank, etp_rank, out);
}

namespace {

void fc2_pack_into(at::TensorList down, int64_t E, int64_t ep_size, int64_t ep_rank, int64_t etp_size,
                   int64_t etp_rank, const at::Tensor& out) {
  const int64_t local = E / ep_size;
  const View ov = cpu::dst_view(out);
  std::vector<cpu::Pair> pairs;
  pairs.reserve(local);
  for (int64_t e = 0; e < local; ++e) {
    View s = cpu::src_view(down[ep_rank * local + e]);
    if (s.dim() == 2) {
      const int64_t f = s.sizes[1] / etp_size;
      s = s.narrow(1, etp_rank * f, f);
    }
    cpu::add_pairs(pairs, s, ov.select(e));
  }
  cpu::run_pairs(pairs, ov.elem);
}

void fc2_pack_check(const char* op, at::TensorList down, int64_t ep_size, int64_t ep_rank, int64_t etp_size,
                    int64_t etp_rank) {
  expert_list_check(op, down, "down", ep_size, etp_size);
  BRIDGE_CHECK_RANK(op, "ep_rank", ep_rank, "ep_size", ep_size);
  BRIDGE_CHECK_RANK(op, "etp_rank", etp_rank, "etp_size", etp_size);
  fc2_check_dims(op, down[0], "down[0]", etp_size);
}

}  // namespace

at::Tensor expert_pack_fc2_cpu(at::TensorList down, int64_t ep_size, int64_t ep_rank, int64_t etp_size,
                               int64_t etp_rank) {
  fc2_pack_check("expert_pack_fc2", down, ep_size, ep_rank, etp_size, etp_rank);
  const int64_t E = static_cast<int64_t>(down.size());
  at::Tensor out = at::empty(fc2_shard_shape(down[0], E / ep_size, etp_size), down[0].options());
  fc2_pack_into(down, E, ep_size, ep_rank, etp_size, etp_rank, out);
  return out;
}

void expert_pack_fc2_out_cpu(at::TensorList down, int64_t ep_size, int64_t ep_rank, int64_t etp_size,
                             int64_t etp_rank, const at::Tensor& out) {
  const char* op = "expert_pack_fc2_out";
  fc2_pack_check(op, down, ep_size, ep_rank, etp_size, etp_rank);
  const int64_t E = static_cast<int64_t>(down.size());
  BRIDGE_CHECK_SAME_DEVICE(op, out, "out", down[0], "down[0]");
  BRIDGE_CHECK_SAME_DTYPE(op, out, "out", down[0], "down[0]");
  check_shape(op, out, "out", fc2_shard_shape(down[0], E / ep_size, etp_size));
  fc2_pack_into(down, E, ep_size, ep_rank, etp_size, etp_rank, out);
}

// ---- unpack -------------------------------------------------------------------------------------------------------

namespace {

// Per-expert destination views: either E given tensors or the experts of one stacked tensor.
std::vector<View> expert_views(at::TensorList outs) {
  std::vector<View> v;
  v.reserve(outs.size());
  for (const at::Tensor& t : outs) v.push_back(cpu::dst_view(t));
  return v;
}

std::vector<View> expert_views(const at::Tensor& stacked) {
  const View s = cpu::dst_view(stacked);
  std::vector<View> v;
  v.reserve(stacked.size(0));
  for (int64_t e = 0; e < stacked.size(0); ++e) v.push_back(s.select(e));
  return v;
}

void fc1_unpack_into(at::TensorList shards, int64_t ep_size, int64_t etp_size, const std::vector<View>& gate,
                     const std::vector<View>& up) {
  const int64_t local = shards[0].size(0);
  const int64_t f = shards[0].size(1) / 2;
  std::vector<cpu::Pair> pairs;
  pairs.reserve(2 * local * ep_size * etp_size);
  for (int64_t r = 0; r < ep_size; ++r) {
    for (int64_t t = 0; t < etp_size; ++t) {
      const View sv = cpu::src_view(shards[r * etp_size + t]);
      for (int64_t e = 0; e < local; ++e) {
        const View se = sv.select(e);
        const int64_t ge = r * local + e;
        cpu::add_pairs(pairs, se.narrow(0, 0, f), gate[ge].narrow(0, t * f, f));
        cpu::add_pairs(pairs, se.narrow(0, f, f), up[ge].narrow(0, t * f, f));
      }
    }
  }
  cpu::run_pairs(pairs, shards[0].element_size());
}

void fc1_unpack_check(const char* op, at::TensorList shards, int64_t ep_size, int64_t etp_size) {
  expert_shards_check(op, shards, ep_size, etp_size);
  TORCH_CHECK(shards[0].size(1) % 2 == 0, op, ": shards have ", shards[0].size(1),
              " rows per expert (dim 1), expected an even 2F/etp");
}

std::vector<int64_t> fc1_expert_shape(const at::Tensor& s0, int64_t etp_size) {
  std::vector<int64_t> s{s0.size(1) / 2 * etp_size};
  s.insert(s.end(), s0.sizes().begin() + 2, s0.sizes().end());
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> expert_unpack_fc1_cpu(at::TensorList shards, int64_t ep_size, int64_t etp_size) {
  fc1_unpack_check("expert_unpack_fc1", shards, ep_size, etp_size);
  std::vector<int64_t> shape = fc1_expert_shape(shards[0], etp_size);
  shape.insert(shape.begin(), shards[0].size(0) * ep_size);
  at::Tensor gate = at::empty(shape, shards[0].options());
  at::Tensor up = at::empty(shape, shards[0].options());
  fc1_unpack_into(shards, ep_size, etp_size, expert_views(gate), expert_views(up));
  return {gate, up};
}

void expert_unpack_fc1_out_cpu(at::TensorList shards, int64_t ep_size, int64_t etp_size, at::TensorList gate,
                               at::TensorList up) {
  const char* op = "expert_unpack_fc1_out";
  fc1_unpack_check(op, shards, ep_size, etp_size);
  const int64_t E = shards[0].size(0) * ep_size;
  const auto shape = fc1_expert_shape(shards[0], etp_size);
  check_out_list(op, gate, "gate", E, shape, shards[0]);
  check_out_list(op, up, "up", E, shape, shards[0]);
  fc1_unpack_into(shards, ep_size, etp_size, expert_views(gate), expert_views(up));
}

namespace {

void fc2_unpack_check(const char* op, at::TensorList shards, int64_t ep_size, int64_t etp_size) {
  expert_shards_check(op, shards, ep_size, etp_size);
  TORCH_CHECK(shards[0].dim() == 2 || shards[0].dim() == 3, op, ": shards[0] has shape ", shards[0].sizes(),
              ", expected [E/ep, D, F/etp] (weight) or [E/ep, D] (bias)");
}

std::vector<int64_t> fc2_expert_shape(const at::Tensor& s0, int64_t etp_size) {
  if (s0.dim() == 3) return {s0.size(1), s0.size(2) * etp_size};
  return {s0.size(1)};
}

void fc2_unpack_into(at::TensorList shards, int64_t ep_size, int64_t etp_size, const std::vector<View>& down) {
  const int64_t local = shards[0].size(0);
  const bool weight = shards[0].dim() == 3;
  std::vector<cpu::Pair> pairs;
  pairs.reserve(local * ep_size * etp_size);
  for (int64_t r = 0; r < ep_size; ++r) {
    // 1-D (bias) shards are replicated over ETP: take ETP rank 0's.
    for (int64_t t = 0; t < (weight ? etp_size : 1); ++t) {
      const View sv = cpu::src_view(shards[r * etp_size + t]);
      for (int64_t e = 0; e < local; ++e) {
        const View se = sv.select(e);
        View de = down[r * local + e];
        if (weight) {
          const int64_t f = se.sizes[1];
          de = de.narrow(1, t * f, f);
        }
        cpu::add_pairs(pairs, se, de);
      }
    }
  }
  cpu::run_pairs(pairs, shards[0].element_size());
}

}  // namespace

at::Tensor expert_unpack_fc2_cpu(at::TensorList shards, int64_t ep_size, int64_t etp_size) {
  fc2_unpack_check("expert_unpack_fc2", shards, ep_size, etp_size);
  std::vector<int64_t> shape = fc2_expert_shape(shards[0], etp_size);
  shape.insert(shape.begin(), shards[0].size(0) * ep_size);
  at::Tensor down = at::empty(shape, shards[0].options());
  fc2_unpack_into(shards, ep_size, etp_size, expert_views(down));
  return down;
}

void expert_unpack_fc2_out_cpu(at::TensorList shards, int64_t ep_size, int64_t etp_size, at::TensorList down) {
  const char* op = "expert_unpack_fc2_out";
  fc2_unpack_check(op, shards, ep_size, etp_size);
  check_out_list(op, down, "down", shards[0].size(0) * ep_size, fc2_expert_shape(shards[0], etp_size), shards[0]);
  fc2_unpack_into(shards, ep_size, etp_size, expert_views(down));
}

TORCH_LIBRARY_IMPL(bridge, CPU, m) {
  m.impl("expert_pack_fc1", &expert_pack_fc1_cpu);
  m.impl("expert_pack_fc1_out", &expert_pack_fc1_out_cpu);
  m.impl("expert_pack_fc2", &expert_pack_fc2_cpu);
  m.impl("expert_pack_fc2_out", &expert_pack_fc2_out_cpu);
  m.impl("expert_unpack_fc1", &expert_unpack_fc1_cpu);
  m.impl("expert_unpack_fc1_out", &expert_unpack_fc1_out_cpu);
  m.impl("expert_unpack_fc2", &expert_unpack_fc2_cpu);
  m.impl("expert_unpack_fc2_out", &expert_unpack_fc2_out_cpu);
}

}  // namespace bridge
