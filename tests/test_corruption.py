"""Items 2 and 6 of the reliability issue: a truncated, bit-flipped, zero-length, NaN, pickled or
foreign-model state file is detected (checksum, format, fingerprint), never used, re-encoded from
the node's text, and reported in the log and in ``response.metadata["picaso"]``; the answer equals
the answer from a clean state (greedy decoding). A pickle payload planted as a state never runs.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import save

from picaso_rag import StateStore, StoreStatus
from picaso_rag.store import _checksum

from .llamaindex_world import build_world, sensitive_engine
from .test_llamaindex import QUESTION, fresh_llm, retrieval_stats, run_query


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    return build_world(tmp_path_factory.mktemp("corruption"), sensitive_engine(tokenizer))


@pytest.fixture(scope="module")
def clean(world):
    """The answer and retrieved nodes with every state intact (from the store, nothing in memory)."""
    return run_query(world, QUESTION, llm=fresh_llm(world))


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def truncated(data, **_):
    return data[: len(data) // 2]


def bit_flipped(data, **_):
    flipped = bytearray(data)
    flipped[-10] ^= 0x01  # one bit of the tensor bytes
    return bytes(flipped)


def zero_length(data, **_):
    return b""


def nan_inside(data, path, **_):
    """A well-formed file with a valid checksum that holds a NaN (a bug upstream, not bit rot)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    tensors["ssm"].view(-1)[0] = float("nan")
    meta["checksum"] = _checksum(tensors, meta)
    return save(tensors, metadata=meta)


def wrong_shape(data, path, **_):
    """A consistent file with a valid checksum, this model's fingerprint and another model's shapes
    (half the state size): only the model's spec, which the LLM passes to the store, tells."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    tensors["ssm"] = tensors["ssm"][..., : tensors["ssm"].shape[-1] // 2].contiguous()
    meta["checksum"] = _checksum(tensors, meta)
    return save(tensors, metadata=meta)


def pickle_payload(data, path, marker, **_):
    torch.save({"ssm": Payload(marker)}, path)  # what a malicious torch checkpoint looks like
    return path.read_bytes()


def foreign_model(data, node_id, text, other, **_):
    """A state of another model (same shapes) copied over this model's file."""
    scratch = StateStore(other["dir"])
    return scratch.put(node_id, other["engine"].encode([text])[0], text=text).read_bytes()


KINDS = {  # what happens to the file -> the status it must get
    "truncated": (truncated, StoreStatus.CORRUPT, "truncated"),
    "bit-flipped": (bit_flipped, StoreStatus.CORRUPT, "checksum"),
    "zero-length": (zero_length, StoreStatus.CORRUPT, "truncated"),
    "nan": (nan_inside, StoreStatus.CORRUPT, "NaN"),
    "wrong shape": (wrong_shape, StoreStatus.CORRUPT, "shape"),
    "pickle payload": (pickle_payload, StoreStatus.CORRUPT, "unpickling can run code"),
    "foreign model": (foreign_model, StoreStatus.OTHER_MODEL, "made by model"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_damaged_state_is_detected_re_encoded_and_reported(world, clean, kind, caplog, tmp_path, tokenizer):
    damage, status, phrase = KINDS[kind]
    fingerprint = world.llm.engine.fingerprint
    victim = clean.response.source_nodes[1].node
    text = victim.get_content(metadata_mode="llm").strip()
    path = world.store.path(victim.node_id, fingerprint)
    marker = tmp_path / "payload-ran"
    other = {"dir": tmp_path / "other", "engine": sensitive_engine(tokenizer, seed=9)}
    path.write_bytes(damage(path.read_bytes(), path=path, marker=marker, node_id=victim.node_id, text=text, other=other))

    found = world.store.get(victim.node_id, fingerprint, text=text, spec=world.llm.engine.state_spec)
    assert found.status is status and found.state is None and phrase in found.detail, found.detail
    llm = fresh_llm(world)
    with caplog.at_level(logging.INFO, logger="picaso_rag.resolver"):
        answer, response, _ = run_query(world, QUESTION, llm=llm)

    assert answer == clean.text  # re-encoded from the node's text: the answer of a clean state
    stats = retrieval_stats(response)
    assert stats["encode_reasons"] == {status.value: 1} and stats["states_encoded"] == 1 and stats["states_loaded"] == 2
    rejected = response.metadata["picaso"]["states_rejected"]
    assert rejected == [{"node_id": victim.node_id, "store": 0, "status": status.value, "detail": found.detail}]
    logged = [r for r in caplog.records if victim.node_id in r.getMessage() and status.value in r.getMessage()]
    assert logged and logged[0].levelno == (logging.WARNING if status is StoreStatus.CORRUPT else logging.INFO)
    assert world.store.get(victim.node_id, fingerprint, text=text).ok  # repaired in place (run_query waited for it)
    assert not marker.exists()  # the pickle never ran


def test_pickled_state_is_refused_by_the_store_and_never_run(tmp_path, engine):
    """The state-file counterpart of test_model.py::test_pickle_payload_in_pytorch_bin_is_refused: the
    store parses only safetensors (no pickle path at all), even when the file is named as a state."""
    store = StateStore(tmp_path / "states")
    path = store.put("n", engine.encode(["some text"])[0], text="some text")
    marker = tmp_path / "pwned"
    torch.save({"ssm": Payload(marker), "conv": torch.zeros(1), "log_decay": torch.zeros(1)}, path)
    found = store.get("n", engine.fingerprint)
    assert found.status is StoreStatus.CORRUPT and "pickle" in found.detail and not marker.exists()
    shutil.copy(path, tmp_path / "states" / "stray.safetensors")
    assert list(store.node_ids()) == [] and not marker.exists()  # listing reads headers only
