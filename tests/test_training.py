"""Training path: synthetic data, dataset/collator, NextChatTrainer (exact gradient accumulation), stage presets,
LoRA, gradient checkpointing, the `nextchat-train` entry point and its checkpoints."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from nextchat import NextChatForConditionalGeneration
from nextchat.processing import masks_to_sam_frame, rle_decode
from nextchat.training.data import (
    CachedDataset,
    NextChatDataCollator,
    NextChatJsonlDataset,
    encode_record,
    length_grouped_order,
)
from nextchat.training.presets import (
    LM_REGEX,
    apply_lora,
    apply_stage_preset,
    init_vision_sincos_positions,
    sincos_2d,
    trainable_parameter_names,
)
from nextchat.training.synthetic import (
    COLORS,
    EXTRA_SHAPES,
    SHAPES,
    build_shapes_processor,
    distractor_fraction,
    make_sample,
    mask_to_box,
    render_scene,
    shape_mask,
    write_dataset,
)
from nextchat.training.train import scratch_config
from nextchat.training.trainer import NextChatTrainer, count_loss_items


IMAGE = 32
TINY_SPEC = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 512},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "patch_size": 8},
    "sam_config": {"patch_size": 8, "encoder_embed_dim": 16, "encoder_depth": 2, "encoder_num_heads": 2,
                   "encoder_global_attn_indexes": [1], "window_size": 2, "prompt_embed_dim": 16},
    "box_decoder_activation": "sigmoid",
}
SCENE = {"height": IMAGE, "width": IMAGE, "min_size": 6, "max_size": 12, "max_objects": 3}


@pytest.fixture(scope="module")
def processor():
    return build_shapes_processor(image_size=IMAGE, patch_size=8, sam_image_size=IMAGE)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_dataset(str(out), range(16), **SCENE)
    return out


def tiny_model(processor, seed=0, **overrides):
    torch.manual_seed(seed)
    model = NextChatForConditionalGeneration(scratch_config(processor, {**TINY_SPEC, **overrides}))
    with torch.no_grad():  # zero-initialised biases/tables hide mix-ups: perturb everything
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------------------------------------
# synthetic generator
# ------------------------------------------------------------------------------------------------------------------


def test_generator_is_deterministic_per_seed():
    for seed in (0, 7, 123456):
        image_a, record_a = make_sample(seed)
        image_b, record_b = make_sample(seed)
        assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
        assert record_a == record_b
    images = [np.asarray(make_sample(seed)[0]) for seed in range(5)]
    assert all(not np.array_equal(images[0], other) for other in images[1:])


def _shares(objects, attribute):
    """Whether two objects of a scene share `attribute` ("color" or "shape")."""
    values = [o[attribute] for o in objects]
    return len(set(values)) < len(values)


def test_same_shape_fraction_picks_which_attribute_the_distractor_shares():
    # two objects, always a distractor: with 1.0 the pair differs only by colour, with 0.0 only by shape
    scene = dict(min_objects=2, max_objects=2, hard_fraction=1.0)
    by_colour = [render_scene(seed, same_shape_fraction=1.0, **scene)[1] for seed in range(40)]
    by_shape = [render_scene(seed, same_shape_fraction=0.0, **scene)[1] for seed in range(40)]
    assert all(_shares(objects, "shape") and not _shares(objects, "color") for objects in by_colour if len(objects) == 2)
    assert all(_shares(objects, "color") and not _shares(objects, "shape") for objects in by_shape if len(objects) == 2)
    assert sum(len(objects) == 2 for objects in by_colour + by_shape) >= 76
    # the default draws both kinds, about half each
    same_shape = [_shares(render_scene(seed, **scene)[1], "shape") for seed in range(300)]
    assert 0.4 < np.mean(same_shape) < 0.6


def test_lone_object_scenes_and_generator_cli(tmp_path):
    from nextchat.training.synthetic import main as synthetic_main

    # the option draws from the scene's own generator: same seed, same scene; off by default (streams unchanged)
    counts = [len(render_scene(seed, single_object_fraction=0.5)[1]) for seed in range(200)]
    assert counts == [len(render_scene(seed, single_object_fraction=0.5)[1]) for seed in range(200)]
    assert 0.35 < np.mean([c == 1 for c in counts]) < 0.65
    assert all(len(render_scene(seed)[1]) >= 2 for seed in range(50))
    assert all(len(render_scene(seed, single_object_fraction=1.0)[1]) == 1 for seed in range(20))
    # the CLI: lone objects, one turn, referring tasks only
    synthetic_main([str(tmp_path / "warm"), "--num", "12", "--seed-start", "5", "--tasks", "rec,res",
                    "--min-objects", "1", "--max-objects", "1", "--max-turns", "1"])
    records = [json.loads(line) for line in open(tmp_path / "warm" / "data.jsonl")]
    assert [r["seed"] for r in records] == list(range(5, 17))
    assert all(len(r["objects"]) == 1 and len(r["conversations"]) == 2 and set(r["task"]) <= {"rec", "res"}
               for r in records)
    with pytest.raises(SystemExit):
        synthetic_main([str(tmp_path / "bad"), "--tasks", "rec,caption"])
    # task weights: region captions at 0.25 of the others' weight -> 1/13 of the turns; a zero weight drops a task
    synthetic_main([str(tmp_path / "few_reg"), "--num", "260", "--max-turns", "1", "--task-weights", "reg=0.25"])
    tasks = [json.loads(line)["task"][0] for line in open(tmp_path / "few_reg" / "data.jsonl")]
    assert 0.03 < tasks.count("reg") / len(tasks) < 0.14 and min(tasks.count(t) for t in ("rec", "res", "gc")) > 50
    synthetic_main([str(tmp_path / "no_gc"), "--num", "40", "--max-turns", "1", "--task-weights", "gc=0"])
    assert all(json.loads(line)["task"] != ["gc"] for line in open(tmp_path / "no_gc" / "data.jsonl"))
    synthetic_main([str(tmp_path / "by_colour"), "--num", "20", "--max-objects", "2", "--hard-fraction", "1",
                    "--same-shape-fraction", "1"])
    assert all(_shares(json.loads(line)["objects"], "shape") for line in open(tmp_path / "by_colour" / "data.jsonl"))
    synthetic_main([str(tmp_path / "by_name"), "--num", "20", "--tasks", "gc", "--caption-order", "name"])
    by_name = [json.loads(line) for line in open(tmp_path / "by_name" / "data.jsonl")]
    assert [r["conversations"] for r in by_name] == [
        make_sample(seed, tasks=("gc",), caption_order="name")[1]["conversations"] for seed in range(20)]
    for bad in ("reg", "reg=x", "caption=1", "reg=-1"):
        with pytest.raises(SystemExit):
            synthetic_main([str(tmp_path / "bad"), "--task-weights", bad])
    with pytest.raises(SystemExit):
        synthetic_main([str(tmp_path / "bad"), "--caption-order", "left"])


def test_shape_masks_are_exact_geometry():
    h = w = 40
    square = shape_mask("square", 10, 5, 7, h, w)
    assert square.sum() == 100 and mask_to_box(square) == [5, 7, 15, 17]
    circle = shape_mask("circle", 20, 10, 10, h, w)
    assert abs(circle.sum() - np.pi * 100) < 20 and mask_to_box(circle) == [10, 10, 30, 30]
    triangle = shape_mask("triangle", 20, 0, 0, h, w)
    assert abs(triangle.sum() - 200) <= 20 and triangle[19, 0] and triangle[19, 19] and not triangle[0, 0]
    diamond = shape_mask("diamond", 20, 0, 0, h, w)
    assert abs(diamond.sum() - 200) <= 20 and diamond[10, 0] and diamond[0, 10] and not diamond[0, 0]
    for kind in SHAPES:  # never leaves its bounding square
        m = shape_mask(kind, 12, 3, 4, h, w)
        x1, y1, x2, y2 = mask_to_box(m)
        assert x1 >= 3 and y1 >= 4 and x2 <= 15 and y2 <= 16


def test_shape_masks_equal_a_pixel_by_pixel_test_of_the_whole_image():
    """`shape_mask` tests only the pixels of the bounding square; a loop over every pixel of the image, with the
    geometry written out again, gives the same mask, for squares that cross or miss the image edges too."""
    import math

    def naive(kind, size, x0, y0, h, w):
        star = [(0.5 + r * math.cos(a), 0.5 + r * math.sin(a))
                for a, r in ((-math.pi / 2 + i * math.pi / 5, 0.5 if i % 2 == 0 else 0.5 * 0.382) for i in range(10))]
        mask = np.zeros((h, w), dtype=bool)
        for y in range(h):
            for x in range(w):
                u, v = (x + 0.5 - x0) / size, (y + 0.5 - y0) / size
                if not (0 <= u < 1 and 0 <= v < 1):
                    continue
                if kind == "star":  # even-odd rule
                    inside = False
                    for (ax, ay), (bx, by) in zip(star, star[1:] + star[:1]):
                        if (ay > v) != (by > v) and u < ax + (v - ay) * (bx - ax) / (by - ay):
                            inside = not inside
                    mask[y, x] = inside
                else:
                    mask[y, x] = {"square": True, "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
                                  "triangle": abs(u - 0.5) <= v / 2,
                                  "diamond": abs(u - 0.5) + abs(v - 0.5) <= 0.5}[kind]
        return mask

    rng = np.random.default_rng(0)
    placements = [(12, 0, 0), (24, 40, 40), (13, -5, 30), (17, 30, -8), (20, 60, 10), (11, -11, 3), (15, 3, 64)]
    placements += [(int(rng.integers(3, 25)), int(rng.integers(-10, 60)), int(rng.integers(-10, 60))) for _ in range(6)]
    for kind in SHAPES + EXTRA_SHAPES:
        for size, x0, y0 in placements:
            got = shape_mask(kind, size, x0, y0, 48, 64)
            assert got.shape == (48, 64) and got.dtype == bool
            assert np.array_equal(got, naive(kind, size, x0, y0, 48, 64)), (kind, size, x0, y0)
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        shape_mask("hexagon", 10, 0, 0, 20, 20)


def test_scene_boxes_masks_and_pixels_are_exact():
    for seed in range(40):
        image, objects = render_scene(seed)
        pixels = np.asarray(image).astype(int)
        union = np.zeros(pixels.shape[:2], dtype=int)
        for obj in objects:
            mask = obj["mask"]
            assert obj["box"] == mask_to_box(mask)  # the box is exactly the mask's bounding box
            colour = pixels[mask]
            assert np.abs(colour - colour[0]).max() == 0  # one flat colour inside the mask
            assert np.abs(colour[0] - np.array(COLORS[obj["color"]])).max() <= 20
            union += mask
        assert union.max() <= 1  # no overlap
        # (colour, shape) pairs are unique: every phrase names one object
        assert len({(o["color"], o["shape"]) for o in objects}) == len(objects)
        # outside the objects only the light background
        assert pixels[union == 0].min() >= 150 - 19


def test_records_masks_rle_and_references(data_dir):
    lines = [json.loads(line) for line in open(data_dir / "data.jsonl")]
    assert len(lines) == 16
    for record in lines:
        assert os.path.exists(data_dir / record["image"])
        image, objects = render_scene(record["seed"], **SCENE)
        for box, rle in zip(record["boxes"], record["masks"]):
            mask = rle_decode(rle).astype(bool)
            assert mask_to_box(mask) == box
            assert any(np.array_equal(mask, o["mask"]) for o in objects)
        text = " ".join(m["content"] for m in record["conversations"])
        refs = {int(v) for group in re.findall(r"\[([\d,\s]+)\]", text) for v in group.split(",")}
        assert refs == set(range(len(record["boxes"])))
        roles = [m["role"] for m in record["conversations"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert record["conversations"][0]["content"].startswith("<image>")


def test_grounded_captions_name_each_object_once_at_its_box_in_no_fixed_order():
    left_to_right = []
    for seed in range(60):
        _, record = make_sample(seed, tasks=("gc",), min_turns=1, max_turns=1, min_objects=2)
        named = re.findall(r"a (\w+) (\w+) \[(\d+)\]", record["conversations"][1]["content"])
        by_name = {(o["color"], o["shape"]): o["box"] for o in record["objects"]}
        assert sorted((c, s) for c, s, _ in named) == sorted(by_name)  # every object, once
        for color, shape, index in named:
            assert record["boxes"][int(index)] == by_name[(color, shape)]
        x_centres = [by_name[(c, s)][0] + by_name[(c, s)][2] for c, s, _ in named]
        left_to_right.append(x_centres == sorted(x_centres))
    # a fixed (e.g. left-to-right) order would let the k-th box be found by position instead of by name
    assert 0.2 < np.mean(left_to_right) < 0.8


def test_grounded_captions_by_name_list_colour_then_shape_and_change_nothing_else():
    palette = ["red", "green", "blue", "yellow", "purple"]  # the generator's colour order, written out by hand
    shapes = ["square", "circle", "triangle", "diamond"]
    reordered = 0
    for seed in range(60):
        _, record = make_sample(seed, tasks=("gc",), min_turns=1, max_turns=1, caption_order="name")
        _, default = make_sample(seed, tasks=("gc",), min_turns=1, max_turns=1)
        named = re.findall(r"a (\w+) (\w+) \[(\d+)\]", record["conversations"][1]["content"])
        keys = [(palette.index(c), shapes.index(s)) for c, s, _ in named]
        assert keys == sorted(keys)
        by_name = {(o["color"], o["shape"]): o["box"] for o in record["objects"]}
        assert sorted((c, s) for c, s, _ in named) == sorted(by_name)
        for color, shape, index in named:
            assert record["boxes"][int(index)] == by_name[(color, shape)]
        assert record["objects"] == default["objects"] and record["task"] == default["task"]
        reordered += record["conversations"] != default["conversations"]
    assert reordered > 10
    with pytest.raises(ValueError, match="caption_order"):
        make_sample(0, tasks=("gc",), caption_order="left")


def test_referring_queries_have_distractors_at_least_half_the_time():
    records = [make_sample(seed)[1] for seed in range(300)]
    assert distractor_fraction(records) >= 0.5
    tasks = {t for r in records for t in r["task"]}
    assert tasks == {"rec", "res", "reg", "gc"}


# ------------------------------------------------------------------------------------------------------------------
# dataset + collator
# ------------------------------------------------------------------------------------------------------------------


def test_collator_equals_batched_processor(processor, data_dir, tmp_path):
    # a text-only record and one without masks, next to synthetic ones
    records = [json.loads(line) for line in open(data_dir / "data.jsonl")][:3]
    for r in records:
        r["image"] = str(data_dir / r["image"])
    records[1]["masks"][0] = None
    records.append({"conversations": [{"role": "user", "content": "Hello!"},
                                      {"role": "assistant", "content": "Hi, what can I do?"}]})
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = NextChatJsonlDataset(str(path), processor)
    batch = NextChatDataCollator.from_processor(processor)([dataset[i] for i in range(len(dataset))])

    from PIL import Image

    texts = [processor.apply_chat_template(r["conversations"]) for r in records]
    images = [Image.open(r["image"]).convert("RGB") if "image" in r else None for r in records]
    reference = processor(
        images=images, text=texts, boxes=[r.get("boxes") for r in records], masks=[r.get("masks") for r in records],
        return_labels=True,
    )
    assert set(batch) == set(reference) - {"image_sizes"}
    for key, value in batch.items():
        assert value.dtype == reference[key].dtype, key
        assert torch.equal(value, reference[key]), key

    # labels: assistant text, `</s>` and assistant `<at>` only; `<boxes>` and image tokens never
    labels, ids = batch["labels"], batch["input_ids"]
    assert not (labels == processor.box_token_id).any()
    assert not (labels == processor.image_token_id).any()
    assistant_triggers = (ids == processor.trigger_token_id) & (labels != -100)
    assert (labels[assistant_triggers] == processor.trigger_token_id).all()
    # mask targets: the decoded RLE mask (SAM frame == image here) at each assistant slot, -100 where none
    for b, record in enumerate(records[:3]):
        slot_refs = [int(v) for m in record["conversations"]
                     for group in re.findall(r"\[([\d,\s]+)\]", m["content"]) for v in group.split(",")]
        for slot, box_index in enumerate(slot_refs):
            rle = record["masks"][box_index]
            target = batch["mask_targets"][b, slot]
            if rle is None:
                assert (target == -100).all()
            else:
                expected = masks_to_sam_frame(rle_decode(rle), IMAGE)[0]
                assert torch.equal(target, torch.from_numpy(expected))
    assert (batch["mask_targets"][3] == -100).all() and not batch["box_inputs_mask"][3].any()
    assert batch["pixel_values"].shape[0] == 3 and (batch["sam_pixel_values"][3] == 0).all()


def test_collator_left_padding_and_image_sizes(processor, data_dir):
    dataset = NextChatJsonlDataset(str(data_dir / "data.jsonl"), processor)
    samples = [dataset[i] for i in range(4)]
    batch = NextChatDataCollator.from_processor(processor, padding_side="left", keep_image_sizes=True)(samples)
    for b, sample in enumerate(samples):
        n = sample["input_ids"].shape[0]
        assert torch.equal(batch["input_ids"][b, -n:], sample["input_ids"])
        assert batch["attention_mask"][b, : batch["input_ids"].shape[1] - n].sum() == 0
    assert batch["image_sizes"].tolist() == [[IMAGE, IMAGE]] * 4


def test_dataset_box_only_mode(processor, data_dir):
    dataset = NextChatJsonlDataset(str(data_dir / "data.jsonl"), processor, return_sam_pixel_values=False)
    sample = dataset[0]
    assert "sam_pixel_values" not in sample and "mask_targets" not in sample
    assert sample["labels"].shape == sample["input_ids"].shape


# ------------------------------------------------------------------------------------------------------------------
# Trainer: exact gradient accumulation
# ------------------------------------------------------------------------------------------------------------------


class _OrderedTrainer(NextChatTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _one_sgd_step(processor, dataset, batch_size, accumulation, trainer_class, tmp_path):
    from transformers import TrainingArguments

    model = tiny_model(processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / f"out{batch_size}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, save_strategy="no", report_to="none",
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, use_cpu=True,
    )
    trainer = trainer_class(model=model, args=args, train_dataset=dataset,
                            data_collator=NextChatDataCollator.from_processor(processor))
    trainer.train()
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}  # = the gradient (lr 1, SGD)


def test_gradient_accumulation_is_exact_through_trainer(processor, data_dir, tmp_path):
    dataset = NextChatJsonlDataset(str(data_dir / "data.jsonl"), processor)
    dataset.lines = dataset.lines[:6]
    full = _one_sgd_step(processor, dataset, 6, 1, _OrderedTrainer, tmp_path)
    accumulated = _one_sgd_step(processor, dataset, 2, 3, _OrderedTrainer, tmp_path)
    scale = max(float(g.abs().max()) for g in full.values())
    worst = max(float((full[n] - accumulated[n]).abs().max()) for n in full)
    assert scale > 0 and worst <= 1e-5 * max(scale, 1.0), worst
    # every part of the model got a gradient (LM, projector, box heads, CLIP, SAM)
    for prefix in ("model.language_model.", "model.mm_projector.", "model.loc_encoder.", "loc_decoder.",
                   "model.vision_tower.", "seg_prompt_mlp.", "sam.mask_decoder.", "sam.image_encoder."):
        assert any(float(g.abs().sum()) > 0 for n, g in full.items() if n.startswith(prefix)), prefix

    # the stock integer normaliser is NOT exact for the box / mask terms: the dict is what makes the test pass
    class _IntTrainer(_OrderedTrainer):
        def _get_num_items_in_batch(self, batch_samples, device):
            return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batch_samples)

    stock = _one_sgd_step(processor, dataset, 2, 3, _IntTrainer, tmp_path)
    assert max(float((full[n] - stock[n]).abs().max()) for n in full) > 100 * max(worst, 1e-7)


def test_count_loss_items_sums_micro_batches(processor, data_dir):
    dataset = NextChatJsonlDataset(str(data_dir / "data.jsonl"), processor)
    collate = NextChatDataCollator.from_processor(processor)
    model = tiny_model(processor)
    batches = [collate([dataset[i], dataset[i + 1]]) for i in (0, 2)]
    total = count_loss_items(model, batches)
    whole = count_loss_items(model, [collate([dataset[i] for i in range(4)])])
    assert total == whole and total["boxes"] > 0 and total["masks"] > 0 and total["tokens"] > 0


# ------------------------------------------------------------------------------------------------------------------
# stage presets, LoRA, gradient checkpointing
# ------------------------------------------------------------------------------------------------------------------


def test_stage3_preset_trains_exactly_seg_prompt_mlp_and_mask_decoder(processor, data_dir):
    model = tiny_model(processor)
    options = apply_stage_preset(model, "stage3")
    expected = sorted(n for n, _ in model.named_parameters()
                      if n.startswith("seg_prompt_mlp.") or n.startswith("sam.mask_decoder."))
    assert sorted(trainable_parameter_names(model)) == expected and expected
    config = model.loss_weights  # training arguments, on the model (not the config)
    for name in ("lm_loss_weight", "box_l1_loss_weight", "box_giou_loss_weight", "cycle_embed_loss_weight",
                 "cycle_box_loss_weight"):
        assert getattr(config, name) == 0.0
    assert options == {"use_masks": True, "return_sam_pixel_values": True}
    # the loss is the mask loss alone, and only the trainable parameters receive gradients
    dataset = NextChatJsonlDataset(str(data_dir / "data.jsonl"), processor)
    batch = NextChatDataCollator.from_processor(processor)([dataset[i] for i in range(4)])
    out = model(**batch)
    mask_loss = (config.mask_ce_loss_weight * out.mask_ce_loss + config.mask_dice_loss_weight * out.mask_dice_loss
                 + config.mask_iou_loss_weight * out.mask_iou_loss)
    torch.testing.assert_close(out.loss, mask_loss)
    out.loss.backward()
    with_grad = sorted(n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0)
    assert set(with_grad) <= set(expected) and any(n.startswith("seg_prompt_mlp.") for n in with_grad)


def test_stage1_preset_freezes_clip_and_sam(processor):
    model = tiny_model(processor)
    options = apply_stage_preset(model, 1)
    trainable = set(trainable_parameter_names(model))
    prefixes = ("model.language_model.", "lm_head.", "model.mm_projector.", "model.loc_encoder.", "loc_decoder.")
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert options["return_sam_pixel_values"] is False
    assert model.loss_weights.box_l1_loss_weight == 2.0 and model.loss_weights.box_giou_loss_weight == 0.2
    # presets never cast: dtypes untouched
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    apply_stage_preset(model, "full")
    assert len(trainable_parameter_names(model)) == len(list(model.parameters()))


def test_lora_touches_only_the_language_model_and_round_trips(processor, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import TrainingArguments

    model = tiny_model(processor)
    peft_model = apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    lora_modules = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert lora_modules and all(re.fullmatch(LM_REGEX, n.replace("base_model.model.", "")) for n in lora_modules)
    assert not any("vision_tower" in n for n, _ in peft_model.named_modules() if "lora" in n)
    trainable = trainable_parameter_names(peft_model)
    assert trainable and all(("lora_" in n) or ("modules_to_save" in n) for n in trainable)
    heads = {h for h in ("mm_projector", "loc_encoder", "loc_decoder", "seg_prompt_mlp") if any(h in n for n in trainable)}
    assert heads == {"mm_projector", "loc_encoder", "loc_decoder", "seg_prompt_mlp"}
    assert not any("vision_tower" in n or "sam." in n for n in trainable)

    dataset = NextChatJsonlDataset(str(data_dir / "data.jsonl"), processor)
    args = TrainingArguments(
        output_dir=str(tmp_path / "lora"), per_device_train_batch_size=4, max_steps=3, learning_rate=5e-2,
        save_strategy="no", report_to="none", remove_unused_columns=False, disable_tqdm=True, use_cpu=True,
        activation_checkpointing=True,
    )
    frozen_before = peft_model.base_model.model.model.vision_tower.embeddings.patch_embedding.weight.detach().clone()
    NextChatTrainer(model=peft_model, args=args, train_dataset=dataset,
                    data_collator=NextChatDataCollator.from_processor(processor)).train()
    assert torch.equal(frozen_before, peft_model.base_model.model.model.vision_tower.embeddings.patch_embedding.weight)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    saved = os.listdir(tmp_path / "adapter")
    assert "adapter_model.safetensors" in saved

    peft_model.eval()
    reloaded = PeftModel.from_pretrained(tiny_model(processor), str(tmp_path / "adapter")).eval()
    record = dataset.record(0)
    from PIL import Image

    prompt = processor.apply_chat_template([{"role": "user", "content": "<image> Where is the red circle?"}],
                                           add_generation_prompt=True)
    inputs = processor(images=Image.open(record["image"]), text=prompt)
    inputs.pop("image_sizes")
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    a = peft_model.generate(**inputs, **kwargs)
    b = reloaded.generate(**inputs, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.pred_boxes, b.pred_boxes):
        torch.testing.assert_close(x, y)


def test_gradient_checkpointing_gives_the_same_gradients(processor, data_dir):
    dataset = NextChatJsonlDataset(str(data_dir / "data.jsonl"), processor)
    batch = NextChatDataCollator.from_processor(processor)([dataset[i] for i in range(3)])
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(processor).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_sincos_vision_positions():
    table = sincos_2d(4, 8)
    assert table.shape == (16, 8)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    assert len({tuple(row.tolist()) for row in table}) == 16  # every position distinct
    processor = build_shapes_processor(image_size=IMAGE, patch_size=8, sam_image_size=None)
    spec = {k: v for k, v in TINY_SPEC.items() if k != "sam_config"}
    model = NextChatForConditionalGeneration(scratch_config(processor, spec))
    init_vision_sincos_positions(model)
    weight = model.model.vision_tower.embeddings.position_embedding.weight
    assert weight.requires_grad
    torch.testing.assert_close(weight[1:], sincos_2d(IMAGE // 8, weight.shape[1]))
    # a low temperature on a small grid: frequencies 1 and 1/4 for dim 8, row-major (y, x) = (1, 2) -> index 6
    low = sincos_2d(4, 8, temperature=16.0)
    expected = [math.sin(2), math.sin(0.5), math.cos(2), math.cos(0.5), math.sin(1), math.sin(0.25), math.cos(1),
                math.cos(0.25)]
    torch.testing.assert_close(low[6], torch.tensor(expected))
    init_vision_sincos_positions(model, scale=0.5, temperature=16.0)
    torch.testing.assert_close(weight[1:], 0.5 * sincos_2d(IMAGE // 8, weight.shape[1], temperature=16.0))
    torch.testing.assert_close(weight[0], torch.zeros_like(weight[0]))  # the class position


# ------------------------------------------------------------------------------------------------------------------
# the entry point: 20 steps, loss falls, checkpoint loads with trust_remote_code
# ------------------------------------------------------------------------------------------------------------------


def test_train_entry_point_loss_falls_and_checkpoint_loads_remotely(tmp_path):
    config = {
        "model": {"processor": {"shapes": {"image_size": IMAGE, "patch_size": 8, "sam_image_size": IMAGE}},
                  "scratch": TINY_SPEC, "sincos_vision_positions": True, "seed": 0},
        "stage": "full",
        "data": {"synthetic": {"out_dir": "data", "seed_start": 0, "num": 32, **SCENE}},
        "training_args": {"output_dir": "out", "per_device_train_batch_size": 8, "max_steps": 20,
                          "learning_rate": 5e-3, "warmup_steps": 2, "logging_steps": 1, "save_strategy": "steps",
                          "save_steps": 20, "disable_tqdm": True, "bf16": "auto", "use_cpu": True},
        "output_model_dir": "final",
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    from nextchat.training.train import main

    assert main([str(path), "--set", "training_args.seed=1"]) == 0
    history = json.load(open(tmp_path / "out" / "checkpoint-20" / "trainer_state.json"))["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 20
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4])
    assert all(k in history[0] for k in ("lm_loss", "box_l1_loss", "mask_dice_loss"))

    # the Trainer checkpoint loads with trust_remote_code where `nextchat` cannot be imported
    script = (
        "import sys; sys.modules['nextchat'] = None\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoProcessor\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out' / 'checkpoint-20')!r}, trust_remote_code=True)\n"
        f"p = AutoProcessor.from_pretrained({str(tmp_path / 'final')!r}, trust_remote_code=True)\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        "print(type(m).__name__, type(p).__name__, sum(x.numel() for x in m.parameters()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                            cwd=str(tmp_path), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NextChatForConditionalGeneration NextChatProcessor" in result.stdout
    final = NextChatForConditionalGeneration.from_pretrained(str(tmp_path / "final"))
    checkpoint = NextChatForConditionalGeneration.from_pretrained(str(tmp_path / "out" / "checkpoint-20"))
    for (n, a), (_, b) in zip(final.state_dict().items(), checkpoint.state_dict().items()):
        assert torch.equal(a, b), n


def attention_term_config(supervision, tasks=None):
    """A 30-step stage-2 run of a tiny scratch model on 16 synthetic scenes where only the attention terms count."""
    zero = {name: 0.0 for name in ("lm_loss_weight", "box_l1_loss_weight", "box_giou_loss_weight",
                                   "cycle_embed_loss_weight", "cycle_box_loss_weight")}
    synthetic = {"out_dir": "data", "seed_start": 0, "num": 16, **({"tasks": tasks} if tasks else {}), **SCENE}
    return {
        "model": {"processor": {"shapes": {"image_size": IMAGE, "patch_size": 8, "sam_image_size": None}},
                  "scratch": {**TINY_SPEC, "sam_config": None}, "seed": 0},
        "stage": "stage2",
        "loss_weights": zero,
        "attention_supervision": supervision,
        "data": {"synthetic": synthetic},
        "training_args": {"output_dir": "out", "per_device_train_batch_size": 16, "max_steps": 30,
                          "learning_rate": 1e-2, "warmup_steps": 0, "logging_steps": 1, "save_strategy": "no",
                          "disable_tqdm": True, "use_cpu": True},
    }


def test_grounding_attention_term_trains_through_the_entry_point(tmp_path):
    """With the term on, the entry point switches the LM to eager attention, logs the term, and training on it
    alone moves each trigger's attention onto its target (the term falls)."""
    from nextchat.training.train import run

    config = attention_term_config({"grounding_weight": 1.0, "layers": [-1]})
    for bad, message in (({"training_config": {"box_decoder_activation": None}}, "training_config"),
                         ({"training_config": {"sam_box_prompt": "ground-truth"}}, "sam_box_prompt"),
                         ({"training_config": {"logits_in_training": "some"}}, "logits_in_training"),
                         ({"loss_weights": {"grounding_attention_loss_weight": 1.0}}, "attention_supervision"),
                         ({"attention_supervision": {"grounding_weight": 1.0, "layers": [5]}}, "layers")):
        with pytest.raises(ValueError, match=message):
            run({**config, **bad}, root=str(tmp_path))
    options = {"sam_box_prompt": "target", "logits_in_training": "targets"}
    trainer, model, _ = run({**config, "training_config": options}, root=str(tmp_path))
    for name, value in options.items():  # training options: set on the model, never in its config
        assert getattr(model, name) == value and not hasattr(model.config, name)
    assert model.attention_supervision.layers == [-1]
    assert model.model.language_model.config._attn_implementation == "eager"
    terms = [h["grounding_attention_loss"] for h in trainer.state.log_history if "grounding_attention_loss" in h]
    assert len(terms) == 30
    assert np.mean(terms[-3:]) < 0.7 * np.mean(terms[:3])


