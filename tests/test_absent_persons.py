"""Fused inference skips the persons whose inputs are all zero (bharnet.absent_persons): the
same outputs as the full computation, fewer rows through the network."""
import copy

import pytest
import torch

from bharnet._ext import cpp_availability
from bharnet.fast import fuse_for_inference, swap_layers
from bharnet.models import MODELS
from bharnet.nn import GCNBlock
from trained_models import trained_like


def eval_model(name, **config):
    return swap_layers(trained_like(name, **config), "reference")


def clips(frames, absent=()):
    """(body, hand, hand_valid) of 3 clips x 2 persons, each hand detected in a random 70% of the
    frames (zero elsewhere); ``absent`` lists (clip, person, which) slots to zero, ``which``
    being "both", "body" or "hand" (an absent person's hands are undetected)."""
    g = torch.Generator().manual_seed(1)
    body = torch.randn(3, 3, frames, 25, 2, generator=g, dtype=torch.float64)
    hand = torch.randn(3, 3, frames, 42, 2, generator=g, dtype=torch.float64)
    hand_valid = torch.rand(3, frames, 2, 2, generator=g) < 0.7
    for n, m, which in absent:
        if which in ("both", "body"):
            body[n, ..., m] = 0
        if which in ("both", "hand"):
            hand_valid[n, ..., m] = False
    hand *= hand_valid.repeat_interleave(21, dim=2)[:, None]
    return body, hand, hand_valid


def rows_through_first_blocks(model, inputs):
    """The model's output and the batch size each first GCNBlock (one per stem) received."""
    rows = []
    firsts = [m.blocks[0] for m in model.modules() if getattr(m, "data_bn", None) is not None]
    hooks = [b.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0])) for b in firsts]
    with torch.no_grad():
        out = model(*inputs)
    for hook in hooks:
        hook.remove()
    assert firsts and all(isinstance(b, GCNBlock) for b in firsts)
    return out, rows


def assert_runs_rows_and_matches(fused, model, inputs, rows_expected):
    """``fused`` puts ``rows_expected`` rows through each stem and gives ``model``'s logits and
    part logits (float64, up to rounding)."""
    out, rows = rows_through_first_blocks(fused, inputs)
    assert set(rows) == {rows_expected}
    with torch.no_grad():
        ref = model(*inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-12)
    for part, logits in ref.parts.items():
        torch.testing.assert_close(out.parts[part], logits, rtol=1e-10, atol=1e-12, msg=part)


# Clip 0 lacks person 1, clip 2 person 0; clip 1's person 1 shows a body but no hands (computed):
# 4 of the 6 person slots are computed.
SOME_ABSENT = [(0, 1, "both"), (2, 0, "both"), (1, 1, "hand")]


CPP = pytest.param("cpp", marks=pytest.mark.skipif(cpp_availability("cpu") is not None,
                                                  reason=f"C++ kernels unavailable: {cpp_availability('cpu')}"))


@pytest.mark.parametrize("backend", ["reference", CPP])
@pytest.mark.parametrize("name", list(MODELS))
def test_absent_persons_are_skipped_with_the_same_outputs(name, backend):
    model = eval_model(name)
    fused = fuse_for_inference(model, backend)
    for frames in (5, 13):  # the absent persons' features were computed on one frame
        assert_runs_rows_and_matches(fused, model, clips(frames, SOME_ABSENT), 4)


@pytest.mark.parametrize("name", ["bharnet-e", "bharnet-pam"])
def test_a_model_that_masks_hands_runs_every_row_when_called_without_hand_valid(name):
    """Without hand_valid its absent persons attend their zero hands: the features precomputed
    for them (hands masked) do not apply, so every row runs (and the outputs match)."""
    model = eval_model(name)
    fused = fuse_for_inference(model, "reference")
    body, hand, _ = clips(5, SOME_ABSENT)
    assert_runs_rows_and_matches(fused, model, (body, hand), 6)
    unmasked = eval_model(name, mask_missing_hands=False)
    assert_runs_rows_and_matches(fuse_for_inference(unmasked, "reference"), unmasked, (body, hand), 4)


@pytest.mark.parametrize("name", ["bharnet-e", "bharnet-pam"])
def test_a_person_with_zero_inputs_but_detected_hands_is_computed(name):
    """Zero inputs are not absence when a hand is detected (a motion clip of still hands, the body
    untracked): the precomputed features have undetected hands, so the person is computed."""
    model = eval_model(name)
    body, hand, hand_valid = clips(5, SOME_ABSENT)
    hand_valid[0, :, 0, 1] = True  # clip 0's absent person 1: its (zero) left hand detected
    assert_runs_rows_and_matches(fuse_for_inference(model, "reference"), model, (body, hand, hand_valid), 5)


