"""The OpenAI-compatible server as N Ray Serve replicas sharing one Chroma server and one S3 state store.

Usage (``pip install "ray[serve]" boto3``)::

    import ray
    from ray import serve
    from picaso_server.ray_serve import ReplicaConfig, picaso_app

    config = ReplicaConfig(model="models/picaso-mini", chroma_host="chroma.internal", chroma_port=8000,
                           collection="docs", s3_bucket="picaso-states", s3_endpoint_url="http://s3.internal:8333")
    ray.init()                                     # or ray.init(address="auto") on a cluster
    serve.start(http_options={"host": "0.0.0.0", "port": 8000})
    serve.run(picaso_app(config, num_replicas=4, num_gpus=1), route_prefix="/")
    # any OpenAI client: base_url="http://<head>:8000/v1"

Each replica is a Ray actor that builds the whole server (:func:`picaso_server.create_app`) from
the config when it starts: its own model, scheduler, state cache and embedding model; retrieval
through ``chromadb.HttpClient`` (the shared index) and document states from the shared
:class:`~picaso_rag.s3store.S3StateStore` (or a local ``states`` directory, one per machine).
Ray Serve's HTTP proxy spreads requests over the replicas; each response carries the replica
that served it in the ``x-picaso-replica`` header. Nothing is shared between replicas in memory:
a replica that dies loses only its in-flight requests (Ray Serve restarts it), and the index and
states live on in Chroma and the object store. See docs/scaling.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .rag import ServerSettings


@dataclass(frozen=True)
class ReplicaConfig:
    """What every replica builds its server from (plain values: Ray ships it to each replica).

    ``states``: a local StateStore directory; ``s3_bucket``: the shared S3 store (``s3_prefix``,
    ``s3_endpoint_url``, ``s3_mac_key``: the path of a key file present on every replica). Both: the
    local directory is a tier in front of the shared store (states found in S3 are copied there in
    the background), kept within ``states_max_bytes`` when given (least recently used out).
    ``settings``: :class:`~picaso_server.rag.ServerSettings` fields.
    """

    model: str
    chroma_host: str
    chroma_port: int
    collection: str
    states: str | None = None
    states_max_bytes: int | None = None
    s3_bucket: str | None = None
    s3_prefix: str = "picaso"
    s3_endpoint_url: str | None = None
    s3_mac_key: str | None = None
    device: str = "cpu"
    embed_model: str | None = None
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.states is None and self.s3_bucket is None:
            raise ValueError("give the replicas a state store: states='<directory>', s3_bucket='<bucket>', or both "
                             "(the directory then a local tier in front of the bucket).")
        if self.states_max_bytes is not None and (self.states is None or self.states_max_bytes < 0):
            raise ValueError("states_max_bytes bounds the local states directory: give states='<directory>' and a "
                             "budget >= 0.")
        unknown = set(self.settings) - set(ServerSettings.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown server settings {sorted(unknown)}; see picaso_server.ServerSettings.")


def state_stores_of(config: ReplicaConfig) -> list[Any]:
    """The replica's state stores, nearest first: the local directory (budgeted), the shared S3 store."""
    stores: list[Any] = []
    if config.states is not None:
        from picaso_rag import StateStore
        from picaso_rag.cache import BudgetedStore

        local = StateStore(config.states)
        stores.append(local if config.states_max_bytes is None else BudgetedStore(local, config.states_max_bytes))
    if config.s3_bucket is not None:
        from picaso_rag.s3store import S3StateStore

        stores.append(S3StateStore(config.s3_bucket, prefix=config.s3_prefix, endpoint_url=config.s3_endpoint_url,
                                   mac_key=config.s3_mac_key))
    return stores


def build_app(config: ReplicaConfig) -> Any:
    """The FastAPI app of one replica (run on the replica, when Ray Serve starts it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import chromadb

    from picaso_rag import PicasoEngine

    from .app import create_app
    from .cli import build_pipeline, load_embed_model

    settings = ServerSettings(**{"model_name": os.path.basename(os.path.normpath(config.model)), **config.settings})
    engine = PicasoEngine.from_pretrained(config.model, device=config.device)
    collection = chromadb.HttpClient(host=config.chroma_host, port=config.chroma_port).get_collection(config.collection)
    app = create_app(build_pipeline(engine, state_stores_of(config), collection, load_embed_model(config.embed_model), settings),
                     settings)
    replica = _replica_name()

    @app.middleware("http")
    async def tag_replica(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["x-picaso-replica"] = replica
        return response

    return app


def _replica_name() -> str:
    try:
        from ray import serve

        context = serve.get_replica_context()
        replica_id = getattr(context, "replica_id", None)
        return str(getattr(replica_id, "unique_id", None) or getattr(context, "replica_tag", None) or replica_id)
    except Exception:  # noqa: BLE001 - outside Ray Serve
        return f"pid-{os.getpid()}"


def picaso_app(config: ReplicaConfig, num_replicas: int = 2, num_cpus: float = 1, num_gpus: float = 0,
               max_ongoing_requests: int | None = None) -> Any:
    """A Ray Serve application of ``num_replicas`` replicas of the server (pass it to ``serve.run``).

    ``num_gpus``: GPUs per replica (1 for one model per GPU). ``max_ongoing_requests``: what Ray
    Serve sends one replica at a time (default: the server's own bound, max_queue + max_batch).
    """
    from ray import serve

    settings = ServerSettings(**config.settings)
    limit = max_ongoing_requests or settings.max_queue + settings.max_batch

    class PicasoServer:
        """One replica: the app that ``build_app`` makes (Ray Serve calls the builder on the replica)."""

    def builder() -> Any:  # a plain function (Ray Serve calls builders on the replica; a partial it would mount as an app)
        return build_app(config)

    ingress = serve.ingress(builder)(PicasoServer)
    deployment = serve.deployment(ingress, name="picaso", num_replicas=num_replicas, max_ongoing_requests=limit,
                                  ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus})
    return deployment.bind()


__all__ = ["ReplicaConfig", "build_app", "picaso_app", "state_stores_of"]
