// MoE expert pack/unpack on CUDA (conversion_semantics.md section 4): this (EP, ETP) rank's stacked linear_fc1 /
// linear_fc2 from E per-expert HF tensors, and the gathered shards back, each call one launch.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../checks.h"
#include "copy_plan.cuh"

namespace bridge {
namespace {

using cuda_detail::CopyPlan;
using cuda_detail::View;

// All tensors of a list on CUDA, with ref's dtype, device and shape; returns their views.
std::vector<View> expert_views(const char* op, at::TensorList ts, const char* name, const at::Tensor& ref,
                               const char* ref_name, at::IntArrayRef shape) {
  std::vector<View> views;
  views.reserve(ts.size());
  for (size_t e = 0; e < ts.size(); ++e) {
    const at::Tensor& t = ts[e];
    TORCH_CHECK(t.is_cuda(), op, ": ", name, "[", e, "] must be a CUDA tensor, got device ", t.device());
    TORCH_CHECK(t.device() == ref.device(), op, ": ", name, "[", e, "] is on ", t.device(), " but ", ref_name,
                " is on ", ref.device());
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, "[", e, "] has dtype ", t.scalar_type(),
                " but ", ref_name, " has dtype ", ref.scalar_type());
    TORCH_CHECK(t.sizes() == shape, op, ": ", name, "[", e, "] has shape ", t.sizes(), ", expected ", shape);
    views.push_back(View::of(t));
  }
  return views;
}

void expert_check_ep(const char* op, int64_t num_experts, int64_t ep_size, int64_t ep_rank, int64_t etp_size,
                     int64_t etp_rank) {
  TORCH_CHECK(num_experts >= 1, op, ": got ", num_experts, " experts, expected at least 1");
  BRIDGE_CHECK_RANK(op, "ep_rank", ep_rank, "ep_size", ep_size);
  BRIDGE_CHECK_RANK(op, "etp_rank", etp_rank, "etp_size", etp_size);
  BRIDGE_CHECK_DIVISIBLE(op, "number of experts E", num_experts, "ep_size", ep_size);
}

std::vector<int64_t> expert_stacked(int64_t n, at::IntArrayRef shape) {
  std::vector<int64_t> s{n};
  s.insert(s.end(), shape.begin(), shape.end());
  return s;
}

// fc1: out[e] = [gate[g]; up[g]] rows [t*f, (t+1)*f) of global expert g = ep_rank*El + e.
void expert_fc1_pack_plan(const char* op, at::TensorList gate, at::TensorList up, int64_t ep_size, int64_t ep_rank,
                          int64_t etp_size, int64_t etp_rank, const at::Tensor* out, at::Tensor* made) {
  TORCH_CHECK(!gate.empty(), op, ": gate is an empty list");
  TORCH_CHECK(gate.size() == up.size(), op, ": got ", gate.size(), " gate and ", up.size(), " up tensors");
  const int64_t E = static_cast<int64_t>(gate.size());
  expert_check_ep(op, E, ep_size, ep_rank, etp_size, etp_rank);
  const at::Tensor& ref = gate[0];
  TORCH_CHECK(ref.dim() == 1 || ref.dim() == 2, op, ": gate[0] must be 1-D or 2-D, got shape ", ref.sizes());
  BRIDGE_CHECK_DIVISIBLE(op, "expert rows F", ref.size(0), "etp_size", etp_size);
  const int64_t El = E / ep_size, f = ref.size(0) / etp_size;
  const std::vector<View> g = expert_views(op, gate, "gate", ref, "gate[0]", ref.sizes());
  const std::vector<View> u = expert_views(op, up, "up", ref, "gate[0]", ref.sizes());
  const auto shape = expert_stacked(El, cuda_detail::with_rows(ref, 2 * f));
  if (out == nullptr) {
    *made = at::empty(shape, ref.options());
    out = made;
  } else {
    cuda_detail::check_like(op, *out, "out", ref, "gate[0]");
    cuda_detail::check_shape(op, *out, "out", shape);
  }
  CopyPlan plan(ref.element_size());
  const View o = View::of(*out);
  for (int64_t e = 0; e < El; ++e) {
    const int64_t ge = ep_rank * El + e;
    const View oe = o.select(e);
    plan.add(g[ge].rows(etp_rank * f, f), oe.rows(0, f));
    plan.add(u[ge].rows(etp_rank * f, f), oe.rows(f, f));
  }
  plan.launch(ref.device());
}

// fc2: out[e] = down[g][:, t*c:(t+1)*c] (2-D) or down[g] (1-D, replicated over ETP).
void expert_fc2_pack_plan(const char* op, at::TensorList down, int64_t ep_size, int64_t ep_rank, int64_t etp_size,
                          int64_t etp_rank, const at::Tensor* out, at::Tensor* made) {
  TORCH_CHECK(!down.empty(), op, ": down is an empty list");
  const int64_t E = static_cast<int64_t>(down.size());
  expert_check_ep(op, E, ep_size, ep_rank, etp_size, etp_rank);
  const at::Tensor& ref = down[0];
  TORCH_CHECK(ref.dim() == 1 || ref.dim() == 2, op, ": down[0] must be 1-D or 2-D, got shape ", ref.sizes());
  const bool sharded = ref.dim() == 2;
  if (sharded) BRIDGE_CHECK_DIVISIBLE(op, "down columns F", ref.size(1), "etp_size", etp_size);
  const int64_t El = E / ep_size, c = sharded ? ref.size(1) / etp_size : 0;
  const std::vector<View> d = expert_views(op, down, "down", ref, "down[0]", ref.sizes());
  const auto shape = sharded ? std::vector<int64_t>{El, ref.size(0), c} : std::vector<int64_t>{El, ref.size(0)};
  if (out == nullptr) {
    *made = at::empty(shape, ref.options());
    out = made;
  } else {
    cuda_detail::check_like(op, *out, "out", ref, "down[0]");
    cuda_detail::check_shape(op, *out, "out", shape);
  }
  CopyPlan plan(ref.element_size());
  const View o = View::of(*out);
  for (int64_t e = 0; e < El; ++e) {
    const View& src = d[ep_rank * El + e];
    plan.add(sharded ? src.narrow(1, etp_rank * c, c) : src, o.select(e));
  }
  plan.launch(ref.device());
}

// Shard checks for unpack: ep*etp shards of one shape [El, ...] with rank >= min_dim.
void expert_check_shards(const char* op, at::TensorList shards, int64_t ep_size, int64_t etp_size) {
  TORCH_CHECK(ep_size >= 1 && etp_size >= 1, op, ": ep_size = ", ep_size, " and etp_size = ", etp_size,
              " must be >= 1");
  TORCH_CHECK(static_cast<int64_t>(shards.size()) == ep_size * etp_size, op, ": got ", shards.size(),
              " shards, expected ep_size*etp_size = ", ep_size, "*", etp_size, " = ", ep_size * etp_size);
  const at::Tensor& ref = shards[0];
  TORCH_CHECK(ref.dim() == 2 || ref.dim() == 3, op, ": shards[0] must be 2-D or 3-D, got shape ", ref.sizes());
  expert_views(op, shards, "shards", ref, "shards[0]", ref.sizes());
}

void expert_fc1_unpack_plan(const char* op, at::TensorList shards, int64_t ep_size, int64_t etp_size,
                            const std::vector<View>& gate, const std::vector<View>& up, const at::Tensor& ref) {
  const int64_t El = ref.size(0), f = ref.size(1) / 2;
  CopyPlan plan(ref.element_size());
  for (int64_t r = 0; r < ep_size; ++r) {
    for (int64_t t = 0; t < etp_size; ++t) {
      const View s = View::of(shards[r * etp_size + t]);
      for (int64_t e = 0; e < El; ++e) {
        const View se = s.select(e);
        plan.add(se.rows(0, f), gate[r * El + e].rows(t * f, f));
        plan.add(se.rows(f, f), up[r * El + e].rows(t * f, f));
      }
    }
  }
  plan.launch(ref.device());
}

void expert_fc2_unpack_plan(at::TensorList shards, int64_t ep_size, int64_t etp_size, const std::vector<View>& down,
                            const at::Tensor& ref) {
  const int64_t El = ref.size(0);
  const bool sharded = ref.dim() == 3;
  const int64_t c = sharded ? ref.size(2) : 0;
  CopyPlan plan(ref.element_size());
  for (int64_t r = 0; r < ep_size; ++r) {
    for (int64_t t = 0; t < (sharded ? etp_size : 1); ++t) {  // 1-D (bias) shards are replicated over ETP
      const View s = View::of(shards[r * etp_size + t]);
      for (int64_t e = 0; e < El; ++e) {
        const View& dst = down[r * El + e];
        plan.add(s.select(e), sharded ? dst.narrow(1, t * c, c) : dst);
      }
    }
  }
  plan.launch(ref.device());
}

std::vector<View> rows_of(const at::Tensor& stacked) {
  const View v = View::of(stacked);
  std::vector<View> out;
  for (int64_t e = 0; e < stacked.size(0); ++e) out.push_back(v.select(e));
  return out;
}

}  // namespace

