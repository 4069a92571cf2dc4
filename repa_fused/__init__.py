"""repa_fused: fast, exact representation-alignment losses (REPA, U-REPA) for diffusion training.

Layers, each importing only those beneath it: ``repa_fused.kernels`` (Triton) <- ``repa_fused.ops`` (the
losses) <- ``repa_fused.training`` (trainer integration) <- ``repa_fused.tools`` (CLI, check, bench).
"""

import sys

from ._version import __version__
from .ops import available_backends, cosine_alignment_loss, manifold_loss, urepa_loss
from .training import config
from .training.cache import FeatureCache
from .training.config import load_config
from .training.encoders import load_encoder
from .training.regularizers import build_regularizer

# `rf.config` is the config module (`rf.config.add_config_arguments(parser)`); `import repa_fused.config`
# reaches the same module, as it did before the package had layers.
sys.modules[f"{__name__}.config"] = config

__all__ = ["available_backends", "cosine_alignment_loss", "manifold_loss", "urepa_loss", "__version__",
           "build_regularizer", "config", "load_config", "load_encoder", "FeatureCache"]
