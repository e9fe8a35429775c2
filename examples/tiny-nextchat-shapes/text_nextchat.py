"""Text side of NExT-Chat's processor: the vicuna v1.1 chat template, the prompt syntax (``<image>``, ``[i]`` box
references, ``</s>``, backslash escapes), its tokenisation by the SentencePiece model (the original's rules, see
``NextChatProcessor``), truncation and padding into batches."""

import bisect
import re

import numpy as np
from transformers.utils import logging


logger = logging.get_logger(__name__)

VICUNA_V1_1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# FastChat's `vicuna_v1.1` (SeparatorStyle.ADD_COLON_TWO, sep=" ", sep2="</s>"), as NExT-Chat renders it:
#   "<system> USER: <q1> ASSISTANT: <a1></s>USER: <q2> ASSISTANT:"
# An empty message renders as "ROLE:" with no separator. Image parts render as the `<image>` placeholder.
# `{% generation %}` marks what an assistant turn trains on (" <answer></s>"), for return_assistant_tokens_mask.
def vicuna_chat_template(default_system: str = VICUNA_V1_1_SYSTEM) -> str:
    """The vicuna v1.1 chat template with `default_system` as the system prompt used when a conversation has no
    system message (a model trained with another default, like the tiny shapes model's empty one, ships its own)."""
    return _VICUNA_TEMPLATE_HEAD + default_system.replace("'", "\\'") + _VICUNA_TEMPLATE_TAIL


_VICUNA_TEMPLATE_HEAD = (
    "{%- macro render(content) -%}"
    "{%- if content is none -%}"
    "{%- elif content is string -%}{{ content }}"
    "{%- else -%}"
    "{%- for part in content -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{%- if part['type'] == 'image' -%}<image>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- else -%}{{ raise_exception('vicuna_v1.1: content parts must have type text or image, got ' ~ part['type']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = render(messages[0]['content']) -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_text = '"
)
_VICUNA_TEMPLATE_TAIL = (
    "' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- system_text ~ ' ' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{- raise_exception('vicuna_v1.1: roles must be user or assistant (system only first), got ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('vicuna_v1.1: messages must alternate user, assistant, user, ...') -}}"
    "{%- endif -%}"
    "{%- set text = render(message['content']) -%}"
    "{%- set role = 'USER' if message['role'] == 'user' else 'ASSISTANT' -%}"
    "{%- if text == '' -%}{{- role ~ ':' -}}"
    "{%- elif message['role'] == 'user' -%}{{- role ~ ': ' ~ text ~ ' ' -}}"
    "{%- else -%}{{- role ~ ':' -}}{%- generation -%}{{- ' ' ~ text ~ '</s>' -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and (not loop_messages or loop_messages[-1]['role'] == 'user') -%}"
    "{{- 'ASSISTANT:' -}}"
    "{%- endif -%}"
)
VICUNA_V1_1_CHAT_TEMPLATE = vicuna_chat_template()

REF_RE = re.compile(r"\[\s*(\d+(?:\s*,\s*\d+)*)\s*,?\s*\]")


def escape_text(text: str, image_placeholder: str = "<image>", eos_token: str = "</s>") -> str:
    """Escape untrusted text so that :class:`NextChatProcessor` reads it literally: a backslash is put before every
    ``[`` (box references), every image placeholder and every end-of-sequence marker. (The NExT-Chat control tokens
    ``<im_patch>``, ``<im_start>``, ``<im_end>``, ``<at>``, ``<boxes>`` are always read as plain text anyway.)"""
    if not isinstance(text, str):
        raise ValueError(f"`text` must be a string, got {type(text).__name__}")
    markers = sorted({m for m in ("[", image_placeholder, eos_token) if m}, key=len, reverse=True)
    out = []
    i = 0
    while i < len(text):
        for marker in markers:
            if text.startswith(marker, i):
                out.append("\\" + marker)
                i += len(marker)
                break
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# --------------------------------------------------------------------------------------------------------------
# Plain-text encoding with the SentencePiece model itself (no added-token matching)
# --------------------------------------------------------------------------------------------------------------


