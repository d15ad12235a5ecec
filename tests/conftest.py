"""Fixtures shared by every test folder: a tiny random Llama with an lmforge-style tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model answers questions about rivers, hills and ships.",
    "What is two plus two? Two plus two is four.",
    "Hello there! How are you today? I am fine, thank you.",
    "The old miller carries three apples to the northern gate.",
]


def build_tiny_model(out: Path, *, seed: int = 0, context: int = 128) -> Path:
    """Save a random 2-layer Llama (hidden 64) and a ~300-token byte-level BPE tokenizer to `out`.

    The tokenizer carries lmforge's special tokens (EOS `<|eos|>`, PAD `<|pad|>`, the role
    markers) and chat template, like the tokenizer stage's output.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lmforge.data.chat import BOS, CHAT_TEMPLATE, EOS, PAD, ROLE_TOKENS, SPECIAL_TOKENS, UNK

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(SENTENCES * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens=list(ROLE_TOKENS.values()), chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    # Random init gives near-uniform next-token distributions (every token ~1/300); a 20x output
    # layer makes them peaked like a trained model's (top token ~0.4, 90% of the mass in ~10
    # tokens), so greedy, top-k and top-p choices differ visibly.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder holding a tiny random Llama (context 128) and its tokenizer, in Hugging Face format."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))
