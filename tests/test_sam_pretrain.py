"""Stage 0 for SAM: training SAM alone on ground-truth boxes, and loading it into a model."""

import json
import re

import numpy as np
import pytest
import torch

from nextchat.training.sam_pretrain import (
    BoxPromptedSam,
    ShapesBoxMaskDataset,
    box_mask_miou,
    collate_box_masks,
    main,
)
from nextchat.training.synthetic import build_shapes_processor, render_scene
from nextchat.training.train import build_model


IMAGE = 32
SAM = {"patch_size": 4, "encoder_embed_dim": 16, "encoder_depth": 1, "encoder_num_heads": 2,
       "encoder_global_attn_indexes": [0], "window_size": 4, "prompt_embed_dim": 32}
SPEC = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 512},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "patch_size": 8},
    "sam_config": SAM,
}
PROCESSOR = {"shapes": {"image_size": IMAGE, "patch_size": 8, "sam_image_size": IMAGE}}


def processor():
    return build_shapes_processor(image_size=IMAGE, patch_size=8, sam_image_size=IMAGE)


def test_dataset_rows_are_the_scene_objects_in_the_sam_frame():
    # a 48x32 scene: the SAM input (32) holds it resized by 2/3 and padded at the top and bottom
    proc = build_shapes_processor(image_size=IMAGE, patch_size=8, sam_image_size=24)
    dataset = ShapesBoxMaskDataset([5, 6], proc.image_processor, height=32, width=48)
    item = dataset[0]
    image, objects = render_scene(5, height=32, width=48)
    assert item["sam_pixel_values"].shape == (3, 24, 24)
    assert item["boxes"].shape == (len(objects), 4) and item["mask_targets"].shape == (len(objects), 24, 24)
    for obj, box, mask in zip(objects, item["boxes"], item["mask_targets"]):
        # by hand: scale 24/48 = 1/2, the 16-px-high image sits 4 px below the top of the 24-px square
        x1, y1, x2, y2 = obj["box"]
        expected = np.array([x1 / 2, y1 / 2 + 4, x2 / 2, y2 / 2 + 4]) / 24
        np.testing.assert_allclose(box.numpy(), expected, atol=1e-6)
        rows, cols = np.nonzero(mask.numpy() > 0.5)
        assert rows.min() >= 4 + y1 // 2 - 1 and rows.max() <= 4 + (y2 + 1) // 2  # the mask lies in its box
        assert cols.min() >= x1 // 2 - 1 and cols.max() <= (x2 + 1) // 2
    batch = collate_box_masks([dataset[0], dataset[1]])
    n0, n1 = len(dataset[0]["boxes"]), len(dataset[1]["boxes"])
    assert batch["sam_pixel_values"].shape == (2, 3, 24, 24)
    assert batch["image_index"].tolist() == [0] * n0 + [1] * n1
    assert torch.equal(batch["mask_targets"][n0:], dataset[1]["mask_targets"])


def test_sam_stage_freezes_only_the_prompt_encoders_no_box_reaches():
    from nextchat.loss_nextchat import NextChatLossWeights
    from nextchat.sam_nextchat import NextChatSamModel
    from nextchat.training.vision_pretrain import freeze_unreached_parameters

    torch.manual_seed(0)
    model = BoxPromptedSam(NextChatSamModel({**SAM, "image_size": IMAGE}), 2, NextChatLossWeights(), {})
    dataset = ShapesBoxMaskDataset([0, 1], processor().image_processor, height=IMAGE, width=IMAGE)
    frozen = freeze_unreached_parameters(model, collate_box_masks([dataset[0], dataset[1]]))
    # by hand: box prompts use the box-corner embeddings (2 and 3) only; the point labels' embeddings (0, 1), the
    # padding point's and the mask-prompt encoder are never reached, nor are the hypernetworks of SAM's three
    # multimask outputs (NExT-Chat decodes the single mask only)
    expected = {name for name, _ in model.named_parameters()
                if re.fullmatch(r"sam\.prompt_encoder\.(point_embeddings\.[01]|not_a_point_embed|mask_downscaling\.\d+)"
                                r"\.(weight|bias)", name)
                or re.fullmatch(r"sam\.mask_decoder\.output_hypernetworks_mlps\.[123]\.layers\.[012]\.(weight|bias)", name)}
    assert len(expected) == 13 + 18 and set(frozen) == expected


