"""Benchmark runners: REC, RES, POPE and region captioning, batched, deterministic and resumable.

:func:`evaluate` runs one task on one annotation file (formats in :mod:`nextchat.evaluation.data`) and writes
into ``output_dir``:

* ``predictions.jsonl`` -- one JSON object per sample, appended (and flushed) batch by batch as predictions come.
  A restarted run reads it, skips the batches already there (a torn last line from a killed run is dropped) and
  goes on; batches are cut from the annotation file in order and always run whole, and the file is rewritten in
  annotation order at the end, so an interrupted and resumed run writes the same files as an uninterrupted one.
  In a data-parallel run (``torchrun`` / ``accelerate launch``, see :func:`evaluate`) each process appends to its
  own ``predictions.rank{r}-of-{n}.jsonl`` and rank 0 merges them into ``predictions.jsonl``.
* ``run_config.json`` -- what identifies the run: the annotation file's sha256, the image folder and the names and
  sizes of its images used, the model (and a fingerprint of its files), dtype and device type, prompts, generation
  settings and batch size. Resuming with anything different is refused, naming what differs (``overwrite=True`` /
  ``--overwrite`` starts afresh). :func:`prepare_run` does this check, and those of the annotations and images,
  before any model runs.
* ``results.json`` -- the metrics, the paper's number for the split (:mod:`nextchat.evaluation.paper`) and
  ``comparison`` rows ``{"metric", "ours", "paper", "delta"}`` in percent. No timestamps (reproducible file).

Prompts follow the original (the template JSONs of its repository's ``config/_base_/dataset/template``): REC / RES
``<image> Where is <expr> in the image?``, region captioning ``<image> Can you describe <objs>?`` (``<objs>`` ->
``[0]`` -> ``<at> <boxes>`` fed the box), POPE ``<image> <question>``, rendered with vicuna v1.1 and ending in
``ASSISTANT:``. ``template`` may be another string or a JSON file with a list of templates (as the original's);
with several templates each sample gets one chosen by a stable hash of its id (the original draws at random).
A sample's own ``question`` replaces the template (used for the synthetic task).

Generation is greedy (``do_sample=False``, ``num_beams=1``) on left-padded batches, as the original evaluation
(``num_beams=1``); defaults of ``max_new_tokens`` are the original's: 20 (RES, POPE; REC full generation) and 500
(region captions).

REC has two modes:

* full generation (default): the model answers freely; the box of the first ``<at>`` it generates is the
  prediction, none is a miss (IoU 0, counted in ``failed``).
* ``fast_rec=True``: the original's REC evaluation shortcut (``generate_rec``): the answer is teacher-forced as
  ``Answer: <at>`` (the processor's ``append_trigger=True`` after ``ASSISTANT: Answer:``; the original appends
  ``Answer: <at> <boxes> .</s>``, whose tokens after ``<at>`` cannot change the causal hidden state at ``<at>``),
  and ONE forward per batch reads ``pred_boxes`` at that trigger. This is how the paper's REC numbers were
  computed. For RES the same switch reads the mask of that trigger (SAM) in one forward; the paper's RES numbers
  used generation. The forced prefix is a sample's own ``answer_prefix``, else ``answer_prefix=`` (``--answer-prefix``),
  else ``Answer:``. It is only meaningful for a model trained to put its box after that prefix (the original's REC
  answers are ``Answer: <at> <boxes> .``); a model that answers in its own format (``The red circle <at> ...``) is
  read at an untrained position and scores far below its generation score. :func:`fast_rec_check` compares the
  two on the first samples and :func:`evaluate` warns (:class:`FastRecWarning`, ``results["warnings"]``).

Every prediction record holds the prompt actually used (``user_prompt``, ``prompt_source``, ``prompt``) and
``results["settings"]["prompts"]`` summarises them (:func:`prompt_summary`).

Metrics (:mod:`nextchat.evaluation.metrics`): REC IoU in the padded-square normalised frame between the raw predicted
box (as the original, unclipped) and the ground-truth box clipped to the image -- one clipping convention, and
``gt_box`` in ``predictions.jsonl`` is the clipped box the IoU used (:data:`GT_BOX_CONVENTION`; region-captioning
input boxes are clipped the same way and stored as fed); RES I/U per sample between the predicted mask
(SAM logits > 0 at the original resolution) and the ground truth -- no ``<at>`` is a failure with an empty mask
and several ``<at>`` an empty mask (``"unmatched"``), as in the original (``res_multi_trigger="first"`` uses the
first one instead); POPE the original's answer parsing; region captions lower-cased, CIDEr / METEOR.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import zlib
from dataclasses import asdict, dataclass
from collections.abc import Sequence

import numpy as np
import torch

from .data import TASKS, EvalSample, decode_mask, load_image, load_samples, resolve_images
from .metrics import (
    box_iou,
    caption_metrics,
    extract_caption,
    mask_intersection_union,
    parse_pope_answer,
    pope_metrics,
    rec_metrics_from_ious,
    res_metrics,
)
from .paper import PAPER_SOURCE, detect_split, paper_results


DEFAULT_TEMPLATES = {
    "rec": "<image> Where is <expr> in the image?",
    "res": "<image> Where is <expr> in the image?",
    "reg": "<image> Can you describe <objs>?",
    "pope": "<image> <question>",
}
TEMPLATE_PLACEHOLDERS = {"rec": "<expr>", "res": "<expr>", "reg": "<objs>", "pope": "<question>"}
DEFAULT_MAX_NEW_TOKENS = {"rec": 20, "res": 20, "pope": 20, "reg": 500}
DEFAULT_ANSWER_PREFIX = "Answer:"
PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "results.json"
RUN_CONFIG_FILE = "run_config.json"
SHARD_FILE = "predictions.rank{rank}-of-{world_size}.jsonl"
_SHARD_RE = re.compile(r"^predictions\.rank\d+-of-\d+\.jsonl$")
RUN_CONFIG_VERSION = 2
GT_BOX_CONVENTION = (
    "ground-truth boxes are clipped to the image ([0, width] x [0, height] pixels) and stored clipped (gt_box; "
    "the annotation's box as gt_box_annotation where clipping changed it); REC IoU = IoU in the padded-square "
    "normalised frame between the raw predicted box (pred_box_normalized) and the clipped ground truth"
)

# metric in results["metrics"] -> (paper key, factor to percent)
_COMPARED = {
    "rec": [("accuracy", "accuracy", 100.0)],
    "res": [("ciou", "ciou", 100.0)],
    "pope": [("accuracy", "accuracy", 100.0), ("f1", "f1", 100.0)],
    "reg": [("cider", "cider", 1.0), ("meteor", "meteor", 1.0)],
}


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------


def load_templates(task: str, template: str | Sequence[str] | None = None) -> list[str]:
    """The prompt templates of ``task``: the default, a template string, a list, or a JSON file holding a list."""
    if template is None:
        templates = [DEFAULT_TEMPLATES[task]]
    elif isinstance(template, str):
        if template.endswith(".json") and os.path.isfile(template):
            with open(template, encoding="utf-8") as f:
                templates = json.load(f)
            if isinstance(templates, str):
                templates = [templates]
        else:
            templates = [template]
    else:
        templates = list(template)
    if not templates or not all(isinstance(t, str) for t in templates):
        raise ValueError(f"`template` must be a string, a list of strings or a JSON file with one, got {template!r}")
    placeholder = TEMPLATE_PLACEHOLDERS[task]
    for t in templates:
        if placeholder not in t:
            raise ValueError(f"the {task} template {t!r} has no {placeholder} placeholder")
    return templates


def choose_template(templates: list[str], sample_id: str) -> str:
    """One template per sample: the only one, or a stable hash (crc32) of the sample id into the list."""
    if len(templates) == 1:
        return templates[0]
    return templates[zlib.crc32(sample_id.encode("utf-8")) % len(templates)]


def build_user_message(task: str, sample: EvalSample, processor, templates: list[str]) -> str:
    """The user turn of a sample: its own ``question`` when it has one, else its template filled in (with the
    image placeholder put first when missing)."""
    if sample.question is not None:
        user = sample.question.replace("<objs>", "[0]") if task == "reg" else sample.question
    else:
        user = choose_template(templates, sample.id)
        if task in ("rec", "res"):
            user = user.replace("<expr>", processor.escape_text(sample.expression or ""))
        elif task == "pope":
            user = user.replace("<question>", processor.escape_text(sample.expression or ""))
        else:
            user = user.replace("<objs>", "[0]")
    if processor.image_placeholder not in user:
        user = f"{processor.image_placeholder} {user}"
    return user


def sample_answer_prefix(sample: EvalSample, default: str | None = None) -> str:
    """The teacher-forced answer prefix of the fast path: the sample's own ``answer_prefix``, else ``default``
    (``--answer-prefix``), else :data:`DEFAULT_ANSWER_PREFIX` (``"Answer:"``)."""
    if sample.answer_prefix is not None:
        return sample.answer_prefix
    return DEFAULT_ANSWER_PREFIX if default is None else default


def build_prompt(task: str, sample: EvalSample, processor, templates: list[str], fast: bool = False,
                 answer_prefix: str | None = None) -> str:
    """The full prompt text of a sample (vicuna v1.1, ending in ``ASSISTANT:``; with ``fast`` followed by the answer
    prefix, e.g. ``ASSISTANT: Answer:``, to which the processor appends ``<at>``). ``answer_prefix`` is the prefix
    of samples without their own (default ``"Answer:"``)."""
    user = build_user_message(task, sample, processor, templates)
    text = processor.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    if fast:
        prefix = sample_answer_prefix(sample, answer_prefix)
        if prefix:
            text = f"{text} {processor.escape_text(prefix)}"
    return text


def prompt_summary(task: str, samples: Sequence[EvalSample], templates: list[str], max_listed: int = 20) -> dict:
    """What prompted the samples: how many used their own ``question`` (from the data file) and how many a
    template, the templates used with counts, and the most frequent per-sample questions with counts."""
    from collections import Counter

    questions = Counter(s.question for s in samples if s.question is not None)
    used = Counter(choose_template(templates, s.id) for s in samples if s.question is None)
    n_question = sum(questions.values())
    n_template = sum(used.values())
    if n_question and n_template:
        source = "mixed: per-sample questions from the data file, templates for the other samples"
    elif n_question:
        source = "per-sample questions from the data file (no template used)"
    else:
        source = "template"
    return {
        "source": source,
        "from_data_question": n_question,
        "from_template": n_template,
        "templates_used": {t: used[t] for t in templates if used[t]},
        "num_distinct_questions": len(questions),
        "questions": dict(questions.most_common(max_listed)),
        "questions_listed": min(len(questions), max_listed),
    }


# --------------------------------------------------------------------------------------------------------------
# Resumable prediction file
# --------------------------------------------------------------------------------------------------------------


class PredictionStore:
    """A prediction file (``predictions.jsonl`` or one rank's shard): records keyed by ``id``; appended batch by
    batch and flushed to disk.

    On opening, lines that do not parse (the torn tail of a killed run) are dropped and, unless ``read_only``, the
    file is rewritten without them before anything is appended."""

    def __init__(self, path: str, read_only: bool = False):
        self.path = path
        self.read_only = read_only
        self.records: dict[str, dict] = {}
        if os.path.exists(path):
            good, bad = [], 0
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        bad += 1
                        continue
                    if not isinstance(record, dict) or "id" not in record or not line.endswith("\n"):
                        bad += 1
                        continue
                    good.append(line)
                    self.records[str(record["id"])] = record
            if bad and not read_only:
                tmp = path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(good)
                os.replace(tmp, path)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.records

    def append(self, records: list[dict]) -> None:
        if self.read_only:
            raise RuntimeError(f"{self.path} was opened read-only")
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, sort_keys=True) + "\n")
                self.records[str(record["id"])] = record
            f.flush()
            os.fsync(f.fileno())


def shard_file(rank: int, world_size: int) -> str:
    """The prediction shard of one process of a data-parallel run: ``predictions.rank{r}-of-{n}.jsonl``."""
    return SHARD_FILE.format(rank=rank, world_size=world_size)


def prediction_files(output_dir: str) -> list[str]:
    """The prediction files in ``output_dir``: ``predictions.jsonl`` and the shards of data-parallel runs (any
    world size), in a fixed order."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(n for n in os.listdir(output_dir) if _SHARD_RE.match(n))
    if os.path.exists(os.path.join(output_dir, PREDICTIONS_FILE)):
        names.insert(0, PREDICTIONS_FILE)
    return [os.path.join(output_dir, n) for n in names]


def read_predictions(output_dir: str) -> dict[str, dict]:
    """Every prediction record of ``output_dir`` (merged file and shards, read-only), keyed by sample id."""
    records = {}
    for path in prediction_files(output_dir):
        for key, record in PredictionStore(path, read_only=True).records.items():
            records.setdefault(key, record)
    return records


# --------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------


def _to_model(inputs: dict, model) -> dict:
    device = model.device
    dtype = model.dtype
    out = {}
    for key, value in inputs.items():
        if torch.is_tensor(value):
            value = value.to(device)
            if value.is_floating_point() and key in ("pixel_values", "sam_pixel_values", "box_inputs"):
                value = value.to(dtype)
        out[key] = value
    return out


def clip_box_to_image(box, size) -> list[float]:
    """A pixel xyxy box clipped to the image ``size = (height, width)``: the one clipping convention of the
    runners (ground-truth REC boxes, region-captioning input boxes), stored as used."""
    height, width = float(size[0]), float(size[1])
    x1, y1, x2, y2 = (float(v) for v in box)
    return [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)]


