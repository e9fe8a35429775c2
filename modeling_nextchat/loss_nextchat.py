"""Loss terms of NExT-Chat: box regression, cycle consistency, SAM mask losses, and a grounding-attention term
(training-only, not in the original).

Every term returns a SUM over its items; the model divides by the number of items of the whole (possibly
gradient-accumulated) batch, so that accumulating micro-batches gives the gradient of the full batch.
"""

import torch
import torch.nn.functional as F


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


def box_patch_targets(boxes: torch.Tensor, grid_size: int) -> torch.Tensor:
    """`(K, grid_size²)` bool, row-major over the patch grid: the patches whose centre lies inside each normalised
    xyxy box, plus the patch holding the box's centre (so that a box smaller than a patch still has one)."""
    centres = (torch.arange(grid_size, device=boxes.device, dtype=boxes.dtype) + 0.5) / grid_size
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    cx, cy = cx.flatten(), cy.flatten()
    inside = (
        (cx >= boxes[:, 0:1]) & (cx <= boxes[:, 2:3]) & (cy >= boxes[:, 1:2]) & (cy <= boxes[:, 3:4])
    )
    col = ((boxes[:, 0] + boxes[:, 2]) / 2 * grid_size).floor().long().clamp(0, grid_size - 1)
    row = ((boxes[:, 1] + boxes[:, 3]) / 2 * grid_size).floor().long().clamp(0, grid_size - 1)
    inside[torch.arange(len(boxes), device=boxes.device), row * grid_size + col] = True
    return inside


def per_query_attention_loss(
    attentions: torch.Tensor, target_patches: torch.Tensor, eps: float = 1e-6, per_head: bool = False
) -> torch.Tensor:
    """`(K,)`: for each of K query rows, `−log` of the head-averaged attention mass on its target patches (with
    `per_head`: the mean over heads of `−log` of each head's mass), summed over the L layers of `attentions`
    `(L, K, H, P)`."""
    mass = (attentions.float() * target_patches[None, :, None, :]).sum(-1)  # (L, K, H)
    if per_head:
        return -torch.log(mass + eps).mean(-1).sum(0)
    return -torch.log(mass.mean(-1) + eps).sum(0)