def test_region_attention_term_trains_through_the_entry_point(tmp_path):
    """The region term is logged, on the heads the config names, and training on it alone makes the answers look at
    the given box (the term falls)."""
    from nextchat.training.train import run

    config = attention_term_config({"region_weight": 1.0, "layers": [-1], "region_heads": [0, 1]}, tasks=["reg"])
    trainer, model, _ = run(config, root=str(tmp_path))
    assert model.model.language_model.config._attn_implementation == "eager"
    assert model.attention_supervision.region_heads == [0, 1]
    terms = [h["region_attention_loss"] for h in trainer.state.log_history if "region_attention_loss" in h]
    assert len(terms) == 30
    assert np.mean(terms[-3:]) < 0.7 * np.mean(terms[:3])


def test_synthetic_sections_are_read_in_order_with_sequential_sampling(tmp_path):
    """A curriculum: `data.synthetic` as a list of sections -> their JSONL files in that order; with
    `train_sampling_strategy="sequential"` the first batches are the first section's samples."""
    from nextchat.training.train import run

    config = {
        "model": {"processor": {"shapes": {"image_size": IMAGE, "patch_size": 8, "sam_image_size": None}},
                  "scratch": {k: v for k, v in TINY_SPEC.items() if k != "sam_config"}, "seed": 0},
        "data": {"synthetic": [
            {**SCENE, "out_dir": "warm", "seed_start": 100, "num": 8, "min_objects": 1, "max_objects": 1,
             "tasks": ["rec"], "max_turns": 1},
            {"out_dir": "main", "seed_start": 0, "num": 8, **SCENE}]},
        "training_args": {"output_dir": "out", "per_device_train_batch_size": 4, "max_steps": 2,
                          "train_sampling_strategy": "sequential", "save_strategy": "no", "report_to": "none",
                          "disable_tqdm": True, "use_cpu": True, "logging_steps": 1},
    }
    trainer, _, _ = run(config, root=str(tmp_path))
    dataset = trainer.train_dataset
    assert [dataset.record(i)["seed"] for i in range(len(dataset))] == list(range(100, 108)) + list(range(8))
    assert all(len(dataset.record(i)["objects"]) == 1 for i in range(8))
    first_batch = next(iter(trainer.get_train_dataloader()))
    expected = NextChatDataCollator.from_processor(dataset.processor)([dataset[i] for i in range(4)])
    assert torch.equal(first_batch["input_ids"], expected["input_ids"])
    # a second run finds the sections written and does not rewrite them
    stamp = os.path.getmtime(tmp_path / "warm" / "data.jsonl")
    run(config, root=str(tmp_path))
    assert os.path.getmtime(tmp_path / "warm" / "data.jsonl") == stamp


