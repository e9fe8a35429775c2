"""Training recipes: which parameters train in each stage of the original NExT-Chat, LoRA, initialisation helpers.

Stages (as the original NExT-Chat trains them, plus two for models trained from scratch):

* ``stage1`` / ``stage2`` (VL + detection pre-training / instruction tuning): the whole LLM (embeddings, layers,
  norm, ``lm_head``), ``mm_projector``, ``loc_encoder``, ``loc_decoder`` train; the CLIP tower is frozen. The
  original stage-1/2 model has no SAM: ``seg_prompt_mlp`` and SAM are frozen too (and the data should not give
  ``sam_pixel_values``, so SAM does not run). Loss weights: the original's (LM 1, L1 2, GIoU 0.2, cycles 1).
* ``stage3`` (segmentation): only ``seg_prompt_mlp`` and the SAM mask decoder train; the loss is the mask loss
  alone (every other weight set to 0 in ``model.loss_weights``).
* ``sam``: like ``stage3`` but ALL of SAM trains (image encoder and prompt encoder too): the mask stage of a model
  whose SAM is not pretrained (the second phase of the from-scratch shapes recipe).
* ``full``: everything trains (training from scratch, e.g. the synthetic shapes task).

Presets only set ``requires_grad`` and the loss weights (``model.loss_weights``, a ``NextChatLossWeights``: training
arguments, never read from or written to ``config.json``); precision is the caller's choice
(``bf16``/``fp16`` training arguments), never a cast here.
"""

from __future__ import annotations

import math

import torch

from ..loss_nextchat import NextChatLossWeights


LM_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
# LoRA on the language model's attention AND its MLP (`nextchat-finetune --lora-target all`)
LM_ALL_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LORA_TARGETS = {"attention": LM_REGEX, "all": LM_ALL_REGEX}
DEFAULT_MODULES_TO_SAVE = ("mm_projector", "loc_encoder", "loc_decoder", "seg_prompt_mlp")
# what LoRA must also train (in full, saved with the adapter) for the model to learn words it cannot produce yet
EMBEDDING_MODULES = ("lm_head", "embed_tokens")
BOX_LOSS_WEIGHTS = ("lm_loss_weight", "box_l1_loss_weight", "box_giou_loss_weight", "cycle_embed_loss_weight",
                    "cycle_box_loss_weight")
ORIGINAL_LOSS_WEIGHTS = NextChatLossWeights().to_dict()  # the defaults are the original NExT-Chat's
STAGES = ("stage1", "stage2", "stage3", "sam", "full")


def stage_loss_weights(stage: str, has_sam: bool = True):
    """The `NextChatLossWeights` a stage trains with — fixed by the stage, never read from a checkpoint's config:
    the original's weights for ``stage1``/``stage2``/``full``, the mask terms alone for ``stage3``/``sam``."""
    stage = {"1": "stage1", "2": "stage2", "3": "stage3"}.get(str(stage), str(stage))
    weights = NextChatLossWeights()
    if stage in ("stage3", "sam"):
        for name in BOX_LOSS_WEIGHTS:
            setattr(weights, name, 0.0)
    return weights


def apply_stage_preset(model, stage: str) -> dict:
    """Set `requires_grad` and the loss weights (`model.loss_weights`, a `NextChatLossWeights`; see
    :func:`stage_loss_weights`) for `stage` on a `NextChatForConditionalGeneration`. The weights never come from
    the model's config (a checkpoint saved after a mask stage carries zero LM/box weights there).

    Returns a dict of data options the stage implies (``{"use_masks": bool, "return_sam_pixel_values": bool}``).
    """
    stage = {"1": "stage1", "2": "stage2", "3": "stage3"}.get(str(stage), str(stage))
    if stage not in STAGES:
        raise ValueError(f"`stage` must be one of {STAGES} (or 1, 2, 3), got {stage!r}")
    has_sam = getattr(model, "sam", None) is not None
    if stage in ("stage3", "sam") and not has_sam:
        raise ValueError(f"{stage} trains SAM, but this model has no SAM (`config.sam_config` is None)")
    model.loss_weights = stage_loss_weights(stage, has_sam)
    if stage in ("stage1", "stage2"):
        model.requires_grad_(False)
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        model.model.mm_projector.requires_grad_(True)
        model.model.loc_encoder.requires_grad_(True)
        model.loc_decoder.requires_grad_(True)
        return {"use_masks": False, "return_sam_pixel_values": False}
    if stage in ("stage3", "sam"):
        model.requires_grad_(False)
        model.seg_prompt_mlp.requires_grad_(True)
        if stage == "stage3":
            model.sam.mask_decoder.requires_grad_(True)
        else:
            model.sam.requires_grad_(True)
        return {"use_masks": True, "return_sam_pixel_values": True}
    model.requires_grad_(True)
    return {"use_masks": has_sam, "return_sam_pixel_values": has_sam}


