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

On the GPU, PyTorch's batch norm of a bf16 NCHW tensor with few positions per sample is slow:
in a bf16 BHaRNet-E training step on the H100 (32 clips), its forward and backward kernels
took 56 of the 124 ms of device time (``bench/results/h100/2026-11-27/``).

Backends, each for training-mode calls (batch statistics; everything else, evaluation mode
and invalid arguments included, is ``F.batch_norm``, whose errors they raise):

* ``cpp``: the C++ forward (``csrc/batch_norm.cpp``) on non-empty float32/float64 CPU tensors
  with more than one value per channel, whose channels are not the innermost dimension
  (channels-last), with parameters and running statistics in x's dtype and eps > 0, outside
  CPU autocast, ``torch.func`` transforms and forward-mode AD. Autograd is registered in C++
  (``csrc/autograd.cpp``), differentiable again under ``create_graph``. The op is
  ``torch.ops.bharnet.batch_norm_train_cpp(x, weight, bias, eps) -> (y, mean, invstd, var)``
  (var unbiased, for the running statistic).
* ``triton``: the Triton kernels (``bharnet.kernels.batch_norm``: two passes over x forward,
  two over x and dy backward, statistics in float32, float64 for float64 x) on contiguous
  float16/bfloat16/float32/float64 tensors with more than one value per channel, contiguous
  parameters and running statistics in x's dtype or, next to 16-bit x, float32 (bf16 x with
  float32 parameters under autocast; PyTorch's rule on CUDA), eps > 0, outside ``torch.func``
  transforms and forward-mode AD. y and dx come in x's dtype. The op is
  ``torch.ops.bharnet.batch_norm_train(x, weight, bias, eps) -> (y, stats)`` with ``stats``
  (3, C) = [mean; invstd; unbiased var], autograd through
  ``batch_norm_train_backward(dy, x, weight, stats) -> (dx, [dw; db])``; plain eager calls skip
  the dispatcher (``_custom_op.with_autograd``). Double backward is not supported. ``auto``
  passes over this backend (it runs when named): on the H100 an eager call of PyTorch's batch
  norm costs the host less than this op's Python, autograd and two launches, and a training
  step there was bound by the host (246 ms of wall time for 124 ms of kernels); which one wins
  in a model is still to be measured.

Both update the running statistics here, with torch ops. ``nn.BatchNorm2d`` layers
(:class:`bharnet.nn.BatchNorm2d`) run through this op on the CPU, and on the GPU when their
backend is ``triton``.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ext import cpp_on_cpu_availability, registered_after_loading
from ._backend import register_backend, resolve_missing_as_auto, triton_availability
from ._checks import TRITON_DTYPES, accumulation_dtype, nn_layer_kernel_applies
from ._custom_op import (as_dtype, cdiv, launch_config, launcher, new_output, next_pow2, saved_tensors,
                         triton_custom_op, with_autograd)

OP_NAME = "batch_norm"
TILE = 2048  # elements of one (BLOCK_N rows, BLOCK_P positions) tile (half that for float64)
MAX_BLOCK_P = 512
MAX_ROW_PROGRAMS = 64  # programs per channel (grid axis 1), each loops over its row blocks
NUM_WARPS = 4


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


