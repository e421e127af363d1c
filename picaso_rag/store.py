"""StateStore: document states on disk, one safetensors file per (node id, model fingerprint).

Usage::

    store = StateStore("./picaso_db/states")
    store.put("node-1", engine.encode(["some text"])[0], text="some text")
    found = store.get("node-1", engine.fingerprint, text="some text")
    if found.ok:
        state = found.state
    else:                     # missing, another model's, corrupt or stale: re-encode and put again
        print(found.status, found.detail)

Layout: ``<directory>/v1/<fingerprint[:16]>/<key[:2]>/<key>.safetensors`` with
``key = sha256(node id)[:32]`` (node ids may hold any character; file names may not).
Every file is plain safetensors (no pickle): the tensors ``ssm``, ``conv``, ``log_decay`` and
string metadata (format, node id, full fingerprint, token count, sha256 of the text the state was
encoded from, and a sha256 checksum over the tensor bytes and that metadata).

Writes are atomic (temporary file in the same directory, fsync, ``os.replace``, fsync of the
directory), so a reader sees the old file or the new one, never half of one. Writers of the
same node take a file lock (``filelock``, striped over 256 lock files), so a put never
interleaves with a delete of the same node in another thread or process. A file that does not
verify (truncated, bit flip, unparsable header, wrong shapes, NaN) is reported as ``corrupt``,
never loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterator, Sequence

import torch
from filelock import FileLock
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .errors import PicasoError, StateMismatchError, StoreNotWritableError
from .state import State

FORMAT = "picaso-state/1"
_LAYOUT = "v1"
_TENSORS = ("ssm", "conv", "log_decay")
_MAX_HEADER = 1 << 20  # a state's header is well under 1 KiB; more than 1 MiB means garbage


class StoreStatus(str, Enum):
    """What :meth:`StateStore.get` found. Every status but OK means: re-encode the node's text."""

    OK = "ok"
    MISSING = "missing"  # no record of this node for any model
    OTHER_MODEL = "other-model"  # records exist, but made by another model (fingerprint)
    CORRUPT = "corrupt"  # a file exists but does not verify (truncated, checksum, header, values)
    STALE = "stale"  # a valid state, but encoded from another text than the node's current one


@dataclass(frozen=True)
class StoredState:
    """The answer of :meth:`StateStore.get`: ``state`` is set only when ``status`` is OK."""

    status: StoreStatus
    state: State | None
    path: Path
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status is StoreStatus.OK


