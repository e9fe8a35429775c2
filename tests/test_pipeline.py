"""`pipeline(...)` on NExT-Chat folders, in a process where `nextchat` cannot be imported: transformers' generic
"image-text-to-text" pipeline (chat messages, strings, batches, generate_kwargs), and the grounding pipeline every
folder ships ("grounded-image-text-to-text", remote code named in config.json `custom_pipelines`), whose entities
are exactly `generate` + `post_process_generation` on the same inputs; and `nextchat-chat --json` agrees with it."""

import json
import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from test_release_proof import FIXTURE, QUESTION, SHIPPED, _run_without_nextchat, needs_fixture, needs_shipped


TASK = "grounded-image-text-to-text"
USER_BOX = [10.0, 10.0, 60.0, 60.0]
BOX_QUESTION = "What is [0]?"

# Runs transformers' generic pipeline and the grounding pipeline through remote code only; saves what they return.
REMOTE_PIPELINES = textwrap.dedent(
    """
    import sys, torch
    from PIL import Image
    from transformers import pipeline
    folder, image_a, image_b, question, box_question, box, out_path = sys.argv[1:8]
    box = [float(v) for v in box.split(",")]
    a, b = Image.open(image_a).convert("RGB"), Image.open(image_b).convert("RGB")
    out = {}

    generic = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    assert type(generic.model).__module__.startswith("transformers_modules."), type(generic.model).__module__
    chats = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": question}]}]
             for im in (a, b)]
    kw = dict(max_new_tokens=12, return_full_text=False)
    out["chat"] = [generic(text=chat, **kw)[0]["generated_text"] for chat in chats]
    out["chat_batched"] = [r[0]["generated_text"] for r in generic(text=chats, batch_size=2, **kw)]
    out["prompts"] = [generic.processor.apply_chat_template(c, add_generation_prompt=True) for c in chats]
    out["string"] = generic(images=a, text=out["prompts"][0], **kw)[0]["generated_text"]
    out["string_batched"] = [r["generated_text"] for r in generic(images=[a, b], text=out["prompts"], **kw)]
    out["generate_kwargs"] = generic(text=chats[0], generate_kwargs={"max_new_tokens": 3, "do_sample": False},
                                     return_full_text=False)[0]["generated_text"]

    grounding = pipeline("%s", model=folder, trust_remote_code=True)
    assert type(grounding).__module__.startswith("transformers_modules."), type(grounding).__module__
    assert type(grounding).__name__ == "NextChatGroundingPipeline"

    def plain(result):
        return {"text": result["text"], "entities": [
            {**e, "span": list(e["span"]), "mask": None if e["mask"] is None else torch.from_numpy(e["mask"])}
            for e in result["entities"]]}

    out["single"] = plain(grounding(a, question, max_new_tokens=40))
    out["batched"] = [plain(r) for r in grounding([a, b], question, batch_size=2, max_new_tokens=40)]
    out["boxes"] = plain(grounding(a, box_question, boxes=[box], max_new_tokens=12))
    out["threshold"] = plain(grounding(a, question, max_new_tokens=40, threshold=3.0))
    errors = {}
    for name, call in {
        "images": lambda: grounding(None, question),
        "text": lambda: grounding(a, 7),
        "boxes": lambda: grounding(a, box_question, boxes=[[1, 2, 3]]),
        "threshold": lambda: grounding(a, question, threshold="high"),
        "generate_kwargs": lambda: grounding(a, question, generate_kwargs="greedy"),
    }.items():
        try:
            call()
            errors[name] = None
        except ValueError as err:
            errors[name] = str(err)
    out["errors"] = errors
    torch.save(out, out_path)
    """ % TASK
)


def _scene_images(tmp_path):
    from tiny_models import shapes_scene
    from nextchat.training.synthetic import render_scene

    a, _ = shapes_scene()
    b, _ = render_scene(1_000_001)
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    return Image.open(tmp_path / "a.png").convert("RGB"), Image.open(tmp_path / "b.png").convert("RGB")


