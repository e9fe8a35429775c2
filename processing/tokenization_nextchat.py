"""The tokenizer of converted original NExT-Chat checkpoints: transformers 4.31's slow `LlamaTokenizer`, exactly.

The original code ran on transformers 4.31 with the slow (SentencePiece) `LlamaTokenizer`. What it did with the text
next to an added token depends on the tokenizer's `legacy` flag, and with `legacy: false` it encoded such text WITH
SentencePiece's dummy prefix and then cut the `▁` off the first piece (`<boxes> doing` -> `▁do` -> `do`, which may be
no piece: `<unk>`). A `tokenizers` pipeline cannot edit pieces after encoding, so `NextChatLlamaTokenizer` is a Python
tokenizer: it splits and strips as 4.31 did and encodes each stretch of text with the BPE model of `tokenizer.json`
exactly as SentencePiece encodes it (same pieces, `<unk>` for a run of unknown characters when the model has no byte
pieces). It needs no `sentencepiece` package. `nextchat-convert` writes it (`auto_map` in `tokenizer_config.json`);
load it with `AutoTokenizer.from_pretrained(folder, trust_remote_code=True)`, or with `nextchat` imported.
"""

import bisect
import json
import os
import re

from tokenizers import Tokenizer
from transformers import AddedToken, PreTrainedTokenizer


SPIECE_UNDERLINE = "\u2581"


class SentencePieceBPE:
    """Encodes plain text (no added-token matching) as SentencePiece's BPE does, with the `tokenizers` BPE model of
    a SentencePiece-converted `tokenizer.json`: `encode(text, prefix)` returns the ids and the start character of
    every piece in `text` (-1 for a piece that starts with the dummy prefix)."""

    def __init__(self, backend: Tokenizer, unk_token: str | None):
        model = backend.model
        if type(model).__name__ != "BPE":
            raise ValueError(f"`tokenizer_file`: expected a SentencePiece BPE model, got {type(model).__name__}")
        self.model = model
        self.vocab = backend.get_vocab(with_added_tokens=False)
        self.pieces = {i: piece for piece, i in self.vocab.items()}
        self.byte_fallback = bool(getattr(model, "byte_fallback", False)) and "<0x00>" in self.vocab
        self.unk_id = self.vocab.get(str(unk_token)) if unk_token is not None else None

    def _model_tokenize(self, run: str):
        ids, starts, byte_starts, total = [], [], [], 0
        for ch in run:
            byte_starts.append(total)
            total += len(ch.encode("utf-8"))
        for token in self.model.tokenize(run):
            ids.append(token.id)
            starts.append(bisect.bisect_right(byte_starts, token.offsets[0]) - 1)
        return ids, starts

    def encode(self, text: str, prefix: bool) -> tuple[list[int], list[int]]:
        if not text:
            return [], []
        shift = 1 if prefix else 0
        pieces = (SPIECE_UNDERLINE if prefix else "") + text.replace(" ", SPIECE_UNDERLINE)
        if self.byte_fallback:
            ids, starts = self._model_tokenize(pieces)
            return ids, [s - shift for s in starts]
        # No byte fallback: SentencePiece maps every maximal run of unknown characters to one <unk>, and merges never
        # cross it; the `tokenizers` BPE would drop those characters silently.
        ids, starts = [], []
        i, n = 0, len(pieces)
        while i < n:
            j = i
            if pieces[i] in self.vocab:
                while j < n and pieces[j] in self.vocab:
                    j += 1
                run_ids, run_starts = self._model_tokenize(pieces[i:j])
                ids.extend(run_ids)
                starts.extend(s + i - shift for s in run_starts)
            else:
                while j < n and pieces[j] not in self.vocab:
                    j += 1
                if self.unk_id is None:
                    raise ValueError(f"`text` contains characters {pieces[i:j]!r} that the tokenizer cannot encode (no <unk>)")
                ids.append(self.unk_id)
                starts.append(i - shift)
            i = j
        return ids, starts

    def encode_431(self, text: str, legacy: bool) -> list[int]:
        """One stretch of text as transformers 4.31's slow `LlamaTokenizer._tokenize` encoded it (after `tokenize`
        prepended `▁` to the whole text when `legacy` is False): SentencePiece with its dummy prefix; with `legacy`
        False, the stretch that starts with the prepended `▁` loses it first, and any other stretch that does not
        start with a space has the `▁` cut off its first piece (dropped when the piece is only `▁`; a remainder that
        is no piece is `<unk>`)."""
        first = False
        if not legacy:
            first = text.startswith(SPIECE_UNDERLINE)
            if first:
                text = text[1:]
        ids, _ = self.encode(text, prefix=True)
        if not legacy and not first and not text.startswith(" ") and ids:
            piece = self.pieces.get(ids[0], "")
            if piece == SPIECE_UNDERLINE:
                ids = ids[1:]
            elif piece.startswith(SPIECE_UNDERLINE):
                rest = self.vocab.get(piece[1:], self.unk_id)
                if rest is None:
                    raise ValueError(f"`text`: {piece[1:]!r} is not a token and the tokenizer has no <unk>")
                ids = [rest] + ids[1:]
        return ids