class ChunkEncoder:
    """Encodes a plain text chunk exactly as SentencePiece does, with or without the dummy-prefix ``▁``,
    never matching added tokens (so a typed ``<at>`` stays text). Returns ids and the start character of each
    token in the chunk (-1 for a token that starts with the dummy prefix).

    :meth:`encode_chunk` applies one of the three rules for the text that follows a control or special token
    (see ``NextChatProcessor``'s ``original_legacy``)."""

    # normalizers that only move spaces and `▁` around (the processor reproduces what they do itself)
    _SPACE_NORMALIZERS = frozenset({"Sequence", "Prepend", "Replace", "String", "Regex"})

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.exact = False
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:  # NextChatLlamaTokenizer (converted checkpoints): a Python tokenizer on that pipeline
            backend = getattr(tokenizer, "bpe_tokenizer", None)
        if backend is not None:
            model = backend.model
            pre = repr(backend.pre_tokenizer)
            norm = repr(backend.normalizer)
            spaces_only = backend.normalizer is None or (
                set(re.findall(r"(\w+)\(", norm)) <= self._SPACE_NORMALIZERS and "▁" in norm
            )
            metaspace = pre.startswith("Metaspace(") and "split=False" in pre and spaces_only
            legacy_normalizer = backend.pre_tokenizer is None and backend.normalizer is not None and spaces_only
            if type(model).__name__ in ("BPE", "Unigram") and (metaspace or legacy_normalizer):
                self.exact = True
                self.model = model
                self.vocab = backend.get_vocab(with_added_tokens=False)
                self.pieces = {i: piece for piece, i in self.vocab.items()}
                self.byte_fallback = bool(getattr(model, "byte_fallback", False)) and "<0x00>" in self.vocab
                self.unk_id = self.vocab.get(str(tokenizer.unk_token)) if tokenizer.unk_token is not None else None
        if not self.exact:
            logger.warning(
                "NextChatProcessor: the tokenizer is not a SentencePiece-style (Metaspace) tokenizer; plain text is "
                "encoded with `tokenizer.encode`, so parity with the original tokenisation is not guaranteed and "
                "texts that contain the NExT-Chat control tokens are rejected instead of escaped."
            )

    def encode_chunk(self, text: str, first: bool, legacy: bool | None) -> tuple[list[int], list[int]]:
        """One chunk of plain text (already stripped where a control token strips it). `first`: nothing has been
        encoded before it. `legacy`:

        * ``None``: the dummy prefix only on the first chunk; the others are encoded without it (transformers 5).
        * ``True``: transformers 4.31, ``legacy=True``: every chunk is encoded on its own, with the dummy prefix.
        * ``False``: transformers 4.31, ``legacy=False``: the first chunk, and a chunk that starts with a space, as
          SentencePiece encodes them; any other chunk is encoded with the prefix and the ``▁`` is then cut off its
          first piece (dropped when the piece is only ``▁``; a remainder that is not a piece is ``<unk>``).
        """
        if legacy is None:
            return self.encode(text, prefix=first)
        if legacy or first or text.startswith(" ") or not self.exact:
            return self.encode(text, prefix=True)
        ids, starts = self.encode(text, prefix=True)
        if ids:
            piece = self.pieces.get(ids[0], "")
            if piece == "▁":
                ids, starts = ids[1:], starts[1:]
            elif piece.startswith("▁"):
                rest = self.vocab.get(piece[1:], self.unk_id)
                if rest is None:
                    raise ValueError(f"`text`: {piece[1:]!r} is not a token and the tokenizer has no <unk>")
                ids, starts = [rest] + ids[1:], [max(starts[0], 0)] + starts[1:]
        return ids, starts

    def _model_tokenize(self, run: str):
        ids, starts = [], []
        byte_starts = []
        total = 0
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
        if not self.exact:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(encoded["input_ids"])
            offsets = encoded.get("offset_mapping") or [(0, 0)] * len(ids)
            return ids, [int(o[0]) for o in offsets]
        shift = 1 if prefix else 0
        pieces = ("▁" if prefix else "") + text.replace(" ", "▁")
        if self.byte_fallback:
            ids, starts = self._model_tokenize(pieces)
            return ids, [s - shift for s in starts]
        # No byte fallback: SentencePiece maps every maximal run of unknown characters to one <unk>, and merges
        # never cross it; the `tokenizers` BPE would drop those characters silently.
        ids, starts = [], []
        i = 0
        n = len(pieces)
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
                    raise ValueError(
                        f"`text` contains characters {pieces[i:j]!r} that the tokenizer cannot encode (no <unk>)"
                    )
                ids.append(self.unk_id)
                starts.append(i - shift)
            i = j
        return ids, starts


