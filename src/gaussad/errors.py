"""Exceptions the tool raises for bad input; the CLI prints them as one line and exits non-zero."""


class GaussadError(Exception):
    """Base class for every error caused by the user's input rather than by a bug."""


class ImageError(GaussadError):
    """An image that cannot be read or converted; the message names the file."""


class UnknownImageFormatError(ImageError):
    """Bytes that are not an image of an accepted format."""


class ImageTooLargeError(ImageError):
    """An image with more pixels than the limit, refused from its header before decoding."""


class DataError(GaussadError, ValueError):
    """Data that cannot be used: a folder or image collection (empty, wrong layout, too few images), or arrays of the
    wrong shape or with NaN values (a ``ValueError``)."""


class ModelFormatError(GaussadError):
    """A model file that is not a gaussad model, is from another format version, or is damaged."""


class InvalidParameterError(GaussadError, ValueError):
    """A parameter value outside its allowed range (a ``ValueError``, as scikit-learn raises)."""


class NotFittedError(GaussadError, ValueError, AttributeError):
    """A model used before ``fit``; a ``ValueError`` and an ``AttributeError``, like scikit-learn's."""