# Which weighted loss terms train each part of the model (directly; the mask terms also reach the language model
# through the trigger states, but a run whose LM learns only from masks is the trap this guards against).
_LM_TERMS = ("lm_loss_weight", "box_l1_loss_weight", "box_giou_loss_weight", "cycle_embed_loss_weight")
_MASK_TERMS = ("mask_ce_loss_weight", "mask_dice_loss_weight", "mask_iou_loss_weight")
PART_LOSS_TERMS = {
    "vision_tower": _LM_TERMS + _MASK_TERMS,
    "mm_projector": _LM_TERMS,
    "embed_tokens": _LM_TERMS,
    "language_model": _LM_TERMS,
    "lm_head": ("lm_loss_weight",),
    "loc_encoder": ("box_l1_loss_weight", "box_giou_loss_weight", "cycle_embed_loss_weight", "cycle_box_loss_weight",
                    "lm_loss_weight"),
    "loc_decoder": ("box_l1_loss_weight", "box_giou_loss_weight", "cycle_embed_loss_weight", "cycle_box_loss_weight"),
    "seg_prompt_mlp": _MASK_TERMS,
    "sam": _MASK_TERMS,
}


def part_of(name: str) -> str:
    """The model part a parameter name belongs to (PEFT prefixes and wrappers allowed), for reports and checks."""
    name = name.replace("base_model.model.", "", 1)
    for key in ("embed_tokens", "lm_head", "mm_projector", "loc_encoder", "loc_decoder", "seg_prompt_mlp",
                "vision_tower"):
        if f"{key}." in name or name.startswith(key):
            return key
    if name.startswith("sam.") or ".sam." in name:
        return "sam"
    if "language_model" in name:
        return "language_model"
    return "other"


def trainable_parameter_report(model) -> dict:
    """``{part: (trainable, total)}`` parameter counts (LoRA factors count under the part they adapt); the
    ``"all"`` entry sums them."""
    report: dict[str, list[int]] = {}
    for name, parameter in model.named_parameters():
        counts = report.setdefault(part_of(name), [0, 0])
        counts[1] += parameter.numel()
        if parameter.requires_grad:
            counts[0] += parameter.numel()
    total = [sum(c[0] for c in report.values()), sum(c[1] for c in report.values())]
    out = {part: tuple(c) for part, c in sorted(report.items())}
    out["all"] = tuple(total)
    return out


def format_parameter_report(report: dict) -> str:
    lines = [f"{'part':<16}{'trainable':>14}{'total':>14}"]
    for part, (trainable, total) in report.items():
        lines.append(f"{part:<16}{trainable:>14,}{total:>14,}")
    return "\n".join(lines)


def check_loss_weights(model, weights=None, warn: bool = True) -> list[str]:
    """The trainable parts of `model` (PEFT-wrapped or not) whose every weighted loss term is 0 — they would not
    learn. Warns (``warnings.warn`` and the transformers logger) naming them and the weights, unless `warn` is
    False. `weights`: the `NextChatLossWeights` to check (default: the model's `loss_weights`)."""
    import warnings

    from .trainer import base_model_of

    base = base_model_of(model)
    if weights is None:
        weights = getattr(base, "loss_weights", None)
    if weights is None:
        return []
    trainable = {part_of(name) for name, p in model.named_parameters() if p.requires_grad}
    dead = sorted(part for part in trainable if part in PART_LOSS_TERMS
                  and all(not getattr(weights, term, 0.0) for term in PART_LOSS_TERMS[part]))
    if dead and warn:
        message = (
            f"these trainable parts get no loss: {dead} — every loss weight that trains them is 0 "
            f"({ {p: PART_LOSS_TERMS[p] for p in dead} }). Loss weights in use: {weights.to_dict()}. Set them with a "
            "stage preset (`apply_stage_preset`), `--loss-weight NAME=VALUE`, or "
            "`model.loss_weights = NextChatLossWeights(...)`."
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        from transformers.utils import logging

        logging.get_logger("nextchat.training").warning(message)
    return dead


def trainable_parameter_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def apply_lora(model, r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.05, target_modules: str = LM_REGEX,
               modules_to_save=DEFAULT_MODULES_TO_SAVE, train_embeddings: bool = False, **kwargs):
    """Wrap `model` with PEFT LoRA on the language model's attention projections only.

    `train_embeddings=True` adds `lm_head` and `embed_tokens` to `modules_to_save` (trained in full, saved with the
    adapter): without them LoRA cannot teach the model a word it does not produce yet (measured: a new shape name
    came out garbled). `nextchat-finetune` decides it from the data (``--train-embeddings auto``).

    CLIP has modules of the same names (`q_proj`, ...), so the target is a regex on the full module name
    (default :data:`LM_REGEX`). The heads in `modules_to_save` (present on the model) train in full and are saved
    with the adapter. Returns the `PeftModel`.

    No `task_type` by default: `PeftModelForCausalLM.forward` passes `inputs_embeds=None`, `return_dict=None`, ...
    explicitly, which the NExT-Chat forward forwards into the language model twice (TypeError); the plain
    `PeftModel` passes the inputs through unchanged, and `generate`, `save_pretrained`, `merge_and_unload` work
    the same.
    """
    from peft import LoraConfig, get_peft_model

    # The model indexes its heads (`self.loc_encoder[0].weight`), which a PEFT `ModulesToSaveWrapper` around the
    # whole `nn.Sequential` does not support: save the heads' parameterised children instead (same parameters).
    expanded = []
    modules_to_save = list(modules_to_save or ())
    if train_embeddings:
        modules_to_save += [m for m in EMBEDDING_MODULES if m not in modules_to_save]
    for name in modules_to_save:
        module = getattr_path(model, name)
        if module is None:
            continue
        if isinstance(module, torch.nn.Sequential):
            expanded += [f"{name}.{i}" for i, child in enumerate(module) if any(True for _ in child.parameters())]
        else:
            expanded.append(name)
    modules_to_save = expanded
    lora_config = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
        modules_to_save=modules_to_save or None, **kwargs,
    )
    return get_peft_model(model, lora_config)


