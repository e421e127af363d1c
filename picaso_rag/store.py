"""StateStore: document states on disk, one safetensors file per (node id, model fingerprint).

Usage::

    store = StateStore("./picaso_db/states")            # or StateStore(..., mac=True): keyed MAC
    store.put("node-1", engine.encode(["some text"])[0], text="some text")
    found = store.get("node-1", engine.fingerprint, text="some text")
    if found.ok:
        state = found.state
    else:                     # missing, another model's, corrupt or stale: re-encode and put again
        print(found.status, found.detail)

Layout: ``<directory>/v1/<fingerprint[:16]>/<key[:2]>/<key>.safetensors`` with
``key = sha256(node id)[:32]`` (node ids may hold any character and any length; file names may not).
Every file is plain safetensors (no pickle): the tensors ``ssm``, ``conv``, ``log_decay`` (a hybrid
model's state adds ``keys`` and ``values``; fp8 files add their scales: picaso_rag.precision) and
string metadata (format, node id (inline up to 4 KiB) and its sha256, full fingerprint, token count,
sha256 of the text the state was encoded from, a sha256 checksum over the tensor bytes and that
metadata, and with ``mac`` an HMAC-SHA256 of that checksum under the store's secret key).

Writes are atomic (temporary file in the same directory, fsync, ``os.replace``, fsync of the
directory), so a reader sees the old file or the new one, never half of one. Writers of the
same node take a file lock (``flock``, striped over 256 lock files in ``.locks``, each opened
without following links on every acquisition), so a put never interleaves with a delete of the same
node in another thread or process.

Reading is bounded and never follows links below the store's directory: each directory under it
is opened relative to its parent with ``O_NOFOLLOW`` (a symlinked stripe or model directory is
refused), a state file is opened ``O_NOFOLLOW | O_NONBLOCK`` and must be a regular file (fstat),
at most :data:`MAX_HEADER_BYTES` of header are read, and tensor bytes only after the header
described exactly the file's size, shapes consistent with each other and with its token count,
and, when the reader passes the model's :class:`~picaso_rag.state.StateSpec` (``engine.state_spec``),
this model's state shapes (a hybrid's: its fixed SSM shapes, its keys' and values' layers, heads and
head size, at most its longest document's tokens; the bound on a file's size follows). Nothing
process-wide: what a read validates against is what its caller passes. A put given the spec refuses,
before writing anything, a state that a reader with it would refuse. A file that does not verify
(truncated, bit flip, garbled or wrongly typed header, wrong shapes, NaN, missing or wrong MAC) is
reported as ``corrupt``, never loaded, and never raises. See docs/guarantees.md (threat model).

Seams for other back ends (an S3 store, a storage precision option): the file format lives in
small functions that know nothing of the file system:
- :func:`encode_state_file` (state -> bytes) and :func:`decode_state_file` (bytes or a stream with
  ``.read(n)`` -> header and tensors), with the same checks as the local store;
- :func:`read_state_header` (reads only the 8-byte length and the header: a ranged GET) and
  :func:`parse_state_header` (header bytes -> :class:`StateHeader`, every type checked, sizes
  bounded by a :class:`~picaso_rag.state.StateSpec` or ``max_state_bytes``);
- :func:`state_from_file` (header + tensors -> a validated :class:`State`) and :func:`load_mac_key`.
A back end then only maps (node id, fingerprint) to an object name (:func:`state_key`) and decides
statuses exactly as :meth:`StateStore.get` does.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch
from safetensors.torch import save as save_safetensors

from .errors import PicasoError, StateFileError, StateMismatchError, StoreNotWritableError
from .precision import check_precision, dequantize, quantize
from .state import State, StateSpec

logger = logging.getLogger("picaso_rag.store")

FORMAT = "picaso-state/1"
_LAYOUT = "v1"
_DELETED = "deleted"  # <directory>/v1/deleted/<key[:2]>/<key>: tombstones of deleted nodes (not a model: 16 hex digits)
_TENSORS = ("ssm", "conv", "log_decay")
_RANKS = {"ssm": 4, "conv": 3, "log_decay": 2, "keys": 4, "values": 4, "ssm_scale": 2, "keys_scale": 3, "values_scale": 3}
# a hybrid model's state (a picaso_rag.state.State with keys) adds its attention layers' keys and values,
# and its next position in the metadata
_HYBRID_TENSORS = ("keys", "values")
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}
# storage precision fp8 (picaso_rag.precision): ssm in e4m3 with one fp32 scale per (layer, head);
# a hybrid's keys and values in e4m3 with one fp32 scale per (layer, kv head, channel)
_SCALE_TENSORS = ("ssm_scale",)
_KV_SCALE_TENSORS = ("keys_scale", "values_scale")
_FP8_NAMES = ("ssm",) + _HYBRID_TENSORS  # the tensors an fp8 file holds in e4m3
_FILE_DTYPES = {**_DTYPES, "F8_E4M3": torch.float8_e4m3fn}
_FILE_ITEMSIZE = {**_ITEMSIZE, "F8_E4M3": 1}
MAX_HEADER_BYTES = 64 * 1024  # a state's header is under 1 KiB (4 KiB inline node id at most, escaped x6)
MAX_INLINE_NODE_ID_BYTES = 4096  # longer ids are recorded (and checked) by their sha256 only
DEFAULT_MAX_STATE_BYTES = 1 << 30  # bound of a read given no StateSpec
_HEADER_ONLY_BOUND = 1 << 62  # listing reads headers only: no tensor byte is read, whatever the size described
_STATE_FILE = re.compile(r"[0-9a-f]{32}\.safetensors")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAC_DOMAIN = b"picaso-state-mac/1\0"
_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_O_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW, _O_CLOEXEC = getattr(os, "O_NOFOLLOW", 0), getattr(os, "O_CLOEXEC", 0)
_O_CREATE = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))


class StoreStatus(str, Enum):
    """What :meth:`StateStore.get` found. Every status but OK means: re-encode the node's text."""

    OK = "ok"
    MISSING = "missing"  # no record of this node for any model
    OTHER_MODEL = "other-model"  # records exist, but made by another model (fingerprint)
    CORRUPT = "corrupt"  # a file exists but does not verify (truncated, checksum, MAC, header, values)
    STALE = "stale"  # a valid state, but encoded from another text than the node's current one (or from an unknown text)


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


