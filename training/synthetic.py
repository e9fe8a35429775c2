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

Opt-in variations (issue 24; none of them changes the default output of any seed)
--------------------------------------------------------------------------------
* ``phrasings``: the wording of each question is drawn from phrasing families (:data:`PHRASING_FAMILIES`):
  ``template`` (the sentences above), ``question``, ``command``, ``no_article``, ``lower``, ``upper``, ``bare``,
  ``synonym``, ``fronted`` ("Given the picture, find the red circle."; any lead with any task),
  ``appositive`` ("Find the circle, the red one."; training families,
  :data:`TRAIN_PHRASINGS`) and the HELD-OUT families :data:`HELD_OUT_PHRASINGS` (``postposed``: "Where is the
  circle that is red?", ``indirect``: "I am looking for the red circle."), which training data never uses
  (:func:`make_sample` refuses them unless ``allow_held_out=True``, for evaluation data).
  Answers always use the canonical words ("The red circle [0].").
* ``absent_fraction``: that fraction of the rec/res turns asks about a colour/shape combination that is not in the
  scene, answered without a box: "There is no purple circle." (:func:`absent_attributes`).
  ``absent_conjunction_fraction``: that fraction of those questions asks about a colour and a shape that are both in
  the scene, on different objects, where the scene has such a pair (drawn among all hard pairs, about one in ten is).
* ``relation_fraction``: that fraction of the rec/res turns refers to its target by relation when that is
  unambiguous: "Where is the left one of the two red shapes?" -> "The red circle [0]." (:func:`relational_phrases`).
* ``scramble_fraction``: that fraction of the questions (relations excepted) has its words in a random order, its
  closing mark kept: "Where is the red circle?" -> "red Where circle the is?" (:func:`scramble_words`), so that the
  words that tell the task, not their order, decide it. The answers do not change.
* ``mix_turn_tasks``: in a conversation of several turns (``max_turns`` > 1), each turn's task differs from the
  previous turn's (without it, each turn draws its task independently, so repeats are common).
* ``task_corpus(phrasings=True)`` / ``build_shapes_tokenizer(phrasings=True)``: a tokenizer whose merges also cover
  the words of the training families, absent answers and relations (never the held-out families' sentences).

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
import functools
import json
import multiprocessing
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
# Phrasing families (opt-in: `make_sample(phrasings=...)`, `--phrasings`)
# ----------------------------------------------------------------------------------------------------------------

# synonyms a person would use for the drawn colours and shapes (a filled circle is a disc, the drawn diamond a rhombus;
# no defensible one-word synonym exists for the square or the triangle, and "ring" would be a hollow circle)
COLOR_SYNONYMS = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald",),
    "blue": ("cobalt",),
    "yellow": ("golden",),
    "purple": ("violet",),
}
SHAPE_SYNONYMS = {"circle": ("disc",), "diamond": ("rhombus",)}

# the `fronted` family: every lead with every task's requests, so that the first words never tell the task
FRONTED_LEADS = ("In this image,", "Given the picture,", "For this image,", "On this image,", "Now,", "Here,")
FRONTED_REQUESTS = {
    "rec": ("where is the {p}?", "find the {p}.", "show me the {p}.", "which object is the {p}?"),
    "res": ("segment the {p}.", "give the mask of the {p}.", "outline the {p}."),
    "reg": ("what is in [{i}]?", "what object is at [{i}]?", "name the object in [{i}]."),
    "gc": ("list every object and where it is.", "describe it with object locations.",
           "name the objects and mark where they are."),
}
# region captions may also lead with the box itself ("Given [0], what do you see?")
FRONTED_BOX_LEADS = ("Given [{i}],", "Regarding [{i}]:", "About [{i}],")
FRONTED_BOX_REQUESTS = ("what do you see?", "what object is this?", "what is it?", "name the object.")


def _fronted_templates(task: str) -> tuple[str, ...]:
    templates = tuple(f"{lead} {request}" for lead in FRONTED_LEADS for request in FRONTED_REQUESTS[task])
    if task == "reg":
        templates += tuple(f"{lead} {request}" for lead in FRONTED_BOX_LEADS for request in FRONTED_BOX_REQUESTS)
    return templates


# per family and task, the question templates: `{p}` the referring phrase ("red circle"), `{c}` / `{s}` its colour
# and shape, `{i}` a box index. `lower`, `upper` and `synonym` rewrite the `template` family's sentences.
PHRASING_FAMILIES = {
    "template": {"rec": REC_TEMPLATES, "res": RES_TEMPLATES, "reg": REG_TEMPLATES, "gc": GC_TEMPLATES},
    "question": {
        "rec": ("Could you show me where the {p} is?", "Do you see the {p}? Where is it?", "Which object is the {p}?",
                "Where can I find the {p}?", "Where in the image is the {p}?", "Is there a {p}? Where?"),
        "res": ("Could you outline the {p} for me?", "Can I get a mask of the {p}?",
                "Which pixels belong to the {p}?", "Can you make a mask for the {p}?"),
        "reg": ("Could you tell me what is in [{i}]?", "Which object is in [{i}]?", "Do you know what [{i}] shows?",
                "What would you call the object in [{i}]?", "Can you name what is in [{i}]?"),
        "gc": ("Could you list the objects in the image with their locations?",
               "Which objects do you see, and where are they?",
               "Can you tell me which objects the image shows, with their locations?",
               "What does the image show? Please include object locations."),
    },
    "command": {
        "rec": ("Point to the {p}.", "Mark the {p}.", "Give me the location of the {p}.", "Put a box on the {p}.",
                "Please find the {p} in the image.", "Show where the {p} is."),
        "res": ("Outline the {p}.", "Mask the {p}.", "Cut out the {p}.", "Please segment the {p}.",
                "Draw the outline of the {p}."),
        "reg": ("Name the object in [{i}].", "Tell me what is in [{i}].", "Identify [{i}].",
                "Please name what you see in [{i}].", "Say which object is in [{i}]."),
        "gc": ("List the objects in the image with their locations.", "Name every object and mark where it is.",
               "Please describe the image and give the object locations.",
               "Tell me which objects the image shows, with their locations."),
    },
    "no_article": {
        "rec": ("where is {p}", "find {p}", "locate {p} in image", "show {p}"),
        "res": ("segment {p}", "mask of {p}", "give mask of {p}"),
        "reg": ("what is in [{i}]", "object at [{i}]"),
        "gc": ("describe image with object locations", "objects in image with locations"),
    },
    "lower": None,  # the template sentences in lower case
    "upper": None,  # the template sentences in upper case
    "bare": {
        "rec": ("{p}", "the {p}", "{p}?"),
        "res": ("{p} mask", "the {p}, segmented"),
        "reg": ("[{i}]?", "[{i}]"),
        "gc": ("objects?", "all objects"),
    },
    "synonym": None,  # the template sentences, the colour (and, for circle and diamond, the shape) named by a synonym
    # word order: a leading phrase before the request, any lead with any task (_fronted_templates)
    "fronted": {task: _fronted_templates(task) for task in ("rec", "res", "reg", "gc")},
    # word order: the shape named first, its colour in an apposition ("Find the circle, the red one.")
    "appositive": {
        "rec": ("Find the {s}, the {c} one.", "Where is the {s}? The {c} one.", "Show me the {s}, the {c} one."),
        "res": ("Segment the {s}, the {c} one.", "Give the mask of the {s}, the {c} one."),
        "reg": ("The object in [{i}]: what is it?", "The region [{i}]: what does it show?"),
        "gc": ("The objects in the image: name them with their locations.",
               "The whole image: every object and its location."),
    },
    # held out (never in training data): word order, and statements instead of questions or commands
    "postposed": {
        "rec": ("Where is the {s} that is {c}?", "Find the {s} that is {c}.", "Show me the {s} which is {c}."),
        "res": ("Segment the {s} that is {c}.", "Give the mask of the {s} which is {c}."),
        "reg": ("In [{i}], what is there?", "At [{i}], which object is it?"),
        "gc": ("With object locations, describe the image.", "In the image, what objects are there and where?"),
    },
    "indirect": {
        "rec": ("I am looking for the {p}.", "I need to know where the {p} is.", "Tell me where the {p} is, please."),
        "res": ("I need a mask of the {p}.", "I would like the {p} segmented."),
        "reg": ("I wonder what is in [{i}].", "I would like to know what [{i}] is."),
        "gc": ("I would like a description of the image with object locations.",),
    },
}
# families that reword the colour and shape words cannot word a relation ("left one of the two red shapes"): such
# questions use the template family's sentences
RELATION_AS_TEMPLATE = ("postposed", "synonym", "appositive")
HELD_OUT_PHRASINGS = ("postposed", "indirect")
TRAIN_PHRASINGS = tuple(f for f in PHRASING_FAMILIES if f not in HELD_OUT_PHRASINGS)
_CASE_TRANSFORMS = {"lower": str.lower, "upper": str.upper}


def resolve_phrasings(phrasings, allow_held_out: bool = False) -> tuple[str, ...]:
    """A tuple of family names from a sequence or a comma-separated string; the aliases ``train`` (all training
    families), ``held_out`` and ``all`` expand. Held-out families raise unless `allow_held_out`."""
    names = phrasings.split(",") if isinstance(phrasings, str) else list(phrasings)
    out: list[str] = []
    for name in (n.strip() for n in names):
        expanded = {"train": TRAIN_PHRASINGS, "held_out": HELD_OUT_PHRASINGS,
                    "all": tuple(PHRASING_FAMILIES)}.get(name, (name,))
        for family in expanded:
            if family not in PHRASING_FAMILIES:
                raise ValueError(f"unknown phrasing family {family!r}; expected some of {tuple(PHRASING_FAMILIES)} "
                                 "or train / held_out / all")
            if family in HELD_OUT_PHRASINGS and not allow_held_out:
                raise ValueError(f"phrasing family {family!r} is held out for evaluation (HELD_OUT_PHRASINGS); "
                                 "pass allow_held_out=True (--allow-held-out) to write evaluation data with it")
            if family not in out:
                out.append(family)
    if not out:
        raise ValueError("`phrasings`: no family given")
    return tuple(out)


def family_question(family: str, task: str, rng: np.random.Generator, color: str | None = None,
                    shape: str | None = None, p: str | None = None, i: int = 0, index: int | None = None) -> str:
    """One question of `task` ("rec", "res", "reg", "gc") in phrasing `family`, its template drawn from `rng`
    (`index`: use that template of the `template` family instead). The referring phrase is `p` when given (a
    relation: then the families of `RELATION_AS_TEMPLATE`, which rewrite the colour and shape words, use the
    `template` wording), else built from `color` and `shape`."""
    if family not in PHRASING_FAMILIES:
        raise ValueError(f"unknown phrasing family {family!r}")
    transform = _CASE_TRANSFORMS.get(family)
    source = "template" if PHRASING_FAMILIES[family] is None else family
    if p is not None and family in RELATION_AS_TEMPLATE:
        source = "template"
    templates = PHRASING_FAMILIES[source][task]
    if source == "template" and index is not None:
        template = templates[index]
    else:
        template = templates[int(rng.integers(len(templates)))]
    if family == "synonym" and p is None and color is not None:
        names = COLOR_SYNONYMS[color]
        color = names[int(rng.integers(len(names)))]
        names = SHAPE_SYNONYMS.get(shape, (shape,))
        shape = names[int(rng.integers(len(names)))]
    if p is None and color is not None:
        p = f"{color} {shape}"
    text = template.format(p=p, c=color, s=shape, i=i)
    return transform(text) if transform else text


def absent_attributes(objects: list[dict], rng: np.random.Generator, shapes=SHAPES,
                      conjunction: bool = False) -> tuple[str, str]:
    """A (colour, shape) pair that no object of the scene has, drawn from `rng`: among the pairs that share the
    colour or the shape of some object of the scene (a hard negative) when there is one, else among all.

    With `conjunction`, among the pairs whose colour AND shape are both in the scene, on different objects (a red
    square asked about next to a red circle and a blue square) when there is one: only the binding of colour to
    shape tells them from a present object."""
    shapes = tuple(shapes) + tuple(s for s in dict.fromkeys(o["shape"] for o in objects) if s not in shapes)
    present = {(o["color"], o["shape"]) for o in objects}
    candidates = [(c, s) for c in COLORS for s in shapes if (c, s) not in present]
    hard = [(c, s) for c, s in candidates if any(o["color"] == c or o["shape"] == s for o in objects)]
    pool = hard or candidates
    if conjunction:
        colors, shapes_present = {o["color"] for o in objects}, {o["shape"] for o in objects}
        pool = [(c, s) for c, s in hard if c in colors and s in shapes_present] or pool
    return pool[int(rng.integers(len(pool)))]


def scramble_words(text: str, rng: np.random.Generator) -> str:
    """`text` with its words (runs of non-space characters, a box reference "[0]" one of them) in a random order
    drawn from `rng`, its closing "?" or "." kept at the end: "Where is the red circle?" -> "red Where circle the
    is?". A question names at most one colour and one shape, so any order still names the same object; relations
    ("the left one of the two red shapes") are never scrambled (:func:`make_sample`)."""
    end = text[-1] if text and text[-1] in "?." else ""
    words = (text[:-1] if end else text).split()
    return " ".join(words[i] for i in rng.permutation(len(words))) + end


def absent_answer(color: str, shape: str) -> str:
    return f"There is no {color} {shape}."


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith(("s", "sh", "ch", "x")) else shape + "s"


def relational_phrases(objects: list[dict], k: int) -> list[str]:
    """The relational phrases that name object k unambiguously: "left one of the two red shapes" (or "right one of
    the two circles") when exactly two objects of the scene share k's colour (shape) and each one's x-centre lies
    outside the other's horizontal extent (so that "left" cannot be disputed). Empty when there is none."""
    out = []
    for attribute in ("color", "shape"):
        group = [j for j, o in enumerate(objects) if o[attribute] == objects[k][attribute]]
        if len(group) != 2:
            continue
        a, b = objects[k]["box"], objects[group[0] if group[1] == k else group[1]]["box"]
        ca, cb = (a[0] + a[2]) / 2, (b[0] + b[2]) / 2
        if b[0] <= ca <= b[2] or a[0] <= cb <= a[2]:
            continue
        side = "left" if ca < cb else "right"
        noun = f"{objects[k]['color']} shapes" if attribute == "color" else _plural(objects[k]["shape"])
        out.append(f"{side} one of the two {noun}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------


def shape_mask(kind: str, size: int, x0: int, y0: int, height: int, width: int) -> np.ndarray:
    """Exact bool mask of a shape of side `size` whose bounding square starts at (x0, y0); pixel centres inside."""
    if kind not in SHAPES + EXTRA_SHAPES:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES + EXTRA_SHAPES}")
    full = np.zeros((height, width), dtype=bool)
    # only the pixels of the bounding square (clipped to the image) can be inside: test those alone
    top, left = max(y0, 0), max(x0, 0)
    bottom, right = min(y0 + size, height), min(x0 + size, width)
    if bottom <= top or right <= left:
        return full
    ys, xs = np.mgrid[top:bottom, left:right]
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
    else:  # "star": the regular five-pointed star (pentagram outline), one point up
        mask = _inside_polygon(u, v, _star_polygon())
    full[top:bottom, left:right] = mask & inside
    return full


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
                task_weights: dict | None = None, caption_order: str = "random", phrasings=None,
                allow_held_out: bool = False, absent_fraction: float = 0.0, relation_fraction: float = 0.0,
                mix_turn_tasks: bool = False, absent_conjunction_fraction: float = 0.0,
                scramble_fraction: float = 0.0, **scene_kwargs) -> tuple[PIL.Image.Image, dict]:
    """One sample: the image and its JSONL record (without the `image` path). Deterministic in `seed`.
    `caption_order`: how a grounded caption orders its objects (`gc_answer`).

    Opt-in (the defaults give the samples of earlier versions, byte for byte): `phrasings` (family names, see
    :func:`resolve_phrasings`; each question draws its family uniformly), `absent_fraction` (rec/res turns about an
    absent object, answered "There is no purple circle." without a box; `absent_conjunction_fraction` of them about a
    colour and a shape both present on different objects, see :func:`absent_attributes`), `relation_fraction`
    (rec/res turns whose target is named by an unambiguous relation where the scene has one), `mix_turn_tasks`
    (consecutive turns never share a task), `scramble_fraction` (questions with their words in a random order, see
    :func:`scramble_words`; never a relation). Their draws come from a separate stream (`default_rng([seed, 3])`), so
    the scene, the tasks and the targets stay those of the default sample (except with `mix_turn_tasks`, which
    redraws repeated tasks); `phrasings=["template"]` alone gives the default conversations (the queries then also
    record their family).
    Held-out families (:data:`HELD_OUT_PHRASINGS`) raise unless `allow_held_out` (evaluation data only)."""
    image, objects = render_scene(seed, **scene_kwargs)
    rng = np.random.default_rng([seed, 1])
    families = resolve_phrasings(phrasings, allow_held_out) if phrasings is not None else None
    for name, value in (("absent_fraction", absent_fraction), ("relation_fraction", relation_fraction),
                        ("absent_conjunction_fraction", absent_conjunction_fraction),
                        ("scramble_fraction", scramble_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must be in [0, 1], got {value!r}")
    if absent_conjunction_fraction > 0 and not absent_fraction > 0:
        raise ValueError("`absent_conjunction_fraction` is a share of the absent-object questions: it needs "
                         f"`absent_fraction` > 0, got {absent_fraction!r}")
    extended = families is not None or absent_fraction > 0 or relation_fraction > 0
    prng = np.random.default_rng([seed, 3])  # the opt-in draws only
    scramble_rng = np.random.default_rng([seed, 4])  # word orders: a stream of their own, the others stay as they were
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
    scene_shapes = scene_kwargs.get("shapes", SHAPES)
    for turn in range(n_turns):
        task = tasks[rng.choice(len(tasks), p=weights)]
        if mix_turn_tasks and turn > 0:
            others = [j for j, t in enumerate(tasks) if t != turn_tasks[-1] and not (t == "gc" and used_gc)]
            if (task == turn_tasks[-1] or (task == "gc" and used_gc)) and others and weights[others].sum() > 0:
                w = weights[others] / weights[others].sum()
                task = tasks[others[int(rng.choice(len(others), p=w))]]
        if task == "gc" and used_gc:
            task = "rec" if "rec" in tasks else tasks[0]
        # the first referring query of a scene targets an object that has a distractor when there is one
        fresh = [j for j in range(len(objects)) if j not in targeted] or list(range(len(objects)))
        k = first_object if turn == 0 else fresh[int(rng.integers(len(fresh)))]
        targeted.add(k)
        family = families[int(prng.integers(len(families)))] if families is not None else "template"
        if task in ("rec", "res"):
            templates = REC_TEMPLATES if task == "rec" else RES_TEMPLATES
            index = int(rng.integers(len(templates)))
            if not extended:
                question = templates[index].format(p=phrase(objects[k]))
                answer = f"The {phrase(objects[k])} {ref(k)}."
                queries.append({"task": task, "object": k})
            elif absent_fraction > 0 and prng.random() < absent_fraction:
                conjunction = absent_conjunction_fraction > 0 and prng.random() < absent_conjunction_fraction
                color, shape = absent_attributes(objects, prng, scene_shapes, conjunction=conjunction)
                question = family_question(family, task, prng, color, shape, index=index)
                answer = absent_answer(color, shape)
                targeted.discard(k)
                queries.append({"task": task, "object": None, "absent": [color, shape], "phrasing": family})
            else:
                relations = relational_phrases(objects, k)
                if relation_fraction > 0 and relations and prng.random() < relation_fraction:
                    relation = relations[int(prng.integers(len(relations)))]
                    question = family_question(family, task, prng, p=relation, index=index)
                    query = {"task": task, "object": k, "relation": relation, "phrasing": family}
                else:
                    question = family_question(family, task, prng, objects[k]["color"], objects[k]["shape"],
                                               index=index)
                    query = {"task": task, "object": k, "phrasing": family}
                answer = f"The {phrase(objects[k])} {ref(k)}."
                queries.append(query)
        elif task == "reg":
            index = int(rng.integers(len(REG_TEMPLATES)))
            i = int(ref(k)[1:-1])
            question = REG_TEMPLATES[index].format(i=i) if not extended else \
                family_question(family, "reg", prng, i=i, index=index)
            answer = f"A {phrase(objects[k])}."
            queries.append({"task": task, "object": k, **({"phrasing": family} if extended else {})})
        else:
            used_gc = True
            index = int(rng.integers(len(GC_TEMPLATES)))
            question = GC_TEMPLATES[index] if not extended else family_question(family, "gc", prng, index=index)
            answer = gc_answer(objects, ref, rng, caption_order)
            queries.append({"task": task, "object": None, **({"phrasing": family} if extended else {})})
        if scramble_fraction > 0 and scramble_rng.random() < scramble_fraction and "relation" not in queries[-1]:
            question = scramble_words(question, scramble_rng)
            queries[-1]["scrambled"] = True
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
            if query["task"] in ("rec", "res") and query.get("object") is not None:  # not absent-object questions
                total += 1
                hits += has_distractor(record["objects"], query["object"])
    return hits / max(total, 1)


def write_dataset(out_dir: str, seeds, jsonl_name: str = "data.jsonl", image_dir: str = "images",
                  num_workers: int = 1, **kwargs) -> str:
    """Write images and a JSONL file for `seeds` (an iterable of ints) into `out_dir`; returns the JSONL path.

    Each sample depends on its seed only, so `num_workers` processes can draw them: the files are the same, line
    for line and byte for byte, as those one process writes."""
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"`num_workers` must be a positive integer, got {num_workers!r}")
    os.makedirs(os.path.join(out_dir, image_dir), exist_ok=True)
    path = os.path.join(out_dir, jsonl_name)
    write = functools.partial(_write_sample, out_dir, image_dir, kwargs)
    seeds = [int(seed) for seed in seeds]
    with open(path, "w") as f:
        if num_workers == 1:
            f.writelines(map(write, seeds))
        else:
            # fork where the platform has it: a spawned worker would import the package again (seconds)
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(num_workers) as pool:
                f.writelines(pool.imap(write, seeds, chunksize=64))
    return path


def _write_sample(out_dir: str, image_dir: str, kwargs: dict, seed: int) -> str:
    """Draw sample `seed`, save its image under `out_dir`, return its JSONL line."""
    image, record = make_sample(seed, **kwargs)
    rel = f"{image_dir}/{seed:08d}.png"
    image.save(os.path.join(out_dir, rel), compress_level=1)
    record = {"id": record["id"], "image": rel, **{k: v for k, v in record.items() if k != "id"}}
    return json.dumps(record) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# A tokenizer and processor for the task
# ----------------------------------------------------------------------------------------------------------------


def task_corpus(phrasings: bool = False) -> list[str]:
    """Sentences covering the task's vocabulary (for training a small SentencePiece model). With `phrasings`, also
    the sentences of the training phrasing families (:data:`TRAIN_PHRASINGS`), absent-object answers and
    relational phrases, after the default lines (which stay exactly those of the shipped tokenizer); the held-out
    families' sentences are never in it."""
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
    if phrasings:
        lines += _phrasing_corpus()
    return lines


def _phrasing_corpus() -> list[str]:
    """Every sentence the training families can ask, plus absent answers and relational phrases."""
    lines = []
    for family in TRAIN_PHRASINGS:
        source = "template" if PHRASING_FAMILIES[family] is None else family
        transform = _CASE_TRANSFORMS.get(family, lambda text: text)
        for task in ("rec", "res"):
            for template in PHRASING_FAMILIES[source][task]:
                for color in COLORS:
                    for shape in SHAPES:
                        colors = COLOR_SYNONYMS[color] if family == "synonym" else (color,)
                        shapes = SHAPE_SYNONYMS.get(shape, (shape,)) if family == "synonym" else (shape,)
                        for c in colors:
                            for s in shapes:
                                lines.append(transform(template.format(p=f"{c} {s}", c=c, s=s, i=0)))
        for task in ("reg", "gc"):
            lines += [transform(t.format(i=0)) for t in PHRASING_FAMILIES[source][task]]
    for color in COLORS:
        for shape in SHAPES:
            lines.append(absent_answer(color, shape))
    nouns = [f"{c} shapes" for c in COLORS] + [_plural(s) for s in SHAPES]
    relations = [f"{side} one of the two {noun}" for side in ("left", "right") for noun in nouns]
    for family in TRAIN_PHRASINGS:
        if family in RELATION_AS_TEMPLATE:  # worded as the template (see family_question)
            continue
        source = "template" if PHRASING_FAMILIES[family] is None else family
        transform = _CASE_TRANSFORMS.get(family, lambda text: text)
        for task in ("rec", "res"):
            lines += [transform(t.format(p=r)) for t in PHRASING_FAMILIES[source][task] for r in relations]
    return lines


SHAPES_VOCAB_SIZE = 640  # the shipped model's
PHRASINGS_VOCAB_SIZE = 1024  # the smallest multiple of 128 at which every word of the training families is one piece


def build_shapes_tokenizer(vocab_size: int | None = None, phrasings: bool = False):
    """A small LLaMA tokenizer (SentencePiece BPE with byte fallback, so any text encodes) whose merges cover the
    shapes vocabulary, with the five NExT-Chat tokens added after the base vocabulary. Deterministic. `phrasings`:
    trained on `task_corpus(phrasings=True)` (a different tokenizer from the shipped one). `vocab_size` defaults to
    `SHAPES_VOCAB_SIZE` (640), or `PHRASINGS_VOCAB_SIZE` (1024) with `phrasings` (at 640 the larger corpus leaves
    common words such as "no" in letters)."""
    from .tokenizer import train_llama_tokenizer

    if vocab_size is None:
        vocab_size = PHRASINGS_VOCAB_SIZE if phrasings else SHAPES_VOCAB_SIZE

    return train_llama_tokenizer((task_corpus(phrasings=True) if phrasings else task_corpus()) * 4, vocab_size)


def build_shapes_processor(image_size: int = 64, patch_size: int = 8, sam_image_size: int | None = 64,
                           vocab_size: int | None = None, system_prompt: str = "", phrasings: bool = False):
    """The processor of the shapes task: :func:`build_shapes_tokenizer` + a CLIP/SAM image processor at
    `image_size` / `sam_image_size`, `image_seq_length = (image_size // patch_size) ** 2`, and the vicuna chat
    template with `system_prompt` as its default system prompt (empty: the vicuna prompt would be a quarter of
    every training sequence, for nothing a model trained from scratch needs). `phrasings`: the tokenizer of
    `build_shapes_tokenizer(phrasings=True)` (for data written with phrasing families, absent objects, relations)."""
    from nextchat.processing import NextChatImageProcessor, NextChatProcessor
    from nextchat.processing.processing_nextchat import vicuna_chat_template

    image_processor = NextChatImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        sam_image_size=sam_image_size,
    )
    return NextChatProcessor(
        image_processor, build_shapes_tokenizer(vocab_size, phrasings=phrasings),
        image_seq_length=(image_size // patch_size) ** 2,
        chat_template=vicuna_chat_template(system_prompt),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the synthetic shapes grounding dataset (JSONL + PNG).")
    parser.add_argument("out_dir")
    parser.add_argument("--seed-start", type=int, default=0)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--jsonl-name", default="data.jsonl")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that draw the samples (the files are the same for any number)")
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
    parser.add_argument("--phrasings", default=None,
                        help="comma-separated phrasing families of the questions, drawn uniformly per question "
                             f"(training: {','.join(TRAIN_PHRASINGS)}; aliases train, held_out, all); default: the "
                             "original templates only, with the original random streams")
    parser.add_argument("--allow-held-out", action="store_true",
                        help=f"allow the held-out families ({','.join(HELD_OUT_PHRASINGS)}) in --phrasings: for "
                             "evaluation data only")
    parser.add_argument("--absent-fraction", type=float, default=0.0,
                        help="fraction of rec/res turns about an object that is not in the scene, answered without a "
                             "box ('There is no purple circle.')")
    parser.add_argument("--absent-conjunction-fraction", type=float, default=0.0,
                        help="fraction of the absent-object questions about a colour and a shape that are both in the "
                             "scene, on different objects ('the red square' next to a red circle and a blue square)")
    parser.add_argument("--relation-fraction", type=float, default=0.0,
                        help="fraction of rec/res turns that name their target by an unambiguous relation where the "
                             "scene has one ('the left one of the two red shapes')")
    parser.add_argument("--scramble-fraction", type=float, default=0.0,
                        help="that fraction of the questions (relations excepted) has its words in a random order "
                             "(word-order noise; default 0)")
    parser.add_argument("--mix-turn-tasks", action="store_true",
                        help="with --max-turns > 1: consecutive turns of a conversation never share a task")
    args = parser.parse_args(argv)
    if args.phrasings is not None:
        try:
            resolve_phrasings(args.phrasings, args.allow_held_out)
        except ValueError as error:
            parser.error(f"--phrasings: {error}")
    for name in ("absent_fraction", "relation_fraction", "absent_conjunction_fraction", "scramble_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    if args.absent_conjunction_fraction and not args.absent_fraction:
        parser.error("--absent-conjunction-fraction is a share of the absent-object questions: it needs "
                     "--absent-fraction > 0")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
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
        num_workers=args.workers,
        min_turns=args.min_turns, max_turns=args.max_turns, tasks=tuple(args.tasks.split(",")),
        min_objects=args.min_objects, max_objects=args.max_objects, hard_fraction=args.hard_fraction,
        single_object_fraction=args.single_object_fraction, same_shape_fraction=args.same_shape_fraction,
        task_weights=task_weights or None, caption_order=args.caption_order,
        **new_shape_kwargs(args.new_shape), **variation_kwargs(args),
    )
    print(path)


def variation_kwargs(args) -> dict:
    """The `make_sample` keyword arguments of the opt-in variations given on the command line (none by default, so
    that the default command writes exactly the data of earlier versions)."""
    out = {}
    if args.phrasings is not None:
        out.update(phrasings=args.phrasings, allow_held_out=args.allow_held_out)
    if args.absent_fraction:
        out["absent_fraction"] = args.absent_fraction
    if args.absent_conjunction_fraction:
        out["absent_conjunction_fraction"] = args.absent_conjunction_fraction
    if args.relation_fraction:
        out["relation_fraction"] = args.relation_fraction
    if args.mix_turn_tasks:
        out["mix_turn_tasks"] = True
    if args.scramble_fraction:
        out["scramble_fraction"] = args.scramble_fraction
    return out


def new_shape_kwargs(new_shape: str | None) -> dict:
    """`render_scene` keyword arguments for scenes built around `new_shape` (none for None: the default scenes)."""
    if new_shape is None:
        return {}
    return {"shapes": SHAPES + (new_shape,), "focus_shape": new_shape}


if __name__ == "__main__":
    main()
