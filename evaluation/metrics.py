"""Metrics of the NExT-Chat benchmarks, as the original evaluation code defines them, as small pure functions.

* REC: :func:`box_iou` / :func:`rec_metrics` -- accuracy = fraction of samples whose IoU is **strictly** above 0.5
  (an IoU of exactly 0.5 is a miss), and the mean IoU. A missing prediction counts as IoU 0.
* RES: :func:`mask_intersection_union` / :func:`res_metrics` -- cIoU = sum(I) / sum(U) over the split (the
  original's number) and gIoU = mean of the per-sample IoUs (which the original lacks; LISA's convention: a sample
  whose prediction and target are both empty has IoU 1). ``failed`` counts the samples with no intersection
  (the original's ``failed = #(I <= 0)``).
* POPE: :func:`parse_pope_answer` (the original's ``PopeComputeMetrics.extract_ans``) and :func:`pope_metrics`
  (accuracy, precision, recall, F1, yes-ratio; every parsed answer other than ``"no"`` counts as *yes*, as in the
  original).
* Region captioning: :func:`caption_metrics` -- CIDEr (x100) with pycocoevalcap's ``Cider`` scorer after its
  ``PTBTokenizer`` (which needs ``java``; without Java a documented pure-Python approximation of the PTB
  tokenisation is used and the result says so), and METEOR (x100) from pycocoevalcap where Java is present.

All functions take plain Python / numpy values and return plain ``float``/``int`` dicts.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Sequence

import numpy as np


# --------------------------------------------------------------------------------------------------------------
# REC
# --------------------------------------------------------------------------------------------------------------


def box_iou(pred, target) -> np.ndarray:
    """Element-wise IoU of two sets of xyxy boxes ``(n, 4)`` (any common frame: pixels or normalised).

    Matches ``torchvision.ops.box_iou`` on the diagonal, which the original uses, for well-formed boxes. A box
    with ``x2 < x1`` or ``y2 < y1`` (an inverted raw prediction) has no area and IoU 0 -- what torchvision gives
    too, since its intersection with any box is empty. Two empty boxes have IoU 0.
    """
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    target = np.asarray(target, dtype=np.float64).reshape(-1, 4)
    if pred.shape != target.shape:
        raise ValueError(f"`pred` and `target` must hold the same number of boxes, got {pred.shape} and {target.shape}")
    if not (np.all(np.isfinite(pred)) and np.all(np.isfinite(target))):
        raise ValueError("boxes must be finite")
    area_p = np.clip(pred[:, 2] - pred[:, 0], 0, None) * np.clip(pred[:, 3] - pred[:, 1], 0, None)
    area_t = np.clip(target[:, 2] - target[:, 0], 0, None) * np.clip(target[:, 3] - target[:, 1], 0, None)
    lt = np.maximum(pred[:, :2], target[:, :2])
    rb = np.minimum(pred[:, 2:], target[:, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[:, 0] * wh[:, 1]
    inter = np.where((area_p > 0) & (area_t > 0), inter, 0.0)
    union = area_p + area_t - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def rec_metrics(pred_boxes: Sequence, target_boxes: Sequence, threshold: float = 0.5) -> dict:
    """REC accuracy (IoU strictly above ``threshold``) and mean IoU.

    Args:
        pred_boxes: one xyxy box per sample, or ``None`` where the model gave no box (counted as IoU 0 and as
            ``failed``).
        target_boxes: one xyxy box per sample, in the same frame as the predictions.

    Returns:
        ``{"accuracy", "miou", "n", "correct", "failed"}`` (accuracy and mIoU as fractions in [0, 1]).
    """
    if len(pred_boxes) != len(target_boxes):
        raise ValueError(f"{len(pred_boxes)} predictions for {len(target_boxes)} targets")
    ious = [
        0.0 if p is None else float(box_iou(p, t)[0]) for p, t in zip(pred_boxes, target_boxes)
    ]
    return rec_metrics_from_ious(ious, failed=sum(p is None for p in pred_boxes), threshold=threshold)


def rec_metrics_from_ious(ious: Sequence[float], failed: int = 0, threshold: float = 0.5) -> dict:
    """:func:`rec_metrics` from per-sample IoUs (what the runners store)."""
    ious = np.asarray(list(ious), dtype=np.float64)
    n = int(ious.size)
    correct = int((ious > threshold).sum())
    return {
        "accuracy": correct / n if n else 0.0,
        "miou": float(ious.mean()) if n else 0.0,
        "n": n,
        "correct": correct,
        "failed": int(failed),
    }


# --------------------------------------------------------------------------------------------------------------
# RES
# --------------------------------------------------------------------------------------------------------------


def mask_intersection_union(pred, target) -> tuple[int, int]:
    """Pixel counts ``(intersection, union)`` of two binary masks of the same shape (``None`` prediction = empty)."""
    target = np.asarray(target).astype(bool)
    if pred is None:
        return 0, int(target.sum())
    pred = np.asarray(pred).astype(bool)
    if pred.shape != target.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, target {target.shape}")
    return int(np.logical_and(pred, target).sum()), int(np.logical_or(pred, target).sum())


def res_metrics(intersections: Sequence[int], unions: Sequence[int]) -> dict:
    """RES metrics from per-sample intersections and unions (pixel counts).

    Returns:
        ``{"ciou", "giou", "n", "failed"}``: cIoU = sum(I) / sum(U) (0 when every union is empty), gIoU = mean of
        I/U per sample (a sample with U = 0, prediction and target both empty, counts as 1), ``failed`` = number
        of samples with I <= 0 (the original's count).
    """
    inter = np.asarray(list(intersections), dtype=np.float64)
    union = np.asarray(list(unions), dtype=np.float64)
    if inter.shape != union.shape:
        raise ValueError(f"{inter.size} intersections for {union.size} unions")
    if np.any(inter < 0) or np.any(union < inter):
        raise ValueError("each intersection must be >= 0 and <= its union")
    n = int(inter.size)
    per_sample = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 1.0)
    total_union = float(union.sum())
    return {
        "ciou": float(inter.sum()) / total_union if total_union > 0 else 0.0,
        "giou": float(per_sample.mean()) if n else 0.0,
        "n": n,
        "failed": int((inter <= 0).sum()),
    }


# --------------------------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------------------------

# The original's pattern (mllm/dataset/single_image_dataset/pope.py), verbatim.
POPE_ANSWER_PATTERN = re.compile(r"(?:(?:(?:(?:(?:So t)|(?:T)|(?:t))he answer is)|(?:Answer:)) (.+))")


def parse_pope_answer(text: str) -> str:
    """The original's POPE answer parsing (``PopeComputeMetrics.extract_ans``) applied to the generated answer.

    The original decodes prompt + answer and keeps what follows ``"ASSISTANT: "``, lower-cased; so here the
    answer is lower-cased first (a text that still contains ``"ASSISTANT: "`` is cut there, as in the original).
    Then ``the answer is X`` / ``So the answer is X`` / ``Answer: X`` is searched; with exactly one match the
    answer is ``X`` stripped of a trailing ``.``, otherwise it is ``"yes"`` if the text contains ``yes`` anywhere,
    else ``"no"``. (After lower-casing, only the ``the answer is`` form can match -- a quirk kept for parity:
    ``Answer: no`` falls back to the ``yes`` substring test, which gives ``no`` unless ``yes`` appears.)
    """
    if not isinstance(text, str):
        raise ValueError(f"a POPE answer must be a string, got {type(text).__name__}")
    if "ASSISTANT: " in text:
        text = text.split("ASSISTANT: ")[-1]
    text = text.lower()
    found = POPE_ANSWER_PATTERN.findall(text.strip())
    if len(found) != 1:
        return "yes" if "yes" in text else "no"
    return found[0].strip().rstrip(".").strip()


def pope_label(answer: str) -> int:
    """1 (yes) or 0 (no) from a parsed answer or a label, as the original maps them: only ``"no"`` is 0."""
    return 0 if str(answer).strip().lower() == "no" else 1


def pope_metrics(answers: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE accuracy, precision, recall, F1 and yes-ratio (fractions), yes being the positive class.

    Args:
        answers: parsed answers (:func:`parse_pope_answer`); anything but ``"no"`` is a *yes*, as in the original.
        labels: the ground-truth ``"yes"``/``"no"``.

    Precision, recall and F1 are 0 where their denominator is 0 (the original divides by zero there).
    """
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers for {len(labels)} labels")
    preds = [pope_label(a) for a in answers]
    gts = [pope_label(t) for t in labels]
    tp = sum(p == 1 and g == 1 for p, g in zip(preds, gts))
    fp = sum(p == 1 and g == 0 for p, g in zip(preds, gts))
    tn = sum(p == 0 and g == 0 for p, g in zip(preds, gts))
    fn = sum(p == 0 and g == 1 for p, g in zip(preds, gts))
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(preds) / n if n else 0.0,
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


# --------------------------------------------------------------------------------------------------------------
# Region captioning
# --------------------------------------------------------------------------------------------------------------

# The punctuation tokens pycocoevalcap's PTBTokenizer drops after tokenising.
PTB_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                    "...", ";"}


