"""`lmforge chat MODEL`: talk to a model in the terminal, through the one generation path.

    you> What is two plus two?
    assistant> Four.
    you> /params temperature=0.2 max_new_tokens=64
    you> /reset

The conversation is kept as chat messages and rendered with `lmforge.data.chat.render` (the
same template training and serving use); replies stream token by token. When the history no
longer fits the model's context, the oldest turns are dropped (and the user is told so).
Ctrl-C stops a reply; Ctrl-D, /quit or Ctrl-C at the prompt ends the chat.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, TextIO

from lmforge.config import parse_override, validate
from lmforge.data.chat import encode
from lmforge.errors import LmforgeError
from lmforge.generation import (
    SamplingParams,
    context_length,
    load_model_for_inference,
    stream,
)

HELP = """commands:
  /reset               forget the conversation (the system prompt stays)
  /params              show the sampling parameters
  /params k=v [k=v..]  change them, e.g. /params temperature=0.2 top_p=0.95 max_new_tokens=64
  /history             show the conversation so far
  /good, /bad          rate the last reply (with --feedback DIR: stored as KTO data)
  /fix TEXT            the reply it should have given (stored as an SFT row and a bad rating)
  /help                this text
  /quit                leave (Ctrl-D works too)"""


def update_params(params: SamplingParams, assignments: list[str]) -> SamplingParams:
    """`params` with `key=value` assignments applied (values parsed as YAML), validated."""
    data = params.model_dump()
    for text in assignments:
        path, value = parse_override(text)
        if len(path) != 1:
            raise LmforgeError(f"{text!r}: sampling parameters are flat, write e.g. temperature=0.2.")
        data[path[0]] = value
    new = validate(SamplingParams, data, where="/params")
    if new.n != 1:
        raise LmforgeError("/params: the chat shows one reply at a time, so n must stay 1.")
    return new


class ChatSession:
    """The conversation and its parameters; `reply()` streams the model's next turn."""

    def __init__(self, model: Any, tokenizer: Any, params: SamplingParams, system: str | None = None,
                 retriever: Any = None):
        self.model, self.tokenizer, self.params, self.system = model, tokenizer, params, system
        self.retriever = retriever  # retrieval.augment.Retriever: passages go into the newest user turn only
        self.passages: list[dict] = []  # those used for the last reply
        self.history: list[dict] = []
        self.context = context_length(model)
        self.feedback: Any = None  # a lmforge.label Store: /good, /bad and /fix write into it
        self.model_name = ""
        self.last: tuple[list[dict], str] | None = None  # (the prompt turns, the reply) /good etc. rate

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def fit(self, user: str) -> tuple[list[int], int]:
        """Prompt ids for the history plus `user`, dropping the oldest (user, assistant) pairs
        until prompt plus max_new_tokens fits the context. Returns (ids, messages dropped)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        for start in range(0, len(self.history) + 1, 2):
            msgs = head + self.history[start:] + [{"role": "user", "content": user}]
            if self.retriever is not None:
                from lmforge.retrieval.augment import passages_json

                fitted = self.retriever.augment(msgs, self.tokenizer, budget=(self.context or 1 << 30) - self.params.max_new_tokens)
                msgs, self.passages = fitted.messages, passages_json(fitted)["passages"]
            ids = encode(self.tokenizer, msgs, add_generation_prompt=True)
            if self.context is None or len(ids) + self.params.max_new_tokens <= self.context:
                return ids, start
        raise LmforgeError(
            f"this message needs {len(ids)} prompt tokens plus max_new_tokens={self.params.max_new_tokens}, "
            f"more than the model's context of {self.context}; shorten it or lower max_new_tokens (/params)."
        )

    def reply(self, user: str, write: Callable[[str], None]) -> str:
        """Stream the answer to `user` through `write`; record both turns; return the answer."""
        ids, dropped = self.fit(user)
        if dropped:
            self.history = self.history[dropped:]
            write(f"(dropped the {dropped} oldest messages to fit the context)\n")
        answer = ""
        try:
            for chunk in stream(self.model, self.tokenizer, ids, self.params):
                write(chunk.text)
                answer += chunk.text
                if chunk.finish_reason == "error":
                    write(" [generation failed]")
        except KeyboardInterrupt:
            write(" [stopped]")
        self.last = (self.messages() + [{"role": "user", "content": user}], answer)
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        for p in self.passages if self.retriever is not None else ():
            write(f"\n  [{p['id']}] {p['source']} (chunk {p['ordinal']})")
        return answer

    def rate(self, cmd: str, text: str) -> str:
        """/good, /bad or /fix TEXT on the last reply, written to the feedback store; returns what to show."""
        from lmforge.label.store import Response

        if self.feedback is None:
            return "no feedback store: start the chat with --feedback DIR (a label folder) to keep ratings"
        if self.last is None or not self.last[1].strip():
            return "nothing to rate yet"
        if cmd == "/fix" and not text.strip():
            return "write the better reply after /fix, e.g. /fix Paris."
        prompt, answer = self.last
        resp = Response(answer.strip(), self.model_name, self.params.model_dump(mode="json"))
        self.feedback.add_feedback("chat", prompt, resp, good=cmd == "/good",
                                   correction=text.strip() if cmd == "/fix" else None)
        return f"(saved: {'good' if cmd == '/good' else 'bad'}{' with your fix' if cmd == '/fix' else ''})"


def repl(session: ChatSession, *, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """The read-eval-print loop: commands start with '/', anything else is a message."""

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    ctx = f"context {session.context} tokens" if session.context else "context unknown"
    write(f"Chatting ({ctx}). /help lists commands; Ctrl-D quits.\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, *args = line.split()
            if cmd in ("/quit", "/exit"):
                return
            if cmd == "/reset":
                session.history = []
                write("(history cleared)\n")
            elif cmd == "/params":
                if args:
                    try:
                        session.params = update_params(session.params, args)
                    except LmforgeError as e:
                        write(f"error: {e}\n")
                        continue
                write(" ".join(f"{k}={v}" for k, v in session.params.model_dump().items()) + "\n")
            elif cmd == "/history":
                for m in session.messages():
                    write(f"{m['role']}> {m['content']}\n")
            elif cmd in ("/good", "/bad", "/fix"):
                write(session.rate(cmd, line[len(cmd):]) + "\n")
            elif cmd == "/help":
                write(HELP + "\n")
            else:
                write(f"unknown command {cmd}; /help lists them.\n")
            continue
        write("assistant> ")
        try:
            session.reply(line, write)
        except LmforgeError as e:
            write(f"\nerror: {e}\n")
            continue
        write("\n")


def chat(model_path: str, params: SamplingParams, *, system: str | None = None, device: str | None = None,
         dtype: str | None = None, feedback: str | None = None, retrieval: Any = None) -> None:
    """`lmforge chat`: load the model and run the REPL on the terminal."""
    if params.n != 1:
        raise LmforgeError("the chat shows one reply at a time, so n must be 1.")
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    model, tokenizer = load_model_for_inference(model_path, device=device, dtype=dtype)
    retriever = None
    if retrieval is not None:  # a RetrievalConfig
        from lmforge.retrieval.augment import open_retriever

        retriever = open_retriever(retrieval, tokenizer, model_path)
    session = ChatSession(model, tokenizer, params, system=system, retriever=retriever)
    if feedback is not None:
        from lmforge.label.stage import open_store

        session.feedback, session.model_name = open_store(feedback), str(model_path)
    repl(session)
