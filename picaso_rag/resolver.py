"""StateResolver: the states of a query's documents, from memory, the stores or encoded now.

Usage::

    resolver = StateResolver(engine, StateCache(2 << 30, device="cuda"), [StateStore("./states")], StateWriter())
    resolution = resolver.resolve([DocumentRef.of(text, node_id) for text, node_id in retrieved])
    context = engine.compose(resolution.states, method="picaso-s")
    resolution.stats    # states_cached / states_loaded / states_encoded, why each was encoded, timings

The one path every caller takes (the LlamaIndex LLM, the OpenAI server, the Ray replicas, the
benchmarks): the memory tiers (a :class:`~picaso_rag.cache.StateCache` keyed by the text's
digest), then each store nearest first (e.g. ``[BudgetedStore(local, budget), S3StateStore(...)]``),
then every state still missing encoded in one batch. States encoded now are written back to every
store, and a state found in a farther store is copied to the nearer ones, by a :class:`StateWriter`
in the background: the answer never waits for a disk or the network, and what waits is bounded
(states and bytes; past the bound a state is not queued, and is encoded again on its next miss).

A stored state that is another model's, corrupt or stale counts as missing (re-encoded;
``stats["states_rejected"]`` says why); a store that cannot be reached
(:class:`~picaso_rag.errors.StoreUnavailableError`) is skipped for this query
(``stats["store_errors"]``) and its states are encoded. A write-back that fails (a full or
read-only disk, a store that is down) is logged and counted by the writer, never raised: the answer
already has its state. A node deleted between its retrieval and its write-back stays deleted
(``put(write_back=True)``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .cache import StateCache
from .errors import PicasoError, StoreUnavailableError
from .state import State
from .state_file import text_sha256
from .store_api import StateBackend, StoreStatus

logger = logging.getLogger("picaso_rag.resolver")


@dataclass(frozen=True)
class DocumentRef:
    """One document of a query: the exact text the model reads for it, its digest and its node id.

    ``node_id`` is None for a text that is not stored (an ad hoc document): it is encoded and kept
    in memory only. Usage: ``DocumentRef.of(text, node_id)``.
    """

    text: str
    digest: str  # sha256 hex of text: the memory tier's key
    node_id: str | None = None

    def __post_init__(self) -> None:
        # the digest keys the memory tier shared by every request: one that is not this text's would
        # serve another text's state
        if self.digest != text_sha256(self.text):
            raise PicasoError("a DocumentRef's digest is the sha256 of its text; build it with DocumentRef.of(text, node_id).")

    @classmethod
    def of(cls, text: str, node_id: str | None = None) -> "DocumentRef":
        return cls(text, text_sha256(text), node_id)

    @property
    def key(self) -> str:
        """The short key stored in node metadata and reported in responses."""
        return self.digest[:16]


@dataclass(frozen=True)
class WriterStats:
    queued: int  # states accepted for writing
    written: int  # (node, store) writes done
    dropped: int  # states refused because the queue was full (they are encoded again on their next miss)
    failed: int  # writes that raised (logged; the answer never needed them)
    pending: int  # states waiting now
    pending_bytes: int


class StateWriter:
    """Writes states to one or more stores from a background thread, through a bounded queue.

    :meth:`submit` never blocks and never raises for a store's failure: a full queue drops the
    state (it is encoded again on its next miss), a failed write is logged and counted. So a
    query's answer never waits for the disk or the network. Bounds: ``max_pending`` states and
    ``max_pending_bytes`` (a state of a 2.7B model is 82 MiB in bf16; queued states stay in the
    memory they were in, GPU included, until written). Tensors move to the CPU in the writer's
    thread, on a CUDA stream of its own (ordered after the state was made by an event recorded at
    submit), so the copy never queues between the kernels of the answer being computed.

    The thread starts with the first state and ends after ``idle_s`` seconds without one, so an
    idle writer (one per LLM) holds no thread.

    Usage: ``writer = StateWriter(); writer.submit([store], node_id, state, text); writer.flush()``.
    """

    def __init__(self, max_pending: int = 64, max_pending_bytes: int = 1 << 30, idle_s: float = 5.0,
                 name: str = "picaso-state-writer"):
        if max_pending < 1 or max_pending_bytes < 1:
            raise PicasoError(f"max_pending and max_pending_bytes must be >= 1, got {max_pending} and {max_pending_bytes}.")
        self.max_pending, self.max_pending_bytes = max_pending, max_pending_bytes
        self._queue: deque[tuple[tuple[StateBackend, ...], str, State, str | None, object]] = deque()
        self._copy_stream = None  # created on the first CUDA state
        self._bytes = 0
        self._busy = 0  # items taken off the queue, not yet written
        self._cond = threading.Condition()
        self._closed = False
        self._counts = dict.fromkeys(("queued", "written", "dropped", "failed"), 0)
        self._idle_s, self._name = idle_s, name
        self._thread: threading.Thread | None = None

    def submit(self, stores: Sequence[StateBackend], node_id: str, state: State, text: str | None = None) -> bool:
        """Queue ``state`` for writing to each of ``stores``; False (dropped) if the queue is full or closed."""
        stores = tuple(stores)
        if not stores:
            return True
        with self._cond:
            if (self._closed or len(self._queue) + self._busy >= self.max_pending  # the one being written counts
                    or self._bytes + state.nbytes > self.max_pending_bytes):
                self._counts["dropped"] += 1
                return False
            ready = None
            if state.device.type == "cuda":  # the copy must wait for the kernels that made the state
                ready = torch.cuda.Event()
                ready.record()
            self._queue.append((stores, node_id, state, text, ready))
            self._bytes += state.nbytes
            self._counts["queued"] += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued state is written (or failed); False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued, then stop the thread (later submits are dropped)."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)

    def stats(self) -> WriterStats:
        with self._cond:
            return WriterStats(**self._counts, pending=len(self._queue) + self._busy, pending_bytes=self._bytes)

    def _to_host(self, state: State, ready: object) -> State:
        if state.device.type != "cuda":
            return state.to("cpu")
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=state.device)
        with torch.cuda.stream(self._copy_stream):
            if ready is not None:
                self._copy_stream.wait_event(ready)
            host = state.to("cpu")  # synchronous on this stream only
        return host

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed, self._idle_s)
                if not self._queue:  # closed, or idle: the next submit starts a new thread
                    self._thread = None
                    return
                stores, node_id, state, text, ready = self._queue.popleft()
                self._busy += 1
            try:
                host = state if state.device.type == "cpu" else self._to_host(state, ready)
                for store in stores:
                    try:
                        store.put(node_id, host, text=text, write_back=True)  # a deleted node stays deleted
                        written, failed = 1, 0
                    except Exception as exc:  # noqa: BLE001 - a write-back never fails a query
                        logger.warning("write-back of node %s to %r failed: %s", node_id, store, exc)
                        written, failed = 0, 1
                    with self._cond:
                        self._counts["written"] += written
                        self._counts["failed"] += failed
            finally:
                with self._cond:
                    self._busy -= 1
                    self._bytes -= state.nbytes
                    self._cond.notify_all()


@dataclass
class Resolution:
    """The states of a query's documents, in order, and how each was found (``stats``)."""

    states: list[State]
    stats: dict = field(default_factory=dict)