def _expected(folder, images, questions, boxes=None, max_new_tokens=40, mask_threshold=0.0):
    """`generate` + `post_process_generation` with the local package, on the inputs the pipeline builds (the same
    chat template, the batch padded on the left)."""
    from nextchat import NextChatForConditionalGeneration, NextChatProcessor

    processor = NextChatProcessor.from_pretrained(folder)
    model = NextChatForConditionalGeneration.from_pretrained(folder).eval()
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        for q in questions]
    use_sam = model.sam is not None and processor.image_processor.sam_image_size is not None
    inputs = processor(images=list(images), text=prompts, boxes=boxes, padding_side="left",
                       return_sam_pixel_values=use_sam)
    with torch.no_grad():
        output = model.generate(**{k: v for k, v in inputs.items() if k != "image_sizes"},
                                max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    return processor.post_process_generation(output, inputs["image_sizes"], mask_threshold=mask_threshold)


def assert_same_result(got, want, atol=1e-4):
    assert got["text"] == want["text"]
    assert len(got["entities"]) == len(want["entities"])
    for g, w in zip(got["entities"], want["entities"]):
        assert g["text"] == w["text"] and tuple(g["span"]) == tuple(w["span"])
        assert g["box"] == pytest.approx(w["box"], abs=atol)
        assert g["box_normalized"] == pytest.approx(w["box_normalized"], abs=atol)
        assert (g["score"] is None) == (w["score"] is None)
        if w["score"] is not None:
            assert g["score"] == pytest.approx(w["score"], abs=atol)
        assert (g["mask"] is None) == (w["mask"] is None)
        if w["mask"] is not None:
            got_mask, want_mask = np.asarray(g["mask"]), np.asarray(w["mask"])
            assert got_mask.shape == want_mask.shape and got_mask.dtype == bool
            assert (got_mask != want_mask).mean() <= 1e-3  # a pixel at the threshold may flip


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory):
    if not (SHIPPED / "config.json").is_file():
        pytest.skip("the shipped tiny model is absent")
    tmp_path = tmp_path_factory.mktemp("pipeline_shipped")
    a, b = _scene_images(tmp_path)
    remote = _run_without_nextchat(tmp_path, REMOTE_PIPELINES, SHIPPED, tmp_path / "a.png", tmp_path / "b.png",
                                   QUESTION, BOX_QUESTION, ",".join(map(str, USER_BOX)))
    return remote, (a, b), tmp_path


@needs_shipped
def test_generic_pipeline_on_messages_strings_and_batches(shipped_run):
    remote, (a, b), _ = shipped_run
    want = [r["text"] for r in _expected(SHIPPED, [a], [QUESTION], max_new_tokens=12)]
    want += [r["text"] for r in _expected(SHIPPED, [b], [QUESTION], max_new_tokens=12)]
    # the generic pipeline decodes with the processor (`post_process_image_text_to_text`): clean text, no pairs
    assert [t.strip() for t in remote["chat"]] == want
    assert remote["chat_batched"] == remote["chat"]  # batched (left-padded) = one by one, on 5.24 and 5.25
    assert remote["string"] == remote["chat"][0]  # the rendered prompt as a string: the same answer
    assert remote["string_batched"] == remote["chat"]
    assert remote["prompts"][0].count("<image>") == 1
    assert 0 < len(remote["generate_kwargs"]) < len(remote["chat"][0])  # max_new_tokens=3 reached generate


@needs_shipped
def test_grounding_pipeline_entities_are_generate_plus_post_process(shipped_run):
    remote, (a, b), _ = shipped_run
    [want_a] = _expected(SHIPPED, [a], [QUESTION])
    assert len(want_a["entities"]) >= 2 and all(e["mask"] is not None for e in want_a["entities"])
    assert_same_result(remote["single"], want_a)
    for got, want in zip(remote["batched"], _expected(SHIPPED, [a, b], [QUESTION, QUESTION])):
        assert_same_result(got, want)
    assert_same_result(remote["batched"][0], want_a)
    [want_high] = _expected(SHIPPED, [a], [QUESTION], mask_threshold=3.0)
    assert_same_result(remote["threshold"], want_high)
    assert sum(int(np.asarray(e["mask"]).sum()) for e in remote["threshold"]["entities"]) < sum(
        int(np.asarray(e["mask"]).sum()) for e in remote["single"]["entities"])


@needs_shipped
def test_grounding_pipeline_user_boxes(shipped_run):
    remote, (a, _), _ = shipped_run
    [want] = _expected(SHIPPED, [a], [BOX_QUESTION], boxes=[[USER_BOX]], max_new_tokens=12)
    assert_same_result(remote["boxes"], want)  # the box, referred to as [0], went in as a box input


