"""Fused ops with backend dispatch. Each op lives in its own module with its math in the
docstring, the pure-PyTorch reference and the backends (see ``_backend`` for selection)."""
from ._backend import BACKENDS, get_backend, resolve, use_backend
from .ctr_graph_conv import ctr_graph_conv, ctr_graph_conv_reference
from .bone import bone, bone_reference
from .deformable_temporal_conv import deformable_temporal_conv, deformable_temporal_conv_reference
from .cross_attention import cross_attention, cross_attention_reference
from .temporal_max_pool import temporal_max_pool, temporal_max_pool_reference
from .pointwise_conv import pointwise_conv, pointwise_conv_reference
from .batch_norm import batch_norm, batch_norm_reference
from .. import _ext


def register_cpp_ops() -> None:
    """Load the C++ extension and register every C++ op with its fake impl and autograd (each
    op module does this on its first call; a program that only deserializes a
    ``torch.export``-ed model calls no op module first, see :mod:`bharnet.deploy`). The op
    modules are all imported above, so every registration has been made."""
    _ext.register_all()


__all__ = [
    "BACKENDS", "get_backend", "resolve", "use_backend", "bone", "bone_reference",
    "ctr_graph_conv", "ctr_graph_conv_reference",
    "deformable_temporal_conv", "deformable_temporal_conv_reference",
    "cross_attention", "cross_attention_reference",
    "temporal_max_pool", "temporal_max_pool_reference",
    "pointwise_conv", "pointwise_conv_reference", "batch_norm", "batch_norm_reference", "register_cpp_ops",
]
