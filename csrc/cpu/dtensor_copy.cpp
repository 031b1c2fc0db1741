// DTensor local shards and Megatron-FSDP flat ranges on CPU.
//
// shard_copy: the local shard of a full tensor for one mesh coordinate, equal to what distribute_tensor gives for
// Shard/Replicate placements (torch.chunk on each sharded dim, nested in mesh-dim order); one strided box copy.
// flat_range_copy: dst <- src.flatten()[start : start + dst.numel()] without materialising the flattened tensor:
// both tensors are walked in row-major order in runs bounded by their innermost (coalesced) dims.
#include <torch/library.h>

#include "../checks.h"
#include "../ops.h"
#include "block_copy.h"

namespace bridge {

std::vector<std::pair<int64_t, int64_t>> shard_box(const char* op, at::IntArrayRef sizes, at::IntArrayRef mesh_shape,
                                                   at::IntArrayRef mesh_coord, at::IntArrayRef shard_dims) {
  TORCH_CHECK(mesh_shape.size() == mesh_coord.size() && mesh_shape.size() == shard_dims.size(), op,
              ": mesh_shape ", mesh_shape, ", mesh_coord ", mesh_coord, " and shard_dims ", shard_dims,
              " must have the same length");
  const int64_t ndim = static_cast<int64_t>(sizes.size());
  std::vector<std::pair<int64_t, int64_t>> box;
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

void shard_copy_cpu(const at::Tensor& src, const at::Tensor& dst, at::IntArrayRef mesh_shape,
                    at::IntArrayRef mesh_coord, at::IntArrayRef shard_dims) {
  const char* op = "shard_copy";
  BRIDGE_CHECK_SAME_DEVICE(op, dst, "dst", src, "src");
  BRIDGE_CHECK_SAME_DTYPE(op, dst, "dst", src, "src");
  const auto box = shard_box(op, src.sizes(), mesh_shape, mesh_coord, shard_dims);
  std::vector<int64_t> local;
  for (const auto& b : box) local.push_back(b.second);
  TORCH_CHECK(dst.sizes() == at::IntArrayRef(local), op, ": dst has shape ", dst.sizes(), " but the shard of src ",
              src.sizes(), " at mesh_coord ", mesh_coord, " (mesh_shape ", mesh_shape, ", shard_dims ", shard_dims,
              ") has shape ", at::IntArrayRef(local));
  cpu::View s = cpu::src_view(src);
  for (size_t k = 0; k < box.size(); ++k) s = s.narrow(static_cast<int64_t>(k), box[k].first, box[k].second);
  cpu::copy_view(s, cpu::dst_view(dst));
}

namespace {

// A tensor walked in row-major order: coalesced sizes/strides and a position (multi-index, offset in elements).
struct Walker {
  c10::SmallVector<int64_t, 6> sizes, strides, idx;
  int64_t offset = 0;

  explicit Walker(const at::Tensor& t) {
    for (int64_t k = 0; k < t.dim(); ++k) {
      const int64_t n = t.size(k), st = t.stride(k);
      if (n == 1) continue;
      if (!sizes.empty() && strides.back() == st * n) {
        sizes.back() *= n;
        strides.back() = st;
      } else {
        sizes.push_back(n);
        strides.push_back(st);
      }
    }
    if (sizes.empty()) {
      sizes.push_back(1);
      strides.push_back(1);
    }
    idx.assign(sizes.size(), 0);
  }

  void seek(int64_t linear) {
    offset = 0;
    for (int64_t k = static_cast<int64_t>(sizes.size()) - 1; k >= 0; --k) {
      idx[k] = linear % sizes[k];
      linear /= sizes[k];
      offset += idx[k] * strides[k];
    }
  }

  int64_t run_left() const { return sizes.back() - idx.back(); }
  int64_t inner_stride() const { return strides.back(); }

  // Advances by n <= run_left() elements.
  void advance(int64_t n) {
    const int64_t last = static_cast<int64_t>(sizes.size()) - 1;
    idx[last] += n;
    offset += n * strides[last];
    for (int64_t k = last; k > 0 && idx[k] == sizes[k]; --k) {
      offset -= sizes[k] * strides[k];
      idx[k] = 0;
      ++idx[k - 1];
      offset += strides[k - 1];
    }
  }
};

}  // namespace

void flat_range_copy_cpu(const at::Tensor& src, const at::Tensor& dst, int64_t start) {
  const char* op = "flat_range_copy";
  BRIDGE_CHECK_SAME_DEVICE(op, dst, "dst", src, "src");
  BRIDGE_CHECK_SAME_DTYPE(op, dst, "dst", src, "src");
  const int64_t n = dst.numel();
  TORCH_CHECK(start >= 0 && start + n <= src.numel(), op, ": range [", start, ", ", start + n,
              ") (start + dst.numel() = ", start, " + ", n, ") is beyond src.numel() = ", src.numel());
  if (n == 0) return;
  const int64_t elem = static_cast<int64_t>(src.element_size());
  const char* sp = static_cast<const char*>(src.const_data_ptr());
  char* dp = static_cast<char*>(dst.mutable_data_ptr());
  const Walker sw0(src), dw0(dst);
  auto body = [&](int64_t b, int64_t e) {
    Walker sw = sw0, dw = dw0;
    sw.seek(start + b);
    dw.seek(b);
    for (int64_t pos = b; pos < e;) {
      const int64_t run = std::min({e - pos, sw.run_left(), dw.run_left()});
      const char* s = sp + sw.offset * elem;
      char* d = dp + dw.offset * elem;
      if (sw.inner_stride() == 1 && dw.inner_stride() == 1) {
        std::memcpy(d, s, static_cast<size_t>(run * elem));
      } else {
        cpu::detail::tiled_copy_any(elem, s, 0, sw.inner_stride(), d, 0, dw.inner_stride(), 1, run);
      }
      sw.advance(run);
      dw.advance(run);
      pos += run;
    }
  };
  const int64_t per_task = std::max<int64_t>(1, cpu::kTaskBytes / elem);
  if (n * elem <= cpu::kInlineBytes) {
    body(0, n);
  } else {
    at::parallel_for(0, n, per_task, body);
  }
}

TORCH_LIBRARY_IMPL(bridge, CPU, m) {
  m.impl("shard_copy", &shard_copy_cpu);
  m.impl("flat_range_copy", &flat_range_copy_cpu);
}

}  // namespace bridge
