"""Regenerate the README's picture of the web demo (`demo/screenshot.png`): `nextchat-demo` with the shipped tiny
model, served on localhost and driven by headless Chromium, answering a grounded-caption question about a shapes
scene it never saw (the first evaluation seed).

    python examples/demo_screenshot.py [--output demo/screenshot.png] [--chromium /usr/bin/chromium]
"""

import argparse
import os
import socket
import tempfile

import PIL.Image

from nextchat.demo import web
from nextchat.demo.core import default_model_dir, load_model
from nextchat.training.synthetic import GC_TEMPLATES, render_scene


HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(HERE, "..", "demo", "screenshot.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--seed", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    model_dir = default_model_dir()
    if model_dir is None:
        raise SystemExit("no shipped model in examples/tiny-nextchat-shapes")
    model, processor = load_model(model_dir, device="cpu")
    demo = web.build_demo(model, processor, model_name=os.path.basename(model_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web.launch(demo, "127.0.0.1", port, block=False)
    try:
        with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
            scene, _ = render_scene(args.seed)
            picture = os.path.join(tmp, "scene.png")
            scene.resize((scene.width * 5, scene.height * 5), PIL.Image.NEAREST).save(picture)
            browser = p.chromium.launch(executable_path=args.chromium, headless=True,
                                        args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#nc-input-image input[type=file]").set_input_files(picture)
            page.wait_for_function("document.querySelector('#nc-status').innerText.includes('loaded')")
            page.locator("#nc-question textarea").fill(GC_TEMPLATES[0])
            page.locator("#nc-send").click()
            page.locator("#nc-conversation .nc-phrase").first.wait_for()
            page.wait_for_selector("#nc-output-image img")
            page.wait_for_timeout(1000)
            shot = os.path.join(tmp, "shot.png")
            page.screenshot(path=shot, full_page=True)
            browser.close()
            small = PIL.Image.open(shot).convert("RGB").quantize(colors=64, method=PIL.Image.Quantize.MEDIANCUT)
            small.save(args.output, optimize=True)
    finally:
        demo.close()
    print(f"written {os.path.abspath(args.output)}")


if __name__ == "__main__":
    main()
