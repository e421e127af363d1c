"""The text-keyed hand-off between PicasoNodePostprocessor and PicasoLLM (no model needed)."""

from __future__ import annotations

import random

from llama_index.llms.picaso.handoff import DocumentRef, Handoff, Ticket, _py_escaped
from llama_index.llms.picaso.metadata import summarize

DOCS = [DocumentRef.of(t, f"n{i}") for i, t in enumerate([
    "title: Eiffel\n\nThe Eiffel Tower was completed in 1889.",
    "title: Reef\n\nThe Great Barrier Reef lies off Queensland; it's huge.",
    "title: Bees\n\nHoney bees dance to say where \"flowers\" are.",
])]
PREFIX = "Context information is below.\n---------------------\n"
SUFFIX = "\n---------------------\nQuery: when?\nAnswer: "


def handoff_with(*tickets: Ticket) -> Handoff:
    handoff = Handoff()
    for ticket in tickets:
        handoff.register(ticket)
    return handoff


def pieces(plan) -> list:
    return [plan.text(s) if s.is_text else [d.node_id for d in s.documents] for s in plan.segments]


def test_compact_prompt_is_prefix_block_suffix():
    prompt = PREFIX + "\n\n".join(d.text for d in DOCS) + SUFFIX
    plan = handoff_with(Ticket("picaso-s", "mean", DOCS)).plan(prompt)
    assert pieces(plan) == [PREFIX, ["n0", "n1", "n2"], SUFFIX]
    assert plan.ticket.method == "picaso-s" and not plan.ambiguous


def test_simple_summarize_list_repr_is_recognised():
    """llama-index-core 0.14 formats simple_summarize's chunk *list* into the prompt, escaped."""
    context = ["\n".join(d.text for d in DOCS)]
    prompt = f"{PREFIX}{context}{SUFFIX}"
    assert DOCS[0].text not in prompt  # the plain text is not there...
    plan = handoff_with(Ticket("picaso-s", "mean", DOCS)).plan(prompt)
    quote = repr(context[0])[0]
    assert pieces(plan) == [PREFIX + "[" + quote, ["n0", "n1", "n2"], quote + "]" + SUFFIX]  # ...but found


def test_text_between_documents_splits_blocks_and_a_trailing_document_is_read():
    prompt = PREFIX + DOCS[0].text + "\nSome other words.\n" + DOCS[1].text + SUFFIX
    plan = handoff_with(Ticket("caso", "mean", DOCS)).plan(prompt)
    assert pieces(plan) == [PREFIX, ["n0"], "\nSome other words.\n", ["n1"], SUFFIX]
    # generation needs text to start from: a block that ends the prompt is read as text
    ends_in_block = PREFIX + DOCS[0].text + "\n\n" + DOCS[1].text
    assert pieces(handoff_with(Ticket("caso", "mean", DOCS)).plan(ends_in_block)) == [ends_in_block]
    ends_in_doc = PREFIX + DOCS[0].text + "\nand\n" + DOCS[1].text
    assert pieces(handoff_with(Ticket("caso", "mean", DOCS)).plan(ends_in_doc)) == [PREFIX, ["n0"], "\nand\n" + DOCS[1].text]
    only_doc = handoff_with(Ticket("caso", "mean", DOCS)).plan(DOCS[2].text)
    assert pieces(only_doc) == [DOCS[2].text]


def test_prompt_without_documents_is_plain_text():
    handoff = handoff_with(Ticket("picaso-s", "mean", DOCS))
    plan = handoff.plan("Given the following conversation ... Standalone question:")
    assert plan.ticket is None and pieces(plan) == ["Given the following conversation ... Standalone question:"]


def test_longer_document_wins_over_a_text_it_contains():
    inner = DocumentRef.of("The Eiffel Tower was completed in 1889.", "inner")
    prompt = PREFIX + DOCS[0].text + "\n\n" + inner.text + SUFFIX
    plan = handoff_with(Ticket("picaso-s", "mean", [inner, DOCS[0]])).plan(prompt)
    assert pieces(plan) == [PREFIX, ["n0", "inner"], SUFFIX]


def test_ticket_choice_and_ambiguity():
    prompt = PREFIX + DOCS[0].text + SUFFIX
    # sequential use: each retrieval is answered by the call after it, whatever was used before
    handoff = Handoff()
    for method in ["picaso-s", "concat", "picaso-r"]:
        handoff.register(Ticket(method, "mean", DOCS))
        plan = handoff.plan(prompt)
        assert plan.ticket.method == method and not plan.ambiguous
    assert handoff.plan(prompt).ticket.method == "picaso-r"  # refine's next call: the same ticket again
    # two retrievals of the same documents with different methods, neither answered yet: flagged
    old, new = Ticket("picaso-s", "mean", DOCS[:2]), Ticket("concat", "mean", DOCS)
    handoff = handoff_with(old, new)
    first = handoff.plan(prompt)
    assert first.ticket is new and first.ambiguous
    second = handoff.plan(prompt)
    assert second.ticket is old and not second.ambiguous
    # only tickets holding every document found count
    handoff = handoff_with(Ticket("picaso-s", "mean", DOCS[:1]), Ticket("soup", "mean", DOCS[1:]))
    plan = handoff.plan(PREFIX + DOCS[2].text + SUFFIX)
    assert plan.ticket.method == "soup" and not plan.ambiguous


def test_handoff_keeps_the_most_recent_tickets():
    handoff = Handoff(max_tickets=3)
    for i in range(5):
        handoff.register(Ticket("soup", "mean", [DocumentRef.of(f"doc {i}")]))
    assert [t.documents[0].text for t in handoff.tickets()] == ["doc 2", "doc 3", "doc 4"]
    assert handoff.plan("x doc 0 y").ticket is None


def test_python_escaping_matches_repr():
    rng = random.Random(0)
    samples = ["plain", "it's", 'say "hi"', "both ' and \"", "tab\tnew\nret\r back\\slash", "é 中文 \x00 \x7f \x85 \u2028 \U0001F600"]
    samples += ["".join(chr(rng.choice([rng.randrange(0, 128), rng.randrange(128, 0x3000), rng.randrange(0x10000, 0x10FFFF)]))
                        for _ in range(12)) for _ in range(500)]
    for s in samples:
        r = repr(s)
        assert _py_escaped(s, r[0]) == r[1:-1], s


def test_summary_counts_each_retrieval_once():
    retrieval = {"states_loaded": 2, "states_encoded": 1, "states_cached": 0}
    calls = [dict(method="picaso-s", k=1, tokens_read=10, document_tokens=5, compose_ms=1.0, ticket=7,
                  retrieval=retrieval, late_states={"loaded": 0, "encoded": 0}) for _ in range(3)]
    condense = dict(method="none", k=0, tokens_read=30, document_tokens=0, compose_ms=0.0, ticket=None, retrieval={},
                    late_states={"loaded": 0, "encoded": 0})
    summary = summarize([condense] + calls)
    assert summary["method"] == "picaso-s" and summary["k"] == 1 and summary["llm_calls"] == 4
    assert summary["tokens_read"] == 60 and summary["document_tokens"] == 15
    assert summary["states_loaded"] == 2 and summary["states_encoded"] == 1  # refine's 3 calls share one retrieval
