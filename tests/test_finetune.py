"""Issue 25, done-when: the documented `nextchat-finetune` command teaches the shipped tiny model a new shape ("star")
from a few hundred generated samples on CPU; the new object is found (IoU > 0.5) on held-out scenes, the old
objects stay where they were, and the adapter it writes loads in `nextchat-chat`, `nextchat-eval` and `AutoModel` +
`PeftModel` in fresh processes; `nextchat-merge` turns it into a full folder."""

import json
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "examples", "tiny-nextchat-shapes")
BIN = os.path.dirname(sys.executable)
# the recipe of the README's "Fine-tune on your own data" section
# the shipped model's own recipe (training/configs/shapes_tiny.json)
SHAPES_ATTENTION_SUPERVISION = {"grounding_weight": 1, "region_weight": 2, "grounding_heads": [0, 1, 2],
                                "region_heads": [3], "per_head": True}
RECIPE = ["--lora", "--steps", "1400", "--batch-size", "16", "--lr", "2e-3", "--replay-fraction", "3.0",
          "--train-vision", "--vision-layers", "2", "--vision-lr", "5e-4",
          "--loss-weight", "box_giou_loss_weight=1", "--loss-weight", "cycle_embed_loss_weight=0",
          "--attention-supervision", json.dumps(SHAPES_ATTENTION_SUPERVISION)]
OLD_EVAL_SEEDS = 100


def _run(args, cwd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout


def _old_objects(model_dir, cwd) -> dict:
    """synthetic_eval's figures of the old shapes on unseen seeds, in a fresh process (an adapter folder loads too)."""
    code = (
        "import json, sys, torch; torch.set_num_threads(1)\n"
        "from nextchat.loading import load_pretrained\n"
        "from nextchat.training.synthetic_eval import evaluate\n"
        f"model, processor = load_pretrained({model_dir!r})\n"
        f"m = evaluate(model, processor, num={OLD_EVAL_SEEDS})\n"
        "print('RESULT' + json.dumps({k: v for k, v in m.items() if isinstance(v, float)}))\n"
    )
    out = _run([sys.executable, "-c", code], cwd)
    return json.loads(out.split("RESULT", 1)[1])


@pytest.mark.slow
def test_finetune_teaches_the_shipped_model_a_new_shape(tmp_path):
    from nextchat.training.synthetic import new_shape_kwargs, write_dataset

    star = new_shape_kwargs("star")
    # seeds disjoint from each other, from the shipped model's training data and from synthetic_eval's
    write_dataset(str(tmp_path / "star"), range(5_100_000, 5_102_400), caption_order="name", task_weights={"rec": 3.0},
                  **star)
    write_dataset(str(tmp_path / "old"), range(3_100_000, 3_107_200), caption_order="name")
    write_dataset(str(tmp_path / "held"), range(6_000_000, 6_000_100), tasks=("rec",), max_turns=1, **star)

    out = tmp_path / "star-lora"
    log = _run([os.path.join(BIN, "nextchat-finetune"), "--model", SHIPPED, "--train", "star/data.jsonl",
                "--replay", "old/data.jsonl", "--eval", "held/data.jsonl", "--output", str(out),
                "--save-steps", "700", "--threads", "1", "--no-tqdm", *RECIPE], tmp_path, timeout=1500)
    assert "trainable parameters per part" in log and "lm_head" in log
    assert "cannot produce yet" in log  # "star" is a new word: lm_head and the embeddings train
    # the new object is found in held-out scenes
    metrics = json.loads((out / "eval_metrics.json").read_text())
    star_rate = metrics["rec"]["box_acc@0.5"]
    print(f"star found at IoU > 0.5: {star_rate:.2f} of {metrics['rec']['n']} held-out scenes")
    # measured 0.94 on the model shipped now (a language model of two layers), 0.94 on the one shipped at commit
    # 00c047a, 0.96 at 933d26f (0.96, 0.94, 0.90 and 0.89 on the four before that; seeds 1 and 2 of the recipe on
    # the oldest: 0.85, 0.86; docs/experiments.md);
    # the margin below absorbs the rounding of other CPUs, whose runs are other draws
    assert metrics["rec"]["n"] == 100 and star_rate >= 0.83
    # every output folder is an adapter folder with its processor
    for folder in (out, out / "checkpoint-700", out / "checkpoint-1400"):
        assert (folder / "adapter_config.json").exists() and (folder / "processor_config.json").exists(), folder

    # the old objects stay where they were (fresh processes, the adapter loaded with one argument)
    before = _old_objects(SHIPPED, tmp_path)
    after = _old_objects(str(out), tmp_path)
    for key in ("rec_acc@0.5", "res_mask_miou", "reg_exact_match", "gc_box_recall@0.5"):
        print(f"old objects {key}: before {before[key]:.3f}, after {after[key]:.3f}")
        assert after[key] >= before[key] - 0.05, key

    # AutoModel + PeftModel, in a fresh process
    code = (
        "import torch, nextchat\n"
        "from transformers import AutoModel\nfrom peft import PeftModel\n"
        f"base = AutoModel.from_pretrained({SHIPPED!r})\n"
        f"model = PeftModel.from_pretrained(base, {str(out)!r})\n"
        "print('LOADED', type(model.get_base_model()).__name__)\n"
    )
    assert "LOADED NextChatForConditionalGeneration" in _run([sys.executable, "-c", code], tmp_path)
    # nextchat-chat answers a question about a held-out star scene from the adapter folder
    record = json.loads((tmp_path / "held" / "data.jsonl").read_text().splitlines()[0])
    question = record["conversations"][0]["content"].replace("<image> ", "")
    chat = _run([os.path.join(BIN, "nextchat-chat"), str(tmp_path / "held" / record["image"]), question,
                 "--model", str(out), "--json"], tmp_path)
    assert "star" in chat
    # nextchat-eval (REC, its annotation format) accepts the adapter folder
    with open(tmp_path / "rec.jsonl", "w") as f:
        for line in (tmp_path / "held" / "data.jsonl").read_text().splitlines()[:20]:
            r = json.loads(line)
            phrase = r["conversations"][0]["content"].split(" the ", 1)[1].rstrip("?.").replace(" in the image", "")
            f.write(json.dumps({"id": r["id"], "img_path": r["image"], "expression": phrase,
                                "bbox": r["boxes"][0]}) + "\n")
    _run([os.path.join(BIN, "nextchat-eval"), "rec", "--model", str(out), "--data", str(tmp_path / "rec.jsonl"),
          "--images", str(tmp_path / "held"), "--output", str(tmp_path / "eval-out")], tmp_path)
    assert (tmp_path / "eval-out" / "results.json").exists()

    # nextchat-merge writes a full folder that loads with trust_remote_code where nextchat is not importable
    merged = tmp_path / "merged"
    _run([os.path.join(BIN, "nextchat-merge"), str(out), str(merged)], tmp_path)
    assert (merged / "model.safetensors").exists() and (merged / "modeling_nextchat.py").exists()
    code = (
        "import sys; sys.modules['nextchat'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(merged)!r}, trust_remote_code=True)\n"
        "print('MERGED', type(m).__name__)\n"
    )
    assert "MERGED NextChatForConditionalGeneration" in _run([sys.executable, "-c", code], tmp_path)
