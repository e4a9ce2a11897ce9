"""The CUDA kernels, run on the CPU by ``cuda_host/cuda_emulation.h``.

No GPU runs here; ``bench/gpu_check.sh`` runs the CUDA tests on a lent one. These tests run the
kernels themselves (``csrc/*_kernels.cu``: tiling, shared memory, warp shuffles, tensor-core
fragments, launch configuration, dtype dispatch) through their launchers
(``csrc/cuda_launchers.h``), built by the host compiler against the emulation header, and
compare what they write with each launcher's contract written as float64 torch math: float64 at
1e-12, float32 at 1e-5, float16/bfloat16 by DESIGN.md section 6's rule against the same math
run in that dtype. Outputs are poisoned with NaN before each call, and the emulated dynamic
shared memory is NaN before each block, so unwritten elements and reads of unwritten shared
memory show. Every buffer sits between guard elements (NaN for inputs, so that reads past a
tensor's ends show in the results; a sentinel for outputs, checked after each test, so that
writes past them show). Each test runs under four schedules of the emulator (threads in order or
reversed, thread by thread or warps ahead). The bindings (``csrc/*_cuda.cpp``: input checks,
allocations, the launch sequence) need torch's CUDA build and are covered by the GPU tests only;
the DeTGC test runs the DeTGC binding's launch sequence. Also here: ``csrc/fast_divmod.h`` (the kernels' division by
multiplication) against plain division, for 4,154 divisors (``cuda_host/fast_divmod_check.cpp``),
and the emulator's own schedules and barriers (``cuda_host/emulator_check.cpp``).
"""
import concurrent.futures
import ctypes
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from op_testing import assert_close, assert_low_precision_rule

ROOT = Path(__file__).resolve().parents[2]
HOST_DIR = Path(__file__).resolve().parent / "cuda_host"
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
LOW = [torch.float16, torch.bfloat16]
ALL_DTYPES = [torch.float64, torch.float32, *LOW]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def _cuda_include() -> Path:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return Path(root) / "include"
    pytest.skip("the CUDA toolkit's headers were not found (CUDA_HOME or /usr/local/cuda)")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The launchers of every .cu file, built for the emulator into one library (~10 s)."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("the emulator needs g++ (GCC's ucontext and vector extensions)")
    out = tmp_path_factory.mktemp("cuda_emulation")
    flags = [cxx, "-std=c++20", "-O1", "-fPIC", "-w", f"-I{_cuda_include()}", f"-I{ROOT / 'csrc'}"]
    jobs = [[*flags, "-include", str(HOST_DIR / "cuda_emulation.h"), "-x", "c++", "-c", str(path),
             "-o", str(out / f"{path.name}.o")] for path in sorted((ROOT / "csrc").glob("*.cu"))]
    jobs.append([*flags, "-c", str(HOST_DIR / "emulated_launchers.cpp"), "-o", str(out / "launchers.o")])
    with concurrent.futures.ThreadPoolExecutor() as pool:
        for build in pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), jobs):
            assert build.returncode == 0, f"{' '.join(build.args)}\n{build.stdout}{build.stderr}"
    library = out / "libemulated.so"
    link = subprocess.run([cxx, "-shared", "-Wl,--no-undefined", *map(str, sorted(out.glob("*.o"))), "-o",
                           str(library)], capture_output=True, text=True)
    assert link.returncode == 0, link.stderr
    return ctypes.CDLL(str(library))


@pytest.fixture(params=["threads_in_order", "threads_reversed", "warps_ahead", "warps_ahead_reversed"])
def emu(library, request):
    """The library, its fibers resumed in thread order or in reverse, thread by thread or warps
    ahead (cuda_emulation.h; races show in one of them)."""
    library.emu_set_reverse(int(request.param.endswith("reversed")))
    library.emu_set_warps_ahead(int(request.param.startswith("warps_ahead")))
    return library


def test_fast_divmod_matches_division(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (the extension builds with it too)"
    binary = tmp_path / "fast_divmod_check"
    build = subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", "-o", str(binary),
                            str(HOST_DIR / "fast_divmod_check.cpp")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True)
    assert run.returncode == 0 and "ok FastDivmod" in run.stdout, run.stdout + run.stderr



