"""JSONL grounding conversations -> NExT-Chat training inputs.

:class:`NextChatJsonlDataset` reads the JSONL format documented in :mod:`nextchat.training.synthetic` (image path,
conversation turns in the processor's text syntax with ``[i]`` box references, pixel boxes, optional COCO-RLE masks
per box) and runs the processor on ONE sample in ``__getitem__`` (image loading, CLIP/SAM preprocessing, tokenising,
labels, mask targets), so this work happens in the DataLoader workers. :class:`NextChatDataCollator` only pads and
stacks, which gives exactly what the processor returns for the same samples called as a batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import PIL.Image
import torch

from ..processing.text_nextchat import REF_RE


MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "labels",
    "pixel_values",
    "box_inputs",
    "box_inputs_mask",
    "sam_pixel_values",
    "mask_targets",
)


class NextChatJsonlDataset(torch.utils.data.Dataset):
    """A map-style dataset over one or more JSONL files of grounding conversations.

    Args:
        paths: a JSONL path or a list of them. Image paths in a record are relative to the folder of its file
            (absolute paths are kept).
        processor (`NextChatProcessor`): turns each record into model inputs (``return_labels=True``).
        use_masks (`bool`): pass the records' masks to the processor (-> ``mask_targets``); needs a processor with
            SAM. Without masks (or ``use_masks=False``) no ``mask_targets`` are returned.
        return_sam_pixel_values (`bool`, *optional*): defaults to whether the processor has SAM. Set it to False
            for box-only stages (1-2) of a model with SAM: SAM then does not run during training.
        max_length (`int`, *optional*): truncate longer samples (the processor never cuts an image block or an
            ``<at> <boxes>`` pair).
        system_prompt (`str`, *optional*): a system message put before each conversation that has none (default:
            the chat template's vicuna system prompt).
    """

    def __init__(
        self,
        paths: str | Sequence[str],
        processor,
        use_masks: bool = True,
        return_sam_pixel_values: bool | None = None,
        max_length: int | None = None,
        system_prompt: str | None = None,
    ):
        self.processor = processor
        sam = processor.image_processor.sam_image_size is not None
        self.return_sam_pixel_values = sam if return_sam_pixel_values is None else bool(return_sam_pixel_values)
        if use_masks and not (sam and self.return_sam_pixel_values):
            use_masks = False
        self.use_masks = use_masks
        self.max_length = max_length
        self.system_prompt = system_prompt
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.lines: list[str] = []
        self.roots: list[int] = []
        self._root_dirs: list[str] = []
        for index, path in enumerate(paths):
            self._root_dirs.append(os.path.dirname(os.path.abspath(path)))
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        self.lines.append(line)
                        self.roots.append(index)

    def __len__(self) -> int:
        return len(self.lines)

    def record(self, index: int) -> dict:
        """The parsed JSONL record of sample `index`, with `image` resolved to a path."""
        record = json.loads(self.lines[index])
        image = record.get("image")
        if image is not None and not os.path.isabs(image):
            record["image"] = os.path.join(self._root_dirs[self.roots[index]], image)
        return record

    def text_lengths(self) -> list[int]:
        """An estimate of each sample's token count that loads no image and renders no template: its messages'
        contents tokenized in one batched call, each box reference counted as its `<at> <boxes>` pairs and each
        `<image>` as its image block. It differs from the length `__getitem__` returns by about the same number of
        tokens for every sample (the chat template's role tags), enough to group samples of like length
        (:func:`length_grouped_order`)."""
        records = [json.loads(line)["conversations"] for line in self.lines]
        placeholder = self.processor.image_placeholder
        contents, extra = [], []
        for messages in records:
            for message in messages:
                text = message["content"]
                references = sum(len(found.split(",")) for found in REF_RE.findall(text))
                images = text.count(placeholder)
                contents.append(REF_RE.sub(" ", text).replace(placeholder, " "))
                extra.append(2 * references + images * (self.processor.image_seq_length + 2))
        tokenizer = self.processor.tokenizer
        tokens = tokenizer(contents, add_special_tokens=False)["input_ids"] if contents else []
        # what the chat template adds per message (role tags, end of turn), measured once on a one-pair and a
        # two-pair conversation of one-word contents
        pair = [{"role": "user", "content": "yes"}, {"role": "assistant", "content": "yes"}]
        one, two = (len(tokenizer(self.processor.apply_chat_template(c), add_special_tokens=False)["input_ids"])
                    for c in (pair, pair + pair))
        per_message = (two - one) / 2 - len(tokenizer(["yes"], add_special_tokens=False)["input_ids"][0])
        lengths, position = [], 0
        for messages in records:
            end = position + len(messages)
            content = sum(len(tokens[i]) + extra[i] for i in range(position, end))
            lengths.append(round(content + per_message * len(messages)))
            position = end
        return lengths

    def __getitem__(self, index: int) -> dict:
        record = self.record(index)
        return encode_record(
            record, self.processor, use_masks=self.use_masks, return_sam_pixel_values=self.return_sam_pixel_values,
            max_length=self.max_length, system_prompt=self.system_prompt,
        )


def encode_record(record: dict, processor, use_masks=True, return_sam_pixel_values=None, max_length=None,
                  system_prompt=None) -> dict:
    """One record -> unbatched tensors: ``input_ids``, ``attention_mask``, ``labels`` (L,), ``box_inputs`` (N, 4),
    ``box_inputs_mask`` (N,), and with an image ``pixel_values`` (1, 3, H, W), ``image_sizes`` (2,), with SAM
    ``sam_pixel_values`` (3, S, S), with masks ``mask_targets`` (N, S, S)."""
    messages = list(record["conversations"])
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    text = processor.apply_chat_template(messages)
    image = None
    if record.get("image") is not None:
        with PIL.Image.open(record["image"]) as opened:
            image = opened.convert("RGB")
    boxes = record.get("boxes") or None
    masks = record.get("masks") if use_masks else None
    if masks is not None and all(m is None for m in masks):
        masks = None
    kwargs = {}
    if image is not None and return_sam_pixel_values is not None:
        kwargs["return_sam_pixel_values"] = return_sam_pixel_values
    if max_length is not None:
        kwargs.update(truncation=True, max_length=max_length)
    out = processor(images=image, text=text, boxes=boxes, masks=masks, return_labels=True, **kwargs)
    sample = {}
    for key, value in out.items():
        if key == "pixel_values":
            sample[key] = value  # (n_images, 3, H, W): keeps the image dimension (0 or 1 image)
        else:
            sample[key] = value[0]
    return sample


class CachedDataset(torch.utils.data.Dataset):
    """`dataset` with every sample kept in memory from its first read on: a later epoch returns the kept sample
    instead of preparing it again. For datasets whose samples are deterministic (as `NextChatJsonlDataset`'s and the
    synthetic scenes are), training reads the very same tensors, so the weights it gives are unchanged.

    The samples are kept by the process that reads them: the main process, or each DataLoader worker. A worker
    keeps them across epochs only if it lives across epochs (`TrainingArguments.dataloader_persistent_workers`).
    The memory it takes is that of the samples (a 64 x 64 image is 48 KiB of `pixel_values`); it suits small
    images and datasets that are read more than once.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self._kept: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self._kept.get(index)
        if sample is None:
            sample = self._kept[index] = self.dataset[index]
        return sample


def length_grouped_order(lengths: Sequence[int], group_size: int, window: int, seed: int = 0) -> list[int]:
    """A reading order of the samples that puts samples of like length in the same batch, yet keeps the file's
    order (a curriculum: warm-up sections first) at the scale of `window` groups.

    The samples are cut, in file order, into windows of `window * group_size`; inside each window they are sorted by
    `lengths` (ties in file order) and cut into groups of `group_size` consecutive samples (one step's samples over
    all processes: `per_device_train_batch_size * world_size`), and the groups of the window are shuffled with
    `seed`. Read sequentially, each batch then pads to the length of samples like its own instead of its longest
    sample's. Returns a permutation of `range(len(lengths))`."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"`group_size` must be a positive integer, got {group_size!r}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"`window` must be a positive integer (groups per window), got {window!r}")
    rng = torch.Generator().manual_seed(seed)
    order: list[int] = []
    span = window * group_size
    for start in range(0, len(lengths), span):
        indices = sorted(range(start, min(start + span, len(lengths))), key=lambda i: (lengths[i], i))
        groups = [indices[i : i + group_size] for i in range(0, len(indices), group_size)]
        full = len(indices) // group_size  # a last, partial group stays last: every batch after it stays aligned
        for g in torch.randperm(full, generator=rng).tolist() + list(range(full, len(groups))):
            order.extend(groups[g])
    return order


class NextChatDataCollator:
    """Pads and stacks the samples of :class:`NextChatJsonlDataset` (no image work).

    * ``input_ids`` padded with ``pad_token_id``, ``attention_mask`` with 0, ``labels`` with -100, on
      ``padding_side`` (right for training, as the original).
    * ``box_inputs`` (B, N_max, 4) zero-padded with ``box_inputs_mask`` False on the padding slots;
      ``mask_targets`` (B, N_max, S, S) filled with -100 where a slot has no mask (or a sample has none).
    * ``pixel_values`` concatenated over the samples that have an image (row-major, as the model expects);
      ``sam_pixel_values`` (B, 3, S, S) with zeros for a sample without image.
    * ``image_sizes`` is kept only with ``keep_image_sizes=True`` (it is not a `forward` argument).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None,
                 keep_image_sizes: bool = False):
        if padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.keep_image_sizes = keep_image_sizes

    @classmethod
    def from_processor(cls, processor, **kwargs) -> "NextChatDataCollator":
        tokenizer = processor.tokenizer
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
        return cls(pad, **kwargs)

    def _pad_1d(self, values: list[torch.Tensor], fill, length: int) -> torch.Tensor:
        out = torch.full((len(values), length), fill, dtype=values[0].dtype)
        for b, v in enumerate(values):
            n = v.shape[0]
            if self.padding_side == "right":
                out[b, :n] = v
            else:
                out[b, length - n :] = v
        return out

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("empty batch")
        batch = {}
        length = max(s["input_ids"].shape[0] for s in samples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch["input_ids"] = self._pad_1d([s["input_ids"] for s in samples], self.pad_token_id, length)
        batch["attention_mask"] = self._pad_1d([s["attention_mask"] for s in samples], 0, length)
        if any("labels" in s for s in samples):
            labels = [s.get("labels", torch.full_like(s["input_ids"], -100)) for s in samples]
            batch["labels"] = self._pad_1d(labels, -100, length)

        slots = max(s["box_inputs"].shape[0] if "box_inputs" in s else 0 for s in samples)
        box_inputs = torch.zeros(len(samples), slots, 4, dtype=torch.float32)
        box_mask = torch.zeros(len(samples), slots, dtype=torch.bool)
        for b, s in enumerate(samples):
            if "box_inputs" in s:
                n = s["box_inputs"].shape[0]
                box_inputs[b, :n] = s["box_inputs"]
                box_mask[b, :n] = s["box_inputs_mask"]
        batch["box_inputs"] = box_inputs
        batch["box_inputs_mask"] = box_mask

        images = [s["pixel_values"] for s in samples if "pixel_values" in s and s["pixel_values"].shape[0]]
        if images:
            batch["pixel_values"] = torch.cat(images)
        sam = [s.get("sam_pixel_values") for s in samples]
        template = next((v for v in sam if v is not None), None)
        if template is not None:
            batch["sam_pixel_values"] = torch.stack([v if v is not None else torch.zeros_like(template) for v in sam])
        masks = [s.get("mask_targets") for s in samples]
        mask_template = next((m for m in masks if m is not None), None)
        if mask_template is not None:
            size = mask_template.shape[-2:]
            targets = torch.full((len(samples), slots) + tuple(size), -100.0, dtype=mask_template.dtype)
            for b, m in enumerate(masks):
                if m is not None:
                    targets[b, : m.shape[0]] = m
            batch["mask_targets"] = targets
        if self.keep_image_sizes and any("image_sizes" in s for s in samples):
            batch["image_sizes"] = torch.stack(
                [s.get("image_sizes", torch.zeros(2, dtype=torch.long)) for s in samples]
            )
        return batch


__all__ = [
    "MODEL_INPUT_KEYS",
    "CachedDataset",
    "NextChatDataCollator",
    "NextChatJsonlDataset",
    "encode_record",
    "length_grouped_order",
]