# --------------------------------------------------------------------------------------------------------------
# Call options
# --------------------------------------------------------------------------------------------------------------


# TextKwargs this processor cannot honour: accepted only at their neutral values
NEUTRAL_TEXT_KWARGS = {
    "text_pair": (None,),
    "text_target": (None,),
    "text_pair_target": (None,),
    "stride": (None, 0),
    "is_split_into_words": (None, False),
    "return_token_type_ids": (None, False),
    "return_overflowing_tokens": (None, False),
    "return_special_tokens_mask": (None, False),
    "return_length": (None, False),
    "sanitize_control_tokens": (None, False),
}


def text_options(text_kwargs: dict, merged: dict) -> dict:
    """The text options of a processor call, from the merged ``text_kwargs`` (consumed) and the merged kwargs
    (processor-level flags): checked, with transformers' enums turned into their values. Names that this processor
    does not know or cannot honour are ``ValueError``."""
    options = {}
    # processor-level flags (text kwargs in older transformers versions)
    for key in ("return_text_replacement_offsets", "return_mm_token_type_ids"):
        value = text_kwargs.pop(key, None)
        options[key] = bool(value if value is not None else merged.get(key, False))
    for key, neutral in NEUTRAL_TEXT_KWARGS.items():
        value = text_kwargs.pop(key, None)
        if value not in neutral:
            raise ValueError(
                f"NextChatProcessor does not support `{key}`={value!r}"
                + (
                    "; it always encodes control tokens typed in the text as plain text (use `escape_text` for "
                    "untrusted text)"
                    if key == "sanitize_control_tokens"
                    else ""
                )
            )
    text_kwargs.pop("verbose", None)
    padding = text_kwargs.pop("padding", True)
    padding = getattr(padding, "value", padding)  # PaddingStrategy
    options["padding"] = True if padding is None else padding
    truncation = text_kwargs.pop("truncation", False)
    truncation = getattr(truncation, "value", truncation)  # TruncationStrategy
    if truncation in (None, False, "do_not_truncate"):
        truncation = False
    elif truncation in (True, "longest_first", "only_first"):
        truncation = True
    else:
        raise ValueError(
            f"`truncation` must be True, False, 'longest_first' or 'do_not_truncate', got {truncation!r}"
        )
    options["truncation"] = truncation
    options["max_length"] = text_kwargs.pop("max_length", None)
    options["padding_side"] = text_kwargs.pop("padding_side", None)
    add_special_tokens = text_kwargs.pop("add_special_tokens", True)
    options["add_special_tokens"] = True if add_special_tokens is None else bool(add_special_tokens)
    return_attention_mask = text_kwargs.pop("return_attention_mask", None)
    options["return_attention_mask"] = True if return_attention_mask is None else bool(return_attention_mask)
    options["return_offsets_mapping"] = bool(text_kwargs.pop("return_offsets_mapping", False))
    multiple = text_kwargs.pop("pad_to_multiple_of", None)
    if multiple is not None and (not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1):
        raise ValueError(f"`pad_to_multiple_of` must be a positive int, got {multiple!r}")
    options["pad_to_multiple_of"] = multiple
    return_tensors = text_kwargs.pop("return_tensors", "pt")
    return_tensors = getattr(return_tensors, "value", return_tensors)  # TensorType
    options["return_tensors"] = return_tensors
    if text_kwargs:
        raise ValueError(f"NextChatProcessor got unsupported text arguments {sorted(text_kwargs)}")
    return options


