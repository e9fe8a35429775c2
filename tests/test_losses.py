"""Loss terms against hand-written references, and gradient accumulation against the full batch."""

import math

import pytest
import torch

from nextchat.loss_nextchat import count_loss_items, generalized_box_iou, mask_losses
from tiny_models import BOXES, IMAGE_PATCH, TRIGGER, image_block, images, pad_boxes, pad_rows, sam_images, tiny_model


def test_giou_hand_computed():
    # identical boxes: 1; disjoint unit squares side by side with a gap of 1: IoU 0, enclosing 3x1, union 2
    pred = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 3.0]])
    giou = generalized_box_iou(pred, target)
    # third: inter 1, union 7, IoU 1/7, enclosing 9 -> 1/7 - 2/9
    expected = torch.tensor([1.0, 0.0 - 1.0 / 3.0, 1.0 / 7.0 - 2.0 / 9.0])
    torch.testing.assert_close(giou, expected, atol=1e-6, rtol=1e-6)


def test_giou_finite_with_gradients_for_degenerate_and_inverted_boxes():
    pred = torch.tensor(
        [[0.5, 0.5, 0.5, 0.5], [0.9, 0.9, 0.1, 0.1], [0.2, 0.8, 0.6, 0.3], [0.3, 0.3, 0.3, 0.3]], requires_grad=True
    )
    target = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.1, 0.1, 0.4, 0.4], [0.1, 0.1, 0.4, 0.4], [0.3, 0.3, 0.3, 0.3]])
    giou = generalized_box_iou(pred, target)
    assert torch.isfinite(giou).all()
    (1 - giou).sum().backward()
    assert torch.isfinite(pred.grad).all()
    # inverted box 1 has zero area: IoU 0, enclosing = span of all x and y = 0.8 x 0.8, union = 0.09
    torch.testing.assert_close(giou[1], torch.tensor(0.0 - (0.64 - 0.09) / 0.64), atol=1e-5, rtol=1e-5)


def naive_mask_terms(logits, target, iou_pred, alpha=0.8, gamma=2.0, smooth=1.0):
    """Per-pixel loops written out with math, one mask at a time."""
    n = logits.numel()
    bce = 0.0
    inter = psum = gsum = 0.0
    hard_inter = hard_union = 0.0
    for x, y in zip(logits.flatten().tolist(), target.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        bce += -(y * math.log(p) + (1 - y) * math.log(1 - p))
        inter += p * y
        psum += p
        gsum += y
        hard = 1.0 if x > 0 else 0.0
        hard_inter += hard * y
        hard_union += max(hard, y)
    bce /= n
    focal = alpha * (1 - math.exp(-bce)) ** gamma * bce
    dice = 1 - (2 * inter + smooth) / (psum + gsum + smooth)
    iou = (iou_pred - hard_inter / max(hard_union, 1)) ** 2
    return bce, focal, dice, iou


def test_mask_terms_match_naive_loops():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, generator=generator) * 3
    target = (torch.rand(2, 5, 6, generator=generator) > 0.6).float()
    iou_pred = torch.tensor([0.3, 0.8])
    focal, dice, iou = mask_losses(logits, target, iou_pred, "focal")
    bce_only, _, _ = mask_losses(logits, target, iou_pred, "bce")
    reference = [naive_mask_terms(logits[i], target[i], iou_pred[i].item()) for i in range(2)]
    assert focal.item() == pytest.approx(sum(r[1] for r in reference), rel=1e-5)
    assert bce_only.item() == pytest.approx(sum(r[0] for r in reference), rel=1e-5)
    assert dice.item() == pytest.approx(sum(r[2] for r in reference), rel=1e-5)
    assert iou.item() == pytest.approx(sum(r[3] for r in reference), rel=1e-5)


# One training sample: prompt with a user box, answer with two grounded phrases.
PROMPT = [1, 5] + image_block() + [7, 8, TRIGGER, BOXES, 9]
ANSWER = [20, 21, TRIGGER, BOXES, 22, TRIGGER, BOXES, 23, 2]
SAMPLE = PROMPT + ANSWER
SAMPLE_BOXES = [[0.1, 0.2, 0.5, 0.6], [0.2, 0.1, 0.7, 0.9], [0.0, 0.3, 0.4, 0.5]]
SHORT = [1, 5] + image_block() + [9, 30, TRIGGER, BOXES, 2]
SHORT_BOXES = [[0.6, 0.6, 0.9, 0.95]]


