"""StateStore: document states on local disk, one safetensors file per (node id, model fingerprint).

Usage::

    store = StateStore("./picaso_db/states")            # or StateStore(..., mac=True): keyed MAC
    store.put("node-1", engine.encode(["some text"])[0], text="some text")
    found = store.get("node-1", engine.fingerprint, text="some text", spec=engine.state_spec)
    if found.ok:
        state = found.state
    else:                     # missing, another model's, corrupt or stale: re-encode and put again
        print(found.status, found.detail)

The file format and the read that decides a status are :mod:`picaso_rag.state_file` (shared with
the S3 store); the interface every store implements is :class:`~picaso_rag.store_api.StateBackend`.
This module is the local back end: layout ``<directory>/v1/<fingerprint[:16]>/<key[:2]>/<key>.safetensors``
with ``key = sha256(node id)[:32]``. Its names (``encode_state_file``, ``StoreStatus``...) are
re-exported here, so ``from picaso_rag.store import ...`` keeps working.

Writes are atomic (temporary file in the same directory, fsync, ``os.replace``, fsync of the
directory), so a reader sees the old file or the new one, never half of one. Writers of the
same node take a file lock (``flock``, striped over 256 lock files in ``.locks``, each opened
without following links on every acquisition), so a put never interleaves with a delete of the same
node in another thread or process.

Reading is bounded and never follows links below the store's directory: each directory under it
is opened relative to its parent with ``O_NOFOLLOW`` (a symlinked stripe or model directory is
refused), a state file is opened ``O_NOFOLLOW | O_NONBLOCK`` and must be a regular file (fstat),
then read by :func:`~picaso_rag.state_file.read_stored_state`: at most :data:`MAX_HEADER_BYTES` of
header, and tensor bytes only after the header described exactly the file's size, shapes
consistent with each other and with its token count, and, when the reader passes the model's
:class:`~picaso_rag.state.StateSpec` (``engine.state_spec``), this model's state shapes (a hybrid's:
its fixed SSM shapes, its keys' and values' layers, heads and head size, at most its longest
document's tokens; the bound on a file's size follows). Nothing process-wide: what a read validates
against is what its caller passes. A put given the spec refuses, before writing anything, a state
that a reader with it would refuse. A file that does not verify (truncated, bit flip, garbled or
wrongly typed header, wrong shapes, NaN, missing or wrong MAC) is reported as ``corrupt``, never
loaded, and never raises. See docs/guarantees.md (threat model, and the memory a read costs).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import PicasoError, StateFileError, StoreNotWritableError
from .precision import check_precision
from .state import State, StateSpec
from .state_file import (  # noqa: F401 - re-exported: picaso_rag.store is where they were, and stay importable
    DEFAULT_MAX_STATE_BYTES,
    DELETED,
    FORMAT,
    HEADER_ONLY_BOUND,
    LAYOUT,
    MAX_HEADER_BYTES,
    MAX_INLINE_NODE_ID_BYTES,
    STATE_FILE,
    StateHeader,
    _checksum,
    _FdReader,
    _O_CREATE,
    _O_READ,
    _short_repr,
    check_fingerprint,
    check_header_shapes,
    check_header_shapes_of,
    check_storable,
    check_text_arg,
    checked_against_text,
    decode_state_file,
    encode_state_file,
    load_mac_key,
    node_id_sha256,
    parse_state_header,
    read_bound,
    read_state_header,
    read_state_tensors,
    read_stored_state,
    state_from_file,
    state_header_length,
    state_key,
    state_name,
    stored_entry,
    text_sha256,
    tombstone_name,
)
from .store_api import StateBackend, StoreEntry, StoredState, StoreStatus  # noqa: F401 - re-exported

logger = logging.getLogger("picaso_rag.store")

_LAYOUT, _DELETED, _STATE_FILE = LAYOUT, DELETED, STATE_FILE
_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW, _O_CLOEXEC = getattr(os, "O_NOFOLLOW", 0), getattr(os, "O_CLOEXEC", 0)


class _UnsafePath(Exception):
    """A directory below the store's root that is a symlink (or not a directory)."""

    def __init__(self, path: Path):
        super().__init__(f"{path} is a symlink or not a directory; picaso-rag never reads or writes through links "
                         f"below the store's directory: remove it (rm '{path}')")
        self.path = path


