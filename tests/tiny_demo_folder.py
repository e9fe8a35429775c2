"""A tiny NExT-Chat folder built offline in seconds, for the demo's tests (a test helper, kept out of the
installed package).

The model is a few-hundred-thousand-parameter NExT-Chat (with a 64-pixel SAM) paired with the tiny processor of
``tiny_models.tiny_processor``, over-fitted for a few dozen steps on ONE conversation about a generated picture
(``Where is the square?`` -> ``The red square [0] is here.``), so that it answers with a grounded phrase, a box
and a mask. It knows nothing else; it is a test fixture, not a model.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageDraw


SQUARE_BOX = (10, 14, 38, 42)
QUESTION = "Where is the square?"
ANSWER = "The red square [0] is here."


def shapes_image(width: int = 96, height: int = 64) -> PIL.Image.Image:
    """A landscape picture with a red square at :data:`SQUARE_BOX` and a blue circle."""
    image = PIL.Image.new("RGB", (width, height), (235, 230, 210))
    draw = PIL.ImageDraw.Draw(image)
    draw.rectangle(SQUARE_BOX, fill=(200, 30, 30))
    draw.ellipse([52, 20, 84, 52], fill=(30, 60, 200))
    return image


def build_tiny_demo_folder(save_dir, train_steps: int = 80, seed: int = 0, learning_rate: float = 3e-3) -> str:
    """Write a tiny trained-on-one-example NExT-Chat (model + processor) to ``save_dir``; returns it as a str."""
    import torch

    from nextchat import NextChatConfig, NextChatForConditionalGeneration
    from tiny_models import tiny_processor

    processor = tiny_processor()
    tokenizer = processor.tokenizer
    config = NextChatConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14),
        sam_config=dict(image_size=64, patch_size=16, encoder_embed_dim=16, encoder_depth=2, encoder_num_heads=2,
                        encoder_global_attn_indexes=[1], window_size=2, prompt_embed_dim=32),
        **processor.special_token_ids,
    )
    if config.image_seq_length != processor.image_seq_length:
        raise RuntimeError("tiny processor and tiny model disagree on the number of image tokens")
    torch.manual_seed(seed)
    model = NextChatForConditionalGeneration(config)
    image = shapes_image()
    mask = np.zeros((image.height, image.width), dtype=bool)
    x1, y1, x2, y2 = SQUARE_BOX
    mask[y1 : y2 + 1, x1 : x2 + 1] = True
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": ANSWER},
    ]
    text = processor.apply_chat_template(conversation)
    batch = processor(images=image, text=text, boxes=[list(SQUARE_BOX)], masks=[mask], return_labels=True)
    batch.pop("image_sizes")
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster, and much faster on a busy machine
    try:
        for _ in range(train_steps):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config.max_new_tokens = 32
    model.save_pretrained(str(save_dir))
    processor.save_pretrained(str(save_dir))
    return str(save_dir)


__all__ = ["ANSWER", "QUESTION", "SQUARE_BOX", "build_tiny_demo_folder", "shapes_image"]