def getattr_path(model, name):
    for module_name, module in model.named_modules():
        if module_name == name or module_name.endswith("." + name):
            return module
    return None


def sincos_2d(grid_size: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """2-D sine-cosine position embeddings `(grid_size**2, dim)` (MAE / ViT style, row-major patches)."""
    if dim % 4:
        raise ValueError(f"sin-cos 2-D embeddings need a dim divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64),
                            indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    out_x = xs.flatten()[:, None] * omega[None]
    out_y = ys.flatten()[:, None] * omega[None]
    return torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1).float()


@torch.no_grad()
def init_vision_sincos_positions(model, scale: float = 1.0, temperature: float = 10000.0) -> None:
    """Overwrite the CLIP position embedding table with `scale` x 2-D sin-cos values (class position: zeros). An
    initialisation for training from scratch; the weights stay trainable. On a small patch grid a low
    `temperature` (e.g. 20) spreads the frequencies over the grid instead of leaving most of them nearly constant."""
    init_sincos_position_table(model.model.vision_tower.embeddings, scale, temperature)


def sincos_position_options(spec) -> dict | None:
    """The keyword arguments of `init_sincos_position_table` that a training config's `sincos_vision_positions`
    asks for (a dict of them; true = amplitude 1; a number = that amplitude), or None (false / absent)."""
    if spec is None or spec is False:
        return None
    if isinstance(spec, dict):
        return dict(spec)
    return {"scale": 1.0 if spec is True else float(spec)}


@torch.no_grad()
def init_sincos_position_table(embeddings, scale: float = 1.0, temperature: float = 10000.0) -> None:
    """`init_vision_sincos_positions` on a CLIP vision tower's `embeddings` module."""
    table = embeddings.position_embedding.weight
    num_patches = table.shape[0] - 1
    grid = int(math.isqrt(num_patches))
    if grid * grid != num_patches:
        raise ValueError(f"the CLIP position table has {num_patches} patch positions, not a square grid")
    table[0].zero_()
    table[1:].copy_(scale * sincos_2d(grid, table.shape[1], temperature).to(table.dtype))


@torch.no_grad()
def reset_head_init(model, heads=("loc_encoder", "loc_decoder", "seg_prompt_mlp")) -> list[str]:
    """Re-initialise the Linear layers of the box/mask heads with PyTorch's default (Kaiming-uniform) init instead
    of the transformer-wide `initializer_range` (0.02). For training from scratch: with std-0.02 weights the
    4 -> H -> H/2 -> 4 box path starts with vanishing activations and Adam needs hundreds of steps to grow it.
    Returns the names of the re-initialised modules."""
    done = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == h or name.startswith(h + ".") or f".{h}." in name
                                                       for h in heads):
            module.reset_parameters()
            done.append(name)
    return done


__all__ = [
    "DEFAULT_MODULES_TO_SAVE", "LM_ALL_REGEX", "LM_REGEX", "LORA_TARGETS", "ORIGINAL_LOSS_WEIGHTS", "PART_LOSS_TERMS",
    "STAGES", "apply_lora",
    "apply_stage_preset", "check_loss_weights", "format_parameter_report", "stage_loss_weights",
    "trainable_parameter_report", "EMBEDDING_MODULES",
    "init_vision_sincos_positions", "reset_head_init", "sincos_2d", "sincos_position_options",
    "trainable_parameter_names",
]
