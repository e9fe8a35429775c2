"""`NextChatTrainer`: `transformers.Trainer` with exact gradient accumulation for every NExT-Chat loss term."""

from __future__ import annotations

import math
import time

import torch
from transformers import Trainer, TrainerCallback


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
    """Sum of `model.count_loss_items` over micro-batches (None when they carry no labels, or when the model is not a
    NExT-Chat, e.g. the patch classifier of `vision_pretrain`, trained here for the wall-clock schedule)."""
    base = base_model_of(model)
    if not batches or "labels" not in batches[0] or not hasattr(base, "count_loss_items"):
        return None
    config = base.config
    total = dict.fromkeys(LOSS_ITEM_KEYS, 0)
    for batch in batches:
        counts = base.count_loss_items(
            batch["input_ids"], batch["labels"], batch.get("box_inputs_mask"), batch.get("mask_targets"),
            config.trigger_token_id, config.box_token_id,
        )
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

    def __init__(self, *args, time_budget_s: float | None = None, **kwargs):
        """Args as `Trainer`, plus `time_budget_s`: when set, training stops after that many seconds and the
        learning-rate schedule (`lr_scheduler_type` "cosine", "linear", "constant" or "warmup_stable_decay" — constant then
        a cosine decay over the last `lr_scheduler_kwargs["decay_fraction"]` (0.25) of the time — after `warmup_steps`
        steps) runs over
        wall-clock time instead of steps, so that a run on a shared or slower machine still ends its decay."""
        self.time_budget_s = time_budget_s
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if time_budget_s:
            callbacks.append(TimeBudgetCallback(time_budget_s))
        super().__init__(*args, callbacks=callbacks, **kwargs)
        # our forward takes `num_items_in_batch` (a dict) and normalises every term with it
        self.model_accepts_loss_kwargs = True
        self._term_sums: dict[str, float] = {}
        self._last_logged_step = 0
        self._start_time = None

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if not self.time_budget_s or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        kind = str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type))
        if kind not in ("cosine", "linear", "constant", "warmup_stable_decay"):
            raise ValueError(
                f"a time-budget schedule supports cosine, linear, constant or warmup_stable_decay, not {kind!r}"
            )
        decay_fraction = float((self.args.lr_scheduler_kwargs or {}).get("decay_fraction", 0.25))
        warmup = self.args.get_warmup_steps(num_training_steps)
        budget, trainer = float(self.time_budget_s), self

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            start = trainer._start_time or time.time()
            # rank 0's clock for every process: with each its own, the replicas would step with slightly different
            # learning rates and drift apart
            progress = _rank0_value(min(max((time.time() - start) / budget, 0.0), 1.0), trainer.args)
            if kind == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            if kind == "warmup_stable_decay":  # constant, then a cosine decay over the last `decay_fraction`
                tail = max(progress - (1.0 - decay_fraction), 0.0) / max(decay_fraction, 1e-9)
                return 0.5 * (1.0 + math.cos(math.pi * min(tail, 1.0)))
            return 1.0 - progress if kind == "linear" else 1.0

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def train(self, *args, **kwargs):
        if hasattr(base_model_of(self.model), "effective_loss_weights"):
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


def _rank0_value(value: float, args) -> float:
    """`value` as rank 0 has it, in every process (itself when not distributed): rank 0's clock decides for all."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = torch.tensor([value], device=args.device)
        torch.distributed.broadcast(tensor, src=0)
        return float(tensor.item())
    return value


class TimeBudgetCallback(TrainerCallback):
    """Stops training (and saves) once `budget_s` seconds have passed since `on_train_begin`."""

    def __init__(self, budget_s: float):
        self.budget_s = float(budget_s)
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        # every process must stop after the same step, or the others wait forever in the next all-reduce
        over = bool(_rank0_value(float(self.start is not None and time.time() - self.start > self.budget_s), args))
        if over:
            control.should_training_stop = True
            control.should_save = True
        return control


class LossWeightStartCallback(TrainerCallback):
    """Holds some loss weights of `config` at 0 until they are due, then sets them to their configured values.

    `starts` maps a weight's name to a fraction of the wall-clock budget (`{"region_attention_loss_weight": 0.6}`:
    the term joins for the last 40% of the run), or to `{"when_below": {"grounding_attention_loss": 0.2},
    "earliest": 0.5, "latest": 0.7}`: the term joins once every logged term named there has fallen below its value
    (checked at each logging step from the `earliest` fraction of the budget on), and at the latest after the
    `latest` fraction. For a term that would compete with what
    the model has to learn first. Every process decides alike: the logged terms are reduced over processes, and
    rank 0's clock decides for the time."""

    def __init__(self, config, starts: dict, budget_s: float):
        self.config, self.budget_s = config, float(budget_s)
        self.rules = {}
        for name, rule in starts.items():
            if not name.endswith("_loss_weight") or not hasattr(config, name):
                raise ValueError(f"`loss_weight_starts`: unknown loss weight {name!r}")
            if not isinstance(rule, dict):
                rule = {"latest": rule}
            unknown = set(rule) - {"when_below", "earliest", "latest"}
            if unknown:
                raise ValueError(f"`loss_weight_starts[{name!r}]`: unknown keys {sorted(unknown)}")
            latest, earliest = float(rule.get("latest", 1.0)), float(rule.get("earliest", 0.0))
            if not 0.0 <= earliest <= latest <= 1.0:
                raise ValueError(
                    f"`loss_weight_starts[{name!r}]`: fractions must satisfy 0 <= earliest <= latest <= 1, got "
                    f"{earliest!r} and {latest!r}"
                )
            self.rules[name] = {"latest": latest, "earliest": earliest, "when_below": dict(rule.get("when_below") or {}),
                                "value": getattr(config, name), "on": False}
        self.start, self.progress = None, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.progress = time.time(), 0.0
        for name, rule in self.rules.items():
            rule["on"] = rule["latest"] == 0.0
            setattr(self.config, name, rule["value"] if rule["on"] else 0.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for name, rule in self.rules.items():
            below = rule["when_below"]
            due = not rule["on"] and below and self.progress >= rule["earliest"]
            if due and all(term in logs and logs[term] < value for term, value in below.items()):
                rule["on"] = True
                setattr(self.config, name, rule["value"])

    def on_step_begin(self, args, state, control, **kwargs):
        self.progress = _rank0_value((time.time() - self.start) / self.budget_s, args)
        for name, rule in self.rules.items():
            if not rule["on"] and self.progress >= rule["latest"]:
                rule["on"] = True
                setattr(self.config, name, rule["value"])


__all__ = [
    "LOSS_ITEM_KEYS", "LossWeightStartCallback", "NextChatTrainer", "TimeBudgetCallback", "base_model_of",
    "count_loss_items",
]
