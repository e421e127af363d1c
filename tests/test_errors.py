"""Bad input gets a clear error that names the fix."""

from __future__ import annotations

import json

import pytest

from picaso_rag import CheckpointError, Mamba2Config, PicasoEngine, PicasoError, StateMismatchError, save_checkpoint

from .conftest import TOKENIZER_JSON


@pytest.mark.parametrize("texts,match", [
    ([""], "empty"),
    (["   \n\t"], "empty or whitespace"),
    (["fine", ""], "text 1 is empty"),
    ("a plain string", "list of texts"),
])
def test_encode_rejects_empty_text(engine, texts, match):
    with pytest.raises(PicasoError, match=match):
        engine.encode(texts)


def test_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        PicasoEngine.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        PicasoEngine.from_pretrained(tmp_path / "missing" / "deeper")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="neither a mamba_ssm"):
        PicasoEngine.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        PicasoEngine.from_pretrained(tmp_path)


def test_checkpoint_without_weights_or_tokenizer(tmp_path, engine):
    save_checkpoint(engine.model, engine.tokenizer, tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer="):
        PicasoEngine.from_pretrained(tmp_path)
    loaded = PicasoEngine.from_pretrained(tmp_path, tokenizer=TOKENIZER_JSON)  # the fix it names
    assert loaded.fingerprint == engine.fingerprint
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        PicasoEngine.from_pretrained(tmp_path, tokenizer=TOKENIZER_JSON)


def test_weights_that_do_not_match_config(tmp_path, engine):
    save_checkpoint(engine.model, engine.tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing"):
        PicasoEngine.from_pretrained(tmp_path)


def test_mamba1_and_hybrid_configs_are_refused():
    with pytest.raises(CheckpointError, match="Mamba-2"):
        Mamba2Config.from_dict({"d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {}})
    with pytest.raises(CheckpointError, match="attention"):
        Mamba2Config.from_dict({"d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [1]})


def test_hub_id_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local directory"):
        PicasoEngine.from_pretrained("state-spaces/mamba2-130m-does-not-exist")


def test_state_of_a_model_with_other_shapes(engine, tokenizer):
    from .conftest import make_engine

    wider = make_engine(tokenizer, d_model=128)
    with pytest.raises(StateMismatchError):
        engine.read("x", state=wider.encode(["y"])[0])


def test_a_device_this_machine_lacks_is_named_with_the_fix(tmp_path):
    import torch

    from picaso_rag.engine import check_device

    with pytest.raises(PicasoError, match="not a torch device"):
        check_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(PicasoError, match="no usable CUDA GPU.*device='cpu'"):
            PicasoEngine.from_pretrained(tmp_path, device="cuda")  # refused before anything is read
