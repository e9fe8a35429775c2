"""`nextchat-quickstart`: one grounded forward pass of a tiny NExT-Chat on a generated image, offline.

The model has RANDOM weights (no weights can be downloaded here): the printed boxes show the whole path —
image preprocessing, the `<at> <boxes>` trigger pair, box decoding, SAM masks, mapping back to pixels — not a
trained answer.
"""

import argparse
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from .configuration import NextChatConfig
from .modeling_nextchat import NextChatForConditionalGeneration


CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
SAM_MEAN = np.array([123.675, 116.28, 103.53])
SAM_STD = np.array([58.395, 57.12, 57.375])


def tiny_random_model(seed: int = 0) -> NextChatForConditionalGeneration:
    """A NExT-Chat of about half a million parameters: LLaMA 2×32, CLIP 2×24 at 28 px, SAM at 64 px."""
    config = NextChatConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14),
        sam_config=dict(image_size=64, patch_size=16, encoder_embed_dim=16, encoder_depth=2, encoder_num_heads=2,
                        encoder_global_attn_indexes=[1], window_size=2, prompt_embed_dim=32),
        image_token_id=59, image_start_token_id=60, image_end_token_id=61, trigger_token_id=62, box_token_id=63,
    )
    torch.manual_seed(seed)
    return NextChatForConditionalGeneration(config).eval()


def generated_image(width: int = 96, height: int = 64) -> Image.Image:
    """A landscape picture with a red square and a blue circle."""
    image = Image.new("RGB", (width, height), (235, 230, 210))
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 14, 38, 42], fill=(200, 30, 30))
    draw.ellipse([52, 20, 84, 52], fill=(30, 60, 200))
    return image


def _clip_input(image: Image.Image, size: int) -> torch.Tensor:
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    array = np.asarray(square.resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0
    return torch.tensor(((array - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1), dtype=torch.float32)[None]


def _sam_input(image: Image.Image, size: int) -> torch.Tensor:
    scale = size / max(image.size)
    width, height = int(image.width * scale + 0.5), int(image.height * scale + 0.5)
    array = (np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float64) - SAM_MEAN) / SAM_STD
    padded = np.zeros((size, size, 3))
    top, left = (size - height) // 2, (size - width) // 2
    padded[top : top + height, left : left + width] = array
    return torch.tensor(padded.transpose(2, 0, 1), dtype=torch.float32)[None]


def square_box_to_pixels(box, width: int, height: int):
    """Normalised xyxy in the padded square -> pixel xyxy on the original image, clipped."""
    side = max(width, height)
    dx, dy = (side - width) // 2, (side - height) // 2
    x1, y1, x2, y2 = (float(v) * side for v in box)
    x1, x2 = sorted((x1 - dx, x2 - dx))
    y1, y2 = sorted((y1 - dy, y2 - dy))
    return [min(max(x1, 0), width), min(max(y1, 0), height), min(max(x2, 0), width), min(max(y2, 0), height)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="nextchat_quickstart.png", help="where to write the annotated image")
    args = parser.parse_args(argv)

    model = tiny_random_model()
    image = generated_image()
    config = model.config
    user_box = [10, 14, 38, 42]  # the red square, pixel xyxy
    side = max(image.size)
    dy = (side - image.height) // 2
    box_inputs = torch.tensor([[[user_box[0] / side, (user_box[1] + dy) / side,
                                 user_box[2] / side, (user_box[3] + dy) / side]]])
    # "<s> USER: <image> what is [0] <at> <boxes> ? ASSISTANT: it is here <at>" with a toy vocabulary
    image_block = [config.image_start_token_id] + [config.image_token_id] * config.image_seq_length
    image_block += [config.image_end_token_id]
    input_ids = torch.tensor([[1, 10, 11] + image_block + [12, 13, config.trigger_token_id, config.box_token_id,
                                                            14, 15, 16, 17, config.trigger_token_id]])
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            pixel_values=_clip_input(image, config.vision_config.image_size),
            box_inputs=box_inputs,
            sam_pixel_values=_sam_input(image, config.sam_config["image_size"]),
        )
    print("NExT-Chat quickstart — tiny model with RANDOM weights: the boxes below exercise the pipeline, "
          "they are not a trained answer.")
    print(f"image {image.width}x{image.height}, {len(out.trigger_positions)} triggers at columns "
          f"{out.trigger_positions[:, 1].tolist()}")
    annotated = image.copy()
    draw = ImageDraw.Draw(annotated)
    for k, box in enumerate(out.pred_boxes):
        pixels = square_box_to_pixels(box, image.width, image.height)
        print(f"trigger {k}: normalised box {[round(float(v), 4) for v in box]} -> pixels "
              f"{[round(v, 1) for v in pixels]}, SAM IoU score {float(out.iou_scores[k]):.3f}")
        draw.rectangle(pixels, outline=(255, 200, 0), width=2)
    annotated.save(args.output)
    print(f"annotated image written to {os.path.abspath(args.output)}")


if __name__ == "__main__":
    main()
