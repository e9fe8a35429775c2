"""`nextchat-finetune`: fine-tune a saved NExT-Chat on your own JSONL data, in one command.

```
nextchat-finetune --model DIR_OR_HUB_ID --train my.jsonl [--eval held.jsonl] [--lora] [--output DIR]
                  [--stage stage2] [--steps 300] [--batch-size 16] [--lr 1e-3]
                  [--train-embeddings auto|yes|no] [--replay old.jsonl --replay-fraction 0.5]
                  [--loss-weight box_giou_loss_weight=1.0] [--attention-supervision JSON] [--save-steps N] [--merge]
```

* Data: the JSONL format of `training/README.md` (image, pixel boxes, optional masks, conversations with `[i]`).
* The stage (default ``stage2``: language model, projector and box heads; ``stage3`` masks only; ``full``) sets
  which parts train AND the loss weights (`nextchat.training.presets.stage_loss_weights`), never the checkpoint's
  config. ``--loss-weight NAME=VALUE`` overrides one.
* ``--lora``: LoRA on the language model's attention, the box/mask heads and the projector in full, and — when the
  data holds words the model cannot produce (``--train-embeddings auto`` measures it: a label token the model
  gives < 1% probability wherever it occurs) or with ``--train-embeddings yes`` — ``lm_head`` and the input
  embeddings in full too. The trainable parameters are printed per part.
* ``--replay FILE``: mix in samples of the old data (``--replay-fraction`` of the training set's size), so that
  what the model knew is kept.
* Outputs: ``--output`` (default ``finetuned``) gets the final model — a full model folder, or with ``--lora`` an
  adapter folder (``adapter_config.json`` naming the base model by absolute path or Hub id) — with the processor;
  every ``checkpoint-N/`` is the same kind of folder. ``--merge`` also writes ``OUTPUT/merged`` (a full,
  Hub-ready model folder); ``nextchat-merge ADAPTER OUT`` does it later.
* ``--eval FILE``: evaluated at the end with `generate` (first user turn of each record; per task: Acc@0.5 of the
  answer's boxes, exact match of its text); written to ``OUTPUT/eval_metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch


REF = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def _is_local(path: str) -> bool:
    return os.path.isdir(path)


def load_base(model_id: str):
    """(model, processor, base path) of a full model folder / Hub id, or of the merged base+adapter of an adapter
    folder (then fine-tuning continues from the merged model)."""
    from nextchat import NextChatForConditionalGeneration
    from nextchat.processing import NextChatProcessor

    path = os.path.abspath(model_id) if _is_local(model_id) else model_id
    if _is_local(path) and os.path.exists(os.path.join(path, "adapter_config.json")):
        try:
            from nextchat.loading import load_pretrained
        except ImportError:  # older package: merge here
            model = load_adapter_merged(path)
            has_processor = os.path.exists(os.path.join(path, "processor_config.json"))
            return model, NextChatProcessor.from_pretrained(path if has_processor else adapter_base(path)), path
        model, processor = load_pretrained(path)
        return model, processor, path
    model = NextChatForConditionalGeneration.from_pretrained(path)
    return model, NextChatProcessor.from_pretrained(path), path


def adapter_base(adapter_dir: str) -> str:
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no `base_model_name_or_path`; pass --base")
    return base


def load_adapter_merged(adapter_dir: str, base: str | None = None):
    """The base model of an adapter folder with the adapter merged in (a plain `NextChatForConditionalGeneration`)."""
    from peft import PeftModel

    from nextchat import NextChatForConditionalGeneration

    base = base or adapter_base(adapter_dir)
    model = NextChatForConditionalGeneration.from_pretrained(base)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


# ----------------------------------------------------------------------------------------------------------------
# new words
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def unproducible_tokens(model, dataset, num_samples: int = 32, threshold: float = 0.01) -> dict[int, float]:
    """Label tokens of the first `num_samples` samples that the model gives less than `threshold` probability at
    EVERY place they occur (teacher-forced): words it cannot produce yet. Returns ``{token_id: best probability}``."""
    from .data import NextChatDataCollator
    from .trainer import base_model_of

    base = base_model_of(model)
    was_training = base.training
    base.eval()
    config = base.config
    best: dict[int, float] = {}
    collate = NextChatDataCollator.from_processor(dataset.processor) if hasattr(dataset, "processor") else None
    for index in range(min(num_samples, len(dataset))):
        sample = dataset[index]
        batch = collate([sample]) if collate else sample
        labels = batch.pop("labels")
        batch.pop("mask_targets", None)
        batch.pop("sam_pixel_values", None)
        device = next(base.parameters()).device
        out = base(**{k: v.to(device) for k, v in batch.items()})
        probs = out.logits[0, :-1].float().softmax(-1)
        targets = labels[0, 1:].to(device)
        keep = (targets != -100) & (targets != config.box_token_id) & (targets != config.trigger_token_id)
        for position in torch.nonzero(keep).flatten().tolist():
            token = int(targets[position])
            best[token] = max(best.get(token, 0.0), float(probs[position, token]))
    base.train(was_training)
    return {token: p for token, p in best.items() if p < threshold}


# ----------------------------------------------------------------------------------------------------------------
# evaluation on a JSONL file
# ----------------------------------------------------------------------------------------------------------------


def _box_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _norm(text: str) -> str:
    return " ".join(REF.sub("", text).lower().replace(" .", ".").strip().rstrip(".").split())


def _refs(text: str) -> list[int]:
    return [int(i) for m in REF.finditer(text) for i in m.group(1).split(",")]


def first_turn_queries(path: str) -> list[dict]:
    """One query per record: its first user turn (its `[i]` boxes renumbered from 0) and the first answer's boxes."""
    from .data import NextChatJsonlDataset

    records = NextChatJsonlDataset.__new__(NextChatJsonlDataset)
    records.lines, records.roots, records._root_dirs = [], [], [os.path.dirname(os.path.abspath(path))]
    with open(path, encoding="utf-8") as f:
        records.lines = [line for line in f if line.strip()]
    records.roots = [0] * len(records.lines)
    queries = []
    for index in range(len(records.lines)):
        record = records.record(index)
        turns = [t for t in record["conversations"] if t["role"] != "system"]
        if len(turns) < 2 or turns[0]["role"] != "user":
            continue
        question, answer = turns[0]["content"], turns[1]["content"]
        boxes = record.get("boxes") or []
        given = list(dict.fromkeys(_refs(question)))
        remap = {old: new for new, old in enumerate(given)}
        question = REF.sub(lambda m: "[" + ",".join(str(remap[int(i)]) for i in m.group(1).split(",")) + "]", question)
        task = record.get("task")
        task = task[0] if isinstance(task, list) and task else task
        targets = [boxes[i] for i in _refs(answer)]
        queries.append({
            "task": task or ("grounding" if targets else "text"), "image": record.get("image"),
            "question": question, "boxes": [boxes[i] for i in given] or None, "answer": answer, "targets": targets,
        })
    return queries


