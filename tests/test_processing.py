"""Tests of NextChatProcessor: tokenisation parity, image blocks, box references, labels, batching, truncation,
chat template, masks, save/load, post-processing, drawing, and a hypothesis fuzz of the whole call."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nextchat.processing import (
    NextChatImageProcessor,
    NextChatProcessor,
    boxes_to_square_frame,
    draw_grounding,
    escape_text,
    masks_to_sam_frame,
    rle_encode,
)
from nextchat.processing.processing_nextchat import VICUNA_V1_1_SYSTEM
from nextchat.remote_code import REMOTE_CODE_MODULES, flatten_imports
from tiny_models import tiny_processor


FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "original_tiny"
needs_fixture = pytest.mark.skipif(not FIXTURE.exists(), reason="shared fixture not available")


@pytest.fixture(scope="module")
def proc():
    return tiny_processor()


@pytest.fixture(scope="module")
def fixture_proc():
    if not FIXTURE.exists():
        pytest.skip("shared fixture not available")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURE)
    clip = json.loads((FIXTURE / "clip_vision_tower" / "preprocessor_config.json").read_text())
    image_processor = NextChatImageProcessor.from_clip_image_processor_dict(clip, sam_image_size=64)
    return NextChatProcessor(image_processor, tokenizer, image_seq_length=16)


def sp_reference(model_file):
    """Independent reference of the original tokenisation: SentencePiece itself, with and without the dummy
    prefix (the latter from a copy of the model whose normaliser has add_dummy_prefix=False)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    with_prefix = spm.SentencePieceProcessor(model_file=str(model_file))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    without_prefix = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return with_prefix, without_prefix


def reference_ids(segments, sp_pair, ids, n_patches, bos=1):
    """Original rule (reference §4.2) from a list of segments: ("text", s) | ("image",) | ("pair",) | ("eos",).
    Whitespace around image blocks and <at> <boxes> pairs is stripped; only the first text gets the prefix."""
    with_prefix, without_prefix = sp_pair
    merged = []
    for seg in segments:  # adjacent texts are one chunk
        if seg[0] == "text" and merged and merged[-1][0] == "text":
            merged[-1] = ("text", merged[-1][1] + seg[1])
        else:
            merged.append(seg)
    segments = merged
    out = [bos]
    first = True
    for k, seg in enumerate(segments):
        if seg[0] == "text":
            text = seg[1]
            if k > 0 and segments[k - 1][0] in ("image", "pair"):
                text = text.lstrip()
            if k + 1 < len(segments) and segments[k + 1][0] in ("image", "pair"):
                text = text.rstrip()
            if text:
                out += (with_prefix if first else without_prefix).encode(text)
                first = False
        elif seg[0] == "image":
            out += [ids["image_start_token_id"]] + [ids["image_token_id"]] * n_patches + [ids["image_end_token_id"]]
            first = False
        elif seg[0] == "pair":
            out += [ids["trigger_token_id"], ids["box_token_id"]]
            first = False
        else:
            out.append(2)
            first = False
    return out


def render(segments):
    parts = []
    for seg in segments:
        if seg[0] == "text":
            parts.append(escape_text(seg[1]))
        elif seg[0] == "image":
            parts.append("<image>")
        elif seg[0] == "pair":
            parts.append("[0]")
        else:
            parts.append("</s>")
    return "".join(parts)


IMG = PIL.Image.new("RGB", (40, 30), (90, 20, 200))  # w=40, h=30 -> square side 40, pad_top 5


# ---------------------------------------------------------------------------------------------- tokenisation


@needs_fixture
def test_golden_structure_with_the_fixture_tokenizer(fixture_proc):
    """Reference §4.2 facts that the fixture tokenizer can reproduce: BOS, system prompt, `USER:` directly followed
    by <im_start> (no lone `▁`), N x <im_patch>, <im_end>, question without prefix, `ASSISTANT:`, answer
    `▁Answer` `:` <at> <boxes> `.` (no `▁.`) `</s>`, labels only on the answer (and never on <boxes>)."""
    sp = sp_reference(FIXTURE / "tokenizer.model")
    text = (
        f"{VICUNA_V1_1_SYSTEM} USER: <image> Where is the dog in the image? ASSISTANT: Answer: [0] .</s>"
    )
    out = fixture_proc(images=IMG, text=text, boxes=[[1, 2, 30, 20]], return_labels=True)
    ids = out["input_ids"][0].tolist()
    tok = fixture_proc.tokenizer
    special = fixture_proc.special_token_ids
    assert special == {
        "image_token_id": 128,
        "image_start_token_id": 129,
        "image_end_token_id": 130,
        "trigger_token_id": 131,
        "box_token_id": 132,
    }
    expected = (
        [1]
        + sp[0].encode(f"{VICUNA_V1_1_SYSTEM} USER:")
        + [129]
        + [128] * 16
        + [130]
        + sp[1].encode("Where is the dog in the image? ASSISTANT: Answer:")
        + [131, 132]
        + sp[1].encode(".")
        + [2]
    )
    assert ids == expected
    start = ids.index(129)
    assert tok.convert_ids_to_tokens(ids[start - 1]) == ":"  # no `▁` between `USER:` and <im_start>
    assert ids[start + 17] == 130
    assert ids[-3] == 132 and tok.convert_ids_to_tokens(ids[-2]) == "."  # `.`, not `▁.`
    labels = out["labels"][0].tolist()
    answer = sp[1].encode(" Answer:")  # `▁Answer:` as it follows `ASSISTANT:` in the same chunk
    n_target = len(answer) + 4
    assert labels[-n_target:] == ids[-n_target:-3] + [-100] + ids[-2:]
    assert all(v == -100 for v in labels[:-n_target])
    assert ids[-n_target:-4] == answer


