"""Argument checks shared by the op wrappers (one wording for every op)."""
from __future__ import annotations

import torch


def is_int(value) -> bool:
    """An integer (Python's or numpy's: anything with ``__index__``), not a bool."""
    return hasattr(value, "__index__") and not isinstance(value, bool) and getattr(value, "dtype", None) != bool


def expect_tensor(op: str, name: str, t, shape, ref: torch.Tensor, ref_name: str,
                  floating: bool = True) -> None:
    """Raise unless ``t`` is a tensor of ``shape`` on ``ref``'s device (and floating point)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {ref.device} like {ref_name}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")


# Input dtypes of the Triton kernels (float32 accumulation; float64 inputs accumulate in float64).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the Triton kernels accumulate ``x`` in: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expect_triton_dtype(op: str, name: str, t: torch.Tensor) -> None:
    """Raise unless the Triton kernels take ``t``'s dtype on its device: float16, bfloat16,
    float32 or float64, and no bfloat16 on CPU, where the Triton interpreter's bf16 ``tl.dot``
    is wrong."""
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: the triton backend takes {name} in float16, bfloat16, float32 or "
                        f"float64, got {t.dtype}")
    if t.dtype == torch.bfloat16 and t.device.type == "cpu":
        raise TypeError(f"{op}: the triton backend cannot run bfloat16 on CPU (the Triton "
                        "interpreter's bf16 tl.dot is wrong); use float32 or CUDA")


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether the 4-D ``x`` (N, C, T, V) is channels-last (memory (N, T, V, C)) and not also
    contiguous: the layout in which the CPU kernels of the ``cpp`` backend take and return
    features natively (what a convolution with channels-last weights returns)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def channels_innermost(x: torch.Tensor) -> bool:
    """Whether ``x``'s channels (dim 1) are its innermost dimension in memory and it is not
    contiguous: channels-last, or a view of a channels-last tensor (oneDNN's own layout)."""
    return x.dim() >= 2 and not x.is_contiguous() and x.stride(1) == 1


def nn_layer_kernel_applies(x: torch.Tensor) -> bool:
    """Whether an ``nn`` layer's call on ``x`` (a float32/float64 CPU tensor) may take a C++
    kernel whose autograd is a C++ ``torch::autograd::Function`` (1x1 convolution, batch norm):
    not for channels innermost in memory (channels-last or a view of it: oneDNN's own layout is
    the fast one), nor under CPU autocast (whose dtype rules the ``F`` functions follow),
    ``torch.func`` transforms or forward-mode AD (which such a Function cannot run)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not channels_innermost(x)
            and not torch.is_autocast_enabled("cpu") and not torch._C._are_functorch_transforms_active()
            and torch.autograd.forward_ad._current_level < 0)
