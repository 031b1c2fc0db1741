// Strided views of raw memory, and the one routine that turns "copy this view into that view" into 2-D pieces.
//
// Every bridge op moves bytes between views of its inputs and outputs. A View is a byte pointer, an element size
// and sizes / strides in elements: slicing it (narrow, rows, select, heads) creates no at::Tensor. A copy between
// two views of equal sizes is reduced by coalesce() (size-1 dims dropped, neighbouring dims merged where they are
// contiguous with each other in both views) and for_each_piece() hands its trailing two dims, once per index of the
// leading dims, to the executor as a Piece: csrc/cpu/block_copy.h (run_pairs) on CPU, csrc/cuda/copy_plan.cuh
// (CopyPlan) on CUDA. Nothing here depends on the dtype, only on the element size.
//
// Compiled by g++ (csrc/cpu/*.cpp) and nvcc (csrc/cuda/*.cu, host code only).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>

#include <cstdint>
#include <vector>

namespace bridge {

using Dims = c10::SmallVector<int64_t, 6>;

// A strided view of raw memory; strides in elements of `elem` bytes.
struct View {
  char* ptr = nullptr;
  int64_t elem = 1;
  Dims sizes;
  Dims strides;

  int64_t dim() const { return static_cast<int64_t>(sizes.size()); }

  int64_t numel() const {
    int64_t n = 1;
    for (const int64_t s : sizes) n *= s;
    return n;
  }

  // Dim `d` narrowed to [start, start + len).
  View narrow(int64_t d, int64_t start, int64_t len) const {
    View v = *this;
    v.ptr += start * strides[d] * elem;
    v.sizes[d] = len;
    return v;
  }

  // Rows [r0, r0 + n) of dim 0.
  View rows(int64_t r0, int64_t n) const { return narrow(0, r0, n); }

  // Index i of dim 0, without dim 0.
  View select(int64_t i) const {
    View v;
    v.ptr = ptr + i * strides[0] * elem;
    v.elem = elem;
    v.sizes.assign(sizes.begin() + 1, sizes.end());
    v.strides.assign(strides.begin() + 1, strides.end());
    return v;
  }

  // [heads, rows_per_head, trailing dims...]: rows r0 + h * head_step + [0, rows_per_head) of dim 0, h < heads.
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
};

inline View view_of(char* ptr, const at::Tensor& t) {
  View v;
  v.ptr = ptr;
  v.elem = static_cast<int64_t>(t.element_size());
  v.sizes.assign(t.sizes().begin(), t.sizes().end());
  v.strides.assign(t.strides().begin(), t.strides().end());
  return v;
}

// A read-only source view of t (never written through).
inline View src_view(const at::Tensor& t) {
  return view_of(const_cast<char*>(static_cast<const char*>(t.const_data_ptr())), t);
}

// A writable destination view of t.
inline View dst_view(const at::Tensor& t) { return view_of(static_cast<char*>(t.mutable_data_ptr()), t); }

// Destination views of a list of tensors, and of the slices along dim 0 of one stacked tensor.
inline std::vector<View> dst_views(at::TensorList ts) {
  std::vector<View> v;
  v.reserve(ts.size());
  for (const at::Tensor& t : ts) v.push_back(dst_view(t));
  return v;
}

inline std::vector<View> dst_slices(const at::Tensor& stacked) {
  const View s = dst_view(stacked);
  std::vector<View> v;
  v.reserve(static_cast<size_t>(stacked.size(0)));
  for (int64_t i = 0; i < stacked.size(0); ++i) v.push_back(s.select(i));
  return v;
}

// Row-major contiguous strides of `sizes`, times `scale`.
inline Dims row_major_strides(const Dims& sizes, int64_t scale) {
  Dims s(sizes.size());
  int64_t acc = scale;
  for (size_t i = sizes.size(); i-- > 0;) {
    s[i] = acc;
    acc *= sizes[i];
  }
  return s;
}

// One 2-D copy of rows x cols elements; strides in elements.
struct Piece {
  const char* src;
  char* dst;
  int64_t rows, cols;
  int64_t srs, scs;  // source row / column strides
  int64_t drs, dcs;  // destination row / column strides
};

// The dims of a copy between two views after coalescing: every remaining dim has size > 1, and no two neighbours
// are contiguous with each other in both views. `empty` when some size is 0 (nothing to copy).
struct Coalesced {
  Dims sizes, src_strides, dst_strides;
  bool empty = false;

