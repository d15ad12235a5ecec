"""`lmforge chat` driven through a pseudo-terminal: answers, /params, /reset, history."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest
import torch

from lmforge.chat import ChatSession, update_params
from lmforge.data.chat import render
from lmforge.errors import LmforgeError
from lmforge.generation import SamplingParams, generate, load_model_for_inference

ANSWER = r"assistant> (.*?)\r\nyou> "


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model_for_inference(tiny_model_dir, device="cpu")
    torch.set_num_threads(n)


def reply(tiny, messages: list[dict], **params) -> str:
    model, tok = tiny
    ids = tok(render(tok, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    return generate(model, tok, [ids], SamplingParams(**params))[0].text


def terminal_text(raw: str) -> str:
    return raw.replace("\r\n", "\n")  # the terminal turns every newline the model wrote into CR LF


def test_chat_in_a_terminal(tiny_model_dir, tiny):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "lmforge.cli", "chat", str(tiny_model_dir), "--device", "cpu",
                                           "temperature=0", "max_new_tokens=10"],
                          env=env, encoding="utf-8", codec_errors="replace", timeout=120)
    try:
        child.expect("context 128 tokens")
        child.expect("you> ")
        hello = [{"role": "user", "content": "Hello"}]
        first = reply(tiny, hello, temperature=0, max_new_tokens=10)
        child.sendline("Hello")
        child.expect(ANSWER)
        assert terminal_text(child.match.group(1)) == first

        # /params takes effect for the next reply, and the history is part of the prompt.
        child.sendline("/params max_new_tokens=4")
        child.expect("max_new_tokens=4")
        child.expect("you> ")
        with_history = hello + [{"role": "assistant", "content": first}] + hello
        second = reply(tiny, with_history, temperature=0, max_new_tokens=4)
        assert second != reply(tiny, hello, temperature=0, max_new_tokens=4)  # history changes the answer
        child.sendline("Hello")
        child.expect(ANSWER)
        assert terminal_text(child.match.group(1)) == second

        # /reset: the same question is answered as if it were the first.
        child.sendline("/reset")
        child.expect(r"\(history cleared\)")
        child.expect("you> ")
        child.sendline("Hello")
        child.expect(ANSWER)
        assert terminal_text(child.match.group(1)) == reply(tiny, hello, temperature=0, max_new_tokens=4)

        # A bad value is refused with the reason, and the chat goes on.
        child.sendline("/params temperature=-1")
        child.expect("error: /params: Config key temperature is invalid")
        child.expect("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_update_params_validates_and_keeps_n_at_one():
    p = update_params(SamplingParams(), ["temperature=0.2", "stop=['###']"])
    assert (p.temperature, p.stop) == (0.2, ["###"])
    with pytest.raises(LmforgeError, match="n must stay 1"):
        update_params(p, ["n=2"])
    with pytest.raises(LmforgeError, match="did you mean top_p"):
        update_params(p, ["topp=0.5"])


def test_old_turns_are_dropped_to_fit_the_context(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, SamplingParams(temperature=0, max_new_tokens=40), system="Be brief.")
    long = "What is two plus two? " * 3  # an exchange of two such turns is ~58 tokens
    for tag in "ABC":
        session.history += [{"role": "user", "content": long + tag}, {"role": "assistant", "content": long}]
    ids, dropped = session.fit("Hello")
    assert dropped == 4  # exchanges A and B go, C stays: 16 + 58 prompt tokens + 40 new fit 128; 2 exchanges do not
    text = tok.decode(ids)
    assert text.startswith("<|system|>Be brief.<|eos|><|user|>" + long + "C<|eos|>")
    assert text.endswith("<|user|>Hello<|eos|><|assistant|>")
    assert len(ids) + 40 <= 128
    with pytest.raises(LmforgeError, match="more than the model's context of 128"):
        session.fit("word " * 40)
