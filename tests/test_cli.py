import subprocess
import sys

import torch

import bharnet
from bharnet.bench.env import device_description
from bharnet.cli import main
from bharnet.info import forward_flops
from bharnet.ops._backend import registered_ops


def test_info_prints_every_variant(capsys):
    assert main(["info", "--preset", "small", "--frames", "16", "--classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "multiply-add as 2" in out
    assert device_description(torch.device("cpu")) in out.splitlines()  # the bench's name for this CPU
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and "reference" in line]
    assert listed == registered_ops() and "temporal_max_pool" in listed
    if not torch.cuda.is_available():  # only backends that can run on this machine
        assert "/cuda" not in out and "cpp/cpu" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.split() and line.split()[0] in bharnet.MODELS}
    assert sorted(rows) == sorted(bharnet.MODELS)
    params = {name: float(cols[0]) for name, cols in rows.items()}
    gflops = {name: float(cols[1]) for name, cols in rows.items()}
    assert all(v > 0 for v in params.values()) and all(v > 0 for v in gflops.values())
    assert gflops["unified"] > gflops["body"]  # 67 joints against 25
    assert params["bharnet-e"] > params["bharnet-vanilla"]  # two branches per modality


class BodyLinear(torch.nn.Module):
    def __init__(self, frames):
        super().__init__()
        self.fc = torch.nn.Linear(3 * frames * 25 * 2, 10, bias=False)

    def forward(self, body, hand):
        return self.fc(body.flatten(1))


def test_flops_count_a_multiply_add_as_two():
    assert forward_flops(BodyLinear(4), frames=4) == 2 * (3 * 4 * 25 * 2) * 10


def test_flops_scale_with_frames():
    model = bharnet.create_model("body", 10, preset="small")
    short, long = forward_flops(model, frames=16), forward_flops(model, frames=32)
    assert abs(long / short - 2) < 0.02  # everything but the classifier scales with T


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "bharnet.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "info" in result.stdout
