"""``bharnet bench``: options, the order of measurements, the time budget and the report."""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from ..fast import keep_freed_memory
from ..models import MODELS
from ..ops import use_backend
from ..ops._backend import resolve
from . import env
from .baselines import Rejected
from .memory import MIB, peak_memory, saved_tensor_bytes
from .model_cases import MODEL_NAMES, ModelCase, make_step, model_cases
from .op_cases import FULL_BATCH, OP_FUNCTIONS, OpCase, full_cases, quick_cases
from .providers import (COMPILE_MODES, DTYPES, Provider, autocast, backend_skip_reason, compiled,
                        dtype_skip_reason, model_providers, providers)
from .report import METRICS, NOGRAD, OP_MODES, Note, Row, format_table, write_csv, write_plots
from .roofline import copy_bandwidth, gbps, roofline_percent, tensor_bytes
from .timing import TimerSettings, first_call_seconds, interleaved, measure

COMPILE_SCOPES = ("ops", "infer", "train")
INPUT_SETS = 3  # fresh inputs: op calls cycle through this many input sets
# A job is started only with at least this many seconds of --budget left.
MIN_BUDGET_S = {"op": 0.0, "op+compile": 10.0, "model": 0.0, "model+compile": 60.0}

DESCRIPTION = """\
Side-by-side benchmark: reference eager, torch.compile, every available bharnet backend and
each backend under torch.compile (for cross_attention also PyTorch's SDPA, eager and compiled);
per op (fwd, bwd, fwd+bwd at the NTU shapes, and the forward under torch.no_grad:
fwd-nograd) and per model (training step, single-clip inference), in fp32 and bf16 autocast."""

EPILOG = """\
Timing: the providers of one case side by side, their calls in alternating blocks (so that a
drift of the machine's speed reaches them alike; each compiled model provider is timed alone);
CPU, repeated wall-clock calls (median, 20th/80th percentiles) after warm-up, with
freed memory kept by glibc's malloc (bharnet.fast.keep_freed_memory; config malloc=kept); CUDA,
CUDA events with the L2 cache flushed before each call (triton.testing.do_bench's protocol).
Calls cycle through several input sets. Compile time (the first call) is reported apart.
Memory: peak above what was in use before the call (CUDA allocator, or process RSS on CPU)
and, per op, bytes saved for backward. Ops get achieved GB/s (inputs read once, outputs
written once), memory-bound ops also as % of the copy bandwidth measured in the same run;
attention gets TFLOP/s.

Ratios ("vs eager", "vs compile") are against each op's baseline, eager and compiled: the
PyTorch reference and its torch.compile, except cross_attention, measured against "sdpa"
(the same layer with nn.Linear projections around scaled_dot_product_attention, PyTorch
choosing the SDPA backend) and "sdpa+compile". "sdpa-<backend>" forces one SDPA backend (math,
efficient, flash, cudnn); one that rejects the inputs is reported as skipped.

Op shapes: the NTU models' (bharnet/bench/op_cases.py) at --op-batch sequences per call: 128
on CUDA, 2 on CPU (one clip of 2 persons, the single-clip inference shapes).

--quick: tiny op shapes, the "small" preset at 2 clips x 2 persons, T=16, fp32 only, and
torch.compile for the first shape of each op only (a whole model's first compile costs a
minute or more on CPU); one to two minutes on 2 CPU cores, capped by --budget 150. Options
given explicitly override these.

Models run with eager, compile, and "auto" (each op on the fastest bharnet backend available
for the device, as bharnet.ops.use_backend("auto") picks; its choice is in the rows' config).

Output: the table (stdout), CSV rows appended to RESULTS_DIR/<device>.csv, PNG plots in
PLOTS_DIR. Exit status 0, 1 if a provider failed (its error is in the table), 2 for bad options."""


def _names(valid, what):
    def parse(text: str) -> List[str]:
        items = [] if text == "none" else [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in valid]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; expected a comma list of "
                                             f"{list(valid)} or 'none'")
        return items
    return parse