def _gt_box_normalized(box, size) -> list[float]:
    """A pixel box already clipped to the image -> the padded-square normalised frame (then within [0, 1])."""
    from nextchat.processing import boxes_to_square_frame

    return boxes_to_square_frame(np.asarray(box, dtype=np.float64), size)[0].tolist()


def _pixel_box(raw, size) -> list[float]:
    from nextchat.processing import boxes_from_prediction

    return boxes_from_prediction(raw, tuple(size))[0].tolist()


class _Runner:
    def __init__(self, task, model, processor, templates, fast, max_new_tokens, images_dir, data_dir,
                 res_multi_trigger, generate_kwargs, masks_dir=None, answer_prefix=None):
        self.answer_prefix = answer_prefix
        self.task = task
        self.model = model
        self.processor = processor
        self.templates = templates
        self.fast = fast
        self.max_new_tokens = max_new_tokens
        self.images_dir = images_dir
        self.data_dir = data_dir
        self.masks_dir = masks_dir
        self.res_multi_trigger = res_multi_trigger
        self.generate_kwargs = dict(generate_kwargs or {})
        if task == "res" and getattr(model, "sam", None) is None:
            raise ValueError("RES needs a model with SAM (`config.sam_config` is None: a box-only model)")
        if task == "res" and processor.image_processor.sam_image_size is None:
            raise ValueError("RES needs a processor whose image processor has `sam_image_size`")

    def inputs(self, samples: list[EvalSample]):
        images = [load_image(s.image, self.images_dir, self.data_dir) for s in samples]
        texts = [build_prompt(self.task, s, self.processor, self.templates, self.fast, self.answer_prefix)
                 for s in samples]
        boxes = None
        if self.task == "reg":
            boxes = [[clip_box_to_image(s.bbox, (img.height, img.width))] for s, img in zip(samples, images)]
        inputs = self.processor(
            images=images,
            text=texts,
            boxes=boxes,
            clip_boxes=True,
            append_trigger=self.fast,
            return_sam_pixel_values=self.task == "res",
            padding_side="left",
            return_tensors="pt",
        )
        sizes = [tuple(int(v) for v in s) for s in inputs.pop("image_sizes").tolist()]
        self.last_prompts = texts
        return _to_model(dict(inputs), self.model), sizes

    def generate(self, inputs):
        tokenizer = self.processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs = dict(
            max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, return_dict_in_generate=True,
            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        )
        kwargs.update(self.generate_kwargs)
        return self.model.generate(**inputs, **kwargs)

    def fast_forward(self, inputs, with_masks: bool):
        """One teacher-forced forward; per row the box (and mask logits) at the trigger that ends its prompt."""
        if not with_masks:
            inputs = {k: v for k, v in inputs.items() if k != "sam_pixel_values"}
        out = self.model(**inputs, logits_to_keep=1, use_cache=False)
        last = inputs["input_ids"].shape[1] - 1
        positions = out.trigger_positions
        boxes = [None] * inputs["input_ids"].shape[0]
        masks = [None] * len(boxes)
        for k in range(positions.shape[0]):
            row, col = int(positions[k, 0]), int(positions[k, 1])
            if col == last:
                boxes[row] = out.pred_boxes[k].float().cpu().numpy()
                if with_masks and out.pred_masks is not None:
                    masks[row] = out.pred_masks[k].float().cpu()
        if any(b is None for b in boxes):
            raise RuntimeError("the fast path found no trigger at the end of a prompt")
        return boxes, masks

    # -- tasks ------------------------------------------------------------------------------------------------

    def predict(self, samples: list[EvalSample]) -> list[dict]:
        inputs, sizes = self.inputs(samples)
        records = getattr(self, f"_predict_{self.task}")(samples, inputs, sizes)
        for s, record, prompt in zip(samples, records, self.last_prompts):
            # what the model was actually asked: the user turn (template filled in, or the sample's own question)
            # and the full rendered prompt (in the fast path followed by the answer prefix; the processor then
            # appends the trigger <at>)
            record["user_prompt"] = build_user_message(self.task, s, self.processor, self.templates)
            record["prompt_source"] = "question" if s.question is not None else "template"
            record["prompt"] = prompt
            if self.fast:
                record["answer_prefix"] = sample_answer_prefix(s, self.answer_prefix)
                record["prompt_ends_with_trigger"] = True
        return records

    def _predict_rec(self, samples, inputs, sizes):
        records = []
        if self.fast:
            boxes, _ = self.fast_forward(inputs, with_masks=False)
            texts, counts = [None] * len(samples), [1] * len(samples)
        else:
            post = self.processor.post_process_generation(self.generate(inputs), image_sizes=sizes)
            boxes = [p["entities"][0]["box_normalized"] if p["entities"] else None for p in post]
            texts = [p["text"] for p in post]
            counts = [len(p["entities"]) for p in post]
        for s, size, raw, text, count in zip(samples, sizes, boxes, texts, counts):
            gt_box = clip_box_to_image(s.bbox, size)
            gt_norm = _gt_box_normalized(gt_box, size)
            iou = 0.0 if raw is None else float(box_iou(np.asarray(raw, dtype=np.float64), gt_norm)[0])
            record = {
                "id": s.id, "image": s.image, "image_size": list(size), "expression": s.expression,
                "gt_box": gt_box, "pred_box": None if raw is None else _pixel_box(raw, size),
                "pred_box_normalized": None if raw is None else [float(v) for v in raw],
                "iou": iou, "n_triggers": count, "text": text,
            }
            if gt_box != [float(v) for v in s.bbox]:
                record["gt_box_annotation"] = s.bbox
            records.append(record)
        return records

    def _predict_res(self, samples, inputs, sizes):
        from nextchat.processing import masks_from_sam_frame

        sam_size = self.processor.image_processor.sam_image_size
        if self.fast:
            boxes, logits = self.fast_forward(inputs, with_masks=True)
            masks = [masks_from_sam_frame(m[None], size, sam_size)[0] for m, size in zip(logits, sizes)]
            texts, counts = [None] * len(samples), [1] * len(samples)
            entity_boxes = boxes
            per_sample = [[m] for m in masks]
        else:
            post = self.processor.post_process_generation(self.generate(inputs), image_sizes=sizes)
            texts = [p["text"] for p in post]
            counts = [len(p["entities"]) for p in post]
            per_sample = [[e["mask"] for e in p["entities"]] for p in post]
            entity_boxes = [p["entities"][0]["box_normalized"] if p["entities"] else None for p in post]
        records = []
        for s, size, preds, raw, text, count in zip(samples, sizes, per_sample, entity_boxes, texts, counts):
            height, width = size
            if s.height is not None and s.width is not None and (int(s.height), int(s.width)) != (height, width):
                raise ValueError(
                    f"sample {s.id}: the annotation says (height, width) = {(s.height, s.width)} but the image is "
                    f"{(height, width)}"
                )
            target = decode_mask(s.mask, height, width, self.masks_dir, self.images_dir, self.data_dir)
            if count == 0:
                status, pred = "fail", None
            elif count > 1 and self.res_multi_trigger == "zero":
                status, pred = "unmatched", None
            else:
                status, pred = "ok", preds[0]
            inter, union = mask_intersection_union(pred, target)
            records.append({
                "id": s.id, "image": s.image, "expression": s.expression, "intersection": inter, "union": union,
                "iou": inter / union if union else 1.0, "status": status, "n_triggers": count,
                "pred_box": None if raw is None else _pixel_box(raw, size), "text": text,
            })
        return records

    def _predict_pope(self, samples, inputs, sizes):
        post = self.processor.post_process_generation(self.generate(inputs), image_sizes=sizes)
        return [
            {"id": s.id, "image": s.image, "question": s.expression, "label": s.label, "text": p["text"],
             "answer": parse_pope_answer(p["text"])}
            for s, p in zip(samples, post)
        ]

    def _predict_reg(self, samples, inputs, sizes):
        post = self.processor.post_process_generation(self.generate(inputs), image_sizes=sizes)
        records = []
        for s, p, size in zip(samples, post, sizes):
            box = clip_box_to_image(s.bbox, size)
            record = {"id": s.id, "image": s.image, "image_size": list(size), "bbox": box, "text": p["text"],
                      "prediction": extract_caption(p["text"]), "references": s.references}
            if box != [float(v) for v in s.bbox]:
                record["bbox_annotation"] = s.bbox
            records.append(record)
        return records