@needs_fixture
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(
            # (a text ending with a backslash right before a live reference would escape it: documented)
            st.tuples(
                st.just("text"),
                st.text(alphabet="ab cé漢<>/[]\\\n.:?ASUER_tmpx", max_size=12).filter(lambda t: not t.endswith("\\")),
            ),
            st.just(("pair",)),
            st.just(("eos",)),
        ),
        max_size=6,
    ),
    st.booleans(),
)
def test_tokenisation_parity_with_sentencepiece_fuzz(fixture_proc, segments, with_image):
    """Any text (control-token strings included, escaped brackets, unknown characters) encodes exactly as the
    original rule applied with SentencePiece itself."""
    sp = sp_reference(FIXTURE / "tokenizer.model")
    segments = list(segments)
    with_image = with_image or any(s[0] == "pair" for s in segments)  # boxes need an image
    if with_image:
        segments.insert(len(segments) // 2, ("image",))
    n_pairs = sum(1 for s in segments if s[0] == "pair")
    out = fixture_proc(
        images=IMG if with_image else None,
        text=render(segments),
        boxes=[[0, 0, 4, 4]] if n_pairs else None,
    )
    expected = reference_ids(segments, sp, fixture_proc.special_token_ids, 16)
    assert out["input_ids"][0].tolist() == expected
    assert int(out["box_inputs_mask"].sum()) == n_pairs


def test_tiny_processor_matches_its_configured_tokenizer_and_sentencepiece(proc, tmp_path):
    """The tiny tokenizer is configured like a modern LLaMA tokenizer (legacy=False, added tokens stripped):
    its own ids agree with the processor's on text with control tokens, and with SentencePiece."""
    text = f"{VICUNA_V1_1_SYSTEM} USER: <image> What is region [0]? ASSISTANT: A man [0] riding a horse .</s>"
    out = proc(images=IMG, text=text, boxes=[[1, 2, 10, 20]])
    manual = text.replace("<image>", "<im_start>" + "<im_patch>" * 4 + "<im_end>").replace("[0]", "<at> <boxes>")
    assert out["input_ids"][0].tolist() == proc.tokenizer(manual).input_ids
    proc.tokenizer.save_pretrained(tmp_path)
    import sentencepiece  # noqa: F401

    sp = sp_reference(tmp_path / "tokenizer.model") if (tmp_path / "tokenizer.model").exists() else None
    if sp is not None:
        segments = [("text", f"{VICUNA_V1_1_SYSTEM} USER:"), ("image",), ("text", "What is region"), ("pair",)]
        segments += [("text", "? ASSISTANT: A man"), ("pair",), ("text", "riding a horse ."), ("eos",)]
        assert out["input_ids"][0].tolist() == reference_ids(segments, sp, proc.special_token_ids, 4)


def test_tiny_processor_is_deterministic_and_fast():
    import time

    start = time.perf_counter()
    a = tiny_processor()
    assert time.perf_counter() - start < 2.0
    b = tiny_processor()
    text = "USER: <image> hello [0] world ASSISTANT:"
    assert a(images=IMG, text=text, boxes=[[0, 0, 5, 5]])["input_ids"].tolist() == b(
        images=IMG, text=text, boxes=[[0, 0, 5, 5]]
    )["input_ids"].tolist()
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def test_token_strings_default_to_the_registry_and_an_unknown_one_is_named(proc):
    from nextchat.configuration.configuration_nextchat import NEXTCHAT_SPECIAL_TOKENS

    vocab = proc.tokenizer.get_vocab()
    for field, token in NEXTCHAT_SPECIAL_TOKENS.items():
        assert getattr(proc, field.removesuffix("_id")) == token
        assert proc.special_token_ids[field] == vocab[token]
    with pytest.raises(ValueError, match=r"`trigger_token`='<nope>' is not a token of the tokenizer; .* added tokens "
                       r"<im_patch>, <im_start>, <im_end>, <at>, <boxes>$"):
        NextChatProcessor(proc.image_processor, proc.tokenizer, image_seq_length=4, trigger_token="<nope>")


# ---------------------------------------------------------------------------------------------- control tokens


def test_typed_control_tokens_are_escaped(proc):
    ids_of = proc.special_token_ids
    text = "USER: <image> look <at> <boxes> <im_patch><im_start><im_end> \\[0] \\<image> ASSISTANT:"
    out = proc(images=IMG, text=text)
    ids = out["input_ids"][0].tolist()
    assert ids.count(ids_of["trigger_token_id"]) == 0 and ids.count(ids_of["box_token_id"]) == 0
    assert ids.count(ids_of["image_token_id"]) == 4 and ids.count(ids_of["image_start_token_id"]) == 1
    decoded = proc.tokenizer.decode(ids[ids.index(ids_of["image_end_token_id"]) + 1 :])
    assert "<at>" in decoded and "<im_patch>" in decoded and "[0]" in decoded and "<image>" in decoded
    assert out["box_inputs"].shape == (1, 0, 4)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet="ab [],0123\\<>/image s", max_size=30))
