"""The context section, rendered exactly through the chat template, and fitting the window."""

from __future__ import annotations

from lmforge.data.chat import render
from lmforge.data.tokenizer import load_tokenizer
from lmforge.retrieval.index import Passage
from lmforge.retrieval.prompt import fit_passages, with_context


def _p(i: int, text: str) -> Passage:
    return Passage(chunk_id=i, doc=f"d{i}.md line 1", ordinal=0, text=text, n_tokens=0, score=1.0)


def test_context_section_rendered_exactly_through_the_chat_template(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Belor?"}]
    text = render(tok, with_context(msgs, [_p(1, "The capital of Belor\n is Mosk."), _p(2, "Corin lies by the sea.")]),
                  add_generation_prompt=True)
    assert text == (
        "<|system|>Be brief.<|eos|>"
        "<|user|>Answer the question from the passages below. Cite the passages you use by number, like [1]. "
        "If they do not contain the answer, say \"I don't know.\"\n\n"
        "Passages:\n[1] The capital of Belor is Mosk.\n[2] Corin lies by the sea.\n\n"
        "Question: Capital of Belor?<|eos|><|assistant|>"
    )
    assert with_context(msgs, []) == msgs  # no passages: the question as is


def test_passages_past_the_window_are_cut_and_counted(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    msgs = [{"role": "user", "content": "Capital of Belor?"}]

    def rend(m):
        return render(tok, m, add_generation_prompt=True)

    def n(m):
        return len(tok(rend(m), add_special_tokens=False)["input_ids"])

    long = "The quick brown fox jumps over the lazy dog. " * 20
    passages = [_p(1, "The capital of Belor is Mosk."), _p(2, long), _p(3, "Corin lies by the sea.")]
    full = n(with_context(msgs, passages))
    one = n(with_context(msgs, passages[:1]))
    budget = one + 40  # room for passage 1 whole and part of passage 2
    fitted = fit_passages(msgs, passages, tok, rend, budget=budget)
    assert full > budget
    assert [p.chunk_id for p in fitted.passages] == [1, 2]
    assert (fitted.truncated, fitted.dropped) == (1, 1)
    assert fitted.passages[1].text == long[:len(fitted.passages[1].text)] and len(fitted.passages[1].text) < len(long)
    assert fitted.prompt_tokens == n(fitted.messages) <= budget
    assert fitted.prompt_tokens > budget - 5  # it used the room it had

    everything = fit_passages(msgs, passages, tok, rend, budget=full)
    assert (len(everything.passages), everything.truncated, everything.dropped) == (3, 0, 0)
    nothing = fit_passages(msgs, passages, tok, rend, budget=5)  # not even the question fits: no crash
    assert (nothing.passages, nothing.dropped, nothing.messages) == ([], 3, msgs)
