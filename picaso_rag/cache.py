"""StateCache: recently used document states in memory, in two tiers with byte budgets.

Usage::

    cache = StateCache(device_bytes=2 << 30, host_bytes=8 << 30, device="cuda")
    cache.put("node-1", state)                 # kept on the device tier (moved there if needed)
    state = cache.get("node-1", device="cuda")  # None on a miss
    cache.stats()                              # hits, misses, evictions, bytes per tier

Tiers: the *device* tier holds states on ``device`` (the engine's device, e.g. CUDA); the *host*
tier holds them in CPU memory (pinned when CUDA is available, so moving one back to the GPU is a
fast asynchronous copy). A new state enters the device tier; past its budget the least recently
used states move down to the host tier, and past the host budget the least recently used host
states are dropped. A host hit moves the state back up. With ``device="cpu"`` both tiers are CPU
memory (how the tests run the device tier without a GPU).

Budgets are hard: the bytes held by a tier never exceed its budget, at any moment, from any
thread. A state counts its real bytes (``State.nbytes``): a hybrid model's grows with its document
(its keys and values), so a tier holds fewer long hybrid states than short ones. A state larger than a tier's budget is never put in that tier (a state larger than both
is not cached at all; the caller still has and uses it). Every method takes one lock.

:class:`BudgetedStore` gives a store tier (the local disk, typically) a byte budget with LRU
eviction. What looks states up in these tiers, encodes the missing ones and writes them back is
:class:`picaso_rag.resolver.StateResolver`. See docs/scaling.md.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .errors import PicasoError
from .state import State, StateSpec
from .store_api import StateBackend, StoreEntry, StoredState



@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`StateCache` since it was created (or since :meth:`StateCache.clear`)."""

    device_hits: int
    host_hits: int
    misses: int
    device_evictions: int  # device -> host moves (or drops, when the host tier cannot take the state)
    host_evictions: int  # host -> dropped
    not_cached: int  # puts of a state larger than every budget
    device_bytes: int
    host_bytes: int
    device_entries: int
    host_entries: int
    device_budget: int
    host_budget: int

    @property
    def hits(self) -> int:
        return self.device_hits + self.host_hits


class _Tier:
    """One LRU tier: states by key, oldest first, and the bytes they hold."""

    def __init__(self, budget: int):
        self.budget = budget
        self.states: OrderedDict[str, State] = OrderedDict()
        self.bytes = 0

    def pop(self, key: str) -> State | None:
        state = self.states.pop(key, None)
        if state is not None:
            self.bytes -= state.nbytes
        return state

    def push(self, key: str, state: State) -> None:
        self.states[key] = state
        self.bytes += state.nbytes

    def pop_oldest(self) -> tuple[str, State]:
        key, state = self.states.popitem(last=False)
        self.bytes -= state.nbytes
        return key, state


