"""fuse_for_inference: BatchNorm folding is exact, the original model is untouched, the fused
model runs on the C++ kernels, and training mode is refused."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bharnet
from bharnet._ext import cpp_availability
from bharnet.fast import ChannelBias, SharedInputBranches, fuse_for_inference, swap_layers
from bharnet.models import MODELS
from bharnet.ops._checks import is_channels_last
from bharnet.nn import (ConvBN, CTRGraphConv, DeformableTemporalConv, GCNBlock, MultiScaleTemporalConv, TemporalMaxPool,
                        TokenCrossAttention)
from bharnet.nn.conv import PointwiseConv2d
from bharnet.nn.graph_conv import STGraphConv
from trained_models import trained_like, with_statistics

needs_cpp = pytest.mark.skipif(cpp_availability("cpu") is not None,
                               reason=f"C++ kernels unavailable: {cpp_availability('cpu')}")


def inputs(dtype=torch.float64, frames=8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, frames, 25, 2, generator=g).to(dtype),
            torch.randn(2, 3, frames, 42, 2, generator=g).to(dtype))


def relative_error(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_folding_is_exact_in_float64(name):
    model = swap_layers(trained_like(name), "reference")
    fused = fuse_for_inference(model, "reference")
    # Left: data_bn (BatchNorm1d) and the BN after each MSTCN's max-pool branch; nothing else.
    assert count(fused, nn.BatchNorm1d) == count(model, nn.BatchNorm1d)
    assert count(fused, nn.BatchNorm2d) == count(model, MultiScaleTemporalConv)
    # The small preset has blocks with and without a residual convolution: both shift paths.
    assert 0 < count(fused, ChannelBias) < count(fused, STGraphConv) + count(fused, CTRGraphConv)
    assert count(fused, SharedInputBranches) == count(model, MultiScaleTemporalConv) > 0
    assert count(fused, nn.MaxPool2d) == 0 and count(fused, TemporalMaxPool) == count(model, MultiScaleTemporalConv)
    body, hand = inputs()
    with torch.no_grad():
        ref, out = model(body, hand), fused(body, hand)
    assert relative_error(out.logits, ref.logits) < 1e-10
    assert ref.parts.keys() == out.parts.keys()
    for part, logits in ref.parts.items():
        assert relative_error(out.parts[part], logits) < 1e-10, part


def test_temporal_max_pools_become_the_fused_layer():
    """A plain nn.MaxPool2d over time becomes bharnet.nn.TemporalMaxPool (same values, NaN
    included); pools over joints too, or with ceil_mode, stay."""
    model = nn.Sequential(nn.MaxPool2d((3, 1), stride=(2, 1), padding=(1, 0)),
                          nn.MaxPool2d((3, 3), stride=1, padding=1),
                          nn.MaxPool2d((3, 1), stride=(2, 1), ceil_mode=True)).eval()
    fused = fuse_for_inference(model, "cpp")
    assert [type(m) for m in fused] == [TemporalMaxPool, nn.MaxPool2d, nn.MaxPool2d]
    assert fused[0].impl == "cpp"
    x = torch.randn(2, 3, 13, 5, dtype=torch.float64)
    x[0, 1, 6, 2] = float("nan")
    x[1, 0, :, 1] = float("-inf")
    with torch.no_grad():
        got, expected = fused[0](x), model[0](x)
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_original_model_is_untouched():
    model = swap_layers(trained_like("bharnet-e"), "reference")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    fused = fuse_for_inference(model, "cpp")
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == {"reference"}
    assert not {p.data_ptr() for p in model.parameters()} & {p.data_ptr() for p in fused.parameters()}


def test_training_mode_is_refused():
    model = trained_like("bharnet-e")
    model.train()
    with pytest.raises(ValueError, match=r"eval mode \(call model.eval\(\) first\)"):
        fuse_for_inference(model)
    model.eval()
    model.hand_stem.train()  # one submodule left in training mode is enough to refuse
    with pytest.raises(ValueError, match="in training mode: hand_stem"):
        fuse_for_inference(model)
    model.eval()
    fused = fuse_for_inference(model, "reference")
    fused.train()
    with pytest.raises(RuntimeError, match="fused for inference"):
        fused(*inputs())
    fused.eval()
    fused(*inputs())


def test_batchnorm_without_running_statistics_is_refused():
    model = trained_like("body")
    bn = model.expert.blocks[1].gcn.bn
    bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    with pytest.raises(ValueError, match=r"expert.blocks.1.gcn.bn has no running statistics"):
        fuse_for_inference(model)


def random_bn(channels):
    return with_statistics(nn.BatchNorm2d(channels)).double().eval()


def test_shared_modules_and_tied_weights_are_folded_at_every_place():
    """A conv+BN pair used twice, one convolution before two different BNs, and two
    convolutions holding one weight: each place is folded with its own BN."""
    pair = nn.Sequential(nn.Conv2d(4, 4, 1), random_bn(4)).double()
    conv = nn.Conv2d(4, 4, 1).double()
    tied = nn.Conv2d(4, 4, 1).double()
    tied_twin = nn.Conv2d(4, 4, 1).double()
    tied_twin.weight = tied.weight
    model = nn.Sequential(pair, nn.ReLU(), pair, nn.Sequential(conv, random_bn(4)), nn.Sequential(conv, random_bn(4)),
                          nn.Sequential(tied, random_bn(4)), nn.Sequential(tied_twin, random_bn(4))).eval()
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    fused = fuse_for_inference(model, "reference")
    assert count(fused, nn.BatchNorm2d) == 0
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) < 1e-12


def test_convolutions_without_bias_are_folded():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), random_bn(4))).double().eval()
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    fused = fuse_for_inference(model, "reference")
    assert isinstance(fused[0], nn.Conv2d) and fused[0].bias is not None and model[0][0].bias is None
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) < 1e-12


@pytest.mark.parametrize("unit", ["conv_bn", "ConvBN", "MultiScaleTemporalConv", "max_pool"])
def test_a_model_that_is_one_foldable_unit_is_fused(unit):
    """fuse_for_inference on a layer stack's part (its root is the unit that gets replaced)."""
    model = {"conv_bn": lambda: nn.Sequential(nn.Conv2d(8, 8, 1), random_bn(8)),
             "ConvBN": lambda: ConvBN(8, 8), "MultiScaleTemporalConv": lambda: MultiScaleTemporalConv(8, 8),
             "max_pool": lambda: nn.MaxPool2d((3, 1), (1, 1), (1, 0))}[unit]().double()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with_statistics(bn)
    model.eval()
    fused = fuse_for_inference(model, "reference")
    assert type(fused) is {"conv_bn": nn.Conv2d, "ConvBN": PointwiseConv2d, "MultiScaleTemporalConv": SharedInputBranches,
                           "max_pool": TemporalMaxPool}[unit]
    x = torch.randn(2, 8, 10, 25, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) < 1e-12
    with pytest.raises(RuntimeError):
        fused.train()(x)