class StateResolver:
    """States of a query's documents: memory, then the stores in order, then encoded in one batch.

    See the module docstring. ``cache``: the memory tiers (None: none); ``stores``: nearest first;
    ``writer``: writes encoded states back (None: nothing is written); ``encode_batch_size``: texts
    per encoder batch. Safe to call from several threads.
    """

    def __init__(self, engine, cache: StateCache | None = None, stores: Sequence[StateBackend] = (),
                 writer: StateWriter | None = None, encode_batch_size: int = 16):
        if encode_batch_size < 1:
            raise PicasoError(f"encode_batch_size must be >= 1, got {encode_batch_size}.")
        self.engine, self.cache, self.stores, self.writer = engine, cache, list(stores), writer
        self.encode_batch_size = encode_batch_size

    def resolve(self, docs: Sequence[DocumentRef]) -> Resolution:
        """The states of ``docs``, in order (equal texts share one state); ``stats`` says where each came from."""
        if any(not isinstance(d, DocumentRef) for d in docs):
            raise PicasoError("resolve takes DocumentRef objects: DocumentRef.of(text, node_id).")
        start = time.perf_counter()
        engine = self.engine
        states: list[State | None] = [None] * len(docs)
        todo: dict[str, list[int]] = {}  # digest -> indices still without a state (a repeat joins its first)
        cached = 0
        for i, doc in enumerate(docs):
            state = self.cache.get(doc.digest) if self.cache is not None and doc.digest not in todo else None
            if state is not None:
                states[i], cached = state, cached + 1
            else:
                todo.setdefault(doc.digest, []).append(i)
        reasons: Counter[str] = Counter()
        last_status: dict[str, str] = {}
        rejected: list[dict] = []
        store_errors: list[dict] = []
        loaded_per_store = [0] * len(self.stores)
        spec = engine.state_spec  # what a stored state must be: this model's shapes, its longest document
        for level, store in enumerate(self.stores):
            asked = [digest for digest, idx in todo.items() if docs[idx[0]].node_id]
            if not asked:
                break
            firsts = [docs[todo[digest][0]] for digest in asked]
            try:
                found = store.get_many([d.node_id for d in firsts], engine.fingerprint, [d.text for d in firsts], spec=spec)
            except StoreUnavailableError as exc:  # a store that is down is a miss, never a failed query
                logger.warning("state store %r unavailable, its states are encoded instead: %s", store, exc)
                store_errors.append({"store": level, "error": str(exc)[:300]})
                for digest in asked:
                    last_status[digest] = "store unavailable"
                continue
            for digest, doc, f in zip(asked, firsts, found):
                if not f.ok:
                    last_status[digest] = f.status.value
                    if f.status is not StoreStatus.MISSING:
                        rejected.append({"node_id": doc.node_id, "store": level, "status": f.status.value, "detail": f.detail})
                        log = logger.warning if f.status is StoreStatus.CORRUPT else logger.info
                        log("state of node %s is %s (%s): re-encoding it from the node text", doc.node_id,
                            f.status.value, f.detail)
                    continue
                state = f.state.to(engine.device, dtype=engine.model.dtype)
                self._keep(digest, state)
                indices = todo.pop(digest)
                for i in indices:
                    states[i] = state
                loaded_per_store[level] += 1
                cached += len(indices) - 1  # a repeat reads it after its first occurrence: from memory
                if self.writer is not None and level > 0:  # copy to the nearer tiers, in the background
                    self.writer.submit(self.stores[:level], doc.node_id, f.state, doc.text)
        load_ms = (time.perf_counter() - start) * 1000
        encode_start = time.perf_counter()
        queued = not_queued = 0
        if todo:
            digests = list(todo)
            fresh = engine.encode([docs[todo[d][0]].text for d in digests], batch_size=self.encode_batch_size)
            for digest, state in zip(digests, fresh):
                self._keep(digest, state)
                first = docs[todo[digest][0]]
                reasons["no node id" if not first.node_id else "not stored" if not self.stores
                        else last_status.get(digest, StoreStatus.MISSING.value)] += 1
                for i in todo[digest]:
                    states[i] = state
                node_ids = dict.fromkeys(docs[i].node_id for i in todo[digest] if docs[i].node_id)
                for node_id in node_ids:  # equal texts share one encoding, each node keeps its record
                    if self.writer is None or not self.stores:
                        continue
                    if self.writer.submit(self.stores, node_id, state, first.text):
                        queued += 1
                    else:
                        not_queued += 1
        stats = {"states_cached": cached, "states_loaded": sum(loaded_per_store), "loaded_per_store": loaded_per_store,
                 "states_encoded": len(todo), "encode_reasons": dict(reasons), "states_rejected": rejected,
                 "store_errors": store_errors, "write_back_queued": queued, "write_back_not_queued": not_queued,
                 "load_ms": round(load_ms, 3), "encode_ms": round((time.perf_counter() - encode_start) * 1000, 3)}
        return Resolution(states, stats)  # type: ignore[arg-type]

    def _keep(self, digest: str, state: State) -> None:
        if self.cache is not None:
            self.cache.put(digest, state)
