"""``nextchat-eval``: evaluate a NExT-Chat checkpoint on REC, RES, POPE or region captioning, or tabulate results.

    nextchat-eval TASK --model DIR --data FILE --images DIR --output DIR
                  [--batch-size 8] [--max-new-tokens N] [--fast-rec] [--limit N] [--split NAME] ...
    nextchat-eval summary OUTPUT_DIR [OUTPUT_DIR ...]

``--model`` is a NExT-Chat folder / Hub id or a LoRA adapter folder (``adapter_config.json``; applied to its base
model, ``--base-model`` to override, and merged). TASK is ``rec``, ``res``, ``pope`` or ``reg`` (RefCOCOg region
captioning); the annotation format is in the README ("Evaluation data format") and
:mod:`nextchat.evaluation.data`. Predictions (with the prompt used for each) are appended to
``OUTPUT/predictions.jsonl`` as they come; running the same command again resumes where it stopped. The metrics and
the paper's number for the split go to ``OUTPUT/results.json`` (and are printed). ``summary`` prints a Markdown
table of the ``results.json`` of several output folders.

The annotation file, the images and the output folder are checked before the model loads: a missing, empty or
malformed file (reported as ``file:line``), missing images, or an output folder holding predictions of a different
run (other file contents, images, model or settings; ``--overwrite`` discards them) exit with status 2.

Data parallel, on one or several machines (the output folder must be shared)::

    torchrun --nproc_per_node 8 -m nextchat.evaluation.cli TASK --model DIR ... --output DIR
    accelerate launch --multi_gpu --num_processes 8 -m nextchat.evaluation.cli TASK --model DIR ... --output DIR

Process ``r`` of ``n`` runs every ``n``-th batch into its own resumable ``predictions.rank{r}-of-{n}.jsonl``;
rank 0 merges them into ``predictions.jsonl`` and scores. The files equal a single-process run's byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from .data import TASKS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextchat-eval",
        description="Evaluate NExT-Chat on REC / RES / POPE / region captioning (resumable; results next to the "
        "paper's numbers). `nextchat-eval summary DIR...` tabulates finished runs.",
    )
    parser.add_argument("task", choices=list(TASKS), help="rec | res | pope | reg (region captioning)")
    parser.add_argument("--model", required=True,
                        help="a NExT-Chat folder or Hub id (model + processor), or a LoRA adapter folder "
                        "(adapter_config.json, e.g. a LoRA run's checkpoint-N/): applied to its base model and merged")
    parser.add_argument("--base-model", default=None,
                        help="with an adapter --model: its base model folder or Hub id (default: the adapter's "
                        "base_model_name_or_path)")
    parser.add_argument("--processor", default=None,
                        help="processor folder (default: --model; for an adapter without processor files, its base)")
    parser.add_argument("--data", required=True,
                        help="annotation file (.jsonl / .json); format: README 'Evaluation data format' or "
                        "nextchat.evaluation.data")
    parser.add_argument("--images", default=None, help="image folder (default: the annotation file's folder)")
    parser.add_argument("--masks", default=None, help="res: folder of mask files, when the annotations name files")
    parser.add_argument("--output", required=True, help="output folder (predictions.jsonl, results.json)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: 20 (rec, res, pope), 500 (reg), as the original")
    parser.add_argument("--fast-rec", action="store_true",
                        help="REC/RES: teacher-forced '<answer prefix> <at>' and one forward per batch (the original's "
                        "REC evaluation, how the paper's REC numbers were computed) instead of free generation. Only "
                        "meaningful for a model trained to put a box after that prefix; a model fine-tuned to answer "
                        "in its own format (e.g. 'The red circle <at> ...') scores near zero this way although its "
                        "generated answers are right: set --answer-prefix or evaluate without --fast-rec. The first "
                        "--fast-rec-check samples are compared with generation and a warning says when they disagree")
    parser.add_argument("--answer-prefix", default=None, metavar="TEXT",
                        help="--fast-rec only: the text forced after 'ASSISTANT:' before <at> (default 'Answer:', "
                        "the original's; '' forces <at> at once). A line's own \"answer_prefix\" field wins. Use "
                        "what the model writes before its box")
    parser.add_argument("--fast-rec-check", type=int, default=8, metavar="N",
                        help="--fast-rec only: compare with free generation on the first N samples and warn when "
                        "they disagree (default 8; 0 skips)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument("--split", default=None,
                        help="paper split (refcoco_val, refcoco+_testA, refcocog_test, random, popular, adversarial, "
                        "refcocog_google_val); default: read from the file name")
    parser.add_argument("--template", default=None,
                        help="prompt template string or JSON list file (placeholders <expr>, <objs>, <question>)")
    parser.add_argument("--bbox-format", choices=["xyxy", "xywh"], default="xyxy")
    parser.add_argument("--expressions", choices=["all", "first"], default="all",
                        help="lines with several expressions: one sample each (all) or the first only")
    parser.add_argument("--res-multi-trigger", choices=["zero", "first"], default="zero",
                        help="RES answer with several <at>: empty mask as the original (zero) or use the first")
    parser.add_argument("--caption-tokenizer", choices=["auto", "ptb", "simple"], default="auto",
                        help="reg: PTBTokenizer (needs java), a Python approximation, or auto")
    parser.add_argument("--no-meteor", action="store_true", help="reg: skip METEOR (computed when java exists)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="auto: bfloat16 on CUDA (as the original evaluation), float32 on CPU")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard earlier predictions in --output (without it, a folder holding predictions of a "
                        "different run -- other annotation file contents, images, model or settings -- is refused)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dist-timeout", type=float, default=720.0, metavar="MINUTES",
                        help="data-parallel runs (torchrun / accelerate launch): how long a process waits for the "
                        "others at the end (default 720; a resumed rank may have much more left than the others)")
    # test hook: process RANK exits (code 17, like a killed process) after BATCHES written batches
    parser.add_argument("--debug-exit-after", default=None, metavar="RANK:BATCHES", help=argparse.SUPPRESS)
    return parser


def summary(argv: list[str]) -> int:
    from .runners import RESULTS_FILE, format_results_table

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: nextchat-eval summary OUTPUT_DIR [OUTPUT_DIR ...]")
        return 0 if argv else 2
    results = []
    for folder in argv:
        path = folder if folder.endswith(".json") else os.path.join(folder, RESULTS_FILE)
        if not os.path.isfile(path):
            print(f"nextchat-eval summary: no {RESULTS_FILE} in {folder}", file=sys.stderr)
            return 2
        with open(path, encoding="utf-8") as f:
            results.append(json.load(f))
    print(format_results_table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "summary":
        return summary(argv[1:])
    args = _parser().parse_args(argv)

    if args.answer_prefix is not None and not args.fast_rec:
        _parser().error("--answer-prefix applies to --fast-rec only")
    if args.fast_rec and args.task not in ("rec", "res"):
        _parser().error("--fast-rec applies to rec and res only")
    if args.fast_rec_check < 0:
        _parser().error("--fast-rec-check must be >= 0")

    exit_after = None
    if args.debug_exit_after is not None:
        try:
            exit_after = tuple(int(v) for v in args.debug_exit_after.split(":"))
        except ValueError:
            exit_after = ()
        if len(exit_after) != 2:
            _parser().error("--debug-exit-after takes RANK:BATCHES")

    import torch

    from .runners import FastRecWarning, evaluate, format_results_table, model_fingerprint, prepare_run

    # torchrun and `accelerate launch` set these; a plain run has none of them and stays one process
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world_size > 1 and device == "cuda":
        device = f"cuda:{local_rank}"
    if args.dtype == "auto":
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, args.dtype)

    # everything that can be wrong with the data or the output folder is reported before the model loads
    try:
        fingerprint = model_fingerprint(args.model, args.base_model, args.processor)
        prepare_run(args.task, **_run_kwargs(args), model_fingerprint=fingerprint,
                    dtype=str(dtype).replace("torch.", ""), device=torch.device(device).type)
    except (ValueError, OSError) as err:
        print(f"nextchat-eval: error: {err}", file=sys.stderr)
        return 2

    own_group = False
    if world_size > 1 and not torch.distributed.is_initialized():
        import datetime

        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))
        # The group only carries barriers (no tensors), so gloo on GPUs too: NCCL's watchdog would abort a rank
        # that waits long at the final barrier for a resumed rank with more work left.
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(minutes=args.dist_timeout))
        own_group = True
    if world_size > 1 and rank == 0:
        print(f"nextchat-eval: data parallel over {world_size} processes: rank r runs every {world_size}th batch "
              f"into {args.output}/predictions.rank<r>-of-{world_size}.jsonl; rank 0 merges", file=sys.stderr)

    from nextchat.loading import LoadingError, load_pretrained

    try:
        model, processor = load_pretrained(args.model, device=device, dtype=dtype, base_model=args.base_model,
                                           processor=args.processor)
    except (LoadingError, OSError) as err:
        print(f"nextchat-eval: error: {err}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastRecWarning)  # printed below from results["warnings"]
        results = evaluate(
            args.task, model, processor, **_run_kwargs(args), model_fingerprint=fingerprint,
            caption_tokenizer=args.caption_tokenizer, meteor=False if args.no_meteor else None,
            progress=not args.no_progress,
            _exit_after_batches=exit_after[1] if exit_after and exit_after[0] == rank else None,
        )
    if rank == 0:
        for message in results.get("warnings", []):
            print(f"nextchat-eval: warning: {message}", file=sys.stderr)
        print(json.dumps(results["metrics"], indent=2, sort_keys=True))
        print(format_results_table([results]))
        for message in results.get("warnings", []):
            print(f"WARNING: {message}")
    if own_group:
        torch.distributed.destroy_process_group()
        # skip the interpreter's C++ teardown: a gloo process may abort in static destructors after all work is
        # done ("terminate called without an active exception"), turning a finished run into a failed one
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _run_kwargs(args) -> dict:
    """The arguments :func:`~nextchat.evaluation.runners.prepare_run` and ``evaluate`` share."""
    return dict(
        data=args.data,
        output_dir=args.output,
        images_dir=args.images,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        fast_rec=args.fast_rec,
        template=args.template,
        limit=args.limit,
        split=args.split,
        bbox_format=args.bbox_format,
        expressions=args.expressions,
        res_multi_trigger=args.res_multi_trigger,
        overwrite=args.overwrite,
        model_name=os.path.basename(os.path.normpath(args.model)),
        masks_dir=args.masks,
        answer_prefix=args.answer_prefix,
        fast_rec_check_samples=args.fast_rec_check if args.fast_rec else 0,
    )


if __name__ == "__main__":
    sys.exit(main())
