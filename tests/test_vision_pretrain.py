"""Stage 0 of the shapes recipe: per-patch pretraining of a from-scratch vision tower, and loading it into a model."""

import copy
import json
import re

import numpy as np
import pytest
import torch

from nextchat.training.synthetic import COLORS, SHAPES, build_shapes_processor, render_scene, shape_mask
from nextchat.training.train import build_model
from nextchat.training.vision_pretrain import (
    PatchClassifier,
    ShapesPatchDataset,
    build_vision_tower,
    freeze_unreached_parameters,
    main,
    patch_boxes,
    patch_labels,
    resize_mask_area,
)


IMAGE = 32
SPEC = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 512},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "patch_size": 8},
    "sam_config": None,
}
BACKGROUND = len(COLORS) * len(SHAPES)


def fresh_tower(image_size):
    """A from-scratch vision tower of SPEC for `image_size`-px shapes scenes (8-px patches)."""
    config = {"model": {"processor": {"shapes": {"image_size": image_size, "patch_size": 8, "sam_image_size": None}},
                        "scratch": SPEC}}
    return build_vision_tower(config)[0]


def klass(color, shape):
    return list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)


def test_patch_labels_by_hand():
    # 16x16 image, 8-px patches: [0 1; 2 3]
    red_square = {"color": "red", "shape": "square", "mask": shape_mask("square", 8, 0, 0, 16, 16)}  # all of patch 0
    blue = np.zeros((16, 16), dtype=bool)
    blue[0:2, 8:13] = True  # 10 px in patch 1
    blue[8:9, 8:15] = True  # 7 px in patch 3: below min_pixels (8)
    green = np.zeros((16, 16), dtype=bool)
    green[2:6, 8:11] = True  # 12 px in patch 1: more than blue's 10
    green[8:16, 0:2] = True  # 16 px in patch 2
    objects = [red_square, {"color": "blue", "shape": "circle", "mask": blue},
               {"color": "green", "shape": "diamond", "mask": green}]
    labels = patch_labels(objects, 16, 16, 8, min_pixels=8)
    assert labels.tolist() == [klass("red", "square"), klass("green", "diamond"), klass("green", "diamond"),
                               BACKGROUND]
    assert patch_labels(objects, 16, 16, 8, min_pixels=13).tolist() == [
        klass("red", "square"), BACKGROUND, klass("green", "diamond"), BACKGROUND]


def test_patch_boxes_by_hand():
    # 16x16 image, 8-px patches [0 1; 2 3]; an 8x8 square owns patch 0, a 3x4 bar owns nothing (12 px < 13)
    square = {"color": "red", "shape": "square", "box": [0, 0, 8, 8], "mask": shape_mask("square", 8, 0, 0, 16, 16)}
    bar_mask = np.zeros((16, 16), dtype=bool)
    bar_mask[9:12, 9:13] = True
    bar = {"color": "blue", "shape": "square", "box": [9, 9, 13, 12], "mask": bar_mask}
    boxes = patch_boxes([square, bar], 16, 16, 8, min_pixels=8)
    assert boxes.dtype == np.float32 and boxes.shape == (4, 4)
    assert boxes.tolist() == [[0, 0, 0.5, 0.5], [0, 0, 0, 0], [0, 0, 0, 0], [9 / 16, 9 / 16, 13 / 16, 12 / 16]]
    assert patch_boxes([square, bar], 16, 16, 8, min_pixels=13)[3].tolist() == [0, 0, 0, 0]


def test_dataset_is_deterministic_and_matches_the_scene():
    processor = build_shapes_processor(image_size=64, patch_size=8, sam_image_size=None)
    dataset = ShapesPatchDataset([5, 6], processor.image_processor, patch_size=8)
    first, again = dataset[0], dataset[0]
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and torch.equal(first["labels"], again["labels"])
    _, objects = render_scene(5)
    assert first["pixel_values"].shape == (3, 64, 64) and first["labels"].shape == (64,)
    # every object's centre patch carries that object's class
    for obj in objects:
        x1, y1, x2, y2 = obj["box"]
        row, col = int((y1 + y2) / 2) // 8, int((x1 + x2) / 2) // 8
        if obj["mask"][row * 8:(row + 1) * 8, col * 8:(col + 1) * 8].sum() >= 8:
            assert first["labels"][row * 8 + col] == klass(obj["color"], obj["shape"])


