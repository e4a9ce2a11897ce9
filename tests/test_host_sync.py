"""No host sync in a training step: the model's forward, loss, backward and optimizer step
never make the host wait for the device, so on a GPU the host can queue kernels ahead of them
(and a step can be captured as a CUDA graph). Checked on the CPU by profiling a step and
looking for the ATen ops behind a device-to-host read: ``.item()``/``bool()``/``float()``
(``aten::_local_scalar_dense``), ``nonzero``, ``equal``, and the ops whose output shape depends
on values. The Triton backends' GPU-only branches are not reached here (interpreter); the ops
are profiled one by one, at tiny shapes, to keep the interpreter fast."""
import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import bharnet
from bharnet.bench.op_cases import attention_case, batch_norm_case, ctr_case, detgc_case
from bharnet.engine.config import TrainConfig
from bharnet.engine.trainer import make_optimizer
from bharnet.fast import swap_layers
from bharnet.models import MODELS
from bharnet.ops.layer_norm import layer_norm

SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero",
            "aten::nonzero_static", "aten::masked_select", "aten::equal", "aten::allclose",
            "aten::unique", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim",
            "aten::repeat_interleave", "aten::_assert_scalar"}


def sync_ops(fn) -> collections.Counter:
    """The host-sync ATen ops that one call of ``fn`` runs (profiled; ``fn`` ran once before)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.name in SYNC_OPS)


def test_the_detector_sees_a_host_read():
    x = torch.randn(4)
    assert sync_ops(lambda: float(x.sum()))["aten::_local_scalar_dense"] == 1
    assert sync_ops(lambda: x.nonzero())["aten::nonzero"] == 1


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("name", MODELS)
def test_a_training_step_has_no_host_sync(name, backend):
    torch.manual_seed(0)
    model = swap_layers(bharnet.create_model(name, 5, preset="small"), backend).train()
    optimizer = make_optimizer(model, TrainConfig(model=name), torch.device("cpu"))
    body, hand, label = torch.randn(2, 3, 4, 25, 2), torch.randn(2, 3, 4, 42, 2), torch.tensor([1, 3])

    def step():
        loss = model.loss(model(body, hand), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert sync_ops(step) == {}


def _triton_cases():
    return [ctr_case(2, 8, 3, 25), ctr_case(2, 8, 3, 25, static=True), detgc_case(2, 4, 5, 25, stride=2),
            attention_case(2, 25, 42, 32, 2), attention_case(1, 40, 70, 16, 1), batch_norm_case(2, 4, 3, 25)]


@pytest.mark.parametrize("case", _triton_cases(), ids=lambda c: f"{c.op}-{c.x}")
def test_triton_ops_have_no_host_sync(case):
    inputs = case.make(torch.device("cpu"), torch.float32)
    fn = case.function("triton")

    def fwd_bwd():
        y = fn(*inputs.args)
        torch.autograd.grad(y, inputs.grads, torch.ones_like(y))
    assert sync_ops(fwd_bwd) == {}


def test_masked_cross_attention_and_layer_norm_have_no_host_sync():
    g = torch.Generator().manual_seed(0)
    x_q, x_kv = torch.randn(2, 5, 16, generator=g, requires_grad=True), torch.randn(2, 7, 16, generator=g)
    params = [torch.randn(*shape, generator=g) * 0.3 for shape in ((16, 16), (16,), (32, 16), (32,), (16, 16), (16,))]
    mask = torch.tensor([[True] * 7, [False] * 7])  # the second sample's keys are all masked

    def fwd_bwd():
        y = bharnet.ops.cross_attention(x_q, x_kv, 2, *params, key_mask=mask, backend="triton")
        z = layer_norm(y, torch.ones(16), torch.zeros(16))
        torch.autograd.grad(z.sum(), x_q)
    assert sync_ops(fwd_bwd) == {}
