"""The state store interface: what every back end of document states offers, in one place.

A back end keeps one state per (node id, model fingerprint) and answers every read with a status.
Three implement it: :class:`~picaso_rag.store.StateStore` (local files),
:class:`~picaso_rag.s3store.S3StateStore` (any S3-compatible object store) and the cache tier
:class:`~picaso_rag.cache.BudgetedStore` (a byte budget over either). The file format they share,
and the read that decides a status, live in :mod:`picaso_rag.state_file`.

Usage::

    def warm(store: StateBackend, engine, node_ids, texts):
        found = store.get_many(node_ids, engine.fingerprint, texts, spec=engine.state_spec)
        return [f.state for f in found if f.ok]

Every method is safe to call from several threads. A back end that cannot be reached raises
:class:`~picaso_rag.errors.StoreUnavailableError`; one that cannot be written raises
:class:`~picaso_rag.errors.StoreNotWritableError`; a bad stored state is never an exception, but a
status (:class:`StoreStatus`): a caller re-encodes the node's text for every status but OK.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import PurePath
from typing import Iterable, Iterator, Protocol, Sequence, runtime_checkable

from .state import State, StateSpec


class StoreStatus(str, Enum):
    """What a store's ``get`` found. Every status but OK means: re-encode the node's text."""

    OK = "ok"
    MISSING = "missing"  # no record of this node for any model
    OTHER_MODEL = "other-model"  # records exist, but made by another model (fingerprint)
    CORRUPT = "corrupt"  # a file exists but does not verify (truncated, checksum, MAC, header, values)
    STALE = "stale"  # a valid state, but encoded from another text than the node's current one (or from an unknown text)


@dataclass(frozen=True)
class StoredState:
    """The answer of a store's ``get``: ``state`` is set only when ``status`` is OK."""

    status: StoreStatus
    state: State | None
    path: PurePath  # a local file's Path; /<bucket>/<object name> for an object store
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status is StoreStatus.OK


@dataclass(frozen=True)
class StoreEntry:
    """One file (object) of a store, as listed by its ``entries`` (headers only are read).

    ``status`` is OK when the header verifies (the tensors are checked by ``get``),
    CORRUPT otherwise (``detail`` says why). ``node_id`` is None for ids longer than
    :data:`~picaso_rag.state_file.MAX_INLINE_NODE_ID_BYTES` (their sha256 is in ``node_id_sha256``) and for corrupt files.
    """

    path: PurePath
    model: str  # the model directory (first 16 hex digits of the fingerprint)
    status: StoreStatus
    node_id: str | None = None
    node_id_sha256: str | None = None
    detail: str = ""


@runtime_checkable
class StateBackend(Protocol):
    """A store of document states (local files, an object store, a budgeted tier over either).

    ``spec``: the model's :class:`~picaso_rag.state.StateSpec` (``engine.state_spec``), what a read
    validates against (a file of other shapes is CORRUPT, unread) and what a put refuses to write
    against; without it every check that needs no model is still made. Nothing process-wide is
    consulted: what a store validates against is what its caller passes.
    """

    @property
    def mac(self) -> bool:
        """Whether states are written with, and must carry, this store's HMAC."""
        ...

    def get(self, node_id: str, fingerprint: str, text: str | None = None, spec: StateSpec | None = None) -> StoredState:
        """The state of ``node_id`` made by the model ``fingerprint``, with its status (never raises
        for a bad stored state); ``text``: the node's current text (another one: STALE)."""
        ...

    def get_many(self, node_ids: Sequence[str], fingerprint: str, texts: Sequence[str | None] | None = None,
                 spec: StateSpec | None = None) -> list[StoredState]:
        """:meth:`get` for several nodes, in order."""
        ...

    def put(self, node_id: str, state: State, text: str | None = None, write_back: bool = False,
            spec: StateSpec | None = None) -> object:
        """Store ``state`` (replacing the node's state of the same model); ``write_back``: a query's
        copy of a state it encoded, not written for a node deleted since (returns None)."""
        ...

    def delete(self, node_id: str, fingerprint: str | None = None, node_deleted: bool = False) -> int:
        """Delete the node's state (of one model, or of every model); ``node_deleted``: the node left
        the index (a racing write-back then writes nothing). Returns how many existed."""
        ...

    def delete_many(self, node_ids: Sequence[str], fingerprint: str | None = None, node_deleted: bool = False) -> int:
        """:meth:`delete` for each node id."""
        ...

    def fingerprints(self) -> list[str]:
        """Short fingerprints (16 hex digits) of the models that have states here."""
        ...

    def entries(self, fingerprint: str | None = None, spec: StateSpec | None = None) -> Iterator[StoreEntry]:
        """Every stored state (of one model, or of all) with the status of its header."""
        ...

    def node_ids(self, fingerprint: str | None = None) -> Iterator[str]:
        """Node ids (inline ones) with a valid state header."""
        ...

    def prune(self, keep: Iterable[str]) -> int:
        """Remove everything that is not a valid state of a node id in ``keep`` (garbage included)."""
        ...

    def remove_temp_files(self) -> int:
        """Remove what writes that never finished left behind."""
        ...


__all__ = ["StateBackend", "StoreEntry", "StoreStatus", "StoredState"]
