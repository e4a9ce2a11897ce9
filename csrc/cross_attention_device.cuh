// Device helpers shared by the cross-attention CUDA kernels (SIMT: cross_attention_kernels.cu;
// tensor cores: cross_attention_mma_kernels.cu).
#pragma once

#include <cstdint>

namespace bharnet {
namespace cuda {

// scale * x rounded on its own (never contracted into a later add or subtraction): a score is
// then the same value in every kernel, also where it is only used as exp(s - lse), so that P is
// exactly 1 for a query's only valid key.
__device__ __forceinline__ float scaled(float scale, float x) { return __fmul_rn(scale, x); }
__device__ __forceinline__ double scaled(double scale, double x) { return __dmul_rn(scale, x); }

// Whether key j of sequence n may be attended: j < Lk and (no mask, or mask[n, j]).
__device__ __forceinline__ bool key_valid(const bool* mask, int64_t n, int64_t j, int64_t Lk) {
  return j < Lk && (mask == nullptr || mask[n * Lk + j]);
}

}  // namespace cuda
}  // namespace bharnet
