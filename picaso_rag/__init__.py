"""picaso-rag: retrieval-augmented generation from composed Mamba-2 states (PICASO, ICLR 2025).

Usage::

    from picaso_rag import PicasoEngine
    engine = PicasoEngine.from_pretrained("path/to/mamba2-checkpoint")
    context = engine.compose(engine.encode(documents), method="picaso-s")
    answer = engine.generate("Question: ...\\nAnswer:", state=context).text
"""

from .cache import CacheStats, StateCache
from .compose import CONV_POLICIES, METHODS, compose, log_weights
from .config import Mamba2Config, ModelConfig
from .engine import Generation, PicasoEngine
from .errors import CheckpointError, PicasoError, StateMismatchError, StoreNotWritableError, StoreUnavailableError
from .generation import SamplingParams
from .hybrid import HybridLM
from .hybrid_config import HybridConfig
from .hybrid_engine import HybridEngine
from .loading import Tokenizer, fingerprint_of, load_checkpoint, save_checkpoint, save_hybrid_checkpoint
from .model import Mamba2LM, PicasoLM, init_weights
from .resolver import DocumentRef, Resolution, StateResolver, StateWriter
from .scheduler import QueueFullError, Request, Scheduler
from .state import HybridState, State
from .store import StateStore, StoredState, StoreStatus, text_sha256

__version__ = "0.1.0"

__all__ = [
    "CONV_POLICIES",
    "CacheStats",
    "METHODS",
    "CheckpointError",
    "DocumentRef",
    "Generation",
    "HybridConfig",
    "HybridEngine",
    "HybridLM",
    "HybridState",
    "Mamba2Config",
    "Mamba2LM",
    "ModelConfig",
    "PicasoEngine",
    "PicasoError",
    "PicasoLM",
    "QueueFullError",
    "Request",
    "Resolution",
    "SamplingParams",
    "Scheduler",
    "State",
    "StateCache",
    "StateMismatchError",
    "StateResolver",
    "StateStore",
    "StateWriter",
    "StoreNotWritableError",
    "StoreUnavailableError",
    "StoreStatus",
    "StoredState",
    "Tokenizer",
    "compose",
    "fingerprint_of",
    "init_weights",
    "load_checkpoint",
    "log_weights",
    "save_checkpoint",
    "save_hybrid_checkpoint",
    "text_sha256",
]
