"""`bharnet bench`: the --quick run end to end, and its measuring, reporting and README parts."""
import argparse
import csv
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bharnet.bench import add_arguments, env, run
from bharnet.bench.runner import resolve_options
from bharnet.bench.baselines import Rejected
from bharnet.bench.memory import MIB, peak_memory, saved_tensor_bytes
from bharnet.bench.op_cases import FULL_BATCH, OP_FUNCTIONS, attention_case, full_cases
from bharnet.bench.providers import TRITON_ON_CPU, Provider, model_providers, providers
from bharnet.bench.readme import END, START, render, replace_section, update_readme
from bharnet.bench.report import (BASELINES, CSV_COLUMNS, NOGRAD, Row, baseline, format_table, read_csv, speedups,
                                  write_csv)
from bharnet.bench.roofline import gbps, roofline_percent, tensor_bytes
from bharnet.bench.timing import TimerSettings, interleaved, measure, quantile

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(list(argv)))


def only_csv(directory):
    paths = list(Path(directory).glob("*.csv"))
    assert len(paths) == 1, paths
    return paths[0]


def test_quick_run_prints_the_table_and_writes_csv_and_plots(tmp_path, capsys):
    results, plots = tmp_path / "results", tmp_path / "plots"
    # one torch thread: tiny ops on two threads stall for milliseconds when a shared CI machine
    # is oversubscribed (each parallel region waits for a descheduled worker)
    argv = ["--quick", "--threads", "1", "--results-dir", str(results), "--plots-dir", str(plots)]
    assert bench(*argv) == 0
    out = capsys.readouterr().out
    assert "vs eager" in out and "vs compile" in out and "copy bandwidth" in out
    assert "skipped triton " in out and TRITON_ON_CPU in out  # on CPU, with the reason
    assert "time budget" not in out

    path = only_csv(results)
    assert path.name.startswith("cpu-")
    with open(path, newline="") as handle:
        assert next(csv.reader(handle)) == CSV_COLUMNS
    rows = read_csv(str(path))
    assert len({(r.device, r.versions, r.timestamp) for r in rows}) == 1
    assert "torch=" in rows[0].versions and "triton=" in rows[0].versions
    for r in rows:
        assert r.p20 <= r.p50 <= r.p80, r
    times = {(r.op, r.provider, r.mode) for r in rows if r.metric == "time"}
    for op in ("ctr_graph_conv", "deformable_temporal_conv", "bone", "temporal_max_pool"):
        for provider in ("eager", "compile"):
            assert {(op, provider, mode) for mode in ("fwd", "bwd", "fwd+bwd")} <= times
        # the forward without autograd, for the uncompiled providers only
        assert (op, "eager", NOGRAD) in times and (op, "compile", NOGRAD) not in times
    for provider in ("eager", "compile", "sdpa", "sdpa+compile", "sdpa-math"):
        assert {("cross_attention", provider, mode) for mode in ("fwd", "bwd", "fwd+bwd")} <= times
    assert "ratios vs sdpa / sdpa+compile" in out
    assert {("bone", "cpp", "fwd+bwd"), ("temporal_max_pool", "cpp", "fwd+bwd")} <= times  # C++ on CPU
    for model in ("bharnet-e", "body", "unified"):
        assert {(model, p, m) for p in ("eager", "auto") for m in ("train", "infer")} <= times
    ratios = {(op, provider, mode): value for (op, provider, mode, _, _), value in speedups(rows).items()}
    assert ("body", "auto", "train") in ratios  # auto's backend choice does not split the case
    assert ratios[("cross_attention", "sdpa", "fwd+bwd")] == 1.0  # the baseline of cross_attention
    metrics = {(r.op, r.provider, r.metric) for r in rows if r.mode == "fwd+bwd"}
    assert {("cross_attention", p, m) for p in ("sdpa", "sdpa+compile") for m in ("tflops", "gbps")} <= metrics
    metrics = {(r.op, r.metric) for r in rows}
    assert {("copy", "bandwidth"), ("ctr_graph_conv", "roofline"), ("ctr_graph_conv", "gbps"),
            ("ctr_graph_conv", "saved_mem"), ("ctr_graph_conv", "peak_mem"), ("ctr_graph_conv", "compile"),
            ("body", "peak_mem")} <= metrics
    saved = {(r.op, r.provider): r.p50 for r in rows if r.metric == "saved_mem" and r.mode == "train"}
    for model in ("bharnet-e", "body", "unified"):  # the fused layers keep x in place of v
        assert 0 < saved[(model, "auto")] < saved[(model, "eager")]
    assert not any(p.endswith("compile") for _, p in saved)
    op_rows = [r for r in rows if r.op != "copy"]
    assert all("run=quick" in r.config and "dtype=fp32" in r.config and "threads=1" in r.config for r in op_rows)
    # glibc (Linux): the CPU run keeps freed memory and says so; elsewhere the setting is absent
    assert all(("malloc=kept" in r.config) == sys.platform.startswith("linux") for r in op_rows)
    if sys.platform.startswith("linux"):
        assert "freed memory kept by malloc" in render(rows)
    assert all(r.unit == "s" and r.p50 > 0 for r in rows if r.metric == "compile")

    pngs = sorted(plots.glob("*.png"))
    assert {p.name.split("_", 1)[1] for p in pngs} >= {"ctr_graph_conv.png", "bone.png", "models.png"}
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)


