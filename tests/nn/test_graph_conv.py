import weakref

import pytest
import torch

from bharnet.fast import swap_layers
from bharnet.graphs import BODY
from bharnet.nn import CTRGraphConv, PointwiseConv2d, STGraphConv, recompute
from bharnet.ops import ctr_graph_conv, ctr_graph_conv_reference


def ctrgcn_original_form(x3, A, q, k, W4, b4, alpha):
    """CTR-GCN's own formulation, subset by subset, with per-channel topologies:
    x1 = tanh(q.unsqueeze(-1) - k.unsqueeze(-2)); x1 = conv4(x1)·alpha + A[h];
    out += einsum('ncuv,nctv->nctu', x1, x3[h])."""
    out = 0
    for h in range(A.shape[0]):
        rel = torch.tanh(q[:, h].unsqueeze(-1) - k[:, h].unsqueeze(-2))  # (N, R, V, V)
        topo = torch.einsum("cr,nruv->ncuv", W4[h], rel) + b4[h][None, :, None, None]
        topo = topo * alpha + A[h]
        out = out + torch.einsum("ncuv,nctv->nctu", topo, x3[:, h])
    return out


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_ctr_graph_conv_matches_ctrgcn_einsum(groups):
    torch.manual_seed(0)
    B, H, C, T, V, R = 2, 3, 6, 5, 7, 4
    v = torch.randn(B, H, C, T, V, dtype=torch.float64)
    A = torch.randn(H, V, V, dtype=torch.float64)
    q, k = torch.randn(2, B, H, R, V, dtype=torch.float64)
    W = torch.randn(H, groups, R, dtype=torch.float64)
    b = torch.randn(H, groups, dtype=torch.float64)
    alpha = torch.tensor([0.7], dtype=torch.float64)
    per_channel = C // groups  # channel c uses group c // per_channel
    W_full = W.repeat_interleave(per_channel, dim=1)
    b_full = b.repeat_interleave(per_channel, dim=1)
    expected = ctrgcn_original_form(v, A, q, k, W_full, b_full, alpha)
    torch.testing.assert_close(ctr_graph_conv_reference(v, A, q, k, W, b, alpha), expected)


def test_static_mode_is_sum_of_adjacency_products():
    v = torch.randn(2, 3, 4, 5, 25, dtype=torch.float64)
    A = torch.as_tensor(BODY.adjacency(), dtype=torch.float64)
    expected = sum(torch.einsum("uv,nctv->nctu", A[h], v[:, h]) for h in range(3))
    torch.testing.assert_close(ctr_graph_conv_reference(v, A), expected)


