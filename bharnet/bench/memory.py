"""Memory measurements: peak memory of one call and bytes saved for backward.

Peak memory is reported *above the memory in use just before the call* (so it excludes the
inputs, the model and the optimizer state that exist anyway):

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
* CPU: growth of the process's resident set (``VmHWM`` in ``/proc/self/status``, reset by
  writing ``5`` to ``/proc/self/clear_refs``) after ``malloc_trim(0)`` has returned freed heap
  memory to the system. It is an estimate (the allocator may reuse pages) and is unavailable
  where Linux's ``/proc`` interface is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from typing import Callable, Dict, Optional, Tuple

import torch

MIB = float(1 << 20)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(match.group(1))


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def _reset_rss_peak() -> bool:
    """Return freed heap memory to the system and reset the RSS high-water mark; False where
    the kernel offers no ``/proc/self/clear_refs``."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes of memory ``fn()`` needs at its peak above what was in use before the call
    (None where it cannot be measured: CPU without Linux ``/proc``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    if not _reset_rss_peak():
        return None
    before = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages that autograd saves for backward while ``fn()`` runs.

    Every tensor saved by any autograd node (built-in, custom ``autograd.Function`` or custom
    op) passes through ``saved_tensors_hooks``; tensors sharing a storage count once."""
    storages: Dict[Tuple[str, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    del out
    return sum(storages.values())
