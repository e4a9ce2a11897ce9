"""Recomputing a 1x1 convolution's output in the backward instead of keeping it.

``consume(conv, x, shape, backend, consumer)`` computes ``consumer(conv(x).view(shape))``. Where
the model runs GPU kernels (:func:`recomputes`: ``triton``; ``cpp`` on CUDA), autograd does not
keep the convolution's output ``y`` where ``consumer`` saves it for its backward: it keeps
``x``, which ``conv`` saves anyway, and the backward recomputes ``y`` with one more 1x1
convolution. Two users:

* the graph convolutions (:mod:`bharnet.nn.graph_conv`): ``y`` is ``v``, H times the layer's
  output, and the consumer the fused aggregation (``v`` was about 30% of what a BHaRNet-E
  training step saved with the fused ops);
* :class:`bharnet.nn.temporal.ConvBN` (the MSTCN branches' and the residuals' 1x1 convolution +
  BN), when its ``recompute_bn_input`` is set (off by default): ``y`` is the BatchNorm's input.

Saved for the backward by a float32 BHaRNet-E training step of 4 x 2 clips: 1572 MiB keeping
both, 801 recomputing both (eager PyTorch: 2576; recomputing ``v`` alone saved about 500 MiB).
On an H200, a bf16 step of 32 x 2 clips recomputing ``v`` peaked at 5347 against 7382 MiB and
took 1.9% longer; recomputing both took 34% longer than keeping both (277 against 207 ms) and
peaked at 3762 against 6877 MiB (``bench/recompute_v.py``, two runs of 2026-11-28). On the CPU
the C++ backend keeps ``y``: there the convolutions are a large share of a training step
(recomputing ``v`` made a BHaRNet-E step 16% slower on a 2-core EPYC), and memory is rarely
what limits the batch.
DESIGN.md's full fusion, the convolution inside the kernels, would save the same memory.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.utils import parametrize

from .conv import PointwiseConv2d


class RecomputedOutput:
    """What autograd keeps in place of ``y = conv(x).view(shape)``: the convolution, its input
    (as the enclosing saved-tensor hooks packed it, if any), the weight and bias tensors the
    forward used with their versions (and x's, when kept as is), and the forward's autocast
    state. The backward convolves with those tensors (not the module's parameters of the
    moment: ``torch.func.functional_call`` swaps them back before the backward) and refuses,
    as autograd does, tensors modified in place since the forward (a backward that skips
    ``conv``'s own node, ``autograd.grad(loss, [A])``, would otherwise not notice)."""

    def __init__(self, conv: nn.Conv2d, x: torch.Tensor, packed_x, shape: Optional[Tuple[int, ...]],
                 autocast: Tuple[bool, torch.dtype], unpack: Optional[Callable]):
        self.conv, self.packed_x, self.shape, self.autocast, self.unpack = conv, packed_x, shape, autocast, unpack
        self.weight, self.bias = conv.weight, conv.bias
        watched = [("weight", self.weight), ("bias", self.bias)] + ([("x", x)] if unpack is None else [])
        self.versions = [(name, t, t._version) for name, t in watched if t is not None]

    def recompute(self) -> torch.Tensor:
        for name, t, version in self.versions:
            if t._version != version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: the {type(self.conv).__name__} {name} is at version {t._version}; expected "
                    f"version {version} instead (the convolution's output is recomputed in the backward)")
        x = self.packed_x if self.unpack is None else self.unpack(self.packed_x)
        enabled, dtype = self.autocast
        with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            y = self.conv._conv_forward(x, self.weight, self.bias)
        return y if self.shape is None else y.view(self.shape)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same memory as the same dtype, shape and strides (the
    tensor a pack hook receives need not be the Python object that was saved)."""
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.device == b.device
            and a.shape == b.shape and a.stride() == b.stride())


def can_recompute(y: torch.Tensor) -> bool:
    """Whether autograd will save ``y`` in plain eager mode, where saved-tensor hooks apply
    (``torch.compile`` decides what to keep by itself)."""
    return (y.requires_grad and torch.is_grad_enabled() and type(y) is torch.Tensor
            and not torch.compiler.is_compiling() and torch._C._get_tracing_state() is None
            and torch._C._autograd._saved_tensors_hooks_is_enabled())


def recomputable(conv: nn.Module) -> bool:
    """Whether ``conv._conv_forward(x, weight, bias)`` in the backward gives the forward's
    output: an ``nn.Conv2d`` or ``PointwiseConv2d`` computing its class's own forward, with no
    forward hooks (its own or global: they may change the output or keep state, as the old
    ``spectral_norm``'s power iteration does) and no parametrizations (a ``spectral_norm``
    parametrization iterates at each access in training mode)."""
    stock = (nn.Conv2d._conv_forward, PointwiseConv2d._conv_forward)
    return (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward
            and type(conv)._conv_forward in stock and not {"forward", "_conv_forward"} & set(vars(conv))
            and not parametrize.is_parametrized(conv)
            and not (conv._forward_hooks or conv._forward_pre_hooks
                     or module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks))


def recomputes(backend: str, device_type: str) -> bool:
    """Whether layers whose op runs on ``backend`` recompute the convolution's output in the
    backward (module docstring): on the GPU kernels' backends (the Triton interpreter on the
    CPU included)."""
    return backend == "triton" or (backend == "cpp" and device_type != "cpu")


def consume(conv: nn.Module, x: torch.Tensor, shape: Optional[Tuple[int, ...]], backend: str,
            consumer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``consumer(y)`` for ``y = conv(x)`` (viewed as ``shape`` unless None), whose op runs on
    ``backend``. Where :func:`recomputes`, autograd keeps ``x`` in place of ``y`` wherever
    ``consumer`` saves ``y`` for its backward, and the backward recomputes ``y``.

    Saved-tensor hooks around ``consumer`` swap ``y`` for a :class:`RecomputedOutput`; every
    other saved tensor, and ``x`` inside it, goes to the enclosing hooks if there are any
    (``torch.autograd.graph.save_on_cpu``, non-reentrant checkpointing, memory probes), else is
    kept as is (``save_on_cpu`` then copies ``x`` a second time, besides ``conv``'s own copy). A
    ``y`` that ``consumer`` casts or copies before saving is kept as the copy. A convolution
    that might not give the same ``y`` again (:func:`recomputable`) keeps it."""
    y = conv(x)
    if shape is not None:
        y = y.view(shape)
    if not (recomputes(backend, x.device.type) and can_recompute(y) and recomputable(conv)):
        return consumer(y)
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = outer if outer is not None else (None, None)
    device = x.device.type
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    # autograd keeps the hooks, and so their closures, with every tensor they packed: pack
    # reaches x and y through this dict, emptied when consumer returns, so that the graph keeps
    # neither (y is what the recomputation frees; x, where enclosing hooks such as checkpoint's
    # do not keep it, is theirs to drop)
    live = {"x": x, "y": y}

    def pack(t: torch.Tensor):
        x, y = live.get("x"), live.get("y")
        if y is not None and _same_tensor(t, y):
            return RecomputedOutput(conv, x, x if outer_pack is None else outer_pack(x), shape, autocast,
                                    outer_unpack)
        return t if outer_pack is None else outer_pack(t)

    def unpack(packed):
        if isinstance(packed, RecomputedOutput):
            return packed.recompute()
        return packed if outer_unpack is None else outer_unpack(packed)

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return consumer(y)
    finally:
        live.clear()
