"""Post-processing of NExT-Chat's generations: generated ids -> clean text and grounded entities (the phrase each
``<at> <boxes>`` grounds, its box in original pixels, its mask at the original resolution, a score)."""

import re

import numpy as np
import torch

from .geometry_nextchat import boxes_from_prediction, masks_from_sam_frame


DETERMINERS = frozenset(
    "a an the this that these those his her its their our my your some each every both another one two three "
    "four five six seven eight nine ten several many".split()
)
SPAN_BOUNDARY = ".,;:!?\n()\""
NO_SPACE_BEFORE = ".,;:!?)]}'%"


def get_field(obj, key):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    value = getattr(obj, key, None)
    if value is None and hasattr(obj, "__getitem__") and not torch.is_tensor(obj):
        try:
            value = obj[key]
        except (KeyError, TypeError, IndexError):
            value = None
    return value


def to_list_of_ids(sequences) -> list[list[int]]:
    if torch.is_tensor(sequences):
        if sequences.ndim == 1:
            sequences = sequences[None]
        return sequences.detach().to("cpu").tolist()
    if isinstance(sequences, np.ndarray):
        if sequences.ndim == 1:
            sequences = sequences[None]
        return sequences.tolist()
    sequences = list(sequences)
    if sequences and isinstance(sequences[0], (int, np.integer)):
        return [[int(t) for t in sequences]]
    return [[int(t) for t in (s.tolist() if hasattr(s, "tolist") else s)] for s in sequences]


def decode_segments(proc, ids: list[int], skip_special_tokens: bool = True):
    """Split generated ids at the control tokens of ``proc`` (a ``NextChatProcessor``) -> (clean text, trigger
    char positions): one space between words, none before punctuation, the ``<at> <boxes>`` pairs removed."""
    trigger, box = proc.trigger_token_id, proc.box_token_id
    dropped = {proc.image_token_id, proc.image_start_token_id, proc.image_end_token_id, box}
    segments: list[list[int]] = [[]]
    for t in ids:
        if t == trigger:
            segments.append([])
        elif t in dropped:
            continue
        else:
            segments[-1].append(t)
    texts = [proc.tokenizer.decode(seg, skip_special_tokens=skip_special_tokens) if seg else "" for seg in segments]
    clean = ""
    positions = []
    for k, piece in enumerate(texts):
        piece = piece.strip() if k > 0 else piece.rstrip()
        if k > 0:
            positions.append(len(clean.rstrip()))
            clean = clean.rstrip()
        if piece:
            if clean and piece[0] not in NO_SPACE_BEFORE:
                clean += " "
            clean += piece
    return clean, positions


def phrase_span(clean: str, pos: int, previous_end: int) -> tuple[int, int]:
    """The grounded phrase that ends at ``pos``: from the first determiner or number word after the previous
    boundary (``previous_end`` or one of ``.,;:!?()"`` and newline), else from that boundary."""
    region_start = previous_end
    for i in range(pos - 1, previous_end - 1, -1):
        if clean[i] in SPAN_BOUNDARY:
            region_start = i + 1
            break
    region = clean[region_start:pos]
    for match in re.finditer(r"[A-Za-z]+", region):
        if match.group(0).lower() in DETERMINERS and (match.start() == 0 or not region[match.start() - 1].isalnum()):
            return region_start + match.start(), pos
    stripped = len(region) - len(region.lstrip())
    return region_start + stripped, pos


