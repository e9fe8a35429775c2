"""`nextchat-chat`: ask NExT-Chat about an image from the command line.

    nextchat-chat IMAGE "Where is the dog in the image?"
    nextchat-chat IMAGE "What is in region [0]?" --box 40,30,200,180
    nextchat-chat IMAGE                      # interactive: a multi-turn chat on stdin

Prints the answer with each grounded phrase followed by its box number ``[i]``, then one line per box (pixel
``x1, y1, x2, y2`` on the original image, SAM's score, the mask area, the drawing colour), and writes the image
with the boxes and masks drawn next to the input (``<image>_nextchat.png``, or ``--output``; in a chat, turn n > 1
writes ``<name>_<n>.png``). ``--json`` prints one JSON object per answer instead. Progress goes to stderr.

Boxes are numbered per conversation: ``--box`` boxes are ``[0]``, ``[1]``, ... in the order given, and every box
the model grounds gets the next number, so a later question may refer to it. In the interactive chat:

    /box x1,y1,x2,y2   add a box for the next question (it gets the next free number)
    /boxes             list the boxes of the conversation
    /image PATH        switch to another image (new conversation)
    /reset             new conversation, same image
    /quit              (or end of input)

In a terminal the question line has readline editing (arrow keys, Ctrl+A/E, ...) and a history kept across chats
in ``~/.nextchat_chat_history`` (``$NEXTCHAT_CHAT_HISTORY`` names another file; an empty value keeps none). A model
whose folder records single-turn training (``"nextchat_training": {"max_turns": 1}`` in ``config.json``) answers
follow-up questions less reliably: the chat says so after the first answer, and ``/reset`` starts afresh.

Without ``--model`` the tiny model shipped in ``examples/tiny-nextchat-shapes`` is used (or ``$NEXTCHAT_DEMO_MODEL``);
it only knows a toy world of coloured shapes. Pass ``--model DIR`` with any converted checkpoint
(``nextchat-convert``) for real answers, or a LoRA adapter folder (``adapter_config.json``, e.g. a LoRA run's
``checkpoint-N/``): it is applied to its base model (``--base-model``, default the adapter's
``base_model_name_or_path``) and merged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .core import (
    SINGLE_TURN_NOTE,
    DemoError,
    GenerationSettings,
    answer_terminal,
    format_box,
    load_image,
    load_model,
    log,
    parse_box,
    resolve_model_dir,
    ChatSession,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextchat-chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("image", help="path of the image")
    parser.add_argument("question", nargs="?", default=None,
                        help="the question; leave it out for an interactive chat on stdin")
    parser.add_argument("--box", action="append", default=[], metavar="X1,Y1,X2,Y2",
                        help="a pixel box referred to as [0], [1], ... in the question (repeatable)")
    parser.add_argument("--model", default=None,
                        help="a NExT-Chat folder or a LoRA adapter folder (adapter_config.json, e.g. a LoRA run's "
                        "checkpoint-N/; merged into its base model) (default: the shipped tiny model, or "
                        "$NEXTCHAT_DEMO_MODEL)")
    parser.add_argument("--base-model", default=None,
                        help="with an adapter --model: its base model folder or Hub id (default: the adapter's "
                        "base_model_name_or_path)")
    parser.add_argument("--output", default=None,
                        help="where to write the annotated PNG (default: next to the image, <name>_nextchat.png)")
    parser.add_argument("--decoding", choices=["greedy", "beam", "sample"], default="greedy",
                        help="greedy (default), beam search or sampling")
    parser.add_argument("--num-beams", type=int, default=5, help="beams for --decoding beam (default 5)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    parser.add_argument("--top-p", type=float, default=0.7, help="sampling top-p (default 0.7)")
    parser.add_argument("--top-k", type=int, default=5, help="sampling top-k (default 5)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="most tokens per answer (default 128)")
    parser.add_argument("--iou-threshold", type=float, default=0.3,
                        help="hide masks whose SAM score is below this (default 0.3, as the original demo)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16")
    parser.add_argument("--json", action="store_true", help="print one JSON object per answer")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                        help="colour the grounded phrases (default: when stdout is a terminal)")
    return parser


def output_path(image_path: str, output: str | None, turn: int) -> Path:
    """Turn 1 writes ``output`` (default ``<image stem>_nextchat.png`` beside the image); turn n writes
    ``<stem>_<n><suffix>``."""
    if output is None:
        path = Path(image_path)
        base = path.with_name(path.stem + "_nextchat.png")
    else:
        base = Path(output)
    if turn <= 1:
        return base
    return base.with_name(f"{base.stem}_{turn}{base.suffix or '.png'}")


def _report(reply, path: Path, args, use_color: bool) -> None:
    if args.json:
        record = reply.to_dict()
        record["image"] = str(path)
        print(json.dumps(record), flush=True)
    else:
        print(answer_terminal(reply, color=use_color), flush=True)
        print(f"  annotated image: {path}", flush=True)


def _ask_and_save(session: ChatSession, question: str, boxes, args, image_path: str, use_color: bool) -> None:
    reply = session.ask(question, boxes=boxes)
    path = output_path(image_path, args.output, len(session.replies))
    path.parent.mkdir(parents=True, exist_ok=True)
    reply.image.save(path, format="PNG")
    _report(reply, path, args, use_color)


HISTORY_ENV_VAR = "NEXTCHAT_CHAT_HISTORY"


def _history_path() -> str | None:
    path = os.environ.get(HISTORY_ENV_VAR, os.path.join(os.path.expanduser("~"), ".nextchat_chat_history"))
    return path or None


def _start_line_editing():
    """Readline editing and history for ``input()``, which uses them only when stdin and stdout are both terminals.
    Returns the readline module (``None`` where there is none)."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline
        return None
    path = _history_path()
    if path and os.path.isfile(path):
        try:
            readline.read_history_file(path)
        except OSError:
            pass
    readline.set_history_length(1000)
    return readline


