"""The ``bharnet`` command."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def _info(args) -> int:
    import torch

    from . import __version__
    from .bench.env import device_description
    from .info import format_table, model_table
    from .ops._backend import registered_ops, unavailable_reason

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"bharnet {__version__}  torch {torch.__version__}  triton {triton_version}  "
          f"cuda {'available' if torch.cuda.is_available() else 'not available'}")
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    for device in devices:  # the names bharnet bench files its results under
        print(device_description(torch.device(device)))
    print(f"backends that run here ({', '.join(devices)}):")
    for op in registered_ops():
        states = [f"{backend}/{device}" for backend in ("triton", "cpp") for device in devices
                  if unavailable_reason(op, backend, device) is None]
        print(f"  {op:<26} reference" + "".join(f", {s}" for s in states))
    print(f"\nVariants at NTU shapes (T={args.frames}, M={args.persons}, {args.classes} classes, "
          f"preset {args.preset}); FLOPs count a multiply-add as 2, one clip, forward only:\n")
    print(format_table(model_table(args.classes, args.frames, args.persons, args.preset)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bharnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench
    from .bench.runner import positive

    info = sub.add_parser("info", help="versions, available backends, model sizes and FLOPs")
    info.add_argument("--classes", type=positive(int), default=120)
    info.add_argument("--frames", type=positive(int), default=64)
    info.add_argument("--persons", type=positive(int), default=2)
    info.add_argument("--preset", default="full", choices=["full", "small"])
    info.set_defaults(func=_info)

    from .data import prepare
    from .engine import commands

    subcommands = [  # name, help, add_arguments, run
        ("train", "train a model (no --data: the built-in synthetic demo)",
         commands.add_train_arguments, commands.run_train),
        ("eval", "evaluate a trained model on a prepared dataset", commands.add_eval_arguments, commands.run_eval),
        ("export", "a trained model as one file that runs without its Python classes (torch.export or AOTInductor)",
         commands.add_export_arguments, commands.run_export),
        ("ensemble", "weighted score fusion of evaluated models", commands.add_ensemble_arguments,
         commands.run_ensemble),
        ("bench", "eager vs torch.compile vs bharnet backends, per op and per model", bench.add_arguments, bench.run),
        ("prepare", "convert raw NTU RGB+D skeletons (+ hands) into a dataset", prepare.add_arguments, prepare.run),
    ]
    for name, help_text, add_arguments, run in subcommands:
        command = sub.add_parser(name, help=help_text)
        add_arguments(command)
        command.set_defaults(func=run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run a command; a mistake in its arguments or inputs (a ValueError or a missing file), or
    a training run that diverged (FloatingPointError), is one line on stderr, ``bharnet
    <command>: error: ...``, and exit status 2; with ``BHARNET_TRACEBACK=1`` in the environment
    the error is raised with its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        if os.environ.get("BHARNET_TRACEBACK") == "1":
            raise
        print(f"bharnet {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
