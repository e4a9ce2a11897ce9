// Shared building blocks of the CPU kernels: SIMD vectors, a register-tiled GEMM micro-kernel
// and per-ISA function clones.
//
// Vectorisation: GCC/Clang vector extensions (32-byte vectors by default: 8 floats or 4
// doubles). The compiler lowers them to whatever the function is compiled for, so the shipped
// flags need no -march: the per-task worker functions carry BHARNET_CLONES, which makes GCC emit
// one copy per ISA level (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA, baseline SSE2) and pick
// one at load time from the running CPU (an ifunc). The helpers below are always_inline, so they
// are compiled into each clone with that clone's ISA.
//
// Wide path (BHARNET_WIDE): the GEMM-shaped kernels also have a copy compiled for x86-64-v4
// only, with 64-byte vectors (explicit ones, and 512-bit auto-vectorised loops) and the 32
// vector registers of AVX-512 (see `tiles` below), which a CPU with full-width AVX-512 units
// runs at up to twice the FLOPs of the 32-byte clone (a single-core micro-benchmark on this
// project's 2-core EPYC: 117 vs 56 GMAC/s for 2048 x 126 x 42). run_per_isa picks it at run
// time when the CPU has AVX-512 (use_wide_vectors()); set_vector_bytes(32) forces the 32-byte
// path (tests run both).
//
// GEMM micro-kernel (Tile): an MR x (NV vectors) block of C = A · B held in registers:
//   acc[r][n] += sum_k A(r, k) · B(k, n)      A(r, k) = a[r·sam + k·sak],  B(k, n) = b[k·ldb + n]
// A's entries are broadcast, B's rows are loaded as vectors. B must be readable for NV whole
// vectors per row (callers pack B into buffers whose row length is a multiple of 64 bytes,
// zero-padded); rows of A past `rows` are never read by `fma` (they alias the last valid row),
// while `fma_columns` (A column-major) reads all MR rows of each column from one pointer and
// computes rows that the stores drop; stores write only the valid rows x columns of C.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if !defined(__GNUC__)
#error "bharnet's CPU kernels use GCC/Clang vector extensions; build with GCC or Clang"
#endif

#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define BHARNET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define BHARNET_HAS_WIDE 1
#define BHARNET_WIDE __attribute__((target("arch=x86-64-v4,prefer-vector-width=512")))
#else
#define BHARNET_CLONES
#define BHARNET_HAS_WIDE 0
#endif
#define BHARNET_INLINE inline __attribute__((always_inline))

