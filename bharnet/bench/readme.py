"""The README's "Performance" section, generated from ``bench/results/*.csv``.

For each device a short Markdown report: conditions (device, versions, threads, dtypes, shapes,
date), op timings for fwd+bwd by provider with speedups over each op's eager baseline
(``report.baseline``), op timings of the forward under torch.no_grad where a run measured it, and
model training-step / inference timings with peak memory. Each table
row (a case: op or model, shape, dtype, mode) comes from the newest run (timestamp) that timed it,
so a partial run does not hide what older runs measured, and a row never mixes runs; when the rows
come from several runs, a "run" column says which. The section replaces whatever lies between
:data:`START` and :data:`END` in the README.
"""
from __future__ import annotations

import glob
import os
import re
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .env import device_slug
from .report import (BASELINES, MODEL_MODES, NOGRAD, Row, baseline, by_op, case_config, parse_config, read_csv,
                     row_key, speedups)

START = "<!-- performance:start -->"
END = "<!-- performance:end -->"
_NOT_SHAPE = ("dtype", "threads", "run", "malloc")


def newest_cases(rows: Iterable[Row]) -> Dict[str, List[Row]]:
    """Per device (in order of appearance), the rows of each case from the newest run that
    timed it, and the newest run's copy bandwidth; runs with other :func:`_settings` than the
    newest are left out, and ``--quick`` runs (smoke tests) count only where a device has no
    other. Cases in order of first appearance."""
    by_device: Dict[str, List[Row]] = defaultdict(list)
    for row in rows:
        by_device[row.device].append(row)
    chosen = {}
    for device, device_rows in by_device.items():
        full = [r for r in device_rows if parse_config(r.config).get("run") != "quick"]
        newest = max(full or device_rows, key=lambda r: r.timestamp)
        comparable = [r for r in device_rows if _settings(r) == _settings(newest)]
        run: Dict[Tuple[str, str, str, str], str] = {}
        for r in comparable:
            if r.metric == "time" and r.mode in ("fwd+bwd", *MODEL_MODES):
                run[_table_row(r)] = max(run.get(_table_row(r), ""), r.timestamp)
        order = {case: i for i, case in enumerate(dict.fromkeys(_table_row(r) for r in comparable))}
        chosen[device] = sorted((r for r in comparable if run.get(_table_row(r)) == r.timestamp
                                 or (r.op == "copy" and r.timestamp == newest.timestamp)),
                                key=lambda r: order[_table_row(r)])
    return chosen


def _table_row(row: Row) -> Tuple[str, str, str, str]:
    """The table row ``row`` belongs to: (op or model, model mode, x, case config)."""
    return row.op, row.mode if row.mode in MODEL_MODES else "", row.x, case_config(row.config)


def _settings(row: Row) -> Tuple[Optional[str], ...]:
    """The run-wide settings in ``row``'s config (torch threads, ``--quick``, the CPU malloc
    setting): the conditions line states them once, so only runs that share them are combined."""
    config = parse_config(row.config)
    return tuple(config.get(key) for key in ("threads", "run", "malloc"))


def _minute(timestamp: str) -> str:
    """``2026-11-26T17:01:43Z`` as ``2026-11-26 17:01``."""
    return timestamp[:16].replace("T", " ")


def _shape(config: str) -> str:
    return " ".join(f"{k}={v}" for k, v in parse_config(config).items() if k not in _NOT_SHAPE)


def _versions(versions: str) -> str:
    return ", ".join(v.replace("=", " ") for v in versions.split(";"))


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
    return out + ["| " + " | ".join(line) + " |" for line in lines]


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def render_device(rows: Sequence[Row], plots: Sequence[str] = ()) -> List[str]:
    """Markdown lines for one device's rows (:func:`newest_cases`), linking the ``plots`` (paths
    relative to the README); the conditions line is the newest run's."""
    runs = {r.timestamp: r.versions for r in sorted(rows, key=lambda r: r.timestamp)}
    several = len(runs) > 1
    newest = max(runs)
    first = next(r for r in rows if r.timestamp == newest)
    config = parse_config(first.config)
    quick = config.get("run") == "quick"
    dtypes = sorted({parse_config(r.config).get("dtype", "") for r in rows if r.op != "copy"} - {""})
    copy = next((r for r in rows if r.op == "copy"), None)
    if len(set(runs.values())) == 1:
        versions = _versions(first.versions)
    else:
        versions = "versions by run: " + "; ".join(f"{_minute(t)} {_versions(v)}" for t, v in runs.items())
    conditions = (["rows from the newest run that measured each case (column run)"] if several else []) + [
        versions, f"dtypes {', '.join(dtypes)} (bf16 = autocast, parameters fp32)"]
    if "threads" in config:
        cores = re.search(r"\((\d+) cores\)", first.device)
        conditions.append(f"torch threads: {config['threads']}" + (f" of {cores.group(1)} cores" if cores else ""))
    if config.get("malloc") == "kept":
        conditions.append("freed memory kept by malloc (`bharnet.fast.keep_freed_memory`)")
    if copy is not None:
        conditions.append(f"measured copy bandwidth {copy.p50:.3g} GB/s" + (" (newest run)" if several else ""))
    auto = next((parse_config(r.config)["auto"] for r in rows if "auto=" in r.config), None)
    if auto is not None:
        conditions.append("`auto` ran " + ", ".join(pair.replace(":", " on ") for pair in auto.split("/")))
    oldest = min(runs)[:10]
    dates = newest[:10] if oldest == newest[:10] else f"{oldest} to {newest[:10]}"
    lines = [f"### {first.device}, {dates}" + (" (`--quick`)" if quick else ""), "",
             "; ".join(conditions) + "."]
    if quick:
        lines.append("A `--quick` run: tiny shapes and the `small` model preset, a smoke test of the "
                     "whole benchmark rather than a ranking of providers.")
    lines.append(f"Median of repeated calls in ms (speedup over the baseline: {_baselines_text(rows)}); p20/p80 and more "
                 "metrics are in the CSV.")
    if plots:
        names = [os.path.splitext(os.path.basename(p))[0].split("_", 1)[-1] for p in plots]
        lines.append("Plots: " + ", ".join(f"[{name}]({p})" for name, p in zip(names, plots)) + ".")
    lines += (_op_lines(rows, several, first.device.startswith("cpu")) + _inference_op_lines(rows, several)
              + _model_lines(rows, several))
    return lines


