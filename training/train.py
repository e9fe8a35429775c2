"""`nextchat-train CONFIG.json`: train NExT-Chat with `NextChatTrainer`, driven by a JSON config file.

Config keys (see `training/configs/*.json` for complete examples):

```
{
  "model": {
    "pretrained": "path/or/hub-id",            # start from a saved NExT-Chat (processor loaded from there too), or
    "scratch": {NextChatConfig kwargs},          # build a new model; its token ids come from the processor
    "processor": "path" | {"shapes": {build_shapes_processor kwargs}},   # optional with "pretrained"
    "sincos_vision_positions": {"scale": 1.0, "temperature": 20},   # scratch only: 2-D sin-cos init of the
                                                 # CLIP position table (true = amplitude 1, a number = that amplitude)
    "reset_head_init": true,                     # scratch only: PyTorch default init of the box/mask heads
    "vision_tower_init": "path",                 # scratch only: a pretrained vision tower (save_pretrained folder,
                                                 # e.g. from `python -m nextchat.training.vision_pretrain`)
    "sam_init": "path",                          # a pretrained SAM (from `python -m nextchat.training.sam_pretrain`);
                                                 # also zeroes seg_prompt_mlp's last layer (see its load_sam)
    "seed": 0                                    # init seed (scratch)
  },
  "stage": "full" | "stage1" | "stage2" | "stage3",
  "loss_weights": {"box_l1_loss_weight": 2.0, ...},   # optional overrides of the stage's loss weights
                                                 # (`model.loss_weights`, a NextChatLossWeights: training
                                                 # arguments, never taken from nor saved in config.json)
  "attention_supervision": {"grounding_weight": 1.0, "grounding_heads": [0, 1, 2], ...},   # optional:
                                                 # the training-only attention terms (AttentionSupervision kwargs)
  "training_config": {"sam_box_prompt": "target",   # optional: the model's training options (attributes, like
                      "logits_in_training": "targets"},   # its loss weights never saved in config.json); "targets":
                                                 # the LM head only where there is an LM target (no `logits` out)
  "lora": {"r": 8, "lora_alpha": 16, ...},            # optional: PEFT LoRA on the language model only
  "data": {
    "train": "train.jsonl" | [..],               # JSONL files (format: nextchat.training.synthetic docstring)
    "eval": "eval.jsonl",                        # optional
    "synthetic": {"out_dir": "...", "seed_start": 0, "num": 20000, ...},   # optional: write the shapes data first
                                                 # (a list of such sections = their files in that order; with
                                                 # training_args.train_sampling_strategy "sequential", a curriculum)
    "max_length": null, "use_masks": true, "system_prompt": null,
    "length_grouping_window": 20                 # optional: batch samples of like length together, the file's
                                                 # order kept at the scale of 20 steps (length_grouped_order;
                                                 # needs train_sampling_strategy "sequential")
    "cache_samples": true                        # optional: keep each prepared sample in memory for later epochs
                                                 # (CachedDataset; the same tensors, so the same weights; with
                                                 # dataloader workers, needs dataloader_persistent_workers)
    "cache_vision_features": true                # optional: a frozen vision tower computes each image's features
                                                 # once, later epochs reuse them (VisionFeatureCache)
  },
  "training_args": {TrainingArguments kwargs; "bf16": "auto" = bf16 where the hardware computes it natively},
  "output_model_dir": "path",                    # optional: save_pretrained model (merged LoRA) + processor here
  "torch_num_threads": 1                         # optional: torch.set_num_threads
}
```
Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

# training options a config's "training_config" may set on the model it trains (model attributes, not config),
# with the values each takes
TRAINING_CONFIG_CHOICES = {"sam_box_prompt": ("predicted", "target"), "logits_in_training": ("all", "targets")}


def _resolve(path, root):
    if path is None or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(root, path))


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (x86 AVX512-BF16 or AMX-BF16, Arm BF16), read from
    the kernel's CPU flags; False where they cannot be read. Elsewhere bf16 is emulated and slower than fp32."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return False
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(value.split()))
    return False


def set_num_threads(config: dict, threads: int | None = None):
    """Torch's intra-op threads: `threads` (a command line's `--threads`), else the config's `torch_num_threads`;
    unset or 0 leaves torch's default. On a small shared CPU, one intra-op thread is far faster than oversubscribed
    ones (measured 10x here)."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    threads = threads or config.get("torch_num_threads")
    if threads:
        torch.set_num_threads(int(threads))


