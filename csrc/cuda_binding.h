// Shared by the CUDA bindings (csrc/*_cuda.cpp): from torch tensors to the torch-free launcher
// interface of csrc/cuda_launchers.h, with errors that name the op.
#pragma once

#include <ATen/ATen.h>

#include "cuda_launchers.h"

namespace bharnet {

// The launcher's dtype code for `t` (`what` names the tensor in the error, e.g. "features").
inline cuda::DType cuda_dtype(const at::Tensor& t, const char* op, const char* what) {
  switch (t.scalar_type()) {
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    default: TORCH_CHECK(false, op, ": the CUDA kernels take float16, bfloat16, float32 or float64 ", what,
                         ", got ", t.scalar_type());
  }
}

inline void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

}  // namespace bharnet
