// CUDA binding of bharnet::ctr_graph_conv_cpp* (kernels in csrc/ctr_graph_conv_kernels.cu; schemas in
// csrc/ctr_graph_conv.cpp): checks, allocations and launches. The topologies, the aggregation,
// dv and dAref, and the refinement gradients from dAref (cuda::ctr_refinement_grad) are CUDA
// kernels; the static mode's dA = sum_{b, g} dAref is a torch sum.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ctr_graph_conv.h"
#include "cuda_binding.h"

namespace bharnet {
namespace {

constexpr const char* kOpName = "bharnet::ctr_graph_conv_cpp";

// The kernels' shape, after checking that one group's rows (C/G T V elements) and one topology
// (V V) have 32-bit offsets (cuda_launchers.h).
cuda::CtrShape cuda_shape(const CtrSizes& s) {
  TORCH_CHECK(s.C / s.G * s.T * s.V < cuda::kMaxIndexExtent, kOpName, " (CUDA kernel): a group of C/G = ", s.C / s.G,
              " channels x T ", s.T, " x V ", s.V, " must have fewer than 2^30 elements");
  TORCH_CHECK(s.V * s.V < cuda::kMaxIndexExtent, kOpName, " (CUDA kernel): a topology of V x V = ", s.V, " x ", s.V,
              " must have fewer than 2^30 elements");
  return {s.B, s.H, s.C, s.T, s.V, s.R, s.G, s.dynamic};
}

void check_cuda(const at::Tensor& v) {
  TORCH_CHECK(v.is_cuda(), "bharnet::ctr_graph_conv_cpp (CUDA kernel): expected CUDA tensors, got ", v.device());
}

void check_grad(const at::Tensor& dy, const at::Tensor& v, const CtrSizes& s) {
  TORCH_CHECK(dy.sizes() == at::IntArrayRef({s.B, s.C, s.T, s.V}) && dy.scalar_type() == v.scalar_type() &&
                  dy.device() == v.device(),
              "bharnet::ctr_graph_conv_cpp backward: dy must be like the output (", s.B, ", ", s.C, ", ", s.T, ", ",
              s.V, ") in v's dtype, got ", dy.sizes(), " ", dy.scalar_type());
}

// The topologies the kernels read: A itself in static mode, else (B, H, G, V, V) from the kernel.
at::Tensor topologies(const CtrSizes& s, const at::Tensor& v, const at::Tensor& A, const std::optional<at::Tensor>& q,
                      const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha) {
  if (!s.dynamic) return A.contiguous();
  auto topo = at::empty({s.B, s.H, s.G, s.V, s.V}, A.options());
  const auto qc = q->contiguous(), kc = k->contiguous(), wc = weight->contiguous(), bc = bias->contiguous();
  const auto ac = alpha->contiguous(), Ac = A.contiguous();
  check_launch(cuda::ctr_topology(cuda_dtype(v, kOpName, "features"), cuda_shape(s), Ac.data_ptr(), qc.data_ptr(), kc.data_ptr(),
                                  wc.data_ptr(), bc.data_ptr(), ac.data_ptr(), topo.data_ptr(),
                                  c10::cuda::getCurrentCUDAStream()), kOpName);
  return topo;
}

at::Tensor forward_cuda(const at::Tensor& v_in, const at::Tensor& A, const std::optional<at::Tensor>& q,
                        const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha) {
  check_cuda(v_in);
  const CtrSizes s = ctr_check(v_in, A, q, k, weight, bias, alpha);
  const c10::cuda::CUDAGuard guard(v_in.device());
  const auto v = v_in.contiguous();
  auto y = at::empty({s.B, s.C, s.T, s.V}, v.options());
  if (y.numel() == 0) return y;
  const auto topo = topologies(s, v, A, q, k, weight, bias, alpha);
  check_launch(cuda::ctr_forward(cuda_dtype(v, kOpName, "features"), cuda_shape(s), v.data_ptr(), topo.data_ptr(), y.data_ptr(),
                                 c10::cuda::getCurrentCUDAStream()), kOpName);
  return y;
}

// dv and dAref (B, H, G, V, V) in the parameters' dtype.
std::tuple<at::Tensor, at::Tensor> topology_grad(const CtrSizes& s, const at::Tensor& dy, const at::Tensor& v,
                                                 const at::Tensor& topo) {
  auto dv = at::empty_like(v);
  auto dtopo = at::empty({s.B, s.H, s.G, s.V, s.V}, topo.options());
  check_launch(cuda::ctr_backward(cuda_dtype(v, kOpName, "features"), cuda_shape(s), dy.data_ptr(), v.data_ptr(), topo.data_ptr(),
                                  dv.data_ptr(), dtopo.data_ptr(), c10::cuda::getCurrentCUDAStream()), kOpName);
  return {dv, dtopo};
}

std::tuple<at::Tensor, at::Tensor> static_backward_cuda(const at::Tensor& dy_in, const at::Tensor& v_in,
                                                        const at::Tensor& A) {
  check_cuda(v_in);
  const CtrSizes s = ctr_check(v_in, A, {}, {}, {}, {}, {});
  check_grad(dy_in, v_in, s);
  const c10::cuda::CUDAGuard guard(v_in.device());
  const auto dy = dy_in.contiguous(), v = v_in.contiguous();
  if (v.numel() == 0) return {at::zeros_like(v), at::zeros_like(A)};
  auto [dv, dtopo] = topology_grad(s, dy, v, A.contiguous());
  return {dv, dtopo.sum(at::IntArrayRef{0, 2})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& v_in, const at::Tensor& A, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& alpha) {
  check_cuda(v_in);
  const CtrSizes s = ctr_check(v_in, A, q, k, weight, bias, alpha);
  check_grad(dy_in, v_in, s);
  const c10::cuda::CUDAGuard guard(v_in.device());
  const auto dy = dy_in.contiguous(), v = v_in.contiguous();
  if (v.numel() == 0) {
    return {at::zeros_like(v), at::zeros_like(A), at::zeros_like(q), at::zeros_like(k), at::zeros_like(weight),
            at::zeros_like(bias), at::zeros_like(alpha)};
  }
  const auto topo = topologies(s, v, A, q, k, weight, bias, alpha);
  auto [dv, dtopo] = topology_grad(s, dy, v, topo);
  const auto params = [](const at::Tensor& t) { return at::empty(t.sizes(), t.options()); };  // contiguous
  auto dA = params(A), dq = params(q), dk = params(k), dweight = params(weight), dbias = params(bias);
  auto dalpha = params(alpha);
  const auto scratch = at::empty({s.H * s.G * s.R + s.H * s.G + s.B * s.H * s.G * s.R}, A.options());
  const auto qc = q.contiguous(), kc = k.contiguous(), wc = weight.contiguous(), bc = bias.contiguous();
  const auto ac = alpha.contiguous();
  check_launch(cuda::ctr_refinement_grad(cuda_dtype(v, kOpName, "features"), cuda_shape(s), dtopo.data_ptr(),
                                         qc.data_ptr(), kc.data_ptr(), wc.data_ptr(), bc.data_ptr(), ac.data_ptr(),
                                         dA.data_ptr(), dq.data_ptr(), dk.data_ptr(), dweight.data_ptr(),
                                         dbias.data_ptr(), dalpha.data_ptr(), scratch.data_ptr(),
                                         c10::cuda::getCurrentCUDAStream()),
               kOpName);
  return {dv, dA, dq, dk, dweight, dbias, dalpha};
}

}  // namespace
}  // namespace bharnet

TORCH_LIBRARY_IMPL(bharnet, CUDA, m) {
  m.impl("ctr_graph_conv_cpp", &bharnet::forward_cuda);
  m.impl("ctr_graph_conv_cpp_backward", &bharnet::backward_cuda);
  m.impl("ctr_graph_conv_cpp_static_backward", &bharnet::static_backward_cuda);
}
