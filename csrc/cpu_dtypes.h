// The dtypes of the CPU kernels of ctr_graph_conv, deformable_temporal_conv and
// temporal_max_pool: they compute in float32 or float64, and take bfloat16 features too (stored
// as simd::bf16, widened to float32 as read, forward and backward).
#pragma once

#include <ATen/ATen.h>

namespace bharnet {

// Raises unless `dtype` (of the features `name`) is one the CPU kernels take; true for bfloat16.
inline bool check_cpu_dtype(const char* op, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, op,
              ": the CPU kernels take float32, float64 or bfloat16", name, ", got ", dtype);
  return dtype == at::kBFloat16;
}

}  // namespace bharnet
