"""Helpers shared by the op tests: run an op forward and backward, compare its results with a
reference (relative errors, DESIGN.md section 6's low-precision rule), check that a CPU kernel
is independent of the thread count.

Imported as a top-level module: ``tests/ops`` has no ``__init__.py``, so pytest's default
(prepend) import mode puts this folder on ``sys.path`` for the tests in it.
"""
import torch


def is_float_tensor(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def forward_backward(fn, inputs, dy):
    """[y, dL/d input for every input] with L = <y, dy>; every input is a tensor."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return [y, *torch.autograd.grad(y, leaves, dy.to(y.dtype))]


def run(fn, inputs, seed=1, **kwargs):
    """[y, grads of every floating-point tensor input in order...] for a fixed random upstream
    gradient; other inputs (None, ints, bool masks) are passed through."""
    args = [t.detach().requires_grad_() if is_float_tensor(t) else t for t in inputs]
    leaves = [t for t in args if is_float_tensor(t)]
    y = fn(*args, **kwargs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


def cast(inputs, dtype, device="cpu"):
    return [t.to(device=device, dtype=dtype) for t in inputs]


def as_float64(inputs, device=None):
    """Floating-point tensors in float64 (on ``device`` if given); other inputs unchanged."""
    return [t.to(device=device, dtype=torch.float64) if is_float_tensor(t) else t for t in inputs]


def to_device(inputs, device):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs]


def rel_err(x, ref):
    """``||x - ref|| / ||ref||`` in float64 (on the CPU, so x and ref may be on different devices)."""
    x, ref = x.double().cpu(), ref.double().cpu()
    return ((x - ref).norm() / ref.norm()).item()


def rel_or_abs_err(x, ref):
    """Relative error, or the absolute one where the reference is exactly zero."""
    diff = (x.double() - ref.double()).norm()
    norm = ref.double().norm()
    return (diff / norm).item() if norm > 0 else diff.item()


def assert_close(got, expected, tolerance, names, err=rel_err):
    """Every result finite and within ``tolerance`` (strictly) of its reference."""
    assert len(got) == len(expected) and len(names) >= len(got), (len(got), len(expected))
    for name, x, r in zip(names, got, expected):
        assert torch.isfinite(x).all(), name
        e = err(x, r)
        assert e < tolerance, f"{name}: relative error {e:.2e} >= {tolerance:.0e}"


def assert_low_precision_rule(got, same_precision, expected, names, rounding=True, floor=None,
                              err=rel_err):
    """DESIGN.md section 6: each result's error against the float64 reference ``expected`` is at
    most 2x (the output, first) or 3x (gradients) the error of the reference run in the same
    precision (``same_precision``); plus, with ``rounding``, the error of rounding the exact
    result to the result's dtype (no result stored in that dtype can do better); and never
    below ``floor[result dtype]`` where ``floor`` names that dtype."""
    assert len(got) == len(same_precision) == len(expected) and len(names) >= len(got)
    floor = floor or {}
    for index, (name, x, r_low, r) in enumerate(zip(names, got, same_precision, expected)):
        bound = (2.0 if index == 0 else 3.0) * err(r_low, r)
        if rounding:
            bound += err(r.to(x.dtype), r)
        bound = max(bound, floor.get(x.dtype, 0.0))
        assert torch.isfinite(x).all(), name
        assert torch.isfinite(r_low).all(), f"{name}: the same-precision reference overflowed (no bound)"
        e = err(x, r)
        assert e <= bound, f"{name} ({x.dtype}): error {e:.2e} > bound {bound:.2e}"


def assert_independent_of_thread_count(compute, names):
    """``compute()`` on 1 and on max(2, current) threads gives bitwise identical results."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compute()
        torch.set_num_threads(max(2, threads))
        many = compute()
    finally:
        torch.set_num_threads(threads)
    assert len(one) == len(many)
    for name, a, b in zip(names, one, many):
        assert torch.equal(a, b), name


def wide_supported() -> bool:
    """Whether the C++ CPU kernels can take their 64-byte (AVX-512) path on this CPU."""
    from bharnet import _ext

    _ext.load()
    previous = torch.ops.bharnet.cpu_vector_bytes(0)
    try:
        torch.ops.bharnet.cpu_vector_bytes(64)
    except RuntimeError:
        return False
    torch.ops.bharnet.cpu_vector_bytes(previous)
    return True



_COMPILE_FOR_SM90 = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module_name, jobs = json.loads(sys.stdin.read())
module = importlib.import_module(module_name)
for name, pointers, constexprs in jobs:
    kernel = getattr(module, name)
    options = {key: constexprs.pop(key) for key in ("num_warps", "num_stages") if key in constexprs}
    constexprs = {arg: getattr(triton.language, value[3:]) if isinstance(value, str) and value.startswith("tl.")
                  else value for arg, value in constexprs.items()}
    signature = {arg: ("constexpr" if arg in constexprs else "*" + pointers[arg] if arg in pointers else "i32")
                 for arg in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(arg),): value for arg, value in constexprs.items()})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    assert ".entry " + name in ptx, name
print(len(jobs), "compiled")
"""


def compile_for_sm90(module, jobs):
    """Compile Triton kernels of ``module`` (e.g. ``"bharnet.kernels.batch_norm"``) for an H100
    (sm_90) without a GPU, as the GPU machine's Triton would: catches what the interpreter
    accepts but the compiler rejects. ``jobs``: (kernel name, {pointer argument: element type
    such as "bf16"}, {constexpr argument: value, also integers Triton specialises such as a
    size of 1; a Triton dtype as its name, e.g. "tl.bfloat16"; and the launch options
    "num_warps" and "num_stages"}); every other argument is an int32. Runs in a subprocess
    without TRITON_INTERPRET (which makes ``triton.jit`` return interpreted functions)."""
    import json
    import os
    import subprocess
    import sys

    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], input=json.dumps([module, jobs]),
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"{len(jobs)} compiled", result.stdout
