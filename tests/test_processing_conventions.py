"""NextChatProcessor follows transformers' processor conventions: grouped/flat kwargs merged by
`ProcessorMixin._merge_kwargs`, per-call image-processor overrides, `apply_chat_template` with transformers'
defaults and options (assistant masks included), and `model_input_names` = what `__call__` returns."""

import dataclasses
import inspect

import numpy as np
import PIL.Image
import pytest
import torch

from nextchat.processing import NextChatProcessor
from nextchat.processing.processing_nextchat import NextChatProcessorKwargs
from tiny_models import tiny_processor


@pytest.fixture(scope="module")
def proc():
    return tiny_processor()


def _image(height=30, width=40, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


IMG = _image()  # w=40, h=30 -> square side 40, pad_top 5
TEXT = "USER: <image> What is [0]? ASSISTANT: a cat [0].</s>"
BOXES = [[1, 2, 30, 20]]


# ------------------------------------------------------------------------------------------------ kwargs


def test_kwargs_class_and_defaults(proc):
    assert NextChatProcessor.valid_processor_kwargs is NextChatProcessorKwargs
    defaults = NextChatProcessorKwargs._defaults
    assert defaults["text_kwargs"]["padding"] is True and defaults["text_kwargs"]["return_tensors"] == "pt"
    # transformers' own merge gives those defaults (and the tokenizer's padding side) to a call without options
    merged = proc._merge_kwargs(NextChatProcessorKwargs, tokenizer_init_kwargs=proc.tokenizer.init_kwargs)
    assert merged["text_kwargs"]["padding"] is True and merged["text_kwargs"]["return_tensors"] == "pt"
    assert merged["text_kwargs"]["padding_side"] == proc.tokenizer.padding_side


@pytest.mark.parametrize(
    "overrides",
    [
        {"do_normalize": False},
        {"do_rescale": False, "do_normalize": False},
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]},
        {"size": {"shortest_edge": 14}, "crop_size": {"height": 14, "width": 14}},
        {"resample": 0},
        {"pad_color": [0, 0, 0]},
        {"sam_pixel_mean": [0.0, 0.0, 0.0], "sam_pixel_std": [1.0, 1.0, 1.0]},
    ],
)
def test_images_kwargs_change_the_pixels_like_the_image_processor(proc, overrides):
    grouped = proc(images=IMG, text="<image> hi", images_kwargs=overrides)
    flat = proc(images=IMG, text="<image> hi", **overrides)
    direct = proc.image_processor(IMG, return_tensors="pt", **overrides)
    default = proc.image_processor(IMG, return_tensors="pt")
    changed = False
    for key in ("pixel_values", "sam_pixel_values"):
        torch.testing.assert_close(grouped[key], direct[key], rtol=0, atol=0)
        torch.testing.assert_close(flat[key], direct[key], rtol=0, atol=0)
        changed |= direct[key].shape != default[key].shape or not torch.equal(direct[key], default[key])
    assert changed, f"{overrides} changed nothing: the test would prove nothing"
    # the processor's own configuration is untouched
    torch.testing.assert_close(proc(images=IMG, text="<image> hi")["pixel_values"], default["pixel_values"])


def test_images_kwargs_against_hand_computed_pixels(proc):
    """No resize, crop, rescale or normalisation: pixel_values is the white-padded square image itself."""
    options = {"do_resize": False, "do_center_crop": False, "do_rescale": False, "do_normalize": False}
    out = proc(images=IMG, text="<image> hi", images_kwargs=options)
    square = np.full((40, 40, 3), 255, dtype=np.float32)
    square[5:35] = np.asarray(IMG, dtype=np.float32)
    np.testing.assert_array_equal(out["pixel_values"][0].numpy(), square.transpose(2, 0, 1))
    # rescale only: the same divided by 255 (float32 arithmetic of the rescale step)
    out = proc(images=IMG, text="<image> hi", images_kwargs={**options, "do_rescale": True})
    expected = (square.astype(np.uint8) * np.float32(1 / 255)).astype(np.float32)
    np.testing.assert_allclose(out["pixel_values"][0].numpy(), expected.transpose(2, 0, 1), rtol=0, atol=1e-7)


def test_return_sam_pixel_values_as_an_images_kwarg(proc):
    for out in (
        proc(images=IMG, text="<image> hi", images_kwargs={"return_sam_pixel_values": False}),
        proc(images=IMG, text="<image> hi", return_sam_pixel_values=False),
    ):
        assert "sam_pixel_values" not in out and "pixel_values" in out


