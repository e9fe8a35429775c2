"""`nextchat-quickstart`: a grounded answer about an image, offline, drawn to a PNG.

`--model DIR_OR_HUB_ID` names a NExT-Chat folder or Hub repository (model + processor: a converted or trained
checkpoint). Without it, the tiny model shipped in this repository's checkout (`examples/tiny-nextchat-shapes`,
trained here on synthetic shapes) answers about a scene of its task; outside a checkout, `--model` is required.
"""

import argparse
import os

import torch
from PIL import Image, ImageDraw

from .modeling_nextchat import NextChatForConditionalGeneration


# The tiny model shipped in the repository checkout (present when the package is installed from one, `pip install -e`).
SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                             "tiny-nextchat-shapes")


# In the shipped folder: a scene of its task never used in training (seed 1,000,000 of the synthetic generator), and
# the question the shipped model answers best (see its README).
EXAMPLE_IMAGE = "example.png"
EXAMPLE_QUESTION = "Describe the image with object locations."


def generated_image(width: int = 96, height: int = 64) -> Image.Image:
    """A landscape picture with a red square and a blue circle."""
    image = Image.new("RGB", (width, height), (235, 230, 210))
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 14, 38, 42], fill=(200, 30, 30))
    draw.ellipse([52, 20, 84, 52], fill=(30, 60, 200))
    return image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="DIR_OR_HUB_ID", help="a NExT-Chat folder or Hub repository (model + "
                        "processor); default: the tiny model shipped in the repository checkout")
    parser.add_argument("--image", help="an image file; default: a generated scene of the shapes task (for the shipped "
                        "model) or a picture of a red square and a blue circle")
    parser.add_argument("--question", help="default: 'Describe the image with object locations.' about the generated "
                        "scene, or 'Where is the red square?'")
    parser.add_argument("--output", default="nextchat_quickstart.png", help="where to write the annotated image")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    from .processing import NextChatProcessor

    folder = args.model
    if folder is None:
        if not os.path.isfile(os.path.join(SHIPPED_MODEL, "config.json")):
            parser.error(
                f"no model: the shipped tiny model ({SHIPPED_MODEL}) is only in a checkout of the repository; pass "
                "`--model DIR_OR_HUB_ID` (a NExT-Chat folder or Hub repository with its processor)"
            )
        folder = SHIPPED_MODEL
    print(f"loading {folder}")
    try:
        model = NextChatForConditionalGeneration.from_pretrained(folder).eval()
        processor = NextChatProcessor.from_pretrained(folder)
    except OSError as error:  # not a folder, not a reachable Hub repository, or no model / processor files in it
        parser.error(f"`--model {folder}` could not be loaded: {error}")
    shipped = os.path.abspath(folder) == os.path.abspath(SHIPPED_MODEL)
    question = "Where is the red square?"
    if args.image:
        image = Image.open(args.image).convert("RGB")
    elif shipped:
        image = Image.open(os.path.join(folder, EXAMPLE_IMAGE)).convert("RGB")
        question = EXAMPLE_QUESTION
    else:
        image = generated_image()
    question = args.question or question

    prompt = processor.apply_chat_template(
        [{"role": "user", "content": f"<image> {processor.escape_text(question)}"}], add_generation_prompt=True
    )
    inputs = processor(images=[image], text=[prompt])
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                return_dict_in_generate=True)
    result = processor.post_process_generation(output, image_sizes=inputs["image_sizes"])[0]

    if shipped:
        print("NOTE: a 2.1M-parameter model trained from scratch in about 14 minutes on CPU: it boxes and segments "
              "the object a phrase names (99 times in 100, also when the question is worded in a way it never saw), "
              "names the object in a given box (99 in 100), finds 94 objects in 100 when it describes a scene (also "
              "in words it never saw), and answers without a box about an object that is not "
              "there (97 in 100); scores and limits in examples/tiny-nextchat-shapes/README.md.")
    print(f"question: {question}")
    print(f"answer:   {result['text']}")
    for k, entity in enumerate(result["entities"]):
        box = [round(float(v), 1) for v in entity["box"]]
        score = "" if entity["score"] is None else f", score {float(entity['score']):.3f}"
        mask = "" if entity["mask"] is None else f", mask of {int(entity['mask'].sum())} pixels"
        print(f"  [{k}] {entity['text']!r}: box {box} (pixels x1, y1, x2, y2){mask}{score}")
    scale = max(1, 256 // max(image.size))  # small pictures (the shapes scenes are 64 px) drawn 4x, to be seen
    processor.draw(image, result["entities"], scale=scale).save(args.output)
    print(f"annotated image written to {os.path.abspath(args.output)}")


if __name__ == "__main__":
    main()
