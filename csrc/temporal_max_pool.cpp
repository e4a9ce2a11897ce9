// Max-pooling over time (MSTCN's max-pool branch) on the CPU: bharnet::temporal_max_pool and
// its backward.
//
// Math (bharnet/ops/temporal_max_pool.py), x (N, C, T, V), window k, stride s, padding p,
// T_out = (T + 2p - k) / s + 1, frames outside [0, T) count as -inf:
//   y[n, c, t', v]   = max_{u < k} x[n, c, t' s - p + u, v]
//   arg[n, c, t', v] = the u of that maximum: the first one in window order, or the last NaN
//                      (torch's max_pool2d rule: a frame replaces the running maximum when it is
//                      greater or NaN)
//   dx[n, c, t, v]   = sum over t' with t' s - p + arg = t of dy[n, c, t', v]   (in t' order)
// Structure: one task per (n, c) plane; at stride 1 the rows whose window lies inside [0, T) are
// one flattened (t, v) loop, the edge rows (and every row at other strides) V-long loops, all
// vectorised by the compiler in the per-ISA clones; arg is int8 (k <= 127). Both directions
// also take bfloat16: the forward compares values widened to float32 and copies the maxima as
// stored (exact), the backward sums each plane's dx in float32 and rounds it once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "cpu_dtypes.h"
#include "cpu_simd.h"

namespace bharnet {
namespace {

struct PoolSizes {
  int64_t planes, T, V, T_out, kernel, stride, padding;
};

// n output elements of one plane (flattened as t * V + v) whose window offsets u0..u1-1 are
// x_first[i + (u - u0) row]: the rows t with the whole window inside [0, T) at stride 1 (one
// long loop instead of V-long ones, row = V), or a single row (n = V) with the window clipped
// to the frames inside [0, T). The running offsets are int32 lanes (`offsets`, the width
// of a float compare mask), narrowed to int8 at the end; the pointers are __restrict because
// int8 stores may alias anything as far as the compiler knows. Both keep the loops vectorised.
// float32/float64 keep the running maxima in y; `best` is unused.
template <typename T>
BHARNET_INLINE void pool_span(const T* __restrict x_first, T* __restrict y, int8_t* __restrict arg,
                              int32_t* __restrict offsets, float* __restrict /*best*/, int64_t n, int64_t row,
                              int64_t u0, int64_t u1) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] = x_first[i];
    offsets[i] = static_cast<int32_t>(u0);
  }
  for (int64_t u = u0 + 1; u < u1; ++u) {
    const T* __restrict xu = x_first + (u - u0) * row;
    const int32_t offset = static_cast<int32_t>(u);
    for (int64_t i = 0; i < n; ++i) {
      const bool take = xu[i] > y[i] || xu[i] != xu[i];  // greater, or NaN
      y[i] = take ? xu[i] : y[i];
      offsets[i] = take ? offset : offsets[i];
    }
  }
  for (int64_t i = 0; i < n; ++i) arg[i] = static_cast<int8_t>(offsets[i]);
}

// bfloat16: compared widened to float32, the running maxima in the float32 scratch `best` (a
// select on 16-bit values under 32-bit compare masks does not vectorise), stored back as their
// upper 16 bits: the maxima's own bits, NaN payloads included.
template <>
BHARNET_INLINE void pool_span(const simd::bf16* __restrict x_first, simd::bf16* __restrict y, int8_t* __restrict arg,
                              int32_t* __restrict offsets, float* __restrict best, int64_t n, int64_t row, int64_t u0,
                              int64_t u1) {
  for (int64_t i = 0; i < n; ++i) {
    best[i] = simd::value_as<float>(x_first[i]);
    offsets[i] = static_cast<int32_t>(u0);
  }
  for (int64_t u = u0 + 1; u < u1; ++u) {
    const simd::bf16* __restrict xu = x_first + (u - u0) * row;
    const int32_t offset = static_cast<int32_t>(u);
    for (int64_t i = 0; i < n; ++i) {
      const float value = simd::value_as<float>(xu[i]);
      const bool take = value > best[i] || value != value;  // greater, or NaN
      best[i] = take ? value : best[i];
      offsets[i] = take ? offset : offsets[i];
    }
  }
  uint16_t* __restrict y_bits = reinterpret_cast<uint16_t*>(y);
  for (int64_t i = 0; i < n; ++i) {
    y_bits[i] = static_cast<uint16_t>(__builtin_bit_cast(uint32_t, best[i]) >> 16);
    arg[i] = static_cast<int8_t>(offsets[i]);
  }
}

