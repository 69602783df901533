"""Errors raised for user-facing problems (bad input, bad files), each naming the fix."""


class AtlasDGDError(Exception):
    """Base class of atlasdgd's user-facing errors."""


class InputError(AtlasDGDError, ValueError):
    """The data given to atlasdgd cannot be used as it is."""


class ModelFileError(AtlasDGDError, OSError):
    """A model directory is missing, incomplete or written by an incompatible version."""