def post_process_generation(
    proc, generate_output, image_sizes=None, prompt_length=None, mask_threshold=0.0, skip_special_tokens=True
) -> list[dict]:
    """``NextChatProcessor.post_process_generation`` for ``proc`` (see there): per returned sequence the clean
    text and its grounded entities (phrase, span, box in pixels, mask at the original resolution, score)."""
    if torch.is_tensor(generate_output) or isinstance(generate_output, (np.ndarray, list)):
        sequences = generate_output
        pred_boxes = pred_masks = iou_scores = scores = None
    else:
        sequences = get_field(generate_output, "sequences")
        if sequences is None:
            raise ValueError("`generate_output` has no `sequences`; call generate(..., return_dict_in_generate=True)")
        pred_boxes = get_field(generate_output, "pred_boxes")
        pred_masks = get_field(generate_output, "pred_masks")
        iou_scores = get_field(generate_output, "iou_scores")
        scores = get_field(generate_output, "scores")
        if get_field(generate_output, "beam_indices") is not None:
            scores = None
        if prompt_length is None:
            prompt_length = get_field(generate_output, "prompt_length")
    seqs = to_list_of_ids(sequences)
    prompt_length = int(prompt_length or 0)
    n_seq = len(seqs)
    sizes = None
    if image_sizes is not None:
        sizes = np.asarray(
            image_sizes.detach().cpu().numpy() if torch.is_tensor(image_sizes) else image_sizes, dtype=np.int64
        ).reshape(-1, 2)
        if len(sizes) == 0 or n_seq % len(sizes):
            raise ValueError(f"`image_sizes` has {len(sizes)} rows for {n_seq} sequences")
        sizes = np.repeat(sizes, n_seq // len(sizes), axis=0)
    for name, value in (("pred_boxes", pred_boxes), ("pred_masks", pred_masks), ("iou_scores", iou_scores)):
        if value is not None and len(value) != n_seq:
            raise ValueError(f"`generate_output.{name}` has {len(value)} entries for {n_seq} sequences")
    sam_size = proc.image_processor.sam_image_size
    results = []
    for i, seq in enumerate(seqs):
        new = seq[prompt_length:]
        prompt_trigger = prompt_length > 0 and seq[prompt_length - 1] == proc.trigger_token_id
        eos_id = proc.tokenizer.eos_token_id
        if eos_id in new:  # what follows the first </s> is padding
            new = new[: new.index(eos_id) + 1]
        clean, positions = decode_segments(proc, new, skip_special_tokens)
        n_triggers = len(positions) + (1 if prompt_trigger else 0)
        boxes_i = None
        if pred_boxes is not None:
            boxes_i = pred_boxes[i]
            boxes_i = boxes_i.detach().float().cpu().numpy() if torch.is_tensor(boxes_i) else np.asarray(boxes_i, dtype=np.float64)
            boxes_i = boxes_i.reshape(-1, 4)
            if len(boxes_i) != n_triggers:
                raise ValueError(
                    f"`generate_output.pred_boxes[{i}]` has {len(boxes_i)} boxes but the answer has {n_triggers} "
                    "trigger(s); pass the generate output unchanged"
                )
        masks_i = None
        if pred_masks is not None and pred_masks[i] is not None and n_triggers:
            if sizes is None:
                raise ValueError("`image_sizes` is needed to bring the masks to the original resolution")
            if sam_size is None:
                raise ValueError("the image processor has no `sam_image_size`; cannot place the masks")
            if tuple(sizes[i]) != (0, 0):
                masks_i = masks_from_sam_frame(pred_masks[i], tuple(sizes[i]), sam_size, threshold=mask_threshold)
        ious_i = None
        if iou_scores is not None and iou_scores[i] is not None:
            v = iou_scores[i]
            ious_i = (v.detach().float().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)).reshape(-1)
        spans = []
        if prompt_trigger:
            spans.append((0, 0))
        previous_end, previous_pos = 0, None
        for pos in positions:
            if previous_pos is not None and pos == previous_pos and spans:
                spans.append(spans[-1])
                continue
            span = phrase_span(clean, pos, previous_end)
            spans.append(span)
            previous_end, previous_pos = pos, pos
        trigger_steps = [j for j, t in enumerate(new) if t == proc.trigger_token_id]
        entities = []
        for k, span in enumerate(spans):
            entity = {"text": clean[span[0] : span[1]], "span": span, "box": None, "box_normalized": None}
            if boxes_i is not None:
                raw = boxes_i[k]
                entity["box_normalized"] = raw.tolist()
                if sizes is not None and tuple(sizes[i]) != (0, 0):
                    entity["box"] = boxes_from_prediction(raw, tuple(sizes[i]))[0].tolist()
            entity["mask"] = masks_i[k] if masks_i is not None else None
            score = None
            if ious_i is not None:
                score = float(ious_i[k])
            elif scores is not None:
                step_index = k - (1 if prompt_trigger else 0)
                if step_index >= 0 and step_index < len(trigger_steps) and trigger_steps[step_index] < len(scores):
                    logits = scores[trigger_steps[step_index]][i].float()
                    score = float(torch.softmax(logits, -1)[proc.trigger_token_id])
            entity["score"] = score
            entities.append(entity)
        results.append({"text": clean, "entities": entities})
    return results


def decode_texts(proc, generated_outputs, skip_special_tokens: bool = True) -> list[str]:
    """Generated ids (or a ``generate`` output) -> clean texts, the ``<at> <boxes>`` pairs removed."""
    sequences = get_field(generated_outputs, "sequences") if not torch.is_tensor(generated_outputs) else None
    if sequences is None:
        sequences = generated_outputs
    return [decode_segments(proc, seq, skip_special_tokens)[0] for seq in to_list_of_ids(sequences)]


__all__ = [
    "decode_segments",
    "decode_texts",
    "get_field",
    "phrase_span",
    "post_process_generation",
    "to_list_of_ids",
]
