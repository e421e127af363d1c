"""StateStore: safetensors records keyed by (node id, model fingerprint); atomic, checksummed, locked."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading

import pytest
import torch
from safetensors import safe_open

from picaso_rag import PicasoError, StateStore, StoreStatus
from picaso_rag.store import _checksum

from .conftest import TEXTS, make_engine


@pytest.fixture(scope="module")
def states(engine):
    return engine.encode(TEXTS[:3])


@pytest.fixture(scope="module")
def other_engine(tokenizer):
    return make_engine(tokenizer, seed=7)  # same shapes, other weights: another fingerprint


def assert_same_state(a, b):
    for name in ("ssm", "conv", "log_decay"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.n_tokens, a.fingerprint) == (b.n_tokens, b.fingerprint)


def test_round_trip_is_bitwise_and_plain_safetensors(tmp_path, engine, states):
    store = StateStore(tmp_path)
    path = store.put("node/with:odd chars?", states[0], text=TEXTS[0])
    found = store.get("node/with:odd chars?", engine.fingerprint, text=TEXTS[0])
    assert found.ok and found.path == path
    assert_same_state(found.state, states[0])
    # a plain safetensors file, readable by any safetensors reader (no pickle involved)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"ssm", "conv", "log_decay"}
        meta = f.metadata()
    assert meta["node_id"] == "node/with:odd chars?" and meta["fingerprint"] == engine.fingerprint
    assert meta["format"] == "picaso-state/1" and len(meta["checksum"]) == 64
    assert path.name.endswith(".safetensors") and "/" not in path.name and engine.fingerprint[:16] in str(path)
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        json.loads(f.read(header_len))  # the header is JSON, the rest raw tensor bytes


def test_missing_other_model_and_stale(tmp_path, engine, other_engine, states):
    store = StateStore(tmp_path)
    assert store.get("nope", engine.fingerprint).status is StoreStatus.MISSING

    foreign = other_engine.encode([TEXTS[0]])[0]
    store.put("n1", foreign, text=TEXTS[0])
    found = store.get("n1", engine.fingerprint, text=TEXTS[0])
    assert found.status is StoreStatus.OTHER_MODEL and found.state is None and "other models" in found.detail

    # a foreign file placed at this model's path (copied by hand) is recognised too
    store.put("n1", states[0], text=TEXTS[0])
    shutil.copy(store.path("n1", other_engine.fingerprint), store.path("n1", engine.fingerprint))
    found = store.get("n1", engine.fingerprint)
    assert found.status is StoreStatus.OTHER_MODEL and "made by model" in found.detail

    store.put("n2", states[1], text=TEXTS[1])
    assert store.get("n2", engine.fingerprint, text=TEXTS[1]).ok
    stale = store.get("n2", engine.fingerprint, text=TEXTS[1] + " (edited)")
    assert stale.status is StoreStatus.STALE and stale.state is None


def _corruptions(data: bytes):
    header_len = struct.unpack("<Q", data[:8])[0]
    body = 8 + header_len
    flipped = bytearray(data)
    flipped[body + 5] ^= 0x01  # one bit of the ssm bytes
    header = json.loads(data[8:body])
    header["__metadata__"]["n_tokens"] = str(int(header["__metadata__"]["n_tokens"]) + 1)
    new_header = json.dumps(header).encode()
    edited = struct.pack("<Q", len(new_header)) + new_header + data[body:]
    return {
        "empty": b"",
        "cut in the length": data[:5],
        "cut in the header": data[:8 + header_len // 2],
        "cut in the tensors": data[:len(data) - 7],
        "bit flip": bytes(flipped),
        "metadata edited": edited,
        "garbage header": struct.pack("<Q", 40) + b"{not json" + b" " * 31 + data[body:],
        "huge header length": struct.pack("<Q", 1 << 40) + data[8:],
        "appended bytes": data + b"\x00" * 16,
    }


def test_corrupted_files_are_detected_never_loaded(tmp_path, engine, states):
    store = StateStore(tmp_path)
    path = store.put("n", states[0], text=TEXTS[0])
    good = path.read_bytes()
    for what, data in _corruptions(good).items():
        path.write_bytes(data)
        found = store.get("n", engine.fingerprint, text=TEXTS[0])
        assert found.status is StoreStatus.CORRUPT and found.state is None, what
        assert found.detail, what
    path.write_bytes(good)
    assert store.get("n", engine.fingerprint).ok


def test_nan_state_and_misplaced_file_are_corrupt(tmp_path, engine, states):
    from safetensors.torch import save

    store = StateStore(tmp_path)
    path = store.put("n", states[0])
    bad = {k: v.clone() for k, v in states[0].tensors().items()}
    bad["ssm"][0, 0, 0, 0] = float("nan")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta["checksum"] = _checksum(bad, meta)  # a consistent file that holds a NaN
    path.write_bytes(save(bad, metadata=meta))
    found = store.get("n", engine.fingerprint)
    assert found.status is StoreStatus.CORRUPT and "NaN" in found.detail

    store.put("a", states[0])
    target = store.path("b", engine.fingerprint)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(store.path("a", engine.fingerprint), target)  # node a's file under node b's name
    found = store.get("b", engine.fingerprint)
    assert found.status is StoreStatus.CORRUPT and "holds node 'a'" in found.detail

    with pytest.raises(PicasoError, match="NaN"):
        store.put("n", type(states[0])(bad["ssm"], bad["conv"], bad["log_decay"], 3, engine.fingerprint))


def test_failed_write_leaves_the_old_file_and_no_temp_files(tmp_path, engine, states, monkeypatch):
    store = StateStore(tmp_path)
    path = store.put("n", states[0])
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        store.put("n", states[1])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert_same_state(store.get("n", engine.fingerprint).state, states[0])


def test_concurrent_writers_readers_and_deleters(tmp_path, engine, states):
    """Readers only ever see a whole state or none: never a half-written file."""
    store = StateStore(tmp_path)
    seen: list[StoreStatus] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(i):
        try:
            for _ in range(25):
                store.put("shared", states[i % len(states)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def deleter():
        for _ in range(15):
            store.delete("shared")

    def reader():
        while not stop.is_set():
            found = store.get("shared", engine.fingerprint)
            seen.append(found.status)
            if found.ok:
                assert any(torch.equal(found.state.ssm, s.ssm) for s in states)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)] + [threading.Thread(target=deleter)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers + threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors
    assert seen and set(seen) <= {StoreStatus.OK, StoreStatus.MISSING}, set(seen)
    store.put("shared", states[0])
    assert store.get("shared", engine.fingerprint).ok
    leftovers = [p for p in tmp_path.rglob("*.tmp")]
    assert not leftovers


def test_delete_prune_and_listing(tmp_path, engine, other_engine, states):
    store = StateStore(tmp_path)
    for i, s in enumerate(states):
        store.put(f"n{i}", s)
    store.put("n0", other_engine.encode([TEXTS[0]])[0])
    assert sorted(store.node_ids(engine.fingerprint)) == ["n0", "n1", "n2"]
    assert len(store.fingerprints()) == 2
    assert store.delete("n0", engine.fingerprint) == 1
    assert store.get("n0", engine.fingerprint).status is StoreStatus.OTHER_MODEL
    assert store.delete("n0") == 1 and store.delete("n0") == 0
    assert store.get("n0", engine.fingerprint).status is StoreStatus.MISSING
    assert store.prune(keep={"n2"}) == 1
    assert list(store.node_ids()) == ["n2"]
    assert store.delete_many(["n2", "n9"]) == 1


def test_storage_dtype(tmp_path, engine, states):
    full, half = StateStore(tmp_path / "fp32"), StateStore(tmp_path / "bf16", dtype=torch.bfloat16)
    p32, p16 = full.put("n", states[2]), half.put("n", states[2])
    assert p16.stat().st_size < 0.6 * p32.stat().st_size
    loaded = half.get("n", engine.fingerprint).state
    assert loaded.ssm.dtype == torch.bfloat16 and loaded.log_decay.dtype == torch.float32
    assert torch.allclose(loaded.ssm.float(), states[2].ssm, rtol=1e-2, atol=1e-3)
    assert torch.equal(loaded.log_decay, states[2].log_decay)


def test_bad_input_names_the_fix(tmp_path, engine, states):
    store = StateStore(tmp_path)
    with pytest.raises(PicasoError, match="non-empty string"):
        store.put("", states[0])
    with pytest.raises(PicasoError, match="engine.fingerprint"):
        store.get("n", "not-a-fingerprint")
    with pytest.raises(PicasoError, match="list of node ids"):
        store.delete_many("n1")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PicasoError, match="not a directory"):
        StateStore(tmp_path / "file")
    with pytest.raises(PicasoError, match="not a state precision.*precision='bf16'"):
        StateStore(tmp_path / "x", dtype=torch.int8)
    assert StateStore(tmp_path / "y", dtype=torch.bfloat16).precision == "bf16"  # the older spelling: one meaning


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_all_finite_by_exponent_bits_finds_nan_and_inf(dtype):
    from picaso_rag.state import all_finite

    t = torch.randn(1000).to(dtype)
    assert all_finite(t) and all_finite(torch.full((3,), torch.finfo(dtype).max, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[537] = bad
        assert not all_finite(u)


def test_get_many_equals_get_in_order(tmp_path, engine, states):
    store = StateStore(tmp_path)
    for i, state in enumerate(states):
        store.put(f"n{i}", state, text=f"text {i}")
    ids = [f"n{i}" for i in range(len(states))] + ["missing"]
    texts = [f"text {i}" for i in range(len(states))] + [None]
    many = store.get_many(ids, engine.fingerprint, texts)
    one_by_one = [store.get(n, engine.fingerprint, t) for n, t in zip(ids, texts)]
    assert [f.status for f in many] == [f.status for f in one_by_one] == [StoreStatus.OK] * len(states) + [StoreStatus.MISSING]
    for a, b in zip(many[:-1], one_by_one[:-1]):
        assert torch.equal(a.state.ssm, b.state.ssm) and a.state.n_tokens == b.state.n_tokens


def test_deletion_wins_over_a_racing_write_back(tmp_path):
    """A query that found a node's state missing encodes it and writes it back; if the node was deleted
    from the index in between (node_deleted), the write-back writes nothing. Ingestion (a plain put) brings it back."""
    import torch

    from picaso_rag import State

    store = StateStore(tmp_path)
    fp = "ab" * 32
    state = State(torch.zeros(1, 2, 4, 8), torch.zeros(1, 24, 3), torch.zeros(1, 2), 5, fp)
    store.put("node", state, text="t")
    assert store.get("node", fp, text="t").ok
    store.delete("node", node_deleted=True)  # the index deletes the node (a query retrieved it a moment before)
    assert store.put("node", state, text="t", write_back=True) is None  # the query's write-back
    assert store.get("node", fp, text="t").status is StoreStatus.MISSING and not store.path("node", fp).exists()
    assert store.put("node", state, text="t") == store.path("node", fp)  # re-ingested: stored again
    assert store.put("other", state, text="t", write_back=True) == store.path("other", fp)  # never deleted: written
    store.delete("node")  # a state file removed (lost, or cleaned up), the node still indexed: not a deletion of it
    assert store.put("node", state, text="t", write_back=True) == store.path("node", fp)
    assert sorted(store.node_ids(fp)) == ["node", "other"]


def test_one_declared_interface_and_every_old_import_path(tmp_path, engine, states):
    """The format (picaso_rag.state_file) and the interface (picaso_rag.store_api) each live in one
    place; the local store and the budgeted tier implement the interface; picaso_rag.store still
    exports every name it did, as the same objects."""
    import inspect

    import picaso_rag.state_file as state_file
    import picaso_rag.store as store_module
    from picaso_rag.cache import BudgetedStore
    from picaso_rag.cache import StateBackend as CacheBackend
    from picaso_rag.store_api import StateBackend, StoredState

    store = StateStore(tmp_path)
    budgeted = BudgetedStore(store, 1 << 30)
    assert isinstance(store, StateBackend) and isinstance(budgeted, StateBackend) and CacheBackend is StateBackend
    for name in ("FORMAT", "MAX_HEADER_BYTES", "MAX_INLINE_NODE_ID_BYTES", "DEFAULT_MAX_STATE_BYTES", "StateHeader",
                 "encode_state_file", "decode_state_file", "read_state_header", "read_state_tensors", "parse_state_header",
                 "state_from_file", "state_header_length", "load_mac_key", "state_key", "node_id_sha256", "text_sha256",
                 "checked_against_text", "check_header_shapes", "check_storable", "read_bound", "_checksum"):
        assert getattr(store_module, name) is getattr(state_file, name), name
    assert store_module.StoredState is StoredState and store_module.StoreStatus is StoreStatus
    # the format module knows no file system: no os.open, no directories
    assert "os.open(" not in inspect.getsource(state_file).split("def load_mac_key")[0]
    # the budgeted tier passes every call through (and the spec with it)
    budgeted.put("n", states[0], text=TEXTS[0])
    assert budgeted.get("n", engine.fingerprint, text=TEXTS[0], spec=engine.state_spec).ok
    assert list(budgeted.node_ids()) == ["n"] and budgeted.fingerprints() == [engine.fingerprint[:16]]
    assert [e.node_id for e in budgeted.entries(engine.fingerprint, spec=engine.state_spec)] == ["n"]
    assert budgeted.prune(keep=set()) == 1 and budgeted.bytes == 0 and budgeted.remove_temp_files() == 0
