import warnings

import pytest
import torch

import bharnet
from bharnet.models import noisy_or_log_probs
from bharnet.models.losses import smoothed_nll
from bharnet.nn import CTRGraphConv

SMALL = dict(preset="small")


def inputs(n=2, t=12, m=2, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, t, 25, m, generator=g), torch.randn(n, c, t, 42, m, generator=g)


def wake_refinements(model):
    """CTR-GCN initialises alpha at 0, which gives the refinement weights zero gradient at first."""
    for module in model.modules():
        if isinstance(module, CTRGraphConv):
            module.alpha.data.fill_(0.5)


EXPECTED_PARTS = {
    "body": ["z_body"], "hand": ["z_hand"], "unified": ["z_unified"],
    "bharnet-vanilla": ["z_B", "z_H"], "bharnet-pam": ["z_B", "z_H"],
    "bharnet-e": ["z_BE", "z_BI", "z_HI", "z_HE"],
    "bharnet-p": ["z_BE", "z_BI", "z_HI", "z_HE", "z_B", "z_H"],
}


@pytest.mark.parametrize("name", list(bharnet.MODELS))
def test_forward_backward_every_parameter_gets_gradient(name):
    torch.manual_seed(0)
    model = bharnet.create_model(name, 7, **SMALL)
    wake_refinements(model)
    body, hand = inputs()
    out = model(body, hand)
    assert out.logits.shape == (2, 7)
    assert sorted(out.parts) == sorted(EXPECTED_PARTS[name])
    assert all(z.shape == (2, 7) for z in out.parts.values())
    loss = model.loss(out, torch.tensor([1, 5]))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_full_size_bharnet_e_at_ntu_width():
    model = bharnet.create_model("bharnet-e", 120)
    body, hand = inputs(n=1, t=16)
    out = model(body, hand)
    assert out.logits.shape == (1, 120)
    model.loss(out, torch.tensor([3])).backward()
    assert 5e6 < sum(p.numel() for p in model.parameters()) < 7e6


def test_sequence_attention_mode():
    model = bharnet.create_model("bharnet-e", 5, attention_mode="sequence", **SMALL)
    assert model(*inputs()).logits.shape == (2, 5)


def test_single_modality_models_accept_none():
    body, hand = inputs()
    assert bharnet.create_model("body", 4, **SMALL)(body).logits.shape == (2, 4)
    assert bharnet.create_model("hand", 4, **SMALL)(None, hand).logits.shape == (2, 4)


def test_determinism_with_fixed_seed():
    results = []
    for _ in range(2):
        torch.manual_seed(123)
        model = bharnet.create_model("bharnet-p", 6, **SMALL)
        out = model(*inputs(seed=4))
        results.append((out.logits, model.loss(out, torch.tensor([0, 2]))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["body", "bharnet-p"])
def test_a_float64_model_keeps_float64_through_its_loss(name):
    torch.manual_seed(0)
    model = bharnet.create_model(name, 6, **SMALL).double()
    body, hand = (x.double() for x in inputs())
    out = model(body, hand)
    loss = model.loss(out, torch.tensor([1, 4]))
    assert out.logits.dtype == loss.dtype == torch.float64
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    other = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 4])
    torch.autograd.gradcheck(lambda z: bharnet.models.cross_entropy(z, target, 0.1), (logits,))
    torch.autograd.gradcheck(noisy_or_log_probs, (logits, other))


def test_noisy_or_probabilities():
    torch.manual_seed(0)
    z_b, z_h = torch.randn(2, 8, 11) * 3
    log_q = noisy_or_log_probs(z_b, z_h)
    p_b, p_h = z_b.softmax(1), z_h.softmax(1)
    p = 1 - (1 - p_b) * (1 - p_h)
    assert torch.all((p >= 0) & (p <= 1))
    assert torch.all(p >= torch.maximum(p_b, p_h) - 1e-7)
    torch.testing.assert_close(log_q.exp(), p / p.sum(1, keepdim=True))
    torch.testing.assert_close(log_q.exp().sum(1), torch.ones(8))