def test_text_kwargs_and_common_kwargs_follow_transformers_precedence(proc):
    old_way = proc(images=IMG, text=TEXT, boxes=BOXES, padding="max_length", max_length=40)
    grouped = proc(images=IMG, text=TEXT, boxes=BOXES, text_kwargs={"padding": "max_length", "max_length": 40})
    assert grouped["input_ids"].shape == (1, 40)
    for key in old_way:
        torch.testing.assert_close(grouped[key], old_way[key])
    # common_kwargs reach every modality
    out = proc(images=IMG, text=TEXT, boxes=BOXES, common_kwargs={"return_tensors": "np"})
    assert all(isinstance(v, np.ndarray) for v in out.values())
    np.testing.assert_array_equal(out["input_ids"], old_way["input_ids"][:, : out["input_ids"].shape[1]].numpy())
    # modality-specific beats common (transformers' order 2 over 3), whatever _merge_kwargs says
    kwargs = {"text_kwargs": {"return_tensors": "np"}, "common_kwargs": {"return_tensors": "pt"}}
    merged = proc._merge_kwargs(NextChatProcessorKwargs, tokenizer_init_kwargs=proc.tokenizer.init_kwargs, **kwargs)
    assert merged["text_kwargs"]["return_tensors"] == "np"
    out = proc(images=IMG, text=TEXT, boxes=BOXES, **kwargs)
    assert isinstance(out["input_ids"], np.ndarray)
    # a flat argument overrides the tokenizer's init argument (padding_side) as in transformers
    left = proc(text=["hi", "a longer text"], padding_side="left")
    assert left["attention_mask"][0, 0] == 0 and left["attention_mask"][0, -1] == 1
    left_grouped = proc(text=["hi", "a longer text"], text_kwargs={"padding_side": "left"})
    torch.testing.assert_close(left_grouped["input_ids"], left["input_ids"])
    with pytest.raises(ValueError, match="two times"):
        proc(text="hi", padding=True, text_kwargs={"padding": True})


def test_more_text_kwargs(proc):
    ref = proc(text=["hi", "a longer text"])
    out = proc(text=["hi", "a longer text"], pad_to_multiple_of=8)
    length = ref["input_ids"].shape[1]
    target = -(-length // 8) * 8
    assert out["input_ids"].shape[1] == target
    torch.testing.assert_close(out["input_ids"][:, :length], ref["input_ids"])
    assert (out["attention_mask"][:, length:] == 0).all()
    out = proc(text="hi", return_attention_mask=False)
    assert "attention_mask" not in out and "input_ids" in out
    with pytest.raises(ValueError, match="stride"):
        proc(text="hi", stride=2)


def test_offset_mapping(proc):
    text = "USER: <image> the cat [0], ok?</s>"
    out = proc(images=IMG, text=text, boxes=BOXES, return_offsets_mapping=True, return_tensors="np")
    ids, offsets = out["input_ids"][0].tolist(), out["offset_mapping"][0].tolist()
    tokens = proc.tokenizer.convert_ids_to_tokens(ids)
    image_at = text.index("<image>")
    ref_at = text.index("[0]")
    for tid, token, (s, e) in zip(ids, tokens, offsets):
        if tid in (proc.image_token_id, proc.image_start_token_id, proc.image_end_token_id):
            assert (s, e) == (image_at, image_at + len("<image>"))
        elif tid in (proc.trigger_token_id, proc.box_token_id):
            assert (s, e) == (ref_at, ref_at + 3)
        elif tid == proc.tokenizer.eos_token_id:
            assert text[s:e] == "</s>"
        elif tid == proc.tokenizer.bos_token_id:
            assert (s, e) == (0, 0)
        else:  # a text token covers exactly its characters (the dummy prefix of the first one excepted)
            assert token.replace("\u2581", " ").lstrip() == text[s:e].lstrip(), (token, text[s:e])


def test_unknown_options_raise(proc):
    with pytest.raises(ValueError, match="foo"):
        proc(text="hi", images_kwargs={"foo": 1})
    with pytest.raises(ValueError, match="foo"):
        proc(text="hi", text_kwargs={"foo": 1})
    with pytest.raises(ValueError, match="do_pad"):
        proc(images=IMG, text="<image> hi", do_pad=True)
    with pytest.raises(ValueError, match="image_seq_length"):
        proc(images=IMG, text="<image> hi", image_seq_length=proc.image_seq_length + 1)


# ------------------------------------------------------------------------------------------------ chat template


CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the cat [0]?"}]},
    {"role": "assistant", "content": "The cat [0] is at [1]."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "Here [1]."},
]
CHAT_BOXES = [[0, 0, 5, 5], [1, 1, 9, 9]]


def _with_image(conversation, image):
    out = [dict(m) for m in conversation]
    out[0] = {**out[0], "content": [{"type": "image", "image": image}] + list(out[0]["content"][1:])}
    return out


