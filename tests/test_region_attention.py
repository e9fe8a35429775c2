"""The region-caption attention term: which positions it supervises, its value against a hand-written reference,
exact gradient accumulation, and the callback that switches a loss weight on part-way through a run."""

import time

import pytest
import torch

from nextchat.modeling_nextchat import _region_caption_queries
from nextchat.training.presets import apply_stage_preset
from nextchat.training.trainer import LossWeightStartCallback
from tiny_models import BOXES, IMAGE_PATCH, TRIGGER, image_block, images, pad_boxes, pad_rows, tiny_model

USER_BOX = [7, TRIGGER, BOXES, 8]  # "what is in [i]?"

# Row A: a region caption (counts), a turn about two boxes (does not), a turn that grounds its own answer (does not).
ROW_A = [1, 5] + image_block() + USER_BOX + [20, 21, 2] + [9, TRIGGER, BOXES, 10, TRIGGER, BOXES] + [22, 2] + [12, 13] \
    + [23, TRIGGER, BOXES, 2]
ASSISTANT_A = [(12, 15), (21, 23), (25, 29)]  # [start, end) of each assistant turn
BOXES_A = [[0.0, 0.0, 0.6, 0.4], [0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]]
# Row B: a user box answered with a grounded phrase (does not count), then a region caption about box 2 (counts).
ROW_B = [1, 5] + image_block() + USER_BOX + [24, TRIGGER, BOXES, 25, 2] + [9, TRIGGER, BOXES] + [26, 2]
ASSISTANT_B = [(12, 17), (20, 22)]
BOXES_B = [[0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]]


def labels_of(row, assistant_spans):
    labels = torch.full((len(row),), -100)
    for start, end in assistant_spans:
        labels[start:end] = torch.tensor(row[start:end])
    labels[torch.tensor(row) == BOXES] = -100
    return labels


def batch():
    ids, attention = pad_rows([ROW_A, ROW_B], side="right")
    labels = torch.full_like(ids, -100)
    labels[0, : len(ROW_A)] = labels_of(ROW_A, ASSISTANT_A)
    labels[1, : len(ROW_B)] = labels_of(ROW_B, ASSISTANT_B)
    box_inputs, box_mask = pad_boxes([BOXES_A, BOXES_B])
    return dict(input_ids=ids, attention_mask=attention, labels=labels, box_inputs=box_inputs,
                box_inputs_mask=box_mask, pixel_values=images(2))


def test_region_caption_queries_by_hand():
    inputs = batch()
    queries, slots, weights = _region_caption_queries(
        inputs["input_ids"], inputs["labels"], inputs["box_inputs_mask"], TRIGGER, BOXES
    )
    # row A: the positions that predict tokens 12, 13, 14 ("20 21 </s>"), box slot 0; row B: those that predict
    # 20, 21 ("26 </s>"), about the row's third box (slot 2)
    assert queries.tolist() == [[0, 11], [0, 12], [0, 13], [1, 19], [1, 20]]
    assert slots.tolist() == [[0, 0]] * 3 + [[1, 2]] * 2
    torch.testing.assert_close(weights, torch.tensor([1 / 3] * 3 + [1 / 2] * 2))
    model = tiny_model(sam=False)
    counts = model.count_loss_items(inputs["input_ids"], inputs["labels"], inputs["box_inputs_mask"], None,
                                    TRIGGER, BOXES)
    assert counts["region_turns"] == 2


@pytest.mark.parametrize("heads", [None, [1, 3]])
def test_region_attention_term_equals_reference(heads):
    """Mean over region-caption turns of the mean over their positions of −log(head-averaged attention mass on the
    patches inside the turn's box), in the supervised layers (the tiny LM's last), by hand."""
    inputs = batch()
    model = tiny_model(sam=False, seed=3, region_attention_loss_weight=0.5, region_attention_heads=heads)
    model.set_attn_implementation("eager")
    out = model(**inputs)
    # 2x2 patch grid, centres at 0.25 / 0.75, row-major. Row A's box 0 [0, 0, 0.6, 0.4] holds patch 0's centre
    # (and its own centre (0.3, 0.2), also patch 0); row B's box 2 [0.5, 0.5, 1, 1] holds patch 3.
    turns = [(0, [11, 12, 13], [0]), (1, [19, 20], [3])]
    heads_used = heads if heads is not None else list(range(4))
    reference = 0.0
    for row, columns, patches in turns:
        patch_columns = [i for i, t in enumerate(inputs["input_ids"][row].tolist()) if t == IMAGE_PATCH]
        attention = out.attentions[1][row][heads_used].mean(0)
        turn = sum(-torch.log(sum(attention[c, patch_columns[p]] for p in patches) + 1e-6) for c in columns)
        reference = reference + turn / len(columns)
    reference = reference / len(turns)
    torch.testing.assert_close(out.region_attention_loss, reference)
    without = tiny_model(sam=False, seed=3)
    without.set_attn_implementation("eager")
    torch.testing.assert_close(out.loss, without(**inputs).loss + 0.5 * reference)
    assert without(**inputs).region_attention_loss is None  # weight 0 (the default): no term, parity


