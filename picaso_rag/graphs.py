"""CUDA graphs for the two launch-bound steps of answering: reading a short prompt, and decoding.

At batch 1 a Mamba-2 layer is about ten small kernels; eagerly, the CPU cannot launch them as
fast as the GPU runs them (a 64-layer model spends longer launching than computing). A CUDA
graph replays a whole forward with one launch. Graphs need fixed shapes and fixed addresses, so
each one reads from and writes to its own static tensors, and the state is copied in and out
(a few MiB, microseconds). One :class:`GraphedModel` serves one caller at a time (its lock).

Usage (what :class:`~picaso_rag.engine.PicasoEngine` does on CUDA)::

    graphs = GraphedModel(model)
    with graphs.lock:
        logits = graphs.read(prompt_ids, ssm_state, conv_state)   # [vocab]; the state is kept
        logits = graphs.step(next_token)                          # decode, state updated in place
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .model import ModelOutput, PicasoLM


class _ReadGraph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    input_ids: Tensor  # [1, n_tokens]
    ssm_state: Tensor  # [1, L, H, P, N], the state read from
    conv_state: Tensor
    out: ModelOutput  # logits of the last position and the state after the prompt


class GraphedModel:
    """Batch-1 CUDA graphs of ``model``: one decode step, and prompt reads keyed by length (LRU)."""

    def __init__(self, model: PicasoLM, max_read_graphs: int = 4, max_read_tokens: int = 512):
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device.")
        self.model = model
        self.max_read_graphs = max_read_graphs
        self.max_read_tokens = max_read_tokens
        self.lock = threading.Lock()
        self.ssm_state, self.conv_state = model.empty_state(1)[:2]  # the decoding state, updated in place
        self._token = torch.zeros(1, dtype=torch.long, device=model.device)
        self._step: tuple[torch.cuda.CUDAGraph, Tensor] | None = None
        self._reads: OrderedDict[int, _ReadGraph] = OrderedDict()

    @torch.inference_mode()
    def read(self, input_ids: list[int], ssm_state: Tensor | None, conv_state: Tensor | None) -> Tensor:
        """Read ``input_ids`` from the state [1, L, ...] (None: from nothing); the state after them
        becomes the decoding state. Returns the last position's logits [vocab].

        Prompts longer than ``max_read_tokens`` are read eagerly: they are compute-bound, and each
        length would cost a graph."""
        if self._step is None:  # capture decoding first: its warm-up overwrites the decoding state
            self._step = _capture(lambda: self.model.step(self._token, self.ssm_state, self.conv_state))
        if len(input_ids) > self.max_read_tokens:
            out = self.model(torch.tensor([input_ids], device=self.model.device), ssm_state=ssm_state,
                             conv_state=conv_state, logits="last")
            self.ssm_state.copy_(out.ssm_state)
            self.conv_state.copy_(out.conv_state)
            return out.logits[0, -1]
        entry = self._read_graph(len(input_ids))
        entry.input_ids.copy_(torch.tensor([input_ids], dtype=torch.long), non_blocking=True)
        if ssm_state is None:
            entry.ssm_state.zero_()
            entry.conv_state.zero_()
        else:
            entry.ssm_state.copy_(ssm_state)
            entry.conv_state.copy_(conv_state)
        entry.graph.replay()
        self.ssm_state.copy_(entry.out.ssm_state)
        self.conv_state.copy_(entry.out.conv_state)
        return entry.out.logits[0, -1]

    @torch.inference_mode()
    def step(self, token: int) -> Tensor:
        """Feed one token to the decoding state; returns the next logits [vocab] (valid until the next call)."""
        graph, logits = self._step  # type: ignore[misc]
        self._token.fill_(token)
        graph.replay()
        return logits[0]

    def _read_graph(self, n_tokens: int) -> _ReadGraph:
        entry = self._reads.get(n_tokens)
        if entry is not None:
            self._reads.move_to_end(n_tokens)
            return entry
        while len(self._reads) >= self.max_read_graphs:
            self._reads.popitem(last=False)  # frees that graph's memory pool
        device = self.model.device
        input_ids = torch.zeros(1, n_tokens, dtype=torch.long, device=device)
        ssm_state, conv_state = self.model.empty_state(1)[:2]
        graph, out = _capture(lambda: self.model(input_ids, ssm_state=ssm_state, conv_state=conv_state, logits="last"))
        entry = self._reads[n_tokens] = _ReadGraph(graph, input_ids, ssm_state, conv_state, out)
        return entry


class BatchedReadGraphs:
    """Graphs of the joining read: ``rows`` prompts, right-padded to a bucketed length, each read from
    its own state, at bucketed (rows, length) shapes. Eagerly, a 64-layer forward over a few tokens is
    launch-bound (about 120 ms for a 2.7B model on an H200, whatever the rows); replayed, it costs
    its compute. The inputs and the states after the prompts live in static tensors shared by every
    graph (stored layer-major, see :class:`picaso_rag.scheduler.Scheduler`), so the graphs' memory
    pool holds only one graph's intermediates. Usage::

        graphs = BatchedReadGraphs(model, ssm_in, conv_in, ssm_out, conv_out); graphs.capture_all()
        logits = graphs.read(token_lists)   # after ssm_in[:k] / conv_in[:k] were filled; [k, vocab]
    """

    def __init__(self, model: PicasoLM, ssm_in: Tensor, conv_in: Tensor, ssm_out: Tensor, conv_out: Tensor,
                 lengths: tuple[int, ...] = (64, 128)):
        max_rows = ssm_in.shape[0]
        self.model = model
        self.rows = tuple(sorted({min(1 << i, max_rows) for i in range(max_rows.bit_length() + 1)}))
        self.lengths = tuple(sorted(lengths))
        self.ssm_in, self.conv_in, self.ssm_out, self.conv_out = ssm_in, conv_in, ssm_out, conv_out
        self.input_ids = torch.zeros(max_rows, self.lengths[-1], dtype=torch.long, device=model.device)
        self.n_tokens = torch.ones(max_rows, dtype=torch.long, device=model.device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}

    def fits(self, n_rows: int, longest: int) -> bool:
        return n_rows <= self.rows[-1] and longest <= self.lengths[-1]

    def _run(self, rows: int, length: int) -> Tensor:
        out = self.model(self.input_ids[:rows, :length], ssm_state=self.ssm_in[:rows], conv_state=self.conv_in[:rows],
                         lengths=self.n_tokens[:rows], logits="last")
        self.ssm_out[:rows].copy_(out.ssm_state)
        self.conv_out[:rows].copy_(out.conv_state)
        return out.logits

    @torch.inference_mode()
    def capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for length in sorted(self.lengths, reverse=True):
            for rows in sorted(self.rows, reverse=True):
                self._graphs[rows, length] = _capture(lambda r=rows, n=length: self._run(r, n), pool=pool)

    @torch.inference_mode()
    def read(self, token_lists: list[list[int]]) -> Tensor:
        """Read the prompts (row i from ssm_in[i] / conv_in[i]); states after them land in ssm_out / conv_out.
        Returns the last real position's logits [len(token_lists), vocab]."""
        k = len(token_lists)
        rows = next(b for b in self.rows if b >= k)
        length = next(n for n in self.lengths if n >= max(len(t) for t in token_lists))
        ids = torch.zeros(rows, length, dtype=torch.long)
        n_tokens = torch.ones(rows, dtype=torch.long)  # padding rows read one token from a zero state: ignored
        for row, t in enumerate(token_lists):
            ids[row, :len(t)] = torch.tensor(t, dtype=torch.long)
            n_tokens[row] = len(t)
        self.input_ids[:rows, :length].copy_(ids)
        self.n_tokens[:rows].copy_(n_tokens)
        if rows > k:
            self.ssm_in[k:rows].zero_()
            self.conv_in[k:rows].zero_()
        graph, logits = self._graphs[rows, length]
        graph.replay()
        return logits[:k, 0]


