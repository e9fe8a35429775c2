"""`nextchat-demo` served on localhost and driven by headless Chromium (Debian's /usr/bin/chromium through
Playwright): upload an image, ask, check that the answer (with its coloured grounded phrase) and the annotated
image appear, ask about a clicked box, and check that errors reach the page as messages. A screenshot is saved
under tests/artifacts/ (or $NEXTCHAT_TEST_ARTIFACTS)."""

import io
import os
import socket
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageColor
import pytest

from nextchat.demo.core import DRAW_COLORS, load_model
from nextchat.demo.tiny_folder import QUESTION, SQUARE_BOX, build_tiny_demo_folder, shapes_image


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
ARTIFACTS = Path(os.environ.get("NEXTCHAT_TEST_ARTIFACTS", Path(__file__).resolve().parent / "artifacts"))
SCALE = 4  # the page shows a 384 x 256 version of the tiny model's 96 x 64 picture

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from nextchat.demo import web

    folder = build_tiny_demo_folder(tmp_path_factory.mktemp("web") / "tiny-demo-model")
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


def upload(page, tmp_path):
    path = tmp_path / "shapes.png"
    image = shapes_image()
    image.resize((image.width * SCALE, image.height * SCALE), PIL.Image.NEAREST).save(path)
    page.locator("#nc-input-image input[type=file]").set_input_files(str(path))
    page.wait_for_function(
        "document.querySelector('#nc-status') && document.querySelector('#nc-status').innerText.includes('loaded')"
    )


def ask(page, question):
    page.locator("#nc-question textarea").fill(question)
    page.locator("#nc-send").click()


def output_image(page) -> PIL.Image.Image:
    src = page.locator("#nc-output-image img").first.get_attribute("src")
    assert src
    response = page.request.get(src if src.startswith("http") else page.url.rstrip("/") + "/" + src.lstrip("/"))
    assert response.ok
    return PIL.Image.open(io.BytesIO(response.body())).convert("RGB")


def test_web_upload_ask_answer_and_annotated_image(page, tmp_path):
    upload(page, tmp_path)
    ask(page, QUESTION)
    phrase = page.locator("#nc-conversation .nc-phrase").first
    phrase.wait_for()
    assert "The red square" in page.locator("#nc-conversation .nc-answer").first.inner_text()
    assert phrase.inner_text() == "The red square"
    assert phrase.get_attribute("data-color") == DRAW_COLORS[0]
    assert "[0]" in page.locator("#nc-conversation .nc-ref").first.inner_text()
    page.wait_for_selector("#nc-output-image img")
    annotated = output_image(page)
    assert annotated.size == (96 * SCALE, 64 * SCALE)
    pixels = np.asarray(annotated)
    colour = PIL.ImageColor.getrgb(DRAW_COLORS[0])
    assert (pixels == colour).all(-1).sum() > 50  # the box outline
    status = page.locator("#nc-status").inner_text()
    assert "1 grounded phrase" in status
    # the outline sits around the square: its colour is found near each edge of the true square
    x1, y1, x2, y2 = (SCALE * v for v in SQUARE_BOX)
    ys, xs = np.nonzero((pixels == colour).all(-1))
    assert abs(xs.min() - x1) < 6 * SCALE and abs(xs.max() - x2) < 6 * SCALE
    assert abs(ys.max() - y2) < 6 * SCALE
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "demo_web.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("NEXTCHAT_UPDATE_SCREENSHOT") == "1":  # refresh the README's picture
        small = PIL.Image.open(shot).convert("RGB").quantize(colors=64, method=PIL.Image.Quantize.MEDIANCUT)
        small.save(Path(__file__).resolve().parents[1] / "demo" / "screenshot.png", optimize=True)


def test_web_click_box_then_ask_about_region(page, tmp_path):
    upload(page, tmp_path)
    image = page.locator("#nc-input-image img").first
    image.wait_for()
    bbox = image.bounding_box()
    # the picture is centred in its element, shrunk when too big (object-fit: scale-down or contain): click the
    # corners of the blue circle
    width, height = 96 * SCALE, 64 * SCALE
    scale = min(bbox["width"] / width, bbox["height"] / height)
    if image.evaluate("e => getComputedStyle(e).objectFit") == "scale-down":
        scale = min(scale, 1.0)
    left = bbox["x"] + (bbox["width"] - scale * width) / 2
    top = bbox["y"] + (bbox["height"] - scale * height) / 2
    for x, y in ((52 * SCALE, 20 * SCALE), (84 * SCALE, 52 * SCALE)):
        page.mouse.click(left + x * scale, top + y * scale)
        page.wait_for_timeout(300)
    page.wait_for_function("document.querySelector('#nc-boxes textarea').value.split(',').length === 4")
    typed = [float(v) for v in page.locator("#nc-boxes textarea").input_value().split(",")]
    assert np.allclose(typed, [52 * SCALE, 20 * SCALE, 84 * SCALE, 52 * SCALE], atol=3 * SCALE), typed
    page.locator("#nc-settings").get_by_text("Generation settings").click()
    page.locator("#nc-mode").get_by_text("Beam search").click()
    page.locator("#nc-example-3").click()  # "What is in region [0]?"
    page.wait_for_function("document.querySelector('#nc-question textarea').value.includes('[0]')")
    page.locator("#nc-send").click()
    page.wait_for_selector("#nc-conversation .nc-user-box")
    assert "[0]" in page.locator("#nc-conversation .nc-user-box").first.inner_text()
    assert "beam search (5 beams)" in page.locator("#nc-conversation .nc-meta").first.inner_text()
    page.wait_for_selector("#nc-output-image img")
    # the user's box is drawn in grey
    pixels = np.asarray(output_image(page))
    assert (pixels == (127, 127, 127)).all(-1).sum() > 50


def test_web_errors_are_messages(page, tmp_path):
    ask(page, "Where is the square?")
    page.wait_for_function("document.querySelector('#nc-status').innerText.includes('Upload an image first')")
    upload(page, tmp_path)
    page.locator("#nc-boxes textarea").fill("10,10,5000,20")
    ask(page, "What is [0]?")
    page.wait_for_function("document.querySelector('#nc-status').innerText.includes('leaves the image')")
    page.locator("#nc-boxes textarea").fill("")
    ask(page, "What is [3]?")
    page.wait_for_function("document.querySelector('#nc-status').innerText.includes('refers to box [3]')")
    assert "Traceback" not in page.content()
    assert page.locator("#nc-conversation .nc-turn").count() == 0
