"""bharnet.deploy: a trained model exported (torch.export, batch size free) and compiled ahead
of time (AOTInductor), each loaded in a fresh process that never builds the model, against the
model's own outputs; ``bharnet export``, which writes either from a run's weights."""
import subprocess
import sys
import textwrap

import pytest
import torch

from bharnet import deploy
from bharnet.cli import main
from bharnet.engine import checkpoint
from bharnet.engine.config import TrainConfig
from bharnet.engine.trainer import model_description
from bharnet.fast import fuse_for_inference
from trained_models import trained_like


def clips(batch, frames=6):
    """(body, hand, hand_valid) of ``batch`` random clips, hands detected in 70% of the frames."""
    g = torch.Generator().manual_seed(batch)
    hand_valid = torch.rand(batch, frames, 2, 2, generator=g) < 0.7
    return (torch.randn(batch, 3, frames, 25, 2, generator=g), torch.randn(batch, 3, frames, 42, 2, generator=g),
            hand_valid)


def run_in_fresh_process(tmp_path, loader: str, path, batch: int):
    """Logits and part logits of the saved model at ``path`` on ``clips(batch)``, computed by a
    new Python process that only imports bharnet.deploy and calls ``loader``."""
    body, hand, hand_valid = clips(batch)
    torch.save({"body": body, "hand": hand, "hand_valid": hand_valid}, tmp_path / "in.pt")
    script = textwrap.dedent(f"""
        import torch
        from bharnet import deploy
        inputs = torch.load({str(tmp_path / "in.pt")!r})
        loaded = deploy.{loader}({str(path)!r})
        run = loaded.module() if hasattr(loaded, "module") else loaded
        out = run(inputs["body"], inputs["hand"], inputs["hand_valid"])
        torch.save({{"logits": out.logits, **out.parts}}, {str(tmp_path / "out.pt")!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def expected(model, batch):
    with torch.no_grad():
        out = fuse_for_inference(model)(*clips(batch))
    return {"logits": out.logits, **out.parts}


def assert_same_outputs(got, want, rtol):
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=rtol * value.abs().max().item(), msg=name)


def test_exported_model_runs_any_batch_in_a_fresh_process(tmp_path):
    model = trained_like("bharnet-e", torch.float32)
    program = deploy.export(model, *clips(2), path=str(tmp_path / "model.pt2"))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"bharnet.ctr_graph_conv_cpp.default", "bharnet.deformable_temporal_conv_cpp.default",
            "bharnet.cross_attention_core_cpp.default"} <= targets  # the fused model's C++ kernels
    for batch in (1, 3):
        assert_same_outputs(run_in_fresh_process(tmp_path, "load", tmp_path / "model.pt2", batch),
                            expected(model, batch), 1e-6)


def saved_run(tmp_path, name, **options):
    """``trained_like(name, **options)`` saved as a run's ``model.safetensors`` (with the
    description bharnet train writes; window = the test clips' frames)."""
    model = trained_like(name, torch.float32, **options)
    config = TrainConfig(model=name, preset="small", window=clips(1)[0].shape[2],
                         model_options={k: list(v) if isinstance(v, tuple) else v for k, v in options.items()})
    path = str(tmp_path / f"{name}.safetensors")
    checkpoint.save_weights(path, model, model_description(config, 5))
    return model, path


def test_bharnet_export_aoti_package_runs_in_a_fresh_process(tmp_path, capsys):
    """``bharnet export --aoti``: the AOTInductor package of a run's weights, with their
    description, loaded by a process that never builds the model."""
    model, weights = saved_run(tmp_path, "body", channels=(16, 16), strides=(1, 1), stem_depth=1)  # compiles fast
    out = str(tmp_path / "deploy" / "body.pt2")
    assert main(["export", weights, out, "--aoti"]) == 0
    printed = capsys.readouterr().out  # every input, as clip_input gives them
    assert "hand (N, 3, 6, 42, 2)" in printed and "hand_valid (N, 6, 2, 2)" in printed
    assert_same_outputs(run_in_fresh_process(tmp_path, "load_package", out, 3), expected(model, 3), 1e-5)
    # the run's, the input's M and the program's inputs
    described = {**checkpoint.read_metadata(weights), "num_person": 2, "inputs": ["body", "hand", "hand_valid"]}
    assert deploy.read_metadata(out) == described
    runnable, meta = deploy.load_runnable(out)  # whichever kind the file is
    assert meta == described
    got = runnable(*clips(3))
    assert_same_outputs({"logits": got.logits, **got.parts}, expected(model, 3), 1e-5)


def test_bharnet_export_program_and_its_metadata(tmp_path, capsys):
    model, weights = saved_run(tmp_path, "bharnet-e")
    out = str(tmp_path / "bharnet-e.pt2")
    assert main(["export", weights, out]) == 0
    meta = deploy.read_metadata(out)
    assert meta == {**checkpoint.read_metadata(weights), "num_person": 2, "inputs": ["body", "hand", "hand_valid"]}
    assert meta["window"] == 6 and meta["modality"] == "joint" and meta["mask_missing_hands"] is True
    got = deploy.load(out).module()(*clips(3))
    assert_same_outputs({"logits": got.logits, **got.parts}, expected(model, 3), 1e-6)
    assert main(["export", weights, str(tmp_path / "model.so")]) == 2
    assert "bharnet export: error: the output file must end in .pt2" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.safetensors"), out]) == 2
    assert "does not exist" in capsys.readouterr().err
    torch.export.save(deploy.export(model, *clips(2)), str(tmp_path / "plain.pt2"))  # no metadata
    assert deploy.read_metadata(str(tmp_path / "plain.pt2")) == {}
    runnable, meta = deploy.load_runnable(str(tmp_path / "plain.pt2"))
    assert meta == {} and runnable(*clips(1)).logits.shape == (1, 5)
    torch.save({"x": 1}, tmp_path / "other.pt2")  # a zip, not a program
    for other in (weights, str(tmp_path / "other.pt2")):
        with pytest.raises(ValueError, match="not a program or package"):
            deploy.read_metadata(other)
    assert main(["export", out, str(tmp_path / "again.pt2")]) == 2  # the arguments swapped
    assert "not a model.safetensors" in capsys.readouterr().err


def test_deploy_errors(tmp_path):
    model = trained_like("body", torch.float32)
    with pytest.raises(ValueError, match="eval-mode model"):
        deploy.export(model.train(), *clips(2))
    with pytest.raises(FileNotFoundError, match="no exported model"):
        deploy.load(str(tmp_path / "missing.pt2"))
    with pytest.raises(FileNotFoundError, match="no AOTInductor package"):
        deploy.load_package(str(tmp_path / "missing.pt2"))
    with pytest.raises(ValueError, match="must end in .pt2"):
        deploy.compile_package(None, str(tmp_path / "model.so"))


def test_one_clip_example_and_a_missing_modality():
    """A one-clip example still gives a batch-free program; a single-modality model is exported
    and run with None for the input it does not read."""
    model = trained_like("bharnet-e", torch.float32)
    program = deploy.export(model, *clips(1))
    for batch in (1, 3):
        out = program.module()(*clips(batch))
        assert_same_outputs({"logits": out.logits, **out.parts}, expected(model, batch), 1e-6)
    body, hand, _ = clips(3)  # without hand_valid: a program of (body, hand) that attends every hand
    with torch.no_grad():
        want = fuse_for_inference(model)(body, hand).logits
    torch.testing.assert_close(deploy.export(model, *clips(1)[:2]).module()(body, hand).logits, want,
                               rtol=1e-6, atol=1e-6)
    body_model = trained_like("body", torch.float32)
    program = deploy.export(body_model, clips(2)[0], None)
    body3 = clips(3)[0]
    with torch.no_grad():
        want = fuse_for_inference(body_model)(body3, None).logits
    torch.testing.assert_close(program.module()(body3, None).logits, want, rtol=1e-6, atol=1e-6)


# C++ ops that no model graph contains: diagnostics, and the CPU linear layers' weight gradient,
# which only their backward calls (bharnet.ops.cpu_linear registers it as that runs)
NOT_IN_MODEL_GRAPHS = {"bharnet::cpu_vector_bytes", "bharnet::cpu_wide_calls", "bharnet::linear_weight_grad_cpp"}


def test_register_cpp_ops_gives_every_op_a_fake_impl_in_a_fresh_process():
    script = textwrap.dedent("""
        import torch
        from torch._library.simple_registry import singleton
        from bharnet import _ext, ops
        _ext.load()
        ops.register_cpp_ops()
        names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("bharnet::"))
        print(len(names))
        print(*[n for n in names if singleton.find(n).fake_impl.kernel is None])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    count, missing = result.stdout.splitlines()[-2:]
    assert int(count) > 20  # the extension's ops were listed
    assert set(missing.split()) == NOT_IN_MODEL_GRAPHS