def extract_caption(text: str) -> str:
    """The original's caption clean-up (``REGCapComputeMetrics.extract_ans``): the part after ``"ASSISTANT: "``,
    lower-cased, cut at ``</s>``."""
    return text.split("ASSISTANT: ")[-1].lower().split("</s>")[0]


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (needed by PTBTokenizer and METEOR)."""
    return shutil.which("java") is not None


def simple_ptb_tokenize(text: str) -> str:
    """A pure-Python approximation of ``PTBTokenizer -lowerCase`` followed by pycocoevalcap's punctuation removal:
    lower-case; brackets become ``-lrb-``/``-rrb-``/``-lsb-``/``-rsb-``/``-lcb-``/``-rcb-`` (kept, as the lower-cased
    PTB tokens escape pycocoevalcap's removal list); quotes, ``. , ; : ! ? ... --`` are dropped (not inside
    numbers); the clitics ``'s n't 're 've 'll 'd 'm`` are split off. Used only where Java is missing; results then
    carry ``"tokenizer": "simple"``."""
    text = text.lower().replace("\n", " ")
    brackets = (("(", "-lrb-"), (")", "-rrb-"), ("[", "-lsb-"), ("]", "-rsb-"), ("{", "-lcb-"), ("}", "-rcb-"))
    for bracket, token in brackets:
        text = text.replace(bracket, f" {token} ")
    text = text.replace('"', " ")
    text = re.sub(r"([a-z0-9])(n't)\b", r"\1 \2", text)
    text = re.sub(r"([a-z0-9])('s|'re|'ve|'ll|'d|'m)\b", r"\1 \2", text)
    text = re.sub(r"(\.\.\.|--)", " ", text)
    text = re.sub(r"(?<![0-9])[.,:](?![0-9])|(?<=[0-9])[.,:](?![0-9])|(?<![0-9])[.,:](?=[0-9])", " ", text)
    text = re.sub(r"[;!?`]", " ", text)
    text = re.sub(r"(^|\s)'+(?!(?:s|re|ve|ll|d|m)\b)|'+(\s|$)", r"\1 \2", text)
    tokens = [t for t in text.split() if t not in PTB_PUNCTUATIONS]
    return " ".join(tokens)


def tokenize_captions(captions: dict, tokenizer: str = "auto") -> tuple[dict, str]:
    """``{key: [caption, ...]}`` -> ``({key: [tokenised, ...]}, tokenizer_used)`` with ``"ptb"`` (pycocoevalcap's
    PTBTokenizer, needs Java), ``"simple"`` (:func:`simple_ptb_tokenize`) or ``"auto"`` (PTB where Java exists)."""
    if tokenizer not in ("auto", "ptb", "simple"):
        raise ValueError(f"`tokenizer` must be 'auto', 'ptb' or 'simple', got {tokenizer!r}")
    if tokenizer == "auto":
        tokenizer = "ptb" if java_available() else "simple"
    if tokenizer == "simple":
        return {k: [simple_ptb_tokenize(c) for c in v] for k, v in captions.items()}, "simple"
    if not java_available():
        raise RuntimeError("tokenizer='ptb' needs `java` on PATH (apt-get install default-jre-headless)")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # PTBTokenizer reads one caption per line: keep each caption on a single line, and never empty (an empty
    # line would shift every following caption).
    prepared = {k: [{"caption": (c.replace("\n", " ").strip() or ".")} for c in v] for k, v in captions.items()}
    return PTBTokenizer().tokenize(prepared), "ptb"


def caption_metrics(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    tokenizer: str = "auto",
    meteor: bool | None = None,
) -> dict:
    """Region-captioning CIDEr (and METEOR) with pycocoevalcap, as the original's ``REGCapComputeMetrics``.

    Args:
        predictions: one generated caption per sample (already cleaned with :func:`extract_caption`).
        references: per sample one reference string or a list of them.
        tokenizer: ``"auto"`` (PTBTokenizer with Java, else the simple approximation), ``"ptb"`` or ``"simple"``.
        meteor: compute METEOR (needs Java; ``None`` = where Java is present).

    Returns:
        ``{"cider", "meteor", "n", "tokenizer"}``: ``cider`` is pycocoevalcap's CIDEr-D x 100 (the paper's scale),
        ``meteor`` its METEOR x 100 (``None`` when not computed).
    """
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError as err:  # pragma: no cover - dependency message
        raise ImportError("region-caption metrics need pycocoevalcap: pip install pycocoevalcap") from err
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(predictions)
    if n == 0:
        return {"cider": 0.0, "meteor": None, "n": 0, "tokenizer": None}
    refs = {i: ([r] if isinstance(r, str) else list(r)) for i, r in enumerate(references)}
    if any(len(r) == 0 for r in refs.values()):
        raise ValueError("every sample needs at least one reference caption")
    preds = {i: [p] for i, p in enumerate(predictions)}
    refs_tok, used = tokenize_captions(refs, tokenizer)
    preds_tok, _ = tokenize_captions(preds, used)
    cider, _ = Cider().compute_score(refs_tok, preds_tok)
    meteor_score = None
    if meteor is None:
        meteor = java_available()
    if meteor:
        if not java_available():
            raise RuntimeError("METEOR needs `java` on PATH (apt-get install default-jre-headless)")
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            meteor_value, _ = scorer.compute_score(refs_tok, preds_tok)
        finally:
            _close_meteor(scorer)
        meteor_score = float(meteor_value) * 100.0
    cider = float(cider) * 100.0
    if not math.isfinite(cider):
        cider = 0.0
    return {"cider": cider, "meteor": meteor_score, "n": n, "tokenizer": used}


def _close_meteor(scorer) -> None:
    """Stop METEOR's Java subprocess (pycocoevalcap only does it in ``__del__``)."""
    proc = getattr(scorer, "meteor_p", None)
    if proc is None:
        return
    lock = getattr(scorer, "lock", None)
    try:
        if lock is not None:
            lock.acquire()
        proc.stdin.close()
        proc.kill()
        proc.wait()
    except Exception:  # noqa: BLE001 - best effort clean-up
        pass
    finally:
        if lock is not None:
            lock.release()


__all__ = [
    "POPE_ANSWER_PATTERN",
    "box_iou",
    "caption_metrics",
    "extract_caption",
    "java_available",
    "mask_intersection_union",
    "parse_pope_answer",
    "pope_label",
    "pope_metrics",
    "rec_metrics",
    "rec_metrics_from_ious",
    "res_metrics",
    "simple_ptb_tokenize",
    "tokenize_captions",
]