class _StripeLock:
    """An exclusive lock (``flock``) on ``<store>/.locks/<stripe>.lock``, shared by threads and
    processes. Every acquisition opens ``.locks`` relative to the store's directory with
    ``O_NOFOLLOW | O_DIRECTORY`` and the lock file relative to that descriptor with ``O_NOFOLLOW``:
    one path resolution, no window between a check and the open, on every operation (a ``.locks``
    or lock file replaced by a symlink after the store was opened is refused). Not reentrant."""

    def __init__(self, store: "StateStore", stripe: str):
        self.store, self.stripe, self._fd = store, stripe, -1

    def __enter__(self) -> None:
        dir_fd = self.store._open_dir(".locks", create=True)  # _UnsafePath for a symlink or a non-directory
        name = f"{self.stripe}.lock"
        try:
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    raise _UnsafePath(self.store.directory / ".locks" / name) from None
                raise
        finally:
            os.close(dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _UnsafePath(self.store.directory / ".locks" / name)
            deadline = time.monotonic() + self.store.lock_timeout
            pause = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"another writer held the lock {self.store.directory / '.locks' / name} for "
                                           f"{self.store.lock_timeout} s (StateStore(lock_timeout=...)); try again") from None
                    time.sleep(pause)
                    pause = min(2 * pause, 0.05)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def __exit__(self, *exc: object) -> None:
        fd, self._fd = self._fd, -1
        os.close(fd)  # closing the descriptor releases the lock


