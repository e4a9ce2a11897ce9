"""bench/recompute_v.py: each variant measured on one model, the default restored."""
import sys
from pathlib import Path

import torch

from bharnet.bench.model_cases import ModelCase
from bharnet.bench.timing import TimerSettings
from bharnet.nn import recompute

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import recompute_v  # noqa: E402


def test_compare_measures_each_variant_and_restores_the_default():
    default = recompute.recomputes
    case = ModelCase("body", "train", "small", 2, 2, 16)
    results = recompute_v.compare(case, torch.device("cpu"), "fp32", "auto", rounds=1,
                                  settings=TimerSettings(warmup=0, min_reps=1, min_time_s=0.0))
    assert recompute.recomputes is default
    assert all(ms > 0 for ms, _, _ in results.values())
    saved = {name: s for name, (_, _, s) in results.items()}
    # the C++ kernels keep the outputs by default; recomputed, they are not saved
    assert 0 < saved["v and BN inputs"] < saved["v"] < saved["kept"]
