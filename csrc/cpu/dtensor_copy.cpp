// DTensor local shards and Megatron-FSDP flat ranges on CPU: the copy job, the row-major walker for flat ranges
// between two multi-dim layouts, and registration. Checks and the layout walks are in csrc/common/dtensor.h.
#include <torch/library.h>

#include "../common/dtensor.h"
#include "block_copy.h"

namespace bridge {

void shard_copy_cpu(const at::Tensor& src, const at::Tensor& dst, at::IntArrayRef mesh_shape,
                    at::IntArrayRef mesh_coord, at::IntArrayRef shard_dims) {
  const char* op = "shard_copy";
  const ShardBox box = shard_copy_check(op, src, dst, mesh_shape, mesh_coord, shard_dims);
  cpu::CopyJob job(op, src.element_size());
  shard_copy_walk(box, src, dst, job);
  job.run();
}

namespace {

// A coalesced view walked in row-major order: a position (multi-index, offset in elements).
struct Walker {
  Dims sizes, strides, idx;
  int64_t offset = 0;

  explicit Walker(const View& v) : sizes(v.sizes), strides(v.strides) {
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

// dst element i (row-major) <- src element start + i, both coalesced and neither one strided run: both are walked
// in runs bounded by their innermost dims, in parallel over ranges of dst elements.
void flat_runs_cpu(const View& src, int64_t start, const View& dst) {
  const int64_t n = dst.numel();
  const int64_t elem = src.elem;
  const Walker sw0(src), dw0(dst);
  auto body = [&](int64_t b, int64_t e) {
    Walker sw = sw0, dw = dw0;
    sw.seek(start + b);
    dw.seek(b);
    for (int64_t pos = b; pos < e;) {
      const int64_t run = std::min({e - pos, sw.run_left(), dw.run_left()});
      const char* s = src.ptr + sw.offset * elem;
      char* d = dst.ptr + dw.offset * elem;
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

}  // namespace

void flat_range_copy_cpu(const at::Tensor& src, const at::Tensor& dst, int64_t start) {
  const char* op = "flat_range_copy";
  flat_range_copy_check(op, src, dst, start);
  cpu::CopyJob job(op, src.element_size());
  flat_range_copy_walk(src, dst, start, job, flat_runs_cpu);
  job.run();
}

TORCH_LIBRARY_IMPL(bridge, CPU, m) {
  m.impl("shard_copy", &shard_copy_cpu);
  m.impl("flat_range_copy", &flat_range_copy_cpu);
}

}  // namespace bridge
