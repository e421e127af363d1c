"""Deprecated module (kept for one release): :class:`picaso_rag.engine.PicasoEngine` runs every model."""

from .engine import PicasoEngine

HybridEngine = PicasoEngine
