// Which vector width the CPU kernels use (cpu_simd.h): the wide (64-byte, AVX-512) path when the
// running CPU supports x86-64-v4, unless bharnet::cpu_vector_bytes(32) forced the 32-byte clones
// (tests check both paths on one machine; bharnet::cpu_wide_calls() counts the wide path's calls).
#include <torch/library.h>

#include <atomic>

#include "cpu_simd.h"

namespace bharnet {
namespace simd {
namespace {

bool cpu_has_wide() {
#if BHARNET_HAS_WIDE
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v4");  // the ISA level run_wide is compiled for
#else
  return false;
#endif
}

std::atomic<int64_t> wide_calls{0};

std::atomic<bool>& wide_enabled() {
  static std::atomic<bool> enabled{cpu_has_wide()};
  return enabled;
}

}  // namespace

bool use_wide_vectors() { return wide_enabled().load(std::memory_order_relaxed); }

void count_wide_call() { wide_calls.fetch_add(1, std::memory_order_relaxed); }

int64_t wide_call_count() { return wide_calls.load(std::memory_order_relaxed); }

int64_t set_vector_bytes(int64_t bytes) {
  const int64_t previous = use_wide_vectors() ? 64 : 32;
  if (bytes == 0) return previous;
  TORCH_CHECK(bytes == 32 || bytes == 64, "bharnet::cpu_vector_bytes: 32 or 64 (0 to query), got ", bytes);
  TORCH_CHECK(bytes == 32 || cpu_has_wide(), "bharnet::cpu_vector_bytes: 64-byte vectors need a CPU with AVX-512 "
              "(x86-64-v4) and a GCC build on x86-64 Linux");
  wide_enabled().store(bytes == 64, std::memory_order_relaxed);
  return previous;
}

}  // namespace simd
}  // namespace bharnet

TORCH_LIBRARY_FRAGMENT(bharnet, m) {
  m.def("cpu_vector_bytes(int bytes=0) -> int", &bharnet::simd::set_vector_bytes);
  m.def("cpu_wide_calls() -> int", &bharnet::simd::wide_call_count);
}
