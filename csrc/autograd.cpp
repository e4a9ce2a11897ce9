// Autograd of bharnet::ctr_graph_conv_cpp, bharnet::temporal_max_pool,
// bharnet::pointwise_conv_cpp and bharnet::batch_norm_train_cpp, registered in C++ for the
// Autograd dispatch key (CPU and CUDA alike). Recording the graph and running the backward node
// then cost a few microseconds per call instead of the ~15 us per forward and ~10 us per
// backward of an autograd registered from Python (torch.library.register_autograd; measured on
// this project's 2-core EPYC), a sizeable share of these ops' time at one-clip shapes. The
// other C++ ops keep their Python autograd: deformable_temporal_conv_cpp's backward reads a
// Python-side convention (bharnet/ops/deformable_temporal_conv.py) and the attention core's
// calls are a negligible share of a layer's time.
//
// The forwards save only what their backward ops take, and the backward ops run below the
// autograd key. Under create_graph the graph convolution's and the max-pool's gradients come
// back wrapped like Python's once_differentiable (differentiating them again raises); the 1x1
// convolution's are then computed by differentiable ATen products, and the batch norm's
// backward is ATen's own, differentiable too.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace bharnet {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor or_undefined(const OptTensor& t) { return t ? *t : at::Tensor(); }

// The gradients as they are, or (under create_graph) as outputs of a node that raises when
// they are differentiated. The node also takes `paths` (the incoming gradients and the saved
// inputs) where they require grad, so that it lies on the graph's paths from the gradients to
// the inputs: torch.autograd.grad(penalty, x) reaches it and raises (else x looked unused).
variable_list once_differentiable(variable_list grads, const variable_list& paths, const char* op) {
  if (!at::GradMode::is_enabled()) return grads;
  const auto n = grads.size();
  for (auto& g : grads) {
    if (!g.defined()) continue;
    g = g.detach();
    g.set_requires_grad(true);
  }
  for (const auto& t : paths) {
    if (t.defined() && t.requires_grad()) grads.push_back(t);
  }
  const auto inputs = static_cast<int64_t>(grads.size());
  auto outputs = torch::autograd::DelayedError(std::string(op) +
                                                   ": double backward is not supported (gradients of gradients, e.g. "
                                                   "create_graph=True for a gradient penalty); use backend='reference' "
                                                   "for them",
                                               inputs)
                     .apply(std::move(grads));
  outputs.resize(n);
  return outputs;
}

struct CtrGraphConv : public torch::autograd::Function<CtrGraphConv> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& v, const at::Tensor& A, const OptTensor& q,
                            const OptTensor& k, const OptTensor& weight, const OptTensor& bias,
                            const OptTensor& alpha) {
    static const auto op =
        find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, const OptTensor&, const OptTensor&)>("bharnet::ctr_graph_conv_cpp");
    at::AutoDispatchBelowADInplaceOrView guard;
    // Only the inputs are saved: the backward recomputes the topologies.
    ctx->save_for_backward({v, A, or_undefined(q), or_undefined(k), or_undefined(weight), or_undefined(bias),
                            or_undefined(alpha)});
    return op.call(v, A, q, k, weight, bias, alpha);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    using T = const at::Tensor&;
    static const auto dynamic_op =
        find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
            T, T, T, T, T, T, T, T)>("bharnet::ctr_graph_conv_cpp_backward");
    static const auto static_op =
        find_op<std::tuple<at::Tensor, at::Tensor>(T, T, T)>("bharnet::ctr_graph_conv_cpp_static_backward");
    const auto saved = ctx->get_saved_variables();
    variable_list result(7);
    {
      at::AutoDispatchBelowAutograd guard;
      const at::Tensor dy = grads[0].contiguous();
      if (saved[4].defined()) {
        std::tie(result[0], result[1], result[2], result[3], result[4], result[5], result[6]) =
            dynamic_op.call(dy, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6]);
      } else {
        std::tie(result[0], result[1]) = static_op.call(dy, saved[0], saved[1]);
      }
    }
    variable_list paths = saved;
    paths.push_back(grads[0]);
    return once_differentiable(std::move(result), paths, "bharnet::ctr_graph_conv_cpp");
  }
};

at::Tensor ctr_graph_conv_autograd(const at::Tensor& v, const at::Tensor& A, const OptTensor& q, const OptTensor& k,
                                   const OptTensor& weight, const OptTensor& bias, const OptTensor& alpha) {
  return CtrGraphConv::apply(v, A, q, k, weight, bias, alpha);
}