// The vector helpers are always inlined, so the ABI of passing 32-byte vectors never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace bharnet {
namespace simd {

template <typename T, int Bytes> struct VectorOf { typedef T type __attribute__((vector_size(Bytes))); };
template <typename T, int Bytes = 32> using vec = typename VectorOf<T, Bytes>::type;

template <typename T, int Bytes = 32> constexpr int kLanes = Bytes / sizeof(T);
// Columns of one 32-byte micro-kernel tile (two vectors, 64 bytes); padded buffers round their
// rows up to this, which is also one 64-byte vector of the wide path.
template <typename T> constexpr int kTileCols = 2 * kLanes<T>;
// Rows of one micro-kernel tile: 6 x 2 accumulators + 2 B vectors + 1 broadcast fit the 16
// vector registers of AVX2 (enough independent FMAs to cover their latency; the SSE2 clone,
// with 16 half-width registers, spills some of them).
constexpr int kTileRows = 6;

template <typename T, int Bytes = 32> BHARNET_INLINE vec<T, Bytes> load(const T* p) {
  vec<T, Bytes> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T, int Bytes = 32> BHARNET_INLINE void store(T* p, const vec<T, Bytes>& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T, int Bytes = 32> BHARNET_INLINE vec<T, Bytes> broadcast(T s) { return vec<T, Bytes>{} + s; }

// bfloat16 storage: the upper 16 bits of a float32 (the layout of c10::BFloat16). Kernels that
// take it compute in float32: values are widened exactly as they are read (load_as, value_as)
// and rounded to nearest even as they are stored (narrow_bf16, Tile::store_as).
struct bf16 {
  uint16_t bits;
};

// L = Bytes / sizeof(T) values from p as a vector of T: a plain load when S is T; bfloat16 into
// float32 lanes (its bits shifted into the upper half).
template <typename T, int Bytes, typename S>
BHARNET_INLINE vec<T, Bytes> load_as(const S* p) {
  if constexpr (std::is_same_v<S, T>) {
    return load<T, Bytes>(p);
  } else {
    static_assert(std::is_same_v<S, bf16> && std::is_same_v<T, float>, "load_as: bfloat16 into float32 only");
    vec<uint16_t, Bytes / 2> half;
    std::memcpy(&half, p, sizeof(half));
    const auto wide = __builtin_convertvector(half, vec<uint32_t, Bytes>) << 16;
    vec<float, Bytes> out;
    std::memcpy(&out, &wide, sizeof(out));
    return out;
  }
}

// One stored value as T (bfloat16: widened exactly).
template <typename T, typename S>
BHARNET_INLINE T value_as(S s) {
  if constexpr (std::is_same_v<S, T>) {
    return s;
  } else {
    static_assert(std::is_same_v<S, bf16> && std::is_same_v<T, float>, "value_as: bfloat16 into float32 only");
    const uint32_t bits = static_cast<uint32_t>(s.bits) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  }
}

// float32 lanes rounded to bfloat16 (to nearest, ties to even, as torch rounds them; infinities
// stay infinite, NaN becomes the quiet NaN 0x7FC0 of c10::BFloat16's scalar conversion, whose
// vectorised conversion may give other NaN bits).
template <int Bytes>
BHARNET_INLINE vec<uint16_t, Bytes / 2> narrow_bf16(const vec<float, Bytes>& x) {
  using U = vec<uint32_t, Bytes>;
  U bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const U rounded = (bits + (0x7FFFu + ((bits >> 16) & 1u))) >> 16;
  const U out = x != x ? U{} + 0x7FC0u : rounded;
  return __builtin_convertvector(out, vec<uint16_t, Bytes / 2>);
}

// dst[i] = src[i] rounded to bfloat16 (narrow_bf16), i < n: whole 32-byte vectors, then the
// last values through a vector of their own.
inline void narrow_to_bf16(const float* src, int64_t n, bf16* dst) {
  constexpr int L = kLanes<float, 32>;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const auto narrowed = narrow_bf16<32>(load<float, 32>(src + i));
    std::memcpy(dst + i, &narrowed, sizeof(narrowed));
  }
  if (i == n) return;
  float rest[L] = {};
  std::memcpy(rest, src + i, (n - i) * sizeof(float));
  const auto narrowed = narrow_bf16<32>(load<float, 32>(rest));
  std::memcpy(dst + i, &narrowed, (n - i) * sizeof(bf16));
}

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

// exp(y) for y in [-87, 0] (float32 lanes; there 2^n is a normal float): y = n ln2 + r with
// |r| <= ln2/2 (ln2 split in a high part exact in float and a low part), exp(r) by its degree-7
// Taylor polynomial (truncation below 2.5e-9 relative), 2^n built in the exponent bits. Relative
// error a few float ulps.
template <int Bytes = 32>
BHARNET_INLINE vec<float, Bytes> exp_nonpositive(vec<float, Bytes> y) {
  using F = vec<float, Bytes>;
  using I = vec<int32_t, Bytes>;
  const F half = y < 0.0f ? broadcast<float, Bytes>(-0.5f) : broadcast<float, Bytes>(0.5f);
  const F n = __builtin_convertvector(__builtin_convertvector(y * 1.44269504f + half, I), F);
  const F r = (y - n * 0.693359375f) - n * -2.12194440e-4f;
  F p = broadcast<float, Bytes>(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  F scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2 |x|), |x| clamped to 9 (tanh(9) rounds to
// 1 in float32): absolute error about one float ulp of 1, like the Triton kernels' tanh. NaN
// stays NaN.
template <int Bytes = 32>
BHARNET_INLINE vec<float, Bytes> tanh(vec<float, Bytes> x) {
  using F = vec<float, Bytes>;
  const F a = x < 0.0f ? -x : x;
  const F e = exp_nonpositive<Bytes>(-2.0f * (a > 9.0f ? broadcast<float, Bytes>(9.0f) : a));
  const F t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}

// Ask for the 64-byte lines of p[0, n) to be brought into cache ahead of use (Write: for
// writing, which also saves the read-for-ownership's wait). Rows that the kernels walk several at
// a time in several arrays are not prefetched well enough by the hardware: a cold
// ctr_graph_conv forward read its input at ~12 GB/s on this project's EPYC.
template <bool Write = false, typename T>
BHARNET_INLINE void prefetch(const T* p, int64_t n) {
  if (n <= 0) return;
  const uintptr_t end = reinterpret_cast<uintptr_t>(p + n);
  for (uintptr_t line = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); line < end; line += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(line), Write ? 1 : 0);
}

// Half `part` (0 low, 1 high) of a 64-byte vector as a 32-byte one.
template <typename T>
BHARNET_INLINE vec<T, 32> half_of(const vec<T, 64>& x, int part) {
  vec<T, 32> half;
  std::memcpy(&half, reinterpret_cast<const char*>(&x) + part * sizeof(half), sizeof(half));
  return half;
}

// total += p (and total += a * b) lane by lane in the 32-byte path's order: a 64-byte vector is
// added as its low half, then its high half, in the same 32-byte operations (the products fused
// into the additions alike), so that both paths sum every lane of a row identically.
template <typename T, int Bytes>
BHARNET_INLINE void add_in_32_byte_lanes(vec<T, 32>& total, const vec<T, Bytes>& p) {
  if constexpr (Bytes == 32) {
    total += p;
  } else {
    total += half_of<T>(p, 0);
    total += half_of<T>(p, 1);
  }
}

template <typename T, int Bytes>
BHARNET_INLINE void add_products_in_32_byte_lanes(vec<T, 32>& total, const vec<T, Bytes>& a,
                                                  const vec<T, Bytes>& b) {
  if constexpr (Bytes == 32) {
    total += a * b;
  } else {
    total += half_of<T>(a, 0) * half_of<T>(b, 0);
    total += half_of<T>(a, 1) * half_of<T>(b, 1);
  }
}

// Chunks of a row summed in the lanes of sum_rows before they go into its double total (each
// lane then sums at most kFlushChunks / 4 values in T).
constexpr int64_t kFlushChunks = 256;

// sum over rows n < N (row stride row_stride) of f(x) over each row's P values, with
// f(x) = x - centre, or (x - centre)^2 for Squares: four 32-byte lane vectors (chunk i of a row
// into vector i mod 4, a single running sum would wait on each addition's latency), their lanes
// added to a double total every kFlushChunks chunks, then the row's last P mod 8 values in double.
// The same 32-byte operations on every vector width.
template <typename T, bool Squares = false>
BHARNET_INLINE double sum_rows(const T* x, int64_t N, int64_t row_stride, int64_t P, T centre = T(0)) {
  constexpr int L = kLanes<T, 32>;
  const int64_t chunks_end = P / L * L;
  const auto c = broadcast<T, 32>(centre);
  double total = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    const T* row = x + n * row_stride;
    for (int64_t p0 = 0; p0 < chunks_end; p0 += kFlushChunks * L) {
      vec<T, 32> lanes[4] = {};
      for (int64_t p = p0; p < std::min(chunks_end, p0 + kFlushChunks * L); p += L) {
        const auto d = load<T, 32>(row + p) - c;
        lanes[(p / L) % 4] += Squares ? d * d : d;
      }
      for (int i = 0; i < 4; ++i)
        for (int l = 0; l < L; ++l) total += lanes[i][l];
    }
    for (int64_t p = chunks_end; p < P; ++p) {
      const double d = static_cast<double>(row[p]) - centre;
      total += Squares ? d * d : d;
    }
  }
  return total;
}

// A row-major GEMM operand of n columns is read in place for its first edge_start(n) columns
// (whole 64-byte vectors, so that no vector load passes the end of a row, or of the tensor);
// copy_edge gives the others: rows of kEdgeColumns values, zero-padded.
template <typename T> constexpr int64_t kEdgeColumns = kLanes<T, 64>;

template <typename T>
inline int64_t edge_start(int64_t n) { return n / kEdgeColumns<T> * kEdgeColumns<T>; }

// edge = columns [edge_start(n), n) of the `rows` rows of src (row stride n), zero-padded.
template <typename T>
inline void copy_edge(const T* src, int64_t rows, int64_t n, std::vector<T>& edge) {
  const int64_t start = edge_start<T>(n);
  edge.assign(rows * kEdgeColumns<T>, T(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = start; c < n; ++c) edge[r * kEdgeColumns<T> + c - start] = src[r * n + c];
}

template <typename T> struct TypeTag { typedef T type; };

template <typename T, int MR = kTileRows, int NV = 2, int Bytes = 32>
struct Tile {
  static constexpr int L = kLanes<T, Bytes>;
  static constexpr int kRows = MR, kCols = NV * L;
  vec<T, Bytes> acc[MR][NV];

  BHARNET_INLINE void zero() {
    for (int r = 0; r < MR; ++r)
      for (int n = 0; n < NV; ++n) acc[r][n] = vec<T, Bytes>{};
  }

  // acc[r][:] = value[r] (e.g. a bias per output row); rows past `rows` get value[rows - 1].
  BHARNET_INLINE void fill_rows(const T* value, int rows) {
    for (int r = 0; r < MR; ++r)
      for (int n = 0; n < NV; ++n) acc[r][n] = broadcast<T, Bytes>(value[std::min(r, rows - 1)]);
  }

  // acc += A(:, 0:K) · B(0:K, :)
  // (A and B may be stored as bf16 for T = float: widened as they are read.)
  template <typename SA, typename SB>
  BHARNET_INLINE void fma(int64_t K, const SA* a, int64_t sam, int64_t sak, const SB* b, int64_t ldb,
                          int rows) {
    const SA* arow[MR];
    for (int r = 0; r < MR; ++r) arow[r] = a + std::min(r, rows - 1) * sam;
    for (int64_t k = 0; k < K; ++k) {
      vec<T, Bytes> bv[NV];
      for (int n = 0; n < NV; ++n) bv[n] = load_as<T, Bytes>(b + k * ldb + n * L);
      for (int r = 0; r < MR; ++r) {
        const T s = value_as<T>(arow[r][k * sak]);  // scalar x vector: the compiler broadcasts it
        for (int n = 0; n < NV; ++n) acc[r][n] += s * bv[n];
      }
    }
  }

  // acc += A(:, 0:K) · B(0:K, :) with A column-major, A(r, k) = a[k * lda + r], and B's NV
  // vectors of row k at b + k * ldb + n * vstride. Every column of A must have MR readable values
  // (the rows past the output's are computed and dropped): then A's entries are addressed from
  // one pointer per k.
  BHARNET_INLINE void fma_columns(int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
                                  int64_t vstride = L) {
    for (int64_t k = 0; k < K; ++k) {
      vec<T, Bytes> bv[NV];
      for (int n = 0; n < NV; ++n) bv[n] = load<T, Bytes>(b + k * ldb + n * vstride);
      const T* column = a + k * lda;
      for (int r = 0; r < MR; ++r)
        for (int n = 0; n < NV; ++n) acc[r][n] += column[r] * bv[n];
    }
  }

  // acc *= scale
  BHARNET_INLINE void scale_by(T scale) {
    for (int r = 0; r < MR; ++r)
      for (int n = 0; n < NV; ++n) acc[r][n] *= scale;
  }

  // C[r, n] = acc[r][n] for r < rows, n < cols (C has row stride ldc): store_to without
  // accumulating, or rounded to bfloat16 for C stored as bf16 (T = float).
  template <typename S>
  BHARNET_INLINE void store_as(S* c, int64_t ldc, int rows, int cols) const {
    if constexpr (std::is_same_v<S, T>) {
      store_to(c, ldc, rows, cols, false);
    } else {
      static_assert(std::is_same_v<S, bf16> && std::is_same_v<T, float>,
                    "store_as: T, or bfloat16 from float32 accumulators");
      // fixed-size copies (a copy of cols values would be a call to memcpy per row): whole
      // vectors, then the last L values again, overlapping the ones before (rows of at least L)
      for (int r = 0; r < rows; ++r) {
        uint16_t narrowed[kCols];
        for (int n = 0; n < NV; ++n) {
          const auto half = narrow_bf16<Bytes>(acc[r][n]);
          std::memcpy(narrowed + n * L, &half, sizeof(half));
        }
        uint16_t* row = reinterpret_cast<uint16_t*>(c + r * ldc);
        if (cols >= L) {
          for (int n = 0; n < NV; ++n)
            if ((n + 1) * L <= cols) std::memcpy(row + n * L, narrowed + n * L, L * sizeof(uint16_t));
          std::memcpy(row + cols - L, narrowed + cols - L, L * sizeof(uint16_t));
        } else {
          for (int n = 0; n < cols; ++n) row[n] = narrowed[n];
        }
      }
    }
  }

  // Vector column n of the tile: C[r, 0:L] = acc[r][n] for r < rows (C stored as T, or as
  // bf16 for T = float: rounded).
  template <typename S>
  BHARNET_INLINE void store_vector_as(int n, S* c, int64_t ldc, int rows) const {
    static_assert(std::is_same_v<S, T> || (std::is_same_v<S, bf16> && std::is_same_v<T, float>),
                  "store_vector_as: T, or bfloat16 from float32 accumulators");
    for (int r = 0; r < rows; ++r) {
      if constexpr (std::is_same_v<S, T>) {
        store<T, Bytes>(c + r * ldc, acc[r][n]);
      } else {
        const auto narrowed = narrow_bf16<Bytes>(acc[r][n]);
        std::memcpy(c + r * ldc, &narrowed, sizeof(narrowed));
      }
    }
  }

  // C[r, n] (+)= acc[r][n] for r < rows, n < cols (cols <= kCols); C has row stride ldc.
  // A row of at least one vector but not whole vectors ends with a vector store that overlaps
  // the one before it: the whole vectors, then the last L columns, shuffled out of the two
  // accumulators they span (read before any store, so overlapped columns get the same value
  // twice). Narrower rows go through a buffer, one value at a time.
  BHARNET_INLINE void store_to(T* c, int64_t ldc, int rows, int cols, bool accumulate) const {
    using Index = vec<std::conditional_t<sizeof(T) == 4, int32_t, int64_t>, Bytes>;
    const int whole = cols / L, last = cols - L, first = last / L;
    Index shift{};
    for (int i = 0; i < L; ++i) shift[i] = last % L + i;
    for (int r = 0; r < rows; ++r) {
      T* row = c + r * ldc;
      if (cols == kCols) {
        for (int n = 0; n < NV; ++n) {
          vec<T, Bytes> v = acc[r][n];
          if (accumulate) v += load<T, Bytes>(row + n * L);
          store<T, Bytes>(row + n * L, v);
        }
      } else if (cols >= L) {
        vec<T, Bytes> tail = __builtin_shuffle(acc[r][first], acc[r][std::min(first + 1, NV - 1)], shift);
        if (accumulate) tail += load<T, Bytes>(row + last);
        for (int n = 0; n < NV; ++n) {  // unrolled (NV is a constant): vector stores, not a memcpy
          if (n < whole) store<T, Bytes>(row + n * L, accumulate ? acc[r][n] + load<T, Bytes>(row + n * L) : acc[r][n]);
        }
        store<T, Bytes>(row + last, tail);
      } else {
        T tmp[kCols];
        for (int n = 0; n < NV; ++n) store<T, Bytes>(tmp + n * L, acc[r][n]);
        for (int n = 0; n < cols; ++n) row[n] = accumulate ? row[n] + tmp[n] : tmp[n];
      }
    }
  }
};

// Visit the tiles covering an M x N output: f(tile, m, rows, n0, cols) for each, with a zeroed
// register tile to fill (tile.fma) and store (tile.store_to). Bytes = 32: 6 x 2-vector tiles,
// rows outer (the 32-byte clones' layout). Bytes = 64 (wide path; only inside BHARNET_WIDE
// functions): columns outer, as many whole 64-byte vectors per tile as fit at most 24
// accumulators among AVX-512's 32 registers: 8 x 3 vectors, then 12 x 2 or 16 x 1 for the last
// columns (N = 42 floats: one 8 x 48 tile per 8 rows; N = 25: 12 x 32). In both paths the last
// rows, when at most half a tile, get a tile of half the height (rows past M are computed and
// dropped). B rows must be readable up to N rounded up to 64 bytes. f must be always_inline so it
// is compiled with the caller's ISA.
// f(std::integral_constant<int, NV>{}, n0) for the column chunks of an N-wide row on the wide
// path: from n0 = 0 on, as many 64-byte vectors as the row has left, at most 3 (NV = 3, 2 or 1).
template <typename T, typename F>
BHARNET_INLINE void wide_column_chunks(int64_t N, F&& f) {
  constexpr int L = kLanes<T, 64>;
  for (int64_t n0 = 0; n0 < N;) {
    const int64_t vectors = (N - n0 + L - 1) / L;
    if (vectors >= 3) {
      f(std::integral_constant<int, 3>{}, n0);
      n0 += 3 * L;
    } else if (vectors == 2) {
      f(std::integral_constant<int, 2>{}, n0);
      n0 += 2 * L;
    } else {
      f(std::integral_constant<int, 1>{}, n0);
      n0 += L;
    }
  }
}

// f(tile, m, rows, n0, cols) with a zeroed MR x NV tile, or with one of half the height when
// the rows fit in it (the last rows of an output: fewer dead rows computed).
template <typename T, int MR, int NV, int Bytes, typename F>
BHARNET_INLINE void row_tile(int64_t m, int rows, int64_t n0, int cols, F& f) {
  if (rows <= MR / 2) {
    Tile<T, MR / 2, NV, Bytes> tile;
    tile.zero();
    f(tile, m, rows, n0, cols);
  } else {
    Tile<T, MR, NV, Bytes> tile;
    tile.zero();
    f(tile, m, rows, n0, cols);
  }
}

template <typename T, int Bytes, typename F>
BHARNET_INLINE void tiles(int64_t M, int64_t N, F&& f) {
  if constexpr (Bytes == 32) {
    constexpr int NC = kTileCols<T>;
    for (int64_t m = 0; m < M; m += kTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, M - m));
      for (int64_t n0 = 0; n0 < N; n0 += NC)
        row_tile<T, kTileRows, 2, 32>(m, rows, n0, static_cast<int>(std::min<int64_t>(NC, N - n0)), f);
    }
  } else {
    static_assert(Bytes == 64, "tiles: 32- or 64-byte vectors");
    wide_column_chunks<T>(N, [&](auto vectors, int64_t n0) __attribute__((always_inline)) {
      constexpr int NV = decltype(vectors)::value;
      constexpr int MR = NV == 3 ? 8 : (NV == 2 ? 12 : 16);  // at most 24 accumulators
      const int cols = static_cast<int>(std::min<int64_t>(NV * kLanes<T, 64>, N - n0));
      for (int64_t m = 0; m < M; m += MR)
        row_tile<T, MR, NV, 64>(m, static_cast<int>(std::min<int64_t>(MR, M - m)), n0, cols, f);
    });
  }
}

// Whether the kernels take the wide (64-byte, AVX-512) path: the CPU supports x86-64-v4 and
// set_vector_bytes has not forced 32 (cpu_dispatch.cpp).
bool use_wide_vectors();
// 32 or 64 (64 only where the CPU and the build support it; anything else throws); returns the
// previous setting. 0 returns the current setting unchanged.
int64_t set_vector_bytes(int64_t bytes);
// Calls of run_wide so far (op bharnet::cpu_wide_calls): lets the tests see which path ran, as
// both give bitwise the same results.
void count_wide_call();

// Kernel::template run<Bytes>(args...) compiled for the running CPU: in a copy for AVX-512 with
// 64-byte vectors when use_wide_vectors(), else in the 32-byte clones (BHARNET_CLONES).
// Kernel::run must be always_inline, so that each copy compiles it with its own ISA.
template <typename Kernel, typename... Args>
BHARNET_CLONES void run_narrow(Args... args) {
  Kernel::template run<32>(args...);
}

#if BHARNET_HAS_WIDE
template <typename Kernel, typename... Args>
BHARNET_WIDE void run_wide(Args... args) {
  count_wide_call();
  Kernel::template run<64>(args...);
}
#endif

template <typename Kernel, typename... Args>
inline void run_per_isa(Args... args) {
#if BHARNET_HAS_WIDE
  if (use_wide_vectors()) return run_wide<Kernel>(args...);
#endif
  run_narrow<Kernel>(args...);
}

}  // namespace simd
}  // namespace bharnet
