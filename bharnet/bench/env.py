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


def cpu_name(cpuinfo: str) -> str:
    """The CPU's model name from the text of ``/proc/cpuinfo``; a name without a model number
    (virtual machines often report a bare ``AMD EPYC``) gets the CPU family and model, which
    tell generations apart (family 25 model 17 is Zen 4): rows from different CPUs must not
    share a results file. Empty when the text names no model."""
    def field(name):
        match = re.search(rf"^{name}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        return match.group(1).strip() if match else ""

    name = field("model name")
    if name and not re.search(r"\d", name) and field("cpu family") and field("model"):
        name = f"{name} family {field('cpu family')} model {field('model')}"
    return name


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = cpu_name(cpuinfo.read())
    except OSError:
        name = ""
    return name or platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    """``cuda: NVIDIA H100 80GB HBM3`` or ``cpu: AMD EPYC family 25 model 17 (2 cores)``."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {_cpu_model()} ({os.cpu_count()} cores)"


def device_slug(description: str) -> str:
    """File-name form of a device description: ``cpu-amd-epyc-family-25-model-17-2-cores``."""
    cleaned = re.sub(r"\((r|tm)\)", "", description.lower())
    return re.sub(r"[^a-z0-9]+", "-", cleaned).strip("-")


def timestamp() -> str:
    """The run's time in UTC, ISO 8601 to the second (one value for all rows of a run)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