def _statistics_require_grad(running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> bool:
    """Whether a running statistic requires grad: F.batch_norm refuses those, so the kernels
    leave such calls to it."""
    return any(t is not None and t.requires_grad for t in (running_mean, running_var))


def _kernel_applies(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> bool:
    """Whether a training-mode call takes the C++ kernel; F.batch_norm raises for the invalid
    arguments that fail here (eps <= 0, one running statistic, one that requires grad,
    mismatched dtypes, a statistic or affine parameter of other than C elements) or accepts them
    (a (C, 1) weight, say). Called for every batch norm of a training step: plain comparisons,
    cheapest first."""
    if (x.dim() < 2 or not eps > 0 or (running_mean is None) != (running_var is None)
            or _statistics_require_grad(running_mean, running_var) or not nn_layer_kernel_applies(x)):
        return False
    channels = x.shape[1]
    for t in (weight, bias, running_mean, running_var):
        if t is not None and (t.dtype != x.dtype or t.shape != (channels,) or not t.is_cpu):
            return False
    return x.numel() > channels


def _update_running_statistics(running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor,
                               unbiased_var: Tensor, momentum: float) -> None:
    """running = (1 - momentum) running + momentum batch value, as F.batch_norm updates them (one
    foreach lerp); the backends pass both running statistics or neither, and neither requires
    grad (F.batch_norm refuses those)."""
    if running_mean is None:
        return
    torch._foreach_lerp_([running_mean, running_var],
                         [as_dtype(mean, running_mean.dtype), as_dtype(unbiased_var, running_var.dtype)], momentum)


def _batch_norm_cpp(x, running_mean, running_var, weight, bias, training, momentum, eps):
    if not (training and _kernel_applies(x, running_mean, running_var, weight, bias, eps)):  # F.batch_norm
        return batch_norm_reference(x, running_mean, running_var, weight, bias, training, momentum, eps)
    _register_cpp_ops()
    y, mean, _, unbiased_var = torch.ops.bharnet.batch_norm_train_cpp(x, weight, bias, eps)
    _update_running_statistics(running_mean, running_var, mean, unbiased_var, momentum)
    return y


@functools.cache
def _kernels():
    """The Triton kernels, imported on first use (after TRITON_INTERPRET has been chosen)."""
    from bharnet.kernels import batch_norm as kernels
    return kernels


@launch_config
def _triton_config(N: int, P: int, tile: int, max_programs: int) -> Tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_P, S, BLOCK_S): BLOCK_P positions (a power of two up to MAX_BLOCK_P),
    BLOCK_N rows to fill a ``tile``-element tile, S = min(cdiv(N, BLOCK_N), max_programs)
    programs per channel."""
    block_p = min(next_pow2(P), MAX_BLOCK_P, tile)
    block_n = max(1, tile // block_p)
    programs = min(cdiv(N, block_n), max_programs)
    return block_n, block_p, programs, next_pow2(programs)


def _sizes(x: Tensor):
    N, C = x.shape[0], x.shape[1]
    return N, C, x.numel() // max(N * C, 1)


def _config(x: Tensor):
    N, _, P = _sizes(x)
    return _triton_config(N, P, TILE // 2 if x.dtype == torch.float64 else TILE, MAX_ROW_PROGRAMS)


def _forward_fake(x, weight, bias, eps):
    return x.new_empty(x.shape), x.new_empty((3, x.shape[1]), dtype=accumulation_dtype(x))


def _backward_fake(dy, x, weight, stats):
    return x.new_empty(x.shape), stats.new_empty((2, x.shape[1]))


@triton_custom_op("batch_norm_train", _forward_fake)
def _batch_norm_train_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float) -> Tuple[Tensor, Tensor]:
    """(y like x, stats (3, C) = [mean; invstd; unbiased variance] in the accumulation dtype)
    of a contiguous x. Grid (C, S) twice: partial sums, then y."""
    N, C, P = _sizes(x)
    block_n, block_p, programs, block_s = _config(x)
    acc = accumulation_dtype(x)
    y = new_output(x.shape, x.dtype, x.device)
    stats = new_output((3, C), acc, x.device)
    part = new_output((2, C, programs), acc, x.device)
    kernels = _kernels()
    launcher(kernels.batch_norm_stats_kernel)[(C, programs)](
        x, part, N, C, P, ACC_FP64=acc == torch.float64, BLOCK_N=block_n, BLOCK_P=block_p,
        num_warps=NUM_WARPS)
    launcher(kernels.batch_norm_forward_kernel)[(C, programs)](
        x, part, x if weight is None else weight, x if bias is None else bias, y, stats, N, C, P, programs,
        EPS=eps, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACC_FP64=acc == torch.float64,
        BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_S=block_s, num_warps=NUM_WARPS)
    return y, stats


@triton_custom_op("batch_norm_train_backward", _backward_fake)
def _batch_norm_train_backward_op(dy: Tensor, x: Tensor, weight: Optional[Tensor],
                                  stats: Tensor) -> Tuple[Tensor, Tensor]:
    """(dx like x, [dw; db] (2, C) in the accumulation dtype). Grid (C, S) twice: partial
    sums of dy and dy xhat, then dx."""
    N, C, P = _sizes(x)
    dy = dy.contiguous()
    block_n, block_p, programs, block_s = _config(x)
    dx = new_output(x.shape, x.dtype, x.device)
    dparams = new_output((2, C), stats.dtype, x.device)
    part = new_output((2, C, programs), stats.dtype, x.device)
    fp64 = stats.dtype == torch.float64
    kernels = _kernels()
    launcher(kernels.batch_norm_backward_reduce_kernel)[(C, programs)](
        dy, x, stats, part, N, C, P, ACC_FP64=fp64, BLOCK_N=block_n, BLOCK_P=block_p,
        num_warps=NUM_WARPS)
    launcher(kernels.batch_norm_backward_kernel)[(C, programs)](
        dy, x, stats, x if weight is None else weight, part, dx, dparams, N, C, P, programs,
        HAS_WEIGHT=weight is not None, ACC_FP64=fp64, BLOCK_N=block_n, BLOCK_P=block_p,
        BLOCK_S=block_s, num_warps=NUM_WARPS)
    return dx, dparams


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, stats)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _make_backward(run):
    def backward(ctx, dy, _dstats):
        """Only x, weight and the statistics are saved (not y, not xhat)."""
        if dy is None:
            return None, None, None, None
        x, weight, stats = saved_tensors(ctx)
        dx, dparams = run(_batch_norm_train_backward_op, dy, x, weight, stats)
        dw = None if weight is None else as_dtype(dparams[0], weight.dtype)
        db = None if ctx.bias_dtype is None else as_dtype(dparams[1], ctx.bias_dtype)
        return dx, dw, db, None
    return backward


_batch_norm_train_call = with_autograd(_batch_norm_train_op, _make_backward, _setup_context,
                                       (_batch_norm_train_backward_op,))


def _triton_kernel_applies(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                           weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> bool:
    """Whether a training-mode call takes the Triton kernels (module docstring)."""
    if x.dim() < 2 or x.dtype not in TRITON_DTYPES or not x.is_contiguous() or x.numel() <= x.shape[1]:
        return False
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":  # the interpreter rounds bf16 wrongly
        return False
    # PyTorch's rule on CUDA: x's dtype, or float32 next to 16-bit x
    vector_dtypes = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    vectors = (weight, bias, running_mean, running_var)
    return (all(t is None or (t.dtype in vector_dtypes and t.shape == (x.shape[1],) and t.is_contiguous()
                              and t.device == x.device)
                for t in vectors)
            and (running_mean is None) == (running_var is None) and eps > 0
            and not _statistics_require_grad(running_mean, running_var)
            and not torch._C._are_functorch_transforms_active()
            and torch.autograd.forward_ad._current_level < 0)


def _batch_norm_triton(x, running_mean, running_var, weight, bias, training, momentum, eps):
    if not (training and _triton_kernel_applies(x, running_mean, running_var, weight, bias, eps)):
        return batch_norm_reference(x, running_mean, running_var, weight, bias, training, momentum, eps)
    y, stats = _batch_norm_train_call(x, weight, bias, float(eps))
    _update_running_statistics(running_mean, running_var, stats[0], stats[2], momentum)
    return y


_IMPLS = {"reference": batch_norm_reference, "cpp": _batch_norm_cpp, "triton": _batch_norm_triton}
register_backend(OP_NAME, "cpp", cpp_on_cpu_availability, forward_ad=True)
register_backend(OP_NAME, "triton", triton_availability, in_auto=False, forward_ad=True)


def batch_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, backend: Optional[str] = None) -> Tensor:
    """``F.batch_norm`` with the same arguments (see the module docstring)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"batch_norm: x must be a floating-point tensor, got {type(x).__name__}"
                        f"{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}")
    for name, value in (("momentum", momentum), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"batch_norm: {name} must be a number, as F.batch_norm takes it, got {value!r}"
                            + (" (nn.BatchNorm2d's momentum=None, the cumulative average, is the factor "
                               "1 / batches seen)" if name == "momentum" and value is None else ""))
    impl = _IMPLS[resolve_missing_as_auto(OP_NAME, backend, x.device.type)]
    return impl(x, running_mean, running_var, weight, bias, training, momentum, eps)
