"""Device check of the REAL-SIZE NExT-Chat path (Vicuna-7B + CLIP ViT-L/14-336 + SAM ViT-H), with random weights.

CPU tests only run tiny models; this script runs the default `NextChatConfig()` once on one GPU and prints a
compact JSON report. Each section is independent: a failure is recorded (error and the last traceback lines) and
the script goes on with the next one.

* build     `NextChatConfig()` built directly on the GPU in bfloat16 (no slow CPU init); parameters per part
            against the published `AoZhang/nextchat-7b-336` (counted from its weight files); seconds, GPU memory.
* inputs    one conversation of real shape, assembled from the config's token ids (no tokenizer): bos, text,
            `<im_start>` + 576 `<im_patch>` + `<im_end>`, a user box `<at> <boxes>`, text, and an assistant answer
            with its own `<at> <boxes>` (about 650 tokens); CLIP pixels (1, 3, 336, 336), SAM pixels
            (1, 3, 1024, 1024), `box_inputs` (1, 2, 4), `labels`, `mask_targets` (1, 2, 1024, 1024).
* forward   `torch.no_grad` forward with labels and mask targets: every loss term finite, output shapes.
* generate  greedy, 32 new tokens (EOS held off so the length is fixed), a prompt that ends with `<at>` (so at
            least one box and mask): tokens/s, `pred_boxes`/`pred_masks` shapes, finite boxes; and the same
            language model as a plain `LlamaForCausalLM` on the same prompt embeddings: time ratio (as
            benchmarks/bench_generate.py does on CPU).
* train     PEFT LoRA on the language model (`nextchat.training.presets.apply_lora`) with activation
            checkpointing: forward + backward with every loss term; grads finite, only on LoRA and the heads in
            `modules_to_save`; seconds per step and peak memory.

Run from the repository root:

    python benchmarks/device_check_real_size.py          # real size, GPU: JSON on stdout and in $OUT/device_check.json
    python benchmarks/device_check_real_size.py --tiny   # the same code path with the tests' tiny config, on CPU

Needs `nextchat` installed (`pip install -e .`, or its wheel with `--no-deps` where torch is already there) with
torch built for CUDA, transformers>=5.24, peft and segment-anything. The measured figures are in
benchmarks/README.md. `--tiny` takes seconds. The exit status is 1 when a section failed.
"""

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[1]

# Parameters of the published model's parts, counted from the tensor shapes of its weight files. The language model counts embeddings,
# 32 layers, the final norm and `lm_head` (vocab 32005); SAM is segment-anything's ViT-H without its 256-number
# Fourier-feature buffer (641,090,864 with it); the heads follow from the listed weight shapes, biases included.
PUBLISHED_PARAMETERS = {
    "vision_tower": 303_507_456,
    "mm_projector": 20_979_712,
    "language_model": 6_738_456_576,
    "loc_encoder": 8_402_944,
    "loc_decoder": 8_398_852,
    "seg_prompt_mlp": 20_976_640,
    "sam": 641_090_608,
}
LOSS_TERMS = ("loss", "lm_loss", "box_l1_loss", "box_giou_loss", "cycle_embed_loss", "cycle_box_loss",
              "mask_ce_loss", "mask_dice_loss", "mask_iou_loss", "grounding_attention_loss")
USER_BOX = [0.10, 0.20, 0.50, 0.60]     # normalised xyxy, padded-square frame
ANSWER_BOX = [0.30, 0.25, 0.80, 0.90]


class SectionSkipped(RuntimeError):
    """A section cannot run because an earlier one failed."""


