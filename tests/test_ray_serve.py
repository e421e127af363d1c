"""Two CPU replicas of the OpenAI-compatible server on Ray Serve (picaso_server.ray_serve), sharing a
real Chroma server and a real S3 store (SeaweedFS), answering concurrent requests through Ray
Serve's HTTP proxy on 127.0.0.1, each with its own sources.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow  # starts a Ray cluster: not in `pytest -m "not slow"`

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'ray[serve]')")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from llama_index.core import VectorStoreIndex  # noqa: E402
from llama_index.llms.picaso import PicasoLLM, PicasoStateEncoder, ingest  # noqa: E402
from llama_index.vector_stores.chroma import ChromaVectorStore  # noqa: E402

from picaso_rag import PicasoEngine, save_checkpoint  # noqa: E402
from picaso_rag.s3store import S3StateStore  # noqa: E402

from .ingest_worker import documents, splitter  # noqa: E402
from .llamaindex_world import embed_model, sensitive_engine  # noqa: E402
from .servers import ChromaServer, SeaweedFS, free_ports  # noqa: E402

QUESTIONS = ["Who was Ada Lovelace?", "Where does photosynthesis take place?", "When was the Eiffel Tower built?",
             "What carries sediment to the sea?", "What is a state space model?", "Which river flows to a delta?",
             "What did Lovelace write?", "What turns light into sugar?"]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tokenizer):
    from picaso_server.ray_serve import ReplicaConfig, picaso_app

    root = tmp_path_factory.mktemp("ray-serve")
    chroma, s3 = ChromaServer(root / "chroma"), SeaweedFS(root / "seaweedfs")
    chroma.start()
    s3.start()
    model_dir = root / "model"
    save_checkpoint(sensitive_engine(tokenizer).model, tokenizer, model_dir)
    engine = PicasoEngine.from_pretrained(model_dir)  # the replicas load this checkpoint: same fingerprint
    store = S3StateStore(s3.BUCKET, prefix="ray", client=s3.client())
    llm = PicasoLLM(engine=engine, state_store=store)
    vector_store = ChromaVectorStore(chroma_collection=chroma.client().get_or_create_collection("docs"))
    ingest(documents(1), [splitter(), PicasoStateEncoder(llm, show_progress=False), embed_model()], vector_store,
           show_progress=False)

    port = free_ports(1)[0]
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {**CREDENTIALS, "HF_HUB_OFFLINE": "1"}},
             logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ReplicaConfig(model=str(model_dir), chroma_host="127.0.0.1", chroma_port=chroma.port, collection="docs",
                           s3_bucket=s3.BUCKET, s3_prefix="ray", s3_endpoint_url=s3.endpoint,
                           settings={"model_name": "tiny", "default_max_tokens": 6, "max_batch": 4, "max_queue": 8})
    serve.run(picaso_app(config, num_replicas=2, num_cpus=1), route_prefix="/")
    index = VectorStoreIndex.from_vector_store(vector_store, embed_model=embed_model())
    try:
        yield {"url": f"http://127.0.0.1:{port}/v1", "index": index, "s3": s3}
    finally:
        serve.shutdown()
        ray.shutdown()
        chroma.stop()
        s3.stop()


def test_two_replicas_answer_concurrent_requests_with_their_own_sources(cluster):
    client = openai.OpenAI(base_url=cluster["url"], api_key="unused", max_retries=0, timeout=120)
    retriever = cluster["index"].as_retriever(similarity_top_k=3)
    expected = {q: [n.node.node_id for n in retriever.retrieve(q)] for q in QUESTIONS}

    def ask(question: str):
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": question}], max_tokens=6)
        return question, raw.headers.get("x-picaso-replica"), raw.parse()

    def stored_objects() -> dict[str, str]:
        listing = cluster["s3"].client().list_objects_v2(Bucket=cluster["s3"].BUCKET, Prefix="ray/")
        return {item["Key"]: item["ETag"] for item in listing.get("Contents", [])}

    before = stored_objects()
    assert before  # the states ingested once, by this process, into the shared store
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(ask, QUESTIONS * 2))
    replicas = {replica for _, replica, _ in answers}
    assert len(replicas) == 2 and None not in replicas, replicas  # the proxy used both replicas
    for question, _, reply in answers:
        picaso = reply.model_extra["picaso"]
        assert [s["id"] for s in picaso["sources"]] == expected[question]  # this request's own retrieval
        assert picaso["k"] == 3 and reply.choices[0].message.content is not None
    # the replicas read the documents' states from the shared store: a state encoded again would
    # have been written back (a new object, or a new ETag: each file records when it was written)
    assert stored_objects() == before


def test_a_replica_can_keep_a_budgeted_local_tier_in_front_of_the_shared_store(tmp_path):
    """ReplicaConfig(states=..., s3_bucket=...): the local directory (within states_max_bytes) first, then S3."""
    from picaso_rag import StateStore
    from picaso_rag.cache import BudgetedStore
    from picaso_server.ray_serve import ReplicaConfig, state_stores_of

    both = ReplicaConfig(model="m", chroma_host="127.0.0.1", chroma_port=1, collection="c", states=str(tmp_path / "local"),
                         states_max_bytes=1 << 20, s3_bucket="states", s3_endpoint_url="http://127.0.0.1:1")
    local, shared = state_stores_of(both)
    assert isinstance(local, BudgetedStore) and local.max_bytes == 1 << 20 and isinstance(shared, S3StateStore)
    only_local = ReplicaConfig(model="m", chroma_host="127.0.0.1", chroma_port=1, collection="c", states=str(tmp_path / "l2"))
    assert [type(s) for s in state_stores_of(only_local)] == [StateStore]
    with pytest.raises(ValueError, match="state store"):
        ReplicaConfig(model="m", chroma_host="127.0.0.1", chroma_port=1, collection="c")
    with pytest.raises(ValueError, match="states_max_bytes"):
        ReplicaConfig(model="m", chroma_host="127.0.0.1", chroma_port=1, collection="c", s3_bucket="b", states_max_bytes=1)
