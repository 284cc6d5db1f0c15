"""Exceptions raised by the refinement library. The HTTP layer maps each to a status code."""


class RefinerError(Exception):
    """Base class of every error the library raises on purpose."""


class InvalidRequestError(RefinerError, ValueError):
    """The caller asked for something impossible (unknown method, negative weight, ...).

    The message says what is wrong and what to do instead.
    """


class ModelLoadError(RefinerError):
    """The model or tokenizer could not be loaded (missing file, no network for a hub id, ...)."""


class NumericalError(RefinerError):
    """A forward or backward pass produced NaN or inf; the request that caused it fails alone."""