@dataclass(frozen=True)
class StoreEntry:
    """One file of the store, as listed by :meth:`StateStore.entries` (headers only are read).

    ``status`` is OK when the header verifies (the tensors are checked by :meth:`StateStore.get`),
    CORRUPT otherwise (``detail`` says why). ``node_id`` is None for ids longer than
    :data:`MAX_INLINE_NODE_ID_BYTES` (their sha256 is in ``node_id_sha256``) and for corrupt files.
    """

    path: Path
    model: str  # the model directory (first 16 hex digits of the fingerprint)
    status: StoreStatus
    node_id: str | None = None
    node_id_sha256: str | None = None
    detail: str = ""


def text_sha256(text: str) -> str:
    """Hex sha256 of a text (UTF-8; lone surrogates kept as their own code units, never an error):
    how a state records the exact text it was encoded from."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def checked_against_text(state: State, header: StateHeader, text: str | None, path: Path) -> StoredState:
    """The found state, or STALE when ``text`` is given and the state was not encoded from it
    (stored without its text, or from another): the one check every store makes on a read."""
    if text is not None:
        recorded = header.metadata.get("text_sha256", "")
        if not recorded:
            return StoredState(StoreStatus.STALE, None, path, "stored without its text (put(..., text=None)), so it cannot "
                               "be checked against the node's current text; re-encode and put(node_id, state, text=text)")
        if recorded != text_sha256(text):
            return StoredState(StoreStatus.STALE, None, path, "encoded from another text than the node's current text")
    return StoredState(StoreStatus.OK, state, path)


def node_id_sha256(node_id: str) -> str:
    """Hex sha256 of a node id (UTF-8, surrogates kept): names its file and identifies long ids."""
    return hashlib.sha256(node_id.encode("utf-8", "surrogatepass")).hexdigest()


def state_key(node_id: str) -> str:
    """The file (object) name stem of a node's state: ``sha256(node id)[:32]``."""
    if not isinstance(node_id, str) or not node_id:
        raise PicasoError(f"node id must be a non-empty string, got {_short_repr(node_id)}.")
    return node_id_sha256(node_id)[:32]


# ================================================================ the file format (no file system)
class _Reader(Protocol):
    def read(self, n: int, /) -> bytes: ...


