"""Train a small LLaMA tokenizer offline: SentencePiece BPE with byte fallback, plus the five NExT-Chat tokens.

Used for models trained from scratch on a small task (the synthetic shapes task, :mod:`.synthetic`) and by the
tests. Deterministic: the same corpus and vocabulary size always give the same pieces and the same ids.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable

from ..configuration.configuration_nextchat import NEXTCHAT_SPECIAL_TOKENS


# The tokenizer_config.json of the trained tokenizer: LLaMA's conventions (a `<s>` prefix, `<unk>` as padding).
LLAMA_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "legacy": False,
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "padding_side": "right",
    "model_max_length": 2048,
    "clean_up_tokenization_spaces": False,
}


def _train_sentencepiece(corpus: Iterable[str], vocab_size: int) -> bytes:
    """The serialized SentencePiece model (LLaMA's settings: BPE, byte fallback, split digits, `<unk>` `<s>` `</s>`
    at ids 0, 1, 2, no pad piece) trained on the sentences of `corpus`, as they are given."""
    import sentencepiece as spm

    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"`vocab_size` must be a positive int, got {vocab_size!r}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def train_llama_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A `LlamaTokenizer` whose SentencePiece model is trained on `corpus` (LLaMA's SentencePiece settings; with
    `hard_vocab_limit=False`, a small corpus may give fewer than `vocab_size` pieces), with the five NExT-Chat tokens
    (:data:`NEXTCHAT_SPECIAL_TOKENS`) added after the base vocabulary in the order the original adds them."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    model = _train_sentencepiece(corpus, vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(model)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(LLAMA_TOKENIZER_CONFIG, f)
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
    tokenizer.add_tokens(
        [AddedToken(token, lstrip=True, rstrip=True, normalized=False) for token in NEXTCHAT_SPECIAL_TOKENS.values()]
    )
    return tokenizer


__all__ = ["LLAMA_TOKENIZER_CONFIG", "train_llama_tokenizer"]