def test_bharnet_p_prediction_and_loss():
    torch.manual_seed(0)
    model = bharnet.create_model("bharnet-p", 6, label_smoothing=0.0, **SMALL)
    out = model(*inputs())
    target = torch.tensor([1, 4])
    z_b, z_h = out.parts["z_B"], out.parts["z_H"]
    p = 1 - (1 - z_b.softmax(1)) * (1 - z_h.softmax(1))
    torch.testing.assert_close(out.logits.argmax(1), p.argmax(1))
    ce = torch.nn.functional.cross_entropy
    expected = -(p / p.sum(1, keepdim=True)).log()[torch.arange(2), target].mean() + ce(z_b, target) + ce(z_h, target)
    torch.testing.assert_close(model.loss(out, target), expected)


@pytest.mark.parametrize("name", ["body", "bharnet-e", "bharnet-p"])
def test_a_target_of_another_length_than_the_batch_is_refused(name):
    """One class index per clip: a shorter target made the loss of its first rows (gather takes
    rows 0..len(target) - 1) without an error."""
    model = bharnet.create_model(name, 6, **SMALL)
    out = model(*inputs())  # 2 clips
    for target in (torch.tensor([1]), torch.tensor([1, 2, 3]), torch.tensor([[1, 2]])):
        with pytest.raises(ValueError, match=r"one class index per sample, shape \(2,\)"):
            model.loss(out, target)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_noisy_or_loss_stays_finite_when_both_experts_rule_a_class_out_by_far(smoothing):
    """Class 1 at a logit gap where its softmax underflows to 0 in both experts: the fused
    log-probability, the loss and its gradient stay finite (log 0 made the loss inf or NaN)."""
    z_b = torch.tensor([[5.0, -120.0, 0.0, 0.0]], requires_grad=True)
    z_h = torch.tensor([[0.0, -110.0, 3.0, 0.0]], requires_grad=True)
    log_q = noisy_or_log_probs(z_b, z_h)
    assert torch.isfinite(log_q).all() and log_q[0, 1] < -100
    loss = smoothed_nll(log_q, torch.tensor([0]), smoothing)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_b.grad).all() and torch.isfinite(z_h.grad).all()
    # elsewhere it is the closed form p = 1 - (1 - softmax z_B)(1 - softmax z_H), normalised
    z_b, z_h = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    p = 1 - (1 - z_b.softmax(1)) * (1 - z_h.softmax(1))
    torch.testing.assert_close(noisy_or_log_probs(z_b, z_h).double(), (p / p.sum(1, keepdim=True)).log(),
                               rtol=1e-5, atol=1e-6)


def test_bharnet_e_loss_is_ensemble_of_modalities():
    torch.manual_seed(0)
    model = bharnet.create_model("bharnet-e", 6, label_smoothing=0.1, **SMALL)
    out = model(*inputs())
    target = torch.tensor([1, 4])
    ce = lambda z: torch.nn.functional.cross_entropy(z, target, label_smoothing=0.1)  # noqa: E731
    p = out.parts
    expected = ce(p["z_BE"] + p["z_BI"] + p["z_HE"] + p["z_HI"]) + ce(p["z_BE"] + p["z_BI"]) + ce(p["z_HE"] + p["z_HI"])
    torch.testing.assert_close(out.logits, p["z_BE"] + p["z_BI"] + p["z_HE"] + p["z_HI"])
    torch.testing.assert_close(model.loss(out, target), expected)


