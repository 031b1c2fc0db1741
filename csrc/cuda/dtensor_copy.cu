// DTensor shard copy and Megatron-FSDP flat-range copy on CUDA: strided sub-views of the source moved into the
// destination in one launch, for any strides and dtype.
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "copy_plan.cuh"

namespace bridge {
namespace {

using cuda_detail::CopyPlan;
using cuda_detail::Dims;
using cuda_detail::View;

// The view's dims with size-1 dims dropped and mergeable neighbours merged (the view's own layout only).
View flat_coalesce(const View& v) {
  View o;
  o.ptr = v.ptr;
  o.elem = v.elem;
  for (size_t i = 0; i < v.sizes.size(); ++i) {
    if (v.sizes[i] == 1) continue;
    if (!o.sizes.empty() && o.strides.back() == v.strides[i] * v.sizes[i]) {
      o.sizes.back() *= v.sizes[i];
      o.strides.back() = v.strides[i];
      continue;
    }
    o.sizes.push_back(v.sizes[i]);
    o.strides.push_back(v.strides[i]);
  }
  return o;
}

// Row-major contiguous strides of `sizes`, times `scale`.
Dims flat_strides(const Dims& sizes, int64_t scale) {
  Dims s(sizes.size());
  int64_t acc = scale;
  for (size_t i = sizes.size(); i-- > 0;) {
    s[i] = acc;
    acc *= sizes[i];
  }
  return s;
}

// Splits elements [a, b) (row-major) of `v` into strided blocks; calls emit(block, flat index of its first element).
template <typename F>
void flat_blocks(const View& v, int64_t a, int64_t b, int64_t base, F&& emit) {
  if (a >= b) return;
  if (v.sizes.empty()) return emit(v, base);
  int64_t inner = 1;
  for (size_t i = 1; i < v.sizes.size(); ++i) inner *= v.sizes[i];
  const int64_t first_full = (a + inner - 1) / inner, end_full = b / inner;
  if (first_full > end_full) {  // [a, b) inside one row of dim 0
    const int64_t r = a / inner;
    return flat_blocks(v.select(r), a - r * inner, b - r * inner, base + r * inner, emit);
  }
  if (a < first_full * inner) {
    const int64_t r = a / inner;
    flat_blocks(v.select(r), a - r * inner, inner, base + r * inner, emit);
  }
  if (end_full > first_full) emit(v.rows(first_full, end_full - first_full), base + first_full * inner);
  if (b > end_full * inner) flat_blocks(v.select(end_full), 0, b - end_full * inner, base + end_full * inner, emit);
}

}  // namespace

void shard_copy_cuda(const at::Tensor& src, const at::Tensor& dst, at::IntArrayRef mesh_shape,
                     at::IntArrayRef mesh_coord, at::IntArrayRef shard_dims) {
  const char* op = "shard_copy";
  cuda_detail::check_cuda(op, src, "src");
  cuda_detail::check_like(op, dst, "dst", src, "src");
  TORCH_CHECK(mesh_shape.size() == mesh_coord.size() && mesh_shape.size() == shard_dims.size(), op,
              ": mesh_shape ", mesh_shape, ", mesh_coord ", mesh_coord, " and shard_dims ", shard_dims,
              " must have the same length");
  TORCH_CHECK(dst.dim() == src.dim(), op, ": dst has ", dst.dim(), " dims but src has ", src.dim());
  View v = View::of(src);
  for (size_t i = 0; i < mesh_shape.size(); ++i) {
    BRIDGE_CHECK_RANK(op, "mesh_coord[i]", mesh_coord[i], "mesh_shape[i]", mesh_shape[i]);
    const int64_t dim = shard_dims[i];
    if (dim == -1) continue;
    TORCH_CHECK(dim >= 0 && dim < src.dim(), op, ": shard_dims[", i, "] = ", dim, " is out of range for a ",
                src.dim(), "-D tensor");
    const int64_t size = v.sizes[dim];
    const int64_t chunk = (size + mesh_shape[i] - 1) / mesh_shape[i];  // torch.chunk; trailing chunks may be empty
    const int64_t start = std::min(size, mesh_coord[i] * chunk);
    v = v.narrow(dim, start, std::min(size, start + chunk) - start);
  }
  TORCH_CHECK(dst.sizes() == at::IntArrayRef(v.sizes), op, ": dst has shape ", dst.sizes(), " but the shard of src ",
              src.sizes(), " at mesh_coord ", mesh_coord, " (mesh_shape ", mesh_shape, ", shard_dims ", shard_dims,
              ") has shape ", at::IntArrayRef(v.sizes));
  CopyPlan plan(src.element_size());
  plan.add(v, View::of(dst));
  plan.launch(src.device());
}

void flat_range_copy_cuda(const at::Tensor& src, const at::Tensor& dst, int64_t start) {
  const char* op = "flat_range_copy";
  cuda_detail::check_cuda(op, src, "src");
  cuda_detail::check_like(op, dst, "dst", src, "src");
  TORCH_CHECK(start >= 0 && start + dst.numel() <= src.numel(), op, ": range [", start, ", ", start + dst.numel(),
              ") of the flattened src is out of bounds for src of ", src.numel(), " elements (shape ", src.sizes(),
              ")");
  if (dst.numel() == 0) return;
  CopyPlan plan(src.element_size());
  const View s = flat_coalesce(View::of(src)), d = View::of(dst), dflat = flat_coalesce(d);
  if (s.sizes.size() <= 1) {
    // src is one strided run: its range viewed with dst's sizes.
    const int64_t step = s.sizes.empty() ? 1 : s.strides[0];
    View sv;
    sv.ptr = s.ptr + start * step * s.elem;
    sv.elem = s.elem;
    sv.sizes = d.sizes;
    sv.strides = flat_strides(d.sizes, step);
    plan.add(sv, d);
  } else if (dflat.sizes.size() <= 1) {
    // dst is one strided run: blocks of the source range map to runs of it.
    const int64_t step = dflat.sizes.empty() ? 1 : dflat.strides[0];
    flat_blocks(s, start, start + dst.numel(), 0, [&](const View& blk, int64_t at) {
      View dv;
      dv.ptr = dflat.ptr + (at - start) * step * d.elem;
      dv.elem = d.elem;
      dv.sizes = blk.sizes;
      dv.strides = flat_strides(blk.sizes, step);
      plan.add(blk, dv);
    });
  } else {
    plan.add_nd(s, start, dflat);
  }
  plan.launch(src.device());
}

TORCH_LIBRARY_IMPL(bridge, CUDA, m) {
  m.impl("shard_copy", &shard_copy_cuda);
  m.impl("flat_range_copy", &flat_range_copy_cuda);
}

}  // namespace bridge
