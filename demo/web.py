"""`nextchat-demo`: the NExT-Chat web page (Gradio), served locally.

    nextchat-demo                       # the shipped tiny model, http://127.0.0.1:7860
    nextchat-demo --model DIR --port 8000

Upload an image, ask a question. The answer shows every grounded phrase underlined in the colour of its box, and
the image with the boxes (numbered ``[i]``) and SAM masks drawn. To ask about a region, click two opposite corners
on the image (or type ``x1,y1,x2,y2`` in the box field, one box per line) and refer to the box as ``[i]`` in the
question (``What is region [0]?``). Boxes are numbered per conversation, the model's boxes included, so a later
question may refer to a box the model found. Example buttons fill in the original demo's prompts; the settings
choose greedy decoding, beam search or sampling, and the answer length. Problems show up as messages on the page.

Needs ``pip install gradio`` (only this module imports it).
"""

import argparse
import os
import sys
import traceback

from .core import (
    EXAMPLE_PROMPTS,
    ChatSession,
    DemoError,
    GenerationSettings,
    conversation_html,
    format_box,
    load_model,
    log,
    parse_boxes,
    resolve_model_dir,
)


CSS = """
#nc-conversation .nc-turn {margin-bottom: 0.8em}
#nc-conversation .nc-user {color: var(--body-text-color)}
#nc-conversation .nc-assistant {margin-top: 0.2em; font-size: 1.05em}
#nc-conversation .nc-legend {margin: 0.3em 0 0 1em; padding: 0; list-style: none; font-size: 0.9em}
#nc-conversation .nc-swatch {display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px}
#nc-conversation .nc-meta {font-size: 0.8em; color: var(--body-text-color-subdued)}
#nc-conversation .nc-user-box {font-family: monospace; font-size: 0.85em; margin-right: 0.5em}
#nc-status {min-height: 1.5em}
"""


def _import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise DemoError("the web demo needs gradio: pip install gradio") from err
    return gr


def _box_hint(session: ChatSession | None, typed: str, corner) -> str:
    first = session.next_box_index if session is not None else 0
    try:
        n_typed = len(parse_boxes(typed))
    except DemoError as err:
        return f"⚠️ {err}"
    parts = []
    if n_typed:
        names = ", ".join(f"[{first + k}]" for k in range(n_typed))
        parts.append(f"The typed box(es) will be {names}: mention them in the question.")
    else:
        parts.append(f"Click two opposite corners on the image to add a box; the next box is [{first}].")
    if corner is not None:
        parts.append(f"First corner at ({corner[0]}, {corner[1]}): click the opposite corner.")
    return " ".join(parts)


