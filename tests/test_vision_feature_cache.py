"""`VisionFeatureCache`: a frozen vision tower computes each distinct image once, and what it hands back is what
the tower computes."""

import pytest
import torch

from nextchat.training.vision_feature_cache import VisionFeatureCache, image_key
from tiny_models import images, tiny_model


def frozen_tower_model(seed=0):
    model = tiny_model(sam=False, seed=seed)
    model.model.vision_tower.requires_grad_(False)
    return model


def test_cached_features_are_the_towers_and_each_image_is_computed_once():
    model = frozen_tower_model()
    pixels = images(4, seed=3)
    with torch.no_grad():
        expected = torch.stack(model.get_image_features(pixels).pooler_output)  # the tower itself, one batch
    cache = VisionFeatureCache(model.model.vision_tower).attach()
    order = [[2, 0], [0, 1, 2, 3], [3, 3, 1], [1, 0, 2, 3]]
    computed = [2, 4, 4, 4]  # only images not seen before reach the tower; a repeat within a batch counts once
    for rows, count in zip(order, computed):
        with torch.no_grad():
            got = torch.stack(model.get_image_features(pixels[rows]).pooler_output)
        torch.testing.assert_close(got, expected[rows], atol=1e-6, rtol=1e-5)
        assert cache.computed == count
    assert len(cache.store) == 4
    cache.detach()
    assert "forward" not in vars(model.model.vision_tower)
    with torch.no_grad():
        again = torch.stack(model.get_image_features(pixels).pooler_output)
    torch.testing.assert_close(again, expected)
    assert cache.computed == 4  # detached: the tower ran, not the cache


def test_cache_serves_other_layers_and_leaves_whole_hidden_state_calls_to_the_tower():
    model = frozen_tower_model(seed=1)
    pixels = images(2, seed=4)
    cache = VisionFeatureCache(model.model.vision_tower).attach()
    with torch.no_grad():
        for layer in (-2, -1):
            got = torch.stack(model.get_image_features(pixels, vision_feature_layer=layer).pooler_output)
            cache.detach()
            want = torch.stack(model.get_image_features(pixels, vision_feature_layer=layer).pooler_output)
            cache.attach()
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert cache.computed == 4  # once per image for each of the two layers
        every = model.model.vision_tower(pixels, output_hidden_states=True)
    assert len(every.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert cache.computed == 4


def test_image_key_tells_images_apart_by_value_shape_and_dtype():
    a = images(2, seed=5)
    assert image_key(a[0]) == image_key(a[0].clone())
    assert image_key(a[0]) != image_key(a[1])
    changed = a[0].clone()
    changed[1, 2, 3] += 1e-6
    assert image_key(changed) != image_key(a[0])
    assert image_key(a[0].double()) != image_key(a[0])
    assert image_key(a[0].reshape(3, -1)) != image_key(a[0])


def test_cache_refuses_a_trainable_tower_or_dropout():
    model = tiny_model(sam=False)
    with pytest.raises(ValueError, match="frozen vision tower.*embeddings"):
        VisionFeatureCache(model.model.vision_tower)
    model = frozen_tower_model()
    model.model.vision_tower.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        VisionFeatureCache(model.model.vision_tower)
