"""bharnet.stream.LiveRecognizer: a sliding window over pushed frames gives the predictions of
the model on clip_input of the same frames, from a model, a run's weights or an exported file."""
import json

import numpy as np
import pytest
import torch

from bharnet import deploy
from bharnet.cli import main
from bharnet.data import clip_input
from bharnet.data.synthetic import generate_sample
from bharnet.engine import checkpoint
from bharnet.engine.config import TrainConfig
from bharnet.engine.trainer import model_description
from bharnet.stream import LiveRecognizer
from trained_models import trained_like

DESCRIPTION = dict(modality="bone", window=12, preprocessing="canonical")


def stream(frames=30, seed=0):
    """A synthetic two-person clip, (3, L, 25, 2), (3, L, 42, 2), (L, 2, 2), with hand dropouts."""
    body, hand, valid = generate_sample(6, 5, frames, np.random.default_rng(seed))
    return torch.from_numpy(body), torch.from_numpy(hand), torch.from_numpy(valid)


def push_all(recognizer, body, hand, valid, with_valid=True):
    return [p for t in range(body.shape[1]) if (p := recognizer.push(
        body[:, t], hand[:, t], valid[t] if with_valid else None)) is not None]


def direct(model, body, hand, valid, end, history, modality="bone", pass_valid=True):
    """What the model gives for the ``history`` frames that end at frame ``end`` (called with
    the hands' detections, or without them)."""
    frames = slice(end + 1 - history, end + 1)
    b, h, v = clip_input(body[:, frames], hand[:, frames], valid[frames], modality=modality, window=12,
                         crop=(0, history))
    with torch.no_grad():
        return torch.softmax(model(b[None], h[None], *([v[None]] if pass_valid else [])).logits[0], dim=0)


@pytest.fixture(scope="module")
def model():
    return trained_like("bharnet-e", torch.float32)


def test_every_stride_frames_it_classifies_the_newest_history(model):
    body, hand, valid = stream()
    recognizer = LiveRecognizer(model, DESCRIPTION, history=16, stride=5)
    predictions = push_all(recognizer, body, hand, valid)
    assert [p.frame for p in predictions] == [15, 20, 25]
    for p in predictions:
        want = direct(model, body, hand, valid, p.frame, 16)
        torch.testing.assert_close(p.probabilities, want, rtol=1e-5, atol=1e-6)
        assert p.label == int(want.argmax()) and p.latency_ms > 0
        assert p.probabilities.shape == (5,) and abs(p.probabilities.sum().item() - 1) < 1e-5
    recognizer.reset()  # a new scene: a full history again before the next prediction
    assert [p.frame for p in push_all(recognizer, body[:, :17], hand[:, :17], valid[:17])] == [15]


def test_default_history_is_the_window_and_hands_default_to_what_is_seen(model):
    joint = dict(DESCRIPTION, modality="joint")  # bones of an all-zero hand are zero, seen or not
    body, hand, valid = stream(frames=14)
    valid[3:7, 1, 0] = False  # the first person's right hand undetected for four frames
    hand = hand * valid.repeat_interleave(21, dim=1)[None]  # undetected hands zero, as stored
    with_valid = push_all(LiveRecognizer(model, joint, stride=1), body, hand, valid)
    inferred = push_all(LiveRecognizer(model, joint, stride=1), body, hand, valid, with_valid=False)
    all_seen = push_all(LiveRecognizer(model, joint, stride=1), body, hand, torch.ones_like(valid))
    assert [p.frame for p in with_valid] == [11, 12, 13]
    for a, b in zip(with_valid, inferred):
        torch.testing.assert_close(a.probabilities, b.probabilities)
    assert (all_seen[0].probabilities - with_valid[0].probabilities).abs().max() > 1e-4  # the check can fail
    no_hands = LiveRecognizer(model, joint, stride=1)
    got = [no_hands.push(body[:, t]) for t in range(12)][-1]
    torch.testing.assert_close(got.probabilities,
                               direct(model, body[:, :12], torch.zeros_like(hand[:, :12]),
                                      torch.zeros_like(valid[:12]), 11, 12, "joint"), rtol=1e-5, atol=1e-6)