def test_the_fused_model_is_in_eval_mode_and_is_not_fused_again():
    fused = fuse_for_inference(trained_like("bharnet-e"), "reference")
    assert not [name for name, m in fused.named_modules() if m.training]
    with pytest.raises(ValueError, match="already fused for inference; pass the unfused"):
        fuse_for_inference(fused)


@needs_cpp
def test_swap_layers_cpp_runs_every_fused_layer_on_cpp():
    model = swap_layers(trained_like("bharnet-e", torch.float32), "cpp")
    impls = {type(m).__name__: m.impl for m in model.modules() if hasattr(m, "impl")}
    assert "TokenCrossAttention" in impls and set(impls.values()) == {"cpp"}
    with torch.no_grad():
        model(*inputs(torch.float32))


def test_swap_layers_leaves_a_layer_whose_op_lacks_the_backend_on_auto():
    """``bone`` has no Triton backend: a layer built on it keeps ``auto`` under
    ``swap_layers(model, "triton")`` instead of failing at its first call."""
    class BoneLayer(nn.Module):
        fused_op = "bone"
        impl = "reference"

    model = nn.Sequential(BoneLayer(), DeformableTemporalConv(4, 4))
    swap_layers(model, "triton")
    assert model[0].impl == "auto" and model[1].impl == "triton"


@needs_cpp
@pytest.mark.parametrize("name", ["bharnet-e", "unified"])
def test_fused_cpp_model_matches_the_reference_in_float32(name):
    """Float32 tolerance, as in DESIGN.md section 6: against the float64 reference, the fused
    C++ model's error may be at most 2x that of the unfused reference run in float32 (folding
    reorders roundings, the kernels sum in another order; neither may lose more accuracy than
    float32 itself does), with a floor of a few float32 ulps for the case where both are tiny."""
    model64 = swap_layers(trained_like(name), "reference")
    model32 = swap_layers(trained_like(name, torch.float32), "reference")
    fused = fuse_for_inference(model32, "cpp")
    assert {m.impl for m in fused.modules() if isinstance(m, (CTRGraphConv, DeformableTemporalConv))} == {"cpp"}
    body, hand = inputs()
    with torch.no_grad():
        exact = model64(body, hand).logits
        ref32 = model32(body.float(), hand.float()).logits
        out = fused(body.float(), hand.float()).logits
    assert out.dtype == torch.float32
    budget = max(2 * relative_error(ref32.double(), exact), 5e-7)
    assert relative_error(out.double(), exact) <= budget


