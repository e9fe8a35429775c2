"""A deterministic, seeded synthetic grounding task: coloured shapes on varied backgrounds.

Every sample is drawn from `numpy.random.default_rng(seed)` alone, so a seed always gives the same image, boxes,
masks and conversation, and disjoint seed ranges give disjoint train / evaluation sets.

The world
---------
* Images (default 64x64 RGB) with 2-3 non-overlapping shapes (``square``, ``circle``, ``triangle``, ``diamond``)
  in 5 colours (``red``, ``green``, ``blue``, ``yellow``, ``purple``, each jittered), of side 12-24 px, on a
  background that is plain, a gradient, striped or noisy (light, desaturated tones).
* Shapes are rasterised without anti-aliasing, so each object's mask is exact and its box is exactly the
  bounding box of its mask, in pixel-edge xyxy (``[min_col, min_row, max_col + 1, max_row + 1]``).
* No two objects of an image share both colour and shape, so "the red circle" always names one object. Scenes are
  built so that, in most images, another object shares the colour or the shape of the first object (at least half
  of the referring queries have such a distractor; :func:`distractor_fraction` measures it).

Tasks (one conversation may hold several turns of different tasks, sharing the image)
------------------------------------------------------------------------------------
* ``rec`` (referring expression, phrase -> box): "Where is the red circle?" -> "The red circle [0]."
* ``res`` (referring segmentation, phrase -> box + mask): "Segment the red circle." -> "The red circle [0]."
  (the box carries its mask).
* ``reg`` (region caption, user box -> phrase): "What is in [0]?" -> "A red circle."
* ``gc`` (grounded caption, several boxes in one answer): "Describe the image with object locations." ->
  "There are three objects: a red circle [0], a blue square [1] and a green diamond [2]." (objects in a random
  order: in a fixed one, such as left to right, the k-th box can be found by position without reading the name,
  and a model that learns that shortcut was measured to stop learning to find objects by name for REC)

The JSONL dataset format (read by :class:`nextchat.training.data.NextChatJsonlDataset`)
------------------------------------------------------------------------------------
One JSON object per line::

    {"id": "shapes-000042",
     "image": "images/000042.png",            # path, relative to the JSONL file's folder (or absolute)
     "boxes": [[x1, y1, x2, y2], ...],         # pixel xyxy on the original image, float or int
     "masks": [{"size": [h, w], "counts": "..."} | null, ...],   # optional, COCO RLE per box (or null)
     "conversations": [                        # alternating user / assistant turns (optional leading system)
        {"role": "user", "content": "<image> Where is the red circle?"},
        {"role": "assistant", "content": "The red circle [0]."}],
     "task": ["rec"]}                          # optional metadata (ignored by the dataset)

The content strings use the processor's text syntax: ``<image>`` marks the image (once per conversation), and
``[i]`` refers to ``boxes[i]`` (becomes ``<at> <boxes>``; in a user turn it is an input box, in an assistant turn
a training target). Every box must be referred to at least once. The other fields of a record
(``objects``, ``seed``) are metadata for evaluation.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import PIL.Image


COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 80, 215),
    "yellow": (230, 195, 25),
    "purple": (135, 55, 185),
}
SHAPES = ("square", "circle", "triangle", "diamond")
# shapes the shipped model never saw, for fine-tuning experiments (`--new-shape star`); never drawn by default
EXTRA_SHAPES = ("star",)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
BACKGROUNDS = ((244, 242, 236), (226, 226, 226), (206, 218, 230), (236, 222, 204), (214, 232, 214), (236, 214, 224))
TASKS = ("rec", "res", "reg", "gc")

REC_TEMPLATES = (
    "Where is the {p}?",
    "Find the {p} in the image.",
    "Locate the {p}.",
    "Can you point out the {p}?",
    "Show me the {p}.",
)
RES_TEMPLATES = (
    "Segment the {p}.",
    "Please give the mask of the {p}.",
    "Can you segment the {p} in the image?",
)
REG_TEMPLATES = (
    "What is in [{i}]?",
    "What object is at [{i}]?",
    "Describe the region [{i}].",
    "What can you see in [{i}]?",
)
GC_TEMPLATES = (
    "Describe the image with object locations.",
    "What objects are in the image? Give their locations.",
    "Can you describe the image and include object locations?",
)


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------


def shape_mask(kind: str, size: int, x0: int, y0: int, height: int, width: int) -> np.ndarray:
    """Exact bool mask of a shape of side `size` whose bounding square starts at (x0, y0); pixel centres inside."""
    ys, xs = np.mgrid[0:height, 0:width]
    u = (xs + 0.5 - x0) / size  # position inside the bounding square, 0..1
    v = (ys + 0.5 - y0) / size
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if kind == "square":
        mask = inside
    elif kind == "circle":
        mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif kind == "triangle":  # apex up
        mask = inside & (np.abs(u - 0.5) <= v / 2)
    elif kind == "diamond":
        mask = np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5
    elif kind == "star":  # the regular five-pointed star (pentagram outline), one point up
        mask = _inside_polygon(u, v, _star_polygon())
    else:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES + EXTRA_SHAPES}")
    return mask & inside


def _star_polygon(points: int = 5, inner: float = 0.382) -> np.ndarray:
    """Vertices (u, v) in the unit square of a star with `points` points, the first one up."""
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 0.5, 0.5 * inner)
    return np.stack([0.5 + radii * np.cos(angles), 0.5 + radii * np.sin(angles)], axis=1)


def _inside_polygon(u: np.ndarray, v: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test of the points (u, v)."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(polygon)
    for i in range(n):
        (x1, y1), (x2, y2) = polygon[i], polygon[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        x_at = x1 + (v - y1) * (x2 - x1) / ((y2 - y1) if y2 != y1 else 1e-12)
        inside ^= crosses & (u < x_at)
    return inside


def mask_to_box(mask: np.ndarray) -> list[int]:
    """Pixel-edge xyxy bounding box of a non-empty bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        raise ValueError("empty mask")
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def _background(rng, height, width) -> np.ndarray:
    base = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.float64)
    base = base + rng.integers(-8, 9, size=3)
    style = rng.integers(4)
    img = np.broadcast_to(base, (height, width, 3)).copy()
    if style == 1:  # gradient
        other = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.float64)
        if rng.integers(2):
            t = np.linspace(0, 1, height)[:, None, None]
        else:
            t = np.linspace(0, 1, width)[None, :, None]
        img = base * (1 - t) + other * t + np.zeros_like(img)
    elif style == 2:  # stripes
        period = int(rng.integers(6, 14))
        axis = int(rng.integers(2))
        idx = np.arange(height if axis == 0 else width)
        band = ((idx // (period // 2)) % 2).astype(np.float64) * -18.0
        img = img + (band[:, None, None] if axis == 0 else band[None, :, None])
    elif style == 3:  # noise
        img = img + rng.normal(0, 7, size=(height, width, 1))
    return np.clip(img, 150, 255)


def render_scene(seed: int, height: int = 64, width: int = 64, min_objects: int = 2, max_objects: int = 3,
                 min_size: int = 12, max_size: int = 24, hard_fraction: float = 0.85,
                 single_object_fraction: float = 0.0, same_shape_fraction: float = 0.5, shapes=SHAPES,
                 focus_shape: str | None = None):
    """Draw one scene. Returns (PIL image, objects) where each object is a dict with `color`, `shape`, `size`,
    `box` (pixel xyxy) and `mask` (bool (h, w)). With `single_object_fraction` > 0, that fraction of the scenes
    holds one object only (a curriculum aid: locating a lone object teaches where before which). A distractor shares
    the first object's shape (so that only the colour tells them apart) with probability `same_shape_fraction`,
    else its colour.

    `shapes` is the set the scene draws from (default the four of the shipped model; add ``"star"`` from
    `EXTRA_SHAPES` for new-object data); `focus_shape` makes the first object (the one REC queries target) that
    shape. The defaults draw exactly the scenes of earlier versions."""
    shapes = tuple(shapes)
    unknown = set(shapes) - set(SHAPES + EXTRA_SHAPES)
    if unknown or (focus_shape is not None and focus_shape not in SHAPES + EXTRA_SHAPES):
        raise ValueError(f"`shapes`/`focus_shape`: unknown shape(s) {sorted(unknown) or [focus_shape]}; "
                         f"expected some of {SHAPES + EXTRA_SHAPES}")
    rng = np.random.default_rng(seed)
    n_objects = int(rng.integers(min_objects, max_objects + 1))
    if single_object_fraction > 0 and rng.random() < single_object_fraction:
        n_objects = 1
    colors, shapes = list(COLORS), list(shapes)
    # attributes: the first object has a distractor that shares its colour or its shape with probability
    # `hard_fraction`; all (colour, shape) pairs distinct
    first = (colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))])
    if focus_shape is not None:
        first = (first[0], focus_shape)
    attrs = [first]
    if n_objects >= 2 and rng.random() < hard_fraction:
        if rng.random() < 1 - same_shape_fraction:  # (r < 0.5 by default: the streams of earlier versions)
            attrs.append((first[0], rng.choice([s for s in shapes if s != first[1]]).item()))
        else:
            attrs.append((rng.choice([c for c in colors if c != first[0]]).item(), first[1]))
    while len(attrs) < n_objects:
        cand = (colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))])
        if cand not in attrs:
            attrs.append(cand)
    order = rng.permutation(len(attrs))
    attrs = [attrs[i] for i in order]

    img = _background(rng, height, width)
    occupied = np.zeros((height, width), dtype=bool)
    objects = []
    for color, shape in attrs:
        for _ in range(200):
            size = int(rng.integers(min_size, max_size + 1))
            x0 = int(rng.integers(0, width - size + 1))
            y0 = int(rng.integers(0, height - size + 1))
            mask = shape_mask(shape, size, x0, y0, height, width)
            grown = np.zeros_like(occupied)
            grown[max(y0 - 2, 0) : y0 + size + 2, max(x0 - 2, 0) : x0 + size + 2] = True
            if not (grown & occupied).any() and mask.any():
                break
        else:
            continue  # no room: drop the object (rare)
        occupied |= mask
        rgb = np.clip(np.array(COLORS[color]) + rng.integers(-20, 21, size=3), 0, 255)
        img[mask] = rgb
        objects.append({"color": color, "shape": shape, "size": size, "box": mask_to_box(mask), "mask": mask})
    image = PIL.Image.fromarray(np.round(img).astype(np.uint8), mode="RGB")
    return image, objects