def test_budget_skips_what_does_not_fit(tmp_path, capsys):
    results = tmp_path / "results"
    assert bench("--quick", "--ops", "bone", "--models", "body", "--budget", "0.001",
                 "--results-dir", str(results), "--no-plots") == 0
    assert {r.op for r in read_csv(str(only_csv(results)))} == {"copy"}
    out = capsys.readouterr().out
    assert "time budget (--budget 0.001 s) spent" in out and "body train" in out


def test_full_op_shapes_at_another_batch_say_so_in_their_labels():
    """Only the batch dimension changes: B sequences for the graph ops, 16 B (frame mode) and
    B (sequence mode) for cross-attention, B / 2 clips for the bone features."""
    expected = {"ctr_graph_conv": ("B", [2] * 7), "deformable_temporal_conv": ("B", [2] * 7),
                "cross_attention": ("N", [32, 2]), "bone": ("N", [1, 1]), "temporal_max_pool": ("B", [2] * 5),
                "pointwise_conv": ("B", [2] * 6), "batch_norm": ("B", [2] * 5)}
    for op in OP_FUNCTIONS:
        default, clip = full_cases(op), full_cases(op, 2)
        key, batches = expected[op]
        assert [c.sizes[key] for c in clip] == batches
        assert [d.sizes[key] for d in default] == [b * FULL_BATCH // 2 for b in batches]
        assert all(c.x.startswith("B2 ") and not d.x.startswith("B") for c, d in zip(clip, default))
        for d, c in zip(default, clip):
            assert {k: v for k, v in c.sizes.items() if k != key} == {k: v for k, v in d.sizes.items() if k != key}


def test_cpu_op_shapes_default_to_one_clip(tmp_path):
    """Without --quick, CPU op rows are the model's shapes at one clip of 2 persons."""
    results = tmp_path / "results"
    threads, generator = torch.get_num_threads(), torch.get_rng_state()
    assert bench("--device", "cpu", "--ops", "bone", "--models", "none", "--compile", "none", "--dtypes", "fp32",
                 "--threads", "1" if threads != 1 else "2", "--results-dir", str(results), "--no-plots") == 0
    # the caller's thread count and random generator are left as they were
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), generator)
    rows = [r for r in read_csv(str(only_csv(results))) if r.op == "bone"]
    assert rows and {r.x for r in rows} == {"B2 T64 V25", "B2 T64 V42"}
    assert all("N=1;" in r.config and "run=quick" not in r.config for r in rows)


