"""`NextChatTrainer`: `transformers.Trainer` with exact gradient accumulation for every NExT-Chat loss term."""

from __future__ import annotations

import time

import torch
from transformers import Trainer

from ..loss_nextchat import count_loss_items as count_micro_batch_items


LOSS_ITEM_KEYS = ("tokens", "boxes", "input_boxes", "masks", "region_turns")
LOSS_TERMS = (
    "lm_loss", "box_l1_loss", "box_giou_loss", "cycle_embed_loss", "cycle_box_loss", "mask_ce_loss",
    "mask_dice_loss", "mask_iou_loss", "grounding_attention_loss", "region_attention_loss",
)


def base_model_of(model):
    """The `NextChatForConditionalGeneration` under PEFT / DDP / accelerate wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            break
    return model


def count_loss_items(model, batches: list[dict]) -> dict | None:
    """The item counts of every loss term (`loss_nextchat.count_loss_items`, plus the region-caption turns of an
    attached `AttentionSupervision`) summed over micro-batches; None when they carry no labels, or when the model is
    not a NExT-Chat (e.g. the patch classifier of `vision_pretrain`)."""
    base = base_model_of(model)
    if not batches or "labels" not in batches[0] or not hasattr(base, "loss_weights"):
        return None
    config = base.config
    supervision = getattr(base, "attention_supervision", None)
    total = dict.fromkeys(LOSS_ITEM_KEYS, 0)
    for batch in batches:
        counts = count_micro_batch_items(
            batch["input_ids"], batch["labels"], batch.get("box_inputs_mask"), batch.get("mask_targets"),
            config.trigger_token_id, config.box_token_id,
        )
        if supervision is not None:
            counts.update(supervision.count_items(config, batch["input_ids"], batch["labels"],
                                                  batch.get("box_inputs_mask")))
        for key in LOSS_ITEM_KEYS:
            total[key] += int(counts.get(key, 0))
    return total


class NextChatTrainer(Trainer):
    """`Trainer` whose `num_items_in_batch` is the dict of item counts of every NExT-Chat loss term (LM tokens,
    assistant boxes, input boxes, masks, region-caption turns), summed over the micro-batches of one optimizer step
    and, in multi-process runs with `average_tokens_across_devices` (the default), over the processes.

    The model divides each summed term by its count, so a step with gradient accumulation (and/or several
    processes) has exactly the gradient of the same samples in one batch. (With the stock integer, only the LM
    term would be exact and the box/mask terms, being per-micro-batch means, would be over-weighted.)

    It also logs the individual loss terms (per optimizer step, averaged over the logging interval) next to
    `loss` (a term that is absent from a step, e.g. no masks, counts as 0 for it).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # our forward takes `num_items_in_batch` (a dict) and normalises every term with it
        self.model_accepts_loss_kwargs = True
        self._term_sums: dict[str, float] = {}
        self._last_logged_step = 0
        self._start_time = None

    def train(self, *args, **kwargs):
        if hasattr(base_model_of(self.model), "loss_weights"):
            from .presets import check_loss_weights

            check_loss_weights(self.model)  # warns when a trainable part has every loss weight at 0
        self._start_time = time.time()
        return super().train(*args, **kwargs)

    def _get_num_items_in_batch(self, batch_samples: list, device) -> dict | None:
        counts = count_loss_items(self.model, batch_samples)
        if counts is None:
            return None
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            values = torch.tensor([counts[k] for k in LOSS_ITEM_KEYS], dtype=torch.long, device=device)
            values = self.accelerator.reduce(values, reduction="sum")
            counts = dict(zip(LOSS_ITEM_KEYS, (int(v) for v in values.tolist())))
        return counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            for name in LOSS_TERMS:
                value = outputs.get(name) if hasattr(outputs, "get") else None
                if value is not None:
                    # with a dict `num_items_in_batch` the terms of the micro-batches of one step add up
                    self._term_sums[name] = self._term_sums.get(name, 0.0) + float(value.detach())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs:
            steps = max(self.state.global_step - self._last_logged_step, 1)
            present = [name for name in LOSS_TERMS if name in self._term_sums]
            if self.args.world_size > 1:
                # each process holds its share of every term (normalised by the global counts): sum the shares
                values = torch.tensor([self._term_sums.get(name, float("nan")) for name in LOSS_TERMS],
                                      dtype=torch.float64, device=self.args.device)
                seen = (~values.isnan()).to(torch.float64)
                values = self.accelerator.reduce(values.nan_to_num(0.0), reduction="sum")
                seen = self.accelerator.reduce(seen, reduction="sum")
                present = [name for name, count in zip(LOSS_TERMS, seen.tolist()) if count > 0]
                self._term_sums = dict(zip(LOSS_TERMS, values.tolist()))
            for name in present:
                logs[name] = round(self._term_sums[name] / steps, 6)
            self._term_sums = {}
            self._last_logged_step = self.state.global_step
        if self._start_time is None:
            self._start_time = time.time()
        logs["elapsed_s"] = round(time.time() - self._start_time, 1)
        super().log(logs, *args, **kwargs)


__all__ = ["LOSS_ITEM_KEYS", "NextChatTrainer", "base_model_of", "count_loss_items"]
