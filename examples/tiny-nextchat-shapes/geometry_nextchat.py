"""Geometry of NExT-Chat between its three frames, one implementation of each conversion (used by the image
processor, the processor, the post-processing, the evaluation and the demo), the checks of pixel boxes and masks
given to the processor, and COCO RLE masks.

Coordinate frames (all boxes are xyxy):

* **original pixels**: the image as the user gave it, size ``(h, w)``.
* **square frame** (what the model reads and writes): the image padded to a centred square of side
  ``L = max(h, w)`` (``expand2square``; the pad before the image is ``(L - short) // 2``), divided by ``L``.
  ``x_norm = (x + pad_left) / L``, ``y_norm = (y + pad_top) / L``.
* **SAM frame**: the image resized so that its longest side is ``S`` (``(int(h*S/L + 0.5), int(w*S/L + 0.5))``),
  then padded to ``S x S`` with the pad before the image being ``(S - new) // 2``. A square-frame box times ``S``
  lands on the same SAM pixels up to the rounding of these sizes (at most one SAM pixel plus one scale step).
"""

import numpy as np
import PIL.Image
import torch


def _check_image_size(image_size, argument_name="image_sizes"):
    try:
        height, width = (int(v) for v in image_size)
    except Exception as err:
        raise ValueError(f"`{argument_name}` must hold (height, width) pairs, got {image_size!r}") from err
    if height <= 0 or width <= 0:
        raise ValueError(f"`{argument_name}` must hold positive (height, width), got {(height, width)}")
    return height, width


def square_padding(image_size) -> tuple[int, int, int]:
    """``(side, pad_top, pad_left)`` of expand2square for an image of ``(height, width)``: centred, the pad
    before the image is ``(long - short) // 2`` as in the original ``Expand2square``."""
    height, width = _check_image_size(image_size, "image_size")
    side = max(height, width)
    return side, (side - height) // 2, (side - width) // 2


def expand2square(image: PIL.Image.Image, background_color=(255, 255, 255)) -> PIL.Image.Image:
    """Pad an RGB PIL image to a centred square (the original ``Expand2square``, white by default), as
    :func:`square_padding` places it."""
    side, pad_top, pad_left = square_padding((image.height, image.width))
    if (image.height, image.width) == (side, side):
        return image
    result = PIL.Image.new(image.mode, (side, side), tuple(background_color))
    result.paste(image, (pad_left, pad_top))
    return result


def boxes_to_square_frame(boxes, image_size) -> np.ndarray:
    """Pixel xyxy boxes on the original image -> normalised xyxy in the padded-square frame (float64, (n, 4))."""
    side, pad_top, pad_left = square_padding(image_size)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    offset = np.array([pad_left, pad_top, pad_left, pad_top], dtype=np.float64)
    return (boxes + offset) / side


def boxes_from_square_frame(boxes, image_size, clip: bool = True) -> np.ndarray:
    """Normalised square-frame xyxy boxes -> pixel xyxy on the original image (float64, (n, 4)).

    The inverse of :func:`boxes_to_square_frame` (the original's ``de_transform_box``). With ``clip`` the result
    is clipped to ``[0, w] x [0, h]``."""
    height, width = _check_image_size(image_size, "image_size")
    side, pad_top, pad_left = square_padding((height, width))
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    offset = np.array([pad_left, pad_top, pad_left, pad_top], dtype=np.float64)
    out = boxes * side - offset
    if clip:
        out[:, 0::2] = np.clip(out[:, 0::2], 0, width)
        out[:, 1::2] = np.clip(out[:, 1::2], 0, height)
    return out


def order_corners(boxes) -> np.ndarray:
    """xyxy boxes with their corners put in order (``x1 <= x2``, ``y1 <= y2``; a raw prediction may be inverted)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], axis=1)


def boxes_from_prediction(boxes, image_size) -> np.ndarray:
    """Raw predicted boxes (``loc_decoder`` output, normalised square frame, possibly inverted) -> pixel xyxy on
    the original image, corners in order and clipped to the image (what ``post_process_generation`` reports)."""
    return boxes_from_square_frame(order_corners(boxes), image_size, clip=True)


def sam_resized_size(image_size, sam_image_size: int) -> tuple[int, int]:
    """Size ``(h', w')`` of the image after SAM's ``ResizeLongestSide`` (``int(x * S / long + 0.5)``, at least 1)."""
    height, width = _check_image_size(image_size, "image_size")
    scale = sam_image_size * 1.0 / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def sam_padding(image_size, sam_image_size: int) -> tuple[int, int, int, int]:
    """``(pad_top, pad_left, h', w')``: where the resized image sits inside the centred ``S x S`` SAM input."""
    new_h, new_w = sam_resized_size(image_size, sam_image_size)
    return (sam_image_size - new_h) // 2, (sam_image_size - new_w) // 2, new_h, new_w