@pytest.mark.parametrize("module", [STGraphConv, CTRGraphConv])
def test_graph_conv_shapes_and_gradients(module):
    layer = module(16, 24, BODY.adjacency())
    if isinstance(layer, CTRGraphConv):
        layer.alpha.data.fill_(0.5)  # CTR-GCN initialises alpha at 0, which zeroes the refinement's gradient
    x = torch.randn(2, 16, 9, 25)
    y = layer(x)
    assert y.shape == (2, 24, 9, 25)
    y.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ctr_graph_conv_rejects_bad_shapes():
    from bharnet.ops import ctr_graph_conv
    v = torch.randn(2, 3, 8, 5, 25)
    with pytest.raises(ValueError, match=r"A must have shape \(3, 25, 25\)"):
        ctr_graph_conv(v, torch.randn(3, 21, 21))
    with pytest.raises(ValueError, match=r"v must have shape \(B, H, C, T, V\)"):
        ctr_graph_conv(v[0], torch.randn(3, 25, 25))
    with pytest.raises(ValueError, match="all None"):
        ctr_graph_conv(v, torch.randn(3, 25, 25), q=torch.randn(2, 3, 2, 25))
    with pytest.raises(ValueError, match="multiple of the groups"):
        ctr_graph_conv(v, torch.randn(3, 25, 25), torch.randn(2, 3, 2, 25), torch.randn(2, 3, 2, 25),
                       torch.randn(3, 3, 2), torch.randn(3, 3), torch.ones(1))
    with pytest.raises(ValueError, match="out_channels=10 must be a multiple of groups=4"):
        CTRGraphConv(8, 10, BODY.adjacency())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_ctr_graph_conv_off_reference_convolves_the_time_mean(channels_last):
    """Off the reference backend, q and k come from conv_qk(mean_T x) (one frame): the same
    output and gradients (every parameter and x) as the reference's mean_T(conv_qk x)."""
    torch.manual_seed(0)
    layer = CTRGraphConv(16, 24, BODY.adjacency()).double()
    layer.alpha.data.fill_(0.5)
    x = torch.randn(2, 16, 9, 25, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    frames = []
    layer.conv_qk.register_forward_hook(lambda module, args, out: frames.append(args[0].shape[2]))
    results = {}
    for impl in ("reference", "cpp"):
        layer.impl = layer.conv_qk.impl = layer.conv_v.impl = layer.bn.impl = impl
        layer.zero_grad()
        leaf = x.detach().clone().requires_grad_()
        y = layer(leaf)
        y.square().mean().backward()
        results[impl] = [y.detach(), leaf.grad] + [p.grad.clone() for p in layer.parameters()]
    assert frames == [9, 1]
    names = ["y", "x"] + [name for name, _ in layer.named_parameters()]
    for name, got, ref in zip(names, results["cpp"], results["reference"]):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def _layer(module, dtype=torch.float64):
    torch.manual_seed(0)
    layer = module(16, 24, BODY.adjacency()).to(dtype)
    if isinstance(layer, CTRGraphConv):
        layer.alpha.data.fill_(0.5)
    return layer


def _loss(y):
    """A weighted sum of ``y`` in at least float32 (every element gets its own gradient)."""
    y = y.to(torch.promote_types(y.dtype, torch.float32))
    return (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view(y.shape)).sum()


def _step(layer, x):
    """Output, dx and every parameter's gradient of ``_loss(layer(x))``."""
    layer.zero_grad()
    leaf = x.detach().clone().requires_grad_()
    y = layer(leaf)
    _loss(y).backward()
    return [y.detach(), leaf.grad] + [p.grad.clone() for p in layer.parameters()]


def _saved_storages(layer, x):
    """The data pointers of the tensors autograd saves in ``layer(x)``, and of v, the input of
    the graph aggregation (found without a hook on conv_v, which would stop the recomputation)."""
    from bharnet.nn import graph_conv
    aggregated = []

    def recording(v, *args, **kwargs):
        aggregated.append(v)
        return ctr_graph_conv(v, *args, **kwargs)
    saved = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t
    with pytest.MonkeyPatch.context() as patch, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        patch.setattr(graph_conv, "ctr_graph_conv", recording)
        y = layer(x.detach().clone().requires_grad_())
    return saved, aggregated[0].untyped_storage().data_ptr(), y


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("module", [STGraphConv, CTRGraphConv])
def test_fused_graph_convs_keep_x_in_place_of_v(monkeypatch, module, impl):
    """On the GPU kernels' backends (triton, here interpreted) autograd saves x, not
    v = conv_v(x) (H times the output), and the backward recomputes v; the C++ backend on the
    CPU keeps v. Output, dx and every gradient as on the reference."""
    layer = _layer(module)
    x = torch.randn(2, 16, 9, 25, dtype=torch.float64)
    swap_layers(layer, "reference")
    expected = _step(layer, x)
    swap_layers(layer, impl)
    with monkeypatch.context() as patch:
        patch.setattr(recompute, "can_recompute", lambda v: False)
        saved_v, v_storage, _ = _saved_storages(layer, x)
    assert v_storage in saved_v  # the probe sees v where the op saves it
    saved, v_storage, _ = _saved_storages(layer, x)
    if impl == "cpp":
        assert v_storage in saved and len(saved) == len(saved_v)
    else:
        assert v_storage not in saved
        assert len(saved) == len(saved_v) - 1  # every other tensor still reaches enclosing hooks
    names = ["y", "x"] + [name for name, _ in layer.named_parameters()]
    for name, got, ref in zip(names, _step(layer, x), expected):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("module", [STGraphConv, CTRGraphConv])
def test_recomputed_v_is_freed_after_the_forward(monkeypatch, module):
    """Where the backward recomputes v, nothing keeps v alive after the forward: autograd keeps
    the saved-tensor hooks with every tensor they pack, so a hook holding v would keep the
    memory the recomputation saves (on the H200 the training step's peak did not move). Where
    v is kept, the graph holds it."""
    from bharnet.nn import graph_conv
    layer = _layer(module)
    swap_layers(layer, "triton")
    aggregated = []

    def recording(v, *args, **kwargs):
        aggregated.append(weakref.ref(v))
        return ctr_graph_conv(v, *args, **kwargs)
    monkeypatch.setattr(graph_conv, "ctr_graph_conv", recording)
    x = torch.randn(2, 16, 9, 25, dtype=torch.float64, requires_grad=True)
    recomputed = layer(x)
    with monkeypatch.context() as patch:
        patch.setattr(recompute, "can_recompute", lambda v: False)
        kept = layer(x)
    assert aggregated[0]() is None
    assert aggregated[1]() is not None
    _loss(recomputed + kept).backward()
    assert x.grad is not None


def _without_recompute(monkeypatch, layer, x, around=None):
    with monkeypatch.context() as patch:
        patch.setattr(recompute, "can_recompute", lambda v: False)
        return _run(layer, x, around)


def _run(layer, x, around):
    if around is None:
        return _step(layer, x)
    with around():
        return _step(layer, x)


@pytest.mark.parametrize("around", [
    None,
    lambda: torch.autograd.graph.save_on_cpu(pin_memory=False),
    lambda: torch.autocast("cpu", dtype=torch.float16),
], ids=["plain", "save_on_cpu", "autocast_fp16"])
def test_recomputed_v_gives_the_same_gradients_bit_for_bit(monkeypatch, around):
    """The recomputation changes nothing but memory: the same bits as saving v, also under
    enclosing saved-tensor hooks (save_on_cpu) and under autocast, which the backward (outside
    the autocast region) must reproduce to get v's float16 values back."""
    layer = _layer(CTRGraphConv, torch.float32)
    swap_layers(layer, "triton")
    x = torch.randn(2, 16, 9, 25)
    expected = _without_recompute(monkeypatch, layer, x, around)
    for got, ref in zip(_run(layer, x, around), expected):
        assert torch.equal(got, ref)


def test_recomputed_v_under_checkpoint_and_retain_graph():
    """Non-reentrant checkpointing around the layer (its hooks enclose ours) and a second
    backward through a retained graph (v recomputed twice) give the reference's gradients."""
    from torch.utils.checkpoint import checkpoint
    layer = _layer(CTRGraphConv)
    x = torch.randn(2, 16, 9, 25, dtype=torch.float64)
    swap_layers(layer, "reference")
    expected = _step(layer, x)
    swap_layers(layer, "triton")
    leaf = x.detach().clone().requires_grad_()
    y = checkpoint(layer, leaf, use_reentrant=False)
    loss = _loss(y)
    layer.zero_grad()
    loss.backward(retain_graph=True)
    first = [leaf.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    loss.backward()
    second = [leaf.grad] + [p.grad for p in layer.parameters()]
    for got, twice, ref in zip(first, second, expected[1:]):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(twice, 2 * ref, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_graph_convs_on_cuda_keep_x_in_place_of_v(impl):
    """On CUDA both fused backends recompute v; gradients as on the reference (float32)."""
    layer = _layer(CTRGraphConv, torch.float32).cuda()
    x = torch.randn(2, 16, 9, 25, device="cuda")
    swap_layers(layer, "reference")
    expected = _step(layer, x)
    swap_layers(layer, impl)
    saved, v_storage, _ = _saved_storages(layer, x)
    assert v_storage not in saved
    for got, ref in zip(_step(layer, x), expected):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


class _ScaledConv(PointwiseConv2d):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("change", ["output_hook", "global_pre_hook", "own_forward", "spectral_norm"])
def test_convolutions_that_may_not_repeat_keep_v(change):
    """A conv_v with a forward hook (its own or global), a forward of its own or a
    parametrization (spectral norm iterates at each access) might not give the same v in the
    backward: v is kept, and the gradients are the reference's with the same convolution."""
    layer = _layer(CTRGraphConv)
    handles = []
    if change == "output_hook":
        handles.append(layer.conv_v.register_forward_hook(lambda m, args, out: out * 2))
    elif change == "global_pre_hook":
        handles.append(torch.nn.modules.module.register_module_forward_pre_hook(lambda m, args: None))
    elif change == "own_forward":
        conv = _ScaledConv(16, layer.conv_v.out_channels).double()
        conv.load_state_dict(layer.conv_v.state_dict())
        layer.conv_v = conv
    else:
        torch.nn.utils.parametrizations.spectral_norm(layer.conv_v)
    x = torch.randn(2, 16, 9, 25, dtype=torch.float64)
    try:
        swap_layers(layer, "triton")
        saved, v_storage, _ = _saved_storages(layer, x)
        assert v_storage in saved
        if change == "spectral_norm":
            layer.eval()  # no power iteration: the same weight in both runs
        got = _step(layer, x)
        swap_layers(layer, "reference")
        expected = _step(layer, x)
    finally:
        for handle in handles:
            handle.remove()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_recomputed_v_uses_the_forwards_parameters():
    """torch.func.functional_call puts the module's own parameters back before the backward:
    v is recomputed with the tensors the forward used, so the gradients are those of keeping v."""
    from torch.func import functional_call
    layer = _layer(CTRGraphConv)
    swap_layers(layer, "triton")
    x = torch.randn(2, 16, 9, 25, dtype=torch.float64)
    params = {name: (p.detach() * 1.5).requires_grad_() for name, p in layer.named_parameters()}
    saved, v_storage, _ = _saved_storages(layer, x)
    assert v_storage not in saved  # recomputed
    y = functional_call(layer, params, (x,))
    _loss(y).backward()
    swap_layers(layer, "reference")
    expected = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    _loss(functional_call(layer, expected, (x,))).backward()
    for name, p in params.items():
        torch.testing.assert_close(p.grad, expected[name].grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("changed", ["x", "weight"])
def test_recomputed_v_refuses_an_input_changed_in_place(changed):
    """x or conv_v's weight modified in place after the forward: a backward that reaches only
    the aggregation's parameters (conv_v's own node, whose check would fire, never runs)
    raises autograd's error instead of recomputing a different v."""
    layer = _layer(CTRGraphConv)
    swap_layers(layer, "triton")
    h = torch.randn(2, 16, 9, 25, dtype=torch.float64, requires_grad=True) * 1.0
    loss = _loss(layer(h))
    with torch.no_grad():
        (h if changed == "x" else layer.conv_v.weight).mul_(2)
    with pytest.raises(RuntimeError, match=f"PointwiseConv2d {changed} is at version"):
        torch.autograd.grad(loss, [layer.A])
