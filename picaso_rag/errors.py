"""Errors raised by picaso-rag. Every message says what went wrong and how to fix it."""


class PicasoError(ValueError):
    """Base class: bad input or a state/model mismatch (a ValueError, so callers may catch either)."""


class CheckpointError(PicasoError):
    """A directory or hub id that is not a usable Mamba-2 checkpoint."""


class StateMismatchError(PicasoError):
    """A state that does not belong to the model it is used with, or states of different models mixed."""


class StoreNotWritableError(PicasoError):
    """The state store's directory cannot be written (read-only file system, no permission)."""


class StateFileError(PicasoError):
    """A state file (bytes) that does not verify: framing, header types, sizes, checksum or MAC.

    :meth:`StateStore.get` turns it into a CORRUPT status; raised by the reusable decoding functions
    of :mod:`picaso_rag.store` (``decode_state_file``, ``read_state_header``) for other back ends."""


class DocumentTooLongError(PicasoError):
    """A document above the engine's ``max_document_tokens`` cap."""


class StoreUnavailableError(PicasoError):
    """A state store could not be reached (or refused the request): nothing was read or written."""