def test_sequence_attention_mode():
    model = eval_model("bharnet-e", attention_mode="sequence")
    assert_runs_rows_and_matches(fuse_for_inference(model, "reference"), model, clips(6, SOME_ABSENT), 4)


@pytest.mark.parametrize("absent", [[], [(n, m, "both") for n in range(3) for m in range(2)]],
                         ids=["all_present", "all_absent"])
def test_calls_without_a_mix_run_every_row(absent):
    model = eval_model("bharnet-e")
    assert_runs_rows_and_matches(fuse_for_inference(model, "reference"), model, clips(5, absent), 6)


def test_a_copy_skips_on_its_own_and_submodules_called_alone_see_every_row():
    model = eval_model("bharnet-e")
    fused = fuse_for_inference(model, "reference")
    twin = copy.deepcopy(fused)
    assert twin._present_rows is not fused._present_rows
    inputs = clips(5, SOME_ABSENT)
    assert_runs_rows_and_matches(twin, model, inputs, 4)
    body = inputs[0]
    with torch.no_grad():  # after the call nothing is left marked: a stem alone normalises every row
        assert twin.body_stem(body).shape[0] == 6 and fused.body_stem(body).shape[0] == 6


def test_with_autograd_on_every_row_runs_and_input_gradients_are_complete():
    model = eval_model("bharnet-e")
    fused = fuse_for_inference(model, "reference")
    body, hand, hand_valid = clips(5, SOME_ABSENT)
    grads = []
    for m in (fused, model):
        leaves = body.clone().requires_grad_(), hand.clone().requires_grad_()
        rows = []
        hook = m.body_stem.blocks[0].register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
        m(*leaves, hand_valid).logits.square().sum().backward()
        hook.remove()
        assert rows == [6]
        grads.append([leaf.grad for leaf in leaves])
    # A person slot with zero input has all frames equal, so its max-pools tie and rounding picks
    # the gradient's path: compare the other slots; the zero ones' gradients must exist.
    for x, got, ref in zip((body, hand), *grads):
        seen = x.ne(0).any(3).any(2).any(1)  # (N, M)
        got, ref = got.movedim(-1, 1), ref.movedim(-1, 1)
        torch.testing.assert_close(got[seen], ref[seen], rtol=1e-10, atol=1e-12)
        assert got[~seen].abs().amax(dim=(1, 2, 3)).min() > 0


def test_fusing_for_a_backend_that_cannot_run_here_still_works(monkeypatch):
    """The absent persons' features are computed on the reference backend: fusing for Triton on
    a CPU without the interpreter works, and the call says why Triton cannot run."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fused = fuse_for_inference(eval_model("bharnet-e"), "triton")
    with pytest.raises(RuntimeError, match="triton"), torch.no_grad():
        fused(*clips(5, SOME_ABSENT))


def test_loading_weights_into_a_fused_model_refreshes_the_absent_features():
    source = fuse_for_inference(eval_model("bharnet-e"), "reference")
    other = eval_model("bharnet-e")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    target = fuse_for_inference(other, "reference")
    target.load_state_dict(source.state_dict())
    inputs = clips(5, SOME_ABSENT)
    with torch.no_grad():
        torch.testing.assert_close(target(*inputs).logits, source(*inputs).logits, rtol=1e-10, atol=1e-12)


def test_inputs_that_disagree_in_batch_get_the_models_own_error():
    body, hand, _ = clips(5, SOME_ABSENT)
    with pytest.raises(ValueError, match="must agree in N and T"), torch.no_grad():
        fuse_for_inference(eval_model("bharnet-e"), "reference")(body, hand[:2])


def test_torch_compile_runs_every_row_with_the_same_outputs():
    model = eval_model("body")
    fused = fuse_for_inference(model, "reference")
    body, hand, _ = clips(4, SOME_ABSENT)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fused)(body, hand).logits, model(body, hand).logits,
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
def test_gpu_fused_model_skips_absent_persons_with_the_same_outputs():
    """On CUDA (Triton kernels under auto), float32: the fused copy that skips absent persons
    against the unfused model on the same kernels."""
    model = trained_like("bharnet-e", torch.float32).cuda()
    fused = fuse_for_inference(model, "auto")
    body, hand, hand_valid = clips(9, SOME_ABSENT)
    inputs = (body.float().cuda(), hand.float().cuda(), hand_valid.cuda())
    out, rows = rows_through_first_blocks(fused, inputs)
    assert set(rows) == {4}
    with torch.no_grad():
        ref = swap_layers(model, "auto")(*inputs)
    # float32 on the H100 multiplies in TF32 (cuDNN convolutions and Triton's tl.dot), and
    # folding BN changes the rounding: the first H100 run differed by 4.4e-4 (relative 8.8e-4).
    # Absent-person features 1% off move these logits (up to 4.8) by 2.4e-2 (float64, CPU).
    torch.testing.assert_close(out.logits, ref.logits, rtol=3e-3, atol=1e-3)