# ----------------------------------------------------------------------------------------------------------------
# Conversations
# ----------------------------------------------------------------------------------------------------------------


def phrase(obj: dict) -> str:
    return f"{obj['color']} {obj['shape']}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


CAPTION_ORDERS = ("random", "name")


def gc_answer(objects: list[dict], ref, rng: np.random.Generator, caption_order: str = "random") -> str:
    """Grounded caption listing the objects in an order drawn from `rng` (`caption_order="random"`), or by name:
    colour, then shape, in the order of `COLORS` and `SHAPES` (`"name"`: what to say next is then fixed by what is in
    the image, and still says nothing about where it is); `ref(k)` gives the reference string of object k."""
    if caption_order not in CAPTION_ORDERS:
        raise ValueError(f"`caption_order` must be one of {CAPTION_ORDERS}, got {caption_order!r}")
    order = rng.permutation(len(objects)).tolist()  # drawn in both modes, so that later draws are the same
    if caption_order == "name":
        colors = list(COLORS)
        order.sort(key=lambda k: (colors.index(objects[k]["color"]), (SHAPES + EXTRA_SHAPES).index(objects[k]["shape"])))
    parts = [f"a {phrase(objects[k])} {ref(k)}" for k in order]
    n = len(objects)
    head = "There is one object: " if n == 1 else f"There are {NUMBER_WORDS.get(n, str(n))} objects: "
    return head + _join(parts) + "."


