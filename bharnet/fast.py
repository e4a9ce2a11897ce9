r"""Run a built model faster: switch its fused layers between backends, fuse it for inference.

* :func:`swap_layers` chooses the backend of every fused layer in place (training or inference).
* :func:`fuse_for_inference` returns an inference copy of a trained model in ``eval()`` mode with
  every BatchNorm that follows a linear op folded into that op's weights, running its layers on
  a backend (on CPU ``auto`` is the C++ kernels).
* :func:`keep_freed_memory` stops glibc's malloc from handing the activations' memory back to
  the OS after every call (process-wide), which repeated CPU inference otherwise pays for in
  page faults.

Folding (eval-mode BatchNorm is the per-channel affine map ``BN(z)_c = s_c z_c + t_c`` with
``s_c = gamma_c / sqrt(running_var_c + eps)`` and ``t_c = beta_c - s_c running_mean_c``):

* 1x1 convolution + BN (``ConvBN`` pairs: the MSTCN branch inputs, the residual branches):
  ``s (W x + b) + t = (s W) x + (s b + t)``: one convolution with weight ``s_o W[o]`` and bias
  ``s_o b_o + t_o``.
* DeTGC + BN: the op is ``y[o] = b[o] + sum_{c, e} W[o, c, e] xs[c, e]`` (``xs`` the sampled
  input, which does not depend on ``W``), linear per output channel, so the same rule gives
  ``W' = s_o W[o]``, ``b' = s_o b_o + t_o``.
* ST-GC / CTR-GC + BN: ``y[c, t, i] = sum_h sum_j Aref[h, g(c), i, j] v[h, c, t, j]`` with
  ``v = conv_v x`` is linear in ``v`` for each channel ``c``, so ``s_c y = aggregation of
  s_c v``: the scale goes into conv_v's weight and bias rows ``(h, c)`` for every subset ``h``
  (``q`` and ``k`` come from ``conv_qk`` and are untouched). The shift cannot go into ``v``:
  it would come out multiplied by the row sums ``sum_j Aref[h, g, i, j]``, which vary with
  ``i`` (and, for CTR-GC, with the sample). It is added after the aggregation instead, into
  the bias of the 1x1 residual convolution where the block has one (``act(GC(x) + R1(x))``
  adds the two anyway), else by a :class:`ChannelBias` layer.

Restructured, after folding (each computes the same function with fewer or cheaper ops):

* the MSTCN branches' input 1x1 convolutions, which all read the same ``x``, become one
  convolution with the stacked weights ``[W_1; W_2; ...]`` and biases, whose output is split
  by channels (:class:`SharedInputBranches`); a strided one stays separate;
* an ``nn.MaxPool2d`` over time only becomes :class:`bharnet.nn.TemporalMaxPool` (the C++
  kernel on CPU; PyTorch's CPU max-pool is ~8x slower at these shapes; bharnet's own MSTCN
  already uses that layer).

Layout: on CPU with the C++ kernels (``auto`` or ``cpp``) the fused model runs its features
channels-last (memory (N, T, V, C)): its convolution weights are channels-last, so oneDNN's
convolutions read and write that layout without the reorders it pays for channels-first
tensors (10-37% of a 1x1 convolution's time at these shapes), each block converts its input
if it is not (only the first block's is), and the C++ kernels of ctr_graph_conv,
deformable_temporal_conv and temporal_max_pool read and return channels-last tensors natively
(same values as channels-first). Full-size BHaRNet-E, one clip, on this project's 2-core EPYC:
64-67 ms per call channels-last vs 73-78 ms channels-first (ad-hoc runs, same process).

Not folded: the input ``data_bn`` (its scale varies per joint and person, which a 1x1
convolution over channels cannot absorb), the BN after the MaxPool branch (a LeakyReLU and a
max lie between it and the convolution), LayerNorm and the attention.
"""
from __future__ import annotations

import copy
import ctypes
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.utils import _pair
from torch.nn.utils import parametrize, remove_spectral_norm, remove_weight_norm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .absent_persons import skip_absent_persons
from .nn import (BatchNorm2d, ConvBN, CTRGraphConv, DeformableTemporalConv, GCNBlock, MultiScaleTemporalConv,
                 PointwiseConv2d, STGraphConv, TemporalMaxPool)