# --------------------------------------------------------------------------------------------------------------
# Fast REC sanity check
# --------------------------------------------------------------------------------------------------------------


class FastRecWarning(UserWarning):
    """The teacher-forced fast REC path disagrees with free generation for this model (see :func:`fast_rec_check`)."""


FAST_REC_AGREEMENT_IOU = 0.5


def fast_rec_check(runner: "_Runner", samples: list[EvalSample], iou_threshold: float = FAST_REC_AGREEMENT_IOU) -> dict:
    """Compare the fast path (teacher-forced ``<answer prefix> <at>``) with free greedy generation on ``samples``.

    The fast path reads the box at an ``<at>`` forced right after the answer prefix (``"Answer:"`` unless the
    sample or ``answer_prefix`` says otherwise). A model fine-tuned to answer in its own format (e.g.
    ``"The red circle <at> <boxes> ..."``) was never trained to put a box after ``"Answer:"``, so the forced trigger
    reads an untrained position and the score collapses while generation is fine. Returns ``{"checked",
    "agreeing", "same_prefix", "mean_iou", "generated_prefixes", "answer_prefixes", "agree"}``: ``agreeing`` counts
    samples whose first generated box has IoU >= ``iou_threshold`` with the fast box, ``same_prefix`` those whose
    generated text before the first ``<at>`` is the forced prefix (case, spaces and ``.,:;`` at the ends ignored);
    ``agree`` is true when both hold for at least half of the samples."""
    fast_inputs, _ = runner.inputs(samples)
    fast_boxes, _ = runner.fast_forward(fast_inputs, with_masks=False)
    runner.fast = False
    try:
        gen_inputs, sizes = runner.inputs(samples)
    finally:
        runner.fast = True
    gen_inputs.pop("sam_pixel_values", None)
    post = runner.processor.post_process_generation(runner.generate(gen_inputs), image_sizes=sizes)
    ious, prefixes = [], []
    for fast_box, p in zip(fast_boxes, post):
        if p["entities"]:
            prefixes.append(p["text"][: p["entities"][0]["span"][1]].strip())
            gen_box = np.asarray(p["entities"][0]["box_normalized"], dtype=np.float64)
            ious.append(float(box_iou(np.asarray(fast_box, dtype=np.float64), gen_box)[0]))
        else:
            prefixes.append(None)
            ious.append(0.0)
    forced = [sample_answer_prefix(s, runner.answer_prefix) for s in samples]
    same_prefix = sum(g is not None and _norm_prefix(g) == _norm_prefix(f) for g, f in zip(prefixes, forced))
    same_box = sum(iou >= iou_threshold for iou in ious)
    n = len(samples)
    return {
        "checked": n,
        "agreeing": same_box,
        "same_prefix": same_prefix,
        "iou_threshold": iou_threshold,
        "mean_iou": round(float(np.mean(ious)), 4) if ious else None,
        "answer_prefixes": forced,
        "generated_prefixes": prefixes,
        "agree": same_box * 2 >= n and same_prefix * 2 >= n,
    }


