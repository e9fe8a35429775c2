"""Stage 0 of a from-scratch shapes model: give the tiny CLIP vision tower what CLIP pretraining gives the real one.

A published NExT-Chat starts from CLIP ViT-L, whose patch features already say what they show. A tower trained from
scratch only through the language model learns colours within a few hundred steps but shapes very slowly: early in
training the LM's attention spreads over all image tokens, which averages the shape evidence of the few object
patches away (measured on lone objects, 700 steps of 16: the shape word's loss stays at chance, ln 4, while the
colour word's is ~0; the same tower with a max-pooling probe learns shapes in ~400 steps).

This stage trains the vision tower alone, with throw-away linear heads, to classify every patch by the object that
covers it (colour x shape, or background), from the generator's exact masks, and optionally (``--box-loss-weight``)
to regress that object's box from each of its patches. The box term is there because a trigger that attends to
the right object's patches reads the mean of their features: without it that mean says where the object's centre
is but not where its edges are (a lone object's size can be read from how many patches look like an object; among
several objects it cannot). The heads are discarded; the tower is saved with `save_pretrained` and loaded into a
new model by ``"vision_tower_init"`` of the training config's ``model`` section. It is our stand-in for CLIP's
pretraining; the rest of the recipe is unchanged.

    python -m nextchat.training.vision_pretrain training/configs/shapes_tiny.json runs/vision_tower --max-steps 2000 \
        --scene-size 64    # the recipe's images are 64 px; its model sees them at 48
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from torch import nn


def _patch_owners(objects: list[dict], rows: int, cols: int, patch_size: int, min_pixels: int,
                  input_size: tuple[int, int] | None = None) -> np.ndarray:
    """`(rows, cols)` index of the object with the most pixels in each patch if it has at least `min_pixels`
    there, else -1 (background). Pixels are those of the model's input: with `input_size` (height, width) other
    than the scene's, each mask is first resized to it, as the image is (its area per input pixel)."""
    counts = np.zeros((len(objects) + 1, rows, cols))
    counts[0] = min_pixels - 1e-6  # background wins unless an object reaches min_pixels (areas may be fractions)
    for k, obj in enumerate(objects):
        mask = obj["mask"] if input_size is None else resize_mask_area(obj["mask"], *input_size)
        mask = mask[: rows * patch_size, : cols * patch_size]
        counts[k + 1] = mask.reshape(rows, patch_size, cols, patch_size).sum(axis=(1, 3))
    return counts.argmax(axis=0) - 1