def test_training_steps_reduce_loss():
    torch.manual_seed(0)
    model = bharnet.create_model("bharnet-e", 4, **SMALL)
    body, hand = inputs(n=4)
    target = torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model.loss(model(body, hand), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_clear_errors():
    model = bharnet.create_model("bharnet-e", 6, **SMALL)
    body, hand = inputs()
    with pytest.raises(ValueError, match=r"hand must have shape \(N, 3, T, 42, 2\)"):
        model(body, hand[:, :, :, :21])
    with pytest.raises(ValueError, match=r"body must have shape \(N, 3, T, 25, 2\)"):
        model(body[..., :1], hand)
    with pytest.raises(ValueError, match="agree in N and T"):
        model(body, hand[:, :, :6])
    with pytest.raises(ValueError, match=r"body must have at least one frame \(T >= 1\)"):
        model(body[:, :, :0], hand[:, :, :0])
    with pytest.raises(TypeError, match="floating-point"):
        model(body.long(), hand)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        bharnet.create_model("body", 6, **SMALL)(None, hand)
    with pytest.raises(TypeError, match="hand is torch.float16, the model torch.float32"):
        model(body, hand.half())
    with pytest.raises(TypeError, match="body is torch.float64, the model torch.float32"):
        model(body.double(), hand.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the inputs itself
        model.eval()(body.bfloat16(), hand)
    # an nn.DataParallel replica holds its parameters as plain attributes, none registered (as
    # nn.parallel.replicate makes it): the dtype check steps aside there
    stripped = bharnet.create_model("body", 6, **SMALL).eval()
    for module in stripped.modules():
        for key, value in list(module._parameters.items()):
            module._parameters.pop(key)
            setattr(module, key, value.detach())
    assert next(stripped.parameters(), None) is None
    stripped(body, hand)
    with pytest.raises(ValueError, match="unknown model 'bharnet-x'"):
        bharnet.create_model("bharnet-x", 6)
    with pytest.raises(TypeError, match=r"unknown model option\(s\) \['width'\]"):
        bharnet.create_model("body", 6, width=3)
    with pytest.raises(ValueError, match="stem_depth"):
        bharnet.create_model("bharnet-e", 6, stem_depth=10)
    # stem_depth is BHaRNet-E's: a stem-less model takes the preset's value with fewer blocks
    assert bharnet.create_model("body", 6, channels=(16, 32), strides=(1, 2))
    for option, message in ((dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\)"),
                            (dict(label_smoothing=-0.1), "label_smoothing"),
                            (dict(num_person=0), "num_person must be >= 1"),
                            (dict(impl="trition"), "impl must be one of"),
                            (dict(channels=(16, 0), strides=(1, 2)), r"channels must be .* positive ints"),
                            (dict(channels=(16, 32), strides=(1, -1)), r"strides must be .* positive ints"),
                            (dict(channels=(), strides=()), "channels must be a non-empty")):
        with pytest.raises(ValueError, match=message):
            bharnet.create_model("body", 6, **{**SMALL, **option})
    with pytest.raises(TypeError, match="num_person must be an int, got 2.5"):
        bharnet.create_model("body", 6, num_person=2.5)
    import numpy as np  # numpy integers are integers
    assert bharnet.create_model("body", 6, channels=np.array([16, 16]), strides=[np.int64(1), 2],
                                num_person=np.int64(1), preset="small")


@pytest.mark.parametrize("name", ["bharnet-e", "bharnet-pam"])
def test_impl_option_reaches_every_fused_layer(name):
    model = bharnet.create_model(name, 5, impl="reference", **SMALL)
    impls = [m.impl for m in model.modules() if hasattr(m, "impl")]
    assert impls and set(impls) == {"reference"}


@pytest.mark.parametrize("name, options, ignored", [
    ("body", dict(heads=2, attention_mode="sequence"), ["heads", "attention_mode"]),
    ("unified", dict(stem_depth=1), ["stem_depth"]),
    ("bharnet-vanilla", dict(heads=2), ["heads"]),
    ("bharnet-pam", dict(heads=2, attention_mode="sequence"), ["attention_mode"]),
    ("bharnet-pam", dict(heads=2), []),
    ("bharnet-e", dict(heads=2, attention_mode="sequence", stem_depth=1), []),
    ("bharnet-p", dict(heads=2, stem_depth=1), []),
])
def test_options_a_variant_does_not_read_are_named_in_a_warning(name, options, ignored):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bharnet.create_model(name, 6, **SMALL, **options)
    messages = [str(w.message) for w in caught if "does not use the model option" in str(w.message)]
    if ignored:
        assert messages == [f"bharnet: {name} does not use the model option(s) {ignored}; they have no effect"]
    else:
        assert messages == []


def test_options_from_the_preset_are_not_reported():
    """The small preset sets heads=4; a body model built from it has nothing to report."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bharnet.create_model("body", 6, **SMALL)
    assert not [w for w in caught if "does not use" in str(w.message)]
