"""Small eval-mode models with non-trivial BatchNorms, for the tests of inference fusion."""
import torch
from torch import nn

import bharnet
from bharnet.nn import CTRGraphConv, DeformableTemporalConv


@torch.no_grad()
def with_statistics(bn, generator=None):
    """``bn`` with random running statistics and affine parameters (at initialisation a BN is
    the identity, and any fold of it would pass); returns ``bn``."""
    c = bn.num_features
    bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
    bn.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
    bn.weight.copy_(torch.randn(c, generator=generator))
    bn.bias.copy_(torch.randn(c, generator=generator) * 0.3)
    return bn


def trained_like(name, dtype=torch.float64, **config):
    """A small model in eval mode whose BatchNorms have non-trivial statistics and affine
    parameters (at initialisation every BN is the identity and any fold would pass)."""
    torch.manual_seed(0)
    model = bharnet.create_model(name, 5, preset="small", **config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                with_statistics(module, g)
            elif isinstance(module, CTRGraphConv):
                module.alpha.fill_(0.3)  # exercise the refinement path, zero at init
            elif isinstance(module, DeformableTemporalConv):
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
    return model.to(dtype).eval()
