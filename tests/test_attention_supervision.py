"""The training-only attention terms (`nextchat.training.AttentionSupervision`): which positions they supervise,
their values against hand-written references, exact gradient accumulation through `NextChatTrainer`'s counts, and
that the model itself knows nothing of them."""

import pytest
import torch

from nextchat.training.attention_supervision import (
    AttentionSupervision,
    answer_start_queries,
    caption_start_queries,
    region_caption_queries,
)
from nextchat.training.trainer import count_loss_items
from tiny_models import BOXES, IMAGE_PATCH, TRIGGER, image_block, images, pad_boxes, pad_rows, tiny_model


# ---- one sample with a user box and two answer triggers (the grounding term)

PROMPT = [1, 5] + image_block() + [7, 8, TRIGGER, BOXES, 9]
ANSWER = [20, 21, TRIGGER, BOXES, 22, TRIGGER, BOXES, 23, 2]
SAMPLE = PROMPT + ANSWER
SAMPLE_BOXES = [[0.1, 0.2, 0.5, 0.6], [0.2, 0.1, 0.7, 0.9], [0.0, 0.3, 0.4, 0.5]]


def labels_for(row, prompt_length):
    labels = torch.tensor(row)
    labels[:prompt_length] = -100
    labels[labels == BOXES] = -100
    return labels


def grounding_sample():
    """SAMPLE as model inputs, with each assistant trigger's target patches by hand: `(inputs, targets,
    patch_columns, assistant_columns)`. 2x2 patch grid (centres at 0.25 and 0.75), row-major. The answer's boxes:
    1 [0.2, 0.1, 0.7, 0.9] holds the centres of the left column (patches 0 and 2); 2 [0.0, 0.3, 0.4, 0.5] holds no
    centre, its own centre (0.2, 0.4) lies in patch 0. The prompt's trigger (a user box) has no target."""
    sample = dict(input_ids=torch.tensor([SAMPLE]), labels=labels_for(SAMPLE, len(PROMPT))[None],
                  box_inputs=torch.tensor([SAMPLE_BOXES]), pixel_values=images(1))
    targets = [[0, 2], [0]]
    patch_columns = [i for i, t in enumerate(SAMPLE) if t == IMAGE_PATCH]
    assistant_columns = [i for i, t in enumerate(SAMPLE) if t == TRIGGER and i >= len(PROMPT)]
    return sample, targets, patch_columns, assistant_columns


def supervised(seed=3, **kwargs):
    return AttentionSupervision(**kwargs).attach(tiny_model(sam=False, seed=seed))


def plain(seed=3):
    model = tiny_model(sam=False, seed=seed)
    model.set_attn_implementation("eager")
    return model


def test_grounding_term_equals_reference():
    """-log of the head-averaged attention mass of each assistant trigger on the patches of its box, by hand."""
    sample, targets, patch_columns, assistant_columns = grounding_sample()
    for layers, expected_layers in ((None, [1]), ([0, -1], [0, 1])):
        model = supervised(grounding_weight=0.5, layers=layers)
        out = model(**sample)
        reference = 0.0
        for layer in expected_layers:
            attention = out.attentions[layer][0].mean(0)  # heads averaged: (seq, seq)
            for column, patches in zip(assistant_columns, targets):
                mass = sum(attention[column, patch_columns[p]] for p in patches)
                reference = reference - torch.log(mass + 1e-6)
        reference = reference / (len(expected_layers) * len(assistant_columns))
        torch.testing.assert_close(out.grounding_attention_loss, reference)
        without = plain()(**sample)
        torch.testing.assert_close(out.loss, without.loss + 0.5 * reference)
        assert "grounding_attention_loss" not in without  # the model alone: the original's loss, no such term
        # the output keeps its type through pytree (what DDP and torch.compile do with it)
        leaves, spec = torch.utils._pytree.tree_flatten(out)
        rebuilt = torch.utils._pytree.tree_unflatten(leaves, spec)
        assert type(rebuilt) is type(out) and torch.equal(rebuilt.grounding_attention_loss, out.grounding_attention_loss)


