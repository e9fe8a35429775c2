"""Forward pass of NExT-Chat against naive references: input merge, padding, trigger boxes, SAM masks."""

import pytest
import torch

from nextchat.modeling_nextchat import region_features
from tiny_models import (
    BOXES, IMAGE_PATCH, TRIGGER, image_block, images, naive_box_embedding, naive_region_feature, pad_boxes, pad_rows,
    sam_images, tiny_config, tiny_model,
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


def naive_embeddings(model, row, row_images, row_boxes, given=None):
    """Per-position loop: image features at `<im_patch>` in order, at `<boxes>` in order loc_encoder(box) (plus, with
    `box_region_features`, the box's region feature of the row's image where `given[k]`, default every box)."""
    embed = model.get_input_embeddings()
    projected = None
    if row_images is not None and len(row_images):
        vision = model.model.vision_tower(row_images, output_hidden_states=True)
        projected = model.model.mm_projector(vision.hidden_states[-2][:, 1:])
    features = iter([] if projected is None else projected.reshape(-1, projected.shape[-1]))
    boxes = iter(row_boxes)
    given = iter([True] * len(row_boxes) if given is None else given)
    rows = []
    for token in row:
        if token == IMAGE_PATCH:
            rows.append(next(features))
        elif token == BOXES:
            image = None if projected is None or not next(given) else projected[0]
            rows.append(naive_box_embedding(model, next(boxes), image))
        else:
            rows.append(embed(torch.tensor(token)))
    return torch.stack(rows)[None]


@pytest.fixture(scope="module")
def region_model():
    return tiny_model(sam=True, box_region_features=True)


@pytest.mark.parametrize("model_name", ["model", "region_model"])
@torch.no_grad()
def test_merge_matches_naive_loop_for_rows_with_and_without_images(model_name, request):
    model = request.getfixturevalue(model_name)
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


def test_region_features_of_a_linear_feature_map_are_the_box_centre():
    """Bilinear sampling reproduces a feature that is linear in position: the mean over the box is its centre."""
    side = 6
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    features = torch.stack([xs.flatten(), ys.flatten()], dim=-1)[None].repeat(3, 1, 1)  # (3, 36, 2): (x, y)
    boxes = torch.tensor([[0.2, 0.3, 0.6, 0.8], [0.5, 0.1, 0.2, 0.4], [0.1, 0.1, 0.12, 0.13]])  # 2nd: corners swapped
    expected = torch.tensor([[0.4, 0.55], [0.35, 0.25], [0.11, 0.115]])
    torch.testing.assert_close(region_features(features, boxes), expected, atol=1e-6, rtol=0)


def test_region_features_match_naive_bilinear_loop():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4, 16, 5, generator=generator)
    boxes = torch.tensor([[0.1, 0.2, 0.7, 0.9], [-0.3, 0.4, 1.4, 0.6], [0.9, 0.9, 0.95, 0.97], [0.6, 0.0, 0.1, 1.0]])
    expected = torch.stack([naive_region_feature(features[k], boxes[k]) for k in range(4)])
    torch.testing.assert_close(region_features(features, boxes), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_region_features_change_what_a_box_feeds_and_are_off_by_default(model, region_model):
    assert model.config.box_region_features is False  # parity with the original
    ids, mask = pad_rows([ROW_WITH_IMAGE])
    box_inputs, box_mask = pad_boxes([BOXES_WITH_IMAGE])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=images(1, seed=1), box_inputs=box_inputs,
                  box_inputs_mask=box_mask)
    region_model.load_state_dict(model.state_dict())
    plain, region = model(**inputs), region_model(**inputs)
    first_box = ROW_WITH_IMAGE.index(BOXES)
    torch.testing.assert_close(plain.logits[0, :first_box], region.logits[0, :first_box])
    assert (plain.logits[0, first_box:] - region.logits[0, first_box:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="box_region_features"):
        tiny_config(box_region_features="yes")


def test_each_box_reads_the_last_image_before_it(region_model):
    """Images are numbered row-major over the batch; a box before any image of its row reads none (-1)."""
    rows = [[1] + image_block() + [BOXES] + image_block() + [BOXES], [BOXES, 5] + image_block() + [BOXES, 2, 2]]
    ids, _ = pad_rows(rows)
    index = region_model.model._image_block_of(ids)
    assert index[ids == BOXES].tolist() == [0, 1, -1, 2]


def test_region_features_go_to_given_boxes_only_and_pass_no_gradient(region_model):
    """In training, the answer's box (after a labelled trigger) keeps loc_encoder alone, like the boxes predicted
    in generation; the user's box gets its region's features, read without gradient into the projector."""
    row = [1, 5] + image_block() + [7, TRIGGER, BOXES, 8, 9, TRIGGER, BOXES, 10, 2]  # user box, then the answer's
    answer_start = row.index(8)
    boxes = [[0.1, 0.2, 0.6, 0.7], [0.4, 0.3, 0.9, 0.8]]
    ids = torch.tensor([row])
    labels = torch.tensor([[-100] * answer_start + row[answer_start:]])
    pixel_values = images(1, seed=4)
    captured = {}
    hook = region_model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        out = region_model(input_ids=ids, pixel_values=pixel_values, box_inputs=torch.tensor([boxes]), labels=labels)
    finally:
        hook.remove()
    with torch.no_grad():
        expected = naive_embeddings(region_model, row, pixel_values, boxes, given=[True, False])
        hidden = region_model.model.language_model(inputs_embeds=expected).last_hidden_state
        torch.testing.assert_close(out.logits, region_model.lm_head(hidden), atol=1e-5, rtol=1e-5)
    projector = region_model.model.mm_projector[0].weight
    user_box = row.index(BOXES)
    grads = torch.autograd.grad(captured["embeds"][0, user_box].sum(), projector, allow_unused=True,
                                retain_graph=True)[0]
    assert grads is None or not bool(grads.any())
    control = torch.autograd.grad(captured["embeds"][0, row.index(IMAGE_PATCH)].sum(), projector)[0]
    assert bool(control.any())


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
        with pytest.raises(ValueError, match="trigger_token_id"):
            tiny_config(trigger_token_id=64)
        with pytest.raises(ValueError, match="projector_depth"):
            tiny_config(projector_depth=0)
        with pytest.raises(ValueError, match="vision_feature_layer"):
            tiny_config(vision_feature_layer=-5)
        with pytest.raises(ValueError, match="encoder_global_attn_indexes"):
            tiny_config(sam_config=dict(encoder_depth=2, encoder_global_attn_indexes=[5]))
        with pytest.raises(ValueError, match="distinct"):
            tiny_config(box_token_id=TRIGGER)