def bf16_available() -> bool:
    """What `"bf16": "auto"` resolves to: bf16 mixed precision where the hardware computes it natively, a CUDA GPU
    that supports it or, without one, a CPU with bf16 instructions."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def build_processor(spec, pretrained=None, root="."):
    from nextchat.processing import NextChatProcessor

    if spec is None:
        if pretrained is None:
            raise ValueError("config: `model.processor` is required when training from scratch")
        return NextChatProcessor.from_pretrained(pretrained)
    if isinstance(spec, str):
        return NextChatProcessor.from_pretrained(_resolve(spec, root) if os.path.exists(_resolve(spec, root)) else spec)
    if isinstance(spec, dict) and "shapes" in spec:
        from .synthetic import build_shapes_processor

        return build_shapes_processor(**spec["shapes"])
    raise ValueError(f"config: `model.processor` must be a path or {{'shapes': {{...}}}}, got {spec!r}")


def scratch_config(processor, spec: dict):
    """A `NextChatConfig` from `spec` with the token ids, vocabulary size and image sizes of `processor`."""
    from nextchat import NextChatConfig

    spec = json.loads(json.dumps(spec))
    tokenizer = processor.tokenizer
    text = dict(spec.pop("text_config", {}))
    text.setdefault("vocab_size", len(tokenizer))
    text.setdefault("bos_token_id", tokenizer.bos_token_id)
    text.setdefault("eos_token_id", tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    text.setdefault("pad_token_id", pad)
    vision = dict(spec.pop("vision_config", {}))
    height, _ = processor.image_processor.crop_height_width
    vision.setdefault("image_size", height)
    sam = spec.pop("sam_config", None)
    if sam is not None and processor.image_processor.sam_image_size is not None:
        sam = dict(sam)
        sam.setdefault("image_size", processor.image_processor.sam_image_size)
    config = NextChatConfig(text_config=text, vision_config=vision, sam_config=sam, **processor.special_token_ids,
                            **spec)
    if config.image_seq_length != processor.image_seq_length:
        raise ValueError(
            f"the vision config gives {config.image_seq_length} image tokens but the processor writes "
            f"{processor.image_seq_length}"
        )
    return config


def build_model(model_spec: dict, processor, root="."):
    from nextchat import NextChatForConditionalGeneration

    from .presets import init_vision_sincos_positions, reset_head_init, sincos_position_options
    from .sam_pretrain import load_sam

    if "pretrained" in model_spec:
        path = model_spec["pretrained"]
        path = _resolve(path, root) if os.path.exists(_resolve(path, root)) else path
        model = NextChatForConditionalGeneration.from_pretrained(path)
        if model_spec.get("sam_init"):
            load_sam(model, _resolve(model_spec["sam_init"], root))
        return model
    config = scratch_config(processor, model_spec["scratch"])
    torch.manual_seed(int(model_spec.get("seed", 0)))
    model = NextChatForConditionalGeneration(config)
    sincos = sincos_position_options(model_spec.get("sincos_vision_positions"))
    if sincos is not None:
        init_vision_sincos_positions(model, **sincos)
    if model_spec.get("reset_head_init", False):
        reset_head_init(model)
    if model_spec.get("vision_tower_init"):
        load_vision_tower(model, _resolve(model_spec["vision_tower_init"], root))
    if model_spec.get("sam_init"):
        load_sam(model, _resolve(model_spec["sam_init"], root))
    return model


def load_vision_tower(model, path: str) -> None:
    """Replace the weights of `model`'s vision tower by those saved at `path` (`save_pretrained` of a tower with the
    same config, e.g. by `nextchat.training.vision_pretrain`)."""
    tower = model.model.vision_tower
    saved = type(tower).from_pretrained(path)
    mine, theirs = tower.config.to_diff_dict(), saved.config.to_diff_dict()
    different = sorted(k for k in set(mine) | set(theirs) if k not in ("_name_or_path", "transformers_version",
                                                                       "architectures", "dtype", "torch_dtype")
                       and mine.get(k) != theirs.get(k))
    if different:
        raise ValueError(f"model.vision_tower_init {path!r}: its vision config differs from the model's in {different}")
    tower.load_state_dict(saved.state_dict())


def write_synthetic_section(spec: dict, root: str = ".") -> str:
    """Write one section of shapes data (``{"out_dir", "seed_start", "num", "jsonl_name", **make_sample kwargs}``)
    unless its JSONL already holds `num` samples; returns the JSONL path."""
    from .synthetic import write_dataset

    spec = dict(spec)
    out_dir = _resolve(spec.pop("out_dir"), root)
    start, num = int(spec.pop("seed_start", 0)), int(spec.pop("num"))
    jsonl = os.path.join(out_dir, spec.get("jsonl_name", "data.jsonl"))
    if not os.path.exists(jsonl) or sum(1 for _ in open(jsonl)) != num:
        print(f"[nextchat-train] writing {num} synthetic samples (seeds {start}..{start + num - 1}) to {jsonl}")
        write_dataset(out_dir, range(start, start + num), **spec)
    return jsonl


def build_training_args(spec: dict, root: str):
    from transformers import TrainingArguments

    spec = dict(spec)
    if spec.get("bf16") == "auto":
        spec["bf16"] = bf16_available()
    if "output_dir" in spec:
        spec["output_dir"] = _resolve(spec["output_dir"], root)
    for key in ("deepspeed", "fsdp_config"):  # config files named relative to the training config
        if isinstance(spec.get(key), str) and os.path.exists(_resolve(spec[key], root)):
            spec[key] = _resolve(spec[key], root)
    multi_process, on_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1, not torch.cuda.is_available()
    if on_cpu and (multi_process or spec.get("bf16")):
        # A CPU run must say so: without `use_cpu` accelerate does not set up data parallelism (each process would
        # train alone on its shard), and TrainingArguments refuses bf16.
        spec.setdefault("use_cpu", True)
    if multi_process and on_cpu:
        spec.setdefault("ddp_backend", "gloo")  # the CPU backend
    elif not multi_process and spec.get("ddp_backend") == "gloo":
        spec.pop("ddp_backend")  # a single process must not ask accelerate for a process group
    spec.setdefault("remove_unused_columns", False)  # the collator already returns only model inputs
    spec.setdefault("report_to", "none")
    return TrainingArguments(**spec)


def run(config: dict, root: str = "."):
    """Train as `config` says. Returns `(trainer, model, processor)`."""
    from .data import CachedDataset, NextChatDataCollator, NextChatJsonlDataset, length_grouped_order
    from .attention_supervision import AttentionSupervision
    from .presets import apply_lora, apply_stage_preset
    from .trainer import NextChatTrainer
    from .vision_feature_cache import VisionFeatureCache

    set_num_threads(config)
    model_spec = config["model"]
    pretrained = model_spec.get("pretrained")
    processor = build_processor(model_spec.get("processor"), _resolve(pretrained, root) if pretrained and
                                os.path.exists(_resolve(pretrained, root)) else pretrained, root)
    data_spec = dict(config.get("data", {}))
    synthetic = data_spec.get("synthetic")
    if synthetic:
        sections = synthetic if isinstance(synthetic, list) else [synthetic]
        data_spec.setdefault("train", [write_synthetic_section(section, root) for section in sections])

    model = build_model(model_spec, processor, root)
    stage_options = apply_stage_preset(model, config.get("stage", "full"))
    weights = model.loss_weights  # set by the stage preset: never the checkpoint config's
    for name, value in (config.get("loss_weights") or {}).items():
        if not name.endswith("_loss_weight") or not hasattr(weights, name):
            raise ValueError(
                f"config: unknown loss weight {name!r} in `loss_weights`, one of {list(weights.to_dict())} (the "
                "attention terms are set in `attention_supervision`)"
            )
        setattr(weights, name, float(value))
    for name, value in (config.get("training_config") or {}).items():
        if name not in TRAINING_CONFIG_CHOICES:
            raise ValueError(f"config: `training_config` takes {tuple(TRAINING_CONFIG_CHOICES)}, got {name!r}")
        if value not in TRAINING_CONFIG_CHOICES[name]:
            raise ValueError(
                f"config: `training_config.{name}` must be one of {TRAINING_CONFIG_CHOICES[name]}, got {value!r}"
            )
        setattr(model, name, value)
    if config.get("attention_supervision"):
        AttentionSupervision(**config["attention_supervision"]).attach(model)
    feature_cache = data_spec.get("cache_vision_features", False)
    if not isinstance(feature_cache, bool):
        raise ValueError(f"config: `data.cache_vision_features` must be true or false, got {feature_cache!r}")
    if feature_cache:  # raises unless the stage froze the tower
        feature_cache = VisionFeatureCache(model.model.vision_tower).attach()
    if config.get("lora"):
        model = apply_lora(model, **config["lora"])
        if pretrained:  # the adapter names its base by absolute path (or Hub id): it loads from anywhere
            local = _resolve(pretrained, root)
            model.peft_config["default"].base_model_name_or_path = local if os.path.exists(local) else pretrained

    use_masks = data_spec.get("use_masks", stage_options["use_masks"])
    sam_inputs = data_spec.get("return_sam_pixel_values", stage_options["return_sam_pixel_values"])
    common = dict(use_masks=use_masks, return_sam_pixel_values=sam_inputs, max_length=data_spec.get("max_length"),
                  system_prompt=data_spec.get("system_prompt"))
    train_paths = data_spec["train"]
    train_paths = [train_paths] if isinstance(train_paths, str) else train_paths
    train_dataset = NextChatJsonlDataset([_resolve(p, root) for p in train_paths], processor, **common)
    eval_dataset = None
    if data_spec.get("eval"):
        eval_dataset = NextChatJsonlDataset(_resolve(data_spec["eval"], root), processor, **common)

    args = build_training_args(config.get("training_args", {}), root)
    cache = data_spec.get("cache_samples", False)
    if not isinstance(cache, bool):
        raise ValueError(f"config: `data.cache_samples` must be true or false, got {cache!r}")
    if cache:
        if args.dataloader_num_workers > 0 and not args.dataloader_persistent_workers:
            raise ValueError(
                "config: `data.cache_samples` keeps the samples in the DataLoader workers, which are started anew "
                "at every epoch: set `training_args.dataloader_persistent_workers` to true, or "
                "`training_args.dataloader_num_workers` to 0"
            )
        train_dataset = CachedDataset(train_dataset)
    window = data_spec.get("length_grouping_window")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(
                f"config: `data.length_grouping_window` must be a positive integer (steps), got {window!r}"
            )
        if args.train_sampling_strategy != "sequential":
            raise ValueError(
                "config: `data.length_grouping_window` writes the order the samples are read in; it needs "
                f"`training_args.train_sampling_strategy` 'sequential', got {args.train_sampling_strategy!r}"
            )
        group = args.per_device_train_batch_size * args.world_size
        lengths = (train_dataset.dataset if cache else train_dataset).text_lengths()
        order = length_grouped_order(lengths, group, window, seed=args.seed)
        train_dataset = torch.utils.data.Subset(train_dataset, order)
    from .finetune import SaveProcessorCallback

    callbacks = [SaveProcessorCallback(processor)]  # every checkpoint-N/ loads with one argument
    trainer = NextChatTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=NextChatDataCollator.from_processor(processor), callbacks=callbacks,
    )
    trainer.vision_feature_cache = feature_cache or None  # detached after training; kept for its counts
    trainer.train(resume_from_checkpoint=config.get("resume_from_checkpoint"))
    if feature_cache:
        feature_cache.detach()
    if args.should_save:
        processor.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f, indent=1)
        try:
            from .plot import plot

            plot(trainer.state.log_history, os.path.join(args.output_dir, "learning_curves.png"))
        except Exception as error:  # a plot must never fail a training run
            print(f"[nextchat-train] could not draw the learning curves: {error}")
    final_dir = config.get("output_model_dir")
    if final_dir and trainer.is_world_process_zero():
        final_dir = _resolve(final_dir, root)
        to_save = trainer.model
        if hasattr(to_save, "merge_and_unload"):
            to_save = to_save.merge_and_unload()
        to_save.save_pretrained(final_dir)
        processor.save_pretrained(final_dir)
        print(f"[nextchat-train] model and processor saved to {final_dir}")
    return trainer, model, processor


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nextchat-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="JSON config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry, e.g. --set training_args.max_steps=10 (VALUE is JSON)")
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as f:
        config = json.load(f)
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    run(config, root=os.path.dirname(os.path.abspath(args.config)))
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """Multi-process runs: leave together and tear the process group down before the interpreter exits."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
