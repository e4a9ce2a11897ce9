// Runs the project's CUDA kernels (csrc/*.cu) on the CPU, so that tests can check whole kernels
// (tiling, shared memory, warp shuffles, tensor-core fragments, launch code) without a GPU.
//
// Include this header, then the .cu files, in one C++20 translation unit compiled by the host
// compiler (g++) with the CUDA toolkit's include directory; csrc spells its launches and its
// dynamic shared memory as macros (BHARNET_LAUNCH, BHARNET_DYNAMIC_SHARED in cuda_gemm.cuh) that
// this header turns into calls to it. Device pointers are host pointers.
//
// Execution model. The blocks of a grid run one after another, and the threads of a block are
// fibers on the calling OS thread, switched only at synchronisation points: the emulation has
// no data races of its own and is deterministic. On x86-64 a fiber switch saves the callee-saved
// registers and swaps stack pointers (bharnet_emu_switch_stack below); elsewhere it is ucontext's
// swapcontext, which also makes a signal-mask system call per switch (with it the emulated tests
// took twice as long: 133 s against 66 s on this project's 2-core CPU). Between two barriers each
// thread runs alone; with emu_set_reverse the threads (and the blocks) run in reverse order. A thread
// that reads what another thread (block) writes without a barrier in between sees the old value
// in one of the two orders, so a missing barrier shows as a wrong result. Two schedules: thread
// by thread (each thread up to its next synchronisation point, then the next one), or warps
// ahead (emu_set_warps_ahead: each warp as far as its own warp operations let it, up to the
// next __syncthreads, before the next warp), which also shows a barrier missing between warps
// whose accesses are separated by warp operations.
//   __syncthreads()   every live thread of the block must arrive (exited threads count as
//                     arrived, as on the hardware) before any goes on;
//   __syncwarp(), shuffles, WMMA operations: the same for the live lanes of the thread's warp
//                     (32 consecutive threads).
// Threads that wait at different barriers (call sites, or kinds of warp operation), a shuffle
// that reads an exited lane, and a barrier that no thread can pass abort with a message (the
// kernel would hang or read garbage on a GPU).
// Memory: `__shared__` variables become static locals (one copy, shared by the block's fibers;
// blocks run one at a time; not re-poisoned between blocks). Dynamic shared memory is 256-byte
// aligned and filled before each block with 0xff bytes (NaN) or, in reverse runs, 0x7b bytes
// (a large finite value in every floating-point dtype, which comparisons do not skip as they do
// NaN), so that reads of what the block did not write show; a guard area after it catches
// writes past its end.
// Tensor-core fragments (nvcuda::wmma) hold the whole tile in every lane. load_matrix_sync
// reads when the lane arrives and then waits for the warp; store_matrix_sync waits, then each
// lane writes the elements it holds on the hardware (so a missing __syncwarp around them shows
// when lanes read back elements other lanes stored); both check
// WMMA's rules (32-byte aligned pointers, ldm a multiple of 16 bytes). mma_sync multiplies the
// 16-bit inputs exactly in float32 and adds in k order into float32 (the hardware's order within
// a k-step is unspecified: results agree to float32 rounding, which the tests allow).
// __CUDA_ARCH__ is 900 for the kernels, and the device is reported as sm_90 (or an older major
// version, emu_set_compute_major, so that the launchers take their pre-sm_80 paths) with 227 KB
// of opt-in shared memory. Launch errors (a block over 1024 threads, dynamic shared memory over
// 48 KB or over what cudaFuncSetAttribute opted this kernel into, an empty grid dimension) come
// back from cudaGetLastError as on the hardware.
// Not emulated: memory ordering between lanes beyond the barriers above, global-memory bounds
// (test_cuda_emulated.py puts guard elements around every buffer instead),
// and compiler floating-point contraction (x86 at -O1 fuses nothing; nvcc may fuse a * b + c).
#pragma once

#define __shared__ static  // before the CUDA headers, which keep a definition they find

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <type_traits>
#include <vector>