def resize_mask_area(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A `(H, W)` mask resized to `(height, width)`: each output pixel holds the exact fraction of its area that
    the mask covers (each axis repeated to the least common multiple of the sizes, then block-averaged)."""
    out = mask.astype(np.float64)
    for axis, size in ((0, height), (1, width)):
        common = math.lcm(out.shape[axis], size)
        out = np.repeat(out, common // out.shape[axis], axis=axis)
        shape = list(out.shape)
        shape[axis : axis + 1] = [size, common // size]
        out = out.reshape(shape).mean(axis=axis + 1)
    return out


def _labels_of(objects: list[dict], owner: np.ndarray) -> np.ndarray:
    from .synthetic import COLORS, SHAPES

    colors = list(COLORS)
    labels = np.full(owner.shape, len(COLORS) * len(SHAPES), dtype=np.int64)
    for k, obj in enumerate(objects):
        labels[owner == k] = colors.index(obj["color"]) * len(SHAPES) + SHAPES.index(obj["shape"])
    return labels.reshape(-1)


def _boxes_of(objects: list[dict], owner: np.ndarray, height: int, width: int) -> np.ndarray:
    boxes = np.zeros(owner.shape + (4,), dtype=np.float32)
    scale = np.array([width, height, width, height], dtype=np.float32)
    for k, obj in enumerate(objects):
        boxes[owner == k] = np.asarray(obj["box"], dtype=np.float32) / scale
    return boxes.reshape(-1, 4)


def patch_labels(objects: list[dict], height: int, width: int, patch_size: int, min_pixels: int = 8) -> np.ndarray:
    """Row-major per-patch class ids of a rendered scene (`objects` from `render_scene`).

    A patch takes the class of the object with the most pixels in it, `color_index * len(SHAPES) + shape_index`,
    if that object covers at least `min_pixels` of it; otherwise it is background, class `len(COLORS) * len(SHAPES)`.
    Returns an int64 array of shape `(height // patch_size * width // patch_size,)`."""
    owner = _patch_owners(objects, height // patch_size, width // patch_size, patch_size, min_pixels)
    return _labels_of(objects, owner)


def patch_boxes(objects: list[dict], height: int, width: int, patch_size: int, min_pixels: int = 8) -> np.ndarray:
    """Row-major per-patch box of the object that owns the patch (the same owner as `patch_labels`), as xyxy
    divided by the image width/height; zeros on background patches. Returns float32 `(num_patches, 4)`."""
    owner = _patch_owners(objects, height // patch_size, width // patch_size, patch_size, min_pixels)
    return _boxes_of(objects, owner, height, width)


class ShapesPatchDataset(torch.utils.data.Dataset):
    """Scenes of `render_scene(seed)` for `seed` in `seeds`, drawn on access (deterministic per seed), as
    `{"pixel_values": (3, H, W), "labels": (num_patches,), "boxes": (num_patches, 4)}` with the CLIP preprocessing
    of `image_processor` (see `patch_labels` and `patch_boxes`). With `input_size` (height, width), the model's
    input when it differs from the drawn scene's size: the image processor resizes the scene to it, and the patch
    labels are counted on the resized masks."""

    def __init__(self, seeds, image_processor, patch_size: int, min_pixels: int = 8,
                 input_size: tuple[int, int] | None = None, **scene_kwargs):
        self.seeds = list(seeds)
        self.image_processor = image_processor
        self.patch_size = patch_size
        self.min_pixels = min_pixels
        self.input_size = None if input_size is None else tuple(input_size)
        self.scene_kwargs = scene_kwargs

    def __len__(self):
        return len(self.seeds)

    def __getitem__(self, index):
        from .synthetic import render_scene

        image, objects = render_scene(self.seeds[index], **self.scene_kwargs)
        pixel_values = self.image_processor(image, return_tensors="pt")["pixel_values"][0]
        resized = self.input_size is not None and self.input_size != (image.height, image.width)
        height, width = self.input_size if resized else (image.height, image.width)
        rows, cols = height // self.patch_size, width // self.patch_size
        owner = _patch_owners(objects, rows, cols, self.patch_size, self.min_pixels,  # once for both targets
                              input_size=(height, width) if resized else None)
        labels, boxes = _labels_of(objects, owner), _boxes_of(objects, owner, image.height, image.width)
        return {"pixel_values": pixel_values, "labels": torch.from_numpy(labels), "boxes": torch.from_numpy(boxes)}


class PatchClassifier(nn.Module):
    """A vision tower and linear heads over its patch features (layer `feature_layer`, class token dropped, as
    NExT-Chat reads them).

    `forward(pixel_values, labels=None, boxes=None)` returns `{"loss", "logits": (batch, num_patches, num_classes),
    "pred_boxes": (batch, num_patches, 4)}` (`pred_boxes` only with `box_loss_weight` > 0). The loss is the
    cross-entropy of the patch classes, background patches weighing `background_weight` (most patches are
    background), plus `box_loss_weight` x the L1 distance (summed over the 4 coordinates, averaged over object
    patches) between each object patch's box head and the box of its object — so that a patch feature says where
    its object ends, not only what it is and where the patch is."""

    def __init__(self, vision_tower: nn.Module, num_classes: int, feature_layer: int = -2,
                 background_weight: float = 0.2, box_loss_weight: float = 0.0):
        super().__init__()
        self.vision_tower = vision_tower
        self.head = nn.Linear(vision_tower.config.hidden_size, num_classes)
        self.box_head = nn.Linear(vision_tower.config.hidden_size, 4) if box_loss_weight > 0 else None
        self.feature_layer = feature_layer
        self.background_weight = background_weight
        self.box_loss_weight = box_loss_weight

    def forward(self, pixel_values, labels=None, boxes=None, **kwargs):
        hidden = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer][:, 1:]
        logits = self.head(hidden)
        out = {"logits": logits}
        if self.box_head is not None:
            out["pred_boxes"] = self.box_head(hidden)
        if labels is not None:
            background = labels == logits.shape[-1] - 1
            weight = torch.where(background, self.background_weight, 1.0).to(logits.dtype)
            ce = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            out["loss"] = (ce * weight.flatten()).sum() / weight.sum()
            if self.box_head is not None and boxes is not None:
                on_object = (~background).to(logits.dtype)
                l1 = (out["pred_boxes"] - boxes.to(logits.dtype)).abs().sum(-1)
                out["box_loss"] = (l1 * on_object).sum() / on_object.sum().clamp(min=1)
                out["loss"] = out["loss"] + self.box_loss_weight * out["box_loss"]
        return out


@torch.no_grad()
def object_patch_metrics(classifier: PatchClassifier, dataset: ShapesPatchDataset, batch_size: int = 100) -> dict:
    """On the object (non-background) patches of `dataset`: `accuracy`, the fraction whose colour and shape are both
    predicted right, and, with a box head, `box_error`, the mean absolute error of the predicted box coordinates
    (as fractions of the image size)."""
    classifier.eval()
    hits = total = 0
    box_error = 0.0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        pixel_values = torch.stack([item["pixel_values"] for item in items])
        labels = torch.stack([item["labels"] for item in items])
        out = classifier(pixel_values.to(classifier.head.weight.dtype))
        on_object = labels != classifier.head.out_features - 1
        hits += int((out["logits"].argmax(-1) == labels)[on_object].sum())
        total += int(on_object.sum())
        if "pred_boxes" in out:
            boxes = torch.stack([item["boxes"] for item in items])
            box_error += float((out["pred_boxes"].float() - boxes).abs()[on_object].sum())
    classifier.train()
    metrics = {"accuracy": hits / max(total, 1)}
    if classifier.box_head is not None:
        metrics["box_error"] = box_error / max(4 * total, 1)
    return metrics


def object_patch_accuracy(classifier: PatchClassifier, dataset: ShapesPatchDataset, batch_size: int = 100) -> float:
    """Fraction of object (non-background) patches whose colour and shape are both predicted right."""
    return object_patch_metrics(classifier, dataset, batch_size)["accuracy"]


def build_vision_tower(config: dict, root: str = "."):
    """The vision tower a training config's ``model`` section would build (same config, same sin-cos positions),
    with its processor."""
    from transformers import AutoModel

    from .presets import init_sincos_position_table, sincos_position_options
    from .train import build_processor, scratch_config

    model_spec = config["model"]
    if "scratch" not in model_spec:
        raise ValueError("vision pretraining needs a config whose `model` has a `scratch` section")
    processor = build_processor(model_spec.get("processor"), None, root)
    nextchat_config = scratch_config(processor, model_spec["scratch"])
    torch.manual_seed(int(model_spec.get("seed", 0)))
    tower = AutoModel.from_config(nextchat_config.vision_config)
    sincos = sincos_position_options(model_spec.get("sincos_vision_positions"))
    if sincos is not None:
        init_sincos_position_table(tower.embeddings, **sincos)
    return tower, processor, nextchat_config


def freeze_unreached_parameters(model: nn.Module, batch: dict) -> list[str]:
    """Freeze the parameters that `model`'s loss on `batch` does not reach, and return their names.

    A stage-0 model computes parts whose output no loss reads (the tower's layers past the feature layer and its
    final norm; SAM's point and mask prompt encoders). With those frozen, DDP runs with
    `find_unused_parameters=False` and skips its search of the autograd graph at every step (about a tenth of a stage-0
    step on a 2-core CPU); the training is the same, since those parameters never had a gradient. The probe's
    forward and backward leave the random state as it was and every gradient unset."""
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        model(**batch)["loss"].backward()
    unreached = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    for name, parameter in model.named_parameters():
        if name in unreached:
            parameter.requires_grad_(False)
    return unreached


def add_runtime_arguments(parser: argparse.ArgumentParser):
    """The stage-0 scripts' `--bf16` (whether to train under bf16 autocast) and `--threads`."""
    parser.add_argument("--bf16", choices=("auto", "yes", "no"), default="auto",
                        help="train under bf16 autocast: auto (default) where the hardware computes bf16 natively. "
                             "On CPU these small models can be faster in float32: the bf16 backward of "
                             "PyTorch's CPU attention kernel is slow at these sizes (benchmarks/README.md)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: the config's `torch_num_threads`, else torch's)")


def stage0_training_args(args, warmup_steps: int, **overrides):
    """`TrainingArguments` of a stage-0 run (this module's or `sam_pretrain`'s) from its parsed command line
    (`output_dir`, `batch_size`, `learning_rate`, `max_steps`, `logging_steps`, `bf16`): cosine decay over a fixed
    number of steps, no checkpoints, seed 0, bf16 autocast as `--bf16` says (see `add_runtime_arguments`);
    `overrides` are further TrainingArguments fields."""
    from .train import build_training_args

    return build_training_args({
        "output_dir": args.output_dir, "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "lr_scheduler_type": "cosine", "warmup_steps": warmup_steps,
        "weight_decay": 0.0, "max_grad_norm": 1.0, "max_steps": args.max_steps, "logging_steps": args.logging_steps,
        "save_strategy": "no", "dataloader_num_workers": 1, "dataloader_pin_memory": False, "seed": 0,
        "bf16": {"auto": "auto", "yes": True, "no": False}[args.bf16],
        "disable_tqdm": True, **overrides,
    }, root=".")


def main(argv=None):
    from transformers import default_data_collator

    from .data import CachedDataset
    from .synthetic import COLORS, SHAPES
    from .train import leave_process_group, set_num_threads
    from .trainer import NextChatTrainer

    parser = argparse.ArgumentParser(prog="python -m nextchat.training.vision_pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the training config whose vision tower to pretrain (its `model` section)")
    parser.add_argument("output_dir", help="where the tower is saved (load it with model.vision_tower_init)")
    parser.add_argument("--num", type=int, default=40000, help="training scenes (seeds seed-start..)")
    parser.add_argument("--seed-start", type=int, default=3000000)
    parser.add_argument("--eval-num", type=int, default=300, help="held-out scenes for the printed accuracy")
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--box-loss-weight", type=float, default=0.0,
                        help="also regress each object patch onto its object's box (L1, this weight); 0: classes only")
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--logging-steps", type=int, default=50)
    parser.add_argument("--scene-size", type=int, default=None,
                        help="draw the scenes at this size (px) and resize them to the model's input, as the "
                             "training images of a model whose input is smaller than its data are (default: draw "
                             "them at the input size)")
    parser.add_argument("--cache-scenes", action="store_true",
                        help="keep each drawn scene in memory for its later epochs (the same tensors, so the same "
                             "tower; about 50 KB a scene at 64 px, in each process's dataloader worker)")
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)

    with open(args.config, encoding="utf-8") as f:
        config = json.load(f)
    root = os.path.dirname(os.path.abspath(args.config))
    set_num_threads(config, args.threads)
    tower, processor, nextchat_config = build_vision_tower(config, root)
    classifier = PatchClassifier(tower, len(COLORS) * len(SHAPES) + 1, nextchat_config.vision_feature_layer,
                                 box_loss_weight=args.box_loss_weight)
    patch = nextchat_config.vision_config.patch_size
    height, width = processor.image_processor.crop_height_width
    if args.scene_size is not None and args.scene_size < 1:
        parser.error("--scene-size must be a positive number of pixels")
    scene = {"height": args.scene_size or height, "width": args.scene_size or width, "input_size": (height, width)}
    train = ShapesPatchDataset(range(args.seed_start, args.seed_start + args.num), processor.image_processor, patch,
                               **scene)
    held_out = ShapesPatchDataset(range(args.seed_start + args.num, args.seed_start + args.num + args.eval_num),
                                  processor.image_processor, patch, **scene)
    freeze_unreached_parameters(classifier, default_data_collator([train[0], train[1]]))
    if args.cache_scenes:
        train = CachedDataset(train)
    # a cache lives in its dataloader worker: the worker must outlive the epoch
    training_args = stage0_training_args(args, warmup_steps=50, ddp_find_unused_parameters=False,
                                         dataloader_persistent_workers=args.cache_scenes)
    # NextChatTrainer for its logging; the classifier has no NExT-Chat loss items, so its loss is the stock one
    trainer = NextChatTrainer(model=classifier, args=training_args, train_dataset=train)
    trainer.train()
    if trainer.is_world_process_zero():
        metrics = object_patch_metrics(classifier, held_out)
        tower.save_pretrained(args.output_dir)
        summary = {"object_patch_accuracy": metrics["accuracy"], "steps": trainer.state.global_step}
        if "box_error" in metrics:
            summary["object_patch_box_error_px"] = metrics["box_error"] * width
        with open(os.path.join(args.output_dir, "vision_pretrain_metrics.json"), "w") as f:
            json.dump({**summary, "log_history": trainer.state.log_history}, f, indent=1)
        boxes = (f", box coordinates off by {summary['object_patch_box_error_px']:.2f} px on average"
                 if "box_error" in metrics else "")
        print(f"[vision_pretrain] object-patch accuracy (colour and shape) on {len(held_out)} held-out scenes: "
              f"{metrics['accuracy']:.3f}{boxes}; vision tower saved to {args.output_dir}")
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
