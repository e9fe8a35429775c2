"""Runners and CLI of nextchat.evaluation on small annotation files and images written here, with a tiny random
model built on the tiny processor's token ids."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from nextchat import NextChatConfig, NextChatForConditionalGeneration
from nextchat.evaluation import build_prompt, evaluate, load_samples
from nextchat.evaluation.cli import main as cli_main
from nextchat.evaluation.metrics import box_iou, caption_metrics, parse_pope_answer, pope_metrics
from nextchat.evaluation.runners import DEFAULT_TEMPLATES, PredictionStore, model_fingerprint
from nextchat.processing import boxes_to_square_frame, masks_from_sam_frame, rle_encode
from tiny_models import config_overrides_for, tiny_model, tiny_processor


SIZES = [(40, 60), (50, 30), (32, 32), (45, 45), (30, 64), (64, 30)]


def tiny_model_for(processor, seed: int = 0) -> NextChatForConditionalGeneration:
    """The tests' tiny model (random weights) fitted to `processor`, with room for the benchmark prompts."""
    overrides = config_overrides_for(processor)
    overrides["text_config"].max_position_embeddings = 512
    return tiny_model(seed=seed, **overrides)


def boxy_model(model, box=(0.2, 0.25, 0.7, 0.75)) -> NextChatForConditionalGeneration:
    """A copy of `model` whose box decoder is shifted to predict boxes near `box` (the random model's raw boxes are
    inverted, which makes every IoU 0 and IoU checks vacuous)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.loc_decoder[-1].bias.copy_(torch.tensor(box))
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    processor = tiny_processor()
    model = tiny_model_for(processor)
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    rec, pope = [], []
    for i, (h, w) in enumerate(SIZES):
        PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : h // 2 + 3, w // 4 : w // 2 + 2] = 1
        expression = f"the thing number {i}" if i != 2 else "the [1] guy"  # a literal bracket must stay text
        rec.append({"id": f"s{i}", "img_path": f"{i}.png", "expression": expression,
                    "bbox": [w / 4, h / 4, w / 2 + 2, h / 2 + 3], "height": h, "width": w, "mask": rle_encode(mask)})
        pope.append({"question_id": i, "image": f"{i}.png", "text": f"Is there a cat {i}?",
                     "label": "yes" if i in (0, 3) else "no"})
    (root / "REC_refcoco_unc_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rec))
    (root / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in pope))
    return {"root": root, "processor": processor, "model": model, "images": str(root / "images"),
            "rec": str(root / "REC_refcoco_unc_val.jsonl"), "pope": str(root / "coco_pope_random.json")}


class ForceTokens(LogitsProcessor):
    """Forces `token_id` at the given generation steps of every row (steps counted from each generate call)."""

    def __init__(self, plan: dict):
        self.plan = plan
        self.start = self.last = None

    def __call__(self, input_ids, scores):
        length = input_ids.shape[1]
        if self.last is None or length <= self.last:  # a new generate call
            self.start = length
        self.last = length
        token = self.plan.get(length - self.start)
        if token is not None:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, token] = 0.0
        return scores


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _read(path):
    with open(path) as f:
        return f.read()


# ---------------------------------------------------------------------------------------------------- prompts


def test_prompts_follow_the_original_templates(setup):
    processor = setup["processor"]
    samples = load_samples("rec", setup["rec"])
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
    templates = [DEFAULT_TEMPLATES["rec"]]
    assert build_prompt("rec", samples[0], processor, templates) == (
        f"{system} USER: <image> Where is the thing number 0 in the image? ASSISTANT:"
    )
    assert build_prompt("rec", samples[0], processor, templates, fast=True).endswith("ASSISTANT: Answer:")
    assert "the \\[1] guy" in build_prompt("rec", samples[2], processor, templates)
    reg = load_samples("reg", setup["rec"])
    assert build_prompt("reg", reg[0], processor, [DEFAULT_TEMPLATES["reg"]]).endswith(
        "USER: <image> Can you describe [0]? ASSISTANT:"
    )
    pope = load_samples("pope", setup["pope"])
    assert build_prompt("pope", pope[1], processor, [DEFAULT_TEMPLATES["pope"]]).endswith(
        "USER: <image> Is there a cat 1? ASSISTANT:"
    )


# -------------------------------------------------------------------------------------------------------- REC


def test_rec_fast_path_equals_a_single_unpadded_forward(setup, tmp_path):
    model, processor = setup["model"], setup["processor"]
    results = evaluate("rec", model, processor, setup["rec"], str(tmp_path), setup["images"], batch_size=4,
                       fast_rec=True, progress=False)
    assert results["split"] == "refcoco_val" and results["paper"] == {"accuracy": 85.5}
    assert results["num_samples"] == 6 and results["complete"]
    records = _records(tmp_path / "predictions.jsonl")
    assert [r["id"] for r in records] == [f"s{i}" for i in range(6)]
    samples = load_samples("rec", setup["rec"])
    for i in (0, 5):  # in a left-padded batch of 4 and in the last batch of 2
        text = build_prompt("rec", samples[i], processor, [DEFAULT_TEMPLATES["rec"]]) + " Answer:"
        image = PIL.Image.open(os.path.join(setup["images"], f"{i}.png")).convert("RGB")
        inputs = processor(images=image, text=text, append_trigger=True, return_sam_pixel_values=False)
        inputs.pop("image_sizes")
        assert inputs["input_ids"][0, -1] == processor.trigger_token_id
        with torch.no_grad():
            box = model(**inputs).pred_boxes[-1].numpy()
        np.testing.assert_allclose(records[i]["pred_box_normalized"], box, atol=1e-5)
        gt = np.clip(boxes_to_square_frame(samples[i].bbox, SIZES[i]), 0, 1)
        assert records[i]["iou"] == pytest.approx(float(box_iou(box, gt)[0]), abs=1e-5)
    ious = [r["iou"] for r in records]
    assert results["metrics"]["accuracy"] == pytest.approx(np.mean(np.array(ious) > 0.5))
    assert results["metrics"]["miou"] == pytest.approx(np.mean(ious))
    assert results["comparison"] == [{"metric": "accuracy", "ours": round(results["metrics"]["accuracy"] * 100, 2),
                                      "paper": 85.5, "delta": round(results["metrics"]["accuracy"] * 100 - 85.5, 2)}]


def test_rec_generation_reads_the_first_generated_trigger(setup, tmp_path):
    model, processor = setup["model"], setup["processor"]
    at = processor.trigger_token_id
    force = LogitsProcessorList([ForceTokens({1: at, 3: at, 4: processor.tokenizer.eos_token_id})])
    results = evaluate("rec", model, processor, setup["rec"], str(tmp_path / "forced"), setup["images"],
                       batch_size=4, max_new_tokens=6, generate_kwargs={"logits_processor": force}, progress=False)
    records = _records(tmp_path / "forced" / "predictions.jsonl")
    assert all(r["n_triggers"] == 2 and r["pred_box"] is not None for r in records)
    assert results["metrics"]["failed"] == 0
    samples = load_samples("rec", setup["rec"])
    for r, s, size in zip(records, samples, SIZES):
        gt = np.clip(boxes_to_square_frame(s.bbox, size), 0, 1)
        assert r["iou"] == pytest.approx(float(box_iou(r["pred_box_normalized"], gt)[0]))
        x1, y1, x2, y2 = r["pred_box"]
        assert 0 <= x1 <= x2 <= size[1] and 0 <= y1 <= y2 <= size[0]
    # a model that never emits <at>: every sample is a miss, counted as failed
    ban = LogitsProcessorList([ForceTokens({0: processor.tokenizer.eos_token_id})])
    results = evaluate("rec", model, processor, setup["rec"], str(tmp_path / "none"), setup["images"],
                       batch_size=3, max_new_tokens=3, generate_kwargs={"logits_processor": ban}, progress=False)
    assert results["metrics"] == {"accuracy": 0.0, "miou": 0.0, "n": 6, "correct": 0, "failed": 6}


# -------------------------------------------------------------------------------------------------------- RES


def test_res_fast_path_masks_and_counts(setup, tmp_path):
    model, processor = setup["model"], setup["processor"]
    results = evaluate("res", model, processor, setup["rec"], str(tmp_path), setup["images"], batch_size=1,
                       fast_rec=True, progress=False)
    records = _records(tmp_path / "predictions.jsonl")
    samples = load_samples("res", setup["rec"])
    # sample 1 by hand: one forward with SAM, logits -> original resolution (> 0), I and U against the RLE mask
    s = samples[1]
    text = build_prompt("res", s, processor, [DEFAULT_TEMPLATES["res"]]) + " Answer:"
    image = PIL.Image.open(os.path.join(setup["images"], "1.png")).convert("RGB")
    inputs = processor(images=image, text=text, append_trigger=True)
    inputs.pop("image_sizes")
    with torch.no_grad():
        logits = model(**inputs).pred_masks[-1]
    pred = masks_from_sam_frame(logits[None], SIZES[1], processor.image_processor.sam_image_size)[0]
    target = np.zeros(SIZES[1], bool)
    h, w = SIZES[1]
    target[h // 4 : h // 2 + 3, w // 4 : w // 2 + 2] = True
    assert records[1]["intersection"] == int((pred & target).sum())
    assert records[1]["union"] == int((pred | target).sum())
    inter = np.array([r["intersection"] for r in records], float)
    union = np.array([r["union"] for r in records], float)
    assert results["metrics"]["ciou"] == pytest.approx(inter.sum() / union.sum())
    assert results["metrics"]["giou"] == pytest.approx(np.mean(inter / union))
    assert results["paper"] == {"ciou": 74.7}


def test_res_generation_failures_and_several_triggers(setup, tmp_path):
    model, processor = setup["model"], setup["processor"]
    at, eos = processor.trigger_token_id, processor.tokenizer.eos_token_id
    one = LogitsProcessorList([ForceTokens({1: at, 3: eos})])
    ok = evaluate("res", model, processor, setup["rec"], str(tmp_path / "one"), setup["images"],
                  batch_size=4, limit=4,
                  max_new_tokens=5, generate_kwargs={"logits_processor": one}, progress=False)
    records = _records(tmp_path / "one" / "predictions.jsonl")
    assert [r["status"] for r in records] == ["ok"] * 4 and ok["metrics"]["no_trigger"] == 0
    assert all(r["union"] >= r["intersection"] >= 0 and r["pred_box"] is not None for r in records)

    two = LogitsProcessorList([ForceTokens({1: at, 3: at, 5: eos})])
    zero = evaluate("res", model, processor, setup["rec"], str(tmp_path / "two"), setup["images"],
                    batch_size=4, limit=4,
                    max_new_tokens=6, generate_kwargs={"logits_processor": two}, progress=False)
    records = _records(tmp_path / "two" / "predictions.jsonl")
    assert [r["status"] for r in records] == ["unmatched"] * 4  # the original: several <at> -> empty mask
    assert zero["metrics"]["ciou"] == 0.0 and zero["metrics"]["failed"] == 4 and zero["metrics"]["unmatched"] == 4
    first = evaluate("res", model, processor, setup["rec"], str(tmp_path / "first"), setup["images"],
                     batch_size=4, limit=4, max_new_tokens=6, generate_kwargs={"logits_processor": two},
                     res_multi_trigger="first", progress=False)
    assert first["metrics"]["unmatched"] == 0
    assert [r["status"] for r in _records(tmp_path / "first" / "predictions.jsonl")] == ["ok"] * 4

    none = LogitsProcessorList([ForceTokens({0: eos})])
    fail = evaluate("res", model, processor, setup["rec"], str(tmp_path / "none"), setup["images"],
                    batch_size=4, limit=4,
                    max_new_tokens=2, generate_kwargs={"logits_processor": none}, progress=False)
    assert fail["metrics"]["ciou"] == 0.0 and fail["metrics"]["no_trigger"] == 4 and fail["metrics"]["failed"] == 4


# --------------------------------------------------------------------------------------------- POPE and REG


def test_pope_runner(setup, tmp_path):
    model, processor = setup["model"], setup["processor"]
    results = evaluate("pope", model, processor, setup["pope"], str(tmp_path / "free"), setup["images"],
                       batch_size=4, max_new_tokens=4, progress=False)
    records = _records(tmp_path / "free" / "predictions.jsonl")
    assert [r["answer"] for r in records] == [parse_pope_answer(r["text"]) for r in records]
    expected = pope_metrics([r["answer"] for r in records], [r["label"] for r in records])
    assert results["metrics"] == pytest.approx(expected)
    assert results["split"] == "random" and results["paper"] == {"accuracy": 87.7, "f1": 87.28}
    # an empty answer parses as "no": accuracy = share of "no" labels (4 of 6), no positives
    eos = LogitsProcessorList([ForceTokens({0: processor.tokenizer.eos_token_id})])
    results = evaluate("pope", model, processor, setup["pope"], str(tmp_path / "empty"), setup["images"],
                       batch_size=4, max_new_tokens=2, generate_kwargs={"logits_processor": eos}, progress=False)
    m = results["metrics"]
    assert (m["accuracy"], m["yes_ratio"], m["precision"], m["recall"], m["tn"], m["fn"]) == (4 / 6, 0, 0, 0, 4, 2)


def test_region_caption_runner(setup, tmp_path):
    model, processor = setup["model"], setup["processor"]
    results = evaluate("reg", model, processor, setup["rec"], str(tmp_path), setup["images"], batch_size=4,
                       max_new_tokens=5, split="refcocog_google_val", caption_tokenizer="simple", meteor=False,
                       progress=False)
    records = _records(tmp_path / "predictions.jsonl")
    assert [r["references"] for r in records][0] == ["the thing number 0"]
    assert all(r["prediction"] == r["text"].lower() for r in records)
    expected = caption_metrics([r["prediction"] for r in records], [r["references"] for r in records],
                               tokenizer="simple", meteor=False)
    assert results["metrics"] == pytest.approx(expected)
    assert results["paper"] == {"cider": 79.6, "meteor": 12.0}
    assert results["comparison"][1] == {"metric": "meteor", "ours": None, "paper": 12.0, "delta": None}


# --------------------------------------------------------------------------------------------------- resume


def test_resume_after_limit_and_torn_line_gives_the_same_results(setup, tmp_path):
    model, processor = setup["model"], setup["processor"]
    kwargs = dict(batch_size=2, max_new_tokens=4, progress=False, caption_tokenizer="simple", meteor=False)
    full = evaluate("reg", model, processor, setup["rec"], str(tmp_path / "full"), setup["images"], **kwargs)
    part = evaluate("reg", model, processor, setup["rec"], str(tmp_path / "resumed"), setup["images"], limit=4,
                    **kwargs)
    assert part["num_samples"] == 4 and not part["complete"]
    # a run killed while writing sample s4: a torn last line
    with open(tmp_path / "resumed" / "predictions.jsonl", "a") as f:
        f.write('{"id": "s4", "prediction": "half a rec')
    assert set(PredictionStore(str(tmp_path / "resumed" / "predictions.jsonl")).records) == {"s0", "s1", "s2", "s3"}
    resumed = evaluate("reg", model, processor, setup["rec"], str(tmp_path / "resumed"), setup["images"], **kwargs)
    assert resumed == full
    assert _read(tmp_path / "resumed" / "results.json") == _read(tmp_path / "full" / "results.json")
    assert _read(tmp_path / "resumed" / "predictions.jsonl") == _read(tmp_path / "full" / "predictions.jsonl")
    # other settings in the same folder are refused, --overwrite starts afresh
    with pytest.raises(ValueError, match="different run"):
        evaluate("reg", model, processor, setup["rec"], str(tmp_path / "resumed"), setup["images"],
                 **{**kwargs, "max_new_tokens": 3})
    fresh = evaluate("reg", model, processor, setup["rec"], str(tmp_path / "resumed"), setup["images"],
                     overwrite=True, **{**kwargs, "max_new_tokens": 3})
    assert fresh["settings"]["max_new_tokens"] == 3


def test_cli_killed_then_resumed_gives_the_same_results(setup, tmp_path):
    model, processor = setup["model"], setup["processor"]
    model_dir = tmp_path / "model"
    processor.save_pretrained(model_dir)
    model.save_pretrained(model_dir)
    # 24 POPE questions over the 6 images
    rows = [{"question_id": k, "image": f"{k % 6}.png", "text": f"Is there a dog {k}?", "label": ["yes", "no"][k % 2]}
            for k in range(24)]
    data = tmp_path / "coco_pope_popular.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["pope", "--model", str(model_dir), "--data", str(data), "--images", setup["images"], "--batch-size", "1",
            "--max-new-tokens", "6", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "nextchat.evaluation.cli", *args, "--output", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions = killed / "predictions.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if predictions.exists() and len(_read(predictions).splitlines()) >= 2:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(PredictionStore(str(predictions)).records)
    assert done >= 2
    assert not (killed / "results.json").exists() or done == 24
    assert cli_main([*args, "--output", str(killed)]) == 0  # resume
    assert cli_main([*args, "--output", str(tmp_path / "fresh")]) == 0
    assert _read(killed / "results.json") == _read(tmp_path / "fresh" / "results.json")
    results = json.loads(_read(killed / "results.json"))
    assert results["split"] == "popular" and results["num_samples"] == 24
    assert [r["id"] for r in _records(predictions)] == [str(k) for k in range(24)]
    assert cli_main(["summary", str(killed)]) == 0


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_shapes_split(setup, tmp_path):
    from nextchat.training import synthetic
    model, processor = setup["model"], setup["processor"]
    path = synthetic.write_dataset(str(tmp_path / "shapes"), range(100, 112))
    with open(path) as f:
        raw = [json.loads(line) for line in f]
    for task in ("rec", "res", "reg"):
        samples = load_samples(task, path)
        expected = sum(q["task"] == task for r in raw for q in r["queries"])
        assert len(samples) == expected
        if not samples:
            continue
        first = samples[0]
        record = next(r for r in raw if first.id.startswith(r["id"] + "/"))
        turn = int(first.id.rsplit("/", 1)[1])
        question = [m["content"] for m in record["conversations"] if m["role"] == "user"][turn]
        prompt = build_prompt(task, first, processor, [DEFAULT_TEMPLATES[task]], fast=task != "reg")
        if task == "reg":
            assert "[0]" in prompt and first.references == [
                [m["content"] for m in record["conversations"] if m["role"] == "assistant"][turn]]
        else:
            assert question.replace("<image>", "").strip() in prompt
            assert prompt.endswith("ASSISTANT: " + first.answer_prefix)
        results = evaluate(task, model, processor, path, str(tmp_path / task), batch_size=4, progress=False,
                           fast_rec=task != "reg", max_new_tokens=3, caption_tokenizer="simple", meteor=False)
        assert results["num_samples"] == len(samples) and results["split"] is None


# -------------------------------------------------------------------------------------- checks before the model


def _cli_error(capsys, args):
    """Run the CLI in this process; its exit status and stderr."""
    code = cli_main(args)
    return code, capsys.readouterr().err


def test_cli_refuses_bad_annotation_files_before_loading_the_model(setup, tmp_path, capsys):
    # --model names no model at all: any of these errors reaching the model loader would say so instead
    base = ["rec", "--model", str(tmp_path / "no-model"), "--images", setup["images"], "--no-progress"]
    good = '{"img_path": "0.png", "expression": "a", "bbox": [1, 1, 5, 5]}\n'
    cases = {
        "missing.jsonl": (None, "no such annotation file"),
        "empty.jsonl": ("", "no annotations (the file is empty)"),
        "blank.jsonl": ("\n  \n\n", "no annotations (the file is only blank lines)"),
        "list.json": (" [ ]\n", "no annotations (the file is an empty list)"),
        "broken.jsonl": (good + "\n" + '{"img_path": "1.png", "expression": "b", "bbox": [1, 2, 3\n' + good,
                         "broken.jsonl:3: not valid JSON"),
        "not_object.jsonl": (good + "[1, 2]\n", "not_object.jsonl:2: not a JSON object"),
        "no_box.jsonl": (good + good.replace('"bbox"', '"bobx"'), "no_box.jsonl:2: has none of the fields ['bbox'"),
        "inverted.jsonl": (good + good.replace("[1, 1, 5, 5]", "[6, 1, 5, 5]"), "inverted.jsonl:2: `bbox`"),
        "twice.jsonl": ('{"id": "a", ' + good[1:] + "\n" + '{"id": "a", ' + good[1:],
                        "twice.jsonl:3: the sample id 'a' appears twice (first at"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        out = tmp_path / f"out_{name}"
        code, err = _cli_error(capsys, [*base, "--data", str(path), "--output", str(out)])
        assert code == 2, name
        assert err.startswith("nextchat-eval: error: ") and message in err, (name, err)
        assert str(path) in err and "Traceback" not in err
        assert not out.exists()  # nothing written


def test_cli_reports_missing_images_up_front(setup, tmp_path, capsys):
    rows = [{"img_path": f"{i % 6}.png" if i < 5 else f"gone_{i}.png", "expression": "x", "bbox": [1, 1, 5, 5]}
            for i in range(12)]
    data = tmp_path / "REC_refcoco_unc_val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = _cli_error(capsys, ["rec", "--model", str(tmp_path / "no-model"), "--data", str(data), "--images",
                                    setup["images"], "--output", str(tmp_path / "out")])
    assert code == 2
    assert "7 of the 12 images of the annotations not found" in err
    assert "'gone_5.png', 'gone_6.png', 'gone_7.png', 'gone_8.png', 'gone_9.png', ..." in err
    assert "gone_10.png" not in err and setup["images"] in err


def test_limit_must_be_positive(setup, tmp_path):
    with pytest.raises(ValueError, match="`limit` must be a positive int"):
        evaluate("rec", setup["model"], setup["processor"], setup["rec"], str(tmp_path), setup["images"], limit=0,
                 progress=False)


# ------------------------------------------------------------------------------------------ resume identity


def test_resume_refuses_an_edited_annotation_file_or_other_images(setup, tmp_path, capsys):
    model, processor = boxy_model(setup["model"]), setup["processor"]
    model_dir = tmp_path / "model"
    processor.save_pretrained(model_dir)
    model.save_pretrained(model_dir)
    rows = [json.loads(line) for line in _read(setup["rec"]).splitlines()]
    data = tmp_path / "REC_refcoco_unc_val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["rec", "--model", str(model_dir), "--data", str(data), "--images", setup["images"], "--output", str(out),
            "--fast-rec", "--fast-rec-check", "0", "--batch-size", "4", "--no-progress"]
    assert cli_main(args) == 0
    before = json.loads(_read(out / "results.json"))
    first = _read(out / "predictions.jsonl")
    # the same file name and number of lines, one box changed
    rows[3]["bbox"] = [0, 0, 5, 5]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "holds predictions of a different run" in err and "data_sha256" in err and "--overwrite" in err
    assert _read(out / "predictions.jsonl") == first  # untouched
    # the same images under another folder, then other images of the same names
    other = tmp_path / "other_images"
    other.mkdir()
    for name in os.listdir(setup["images"]):
        shutil.copy(os.path.join(setup["images"], name), other / name)
    data.write_text("".join(json.dumps(r) + "\n" for r in [json.loads(line) for line in
                                                              _read(setup["rec"]).splitlines()]))
    assert cli_main(args) == 0  # the original file again: resumes (nothing left to do), same results
    assert json.loads(_read(out / "results.json")) == before
    moved = [a if a != setup["images"] else str(other) for a in args]
    assert cli_main(moved) == 2 and "['images']" in capsys.readouterr().err
    PIL.Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(other / "0.png")
    same = dict(batch_size=4, fast_rec=True, fast_rec_check_samples=0, progress=False, model_name="model",
                model_fingerprint=model_fingerprint(str(model_dir)))
    with pytest.raises(ValueError, match=r"\['images', 'images_fingerprint'\]"):
        evaluate("rec", model, processor, str(data), str(out), str(other), **same)
    # other settings that change predictions are refused too, each by name
    for kwargs, changed in [({"batch_size": 2}, "batch_size"), ({"answer_prefix": "It is"}, "answer_prefix"),
                            ({"template": "<image> Find <expr>."}, "templates"),
                            ({"model_fingerprint": None}, "model_fingerprint")]:
        with pytest.raises(ValueError, match=rf"settings differ: \['{changed}'\]"):
            evaluate("rec", model, processor, str(data), str(out), setup["images"], **{**same, **kwargs})
    assert evaluate("rec", model, processor, str(data), str(out), setup["images"], **same) == before
    # --overwrite: the edited file is evaluated afresh, and its changed box changes sample s3's IoU
    rows[3]["bbox"] = [0, 0, 5, 5]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main([*args, "--overwrite"]) == 0
    after = _records(out / "predictions.jsonl")
    assert after[3]["gt_box"] == [0.0, 0.0, 5.0, 5.0]
    assert after[3]["iou"] != json.loads(first.splitlines()[3])["iou"]
    assert [r["iou"] for k, r in enumerate(after) if k != 3] == [
        json.loads(line)["iou"] for k, line in enumerate(first.splitlines()) if k != 3]


# ------------------------------------------------------------------------------------------------- clipping


def test_ground_truth_boxes_are_clipped_and_stored_as_used(setup, tmp_path):
    model, processor = boxy_model(setup["model"]), setup["processor"]
    rows = []
    for i, (h, w) in enumerate(SIZES):  # boxes leaving the image on every side, one inside
        box = [[-5, -3, w / 2, h + 7], [w / 3, -10, w + 4, h / 2], [2, 3, 9, 11]][i % 3]
        rows.append({"id": f"s{i}", "img_path": f"{i}.png", "expression": f"thing {i}", "bbox": box})
    data = tmp_path / "REC_refcoco_unc_val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = evaluate("rec", model, processor, str(data), str(tmp_path / "rec"), setup["images"], batch_size=4,
                       fast_rec=True, fast_rec_check_samples=0, progress=False)
    assert "clipped to the image" in results["settings"]["boxes"]
    records = _records(tmp_path / "rec" / "predictions.jsonl")
    for row, record, (h, w) in zip(rows, records, SIZES):
        x1, y1, x2, y2 = row["bbox"]
        assert record["image_size"] == [h, w]
        assert record["gt_box"] == [min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h)]
        inside = record["gt_box"] == row["bbox"]
        assert ("gt_box_annotation" not in record) if inside else (record["gt_box_annotation"] == row["bbox"])
        # the stored IoU is the IoU of the stored boxes
        gt = boxes_to_square_frame(record["gt_box"], record["image_size"])
        assert record["iou"] == float(box_iou(record["pred_box_normalized"], gt)[0])
    assert sum("gt_box_annotation" in r for r in records) == 4
    assert len({r["iou"] for r in records}) == 6 and sum(r["iou"] > 0 for r in records) >= 4  # not vacuous
    # region captioning: the region fed to the model is the clipped box, stored as such
    evaluate("reg", model, processor, str(data), str(tmp_path / "reg"), setup["images"], batch_size=4,
             max_new_tokens=2, caption_tokenizer="simple", meteor=False, progress=False)
    for row, record in zip(rows, _records(tmp_path / "reg" / "predictions.jsonl")):
        (h, w) = record["image_size"]
        assert 0 <= record["bbox"][0] <= record["bbox"][2] <= w and 0 <= record["bbox"][1] <= record["bbox"][3] <= h
        assert record.get("bbox_annotation", record["bbox"]) == row["bbox"]
