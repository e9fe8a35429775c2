"""Annotation readers of the evaluation runners: the public benchmark files and a simple documented JSONL schema.

Every reader returns a list of :class:`EvalSample` in file order. Field names read (aliases in brackets):

REC / RES (one JSON object per line; Shikra / NExT-Chat ``REC_*.jsonl`` and ``RES_*.jsonl``)::

    {"id": "...",                      # optional [question_id]; default: the line number (0-based)
     "img_path": "COCO_train2014_000000123456.jpg",   # [image, file_name]; relative to --images
     "expression": "the man on the left",             # [expressions (list), sents (list), sent]
     "bbox": [x1, y1, x2, y2],          # pixel box on the original image (xyxy; "bbox_format": "xywh" per line
                                        # or bbox_format="xywh" for COCO-style boxes); optional for RES
     "mask": ...,                       # RES only [segmentation]: COCO polygons [[x, y, x, y, ...], ...], a COCO RLE
                                        # {"size": [h, w], "counts": str | list}, a list of RLEs, or a path to a
                                        # binary PNG (relative to --masks, else --images, else the JSONL's folder)
     "height": 480, "width": 640,       # optional (read from the image otherwise)
     "question": "<image> Where is the red circle?",  # optional: the user prompt, used instead of the template
     "answer_prefix": "Answer:"}        # optional: what precedes <at> in the teacher-forced fast path

  A line with several expressions (``expressions``/``sents``) gives one sample per expression (ids ``ID#k``) with
  ``expressions="all"`` (the usual RefCOCO protocol), or only the first with ``expressions="first"``.

POPE (``coco_pope_{random,popular,adversarial}.json(l)``, JSON lines or one JSON list)::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
     "label": "yes"}                    # [id], [img_path], [question], label "yes"/"no"

Region captioning (the REC file format, e.g. ``REC_refcocog_google_val.jsonl``): ``img_path``, ``bbox`` and
``expression`` (the reference; ``expressions`` gives several references for one sample), optional ``question``
(a user prompt that refers to the box as ``[0]`` or ``<objs>``).

The synthetic shapes task of ``nextchat.training.synthetic`` (records with ``conversations``, ``queries`` and
``objects``) is read too: each query of the requested task becomes one sample, whose prompt is the user turn of
the record (as the model was trained) and whose target comes from ``objects`` (box), ``masks`` (RES) or the
assistant turn (region caption). Images there are relative to the JSONL's folder.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image


TASKS = ("rec", "res", "pope", "reg")


@dataclass
class EvalSample:
    """One evaluation sample (see the module docstring for the fields each task uses)."""

    id: str
    image: str
    task: str
    expression: str | None = None
    bbox: list[float] | None = None
    mask: Any = None
    references: list[str] | None = None
    question: str | None = None
    label: str | None = None
    answer_prefix: str | None = None
    height: int | None = None
    width: int | None = None
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------


class AnnotationError(ValueError):
    """An annotation file that cannot be evaluated: missing, empty, or with a malformed line (the message names the
    file and line)."""


def read_records_with_lines(path: str) -> list[tuple[int | None, dict]]:
    """``(line number, record)`` pairs of a JSON-lines file (blank lines ignored; numbers 1-based) or of a single
    JSON list (line numbers ``None``). Raises :class:`AnnotationError` naming ``path:line`` for a line that is not
    a JSON object, and for a file without any record (empty, only blank lines, or ``[]``)."""
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: no such annotation file")
    with open(path, encoding="utf-8") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as err:
            raise AnnotationError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(values, list):
            raise AnnotationError(f"{path}: expected JSON lines or one JSON list of objects")
        records = []
        for i, record in enumerate(values):
            if not isinstance(record, dict):
                raise AnnotationError(f"{path}: list item {i} is not a JSON object but {type(record).__name__}")
            records.append((None, record))
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise AnnotationError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise AnnotationError(f"{path}:{number}: not a JSON object but {type(record).__name__}")
            records.append((number, record))
    if not records:
        what = "an empty list" if stripped.startswith("[") else "only blank lines" if text else "empty"
        raise AnnotationError(f"{path}: no annotations (the file is {what})")
    return records


def read_records(path: str) -> list[dict]:
    """JSON lines (blank lines ignored) or a single JSON list of objects (see :func:`read_records_with_lines`)."""
    return [record for _, record in read_records_with_lines(path)]


def _first(record: dict, names: tuple[str, ...], where: str, required: bool = True):
    for name in names:
        if record.get(name) is not None:
            return record[name]
    if required:
        raise ValueError(f"{where}: has none of the fields {list(names)}")
    return None


def _box(record: dict, where: str, bbox_format: str) -> list[float]:
    box = _first(record, ("bbox", "box"), where)
    fmt = record.get("bbox_format", bbox_format)
    try:
        box = [float(v) for v in box]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: `bbox` must be 4 numbers, got {box!r}") from err
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(f"{where}: `bbox` must be 4 finite numbers, got {box!r}")
    if fmt == "xywh":
        box = [box[0], box[1], box[0] + box[2], box[1] + box[3]]
    elif fmt != "xyxy":
        raise ValueError(f"{where}: bbox_format must be 'xyxy' or 'xywh', got {fmt!r}")
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"{where}: `bbox` {box!r} ({fmt}) has x2 < x1 or y2 < y1")
    return box


def _expressions(record: dict, where: str) -> list[str]:
    value = _first(record, ("expression", "expressions", "sents", "sent"), where)
    values = [value] if isinstance(value, str) else list(value)
    out = []
    for v in values:
        if isinstance(v, dict):  # refer-style {"sent": ...}
            v = v.get("sent") or v.get("raw")
        if not isinstance(v, str):
            raise ValueError(f"{where}: expressions must be strings, got {v!r}")
        out.append(v)
    if not out:
        raise ValueError(f"{where}: no expression")
    return out


def _record_id(record: dict, index: int) -> str:
    value = _first(record, ("id", "question_id", "sample_id"), "", required=False)
    return str(index) if value is None else str(value)


def is_synthetic(records: list[dict]) -> bool:
    """Whether the records are the synthetic shapes task of ``nextchat.training.synthetic``."""
    return bool(records) and all(
        isinstance(r.get("conversations"), list) and isinstance(r.get("queries"), list) and "objects" in r
        for r in records[:5]
    )


def load_samples(task: str, path: str, bbox_format: str = "xyxy", expressions: str = "all") -> list[EvalSample]:
    """Read the annotation file ``path`` for ``task`` (``rec``, ``res``, ``pope`` or ``reg``).

    Raises :class:`AnnotationError` (a ``ValueError``) naming ``path:line`` for a missing or empty file, a line that
    is not a JSON object or lacks a field the task needs, and for a file that holds no sample of ``task``."""
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}")
    if expressions not in ("all", "first"):
        raise ValueError(f"`expressions` must be 'all' or 'first', got {expressions!r}")
    numbered = read_records_with_lines(path)
    records = [record for _, record in numbered]
    where_of = {}
    if is_synthetic(records):
        try:
            samples = synthetic_samples(task, records)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise AnnotationError(f"{path}: not a valid synthetic shapes file for {task} ({err!r})") from err
    else:
        samples = []
        for index, (line, record) in enumerate(numbered):
            where = f"{path}:{line}" if line is not None else f"{path}: list item {index}"
            try:
                new = _samples_of_record(task, record, index, bbox_format, expressions, where)
            except AnnotationError:
                raise
            except ValueError as err:
                raise AnnotationError(str(err)) from err
            for sample in new:
                where_of[sample.id] = where
            samples.extend(new)
    if not samples:
        raise AnnotationError(f"{path}: no {task} samples in its {len(records)} records")
    seen = {}
    for sample in samples:
        if sample.id in seen:
            raise AnnotationError(
                f"{where_of.get(sample.id, path)}: the sample id {sample.id!r} appears twice (first at "
                f"{seen[sample.id]}); ids must be unique"
            )
        seen[sample.id] = where_of.get(sample.id, path)
    return samples


def _samples_of_record(task, record, index, bbox_format, expressions, where) -> list[EvalSample]:
    sample_id = _record_id(record, index)
    image = _first(record, ("img_path", "image", "file_name", "image_path"), where)
    height = record.get("height")
    width = record.get("width")
    common = dict(image=str(image), task=task, question=record.get("question") if task != "pope" else None,
                  answer_prefix=record.get("answer_prefix"), height=height, width=width)
    if task == "pope":
        question = _first(record, ("text", "question"), where)
        label = str(_first(record, ("label", "answer"), where)).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{where}: POPE `label` must be 'yes' or 'no', got {label!r}")
        common["question"] = None
        return [EvalSample(id=sample_id, expression=str(question), label=label, **common)]
    has_box = any(record.get(k) is not None for k in ("bbox", "box"))
    box = _box(record, where, bbox_format) if (task != "res" or has_box) else None
    if task == "reg":
        return [EvalSample(id=sample_id, bbox=box, references=_expressions(record, where), **common)]
    has_expression = any(record.get(k) is not None for k in ("expression", "expressions", "sents", "sent"))
    exprs = _expressions(record, where) if has_expression or common["question"] is None else [""]
    mask = None
    if task == "res":
        mask = _first(record, ("mask", "segmentation", "mask_path"), where)
    if len(exprs) == 1 or expressions == "first":
        return [EvalSample(id=sample_id, expression=exprs[0], bbox=box, mask=mask, **common)]
    return [
        EvalSample(id=f"{sample_id}#{k}", expression=e, bbox=box, mask=mask, **common) for k, e in enumerate(exprs)
    ]


# --------------------------------------------------------------------------------------------------------------
# Synthetic shapes task (nextchat.training.synthetic) adapter
# --------------------------------------------------------------------------------------------------------------

_REF = re.compile(r"\[\s*\d+\s*\]")


def synthetic_samples(task: str, records: list[dict]) -> list[EvalSample]:
    """Samples of ``task`` from synthetic shapes records: one per query of that task (``queries[t]`` belongs to
    the t-th user turn). Prompts are the records' own user turns (with ``<image>`` put first when the turn lacks
    it, since every sample is evaluated as a single-turn conversation)."""
    wanted = {"rec": "rec", "res": "res", "reg": "reg"}.get(task)
    if wanted is None:
        raise ValueError(f"the synthetic shapes task has no {task!r} samples (it has rec, res and reg)")
    samples = []
    for index, record in enumerate(records):
        rid = str(record.get("id", index))
        users = [m["content"] for m in record["conversations"] if m.get("role") == "user"]
        assistants = [m["content"] for m in record["conversations"] if m.get("role") == "assistant"]
        for turn, query in enumerate(record["queries"]):
            if query.get("task") != wanted:
                continue
            obj = record["objects"][int(query["object"])]
            box = [float(v) for v in obj["box"]]
            phrase = f"{obj['color']} {obj['shape']}"
            question = users[turn].replace("<image>", "").strip()
            common = dict(id=f"{rid}/{turn}", image=str(record["image"]), task=task, bbox=box,
                          meta={"source": "synthetic", "turn": turn})
            if task == "reg":
                question = _REF.sub("[0]", question, count=1)
                answer = assistants[turn] if turn < len(assistants) else f"A {phrase}."
                samples.append(EvalSample(question="<image> " + question, references=[answer], **common))
                continue
            mask = None
            if task == "res":
                boxes = [[float(v) for v in b] for b in record.get("boxes", [])]
                masks = record.get("masks") or []
                if box in boxes and boxes.index(box) < len(masks):
                    mask = masks[boxes.index(box)]
                if mask is None:
                    raise ValueError(f"synthetic record {rid}: no mask for the object of turn {turn}")
            samples.append(EvalSample(expression=f"the {phrase}", question="<image> " + question, mask=mask,
                                      answer_prefix=f"The {phrase}", **common))
    return samples


# --------------------------------------------------------------------------------------------------------------
# Images and masks
# --------------------------------------------------------------------------------------------------------------


def resolve_path(name: str, *folders: str | None) -> str:
    """An image (or mask file) path: absolute as is; else under the first of ``folders`` that holds it."""
    if os.path.isabs(name):
        candidates = [name]
    else:
        candidates = [os.path.join(d, name) for d in folders if d]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"image {name!r} not found (looked in {candidates or ['(no folder given)']})")


def resolve_images(samples, images_dir: str | None, data_dir: str | None, shown: int = 5) -> dict[str, str]:
    """The path of every distinct image of ``samples`` (name -> path), checked up front: raises
    ``FileNotFoundError`` listing the first ``shown`` missing images and how many are missing."""
    paths, missing = {}, []
    for sample in samples:
        if sample.image in paths:
            continue
        try:
            paths[sample.image] = resolve_path(sample.image, images_dir, data_dir)
        except FileNotFoundError:
            paths[sample.image] = None
            missing.append(sample.image)
    if missing:
        folders = [d for d in (images_dir, data_dir) if d]
        listed = ", ".join(repr(m) for m in missing[:shown]) + (", ..." if len(missing) > shown else "")
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} images of the annotations not found (looked in "
            f"{' and '.join(folders) or '(no folder given)'}): {listed}"
        )
    return paths


def load_image(name: str, images_dir: str | None, data_dir: str | None) -> PIL.Image.Image:
    with PIL.Image.open(resolve_path(name, images_dir, data_dir)) as img:
        return img.convert("RGB")


def decode_mask(annotation, height: int, width: int, *folders: str | None) -> np.ndarray:
    """A ground-truth mask annotation -> bool ``(height, width)``.

    Accepts COCO polygons (list of flat ``[x, y, ...]`` lists; rasterised with pycocotools, as the original's
    ``frPyObjects`` + ``decode``, polygons united), a COCO RLE dict (compressed or not), a list of RLEs (united), a
    2-D array, or a path to a binary image file (non-zero = inside; relative paths are looked up in ``folders``)."""
    if annotation is None:
        raise ValueError("the RES sample has no mask")
    if isinstance(annotation, str):
        with PIL.Image.open(resolve_path(annotation, *folders)) as img:
            mask = np.asarray(img.convert("L")) > 0
    elif isinstance(annotation, dict):
        from nextchat.processing import rle_decode

        mask = rle_decode(annotation).astype(bool)
    elif isinstance(annotation, np.ndarray) and annotation.ndim == 2:
        mask = annotation.astype(bool)
    elif isinstance(annotation, (list, tuple)) and annotation and all(isinstance(a, dict) for a in annotation):
        mask = np.zeros((height, width), dtype=bool)
        for rle in annotation:
            mask |= decode_mask(rle, height, width)
    elif isinstance(annotation, (list, tuple)) and annotation and isinstance(annotation[0], (list, tuple)):
        if isinstance(annotation[0][0], (list, tuple)):  # a 2-D nested list mask
            mask = np.asarray(annotation).astype(bool)
        else:
            mask = _polygons_to_mask([list(map(float, p)) for p in annotation], height, width)
    else:
        raise ValueError(f"unsupported mask annotation of type {type(annotation).__name__}")
    if mask.shape != (height, width):
        raise ValueError(f"the mask has shape {mask.shape} but the image is (height, width) = {(height, width)}")
    return mask


def _polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    polygons = [p for p in polygons if len(p) >= 6]
    if not polygons:
        return np.zeros((height, width), dtype=bool)
    try:
        from pycocotools import mask as mask_utils
    except ImportError:  # approximate rasterisation without pycocotools
        import PIL.ImageDraw

        canvas = PIL.Image.new("L", (width, height), 0)
        draw = PIL.ImageDraw.Draw(canvas)
        for p in polygons:
            draw.polygon([(p[i], p[i + 1]) for i in range(0, len(p) - 1, 2)], fill=1)
        return np.asarray(canvas) > 0
    rles = mask_utils.frPyObjects(polygons, height, width)
    decoded = mask_utils.decode(rles)
    return decoded.reshape(height, width, -1).sum(axis=2) > 0


__all__ = [
    "AnnotationError",
    "EvalSample",
    "TASKS",
    "decode_mask",
    "is_synthetic",
    "load_image",
    "load_samples",
    "read_records",
    "read_records_with_lines",
    "resolve_images",
    "resolve_path",
    "synthetic_samples",
]