def test_region_attention_term_accumulates_exactly():
    """Two micro-batches (one region-caption turn each, different token counts) with the summed counts give the
    gradient of the whole batch."""
    model = tiny_model(sam=False, seed=2, region_attention_loss_weight=1.0)
    model.set_attn_implementation("eager")
    model.train()
    full = batch()
    model(**full).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    micro = [{k: v[i : i + 1] for k, v in full.items()} for i in range(2)]
    counts = [model.count_loss_items(m["input_ids"], m["labels"], m["box_inputs_mask"], None, TRIGGER, BOXES)
              for m in micro]
    total = {key: sum(c[key] for c in counts) for key in counts[0]}
    assert total["region_turns"] == 2
    for m in micro:
        model(**m, num_items_in_batch=total).loss.backward()
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("heads", [[], [4], [1, 1], [-1]])
def test_attention_heads_are_checked(heads):
    for name in ("grounding_attention_heads", "region_attention_heads"):
        with pytest.raises(ValueError, match=rf"`{name}`=.* distinct heads in \[0, 4\)"):
            tiny_model(sam=False, **{name: heads})


def test_mask_presets_switch_the_region_term_off():
    model = tiny_model(sam=True, region_attention_loss_weight=2.0)
    apply_stage_preset(model, "stage3")
    assert model.loss_weights.region_attention_loss_weight == 0.0
    model = tiny_model(sam=True, region_attention_loss_weight=2.0)
    apply_stage_preset(model, "stage2")
    assert model.loss_weights.region_attention_loss_weight == 0.0  # the original's weights: the term is not in it


def test_loss_weight_start_callback_switches_on_after_its_fraction_of_the_budget():
    model = tiny_model(sam=False, region_attention_loss_weight=1.5, grounding_attention_loss_weight=0.7)
    callback = LossWeightStartCallback(model.config, {"region_attention_loss_weight": 0.5}, budget_s=1.0)
    callback.on_train_begin(None, None, None)
    assert model.config.region_attention_loss_weight == 0.0
    callback.on_step_begin(None, None, None)
    assert model.config.region_attention_loss_weight == 0.0
    time.sleep(0.6)
    callback.on_step_begin(None, None, None)
    assert model.config.region_attention_loss_weight == 1.5
    assert model.config.grounding_attention_loss_weight == 0.7  # not scheduled: untouched


def test_loss_weight_start_callback_waits_for_the_logged_terms():
    model = tiny_model(sam=False, region_attention_loss_weight=2.0)
    rule = {"when_below": {"grounding_attention_loss": 0.2}, "earliest": 0.5, "latest": 0.9}
    callback = LossWeightStartCallback(model.config, {"region_attention_loss_weight": rule}, budget_s=1.0)
    callback.on_train_begin(None, None, None)
    callback.on_step_begin(None, None, None)
    callback.on_log(None, None, None, logs={"grounding_attention_loss": 0.01})  # low, but before `earliest`
    assert model.config.region_attention_loss_weight == 0.0
    time.sleep(0.6)
    callback.on_step_begin(None, None, None)  # now past `earliest`, before `latest`
    for logs in ({"grounding_attention_loss": 0.3}, {"loss": 1.0}):  # not below; the term not logged
        callback.on_log(None, None, None, logs=logs)
        assert model.config.region_attention_loss_weight == 0.0
    callback.on_log(None, None, None, logs={"grounding_attention_loss": 0.19})
    assert model.config.region_attention_loss_weight == 2.0


@pytest.mark.parametrize("starts, message", [
    ({"regoin_attention_loss_weight": 0.5}, "unknown loss weight 'regoin_attention_loss_weight'"),
    ({"region_attention_loss_weight": 1.5}, "0 <= earliest <= latest <= 1"),
    ({"region_attention_loss_weight": {"earliest": 0.8, "latest": 0.5}}, "0 <= earliest <= latest <= 1"),
    ({"region_attention_loss_weight": {"below": {}}}, r"unknown keys \['below'\]"),
])
def test_loss_weight_start_callback_rejects_bad_rules(starts, message):
    with pytest.raises(ValueError, match=message):
        LossWeightStartCallback(tiny_model(sam=False).config, starts, budget_s=1.0)
