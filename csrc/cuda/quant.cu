// The quantized ops on CUDA: the executor of the rectangle plans of csrc/common/quant.h, and registration (the op
// bodies are csrc/common/quant_ops.h, shared with the CPU). The host groups a plan's rectangles by row group (a row
// of FP8 scale blocks, or 32 MXFP4 rows) and cuts each group into column tiles; one CUDA block works on one tile,
// warps over rows, lanes over columns. Quantization tiles are exactly one scale block (bn x bk): the block reduces
// its amax, writes the scale and then the FP8 values. The tables travel in one pinned buffer and one async copy, and
// everything runs on the current stream.
//
// Two host synchronisations: dequantization checks the scales it will read (NaN / Inf) before writing anything;
// quantization reads back whether a block held NaN / Inf (those blocks are not written) and raises after the launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/quant_ops.h"

namespace bridge {
namespace quant {
namespace cuda_quant {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Column tile of a dequantization (a multiple of 32: MXFP4 groups stay whole).
constexpr int64_t kDequantTileCols = 256;
constexpr uint64_t kNone = ~uint64_t(0);

// One row group of one matrix and its column tiles: CUDA blocks [tile_begin, tile_begin + tiles).
struct DevGroup {
  int64_t id, row_block;
  int64_t first, last;  // clips
  int64_t tile_begin, tiles, tile_cols;
};

__device__ inline int find_group(const DevGroup* groups, int n, int64_t b) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (groups[mid].tile_begin <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__global__ void __launch_bounds__(kThreads)
    dequant_kernel(const QTensor* __restrict__ tensors, const QRect* __restrict__ clips,
                   const DevGroup* __restrict__ groups, int num_groups, int32_t wide, int64_t welem) {
  const int64_t b = blockIdx.x;
  const DevGroup g = groups[find_group(groups, num_groups, b)];
  const QTensor t = tensors[g.id];
  const int64_t c_lo = (b - g.tile_begin) * g.tile_cols;
  const int64_t c_hi = c_lo + g.tile_cols < t.K ? c_lo + g.tile_cols : t.K;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  for (int64_t k = g.first; k < g.last; ++k) {
    const QRect c = clips[k];
    const int64_t lo = c.c0 > c_lo ? c.c0 : c_lo;
    const int64_t hi = c.c0 + c.nc < c_hi ? c.c0 + c.nc : c_hi;
    if (lo >= hi) continue;
    for (int64_t i = warp; i < c.nr; i += kWarps) {
      const int64_t r = c.r0 + i * c.rstep;
      char* dst = c.other + i * c.ors * welem;
      for (int64_t col = lo + lane; col < hi; col += 32) {
        const float v = qtensor_value(t, r, col) * qtensor_scale(t, r, col);
        store_wide(dst + (col - c.c0) * c.ocs * welem, v, wide);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    quant_kernel(const QTensor* __restrict__ tensors, const QRect* __restrict__ clips,
                 const DevGroup* __restrict__ groups, int num_groups, int32_t wide, int64_t welem, int32_t rule,
                 unsigned long long* bad) {
  __shared__ float warp_max[kWarps];
  __shared__ float block_factor;
  const int64_t b = blockIdx.x;
  const DevGroup g = groups[find_group(groups, num_groups, b)];
  const QTensor t = tensors[g.id];
  const int64_t cb = b - g.tile_begin;
  const int64_t c_lo = cb * g.tile_cols;
  const int64_t c_hi = c_lo + g.tile_cols < t.K ? c_lo + g.tile_cols : t.K;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  float m = 0.0f;
  int nonfinite = 0;
  for (int64_t k = g.first; k < g.last; ++k) {
    const QRect c = clips[k];
    const int64_t lo = c.c0 > c_lo ? c.c0 : c_lo;
    const int64_t hi = c.c0 + c.nc < c_hi ? c.c0 + c.nc : c_hi;
    if (lo >= hi) continue;
    for (int64_t i = warp; i < c.nr; i += kWarps) {
      const char* src = c.other + i * c.ors * welem;
      for (int64_t col = lo + lane; col < hi; col += 32) {
        const float a = fabsf(load_wide(src + (col - c.c0) * c.ocs * welem, wide));
        nonfinite |= !(a <= FLT_MAX);
        m = a > m ? a : m;
      }
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, m, off);
    m = o > m ? o : m;
  }
  if (lane == 0) warp_max[warp] = m;
  if (__syncthreads_or(nonfinite)) {
    if (threadIdx.x == 0) atomicMin(bad, static_cast<unsigned long long>(b));
    return;
  }
  if (threadIdx.x == 0) {
    float amax = 0.0f;
    for (int w = 0; w < kWarps; ++w) amax = warp_max[w] > amax ? warp_max[w] : amax;
    float factor;
    const float s = quant_scale(amax, fp8_max(t.format), rule, &factor);
    std::memcpy(t.scale + g.row_block * t.sr + cb * t.sc, &s, 4);
    block_factor = factor;
  }
  __syncthreads();
  const float factor = block_factor;
  const float fmax = fp8_max(t.format);
  for (int64_t k = g.first; k < g.last; ++k) {
    const QRect c = clips[k];
    const int64_t lo = c.c0 > c_lo ? c.c0 : c_lo;
    const int64_t hi = c.c0 + c.nc < c_hi ? c.c0 + c.nc : c_hi;
    if (lo >= hi) continue;
    for (int64_t i = warp; i < c.nr; i += kWarps) {
      const int64_t r = c.r0 + i * c.rstep;
      const char* src = c.other + i * c.ors * welem;
      for (int64_t col = lo + lane; col < hi; col += 32) {
        const float x = load_wide(src + (col - c.c0) * c.ocs * welem, wide);
        t.data[r * t.dr + col * t.dc] = static_cast<char>(quantize_value(x, factor, fmax, rule, t.format));
      }
    }
  }
}

// Flat index x over the scale grids of the listed matrices (scale_begin: prefix sums, one more than ids); the
// smallest x holding NaN / Inf lands in *bad.
__global__ void check_scales_kernel(const QTensor* __restrict__ tensors, const int64_t* __restrict__ ids,
                                    const int64_t* __restrict__ scale_begin, int num_ids, int64_t total,
                                    unsigned long long* bad) {
  for (int64_t x = int64_t(blockIdx.x) * kThreads + threadIdx.x; x < total; x += int64_t(gridDim.x) * kThreads) {
    int lo = 0, hi = num_ids - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (scale_begin[mid] <= x) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const QTensor& t = tensors[ids[lo]];
    const int64_t kb = (t.K + t.bk - 1) / t.bk;
    const int64_t o = x - scale_begin[lo], i = o / kb, j = o - i * kb;
    const float s = load_scale(t.scale + i * t.sr + j * t.sc, t.scale_format);
    if (!isfinite(s)) atomicMin(bad, static_cast<unsigned long long>(x));
  }
}

// The tables of one launch, laid out in one pinned host buffer and copied to the device in one go.
class Upload {
 public:
  template <class T>
  size_t add(const std::vector<T>& v) {
    const size_t off = (bytes_.size() + 15) / 16 * 16;
    bytes_.resize(off + v.size() * sizeof(T));
    if (!v.empty()) std::memcpy(bytes_.data() + off, v.data(), v.size() * sizeof(T));
    return off;
  }

  // Copies the buffer to `device` on the current stream; returns the device base pointer (valid while dev_ lives).
  char* upload(const at::Device& device) {
    at::Tensor host = at::empty({static_cast<int64_t>(std::max<size_t>(bytes_.size(), 16))},
                                at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), bytes_.data(), bytes_.size());
    dev_ = at::empty({host.numel()}, at::TensorOptions().dtype(at::kByte).device(device));
    dev_.copy_(host, /*non_blocking=*/true);
    return static_cast<char*>(dev_.data_ptr());
  }

 private:
  std::vector<char> bytes_;
  at::Tensor dev_;
};

// A flag on the device, initially kNone; read() synchronises with the stream.
struct DeviceFlag {
  at::Tensor t;
  explicit DeviceFlag(const at::Device& device)
      : t(at::full({1}, -1, at::TensorOptions().dtype(at::kLong).device(device))) {}
  unsigned long long* ptr() { return reinterpret_cast<unsigned long long*>(t.data_ptr<int64_t>()); }
  uint64_t read() { return static_cast<uint64_t>(t.cpu().data_ptr<int64_t>()[0]); }
};

std::vector<DevGroup> lay_out_tiles(const QPlan& plan, const QGroups& gs, bool quantize, int64_t* blocks) {
  std::vector<DevGroup> out;
  out.reserve(gs.groups.size());
  int64_t b = 0;
  for (const QGroup& g : gs.groups) {
    const QTensor& t = plan.tensors()[static_cast<size_t>(g.id)];
    const int64_t tile = quantize ? t.bk : kDequantTileCols;
    const int64_t tiles = ceil_div(t.K, tile);
    out.push_back(DevGroup{g.id, g.row_block, g.first, g.last, b, tiles, tile});
    b += tiles;
  }
  TORCH_CHECK(b < (int64_t(1) << 31), plan.op(), ": ", b, " CUDA blocks exceed the grid limit of 2^31 - 1");
  *blocks = b;
  return out;
}

struct CudaExec {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;

  // NaN / Inf in the scales the plan reads: one small kernel and one synchronisation, before anything is written.
  static void check_scales(const QPlan& plan, const QTensor* dev_tensors) {
    const std::vector<int64_t> ids = plan.used_ids();
    if (ids.empty()) return;
    std::vector<int64_t> begin{0};
    for (const int64_t id : ids) {
      const QTensor& t = plan.tensors()[static_cast<size_t>(id)];
      begin.push_back(begin.back() + ceil_div(t.N, t.bn) * ceil_div(t.K, t.bk));
    }
    const int64_t total = begin.back();
    if (total == 0) return;
    Upload u;
    const size_t o_ids = u.add(ids), o_begin = u.add(begin);
    char* d = u.upload(plan.device());
    DeviceFlag bad(plan.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t want = ceil_div(total, kThreads);
    check_scales_kernel<<<static_cast<unsigned>(std::min<int64_t>(want, 4096)), kThreads, 0, stream>>>(
        dev_tensors, reinterpret_cast<const int64_t*>(d + o_ids), reinterpret_cast<const int64_t*>(d + o_begin),
        static_cast<int>(ids.size()), total, bad.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const uint64_t x = bad.read();
    if (x == kNone) return;
    size_t k = 0;
    while (k + 1 < ids.size() && static_cast<uint64_t>(begin[k + 1]) <= x) ++k;
    const QTensor& t = plan.tensors()[static_cast<size_t>(ids[k])];
    const int64_t kb = ceil_div(t.K, t.bk);
    const int64_t o = static_cast<int64_t>(x) - begin[k], i = o / kb, j = o - i * kb;
    char raw[4] = {0, 0, 0, 0};
    const int64_t se = t.scale_format == kScaleF32 ? 4 : (t.scale_format == kScaleE8M0 ? 1 : 2);
    C10_CUDA_CHECK(cudaMemcpy(raw, t.scale + i * t.sr + j * t.sc, static_cast<size_t>(se), cudaMemcpyDeviceToHost));
    fail_scale(plan, ids[k], i, j, load_scale(raw, t.scale_format));
  }

  static void dequant(const QPlan& plan) {
    const QGroups gs = group_rects(plan);
    if (gs.groups.empty()) return;
    const c10::cuda::OptionalCUDAGuard guard(plan.device());
    int64_t blocks = 0;
    const std::vector<DevGroup> groups = lay_out_tiles(plan, gs, false, &blocks);
    Upload up;
    const size_t o_t = up.add(plan.tensors()), o_c = up.add(gs.clips), o_g = up.add(groups);
    char* d = up.upload(plan.device());
    const auto* tensors = reinterpret_cast<const QTensor*>(d + o_t);
    check_scales(plan, tensors);
    if (blocks == 0) return;
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dequant_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        tensors, reinterpret_cast<const QRect*>(d + o_c), reinterpret_cast<const DevGroup*>(d + o_g),
        static_cast<int>(groups.size()), plan.wide(), plan.wide_elem());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void quant(const QPlan& plan, int32_t rule) {
    const QGroups gs = group_rects(plan);
    check_groups_cover(plan, gs);
    if (gs.groups.empty()) return;
    const c10::cuda::OptionalCUDAGuard guard(plan.device());
    int64_t blocks = 0;
    const std::vector<DevGroup> groups = lay_out_tiles(plan, gs, true, &blocks);
    if (blocks == 0) return;
    Upload up;
    const size_t o_t = up.add(plan.tensors()), o_c = up.add(gs.clips), o_g = up.add(groups);
    char* d = up.upload(plan.device());
    DeviceFlag bad(plan.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    quant_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        reinterpret_cast<const QTensor*>(d + o_t), reinterpret_cast<const QRect*>(d + o_c),
        reinterpret_cast<const DevGroup*>(d + o_g), static_cast<int>(groups.size()), plan.wide(), plan.wide_elem(),
        rule, bad.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const uint64_t x = bad.read();
    if (x == kNone) return;
    size_t k = 0;
    while (k + 1 < groups.size() && static_cast<uint64_t>(groups[k + 1].tile_begin) <= x) ++k;
    fail_block(plan, groups[k].id, groups[k].row_block, static_cast<int64_t>(x) - groups[k].tile_begin);
  }
};

}  // namespace cuda_quant

TORCH_LIBRARY_IMPL(bridge, CUDA, m) { register_quant_ops<cuda_quant::CudaExec>(m); }

}  // namespace quant
}  // namespace bridge
