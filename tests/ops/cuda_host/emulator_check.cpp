// Checks cuda_emulation.h itself (see test_cuda_emulated.py): that its schedules show a missing
// barrier, keep the threads' registers and stacks apart across fiber switches, and abort on a
// barrier that the threads cannot pass. `emulator_check` runs the checks that must pass and prints
// "ok emulator"; `emulator_check deadlock` launches a kernel whose threads wait at different
// barriers (it must abort with the emulator's message).
#include "cuda_emulation.h"

#include <cstring>

namespace {

constexpr int kThreads = 96;  // three warps

// Each thread stores its index, then reads its neighbour's: with the barrier between, every
// neighbour has stored; without, a schedule that runs one thread to its end before the next shows
// the neighbour's old (poisoned) value.
__global__ void rotate(int* out, bool barrier) {
  unsigned char* raw = ::bharnet::emu::dynamic_shared();  // csrc: BHARNET_DYNAMIC_SHARED
  int* shared = reinterpret_cast<int*>(raw);
  const int t = threadIdx.x;
  shared[t] = t;
  if (barrier) __syncthreads();
  out[t] = shared[(t + 1) % blockDim.x];
}

// A warp sum by shuffles, with locals that live across the switches (on each fiber's own stack),
// for every block of the grid.
__global__ void warp_sums(const int* in, int* out) {
  volatile double kept[8];  // on this fiber's stack across every switch below
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  for (int i = 0; i < 8; ++i) kept[i] = t * 8.0 + i;
  int v = in[t];
  for (int mask = 16; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
  for (int i = 0; i < 8; ++i)
    if (kept[i] != t * 8.0 + i) ::bharnet::emu::fail("a fiber's stack changed across a switch");
  out[t] = v;
}

__global__ void diverging_barriers() {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

int check(bool ok, const char* what) {
  if (!ok) std::printf("FAILED: %s\n", what);
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace bharnet::emu;
  if (argc > 1 && std::strcmp(argv[1], "deadlock") == 0) {
    launch(diverging_barriers, dim3(1), dim3(64), 0)();
    std::printf("the diverging barriers passed\n");
    return 0;
  }
  int failures = 0;
  std::vector<int> in(4 * kThreads), out(4 * kThreads);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>(i * 7 % 13);
  for (int schedule = 0; schedule < 4; ++schedule) {
    state().reverse = schedule % 2 == 1;
    state().warps_ahead = schedule >= 2;
    launch(rotate, dim3(1), dim3(kThreads), kThreads * sizeof(int))(out.data(), true);
    bool right = true;
    for (int t = 0; t < kThreads; ++t) right &= out[t] == (t + 1) % kThreads;
    failures += check(right, "rotate with the barrier");
    launch(rotate, dim3(1), dim3(kThreads), kThreads * sizeof(int))(out.data(), false);
    bool wrong = false;
    for (int t = 0; t < kThreads; ++t) wrong |= out[t] != (t + 1) % kThreads;
    failures += check(wrong, "rotate without the barrier shows the race");
    launch(warp_sums, dim3(4), dim3(kThreads), 0)(in.data(), out.data());
    for (int t = 0; t < 4 * kThreads; ++t) {
      int sum = 0;
      for (int l = t / 32 * 32; l < t / 32 * 32 + 32; ++l) sum += in[l];
      failures += check(out[t] == sum, "warp sums");
    }
  }
  if (failures == 0) std::printf("ok emulator\n");
  return failures == 0 ? 0 : 1;
}
