"""Learning curves of a `Trainer` log history, as a text table and a PNG drawn with PIL (no matplotlib needed).

`python -m nextchat.training.plot LOG [--output curves.png]` where LOG is a `trainer_state.json`, a
`log_history.json` (list of dicts) or a text log holding the printed `{'loss': ...}` dicts.
"""

from __future__ import annotations

import argparse
import ast
import json
import math

from PIL import Image, ImageDraw, ImageFont


DEFAULT_KEYS = ("loss", "lm_loss", "box_l1_loss", "box_giou_loss", "mask_ce_loss", "mask_dice_loss",
                "cycle_embed_loss", "grounding_attention_loss", "region_attention_loss", "learning_rate")


def read_log_history(path: str, logging_steps: int = 1) -> list[dict]:
    text = open(path, encoding="utf-8").read()
    try:
        data = json.loads(text)
        return data["log_history"] if isinstance(data, dict) else data
    except json.JSONDecodeError:
        pass
    history = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}") and "'loss'" in line:
            entry = ast.literal_eval(line)
            history.append({k: float(v) if _is_number(v) else v for k, v in entry.items()})
    for index, entry in enumerate(history):  # printed logs carry no step: number them by logging interval
        entry.setdefault("step", (index + 1) * logging_steps)
    return history


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def curves(history: list[dict], keys=DEFAULT_KEYS) -> dict[str, list[tuple[float, float]]]:
    out = {}
    for key in keys:
        points = [(float(h.get("step", i)), float(h[key])) for i, h in enumerate(history) if key in h and "train_runtime" not in h]
        if points:
            out[key] = points
    return out


def text_table(history: list[dict], keys=DEFAULT_KEYS, every: int = 1) -> str:
    present = [k for k in ("step", "elapsed_s") + tuple(keys) if any(k in h for h in history)]
    lines = ["  ".join(f"{k:>14}" for k in present)]
    rows = [h for h in history if "loss" in h]
    for i, h in enumerate(rows):
        if i % every and i != len(rows) - 1:
            continue
        lines.append("  ".join(f"{h[k]:>14.5g}" if isinstance(h.get(k), float) or isinstance(h.get(k), int)
                               else f"{'-':>14}" for k in present))
    return "\n".join(lines)


def plot(history: list[dict], path: str, keys=DEFAULT_KEYS, title: str = "NExT-Chat training", extra: dict | None = None):
    """Draw one panel per key (log-scale y for losses) into a PNG at `path`; `extra` maps a panel title to a list of
    (x, y) points (e.g. evaluation metrics) drawn as additional panels."""
    series = curves(history, keys)
    series.update(extra or {})
    n = len(series)
    cols = 3
    rows = max(1, math.ceil(n / cols))
    pw, ph, margin = 360, 230, 46
    image = Image.new("RGB", (cols * pw, rows * ph + 30), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 12)
    except OSError:
        font = ImageFont.load_default()
    draw.text((8, 6), title, fill="black", font=font)
    for index, (name, points) in enumerate(series.items()):
        ox, oy = (index % cols) * pw, (index // cols) * ph + 30
        x0, y0, x1, y1 = ox + margin, oy + 20, ox + pw - 12, oy + ph - 28
        draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        xs = [p[0] for p in points]
        log_y = name.endswith("loss") and all(p[1] > 0 for p in points)
        ys = [math.log10(p[1]) if log_y else p[1] for p in points]
        xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        ymin, ymax = min(ys), max(ys)
        if ymax - ymin < 1e-12:
            ymin, ymax = ymin - 0.5, ymax + 0.5
        to_px = lambda x, y: (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))  # noqa: E731
        draw.line([to_px(x, y) for x, y in zip(xs, ys)] if len(xs) > 1 else [to_px(xs[0], ys[0])] * 2,
                  fill=(31, 119, 180), width=2)
        fmt = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
        draw.text((ox + 4, y0 - 2), fmt(ymax), fill="black", font=font)
        draw.text((ox + 4, y1 - 12), fmt(ymin), fill="black", font=font)
        draw.text((x0, y1 + 4), f"{xmin:g}", fill="black", font=font)
        draw.text((x1 - 40, y1 + 4), f"{xmax:g}", fill="black", font=font)
        draw.text((x0 + 4, oy + 4), name + (" (log)" if log_y else "") + f"  last {points[-1][1]:.4g}", fill="black",
                  font=font)
    image.save(path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log")
    parser.add_argument("--output", default="learning_curves.png")
    parser.add_argument("--every", type=int, default=5, help="print every n-th logged row")
    parser.add_argument("--logging-steps", type=int, default=1, help="steps between two printed logs (text logs)")
    args = parser.parse_args(argv)
    history = read_log_history(args.log, args.logging_steps)
    print(text_table(history, every=args.every))
    print(plot(history, args.output))


if __name__ == "__main__":
    main()
