// Host side of the CUDA byte-moving ops: strided views without at::Tensor overhead, and a CopyPlan that turns
// "copy this view into that view" requests into CopySeg descriptors (csrc/cuda/kernels.cuh) and launches them.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.cuh"

namespace bridge {
namespace cuda_detail {

using Dims = c10::SmallVector<int64_t, 6>;

// A strided view: byte pointer, sizes and element strides. Cheap to slice (no at::Tensor is created).
struct View {
  char* ptr = nullptr;
  int64_t elem = 1;
  Dims sizes;
  Dims strides;

  static View of(const at::Tensor& t) {
    View v;
    v.ptr = static_cast<char*>(const_cast<void*>(t.data_ptr()));
    v.elem = t.element_size();
    v.sizes.assign(t.sizes().begin(), t.sizes().end());
    v.strides.assign(t.strides().begin(), t.strides().end());
    return v;
  }
  // Rows [r0, r0 + n) of dim 0.
  View rows(int64_t r0, int64_t n) const {
    View v = *this;
    v.ptr += r0 * strides[0] * elem;
    v.sizes[0] = n;
    return v;
  }
  // Index i of dim 0 (drops the dim).
  View select(int64_t i) const {
    View v;
    v.ptr = ptr + i * strides[0] * elem;
    v.elem = elem;
    v.sizes.assign(sizes.begin() + 1, sizes.end());
    v.strides.assign(strides.begin() + 1, strides.end());
    return v;
  }
  // [heads, rows_per_head, ...]: rows r0 + h * head_step + [0, rows_per_head) for h < heads.
  View heads(int64_t r0, int64_t heads, int64_t head_step, int64_t rows_per_head) const {
    View v;
    v.ptr = ptr + r0 * strides[0] * elem;
    v.elem = elem;
    v.sizes.push_back(heads);
    v.strides.push_back(head_step * strides[0]);
    v.sizes.push_back(rows_per_head);
    v.strides.push_back(strides[0]);
    v.sizes.append(sizes.begin() + 1, sizes.end());
    v.strides.append(strides.begin() + 1, strides.end());
    return v;
  }
  // Narrow dim `dim` to [s0, s0 + n).
  View narrow(int64_t dim, int64_t s0, int64_t n) const {
    View v = *this;
    v.ptr += s0 * strides[dim] * elem;
    v.sizes[dim] = n;
    return v;
  }
};

// Collects copies and launches them: contiguous-row segments by vector width, strided segments through the tiled
// transpose kernel, and anything with more than a few thousand 2-D pieces through the general N-d kernel.
class CopyPlan {
 public:
  explicit CopyPlan(int64_t elem) : elem_(elem) {
    TORCH_CHECK(elem == 1 || elem == 2 || elem == 4 || elem == 8,
                "bridge CUDA kernels move elements of 1, 2, 4 or 8 bytes, got element size ", elem);
  }

  // dst <- src, both views of the same sizes.
  void add(const View& src, const View& dst) {
    TORCH_INTERNAL_ASSERT(src.sizes == dst.sizes, "CopyPlan::add: source sizes ", c10::IntArrayRef(src.sizes),
                          " != destination sizes ", c10::IntArrayRef(dst.sizes));
    Dims sizes, ss, ds;
    for (size_t i = 0; i < src.sizes.size(); ++i) {
      if (src.sizes[i] == 0) return;
      if (src.sizes[i] == 1) continue;
      if (!sizes.empty() && ss.back() == src.strides[i] * src.sizes[i] &&
          ds.back() == dst.strides[i] * src.sizes[i]) {  // merge with the previous dim
        sizes.back() *= src.sizes[i];
        ss.back() = src.strides[i];
        ds.back() = dst.strides[i];
        continue;
      }
      sizes.push_back(src.sizes[i]);
      ss.push_back(src.strides[i]);
      ds.push_back(dst.strides[i]);
    }
    const int nd = static_cast<int>(sizes.size());
    if (nd == 0) return add_2d(src.ptr, dst.ptr, 1, 1, 1, 1, 1, 1);
    if (nd == 1) return add_2d(src.ptr, dst.ptr, 1, sizes[0], sizes[0], ss[0], sizes[0], ds[0]);
    int64_t outer = 1;
    for (int i = 0; i < nd - 2; ++i) outer *= sizes[i];
    if (outer > kMaxPiecesPerAdd) {
      kernels::NdCopy p{};
      TORCH_CHECK(nd <= kernels::kMaxDims, "bridge CUDA copy: ", nd, " non-mergeable dims exceed the limit of ",
                  kernels::kMaxDims);
      p.src = src.ptr;
      p.dst = dst.ptr;
      p.numel = 1;
      p.src_start = 0;
      p.src_ndim = p.dst_ndim = nd;
      for (int i = 0; i < nd; ++i) {
        p.numel *= sizes[i];
        p.src_sizes[i] = p.dst_sizes[i] = sizes[i];
        p.src_strides[i] = ss[i];
        p.dst_strides[i] = ds[i];
      }
      nd_.push_back(p);
      return;
    }
    for (int64_t o = 0; o < outer; ++o) {
      int64_t rem = o, so = 0, dof = 0;
      for (int i = nd - 3; i >= 0; --i) {
        const int64_t idx = rem % sizes[i];
        rem /= sizes[i];
        so += idx * ss[i];
        dof += idx * ds[i];
      }
      add_2d(src.ptr + so * elem_, dst.ptr + dof * elem_, sizes[nd - 2], sizes[nd - 1], ss[nd - 2], ss[nd - 1],
             ds[nd - 2], ds[nd - 1]);
    }
  }

