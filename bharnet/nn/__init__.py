"""Reference layers in pure PyTorch (with the fused ops selectable through ``impl``)."""
from .attention import CrossAttention, TokenCrossAttention, masked_softmax_attention
from .block import GCNBlock, make_blocks
from .conv import PointwiseConv2d
from .graph_conv import CTRGraphConv, STGraphConv
from .norm import BatchNorm2d
from .pooling import PoolingAttention, global_pool
from .temporal import ConvBN, DeformableTemporalConv, MultiScaleTemporalConv, TemporalMaxPool

__all__ = [
    "BatchNorm2d", "ConvBN", "CrossAttention", "TokenCrossAttention", "masked_softmax_attention", "GCNBlock",
    "make_blocks", "CTRGraphConv", "STGraphConv", "PoolingAttention", "global_pool", "DeformableTemporalConv",
    "MultiScaleTemporalConv", "PointwiseConv2d", "TemporalMaxPool",
]
