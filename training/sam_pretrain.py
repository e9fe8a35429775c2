"""Stage 0 for SAM: give a from-scratch tiny SAM what SAM's own pretraining gives the real one.

A published NExT-Chat starts from SAM ViT-H, which already turns a box into the mask of the object inside it; the
original's mask stage only teaches `seg_prompt_mlp` and SAM's decoder to use the trigger's prompt tokens as well. A
SAM trained from scratch inside the mask stage has to learn both at once, from the few masks of the segmentation
turns, while its prompt tokens come from a frozen language model: measured on the shapes task, its dice loss sits
on a plateau (~0.39) for most of the stage and the masks end at mIoU ~0.6, where the same SAM trained alone on
ground-truth boxes reaches 0.9 in a few hundred steps.

This stage trains SAM alone (image encoder, prompt encoder, mask decoder) to segment the object in a ground-truth
box, with the mask stage's own loss terms and weights (focal CE x 20, dice, IoU head). The trigger's prompt tokens
are not available here, so SAM sees zeros in their place; :func:`load_sam` puts the weights into a NExT-Chat model
and zeroes the last layer of `seg_prompt_mlp`, so that the mask stage starts from exactly the SAM trained here and
learns what the trigger adds from there. It is our stand-in for SAM's pretraining, as `vision_pretrain` is CLIP's.

    python -m nextchat.training.sam_pretrain training/configs/shapes_tiny.json runs/sam --max-steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


WEIGHTS_NAME = "sam.safetensors"
CONFIG_NAME = "sam_config.json"


class ShapesBoxMaskDataset(torch.utils.data.Dataset):
    """Scenes of `render_scene(seed)` for `seed` in `seeds`, drawn on access, as `{"sam_pixel_values": (3, S, S),
    "boxes": (n, 4) xyxy normalised to the SAM input, "mask_targets": (n, S, S) in {0, 1}}`, one row per object
    (the SAM preprocessing of `image_processor`; `geometry_nextchat`'s SAM-frame arithmetic)."""

    def __init__(self, seeds, image_processor, **scene_kwargs):
        if image_processor.sam_image_size is None:
            raise ValueError("SAM pretraining needs an image processor with `sam_image_size`")
        self.seeds = list(seeds)
        self.image_processor = image_processor
        self.scene_kwargs = scene_kwargs

    def __len__(self):
        return len(self.seeds)

    def __getitem__(self, index):
        from nextchat.processing.geometry_nextchat import boxes_to_sam_frame, masks_to_sam_frame

        from .synthetic import render_scene

        image, objects = render_scene(self.seeds[index], **self.scene_kwargs)
        size = self.image_processor.sam_image_size
        pixels = self.image_processor(image, return_sam_pixel_values=True, return_tensors="pt")["sam_pixel_values"][0]
        boxes = boxes_to_sam_frame([obj["box"] for obj in objects], (image.height, image.width), size) / size
        masks = masks_to_sam_frame(np.stack([obj["mask"] for obj in objects]), size)
        return {"sam_pixel_values": pixels, "boxes": torch.tensor(boxes, dtype=torch.float32),
                "mask_targets": torch.from_numpy(masks)}


def collate_box_masks(items: list[dict]) -> dict:
    """Stack the images `(B, 3, S, S)` and concatenate the objects `(K, ...)`, with `image_index` `(K,)` saying
    which image each object is on."""
    return {
        "sam_pixel_values": torch.stack([item["sam_pixel_values"] for item in items]),
        "boxes": torch.cat([item["boxes"] for item in items]),
        "mask_targets": torch.cat([item["mask_targets"] for item in items]),
        "image_index": torch.cat([torch.full((len(item["boxes"]),), b, dtype=torch.long)
                                  for b, item in enumerate(items)]),
    }


def _world_size() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


class BoxPromptedSam(nn.Module):
    """A `NextChatSamModel` prompted by boxes alone (zeros in the places of the `num_prompt_tokens` trigger tokens).

    `forward(sam_pixel_values, boxes, image_index, mask_targets=None)` returns `{"pred_masks": (K, h, w) logits,
    "iou_scores": (K,)}` and, with `mask_targets` `(K, S, S)`, `"loss"` = the mask stage's weighted terms averaged
    over the K masks (`mask_ce_loss`, `mask_dice_loss`, `mask_iou_loss` reported as well)."""

    def __init__(self, sam: nn.Module, num_prompt_tokens: int, loss_weights, loss_options: dict):
        super().__init__()
        self.sam = sam
        self.num_prompt_tokens = num_prompt_tokens
        self.mask_loss_weights = loss_weights
        self.loss_options = loss_options

    def forward(self, sam_pixel_values, boxes, image_index, mask_targets=None, **kwargs):
        from ..loss_nextchat import mask_losses

        dim = self.sam.prompt_encoder.embed_dim
        prompts = boxes.new_zeros((len(boxes), self.num_prompt_tokens, dim))
        logits, iou = self.sam.predict_masks(sam_pixel_values, prompts, boxes, image_index)
        out = {"pred_masks": logits, "iou_scores": iou}
        if mask_targets is not None:
            upsampled = F.interpolate(logits[:, None].float(), size=mask_targets.shape[-2:], mode="bilinear",
                                      align_corners=False)[:, 0]
            ce, dice, iou_loss = (term / len(boxes) for term in mask_losses(upsampled, mask_targets, iou,
                                                                             **self.loss_options))
            weights = self.mask_loss_weights
            out["loss"] = (weights.mask_ce_loss_weight * ce + weights.mask_dice_loss_weight * dice
                           + weights.mask_iou_loss_weight * iou_loss)
            # the terms as this process's share of the mean over processes, which is what NextChatTrainer's log sums
            share = 1 / _world_size()
            out.update(mask_ce_loss=ce * share, mask_dice_loss=dice * share, mask_iou_loss=iou_loss * share)
        return out


@torch.no_grad()
def box_mask_miou(model: BoxPromptedSam, dataset: ShapesBoxMaskDataset, batch_size: int = 100) -> float:
    """Mean IoU, over every object of `dataset`, of the mask predicted from its ground-truth box (logit > 0 after
    upsampling to the SAM input) with its ground-truth mask."""
    model.eval()
    ious = []
    for start in range(0, len(dataset), batch_size):
        batch = collate_box_masks([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logits = model(batch["sam_pixel_values"], batch["boxes"], batch["image_index"])["pred_masks"]
        targets = batch["mask_targets"] > 0.5
        pred = F.interpolate(logits[:, None].float(), size=targets.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0] > 0
        inter = (pred & targets).flatten(1).sum(1)
        union = (pred | targets).flatten(1).sum(1)
        ious.append(inter.float() / union.clamp(min=1).float())
    model.train()
    return float(torch.cat(ious).mean())


def save_sam(sam: nn.Module, sam_config: dict, output_dir: str) -> None:
    """`sam.safetensors` (the state dict, SAM's own parameter names) and `sam_config.json` in `output_dir`."""
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, os.path.join(output_dir, WEIGHTS_NAME))
    with open(os.path.join(output_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(sam_config, f, indent=1, sort_keys=True)


def load_sam(model, path: str) -> None:
    """Put the SAM saved at `path` (by :func:`save_sam`) into a NExT-Chat `model` and zero the last layer of its
    `seg_prompt_mlp`, so that the model's masks start as those of the saved SAM (which saw zero prompt tokens).

    Raises a `ValueError` naming the fields where the saved SAM's config differs from `model.config.sam_config`."""
    from safetensors.torch import load_file

    if getattr(model, "sam", None) is None:
        raise ValueError(f"model.sam_init {path!r}: this model has no SAM (`config.sam_config` is None)")
    with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
        saved = json.load(f)
    mine = model.config.sam_config
    different = sorted(k for k in set(mine) | set(saved) if mine.get(k) != saved.get(k))
    if different:
        raise ValueError(f"model.sam_init {path!r}: its SAM config differs from the model's in {different}")
    model.sam.load_state_dict(load_file(os.path.join(path, WEIGHTS_NAME)))
    last = model.seg_prompt_mlp[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def main(argv=None):
    from ..loss_nextchat import NextChatLossWeights
    from ..sam_nextchat import NextChatSamModel

    from .train import build_processor, leave_process_group, scratch_config, set_num_threads
    from .trainer import NextChatTrainer
    from .vision_pretrain import add_runtime_arguments, freeze_unreached_parameters, stage0_training_args

    parser = argparse.ArgumentParser(prog="python -m nextchat.training.sam_pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the training config whose SAM to pretrain (its `model` section)")
    parser.add_argument("output_dir", help="where SAM is saved (load it with model.sam_init)")
    parser.add_argument("--num", type=int, default=40000, help="training scenes (seeds seed-start..)")
    parser.add_argument("--seed-start", type=int, default=4000000)
    parser.add_argument("--eval-num", type=int, default=300, help="held-out scenes for the printed mIoU")
    parser.add_argument("--batch-size", type=int, default=8, help="scenes per process (each has 1-3 objects)")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--logging-steps", type=int, default=25)
    parser.add_argument("--scene-size", type=int, default=None,
                        help="draw the scenes at this size (px); default: SAM's input size")
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    if args.scene_size is not None and args.scene_size < 1:
        parser.error("--scene-size must be a positive number of pixels")

    with open(args.config, encoding="utf-8") as f:
        config = json.load(f)
    root = os.path.dirname(os.path.abspath(args.config))
    set_num_threads(config, args.threads)
    model_spec = config["model"]
    if "scratch" not in model_spec:
        raise ValueError("SAM pretraining needs a config whose `model` has a `scratch` section")
    processor = build_processor(model_spec.get("processor"), None, root)
    nextchat_config = scratch_config(processor, model_spec["scratch"])
    if nextchat_config.sam_config is None:
        raise ValueError("SAM pretraining needs a config whose `model.scratch` has a `sam_config`")
    torch.manual_seed(int(model_spec.get("seed", 0)))
    sam = NextChatSamModel(nextchat_config.sam_config)
    options = {"loss_type": nextchat_config.mask_loss_type, "focal_alpha": nextchat_config.mask_focal_alpha,
               "focal_gamma": nextchat_config.mask_focal_gamma, "dice_smooth": nextchat_config.mask_dice_smooth}
    model = BoxPromptedSam(sam, nextchat_config.num_seg_prompt_tokens, NextChatLossWeights(), options)
    size = args.scene_size or processor.image_processor.sam_image_size
    if size is None:
        raise ValueError("SAM pretraining needs a processor with `sam_image_size`")
    scene = {"height": size, "width": size, "single_object_fraction": 0.2}
    train = ShapesBoxMaskDataset(range(args.seed_start, args.seed_start + args.num), processor.image_processor,
                                 **scene)
    held_out = ShapesBoxMaskDataset(range(args.seed_start + args.num, args.seed_start + args.num + args.eval_num),
                                    processor.image_processor, **scene)
    freeze_unreached_parameters(model, collate_box_masks([train[0], train[1]]))
    training_args = stage0_training_args(args, warmup_steps=20, remove_unused_columns=False,
                                         ddp_find_unused_parameters=False)
    trainer = NextChatTrainer(model=model, args=training_args, train_dataset=train, data_collator=collate_box_masks)
    trainer.train()
    if trainer.is_world_process_zero():
        miou = box_mask_miou(model, held_out)
        save_sam(sam, nextchat_config.sam_config, args.output_dir)
        with open(os.path.join(args.output_dir, "sam_pretrain_metrics.json"), "w") as f:
            json.dump({"box_mask_miou": miou, "steps": trainer.state.global_step,
                       "log_history": trainer.state.log_history}, f, indent=1)
        print(f"[sam_pretrain] mask mIoU from ground-truth boxes on {len(held_out)} held-out scenes: {miou:.3f}; "
              f"SAM saved to {args.output_dir}")
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
