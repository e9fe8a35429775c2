"""Forward pass of NExT-Chat against naive references: input merge, padding, trigger boxes, SAM masks."""

import json

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from nextchat import NextChatConfig, NextChatForConditionalGeneration

from tiny_models import (
    BOXES, IMAGE_PATCH, TRIGGER, image_block, images, naive_box_embedding, pad_boxes, pad_rows, sam_images, tiny_config,
    tiny_model,
)


ROW_WITH_IMAGE = [1, 5] + image_block() + [7, 8, TRIGGER, BOXES, 9, 10, TRIGGER, BOXES, 11, 2]
ROW_TEXT_ONLY = [1, 12, 13, TRIGGER, BOXES, 14, 2]
ROW_SECOND_IMAGE = [1] + image_block() + [15, 16, 17, TRIGGER, BOXES, 2]
BOXES_WITH_IMAGE = [[0.1, 0.2, 0.5, 0.6], [0.3, 0.1, 0.9, 0.7]]
BOXES_TEXT_ONLY = [[0.0, 0.25, 0.4, 1.0]]
BOXES_SECOND_IMAGE = [[0.5, 0.5, 0.75, 0.8]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(sam=True)


def naive_embeddings(model, row, row_images, row_boxes):
    """Per-position loop: image features at `<im_patch>` in order, `loc_encoder(box)` at `<boxes>` in order."""
    embed = model.get_input_embeddings()
    projected = None
    if row_images is not None and len(row_images):
        vision = model.model.vision_tower(row_images, output_hidden_states=True)
        projected = model.model.mm_projector(vision.hidden_states[-2][:, 1:])
    features = iter([] if projected is None else projected.reshape(-1, projected.shape[-1]))
    boxes = iter(row_boxes)
    rows = []
    for token in row:
        if token == IMAGE_PATCH:
            rows.append(next(features))
        elif token == BOXES:
            rows.append(naive_box_embedding(model, next(boxes)))
        else:
            rows.append(embed(torch.tensor(token)))
    return torch.stack(rows)[None]


@torch.no_grad()
def test_merge_matches_naive_loop_for_rows_with_and_without_images(model):
    rows = [ROW_WITH_IMAGE, ROW_TEXT_ONLY, ROW_SECOND_IMAGE]
    row_boxes = [BOXES_WITH_IMAGE, BOXES_TEXT_ONLY, BOXES_SECOND_IMAGE]
    row_images = [images(1, seed=1), None, images(1, seed=2)]
    ids, mask = pad_rows(rows, side="right")
    box_inputs, box_mask = pad_boxes(row_boxes)
    out = model(
        input_ids=ids, attention_mask=mask, pixel_values=torch.cat([row_images[0], row_images[2]]),
        box_inputs=box_inputs, box_inputs_mask=box_mask,
    )
    for b, row in enumerate(rows):
        embeds = naive_embeddings(model, row, row_images[b], row_boxes[b])
        hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        expected = model.lm_head(hidden)[0]
        torch.testing.assert_close(out.logits[b, : len(row)], expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_text_only_batch(model):
    ids, mask = pad_rows([ROW_TEXT_ONLY, [1, 20, 21, 2]])
    box_inputs, box_mask = pad_boxes([BOXES_TEXT_ONLY, []])
    out = model(input_ids=ids, attention_mask=mask, box_inputs=box_inputs, box_inputs_mask=box_mask)
    embeds = naive_embeddings(model, ROW_TEXT_ONLY, None, BOXES_TEXT_ONLY)
    expected = model.lm_head(model.model.language_model(inputs_embeds=embeds).last_hidden_state)[0]
    torch.testing.assert_close(out.logits[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_batched_equals_per_row(model, side):
    rows = [ROW_WITH_IMAGE, ROW_SECOND_IMAGE]
    row_boxes = [BOXES_WITH_IMAGE, BOXES_SECOND_IMAGE]
    pixel_values = images(2, seed=3)
    ids, mask = pad_rows(rows, side=side)
    box_inputs, box_mask = pad_boxes(row_boxes)
    batched = model(
        input_ids=ids, attention_mask=mask, pixel_values=pixel_values, box_inputs=box_inputs, box_inputs_mask=box_mask
    )
    for b, row in enumerate(rows):
        single = model(
            input_ids=torch.tensor([row]), pixel_values=pixel_values[b : b + 1],
            box_inputs=torch.tensor([row_boxes[b]]),
        )
        columns = mask[b].bool()
        torch.testing.assert_close(batched.logits[b, columns], single.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched.pred_boxes[batched.trigger_positions[:, 0] == b], single.pred_boxes)


@torch.no_grad()
def test_pred_boxes_are_loc_decoder_of_final_hidden_state_at_triggers(model):
    ids, mask = pad_rows([ROW_WITH_IMAGE, ROW_TEXT_ONLY], side="left")
    box_inputs, box_mask = pad_boxes([BOXES_WITH_IMAGE, BOXES_TEXT_ONLY])
    out = model(
        input_ids=ids, attention_mask=mask, pixel_values=images(1), box_inputs=box_inputs, box_inputs_mask=box_mask,
        output_hidden_states=True,
    )
    expected_positions = [(b, c) for b in range(ids.shape[0]) for c in range(ids.shape[1]) if ids[b, c] == TRIGGER]
    assert out.trigger_positions.tolist() == [list(p) for p in expected_positions]
    last = out.hidden_states[-1]
    for k, (b, c) in enumerate(expected_positions):
        h = last[b, c]
        expected = model.loc_decoder[2](torch.relu(model.loc_decoder[0](h)))
        torch.testing.assert_close(out.pred_boxes[k], expected, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_masks_of_k_triggers_equal_k_single_calls_with_one_encoder_run(model):
    calls = []
    handle = model.sam.image_encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        ids = torch.tensor([ROW_WITH_IMAGE])
        pixel_values, sam_pixel_values = images(1), sam_images(1)
        out = model(
            input_ids=ids, pixel_values=pixel_values, box_inputs=torch.tensor([BOXES_WITH_IMAGE]),
            sam_pixel_values=sam_pixel_values,
        )
        assert calls == [1], "SAM's image encoder must run once for one image with two triggers"
        assert out.pred_masks.shape == (2, 16, 16) and out.iou_scores.shape == (2,)
        hidden = model(input_ids=ids, pixel_values=pixel_values, box_inputs=torch.tensor([BOXES_WITH_IMAGE]),
                       output_hidden_states=True).hidden_states[-1][0]
        embedding = model.sam.get_image_embeddings(sam_pixel_values)
        for k, column in enumerate(out.trigger_positions[:, 1].tolist()):
            prompt = model.seg_prompt_mlp(hidden[column]).view(1, 4, -1)
            mask, score = model.sam.decode_masks(embedding, prompt, out.pred_boxes[k : k + 1] * 64)
            torch.testing.assert_close(out.pred_masks[k], mask[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.iou_scores[k], score[0], atol=1e-5, rtol=1e-5)
        calls.clear()
        model(input_ids=torch.tensor([[1, 5, 6, 2]]), sam_pixel_values=sam_pixel_values)
        assert calls == [], "no trigger: SAM's image encoder must not run"
    finally:
        handle.remove()


@torch.no_grad()
def test_masks_in_a_batch_use_each_rows_image(model):
    ids, mask = pad_rows([ROW_TEXT_ONLY, ROW_SECOND_IMAGE], side="left")
    box_inputs, box_mask = pad_boxes([BOXES_TEXT_ONLY, BOXES_SECOND_IMAGE])
    sam_pixel_values = sam_images(2)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=images(1), box_inputs=box_inputs,
                box_inputs_mask=box_mask, sam_pixel_values=sam_pixel_values)
    for b in range(2):
        single = model(input_ids=ids[b : b + 1, mask[b].bool()], pixel_values=images(1) if b else None,
                       box_inputs=box_inputs[b : b + 1, :1], sam_pixel_values=sam_pixel_values[b : b + 1])
        torch.testing.assert_close(out.pred_masks[b], single.pred_masks[0], atol=1e-5, rtol=1e-4)


def test_sam_prompt_encoding_matches_segment_anything(model):
    """Our float32 positional encoding and box tokens equal segment-anything's own PromptEncoder."""
    sam = model.sam
    boxes = torch.tensor([[3.0, 5.0, 40.0, 60.0], [0.0, 0.0, 63.0, 63.0]])
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    torch.testing.assert_close(sam.embed_boxes(boxes), sparse)
    torch.testing.assert_close(sam.image_positional_embeddings(), sam.prompt_encoder.get_dense_pe())


def test_one_decoder_pass_for_prompts_of_several_images_equals_segment_anything_image_by_image(model):
    """`decode_masks` decodes the prompts of a whole batch in one pass; segment-anything's own `MaskDecoder`,
    called once per prompt on that prompt's image, is the reference, for the masks, the IoUs and the gradients."""
    sam = model.sam
    generator = torch.Generator().manual_seed(0)
    prompt_dim, size = sam.mask_decoder.transformer_dim, sam.image_embedding_size
    embeddings = torch.randn(3, prompt_dim, size, size, generator=generator, requires_grad=True)
    prompts = torch.randn(5, 4, prompt_dim, generator=generator, requires_grad=True)
    boxes = torch.tensor([[3.0, 5.0, 40.0, 60.0], [0.0, 0.0, 63.0, 63.0], [10.0, 2.0, 20.0, 30.0],
                          [30.0, 30.0, 50.0, 61.0], [1.0, 40.0, 12.0, 52.0]])
    image_index = torch.tensor([2, 0, 2, 1, 0])
    masks, iou = sam.decode_masks(embeddings, prompts, boxes, image_index)
    weights = torch.randn(masks.shape, generator=generator)
    grads = torch.autograd.grad((masks * weights).sum() + iou.sum(), [embeddings, prompts])

    reference_masks, reference_iou = [], []
    for k, i in enumerate(image_index.tolist()):
        box_tokens, dense = sam.prompt_encoder(points=None, boxes=boxes[k : k + 1], masks=None)
        mask, score = sam.mask_decoder(
            image_embeddings=embeddings[i : i + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=torch.cat([prompts[k : k + 1], box_tokens], dim=1),
            dense_prompt_embeddings=dense, multimask_output=False,
        )
        reference_masks.append(mask[0, 0])
        reference_iou.append(score[0, 0])
    reference_masks, reference_iou = torch.stack(reference_masks), torch.stack(reference_iou)
    reference_grads = torch.autograd.grad((reference_masks * weights).sum() + reference_iou.sum(),
                                          [embeddings, prompts])
    assert masks.shape == (5, 4 * size, 4 * size) and iou.shape == (5,)
    torch.testing.assert_close(masks, reference_masks, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iou, reference_iou, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_one_decoder_pass_gives_the_same_gradients_on_every_run_with_several_threads():
    """The SAM stage trains on two threads: the gradients of a decoder pass over the prompts of several images must
    not depend on how the threads add them up (the backward of advanced indexing's gather did, from run to run)."""
    from nextchat.sam_nextchat import NextChatSamModel

    # the shipped model's SAM size: a 16 x 16 grid of 64 channels, 40 prompts over 16 images, as in a SAM-stage step
    sam = NextChatSamModel({"encoder_depth": 2, "encoder_embed_dim": 64, "encoder_global_attn_indexes": [1],
                            "encoder_num_heads": 2, "image_size": 64, "patch_size": 4, "prompt_embed_dim": 64,
                            "window_size": 8})
    generator = torch.Generator().manual_seed(0)
    prompt_dim, size = sam.mask_decoder.transformer_dim, sam.image_embedding_size
    embeddings = torch.randn(16, prompt_dim, size, size, generator=generator, requires_grad=True)
    prompts = torch.randn(40, 4, prompt_dim, generator=generator)
    corners = torch.rand(40, 2, generator=generator) * 40
    boxes = torch.cat([corners, corners + 4 + torch.rand(40, 2, generator=generator) * 20], dim=1)
    image_index = torch.randint(0, 16, (40,), generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(6):
            masks, iou = sam.decode_masks(embeddings, prompts, boxes, image_index)
            grads.append(torch.autograd.grad(masks.square().mean() + iou.sum(), embeddings)[0])
    finally:
        torch.set_num_threads(threads)
    assert grads[0].abs().sum() > 0
    for grad in grads[1:]:
        assert torch.equal(grad, grads[0])


@torch.no_grad()
def test_sdpa_and_eager_agree():
    eager = tiny_model(sam=False, seed=3)
    eager.set_attn_implementation("eager")
    sdpa = tiny_model(sam=False, seed=3)
    sdpa.set_attn_implementation("sdpa")
    assert eager.model.language_model.config._attn_implementation == "eager"
    assert eager.model.vision_tower.config._attn_implementation == "eager"
    assert sdpa.model.vision_tower.config._attn_implementation == "sdpa"
    ids, mask = pad_rows([ROW_WITH_IMAGE, ROW_SECOND_IMAGE], side="left")
    box_inputs, box_mask = pad_boxes([BOXES_WITH_IMAGE, BOXES_SECOND_IMAGE])
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=images(2), box_inputs=box_inputs,
                  box_inputs_mask=box_mask)
    a, b = eager(**kwargs), sdpa(**kwargs)
    torch.testing.assert_close(a.logits[mask.bool()], b.logits[mask.bool()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.pred_boxes, b.pred_boxes, atol=1e-5, rtol=1e-5)


def test_resize_token_embeddings_keeps_forward_working():
    model = tiny_model(sam=False)
    model.resize_token_embeddings(80)
    assert model.lm_head.weight.shape[0] == 80 and model.config.text_config.vocab_size == 80
    out = model(input_ids=torch.tensor([[1, 70, 75, TRIGGER, BOXES, 2]]), box_inputs=torch.tensor([[[0.1] * 4]]))
    assert out.logits.shape == (1, 6, 80)


def test_box_only_model_has_no_sam():
    model = tiny_model(sam=False)
    assert model.sam is None and model.seg_prompt_mlp is None
    assert not any(name.startswith("sam.") for name in model.state_dict())


@pytest.fixture(scope="module")
def box_model():
    return tiny_model(sam=False)


class TestBadInputs:
    def test_more_or_fewer_boxes_than_box_tokens(self, box_model):
        ids = torch.tensor([ROW_TEXT_ONLY])
        with pytest.raises(ValueError, match="box_inputs_mask"):
            box_model(input_ids=ids, box_inputs=torch.tensor([[[0.1] * 4, [0.2] * 4]]))
        with pytest.raises(ValueError, match="box_inputs"):
            box_model(input_ids=ids)
        with pytest.raises(ValueError, match="box_inputs"):
            box_model(input_ids=torch.tensor([[1, 5, 2]]), box_inputs=torch.tensor([[[0.1] * 4]]))

    def test_image_placeholders_without_pixel_values_or_wrong_count(self, box_model):
        ids = torch.tensor([ROW_SECOND_IMAGE])
        boxes = torch.tensor([BOXES_SECOND_IMAGE])
        with pytest.raises(ValueError, match="pixel_values"):
            box_model(input_ids=ids, box_inputs=boxes)
        with pytest.raises(ValueError, match="pixel_values"):
            box_model(input_ids=ids, box_inputs=boxes, pixel_values=images(2))
        with pytest.raises(ValueError, match="pixel_values"):
            box_model(input_ids=torch.tensor([[1, 5, 2]]), pixel_values=images(1))
        short_block = [1, 60, IMAGE_PATCH, IMAGE_PATCH, 61, 2]
        with pytest.raises(ValueError, match="pixel_values"):
            box_model(input_ids=torch.tensor([short_block]), pixel_values=images(1))

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    def test_nan_or_infinite_boxes(self, box_model, bad):
        with pytest.raises(ValueError, match="box_inputs"):
            box_model(input_ids=torch.tensor([ROW_TEXT_ONLY]), box_inputs=torch.tensor([[[0.1, bad, 0.5, 0.5]]]))

    def test_box_inputs_shape(self, box_model):
        with pytest.raises(ValueError, match="box_inputs"):
            box_model(input_ids=torch.tensor([ROW_TEXT_ONLY]), box_inputs=torch.tensor([[0.1, 0.1, 0.5, 0.5]]))

    def test_mask_targets_or_sam_inputs_without_sam(self, box_model):
        ids = torch.tensor([ROW_TEXT_ONLY])
        labels = ids.clone()
        with pytest.raises(ValueError, match="mask_targets"):
            box_model(input_ids=ids, box_inputs=torch.tensor([BOXES_TEXT_ONLY]), labels=labels,
                      mask_targets=torch.zeros(1, 1, 64, 64))
        with pytest.raises(ValueError, match="sam_pixel_values"):
            box_model(input_ids=ids, box_inputs=torch.tensor([BOXES_TEXT_ONLY]), sam_pixel_values=sam_images(1))

    def test_config_rejects_token_ids_outside_vocabulary_and_bad_projector(self):
        # transformers' `@strict` configs: a validator's ValueError/TypeError is raised wrapped, message kept
        with pytest.raises(StrictDataclassError, match="trigger_token_id"):
            tiny_config(trigger_token_id=64)
        with pytest.raises(StrictDataclassError, match="projector_depth"):
            tiny_config(projector_depth=0)
        with pytest.raises(StrictDataclassError, match="projector_depth"):
            tiny_config(projector_depth="2")  # field types too
        with pytest.raises(StrictDataclassError, match="vision_feature_layer"):
            tiny_config(vision_feature_layer=-5)
        with pytest.raises(StrictDataclassError, match="encoder_global_attn_indexes"):
            tiny_config(sam_config=dict(encoder_depth=2, encoder_global_attn_indexes=[5]))
        with pytest.raises(StrictDataclassError, match="distinct"):
            tiny_config(box_token_id=TRIGGER)
        with pytest.raises(StrictDataclassError, match="box_decoder_activation"):
            tiny_config(box_decoder_activation="tanh")

    def test_config_validates_again_at_save(self, tmp_path):
        config = tiny_config()
        config.mask_loss_type = "hinge"
        with pytest.raises(StrictDataclassError, match="mask_loss_type"):
            config.save_pretrained(tmp_path)
        assert not (tmp_path / "config.json").exists()

    def test_old_configs_with_training_fields_load_without_them(self, tmp_path):
        """Loss weights and attention-term settings that older versions saved in config.json load, and are
        dropped: they are training arguments (`model.loss_weights`, `AttentionSupervision`)."""
        tiny_config().save_pretrained(tmp_path)
        path = tmp_path / "config.json"
        saved = json.loads(path.read_text())
        saved.update(lm_loss_weight=0.0, box_l1_loss_weight=0.0, grounding_attention_heads=[0, 1],
                     attention_loss_per_head=True, box_region_features=False, sam_box_prompt="target")
        path.write_text(json.dumps(saved))
        config = NextChatConfig.from_pretrained(tmp_path)
        for name in ("lm_loss_weight", "box_l1_loss_weight", "grounding_attention_heads", "box_region_features",
                     "sam_box_prompt"):
            assert not hasattr(config, name), name
        model = NextChatForConditionalGeneration(config)
        assert model.loss_weights.lm_loss_weight == 1.0 and model.loss_weights.box_l1_loss_weight == 2.0
        assert model.sam_box_prompt == "predicted"
        config.save_pretrained(tmp_path / "again")
        assert "lm_loss_weight" not in json.loads((tmp_path / "again" / "config.json").read_text())