def positive(kind):
    """An argparse type: ``kind(text)``, refused unless it is > 0."""
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bharnet bench`` options to ``parser`` (description and epilog included)."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--quick", action="store_true", help="small and fast: see below")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="default: cuda when available, else cpu")
    parser.add_argument("--ops", type=_names(OP_FUNCTIONS, "op"), default=list(OP_FUNCTIONS),
                        help=f"comma list or 'none' (default: {','.join(OP_FUNCTIONS)})")
    parser.add_argument("--models", type=_names(MODELS, "model"), default=list(MODEL_NAMES),
                        help=f"comma list or 'none' (default: {','.join(MODEL_NAMES)})")
    parser.add_argument("--dtypes", type=_names(DTYPES, "dtype"), default=None,
                        help="fp32 and/or bf16 (bf16: autocast, parameters stay fp32; the fused "
                             "inference model is converted to bf16); "
                             "default fp32,bf16 (--quick: fp32)")
    parser.add_argument("--batch", type=positive(int), default=None,
                        help="clips per training step (default 32 on CUDA; on CPU 1: a full "
                             "BHaRNet-E step at 32 clips needs more than 24 GiB there; --quick: 2)")
    parser.add_argument("--op-batch", type=positive(int), default=None,
                        help="sequences per op call at the full op shapes (default 128 on CUDA; on "
                             "CPU 2: one clip of 2 persons, as in single-clip inference)")
    parser.add_argument("--persons", type=positive(int), default=2, help="persons per clip (default 2)")
    parser.add_argument("--threads", type=positive(int), default=None,
                        help="CPU threads for torch (default: torch's default, one per core)")
    parser.add_argument("--frames", type=positive(int), default=None, help="T (default 64; --quick: 16)")
    parser.add_argument("--preset", choices=["full", "small"], default=None,
                        help="model preset (default full; --quick: small)")
    parser.add_argument("--compile", dest="compile_scopes", type=_names(COMPILE_SCOPES, "compile scope"),
                        default=None, metavar="SCOPES",
                        help="where to add torch.compile providers: comma list of ops, infer, train, "
                             "or 'none' (default ops,infer,train; --quick: ops)")
    parser.add_argument("--compile-mode", dest="compile_modes", action="append", choices=COMPILE_MODES,
                        default=None, help="torch.compile mode; repeat for several (default: default). "
                                           "max-autotune and reduce-overhead compile for minutes")
    parser.add_argument("--budget", type=positive(float), default=None, metavar="SECONDS",
                        help="start no new measurement after this many seconds; the rest is "
                             "reported as skipped (default: none; --quick: 150)")
    parser.add_argument("--results-dir", default=os.path.join("bench", "results"),
                        help="CSV directory (default: bench/results under the current directory)")
    parser.add_argument("--plots-dir", default=os.path.join("bench", "plots"),
                        help="PNG directory (default: bench/plots under the current directory)")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random inputs (default 0)")


@dataclass
class Options:
    """The parsed options with the full or --quick defaults filled in."""

    device: torch.device
    quick: bool
    ops: List[str]
    models: List[str]
    dtypes: List[str]
    batch: int
    op_batch: int
    persons: int
    frames: int
    preset: str
    compile_scopes: List[str]
    compile_modes: List[str]
    budget: Optional[float]
    settings: TimerSettings
    copy_bytes: int
    keep_freed_memory: bool = False


