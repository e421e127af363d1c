"""The state file format: one document state as one plain safetensors file, and its names.

Every back end stores exactly these bytes (:mod:`picaso_rag.store` on local disk,
:mod:`picaso_rag.s3store` in an object store), and reads them through :func:`read_stored_state`,
which decides the status of a read (:class:`~picaso_rag.store_api.StoreStatus`) the same way for
each. Nothing here touches a file system or a network: a reader is anything with ``.read(n)``.

A file: the tensors ``ssm``, ``conv``, ``log_decay`` (a hybrid model's state adds ``keys`` and
``values``; fp8 files add their scales: :mod:`picaso_rag.precision`) and string metadata (format
``picaso-state/1``, node id (inline up to :data:`MAX_INLINE_NODE_ID_BYTES`) and its sha256, full
fingerprint, token count (a hybrid's next position too), sha256 of the text the state was encoded
from, a sha256 checksum over the tensor bytes and that metadata, and with a MAC key an
HMAC-SHA256 of that checksum). No pickle, ever.

Names: ``v1/<fingerprint[:16]>/<key[:2]>/<key>.safetensors`` with ``key = sha256(node id)[:32]``
(:func:`state_name`; node ids may hold any character and any length, file names may not), and
``v1/deleted/<key[:2]>/<key>`` for a deleted node's tombstone (:func:`tombstone_name`).

Reading is bounded, in this order: at most :data:`MAX_HEADER_BYTES` of header, parsed with every
type checked and the shapes checked against each other and the token count; the file's size must be
what the header describes; the model's exact shapes when the caller passes its
:class:`~picaso_rag.state.StateSpec` (``engine.state_spec``), else at most ``max_state_bytes``;
only then the tensor bytes, read straight into the tensors' own buffers and checksummed there
(see :func:`read_state_tensors` for the memory a read costs).

Usage::

    payload = encode_state_file(state, "node-1", text="some text", precision="fp8")
    header, tensors = decode_state_file(payload, spec=engine.state_spec)
    found = read_stored_state(stream, size, "node-1", engine.fingerprint, path, spec=engine.state_spec)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Protocol

import torch
from safetensors.torch import save as save_safetensors

from .errors import PicasoError, StateFileError, StateMismatchError
from .precision import dequantize, quantize
from .state import State, StateSpec
from .store_api import StoreEntry, StoredState, StoreStatus

FORMAT = "picaso-state/1"
LAYOUT = "v1"
DELETED = "deleted"  # v1/deleted/<key[:2]>/<key>: tombstones of deleted nodes (not a model: 16 hex digits)
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
DEFAULT_MAX_STATE_BYTES = 1 << 30  # bound of a read given no StateSpec (tensor bytes, in the file and as read)
READ_CHUNK_BYTES = 1 << 24  # tensor bytes are read (and, for a stream without readinto, copied) 16 MiB at a time
HEADER_ONLY_BOUND = 1 << 62  # listing reads headers only: no tensor byte is read, whatever the size described
STATE_FILE = re.compile(r"[0-9a-f]{32}\.safetensors")  # the name of a state file (object) in its stripe
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAC_DOMAIN = b"picaso-state-mac/1\0"
_O_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_O_CREATE = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))



def text_sha256(text: str) -> str:
    """Hex sha256 of a text (UTF-8; lone surrogates kept as their own code units, never an error):
    how a state records the exact text it was encoded from."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def node_id_sha256(node_id: str) -> str:
    """Hex sha256 of a node id (UTF-8, surrogates kept): names its file and identifies long ids."""
    return hashlib.sha256(node_id.encode("utf-8", "surrogatepass")).hexdigest()


def state_key(node_id: str) -> str:
    """The file (object) name stem of a node's state: ``sha256(node id)[:32]``."""
    if not isinstance(node_id, str) or not node_id:
        raise PicasoError(f"node id must be a non-empty string, got {_short_repr(node_id)}.")
    return node_id_sha256(node_id)[:32]



def check_fingerprint(fingerprint: str) -> str:
    """``fingerprint`` if it is a model fingerprint (at least 16 lowercase hex digits), else
    :class:`PicasoError` naming what to pass."""
    if not isinstance(fingerprint, str) or len(fingerprint) < 16 or not all(c in "0123456789abcdef" for c in fingerprint):
        raise PicasoError(f"fingerprint must be the hex string of engine.fingerprint, got {_short_repr(fingerprint)}.")
    return fingerprint


