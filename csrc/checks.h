// Small argument checks that put the offending values into the message.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

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

}  // namespace bridge