at::Tensor expert_pack_fc1_cuda(at::TensorList gate, at::TensorList up, int64_t ep_size, int64_t ep_rank,
                                int64_t etp_size, int64_t etp_rank) {
  at::Tensor out;
  expert_fc1_pack_plan("expert_pack_fc1", gate, up, ep_size, ep_rank, etp_size, etp_rank, nullptr, &out);
  return out;
}

void expert_pack_fc1_out_cuda(at::TensorList gate, at::TensorList up, int64_t ep_size, int64_t ep_rank,
                              int64_t etp_size, int64_t etp_rank, const at::Tensor& out) {
  expert_fc1_pack_plan("expert_pack_fc1_out", gate, up, ep_size, ep_rank, etp_size, etp_rank, &out, nullptr);
}

at::Tensor expert_pack_fc2_cuda(at::TensorList down, int64_t ep_size, int64_t ep_rank, int64_t etp_size,
                                int64_t etp_rank) {
  at::Tensor out;
  expert_fc2_pack_plan("expert_pack_fc2", down, ep_size, ep_rank, etp_size, etp_rank, nullptr, &out);
  return out;
}

void expert_pack_fc2_out_cuda(at::TensorList down, int64_t ep_size, int64_t ep_rank, int64_t etp_size,
                              int64_t etp_rank, const at::Tensor& out) {
  expert_fc2_pack_plan("expert_pack_fc2_out", down, ep_size, ep_rank, etp_size, etp_rank, &out, nullptr);
}