def test_cpu_training_steps_default_to_one_clip():
    """A full CPU run trains on one clip per step: at the CUDA default of 32 clips, BHaRNet-E's
    eager step needs more than 24 GiB and the run was killed for memory."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert resolve_options(parser.parse_args(["--device", "cpu"])).batch == 1
    assert resolve_options(parser.parse_args(["--device", "cpu", "--batch", "4"])).batch == 4
    assert resolve_options(parser.parse_args(["--device", "cpu", "--quick"])).batch == 2


def test_the_training_step_steps_the_optimizer_bharnet_train_uses(monkeypatch):
    """The benchmark's step is the trainer's: torch's fused SGD (one kernel for all 1,310 of
    BHaRNet-E's parameter tensors), not the per-tensor loop that a plain SGD runs on CPU."""
    from bharnet.bench import model_cases
    made, make_optimizer = [], model_cases.make_optimizer

    def recording(*args):
        made.append(make_optimizer(*args))
        return made[-1]

    monkeypatch.setattr(model_cases, "make_optimizer", recording)
    step = model_cases.make_step(model_cases.ModelCase("body", "train", "small", 1, 1, 8, classes=3),
                                 torch.device("cpu"), "fp32", None)
    step()
    (optimizer,) = made
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["fused"] is True
    assert optimizer.state and all("momentum_buffer" in state for state in optimizer.state.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_gpu_is_a_one_line_error(tmp_path, capsys):
    assert bench("--device", "cuda", "--results-dir", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda" in err and "CUDA is not available" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["--ops", "conv"], ["--dtypes", "fp16"], ["--compile", "everything"],
                                  ["--batch", "0"], ["--op-batch", "0"], ["--compile-mode", "fast"]])
