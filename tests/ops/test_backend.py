import importlib

import pytest
import torch

from bharnet import ops
from bharnet.nn import CTRGraphConv
from bharnet.ops import _backend
from bharnet.ops._backend import resolve


def test_use_backend_sets_and_restores():
    before = ops.get_backend()
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == before


def test_use_backend_as_a_decorator_sets_the_backend_inside_each_call_only():
    before = ops.get_backend()

    @ops.use_backend("reference")
    def inside():
        return ops.get_backend()

    assert ops.get_backend() == before  # decorating changed nothing
    assert inside() == "reference" and ops.get_backend() == before
    assert inside() == "reference" and ops.get_backend() == before  # every call, not only the first
    ops.use_backend("reference")  # the statement form sets it from now on
    try:
        assert ops.get_backend() == "reference"
    finally:
        _backend._global_backend = None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("BHARNET_BACKEND", "reference")
    assert ops.get_backend() == "reference"
    monkeypatch.setenv("BHARNET_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"\$BHARNET_BACKEND must be one of .* got 'fastest'"):
        ops.get_backend()


def test_auto_runs_the_reference_under_torch_func_transforms():
    """The kernels' autograd Functions have no torch.func rules; ``auto`` steps aside there (it
    raised from the C++ kernels on CPU) and the gradients are the reference model's."""
    import bharnet

    torch.manual_seed(0)
    model = bharnet.create_model("bharnet-e", 4, preset="small").eval()  # (training BN updates buffers in place)
    body, hand = torch.randn(2, 3, 8, 25, 2), torch.randn(2, 3, 8, 42, 2)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def loss(p):
        return torch.func.functional_call(model, (p, buffers), (body, hand)).logits.square().sum()

    assert resolve("ctr_graph_conv", "auto", "cpu") == "cpp"
    with ops.use_backend("auto"):
        grads = torch.func.grad(loss)(params)
        tangent = {name: torch.randn_like(p) for name, p in params.items()}
        torch.func.jvp(loss, (params,), (tangent,))  # forward mode too
    with ops.use_backend("reference"):
        expected = torch.func.grad(loss)(params)
    for name in params:
        torch.testing.assert_close(grads[name], expected[name], msg=name)


def test_a_named_backend_without_forward_mode_derivatives_raises_under_them():
    """Named there, the C++ bone op gave zero tangents (torch.func.jvp) or none (forward_ad);
    the 1x1 convolution's C++ backend runs PyTorch's ops under forward-mode AD and stays usable."""
    import torch.autograd.forward_ad as fwAD

    x, tangent = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    parents = [0, 0, 1, 2, 1, 4]

    def bone(backend):
        return lambda z: ops.bone(z, parents, dim=1, backend=backend)

    expected = torch.func.jvp(bone("reference"), (x,), (tangent,))[1]
    assert expected.norm() > 0
    torch.testing.assert_close(torch.func.jvp(bone("auto"), (x,), (tangent,))[1], expected)
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run bone on cpu: its kernels' autograd has no "
                                           "rules for torch.func transforms .* use backend='reference'"):
        torch.func.jvp(bone("cpp"), (x,), (tangent,))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="no forward-mode derivatives"):
        bone("cpp")(fwAD.make_dual(x, tangent))
    assert ops.bone(x, parents, dim=1, backend="cpp").equal(bone("reference")(x))  # outside, as before
    x4, weight = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(6, 3, 1, 1, dtype=torch.float64)
    conv = torch.func.jvp(lambda z: ops.pointwise_conv(z, weight, backend="cpp"), (x4,), (torch.ones_like(x4),))[1]
    torch.testing.assert_close(conv, torch.nn.functional.conv2d(torch.ones_like(x4), weight))


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_a_named_kernel_backend_says_it_cannot_run_under_torch_func(transform):
    """torch.func.grad/vjp/vmap of an op on a named kernel backend: bharnet's error naming the
    way out (PyTorch's own said that an autograd.Function must override setup_context, or that
    a C++ autograd Function cannot run under functorch); ``auto`` runs the reference there."""
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    offsets, weight = torch.randn(3, dtype=torch.float64), torch.randn(6, 4, 3, dtype=torch.float64)
    calls = {"deformable_temporal_conv": lambda z, b: ops.deformable_temporal_conv(z, offsets, weight, backend=b),
             "temporal_max_pool": lambda z, b: ops.temporal_max_pool(z, backend=b)}
    for op, call in calls.items():
        def run(backend):
            fn = lambda z: call(z, backend).sum()  # noqa: E731
            return torch.func.grad(fn)(x) if transform == "grad" else torch.func.vmap(fn)(torch.stack([x, -x]))
        with pytest.raises(RuntimeError, match=f"backend 'cpp' cannot run {op} on cpu: its kernels' autograd has "
                                               "no rules for torch.func transforms"):
            run("cpp")
        torch.testing.assert_close(run("auto"), run("reference"))


