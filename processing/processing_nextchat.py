"""Processor of NExT-Chat: text with image placeholders and box references -> model inputs, and generated
sequences -> clean text with grounded entities (boxes in pixels, masks at the original resolution)."""

import bisect
import dataclasses
import importlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageColor
import PIL.ImageDraw
import PIL.ImageFont
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import (
    AudioKwargs,
    ProcessingKwargs,
    ProcessorMixin,
    TextKwargs,
    Unpack,
    VideosKwargs,
)
from transformers.utils import logging

from .image_processing_nextchat import (
    NextChatImageProcessor,
    NextChatImagesKwargs,
    boxes_from_square_frame,
    boxes_to_square_frame,
    flatten_images,
    masks_from_sam_frame,
    masks_to_sam_frame,
    rle_decode,
    to_rgb_image,
)


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

# Colours of the original demo's drawings.
DRAW_COLORS = ("#F76566", "#18ACBA", "#9400D3", "#454926", "#4E72B8")

_REF_RE = re.compile(r"\[\s*(\d+(?:\s*,\s*\d+)*)\s*,?\s*\]")
_DETERMINERS = frozenset(
    "a an the this that these those his her its their our my your some each every both another one two three "
    "four five six seven eight nine ten several many".split()
)
_SPAN_BOUNDARY = ".,;:!?\n()\""
_NO_SPACE_BEFORE = ".,;:!?)]}'%"


# --------------------------------------------------------------------------------------------------------------
# Plain-text encoding with the SentencePiece model itself (no added-token matching)
# --------------------------------------------------------------------------------------------------------------


class _ChunkEncoder:
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
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def _get(obj, key):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    value = getattr(obj, key, None)
    if value is None and hasattr(obj, "__getitem__") and not torch.is_tensor(obj):
        try:
            value = obj[key]
        except (KeyError, TypeError, IndexError):
            value = None
    return value


def _as_box_array(value, where: str) -> np.ndarray:
    if value is None:
        return np.zeros((0, 4), dtype=np.float64)
    if torch.is_tensor(value):
        value = value.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`boxes`{where} must be a list of [x1, y1, x2, y2] pixel boxes, got {value!r}") from err
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(
            f"`boxes`{where} must be a list of [x1, y1, x2, y2] pixel boxes (shape (n, 4)), got shape {arr.shape}"
            + ("; for one box write [[x1, y1, x2, y2]]" if arr.shape == (4,) else "")
        )
    return arr


def _to_list_of_ids(sequences) -> list[list[int]]:
    if torch.is_tensor(sequences):
        if sequences.ndim == 1:
            sequences = sequences[None]
        return sequences.detach().to("cpu").tolist()
    if isinstance(sequences, np.ndarray):
        if sequences.ndim == 1:
            sequences = sequences[None]
        return sequences.tolist()
    sequences = list(sequences)
    if sequences and isinstance(sequences[0], (int, np.integer)):
        return [[int(t) for t in sequences]]
    return [[int(t) for t in (s.tolist() if hasattr(s, "tolist") else s)] for s in sequences]


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


def draw_grounding(
    image,
    entities: Sequence[dict],
    labels: str | Sequence[str] = "index",
    colors: Sequence[str] = DRAW_COLORS,
    line_width: int | None = None,
    mask_alpha: float = 0.5,
    font_size: int | None = None,
    scale: int = 1,
) -> PIL.Image.Image:
    """Draw the entities of :meth:`NextChatProcessor.post_process_generation` on ``image`` (a new RGB PIL image):
    masks blended with ``mask_alpha``, box rectangles and labels (``"index"`` -> ``0``, ``1``, ...; ``"text"`` ->
    the grounded phrase; or an explicit list of strings), in the original demo's colours. ``scale`` (an integer)
    draws on the image enlarged that many times with nearest-neighbour pixels, for images too small to read."""
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"`scale` must be a positive integer, got {scale!r}")
    canvas = to_rgb_image(image, argument_name="image").copy()
    if scale > 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), PIL.Image.NEAREST)
        entities = [
            {**e,
             "box": None if e.get("box") is None else [float(v) * scale for v in e["box"]],
             "mask": None if e.get("mask") is None else np.kron(np.asarray(e["mask"], dtype=bool),
                                                                 np.ones((scale, scale), dtype=bool))}
            for e in entities
        ]
    width, height = canvas.size
    if isinstance(labels, str):
        if labels not in ("index", "text"):
            raise ValueError(f"`labels` must be 'index', 'text' or a list of strings, got {labels!r}")
        label_list = [str(i) if labels == "index" else (e.get("text") or str(i)) for i, e in enumerate(entities)]
    else:
        label_list = [str(v) for v in labels]
        if len(label_list) != len(entities):
            raise ValueError(f"`labels` has {len(label_list)} entries for {len(entities)} entities")
    if not colors:
        raise ValueError("`colors` must not be empty")
    rgb_colors = [PIL.ImageColor.getrgb(c) if isinstance(c, str) else tuple(c) for c in colors]
    arr = np.asarray(canvas).astype(np.float32)
    for i, entity in enumerate(entities):
        mask = entity.get("mask")
        if mask is None:
            continue
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (height, width):
            raise ValueError(f"entity {i} has a mask of shape {mask.shape}, the image is {(height, width)}")
        color = np.asarray(rgb_colors[i % len(rgb_colors)][:3], dtype=np.float32)
        arr[mask] = (1 - mask_alpha) * arr[mask] + mask_alpha * color
    canvas = PIL.Image.fromarray(np.round(arr).clip(0, 255).astype(np.uint8), mode="RGB")
    draw = PIL.ImageDraw.Draw(canvas)
    line_width = line_width or max(1, round(max(width, height) / 128))
    font_size = font_size or max(8, round(max(width, height) / 28))
    try:
        font = PIL.ImageFont.truetype("DejaVuSansMono.ttf", font_size)
    except OSError:
        try:
            font = PIL.ImageFont.load_default(size=font_size)
        except TypeError:  # Pillow < 10.1
            font = PIL.ImageFont.load_default()
    for i, entity in enumerate(entities):
        box = entity.get("box")
        if box is None:
            continue
        color = rgb_colors[i % len(rgb_colors)][:3]
        # boxes are pixel edges (x2 is the right edge of the last column inside): round them to the nearest edge
        # and give PIL, whose rectangle includes its end point, the last column and row inside
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=color, width=line_width)
        text = label_list[i]
        if text:
            left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
            draw.rectangle([left, top, right, bottom], fill=color)
            draw.text((x1, y1), text, fill=(255, 255, 255), font=font)
    return canvas



# --------------------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------------------


