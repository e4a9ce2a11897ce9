"""``bharnet train``, ``bharnet eval``, ``bharnet export`` and ``bharnet ensemble``."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

from .config import (AMP_MODES, COMPILE_MODES, TrainConfig, parse_model_options,
                     read_config_file)

# The built-in demo: small models that learn the synthetic dataset in minutes on two CPU cores.
DEMO_MODELS = ("body", "bharnet-e")
DEMO_CONFIG = dict(preset="small", modality="bone", window=32, epochs=8, batch_size=16, lr=0.05, warmup_epochs=1,
                   weight_decay=4e-4)
DEFAULT_SYNTHETIC_DIR = os.path.join(os.path.expanduser("~"), ".cache", "bharnet", "synthetic")

_TRAIN_FLAGS = {  # flag -> (TrainConfig field, type)
    "--model": ("model", str), "--data": ("data", str), "--out": ("out", str),
    "--preset": ("preset", str), "--modality": ("modality", str),
    "--preprocessing": ("preprocessing", str), "--window": ("window", int),
    "--epochs": ("epochs", int), "--batch-size": ("batch_size", int), "--lr": ("lr", float),
    "--weight-decay": ("weight_decay", float), "--warmup-epochs": ("warmup_epochs", int),
    "--amp": ("amp", str), "--backend": ("backend", str), "--device": ("device", str),
    "--workers": ("workers", int), "--seed": ("seed", int),
}


def _flag_choices() -> dict:
    """The values argparse accepts for the train flags that name one of a fixed set."""
    from ..data.features import MODALITIES, PREPROCESSINGS
    from ..models import MODELS
    from ..models.config import PRESETS
    from ..ops import BACKENDS
    return {"--model": list(MODELS), "--preset": list(PRESETS), "--modality": list(MODALITIES),
            "--preprocessing": list(PREPROCESSINGS), "--amp": list(AMP_MODES), "--backend": list(BACKENDS)}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON or TOML file of training options (flags override it)")
    choices = _flag_choices()
    for flag, (name, kind) in _TRAIN_FLAGS.items():
        default = getattr(TrainConfig(), name)
        demo = " and ".join(DEMO_MODELS) if name == "model" else DEMO_CONFIG.get(name)
        parser.add_argument(flag, dest=name, type=kind, default=None, choices=choices.get(flag),
                            help=None if default is None else f"(default: {default})" if demo is None
                            else f"(default: {default}; the demo without --data: {demo})")
    parser.add_argument("--compile", dest="compile", nargs="?", const="default", default=None,
                        choices=COMPILE_MODES, metavar="MODE",
                        help="train through torch.compile, in MODE (default: default; reduce-overhead "
                             "replays the steps as CUDA graphs on a GPU)")
    parser.add_argument("--model-option", dest="model_option", action="append", default=[],
                        metavar="KEY=VALUE", help="model option, e.g. attention_mode=sequence (repeatable)")
    parser.add_argument("--synthetic-dir", default=DEFAULT_SYNTHETIC_DIR,
                        help="where the built-in synthetic dataset is generated and cached")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace, base: dict) -> TrainConfig:
    values = dict(base)
    if args.config:
        values.update(read_config_file(args.config))
    for name, _ in _TRAIN_FLAGS.values():
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.compile:
        values["compile"], values["compile_mode"] = True, args.compile
    if args.model_option:
        values["model_options"] = {**values.get("model_options", {}), **parse_model_options(args.model_option)}
    return TrainConfig.from_dict(values)


def _train_one(config: TrainConfig, progress: bool) -> dict:
    from ..data.dataset import SkeletonDataset
    from .evaluate import evaluate_run
    from .trainer import train

    common = dict(modality=config.modality, window=config.window, preprocessing=config.preprocessing)
    train_set = SkeletonDataset(config.data, "train", seed=config.seed, **common)
    test_set = SkeletonDataset(config.data, "test", **common)
    if len(test_set) == 0:  # said before training, not after
        raise ValueError(f"the test split of {config.data} has no samples; bharnet train evaluates on it")
    train(config, train_set, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    return evaluate_run(os.path.join(config.out, "model.safetensors"), test_set,
                        os.path.join(config.out, "eval"), config.batch_size, config.device,
                        config.amp, config.backend, progress)


def format_results(results: dict) -> str:
    lines = [f"{'model':<16} {'top-1 (%)':>10} {'top-5 (%)':>10} {'hand-centric top-1 (%)':>23}",
             "-" * 62]
    for name, r in results.items():
        hand = "-" if r["hand_centric_top1"] is None else f"{r['hand_centric_top1']:.1f}"
        lines.append(f"{name:<16} {r['top1']:>10.1f} {r['top5']:>10.1f} {hand:>23}")
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    from ..data.synthetic import make_synthetic
    from . import distributed

    progress = not args.no_progress
    demo = args.data is None and not (args.config and "data" in read_config_file(args.config))
    config = config_from_args(args, DEMO_CONFIG if demo else {})
    if demo:
        print(f"no --data given: training on the built-in synthetic dataset ({args.synthetic_dir})")
        config = replace(config, data=make_synthetic(args.synthetic_dir))
    out = config.out or os.path.join("runs", "synthetic" if demo else f"{config.model}-{config.modality}")
    named = args.model is not None or (args.config and "model" in read_config_file(args.config))
    models = DEMO_MODELS if demo and not named else (config.model,)
    if demo and named and config.out is None:  # the demo's run of that model, not the demo's folder
        out = os.path.join(out, config.model)
    results = {}
    for name in models:
        run_config = replace(config, model=name, out=os.path.join(out, name) if len(models) > 1 else out)
        results[name] = _train_one(run_config, progress)  # errors: bharnet.cli.main
    distributed.shutdown()  # after the last model; not on an error, where other ranks may still wait
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    summary = {"models": {name: {"top1": r["top1"], "top5": r["top5"],
                                 "hand_centric_top1": r["hand_centric_top1"]} for name, r in results.items()},
               "data": config.data, "config": {k: v for k, v in config.to_dict().items() if k not in ("model", "out")}}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    print(f"\nTest results ({config.data}):\n")
    print(format_results(results))
    print(f"\nrun folder: {out} (metrics.json, per-model checkpoints, eval/ with scores and confusion.png)")
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from ..ops import BACKENDS
    parser.add_argument("weights", help="a run's model.safetensors")
    parser.add_argument("--data", required=True, help="prepared dataset folder")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--out", help="where scores, metrics.json and confusion.png go (default: beside the weights)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="none", choices=AMP_MODES)
    parser.add_argument("--backend", default=None, choices=BACKENDS,
                        help="backend of the fused layers (default: the model's impl option, else the global "
                             "default, auto); the model runs fused for inference "
                             "(bharnet.fast.fuse_for_inference)")
    parser.add_argument("--no-progress", action="store_true")


def check_weights_file(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; give the run's weights file in it (model.safetensors)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")


def run_eval(args: argparse.Namespace) -> int:
    from ..data.dataset import SkeletonDataset
    from .evaluate import evaluate_run, read_description

    check_weights_file(args.weights)
    meta = read_description(args.weights)
    dataset = SkeletonDataset(args.data, args.split, modality=meta["modality"], window=meta["window"],
                              preprocessing=meta["preprocessing"], train=False)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.weights)), f"eval-{args.split}")
    result = evaluate_run(args.weights, dataset, out, args.batch_size, args.device, args.amp,
                          args.backend, not args.no_progress)
    print(format_results({meta["model"]: result}))
    print(f"\nwritten to {out}")
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    from ..ops import BACKENDS
    parser.add_argument("weights", help="a run's model.safetensors")
    parser.add_argument("out", help="the file to write (.pt2)")
    parser.add_argument("--aoti", action="store_true",
                        help="compile ahead of time with AOTInductor (bharnet.deploy.compile_package; load with "
                             "deploy.load_package) instead of saving the torch.export program (deploy.load)")
    parser.add_argument("--backend", default="auto", choices=[b for b in BACKENDS if b != "triton"],
                        help="backend of the fused layers in the program, traced on the CPU (default: auto, the "
                             "C++ kernels)")


def run_export(args: argparse.Namespace) -> int:
    import torch

    from .. import deploy
    from ..graphs import BODY, HANDS
    from .evaluate import load_model, read_description

    check_weights_file(args.weights)
    if not args.out.endswith(".pt2"):
        raise ValueError(f"the output file must end in .pt2, got {args.out!r}")
    read_description(args.weights)  # a clear error for a file that is not a run's weights
    model, meta = load_model(args.weights)
    config, generator = model.config, torch.Generator().manual_seed(0)
    meta = {**meta, "num_person": config.num_person}  # the program's input shape, for bharnet.stream
    # every input, as clip_input gives them, also to a model that reads fewer (it ignores the rest)
    shapes = {name: (config.in_channels, meta["window"], graph.num_nodes, config.num_person)
              for name, graph in (("body", BODY), ("hand", HANDS))}
    shapes["hand_valid"] = (meta["window"], 2, config.num_person)
    example = [torch.randn(2, *shapes[name], generator=generator) for name in ("body", "hand")]
    example.append(torch.rand(2, *shapes["hand_valid"], generator=generator) < 0.8)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    program = deploy.export(model, *example, path=None if args.aoti else args.out, backend=args.backend,
                            metadata=meta)
    if args.aoti:
        deploy.compile_package(program, args.out, metadata=meta)
    inputs = ", ".join(f"{name} (N, {', '.join(map(str, shape))})" for name, shape in shapes.items())
    call = "(body, hand, hand_valid)"
    loader = f"load_package(path){call}" if args.aoti else f"load(path).module(){call}"
    print(f"{meta['model']} ({meta['modality']} features, {meta['window']} frames) written to {args.out}\n"
          f"inputs: {inputs}, N from 1 to {deploy.MAX_BATCH}; run with bharnet.deploy.{loader}; "
          f"bharnet.deploy.read_metadata(path) gives the description that bharnet.data.clip_input takes")
    return 0


def add_ensemble_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("eval_dirs", nargs="+", help="evaluation folders holding scores.npy and labels.npy")
    parser.add_argument("--weights", type=float, nargs="+", help="one weight per folder (default: all 1)")
    parser.add_argument("--data", help="the prepared dataset, to report hand-centric accuracy")


def run_ensemble(args: argparse.Namespace) -> int:
    from ..data.dataset import read_manifest
    from .ensemble import ensemble_dirs

    weights = args.weights or [1.0] * len(args.eval_dirs)
    if len(weights) != len(args.eval_dirs):
        raise ValueError(f"{len(weights)} --weights for {len(args.eval_dirs)} folders; "
                         "give one weight per folder")
    hand_centric = read_manifest(args.data)["hand_centric_classes"] if args.data else ()
    result = ensemble_dirs(args.eval_dirs, weights, hand_centric)
    print(format_results({f"ensemble of {len(args.eval_dirs)}": result}))
    return 0
