import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bharnet.cli import main
from bharnet.data.dataset import SkeletonDataset
from bharnet.engine import checkpoint
from bharnet.engine.config import RunFolderMismatch, TrainConfig, parse_model_options
from bharnet.engine.ensemble import ensemble_dirs
from bharnet.engine.evaluate import evaluate_run, load_model, predict
from bharnet.engine.schedule import warmup_cosine
from bharnet.engine.trainer import build_model, make_optimizer, train

FAST = dict(preset="small", window=8, batch_size=4, lr=0.05, warmup_epochs=1)


def config(data, out, **kw):
    return TrainConfig.from_dict({**FAST, "data": data, "out": str(out), "model": "body", **kw})


def weights(run_dir):
    return load_file(os.path.join(run_dir, "model.safetensors"))


def test_fused_sgd_makes_the_updates_of_plain_sgd():
    """The trainer's fused SGD (CPU) against torch's for-loop SGD with the same options, over
    three steps with momentum, Nesterov and weight decay (float32 rounding only)."""
    cfg = TrainConfig.from_dict({**FAST, "data": "unused", "out": "unused", "model": "body"})
    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    plain_model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    plain_model.load_state_dict(fused_model.state_dict())
    initial = {name: value.clone() for name, value in fused_model.state_dict().items()}
    fused = make_optimizer(fused_model, cfg, torch.device("cpu"))
    plain = torch.optim.SGD(plain_model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                            weight_decay=cfg.weight_decay, foreach=False)
    assert fused.defaults["fused"] is True
    for step in range(3):
        x = torch.randn(4, 7, generator=torch.Generator().manual_seed(step))
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
    for (name, a), b in zip(fused_model.state_dict().items(), plain_model.state_dict().values()):
        assert (a - initial[name]).abs().max() > 1e-3, name  # the steps moved every tensor
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_fp16_training_survives_a_skipped_first_step():
    """Under fp16 the gradient scaler skips steps with inf gradients, often the very first (its
    initial scale is 2^16); torch's fused SGD then left its new momentum buffers uninitialised and
    the next step added garbage. The trainer's optimizer under fp16 is the unfused one."""
    cfg = TrainConfig.from_dict({**FAST, "data": "unused", "out": "unused", "model": "body", "amp": "fp16"})
    model = torch.nn.Linear(64, 64)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    assert not optimizer.defaults["fused"]
    scaler = torch.amp.GradScaler("cpu")
    for overflow in (True, False, False):
        optimizer.zero_grad()
        loss = model(torch.ones(2, 64)).sum() * (float("inf") if overflow else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert all(torch.isfinite(p).all() and p.abs().max() < 10 for p in model.parameters())


def test_a_diverged_run_stops_before_its_checkpoint_and_eval_refuses_nan_scores(tiny_dataset, tmp_path, capsys):
    from bharnet.engine.evaluate import metrics

    run = tmp_path / "diverged"
    argv = ["train", "--data", tiny_dataset, "--model", "body", "--preset", "small", "--window", "8",
            "--epochs", "3", "--lr", "1e30", "--warmup-epochs", "0", "--out", str(run), "--no-progress"]
    assert main(argv) == 2  # the first epoch's steps make the weights huge, the second's loss is NaN
    err = capsys.readouterr().err
    assert err.startswith("bharnet train: error: training diverged in epoch 2") and "Traceback" not in err, err
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["epoch-0001.safetensors"]
    assert not (run / "model.safetensors").exists()
    with pytest.raises(FloatingPointError, match="scores of 1 of 3 samples are NaN"):
        metrics(np.array([[0.1, 0.9], [np.nan, 0.0], [0.3, 0.2]]), np.array([1, 0, 0]))


def test_warmup_cosine_schedule():
    lrs = [warmup_cosine(s, 10, 2, 1.0, 0.1) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)  # cosine starts at the base rate
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # then decays monotonically
    assert warmup_cosine(10, 10, 2, 1.0, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("workers, dropout, killed", [(0, 0.0, "after"), (1, 0.5, "after"), (0, 0.0, "during")])
def test_killed_and_resumed_run_ends_where_an_uninterrupted_one_does(tiny_dataset, tmp_path, monkeypatch,
                                                                      workers, dropout, killed):
    """Killed after epoch 2's checkpoint was saved, or while it was being saved (after the epoch
    was logged); with a data-loader worker and dropout, the global generator behind dropout must
    not depend on when the loader's persistent workers started."""
    options = dict(epochs=3, workers=workers, model_options={"dropout": dropout})
    dataset = SkeletonDataset(tiny_dataset, "train", window=8, seed=0)
    straight = config(tiny_dataset, tmp_path / "straight", **options)
    train(straight, dataset, progress=False)

    real_save = checkpoint.save_checkpoint
    calls = []

    def save_then_die(*args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == 2 and killed == "during":
            raise KeyboardInterrupt("simulated kill while saving epoch 2")
        path = real_save(*args, **kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill after epoch 2")
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    resumed = config(tiny_dataset, tmp_path / "resumed", **options)
    with pytest.raises(KeyboardInterrupt):
        train(resumed, SkeletonDataset(tiny_dataset, "train", window=8, seed=0), progress=False)
    assert not os.path.exists(tmp_path / "resumed" / "model.safetensors")
    if killed == "during":  # and a log line cut short
        with open(tmp_path / "resumed" / "log.jsonl", "a", encoding="utf-8") as handle:
            handle.write('{"epoch": 3, "st')
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    train(resumed, SkeletonDataset(tiny_dataset, "train", window=8, seed=0), progress=False)

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    log = [json.loads(line) for line in open(tmp_path / "resumed" / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    # named after the epochs done, as the log counts them
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["epoch-0002.safetensors", "epoch-0003.safetensors"]
    assert checkpoint.read_metadata(str(tmp_path / "resumed" / "checkpoints" / "epoch-0003.safetensors"))["epochs_done"] == 3


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def disk_full(tensors, path, metadata):
        open(path, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_atomically(str(tmp_path / "epoch-0001.safetensors"), {"w": torch.ones(2)}, {"step": 1})
    assert os.listdir(tmp_path) == []


def test_checkpoints_hold_no_pickles_and_describe_the_model(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_dataset, run, epochs=1, model="bharnet-p"), SkeletonDataset(tiny_dataset, "train", window=8),
          progress=False)
    meta = checkpoint.read_metadata(str(run / "model.safetensors"))
    assert meta["model"] == "bharnet-p" and meta["num_classes"] == 4 and meta["preset"] == "small"
    assert meta["class_names"] == list(SkeletonDataset(tiny_dataset, "train").class_names)
    with open(run / "model.safetensors", "rb") as handle:
        assert b"\x80\x04" not in handle.read(64)  # a safetensors header, not a pickle stream


def test_an_option_the_model_ignores_is_reported_when_it_trains_not_when_it_loads(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"body does not use the model option\(s\) \['heads'\]"):
        train(config(tiny_dataset, run, epochs=1, model="body", model_options={"heads": 2}),
              SkeletonDataset(tiny_dataset, "train", window=8), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, meta = load_model(str(run / "model.safetensors"))
    assert meta["model_options"] == {"heads": 2}


def test_train_cli_then_eval_and_ensemble(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--data", tiny_dataset, "--model", "bharnet-e", "--preset", "small", "--window", "8",
            "--epochs", "1", "--batch-size", "4", "--out", str(out), "--no-progress",
            "--model-option", "attention_mode=sequence"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "bharnet-e" in printed and "hand-centric" in printed
    summary = json.load(open(out / "metrics.json"))
    result = summary["models"]["bharnet-e"]
    assert 0 <= result["top1"] <= 100 and 0 <= result["hand_centric_top1"] <= 100
    assert json.load(open(out / "config.json"))["model_options"] == {"attention_mode": "sequence"}
    for name in ("scores.npy", "labels.npy", "metrics.json", "confusion.png"):
        assert (out / "eval" / name).exists()

    assert main(["eval", str(out / "model.safetensors"), "--data", tiny_dataset, "--no-progress"]) == 0
    evaluated = json.load(open(out / "eval-test" / "metrics.json"))
    assert evaluated["top1"] == pytest.approx(result["top1"])  # same weights, same test set
    # eval runs the model fused for inference: the unfused model's scores up to rounding
    model, meta = load_model(str(out / "model.safetensors"))
    test_set = SkeletonDataset(tiny_dataset, "test", modality=meta["modality"], window=meta["window"],
                               preprocessing=meta["preprocessing"], train=False)
    unfused = predict(model, test_set, progress=False)
    assert np.abs(np.load(out / "eval-test" / "scores.npy") - unfused).max() <= 1e-4 * np.abs(unfused).max()
    assert main(["ensemble", str(out / "eval"), str(out / "eval-test"), "--data", tiny_dataset]) == 0
    assert "ensemble of 2" in capsys.readouterr().out
    names = (out / "eval-test" / "names.txt").read_text().splitlines()
    assert names == test_set.names
    # two samples of one class in swapped order: the labels agree, the names do not
    first, second = [i for i, label in enumerate(test_set.labels) if label == test_set.labels[0]][:2]
    names[first], names[second] = names[second], names[first]
    (out / "eval-test" / "names.txt").write_text("".join(n + "\n" for n in names))
    with pytest.raises(ValueError, match="eval-test was made on other samples, or in another order, than"):
        ensemble_dirs([str(out / "eval"), str(out / "eval-test")], [1.0, 1.0])


def test_demo_path_trains_both_models(tiny_dataset, tmp_path, monkeypatch, capsys):
    import bharnet.data.synthetic as synthetic
    from bharnet.engine import commands

    monkeypatch.setattr(synthetic, "make_synthetic", lambda directory: tiny_dataset)
    monkeypatch.setattr(commands, "DEMO_CONFIG", {**FAST, "epochs": 1})
    assert main(["train", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    summary = json.load(open(tmp_path / "demo" / "metrics.json"))
    assert sorted(summary["models"]) == ["bharnet-e", "body"]
    assert set(summary["models"]["body"]) == {"top1", "top5", "hand_centric_top1"}
    table = capsys.readouterr().out
    assert "body" in table and "bharnet-e" in table


def test_the_demo_with_a_named_model_trains_into_that_models_folder(tiny_dataset, tmp_path, monkeypatch, capsys):
    """``bharnet train --model body`` without --data nor --out trains the demo's body run
    (runs/synthetic/body), and leaves the demo's own metrics.json alone."""
    import bharnet.data.synthetic as synthetic
    from bharnet.engine import commands

    monkeypatch.setattr(synthetic, "make_synthetic", lambda directory: tiny_dataset)
    monkeypatch.setattr(commands, "DEMO_CONFIG", {**FAST, "epochs": 1})
    monkeypatch.chdir(tmp_path)
    demo = tmp_path / "runs" / "synthetic"
    assert main(["train", "--no-progress"]) == 0
    summary = (demo / "metrics.json").read_text()
    assert main(["train", "--model", "body", "--no-progress"]) == 0
    assert (demo / "metrics.json").read_text() == summary
    assert sorted(json.loads((demo / "body" / "metrics.json").read_text())["models"]) == ["body"]
    assert "already holds 1 trained epochs" in capsys.readouterr().out  # the demo's body run


def test_cli_says_what_is_wrong_with_plausible_mistakes(tiny_dataset, tmp_path, monkeypatch, capsys):
    import bharnet.data.synthetic as synthetic
    from bharnet.engine import commands

    monkeypatch.setattr(synthetic, "make_synthetic", lambda directory: tiny_dataset)
    monkeypatch.setattr(commands, "DEMO_CONFIG", {**FAST, "epochs": 1})
    (tmp_path / "c.toml").write_text('model = "body"\n')
    out = tmp_path / "demo"
    # the demo trains the model a config file names (it trained body and bharnet-e)
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--out", str(out), "--no-progress"]) == 0
    assert sorted(json.load(open(out / "metrics.json"))["models"]) == ["body"]
    checkpoint_file = sorted((out / "checkpoints").iterdir())[-1]
    assert main(["eval", str(checkpoint_file), "--data", tiny_dataset, "--no-progress"]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_model(str(checkpoint_file))
    monkeypatch.undo()  # the real make_synthetic again
    other = synthetic.make_synthetic(tmp_path / "five", num_classes=5, num_hand_centric=2,
                                     samples_per_class_train=1, samples_per_class_test=1, frames=16)
    capsys.readouterr()
    assert main(["eval", str(out / "model.safetensors"), "--data", other, "--no-progress"]) == 2
    assert "bharnet eval: error:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="classifies 4 classes, the dataset at .* has 5"):
        evaluate_run(str(out / "model.safetensors"), SkeletonDataset(other, "test", window=8), str(tmp_path / "e"))
    renamed = synthetic.make_synthetic(tmp_path / "renamed", num_classes=4, num_hand_centric=1,
                                       samples_per_class_train=1, samples_per_class_test=1, frames=16)
    with pytest.raises(ValueError, match="trained on other classes .* class 2 is 'clench fist' there and 'squat' here"):
        evaluate_run(str(out / "model.safetensors"), SkeletonDataset(renamed, "test", window=8), str(tmp_path / "e"))
    # mistakes in arguments or inputs are one line and exit status 2, not a traceback
    train_args = ["--data", tiny_dataset, "--preset", "small", "--window", "8", "--out", str(tmp_path / "bad")]
    monkeypatch.delenv("TRITON_INTERPRET")  # (set by conftest.py) so that the Triton backend cannot run on a CPU
    for argv, message in ((["train", "--data", str(tmp_path / "nope")], "manifest.json"),
                          (["train", "--data", tiny_dataset, "--epochs", "0"], "epochs must be >= 1"),
                          (["train", *train_args, "--model-option", "foo=1"], "unknown model option(s) ['foo']"),
                          (["train", *train_args, "--model-option", "heads=0"], "heads must be >= 1"),
                          (["train", *train_args, "--device", "gpu"], "got 'gpu'"),
                          (["train", *train_args, "--backend", "triton"], "backend 'triton' cannot run"),
                          (["eval", str(out), "--data", tiny_dataset], "is a folder; give the run's weights file"),
                          (["ensemble", str(out)], "has no scores.npy or labels.npy: pass evaluation folders"),
                          (["ensemble", str(out / "eval"), "--weights", "-1"], "weights must be >= 0")):
        assert main(argv + (["--no-progress"] if argv[0] in ("train", "eval") else [])) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"bharnet {argv[0]}: error:") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    assert main(["ensemble", str(out / "eval"), "--weights", "0.5", "0.5"]) == 2
    assert "2 --weights for 1 folders" in capsys.readouterr().err
    monkeypatch.setenv("BHARNET_TRACEBACK", "1")  # the error itself, with its traceback
    with pytest.raises(ValueError, match="2 --weights for 1 folders"):
        main(["ensemble", str(out / "eval"), "--weights", "0.5", "0.5"])


def _empty_split(root, split):
    """Rewrite ``split`` of the prepared dataset at ``root`` with no samples."""
    from bharnet.data.dataset import SplitWriter, read_manifest, split_summary, write_manifest

    manifest = read_manifest(root)
    with SplitWriter(os.path.join(root, split), 0, manifest["max_frames"]) as writer:
        writer.commit()
    manifest["splits"][split] = split_summary(np.zeros(0, np.int64), manifest["num_classes"])
    write_manifest(root, {k: v for k, v in manifest.items() if not k.endswith("version") and k != "format"})


def train_command(argv):
    """``bharnet train argv`` with its errors raised (``main`` prints them)."""
    from bharnet.cli import build_parser
    args = build_parser().parse_args(["train", *argv])
    return args.func(args)


def test_an_empty_split_is_said_before_training(tmp_path):
    from bharnet.data.synthetic import make_synthetic

    for split, message in (("test", "test split of .* has no samples"), ("train", "nothing to train on")):
        data = make_synthetic(tmp_path / split, num_classes=4, num_hand_centric=2, samples_per_class_train=2,
                              samples_per_class_test=1, frames=16)
        _empty_split(data, split)
        with pytest.raises(ValueError, match=message):
            train_command(["--data", data, "--model", "body", "--preset", "small", "--window", "8",
                           "--epochs", "1", "--out", str(tmp_path / f"run-{split}"), "--no-progress"])
        assert not (tmp_path / f"run-{split}").exists()  # nothing written, not even config.json


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="seed must be >= 0"):
        TrainConfig.from_dict({"seed": -1})
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['epoch'\]"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="amp must be one of"):
        TrainConfig.from_dict({"amp": "int8"})
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TrainConfig.from_dict({"compile": True, "compile_mode": "fast"})
    with pytest.raises(ValueError, match="key=value"):
        parse_model_options(["heads"])
    with pytest.raises(ValueError, match="epochs must be an int, got '1'"):  # e.g. a quoted value in a config file
        TrainConfig.from_dict({"epochs": "1"})
    with pytest.raises(ValueError, match="lr must be a number"):
        TrainConfig.from_dict({"lr": "0.1"})
    with pytest.raises(ValueError, match=r"model options: unknown model option\(s\) \['foo'\]"):
        TrainConfig.from_dict({"model_options": {"foo": 1}})
    assert parse_model_options(["heads=4", "attention_mode=sequence", "channels=[8,16]"]) == {
        "heads": 4, "attention_mode": "sequence", "channels": [8, 16]}
    path = tmp_path / "c.toml"
    path.write_text('epochs = 3\nmodel = "body"\n')
    from bharnet.engine.config import read_config_file
    assert read_config_file(str(path)) == {"epochs": 3, "model": "body"}


def test_distributed_training_with_two_gloo_processes(tiny_dataset, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
               "-m", "bharnet.cli", "train", "--data", tiny_dataset, "--model", "body", "--preset", "small",
               "--window", "8", "--epochs", "1", "--batch-size", "8", "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 1  # only rank 0 logs
    assert log[0]["step"] == 2  # 16 samples, global batch 8 split over 2 ranks
    assert log[0]["samples"] == 16  # the loss and accuracy cover both ranks' shards (8 each)
    assert (out / "model.safetensors").exists() and (out / "metrics.json").exists()


def test_train_leaves_the_process_group_it_joined(tiny_dataset, tmp_path, monkeypatch):
    """Under torchrun, ``bharnet train`` leaves the gloo group once training is done: a process that
    exits while in it can abort ("terminate called without an active exception"). One process
    stands in for rank 0 of two; its group is a real one-process gloo group."""
    import torch.distributed as dist

    join = dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend: join(backend, store=dist.HashStore(), rank=0, world_size=1))
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    try:
        assert main(["train", "--data", tiny_dataset, "--model", "body", "--preset", "small", "--window", "8",
                     "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8", "--out", str(tmp_path / "run"),
                     "--no-progress"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_each_distributed_rank_draws_its_own_dropout_masks(tiny_dataset, tmp_path, monkeypatch):
    """Under torchrun each rank seeds dropout from ``(seed, epoch, rank)``: two ranks draw
    different masks (they drew the same ones when every rank seeded alike), and a rank
    draws the same masks again in a second run. The ranks are simulated one after the other
    (no process group; DDP's gradient averaging does not touch the masks)."""
    from bharnet.engine import distributed, trainer
    masks = []

    def recording_dropout(input, p=0.5, training=True, inplace=False):
        keep = real_dropout(torch.ones_like(input), p, training) != 0
        masks.append(keep)
        return input * keep / (1 - p) if training else input

    real_dropout = torch.nn.functional.dropout
    monkeypatch.setattr(torch.nn.functional, "dropout", recording_dropout)
    monkeypatch.setattr(trainer, "DistributedDataParallel", lambda model: model)
    monkeypatch.setattr(distributed, "barrier", lambda context: None)
    monkeypatch.setattr(distributed, "sum_over_ranks", lambda context, values, device: list(values))
    drawn = {}
    for run, rank in enumerate([0, 1, 1]):
        monkeypatch.setattr(distributed, "init", lambda device_type, rank=rank: distributed.Context(rank, 2, 0))
        masks.clear()
        train(config(tiny_dataset, tmp_path / f"rank{rank}-{run}", epochs=2, model_options={"dropout": 0.5}),
              SkeletonDataset(tiny_dataset, "train", window=8, seed=0), progress=False)
        assert len(masks) == 8  # 2 epochs of 4 steps: 8 of the 16 samples per rank, batch 2 per rank
        drawn.setdefault(rank, []).append(torch.cat([m.flatten() for m in masks]))
    assert torch.equal(drawn[1][0], drawn[1][1])
    assert not torch.equal(drawn[0][0], drawn[1][0])
    assert trainer.epoch_seed(0, 1, 0) not in (trainer.epoch_seed(0, 0, 0), trainer.epoch_seed(0, 1, 1),
                                              trainer.epoch_seed(1, 1, 0))
    # rank r's dropout stream is not the augmentation stream of sample r (both from seed, epoch, r)
    dataset = SkeletonDataset(tiny_dataset, "train", window=8, seed=0)
    for rank in range(4):
        torch.manual_seed(trainer.epoch_seed(0, 0, rank))
        assert not torch.equal(torch.rand(8), torch.rand(8, generator=dataset._generator(rank)))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_on_cpu(tiny_dataset, tmp_path, amp):
    run = tmp_path / amp
    train(config(tiny_dataset, run, epochs=1, amp=amp), SkeletonDataset(tiny_dataset, "train", window=8),
          progress=False)
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert len(log) == 1 and log[0]["loss"] == log[0]["loss"] and log[0]["loss"] > 0  # finite, not NaN
    state = weights(run)
    assert all(v.dtype == torch.float32 or not v.is_floating_point() for v in state.values())  # master weights stay fp32
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    if amp == "fp16":  # the gradient scaler's state travels in the checkpoint and resumes
        ckpt = checkpoint.latest_checkpoint(str(run / "checkpoints"))
        assert checkpoint.read_metadata(ckpt)["scaler"]["scale"] > 0
        train(config(tiny_dataset, run, epochs=2, amp=amp), SkeletonDataset(tiny_dataset, "train", window=8),
              progress=False)
        assert [json.loads(line)["epoch"] for line in open(run / "log.jsonl")] == [1, 2]


def test_each_step_loss_is_read_after_the_next_step_is_queued(tiny_dataset, tmp_path, monkeypatch):
    """The trainer reads a step's loss on the host (``.item()``, the progress bar) only after
    the next step's forward has run, so on a GPU the host never waits for the step it has just
    queued; the epoch's logged loss is still the sample-weighted mean of every step's loss."""
    from bharnet.engine import trainer
    forwards, losses, reads = [0], [], []
    build = trainer.build_model

    def counting_model(*args):
        model = build(*args)
        model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        loss = model.loss

        def recording_loss(out, label):
            value = loss(out, label)
            losses.append((value.detach(), label.shape[0]))
            return value
        model.loss = recording_loss
        return model
    item = torch.Tensor.item

    def recording_item(self):
        reads.append((self, forwards[0]))
        return item(self)
    monkeypatch.setattr(trainer, "build_model", counting_model)
    monkeypatch.setattr(torch.Tensor, "item", recording_item)
    run = tmp_path / "run"
    train(config(tiny_dataset, run, epochs=1), SkeletonDataset(tiny_dataset, "train", window=8), progress=True)
    assert len(losses) == 4  # 16 samples, batch 4
    for step, (value, _) in enumerate(losses[:-1]):
        read_at = [when for tensor, when in reads if tensor.data_ptr() == value.data_ptr()]
        assert read_at == [step + 2], step  # once, after forward step + 2 (1-based) started
    logged = json.loads(open(run / "log.jsonl").readline())["loss"]
    expected = sum(float(v) * n for v, n in losses) / sum(n for _, n in losses)
    assert logged == pytest.approx(expected, rel=1e-12)


# BHaRNet-E at its smallest (a one-block stem, one block per branch, the cross-attention between
# them): every kind of fused layer, and a graph that compiles in a fraction of the small preset's time
TWO_BLOCKS = {"channels": [16, 16], "strides": [1, 1], "stem_depth": 1}


def _assert_compiled_step_matches_eager(data, tmp_path, device, compile_mode, model, rtol, **options):
    """One training step (the 16 samples in one batch) eager and through torch.compile in
    ``compile_mode`` moves every parameter tensor by the same update up to ``rtol`` (norm-wise,
    plus 1e-6 for the biases in front of a training-mode BatchNorm: their gradient is zero up to
    rounding, so their updates, at most 1e-5 here, are rounding noise that differs between runs;
    the other tensors' updates agree to 2e-4). One step: later ones amplify the compiled kernels' other rounding (checked: the
    first step's loss agrees to 2e-7 and its gradients to 1e-4, the weights after four steps
    differ by up to 1e-3)."""
    runs = {}
    for compiled in (False, True):
        run = tmp_path / f"compiled{compiled}"
        cfg = config(data, run, model=model, epochs=1, batch_size=16, device=device, compile=compiled,
                     compile_mode=compile_mode, **options)
        train(cfg, SkeletonDataset(data, "train", window=8), progress=False)
        assert json.loads(open(run / "log.jsonl").readline())["step"] == 1
        runs[compiled] = weights(run)
    torch.manual_seed(cfg.seed)  # the initial weights, as train() draws them
    initial = build_model(cfg, 4).state_dict()  # (the dataset's 4 classes)
    for name, eager in runs[False].items():
        update = (eager - initial[name].to(eager.device)).double()
        difference = (runs[True][name] - eager).double()
        assert difference.norm() <= rtol * update.norm() + 1e-6, (name, difference.norm(), update.norm())


def test_compiled_training_in_reduce_overhead_mode_matches_eager(tiny_dataset, tmp_path, capsys, monkeypatch):
    """``--compile reduce-overhead`` (CUDA graphs on a GPU; on the CPU torch.compile skips them)
    makes the eager run's update, through the CLI's flag. The body model on CPU (a cold compile
    of the two-block BHaRNet-E takes about 2 minutes here), as on the GPU."""
    from bharnet.engine.commands import add_train_arguments, config_from_args
    import argparse
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    assert config_from_args(parser.parse_args(["--compile"]), {}).compile_mode == "default"
    parsed = config_from_args(parser.parse_args(["--compile", "reduce-overhead"]), {})
    assert parsed.compile and parsed.compile_mode == "reduce-overhead"
    with pytest.raises(SystemExit):
        parser.parse_args(["--compile", "fast"])
    assert "invalid choice" in capsys.readouterr().err
    modes, compile_model = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode: modes.append(mode) or compile_model(model, mode=mode))
    _assert_compiled_step_matches_eager(tiny_dataset, tmp_path, "cpu", "reduce-overhead", "body", 1e-3,
                                        backend="cpp", model_options=TWO_BLOCKS)
    assert modes == ["reduce-overhead"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_cuda_graph_training_matches_eager_on_gpu(tiny_dataset, tmp_path, backend):
    """On a GPU, ``compile_mode="reduce-overhead"`` replays the steps as CUDA graphs, with the
    fused layers (Triton kernels, or the CUDA kernels of the C++ extension) inside them. The
    body model: compiling the two-block BHaRNet-E for training took over 2 minutes on the H200
    (the GPU check's whole test budget); BHaRNet-E's cross-attention runs under CUDA graphs in
    ``bharnet bench --compile train --compile-mode reduce-overhead``."""
    _assert_compiled_step_matches_eager(tiny_dataset, tmp_path, "cuda", "reduce-overhead", "body", 1e-2,
                                        backend=backend, model_options=TWO_BLOCKS)


def test_a_run_folder_resumes_only_with_its_own_options(tiny_dataset, tmp_path, capsys):
    """Re-running into a finished run folder with other options raises instead of silently
    resuming the old run (and then reporting the new options); more epochs extend it; the same
    or fewer epochs train nothing and say so."""
    run = tmp_path / "run"
    dataset = SkeletonDataset(tiny_dataset, "train", window=8)
    train(config(tiny_dataset, run, epochs=1, model_options={"channels": (16, 16), "strides": (1, 1),
                                                             "stem_depth": 1}), dataset, progress=True)
    options = {"channels": [16, 16], "strides": [1, 1], "stem_depth": 1}  # as the CLI parses them
    with pytest.raises(ValueError, match=r"other options \(lr 0.05 -> 0.01\)"):
        train(config(tiny_dataset, run, epochs=2, lr=0.01, model_options=options), dataset, progress=False)
    capsys.readouterr()
    train(config(tiny_dataset, run, epochs=1, model_options=options, workers=0), dataset, progress=True)
    assert "already holds 1 trained epochs (--epochs 1); nothing to train" in capsys.readouterr().out
    train(config(tiny_dataset, run, epochs=2, model_options=options), dataset, progress=True)
    assert "(epoch 2 of 2)" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in open(run / "log.jsonl")] == [1, 2]
    # the same dataset spelled another way (a trailing slash, an absolute path) is the same run
    for spelling in (tiny_dataset.rstrip("/") + "/", os.path.abspath(tiny_dataset)):
        train(config(spelling, run, epochs=3, model_options=options), dataset, progress=False)
    assert [json.loads(line)["epoch"] for line in open(run / "log.jsonl")] == [1, 2, 3]


def test_resuming_does_not_repeat_the_saved_options_warnings(tmp_path):
    """A run folder's saved options are parsed to compare them with the current ones; their
    warnings (here warmup_epochs >= epochs) were given when the run started, and not again."""
    from bharnet.engine import trainer

    run = tmp_path / "run"
    run.mkdir()
    saved = TrainConfig(out=str(run), epochs=1, warmup_epochs=5)
    (run / "config.json").write_text(json.dumps(saved.to_dict()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer._check_resumable(replace(saved, epochs=2))
    assert not caught, [str(w.message) for w in caught]


def test_a_checkpoint_of_bharnet_0_1_0_resumes_after_the_epoch_it_names(tiny_dataset, tmp_path, capsys):
    """Files written before checkpoints were numbered by epochs done hold the 0-based epoch
    index ("epoch") and were named after it; resuming from one trains the epochs after it."""
    run = tmp_path / "run"
    dataset = SkeletonDataset(tiny_dataset, "train", window=8)
    train(config(tiny_dataset, run, epochs=2), dataset, progress=False)
    newest = run / "checkpoints" / "epoch-0002.safetensors"
    tensors, meta = load_file(str(newest)), checkpoint.read_metadata(str(newest))
    meta["epoch"] = meta.pop("epochs_done") - 1
    for path in (run / "checkpoints").iterdir():
        path.unlink()
    checkpoint.save_atomically(str(run / "checkpoints" / "epoch-0001.safetensors"), tensors, meta)
    os.remove(run / "model.safetensors")
    capsys.readouterr()
    train(config(tiny_dataset, run, epochs=3), dataset, progress=False)
    assert "(epoch 3 of 3)" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in open(run / "log.jsonl")] == [1, 2, 3]


def test_a_finished_run_without_checkpoints_is_not_trained_over(tiny_dataset, tmp_path, capsys):
    """Once its checkpoints are deleted (the clean-up of a finished run), a run folder is not
    retrained from scratch: its model, config and log stay."""
    run = tmp_path / "run"
    args = ["train", "--data", tiny_dataset, "--model", "body", "--preset", "small", "--window", "8", "--epochs",
            "1", "--batch-size", "4", "--out", str(run), "--no-progress"]
    assert main(args) == 0
    for path in (run / "checkpoints").iterdir():
        path.unlink()
    kept = {name: (run / name).read_bytes() for name in ("model.safetensors", "config.json", "log.jsonl")}
    capsys.readouterr()
    for extra in ([], ["--lr", "0.3"]):
        assert main(args + extra) == 2
        assert "holds a finished run" in capsys.readouterr().err
        assert {name: (run / name).read_bytes() for name in kept} == kept
    os.remove(run / "model.safetensors")  # as the message says: then it trains again
    assert main(args + ["--lr", "0.3"]) == 0
    assert json.loads((run / "config.json").read_text())["lr"] == 0.3


def test_train_cli_refuses_a_run_folder_of_other_options(tiny_dataset, tmp_path, capsys):
    args = ["train", "--data", tiny_dataset, "--model", "body", "--preset", "small", "--window", "8", "--epochs",
            "1", "--batch-size", "4", "--out", str(tmp_path / "run"), "--no-progress", "--model-option",
            "channels=[16,16]", "--model-option", "strides=[1,1]", "--model-option", "stem_depth=1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--lr", "0.01"]) == 2
    assert "bharnet train: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--amp", "bf17"])
    assert "invalid choice: 'bf17'" in capsys.readouterr().err


def test_a_model_that_reads_hands_is_refused_on_a_dataset_without_them(tiny_dataset, tmp_path):
    import shutil
    from bharnet.data.dataset import read_manifest, write_manifest

    handless = tmp_path / "handless"
    shutil.copytree(tiny_dataset, handless)
    manifest = read_manifest(str(handless))
    manifest["has_hands"] = False  # as bharnet prepare writes without --hands
    write_manifest(str(handless), {k: v for k, v in manifest.items() if not k.endswith("version") and k != "format"})
    for model in ("hand", "unified", "bharnet-e"):
        with pytest.raises(ValueError, match=f"{model} reads hand keypoints, but .* was prepared without them"):
            train(config(str(handless), tmp_path / model, epochs=1, model=model),
                  SkeletonDataset(str(handless), "train", window=8), progress=False)
        assert not (tmp_path / model).exists()
    run = tmp_path / "hand-run"
    train(config(tiny_dataset, run, epochs=1, model="hand"), SkeletonDataset(tiny_dataset, "train", window=8),
          progress=False)
    with pytest.raises(ValueError, match="hand reads hand keypoints"):
        evaluate_run(str(run / "model.safetensors"), SkeletonDataset(str(handless), "test", window=8),
                     str(tmp_path / "eval"), progress=False)
    train(config(str(handless), tmp_path / "body", epochs=1), SkeletonDataset(str(handless), "train", window=8),
          progress=False)  # a body model is fine


def test_colour_space_hands_under_canonical_preprocessing_train_a_body_model_only(tiny_dataset, tmp_path):
    """Canonical preprocessing cannot place hands in colour-image pixels: it serves them as
    undetected (with a warning), so a body model trains and a model that reads hands is refused
    with what to do; calibration-free preprocessing serves them as stored."""
    import shutil
    from bharnet.data.dataset import read_manifest, write_manifest

    colour = tmp_path / "colour"
    shutil.copytree(tiny_dataset, colour)
    manifest = read_manifest(str(colour))
    manifest["hand_space"] = "color"  # as bharnet prepare --hand-space color writes
    write_manifest(str(colour), {k: v for k, v in manifest.items() if not k.endswith("version") and k != "format"})
    with pytest.warns(UserWarning, match="hands are served as undetected .*'color' space"):
        dataset = SkeletonDataset(str(colour), "train", window=8)
    assert not dataset[0][1].any() and SkeletonDataset(tiny_dataset, "train", window=8)[0][1].any()
    calibration_free = SkeletonDataset(str(colour), "train", window=8, preprocessing="calibration-free")
    assert calibration_free.hands_withheld is None and calibration_free[0][1].any()
    with pytest.raises(ValueError, match="bharnet-e reads hand keypoints, but canonical preprocessing .*"
                                         "--preprocessing calibration-free"):
        train(config(str(colour), tmp_path / "bharnet-e", epochs=1, model="bharnet-e"), dataset, progress=False)
    train(config(str(colour), tmp_path / "body", epochs=1), dataset, progress=False)
    assert (tmp_path / "body" / "model.safetensors").exists()


def test_a_fresh_start_drops_the_log_of_an_attempt_killed_before_its_first_checkpoint(tiny_dataset, tmp_path,
                                                                                        monkeypatch):
    run = tmp_path / "run"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_dataset, run, epochs=2), SkeletonDataset(tiny_dataset, "train", window=8), progress=False)
    assert [json.loads(line)["epoch"] for line in open(run / "log.jsonl")] == [1]
    monkeypatch.undo()
    train(config(tiny_dataset, run, epochs=2), SkeletonDataset(tiny_dataset, "train", window=8), progress=False)
    assert [json.loads(line)["epoch"] for line in open(run / "log.jsonl")] == [1, 2]


def test_a_warmup_as_long_as_the_training_is_said():
    with pytest.warns(UserWarning, match=r"warmup_epochs \(5\) >= epochs \(3\).* ramps up, to 0.06"):
        TrainConfig.from_dict({"epochs": 3, "lr": 0.1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig.from_dict({"epochs": 6, "lr": 0.1})


def test_training_and_evaluation_give_the_model_the_hands_detections(tiny_dataset, tmp_path, monkeypatch):
    """The trainer and ``predict`` call ``model(body, hand, hand_valid)`` with the dataset's
    detections (the synthetic hands drop out in some frames)."""
    from bharnet.models.variants import BHaRNetE

    seen, forward = [], BHaRNetE.forward

    def recording_forward(self, body, hand, hand_valid=None):
        seen.append(hand_valid)
        return forward(self, body, hand, hand_valid)

    monkeypatch.setattr(BHaRNetE, "forward", recording_forward)
    model = train(config(tiny_dataset, tmp_path / "run", epochs=1, model="bharnet-e"),
                  SkeletonDataset(tiny_dataset, "train", window=8), progress=False)
    test_set = SkeletonDataset(tiny_dataset, "test", window=8)
    trained, seen[:] = list(seen), []
    predict(model, test_set, batch_size=len(test_set), progress=False)
    assert len(trained) == 4 and len(seen) == 1  # 16 training samples in batches of 4; one test batch
    expected = torch.stack([test_set[i][2] for i in range(len(test_set))])
    assert torch.equal(seen[0], expected) and not expected.all()
    assert all(v.dtype == torch.bool and v.shape == (4, 8, 2, 2) for v in trained)


def test_a_run_whose_checkpoints_predate_the_hand_mask_resumes_unmasked(tiny_dataset, tmp_path):
    """Checkpoints written before ``mask_missing_hands`` existed come from a model that attended
    every hand token: the run resumes so (the option unset), its final description records it,
    and asking for the mask is refused as a change of options."""
    run = tmp_path / "run"
    dataset = SkeletonDataset(tiny_dataset, "train", window=8)
    train(config(tiny_dataset, run, epochs=1, model="bharnet-e"), dataset, progress=False)
    newest = str(run / "checkpoints" / "epoch-0001.safetensors")
    tensors, meta = load_file(newest), checkpoint.read_metadata(newest)
    assert meta.pop("mask_missing_hands") is True
    checkpoint.save_atomically(newest, tensors, meta)  # as written before the option
    os.remove(run / "model.safetensors")
    with pytest.raises(RunFolderMismatch, match="trained with mask_missing_hands=False, not True"):
        train(config(tiny_dataset, run, epochs=2, model="bharnet-e", model_options={"mask_missing_hands": True}),
              dataset, progress=False)
    model = train(config(tiny_dataset, run, epochs=2, model="bharnet-e", model_options={"mask_missing_hands": False}),
                  dataset, progress=False)  # the value the run was trained with, given
    assert model.config.mask_missing_hands is False
    os.remove(run / "model.safetensors")
    # resumed again, unset, from a checkpoint that records False (this once turned the mask on)
    model = train(config(tiny_dataset, run, epochs=3, model="bharnet-e"), dataset, progress=False)
    assert model.config.mask_missing_hands is False
    assert checkpoint.read_metadata(str(run / "model.safetensors"))["mask_missing_hands"] is False
    assert load_model(str(run / "model.safetensors"))[0].config.mask_missing_hands is False
    # a body run resumes without the option (the body model does not read it: no warning)
    body_run = tmp_path / "body"
    train(config(tiny_dataset, body_run, epochs=1), dataset, progress=False)
    os.remove(body_run / "model.safetensors")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="bharnet: .* does not use the model option")
        train(config(tiny_dataset, body_run, epochs=2), dataset, progress=False)
