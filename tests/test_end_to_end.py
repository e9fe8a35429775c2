"""Processor + model + generate + post-processing together, locally and through remote code."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoProcessor

from nextchat import NextChatProcessor
from nextchat.quickstart import tiny_random_model_and_processor
from test_save_load import BLOCKER


def tiny_pair(seed=0):
    model, processor = tiny_random_model_and_processor(seed)
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


def test_quickstart_writes_an_annotated_picture(tmp_path, capsys):
    from nextchat.quickstart import main

    main(["--output", str(tmp_path / "answer.png"), "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    assert "answer:" in printed and "box [" in printed
    assert Image.open(tmp_path / "answer.png").size == (96, 64)
