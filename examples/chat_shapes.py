"""Ask the trained tiny NExT-Chat (examples/tiny-nextchat-shapes) about a generated scene, offline, in seconds.

    python examples/chat_shapes.py [--seed 1000123] [--question "Where is the red circle?"] [--output answer.png]

Draws the grounded boxes and SAM masks of every answer on the image. The scene comes from the synthetic generator
with a seed of the evaluation range (never used for training).
"""

import argparse
import os

import torch
from PIL import Image

from nextchat import NextChatForConditionalGeneration
from nextchat.processing import NextChatProcessor
from nextchat.training.synthetic import phrase, render_scene


HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(HERE, "tiny-nextchat-shapes"))
    parser.add_argument("--seed", type=int, default=1_000_123)
    parser.add_argument("--question", action="append", help="default: a REC, a region caption and a grounded caption")
    parser.add_argument("--output", default="nextchat_shapes.png")
    args = parser.parse_args(argv)

    model = NextChatForConditionalGeneration.from_pretrained(args.model).eval()
    processor = NextChatProcessor.from_pretrained(args.model)
    image, objects = render_scene(args.seed)
    print("scene:", ", ".join(f"{phrase(o)} at {o['box']}" for o in objects))
    questions = args.question or [
        f"Where is the {phrase(objects[0])}?",
        "What is in [0]?",
        "Describe the image with object locations.",
    ]
    panels = []
    for question in questions:
        boxes = [objects[-1]["box"]] if "[0]" in question else None
        prompt = processor.apply_chat_template([{"role": "user", "content": "<image> " + question}],
                                               add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, boxes=boxes)
        sizes = inputs.pop("image_sizes")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=64, do_sample=False, return_dict_in_generate=True)
        result = processor.post_process_generation(out, image_sizes=sizes)[0]
        print(f"USER: {question}" + (f"  (box [0] = {boxes[0]})" if boxes else ""))
        print(f"ASSISTANT: {result['text']}")
        for entity in result["entities"]:
            print(f"    {entity['text']!r}: box {[round(v, 1) for v in entity['box']]}, "
                  f"mask {int(entity['mask'].sum()) if entity.get('mask') is not None else '-'} px, "
                  f"score {entity['score'] if entity['score'] is None else round(entity['score'], 3)}")
        # draw at 4x (the image, the boxes and the masks enlarged with nearest-neighbour pixels)
        panels.append(processor.draw(image, result["entities"], labels="text", font_size=11, scale=4))
    canvas = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width
    canvas.save(args.output)
    print(f"drawn: {os.path.abspath(args.output)}")


if __name__ == "__main__":
    main()