from .ops import _backend
from .ops._backend import BACKENDS


def _has_backend(op: Optional[str], backend: Optional[str]) -> bool:
    """Whether ``op`` (a layer's ``fused_op``; None when it declares none) has ``backend`` at all."""
    return op is None or backend is None or _backend.has_backend(op, backend)


def _runs(module: nn.Module, *classes: type) -> bool:
    """Whether ``module`` is one of ``classes`` (or a subclass) that computes what that class's
    own ``forward`` does: a subclass with a ``forward`` of its own (a skip added, another
    order) is not rewritten as if it were the class."""
    return isinstance(module, classes) and any(type(module).forward is c.forward for c in classes)


def _is_batch_norm(module: nn.Module) -> bool:
    return _runs(module, nn.modules.batchnorm._BatchNorm, BatchNorm2d)


def swap_layers(model: nn.Module, backend: Optional[str] = "auto") -> nn.Module:
    """Make every layer of ``model`` that has fused ops (an ``impl`` attribute) use ``backend``.

    A layer whose op has no such backend at all gets ``auto`` instead (so a model mixing ops
    with different backend sets can still be switched as a whole); a backend that exists but
    cannot run on the tensors' device still raises its error at the call (e.g. ``triton`` on a
    CPU without the Triton interpreter). Parameters, buffers and state-dict keys are untouched, so a checkpoint trained with one backend loads into a model
    running another. ``backend=None`` returns the layers to the global default
    (``bharnet.ops.use_backend``). Returns ``model``.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    for module in model.modules():
        if hasattr(module, "impl"):
            module.impl = backend if _has_backend(getattr(module, "fused_op", None), backend) else "auto"
    return model


class ChannelBias(nn.Module):
    """``y[b, c, ...] = x[b, c, ...] + bias[c]``: the shift of a BatchNorm folded out of a graph
    convolution that has no residual convolution to carry it (see the module docstring)."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.view(-1, *([1] * (x.dim() - 2)))


def _is_temporal_max_pool(pool: nn.Module) -> bool:
    """Whether ``pool`` is an ``nn.MaxPool2d`` over time only, which :class:`TemporalMaxPool`
    computes (bharnet's own models already use that layer)."""
    return (_runs(pool, nn.MaxPool2d) and not pool.ceil_mode and not pool.return_indices
            and _pair(pool.kernel_size)[1] == 1 and _pair(pool.stride)[1] == 1
            and _pair(pool.padding)[1] == 0 and _pair(pool.dilation) == (1, 1)
            and 2 * _pair(pool.padding)[0] <= _pair(pool.kernel_size)[0])


def _is_pointwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1)


class SharedInputBranches(nn.Module):
    """``cat([branch(x) for branch in branches], dim=1)`` for branches that each start with a
    1x1 convolution of ``x`` (a bare ``Conv2d`` or a ``Sequential`` led by one), e.g. the MSTCN.

    The unstrided input convolutions run as one convolution with the stacked weights
    ``[W_1; W_2; ...]`` and biases, whose output is split by channels and fed to the rest of
    each branch; other branches run as they are. Same function, one larger GEMM instead of
    several thin ones. The rests' in-place activations (the MSTCN's, for training memory) run
    out of place (the flags are turned off on the modules given): autograd refuses in-place
    changes of the split's views.

    A channels-last split part whose channels span less than 64 bytes (16 bfloat16 ones) is
    copied into a tensor of its own before its rest (other than nn.Identity) runs: PyTorch's CPU elementwise kernels
    vectorise only runs of at least one 64-byte vector, and a bfloat16 LeakyReLU over the
    16-channel runs of the first blocks' parts took 10x the time of the copy and the activation
    of the copy together (0.19 against 0.018 ms at (2, 16, 64, 42), this project's Xeon)."""

    def __init__(self, branches: nn.ModuleList):
        super().__init__()
        heads = [b if isinstance(b, nn.Conv2d) else b[0] for b in branches]
        self.shared = tuple(_is_pointwise(h) for h in heads)
        stacked = [h for h, shared in zip(heads, self.shared) if shared]
        self.widths = [h.out_channels for h in stacked]
        first = stacked[0].weight
        self.conv = PointwiseConv2d(first.shape[1], sum(self.widths), device=first.device, dtype=first.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat([h.weight for h in stacked]))
            self.conv.bias.copy_(torch.cat([_bias(h) for h in stacked]))
        self.rests = nn.ModuleList(
            (nn.Identity() if isinstance(b, nn.Conv2d) else b[1:]) if shared else b
            for b, shared in zip(branches, self.shared))
        for rest, shared in zip(self.rests, self.shared):
            for module in rest.modules() if shared else ():
                if getattr(module, "inplace", False):
                    module.inplace = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = iter(self.conv(x).split(self.widths, dim=1))
        outputs = []
        for rest, shared in zip(self.rests, self.shared):
            if not shared:
                outputs.append(rest(x))
            elif isinstance(rest, nn.Identity):
                outputs.append(rest(next(parts)))
            else:
                outputs.append(rest(_with_whole_vector_runs(next(parts))))
        return torch.cat(outputs, dim=1)


