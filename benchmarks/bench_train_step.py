"""Seconds per training step of the shapes recipe's phase 1 (`training/configs/shapes_tiny.json`: the tiny model
from scratch, bf16 autocast where the CPU has bf16 instructions, the attention terms on) with the two options
that do its work once (the recipe uses both), the LM head only at the positions with a target
(`training_config.logits_in_training`) and the frozen tower's features computed once
(`data.cache_vision_features`), one process, one thread, on the same pre-drawn batches, against baselines and
variants measured in the same run:

* `tower each step`: the same step with the vision tower run at every step, as without `data.cache_vision_features`;
* `all logits`: the same step with the LM head over every position (`logits_in_training` "all"), the tower cached;
* `neither`: both of the above, the recipe's step before it took the two options;
* `all positions`: as `neither`, with the language-model loss taken over every position (image patches and prompt
  included), as `lm_loss` did before it kept only the positions that have a target;
* `length-grouped`: the step with both options on the same samples, batched by length (`length_grouped_order`, as
  `data.length_grouping_window` reads them) instead of in file order;
* `three layers`: the step with both options of the same model with a language model of three layers instead of
  the recipe's two (the attention terms in its last layer), on the same batches;
* `plain LLaMA`: a `LlamaForCausalLM` of the same text config trained on the same token ids and labels (no image,
  no box heads, no attention terms), the floor of what a step of this size costs.

    python benchmarks/bench_train_step.py                 # ~2 minutes on a 2-core CPU
    python benchmarks/bench_train_step.py --steps 10 --repeats 5

Rounds alternate between the variants so that a busy machine slows them alike; the best round of each is printed.
"""

import argparse
import copy
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

import nextchat.loss_nextchat as loss_nextchat
from nextchat.training import synthetic
from nextchat.training.data import length_grouped_order
from nextchat.training.train import run
from nextchat.training.vision_feature_cache import VisionFeatureCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lm_loss_over_every_position(logits, labels, shift_labels, box_token_id):
    if shift_labels is None:
        shift_labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
    shift_labels = shift_labels.masked_fill(shift_labels == box_token_id, -100)
    return F.cross_entropy(logits.float().flatten(0, 1), shift_labels.flatten(), ignore_index=-100, reduction="sum")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per variant")
    args = parser.parse_args()

    with open(os.path.join(ROOT, "training", "configs", "shapes_tiny.json"), encoding="utf-8") as f:
        config = json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        num = config["training_args"]["per_device_train_batch_size"] * (args.steps + 1)
        # the scenes and wordings of `examples/train_shapes.sh`'s training section
        synthetic.main([os.path.join(tmp, "data"), "--num", str(num), "--single-object-fraction", "0.2",
                        "--caption-order", "name", "--min-turns", "1", "--max-turns", "2", "--mix-turn-tasks",
                        "--phrasings", "train", "--absent-fraction", "0.3", "--relation-fraction", "0.2",
                        "--scramble-fraction", "0.2"])
        config["data"] = {"train": os.path.join(tmp, "data", "data.jsonl"), "use_masks": False,
                          "return_sam_pixel_values": False}
        config["training_args"].update(max_steps=1, output_dir=os.path.join(tmp, "out"), dataloader_num_workers=0,
                                       dataloader_persistent_workers=False, report_to="none")
        config["output_model_dir"] = None
        trainer, model, _ = run(config, root=os.path.join(ROOT, "training", "configs"))
        deeper_config = copy.deepcopy(config)
        deeper_config["model"]["scratch"]["text_config"]["num_hidden_layers"] = 3
        deeper_config["attention_supervision"]["layers"] = [-1]
        deeper_config["training_args"]["output_dir"] = os.path.join(tmp, "out-three-layers")
        deeper_trainer, deeper, _ = run(deeper_config, root=os.path.join(ROOT, "training", "configs"))
        batches = list(trainer.get_train_dataloader())[: args.steps + 1]
        # the timed batches' samples again, in batches of like length (`data.length_grouping_window`)
        size = config["training_args"]["per_device_train_batch_size"]
        samples = [trainer.train_dataset[i] for i in range(size, size * (args.steps + 1))]
        order = length_grouped_order([len(s["input_ids"]) for s in samples], size, args.steps)
        grouped = [trainer.data_collator([samples[i] for i in order[k : k + size]])
                   for k in range(0, len(order), size)]
    model.train()
    deeper.train()
    llama = LlamaForCausalLM(model.config.text_config).train()
    llama_optimizer = torch.optim.AdamW(llama.parameters(), lr=1e-4)
    autocast = trainer.args.bf16

    def nextchat_step(batch):
        trainer.training_step(model, batch)

    def three_layer_step(batch):
        deeper_trainer.training_step(deeper, batch)

    def llama_step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        llama_optimizer.step()
        llama_optimizer.zero_grad()

    shipped_lm_loss = loss_nextchat.lm_loss
    cache = VisionFeatureCache(model.model.vision_tower).attach()
    VisionFeatureCache(deeper.model.vision_tower).attach()
    with torch.no_grad():  # every timed image computed once, as from phase 1's second epoch on
        for batch in batches + grouped:
            model.get_image_features(batch["pixel_values"])  # the layers the model asks the tower for
        for batch in batches:
            deeper.get_image_features(batch["pixel_values"])
    # name: (step, lm_loss, batches, logits_in_training, tower features cached)
    variants = {
        "both options": (nextchat_step, shipped_lm_loss, batches[1:], "targets", True),
        "tower each step": (nextchat_step, shipped_lm_loss, batches[1:], "targets", False),
        "all logits": (nextchat_step, shipped_lm_loss, batches[1:], "all", True),
        "neither": (nextchat_step, shipped_lm_loss, batches[1:], "all", False),
        "all positions": (nextchat_step, lm_loss_over_every_position, batches[1:], "all", False),
        "length-grouped": (nextchat_step, shipped_lm_loss, grouped, "targets", True),
        "three layers": (three_layer_step, shipped_lm_loss, batches[1:], "targets", True),
        "plain LLaMA": (llama_step, shipped_lm_loss, batches[1:], "targets", False),
    }
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.repeats):
        for name, (step, lm_loss, timed, logits, cached) in variants.items():
            loss_nextchat.lm_loss = lm_loss
            model.logits_in_training = logits
            if cached:
                cache.attach()
            else:
                cache.detach()
            step(batches[0])  # warm-up
            start = time.perf_counter()
            for batch in timed:
                step(batch)
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps)
    loss_nextchat.lm_loss = shipped_lm_loss
    tokens = batches[0]["input_ids"].shape
    print(f"batch {tokens[0]} x {tokens[1]} tokens, bf16 autocast: {autocast}, {torch.get_num_threads()} thread(s)")
    width = [sum(b["input_ids"].numel() for b in timed) / args.steps for timed in (batches[1:], grouped)]
    real = sum(int(b["attention_mask"].sum()) for b in batches[1:]) / args.steps
    print(f"tokens per timed step: {real:.0f} real; padded to {width[0]:.0f} in file order, {width[1]:.0f} grouped")
    for name, seconds in best.items():
        print(f"{name:>15}: {seconds:.3f} s/step  ({seconds / best['both options']:.2f} x both options)")


if __name__ == "__main__":
    main()