def test_escape_text_makes_any_text_literal(proc, text):
    """escape_text(s) is read back as exactly the plain text s (no image, no reference, no eos)."""
    out = proc(text=escape_text(text), add_special_tokens=False)
    ids = out["input_ids"][0].tolist()
    plain, _ = proc._encoder.encode(text, prefix=True)
    assert ids == plain


# ---------------------------------------------------------------------------------------------- boxes


def test_boxes_normalised_and_ordered_by_appearance(proc):
    boxes = [[0, 0, 40, 30], [10, 5, 20, 15], [1, 2, 3, 4]]
    out = proc(images=IMG, text="<image> [2] and [0,1] then [2,]", boxes=boxes)
    expected = boxes_to_square_frame(np.array(boxes)[[2, 0, 1, 2]], (30, 40))
    np.testing.assert_allclose(out["box_inputs"][0].numpy(), expected, atol=1e-7)
    # hand-computed: side 40, pad_top 5
    np.testing.assert_allclose(out["box_inputs"][0, 1].numpy(), [0, 5 / 40, 1, 35 / 40])
    ids = out["input_ids"][0].tolist()
    assert ids.count(proc.trigger_token_id) == 4 == ids.count(proc.box_token_id)
    t = [i for i, v in enumerate(ids) if v == proc.trigger_token_id]
    assert all(ids[i + 1] == proc.box_token_id for i in t)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(text="<image> [1]", boxes=[[0, 0, 1, 1]]), "boxes"),  # reference to a missing box
        (dict(text="<image> [0]", boxes=[[0, 0, 1, 1], [0, 0, 2, 2]]), "never refers"),  # unreferenced box
        (dict(text="<image> [0]", boxes=[[5, 0, 1, 1]]), "inverted"),
        (dict(text="<image> [0]", boxes=[[float("nan"), 0, 1, 1]]), "NaN"),
        (dict(text="<image> [0]", boxes=[[0, 0, 41, 10]]), "leaves the image"),
        (dict(text="<image> [0]", boxes=[0, 0, 1, 1]), "boxes"),  # flat box
        (dict(text="<image> [0]", boxes=None), "boxes"),
        (dict(text="hello", boxes=None), "placeholder"),  # image without <image>
        (dict(text="<image> <image>", boxes=None), "placeholder"),
        (dict(text=["<image> a", "<image> b"], boxes=None), "images"),  # 1 image for 2 texts
        (dict(text="<image> a", images=[IMG, IMG]), "images"),
        (dict(text="<image> a", return_tensors="tf"), "return_tensors"),
        (dict(text="<image> a", foo=1), "foo"),
        (dict(text=None), "text"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(proc, kwargs, match):
    kwargs = dict(kwargs)
    kwargs.setdefault("images", IMG)
    with pytest.raises(ValueError, match=match):
        proc(**kwargs)


def test_boxes_without_image_and_clip_boxes(proc):
    with pytest.raises(ValueError, match="without an image"):
        proc(text="[0]", boxes=[[0, 0, 1, 1]])
    out = proc(images=IMG, text="<image> [0]", boxes=[[-5, -5, 50, 10]], clip_boxes=True)
    np.testing.assert_allclose(out["box_inputs"][0, 0].numpy(), boxes_to_square_frame([[0, 0, 40, 10]], (30, 40))[0])


# ---------------------------------------------------------------------------------------------- labels


def test_labels_are_exactly_the_assistant_turns(proc):
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the cat [0]?"}]},
        {"role": "assistant", "content": "It is here [1] ."},
        {"role": "user", "content": "And the ASSISTANT: dog?"},
        {"role": "assistant", "content": "Answer: [2] ."},
    ]
    text = proc.apply_chat_template(conversation)
    out = proc(images=IMG, text=text, boxes=[[0, 0, 5, 5], [1, 1, 6, 6], [2, 2, 7, 7]], return_labels=True)
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    runs, current = [], []
    for i, (tid, lab) in enumerate(zip(ids, labels)):
        if lab != -100:
            assert lab == tid
            current.append(i)
        elif current and tid != proc.box_token_id:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert len(runs) == 2  # two assistant turns (a <boxes> inside a turn does not split it)
    for run, answer in zip(runs, ["It is here [1] .", "Answer: [2] ."]):
        span = list(range(run[0], run[-1] + 1))
        assert ids[span[-1]] == proc.tokenizer.eos_token_id
        decoded = proc.tokenizer.decode([ids[i] for i in span])
        assert decoded.replace(" ", "") == answer.replace(" ", "").replace("[1]", "<at><boxes>").replace("[2]", "<at><boxes>") + "</s>"
        for i in span:
            if ids[i] == proc.box_token_id:
                assert labels[i] == -100
            elif ids[i] == proc.trigger_token_id:
                assert labels[i] == proc.trigger_token_id
    # the user's <at> (box [0]) is not a target
    first_trigger = ids.index(proc.trigger_token_id)
    assert labels[first_trigger] == -100
    # a generation prompt has no targets
    prompt = proc.apply_chat_template(conversation[:1], add_generation_prompt=True)
    out = proc(images=IMG, text=prompt, boxes=[[0, 0, 5, 5]], return_labels=True)
    assert (out["labels"] == -100).all()


