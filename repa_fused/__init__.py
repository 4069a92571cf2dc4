"""repa_fused: fast, exact representation-alignment losses (REPA, U-REPA) for diffusion training."""

from .functional import available_backends, cosine_alignment_loss, manifold_loss, urepa_loss
from .config import load_config
from .regularizers import build_regularizer
from .encoders import load_encoder
from .cache import FeatureCache

__version__ = "0.1.0"

__all__ = ["available_backends", "cosine_alignment_loss", "manifold_loss", "urepa_loss", "__version__",
           "build_regularizer", "load_config", "load_encoder", "FeatureCache"]
