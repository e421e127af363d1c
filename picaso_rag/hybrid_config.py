"""Deprecated module (kept for one release): every model is described by :class:`picaso_rag.config.ModelConfig`."""

from .adapters import FFN_KINDS, HYBRID_MODEL_TYPES, LAYER_KINDS, is_hybrid_config  # noqa: F401
from .config import ModelConfig

HybridConfig = ModelConfig