@dataclass(frozen=True)
class StateHeader:
    """A state file's verified header: metadata (str -> str) and each tensor's dtype, shape and byte range."""

    header_len: int
    metadata: dict[str, str]
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]]  # name -> (dtype, shape, start, end)
    data_len: int

    @property
    def file_size(self) -> int:
        return 8 + self.header_len + self.data_len

    @property
    def node_id(self) -> str | None:
        return self.metadata.get("node_id")

    @property
    def node_id_sha256(self) -> str:
        recorded = self.metadata.get("node_id_sha256")
        return recorded if recorded else node_id_sha256(self.metadata["node_id"])

    @property
    def fingerprint(self) -> str:
        return self.metadata["fingerprint"]

    def holds(self, node_id: str) -> bool:
        """Whether this header is the state of ``node_id`` (by the inline id or, for long ids, its sha256)."""
        if self.node_id is not None and self.node_id != node_id:
            return False
        return self.node_id_sha256 == node_id_sha256(node_id)

    def describe_node(self) -> str:
        return repr(self.node_id) if self.node_id is not None else f"with id sha256 {self.node_id_sha256[:16]}..."


def state_header_length(prefix: bytes) -> int:
    """The header length announced by a file's first 8 bytes; raises :class:`StateFileError`."""
    header_len = struct.unpack("<Q", prefix[:8])[0] if len(prefix) >= 8 else -1
    if 2 <= header_len <= MAX_HEADER_BYTES:
        return header_len  # (a valid length may start with 0x80: the pickle test below comes only after this one)
    if prefix[:4] == b"PK\x03\x04" or prefix[:1] == b"\x80":  # torch.save zip, or a raw pickle stream
        raise StateFileError("a pickle (torch.save) file, not a picaso state: refused unread (unpickling can run code)")
    if len(prefix) < 8:
        raise StateFileError(f"truncated: {len(prefix)} bytes, not even the 8-byte header length")
    raise StateFileError(f"truncated or garbled header (header length {header_len}, at most {MAX_HEADER_BYTES} allowed)")