# ---------------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_per_sample_results(proc, side):
    samples = [
        dict(images=IMG, text="USER: <image> what is [0] ? ASSISTANT: a cat [1] .</s>", boxes=[[0, 0, 5, 5], [1, 2, 3, 4]]),
        dict(images=None, text="USER: hello there, a much longer text than the others ASSISTANT: hi</s>", boxes=None),
        dict(images=PIL.Image.new("L", (9, 21)), text="USER: <image> ok ASSISTANT: [0]</s>", boxes=[[0, 0, 9, 21]]),
    ]
    batch = proc(
        images=[s["images"] for s in samples],
        text=[s["text"] for s in samples],
        boxes=[s["boxes"] for s in samples],
        return_labels=True,
        padding_side=side,
    )
    length = batch["input_ids"].shape[1]
    assert batch["pixel_values"].shape[0] == 2 and batch["sam_pixel_values"].shape[0] == 3
    assert batch["image_sizes"].tolist() == [[30, 40], [0, 0], [21, 9]]
    assert not batch["sam_pixel_values"][1].any()
    image_index = 0
    for b, sample in enumerate(samples):
        one = proc(**sample, return_labels=True)
        n = one["input_ids"].shape[1]
        sl = slice(length - n, length) if side == "left" else slice(0, n)
        pad = slice(0, length - n) if side == "left" else slice(n, length)
        assert batch["input_ids"][b, sl].tolist() == one["input_ids"][0].tolist()
        assert batch["labels"][b, sl].tolist() == one["labels"][0].tolist()
        assert batch["attention_mask"][b, sl].all() and not batch["attention_mask"][b, pad].any()
        assert (batch["labels"][b, pad] == -100).all()
        assert (batch["input_ids"][b, pad] == proc.tokenizer.pad_token_id).all()
        k = int(one["box_inputs_mask"].sum())
        assert batch["box_inputs_mask"][b].tolist() == [True] * k + [False] * (batch["box_inputs"].shape[1] - k)
        torch.testing.assert_close(batch["box_inputs"][b, :k], one["box_inputs"][0, :k])
        if sample["images"] is not None:
            torch.testing.assert_close(batch["pixel_values"][image_index], one["pixel_values"][0])
            torch.testing.assert_close(batch["sam_pixel_values"][b], one["sam_pixel_values"][0])
            image_index += 1


# ---------------------------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_never_cuts_an_image_block_or_a_pair(proc, side):
    text = "USER: <image> the cat [0] and the dogs [1,2] ASSISTANT: ok [0] .</s>"
    boxes = [[0, 0, 5, 5], [1, 1, 6, 6], [2, 2, 7, 7]]
    full = proc(images=IMG, text=text, boxes=boxes)["input_ids"][0].tolist()
    n_patch = proc.image_seq_length
    for max_length in range(1, len(full) + 2):
        try:
            out = proc(images=IMG, text=text, boxes=boxes, truncation=True, max_length=max_length, truncation_side=side)
        except ValueError as err:
            assert "max_length" in str(err)
            continue
        ids = out["input_ids"][0].tolist()
        assert len(ids) <= max_length and ids[0] == 1
        start = ids.index(proc.image_start_token_id)
        assert ids[start + 1 : start + 1 + n_patch] == [proc.image_token_id] * n_patch
        assert ids[start + 1 + n_patch] == proc.image_end_token_id
        triggers = [i for i, v in enumerate(ids) if v == proc.trigger_token_id]
        assert all(i + 1 < len(ids) and ids[i + 1] == proc.box_token_id for i in triggers)
        assert ids.count(proc.box_token_id) == int(out["box_inputs_mask"].sum()) == len(triggers)
        # what remains is a contiguous piece of the full sequence (BOS kept)
        rest = ids[1:]
        if side == "right":
            assert ids == full[: len(ids)]
        else:
            assert full[len(full) - len(rest) :] == rest
    with pytest.raises(ValueError, match="max_length"):
        proc(images=IMG, text=text, boxes=boxes, truncation=True, max_length=3)