def _full_stage_config(num: int, max_steps: int) -> dict:
    """A `run()` config training everything of the tiny model on `num` synthetic samples for `max_steps` steps of 4,
    shuffled (seed 3), the image work in one dataloader worker."""
    return {
        "model": {"processor": {"shapes": {"image_size": IMAGE, "patch_size": 8, "sam_image_size": IMAGE}},
                  "scratch": TINY_SPEC, "seed": 0},
        "stage": "full",
        "data": {"synthetic": {"out_dir": "data", "seed_start": 0, "num": num, **SCENE}},
        "training_args": {"per_device_train_batch_size": 4, "max_steps": max_steps, "learning_rate": 5e-3,
                          "lr_scheduler_type": "cosine", "warmup_steps": 1, "logging_steps": 1,
                          "save_strategy": "no", "dataloader_num_workers": 1, "seed": 3, "disable_tqdm": True,
                          "use_cpu": True, "report_to": "none"},
    }


def test_a_step_budget_run_is_the_same_run_every_time(tmp_path):
    """The shapes recipe runs for a fixed number of steps (no `time_budget_s`), so that its result does not depend on
    the machine's speed: two runs of one config, with a shuffling sampler and the image work in a dataloader worker,
    end with bit-identical weights and logged losses."""
    from nextchat.training.train import run

    config = _full_stage_config(num=16, max_steps=4)
    results = []
    for name in ("first", "second"):
        trainer, model, _ = run({**config, "training_args": {**config["training_args"], "output_dir": name}},
                                root=str(tmp_path))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        results.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (losses_a, state_a), (losses_b, state_b) = results
    assert len(losses_a) == 4 and losses_a == losses_b
    assert losses_a[0] != losses_a[-1]
    for name, value in state_a.items():
        assert torch.equal(value, state_b[name]), name


