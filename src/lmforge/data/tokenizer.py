"""Stage `tokenizer`: train a byte-level BPE tokenizer, or reuse a local one.

Byte-level means every string round-trips exactly (no unknown characters), and a
`vocab_size` of 256 + the special tokens gives a pure byte tokenizer (no merges) for
character-level experiments. The result is a Hugging Face tokenizer folder, with lmforge's
chat template, that `AutoTokenizer.from_pretrained` loads.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field, model_validator

from lmforge.config import Schema
from lmforge.data.chat import BOS, CHAT_TEMPLATE, EOS, PAD, ROLE_TOKENS, SPECIAL_TOKENS, UNK
from lmforge.data.corpus import iter_texts
from lmforge.errors import LmforgeError
from lmforge.rundir import RunDir, atomic_write_json, resolve_artifact, staged_dir

ARTIFACT = "tokenizer"
PROVIDES = ("tokenizer",)
INPUTS = {"data": "data", "corpus": None, "reuse": None}
N_BYTES = 256


class Config(Schema):
    data: str | None = Field(
        None, description="Curated data (a curate stage folder or its data/ folder); its validation split "
        "measures compression, and its train split is the training text unless `corpus` is set."
    )
    corpus: list[str] | None = Field(
        None, description="Train on these files/globs (JSONL/Parquet/CSV/text) instead of the curated train "
        "split, e.g. text from a separate world so no training entity becomes a single token."
    )
    text_field: str = Field("text", description="Column holding the text in structured `corpus` files.")
    vocab_size: int = Field(4096, ge=1, le=1_000_000, description="Total vocabulary incl. 256 bytes and special tokens.")
    min_frequency: int = Field(2, ge=1, description="A merge must occur at least this often in the training text.")
    max_train_docs: int | None = Field(None, ge=1, description="Train on at most this many documents (None = all).")
    extra_special_tokens: list[str] = Field(default_factory=list, description="More special tokens to reserve.")
    reuse: str | None = Field(
        None, description="Copy an existing local HF tokenizer folder instead of training (its own chat template is kept)."
    )
    eval_docs: int = Field(2000, ge=1, description="Validation documents used to measure bytes per token.")
    split_digits: bool = Field(
        True, description="Make every digit its own token (as Llama does): numbers then read the same way at any "
        "length, which small models need to learn arithmetic; false = BPE merges digit runs like any text."
    )

    @model_validator(mode="after")
    def _vocab_fits(self) -> "Config":
        need = N_BYTES + len(SPECIAL_TOKENS) + len(self.extra_special_tokens)
        if self.reuse is None and self.vocab_size < need:
            raise ValueError(
                f"vocab_size {self.vocab_size} is smaller than the 256 byte symbols plus "
                f"{len(SPECIAL_TOKENS) + len(self.extra_special_tokens)} special tokens; use at least {need}"
            )
        return self


def train_tokenizer(texts: Iterator[str], cfg: Config):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if cfg.split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS + cfg.extra_special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=list(ROLE_TOKENS.values()) + cfg.extra_special_tokens,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | Path):
    """Load a tokenizer from a tokenizer folder, a model folder, or a stage folder."""
    from transformers import AutoTokenizer

    p = resolve_artifact(path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # transformers raises OSError/ValueError/... for a wrong folder
        raise LmforgeError(f"No Hugging Face tokenizer could be loaded from {p} ({str(e).splitlines()[0]}).") from None
    if tok.eos_token_id is None:
        raise LmforgeError(f"Tokenizer {p} defines no EOS token; lmforge needs one to separate documents.")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # safe: padded positions are always masked out of losses
    if not getattr(tok, "chat_template", None):
        adopt_chat_template(tok, p)
    return tok


_TOLD: set[str] = set()


def adopt_chat_template(tok, where: Path) -> None:
    """A tokenizer without a chat template (a base model's) takes lmforge's, said once per folder.

    Set on the tokenizer itself, the template is written into every artifact saved with it
    (model, adapter, merged model), so plain `tokenizer.apply_chat_template` on lmforge's output
    renders exactly the text lmforge trained on. Its role markers are plain text to such a
    tokenizer (they are not in its vocabulary as special tokens)."""
    import sys

    tok.chat_template = CHAT_TEMPLATE
    if str(where) not in _TOLD:
        _TOLD.add(str(where))
        print(f"tokenizer {where} has no chat template; using lmforge's (<|role|>content<eos> per turn), "
              "which is saved with every model, adapter and merged model made from it.", file=sys.stderr)


def bytes_per_token(tok, texts: Iterator[str]) -> tuple[float, int, int]:
    n_bytes = n_tokens = 0
    for t in texts:
        n_bytes += len(t.encode("utf-8"))
        n_tokens += len(tok(t, add_special_tokens=False)["input_ids"])
    return (n_bytes / n_tokens if n_tokens else float("nan")), n_bytes, n_tokens


def _training_texts(cfg: Config) -> Iterator[str]:
    if cfg.corpus:
        from lmforge.data.formats import iter_texts as iter_file_texts

        texts = iter_file_texts(cfg.corpus, text_field=cfg.text_field, skip_option=None)
    elif cfg.data:
        texts = iter_texts(cfg.data, "train")
    else:
        raise LmforgeError("The tokenizer stage needs `data` (a curated data folder) or `corpus` (files) to train on.")
    return itertools.islice(texts, cfg.max_train_docs) if cfg.max_train_docs else texts


class _Counted:
    """Passes texts through, counting documents and non-blank characters."""

    def __init__(self, texts: Iterator[str]):
        self.texts, self.docs, self.chars = texts, 0, 0

    def __iter__(self) -> Iterator[str]:
        for t in self.texts:
            self.docs += 1
            self.chars += len(t.strip())
            yield t


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    with staged_dir(rd.artifact) as tmp:
        if cfg.reuse:
            src = resolve_artifact(cfg.reuse, "tokenizer folder")
            tok = load_tokenizer(src)
            tok.save_pretrained(str(tmp))
            rd.log(f"reused tokenizer from {src}")
        else:
            seen = _Counted(_training_texts(cfg))
            tok = train_tokenizer(seen, cfg)
            if seen.chars == 0:  # BPE would "train" on nothing and save a bytes-only tokenizer
                source = ", ".join(cfg.corpus) if cfg.corpus else f"the train split of {cfg.data}"
                raise LmforgeError(f"The tokenizer stage read no text from {source} ({seen.docs} documents, all "
                                   "empty); check the inputs (and text_field).")
            tok.save_pretrained(str(tmp))
        summary: dict = {"vocab_size": len(tok)}
        if cfg.data:
            val = itertools.islice(iter_texts(cfg.data, "validation", required=False), cfg.eval_docs)
            bpt, nb, nt = bytes_per_token(tok, val)
            summary.update(val_bytes_per_token=round(bpt, 4), val_bytes=nb, val_tokens=nt)
        atomic_write_json(tmp / "lmforge_tokenizer_report.json", summary)
    msg = f"tokenizer: vocab {summary['vocab_size']}"
    if "val_bytes_per_token" in summary:
        msg += f", {summary['val_bytes_per_token']:.3f} bytes/token on validation"
    print(msg)
    rd.log(msg)
    return summary
