"""gaussad: visual anomaly detection with Gaussians on pretrained deep features (Rippel et al., ICPR 2020)."""

__version__ = "0.1.0"

from .errors import DataError, GaussadError, ImageError, ModelFormatError  # noqa: E402
from .model import GaussianAD  # noqa: E402
from .persistence import load  # noqa: E402

__all__ = ["GaussianAD", "load", "GaussadError", "DataError", "ImageError", "ModelFormatError", "__version__"]