def _with_whole_vector_runs(part: torch.Tensor) -> torch.Tensor:
    """``part`` (a channel slice of a 4-d tensor), or a channels-last copy of it where it is a
    CPU channels-last slice whose channel runs are shorter than 64 bytes (see
    :class:`SharedInputBranches`)."""
    short = part.device.type == "cpu" and part.shape[1] * part.element_size() < 64
    if short and part.stride(1) == 1 and not part.is_contiguous(memory_format=torch.channels_last):
        return part.contiguous(memory_format=torch.channels_last)
    return part


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` in float64 with ``bn(z)_c = s_c z_c + t_c`` in eval mode."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ValueError(f"fuse_for_inference: {name} is a {type(bn).__name__}, not a BatchNorm")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"fuse_for_inference: {name} has no running statistics "
                         "(track_running_stats=False), so eval mode normalises with batch "
                         "statistics and cannot be folded")
    s = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.double()
    t = -bn.running_mean.double() * s
    if bn.bias is not None:
        t = t + bn.bias.double()
    return s, t


@torch.no_grad()
def _bias(layer: nn.Module) -> nn.Parameter:
    """``layer.bias``, first set to a zero bias when the layer has none (``bias=False``, as a
    convolution before a BatchNorm usually is): folding gives it one."""
    if layer.bias is None:
        weight = layer.weight
        layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    return layer.bias


@torch.no_grad()
def _scale_rows(layer: nn.Module, s: torch.Tensor, t: Optional[torch.Tensor] = None) -> None:
    """In place, computed in float64: ``weight[o] *= s[o]``, ``bias[o] = s[o] bias[o] + t[o]``."""
    weight, bias = layer.weight, _bias(layer)
    weight.copy_(weight.double() * s.view((-1,) + (1,) * (weight.dim() - 1)))
    bias.copy_(s * bias.double() + (0 if t is None else t))


def _fold_conv_bn(seq: nn.Sequential, name: str) -> nn.Conv2d:
    conv, bn = seq
    _scale_rows(conv, *_bn_affine(bn, f"{name}.1"))
    return conv


def _is_conv_bn(module: nn.Module) -> bool:
    return (_runs(module, nn.Sequential, ConvBN) and len(module) == 2
            and _runs(module[0], nn.Conv2d, PointwiseConv2d) and _runs(module[1], nn.BatchNorm2d, BatchNorm2d))


@torch.no_grad()
def _fold_graph_conv(gcn: nn.Module, name: str) -> torch.Tensor:
    """Fold the BN's scale into conv_v (rows ``h * C + c``, every subset ``h``); remove the BN.
    Returns its shift ``t`` (float64), which the caller adds after the aggregation."""
    s, t = _bn_affine(gcn.bn, f"{name}.bn")
    _scale_rows(gcn.conv_v, s.repeat(gcn.num_subsets))
    gcn.bn = nn.Identity()
    return t


@torch.no_grad()
def _add_shift(model: nn.Module, name: str, gcn: nn.Module, t: torch.Tensor) -> None:
    """Add a folded graph convolution's shift ``t`` after its aggregation: into the bias of its
    block's residual convolution when it has one, else as the graph convolution's
    :class:`ChannelBias`."""
    block = model.get_submodule(name.rpartition(".")[0])
    if _runs(block, GCNBlock) and block.gcn is gcn and _runs(block.res_gcn, nn.Conv2d, PointwiseConv2d):
        bias = _bias(block.res_gcn)
        bias.copy_(bias.double() + t)
    else:
        gcn.bn = ChannelBias(t.to(gcn.conv_v.weight.dtype))


def fuse_for_inference(model: nn.Module, backend: Optional[str] = "auto") -> nn.Module:
    r"""An inference copy of ``model`` (which must be in ``eval()`` mode) with BatchNorm folded.

    Every BatchNorm that follows a linear op is folded into it, exactly up to rounding (the
    math is in the module docstring): ``ConvBN`` pairs become one convolution, DeTGC absorbs
    its BN, ST-GC/CTR-GC put the BN scale into ``conv_v`` and the shift into the block's
    residual convolution (or a :class:`ChannelBias`). Folding runs in float64 and stores the
    result in each parameter's dtype. The fused layers then use ``backend`` (see
    :func:`swap_layers`; ``auto`` on CPU is the C++ kernels for the graph, temporal and
    cross-attention layers). On CPU with the C++ kernels the copy runs its features
    channels-last (module docstring); its outputs are the same either way. The layout is chosen
    for the device the model is on when fused: fuse on the device it will run on.

    For the models of :mod:`bharnet.models`, persons whose inputs are all zero (the padding of a
    clip with fewer persons than ``num_person``) are not computed in calls without autograd
    (``torch.no_grad``, ``torch.inference_mode``): their features depend only on the weights and
    are put in from a one-time computation (:mod:`bharnet.absent_persons`).

    Only layers that compute what their class's own ``forward`` does are rewritten: a subclass
    with a ``forward`` of its own (an ``nn.Sequential``, MSTCN or GCNBlock that adds a skip, say)
    is left as it is, and so is a graph or temporal convolution whose norm is not a BatchNorm.
    Reparametrized weights (``weight_norm``, ``spectral_norm``) become plain parameters holding
    their current values in the copy. On the channels-last path, a GCNBlock that an
    ``nn.Sequential`` follows with another GCNBlock returns channels-last features (code that
    calls such blocks one by one and reads their outputs with ``.view`` needs ``.reshape``);
    every other block's output, and every convolution outside the blocks, keeps its layout.

    ``model`` is not modified: the copy has its own parameters (a module or weight that
    ``model`` uses at several places gets a copy per place, each folded with its own BN; a
    convolution without bias gets one), and a different module structure (so a different ``state_dict``: keep checkpoints of the unfused model). The copy
    computes the eval-mode function only, so running it (or a BatchNorm left in it) in training
    mode raises ``RuntimeError``; ``model`` in training mode raises ``ValueError`` (training-mode BN uses
    batch statistics, which cannot be folded).

    Speed (full-size BHaRNet-E, one clip of 2 persons x 64 frames, float32, ``auto`` = C++
    kernels with channels-last features, on this project's 2-core AMD EPYC with 2 threads):
    2.30x-2.91x the eager reference model in the ``bharnet bench`` runs of 2026-11-26/27 after
    the channels-last path (79.6 vs 191 ms in the last, 62.6 ms under ``torch.compile``; the
    C++ kernels alone, unfused, 2.13x-2.50x since the 1x1 convolutions run on them too); with
    one of the 2 persons present, 48.5 vs 192 ms (3.95x). See the README's performance
    section for the latest run.
    For bfloat16 inference, convert the copy: ``fuse_for_inference(model).to(torch.bfloat16)``
    (folding then runs on the float32 weights) and pass bfloat16 inputs. On CPU the graph and
    temporal convolutions' and the max-pools' C++ kernels read its bfloat16 features as they are (computing in
    float32, without float32 copies of the activations), and on CPUs with AMX (Intel Sapphire
    Rapids and later) oneDNN's bfloat16 convolutions are several times faster than float32
    ones; elsewhere float32 is usually as fast. See the README for measured times.
    On Linux with glibc, large activations freed by one call are returned to the OS and faulted
    back in by the next: call :func:`keep_freed_memory` once (or set ``MALLOC_MMAP_THRESHOLD_``
    and ``MALLOC_TRIM_THRESHOLD_``, or preload jemalloc/tcmalloc) for every model in the process.
    """
    if getattr(model, _FUSED, False):
        raise ValueError("fuse_for_inference: this model was already fused for inference; pass the "
                         "unfused (trained) model")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"fuse_for_inference needs a model in eval mode (call model.eval() first); "
                         f"in training mode: {', '.join(training[:3])}{' ...' if len(training) > 3 else ''}")
    fused = _bake_reparametrized_weights(_unshared(copy.deepcopy(model)))
    for name, module in list(fused.named_modules()):
        if _is_conv_bn(module):
            fused = _replaced(fused, name, _fold_conv_bn(module, name))
        elif _runs(module, DeformableTemporalConv) and _is_batch_norm(module.bn):
            _scale_rows(module, *_bn_affine(module.bn, f"{name}.bn"))
            module.bn = nn.Identity()
    for name, module in list(fused.named_modules()):
        if _runs(module, STGraphConv, CTRGraphConv) and _is_batch_norm(module.bn):
            t = _fold_graph_conv(module, name)
            _add_shift(fused, name, module, t)
    for name, module in list(fused.named_modules()):
        if _is_temporal_max_pool(module):
            fused = _replaced(fused, name, TemporalMaxPool(_pair(module.kernel_size)[0], _pair(module.stride)[0],
                                                           _pair(module.padding)[0]))
    for name, module in list(fused.named_modules()):
        if _runs(module, MultiScaleTemporalConv):
            fused = _replaced(fused, name, SharedInputBranches(module.branches))
    swap_layers(fused, backend)
    if _runs_channels_last(fused, backend):
        for conv in _convs_of_the_blocks(fused):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        for block in fused.modules():
            if _runs(block, GCNBlock):
                block.register_forward_pre_hook(_channels_last_input, with_kwargs=True)
        for block in _blocks_ending_a_stack(fused):
            block.register_forward_hook(_channels_first_output)
    for module in fused.modules():  # the root, and the BatchNorms left (they would update their statistics)
        if module is fused or isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(_refuse_training)
    setattr(fused, _FUSED, True)
    return skip_absent_persons(fused).eval()  # also the modules made here


def _replaced(root: nn.Module, name: str, replacement: nn.Module) -> nn.Module:
    """``root`` with its submodule ``name`` replaced (``replacement`` itself for the root, "")."""
    if not name:
        return replacement
    root.set_submodule(name, replacement)
    return root


# set on a model that fuse_for_inference made
_FUSED = "_bharnet_fused_for_inference"


def _unshared(model: nn.Module) -> nn.Module:
    """``model`` with every module and parameter at one place only, in place: a module that sits
    at several places (``named_modules`` lists it once) becomes a copy per extra place, and a
    parameter that several modules hold (tied weights) a copy per extra module. Folding rewrites
    weights in place, so a shared one would be folded at one place and wrong at the others (or
    folded twice); for the eval-mode function computed here, copies are the same function."""
    seen = set()
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in seen:
            model.set_submodule(name, copy.deepcopy(module))
        seen.add(id(module))
    seen = set()
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and id(param) in seen:
                module._parameters[key] = nn.Parameter(param.detach().clone(), param.requires_grad)
            seen.add(id(param))
    return model


def _bake_reparametrized_weights(model: nn.Module) -> nn.Module:
    """``model`` with every reparametrized weight (``torch.nn.utils.parametrizations``'
    weight_norm, spectral_norm, ...; the older hook-based weight_norm and spectral_norm) made a
    plain parameter holding its current value, in place: folding writes into ``weight``, which
    a parametrization recomputes from its own tensors at every access or call."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            # not parametrize.remove_parametrizations: it deletes the tensors' properties from
            # the class, which the deep copy shares with the caller's model
            with torch.no_grad():
                values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
            module.__class__ = module.__class__.__bases__[0]
            del module._modules["parametrizations"]
            for name, value in values.items():
                module.register_parameter(name, nn.Parameter(value))
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):
                remove_weight_norm(module, hook.name)
            elif isinstance(hook, SpectralNorm):
                remove_spectral_norm(module, hook.name)
    return model


def _convs_of_the_blocks(model: nn.Module) -> list:
    """The convolutions whose weights go channels-last: those of the GCNBlocks and of bharnet's
    models (not a user's own convolution elsewhere, whose output would then be channels-last)."""
    inside = _modules_inside(model, lambda m: _runs(m, GCNBlock) or _is_bharnet_model(m))
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and id(m) in inside]


def _is_bharnet_model(module: nn.Module) -> bool:
    from .models.variants import _Variant

    return isinstance(module, _Variant)


def _modules_inside(model: nn.Module, owner) -> set:
    """The ids of the modules of ``model`` inside a module for which ``owner(module)`` holds
    (those modules included)."""
    return {id(m) for outer in model.modules() if owner(outer) for m in outer.modules()}


def _runs_channels_last(model: nn.Module, backend: Optional[str]) -> bool:
    """Whether the fused model runs its features channels-last: a model of GCNBlocks on CPU with
    the C++ kernels (``cpp``, or ``auto`` where they are available), which read and write that
    layout natively (module docstring); only its Conv2d weights change layout. Decides without
    raising; an unusable backend raises at the call."""
    name = backend if backend is not None else _backend.get_backend()
    return ({p.device.type for p in model.parameters()} == {"cpu"} and name in ("auto", "cpp")
            and any(_runs(m, GCNBlock) for m in model.modules())
            and _backend.unavailable_reason("ctr_graph_conv", "cpp", "cpu") is None)


def _blocks_ending_a_stack(model: nn.Module) -> list:
    """The GCNBlocks whose output code outside bharnet's models may read (a ``.view`` of a
    channels-last tensor fails): every GCNBlock except those inside one of bharnet's models
    (whose pooling takes channels-last features as they are) and those followed by another
    GCNBlock in an ``nn.Sequential``, which is what runs next."""
    inside_bharnet_models = _modules_inside(model, _is_bharnet_model)
    fed_to_a_block = {id(child) for seq in model.modules() if _runs(seq, nn.Sequential)
                      for child, after in zip(seq, list(seq)[1:]) if _runs(after, GCNBlock)}
    return [m for m in model.modules() if _runs(m, GCNBlock)
            and id(m) not in inside_bharnet_models and id(m) not in fed_to_a_block]


def _channels_first_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the blocks :func:`_blocks_ending_a_stack` lists."""
    return output.contiguous()


def _channels_last_input(module: nn.Module, args, kwargs):
    """Forward pre-hook of the blocks of a channels-last model: the first one receives the
    channels-first input (later ones get channels-last features, returned unchanged)."""
    if args:
        x, *rest = args
        return (x.contiguous(memory_format=torch.channels_last), *rest), kwargs
    return args, dict(kwargs, x=kwargs["x"].contiguous(memory_format=torch.channels_last))


def _refuse_training(module: nn.Module, args) -> None:
    if module.training:
        raise RuntimeError("this model was fused for inference (BatchNorm folded into the weights) "
                           "and computes the eval-mode function only; train the unfused model")


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MAX_MMAP_THRESHOLD = 32 << 20


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, for the whole process: blocks up to
    32 MiB come from the heap instead of fresh ``mmap`` pages, and the heap is not trimmed
    (``mallopt(M_MMAP_THRESHOLD, 32 MiB)``, ``mallopt(M_TRIM_THRESHOLD, 1 GiB)``).

    Without it, whether an activation of a few MiB that a CPU forward frees goes back to the OS
    (and the next call faults its pages in again) depends on glibc's adaptive thresholds, i.e.
    on the process's allocation history. Measured with ``bench/cpu_page_faults.py`` on this
    project's 2-core CPU (a VM, where a page fault costs ~1.5 us; results in
    ``bench/results/cpu-amd-epyc-2-cores-page-faults.md``), full-size BHaRNet-E single-clip
    inference: with glibc's defaults the fused model (:func:`fuse_for_inference`) took 0 to 16k
    page faults per call depending on the process, 91-111 ms per call; with this call 0-50
    faults and 89-94 ms. The cost: the process keeps its peak heap resident.
    Returns True when applied; False where there is no glibc ``mallopt`` (macOS, Windows,
    musl), and nothing changes there."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, 1 << 30))
