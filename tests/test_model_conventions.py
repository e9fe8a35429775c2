"""transformers conventions every user and library relies on: the cache argument and field, tuples with
`return_dict=False`, no swallowed keyword arguments, LLaVA's `get_image_features`, `shift_labels`, the TP plan."""

import pytest
import torch
from transformers import DynamicCache

from tiny_models import BOXES, TRIGGER, image_block, images, pad_boxes, sam_images, tiny_model


ROW = [1, 5] + image_block() + [7, 8, TRIGGER, BOXES, 9, 10, TRIGGER, BOXES, 11, 2]
ROW_BOXES = [[0.1, 0.2, 0.5, 0.6], [0.3, 0.1, 0.9, 0.7]]
SPLIT = 9  # the prefix ends inside the image-free text after the image block


@pytest.fixture(scope="module")
def model():
    return tiny_model(sam=True, seed=3).eval()


def inputs():
    box_inputs, box_mask = pad_boxes([ROW_BOXES])
    return dict(input_ids=torch.tensor([ROW]), pixel_values=images(1, seed=2), box_inputs=box_inputs,
                box_inputs_mask=box_mask)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
@torch.no_grad()
def test_a_cache_passed_under_either_name_continues_the_sequence(model, name):
    """Prefix with a cache, then the rest fed with that cache: the logits of the rest equal the full forward's.
    (Before the fix, `past_key_values=` was swallowed and the rest was read without its prefix.)"""
    full = model(**inputs()).logits
    split = len(image_block()) + 4
    ids = torch.tensor([ROW])
    first = model(input_ids=ids[:, :split], pixel_values=images(1, seed=2), use_cache=True)
    assert first.past_key_values is first.cache  # transformers' older name reads the same field
    box_inputs, box_mask = pad_boxes([ROW_BOXES])
    rest = model(input_ids=ids[:, split:], box_inputs=box_inputs, box_inputs_mask=box_mask, use_cache=True,
                 attention_mask=torch.ones_like(ids), **{name: first.cache})
    torch.testing.assert_close(rest.logits, full[:, split:], atol=1e-5, rtol=1e-5)


def test_both_cache_names_or_an_unknown_keyword_are_errors(model):
    cache = DynamicCache(config=model.config.text_config)
    with pytest.raises(ValueError, match="past_key_values"):
        model(**inputs(), cache=cache, past_key_values=cache)
    with pytest.raises(TypeError, match="boxes_input"):
        model(**inputs(), boxes_input=torch.zeros(1, 2, 4))
    with pytest.raises(TypeError, match="pixel_valeus"):
        model.model(input_ids=torch.tensor([ROW]), pixel_valeus=images(1))


@torch.no_grad()
def test_return_dict_false_gives_the_tuple_of_the_set_fields(model):
    as_dict = model(**inputs(), sam_pixel_values=sam_images(1))
    as_tuple = model(**inputs(), sam_pixel_values=sam_images(1), return_dict=False)
    assert isinstance(as_tuple, tuple)
    expected = [value for value in as_dict.values() if value is not None]
    # logits, cache, image outputs, trigger positions, boxes, masks, IoU scores
    assert len(as_tuple) == len(expected) == 7
    for got, want in zip(as_tuple, expected):
        if torch.is_tensor(want):
            assert torch.equal(got, want)
    base = model.model(input_ids=torch.tensor([ROW]), pixel_values=images(1, seed=2),
                       box_inputs=inputs()["box_inputs"], return_dict=False)
    assert isinstance(base, tuple) and torch.equal(base[0], model.model(**inputs()).last_hidden_state)


@torch.no_grad()
def test_config_return_dict_false_gives_tuples_too():
    model = tiny_model(sam=False, seed=4).eval()
    model.config.return_dict = False
    out = model(**inputs())
    assert isinstance(out, tuple) and out[0].shape == (1, len(ROW), model.config.text_config.vocab_size)


@torch.no_grad()
def test_get_image_features_returns_what_llava_returns(model):
    pixel_values = images(2, seed=6)
    out = model.get_image_features(pixel_values)
    vision = model.model.vision_tower(pixel_values, output_hidden_states=True)
    expected = model.model.mm_projector(vision.hidden_states[-2][:, 1:])  # layer -2, CLS dropped
    assert isinstance(out.pooler_output, list) and len(out.pooler_output) == 2
    for got, want in zip(out.pooler_output, expected):
        torch.testing.assert_close(got, want)
    assert len(out.hidden_states) == len(vision.hidden_states)
    full = model.get_image_features(pixel_values, vision_feature_select_strategy="full")
    torch.testing.assert_close(full.pooler_output[0], model.model.mm_projector(vision.hidden_states[-2][0]))
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        model.get_image_features(pixel_values, vision_feature_select_strategy="cls")


def test_shift_labels_are_the_lm_targets_when_given(model):
    """The LM term with `shift_labels` is the token mean of -log p(shift_labels[t] | logits[t]), computed here by
    hand; shifting `labels` gives the same as passing them pre-shifted."""
    labels = torch.tensor([ROW]).masked_fill(torch.arange(len(ROW))[None] < 3 + len(image_block()), -100)
    plain = model(**inputs(), labels=labels)
    shifted = torch.cat([labels[:, 1:], torch.full((1, 1), -100)], dim=1)
    same = model(**inputs(), labels=labels, shift_labels=shifted)
    torch.testing.assert_close(same.lm_loss, plain.lm_loss)
    torch.testing.assert_close(same.loss, plain.loss)
    # targets a context-parallel split would give: other tokens than the shift of the local labels
    other = shifted.clone()
    other[0, 0] = 40
    other[0, -1] = 41
    out = model(**inputs(), labels=labels, shift_labels=other)
    log_probs = out.logits[0].float().log_softmax(-1)
    kept = [(t, int(y)) for t, y in enumerate(other[0]) if y not in (-100, BOXES)]
    expected = -torch.stack([log_probs[t, y] for t, y in kept]).mean()
    torch.testing.assert_close(out.lm_loss, expected)
    assert not torch.allclose(out.lm_loss, plain.lm_loss)
    with pytest.raises(ValueError, match="shift_labels"):
        model(**inputs(), shift_labels=shifted)


def test_tensor_parallel_plan_covers_the_lm_head(model):
    assert model.supports_tp_plan
    assert model._tp_plan.get("lm_head") == "colwise_gather_output"
    assert any(key.startswith("model.language_model.") for key in model._tp_plan)
