"""Continuous batching: many requests, each read from its own (composed) state, decoded together.

A request is a prompt (token ids or text), the state it is read from (a composed PICASO state, a
document state, or None) and its own sampling parameters. One worker thread runs the loop:

1. **join**: waiting requests are read in one batched forward, each row from its own initial
   state (rows right-padded; padding never changes a state), and each gets its first token; the
   state after its prompt is copied into a free row of the decode batch;
2. **decode**: one :meth:`Mamba2LM.step` for every active row (on CUDA a graph replay at the
   smallest bucketed batch size >= the rows in use);
3. **leave**: a row that produced EOS, a stop string, its ``max_new_tokens`` or was cancelled
   is freed at once (the last row moves into the hole, so active rows stay a prefix of the batch).

Greedy tokens equal :meth:`PicasoEngine.generate`'s for every request (tests/test_scheduler.py);
sampling uses the same per-request seeded :class:`Sampler`, so seeded samples match too.

A hybrid model (:class:`~picaso_rag.hybrid_engine.HybridEngine`: Mamba-2 and attention layers)
gets a :class:`HybridScheduler` from the same ``Scheduler(engine, ...)`` call: each row also holds
its attention layers' keys and values (its documents', its prompt's, its generated tokens'), in a
padded batch buffer bounded by ``max_slot_tokens`` per row and ``max_kv_bytes`` in all; decoding is
batched over the rows with a key mask (tests/test_hybrid_serving.py). The Mamba-2 path is unchanged.

Usage::

    with Scheduler(engine, max_batch=64) as scheduler:
        request = scheduler.submit(" Question: ...\\nAnswer:", state=context, max_new_tokens=32, stop=["\\n"])
        for piece in request:            # text pieces as they are decoded (or pass on_event=...)
            print(piece, end="")
        print(request.result.finish_reason)
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .engine import Generation, PicasoEngine, Tokens
from .errors import PicasoError
from .generation import Sampler, SamplingParams, TextStream
from .graphs import HybridStepGraphs
from .state import State

_ids = itertools.count(1)
_END = object()

# bounds of a hybrid model's keys and values in the scheduler (HybridScheduler; Mamba-2 rows are fixed-size)
MAX_SLOT_TOKENS = 32_768  # keys per row: its documents' + prompt + max_new_tokens
MAX_KV_BYTES = 2 << 30  # the padded key/value buffer of all rows together


class QueueFullError(PicasoError):
    """The scheduler's waiting queue is full: retry later (an HTTP server answers 503)."""


class SchedulerClosedError(PicasoError):
    """The scheduler was closed; create a new one."""


class KVBudgetError(PicasoError):
    """A hybrid request whose keys and values could never fit the scheduler's bounds (an HTTP server answers 400)."""


@dataclass
class Timings:
    """perf_counter() instants of one request (seconds); None until reached."""

    submitted: float
    read: float | None = None  # prompt read, first token sampled
    first_token: float | None = None  # first text piece emitted
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per generated token (ITL = differences)


