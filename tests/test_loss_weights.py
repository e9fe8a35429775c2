"""Loss weights are training arguments (issue 25): `NextChatLossWeights` on the model, set by the stage presets, never
inherited from a checkpoint's config; a warning when a trainable part gets no loss; LoRA that trains the
embeddings; the new-shape generator keeps every existing seed's output."""

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch

from nextchat import NextChatForConditionalGeneration, NextChatLossWeights
from nextchat.training.data import NextChatDataCollator, NextChatJsonlDataset
from nextchat.training.presets import (
    apply_lora,
    apply_stage_preset,
    check_loss_weights,
    stage_loss_weights,
    trainable_parameter_report,
)
from nextchat.training.synthetic import (
    EXTRA_SHAPES,
    build_shapes_processor,
    make_sample,
    mask_to_box,
    new_shape_kwargs,
    render_scene,
    shape_mask,
    write_dataset,
)
from nextchat.training.train import scratch_config
from nextchat.training.trainer import NextChatTrainer


from test_training import IMAGE, SCENE, TINY_SPEC  # the training tests' tiny model and scenes
ZERO_CONFIG_WEIGHTS = {name: 0.0 for name in ("lm_loss_weight", "box_l1_loss_weight", "box_giou_loss_weight",
                                              "cycle_embed_loss_weight", "cycle_box_loss_weight")}


@pytest.fixture(scope="module")
def processor():
    return build_shapes_processor(image_size=IMAGE, patch_size=8, sam_image_size=IMAGE)


@pytest.fixture(scope="module")
def batch(processor, tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_dataset(str(out), range(6), **SCENE)
    dataset = NextChatJsonlDataset(str(out / "data.jsonl"), processor)
    return NextChatDataCollator.from_processor(processor)([dataset[i] for i in range(6)])


def tiny_model(processor, **overrides):
    torch.manual_seed(0)
    model = NextChatForConditionalGeneration(scratch_config(processor, {**TINY_SPEC, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def weighted_sum(out, w: NextChatLossWeights):
    return (w.lm_loss_weight * out.lm_loss + w.box_l1_loss_weight * out.box_l1_loss
            + w.box_giou_loss_weight * out.box_giou_loss + w.cycle_embed_loss_weight * out.cycle_embed_loss
            + w.cycle_box_loss_weight * out.cycle_box_loss + w.mask_ce_loss_weight * out.mask_ce_loss
            + w.mask_dice_loss_weight * out.mask_dice_loss + w.mask_iou_loss_weight * out.mask_iou_loss)


def test_loss_is_the_hand_computed_weighted_sum_of_the_terms(processor, batch):
    model = tiny_model(processor)
    weights = NextChatLossWeights(lm_loss_weight=0.5, box_l1_loss_weight=3.0, box_giou_loss_weight=0.7,
                                  cycle_embed_loss_weight=0.3, cycle_box_loss_weight=1.5, mask_ce_loss_weight=4.0,
                                  mask_dice_loss_weight=2.0, mask_iou_loss_weight=0.25)
    model.loss_weights = weights
    out = model(**batch)
    terms = [out.lm_loss, out.box_l1_loss, out.box_giou_loss, out.cycle_embed_loss, out.cycle_box_loss,
             out.mask_ce_loss, out.mask_dice_loss, out.mask_iou_loss]
    assert all(t is not None and float(t.detach()) > 0 for t in terms)
    expected = sum(float(w) * float(t.detach()) for w, t in zip(
        (0.5, 3.0, 0.7, 0.3, 1.5, 4.0, 2.0, 0.25), terms))
    assert abs(float(out.loss) - expected) < 1e-5 * max(1.0, expected)
    # the defaults are the original NExT-Chat's
    assert NextChatLossWeights().to_dict() == {
        "lm_loss_weight": 1.0, "box_l1_loss_weight": 2.0, "box_giou_loss_weight": 0.2, "cycle_embed_loss_weight": 1.0,
        "cycle_box_loss_weight": 1.0, "mask_ce_loss_weight": 20.0, "mask_dice_loss_weight": 1.0, "mask_iou_loss_weight": 1.0}


def test_zero_weights_in_a_checkpoint_config_do_not_zero_the_finetuning_loss(processor, batch, tmp_path):
    # a checkpoint saved by an older version after a mask stage: its config.json carries LM/box weights of 0 (as the
    # shipped model's once did)
    tiny_model(processor).save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **ZERO_CONFIG_WEIGHTS}))
    model = NextChatForConditionalGeneration.from_pretrained(tmp_path / "ckpt")  # old config.json files keep loading
    assert not hasattr(model.config, "lm_loss_weight")
    assert model.loss_weights == NextChatLossWeights()  # the original's weights, not the config's zeros
    out = model(**batch)
    assert float(out.loss) > float(out.lm_loss) > 0
    assert abs(float(out.loss) - float(weighted_sum(out, NextChatLossWeights()))) < 1e-4 * float(out.loss)
    for stage in ("stage2", "full"):
        apply_stage_preset(model, stage)
        assert model.loss_weights == NextChatLossWeights()
    # presets never write the weights into the config
    model.save_pretrained(tmp_path / "again")
    assert "lm_loss_weight" not in json.loads((tmp_path / "again" / "config.json").read_text())
    assert stage_loss_weights("stage3").lm_loss_weight == 0.0 and stage_loss_weights("sam").mask_ce_loss_weight == 20


def test_warning_when_every_weighted_term_of_a_trainable_part_is_zero(processor, batch, tmp_path):
    model = tiny_model(processor)  # everything trainable, with LM/box weights at zero
    model.loss_weights = NextChatLossWeights(**ZERO_CONFIG_WEIGHTS)
    with pytest.warns(UserWarning, match="get no loss") as record:
        dead = check_loss_weights(model)
    assert {"language_model", "lm_head", "loc_decoder", "mm_projector"} <= set(dead)
    assert "seg_prompt_mlp" not in dead and "sam" not in dead  # the mask terms train them
    assert "lm_loss_weight" in str(record[0].message)
    # the right stage silences it
    for stage in ("stage2", "stage3", "sam", "full"):
        apply_stage_preset(model, stage)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert check_loss_weights(model) == []
    # a run through NextChatTrainer warns at the start
    from transformers import TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {k: v[i] for k, v in batch.items() if k != "pixel_values"} | {"pixel_values": batch["pixel_values"][i:i + 1]}

    apply_stage_preset(model, "stage2")
    model.loss_weights.lm_loss_weight = 0.0  # lm_head now learns from nothing
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                             report_to="none", save_strategy="no", use_cpu=True, remove_unused_columns=False,
                             disable_tqdm=True)
    trainer = NextChatTrainer(model=model, args=args, train_dataset=Rows(),
                              data_collator=NextChatDataCollator.from_processor(processor))
    with pytest.warns(UserWarning, match=r"get no loss: \['lm_head'\]"):
        trainer.train()