namespace bharnet {
namespace emu {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxSharedBytes = 227 * 1024;  // the H100's opt-in limit per block
constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kStackBytes = 256 * 1024;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emulation: %s\n", what);
  std::abort();
}

enum class Wait { kNone, kBlock, kWarp };

#if defined(__x86_64__)
// switch_stack(&from, to): saves the callee-saved registers on the current stack, stores the stack
// pointer in *from, loads `to` and restores what is saved there (the System V ABI's callee-saved
// registers; the x87 and SSE control words are not saved: nothing here changes them). Weak, as
// every translation unit that includes this header defines it.
extern "C" void bharnet_emu_switch_stack(void** from, void* to);
asm(R"(
  .pushsection .text
  .weak bharnet_emu_switch_stack
  .type bharnet_emu_switch_stack, @function
bharnet_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size bharnet_emu_switch_stack, .-bharnet_emu_switch_stack
  .popsection
)");

struct Context {
  void* sp = nullptr;
};

inline void switch_context(Context& from, Context& to) { bharnet_emu_switch_stack(&from.sp, to.sp); }

// A context that starts entry() on the stack [stack, stack + bytes): switch_stack's frame of six
// zeroed registers under entry's address, placed so that entry starts with the stack aligned as
// after a call (rsp + 8 a multiple of 16). entry must not return.
inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15);
  auto* frame = reinterpret_cast<void**>(top - 16);
  frame[0] = reinterpret_cast<void*>(entry);
  frame[1] = nullptr;  // entry's return address: never used
  for (int i = 1; i <= 6; ++i) frame[-i] = nullptr;
  c.sp = frame - 6;
}
#else
struct Context {
  ucontext_t context;
};

inline void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }

inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.context);
  c.context.uc_stack.ss_sp = stack;
  c.context.uc_stack.ss_size = bytes;
  c.context.uc_link = nullptr;  // entry never returns
  makecontext(&c.context, entry, 0);
}
#endif

struct Fiber {
  Context context;
  std::unique_ptr<char[]> stack;
  bool done = false;
  Wait wait = Wait::kNone;
  const char* site = nullptr;  // what the fiber waits at: "file:line" of the barrier, or the warp operation
};

struct State {
  dim3 grid, block, block_idx;
  uint3 thread_idx;
  int threads = 0, current = -1;
  Context scheduler;
  std::vector<Fiber> fibers;
  std::vector<unsigned char> dynamic_shared_storage;
  unsigned char* dynamic_shared = nullptr;
  size_t dynamic_bytes = 0;
  static constexpr size_t kGuard = 1024;
  uint64_t warp_slots[kMaxThreads];  // one shuffle value per thread
  std::map<const void*, size_t> opt_in_shared;  // per kernel, set by cudaFuncSetAttribute
  cudaError_t last_error = cudaSuccess;
  bool reverse = false;  // resume fibers from the last thread to the first
  bool warps_ahead = false;  // the warps-ahead schedule (run_warps_ahead)
  int compute_major = 9;  // the device's compute capability, as cudaDeviceGetAttribute reports it
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};

inline State& state() {
  static State s;
  return s;
}

inline uint3 thread_index(int linear) {
  const State& s = state();
  return {static_cast<unsigned>(linear % s.block.x), static_cast<unsigned>(linear / s.block.x % s.block.y),
          static_cast<unsigned>(linear / (s.block.x * s.block.y))};
}

// Back to the scheduler until the barrier this fiber waits at opens. `site` names the barrier:
// every participant must wait at the same one (the same __syncthreads / __syncwarp call, or the
// same kind of warp operation), else the kernel diverges at a barrier, which the hardware does
// not allow.
inline void wait_at(Wait kind, const char* site) {
  State& s = state();
  if (s.current < 0) fail("a barrier outside a kernel");
  Fiber& f = s.fibers[s.current];
  f.wait = kind;
  f.site = site;
  switch_context(f.context, s.scheduler);
}

inline void same_site(const Fiber& a, const Fiber& b) {
  if (std::strcmp(a.site, b.site) != 0) {
    std::fprintf(stderr, "cuda_emulation: threads wait at different barriers: %s and %s\n", a.site, b.site);
    std::abort();
  }
}

[[noreturn]] inline void fiber_entry() {
  State& s = state();
  s.body(s.body_arg);
  Fiber& f = s.fibers[s.current];
  f.done = true;
  switch_context(f.context, s.scheduler);  // never resumed: run_block makes a new context
  fail("a finished fiber was resumed");
}

