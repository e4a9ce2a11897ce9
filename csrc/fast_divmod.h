// Division by a runtime divisor without a divide instruction (torch-free; host and device).
//
// GPUs have no integer divide: `n / d` with a runtime d compiles to a ~20-instruction sequence
// (32-bit) or a call into a ~60-instruction routine (64-bit). A kernel that splits a flat
// index into coordinates on every operand load spends more on that than on its FMAs.
// FastDivmod precomputes, on the host, a magic multiplier for d (Granlund and Montgomery,
// "Division by invariant integers using multiplication", 1994): with s = ceil(log2 d) and
//   m = floor(2^32 (2^s - d) / d) + 1          (fits in 32 bits, as 2^s - d < d),
// the quotient of any 0 <= n < 2^31 is
//   n / d = (mulhi(n, m) + n) >> s              (mulhi = the high 32 bits of the 64-bit product)
// and the remainder n - (n / d) d: a multiply-high, an add, a shift and a multiply-add.
// n < 2^31 keeps mulhi(n, m) + n below 2^32; the CUDA bindings keep every index below
// kMaxIndexExtent = 2^30 (cuda_launchers.h). tests/ops/test_cuda_emulated.py checks the
// identity against plain division.
#pragma once

#include <cstdint>

// Host and device functions under nvcc (divisors are prepared on the host), plain inline
// functions in C++ (the host code, and the kernels' CPU emulation in the tests).
#if defined(__CUDACC__)
#define BHARNET_HD __host__ __device__ __forceinline__
#else
#define BHARNET_HD inline
#endif

namespace bharnet {

struct FastDivmod {
  uint32_t divisor = 1, magic = 1, shift = 0;

  FastDivmod() = default;
  // d must be below 2^31. d = 0 (an empty dimension: nothing is ever divided by it) gives the
  // divisor 1, so that building the divisors of an empty tensor's shape is harmless.
  explicit FastDivmod(int64_t d) : divisor(d < 1 ? 1u : static_cast<uint32_t>(d)) {
    while ((uint64_t(1) << shift) < divisor) ++shift;
    magic = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - divisor)) / divisor + 1);
  }

  BHARNET_HD uint32_t mulhi(uint32_t a, uint32_t b) const {
#if defined(__CUDA_ARCH__)
    return __umulhi(a, b);
#else
    return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
  }

  // n / divisor for 0 <= n < 2^31.
  BHARNET_HD int div(int n) const {
    const uint32_t u = static_cast<uint32_t>(n);
    return static_cast<int>((mulhi(u, magic) + u) >> shift);
  }

  // quotient = n / divisor, remainder = n % divisor for 0 <= n < 2^31.
  BHARNET_HD void divmod(int n, int& quotient, int& remainder) const {
    quotient = div(n);
    remainder = n - quotient * static_cast<int>(divisor);
  }
};

}  // namespace bharnet
