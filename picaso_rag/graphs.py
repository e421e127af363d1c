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

from .model import ForwardOutput, Mamba2LM


class _ReadGraph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    input_ids: Tensor  # [1, n_tokens]
    ssm_state: Tensor  # [1, L, H, P, N], the state read from
    conv_state: Tensor
    out: ForwardOutput  # logits of the last position and the state after the prompt


class GraphedModel:
    """Batch-1 CUDA graphs of ``model``: one decode step, and prompt reads keyed by length (LRU)."""

    def __init__(self, model: Mamba2LM, max_read_graphs: int = 4, max_read_tokens: int = 512):
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device.")
        self.model = model
        self.max_read_graphs = max_read_graphs
        self.max_read_tokens = max_read_tokens
        self.lock = threading.Lock()
        self.ssm_state, self.conv_state = model.empty_state(1)  # the decoding state, updated in place
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
        ssm_state, conv_state = self.model.empty_state(1)
        graph, out = _capture(lambda: self.model(input_ids, ssm_state=ssm_state, conv_state=conv_state, logits="last"))
        entry = self._reads[n_tokens] = _ReadGraph(graph, input_ids, ssm_state, conv_state, out)
        return entry


class BatchedStepGraphs:
    """Decode-step graphs at bucketed batch sizes over the scheduler's batch tensors.

    ``token_ids`` [max_batch], ``ssm_state`` / ``conv_state`` [max_batch, L, ...]: the graph of
    bucket b steps rows [0, b) in place; rows past the active ones compute on stale states and are
    ignored. Every bucket is captured up front (:meth:`capture_all`): a capture's warm-up steps the
    rows, so it must not run while requests are active. The graphs share one memory pool (they
    never run at once). Usage (what :class:`picaso_rag.scheduler.Scheduler` does on CUDA)::

        graphs = BatchedStepGraphs(model, tokens, ssm, conv); graphs.capture_all()
        logits = graphs.step(n_active)[:n_active]
    """

    def __init__(self, model: Mamba2LM, token_ids: Tensor, ssm_state: Tensor, conv_state: Tensor,
                 buckets: tuple[int, ...] | None = None):
        max_batch = token_ids.shape[0]
        if buckets is None:  # powers of two, and max_batch itself
            buckets = tuple(sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)}))
        self.model, self.buckets = model, buckets
        self.token_ids, self.ssm_state, self.conv_state = token_ids, ssm_state, conv_state
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}

    def bucket(self, n: int) -> int:
        """The smallest bucket holding ``n`` rows."""
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} rows exceed the largest bucket {self.buckets[-1]}")

    @torch.inference_mode()
    def capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for b in sorted(self.buckets, reverse=True):  # largest first: the smaller ones fit in its pool
            self._graphs[b] = _capture(lambda b=b: self.model.step(self.token_ids[:b], self.ssm_state[:b], self.conv_state[:b]),
                                       pool=pool)

    def step(self, n: int) -> Tensor:
        """Step rows [0, bucket(n)); returns their logits [bucket, vocab] (valid until the next replay)."""
        graph, logits = self._graphs[self.bucket(n)]
        graph.replay()
        return logits


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

    def __init__(self, model: Mamba2LM, ssm_in: Tensor, conv_in: Tensor, ssm_out: Tensor, conv_out: Tensor,
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
