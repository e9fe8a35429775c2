"""`nextchat-demo`: the NExT-Chat web page (Gradio), served locally.

    nextchat-demo                       # the shipped tiny model, http://127.0.0.1:7860
    nextchat-demo --model DIR --port 8000

Upload an image, ask a question. The answer shows every grounded phrase underlined in the colour of its box, and
the image with the boxes (numbered ``[i]``) and SAM masks (outline and light fill) drawn. To ask about a region,
click two opposite corners on the image (the first is marked) or type ``x1,y1,x2,y2`` in the box field, one box
per line, and refer to the box as ``[i]`` in the question (``What is region [0]?``). Boxes are numbered per
conversation, the model's boxes included, so a later question may refer to a box the model found; the number a new
box will get is shown above the question, drawn on the image, and written by the "What is in my box?" example.
Images are shown and drawn resized for the screen (:func:`nextchat.demo.core.display_scale`); boxes, typed and
reported, stay in the uploaded image's pixels. Example buttons fill in the original demo's prompts; the settings
choose greedy decoding, beam search or sampling, and the answer length. Problems (a file that is no usable image, a
wrong box...) show up as messages on the page, never as tracebacks. After an answer, a note under the conversation
recommends "New conversation" for unrelated questions, and for every question when the model's ``config.json`` says
it was trained on single turns (``"nextchat_training": {"max_turns": 1}``).

Needs ``pip install gradio`` (only this module imports it).
"""

import argparse
import functools
import os
import sys
import traceback

from .core import (
    DISPLAY_MAX_SIDE,
    DISPLAY_MIN_SIDE,
    EXAMPLE_PROMPTS,
    SINGLE_TURN_NOTE,
    ChatSession,
    DemoError,
    GenerationSettings,
    conversation_html,
    format_box,
    load_model,
    log,
    parse_boxes,
    resolve_model_dir,
    training_max_turns,
)


CSS = """
#nc-conversation .nc-turn {margin-bottom: 0.8em}
#nc-conversation .nc-user {color: var(--body-text-color)}
#nc-conversation .nc-assistant {margin-top: 0.2em; font-size: 1.05em}
#nc-conversation .nc-legend {margin: 0.3em 0 0 1em; padding: 0; list-style: none; font-size: 0.9em}
#nc-conversation .nc-swatch {display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px}
#nc-conversation .nc-meta {font-size: 0.8em; color: var(--body-text-color-subdued)}
#nc-conversation .nc-user-box {font-family: monospace; font-size: 0.85em; margin-right: 0.5em}
#nc-conversation .nc-note {font-size: 0.9em; color: var(--body-text-color-subdued); border-left: 3px solid #7F7F7F;
                           padding-left: 0.5em}
#nc-conversation .nc-note-single-turn {color: var(--body-text-color); border-left-color: #F76566}
#nc-status {min-height: 1.5em}
#nc-box-hint p {font-weight: 600}
"""
EMPTY_CONVERSATION = '<div class="nc-empty">Upload an image, then ask a question (or use an example below).</div>'


def _import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise DemoError("the web demo needs gradio: pip install gradio") from err
    return gr


def _pending_boxes(session: ChatSession | None, typed: str) -> list[list[float]]:
    """The valid boxes typed for the next question (a wrong one is reported by the hint, not drawn)."""
    if session is None or session.image is None:
        return []
    boxes = []
    for box in parse_boxes(typed):
        try:
            boxes.append(session.check_box(box))
        except DemoError:
            pass
    return boxes


def _box_hint(session: ChatSession | None, typed: str, corner) -> str:
    """Shown above the question: the numbers the boxes of the next question will have."""
    first = session.next_box_index if session is not None else 0
    try:
        boxes = parse_boxes(typed)
        for box in boxes:
            if session is not None and session.image is not None:
                session.check_box(box)
    except DemoError as err:
        return f"⚠️ {err}"
    parts = []
    if boxes:
        names = ", ".join(f"[{first + k}]" for k in range(len(boxes)))
        parts.append(f"Your box{'es' if len(boxes) > 1 else ''} for this question: {names}. Write "
                     f"{names} in the question.")
    else:
        parts.append(f"To ask about a region, click two opposite corners on the image: the box will be [{first}].")
    if corner is not None:
        parts.append(f"First corner at ({corner[0]}, {corner[1]}), marked on the image: click the opposite corner.")
    return " ".join(parts)


