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
thread. A state larger than a tier's budget is never put in that tier (a state larger than both
is not cached at all; the caller still has and uses it). Every method takes one lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from .errors import PicasoError
from .state import State


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
    return replace(state, ssm=state.ssm.pin_memory(), conv=state.conv.pin_memory(), log_decay=state.log_decay.pin_memory())
