"""A complete tiny NExT-Chat processor built offline (for tests, examples and the README quickstart).

Not shipped to the Hub. Deterministic: the same arguments give the same tokenizer and the same ids.
"""

import io
import json
import os
import tempfile

from .image_processing_nextchat import NextChatImageProcessor
from .processing_nextchat import VICUNA_V1_1_SYSTEM, NextChatProcessor


NEXTCHAT_ADDED_TOKENS = ("<im_patch>", "<im_start>", "<im_end>", "<at>", "<boxes>")

_CORPUS = [
    VICUNA_V1_1_SYSTEM,
    "USER: Where is the dog in the image? ASSISTANT: Answer: the dog is here.",
    "USER: What is region [0]? ASSISTANT: A man riding a horse on the beach.",
    "Can you describe the image and include object locations? A woman with a red umbrella walks a small dog.",
    "Please mention related object locations. The cat sits on the sofa next to two children and a ball.",
    "The answer is yes. So the answer is no. There are 3 people, 12 cars and 2024 trees in this picture.",
    "Please locate the person on the left, the car behind the tree, and the bird above the house.",
    "What color is the shirt of the boy? It is blue. Which object is bigger: the table or the chair?",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}<>/\\-_+=*&^%$#@~`|",
]


def _train_sentencepiece(vocab_size: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4),
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


def build_tiny_tokenizer(vocab_size: int = 384, save_dir: str | None = None):
    """A tiny LLaMA tokenizer (SentencePiece BPE with byte fallback, trained on a fixed corpus) with the five
    NExT-Chat tokens added after the base vocabulary, as the original code adds them."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(_train_sentencepiece(vocab_size))
        config = {
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
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
    tokenizer.add_tokens([AddedToken(NEXTCHAT_ADDED_TOKENS[0], lstrip=True, rstrip=True, normalized=False)])
    tokenizer.add_tokens([AddedToken(t, lstrip=True, rstrip=True, normalized=False) for t in NEXTCHAT_ADDED_TOKENS[1:]])
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def build_tiny_processor(
    save_dir: str | None = None,
    image_size: int = 28,
    sam_image_size: int | None = 64,
    patch_size: int = 14,
    image_seq_length: int | None = None,
    vocab_size: int = 384,
) -> NextChatProcessor:
    """A complete tiny :class:`NextChatProcessor`, offline and deterministic: the tiny tokenizer of
    :func:`build_tiny_tokenizer` and an image processor with CLIP size ``image_size`` and SAM size
    ``sam_image_size`` (``None``: box-only). ``image_seq_length`` defaults to ``(image_size // patch_size) ** 2``.
    With ``save_dir`` the processor is also saved there."""
    tokenizer = build_tiny_tokenizer(vocab_size)
    image_processor = NextChatImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        sam_image_size=sam_image_size,
    )
    if image_seq_length is None:
        image_seq_length = (image_size // patch_size) ** 2
    processor = NextChatProcessor(image_processor, tokenizer, image_seq_length=image_seq_length)
    if save_dir is not None:
        processor.save_pretrained(save_dir)
    return processor


__all__ = ["NEXTCHAT_ADDED_TOKENS", "build_tiny_processor", "build_tiny_tokenizer"]
