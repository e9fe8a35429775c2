"""`nextchat-chat` end to end on tiny model folders: the answer, its grounded boxes, and the annotated PNG with the
boxes drawn where the output says (pixel colours checked on the printed box edges); bad images refused with a
message; the interactive chat's line editing and history in a real pseudo-terminal; and the engine's drawing
(masks that keep the object's colours, pictures resized for the screen)."""

import importlib.util
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageColor
import pytest

from nextchat.demo import chat_cli
from nextchat.demo.core import (
    DRAW_COLORS,
    FOLLOW_UP_NOTE,
    MAX_IMAGE_PIXELS,
    SINGLE_TURN_NOTE,
    ChatSession,
    DemoError,
    GenerationSettings,
    GroundedEntity,
    Reply,
    answer_html,
    conversation_html,
    conversation_note,
    default_model_dir,
    display_scale,
    history_text,
    load_image,
    load_model,
    parse_box,
    parse_boxes,
    shipped_model_candidates,
)
from tiny_demo_folder import ANSWER, QUESTION, SQUARE_BOX, build_tiny_demo_folder, shapes_image


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_demo_folder(tmp_path_factory.mktemp("demo") / "tiny-demo-model")


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    return load_model(tiny_folder, device="cpu")


@pytest.fixture()
def image_path(tmp_path):
    path = tmp_path / "shapes.png"
    shapes_image().save(path)
    return path


def edge_points(box, width, height, n=7):
    """Points on the four edges of a pixel box (inner part of each edge, away from the label at the top-left)."""
    x1, y1, x2, y2 = box
    points = []
    for t in np.linspace(0.3, 0.9, n):
        x = x1 + t * (x2 - x1)
        y = y1 + t * (y2 - y1)
        points += [(x1, y), (x2, y), (x, y2)]
    return [(min(max(x, 0), width - 1), min(max(y, 0), height - 1)) for x, y in points]


def colour_near(pixels, x, y, rgb, radius=1):
    h, w = pixels.shape[:2]
    xs = range(max(int(np.floor(x)) - radius, 0), min(int(np.ceil(x)) + radius, w - 1) + 1)
    ys = range(max(int(np.floor(y)) - radius, 0), min(int(np.ceil(y)) + radius, h - 1) + 1)
    return any(tuple(pixels[yy, xx]) == rgb for yy in ys for xx in xs)


def assert_boxes_drawn(png_path, entities):
    pixels = np.asarray(PIL.Image.open(png_path).convert("RGB"))
    height, width = pixels.shape[:2]
    assert entities, "expected at least one grounded box"
    for entity in entities:
        rgb = PIL.ImageColor.getrgb(entity["color"])[:3]
        points = edge_points(entity["box"], width, height)
        hits = sum(colour_near(pixels, x, y, rgb) for x, y in points)
        assert hits >= 0.9 * len(points), (entity, hits, len(points))
        # and the colour is not everywhere: the middle of a (non-tiny) box keeps the image or a blended mask
        x1, y1, x2, y2 = entity["box"]
        if x2 - x1 > 6 and y2 - y1 > 6:
            assert tuple(pixels[int((y1 + y2) / 2), int((x1 + x2) / 2)]) != rgb


