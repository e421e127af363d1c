"""Token sampling and incremental detokenisation with stop strings (no model code here)."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .errors import PicasoError


# a stop string's length bound: TextStream checks each prefix of each against the text's end every
# token (quadratic in the length); how many a request may send is the server's bound (4, as OpenAI)
MAX_STOP_CHARS = 256
# below this temperature, softmax(logits / t) is the argmax in float32 (and dividing by t overflows)
GREEDY_BELOW_TEMPERATURE = 1e-4


@dataclass
class SamplingParams:
    """max_new_tokens; temperature 0 = greedy (and any temperature below 1e-4: its limit); top_p in
    (0, 1]; stop strings (of at most 256 characters) end the text (excluded), once it has some
    non-whitespace text (a model often opens an answer with a newline)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        # every value checked for type and range: a NaN temperature or a 2**70 seed must not reach torch
        self.max_new_tokens = _int("max_new_tokens", self.max_new_tokens, "e.g. max_new_tokens=64")
        if self.max_new_tokens < 0:
            raise PicasoError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}.")
        self.temperature = _finite("temperature", self.temperature, "use 0 for greedy decoding, or e.g. 0.7")
        if self.temperature < 0:
            raise PicasoError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        self.top_p = _finite("top_p", self.top_p, "use a value in (0, 1], e.g. 0.9")
        if not 0 < self.top_p <= 1:
            raise PicasoError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.seed is not None:
            self.seed = _int("seed", self.seed, "use an int in [0, 2**64)")
            if not 0 <= self.seed < 2**64:
                raise PicasoError(f"seed must be in [0, 2**64) (torch's generator range), got {self.seed}; "
                                  "use e.g. seed % 2**64.")
        if self.stop is None:
            self.stop = ()
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (list, tuple, set, frozenset)) or not all(isinstance(s, str) for s in self.stop):
            raise PicasoError(f"stop must be a string or a list of strings, got {self.stop!r:.80}.")
        self.stop = tuple(self.stop)
        if any(not s for s in self.stop):
            raise PicasoError('stop strings must be non-empty (an empty one would stop before any text); '
                              'drop "" from stop.')
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise PicasoError(f"stop strings are at most {MAX_STOP_CHARS} characters (the longest here has "
                              f"{max(len(s) for s in self.stop)}); send shorter ones.")


def _int(name: str, value: object, fix: str) -> int:
    if isinstance(value, bool) or isinstance(value, float):
        raise PicasoError(f"{name} must be an int, got {value!r}; {fix}.")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise PicasoError(f"{name} must be an int, got {type(value).__name__} {value!r:.60}; {fix}.") from None


def _finite(name: str, value: object, fix: str) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise PicasoError(f"{name} must be a number, got {type(value).__name__} {value!r:.60}; {fix}.")
    if not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy and 0-d torch floats
        except (TypeError, ValueError):
            raise PicasoError(f"{name} must be a number, got {type(value).__name__} {value!r:.60}; {fix}.") from None
    if isinstance(value, int):
        value = float(value)
    if not math.isfinite(value):
        raise PicasoError(f"{name} must be a finite number, got {value}; {fix}.")
    return value


class Sampler:
    """Picks the next token from logits; seeded, so sampling is reproducible."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: Tensor) -> int:
        if self.params.temperature < GREEDY_BELOW_TEMPERATURE:  # 0, or so close that its limit is the argmax
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / self.params.temperature, dim=-1)
        if self.params.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.params.top_p
            outside[..., 0] = False  # the top token always stays (a top_p that rounds to 0 in fp32 too)
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:  # e.g. NaN logits: no distribution
            raise PicasoError("the model's logits give no probability distribution (NaN or inf); this request cannot be sampled.")
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass
class TextStream:
    """Turns generated token ids into text pieces, holding back incomplete characters and
    anything that could be the start of a stop string."""

    decode: Callable[[list[int]], str]
    stop: Sequence[str] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    stopped: bool = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now final (maybe empty)."""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        self.text = text
        # leading whitespace is not the end of an answer: stop strings count only after real text
        start = len(text) - len(text.lstrip())
        # the earliest occurrence of any stop string ends the text (not the first string in list order)
        found = [p for p in (text.find(s, start) for s in self.stop) if p != -1] if start < len(text) else []
        if found:
            pos = min(found)
            self.text, self.stopped = text[:pos], True
            return self._emit(pos)
        hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return self._emit(len(text) - hold)

    def flush(self) -> str:
        """At the end: release what was held back."""
        if not self.stopped:
            self.text = self.decode(self.ids)
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece
