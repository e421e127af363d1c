"""picaso-server: an OpenAI-compatible chat server over picaso-rag (docs/serving.md).

Usage::

    picaso-rag serve --chroma-path ./picaso_db/chroma --collection picaso_quickstart \\
        --states ./picaso_db/states --model models/picaso-mini

or, in Python: ``create_app(build_pipeline(engine, [state_store], collection, embed_model, settings), settings)``.
"""

from .app import create_app
from .cli import build_pipeline, load_embed_model
from .rag import RagPipeline, ServerSettings

__all__ = ["RagPipeline", "ServerSettings", "build_pipeline", "create_app", "load_embed_model"]