def text_sha256(text: str) -> str:
    """Hex sha256 of a text (UTF-8): how a state records the exact text it was encoded from."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class StateStore:
    """Document states on disk, keyed by node id and model fingerprint (see the module docstring).

    ``dtype``: cast ssm/conv to this dtype when writing (e.g. ``torch.bfloat16`` halves fp32 files);
    log_decay always stays fp32. ``lock_timeout``: seconds to wait for another writer of the same node.

    Usage: ``store = StateStore("./picaso_db/states"); store.put(node_id, state, text=text)``.
    """

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype | None = None, lock_timeout: float = 60.0):
        self.directory = Path(directory).expanduser()
        if self.directory.exists() and not self.directory.is_dir():
            raise PicasoError(f"{self.directory} exists and is not a directory; pass a directory for the state store.")
        if dtype is not None and not dtype.is_floating_point:
            raise PicasoError(f"storage dtype must be a floating-point dtype (e.g. torch.bfloat16), got {dtype}.")
        self.dtype = dtype
        self.lock_timeout = lock_timeout
        self._root = self.directory / _LAYOUT
        self._locks: dict[str, FileLock] = {}

    def __repr__(self) -> str:
        return f"StateStore({str(self.directory)!r})"

    # --------------------------------------------------------------------------------- paths
    @staticmethod
    def _key(node_id: str) -> str:
        if not isinstance(node_id, str) or not node_id:
            raise PicasoError(f"node id must be a non-empty string, got {node_id!r}.")
        return hashlib.sha256(node_id.encode("utf-8")).hexdigest()[:32]

    @staticmethod
    def _check_fingerprint(fingerprint: str) -> str:
        if not isinstance(fingerprint, str) or len(fingerprint) < 16 or not all(c in "0123456789abcdef" for c in fingerprint):
            raise PicasoError(f"fingerprint must be the hex string of engine.fingerprint, got {fingerprint!r}.")
        return fingerprint

    def path(self, node_id: str, fingerprint: str) -> Path:
        """Where the state of ``node_id`` under the model ``fingerprint`` lives (it may not exist)."""
        key = self._key(node_id)
        return self._root / self._check_fingerprint(fingerprint)[:16] / key[:2] / f"{key}.safetensors"

    def _model_dirs(self) -> list[Path]:
        return sorted(p for p in self._root.iterdir() if p.is_dir()) if self._root.is_dir() else []

    def _lock(self, node_id: str) -> FileLock:
        return self._stripe_lock(self._key(node_id)[:2])

    def _stripe_lock(self, stripe: str) -> FileLock:
        """The lock of every node whose key starts with ``stripe`` (also the name of their directory)."""
        lock = self._locks.get(stripe)
        if lock is None:
            lock_dir = self.directory / ".locks"
            lock_dir.mkdir(parents=True, exist_ok=True)
            lock = self._locks.setdefault(stripe, FileLock(str(lock_dir / f"{stripe}.lock"), timeout=self.lock_timeout))
        return lock

    # -------------------------------------------------------------------------------- writing
    def put(self, node_id: str, state: State, text: str | None = None) -> Path:
        """Write the state of ``node_id`` (replacing any previous one of the same model), atomically.

        ``text``: the exact text the state was encoded from; :meth:`get` can then tell a stale state
        (the node's text changed) from a valid one. Returns the file's path.
        """
        state.check_finite()  # never write a state that could not be read back
        path = self.path(node_id, state.fingerprint)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.tensors().items()}
        if self.dtype is not None:
            tensors["ssm"], tensors["conv"] = tensors["ssm"].to(self.dtype), tensors["conv"].to(self.dtype)
        metadata = {
            "format": FORMAT,
            "node_id": node_id,
            "fingerprint": state.fingerprint,
            "n_tokens": str(int(state.n_tokens)),
            "text_sha256": text_sha256(text) if text is not None else "",
            "created": f"{time.time():.3f}",
        }
        metadata["checksum"] = _checksum(tensors, metadata)
        payload = save_safetensors(tensors, metadata=metadata)
        with self._writable():
            with self._lock(node_id):
                path.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(path, payload)
        return path

    @contextmanager
    def _writable(self) -> Iterator[None]:
        """Turn "read-only" OS errors into an error that names the fix (reading still works)."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            raise StoreNotWritableError(
                f"the state store {self.directory} is not writable ({exc.strerror}: {exc.filename}); make it writable, "
                "or pass StateStore('<a writable directory>'). Stored states can still be read."
            ) from exc

    def delete(self, node_id: str, fingerprint: str | None = None) -> int:
        """Delete the state(s) of ``node_id``: of one model, or of every model (default).

        Returns how many files were removed (0 if there were none).
        """
        dirs = [self._root / self._check_fingerprint(fingerprint)[:16]] if fingerprint else self._model_dirs()
        key = self._key(node_id)
        removed = 0
        with self._writable(), self._lock(node_id):
            for model_dir in dirs:
                try:
                    (model_dir / key[:2] / f"{key}.safetensors").unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def delete_many(self, node_ids: list[str] | tuple[str, ...] | set[str], fingerprint: str | None = None) -> int:
        """:meth:`delete` for each node id; returns the number of files removed."""
        if isinstance(node_ids, str):
            raise PicasoError("delete_many takes a list of node ids; for one id call delete(node_id).")
        return sum(self.delete(node_id, fingerprint) for node_id in node_ids)

    # -------------------------------------------------------------------------------- reading
    def get(self, node_id: str, fingerprint: str, text: str | None = None) -> StoredState:
        """Load and verify the state of ``node_id`` made by the model ``fingerprint``.

        ``text``: the node's current text; a state encoded from another text is reported STALE.
        Never raises for a bad file: the status says what was found (see :class:`StoreStatus`).
        """
        path = self.path(node_id, fingerprint)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            key = self._key(node_id)
            others = [d.name for d in self._model_dirs() if d.name != fingerprint[:16] and (d / key[:2] / f"{key}.safetensors").is_file()]
            if others:
                return StoredState(StoreStatus.OTHER_MODEL, None, path, f"states of this node exist only for other models ({', '.join(others)})")
            return StoredState(StoreStatus.MISSING, None, path, "no state stored for this node")
        except OSError as exc:
            return StoredState(StoreStatus.CORRUPT, None, path, f"unreadable: {exc}")
        try:
            metadata, tensors = _parse(data)
        except _Invalid as exc:
            return StoredState(StoreStatus.CORRUPT, None, path, str(exc))
        if metadata.get("fingerprint") != fingerprint:
            return StoredState(StoreStatus.OTHER_MODEL, None, path, f"made by model {metadata.get('fingerprint', '?')[:12]}, not {fingerprint[:12]}")
        if metadata.get("node_id") != node_id:
            return StoredState(StoreStatus.CORRUPT, None, path, f"file holds node {metadata.get('node_id')!r}, not {node_id!r}")
        try:
            state = State(tensors["ssm"], tensors["conv"], tensors["log_decay"], int(metadata["n_tokens"]), fingerprint)
            state.check_finite()
        except (StateMismatchError, ValueError, KeyError) as exc:
            return StoredState(StoreStatus.CORRUPT, None, path, f"invalid state: {exc}")
        if text is not None and metadata.get("text_sha256") and metadata["text_sha256"] != text_sha256(text):
            return StoredState(StoreStatus.STALE, None, path, "encoded from another text than the node's current text")
        return StoredState(StoreStatus.OK, state, path)

    def get_many(self, node_ids: Sequence[str], fingerprint: str, texts: Sequence[str | None] | None = None,
                 max_workers: int = 8) -> list[StoredState]:
        """:meth:`get` for several nodes at once, in order, on a thread pool: reading, hashing and
        parsing release the GIL, and a large model's states are tens of MiB each.

        Usage: ``found = store.get_many(["n1", "n2"], engine.fingerprint)``.
        """
        texts = list(texts) if texts is not None else [None] * len(node_ids)
        if len(texts) != len(node_ids):
            raise PicasoError(f"{len(node_ids)} node ids but {len(texts)} texts; pass one text per node (or none).")
        if len(node_ids) <= 1:
            return [self.get(n, fingerprint, t) for n, t in zip(node_ids, texts)]
        with ThreadPoolExecutor(max_workers=min(max_workers, len(node_ids))) as pool:
            return list(pool.map(lambda pair: self.get(pair[0], fingerprint, pair[1]), zip(node_ids, texts)))

    def fingerprints(self) -> list[str]:
        """Short fingerprints (first 16 hex digits) of the models that have states here."""
        return [d.name for d in self._model_dirs()]

    def node_ids(self, fingerprint: str | None = None) -> Iterator[str]:
        """Node ids that have a state file (of one model, or any model; each id once per model dir).

        Reads only each file's header. Files whose header does not parse are skipped.
        """
        dirs = [self._root / self._check_fingerprint(fingerprint)[:16]] if fingerprint else self._model_dirs()
        for model_dir in dirs:
            for path in sorted(model_dir.glob("*/*.safetensors")):
                node_id = _read_header(path).get("node_id")
                if node_id:
                    yield node_id

    def remove_temp_files(self) -> int:
        """Remove the temporary files of writes that never finished (a process killed mid-write).

        Each directory is cleaned under its writers' lock, so a write in progress in another thread
        or process is never touched. Returns the number of files removed.
        """
        removed = 0
        for model_dir in self._model_dirs():
            for stripe_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                if not any(stripe_dir.glob(".*.tmp")):
                    continue
                with self._stripe_lock(stripe_dir.name):
                    for tmp in stripe_dir.glob(".*.tmp"):
                        tmp.unlink(missing_ok=True)
                        removed += 1
        return removed

    def prune(self, keep: set[str] | list[str]) -> int:
        """Delete the states of every node id not in ``keep`` (e.g. the ids still in the vector store).

        Returns the number of files removed.
        """
        keep = set(keep)
        stale = {node_id for node_id in self.node_ids() if node_id not in keep}
        return self.delete_many(stale)


