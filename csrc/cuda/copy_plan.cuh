// The CUDA executor of the bridge ops: a CopyPlan collects the (source view, destination view) copies that a layout
// walk of csrc/common emits, turns them into CopySeg / NdCopy descriptors (csrc/cuda/kernels.cuh) and launches them,
// one launch per kind of segment, on the current stream.
//
// Views are reduced by the shared coalesce() / for_each_piece() (csrc/common/strided.h). Each 2-D piece with
// contiguous rows becomes a row segment moved in the widest unit (16, 8, 4, 2 or 1 bytes) that divides its pointers,
// row length and row strides; a piece with strided columns becomes a tiled (shared-memory transpose) segment moved in
// whole elements; a copy with more than a few thousand pieces goes to the general N-d kernel. Any element size works:
// an element that is wider than the unit its alignment allows is moved as several units.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/strided.h"
#include "kernels.cuh"

namespace bridge {
namespace cuda_detail {

// Unit widths: index w moves units of (1 << w) bytes.
constexpr int kWidths = 5;

// Index of the widest unit that divides every value (byte counts and addresses).
inline int widest_unit(std::initializer_list<int64_t> bytes) {
  int w = kWidths - 1;
  for (; w > 0; --w) {
    const int64_t unit = int64_t(1) << w;
    bool ok = true;
    for (const int64_t b : bytes) ok = ok && b % unit == 0;
    if (ok) break;
  }
  return w;
}

inline int64_t address(const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); }

// Calls f(std::integral_constant<int, bytes>) for unit width w.
template <class F>
void with_unit(int w, F&& f) {
  switch (w) {
    case 0: return f(std::integral_constant<int, 1>{});
    case 1: return f(std::integral_constant<int, 2>{});
    case 2: return f(std::integral_constant<int, 4>{});
    case 3: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 16>{});
  }
}

// Collects the copies of one op call and launches them. It is the Emit of the layout walks of csrc/common (called as
// emit(src, dst)); `op` names the op in its errors.
class CopyPlan {
 public:
  CopyPlan(const char* op, int64_t elem) : op_(op), elem_(elem) {
    TORCH_CHECK(elem >= 1, op, ": element size ", elem, " must be >= 1");
  }

  // dst <- src, views of equal sizes.
  void add(const View& src, const View& dst) {
    const Coalesced c = coalesce(op_, src, dst);
    if (c.empty) return;
    if (c.pieces() > kMaxPiecesPerAdd && c.dim() < kernels::kMaxDims) {
      return add_nd_dims(src.ptr, 0, c.sizes, c.src_strides, dst.ptr, c.sizes, c.dst_strides);
    }
    for_each_piece(c, src.ptr, dst.ptr, elem_, [this](const Piece& p) { add_piece(p); });
  }
  void operator()(const View& src, const View& dst) { add(src, dst); }

  // A general N-d copy: dst element i <- src element src_start + i (row-major on each side's own sizes).
  void add_nd(const View& src, int64_t src_start, const View& dst) {
    add_nd_dims(src.ptr, src_start, src.sizes, src.strides, dst.ptr, dst.sizes, dst.strides);
  }

  // Visits what launch() would run, for host-side tests: seg(tiled, unit bytes, CopySeg) for every row (tiled =
  // false) and tiled segment, nd(unit bytes, NdCopy) for every N-d copy.
  template <class Seg, class Nd>
  void inspect(Seg&& seg, Nd&& nd) const {
    for (int w = 0; w < kWidths; ++w)
      for (const auto& s : rows_[w]) seg(false, 1 << w, s);
    for (int w = 0; w < kWidths; ++w)
      for (const auto& s : tiles_[w]) seg(true, 1 << w, s);
    for (const auto& [w, p] : nd_) nd(1 << w, p);
  }