def test_scratch_config_takes_ids_from_processor(processor):
    config = scratch_config(processor, TINY_SPEC)
    assert config.text_config.vocab_size == len(processor.tokenizer)
    for name, value in processor.special_token_ids.items():
        assert getattr(config, name) == value
    assert config.image_seq_length == processor.image_seq_length == 16
    with pytest.raises(ValueError, match="image tokens"):
        scratch_config(processor, {**TINY_SPEC, "vision_config": {**TINY_SPEC["vision_config"], "patch_size": 16}})


def test_encode_record_system_prompt_and_truncation(processor, data_dir):
    record = json.loads(open(data_dir / "data.jsonl").readline())
    record["image"] = str(data_dir / record["image"])
    plain = encode_record(record, processor)
    custom = encode_record(record, processor, system_prompt="Be brief.")
    tokenizer = processor.tokenizer
    # the shapes processor's template has an empty default system prompt; an explicit one is put first
    assert tokenizer.decode(plain["input_ids"][:4], skip_special_tokens=True).strip().startswith("USER:")
    assert tokenizer.decode(custom["input_ids"][:12], skip_special_tokens=True).strip().startswith("Be brief. USER:")
    assert custom["input_ids"].shape[0] > plain["input_ids"].shape[0]
    short = encode_record(record, processor, max_length=plain["input_ids"].shape[0] - 3)
    assert short["input_ids"].shape[0] <= plain["input_ids"].shape[0] - 3