class StateStore:
    """Document states on disk, keyed by node id and model fingerprint (see the module docstring).

    ``precision``: how states are written, "fp32", "bf16" (half of fp32) or "fp8" (e4m3 with a
    per-head scale, a quarter; see picaso_rag.precision and docs/scaling.md); log_decay always stays
    fp32; default None: the state's own dtype (exact round trips). ``dtype``: the older spelling
    (``torch.bfloat16`` is ``precision="bf16"``, ``torch.float32`` is ``"fp32"``). ``lock_timeout``: seconds to wait for another writer of the same node.
    ``mac``: False (checksum only: fine for a store that only you can write, or shared read-only),
    True (HMAC-SHA256 with a secret in ``<directory>.mac-key``, created 0600 on first use) or the
    path of a key file; with a key, a file not written with it is CORRUPT. ``max_state_bytes``:
    most tensor bytes a read given no spec accepts (a read given ``spec=engine.state_spec`` is
    bounded by the model's largest state instead, see :class:`~picaso_rag.state.StateSpec`; a
    hybrid's grows with its ``max_document_tokens``).

    Memory of a read: the file's tensor bytes and the state it returns are each at most that bound
    (checked before a tensor byte is read); a read allocates the file's tensor bytes once, the
    returned state when it is another buffer (fp8 files, read back in fp32) and about 32 MiB of
    working pieces: at most 2 x the bound + 32 MiB, about one state in practice (docs/guarantees.md).
    :meth:`get_many` runs up to ``max_workers`` reads at once.

    Usage: ``store = StateStore("./picaso_db/states", mac=True); store.put(node_id, state, text=text)``.
    """

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype | None = None, lock_timeout: float = 60.0,
                 mac: bool | str | os.PathLike = False, max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
                 precision: str | None = None):
        self.directory = Path(directory).expanduser()
        if self.directory.exists() and not self.directory.is_dir():
            raise PicasoError(f"{self.directory} exists and is not a directory; pass a directory for the state store.")
        if dtype is not None:  # the older spelling of precision: one way to say it from here on
            if precision is not None:
                raise PicasoError("give StateStore a precision ('fp32', 'bf16', 'fp8') or a dtype, not both.")
            precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype)  # type: ignore[call-overload]
            if precision is None:
                raise PicasoError(f"storage dtype {dtype} is not a state precision; pass precision='bf16' (torch.bfloat16), "
                                  "'fp8' or 'fp32' (torch.float32).")
        if type(max_state_bytes) is not int or max_state_bytes < 1:
            raise PicasoError(f"max_state_bytes must be a positive int, got {max_state_bytes!r}.")
        self.precision = check_precision(precision) if precision is not None else None
        self.lock_timeout = lock_timeout
        self.max_state_bytes = max_state_bytes
        self._root = self.directory / _LAYOUT
        self.mac_key_path: Path | None = None
        self._mac_key: bytes | None = None
        if mac is True:
            self.mac_key_path = self.directory.with_name(self.directory.name + ".mac-key")
        elif mac is not False and mac is not None:
            if not isinstance(mac, (str, os.PathLike)):
                raise PicasoError(f"mac must be True, False or the path of a key file, got {mac!r}.")
            self.mac_key_path = Path(mac).expanduser()
        if self.mac_key_path is not None:
            try:
                self._mac_key = load_mac_key(self.mac_key_path)
            except OSError as exc:
                raise StoreNotWritableError(f"cannot create the MAC key {self.mac_key_path} ({exc.strerror}); create it "
                                            "where you can write, or pass mac='<path of an existing key file>'.") from exc

    def __repr__(self) -> str:
        return f"StateStore({str(self.directory)!r}{', mac=True' if self._mac_key else ''})"

    @property
    def mac(self) -> bool:
        """Whether files are written with, and must carry, this store's HMAC."""
        return self._mac_key is not None

    # --------------------------------------------------------------------------------- paths
    @staticmethod
    def _key(node_id: str) -> str:
        return state_key(node_id)

    _check_fingerprint = staticmethod(check_fingerprint)

    def path(self, node_id: str, fingerprint: str) -> Path:
        """Where the state of ``node_id`` under the model ``fingerprint`` lives (it may not exist)."""
        return self.directory / state_name(node_id, fingerprint)

    def _open_dir(self, *parts: str, create: bool = False) -> int:
        """A descriptor of ``<directory>/<parts...>``, each part opened relative to its parent without
        following links: raises FileNotFoundError, or _UnsafePath for a symlink or a non-directory.
        The store's own directory may be a link (the operator's choice); nothing below it may."""
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        done = self.directory
        try:
            for part in parts:
                done = done / part
                try:
                    child = self._open_child_dir(part, fd, done)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                    child = self._open_child_dir(part, fd, done)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _open_child_dir(part: str, fd: int, done: Path) -> int:
        try:
            return os.open(part, _O_DIR, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                raise _UnsafePath(done) from None
            raise

    def _real_subdirs(self, fd: int) -> list[str]:
        """Names of the real directories (not symlinks) in the directory ``fd``."""
        with os.scandir(fd) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))

    def _model_names(self) -> list[str]:
        try:
            fd = self._open_dir(_LAYOUT)
        except (FileNotFoundError, _UnsafePath):
            return []
        try:
            return [name for name in self._real_subdirs(fd) if re.fullmatch(r"[0-9a-f]{16}", name)]
        finally:
            os.close(fd)

    def _lock(self, node_id: str) -> "_StripeLock":
        return self._stripe_lock(self._key(node_id)[:2])

    def _stripe_lock(self, stripe: str) -> "_StripeLock":
        """The lock of every node whose key starts with ``stripe`` (also the name of their directory).
        Each acquisition opens ``.locks`` and the lock file anew, without following links: a
        ``.locks`` replaced by a symlink at any time is refused (:class:`_UnsafePath`)."""
        return _StripeLock(self, stripe)

    # -------------------------------------------------------------------------------- writing
    def put(self, node_id: str, state: State, text: str | None = None, write_back: bool = False,
            spec: StateSpec | None = None) -> Path | None:
        """Write the state of ``node_id`` (replacing any previous one of the same model), atomically.

        ``text``: the exact text the state was encoded from; :meth:`get` can then tell a stale state
        (the node's text changed) from a valid one. A state put without its text is reported STALE
        to every ``get`` that passes a text (it cannot be checked). Returns the file's path.
        ``write_back``: a query storing a state it had to encode; a node deleted (:meth:`delete` of
        every model) since is not written (returns None): deletion wins over a racing query. A put
        without it (ingestion) writes, and brings a deleted node back. ``spec``: the model's state
        shapes (``engine.state_spec``): a state its readers would refuse is refused, nothing written.
        Raises :class:`StoreNotWritableError` (nothing written) on a read-only store, a full disk, or a
        symlinked directory below the store's directory.
        """
        path = self.path(node_id, state.fingerprint)
        payload = encode_state_file(state, node_id, text=text, mac_key=self._mac_key, precision=self.precision)
        check_storable(state, payload, spec, self.max_state_bytes)
        key = self._key(node_id)
        with self._writable():
            with self._lock(node_id):  # delete takes the same lock: a tombstone is checked and written atomically
                if write_back and self._is_deleted(key):
                    return None
                if not write_back:
                    self._unlink(_DELETED, key[:2], key)
                stripe_fd = self._open_dir(_LAYOUT, state.fingerprint[:16], key[:2], create=True)
                try:
                    _atomic_write(stripe_fd, path.name, payload)
                finally:
                    os.close(stripe_fd)
        return path

    @contextmanager
    def _writable(self) -> Iterator[None]:
        """Turn "read-only", "disk full" and "unsafe link" errors into an error that names the fix
        (reading still works; callers that only need the answer can go on without the file)."""
        try:
            yield
        except _UnsafePath as exc:
            raise StoreNotWritableError(f"the state store {self.directory} is not safe to write: {exc}. "
                                        "Stored states can still be read.") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StoreNotWritableError(
                    f"the disk of the state store {self.directory} is full ({exc.strerror}); free space, or pass "
                    "StateStore('<a directory with free space>'). Nothing was written; stored states can still be read."
                ) from exc
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            raise StoreNotWritableError(
                f"the state store {self.directory} is not writable ({exc.strerror}: {exc.filename}); make it writable, "
                "or pass StateStore('<a writable directory>'). Stored states can still be read."
            ) from exc

    def delete(self, node_id: str, fingerprint: str | None = None, node_deleted: bool = False) -> int:
        """Delete the state(s) of ``node_id``: of one model, or of every model (default).

        ``node_deleted``: the node itself left the index (what the integration's deletions say): a
        tombstone then stops a query that retrieved it just before from writing its state back
        (``put(write_back=True)``); ingesting the node again (a plain put) lifts it. Returns how
        many files were removed (0 if there were none).
        """
        models = [self._check_fingerprint(fingerprint)[:16]] if fingerprint else self._model_names()
        key = self._key(node_id)
        removed = 0
        with self._writable(), self._lock(node_id):
            if node_deleted:  # the node is gone: a query's write-back must not bring it back
                self._mark_deleted(key)
            for model in models:
                removed += self._unlink(model, key[:2], f"{key}.safetensors")
        return removed

    def _mark_deleted(self, key: str) -> None:
        fd = self._open_dir(_LAYOUT, _DELETED, key[:2], create=True)
        try:
            os.close(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600, dir_fd=fd))
        finally:
            os.close(fd)

    def _is_deleted(self, key: str) -> bool:
        try:
            fd = self._open_dir(_LAYOUT, _DELETED, key[:2])
        except FileNotFoundError:
            return False
        try:
            os.stat(key, dir_fd=fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    def _unlink(self, model: str, stripe: str, name: str) -> int:
        """Remove one directory entry (never following links); 1 if removed, 0 if absent."""
        try:
            fd = self._open_dir(_LAYOUT, model, stripe)
        except FileNotFoundError:
            return 0
        try:
            os.unlink(name, dir_fd=fd)
            return 1
        except FileNotFoundError:
            return 0
        except IsADirectoryError:
            logger.warning("%s is a directory where a state file belongs; not removed", self._root / model / stripe / name)
            return 0
        finally:
            os.close(fd)

    def delete_many(self, node_ids: list[str] | tuple[str, ...] | set[str], fingerprint: str | None = None,
                    node_deleted: bool = False) -> int:
        """:meth:`delete` for each node id; returns the number of files removed."""
        if isinstance(node_ids, str):
            raise PicasoError("delete_many takes a list of node ids; for one id call delete(node_id).")
        return sum(self.delete(node_id, fingerprint, node_deleted) for node_id in node_ids)

    # -------------------------------------------------------------------------------- reading
    def get(self, node_id: str, fingerprint: str, text: str | None = None, spec: StateSpec | None = None) -> StoredState:
        """Load and verify the state of ``node_id`` made by the model ``fingerprint``.

        ``text``: the node's current text; a state encoded from another text, or put without its
        text, is reported STALE. ``spec``: the model's state shapes (``engine.state_spec``): a file
        of other shapes, or (a hybrid) of a longer document than it allows, is CORRUPT, unread.
        Without it, every check that needs no model is made (format, sizes against the header and
        ``max_state_bytes``, the header's shapes against each other and against its token count,
        checksum, MAC, values), but not the model's own shapes. Never raises for a bad file, whatever its
        bytes, type or size: the status says what was found (see :class:`StoreStatus`).
        """
        path = self.path(node_id, fingerprint)
        key = self._key(node_id)
        check_text_arg(text)
        try:
            fd = self._open_state_file(fingerprint[:16], key[:2], path.name)
        except FileNotFoundError:
            others = [m for m in self._model_names() if m != fingerprint[:16] and self._exists(m, key)]
            if others:
                return StoredState(StoreStatus.OTHER_MODEL, None, path, f"states of this node exist only for other models ({', '.join(others)})")
            return StoredState(StoreStatus.MISSING, None, path, "no state stored for this node")
        except (_UnsafePath, StateFileError) as exc:
            return StoredState(StoreStatus.CORRUPT, None, path, str(exc))
        except OSError as exc:
            return StoredState(StoreStatus.CORRUPT, None, path, f"unreadable: {exc}")
        try:
            return read_stored_state(_FdReader(fd), os.fstat(fd).st_size, node_id, fingerprint, path, text, spec,
                                     self._mac_key, self.max_state_bytes)
        except OSError as exc:
            return StoredState(StoreStatus.CORRUPT, None, path, f"unreadable: {exc}")
        finally:
            os.close(fd)

    def _open_state_file(self, model: str, stripe: str, name: str) -> int:
        """A descriptor of a regular state file, opened without following links or blocking."""
        dir_fd = self._open_dir(_LAYOUT, model, stripe)
        try:
            try:
                fd = os.open(name, _O_READ, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise StateFileError("a symlink, not a state file: refused unread (links are never followed)") from None
                raise
        finally:
            os.close(dir_fd)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                        else "a directory" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
                raise StateFileError(f"{kind}, not a regular file: refused unread")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _exists(self, model: str, key: str) -> bool:
        try:
            fd = self._open_dir(_LAYOUT, model, key[:2])
        except (OSError, _UnsafePath):
            return False
        try:
            os.stat(f"{key}.safetensors", dir_fd=fd, follow_symlinks=False)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def get_many(self, node_ids: Sequence[str], fingerprint: str, texts: Sequence[str | None] | None = None,
                 max_workers: int = 8, spec: StateSpec | None = None) -> list[StoredState]:
        """:meth:`get` for several nodes at once, in order, on a thread pool: reading, hashing and
        parsing release the GIL, and a large model's states are tens of MiB each.

        Usage: ``found = store.get_many(["n1", "n2"], engine.fingerprint, spec=engine.state_spec)``.
        """
        texts = list(texts) if texts is not None else [None] * len(node_ids)
        if len(texts) != len(node_ids):
            raise PicasoError(f"{len(node_ids)} node ids but {len(texts)} texts; pass one text per node (or none).")
        if len(node_ids) <= 1:
            return [self.get(n, fingerprint, t, spec) for n, t in zip(node_ids, texts)]
        with ThreadPoolExecutor(max_workers=min(max_workers, len(node_ids))) as pool:
            return list(pool.map(lambda pair: self.get(pair[0], fingerprint, pair[1], spec), zip(node_ids, texts)))

    def fingerprints(self) -> list[str]:
        """Short fingerprints (first 16 hex digits) of the models that have states here."""
        return self._model_names()

    def entries(self, fingerprint: str | None = None, spec: StateSpec | None = None) -> Iterator[StoreEntry]:
        """Every state file (of one model, or of all), with the status of its header; never raises
        for a bad file (symlinks, FIFOs, devices, garbage are CORRUPT entries, never opened through).
        ``spec``: the shapes of the model ``fingerprint`` (``engine.state_spec``): a header of other
        shapes is CORRUPT too."""
        if spec is not None and not fingerprint:
            raise PicasoError("entries(spec=...) checks one model's files: pass its fingerprint too.")
        models = [self._check_fingerprint(fingerprint)[:16]] if fingerprint else self._model_names()
        for model, stripe in self._stripes(models):
            try:
                stripe_fd = self._open_dir(_LAYOUT, model, stripe)
            except (FileNotFoundError, _UnsafePath):
                continue
            try:
                with os.scandir(stripe_fd) as found:
                    names = sorted(e.name for e in found if _STATE_FILE.fullmatch(e.name))
            finally:
                os.close(stripe_fd)
            for name in names:
                yield self._entry(model, stripe, name, spec)

    def _stripes(self, models: list[str]) -> Iterator[tuple[str, str]]:
        """(model, stripe) of every real stripe directory of ``models`` (links and files skipped)."""
        for model in models:
            try:
                model_fd = self._open_dir(_LAYOUT, model)
            except (FileNotFoundError, _UnsafePath):
                continue
            try:
                stripes = self._real_subdirs(model_fd)
            finally:
                os.close(model_fd)
            for stripe in stripes:
                yield model, stripe

    def _entry(self, model: str, stripe: str, name: str, spec: StateSpec | None = None) -> StoreEntry:
        path = self._root / model / stripe / name
        try:
            fd = self._open_state_file(model, stripe, name)
        except (StateFileError, _UnsafePath) as exc:
            return StoreEntry(path, model, StoreStatus.CORRUPT, detail=str(exc))
        except OSError as exc:
            return StoreEntry(path, model, StoreStatus.CORRUPT, detail=f"unreadable: {exc}")
        try:
            return stored_entry(_FdReader(fd), os.fstat(fd).st_size, model, name, path, spec, self.max_state_bytes)
        except OSError as exc:
            return StoreEntry(path, model, StoreStatus.CORRUPT, detail=f"unreadable: {exc}")
        finally:
            os.close(fd)

    def node_ids(self, fingerprint: str | None = None) -> Iterator[str]:
        """Node ids that have a state file (of one model, or any model; each id once per model dir).

        Reads only each file's header. Corrupt files, and ids longer than
        :data:`MAX_INLINE_NODE_ID_BYTES` (recorded by their sha256), are not listed: see :meth:`entries`.
        """
        for entry in self.entries(fingerprint):
            if entry.status is StoreStatus.OK and entry.node_id:
                yield entry.node_id

    def remove_temp_files(self) -> int:
        """Remove the temporary files of writes that never finished (a process killed mid-write).

        Each directory is cleaned under its writers' lock, so a write in progress in another thread
        or process is never touched. Returns the number of files removed.
        """
        removed = 0
        for model, stripe in self._stripes(self._model_names()):
            if not re.fullmatch(r"[0-9a-f]{2}", stripe):
                continue
            with self._writable(), self._stripe_lock(stripe):
                try:
                    fd = self._open_dir(_LAYOUT, model, stripe)
                except (FileNotFoundError, _UnsafePath):
                    continue
                try:
                    with os.scandir(fd) as found:
                        temps = [e.name for e in found if e.name.startswith(".") and e.name.endswith(".tmp")]
                    for name in temps:
                        try:
                            os.unlink(name, dir_fd=fd)
                            removed += 1
                        except (FileNotFoundError, IsADirectoryError):
                            pass
                finally:
                    os.close(fd)
        return removed

    def prune(self, keep: set[str] | list[str]) -> int:
        """Delete every state file that is not a valid state of a node id in ``keep`` (e.g. the ids
        still in the vector store): states of other nodes, of any length of id, and files whose
        header does not verify (garbage, links, special files: the entry is removed, never followed).

        Returns the number of files removed.
        """
        keep_hashes = {node_id_sha256(self._checked_id(n)) for n in keep}
        removed = 0
        for entry in list(self.entries()):
            if entry.status is StoreStatus.OK and entry.node_id_sha256 in keep_hashes:
                continue
            stripe, name = entry.path.parent.name, entry.path.name
            with self._writable(), self._stripe_lock(stripe):
                again = self._entry(entry.model, stripe, name)  # a writer may have replaced it meanwhile
                if again.status is StoreStatus.OK and again.node_id_sha256 in keep_hashes:
                    continue
                removed += self._unlink(entry.model, stripe, name)
        return removed

    @staticmethod
    def _checked_id(node_id: str) -> str:
        state_key(node_id)
        return node_id


def _atomic_write(dir_fd: int, name: str, payload: bytes) -> None:
    """Write ``payload`` to a temporary file in the directory ``dir_fd``, fsync it, rename it over
    ``name``, fsync the directory. On any failure (a full disk...) the temporary file is removed."""
    tmp = f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, _O_CREATE, 0o600, dir_fd=dir_fd)
    try:
        try:
            view, written = memoryview(payload), 0
            while written < len(view):
                written += os.write(fd, view[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable; not possible on every platform
        os.fsync(dir_fd)
    except OSError:
        pass
