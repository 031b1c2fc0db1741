// Host-side check of CopyPlan (csrc/cuda/copy_plan.cuh) without a GPU: random strided copies (element sizes 1 to
// 16 bytes, odd ones included; misaligned pointers; transposed, sliced and stepped views; copies with more pieces
// than the 2-D tables take; flat N-d ranges) are planned, the planned segments are executed here with the
// semantics of the kernels in csrc/cuda/kernels.cuh, and the result is compared byte for byte with a direct
// element loop (bytes outside the destination must stay untouched). Prints "ok <cases>" or the first mismatch.
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "copy_plan.cuh"

using bridge::Dims;
using bridge::View;
using bridge::cuda_detail::CopyPlan;
namespace kernels = bridge::kernels;

namespace {

// copy_rows_kernel / copy_tiled_kernel: element (r, c) of a segment, in units of `unit` bytes.
void run_seg(bool tiled, int unit, const kernels::CopySeg& s) {
  for (int64_t r = 0; r < s.rows; ++r)
    for (int64_t c = 0; c < s.cols; ++c) {
      const int64_t so = r * s.src_row_stride + c * (tiled ? s.src_col_stride : 1);
      const int64_t d = r * s.dst_row_stride + c * (tiled ? s.dst_col_stride : 1);
      std::memcpy(s.dst + d * unit, s.src + so * unit, unit);
    }
}

int64_t unravel(int64_t i, int ndim, const int64_t* sizes, const int64_t* strides) {
  int64_t off = 0;
  for (int d = ndim - 1; d >= 0; --d) {
    off += (i % sizes[d]) * strides[d];
    i /= sizes[d];
  }
  return off;
}

// copy_nd_kernel.
void run_nd(int unit, const kernels::NdCopy& p) {
  for (int64_t i = 0; i < p.numel; ++i) {
    std::memcpy(p.dst + unravel(i, p.dst_ndim, p.dst_sizes, p.dst_strides) * unit,
                p.src + unravel(p.src_start + i, p.src_ndim, p.src_sizes, p.src_strides) * unit, unit);
  }
}

void execute(const CopyPlan& plan) {
  plan.inspect([](bool tiled, int unit, const kernels::CopySeg& s) { run_seg(tiled, unit, s); },
               [](int unit, const kernels::NdCopy& p) { run_nd(unit, p); });
}

std::mt19937_64 rng(12345);
int64_t uniform(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

// A random layout of `sizes`: dims stored in a random order, each padded or stepped; returns strides and the
// number of elements of storage it spans.
Dims random_strides(const Dims& sizes, int64_t* span) {
  const size_t n = sizes.size();
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  Dims strides(n);
  int64_t acc = uniform(1, 2);  // innermost step 1 or 2
  for (size_t k = n; k-- > 0;) {
    strides[order[k]] = acc;
    acc *= sizes[order[k]] + (uniform(0, 3) == 0 ? uniform(1, 2) : 0);  // sometimes padded
  }
  *span = acc + 1;
  return strides;
}

struct Buffer {
  std::vector<unsigned char> bytes;
  char* base;
  Buffer(int64_t n, int64_t misalign) : bytes(static_cast<size_t>(n + 64)) {
    for (auto& b : bytes) b = static_cast<unsigned char>(uniform(0, 255));
    base = reinterpret_cast<char*>(bytes.data());
    base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;  // 64-byte aligned, then shifted
    base += misalign;
  }
};

View make_view(char* ptr, int64_t elem, const Dims& sizes, const Dims& strides) {
  View v;
  v.ptr = ptr;
  v.elem = elem;
  v.sizes = sizes;
  v.strides = strides;
  return v;
}

int64_t offset_of(const Dims& idx, const Dims& strides) {
  int64_t o = 0;
  for (size_t k = 0; k < idx.size(); ++k) o += idx[k] * strides[k];
  return o;
}

bool next_index(Dims& idx, const Dims& sizes) {
  for (size_t k = idx.size(); k-- > 0;) {
    if (++idx[k] < sizes[k]) return true;
    idx[k] = 0;
  }
  return false;
}

int failures = 0;

void compare(const char* what, int c, const Buffer& got, const Buffer& want) {
  if (got.bytes != want.bytes && failures++ < 5) std::printf("MISMATCH %s case %d\n", what, c);
}

// add(): src and dst views of the same sizes.
void copy_case(int c, const Dims& sizes, int64_t elem) {
  int64_t s_span = 0, d_span = 0;
  const Dims ss = random_strides(sizes, &s_span), ds = random_strides(sizes, &d_span);
  Buffer src(s_span * elem, uniform(0, 3) == 0 ? uniform(1, 15) : 0);
  Buffer dst(d_span * elem, uniform(0, 3) == 0 ? uniform(1, 15) : 0);
  Buffer want = dst;
  want.base = reinterpret_cast<char*>(want.bytes.data()) + (dst.base - reinterpret_cast<char*>(dst.bytes.data()));
  Dims idx(sizes.size(), 0);
  bool any = true;
  for (const int64_t s : sizes) any = any && s > 0;
  if (any) {
    do {
      std::memcpy(want.base + offset_of(idx, ds) * elem, src.base + offset_of(idx, ss) * elem, elem);
    } while (next_index(idx, sizes));
  }
  CopyPlan plan("copy_plan_host", elem);
  plan.add(make_view(src.base, elem, sizes, ss), make_view(dst.base, elem, sizes, ds));
  execute(plan);
  compare("add", c, dst, want);
}

// add_nd(): dst element i <- src element start + i, row-major on each side.
void nd_case(int c, const Dims& s_sizes, const Dims& d_sizes, int64_t start, int64_t elem) {
  int64_t s_span = 0, d_span = 0;
  const Dims ss = random_strides(s_sizes, &s_span), ds = random_strides(d_sizes, &d_span);
  Buffer src(s_span * elem, uniform(0, 1) * uniform(1, 15));
  Buffer dst(d_span * elem, uniform(0, 1) * uniform(1, 15));
  Buffer want = dst;
  want.base = reinterpret_cast<char*>(want.bytes.data()) + (dst.base - reinterpret_cast<char*>(dst.bytes.data()));
  int64_t n = 1;
  for (const int64_t s : d_sizes) n *= s;
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(want.base + unravel(i, static_cast<int>(d_sizes.size()), d_sizes.data(), ds.data()) * elem,
                src.base + unravel(start + i, static_cast<int>(s_sizes.size()), s_sizes.data(), ss.data()) * elem,
                elem);
  }
  CopyPlan plan("copy_plan_host", elem);
  plan.add_nd(make_view(src.base, elem, s_sizes, ss), start, make_view(dst.base, elem, d_sizes, ds));
  execute(plan);
  compare("add_nd", c, dst, want);
}

}  // namespace