def make_sample(seed: int, tasks: tuple[str, ...] = TASKS, min_turns: int = 1, max_turns: int = 3,
                task_weights: dict | None = None, caption_order: str = "random",
                **scene_kwargs) -> tuple[PIL.Image.Image, dict]:
    """One sample: the image and its JSONL record (without the `image` path). Deterministic in `seed`.
    `caption_order`: how a grounded caption orders its objects (`gc_answer`)."""
    image, objects = render_scene(seed, **scene_kwargs)
    rng = np.random.default_rng([seed, 1])
    weights = np.array([(task_weights or {}).get(t, 1.0) for t in tasks], dtype=np.float64)
    weights = weights / weights.sum()
    n_turns = int(rng.integers(min_turns, max_turns + 1))
    box_index: dict[int, int] = {}  # object -> index into `boxes`

    def ref(k: int) -> str:
        if k not in box_index:
            box_index[k] = len(box_index)
        return f"[{box_index[k]}]"

    messages, turn_tasks, queries = [], [], []
    used_gc = False
    targeted: set[int] = set()
    # the object that was given a distractor is drawn first, then shuffled: find it again
    first_object = int(np.argmax([has_distractor(objects, j) for j in range(len(objects))]))
    focus = scene_kwargs.get("focus_shape")
    if focus is not None and any(o["shape"] == focus for o in objects):  # new-shape data: the new shape first
        first_object = next(j for j, o in enumerate(objects) if o["shape"] == focus and has_distractor(objects, j)) \
            if any(o["shape"] == focus and has_distractor(objects, j) for j, o in enumerate(objects)) else \
            next(j for j, o in enumerate(objects) if o["shape"] == focus)
    for turn in range(n_turns):
        task = tasks[rng.choice(len(tasks), p=weights)]
        if task == "gc" and used_gc:
            task = "rec" if "rec" in tasks else tasks[0]
        # the first referring query of a scene targets an object that has a distractor when there is one
        fresh = [j for j in range(len(objects)) if j not in targeted] or list(range(len(objects)))
        k = first_object if turn == 0 else fresh[int(rng.integers(len(fresh)))]
        targeted.add(k)
        if task in ("rec", "res"):
            templates = REC_TEMPLATES if task == "rec" else RES_TEMPLATES
            question = templates[rng.integers(len(templates))].format(p=phrase(objects[k]))
            answer = f"The {phrase(objects[k])} {ref(k)}."
            queries.append({"task": task, "object": k})
        elif task == "reg":
            question = REG_TEMPLATES[rng.integers(len(REG_TEMPLATES))].format(i=ref(k)[1:-1])
            answer = f"A {phrase(objects[k])}."
            queries.append({"task": task, "object": k})
        else:
            used_gc = True
            question = GC_TEMPLATES[rng.integers(len(GC_TEMPLATES))]
            answer = gc_answer(objects, ref, rng, caption_order)
            queries.append({"task": task, "object": None})
        if turn == 0:
            question = "<image> " + question
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
        turn_tasks.append(task)
    ordered = sorted(box_index, key=box_index.get)
    from nextchat.processing import rle_encode

    record = {
        "id": f"shapes-{seed}",
        "seed": int(seed),
        "boxes": [objects[k]["box"] for k in ordered],
        "masks": [rle_encode(objects[k]["mask"].astype(np.uint8)) for k in ordered],
        "conversations": messages,
        "task": turn_tasks,
        "queries": queries,
        "objects": [{"color": o["color"], "shape": o["shape"], "box": o["box"]} for o in objects],
    }
    return image, record