def test_auto_on_cpu_never_picks_triton():
    assert resolve("ctr_graph_conv", "auto", "cpu") in ("cpp", "reference")


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match="cannot run bone on cuda"):
        resolve("bone", "cpp", "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.ctr_graph_conv(torch.randn(1, 1, 4, 2, 3), torch.randn(1, 3, 3), backend="fast")


def test_auto_passes_over_the_backends_that_cannot_take_the_shapes():
    assert resolve("ctr_graph_conv", "auto", "cuda", cannot_take=("triton",)) != "triton"
    assert resolve("ctr_graph_conv", "auto", "cuda", cannot_take=("triton", "cpp")) == "reference"
    assert resolve("ctr_graph_conv", "triton", "cuda", cannot_take=("triton",)) == "triton"  # raises in the op


def _gpu_auto_order_recording(monkeypatch, module_name):
    """Make ``auto`` on CPU try the backends in CUDA's order (Triton first, run by the Triton
    interpreter here); returns the list of the backends that the op module's calls run."""
    module = importlib.import_module(f"bharnet.ops.{module_name}")
    monkeypatch.setattr(_backend, "_AUTO_ORDER", {"cpu": _backend._AUTO_ORDER["cuda"]})
    ran = []
    for name, impl in list(module._IMPLS.items()):
        def recorded(*args, _name=name, _impl=impl):
            ran.append(_name)
            return _impl(*args)
        monkeypatch.setitem(module._IMPLS, name, recorded)
    return module, ran


@pytest.mark.parametrize("V", [25, 129])
def test_auto_takes_the_next_backend_for_more_joints_than_triton_holds(monkeypatch, V):
    if _backend.unavailable_reason("ctr_graph_conv", "cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not available")
    module, ran = _gpu_auto_order_recording(monkeypatch, "ctr_graph_conv")
    g = torch.Generator().manual_seed(0)
    v, A = torch.randn(1, 2, 4, 3, V, generator=g), torch.randn(2, V, V, generator=g)
    y = ops.ctr_graph_conv(v, A, backend="auto")
    assert ran == ["triton" if V <= 128 else "cpp"]
    torch.testing.assert_close(y, module.ctr_graph_conv_reference(v, A), rtol=1e-4, atol=1e-4)
    if V > 128:  # named, the Triton backend still says why it cannot
        with pytest.raises(ValueError, match=f"V <= 128 joints, got V={V}"):
            ops.ctr_graph_conv(v, A, backend="triton")


@pytest.mark.parametrize("dynamic", [False, True])
def test_auto_takes_the_next_backend_for_more_sequences_than_a_triton_grid_holds(monkeypatch, dynamic):
    """The Triton CTR-GC kernels put B on the grid's third axis, which a GPU caps at 65535."""
    if _backend.unavailable_reason("ctr_graph_conv", "cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not available")
    module, ran = _gpu_auto_order_recording(monkeypatch, "ctr_graph_conv")
    g = torch.Generator().manual_seed(0)
    B, H, C, T, V, R, G = 65536, 1, 2, 1, 3, 2, 1
    v, A = torch.randn(B, H, C, T, V, generator=g), torch.randn(H, V, V, generator=g)
    refine = (torch.randn(B, H, R, V, generator=g), torch.randn(B, H, R, V, generator=g),
              torch.randn(H, G, R, generator=g), torch.randn(H, G, generator=g), torch.tensor([0.5]))
    args = (v, A, *refine) if dynamic else (v, A)
    y = ops.ctr_graph_conv(*args, backend="auto")
    assert ran == ["cpp"]
    torch.testing.assert_close(y, module.ctr_graph_conv_reference(*args), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="B <= 65535 sequences .* got B=65536"):
        ops.ctr_graph_conv(*args, backend="triton")
    assert module.backends_that_cannot_take(V, 65535) == ()


def test_a_graph_convolution_layer_with_more_joints_than_triton_holds_runs_under_auto(monkeypatch):
    """The layer resolves its backend itself (its mean over time depends on it): it must pass
    over Triton too, not hand the op an explicit 'triton'."""
    if _backend.unavailable_reason("ctr_graph_conv", "cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not available")
    module, ran = _gpu_auto_order_recording(monkeypatch, "ctr_graph_conv")
    torch.manual_seed(0)
    V = 133  # COCO-WholeBody's keypoints
    layer = CTRGraphConv(4, 8, torch.rand(3, V, V), impl="auto").eval()
    layer.alpha.data.fill_(0.5)
    x = torch.randn(2, 4, 5, V)
    with torch.no_grad():
        y = layer(x)
        assert ran == ["cpp"]
        layer.impl = "reference"
        torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-4)