// Opens the barrier of kind `kind` for the threads [begin, end) when every live one waits at it
// (at the same site) and at least one does; whether it opened.
inline bool open_if_all_wait(int begin, int end, Wait kind) {
  State& s = state();
  bool all = true;
  const Fiber* first = nullptr;
  for (int t = begin; t < end; ++t) {
    const Fiber& f = s.fibers[t];
    if (f.done) continue;
    if (f.wait != kind) all = false;
    else if (first == nullptr) first = &f;
    else same_site(*first, f);  // checked as soon as two wait, before the others arrive
  }
  if (!all || first == nullptr) return false;
  for (int t = begin; t < end; ++t) s.fibers[t].wait = Wait::kNone;
  return true;
}

// Opens the barriers every live participant has reached (the block's, else each warp's);
// false when none opened.
inline bool open_barriers() {
  State& s = state();
  if (open_if_all_wait(0, s.threads, Wait::kBlock)) return true;
  bool opened = false;
  for (int w = 0; w < s.threads; w += kWarpSize)
    opened |= open_if_all_wait(w, w + kWarpSize < s.threads ? w + kWarpSize : s.threads, Wait::kWarp);
  return opened;
}

// Resumes each fiber of [begin, end) that waits at nothing (in thread order, or reversed) until it
// waits or ends; whether any ran.
inline bool run_ready(int begin, int end) {
  State& s = state();
  bool ran = false;
  for (int i = begin; i < end; ++i) {
    const int t = s.reverse ? end - 1 - (i - begin) : i;
    Fiber& f = s.fibers[t];
    if (f.done || f.wait != Wait::kNone) continue;
    s.current = t;
    s.thread_idx = thread_index(t);
    switch_context(s.scheduler, f.context);
    ran = true;
  }
  return ran;
}

inline bool all_done(int begin, int end) {
  for (int t = begin; t < end; ++t)
    if (!state().fibers[t].done) return false;
  return true;
}

// The warps-ahead schedule: each warp in turn (or in reverse) runs through its warp-level
// barriers as far as it can, up to the block's next __syncthreads, before the next warp starts;
// so one warp's writes after a warp operation land before another warp's reads of them, which
// the thread-by-thread schedule (every thread up to its next warp operation, then the next
// thread) never shows.
inline void run_warps_ahead() {
  State& s = state();
  const int warps = (s.threads + kWarpSize - 1) / kWarpSize;
  for (;;) {
    bool progress = false;
    for (int i = 0; i < warps; ++i) {
      const int w = (s.reverse ? warps - 1 - i : i) * kWarpSize;
      const int end = w + kWarpSize < s.threads ? w + kWarpSize : s.threads;
      for (;;) {
        const bool ran = run_ready(w, end);
        const bool opened = open_if_all_wait(w, end, Wait::kWarp);
        progress |= ran || opened;
        if (!ran && !opened) break;
      }
    }
    if (all_done(0, s.threads)) break;
    if (!open_if_all_wait(0, s.threads, Wait::kBlock) && !progress)
      fail("deadlock: threads wait at barriers that the others never reach");
  }
}

// Runs body(arg) as every thread of the current block.
inline void run_block(void (*body)(void*), void* arg) {
  State& s = state();
  s.body = body;
  s.body_arg = arg;
  std::memset(s.dynamic_shared, s.reverse ? 0x7b : 0xff, s.dynamic_bytes + State::kGuard);
  for (int t = 0; t < s.threads; ++t) {
    Fiber& f = s.fibers[t];
    f.done = false;
    f.wait = Wait::kNone;
    make_context(f.context, f.stack.get(), kStackBytes, fiber_entry);
  }
  if (s.warps_ahead) {
    run_warps_ahead();
  } else {
    for (;;) {
      const bool ran = run_ready(0, s.threads);
      if (all_done(0, s.threads)) break;
      if (!open_barriers() && !ran) fail("deadlock: threads wait at barriers that the others never reach");
    }
  }
  s.current = -1;
  for (size_t i = 0; i < State::kGuard; ++i)
    if (s.dynamic_shared[s.dynamic_bytes + i] != (s.reverse ? 0x7b : 0xff)) fail("a write past the end of the dynamic shared memory");
}

