"""NExT-Chat processing: the processor over its text, geometry, image, post-processing and drawing modules."""

from .drawing_nextchat import DRAW_COLORS, draw_grounding
from .geometry_nextchat import (
    boxes_from_prediction,
    boxes_from_square_frame,
    boxes_to_sam_frame,
    boxes_to_square_frame,
    expand2square,
    masks_from_sam_frame,
    masks_to_sam_frame,
    order_corners,
    rle_decode,
    rle_encode,
    sam_padding,
    sam_resized_size,
    square_padding,
)
from .image_processing_nextchat import NextChatImageProcessor, NextChatImagesKwargs, to_rgb_image
from .processing_nextchat import NextChatProcessor, NextChatProcessorKwargs
from .text_nextchat import VICUNA_V1_1_CHAT_TEMPLATE, VICUNA_V1_1_SYSTEM, escape_text, vicuna_chat_template
from .tokenization_nextchat import NextChatLlamaTokenizer


__all__ = [
    "NextChatImageProcessor",
    "NextChatImagesKwargs",
    "NextChatLlamaTokenizer",
    "NextChatProcessor",
    "NextChatProcessorKwargs",
    "DRAW_COLORS",
    "VICUNA_V1_1_CHAT_TEMPLATE",
    "VICUNA_V1_1_SYSTEM",
    "boxes_from_prediction",
    "boxes_from_square_frame",
    "boxes_to_sam_frame",
    "boxes_to_square_frame",
    "draw_grounding",
    "escape_text",
    "expand2square",
    "masks_from_sam_frame",
    "masks_to_sam_frame",
    "order_corners",
    "rle_decode",
    "rle_encode",
    "sam_padding",
    "sam_resized_size",
    "square_padding",
    "to_rgb_image",
    "vicuna_chat_template",
]
