r"""Batch normalisation: ``F.batch_norm(x, running_mean, running_var, weight, bias, training,
momentum, eps)``, whose training-mode statistics the C++ kernel computes.

Math, ``x`` (N, C, \*S) with its spatial positions flattened to P, per channel c over its
M = N x P values, in training mode::

    mean_c = sum x / M,   var_c = sum (x - mean_c)^2 / M
    y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c
    running_mean = (1 - momentum) running_mean + momentum mean_c
    running_var  = (1 - momentum) running_var + momentum var_c M / (M - 1)

(in evaluation mode the running statistics take the place of the batch's); the gradients are
ATen's ``native_batch_norm_backward`` of the same saved mean and 1 / sqrt(var + eps).

Why: every layer of the BHaRNet models ends in a BatchNorm, and PyTorch's CPU batch norm of a
contiguous NCHW float tensor in training mode takes about 4x its own backward's time (209 vs
61 us at 2 x 64 x 64 x 42 on this project's 2-core EPYC; ``csrc/batch_norm.cpp``: 52 us), about
8% of a CPU training step.

Backends: ``reference`` (``F.batch_norm``) and ``cpp``: the C++ forward
(``csrc/batch_norm.cpp``, running statistics then updated here) for training-mode calls on
non-empty float32/float64 CPU tensors with more than one value per channel, whose channels are
not the innermost dimension (channels-last), with parameters and running statistics in x's
dtype and eps > 0, outside CPU autocast, ``torch.func`` transforms and forward-mode AD;
everything else, evaluation mode and invalid arguments included, is ``F.batch_norm``. A backend the op
does not have (``triton``) counts as ``auto``. Autograd is registered in C++
(``csrc/autograd.cpp``), differentiable again under ``create_graph``. The op is
``torch.ops.bharnet.batch_norm_train_cpp(x, weight, bias, eps) -> (y, mean, invstd, var)``
(var biased).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ext import cpp_on_cpu_availability, registered_after_loading
from ._backend import register_backend, resolve_missing_as_auto
from ._checks import nn_layer_kernel_applies

OP_NAME = "batch_norm"


def batch_norm_reference(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                         momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Pure-PyTorch ground truth."""
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def _register_cpp_ops_now() -> None:
    """The fake kernel of the C++ op (run once, after loading; autograd is registered in C++)."""
    @torch.library.register_fake("bharnet::batch_norm_train_cpp")
    def _(x, weight, bias, eps):
        stats = x.new_empty(x.shape[1])
        return torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone(), stats.clone()


_register_cpp_ops = registered_after_loading(_register_cpp_ops_now)


def _kernel_applies(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> bool:
    """Whether a training-mode call takes the C++ kernel; F.batch_norm raises for the invalid
    arguments that fail here (eps <= 0, one running statistic, mismatched dtypes)."""
    return (nn_layer_kernel_applies(x) and x.dim() >= 2 and x.numel() > x.shape[1]
            and all(t is None or t.dtype == x.dtype for t in (weight, bias, running_mean, running_var))
            and (running_mean is None) == (running_var is None) and eps > 0)


def _batch_norm_cpp(x, running_mean, running_var, weight, bias, training, momentum, eps):
    if not (training and _kernel_applies(x, running_mean, running_var, weight, bias, eps)):  # F.batch_norm
        return batch_norm_reference(x, running_mean, running_var, weight, bias, training, momentum, eps)
    _register_cpp_ops()
    y, mean, _, var = torch.ops.bharnet.batch_norm_train_cpp(x, weight, bias, eps)
    with torch.no_grad():
        values = x.numel() // x.shape[1]
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        if running_var is not None:
            running_var.mul_(1 - momentum).add_(var, alpha=momentum * values / (values - 1))
    return y


_IMPLS = {"reference": batch_norm_reference, "cpp": _batch_norm_cpp}
register_backend(OP_NAME, "cpp", cpp_on_cpu_availability)


def batch_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, backend: Optional[str] = None) -> Tensor:
    """``F.batch_norm`` with the same arguments (see the module docstring)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"batch_norm: x must be a floating-point tensor, got {type(x).__name__}"
                        f"{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}")
    impl = _IMPLS[resolve_missing_as_auto(OP_NAME, backend, x.device.type)]
    return impl(x, running_mean, running_var, weight, bias, training, momentum, eps)