def test_sam_preset_trains_seg_prompt_mlp_and_all_of_sam(processor):
    model = tiny_model(processor)
    apply_stage_preset(model, "sam")
    expected = sorted(n for n, _ in model.named_parameters() if n.startswith(("seg_prompt_mlp.", "sam.")))
    assert sorted(trainable_parameter_names(model)) == expected
    assert any(n.startswith("sam.image_encoder.") for n in expected)
    assert model.loss_weights.lm_loss_weight == 0.0 and model.loss_weights.box_l1_loss_weight == 0.0


# ------------------------------------------------------------------------------------------------------------------
# evaluation of the synthetic task
# ------------------------------------------------------------------------------------------------------------------


def test_synthetic_eval_scorer_on_perfect_and_wrong_answers():
    from nextchat.training.synthetic_eval import build_queries, score

    queries = build_queries(range(1_000_000, 1_000_006))
    assert [q["task"] for q in queries[:4]] == ["rec", "res", "reg", "gc"]
    perfect, wrong = [], []
    for q in queries:
        objects = q["objects"]
        if q["task"] in ("rec", "res"):
            o = objects[q["object"]]
            perfect.append({"text": f"The {o['color']} {o['shape']}.",
                            "entities": [{"text": "The x", "box": o["box"], "mask": o["mask"]}]})
            wrong.append({"text": "", "entities": []})
        elif q["task"] == "reg":
            o = objects[q["object"]]
            perfect.append({"text": f"A {o['color']} {o['shape']}.", "entities": []})
            wrong.append({"text": "A pink star.", "entities": []})
        else:
            perfect.append({"text": "...", "entities": [{"text": f"a {o['color']} {o['shape']}", "box": o["box"]}
                                                        for o in objects]})
            shifted = [{"text": "a thing", "box": [o["box"][0] + 30, o["box"][1], o["box"][2] + 30, o["box"][3]]}
                       for o in objects]
            wrong.append({"text": "...", "entities": shifted})
    good, bad = score(queries, perfect), score(queries, wrong)
    for key in ("rec_acc@0.5", "res_mask_miou", "reg_exact_match", "gc_box_recall@0.5", "gc_named_recall@0.5",
                "res_box_acc@0.5", "res_mask_miou_where_box_hit"):
        assert good[key] == 1.0, key
    for key in ("rec_acc@0.5", "res_mask_miou", "reg_exact_match", "gc_box_recall@0.5", "gc_named_recall@0.5",
                "res_box_acc@0.5"):
        assert bad[key] < 0.5, key


