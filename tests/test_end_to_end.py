"""Processor + model + generate + post-processing together, locally and through remote code."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoProcessor

from nextchat import NextChatProcessor
from test_save_load import BLOCKER
from tiny_models import tiny_model_and_processor


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_pair(seed=0):
    model, processor = tiny_model_and_processor(seed)
    return processor, model


def picture():
    image = Image.new("RGB", (90, 60), (240, 240, 220))
    ImageDraw.Draw(image).rectangle([10, 10, 40, 40], fill=(200, 20, 20))
    return image


def prompt_inputs(processor):
    conversation = [{"role": "user", "content": "<image> What is in region [0]? Where else is red?"}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor(images=[picture()], text=[text], boxes=[[[10, 10, 40, 40]]], append_trigger=False)


@torch.no_grad()
def test_processor_output_feeds_forward_and_generate_and_post_processing():
    processor, model = tiny_pair()
    inputs = prompt_inputs(processor)
    out = model(**inputs)
    assert out.trigger_positions.shape[0] == 1  # the user's region reference
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    results = processor.post_process_generation(generated, image_sizes=inputs["image_sizes"])
    assert len(results) == 1 and isinstance(results[0]["text"], str)
    assert len(results[0]["entities"]) == len(generated.pred_boxes[0])


@torch.no_grad()
def test_prompt_ending_with_trigger_gives_an_entity_in_pixels_with_a_mask():
    processor, model = tiny_pair(seed=1)
    conversation = [{"role": "user", "content": "<image> Where is the red square?"}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[picture()], text=[text], append_trigger=True)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    entity = processor.post_process_generation(generated, image_sizes=inputs["image_sizes"])[0]["entities"][0]
    box = np.asarray(entity["box"], dtype=float)
    assert box.shape == (4,) and (box >= 0).all() and box[[0, 2]].max() <= 90 and box[[1, 3]].max() <= 60
    assert entity["mask"].shape == (60, 90) and entity["mask"].dtype == bool


REMOTE_PROCESSOR = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModel, AutoProcessor
    from PIL import Image, ImageDraw
    folder, out_path = sys.argv[1:3]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__name__ == "NextChatProcessor", type(processor)
    assert "transformers_modules" in type(processor).__module__
    image = Image.new("RGB", (90, 60), (240, 240, 220))
    ImageDraw.Draw(image).rectangle([10, 10, 40, 40], fill=(200, 20, 20))
    text = processor.apply_chat_template(
        [{"role": "user", "content": "<image> What is in region [0]? Where else is red?"}], add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], boxes=[[[10, 10, 40, 40]]])
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    processor.save_pretrained(folder + "_resaved")
    again = AutoProcessor.from_pretrained(folder + "_resaved", trust_remote_code=True)
    torch.save({"inputs": dict(inputs), "logits": logits,
                "again": dict(again(images=[image], text=[text], boxes=[[[10, 10, 40, 40]]]))}, out_path)
    """
)


def test_auto_processor_locally_and_through_remote_code(tmp_path):
    processor, model = tiny_pair(seed=2)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert {"processing_nextchat.py", "image_processing_nextchat.py"} <= set(os.listdir(folder))
    local = AutoProcessor.from_pretrained(folder)
    assert type(local) is NextChatProcessor
    expected = prompt_inputs(local)
    with torch.no_grad():
        expected_logits = model(**expected).logits

    (tmp_path / "blocker.py").write_text(BLOCKER)
    (tmp_path / "remote.py").write_text(REMOTE_PROCESSOR)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "blocker.py"), str(tmp_path / "remote.py"), str(folder),
         str(tmp_path / "out.pt")], cwd="/", env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(tmp_path / "out.pt")
    for key, value in expected.items():
        assert torch.equal(remote["inputs"][key], value), key
        assert torch.equal(remote["again"][key], value), key
    torch.testing.assert_close(remote["logits"], expected_logits, atol=1e-6, rtol=1e-6)


def _printed_boxes(printed: str) -> list[list[float]]:
    import re

    return [[float(v) for v in m.split(",")] for m in re.findall(r"box \[([^\]]+)\]", printed)]


def test_quickstart_without_the_shipped_model_asks_for_one(tmp_path, capsys, monkeypatch):
    from nextchat import quickstart

    monkeypatch.setattr(quickstart, "SHIPPED_MODEL", str(tmp_path / "absent"))
    with pytest.raises(SystemExit) as exit_info:
        quickstart.main(["--output", str(tmp_path / "answer.png")])
    assert exit_info.value.code == 2
    assert "pass `--model DIR_OR_HUB_ID`" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        quickstart.main(["--model", str(tmp_path / "empty"), "--output", str(tmp_path / "answer.png")])
    assert exit_info.value.code == 2
    assert f"`--model {tmp_path / 'empty'}` could not be loaded" in capsys.readouterr().err
    assert not (tmp_path / "answer.png").exists()


def test_quickstart_runs_the_model_it_is_given(tmp_path, capsys):
    """`--model FOLDER`: the folder's model answers about the generated picture, drawn enlarged to the PNG."""
    from nextchat import quickstart

    processor, model = tiny_pair()
    model.save_pretrained(tmp_path / "tiny")
    processor.save_pretrained(tmp_path / "tiny")
    quickstart.main(["--model", str(tmp_path / "tiny"), "--output", str(tmp_path / "answer.png"),
                     "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    assert "question: Where is the red square?" in printed and "answer:" in printed and "NOTE" not in printed
    assert Image.open(tmp_path / "answer.png").size == (96 * 2, 64 * 2)  # small pictures are drawn enlarged


@pytest.mark.skipif(not os.path.isfile(os.path.join(REPO, "examples", "tiny-nextchat-shapes", "config.json")),
                    reason="the shipped tiny model is absent")
def test_quickstart_on_the_shipped_model_draws_its_boxes(tmp_path, capsys):
    """The README's main job: the shipped model on an unseen scene; every printed box is outlined on the PNG
    (drawn 4x: 64 px scenes -> 256 px) in its colour, at 4x its pixel coordinates."""
    from nextchat import quickstart
    from nextchat.processing.processing_nextchat import DRAW_COLORS

    quickstart.main(["--output", str(tmp_path / "answer.png")])
    printed = capsys.readouterr().out
    assert "RANDOM" not in printed and "Describe the image with object locations." in printed
    boxes = _printed_boxes(printed)
    assert boxes, printed
    drawn = np.asarray(Image.open(tmp_path / "answer.png").convert("RGB"))
    assert drawn.shape == (256, 256, 3)
    def rgb(k):
        return np.array(Image.new("RGB", (1, 1), DRAW_COLORS[k % len(DRAW_COLORS)]).getpixel((0, 0)))

    for k, box in enumerate(boxes):
        # a later box drawn (within a pixel at 4x) on top of this one covers its edges with its own colour
        covering = [j for j in range(k + 1, len(boxes)) if max(abs(4 * a - 4 * b) for a, b in zip(box, boxes[j])) <= 1]
        colours = [rgb(j) for j in [k] + covering]
        x1, y1, x2, y2 = (int(round(4 * v)) for v in box)
        x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, 256) - 1, min(y2, 256) - 1
        for row in (y1, y2):  # top and bottom edges carry the colour along most of their length (the printed
            # box is rounded to 0.1 px, so the drawn edge may be one row off at 4x)
            near = [r for r in (row - 1, row, row + 1) if 0 <= r < 256]
            edge = [sum((drawn[r, x1:x2 + 1] == colour).all(-1) for colour in colours).mean() for r in near]
            assert max(edge) > 0.5, (k, box)