def _save_history(readline) -> None:
    path = _history_path()
    if readline is None or not path:
        return
    try:
        readline.write_history_file(path)
    except OSError as err:
        log(f"could not save the question history to {path}: {err}")


def _read_line(editing: bool, prompt_on_stderr: bool) -> str | None:
    """The next line of the chat, ``None`` at the end of input."""
    if editing:
        try:
            return input("you> ")
        except EOFError:
            return None
    if prompt_on_stderr:
        print("you> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return line if line else None


def _interactive(session: ChatSession, args, image_path: str, use_color: bool) -> None:
    pending = [parse_box(b) for b in args.box]
    for b in pending:
        session.check_box(b)
    editing = sys.stdin.isatty() and sys.stdout.isatty()
    readline = _start_line_editing() if editing else None
    try:
        _chat_loop(session, args, image_path, use_color, pending, editing and readline is not None)
    finally:
        _save_history(readline)


def _chat_loop(session: ChatSession, args, image_path: str, use_color: bool, pending, editing: bool) -> None:
    if pending:
        log("boxes for the first question: " + ", ".join(f"[{k}] {format_box(b)}" for k, b in enumerate(pending)))
    log("chat started: type a question (/box x1,y1,x2,y2 adds a box, /boxes lists them, /image PATH, /reset, /quit)")
    noted = False
    while True:
        line = _read_line(editing, prompt_on_stderr=sys.stdin.isatty())
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        try:
            if line in ("/quit", "/exit", "/q"):
                break
            if line.startswith("/box ") or line == "/box":
                box = session.check_box(line[len("/box"):])
                index = session.next_box_index + len(pending)
                pending.append(box)
                log(f"box [{index}] {format_box(box)} will go with the next question: refer to it as [{index}]")
                continue
            if line == "/boxes":
                records = [(r.index, r.box, r.source, r.text) for r in session.boxes]
                records += [(session.next_box_index + k, b, "user (pending)", "") for k, b in enumerate(pending)]
                if not records:
                    log("no boxes yet")
                for index, box, source, text in records:
                    log(f"[{index}] {format_box(box)} {source}{': ' + text if text else ''}")
                continue
            if line == "/reset":
                session.reset()
                pending = []
                log("new conversation")
                continue
            if line.startswith("/image "):
                image_path = line[len("/image "):].strip()
                session.set_image(image_path)
                pending = []
                log(f"new conversation about {image_path} ({session.image.width} x {session.image.height})")
                continue
            if line.startswith("/"):
                log(f"unknown command {line.split()[0]!r}")
                continue
            _ask_and_save(session, line, pending, args, image_path, use_color)
            pending = []
            if not noted and session.max_turns == 1:
                log(f"note: {SINGLE_TURN_NOTE} (/reset starts one)")
                noted = True
        except DemoError as err:
            log(f"error: {err}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    use_color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not args.json)
    settings = GenerationSettings(
        mode=args.decoding, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
    )
    try:
        settings.validate()
        boxes = [parse_box(b) for b in args.box]
        model_dir = resolve_model_dir(args.model)
        image = load_image(args.image)  # checked before the (possibly long) model load
        model, processor = load_model(model_dir, device=args.device, dtype=args.dtype, base_model=args.base_model)
        session = ChatSession(model, processor, image, settings=settings, iou_threshold=args.iou_threshold)
        if args.question is None:
            _interactive(session, args, args.image, use_color)
        else:
            _ask_and_save(session, args.question, boxes, args, args.image, use_color)
    except DemoError as err:
        print(f"nextchat-chat: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
