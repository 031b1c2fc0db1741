// Torch-free CUDA kernels that move bytes between strided 2-D segments (and a general N-d fallback).
//
// Every bridge op on CUDA is "copy these rectangular blocks of rows from here to there": the host side
// (CopyPlan in csrc/cuda/copy_plan.cuh) turns tensor views into CopySeg / NdCopy descriptors and launches one of
// these kernels per kind of segment and unit width. Kernels are templated on the unit they move (kBytes = 1, 2, 4,
// 8 or 16: the element size, a wider unit for vectorised row copies, or a narrower one when an element's alignment
// does not allow loading it whole), never on the dtype: bf16, fp16, fp32, fp8, int64, complex128 all move the same
// way.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace bridge {
namespace kernels {

// One rectangular block: rows x cols units, strides in units (not bytes). `block_begin` is the index of the
// first CUDA block of the launch that works on this segment (segments are laid out back to back in the grid).
struct CopySeg {
  const char* src;
  char* dst;
  int64_t rows;
  int64_t cols;
  int64_t src_row_stride;
  int64_t src_col_stride;
  int64_t dst_row_stride;
  int64_t dst_col_stride;
  int64_t block_begin;
};

// The machine type that holds one unit of kBytes bytes.
template <int kBytes>
struct Unit;
template <>
struct Unit<1> {
  using type = uint8_t;
};
template <>
struct Unit<2> {
  using type = uint16_t;
};
template <>
struct Unit<4> {
  using type = uint32_t;
};
template <>
struct Unit<8> {
  using type = uint2;
};
template <>
struct Unit<16> {
  using type = uint4;
};

// Row-copy launch geometry: 256 threads, each moving kRowIlp units per pass.
constexpr int kRowThreads = 256;
constexpr int kRowIlp = 4;
constexpr int64_t kRowChunk = int64_t(kRowThreads) * kRowIlp;

// Transpose tile: kTile x kTile units, kTile x kTileRows threads.
constexpr int kTile = 32;
constexpr int kTileRows = 8;

// Number of CUDA blocks copy_rows_kernel spends on a segment of rows x cols units.
__host__ __device__ inline int64_t row_blocks(int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return 0;
  if (cols > kRowThreads) return rows * ((cols + kRowChunk - 1) / kRowChunk);
  const int64_t rows_per_block = (kRowThreads / cols) * kRowIlp;
  return (rows + rows_per_block - 1) / rows_per_block;
}

// Number of CUDA blocks copy_tiled_kernel spends on a segment.
__host__ __device__ inline int64_t tile_blocks(int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return 0;
  return ((rows + kTile - 1) / kTile) * ((cols + kTile - 1) / kTile);
}

// The segment that CUDA block `b` works on (binary search over block_begin; segments are sorted by it).
__device__ inline int find_segment(const CopySeg* segs, int num_segs, int64_t b) {
  int lo = 0, hi = num_segs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (segs[mid].block_begin <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Copies segments whose rows are contiguous runs of units (column stride 1 on both sides, or one column).
// Wide rows (more units than threads): a block moves up to kRowChunk units of one row. Narrow rows: a block moves
// kRowIlp passes of kRowThreads / cols whole rows, one thread per unit. Loads are issued before stores so that each
// thread has kRowIlp loads in flight.
template <int kBytes>
__global__ void __launch_bounds__(kRowThreads) copy_rows_kernel(const CopySeg* __restrict__ segs, int num_segs) {
  using T = typename Unit<kBytes>::type;
  const int64_t b = blockIdx.x;
  const CopySeg s = segs[find_segment(segs, num_segs, b)];
  const int64_t lb = b - s.block_begin;
  const T* __restrict__ src = reinterpret_cast<const T*>(s.src);
  T* __restrict__ dst = reinterpret_cast<T*>(s.dst);
  T v[kRowIlp];
  if (s.cols > kRowThreads) {
    const int64_t chunks = (s.cols + kRowChunk - 1) / kRowChunk;
    const int64_t row = lb / chunks;
    const int64_t c0 = (lb - row * chunks) * kRowChunk + threadIdx.x;
    const T* sr = src + row * s.src_row_stride;
    T* dr = dst + row * s.dst_row_stride;
#pragma unroll
    for (int k = 0; k < kRowIlp; ++k) {
      const int64_t c = c0 + int64_t(k) * kRowThreads;
      if (c < s.cols) v[k] = sr[c];
    }
#pragma unroll
    for (int k = 0; k < kRowIlp; ++k) {
      const int64_t c = c0 + int64_t(k) * kRowThreads;
      if (c < s.cols) dr[c] = v[k];
    }
  } else {
    const int cols = static_cast<int>(s.cols);
    const int rows_per_pass = kRowThreads / cols;
    const int r_off = static_cast<int>(threadIdx.x) / cols;
    const int c = static_cast<int>(threadIdx.x) - r_off * cols;
    if (r_off >= rows_per_pass) return;
    const int64_t r0 = lb * rows_per_pass * kRowIlp + r_off;
#pragma unroll
    for (int k = 0; k < kRowIlp; ++k) {
      const int64_t r = r0 + int64_t(k) * rows_per_pass;
      if (r < s.rows) v[k] = src[r * s.src_row_stride + c];
    }
#pragma unroll
    for (int k = 0; k < kRowIlp; ++k) {
      const int64_t r = r0 + int64_t(k) * rows_per_pass;
      if (r < s.rows) dst[r * s.dst_row_stride + c] = v[k];
    }
  }
}

// Copies segments where the columns are strided on at least one side, through a shared-memory tile.
// The host orients each segment so that the source is read along columns (its unit-stride dim, if any) and the
// destination is written along rows: both global accesses are coalesced for a transpose such as x.t().
template <int kBytes>
__global__ void __launch_bounds__(kTile* kTileRows) copy_tiled_kernel(const CopySeg* __restrict__ segs, int num_segs) {
  using T = typename Unit<kBytes>::type;
  __shared__ T tile[kTile][kTile + 1];
  const int64_t b = blockIdx.x;
  const CopySeg s = segs[find_segment(segs, num_segs, b)];
  const int64_t lb = b - s.block_begin;
  const int64_t col_tiles = (s.cols + kTile - 1) / kTile;
  const int64_t tr = lb / col_tiles;
  const int64_t tc = lb - tr * col_tiles;
  const T* __restrict__ src = reinterpret_cast<const T*>(s.src);
  T* __restrict__ dst = reinterpret_cast<T*>(s.dst);
  const int tx = threadIdx.x, ty = threadIdx.y;
  {
    const int64_t c = tc * kTile + tx;
#pragma unroll
    for (int i = ty; i < kTile; i += kTileRows) {
      const int64_t r = tr * kTile + i;
      if (r < s.rows && c < s.cols) tile[i][tx] = src[r * s.src_row_stride + c * s.src_col_stride];
    }
  }
  __syncthreads();
  {
    const int64_t r = tr * kTile + tx;
#pragma unroll
    for (int i = ty; i < kTile; i += kTileRows) {
      const int64_t c = tc * kTile + i;
      if (r < s.rows && c < s.cols) dst[r * s.dst_row_stride + c * s.dst_col_stride] = tile[tx][i];
    }
  }
}

// General N-d strided copy, the fallback for layouts that do not reduce to a few 2-D segments: destination element
// i (row-major over dst_sizes) <- source element src_start + i (row-major over src_sizes). The two shapes may
// differ (flat_range_copy), both have arbitrary strides.
constexpr int kMaxDims = 16;
struct NdCopy {
  const char* src;
  char* dst;
  int64_t numel;
  int64_t src_start;
  int src_ndim;
  int dst_ndim;
  int64_t src_sizes[kMaxDims];
  int64_t src_strides[kMaxDims];
  int64_t dst_sizes[kMaxDims];
  int64_t dst_strides[kMaxDims];
};

constexpr int kNdThreads = 256;

__device__ inline int64_t unravel_offset(int64_t i, int ndim, const int64_t* sizes, const int64_t* strides) {
  int64_t off = 0;
  for (int d = ndim - 1; d >= 0; --d) {
    const int64_t q = i / sizes[d];
    off += (i - q * sizes[d]) * strides[d];
    i = q;
  }
  return off;
}

template <int kBytes>
__global__ void __launch_bounds__(kNdThreads) copy_nd_kernel(const NdCopy p) {
  using T = typename Unit<kBytes>::type;
  const T* __restrict__ src = reinterpret_cast<const T*>(p.src);
  T* __restrict__ dst = reinterpret_cast<T*>(p.dst);
  for (int64_t i = int64_t(blockIdx.x) * kNdThreads + threadIdx.x; i < p.numel;
       i += int64_t(gridDim.x) * kNdThreads) {
    dst[unravel_offset(i, p.dst_ndim, p.dst_sizes, p.dst_strides)] =
        src[unravel_offset(p.src_start + i, p.src_ndim, p.src_sizes, p.src_strides)];
  }
}

}  // namespace kernels
}  // namespace bridge