def test_auto_takes_the_next_backend_for_head_dims_triton_cannot_take(monkeypatch):
    module, ran = _gpu_auto_order_recording(monkeypatch, "cross_attention")
    g = torch.Generator().manual_seed(0)
    D, heads = 132, 1
    x_q, x_kv = torch.randn(2, 3, D, generator=g), torch.randn(2, 5, D, generator=g)
    weights = [torch.randn(D, D, generator=g) * 0.1, None, torch.randn(2 * D, D, generator=g) * 0.1, None,
               torch.randn(D, D, generator=g) * 0.1, None]
    y = ops.cross_attention(x_q, x_kv, heads, *weights, backend="auto")
    assert len(ran) == 1 and ran[0] != "triton"  # cpp (no head-dim limit on CPU) or reference
    torch.testing.assert_close(y, module.cross_attention_reference(x_q, x_kv, heads, *weights),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="head dims <= 128, got dim 132 / heads 1 = 132"):
        ops.cross_attention(x_q, x_kv, heads, *weights, backend="triton")


@pytest.mark.gpu
def test_auto_on_a_gpu_runs_what_the_kernels_cannot_take():
    """More joints than Triton's tiles (COCO-WholeBody has 133 keypoints): the CUDA kernels;
    head dims above 128, which neither GPU backend takes: the reference."""
    g = torch.Generator(device="cuda").manual_seed(0)
    v, A = torch.randn(2, 3, 8, 4, 133, device="cuda", generator=g), torch.randn(3, 133, 133, device="cuda", generator=g)
    ctr = importlib.import_module("bharnet.ops.ctr_graph_conv")
    torch.testing.assert_close(ops.ctr_graph_conv(v, A, backend="auto"), ctr.ctr_graph_conv_reference(v, A),
                               rtol=1e-3, atol=1e-3)
    layer = CTRGraphConv(4, 8, A.cpu(), impl="auto").cuda().eval()
    x = torch.randn(2, 4, 5, 133, device="cuda", generator=g)
    with torch.no_grad():
        y = layer(x)
        layer.impl = "reference"
        torch.testing.assert_close(y, layer(x), rtol=1e-3, atol=1e-3)
    D = 264
    x_q, x_kv = torch.randn(2, 3, D, device="cuda", generator=g), torch.randn(2, 5, D, device="cuda", generator=g)
    weights = [torch.randn(D, D, device="cuda", generator=g) * 0.05, None,
               torch.randn(2 * D, D, device="cuda", generator=g) * 0.05, None,
               torch.randn(D, D, device="cuda", generator=g) * 0.05, None]
    attention = importlib.import_module("bharnet.ops.cross_attention")
    torch.testing.assert_close(ops.cross_attention(x_q, x_kv, 2, *weights, backend="auto"),
                               attention.cross_attention_reference(x_q, x_kv, 2, *weights), rtol=1e-3, atol=1e-3)