class State:
    """What the sections hand on to each other."""

    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.model = None
        self.sample = None   # training sample: forward inputs with labels and mask targets
        self.prompt = None   # generation prompt ending with `<at>`, with its SAM pixels

    def need(self, *names):
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise SectionSkipped(f"{', '.join(missing)} missing (an earlier section failed)")


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """`(result, seconds)` of `fn()`, with the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def gib(num_bytes: int) -> float:
    return round(num_bytes / 2**30, 2)


def shape(tensor) -> list[int] | None:
    return None if tensor is None else list(tensor.shape)


def count(module) -> int:
    modules = module if isinstance(module, (list, tuple)) else [module]
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def run_section(report: dict, name: str, fn, state: State):
    """Runs `fn(state, entry)`, which fills the dict `entry` as it goes, and stores `entry` under `report[name]`
    with `ok`, seconds and GPU memory; on an exception, what was filled in stays, with the error and traceback."""
    device = state.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    entry = report[name] = {"ok": None}
    try:
        fn(state, entry)
        entry["ok"] = True
    except SectionSkipped as skipped:
        entry.update(ok=False, skipped=str(skipped))
    except Exception as error:  # noqa: BLE001 - a failed section is reported, the next one still runs
        lines = traceback.format_exc().strip().splitlines()
        entry.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000], traceback=lines[-14:])
        print(f"[device_check] section {name!r} FAILED: {entry['error']}", file=sys.stderr)
    entry["section_seconds"] = round(time.perf_counter() - start, 2)
    if device.type == "cuda":
        entry["gpu_allocated_gib"] = gib(torch.cuda.memory_allocated(device))
        entry["gpu_peak_gib"] = gib(torch.cuda.max_memory_allocated(device))
        torch.cuda.empty_cache()
    print(f"[device_check] {name}: {'ok' if entry['ok'] else 'FAILED'} in {entry['section_seconds']} s",
          file=sys.stderr)


# ------------------------------------------------------------------------------------------------------------------
# build
# ------------------------------------------------------------------------------------------------------------------


def build_config(args):
    from nextchat import NextChatConfig

    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_models import tiny_config

        return tiny_config()
    config = NextChatConfig()
    if args.lm_layers:
        config.text_config.num_hidden_layers = args.lm_layers
    return config


def part_modules(model) -> dict:
    return {
        "vision_tower": model.model.vision_tower,
        "mm_projector": model.model.mm_projector,
        "language_model": [model.model.language_model, model.lm_head],
        "loc_encoder": model.model.loc_encoder,
        "loc_decoder": model.loc_decoder,
        "seg_prompt_mlp": model.seg_prompt_mlp,
        "sam": model.sam,
    }


def section_build(state: State, out: dict):
    """Builds the model on the device in the chosen dtype; counts parameters per part."""
    from transformers import AutoModel

    config = build_config(state.args)
    torch.manual_seed(0)

    def build():
        with torch.device(state.device):
            return AutoModel.from_config(config, dtype=state.dtype).eval()

    state.model, seconds = timed(build, state.device)
    model = state.model
    parts = {name: count(module) for name, module in part_modules(model).items()}
    out.update({
        "class": type(model).__name__,
        "seconds": round(seconds, 2),
        "dtype": str(next(model.parameters()).dtype),
        "attn_implementation": {"text": model.config.text_config._attn_implementation,
                                "vision": model.config.vision_config._attn_implementation},
        "parameters": {**parts, "total": count(model)},
        "image_seq_length": model.config.image_seq_length,
    })
    if state.args.tiny or state.args.lm_layers:
        return
    out["published_parameters"] = {**PUBLISHED_PARAMETERS, "total": sum(PUBLISHED_PARAMETERS.values())}
    mismatched = {name: (parts[name], expected) for name, expected in PUBLISHED_PARAMETERS.items()
                  if parts[name] != expected}
    assert not mismatched, f"parameter counts (ours, published) differ: {mismatched}"


# ------------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------------


def conversation(config, generator: torch.Generator) -> tuple[list[int], list[int], list[int]]:
    """Token ids of a vicuna-shaped exchange, without a tokenizer.

    Returns `(prompt, answer, generation_prompt)`: `prompt` is bos, system text, "USER:", the image block, a user
    box `<at> <boxes>`, more text and "ASSISTANT:"; `answer` is text, an assistant `<at> <boxes>`, text and eos;
    `generation_prompt` is `prompt` plus the first answer words and a final `<at>` that asks for a box.
    """
    text = config.text_config
    first_special = min(config.special_token_ids.values())
    low = max(text.bos_token_id, text.eos_token_id, text.pad_token_id) + 1

    def words(n: int) -> list[int]:
        return torch.randint(low, first_special, (n,), generator=generator).tolist()

    image = [config.image_start_token_id] + [config.image_token_id] * config.image_seq_length
    image += [config.image_end_token_id]
    located = [config.trigger_token_id, config.box_token_id]
    prompt = [text.bos_token_id] + words(30) + image + words(8) + located + words(6) + words(4)
    opening = words(3)
    answer = opening + words(3) + located + words(4) + [text.eos_token_id]
    return prompt, answer, prompt + opening + [config.trigger_token_id]


def section_inputs(state: State, out: dict):
    """Real-shaped training sample and generation prompt (batch 1), on the device, float32 like the processor's."""
    state.need("model")
    config, device = state.model.config, state.device
    generator = torch.Generator().manual_seed(0)
    prompt, answer, generation_prompt = conversation(config, generator)
    vision = config.vision_config
    pixel_values = torch.randn(1, 3, vision.image_size, vision.image_size, generator=generator)
    sam_pixel_values = None
    if config.sam_config is not None:
        size = config.sam_config["image_size"]
        sam_pixel_values = torch.randn(1, 3, size, size, generator=generator)

    input_ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    box_inputs = torch.tensor([[USER_BOX, ANSWER_BOX]])
    sample = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                  box_inputs=box_inputs, box_inputs_mask=torch.ones(1, 2, dtype=torch.bool), labels=labels)
    if sam_pixel_values is not None:
        sample["sam_pixel_values"] = sam_pixel_values
        sample["mask_targets"] = mask_targets(size, [None, ANSWER_BOX])
    ids = torch.tensor([generation_prompt])
    prompt_inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                         box_inputs=torch.tensor([[USER_BOX]]), box_inputs_mask=torch.ones(1, 1, dtype=torch.bool))
    if sam_pixel_values is not None:
        prompt_inputs["sam_pixel_values"] = sam_pixel_values

    state.sample = {name: value.to(device) for name, value in sample.items()}
    state.prompt = {name: value.to(device) for name, value in prompt_inputs.items()}
    out.update(sample={name: shape(value) for name, value in sample.items()},
               generation_prompt={name: shape(value) for name, value in prompt_inputs.items()},
               labelled_tokens=len(answer))