@torch.no_grad()
def evaluate_jsonl(model, processor, path: str, max_samples: int | None = None, batch_size: int = 32) -> dict:
    """Per-task figures of `model` on the first turn of each record of `path`: ``box_acc@0.5`` (the k-th box of the
    answer against the k-th reference box; a missing box is a miss), ``text_exact`` (the answer's text, boxes
    removed, case and final period ignored) and ``n``."""
    import PIL.Image

    from .trainer import base_model_of

    model = base_model_of(model)
    model.eval()
    queries = first_turn_queries(path)[:max_samples]
    device = next(model.parameters()).device
    use_sam = getattr(model, "sam", None) is not None and processor.image_processor.sam_image_size is not None
    per_task: dict[str, dict] = {}
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        texts = [processor.apply_chat_template([{"role": "user", "content": q["question"]}],
                                               add_generation_prompt=True) for q in chunk]
        images = [PIL.Image.open(q["image"]).convert("RGB") for q in chunk]
        boxes = [q["boxes"] for q in chunk]
        inputs = processor(images=images, text=texts, boxes=boxes if any(b for b in boxes) else None,
                           padding_side="left", return_sam_pixel_values=use_sam)
        image_sizes = inputs.pop("image_sizes")
        output = model.generate(
            **{k: v.to(device) for k, v in inputs.items()}, max_new_tokens=64, do_sample=False, num_beams=1,
            return_dict_in_generate=True,
            pad_token_id=processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0,
        )
        for q, result in zip(chunk, processor.post_process_generation(output, image_sizes=image_sizes)):
            stats = per_task.setdefault(q["task"], {"n": 0, "boxes": 0, "box_hits": 0, "text_hits": 0})
            stats["n"] += 1
            predicted = [e["box"] for e in result["entities"] if e.get("box") is not None]
            for k, target in enumerate(q["targets"]):
                stats["boxes"] += 1
                stats["box_hits"] += k < len(predicted) and _box_iou(predicted[k], target) > 0.5
            stats["text_hits"] += _norm(result["text"]) == _norm(q["answer"])
    metrics = {}
    for task, s in sorted(per_task.items()):
        metrics[task] = {"n": s["n"], "text_exact": s["text_hits"] / s["n"]}
        if s["boxes"]:
            metrics[task]["box_acc@0.5"] = s["box_hits"] / s["boxes"]
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------------


