import copy
import types

import pytest
import torch
import torch.nn.functional as F

from bharnet.bench.memory import saved_tensor_bytes
from bharnet.nn import BatchNorm2d, ConvBN, DeformableTemporalConv, MultiScaleTemporalConv, PointwiseConv2d, recompute
from bharnet.nn import temporal
from bharnet.ops import deformable_temporal_conv, deformable_temporal_conv_reference, use_backend


def test_integer_offsets_equal_a_replicate_padded_convolution():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 5, dtype=torch.float64)
    weight = torch.randn(4, 3, 5, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    offsets = torch.arange(-2.0, 3.0, dtype=torch.float64)
    for stride in (1, 2):
        y = deformable_temporal_conv_reference(x, offsets, weight, bias, stride)
        padded = F.pad(x, (0, 0, 2, 2), mode="replicate")
        expected = F.conv2d(padded, weight[..., None], bias, stride=(stride, 1))
        torch.testing.assert_close(y, expected)


def test_offset_gradient_matches_finite_differences():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, 4, dtype=torch.float64)
    weight = torch.randn(5, 3, 4, dtype=torch.float64)
    # fractional offsets away from integers; the last ones push samples past both ends (clamped)
    offsets = torch.tensor([-1.37, 0.41, 2.73, 8.6], dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 5, 5, 4, dtype=torch.float64)

    def objective(tau):
        return (deformable_temporal_conv_reference(x, tau, weight, None, 2) * probe).sum()

    (grad,) = torch.autograd.grad(objective(offsets), offsets)
    eps = 1e-6
    numeric = torch.stack([
        (objective(offsets.detach() + eps * e) - objective(offsets.detach() - eps * e)) / (2 * eps)
        for e in torch.eye(4, dtype=torch.float64)])
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)
    assert grad[:3].abs().min() > 0  # in range: the offsets do receive gradient
    assert grad[3] == 0  # every sample of the last offset is clamped at T - 1


def test_module_initial_offsets_and_shapes():
    layer = DeformableTemporalConv(8, 8, kernel_size=5, dilation=2, stride=2)
    torch.testing.assert_close(layer.offsets.data, torch.linspace(-4, 4, 4))
    assert layer(torch.randn(2, 8, 13, 25)).shape == (2, 8, 7, 25)
    mstcn = MultiScaleTemporalConv(16, 32, stride=2)
    y = mstcn(torch.randn(2, 16, 13, 25))
    assert y.shape == (2, 32, 7, 25)
    y.sum().backward()
    assert all(p.grad is not None for p in mstcn.parameters())