def test_resize_mask_area_by_hand():
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True  # the top-left quarter
    # each output pixel of a 3 x 3 grid covers 4/3 input pixels a side: along an axis [1, 1, 0, 0] -> [1, 1/2, 0]
    assert np.allclose(resize_mask_area(mask, 3, 3), [[1, 0.5, 0], [0.5, 0.25, 0], [0, 0, 0]])
    assert np.allclose(resize_mask_area(mask, 2, 8), np.repeat([[1, 1, 0, 0], [0, 0, 0, 0]], 2, axis=1))
    assert np.array_equal(resize_mask_area(mask, 4, 4), mask)


def test_scenes_drawn_larger_than_the_input_label_the_input_patches():
    """`input_size` smaller than the drawn scene (64-px scenes, a 48-px model: a 6 x 6 grid of 8-px patches): the
    image is the processor's resize of the scene, and each patch's owner counts the object's area in that patch's
    square of the scene (10 2/3 scene pixels a side), here counted on a 3x finer copy of the masks."""
    processor = build_shapes_processor(image_size=48, patch_size=8, sam_image_size=None)
    dataset = ShapesPatchDataset(range(8), processor.image_processor, patch_size=8, input_size=(48, 48))
    checked = 0
    for index in range(8):
        sample = dataset[index]
        image, objects = render_scene(index)
        resized = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(sample["pixel_values"], resized)
        assert sample["pixel_values"].shape == (3, 48, 48) and sample["labels"].shape == (36,)
        for patch in range(36):
            row, col = divmod(patch, 6)
            # a 64-px scene at 3x is 192 px: input patch (row, col) is its 32 x 32 block; 16 fine pixels = 1 input px
            areas = [np.repeat(np.repeat(obj["mask"], 3, 0), 3, 1)[32 * row : 32 * row + 32, 32 * col : 32 * col + 32]
                     .sum() / 16 for obj in objects]
            best = int(np.argmax(areas))
            expected = klass(objects[best]["color"], objects[best]["shape"]) if areas[best] >= 8 else BACKGROUND
            assert sample["labels"][patch] == expected, (index, patch)
            if expected != BACKGROUND:
                assert np.allclose(sample["boxes"][patch].numpy(), np.asarray(objects[best]["box"]) / 64)
                checked += 1
    assert checked > 20


def test_classifier_loss_weights_background_patches():
    processor = build_shapes_processor(image_size=IMAGE, patch_size=8, sam_image_size=None)
    tower = fresh_tower(IMAGE)
    classifier = PatchClassifier(tower, BACKGROUND + 1, background_weight=0.25)
    pixel_values = torch.randn(2, 3, IMAGE, IMAGE)
    labels = torch.full((2, 16), BACKGROUND)
    labels[0, 3], labels[1, 7] = 2, 9
    out = classifier(pixel_values, labels)
    ce = torch.nn.functional.cross_entropy(out["logits"].flatten(0, 1), labels.flatten(), reduction="none")
    weights = torch.full((32,), 0.25)
    weights[3], weights[16 + 7] = 1.0, 1.0
    assert torch.allclose(out["loss"], (ce * weights).sum() / weights.sum())
    assert processor.image_seq_length == 16


def test_box_loss_is_the_mean_l1_over_object_patches():
    tower = fresh_tower(IMAGE)
    classifier = PatchClassifier(tower, BACKGROUND + 1, background_weight=0.25, box_loss_weight=2.0)
    pixel_values = torch.randn(2, 3, IMAGE, IMAGE)
    labels = torch.full((2, 16), BACKGROUND)
    labels[0, 3], labels[1, 7], labels[1, 8] = 2, 9, 9
    boxes = torch.zeros(2, 16, 4)
    boxes[0, 3] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    boxes[1, 7] = boxes[1, 8] = torch.tensor([0.5, 0.5, 0.9, 0.8])
    out = classifier(pixel_values, labels, boxes)
    pred = out["pred_boxes"].detach()
    l1 = [float((pred[b, p] - boxes[b, p]).abs().sum()) for b, p in ((0, 3), (1, 7), (1, 8))]
    assert out["box_loss"].item() == pytest.approx(sum(l1) / 3, rel=1e-5)
    without_boxes = PatchClassifier(tower, BACKGROUND + 1, background_weight=0.25)
    without_boxes.head.load_state_dict(classifier.head.state_dict())
    class_loss = without_boxes(pixel_values, labels)["loss"]
    assert out["loss"].item() == pytest.approx(class_loss.item() + 2.0 * sum(l1) / 3, rel=1e-5)