def boxes_to_sam_frame(boxes, image_size, sam_image_size: int) -> np.ndarray:
    """Pixel xyxy boxes on the original image -> pixel xyxy in the padded SAM input (exact SAM arithmetic)."""
    height, width = _check_image_size(image_size, "image_size")
    pad_top, pad_left, new_h, new_w = sam_padding((height, width), sam_image_size)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([new_w / width, new_h / height, new_w / width, new_h / height])
    return boxes * scale + np.array([pad_left, pad_top, pad_left, pad_top], dtype=np.float64)


def masks_to_sam_frame(masks, sam_image_size: int) -> np.ndarray:
    """Binary masks at original resolution ``(n, h, w)`` (or ``(h, w)``) -> float32 ``(n, S, S)`` in {0, 1}.

    As the original ``ResizeAndPad``: each 0/1 uint8 mask is resized with PIL bilinear to the SAM size, then
    padded with zeros, centred, like ``sam_pixel_values``."""
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[1] == 0 or masks.shape[2] == 0:
        raise ValueError(f"`masks` must be (n, height, width) arrays, got shape {masks.shape}")
    n, height, width = masks.shape
    pad_top, pad_left, new_h, new_w = sam_padding((height, width), sam_image_size)
    out = np.zeros((n, sam_image_size, sam_image_size), dtype=np.float32)
    for i in range(n):
        binary = (masks[i] > 0).astype(np.uint8)
        resized = np.asarray(PIL.Image.fromarray(binary).resize((new_w, new_h), PIL.Image.BILINEAR))
        out[i, pad_top : pad_top + new_h, pad_left : pad_left + new_w] = resized
    return out


