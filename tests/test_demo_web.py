"""`nextchat-demo` served on localhost and driven by headless Chromium (Debian's /usr/bin/chromium through
Playwright): upload an image, ask, check that the answer (with its coloured grounded phrase) and the annotated
image appear, ask about a clicked box, and check that bad uploads and other errors reach the page as messages (and
leave no traceback in the server's log). A screenshot is saved under tests/artifacts/ (or
$NEXTCHAT_TEST_ARTIFACTS)."""

import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageColor
import pytest

from nextchat.demo.core import DISPLAY_MAX_SIDE, DRAW_COLORS, MAX_IMAGE_PIXELS, load_model
from tiny_demo_folder import QUESTION, SQUARE_BOX, build_tiny_demo_folder, shapes_image


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
ARTIFACTS = Path(os.environ.get("NEXTCHAT_TEST_ARTIFACTS", Path(__file__).resolve().parent / "artifacts"))
ENLARGED = 6  # the page shows the tiny model's 96 x 64 picture 6 times larger (576 x 384)
HUGE = 40  # a 3840 x 2560 upload of the same picture

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from nextchat.demo import web

    folder = build_tiny_demo_folder(tmp_path_factory.mktemp("web") / "tiny-demo-model")
    # the tiny model learnt one single-turn conversation: its folder says so, as a single-turn model's should
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "nextchat_training": {"max_turns": 1}}, indent=2))
    model, processor = load_model(folder, device="cpu")
    demo = web.build_demo(model, processor, model_name="tiny test model")
    port = free_port()
    web.launch(demo, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(server)
    page.wait_for_selector("#nc-input-image")
    yield page
    context.close()


def status_includes(page, text):
    page.wait_for_function(
        "t => document.querySelector('#nc-status') && document.querySelector('#nc-status').innerText.includes(t)",
        arg=text,
    )


def upload(page, path, expect="loaded"):
    page.locator("#nc-input-image input[type=file]").set_input_files(str(path))
    status_includes(page, expect)


def upload_shapes(page, tmp_path, scale=1):
    path = tmp_path / f"shapes_x{scale}.png"
    image = shapes_image()
    image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST).save(path)
    upload(page, path)


def ask(page, question):
    page.locator("#nc-question textarea").fill(question)
    page.locator("#nc-send").click()


def fetch_image(page, selector) -> PIL.Image.Image:
    src = page.locator(f"{selector} img").first.get_attribute("src")
    assert src
    response = page.request.get(src if src.startswith("http") else page.url.rstrip("/") + "/" + src.lstrip("/"))
    assert response.ok
    return PIL.Image.open(io.BytesIO(response.body())).convert("RGB")


def output_image(page) -> PIL.Image.Image:
    return fetch_image(page, "#nc-output-image")


def wait_for_new_image(page, selector, old_src):
    page.wait_for_function(
        "([s, old]) => { const i = document.querySelector(s + ' img'); return i && i.src && i.src !== old "
        "&& i.complete && i.naturalWidth > 0; }",
        arg=[selector, old_src],
    )


def image_src(page, selector):
    img = page.locator(f"{selector} img")
    return img.first.get_attribute("src") if img.count() else None


def shown_picture(page, selector):
    """(left, top, scale) of the picture inside its <img>: the picture is centred and fitted (object-fit)."""
    image = page.locator(f"{selector} img").first
    image.wait_for()
    box = image.bounding_box()
    natural_w, natural_h, fit = image.evaluate("e => [e.naturalWidth, e.naturalHeight, getComputedStyle(e).objectFit]")
    scale = min(box["width"] / natural_w, box["height"] / natural_h)
    if fit == "scale-down":
        scale = min(scale, 1.0)
    elif fit not in ("contain",):
        scale_x, scale_y = box["width"] / natural_w, box["height"] / natural_h
        assert abs(scale_x - scale_y) < 0.02, fit
        scale = scale_x
    left = box["x"] + (box["width"] - scale * natural_w) / 2
    top = box["y"] + (box["height"] - scale * natural_h) / 2
    return left, top, scale, natural_w, natural_h


