"""gaussad: visual anomaly detection with Gaussians on pretrained deep features (Rippel et al., ICPR 2020)."""

from .version import __version__  # noqa: F401
from .errors import DataError, GaussadError, ImageError, InvalidParameterError, ModelFormatError, NotFittedError  # noqa: E402
from .moved import install as _install_moved_paths  # noqa: E402

_install_moved_paths()

__all__ = ["GaussianAD", "load", "GaussadError", "DataError", "ImageError", "ModelFormatError", "InvalidParameterError",
           "NotFittedError", "__version__"]


def __getattr__(name: str):
    """``GaussianAD`` and ``load`` are imported on first use (numpy, scipy), so that ``gaussad --help`` and the
    other command-line start-ups need not wait for them."""
    if name in ("GaussianAD", "load"):
        from .detector import model

        globals()[name] = value = getattr(model, name)
        return value
    raise AttributeError(f"module 'gaussad' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
