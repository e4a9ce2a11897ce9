// Shared building blocks of the CPU kernels: SIMD vectors, a register-tiled GEMM micro-kernel
// and per-ISA function clones.
//
// Vectorisation: GCC/Clang vector extensions (32-byte vectors: 8 floats or 4 doubles). The
// compiler lowers them to whatever the function is compiled for, so the shipped flags need no
// -march: the per-task worker functions carry BHARNET_CLONES, which makes GCC emit one copy per
// ISA level (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA, baseline SSE2) and pick one at load
// time from the running CPU (an ifunc). The helpers below are always_inline, so they are
// compiled into each clone with that clone's ISA.
//
// GEMM micro-kernel (Tile): an MR x NR block of C = A · B held in registers, NR = 2 vectors:
//   acc[r][n] += sum_k A(r, k) · B(k, n)      A(r, k) = a[r·sam + k·sak],  B(k, n) = b[k·ldb + n]
// A's entries are broadcast, B's rows are loaded as vectors. B must be readable for NR columns
// per row (callers pack B into buffers whose row length is a multiple of NR, zero-padded);
// rows of A past `rows` are never read (they alias the last valid row), and stores write only
// the valid rows x columns of C.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if !defined(__GNUC__)
#error "bharnet's CPU kernels use GCC/Clang vector extensions; build with GCC or Clang"
#endif

#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define BHARNET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BHARNET_CLONES
#endif
#define BHARNET_INLINE inline __attribute__((always_inline))

// The vector helpers are always inlined, so the ABI of passing 32-byte vectors never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace bharnet {
namespace simd {

template <typename T> struct VectorOf;
template <> struct VectorOf<float> { typedef float type __attribute__((vector_size(32))); };
template <> struct VectorOf<double> { typedef double type __attribute__((vector_size(32))); };
template <typename T> using vec = typename VectorOf<T>::type;

template <typename T> constexpr int kLanes = 32 / sizeof(T);
// Columns of one micro-kernel tile (two vectors); padded buffers round their rows up to this.
template <typename T> constexpr int kTileCols = 2 * kLanes<T>;
// Rows of one micro-kernel tile: 6 x 2 accumulators + 2 B vectors + 1 broadcast fit the 16
// vector registers of AVX2 (enough independent FMAs to cover their latency; the SSE2 clone,
// with 16 half-width registers, spills some of them).
constexpr int kTileRows = 6;

template <typename T> BHARNET_INLINE vec<T> load(const T* p) {
  vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T> BHARNET_INLINE void store(T* p, const vec<T>& v) { std::memcpy(p, &v, sizeof(v)); }

template <typename T> BHARNET_INLINE vec<T> broadcast(T s) { return vec<T>{} + s; }

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Row length of a packed B operand with n columns: whole tiles, and an odd number of 64-byte
// cache lines, so that walking down a column (stride = row length) cycles through every L1 set
// instead of a few (a power-of-two stride would keep evicting itself).
template <typename T>
inline int64_t packed_ld(int64_t n) {
  const int64_t lines = round_up(n, kTileCols<T>) / kTileCols<T>;  // a tile row is one 64-byte line
  return (lines | 1) * kTileCols<T>;
}

// sum_i a[i] and sum_i a[i] * b[i] in double, four independent vector lanes at a time (the
// compiler cannot reorder a scalar floating-point sum into vectors itself).
template <typename T> struct Quad { typedef T type __attribute__((vector_size(4 * sizeof(T)))); };

template <typename T>
BHARNET_INLINE vec<double> load4(const T* p) {
  typename Quad<T>::type q;
  std::memcpy(&q, p, sizeof(q));
  return __builtin_convertvector(q, vec<double>);
}

BHARNET_INLINE double lanes_total(const vec<double>& acc) { return (acc[0] + acc[1]) + (acc[2] + acc[3]); }

template <typename T>
BHARNET_INLINE double sum(const T* a, int64_t n) {
  vec<double> acc{};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) acc += load4(a + i);
  double total = lanes_total(acc);
  for (; i < n; ++i) total += a[i];
  return total;
}

template <typename T>
BHARNET_INLINE double dot(const T* a, const T* b, int64_t n) {
  vec<double> acc{};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) acc += load4(a + i) * load4(b + i);
  double total = lanes_total(acc);
  for (; i < n; ++i) total += static_cast<double>(a[i]) * b[i];
  return total;
}