class BharnetOpDtypes(TorchDispatchMode):
    """Records (op, dtype of its first argument) for every bharnet op dispatched."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "bharnet":
            self.seen.add((func.__name__.split(".")[0], args[0].dtype))
        return func(*args, **(kwargs or {}))


@needs_cpp
@pytest.mark.parametrize("name", ["bharnet-e", "unified"])
def test_fused_cpp_model_in_bfloat16(name):
    """A bfloat16 copy of the fused model (``fuse_for_inference(model).to(torch.bfloat16)``,
    the README's bfloat16 inference): the graph and temporal convolutions' and the max-pools' C++
    kernels take its bfloat16 features as they are (no float32 copies), the output is bfloat16,
    and its error
    against the float64 reference is at most 2x that of the unfused reference model run in
    bfloat16 (DESIGN.md section 6's rule for low precision)."""
    model64 = swap_layers(trained_like(name), "reference")
    ref16 = swap_layers(trained_like(name, torch.bfloat16), "reference")
    fused = fuse_for_inference(swap_layers(trained_like(name, torch.float32), "reference"), "cpp")
    fused16 = fused.to(torch.bfloat16)
    body, hand = inputs()
    with torch.no_grad():
        exact = model64(body, hand).logits
        ref = ref16(body.bfloat16(), hand.bfloat16()).logits
        with BharnetOpDtypes() as ops:
            out = fused16(body.bfloat16(), hand.bfloat16()).logits
    assert out.dtype == torch.bfloat16
    native = ("ctr_graph_conv_cpp", "deformable_temporal_conv_cpp", "temporal_max_pool")
    assert {(op, torch.bfloat16) for op in native} <= ops.seen
    assert not any(dtype == torch.float32 for op, dtype in ops.seen if op in native)
    assert relative_error(out.double(), exact) <= 2 * relative_error(ref.double(), exact)


def block_output_layouts(model, body, hand):
    """Whether each GCNBlock's output is channels-last, over one forward of ``model``."""
    layouts = []
    hooks = [m.register_forward_hook(lambda mod, args, out: layouts.append(is_channels_last(out)))
             for m in model.modules() if isinstance(m, GCNBlock)]
    with torch.no_grad():
        out = model(body, hand)
    for hook in hooks:
        hook.remove()
    return out, layouts


@needs_cpp
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_cpp_model_runs_channels_last_and_exactly_in_float64(name):
    """On CPU with the C++ kernels the fused model keeps its features channels-last from the
    first block on (convolution weights channels-last, the kernels reading and writing that
    layout); float64 makes the comparison tight. The reference backend stays channels-first."""
    model = swap_layers(trained_like(name), "reference")
    fused = fuse_for_inference(model, "cpp")
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in fused.modules() if isinstance(m, nn.Conv2d))
    body, hand = inputs()
    out, layouts = block_output_layouts(fused, body, hand)
    assert layouts and all(layouts)
    with torch.no_grad():
        ref = model(body, hand)
    assert relative_error(out.logits, ref.logits) < 1e-10
    _, layouts = block_output_layouts(fuse_for_inference(model, "reference"), body, hand)
    assert not any(layouts)
    on_triton = fuse_for_inference(model, "triton")  # Triton cannot run here: fusing still works
    assert all(m.weight.is_contiguous() for m in on_triton.modules() if isinstance(m, nn.Conv2d))


@needs_cpp
def test_a_custom_model_reads_its_block_stack_output_channels_first():
    """Inside a fused custom model the blocks pass channels-last features; the last block of a
    stack hands its output back channels-first, so the model's own code (a .view that merges C,
    T and V here) runs as unfused. bharnet's models keep channels-last to the pooling."""
    from bharnet.graphs import BODY
    from bharnet.nn import make_blocks

    class FlattenHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = make_blocks((16, 16), (1, 1), torch.from_numpy(BODY.adjacency()), 3)
            self.fc = nn.Linear(16 * 8 * 25, 4)

        def forward(self, x):
            features = self.blocks(x)
            return self.fc(features.view(features.shape[0], -1))

    torch.manual_seed(0)
    model = FlattenHead().eval()
    fused = fuse_for_inference(model, "cpp")
    x = torch.randn(2, 3, 8, 25)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    single = fuse_for_inference(model.blocks[0], "cpp")  # a block as the whole model
    with torch.no_grad():
        assert single(x).is_contiguous()

    class TwoStreams(nn.Module):  # blocks side by side, each read by the model's own code
        def __init__(self):
            super().__init__()
            adjacency = torch.from_numpy(BODY.adjacency())
            self.joint, self.motion = (make_blocks((8,), (1,), adjacency, 3)[0] for _ in range(2))

        def forward(self, x):
            return torch.cat([self.joint(x).view(2, -1), self.motion(x).view(2, -1)], dim=1)

    streams = TwoStreams().eval()
    with torch.no_grad():
        torch.testing.assert_close(fuse_for_inference(streams, "cpp")(x), streams(x), rtol=1e-4, atol=1e-5)

    class Wrapper(nn.Module):  # one of bharnet's models inside a custom one keeps channels-last
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, body, hand):
            return self.inner(body, hand)

    from bharnet.fast import _blocks_ending_a_stack
    assert _blocks_ending_a_stack(Wrapper(trained_like("bharnet-e"))) == []
    assert len(_blocks_ending_a_stack(FlattenHead())) == 1  # the last of the Sequential only