def parse_state_header(header_bytes: bytes, spec: StateSpec | None = None,
                       max_state_bytes: int = DEFAULT_MAX_STATE_BYTES) -> StateHeader:
    """Parse and check a header: JSON object, exactly the three tensors with known dtypes, shapes of
    non-negative ints (``spec``'s exact shapes if given, else a total under ``max_state_bytes``),
    contiguous byte ranges that match, string metadata with the format tag and well-formed fields.
    Raises :class:`StateFileError` for anything else (never TypeError, KeyError...)."""
    header_len = len(header_bytes)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise StateFileError(f"header is not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise StateFileError(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise StateFileError(f"not a picaso state file (no '{FORMAT}' format tag)")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise StateFileError("header metadata holds a value that is not a string")
    names = set(header) - {"__metadata__"}
    if names not in _NAME_SETS:
        raise StateFileError(f"expected tensors {_TENSORS} (and {_HYBRID_TENSORS} for a hybrid model; fp8 files add "
                             f"{_SCALE_TENSORS}, and {_KV_SCALE_TENSORS} for a hybrid), found {sorted(names)[:8]}")
    _check_metadata(metadata)
    hybrid = "keys" in names
    fp8 = "ssm_scale" in names
    if hybrid and not re.fullmatch(r"[0-9]{1,18}", metadata.get("position", "")):
        raise StateFileError(f"metadata position {_short_repr(metadata.get('position'))} is not a non-negative integer")

    tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name in (_TENSORS + (_HYBRID_TENSORS if hybrid else ()) + (_SCALE_TENSORS if fp8 else ())
                 + (_KV_SCALE_TENSORS if fp8 and hybrid else ())):
        info = header[name]
        if not isinstance(info, dict):
            raise StateFileError(f"tensor {name}: entry is a {type(info).__name__}, not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _FILE_DTYPES:
            raise StateFileError(f"tensor {name}: dtype {_short_repr(dtype)} is not one of {sorted(_FILE_DTYPES)}")
        if (dtype == "F8_E4M3") != (fp8 and name in _FP8_NAMES) or (name.endswith("_scale") and dtype != "F32"):
            raise StateFileError(f"tensor {name}: dtype {dtype}; fp8 files hold ssm (and a hybrid's keys and values) in "
                                 "F8_E4M3 with F32 scales, every other tensor in F32, BF16 or F16")
        if name == "log_decay" and dtype != "F32":
            raise StateFileError(f"tensor log_decay: dtype {dtype}, log-decays are stored in F32")
        if (not isinstance(shape, list) or len(shape) != _RANKS[name]
                or not all(type(d) is int and 0 <= d < (1 << 40) for d in shape)):
            raise StateFileError(f"tensor {name}: shape {_short_repr(shape)} is not {_RANKS[name]} non-negative ints")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and 0 <= o < (1 << 62) for o in offsets)):
            raise StateFileError(f"tensor {name}: data_offsets {_short_repr(offsets)} is not a pair of non-negative ints")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * _FILE_ITEMSIZE[dtype]:
            raise StateFileError(f"tensor {name}: data_offsets {offsets} do not hold {numel} {dtype} values")
        tensors[name] = (dtype, tuple(shape), offsets[0], offsets[1])
    if fp8 and tensors["ssm_scale"][1] != tensors["ssm"][1][:2]:
        raise StateFileError(f"ssm_scale shape {tensors['ssm_scale'][1]} is not ssm's [n_layer, nheads] {tensors['ssm'][1][:2]}")
    if fp8 and hybrid:
        for name in _HYBRID_TENSORS:
            shape = tensors[name][1]
            if tensors[f"{name}_scale"][1] != (shape[0], shape[1], shape[3]):
                raise StateFileError(f"{name}_scale shape {tensors[f'{name}_scale'][1]} is not {name}'s "
                                     f"[n_attn, kv_heads, head_dim] {(shape[0], shape[1], shape[3])}")
    # the shapes against each other and the token count, model or not: a lying header is refused unread
    ssm_shape = tensors["ssm"][1]
    if tensors["log_decay"][1] != ssm_shape[:2] or tensors["conv"][1][0] != ssm_shape[0]:
        raise StateFileError(f"inconsistent shapes: ssm {ssm_shape}, conv {tensors['conv'][1]}, log_decay "
                             f"{tensors['log_decay'][1]}; expected [L,H,P,N], [L,C,W-1], [L,H]")
    if hybrid and tensors["keys"][1][0] > 0:  # a store keeps documents' states: one key per token, from position 0
        n_keys, n_tokens, position = tensors["keys"][1][2], int(metadata["n_tokens"]), int(metadata["position"])
        if not n_keys == n_tokens == position:
            raise StateFileError(f"the header says {n_tokens} tokens at position {position}, its keys hold {n_keys}; "
                                 "a document's state has one key per token")
    if spec is not None:  # this model's exact shapes (and, for a hybrid, its longest document)
        check_header_shapes_of(tensors, spec)
    if not fp8 and tensors["ssm"][0] != tensors["conv"][0]:
        raise StateFileError(f"ssm is {tensors['ssm'][0]} but conv is {tensors['conv'][0]}; both are stored in one dtype")
    if hybrid and (tensors["keys"][0] != tensors["ssm"][0] or tensors["values"][1] != tensors["keys"][1]):
        raise StateFileError("keys and values must have one shape and the dtype of ssm")
    ranges = sorted((start, end) for _, _, start, end in tensors.values())
    position = 0
    for start, end in ranges:  # safetensors: the byte ranges tile the data, in order, without holes
        if start != position:
            raise StateFileError(f"tensor byte ranges {ranges} leave holes or overlap")
        position = end
    bound = spec.max_nbytes if spec is not None else max_state_bytes
    if position > bound:
        raise StateFileError(f"the header describes {position} bytes of tensors, more than a state's {bound}")
    return StateHeader(header_len, dict(metadata), tensors, position)


_NAME_SETS = (set(_TENSORS), set(_TENSORS + _HYBRID_TENSORS), set(_TENSORS + _SCALE_TENSORS),
              set(_TENSORS + _HYBRID_TENSORS + _SCALE_TENSORS + _KV_SCALE_TENSORS))


