"""The folders users hold keep loading: the shipped tiny model and a converted checkpoint load through the Auto
classes with `trust_remote_code=True` in a process where `nextchat` cannot be imported, and the shipped code is
exactly what `save_pretrained` writes from the current sources (one source of truth)."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from test_save_load import BLOCKER


REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "examples" / "tiny-nextchat-shapes"
FIXTURE = REPO.parent / "shared" / "fixtures" / "original_tiny"
needs_shipped = pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="the shipped tiny model is absent")
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"original-format fixture not found at {FIXTURE}")

QUESTION = "Describe the image with object locations."

# Loads model and processor through the Auto classes only, answers one question, saves what it saw.
REMOTE_CHAT = textwrap.dedent(
    """
    import sys, torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor
    folder, image_path, question, out_path = sys.argv[1:5]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    for obj in (processor, processor.image_processor, model, model.config):
        assert type(obj).__module__.startswith("transformers_modules."), type(obj).__module__
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "<image> " + question}], add_generation_prompt=True, tokenize=False)
    image = Image.open(image_path).convert("RGB")
    inputs = processor(images=[image], text=[prompt], boxes=[[[2, 3, 30, 40]]] if "[0]" in question else None)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    result = processor.post_process_generation(output, image_sizes=inputs["image_sizes"])[0]
    torch.save({"inputs": dict(inputs), "sequences": output.sequences, "text": result["text"],
                "boxes": [e["box"] for e in result["entities"]]}, out_path)
    """
)


def _run_without_nextchat(tmp_path, script: str, *args) -> dict:
    (tmp_path / "blocker.py").write_text(BLOCKER)
    (tmp_path / "remote.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    out = tmp_path / "remote_out.pt"
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "blocker.py"), str(tmp_path / "remote.py"), *map(str, args), str(out)],
        cwd="/", env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


def _local_chat(folder, image, question):
    from nextchat import NextChatForConditionalGeneration, NextChatProcessor

    processor = NextChatProcessor.from_pretrained(folder)
    model = NextChatForConditionalGeneration.from_pretrained(folder).eval()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "<image> " + question}], add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[prompt], boxes=[[[2, 3, 30, 40]]] if "[0]" in question else None)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    result = processor.post_process_generation(output, image_sizes=inputs["image_sizes"])[0]
    return inputs, output.sequences, result


def _code_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.py"))}


def _auto_maps(folder: Path) -> dict:
    maps = {}
    for name in ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            content = json.loads((folder / name).read_text())
            maps[name] = content.get("auto_map")
            if name == "config.json":
                maps["config.json:custom_pipelines"] = content.get("custom_pipelines")
            if isinstance(content.get("image_processor"), dict):
                maps[name + ":image_processor"] = content["image_processor"].get("auto_map")
    return maps


@needs_shipped
def test_shipped_remote_code_is_what_save_pretrained_writes_now(tmp_path):
    from nextchat import NextChatForConditionalGeneration, NextChatProcessor

    NextChatForConditionalGeneration.from_pretrained(SHIPPED).save_pretrained(tmp_path)
    NextChatProcessor.from_pretrained(SHIPPED).save_pretrained(tmp_path)
    written, shipped = _code_files(tmp_path), _code_files(SHIPPED)
    assert sorted(written) == sorted(shipped)
    stale = [name for name in written if written[name] != shipped[name]]
    assert not stale, f"{stale} differ from the current sources: run `python -m nextchat.remote_code {SHIPPED}`"
    assert _auto_maps(tmp_path) == _auto_maps(SHIPPED)
    assert "grounded-image-text-to-text" in _auto_maps(SHIPPED)["config.json:custom_pipelines"]
    image_map = _auto_maps(SHIPPED)["processor_config.json:image_processor"]
    assert image_map == {"AutoImageProcessor": "image_processing_nextchat.NextChatImageProcessor"}


@needs_shipped
def test_shipped_model_answers_the_same_through_remote_code(tmp_path):
    from tiny_models import shapes_scene

    image, _ = shapes_scene()
    image.save(tmp_path / "scene.png")
    remote = _run_without_nextchat(tmp_path, REMOTE_CHAT, SHIPPED, tmp_path / "scene.png", QUESTION)
    inputs, sequences, result = _local_chat(SHIPPED, image, QUESTION)
    for key, value in inputs.items():
        assert torch.equal(remote["inputs"][key], value), key
    assert torch.equal(remote["sequences"], sequences)
    assert remote["text"] == result["text"] and len(result["entities"]) >= 2  # it grounds the objects it names
    for got, want in zip(remote["boxes"], [e["box"] for e in result["entities"]]):
        assert [float(v) for v in got] == pytest.approx([float(v) for v in want], abs=1e-4)


@needs_fixture
def test_converted_checkpoint_processor_and_model_load_through_remote_code(tmp_path):
    from nextchat.convert_scripts import convert_original_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_original_checkpoint(FIXTURE, tmp_path / "converted", progress=False)
    image = Image.new("RGB", (80, 60), (240, 240, 220))
    ImageDraw.Draw(image).rectangle([5, 8, 30, 40], fill=(200, 30, 30))
    image.save(tmp_path / "picture.png")
    question = "What is [0]? Where is the red thing?"
    remote = _run_without_nextchat(tmp_path, REMOTE_CHAT, tmp_path / "converted", tmp_path / "picture.png", question)
    inputs, sequences, result = _local_chat(tmp_path / "converted", image, question)
    for key, value in inputs.items():
        assert torch.equal(remote["inputs"][key], value), key
    assert int(remote["inputs"]["box_inputs_mask"].sum()) == 1
    assert torch.equal(remote["sequences"], sequences)
    assert remote["text"] == result["text"]


@needs_shipped
def test_shipped_chat_template_marks_the_assistant_turns():
    """The shipped template renders vicuna v1.1 with its empty system prompt, and marks the assistant turns so
    that `return_assistant_tokens_mask` works: the mask covers the tokens the processor labels (its own
    `return_labels`), nothing else."""
    from nextchat import NextChatProcessor

    processor = NextChatProcessor.from_pretrained(SHIPPED)
    conversation = [{"role": "user", "content": "What is here?"}, {"role": "assistant", "content": "A red circle."},
                    {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Nothing else."}]
    text = processor.apply_chat_template(conversation)
    assert text == " USER: What is here? ASSISTANT: A red circle.</s>USER: And? ASSISTANT: Nothing else.</s>"
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    labels = processor(text=[text], return_labels=True)["labels"]
    assert torch.equal(torch.as_tensor(out["assistant_masks"]).bool(), labels != -100)
    assert int((labels != -100).sum()) > 4


@needs_shipped
def test_shapes_tokenizer_is_the_shipped_models(tmp_path):
    """`build_shapes_tokenizer(phrasings=True)` (what training the shapes model starts from: its corpus covers the
    training phrasing families) still gives the shipped tokenizer, byte for byte, with the five NExT-Chat tokens at
    the ids the shipped config names."""
    from nextchat import NextChatConfig
    from nextchat.configuration.configuration_nextchat import NEXTCHAT_SPECIAL_TOKENS
    from nextchat.training.synthetic import build_shapes_tokenizer

    tokenizer = build_shapes_tokenizer(phrasings=True)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (SHIPPED / "tokenizer.json").read_bytes()
    shipped_settings = json.loads((SHIPPED / "tokenizer_config.json").read_text())
    shipped_settings.pop("processor_class")  # written by the processor's save_pretrained
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == shipped_settings
    vocab, config = tokenizer.get_vocab(), NextChatConfig.from_pretrained(SHIPPED)
    assert {field: vocab[token] for field, token in NEXTCHAT_SPECIAL_TOKENS.items()} == config.special_token_ids