def mask_targets(size: int, boxes: list) -> torch.Tensor:
    """`(1, N, size, size)` binary box-shaped masks in the SAM frame; -100 everywhere for a slot without a mask."""
    targets = torch.full((1, len(boxes), size, size), -100.0)
    for slot, box in enumerate(boxes):
        if box is None:
            continue
        x0, y0, x1, y1 = (round(v * size) for v in box)
        targets[0, slot] = 0.0
        targets[0, slot, y0:y1, x0:x1] = 1.0
    return targets


# ------------------------------------------------------------------------------------------------------------------
# forward, generate, train
# ------------------------------------------------------------------------------------------------------------------


def loss_terms(output) -> dict:
    return {name: float(getattr(output, name).detach()) for name in LOSS_TERMS
            if getattr(output, name, None) is not None}


def section_forward(state: State, out: dict):
    """No-grad forward of the training sample: every loss term present and finite."""
    state.need("model", "sample")
    model = state.model.eval()
    with torch.no_grad():
        output, seconds = timed(lambda: model(**state.sample), state.device)
    losses = loss_terms(output)
    expected = {"loss", "lm_loss", "box_l1_loss", "box_giou_loss", "cycle_embed_loss", "cycle_box_loss"}
    if model.sam is not None:
        expected |= {"mask_ce_loss", "mask_dice_loss", "mask_iou_loss"}
    out.update({
        "seconds_first_call": round(seconds, 3),
        "losses": {name: round(value, 5) for name, value in losses.items()},
        "logits": shape(output.logits), "trigger_positions": shape(output.trigger_positions),
        "pred_boxes": shape(output.pred_boxes), "pred_masks": shape(output.pred_masks),
        "iou_scores": shape(output.iou_scores),
    })
    assert expected <= losses.keys(), f"loss terms missing: {sorted(expected - losses.keys())}"
    assert all(math.isfinite(value) for value in losses.values()), f"non-finite loss terms: {losses}"
    assert output.trigger_positions.shape[0] == 2, "expected two triggers (user box and answer box)"