int main() {
  const int64_t elems[] = {1, 2, 4, 8, 16, 3, 6, 12};
  int cases = 0;
  for (int c = 0; c < 3000; ++c) {
    Dims sizes;
    const int nd = static_cast<int>(uniform(0, 4));
    for (int k = 0; k < nd; ++k) sizes.push_back(uniform(0, 6) == 0 ? uniform(0, 1) : uniform(2, 7));
    copy_case(c, sizes, elems[uniform(0, 7)]);
    ++cases;
  }
  // More pieces than the 2-D tables take (the N-d kernel), including misaligned 16-byte elements.
  for (int c = 0; c < 20; ++c) {
    copy_case(10000 + c, Dims{uniform(65, 80), uniform(65, 80), 2, 3}, elems[uniform(0, 7)]);
    ++cases;
  }
  for (int c = 0; c < 500; ++c) {
    Dims s_sizes, d_sizes;
    for (int k = 0; k < static_cast<int>(uniform(1, 3)); ++k) s_sizes.push_back(uniform(1, 6));
    int64_t total = 1;
    for (const int64_t s : s_sizes) total *= s;
    const int64_t n = uniform(0, total);
    const int64_t start = uniform(0, total - n);
    const int64_t cols = uniform(1, 3);
    if (n % cols == 0 && n > 0) {
      d_sizes = Dims{n / cols, cols};
    } else {
      d_sizes = Dims{n};
    }
    nd_case(20000 + c, s_sizes, d_sizes, start, elems[uniform(0, 7)]);
    ++cases;
  }
  if (failures > 0) {
    std::printf("%d of %d cases differ\n", failures, cases);
    return 1;
  }
  std::printf("ok %d\n", cases);
  return 0;
}