def build_demo(model, processor, default_settings: GenerationSettings | None = None, iou_threshold: float = 0.3,
               title: str = "NExT-Chat", model_name: str = ""):
    """The Gradio Blocks of the demo (not launched). ``model``/``processor`` are shared by all visitors; each
    browser session has its own conversation."""
    gr = _import_gradio()
    defaults = (default_settings or GenerationSettings()).validate()
    keep = gr.update()

    def new_session(path) -> ChatSession:
        return ChatSession(model, processor, path, settings=defaults, iou_threshold=iou_threshold, progress=log,
                           display_sides=(DISPLAY_MIN_SIDE, DISPLAY_MAX_SIDE), image_name=os.path.basename(path))

    def view(session, typed, corner=None):
        if session is None or session.image is None:
            return None
        return session.draw_pending(_pending_boxes(session, typed), corner)

    def guarded(handler, n_outputs, message_position):
        """Whatever goes wrong becomes a message (in the output at ``message_position``): a handler that raised
        would mark every output of the event with an error badge."""

        @functools.wraps(handler)  # gradio reads the signature (event data, progress)
        def run(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except Exception as err:
                traceback.print_exc(file=sys.stderr)
                message = f"⚠️ Internal error ({type(err).__name__}): {err}"
                return tuple(message if k == message_position else keep for k in range(n_outputs))

        return run

    # -- handlers ---------------------------------------------------------------------------------------------

    def on_upload(path):
        """A new (or removed) file starts a new conversation; a file that is no usable image is refused with a
        message, and the file field is emptied for the next try."""
        # outputs: upload, session, image view, answer image, conversation, status, corner, boxes, hint
        if path is None:
            return None, None, None, None, EMPTY_CONVERSATION, "", None, "", _box_hint(None, "", None)
        try:
            session = new_session(path)
        except DemoError as err:
            return None, None, None, None, EMPTY_CONVERSATION, f"⚠️ {err}", None, "", _box_hint(None, "", None)
        width, height = session.image.size
        shown = ""
        if session.scale != 1:
            shown = f", shown at {session.display_image.width} x {session.display_image.height}"
        status = f"Image {width} x {height} loaded{shown}: ask a question."
        return (keep, session, view(session, ""), None, conversation_html(session), status, None, "",
                _box_hint(session, "", None))

    def on_click(session, typed, corner, evt: gr.SelectData):
        # outputs: corner, boxes, image view, hint
        if session is None or session.image is None:
            return corner, typed, keep, "⚠️ Upload an image first."
        try:
            x, y = session.to_image_point(*(float(v) for v in evt.index[:2]))
        except (TypeError, ValueError, IndexError):
            return corner, typed, keep, "⚠️ Could not read the clicked position."
        if corner is None:
            return (x, y), typed, view(session, typed, (x, y)), _box_hint(session, typed, (x, y))
        x1, x2 = sorted((corner[0], x))
        y1, y2 = sorted((corner[1], y))
        if x1 == x2 or y1 == y2:
            return None, typed, view(session, typed), "⚠️ The two corners must differ in x and in y: click again."
        box = f"{x1},{y1},{x2},{y2}"
        typed = (typed.rstrip() + "\n" + box).strip() if typed else box
        return None, typed, view(session, typed), _box_hint(session, typed, None)

    def on_boxes_typed(session, typed, corner):
        # outputs: image view, hint
        return view(session, typed, corner), _box_hint(session, typed, corner)

    def on_clear_boxes(session):
        # outputs: corner, boxes, image view, hint
        return None, "", view(session, ""), _box_hint(session, "", None)

    def on_new_chat(session, typed):
        # outputs: session, answer image, conversation, status, corner, image view, hint
        if session is None:
            return None, None, EMPTY_CONVERSATION, "Upload an image to start.", None, None, _box_hint(None, typed, None)
        session.reset()
        return (session, None, conversation_html(session), "New conversation: ask a question.", None,
                view(session, typed), _box_hint(session, typed, None))

    def on_send(session, question, typed, mode, max_new_tokens, num_beams, temperature, top_p, top_k, seed,
                progress=gr.Progress()):
        # outputs: answer image, conversation, status, question, boxes, corner, image view, hint
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
            return keep, keep, f"⚠️ {err}", keep, keep, keep, keep, keep
        found = len(reply.entities)
        status = (
            f"Answered in {reply.seconds:.1f} s: {found} grounded phrase{'s' if found != 1 else ''}"
            + (" (" + ", ".join(f"[{e.index}] {format_box(e.box)}" for e in reply.entities if e.box) + ")" if found else "")
            + "."
        )
        return (
            reply.image, conversation_html(session), status, "", "", None, view(session, ""),
            _box_hint(session, "", None),
        )

    def example(template):
        def fill(question, session):
            text = (question or "").strip()
            if "[0]" in template:
                # the first box of this question, whatever the conversation numbered before
                first = session.next_box_index if session is not None else 0
                return template.replace("[0]", f"[{first}]")
            if "{}" in template:
                if "Where is" in template:
                    subject = text.rstrip("?.") if text and len(text.split()) <= 6 and "?" not in text else "the object"
                    return template.format(subject)
                return template.format(text or "What is happening in the image?")
            return template

        return fill

    # -- layout -----------------------------------------------------------------------------------------------

    single_turn = training_max_turns(model) == 1
    with gr.Blocks(title=title) as demo:
        gr.Markdown(
            f"# {title}\n"
            "Upload an image and ask. Grounded phrases are underlined in the colour of their box. "
            "To ask about a region, click two opposite corners on the image (or type `x1,y1,x2,y2`) and refer to "
            "it by the number shown above the question."
            + (f"  \nModel: `{model_name}`" if model_name else "")
            + (f"  \n**Note:** {SINGLE_TURN_NOTE}" if single_turn else "")
        )
        session_state = gr.State(None)
        corner_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                # a plain file field: every upload reaches the server, which explains what it cannot use (an image
                # field would drop non-images silently and fail on corrupt ones)
                upload = gr.File(
                    label="Upload an image (PNG, JPEG, WebP...)", file_count="single", type="filepath",
                    elem_id="nc-input-image", height=120,
                )
                image_view = gr.Image(
                    type="pil", label="Image: click two opposite corners to add a box", interactive=False,
                    format="png", elem_id="nc-image", buttons=["fullscreen"],
                )
                boxes_text = gr.Textbox(
                    label="Boxes for the next question (pixel x1,y1,x2,y2 of the original image; one per line)",
                    lines=2, elem_id="nc-boxes", placeholder="e.g. 40,30,200,180",
                )
                clear_boxes = gr.Button("Clear boxes", elem_id="nc-clear-boxes", size="sm")
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
                    elem_id="nc-output-image", buttons=["download", "fullscreen"],
                )
                conversation = gr.HTML(EMPTY_CONVERSATION, elem_id="nc-conversation")
                status = gr.Markdown("", elem_id="nc-status")
                box_hint = gr.Markdown(_box_hint(None, "", None), elem_id="nc-box-hint")
                question = gr.Textbox(
                    label="Question", placeholder="Where is the dog in the image?", elem_id="nc-question", lines=1,
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="nc-send", scale=2)
                    new_chat = gr.Button("New conversation", elem_id="nc-new-chat", scale=1)
                with gr.Row():
                    example_buttons = []
                    for k, (label, template) in enumerate(EXAMPLE_PROMPTS.items()):
                        button = gr.Button(label, size="sm", elem_id=f"nc-example-{k}")
                        example_buttons.append((button, template))

        def listen(event, handler, inputs, outputs):
            message_to = status if status in outputs else box_hint
            event(guarded(handler, len(outputs), outputs.index(message_to)), inputs, outputs)

        upload_outputs = [upload, session_state, image_view, output_image, conversation, status, corner_state,
                          boxes_text, box_hint]
        # not .change: emptying the field after a refused file must not clear the message
        listen(upload.upload, on_upload, [upload], upload_outputs)
        listen(upload.clear, on_upload, [upload], upload_outputs)
        listen(image_view.select, on_click, [session_state, boxes_text, corner_state],
               [corner_state, boxes_text, image_view, box_hint])
        listen(boxes_text.input, on_boxes_typed, [session_state, boxes_text, corner_state], [image_view, box_hint])
        listen(clear_boxes.click, on_clear_boxes, [session_state], [corner_state, boxes_text, image_view, box_hint])
        listen(new_chat.click, on_new_chat, [session_state, boxes_text],
               [session_state, output_image, conversation, status, corner_state, image_view, box_hint])
        send_inputs = [session_state, question, boxes_text, mode, max_new_tokens, num_beams, temperature, top_p,
                       top_k, seed]
        send_outputs = [output_image, conversation, status, question, boxes_text, corner_state, image_view, box_hint]
        listen(send.click, on_send, send_inputs, send_outputs)
        listen(question.submit, on_send, send_inputs, send_outputs)
        for button, template in example_buttons:
            button.click(example(template), [question, session_state], [question])
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
