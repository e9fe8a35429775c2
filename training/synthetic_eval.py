"""Evaluation of the synthetic shapes task through the real inference path (`model.generate` +
`processor.post_process_generation`), on seeds never used for training.

For every seed one scene is drawn (:func:`nextchat.training.synthetic.render_scene`) and four single-turn queries
are asked:

* ``rec``: "Where is the red circle?" (the target is the object given a distractor — another object of the same
  colour or shape — whenever the scene has one). Metric: Acc@0.5 = fraction whose FIRST grounded box has IoU > 0.5
  with the ground truth (a reply without a box counts as a miss); mean IoU.
* ``res``: "Segment the blue square." on a random object. Metric: mean mask IoU at the original resolution (no mask
  -> 0), and cIoU = sum(I) / sum(U). To tell SAM's errors from localisation errors, also the fraction of replies
  whose box hits the object (IoU > 0.5) and the mean mask IoU over those replies only.
* ``reg``: "What is in [0]?" with the box of a random object. Metric: exact match of the answer with
  "a <colour> <shape>" (case and final period ignored).
* ``gc``: "Describe the image with object locations." Metric: box recall@0.5 = fraction of ground-truth objects
  matched by some grounded box with IoU >= 0.5 (one-to-one, greedy by IoU); also the recall when the grounded
  phrase must name the object's colour and shape too, and box precision.

`python -m nextchat.training.synthetic_eval MODEL_DIR [--seed-start 1000000] [--num 300]`

Opt-in (issue 24; the default queries, keys and figures above are unchanged):

* ``every_object`` (``--every-object``): rec, res and reg are asked about every object of each scene (each object
  exactly once per task) instead of one per scene; gc once per scene.
* ``phrasings`` (``--phrasings postposed,indirect`` or ``held_out``, ``train``, ``all``): the rec/res/reg/gc
  questions are worded in those phrasing families (:data:`nextchat.training.synthetic.PHRASING_FAMILIES`), in turn
  (the i-th query of a task takes family i mod F, so every family gets as many queries); the figures are also
  reported per family under ``by_phrasing``.
* ``absent`` (``--absent``): one question per scene about a colour/shape combination not in it (sharing the colour
  or the shape of an object of the scene where possible), worded as a rec question. Figures: ``absent_no_box_rate``
  (the reply has no box), ``absent_says_absent_rate`` (the reply contains "no <colour> <shape>", case ignored, as in
  "There is no purple circle."), ``absent_correct_rate`` (both).
* ``second_turn`` (``--second-turn``): every rec query is asked again as the SECOND turn of a conversation whose
  first turn is another task (reg, gc, res on another object, in turn) with its reference answer as the history
  (teacher-forced: the model's own first answer is not used). Figures: ``rec_acc@0.5_first_turn`` and
  ``rec_acc@0.5_second_turn`` on the same queries (same object, same wording), and their paired difference
  ``rec_acc@0.5_second_minus_first``.
* ``relations`` (``--relations``): every object that an unambiguous relation names
  (:func:`nextchat.training.synthetic.relational_phrases`) is asked for by that relation, worded as a rec question:
  "Where is the left one of the two red shapes?" (in the given families that can word a relation: not those of
  ``RELATION_AS_TEMPLATE``; the template wording when none can). Figure: ``rec_relation_acc@0.5``.
* ``intervals`` (``--intervals``; on by default whenever an opt-in option is): ``ci95`` gives, per figure, a 95%
  interval: Wilson score intervals for proportions (Acc@0.5, exact match, recalls, precision, absent rates; gc
  figures pool the objects / predicted boxes), normal intervals (mean +- 1.96 sd / sqrt(n), clipped to the range)
  for mean IoUs and for the paired second-minus-first difference, and a percentile bootstrap (2,000 resamples of
  the queries, seed 0) for cIoU, a ratio of sums. Intervals treat queries as independent; queries about objects of
  the same scene are not quite, so the intervals are slightly optimistic with ``every_object``.
* ``--robust``: ``--every-object --absent --second-turn --relations --intervals`` with the held-out families (unless
  ``--phrasings`` is given): the evaluation of issue 24 (use ``--num 1000`` or more).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from .synthetic import (
    GC_TEMPLATES,
    HELD_OUT_PHRASINGS,
    REC_TEMPLATES,
    RELATION_AS_TEMPLATE,
    REG_TEMPLATES,
    RES_TEMPLATES,
    SHAPES,
    absent_attributes,
    family_question,
    gc_answer,
    has_distractor,
    phrase,
    relational_phrases,
    render_scene,
    resolve_phrasings,
)


EVAL_SEED_START = 1_000_000  # training data uses seeds below this, and the warm-up section of train_shapes.sh 2_000_000+


def box_iou(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mask_iou(pred, gt) -> tuple[float, int, int]:
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    inter, union = int((pred & gt).sum()), int((pred | gt).sum())
    return (inter / union if union else 0.0), inter, union


def _norm_text(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def build_queries(seeds, scene_kwargs=None) -> list[dict]:
    """The evaluation queries of `seeds` (deterministic)."""
    queries = []
    for seed in seeds:
        image, objects = render_scene(int(seed), **(scene_kwargs or {}))
        rng = np.random.default_rng([int(seed), 2])
        hard = [j for j in range(len(objects)) if has_distractor(objects, j)]
        k_rec = hard[int(rng.integers(len(hard)))] if hard else int(rng.integers(len(objects)))
        k_res = int(rng.integers(len(objects)))
        k_reg = int(rng.integers(len(objects)))
        common = {"seed": int(seed), "image": image, "objects": objects}
        queries.append({**common, "task": "rec", "object": k_rec, "boxes": None,
                        "question": REC_TEMPLATES[rng.integers(len(REC_TEMPLATES))].format(p=phrase(objects[k_rec]))})
        queries.append({**common, "task": "res", "object": k_res, "boxes": None,
                        "question": RES_TEMPLATES[rng.integers(len(RES_TEMPLATES))].format(p=phrase(objects[k_res]))})
        queries.append({**common, "task": "reg", "object": k_reg, "boxes": [objects[k_reg]["box"]],
                        "question": REG_TEMPLATES[rng.integers(len(REG_TEMPLATES))].format(i=0)})
        queries.append({**common, "task": "gc", "object": None, "boxes": None,
                        "question": GC_TEMPLATES[rng.integers(len(GC_TEMPLATES))]})
    return queries


def _every_object_queries(seeds, scene_kwargs=None) -> list[dict]:
    """rec, res and reg about every object of each scene (each object once per task), gc once per scene."""
    queries = []
    for seed in seeds:
        image, objects = render_scene(int(seed), **(scene_kwargs or {}))
        rng = np.random.default_rng([int(seed), 2])
        common = {"seed": int(seed), "image": image, "objects": objects}
        for k in range(len(objects)):
            queries.append({**common, "task": "rec", "object": k, "boxes": None,
                            "question": REC_TEMPLATES[rng.integers(len(REC_TEMPLATES))].format(p=phrase(objects[k]))})
        for k in range(len(objects)):
            queries.append({**common, "task": "res", "object": k, "boxes": None,
                            "question": RES_TEMPLATES[rng.integers(len(RES_TEMPLATES))].format(p=phrase(objects[k]))})
        for k in range(len(objects)):
            queries.append({**common, "task": "reg", "object": k, "boxes": [objects[k]["box"]],
                            "question": REG_TEMPLATES[rng.integers(len(REG_TEMPLATES))].format(i=0)})
        queries.append({**common, "task": "gc", "object": None, "boxes": None,
                        "question": GC_TEMPLATES[rng.integers(len(GC_TEMPLATES))]})
    return queries


def _first_turn(kind: str, objects: list[dict], target: int, rng) -> tuple[list[dict], list]:
    """The history (a user turn with `<image>` and its reference answer) of a first turn of task `kind` about an
    object other than `target` where there is one, and the boxes it refers to."""
    others = [j for j in range(len(objects)) if j != target] or [target]
    j = others[int(rng.integers(len(others)))]
    if kind == "reg":
        question = REG_TEMPLATES[int(rng.integers(len(REG_TEMPLATES)))].format(i=0)
        return [{"role": "user", "content": "<image> " + question},
                {"role": "assistant", "content": f"A {phrase(objects[j])}."}], [objects[j]["box"]]
    if kind == "res":
        question = RES_TEMPLATES[int(rng.integers(len(RES_TEMPLATES)))].format(p=phrase(objects[j]))
        return [{"role": "user", "content": "<image> " + question},
                {"role": "assistant", "content": f"The {phrase(objects[j])} [0]."}], [objects[j]["box"]]
    index: dict[int, int] = {}

    def ref(k):
        index.setdefault(k, len(index))
        return f"[{index[k]}]"

    answer = gc_answer(objects, ref, rng, "name")
    boxes = [objects[k]["box"] for k in sorted(index, key=index.get)]
    question = GC_TEMPLATES[int(rng.integers(len(GC_TEMPLATES)))]
    return [{"role": "user", "content": "<image> " + question}, {"role": "assistant", "content": answer}], boxes


SECOND_TURN_AFTER = ("reg", "gc", "res")


def build_query_set(seeds, every_object: bool = False, phrasings=None, absent: bool = False,
                    second_turn: bool = False, relations: bool = False, scene_kwargs=None) -> list[dict]:
    """The queries of the opt-in evaluation (see the module docstring); with no option, :func:`build_queries`.
    Deterministic. Query tasks: rec, res, reg, gc, and ``absent`` / ``rec_turn2`` / ``rec_relation`` when asked
    for."""
    seeds = [int(s) for s in seeds]
    queries = _every_object_queries(seeds, scene_kwargs) if every_object else build_queries(seeds, scene_kwargs)
    if phrasings is not None:
        families = resolve_phrasings(phrasings, allow_held_out=True)
        count = {t: 0 for t in ("rec", "res", "reg", "gc", "absent", "rec_relation")}
        rngs = {}
        for q in queries:
            family = families[count[q["task"]] % len(families)]
            count[q["task"]] += 1
            rng = rngs.setdefault(q["seed"], np.random.default_rng([q["seed"], 4]))
            o = q["objects"][q["object"]] if q["object"] is not None else {"color": None, "shape": None}
            q["question"] = family_question(family, q["task"], rng, o["color"], o["shape"], i=0)
            q["phrasing"] = family
    else:
        families, count = None, {"absent": 0, "rec_relation": 0}
    extra = []
    if absent:
        for seed in seeds:
            image, objects = render_scene(seed, **(scene_kwargs or {}))
            rng = np.random.default_rng([seed, 5])
            color, shape = absent_attributes(objects, rng, (scene_kwargs or {}).get("shapes", SHAPES))
            family = families[count["absent"] % len(families)] if families else "template"
            count["absent"] += 1
            extra.append({"seed": seed, "image": image, "objects": objects, "task": "absent", "object": None,
                          "boxes": None, "absent": [color, shape], "phrasing": family,
                          "question": family_question(family, "rec", rng, color, shape)})
            if families is None:
                del extra[-1]["phrasing"]
    if relations:
        # families that reword the colour and shape words cannot word a relation: the others, else the template
        wording = tuple(f for f in families or () if f not in RELATION_AS_TEMPLATE) or None
        for seed in seeds:
            image, objects = render_scene(seed, **(scene_kwargs or {}))
            rng = np.random.default_rng([seed, 7])
            for k in range(len(objects)):
                options = relational_phrases(objects, k)
                if not options:
                    continue
                relation = options[int(rng.integers(len(options)))]
                family = wording[count["rec_relation"] % len(wording)] if wording else "template"
                count["rec_relation"] += 1
                extra.append({"seed": seed, "image": image, "objects": objects, "task": "rec_relation", "object": k,
                              "boxes": None, "relation": relation,
                              "question": family_question(family, "rec", rng, p=relation),
                              **({"phrasing": family} if families else {})})
    if second_turn:
        n = 0
        for position, q in enumerate(queries):
            if q["task"] != "rec":
                continue
            rng = np.random.default_rng([q["seed"], 6, q["object"]])
            kind = SECOND_TURN_AFTER[n % len(SECOND_TURN_AFTER)]
            n += 1
            history, boxes = _first_turn(kind, q["objects"], q["object"], rng)
            extra.append({**q, "task": "rec_turn2", "history": history, "boxes": boxes, "first_turn": kind,
                          "pair": position})
    return queries + extra


@torch.no_grad()
def run_queries(model, processor, queries, batch_size: int = 48, max_new_tokens: dict | None = None) -> list[dict]:
    """Generate (greedy) for every query; returns the post-processed results in query order."""
    limits = {"rec": 16, "res": 16, "reg": 16, "gc": 64, "absent": 24, "rec_turn2": 16, "rec_relation": 16,
              **(max_new_tokens or {})}
    results = [None] * len(queries)
    device = next(model.parameters()).device
    use_sam = getattr(model, "sam", None) is not None and processor.image_processor.sam_image_size is not None
    present = {q["task"] for q in queries}
    tasks = ("rec", "res", "reg", "gc") + tuple(t for t in ("absent", "rec_turn2", "rec_relation") if t in present)
    for task in tasks:
        index = [i for i, q in enumerate(queries) if q["task"] == task]
        for start in range(0, len(index), batch_size):
            chunk = index[start : start + batch_size]
            texts = [processor.apply_chat_template(_messages(queries[i]), add_generation_prompt=True) for i in chunk]
            boxes = [queries[i]["boxes"] or None for i in chunk]
            inputs = processor(
                images=[queries[i]["image"] for i in chunk], text=texts,
                boxes=boxes if any(b is not None for b in boxes) else None,
                padding_side="left", return_sam_pixel_values=use_sam and task == "res",  # only res scores masks
            )
            image_sizes = inputs.pop("image_sizes")
            inputs = {k: v.to(device) for k, v in inputs.items()}
            output = model.generate(
                **inputs, max_new_tokens=limits[task], do_sample=False, num_beams=1, return_dict_in_generate=True,
                pad_token_id=processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0,
            )
            processed = processor.post_process_generation(output, image_sizes=image_sizes)
            for i, result in zip(chunk, processed):
                results[i] = result
    return results


def _messages(query: dict) -> list[dict]:
    """The conversation of a query: its history (if any) and its question (`<image>` in the first user turn)."""
    if query.get("history"):
        return list(query["history"]) + [{"role": "user", "content": query["question"]}]
    return [{"role": "user", "content": "<image> " + query["question"]}]


Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson_interval(successes: int, total: int, z: float = Z95) -> list[float]:
    """The Wilson score interval of a proportion (successes / total); [nan, nan] without trials."""
    if total <= 0:
        return [float("nan"), float("nan")]
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return [max(0.0, centre - half), min(1.0, centre + half)]


def normal_interval(values, low: float = 0.0, high: float = 1.0, z: float = Z95) -> list[float]:
    """mean +- z * sd / sqrt(n) (sd with n - 1), clipped to [low, high]; [nan, nan] for fewer than 2 values."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return [float("nan"), float("nan")]
    half = z * float(values.std(ddof=1)) / math.sqrt(len(values))
    return [max(low, float(values.mean()) - half), min(high, float(values.mean()) + half)]


