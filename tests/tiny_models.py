"""Tiny NExT-Chat configurations and inputs shared by the tests (random weights, CPU-sized)."""

import torch

from nextchat import NextChatConfig, NextChatForConditionalGeneration
from nextchat.processing import VICUNA_V1_1_SYSTEM, NextChatImageProcessor, NextChatProcessor


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


def naive_box_embedding(model, box) -> torch.Tensor:
    """What a `<boxes>` slot is fed: `loc_encoder(box)`."""
    return model.model.loc_encoder(torch.as_tensor(box, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------------------------
# A tiny real processor (offline tokenizer + image processor) and the tiny model sized for it
# ----------------------------------------------------------------------------------------------------------------

# The sentences the tiny tokenizer is trained on (the tests compare encodings against it: changing them changes ids).
TINY_CORPUS = [
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


def tiny_tokenizer(vocab_size: int = 384):
    """A tiny LLaMA tokenizer trained offline on `TINY_CORPUS` (deterministic), with the five NExT-Chat tokens."""
    from nextchat.training.tokenizer import train_llama_tokenizer

    return train_llama_tokenizer(TINY_CORPUS * 4, vocab_size)


def tiny_processor(image_size: int = IMAGE_SIZE, sam_image_size: int | None = SAM_SIZE, patch_size: int = 14):
    """A complete tiny `NextChatProcessor`: `tiny_tokenizer` and an image processor with CLIP size `image_size` and
    SAM size `sam_image_size` (`None`: box-only); `image_seq_length = (image_size // patch_size) ** 2`."""
    image_processor = NextChatImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        sam_image_size=sam_image_size,
    )
    return NextChatProcessor(image_processor, tiny_tokenizer(), image_seq_length=(image_size // patch_size) ** 2)


def config_overrides_for(processor) -> dict:
    """The `tiny_config` / `tiny_model` overrides that fit it to a real processor: the tokenizer's vocabulary and
    bos / eos / pad ids, and the five NExT-Chat token ids."""
    tokenizer = processor.tokenizer
    text_config = tiny_config(sam=False).text_config
    text_config.vocab_size = len(tokenizer)
    text_config.bos_token_id = tokenizer.bos_token_id
    text_config.eos_token_id = tokenizer.eos_token_id
    text_config.pad_token_id = tokenizer.pad_token_id
    if processor.image_seq_length != NUM_IMAGE_TOKENS:
        raise ValueError(
            f"`processor` has image_seq_length={processor.image_seq_length}; the tiny model's vision tower gives "
            f"{NUM_IMAGE_TOKENS} (image size {IMAGE_SIZE}, patch 14)"
        )
    return dict(text_config=text_config, **processor.special_token_ids)


def tiny_model_and_processor(seed: int = 0, sam: bool = True):
    """`tiny_model` (random weights) with `tiny_processor` (SAM size `SAM_SIZE`, or box-only without SAM)."""
    processor = tiny_processor(sam_image_size=SAM_SIZE if sam else None)
    return tiny_model(sam=sam, seed=seed, **config_overrides_for(processor)), processor


def shapes_scene(seed: int = 1_000_000):
    """A scene of the synthetic shapes task (by default the first seed of its evaluation range, never used for
    training: the shipped folder's `example.png`) and the grounded-caption question."""
    from nextchat.training.synthetic import GC_TEMPLATES, render_scene

    image, _ = render_scene(seed)
    return image, GC_TEMPLATES[0]