def state_name(node_id: str, fingerprint: str) -> str:
    """``v1/<fingerprint[:16]>/<key[:2]>/<key>.safetensors``: where a back end keeps the state of
    ``node_id`` under the model ``fingerprint`` (below its directory or prefix)."""
    key = state_key(node_id)
    return f"{LAYOUT}/{check_fingerprint(fingerprint)[:16]}/{key[:2]}/{key}.safetensors"


def tombstone_name(node_id: str) -> str:
    """``v1/deleted/<key[:2]>/<key>``: the mark of a node deleted from the index."""
    key = state_key(node_id)
    return f"{LAYOUT}/{DELETED}/{key[:2]}/{key}"


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
    def decoded_nbytes(self) -> int:
        """Bytes of the state a read returns: fp8 tensors in fp32 (their scales folded in), the
        others as stored."""
        total = 0
        for name, (dtype, shape, start, end) in self.tensors.items():
            if name.endswith("_scale"):
                continue
            total += (end - start) * (4 if dtype == "F8_E4M3" else 1)
        return total

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
    parsed = StateHeader(header_len, dict(metadata), tensors, position)
    check_read_bound(parsed, spec.max_nbytes if spec is not None else max_state_bytes)
    return parsed


def check_read_bound(header: StateHeader, bound: int) -> None:
    """Refuse (:class:`StateFileError`) a header whose tensors take more than ``bound`` bytes in
    the file, or in the state a read returns (fp8 tensors are read back in fp32: four times their
    file bytes): what a read may allocate is bounded before a tensor byte is read."""
    if max(header.data_len, header.decoded_nbytes) > bound:
        raise StateFileError(f"the header describes {header.data_len:,} bytes of tensors ({header.decoded_nbytes:,} as "
                             f"read), more than a state's {bound:,}")


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
    """Read exactly the header's tensor bytes after it, verify the checksum (and the MAC with ``mac_key``).

    Memory: each tensor's bytes are read straight into that tensor's own buffer, in pieces of at
    most :data:`READ_CHUNK_BYTES` (``readinto`` when the stream has it, else one ``read`` per
    piece), and checksummed there: a read holds the file's tensor bytes once, plus one piece.
    """
    tensors = {name: torch.empty(shape, dtype=_FILE_DTYPES[dtype]) for name, (dtype, shape, _, _) in header.tensors.items()}
    got = 0
    for name, (_, _, start, end) in sorted(header.tensors.items(), key=lambda item: item[1][2]):  # file order
        n = _read_into(stream, tensors[name].view(-1).view(torch.uint8).numpy().data)
        got += n
        if n != end - start:
            raise StateFileError(f"truncated in the tensors: {8 + header.header_len + got} bytes, the header describes "
                                 f"{header.file_size}")
    if stream.read(1):
        raise StateFileError(f"appended bytes: the file is longer than the {header.file_size} bytes its header describes")
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
    """Reads a file descriptor (never more than asked; ``readinto`` without a copy)."""

    def __init__(self, fd: int):
        self.fd = fd

    def read(self, n: int) -> bytes:
        return os.read(self.fd, n)

    def readinto(self, buffer: memoryview) -> int:
        return os.readv(self.fd, [buffer])


def _read_into(stream: _Reader, buffer: memoryview) -> int:
    """Fill ``buffer`` from ``stream`` in pieces of at most :data:`READ_CHUNK_BYTES` (fewer bytes
    only at the end of the stream); returns how many were read. A piece at a time, also through
    ``readinto``: some streams (urllib3's) allocate what one ``readinto`` asks for."""
    readinto = getattr(stream, "readinto", None)
    got, size = 0, len(buffer)
    while got < size:
        piece = buffer[got:got + READ_CHUNK_BYTES]
        if readinto is not None:
            n = readinto(piece) or 0
        else:
            data = stream.read(len(piece))
            n = len(data)
            piece[:n] = data
            del data  # before the next piece is read
        if n == 0:
            break
        got += n
    return got


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
    """Most tensor bytes a read accepts, in the file and in the state it returns: with the
    model's ``spec``, its own largest state (:attr:`StateSpec.max_nbytes`: fp32, a hybrid's
    longest document), whatever ``max_state_bytes``; without, ``max_state_bytes``."""
    return spec.max_nbytes if spec is not None else max_state_bytes


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
    header_len = struct.unpack("<Q", payload[:8])[0]
    header = parse_state_header(payload[8:8 + header_len], None, HEADER_ONLY_BOUND)
    bound = read_bound(spec, max_state_bytes)
    if max(header.data_len, header.decoded_nbytes) > bound:  # as check_read_bound, on the reader's side
        reads = "for this spec" if spec is not None else "without the model's state shapes"
        raise PicasoError(
            f"not stored: this state's file holds {header.data_len:,} bytes of tensors ({header.decoded_nbytes:,} as "
            f"read back), above the {bound:,} a store reads {reads}. "
            "Pass spec=engine.state_spec to the store's put and reads, or a larger max_state_bytes to the store "
            "(readers too).")