def _check_metadata(metadata: dict[str, str]) -> None:
    fingerprint = metadata.get("fingerprint")
    if fingerprint is None or not re.fullmatch(r"[0-9a-f]{16,128}", fingerprint):
        raise StateFileError(f"metadata fingerprint {_short_repr(fingerprint)} is not a hex fingerprint")
    node_id, id_hash = metadata.get("node_id"), metadata.get("node_id_sha256")
    if not node_id and not id_hash:
        raise StateFileError("metadata holds neither a node id nor its sha256")
    if id_hash is not None and not _HEX64.fullmatch(id_hash):
        raise StateFileError(f"metadata node_id_sha256 {_short_repr(id_hash)} is not a sha256")
    if node_id and id_hash and node_id_sha256(node_id) != id_hash:
        raise StateFileError("metadata node_id and node_id_sha256 disagree")
    if not re.fullmatch(r"[0-9]{1,18}", metadata.get("n_tokens", "")):
        raise StateFileError(f"metadata n_tokens {_short_repr(metadata.get('n_tokens'))} is not a non-negative integer")
    text_digest = metadata.get("text_sha256", "")
    if text_digest and not _HEX64.fullmatch(text_digest):
        raise StateFileError(f"metadata text_sha256 {_short_repr(text_digest)} is not a sha256")
    if not _HEX64.fullmatch(metadata.get("checksum", "")):
        raise StateFileError("metadata checksum is missing or not a sha256")
    if "mac" in metadata and not _HEX64.fullmatch(metadata["mac"]):
        raise StateFileError("metadata mac is not an HMAC-SHA256")


def read_state_header(stream: _Reader, spec: StateSpec | None = None,
                      max_state_bytes: int = DEFAULT_MAX_STATE_BYTES) -> StateHeader:
    """Read a file's 8-byte length and header only (at most 8 + :data:`MAX_HEADER_BYTES` bytes) from
    ``stream`` (anything with ``.read(n)``) and parse them (see :func:`parse_state_header`)."""
    prefix = _read_upto(stream, 8)
    header_len = state_header_length(prefix)
    header_bytes = _read_upto(stream, header_len)
    if len(header_bytes) != header_len:
        raise StateFileError(f"truncated in the header: {8 + len(header_bytes)} bytes, the header alone is {8 + header_len}")
    return parse_state_header(header_bytes, spec, max_state_bytes)


def read_state_tensors(stream: _Reader, header: StateHeader, mac_key: bytes | None = None) -> dict[str, torch.Tensor]:
    """Read exactly the header's tensor bytes after it, verify the checksum (and the MAC with ``mac_key``)."""
    data = _read_upto(stream, header.data_len)
    if len(data) != header.data_len:
        raise StateFileError(f"truncated in the tensors: {8 + header.header_len + len(data)} bytes, the header describes {header.file_size}")
    if stream.read(1):
        raise StateFileError(f"appended bytes: the file is longer than the {header.file_size} bytes its header describes")
    tensors = {}
    for name, (dtype, shape, start, end) in header.tensors.items():
        # a copy per tensor (bytearray): aligned, writable, independent of the other tensors
        tensors[name] = (torch.frombuffer(bytearray(memoryview(data)[start:end]), dtype=_FILE_DTYPES[dtype]).reshape(shape)
                        if end > start else torch.empty(shape, dtype=_FILE_DTYPES[dtype]))
    checksum = _checksum(tensors, header.metadata)
    if not hmac.compare_digest(checksum, header.metadata["checksum"]):
        raise StateFileError("checksum mismatch: the file's bytes changed after it was written")
    if mac_key is not None:
        if "mac" not in header.metadata:
            raise StateFileError("no MAC: the file was not written with this store's key (forged, copied in, or "
                                 "written before mac was enabled)")
        if not hmac.compare_digest(_mac(mac_key, checksum), header.metadata["mac"]):
            raise StateFileError("MAC mismatch: the file was not written with this store's key (forged or copied in)")
    return tensors