class _WindowedDecode:
    """``decode(ids)`` for a growing list of ids that re-decodes only the ids since the last
    complete character (``TextStream`` decodes all ids at every token: 128 tokens x 256 rows
    would cost milliseconds a step). Exact for tokenizers whose decoding is concatenative (byte-level
    BPE); :func:`_concatenative` checks that before it is used."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.cut, self.prefix = decode, 0, ""

    def __call__(self, ids: list[int]) -> str:
        tail = self.decode(ids[self.cut:])
        if len(ids) - self.cut >= 16 and not tail.endswith("\ufffd"):  # a complete character: fold it in
            self.prefix, self.cut = self.prefix + tail, len(ids)
            return self.prefix
        return self.prefix + tail


def _concatenative(engine: PicasoEngine) -> bool:
    """Whether decode(a + b) == decode(a) + decode(b) at every split of a sample text."""
    ids = engine.tokenize("Hello world, it's a test: caf\u00e9 \u6771\u4eac 42.\n  Done?")
    full = engine.tokenizer.decode(ids)
    return all(engine.tokenizer.decode(ids[:k]) + engine.tokenizer.decode(ids[k:]) == full for k in range(len(ids) + 1)
               if not engine.tokenizer.decode(ids[:k]).endswith("\ufffd"))


class Request:
    """One submitted generation. Iterate for its text pieces (blocking), or pass ``on_event`` to
    :meth:`Scheduler.submit` to receive ``(request, piece)`` calls from the worker thread (``piece``
    None once, at the end). ``result`` is a :class:`Generation` once ``done`` is set."""

    def __init__(self, prompt_ids: list[int], state: State | None, params: SamplingParams,
                 on_event: Callable[["Request", str | None], None] | None, decode: Callable[[list[int]], str],
                 windowed: bool = False):
        self.id = next(_ids)
        self.prompt_ids = prompt_ids
        self.state = state
        self.params = params
        self.sampler = Sampler(params)
        self.stream = TextStream(_WindowedDecode(decode) if windowed else decode, params.stop)
        self.timings = Timings(time.perf_counter())
        self.result: Generation | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.text = ""
        self._on_event = on_event
        self._pieces: queue.SimpleQueue | None = queue.SimpleQueue() if on_event is None else None
        self._cancelled = threading.Event()
        self.last_token = 0
        # hybrid models (HybridScheduler): keys the row may hold at most, holds now, and its RoPE position
        self.kv_reserved = self.kv_len = self.position = 0

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating (a client went away): the row is freed at the next step."""
        self._cancelled.set()

    def wait(self, timeout: float | None = None) -> Generation:
        """Block until finished; the :class:`Generation` (raises the worker's error, if any)."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]

    def __iter__(self) -> Iterator[str]:
        if self._pieces is None:
            raise PicasoError("this request delivers its pieces to on_event; iterate only requests submitted without it.")
        while True:
            item = self._pieces.get()
            if item is _END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    # worker side ---------------------------------------------------------------------------------
    def _emit(self, piece: str | None) -> None:
        if piece:
            self.text += piece
            if self.timings.first_token is None:
                self.timings.first_token = time.perf_counter()
        if piece is None or piece:
            if self._on_event is not None:
                try:
                    self._on_event(self, piece)
                except Exception:  # a consumer's failure must not stop the loop serving everyone else
                    self._cancelled.set()
            else:
                self._pieces.put(_END if piece is None else piece)  # type: ignore[union-attr]

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        if error is None:
            self._emit(self.stream.flush())
        self.error = error
        self.timings.finished = time.perf_counter()
        self.result = Generation(text=self.text, token_ids=list(self.stream.ids), n_prompt_tokens=len(self.prompt_ids),
                                 finish_reason=reason)
        self.state = None  # the composed state may be large: free it as soon as it is read
        self._emit(None)
        self.done.set()


class Scheduler:
    """Continuous batching of :class:`Request`\\ s over one :class:`PicasoEngine` (see the module docstring).

    ``max_batch``: rows decoded together; ``max_queue``: requests waiting beyond the free rows
    (more: :meth:`submit` raises :class:`QueueFullError`); ``max_read_tokens``: padded prompt tokens read in
    one joining forward (long prompts, as in concatenation, join a few at a time so decoding rows
    are not stalled long); ``cuda_graphs``: on CUDA, decode by replaying graphs captured at
    ``buckets`` (powers of two up to ``max_batch``), all captured when the scheduler starts.
    ``max_slot_tokens``, ``max_kv_bytes``: the bounds of a hybrid model's keys and values (see
    :class:`HybridScheduler`, which ``Scheduler(hybrid_engine, ...)`` returns); a Mamba-2 model's
    rows are fixed-size and ignore them.
    """

    def __new__(cls, engine: PicasoEngine | None = None, *args, **kwargs):  # None: copy and pickle call __new__ bare
        if cls is Scheduler and engine is not None:
            from .hybrid_engine import HybridEngine  # (hybrid_engine imports the engine module, as this one does)

            if isinstance(engine, HybridEngine):  # its rows also hold keys and values
                cls = HybridScheduler
        return super().__new__(cls)

    def __init__(self, engine: PicasoEngine, max_batch: int = 64, max_queue: int = 256, max_read_tokens: int = 8192,
                 max_read_batch: int | None = None, cuda_graphs: bool = True, read_graph_rows: int = 32,
                 read_graph_lengths: tuple[int, ...] = (64, 128), start: bool = True,
                 max_slot_tokens: int = MAX_SLOT_TOKENS, max_kv_bytes: int = MAX_KV_BYTES):
        if max_batch < 1 or max_queue < 0 or max_read_tokens < 1 or max_slot_tokens < 1 or max_kv_bytes < 1:
            raise PicasoError(f"max_batch, max_read_tokens, max_slot_tokens and max_kv_bytes must be >= 1 and max_queue "
                              f">= 0; got {max_batch}, {max_read_tokens}, {max_slot_tokens}, {max_kv_bytes}, {max_queue}.")
        self.max_slot_tokens = max_slot_tokens
        self.max_kv_bytes = max_kv_bytes
        self.engine = engine
        self.model = engine.model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_read_tokens = max_read_tokens
        self.max_read_batch = max_read_batch or max_batch
        # the decode batch: row i of these is the state of active[i]
        self.ssm, self.conv = self._empty_state(max_batch)
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=engine.device)
        self.active: list[Request] = []
        self.waiting: deque[Request] = deque()
        self.steps = 0  # decode steps run
        self.rows_decoded = 0  # sum of active rows over steps (mean batch = rows_decoded / steps)
        self.finished: Counter[str] = Counter()  # requests finished, by reason
        self.graphs = None
        self.read_graphs = None
        self.read_graphs_error: str | None = None
        if cuda_graphs and engine.device.type == "cuda":
            from .graphs import BatchedReadGraphs, BatchedStepGraphs

            self.graphs = BatchedStepGraphs(self.model, self.tokens, self.ssm, self.conv)
            if read_graph_rows:  # joins of short prompts replay graphs too (eagerly they are launch-bound)
                rows = min(read_graph_rows, max_batch)
                self.read_graphs = BatchedReadGraphs(self.model, *self._empty_state(rows), *self._empty_state(rows),
                                                     lengths=read_graph_lengths)
        self._windowed = _concatenative(engine)
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # ----------------------------------------------------------------------------------- public
    def start(self) -> "Scheduler":
        """Capture the CUDA graphs (if any) and start the worker thread."""
        if self._thread is None:
            if self.graphs is not None:
                self.graphs.capture_all()  # now: a capture's warm-up runs steps on the batch's rows
                if self.read_graphs is not None:
                    try:
                        self.read_graphs.capture_all()
                    except Exception as exc:  # joins are then read eagerly: slower, still correct
                        self.read_graphs_error, self.read_graphs = repr(exc), None
                self.ssm.zero_()
                self.conv.zero_()
            self._thread = threading.Thread(target=self._loop, name="picaso-scheduler", daemon=True)
            self._thread.start()
        return self

    def submit(self, prompt: Tokens, state: State | None = None, *,
               on_event: Callable[[Request, str | None], None] | None = None, **sampling) -> Request:
        """Queue a generation of ``prompt`` read from ``state``; keyword arguments are
        :class:`SamplingParams`. Raises :class:`QueueFullError` when ``max_queue`` requests wait."""
        params = sampling.pop("params", None) or SamplingParams(**sampling)
        prompt_ids = self.engine.tokenize(prompt)
        if not prompt_ids:
            raise PicasoError("the prompt has no tokens; pass a non-empty query.")
        if state is not None:
            self.engine._check(state)
        request = Request(prompt_ids, state, params, on_event, self.engine.tokenizer.decode, self._windowed)
        if params.max_new_tokens == 0:
            request._finish("length")
            return request
        with self._cv:
            if self._closed:
                raise SchedulerClosedError("the scheduler is closed; create a new one.")
            free_rows = max(0, self.max_batch - len(self.active))  # those join at the next step: not a queue
            if len(self.waiting) >= self.max_queue + free_rows:
                raise QueueFullError(f"{len(self.waiting)} requests are already waiting (max_queue={self.max_queue}); "
                                     "retry later.")
            self.waiting.append(request)
            self._cv.notify()
        return request

    def generate(self, prompt: Tokens, state: State | None = None, timeout: float | None = None, **sampling) -> Generation:
        """Submit and wait: like :meth:`PicasoEngine.generate`, batched with whatever else runs."""
        request = self.submit(prompt, state, on_event=lambda r, p: None, **sampling)
        return request.wait(timeout)

    def stats(self) -> dict:
        with self._cv:
            return {"active": len(self.active), "waiting": len(self.waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "steps": self.steps,
                    "mean_batch": round(self.rows_decoded / self.steps, 2) if self.steps else 0.0,
                    "finished": dict(self.finished),
                    "cuda_graph_buckets": list(self.graphs.buckets) if self.graphs is not None else [],
                    "read_graphs": ({"rows": list(self.read_graphs.rows), "lengths": list(self.read_graphs.lengths)}
                                    if self.read_graphs is not None else self.read_graphs_error)}

    def close(self, timeout: float = 30.0) -> None:
        """Cancel everything and stop the worker."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for request in list(self.waiting) + list(self.active):
            request._finish("cancelled")
        self.waiting.clear()
        self.active.clear()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- worker
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self.waiting and not self.active:
                    self._cv.wait()
                if self._closed:
                    return
                joining = self._take_joining()
            try:
                self._drop_cancelled()
                if joining:
                    self._join(joining)
                if self.active:
                    self._decode()
            except Exception as exc:  # a failed forward (e.g. out of memory) fails its requests, not the server
                for request in joining + self.active:
                    request._finish("error", error=exc)
                with self._cv:
                    self.active.clear()

    def _take_joining(self) -> list[Request]:
        """Waiting requests that fit the free rows and the read budget (at least one when a row is free)."""
        joining: list[Request] = []
        free = self.max_batch - len(self.active)
        longest = 0
        cap = min(free, self.max_read_batch)
        if self.read_graphs is not None and self.waiting and self.read_graphs.fits(1, len(self.waiting[0].prompt_ids)):
            cap = min(cap, self.read_graphs.rows[-1])  # a join that fits the read graphs
        while self.waiting and len(joining) < cap:
            request = self.waiting[0]
            if request.cancelled:
                self._end(self.waiting.popleft(), "cancelled")
                continue
            longest_after = max(longest, len(request.prompt_ids))
            if joining and longest_after * (len(joining) + 1) > self.max_read_tokens:
                break
            joining.append(self.waiting.popleft())
            longest = longest_after
        return joining

    @torch.inference_mode()  # it releases rows: their buffers are inference tensors, written in place
    def _drop_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self.active) if r.cancelled]
        if gone:
            for i in gone:
                self._end(self.active[i], "cancelled")
            self._release(gone)

    def _empty_state(self, batch: int) -> tuple[Tensor, Tensor]:
        """Zero states [batch, n_layer, ...] stored layer-major (a transposed view): each layer's rows are
        contiguous, so a kernel's offset (row x one layer's state) stays within int32 at any batch. Batch-major,
        256 rows of a 2.7B model's states span 2^33 elements, past the kernels' 32-bit index arithmetic."""
        cfg, kw = self.model.cfg, dict(device=self.engine.device, dtype=self.model.dtype)
        ssm = torch.zeros(cfg.n_layer, batch, cfg.nheads, cfg.headdim, cfg.d_state, **kw).transpose(0, 1)
        conv = torch.zeros(cfg.n_layer, batch, cfg.conv_dim, cfg.d_conv - 1, **kw).transpose(0, 1)
        return ssm, conv

    @torch.inference_mode()
    def _join(self, joining: list[Request]) -> None:
        """Read the joining prompts in one forward, each row from its own state; they join the batch."""
        engine, model = self.engine, self.model
        k, device = len(joining), engine.device
        lengths = [len(r.prompt_ids) for r in joining]
        ids = torch.zeros(k, max(lengths), dtype=torch.long)
        for row, r in enumerate(joining):
            ids[row, :lengths[row]] = torch.tensor(r.prompt_ids, dtype=torch.long)
        graphed = self.read_graphs is not None and self.read_graphs.fits(k, max(lengths))
        if graphed:
            ssm0, conv0 = self.read_graphs.ssm_in, self.read_graphs.conv_in
        else:
            ssm0, conv0 = self._empty_state(k)
        for row, r in enumerate(joining):
            if r.state is not None:
                ssm0[row].copy_(r.state.ssm, non_blocking=True)
                conv0[row].copy_(r.state.conv, non_blocking=True)
            elif graphed:
                ssm0[row].zero_()
                conv0[row].zero_()
            r.state = None
        start = len(self.active)
        if graphed:
            logits = self.read_graphs.read([r.prompt_ids for r in joining])
            self.ssm[start:start + k].copy_(self.read_graphs.ssm_out[:k])
            self.conv[start:start + k].copy_(self.read_graphs.conv_out[:k])
        else:
            same_length = len(set(lengths)) == 1  # no padding: the exact forward engine.generate runs
            out = model(ids.to(device), ssm_state=ssm0, conv_state=conv0,
                        lengths=None if same_length else torch.tensor(lengths, device=device), logits="last")
            self.ssm[start:start + k].copy_(out.ssm_state)
            self.conv[start:start + k].copy_(out.conv_state)
            logits = out.logits[:, 0]
        now = time.perf_counter()
        for r in joining:
            r.timings.read = now
        with self._cv:
            self.active.extend(joining)
        self._advance(list(range(start, start + k)), logits)

    @torch.inference_mode()
    def _decode(self) -> None:
        n = len(self.active)
        self.tokens[:n].copy_(torch.tensor([r.last_token for r in self.active], dtype=torch.long), non_blocking=True)
        if self.graphs is not None:
            logits = self.graphs.step(n)[:n]
        else:
            logits = self.model.step(self.tokens[:n], self.ssm[:n], self.conv[:n])
        self.steps += 1
        self.rows_decoded += n
        self._advance(list(range(n)), logits)

    def _advance(self, rows: list[int], logits: Tensor) -> None:
        """Sample one token for each of ``rows`` (logits[j] belongs to rows[j]); finished rows leave."""
        requests = [self.active[i] for i in rows]
        greedy = logits.argmax(-1).tolist()  # one transfer for the whole batch
        sampled = [j for j, r in enumerate(requests) if r.params.temperature > 0]
        if sampled:
            on_host = logits[sampled].float().cpu()
            for j, row_logits in zip(sampled, on_host):
                greedy[j] = requests[j].sampler(row_logits)
        eos = self.engine.eos_token_id
        now = time.perf_counter()
        finished = []
        for i, request, token in zip(rows, requests, greedy):
            if request.cancelled:
                self._end(request, "cancelled")
                finished.append(i)
                continue
            request.timings.token_times.append(now)
            if token == eos:
                self._end(request, "eos")
                finished.append(i)
                continue
            request._emit(request.stream.push(token))
            if request.stream.stopped:
                self._end(request, "stop")
                finished.append(i)
            elif len(request.stream.ids) >= request.params.max_new_tokens:
                self._end(request, "length")
                finished.append(i)
            else:
                request.last_token = token
        if finished:
            self._release(finished)

    def _end(self, request: Request, reason: str) -> None:
        self.finished[reason] += 1
        request._finish(reason)

    def _release(self, rows: list[int]) -> None:
        """Free ``rows`` of the batch: the last active rows move into the holes (states copied)."""
        with self._cv:
            holes = sorted(set(rows))
            gone = set(holes)
            n = len(self.active)
            keep_tail = [i for i in range(n - len(holes), n) if i not in gone]  # rows past the new end that stay
            fill = [h for h in holes if h < n - len(holes)]
            for hole, source in zip(fill, keep_tail):
                self.ssm[hole].copy_(self.ssm[source])
                self.conv[hole].copy_(self.conv[source])
                self.active[hole] = self.active[source]
            del self.active[n - len(holes):]


