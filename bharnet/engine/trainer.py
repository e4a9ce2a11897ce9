"""The training loop: SGD (Nesterov) with warm-up + cosine, label smoothing, autocast,
gradient scaling for fp16, optional torch.compile and fused layers, atomic checkpoints that
resume to the same result, JSONL logs and a progress bar."""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
import warnings
from dataclasses import replace
from typing import Optional, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..fast import swap_layers
from ..models import ModelConfig, create_model, variant_options
from ..ops._backend import has_backend, unavailable_reason
from . import checkpoint, distributed
from .config import RunFolderMismatch, TrainConfig
from .schedule import warmup_cosine

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:  # torch's "Expected one of cpu, cuda, ... device type at start of device string"
        raise ValueError(f"device must be 'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1', "
                         f"got {name!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available")
    return device


def autocast(config: TrainConfig, device: torch.device):
    if config.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[config.amp])


def build_model(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    options = dict(config.model_options)
    options.setdefault("label_smoothing", config.label_smoothing)
    model = create_model(config.model, num_classes, preset=config.preset, **options)
    if config.backend is not None:
        swap_layers(model, config.backend)
    return model


def check_inputs_exist(model: torch.nn.Module, name: str, dataset) -> None:
    """Refuse a model that reads hands on a dataset prepared without them, or whose hands its
    preprocessing withholds (the hand arrays are all zero: the model would run on nothing and
    score at chance)."""
    if not getattr(model, "uses_hand", False):
        return
    if not getattr(dataset, "manifest", {}).get("has_hands", True):
        raise ValueError(f"{name} reads hand keypoints, but {dataset.root} was prepared without them "
                         "(bharnet prepare --hands ...); use a body-only model (--model body) on it")
    if getattr(dataset, "hands_withheld", None):
        raise ValueError(f"{name} reads hand keypoints, but {dataset.hands_withheld}")


def model_description(config: TrainConfig, num_classes: int, class_names: Optional[Sequence[str]] = None) -> dict:
    """What :func:`bharnet.engine.evaluate.load_model` needs to rebuild the model, and the
    names of its classes (``class_names``, label order; absent from files written before
    bharnet stored them). ``mask_missing_hands`` is the model option's value, recorded because
    files written before the option existed hold models trained without the mask."""
    description = {"model": config.model, "num_classes": num_classes, "preset": config.preset,
                   "model_options": dict(config.model_options), "label_smoothing": config.label_smoothing,
                   "modality": config.modality, "preprocessing": config.preprocessing, "window": config.window,
                   "mask_missing_hands": config.model_options.get("mask_missing_hands",
                                                                  ModelConfig.mask_missing_hands)}
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        description["class_names"] = list(class_names)
    return description


class JsonlLog:
    def __init__(self, path: Optional[str]):
        self.path = path

    def keep_epochs(self, last: int) -> None:
        """Drop the records of epochs after ``last`` (1-based): a run killed after logging an
        epoch but before its checkpoint was saved trains that epoch again when resumed. A line
        cut short by the kill goes too."""
        if self.path is None or not os.path.isfile(self.path):
            return
        with open(self.path, "r", encoding="utf-8") as handle:
            lines = [line for line in handle if _logged_epoch(line) <= last]
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(lines)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _logged_epoch(line: str) -> float:
    """The epoch of a ``log.jsonl`` line; infinity for a line that is not a whole record."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


# Options a resumed run may change: more epochs extend it (the learning-rate schedule follows
# the new total), the others do not change what is computed (up to rounding).
RESUMABLE_CHANGES = ("epochs", "out", "workers", "keep_checkpoints", "device", "compile", "compile_mode", "backend")


def _check_resumable(config: TrainConfig) -> None:
    """Raise if ``config.out`` holds a run trained with other options than ``config``'s (its
    ``config.json``), so that re-running with new options cannot silently resume the old run.
    ``mask_missing_hands`` is left to :func:`_resumed_config`, which compares it with what the
    checkpoints record."""
    path = os.path.join(config.out, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, "r", encoding="utf-8") as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the saved options' warnings: the current ones' were given
        saved = _without_mask_option(json.loads(json.dumps(TrainConfig.from_dict(json.load(handle)).to_dict())))
    current = _without_mask_option(json.loads(json.dumps(config.to_dict())))  # as saved (tuples become lists)
    for values in (saved, current):  # the same folder however it is spelled (ds, ds/, /abs/ds)
        if values["data"] is not None:
            values["data"] = os.path.realpath(values["data"])
    changed = {name: (saved[name], value) for name, value in current.items()
               if name not in RESUMABLE_CHANGES and saved[name] != value}
    if changed:
        listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items())
        raise RunFolderMismatch(f"{config.out} holds a {saved['model']} run trained with other options ({listed}): "
                         "resume it with its own options, or train into another --out folder")


def _without_mask_option(values: dict) -> dict:
    options = {k: v for k, v in values["model_options"].items() if k != "mask_missing_hands"}
    return {**values, "model_options": options}


def _resumed_config(config: TrainConfig, latest: str) -> TrainConfig:
    """``config`` checked to resume the run whose newest checkpoint is ``latest``
    (:func:`_check_resumable`), with the ``mask_missing_hands`` that the checkpoint records: the
    run goes on as it was trained. Checkpoints written before the option existed come from
    models that attended every hand token (False). Asking for another value is refused."""
    _check_resumable(config)
    if "mask_missing_hands" not in variant_options(config.model):
        return config
    recorded = checkpoint.read_metadata(latest).get("mask_missing_hands", False)
    given = config.model_options.get("mask_missing_hands")
    if given is not None and given != recorded:
        raise RunFolderMismatch(f"{config.out} holds a run trained with mask_missing_hands={recorded}, not "
                                f"{given}: resume it with its own options, or train into another --out folder")
    return replace(config, model_options={**config.model_options, "mask_missing_hands": recorded})


def _check_no_finished_run(config: TrainConfig) -> None:
    """Raise if ``config.out`` holds a finished run (its ``model.safetensors``) but no checkpoint
    to resume from (removed once the run was done): a fresh start would replace its model, config
    and log."""
    final = os.path.join(config.out, "model.safetensors")
    if os.path.isfile(final):
        raise RunFolderMismatch(f"{config.out} holds a finished run ({final}) and no checkpoint to resume from: "
                                "train into another --out folder, or delete that file to train the run again "
                                "from scratch")


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.SGD:
    """SGD with Nesterov momentum and weight decay; torch's fused implementation on CPU and CUDA
    (one kernel over all parameters instead of several ops per tensor: 13.6 -> 3.6 ms per step
    for BHaRNet-E's 1,310 parameter tensors on this project's 2-core EPYC, ~3% of a CPU training
    step; the same updates up to rounding), except with fp16's gradient scaling: when the scaler
    skips the very first step (inf gradients, common at its initial scale), torch 2.14.1's fused
    SGD leaves the momentum buffers it creates uninitialised, and the next step adds whatever
    memory held (the weights went to NaN within two steps)."""
    fused = device.type in ("cpu", "cuda") and config.amp != "fp16"
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True,
                           weight_decay=config.weight_decay, fused=True if fused else None)


def check_backends_run(model: torch.nn.Module, device: torch.device) -> None:
    """Raise ``ValueError`` if a fused layer of ``model`` names a backend (its ``impl``) that
    cannot run on ``device`` (e.g. ``triton`` on a CPU): before anything is written or trained,
    rather than at the first step."""
    for module in model.modules():
        op, impl = getattr(module, "fused_op", None), getattr(module, "impl", None)
        if op is not None and impl not in (None, "auto", "reference") and has_backend(op, impl):
            reason = unavailable_reason(op, impl, device.type)
            if reason is not None:
                raise ValueError(f"backend {impl!r} cannot run {op} on {device.type}: {reason}")


def check_not_diverged(model: torch.nn.Module, epoch: int, loss: float, amp: str) -> None:
    """Raise if training made a parameter or buffer (BatchNorm statistics) NaN or infinite, or,
    without fp16's gradient scaling (whose skipped steps may have an infinite loss), the epoch's
    loss: before that epoch's checkpoint is written, so that no checkpoint or final weights hold
    a diverged model."""
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        what = f"{len(bad)} parameter or buffer tensor(s) hold NaN or inf (first: {bad[0]})"
    elif not math.isfinite(loss) and amp != "fp16":
        what = f"its loss is {loss}"
    else:
        return
    raise FloatingPointError(f"training diverged in epoch {epoch}: {what}; no checkpoint was written for this "
                             "epoch. Train into another --out folder with a lower --lr (or more --warmup-epochs), "
                             "or with --amp bf16 instead of fp16")


DROPOUT_STREAM, LOADER_STREAM = 1, 2  # SeedSequence spawn keys, apart from the dataset's (seed, epoch, index)


def derived_seed(stream: int, *entropy: int) -> int:
    """A 64-bit seed that is a pure function of ``entropy`` and distinct per ``stream``."""
    state = np.random.SeedSequence(list(entropy), spawn_key=(stream,)).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of torch's global generators (dropout) for one process's epoch: a pure function
    of ``(seed, epoch, rank)``, so DDP ranks draw different dropout masks and a resumed run
    draws what an uninterrupted one does (checkpoints hold no generator state)."""
    return derived_seed(DROPOUT_STREAM, seed, epoch, rank)


