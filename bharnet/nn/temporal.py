"""Temporal modelling: the deformable temporal convolution (DeTGC) and the multi-scale TCN."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from ..ops import deformable_temporal_conv, temporal_max_pool
from ..ops._backend import get_backend, resolve_missing_as_auto
from . import recompute
from .conv import PointwiseConv2d
from .norm import BatchNorm2d, can_stack, stacked_batch_norm


class DeformableTemporalConv(nn.Module):
    r"""DeTGC: ``num_offsets`` learnable sampling offsets in time, then a channel mix, then BN.

    For output time t': ``p_e = clamp(t'·stride + tau_e, 0, T−1)``, linear interpolation of
    ``x`` at ``p_e``, then the (E, 1, 1) convolution over the E samples (see
    :func:`bharnet.ops.deformable_temporal_conv`). ``tau`` is initialised to
    ``linspace(−ref, ref, E)`` with ``ref = (k + (k−1)(d−1) − 1) // 2``, i.e. the reach of a
    dilated kernel of size ``k``; gradients reach ``tau``.
    """

    fused_op = "deformable_temporal_conv"  # the op behind ``impl`` (see bharnet.fast.swap_layers)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5,
                 dilation: int = 1, stride: int = 1, num_offsets: int = 4,
                 impl: Optional[str] = None):
        super().__init__()
        ref = (kernel_size + (kernel_size - 1) * (dilation - 1) - 1) // 2
        self.offsets = nn.Parameter(torch.linspace(-ref, ref, num_offsets))
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, num_offsets))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.bn = BatchNorm2d(out_channels, impl=impl)
        self.stride = stride
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.convolve(x))

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        """The output before the BN."""
        return deformable_temporal_conv(x, self.offsets, self.weight, self.bias, self.stride, backend=self.impl)


class TemporalMaxPool(nn.Module):
    """``nn.MaxPool2d((kernel_size, 1), stride=(stride, 1), padding=(padding, 0))`` over the T of
    (N, C, T, V) through :func:`bharnet.ops.temporal_max_pool` (same outputs and gradients;
    ``impl`` picks the backend: the C++ kernel on CPU is several times faster)."""

    fused_op = "temporal_max_pool"  # the op behind ``impl`` (see bharnet.fast.swap_layers)

    def __init__(self, kernel_size: int = 3, stride: int = 1, padding: int = 1, impl: Optional[str] = None):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return temporal_max_pool(x, self.kernel_size, self.stride, self.padding, backend=self.impl)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class ConvBN(nn.Sequential):
    """A 1x1 convolution (temporal stride ``stride``) followed by BN: ``bn(conv(x))``, an
    ``nn.Sequential`` (state-dict keys ``0.*`` and ``1.*``).

    With ``recompute_bn_input`` set (default False), where the BN's backend is one of the GPU
    kernels' (``triton``, or ``cpp`` on CUDA), autograd keeps the convolution's input in place of
    the BN's input, and the backward recomputes the convolution (:mod:`bharnet.nn.recompute`).
    It trades time for memory: on an H200, a bf16 BHaRNet-E training step of 32 x 2 clips
    recomputing these and the graph convolutions' ``v`` took 34% longer than keeping both (277
    against 207 ms) for 45% less peak memory, where recomputing ``v`` alone had cost 2%
    (``bench/recompute_v.py``, 2026-11-28). So it is off unless asked for:
    ``for m in model.modules(): if isinstance(m, ConvBN): m.recompute_bn_input = True``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, impl: Optional[str] = None,
                 recompute_bn_input: bool = False):
        super().__init__(PointwiseConv2d(in_channels, out_channels, stride, impl=impl),
                         BatchNorm2d(out_channels, impl=impl))
        self.recompute_bn_input = recompute_bn_input

    def __getitem__(self, index):
        """A module, or for a slice an ``nn.Sequential`` (``nn.Sequential`` builds a slice with
        its class's ``__init__``, which takes channels here)."""
        if isinstance(index, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[index]))
        return super().__getitem__(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.recompute_bn_input or len(self) != 2 or not isinstance(self[1], BatchNorm2d):
            return super().forward(x)  # also a ConvBN changed by its user
        conv, bn = self
        return recompute.consume(conv, x, None, resolve_missing_as_auto(bn.fused_op, bn.impl, x.device.type), bn)


class MultiScaleTemporalConv(nn.Module):
    """MSTCN: four branches of ``out_channels / 4`` channels, concatenated.

    [1x1+BN, act, DeTGC(k=5, d=1)], [1x1+BN, act, DeTGC(k=5, d=2)],
    [1x1+BN, act, MaxPool(3x1, stride), BN], [1x1 (stride)+BN].

    The input ConvBNs of the branches with the act (all but the last) all read ``x``: unless the
    convolutions' backend is ``reference``, they run as one 1x1 convolution with the stacked
    weights ``[W_1; W_2; ...]`` and biases and one BN over the stacked channels
    (:func:`bharnet.nn.norm.stacked_batch_norm`, which keeps each BN's running statistics), the
    act runs once on the stacked channels (in place, as built), and the rest of each branch takes
    its channels (the C++ DeTGC reads such a slice in place on the CPU). The branches' last BNs
    (the DeTGCs', the max-pool's, the last ConvBN's) then run as one too, over the branches'
    concatenated outputs, which gives the block's output. Batch norm and the act are per channel,
    so the values and gradients are the same (to rounding), with one GEMM in place of several
    thin ones, one input gradient in place of several to sum, and two BN calls in place of
    seven. The last branch's input ConvBN stays apart: the act's output, which autograd keeps,
    would share its storage and keep it alive. The same tensors are saved as one by one. A
    BHaRNet-E training step (one clip, this project's 2-core Xeon, ``bench/stacked_branches.py``,
    8 alternating rounds, two runs, 2026-11-29) took 5-6% less time in float32 and 10-12% less in
    bfloat16 autocast, with peak memory within 2% in float32 and 3-6% higher in bfloat16
    (PyTorch's bfloat16 BatchNorm backward takes float32 copies of its whole input). Branches
    changed from what ``__init__`` builds (an act per branch or not a LeakyReLU, a ConvBN
    subclass or one that recomputes its BN input, a layer used twice, a momentum of None, other
    layers after the act, hooks or a ``forward`` set on a layer whose call the stacking skips)
    run one by one, as on ``reference``, or keep their own last BNs, and so do calls under
    ``torch.func`` transforms and on unbatched input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 kernel_size: int = 5, dilations=(1, 2), impl: Optional[str] = None):
        super().__init__()
        num_branches = len(dilations) + 2
        if out_channels % num_branches != 0:
            raise ValueError(f"out_channels={out_channels} must be a multiple of {num_branches}")
        c = out_channels // num_branches
        act = nn.LeakyReLU(0.1, inplace=True)
        self.branches = nn.ModuleList(
            nn.Sequential(ConvBN(in_channels, c, impl=impl), act,
                          DeformableTemporalConv(c, c, kernel_size, d, stride, impl=impl))
            for d in dilations)
        self.branches.append(nn.Sequential(
            ConvBN(in_channels, c, impl=impl), act,
            TemporalMaxPool(3, stride, 1, impl=impl), BatchNorm2d(c, impl=impl)))
        self.branches.append(ConvBN(in_channels, c, stride, impl=impl))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self._stacked_heads() if x.dim() == 4 and not torch._C._are_functorch_transforms_active() else None
        if heads is None:
            return torch.cat([branch(x) for branch in self.branches], dim=1)
        *activated, last = self.branches
        convs, bns = zip(*(head._modules.values() for head in heads))
        bias = None if convs[0].bias is None else torch.cat([conv.bias for conv in convs])
        stacked = stacked_batch_norm(bns, convs[0]._conv_forward(x, torch.cat([conv.weight for conv in convs]), bias))
        parts = activated[0][1](stacked).split([conv.out_channels for conv in convs], dim=1)
        tails = self._stacked_tails()
        if tails is not None:  # each branch up to its last BN, then the BNs as one
            before_norm, norms = tails
            outputs = [before(part) for before, part in zip(before_norm, parts)] + [before_norm[-1](x)]
            if [t.shape[1] for t in outputs] != [bn.num_features for bn in norms]:  # each BN raises its error
                return torch.cat([bn(t) for bn, t in zip(norms, outputs)], dim=1)
            return stacked_batch_norm(norms, torch.cat(outputs, dim=1))
        outputs = [_chain(*list(branch)[2:])(part) for branch, part in zip(activated, parts)]
        return torch.cat(outputs + [last(x)], dim=1)

    def _stacked_heads(self) -> Optional[list]:
        """The input ConvBNs of the branches that have the act, which ``forward`` stacks, or
        None where the branches run one by one (class docstring). Called at every forward:
        plain attribute checks (30 us on this project's Xeon, 20 more for the tails')."""
        *branches, _ = self.branches._modules.values()
        activated = [list(b._modules.values()) for b in branches]
        if not activated or any(len(layers) < 2 for layers in activated):
            return None
        act = activated[0][1]  # one LeakyReLU, shared by the branches (per channel)
        heads = [layers[0] for layers in activated]
        if (type(act) is not nn.LeakyReLU or any(layers[1] is not act for layers in activated)
                or any(type(h) is not ConvBN or len(h._modules) != 2 or h.recompute_bn_input for h in heads)
                or any(type(m) not in _STACKABLE_RESTS for layers in activated for m in layers[2:])):
            return None
        convs, bns = zip(*(h._modules.values() for h in heads))
        first = convs[0]
        if type(first) is not PointwiseConv2d:
            return None
        if ((first.impl if first.impl is not None else get_backend()) == "reference"
                or any(type(c) is not PointwiseConv2d or c.stride != (1, 1) or c.impl != first.impl
                       or (c.bias is None) != (first.bias is None) or "_conv_forward" in vars(c) for c in convs)
                or any(type(b) is not nn.Sequential for b in branches) or not can_stack(bns)
                or any(bn.num_features != c.out_channels for c, bn in zip(convs, bns))
                or _intercepted([*branches, act, *heads, *convs, *bns])
                or not _each_once(self.branches, act)):
            return None
        return heads

    def _stacked_tails(self) -> Optional[Tuple[list, list]]:
        """Where the input ConvBNs stack: (each branch's layers before its last BN, as one
        callable per branch, the last branch's taking ``x``; those BNs), for branches ending in
        a DeTGC (its BN) or a BN, and a last branch that is a ConvBN; or None (every branch then
        runs its own BN)."""
        *branches, last = self.branches._modules.values()
        before_norm, norms, bypassed = [], [], [last]
        for branch in branches:
            rest = list(branch._modules.values())[2:]
            if rest and type(rest[-1]) is DeformableTemporalConv and type(rest[-1].bn) is BatchNorm2d:
                *layers, detgc = rest
                bypassed.append(detgc)
                before_norm.append(_chain(*layers, detgc.convolve))
                norms.append(detgc.bn)
            elif rest and type(rest[-1]) is BatchNorm2d:
                before_norm.append(_chain(*rest[:-1]))
                norms.append(rest[-1])
            else:
                return None
        if type(last) is not ConvBN or len(last._modules) != 2 or last.recompute_bn_input:
            return None
        conv, bn = last._modules.values()
        before_norm.append(conv)
        norms.append(bn)
        if not can_stack(norms) or _intercepted(bypassed + norms):
            return None
        return before_norm, norms


def _chain(*layers):
    """``layers`` applied in order, as one callable."""
    def run(x):
        for layer in layers:
            x = layer(x)
        return x
    return run


# What may follow a branch's act where the branches stack: bharnet's own layers, none of which
# changes its input in place (the parts are views of one tensor, which autograd protects).
_STACKABLE_RESTS = (DeformableTemporalConv, TemporalMaxPool, BatchNorm2d)


def _intercepted(modules) -> bool:
    """Whether a module hook (any of ``modules``' own, or a global one) or a ``forward`` set on
    one of ``modules`` would miss the calls that running the modules together skips."""
    return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
                or module_hooks._global_backward_hooks or module_hooks._global_backward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                       or "forward" in vars(m) for m in modules))


def _each_once(branches: nn.Module, shared: nn.Module) -> bool:
    """Whether every module of ``branches`` but ``shared`` occurs once: stacked, a layer used
    twice (a BN in two branches, say) would update its running statistics in another order."""
    seen, stack = set(), [branches]
    while stack:
        module = stack.pop()
        if module is None:  # a submodule slot set to None
            continue
        if module is not shared:
            if id(module) in seen:
                return False
            seen.add(id(module))
        stack.extend(module._modules.values())
    return True