// One (n, c) plane; offsets, best: scratch of T_out * V int32 and float32 values.
template <typename T>
BHARNET_CLONES void pool_plane(const PoolSizes& s, const T* x, T* y, int8_t* arg, int32_t* offsets, float* best) {
  const int64_t T_in = s.T, V = s.V, T_out = s.T_out, kernel = s.kernel, stride = s.stride, padding = s.padding;
  // At stride 1, the rows whose window lies inside [0, T) (t - p >= 0, t - p + k <= T) in one span.
  const int64_t inner_lo = stride == 1 ? std::min(T_out, padding) : T_out;
  const int64_t inner_hi = stride == 1 ? std::max(inner_lo, std::min(T_out, T_in + padding - kernel + 1)) : T_out;
  for (int64_t t = 0; t < T_out; ++t) {
    if (t == inner_lo && inner_hi > inner_lo) {
      const int64_t n = (inner_hi - inner_lo) * V;
      pool_span(x + (t - padding) * V, y + t * V, arg + t * V, offsets, best, n, V, 0, kernel);
      t = inner_hi - 1;
      continue;
    }
    const int64_t start = t * stride - padding;
    const int64_t u0 = std::max<int64_t>(0, -start), u1 = std::min<int64_t>(kernel, T_in - start);
    pool_span(x + (start + u0) * V, y + t * V, arg + t * V, offsets, best, V, V, u0, u1);
  }
}

// Returns false (leaving dx partly written) if an offset in arg is not a frame of its window.
// dy stored as S (bf16 for T = float: widened as read).
template <typename T, typename S>
BHARNET_CLONES bool unpool_plane(const PoolSizes& s, const S* __restrict dy, const int8_t* __restrict arg,
                                 T* __restrict dx) {
  const int64_t T_in = s.T, V = s.V, T_out = s.T_out, stride = s.stride, padding = s.padding;
  for (int64_t i = 0; i < T_in * V; ++i) dx[i] = T(0);
  for (int64_t t = 0; t < T_out; ++t) {
    const S* __restrict dyt = dy + t * V;
    const int8_t* __restrict at = arg + t * V;
    const int64_t start = t * stride - padding;  // frame of window offset 0
    for (int64_t v = 0; v < V; ++v) {
      const int64_t frame = start + at[v];
      if (at[v] < 0 || at[v] >= s.kernel || frame < 0 || frame >= T_in) return false;
      dx[frame * V + v] += simd::value_as<T>(dyt[v]);
    }
  }
  return true;
}

PoolSizes pool_check(const char* op, const at::Tensor& x, int64_t kernel, int64_t stride, int64_t padding) {
  TORCH_CHECK(x.device().is_cpu(), op, ": expected a CPU tensor, got ", x.device());
  check_cpu_dtype(op, x.scalar_type(), "");
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape (N, C, T, V), got ", x.sizes());
  TORCH_CHECK(kernel >= 1 && kernel <= 127, op, ": kernel must be in [1, 127], got ", kernel);
  TORCH_CHECK(stride >= 1, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(padding >= 0 && 2 * padding <= kernel, op, ": padding must be in [0, kernel / 2], got ", padding,
              " for kernel ", kernel);
  const int64_t T = x.size(2);
  TORCH_CHECK(T >= 1 && x.size(3) >= 1, op, ": x needs at least one frame and one joint, got ", x.sizes());
  TORCH_CHECK(T + 2 * padding >= kernel, op, ": the padded input (", T, " + 2 x ", padding,
              " frames) is shorter than the kernel ", kernel);
  return PoolSizes{x.size(0) * x.size(1), T, x.size(3), (T + 2 * padding - kernel) / stride + 1, kernel, stride,
                   padding};
}

template <typename T>
void pool_planes(const PoolSizes& s, const at::Tensor& x, at::Tensor& y, at::Tensor& arg) {
  const T* xp = static_cast<const T*>(x.data_ptr());
  T* yp = static_cast<T*>(y.data_ptr());
  int8_t* ap = arg.data_ptr<int8_t>();
  at::parallel_for(0, s.planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> offsets(s.T_out * s.V);
    std::vector<float> best(std::is_same_v<T, simd::bf16> ? s.T_out * s.V : 0);
    for (int64_t plane = begin; plane < end; ++plane)
      pool_plane<T>(s, xp + plane * s.T * s.V, yp + plane * s.T_out * s.V, ap + plane * s.T_out * s.V,
                    offsets.data(), best.data());
  });
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x_in, int64_t kernel, int64_t stride,
                                               int64_t padding) {
  const PoolSizes s = pool_check("bharnet::temporal_max_pool", x_in, kernel, stride, padding);
  const auto x = x_in.contiguous();
  auto y = at::empty({x.size(0), x.size(1), s.T_out, s.V}, x.options());
  auto arg = at::empty({x.size(0), x.size(1), s.T_out, s.V}, x.options().dtype(at::kChar));
  if (y.numel() == 0) return {y, arg};
  if (x.scalar_type() == at::kBFloat16) {
    pool_planes<simd::bf16>(s, x, y, arg);
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bharnet::temporal_max_pool",
                               [&] { pool_planes<scalar_t>(s, x, y, arg); });
  }
  return {y, arg};
}