def resolve_options(args: argparse.Namespace) -> Options:
    """Fill the quick/full defaults; raise ValueError for an unusable device."""
    if args.device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
        raise ValueError(f"--device cuda: CUDA is not available (torch {torch.__version__}, {build})")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    quick = args.quick

    def pick(value, full, fast):
        return value if value is not None else (fast if quick else full)

    if quick and args.op_batch is not None:
        raise ValueError("--op-batch sets the batch of the full op shapes; --quick runs its own small ones")
    op_batch = args.op_batch or (FULL_BATCH if device.type == "cuda" else 2)
    if device.type == "cuda":
        settings, copy_bytes = TimerSettings(warmup=3, min_reps=10, min_time_s=0.1), 1 << 30
    elif quick:
        settings, copy_bytes = TimerSettings(warmup=1, min_reps=3, min_time_s=0.1), 64 << 20
    else:
        settings, copy_bytes = TimerSettings(warmup=2, min_reps=5, min_time_s=0.5), 256 << 20
    train_batch = pick(args.batch, 32 if device.type == "cuda" else 1, 2)  # 32 clips on CPU: > 24 GiB
    return Options(device, quick, args.ops, args.models, pick(args.dtypes, ["fp32", "bf16"], ["fp32"]),
                   train_batch, op_batch, args.persons, pick(args.frames, 64, 16),
                   pick(args.preset, "full", "small"),
                   pick(args.compile_scopes, list(COMPILE_SCOPES), ["ops"]),
                   args.compile_modes or ["default"], pick(args.budget, None, 150.0),
                   settings, copy_bytes)


@dataclass
class Job:
    """Providers measured side by side (their calls interleaved) on one case and dtype;
    ``phase`` orders jobs (cheap and essential first)."""

    phase: int
    what: str
    providers: List[Provider]
    kind: str
    work: Callable[[], List[Row]] = field(repr=False)

    @property
    def names(self) -> str:
        return ",".join(p.name for p in self.providers)

    @property
    def compiles(self) -> bool:
        return any(p.compile_mode is not None for p in self.providers)


