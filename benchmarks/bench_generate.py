"""Cost of trigger interception: NExT-Chat `generate` against plain `LlamaForCausalLM.generate`.

Both use the same language-model weights and the same prompt embeddings (NExT-Chat's merged image features are
given to LLaMA as `inputs_embeds`) and produce the same number of new tokens (EOS disabled). Runs alternate A/B,
and the script prints best-of-N and median ratios, because CPU timings on small machines are noisy.

    python benchmarks/bench_generate.py [--hidden 512 --layers 8 --new-tokens 32 --repeats 5]
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
from transformers import LlamaForCausalLM

from nextchat import NextChatConfig, NextChatForConditionalGeneration


def build(hidden: int, layers: int):
    config = NextChatConfig(
        text_config=dict(vocab_size=32005, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048),
        vision_config=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=14),
        sam_config=None,
    )
    torch.manual_seed(0)
    model = NextChatForConditionalGeneration(config).eval()
    llama = LlamaForCausalLM(config.text_config).eval()
    llama.model.load_state_dict(model.model.language_model.state_dict())
    llama.lm_head.load_state_dict(model.lm_head.state_dict())
    return model, llama


def prompt(model, batch: int):
    config = model.config
    block = [config.image_start_token_id] + [config.image_token_id] * config.image_seq_length
    row = [1, 319, 13563] + block + [config.image_end_token_id, 3148, 1001, 29901, 319, 1799, 9047, 13566, 29901]
    input_ids = torch.tensor([row] * batch)
    pixel_values = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        features = model.model.get_image_features(pixel_values).reshape(-1, embeds.shape[-1])
        embeds = embeds.masked_scatter((input_ids == config.image_token_id)[..., None], features)
    return input_ids, pixel_values, embeds


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_increase(fn) -> int:
    """Peak resident memory above the level before the call, sampled every millisecond while it runs."""
    gc.collect()
    baseline, peak, done = _rss(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss()) - baseline


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--memory-of", choices=["nextchat", "llama"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    model, llama = build(args.hidden, args.layers)
    common = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def variants(batch):
        input_ids, pixel_values, embeds = prompt(model, batch)
        ours = lambda: model.generate(input_ids=input_ids, pixel_values=pixel_values, return_dict_in_generate=True,
                                      **common)
        plain = lambda: llama.generate(inputs_embeds=embeds, **common)
        return {"nextchat": ours, "llama": plain}

    if args.memory_of:  # child process: one variant, one measurement
        with torch.no_grad():
            print(json.dumps(peak_rss_increase(variants(1)[args.memory_of])))
        return

    def run(batch):
        fns = variants(batch)
        with torch.no_grad():
            fns["nextchat"](), fns["llama"]()  # warm-up
            times = {"nextchat": [], "llama": []}
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    times[name].append(timed(fn))
        return times

    times = run(1)
    best = min(times["nextchat"]) / min(times["llama"])
    median = statistics.median(times["nextchat"]) / statistics.median(times["llama"])
    print(f"model: hidden {args.hidden}, {args.layers} layers, prompt with a {model.config.image_seq_length}-token "
          f"image, {args.new_tokens} new tokens, {args.repeats} alternating runs")
    print(f"batch 1 wall time   nextchat/llama: best {best:.3f}  median {median:.3f}   (target <= 1.05; nextchat "
          "also runs the vision tower, llama starts from the merged embeddings)")
    peaks = {}
    for name in ("nextchat", "llama"):
        child = subprocess.run(
            [sys.executable, __file__, "--hidden", str(args.hidden), "--layers", str(args.layers), "--new-tokens",
             str(args.new_tokens), "--memory-of", name], capture_output=True, text=True, check=True,
        )
        peaks[name] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"batch 1 peak RSS increase during generate nextchat/llama: {peaks['nextchat'] / peaks['llama']:.3f} "
          f"({peaks['nextchat'] / 2**20:.1f} MiB / {peaks['llama'] / 2**20:.1f} MiB, separate processes; "
          "target <= 1.05)")
    times8 = run(args.batch)
    throughput = (args.batch / min(times8["nextchat"])) / (1 / min(times["nextchat"]))
    print(f"batch {args.batch} throughput over batch 1 throughput (nextchat): {throughput:.2f}x; "
          f"llama: {(args.batch / min(times8['llama'])) / (1 / min(times['llama'])):.2f}x")


if __name__ == "__main__":
    main()