def test_append_trigger(proc):
    out = proc(images=IMG, text="USER: <image> where is the cat? ASSISTANT: Answer: ", append_trigger=True)
    ids = out["input_ids"][0].tolist()
    assert ids[-1] == proc.trigger_token_id and out["box_inputs"].shape[1] == 0
    plain = proc(images=IMG, text="USER: <image> where is the cat? ASSISTANT: Answer:")["input_ids"][0].tolist()
    assert ids[:-1] == plain


# ---------------------------------------------------------------------------------------------- masks


def test_mask_targets_from_arrays_and_rle(proc):
    mask0 = np.zeros((30, 40), dtype=bool)
    mask0[5:20, 10:30] = True
    boxes = [[10, 5, 30, 20], [0, 0, 4, 4]]
    text = "<image> a [1] b [0] c [1]"
    from_arrays = proc(images=IMG, text=text, boxes=boxes, masks=[mask0, None])
    from_rle = proc(images=IMG, text=text, boxes=boxes, masks=[rle_encode(mask0), None])
    targets = from_arrays["mask_targets"]
    assert targets.shape == (1, 3, 64, 64)
    torch.testing.assert_close(targets, from_rle["mask_targets"])
    assert (targets[0, 0] == -100).all() and (targets[0, 2] == -100).all()
    np.testing.assert_array_equal(targets[0, 1].numpy(), masks_to_sam_frame(mask0, 64)[0])
    with pytest.raises(ValueError, match="masks"):
        proc(images=IMG, text=text, boxes=boxes, masks=[np.zeros((3, 3)), None])
    with pytest.raises(ValueError, match="masks"):
        proc(images=IMG, text=text, boxes=boxes, masks=[mask0])


# ---------------------------------------------------------------------------------------------- chat template


def test_vicuna_template_strings(proc):
    single = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    assert proc.apply_chat_template(single, add_generation_prompt=True) == f"{VICUNA_V1_1_SYSTEM} USER: <image> Hi? ASSISTANT:"
    multi = single + [{"role": "assistant", "content": "Yes."}, {"role": "user", "content": "More?"}]
    assert (
        proc.apply_chat_template(multi, add_generation_prompt=True)
        == f"{VICUNA_V1_1_SYSTEM} USER: <image> Hi? ASSISTANT: Yes.</s>USER: More? ASSISTANT:"
    )
    assert proc.apply_chat_template(single) == f"{VICUNA_V1_1_SYSTEM} USER: <image> Hi? "
    with_system = [{"role": "system", "content": "Be brief."}] + single
    assert proc.apply_chat_template(with_system, add_generation_prompt=True) == "Be brief. USER: <image> Hi? ASSISTANT:"
    cont = single + [{"role": "assistant", "content": "Answer:"}]
    assert proc.apply_chat_template(cont, continue_final_message=True).endswith("ASSISTANT: Answer:")
    batch = proc.apply_chat_template([single, multi], add_generation_prompt=True)
    assert isinstance(batch, list) and len(batch) == 2
    with pytest.raises(Exception, match="alternate"):
        proc.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_apply_chat_template_tokenize_uses_message_images(proc):
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "What is [0]?"}]}
    ]
    out = proc.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, boxes=[[0, 0, 5, 5]]
    )
    text = proc.apply_chat_template(conversation, add_generation_prompt=True)
    ref = proc(images=IMG, text=text, boxes=[[0, 0, 5, 5]])
    assert set(out) == set(ref)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key])
    # transformers' default return_dict=False: the input_ids only
    ids = proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, boxes=[[0, 0, 5, 5]])
    torch.testing.assert_close(ids, ref["input_ids"])


