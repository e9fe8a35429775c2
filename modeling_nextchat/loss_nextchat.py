"""The losses of NExT-Chat: language modelling, box regression (L1 + GIoU), the two cycle-consistency terms, and
SAM's mask terms, with their weights (`NextChatLossWeights`) and their normalisation.

Every term is a SUM over its items divided by the number of items of the whole (possibly gradient-accumulated)
batch, so that accumulating micro-batches gives the gradient of the full batch (`count_loss_items` counts them;
`NextChatTrainer` sums the counts over the micro-batches of a step and passes them as `num_items_in_batch`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


IGNORE_INDEX = -100

LOSS_WEIGHT_NAMES = (
    "lm_loss_weight", "box_l1_loss_weight", "box_giou_loss_weight", "cycle_embed_loss_weight", "cycle_box_loss_weight",
    "mask_ce_loss_weight", "mask_dice_loss_weight", "mask_iou_loss_weight",
)


@dataclass
class NextChatLossWeights:
    """The weights of the loss terms: training arguments, not model configuration.

    A model starts with the original NExT-Chat's weights (LM 1, box L1 2, GIoU 0.2, both cycle losses 1, mask
    focal/BCE 20, dice 1, IoU head 1); set others as ``model.loss_weights = NextChatLossWeights(...)`` (the stage
    presets of `nextchat.training` do). They are never written to nor read from ``config.json``, so a checkpoint
    never hands the weights of its last training phase to the next one.
    """

    lm_loss_weight: float = 1.0
    box_l1_loss_weight: float = 2.0
    box_giou_loss_weight: float = 0.2
    cycle_embed_loss_weight: float = 1.0
    cycle_box_loss_weight: float = 1.0
    mask_ce_loss_weight: float = 20.0
    mask_dice_loss_weight: float = 1.0
    mask_iou_loss_weight: float = 1.0

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in LOSS_WEIGHT_NAMES}


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise GIoU of two `(K, 4)` xyxy box sets, `(K,)`.

    Finite for degenerate and inverted boxes: an inverted box has zero area (its negative extent is clamped),
    and the enclosing box is taken over all four coordinates, so its GIoU still pulls it towards the target.
    (The original drops inverted predictions from the GIoU term instead.)
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]).clamp(min=0) * (boxes1[:, 3] - boxes1[:, 1]).clamp(min=0)
    area2 = (boxes2[:, 2] - boxes2[:, 0]).clamp(min=0) * (boxes2[:, 3] - boxes2[:, 1]).clamp(min=0)
    inter_w = (torch.minimum(boxes1[:, 2], boxes2[:, 2]) - torch.maximum(boxes1[:, 0], boxes2[:, 0])).clamp(min=0)
    inter_h = (torch.minimum(boxes1[:, 3], boxes2[:, 3]) - torch.maximum(boxes1[:, 1], boxes2[:, 1])).clamp(min=0)
    inter = inter_w * inter_h
    union = area1 + area2 - inter
    all_x = torch.stack([boxes1[:, 0], boxes1[:, 2], boxes2[:, 0], boxes2[:, 2]], dim=-1)
    all_y = torch.stack([boxes1[:, 1], boxes1[:, 3], boxes2[:, 1], boxes2[:, 3]], dim=-1)
    enclosing = (all_x.amax(-1) - all_x.amin(-1)) * (all_y.amax(-1) - all_y.amin(-1))
    iou = inter / (union + eps)
    return iou - (enclosing - union) / (enclosing + eps)


def box_losses(pred_boxes: torch.Tensor, target_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed L1 over the `K×4` coordinates and summed `1 − GIoU` over the K boxes."""
    l1 = (pred_boxes - target_boxes).abs().sum()
    giou = (1 - generalized_box_iou(pred_boxes, target_boxes)).sum()
    return l1, giou