std::tuple<at::Tensor, at::Tensor> expert_unpack_fc1_cuda(at::TensorList shards, int64_t ep_size,
                                                          int64_t etp_size) {
  const char* op = "expert_unpack_fc1";
  expert_check_shards(op, shards, ep_size, etp_size);
  const at::Tensor& ref = shards[0];
  BRIDGE_CHECK_DIVISIBLE(op, "shard rows 2f", ref.size(1), "2", 2);
  std::vector<int64_t> shape(ref.sizes().begin(), ref.sizes().end());
  shape[0] *= ep_size;
  shape[1] = shape[1] / 2 * etp_size;
  at::Tensor gate = at::empty(shape, ref.options()), up = at::empty(shape, ref.options());
  expert_fc1_unpack_plan(op, shards, ep_size, etp_size, rows_of(gate), rows_of(up), ref);
  return {gate, up};
}

void expert_unpack_fc1_out_cuda(at::TensorList shards, int64_t ep_size, int64_t etp_size, at::TensorList gate,
                                at::TensorList up) {
  const char* op = "expert_unpack_fc1_out";
  expert_check_shards(op, shards, ep_size, etp_size);
  const at::Tensor& ref = shards[0];
  BRIDGE_CHECK_DIVISIBLE(op, "shard rows 2f", ref.size(1), "2", 2);
  const int64_t E = ref.size(0) * ep_size;
  TORCH_CHECK(static_cast<int64_t>(gate.size()) == E && static_cast<int64_t>(up.size()) == E, op, ": got ",
              gate.size(), " gate and ", up.size(), " up tensors, expected E = ", E);
  std::vector<int64_t> shape(ref.sizes().begin() + 1, ref.sizes().end());
  shape[0] = shape[0] / 2 * etp_size;
  expert_fc1_unpack_plan(op, shards, ep_size, etp_size, expert_views(op, gate, "gate", ref, "shards[0]", shape),
                         expert_views(op, up, "up", ref, "shards[0]", shape), ref);
}

at::Tensor expert_unpack_fc2_cuda(at::TensorList shards, int64_t ep_size, int64_t etp_size) {
  const char* op = "expert_unpack_fc2";
  expert_check_shards(op, shards, ep_size, etp_size);
  const at::Tensor& ref = shards[0];
  std::vector<int64_t> shape(ref.sizes().begin(), ref.sizes().end());
  shape[0] *= ep_size;
  if (ref.dim() == 3) shape[2] *= etp_size;
  at::Tensor down = at::empty(shape, ref.options());
  expert_fc2_unpack_plan(shards, ep_size, etp_size, rows_of(down), ref);
  return down;
}

void expert_unpack_fc2_out_cuda(at::TensorList shards, int64_t ep_size, int64_t etp_size, at::TensorList down) {
  const char* op = "expert_unpack_fc2_out";
  expert_check_shards(op, shards, ep_size, etp_size);
  const at::Tensor& ref = shards[0];
  const int64_t E = ref.size(0) * ep_size;
  TORCH_CHECK(static_cast<int64_t>(down.size()) == E, op, ": got ", down.size(), " down tensors, expected E = ", E);
  std::vector<int64_t> shape(ref.sizes().begin() + 1, ref.sizes().end());
  if (ref.dim() == 3) shape[1] *= etp_size;
  expert_fc2_unpack_plan(shards, ep_size, etp_size, expert_views(op, down, "down", ref, "shards[0]", shape), ref);
}

TORCH_LIBRARY_IMPL(bridge, CUDA, m) {
  m.impl("expert_pack_fc1", &expert_pack_fc1_cuda);
  m.impl("expert_pack_fc1_out", &expert_pack_fc1_out_cuda);
  m.impl("expert_pack_fc2", &expert_pack_fc2_cuda);
  m.impl("expert_pack_fc2_out", &expert_pack_fc2_out_cuda);
  m.impl("expert_unpack_fc1", &expert_unpack_fc1_cuda);
  m.impl("expert_unpack_fc1_out", &expert_unpack_fc1_out_cuda);
  m.impl("expert_unpack_fc2", &expert_unpack_fc2_cuda);
  m.impl("expert_unpack_fc2_out", &expert_unpack_fc2_out_cuda);
}

}  // namespace bridge