class Bench:
    """Runs jobs, collecting rows and notes; appends each job's rows to the CSV at once."""

    def __init__(self, opts: Options, csv_path: str):
        self.opts = opts
        self.device = opts.device
        self.csv_path = csv_path
        self.description = env.device_description(self.device)
        self.versions = env.versions(self.device)
        self.stamp = env.timestamp()
        extra = [f"threads={torch.get_num_threads()}"] if self.device.type == "cpu" else []
        if self.device.type == "cpu" and opts.keep_freed_memory:
            extra.append("malloc=kept")
        self.extra_config = ";".join(extra + (["run=quick"] if opts.quick else []))
        self.rows: List[Row] = []
        self.notes: List[Note] = []
        self.copy_gbps: Optional[float] = None
        self.failed = False

    def row(self, op, provider, mode, metric, x, config, p50, p20=None, p80=None) -> Row:
        config = ";".join(c for c in (config, self.extra_config) if c)
        return Row(op, provider, mode, metric, METRICS[metric], x, p50,
                   p50 if p20 is None else p20, p50 if p80 is None else p80,
                   config, self.description, self.versions, self.stamp)

    # --- copy bandwidth -----------------------------------------------------------------
    def measure_copy(self) -> List[Row]:
        nbytes = self.opts.copy_bytes
        t = copy_bandwidth(self.device, nbytes, self.opts.settings)
        moved = 2 * nbytes
        self.copy_gbps = gbps(moved, t.p50)
        return [self.row("copy", "torch", "copy", "bandwidth", f"{nbytes >> 20} MiB", "dtype=fp32",
                         self.copy_gbps, gbps(moved, t.p80), gbps(moved, t.p20))]

    # --- ops ------------------------------------------------------------------------------
    def op_job(self, case: OpCase, dtype: str, providers: List[Provider]) -> List[Row]:
        """Compile time (compiled providers), then fwd, bwd and fwd+bwd of every provider and
        fwd-nograd of the uncompiled ones (report.OP_MODES),
        interleaved (:func:`interleaved`), on the same input sets: time, GB/s, % of copy
        bandwidth (memory-bound ops), TFLOP/s (ops with a FLOP count); then per provider the
        peak memory of fwd+bwd and the bytes saved by fwd. A provider that fails or rejects
        the inputs (on its first call, or later) is noted and left out."""
        device, config, what = self.device, case.config(dtype), f"{case.op} {case.x} {dtype}"
        sets = [case.make(device, DTYPES[dtype]) for _ in range(INPUT_SETS)]
        grads_out: List[torch.Tensor] = []
        index = itertools.cycle(range(INPUT_SETS))

        def calls(forward):
            def fwd():
                forward(sets[next(index)])

            def fwd_bwd():
                i = next(index)
                torch.autograd.grad(forward(sets[i]), sets[i].grads, grads_out[i])

            def bwd_setup():
                i = next(index)
                return forward(sets[i]), i

            def bwd(state):
                y, i = state
                torch.autograd.grad(y, sets[i].grads, grads_out[i])

            def fwd_nograd():
                with torch.no_grad():
                    forward(sets[next(index)])
            return {"fwd": (fwd, None), "bwd": (bwd, bwd_setup), "fwd+bwd": (fwd_bwd, None),
                    NOGRAD: (fwd_nograd, None)}

        rows, ready = [], []
        for provider in providers:
            first = self._provider_result(provider, what,
                                          lambda p=provider: self._op_forward(case, dtype, p, sets, grads_out))
            if first is None:
                continue
            forward, first_s = first
            if provider.compile_mode is not None:
                rows.append(self.row(case.op, provider.name, "fwd+bwd", "compile", case.x, config, first_s))
            ready.append((provider, forward, calls(forward)))
        if not ready:
            return rows
        args_bytes, out_bytes = tensor_bytes(sets[0].args), grads_out[0].nbytes
        moved = {"fwd": args_bytes + out_bytes,
                 "bwd": out_bytes + args_bytes + tensor_bytes(sets[0].grads)}
        moved["fwd+bwd"] = moved["fwd"] + moved["bwd"]
        moved[NOGRAD] = moved["fwd"]
        for mode in OP_MODES:
            timing = [entry for entry in ready if mode != NOGRAD or entry[0].compile_mode is None]
            timed = [(entry, t) for entry, t in zip(timing, self._timings([(p, c[mode]) for p, _, c in timing], what))
                     if t is not None]
            failed = {id(entry) for entry in timing} - {id(entry) for entry, _ in timed}
            ready = [entry for entry in ready if id(entry) not in failed]
            for (provider, _, _), t in timed:
                name = provider.name
                rows.append(self.row(case.op, name, mode, "time", case.x, config, t.p50, t.p20, t.p80))
                rate_times = (t.p50, t.p80, t.p20)  # a rate's p20 comes from the p80 time
                rows.append(self.row(case.op, name, mode, "gbps", case.x, config,
                                     *[gbps(moved[mode], ms) for ms in rate_times]))
                if case.memory_bound:
                    rows.append(self.row(case.op, name, mode, "roofline", case.x, config,
                                         *[roofline_percent(moved[mode], ms, self.copy_gbps) for ms in rate_times]))
                if case.fwd_flops:
                    flops = {"fwd": case.fwd_flops, "bwd": case.bwd_flops,
                             "fwd+bwd": case.fwd_flops + case.bwd_flops, NOGRAD: case.fwd_flops}[mode]
                    rows.append(self.row(case.op, name, mode, "tflops", case.x, config,
                                         *[flops / (ms * 1e-3) / 1e12 for ms in rate_times]))
        for provider, forward, c in ready:
            memory = self._provider_result(provider, what, lambda: (peak_memory(c["fwd+bwd"][0], device),
                                                                    saved_tensor_bytes(lambda: forward(sets[0]))))
            if memory is None:
                continue
            peak, saved = memory
            if peak is not None:
                rows.append(self.row(case.op, provider.name, "fwd+bwd", "peak_mem", case.x, config, peak / MIB))
            rows.append(self.row(case.op, provider.name, "fwd", "saved_mem", case.x, config, saved / MIB))
        return rows

    def _timings(self, calls: List[tuple], what: str) -> list:
        """The timings of ``calls`` ((provider, (fn, setup)) pairs), interleaved; if that fails,
        each provider's alone, and None (with a note) for a provider that fails alone."""
        try:
            return interleaved([call for _, call in calls], self.device, self.opts.settings)
        except Exception:
            return [self._provider_result(provider, what,
                                          lambda c=call: measure(c[0], self.device, self.opts.settings, c[1]))
                    for provider, call in calls]

    def _provider_result(self, provider: Provider, what: str, work: Callable):
        """``work()``, or None with a note when it rejects the inputs or fails (a failing
        provider is a result, not a crash)."""
        try:
            return work()
        except Rejected as reason:  # e.g. an SDPA backend without a kernel for these inputs
            self.notes.append(Note("skipped", provider.name, what, str(reason)))
        except Exception as error:
            self.failed = True
            self.notes.append(Note("error", provider.name, what, _one_line(error)))
        return None

    def _op_forward(self, case: OpCase, dtype: str, provider: Provider, sets, grads_out):
        """``(forward, seconds)``: the op's forward for ``provider`` and the time of a first
        fwd+bwd call (which compiles, for a compiled provider). A graph break under
        ``fullgraph=True`` is noted and the op is compiled again without ``fullgraph``."""
        try:
            return self._first_call(case, dtype, provider, sets, grads_out, fullgraph=True)
        except torch._dynamo.exc.Unsupported as error:
            if provider.compile_mode is None:
                raise
            self.notes.append(Note("warning", provider.name, f"{case.op} {case.x} {dtype}",
                                   f"graph break, so compiled without fullgraph=True: {_one_line(error)}"))
            torch._dynamo.reset()
            return self._first_call(case, dtype, provider, sets, grads_out, fullgraph=False)

    def _first_call(self, case, dtype, provider, sets, grads_out, fullgraph):
        """Build the forward, run fwd+bwd once and draw one output gradient per input set."""
        fn = compiled(case.function(provider.backend), provider.compile_mode, fullgraph)

        def forward(inputs):
            with autocast(self.device, dtype):
                return fn(*inputs.args)

        def first_call():
            y = forward(sets[0])
            if not grads_out:  # drawn once: every provider gets the same output gradients
                grads_out[:] = [torch.randn_like(y) for _ in sets]
            torch.autograd.grad(y, sets[0].grads, grads_out[0])

        with _cold_compile(provider, self.opts.quick):
            return forward, first_call_seconds(first_call, self.device)

    # --- models ---------------------------------------------------------------------------
    def model_job(self, case: ModelCase, dtype: str, providers: List[Provider]) -> List[Row]:
        """Compile time (compiled providers), then the step time of every provider, interleaved
        (:func:`interleaved`); then per provider the peak memory of one step and, for training
        without compile, the bytes its forward saves for the backward."""
        device, rows, ready = self.device, [], []
        what = f"{case.model} {case.mode} {case.x} {dtype}"
        for provider in providers:
            config = case.config(dtype)
            if provider.backend == "auto":
                config += ";auto=" + "/".join(f"{op}:{_what_auto_runs(op, device.type, dtype)}" for op in OP_FUNCTIONS)
            step = self._provider_result(provider, what, lambda p=provider: self._first_step(case, dtype, p))
            if step is None:
                continue
            if provider.compile_mode is not None:
                rows.append(self.row(case.model, provider.name, case.mode, "compile", case.x, config,
                                     step.first_s))
            ready.append((provider, config, step))
        timings = self._timings([(p, (_under(p.backend, step), None)) for p, _, step in ready], what)
        for (provider, config, step), t in zip(ready, timings):
            if t is None:
                continue
            rows.append(self.row(case.model, provider.name, case.mode, "time", case.x, config, t.p50, t.p20, t.p80))
            train = case.mode == "train" and provider.compile_mode is None
            memory = self._provider_result(provider, what, lambda s=step, b=provider.backend: _step_memory(
                s, b, device, train))
            if memory is None:
                continue
            peak, saved = memory
            if saved is not None:
                rows.append(self.row(case.model, provider.name, case.mode, "saved_mem", case.x, config, saved / MIB))
            if peak is not None:
                rows.append(self.row(case.model, provider.name, case.mode, "peak_mem", case.x, config, peak / MIB))
        return rows

    def _first_step(self, case: ModelCase, dtype: str, provider: Provider):
        """The step of ``provider`` after its first (compiling) call, whose seconds are its
        ``first_s``."""
        with use_backend(provider.backend):
            step = make_step(case, self.device, dtype, provider.compile_mode, provider.fold)
            with _cold_compile(provider, self.opts.quick):
                step.first_s = first_call_seconds(step, self.device)
        return step

    # --- schedule -------------------------------------------------------------------------
    def jobs(self) -> List[Job]:
        """Every measurement, in the order that keeps the most informative ones inside a
        budget: each op's first shape with every provider (a complete side-by-side row), the
        models without compile, the other op shapes, then compiled inference and training."""
        opts, device_type = self.opts, self.device.type
        jobs: List[Job] = []
        op_modes = opts.compile_modes if "ops" in opts.compile_scopes else []
        for op in opts.ops:
            usable = []
            for provider in providers(op, device_type, op_modes):
                if provider.skip:
                    self.notes.append(Note("skipped", provider.name, op, provider.skip))
                else:
                    usable.append(provider)
            for index, case in enumerate(quick_cases(op) if opts.quick else full_cases(op, opts.op_batch)):
                for dtype in opts.dtypes:
                    group = []
                    for provider in usable:
                        if opts.quick and index > 0 and provider.compile_mode is not None:
                            continue  # --quick compiles the first shape only
                        reason = dtype_skip_reason(op, provider.backend, device_type, dtype)
                        if reason is not None:
                            if index == 0:
                                self.notes.append(Note("skipped", provider.name, f"{op} {dtype}", reason))
                            continue
                        group.append(provider)
                    if group:
                        jobs.append(Job(0 if index == 0 else 2, f"{op} {case.x} {dtype}", group, "op",
                                        lambda c=case, d=dtype, g=group: self.op_job(c, d, g)))
        for case in model_cases(opts.models, opts.preset, opts.batch, opts.persons, opts.frames):
            modes = opts.compile_modes if case.mode in opts.compile_scopes else []
            every = model_providers(modes, infer=case.mode == "infer")
            # the eager providers side by side; each compiled one alone, later (a model's first
            # compile takes a minute or more, so the budget decides provider by provider)
            groups = [[p for p in every if p.compile_mode is None]] + [[p] for p in every if p.compile_mode]
            for group in groups:
                phase = 1 if group[0].compile_mode is None else (3 if case.mode == "infer" else 4)
                for dtype in opts.dtypes:
                    jobs.append(Job(phase, f"{case.model} {case.mode} {case.x} {dtype}", group, "model",
                                    lambda c=case, d=dtype, g=group: self.model_job(c, d, g)))
        return sorted(jobs, key=lambda job: job.phase)

    def run(self) -> None:
        start = time.perf_counter()
        self._record(self.measure_copy())
        jobs = self.jobs()
        budget = self.opts.budget
        interrupted = False
        for number, job in enumerate(jobs, 1):
            elapsed = time.perf_counter() - start
            kind = job.kind + ("+compile" if job.compiles else "")
            if interrupted:
                self._note_all("skipped", job, "interrupted")
                continue
            if budget is not None and budget - elapsed < MIN_BUDGET_S[kind]:
                self._note_all("skipped", job, f"time budget (--budget {budget:g} s) spent")
                continue
            job_start = time.perf_counter()
            try:
                status = self._run_job(job)
            except KeyboardInterrupt:
                interrupted, status = True, "interrupted"
                self._note_all("skipped", job, "interrupted")
            print(f"[{number}/{len(jobs)} {elapsed:5.0f}s] {job.what:<44} {job.names} "
                  f"{status} ({time.perf_counter() - job_start:.1f}s)", file=sys.stderr, flush=True)

    def _note_all(self, kind: str, job: Job, text: str) -> None:
        for provider in job.providers:
            self.notes.append(Note(kind, provider.name, job.what, text))

    def _run_job(self, job: Job) -> str:
        """Runs ``job`` (its providers' own failures are noted inside it); an error that
        escapes it is noted for all of them."""
        try:
            self._record(job.work())
            return "ok"
        except Exception as error:  # a failing provider is a result, not a crash
            self.failed = True
            self._note_all("error", job, _one_line(error))
            return "error"
        finally:
            if job.compiles:
                torch._dynamo.reset()  # free the compiled graphs; the next job compiles afresh
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _record(self, rows: List[Row]) -> None:
        self.rows += rows
        write_csv(rows, self.csv_path)


