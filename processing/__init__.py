"""NExT-Chat processing: the image processor, the processor and the geometry they share."""

from .image_processing_nextchat import (
    NextChatImageProcessor,
    NextChatImagesKwargs,
    boxes_from_square_frame,
    boxes_to_sam_frame,
    boxes_to_square_frame,
    expand2square,
    masks_from_sam_frame,
    masks_to_sam_frame,
    rle_decode,
    rle_encode,
    sam_padding,
    sam_resized_size,
    square_padding,
    to_rgb_image,
)
from .processing_nextchat import (
    VICUNA_V1_1_CHAT_TEMPLATE,
    NextChatProcessor,
    NextChatProcessorKwargs,
    draw_grounding,
    escape_text,
)
from .tiny import build_tiny_processor, build_tiny_tokenizer
from .tokenization_nextchat import NextChatLlamaTokenizer


__all__ = [
    "NextChatImageProcessor",
    "NextChatImagesKwargs",
    "NextChatLlamaTokenizer",
    "NextChatProcessor",
    "NextChatProcessorKwargs",
    "VICUNA_V1_1_CHAT_TEMPLATE",
    "boxes_from_square_frame",
    "boxes_to_sam_frame",
    "boxes_to_square_frame",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "draw_grounding",
    "escape_text",
    "expand2square",
    "masks_from_sam_frame",
    "masks_to_sam_frame",
    "rle_decode",
    "rle_encode",
    "sam_padding",
    "sam_resized_size",
    "square_padding",
    "to_rgb_image",
]
