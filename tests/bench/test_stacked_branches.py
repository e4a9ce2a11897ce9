"""bench/stacked_branches.py: both variants measured on one model, the stacking restored."""
import sys
from pathlib import Path

import torch

from bharnet.bench.model_cases import ModelCase
from bharnet.bench.timing import TimerSettings
from bharnet.nn import MultiScaleTemporalConv

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import stacked_branches  # noqa: E402


def test_compare_measures_both_variants_and_restores_the_stacking(monkeypatch):
    stacked = MultiScaleTemporalConv._stacked_heads
    calls = []

    def counted(self):
        heads = stacked(self)
        calls.append(heads is not None)
        return heads
    monkeypatch.setattr(stacked_branches, "STACKED_HEADS", counted)
    monkeypatch.setattr(MultiScaleTemporalConv, "_stacked_heads", stacked)  # the class as it was, after
    case = ModelCase("body", "train", "small", 2, 2, 16)
    results = stacked_branches.compare(case, torch.device("cpu"), "fp32", "auto", rounds=1,
                                       settings=TimerSettings(warmup=0, min_reps=1, min_time_s=0.0))
    assert MultiScaleTemporalConv._stacked_heads is counted  # restored (to the patched original)
    assert all(ms > 0 for ms, _, _ in results.values())
    assert calls and all(calls)  # the stacked variant stacked
    saved = {name: s for name, (_, _, s) in results.items()}
    assert saved["stacked"] == saved["one by one"]