struct TemporalMaxPool : public torch::autograd::Function<TemporalMaxPool> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t kernel, int64_t stride,
                               int64_t padding) {
    static const auto op = find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t, int64_t)>(
        "bharnet::temporal_max_pool");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, arg] = op.call(x, kernel, stride, padding);
    ctx->mark_non_differentiable({arg});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({arg});
    ctx->saved_data["frames"] = x.sym_size(2);  // symbolic under torch.export / dynamic shapes
    ctx->saved_data["pool"] = std::vector<int64_t>{kernel, stride, padding};
    return {y, arg};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, int64_t, int64_t, int64_t)>(
            "bharnet::temporal_max_pool_backward");
    variable_list result(4);
    if (grads[0].defined()) {
      at::AutoDispatchBelowAutograd guard;
      const auto pool = ctx->saved_data["pool"].toIntVector();
      result[0] = op.call(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["frames"].toSymInt(), pool[0],
                          pool[1], pool[2]);
    }
    return once_differentiable(std::move(result), grads, "bharnet::temporal_max_pool");
  }
};

std::tuple<at::Tensor, at::Tensor> temporal_max_pool_autograd(const at::Tensor& x, int64_t kernel, int64_t stride,
                                                              int64_t padding) {
  auto outputs = TemporalMaxPool::apply(x, kernel, stride, padding);
  return {outputs[0], outputs[1]};
}

struct PointwiseConv : public torch::autograd::Function<PointwiseConv> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptTensor& bias) {
    static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>(
        "bharnet::pointwise_conv_cpp");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    ctx->saved_data["bias"] = bias.has_value();
    return op.call(x, weight, bias);
  }

  // Under create_graph (GradMode on) the gradients are ATen products, differentiable again
  // (a gradient penalty through the layer works as through nn.Conv2d).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    using T = const at::Tensor&;
    static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, OptTensor>(T, T, T, bool)>(
        "bharnet::pointwise_conv_cpp_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &dy = grads[0];
    const bool bias = ctx->saved_data["bias"].toBool();
    if (at::GradMode::is_enabled()) {
      const auto dy3 = dy.reshape({dy.size(0), dy.size(1), -1}), x3 = x.reshape({x.size(0), x.size(1), -1});
      return {at::matmul(weight.t(), dy3).view(x.sizes()), at::matmul(dy3, x3.transpose(1, 2)).sum(0),
              bias ? dy3.sum(at::IntArrayRef{0, 2}) : at::Tensor()};
    }
    at::AutoDispatchBelowAutograd guard;
    auto [dx, dweight, dbias] = op.call(dy.contiguous(), x, weight, bias);
    return {dx, dweight, or_undefined(dbias)};
  }
};

at::Tensor pointwise_conv_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias) {
  return PointwiseConv::apply(x, weight, bias);
}

// batch_norm_train_cpp: the backward is ATen's own (differentiable again under create_graph).
struct BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
    static const auto op =
        find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&,
                                                                           const OptTensor&, double)>(
            "bharnet::batch_norm_train_cpp");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, invstd, var] = op.call(x, weight, bias, eps);
    ctx->save_for_backward({x, or_undefined(weight), mean, invstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bias"] = bias.has_value();
    ctx->mark_non_differentiable({mean, invstd, var});
    return {y, mean, invstd, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[1];
    auto [dx, dweight, dbias] = at::native_batch_norm_backward(
        grads[0], saved[0], weight.defined() ? OptTensor(weight) : std::nullopt, std::nullopt, std::nullopt,
        saved[2], saved[3], true, ctx->saved_data["eps"].toDouble(),
        {ctx->needs_input_grad(0), weight.defined(), ctx->saved_data["bias"].toBool()});
    return {dx, dweight, dbias, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_train_autograd(const at::Tensor& x,
                                                                                     const OptTensor& weight,
                                                                                     const OptTensor& bias,
                                                                                     double eps) {
  auto outputs = BatchNormTrain::apply(x, weight, bias, eps);
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

}  // namespace
}  // namespace bharnet

TORCH_LIBRARY_IMPL(bharnet, Autograd, m) {
  m.impl("batch_norm_train_cpp", &bharnet::batch_norm_train_autograd);
  m.impl("ctr_graph_conv_cpp", &bharnet::ctr_graph_conv_autograd);
  m.impl("temporal_max_pool", &bharnet::temporal_max_pool_autograd);
  m.impl("pointwise_conv_cpp", &bharnet::pointwise_conv_autograd);
}