template <class Kernel, class Tuple, size_t... I>
void call(Kernel kernel, Tuple& args, std::index_sequence<I...>) {
  kernel(std::get<I>(args)...);
}

// kernel<<<grid, block, bytes>>>(args...): the blocks in order, each with its fibers.
template <class Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, block;
  size_t bytes;

  template <class... Args>
  void operator()(Args... args) const {
    State& s = state();
    const uint64_t threads = uint64_t(block.x) * block.y * block.z;
    if (threads == 0 || threads > kMaxThreads || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
        grid.z > 65535 || block.z > 64) {
      s.last_error = cudaErrorInvalidConfiguration;
      return;
    }
    const auto opted = s.opt_in_shared.find(reinterpret_cast<const void*>(kernel));
    if (bytes > (opted == s.opt_in_shared.end() ? kDefaultSharedBytes : opted->second)) {
      s.last_error = cudaErrorInvalidValue;
      return;
    }
    s.grid = grid;
    s.block = block;
    s.threads = static_cast<int>(threads);
    if (s.fibers.size() < threads) {
      s.fibers.resize(threads);
      for (Fiber& f : s.fibers)
        if (!f.stack) f.stack.reset(new char[kStackBytes]);
    }
    s.dynamic_shared_storage.assign(bytes + State::kGuard + 256, 0xff);
    s.dynamic_bytes = bytes;
    s.dynamic_shared = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(s.dynamic_shared_storage.data()) + 255) & ~uintptr_t(255));
    auto packed = std::make_tuple(args...);
    struct Closure {
      Kernel kernel;
      decltype(packed)* args;
    } closure{kernel, &packed};
    auto body = [](void* p) {
      auto* c = static_cast<Closure*>(p);
      call(c->kernel, *c->args, std::make_index_sequence<sizeof...(Args)>());
    };
    const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    for (uint64_t i = 0; i < blocks; ++i) {
      const uint64_t b = s.reverse ? blocks - 1 - i : i;
      s.block_idx = dim3(unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y)));
      run_block(body, &closure);
    }
  }
};

template <class Kernel>
Launch<Kernel> launch(Kernel kernel, dim3 grid, dim3 block, size_t bytes) {
  return {kernel, grid, block, bytes};
}

inline unsigned char* dynamic_shared() { return state().dynamic_shared; }

inline int lane() { return state().current % kWarpSize; }

// The value `v` of lane `source` of this thread's warp.
template <typename T>
T exchange(T v, int source) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  State& s = state();
  const int warp = s.current - lane();
  std::memcpy(&s.warp_slots[s.current], &v, sizeof(T));
  wait_at(Wait::kWarp, "a shuffle");
  if (warp + source >= s.threads || s.fibers[warp + source].done) fail("a shuffle reads a lane that has exited");
  T out;
  std::memcpy(&out, &s.warp_slots[warp + source], sizeof(T));
  wait_at(Wait::kWarp, "a shuffle");  // nobody overwrites a slot before every lane has read
  return out;
}

}  // namespace emu
}  // namespace bharnet

// Built-in variables, attributes and device functions the kernels use.
#define __launch_bounds__(...)
#define threadIdx (::bharnet::emu::state().thread_idx)
#define blockIdx (::bharnet::emu::state().block_idx)
#define blockDim (::bharnet::emu::state().block)
#define gridDim (::bharnet::emu::state().grid)

#define BHARNET_EMU_STRING(x) #x
#define BHARNET_EMU_SITE(line) __FILE__ ":" BHARNET_EMU_STRING(line)
#define __syncthreads() ::bharnet::emu::wait_at(::bharnet::emu::Wait::kBlock, BHARNET_EMU_SITE(__LINE__))
#define __syncwarp(...) ::bharnet::emu::wait_at(::bharnet::emu::Wait::kWarp, BHARNET_EMU_SITE(__LINE__))