class StateCache:
    """States by key (any string, e.g. a node id or a text digest), LRU over a device and a host tier.

    ``device_bytes``/``host_bytes``: the budget of each tier (0 disables a tier). ``device``: the
    device of the device tier (default: CPU). ``pin_memory``: pin host-tier tensors (default: when
    CUDA is available). See the module docstring.

    Usage: ``cache = StateCache(1 << 30, 4 << 30, device=engine.device); cache.put(key, state)``.
    """

    def __init__(self, device_bytes: int, host_bytes: int = 0, device: str | torch.device = "cpu",
                 pin_memory: bool | None = None):
        if device_bytes < 0 or host_bytes < 0:
            raise PicasoError(f"cache budgets must be >= 0 bytes (0 disables a tier), got {device_bytes} and {host_bytes}.")
        self.device = torch.device(device)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._device = _Tier(device_bytes)
        self._host = _Tier(host_bytes)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("device_hits", "host_hits", "misses", "device_evictions", "host_evictions",
                                      "not_cached"), 0)

    def __repr__(self) -> str:
        return f"StateCache(device_bytes={self._device.budget}, host_bytes={self._host.budget}, device={str(self.device)!r})"

    # ------------------------------------------------------------------------------ public
    def get(self, key: str, device: str | torch.device | None = None) -> State | None:
        """The state cached under ``key`` on ``device`` (default: the device tier's), or None.

        A hit makes the state the most recently used; a host-tier hit moves it back to the device tier.
        """
        with self._lock:
            state = self._device.states.get(key)
            if state is not None:
                self._device.states.move_to_end(key)
                self._counts["device_hits"] += 1
            else:
                state = self._host.pop(key)
                if state is None:
                    self._counts["misses"] += 1
                    return None
                self._counts["host_hits"] += 1
                promoted = self._admit(key, state)
                if promoted is not None:
                    state = promoted
                else:  # does not fit the device tier: stays on the host, now most recent
                    self._host.push(key, state)
        target = torch.device(device) if device is not None else self.device
        # asynchronous only towards CUDA (from pinned memory); a copy to the CPU must finish before use
        return state if _on(state, target) else state.to(target, non_blocking=target.type == "cuda")

    def put(self, key: str, state: State) -> None:
        """Cache ``state`` under ``key`` (replacing what was there) as the most recently used.

        A state larger than both budgets is not cached (counted in ``stats().not_cached``).
        """
        if not isinstance(key, str):
            raise PicasoError(f"cache keys are strings (a node id or a text digest), got {type(key).__name__}.")
        with self._lock:
            self._device.pop(key)
            self._host.pop(key)
            if self._admit(key, state) is None and not self._to_host(key, state):
                self._counts["not_cached"] += 1

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._device.states or key in self._host.states

    def __len__(self) -> int:
        with self._lock:
            return len(self._device.states) + len(self._host.states)

    def keys(self, tier: str = "device") -> list[str]:
        """Keys of one tier ("device" or "host"), least recently used first."""
        tiers = {"device": self._device, "host": self._host}
        if tier not in tiers:
            raise PicasoError(f"unknown tier {tier!r}; use 'device' or 'host'.")
        with self._lock:
            return list(tiers[tier].states)

    def stats(self) -> CacheStats:
        """A snapshot of the counters and the bytes per tier."""
        with self._lock:
            return CacheStats(**self._counts, device_bytes=self._device.bytes, host_bytes=self._host.bytes,
                              device_entries=len(self._device.states), host_entries=len(self._host.states),
                              device_budget=self._device.budget, host_budget=self._host.budget)

    def clear(self) -> None:
        """Drop every state and reset the counters."""
        with self._lock:
            self._device, self._host = _Tier(self._device.budget), _Tier(self._host.budget)
            self._counts = dict.fromkeys(self._counts, 0)

    # ----------------------------------------------------------------------------- internal
    def _admit(self, key: str, state: State) -> State | None:
        """Put ``state`` in the device tier, moving older states down first; None if it cannot fit."""
        if state.nbytes > self._device.budget:
            return None
        # make room before copying, so the tier's bytes never exceed the budget, even transiently
        while self._device.bytes + state.nbytes > self._device.budget:
            old_key, old = self._device.pop_oldest()
            self._counts["device_evictions"] += 1
            self._to_host(old_key, old)
        if not _on(state, self.device):
            state = state.to(self.device, non_blocking=self.device.type == "cuda")
        self._device.push(key, state)
        return state

    def _to_host(self, key: str, state: State) -> bool:
        """Put ``state`` in the host tier (copied to CPU memory), dropping the oldest; False if it cannot fit."""
        if state.nbytes > self._host.budget:
            return False
        while self._host.bytes + state.nbytes > self._host.budget:
            self._host.pop_oldest()
            self._counts["host_evictions"] += 1
        if state.device.type != "cpu":
            state = state.to("cpu")
        if self.pin_memory and not state.ssm.is_pinned():
            state = _pinned(state)
        self._host.push(key, state)
        return True


def _on(state: State, device: torch.device) -> bool:
    here = state.device
    return here.type == device.type and (device.index is None or here.index == device.index)


def _pinned(state: State) -> State:
    pinned = replace(state, ssm=state.ssm.pin_memory(), conv=state.conv.pin_memory(), log_decay=state.log_decay.pin_memory())
    if state.has_keys:  # the keys and values: a long document's state is mostly them
        pinned = replace(pinned, keys=state.keys.pin_memory(), values=state.values.pin_memory())
    return pinned


