"""Processor of NExT-Chat: text with image placeholders and box references -> model inputs, and generated
sequences -> clean text with grounded entities (boxes in pixels, masks at the original resolution).

The work is done by modules with one concern each: ``text_nextchat`` (chat template, prompt syntax, tokenisation,
padding), ``geometry_nextchat`` (boxes and masks between the original, padded-square and SAM frames),
``image_processing_nextchat`` (pixels), ``postprocessing_nextchat`` (generations -> text and entities) and
``drawing_nextchat``."""

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
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

from ..configuration.configuration_nextchat import NEXTCHAT_SPECIAL_TOKENS
from .drawing_nextchat import DRAW_COLORS, draw_grounding
from .geometry_nextchat import (
    as_box_array,
    boxes_to_square_frame,
    check_masks,
    check_pixel_boxes,
    slot_boxes,
    slot_mask_targets,
)
from .image_processing_nextchat import NextChatImageProcessor, NextChatImagesKwargs, flatten_images
from .postprocessing_nextchat import decode_texts, post_process_generation
from .text_nextchat import (
    VICUNA_V1_1_CHAT_TEMPLATE,
    VICUNA_V1_1_SYSTEM,
    ChunkEncoder,
    check_lengths,
    encode_sample,
    escape_text,
    pad_units,
    parse_text,
    text_options,
    truncate_units,
    vicuna_chat_template,
)


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

    **Tokenisation** follows the original (transformers 4.31 slow ``LlamaTokenizer``) regardless of
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
        given_tokens = {
            "trigger_token": trigger_token,
            "box_token": box_token,
            "image_token": image_token,
            "image_start_token": image_start_token,
            "image_end_token": image_end_token,
        }
        vocab = tokenizer.get_vocab()
        ids = {}
        for name, given in given_tokens.items():
            value = given if given is not None else getattr(tokenizer, name, None)
            if not isinstance(value, str) or not value:
                value = NEXTCHAT_SPECIAL_TOKENS[f"{name}_id"]
            if value not in vocab:
                raise ValueError(
                    f"`{name}`={value!r} is not a token of the tokenizer; a NExT-Chat tokenizer has the added tokens "
                    + ", ".join(NEXTCHAT_SPECIAL_TOKENS.values())
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
        self._encoder = ChunkEncoder(tokenizer)

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
        """The ids under the names of the `NextChatConfig` fields (`NEXTCHAT_SPECIAL_TOKENS`)."""
        return {name: getattr(self, name) for name in NEXTCHAT_SPECIAL_TOKENS}

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

    # -- main call --------------------------------------------------------------------------------------------

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
        options = text_options(text_kwargs, merged)
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
        padding, truncation = options["padding"], options["truncation"]
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
        padding_side, truncation_side, max_length = check_lengths(options, self.tokenizer, truncation_side)

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
            box_px = as_box_array(boxes_per_sample[b], where)
            if len(box_px):
                if size is None:
                    raise ValueError(f"`boxes`{where} are given for a sample without an image")
                box_px = check_pixel_boxes(box_px, size, where, clip_boxes)
            norm = boxes_to_square_frame(box_px, size) if len(box_px) else np.zeros((0, 4))
            sample_masks = None
            if masks_per_sample[b] is not None:
                if size is None:
                    raise ValueError(f"`masks`{where} are given for a sample without an image")
                sample_masks = check_masks(masks_per_sample[b], len(box_px), size, b)
            units = encode_sample(self, texts[b], b, n_img, len(box_px), return_labels, append_flags[b], add_special_tokens)
            if truncation:
                units = truncate_units(units, max_length, truncation_side, b)
            all_units.append(units)
            all_norm_boxes.append(norm)
            all_masks.append(sample_masks)

        # assemble
        input_ids, attention, labels, offsets, slots = pad_units(
            all_units, padding, max_length, options["pad_to_multiple_of"], padding_side, self.tokenizer
        )
        box_inputs, box_mask = slot_boxes(slots, all_norm_boxes)

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
            data["mask_targets"] = slot_mask_targets(slots, all_masks, sam_size)
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
                    for item in parse_text(sample_text, self.image_placeholder, self.tokenizer.eos_token)
                    if item[0] == "image"
                ]
                for b, sample_text in enumerate(texts)
            ]
        return out

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
        return post_process_generation(
            self, generate_output, image_sizes, prompt_length, mask_threshold, skip_special_tokens
        )

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs) -> list[str]:
        """Decode generated ids into clean texts (the ``<at> <boxes>`` pairs removed, see
        :meth:`post_process_generation` for boxes and masks)."""
        return decode_texts(self, generated_outputs, skip_special_tokens)

    def draw(self, image, entities, **kwargs) -> PIL.Image.Image:
        """See :func:`draw_grounding`."""
        return draw_grounding(image, entities, **kwargs)


__all__ = [
    "DRAW_COLORS",
    "NextChatImageProcessor",
    "NextChatProcessor",
    "NextChatProcessorKwargs",
    "VICUNA_V1_1_CHAT_TEMPLATE",
    "VICUNA_V1_1_SYSTEM",
    "draw_grounding",
    "escape_text",
    "vicuna_chat_template",
]