def test_synthetic_eval_separates_sam_errors_from_box_errors():
    """res: a right box with an empty mask and a wrong box with the right mask, scored by hand."""
    from nextchat.training.synthetic_eval import build_queries, score

    res = [q for q in build_queries(range(1_000_000, 1_000_004)) if q["task"] == "res"][:2]
    results = []
    o = res[0]["objects"][res[0]["object"]]
    results.append({"text": "", "entities": [{"text": "x", "box": o["box"], "mask": np.zeros_like(o["mask"])}]})
    o = res[1]["objects"][res[1]["object"]]
    far = [o["box"][0] + 64, o["box"][1] + 64, o["box"][2] + 64, o["box"][3] + 64]
    results.append({"text": "", "entities": [{"text": "x", "box": far, "mask": o["mask"]}]})
    metrics = score(res, results)
    assert metrics["res_box_acc@0.5"] == 0.5
    assert metrics["res_mask_miou"] == 0.5  # (0 + 1) / 2
    assert metrics["res_mask_miou_where_box_hit"] == 0.0  # only the first reply hit, and its mask is empty


def test_synthetic_eval_runs_the_real_inference_path(processor):
    from nextchat.training.synthetic_eval import evaluate

    model = tiny_model(processor).eval()
    # a 32-px model evaluated on 32-px scenes through generate + post_process_generation
    import nextchat.training.synthetic_eval as se

    original = se.build_queries
    se.build_queries = lambda seeds: original(seeds, scene_kwargs=SCENE)
    try:
        metrics = evaluate(model, processor, num=2, batch_size=4)
    finally:
        se.build_queries = original
    assert metrics["num_queries"] == {"rec": 2, "res": 2, "reg": 2, "gc": 2}
    for key in ("rec_acc@0.5", "res_mask_miou", "reg_exact_match", "gc_box_recall@0.5"):
        assert 0.0 <= metrics[key] <= 1.0