def decode_state_file(source: bytes | _Reader, spec: StateSpec | None = None, mac_key: bytes | None = None,
                      max_state_bytes: int = DEFAULT_MAX_STATE_BYTES) -> tuple[StateHeader, dict[str, torch.Tensor]]:
    """A whole state file, from bytes or a stream: header and tensors, every check of the store applied.

    Usage: ``header, tensors = decode_state_file(body, spec=StateSpec.of_config(cfg), mac_key=key)``.
    """
    stream = _BytesReader(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    header = read_state_header(stream, spec, max_state_bytes)
    return header, read_state_tensors(stream, header, mac_key)


def state_from_file(header: StateHeader, tensors: dict[str, torch.Tensor], spec: StateSpec | None = None) -> State:
    """The :class:`State` of a decoded file; raises :class:`StateFileError` for inconsistent shapes,
    another model's shapes (``spec``), NaN/inf or a positive log-decay."""
    try:
        if "ssm_scale" in tensors or "keys" in tensors:  # fp8 (rescaled to fp32), or a hybrid model's state
            state = dequantize(tensors, int(header.metadata["n_tokens"]), header.fingerprint,
                               position=int(header.metadata["position"]) if "keys" in tensors else None)
        else:
            state = State(tensors["ssm"], tensors["conv"], tensors["log_decay"], int(header.metadata["n_tokens"]), header.fingerprint)
        if state.has_keys and not (state.n_keys == state.n_tokens == state.position):
            # a store keeps documents' states: one key per token, read from position 0
            raise StateMismatchError(f"the header says {state.n_tokens} tokens at position {state.position}, the file "
                                     f"holds {state.n_keys} keys; a document's state has one key per token.")
        if spec is not None:
            spec.check(state)
        state.check_finite()
    except (StateMismatchError, PicasoError) as exc:
        raise StateFileError(f"invalid state: {exc}") from None
    return state


def encode_state_file(state: State, node_id: str, text: str | None = None, dtype: torch.dtype | None = None,
                      mac_key: bytes | None = None, precision: str | None = None) -> bytes:
    """The bytes of a state file (plain safetensors). ``text``: what the state was encoded from (its
    sha256 is recorded); ``dtype``: storage dtype of ssm/conv; ``mac_key``: add an HMAC-SHA256;
    ``precision``: "fp32", "bf16" or "fp8" (picaso_rag.precision; instead of ``dtype``).

    Usage: ``payload = encode_state_file(state, "node-1", text=text, mac_key=load_mac_key(path))``.
    """
    state_key(node_id)  # the same check (non-empty string) as every store call
    state.check_finite()  # never write a state that could not be read back
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.tensors().items()}
    if precision is not None:
        if dtype is not None:
            raise PicasoError("give a storage precision or a dtype, not both.")
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in quantize(state, precision).items()}
    if dtype is not None:
        for name in ("ssm", "conv") + tuple(n for n in _HYBRID_TENSORS if n in tensors):
            tensors[name] = tensors[name].to(dtype)
    metadata = {"format": FORMAT}
    if len(node_id.encode("utf-8", "surrogatepass")) <= MAX_INLINE_NODE_ID_BYTES:
        metadata["node_id"] = node_id
    metadata.update({
        "node_id_sha256": node_id_sha256(node_id),
        "fingerprint": state.fingerprint,
        "n_tokens": str(int(state.n_tokens)),
        "text_sha256": text_sha256(text) if text is not None else "",
        "created": f"{time.time():.3f}",
    })
    if state.has_keys:
        metadata["position"] = str(int(state.position))
    metadata["checksum"] = _checksum(tensors, metadata)
    if mac_key is not None:
        metadata["mac"] = _mac(mac_key, metadata["checksum"])
    return save_safetensors(tensors, metadata=metadata)


def load_mac_key(path: str | os.PathLike, create: bool = True) -> bytes:
    """The store's secret (32 random bytes, hex in a file of mode 0600), created on first use.

    Refused with an error naming the fix when the file is a symlink, not a regular file, readable by
    group or others, or not 64 hex digits. Usage: ``key = load_mac_key("./picaso_db/states.mac-key")``.
    """
    path = Path(path).expanduser()
    for _ in range(50):
        try:
            fd = os.open(path, _O_READ)
        except FileNotFoundError:
            if not create:
                raise PicasoError(f"no MAC key at {path}; create the store once with mac=True (or copy its key there).") from None
            _create_mac_key(path)
            continue
        except OSError as exc:
            raise PicasoError(f"cannot open the MAC key {path} ({exc.strerror}); it must be a regular file, not a symlink.") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise PicasoError(f"the MAC key {path} is not a regular file; remove it (a new key is then created).")
            if info.st_mode & 0o077:
                raise PicasoError(f"the MAC key {path} is readable or writable by others (mode {oct(info.st_mode & 0o777)}); "
                                  f"run chmod 600 '{path}'.")
            content = os.read(fd, 256).strip()
        finally:
            os.close(fd)
        if re.fullmatch(rb"[0-9a-f]{64}", content):
            return bytes.fromhex(content.decode())
        if content:
            raise PicasoError(f"the MAC key {path} is not 64 hex digits; restore it from a backup (or delete it: every "
                              "state then reads as corrupt and is re-encoded).")
        time.sleep(0.02)  # pragma: no cover - another process is between create and link
    raise PicasoError(f"the MAC key {path} stays empty; delete it and open the store again.")