@needs_cpp
def test_a_model_without_gcn_blocks_keeps_its_layout():
    """Channels-last is for models of GCNBlocks only: other models (here with a 5-D weight, which
    cannot be channels-last) fuse as before, their outputs contiguous."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Flatten(), nn.Unflatten(1, (4, 1, 5, 5)),
                          nn.Conv3d(4, 2, 1)).eval()
    fused = fuse_for_inference(model, "cpp")
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        out = fused(x)
        assert out.is_contiguous() and torch.equal(out, model(x))
    assert fused[0].weight.is_contiguous()


@needs_cpp
def test_bench_has_a_fused_inference_provider():
    from bharnet.bench.model_cases import ModelCase, make_step
    from bharnet.bench.providers import model_providers
    assert [p.name for p in model_providers([], infer=True)] == ["eager", "auto", "auto+fold"]
    assert [p.name for p in model_providers(["default"], infer=True)] == [
        "eager", "compile", "auto", "auto+compile", "auto+fold", "auto+fold+compile"]
    assert "auto+fold" not in [p.name for p in model_providers([])]  # training: nothing to fold
    with bharnet.ops.use_backend("auto"):
        make_step(ModelCase("bharnet-e", "infer", "small", 1, 2, 8, classes=5), torch.device("cpu"),
                  "fp32", None, fold=True)()


@torch.no_grad()
def with_bn_statistics(model):
    """``model`` with random statistics and affine parameters in every BatchNorm."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with_statistics(m)
    return model


def body_blocks(*widths):
    from bharnet.graphs import BODY
    from bharnet.nn import make_blocks
    return make_blocks(widths, (1,) * len(widths), torch.from_numpy(BODY.adjacency()), 3)


def test_subclasses_with_a_forward_of_their_own_are_not_rewritten_as_their_base():
    """A Sequential, MSTCN or GCNBlock subclass that adds a skip or reorders its parts computes
    another function than its base class: it is left as it is (its own parts still fold where
    their forward is the stock one)."""
    class ConvBNResidual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    class MSTCNWithSkip(MultiScaleTemporalConv):
        def forward(self, x):
            return super().forward(x) + x

    class PreActBlock(GCNBlock):
        def forward(self, x):
            y = self.act(self.gcn(x)) + self.res_gcn(x)
            return self.act(self.tcn(y) + self.res_tcn(x))

    torch.manual_seed(0)
    cases = [(ConvBNResidual(nn.Conv2d(16, 16, 1), random_bn(16)), 16),
             (MSTCNWithSkip(16, 16), 16), (PreActBlock(3, 16, body_blocks(16)[0].gcn.A), 3)]
    for model, channels in cases:
        model = with_bn_statistics(nn.Sequential(model)).double().eval()
        x = torch.randn(2, channels, 8, 25, dtype=torch.float64)
        with torch.no_grad():
            assert relative_error(fuse_for_inference(model, "reference")(x), model(x)) < 1e-12, type(model[0])


