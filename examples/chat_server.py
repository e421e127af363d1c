"""A chatbot backend over the quickstart's index: picaso-server (OpenAI API) on the example corpus.

    python examples/chat_server.py [--model DIR] [--db ./picaso_db] [--port 8000]

It ingests the corpus on first use (as the quickstart does), then serves it exactly as
``picaso-rag serve --chroma-path picaso_db/chroma --collection picaso_quickstart --states picaso_db/states
--model models/picaso-mini`` would. Talk to it with any OpenAI client (docs/serving.md)::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    reply = client.chat.completions.create(model="picaso-mini", messages=[{"role": "user", "content": "Who was Ada Lovelace?"}])
    print(reply.choices[0].message.content, reply.model_extra["picaso"]["sources"])
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rag_demo import TRAINED_MODEL, load_embed_model, load_engine, open_index, open_state_store  # noqa: E402

from llama_index.llms.picaso import PicasoLLM  # noqa: E402
from picaso_server import RagPipeline, ServerSettings, create_app as server_app  # noqa: E402


def create_app(model: str | None = None, db: str | Path = "picaso_db", device: str = "cpu", **settings):
    """The server's app over the example corpus; ``settings``: :class:`ServerSettings` fields."""
    engine, description = load_engine(model, device=device)
    llm = PicasoLLM(engine=engine, state_store=open_state_store(db))
    index, _ = open_index(db, llm, load_embed_model(), show_progress=False)
    # the model id clients send: the checkpoint's directory name, as `picaso-rag serve` names it
    trained = model not in (None, "random") or (model is None and (TRAINED_MODEL / "config.json").is_file())
    name = Path(model or TRAINED_MODEL).name if trained else "picaso-random"
    settings = ServerSettings(**{"model_name": name, **settings})
    app = server_app(RagPipeline(engine, index, index.vector_store, settings, state_stores=[llm.state_store]), settings)
    app.description = description
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory; default models/picaso-mini; 'random' for the tiny random model")
    parser.add_argument("--db", default="picaso_db")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    import uvicorn

    app = create_app(args.model, db=args.db, device=args.device)
    print(app.description, f"\nOpenAI API on http://{args.host}:{args.port}/v1 (model {app.state.server.settings.model_name!r})",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, limit_concurrency=512, timeout_keep_alive=5, log_level="warning")


if __name__ == "__main__":
    main()
