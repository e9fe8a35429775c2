"""Seconds per training step of the SAM stage (`nextchat.training.sam_pretrain`, the shapes recipe's SAM: 8 scenes
of 1-3 objects a step, one process, one thread), with the mask decoder run once for all the objects of the batch
(`NextChatSamModel.decode_masks`, what the stage and NExT-Chat's mask training do) against the baseline measured in
the same run: segment-anything's own `MaskDecoder` called image by image, as `predict_masks` did before.

    python benchmarks/bench_sam_step.py                 # ~1 minute on a 2-core CPU
    python benchmarks/bench_sam_step.py --steps 10 --repeats 5

Both variants run in float32 and in bf16 autocast (what the stage uses where the CPU has bf16 instructions), on the
same pre-drawn batches. Rounds alternate between the variants so that a busy machine slows them alike; the best
round of each is printed.
"""

import argparse
import json
import os
import time

import torch

from nextchat.loss_nextchat import NextChatLossWeights
from nextchat.sam_nextchat import NextChatSamModel
from nextchat.training.sam_pretrain import BoxPromptedSam, ShapesBoxMaskDataset, collate_box_masks
from nextchat.training.train import build_processor, scratch_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def predict_masks_image_by_image(sam: NextChatSamModel, pixel_values, prompt_tokens, boxes, image_index):
    """The baseline: segment-anything's `MaskDecoder` once per image, on that image's prompts."""
    dtype = sam.mask_decoder.iou_token.weight.dtype
    images, inverse = torch.unique(image_index, return_inverse=True)
    embeddings = sam.get_image_embeddings(pixel_values[images].to(dtype))
    masks = iou = None
    for i in range(len(images)):
        selected = torch.nonzero(inverse == i).flatten()
        sparse = torch.cat([prompt_tokens[selected], sam.embed_boxes(boxes[selected] * sam.image_size)], dim=1)
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = dense.expand(len(selected), -1, sam.image_embedding_size, sam.image_embedding_size)
        image_masks, image_iou = sam.mask_decoder(
            image_embeddings=embeddings[i : i + 1], image_pe=sam.image_positional_embeddings(),
            sparse_prompt_embeddings=sparse.to(embeddings.dtype), dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        if masks is None:
            masks = image_masks.new_empty((len(image_index),) + image_masks.shape[2:])
            iou = image_iou.new_empty(len(image_index))
        masks[selected], iou[selected] = image_masks[:, 0], image_iou[:, 0]
    return masks, iou


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per variant")
    parser.add_argument("--batch-size", type=int, default=8, help="scenes per step (the stage's default)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with open(os.path.join(ROOT, "training", "configs", "shapes_tiny.json"), encoding="utf-8") as f:
        config = json.load(f)
    processor = build_processor(config["model"]["processor"], None, os.path.join(ROOT, "training", "configs"))
    model_config = scratch_config(processor, config["model"]["scratch"])
    size = model_config.sam_config["image_size"]
    dataset = ShapesBoxMaskDataset(range(args.batch_size * (args.steps + 1)), processor.image_processor,
                                   height=size, width=size, single_object_fraction=0.2)
    batches = [collate_box_masks([dataset[i] for i in range(k, k + args.batch_size)])
               for k in range(0, len(dataset), args.batch_size)]
    torch.manual_seed(0)
    options = {"loss_type": model_config.mask_loss_type, "focal_alpha": model_config.mask_focal_alpha,
               "focal_gamma": model_config.mask_focal_gamma, "dice_smooth": model_config.mask_dice_smooth}
    model = BoxPromptedSam(NextChatSamModel(model_config.sam_config), model_config.num_seg_prompt_tokens,
                           NextChatLossWeights(), options).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    one_pass = model.sam.predict_masks

    def image_by_image(*inputs):
        return predict_masks_image_by_image(model.sam, *inputs)

    def step(batch, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    variants = {(name, bf16): predict for bf16 in (False, True)
                for name, predict in (("image by image", image_by_image), ("one pass", one_pass))}
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.repeats):
        for (name, bf16), predict in variants.items():
            model.sam.predict_masks = predict
            step(batches[0], bf16)  # warm-up
            start = time.perf_counter()
            for batch in batches[1:]:
                step(batch, bf16)
            best[name, bf16] = min(best[name, bf16], (time.perf_counter() - start) / args.steps)
    model.sam.predict_masks = one_pass
    objects = sum(len(batch["boxes"]) for batch in batches[1:]) / args.steps
    print(f"{args.batch_size} scenes ({objects:.1f} objects) a step, SAM at {size} px, "
          f"{torch.get_num_threads()} thread(s)")
    for bf16 in (False, True):
        baseline = best["image by image", bf16]
        for name in ("image by image", "one pass"):
            seconds = best[name, bf16]
            print(f"{'bf16' if bf16 else 'fp32'} {name:>15}: {seconds:.3f} s/step  ({seconds / baseline:.2f} x image by image)")


if __name__ == "__main__":
    main()
