"""The published NExT-Chat-7B numbers (arXiv 2311.04498, Tables 1-4), by task and split, and
the split names read from the public annotation file names.

Values are percentages (CIDEr and METEOR on their usual x100 scale), as printed in the paper's tables:
REC accuracy@0.5 (Table 3), RES cIoU (Table 2), POPE accuracy and F1 (Table 1), RefCOCOg region captioning
CIDEr / METEOR (Table 4). RefCOCOg REC/RES splits are the umd ones; region captioning uses the google val split.
"""

from __future__ import annotations

import os
import re


PAPER_SOURCE = "NExT-Chat-7B, arXiv 2311.04498 (Tables 1-4)"

PAPER_RESULTS: dict[str, dict[str, dict[str, float]]] = {
    "rec": {
        "refcoco_val": {"accuracy": 85.5},
        "refcoco_testA": {"accuracy": 90.0},
        "refcoco_testB": {"accuracy": 77.9},
        "refcoco+_val": {"accuracy": 77.2},
        "refcoco+_testA": {"accuracy": 84.5},
        "refcoco+_testB": {"accuracy": 68.0},
        "refcocog_val": {"accuracy": 80.1},
        "refcocog_test": {"accuracy": 79.8},
    },
    "res": {
        "refcoco_val": {"ciou": 74.7},
        "refcoco_testA": {"ciou": 78.9},
        "refcoco_testB": {"ciou": 69.5},
        "refcoco+_val": {"ciou": 65.1},
        "refcoco+_testA": {"ciou": 71.9},
        "refcoco+_testB": {"ciou": 56.7},
        "refcocog_val": {"ciou": 67.0},
        "refcocog_test": {"ciou": 67.0},
    },
    "pope": {
        "random": {"accuracy": 87.70, "f1": 87.28},
        "popular": {"accuracy": 84.57, "f1": 84.14},
        "adversarial": {"accuracy": 81.93, "f1": 81.91},
    },
    "reg": {
        "refcocog_google_val": {"cider": 79.6, "meteor": 12.0},
    },
}

_REF_SPLIT = re.compile(r"(refcocog|refcoco\+|refcoco)(?:_(unc|umd|google))?_(val|testa|testb|test)(?![a-z])")
_POPE_SPLIT = re.compile(r"(random|popular|adversarial)")


def detect_split(task: str, path: str) -> str | None:
    """The paper split of an annotation file from its name, e.g. ``REC_refcoco+_unc_testA.jsonl`` ->
    ``refcoco+_testA``, ``coco_pope_popular.json`` -> ``popular``, ``REC_refcocog_google_val.jsonl`` (region
    captioning) -> ``refcocog_google_val``; ``None`` when the name says nothing known."""
    name = os.path.basename(str(path)).lower()
    if task == "pope":
        match = _POPE_SPLIT.search(name)
        return match.group(1) if match else None
    match = _REF_SPLIT.search(name)
    if not match:
        return None
    dataset, partition, split = match.groups()
    split = {"testa": "testA", "testb": "testB"}.get(split, split)
    if dataset == "refcocog" and partition == "google":
        return f"refcocog_google_{split}"
    return f"{dataset}_{split}"


def paper_results(task: str, split: str | None) -> dict[str, float] | None:
    """The paper's numbers for ``task`` on ``split`` (percentages), or ``None``."""
    if split is None:
        return None
    return PAPER_RESULTS.get(task, {}).get(split)


__all__ = ["PAPER_RESULTS", "PAPER_SOURCE", "detect_split", "paper_results"]
