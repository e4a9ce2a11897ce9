"""Undetected hands are masked out of the body's attention to the hands (BHaRNet-E, -P, -PAM):
the masks each attention receives, what a fully masked body token gets, and the option."""
import pytest
import torch

import bharnet
from bharnet.engine import checkpoint
from bharnet.engine.config import TrainConfig
from bharnet.engine.evaluate import load_model
from bharnet.engine.trainer import model_description
from bharnet.models.backbone import pooled_validity
from bharnet.nn import CTRGraphConv, PoolingAttention
from bharnet.nn.pooling import valid_mean
from bharnet.nn.attention import TokenCrossAttention
from trained_models import trained_like

FRAMES, WINDOW = 16, 4  # the small preset's strides (1, 2, 1, 2): 16 frames -> 4 time steps


def inputs(n=2, m=2, seed=0):
    """(body, hand, hand_valid): hands detected in a random 60% of the frames (zero elsewhere);
    clip 0's person 1 never shows a hand, clip 1's person 0 no left hand in its first half."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randn(n, 3, FRAMES, 25, m, generator=g, dtype=torch.float64)
    hand = torch.randn(n, 3, FRAMES, 42, m, generator=g, dtype=torch.float64)
    hand_valid = torch.rand(n, FRAMES, 2, m, generator=g) < 0.6
    hand_valid[0, ..., 1] = False
    hand_valid[1, :FRAMES // 2, 0, 0] = False
    return body, hand * hand_valid.repeat_interleave(21, dim=2)[:, None], hand_valid


def expected_node_mask(hand_valid):
    """(N·M, T', 42): node j of person m of clip n is valid at step t' where its hand is detected
    in any of the WINDOW frames of that step (written out with loops)."""
    N, T, _, M = hand_valid.shape
    mask = torch.zeros(N * M, T // WINDOW, 42, dtype=torch.bool)
    for n in range(N):
        for m in range(M):
            for t in range(T // WINDOW):
                for j in range(42):
                    mask[n * M + m, t, j] = bool(hand_valid[n, t * WINDOW:(t + 1) * WINDOW, j // 21, m].any())
    return mask


def attention_calls(model, *args):
    """For each TokenCrossAttention: its (x_q, key_mask, output) in the model's call on ``args``."""
    calls = {}

    def record(name):
        def hook(module, hook_args, output):
            calls[name] = (hook_args[0], hook_args[2] if len(hook_args) > 2 else None, output)
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, TokenCrossAttention)]
    with torch.no_grad():
        out = model(*args)
    for hook in hooks:
        hook.remove()
    return out, calls


def assert_unattended_rows_pass_through(module, x_q, key_mask, output):
    """A query row whose keys are all masked gets no attention output: x_q + the output bias."""
    rows = ~key_mask.any(-1)
    assert rows.any() and not rows.all()
    torch.testing.assert_close(output[rows], x_q[rows] + module.proj_out.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["frame", "sequence"])
@pytest.mark.parametrize("name", ["bharnet-e", "bharnet-p"])
def test_the_body_attends_only_detected_hands(name, mode):
    model = trained_like(name, attention_mode=mode)
    body, hand, hand_valid = inputs()
    _, calls = attention_calls(model, body, hand, hand_valid)
    x_q, key_mask, output = calls["body_attention.attention"]
    nodes = expected_node_mask(hand_valid)
    if mode == "frame":  # one attention per (person, step): 25 body tokens attend 42 hand tokens
        assert torch.equal(key_mask, nodes.flatten(0, 1))
    else:  # one per person: every step's body tokens attend every step's hand tokens
        assert torch.equal(key_mask, nodes.flatten(1, 2))
    assert_unattended_rows_pass_through(model.body_attention.attention, x_q, key_mask, output)
    assert calls["hand_attention.attention"][1] is None  # the body is never masked


def test_pooling_attention_masks_time_steps_and_joints_without_a_detected_hand():
    model = trained_like("bharnet-pam")
    body, hand, hand_valid = inputs()
    _, calls = attention_calls(model, body, hand, hand_valid)
    nodes = expected_node_mask(hand_valid)
    time_call, joint_call = calls["body_pam.time_attention"], calls["body_pam.joint_attention"]
    assert torch.equal(time_call[1], nodes.any(2))  # (N·M, T'): a step with any detected hand
    assert torch.equal(joint_call[1], nodes.any(1))  # (N·M, 42): a node detected at any step
    for attention, call in ((model.body_pam.time_attention, time_call), (model.body_pam.joint_attention, joint_call)):
        assert_unattended_rows_pass_through(attention, *call)
    assert calls["hand_pam.time_attention"][1] is None and calls["hand_pam.joint_attention"][1] is None