# ---------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip(proc, tmp_path):
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").exists()
    loaded = NextChatProcessor.from_pretrained(tmp_path)
    assert loaded.image_seq_length == proc.image_seq_length and loaded.chat_template == proc.chat_template
    assert loaded.special_token_ids == proc.special_token_ids
    assert loaded.image_processor.to_dict() == proc.image_processor.to_dict()
    text = "USER: <image> the cat [0] <at> ASSISTANT: a cat [0] .</s>"
    a = proc(images=IMG, text=text, boxes=[[0, 0, 5, 5]], return_labels=True)
    b = loaded(images=IMG, text=text, boxes=[[0, 0, 5, 5]], return_labels=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    # twice (re-save of a loaded processor)
    loaded.save_pretrained(tmp_path / "again")
    again = NextChatProcessor.from_pretrained(tmp_path / "again")
    torch.testing.assert_close(again(images=IMG, text=text, boxes=[[0, 0, 5, 5]])["input_ids"], a["input_ids"])


def test_model_input_names_list_the_extra_inputs(proc):
    for name in ("input_ids", "attention_mask", "pixel_values", "sam_pixel_values", "box_inputs", "box_inputs_mask"):
        assert name in proc.model_input_names


# ---------------------------------------------------------------------------------------------- post-processing


def _generate_output(proc, answer_ids, prompt_ids, boxes, masks=None, ious=None, rows=1):
    sequences = torch.tensor([prompt_ids + answer_ids] * rows)
    out = {"sequences": sequences, "prompt_length": len(prompt_ids), "pred_boxes": [torch.tensor(boxes)] * rows}
    if masks is not None:
        out["pred_masks"] = [torch.tensor(masks)] * rows
        out["iou_scores"] = [torch.tensor(ious)] * rows
    return out


def test_post_process_generation(proc):
    tok = proc.tokenizer
    t, b = proc.trigger_token_id, proc.box_token_id
    enc = lambda s, first=False: proc._encoder.encode(s, prefix=first)[0]  # noqa: E731
    answer = enc("A man", True) + [t, b] + enc("riding a horse") + [t, b, t, b] + enc(".") + [tok.eos_token_id]
    prompt = [1] + enc("USER: hi ASSISTANT:", True)
    size = (30, 40)  # h, w: side 40, pad_top 5
    boxes = [[0.25, 0.125, 0.5, 0.5], [-0.1, 0.0, 1.2, 0.9], [0.5, 0.6, 0.4, 0.3]]
    mask = np.zeros(size, dtype=bool)
    mask[10:20, 5:25] = True
    logits = masks_to_sam_frame(mask, 64)[0] * 20 - 10
    low = torch.nn.functional.interpolate(torch.from_numpy(logits)[None, None], (16, 16), mode="bilinear")[0, 0]
    masks = np.stack([low.numpy()] * 3)
    result = proc.post_process_generation(
        _generate_output(proc, answer, prompt, boxes, masks, [0.9, 0.8, 0.7], rows=2), image_sizes=[size]
    )
    assert len(result) == 2 and result[0]["text"] == result[1]["text"]
    text = result[0]["text"]
    assert text == "A man riding a horse."
    ents = result[0]["entities"]
    assert [e["text"] for e in ents] == ["A man", "a horse", "a horse"]
    assert ents[1]["span"] == ents[2]["span"] == (text.index("a horse"), text.index("a horse") + len("a horse"))
    np.testing.assert_allclose(ents[0]["box"], [10, 0, 20, 15])  # (0.25*40, 0.125*40-5, 0.5*40, 0.5*40-5)
    np.testing.assert_allclose(ents[1]["box"], [0, 0, 40, 30])  # clipped
    np.testing.assert_allclose(ents[2]["box"], [16, 7, 20, 19])  # put in order: (0.4, 0.3, 0.5, 0.6)
    assert ents[0]["box_normalized"] == pytest.approx(boxes[0])
    assert ents[0]["mask"].shape == size and ents[0]["mask"].dtype == bool
    assert (ents[0]["mask"] & mask).sum() / (ents[0]["mask"] | mask).sum() > 0.8
    assert [e["score"] for e in ents] == pytest.approx([0.9, 0.8, 0.7])
    assert proc.post_process_image_text_to_text(torch.tensor([answer])) == [text]
    # padding after </s> (batched generation) is ignored, <at> included
    padded = proc.post_process_generation(torch.tensor([answer + [0, t, 0]]))
    assert padded[0]["text"] == text and len(padded[0]["entities"]) == 3
    # a prompt that ends with <at>: its box comes first, with an empty span
    res = proc.post_process_generation(
        _generate_output(proc, [b] + enc(".") + [2], prompt + [t], [[0.25, 0.125, 0.5, 0.5]]), image_sizes=[size]
    )
    assert res[0]["text"] == "." and res[0]["entities"][0]["span"] == (0, 0)
    np.testing.assert_allclose(res[0]["entities"][0]["box"], [10, 0, 20, 15])
    # wrong number of boxes
    with pytest.raises(ValueError, match="pred_boxes"):
        proc.post_process_generation(_generate_output(proc, answer, prompt, boxes[:2]), image_sizes=[size])
    # plain tensor: text and spans, no boxes
    plain = proc.post_process_generation(torch.tensor([answer]))
    assert plain[0]["text"] == text and plain[0]["entities"][0]["box"] is None


def test_draw_grounding(proc):
    image = PIL.Image.new("RGB", (40, 30), "white")
    mask = np.zeros((30, 40), dtype=bool)
    mask[10:20, 10:20] = True
    entities = [{"text": "a cat", "box": [5, 5, 35, 25], "mask": mask}, {"text": "x", "box": [0, 0, 3, 3], "mask": None}]
    drawn = np.asarray(draw_grounding(image, entities, labels="text", line_width=1))
    assert drawn.shape == (30, 40, 3)
    # boxes are pixel edges: the right line is the last column inside the box (34), column 35 stays white
    assert tuple(drawn[15, 34]) == (0xF7, 0x65, 0x66)
    assert tuple(drawn[15, 35]) == (255, 255, 255)
    assert tuple(drawn[15, 15]) == tuple(np.round((np.array([255, 255, 255]) + [0xF7, 0x65, 0x66]) / 2))
    assert tuple(drawn[29, 39]) == (255, 255, 255)
    # scale 3: the picture is 3x larger, the box edges and the mask follow (box x2 = 35 -> last column 3 * 35 - 1)
    big = np.asarray(draw_grounding(image, entities, labels="text", line_width=1, scale=3))
    assert big.shape == (90, 120, 3)
    assert tuple(big[45, 104]) == (0xF7, 0x65, 0x66) and tuple(big[45, 105]) == (255, 255, 255)
    blended = tuple(np.round((np.array([255, 255, 255]) + [0xF7, 0x65, 0x66]) / 2))
    assert tuple(big[50, 50]) == blended and tuple(big[59, 59]) == blended and tuple(big[60, 60]) != blended
    with pytest.raises(ValueError, match="scale"):
        draw_grounding(image, entities, scale=0)


# ---------------------------------------------------------------------------------------------- fuzz


MODES = ["RGB", "L", "LA", "P", "RGBA", "I;16", "CMYK", "1", "F", "I"]


@st.composite
def samples(draw):
    has_image = draw(st.booleans())
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    image = None
    if has_image:
        kind = draw(st.sampled_from(MODES + ["np_hwc", "np_chw", "torch", "np_float"]))
        rng = np.random.default_rng(draw(st.integers(0, 1000)))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if kind in MODES:
            image = PIL.Image.fromarray(arr).convert(kind) if kind not in ("I;16", "F", "I") else None
            if kind == "I;16":
                image = PIL.Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
            elif kind == "F":
                image = PIL.Image.fromarray(arr[..., 0].astype(np.float32) / 255)
            elif kind == "I":
                image = PIL.Image.fromarray(arr[..., 0].astype(np.int32))
        elif kind == "np_hwc":
            image = arr
        elif kind == "np_chw":
            image = arr.transpose(2, 0, 1).copy()
        elif kind == "torch":
            image = torch.from_numpy(arr.transpose(2, 0, 1).copy())
        else:
            image = arr.astype(np.float32) / 255
    n_boxes = draw(st.integers(0, 3)) if has_image else 0
    boxes = []
    for _ in range(n_boxes):
        x1, y1 = draw(st.floats(0, w)), draw(st.floats(0, h))
        boxes.append([x1, y1, draw(st.floats(x1, w)), draw(st.floats(y1, h))])
    pieces = draw(
        st.lists(
            st.one_of(
                st.text(alphabet="ab .:?<>/[]\\", max_size=8),
                st.sampled_from(["<at>", "<boxes>", "<im_patch>", "</s>", "ASSISTANT:", "\\[0]", " "]),
            ),
            max_size=5,
        )
    )
    for i in range(n_boxes):  # every box referred to, somewhere
        pieces.insert(draw(st.integers(0, len(pieces))), f" [{i}] ")
    if n_boxes > 1 and draw(st.booleans()):
        pieces.append(f"[{n_boxes - 1},0]")
    if has_image:
        pieces.insert(draw(st.integers(0, len(pieces))), "<image>")
    # one in three samples is broken on purpose
    corruption = draw(st.sampled_from([None] * 12 + ["nan", "inverted", "outside", "ref", "unreferenced", "image"]))
    if corruption in ("nan", "inverted", "outside") and boxes:
        boxes[0] = {"nan": [float("nan"), 0, 1, 1], "inverted": [5, 5, 1, 1], "outside": [0, 0, w + 3, h]}[corruption]
    elif corruption == "ref":
        pieces.append(f"[{n_boxes}]")
    elif corruption == "unreferenced" and has_image:
        boxes.append([0, 0, 1, 1])
    elif corruption == "image":
        pieces.append("<image>")
    return image, "".join(pieces), boxes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(samples(), min_size=1, max_size=3), st.booleans(), st.sampled_from(["left", "right"]), st.booleans())
