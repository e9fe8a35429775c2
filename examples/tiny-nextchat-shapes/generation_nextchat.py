"""Generation with trigger interception for NExT-Chat, on top of the stock `GenerationMixin.generate`.

No decoding loop is copied. Each forward leaves a `TriggerState` on the cache object: for every row, whether its
last position was a trigger `<at>` and the box decoded from the final-norm hidden state there. The next forward
feeds that box's `loc_encoder` embedding at its first position (the `<boxes>` slot). Beam search reorders the
state with the cache (`_reorder_cache`). Without a cache (`use_cache=False`) every step re-reads the whole sequence
and `forward(predict_generated_boxes=True)` predicts the boxes of the generated triggers again. A logits processor keeps the text well formed: `<boxes>` always follows
`<at>` and never appears elsewhere, and image tokens are never generated.

Boxes returned by `generate` come from the hidden state AT each trigger, as in training: recorded while decoding
for greedy search and sampling, and for beam search (whose finished hypotheses may come from beams that no
longer exist) by `locate`, a teacher-forced replay of the returned sequences cut right after every trigger.
"""

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicCache
from transformers.utils import ModelOutput


_STATE_ATTRIBUTE = "nextchat_trigger_state"
_PROMPT_ONLY_INPUTS = ("box_inputs", "box_inputs_mask", "pixel_values", "image_sizes")


class TriggerState:
    """What a forward leaves on its cache for the next call.

    Attributes:
        pending: `(B,)` bool, the last position of the previous call was a trigger.
        boxes: `(B, 4)` boxes decoded at that last position (meaningful where `pending`).
    """

    def __init__(self, pending: torch.Tensor, boxes: torch.Tensor):
        self.pending = pending
        self.boxes = boxes

    @staticmethod
    def from_cache(cache) -> "TriggerState | None":
        if cache is None or cache.get_seq_length() == 0:
            return None
        return getattr(cache, _STATE_ATTRIBUTE, None)

    @staticmethod
    def store(cache, pending: torch.Tensor, boxes: torch.Tensor):
        setattr(cache, _STATE_ATTRIBUTE, TriggerState(pending, boxes))

    def index_select(self, index: torch.Tensor) -> "TriggerState":
        index = index.to(self.pending.device)
        return TriggerState(self.pending.index_select(0, index), self.boxes.index_select(0, index))


class TriggerRecorder:
    """Keeps, per absolute position, the boxes and hidden states of the rows whose token there is a trigger.

    Used during greedy search and sampling, where rows never change places.
    """

    def __init__(self):
        self.entries = {}

    def record(self, position: int, pending: torch.Tensor, boxes: torch.Tensor, hidden: torch.Tensor):
        if bool(pending.any()):
            self.entries[position] = (pending, boxes.detach(), hidden.detach())

    def has(self, row: int, position: int) -> bool:
        return position in self.entries and bool(self.entries[position][0][row])

    def lookup(self, row: int, position: int):
        pending, boxes, hidden = self.entries[position]
        if not bool(pending[row]):
            raise RuntimeError(f"no trigger was recorded for row {row} at position {position}")
        return boxes[row], hidden[row]


class TriggerGrammarLogitsProcessor(LogitsProcessor):
    """Forces `<boxes>` right after `<at>`, forbids it anywhere else, and forbids the image tokens."""

    def __init__(self, trigger_token_id: int, box_token_id: int, image_token_ids: list[int]):
        self.trigger_token_id = trigger_token_id
        self.box_token_id = box_token_id
        self.banned = torch.tensor([box_token_id] + list(image_token_ids))  # built once, not at every step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        after_trigger = input_ids[:, -1] == self.trigger_token_id
        box_score = scores[:, self.box_token_id]
        scores = scores.index_fill(1, self.banned.to(scores.device), -float("inf"))
        if bool(after_trigger.any()):
            # `<boxes>` keeps its own score after a trigger, even where an earlier processor ruled it out (e.g. one
            # that forces EOS), so that the pair is never broken.
            forced = box_score[after_trigger]
            scores[after_trigger] = -float("inf")
            scores[after_trigger, self.box_token_id] = torch.where(torch.isneginf(forced), 0.0, forced)
        return scores


