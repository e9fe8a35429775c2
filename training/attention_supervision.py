"""Attention supervision: two training-only loss terms (not in the original NExT-Chat) that help a model trained
from scratch learn where to look.

* grounding term: `−log` of the attention mass that each answer trigger `<at>` puts on the image patches inside
  its target box (averaged over the supervised heads and layers). It teaches the trigger to look at the object it
  names, which a from-scratch model otherwise learns last. With `answer_start`, the position that starts a
  referring answer is asked the same, so that the answer's first words can depend on the image; with
  `caption_start`, the position that starts a grounded caption is asked to attend to the union of its boxes.
* region term: every position that predicts a token of a region-caption turn (an assistant turn without a
  labelled `<at>`, after a user turn that gives exactly one box) is asked, like a trigger, to attend to that box's
  patches; each turn counts once (its positions averaged; the term is the mean over such turns). With
  `region_box_token`, the user's `<boxes>` token that gives the box is asked too, as half of its turn.

They are a training objective wrapped around the model, not part of it: :meth:`AttentionSupervision.attach`
switches the language model to eager attention (the only one that returns attention probabilities) and adds the
weighted terms to the `loss` of every forward call that has `labels`, as `grounding_attention_loss` and
`region_attention_loss` in its output. `NextChatTrainer` logs them and counts their items over accumulated
micro-batches. The shapes recipe (`training/configs/shapes_tiny.json`, "attention_supervision") uses them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..loss_nextchat import (
    IGNORE_INDEX,
    answer_box_positions,
    assistant_box_slots,
    count_loss_items,
    normalisers,
    slot_of_ordinal,
)


ATTENTION_LOSS_TERMS = ("grounding_attention_loss", "region_attention_loss")


def box_patch_targets(boxes: torch.Tensor, grid_size: int) -> torch.Tensor:
    """`(K, grid_size²)` bool, row-major over the patch grid: the patches whose centre lies inside each normalised
    xyxy box, plus the patch holding the box's centre (so that a box smaller than a patch still has one)."""
    centres = (torch.arange(grid_size, device=boxes.device, dtype=boxes.dtype) + 0.5) / grid_size
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    cx, cy = cx.flatten(), cy.flatten()
    inside = (cx >= boxes[:, 0:1]) & (cx <= boxes[:, 2:3]) & (cy >= boxes[:, 1:2]) & (cy <= boxes[:, 3:4])
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


def assistant_turns(input_ids, labels, trigger_token_id):
    """`(labelled, starts, turn)`, each `(B, L)`: the positions of assistant turns (labelled tokens, and an answer's
    own `<boxes>`, unlabelled right after its labelled trigger), the first position of each turn, and the turn of
    every position (labelled: its turn, 1-based; unlabelled: the turn before it, 0 if none)."""
    labelled = (labels != IGNORE_INDEX) | answer_box_positions(input_ids, labels, trigger_token_id)
    starts = labelled & ~F.pad(labelled[:, :-1], (1, 0), value=False)
    return labelled, starts, starts.long().cumsum(1)