def _norm_prefix(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,:;")


def fast_rec_warning(check: dict) -> str:
    forced = sorted(set(check["answer_prefixes"]))
    shown = "; ".join("(no <at>)" if p is None else repr(p[:60]) for p in check["generated_prefixes"][:3])
    n = check["checked"]
    return (
        f"--fast-rec does not match how this model answers: on the first {n} samples, its generated answer starts "
        f"with the forced prefix ({' / '.join(repr(p) for p in forced)}) before its first <at> in "
        f"{check['same_prefix']} of {n}, and the teacher-forced box agrees with the generated box (IoU >= "
        f"{check['iou_threshold']}) in {check['agreeing']} of {n} (mean IoU {check['mean_iou']}). The model answers "
        f"e.g. {shown}. The fast path reads the box at an <at> forced after the prefix, a position the model was not "
        "trained on, so its fast-rec score can be far below its real one (--fast-rec disagrees with free "
        "generation). Set what the model writes before its box with --answer-prefix TEXT (or a per-line "
        "\"answer_prefix\" in the data file), or evaluate without --fast-rec (free generation)."
    )


# --------------------------------------------------------------------------------------------------------------
# Metrics from records, results
# --------------------------------------------------------------------------------------------------------------


def compute_metrics(
    task: str, records: list[dict], caption_tokenizer: str = "auto", meteor: bool | None = None
) -> dict:
    """The task's metrics from prediction records (as written to ``predictions.jsonl``)."""
    if task == "rec":
        return rec_metrics_from_ious([r["iou"] for r in records], failed=sum(r["pred_box"] is None for r in records))
    if task == "res":
        metrics = res_metrics([r["intersection"] for r in records], [r["union"] for r in records])
        metrics["no_trigger"] = sum(r["status"] == "fail" for r in records)
        metrics["unmatched"] = sum(r["status"] == "unmatched" for r in records)
        return metrics
    if task == "pope":
        return pope_metrics([r["answer"] for r in records], [r["label"] for r in records])
    if task == "reg":
        return caption_metrics(
            [r["prediction"] for r in records], [[x.lower() for x in r["references"]] for r in records],
            tokenizer=caption_tokenizer, meteor=meteor,
        )
    raise ValueError(f"`task` must be one of {TASKS}, got {task!r}")


def comparison_rows(task: str, metrics: dict, paper: dict | None) -> list[dict]:
    """Rows ``{"metric", "ours", "paper", "delta"}`` in percent (CIDEr/METEOR on their x100 scale), rounded to 2."""
    rows = []
    for key, paper_key, factor in _COMPARED[task]:
        value = metrics.get(key)
        ours = None if value is None else round(float(value) * factor, 2)
        theirs = None if paper is None else paper.get(paper_key)
        delta = None if ours is None or theirs is None else round(ours - theirs, 2)
        rows.append({"metric": key, "ours": ours, "paper": theirs, "delta": delta})
    return rows


def _stable_repr(value) -> str:
    """A repr without memory addresses (objects are named by their class)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_stable_repr(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_stable_repr(v)}" for k, v in sorted(value.items())) + "}"
    return type(value).__name__


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------------------------------------------
# Run identity (what resuming must match) and data-parallel helpers
# --------------------------------------------------------------------------------------------------------------


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sampled_sha256(path: str, chunks: int = 8, chunk_size: int = 1 << 16) -> str:
    """sha256 of a file's size and ``chunks`` evenly spaced blocks: a cheap fingerprint of multi-GB weights."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for k in range(chunks):
            f.seek(max(0, (size - chunk_size) * k // max(1, chunks - 1)))
            digest.update(f.read(chunk_size))
    return digest.hexdigest()


def model_fingerprint(*sources: str | None) -> str | None:
    """A fingerprint of model / processor sources (folders or Hub ids) for the resume check: per local folder its
    absolute path, the sha256 of its small files (configs, tokenizer) and a sampled sha256 of its large ones
    (weights, :func:`_sampled_sha256`); a Hub id as it is."""
    parts = []
    for source in sources:
        if not source:
            continue
        if not os.path.isdir(source):
            parts.append(f"hub:{source}")
            continue
        parts.append(f"dir:{os.path.abspath(source)}")
        for name in sorted(os.listdir(source)):
            path = os.path.join(source, name)
            if not os.path.isfile(path):
                continue
            small = os.path.getsize(path) <= (4 << 20)
            parts.append(f"{name}\t{_sha256_file(path) if small else _sampled_sha256(path)}")
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest() if parts else None


def _samples_sha256(samples: Sequence[EvalSample]) -> str:
    text = json.dumps([_jsonable(asdict(s)) for s in samples], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _images_fingerprint(image_paths: dict[str, str]) -> str:
    """sha256 of the sorted (annotation name, file size) of the images used: catches a different or re-encoded
    image set cheaply (image contents are not read)."""
    lines = sorted(f"{name}\t{os.path.getsize(path)}" for name, path in image_paths.items())
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


@dataclass
class RunPlan:
    """What :func:`prepare_run` checked and decided: the samples (all and selected), prompts, and the
    ``run_config`` that identifies the run (stored as ``run_config.json``; resuming requires the same)."""

    task: str
    samples: list[EvalSample]
    selected: list[EvalSample]
    data_path: str | None
    data_dir: str | None
    split: str | None
    templates: list[str]
    fast: bool
    max_new_tokens: int
    run_config: dict


def prepare_run(
    task: str,
    data: str | Sequence[EvalSample],
    output_dir: str,
    images_dir: str | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    fast_rec: bool = False,
    template: str | Sequence[str] | None = None,
    limit: int | None = None,
    split: str | None = None,
    bbox_format: str = "xyxy",
    expressions: str = "all",
    res_multi_trigger: str = "zero",
    generate_kwargs: dict | None = None,
    overwrite: bool = False,
    model_name: str = "",
    model_fingerprint: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    masks_dir: str | None = None,
    answer_prefix: str | None = None,
    fast_rec_check_samples: int = 8,
) -> RunPlan:
    """Everything :func:`evaluate` checks before it runs a model, without writing anything: the arguments, the
    annotation file (:func:`~nextchat.evaluation.data.load_samples`: missing, empty or malformed files are
    refused naming ``file:line``), that every image exists, and -- unless ``overwrite`` -- that the predictions
    already in ``output_dir`` come from the same run (same ``run_config``: the annotation file's sha256, the
    image folder and the names and sizes of its images used, the model, dtype, device type, prompts, generation
    settings and batch size, which sets the padding of each sample and so its floating-point result). A mismatch
    is a ``ValueError`` naming the settings that differ. ``nextchat-eval`` calls it before loading the model."""
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` must be a positive int, got {limit!r}")
    if res_multi_trigger not in ("zero", "first"):
        raise ValueError(f"`res_multi_trigger` must be 'zero' or 'first', got {res_multi_trigger!r}")
    fast = bool(fast_rec) and task in ("rec", "res")
    if fast_rec and task not in ("rec", "res"):
        raise ValueError(f"`fast_rec` applies to rec and res only, not {task!r}")
    if answer_prefix is not None and not isinstance(answer_prefix, str):
        raise ValueError(f"`answer_prefix` must be a string, got {answer_prefix!r}")
    if answer_prefix is not None and not fast:
        raise ValueError("`answer_prefix` (--answer-prefix) applies to the fast path only (fast_rec=True, --fast-rec)")
    if not isinstance(fast_rec_check_samples, int) or fast_rec_check_samples < 0:
        raise ValueError(f"`fast_rec_check_samples` must be a non-negative int, got {fast_rec_check_samples!r}")
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task]
    templates = load_templates(task, template)

    data_path = data if isinstance(data, str) else None
    if data_path:
        samples = load_samples(task, data_path, bbox_format, expressions)
        data_dir = os.path.dirname(os.path.abspath(data_path))
        data_hash = _sha256_file(data_path)
    else:
        samples, data_dir = list(data), None
        if not samples:
            raise ValueError("`data` holds no samples")
        data_hash = _samples_sha256(samples)
    image_paths = resolve_images(samples, images_dir, data_dir)
    if split is None and data_path:
        split = detect_split(task, data_path)
    selected = samples if limit is None else samples[:limit]
    image_folder = images_dir or data_dir
    run_config = _jsonable({
        "version": RUN_CONFIG_VERSION,
        "task": task,
        "data": os.path.basename(data_path) if data_path else None,
        "data_sha256": data_hash,
        "num_samples_in_file": len(samples),
        "images": os.path.abspath(image_folder) if image_folder else None,
        "images_fingerprint": _images_fingerprint(image_paths),
        "masks": os.path.abspath(masks_dir) if masks_dir and task == "res" else None,
        "model": model_name,
        "model_fingerprint": model_fingerprint,
        "dtype": dtype,
        "device": device,
        "batch_size": batch_size,
        "fast_rec": fast,
        "answer_prefix": (DEFAULT_ANSWER_PREFIX if answer_prefix is None else answer_prefix) if fast else None,
        "templates": templates,
        "max_new_tokens": None if fast else max_new_tokens,
        "bbox_format": bbox_format,
        "expressions": expressions,
        "res_multi_trigger": res_multi_trigger if task == "res" else None,
        "generate_kwargs": {k: _stable_repr(v) for k, v in sorted((generate_kwargs or {}).items())},
    })
    if not overwrite:
        _check_resumable(output_dir, run_config)
    return RunPlan(task=task, samples=samples, selected=selected, data_path=data_path, data_dir=data_dir,
                   split=split, templates=templates, fast=fast, max_new_tokens=max_new_tokens, run_config=run_config)


def _short(value, width: int = 70) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_resumable(output_dir: str, run_config: dict) -> None:
    if not prediction_files(output_dir):
        return
    config_path = os.path.join(output_dir, RUN_CONFIG_FILE)
    if not os.path.exists(config_path):
        raise ValueError(
            f"{output_dir} holds predictions but no {RUN_CONFIG_FILE}, so they cannot be checked to come from this "
            "run; use another output folder or overwrite=True (--overwrite)"
        )
    with open(config_path, encoding="utf-8") as f:
        previous = json.load(f)
    if previous == run_config:
        return
    changed = sorted(k for k in set(previous) | set(run_config) if previous.get(k) != run_config.get(k))
    details = "; ".join(f"{k}: {_short(previous.get(k))} then, {_short(run_config.get(k))} now" for k in changed)
    raise ValueError(
        f"{output_dir} holds predictions of a different run (settings differ: {changed}; {details}); resuming would "
        "mix the two. Use another output folder or overwrite=True (--overwrite) to discard them"
    )


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _write_json(path: str, value) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def evaluate(
    task: str,
    model,
    processor,
    data: str | Sequence[EvalSample],
    output_dir: str,
    images_dir: str | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    fast_rec: bool = False,
    template: str | Sequence[str] | None = None,
    limit: int | None = None,
    split: str | None = None,
    bbox_format: str = "xyxy",
    expressions: str = "all",
    res_multi_trigger: str = "zero",
    caption_tokenizer: str = "auto",
    meteor: bool | None = None,
    generate_kwargs: dict | None = None,
    progress: bool = True,
    overwrite: bool = False,
    model_name: str | None = None,
    model_fingerprint: str | None = None,
    extra_settings: dict | None = None,
    masks_dir: str | None = None,
    answer_prefix: str | None = None,
    fast_rec_check_samples: int = 8,
    _exit_after_batches: int | None = None,
) -> dict:
    """Evaluate ``model`` on one benchmark file; returns the results dict (also written to ``results.json``).

    Args:
        task: ``"rec"``, ``"res"``, ``"pope"`` or ``"reg"`` (region captioning).
        model, processor: a ``NextChatForConditionalGeneration`` (in eval mode, on its device and dtype) and its
            ``NextChatProcessor``.
        data: an annotation file (see :mod:`nextchat.evaluation.data`) or a list of :class:`EvalSample`.
        output_dir: where ``predictions.jsonl``, ``run_config.json`` and ``results.json`` go.
        images_dir: folder of the images (default: the annotation file's folder).
        batch_size: samples per generate / forward call (left-padded).
        max_new_tokens: default :data:`DEFAULT_MAX_NEW_TOKENS` of the task.
        fast_rec: REC (and RES) through the teacher-forced trigger, one forward per batch (module docstring).
        template: prompt template(s) (module docstring); a sample's own ``question`` wins.
        limit: evaluate only the first ``limit`` samples (the results then say ``"complete": false``).
        split: paper split name (e.g. ``refcoco_testA``, ``popular``); default: read from the file name.
        bbox_format: ``"xyxy"`` (Shikra / NExT-Chat files) or ``"xywh"`` (COCO) for ``bbox`` fields.
        expressions: ``"all"`` (one sample per expression) or ``"first"`` for lines with several expressions.
        res_multi_trigger: ``"zero"`` (several ``<at>`` -> empty mask, the original) or ``"first"``.
        caption_tokenizer, meteor: see :func:`nextchat.evaluation.metrics.caption_metrics`.
        generate_kwargs: extra ``generate`` arguments (override the greedy defaults).
        progress: show a tqdm progress bar.
        overwrite: delete earlier predictions in ``output_dir`` instead of resuming.
        model_name: the model's name for the records (default: ``model.name_or_path``).
        model_fingerprint: identifies the weights for the resume check (:func:`model_fingerprint`; the CLI passes
            that of ``--model``, ``--base-model`` and ``--processor``).
        extra_settings: more entries for ``results["settings"]``.
        masks_dir: folder of RES mask files when the annotations name files (looked up before ``images_dir``).
        answer_prefix: fast path only: the text forced before ``<at>`` for samples without their own
            ``answer_prefix`` (default ``"Answer:"``, the original's). Set it to what the model writes before its
            box (e.g. ``"The red circle"``-style answers need the phrase; an empty string forces ``<at>`` right
            after ``ASSISTANT:``).
        fast_rec_check_samples: fast path only: compare it with free generation on this many first samples
            (:func:`fast_rec_check`) and warn (:class:`FastRecWarning`, ``results["warnings"]``) when they disagree;
            0 skips the check.

    The checks of :func:`prepare_run` come first (annotations, images, resume identity). Samples are cut into
    batches of ``batch_size`` in file order; each batch is always run whole, so a sample is padded the same way
    in every run.

    **Data parallel.** When ``torch.distributed`` is initialised (``torchrun`` / ``accelerate launch`` through
    ``nextchat-eval``), process ``r`` of ``n`` runs batches ``r, r + n, r + 2n, ...`` and appends its records to
    its own shard ``predictions.rank{r}-of-{n}.jsonl`` (resumable like ``predictions.jsonl``; every process reads
    all prediction files of the folder, so a run may be resumed with another number of processes). After a
    barrier, rank 0 merges them into ``predictions.jsonl`` in file order (removing the shards), computes the
    metrics and writes ``results.json``; the other ranks return the same results, read back from it. Both files
    are then byte-identical to a single-process run's. ``output_dir`` must be shared by all processes.

    Every prediction record holds ``user_prompt`` (the user turn: template filled in or the sample's own
    ``question``), ``prompt_source`` (``"template"`` / ``"question"``) and ``prompt`` (the full rendered prompt; in
    the fast path ending in the answer prefix, after which the processor appends ``<at>``; ``answer_prefix`` is
    recorded too). ``results["settings"]["prompts"]`` summarises the prompts used (:func:`prompt_summary`) and
    ``settings["templates"]`` lists only templates that some sample used.
    """
    model_name = model_name or str(getattr(model, "name_or_path", "") or type(model).__name__)
    model_dtype = str(getattr(model, "dtype", "")).replace("torch.", "") or None
    device = getattr(model, "device", None)
    plan = prepare_run(
        task, data, output_dir, images_dir, batch_size=batch_size, max_new_tokens=max_new_tokens,
        fast_rec=fast_rec, template=template, limit=limit, split=split, bbox_format=bbox_format,
        expressions=expressions, res_multi_trigger=res_multi_trigger, generate_kwargs=generate_kwargs,
        overwrite=overwrite, model_name=model_name, model_fingerprint=model_fingerprint, dtype=model_dtype,
        device=None if device is None else torch.device(device).type, masks_dir=masks_dir,
        answer_prefix=answer_prefix, fast_rec_check_samples=fast_rec_check_samples,
    )
    samples, selected, fast, templates = plan.samples, plan.selected, plan.fast, plan.templates
    rank, world_size = _distributed()
    barrier = torch.distributed.barrier if world_size > 1 else (lambda: None)

    predictions_path = os.path.join(output_dir, PREDICTIONS_FILE)
    results_path = os.path.join(output_dir, RESULTS_FILE)
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        if overwrite:
            for path in prediction_files(output_dir) + [results_path]:
                if os.path.exists(path):
                    os.remove(path)
        _write_json(os.path.join(output_dir, RUN_CONFIG_FILE), plan.run_config)
    barrier()

    own = PredictionStore(predictions_path if world_size == 1 else os.path.join(output_dir,
                                                                                shard_file(rank, world_size)))
    done = set(read_predictions(output_dir)) | set(own.records)
    batches = [selected[i : i + batch_size] for i in range(0, len(selected), batch_size)][rank::world_size]
    todo = [batch for batch in batches if any(s.id not in done for s in batch)]
    runner = _Runner(task, model, processor, templates, fast, plan.max_new_tokens, images_dir, plan.data_dir,
                     res_multi_trigger, generate_kwargs, masks_dir, answer_prefix)
    was_training = getattr(model, "training", False)
    model.eval()
    warnings_out = []
    check = None
    if rank == 0 and fast and fast_rec_check_samples and selected:
        with torch.inference_mode():
            check = fast_rec_check(runner, selected[:fast_rec_check_samples])
        if not check["agree"]:
            message = fast_rec_warning(check)
            warnings_out.append(message)
            warnings.warn(message, FastRecWarning, stacklevel=2)
    torch.manual_seed(0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(len(b) for b in batches)
        desc = f"nextchat-eval {task}" + (f" [rank {rank} of {world_size}]" if world_size > 1 else "")
        bar = tqdm(total=total, initial=total - sum(len(b) for b in todo), desc=desc, unit="sample", position=rank)
    try:
        with torch.inference_mode():
            for k, batch in enumerate(todo):
                records = _jsonable(runner.predict(batch))
                own.append([r for r in records if r["id"] not in done])
                done.update(r["id"] for r in records)
                if bar is not None:
                    bar.update(len(batch))
                if _exit_after_batches is not None and k + 1 >= _exit_after_batches:
                    # test hook: die like a killed process (no cleanup, no barrier), after k + 1 written batches
                    os._exit(17)
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()

    barrier()
    if rank == 0:
        stored = read_predictions(output_dir)
        missing = [s.id for s in selected if s.id not in stored]
        if missing:
            raise RuntimeError(f"{len(missing)} samples have no prediction after the run (first: {missing[:5]})")
        merged = "".join(json.dumps(stored[s.id], sort_keys=True) + "\n" for s in samples if s.id in stored)
        tmp = f"{predictions_path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(merged)
        os.replace(tmp, predictions_path)
        for path in prediction_files(output_dir):
            if path != predictions_path:
                os.remove(path)
        results = _results(plan, [stored[s.id] for s in selected], model, batch_size, limit, check, warnings_out,
                           caption_tokenizer, meteor, answer_prefix, extra_settings)
        _write_json(results_path, results)
    barrier()
    if rank != 0:
        with open(results_path, encoding="utf-8") as f:
            results = json.load(f)
    return results


def _results(plan: RunPlan, records, model, batch_size, limit, check, warnings_out, caption_tokenizer, meteor,
             answer_prefix, extra_settings) -> dict:
    task, selected, fast = plan.task, plan.selected, plan.fast
    metrics = compute_metrics(task, records, caption_tokenizer=caption_tokenizer, meteor=meteor)
    paper = paper_results(task, plan.split)
    prompts = prompt_summary(task, selected, plan.templates)
    settings = {
        "model": plan.run_config["model"],
        "fast_rec": fast,
        "batch_size": batch_size,
        "max_new_tokens": None if fast else plan.max_new_tokens,
        "templates": list(prompts["templates_used"]),
        "prompts": prompts,
        "limit": limit,
        "decoding": "greedy (do_sample=False, num_beams=1)" if not fast else "teacher-forced trigger, one forward",
        "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
    }
    if task in ("rec", "reg"):
        settings["boxes"] = GT_BOX_CONVENTION
    if fast:
        settings["answer_prefix"] = answer_prefix if answer_prefix is not None else DEFAULT_ANSWER_PREFIX
        settings["answer_prefix_note"] = "a sample's own answer_prefix wins"
        settings["fast_rec_check"] = check
    settings.update(extra_settings or {})
    return _jsonable({
        "task": task,
        "split": plan.split,
        "data": plan.run_config["data"],
        "data_sha256": plan.run_config["data_sha256"],
        "num_samples": len(selected),
        "complete": len(selected) == len(plan.samples),
        "metrics": metrics,
        "paper": paper,
        "paper_source": PAPER_SOURCE if paper else None,
        "comparison": comparison_rows(task, metrics, paper),
        "settings": settings,
        "warnings": warnings_out,
    })


def evaluate_rec(model, processor, data, output_dir, images_dir=None, **kwargs) -> dict:
    """:func:`evaluate` with ``task="rec"``."""
    return evaluate("rec", model, processor, data, output_dir, images_dir, **kwargs)


def evaluate_res(model, processor, data, output_dir, images_dir=None, **kwargs) -> dict:
    """:func:`evaluate` with ``task="res"``."""
    return evaluate("res", model, processor, data, output_dir, images_dir, **kwargs)


def evaluate_pope(model, processor, data, output_dir, images_dir=None, **kwargs) -> dict:
    """:func:`evaluate` with ``task="pope"``."""
    return evaluate("pope", model, processor, data, output_dir, images_dir, **kwargs)


def evaluate_reg(model, processor, data, output_dir, images_dir=None, **kwargs) -> dict:
    """:func:`evaluate` with ``task="reg"`` (region captioning)."""
    return evaluate("reg", model, processor, data, output_dir, images_dir, **kwargs)


def format_results_table(results: Sequence[dict]) -> str:
    """A Markdown table of several ``results.json`` contents: task, split, n, metric, ours, paper, delta."""
    lines = ["| task | split | n | metric | ours | paper | delta |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r.get("comparison", []):
            cells = [r.get("task"), r.get("split") or "-", r.get("num_samples"), row["metric"],
                     row["ours"], row["paper"], row["delta"]]
            lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "GT_BOX_CONVENTION",
    "RunPlan",
    "clip_box_to_image",
    "model_fingerprint",
    "prediction_files",
    "prepare_run",
    "read_predictions",
    "shard_file",
    "DEFAULT_TEMPLATES",
    "FastRecWarning",
    "PredictionStore",
    "build_prompt",
    "build_user_message",
    "fast_rec_check",
    "prompt_summary",
    "sample_answer_prefix",
    "choose_template",
    "comparison_rows",
    "compute_metrics",
    "evaluate",
    "evaluate_pope",
    "evaluate_rec",
    "evaluate_reg",
    "evaluate_res",
    "format_results_table",
    "load_templates",
]
