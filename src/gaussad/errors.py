"""Exceptions the tool raises for bad input; the CLI prints them as one line and exits non-zero."""


class GaussadError(Exception):
    """Base class for every error caused by the user's input rather than by a bug."""


class ImageError(GaussadError):
    """An image that cannot be read or converted; the message names the file."""


class DataError(GaussadError):
    """A data folder or image collection that cannot be used (empty, wrong layout, too few images)."""


class ModelFormatError(GaussadError):
    """A model file that is not a gaussad model, is from another format version, or is damaged."""