  // Uploads the segment tables (one pinned host buffer, one async copy) and launches on the current stream.
  void launch(const at::Device& device) {
    const c10::cuda::OptionalCUDAGuard guard(device);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    size_t total = 0;
    for (int w = 0; w < kWidths; ++w) total += rows_[w].size() + tiles_[w].size();
    if (total > 0) {
      at::Tensor host = at::empty({static_cast<int64_t>(total * sizeof(kernels::CopySeg))},
                                  at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      auto* h = reinterpret_cast<kernels::CopySeg*>(host.data_ptr());
      struct Range {
        size_t first;
        int64_t blocks;
      };
      Range rows[kWidths], tiles[kWidths];
      size_t off = 0;
      auto lay_out = [&](std::vector<kernels::CopySeg>& table, bool tiled) {
        int64_t blocks = 0;
        for (auto& s : table) {
          s.block_begin = blocks;
          blocks += tiled ? kernels::tile_blocks(s.rows, s.cols) : kernels::row_blocks(s.rows, s.cols);
        }
        TORCH_CHECK(blocks < (int64_t(1) << 31), op_, ": ", blocks, " CUDA blocks for ", table.size(),
                    " copy segments exceed the grid limit of 2^31 - 1");
        if (!table.empty()) std::memcpy(h + off, table.data(), table.size() * sizeof(kernels::CopySeg));
        const Range r{off, blocks};
        off += table.size();
        return r;
      };
      for (int w = 0; w < kWidths; ++w) rows[w] = lay_out(rows_[w], false);
      for (int w = 0; w < kWidths; ++w) tiles[w] = lay_out(tiles_[w], true);
      at::Tensor dev = at::empty({host.numel()}, at::TensorOptions().dtype(at::kByte).device(device));
      dev.copy_(host, /*non_blocking=*/true);
      const auto* d = reinterpret_cast<const kernels::CopySeg*>(dev.data_ptr());
      for (int w = 0; w < kWidths; ++w) {
        const int n = static_cast<int>(rows_[w].size());
        if (n == 0 || rows[w].blocks == 0) continue;
        const dim3 grid(static_cast<unsigned>(rows[w].blocks)), block(kernels::kRowThreads);
        with_unit(w, [&](auto unit) {
          kernels::copy_rows_kernel<decltype(unit)::value><<<grid, block, 0, stream>>>(d + rows[w].first, n);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      for (int w = 0; w < kWidths; ++w) {
        const int n = static_cast<int>(tiles_[w].size());
        if (n == 0 || tiles[w].blocks == 0) continue;
        const dim3 grid(static_cast<unsigned>(tiles[w].blocks)), block(kernels::kTile, kernels::kTileRows);
        with_unit(w, [&](auto unit) {
          kernels::copy_tiled_kernel<decltype(unit)::value><<<grid, block, 0, stream>>>(d + tiles[w].first, n);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    for (const auto& [w, p] : nd_) {
      const int64_t want = (p.numel + kernels::kNdThreads - 1) / kernels::kNdThreads;
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(want, 1 << 16))), block(kernels::kNdThreads);
      with_unit(w, [&](auto unit) { kernels::copy_nd_kernel<decltype(unit)::value><<<grid, block, 0, stream>>>(p); });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

 private:
  static constexpr int64_t kMaxPiecesPerAdd = 4096;

  // One 2-D piece (strides in elements) into the row or tile tables.
  void add_piece(Piece p) {
    if (p.rows == 1 && p.cols > 1 && (p.scs != 1 || p.dcs != 1)) {  // a strided vector: one element per row
      p.rows = p.cols;
      p.cols = 1;
      p.srs = p.scs;
      p.drs = p.dcs;
    }
    if (p.cols == 1) p.scs = p.dcs = 1;
    if (p.rows == 1) p.srs = p.drs = p.cols;
    if (p.scs == 1 && p.dcs == 1) {
      // Contiguous rows of cols * elem bytes: the widest unit that divides the pointers, the row length and strides.
      const int w = widest_unit({address(p.src), address(p.dst), p.cols * elem_, p.srs * elem_, p.drs * elem_});
      const int64_t unit = int64_t(1) << w;
      rows_[w].push_back(kernels::CopySeg{p.src, p.dst, p.rows, p.cols * elem_ / unit, p.srs * elem_ / unit, 1,
                                          p.drs * elem_ / unit, 1, 0});
      return;
    }
    // Strided columns: read the source along its unit-stride (smaller-stride) dim.
    if (std::abs(p.scs) > std::abs(p.srs)) {
      std::swap(p.rows, p.cols);
      std::swap(p.srs, p.scs);
      std::swap(p.drs, p.dcs);
    }
    // Whole elements if their alignment allows, else k units per element, one segment per unit.
    const int w = widest_unit({elem_, address(p.src), address(p.dst)});
    const int64_t unit = int64_t(1) << w, k = elem_ / unit;
    for (int64_t j = 0; j < k; ++j) {
      tiles_[w].push_back(kernels::CopySeg{p.src + j * unit, p.dst + j * unit, p.rows, p.cols, p.srs * k, p.scs * k,
                                           p.drs * k, p.dcs * k, 0});
    }
  }

  void add_nd_dims(const char* src, int64_t src_start, const Dims& src_sizes, const Dims& src_strides, char* dst,
                   const Dims& dst_sizes, const Dims& dst_strides) {
    const int w = widest_unit({elem_, address(src), address(dst)});
    const int64_t unit = int64_t(1) << w, k = elem_ / unit;
    const size_t extra = k > 1 ? 1 : 0;  // an inner dim of the k units of one element
    TORCH_CHECK(src_sizes.size() + extra <= size_t(kernels::kMaxDims) &&
                    dst_sizes.size() + extra <= size_t(kernels::kMaxDims),
                op_, ": a strided copy between views of ", src_sizes.size(), " and ", dst_sizes.size(),
                " non-mergeable dims exceeds the CUDA limit of ", kernels::kMaxDims - extra, " dims");
    kernels::NdCopy p{};
    p.src = src;
    p.dst = dst;
    p.src_start = src_start * k;
    p.numel = k;
    p.src_ndim = static_cast<int>(src_sizes.size() + extra);
    p.dst_ndim = static_cast<int>(dst_sizes.size() + extra);
    for (size_t i = 0; i < src_sizes.size(); ++i) {
      p.src_sizes[i] = src_sizes[i];
      p.src_strides[i] = src_strides[i] * k;
    }
    for (size_t i = 0; i < dst_sizes.size(); ++i) {
      p.dst_sizes[i] = dst_sizes[i];
      p.dst_strides[i] = dst_strides[i] * k;
      p.numel *= dst_sizes[i];
    }
    if (extra) {
      p.src_sizes[p.src_ndim - 1] = p.dst_sizes[p.dst_ndim - 1] = k;
      p.src_strides[p.src_ndim - 1] = p.dst_strides[p.dst_ndim - 1] = 1;
    }
    if (p.numel > 0) nd_.emplace_back(w, p);
  }

  const char* op_;
  int64_t elem_;
  std::vector<kernels::CopySeg> rows_[kWidths];   // contiguous-row segments, by unit width
  std::vector<kernels::CopySeg> tiles_[kWidths];  // strided segments, by unit width
  std::vector<std::pair<int, kernels::NdCopy>> nd_;
};

}  // namespace cuda_detail
}  // namespace bridge