def masks_from_sam_frame(mask_logits, image_size, sam_image_size: int, threshold: float | None = 0.0):
    """Mask logits covering the whole padded SAM input (``(n, h, w)``, any resolution, e.g. SAM's 256 x 256
    low-resolution output) -> masks at the original resolution ``(n, H, W)``.

    The exact inverse of the SAM input transform (SAM's own ``postprocess_masks`` with centred padding):
    bilinear upsampling to ``S x S``, crop of the padding, bilinear resize to the original size. Returns a bool
    array (``logits > threshold``) or, with ``threshold=None``, the float32 logits."""
    height, width = _check_image_size(image_size, "image_size")
    logits = torch.as_tensor(np.asarray(mask_logits) if not torch.is_tensor(mask_logits) else mask_logits)
    logits = logits.detach().to("cpu", torch.float32)
    if logits.ndim == 2:
        logits = logits[None]
    if logits.ndim != 3:
        raise ValueError(f"mask logits must be (n, h, w), got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        out = np.zeros((0, height, width), dtype=bool if threshold is not None else np.float32)
        return out
    pad_top, pad_left, new_h, new_w = sam_padding((height, width), sam_image_size)
    x = logits[:, None]
    if tuple(x.shape[-2:]) != (sam_image_size, sam_image_size):
        x = torch.nn.functional.interpolate(x, (sam_image_size, sam_image_size), mode="bilinear", align_corners=False)
    x = x[..., pad_top : pad_top + new_h, pad_left : pad_left + new_w]
    x = torch.nn.functional.interpolate(x, (height, width), mode="bilinear", align_corners=False)[:, 0]
    if threshold is None:
        return x.numpy()
    return (x > threshold).numpy()


def rle_decode(rle: dict) -> np.ndarray:
    """Decode a COCO run-length encoding (``{"size": [h, w], "counts": str | bytes | list[int]}``, column-major,
    compressed or not) into a ``(h, w)`` uint8 mask. Pure numpy, no pycocotools."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"a COCO RLE mask must be a dict with 'size' and 'counts', got {type(rle).__name__}")
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        data = counts.encode("ascii") if isinstance(counts, str) else counts
        runs: list[int] = []
        p = 0
        while p < len(data):
            x = 0
            k = 0
            more = True
            while more:
                if p >= len(data):
                    raise ValueError("truncated COCO RLE string in `masks`")
                c = data[p] - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p += 1
                k += 1
                if not more and (c & 0x10):
                    x |= -1 << (5 * k)
            if len(runs) > 2:
                x += runs[-2]
            runs.append(x)
    else:
        runs = [int(v) for v in counts]
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise ValueError(
            f"COCO RLE in `masks` is inconsistent: runs sum to {sum(runs)} for size {height}x{width}"
        )
    values = np.zeros(len(runs), dtype=np.uint8)
    values[1::2] = 1
    flat = np.repeat(values, runs)
    return flat.reshape(width, height).T.copy()


def rle_encode(mask) -> dict:
    """Encode a binary ``(h, w)`` mask as compressed COCO RLE (the inverse of :func:`rle_decode`)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D mask, got shape {mask.shape}")
    height, width = mask.shape
    flat = mask.T.reshape(-1) > 0
    if flat.size == 0:
        runs = []
    else:
        bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
        runs = np.diff(bounds).tolist()
        if flat[0]:
            runs = [0] + runs
    out = bytearray()
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(c + 48)
    return {"size": [height, width], "counts": out.decode("ascii")}


# --------------------------------------------------------------------------------------------------------------
# Checks of the boxes and masks given to the processor
# --------------------------------------------------------------------------------------------------------------


def as_box_array(value, where: str) -> np.ndarray:
    """The ``boxes`` of one sample -> float64 ``(n, 4)`` (``where`` names the sample in errors)."""
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


def check_pixel_boxes(box_px: np.ndarray, size, where: str, clip_boxes: bool) -> np.ndarray:
    """Pixel boxes on an image of ``size`` (height, width): finite, in order and inside the image (clipped to it
    with ``clip_boxes``, else ``ValueError``)."""
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


def check_masks(masks_of_sample, n_boxes: int, image_size, sample: int) -> list:
    """The ``masks`` of one sample (one binary mask, COCO RLE or ``None`` per box) -> list of bool arrays / None."""
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


def slot_boxes(slots, boxes_per_sample) -> tuple[np.ndarray, np.ndarray]:
    """``box_inputs`` (B, N, 4) float32 and ``box_inputs_mask`` (B, N): slot k of row b holds
    ``boxes_per_sample[b][slots[b][k]]`` (the box that the k-th ``<at> <boxes>`` pair of the row refers to)."""
    n_slots = max((len(s) for s in slots), default=0)
    box_inputs = np.zeros((len(slots), n_slots, 4), dtype=np.float32)
    box_mask = np.zeros((len(slots), n_slots), dtype=bool)
    for b, sample_slots in enumerate(slots):
        for k, idx in enumerate(sample_slots):
            box_inputs[b, k] = boxes_per_sample[b][idx]
            box_mask[b, k] = True
    return box_inputs, box_mask


def slot_mask_targets(slots, masks_per_sample, sam_image_size: int) -> np.ndarray:
    """``mask_targets`` (B, N, S, S) aligned with :func:`slot_boxes`: the referred box's mask in the SAM frame, -100
    where the sample or the box has no mask."""
    n_slots = max((len(s) for s in slots), default=0)
    s = sam_image_size
    targets = np.full((len(slots), n_slots, s, s), -100, dtype=np.float32)
    for b, sample_slots in enumerate(slots):
        if masks_per_sample[b] is None:
            continue
        for k, idx in enumerate(sample_slots):
            if masks_per_sample[b][idx] is not None:
                targets[b, k] = masks_to_sam_frame(masks_per_sample[b][idx], s)[0]
    return targets


__all__ = [
    "as_box_array",
    "boxes_from_prediction",
    "boxes_from_square_frame",
    "boxes_to_sam_frame",
    "boxes_to_square_frame",
    "check_masks",
    "check_pixel_boxes",
    "expand2square",
    "masks_from_sam_frame",
    "masks_to_sam_frame",
    "order_corners",
    "rle_decode",
    "rle_encode",
    "sam_padding",
    "sam_resized_size",
    "slot_boxes",
    "slot_mask_targets",
    "square_padding",
]