def _baselines_text(rows: Iterable[Row]) -> str:
    """The eager baselines of the ops among ``rows``, e.g. ``eager; sdpa for cross_attention``."""
    ops = dict.fromkeys(r.op for r in rows)
    return "eager" + "".join(f"; {BASELINES[op][0]} for {op}" for op in ops if op in BASELINES)


def _timed(t: Optional[float], speedup: Optional[float], is_baseline: bool) -> str:
    """A time cell: ms, and the speedup unless it is the baseline's own (or unknown)."""
    if t is None:
        return "-"
    return _ms(t) + ("" if is_baseline or speedup is None else f" ({speedup:.2f}x)")


def _providers(rows: Iterable[Row]) -> List[str]:
    return list(dict.fromkeys(r.provider for r in rows))


def _op_lines(rows: Sequence[Row], run_column: bool = False, cpu: bool = False) -> List[str]:
    """Two tables: fwd+bwd time per provider, and memory (saved for backward, fwd+bwd peak);
    with ``run_column``, each case's run (its rows must all come from one run); ``cpu`` says
    why the bandwidth share can exceed 100% there."""
    times = by_op(r for r in rows if r.metric == "time" and r.mode == "fwd+bwd")
    if not times:
        return []
    ratio = speedups(rows)
    metric = {(*row_key(r), r.metric): r.p50 for r in rows}
    providers = _providers(times)
    cases = {(r.op, r.x, case_config(r.config)): r.timestamp for r in times}  # case -> its run
    speed, memory = [], []
    for (op, x, config), run in cases.items():
        case = [op, _shape(config), parse_config(config).get("dtype", "")]
        cells, mem_cells = list(case), list(case)
        for p in providers:
            t = metric.get((op, p, "fwd+bwd", x, config, "time"))
            speedup = ratio.get((op, p, "fwd+bwd", x, config))
            cells.append(_timed(t, speedup, p == baseline(op)))
            saved = metric.get((op, p, "fwd", x, config, "saved_mem"))
            peak = metric.get((op, p, "fwd+bwd", x, config, "peak_mem"))
            mem_cells.append("-" if saved is None else f"{saved:.3g} / " + ("-" if peak is None else f"{peak:.3g}"))
        roof = [v for v in (metric.get((op, p, "fwd+bwd", x, config, "roofline")) for p in providers) if v is not None]
        cells.append(f"{max(roof):.2g}%" if roof else "-")
        run_cell = [_minute(run)] if run_column else []
        speed.append(cells + run_cell)
        memory.append(mem_cells + run_cell)
    head = ["op", "shape", "dtype"]
    tail = ["run"] if run_column else []
    return (["", f"Ops, forward + backward, ms (speedup over the baseline: {_baselines_text(times)}); the last column "
             "is the best "
             "provider's traffic (inputs read once, outputs written once) over its time, as a share "
             "of the copy bandwidth" + (
                 " (measured on buffers larger than the caches; the CPU timer does not flush the caches between "
                 "calls, and these shapes' inputs fit in the last-level cache, so the share can exceed "
                 "100%: a comparison between providers, not a roofline)" if cpu else "") + ":", ""]
            + _table(head + providers + ["best % of copy BW"] + tail, speed)
            + ["", "Ops, memory in MiB: saved for backward by the forward / peak of forward + backward "
               "above the inputs:", ""]
            + _table(head + providers + tail, memory))