def test_the_emulator_shows_races_keeps_fibers_apart_and_stops_diverging_barriers(tmp_path):
    """cuda_host/emulator_check.cpp: in each schedule a missing __syncthreads changes a result,
    warp shuffles sum right and each thread's stack survives the fiber switches; threads that
    wait at different barriers abort with the emulator's message."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("the emulator needs g++ (GCC's vector extensions)")
    binary = tmp_path / "emulator_check"
    build = subprocess.run([cxx, "-std=c++20", "-O1", "-w", f"-I{_cuda_include()}", f"-I{ROOT / 'csrc'}",
                            f"-I{HOST_DIR}", "-o", str(binary), str(HOST_DIR / "emulator_check.cpp")],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True)
    assert run.returncode == 0 and "ok emulator" in run.stdout, run.stdout + run.stderr
    diverged = subprocess.run([str(binary), "deadlock"], capture_output=True, text=True)
    assert diverged.returncode != 0 and "threads wait at different barriers" in diverged.stderr, diverged.stdout

# Every buffer a kernel sees sits between GUARD guard elements on each side. Inputs' guards are
# NaN (-7 in int32 tables, False in masks): a read past a tensor's ends brings NaN into the results
# (or a wild index). Outputs' guards hold a finite sentinel, so that any write past their ends
# (NaN included) changes one; the `guards` fixture checks them after each test.
GUARD = 64  # elements: keeps the base 128-byte aligned for 16-bit dtypes
_OUTPUT_GUARDS = {}  # data_ptr of each output tensor -> its whole buffer
_INPUT_BUFFERS = []  # the guarded input copies, kept alive until the test ends


def _input_guard(dtype):
    return float("nan") if dtype.is_floating_point else (False if dtype == torch.bool else -7)


def _output_sentinel(dtype):
    return 1234.5 if dtype.is_floating_point else -7777


def _guarded(shape, dtype, guard):
    """A tensor of ``shape`` in the middle of a buffer filled with ``guard``; (tensor, buffer)."""
    numel = math.prod(shape)
    buffer = torch.full((numel + 2 * GUARD,), guard, dtype=dtype)
    return buffer[GUARD:GUARD + numel].view(shape), buffer


@pytest.fixture(autouse=True)
def guards():
    _OUTPUT_GUARDS.clear()
    yield
    for buffer in _OUTPUT_GUARDS.values():
        edges = torch.cat([buffer[:GUARD], buffer[-GUARD:]])
        assert (edges == _output_sentinel(edges.dtype)).all(), "a kernel wrote outside an output buffer"
    for buffer in _INPUT_BUFFERS:
        edges = torch.cat([buffer[:GUARD], buffer[-GUARD:]])
        intact = edges.isnan() if edges.dtype.is_floating_point else edges == _input_guard(edges.dtype)
        assert intact.all(), "a kernel wrote next to an input buffer"
    _OUTPUT_GUARDS.clear()
    _INPUT_BUFFERS.clear()


def _ptr(t):
    """The pointer a kernel gets: outputs (made by _poisoned) as they are, other tensors (inputs)
    copied into a NaN-guarded buffer first."""
    if t is None:
        return None
    assert t.is_contiguous()
    if t.data_ptr() not in _OUTPUT_GUARDS:
        copy, buffer = _guarded(t.shape, t.dtype, _input_guard(t.dtype))
        copy.copy_(t)
        _INPUT_BUFFERS.append(buffer)
        t = copy
    return ctypes.c_void_p(t.data_ptr())


def _poisoned(shape, dtype):
    """An output buffer, NaN (-7 in an int32 table) inside its sentinel guards."""
    inner, buffer = _guarded(tuple(shape), dtype, _output_sentinel(dtype))
    inner.fill_(_input_guard(dtype))
    _OUTPUT_GUARDS[inner.data_ptr()] = buffer
    return inner


def _sizes(*values):
    return (ctypes.c_int64 * len(values))(*values)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(dtype, got, low, ref, names):
    """got: the kernel's results; low: the contract math in dtype (for 16-bit dtypes); ref: float64."""
    if dtype in LOW:
        assert_low_precision_rule(got, low, ref, names)
    else:
        assert_close(got, ref, TOLERANCE[dtype], names)


