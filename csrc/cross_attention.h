// Shape and dtype checks of the bharnet::cross_attention_core_cpp* ops, shared by the CPU
// kernels (cross_attention.cpp) and the CUDA binding (cross_attention_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace bharnet {

// q (N, Lq, D), kv (N, Lk, 2D) = [k | v], key_mask (N, Lk); D = heads * d.
struct AttnSizes {
  int64_t N, Lq, Lk, D, heads, d;
};

// Shapes, q's dtype and device for kv, bool key_mask of shape (N, Lk) on q's device, heads
// dividing D. (The device and dtype class of q are checked by each kernel's caller first.)
inline AttnSizes attn_check(const char* op, const at::Tensor& q, const at::Tensor& kv,
                            const std::optional<at::Tensor>& mask, int64_t heads) {
  TORCH_CHECK(q.dim() == 3, op, ": q must have shape (N, Lq, D), got ", q.sizes());
  const int64_t N = q.size(0), Lq = q.size(1), D = q.size(2);
  TORCH_CHECK(heads >= 1 && D % heads == 0, op, ": heads must be a positive divisor of D = ", D, ", got ", heads);
  TORCH_CHECK(kv.dim() == 3 && kv.size(0) == N && kv.size(2) == 2 * D, op, ": kv must have shape (", N, ", Lk, ",
              2 * D, ") = [k | v], got ", kv.sizes());
  TORCH_CHECK(kv.scalar_type() == q.scalar_type() && kv.device() == q.device(), op,
              ": kv must have q's dtype and device (", q.scalar_type(), ", ", q.device(), "), got ",
              kv.scalar_type(), ", ", kv.device());
  const int64_t Lk = kv.size(1);
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": key_mask must be bool (True = may be attended), got ",
                mask->scalar_type());
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == N && mask->size(1) == Lk && mask->device() == q.device(), op,
                ": key_mask must have shape (", N, ", ", Lk, ") on q's device, got ", mask->sizes(), " on ",
                mask->device());
  }
  return AttnSizes{N, Lq, Lk, D, heads, D / heads};
}

// `name` (grad_o or lse of the backward) must have `shape` and `dtype` (described as
// `dtype_what`, e.g. "q's dtype") on q's device.
inline void attn_check_like(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                            at::ScalarType dtype, const char* dtype_what, const at::Tensor& q) {
  TORCH_CHECK(t.sizes() == shape && t.scalar_type() == dtype && t.device() == q.device(), op, ": ", name,
              " must have shape ", shape, " and ", dtype_what, " ", dtype, " on ", q.device(), ", got ", t.sizes(),
              " ", t.scalar_type(), " on ", t.device());
}

}  // namespace bharnet