  // A general N-d copy: dst element i <- src element src_start + i (row-major on each side's own sizes).
  void add_nd(const View& src, int64_t src_start, const View& dst) {
    TORCH_CHECK(src.sizes.size() <= size_t(kernels::kMaxDims) && dst.sizes.size() <= size_t(kernels::kMaxDims),
                "bridge CUDA copy: more than ", kernels::kMaxDims, " dims");
    kernels::NdCopy p{};
    p.src = src.ptr;
    p.dst = dst.ptr;
    p.src_start = src_start;
    p.numel = 1;
    p.src_ndim = static_cast<int>(src.sizes.size());
    p.dst_ndim = static_cast<int>(dst.sizes.size());
    for (int i = 0; i < p.src_ndim; ++i) {
      p.src_sizes[i] = src.sizes[i];
      p.src_strides[i] = src.strides[i];
    }
    for (int i = 0; i < p.dst_ndim; ++i) {
      p.dst_sizes[i] = dst.sizes[i];
      p.dst_strides[i] = dst.strides[i];
      p.numel *= dst.sizes[i];
    }
    if (p.numel > 0) nd_.push_back(p);
  }

  // Uploads the segment tables (one pinned host buffer, one async copy) and launches on the current stream.
  void launch(const at::Device& device) {
    const c10::cuda::OptionalCUDAGuard guard(device);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    size_t total = tile_.size();
    for (const auto& r : rows_) total += r.size();
    if (total > 0) {
      at::Tensor host = at::empty({static_cast<int64_t>(total * sizeof(kernels::CopySeg))},
                                  at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      auto* h = reinterpret_cast<kernels::CopySeg*>(host.data_ptr());
      size_t off = 0;
      std::vector<std::pair<size_t, int64_t>> ranges;  // (first segment, grid size) per table
      for (auto* table : tables()) {
        int64_t blocks = 0;
        for (auto& s : *table) {
          s.block_begin = blocks;
          blocks += table == &tile_ ? kernels::tile_blocks(s.rows, s.cols) : kernels::row_blocks(s.rows, s.cols);
        }
        TORCH_CHECK(blocks < (int64_t(1) << 31), "bridge CUDA copy: ", blocks, " blocks exceed the grid limit");
        std::memcpy(h + off, table->data(), table->size() * sizeof(kernels::CopySeg));
        ranges.emplace_back(off, blocks);
        off += table->size();
      }
      at::Tensor dev = at::empty({host.numel()}, at::TensorOptions().dtype(at::kByte).device(device));
      dev.copy_(host, /*non_blocking=*/true);
      const auto* d = reinterpret_cast<const kernels::CopySeg*>(dev.data_ptr());
      for (int w = 0; w < kWidths; ++w) {
        const auto [first, blocks] = ranges[w];
        const int n = static_cast<int>(rows_[w].size());
        if (n == 0 || blocks == 0) continue;
        const dim3 grid(static_cast<unsigned>(blocks)), block(kernels::kRowThreads);
        switch (w) {
          case 0: kernels::copy_rows_kernel<1><<<grid, block, 0, stream>>>(d + first, n); break;
          case 1: kernels::copy_rows_kernel<2><<<grid, block, 0, stream>>>(d + first, n); break;
          case 2: kernels::copy_rows_kernel<4><<<grid, block, 0, stream>>>(d + first, n); break;
          case 3: kernels::copy_rows_kernel<8><<<grid, block, 0, stream>>>(d + first, n); break;
          default: kernels::copy_rows_kernel<16><<<grid, block, 0, stream>>>(d + first, n); break;
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const auto [first, blocks] = ranges[kWidths];
      if (!tile_.empty() && blocks > 0) {
        const int n = static_cast<int>(tile_.size());
        const dim3 grid(static_cast<unsigned>(blocks)), block(kernels::kTile, kernels::kTileRows);
        switch (elem_) {
          case 1: kernels::copy_tiled_kernel<1><<<grid, block, 0, stream>>>(d + first, n); break;
          case 2: kernels::copy_tiled_kernel<2><<<grid, block, 0, stream>>>(d + first, n); break;
          case 4: kernels::copy_tiled_kernel<4><<<grid, block, 0, stream>>>(d + first, n); break;
          default: kernels::copy_tiled_kernel<8><<<grid, block, 0, stream>>>(d + first, n); break;
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    for (const auto& p : nd_) {
      const int64_t want = (p.numel + kernels::kNdThreads - 1) / kernels::kNdThreads;
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(want, 1 << 16))), block(kernels::kNdThreads);
      switch (elem_) {
        case 1: kernels::copy_nd_kernel<1><<<grid, block, 0, stream>>>(p); break;
        case 2: kernels::copy_nd_kernel<2><<<grid, block, 0, stream>>>(p); break;
        case 4: kernels::copy_nd_kernel<4><<<grid, block, 0, stream>>>(p); break;
        default: kernels::copy_nd_kernel<8><<<grid, block, 0, stream>>>(p); break;
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

 private:
  static constexpr int kWidths = 5;  // row tables for units of 1, 2, 4, 8, 16 bytes
  static constexpr int64_t kMaxPiecesPerAdd = 4096;

  std::vector<std::vector<kernels::CopySeg>*> tables() {
    std::vector<std::vector<kernels::CopySeg>*> t;
    for (auto& r : rows_) t.push_back(&r);
    t.push_back(&tile_);
    return t;
  }

  // rows x cols elements; strides in elements.
  void add_2d(const char* src, char* dst, int64_t rows, int64_t cols, int64_t srs, int64_t scs, int64_t drs,
              int64_t dcs) {
    if (rows == 1 && cols > 1 && (scs != 1 || dcs != 1)) {  // a strided vector: one element per row
      std::swap(rows, cols);
      srs = scs;
      drs = dcs;
    }
    if (cols == 1) scs = dcs = 1;
    if (rows == 1) {
      srs = cols;
      drs = cols;
    }
    if (scs == 1 && dcs == 1) {
      // Widest unit that divides the pointers, the row length and the row strides.
      int w = kWidths - 1;
      for (; w > 0; --w) {
        const int64_t unit = int64_t(1) << w;
        if (unit < elem_) break;
        const auto ok = [unit](int64_t bytes) { return bytes % unit == 0; };
        if (ok(reinterpret_cast<uintptr_t>(src)) && ok(reinterpret_cast<uintptr_t>(dst)) && ok(cols * elem_) &&
            ok(srs * elem_) && ok(drs * elem_)) {
          break;
        }
      }
      int64_t unit = int64_t(1) << w;
      if (unit < elem_) {
        unit = elem_;
        w = elem_ == 1 ? 0 : elem_ == 2 ? 1 : elem_ == 4 ? 2 : 3;
      }
      const int64_t per = unit / elem_;
      rows_[w].push_back(
          kernels::CopySeg{src, dst, rows, cols / per, srs / per, 1, drs / per, 1, 0});
      return;
    }
    // Strided columns: read the source along its unit-stride (smaller-stride) dim.
    if (std::abs(scs) > std::abs(srs)) {
      std::swap(rows, cols);
      std::swap(srs, scs);
      std::swap(drs, dcs);
    }
    tile_.push_back(kernels::CopySeg{src, dst, rows, cols, srs, scs, drs, dcs, 0});
  }

  int64_t elem_;
  std::vector<kernels::CopySeg> rows_[kWidths];
  std::vector<kernels::CopySeg> tile_;
  std::vector<kernels::NdCopy> nd_;
};

// Prologue checks shared by the CUDA ops.
inline void check_cuda(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

inline void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  check_cuda(op, t, name);
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has dtype ", ref.scalar_type());
}

inline void check_shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " has shape ", t.sizes(), ", expected ", expected);
}

// [rows, trailing dims of t...].
inline std::vector<int64_t> with_rows(const at::Tensor& t, int64_t rows) {
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
  s[0] = rows;
  return s;
}

}  // namespace cuda_detail
}  // namespace bridge