def test_pooling_attention_reads_the_other_modality_at_its_valid_positions_only():
    """Every path of the PAM: what ``other`` holds where ``other_valid`` is False does not change
    the output (without the mask it does); the gate reads the mean of the valid positions."""
    pam = PoolingAttention(8, heads=2).double()
    g = torch.Generator().manual_seed(0)
    x, other = (torch.randn(3, 8, 5, v, generator=g, dtype=torch.float64) for v in (4, 7))
    valid = torch.rand(3, 5, 7, generator=g) < 0.5
    valid[2] = False
    changed = torch.where(valid[:, None], other, torch.randn(other.shape, generator=g, dtype=torch.float64))
    seen = []
    pam.gate.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        torch.testing.assert_close(pam(x, changed, valid), pam(x, other, valid), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(pam(x, changed), pam(x, other))  # the check can fail
    for b in range(2):
        torch.testing.assert_close(seen[0][b], other[b][:, valid[b]].mean(1))
    assert not seen[0][2].any()  # nothing valid: zero
    with torch.no_grad():  # not even an inf at an undetected position gets in
        assert torch.isfinite(pam(x, torch.where(valid[:, None], other, float("inf")), valid)).all()


def test_valid_mean_counts_in_float32():
    """A bfloat16 count of 483 positions would round to 484."""
    x = torch.ones(1, 2, 483, 1, dtype=torch.bfloat16)
    assert valid_mean(x, torch.ones(1, 483, 1, dtype=torch.bool), (2, 3)).tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize("name", ["bharnet-e", "bharnet-pam"])
def test_undetected_hands_do_not_reach_the_body_branch(name):
    """Clip 0's person 1 shows no hand: with the mask its hand keypoints (whatever they hold)
    do not change the body's interactive logits of clip 0; without it they do."""
    body, hand, hand_valid = inputs()
    other = hand.clone()
    other[0, ..., 1] = torch.randn(other[0, ..., 1].shape, dtype=other.dtype)
    part = "z_BI" if name == "bharnet-e" else "z_B"
    for mask, changes in ((True, False), (False, True)):
        model = trained_like(name, mask_missing_hands=mask)
        with torch.no_grad():
            a, b = model(body, hand, hand_valid).parts[part][0], model(body, other, hand_valid).parts[part][0]
        assert (not torch.allclose(a, b, rtol=1e-9, atol=1e-9)) == changes, mask


@pytest.mark.parametrize("name", ["bharnet-e", "bharnet-p", "bharnet-pam"])
def test_nothing_to_mask_gives_the_unmasked_outputs(name):
    """Every hand detected, or ``mask_missing_hands=False``: the outputs of a call without
    hand_valid, exactly."""
    body, hand, hand_valid = inputs()
    model = trained_like(name)
    with torch.no_grad():
        torch.testing.assert_close(model(body, hand, torch.ones_like(hand_valid)).logits, model(body, hand).logits,
                                   rtol=0, atol=0)
        assert not torch.allclose(model(body, hand, hand_valid).logits, model(body, hand).logits)
    unmasked = trained_like(name, mask_missing_hands=False)
    with torch.no_grad():
        torch.testing.assert_close(unmasked(body, hand, hand_valid).logits, unmasked(body, hand).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("name", list(bharnet.MODELS))
def test_every_parameter_gets_a_gradient_with_hands_masked(name):
    torch.manual_seed(0)
    model = bharnet.create_model(name, 5, preset="small").double()
    for module in model.modules():  # CTR-GCN's alpha starts at 0, which zeroes its refinement's gradients
        if isinstance(module, CTRGraphConv):
            module.alpha.data.fill_(0.5)
    out = model(*inputs())
    model.loss(out, torch.tensor([1, 3])).backward()
    assert torch.isfinite(out.logits).all()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_pooled_validity_takes_any_frame_of_each_window():
    valid = torch.zeros(1, 13, 2, dtype=torch.bool)
    valid[0, 3, 0] = valid[0, 12, 1] = True
    # adaptive windows over 13 frames: [0, 4), [3, 7), [6, 10), [9, 13)
    assert pooled_validity(valid, 4)[0].tolist() == [[True, False], [True, False], [False, False], [False, True]]
    assert pooled_validity(valid, 13) is valid


def test_bad_hand_valid_and_option_say_what_is_wrong():
    model = bharnet.create_model("bharnet-e", 5, preset="small")
    body, hand, hand_valid = (x.float() if x.is_floating_point() else x for x in inputs())
    with pytest.raises(TypeError, match=r"hand_valid must be a bool tensor of shape \(N, T, 2, M\) = \(2, 16, 2, 2\)"):
        model(body, hand, hand_valid.float())
    with pytest.raises(ValueError, match=r"hand_valid must have shape \(N, T, 2, M\) = \(2, 16, 2, 2\), got \(2, 16, 42, 2\)"):
        model(body, hand, hand_valid.repeat_interleave(21, dim=2))
    with pytest.raises(TypeError, match="hand_valid must be a bool tensor"):  # checked by every variant
        bharnet.create_model("body", 5, preset="small")(body, None, "not a tensor")
    with pytest.raises(TypeError, match="mask_missing_hands must be a bool"):
        bharnet.create_model("bharnet-e", 5, preset="small", mask_missing_hands=1)


def test_weights_written_before_the_option_load_without_the_mask(tmp_path):
    """A description without ``mask_missing_hands`` (files written before it) rebuilds the
    model as it was trained, unmasked; bharnet train's descriptions record the option."""
    model = trained_like("bharnet-e", torch.float32)
    for options, written, masks in (({}, True, True), ({"mask_missing_hands": False}, True, False), ({}, False, False)):
        description = model_description(TrainConfig(model="bharnet-e", preset="small", model_options=options), 5)
        assert description["mask_missing_hands"] == masks or not written
        if not written:
            del description["mask_missing_hands"]
        path = str(tmp_path / "model.safetensors")
        checkpoint.save_weights(path, model, description)
        assert load_model(path)[0].config.mask_missing_hands is masks