def _inputs(batch, device):
    body, hand, hand_valid, label = batch
    return (body.to(device, non_blocking=True), hand.to(device, non_blocking=True),
            hand_valid.to(device, non_blocking=True), label.to(device))


def train(config: TrainConfig, train_set, progress: bool = True) -> torch.nn.Module:
    """Train ``config.model`` on ``train_set`` (a :class:`~bharnet.data.SkeletonDataset`),
    resuming from the newest checkpoint in ``<out>/checkpoints`` when there is one. Writes
    ``config.json``, ``log.jsonl``, checkpoints and the final ``model.safetensors`` to
    ``config.out``. Returns the trained model (unwrapped)."""
    if config.out is None:
        raise ValueError("config.out (the run folder) must be set")
    device = resolve_device(config.device)
    context = distributed.init(device.type)
    per_rank_batch = max(1, config.batch_size // context.world_size)
    sampler = DistributedSampler(train_set, num_replicas=context.world_size, rank=context.rank,
                                 shuffle=True, seed=config.seed, drop_last=True)
    if len(sampler) == 0:
        raise ValueError(f"the training split of {config.data} has {len(train_set)} samples, fewer than "
                         f"the {context.world_size} processes: nothing to train on")
    ckpt_dir = os.path.join(config.out, "checkpoints")
    num_classes = train_set.num_classes
    latest = checkpoint.latest_checkpoint(ckpt_dir)
    if latest is not None:
        config = _resumed_config(config, latest)
    torch.manual_seed(config.seed)
    model = build_model(config, num_classes).to(device)
    check_backends_run(model, device)
    check_inputs_exist(model, config.model, train_set)
    optimizer = make_optimizer(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    log = JsonlLog(os.path.join(config.out, "log.jsonl") if context.is_main else None)
    start_epoch, step = 0, 0
    if latest is not None:
        start_epoch, step = checkpoint.load_checkpoint(latest, model, optimizer, scaler)
        log.keep_epochs(start_epoch)
        if context.is_main and start_epoch >= config.epochs:
            print(f"{config.model}: {config.out} already holds {start_epoch} trained epochs "
                  f"(--epochs {config.epochs}); nothing to train")
        elif context.is_main:
            print(f"resuming {config.model} from {latest} (epoch {start_epoch + 1} of {config.epochs})")
    else:  # a fresh start: no record of an earlier attempt stays (one killed before its first checkpoint)
        _check_no_finished_run(config)
        log.keep_epochs(0)
        if context.is_main:
            os.makedirs(config.out, exist_ok=True)
            with open(os.path.join(config.out, "config.json"), "w", encoding="utf-8") as handle:
                json.dump(config.to_dict(), handle, indent=2)

    # its own generator, one per rank: the loader's workers take their base seed from it when an
    # epoch starts (once, with persistent workers), not from the global generator behind dropout
    loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler,
                        generator=torch.Generator().manual_seed(derived_seed(LOADER_STREAM, config.seed, context.rank)),
                        num_workers=config.workers, drop_last=len(sampler) > per_rank_batch,
                        pin_memory=device.type == "cuda", persistent_workers=config.workers > 0)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = steps_per_epoch * config.warmup_epochs
    runner = DistributedDataParallel(model) if context.distributed else model
    runner = torch.compile(runner, mode=config.compile_mode) if config.compile else runner
    raw_model = model

    for epoch in range(start_epoch, config.epochs):
        torch.manual_seed(epoch_seed(config.seed, epoch, context.rank))
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        runner.train()
        started, losses, correct, sizes = time.time(), [], 0, []
        bar = tqdm(loader, desc=f"{config.model} epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not (progress and context.is_main), dynamic_ncols=True)
        for batch in bar:
            lr = warmup_cosine(step, total_steps, warmup_steps, config.lr, config.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            body, hand, hand_valid, label = _inputs(batch, device)
            if config.compile:  # CUDA graphs (mode reduce-overhead) may reuse the last step's outputs
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(config, device):
                out = runner(body, hand, hand_valid)
                loss = raw_model.loss(out, label)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            correct += (out.logits.argmax(1) == label).sum()  # stays on the device until epoch end
            losses.append(loss.detach())
            sizes.append(label.shape[0])
            if len(losses) > 1:  # the previous step's loss: this step's kernels are queued by now
                bar.set_postfix(loss=f"{losses[-2].item():.3f}", lr=f"{lr:.4f}")
        # one transfer of the epoch's losses; summed in float64 in step order
        loss_sum = sum(value * size for value, size in zip(torch.stack(losses).tolist(), sizes)) if losses else 0.0
        # the epoch's numbers over every process's shard (rank 0 logs them)
        loss_sum, correct, seen = distributed.sum_over_ranks(context, [loss_sum, int(correct), sum(sizes)], device)
        record = {"epoch": epoch + 1, "step": step, "samples": int(seen), "loss": loss_sum / max(seen, 1),
                  "train_top1": 100.0 * correct / max(seen, 1), "lr": lr,
                  "seconds": round(time.time() - started, 2)}
        log.write(record)
        check_not_diverged(raw_model, epoch + 1, record["loss"], config.amp)
        if context.is_main:
            print(f"{config.model} epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f}, "
                  f"train top-1 {record['train_top1']:.1f}%, {record['seconds']:.1f} s")
            checkpoint.save_checkpoint(ckpt_dir, epoch + 1, step, raw_model, optimizer, scaler,
                                       config.to_dict(), keep=config.keep_checkpoints,
                                       mask_missing_hands=raw_model.config.mask_missing_hands)
        distributed.barrier(context)

    if context.is_main:
        checkpoint.save_weights(os.path.join(config.out, "model.safetensors"), raw_model,
                                model_description(config, num_classes, train_set.class_names))
    distributed.barrier(context)
    return raw_model