def test_web_upload_ask_answer_and_annotated_image(page, tmp_path):
    upload_shapes(page, tmp_path)
    # the 96 x 64 picture is shown enlarged (whole factor, sharp pixels), not 96 pixels wide
    assert "Image 96 x 64 loaded, shown at 576 x 384" in page.locator("#nc-status").inner_text()
    _, _, scale, natural_w, natural_h = shown_picture(page, "#nc-image")
    assert (natural_w, natural_h) == (96 * ENLARGED, 64 * ENLARGED)
    assert natural_w * scale >= 400
    ask(page, QUESTION)
    phrase = page.locator("#nc-conversation .nc-phrase").first
    phrase.wait_for()
    assert "The red square" in page.locator("#nc-conversation .nc-answer").first.inner_text()
    assert phrase.inner_text() == "The red square"
    assert phrase.get_attribute("data-color") == DRAW_COLORS[0]
    assert "[0]" in page.locator("#nc-conversation .nc-ref").first.inner_text()
    page.wait_for_selector("#nc-output-image img")
    annotated = output_image(page)
    assert annotated.size == (96 * ENLARGED, 64 * ENLARGED)
    pixels = np.asarray(annotated).astype(int)
    colour = PIL.ImageColor.getrgb(DRAW_COLORS[0])
    assert (pixels == colour).all(-1).sum() > 50  # the box outline
    # the status gives the box in the uploaded image's pixels; the drawing has it 6 times larger
    status = page.locator("#nc-status").inner_text()
    assert "1 grounded phrase" in status
    reported = [float(v) for v in status.split("[0] (")[1].split(")")[0].split(",")]
    assert np.allclose(reported, SQUARE_BOX, atol=6), reported
    x1, y1, x2, y2 = (ENLARGED * v for v in SQUARE_BOX)
    ys, xs = np.nonzero((pixels == colour).all(-1))
    assert abs(xs.min() - x1) < 6 * ENLARGED and abs(xs.max() - x2) < 6 * ENLARGED
    assert abs(ys.max() - y2) < 6 * ENLARGED
    # the mask is a light fill: the middle of the square keeps the square's own red, not the box colour
    middle = pixels[(y1 + y2) // 2, (x1 + x2) // 2]
    assert np.abs(middle - (200, 30, 30)).max() <= 20, middle
    # after the first answer: a note that this single-turn model answers follow-ups less well, and the button
    note = page.locator("#nc-conversation .nc-note-single-turn")
    assert note.is_visible() and "single-question conversations" in note.inner_text()
    assert page.locator("#nc-new-chat").is_visible()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "demo_web.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("NEXTCHAT_UPDATE_SCREENSHOT") == "1":  # refresh the README's picture
        small = PIL.Image.open(shot).convert("RGB").quantize(colors=64, method=PIL.Image.Quantize.MEDIANCUT)
        small.save(Path(__file__).resolve().parents[1] / "demo" / "screenshot.png", optimize=True)
    page.locator("#nc-new-chat").click()
    status_includes(page, "New conversation")
    assert page.locator("#nc-conversation .nc-turn").count() == 0
    assert page.locator("#nc-conversation .nc-note").count() == 0


def test_web_click_box_after_an_answer(page, tmp_path):
    """After an answer with box [0], two clicks mark a corner then a box; the page numbers it [1] above the question,
    the example button writes [1], and the question about it is answered."""
    upload_shapes(page, tmp_path)
    ask(page, QUESTION)
    page.locator("#nc-conversation .nc-phrase").first.wait_for()
    page.wait_for_selector("#nc-output-image img")
    assert "[1]" in page.locator("#nc-box-hint").inner_text()
    left, top, scale, _, _ = shown_picture(page, "#nc-image")
    before = np.asarray(fetch_image(page, "#nc-image")).astype(int)
    # the corners of the blue circle, in the uploaded picture's pixels -> the middle of the screen pixel there
    corners = [(52, 20), (84, 52)]
    old = image_src(page, "#nc-image")
    x, y = corners[0]
    page.mouse.click(left + (x * ENLARGED + 0.5) * scale, top + (y * ENLARGED + 0.5) * scale)
    wait_for_new_image(page, "#nc-image", old)
    # the first corner is marked on the image
    marked = np.asarray(fetch_image(page, "#nc-image")).astype(int)
    changed = np.abs(marked - before).sum(-1) > 0
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 20 and np.hypot(xs.mean() - x * ENLARGED, ys.mean() - y * ENLARGED) < 2 * ENLARGED
    assert "First corner at (52, 20)" in page.locator("#nc-box-hint").inner_text()
    old = image_src(page, "#nc-image")
    x, y = corners[1]
    page.mouse.click(left + (x * ENLARGED + 0.5) * scale, top + (y * ENLARGED + 0.5) * scale)
    page.wait_for_function("document.querySelector('#nc-boxes textarea').value.split(',').length === 4")
    typed = [float(v) for v in page.locator("#nc-boxes textarea").input_value().split(",")]
    assert np.allclose(typed, [52, 20, 84, 52], atol=1), typed
    wait_for_new_image(page, "#nc-image", old)
    grey = (np.asarray(fetch_image(page, "#nc-image")) == (127, 127, 127)).all(-1)
    assert grey.sum() > 50  # the box is drawn, labelled with its number
    assert "for this question: [1]" in page.locator("#nc-box-hint").inner_text()
    page.locator("#nc-settings").get_by_text("Generation settings").click()
    page.locator("#nc-mode").get_by_text("Beam search").click()
    page.locator("#nc-example-3").click()  # "What is region [0]?" with this question's box number
    page.wait_for_function("document.querySelector('#nc-question textarea').value === 'What is region [1]?'")
    page.locator("#nc-send").click()
    page.wait_for_function("document.querySelectorAll('#nc-conversation .nc-turn').length === 2")
    assert "[1]" in page.locator("#nc-conversation .nc-user-box").first.inner_text()
    assert "⚠️" not in page.locator("#nc-status").inner_text()
    assert "beam search (5 beams)" in page.locator("#nc-conversation .nc-meta").nth(1).inner_text()
    # the user's box is drawn in grey on the answer
    pixels = np.asarray(output_image(page))
    assert (pixels == (127, 127, 127)).all(-1).sum() > 50


def test_web_huge_image_is_drawn_small_with_boxes_in_its_pixels(page, tmp_path):
    upload_shapes(page, tmp_path, scale=HUGE)
    assert "Image 3840 x 2560 loaded, shown at 1024 x 683" in page.locator("#nc-status").inner_text()
    ask(page, QUESTION)
    status_includes(page, "Answered")
    page.wait_for_selector("#nc-output-image img")
    annotated = output_image(page)
    assert annotated.width <= DISPLAY_MAX_SIDE and annotated.size == (1024, 683)
    status = page.locator("#nc-status").inner_text()
    reported = [float(v) for v in status.split("[0] (")[1].split(")")[0].split(",")]
    assert np.allclose(reported, [HUGE * v for v in SQUARE_BOX], atol=6 * HUGE), reported


def test_web_bad_uploads_are_messages(page, tmp_path, capfd):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    text = tmp_path / "notes.txt"
    text.write_text("not a picture\n")
    tiny = tmp_path / "dot.png"
    PIL.Image.new("RGB", (1, 1), (255, 0, 0)).save(tiny)
    huge = tmp_path / "huge.png"
    side = int(MAX_IMAGE_PIXELS**0.5) + 100
    PIL.Image.new("1", (side, side)).save(huge)  # a real, valid PNG of too many pixels (small as a file)
    for path, message in [
        (corrupt, "corrupt.png cannot be read: the file is damaged or is not really a PNG image"),
        (text, "notes.txt is not an image"),
        (tiny, "dot.png is 1 x 1 pixels: too small"),
        (huge, f"huge.png is {side} x {side} pixels ({side * side / 1e6:.0f} megapixels): too large"),
    ]:
        upload(page, path, expect=message)
        assert page.locator("#nc-image img").count() == 0  # nothing to click or ask about
        ask(page, QUESTION)
        status_includes(page, "Upload an image first")
    upload_shapes(page, tmp_path)
    assert "⚠️" not in page.locator("#nc-status").inner_text()
    page.locator("#nc-boxes textarea").fill("10,10,5000,20")
    ask(page, "What is [0]?")
    status_includes(page, "leaves the image")
    page.locator("#nc-boxes textarea").fill("")
    ask(page, "What is [3]?")
    status_includes(page, "refers to box [3]")
    ask(page, QUESTION)
    status_includes(page, "Answered")
    assert "Traceback" not in page.content()
    assert page.get_by_text("Error", exact=True).count() == 0  # gradio's badge on the outputs of a failed event
    log = capfd.readouterr().err
    assert "[nextchat] generating" in log  # the server's log is captured here ...
    assert "Traceback" not in log  # ... and has no traceback
