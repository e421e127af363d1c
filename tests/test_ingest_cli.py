"""`picaso-rag ingest`: a folder of files into a real Chroma and a state store, idempotent, changed and
removed files followed; then `picaso-rag serve`'s pipeline answers over it."""

from __future__ import annotations

import chromadb
import pytest

from picaso_rag import PicasoEngine, StateStore, save_checkpoint
from picaso_server.cli import parser
from picaso_server import ingest as ingest_cli

from .llamaindex_world import sensitive_engine

FILES = {
    "eiffel.md": "# The Eiffel Tower\n\nThe Eiffel Tower in Paris was completed in 1889 for the World's Fair.",
    "plants/photosynthesis.txt": "Photosynthesis takes place in the chloroplasts of plant cells, turning light into sugar.",
    "rivers.rst": "Rivers carry sediment to the sea, where deltas grow at their mouths.",
}


@pytest.fixture()
def setup(tmp_path, tokenizer):
    model = tmp_path / "model"
    save_checkpoint(sensitive_engine(tokenizer).model, tokenizer, model)
    folder = tmp_path / "notes"
    for name, text in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "image.bin").write_bytes(b"\x00\x01binary")  # not a text format: skipped
    (folder / ".hidden.md").write_text("a hidden file is not ingested", encoding="utf-8")
    db = tmp_path / "db"

    def ingest(*extra: str) -> dict:
        args = parser().parse_args(["ingest", str(folder), "--chroma-path", str(db / "chroma"), "--collection", "notes",
                                    "--states", str(db / "states"), "--model", str(model), "--quiet", *extra])
        ingest_cli.check(args)
        return ingest_cli.run(args)

    return folder, db, model, ingest


def records(db):
    collection = chromadb.PersistentClient(path=str(db / "chroma")).get_collection("notes")
    got = collection.get(include=["metadatas", "documents"])
    return {i: (m["document_id"], d) for i, m, d in zip(got["ids"], got["metadatas"], got["documents"])}


def test_ingest_is_idempotent_and_follows_changed_and_removed_files(setup, capsys):
    folder, db, model, ingest = setup
    first = ingest()
    assert first["files"] == 3 and first["skipped_files"] == 1 and first["documents_ingested"] == 3
    held = records(db)
    assert sorted({doc for doc, _ in held.values()}) == ["notes/eiffel.md", "notes/plants/photosynthesis.txt", "notes/rivers.rst"]
    store, engine = StateStore(db / "states"), PicasoEngine.from_pretrained(model)
    assert sorted(store.node_ids()) == sorted(held)  # a state for every chunk, nothing else
    assert all(store.get(i, engine.fingerprint).ok for i in held)
    from safetensors import safe_open

    with safe_open(str(store.path(next(iter(held)), engine.fingerprint)), "pt") as f:  # stored in bf16 by default
        assert f.get_slice("ssm").get_dtype() == "BF16"
    assert "3 of 3 documents ingested now" in capsys.readouterr().out

    again = ingest()  # nothing changed: nothing encoded, nothing added
    assert again["documents_ingested"] == 0 and again["chunks_added"] == 0 and records(db) == held

    (folder / "rivers.rst").write_text("Rivers carry sediment to the sea; a delta grows where the river slows.", encoding="utf-8")
    changed = ingest()
    assert changed["documents_ingested"] == 1
    now = records(db)
    assert [text for doc, text in now.values() if doc == "notes/rivers.rst"] == [
        "Rivers carry sediment to the sea; a delta grows where the river slows."]
    assert sorted(store.node_ids()) == sorted(now)  # the old chunk's state went with it

    (folder / "eiffel.md").unlink()
    kept = ingest()  # without --prune a removed file stays in the index
    assert kept["documents_pruned"] == 0 and any(doc == "notes/eiffel.md" for doc, _ in records(db).values())
    pruned = ingest("--prune")
    assert pruned["documents_pruned"] == 1
    final = records(db)
    assert sorted({doc for doc, _ in final.values()}) == ["notes/plants/photosynthesis.txt", "notes/rivers.rst"]
    assert sorted(store.node_ids()) == sorted(final)


def test_ingest_names_the_fix_for_bad_arguments(setup, tmp_path):
    folder, db, model, ingest = setup
    with pytest.raises(SystemExit, match="does not exist"):
        ingest_cli.source_files([str(tmp_path / "missing")])
    args = parser().parse_args(["ingest", str(folder), "--collection", "c", "--states", "s", "--model", str(model)])
    with pytest.raises(SystemExit, match="--chroma-path DIR or --chroma-host"):
        ingest_cli.check(args)


def test_serve_refuses_an_index_whose_states_are_another_models(setup, tokenizer):
    from picaso_server.cli import states_problem

    folder, db, model, ingest = setup
    ingest()
    collection = chromadb.PersistentClient(path=str(db / "chroma")).get_collection("notes")
    args = parser().parse_args(["serve", "--chroma-path", str(db / "chroma"), "--collection", "notes",
                                "--states", str(db / "states"), "--model", str(model)])
    store = StateStore(db / "states")
    assert states_problem(collection, store, PicasoEngine.from_pretrained(model), args) is None
    problem = states_problem(collection, store, sensitive_engine(tokenizer, seed=7), args)
    assert problem and "another model" in problem and "--reencode" in problem and "picaso-rag ingest" in problem


def test_an_unreadable_file_is_skipped_by_name_and_the_rest_ingested(setup, caplog, monkeypatch):
    """A file the OS refuses to read (permissions do not stop root, so the refusal is simulated at the
    read) and a dangling link: each named, the other files ingested."""
    from pathlib import Path

    folder, db, model, ingest = setup
    (folder / "dangling.md").symlink_to(folder / "no-such-target.md")
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self.name == "rivers.rst" else real(self))
    with caplog.at_level("INFO", logger="picaso_server.ingest"):
        summary = ingest()
    assert summary["documents_ingested"] == 2 and summary["skipped_files"] == 2  # image.bin, dangling.md
    assert "rivers.rst: cannot read it (Permission denied)" in caplog.text and "dangling.md" in caplog.text