# Cross-attention ---------------------------------------------------------------------------------

def _attention(q, kv, mask, heads, dO):
    """The attention launchers' contract in q's dtype: (o, lse, dq, dkv, delta); masked keys get
    no weight, a query without valid keys o = 0, lse = +inf and zero gradients."""
    q, kv = q.detach().requires_grad_(), kv.detach().requires_grad_()
    N, Lq, D = q.shape
    Lk, d = kv.shape[1], D // heads
    heads_of = lambda t, L: t.reshape(N, L, heads, d).transpose(1, 2)
    k, v = heads_of(kv[..., :D], Lk), heads_of(kv[..., D:], Lk)
    valid = mask[:, None, None, :] if mask is not None else torch.ones(N, 1, 1, Lk, dtype=torch.bool)
    s = (heads_of(q, Lq) @ k.transpose(-1, -2)) * (1 / math.sqrt(d))
    s = s.masked_fill(~valid, -math.inf)
    top = s.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.where(valid, torch.exp(s - top), torch.zeros_like(s))
    total = e.sum(-1, keepdim=True)
    p = e / torch.where(total > 0, total, torch.ones_like(total))
    o = (p @ v).transpose(1, 2).reshape(N, Lq, D)
    lse = torch.where(total > 0, torch.log(total) + top, torch.full_like(total, math.inf)).squeeze(-1)
    dq, dkv = torch.autograd.grad(o, [q, kv], dO)
    delta = (dO * o.detach()).reshape(N, Lq, heads, d).sum(-1).transpose(1, 2)
    return [t.detach() for t in (o, lse, dq, dkv, delta)]


# (N, Lq, Lk, heads, d, mask): one block; query and key blocks past one tile with d in (32, 64]
# (two features per lane); d = 96 (four per lane) with Lk below a tile; a fully masked sequence;
# several 64-row blocks and 64-key steps of the tensor-core kernels (float16 / bfloat16, whose
# head tiles are 16, 64, 128, 16, 32, 64 and 128 wide in these cases), the first step's keys all
# masked; no keys at all.
ATTENTION_CASES = [(2, 5, 7, 2, 8, "random"), (1, 37, 45, 1, 40, "none"), (2, 17, 3, 3, 96, "random"),
                   (2, 4, 6, 2, 16, "one_sequence_masked"), (1, 70, 130, 2, 32, "random"),
                   (1, 66, 70, 1, 64, "first_step_masked"), (1, 65, 67, 1, 100, "none"), (2, 3, 0, 2, 8, "none")]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_attention_kernels(emu, case, dtype):
    """float16/bfloat16 take the tensor-core kernels here (an sm_90 device), float32/float64 the
    SIMT ones."""
    N, Lq, Lk, heads, d, _ = case
    assert emu.emu_attn_mma_usable(DTYPE_CODES[dtype], _sizes(N, Lq, Lk, heads * d, heads, d)) == (dtype in LOW)
    _check_attention(emu, case, dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES[:3], ids=str)
def test_attention_simt_kernels_take_16_bit_dtypes_before_sm80(emu, case, dtype):
    emu.emu_set_compute_major(7)
    try:
        N, Lq, Lk, heads, d, _ = case
        assert not emu.emu_attn_mma_usable(DTYPE_CODES[dtype], _sizes(N, Lq, Lk, heads * d, heads, d))
        _check_attention(emu, case, dtype)
    finally:
        emu.emu_set_compute_major(9)