class NextChatLlamaTokenizer(PreTrainedTokenizer):
    """transformers 4.31's slow `LlamaTokenizer` on the BPE model of `tokenizer.json` (see the module docstring).

    * The text is split on the added tokens (those of `tokenizer.json`: `<s>`, `</s>`, `<unk>` and the NExT-Chat
      tokens), earliest match first, the longest among those; whitespace next to a token is stripped with Python's
      `str.strip` where the token's `lstrip`/`rstrip` say so (4.31 stripped both sides of every token of
      `added_tokens.json`, and around `<s>`/`</s>`/`<unk>` only as their own flags said).
    * `legacy=True`: every stretch of text is encoded by SentencePiece on its own, with the dummy prefix.
    * `legacy=False`: the text first becomes `"▁" + text.replace("▁", " ")`; see `SentencePieceBPE.encode_431`.
    * BOS in front when `add_bos_token`, EOS at the end when `add_eos_token`.

    Args:
        tokenizer_file (`str`, *optional*): `tokenizer.json` of a SentencePiece BPE model (as transformers converts
            LLaMA's `tokenizer.model`); its `added_tokens` are the tokens never split.
        tokenizer_object (`tokenizers.Tokenizer`, *optional*): the same, already loaded.
        legacy (`bool`): the `legacy` flag of the original slow tokenizer.
        add_bos_token (`bool`), add_eos_token (`bool`): as in `LlamaTokenizer`.
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        tokenizer_file=None,
        tokenizer_object=None,
        legacy=True,
        add_bos_token=True,
        add_eos_token=False,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        **kwargs,
    ):
        if tokenizer_object is None:
            if tokenizer_file is None:
                raise ValueError("NextChatLlamaTokenizer needs `tokenizer_file` (tokenizer.json) or `tokenizer_object`")
            tokenizer_object = Tokenizer.from_file(tokenizer_file)
        if not isinstance(legacy, bool):
            raise ValueError(f"`legacy` must be True or False, got {legacy!r}")
        self.bpe_tokenizer = tokenizer_object
        self.bpe = SentencePieceBPE(tokenizer_object, unk_token)
        self.legacy = legacy
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        if "added_tokens_decoder" not in kwargs:
            kwargs["added_tokens_decoder"] = {
                int(i): AddedToken(
                    t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip, normalized=False,
                    special=t.special,
                )
                for i, t in tokenizer_object.get_added_tokens_decoder().items()
            }
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        # the library it encodes with; `NextChatProcessor` computes exact offsets itself, so transformers' processor
        # `apply_chat_template(return_assistant_tokens_mask=True)` (which asks for this backend) works
        kwargs["backend"] = "tokenizers"
        kwargs["special_tokens_pattern"] = {
            (True, False): "bos", (True, True): "bos_eos", (False, True): "eos", (False, False): "none"
        }[(self.add_bos_token, self.add_eos_token)]
        super().__init__(
            legacy=legacy,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            **kwargs,
        )

    # -- vocabulary ---------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.bpe.vocab)

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self.bpe.vocab)
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token):
        return self.bpe.vocab.get(token, self.bpe.unk_id)

    def _convert_id_to_token(self, index):
        return self.bpe.pieces.get(index, str(self.unk_token))

    # -- encoding -----------------------------------------------------------------------------------------------

    def tokenize(self, text, **kwargs) -> list[str]:
        """4.31's `LlamaTokenizer.tokenize` (see the class docstring). `split_special_tokens=True` encodes the whole
        text as one stretch."""
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        if not self.legacy:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        decoder = self.added_tokens_decoder
        flags = {token.content: (token.lstrip, token.rstrip) for token in decoder.values()}
        if split_special_tokens or not flags:
            parts = [text]
        else:
            pattern = "|".join(re.escape(t) for t in sorted(flags, key=len, reverse=True))
            parts = [part for part in re.split(f"({pattern})", text)]
        is_token = [i % 2 == 1 and not split_special_tokens for i in range(len(parts))]
        for i, part in enumerate(parts):
            if is_token[i]:
                lstrip, rstrip = flags[part]
                if rstrip and i + 1 < len(parts) and parts[i + 1]:
                    parts[i + 1] = parts[i + 1].lstrip()
                if lstrip and i > 0 and parts[i - 1]:
                    parts[i - 1] = parts[i - 1].rstrip()
        tokens = []
        for i, part in enumerate(parts):
            if is_token[i]:
                tokens.append(part)
            elif part:
                tokens.extend(self._tokenize(part))
        return tokens

    def _tokenize(self, text, **kwargs):
        return [self.bpe.pieces[i] for i in self.bpe.encode_431(text, self.legacy)]

    # -- decoding -----------------------------------------------------------------------------------------------

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """As 4.31's slow decode: runs of pieces decoded as SentencePiece decodes them, added tokens joined to them
        with single spaces (`a man <at> <boxes> riding`)."""
        added = self.added_tokens_encoder
        decoder = self.bpe_tokenizer.decoder
        texts, run = [], []
        for token in tokens:
            if token in added:
                if run:
                    texts.append(decoder.decode(run) if decoder is not None else "".join(run))
                    run = []
                texts.append(token)
            else:
                run.append(token)
        if run:
            texts.append(decoder.decode(run) if decoder is not None else "".join(run))
        return " ".join(texts)

    # -- saving -------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedTokenizer.save_pretrained`, keeping `add_bos_token` / `add_eos_token` in
        `tokenizer_config.json` (transformers 5 leaves them out, and they are this tokenizer's own settings)."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        prefix = kwargs.get("filename_prefix")
        path = os.path.join(str(save_directory), (prefix + "-" if prefix else "") + "tokenizer_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                config = json.load(handle)
            config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(config, handle, indent=2, sort_keys=True, ensure_ascii=False)
                handle.write("\n")
        return files

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"`save_directory` ({save_directory}) should be a directory")
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.json")
        content = json.loads(self.bpe_tokenizer.to_str())
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        return (path,)


NextChatLlamaTokenizer.register_for_auto_class("AutoTokenizer")

__all__ = ["NextChatLlamaTokenizer", "SentencePieceBPE"]