def build_demo(model, processor, default_settings: GenerationSettings | None = None, iou_threshold: float = 0.3,
               title: str = "NExT-Chat", model_name: str = ""):
    """The Gradio Blocks of the demo (not launched). ``model``/``processor`` are shared by all visitors; each
    browser session has its own conversation."""
    gr = _import_gradio()
    defaults = (default_settings or GenerationSettings()).validate()

    def new_session(image) -> ChatSession:
        return ChatSession(model, processor, image, settings=defaults, iou_threshold=iou_threshold, progress=log)

    # -- handlers ---------------------------------------------------------------------------------------------

    def on_image(image):
        """A new (or cleared) image starts a new conversation."""
        try:
            session = new_session(image) if image is not None else None
        except DemoError as err:
            return None, None, conversation_html_or_empty(None), f"⚠️ {err}", None, ""
        status = "" if image is None else f"Image {image.width} x {image.height} loaded: ask a question."
        return session, None, conversation_html_or_empty(session), status, None, ""

    def conversation_html_or_empty(session):
        if session is None:
            return '<div class="nc-empty">Upload an image, then ask a question (or use an example below).</div>'
        return conversation_html(session)

    def on_click(session, typed, corner, evt: gr.SelectData):
        if session is None or session.image is None:
            return corner, typed, "⚠️ Upload an image first."
        try:
            x, y = (int(round(float(v))) for v in evt.index[:2])
        except Exception:
            return corner, typed, "⚠️ Could not read the clicked position."
        if corner is None:
            return (x, y), typed, _box_hint(session, typed, (x, y))
        x1, x2 = sorted((corner[0], x))
        y1, y2 = sorted((corner[1], y))
        box = f"{x1},{y1},{x2},{y2}"
        typed = (typed.rstrip() + "\n" + box).strip() if typed else box
        return None, typed, _box_hint(session, typed, None)

    def on_boxes_typed(session, typed, corner):
        return _box_hint(session, typed, corner)

    def on_clear_boxes(session):
        return None, "", _box_hint(session, "", None)

    def on_new_chat(session, typed):
        if session is not None:
            session.reset()
        return session, None, conversation_html_or_empty(session), "New conversation.", None, _box_hint(session, typed, None)

    def on_send(session, question, typed, mode, max_new_tokens, num_beams, temperature, top_p, top_k, seed,
                progress=gr.Progress()):
        keep = gr.update()
        try:
            if session is None or session.image is None:
                raise DemoError("Upload an image first.")
            settings = GenerationSettings(
                mode=mode, max_new_tokens=max_new_tokens, num_beams=num_beams, temperature=temperature,
                top_p=top_p, top_k=top_k, seed=None if seed in (None, "") or int(seed) < 0 else int(seed),
            ).validate()
            boxes = parse_boxes(typed)
            progress(0.1, desc=f"Generating ({settings.describe()})...")
            reply = session.ask(question, boxes=boxes, settings=settings)
        except DemoError as err:
            return keep, keep, f"⚠️ {err}", keep, keep, keep, keep
        except Exception as err:  # never show a traceback on the page
            traceback.print_exc(file=sys.stderr)
            return keep, keep, f"⚠️ Internal error ({type(err).__name__}): {err}", keep, keep, keep, keep
        found = len(reply.entities)
        status = (
            f"Answered in {reply.seconds:.1f} s: {found} grounded phrase{'s' if found != 1 else ''}"
            + (" (" + ", ".join(f"[{e.index}] {format_box(e.box)}" for e in reply.entities if e.box) + ")" if found else "")
            + "."
        )
        return (
            reply.image, conversation_html(session), status, "", "", None, _box_hint(session, "", None)
        )

    def example(template):
        def fill(question):
            text = (question or "").strip()
            if "{}" in template:
                if "Where is" in template:
                    subject = text.rstrip("?.") if text and len(text.split()) <= 6 and "?" not in text else "the object"
                    return template.format(subject)
                return template.format(text or "What is happening in the image?")
            return template

        return fill

    # -- layout -----------------------------------------------------------------------------------------------

    with gr.Blocks(title=title) as demo:
        gr.Markdown(
            f"# {title}\n"
            "Upload an image and ask. Grounded phrases are underlined in the colour of their box. "
            "To ask about a region, click two opposite corners on the image (or type `x1,y1,x2,y2`) and refer to "
            "it as `[0]`, `[1]`, ... in the question." + (f"  \nModel: `{model_name}`" if model_name else "")
        )
        session_state = gr.State(None)
        corner_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                input_image = gr.Image(
                    type="pil", label="Image (click two corners to add a box)", sources=["upload", "clipboard"],
                    image_mode=None, elem_id="nc-input-image", height=360,
                )
                boxes_text = gr.Textbox(
                    label="Boxes for the next question (pixel x1,y1,x2,y2; one per line)", lines=2,
                    elem_id="nc-boxes", placeholder="e.g. 40,30,200,180",
                )
                box_hint = gr.Markdown(_box_hint(None, "", None), elem_id="nc-box-hint")
                with gr.Row():
                    clear_boxes = gr.Button("Clear boxes", elem_id="nc-clear-boxes", size="sm")
                    new_chat = gr.Button("New conversation", elem_id="nc-new-chat", size="sm")
                with gr.Accordion("Generation settings", open=False, elem_id="nc-settings"):
                    mode = gr.Radio(
                        [("Greedy", "greedy"), ("Beam search", "beam"), ("Sampling", "sample")],
                        value=defaults.mode, label="Decoding", elem_id="nc-mode",
                    )
                    max_new_tokens = gr.Slider(1, 1024, value=defaults.max_new_tokens, step=1,
                                               label="Max new tokens", elem_id="nc-max-tokens")
                    num_beams = gr.Slider(1, 10, value=defaults.num_beams, step=1, label="Beams (beam search)")
                    temperature = gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05,
                                            label="Temperature (sampling)")
                    top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p (sampling)")
                    top_k = gr.Slider(0, 100, value=defaults.top_k, step=1, label="Top-k (sampling; 0 = off)")
                    seed = gr.Number(value=-1, precision=0, label="Seed (sampling; -1 = random)")
            with gr.Column(scale=1):
                output_image = gr.Image(
                    type="pil", label="Answer: boxes and masks", interactive=False, format="png",
                    elem_id="nc-output-image", height=360,
                )
                conversation = gr.HTML(conversation_html_or_empty(None), elem_id="nc-conversation")
                status = gr.Markdown("", elem_id="nc-status")
                question = gr.Textbox(
                    label="Question", placeholder="Where is the dog in the image?", elem_id="nc-question", lines=1,
                )
                send = gr.Button("Send", variant="primary", elem_id="nc-send")
                with gr.Row():
                    example_buttons = []
                    for k, (label, template) in enumerate(EXAMPLE_PROMPTS.items()):
                        button = gr.Button(label, size="sm", elem_id=f"nc-example-{k}")
                        example_buttons.append((button, template))

        image_outputs = [session_state, output_image, conversation, status, corner_state, boxes_text]
        input_image.change(on_image, [input_image], image_outputs).then(
            on_boxes_typed, [session_state, boxes_text, corner_state], [box_hint]
        )
        input_image.select(on_click, [session_state, boxes_text, corner_state], [corner_state, boxes_text, box_hint])
        boxes_text.change(on_boxes_typed, [session_state, boxes_text, corner_state], [box_hint])
        clear_boxes.click(on_clear_boxes, [session_state], [corner_state, boxes_text, box_hint])
        new_chat.click(on_new_chat, [session_state, boxes_text],
                       [session_state, output_image, conversation, status, corner_state, box_hint])
        send_inputs = [session_state, question, boxes_text, mode, max_new_tokens, num_beams, temperature, top_p,
                       top_k, seed]
        send_outputs = [output_image, conversation, status, question, boxes_text, corner_state, box_hint]
        send.click(on_send, send_inputs, send_outputs)
        question.submit(on_send, send_inputs, send_outputs)
        for button, template in example_buttons:
            button.click(example(template), [question], [question])
    demo.nextchat_css = CSS
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextchat-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None,
                        help="a NExT-Chat folder or a LoRA adapter folder (adapter_config.json, e.g. a LoRA run's "
                        "checkpoint-N/; merged into its base model) (default: the shipped tiny model, or "
                        "$NEXTCHAT_DEMO_MODEL)")
    parser.add_argument("--base-model", default=None,
                        help="with an adapter --model: its base model folder or Hub id (default: the adapter's "
                        "base_model_name_or_path)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--decoding", choices=["greedy", "beam", "sample"], default="greedy",
                        help="default decoding on the page (default greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default answer length (default 128)")
    parser.add_argument("--iou-threshold", type=float, default=0.3, help="hide masks scored below this (0.3)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16")
    return parser


def launch(demo, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the server (``block=False`` returns at once; ``demo.close()`` stops it)."""
    gr = _import_gradio()
    return demo.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, share=False, show_error=False,
        quiet=True, css=getattr(demo, "nextchat_css", None), theme=gr.themes.Default(),
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _import_gradio()
        model_dir = resolve_model_dir(args.model)
        model, processor = load_model(model_dir, device=args.device, dtype=args.dtype, base_model=args.base_model)
        settings = GenerationSettings(mode=args.decoding, max_new_tokens=args.max_new_tokens).validate()
        demo = build_demo(model, processor, settings, iou_threshold=args.iou_threshold,
                          model_name=os.path.basename(os.path.normpath(model_dir)))
        log(f"serving on http://{args.host}:{args.port} (Ctrl+C to stop)")
        launch(demo, args.host, args.port, block=True)
    except DemoError as err:
        print(f"nextchat-demo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