def labels_for(row, prompt_length):
    labels = torch.tensor(row)
    labels[:prompt_length] = -100
    labels[labels == BOXES] = -100
    return labels


def test_each_term_equals_reference_on_one_sample():
    model = tiny_model(sam=True, seed=1)
    ids = torch.tensor([SAMPLE])
    labels = labels_for(SAMPLE, len(PROMPT))[None]
    box_inputs = torch.tensor([SAMPLE_BOXES])
    mask_targets = torch.full((1, 3, 64, 64), -100.0)
    mask_targets[0, 1] = (torch.rand(64, 64, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    out = model(input_ids=ids, labels=labels, pixel_values=images(1), box_inputs=box_inputs,
                sam_pixel_values=sam_images(1), mask_targets=mask_targets, output_hidden_states=True)

    # LM: mean CE over shifted targets
    lm = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, lm)
    # boxes: the two assistant triggers (not the user one) against the boxes of their following <boxes>
    h = out.hidden_states[-1][0]
    assistant_columns = [i for i, t in enumerate(SAMPLE) if t == TRIGGER and i >= len(PROMPT)]
    pred = torch.stack([model.loc_decoder(h[c]) for c in assistant_columns])
    target = box_inputs[0, 1:]
    torch.testing.assert_close(out.box_l1_loss, (pred - target).abs().mean())
    torch.testing.assert_close(out.box_giou_loss, (1 - generalized_box_iou(pred, target)).mean())
    cycle_embed = ((model.loc_encoder(pred) - h[assistant_columns]) ** 2).mean()
    torch.testing.assert_close(out.cycle_embed_loss, cycle_embed)
    cycle_box = (model.loc_decoder(model.loc_encoder(box_inputs[0])) - box_inputs[0]).abs().mean()
    torch.testing.assert_close(out.cycle_box_loss, cycle_box)
    # masks: only the first assistant box has a target; its trigger is the second trigger overall
    low = out.pred_masks[1]
    up = torch.nn.functional.interpolate(low[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    _, focal, dice, iou = naive_mask_terms(up, mask_targets[0, 1], out.iou_scores[1].item())
    assert out.mask_ce_loss.item() == pytest.approx(focal, rel=1e-4)
    assert out.mask_dice_loss.item() == pytest.approx(dice, rel=1e-4)
    assert out.mask_iou_loss.item() == pytest.approx(iou, rel=1e-4, abs=1e-7)
    expected = lm + 2 * out.box_l1_loss + 0.2 * out.box_giou_loss + cycle_embed + cycle_box
    expected = expected + 20 * out.mask_ce_loss + out.mask_dice_loss + out.mask_iou_loss
    torch.testing.assert_close(out.loss, expected)


def test_target_box_prompt_feeds_sam_the_ground_truth_box_of_assistant_triggers():
    """With `sam_box_prompt="target"` an assistant trigger's mask no longer depends on its decoded box (changing
    `loc_decoder` leaves it unchanged) while the user trigger's still does; "predicted" depends on it everywhere."""
    sample = dict(input_ids=torch.tensor([SAMPLE]), labels=labels_for(SAMPLE, len(PROMPT))[None],
                  box_inputs=torch.tensor([SAMPLE_BOXES]), pixel_values=images(1), sam_pixel_values=sam_images(1))
    masks = {}
    for mode in ("predicted", "target"):
        for shifted in (False, True):
            model = tiny_model(sam=True, seed=4)
            model.sam_box_prompt = mode  # a training argument, like the loss weights
            if shifted:
                with torch.no_grad():
                    model.loc_decoder[2].bias.add_(0.3)
            masks[mode, shifted] = model(**sample).pred_masks
    user, assistant = [0], [1, 2]  # the prompt's trigger, then the answer's two
    torch.testing.assert_close(masks["target", True][assistant], masks["target", False][assistant])
    assert not torch.allclose(masks["target", True][user], masks["target", False][user])
    assert not torch.allclose(masks["predicted", True][assistant], masks["predicted", False][assistant])


def batch_inputs(rows_and_boxes):
    rows = [r for r, _, _ in rows_and_boxes]
    ids, attention = pad_rows(rows, side="right")
    labels = torch.full_like(ids, -100)
    for i, (row, _, prompt_length) in enumerate(rows_and_boxes):
        labels[i, : len(row)] = labels_for(row, prompt_length)
    box_inputs, box_mask = pad_boxes([b for _, b, _ in rows_and_boxes])
    return dict(input_ids=ids, attention_mask=attention, labels=labels, box_inputs=box_inputs,
                box_inputs_mask=box_mask, pixel_values=images(len(rows)))


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_full_batch():
    """Two micro-batches of different sizes (tokens and boxes), normalised by the whole batch's counts."""
    model = tiny_model(sam=False, seed=2)
    model.train()
    samples = [(SAMPLE, SAMPLE_BOXES, len(PROMPT)), (SHORT, SHORT_BOXES, len(SHORT) - 4), (SAMPLE, SAMPLE_BOXES, len(PROMPT))]
    full = batch_inputs(samples)
    model(**full).loss.backward()
    expected = gradients(model)
    model.zero_grad()

    micro = [batch_inputs(samples[:1]), batch_inputs(samples[1:])]
    micro[0]["pixel_values"], micro[1]["pixel_values"] = full["pixel_values"][:1], full["pixel_values"][1:]
    config = model.config
    counts = [count_loss_items(m["input_ids"], m["labels"], m["box_inputs_mask"], None, config.trigger_token_id,
                               config.box_token_id) for m in micro]
    total = {key: sum(c[key] for c in counts) for key in counts[0]}
    assert counts[0]["boxes"] != counts[1]["boxes"] and counts[0]["tokens"] != counts[1]["tokens"]
    for m in micro:
        model(**m, num_items_in_batch=total).loss.backward()
    accumulated = gradients(model)
    assert expected.keys() == accumulated.keys()
    for name in expected:
        torch.testing.assert_close(accumulated[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = batch_inputs([(SAMPLE, SAMPLE_BOXES, len(PROMPT)), (SHORT, SHORT_BOXES, len(SHORT) - 4)])
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(sam=False, seed=5)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.model.language_model.layers[0].gradient_checkpointing
        model(**inputs).loss.backward()
        grads.append(gradients(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_logits_at_targets_only_give_the_same_loss_and_gradients():
    """`logits_in_training="targets"` computes the LM head only where there is an LM target: the loss and every
    gradient equal the full head's; `logits` is None in training and whole in eval mode."""
    inputs = batch_inputs([(SAMPLE, SAMPLE_BOXES, len(PROMPT)), (SHORT, SHORT_BOXES, len(SHORT) - 4)])
    results = {}
    for where in ("all", "targets"):
        model = tiny_model(sam=False, seed=6)
        model.train()
        model.logits_in_training = where
        out = model(**inputs)
        out.loss.backward()
        results[where] = (out, gradients(model))
        if where == "targets":
            assert out.logits is None
            model.eval()
            assert model(**inputs).logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
            model.logits_in_training = "some"
            with pytest.raises(ValueError, match="logits_in_training"):
                model(**inputs)
    (full, full_grads), (trimmed, trimmed_grads) = results["all"], results["targets"]
    # the reference: the mean cross-entropy over the shifted targets of the full logits, `<boxes>` excluded
    shifted = inputs["labels"][:, 1:]
    reference = torch.nn.functional.cross_entropy(full.logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100)
    torch.testing.assert_close(trimmed.lm_loss, reference)
    torch.testing.assert_close(trimmed.loss, full.loss)
    assert full_grads.keys() == trimmed_grads.keys() and "lm_head.weight" in trimmed_grads
    for name in full_grads:
        torch.testing.assert_close(trimmed_grads[name], full_grads[name], atol=1e-6, rtol=1e-5, msg=name)
