"""bharnet: fast, verified body-hand skeleton action recognition (BHaRNet) for PyTorch."""
__version__ = "0.1.0"

from . import ops  # noqa: E402,F401
