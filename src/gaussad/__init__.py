"""gaussad: visual anomaly detection with Gaussians on pretrained deep features (Rippel et al., ICPR 2020)."""

__version__ = "0.1.0"

from .errors import DataError, GaussadError, ImageError, InvalidParameterError, ModelFormatError, NotFittedError  # noqa: E402
from .model import GaussianAD, load  # noqa: E402

__all__ = ["GaussianAD", "load", "GaussadError", "DataError", "ImageError", "ModelFormatError", "InvalidParameterError",
           "NotFittedError", "__version__"]