  int64_t dim() const { return static_cast<int64_t>(sizes.size()); }

  // Number of 2-D pieces for_each_piece emits.
  int64_t pieces() const {
    if (empty) return 0;
    int64_t n = 1;
    for (int64_t k = 0; k + 2 < dim(); ++k) n *= sizes[k];
    return n;
  }
};

// Coalesces the copy of s into d; `op` names the op in the (internal) error for views of different sizes.
inline Coalesced coalesce(const char* op, const View& s, const View& d) {
  TORCH_CHECK(s.sizes == d.sizes, op, ": internal error: copying a view of sizes ", c10::IntArrayRef(s.sizes),
              " into a view of sizes ", c10::IntArrayRef(d.sizes));
  Coalesced c;
  for (int64_t k = 0; k < s.dim(); ++k) {
    const int64_t n = s.sizes[k];
    if (n == 0) {
      c.empty = true;
      return c;
    }
    if (n == 1) continue;
    if (!c.sizes.empty() && c.src_strides.back() == s.strides[k] * n && c.dst_strides.back() == d.strides[k] * n) {
      c.sizes.back() *= n;
      c.src_strides.back() = s.strides[k];
      c.dst_strides.back() = d.strides[k];
    } else {
      c.sizes.push_back(n);
      c.src_strides.push_back(s.strides[k]);
      c.dst_strides.push_back(d.strides[k]);
    }
  }
  return c;
}

// The same layout as v with size-1 dims dropped and mergeable neighbours merged (v's own strides only).
inline View coalesce(const View& v) {
  const Coalesced c = coalesce("coalesce", v, v);
  View o;
  o.ptr = v.ptr;
  o.elem = v.elem;
  if (c.empty) {
    o.sizes.push_back(0);
    o.strides.push_back(1);
    return o;
  }
  o.sizes = c.sizes;
  o.strides = c.src_strides;
  return o;
}

// Calls emit(Piece) for every 2-D piece of the coalesced copy from base pointers s / d (elements of `elem` bytes):
// the last two dims form each piece, the leading ones are enumerated in row-major order.
template <class Emit>
void for_each_piece(const Coalesced& c, const char* s, char* d, int64_t elem, Emit&& emit) {
  if (c.empty) return;
  const int64_t m = c.dim();
  if (m == 0) return emit(Piece{s, d, 1, 1, 1, 1, 1, 1});
  const Dims& sz = c.sizes;
  const Dims& ss = c.src_strides;
  const Dims& ds = c.dst_strides;
  if (m == 1) return emit(Piece{s, d, 1, sz[0], sz[0] * ss[0], ss[0], sz[0] * ds[0], ds[0]});
  const int64_t rows = sz[m - 2], cols = sz[m - 1];
  const int64_t lead = m - 2;
  std::vector<int64_t> idx(static_cast<size_t>(lead), 0);
  int64_t so = 0, dof = 0;
  while (true) {
    emit(Piece{s + so * elem, d + dof * elem, rows, cols, ss[m - 2], ss[m - 1], ds[m - 2], ds[m - 1]});
    int64_t k = lead - 1;
    for (; k >= 0; --k) {
      ++idx[k];
      so += ss[k];
      dof += ds[k];
      if (idx[k] < sz[k]) break;
      so -= ss[k] * sz[k];
      dof -= ds[k] * sz[k];
      idx[k] = 0;
    }
    if (k < 0) break;
  }
}

// Coalesces the copy of view s into view d (equal sizes) and emits its 2-D pieces.
template <class Emit>
void for_each_piece(const char* op, const View& s, const View& d, Emit&& emit) {
  for_each_piece(coalesce(op, s, d), s.ptr, d.ptr, s.elem, emit);
}

}  // namespace bridge