def _create_mac_key(path: Path) -> None:
    """Write a new key to a private temporary file, then link it into place: atomic, first one wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, _O_CREATE, 0o600)
    try:
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process created it first: use theirs
    finally:
        os.unlink(tmp)


def _mac(key: bytes, checksum: str) -> str:
    """HMAC-SHA256 over the file's checksum, itself a sha256 over the whole metadata (node id and its
    sha256, fingerprint, n_tokens, text digest) and every tensor's name, dtype, shape and bytes."""
    return hmac.new(key, _MAC_DOMAIN + bytes.fromhex(checksum), hashlib.sha256).hexdigest()


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over the metadata (without checksum and mac) and every tensor's dtype, shape and raw bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k not in ("checksum", "mac")}, sort_keys=True).encode())
    # (this order keeps the checksums of every earlier file: new names only ever come last)
    for name in _TENSORS + tuple(n for n in _HYBRID_TENSORS + _SCALE_TENSORS + _KV_SCALE_TENSORS if n in tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself: no copy
    return h.hexdigest()


class _BytesReader:
    def __init__(self, data: bytes | bytearray | memoryview):
        self._data, self._pos = memoryview(data), 0

    def read(self, n: int) -> bytes:
        piece = bytes(self._data[self._pos:self._pos + n])
        self._pos += len(piece)
        return piece


class _FdReader:
    """Reads a file descriptor (never more than asked)."""

    def __init__(self, fd: int):
        self.fd = fd

    def read(self, n: int) -> bytes:
        return os.read(self.fd, n)


def _read_upto(stream: _Reader, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at the end of the stream)."""
    parts, got = [], 0
    while got < n:
        piece = stream.read(min(n - got, 1 << 24))
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# ============================================================================ the local store
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

    ``dtype``: cast ssm/conv to this dtype when writing (e.g. ``torch.bfloat16`` halves fp32 files);
    log_decay always stays fp32. ``precision``: "fp32", "bf16" or "fp8" (e4m3 with a per-head scale,
    a quarter of fp32; see picaso_rag.precision and docs/scaling.md), instead of ``dtype``; default
    None: the state's own dtype (exact round trips). ``lock_timeout``: seconds to wait for another writer of the same node.
    ``mac``: False (checksum only: fine for a store that only you can write, or shared read-only),
    True (HMAC-SHA256 with a secret in ``<directory>.mac-key``, created 0600 on first use) or the
    path of a key file; with a key, a file not written with it is CORRUPT. ``max_state_bytes``:
    most tensor bytes a read given no spec accepts (a read given ``spec=engine.state_spec`` is
    bounded by the model's largest state instead, see :class:`~picaso_rag.state.StateSpec`; a
    hybrid's grows with its ``max_document_tokens``).

    Usage: ``store = StateStore("./picaso_db/states", mac=True); store.put(node_id, state, text=text)``.
    """

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype | None = None, lock_timeout: float = 60.0,
                 mac: bool | str | os.PathLike = False, max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
                 precision: str | None = None):
        self.directory = Path(directory).expanduser()
        if self.directory.exists() and not self.directory.is_dir():
            raise PicasoError(f"{self.directory} exists and is not a directory; pass a directory for the state store.")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in _DTYPES.values()):
            raise PicasoError(f"storage dtype must be a floating-point dtype (e.g. torch.bfloat16, float16, float32), got {dtype}.")
        if type(max_state_bytes) is not int or max_state_bytes < 1:
            raise PicasoError(f"max_state_bytes must be a positive int, got {max_state_bytes!r}.")
        if precision is not None and dtype is not None:
            raise PicasoError("give StateStore a precision ('fp32', 'bf16', 'fp8') or a dtype, not both.")
        self.precision = check_precision(precision) if precision is not None else None
        self.dtype = dtype
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

    @staticmethod
    def _check_fingerprint(fingerprint: str) -> str:
        if not isinstance(fingerprint, str) or len(fingerprint) < 16 or not all(c in "0123456789abcdef" for c in fingerprint):
            raise PicasoError(f"fingerprint must be the hex string of engine.fingerprint, got {_short_repr(fingerprint)}.")
        return fingerprint

    def path(self, node_id: str, fingerprint: str) -> Path:
        """Where the state of ``node_id`` under the model ``fingerprint`` lives (it may not exist)."""
        key = self._key(node_id)
        return self._root / self._check_fingerprint(fingerprint)[:16] / key[:2] / f"{key}.safetensors"

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
        payload = encode_state_file(state, node_id, text=text, dtype=self.dtype, mac_key=self._mac_key, precision=self.precision)
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
        if text is not None and not isinstance(text, str):
            raise PicasoError(f"text must be the node's text (a str) or None, got {type(text).__name__}.")
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
            reader = _FdReader(fd)
            header = read_state_header(reader, None, read_bound(spec, self.max_state_bytes))
            size = os.fstat(fd).st_size
            if size != header.file_size:
                raise StateFileError(f"truncated or padded: the file has {size} bytes, its header describes {header.file_size}")
            if header.fingerprint != fingerprint:
                return StoredState(StoreStatus.OTHER_MODEL, None, path, f"made by model {header.fingerprint[:12]}, not {fingerprint[:12]}")
            if not header.holds(node_id):
                return StoredState(StoreStatus.CORRUPT, None, path, f"file holds node {_short_repr(header.node_id) if header.node_id is not None else header.describe_node()}, not {_short_repr(node_id)}")
            if spec is not None:  # this model's exact shapes, before a byte of tensor data is read
                check_header_shapes(header, spec)
            state = state_from_file(header, read_state_tensors(reader, header, self._mac_key), spec)
        except StateFileError as exc:
            return StoredState(StoreStatus.CORRUPT, None, path, str(exc))
        except OSError as exc:
            return StoredState(StoreStatus.CORRUPT, None, path, f"unreadable: {exc}")
        finally:
            os.close(fd)
        return checked_against_text(state, header, text, path)

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
            header = read_state_header(_FdReader(fd), spec, read_bound(spec, self.max_state_bytes) if spec else _HEADER_ONLY_BOUND)
            size = os.fstat(fd).st_size
        except StateFileError as exc:
            return StoreEntry(path, model, StoreStatus.CORRUPT, detail=str(exc))
        except OSError as exc:
            return StoreEntry(path, model, StoreStatus.CORRUPT, detail=f"unreadable: {exc}")
        finally:
            os.close(fd)
        id_hash = header.node_id_sha256
        if size != header.file_size:
            detail = f"truncated or padded: the file has {size} bytes, its header describes {header.file_size}"
        elif header.fingerprint[:16] != model or id_hash[:32] != name[:32]:
            detail = "misplaced: the file's header names another node or model than its path"
        else:
            return StoreEntry(path, model, StoreStatus.OK, header.node_id, id_hash)
        return StoreEntry(path, model, StoreStatus.CORRUPT, header.node_id, id_hash, detail)

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


