"""S3StateStore: the state store on any S3-compatible object store (AWS S3, SeaweedFS, MinIO, Ceph...).

Usage::

    from picaso_rag.s3store import S3StateStore
    store = S3StateStore("picaso-states", endpoint_url="http://127.0.0.1:8333", mac_key="./states.mac-key")
    store.put("node-1", state, text="some text")
    found = store.get("node-1", engine.fingerprint, text="some text")   # a StoredState, as StateStore.get

Needs ``boto3`` (``pip install picaso-rag[s3]``). The same objects and the same guarantees as the
local :class:`~picaso_rag.store.StateStore`: the same interface
(:class:`~picaso_rag.store_api.StateBackend`), the same file format and the same read, which
decides every status (:func:`~picaso_rag.state_file.read_stored_state`; this module only opens the
object and maps the client's errors):

- object names ``<prefix>/v1/<fingerprint[:16]>/<key[:2]>/<key>.safetensors``, ``key = sha256(node id)[:32]``;
- a sha256 checksum over tensors and metadata, and with ``mac_key`` an HMAC-SHA256 (every replica
  must then hold the same key file): an object that does not verify is CORRUPT, never loaded;
- the model's fingerprint (OTHER_MODEL) and the sha256 of the text (STALE) are checked as locally;
- never a partial object visible: an S3 PUT replaces an object atomically (readers get the old or
  the new body, whole), so no temporary object or lock is needed; concurrent writers of one node
  leave one of their (complete, verified) versions. Reads are bounded: the object's size must be
  what its header describes before any tensor byte is read, and the header itself is read with a
  bound; the body is read into the tensors 16 MiB at a time, so a read costs what a local one
  does (at most 2 x the bound + 32 MiB, about one state: docs/guarantees.md).

A store that cannot be reached raises :class:`StoreUnavailableError` (from get, put, delete...),
so callers can tell "the store is down" from "the state is missing"; :class:`~picaso_rag.cache.StateResolver`
then encodes the states, and :class:`~picaso_rag.cache.StateWriter` counts the failed write-backs.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any, Iterable, Iterator, Sequence

from .errors import PicasoError, StoreUnavailableError
from .precision import check_precision
from .state import State, StateSpec
from .state_file import (
    DEFAULT_MAX_STATE_BYTES,
    DELETED,
    LAYOUT,
    MAX_HEADER_BYTES,
    STATE_FILE,
    check_fingerprint,
    check_storable,
    check_text_arg,
    encode_state_file,
    load_mac_key,
    node_id_sha256,
    read_stored_state,
    state_key,
    state_name,
    stored_entry,
    tombstone_name,
)
from .store_api import StoreEntry, StoredState, StoreStatus


class S3StateStore:
    """Document states in an S3 bucket, keyed by node id and model fingerprint (see the module docstring).

    ``bucket``: the bucket (``create_bucket=True`` creates it if missing); ``prefix``: the folder of
    the states in it; ``client``: a boto3 S3 client (default: one from ``endpoint_url``, the
    environment's credentials, and short timeouts); ``precision``: how states are stored, "fp8"
    by default (e4m3 with a per-head scale: half of bf16, a quarter of fp32, at a measured cost
    under 0.001 nats/token; docs/scaling.md; a hybrid's keys and values with a per-channel scale,
    picaso_rag.precision), or "bf16" / "fp32"; ``mac_key``: the secret (bytes) or the path of a key file shared by every
    replica (see :func:`~picaso_rag.store.load_mac_key`); ``max_state_bytes``: most tensor bytes
    a read given no spec accepts; ``timeout_s``, ``attempts``: of the
    default client's connections and reads (a socket silent for ``timeout_s`` fails the attempt).

    Usage: ``store = S3StateStore("states", endpoint_url="http://127.0.0.1:8333", create_bucket=True)``.
    """

    def __init__(self, bucket: str, prefix: str = "picaso", client: Any = None, endpoint_url: str | None = None,
                 precision: str = "fp8", mac_key: bytes | str | os.PathLike | None = None,
                 max_state_bytes: int = DEFAULT_MAX_STATE_BYTES, create_bucket: bool = False, max_workers: int = 8,
                 timeout_s: float = 10.0, attempts: int = 2):
        if not isinstance(bucket, str) or not bucket:
            raise PicasoError(f"bucket must be a bucket name, got {bucket!r}.")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.precision = check_precision(precision)
        self.max_state_bytes, self.max_workers = max_state_bytes, max_workers
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise PicasoError("S3StateStore needs boto3: pip install 'picaso-rag[s3]' (or pip install boto3).") from None
            # bounded, not botocore's defaults (60 s a read, retried): a hung endpoint costs a request a few
            # timeout_s (attempts, with backoff), then StoreUnavailableError, and the answer falls back to encoding
            client = boto3.client("s3", endpoint_url=endpoint_url, config=Config(
                connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": attempts, "mode": "standard"},
                max_pool_connections=max(10, 2 * max_workers)))
        self.client = client
        self._errors = _client_errors(client)
        if isinstance(mac_key, (bytes, bytearray)):
            if len(mac_key) < 16:
                raise PicasoError("mac_key must be at least 16 bytes (load_mac_key makes 32).")
            self._mac_key: bytes | None = bytes(mac_key)
        elif mac_key is not None:
            self._mac_key = load_mac_key(mac_key)
        else:
            self._mac_key = None
        if create_bucket:
            self._create_bucket()

    def __repr__(self) -> str:
        return f"S3StateStore(s3://{self.bucket}/{self.prefix}, {self.precision}{', mac' if self._mac_key else ''})"

    @property
    def mac(self) -> bool:
        return self._mac_key is not None

    # ------------------------------------------------------------------------------- names
    def object_name(self, node_id: str, fingerprint: str) -> str:
        """The object key of the state of ``node_id`` under the model ``fingerprint``."""
        return self._under_prefix(state_name(node_id, fingerprint))

    def path(self, node_id: str, fingerprint: str) -> PurePosixPath:
        """``/<bucket>/<object name>`` (what :class:`StoredState` reports as its path)."""
        return PurePosixPath("/", self.bucket, self.object_name(node_id, fingerprint))

    def _under_prefix(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _model_prefix(self, model: str) -> str:
        return self._under_prefix(f"{LAYOUT}/{model}/")

    # ------------------------------------------------------------------------------ writing
    def put(self, node_id: str, state: State, text: str | None = None, write_back: bool = False,
            spec: StateSpec | None = None) -> str | None:
        """Write the state of ``node_id`` (replacing any previous one of the same model) in one PUT.

        ``write_back``: as ``StateStore.put``: a node deleted since is not written back (None). Without
        locks, the tombstone is checked before and after the PUT: a delete writes it before removing
        the objects, so whichever comes second removes the object. Returns the object name. Raises
        :class:`StoreUnavailableError` if the store cannot be reached.
        """
        payload = encode_state_file(state, node_id, text=text, mac_key=self._mac_key, precision=self.precision)
        check_storable(state, payload, spec, self.max_state_bytes)  # never an unreadable object
        name = self.object_name(node_id, state.fingerprint)
        tombstone = self._tombstone(node_id)
        if write_back and self._exists(tombstone):
            return None
        if not write_back and self._exists(tombstone):
            with self._call("delete", tombstone):
                self.client.delete_object(Bucket=self.bucket, Key=tombstone)
        with self._call("write", name):
            self.client.put_object(Bucket=self.bucket, Key=name, Body=payload, ContentType="application/octet-stream")
        if write_back and self._exists(tombstone):  # deleted while we wrote: ours is the orphan
            with self._call("delete", name):
                self.client.delete_object(Bucket=self.bucket, Key=name)
            return None
        return name

    def _tombstone(self, node_id: str) -> str:
        return self._under_prefix(tombstone_name(node_id))

    def delete(self, node_id: str, fingerprint: str | None = None, node_deleted: bool = False) -> int:
        """Delete the state(s) of ``node_id`` (of one model, or of every model); returns how many existed.
        ``node_deleted``: as ``StateStore.delete`` (a tombstone stops racing write-backs)."""
        models = [check_fingerprint(fingerprint)[:16]] if fingerprint else self.fingerprints()
        removed = 0
        if node_deleted:  # the node is gone: first the tombstone, then the objects (see put)
            tombstone = self._tombstone(node_id)
            with self._call("write", tombstone):
                self.client.put_object(Bucket=self.bucket, Key=tombstone, Body=b"")
        for model in models:
            name = self.object_name(node_id, model)
            if self._exists(name):
                with self._call("delete", name):
                    self.client.delete_object(Bucket=self.bucket, Key=name)
                removed += 1
        return removed

    def delete_many(self, node_ids: Sequence[str], fingerprint: str | None = None, node_deleted: bool = False) -> int:
        if isinstance(node_ids, str):
            raise PicasoError("delete_many takes a list of node ids; for one id call delete(node_id).")
        return sum(self.delete(node_id, fingerprint, node_deleted) for node_id in node_ids)

    def remove_temp_files(self) -> int:
        """Nothing to remove: a PUT is atomic, no temporary object is ever made (kept for ``ingest()``)."""
        return 0

    # ------------------------------------------------------------------------------ reading
    def get(self, node_id: str, fingerprint: str, text: str | None = None, spec: StateSpec | None = None) -> StoredState:
        """Load and verify the state of ``node_id`` made by the model ``fingerprint`` (as ``StateStore.get``).

        Never raises for a bad object (the status says what was found); raises
        :class:`StoreUnavailableError` when the store cannot be reached.
        """
        check_text_arg(text)
        name = self.object_name(node_id, fingerprint)
        path = PurePosixPath("/", self.bucket, name)
        try:
            with self._call("read", name):
                response = self.client.get_object(Bucket=self.bucket, Key=name)
        except _NotFound:
            others = [m for m in self.fingerprints() if m != fingerprint[:16] and self._exists(self.object_name(node_id, m))]
            if others:
                return StoredState(StoreStatus.OTHER_MODEL, None, path, f"states of this node exist only for other models ({', '.join(others)})")
            return StoredState(StoreStatus.MISSING, None, path, "no state stored for this node")
        body = response["Body"]
        try:
            return read_stored_state(body, int(response.get("ContentLength", -1)), node_id, fingerprint, path, text, spec,
                                     self._mac_key, self.max_state_bytes)
        except self._errors as exc:  # the connection broke mid-body
            raise StoreUnavailableError(f"reading s3://{self.bucket}/{name} failed mid-way ({exc}); the store is unreachable.") from exc
        finally:
            body.close()

    def get_many(self, node_ids: Sequence[str], fingerprint: str, texts: Sequence[str | None] | None = None,
                 spec: StateSpec | None = None) -> list[StoredState]:
        """:meth:`get` for several nodes, in order, ``max_workers`` requests at a time."""
        texts = list(texts) if texts is not None else [None] * len(node_ids)
        if len(texts) != len(node_ids):
            raise PicasoError(f"{len(node_ids)} node ids but {len(texts)} texts; pass one text per node (or none).")
        if len(node_ids) <= 1:
            return [self.get(n, fingerprint, t, spec) for n, t in zip(node_ids, texts)]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(node_ids))) as pool:
            return list(pool.map(lambda pair: self.get(pair[0], fingerprint, pair[1], spec), zip(node_ids, texts)))

    def fingerprints(self) -> list[str]:
        """Short fingerprints (first 16 hex digits) of the models that have states here."""
        root = self._under_prefix(f"{LAYOUT}/")
        models = []
        for page in self._pages(root, delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                model = common["Prefix"][len(root):].rstrip("/")
                if len(model) == 16 and all(c in "0123456789abcdef" for c in model):
                    models.append(model)
        return sorted(models)

    def entries(self, fingerprint: str | None = None, spec: StateSpec | None = None) -> Iterator[StoreEntry]:
        """Every object under the models' prefixes (of one model, or of all), with the status of its
        header (a ranged GET each: the header only): OK, or CORRUPT with the reason (a header that
        does not verify, a size other than it describes, an object misplaced under another node or
        model, or a name that is not a state's: garbage). ``spec``: as ``StateStore.entries``."""
        if spec is not None and not fingerprint:
            raise PicasoError("entries(spec=...) checks one model's objects: pass its fingerprint too.")
        models = [check_fingerprint(fingerprint)[:16]] if fingerprint else self.fingerprints()
        for model in models:
            prefix = self._model_prefix(model)
            for page in self._pages(prefix):
                for item in page.get("Contents", []):
                    entry = self._entry(item["Key"], int(item.get("Size", -1)), model, item["Key"][len(prefix):], spec)
                    if entry is not None:
                        yield entry

    def _entry(self, name: str, size: int, model: str, rest: str, spec: StateSpec | None = None) -> StoreEntry | None:
        """The entry of the object ``name`` (``rest``: its name below the model's prefix); None if it
        was deleted meanwhile."""
        path = PurePosixPath("/", self.bucket, name)
        stripe, _, file_name = rest.partition("/")
        if not (STATE_FILE.fullmatch(file_name) and stripe == file_name[:2]):
            return StoreEntry(path, model, StoreStatus.CORRUPT, detail=f"not a state object's name ({rest[:80]!r}): garbage")
        if size < 8:  # (a ranged GET of an empty object is an error, not an empty body)
            return StoreEntry(path, model, StoreStatus.CORRUPT, detail=f"truncated: {size} bytes, not even the 8-byte header length")
        try:
            with self._call("read", name):
                response = self.client.get_object(Bucket=self.bucket, Key=name, Range=f"bytes=0-{8 + MAX_HEADER_BYTES - 1}")
        except _NotFound:
            return None
        body = response["Body"]
        try:
            return stored_entry(body, size, model, file_name, path, spec, self.max_state_bytes)
        except self._errors as exc:
            raise StoreUnavailableError(f"reading s3://{self.bucket}/{name} failed mid-way ({exc}); the store is unreachable.") from exc
        finally:
            body.close()

    def node_ids(self, fingerprint: str | None = None) -> Iterator[str]:
        """Node ids that have a valid state object (headers only, a ranged GET each; as
        ``StateStore.node_ids``: ids longer than 4 KiB, recorded by their sha256, are not listed)."""
        for entry in self.entries(fingerprint):
            if entry.status is StoreStatus.OK and entry.node_id:
                yield entry.node_id

    def prune(self, keep: Iterable[str]) -> int:
        """Delete every object under ``<prefix>/v1/`` that is not a valid state of a node id in
        ``keep`` (by the sha256 of its id, so ids of any length) or a deleted node's tombstone:
        states of other nodes, objects whose header does not verify, and objects that are no
        state at all (planted garbage, temporary or misnamed objects). A state object is checked
        again just before it is deleted (a writer may have replaced it with a kept state). Returns
        the number of objects removed. Raises :class:`PicasoError` for a node id that is not a
        non-empty string, before anything is deleted.
        """
        if isinstance(keep, str):
            raise PicasoError("prune takes the node ids to keep (a set or list), not one id.")
        keep_hashes = {node_id_sha256(_checked_id(n)) for n in keep}
        root = self._under_prefix(f"{LAYOUT}/")
        removed = 0
        for page in self._pages(root):
            for item in page.get("Contents", []):
                name = item["Key"]
                model, _, rest = name[len(root):].partition("/")
                if model == DELETED and _TOMBSTONE.fullmatch(rest) and rest[:2] == rest[3:5]:
                    continue  # a deleted node's mark (see put): not ours to lift
                if _MODEL.fullmatch(model):
                    entry = self._entry(name, int(item.get("Size", -1)), model, rest)
                    if entry is None or (entry.status is StoreStatus.OK and entry.node_id_sha256 in keep_hashes):
                        continue
                    if entry.status is StoreStatus.OK or STATE_FILE.fullmatch(rest.partition("/")[2]):
                        again = self._entry(name, self._size(name), model, rest)  # replaced meanwhile?
                        if again is None or (again.status is StoreStatus.OK and again.node_id_sha256 in keep_hashes):
                            continue
                with self._call("delete", name):
                    self.client.delete_object(Bucket=self.bucket, Key=name)
                removed += 1
        return removed

    # ----------------------------------------------------------------------------- internal
    def _create_bucket(self) -> None:
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except self._errors as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StoreUnavailableError(f"cannot create bucket {self.bucket} ({exc}).") from exc

    def _size(self, name: str) -> int:
        """The object's size now (-1 if it is gone)."""
        try:
            with self._call("read", name):
                return int(self.client.head_object(Bucket=self.bucket, Key=name).get("ContentLength", -1))
        except _NotFound:
            return -1

    def _exists(self, name: str) -> bool:
        try:
            with self._call("read", name):
                self.client.head_object(Bucket=self.bucket, Key=name)
            return True
        except _NotFound:
            return False

    def _pages(self, prefix: str, delimiter: str | None = None) -> Iterator[dict]:
        kwargs = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        while True:
            with self._call("list", prefix):
                page = self.client.list_objects_v2(**kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def _call(self, what: str, name: str) -> "_Call":
        return _Call(self, what, name)


class _NotFound(Exception):
    pass


_MODEL = re.compile(r"[0-9a-f]{16}")
_TOMBSTONE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{32}")


def _checked_id(node_id: str) -> str:
    state_key(node_id)  # a non-empty string, else PicasoError naming it
    return node_id


class _Call:
    """Map a client's errors: 404 -> _NotFound, anything else -> StoreUnavailableError naming the fix."""

    def __init__(self, store: S3StateStore, what: str, name: str):
        self.store, self.what, self.name = store, what, name

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not isinstance(exc, self.store._errors):
            return False
        if _status(exc) == 404 or _code(exc) in ("NoSuchKey", "404", "NotFound"):
            raise _NotFound() from None
        raise StoreUnavailableError(
            f"{self.what} of s3://{self.store.bucket}/{self.name} failed: {exc}. Check that the object store is up and "
            "the credentials may read and write the bucket; states not read are encoded again, writes not done are "
            "redone by the next ingest() or write-back.") from exc


def _client_errors(client: Any) -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import BotoCoreError, ClientError
        from urllib3.exceptions import HTTPError

        return (ClientError, BotoCoreError, HTTPError, ConnectionError, OSError)
    except ImportError:  # another client with boto3's interface
        return (ConnectionError, OSError)


def _response(exc: BaseException) -> dict:
    """A ClientError's parsed response; {} for errors without one (timeouts, urllib3's, which may hold None)."""
    response = getattr(exc, "response", None)
    return response if isinstance(response, dict) else {}


def _status(exc: BaseException) -> int | None:
    status = _response(exc).get("ResponseMetadata", {})
    return status.get("HTTPStatusCode") if isinstance(status, dict) else None


def _code(exc: BaseException) -> str:
    error = _response(exc).get("Error", {})
    return str(error.get("Code", "")) if isinstance(error, dict) else ""


__all__ = ["S3StateStore", "StoreUnavailableError"]