@pytest.mark.parametrize("reparametrize", ["weight_norm", "spectral_norm", "old_weight_norm"])
def test_reparametrized_weights_are_folded_and_the_original_keeps_working(reparametrize):
    """Folding writes into the weight, which a parametrization recomputes at each access: the
    copy's weights become plain parameters first, without touching the caller's model (torch's
    remove_parametrizations would delete the property from the class the two share)."""
    from torch.nn.utils import parametrizations, weight_norm
    conv = nn.Conv2d(16, 16, 1)
    conv = {"weight_norm": parametrizations.weight_norm, "spectral_norm": parametrizations.spectral_norm,
            "old_weight_norm": weight_norm}[reparametrize](conv)
    model = nn.Sequential(nn.Sequential(conv, random_bn(16))).double().eval()
    x = torch.randn(2, 16, 8, 25, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        fused = fuse_for_inference(model, "reference")
        assert relative_error(fused(x), want) < 1e-12
        assert torch.equal(model(x), want)  # the original still runs, unchanged


def test_a_norm_that_is_not_a_batchnorm_is_left_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(*body_blocks(8, 8)).double()
    model[0].gcn.bn = nn.GroupNorm(2, 8).double()
    model[1].tcn.branches[0][1] = nn.Identity()  # a branch's conv without its BN
    model = with_bn_statistics(model).eval()
    x = torch.randn(2, 3, 8, 25, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(fuse_for_inference(model, "reference")(x), model(x)) < 1e-12


def test_an_mstcn_whose_batchnorms_cannot_be_folded_still_fuses():
    """SyncBatchNorm in place of the BatchNorms (convert_sync_batchnorm): no ConvBN folds, and
    the shared input convolution feeds each unfolded branch's BN (a slice of the ConvBN)."""
    torch.manual_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(MultiScaleTemporalConv(8, 8))).double()
    model = with_bn_statistics(model).eval()
    x = torch.randn(2, 8, 9, 5, dtype=torch.float64)
    fused = fuse_for_inference(model, "reference")
    assert count(fused, SharedInputBranches) == 1
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_short_channel_runs_are_copied_before_their_branch(dtype, monkeypatch):
    """The MSTCN's split parts of 16 channels, channels-last: in bfloat16 (32-byte runs) the
    shared branches with layers get a channels-last copy (the plain 1x1 branch, whose rest is
    nn.Identity, its slice), in float32 (64 bytes) the slices; the output is the same bit for
    bit as with the slices."""
    torch.manual_seed(0)
    model = with_bn_statistics(nn.Sequential(MultiScaleTemporalConv(16, 64))).eval()
    fused = fuse_for_inference(model, "reference").to(dtype)
    x = torch.randn(2, 16, 9, 5).to(dtype).contiguous(memory_format=torch.channels_last)
    seen = []
    shared = next(m for m in fused.modules() if isinstance(m, SharedInputBranches))
    for rest, is_shared in zip(shared.rests, shared.shared):
        if is_shared:
            rest.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        out = fused(x)
        monkeypatch.setattr(bharnet.fast, "_with_whole_vector_runs", lambda part: part)
        out_from_slices = fused(x)
    copied = [t.is_contiguous(memory_format=torch.channels_last) for t in seen]
    assert len(seen) == 8 and copied[:4] == [dtype == torch.bfloat16] * 3 + [False] and not any(copied[4:])
    assert torch.equal(out, out_from_slices)


def test_a_batchnorm_left_unfolded_refuses_training_mode_when_called_on_its_own():
    """Called in training mode, the BN that stays (after the max-pool branch) would update its
    statistics, and the fused model would stay wrong after eval()."""
    model = with_bn_statistics(nn.Sequential(*body_blocks(8))).eval()
    fused = fuse_for_inference(model, "reference")
    fused.train()
    with pytest.raises(RuntimeError, match="fused for inference"):
        fused[0](torch.randn(2, 3, 8, 25))


@needs_cpp
def test_the_fused_channels_last_path_stays_inside_the_blocks():
    """On the C++ path the blocks' convolution weights go channels-last; a user's own
    convolution after them keeps its layout (its output is read with .view here), and a block
    called with a keyword argument works."""
    class ConvHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(*body_blocks(16, 16))
            self.conv = nn.Conv2d(16, 4, (8, 1))
            self.fc = nn.Linear(4 * 25, 3)

        def forward(self, x):
            h = self.conv(self.blocks(x))
            return self.fc(h.view(h.shape[0], -1))

    torch.manual_seed(0)
    model = with_bn_statistics(ConvHead()).eval()
    fused = fuse_for_inference(model, "cpp")
    x = torch.randn(2, 3, 8, 25)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
        assert not fused.conv.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(fused.blocks[0](x=x), model.blocks[0](x), rtol=1e-4, atol=1e-5)
