"""Deprecated module (kept for one release): every model, hybrid or not, is :class:`picaso_rag.model.PicasoLM`."""

from .layers import Attention, SigmoidRouter, apply_rope, attend, rope_cos_sin  # noqa: F401
from .model import HybridLM, HybridOutput, init_weights  # noqa: F401