def test_fuzz_whole_call(proc, batch, labels, side, truncate):
    """Whatever the input: either a ValueError, or outputs that satisfy every invariant of the contract."""
    images = [s[0] for s in batch]
    texts = [s[1] for s in batch]
    boxes = [s[2] for s in batch]
    kwargs = dict(return_labels=labels, padding_side=side)
    if truncate:
        kwargs.update(truncation=True, max_length=12)
    try:
        out = proc(images=images, text=texts, boxes=boxes, **kwargs)
    except ValueError as err:
        event(f"ValueError: {str(err)[:40]}")
        return
    event("accepted")
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == len(batch)
    assert out["box_inputs"].shape[:2] == out["box_inputs_mask"].shape
    n_images = sum(1 for i in images if i is not None)
    if n_images:
        assert out["pixel_values"].shape == (n_images, 3, 28, 28)
        assert out["sam_pixel_values"].shape == (len(batch), 3, 64, 64)
    for b in range(len(batch)):
        row = ids[b][mask[b].bool()].tolist()
        assert row.count(proc.box_token_id) == int(out["box_inputs_mask"][b].sum())
        assert row.count(proc.trigger_token_id) == row.count(proc.box_token_id)
        assert all(row[i + 1] == proc.box_token_id for i, v in enumerate(row) if v == proc.trigger_token_id)
        assert row.count(proc.image_token_id) == proc.image_seq_length * row.count(proc.image_start_token_id)
        if proc.image_start_token_id in row:
            s = row.index(proc.image_start_token_id)
            assert row[s + 1 + proc.image_seq_length] == proc.image_end_token_id
        k = int(out["box_inputs_mask"][b].sum())
        assert out["box_inputs_mask"][b, :k].all()
        valid = out["box_inputs"][b, :k]
        assert torch.isfinite(valid).all() and (valid >= 0).all() and (valid <= 1).all()
        assert (valid[:, 2] >= valid[:, 0]).all() and (valid[:, 3] >= valid[:, 1]).all()
        if truncate:
            assert len(row) <= 12
        if labels:
            lab = out["labels"][b]
            assert ((lab == -100) | (lab == ids[b])).all()
            assert not (lab == proc.box_token_id).any() and not (lab == proc.image_token_id).any()


