// DTensor local shards and Megatron-FSDP flat ranges: argument checks and layout walks, shared by
// csrc/cpu/dtensor_copy.cpp and csrc/cuda/dtensor_copy.cu.
//
// shard_copy: the local shard of a full tensor for one mesh coordinate, equal to what distribute_tensor gives for
// Shard/Replicate placements (torch.chunk on each sharded dim, nested in mesh-dim order): one strided box.
// flat_range_copy: dst <- src.flatten()[start : start + dst.numel()] without materialising the flattened tensor.
// When either side is one strided run after coalescing, the range is a few strided blocks of the other side and
// goes to the executor as ordinary (src, dst) pieces; otherwise both sides are walked element by element in
// row-major order, which each executor does its own way (emit_nd).
#pragma once
#include <algorithm>
#include <utility>

#include "../checks.h"
#include "strided.h"

namespace bridge {

// ---- shard_copy ----------------------------------------------------------------------------------------------------

using ShardBox = std::vector<std::pair<int64_t, int64_t>>;  // (offset, length) per tensor dim

// For each tensor dim, (offset, length) of the shard of `sizes` owned by mesh_coord (torch.chunk, nested in mesh-dim
// order); validates the mesh arguments.
inline ShardBox shard_box(const char* op, at::IntArrayRef sizes, at::IntArrayRef mesh_shape,
                          at::IntArrayRef mesh_coord, at::IntArrayRef shard_dims) {
  TORCH_CHECK(mesh_shape.size() == mesh_coord.size() && mesh_shape.size() == shard_dims.size(), op,
              ": mesh_shape ", mesh_shape, ", mesh_coord ", mesh_coord, " and shard_dims ", shard_dims,
              " must have the same length");
  const int64_t ndim = static_cast<int64_t>(sizes.size());
  ShardBox box;
  for (int64_t k = 0; k < ndim; ++k) box.emplace_back(0, sizes[k]);
  for (size_t i = 0; i < mesh_shape.size(); ++i) {
    const int64_t m = mesh_shape[i], c = mesh_coord[i], k = shard_dims[i];
    TORCH_CHECK(m >= 1, op, ": mesh_shape[", i, "] = ", m, " must be >= 1 (mesh_shape ", mesh_shape, ")");
    TORCH_CHECK(c >= 0 && c < m, op, ": mesh_coord[", i, "] = ", c, " is out of range for mesh_shape[", i,
                "] = ", m);
    TORCH_CHECK(k >= -1 && k < ndim, op, ": shard_dims[", i, "] = ", k, " is out of range for a ", ndim,
                "-d tensor (use -1 for Replicate)");
    if (k < 0) continue;
    const int64_t len = box[k].second;
    const int64_t chunk = (len + m - 1) / m;  // torch.chunk: ceil-sized chunks, trailing ones may be empty
    const int64_t start = std::min(c * chunk, len);
    box[k].first += start;
    box[k].second = std::min(chunk, len - start);
  }
  return box;
}

// Validates shard_copy's arguments; returns the box of src that dst receives.
inline ShardBox shard_copy_check(const char* op, const at::Tensor& src, const at::Tensor& dst,
                                 at::IntArrayRef mesh_shape, at::IntArrayRef mesh_coord, at::IntArrayRef shard_dims) {
  BRIDGE_CHECK_SAME_DEVICE(op, dst, "dst", src, "src");
  BRIDGE_CHECK_SAME_DTYPE(op, dst, "dst", src, "src");
  ShardBox box = shard_box(op, src.sizes(), mesh_shape, mesh_coord, shard_dims);
  std::vector<int64_t> local;
  for (const auto& b : box) local.push_back(b.second);
  TORCH_CHECK(dst.sizes() == at::IntArrayRef(local), op, ": dst has shape ", dst.sizes(), " but the shard of src ",
              src.sizes(), " at mesh_coord ", mesh_coord, " (mesh_shape ", mesh_shape, ", shard_dims ", shard_dims,
              ") has shape ", at::IntArrayRef(local));
  return box;
}

// emit(src box, dst): one piece.
template <class Emit>
void shard_copy_walk(const ShardBox& box, const at::Tensor& src, const at::Tensor& dst, Emit&& emit) {
  View s = src_view(src);
  for (size_t k = 0; k < box.size(); ++k) s = s.narrow(static_cast<int64_t>(k), box[k].first, box[k].second);
  emit(s, dst_view(dst));
}

// ---- flat_range_copy -----------------------------------------------------------------------------------------------

inline void flat_range_copy_check(const char* op, const at::Tensor& src, const at::Tensor& dst, int64_t start) {
  BRIDGE_CHECK_SAME_DEVICE(op, dst, "dst", src, "src");
  BRIDGE_CHECK_SAME_DTYPE(op, dst, "dst", src, "src");
  const int64_t n = dst.numel();
  TORCH_CHECK(start >= 0 && start + n <= src.numel(), op, ": range [", start, ", ", start + n,
              ") (start + dst.numel() = ", start, " + ", n, ") is beyond src.numel() = ", src.numel());
}

// Splits elements [a, b) (row-major) of `v` into strided blocks; calls emit(block, flat index of its first element).
// At most two partial rows per dim level plus one block of whole rows: O(dims) blocks.
template <class F>
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

// The walk of flat_range_copy (checked by flat_range_copy_check). emit(src, dst) receives pieces of equal sizes;
// emit_nd(src, start, dst) receives the coalesced views when neither side is one strided run: dst element i
// (row-major over dst.sizes) <- src element start + i (row-major over src.sizes).
template <class Emit, class EmitNd>
void flat_range_copy_walk(const at::Tensor& src, const at::Tensor& dst, int64_t start, Emit&& emit,
                          EmitNd&& emit_nd) {
  const int64_t n = dst.numel();
  if (n == 0) return;
  const View s = coalesce(src_view(src)), d = coalesce(dst_view(dst));
  if (s.dim() <= 1) {
    // src is one strided run: its range, viewed with dst's sizes.
    const int64_t step = s.dim() == 0 ? 1 : s.strides[0];
    View sv;
    sv.ptr = s.ptr + start * step * s.elem;
    sv.elem = s.elem;
    sv.sizes = d.sizes;
    sv.strides = row_major_strides(d.sizes, step);
    emit(sv, d);
  } else if (d.dim() <= 1) {
    // dst is one strided run: the blocks of the source range map to stretches of it.
    const int64_t step = d.dim() == 0 ? 1 : d.strides[0];
    flat_blocks(s, start, start + n, 0, [&](const View& blk, int64_t at) {
      View dv;
      dv.ptr = d.ptr + (at - start) * step * d.elem;
      dv.elem = d.elem;
      dv.sizes = blk.sizes;
      dv.strides = row_major_strides(blk.sizes, step);
      emit(blk, dv);
    });
  } else {
    emit_nd(s, start, d);
  }
}

}  // namespace bridge