// dx of every plane (S: dy's and dx's storage; bfloat16 dx is summed in a float32 scratch per
// plane and rounded once); false if arg holds an offset outside its window.
template <typename T, typename S>
bool unpool_planes(const PoolSizes& s, const at::Tensor& dy, const at::Tensor& arg, at::Tensor& dx) {
  const S* dyp = static_cast<const S*>(dy.data_ptr());
  const int8_t* ap = arg.data_ptr<int8_t>();
  S* dxp = static_cast<S*>(dx.data_ptr());
  std::atomic<bool> valid{true};
  at::parallel_for(0, s.planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> sums(std::is_same_v<S, T> ? 0 : s.T * s.V);
    for (int64_t plane = begin; plane < end; ++plane) {
      S* dx_plane = dxp + plane * s.T * s.V;
      T* out;
      if constexpr (std::is_same_v<S, T>) {
        out = dx_plane;
      } else {
        out = sums.data();
      }
      if (!unpool_plane<T, S>(s, dyp + plane * s.T_out * s.V, ap + plane * s.T_out * s.V, out)) {
        valid = false;
        continue;
      }
      if constexpr (!std::is_same_v<S, T>) simd::narrow_to_bf16(out, s.T * s.V, dx_plane);
    }
  });
  return valid.load();
}

at::Tensor backward_cpu(const at::Tensor& dy_in, const at::Tensor& arg_in, int64_t T, int64_t kernel,
                        int64_t stride, int64_t padding) {
  const char* op = "bharnet::temporal_max_pool_backward";
  TORCH_CHECK(dy_in.dim() == 4 && arg_in.sizes() == dy_in.sizes() && arg_in.scalar_type() == at::kChar, op,
              ": dy (N, C, T_out, V) and an int8 arg of the same shape expected, got ", dy_in.sizes(), " and ",
              arg_in.sizes(), " ", arg_in.scalar_type());
  auto dx = at::empty({dy_in.size(0), dy_in.size(1), T, dy_in.size(3)}, dy_in.options());
  const PoolSizes s = pool_check(op, dx, kernel, stride, padding);
  TORCH_CHECK(s.T_out == dy_in.size(2), op, ": dy has ", dy_in.size(2), " frames, the pool of ", T,
              " frames gives ", s.T_out);
  if (dx.numel() == 0) return dx;
  const auto dy = dy_in.contiguous(), arg = arg_in.contiguous();
  bool valid;
  if (dy.scalar_type() == at::kBFloat16) {
    valid = unpool_planes<float, simd::bf16>(s, dy, arg, dx);
  } else {
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "bharnet::temporal_max_pool_backward",
                               [&] { valid = unpool_planes<scalar_t, scalar_t>(s, dy, arg, dx); });
  }
  TORCH_CHECK(valid, op, ": arg holds window offsets outside [0, kernel) or on padding frames");
  return dx;
}

}  // namespace
}  // namespace bharnet

TORCH_LIBRARY_FRAGMENT(bharnet, m) {
  m.def("temporal_max_pool(Tensor x, int kernel, int stride, int padding) -> (Tensor, Tensor)");
  m.def("temporal_max_pool_backward(Tensor dy, Tensor arg, SymInt T, int kernel, int stride, int padding) -> Tensor");
}

TORCH_LIBRARY_IMPL(bharnet, CPU, m) {
  m.impl("temporal_max_pool", &bharnet::forward_cpu);
  m.impl("temporal_max_pool_backward", &bharnet::backward_cpu);
}
