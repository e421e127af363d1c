"""PicasoLLM's constructor and accounting (issue 11, point 6): tokenizer=, unknown arguments, devices,
usage fields and LlamaIndex's TokenCountingHandler, and text answers after stock templates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llama_index.core import Settings
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.prompts.default_prompts import DEFAULT_TEXT_QA_PROMPT
from llama_index.llms.picaso import PicasoLLM, PicasoNodePostprocessor

from picaso_rag import PicasoError

from .llamaindex_world import build_world, sensitive_engine

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "models" / "picaso-mini"


@pytest.fixture(scope="module")
def mini() -> PicasoLLM:
    return PicasoLLM(model=str(MINI), tokenizer=str(MINI / "tokenizer.json"), max_new_tokens=8, stop=["\n"])


def test_tokenizer_argument(mini, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    assert mini.engine.tokenize("Paris") == mini.engine.tokenizer.encode("Paris")
    vocab = {f"w{i}": i for i in range(mini.engine.model.cfg.vocab_size + 100)}  # more tokens than the model has
    HFTokenizer(WordLevel(vocab, unk_token="w0")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(PicasoError, match="tokenizer"):  # a model with a tokenizer of another vocabulary size
        PicasoLLM(model=str(MINI), tokenizer=str(tmp_path / "tokenizer.json"))
    with pytest.raises(PicasoError, match="engine already has its tokenizer"):
        PicasoLLM(engine=mini.engine, tokenizer=str(MINI / "tokenizer.json"))
    by_dir = PicasoLLM(model=str(MINI), tokenizer=str(MINI))  # a directory holding tokenizer.json, as documented
    assert by_dir.engine.tokenize("Paris") == mini.engine.tokenize("Paris")
    with pytest.raises(PicasoError, match="no tokenizer at"):
        PicasoLLM(model=str(MINI), tokenizer=str(tmp_path / "empty-dir"))


@pytest.mark.parametrize("typo, hint", [("tokenizr", "tokenizer"), ("max_tokens", "max_new_tokens"),
                                        ("temprature", "temperature"), ("state_cache", "state_cache_bytes")])
def test_unknown_arguments_raise_with_a_hint(mini, typo, hint):
    with pytest.raises(PicasoError, match=f"unknown argument '{typo}'.*did you mean '{hint}'"):
        PicasoLLM(engine=mini.engine, **{typo: 1})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_unavailable_device_names_the_fix(device):
    with pytest.raises(PicasoError, match="device='cpu'"):
        PicasoLLM(model=str(MINI), device=device)


def test_bad_device_string_names_the_fix():
    with pytest.raises(PicasoError, match="not a torch device"):
        PicasoLLM(model=str(MINI), device="gpu please")


def test_stock_template_ending_in_a_space_gives_a_text_answer(mini):
    prompt = DEFAULT_TEXT_QA_PROMPT.format(context_str="The Eiffel Tower was completed in 1889 in Paris.",
                                           query_str="When was the Eiffel Tower completed?")
    assert prompt.endswith("Answer: ")
    answer = mini.complete(prompt, formatted=True).text
    assert any(ch.isalnum() for ch in answer), repr(answer)
    # generation starts after the colon (the space belongs to the answer's first word)
    assert answer == mini.engine.generate(prompt.rstrip(" "), max_new_tokens=8, stop=["\n"]).text


def test_usage_fields_and_token_counting_report_what_was_read(tmp_path, tokenizer):
    world = build_world(tmp_path, sensitive_engine(tokenizer))
    counter = TokenCountingHandler(tokenizer=lambda text: world.llm.engine.tokenize(text))
    llm = PicasoLLM(engine=world.llm.engine, state_store=world.store, max_new_tokens=6)
    for method in ["picaso-s", "concat"]:
        counter.reset_counts()
        previous, Settings.callback_manager = Settings.callback_manager, CallbackManager([counter])  # as users do
        try:
            engine = world.index.as_query_engine(llm=llm, similarity_top_k=3,
                                                 node_postprocessors=[PicasoNodePostprocessor(llm, method=method)])
            response = engine.query("When was the Eiffel Tower completed?")
        finally:
            Settings.callback_manager = previous
        meta = response.metadata["picaso"]
        assert counter.prompt_llm_token_count == meta["tokens_read"]
        assert counter.completion_llm_token_count == sum(c["new_tokens"] for c in meta["calls"])
        if method == "picaso-s":
            composed_prompt_tokens = counter.prompt_llm_token_count
            assert meta["document_tokens"] > 0
    assert composed_prompt_tokens + meta["document_tokens"] <= counter.prompt_llm_token_count + 8
    completion = llm.complete("The capital of France is")
    usage = completion.raw["usage"]
    assert usage["prompt_tokens"] == len(llm.engine.tokenize("The capital of France is"))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
