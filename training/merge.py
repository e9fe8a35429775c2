"""`nextchat-merge ADAPTER OUT [--base BASE]`: merge a LoRA adapter folder into its base model and write a full,
Hub-ready model folder (weights, config, the flat remote code, processor) that loads with one argument anywhere.

The base is ``--base`` when given, else the ``base_model_name_or_path`` of ``ADAPTER/adapter_config.json``. The
processor comes from the adapter folder when it holds one (``nextchat-finetune`` writes it there), else the base.
"""

from __future__ import annotations

import argparse
import os
import sys


def merge_adapter(adapter_dir: str, out_dir: str, base: str | None = None) -> str:
    """Merge `adapter_dir` into its base; save model + processor to `out_dir`. Returns `out_dir`."""
    from nextchat.processing import NextChatProcessor

    from .finetune import adapter_base, load_adapter_merged

    if not os.path.exists(os.path.join(adapter_dir, "adapter_config.json")):
        raise SystemExit(f"nextchat-merge: {adapter_dir!r} is not an adapter folder (no adapter_config.json)")
    base = base or adapter_base(adapter_dir)
    try:
        from nextchat.loading import load_pretrained

        model, processor = load_pretrained(adapter_dir, base_model=base)
    except ImportError:
        model = load_adapter_merged(adapter_dir, base)
        has_processor = os.path.exists(os.path.join(adapter_dir, "processor_config.json"))
        processor = NextChatProcessor.from_pretrained(adapter_dir if has_processor else base)
    model.loss_weights = None
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nextchat-merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out", help="output folder for the merged model")
    parser.add_argument("--base", help="base model folder / Hub id (default: the adapter's base_model_name_or_path)")
    args = parser.parse_args(argv)
    out = merge_adapter(args.adapter, args.out, args.base)
    print(f"[nextchat-merge] merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