def region_caption_queries(input_ids, labels, box_inputs_mask, trigger_token_id, box_token_id, box_token=False):
    """The positions that predict the tokens of each region-caption turn — an assistant (labelled) turn without a
    labelled `<at>` whose preceding user turn gives exactly one `<boxes>` — as `(Q, 2)` (row, column), the
    `(Q, 2)` (row, slot) of that box in `box_inputs`, and `(Q,)` weights that sum to 1 over each turn.

    With `box_token`, the user's `<boxes>` of each such turn is one more query (after all the others), weighted
    1/2, and the turn's own positions share the other 1/2."""
    labelled, _, turn = assistant_turns(input_ids, labels, trigger_token_id)
    batch, length = input_ids.shape
    num_turns = int(turn.max()) + 2 if length else 2
    given = (input_ids == box_token_id) & ~labelled
    rows = torch.arange(batch, device=input_ids.device)[:, None].expand(batch, length)
    # a given box belongs to the assistant turn that follows it
    given_count = torch.zeros(batch, num_turns, dtype=torch.long, device=input_ids.device)
    given_count.index_put_((rows[given], turn[given] + 1), torch.ones_like(turn[given]), accumulate=True)
    grounds = torch.zeros_like(given_count)
    answer_trigger = (input_ids == trigger_token_id) & labelled
    grounds.index_put_((rows[answer_trigger], turn[answer_trigger]), torch.ones_like(turn[answer_trigger]),
                       accumulate=True)
    ordinal = (input_ids == box_token_id).long().cumsum(1) - 1
    box_ordinal = torch.zeros_like(given_count)
    box_ordinal[rows[given], turn[given] + 1] = ordinal[given]
    box_column = torch.zeros_like(given_count)
    box_column[rows[given], turn[given] + 1] = torch.nonzero(given, as_tuple=True)[1]
    qualifies = (given_count == 1) & (grounds == 0)
    predicted = (labels != IGNORE_INDEX) & qualifies.gather(1, turn)  # label positions of qualifying turns
    predicted[:, 0] = False  # position 0 cannot be predicted
    q_rows, q_cols = torch.nonzero(predicted, as_tuple=True)
    q_turns = turn[q_rows, q_cols]
    size = torch.zeros_like(given_count)
    size.index_put_((q_rows, q_turns), torch.ones_like(q_turns), accumulate=True)
    weights = 1.0 / size[q_rows, q_turns].float()
    slot_table = slot_of_ordinal(box_inputs_mask)
    slots = slot_table[q_rows, box_ordinal[q_rows, q_turns]]
    queries, slots = torch.stack([q_rows, q_cols - 1], 1), torch.stack([q_rows, slots], 1)
    if box_token:
        t_rows, t_turns = torch.nonzero(size, as_tuple=True)  # the turns that have positions, row-major
        box_slots = slot_table[t_rows, box_ordinal[t_rows, t_turns]]
        queries = torch.cat([queries, torch.stack([t_rows, box_column[t_rows, t_turns]], 1)])
        slots = torch.cat([slots, torch.stack([t_rows, box_slots], 1)])
        weights = torch.cat([weights / 2, weights.new_full((len(t_rows),), 0.5)])
    return queries, slots, weights


def _answer_trigger_turns(input_ids, labels, trigger_positions, trigger_token_id):
    """For the labelled triggers of `trigger_positions`: their `(T,)` rows, their turns, how many labelled triggers
    each one's turn has, and the position that predicts the first token of each one's turn."""
    _, starts, turn = assistant_turns(input_ids, labels, trigger_token_id)
    num_turns = int(turn.max()) + 1 if turn.numel() else 1
    rows, columns = trigger_positions[:, 0], trigger_positions[:, 1]
    assistant = labels[rows, columns] != IGNORE_INDEX
    rows, columns = rows[assistant], columns[assistant]
    turns = turn[rows, columns]
    per_turn = torch.zeros(input_ids.shape[0], num_turns, dtype=torch.long, device=input_ids.device)
    per_turn.index_put_((rows, turns), torch.ones_like(turns), accumulate=True)
    start_rows, start_columns = torch.nonzero(starts, as_tuple=True)
    first_column = torch.zeros_like(per_turn)
    first_column[start_rows, turn[start_rows, start_columns]] = start_columns
    return rows, turns, per_turn[rows, turns], first_column[rows, turns] - 1


def answer_start_queries(input_ids, labels, trigger_positions, trigger_token_id):
    """The position that predicts the first token of each assistant turn with exactly one labelled `<at>` (a
    referring answer: "The red circle <at>."), as `(K, 2)` (row, column), and the `(T,)` bool over the labelled
    triggers of `trigger_positions` (in their order) that marks the triggers alone in their turn, whose boxes are
    those K positions' targets."""
    rows, _, count, start = _answer_trigger_turns(input_ids, labels, trigger_positions, trigger_token_id)
    alone = count == 1
    return torch.stack([rows[alone], start[alone]], 1), alone


