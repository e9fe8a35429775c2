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
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from .synthetic import GC_TEMPLATES, REC_TEMPLATES, REG_TEMPLATES, RES_TEMPLATES, has_distractor, phrase, render_scene


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


@torch.no_grad()
def run_queries(model, processor, queries, batch_size: int = 48, max_new_tokens: dict | None = None) -> list[dict]:
    """Generate (greedy) for every query; returns the post-processed results in query order."""
    limits = {"rec": 16, "res": 16, "reg": 16, "gc": 64, **(max_new_tokens or {})}
    results = [None] * len(queries)
    device = next(model.parameters()).device
    use_sam = getattr(model, "sam", None) is not None and processor.image_processor.sam_image_size is not None
    for task in ("rec", "res", "reg", "gc"):
        index = [i for i, q in enumerate(queries) if q["task"] == task]
        for start in range(0, len(index), batch_size):
            chunk = index[start : start + batch_size]
            texts = [
                processor.apply_chat_template(
                    [{"role": "user", "content": "<image> " + queries[i]["question"]}], add_generation_prompt=True
                )
                for i in chunk
            ]
            boxes = [queries[i]["boxes"] or None for i in chunk]
            inputs = processor(
                images=[queries[i]["image"] for i in chunk], text=texts,
                boxes=boxes if any(b is not None for b in boxes) else None,
                padding_side="left", return_sam_pixel_values=use_sam,
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


def score(queries, results) -> dict:
    rec_hits, rec_ious, rec_hard = [], [], []
    res_ious, res_inter, res_union, res_box_hits = [], 0, 0, []
    reg_hits = []
    gc_total = gc_box = gc_named = gc_pred = gc_pred_hit = 0
    for q, r in zip(queries, results):
        objects = q["objects"]
        entities = [e for e in r["entities"] if e.get("box") is not None]
        if q["task"] == "rec":
            target = objects[q["object"]]
            iou = box_iou(entities[0]["box"], target["box"]) if entities else 0.0
            rec_ious.append(iou)
            rec_hits.append(iou > 0.5)
            rec_hard.append(has_distractor(objects, q["object"]))
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
            for iou, ei, oi in pairs:
                if iou < 0.5:
                    break
                if ei in used_e or oi in used_o:
                    continue
                used_e.add(ei)
                used_o.add(oi)
                gc_box += 1
                gc_named += _norm_text(entities[ei]["text"]).endswith(phrase(objects[oi]))
            gc_pred_hit += len(used_e)
    mean = lambda xs: float(np.mean(xs)) if len(xs) else float("nan")  # noqa: E731
    return {
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


def evaluate(model, processor, seed_start: int = EVAL_SEED_START, num: int = 300, batch_size: int = 48,
             examples: int = 0) -> dict:
    """Build the queries of seeds `[seed_start, seed_start + num)`, generate, and score."""
    queries = build_queries(range(seed_start, seed_start + num))
    start = time.time()
    results = run_queries(model, processor, queries, batch_size=batch_size)
    metrics = score(queries, results)
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
    args = parser.parse_args(argv)
    from nextchat import NextChatForConditionalGeneration
    from nextchat.processing import NextChatProcessor

    model = NextChatForConditionalGeneration.from_pretrained(args.model_dir).eval()
    processor = NextChatProcessor.from_pretrained(args.model_dir)
    metrics = evaluate(model, processor, args.seed_start, args.num, args.batch_size, args.examples)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return metrics


if __name__ == "__main__":
    main()