def test_apply_chat_template_defaults_are_transformers(proc):
    conversation = _with_image(CONVERSATION[:1], IMG)
    text = proc.apply_chat_template(conversation, add_generation_prompt=True)
    assert isinstance(text, str) and text.endswith("ASSISTANT:")
    ref = proc(images=IMG, text=text, boxes=CHAT_BOXES[:1])
    # tokenize=True alone returns the input_ids (transformers' return_dict=False)
    ids = proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, boxes=CHAT_BOXES[:1])
    torch.testing.assert_close(ids, ref["input_ids"])
    out = proc.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
        processor_kwargs={"boxes": CHAT_BOXES[:1]},
    )
    assert set(out) == set(ref)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key])


def test_apply_chat_template_message_objects_and_image_paths(proc, tmp_path):
    @dataclasses.dataclass
    class Message:
        role: str
        content: object

    objects = [Message(m["role"], m["content"]) for m in CONVERSATION]
    assert proc.apply_chat_template(objects) == proc.apply_chat_template(CONVERSATION)
    path = tmp_path / "img.png"
    IMG.save(path)
    conversation = [dict(m) for m in CONVERSATION]
    parts = [{"type": "image", "path": str(path)}, conversation[0]["content"][1]]
    conversation[0] = {**conversation[0], "content": parts}
    out = proc.apply_chat_template(conversation, tokenize=True, return_dict=True, boxes=CHAT_BOXES)
    ref = proc(images=IMG, text=proc.apply_chat_template(CONVERSATION), boxes=CHAT_BOXES)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key])


def test_apply_chat_template_passes_template_variables(proc):
    template = (
        "{{ greeting }}{% for m in messages %} {{ m['role'] }}: {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    text = proc.apply_chat_template(
        [{"role": "user", "content": "hi"}], chat_template=template, greeting="Hello there.", add_generation_prompt=True
    )
    assert text == "Hello there. user: hi ASSISTANT:"


def test_apply_chat_template_continue_final_message(proc):
    conversation = CONVERSATION[:1] + [{"role": "assistant", "content": "The cat is at"}]
    text = proc.apply_chat_template(conversation, continue_final_message=True)
    assert text.endswith("ASSISTANT: The cat is at")
    ids = proc.apply_chat_template(
        _with_image(conversation, IMG), continue_final_message=True, tokenize=True, boxes=CHAT_BOXES[:1]
    )
    torch.testing.assert_close(ids, proc(images=IMG, text=text, boxes=CHAT_BOXES[:1])["input_ids"])
    assert ids[0, -1] != proc.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="continue_final_message"):
        proc.apply_chat_template(conversation, continue_final_message=True, add_generation_prompt=True)


def _expected_assistant_mask(proc, input_ids, labels):
    """Reference from the processor's own training labels: every labelled token, plus the <boxes> that follows
    a labelled <at> (a <boxes> position is never a target, but it is assistant content)."""
    expected = labels != -100
    after_target_trigger = torch.zeros_like(expected)
    after_target_trigger[:, 1:] = (labels[:, :-1] == proc.trigger_token_id) & (input_ids[:, 1:] == proc.box_token_id)
    return (expected | after_target_trigger).long()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_return_assistant_tokens_mask_covers_exactly_the_assistant_turns(proc, padding_side):
    short = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is [0]?"}]},
             {"role": "assistant", "content": "A cat."}]
    batch = [_with_image(CONVERSATION, IMG), _with_image(short, _image(seed=1))]
    boxes = [CHAT_BOXES, CHAT_BOXES[:1]]
    out = proc.apply_chat_template(
        batch, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt",
        processor_kwargs={"boxes": boxes, "return_labels": True, "padding_side": padding_side},
    )
    mask = torch.as_tensor(out["assistant_masks"])
    expected = _expected_assistant_mask(proc, out["input_ids"], out["labels"])
    assert mask.shape == out["input_ids"].shape and mask.sum() > 0
    torch.testing.assert_close(mask, expected)
    assert "offset_mapping" not in out  # transformers pops it


def test_vicuna_template_marks_generation(proc):
    assert "{%- generation -%}" in proc.chat_template and "{%- endgeneration -%}" in proc.chat_template


# ------------------------------------------------------------------------------------------------ model_input_names


@pytest.mark.parametrize("sam", [64, None])
def test_model_input_names_are_the_call_outputs_the_model_consumes(sam):
    processor = tiny_processor(sam_image_size=sam)
    out = processor(images=IMG, text="<image> What is [0]?", boxes=BOXES)
    assert list(out) == processor.model_input_names
    assert list(processor(text=["hi", "<image> b"], images=[None, IMG])) == processor.model_input_names
    assert "labels" not in processor.model_input_names and "mask_targets" not in processor.model_input_names
    from nextchat import NextChatForConditionalGeneration

    forward = inspect.signature(NextChatForConditionalGeneration.forward).parameters
    assert all(name in forward for name in processor.model_input_names)