def mask_losses(
    mask_logits: torch.Tensor,
    targets: torch.Tensor,
    iou_predictions: torch.Tensor,
    loss_type: str = "focal",
    focal_alpha: float = 0.8,
    focal_gamma: float = 2.0,
    dice_smooth: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask loss of K masks, each term summed over the masks.

    Args:
        mask_logits: `(K, h, w)` logits at the resolution of `targets`.
        targets: `(K, h, w)` binary targets.
        iou_predictions: `(K,)` SAM IoU-head outputs.
        loss_type: `"focal"` — the original's focal modulation of each mask's mean BCE,
            `alpha·(1−exp(−bce))^gamma·bce`; `"bce"` — the mean BCE itself.

    Returns:
        `(ce, dice, iou)`: the cross-entropy term, the dice loss `1 − (2I + s)/(ΣP + ΣG + s)` on probabilities,
        and the squared error between the IoU head and the IoU of the thresholded mask (logit > 0) with the target.
    """
    logits = mask_logits.float().flatten(1)
    targets = targets.float().flatten(1)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)
    if loss_type == "focal":
        ce = focal_alpha * (1 - torch.exp(-bce)) ** focal_gamma * bce
    else:
        ce = bce
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * targets).sum(1) + dice_smooth) / (probs.sum(1) + targets.sum(1) + dice_smooth)
    with torch.no_grad():
        hard = (logits > 0).float()
        intersection = (hard * targets).sum(1)
        union = hard.sum(1) + targets.sum(1) - intersection
        actual_iou = intersection / union.clamp(min=1)
    iou = (iou_predictions.float() - actual_iou) ** 2
    return ce.sum(), dice.sum(), iou.sum()


def answer_box_positions(input_ids, labels, trigger_token_id):
    """`(B, T)` bool: the positions right after an answer (labelled) trigger, i.e. the `<boxes>` of the answer."""
    answer_trigger = (input_ids == trigger_token_id) & (labels != IGNORE_INDEX)
    return F.pad(answer_trigger[:, :-1], (1, 0), value=False)


def slot_of_ordinal(box_inputs_mask):
    """`(B, S)`: the slot index in `box_inputs` of each row's n-th `<boxes>` token (the n-th True slot of
    `box_inputs_mask`), -1 past the last."""
    mask = box_inputs_mask.bool()
    slots = torch.full_like(mask, -1, dtype=torch.long)
    slot_rows, slot_cols = torch.nonzero(mask, as_tuple=True)
    slots[slot_rows, (mask.long().cumsum(dim=1) - 1)[slot_rows, slot_cols]] = slot_cols
    return slots


def assistant_box_slots(input_ids, labels, box_inputs_mask, trigger_token_id, box_token_id, box_inputs=None):
    """`(K, 2)` (row, slot) indices into `box_inputs` of the box that follows each assistant trigger, row-major."""
    triggers = torch.nonzero((input_ids == trigger_token_id) & (labels != IGNORE_INDEX))
    rows, cols = triggers[:, 0], triggers[:, 1]
    next_cols = cols + 1
    if bool((next_cols >= input_ids.shape[1]).any()) or not bool(
        (input_ids[rows, next_cols.clamp(max=input_ids.shape[1] - 1)] == box_token_id).all()
    ):
        raise ValueError(
            "with `labels`, every assistant `<at>` must be followed by `<boxes>` carrying its target box in `box_inputs`"
        )
    if box_inputs_mask is None and box_inputs is None:
        raise ValueError("`labels` contain assistant `<at>` triggers but no `box_inputs` hold their target boxes")
    if box_inputs_mask is None:
        box_inputs_mask = torch.ones(box_inputs.shape[:2], dtype=torch.bool, device=input_ids.device)
    box_ordinal = ((input_ids == box_token_id).long().cumsum(dim=1) - 1)[rows, next_cols]
    return torch.stack([rows, slot_of_ordinal(box_inputs_mask)[rows, box_ordinal]], dim=1)


def answer_box_slots(input_ids, labels, box_inputs, box_inputs_mask, trigger_positions, config):
    """Which triggers are answer (labelled) triggers, `(K,)` bool, and the `(row, slot)` in `box_inputs` of the box
    each is trained on, `(n_answer, 2)` (None without answer triggers). Shared by SAM's target prompts and the
    losses."""
    assistant = labels[trigger_positions[:, 0], trigger_positions[:, 1]] != IGNORE_INDEX
    if not bool(assistant.any()):
        return assistant, None
    slots = assistant_box_slots(
        input_ids, labels, box_inputs_mask if box_inputs is not None else None, config.trigger_token_id,
        config.box_token_id, box_inputs=box_inputs,
    )
    return assistant, slots


def check_label_inputs(input_ids, labels, shift_labels, logits_to_keep):
    """Raises a `ValueError` naming the argument when the training inputs of `forward` do not fit together."""
    if shift_labels is not None and labels is None:
        raise ValueError("`shift_labels` need `labels` too (they select the answer triggers of the box losses)")
    for name, value in (("labels", labels), ("shift_labels", shift_labels)):
        if value is not None and value.shape != input_ids.shape:
            raise ValueError(
                f"`{name}` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(value.shape)}"
            )
    if labels is not None and logits_to_keep not in (0, None):
        raise ValueError("`labels` need logits for every position; do not pass `logits_to_keep` with them")


def count_loss_items(
    input_ids, labels, box_inputs_mask=None, mask_targets=None, trigger_token_id=None, box_token_id=None,
    shift_labels=None,
) -> dict:
    """Item counts of each loss term in one micro-batch: LM target `tokens`, answer `boxes`, `input_boxes` (the
    box cycle term), `masks`. Sum them over micro-batches and pass the sums as `num_items_in_batch` to make every
    term exactly the mean over the accumulated batch; `shift_labels`, when the LM targets come pre-shifted."""
    shifted = labels[:, 1:] if shift_labels is None else shift_labels
    targets = (shifted != IGNORE_INDEX) & (shifted != box_token_id)
    assistant = (input_ids == trigger_token_id) & (labels != IGNORE_INDEX)
    counts = {
        "tokens": int(targets.sum()),
        "boxes": int(assistant.sum()),
        "input_boxes": int(box_inputs_mask.sum()) if box_inputs_mask is not None else 0,
        "masks": 0,
    }
    if mask_targets is not None and counts["boxes"]:
        slots = assistant_box_slots(input_ids, labels, box_inputs_mask, trigger_token_id, box_token_id)
        has_mask = (mask_targets.flatten(2) >= 0).all(-1)
        counts["masks"] = int(has_mask[slots[:, 0], slots[:, 1]].sum())
    return counts


def normalisers(local: dict, num_items_in_batch) -> dict:
    """Divisors of each summed loss term: the counts of the whole accumulated batch when known.

    Args:
        local: this micro-batch's counts (`count_loss_items`).
        num_items_in_batch: a dict of counts summed over the accumulated batch (exact for every term), an int (the
            LM token count only, what the stock `Trainer` passes: every other term is scaled by this micro-batch's
            share of the tokens), or None (this micro-batch alone).
    """
    if isinstance(num_items_in_batch, dict):
        counts = {**local, **num_items_in_batch}  # a key the caller did not count: this micro-batch's own
    elif num_items_in_batch is not None:
        share = float(num_items_in_batch) / max(local["tokens"], 1)
        counts = {key: value * share for key, value in local.items()}
        counts["tokens"] = num_items_in_batch
    else:
        counts = local
    return {key: (value.clamp(min=1) if torch.is_tensor(value) else max(value, 1)) for key, value in counts.items()}


def lm_targets(labels, shift_labels, box_token_id) -> torch.Tensor:
    """The target of each position's logits `(batch_size, sequence_length)`, `IGNORE_INDEX` where there is none:
    `shift_labels`, or `labels` shifted by one; `<boxes>` targets are never predicted (the box embedding is fed
    there)."""
    if shift_labels is None:
        shift_labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    return shift_labels.masked_fill(shift_labels == box_token_id, IGNORE_INDEX)


def lm_loss(logits, labels, shift_labels, box_token_id) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions with a target (`lm_targets`)."""
    targets = lm_targets(labels, shift_labels, box_token_id).to(logits.device)
    # only the positions with a target: a softmax over the image patches and the prompt would be thrown away
    targeted = targets != IGNORE_INDEX
    return F.cross_entropy(logits[targeted].float(), targets[targeted], reduction="sum")