def test_bf16_auto_reads_the_cpus_bf16_flags(tmp_path):
    """`"bf16": "auto"` without a GPU: bf16 only where the CPU flags name bf16 matrix instructions (x86 `avx512_bf16`
    or `amx_bf16`, Arm `bf16`); an unreadable file or other flags give fp32."""
    from nextchat.training.train import cpu_has_native_bf16

    cases = {
        "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 sse\n": True,
        "processor\t: 0\nflags\t\t: fpu avx2 amx_tile amx_bf16\n": True,
        "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n": True,
        "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n": False,  # avx512 alone emulates bf16
        "processor\t: 0\nFeatures\t: fp asimd sve\n": False,
    }
    for text, expected in cases.items():
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        assert cpu_has_native_bf16(str(path)) is expected, text
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


# ------------------------------------------------------------------------------------------------------------------
# length-grouped reading order
# ------------------------------------------------------------------------------------------------------------------


def test_length_grouped_order_by_hand():
    """Windows of 2 groups of 2 in file order: [0..3] sorted by length is 1, 3, 2, 0 -> groups {1, 3} and {2, 0} in
    some order; the last window [4..6] sorted is 4, 5, 6, its partial group {6} kept last."""
    order = length_grouped_order([5, 1, 4, 2, 3, 6, 7], group_size=2, window=2, seed=0)
    assert order[:4] in ([1, 3, 2, 0], [2, 0, 1, 3])
    assert order[4:] == [4, 5, 6]
    assert {tuple(length_grouped_order([5, 1, 4, 2], 2, 2, seed=s)[:2]) for s in range(20)} == {(1, 3), (2, 0)}
    for kwargs, name in (({"group_size": 0, "window": 2}, "group_size"), ({"group_size": 2, "window": 0}, "window")):
        with pytest.raises(ValueError, match=name):
            length_grouped_order([1, 2], **kwargs)


def test_length_grouped_order_keeps_windows_and_cuts_sorted_runs():
    rng = np.random.default_rng(0)
    lengths = rng.integers(60, 140, size=1000).tolist()
    group, window = 16, 5
    order = length_grouped_order(lengths, group, window, seed=3)
    assert sorted(order) == list(range(1000))
    span = group * window
    for start in range(0, 1000, span):
        chunk = order[start : start + span]
        assert sorted(chunk) == list(range(start, min(start + span, 1000)))  # the file order, at window scale
        groups = [chunk[i : i + group] for i in range(0, len(chunk), group)]
        # each group is a run of the window's samples sorted by length
        runs = sorted((sorted(lengths[i] for i in g) for g in groups), key=lambda run: run[0])
        assert [v for run in runs for v in run] == sorted(lengths[i] for i in chunk)

    def padded(indices):
        return sum(group * max(lengths[i] for i in indices[k : k + group]) for k in range(0, len(indices), group))

    assert padded(order) - sum(lengths) < 0.3 * (padded(list(range(1000))) - sum(lengths))


