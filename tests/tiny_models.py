"""Tiny NExT-Chat configurations and inputs shared by the tests (random weights, CPU-sized)."""

import torch

from nextchat import NextChatConfig, NextChatForConditionalGeneration


VOCAB = 64
IMAGE_PATCH, IMAGE_START, IMAGE_END, TRIGGER, BOXES = 59, 60, 61, 62, 63
IMAGE_SIZE = 28  # CLIP input; patch 14 -> 4 image tokens
SAM_SIZE = 64
NUM_IMAGE_TOKENS = 4


def tiny_config(sam: bool = True, **overrides) -> NextChatConfig:
    kwargs = dict(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=14,
        ),
        sam_config=dict(
            image_size=SAM_SIZE, patch_size=16, encoder_embed_dim=16, encoder_depth=2, encoder_num_heads=2,
            encoder_global_attn_indexes=[1], window_size=2, prompt_embed_dim=32,
        ) if sam else None,
        image_token_id=IMAGE_PATCH, image_start_token_id=IMAGE_START, image_end_token_id=IMAGE_END,
        trigger_token_id=TRIGGER, box_token_id=BOXES,
    )
    kwargs.update(overrides)
    return NextChatConfig(**kwargs)


def tiny_model(sam: bool = True, seed: int = 0, **overrides) -> NextChatForConditionalGeneration:
    torch.manual_seed(seed)
    model = NextChatForConditionalGeneration(tiny_config(sam=sam, **overrides)).eval()
    # Random-init biases are zero and some SAM tables start at zero: perturb everything so that mix-ups show.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def image_block() -> list[int]:
    return [IMAGE_START] + [IMAGE_PATCH] * NUM_IMAGE_TOKENS + [IMAGE_END]


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def sam_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SAM_SIZE, SAM_SIZE, generator=torch.Generator().manual_seed(seed + 100))


def pad_rows(rows: list[list[int]], side: str = "right", pad_id: int = 0):
    """Pads token lists to one length; returns `input_ids` and `attention_mask`."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if side == "right":
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        else:
            ids[i, length - len(row) :] = torch.tensor(row)
            mask[i, length - len(row) :] = 1
    return ids, mask


def pad_boxes(boxes_per_row: list[list[list[float]]]):
    """Pads per-row box lists to `box_inputs (B, N, 4)` and `box_inputs_mask (B, N)`."""
    n = max(1, max(len(b) for b in boxes_per_row))
    box_inputs = torch.zeros(len(boxes_per_row), n, 4)
    mask = torch.zeros(len(boxes_per_row), n, dtype=torch.bool)
    for i, boxes in enumerate(boxes_per_row):
        if boxes:
            box_inputs[i, : len(boxes)] = torch.tensor(boxes)
            mask[i, : len(boxes)] = True
    return box_inputs, mask


def naive_region_feature(image_features: torch.Tensor, box, grid: int = 7) -> torch.Tensor:
    """Loop reference of `box_region_features`: the mean over the centres of a grid x grid partition of the box
    (clamped into [0, 1]) of the bilinear interpolation of `image_features` `(N, hidden)`, a row-major side x side
    grid whose feature (i, j) sits at the centre of patch (i, j), clamped to the outer centres at the border."""
    side = int(round(len(image_features) ** 0.5))
    x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in box)
    x0, x1 = min(x0, x1), max(x0, x1)
    y0, y1 = min(y0, y1), max(y0, y1)
    total = torch.zeros(image_features.shape[1])
    for a in range(grid):
        for c in range(grid):
            x = x0 + (c + 0.5) / grid * (x1 - x0)
            y = y0 + (a + 0.5) / grid * (y1 - y0)
            u = min(max(x * side - 0.5, 0.0), side - 1.0)  # column coordinate in patch-centre units
            v = min(max(y * side - 0.5, 0.0), side - 1.0)
            j0, i0 = int(u), int(v)
            j1, i1 = min(j0 + 1, side - 1), min(i0 + 1, side - 1)
            fu, fv = u - j0, v - i0
            at = lambda i, j: image_features[i * side + j]  # noqa: E731
            total += ((1 - fv) * ((1 - fu) * at(i0, j0) + fu * at(i0, j1))
                      + fv * ((1 - fu) * at(i1, j0) + fu * at(i1, j1)))
    return total / grid**2


def naive_box_embedding(model, box, image_features=None) -> torch.Tensor:
    """What a `<boxes>` slot is fed: `loc_encoder(box)`, plus with `box_region_features` the region feature of
    `image_features` `(N, hidden)` (the box's image; `None`: no image, no region feature)."""
    box = torch.as_tensor(box, dtype=torch.float32)
    embedding = model.model.loc_encoder(box)
    if model.config.box_region_features and image_features is not None:
        embedding = embedding + naive_region_feature(image_features, box)
    return embedding
