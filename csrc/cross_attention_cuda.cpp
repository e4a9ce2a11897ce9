// CUDA binding of bharnet::cross_attention_core_cpp and bharnet::cross_attention_core_cpp_backward
// (kernels in csrc/cross_attention_kernels.cu and csrc/cross_attention_mma_kernels.cu; schemas and
// CPU kernels in csrc/cross_attention.cpp, input checks shared through csrc/cross_attention.h).
// float16, bfloat16, float32 and float64 q
// and kv, head dims up to 128; o, dq and dkv in the input dtype, lse (and the backward's delta
// scratch buffer) in the accumulation dtype: float64 for float64 inputs, else float32 (the
// Triton op's outputs, and the fake impl's).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cross_attention.h"
#include "cuda_binding.h"

namespace bharnet {
namespace {

constexpr const char* kForwardName = "bharnet::cross_attention_core_cpp";
constexpr const char* kBackwardName = "bharnet::cross_attention_core_cpp_backward";
constexpr int64_t kMaxHeadDim = 128;  // the kernels keep up to 4 features per lane of a warp

at::ScalarType acc_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

cuda::AttnShape cuda_shape(const AttnSizes& s) { return {s.N, s.Lq, s.Lk, s.D, s.heads, s.d}; }

const bool* mask_ptr(const at::Tensor& mask) { return mask.defined() ? mask.data_ptr<bool>() : nullptr; }

AttnSizes check_inputs(const char* op, const at::Tensor& q, const at::Tensor& kv,
                       const std::optional<at::Tensor>& mask, int64_t heads) {
  TORCH_CHECK(q.is_cuda(), op, " (CUDA kernel): expected CUDA tensors, got q on ", q.device());
  cuda_dtype(q, op, "q");
  const AttnSizes s = attn_check(op, q, kv, mask, heads);
  TORCH_CHECK(s.d <= kMaxHeadDim, op, ": the CUDA kernels take head dims up to ", kMaxHeadDim, ", got D / heads = ",
              s.D, " / ", s.heads, " = ", s.d);
  return s;
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q_in, const at::Tensor& kv_in,
                                                const std::optional<at::Tensor>& mask_in, int64_t heads) {
  const AttnSizes s = check_inputs(kForwardName, q_in, kv_in, mask_in, heads);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto q = q_in.contiguous(), kv = kv_in.contiguous();
  const auto mask = mask_in ? mask_in->contiguous() : at::Tensor();
  auto o = at::empty({s.N, s.Lq, s.D}, q.options());
  auto lse = at::empty({s.N, s.heads, s.Lq}, q.options().dtype(acc_dtype(q)));
  if (o.numel() == 0) return {o, lse};
  check_launch(cuda::attn_forward(cuda_dtype(q, kForwardName, "q"), cuda_shape(s), q.data_ptr(), kv.data_ptr(),
                                  mask_ptr(mask), o.data_ptr(), lse.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               kForwardName);
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_o_in, const at::Tensor& q_in,
                                                 const at::Tensor& kv_in, const at::Tensor& lse_in,
                                                 const std::optional<at::Tensor>& mask_in, int64_t heads) {
  const AttnSizes s = check_inputs(kBackwardName, q_in, kv_in, mask_in, heads);
  attn_check_like(kBackwardName, "grad_o", grad_o_in, q_in.sizes(), q_in.scalar_type(), "q's dtype", q_in);
  attn_check_like(kBackwardName, "lse", lse_in, {s.N, s.heads, s.Lq}, acc_dtype(q_in), "the accumulation dtype",
                  q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto grad_o = grad_o_in.contiguous(), q = q_in.contiguous(), kv = kv_in.contiguous();
  const auto lse = lse_in.contiguous();
  const auto mask = mask_in ? mask_in->contiguous() : at::Tensor();
  auto dq = at::empty({s.N, s.Lq, s.D}, q.options()), dkv = at::empty({s.N, s.Lk, 2 * s.D}, kv.options());
  if (dq.numel() == 0 || dkv.numel() == 0) {
    dq.zero_();
    dkv.zero_();
    return {dq, dkv};
  }
  auto delta = at::empty({s.N, s.heads, s.Lq}, lse.options());
  check_launch(cuda::attn_backward(cuda_dtype(q, kBackwardName, "q"), cuda_shape(s), grad_o.data_ptr(), q.data_ptr(),
                                   kv.data_ptr(), lse.data_ptr(), mask_ptr(mask), delta.data_ptr(), dq.data_ptr(),
                                   dkv.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               kBackwardName);
  return {dq, dkv};
}

}  // namespace
}  // namespace bharnet

TORCH_LIBRARY_IMPL(bharnet, CUDA, m) {
  m.impl("cross_attention_core_cpp", &bharnet::forward_cuda);
  m.impl("cross_attention_core_cpp_backward", &bharnet::backward_cuda);
}
