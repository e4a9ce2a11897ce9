"""``bharnet bench``: reference eager vs ``torch.compile`` vs the bharnet backends, side by side.

Modules: :mod:`.timing` (CPU wall-clock and CUDA-event timers with percentiles),
:mod:`.memory` (peak memory, bytes saved for backward), :mod:`.roofline` (bytes moved and
copy bandwidth), :mod:`.providers` (eager, compile, backends discovered at run time),
:mod:`.baselines` (cross_attention written with PyTorch's SDPA, its baseline),
:mod:`.op_cases` and :mod:`.model_cases` (what is measured), :mod:`.report` (CSV, table,
plots), :mod:`.readme` (the README's Performance section) and :mod:`.runner` (the command).
"""
from .runner import add_arguments, run

__all__ = ["add_arguments", "run"]