class HybridScheduler(Scheduler):
    """:class:`Scheduler` for a hybrid model (Mamba-2 and attention layers); ``Scheduler(engine, ...)``
    returns one for a :class:`~picaso_rag.hybrid_engine.HybridEngine`, so callers need not know.

    A row (slot) holds what :meth:`HybridEngine.generate` holds for one request: the SSM layers'
    states (fixed-size, as for Mamba-2) and the attention layers' keys and values: the composed
    union of its documents', then its prompt's and its generated tokens'. The keys and values of
    all rows live in one buffer ``keys``/``values`` [rows, n_attn, kv_heads, capacity, head_dim],
    row r holding ``kv_len`` keys and zeros or stale keys after them; a decode step writes each
    row's new key at its own length and attends with a key mask (:meth:`HybridLM.step`),
    each row at its own RoPE position. Why padding: SDPA takes one dense [rows, keys] layout; a
    step reads the buffer only up to the longest row's keys (shorter rows' padding up to there is
    read and masked), and the rest of the capacity costs memory only.

    Bounds (a row's keys grow with every token, so both are enforced when a request joins):
    - ``max_slot_tokens``: a request may hold at most this many keys, its documents' + prompt +
      ``max_new_tokens`` (reserved whole at join, so a running row never runs out); above it,
      :meth:`submit` raises :class:`KVBudgetError` naming the setting;
    - ``max_kv_bytes``: the buffer of all rows, padded to the longest reservation (rows x capacity
      x bytes per token), never exceeds it; a request that would push it past waits in the queue
      (in order: no later request overtakes it) until rows leave; one that could not fit even
      alone is refused at :meth:`submit`. While the buffer is resized the old one is held too.
      An idle scheduler holds no keys.

    Joining prompts are read in one forward, each row from its own composed state (its keys padded
    after its own and masked: ``key_lengths``; its own RoPE position), eagerly; decoding is batched
    over all rows at bucketed (rows, key span) shapes, on CUDA by replaying a graph per bucket
    (:class:`~picaso_rag.graphs.HybridStepGraphs`; the same bucketed step runs eagerly elsewhere). With
    graphs, the buffer is kept while the scheduler is idle (recapturing at every burst would cost more
    than the memory, which ``max_kv_bytes`` bounds); without them an idle scheduler holds no keys.
    """

    def __init__(self, engine: PicasoEngine, max_batch: int = 64, max_queue: int = 256, max_read_tokens: int = 8192,
                 max_read_batch: int | None = None, cuda_graphs: bool = True, read_graph_rows: int = 32,
                 read_graph_lengths: tuple[int, ...] = (64, 128), start: bool = True,
                 max_slot_tokens: int = MAX_SLOT_TOKENS, max_kv_bytes: int = MAX_KV_BYTES):
        super().__init__(engine, max_batch, max_queue, max_read_tokens, max_read_batch, cuda_graphs=False,
                         start=False, max_slot_tokens=max_slot_tokens, max_kv_bytes=max_kv_bytes)
        cfg = self.model.cfg
        self.kv_bytes_per_token = cfg.kv_bytes_per_token(bytes_per_value=self.model.dtype.itemsize)
        self.keys: Tensor | None = None  # [rows, n_attn, kv_heads, capacity, head_dim]; None while idle
        self.values: Tensor | None = None
        self.kv_waits = 0  # loop turns at which the head of the queue waited for the key/value budget
        # each row's key count and RoPE position, where the decode step (and its graphs) read them
        self.kv_lengths = torch.zeros(max_batch, dtype=torch.long, device=engine.device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=engine.device)
        # the decode step over the key/value buffer, graphed on CUDA; made anew whenever the buffer is
        self.step_graphs: HybridStepGraphs | None = None
        self._graph_decode = cuda_graphs and engine.device.type == "cuda"
        if start:
            self.start()

    def _empty_state(self, batch: int) -> tuple[Tensor, Tensor]:
        """Zero SSM states of the SSM layers only, layer-major as :meth:`Scheduler._empty_state`."""
        cfg, kw = self.model.cfg, dict(device=self.engine.device, dtype=self.model.dtype)
        n_ssm = len(cfg.ssm_layers)
        ssm = torch.zeros(n_ssm, batch, cfg.nheads, cfg.headdim, cfg.d_state, **kw).transpose(0, 1)
        conv = torch.zeros(n_ssm, batch, cfg.conv_dim, cfg.d_conv - 1, **kw).transpose(0, 1)
        return ssm, conv

    # ----------------------------------------------------------------------------------- public
    def submit(self, prompt: Tokens, state: State | None = None, *,
               on_event: Callable[[Request, str | None], None] | None = None, **sampling) -> Request:
        """As :meth:`Scheduler.submit`; also raises :class:`KVBudgetError` for a request whose keys
        (its documents' + prompt + ``max_new_tokens``) exceed ``max_slot_tokens`` or ``max_kv_bytes``."""
        params = sampling.pop("params", None) or SamplingParams(**sampling)
        prompt_ids = self.engine.tokenize(prompt)
        if state is not None:
            self.engine._check(state)
        n_keys = state.n_keys if state is not None else 0  # type: ignore[attr-defined]
        need = n_keys + len(prompt_ids) + params.max_new_tokens
        what = (f"this request needs room for {need:,} keys per attention layer ({n_keys:,} of its documents, "
                f"{len(prompt_ids):,} of its prompt, {params.max_new_tokens:,} new tokens)")
        if need > self.max_slot_tokens:
            raise KVBudgetError(f"{what}, above the scheduler's max_slot_tokens = {self.max_slot_tokens:,} "
                                "(picaso-rag serve --max-slot-tokens); ask for fewer documents or new tokens, or raise it.")
        if need * self.kv_bytes_per_token > self.max_kv_bytes:
            raise KVBudgetError(f"{what}: {need * self.kv_bytes_per_token:,} bytes, above the scheduler's max_kv_bytes = "
                                f"{self.max_kv_bytes:,} (picaso-rag serve --max-kv-bytes); ask for fewer documents or "
                                "new tokens, or raise it.")
        return super().submit(prompt_ids, state, on_event=on_event, params=params)

    def stats(self) -> dict:
        figures = super().stats()
        with self._cv:
            keys = self.keys
            figures["kv"] = {"max_slot_tokens": self.max_slot_tokens, "max_kv_bytes": self.max_kv_bytes,
                             "bytes_per_token": self.kv_bytes_per_token,
                             "buffer_bytes": 2 * keys.numel() * keys.element_size() if keys is not None else 0,
                             "tokens_held": sum(r.kv_len for r in self.active), "waits_for_budget": self.kv_waits}
            graphs = self.step_graphs
            figures["decode_graphs"] = ({"graphed": graphs.graphed, "captured": graphs.n_graphs(), "error": graphs.error}
                                        if graphs is not None else None)
        return figures

    # ----------------------------------------------------------------------------------- worker
    def _take_joining(self) -> list[Request]:
        """Waiting requests, in order, that fit the free rows, the read budget and the key/value budget."""
        joining: list[Request] = []
        cap = min(self.max_batch - len(self.active), self.max_read_batch)
        read = 0
        longest = max((r.kv_reserved for r in self.active), default=0)
        while self.waiting and len(joining) < cap:
            request = self.waiting[0]
            if request.cancelled:
                self._end(self.waiting.popleft(), "cancelled")
                continue
            if joining and read + len(request.prompt_ids) > self.max_read_tokens:  # the prompts read in one forward
                break
            n_keys = request.state.n_keys if request.state is not None else 0  # type: ignore[attr-defined]
            reserve = n_keys + len(request.prompt_ids) + request.params.max_new_tokens
            rows = len(self.active) + len(joining) + 1
            if rows * max(longest, reserve) * self.kv_bytes_per_token > self.max_kv_bytes:
                self.kv_waits += 1  # it waits for rows to leave (submit refused any request that cannot fit alone)
                break
            request.kv_reserved = reserve
            joining.append(self.waiting.popleft())
            longest = max(longest, reserve)
            read += len(request.prompt_ids)
        return joining

    def _fit_kv(self, rows: int, tokens: int) -> None:
        """Make the buffer hold ``rows`` rows of ``tokens`` keys (the active rows' keys kept), with
        slack (fewer resizes) only where the budget allows it."""
        have_rows, have_tokens = (0, 0) if self.keys is None else (self.keys.shape[0], self.keys.shape[3])
        if rows <= have_rows and tokens <= have_tokens:
            return
        slack_rows = min(self.max_batch, max(have_rows, 1 << (rows - 1).bit_length()))
        # powers of two: the buffer is reallocated (and its step graphs recaptured) a few times, not per request
        slack_tokens = min(self.max_slot_tokens, max(have_tokens, 256, 1 << (tokens - 1).bit_length()))
        per_token = self.kv_bytes_per_token
        new_rows, new_tokens = next((r, t) for r, t in ((slack_rows, slack_tokens), (rows, slack_tokens),
                                                        (slack_rows, tokens), (rows, tokens))
                                    if r >= rows and t >= tokens and r * t * per_token <= self.max_kv_bytes)
        cfg = self.model.cfg
        shape = (new_rows, len(cfg.attn_layers), cfg.n_kv_heads, new_tokens, cfg.head_dim)
        # zeros, not empty: masked keys weigh exactly 0, but 0 x NaN garbage in a value would be NaN
        keys = torch.zeros(shape, device=self.engine.device, dtype=self.model.dtype)
        values = torch.zeros_like(keys)
        n = len(self.active)
        if self.keys is not None and n:
            span = min(have_tokens, max(r.kv_len for r in self.active))
            keys[:n, :, :, :span].copy_(self.keys[:n, :, :, :span])
            values[:n, :, :, :span].copy_(self.values[:n, :, :, :span])  # type: ignore[index]
        self.keys, self.values = keys, values
        self.step_graphs = HybridStepGraphs(self.model, self.tokens, self.ssm, self.conv, keys, values, self.kv_lengths,
                                            self.positions, graphed=self._graph_decode)

    @torch.inference_mode()
    def _join(self, joining: list[Request]) -> None:
        """Read the joining prompts in one forward, each row from its own state: prompts right-padded,
        each row's keys padded after its own (``key_lengths`` masks the padding), each row at its own
        RoPE position; the state after it, keys and values included, goes into a free row."""
        engine, model = self.engine, self.model
        start, k, device = len(self.active), len(joining), engine.device
        if not start and not self._graph_decode:  # (after a failed step the batch was cleared without _release)
            self.keys = self.values = self.step_graphs = None
        self._fit_kv(start + k, max(r.kv_reserved for r in self.active + joining))
        begun = [engine._start(r.state) for r in joining]  # type: ignore[attr-defined]
        n_docs = [b[2].shape[3] for b in begun]
        lengths = [len(r.prompt_ids) for r in joining]
        ids = torch.zeros(k, max(lengths), dtype=torch.long)
        for row, r in enumerate(joining):
            ids[row, :lengths[row]] = torch.tensor(r.prompt_ids, dtype=torch.long)
        cfg = model.cfg
        past = torch.zeros(k, len(cfg.attn_layers), cfg.n_kv_heads, max(n_docs), cfg.head_dim, device=device, dtype=model.dtype)
        past_values = torch.zeros_like(past)
        for row, (_, _, keys, values, _, _, _) in enumerate(begun):
            past[row, :, :, :n_docs[row]] = keys[0]
            past_values[row, :, :, :n_docs[row]] = values[0]
        ragged_prompts, ragged_keys = len(set(lengths)) > 1, len(set(n_docs)) > 1
        out = model(ids.to(device), ssm_state=torch.cat([b[0] for b in begun]), conv_state=torch.cat([b[1] for b in begun]),
                    keys=past, values=past_values, position=torch.tensor([b[4] for b in begun], device=device),
                    lengths=torch.tensor(lengths, device=device) if ragged_prompts else None,
                    key_lengths=torch.tensor(n_docs, device=device) if ragged_keys else None, logits="last")
        self.ssm[start:start + k].copy_(out.ssm_state)
        self.conv[start:start + k].copy_(out.conv_state)
        for row, r in enumerate(joining):
            slot, n_doc, n = start + row, n_docs[row], lengths[row]
            self.keys[slot, :, :, :n_doc + n].copy_(torch.cat([past[row, :, :, :n_doc], out.keys[row, :, :, :n]], dim=2))  # type: ignore[index]
            self.values[slot, :, :, :n_doc + n].copy_(torch.cat([past_values[row, :, :, :n_doc], out.values[row, :, :, :n]], dim=2))  # type: ignore[index]
            r.kv_len, r.position = n_doc + n, begun[row][4] + n
            r.state = None
        now = time.perf_counter()
        for r in joining:
            r.timings.read = now
        with self._cv:
            self.active.extend(joining)
        self._advance(list(range(start, start + k)), out.logits[:, 0])

    @torch.inference_mode()
    def _decode(self) -> None:
        n = len(self.active)
        graphs = self.step_graphs
        rows, _ = graphs.bucket(n, max(r.kv_len for r in self.active))  # type: ignore[union-attr]
        # the bucket's rows past the active ones read one key from position 0: computed, ignored
        table = torch.zeros(3, rows, dtype=torch.long)
        table[:, :n] = torch.tensor([[r.last_token, r.kv_len, r.position] for r in self.active], dtype=torch.long).T
        table = table.to(self.engine.device, non_blocking=True)
        self.tokens[:rows].copy_(table[0])
        self.kv_lengths[:rows].copy_(table[1])
        self.positions[:rows].copy_(table[2])
        logits = graphs.step(n, max(r.kv_len for r in self.active))[:n]  # type: ignore[union-attr]
        for r in self.active:
            r.kv_len += 1
            r.position += 1
        self.steps += 1
        self.rows_decoded += n
        self._advance(list(range(n)), logits)

    def _release(self, rows: list[int]) -> None:
        """As :meth:`Scheduler._release`, moving the keys and values too; an emptied batch frees its buffer."""
        with self._cv:
            holes = sorted(set(rows))
            gone = set(holes)
            n = len(self.active)
            keep_tail = [i for i in range(n - len(holes), n) if i not in gone]
            fill = [h for h in holes if h < n - len(holes)]
            for hole, source in zip(fill, keep_tail):
                self.ssm[hole].copy_(self.ssm[source])
                self.conv[hole].copy_(self.conv[source])
                length = self.active[source].kv_len
                self.keys[hole, :, :, :length].copy_(self.keys[source, :, :, :length])  # type: ignore[index]
                self.values[hole, :, :, :length].copy_(self.values[source, :, :, :length])  # type: ignore[index]
                self.active[hole] = self.active[source]
            del self.active[n - len(holes):]
            if not self.active and not self._graph_decode:
                self.keys = self.values = self.step_graphs = None


def tokens_of(engine: PicasoEngine, prompts: Sequence[Tokens]) -> list[list[int]]:
    """Token ids of several prompts (a helper for benchmarks)."""
    return [engine.tokenize(p) for p in prompts]
