import ctypes
import os
import subprocess
import sys

import pytest
import torch

import bharnet
from bharnet.fast import swap_layers
from bharnet.nn import CTRGraphConv


def small_model(name="bharnet-e", **config):
    torch.manual_seed(0)
    model = bharnet.create_model(name, 5, preset="small", **config)
    for module in model.modules():
        if isinstance(module, CTRGraphConv):
            module.alpha.data.fill_(0.3)  # exercise the refinement path, zero at init
    return model


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 4, 25, 2, generator=g), torch.randn(2, 3, 4, 42, 2, generator=g)


def test_swap_layers_keeps_state_dict_and_sets_every_layer():
    model = small_model()
    keys = list(model.state_dict())
    assert swap_layers(model, "reference") is model
    assert list(model.state_dict()) == keys
    impls = {m.impl for m in model.modules() if hasattr(m, "impl")}
    assert impls == {"reference"}
    with pytest.raises(ValueError, match="backend must be one of"):
        swap_layers(model, "cuda")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton needs CUDA or the interpreter")
def test_triton_model_matches_reference_and_checkpoints_cross_load():
    """float64: in float32 a different rounding anywhere (e.g. the batch norms' sums) can flip
    the sign of a LeakyReLU input lying within 1e-7 of zero, which moves some gradients by
    percents (seen once: one element of 5,376)."""
    # two blocks (a one-block stem, then a strided block per branch): every kind of fused layer,
    # half the Triton interpreter's time of the small preset's four
    blocks = dict(channels=(16, 32), strides=(1, 2), stem_depth=1)
    reference = swap_layers(small_model(**blocks).double(), "reference")
    body, hand = (t.double() for t in inputs())
    target = torch.tensor([1, 3])
    out_ref = reference(body, hand)
    reference.loss(out_ref, target).backward()

    fused = bharnet.create_model("bharnet-e", 5, preset="small", **blocks).double()
    fused.load_state_dict(reference.state_dict())  # a checkpoint from the other backend
    swap_layers(fused, "triton")
    out = fused(body, hand)
    fused.loss(out, target).backward()
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-9, atol=1e-11)
    grads = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-7, atol=1e-10, msg=name)


MALLOC_PROBE = """
import ctypes, sys, torch
from bharnet.fast import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = mallinfo2().hblkhd
block = torch.empty(16 << 20, dtype=torch.uint8)
print(mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="needs glibc >= 2.33")
def test_keep_freed_memory_serves_activations_from_the_heap():
    """A fresh process mmaps a 16 MiB block (so freeing it hands the pages back to the OS);
    after keep_freed_memory() the same block comes from the heap, which is kept."""
    def mmapped_bytes(mode):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's own knobs
        result = subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], capture_output=True,
                                text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout.strip().splitlines()[-1])

    assert mmapped_bytes("default") >= 16 << 20
    assert mmapped_bytes("keep") == 0
