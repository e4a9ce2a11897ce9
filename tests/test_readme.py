"""The README's first usage example runs as printed."""
import math
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_the_use_example_runs_as_printed():
    text = README.read_text()
    section = text[text.index("\n## Use\n"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    namespace = {}
    exec(compile(code, "README.md (Use)", "exec"), namespace)
    out, loss, model = namespace["out"], namespace["loss"], namespace["model"]
    assert out.logits.shape == (8, 120) and sorted(out.parts) == ["z_BE", "z_BI", "z_HE", "z_HI"]
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_live_stream_example_runs_as_printed(tmp_path, monkeypatch):
    """With ``bharnet-e.pt2`` written by ``bharnet export`` and a ``tracker`` of 20 frames."""
    import numpy as np
    import torch

    from bharnet.cli import main
    from bharnet.data.synthetic import generate_sample
    from bharnet.engine import checkpoint
    from bharnet.engine.config import TrainConfig
    from bharnet.engine.trainer import model_description
    from trained_models import trained_like

    weights = str(tmp_path / "model.safetensors")
    config = TrainConfig(model="bharnet-e", preset="small", modality="bone", window=12)
    checkpoint.save_weights(weights, trained_like("bharnet-e", torch.float32), model_description(config, 5))
    assert main(["export", weights, str(tmp_path / "bharnet-e.pt2")]) == 0
    body, hand, valid = (torch.from_numpy(a) for a in generate_sample(6, 5, 20, np.random.default_rng(0)))
    tracker = [(body[:, t], hand[:, t], valid[t]) for t in range(20)]
    code = next(block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
                if "LiveRecognizer" in block)
    monkeypatch.chdir(tmp_path)
    namespace = {"tracker": tracker}
    exec(compile(code, "README.md (live stream)", "exec"), namespace)
    prediction = namespace["prediction"]  # the last frame's: window 12, stride 8 -> frames 11 and 19
    assert prediction.frame == 19 and prediction.probabilities.shape == (5,)