@dataclass
class NextChatGenerateOutput(ModelOutput):
    """
    Output of `NextChatForConditionalGeneration.generate(..., return_dict_in_generate=True)`.

    Args:
        sequences (`torch.LongTensor` of shape `(num_sequences, sequence_length)`): prompt and new tokens.
        prompt_length (`int`): number of prompt columns at the start of `sequences`.
        pred_boxes (`list[torch.FloatTensor]`): per returned sequence, `(n_i, 4)` normalised xyxy boxes (padded
            square frame), one per trigger of the answer in order: a prompt that ends with `<at>` contributes
            that trigger first, then every generated `<at>`.
        pred_masks (`list[torch.FloatTensor]`): per returned sequence, `(n_i, h, w)` SAM low-resolution mask
            logits over the padded SAM input, when `sam_pixel_values` was given.
        iou_scores (`list[torch.FloatTensor]`): per returned sequence, `(n_i,)` SAM's predicted IoUs.
        trigger_positions (`list[torch.LongTensor]`): per returned sequence, the `(n_i,)` columns of its triggers.
        sequences_scores, scores, logits, beam_indices, attentions, hidden_states, cache: as in transformers.
    """

    sequences: torch.LongTensor | None = None
    prompt_length: int | None = None
    pred_boxes: list[torch.FloatTensor] | None = None
    pred_masks: list[torch.FloatTensor] | None = None
    iou_scores: list[torch.FloatTensor] | None = None
    trigger_positions: list[torch.LongTensor] | None = None
    sequences_scores: torch.FloatTensor | None = None
    scores: tuple[torch.FloatTensor] | None = None
    logits: tuple[torch.FloatTensor] | None = None
    beam_indices: torch.LongTensor | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: object | None = None