def test_cli_one_question_json(tiny_folder, image_path, capsys):
    out_png = image_path.parent / "answer.png"
    rc = chat_cli.main([str(image_path), QUESTION, "--model", tiny_folder, "--json", "--output", str(out_png),
                        "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["answer"] == ANSWER.replace(" [0]", "")
    assert [e["text"] for e in record["entities"]] == ["The red square"]
    entity = record["entities"][0]
    assert entity["index"] == 0 and entity["color"] == DRAW_COLORS[0]
    # the over-fitted tiny model finds the square (pixel xyxy on the 96 x 64 image) and masks it
    assert np.allclose(entity["box"], SQUARE_BOX, atol=6), entity["box"]
    assert entity["mask_area"] > 300 and entity["score"] is not None
    assert record["image"] == str(out_png) and out_png.is_file()
    with PIL.Image.open(out_png) as im:
        assert im.size == (96, 64) and im.format == "PNG"
    assert_boxes_drawn(out_png, record["entities"])
    # progress on stderr, not on stdout
    assert "loading the model" in captured.err and "generating" in captured.err


def test_cli_text_output_default_path(tiny_folder, image_path, capsys):
    rc = chat_cli.main([str(image_path), QUESTION, "--model", tiny_folder, "--color", "never"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[0] == "The red square [0] is here."
    assert lines[1].startswith("  [0] 'The red square': box (")
    default_png = image_path.with_name("shapes_nextchat.png")
    assert f"annotated image: {default_png}" in captured.out and default_png.is_file()
    # the printed box is where the drawing is
    printed = [float(v) for v in lines[1].split("box (")[1].split(")")[0].split(",")]
    assert_boxes_drawn(default_png, [{"box": printed, "color": DRAW_COLORS[0]}])


def test_cli_user_box_and_beam_search(tiny_folder, image_path, capsys):
    out_png = image_path.parent / "region.png"
    rc = chat_cli.main([str(image_path), "What is in region [0]?", "--box", "52,20,84,52", "--model", tiny_folder,
                        "--json", "--output", str(out_png), "--decoding", "beam", "--num-beams", "3",
                        "--max-new-tokens", "12"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["user_boxes"] == [{"index": 0, "box": [52.0, 20.0, 84.0, 52.0]}]
    assert "beam search (3 beams)" in record["settings"] and record["new_tokens"] <= 12
    # the answer's own boxes are numbered after the user's box
    assert all(e["index"] >= 1 for e in record["entities"])
    # the user's box is drawn (grey) on the annotated image
    assert_boxes_drawn(out_png, [{"box": [52, 20, 84, 52], "color": "#7F7F7F"}])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["What is [0]?"], "refers to box [0]"),
        (["Where is it?", "--box", "1,2,3"], "four pixel numbers"),
        (["What is [0]?", "--box", "10,10,500,20"], "leaves the image"),
        (["Where is it?", "--box", "10,10,20,20"], "not mentioned in the question"),
        (["Hi", "--decoding", "sample", "--temperature", "0"], "temperature"),
    ],
)
def test_cli_errors_are_messages(tiny_folder, image_path, capsys, argv, message):
    rc = chat_cli.main([str(image_path), *argv, "--model", tiny_folder])
    captured = capsys.readouterr()
    assert rc == 2
    assert "nextchat-chat: error:" in captured.err and message in captured.err
    assert "Traceback" not in captured.err


def test_cli_missing_inputs(tmp_path, tiny_folder, capsys):
    assert chat_cli.main([str(tmp_path / "nope.png"), "hi", "--model", tiny_folder]) == 2
    assert "does not exist" in capsys.readouterr().err
    image = tmp_path / "i.png"
    shapes_image().save(image)
    assert chat_cli.main([str(image), "hi", "--model", str(tmp_path / "no-model")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_interactive_multi_turn(tiny_folder, image_path):
    """The console entry point in a fresh process, chatting over stdin: a box found in turn 1 is referred to in
    turn 2, a user box is added with /box, and each turn writes its own PNG."""
    script = "\n".join([QUESTION, "/box 52,20,84,52", "What is [0] next to [1]?", "/boxes", "/nonsense", "/quit", ""])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "nextchat.demo.chat_cli", str(image_path), "--model", tiny_folder, "--json",
         "--max-new-tokens", "16"],
        input=script, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 2, result.stdout
    assert records[0]["entities"][0]["index"] == 0
    assert records[1]["user_boxes"] == [{"index": 1, "box": [52.0, 20.0, 84.0, 52.0]}]
    assert records[0]["image"].endswith("shapes_nextchat.png") and records[1]["image"].endswith("shapes_nextchat_2.png")
    assert Path(records[1]["image"]).is_file()
    assert "box [1]" in result.stderr and "[0] (" in result.stderr and "unknown command" in result.stderr
    assert "Traceback" not in result.stderr


def read_until(fd, output: str, done, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while not done(output):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out; the terminal shows: {output[-3000:]!r}"
        if select.select([fd], [], [], min(remaining, 1.0))[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                chunk = b""
            assert chunk, f"the chat ended early; the terminal shows: {output[-3000:]!r}"
            output += chunk.decode(errors="replace")
    return output


JSON_RECORD = re.compile(r'\{"question".*\}')


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_cli_interactive_line_editing_history_and_single_turn_note(tiny_folder, image_path, tmp_path):
    """In a terminal, the chat's question line is edited with readline (a left arrow moves the cursor instead of
    typing an escape code, the up arrow recalls the last question), the history is saved, and a model recorded as
    trained on single turns gets a note recommending a new conversation."""
    folder = tmp_path / "single-turn-model"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "nextchat_training": {"max_turns": 1}}))
    history = tmp_path / "history"
    master, slave = os.openpty()
    env = dict(os.environ, NEXTCHAT_CHAT_HISTORY=str(history), TERM="xterm", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "nextchat.demo.chat_cli", str(image_path), "--model", str(folder), "--json"],
        stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
    )
    os.close(slave)

    def records(output):
        return [json.loads(m.group(0)) for m in JSON_RECORD.finditer(output)]

    def prompt_after(n):
        return lambda output: len(records(output)) == n and "you> " in output[output.rfind("}") :]

    try:
        output = read_until(master, "", lambda out: "you> " in out)
        os.write(master, b"Where is the squar?\x1b[De\r")  # left arrow: the "e" goes before the "?"
        output = read_until(master, output, prompt_after(1))
        os.write(master, b"\x1b[A\r")  # up arrow: the same question again
        output = read_until(master, output, prompt_after(2))
        os.write(master, b"/quit\r")
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    first, second = records(output)
    assert first["question"] == QUESTION and first["answer"] == ANSWER.replace(" [0]", "")
    assert second["question"] == QUESTION
    assert "single-question conversations" in output and output.count("single-question conversations") == 1
    assert "Traceback" not in output
    assert history.read_text().splitlines()[-2:] == [QUESTION, "/quit"]  # readline keeps one of two repeats


def test_session_history_carries_grounding(loaded):
    model, processor = loaded
    session = ChatSession(model, processor, shapes_image(), progress=None)
    reply = session.ask(QUESTION)
    assert session.turns[0] == (QUESTION, "The red square [0] is here.")
    assert [b.source for b in session.boxes] == ["model"]
    # the next prompt feeds the first answer back with its <at> <boxes> pair and the predicted box
    text = processor.apply_chat_template(session._messages("What is [0]?"), add_generation_prompt=True)
    inputs = processor(images=session.image, text=text, boxes=[b.box for b in session.boxes])
    assert int((inputs["input_ids"] == processor.trigger_token_id).sum()) == 2
    assert np.allclose(inputs["box_inputs"][0, 0].numpy(), reply.entities[0].box_normalized, atol=1e-3)
    # literal brackets in an answer are escaped when fed back
    assert history_text("a [b] c", [], processor) == "a \\[b] c"
    html = answer_html(reply)
    assert 'class="nc-phrase"' in html and DRAW_COLORS[0] in html and "The red square</span>" in html
    with pytest.raises(DemoError, match="type a question"):
        session.ask("   ")


def test_transparent_images_go_on_white(tmp_path):
    path = tmp_path / "t.png"
    PIL.Image.new("RGBA", (20, 16), (0, 0, 0, 0)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((1, 1)) == (255, 255, 255)


def bad_images(folder: Path) -> list[tuple[Path, str]]:
    """Files the chat must refuse, each with (part of) its message."""
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    truncated = folder / "truncated.png"
    shapes_image().save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:120])
    text = folder / "notes.txt"
    text.write_text("not a picture\n")
    dot = folder / "dot.png"
    PIL.Image.new("RGB", (1, 1)).save(dot)
    side = int(MAX_IMAGE_PIXELS**0.5) + 100
    huge = folder / "huge.png"
    PIL.Image.new("1", (side, side)).save(huge)
    return [
        (corrupt, "the file is damaged or is not really a PNG image"),
        (truncated, "damaged or truncated"),
        (text, "is not an image"),
        (dot, "1 x 1 pixels: too small"),
        (huge, f"{side} x {side} pixels ({side * side / 1e6:.0f} megapixels): too large"),
    ]


def test_cli_bad_images_are_messages(tmp_path, tiny_folder, capsys):
    for path, message in bad_images(tmp_path):
        assert chat_cli.main([str(path), QUESTION, "--model", tiny_folder]) == 2
        err = capsys.readouterr().err
        assert message in err and str(path.name) in err and "Traceback" not in err, (path, err)
        assert "loading the model" not in err  # refused before the model loads


def test_display_scale():
    assert display_scale(64, 64) == 8  # small: a whole factor up to 512 pixels
    assert display_scale(96, 64) == 6
    assert display_scale(1, 700) == 1  # an enlarged side may not pass 1024
    assert display_scale(800, 600) == 1
    assert display_scale(4000, 3000) == 1024 / 4000  # large: down to 1024 pixels


def test_drawing_for_the_screen_keeps_boxes_in_image_pixels(loaded):
    model, processor = loaded
    small = ChatSession(model, processor, shapes_image(), progress=None, display_sides=(512, 1024))
    assert small.scale == 6 and small.display_image.size == (576, 384)
    # a click on a display pixel is the nearest pixel edge of the image
    assert small.to_image_point(52 * 6 + 2, 20 * 6 + 4) == (52, 21)
    assert small.to_image_point(-5, 10_000) == (0, 64)
    huge = ChatSession(model, processor, shapes_image().resize((3840, 2560), PIL.Image.NEAREST), progress=None,
                       display_sides=(512, 1024))
    assert huge.display_image.size == (1024, 683)
    reply = huge.ask(QUESTION)
    assert reply.image.size == (1024, 683)
    assert np.allclose(reply.entities[0].box, [40 * v for v in SQUARE_BOX], atol=6 * 40), reply.entities[0].box
    # the marked first corner and a pending box numbered after the model's box [0]
    marked = np.asarray(huge.draw_pending([[2080, 800, 3360, 2080]], corner=(400, 400))).astype(int)
    plain = np.asarray(huge.display_image).astype(int)
    changed = np.abs(marked - plain).sum(-1) > 0
    assert changed[int(400 * huge.scale), int(400 * huge.scale)]
    grey = (marked == (127, 127, 127)).all(-1)
    right_edge = int(3360 * huge.scale) - 1
    assert grey[int(800 * huge.scale) : int(2080 * huge.scale), right_edge].mean() > 0.8


def test_masks_keep_the_objects_colour(loaded):
    """A mask is an outline in its colour over a light fill: inside, the masked object keeps its own colour."""
    model, processor = loaded
    session = ChatSession(model, processor, shapes_image(), progress=None)
    image = np.asarray(session.image).astype(int)
    circle = (np.abs(image - (30, 60, 200)).sum(-1) == 0)
    red = PIL.ImageColor.getrgb(DRAW_COLORS[0])
    entity = GroundedEntity(index=0, text="circle", span=(0, 6), box=None, box_normalized=None, mask=circle,
                            score=0.9, color=DRAW_COLORS[0])
    drawn = np.asarray(session.draw(Reply(question="q", text="circle", entities=[entity], image=None))).astype(int)
    inner = circle.copy()
    for axis, shift in ((0, 2), (0, -2), (1, 2), (1, -2)):
        inner &= np.roll(circle, shift, axis=axis)
    # inside: still blue, and nearer the blue than the red of the mask (a half blend would be purple)
    assert (drawn[inner][:, 2] > 2 * drawn[inner][:, 0]).all()
    assert (np.abs(drawn[inner] - (30, 60, 200)).max(-1) <= 0.25 * np.abs(np.subtract(red, (30, 60, 200))).max()).all()
    # the outline follows the mask's edge in the mask's colour; outside, nothing changes
    edge = circle & ~inner
    assert (drawn[edge] == red).all(-1).mean() > 0.3
    assert (drawn[~circle] == image[~circle]).all()


def test_single_turn_note(loaded):
    model, processor = loaded
    session = ChatSession(model, processor, shapes_image(), progress=None)
    assert conversation_note(session) == "" and session.max_turns is None
    session.ask(QUESTION, settings=GenerationSettings(max_new_tokens=12))
    assert conversation_note(session) == FOLLOW_UP_NOTE
    model.config.nextchat_training = {"max_turns": 1}
    try:
        assert conversation_note(session) == SINGLE_TURN_NOTE
        assert "nc-note-single-turn" in conversation_html(session)
    finally:
        del model.config.nextchat_training


def test_settings_and_box_parsing():
    assert GenerationSettings(mode="beams", num_beams=3).generate_kwargs() == {
        "max_new_tokens": 128, "do_sample": False, "num_beams": 3}
    kwargs = GenerationSettings(mode="sampling", temperature=0.5).generate_kwargs()
    assert kwargs["do_sample"] and kwargs["temperature"] == 0.5 and kwargs["top_k"] == 5
    with pytest.raises(DemoError, match="decoding mode"):
        GenerationSettings(mode="nucleus").validate()
    assert parse_box("[1, 2, 3.5, 4]") == [1.0, 2.0, 3.5, 4.0]
    assert parse_boxes("1,2,3,4; 5 6 7 8\n") == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(DemoError):
        parse_box("1,2,x,4")


def test_default_model_is_the_shipped_folder(monkeypatch, tiny_folder):
    monkeypatch.setenv("NEXTCHAT_DEMO_MODEL", tiny_folder)
    assert default_model_dir() == tiny_folder
    monkeypatch.delenv("NEXTCHAT_DEMO_MODEL")
    assert shipped_model_candidates()[0] == REPO / "examples" / "tiny-nextchat-shapes"
    shipped = shipped_model_candidates()[0]
    assert default_model_dir() == (str(shipped) if (shipped / "config.json").is_file() else None)


SHIPPED = shipped_model_candidates()[0]


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="the shipped tiny model is not in examples/ yet")
def test_cli_on_the_shipped_tiny_model(tmp_path, capsys, monkeypatch):
    """The default --model (the shipped tiny model, trained on nextchat.training.synthetic shapes): a referring
    question about a scene it never saw; the boxes it prints are drawn on the PNG where it says."""
    from nextchat.training.synthetic import phrase, render_scene

    monkeypatch.delenv("NEXTCHAT_DEMO_MODEL", raising=False)
    scene, objects = render_scene(seed=987_654_321)
    image = tmp_path / "scene.png"
    scene.save(image)
    out_png = tmp_path / "shipped.png"
    rc = chat_cli.main([str(image), f"Where is the {phrase(objects[0])}?", "--json", "--output", str(out_png)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert str(SHIPPED) in captured.err  # the default --model
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["answer"] and out_png.is_file()
    assert_boxes_drawn(out_png, record["entities"])


def test_only_the_web_module_imports_gradio():
    code = (
        "import sys; import nextchat.demo, nextchat.demo.core, nextchat.demo.chat_cli; "
        "assert 'gradio' not in sys.modules, 'gradio imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_test_model_builder_is_not_installed():
    assert importlib.util.find_spec("nextchat.demo.tiny_folder") is None


def test_boxes_on_the_border_stay_visible(loaded, tmp_path):
    """A box whose x2/y2 equal the image size (pixel-edge convention) is drawn inside the image."""
    from nextchat.demo.core import Reply

    model, processor = loaded
    session = ChatSession(model, processor, shapes_image(), progress=None)
    from nextchat.demo.core import GroundedEntity

    entity = GroundedEntity(index=0, text="x", span=(0, 1), box=[60.0, 30.0, 96.0, 64.0], box_normalized=None,
                            mask=None, score=None, color=DRAW_COLORS[1])
    image = session.draw(Reply(question="q", text="x", entities=[entity], image=None))
    path = tmp_path / "border.png"
    image.save(path)
    assert_boxes_drawn(path, [{"box": entity.box, "color": entity.color}])