def test_per_head_term_averages_each_heads_log_mass():
    """`per_head`: the mean over heads of `−log` of each head's mass, by hand — which is larger than `−log` of the
    mean mass whenever the heads disagree (Jensen), so the two reductions can be told apart."""
    sample, targets, patch_columns, assistant_columns = grounding_sample()
    losses = {}
    for per_head in (False, True):
        model = supervised(grounding_weight=1.0, per_head=per_head)
        with torch.no_grad():  # sharper attention, so that the heads disagree (a fresh tiny model's is near uniform)
            model.model.language_model.layers[1].self_attn.q_proj.weight.mul_(30)
        out = model(**sample)
        losses[per_head] = out.grounding_attention_loss
    attention = out.attentions[1][0]  # the one supervised layer: (heads, seq, seq)
    reference = 0.0
    for column, patches in zip(assistant_columns, targets):
        for head in range(attention.shape[0]):
            mass = sum(attention[head, column, patch_columns[p]] for p in patches)
            reference = reference - torch.log(mass + 1e-6) / attention.shape[0]
    torch.testing.assert_close(losses[True], reference / len(assistant_columns))
    assert losses[True] > losses[False] + 1e-4
    with pytest.raises(ValueError, match="per_head"):
        AttentionSupervision(grounding_weight=1.0, per_head="yes")


def test_attach_switches_to_eager_attention_and_detach_by_reattaching_inactive():
    model = tiny_model(sam=False)
    model.set_attn_implementation("sdpa")
    sample, *_ = grounding_sample()
    AttentionSupervision(grounding_weight=1.0).attach(model)
    assert model.model.language_model.config._attn_implementation == "eager"
    assert model(**sample).grounding_attention_loss is not None
    AttentionSupervision().attach(model)  # inactive: the hooks are removed
    assert "grounding_attention_loss" not in model(**sample)
    model.model.language_model.set_attn_implementation("sdpa")
    supervision = AttentionSupervision(grounding_weight=1.0)
    supervision.attach(model)
    model.model.language_model.set_attn_implementation("sdpa")  # switched back behind its back
    with pytest.raises(ValueError, match="eager"):
        model(**sample)


@pytest.mark.parametrize("heads", [[], [4], [1, 1], [-1]])
def test_heads_and_layers_are_checked_against_the_model(heads):
    for name in ("grounding_heads", "region_heads"):
        with pytest.raises(ValueError, match=rf"`{name}`=.* distinct heads in \[0, 4\)"):
            supervised(grounding_weight=1.0, **{name: heads})
    with pytest.raises(ValueError, match="layers"):
        supervised(grounding_weight=1.0, layers=[2])  # the tiny LM has layers 0 and 1


# ---- two rows of region captions and other turns (the region term)

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


# ---- two turns: a referring answer (one trigger), then a grounded caption (two); `answer_start`

USER_2 = [30, 31]
TWO_TURNS = PROMPT + [20, TRIGGER, BOXES, 2] + USER_2 + ANSWER
TWO_TURN_BOXES = SAMPLE_BOXES[:1] + [[0.5, 0.5, 1.0, 1.0]] + SAMPLE_BOXES[1:]


def two_turn_sample():
    first_start = len(PROMPT)
    second_start = first_start + 4 + len(USER_2)
    labels = torch.tensor(TWO_TURNS)
    labels[:first_start] = -100
    labels[first_start + 4 : second_start] = -100
    labels[labels == BOXES] = -100
    sample = dict(input_ids=torch.tensor([TWO_TURNS]), labels=labels[None], box_inputs=torch.tensor([TWO_TURN_BOXES]),
                  pixel_values=images(1))
    return sample, first_start


def test_answer_start_queries_by_hand():
    """Only the turn with one trigger has its start asked: the position before its first answer token."""
    sample, first_start = two_turn_sample()
    triggers = torch.tensor([[0, i] for i, t in enumerate(TWO_TURNS) if t == TRIGGER])  # user's, then 3 answers'
    queries, alone = answer_start_queries(sample["input_ids"], sample["labels"], triggers, TRIGGER)
    assert queries.tolist() == [[0, first_start - 1]]
    assert alone.tolist() == [True, False, False]


