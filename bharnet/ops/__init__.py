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
from .batch_norm import _register_cpp_ops as _register_batch_norm
from .bone import _register_cpp_op as _register_bone
from .cross_attention import _register_cpp_ops as _register_cross_attention
from .ctr_graph_conv import _register_cpp_ops as _register_ctr_graph_conv
from .deformable_temporal_conv import _register_cpp_ops as _register_deformable_temporal_conv
from .pointwise_conv import _register_cpp_ops as _register_pointwise_conv
from .temporal_max_pool import _register_cpp_ops as _register_temporal_max_pool


def register_cpp_ops() -> None:
    """Load the C++ extension and register every C++ op with its fake impl and autograd (each
    op module does this on its first call; a program that only deserializes a
    ``torch.export``-ed model calls no op module first, see :mod:`bharnet.deploy`)."""
    for register in (_register_batch_norm, _register_bone, _register_cross_attention, _register_ctr_graph_conv,
                     _register_deformable_temporal_conv, _register_pointwise_conv, _register_temporal_max_pool):
        register()

__all__ = [
    "BACKENDS", "get_backend", "resolve", "use_backend", "bone", "bone_reference",
    "ctr_graph_conv", "ctr_graph_conv_reference",
    "deformable_temporal_conv", "deformable_temporal_conv_reference",
    "cross_attention", "cross_attention_reference",
    "temporal_max_pool", "temporal_max_pool_reference",
    "pointwise_conv", "pointwise_conv_reference", "batch_norm", "batch_norm_reference", "register_cpp_ops",
]
