"""Seconds per training step of stage 0 (`nextchat.training.vision_pretrain`: the shapes recipe's vision tower with
its patch-class and box heads, 8 scenes a step, one process, one thread) in float32 against bf16 autocast, the
baseline, measured in the same run, with the tower's attention as PyTorch's fused kernel (`sdpa`, the default) and
as plain matrix products (`eager`).

    python benchmarks/bench_stage0_step.py              # ~30 seconds on a 2-core CPU
    python benchmarks/bench_stage0_step.py --steps 40 --repeats 5

On a CPU with bf16 instructions, bf16 autocast makes this step slower, not faster: the backward of the fused
attention kernel is slow in bf16 at these sizes (both stage-0 scripts take `--bf16 no`). Rounds alternate between
the variants so that a busy machine slows them alike; the best round of each is printed.
"""

import argparse
import json
import os
import time

import torch
from transformers import default_data_collator

from nextchat.training.synthetic import COLORS, SHAPES
from nextchat.training.vision_pretrain import (
    PatchClassifier, ShapesPatchDataset, build_vision_tower, freeze_unreached_parameters,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per variant")
    parser.add_argument("--batch-size", type=int, default=8, help="scenes per step (the recipe's)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    configs = os.path.join(ROOT, "training", "configs")
    with open(os.path.join(configs, "shapes_tiny.json"), encoding="utf-8") as f:
        config = json.load(f)
    tower, processor, model_config = build_vision_tower(config, configs)
    classifier = PatchClassifier(tower, len(COLORS) * len(SHAPES) + 1, model_config.vision_feature_layer,
                                 box_loss_weight=1.0).train()
    height, width = processor.image_processor.crop_height_width
    # the recipe's scenes: drawn at 64 px, resized to the tower's input
    dataset = ShapesPatchDataset(range(args.batch_size * (args.steps + 1)), processor.image_processor,
                                 model_config.vision_config.patch_size, input_size=(height, width),
                                 height=64, width=64)
    batches = [default_data_collator([dataset[i] for i in range(k, k + args.batch_size)])
               for k in range(0, len(dataset), args.batch_size)]
    freeze_unreached_parameters(classifier, batches[0])
    optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad], lr=1e-4)

    def step(batch, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = classifier(**batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(classifier.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    variants = [(attention, bf16) for attention in ("sdpa", "eager") for bf16 in (True, False)]
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.repeats):
        for attention, bf16 in variants:
            tower.set_attn_implementation(attention)
            step(batches[0], bf16)  # warm-up
            start = time.perf_counter()
            for batch in batches[1:]:
                step(batch, bf16)
            best[attention, bf16] = min(best[attention, bf16], (time.perf_counter() - start) / args.steps)
    baseline = best["sdpa", True]
    print(f"{args.batch_size} scenes a step at {height} px, {torch.get_num_threads()} thread(s)")
    for (attention, bf16), seconds in best.items():
        name = f"{attention} {'bf16 autocast' if bf16 else 'float32'}"
        print(f"{name:>20}: {seconds * 1000:.1f} ms/step  ({seconds / baseline:.2f} x sdpa bf16 autocast)")


if __name__ == "__main__":
    main()