def test_answer_start_adds_the_start_position_to_the_grounding_term():
    """Grounding term with `answer_start`: the three answer triggers and the first answer's start, each `−log` of the
    head-averaged mass on its box's patches, summed over the supervised layer and divided by the 3 answer boxes."""
    sample, first_start = two_turn_sample()
    out = supervised(grounding_weight=1.0, answer_start=True)(**sample)
    without = supervised(grounding_weight=1.0)(**sample).grounding_attention_loss
    patch_columns = [i for i, t in enumerate(TWO_TURNS) if t == IMAGE_PATCH]
    answer_triggers = [i for i, t in enumerate(TWO_TURNS) if t == TRIGGER and i >= len(PROMPT)]
    # 2x2 grid: box 1 [0.5, 0.5, 1, 1] holds patch 3; boxes 2 and 3 as in `grounding_sample`
    queries = list(zip(answer_triggers, [[3], [0, 2], [0]])) + [(first_start - 1, [3])]
    attention = out.attentions[1][0].mean(0)
    losses = [-torch.log(sum(attention[c, patch_columns[p]] for p in patches) + 1e-6) for c, patches in queries]
    torch.testing.assert_close(out.grounding_attention_loss, sum(losses) / 3)
    torch.testing.assert_close(without, sum(losses[:3]) / 3)
    with pytest.raises(ValueError, match="answer_start"):
        AttentionSupervision(grounding_weight=1.0, answer_start=1)


def test_caption_start_queries_by_hand():
    """Only the turn with two triggers has its start asked: the position before its first answer token; both of its
    triggers belong to that one query, the referring answer's trigger to none."""
    sample, first_start = two_turn_sample()
    second_start = first_start + 4 + len(USER_2)
    triggers = torch.tensor([[0, i] for i, t in enumerate(TWO_TURNS) if t == TRIGGER])
    queries, owner = caption_start_queries(sample["input_ids"], sample["labels"], triggers, TRIGGER)
    assert queries.tolist() == [[0, second_start - 1]]
    assert owner.tolist() == [-1, 0, 0]


def test_caption_start_adds_the_caption_start_on_the_union_of_its_boxes():
    """Grounding term with `caption_start` (and `answer_start`): the caption's start is one more query whose targets
    are the union of its two boxes' patches (0, 2 and 0: patches 0 and 2), divided by the 3 answer boxes."""
    sample, first_start = two_turn_sample()
    second_start = first_start + 4 + len(USER_2)
    out = supervised(grounding_weight=1.0, answer_start=True, caption_start=True)(**sample)
    patch_columns = [i for i, t in enumerate(TWO_TURNS) if t == IMAGE_PATCH]
    answer_triggers = [i for i, t in enumerate(TWO_TURNS) if t == TRIGGER and i >= len(PROMPT)]
    queries = list(zip(answer_triggers, [[3], [0, 2], [0]])) + [(first_start - 1, [3]), (second_start - 1, [0, 2])]
    attention = out.attentions[1][0].mean(0)
    losses = [-torch.log(sum(attention[c, patch_columns[p]] for p in patches) + 1e-6) for c, patches in queries]
    torch.testing.assert_close(out.grounding_attention_loss, sum(losses) / 3)
    with pytest.raises(ValueError, match="caption_start"):
        AttentionSupervision(grounding_weight=1.0, caption_start="yes")


def labels_of(row, assistant_spans):
    labels = torch.full((len(row),), -100)
    for start, end in assistant_spans:
        labels[start:end] = torch.tensor(row[start:end])
    labels[torch.tensor(row) == BOXES] = -100
    return labels


def region_batch():
    ids, attention = pad_rows([ROW_A, ROW_B], side="right")
    labels = torch.full_like(ids, -100)
    labels[0, : len(ROW_A)] = labels_of(ROW_A, ASSISTANT_A)
    labels[1, : len(ROW_B)] = labels_of(ROW_B, ASSISTANT_B)
    box_inputs, box_mask = pad_boxes([BOXES_A, BOXES_B])
    return dict(input_ids=ids, attention_mask=attention, labels=labels, box_inputs=box_inputs,
                box_inputs_mask=box_mask, pixel_values=images(2))


