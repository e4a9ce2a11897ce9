"""What every benchmark row names: the device, the software versions and the run's time."""
from __future__ import annotations

import datetime
import os
import platform
import re

import torch

from .. import __version__


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def versions(device: torch.device) -> str:
    """``torch=...;triton=...;bharnet=...`` (plus ``cuda=...`` on a CUDA device)."""
    parts = [f"torch={torch.__version__}", f"triton={triton_version()}", f"bharnet={__version__}"]
    if device.type == "cuda":
        parts.append(f"cuda={torch.version.cuda}")
    return ";".join(parts)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def device_description(device: torch.device) -> str:
    """``cuda: NVIDIA H100 80GB HBM3`` or ``cpu: AMD EPYC (2 cores)``."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {_cpu_model()} ({os.cpu_count()} cores)"


def device_slug(description: str) -> str:
    """File-name form of a device description: ``cpu-amd-epyc-2-cores``."""
    cleaned = re.sub(r"\((r|tm)\)", "", description.lower())
    return re.sub(r"[^a-z0-9]+", "-", cleaned).strip("-")


def timestamp() -> str:
    """The run's time in UTC, ISO 8601 to the second (one value for all rows of a run)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