def check_header_shapes(header: StateHeader, spec: StateSpec) -> None:
    """Check a parsed header against a model's exact shapes (raises :class:`StateFileError`): a
    Mamba-2 model's fixed shapes; a hybrid's fixed SSM shapes, its keys' and values' layers, heads
    and head size, and at most its longest document's tokens (:class:`~picaso_rag.state.StateSpec`)."""
    check_header_shapes_of(header.tensors, spec)


def check_header_shapes_of(tensors: dict[str, tuple[str, tuple[int, ...], int, int]], spec: StateSpec) -> None:
    try:
        spec.check_shapes({name: info[1] for name, info in tensors.items()})
    except StateMismatchError as exc:
        raise StateFileError(f"not a state of this model: {exc}") from None


def read_bound(spec: StateSpec | None, max_state_bytes: int) -> int:
    """Most tensor bytes to accept in a file of a model with ``spec``: the model's own largest state
    (a hybrid's grows with its longest document), at least ``max_state_bytes``."""
    return max(max_state_bytes, spec.max_nbytes) if spec is not None else max_state_bytes


def check_storable(state: State, payload: bytes, spec: StateSpec | None, max_state_bytes: int) -> None:
    """Refuse (before anything is written) a state file that a reader with ``spec`` (or, without
    one, with ``max_state_bytes``) would refuse: a state of other shapes than ``spec``'s (a hybrid's
    longer than its longest document), or a payload above the bound. Raises :class:`PicasoError`
    naming the fix."""
    if spec is not None:
        try:
            spec.check(state)
        except StateMismatchError as exc:
            raise PicasoError(f"not stored: {exc}") from None
    data = len(payload) - 8 - struct.unpack("<Q", payload[:8])[0]
    bound = read_bound(spec, max_state_bytes)
    if data > bound:
        raise PicasoError(
            f"not stored: this state's file holds {data:,} bytes of tensors, above the {bound:,} a store reads without "
            "the model's state shapes. Pass spec=engine.state_spec to the store's put and reads, or a larger "
            "max_state_bytes to the store (readers too).")


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