class SaveProcessorCallback:
    """Writes the processor into every checkpoint folder, so that each loads with one argument."""

    def __new__(cls, processor):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                    if os.path.isdir(folder):
                        processor.save_pretrained(folder)

        return _Callback()


def _vision_modules(model, layers: int | None) -> list[str]:
    """The vision-tower modules `--train-vision` trains: the whole tower, or (`--vision-layers N`) the last N encoder
    layers among those whose output the model uses (`config.vision_feature_layer`; with -2 the last layer is not
    used)."""
    if layers is None:
        return ["vision_tower"]
    tower = model.model.vision_tower
    total = len(tower.encoder.layers)
    feature_layer = model.config.vision_feature_layer
    feature_layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    # hidden_states[i]: i = 0 the embeddings, i = k the output of layer k - 1
    used = max(i if i >= 0 else total + 1 + i for i in feature_layers)
    if not 1 <= layers <= used:
        raise SystemExit(f"--vision-layers: between 1 and {used} (the layers whose output the model uses)")
    return [f"vision_tower.encoder.layers.{i}" for i in range(used - layers, used)]


def build_parser():
    parser = argparse.ArgumentParser(prog="nextchat-finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved NExT-Chat folder, Hub id, or adapter folder")
    parser.add_argument("--train", required=True, action="append", help="JSONL file (repeatable)")
    parser.add_argument("--eval", help="JSONL file evaluated at the end (per-task figures)")
    parser.add_argument("--output", default="finetuned", help="output folder (default: finetuned)")
    parser.add_argument("--stage", default="stage2", help="stage preset: stage2 (default), stage1, stage3, sam, full")
    parser.add_argument("--lora", action="store_true", help="LoRA on the language model (+ heads in full)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-target", choices=("attention", "all"), default="attention",
                        help="with --lora: LoRA on the language model's attention (default) or attention and MLP")
    parser.add_argument("--train-embeddings", choices=("auto", "yes", "no"), default="auto",
                        help="with --lora: train lm_head and the input embeddings in full (auto: when the data has "
                             "words the model cannot produce)")
    parser.add_argument("--train-vision", action="store_true",
                        help="train the vision tower too (in full; with --lora saved with the adapter), at --vision-lr: "
                             "for new kinds of objects that the frozen tower does not tell apart from old ones")
    parser.add_argument("--vision-lr", type=float, default=None,
                        help="learning rate of the vision tower with --train-vision (default: --lr / 10)")
    parser.add_argument("--vision-layers", type=int, default=None,
                        help="with --train-vision: train only the last N encoder layers whose output the model uses "
                             "(config.vision_feature_layer), not the embeddings (default: the whole tower)")
    parser.add_argument("--part-lr", action="append", default=[], metavar="PART=LR",
                        help="learning rate of one part (embed_tokens, lm_head, language_model, mm_projector, "
                             "loc_encoder, loc_decoder, vision_tower, ...), e.g. lm_head=2e-4 (repeatable)")
    parser.add_argument("--replay", action="append", default=[], help="JSONL of old data to mix in (repeatable)")
    parser.add_argument("--replay-fraction", type=float, default=0.5,
                        help="replay samples per training sample (default 0.5)")
    parser.add_argument("--loss-weight", action="append", default=[], metavar="NAME=VALUE",
                        help="override one of the stage's loss weights, e.g. box_giou_loss_weight=1")
    parser.add_argument("--attention-supervision", metavar="JSON", default=None,
                        help="the training-only attention terms (nextchat.training.AttentionSupervision kwargs), e.g. "
                             "'{\"grounding_weight\": 1, \"grounding_heads\": [0, 1, 2]}'")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=None, help="write checkpoint-N every N steps")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--max-eval", type=int, default=None, help="evaluate on at most this many records")
    parser.add_argument("--merge", action="store_true", help="with --lora: also write OUTPUT/merged (full model)")
    parser.add_argument("--no-tqdm", action="store_true")
    return parser


