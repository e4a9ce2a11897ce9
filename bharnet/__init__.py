"""bharnet: fast, verified body-hand skeleton action recognition (BHaRNet) for PyTorch."""
__version__ = "0.1.0"

from . import ops  # noqa: E402,F401
from .models import MODELS, ModelOutput, create_model  # noqa: E402

__all__ = ["MODELS", "ModelOutput", "create_model", "ops", "__version__"]