def plain_llama(model):
    """`LlamaForCausalLM` sharing NExT-Chat's language model and `lm_head` (no copy: built on meta, then swapped)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        llama = LlamaForCausalLM(model.config.text_config)
    llama.model = model.model.language_model
    llama.lm_head = model.lm_head
    return llama.eval()


def prompt_embeddings(model, prompt: dict) -> torch.Tensor:
    """The merged `inputs_embeds` (image features, user box) that NExT-Chat gives its language model."""
    captured = {}

    def capture(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach()

    handle = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**{name: value for name, value in prompt.items() if name != "sam_pixel_values"})
    finally:
        handle.remove()
    return captured["embeds"]


def section_generate(state: State, out: dict):
    """Greedy generation of a fixed length with SAM; timings against plain LLaMA on the same embeddings."""
    state.need("model", "prompt")
    args, device, model, prompt = state.args, state.device, state.model.eval(), state.prompt
    text = model.config.text_config
    new = args.new_tokens
    common = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=text.eos_token_id,
                  pad_token_id=text.pad_token_id)
    without_sam = {name: value for name, value in prompt.items() if name != "sam_pixel_values"}
    llama = plain_llama(model)
    embeds = prompt_embeddings(model, prompt)
    variants = {
        "nextchat_with_sam": lambda: model.generate(**prompt, return_dict_in_generate=True, **common),
        "nextchat": lambda: model.generate(**without_sam, return_dict_in_generate=True, **common),
        "llama": lambda: llama.generate(inputs_embeds=embeds, attention_mask=prompt["attention_mask"], **common),
    }
    times = {name: [] for name in variants}
    outputs = {}
    with torch.no_grad():
        for name, fn in variants.items():  # warm-up
            outputs[name] = fn()
        for _ in range(args.repeats):  # alternating runs
            for name, fn in variants.items():
                times[name].append(timed(fn, device)[1])

    output = outputs["nextchat_with_sam"]
    boxes, masks = output.pred_boxes[0], output.pred_masks[0] if output.pred_masks is not None else None
    best = {name: min(values) for name, values in times.items()}
    out.update({
        "new_tokens": new,
        "prompt_tokens": prompt["input_ids"].shape[1],
        "generated_tokens": output.sequences.shape[1] - output.prompt_length,
        "tokens_per_s": {name: round(new / seconds, 2) for name, seconds in best.items()},
        "seconds_best": {name: round(seconds, 4) for name, seconds in best.items()},
        "seconds_median": {name: round(statistics.median(values), 4) for name, values in times.items()},
        "ratio_best_nextchat_over_llama": round(best["nextchat"] / best["llama"], 3),
        "ratio_best_nextchat_with_sam_over_llama": round(best["nextchat_with_sam"] / best["llama"], 3),
        "triggers_generated": int((output.sequences[0, output.prompt_length:] == model.config.trigger_token_id).sum()),
        "pred_boxes": shape(boxes), "pred_masks": shape(masks),
        "iou_scores": shape(output.iou_scores[0]) if output.iou_scores is not None else None,
        "first_box": [round(v, 4) for v in boxes[0].float().tolist()] if len(boxes) else None,
    })
    assert out["generated_tokens"] == new, f"generated {out['generated_tokens']} tokens, asked for {new}"
    assert boxes.shape[0] >= 1, "the prompt ends with <at>: at least one box was expected"
    assert bool(torch.isfinite(boxes).all()), "non-finite boxes"
    if model.sam is not None:
        assert masks is not None and masks.shape[0] == boxes.shape[0], "one mask per box was expected"
        assert bool(torch.isfinite(masks).all()), "non-finite mask logits"


def grad_norm(grads: dict, keyword: str) -> float:
    selected = [g.float().norm() for name, g in grads.items() if keyword in name]
    return float(torch.stack(selected).norm()) if selected else 0.0


def section_train(state: State, out: dict):
    """LoRA (language model only) + activation checkpointing: two forward+backward steps on the training sample."""
    from nextchat.training.presets import DEFAULT_MODULES_TO_SAVE, apply_lora, getattr_path

    state.need("model", "sample")
    model, device = state.model, state.device
    heads = [head for head in DEFAULT_MODULES_TO_SAVE if getattr_path(model, head) is not None]
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    peft_model = apply_lora(model)
    peft_model.train()
    checkpointed = sum(1 for module in model.modules() if getattr(module, "gradient_checkpointing", False) is True)

    def step():
        peft_model.zero_grad(set_to_none=True)
        output = peft_model(**state.sample)
        output.loss.backward()
        return output

    output, first = timed(step, device)
    _, second = timed(step, device)
    named = dict(peft_model.named_parameters())
    grads = {name: p.grad for name, p in named.items() if p.grad is not None}
    trainable = [name for name, p in named.items() if p.requires_grad]
    out.update({
        "step_seconds": [round(first, 3), round(second, 3)],
        "losses": {name: round(value, 5) for name, value in loss_terms(output).items()},
        "modules_with_checkpointing": checkpointed,
        "trainable_parameters": sum(named[name].numel() for name in trainable),
        "lora_modules": sum(1 for name in named if name.endswith("lora_A.default.weight")),
        "grad_norms": {"lora_A": grad_norm(grads, "lora_A"), "lora_B": grad_norm(grads, "lora_B"),
                       **{head: grad_norm(grads, f"{head}.") for head in heads}},
    })
    unexpected = [name for name in grads if "lora_" not in name and "modules_to_save" not in name]
    lora_outside_lm = [name for name in grads if "lora_" in name and "language_model" not in name]
    without_grad = [name for name in trainable if name not in grads]
    non_finite = [name for name, g in grads.items() if not bool(torch.isfinite(g).all())]
    assert math.isfinite(out["losses"]["loss"]), f"non-finite training loss {out['losses']}"
    assert checkpointed > 0, "activation checkpointing is not on in any layer"
    assert not unexpected, f"gradients outside LoRA / modules_to_save: {unexpected[:8]}"
    assert not lora_outside_lm, f"LoRA outside the language model: {lora_outside_lm[:8]}"
    assert not without_grad, f"trainable parameters without a gradient: {without_grad[:8]}"
    assert not non_finite, f"non-finite gradients: {non_finite[:8]}"
    zero = [name for name, norm in out["grad_norms"].items() if name != "lora_A" and not norm > 0]
    assert not zero, f"zero gradients (LoRA B starts at zero, so lora_A may be zero; nothing else): {zero}"


# ------------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for package in ("transformers", "peft", "segment_anything"):
        try:
            info[package] = getattr(importlib.import_module(package), "__version__", "installed")
        except Exception as error:  # noqa: BLE001 - reported; the build section will fail with the details
            info[package] = f"cannot import: {error}"
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=properties.name, gpu_memory_gib=gib(properties.total_memory),
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    return info


def compact_json(report: dict) -> str:
    """JSON with one line per top-level entry."""
    lines = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in report.items()]
    return "{\n" + ",\n".join(lines) + "\n}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny config, on CPU (checks this script)")
    parser.add_argument("--device", help="default: cuda, or cpu with --tiny")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed generate runs per variant (after a warm-up)")
    parser.add_argument("--lm-layers", type=int, help="fewer LLaMA layers (a real-shaped dry run on small memory)")
    parser.add_argument("--output", help="JSON file (default: $OUT/device_check.json when OUT is set)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or use --tiny (CPU)")
    state = State(args, device, getattr(torch, args.dtype))
    mode = "tiny" if args.tiny else f"real-shaped, {args.lm_layers} LM layers" if args.lm_layers else "real"
    report = {"mode": mode, "device": str(device), "dtype": args.dtype,
              "environment": environment(device)}
    for name, fn in (("build", section_build), ("inputs", section_inputs), ("forward", section_forward),
                     ("generate", section_generate), ("train", section_train)):
        run_section(report, name, fn, state)
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    report["ok"] = all(entry["ok"] for entry in report.values() if isinstance(entry, dict) and "ok" in entry)
    text = compact_json(report)
    print(text)
    path = args.output or (os.path.join(os.environ["OUT"], "device_check.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
