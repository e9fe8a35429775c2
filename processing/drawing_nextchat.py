"""Drawing of NExT-Chat's grounded entities (boxes, masks, labels) on the image, in the original demo's colours."""

from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageColor
import PIL.ImageDraw
import PIL.ImageFont

from .image_processing_nextchat import to_rgb_image


# Colours of the original demo's drawings.
DRAW_COLORS = ("#F76566", "#18ACBA", "#9400D3", "#454926", "#4E72B8")


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


__all__ = ["DRAW_COLORS", "draw_grounding"]