def has_distractor(objects: list[dict], k: int) -> bool:
    """Whether another object shares the colour or the shape of object k."""
    return any(
        j != k and (o["color"] == objects[k]["color"] or o["shape"] == objects[k]["shape"])
        for j, o in enumerate(objects)
    )


def distractor_fraction(records: list[dict]) -> float:
    """Fraction of referring queries (rec/res) whose target shares colour or shape with another object."""
    hits = total = 0
    for record in records:
        for query in record.get("queries", []):
            if query["task"] in ("rec", "res"):
                total += 1
                hits += has_distractor(record["objects"], query["object"])
    return hits / max(total, 1)


def write_dataset(out_dir: str, seeds, jsonl_name: str = "data.jsonl", image_dir: str = "images", **kwargs) -> str:
    """Write images and a JSONL file for `seeds` (an iterable of ints) into `out_dir`; returns the JSONL path."""
    os.makedirs(os.path.join(out_dir, image_dir), exist_ok=True)
    path = os.path.join(out_dir, jsonl_name)
    with open(path, "w") as f:
        for seed in seeds:
            image, record = make_sample(int(seed), **kwargs)
            rel = f"{image_dir}/{int(seed):08d}.png"
            image.save(os.path.join(out_dir, rel), compress_level=1)
            record = {"id": record["id"], "image": rel, **{k: v for k, v in record.items() if k != "id"}}
            f.write(json.dumps(record) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# A tokenizer and processor for the task
# ----------------------------------------------------------------------------------------------------------------


def task_corpus() -> list[str]:
    """Sentences covering the task's vocabulary (for training a small SentencePiece model)."""
    from nextchat.processing.processing_nextchat import VICUNA_V1_1_SYSTEM

    # the system prompt and the role markers occur in every sample: weight them so that BPE merges them whole
    lines = [VICUNA_V1_1_SYSTEM + " USER: ASSISTANT: USER: ASSISTANT:"] * 60
    lines += ["Answer: yes no . , ? ! : ; ' \" ( ) [ ] 0123456789"]
    for color in COLORS:
        for shape in SHAPES:
            p = f"{color} {shape}"
            lines += [t.format(p=p) for t in REC_TEMPLATES + RES_TEMPLATES]
            lines += [f"The {p}.", f"A {p}.", f"a {p}, a {p} and a {p}."]
    lines += [t.format(i=0) for t in REG_TEMPLATES] + list(GC_TEMPLATES)
    lines += [f"There are {w} objects: there is one object:" for w in NUMBER_WORDS.values()]
    lines += [
        "Hello! What can you do? I can find objects, describe regions and segment shapes in images.",
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>/\\-_+=*&^%$#@~`|",
    ]
    return lines


def build_shapes_tokenizer(vocab_size: int = 640):
    """A small LLaMA tokenizer (SentencePiece BPE with byte fallback, so any text encodes) whose merges cover the
    shapes vocabulary, with the five NExT-Chat tokens added after the base vocabulary. Deterministic."""
    from .tokenizer import train_llama_tokenizer

    return train_llama_tokenizer(task_corpus() * 4, vocab_size)


def build_shapes_processor(image_size: int = 64, patch_size: int = 8, sam_image_size: int | None = 64,
                           vocab_size: int = 640, system_prompt: str = ""):
    """The processor of the shapes task: :func:`build_shapes_tokenizer` + a CLIP/SAM image processor at
    `image_size` / `sam_image_size`, `image_seq_length = (image_size // patch_size) ** 2`, and the vicuna chat
    template with `system_prompt` as its default system prompt (empty: the vicuna prompt would be a quarter of
    every training sequence, for nothing a model trained from scratch needs)."""
    from nextchat.processing import NextChatImageProcessor, NextChatProcessor
    from nextchat.processing.processing_nextchat import vicuna_chat_template

    image_processor = NextChatImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        sam_image_size=sam_image_size,
    )
    return NextChatProcessor(
        image_processor, build_shapes_tokenizer(vocab_size), image_seq_length=(image_size // patch_size) ** 2,
        chat_template=vicuna_chat_template(system_prompt),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the synthetic shapes grounding dataset (JSONL + PNG).")
    parser.add_argument("out_dir")
    parser.add_argument("--seed-start", type=int, default=0)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--jsonl-name", default="data.jsonl")
    parser.add_argument("--min-turns", type=int, default=1)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    parser.add_argument("--task-weights", default="",
                        help="relative weights of the tasks of a turn, e.g. 'reg=0.3' (unnamed tasks weigh 1)")
    parser.add_argument("--min-objects", type=int, default=2)
    parser.add_argument("--max-objects", type=int, default=3)
    parser.add_argument("--hard-fraction", type=float, default=0.85,
                        help="probability that the first object of a scene gets a same-colour or same-shape distractor")
    parser.add_argument("--single-object-fraction", type=float, default=0.0,
                        help="fraction of scenes with one object only")
    parser.add_argument("--same-shape-fraction", type=float, default=0.5,
                        help="probability that a distractor shares the shape (not the colour) of its object")
    parser.add_argument("--caption-order", choices=CAPTION_ORDERS, default="random",
                        help="order of the objects in a grounded caption: random, or by name (colour, then shape)")
    parser.add_argument("--new-shape", choices=EXTRA_SHAPES, default=None,
                        help="draw this new shape too (not in the shipped model's data) and make it the first object "
                             "of every scene, the one REC/RES queries target (fine-tuning data for a new object)")
    args = parser.parse_args(argv)
    unknown = set(args.tasks.split(",")) - set(TASKS)
    if unknown:
        parser.error(f"--tasks: unknown task(s) {sorted(unknown)}; choose from {TASKS}")
    task_weights = {}
    for item in filter(None, args.task_weights.split(",")):
        name, _, value = item.partition("=")
        try:
            task_weights[name] = float(value)
        except ValueError:
            parser.error(f"--task-weights: {item!r} is not TASK=WEIGHT")
        if name not in args.tasks.split(",") or task_weights[name] < 0:
            parser.error(f"--task-weights: {item!r} must name one of --tasks with a weight >= 0")
    path = write_dataset(
        args.out_dir, range(args.seed_start, args.seed_start + args.num), jsonl_name=args.jsonl_name,
        min_turns=args.min_turns, max_turns=args.max_turns, tasks=tuple(args.tasks.split(",")),
        min_objects=args.min_objects, max_objects=args.max_objects, hard_fraction=args.hard_fraction,
        single_object_fraction=args.single_object_fraction, same_shape_fraction=args.same_shape_fraction,
        task_weights=task_weights or None, caption_order=args.caption_order,
        **new_shape_kwargs(args.new_shape),
    )
    print(path)


def new_shape_kwargs(new_shape: str | None) -> dict:
    """`render_scene` keyword arguments for scenes built around `new_shape` (none for None: the default scenes)."""
    if new_shape is None:
        return {}
    return {"shapes": SHAPES + (new_shape,), "focus_shape": new_shape}


if __name__ == "__main__":
    main()