def test_from_a_runs_weights_and_from_an_exported_program(model, tmp_path):
    config = TrainConfig(model="bharnet-e", preset="small", modality="bone", window=12)
    weights = str(tmp_path / "model.safetensors")
    names = ["wave", "clap", "point", "drink", "sit"]
    checkpoint.save_weights(weights, model, model_description(config, 5, names))
    assert main(["export", weights, str(tmp_path / "model.pt2")]) == 0
    body, hand, valid = stream(frames=20)
    want = push_all(LiveRecognizer(model, DESCRIPTION, stride=4), body, hand, valid)
    assert all(p.class_name is None for p in want)  # a description without class names
    for path in (weights, tmp_path / "model.pt2"):  # a str or a Path
        got = push_all(LiveRecognizer.from_file(path, stride=4), body, hand, valid)
        assert [p.frame for p in got] == [11, 15, 19]
        for a, b in zip(got, want):
            torch.testing.assert_close(a.probabilities, b.probabilities, rtol=1e-4, atol=1e-5)
            assert a.class_name == names[a.label]  # the names travel with the weights and the export
    # the exported file's metadata holds the person count: a wrong one is refused at the first frame
    with pytest.raises(ValueError, match="body has 1 persons, the model takes 2"):
        LiveRecognizer.from_file(tmp_path / "model.pt2").push(torch.zeros(3, 25, 1))


def test_from_a_runs_weights_in_bfloat16(model, tmp_path):
    """dtype=torch.bfloat16 runs the rebuilt, fused model in bfloat16 (parameters and inputs):
    probabilities close to float32's (DESIGN.md section 6 bounds bf16 by its unit roundoff, 2^-8 of
    the logits, here a few per mille of each probability); an exported file keeps its own dtype."""
    config = TrainConfig(model="bharnet-e", preset="small", modality="bone", window=12)
    weights = str(tmp_path / "model.safetensors")
    checkpoint.save_weights(weights, model, model_description(config, 5, None))
    body, hand, valid = stream(frames=16)
    recognizer = LiveRecognizer.from_file(weights, stride=4, dtype=torch.bfloat16)
    assert {p.dtype for p in recognizer.model.parameters()} == {torch.bfloat16}
    got = push_all(recognizer, body, hand, valid)
    want = push_all(LiveRecognizer.from_file(weights, stride=4), body, hand, valid)
    assert [p.frame for p in got] == [p.frame for p in want] == [11, 15]
    for a, b in zip(got, want):
        assert a.probabilities.dtype == torch.float32
        torch.testing.assert_close(a.probabilities, b.probabilities, rtol=0, atol=2e-2)
    with pytest.raises(ValueError, match="floating-point dtype"):
        LiveRecognizer.from_file(weights, dtype=torch.int8)
    with pytest.raises(ValueError, match="runs in the dtype it was exported in"):  # refused before loading
        LiveRecognizer.from_file(tmp_path / "model.pt2", dtype=torch.bfloat16)


def test_a_file_exported_without_hand_valid_is_called_with_body_and_hand(model, tmp_path):
    """A program exported before bharnet passed hand_valid (metadata without ``inputs``) takes
    (body, hand) and attends every hand: the recognizer calls it so."""
    body, hand, valid = stream(frames=14)
    path = str(tmp_path / "old.pt2")
    program = deploy.export(model, torch.zeros(2, 3, 12, 25, 2), torch.zeros(2, 3, 12, 42, 2))
    torch.export.save(program, path, extra_files={deploy.METADATA_KEY: json.dumps(dict(DESCRIPTION, num_person=2))})
    got = push_all(LiveRecognizer.from_file(path, stride=1), body, hand, valid)
    assert [p.frame for p in got] == [11, 12, 13]
    for p in got:
        unmasked = direct(model, body, hand, valid, p.frame, 12, pass_valid=False)
        torch.testing.assert_close(p.probabilities, unmasked, rtol=1e-4, atol=1e-5)
    masked = direct(model, body, hand, valid, 11, 12)
    assert (masked - got[0].probabilities).abs().max() > 1e-4  # the check can fail