# ---------------------------------------------------------------------------------------------- Hub code rule


# every processing module the Hub export ships (flat, importing one another as siblings); they may also import the
# shipped configuration module, `from ..configuration.configuration_nextchat import X`, which the export flattens to
# `from .configuration_nextchat import X`
HUB_FILES = sorted(
    name for name, module in REMOTE_CODE_MODULES.items() if module.startswith("nextchat.processing.")
)
HUB_SIBLINGS = {name[:-3] for name in HUB_FILES}
HUB_CONFIGURATION = {
    name: module for name, module in REMOTE_CODE_MODULES.items() if module.startswith("nextchat.configuration.")
}
ALLOWED_TOP_LEVEL = {"torch", "transformers", "numpy", "PIL", "safetensors"}


def test_hub_files_follow_the_import_rule():
    import ast
    import re
    import sys

    folder = Path(__file__).resolve().parents[1] / "processing"
    for name in HUB_FILES:
        source = (folder / name).read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    assert top in ALLOWED_TOP_LEVEL or top in sys.stdlib_module_names, (name, alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 2:
                    assert f"nextchat.{node.module}" in HUB_CONFIGURATION.values(), (name, node.module)
                elif node.level:
                    assert node.level == 1 and node.module in HUB_SIBLINGS, (name, node.module)
                else:
                    top = node.module.split(".")[0]
                    assert top in ALLOWED_TOP_LEVEL or top in sys.stdlib_module_names, (name, node.module)
        # in the exported file, transformers' line regex must only see real sibling imports (none in docstrings)
        found = set(re.findall(r"^\s*from\s+\.(\S+)\s+import", flatten_imports(source), flags=re.MULTILINE))
        assert found <= HUB_SIBLINGS | {name[:-3] for name in HUB_CONFIGURATION}, found


def test_hub_files_work_flat_without_the_package(tmp_path):
    """Exported flat into a folder (imports flattened as the Hub export does), the processing files and the
    configuration module they use import as siblings in a process that cannot import nextchat."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    pkg = tmp_path / "hubcopy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    sources = {name: repo / "processing" / name for name in HUB_FILES}
    sources.update({name: repo / "configuration" / name for name in HUB_CONFIGURATION})
    for name, source in sources.items():
        (pkg / name).write_text(flatten_imports(source.read_text()))
    script = tmp_path / "check.py"
    script.write_text(
        "import sys\n"
        "sys.modules['nextchat'] = None  # any `import nextchat` now fails\n"
        "from hubcopy.processing_nextchat import NextChatProcessor\n"
        "from hubcopy.image_processing_nextchat import NextChatImageProcessor\n"
        "assert not any(m.startswith('nextchat.') for m in sys.modules)\n"
        "print(NextChatImageProcessor(sam_image_size=None).size)\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