def _inference_op_lines(rows: Sequence[Row], run_column: bool = False) -> List[str]:
    """The ops' forward under torch.no_grad (mode fwd-nograd) per uncompiled provider, for the
    cases whose run timed it; with ``run_column``, each case's run."""
    times = by_op(r for r in rows if r.metric == "time" and r.mode == NOGRAD)
    if not times:
        return []
    ratio = speedups(rows)
    metric = {row_key(r): r.p50 for r in times}
    providers = _providers(times)
    cases = {(r.op, r.x, case_config(r.config)): r.timestamp for r in times}  # case -> its run
    body = []
    for (op, x, config), run in cases.items():
        cells = [op, _shape(config), parse_config(config).get("dtype", "")]
        for p in providers:
            key = (op, p, NOGRAD, x, config)
            cells.append(_timed(metric.get(key), ratio.get(key), p == baseline(op)))
        body.append(cells + ([_minute(run)] if run_column else []))
    return (["", "Ops, forward under `torch.no_grad` (inference; in bf16 the C++ kernels read the bfloat16 "
             f"activations as stored), ms (speedup over the baseline: {_baselines_text(times)}):", ""]
            + _table(["op", "shape", "dtype"] + providers + (["run"] if run_column else []), body))


def _model_lines(rows: Sequence[Row], run_column: bool = False) -> List[str]:
    """The models' table; with ``run_column``, each case's run."""
    times = [r for r in rows if r.metric == "time" and r.mode in MODEL_MODES]
    if not times:
        return []
    ratio = speedups(rows)
    metric = {(*row_key(r), r.metric): r.p50 for r in rows}
    providers = _providers(times)
    cases = {(r.op, r.mode, r.x, case_config(r.config)): r.timestamp for r in times}  # case -> its run
    body = []
    for (model, mode, x, config), run in cases.items():
        cells = [model, "training step" if mode == "train" else "inference, 1 clip",
                 f"{parse_config(config).get('dtype', '')}, {_shape(config)}"]
        for p in providers:
            key = (model, p, mode, x, config)
            t, peak, saved = (metric.get((*key, m)) for m in ("time", "peak_mem", "saved_mem"))
            text = _timed(t, ratio.get(key), p == baseline(model))
            if t is not None:
                text += "" if peak is None else f", {peak:.3g} MiB"
                text += "" if saved is None else f", saved {saved:.3g} MiB"
            cells.append(text)
        body.append(cells + ([_minute(run)] if run_column else []))
    return (["", "Models (time, and peak memory above the resident model, optimizer state and inputs; for "
             "training steps without compile, then the memory their forward saves for backward):", ""]
            + _table(["model", "step", "config"] + providers + (["run"] if run_column else []), body))


def render(rows: Iterable[Row], plots_dir: Optional[str] = None, base_dir: str = ".") -> str:
    """The whole generated section (heading included), without the markers. With
    ``plots_dir``, each device's PNGs there (``<device slug>_*.png``, as ``bharnet bench``
    names them) are linked, relative to ``base_dir`` (the README's directory)."""
    lines = ["## Performance", "",
             "Generated by `python bench/update_readme.py` from `bench/results/*.csv` (per device, "
             "each case from the newest `bharnet bench` run that measured it); rerun both to refresh. "
             "Providers: `eager` (the PyTorch reference), `compile` (`torch.compile` of it), each bharnet backend, and "
             "`<backend>+compile`; for cross_attention also `sdpa` (the same layer with `nn.Linear` "
             "projections around `scaled_dot_product_attention`, its baseline), `sdpa+compile` and "
             "`sdpa-<backend>` (one SDPA backend forced); for model inference also `auto+fold` (the model "
             "fused for inference, `bharnet.fast.fuse_for_inference`) and `auto+fold+compile`."]
    cases = newest_cases(rows)
    if not cases:
        lines += ["", "No benchmark results yet: run `bharnet bench`."]
    for device, device_rows in cases.items():
        plots = [] if plots_dir is None else sorted(
            os.path.relpath(p, base_dir) for p in glob.glob(os.path.join(plots_dir, f"{device_slug(device)}_*.png")))
        lines += [""] + render_device(device_rows, plots)
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    """``text`` with the part between the markers replaced by ``section`` (markers and section
    appended at the end when the markers are absent)."""
    block = f"{START}\n{section}\n{END}"
    start, end = text.find(START), text.find(END)
    if start == -1 or end == -1 or end < start:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    return text[:start] + block + text[end + len(END):]


def update_readme(readme_path: str, csv_paths: Sequence[str], plots_dir: Optional[str] = None) -> str:
    """Rewrite the section of ``readme_path`` from ``csv_paths`` (linking the plots in
    ``plots_dir``); returns the section."""
    rows = [row for path in sorted(csv_paths) for row in read_csv(path)]
    section = render(rows, plots_dir, os.path.dirname(os.path.abspath(readme_path)))
    with open(readme_path) as handle:
        text = handle.read()
    with open(readme_path, "w") as handle:
        handle.write(replace_section(text, section))
    return section