class NextChatProcessorKwargs(ProcessingKwargs, total=False):
    """The options of :meth:`NextChatProcessor.__call__` grouped as transformers groups them: ``text_kwargs``
    (transformers' ``TextKwargs``: ``padding``, ``padding_side``, ``truncation``, ``max_length``,
    ``add_special_tokens``, ``return_attention_mask``, ``return_offsets_mapping``, ``pad_to_multiple_of``,
    ``return_tensors``), ``images_kwargs`` (:class:`NextChatImagesKwargs`: any field of the image processor for
    this call, ``return_sam_pixel_values``, ``input_data_format``) and ``common_kwargs`` (e.g. ``return_tensors``).
    Each can also be passed flat. NExT-Chat's own arguments (``boxes``, ``masks``, ``return_labels``,
    ``append_trigger``, ``clip_boxes``, ``truncation_side``) are named arguments of ``__call__``."""

    text_kwargs: TextKwargs
    images_kwargs: NextChatImagesKwargs
    _defaults = {
        "text_kwargs": {"padding": True, "truncation": False, "add_special_tokens": True, "return_tensors": "pt"},
        "images_kwargs": {"return_tensors": "pt"},
    }



class NextChatProcessor(ProcessorMixin):
    r"""
    Processor of NExT-Chat: a :class:`NextChatImageProcessor` and the checkpoint's LLaMA tokenizer.

    **Text syntax** understood by :meth:`__call__` (``apply_chat_template`` renders conversations into it):

    * ``<image>`` (``image_placeholder``): one image block ``<im_start>`` + ``image_seq_length`` x ``<im_patch>``
      + ``<im_end>``. Each sample has zero or one image, and as many ``<image>`` as images (else ``ValueError``).
    * ``[i]`` / ``[i,j,...]`` (a bracketed list of non-negative integers, spaces and a trailing comma allowed, as in
      the original demo): a reference to ``boxes[i]`` of that sample. Each index becomes one ``<at> <boxes>`` pair
      (``[0,1]`` -> ``<at> <boxes> <at> <boxes>``) and one slot of ``box_inputs``, in order of appearance. Works in
      user and assistant turns (assistant references are the training targets). A reference to a box that does not
      exist, and a box that is never referred to, are ``ValueError``\ s.
    * ``</s>`` (the tokenizer's EOS): the end of an assistant turn, as the vicuna template writes it.
    * Escapes: ``\[`` is a literal ``[``, ``\<image>`` a literal ``<image>``, ``\</s>`` a literal ``</s>``; any other
      backslash is literal (so a literal backslash cannot directly precede a live ``[i]``, ``<image>`` or
      ``</s>``: put a space between). :meth:`escape_text` escapes untrusted text.
    * **Control tokens typed in the text are escaped, never obeyed**: ``<im_patch>``, ``<im_start>``, ``<im_end>``,
      ``<at>``, ``<boxes>`` (and ``<s>``, ``<unk>``) appearing in the text are encoded as the plain characters they
      are made of, so a user cannot inject an image slot or a trigger. Use ``[i]`` for box references and
      ``append_trigger=True`` to end a prompt with ``<at>`` (which asks the model for a box).

    **Tokenisation** follows the original (transformers 4.31 slow ``LlamaTokenizer``, reference §4.2) regardless of
    how the tokenizer folder is configured: whitespace on both sides of an image block and of an ``<at> <boxes>``
    pair is dropped (not around ``</s>``), and each stretch of text between them is encoded by the SentencePiece
    model on its own; the text at the very start gets the dummy-prefix ``▁``. What the text after a control token
    or ``</s>`` gets depends on ``original_legacy``: ``True`` (4.31, ``legacy=True``): the dummy prefix, like every
    chunk (``<im_end> What`` -> ``<im_end> ▁What``); ``False`` (4.31, ``legacy=False``): encoded with the prefix,
    which is then cut off the first piece (``▁What`` -> ``What``; a lone ``▁`` is dropped, and a remainder that is
    no piece becomes ``<unk>``, as 4.31 did), except after ``</s>`` when the text starts with a space; ``None``
    (default): no prefix (transformers 5's ``legacy=False``). Typed ``▁`` counts as a space under ``False``.
    Plain text is encoded with the SentencePiece model directly, so these rules do not depend on the tokenizer
    folder's own settings.

    **Boxes** are pixel ``xyxy`` on the original image of the sample (float, ``x1 <= x2``, ``y1 <= y2``, inside the
    image; NaN, inverted or outside boxes are ``ValueError`` unless ``clip_boxes=True`` clips them). They are
    returned as ``box_inputs`` (B, N, 4), normalised to the padded-square frame of the model, with
    ``box_inputs_mask`` (B, N).

    Args:
        image_processor (`NextChatImageProcessor`): CLIP and SAM preprocessing.
        tokenizer (`PreTrainedTokenizerBase`): the checkpoint's tokenizer, holding the five NExT-Chat tokens.
        chat_template (`str`, *optional*): defaults to vicuna v1.1 (:data:`VICUNA_V1_1_CHAT_TEMPLATE`).
        image_seq_length (`int`, *optional*, defaults to 576): number of ``<im_patch>`` per image
            (``config.image_seq_length``).
        trigger_token, box_token, image_token, image_start_token, image_end_token (`str`, *optional*): the token
            strings; by default taken from the tokenizer's attributes of the same name when it has them, else
            ``<at>``, ``<boxes>``, ``<im_patch>``, ``<im_start>``, ``<im_end>``. Their ids are always read from the
            tokenizer.
        image_placeholder (`str`, *optional*, defaults to ``"<image>"``): the text placeholder of an image.
        assistant_marker (`str`, *optional*, defaults to ``"ASSISTANT:"``): the string that opens an assistant turn;
            used by ``return_labels`` (targets run from the last marker before each ``</s>`` to that ``</s>``).
        original_legacy (`bool`, *optional*): the ``legacy`` flag of the original checkpoint's slow tokenizer
            (transformers 4.31) whose ids to reproduce; ``nextchat-convert`` sets it from the checkpoint's
            ``tokenizer_config.json`` (absent there means ``True``, 4.31's default). ``None`` (default, e.g. a model
            trained with this package's tokenizers): the transformers 5 rule. See **Tokenisation**.
    """

    valid_processor_kwargs = NextChatProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_seq_length: int = 576,
        trigger_token: str | None = None,
        box_token: str | None = None,
        image_token: str | None = None,
        image_start_token: str | None = None,
        image_end_token: str | None = None,
        image_placeholder: str = "<image>",
        assistant_marker: str = "ASSISTANT:",
        original_legacy: bool | None = None,
        **kwargs,
    ):
        if chat_template is None:
            chat_template = VICUNA_V1_1_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if not isinstance(image_seq_length, int) or isinstance(image_seq_length, bool) or image_seq_length < 1:
            raise ValueError(f"`image_seq_length` must be a positive int, got {image_seq_length!r}")
        self.image_seq_length = image_seq_length
        defaults = {
            "trigger_token": ("<at>", trigger_token),
            "box_token": ("<boxes>", box_token),
            "image_token": ("<im_patch>", image_token),
            "image_start_token": ("<im_start>", image_start_token),
            "image_end_token": ("<im_end>", image_end_token),
        }
        vocab = tokenizer.get_vocab()
        ids = {}
        for name, (default, given) in defaults.items():
            value = given if given is not None else getattr(tokenizer, name, None)
            if not isinstance(value, str) or not value:
                value = default
            if value not in vocab:
                raise ValueError(
                    f"`{name}`={value!r} is not a token of the tokenizer; a NExT-Chat tokenizer has the added tokens "
                    "<im_patch>, <im_start>, <im_end>, <at>, <boxes>"
                )
            setattr(self, name, value)
            ids[name] = vocab[value]
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"the five NExT-Chat tokens must have distinct ids, got {ids}")
        self._token_ids = ids
        if not image_placeholder or not isinstance(image_placeholder, str):
            raise ValueError(f"`image_placeholder` must be a non-empty string, got {image_placeholder!r}")
        if image_placeholder.startswith("["):
            raise ValueError("`image_placeholder` must not start with '[' (box references use brackets)")
        self.image_placeholder = image_placeholder
        self.assistant_marker = assistant_marker
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; the vicuna template needs `</s>`")
        if original_legacy is not None and not isinstance(original_legacy, bool):
            raise ValueError(f"`original_legacy` must be True, False or None, got {original_legacy!r}")
        self.original_legacy = original_legacy
        self._encoder = _ChunkEncoder(tokenizer)

    # -- token properties -------------------------------------------------------------------------------------

    @property
    def trigger_token_id(self) -> int:
        return self._token_ids["trigger_token"]

    @property
    def box_token_id(self) -> int:
        return self._token_ids["box_token"]

    @property
    def image_token_id(self) -> int:
        return self._token_ids["image_token"]

    @property
    def image_start_token_id(self) -> int:
        return self._token_ids["image_start_token"]

    @property
    def image_end_token_id(self) -> int:
        return self._token_ids["image_end_token"]

    @property
    def special_token_ids(self) -> dict[str, int]:
        """The ids under the names of the `NextChatConfig` fields."""
        return {
            "image_token_id": self.image_token_id,
            "image_start_token_id": self.image_start_token_id,
            "image_end_token_id": self.image_end_token_id,
            "trigger_token_id": self.trigger_token_id,
            "box_token_id": self.box_token_id,
        }

    @property
    def control_token_ids(self) -> frozenset[int]:
        return frozenset(self._token_ids.values())

    @property
    def model_input_names(self) -> list[str]:
        """The model inputs that :meth:`__call__` returns for a text with an image, in its order (as in
        transformers, training targets are not listed: ``labels`` and ``mask_targets`` come only on request, like
        ``offset_mapping``). ``sam_pixel_values`` is listed when the image processor has SAM."""
        names = ["input_ids", "attention_mask", "box_inputs", "box_inputs_mask", "pixel_values", "image_sizes"]
        if self.image_processor.sam_image_size is not None:
            names.append("sam_pixel_values")
        return names

    def escape_text(self, text: str) -> str:
        """See :func:`escape_text`."""
        return escape_text(text, self.image_placeholder, self.tokenizer.eos_token)

    # -- saving and loading -----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`ProcessorMixin.save_pretrained`, plus `auto_map` and the flat remote code, so that `AutoProcessor` loads
        the folder with `trust_remote_code=True` where `nextchat` is not installed."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if __name__.startswith("nextchat."):
            # From the installed package; code loaded from the Hub is flat already and transformers copies it.
            remote_code = importlib.import_module("nextchat.remote_code")
            remote_code.write_remote_code(save_directory)
            remote_code.add_processor_auto_map(save_directory)
        return result

    # -- parsing ----------------------------------------------------------------------------------------------

    def _parse(self, text: str, sample: int) -> list[tuple]:
        """Split text into ("text", chars, src) / ("image", pos) / ("ref", [idx], pos) / ("eos", pos) items."""
        placeholder = self.image_placeholder
        eos = self.tokenizer.eos_token
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
                match = _REF_RE.match(text, i)
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

    def _assistant_ranges(self, text: str) -> list[tuple[int, int]]:
        eos = self.tokenizer.eos_token
        marker = self.assistant_marker
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

    # -- encoding one sample ----------------------------------------------------------------------------------

    def _encode_sample(self, text, sample, n_images, boxes_px, image_size, return_labels, append_trigger, add_bos):
        """Return a list of units: dicts with ids, labels, kind ('bos'|'text'|'image'|'pair'|'eos'|'trigger') and
        for pairs the box index."""
        items = self._parse(text, sample)
        n_placeholders = sum(1 for it in items if it[0] == "image")
        if n_placeholders != n_images:
            if n_images == 1 and n_placeholders == 0:
                raise ValueError(
                    f"sample {sample} has an image but its `text` has no {self.image_placeholder!r} placeholder; "
                    "put one where the image goes (apply_chat_template does it for image content parts)"
                )
            raise ValueError(
                f"`text` of sample {sample} has {n_placeholders} {self.image_placeholder!r} placeholder(s) but "
                f"{n_images} image(s) were given in `images` (one image per sample at most)"
            )
        n_boxes = len(boxes_px)
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
        ranges = self._assistant_ranges(text) if return_labels else []

        def in_assistant(pos):
            return any(a <= pos < b for a, b in ranges)

        units = []
        if add_bos and self.tokenizer.bos_token_id is not None:
            units.append({"ids": [self.tokenizer.bos_token_id], "labels": [-100], "kind": "bos", "offsets": [(0, 0)]})
        hard = ("image", "ref")
        n_items = len(items)
        first_content = True  # nothing has been emitted from the text yet -> dummy prefix
        for k, item in enumerate(items):
            kind = item[0]
            if kind == "text":
                chunk, src = item[1], item[2]
                if self.original_legacy is False:
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
                ids, starts = self._encoder.encode_chunk(piece, first=first_content, legacy=self.original_legacy)
                if not self._encoder.exact and self.control_token_ids.intersection(ids):
                    raise ValueError(
                        f"`text` of sample {sample} contains a NExT-Chat control token "
                        f"({', '.join(self._token_ids)}); this tokenizer cannot escape it"
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
                block = [self.image_start_token_id] + [self.image_token_id] * self.image_seq_length
                block.append(self.image_end_token_id)
                span = (item[1], item[1] + len(self.image_placeholder))
                units.append(
                    {"ids": block, "labels": [-100] * len(block), "kind": "image", "offsets": [span] * len(block)}
                )
                first_content = False
            elif kind == "ref":
                target = return_labels and in_assistant(item[2])
                span = (item[2], _REF_RE.match(text, item[2]).end())
                for idx in item[1]:
                    units.append(
                        {
                            "ids": [self.trigger_token_id, self.box_token_id],
                            "labels": [self.trigger_token_id if target else -100, -100],
                            "kind": "pair",
                            "box": idx,
                            "offsets": [span, span],
                        }
                    )
                first_content = False
            else:  # eos
                eos_id = self.tokenizer.eos_token_id
                label = eos_id if (return_labels and in_assistant(item[1])) else -100
                span = (item[1], item[1] + len(self.tokenizer.eos_token))
                units.append({"ids": [eos_id], "labels": [label], "kind": "eos", "offsets": [span]})
                first_content = False
        if append_trigger:
            label = self.trigger_token_id if (return_labels and in_assistant(len(text) - 1)) else -100
            units.append(
                {"ids": [self.trigger_token_id], "labels": [label], "kind": "trigger", "offsets": [(len(text),) * 2]}
            )
        return units

    @staticmethod
    def _truncate(units, max_length, side, sample):
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

    # -- batching helpers -------------------------------------------------------------------------------------

    @staticmethod
    def _per_sample(value, batch_size, single, name):
        """Split a per-sample argument into a list of length batch_size."""
        if value is None:
            return [None] * batch_size
        if single:
            return [value]
        if torch.is_tensor(value) or isinstance(value, np.ndarray):
            value = list(value)
        if not isinstance(value, (list, tuple)) or len(value) != batch_size:
            got = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
            raise ValueError(f"`{name}` must have one entry per text ({batch_size}), got {got}")
        return list(value)

    def _split_images(self, images, batch_size, single):
        if images is None:
            return [[] for _ in range(batch_size)]
        if single:
            if isinstance(images, (list, tuple)) and len(images) == 1 and isinstance(images[0], (list, tuple)):
                images = images[0]  # transformers' nested layout: one list of images per text
            flat = flatten_images(images, "images")
            if len(flat) > 1:
                raise ValueError(f"`images`: NExT-Chat takes at most one image per sample, got {len(flat)}")
            return [flat]
        if (torch.is_tensor(images) or isinstance(images, np.ndarray)) and images.ndim == 4:
            images = list(images)
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"`images` must be a list with one image (or None) per text, got {type(images).__name__}")
        if len(images) != batch_size:
            raise ValueError(f"`images` has {len(images)} entries but `text` has {batch_size}; give one per text")
        out = []
        for item in images:
            flat = flatten_images(item, "images") if item is not None else []
            if len(flat) > 1:
                raise ValueError(f"`images`: NExT-Chat takes at most one image per sample, got {len(flat)}")
            out.append(flat)
        return out

    def _prepare_masks(self, masks_of_sample, n_boxes, image_size, sample):
        if masks_of_sample is None:
            return [None] * n_boxes
        if torch.is_tensor(masks_of_sample):
            masks_of_sample = masks_of_sample.detach().to("cpu").numpy()
        if isinstance(masks_of_sample, np.ndarray):
            if masks_of_sample.ndim != 3:
                raise ValueError(f"`masks` of sample {sample} must be (n_boxes, height, width), got {masks_of_sample.shape}")
            masks_of_sample = list(masks_of_sample)
        if not isinstance(masks_of_sample, (list, tuple)) or len(masks_of_sample) != n_boxes:
            got = len(masks_of_sample) if isinstance(masks_of_sample, (list, tuple)) else type(masks_of_sample).__name__
            raise ValueError(f"`masks` of sample {sample} must hold one entry (or None) per box ({n_boxes}), got {got}")
        out = []
        for i, mask in enumerate(masks_of_sample):
            if mask is None:
                out.append(None)
                continue
            if isinstance(mask, dict):
                mask = rle_decode(mask)
            elif torch.is_tensor(mask):
                mask = mask.detach().to("cpu").numpy()
            mask = np.asarray(mask)
            if mask.shape != tuple(image_size):
                raise ValueError(
                    f"`masks`[{sample}][{i}] has shape {mask.shape}, expected the original image size {tuple(image_size)}"
                )
            if mask.dtype != np.bool_ and not np.all(np.isin(mask, (0, 1))):
                raise ValueError(f"`masks`[{sample}][{i}] must be binary (0/1 or bool)")
            out.append(mask.astype(bool))
        return out

    # -- main call --------------------------------------------------------------------------------------------

    # TextKwargs this processor cannot honour: accepted only at their neutral values
    _NEUTRAL_TEXT_KWARGS = {
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

    def _call_options(self, kwargs: dict) -> dict:
        """Merge the transformers-style options of a call (flat, ``text_kwargs``, ``images_kwargs``,
        ``common_kwargs``) with ``ProcessorMixin._merge_kwargs`` and check them. Unknown names are errors; video and
        audio options are accepted as transformers accepts them, and have nothing to apply to (videos and audio
        themselves are errors)."""
        modalities = {"text_kwargs", "images_kwargs", "videos_kwargs", "audio_kwargs"}
        text_keys = set(TextKwargs.__annotations__)
        image_keys = set(NextChatImagesKwargs.__annotations__)
        image_keys |= set(getattr(getattr(self.image_processor, "valid_kwargs", None), "__annotations__", {}))
        video_keys, audio_keys = set(VideosKwargs.__annotations__), set(AudioKwargs.__annotations__)
        flat_keys = set(self.valid_processor_kwargs.__annotations__) - modalities
        known = text_keys | image_keys | video_keys | audio_keys
        allowed = {
            "text_kwargs": text_keys,
            "images_kwargs": image_keys,
            "videos_kwargs": video_keys,
            "audio_kwargs": audio_keys,
            "common_kwargs": known,
        }
        for key, value in kwargs.items():
            if key in allowed:
                if not isinstance(value, dict):
                    raise ValueError(f"`{key}` must be a dict, got {type(value).__name__}")
                unknown = sorted(set(value) - allowed[key] - flat_keys)
                if unknown:
                    raise ValueError(f"NextChatProcessor: `{key}` has unknown arguments {unknown}")
            elif key not in known | flat_keys:
                raise ValueError(f"NextChatProcessor got unknown arguments {[key]}")
        tokenizer_init_kwargs = getattr(self.tokenizer, "init_kwargs", None)
        try:
            merged = self._merge_kwargs(
                self.valid_processor_kwargs, tokenizer_init_kwargs=tokenizer_init_kwargs, **kwargs
            )
        except ValueError:
            raise
        except Exception as err:  # huggingface_hub's StrictDataclassFieldValidationError is not a ValueError
            raise ValueError(f"NextChatProcessor: invalid argument: {err}") from err
        text_kwargs = dict(merged["text_kwargs"])
        images_kwargs = dict(merged["images_kwargs"])
        options = {}
        # processor-level flags (text kwargs in older transformers versions)
        for key in ("return_text_replacement_offsets", "return_mm_token_type_ids"):
            value = text_kwargs.pop(key, None)
            options[key] = bool(value if value is not None else merged.get(key, False))
        for key, neutral in self._NEUTRAL_TEXT_KWARGS.items():
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
        images_kwargs.pop("return_tensors", None)  # the processor assembles the images itself
        seq_length = images_kwargs.pop("image_seq_length", None)
        if seq_length is not None and seq_length != self.image_seq_length:
            raise ValueError(
                f"`image_seq_length`={seq_length!r} differs from the processor's {self.image_seq_length} "
                "(set it when building the processor: it must match the model)"
            )
        options["images_kwargs"] = images_kwargs
        return options

    def __call__(
        self,
        images: ImageInput | None = None,
        text: str | list[str] | None = None,
        boxes=None,
        masks=None,
        return_labels: bool | None = None,
        append_trigger: bool | Sequence[bool] | None = None,
        clip_boxes: bool | None = None,
        truncation_side: str | None = None,
        **kwargs: Unpack[NextChatProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Build model inputs.

        Args:
            images: one image per text (or ``None`` for a text-only sample): a single image for a single text, a
                list (one entry per text) for a batch. Any PIL mode, numpy HWC/CHW, torch CHW/HWC, a file path.
            text (`str` or `list[str]`): prompts in the syntax of the class docstring (usually from
                :meth:`apply_chat_template`).
            boxes: pixel ``xyxy`` boxes on the original image, referred to from the text as ``[i]``: an ``(n, 4)``
                array-like for a single text, a list of them (one per text, ``None``/``[]`` for none) for a batch.
            masks: only with SAM: per box a binary mask at the original resolution (array ``(h, w)``, or COCO RLE
                ``{"size": [h, w], "counts": ...}``) or ``None``; aligned with ``boxes``. Returned as
                ``mask_targets`` (B, N, S, S) in the SAM input frame, aligned with ``box_inputs``; slots without a mask
                are filled with -100.
            return_labels (`bool`, defaults to `False`): training mode; also returns ``labels`` (-100 except the
                assistant tokens, their ``</s>`` and assistant ``<at>``; ``<boxes>``, images and padding are always
                -100).
            append_trigger (`bool` or list, defaults to `False`): end the prompt (of every / of the selected
                samples) with ``<at>``, which makes the model predict a box first (the REC shortcut).
            clip_boxes (`bool`, defaults to `False`): clip boxes that leave the image instead of raising.
            truncation_side (`str`, *optional*): ``"left"`` or ``"right"``; defaults to the tokenizer's.
            **kwargs (:class:`NextChatProcessorKwargs`): transformers' processor options, flat or grouped as
                ``text_kwargs={...}``, ``images_kwargs={...}``, ``common_kwargs={...}`` and merged with
                ``ProcessorMixin._merge_kwargs`` (so with transformers' precedence: flat, then grouped, then
                common, then the tokenizer's init arguments, then the defaults). Text options:

                - ``padding``: ``True``/``"longest"`` (default), ``"max_length"`` or ``False``; ``padding_side``
                  defaults to the tokenizer's; ``pad_to_multiple_of``.
                - ``truncation``, ``max_length``: drop tokens from ``truncation_side`` until the sample fits, never
                  splitting an image block (which is never dropped: ``ValueError``) or an ``<at> <boxes>`` pair
                  (dropped whole, with its ``box_inputs`` slot). BOS is kept.
                - ``add_special_tokens`` (`bool`): prepend BOS (when the tokenizer adds one).
                - ``return_attention_mask`` (default ``True``), ``return_offsets_mapping`` (``offset_mapping``
                  (B, T, 2): the characters of ``text`` each token comes from; all tokens of an image block point
                  at its placeholder, both tokens of a pair at its ``[i]``; padding and appended tokens are empty),
                  ``return_text_replacement_offsets``, ``return_mm_token_type_ids`` (1 at ``<im_patch>``).
                - ``return_tensors``: ``"pt"`` (default) or ``"np"``.

                Image options: any field of :class:`NextChatImageProcessor` for this call (``do_resize``,
                ``size``, ``do_center_crop``, ``crop_size``, ``do_rescale``, ``rescale_factor``,
                ``do_normalize``, ``image_mean``, ``image_std``, ``do_pad_to_square``, ``pad_color``,
                ``sam_image_size``, ...), ``return_sam_pixel_values`` (defaults to whether the image processor has
                SAM) and ``input_data_format`` (``"channels_first"``/``"channels_last"`` for ambiguous arrays).

        Returns:
            `BatchFeature` with ``input_ids``, ``attention_mask``, ``box_inputs`` (B, N, 4) float32,
            ``box_inputs_mask`` (B, N) bool, and with images ``pixel_values`` (n_images, 3, H, W), ``image_sizes``
            (B, 2) original (height, width) (0, 0 for a sample without image), ``sam_pixel_values`` (B, 3, S, S)
            (zeros for a sample without image); ``labels``, ``mask_targets``, ``offset_mapping``,
            ``text_replacement_offsets`` and ``mm_token_type_ids`` on request.
        """
        for key in ("videos", "audio"):
            if kwargs.pop(key, None) is not None:
                raise ValueError(f"NExT-Chat takes no `{key}`")
        return_labels = bool(return_labels)
        clip_boxes = bool(clip_boxes)
        if append_trigger is None:
            append_trigger = False
        options = self._call_options(kwargs)
        padding = options["padding"]
        padding_side = options["padding_side"]
        truncation = options["truncation"]
        max_length = options["max_length"]
        add_special_tokens = options["add_special_tokens"]
        return_tensors = options["return_tensors"]
        images_kwargs = options["images_kwargs"]
        return_sam_pixel_values = images_kwargs.pop("return_sam_pixel_values", None)
        if text is None:
            raise ValueError("`text` is required (use apply_chat_template to build it)")
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("`text` must be a string or a non-empty list of strings")
        batch_size = len(texts)
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"`return_tensors` must be 'pt' or 'np', got {return_tensors!r}")
        padding_side = padding_side or getattr(self.tokenizer, "padding_side", "right")
        truncation_side = truncation_side or getattr(self.tokenizer, "truncation_side", "right")
        if padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"`truncation_side` must be 'left' or 'right', got {truncation_side!r}")
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"`padding` must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"`max_length` must be a positive int, got {max_length!r}")
        if truncation and max_length is None:
            model_max = getattr(self.tokenizer, "model_max_length", None)
            if model_max is None or model_max > 10**8:
                raise ValueError("`truncation=True` needs `max_length` (the tokenizer has no model_max_length)")
            max_length = int(model_max)
        if padding == "max_length" and max_length is None:
            raise ValueError("`padding='max_length'` needs `max_length`")

        if isinstance(append_trigger, (bool, np.bool_)):
            append_flags = [bool(append_trigger)] * batch_size
        else:
            append_flags = [bool(v) for v in append_trigger]
            if len(append_flags) != batch_size:
                raise ValueError(f"`append_trigger` must be a bool or one bool per text ({batch_size})")

        sam_size = images_kwargs.get("sam_image_size")
        if sam_size is None:
            sam_size = self.image_processor.sam_image_size
        sam_enabled = sam_size is not None
        if return_sam_pixel_values is None:
            return_sam_pixel_values = sam_enabled
        if return_sam_pixel_values and not sam_enabled:
            raise ValueError("`return_sam_pixel_values=True` but the image processor has no `sam_image_size`")
        if masks is not None and not sam_enabled:
            raise ValueError("`masks` need SAM (the image processor has no `sam_image_size`)")

        images_per_sample = self._split_images(images, batch_size, single)
        boxes_per_sample = self._per_sample(boxes, batch_size, single, "boxes")
        masks_per_sample = self._per_sample(masks, batch_size, single, "masks")

        flat_images = [img for per in images_per_sample for img in per]
        image_features = None
        rgb_sizes = []
        if flat_images:
            image_features = self.image_processor(
                flat_images, return_sam_pixel_values=bool(return_sam_pixel_values), return_tensors="np", **images_kwargs
            )
            rgb_sizes = [tuple(int(v) for v in s) for s in image_features["image_sizes"]]

        all_units, all_norm_boxes, all_masks = [], [], []
        image_cursor = 0
        sample_image_index = []
        for b in range(batch_size):
            n_img = len(images_per_sample[b])
            size = rgb_sizes[image_cursor] if n_img else None
            sample_image_index.append(image_cursor if n_img else None)
            image_cursor += n_img
            where = "" if single else f"[{b}]"
            box_px = _as_box_array(boxes_per_sample[b], where)
            if len(box_px):
                if size is None:
                    raise ValueError(f"`boxes`{where} are given for a sample without an image")
                box_px = self._check_boxes(box_px, size, where, clip_boxes)
            norm = boxes_to_square_frame(box_px, size) if len(box_px) else np.zeros((0, 4))
            sample_masks = None
            if masks_per_sample[b] is not None:
                if size is None:
                    raise ValueError(f"`masks`{where} are given for a sample without an image")
                sample_masks = self._prepare_masks(masks_per_sample[b], len(box_px), size, b)
            units = self._encode_sample(
                texts[b], b, n_img, box_px, size, return_labels, append_flags[b], add_special_tokens
            )
            if truncation:
                units = self._truncate(units, max_length, truncation_side, b)
            all_units.append(units)
            all_norm_boxes.append(norm)
            all_masks.append(sample_masks)

        # assemble
        sequences = [[t for u in units for t in u["ids"]] for units in all_units]
        label_seqs = [[t for u in units for t in u["labels"]] for units in all_units]
        slots = [[u["box"] for u in units if u["kind"] == "pair"] for units in all_units]
        lengths = [len(s) for s in sequences]
        if padding in (False, "do_not_pad"):
            if len(set(lengths)) > 1:
                raise ValueError("`padding=False` but the samples have different lengths; enable padding")
            target = max(lengths)
        elif padding == "max_length":
            target = max(max_length, max(lengths))
        else:
            target = max(lengths)
        multiple = options["pad_to_multiple_of"]
        if multiple and padding not in (False, "do_not_pad") and target % multiple:
            target += multiple - target % multiple
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.unk_token_id if self.tokenizer.unk_token_id is not None else 0
        input_ids = np.full((batch_size, target), pad_id, dtype=np.int64)
        attention = np.zeros((batch_size, target), dtype=np.int64)
        labels = np.full((batch_size, target), -100, dtype=np.int64)
        offsets = np.zeros((batch_size, target, 2), dtype=np.int64)
        for b, seq in enumerate(sequences):
            n = len(seq)
            sl = slice(target - n, target) if padding_side == "left" else slice(0, n)
            input_ids[b, sl] = seq
            attention[b, sl] = 1
            labels[b, sl] = label_seqs[b]
            if n:
                offsets[b, sl] = [o for u in all_units[b] for o in u["offsets"]]
        n_slots = max((len(s) for s in slots), default=0)
        box_inputs = np.zeros((batch_size, n_slots, 4), dtype=np.float32)
        box_mask = np.zeros((batch_size, n_slots), dtype=bool)
        for b, sample_slots in enumerate(slots):
            for k, idx in enumerate(sample_slots):
                box_inputs[b, k] = all_norm_boxes[b][idx]
                box_mask[b, k] = True

        data: dict[str, Any] = {"input_ids": input_ids}
        if options["return_attention_mask"]:
            data["attention_mask"] = attention
        data["box_inputs"] = box_inputs
        data["box_inputs_mask"] = box_mask
        if return_labels:
            data["labels"] = labels
        if options["return_offsets_mapping"]:
            data["offset_mapping"] = offsets
        if options["return_mm_token_type_ids"]:
            data["mm_token_type_ids"] = (input_ids == self.image_token_id).astype(np.int64)
        if image_features is not None:
            data["pixel_values"] = image_features["pixel_values"]
            sizes = np.zeros((batch_size, 2), dtype=np.int64)
            for b, index in enumerate(sample_image_index):
                if index is not None:
                    sizes[b] = rgb_sizes[index]
            data["image_sizes"] = sizes
            if return_sam_pixel_values:
                s = sam_size
                sam = np.zeros((batch_size, 3, s, s), dtype=np.float32)
                for b, index in enumerate(sample_image_index):
                    if index is not None:
                        sam[b] = image_features["sam_pixel_values"][index]
                data["sam_pixel_values"] = sam
        if masks is not None:
            s = sam_size
            targets = np.full((batch_size, n_slots, s, s), -100, dtype=np.float32)
            for b, sample_slots in enumerate(slots):
                if all_masks[b] is None:
                    continue
                for k, idx in enumerate(sample_slots):
                    if all_masks[b][idx] is not None:
                        targets[b, k] = masks_to_sam_frame(all_masks[b][idx], s)[0]
            data["mask_targets"] = targets
        out = BatchFeature(data=data, tensor_type="pt" if return_tensors == "pt" else None)
        if options["return_text_replacement_offsets"]:
            # offset_mapping is in the characters of `text` itself, so each placeholder keeps its span
            out["text_replacement_offsets"] = [
                [
                    {
                        "type": "image",
                        "span": (item[1], item[1] + len(self.image_placeholder)),
                        "new_span": (item[1], item[1] + len(self.image_placeholder)),
                        "text": self.image_placeholder,
                        "replacement": self.image_start_token + self.image_token * self.image_seq_length
                        + self.image_end_token,
                    }
                    for item in self._parse(sample_text, b)
                    if item[0] == "image"
                ]
                for b, sample_text in enumerate(texts)
            ]
        return out

    @staticmethod
    def _check_boxes(box_px, size, where, clip_boxes):
        height, width = size
        if not np.all(np.isfinite(box_px)):
            raise ValueError(f"`boxes`{where} contains NaN or infinite coordinates: {box_px.tolist()}")
        inverted = (box_px[:, 2] < box_px[:, 0]) | (box_px[:, 3] < box_px[:, 1])
        if inverted.any():
            i = int(np.flatnonzero(inverted)[0])
            raise ValueError(
                f"`boxes`{where}[{i}] = {box_px[i].tolist()} is inverted; boxes are pixel [x1, y1, x2, y2] with "
                "x1 <= x2 and y1 <= y2"
            )
        limits = np.array([width, height, width, height], dtype=np.float64)
        outside = (box_px < 0).any(axis=1) | (box_px > limits).any(axis=1)
        if outside.any():
            if not clip_boxes:
                i = int(np.flatnonzero(outside)[0])
                raise ValueError(
                    f"`boxes`{where}[{i}] = {box_px[i].tolist()} leaves the image of (height, width) = {size}; "
                    "pass pixel boxes on the original image, or `clip_boxes=True` to clip them"
                )
            box_px = np.clip(box_px, 0, limits)
        return box_px

    # -- chat template ----------------------------------------------------------------------------------------

    # NExT-Chat's own arguments of `__call__` that `apply_chat_template` passes on to it
    _CHAT_CALL_ARGUMENTS = ("boxes", "masks", "return_labels", "append_trigger", "clip_boxes", "truncation_side")

    @classmethod
    def _plain_messages(cls, value):
        """Message objects (dataclasses, pydantic models such as OpenAI's) -> dicts, media left as they are; as
        transformers >= 5.25 does itself, for the older versions of the supported range."""
        if isinstance(value, Mapping):
            return {key: cls._plain_messages(item) for key, item in value.items()}
        if isinstance(value, list):
            return [cls._plain_messages(item) for item in value]
        if isinstance(value, tuple):
            return tuple(cls._plain_messages(item) for item in value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: cls._plain_messages(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if callable(getattr(value, "model_dump", None)):
            return cls._plain_messages(value.model_dump())
        return value

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """Render a conversation (or a list of conversations) with the chat template (vicuna v1.1 by default):
        transformers' ``ProcessorMixin.apply_chat_template`` with all its options and defaults.

        Messages are dicts (or message objects) ``{"role": "system" | "user" | "assistant", "content": str |
        [parts]}``; parts are ``{"type": "text", "text": ...}`` or ``{"type": "image"}``, optionally with the image
        under ``"image"``, ``"url"``, ``"path"`` (a PIL image, array or local file), rendered as ``<image>``. Box
        references ``[i]`` may appear in any message. ``add_generation_prompt`` ends the prompt with
        ``ASSISTANT:``; ``continue_final_message`` leaves the final (assistant) message open (e.g. ``"Answer:"``);
        other keyword arguments that the template uses reach it as template variables.

        As in transformers, ``tokenize=False`` (the default) returns the text. ``tokenize=True`` runs the text
        through :meth:`__call__` with the images found in the messages and returns the ``input_ids``, or with
        ``return_dict=True`` the whole `BatchFeature`; ``return_assistant_tokens_mask=True`` adds
        ``assistant_masks`` (1 on the tokens of the assistant turns: their text, ``<at> <boxes>`` pairs and
        ``</s>``, as the template's ``{% generation %}`` marks them). Options of :meth:`__call__` go in
        ``processor_kwargs``; NExT-Chat's own ones (``boxes``, ``masks``, ``return_labels``, ``append_trigger``,
        ``clip_boxes``, ``truncation_side``) may also be passed directly."""
        moved = {key: kwargs.pop(key) for key in self._CHAT_CALL_ARGUMENTS if key in kwargs}
        if moved:
            processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
            for key, value in moved.items():
                if key in processor_kwargs:
                    raise ValueError(f"`{key}` is given twice: as an argument and in `processor_kwargs`")
                processor_kwargs[key] = value
            kwargs["processor_kwargs"] = processor_kwargs
        conversation = self._plain_messages(getattr(conversation, "messages", conversation))
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    # -- post-processing --------------------------------------------------------------------------------------

    def _decode_segments(self, ids: list[int], skip_special_tokens: bool):
        """Split generated ids at the control tokens -> (clean text, trigger char positions)."""
        trigger, box = self.trigger_token_id, self.box_token_id
        dropped = {self.image_token_id, self.image_start_token_id, self.image_end_token_id, box}
        segments: list[list[int]] = [[]]
        for t in ids:
            if t == trigger:
                segments.append([])
            elif t in dropped:
                continue
            else:
                segments[-1].append(t)
        texts = [self.tokenizer.decode(seg, skip_special_tokens=skip_special_tokens) if seg else "" for seg in segments]
        clean = ""
        positions = []
        for k, piece in enumerate(texts):
            piece = piece.strip() if k > 0 else piece.rstrip()
            if k > 0:
                positions.append(len(clean.rstrip()))
                clean = clean.rstrip()
            if piece:
                if clean and piece[0] not in _NO_SPACE_BEFORE:
                    clean += " "
                clean += piece
        return clean, positions

    @staticmethod
    def _phrase_span(clean: str, pos: int, previous_end: int) -> tuple[int, int]:
        region_start = previous_end
        for i in range(pos - 1, previous_end - 1, -1):
            if clean[i] in _SPAN_BOUNDARY:
                region_start = i + 1
                break
        region = clean[region_start:pos]
        for match in re.finditer(r"[A-Za-z]+", region):
            if match.group(0).lower() in _DETERMINERS and (match.start() == 0 or not region[match.start() - 1].isalnum()):
                return region_start + match.start(), pos
        stripped = len(region) - len(region.lstrip())
        return region_start + stripped, pos

    def post_process_generation(
        self,
        generate_output,
        image_sizes=None,
        prompt_length: int | None = None,
        mask_threshold: float = 0.0,
        skip_special_tokens: bool = True,
    ) -> list[dict]:
        r"""
        Turn the output of ``model.generate(..., return_dict_in_generate=True)`` into, per returned sequence,
        ``{"text": clean_text, "entities": [...]}``.

        * ``text``: the answer (new tokens only) decoded without special tokens and without the ``<at> <boxes>``
          pairs (one space between words, none before punctuation).
        * ``entities``: one per trigger of the answer, in order (a prompt that ended with ``<at>`` contributes the
          first one, with an empty span). Each is a dict with

          - ``"text"``/``"span"``: the grounded phrase and its ``(start, end)`` in ``text``. Rule: the phrase ends
            where the trigger was; it starts at the first determiner or number word (a, an, the, this, two, ...)
            after the previous boundary (the previous trigger or one of ``.,;:!?()"`` and newline), or at that
            boundary when there is none. A trigger that directly follows another trigger shares its span
            (several boxes for one phrase).
          - ``"box"``: ``[x1, y1, x2, y2]`` in original-image pixels, clipped to the image (coordinates put in
            order when the raw prediction is inverted); ``None`` without image size. ``"box_normalized"``: the raw
            model output (square frame).
          - ``"mask"``: bool ``(height, width)`` at the original resolution (``logits > mask_threshold``) when
            the output has ``pred_masks``, else ``None``.
          - ``"score"``: the SAM IoU prediction when masks exist; otherwise the probability of the ``<at>`` token
            when the output has ``scores`` (sampling/greedy); otherwise ``None``.

        Args:
            generate_output: the `generate` output (``sequences``, ``prompt_length``, ``pred_boxes`` and optionally
                ``pred_masks``, ``iou_scores``, ``scores``), or a tensor of ids (no boxes: ``box`` is ``None``).
            image_sizes: ``(batch, 2)`` original (height, width), e.g. the processor's ``image_sizes``; with
                ``num_return_sequences`` / beams each size is repeated for the sequences of its sample.
            prompt_length: number of prompt tokens in ``sequences`` (read from the output when present; 0 means
                the sequences hold only new tokens).
        """
        if torch.is_tensor(generate_output) or isinstance(generate_output, (np.ndarray, list)):
            sequences = generate_output
            pred_boxes = pred_masks = iou_scores = scores = None
        else:
            sequences = _get(generate_output, "sequences")
            if sequences is None:
                raise ValueError("`generate_output` has no `sequences`; call generate(..., return_dict_in_generate=True)")
            pred_boxes = _get(generate_output, "pred_boxes")
            pred_masks = _get(generate_output, "pred_masks")
            iou_scores = _get(generate_output, "iou_scores")
            scores = _get(generate_output, "scores")
            if _get(generate_output, "beam_indices") is not None:
                scores = None
            if prompt_length is None:
                prompt_length = _get(generate_output, "prompt_length")
        seqs = _to_list_of_ids(sequences)
        prompt_length = int(prompt_length or 0)
        n_seq = len(seqs)
        sizes = None
        if image_sizes is not None:
            sizes = np.asarray(
                image_sizes.detach().cpu().numpy() if torch.is_tensor(image_sizes) else image_sizes, dtype=np.int64
            ).reshape(-1, 2)
            if len(sizes) == 0 or n_seq % len(sizes):
                raise ValueError(f"`image_sizes` has {len(sizes)} rows for {n_seq} sequences")
            sizes = np.repeat(sizes, n_seq // len(sizes), axis=0)
        for name, value in (("pred_boxes", pred_boxes), ("pred_masks", pred_masks), ("iou_scores", iou_scores)):
            if value is not None and len(value) != n_seq:
                raise ValueError(f"`generate_output.{name}` has {len(value)} entries for {n_seq} sequences")
        sam_size = self.image_processor.sam_image_size
        results = []
        for i, seq in enumerate(seqs):
            new = seq[prompt_length:]
            prompt_trigger = prompt_length > 0 and seq[prompt_length - 1] == self.trigger_token_id
            eos_id = self.tokenizer.eos_token_id
            if eos_id in new:  # what follows the first </s> is padding
                new = new[: new.index(eos_id) + 1]
            clean, positions = self._decode_segments(new, skip_special_tokens)
            n_triggers = len(positions) + (1 if prompt_trigger else 0)
            boxes_i = None
            if pred_boxes is not None:
                boxes_i = pred_boxes[i]
                boxes_i = boxes_i.detach().float().cpu().numpy() if torch.is_tensor(boxes_i) else np.asarray(boxes_i, dtype=np.float64)
                boxes_i = boxes_i.reshape(-1, 4)
                if len(boxes_i) != n_triggers:
                    raise ValueError(
                        f"`generate_output.pred_boxes[{i}]` has {len(boxes_i)} boxes but the answer has {n_triggers} "
                        "trigger(s); pass the generate output unchanged"
                    )
            masks_i = None
            if pred_masks is not None and pred_masks[i] is not None and n_triggers:
                if sizes is None:
                    raise ValueError("`image_sizes` is needed to bring the masks to the original resolution")
                if sam_size is None:
                    raise ValueError("the image processor has no `sam_image_size`; cannot place the masks")
                if tuple(sizes[i]) != (0, 0):
                    masks_i = masks_from_sam_frame(pred_masks[i], tuple(sizes[i]), sam_size, threshold=mask_threshold)
            ious_i = None
            if iou_scores is not None and iou_scores[i] is not None:
                v = iou_scores[i]
                ious_i = (v.detach().float().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)).reshape(-1)
            spans = []
            if prompt_trigger:
                spans.append((0, 0))
            previous_end, previous_pos = 0, None
            for pos in positions:
                if previous_pos is not None and pos == previous_pos and spans:
                    spans.append(spans[-1])
                    continue
                span = self._phrase_span(clean, pos, previous_end)
                spans.append(span)
                previous_end, previous_pos = pos, pos
            trigger_steps = [j for j, t in enumerate(new) if t == self.trigger_token_id]
            entities = []
            for k, span in enumerate(spans):
                entity = {"text": clean[span[0] : span[1]], "span": span, "box": None, "box_normalized": None}
                if boxes_i is not None:
                    raw = boxes_i[k]
                    entity["box_normalized"] = raw.tolist()
                    if sizes is not None and tuple(sizes[i]) != (0, 0):
                        ordered = np.array([min(raw[0], raw[2]), min(raw[1], raw[3]), max(raw[0], raw[2]), max(raw[1], raw[3])])
                        entity["box"] = boxes_from_square_frame(ordered, tuple(sizes[i]), clip=True)[0].tolist()
                entity["mask"] = masks_i[k] if masks_i is not None else None
                score = None
                if ious_i is not None:
                    score = float(ious_i[k])
                elif scores is not None:
                    step_index = k - (1 if prompt_trigger else 0)
                    if step_index >= 0 and step_index < len(trigger_steps) and trigger_steps[step_index] < len(scores):
                        logits = scores[trigger_steps[step_index]][i].float()
                        score = float(torch.softmax(logits, -1)[self.trigger_token_id])
                entity["score"] = score
                entities.append(entity)
            results.append({"text": clean, "entities": entities})
        return results

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs) -> list[str]:
        """Decode generated ids into clean texts (the ``<at> <boxes>`` pairs removed, see
        :meth:`post_process_generation` for boxes and masks)."""
        sequences = _get(generated_outputs, "sequences") if not torch.is_tensor(generated_outputs) else None
        if sequences is None:
            sequences = generated_outputs
        return [self._decode_segments(seq, skip_special_tokens)[0] for seq in _to_list_of_ids(sequences)]

    def draw(self, image, entities, **kwargs) -> PIL.Image.Image:
        """See :func:`draw_grounding`."""
        return draw_grounding(image, entities, **kwargs)


__all__ = [
    "DRAW_COLORS",
    "NextChatProcessor",
    "NextChatProcessorKwargs",
    "VICUNA_V1_1_CHAT_TEMPLATE",
    "VICUNA_V1_1_SYSTEM",
    "draw_grounding",
    "escape_text",
]