def _what_auto_runs(op: str, device_type: str, dtype: str) -> str:
    """The backend ``auto`` picks for ``op``, or ``reference`` where that pick (``cpp``) runs
    PyTorch's own op, the cases the op providers skip: CPU-only kernels on another device, or
    kernels that step aside under autocast (``backend_skip_reason``, ``dtype_skip_reason``)."""
    backend = resolve(op, "auto", device_type)
    if backend_skip_reason(op, backend, device_type) or dtype_skip_reason(op, backend, device_type, dtype):
        return "reference"
    return backend


def _step_memory(step, backend: str, device: torch.device, train: bool):
    """(peak bytes of one step or None, bytes its forward saves for the backward, or None
    unless ``train``) under the global backend ``backend``."""
    with use_backend(backend):
        return peak_memory(step, device), step.saved_bytes() if train else None


def _under(backend: str, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` called with the global backend ``backend`` (bharnet.ops.use_backend)."""
    def call():
        with use_backend(backend):
            step()
    return call


def _cold_compile(provider: Provider, quick: bool):
    """For a compiled provider of a full run, Inductor's on-disk caches off around its first
    call, so that the "compile" row times a compilation (with them, a second run timed a cache
    load: 2.5 s, then 0.13 s for the same graph); otherwise nothing (``--quick``, a smoke test,
    keeps the caches: a cold compile doubled its time)."""
    if provider.compile_mode is None or quick:
        return contextlib.nullcontext()
    return torch._inductor.config.patch(force_disable_caches=True)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def run(args: argparse.Namespace) -> int:
    """Run ``bharnet bench`` with parsed ``args``; returns the exit status."""
    try:
        opts = resolve_options(args)
    except ValueError as error:
        print(f"bharnet bench: error: {error}", file=sys.stderr)
        return 2
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # CUDA_HOME notice
    # On CPU, glibc's malloc otherwise re-faults freed activations or not depending on the
    # process's allocation history, which moved model timings by up to 20% between runs
    # (bench/cpu_page_faults.py); every provider runs under the same setting.
    opts.keep_freed_memory = opts.device.type == "cpu" and keep_freed_memory()
    threads = torch.get_num_threads()
    try:  # the caller's thread count and generators stay as they were (bharnet.cli.main in-process)
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            if args.threads is not None:
                torch.set_num_threads(args.threads)
            torch.manual_seed(args.seed)
            return _run_bench(opts, args)
    finally:
        torch.set_num_threads(threads)


def _run_bench(opts, args: argparse.Namespace) -> int:
    description = env.device_description(opts.device)
    csv_path = os.path.join(args.results_dir, f"{env.device_slug(description)}.csv")
    bench = Bench(opts, csv_path)
    print(f"bharnet bench on {description} | {bench.versions.replace(';', ' ')} | "
          f"dtypes {','.join(opts.dtypes)} | {'quick' if opts.quick else 'full'} run", flush=True)
    bench.run()
    print(format_table(bench.rows, bench.notes))
    print(f"\nCSV: {csv_path} ({len(bench.rows)} rows appended)")
    if not args.no_plots:
        try:
            paths = write_plots(bench.rows, args.plots_dir, env.device_slug(description))
        except ImportError:
            print("plots: matplotlib is not installed (pip install matplotlib)")
        else:
            print("plots: " + ", ".join(paths))
    return 1 if bench.failed else 0