def compute_losses(model, output, inputs: dict, answers, trigger_hidden, num_items_in_batch=None):
    """Fills the loss fields of `output` (a `NextChatCausalLMOutputWithPast`) and `output.loss`, their weighted sum
    with `model.loss_weights`.

    Args:
        model: the `NextChatForConditionalGeneration` (its `loc_encoder` and `decode_boxes` give the cycle terms).
        inputs: `input_ids`, `labels`, `box_inputs`, `box_inputs_mask`, `mask_targets`, `sam_pixel_values` and
            `shift_labels` of the forward call (None where not given); `target_logits`, optionally: `(logits
            (n, vocab_size), targets (n,))` at the positions with an LM target, where the forward computed the LM
            head only there (`output.logits` is then None).
        answers: `(assistant, slots)`: which triggers are answer triggers `(K,)` and the `(row, slot)` of the box
            each is trained on `(n_answer, 2)` (None without answer triggers).
        trigger_hidden: `(K, hidden_size)` final-norm hidden states at the triggers.
        num_items_in_batch: see `normalisers`.
    """
    config, weights = model.config, model.loss_weights
    input_ids, labels = inputs["input_ids"], inputs["labels"]
    box_inputs, box_inputs_mask, mask_targets = inputs["box_inputs"], inputs["box_inputs_mask"], inputs["mask_targets"]
    local = count_loss_items(input_ids, labels, box_inputs_mask, mask_targets, config.trigger_token_id,
                             config.box_token_id, shift_labels=inputs["shift_labels"])
    divisors = normalisers(local, num_items_in_batch)

    if inputs.get("target_logits") is not None:  # the LM head was computed at the targets only
        logits, targets = inputs["target_logits"]
        summed = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
    else:
        summed = lm_loss(output.logits, labels, inputs["shift_labels"], config.box_token_id)
    output.lm_loss = summed / divisors["tokens"]
    total = weights.lm_loss_weight * output.lm_loss

    assistant, slots = answers
    if slots is not None:
        targets = box_inputs[slots[:, 0], slots[:, 1]].to(output.pred_boxes.dtype)
        pred = output.pred_boxes[assistant]
        l1, giou = box_losses(pred, targets)
        output.box_l1_loss = l1 / (4 * divisors["boxes"])
        output.box_giou_loss = giou / divisors["boxes"]
        hidden = trigger_hidden[assistant]
        reencoded = model.loc_encoder(pred.to(next(model.loc_encoder.parameters()).dtype))
        output.cycle_embed_loss = ((reencoded.float() - hidden.float()) ** 2).sum() / (
            hidden.shape[-1] * divisors["boxes"]
        )
        total = (
            total
            + weights.box_l1_loss_weight * output.box_l1_loss
            + weights.box_giou_loss_weight * output.box_giou_loss
            + weights.cycle_embed_loss_weight * output.cycle_embed_loss
        )
        if mask_targets is not None and inputs["sam_pixel_values"] is not None:
            total = total + _mask_loss(config, weights, output, assistant, slots, mask_targets, divisors)
        elif mask_targets is not None:
            raise ValueError("`mask_targets` need `sam_pixel_values` to predict masks")

    if box_inputs is not None and local["input_boxes"]:
        boxes = box_inputs[box_inputs_mask.bool()] if box_inputs_mask is not None else box_inputs.flatten(0, 1)
        boxes = boxes.to(next(model.loc_encoder.parameters()).dtype)
        cycled = model.decode_boxes(model.loc_encoder(boxes))
        output.cycle_box_loss = (cycled.float() - boxes.float()).abs().sum() / (4 * divisors["input_boxes"])
        total = total + weights.cycle_box_loss_weight * output.cycle_box_loss
    output.loss = total


def _mask_loss(config, weights, output, assistant, slots, mask_targets, divisors):
    targets = mask_targets[slots[:, 0], slots[:, 1]]
    has_mask = (targets.flatten(1) >= 0).all(-1)
    if not bool(has_mask.any()):
        return 0.0
    logits = output.pred_masks[assistant][has_mask]
    targets = targets[has_mask]
    logits = F.interpolate(logits[:, None].float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    ce, dice, iou = mask_losses(
        logits, targets, output.iou_scores[assistant][has_mask], config.mask_loss_type, config.mask_focal_alpha,
        config.mask_focal_gamma, config.mask_dice_smooth,
    )
    output.mask_ce_loss = ce / divisors["masks"]
    output.mask_dice_loss = dice / divisors["masks"]
    output.mask_iou_loss = iou / divisors["masks"]
    return (
        weights.mask_ce_loss_weight * output.mask_ce_loss
        + weights.mask_dice_loss_weight * output.mask_dice_loss
        + weights.mask_iou_loss_weight * output.mask_iou_loss
    )