typedef int32_t vec_i32 __attribute__((vector_size(32)));

// exp(y) for y in [-18, 0] (float32 lanes): y = n ln2 + r with |r| <= ln2/2 (ln2 split in a
// high part exact in float and a low part), exp(r) by its degree-7 Taylor polynomial (truncation
// below 2.5e-9 relative), 2^n built in the exponent bits. Relative error a few float ulps.
BHARNET_INLINE vec<float> exp_nonpositive(vec<float> y) {
  const vec<float> n = __builtin_convertvector(__builtin_convertvector(y * 1.44269504f + (y < 0.0f ? broadcast(-0.5f) : broadcast(0.5f)), vec_i32), vec<float>);
  const vec<float> r = (y - n * 0.693359375f) - n * -2.12194440e-4f;
  vec<float> p = broadcast<float>(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vec_i32 bits = (__builtin_convertvector(n, vec_i32) + 127) << 23;
  vec<float> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2 |x|), |x| clamped to 9 (tanh(9) rounds to
// 1 in float32): absolute error about one float ulp of 1, like the Triton kernels' tanh.
BHARNET_INLINE vec<float> tanh(vec<float> x) {
  const vec<float> a = x < 0.0f ? -x : x;
  const vec<float> e = exp_nonpositive(-2.0f * (a < 9.0f ? a : broadcast(9.0f)));
  const vec<float> t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}

template <typename T, int MR = kTileRows>
struct Tile {
  static constexpr int L = kLanes<T>;
  vec<T> acc[MR][2];

  BHARNET_INLINE void zero() {
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = vec<T>{};
  }

  // acc[r][:] = value[r] (e.g. a bias per output row); rows past `rows` get value[rows - 1].
  BHARNET_INLINE void fill_rows(const T* value, int rows) {
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = broadcast<T>(value[std::min(r, rows - 1)]);
  }

  // acc += A(:, 0:K) · B(0:K, :)
  BHARNET_INLINE void fma(int64_t K, const T* a, int64_t sam, int64_t sak, const T* b, int64_t ldb,
                          int rows) {
    const T* arow[MR];
    for (int r = 0; r < MR; ++r) arow[r] = a + std::min(r, rows - 1) * sam;
    for (int64_t k = 0; k < K; ++k) {
      const vec<T> b0 = load(b + k * ldb), b1 = load(b + k * ldb + L);
      for (int r = 0; r < MR; ++r) {
        const vec<T> s = broadcast<T>(arow[r][k * sak]);
        acc[r][0] += s * b0;
        acc[r][1] += s * b1;
      }
    }
  }

  // acc *= scale
  BHARNET_INLINE void scale_by(T scale) {
    for (int r = 0; r < MR; ++r) {
      acc[r][0] *= scale;
      acc[r][1] *= scale;
    }
  }

  // C[r, n] (+)= acc[r][n] for r < rows, n < cols (cols <= 2L); C has row stride ldc.
  BHARNET_INLINE void store_to(T* c, int64_t ldc, int rows, int cols, bool accumulate) const {
    for (int r = 0; r < rows; ++r) {
      T* row = c + r * ldc;
      if (cols == 2 * L) {
        vec<T> v0 = acc[r][0], v1 = acc[r][1];
        if (accumulate) {
          v0 += load(row);
          v1 += load(row + L);
        }
        store(row, v0);
        store(row + L, v1);
      } else {
        T tmp[2 * L];
        store(tmp, acc[r][0]);
        store(tmp + L, acc[r][1]);
        for (int n = 0; n < cols; ++n) row[n] = accumulate ? row[n] + tmp[n] : tmp[n];
      }
    }
  }
};

}  // namespace simd
}  // namespace bharnet