def test_region_caption_queries_by_hand():
    inputs = region_batch()
    queries, slots, weights = region_caption_queries(
        inputs["input_ids"], inputs["labels"], inputs["box_inputs_mask"], TRIGGER, BOXES
    )
    # row A: the positions that predict tokens 12, 13, 14 ("20 21 </s>"), box slot 0; row B: those that predict
    # 20, 21 ("26 </s>"), about the row's third box (slot 2)
    assert queries.tolist() == [[0, 11], [0, 12], [0, 13], [1, 19], [1, 20]]
    assert slots.tolist() == [[0, 0]] * 3 + [[1, 2]] * 2
    torch.testing.assert_close(weights, torch.tensor([1 / 3] * 3 + [1 / 2] * 2))
    # with the box token: each turn's user `<boxes>` (row A column 10, row B column 19) after them, at 1/2
    queries, slots, weights = region_caption_queries(
        inputs["input_ids"], inputs["labels"], inputs["box_inputs_mask"], TRIGGER, BOXES, box_token=True
    )
    assert queries.tolist() == [[0, 11], [0, 12], [0, 13], [1, 19], [1, 20], [0, 10], [1, 19]]
    assert slots.tolist() == [[0, 0]] * 3 + [[1, 2]] * 2 + [[0, 0], [1, 2]]
    torch.testing.assert_close(weights, torch.tensor([1 / 6] * 3 + [1 / 4] * 2 + [1 / 2] * 2))
    model = supervised(region_weight=1.0)
    assert count_loss_items(model, [inputs])["region_turns"] == 2
    assert count_loss_items(supervised(region_weight=1.0, region_box_token=True), [inputs])["region_turns"] == 2
    assert count_loss_items(tiny_model(sam=False), [inputs])["region_turns"] == 0  # not supervised: not counted


@pytest.mark.parametrize("heads", [None, [1, 3]])
def test_region_term_equals_reference(heads):
    """Mean over region-caption turns of the mean over their positions of −log(head-averaged attention mass on the
    patches inside the turn's box), in the supervised layers (the tiny LM's last), by hand."""
    inputs = region_batch()
    out = supervised(region_weight=0.5, region_heads=heads)(**inputs)
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
    torch.testing.assert_close(out.loss, plain()(**inputs).loss + 0.5 * reference)


def test_region_box_token_adds_the_user_box_at_half_the_turn():
    """`region_box_token`: each turn is half the mean over its positions and half its user `<boxes>` position's own
    `−log` mass on the box's patches, by hand."""
    inputs = region_batch()
    out = supervised(region_weight=1.0, region_heads=[3], region_box_token=True)(**inputs)
    turns = [(0, [11, 12, 13], 10, [0]), (1, [19, 20], 19, [3])]
    reference = 0.0
    for row, columns, box_column, patches in turns:
        patch_columns = [i for i, t in enumerate(inputs["input_ids"][row].tolist()) if t == IMAGE_PATCH]
        attention = out.attentions[1][row][3]

        def lost(column):
            return -torch.log(sum(attention[column, patch_columns[p]] for p in patches) + 1e-6)

        reference = reference + sum(lost(c) for c in columns) / len(columns) / 2 + lost(box_column) / 2
    torch.testing.assert_close(out.region_attention_loss, reference / len(turns))
    with pytest.raises(ValueError, match="region_box_token"):
        AttentionSupervision(region_weight=1.0, region_box_token="yes")


def test_both_terms_accumulate_exactly():
    """Two micro-batches (one region-caption turn each, different token counts) with the summed counts of
    `NextChatTrainer` give the gradient of the whole batch."""
    model = supervised(seed=2, grounding_weight=0.7, region_weight=1.0)
    model.train()
    full = region_batch()
    model(**full).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    micro = [{k: v[i : i + 1] for k, v in full.items()} for i in range(2)]
    total = count_loss_items(model, micro)
    assert total["region_turns"] == 2 and total["boxes"] == 2
    for m in micro:
        model(**m, num_items_in_batch=total).loss.backward()
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-4, msg=name)