def test_box_mask_miou_equals_a_per_object_loop():
    from nextchat.sam_nextchat import NextChatSamModel

    torch.manual_seed(0)
    model = BoxPromptedSam(NextChatSamModel({**SAM, "image_size": IMAGE}), 2, None, {})
    dataset = ShapesBoxMaskDataset(range(10, 15), processor().image_processor, height=IMAGE, width=IMAGE)
    ious = []
    for i in range(len(dataset)):
        item = dataset[i]
        with torch.no_grad():
            logits = model(item["sam_pixel_values"][None], item["boxes"],
                           torch.zeros(len(item["boxes"]), dtype=torch.long))["pred_masks"]
        for k in range(len(item["boxes"])):
            up = torch.nn.functional.interpolate(logits[k][None, None], size=(IMAGE, IMAGE), mode="bilinear",
                                                 align_corners=False)[0, 0].numpy()
            pred, target = up > 0, item["mask_targets"][k].numpy() > 0.5
            ious.append((pred & target).sum() / max((pred | target).sum(), 1))
    assert 0 < np.mean(ious) < 1  # the random SAM predicts something, neither nothing nor exactly the masks
    assert box_mask_miou(model, dataset, batch_size=2) == pytest.approx(np.mean(ious), abs=1e-6)


def test_pretrained_sam_learns_and_loads_into_a_model(tmp_path):
    config = {"model": {"processor": PROCESSOR, "scratch": SPEC, "seed": 0}, "torch_num_threads": 1}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "sam"
    assert main([str(path), str(out), "--num", "64", "--eval-num", "8", "--max-steps", "30", "--batch-size", "8",
                 "--learning-rate", "3e-3", "--logging-steps", "10"]) == 0
    metrics = json.load(open(out / "sam_pretrain_metrics.json"))
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert metrics["steps"] == 30 and losses[-1] < 0.8 * losses[0]
    assert 0.0 <= metrics["box_mask_miou"] <= 1.0
    with pytest.raises(SystemExit):
        main([str(path), str(tmp_path / "bad"), "--scene-size", "0"])

    # "sam_init" puts exactly the saved weights into SAM, and zeroes seg_prompt_mlp's last layer, so that the model's
    # masks, whatever its trigger states, are those of the saved SAM prompted by the box alone
    from safetensors.torch import load_file

    saved = load_file(str(out / "sam.safetensors"))
    model = build_model({**config["model"], "sam_init": str(out)}, processor()).eval()
    sam_state = model.sam.state_dict()
    assert set(saved) == set(sam_state)
    for name, tensor in saved.items():
        assert torch.equal(sam_state[name], tensor), name
    batch = collate_box_masks([ShapesBoxMaskDataset([7, 8], processor().image_processor,
                                                    height=IMAGE, width=IMAGE)[i] for i in range(2)])
    hidden = torch.randn(len(batch["boxes"]), SPEC["text_config"]["hidden_size"]) * 10
    with torch.no_grad():
        from_model, _ = model.predict_masks(batch["sam_pixel_values"], hidden, batch["boxes"], batch["image_index"])
        from_box = BoxPromptedSam(model.sam, model.config.num_seg_prompt_tokens, None, {})(
            batch["sam_pixel_values"], batch["boxes"], batch["image_index"])["pred_masks"]
    torch.testing.assert_close(from_model, from_box)
    # the zeroed layer still learns: its gradient is not zero
    model.train()
    masks, _ = model.predict_masks(batch["sam_pixel_values"], hidden, batch["boxes"], batch["image_index"])
    masks.sum().backward()
    assert model.seg_prompt_mlp[-1].weight.grad.abs().sum() > 0

    # the pretrained path loads it too, and a SAM of another size is refused, naming the field
    model.save_pretrained(tmp_path / "model")
    reloaded = build_model({"pretrained": str(tmp_path / "model"), "sam_init": str(out)}, None)
    assert torch.equal(reloaded.sam.mask_decoder.iou_token.weight, saved["mask_decoder.iou_token.weight"])
    other = json.loads(json.dumps(config["model"]))
    other["scratch"]["sam_config"]["encoder_embed_dim"] = 32
    with pytest.raises(ValueError, match="sam_init.*encoder_embed_dim"):
        build_model({**other, "sam_init": str(out)}, processor())