def test_lora_can_train_the_embeddings_and_reports_parameters_per_part(processor):
    model = apply_lora(tiny_model(processor), train_embeddings=True)
    report = trainable_parameter_report(model)
    for part in ("lm_head", "embed_tokens", "loc_decoder", "loc_encoder", "mm_projector", "language_model"):
        assert report[part][0] > 0, part
    assert report["vision_tower"][0] == 0 and report["sam"][0] == 0
    assert report["lm_head"][0] == model.get_base_model().lm_head.weight.numel()
    plain = trainable_parameter_report(apply_lora(tiny_model(processor)))
    assert plain["lm_head"][0] == 0 and plain["embed_tokens"][0] == 0


def test_new_shape_generator_keeps_every_existing_seed():
    h = hashlib.sha256()
    for seed in (0, 1, 2, 1000000):
        image, record = make_sample(seed)
        h.update(np.asarray(image).tobytes())
        h.update(json.dumps(record, sort_keys=True).encode())
    # the hash of these samples before the new shape existed
    assert h.hexdigest() == "9251b8a879c4268f10da26844ff5e0813a0a61de729ac0b80449e26c74dfc3fa"
    assert "star" in EXTRA_SHAPES
    star = shape_mask("star", 20, 2, 3, 32, 32)
    box = mask_to_box(star)
    assert 0.2 < star.sum() / 400 < 0.5 and 3 <= box[1] <= 6 and 2 <= box[0] and box[2] <= 22  # a point near the top
    for seed in range(20):
        _, objects = render_scene(seed, **new_shape_kwargs("star"))
        assert any(o["shape"] == "star" for o in objects)
        _, record = make_sample(seed, tasks=("rec",), max_turns=1, **new_shape_kwargs("star"))
        assert "star" in record["conversations"][0]["content"]  # the query is about the new shape
    with pytest.raises(ValueError, match="unknown shape"):
        render_scene(0, shapes=("square", "hexagon"))


def test_finetune_outputs_load_with_one_argument_and_merge(processor, tmp_path):
    """`nextchat-finetune` (in-process, 4 steps on a tiny model): full fine-tuning writes full model folders, LoRA
    writes adapter folders, both with the processor, checkpoints included; `nextchat-merge` writes a full folder."""
    from nextchat.loading import load_pretrained
    from nextchat.training.finetune import run
    from nextchat.training.merge import merge_adapter

    base = tmp_path / "base"
    tiny_model(processor).save_pretrained(base)
    processor.save_pretrained(base)
    write_dataset(str(tmp_path / "data"), range(8), **SCENE)
    common = ["--model", str(base), "--train", str(tmp_path / "data" / "data.jsonl"), "--steps", "4",
              "--batch-size", "4", "--save-steps", "2", "--no-tqdm", "--eval", str(tmp_path / "data" / "data.jsonl"),
              "--max-eval", "4"]
    full = run(common + ["--output", str(tmp_path / "full")])
    assert set(full["eval"]) <= {"rec", "res", "reg", "gc"} and all(v["n"] > 0 for v in full["eval"].values())
    for folder in (tmp_path / "full", tmp_path / "full" / "checkpoint-2"):
        assert (folder / "model.safetensors").exists() and (folder / "processor_config.json").exists()
        model, _ = load_pretrained(str(folder))
        assert model.loss_weights == NextChatLossWeights()  # the weights of the run did not travel with it
        saved = json.loads((folder / "config.json").read_text())
        assert "loss_weights" not in saved
    lora = run(common + ["--output", str(tmp_path / "lora"), "--lora", "--train-embeddings", "yes"])
    assert lora["trainable"]["lm_head"][0] > 0
    for folder in (tmp_path / "lora", tmp_path / "lora" / "checkpoint-4"):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base)  # absolute: loads from anywhere
        assert (folder / "processor_config.json").exists()
    adapted, _ = load_pretrained(str(tmp_path / "lora"))
    merge_adapter(str(tmp_path / "lora"), str(tmp_path / "merged"))
    merged, _ = load_pretrained(str(tmp_path / "merged"))
    for (name, a), (_, b) in zip(adapted.state_dict().items(), merged.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
