"""Errors raised by picaso-rag. Every message says what went wrong and how to fix it."""


class PicasoError(ValueError):
    """Base class: bad input or a state/model mismatch (a ValueError, so callers may catch either)."""


class CheckpointError(PicasoError):
    """A directory or hub id that is not a usable Mamba-2 checkpoint."""


class StateMismatchError(PicasoError):
    """A state that does not belong to the model it is used with, or states of different models mixed."""


class StoreNotWritableError(PicasoError):
    """The state store's directory cannot be written (read-only file system, no permission)."""
