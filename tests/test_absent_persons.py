"""Fused inference skips the persons whose inputs are all zero (bharnet.absent_persons): the
same outputs as the full computation, fewer rows through the network."""
import copy

import pytest
import torch
from torch import nn

import bharnet
from bharnet._ext import cpp_availability
from bharnet.fast import fuse_for_inference, swap_layers
from bharnet.models import MODELS
from bharnet.nn import CTRGraphConv, GCNBlock


def eval_model(name, **config):
    """A small eval-mode model in float64 whose BatchNorms are not the identity (so that an absent
    person's features are not trivially zero)."""
    torch.manual_seed(0)
    model = bharnet.create_model(name, 5, preset="small", **config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                module.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                module.weight.copy_(torch.randn(c, generator=g))
                module.bias.copy_(torch.randn(c, generator=g) * 0.3)
            elif isinstance(module, CTRGraphConv):
                module.alpha.fill_(0.3)
    return swap_layers(model.double().eval(), "reference")


def clips(frames, absent=()):
    """(body, hand) of 3 clips x 2 persons; ``absent`` lists (clip, person, which) slots to zero,
    ``which`` being "both", "body" or "hand"."""
    g = torch.Generator().manual_seed(1)
    body = torch.randn(3, 3, frames, 25, 2, generator=g, dtype=torch.float64)
    hand = torch.randn(3, 3, frames, 42, 2, generator=g, dtype=torch.float64)
    for n, m, which in absent:
        if which in ("both", "body"):
            body[n, ..., m] = 0
        if which in ("both", "hand"):
            hand[n, ..., m] = 0
    return body, hand


def rows_through_first_blocks(model, body, hand):
    """The model's output and the batch size each first GCNBlock (one per stem) received."""
    rows = []
    firsts = [m.blocks[0] for m in model.modules() if getattr(m, "data_bn", None) is not None]
    hooks = [b.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0])) for b in firsts]
    with torch.no_grad():
        out = model(body, hand)
    for hook in hooks:
        hook.remove()
    assert firsts and all(isinstance(b, GCNBlock) for b in firsts)
    return out, rows


# Clip 0 lacks person 1, clip 2 person 0; clip 1's person 1 shows a body but no hands (computed).
SOME_ABSENT = [(0, 1, "both"), (2, 0, "both"), (1, 1, "hand")]


CPP = pytest.param("cpp", marks=pytest.mark.skipif(cpp_availability("cpu") is not None,
                                                  reason=f"C++ kernels unavailable: {cpp_availability('cpu')}"))


@pytest.mark.parametrize("backend", ["reference", CPP])
@pytest.mark.parametrize("name", list(MODELS))
def test_absent_persons_are_skipped_with_the_same_outputs(name, backend):
    model = eval_model(name)
    fused = fuse_for_inference(model, backend)
    for frames in (5, 13):  # the absent persons' features were computed on one frame
        body, hand = clips(frames, SOME_ABSENT)
        out, rows = rows_through_first_blocks(fused, body, hand)
        assert set(rows) == {4}  # 6 person slots, 2 absent
        with torch.no_grad():
            ref = model(body, hand)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-12)
        for part, logits in ref.parts.items():
            torch.testing.assert_close(out.parts[part], logits, rtol=1e-10, atol=1e-12, msg=part)


def test_sequence_attention_mode():
    model = eval_model("bharnet-e", attention_mode="sequence")
    fused = fuse_for_inference(model, "reference")
    body, hand = clips(6, SOME_ABSENT)
    out, rows = rows_through_first_blocks(fused, body, hand)
    assert set(rows) == {4}
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(body, hand).logits, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("absent", [[], [(n, m, "both") for n in range(3) for m in range(2)]],
                         ids=["all_present", "all_absent"])
def test_calls_without_a_mix_run_every_row(absent):
    model = eval_model("bharnet-e")
    fused = fuse_for_inference(model, "reference")
    body, hand = clips(5, absent)
    out, rows = rows_through_first_blocks(fused, body, hand)
    assert set(rows) == {6}
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(body, hand).logits, rtol=1e-10, atol=1e-12)


def test_a_copy_skips_on_its_own_and_submodules_called_alone_see_every_row():
    model = eval_model("bharnet-e")
    fused = fuse_for_inference(model, "reference")
    twin = copy.deepcopy(fused)
    assert twin._present_rows is not fused._present_rows
    body, hand = clips(5, SOME_ABSENT)
    out, rows = rows_through_first_blocks(twin, body, hand)
    assert set(rows) == {4}
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(body, hand).logits, rtol=1e-10, atol=1e-12)
        # after the call nothing is left marked: a stem called on its own normalises every row
        assert twin.body_stem(body).shape[0] == 6 and fused.body_stem(body).shape[0] == 6