def test_bad_input():
    x = torch.randn(2, 3, 9, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(C_out, 3, 4\)"):
        deformable_temporal_conv(x, torch.zeros(4), torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C_in, T, V\)"):
        deformable_temporal_conv(x[0], torch.zeros(4), torch.randn(5, 3, 4))
    with pytest.raises(ValueError, match="stride must be a positive int"):
        deformable_temporal_conv(x, torch.zeros(4), torch.randn(5, 3, 4), stride=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        MultiScaleTemporalConv(8, 10)


def _conv_bn_step(layer, x, around=None):
    """Output, dx and every parameter's gradient of a weighted sum of ``layer(x)``, and the data
    pointers of what autograd saved, with the conv's output (the BN's input) found through a
    forward hook on the BN."""
    saved, bn_inputs = set(), []

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t
    handle = layer[1].register_forward_pre_hook(
        lambda module, args: bn_inputs.append(args[0].untyped_storage().data_ptr()))
    layer.zero_grad()
    leaf = x.detach().clone().requires_grad_()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if around is None:
                y = layer(leaf)
            else:
                with around():
                    y = layer(leaf)
    finally:
        handle.remove()
    weights = torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape)
    (y.float() * weights).sum().backward()
    grads = [y.detach(), leaf.grad] + [p.grad.clone() for p in layer.parameters()]
    return grads, saved, bn_inputs[0]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("around", [None, lambda: torch.autocast("cpu", dtype=torch.bfloat16)],
                         ids=["plain", "autocast_bf16"])
def test_conv_bn_recomputes_the_bn_input_where_the_policy_says(monkeypatch, stride, around):
    """With recompute_bn_input set, where the backend recomputes
    (bharnet.nn.recompute.recomputes; the GPU kernels' backends, forced here on the CPU's C++
    kernels), autograd does not keep the convolution's output, the
    BN's input, and the backward recomputes it: the same bits as keeping it, under autocast
    too; elsewhere (the default on the CPU) it is kept. (Under autocast x is bfloat16, as
    between a model's blocks: the convolution then saves x itself, which the recomputation
    keeps; a float32 x would be kept besides the convolution's bfloat16 copy, and so is x
    besides the strided copy of its frames that a bfloat16 convolution with a temporal stride
    multiplies, bharnet.ops.pointwise_conv's batched GEMM.)"""
    torch.manual_seed(0)
    layer = ConvBN(6, 8, stride, impl="cpp", recompute_bn_input=True)
    x = torch.randn(2, 6, 9, 5, dtype=torch.float32 if around is None else torch.bfloat16)
    kept, saved_kept, bn_input = _conv_bn_step(layer, x, around)
    assert bn_input in saved_kept
    monkeypatch.setattr(recompute, "recomputes", lambda backend, device_type: True)
    got, saved, bn_input = _conv_bn_step(layer, x, around)
    conv_saves_x = around is None or stride == 1
    assert bn_input not in saved and len(saved) == len(saved_kept) - (1 if conv_saves_x else 0)
    for a, b in zip(got, kept):
        assert torch.equal(a, b)


def test_conv_bn_on_triton_recomputes_only_when_asked():
    """The recomputation is off by default (it made a GPU training step 34% slower): the BN
    input is kept; with ``recompute_bn_input`` set, a Triton ConvBN recomputes it."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 5)
    layer = ConvBN(6, 8, impl="triton")
    _, saved, bn_input = _conv_bn_step(layer, x)
    assert bn_input in saved
    layer.recompute_bn_input = True
    _, saved, bn_input = _conv_bn_step(layer, x)
    assert bn_input not in saved


def test_conv_bn_changed_by_its_user_runs_as_a_sequential():
    """A ConvBN whose modules were changed (another appended, the BN replaced) computes what an
    nn.Sequential of its modules computes."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 5)
    layer = ConvBN(6, 8)
    layer.append(torch.nn.ReLU())
    assert torch.equal(layer(x), torch.nn.Sequential(*layer)(x))
    layer = ConvBN(6, 8)
    layer[1] = torch.nn.Identity()
    assert torch.equal(layer(x), layer[0](x))


@pytest.mark.gpu
@pytest.mark.parametrize("around", [None, lambda: torch.autocast("cuda", dtype=torch.bfloat16)],
                         ids=["plain", "autocast_bf16"])
def test_conv_bn_on_cuda_recomputes_the_bn_input_when_asked(around):
    """On CUDA, under auto (PyTorch's BatchNorm there), the BN input is kept by default and
    recomputed with ``recompute_bn_input`` set: then not saved, with the results of keeping it
    (up to the dtype's rounding, should the recomputed convolution pick another algorithm)."""
    torch.manual_seed(0)
    layer = ConvBN(16, 24, 2).cuda()
    x = torch.randn(4, 16, 9, 25, device="cuda", dtype=torch.float32 if around is None else torch.bfloat16)
    kept, saved_kept, bn_input = _conv_bn_step(layer, x, around)
    assert bn_input in saved_kept
    layer.recompute_bn_input = True
    got, saved, bn_input = _conv_bn_step(layer, x, around)
    assert bn_input not in saved
    for a, b in zip(got, kept):
        torch.testing.assert_close(a, b)


def test_conv_bn_slices_to_a_sequential():
    """Slicing gives an nn.Sequential of those modules (nn.Sequential builds slices with its
    class's __init__; fuse_for_inference slices branches it cannot fold)."""
    layer = ConvBN(6, 8)
    tail = layer[1:]
    assert type(tail) is torch.nn.Sequential and list(tail) == [layer[1]]
    assert list(layer[:]) == list(layer)


def _one_by_one(mstcn):
    """A copy of ``mstcn`` whose branches run one by one (the same layers on the same backend)."""
    plain = copy.deepcopy(mstcn)
    plain._stacked_heads = lambda: None
    return plain


def _conv_calls(mstcn, monkeypatch):
    """A list that records the widths of the 1x1 convolutions ``mstcn``'s branches compute."""
    calls = []
    original = PointwiseConv2d._conv_forward

    def counted(self, x, weight, bias):
        calls.append(weight.shape[0])
        return original(self, x, weight, bias)
    monkeypatch.setattr(PointwiseConv2d, "_conv_forward", counted)
    return calls


def _step(mstcn, x):
    """Output, dx, every parameter's gradient and every buffer after one forward and backward."""
    mstcn.zero_grad()
    leaf = x.detach().clone().requires_grad_()
    out = mstcn(leaf)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
    return [out.detach(), leaf.grad] + [p.grad for p in mstcn.parameters()] + [b.clone() for b in mstcn.buffers()]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_stacked_branch_inputs_compute_the_branches_one_by_one(stride, training, monkeypatch):
    """On cpp the three activated branches' input ConvBNs run as one convolution and one BN
    (odd sizes, float64): the same output, input and parameter gradients, running statistics
    and batch counts as the branches one by one, over two steps (the second reads the running
    statistics the first wrote back), in training and evaluation mode."""
    torch.manual_seed(0)
    mstcn = MultiScaleTemporalConv(12, 20, stride=stride, impl="cpp").double().train(training)
    for bn in (m for m in mstcn.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    plain = _one_by_one(mstcn)
    calls = _conv_calls(mstcn, monkeypatch)
    for seed in (1, 2):
        x = torch.randn(3, 12, 11, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        stacked_step = _step(mstcn, x)
        plain_step = _step(plain, x)
        for got, want in zip(stacked_step, plain_step, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert calls == ([15, 5] + [5] * 4) * 2  # stacked (3 x 5) and the last branch's, then one by one


def test_stacked_branch_inputs_save_what_the_branches_save():
    """Stacking changes no saved tensor's size: the BN keeps the stacked convolution's output
    (the branches' BN inputs together), the act's in-place output is what the branches kept."""
    torch.manual_seed(0)
    mstcn = MultiScaleTemporalConv(16, 32, impl="cpp")
    x = torch.randn(2, 16, 9, 25, requires_grad=True)
    assert saved_tensor_bytes(lambda: mstcn(x)) == saved_tensor_bytes(lambda: _one_by_one(mstcn)(x))


def _set_impl(mstcn, impl):
    for m in mstcn.modules():
        if hasattr(m, "impl"):
            m.impl = impl


def _share_across_branches(mstcn, make):
    shared = make()
    for branch in mstcn.branches[:-1]:
        branch[1] = shared


_CHANGES = {
    "reference": lambda m: _set_impl(m, "reference"),
    "global_reference": lambda m: _set_impl(m, None),  # run under use_backend("reference")
    "own_acts": lambda m: [branch.__setitem__(1, torch.nn.LeakyReLU(0.1, inplace=True)) for branch in m.branches[:-1]],
    "relu": lambda m: _share_across_branches(m, lambda: torch.nn.ReLU(inplace=True)),
    "momentum_none": lambda m: [setattr(bn, "momentum", None) for bn in m.modules()
                                if isinstance(bn, torch.nn.BatchNorm2d)],
    "recompute": lambda m: setattr(m.branches[0][0], "recompute_bn_input", True),
    "shared_conv_bn": lambda m: m.branches[1].__setitem__(0, m.branches[0][0]),
    # one by one, branch 0's DeTGC BN updates before branch 1's input BN; stacked, after
    "input_bn_shared_with_a_last_bn": lambda m: setattr(m.branches[0][2], "bn", m.branches[1][0][1]),
    "forward_set_on_a_conv": lambda m: setattr(m.branches[2][0][0], "forward", m.branches[2][0][0].forward),
    # an in-place layer after an out-of-place act: autograd refuses in-place changes of the split's views
    "in_place_after_act": lambda m: (_share_across_branches(m, lambda: torch.nn.LeakyReLU(0.1)),
                                     [branch.insert(2, torch.nn.Hardtanh(-1e3, 1e3, inplace=True))
                                      for branch in m.branches[:-1]]),
    "input_bn_replaced": lambda m: m.branches[0][0].__setitem__(1, torch.nn.Identity()),
    "another_act": lambda m: _share_across_branches(m, lambda: torch.nn.LeakyReLU(0.2, inplace=True)),
}


@pytest.mark.parametrize("change", [*_CHANGES, "hook", "global_hook"])
def test_changed_branches_run_one_by_one(change, monkeypatch):
    """Where the branches differ from what MultiScaleTemporalConv builds, or a hook would miss
    the calls, they run one by one: four convolutions, hooks called, the same values, running
    statistics and batch counts as one by one (a BN shared by two branches updates twice). A
    changed act shared by the branches (another slope) still stacks."""
    torch.manual_seed(0)
    mstcn = MultiScaleTemporalConv(8, 16, impl="cpp").double()
    seen = []
    handles = []
    if change == "hook":
        handles.append(mstcn.branches[1][0][0].register_forward_hook(lambda m, args, out: seen.append(out.shape[1])))
    elif change == "global_hook":
        handles.append(torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(1)))
    else:
        _CHANGES[change](mstcn)
    plain = _one_by_one(mstcn)
    calls = _conv_calls(mstcn, monkeypatch)
    x = torch.randn(2, 8, 9, 5, dtype=torch.float64)
    with use_backend("reference" if change == "global_reference" else "auto"):
        try:
            got = _step(mstcn, x)
        finally:
            for handle in handles:
                handle.remove()
        stacked_calls = list(calls)
        want = _step(plain, x)
    assert stacked_calls == ([12, 4] if change == "another_act" else [4] * 4)
    if change in ("hook", "global_hook"):
        assert seen
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affine, track_running_stats", [(False, True), (True, False), (False, False)])
def test_stacked_batch_norms_without_affine_or_running_statistics(affine, track_running_stats, monkeypatch):
    """The stacked BN takes its layers' settings: no affine parameters, or batch statistics
    only (no buffers), as one by one."""
    torch.manual_seed(0)
    mstcn = MultiScaleTemporalConv(8, 16, impl="cpp").double()
    for branch in mstcn.branches[:-1]:
        branch[0][1] = BatchNorm2d(4, affine=affine, track_running_stats=track_running_stats, impl="cpp").double()
    plain = _one_by_one(mstcn)
    calls = _conv_calls(mstcn, monkeypatch)
    x = torch.randn(2, 8, 9, 5, dtype=torch.float64)
    for a, b in zip(_step(mstcn, x), _step(plain, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert calls[:2] == [12, 4]


def test_unbatched_input_fails_as_one_by_one():
    """A (C, T, V) input reaches the BN check as one by one, before any running statistic
    changes."""
    mstcn = MultiScaleTemporalConv(8, 16, impl="cpp", dilations=())
    before = [b.clone() for b in mstcn.buffers()]
    with pytest.raises(ValueError, match="expected 4D input"):
        mstcn(torch.randn(8, 4, 5))
    assert all(torch.equal(a, b) for a, b in zip(before, mstcn.buffers()))


def test_training_under_torch_func_fails_as_one_by_one():
    """Under torch.func transforms the branches run one by one: a training-mode call fails at
    the first batch count it would change, as one by one, and changes none."""
    mstcn = MultiScaleTemporalConv(8, 16, impl="cpp")
    params = dict(mstcn.named_parameters())
    before = [b.clone() for b in mstcn.buffers()]
    x = torch.randn(2, 8, 9, 5)
    with pytest.raises(RuntimeError):
        torch.func.grad(lambda p: torch.func.functional_call(mstcn, p, (x,)).sum())(params)
    assert all(torch.equal(a, b) for a, b in zip(before, mstcn.buffers()))


@pytest.mark.parametrize("change", [None, "recompute_last", "hook_on_detgc", "hook_on_last_bn", "hook_on_last_conv_bn",
                                    "forward_set_on_a_detgc", "own_last_momentum", "last_bn_replaced"])
def test_branch_batch_norms_stack_where_they_can(change, monkeypatch):
    """With the input ConvBNs stacked, the branches' last BNs (the DeTGCs', the max-pool's and
    the last ConvBN's) run as one more stacked BN over the branches' concatenated outputs; where
    one of them cannot (the last ConvBN recomputes its BN input, a hook or a forward of its own
    on a layer whose call it skips, another momentum, another module in place of a BN), each
    branch runs its own, with the same values, running statistics and hooks."""
    torch.manual_seed(0)
    mstcn = MultiScaleTemporalConv(8, 16, impl="cpp").double()
    seen = []
    if change == "recompute_last":
        mstcn.branches[-1].recompute_bn_input = True
    elif change == "hook_on_detgc":
        mstcn.branches[0][2].register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    elif change == "hook_on_last_bn":
        mstcn.branches[-1][1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    elif change == "hook_on_last_conv_bn":
        mstcn.branches[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1] // 2))
    elif change == "forward_set_on_a_detgc":
        detgc = mstcn.branches[1][2]  # bound, so that the one-by-one copy's calls its own copy
        detgc.forward = types.MethodType(lambda self, x: seen.append(4) or type(self).forward(self, x), detgc)
    elif change == "own_last_momentum":
        mstcn.branches[-1][1].momentum = 0.3
    elif change == "last_bn_replaced":
        mstcn.branches[-1][1] = torch.nn.Identity()
    plain = _one_by_one(mstcn)
    stacked_calls = []
    original = temporal.stacked_batch_norm

    def counted(layers, x):
        stacked_calls.append(len(layers))
        return original(layers, x)
    monkeypatch.setattr(temporal, "stacked_batch_norm", counted)
    x = torch.randn(2, 8, 9, 5, dtype=torch.float64)
    got = _step(mstcn, x)
    assert stacked_calls == ([3, 4] if change is None else [3])
    assert seen == ([] if change in (None, "recompute_last", "own_last_momentum", "last_bn_replaced") else [4])
    for a, b in zip(got, _step(plain, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("where", ["input", "last"])
def test_a_batch_norm_of_the_wrong_width_fails_as_one_by_one(where):
    """A BN whose width is not its branch's raises the BN's own error, as one by one, instead of
    normalising its neighbours' channels in the stacked call."""
    mstcn = MultiScaleTemporalConv(8, 16, impl="cpp")
    if where == "input":
        mstcn.branches[0][0][1] = BatchNorm2d(5, impl="cpp")
    else:
        mstcn.branches[0][2].bn = BatchNorm2d(5, impl="cpp")
        mstcn.branches[2][3] = BatchNorm2d(3, impl="cpp")  # the total width is right
    x = torch.randn(2, 8, 9, 5)
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 5") as stacked:
        mstcn(x)
    with pytest.raises(RuntimeError) as one_by_one:
        _one_by_one(mstcn)(x)
    assert str(stacked.value) == str(one_by_one.value)