def bootstrap_ratio_interval(numerators, denominators, resamples: int = 2000, seed: int = 0) -> list[float]:
    """Percentile bootstrap (resampling the items) 95% interval of sum(numerators) / sum(denominators)."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if len(num) == 0:
        return [float("nan"), float("nan")]
    picks = np.random.default_rng(seed).integers(len(num), size=(resamples, len(num)))
    sums = den[picks].sum(axis=1)
    ratios = np.where(sums > 0, num[picks].sum(axis=1) / np.where(sums > 0, sums, 1), np.nan)
    return [float(np.nanpercentile(ratios, 2.5)), float(np.nanpercentile(ratios, 97.5))]


def score(queries, results, intervals: bool = False) -> dict:
    """The figures of the module docstring. Extra figures appear only when the queries hold ``absent`` or
    ``rec_turn2`` queries, ``by_phrasing`` only when they record their phrasing family, ``ci95`` only with
    `intervals`."""
    metrics = _score(queries, results, intervals)
    phrasings = [q.get("phrasing") for q in queries]
    if any(f is not None for f in phrasings):
        metrics["by_phrasing"] = {}
        for family in dict.fromkeys(f for f in phrasings if f is not None):
            keep = [i for i, f in enumerate(phrasings) if f == family and queries[i]["task"] != "rec_turn2"]
            part = _score([queries[i] for i in keep], [results[i] for i in keep], intervals)
            metrics["by_phrasing"][family] = {
                k: v for k, v in part.items() if not (isinstance(v, float) and math.isnan(v))
            }
    return metrics


def _score(queries, results, intervals: bool) -> dict:
    rec_hits, rec_ious, rec_hard = [], [], []
    res_ious, res_inter, res_union, res_box_hits = [], 0, 0, []
    reg_hits = []
    gc_total = gc_box = gc_named = gc_pred = gc_pred_hit = 0
    res_parts = []  # (intersection, union) per res query, for cIoU's interval
    gc_box_hits, gc_named_hits, gc_pred_hits = [], [], []  # per object / per predicted box, for the intervals
    absent_no_box, absent_says = [], []
    relation_hits = []
    turn2 = {}  # position of the paired first-turn rec query -> hit
    position = {id(q): i for i, q in enumerate(queries)}
    first_turn_hit = {}
    for q, r in zip(queries, results):
        objects = q["objects"]
        entities = [e for e in r["entities"] if e.get("box") is not None]
        if q["task"] == "absent":
            color, shape = q["absent"]
            absent_no_box.append(not entities)
            absent_says.append(f"no {color} {shape}" in _norm_text(r["text"]))
            continue
        if q["task"] == "rec_relation":
            iou = box_iou(entities[0]["box"], objects[q["object"]]["box"]) if entities else 0.0
            relation_hits.append(iou > 0.5)
            continue
        if q["task"] == "rec_turn2":
            iou = box_iou(entities[0]["box"], objects[q["object"]]["box"]) if entities else 0.0
            turn2[q["pair"]] = iou > 0.5
            continue
        if q["task"] == "rec":
            target = objects[q["object"]]
            iou = box_iou(entities[0]["box"], target["box"]) if entities else 0.0
            rec_ious.append(iou)
            rec_hits.append(iou > 0.5)
            rec_hard.append(has_distractor(objects, q["object"]))
            first_turn_hit[position[id(q)]] = iou > 0.5
        elif q["task"] == "res":
            target = objects[q["object"]]
            mask = entities[0].get("mask") if entities else None
            if mask is None:
                iou, inter, union = 0.0, 0, int(target["mask"].sum())
            else:
                iou, inter, union = mask_iou(mask, target["mask"])
            res_ious.append(iou)
            res_box_hits.append(bool(entities) and box_iou(entities[0]["box"], target["box"]) > 0.5)
            res_inter += inter
            res_union += union
            res_parts.append((inter, union))
        elif q["task"] == "reg":
            reg_hits.append(_norm_text(r["text"]) == _norm_text(f"a {phrase(objects[q['object']])}"))
        else:
            gc_total += len(objects)
            gc_pred += len(entities)
            pairs = sorted(
                ((box_iou(e["box"], o["box"]), ei, oi) for ei, e in enumerate(entities) for oi, o in enumerate(objects)),
                reverse=True,
            )
            used_e, used_o = set(), set()
            named = 0
            for iou, ei, oi in pairs:
                if iou < 0.5:
                    break
                if ei in used_e or oi in used_o:
                    continue
                used_e.add(ei)
                used_o.add(oi)
                gc_box += 1
                hit = _norm_text(entities[ei]["text"]).endswith(phrase(objects[oi]))
                gc_named += hit
                named += hit
            gc_pred_hit += len(used_e)
            gc_box_hits += [True] * len(used_o) + [False] * (len(objects) - len(used_o))
            gc_named_hits += [True] * named + [False] * (len(objects) - named)
            gc_pred_hits += [True] * len(used_e) + [False] * (len(entities) - len(used_e))
    mean = lambda xs: float(np.mean(xs)) if len(xs) else float("nan")  # noqa: E731
    metrics = {
        "rec_acc@0.5": mean(rec_hits),
        "rec_miou": mean(rec_ious),
        "rec_acc@0.5_with_distractor": mean([h for h, d in zip(rec_hits, rec_hard) if d]),
        "rec_distractor_fraction": mean(rec_hard),
        "res_mask_miou": mean(res_ious),
        "res_mask_ciou": res_inter / res_union if res_union else float("nan"),
        "res_box_acc@0.5": mean(res_box_hits),
        "res_mask_miou_where_box_hit": mean([iou for iou, hit in zip(res_ious, res_box_hits) if hit]),
        "reg_exact_match": mean(reg_hits),
        "gc_box_recall@0.5": gc_box / gc_total if gc_total else float("nan"),
        "gc_named_recall@0.5": gc_named / gc_total if gc_total else float("nan"),
        "gc_box_precision@0.5": gc_pred_hit / gc_pred if gc_pred else float("nan"),
        "num_queries": {t: sum(q["task"] == t for q in queries) for t in ("rec", "res", "reg", "gc")},
    }
    distractor_hits = [h for h, d in zip(rec_hits, rec_hard) if d]
    box_hit_ious = [iou for iou, hit in zip(res_ious, res_box_hits) if hit]
    ci = {
        "rec_acc@0.5": wilson_interval(sum(rec_hits), len(rec_hits)),
        "rec_miou": normal_interval(rec_ious),
        "rec_acc@0.5_with_distractor": wilson_interval(sum(distractor_hits), len(distractor_hits)),
        "rec_distractor_fraction": wilson_interval(sum(rec_hard), len(rec_hard)),
        "res_mask_miou": normal_interval(res_ious),
        "res_mask_ciou": bootstrap_ratio_interval([i for i, _ in res_parts], [u for _, u in res_parts]),
        "res_box_acc@0.5": wilson_interval(sum(res_box_hits), len(res_box_hits)),
        "res_mask_miou_where_box_hit": normal_interval(box_hit_ious),
        "reg_exact_match": wilson_interval(sum(reg_hits), len(reg_hits)),
        "gc_box_recall@0.5": wilson_interval(sum(gc_box_hits), len(gc_box_hits)),
        "gc_named_recall@0.5": wilson_interval(sum(gc_named_hits), len(gc_named_hits)),
        "gc_box_precision@0.5": wilson_interval(sum(gc_pred_hits), len(gc_pred_hits)),
    }
    if any(q["task"] == "absent" for q in queries):
        correct = [a and b for a, b in zip(absent_no_box, absent_says)]
        for name, values in (("absent_no_box_rate", absent_no_box), ("absent_says_absent_rate", absent_says),
                             ("absent_correct_rate", correct)):
            metrics[name] = mean(values)
            ci[name] = wilson_interval(sum(values), len(values))
        metrics["num_queries"]["absent"] = len(absent_no_box)
    if any(q["task"] == "rec_relation" for q in queries):
        metrics["rec_relation_acc@0.5"] = mean(relation_hits)
        ci["rec_relation_acc@0.5"] = wilson_interval(sum(relation_hits), len(relation_hits))
        metrics["num_queries"]["rec_relation"] = len(relation_hits)
    if any(q["task"] == "rec_turn2" for q in queries):
        pairs = [(first_turn_hit[i], hit) for i, hit in turn2.items() if i in first_turn_hit]
        first = [a for a, _ in pairs]
        second = [b for _, b in pairs]
        difference = [float(b) - float(a) for a, b in pairs]
        metrics["rec_acc@0.5_first_turn"] = mean(first)
        metrics["rec_acc@0.5_second_turn"] = mean(second)
        metrics["rec_acc@0.5_second_minus_first"] = mean(difference)
        ci["rec_acc@0.5_first_turn"] = wilson_interval(sum(first), len(first))
        ci["rec_acc@0.5_second_turn"] = wilson_interval(sum(second), len(second))
        ci["rec_acc@0.5_second_minus_first"] = normal_interval(difference, -1.0, 1.0)
        metrics["num_queries"]["rec_turn2"] = len(turn2)
        metrics["second_turn_by_first_task"] = {
            kind: mean([turn2[q["pair"]] for q in queries if q["task"] == "rec_turn2" and q["first_turn"] == kind])
            for kind in SECOND_TURN_AFTER if any(q.get("first_turn") == kind for q in queries)
        }
    if intervals:
        metrics["ci95"] = ci
    return metrics


def evaluate(model, processor, seed_start: int = EVAL_SEED_START, num: int = 300, batch_size: int = 48,
             examples: int = 0, *, every_object: bool = False, phrasings=None, absent: bool = False,
             second_turn: bool = False, relations: bool = False, intervals: bool | None = None,
             scene_kwargs: dict | None = None) -> dict:
    """Build the queries of seeds `[seed_start, seed_start + num)`, generate, and score. The keyword-only options
    are the opt-in evaluation of the module docstring (`intervals=None`: on when any other option is); without
    them, the queries, keys and figures of earlier versions."""
    opted = bool(every_object or phrasings or absent or second_turn or relations or scene_kwargs)
    seeds = range(seed_start, seed_start + num)
    if opted:
        queries = build_query_set(seeds, every_object=every_object, phrasings=phrasings or None, absent=absent,
                                  second_turn=second_turn, relations=relations, scene_kwargs=scene_kwargs)
    else:
        queries = build_queries(seeds)
    start = time.time()
    results = run_queries(model, processor, queries, batch_size=batch_size)
    metrics = score(queries, results, intervals=opted if intervals is None else intervals)
    metrics["eval_seconds"] = round(time.time() - start, 1)
    metrics["seeds"] = [seed_start, seed_start + num - 1]
    if examples:
        metrics["examples"] = [
            {"task": q["task"], "question": q["question"], "answer": r["text"],
             "boxes": [[round(v, 1) for v in e["box"]] for e in r["entities"] if e.get("box") is not None]}
            for q, r in list(zip(queries, results))[: 4 * examples]
        ]
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--seed-start", type=int, default=EVAL_SEED_START)
    parser.add_argument("--num", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--output", help="write the metrics as JSON here")
    parser.add_argument("--every-object", action="store_true", help="ask rec/res/reg about every object of a scene")
    parser.add_argument("--phrasings", default=None,
                        help="comma-separated phrasing families of the questions (aliases: held_out, train, all)")
    parser.add_argument("--absent", action="store_true", help="add one absent-object question per scene")
    parser.add_argument("--second-turn", action="store_true",
                        help="ask every rec query again as the second turn after another task's turn")
    parser.add_argument("--relations", action="store_true",
                        help="ask about every object that an unambiguous relation names ('the left one of the two "
                             "red shapes')")
    parser.add_argument("--intervals", action="store_true", help="report 95%% intervals (ci95)")
    parser.add_argument("--robust", action="store_true",
                        help="--every-object --absent --second-turn --relations --intervals, and --phrasings "
                             "held_out unless given")
    args = parser.parse_args(argv)
    if args.robust:
        args.every_object = args.absent = args.second_turn = args.relations = args.intervals = True
        args.phrasings = args.phrasings or ",".join(HELD_OUT_PHRASINGS)
    if args.phrasings:
        try:
            resolve_phrasings(args.phrasings, allow_held_out=True)
        except ValueError as error:
            parser.error(f"--phrasings: {error}")
    from nextchat import NextChatForConditionalGeneration
    from nextchat.processing import NextChatProcessor

    model = NextChatForConditionalGeneration.from_pretrained(args.model_dir).eval()
    processor = NextChatProcessor.from_pretrained(args.model_dir)
    metrics = evaluate(model, processor, args.seed_start, args.num, args.batch_size, args.examples,
                       every_object=args.every_object, phrasings=args.phrasings, absent=args.absent,
                       second_turn=args.second_turn, relations=args.relations, intervals=args.intervals or None)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return metrics


if __name__ == "__main__":
    main()