# ------------------------------------------------------------------------------------ helpers
class _Invalid(Exception):
    pass


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over the metadata (without the checksum) and every tensor's dtype, shape and raw bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    for name in _TENSORS:
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself: no copy
    return h.hexdigest()


def _parse(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Validate a safetensors file's framing, header and checksum; return (metadata, tensors)."""
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":  # torch.save zip, or a raw pickle stream
        raise _Invalid("a pickle (torch.save) file, not a picaso state: refused unread (unpickling can run code)")
    if len(data) < 8:
        raise _Invalid(f"truncated: {len(data)} bytes")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > _MAX_HEADER or 8 + header_len > len(data):
        raise _Invalid(f"truncated or garbled header (header length {header_len}, file {len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Invalid(f"header is not valid JSON ({exc})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise _Invalid(f"not a picaso state file (no '{FORMAT}' format tag)")
    if set(header) - {"__metadata__"} != set(_TENSORS):
        raise _Invalid(f"expected tensors {_TENSORS}, found {sorted(set(header) - {'__metadata__'})}")
    data_len = max(int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__")
    if len(data) != 8 + header_len + data_len:
        raise _Invalid(f"truncated: {len(data)} bytes, the header describes {8 + header_len + data_len}")
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types
        raise _Invalid(f"tensors do not parse ({exc})") from None
    if _checksum(tensors, metadata) != metadata.get("checksum"):
        raise _Invalid("checksum mismatch: the file's bytes changed after it was written")
    return metadata, tensors


def _read_header(path: Path) -> dict[str, str]:
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > _MAX_HEADER:
                return {}
            header = json.loads(f.read(header_len))
        return header.get("__metadata__") or {}
    except (OSError, struct.error, ValueError, AttributeError):
        return {}


def _atomic_write(path: Path, payload: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it, rename over ``path``, fsync the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable; not possible on every platform (e.g. Windows)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