@needs_shipped
def test_grounding_pipeline_errors_name_the_argument(shipped_run):
    remote, _, _ = shipped_run
    for name, message in remote["errors"].items():
        assert message is not None, f"no error for a bad `{name}`"
        assert f"`{name}`" in message, (name, message)


@needs_shipped
def test_chat_cli_json_gives_the_pipeline_entities(shipped_run, capsys):
    remote, _, tmp_path = shipped_run
    from nextchat.demo import chat_cli

    rc = chat_cli.main([str(tmp_path / "a.png"), QUESTION, "--model", str(SHIPPED), "--json", "--device", "cpu",
                        "--max-new-tokens", "40", "--iou-threshold", "0", "--output", str(tmp_path / "cli.png")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    record = json.loads(captured.out.strip().splitlines()[-1])
    result = remote["single"]
    assert record["answer"] == result["text"]
    assert len(record["entities"]) == len(result["entities"]) >= 2
    for cli, pipe in zip(record["entities"], result["entities"]):
        assert cli["text"] == pipe["text"] and cli["span"] == list(pipe["span"])
        assert cli["box"] == pytest.approx(pipe["box"], abs=0.006)  # the CLI prints boxes to 2 decimals
        assert cli["score"] == pytest.approx(pipe["score"], abs=1e-4)
        assert abs(cli["mask_area"] - int(np.asarray(pipe["mask"]).sum())) <= 0.001 * np.asarray(pipe["mask"]).size


@needs_shipped
def test_local_registration_and_saved_custom_pipelines(tmp_path):
    """With `nextchat` imported the task is registered as transformers registers custom pipelines, and every
    `save_pretrained` folder names the shipped pipeline in config.json and holds its file."""
    from transformers import pipeline
    from transformers.pipelines import PIPELINE_REGISTRY

    from nextchat import NextChatForConditionalGeneration, NextChatGroundingPipeline, NextChatProcessor

    assert PIPELINE_REGISTRY.supported_tasks[TASK]["impl"] is NextChatGroundingPipeline
    model = NextChatForConditionalGeneration.from_pretrained(SHIPPED).eval()
    processor = NextChatProcessor.from_pretrained(SHIPPED)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["custom_pipelines"] == {TASK: {"impl": "pipeline_nextchat.NextChatGroundingPipeline",
                                                 "pt": ["AutoModelForImageTextToText"], "type": "multimodal"}}
    assert (tmp_path / "pipeline_nextchat.py").is_file()
    pipe = pipeline(TASK, model=model, processor=processor, pipeline_class=NextChatGroundingPipeline)
    image = Image.new("RGB", (64, 64), (250, 250, 250))
    ImageDraw.Draw(image).ellipse([8, 8, 40, 40], fill=(220, 20, 20))
    result = pipe(image, QUESTION, max_new_tokens=8)
    assert isinstance(result["text"], str) and isinstance(result["entities"], list)


@needs_fixture
def test_pipelines_on_a_converted_checkpoint(tmp_path):
    from nextchat.convert_scripts import convert_original_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_original_checkpoint(FIXTURE, tmp_path / "converted", progress=False)
    folder = tmp_path / "converted"
    assert TASK in json.loads((folder / "config.json").read_text())["custom_pipelines"]
    images = []
    for k, name in enumerate(("a.png", "b.png")):
        image = Image.new("RGB", (80, 60), (240, 240, 220))
        ImageDraw.Draw(image).rectangle([5 + 20 * k, 8, 30 + 20 * k, 40], fill=(200, 30, 30))
        image.save(tmp_path / name)
        images.append(Image.open(tmp_path / name).convert("RGB"))
    question = "Where is the red thing?"
    remote = _run_without_nextchat(tmp_path, REMOTE_PIPELINES, folder, tmp_path / "a.png", tmp_path / "b.png",
                                   question, BOX_QUESTION, "5,8,30,40")
    assert remote["chat_batched"] == remote["chat"] and remote["string"] == remote["chat"][0]
    assert remote["string_batched"] == remote["chat"]
    [want] = _expected(folder, images[:1], [question])
    assert_same_result(remote["single"], want)
    for got, want in zip(remote["batched"], _expected(folder, images, [question, question])):
        assert_same_result(got, want)
    [want] = _expected(folder, images[:1], [BOX_QUESTION], boxes=[[[5, 8, 30, 40]]], max_new_tokens=12)
    assert_same_result(remote["boxes"], want)
    assert all(message and f"`{name}`" in message for name, message in remote["errors"].items())