def test_freezing_the_unreached_parameters_leaves_training_unchanged():
    from transformers import default_data_collator

    torch.manual_seed(0)
    classifier = PatchClassifier(fresh_tower(IMAGE), BACKGROUND + 1, feature_layer=-2, box_loss_weight=1.0)
    reference = copy.deepcopy(classifier)
    processor = build_shapes_processor(image_size=IMAGE, patch_size=8, sam_image_size=None)
    dataset = ShapesPatchDataset(range(4), processor.image_processor, 8, height=IMAGE, width=IMAGE)
    batch = default_data_collator([dataset[i] for i in range(4)])
    rng = torch.random.get_rng_state()
    frozen = freeze_unreached_parameters(classifier, batch)
    assert torch.equal(rng, torch.random.get_rng_state())
    # by hand: SPEC's tower has 2 layers and the features are read after the first, so the second layer and the
    # final norm are never reached
    expected = {name for name, _ in classifier.named_parameters()
                if re.search(r"encoder\.layers\.1\.|post_layernorm", name)}
    assert expected and set(frozen) == expected
    assert all(p.requires_grad == (name not in expected) for name, p in classifier.named_parameters())
    assert all(p.grad is None for p in classifier.parameters())
    # three AdamW steps with and without the freezing: the same weights, every one of them
    for model in (classifier, reference):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            model(**batch)["loss"].backward()
            optimizer.step()
    for (name, a), (_, b) in zip(classifier.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(classifier.head.weight, PatchClassifier(fresh_tower(IMAGE), BACKGROUND + 1).head.weight)


def test_pretrained_tower_learns_and_loads_into_a_model(tmp_path):
    config = {
        "model": {"processor": {"shapes": {"image_size": IMAGE, "patch_size": 8, "sam_image_size": None}},
                  "scratch": SPEC, "sincos_vision_positions": {"scale": 1.0, "temperature": 20}, "seed": 0},
        "torch_num_threads": 1,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "tower"
    assert main([str(path), str(out), "--num", "64", "--eval-num", "16", "--max-steps", "60", "--batch-size", "16",
                 "--learning-rate", "3e-3", "--logging-steps", "10", "--box-loss-weight", "1"]) == 0
    metrics = json.load(open(out / "vision_pretrain_metrics.json"))
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert metrics["steps"] == 60 and losses[-1] < 0.8 * losses[0]
    assert 0.0 <= metrics["object_patch_accuracy"] <= 1.0
    assert 0.0 < metrics["object_patch_box_error_px"] < IMAGE

    # the same config with "vision_tower_init" builds a model whose tower holds exactly the saved weights
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    model = build_model({**config["model"], "vision_tower_init": str(out)},
                        build_shapes_processor(image_size=IMAGE, patch_size=8, sam_image_size=None))
    tower_state = model.model.vision_tower.state_dict()
    assert set(saved) == set(tower_state)
    for name, tensor in saved.items():
        assert torch.equal(tower_state[name], tensor), name
    # ... and, before pretraining, the stage-0 tower starts from the model's own sin-cos position table
    fresh_model = build_model(config["model"], build_shapes_processor(image_size=IMAGE, patch_size=8,
                                                                      sam_image_size=None))
    fresh_tower, _, _ = build_vision_tower(config)
    assert torch.equal(fresh_tower.embeddings.position_embedding.weight,
                       fresh_model.model.vision_tower.embeddings.position_embedding.weight)

    wider = json.loads(json.dumps(config["model"]))
    wider["scratch"]["vision_config"]["intermediate_size"] = 128
    with pytest.raises(ValueError, match="vision_tower_init.*intermediate_size"):
        build_model({**wider, "vision_tower_init": str(out)},
                    build_shapes_processor(image_size=IMAGE, patch_size=8, sam_image_size=None))


def test_object_patch_accuracy_equals_a_per_patch_loop():
    from nextchat.training.vision_pretrain import object_patch_accuracy

    processor = build_shapes_processor(image_size=64, patch_size=8, sam_image_size=None)
    tower = fresh_tower(64)
    classifier = PatchClassifier(tower, BACKGROUND + 1)
    with torch.no_grad():  # make some object patches right: bias the head towards the most common classes
        classifier.head.bias[klass("red", "square")] += 3.0
    dataset = ShapesPatchDataset(range(40), processor.image_processor, patch_size=8)
    hits = total = 0
    for i in range(len(dataset)):
        item = dataset[i]
        with torch.no_grad():
            logits = classifier(item["pixel_values"][None])["logits"][0]
        for p in range(logits.shape[0]):
            if item["labels"][p] != BACKGROUND:
                total += 1
                hits += int(logits[p].argmax() == item["labels"][p])
    assert total > 0 and 0 < hits < total
    assert object_patch_accuracy(classifier, dataset, batch_size=7) == pytest.approx(hits / total)


def test_object_patch_box_error_equals_a_per_patch_loop():
    from nextchat.training.vision_pretrain import object_patch_metrics

    processor = build_shapes_processor(image_size=64, patch_size=8, sam_image_size=None)
    tower = fresh_tower(64)
    classifier = PatchClassifier(tower, BACKGROUND + 1, box_loss_weight=1.0)
    dataset = ShapesPatchDataset(range(12), processor.image_processor, patch_size=8)
    errors = []
    for i in range(len(dataset)):
        item = dataset[i]
        with torch.no_grad():
            pred = classifier(item["pixel_values"][None])["pred_boxes"][0]
        for p in range(pred.shape[0]):
            if item["labels"][p] != BACKGROUND:
                errors += [abs(float(pred[p, c]) - float(item["boxes"][p, c])) for c in range(4)]
    assert object_patch_metrics(classifier, dataset, batch_size=5)["box_error"] == pytest.approx(np.mean(errors))


def test_cached_scenes_train_the_same_tower(tmp_path):
    """`--cache-scenes`: four epochs over 16 scenes, the later ones read from the dataloader worker's memory, save
    a tower bit-identical to the run that draws every scene again, under the same shuffled order."""
    from safetensors.torch import load_file

    config = {"model": {"processor": {"shapes": {"image_size": IMAGE, "patch_size": 8, "sam_image_size": None}},
                        "scratch": SPEC, "seed": 0}, "torch_num_threads": 1}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    towers = {}
    for name, extra in (("drawn", []), ("cached", ["--cache-scenes"])):
        out = tmp_path / name
        assert main([str(path), str(out), "--num", "16", "--eval-num", "4", "--max-steps", "8", "--batch-size", "8",
                     "--learning-rate", "3e-3", "--logging-steps", "1", *extra]) == 0
        towers[name] = load_file(str(out / "model.safetensors"))
        history = json.load(open(out / "vision_pretrain_metrics.json"))["log_history"]
        towers[name + " losses"] = [h["loss"] for h in history if "loss" in h]
    assert len(towers["drawn losses"]) == 8 and towers["drawn losses"] == towers["cached losses"]
    assert towers["drawn"].keys() == towers["cached"].keys()
    for key, value in towers["drawn"].items():
        assert torch.equal(towers["cached"][key], value), key


def test_bf16_flag_sets_the_stage0_training_precision(tmp_path):
    """`--bf16 no|yes|auto` of both stage-0 scripts: float32, bf16 autocast, or bf16 where the hardware has it."""
    import argparse

    from nextchat.training.train import bf16_available
    from nextchat.training.vision_pretrain import add_runtime_arguments, stage0_training_args

    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser)
    common = {"output_dir": str(tmp_path), "batch_size": 8, "learning_rate": 1e-3, "max_steps": 10,
              "logging_steps": 5}
    precision = {}
    for value in ("no", "yes", "auto"):
        args = argparse.Namespace(**common, **vars(parser.parse_args(["--bf16", value])))  # --threads: None
        precision[value] = stage0_training_args(args, warmup_steps=2).bf16
    assert precision == {"no": False, "yes": True, "auto": bf16_available()}
    assert parser.parse_args([]).bf16 == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--bf16", "true"])


def test_threads_flag_overrides_the_configs_torch_num_threads():
    import argparse

    from nextchat.training.train import set_num_threads
    from nextchat.training.vision_pretrain import add_runtime_arguments

    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser)
    before = torch.get_num_threads()
    try:
        set_num_threads({"torch_num_threads": 1}, parser.parse_args(["--threads", "2"]).threads)
        assert torch.get_num_threads() == 2
        set_num_threads({"torch_num_threads": 1}, parser.parse_args([]).threads)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(3)
        set_num_threads({}, parser.parse_args([]).threads)  # neither: torch's setting stays
        set_num_threads({"torch_num_threads": 0}, parser.parse_args([]).threads)  # 0: unset, as `train` reads it
        assert torch.get_num_threads() == 3
        with pytest.raises(ValueError, match="--threads"):
            set_num_threads({}, parser.parse_args(["--threads", "0"]).threads)
    finally:
        torch.set_num_threads(before)