class StepGraphs:
    """One decode step of any model over static slot buffers, captured per (rows, key span) bucket
    and replayed (a model without attention layers has zero-size key buffers and one span, 0).

    The buffers are a batch of slots (rows): ``token_ids`` [R]; the SSM layers' ``ssm_state`` /
    ``conv_state`` [R, n_ssm, ...]; the attention layers' ``keys`` / ``values`` [R', n_attn, kv_heads,
    capacity, head_dim] (R' <= R rows), row r holding ``lengths[r]`` keys; ``positions`` [R] each row's
    RoPE position. The step of bucket (rows, span) writes each row's new key at ``lengths[r]`` and
    attends over keys [0, span) with a length mask: span is the smallest bucket (powers of two from
    ``min_span``, and the capacity) above every row's length, so attention never reads more than twice
    the keys in use, nor the empty rest of the buffer. Rows past the active ones must have
    ``lengths`` 0 (they compute on stale state; their outputs are ignored).

    A graph is captured the first time its bucket is needed; its warm-up steps the rows, so the SSM
    states of those rows are saved and put back around it (keys are only written at ``lengths[r]``,
    which the real step then overwrites). With ``graphed=False`` (the CPU, or a model whose step cannot
    be captured, e.g. MoE routing that syncs with the host) the step runs eagerly at the exact shapes
    (``bucketed=True``: at the bucketed ones, the reference path of what the graphs replay; on the CPU
    the padding would only cost time). Buffers keep their addresses for the object's lifetime:
    a caller that reallocates them makes a new one. Usage::

        graphs = StepGraphs(model, tokens, ssm, conv, keys, values, lengths, positions, graphed=True)
        logits = graphs.step(n_active, longest=max_length)[:n_active]   # then lengths += 1, positions += 1
    """

    def __init__(self, model: torch.nn.Module, token_ids: Tensor, ssm_state: Tensor, conv_state: Tensor, keys: Tensor,
                 values: Tensor, lengths: Tensor, positions: Tensor, graphed: bool = True, min_span: int = 64,
                 bucketed: bool | None = None):
        self.model = model
        self.token_ids, self.ssm_state, self.conv_state = token_ids, ssm_state, conv_state
        self.keys, self.values, self.lengths, self.positions = keys, values, lengths, positions
        max_rows, capacity = keys.shape[0], keys.shape[3]
        self.row_buckets = tuple(sorted({min(1 << i, max_rows) for i in range(max_rows.bit_length() + 1)}))
        self.span_buckets = tuple(sorted({min(min_span << i, capacity) for i in range(max(capacity, 1).bit_length() + 1)}))
        self.has_keys = keys.shape[1] > 0  # no attention layers: no keys to read, one span
        self.graphed = graphed and keys.device.type == "cuda" and step_is_capturable(model)
        self.bucketed = self.graphed if bucketed is None else bucketed
        self.error: str | None = None  # why graphs were turned off, if a capture failed
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphed else None

    def bucket(self, n_rows: int, longest: int) -> tuple[int, int]:
        """(rows, span) of the step for ``n_rows`` active rows whose longest holds ``longest`` keys."""
        if not self.bucketed:
            if n_rows > self.keys.shape[0] or (self.has_keys and longest >= self.keys.shape[3]):
                raise ValueError(f"{n_rows} rows of up to {longest} keys exceed the buffers {tuple(self.keys.shape)}")
            return n_rows, longest + 1 if self.has_keys else 0
        rows = next((b for b in self.row_buckets if b >= n_rows), None)
        span = next((s for s in self.span_buckets if s > longest), None) if self.has_keys else 0
        if rows is None or span is None:
            raise ValueError(f"{n_rows} rows of up to {longest} keys exceed the buffers "
                             f"({self.row_buckets[-1]} rows, {self.span_buckets[-1]} keys)")
        return rows, span

    def _run(self, rows: int, span: int) -> Tensor:
        return self.model.step(self.token_ids[:rows], self.ssm_state[:rows], self.conv_state[:rows],
                               self.keys[:rows, :, :, :span], self.values[:rows, :, :, :span],
                               self.lengths[:rows], self.positions[:rows])

    @torch.inference_mode()
    def step(self, n_rows: int, longest: int) -> Tensor:
        """Step rows [0, rows) of the bucket; returns their logits [rows, vocab] (valid until the next step)."""
        rows, span = self.bucket(n_rows, longest)
        if not self.graphed:
            return self._run(rows, span)
        entry = self._graphs.get((rows, span))
        if entry is None:
            saved = self.ssm_state[:rows].clone(), self.conv_state[:rows].clone()
            try:
                entry = self._graphs[rows, span] = _capture(lambda: self._run(rows, span), pool=self._pool)  # type: ignore[assignment]
            except Exception as exc:  # decode eagerly from now on: slower, still correct
                self.graphed, self.error = False, repr(exc)
                return self._run(rows, span)
            finally:
                self.ssm_state[:rows].copy_(saved[0])
                self.conv_state[:rows].copy_(saved[1])
        graph, logits = entry  # type: ignore[misc]
        graph.replay()
        return logits

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every row bucket now (a model without attention layers: its one span), largest
        first so the smaller ones fit in its pool. Its warm-ups step the rows: call it while idle."""
        if self.graphed and not self.has_keys:
            for rows in sorted(self.row_buckets, reverse=True):
                self.step(rows, 0)

    def n_graphs(self) -> int:
        return len(self._graphs)


HybridStepGraphs = StepGraphs  # deprecated alias (one release)


def step_is_capturable(model: torch.nn.Module) -> bool:
    """Whether ``model.step`` can be captured: MoE layers route on the host (which experts run is
    read back each step), so models with them decode eagerly."""
    cfg = model.cfg
    return not (getattr(cfg, "n_experts", 0) or "moe" in getattr(cfg, "layer_types", ()))


def _capture(fn: Callable[[], object], pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Capture ``fn`` after two warm-up runs on a side stream (Triton compiles and autotunes
    there, and cuBLAS picks its kernels, neither of which may happen during a capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
