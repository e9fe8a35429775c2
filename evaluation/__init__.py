"""nextchat.evaluation: the paper's benchmarks (REC, RES, POPE, region captioning) as metrics, runners and the
``nextchat-eval`` command. See :mod:`nextchat.evaluation.runners` for the protocol and
:mod:`nextchat.evaluation.data` for the annotation formats."""

from .data import AnnotationError, EvalSample, decode_mask, load_samples
from .metrics import (
    box_iou,
    caption_metrics,
    extract_caption,
    mask_intersection_union,
    parse_pope_answer,
    pope_metrics,
    rec_metrics,
    rec_metrics_from_ious,
    res_metrics,
)
from .paper import PAPER_RESULTS, detect_split, paper_results
from .runners import (
    DEFAULT_TEMPLATES,
    FastRecWarning,
    build_prompt,
    compute_metrics,
    evaluate,
    evaluate_pope,
    evaluate_rec,
    evaluate_reg,
    evaluate_res,
    format_results_table,
    prepare_run,
)


__all__ = [
    "AnnotationError",
    "DEFAULT_TEMPLATES",
    "EvalSample",
    "FastRecWarning",
    "PAPER_RESULTS",
    "box_iou",
    "build_prompt",
    "caption_metrics",
    "compute_metrics",
    "decode_mask",
    "detect_split",
    "evaluate",
    "evaluate_pope",
    "evaluate_rec",
    "evaluate_reg",
    "evaluate_res",
    "extract_caption",
    "format_results_table",
    "load_samples",
    "mask_intersection_union",
    "paper_results",
    "parse_pope_answer",
    "pope_metrics",
    "prepare_run",
    "rec_metrics",
    "rec_metrics_from_ious",
    "res_metrics",
]