def run(argv=None) -> dict:
    """Fine-tune as the command line says; returns ``{"output", "eval", "trainable", "new_tokens"}``."""
    from peft import PeftModel
    from transformers import TrainingArguments, set_seed

    from .data import NextChatDataCollator, NextChatJsonlDataset
    from .presets import (LORA_TARGETS, apply_lora, apply_stage_preset, format_parameter_report, getattr_path,
                          part_of, trainable_parameter_report)
    from .trainer import NextChatTrainer, base_model_of

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    model, processor, base_path = load_base(args.model)
    options = apply_stage_preset(model, args.stage)
    for item in args.loss_weight:
        name, _, value = item.partition("=")
        if not hasattr(model.loss_weights, name):
            raise SystemExit(f"--loss-weight: unknown loss weight {name!r}; one of {list(model.loss_weights.to_dict())}")
        setattr(model.loss_weights, name, float(value))
    vision_modules = _vision_modules(model, args.vision_layers) if args.train_vision else ()
    for name in vision_modules:
        getattr_path(model, name).requires_grad_(True)
    print(f"[nextchat-finetune] stage {args.stage}: loss weights {model.loss_weights.to_dict()}")
    if args.attention_supervision:
        from .attention_supervision import AttentionSupervision

        try:
            supervision = AttentionSupervision(**json.loads(args.attention_supervision)).attach(model).attention_supervision
        except (json.JSONDecodeError, TypeError, ValueError) as error:
            raise SystemExit(f"--attention-supervision: {error}")
        print(f"[nextchat-finetune] attention supervision: {supervision.to_dict()}")

    common = dict(use_masks=options["use_masks"], return_sam_pixel_values=options["return_sam_pixel_values"])
    train = NextChatJsonlDataset(args.train, processor, **common)
    datasets = [train]
    if args.replay:
        replay = NextChatJsonlDataset(args.replay, processor, **common)
        count = min(len(replay), int(round(args.replay_fraction * len(train))))
        order = torch.randperm(len(replay), generator=torch.Generator().manual_seed(args.seed))[:count].tolist()
        datasets.append(torch.utils.data.Subset(replay, order))
        print(f"[nextchat-finetune] replay: {count} of {len(replay)} old samples mixed into {len(train)}")
    train_dataset = torch.utils.data.ConcatDataset(datasets) if len(datasets) > 1 else train

    new_tokens = {}
    if args.lora:
        train_embeddings = args.train_embeddings == "yes"
        if args.train_embeddings == "auto":
            new_tokens = unproducible_tokens(model, train)
            train_embeddings = bool(new_tokens)
            if new_tokens:
                pieces = processor.tokenizer.convert_ids_to_tokens(sorted(new_tokens))
                print(f"[nextchat-finetune] the data has tokens the model cannot produce yet ({pieces}): "
                      "lm_head and the input embeddings train in full (--train-embeddings no to refuse)")
        from .presets import DEFAULT_MODULES_TO_SAVE

        modules = DEFAULT_MODULES_TO_SAVE + tuple(vision_modules)
        model = apply_lora(model, r=args.lora_r, lora_alpha=args.lora_alpha, train_embeddings=train_embeddings,
                           modules_to_save=modules, target_modules=LORA_TARGETS[args.lora_target])
        # the adapter names its base by an absolute path (or the Hub id), so that it loads from anywhere
        model.peft_config["default"].base_model_name_or_path = base_path
    report = trainable_parameter_report(model)
    print("[nextchat-finetune] trainable parameters per part:\n" + format_parameter_report(report))

    steps = args.steps if args.steps else -1
    training_args = TrainingArguments(
        output_dir=args.output, max_steps=steps, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, warmup_steps=args.warmup_steps, lr_scheduler_type="cosine", weight_decay=0.0,
        logging_steps=args.logging_steps, save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500, seed=args.seed, report_to="none", remove_unused_columns=False,
        disable_tqdm=args.no_tqdm, dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
        bf16=torch.cuda.is_available()
        and torch.cuda.is_bf16_supported(),
    )
    optimizers = (None, None)
    part_lrs = {}
    if args.train_vision:  # the vision tower learns slower than the rest (at --lr it was measured to forget)
        part_lrs["vision_tower"] = args.vision_lr if args.vision_lr is not None else args.lr / 10
    for item in args.part_lr:
        name, _, value = item.partition("=")
        try:
            part_lrs[name] = float(value)
        except ValueError:
            raise SystemExit(f"--part-lr: expected PART=LR, got {item!r}")
    if part_lrs:
        unknown = set(part_lrs) - {part_of(n) for n, _ in model.named_parameters()}
        if unknown:
            raise SystemExit(f"--part-lr: no such part {sorted(unknown)}; parts: {sorted(report)}")
        groups: dict[float, list] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                groups.setdefault(part_lrs.get(part_of(name), args.lr), []).append(parameter)
        print(f"[nextchat-finetune] learning rates per part: {part_lrs} (others {args.lr})")
        optimizers = (torch.optim.AdamW([{"params": ps, "lr": lr} for lr, ps in groups.items()], lr=args.lr,
                                        weight_decay=0.0), None)
    trainer = NextChatTrainer(
        model=model, args=training_args, train_dataset=train_dataset,
        data_collator=NextChatDataCollator.from_processor(processor), callbacks=[SaveProcessorCallback(processor)],
        optimizers=optimizers,
    )
    trainer.train()
    os.makedirs(args.output, exist_ok=True)
    trainer.save_model(args.output)  # the adapter (LoRA) or the full model
    processor.save_pretrained(args.output)
    with open(os.path.join(args.output, "log_history.json"), "w") as f:
        json.dump(trainer.state.log_history, f, indent=1)
    with open(os.path.join(args.output, "finetune_args.json"), "w") as f:
        json.dump({**vars(args), "base_model": base_path}, f, indent=1)
    kind = "adapter folder" if isinstance(model, PeftModel) else "model folder"
    print(f"[nextchat-finetune] {kind} written to {args.output}")

    metrics = None
    if args.eval:
        metrics = evaluate_jsonl(model, processor, args.eval, args.max_eval)
        print("[nextchat-finetune] evaluation on " + args.eval + ":\n" + json.dumps(metrics, indent=1))
        with open(os.path.join(args.output, "eval_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    if args.merge and isinstance(model, PeftModel):
        merged_dir = os.path.join(args.output, "merged")
        merged = model.merge_and_unload()
        merged.loss_weights = None
        merged.save_pretrained(merged_dir)
        processor.save_pretrained(merged_dir)
        print(f"[nextchat-finetune] merged model written to {merged_dir}")
    base_model_of(model).loss_weights = None
    return {"output": args.output, "eval": metrics, "trainable": report, "new_tokens": new_tokens}


def main(argv=None):
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