class NextChatGenerationMixin:
    """Generation hooks of `NextChatForConditionalGeneration` (mixed in before `GenerationMixin`)."""

    _trigger_recorder: TriggerRecorder | None = None

    def _record_triggers(self, cache, pending, boxes, hidden):
        """Called by `forward` with the state of the last position; records it while `generate` asks for it."""
        TriggerState.store(cache, pending, boxes)
        if self._trigger_recorder is not None:
            position = cache.get_seq_length() - 1
            self._trigger_recorder.record(position, pending, boxes, hidden)

    def _record_last_position(self, cache, input_ids, hidden_states):
        """Called by `forward` when it returns a cache: whether each row's last position is a trigger, and its box."""
        last_is_trigger = input_ids[:, -1] == self.config.trigger_token_id
        last_hidden = hidden_states[:, -1]
        if bool(last_is_trigger.any()):
            last_boxes = self.decode_boxes(last_hidden)
        else:
            last_boxes = last_hidden.new_zeros((last_hidden.shape[0], 4))
        self._record_triggers(cache, last_is_trigger, last_boxes, last_hidden)

    def _reorder_cache(self, cache, beam_idx):
        """Reorders the key/value cache AND the trigger state with the beams (called by beam search)."""
        state = getattr(cache, _STATE_ATTRIBUTE, None)
        cache.reorder_cache(beam_idx)
        if state is not None:
            setattr(cache, _STATE_ATTRIBUTE, state.index_select(beam_idx))
        return cache

    def _predicted_box_inputs(self, input_ids, attention_mask, position_ids, cache, pixel_values, box_inputs,
                              box_inputs_mask):
        """`box_inputs` `(B, N + K, 4)` and mask extended, per row, with the boxes predicted at the triggers before the
        `<boxes>` tokens that the given boxes do not fill (K at most per row). Without a cache each prediction needs
        the ones before it, so the language model runs K times here (once per generated trigger of the longest
        row), each pass making one more box exact."""
        config = self.config
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("`predict_generated_boxes` works on whole sequences; with a cache the boxes travel on it")
        box_tokens = input_ids == config.box_token_id
        rows = input_ids.shape[0]
        given = (box_inputs_mask.bool().sum(1) if box_inputs is not None else input_ids.new_zeros(rows)).to(
            input_ids.device
        )
        generated = box_tokens & ((box_tokens.long().cumsum(1) - 1) >= given[:, None])
        if not bool(generated.any()):
            return box_inputs, box_inputs_mask
        after_trigger = torch.zeros_like(generated)
        after_trigger[:, 1:] = input_ids[:, :-1] == config.trigger_token_id
        if bool((generated & ~after_trigger).any()):
            raise ValueError("a `<boxes>` token without a box in `box_inputs` must follow a `<at>` to be predicted")
        given_width = box_inputs.shape[1] if box_inputs is not None else 0
        rank = generated.long().cumsum(1) - 1
        rows_at, columns_at = torch.nonzero(generated, as_tuple=True)
        slots = given_width + rank[rows_at, columns_at]
        width = given_width + int(generated.sum(1).max())
        dtype = box_inputs.dtype if box_inputs is not None else torch.float32
        boxes = torch.zeros((rows, width, 4), dtype=dtype, device=input_ids.device)
        mask = torch.zeros((rows, width), dtype=torch.bool, device=input_ids.device)
        if box_inputs is not None:
            boxes[:, :given_width] = box_inputs.to(boxes.device)
            mask[:, :given_width] = box_inputs_mask.bool().to(mask.device)
        mask[rows_at, slots] = True
        for _ in range(int(generated.sum(1).max())):
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                pixel_values=pixel_values, box_inputs=boxes, box_inputs_mask=mask, use_cache=False,
                return_dict=True,
            ).last_hidden_state
            boxes = boxes.clone()
            boxes[rows_at, slots] = self.decode_boxes(hidden[rows_at, columns_at - 1]).to(boxes.dtype)
        return boxes, mask

    def prepare_inputs_for_generation(self, *args, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for name in _PROMPT_ONLY_INPUTS:
                model_inputs.pop(name, None)
        return model_inputs

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        box_inputs: torch.FloatTensor | None = None,
        box_inputs_mask: torch.BoolTensor | None = None,
        sam_pixel_values: torch.FloatTensor | None = None,
        generation_config=None,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate` with trigger interception.

        Takes the inputs of `forward` (`sam_pixel_values` is used after decoding, once per image). With
        `return_dict_in_generate=True` returns a `NextChatGenerateOutput` carrying `pred_boxes` (and `pred_masks`,
        `iou_scores` with SAM inputs) per returned sequence; otherwise the sequences tensor, as usual. A right-padded
        batch is left-aligned first (the prompts in the returned `sequences` are then padded on the left).
        """
        if input_ids is None:
            raise ValueError("`input_ids` are required: NExT-Chat finds its image and box slots by token id")
        for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "inputs_embeds"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"`{name}` is not supported by NExT-Chat generation: the box fed after each trigger depends on "
                    "the hidden state of the previous step, which assisted decoding and embedding inputs bypass"
                )
        gen_config = generation_config if generation_config is not None else self.generation_config
        if not kwargs.get("use_cache", gen_config.use_cache):
            # No cache to carry each predicted box to the next step: every step re-reads the whole sequence and
            # predicts the boxes of its generated triggers again.
            kwargs["predict_generated_boxes"] = True
        if sam_pixel_values is not None and self.sam is None:
            raise ValueError("`sam_pixel_values` were given but this model has no SAM (`config.sam_config` is None)")

        config = self.config
        grammar = TriggerGrammarLogitsProcessor(
            config.trigger_token_id,
            config.box_token_id,
            [config.image_token_id, config.image_start_token_id, config.image_end_token_id],
        )
        logits_processor = LogitsProcessorList(list(logits_processor or []) + [grammar])

        num_beams = kwargs.get("num_beams", gen_config.num_beams) or 1
        return_dict = kwargs.get("return_dict_in_generate", gen_config.return_dict_in_generate)
        recorder = TriggerRecorder() if (return_dict and num_beams == 1) else None
        if pixel_values is not None:
            _check_one_image_per_row(input_ids, config, kwargs, num_beams)
        input_ids, attention_mask = _left_align(input_ids, attention_mask, kwargs)

        self._trigger_recorder = recorder
        try:
            output = super().generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                box_inputs=box_inputs,
                box_inputs_mask=box_inputs_mask,
                generation_config=generation_config,
                logits_processor=logits_processor,
                **kwargs,
            )
        finally:
            self._trigger_recorder = None
        if not isinstance(output, ModelOutput):
            return output

        sequences = output.sequences
        prompt_length = input_ids.shape[1]
        expand = sequences.shape[0] // input_ids.shape[0]
        trigger_columns = []
        for row in range(sequences.shape[0]):
            columns = torch.nonzero(sequences[row, prompt_length - 1 :] == config.trigger_token_id).flatten()
            trigger_columns.append(columns + prompt_length - 1)

        if recorder is not None and all(recorder.has(r, int(c)) for r, cs in enumerate(trigger_columns) for c in cs):
            boxes, hidden = _gather_recorded(recorder, trigger_columns, sequences, self.config.text_config.hidden_size)
        else:  # beam search, or a trigger as the very last token (never fed back): replay the sequences
            rows = torch.arange(sequences.shape[0], device=sequences.device) // expand
            boxes, hidden = self.locate(
                sequences,
                attention_mask=_extend_mask(attention_mask, sequences, prompt_length, rows),
                pixel_values=_expand_images(pixel_values, expand),
                box_inputs=box_inputs[rows] if box_inputs is not None else None,
                box_inputs_mask=box_inputs_mask[rows] if box_inputs_mask is not None else None,
                prompt_length=prompt_length,
                trigger_columns=trigger_columns,
            )

        pred_masks = iou_scores = None
        counts = [len(columns) for columns in trigger_columns]
        if sam_pixel_values is not None and sum(counts):
            image_index = torch.repeat_interleave(
                torch.arange(len(counts), device=sequences.device) // expand,
                torch.tensor(counts, device=sequences.device),
            )
            flat_masks, flat_scores = self.predict_masks(
                sam_pixel_values, torch.cat(hidden), torch.cat(boxes), image_index
            )
            pred_masks = list(flat_masks.split(counts))
            iou_scores = list(flat_scores.split(counts))
        elif sam_pixel_values is not None:
            size = 4 * self.sam.image_embedding_size
            pred_masks = [sequences.new_zeros((0, size, size), dtype=torch.float32) for _ in counts]
            iou_scores = [sequences.new_zeros((0,), dtype=torch.float32) for _ in counts]

        return NextChatGenerateOutput(
            sequences=sequences,
            prompt_length=prompt_length,
            pred_boxes=boxes,
            pred_masks=pred_masks,
            iou_scores=iou_scores,
            trigger_positions=trigger_columns,
            sequences_scores=getattr(output, "sequences_scores", None),
            scores=output.scores,
            logits=output.logits,
            beam_indices=getattr(output, "beam_indices", None),
            attentions=output.attentions,
            hidden_states=output.hidden_states,
            cache=output.cache,
        )

    @torch.no_grad()
    def locate(
        self,
        sequences: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        box_inputs: torch.FloatTensor | None = None,
        box_inputs_mask: torch.BoolTensor | None = None,
        prompt_length: int | None = None,
        trigger_columns: list[torch.LongTensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Boxes and hidden states at the triggers of generated sequences, by teacher-forced replay.

        The prompt (`sequences[:, :prompt_length]`, with its user boxes) runs in one chunk; the rest is cut right
        after every column that holds a trigger in any row, so that each `<boxes>` that follows a generated trigger
        is fed the box predicted at that trigger, exactly as during generation. One full forward in total.

        Returns:
            per row, the boxes `(n_i, 4)` and final-norm hidden states `(n_i, hidden_size)` at `trigger_columns`
            (default: every trigger from column `prompt_length - 1` on).
        """
        prompt_length = sequences.shape[1] if prompt_length is None else prompt_length
        trigger = self.config.trigger_token_id
        if trigger_columns is None:
            trigger_columns = [
                torch.nonzero(row[prompt_length - 1 :] == trigger).flatten() + prompt_length - 1 for row in sequences
            ]
        if attention_mask is None:
            attention_mask = torch.ones_like(sequences)
        cuts = torch.nonzero((sequences[:, prompt_length:] == trigger).any(0)).flatten() + prompt_length + 1
        bounds = [0, prompt_length] + [c for c in cuts.tolist() if c < sequences.shape[1]] + [sequences.shape[1]]
        bounds = sorted(set(bounds))
        cache = DynamicCache(config=self.config.text_config)
        hidden_by_column = {}
        for start, end in zip(bounds[:-1], bounds[1:]):
            first = start == 0
            outputs = self.model(
                input_ids=sequences[:, start:end],
                attention_mask=attention_mask[:, :end],
                position_ids=(attention_mask[:, :end].long().cumsum(-1) - 1).clamp(min=0)[:, start:end],
                cache=cache,
                pixel_values=pixel_values if first else None,
                box_inputs=box_inputs if first else None,
                box_inputs_mask=box_inputs_mask if first else None,
                use_cache=True,
                return_dict=True,
            )
            last = outputs.last_hidden_state[:, -1]
            TriggerState.store(cache, sequences[:, end - 1] == trigger, self.decode_boxes(last))
            hidden_by_column[end - 1] = last
            for column in range(start, end - 1):
                hidden_by_column.setdefault(column, outputs.last_hidden_state[:, column - start])
        hidden = [
            torch.stack([hidden_by_column[int(c)][row] for c in columns]) if len(columns) else
            sequences.new_zeros((0, self.config.text_config.hidden_size), dtype=self.dtype)
            for row, columns in enumerate(trigger_columns)
        ]
        boxes = [self.decode_boxes(h) for h in hidden]
        return boxes, hidden


def _gather_recorded(recorder, trigger_columns, sequences, hidden_size):
    boxes, hidden = [], []
    for row, columns in enumerate(trigger_columns):
        entries = [recorder.lookup(row, int(c)) for c in columns]
        if entries:
            boxes.append(torch.stack([e[0] for e in entries]))
            hidden.append(torch.stack([e[1] for e in entries]))
        else:
            boxes.append(sequences.new_zeros((0, 4), dtype=torch.float32))
            hidden.append(sequences.new_zeros((0, hidden_size), dtype=torch.float32))
    return boxes, hidden


def _left_align(input_ids, attention_mask, kwargs):
    """Decoder-only generation continues each row after its last column, so a right-padded batch (e.g. from a
    tokenizer whose `padding_side` is "right", as transformers' pipelines < 5.25 collate it) is moved to the left
    first: each row is rolled by its number of trailing padding columns, with its (B, T) companions in `kwargs`.
    Box and image inputs are indexed by slot, not by column, and stay as they are."""
    if attention_mask is None or attention_mask.ndim != 2 or attention_mask.shape != input_ids.shape:
        return input_ids, attention_mask
    present = attention_mask != 0
    if bool(present[:, -1].all()) or not bool(present.any(dim=1).all()):
        return input_ids, attention_mask
    shifts = present.flip(1).int().argmax(dim=1).tolist()  # trailing padding columns of each row

    def roll(tensor):
        return torch.stack([torch.roll(row, shift, dims=0) for row, shift in zip(tensor, shifts)])

    for name in ("position_ids", "token_type_ids", "mm_token_type_ids"):
        value = kwargs.get(name)
        if torch.is_tensor(value) and value.shape == input_ids.shape:
            kwargs[name] = roll(value)
    return roll(input_ids), roll(attention_mask)


def _extend_mask(attention_mask, sequences, prompt_length, rows):
    if attention_mask is None:
        return None
    generated = sequences.new_ones((sequences.shape[0], sequences.shape[1] - prompt_length))
    return torch.cat([attention_mask[rows].to(generated.dtype), generated], dim=1)


def _expand_images(pixel_values, expand):
    """Images in the order transformers expands rows (one image per row, see `_check_one_image_per_row`)."""
    if pixel_values is None or expand == 1:
        return pixel_values
    return pixel_values.repeat_interleave(expand, dim=0)


def _check_one_image_per_row(input_ids, config, kwargs, num_beams):
    expand = max(num_beams, kwargs.get("num_return_sequences", 1) or 1)
    if expand == 1:
        return
    per_row = (input_ids == config.image_token_id).sum(1) // config.image_seq_length
    if bool((per_row > 1).any()):
        raise ValueError(
            "rows with several images cannot be expanded for beams or `num_return_sequences` (transformers repeats "
            "`pixel_values` image by image, not row by row); use one image per row"
        )