# ============================================================== the store as a cache with a fallback
class BudgetedStore:
    """A store with a byte budget: past it, the least recently used states are deleted.

    Wraps any store (the local disk tier, typically) and is one itself
    (:class:`~picaso_rag.store_api.StateBackend`: every other method passes through). Counted:
    the bytes of each state as written (the file's size where the store has ``path``, else the
    state's tensor bytes), for the states
    this object has written or read, and, at start, the files ``store.entries()`` lists (oldest
    modification first). One process should own a budget (two budgets over one directory each
    count only what they saw). Usage: ``disk = BudgetedStore(StateStore("/nvme/states"), 2 << 40)``.
    """

    def __init__(self, store: StateBackend, max_bytes: int):
        if max_bytes < 0:
            raise PicasoError(f"max_bytes must be >= 0, got {max_bytes}.")
        self.store, self.max_bytes = store, max_bytes
        self._lru: OrderedDict[tuple[str, str], int] = OrderedDict()  # (node id, fingerprint[:16]) -> bytes
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0
        for node_id, fingerprint, size in _existing_files(store):
            self._lru[(node_id, fingerprint)] = size
            self._bytes += size

    def __repr__(self) -> str:
        return f"BudgetedStore({self.store!r}, max_bytes={self.max_bytes})"

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    @property
    def mac(self) -> bool:
        return bool(getattr(self.store, "mac", False))

    def get(self, node_id: str, fingerprint: str, text: str | None = None, spec: StateSpec | None = None) -> StoredState:
        return self.get_many([node_id], fingerprint, [text], spec=spec)[0]

    def get_many(self, node_ids: Sequence[str], fingerprint: str, texts: Sequence[str | None] | None = None,
                 spec: StateSpec | None = None) -> list[StoredState]:
        found = self.store.get_many(node_ids, fingerprint, texts, spec=spec)
        with self._lock:
            for node_id, f in zip(node_ids, found):
                if f.ok and (node_id, fingerprint[:16]) in self._lru:
                    self._lru.move_to_end((node_id, fingerprint[:16]))
        return found

    def fingerprints(self) -> list[str]:
        return self.store.fingerprints()

    def entries(self, fingerprint: str | None = None, spec: StateSpec | None = None) -> Iterator[StoreEntry]:
        return self.store.entries(fingerprint, spec=spec)

    def node_ids(self, fingerprint: str | None = None) -> Iterator[str]:
        return self.store.node_ids(fingerprint)

    def delete_many(self, node_ids: Sequence[str], fingerprint: str | None = None, node_deleted: bool = False) -> int:
        if isinstance(node_ids, str):
            raise PicasoError("delete_many takes a list of node ids; for one id call delete(node_id).")
        return sum(self.delete(node_id, fingerprint, node_deleted) for node_id in node_ids)

    def prune(self, keep: Iterable[str]) -> int:
        keep = set(keep)
        removed = self.store.prune(keep)
        with self._lock:
            for key in [k for k in self._lru if k[0] not in keep]:
                self._bytes -= self._lru.pop(key)
        return removed

    def remove_temp_files(self) -> int:
        return self.store.remove_temp_files()

    def put(self, node_id: str, state: State, text: str | None = None, write_back: bool = False,
            spec: StateSpec | None = None) -> object:
        size = state.nbytes
        if size > self.max_bytes:
            return None  # larger than the whole budget: not kept in this tier
        result = self.store.put(node_id, state, text=text, write_back=write_back, spec=spec)
        if result is None:  # a deleted node: nothing written
            return None
        if hasattr(result, "stat"):
            try:
                size = result.stat().st_size
            except OSError:
                pass
        key = (node_id, state.fingerprint[:16])  # as a store names a model (what a scan of its files finds)
        with self._lock:
            self._bytes += size - self._lru.pop(key, 0)
            self._lru[key] = size
            victims = []
            while self._bytes > self.max_bytes and len(self._lru) > 1:
                old, old_size = self._lru.popitem(last=False)
                self._bytes -= old_size
                victims.append(old)
        for old_node, old_fingerprint in victims:
            self.store.delete(old_node, old_fingerprint)
            self.evictions += 1
        return result

    def delete(self, node_id: str, fingerprint: str | None = None, node_deleted: bool = False) -> int:
        with self._lock:
            for key in [k for k in self._lru if k[0] == node_id and (fingerprint is None or k[1] == fingerprint[:16])]:
                self._bytes -= self._lru.pop(key)
        return self.store.delete(node_id, fingerprint, node_deleted=node_deleted)


def _existing_files(store: StateBackend) -> list[tuple[str, str, int]]:
    """(node id, fingerprint, bytes) of a local store's files, oldest first (empty for other stores)."""

    entries = getattr(store, "entries", None)
    if entries is None:
        return []
    found = []
    for entry in entries():
        if getattr(entry, "node_id", None) and isinstance(entry.path, Path):  # a local file (not an object's name)
            try:
                info = entry.path.stat()
            except OSError:
                continue
            found.append((info.st_mtime, entry.node_id, entry.model, info.st_size))
    return [(node_id, model, size) for _, node_id, model, size in sorted(found)]
