// Argument checks that put the op, the argument and the offending values into the message. Used by the shared
// checks of csrc/common/*.h, so the CPU and CUDA kernels of an op report the same errors. Compiled by g++ and nvcc.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/DeviceType.h>
#include <torch/library.h>

#include <vector>

namespace bridge {

#define BRIDGE_CHECK_SAME_DEVICE(op, a, a_name, b, b_name)                                       \
  TORCH_CHECK((a).device() == (b).device(), op, ": ", a_name, " is on ", (a).device(), " but ", \
              b_name, " is on ", (b).device())

#define BRIDGE_CHECK_SAME_DTYPE(op, a, a_name, b, b_name)                                           \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), op, ": ", a_name, " has dtype ",             \
              (a).scalar_type(), " but ", b_name, " has dtype ", (b).scalar_type())

#define BRIDGE_CHECK_RANK(op, rank_name, rank, size_name, size)                                        \
  TORCH_CHECK((size) >= 1 && (rank) >= 0 && (rank) < (size), op, ": ", rank_name, " = ", rank,         \
              " is out of range for ", size_name, " = ", size)

#define BRIDGE_CHECK_DIVISIBLE(op, a_name, a, b_name, b)                                            \
  TORCH_CHECK((b) > 0 && (a) % (b) == 0, op, ": ", a_name, " = ", a, " is not divisible by ", b_name, \
              " = ", b)

#define BRIDGE_CHECK_POSITIVE(op, name, value) \
  TORCH_CHECK((value) >= 1, op, ": ", name, " = ", value, " must be >= 1")

// The one device-specific check: `t` lives on a device of `type` ("qkv_pack: k must be a CUDA tensor, got device
// cpu"). Every other tensor of an op is compared with its reference by check_like / check_out, which name both.
inline void check_device_type(const char* op, const at::Tensor& t, const char* name, c10::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, op, ": ", name, " must be a ", c10::DeviceTypeName(type),
              " tensor, got device ", t.device());
}

// `t` has dims >= 1 and the same dtype, device and trailing dims (all but dim 0) as `ref`.
inline void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least 1 dim, got shape ", t.sizes());
  BRIDGE_CHECK_SAME_DEVICE(op, t, name, ref, ref_name);
  BRIDGE_CHECK_SAME_DTYPE(op, t, name, ref, ref_name);
  TORCH_CHECK(t.dim() == ref.dim() && t.sizes().slice(1) == ref.sizes().slice(1), op, ": ", name, " has shape ",
              t.sizes(), " but ", ref_name, " has shape ", ref.sizes(), " (trailing dims must match)");
}

// `t` has exactly `sizes`.
inline void check_shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " has shape ", t.sizes(), ", expected ", sizes);
}

// A destination: `ref`'s device and dtype, exactly `sizes`.
inline void check_out(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef sizes,
                      const at::Tensor& ref, const char* ref_name) {
  BRIDGE_CHECK_SAME_DEVICE(op, t, name, ref, ref_name);
  BRIDGE_CHECK_SAME_DTYPE(op, t, name, ref, ref_name);
  check_shape(op, t, name, sizes);
}

// `t` has `rows` rows (dim 0); `what` spells the expectation, e.g. "H*d".
inline void check_rows(const char* op, const at::Tensor& t, const char* name, int64_t rows, const char* what) {
  TORCH_CHECK(t.dim() >= 1 && t.size(0) == rows, op, ": ", name, " has ", (t.dim() >= 1 ? t.size(0) : 0),
              " rows (shape ", t.sizes(), "), expected ", what, " = ", rows);
}

// A list of `count` destinations (`count_what` spells it, e.g. "E/ep"), each with `ref`'s device and dtype and
// exactly `sizes` (`sizes_what` says what that shape is); messages name the element, e.g. "out[1]".
inline void check_out_list(const char* op, at::TensorList outs, const char* name, int64_t count,
                           const char* count_what, at::IntArrayRef sizes, const char* sizes_what,
                           const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(static_cast<int64_t>(outs.size()) == count, op, ": ", name, " has ", outs.size(),
              " tensors, expected ", count_what, " = ", count);
  for (size_t e = 0; e < outs.size(); ++e) {
    const at::Tensor& x = outs[e];
    TORCH_CHECK(x.device() == ref.device() && x.scalar_type() == ref.scalar_type(), op, ": ", name, "[", e, "] is ",
                x.scalar_type(), " on ", x.device(), " but ", ref_name, " is ", ref.scalar_type(), " on ",
                ref.device());
    TORCH_CHECK(x.sizes() == sizes, op, ": ", name, "[", e, "] has shape ", x.sizes(), ", expected ", sizes, " (",
                sizes_what, ")");
  }
}

// [rows, trailing dims of t...].
inline std::vector<int64_t> shape_with_rows(const at::Tensor& t, int64_t rows) {
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
  s[0] = rows;
  return s;
}

// [n, sizes...].
inline std::vector<int64_t> shape_stacked(int64_t n, at::IntArrayRef sizes) {
  std::vector<int64_t> s{n};
  s.insert(s.end(), sizes.begin(), sizes.end());
  return s;
}

}  // namespace bridge
