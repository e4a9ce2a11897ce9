"""Benchmark output: CSV rows (DESIGN.md section 7), the terminal table and PNG plots.

CSV columns: ``op, provider, mode, metric, unit, x, p50, p20, p80, config, device, versions,
timestamp``. ``op`` is an op name, a model name or ``copy`` (the bandwidth reference);
``mode`` is one of :data:`OP_MODES` for ops, ``train``/``infer`` for models; ``metric``
is one of :data:`METRICS`; ``config`` holds ``key=value`` pairs joined by ``;`` (dtype first).
"""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# metric -> unit
METRICS = {
    "time": "ms",          # p20/p50/p80 of the call's duration
    "gbps": "GB/s",        # bytes that must move / time (memory-bound ops)
    "roofline": "%",       # gbps as a share of the measured copy bandwidth
    "tflops": "TFLOP/s",   # counted FLOPs / time (compute-heavy ops: attention)
    "peak_mem": "MiB",     # peak memory of one call above what was in use before it
    "saved_mem": "MiB",    # bytes saved for backward by the forward (ops; eager training steps)
    "compile": "s",        # wall time of the first (compiling) call
    "bandwidth": "GB/s",   # copy bandwidth (op "copy")
}
MODEL_MODES = ("train", "infer")
# An op's forward recorded for autograd, its backward, both, and the forward under torch.no_grad
# (inference: under bf16 the C++ kernels then read bfloat16 as stored; not timed for compiled
# providers, whose no-grad call would compile a second graph).
NOGRAD = "fwd-nograd"
OP_MODES = ("fwd", "bwd", "fwd+bwd", NOGRAD)

# The providers an op's (or model's) ratios are computed against, eager and compiled ("vs
# eager", "vs compile"). By default the PyTorch reference and its torch.compile; cross_attention
# is measured against the standard formulation with SDPA (issue 6's targets; baselines.py).
DEFAULT_BASELINES = ("eager", "compile")
BASELINES: Dict[str, Tuple[str, str]] = {"cross_attention": ("sdpa", "sdpa+compile")}


def baseline(op: str, compiled: bool = False) -> str:
    """The provider ``op``'s ratios are computed against, eager or ``compiled``."""
    return BASELINES.get(op, DEFAULT_BASELINES)[compiled]


@dataclass(frozen=True)
class Row:
    op: str
    provider: str
    mode: str
    metric: str
    unit: str
    x: str
    p50: float
    p20: float
    p80: float
    config: str
    device: str
    versions: str
    timestamp: str


CSV_COLUMNS = [f.name for f in fields(Row)]


@dataclass(frozen=True)
class Note:
    """A provider that did not produce rows: ``status`` is ``skipped`` or ``error``."""

    status: str
    provider: str
    what: str
    message: str


def dtype_of(config: str) -> str:
    return parse_config(config).get("dtype", "")


def parse_config(config: str) -> Dict[str, str]:
    return dict(item.split("=", 1) for item in config.split(";") if "=" in item)


def case_config(config: str) -> str:
    """``config`` without what describes the provider rather than the case (``auto=``: the
    backends ``auto`` chose), so that all providers of a case compare under one key."""
    return ";".join(item for item in config.split(";") if not item.startswith("auto="))


def by_op(rows: Iterable[Row]) -> List[Row]:
    """``rows`` grouped by op (ops in order of first appearance), otherwise in their order: the
    runner interleaves ops (first shapes first), reports read better op by op."""
    rows = list(rows)
    first = {op: i for i, op in enumerate(dict.fromkeys(r.op for r in rows))}
    return sorted(rows, key=lambda r: first[r.op])


def row_key(row: Row) -> Tuple[str, str, str, str, str]:
    """(op, provider, mode, x, case config): one measurement, whatever its metric."""
    return row.op, row.provider, row.mode, row.x, case_config(row.config)