def caption_start_queries(input_ids, labels, trigger_positions, trigger_token_id):
    """The position that predicts the first token of each assistant turn with two or more labelled `<at>` (a
    grounded caption: "There are two objects: a red circle <at> and ..."), as `(M, 2)` (row, column), and the `(T,)`
    long over the labelled triggers of `trigger_positions` (in their order) giving the query of each trigger's turn
    (-1 for a trigger alone in its turn): each query's target is the union of its triggers' boxes."""
    rows, turns, count, start = _answer_trigger_turns(input_ids, labels, trigger_positions, trigger_token_id)
    several = count >= 2
    keys = torch.stack([rows[several], turns[several]], 1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    owner = torch.full_like(rows, -1)
    owner[several] = inverse
    queries = torch.zeros(len(unique), 2, dtype=torch.long, device=input_ids.device)
    queries[inverse] = torch.stack([rows[several], start[several]], 1)
    return queries, owner


def _check_heads(name, heads, count):
    if heads is not None and (not heads or any(not 0 <= h < count for h in heads) or len(set(heads)) < len(heads)):
        raise ValueError(f"`{name}`={heads!r} must be a non-empty list of distinct heads in [0, {count})")


@dataclass
class AttentionSupervision:
    """The two attention terms, their weights and which attention they supervise.

    Args:
        grounding_weight: weight of the grounding term (0: off).
        region_weight: weight of the region-caption term (0: off).
        layers: language-model layers supervised (negative indices count from the end); `None`: every layer but
            the first, whose trigger query cannot depend on the phrase yet.
        grounding_heads, region_heads: the heads whose attention mass each term supervises; `None`: all heads.
            Disjoint lists let the two kinds of lookup (by name and by position) use their own heads.
        per_head: how heads combine: `False`, `−log` of the head-averaged mass; `True`, the mean over heads of each
            head's `−log` mass, so that every supervised head must find the box.
        answer_start: the grounding term also asks the position that starts a referring answer (an assistant turn
            with one `<at>`) to look at that trigger's box, so that the answer's first words — its object's name,
            or "There is no ..." when the object is absent — can depend on what is in the image (each such
            position counts like one more trigger).
        caption_start: the grounding term also asks the position that starts a grounded caption (an assistant turn
            with two or more `<at>`) to look at the union of its boxes, so that the caption's first words ("There
            are three objects:") can depend on what is in the image, whatever the question's wording (each such
            position counts like one more trigger).
        region_box_token: the region term also asks the user's `<boxes>` of each region-caption turn (whose input
            is the box's own embedding) to attend to that box's patches, half of the turn's weight: the heads can
            learn to find a box by its position before an earlier layer has copied the box to the caption's
            positions.
    """

    grounding_weight: float = 0.0
    region_weight: float = 0.0
    layers: list[int] | None = None
    grounding_heads: list[int] | None = None
    region_heads: list[int] | None = None
    per_head: bool = False
    answer_start: bool = False
    caption_start: bool = False
    region_box_token: bool = False

    def __post_init__(self):
        for name in ("per_head", "answer_start", "caption_start", "region_box_token"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        for name in ("grounding_weight", "region_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"`{name}` must be a number >= 0, got {value!r}")

    @property
    def active(self) -> bool:
        return bool(self.grounding_weight or self.region_weight)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self, config):
        """Raises a `ValueError` naming the field when heads or layers do not exist in `config.text_config`."""
        text = config.text_config
        _check_heads("grounding_heads", self.grounding_heads, text.num_attention_heads)
        _check_heads("region_heads", self.region_heads, text.num_attention_heads)
        if self.layers is not None:
            count = text.num_hidden_layers
            if not self.layers or any(not -count <= i < count for i in self.layers):
                raise ValueError(
                    f"`layers`={self.layers!r} must be a non-empty list of layer indices of the language model "
                    f"({count} layers: -{count}..{count - 1})"
                )

    def attach(self, model):
        """Adds the terms to `model`'s training loss (a `NextChatForConditionalGeneration`, before any PEFT wrapping)
        and switches its language model to eager attention. Returns `model`; `model.attention_supervision` is
        `self` (what `NextChatTrainer` reads to count the region turns of accumulated batches)."""
        self.check(model.config)
        handles = getattr(model, "_attention_supervision_handles", None)
        if handles:
            for handle in handles:
                handle.remove()
        model.attention_supervision = self
        if not self.active:
            model._attention_supervision_handles = []
            return model
        model.model.language_model.set_attn_implementation("eager")
        model._attention_supervision_handles = [
            model.register_forward_pre_hook(self._ask_for_attentions, with_kwargs=True),
            model.register_forward_hook(self._add_terms, with_kwargs=True),
        ]
        return model

    def count_items(self, config, input_ids, labels, box_inputs_mask) -> dict:
        """`{"region_turns": n}` of one micro-batch (0 while the region term is off)."""
        if not self.region_weight or box_inputs_mask is None or not bool(box_inputs_mask.any()):
            return {"region_turns": 0}
        _, _, weights = region_caption_queries(input_ids, labels, box_inputs_mask, config.trigger_token_id,
                                               config.box_token_id, self.region_box_token)
        return {"region_turns": round(float(weights.sum()))}

    # ---- forward hooks

    @staticmethod
    def _ask_for_attentions(module, args, kwargs):
        if kwargs.get("labels") is not None:
            kwargs["output_attentions"] = True
        return args, kwargs

    def _add_terms(self, module, args, kwargs, output):
        labels = kwargs.get("labels")
        if labels is None or output.loss is None:
            return output
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        terms = self.terms(module.config, output, input_ids, labels, kwargs.get("box_inputs"),
                           kwargs.get("box_inputs_mask"), kwargs.get("num_items_in_batch"),
                           kwargs.get("shift_labels"))
        loss = output.loss
        for name, weight in (("grounding_attention_loss", self.grounding_weight),
                             ("region_attention_loss", self.region_weight)):
            if name in terms:
                output[name] = terms[name]
                loss = loss + weight * terms[name]
        output["loss"] = loss
        return output

    def terms(self, config, output, input_ids, labels, box_inputs, box_inputs_mask, num_items_in_batch=None,
              shift_labels=None) -> dict:
        """The unweighted terms that apply to one forward call, `{name: scalar}`, each normalised by its items in
        the accumulated batch (`num_items_in_batch` as the model takes it)."""
        if box_inputs is not None and box_inputs_mask is None:
            box_inputs_mask = torch.ones(box_inputs.shape[:2], dtype=torch.bool, device=box_inputs.device)
        local = count_loss_items(input_ids, labels, box_inputs_mask, None, config.trigger_token_id,
                                 config.box_token_id, shift_labels=shift_labels)
        region = None  # the region-caption queries, found once for both their count and their term
        if self.region_weight and box_inputs_mask is not None and bool(box_inputs_mask.any()):
            region = region_caption_queries(input_ids, labels, box_inputs_mask, config.trigger_token_id,
                                            config.box_token_id, self.region_box_token)
        local["region_turns"] = round(float(region[2].sum())) if region is not None else 0
        divisors = normalisers(local, num_items_in_batch)
        grid_size = math.isqrt(config.image_seq_length)
        terms = {}
        triggers = output.trigger_positions
        assistant = labels[triggers[:, 0], triggers[:, 1]] != IGNORE_INDEX
        if self.grounding_weight and bool(assistant.any()):
            slots = assistant_box_slots(input_ids, labels, box_inputs_mask, config.trigger_token_id,
                                        config.box_token_id, box_inputs=box_inputs)
            queries = triggers[assistant]
            trigger_targets = box_patch_targets(box_inputs[slots[:, 0], slots[:, 1]].float(), grid_size)
            targets = trigger_targets
            if self.answer_start:  # each referring answer's start looks for its trigger's box too
                starts, alone = answer_start_queries(input_ids, labels, triggers, config.trigger_token_id)
                queries, targets = torch.cat([queries, starts]), torch.cat([targets, trigger_targets[alone]])
            if self.caption_start:  # each grounded caption's start looks at all of its boxes
                starts, owner = caption_start_queries(input_ids, labels, triggers, config.trigger_token_id)
                member = owner >= 0
                union = torch.zeros(len(starts), trigger_targets.shape[1], device=trigger_targets.device)
                union.index_add_(0, owner[member], trigger_targets[member].float())
                queries, targets = torch.cat([queries, starts]), torch.cat([targets, union > 0])
            per_query, _ = self._attention_mass_loss(config, output, input_ids, queries, targets,
                                                     self.grounding_heads)
            terms["grounding_attention_loss"] = per_query.sum() / divisors["boxes"]
        if region is not None and box_inputs is not None:
            queries, slots, turn_weights = region
            if queries.shape[0]:
                targets = box_patch_targets(box_inputs[slots[:, 0], slots[:, 1]].float(), grid_size)
                per_query, usable = self._attention_mass_loss(config, output, input_ids, queries, targets,
                                                              self.region_heads)
                terms["region_attention_loss"] = (per_query * turn_weights[usable]).sum() / divisors["region_turns"]
        return terms

    def _attention_mass_loss(self, config, output, input_ids, queries, target_patches, heads=None):
        """`(K',)` `per_query_attention_loss` of the `(K, 2)` (row, column) `queries` over their `(K, P)` bool target
        patches (row-major over the patch grid), averaged over the supervised layers, and the `(K,)` bool of the
        queries kept: a query counts only in a row with one image block before it, whose patches its targets are."""
        attentions = output.attentions
        if not attentions or any(attention is None for attention in attentions):
            raise ValueError(
                "attention supervision needs attention probabilities, which only eager attention returns: attach it "
                "with `AttentionSupervision.attach(model)`, which switches the language model to eager attention"
            )
        num_layers = len(attentions)
        layers = self.layers or list(range(1, num_layers)) or [0]
        num_patches = config.image_seq_length
        is_patch = input_ids == config.image_token_id
        # column of each image patch of a row, in row-major patch order (a stable sort keeps the token order)
        patch_columns = torch.sort(is_patch.to(torch.uint8), dim=1, descending=True, stable=True).indices
        patch_columns = patch_columns[:, :num_patches]
        rows, columns = queries[:, 0], queries[:, 1]
        usable = (is_patch.sum(1)[rows] == num_patches) & (patch_columns[rows, -1] < columns)
        rows, columns, target_patches = rows[usable], columns[usable], target_patches[usable]
        patch_columns = patch_columns[rows]
        per_layer = []
        for layer in layers:
            query_rows = attentions[layer][rows, :, columns]  # (K, heads, seq_len)
            if heads is not None:
                query_rows = query_rows[:, list(heads)]
            index = patch_columns[:, None, :].expand(-1, query_rows.shape[1], -1).to(query_rows.device)
            per_layer.append(torch.gather(query_rows, 2, index))
        per_query = per_query_attention_loss(torch.stack(per_layer), target_patches.to(per_layer[0].device),
                                             per_head=self.per_head)
        return per_query / len(layers), usable


__all__ = ["ATTENTION_LOSS_TERMS", "AttentionSupervision", "answer_start_queries", "box_patch_targets",
           "caption_start_queries", "per_query_attention_loss", "region_caption_queries"]