def check_lengths(options: dict, tokenizer, truncation_side: str | None) -> tuple[str, str, int | None]:
    """Padding side, truncation side and ``max_length`` of a call (the tokenizer's by default), checked."""
    padding, padding_side = options["padding"], options["padding_side"]
    truncation, max_length = options["truncation"], options["max_length"]
    padding_side = padding_side or getattr(tokenizer, "padding_side", "right")
    truncation_side = truncation_side or getattr(tokenizer, "truncation_side", "right")
    if padding_side not in ("left", "right"):
        raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}")
    if truncation_side not in ("left", "right"):
        raise ValueError(f"`truncation_side` must be 'left' or 'right', got {truncation_side!r}")
    if padding not in (True, False, "longest", "max_length", "do_not_pad"):
        raise ValueError(f"`padding` must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"`max_length` must be a positive int, got {max_length!r}")
    if truncation and max_length is None:
        model_max = getattr(tokenizer, "model_max_length", None)
        if model_max is None or model_max > 10**8:
            raise ValueError("`truncation=True` needs `max_length` (the tokenizer has no model_max_length)")
        max_length = int(model_max)
    if padding == "max_length" and max_length is None:
        raise ValueError("`padding='max_length'` needs `max_length`")
    return padding_side, truncation_side, max_length


# --------------------------------------------------------------------------------------------------------------
# The prompt syntax, one sample at a time, and batches
# --------------------------------------------------------------------------------------------------------------


def parse_text(text: str, placeholder: str, eos: str) -> list[tuple]:
    """Split text into ("text", chars, src) / ("image", pos) / ("ref", [idx], pos) / ("eos", pos) items (``src``:
    the position in ``text`` of each character, escapes removed)."""
    items: list[tuple] = []
    chars: list[str] = []
    src: list[int] = []

    def flush():
        if chars:
            items.append(("text", "".join(chars), list(src)))
            chars.clear()
            src.clear()

    i, n = 0, len(text)
    while i < n:
        if text[i] == "\\" and i + 1 < n:
            escaped = None
            for marker in (placeholder, eos, "["):
                if text.startswith(marker, i + 1):
                    escaped = marker
                    break
            if escaped is not None:
                chars.extend(escaped)
                src.extend(range(i + 1, i + 1 + len(escaped)))
                i += 1 + len(escaped)
                continue
        if text.startswith(placeholder, i):
            flush()
            items.append(("image", i))
            i += len(placeholder)
            continue
        if text.startswith(eos, i):
            flush()
            items.append(("eos", i))
            i += len(eos)
            continue
        if text[i] == "[":
            match = REF_RE.match(text, i)
            if match is not None:
                flush()
                items.append(("ref", [int(v) for v in match.group(1).split(",")], i))
                i = match.end()
                continue
        chars.append(text[i])
        src.append(i)
        i += 1
    flush()
    return items


def assistant_ranges(text: str, eos: str, marker: str) -> list[tuple[int, int]]:
    """Character ranges of the assistant turns: from the last ``marker`` before each unescaped ``eos`` to it, and
    from the last marker after them to the end."""
    ranges = []
    start = 0
    for match in re.finditer(re.escape(eos), text):
        e0 = match.start()
        if e0 > 0 and text[e0 - 1] == "\\":
            continue
        pos = text.rfind(marker, start, e0)
        if pos >= 0:
            ranges.append((pos + len(marker), match.end()))
        start = match.end()
    pos = text.rfind(marker, start)
    if pos >= 0:
        ranges.append((pos + len(marker), len(text)))
    return ranges


def encode_sample(proc, text, sample, n_images, n_boxes, return_labels, append_trigger, add_bos):
    """Encode one sample for ``proc`` (a ``NextChatProcessor``: its tokenizer, tokens, placeholder, marker, legacy
    rule and chunk encoder). Returns a list of units: dicts with ids, labels, offsets, kind ('bos'|'text'|'image'|
    'pair'|'eos'|'trigger') and for pairs the box index. Checks the placeholders against the images and the
    references against the ``n_boxes`` boxes."""
    items = parse_text(text, proc.image_placeholder, proc.tokenizer.eos_token)
    n_placeholders = sum(1 for it in items if it[0] == "image")
    if n_placeholders != n_images:
        if n_images == 1 and n_placeholders == 0:
            raise ValueError(
                f"sample {sample} has an image but its `text` has no {proc.image_placeholder!r} placeholder; "
                "put one where the image goes (apply_chat_template does it for image content parts)"
            )
        raise ValueError(
            f"`text` of sample {sample} has {n_placeholders} {proc.image_placeholder!r} placeholder(s) but "
            f"{n_images} image(s) were given in `images` (one image per sample at most)"
        )
    referenced = set()
    for it in items:
        if it[0] == "ref":
            for idx in it[1]:
                if idx >= n_boxes:
                    raise ValueError(
                        f"`text` of sample {sample} refers to box [{idx}] but `boxes` gives {n_boxes} box(es) for "
                        f"that sample; write \\[ for a literal bracket"
                    )
                referenced.add(idx)
    missing = sorted(set(range(n_boxes)) - referenced)
    if missing:
        raise ValueError(
            f"`boxes` of sample {sample} has box(es) {missing} that the text never refers to; refer to box i "
            "with [i] (e.g. 'What is in [0]?')"
        )
    ranges = assistant_ranges(text, proc.tokenizer.eos_token, proc.assistant_marker) if return_labels else []

    def in_assistant(pos):
        return any(a <= pos < b for a, b in ranges)

    units = []
    if add_bos and proc.tokenizer.bos_token_id is not None:
        units.append({"ids": [proc.tokenizer.bos_token_id], "labels": [-100], "kind": "bos", "offsets": [(0, 0)]})
    hard = ("image", "ref")
    n_items = len(items)
    first_content = True  # nothing has been emitted from the text yet -> dummy prefix
    for k, item in enumerate(items):
        kind = item[0]
        if kind == "text":
            chunk, src = item[1], item[2]
            if proc.original_legacy is False:
                chunk = chunk.replace("▁", " ")  # 4.31 with legacy=False reads a typed `▁` as a space
            left_hard = k > 0 and items[k - 1][0] in hard
            right_hard = (k + 1 < n_items and items[k + 1][0] in hard) or (k + 1 == n_items and append_trigger)
            start, end = 0, len(chunk)
            if left_hard:
                while start < end and chunk[start].isspace():
                    start += 1
            if right_hard:
                while end > start and chunk[end - 1].isspace():
                    end -= 1
            piece = chunk[start:end]
            ids, starts = proc._encoder.encode_chunk(piece, first=first_content, legacy=proc.original_legacy)
            if not proc._encoder.exact and proc.control_token_ids.intersection(ids):
                raise ValueError(
                    f"`text` of sample {sample} contains a NExT-Chat control token "
                    f"({', '.join(proc._token_ids)}); this tokenizer cannot escape it"
                )
            # character span of each token in `text` (a token made only of the dummy prefix is empty)
            bounds = [max(st, 0) for st in starts] + [len(piece)]
            for j, (tid, st) in enumerate(zip(ids, starts)):
                pos = src[start + min(max(st, 0), len(piece) - 1)]
                label = tid if (return_labels and in_assistant(pos)) else -100
                a, e = min(bounds[j], len(piece)), min(max(bounds[j + 1], bounds[j]), len(piece))
                span = (src[start + a], src[start + e - 1] + 1) if e > a else (pos, pos)
                units.append({"ids": [tid], "labels": [label], "kind": "text", "offsets": [span]})
            if ids:
                first_content = False
            elif piece:
                first_content = False
        elif kind == "image":
            block = [proc.image_start_token_id] + [proc.image_token_id] * proc.image_seq_length
            block.append(proc.image_end_token_id)
            span = (item[1], item[1] + len(proc.image_placeholder))
            units.append(
                {"ids": block, "labels": [-100] * len(block), "kind": "image", "offsets": [span] * len(block)}
            )
            first_content = False
        elif kind == "ref":
            target = return_labels and in_assistant(item[2])
            span = (item[2], REF_RE.match(text, item[2]).end())
            for idx in item[1]:
                units.append(
                    {
                        "ids": [proc.trigger_token_id, proc.box_token_id],
                        "labels": [proc.trigger_token_id if target else -100, -100],
                        "kind": "pair",
                        "box": idx,
                        "offsets": [span, span],
                    }
                )
            first_content = False
        else:  # eos
            eos_id = proc.tokenizer.eos_token_id
            label = eos_id if (return_labels and in_assistant(item[1])) else -100
            span = (item[1], item[1] + len(proc.tokenizer.eos_token))
            units.append({"ids": [eos_id], "labels": [label], "kind": "eos", "offsets": [span]})
            first_content = False
    if append_trigger:
        label = proc.trigger_token_id if (return_labels and in_assistant(len(text) - 1)) else -100
        units.append(
            {"ids": [proc.trigger_token_id], "labels": [label], "kind": "trigger", "offsets": [(len(text),) * 2]}
        )
    return units


def truncate_units(units, max_length, side, sample):
    """Drop whole units from ``side`` until the sample fits ``max_length``; BOS is kept, an image block never
    dropped."""
    total = sum(len(u["ids"]) for u in units)
    if total <= max_length:
        return units
    units = list(units)
    pinned_bos = 1 if (units and units[0]["kind"] == "bos") else 0
    while total > max_length:
        index = len(units) - 1 if side == "right" else pinned_bos
        if index >= len(units) or index < pinned_bos:
            break
        unit = units[index]
        if unit["kind"] == "image":
            raise ValueError(
                f"`max_length`={max_length} would cut the image block of sample {sample} "
                "(an image block is never split or dropped); raise `max_length` or shorten the text"
            )
        units.pop(index)
        total -= len(unit["ids"])
    if total > max_length:
        raise ValueError(f"`max_length`={max_length} is too small for sample {sample}")
    return units


def pad_units(all_units, padding, max_length, multiple, padding_side: str, tokenizer):
    """Batch the units of each sample into ``(B, T)`` arrays padded on ``padding_side`` (``T`` from ``padding``,
    ``max_length`` and ``pad_to_multiple_of`` ``multiple``): input_ids (the tokenizer's pad id, else unk, else 0),
    attention_mask, labels, offset_mapping ``(B, T, 2)``, and per sample the box index of each pair in order."""
    lengths = [sum(len(u["ids"]) for u in units) for units in all_units]
    if padding in (False, "do_not_pad"):
        if len(set(lengths)) > 1:
            raise ValueError("`padding=False` but the samples have different lengths; enable padding")
        target = max(lengths)
    elif padding == "max_length":
        target = max(max_length, max(lengths))
    else:
        target = max(lengths)
    if multiple and padding not in (False, "do_not_pad") and target % multiple:
        target += multiple - target % multiple
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    batch_size = len(all_units)
    input_ids = np.full((batch_size, target), pad_id, dtype=np.int64)
    attention = np.zeros((batch_size, target), dtype=np.int64)
    labels = np.full((batch_size, target), -100, dtype=np.int64)
    offsets = np.zeros((batch_size, target, 2), dtype=np.int64)
    for b, units in enumerate(all_units):
        seq = [t for u in units for t in u["ids"]]
        n = len(seq)
        sl = slice(target - n, target) if padding_side == "left" else slice(0, n)
        input_ids[b, sl] = seq
        attention[b, sl] = 1
        labels[b, sl] = [t for u in units for t in u["labels"]]
        if n:
            offsets[b, sl] = [o for u in units for o in u["offsets"]]
    slots = [[u["box"] for u in units if u["kind"] == "pair"] for units in all_units]
    return input_ids, attention, labels, offsets, slots


__all__ = [
    "ChunkEncoder",
    "NEUTRAL_TEXT_KWARGS",
    "REF_RE",
    "VICUNA_V1_1_CHAT_TEMPLATE",
    "VICUNA_V1_1_SYSTEM",
    "assistant_ranges",
    "check_lengths",
    "encode_sample",
    "escape_text",
    "pad_units",
    "parse_text",
    "text_options",
    "truncate_units",
    "vicuna_chat_template",
]