def test_a_program_exported_with_hand_valid_and_models_in_wrappers_get_it(model, tmp_path):
    """deploy.export records its program's inputs in the metadata, so the stream passes
    hand_valid to it; a model inside torch.compile or nn.DataParallel gets it too."""
    body, hand, valid = stream(frames=13)
    want = push_all(LiveRecognizer(model, DESCRIPTION, stride=1), body, hand, valid)
    path = str(tmp_path / "new.pt2")
    b, h, v = clip_input(body[:, :12], hand[:, :12], valid[:12], modality="bone", window=12)
    deploy.export(model, b[None], h[None], v[None], path=path, metadata=dict(DESCRIPTION, num_person=2))
    assert deploy.read_metadata(path)["inputs"] == ["body", "hand", "hand_valid"]
    for runner in (LiveRecognizer.from_file(path, stride=1),
                   LiveRecognizer(torch.nn.DataParallel(model), DESCRIPTION, stride=1)):
        got = push_all(runner, body, hand, valid)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.probabilities, b.probabilities, rtol=1e-4, atol=1e-5)
    # (not run: compiling costs seconds; the wrapper decides what the recognizer passes)
    assert LiveRecognizer(torch.compile(torch.nn.DataParallel(model)), DESCRIPTION).passes_hand_valid
    assert not LiveRecognizer(lambda body, hand: model(body, hand), DESCRIPTION).passes_hand_valid
    unmasked = direct(model, body, hand, valid, 11, 12, pass_valid=False)
    assert (unmasked - want[0].probabilities).abs().max() > 1e-4  # the check can fail


def test_bad_frames_and_settings_say_what_is_wrong(model):
    recognizer = LiveRecognizer(model, DESCRIPTION)
    with pytest.raises(ValueError, match=r"body must be a tensor of shape \(3, 25, M\), got \(3, 24, 2\)"):
        recognizer.push(torch.zeros(3, 24, 2))
    with pytest.raises(ValueError, match="body has 1 persons, the model takes 2"):
        recognizer.push(torch.zeros(3, 25, 1))
    recognizer.push(torch.zeros(3, 25, 2))
    as_function = LiveRecognizer(lambda body, hand: model(body, hand), DESCRIPTION)  # no config to ask
    with pytest.raises(ValueError, match=r"hand must be a tensor of shape \(3, 42, 1\)"):
        as_function.push(torch.zeros(3, 25, 1), torch.zeros(3, 42, 2))  # a refused frame fixes nothing
    as_function.push(torch.zeros(3, 25, 2))
    with pytest.raises(ValueError, match="body has 1 persons, the frames before had 2"):
        as_function.push(torch.zeros(3, 25, 1))
    with pytest.raises(ValueError, match=r"hand must be a tensor of shape \(3, 42, 2\), got \(3, 21, 2\)"):
        recognizer.push(torch.zeros(3, 25, 2), torch.zeros(3, 21, 2))
    with pytest.raises(ValueError, match=r"hand_valid must be a bool tensor of shape \(2, 2\), got \(2,\)"):
        recognizer.push(torch.zeros(3, 25, 2), torch.zeros(3, 42, 2), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"the description lacks \['window'\]"):
        LiveRecognizer(model, dict(modality="joint", preprocessing="canonical"))
    with pytest.raises(ValueError, match="history must be an int >= 2"):
        LiveRecognizer(model, DESCRIPTION, history=1)
    with pytest.raises(ValueError, match="stride must be a positive int"):
        LiveRecognizer(model, DESCRIPTION, stride=0)
    named_wrong = LiveRecognizer(model, dict(DESCRIPTION, class_names=["a", "b"]), history=2)
    named_wrong.push(torch.zeros(3, 25, 2))
    with pytest.raises(ValueError, match="the description names 2 classes, the model scores 5"):
        named_wrong.push(torch.zeros(3, 25, 2))


def test_a_training_mode_model_is_refused(model):
    import bharnet

    with pytest.raises(ValueError, match=r"needs an eval-mode model \(call model.eval\(\) first\)"):
        LiveRecognizer(bharnet.create_model("body", 5, preset="small"), DESCRIPTION)
    with pytest.raises(ValueError, match="modality must be one of"):
        LiveRecognizer(model, dict(DESCRIPTION, modality="joints"))


