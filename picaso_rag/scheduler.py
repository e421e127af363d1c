"""Continuous batching: many requests, each read from its own (composed) state, decoded together.

A request is a prompt (token ids or text), the state it is read from (a composed PICASO state, a
document state, or None) and its own sampling parameters. One worker thread runs the loop:

1. **join**: waiting requests are read in one batched forward, each row from its own initial
   state (rows right-padded; padding never changes a state), and each gets its first token; the
   state after its prompt is copied into a free row of the decode batch;
2. **decode**: one :meth:`PicasoLM.step` for every active row (on CUDA a graph replay at the
   smallest bucketed batch size >= the rows in use);
3. **leave**: a row that produced EOS, a stop string, its ``max_new_tokens`` or was cancelled
   is freed at once (the last row moves into the hole, so active rows stay a prefix of the batch).

Greedy tokens equal :meth:`PicasoEngine.generate`'s for every request (tests/test_scheduler.py);
sampling uses the same per-request seeded :class:`Sampler`, so seeded samples match too.

A model with attention layers (a hybrid) runs through the same scheduler: each row also holds its
attention layers' keys and values (its documents', its prompt's, its generated tokens'), in a
padded batch buffer bounded by ``max_slot_tokens`` per row and ``max_kv_bytes`` in all; decoding is
batched over the rows with a key mask (tests/test_hybrid_serving.py).

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
from typing import Callable, Iterator

import torch
from torch import Tensor

from .engine import Generation, PicasoEngine, Tokens
from .errors import PicasoError
from .generation import Sampler, SamplingParams, TextStream
from .graphs import StepGraphs
from .state import State

_ids = itertools.count(1)
_END = object()

# bounds of the keys and values of a model with attention layers in the scheduler (rows without them are fixed-size)
MAX_SLOT_TOKENS = 32_768  # keys per row: its documents' + prompt + max_new_tokens
MAX_KV_BYTES = 2 << 30  # the padded key/value buffer of all rows together
# a prompt longer than this is read this many tokens per loop turn, between decode steps (chunked
# prefill): a long prompt (concatenated documents) never holds up the rows that are decoding
PREFILL_CHUNK_TOKENS = 512


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
        self.prompt_ids = prompt_ids  # what is left to read (a long prompt is read in chunks: the rest)
        self.n_prompt_tokens = len(prompt_ids)
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
        # keys the row may hold at most, holds now (0 without attention layers), and its RoPE position
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
        self.result = Generation(text=self.text, token_ids=list(self.stream.ids), n_prompt_tokens=self.n_prompt_tokens,
                                 finish_reason=reason)
        self.state = None  # the composed state may be large: free it as soon as it is read
        self._emit(None)
        self.done.set()


class Scheduler:
    """Continuous batching of :class:`Request`\\ s over one :class:`PicasoEngine`, for every model
    (see the module docstring).

    ``max_batch``: rows decoded together; ``max_queue``: requests waiting beyond the free rows
    (more: :meth:`submit` raises :class:`QueueFullError`); ``max_read_tokens``: padded prompt tokens
    read in one joining forward (long prompts, as in concatenation, join a few at a time so decoding
    rows are not stalled long); ``cuda_graphs``: on CUDA, decode by replaying a graph per bucket of
    rows (powers of two up to ``max_batch``; and, with attention layers, of key span); a model
    without attention layers also replays joining reads of up to ``read_graph_rows`` prompts of up
    to ``read_graph_lengths`` tokens (its rows hold no keys, so the graphs' inputs are fixed-size).

    A row (slot) holds what :meth:`PicasoEngine.generate` holds for one request: the SSM layers'
    states (fixed-size), and for a model with attention layers their keys and values: the composed
    union of its documents', then its prompt's and its generated tokens'. The keys and values of
    all rows live in one buffer ``keys``/``values`` [rows, n_attn, kv_heads, capacity, head_dim],
    row r holding ``kv_len`` keys and zeros or stale keys after them; a decode step writes each
    row's new key at its own length and attends with a key mask (:meth:`PicasoLM.step`), each row
    at its own RoPE position; it reads the buffer only up to the span bucket of the longest row.

    Bounds of the keys (a row's keys grow with every token, so both are enforced when a request joins):
    - ``max_slot_tokens``: a request may hold at most this many keys, its documents' + prompt +
      ``max_new_tokens`` (reserved whole at join, so a running row never runs out); above it,
      :meth:`submit` raises :class:`KVBudgetError` naming the setting;
    - ``max_kv_bytes``: the buffer of all rows, padded to the longest reservation (rows x capacity
      x bytes per token), never exceeds it; a request that would push it past waits in the queue
      (in order: no later request overtakes it) until rows leave; one that could not fit even
      alone is refused at :meth:`submit`. While the buffer is resized the old one is held too.
      With graphs, the buffer is kept while the scheduler is idle (recapturing at every burst would
      cost more than the memory, which ``max_kv_bytes`` bounds); without them an idle scheduler
      holds no keys.
    """

    def __init__(self, engine: PicasoEngine, max_batch: int = 64, max_queue: int = 256, max_read_tokens: int = 8192,
                 max_read_batch: int | None = None, cuda_graphs: bool = True, read_graph_rows: int = 32,
                 read_graph_lengths: tuple[int, ...] = (64, 128), start: bool = True,
                 max_slot_tokens: int = MAX_SLOT_TOKENS, max_kv_bytes: int = MAX_KV_BYTES,
                 prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS):
        if min(max_batch, max_read_tokens, max_slot_tokens, max_kv_bytes, prefill_chunk_tokens) < 1 or max_queue < 0:
            raise PicasoError(f"max_batch, max_read_tokens, max_slot_tokens, max_kv_bytes and prefill_chunk_tokens must be "
                              f">= 1 and max_queue >= 0; got {max_batch}, {max_read_tokens}, {max_slot_tokens}, "
                              f"{max_kv_bytes}, {prefill_chunk_tokens}, {max_queue}.")
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefill_chunks = 0  # chunks of long prompts read between decode steps
        self.max_slot_tokens = max_slot_tokens
        self.max_kv_bytes = max_kv_bytes
        self.engine = engine
        self.model = engine.model
        cfg = self.model.cfg
        self.has_keys = bool(cfg.attn_layers)
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
        self.kv_bytes_per_token = cfg.kv_bytes_per_token(bytes_per_value=self.model.dtype.itemsize) if self.has_keys else 0
        self.keys: Tensor | None = None  # [rows, n_attn, kv_heads, capacity, head_dim]; None while idle or without attention
        self.values: Tensor | None = None
        self.kv_waits = 0  # loop turns at which the head of the queue waited for the key/value budget
        # each row's key count and RoPE position, where the decode step (and its graphs) read them
        self.kv_lengths = torch.zeros(max_batch, dtype=torch.long, device=engine.device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=engine.device)
        self._graph_decode = cuda_graphs and engine.device.type == "cuda"
        # the decode step over the batch, graphed on CUDA; with attention layers made anew whenever the key buffer is
        self.step_graphs: StepGraphs | None = None if self.has_keys else self._step_graphs(None, None)
        self.read_graphs = None
        self.read_graphs_error: str | None = None
        if self._graph_decode and read_graph_rows and not self.has_keys:
            from .graphs import BatchedReadGraphs  # joins of short prompts replay graphs too (eagerly they are launch-bound)

            rows = min(read_graph_rows, max_batch)
            self.read_graphs = BatchedReadGraphs(self.model, *self._empty_state(rows), *self._empty_state(rows),
                                                 lengths=read_graph_lengths)
        self._windowed = _concatenative(engine)
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    def _step_graphs(self, keys: Tensor | None, values: Tensor | None) -> StepGraphs:
        if keys is None:  # no attention layers: zero-size key buffers
            cfg = self.model.cfg
            keys = values = torch.zeros(self.max_batch, 0, cfg.n_kv_heads, 0, cfg.head_dim, device=self.engine.device,
                                        dtype=self.model.dtype)
        return StepGraphs(self.model, self.tokens, self.ssm, self.conv, keys, values, self.kv_lengths,
                                self.positions, graphed=self._graph_decode)

    def _empty_state(self, batch: int) -> tuple[Tensor, Tensor]:
        """Zero states [batch, n_ssm, ...] stored layer-major (a transposed view): each layer's rows are
        contiguous, so a kernel's offset (row x one layer's state) stays within int32 at any batch. Batch-major,
        256 rows of a 2.7B model's states span 2^33 elements, past the kernels' 32-bit index arithmetic."""
        cfg, kw = self.model.cfg, dict(device=self.engine.device, dtype=self.model.dtype)
        n_ssm = len(cfg.ssm_layers)
        ssm = torch.zeros(n_ssm, batch, cfg.nheads, cfg.headdim, cfg.d_state, **kw).transpose(0, 1)
        conv = torch.zeros(n_ssm, batch, cfg.conv_dim, cfg.d_conv - 1, **kw).transpose(0, 1)
        return ssm, conv

    # ----------------------------------------------------------------------------------- public
    def start(self) -> "Scheduler":
        """Capture the CUDA graphs a model without attention layers replays (every row bucket) and
        start the worker thread."""
        if self._thread is None:
            if self._graph_decode and not self.has_keys:
                self.step_graphs.capture_all()  # type: ignore[union-attr]  # now: a warm-up steps the batch's rows
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
        :class:`SamplingParams`. Raises :class:`QueueFullError` when ``max_queue`` requests wait, and
        :class:`KVBudgetError` for a request whose keys (its documents' + prompt + ``max_new_tokens``)
        exceed ``max_slot_tokens`` or ``max_kv_bytes``."""
        params = sampling.pop("params", None) or SamplingParams(**sampling)
        prompt_ids = self.engine.tokenize(prompt)
        if not prompt_ids:
            raise PicasoError("the prompt has no tokens; pass a non-empty query.")
        if state is not None:
            self.engine._check(state)
        if self.has_keys:
            self._check_kv_budget(state.n_keys if state is not None else 0, len(prompt_ids), params.max_new_tokens)
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

    def _check_kv_budget(self, n_keys: int, n_prompt: int, max_new_tokens: int) -> None:
        need = n_keys + n_prompt + max_new_tokens
        what = (f"this request needs room for {need:,} keys per attention layer ({n_keys:,} of its documents, "
                f"{n_prompt:,} of its prompt, {max_new_tokens:,} new tokens)")
        if need > self.max_slot_tokens:
            raise KVBudgetError(f"{what}, above the scheduler's max_slot_tokens = {self.max_slot_tokens:,} "
                                "(picaso-rag serve --max-slot-tokens); ask for fewer documents or new tokens, or raise it.")
        if need * self.kv_bytes_per_token > self.max_kv_bytes:
            raise KVBudgetError(f"{what}: {need * self.kv_bytes_per_token:,} bytes, above the scheduler's max_kv_bytes = "
                                f"{self.max_kv_bytes:,} (picaso-rag serve --max-kv-bytes); ask for fewer documents or "
                                "new tokens, or raise it.")

    def generate(self, prompt: Tokens, state: State | None = None, timeout: float | None = None, **sampling) -> Generation:
        """Submit and wait: like :meth:`PicasoEngine.generate`, batched with whatever else runs."""
        request = self.submit(prompt, state, on_event=lambda r, p: None, **sampling)
        return request.wait(timeout)

    def stats(self) -> dict:
        with self._cv:
            graphs, keys = self.step_graphs, self.keys
            figures = {"active": len(self.active), "waiting": len(self.waiting), "max_batch": self.max_batch,
                       "max_queue": self.max_queue, "steps": self.steps,
                       "mean_batch": round(self.rows_decoded / self.steps, 2) if self.steps else 0.0,
                       "finished": dict(self.finished), "prefill_chunks": self.prefill_chunks,
                       "cuda_graph_buckets": list(graphs.row_buckets) if graphs is not None and graphs.graphed else [],
                       "read_graphs": ({"rows": list(self.read_graphs.rows), "lengths": list(self.read_graphs.lengths)}
                                       if self.read_graphs is not None else self.read_graphs_error),
                       "decode_graphs": ({"graphed": graphs.graphed, "captured": graphs.n_graphs(), "error": graphs.error}
                                         if graphs is not None else None)}
            if self.has_keys:
                figures["kv"] = {"max_slot_tokens": self.max_slot_tokens, "max_kv_bytes": self.max_kv_bytes,
                                 "bytes_per_token": self.kv_bytes_per_token,
                                 "buffer_bytes": 2 * keys.numel() * keys.element_size() if keys is not None else 0,
                                 "tokens_held": sum(r.kv_len for r in self.active), "waits_for_budget": self.kv_waits}
            return figures

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
                # the head of the queue, if its prompt is too long to join yet: one chunk of it is read this turn
                long_prompt = (self.waiting[0] if not joining and self.waiting
                               and len(self.waiting[0].prompt_ids) > self.prefill_chunk_tokens else None)
            try:
                self._drop_cancelled()
                if joining:
                    self._join(joining)
                if long_prompt is not None:
                    self._prefill_chunk(long_prompt)
                if self.active:
                    self._decode()
            except Exception as exc:  # a failed forward (e.g. out of memory) fails its requests, not the server
                for request in joining + self.active:
                    request._finish("error", error=exc)
                with self._cv:
                    self.active.clear()

    def _take_joining(self) -> list[Request]:
        """Waiting requests, in order, that fit the free rows, the read budget (padded prompt tokens
        of one forward; at least one when a row is free) and the key/value budget."""
        joining: list[Request] = []
        cap = min(self.max_batch - len(self.active), self.max_read_batch)
        if self.read_graphs is not None and self.waiting and self.read_graphs.fits(1, len(self.waiting[0].prompt_ids)):
            cap = min(cap, self.read_graphs.rows[-1])  # a join that fits the read graphs
        longest_prompt = 0
        longest_keys = max((r.kv_reserved for r in self.active), default=0)
        while self.waiting and len(joining) < cap:
            request = self.waiting[0]
            if request.cancelled:
                self._end(self.waiting.popleft(), "cancelled")
                continue
            if len(request.prompt_ids) > self.prefill_chunk_tokens:  # read in chunks first (_prefill_chunk), in turn
                break
            longest_after = max(longest_prompt, len(request.prompt_ids))
            if joining and longest_after * (len(joining) + 1) > self.max_read_tokens:  # the padded prompts of one forward
                break
            if self.has_keys:
                n_keys = request.state.n_keys if request.state is not None else 0
                reserve = n_keys + len(request.prompt_ids) + request.params.max_new_tokens
                rows = len(self.active) + len(joining) + 1
                if rows * max(longest_keys, reserve) * self.kv_bytes_per_token > self.max_kv_bytes:
                    self.kv_waits += 1  # it waits for rows to leave (submit refused any request that cannot fit alone)
                    break
                request.kv_reserved = reserve
                longest_keys = max(longest_keys, reserve)
            joining.append(self.waiting.popleft())
            longest_prompt = longest_after
        return joining

    @torch.inference_mode()
    def _prefill_chunk(self, request: Request) -> None:
        """Read the next ``prefill_chunk_tokens`` of a long prompt from the request's state: the state
        after them becomes its state, the rest its prompt. The request stays at the head of the queue
        (FIFO), so it joins once the rest fits one read; meanwhile the active rows decode every turn.
        A failure fails this request only."""
        if request.cancelled:
            return  # _take_joining drops it next turn
        chunk, rest = request.prompt_ids[:self.prefill_chunk_tokens], request.prompt_ids[self.prefill_chunk_tokens:]
        try:
            request.state = self.engine.read_state(chunk, request.state)
        except Exception as exc:
            with self._cv:
                if self.waiting and self.waiting[0] is request:
                    self.waiting.popleft()
            self.finished["error"] += 1
            request._finish("error", error=exc)
            return
        request.prompt_ids = rest
        self.prefill_chunks += 1

    @torch.inference_mode()  # it releases rows: their buffers are inference tensors, written in place
    def _drop_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self.active) if r.cancelled]
        if gone:
            for i in gone:
                self._end(self.active[i], "cancelled")
            self._release(gone)

    def _fit_kv(self, rows: int, tokens: int) -> None:
        """Make the key buffer hold ``rows`` rows of ``tokens`` keys (the active rows' keys kept), with
        slack (fewer resizes) only where the budget allows it."""
        have_rows, have_tokens = (0, 0) if self.keys is None else (self.keys.shape[0], self.keys.shape[3])
        if rows <= have_rows and tokens <= have_tokens:
            return
        slack_rows = min(self.max_batch, max(have_rows, 1 << (rows - 1).bit_length()))
        # with graphs, powers of two: the buffer is reallocated (and its step graphs recaptured) a few
        # times, not per request; without, whole blocks of 256 keys (a power of two could waste half)
        wanted = 1 << (tokens - 1).bit_length() if self._graph_decode else -(-tokens // 256) * 256
        slack_tokens = min(self.max_slot_tokens, max(have_tokens, 256, wanted))
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
        self.step_graphs = self._step_graphs(keys, values)

    @torch.inference_mode()
    def _join(self, joining: list[Request]) -> None:
        """Read the joining prompts in one forward, each row from its own state: prompts right-padded,
        each row's keys padded after its own (``key_lengths`` masks the padding), each row at its own
        RoPE position; the state after it, keys and values included, goes into a free row."""
        start, k = len(self.active), len(joining)
        lengths = [len(r.prompt_ids) for r in joining]
        if self.read_graphs is not None and self.read_graphs.fits(k, max(lengths)):
            logits = self._graphed_read(joining, start)
        else:
            logits = self._read(joining, start, lengths)
        now = time.perf_counter()
        for r in joining:
            r.timings.read = now
            r.state = None
        with self._cv:
            self.active.extend(joining)
        self._advance(list(range(start, start + k)), logits)

    def _graphed_read(self, joining: list[Request], start: int) -> Tensor:
        """The join of a model without attention layers, replayed: the states into the graphs' inputs."""
        graphs, k = self.read_graphs, len(joining)
        for row, r in enumerate(joining):
            if r.state is not None:
                graphs.ssm_in[row].copy_(r.state.ssm, non_blocking=True)  # type: ignore[union-attr]
                graphs.conv_in[row].copy_(r.state.conv, non_blocking=True)  # type: ignore[union-attr]
            else:
                graphs.ssm_in[row].zero_()  # type: ignore[union-attr]
                graphs.conv_in[row].zero_()  # type: ignore[union-attr]
        logits = graphs.read([r.prompt_ids for r in joining])  # type: ignore[union-attr]
        self.ssm[start:start + k].copy_(graphs.ssm_out[:k])  # type: ignore[union-attr]
        self.conv[start:start + k].copy_(graphs.conv_out[:k])  # type: ignore[union-attr]
        return logits

    def _read(self, joining: list[Request], start: int, lengths: list[int]) -> Tensor:
        """The join read eagerly; returns the last real position's logits [k, vocab]."""
        engine, model = self.engine, self.model
        k, device = len(joining), engine.device
        if self.has_keys:
            if not start and not self._graph_decode:  # (after a failed step the batch was cleared without _release)
                self.keys = self.values = self.step_graphs = None
            self._fit_kv(start + k, max(r.kv_reserved for r in self.active + joining))
        begun = [engine._start(r.state) for r in joining]
        n_docs = [b[2].shape[3] for b in begun]
        ids = torch.zeros(k, max(lengths), dtype=torch.long)
        for row, r in enumerate(joining):
            ids[row, :lengths[row]] = torch.tensor(r.prompt_ids, dtype=torch.long)
        if self.has_keys:  # each row's documents' keys straight into its slot, read from there
            for row, (_, _, keys, values, _, _, _) in enumerate(begun):
                self.keys[start + row, :, :, :n_docs[row]].copy_(keys[0])  # type: ignore[index]
                self.values[start + row, :, :, :n_docs[row]].copy_(values[0])  # type: ignore[index]
            past = self.keys[start:start + k, :, :, :max(n_docs)]  # type: ignore[index]
            past_values = self.values[start:start + k, :, :, :max(n_docs)]  # type: ignore[index]
        else:
            past, past_values = begun[0][2].expand(k, *begun[0][2].shape[1:]), begun[0][3].expand(k, *begun[0][3].shape[1:])
        # a row's keys after its own (a shorter row's padding) are masked: key_lengths
        ragged_prompts, ragged_keys = len(set(lengths)) > 1, len(set(n_docs)) > 1
        # no padding: the exact forward engine.generate runs
        out = model(ids.to(device), ssm_state=torch.cat([b[0] for b in begun]), conv_state=torch.cat([b[1] for b in begun]),
                    keys=past, values=past_values, position=torch.tensor([b[4] for b in begun], device=device),
                    lengths=torch.tensor(lengths, device=device) if ragged_prompts else None,
                    key_lengths=torch.tensor(n_docs, device=device) if ragged_keys else None, logits="last")
        self.ssm[start:start + k].copy_(out.ssm_state)
        self.conv[start:start + k].copy_(out.conv_state)
        for row, r in enumerate(joining):
            slot, n_doc, n = start + row, n_docs[row], lengths[row]
            if self.has_keys:
                self.keys[slot, :, :, n_doc:n_doc + n].copy_(out.keys[row, :, :, :n])  # type: ignore[index]
                self.values[slot, :, :, n_doc:n_doc + n].copy_(out.values[row, :, :, :n])  # type: ignore[index]
            r.kv_len, r.position = n_doc + n, begun[row][4] + n
        return out.logits[:, 0]

    @torch.inference_mode()
    def _decode(self) -> None:
        n = len(self.active)
        graphs = self.step_graphs
        longest = max(r.kv_len for r in self.active)
        rows, _ = graphs.bucket(n, longest)  # type: ignore[union-attr]
        # the bucket's rows past the active ones read one key from position 0: computed, ignored
        table = torch.zeros(3, rows, dtype=torch.long)
        table[:, :n] = torch.tensor([[r.last_token, r.kv_len, r.position] for r in self.active], dtype=torch.long).T
        table = table.to(self.engine.device, non_blocking=True)
        self.tokens[:rows].copy_(table[0])
        self.kv_lengths[:rows].copy_(table[1])
        self.positions[:rows].copy_(table[2])
        logits = graphs.step(n, longest)[:n]  # type: ignore[union-attr]
        for r in self.active:
            r.kv_len += 1
            r.position += 1
        self.steps += 1
        self.rows_decoded += n
        self._advance(list(range(n)), logits)

    def _advance(self, rows: list[int], logits: Tensor) -> None:
        """Sample one token for each of ``rows`` (logits[j] belongs to rows[j]); finished rows leave."""
        requests = [self.active[i] for i in rows]
        greedy = logits.argmax(-1).tolist()  # one transfer for the whole batch
        sampled = [j for j, r in enumerate(requests) if r.params.temperature > 0]
        failed: dict[int, BaseException] = {}
        if sampled:
            on_host = logits[sampled].float().cpu()
            for j, row_logits in zip(sampled, on_host):
                try:  # a request's own sampling error ends that request only, never the batch
                    greedy[j] = requests[j].sampler(row_logits)
                except Exception as exc:
                    failed[j] = exc
        eos = self.engine.eos_token_id
        now = time.perf_counter()
        finished = []
        for j, (i, request, token) in enumerate(zip(rows, requests, greedy)):
            if request.cancelled:
                self._end(request, "cancelled")
                finished.append(i)
                continue
            if j in failed:
                self.finished["error"] += 1
                request._finish("error", error=failed[j])
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
        """Free ``rows`` of the batch: the last active rows move into the holes (states, keys and
        values copied); an emptied batch frees its key buffer (without graphs)."""
        with self._cv:
            holes = sorted(set(rows))
            gone = set(holes)
            n = len(self.active)
            keep_tail = [i for i in range(n - len(holes), n) if i not in gone]  # rows past the new end that stay
            fill = [h for h in holes if h < n - len(holes)]
            for hole, source in zip(fill, keep_tail):
                self.ssm[hole].copy_(self.ssm[source])
                self.conv[hole].copy_(self.conv[source])
                if self.keys is not None:
                    length = self.active[source].kv_len
                    self.keys[hole, :, :, :length].copy_(self.keys[source, :, :, :length])
                    self.values[hole, :, :, :length].copy_(self.values[source, :, :, :length])  # type: ignore[index]
                self.active[hole] = self.active[source]
            del self.active[n - len(holes):]
            if self.has_keys and not self.active and not self._graph_decode:
                self.keys = self.values = self.step_graphs = None


HybridScheduler = Scheduler  # deprecated alias (one release): Scheduler batches every model
