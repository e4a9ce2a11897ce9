r"""Max-pooling over time: ``nn.MaxPool2d((k, 1), stride=(s, 1), padding=(p, 0))`` of (N, C, T, V).

Math, window ``k``, stride ``s``, padding ``p`` (frames outside [0, T) count as -inf),
``T_out = (T + 2p - k) // s + 1``::

    y[n, c, t', v] = max_{u < k} x[n, c, t' s - p + u, v]
    dx[n, c, t, v] = sum of dy[n, c, t', v] over the windows t' whose maximum is frame t

A window's maximum is its first greatest frame in window order, or its last NaN (torch's
max-pool rule), so outputs and gradients are ``F.max_pool2d``'s bit for bit (the backward adds
in the same t' order).

Why: on CPU, ``F.max_pool2d`` with a (k, 1) window costs about as much as a convolution at the
MSTCN max-pool branch's shapes (0.49 ms per call for 2 x 32 x 64 x 42 on this project's 2-core
EPYC, 15.5 ms of a BHaRNet-E training step, while it moves 0.3 MB); it computes int64 indices
through a generic 2-D loop. The C++ kernel (``csrc/temporal_max_pool.cpp``) makes one pass per
(n, c) plane with the joints as the vector dimension and keeps the window offset of each
maximum as int8 for the backward.

Backends: ``reference`` (``F.max_pool2d``) and ``cpp``: the C++ kernel on CPU (float32/float64
and bfloat16 as they are, float16 computed in float32: the outputs are exact, the gradients are
summed in float32 and rounded once, so they can differ from max-pool's half-precision sums in
the last bit); on other devices ``cpp`` is PyTorch's own
max-pool (its CUDA kernel has no such cost), so a model switched to ``cpp`` as a whole still
runs on a GPU (so do windows over 127 frames, whose offsets int8 cannot hold). A backend the op does not have
(``triton``) counts as ``auto``, so a model on ``triton`` runs its max-pools too. Input (N, C,
T, V) or unbatched (C, T, V); a channels-last ``x`` gives a channels-last ``y`` (the kernel
then pools rows of V x C values). Double backward raises. The op is
``torch.ops.bharnet.temporal_max_pool(x, kernel, stride, padding) -> (y, arg)`` with autograd
through ``torch.ops.bharnet.temporal_max_pool_backward(dy, arg, T, kernel, stride, padding)``.
"""
from __future__ import annotations

import operator

from typing import Optional

import torch
import torch.nn.functional as F

from .._ext import cpp_on_cpu_availability, registered_after_loading
from ._backend import register_backend, resolve_missing_as_auto
from ._checks import is_channels_last, is_int
from ._custom_op import as_dtype, cpu_kernel_dtype, refuse_double_backward

OP_NAME = "temporal_max_pool"


def temporal_max_pool_reference(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Pure-PyTorch ground truth."""
    return F.max_pool2d(x, (kernel, 1), (stride, 1), (padding, 0))


def _out_frames(T: int, kernel: int, stride: int, padding: int) -> int:
    return (T + 2 * padding - kernel) // stride + 1


def _register_cpp_ops_now() -> None:
    """Fake kernels of the C++ ops and the backward op's refusal of double backward (run once,
    after loading; the forward op's autograd is registered in C++, csrc/autograd.cpp)."""
    @torch.library.register_fake("bharnet::temporal_max_pool")
    def _(x, kernel, stride, padding):
        shape = (*x.shape[:2], _out_frames(x.shape[2], kernel, stride, padding), x.shape[3])
        return x.new_empty(shape), x.new_empty(shape, dtype=torch.int8)

    @torch.library.register_fake("bharnet::temporal_max_pool_backward")
    def _(dy, arg, T, kernel, stride, padding):
        return dy.new_empty((*dy.shape[:2], T, dy.shape[3]))

    refuse_double_backward("bharnet::temporal_max_pool_backward", "temporal_max_pool")


_register_cpp_ops = registered_after_loading(_register_cpp_ops_now)


MAX_CPP_KERNEL = 127  # window offsets are int8


def _temporal_max_pool_cpp(x, kernel, stride, padding):
    if x.device.type != "cpu" or kernel > MAX_CPP_KERNEL:  # PyTorch's own kernel (module docstring)
        return temporal_max_pool_reference(x, kernel, stride, padding)
    _register_cpp_ops()
    compute = cpu_kernel_dtype(x.dtype)
    if is_channels_last(x):  # memory (N, T, V, C): one plane of T rows of V * C values per n
        N, C, T, V = x.shape
        planes = as_dtype(x, compute).permute(0, 2, 3, 1).reshape(N, 1, T, V * C)  # a view
        y, _ = torch.ops.bharnet.temporal_max_pool(planes, kernel, stride, padding)
        return as_dtype(y.view(N, -1, V, C).permute(0, 3, 1, 2), x.dtype)
    y, _ = torch.ops.bharnet.temporal_max_pool(as_dtype(x, compute), kernel, stride, padding)
    return as_dtype(y, x.dtype)


_IMPLS = {"reference": temporal_max_pool_reference, "cpp": _temporal_max_pool_cpp}
register_backend(OP_NAME, "cpp", cpp_on_cpu_availability)


def temporal_max_pool(x: torch.Tensor, kernel: int = 3, stride: int = 1, padding: int = 1, *,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Max over windows of ``kernel`` frames of ``x`` (N, C, T, V) or (C, T, V) (see the module
    docstring)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() not in (3, 4):
        raise TypeError(f"temporal_max_pool: x must be a (N, C, T, V) or (C, T, V) floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    for name, value in (("kernel", kernel), ("stride", stride), ("padding", padding)):
        if not is_int(value):
            raise TypeError(f"temporal_max_pool: {name} must be an int, got {value!r}")
    kernel, stride, padding = (operator.index(v) for v in (kernel, stride, padding))
    if kernel < 1 or stride < 1 or not 0 <= 2 * padding <= kernel:
        raise ValueError(f"temporal_max_pool: need kernel >= 1, stride >= 1 and 0 <= padding <= kernel / 2, "
                         f"got kernel={kernel}, stride={stride}, padding={padding}")
    T, V = x.shape[-2], x.shape[-1]
    if T < 1 or V < 1 or T + 2 * padding < kernel:
        raise ValueError(f"temporal_max_pool: x of shape {tuple(x.shape)} has no window: need T, V >= 1 and "
                         f"T + 2 x padding ({T} + 2 x {padding}) >= kernel ({kernel})")
    impl = _IMPLS[resolve_missing_as_auto(OP_NAME, backend, x.device.type)]
    if x.dim() == 3:
        return impl(x.unsqueeze(0), kernel, stride, padding).squeeze(0)
    return impl(x, kernel, stride, padding)