# ====================================================== the read every back end makes (statuses)
def checked_against_text(state: State, header: StateHeader, text: str | None, path: PurePath) -> StoredState:
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


def check_text_arg(text: object) -> None:
    """A store's ``text`` argument: the node's text or None (raises :class:`PicasoError`)."""
    if text is not None and not isinstance(text, str):
        raise PicasoError(f"text must be the node's text (a str) or None, got {type(text).__name__}.")


def read_stored_state(stream: _Reader, size: int, node_id: str, fingerprint: str, path: PurePath,
                      text: str | None = None, spec: StateSpec | None = None, mac_key: bytes | None = None,
                      max_state_bytes: int = DEFAULT_MAX_STATE_BYTES) -> StoredState:
    """Read and verify the stored state of ``node_id`` under the model ``fingerprint`` from
    ``stream`` (``.read(n)``; ``.readinto`` used when it has one), whose total size is ``size``
    bytes; the status every back end reports, decided in one place:

    header (bounded, every type checked, shapes consistent) -> size equal to what the header
    describes -> the file's model (OTHER_MODEL) -> its node (CORRUPT) -> ``spec``'s exact shapes
    -> the tensor bytes, checksum and, with ``mac_key``, the MAC -> the values -> ``text`` (STALE).
    A bad file is a CORRUPT status, never an exception; the stream's own errors (OSError, a
    client's) propagate, for the back end to map.
    """
    try:
        header = read_state_header(stream, None, HEADER_ONLY_BOUND)  # the bound below, after the model is known
        if size != header.file_size:  # before a byte of tensor data is read
            raise StateFileError(f"truncated or padded: it has {size} bytes, its header describes {header.file_size}")
        if header.fingerprint != fingerprint:
            return StoredState(StoreStatus.OTHER_MODEL, None, path, f"made by model {header.fingerprint[:12]}, not {fingerprint[:12]}")
        if not header.holds(node_id):
            return StoredState(StoreStatus.CORRUPT, None, path, f"holds node {header.describe_node()}, not {_short_repr(node_id)}")
        if spec is not None:  # this model's exact shapes, before a byte of tensor data is read
            check_header_shapes(header, spec)
        check_read_bound(header, read_bound(spec, max_state_bytes))  # what reading it may allocate
        state = state_from_file(header, read_state_tensors(stream, header, mac_key), spec)
    except StateFileError as exc:
        return StoredState(StoreStatus.CORRUPT, None, path, str(exc))
    return checked_against_text(state, header, text, path)


def stored_entry(stream: _Reader, size: int, model: str, name: str, path: PurePath, spec: StateSpec | None = None,
                 max_state_bytes: int = DEFAULT_MAX_STATE_BYTES) -> StoreEntry:
    """The listing entry of the state file ``name`` (``<key>.safetensors``) in the model directory
    ``model`` (16 hex digits), from its header only: OK, or CORRUPT with the reason (a header that
    does not verify, a size other than it describes, a file misplaced under another node or model).
    ``spec``: the model's shapes (without it, headers are read whatever size they describe)."""
    try:
        header = read_state_header(stream, spec, read_bound(spec, max_state_bytes) if spec else HEADER_ONLY_BOUND)
    except StateFileError as exc:
        return StoreEntry(path, model, StoreStatus.CORRUPT, detail=str(exc))
    id_hash = header.node_id_sha256
    if size != header.file_size:
        detail = f"truncated or padded: the file has {size} bytes, its header describes {header.file_size}"
    elif header.fingerprint[:16] != model or id_hash[:32] != name[:32]:
        detail = "misplaced: the file's header names another node or model than its path"
    else:
        return StoreEntry(path, model, StoreStatus.OK, header.node_id, id_hash)
    return StoreEntry(path, model, StoreStatus.CORRUPT, header.node_id, id_hash, detail)