template <typename T>
T __shfl_sync(unsigned, T v, int source, int width = 32) {
  const int lane = ::bharnet::emu::lane();
  if (width < 1 || width > 32 || (width & (width - 1))) ::bharnet::emu::fail("shuffle width must be a power of 2 <= 32");
  return ::bharnet::emu::exchange(v, (lane & ~(width - 1)) | (source & (width - 1)));
}

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  const int lane = ::bharnet::emu::lane();
  const int source = lane ^ mask;
  if (width < 1 || width > 32 || (width & (width - 1))) ::bharnet::emu::fail("shuffle width must be a power of 2 <= 32");
  return ::bharnet::emu::exchange(v, (source & 31) > (lane | (width - 1)) ? lane : (source & 31));
}

using std::max;  // CUDA's global min/max overloads
using std::min;
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// The runtime calls the launchers make.
extern "C" {
inline cudaError_t cudaGetLastError() {
  const cudaError_t error = ::bharnet::emu::state().last_error;
  ::bharnet::emu::state().last_error = cudaSuccess;
  return error;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = ::bharnet::emu::state().compute_major; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(::bharnet::emu::kMaxSharedBytes); return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
inline cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > ::bharnet::emu::kMaxSharedBytes) {
    return cudaErrorInvalidValue;
  }
  ::bharnet::emu::state().opt_in_shared[func] = static_cast<size_t>(value);
  return cudaSuccess;
}
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void*) {
  *attributes = cudaFuncAttributes{};
  attributes->ptxVersion = 90;
  attributes->binaryVersion = 90;
  attributes->maxThreadsPerBlock = ::bharnet::emu::kMaxThreads;
  return cudaSuccess;
}
}

// The C++ overloads that nvcc's runtime header adds for kernel pointers.
template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <class Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel* kernel) {
  return cudaFuncGetAttributes(attributes, reinterpret_cast<const void*>(kernel));
}

// Tensor-core fragments: the whole tile in every lane.
namespace nvcuda {
namespace wmma {
// The *_sync operations start with the warp converged: every lane arrives before any goes on
// (so a lane never loads what another lane's later store wrote).
inline void converge() { ::bharnet::emu::wait_at(::bharnet::emu::Wait::kWarp, "a WMMA operation"); }
template <typename T>
inline void check_operand(const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ::bharnet::emu::fail("WMMA: fragment pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) ::bharnet::emu::fail("WMMA: ldm not a multiple of 16 bytes");
}

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K> struct FragmentShape;
template <int M, int N, int K> struct FragmentShape<matrix_a, M, N, K> { static constexpr int kRows = M, kCols = K; };
template <int M, int N, int K> struct FragmentShape<matrix_b, M, N, K> { static constexpr int kRows = K, kCols = N; };
template <int M, int N, int K> struct FragmentShape<accumulator, M, N, K> { static constexpr int kRows = M, kCols = N; };

template <class Use, int M, int N, int K, typename T, class Layout = void>
struct fragment {
  static constexpr int kRows = FragmentShape<Use, M, N, K>::kRows, kCols = FragmentShape<Use, M, N, K>::kCols;
  static constexpr int num_elements = kRows * kCols;
  T x[num_elements];
};

template <class Use, int M, int N, int K, typename T, class Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, V value) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<T>(value);
}

template <class Use, int M, int N, int K, typename T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  check_operand(p, ldm);
  static_assert(!std::is_void_v<Layout>, "an operand fragment needs a layout");
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c)
      f.x[r * F::kCols + c] = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
  converge();
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
  check_operand(p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  converge();
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  check_operand(p, ldm);
  converge();
  // Each lane writes the elements it holds on the hardware (sm_80+ 16x16 float accumulators:
  // rows r and r + 8 of lane (r % 8) * 4 + (c % 8) / 2), so a lane that reads back an element
  // another lane stored needs a __syncwarp in between, as on the GPU.
  const int lane = ::bharnet::emu::lane();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      if ((r % 8) * 4 + (c % 8) / 2 == lane) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
}

template <int M, int N, int K, typename T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  converge();
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float sum = c.x[m * N + n];
      for (int k = 0; k < K; ++k) sum += static_cast<float>(a.x[m * K + k]) * static_cast<float>(b.x[k * N + n]);
      out[m * N + n] = sum;
    }
  std::memcpy(d.x, out, sizeof(out));
}
}  // namespace wmma
}  // namespace nvcuda

#define __CUDA_ARCH__ 900
#define BHARNET_CUDA_EMULATION 1