def _check_attention(emu, case, dtype):
    N, Lq, Lk, heads, d, mask_kind = case
    D = heads * d
    g = torch.Generator().manual_seed(0)
    q, kv, dO = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in
                 ((N, Lq, D), (N, Lk, 2 * D), (N, Lq, D)))
    mask = None if mask_kind == "none" else torch.rand(N, Lk, generator=g) > 0.3
    if mask is not None:
        mask[:, -1] = True  # a valid key in every sequence, but:
    if mask_kind == "one_sequence_masked":
        mask[0] = False
    if mask_kind == "first_step_masked":
        mask[:, :64] = False
    qd, kvd, dOd = q.to(dtype), kv.to(dtype), dO.to(dtype)
    acc, shape = _acc(dtype), _sizes(N, Lq, Lk, D, heads, d)
    o, lse = _poisoned((N, Lq, D), dtype), _poisoned((N, heads, Lq), acc)
    assert emu.emu_attn_forward(DTYPE_CODES[dtype], shape, _ptr(qd), _ptr(kvd), _ptr(mask), _ptr(o), _ptr(lse)) == 0
    delta, dq, dkv = _poisoned((N, heads, Lq), acc), _poisoned((N, Lq, D), dtype), _poisoned((N, Lk, 2 * D), dtype)
    assert emu.emu_attn_backward(DTYPE_CODES[dtype], shape, _ptr(dOd), _ptr(qd), _ptr(kvd), _ptr(lse), _ptr(mask),
                                 _ptr(delta), _ptr(dq), _ptr(dkv)) == 0
    if Lk == 0:  # every query without keys: o = 0, lse = +inf, zero gradients
        assert (o == 0).all() and (lse == math.inf).all() and (dq == 0).all() and (delta == 0).all()
        return
    ref = _attention(qd.double(), kvd.double(), mask, heads, dOd.double())
    masked = torch.isinf(ref[1])
    assert torch.equal(torch.isinf(lse), masked) and (lse[masked] > 0).all(), "lse is +inf exactly without keys"
    if masked.any():
        assert (o.reshape(N, Lq, heads, d).transpose(1, 2)[masked] == 0).all()
        assert (dq.reshape(N, Lq, heads, d).transpose(1, 2)[masked] == 0).all()
    finite = [lse.masked_fill(masked, 0), ref[1].masked_fill(masked, 0)]
    got = [o, finite[0], dq, dkv, delta]
    expected = [ref[0], finite[1], *ref[2:]]
    low = None
    if dtype in LOW:
        low = _attention(qd, kvd, mask, heads, dOd)
        low[1] = low[1].masked_fill(masked, 0)
    _check(dtype, got, low, expected, ["o", "lse", "dq", "dkv", "delta"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_nan_scores_give_nan_rows(emu, dtype):
    """A query whose scores are NaN (a diverged weight) gets o = NaN and lse = NaN, as the
    reference does, and the other queries are untouched; in the SIMT kernel (float32) the lanes'
    maxima had disagreed (NaN skipped by some comparisons), so a warp-wide shuffle ran under
    divergent control flow, and the row came out as one without valid keys (o = 0)."""
    N, Lq, Lk, heads, d = 1, 5, 40, 2, 8
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(N, Lq, heads * d, generator=g), torch.randn(N, Lk, 2 * heads * d, generator=g)
    q[0, 2, 0] = math.nan  # head 0 of query 2
    qd, kvd = q.to(dtype), kv.to(dtype)
    o, lse = _poisoned((N, Lq, heads * d), dtype), _poisoned((N, heads, Lq), torch.float32)
    shape = _sizes(N, Lq, Lk, heads * d, heads, d)
    assert emu.emu_attn_forward(DTYPE_CODES[dtype], shape, _ptr(qd), _ptr(kvd), None, _ptr(o), _ptr(lse)) == 0
    assert o[0, 2, :d].isnan().all() and lse[0, 0, 2].isnan()
    bad = torch.zeros(N, Lq, heads * d, dtype=torch.bool)
    bad[0, 2, :d] = True
    assert torch.isfinite(o[~bad]).all() and torch.isfinite(lse[0, 1]).all() and torch.isfinite(lse[0, 0, [0, 1, 3, 4]]).all()


# DeTGC ----------------------------------------------------------------------------------------------

def _detgc_tables(T, stride, offsets, dtype, position_dtype, bounds_pass_grad):
    """det_tables' contract (cuda_launchers.h) in torch, built as the CUDA binding built it before
    the kernel existed: positions in ``position_dtype``, the CSR table by a stable sort of the
    rows [p0 | p1]. Returns (p0, p1, w, inside, row_start, src, coef)."""
    acc = _acc(dtype)
    T_out = (T - 1) // stride + 1
    tau = torch.tensor(offsets, dtype=position_dtype)
    r = torch.arange(T_out, dtype=position_dtype)[:, None] * stride + tau[None, :]
    p = r.clamp(0, T - 1)  # NaN stays NaN
    floor_p = p.floor()
    p0 = floor_p.nan_to_num(0).to(torch.int32)
    p1 = (p0 + 1).clamp(max=T - 1)
    w_x = (p - floor_p).to(dtype)
    inside = ((r >= 0) & (r <= T - 1)) if bounds_pass_grad else ((r > 0) & (r < T - 1))
    rows = torch.cat([p0.flatten(), p1.flatten()]).long()
    order = torch.sort(rows, stable=True).indices
    src = torch.arange(p0.numel(), dtype=torch.int32).repeat(2)[order]
    coef = torch.cat([(1 - w_x).flatten(), w_x.flatten()]).to(acc)[order]
    row_start = torch.searchsorted(rows[order], torch.arange(T + 1), out_int32=True)
    return p0, p1, w_x.to(acc), inside.to(acc), row_start, src, coef


def _emulated_detgc_tables(emu, T, stride, offsets, dtype, position_dtype, bounds_pass_grad):
    """The same tables from the det_tables kernel (outputs poisoned before the call)."""
    acc, E = _acc(dtype), len(offsets)
    T_out = (T - 1) // stride + 1
    tau = torch.tensor(offsets, dtype=position_dtype)
    p0, p1 = _poisoned((T_out, E), torch.int32), _poisoned((T_out, E), torch.int32)
    w, inside = _poisoned((T_out, E), acc), _poisoned((T_out, E), acc)
    row_start, src = _poisoned((T + 1,), torch.int32), _poisoned((2 * T_out * E,), torch.int32)
    coef = _poisoned((2 * T_out * E,), acc)
    assert emu.emu_det_tables(DTYPE_CODES[dtype], _sizes(1, 1, T, 1, 1, E, T_out), ctypes.c_int64(stride), _ptr(tau),
                              int(position_dtype == torch.float64), int(bounds_pass_grad), _ptr(p0), _ptr(p1),
                              _ptr(w), _ptr(inside), _ptr(row_start), _ptr(src), _ptr(coef)) == 0
    return p0, p1, w, inside, row_start, src, coef


def _position_dtypes(dtype):
    """The offsets' dtypes the binding accepts for x's dtype (float64 x: float64 only)."""
    return [torch.float64] if dtype == torch.float64 else [torch.float32, torch.float64]


def _detgc(x, weight, bias, dy, p0, p1, w, inside, T):
    """The DeTGC launchers' contract in x's dtype: y, dW, D, dtau and dx (k = c E + e)."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    w, inside = w.to(x.dtype), inside.to(x.dtype)
    x0, x1 = x[:, :, p0.long(), :], x[:, :, p1.long(), :]  # (B, C, T_out, E, V)
    xs = (1 - w)[None, None, :, :, None] * x0 + w[None, None, :, :, None] * x1
    y = torch.einsum("oce,bctev->botv", weight, xs) + bias[None, :, None, None]
    dW, dx = torch.autograd.grad(y, [weight, x], dy)
    D = torch.einsum("botv,bctev->oce", dy, inside[None, None, :, :, None] * (x1 - x0).detach())
    dtau = (weight.detach() * D).sum((0, 1))
    return [y.detach(), dW, D, dtau, dx]


# (B, C, T, V, O, E, stride, splits, offsets): stride 2 with odd sizes and uneven splits; O > 32
# (the 64-row tile) with positions at the bounds; offsets beyond the clamp range; one tap, one
# output frame and more splits than reduction steps (empty splits); O C > 256 (every thread of the
# dtau reduction has terms, dW over two blocks).
DETGC_CASES = [(3, 5, 7, 5, 3, 3, 2, 5, [-1.3, 0.4, 2.7]), (2, 3, 6, 7, 40, 4, 1, 1, [-2.0, -2 / 3, 2 / 3, 2.0]),
               (1, 2, 5, 3, 17, 2, 1, 4, [0.25, -7.5]), (2, 4, 3, 2, 5, 1, 3, 7, [0.5]),
               (1, 12, 5, 3, 24, 2, 1, 3, [0.3, -1.2])]


# (T, stride, offsets): DETGC_CASES' and: more rows than the kernel's 256 threads (its running
# sum in chunks) with a tap clamped to the last row for most t'; a NaN offset (rows p0 = 0, p1 = 1,
# w NaN); a single frame (p0 = p1 = 0); no taps (every row empty).
TABLE_CASES = [(c[2], c[6], c[8]) for c in DETGC_CASES] + [(600, 1, [-3.7, 0.2, 250.5]), (9, 2, [math.nan, 0.5]),
                                                          (1, 1, [0.3, -2.0]), (5, 1, [])]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", TABLE_CASES, ids=str)
def test_detgc_tables(emu, case, dtype):
    T, stride, offsets = case
    for position_dtype in _position_dtypes(dtype):
        for bounds_pass_grad in (False, True):
            got = _emulated_detgc_tables(emu, T, stride, offsets, dtype, position_dtype, bounds_pass_grad)
            expected = _detgc_tables(T, stride, offsets, dtype, position_dtype, bounds_pass_grad)
            for name, a, b in zip(["p0", "p1", "w", "inside", "row_start", "src", "coef"], got, expected):
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                           msg=lambda m: f"{name} ({position_dtype}, {bounds_pass_grad}): {m}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", DETGC_CASES, ids=str)
def test_detgc_kernels(emu, case, dtype):
    """The launch sequence of the CUDA binding: tables, forward; tables with the CSR part,
    parameter-gradient partials, their sums, dx."""
    B, C, T, V, O, E, stride, splits, offsets = case
    T_out, acc = (T - 1) // stride + 1, _acc(dtype)
    g = torch.Generator().manual_seed(0)
    x, weight, bias, dy = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape in
                           ((B, C, T, V), (O, C, E), (O,), (B, O, T_out, V)))
    position_dtype = _position_dtypes(dtype)[0]
    tables = _emulated_detgc_tables(emu, T, stride, offsets, dtype, position_dtype, False)
    expected_tables = _detgc_tables(T, stride, offsets, dtype, position_dtype, False)
    assert all(torch.equal(a, b) for a, b in zip(tables, expected_tables))
    p0, p1, w, inside, row_start, src, coef = tables
    code, shape = DTYPE_CODES[dtype], _sizes(B, C, T, V, O, E, T_out)
    y = _poisoned((B, O, T_out, V), dtype)
    assert emu.emu_det_forward(code, shape, _ptr(x), _ptr(p0), _ptr(p1), _ptr(w), _ptr(weight), _ptr(bias),
                               _ptr(y)) == 0
    parts = _poisoned((splits, O, 2 * C * E), acc)
    assert emu.emu_det_param_grad(code, shape, _ptr(dy), _ptr(x), _ptr(p0), _ptr(p1), _ptr(w), _ptr(inside),
                                  ctypes.c_int64(splits), _ptr(parts)) == 0
    dweight, dtau = _poisoned((O, C, E), dtype), _poisoned((E,), acc)
    assert emu.emu_det_finish_param_grad(code, shape, ctypes.c_int64(splits), _ptr(parts), _ptr(weight),
                                         _ptr(dweight), _ptr(dtau)) == 0
    dx = _poisoned((B, C, T, V), dtype)
    assert emu.emu_det_input_grad(code, shape, _ptr(dy), _ptr(weight), _ptr(row_start), _ptr(src), _ptr(coef),
                                  _ptr(dx)) == 0
    D = parts.sum(0)[:, C * E:].reshape(O, C, E)
    got = [y, dweight, D, dtau, dx]
    ref = _detgc(*(t.double() for t in (x, weight, bias, dy)), p0, p1, w.double(), inside.double(), T)
    low = _detgc(x, weight, bias, dy, p0, p1, w, inside, T) if dtype in LOW else None
    _check(dtype, got, low, ref, ["y", "dW", "D", "dtau", "dx"])


# CTR-GC ---------------------------------------------------------------------------------------------

def _ctr(v, topo, dy, G, dynamic):
    """The CTR-GC launchers' contract in v's dtype (topo cast to it, as the 16-bit kernels stage
    it): y, dv and dtopo (B, H, G, V, V); topo (B or 1, H, G, V, V)."""
    v, topo = v.detach().requires_grad_(), topo.to(v.dtype).detach().requires_grad_()
    B, H, C, T, V = v.shape
    vg = v.reshape(B, H, G, C // G, T, V)
    t = topo if dynamic else topo.expand(B, -1, -1, -1, -1)
    y = torch.einsum("bhgij,bhgctj->bgcti", t, vg).reshape(B, C, T, V)
    dv, = torch.autograd.grad(y, [v], dy)
    dtopo = torch.einsum("bgcti,bhgctj->bhgij", dy.reshape(B, G, C // G, T, V), vg.detach())
    return [y.detach(), dv, dtopo]


def _ctr_topology(A, q, k, weight, bias, alpha):
    """topo[b, h, g, i, j] = alpha (sum_r W[h, g, r] tanh(q[b, h, r, i] - k[b, h, r, j]) + bias[h, g]) + A[h, i, j]."""
    t = torch.tanh(q[:, :, :, :, None] - k[:, :, :, None, :])  # (B, H, R, V, V)
    return alpha * (torch.einsum("hgr,bhrij->bhgij", weight, t) + bias[None, :, :, None, None]) + A[None, :, None]


# (B, H, C, T, V, R, G, dynamic): the joint-tile widths of V = 7, 25 and 42 (NT 1-3) and 100 (NT 7,
# the 64-row backward tile), more rows than one tensor-core tile (C/G T > 128; 140: a last tile of
# 12 rows, not a multiple of 16), V > 128 (the SIMT GEMM for every dtype), static topologies
# (ST-GC: A shared by every sample, G = 1).
CTR_CASES = [(2, 3, 4, 5, 7, 2, 2, True), (2, 2, 8, 36, 25, 3, 2, True), (2, 2, 8, 35, 25, 3, 2, True),
             (1, 3, 6, 4, 42, 2, 3, True),
             (1, 1, 2, 3, 100, 2, 1, True), (1, 1, 2, 2, 131, 1, 1, True), (2, 3, 4, 6, 25, 1, 1, False)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CTR_CASES, ids=str)
def test_ctr_kernels(emu, case, dtype):
    """float16/bfloat16 with V <= 128 take the tensor-core kernels here (an sm_90 device), the rest
    the SIMT GEMM."""
    B, H, C, T, V, R, G, dynamic = case
    usable = emu.emu_ctr_mma_usable(DTYPE_CODES[dtype], _sizes(B, H, C, T, V, R, G, int(dynamic)))
    assert usable == (dtype in LOW and V <= 128)
    _check_ctr(emu, case, dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_ctr_simt_kernels_take_16_bit_dtypes_before_sm80(emu, dtype):
    emu.emu_set_compute_major(7)
    try:
        assert not emu.emu_ctr_mma_usable(DTYPE_CODES[dtype], _sizes(*CTR_CASES[1][:7], 1))
        _check_ctr(emu, CTR_CASES[1], dtype)
    finally:
        emu.emu_set_compute_major(9)


def _check_ctr(emu, case, dtype):
    B, H, C, T, V, R, G, dynamic = case
    acc = _acc(dtype)
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64)
    v, dy = rand(B, H, C, T, V).to(dtype), rand(B, C, T, V).to(dtype)
    A, q, k, weight, bias, alpha = rand(H, V, V), rand(B, H, R, V), rand(B, H, R, V), rand(H, G, R), rand(H, G), rand(1)
    code, shape = DTYPE_CODES[dtype], _sizes(B, H, C, T, V, R, G, int(dynamic))
    if dynamic:
        inputs = [t.to(acc) for t in (A, q, k, weight, bias, alpha)]
        topo = _poisoned((B, H, G, V, V), acc)
        assert emu.emu_ctr_topology(code, shape, *map(_ptr, inputs), _ptr(topo)) == 0
        assert_close([topo], [_ctr_topology(*(t.double() for t in inputs))], TOLERANCE[acc], ["topology"])
    else:
        topo = A.to(acc)[None, :, None]
    y = _poisoned((B, C, T, V), dtype)
    assert emu.emu_ctr_forward(code, shape, _ptr(v), _ptr(topo), _ptr(y)) == 0
    dv, dtopo = _poisoned((B, H, C, T, V), dtype), _poisoned((B, H, G, V, V), acc)
    assert emu.emu_ctr_backward(code, shape, _ptr(dy), _ptr(v), _ptr(topo), _ptr(dv), _ptr(dtopo)) == 0
    ref = _ctr(v.double(), topo.double(), dy.double(), G, dynamic)
    low = _ctr(v, topo, dy, G, dynamic) if dtype in LOW else None
    _check(dtype, [y, dv, dtopo], low, ref, ["y", "dv", "dtopo"])


# (B, H, V, R, G): V = 7 and 25 (one column sweep, fewer columns than lanes), 42, 131 (two sweeps
# of 128 columns), one relation channel and group, one joint, 12 groups (two P sweeps of 8; H G R
# = 288 > 256: two blocks of P sums).
REFINEMENT_CASES = [(2, 3, 7, 2, 2), (2, 2, 25, 3, 4), (1, 3, 42, 8, 3), (2, 1, 131, 2, 1), (3, 2, 5, 1, 1),
                    (2, 1, 1, 2, 3), (1, 3, 9, 8, 12)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", REFINEMENT_CASES, ids=str)
def test_ctr_refinement_grad(emu, case, dtype):
    """The refinement's gradients from dL/dtopo (in acc, whatever the features' dtype) against
    float64 autograd through the topology formula."""
    B, H, V, R, G = case
    acc = _acc(dtype)
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64).to(acc)
    A, q, k, weight, bias, alpha, dtopo = (rand(H, V, V), rand(B, H, R, V), rand(B, H, R, V), rand(H, G, R),
                                           rand(H, G), rand(1), rand(B, H, G, V, V))
    outputs = [_poisoned(t.shape, acc) for t in (A, q, k, weight, bias, alpha)]
    scratch = _poisoned((H * G * R + H * G + B * H * G * R,), acc)
    shape = _sizes(B, H, G, 1, V, R, G, 1)
    assert emu.emu_ctr_refinement_grad(DTYPE_CODES[dtype], shape, *map(_ptr, (dtopo, q, k, weight, bias, alpha)),
                                       *map(_ptr, outputs), _ptr(scratch)) == 0
    inputs = [t.double().requires_grad_() for t in (A, q, k, weight, bias, alpha)]
    expected = torch.autograd.grad(_ctr_topology(*inputs), inputs, dtopo.double())
    assert_close(outputs[:5], expected[:5], TOLERANCE[acc], ["dA", "dq", "dk", "dweight", "dbias"])
    # dalpha = sum W P + sum bias S (P = dweight / alpha, S = dbias / alpha) may cancel: its error
    # is measured against the sum of the terms' magnitudes.
    P, S = expected[3] / alpha.double(), expected[4] / alpha.double()
    magnitude = (weight.double() * P).abs().sum() + (bias.double() * S).abs().sum()
    error = ((outputs[5].double() - expected[5]).abs() / magnitude).item()
    assert error < TOLERANCE[acc], f"dalpha: error {error:.2e} relative to the terms' magnitudes"
    assert torch.isfinite(outputs[5]).all()