def test_length_grouping_window_through_the_entry_point(tmp_path):
    """`data.length_grouping_window`: the estimated lengths are the encoded ones up to a constant and a few tokens, the
    trainer reads every sample once in the grouped order, with less padding than in file order."""
    from nextchat.training.train import run

    config = {
        "model": {"processor": {"shapes": {"image_size": IMAGE, "patch_size": 8, "sam_image_size": None}},
                  "scratch": {k: v for k, v in TINY_SPEC.items() if k != "sam_config"}, "seed": 0},
        "data": {"synthetic": {"out_dir": "data", "seed_start": 0, "num": 24, "max_turns": 2, **SCENE},
                 "length_grouping_window": 3},
        "training_args": {"output_dir": "out", "per_device_train_batch_size": 4, "max_steps": 1,
                          "train_sampling_strategy": "sequential", "save_strategy": "no", "report_to": "none",
                          "disable_tqdm": True, "use_cpu": True, "logging_steps": 1},
    }
    trainer, _, _ = run(config, root=str(tmp_path))
    grouped = trainer.train_dataset
    files = grouped.dataset
    real = [int(files[i]["input_ids"].shape[0]) for i in range(len(files))]
    estimate = files.text_lengths()
    offsets = [r - e for r, e in zip(real, estimate)]  # the template's constant tags aside, a few tokens off
    assert max(offsets) - min(offsets) <= 6 and max(real) - min(real) > 30
    assert sorted(grouped.indices) == list(range(24)) and list(grouped.indices) != list(range(24))
    assert grouped.indices == length_grouped_order(estimate, 4, 3, seed=trainer.args.seed)
    batches = list(trainer.get_train_dataloader())
    collate = NextChatDataCollator.from_processor(files.processor)
    for k, batch in enumerate(batches):
        expected = collate([files[i] for i in grouped.indices[4 * k : 4 * k + 4]])
        assert torch.equal(batch["input_ids"], expected["input_ids"])
    width = sum(b["input_ids"].numel() for b in batches)
    file_order = sum(4 * max(real[4 * k : 4 * k + 4]) for k in range(6))
    assert width < file_order
    for bad, message in (({"length_grouping_window": 0}, "length_grouping_window"),
                         ({"length_grouping_window": 2.5}, "length_grouping_window")):
        with pytest.raises(ValueError, match=message):
            run({**config, "data": {**config["data"], **bad}}, root=str(tmp_path))
    with pytest.raises(ValueError, match="train_sampling_strategy"):
        run({**config, "training_args": {**config["training_args"], "train_sampling_strategy": "random"}},
            root=str(tmp_path))


def test_cached_dataset_serves_later_reads_from_memory(processor, tmp_path):
    """`CachedDataset`: the first read prepares a sample, later reads return the same tensors without the image
    file (deleted here, so that a read that touched it would fail)."""
    import shutil

    write_dataset(str(tmp_path), range(6), **SCENE)
    plain = NextChatJsonlDataset(str(tmp_path / "data.jsonl"), processor)
    expected = [plain[i] for i in range(6)]
    cached = CachedDataset(NextChatJsonlDataset(str(tmp_path / "data.jsonl"), processor))
    assert len(cached) == 6
    first = [cached[i] for i in range(6)]
    shutil.rmtree(tmp_path / "images")
    with pytest.raises(FileNotFoundError):
        plain[0]
    for i in range(6):
        again = cached[i]
        assert again.keys() == expected[i].keys()
        for key, value in expected[i].items():
            assert torch.equal(again[key], value), (i, key)
            assert torch.equal(first[i][key], value), (i, key)


def test_cache_samples_gives_the_same_weights_over_several_epochs(tmp_path):
    """`data.cache_samples`: three epochs read from memory after the first, in the main process or in a persistent
    dataloader worker, end with bit-identical losses and weights to the run that prepares every sample each time."""
    from nextchat.training.train import run

    config = _full_stage_config(num=8, max_steps=6)
    variants = {
        "plain": ({}, {}),
        "worker": ({"cache_samples": True}, {"dataloader_persistent_workers": True}),
        "main": ({"cache_samples": True}, {"dataloader_num_workers": 0}),
    }
    results = {}
    for name, (data, args) in variants.items():
        trainer, model, _ = run({**config, "data": {**config["data"], **data},
                                 "training_args": {**config["training_args"], **args, "output_dir": name}},
                                root=str(tmp_path))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        results[name] = (losses, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if name == "main":  # the main process read every sample, and kept each one
            assert isinstance(trainer.train_dataset, CachedDataset) and len(trainer.train_dataset._kept) == 8
    losses, state = results["plain"]
    assert len(losses) == 6 and losses[0] != losses[-1]
    for name in ("worker", "main"):
        assert results[name][0] == losses, name
        for key, value in state.items():
            assert torch.equal(results[name][1][key], value), (name, key)
    with pytest.raises(ValueError, match="dataloader_persistent_workers"):
        run({**config, "data": {**config["data"], "cache_samples": True},
             "training_args": {**config["training_args"], "output_dir": "bad"}}, root=str(tmp_path))
    with pytest.raises(ValueError, match="cache_samples"):
        run({**config, "data": {**config["data"], "cache_samples": "yes"},
             "training_args": {**config["training_args"], "output_dir": "bad"}}, root=str(tmp_path))


def test_cache_vision_features_trains_as_the_tower_does(tmp_path):
    """`data.cache_vision_features`: with CLIP frozen (stage "stage2"), three epochs over 8 samples run the tower
    on each image once and end with the losses and weights of the run that runs it at every step; a stage that
    trains the tower is refused."""
    from nextchat.training.train import run

    config = {**_full_stage_config(num=8, max_steps=6), "stage": "stage2"}
    results = {}
    for name, cache in (("plain", False), ("cached", True)):
        trainer, model, _ = run({**config, "data": {**config["data"], "cache_vision_features": cache},
                                 "training_args": {**config["training_args"], "output_dir": name}},
                                root=str(tmp_path))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        results[name] = (losses, {k: v.detach().clone() for k, v in model.state_dict().items()})
    assert "forward" not in vars(model.model.vision_tower)  # detached after training
    cache = trainer.vision_feature_cache
    assert cache.computed == 8 and len(cache.store) == 8  # 6 steps of 4: each of the 8 images once
    (plain_losses, plain_state), (cached_losses, cached_state) = results["plain"], results["cached"]
    assert len(plain_losses) == 6 and plain_losses[0] != plain_losses[-1]
    assert cached_losses == pytest.approx(plain_losses, rel=1e-5)
    for key, value in plain_state.items():
        torch.testing.assert_close(cached_state[key], value, atol=1e-5, rtol=1e-4, msg=key)
    with pytest.raises(ValueError, match="frozen vision tower"):
        run({**config, "stage": "full", "data": {**config["data"], "cache_vision_features": True},
             "training_args": {**config["training_args"], "output_dir": "bad"}}, root=str(tmp_path))
    with pytest.raises(ValueError, match="cache_vision_features"):
        run({**config, "data": {**config["data"], "cache_vision_features": "yes"},
             "training_args": {**config["training_args"], "output_dir": "bad"}}, root=str(tmp_path))