def test_an_undetected_hand_may_hold_anything_and_non_finite_joints_are_refused(model):
    body, hand, valid = stream(frames=12)
    want = push_all(LiveRecognizer(model, DESCRIPTION, stride=1), body, hand, valid)
    assert not valid.all()
    filled = torch.where(valid.repeat_interleave(21, dim=1)[None], hand, float("nan"))  # NaN where undetected
    got = push_all(LiveRecognizer(model, DESCRIPTION, stride=1), body, filled, valid)
    torch.testing.assert_close(got[0].probabilities, want[0].probabilities, rtol=0, atol=0)
    recognizer = LiveRecognizer(model, DESCRIPTION)
    lost = body[:, 0].clone()
    lost[0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"body holds non-finite values \(NaN or inf\)"):
        recognizer.push(lost, hand[:, 0], valid[0])
    seen = hand[:, 0].clone()
    seen[:, :21] = float("inf")
    with pytest.raises(ValueError, match="hand holds non-finite values"):
        recognizer.push(body[:, 0], seen, torch.ones(2, 2, dtype=torch.bool))


def test_the_persons_present_in_a_window_go_first(model):
    """A tracker that keeps a slot per person may leave slot 0 empty: the window is then
    classified with the present person in slot 0, as the dataset stores a one-person clip (the
    canonical preprocessing centres on person 0)."""
    body, hand, valid = stream(frames=12)
    body, hand, valid = body[..., :1], hand[..., :1], valid[..., :1]  # person 0 only
    zeros = lambda x: torch.zeros_like(x)
    one_person = [torch.cat([x, zeros(x)], dim=-1) for x in (body, hand, valid)]
    in_slot_1 = [torch.cat([zeros(x), x], dim=-1) for x in (body, hand, valid)]
    want = push_all(LiveRecognizer(model, DESCRIPTION), *one_person)
    got = push_all(LiveRecognizer(model, DESCRIPTION), *in_slot_1)
    torch.testing.assert_close(got[0].probabilities, want[0].probabilities, rtol=0, atol=0)


def test_frames_are_copied_and_inputs_follow_the_models_dtype(model):
    """A tracker that writes every frame into the same buffers; a float64 model."""
    body, hand, valid = stream(frames=12)
    want = push_all(LiveRecognizer(model, DESCRIPTION, stride=1), body, hand, valid)
    recognizer = LiveRecognizer(trained_like("bharnet-e", torch.float64), DESCRIPTION, stride=1)
    body_buffer, hand_buffer = torch.empty(3, 25, 2), torch.empty(3, 42, 2)
    valid_buffer = torch.empty(2, 2, dtype=torch.bool)
    for t in range(12):
        body_buffer.copy_(body[:, t])
        hand_buffer.copy_(hand[:, t])
        valid_buffer.copy_(valid[t])
        got = recognizer.push(body_buffer, hand_buffer, valid_buffer)
    assert got.probabilities.dtype == torch.float32
    torch.testing.assert_close(got.probabilities, want[0].probabilities, rtol=1e-4, atol=1e-5)


def test_an_exported_file_runs_on_the_cpu_only(tmp_path):
    with pytest.raises(ValueError, match="an exported file runs on the CPU"):
        LiveRecognizer.from_file(str(tmp_path / "model.pt2"), device="cuda")


def test_frames_in_any_memory_layout(model):
    body, hand, valid = stream(frames=12)
    want = push_all(LiveRecognizer(model, DESCRIPTION, stride=1), body, hand, valid, with_valid=False)
    recognizer = LiveRecognizer(model, DESCRIPTION, stride=1)
    for t in range(12):  # (V, M, 3) arrays viewed as (3, V, M): dense, not contiguous
        got = recognizer.push(body[:, t].permute(1, 2, 0).contiguous().permute(2, 0, 1),
                              hand[:, t].permute(1, 2, 0).contiguous().permute(2, 0, 1))
    torch.testing.assert_close(got.probabilities, want[0].probabilities)
