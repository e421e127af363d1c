"""An app served in a background thread, for tests and benchmarks (not part of the server's API).

Usage::

    with ServerThread(create_app(rag, settings)) as url:   # http://127.0.0.1:<a free port>
        OpenAI(base_url=f"{url}/v1", api_key="-").chat.completions.create(...)
"""

from __future__ import annotations

from typing import Any


class ServerThread:
    """An app served by uvicorn on 127.0.0.1 (a free port) in a background thread: a context manager
    giving the base URL."""

    def __init__(self, app: Any, limit_concurrency: int | None = 512):
        import threading

        import uvicorn

        from .connections import uvicorn_config

        self._server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", 0, limit_concurrency=limit_concurrency))
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="uvicorn")

    def __enter__(self) -> str:
        import time

        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 60 s")
            time.sleep(0.02)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
