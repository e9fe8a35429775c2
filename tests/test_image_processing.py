"""Tests of NextChatImageProcessor and the geometry helpers (CLIP frame, SAM frame, masks, RLE)."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from nextchat.processing import (
    NextChatImageProcessor,
    boxes_from_square_frame,
    boxes_to_sam_frame,
    boxes_to_square_frame,
    expand2square,
    masks_from_sam_frame,
    masks_to_sam_frame,
    rle_decode,
    rle_encode,
    sam_padding,
    sam_resized_size,
    square_padding,
)
from nextchat.processing.image_processing_nextchat import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SAM_PIXEL_MEAN, SAM_PIXEL_STD


FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "original_tiny"
SIZES = [(30, 40), (40, 30), (33, 33), (7, 50), (50, 7), (1, 1)]  # (h, w): landscape, portrait, square, thin


def small_processor(**kwargs):
    args = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, sam_image_size=64)
    args.update(kwargs)
    return NextChatImageProcessor(**args)


def random_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- CLIP branch


def reference_clip_pixels(image, size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """Independent reference of the original's CLIP preprocessing (transformers 4.31's `CLIPImageProcessor` on the
    expand2square image), step by step with PIL and numpy: shortest edge to `size` (bicubic, the long edge
    truncated), centre crop `size` x `size`, x/255, (x - mean) / std, channels first."""
    side = max(image.size)
    square = PIL.Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    resized = square.resize((size, size), resample=PIL.Image.BICUBIC, reducing_gap=None)
    arr = np.asarray(resized).astype(np.float64) / 255.0
    return ((arr - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)


@pytest.mark.parametrize("hw", [(30, 40), (40, 30), (33, 33), (5, 61)])
@pytest.mark.parametrize("size", [28, 56])
def test_clip_branch_matches_the_original_arithmetic(hw, size):
    image = random_image(*hw)
    ours = small_processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})(image)
    np.testing.assert_allclose(ours["pixel_values"][0].numpy(), reference_clip_pixels(image, size), atol=1e-5, rtol=0)


def test_expand2square_white_centred_by_hand():
    image = PIL.Image.new("RGB", (5, 2), (10, 20, 30))  # w=5, h=2 -> side 5, pad_top (5-2)//2 = 1
    square = np.asarray(expand2square(image))
    assert square.shape == (5, 5, 3)
    assert (square[0] == 255).all() and (square[3:] == 255).all()
    assert (square[1:3] == [10, 20, 30]).all()
    tall = np.asarray(expand2square(PIL.Image.new("RGB", (2, 5), (1, 2, 3))))  # pad_left = 1
    assert (tall[:, 0] == 255).all() and (tall[:, 3:] == 255).all() and (tall[:, 1:3] == [1, 2, 3]).all()
    assert square_padding((2, 5)) == (5, 1, 0) and square_padding((5, 2)) == (5, 0, 1)


def test_clip_defaults_are_vit_l_336():
    ip = NextChatImageProcessor()
    assert ip.size == {"shortest_edge": 336} and ip.crop_size == {"height": 336, "width": 336}
    assert ip.resample == 3 and tuple(ip.image_mean) == OPENAI_CLIP_MEAN and tuple(ip.image_std) == OPENAI_CLIP_STD
    assert ip.sam_image_size == 1024 and tuple(ip.sam_pixel_mean) == SAM_PIXEL_MEAN


# ---------------------------------------------------------------------------------------------- SAM branch


def test_sam_sizes_by_hand():
    # scale = 64 / 40 = 1.6: 30 * 1.6 = 48 ; 1024 / 640 = 1.6: 427 * 1.6 + .5 = 683.7 -> 683
    assert sam_resized_size((30, 40), 64) == (48, 64)
    assert sam_padding((30, 40), 64) == (8, 0, 48, 64)
    assert sam_resized_size((427, 640), 1024) == (683, 1024)
    assert sam_padding((427, 640), 1024) == ((1024 - 683) // 2, 0, 683, 1024)
    assert sam_resized_size((10000, 3), 1024) == (1024, 1)  # never 0 wide
    assert sam_padding((640, 427), 1024) == (0, (1024 - 683) // 2, 1024, 683)


@pytest.mark.parametrize("hw", SIZES)
def test_sam_branch_matches_independent_torch_pipeline(hw):
    image = random_image(*hw, seed=1)
    out = small_processor()(image)["sam_pixel_values"][0]
    h, w = hw
    scale = 64 / max(h, w)
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    resized = torch.from_numpy(np.asarray(image.resize((nw, nh), PIL.Image.BILINEAR)).copy()).permute(2, 0, 1).float()
    normed = (resized - torch.tensor(SAM_PIXEL_MEAN)[:, None, None]) / torch.tensor(SAM_PIXEL_STD)[:, None, None]
    top, left = (64 - nh) // 2, (64 - nw) // 2
    expected = torch.nn.functional.pad(normed, (left, 64 - nw - left, top, 64 - nh - top), value=0.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("hw", [(300, 400), (400, 300), (333, 333), (17, 500)])
def test_box_round_trip_within_one_pixel(hw):
    h, w = hw
    rng = np.random.default_rng(2)
    xy1 = rng.uniform(0, 1, (50, 2)) * [w, h]
    xy2 = xy1 + rng.uniform(0, 1, (50, 2)) * ([w, h] - xy1)
    boxes = np.concatenate([xy1, xy2], 1)
    norm = boxes_to_square_frame(boxes, hw)
    assert norm.min() >= 0 and norm.max() <= 1
    back = boxes_from_square_frame(norm, hw)
    assert np.abs(back - boxes).max() < 1.0
    # through float32 (what the model sees) and a rounding to integer pixels
    back32 = boxes_from_square_frame(norm.astype(np.float32), hw)
    assert np.abs(np.round(back32) - np.round(boxes)).max() <= 1


def test_box_normalisation_by_hand():
    # landscape 400x300 (w x h): side 400, pad_top 50
    np.testing.assert_allclose(boxes_to_square_frame([[0, 0, 400, 300]], (300, 400)), [[0, 0.125, 1, 0.875]])
    # portrait 300x400: side 400, pad_left 50
    np.testing.assert_allclose(boxes_to_square_frame([[10, 20, 110, 220]], (400, 300)), [[0.15, 0.05, 0.4, 0.55]])
    # back with clipping to the image
    np.testing.assert_allclose(boxes_from_square_frame([[-0.1, 0.0, 1.2, 1.0]], (300, 400)), [[0, 0, 400, 300]])
    np.testing.assert_allclose(
        boxes_from_square_frame([[-0.1, 0.0, 1.2, 1.0]], (300, 400), clip=False), [[-40, -50, 480, 350]]
    )


def _red_rectangle_image(h, w, box):
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    arr[y1:y2, x1:x2] = (255, 0, 0)
    return PIL.Image.fromarray(arr)


@pytest.mark.parametrize("hw,box", [((120, 200), (30, 40, 90, 100)), ((200, 120), (10, 50, 100, 170)), ((150, 150), (60, 5, 140, 70))])
def test_sam_frame_and_clip_frame_hit_the_same_pixels(hw, box):
    """A red rectangle drawn on the image: its pixel box, normalised to the square frame, must cover the red
    pixels of the CLIP input (x crop size) and of the SAM input (x S), and agree with the exact SAM box."""
    h, w = hw
    ip = NextChatImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}, sam_image_size=128)
    out = ip(_red_rectangle_image(h, w, box), return_tensors="np")
    norm = boxes_to_square_frame([box], hw)[0]
    exact_sam = boxes_to_sam_frame([box], hw, 128)[0]
    assert np.abs(norm * 128 - exact_sam).max() <= 1 + 128 / max(h, w)

    def red_bbox(channels_first, mean, std, scale):
        img = channels_first.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
        img = img * scale
        red = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)
        ys, xs = np.nonzero(red)
        return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)

    clip_red = red_bbox(out["pixel_values"][0], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 255.0)
    assert np.abs(clip_red - norm * 112).max() <= 2
    sam_red = red_bbox(out["sam_pixel_values"][0], SAM_PIXEL_MEAN, SAM_PIXEL_STD, 1.0)
    assert np.abs(sam_red - norm * 128).max() <= 2
    assert np.abs(sam_red - exact_sam).max() <= 2


@pytest.mark.parametrize("hw", [(60, 100), (100, 60), (80, 80)])
def test_masks_to_sam_frame_align_with_sam_pixels_and_round_trip(hw):
    h, w = hw
    box = (w // 4, h // 5, 3 * w // 4, 4 * h // 5)
    mask = np.zeros(hw, dtype=bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    ip = small_processor(sam_image_size=64)
    sam_image = ip(_red_rectangle_image(h, w, box), return_tensors="np")["sam_pixel_values"][0]
    red = (sam_image[0] * SAM_PIXEL_STD[0] + SAM_PIXEL_MEAN[0]) > 127
    target = masks_to_sam_frame(mask[None], 64)[0]
    assert set(np.unique(target)) <= {0.0, 1.0}
    assert (red == (target > 0.5)).mean() > 0.98  # the same pixels as the image itself
    # back to the original resolution, from the full frame and from a 16x16 low-resolution logit map
    back = masks_from_sam_frame(torch.from_numpy(target * 2 - 1)[None], hw, 64)[0]
    assert back.shape == hw and back.dtype == bool
    iou = (back & mask).sum() / (back | mask).sum()
    assert iou > 0.9  # only the boundary pixels lost by the down-scaling differ

    def bbox(m):
        ys, xs = np.nonzero(m)
        return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])

    assert np.abs(bbox(back) - bbox(mask)).max() <= 2  # no shift: the inverse transform is aligned
    low = torch.nn.functional.interpolate(torch.from_numpy(target * 2 - 1)[None, None], (16, 16), mode="bilinear")[0]
    back_low = masks_from_sam_frame(low, hw, 64)[0]
    assert (back_low & mask).sum() / (back_low | mask).sum() > 0.8


# ---------------------------------------------------------------------------------------------- RLE


def test_rle_decode_hand_computed():
    # [[0, 1], [1, 1]] column-major -> 0 1 1 1 -> runs [1, 3] -> "13"
    np.testing.assert_array_equal(rle_decode({"size": [2, 2], "counts": "13"}), [[0, 1], [1, 1]])
    assert rle_encode(np.array([[0, 1], [1, 1]])) == {"size": [2, 2], "counts": "13"}
    # runs [1, 10, 2, 1]: the 4th run is stored as 1 - 10 = -9 -> chr(48 + (-9 & 31)) = "G"
    mask = rle_decode({"size": [2, 7], "counts": "1:2G"})
    flat = mask.T.reshape(-1)
    np.testing.assert_array_equal(flat, [0] + [1] * 10 + [0] * 2 + [1])
    # uncompressed counts
    np.testing.assert_array_equal(rle_decode({"size": [2, 7], "counts": [1, 10, 2, 1]}), mask)
    # runs [0, 2, 3, 5] on a 1 x 10 mask: "0233"
    np.testing.assert_array_equal(rle_decode({"size": [1, 10], "counts": "0233"})[0], [1, 1, 0, 0, 0, 1, 1, 1, 1, 1])


def test_rle_round_trip_and_errors():
    rng = np.random.default_rng(3)
    for h, w in [(1, 1), (5, 9), (40, 3), (64, 64)]:
        for density in (0.0, 0.1, 0.5, 1.0):
            mask = rng.uniform(size=(h, w)) < density
            np.testing.assert_array_equal(rle_decode(rle_encode(mask)), mask)
    with pytest.raises(ValueError, match="RLE"):
        rle_decode({"size": [2, 2], "counts": "14"})
    with pytest.raises(ValueError, match="size"):
        rle_decode({"counts": "13"})


# ---------------------------------------------------------------------------------------------- inputs


def _pixels(images, **kwargs):
    return small_processor()(images, return_tensors="np", **kwargs)


def test_modes_and_layouts_give_the_expected_pixels():
    rng = np.random.default_rng(4)
    grey = rng.integers(0, 256, (9, 13), dtype=np.uint8)
    rgb = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    ref_grey = _pixels(PIL.Image.fromarray(grey).convert("RGB"))["pixel_values"]
    ref_rgb = _pixels(PIL.Image.fromarray(rgb))["pixel_values"]
    same_as_grey = [
        PIL.Image.fromarray(grey, "L"),
        PIL.Image.fromarray(grey.astype(np.uint16) * 257),  # I;16
        PIL.Image.fromarray(grey.astype(np.int32)),  # I, 8-bit values
        PIL.Image.fromarray(grey.astype(np.float32) / 255),  # F in [0, 1]
        PIL.Image.fromarray(np.stack([grey, np.full_like(grey, 255)], -1), "LA"),  # opaque alpha
        grey,
        grey[..., None],
        grey.astype(np.uint16) * 257,
    ]
    for image in same_as_grey:
        np.testing.assert_allclose(_pixels(image)["pixel_values"], ref_grey, atol=1e-6, err_msg=str(type(image)))
    same_as_rgb = [
        rgb,
        rgb.transpose(2, 0, 1).copy(),
        torch.from_numpy(rgb.transpose(2, 0, 1).copy()),
        torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32) / 255),
        torch.from_numpy(rgb.astype(np.float64) / 255).permute(2, 0, 1),
        rgb.astype(np.float32) / 255,
        PIL.Image.fromarray(np.concatenate([rgb, np.full((9, 13, 1), 255, np.uint8)], -1), "RGBA"),
    ]
    for image in same_as_rgb:
        np.testing.assert_allclose(_pixels(image)["pixel_values"], ref_rgb, atol=1e-6)
    # CMYK and P go through PIL's own conversion
    cmyk = PIL.Image.fromarray(rgb).convert("CMYK")
    np.testing.assert_allclose(_pixels(cmyk)["pixel_values"], _pixels(cmyk.convert("RGB"))["pixel_values"])
    palette = PIL.Image.fromarray(rgb).convert("P")
    np.testing.assert_allclose(_pixels(palette)["pixel_values"], _pixels(palette.convert("RGB"))["pixel_values"])
    # fully transparent pixels become white (composited on white)
    transparent = PIL.Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    np.testing.assert_allclose(
        _pixels(transparent)["pixel_values"], _pixels(PIL.Image.new("RGB", (4, 4), "white"))["pixel_values"]
    )
    # ambiguous layout: numpy is channels-last, torch channels-first, unless told
    cube = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    assert _pixels(cube)["image_sizes"].tolist() == [[3, 5]]
    assert _pixels(torch.from_numpy(cube))["image_sizes"].tolist() == [[5, 3]]
    assert _pixels(cube, input_data_format="channels_first")["image_sizes"].tolist() == [[5, 3]]


def test_extreme_shapes():
    out = _pixels([PIL.Image.new("RGB", (1, 1), (0, 255, 0)), np.zeros((1, 1, 3), np.uint8)])
    assert out["pixel_values"].shape == (2, 3, 28, 28) and out["image_sizes"].tolist() == [[1, 1], [1, 1]]
    out = _pixels(PIL.Image.new("L", (3, 10000), 0))  # w=3, h=10000
    assert out["image_sizes"].tolist() == [[10000, 3]]
    assert out["sam_pixel_values"].shape == (1, 3, 64, 64)
    # the image is one column in the middle of SAM's white-free zero padding
    assert np.count_nonzero(np.abs(out["sam_pixel_values"][0, 0]).sum(0)) == 1


@pytest.mark.parametrize(
    "bad",
    [
        np.full((4, 4, 3), 2.0, np.float32),
        np.full((4, 4, 3), np.nan, np.float32),
        np.zeros((6, 6, 5), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
        np.zeros((4,), np.uint8),
        np.full((4, 4), 300, np.int32),
        "/nonexistent/image.png",
        12,
        [PIL.Image.new("RGB", (2, 2)), "not an image", 3],
    ],
)
def test_bad_images_raise_value_error_naming_the_argument(bad):
    with pytest.raises(ValueError, match="images"):
        small_processor()(bad)


def test_box_only_processor_has_no_sam():
    ip = small_processor(sam_image_size=None)
    out = ip(random_image(5, 6))
    assert "sam_pixel_values" not in out
    with pytest.raises(ValueError, match="sam_image_size"):
        ip(random_image(5, 6), return_sam_pixel_values=True)


def test_per_call_overrides_change_the_pixels_and_only_for_that_call():
    """ImagesKwargs-style overrides (`do_normalize`, `image_mean`, `size`, ...) act on one call, and equal a processor
    configured that way; the normalisation is checked against its inverse (independent algebra)."""
    ip = small_processor()
    image = random_image(11, 17)
    default = ip(image, return_tensors="np")
    raw = ip(image, return_tensors="np", do_normalize=False)["pixel_values"]
    mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)[:, None, None]
    np.testing.assert_allclose(default["pixel_values"] * std + mean, raw, atol=1e-6)
    unscaled = ip(image, return_tensors="np", do_rescale=False, do_normalize=False)["pixel_values"]
    np.testing.assert_allclose(unscaled / 255, raw, atol=1e-6)
    assert np.all(unscaled == np.round(unscaled)) and unscaled.max() > 1
    for overrides in (
        {"image_mean": 0.5, "image_std": 0.25},
        {"size": 14, "crop_size": 14},
        {"do_center_crop": False, "size": {"height": 20, "width": 10}},
        {"sam_image_size": 32, "sam_pixel_mean": [0, 0, 0]},
        {"do_pad_to_square": False, "resample": PIL.Image.NEAREST},
    ):
        out = ip(image, return_tensors="np", **overrides)
        configured = small_processor(**overrides)(image, return_tensors="np")
        for key in ("pixel_values", "sam_pixel_values", "image_sizes"):
            np.testing.assert_array_equal(out[key], configured[key])
    # nothing stuck to the processor
    np.testing.assert_array_equal(ip(image, return_tensors="np")["pixel_values"], default["pixel_values"])
    assert ip(image, return_tensors="np", do_normalize=None)["pixel_values"].tobytes() == default["pixel_values"].tobytes()
    with pytest.raises(ValueError, match="do_pad"):
        ip(image, do_pad=True)
    with pytest.raises(ValueError, match="device"):
        ip(image, device="cuda")
    with pytest.raises(ValueError, match="unknown"):
        ip(image, do_magic=True)


# ---------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    ip = small_processor(pad_color=(1, 2, 3), sam_image_size=48)
    ip.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "NextChatImageProcessor" and saved["sam_image_size"] == 48
    loaded = NextChatImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == ip.to_dict()
    image = random_image(11, 17)
    for key in ("pixel_values", "sam_pixel_values", "image_sizes"):
        torch.testing.assert_close(loaded(image)[key], ip(image)[key])


@pytest.mark.skipif(not FIXTURE.exists(), reason="shared fixture not available")
def test_from_clip_image_processor_dict_of_the_fixture():
    clip = json.loads((FIXTURE / "clip_vision_tower" / "preprocessor_config.json").read_text())
    ip = NextChatImageProcessor.from_clip_image_processor_dict(clip, sam_image_size=64)
    assert ip.size == {"shortest_edge": 56} and ip.crop_size == {"height": 56, "width": 56} and ip.resample == 3
    assert ip(random_image(20, 30))["pixel_values"].shape == (1, 3, 56, 56)