def write_csv(rows: Sequence[Row], path: str) -> None:
    """Append ``rows`` to ``path`` (with a header when the file is new)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            record = asdict(row)
            for key in ("p50", "p20", "p80"):
                record[key] = f"{record[key]:.6g}"
            writer.writerow(record)


def read_csv(path: str) -> List[Row]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(CSV_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a bharnet bench CSV (missing columns {sorted(missing)})")
        return [Row(**{k: (float(r[k]) if k in ("p50", "p20", "p80") else r[k]) for k in CSV_COLUMNS})
                for r in reader]


def speedups(rows: Iterable[Row], compiled: bool = False) -> Dict[Tuple, float]:
    """The median time of each op's :func:`baseline` (eager or ``compiled``) over each row's,
    keyed by :func:`row_key` (time rows only)."""
    times = [r for r in rows if r.metric == "time"]
    base = {_case(r): r.p50 for r in times if r.provider == baseline(r.op, compiled)}
    return {row_key(r): base[_case(r)] / r.p50 for r in times if _case(r) in base and r.p50 > 0}


def _case(row: Row) -> Tuple[str, str, str, str]:
    return row.op, row.mode, row.x, case_config(row.config)


# --- terminal table -----------------------------------------------------------------------

_COLUMNS = (("mode", 10), ("provider", 22), ("p50 ms", 10), ("p20-p80 ms", 19), ("vs eager", 9),
            ("vs compile", 10), ("GB/s", 8), ("% copy", 7), ("TFLOP/s", 8), ("peak MiB", 9),
            ("saved MiB", 9), ("compile s", 9))


def _fmt(value: Optional[float], spec: str = ".3g", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(rows: Sequence[Row], notes: Sequence[Note]) -> str:
    """One block per (op or model, shape, config), its heading naming the providers the
    ratios are against; one line per (mode, provider); then the providers that were skipped
    or failed, with the reason."""
    value = {(row_key(r), r.metric): r.p50 for r in rows}
    vs_eager, vs_compile = speedups(rows), speedups(rows, compiled=True)
    lines = []
    for r in rows:
        if r.op == "copy":
            lines.append(f"copy bandwidth: {r.p50:.1f} GB/s (p20 {r.p20:.1f}, p80 {r.p80:.1f}; {r.x} copy)")
    blocks: Dict[Tuple[str, str, str], List[Row]] = defaultdict(list)
    for r in by_op(rows):
        if r.metric == "time" and r.op != "copy":
            blocks[(r.op, r.x, case_config(r.config))].append(r)
    header = " ".join(f"{name:<{w}}" if i < 2 else f"{name:>{w}}" for i, (name, w) in enumerate(_COLUMNS))
    for (op, x, config), block in blocks.items():
        ratios_against = f"ratios vs {baseline(op)} / {baseline(op, compiled=True)}"
        lines += ["", f"{op}  {x}  [{config}]  {ratios_against}", header]
        for r in block:
            key = row_key(r)
            compile_key = (r.op, r.provider, _compile_mode(r), r.x, key[-1])
            cells = [r.mode, r.provider, f"{r.p50:.4g}", f"{r.p20:.4g}-{r.p80:.4g}",
                     _fmt(vs_eager.get(key), ".2f", "x"), _fmt(vs_compile.get(key), ".2f", "x"),
                     _fmt(value.get((key, "gbps"))), _fmt(value.get((key, "roofline")), ".2g"),
                     _fmt(value.get((key, "tflops"))),
                     _fmt(value.get((key, "peak_mem"))),
                     _fmt(value.get((key, "saved_mem"))),
                     _fmt(value.get((compile_key, "compile")))]
            lines.append(" ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}"
                                  for i, (c, (_, w)) in enumerate(zip(cells, _COLUMNS))))
    if notes:
        lines += ["", "not measured as asked:"]
        grouped: Dict[Tuple[str, str, str], List[str]] = defaultdict(list)
        for n in notes:
            grouped[(n.status, n.provider, n.message)].append(n.what)
        for (status, provider, message), whats in grouped.items():
            lines.append(f"  {status:<7} {provider:<22} {', '.join(dict.fromkeys(whats))}: {message}")
    return "\n".join(lines)


def _compile_mode(row: Row) -> str:
    """The mode whose row carries the compile time: ``fwd+bwd`` for ops, the mode for models."""
    return row.mode if row.mode in MODEL_MODES else "fwd+bwd"


# --- plots --------------------------------------------------------------------------------

def write_plots(rows: Sequence[Row], plots_dir: str, slug: str) -> List[str]:
    """PNG plots (matplotlib, Agg backend), returning their paths: per op, the speedup over
    its eager baseline per shape and dtype (one panel per mode, log scale); for the models, the
    speedup of the training step and of inference over eager, and the training step's peak
    memory, per model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    os.makedirs(plots_dir, exist_ok=True)
    ratios = speedups(rows)
    device = rows[0].device if rows else ""
    times = [r for r in rows if r.metric == "time" and r.op != "copy"]
    paths = []
    for op in dict.fromkeys(r.op for r in times if r.mode not in MODEL_MODES):
        op_rows = [r for r in times if r.op == op]
        modes = list(dict.fromkeys(r.mode for r in op_rows))
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            _bars(ax, [r for r in op_rows if r.mode == mode], ratios, lambda r: r.x, baseline(op), log=True)
            ax.set_title(f"{op} {mode}: speedup over {baseline(op)}")
        fig.suptitle(device, fontsize=9)
        paths.append(_save(fig, plt, os.path.join(plots_dir, f"{slug}_{op}.png")))
    model_times = [r for r in times if r.mode in MODEL_MODES]
    if model_times:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, mode, title in zip(axes, MODEL_MODES, ("training step", "inference, one clip")):
            _bars(ax, [r for r in model_times if r.mode == mode], ratios, lambda r: f"{r.op}\n{r.x}", "eager",
                  log=True)
            ax.set_title(f"{title}: speedup over eager")
        memory = [r for r in rows if r.metric == "peak_mem" and r.mode == "train"]
        _bars(axes[2], memory, {row_key(r): r.p50 for r in memory}, lambda r: r.op)
        axes[2].set_title("training step: peak MiB above model and inputs")
        fig.suptitle(device, fontsize=9)
        paths.append(_save(fig, plt, os.path.join(plots_dir, f"{slug}_models.png")))
    return paths


def _bars(ax, rows: Sequence[Row], values: Dict[Tuple, float], label, base: Optional[str] = None,
          log: bool = False) -> None:
    """Grouped bars: one group per (label, dtype), one bar per provider except ``base`` (the
    baseline of speedups; a missing value is left out); ``log`` gives a log scale with a line
    at 1."""
    groups = list(dict.fromkeys((label(r), dtype_of(r.config)) for r in rows))
    providers = [p for p in dict.fromkeys(r.provider for r in rows) if p != base]
    width = 0.8 / max(1, len(providers))
    found = {(r.provider, label(r), dtype_of(r.config)): values.get(row_key(r)) for r in rows}
    for i, provider in enumerate(providers):
        heights = [found.get((provider, *group)) for group in groups]
        ax.bar([g + i * width for g in range(len(groups))],
               [float("nan") if h is None else h for h in heights], width, label=provider)
    ax.set_xticks([g + width * (len(providers) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{x}\n{dtype}" for x, dtype in groups], fontsize=7)
    if log:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%gx"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%gx"))
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.axhline(1.0, color="grey", linewidth=0.8)
    if providers:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"{base} only" if base else "no rows", ha="center", transform=ax.transAxes)


def _save(fig, plt, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
