// C++ declarations shared by the CPU and CUDA kernels of torch.ops.bridge.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

namespace bridge {

// Shape helpers shared by CPU and CUDA kernels (defined in csrc/cpu/*.cpp).
// Each concern adds its declarations here.

}  // namespace bridge