def test_bad_options_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench(*argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_an_op_batch_that_quick_would_ignore_is_refused(capsys):
    assert bench("--quick", "--op-batch", "4") == 2
    assert "--op-batch sets the batch of the full op shapes" in capsys.readouterr().err


CPU = torch.device("cpu")


def test_cpu_timer_measures_a_known_sleep():
    t = measure(lambda: time.sleep(0.01), CPU, TimerSettings(warmup=1, min_reps=5, min_time_s=0.0))
    assert 10.0 <= t.p20 <= t.p50 <= t.p80
    assert t.p50 < 60.0  # generous: shared CI machines oversleep


def test_cpu_timer_leaves_setup_untimed():
    t = measure(lambda state: state, CPU, TimerSettings(warmup=1, min_reps=3, min_time_s=0.0),
                setup=lambda: time.sleep(0.02))
    assert t.p80 < 10.0


def test_interleaved_timing_alternates_blocks_and_gives_each_function_its_time():
    """Two sleeps of 2 and 6 ms, each timed for 0.08 s in blocks of about 0.01 s: their calls
    alternate in blocks (so a slow phase of the machine reaches both), each gets its own
    timing, and the calls stop once each has its time."""
    order = []

    def sleeper(ms):
        def call():
            order.append(ms)
            time.sleep(ms / 1e3)
        return call

    settings = TimerSettings(warmup=1, min_reps=3, min_time_s=0.08)
    short, long = interleaved([(sleeper(2), None), (sleeper(6), None)], CPU, settings)
    assert 2.0 <= short.p50 < long.p50 and 6.0 <= long.p50
    timed = order[4:]  # after each one's warm-up call and the call that sizes its blocks
    switches = sum(a != b for a, b in zip(timed, timed[1:]))
    assert switches >= 6, timed  # about 8 blocks each, not one run per function
    # each stops within a block of its 80 ms (sleeps only overshoot); the shorter takes more calls
    assert timed.count(6) < timed.count(2) <= 80 / 2 + 6 and timed.count(6) <= 80 / 6 + 3, timed



def test_interleaved_timing_alternates_calls_faster_than_the_timer_can_block():
    """Calls of a few microseconds: a block holds at most max_reps / BLOCKS of them, so they
    still alternate (before, each took one block of max_reps calls, one after the other)."""
    order = []
    settings = TimerSettings(warmup=1, min_reps=5, min_time_s=0.2, max_reps=400)
    interleaved([(lambda: order.append("a"), None), (lambda: order.append("b"), None)], CPU, settings)
    assert order.count("a") == order.count("b") == 400 + 2  # max_reps, warm-up and sizing calls
    timed = order[4:]
    assert sum(x != y for x, y in zip(timed, timed[1:])) >= 7, "fewer than 8 blocks each"


def test_a_provider_failing_while_timed_is_noted_and_the_others_keep_their_timings(tmp_path):
    """The group is timed again provider by provider: the failing one gets a note, no timing."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    from bharnet.bench.runner import Bench
    bench = Bench(resolve_options(parser.parse_args(["--device", "cpu", "--quick"])), str(tmp_path / "r.csv"))
    calls = iter(range(10_000))

    def fails_after_a_few_calls():
        if next(calls) > 5:
            raise RuntimeError("device lost")

    working, failing = (Provider("reference"), (lambda: None, None)), (Provider("cpp"), (fails_after_a_few_calls, None))
    timings = bench._timings([working, failing], "op B2 fp32")
    assert timings[0] is not None and timings[1] is None
    assert [(n.status, n.provider, n.what, n.message) for n in bench.notes] == [
        ("error", "cpp", "op B2 fp32", "RuntimeError: device lost")]
    assert bench.failed


@pytest.mark.gpu
def test_cuda_timer_orders_work_and_leaves_setup_untimed():
    settings = TimerSettings(warmup=2, min_reps=10, min_time_s=0.05)
    small, large = (torch.empty(n, device="cuda") for n in (1 << 20, 1 << 28))
    gpu = torch.device("cuda")
    t_small, t_large = interleaved([(lambda: small.mul_(1.0), None), (lambda: large.mul_(1.0), None)], gpu,
                                   settings)  # 256x the bytes
    assert t_small.p20 <= t_small.p50 <= t_small.p80 < t_large.p20
    untimed = measure(lambda state: small.add_(1.0), gpu, settings, setup=lambda: torch.cuda._sleep(10_000_000))
    assert untimed.p80 < t_large.p20


@pytest.mark.gpu
def test_cuda_peak_memory_sees_a_large_temporary():
    peak = peak_memory(lambda: torch.ones(16 << 20, device="cuda"), torch.device("cuda"))
    assert peak >= 64 * MIB


def test_quantile_interpolates_between_order_statistics():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert (quantile(values, 0.2), quantile(values, 0.5), quantile(values, 0.8)) == pytest.approx((1.8, 3.0, 4.2))
    assert quantile([7.0], 0.8) == 7.0
    with pytest.raises(ValueError, match="empty"):
        quantile([], 0.5)


def test_roofline_of_a_known_case():
    x = torch.zeros(1000, dtype=torch.float32)   # 4000 bytes
    y = torch.zeros(500, dtype=torch.bfloat16)   # 1000 bytes
    assert tensor_bytes([x, 3, y, None]) == 5000
    assert gbps(2_000_000_000, 1000.0) == pytest.approx(2.0)   # 2 GB in 1 s
    assert roofline_percent(1_000_000_000, 1.0, 2000.0) == pytest.approx(50.0)  # 1 TB/s of 2 TB/s
    with pytest.raises(ValueError, match="positive"):
        gbps(1, 0.0)


def test_saved_tensor_bytes_counts_each_storage_once():
    x = torch.randn(1000, requires_grad=True)
    assert saved_tensor_bytes(lambda: x * x) == x.nbytes            # x saved twice, one storage
    assert saved_tensor_bytes(lambda: x.exp()) == 1000 * 4           # the result
    assert saved_tensor_bytes(lambda: (x * 2).sum()) == 0            # nothing to save


def test_peak_memory_sees_a_large_temporary():
    peak = peak_memory(lambda: torch.ones(16 << 20), torch.device("cpu"))  # 64 MiB, touched
    if peak is None:
        pytest.skip("no /proc/self/clear_refs: RSS peaks cannot be measured here")
    assert peak >= 0.9 * 64 * MIB


def test_provider_names_and_cpu_rules():
    assert Provider("reference").name == "eager"
    assert Provider("reference", "default").name == "compile"
    assert Provider("reference", "max-autotune").name == "compile:max-autotune"
    assert Provider("triton", "default").name == "triton+compile"
    assert [p.name for p in model_providers(["default"])] == ["eager", "compile", "auto", "auto+compile"]
    cpu = {p.name: p.skip for p in providers("ctr_graph_conv", "cpu", ["default"])}
    assert cpu["eager"] is None and cpu["compile"] is None
    assert cpu["triton"] == TRITON_ON_CPU and cpu["triton+compile"] == TRITON_ON_CPU
    assert "cpp" in cpu  # every backend is listed, usable or with the reason why not
    assert [p.name for p in providers("bone", "cpu", [])][:1] == ["eager"]
    attention = [p.name for p in providers("cross_attention", "cpu", ["default"])]
    assert attention[:6] == ["eager", "compile", "sdpa", "sdpa+compile", "sdpa-math", "sdpa-efficient"]
    assert {"sdpa-flash", "sdpa-cudnn"} <= set(attention)
    assert not [name for name in cpu if name.startswith("sdpa")]  # only ops with an SDPA form


def attention_args(mask):
    """A tiny cross_attention call (N=3, Lq=5, Lk=7, dim 16, 4 heads, fp32) with ``mask``."""
    case = attention_case(3, 5, 7, 16, 4)
    inputs = case.make(torch.device("cpu"), torch.float32)
    x_q, x_kv, heads, *params, _, n_qw, n_qb, n_kvw, n_kvb = inputs.args
    return case, (x_q, x_kv, heads, *params, mask, n_qw, n_qb, n_kvw, n_kvb), inputs.grads


@pytest.mark.parametrize("provider", ["sdpa", "sdpa-math", "sdpa-flash"])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_provider_matches_the_op(provider, masked):
    """Outputs and every gradient, without a mask and with a partial one (rows with some keys,
    one key, no key: on CPU SDPA's math and flash kernels give a keyless row zero attention, as
    the op does)."""
    torch.manual_seed(0)
    mask = torch.tensor([[True, False, True, True, False, True, True],
                         [False, False, False, False, False, False, True],
                         [False] * 7]) if masked else None
    case, args, grads = attention_args(mask)
    y = case.function(provider)(*args)
    expected = case.function("reference")(*args)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, grads, dy), torch.autograd.grad(expected, grads, dy)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_cpp_provider_that_would_run_pytorchs_op_is_skipped_with_the_reason():
    from bharnet.bench.providers import backend_skip_reason, dtype_skip_reason

    for op in ("batch_norm", "pointwise_conv", "temporal_max_pool"):  # CPU-only C++ kernels
        assert "CPU-only: on cuda it runs PyTorch's op" in backend_skip_reason(op, "cpp", "cuda")
    assert backend_skip_reason("ctr_graph_conv", "cpp", "cuda") != backend_skip_reason("batch_norm", "cpp", "cuda")
    # batch_norm's kernels step aside under autocast
    assert "bf16 autocast it runs PyTorch's op" in dtype_skip_reason("batch_norm", "cpp", "cpu", "bf16")
    assert dtype_skip_reason("batch_norm", "cpp", "cpu", "fp32") is None
    for op in ("temporal_max_pool", "pointwise_conv"):  # (the latter's batched GEMM under autocast)
        assert dtype_skip_reason(op, "cpp", "cpu", "bf16") is None
    from bharnet.bench.runner import _what_auto_runs  # the models' auto= label says the same
    assert _what_auto_runs("batch_norm", "cpu", "bf16") == "reference"
    assert _what_auto_runs("pointwise_conv", "cpu", "bf16") == "cpp"
    assert _what_auto_runs("temporal_max_pool", "cpu", "bf16") == "cpp"


def test_a_full_run_times_a_cold_compile_and_a_quick_run_keeps_the_caches():
    from bharnet.bench.runner import _cold_compile

    for quick, disabled in ((False, True), (True, False)):
        with _cold_compile(Provider("reference", "default"), quick):
            assert torch._inductor.config.force_disable_caches is disabled
        with _cold_compile(Provider("reference"), quick):  # not compiled: nothing changes
            assert torch._inductor.config.force_disable_caches is False


def test_a_rejecting_sdpa_backend_raises_rejected_with_the_reason():
    case, args, _ = attention_args(None)
    with pytest.raises(Rejected, match="EFFICIENT_ATTENTION has no cpu kernel for these inputs"):
        case.function("sdpa-efficient")(*args)  # memory-efficient attention has no CPU kernel


def time_row(op, provider, ms):
    return Row(op, provider, "fwd+bwd", "time", "ms", "x", ms, ms, ms, "dtype=fp32", "cpu: Fake", "torch=2.11.0",
               "2026-01-01T00:00:00Z")


def test_cross_attention_ratios_are_against_sdpa_other_ops_against_eager():
    assert (baseline("cross_attention"), baseline("cross_attention", compiled=True)) == ("sdpa", "sdpa+compile")
    assert (baseline("ctr_graph_conv"), baseline("body", compiled=True)) == ("eager", "compile")
    for op, names in BASELINES.items():  # every baseline is one of the op's providers
        assert set(names) <= {p.name for p in providers(op, "cpu", ["default"])}
    rows = [time_row("cross_attention", "eager", 12.0), time_row("cross_attention", "sdpa", 6.0),
            time_row("cross_attention", "sdpa+compile", 4.0), time_row("cross_attention", "triton", 2.0),
            time_row("ctr_graph_conv", "eager", 9.0), time_row("ctr_graph_conv", "compile", 6.0),
            time_row("ctr_graph_conv", "triton", 3.0)]
    eager = {(op, p): v for (op, p, _, _, _), v in speedups(rows).items()}
    compiled = {(op, p): v for (op, p, _, _, _), v in speedups(rows, compiled=True).items()}
    assert eager[("cross_attention", "triton")] == pytest.approx(3.0)      # 6 / 2, not 12 / 2
    assert eager[("cross_attention", "eager")] == pytest.approx(0.5)
    assert compiled[("cross_attention", "triton")] == pytest.approx(2.0)   # 4 / 2
    assert eager[("ctr_graph_conv", "triton")] == pytest.approx(3.0)       # 9 / 3
    assert compiled[("ctr_graph_conv", "triton")] == pytest.approx(2.0)    # 6 / 3
    table = format_table(rows, [])
    assert "cross_attention  x  [dtype=fp32]  ratios vs sdpa / sdpa+compile" in table
    assert "ctr_graph_conv  x  [dtype=fp32]  ratios vs eager / compile" in table
    section = render(rows)
    assert "ms (speedup over the baseline: eager; sdpa for cross_attention)" in section
    assert "| cross_attention |  | fp32 | 12 (0.50x) | 6 | 4 (1.50x) | 2 (3.00x) | - |" in section
    assert "| ctr_graph_conv |  | fp32 | 9 | - | - | 3 (3.00x) | 6 (1.50x) |" in section


def fake_rows(timestamp, eager_ms, triton_ms):
    common = dict(device="cuda: Fake GPU", versions="torch=2.11.0;triton=3.6.0;bharnet=0.1.0",
                  timestamp=timestamp)
    config = "dtype=bf16;B=128;C=64;T=64;V=25"
    return [
        Row("copy", "torch", "copy", "bandwidth", "GB/s", "1024 MiB", 2900.0, 2800.0, 3000.0, "dtype=fp32", **common),
        Row("ctr_graph_conv", "eager", "fwd+bwd", "time", "ms", "C64 T64 V25", eager_ms, eager_ms, eager_ms, config, **common),
        Row("ctr_graph_conv", "triton", "fwd+bwd", "time", "ms", "C64 T64 V25", triton_ms, triton_ms, triton_ms, config, **common),
        Row("ctr_graph_conv", "triton", "fwd+bwd", "roofline", "%", "C64 T64 V25", 42.0, 40.0, 44.0, config, **common),
        Row("body", "eager", "train", "time", "ms", "N32 M2 T64", 300.0, 290.0, 310.0,
            "dtype=fp32;preset=full;N=32;M=2;T=64;classes=120", **common),
        Row("body", "eager", "train", "peak_mem", "MiB", "N32 M2 T64", 1024.0, 1024.0, 1024.0,
            "dtype=fp32;preset=full;N=32;M=2;T=64;classes=120", **common),
        Row("body", "eager", "train", "saved_mem", "MiB", "N32 M2 T64", 512.0, 512.0, 512.0,
            "dtype=fp32;preset=full;N=32;M=2;T=64;classes=120", **common),
    ]


def test_readme_has_an_inference_table_where_a_run_timed_the_forward_without_grad():
    common = dict(device="cpu: Fake CPU (2 cores)", versions="torch=2.11.0;triton=3.6.0;bharnet=0.1.0",
                  timestamp="2026-01-01T00:00:00Z")
    config = "dtype=bf16;B=2;C=64;T=64;V=25"
    rows = [Row("ctr_graph_conv", provider, mode, "time", "ms", "C64 T64 V25", ms, ms, ms, config, **common)
            for provider, mode, ms in (("eager", "fwd+bwd", 9.0), ("cpp", "fwd+bwd", 3.0),
                                       ("eager", NOGRAD, 2.0), ("cpp", NOGRAD, 0.5))]
    section = render(rows)
    assert "Ops, forward under `torch.no_grad`" in section
    assert "| ctr_graph_conv | B=2 C=64 T=64 V=25 | bf16 | 2 | 0.5 (4.00x) |" in section
    assert "| ctr_graph_conv | B=2 C=64 T=64 V=25 | bf16 | 9 | 3 (3.00x) |" in section  # fwd+bwd, as before
    assert "torch.no_grad" not in render([r for r in rows if r.mode != NOGRAD])


def test_readme_section_is_generated_from_the_latest_run(tmp_path):
    path = tmp_path / "cuda-fake-gpu.csv"
    write_csv(fake_rows("2026-01-01T00:00:00Z", 9.0, 3.0), str(path))
    write_csv(fake_rows("2026-02-01T00:00:00Z", 4.5, 1.5), str(path))  # the newer run wins
    section = render(read_csv(str(path)))
    assert section.startswith("## Performance")
    assert "### cuda: Fake GPU, 2026-02-01" in section and "2026-01-01" not in section
    assert "torch 2.11.0, triton 3.6.0" in section and "dtypes bf16, fp32" in section
    assert "| ctr_graph_conv | B=128 C=64 T=64 V=25 | bf16 | 4.5 | 1.5 (3.00x) | 42% |" in section
    assert "| body | training step | fp32, preset=full N=32 M=2 T=64 classes=120 | 300, 1.02e+03 MiB, saved 512 MiB |" in section
    assert "| op | shape | dtype | eager | triton | best % of copy BW |\n" in section  # one run: no run column
    assert "| run |" not in section and "column run" not in section

    readme = tmp_path / "README.md"
    readme.write_text(f"# project\n\nintro\n\n{START}\nold numbers\n{END}\n\n## After\n")
    plots = tmp_path / "bench" / "plots"
    plots.mkdir(parents=True)
    (plots / "cuda-fake-gpu_models.png").write_bytes(PNG_MAGIC)
    update_readme(str(readme), [str(path)], str(plots))
    text = readme.read_text()
    assert "old numbers" not in text and "1.5 (3.00x)" in text
    assert "Plots: [models](bench/plots/cuda-fake-gpu_models.png)." in text
    assert text.startswith("# project\n\nintro\n\n") and text.endswith(f"{END}\n\n## After\n")


def test_readme_rows_come_from_the_newest_run_that_measured_each_case(tmp_path):
    path = tmp_path / "cuda-fake-gpu.csv"
    older = fake_rows("2026-01-01T09:30:00Z", 9.0, 3.0)
    older += [replace(r, op="deformable_temporal_conv") for r in fake_rows("2026-01-01T09:30:00Z", 8.0, 4.0)
              if r.op == "ctr_graph_conv"]
    newer = [replace(r, versions="torch=2.12.0;triton=3.6.0;bharnet=0.1.0")  # only ctr_graph_conv (and copy)
             for r in fake_rows("2026-02-01T17:05:00Z", 6.0, 1.5) if r.op in ("copy", "ctr_graph_conv")]
    other_threads = [replace(r, op="bone", config=r.config + ";threads=4")  # not combined with the others
                     for r in fake_rows("2025-12-01T00:00:00Z", 1.0, 1.0) if r.op == "ctr_graph_conv"]
    write_csv(other_threads + older + newer, str(path))
    section = render(read_csv(str(path)))
    assert "### cuda: Fake GPU, 2026-01-01 to 2026-02-01" in section and "| bone |" not in section
    assert ("rows from the newest run that measured each case (column run); versions by run: 2026-01-01 09:30 "
            "torch 2.11.0, triton 3.6.0, bharnet 0.1.0; 2026-02-01 17:05 torch 2.12.0, triton 3.6.0") in section
    assert "| op | shape | dtype | eager | triton | best % of copy BW | run |" in section
    assert "| ctr_graph_conv | B=128 C=64 T=64 V=25 | bf16 | 6 | 1.5 (4.00x) | 42% | 2026-02-01 17:05 |" in section
    assert ("| deformable_temporal_conv | B=128 C=64 T=64 V=25 | bf16 | 8 | 4 (2.00x) | 42% "
            "| 2026-01-01 09:30 |") in section
    assert "3.00x" not in section and section.count("| ctr_graph_conv |") == 2  # time and memory tables, newer only
    assert ("| body | training step | fp32, preset=full N=32 M=2 T=64 classes=120 | 300, 1.02e+03 MiB, saved 512 MiB "
            "| 2026-01-01 09:30 |") in section
    # a --quick run after them (a smoke test) replaces nothing
    quick = [replace(r, op="bone", config=r.config + ";run=quick") for r in fake_rows("2026-03-01T00:00:00Z", 1.0, 1.0)]
    write_csv(quick, str(path))
    assert render(read_csv(str(path))) == section


def test_readme_markers_are_added_when_missing():
    text = replace_section("# project\n", "## Performance\n\nnumbers")
    assert text == f"# project\n\n{START}\n## Performance\n\nnumbers\n{END}\n"


def test_gpu_check_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("cpuinfo, name", [
    ("model name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\n", "AMD EPYC family 25 model 17"),
    ("model name\t: Intel(R) Xeon(R) Platinum 8480+\ncpu family\t: 6\nmodel\t\t: 143\n",
     "Intel(R) Xeon(R) Platinum 8480+"),
    ("model name\t: AMD EPYC\n", "AMD EPYC"),  # no family to add
    ("processor\t: 0\n", ""),
])
def test_a_cpu_without_a_model_number_is_named_by_family_and_model(cpuinfo, name):
    assert env.cpu_name(cpuinfo) == name
