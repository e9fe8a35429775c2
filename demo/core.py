"""The chat engine shared by the command line (`nextchat-chat`) and the web page (`nextchat-demo`).

Nothing here imports gradio. A :class:`ChatSession` holds one image and one conversation:

* **Boxes are numbered per conversation.** Every box gets the next free index: the boxes the user gives (in the
  order given) and the boxes the model grounds in its answers (in the order of the answer). In a question,
  ``[i]`` refers to box ``i`` (``[0,1]`` to two boxes at once; ``\\[`` is a literal bracket), so after the model
  answered "the dog [1]" the user may ask "what is [1] doing?". A box the user adds must be mentioned in the
  question that brings it.
* **History.** Earlier answers are fed back with their ``<at> <boxes>`` pairs in place (as references to the
  boxes the model predicted), so the model sees its own grounding, as in the original multi-turn data.
* **Drawing.** Each answer is drawn with the original demo's colours (``#F76566, #18ACBA, #9400D3, #454926,
  #4E72B8``): the k-th grounded phrase of an answer gets colour k (mod 5), its box (labelled with its index) and its
  SAM mask (when the model has SAM and the mask's predicted IoU reaches ``iou_threshold``, 0.3 as in the
  original). The user's boxes of that turn are drawn in grey underneath. Masks are drawn as an outline with a light
  fill, so that the object keeps its own colour. With ``display_sides`` (the web page) the drawing is made on a copy
  of the image resized for the screen (small images enlarged, huge ones reduced); boxes stay in original pixels.
* **Images** must be between :data:`MIN_IMAGE_SIDE` pixels a side and :data:`MAX_IMAGE_PIXELS` pixels in all;
  unreadable files, non-images and images out of these bounds raise :class:`DemoError` with a message for the user.
* **Single-turn models.** A model folder whose ``config.json`` has ``"nextchat_training": {"max_turns": 1}`` was
  trained on one-question conversations; the chat then recommends a new conversation for each question
  (:func:`conversation_note`).
"""

from __future__ import annotations

import html
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import PIL.ImageColor
import PIL.ImageDraw
import PIL.ImageFilter

from ..processing import DRAW_COLORS, draw_grounding  # the processor's colours, so page and pictures agree

USER_BOX_COLOR = "#7F7F7F"
SHIPPED_MODEL_NAME = "tiny-nextchat-shapes"
MODEL_ENV_VAR = "NEXTCHAT_DEMO_MODEL"

# Images smaller than this on a side carry too little for a question (a 1 x 1 image makes the model ramble); images
# above this many pixels are refused before decoding (a 48-megapixel photo passes).
MIN_IMAGE_SIDE = 16
MAX_IMAGE_PIXELS = 64_000_000
# The web page shows and draws on a copy of the image whose longest side is in this range: small images are
# enlarged by a whole factor (nearest pixels), huge ones reduced.
DISPLAY_MIN_SIDE = 512
DISPLAY_MAX_SIDE = 1024
MASK_FILL_ALPHA = 0.2

# The example prompts of the original NExT-Chat web demo (its Gradio app), unchanged; the page writes the number of
# the question's first box for ``[0]``.
EXAMPLE_PROMPTS = {
    "Where is X?": "Where is {} in the image?",
    "Describe with locations": (
        "Can you provide a description of the image and include the locations for each mentioned object?"
    ),
    "Explain with locations": "{} Please include object locations and explain.",
    "What is in my box?": "What is region [0]?",
}

_REF_RE = re.compile(r"(?<!\\)\[\s*(\d+(?:\s*,\s*\d+)*)\s*,?\s*\]")


class DemoError(ValueError):
    """A problem with what the user asked for (bad box, missing image, unknown model folder...): its message is
    meant to be shown to the user as is."""


def log(message: str) -> None:
    """Progress messages go to stderr (stdout carries the answers)."""
    print(f"[nextchat] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Model folder and loading
# --------------------------------------------------------------------------------------------------------------


def shipped_model_candidates() -> list[Path]:
    """Where the tiny model shipped with the repository is looked for: ``examples/tiny-nextchat-shapes`` next to the
    package sources (editable install / source checkout), then under the current directory."""
    here = Path(__file__).resolve().parent
    return [here.parent / "examples" / SHIPPED_MODEL_NAME, Path.cwd() / "examples" / SHIPPED_MODEL_NAME]


def default_model_dir() -> str | None:
    """``$NEXTCHAT_DEMO_MODEL`` if set, else the shipped tiny model when it is present, else ``None``."""
    env = os.environ.get(MODEL_ENV_VAR)
    if env:
        return env
    for candidate in shipped_model_candidates():
        if (candidate / "config.json").is_file():
            return str(candidate)
    return None


def resolve_model_dir(model: str | None) -> str:
    if model is None:
        model = default_model_dir()
        if model is None:
            where = ", ".join(str(p) for p in shipped_model_candidates())
            raise DemoError(
                f"no --model given and the shipped tiny model was not found (looked in {where}); pass --model DIR "
                f"with a converted NExT-Chat folder (config.json, weights, processor files) or set ${MODEL_ENV_VAR}"
            )
    return model


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise DemoError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return table[dtype]


def load_model(model_dir: str, device: str = "auto", dtype: str = "auto", progress: Callable[[str], None] = log,
               base_model: str | None = None):
    """Load a NExT-Chat folder (the model and its processor), or a PEFT (LoRA) adapter folder on its base model
    (``base_model``, default the adapter's ``base_model_name_or_path``; the adapter is merged). Returns
    ``(model, processor)``. See :func:`nextchat.loading.load_pretrained`."""

    from nextchat.loading import LoadingError, describe_source, load_pretrained

    path = Path(model_dir)
    if not path.exists() and (str(model_dir).startswith((".", "/", "~")) or str(model_dir).count("/") > 1):
        raise DemoError(f"model folder {model_dir!r} does not exist")
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise DemoError(
            f"{model_dir!r} has neither config.json nor adapter_config.json: pass a folder written by save_pretrained "
            "/ nextchat-convert, or a LoRA adapter folder (PeftModel.save_pretrained, a LoRA run's checkpoint-N/)"
        )
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    start = time.perf_counter()
    try:
        source = describe_source(str(model_dir), base_model)
        if source["kind"] == "adapter":
            progress(f"loading the adapter {model_dir} on its base model {source['base_model']} on {device} "
                     f"({str(torch_dtype).replace('torch.', '')}) and merging it ...")
        else:
            progress(f"loading the model and processor from {model_dir} on {device} "
                     f"({str(torch_dtype).replace('torch.', '')}) ...")
        model, processor = load_pretrained(str(model_dir), device=device, dtype=torch_dtype, base_model=base_model)
    except (LoadingError, OSError) as err:
        raise DemoError(str(err)) from err
    if getattr(model.config, "model_type", None) != "nextchat":
        raise DemoError(f"{model_dir!r} is not a NExT-Chat model (model_type={model.config.model_type!r})")
    check_compatible(model, processor)
    n_params = sum(p.numel() for p in model.parameters())
    progress(
        f"model ready in {time.perf_counter() - start:.1f} s ({n_params / 1e6:.2f} M parameters, "
        f"{'with' if model.sam is not None else 'without'} SAM)"
    )
    return model, processor


def check_compatible(model, processor) -> None:
    config = model.config
    for name, value in processor.special_token_ids.items():
        if getattr(config, name) != value:
            raise DemoError(
                f"the processor and the model disagree on {name}: {value} vs {getattr(config, name)}; "
                "use the processor saved with this model"
            )
    if processor.image_seq_length != config.image_seq_length:
        raise DemoError(
            f"the processor writes {processor.image_seq_length} image tokens but the model expects "
            f"{config.image_seq_length}"
        )


# --------------------------------------------------------------------------------------------------------------
# Settings, boxes, replies
# --------------------------------------------------------------------------------------------------------------


DECODING_MODES = ("greedy", "beam", "sample")


@dataclass
class GenerationSettings:
    """How answers are decoded. ``mode``: ``greedy``, ``beam`` (``num_beams``; the original demo used 5) or
    ``sample`` (``temperature``, ``top_p``, ``top_k``: the original demo's 0.8 / 0.7 / 5; ``seed`` for repeatable
    samples)."""

    mode: str = "greedy"
    max_new_tokens: int = 128
    num_beams: int = 5
    temperature: float = 0.8
    top_p: float = 0.7
    top_k: int = 5
    seed: int | None = None

    def validate(self) -> "GenerationSettings":
        aliases = {"beams": "beam", "beam search": "beam", "sampling": "sample"}
        self.mode = aliases.get(str(self.mode).lower(), str(self.mode).lower())
        if self.mode not in DECODING_MODES:
            raise DemoError(f"decoding mode must be one of {', '.join(DECODING_MODES)}, got {self.mode!r}")
        try:
            self.max_new_tokens = int(self.max_new_tokens)
            self.num_beams = int(self.num_beams)
            self.top_k = int(self.top_k)
            self.temperature = float(self.temperature)
            self.top_p = float(self.top_p)
        except (TypeError, ValueError) as err:
            raise DemoError(f"bad generation setting: {err}") from err
        if self.max_new_tokens < 1:
            raise DemoError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.mode == "beam" and self.num_beams < 1:
            raise DemoError(f"number of beams must be at least 1, got {self.num_beams}")
        if self.mode == "sample":
            if self.temperature <= 0:
                raise DemoError(f"temperature must be > 0, got {self.temperature}")
            if not 0 < self.top_p <= 1:
                raise DemoError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k < 0:
                raise DemoError(f"top_k must be >= 0, got {self.top_k}")
        return self

    def generate_kwargs(self) -> dict:
        self.validate()
        kwargs = {"max_new_tokens": self.max_new_tokens}
        if self.mode == "greedy":
            kwargs.update(do_sample=False, num_beams=1)
        elif self.mode == "beam":
            kwargs.update(do_sample=False, num_beams=self.num_beams)
        else:
            kwargs.update(do_sample=True, num_beams=1, temperature=self.temperature, top_p=self.top_p,
                          top_k=self.top_k)
        return kwargs

    def describe(self) -> str:
        if self.mode == "greedy":
            return f"greedy, max {self.max_new_tokens} new tokens"
        if self.mode == "beam":
            return f"beam search ({self.num_beams} beams), max {self.max_new_tokens} new tokens"
        return (f"sampling (temperature {self.temperature:g}, top-p {self.top_p:g}, top-k {self.top_k}), "
                f"max {self.max_new_tokens} new tokens")


def parse_box(text) -> list[float]:
    """``"x1,y1,x2,y2"`` (commas and/or spaces, optional brackets) -> four floats."""
    if isinstance(text, (list, tuple, np.ndarray)):
        values = list(text)
    else:
        cleaned = str(text).strip().strip("[]()")
        values = [v for v in re.split(r"[,\s]+", cleaned) if v]
    try:
        box = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DemoError(f"a box is four pixel numbers x1,y1,x2,y2; got {text!r}") from None
    if len(box) != 4:
        raise DemoError(f"a box is four pixel numbers x1,y1,x2,y2; got {text!r}")
    if not all(np.isfinite(box)):
        raise DemoError(f"box {text!r} has a non-finite coordinate")
    return box


def parse_boxes(text: str | None) -> list[list[float]]:
    """Several boxes separated by ``;`` or new lines (``"10,10,50,60; 70,20,90,40"``)."""
    if text is None:
        return []
    parts = [p.strip() for p in re.split(r"[;\n]+", str(text)) if p.strip()]
    return [parse_box(p) for p in parts]


def format_box(box) -> str:
    return "(" + ", ".join(f"{float(v):.1f}" for v in box) + ")"


@dataclass
class BoxRecord:
    index: int
    box: list[float]
    source: str  # "user" | "model"
    text: str = ""


@dataclass
class GroundedEntity:
    """One grounded phrase of an answer."""

    index: int  # the box's number in the conversation ([index])
    text: str  # the phrase
    span: tuple[int, int]  # (start, end) in Reply.text
    box: list[float] | None  # pixel xyxy on the original image
    box_normalized: list[float] | None
    mask: np.ndarray | None  # bool (height, width), None without SAM or below the IoU threshold
    score: float | None
    color: str

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "text": self.text,
            "span": list(self.span),
            "box": None if self.box is None else [round(float(v), 2) for v in self.box],
            "box_normalized": None if self.box_normalized is None else [float(v) for v in self.box_normalized],
            "mask_area": None if self.mask is None else int(self.mask.sum()),
            "score": self.score,
            "color": self.color,
        }


@dataclass
class Reply:
    question: str
    text: str
    entities: list[GroundedEntity]
    image: PIL.Image.Image  # the annotated image (resized for the screen when the session has display_sides)
    user_boxes: list[BoxRecord] = field(default_factory=list)
    seconds: float = 0.0
    new_tokens: int = 0
    settings: str = ""

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            "answer": self.text,
            "entities": [e.to_dict() for e in self.entities],
            "user_boxes": [{"index": b.index, "box": b.box} for b in self.user_boxes],
            "seconds": round(self.seconds, 3),
            "new_tokens": self.new_tokens,
            "settings": self.settings,
        }


def check_image_size(width: int, height: int, name: str = "the image") -> None:
    """Refuse images too small to ask about or too large to handle (see :data:`MIN_IMAGE_SIDE`,
    :data:`MAX_IMAGE_PIXELS`)."""
    if min(width, height) < MIN_IMAGE_SIDE:
        raise DemoError(
            f"{name} is {width} x {height} pixels: too small to ask about (it needs at least {MIN_IMAGE_SIDE} "
            "pixels on each side)"
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise DemoError(
            f"{name} is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels): too large (at most "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels); reduce it first"
        )


def _open_image_file(path, name: str) -> PIL.Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns above 89 megapixels; the size is checked below, before the pixels are decoded
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(path)
    except PIL.Image.DecompressionBombError:
        limit = MAX_IMAGE_PIXELS / 1e6
        raise DemoError(f"{name} is too large (over {limit:.0f} megapixels); reduce it first") from None
    except PIL.UnidentifiedImageError:
        suffix = Path(os.fspath(path)).suffix
        if suffix.lower() in PIL.Image.registered_extensions():
            raise DemoError(
                f"{name} cannot be read: the file is damaged or is not really a {suffix[1:].upper()} image"
            ) from None
        raise DemoError(f"{name} is not an image (PNG, JPEG, WebP, GIF, BMP and TIFF pictures work)") from None
    except Exception as err:  # PIL raises many kinds on broken headers
        raise DemoError(f"{name} cannot be read as an image: {err}") from None
    check_image_size(*image.size, name=name)
    try:
        image.load()
    except Exception as err:
        raise DemoError(f"{name} cannot be read: the image data is damaged or truncated ({err})") from None
    return image


def load_image(source, name: str | None = None) -> PIL.Image.Image:
    """A path or an image -> an RGB PIL image (transparent parts on white). Unreadable files, non-images and
    images too small or too large (:func:`check_image_size`) raise :class:`DemoError`; ``name`` is how the file is
    named in those messages (default: the path)."""
    if isinstance(source, (str, os.PathLike)):
        name = name or repr(str(source))
        if not os.path.isfile(source):
            raise DemoError(f"image {name} does not exist")
        image = _open_image_file(source, name)
    elif isinstance(source, np.ndarray):
        image = PIL.Image.fromarray(source.astype(np.uint8) if source.dtype != np.uint8 else source)
    elif isinstance(source, PIL.Image.Image):
        image = source
    else:
        raise DemoError(f"expected an image or a path, got {type(source).__name__}")
    check_image_size(*image.size, name=name or "the image")
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def display_scale(width: int, height: int, min_side: int = DISPLAY_MIN_SIDE,
                  max_side: int = DISPLAY_MAX_SIDE) -> float:
    """How many screen pixels per image pixel the page uses: a whole factor that brings the longest side to at
    least ``min_side`` (without passing ``max_side``) for small images, ``max_side / longest side`` for large ones,
    else 1."""
    longest = max(width, height)
    if longest > max_side:
        return max_side / longest
    if longest < min_side:
        return float(max(1, min(math.ceil(min_side / longest), max_side // longest)))
    return 1.0


def training_max_turns(model) -> int | None:
    """The most turns per conversation the model was trained on, when its folder records it: ``config.json`` key
    ``"nextchat_training": {"max_turns": N}`` (written by whoever trained it; absent means unknown)."""
    record = getattr(getattr(model, "config", None), "nextchat_training", None)
    if isinstance(record, dict) and isinstance(record.get("max_turns"), int):
        return record["max_turns"]
    return None


# --------------------------------------------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------------------------------------------


class ChatSession:
    """One image, one conversation. ``ask`` runs a turn and returns a :class:`Reply`.

    ``display_sides`` (``(min_side, max_side)``, see :func:`display_scale`) makes the answers' pictures on a copy of
    the image resized for the screen, :attr:`display_image`; without it they are drawn at the image's size."""

    def __init__(self, model, processor, image=None, settings: GenerationSettings | None = None,
                 iou_threshold: float = 0.3, progress: Callable[[str], None] | None = log,
                 display_sides: tuple[int, int] | None = None, image_name: str | None = None):
        self.model = model
        self.processor = processor
        self.settings = settings or GenerationSettings()
        self.iou_threshold = iou_threshold
        self.progress = progress or (lambda message: None)
        self.display_sides = display_sides
        self.image: PIL.Image.Image | None = None
        self.display_image: PIL.Image.Image | None = None
        self.scale = 1.0  # display pixels per image pixel
        self.boxes: list[BoxRecord] = []
        self.turns: list[tuple[str, str]] = []  # (user text, assistant text with [i] references)
        self.replies: list[Reply] = []
        if image is not None:
            self.set_image(image, name=image_name)

    # -- state ------------------------------------------------------------------------------------------------

    def set_image(self, image, name: str | None = None) -> None:
        """Use a new image (an image or a path, see :func:`load_image`); starts a new conversation."""
        self.image = load_image(image, name=name)
        self.scale = 1.0 if self.display_sides is None else display_scale(*self.image.size, *self.display_sides)
        if self.scale == 1.0:
            self.display_image = self.image
        else:
            size = (max(1, round(self.image.width * self.scale)), max(1, round(self.image.height * self.scale)))
            # enlarged images keep their pixels square and sharp, so that clicks land on visible pixels
            resample = PIL.Image.NEAREST if self.scale > 1 else PIL.Image.LANCZOS
            self.display_image = self.image.resize(size, resample)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (keeps the image)."""
        self.boxes = []
        self.turns = []
        self.replies = []

    @property
    def next_box_index(self) -> int:
        return len(self.boxes)

    @property
    def max_turns(self) -> int | None:
        return training_max_turns(self.model)

    def to_image_point(self, x: float, y: float) -> tuple[int, int]:
        """A pixel of :attr:`display_image` -> the nearest pixel edge of the image, inside the image."""
        width, height = self.image.size
        return (min(max(round(x / self.scale), 0), width), min(max(round(y / self.scale), 0), height))

    def check_box(self, box) -> list[float]:
        box = parse_box(box)
        if self.image is None:
            raise DemoError("load an image before adding boxes")
        width, height = self.image.size
        x1, y1, x2, y2 = box
        if x2 < x1 or y2 < y1:
            raise DemoError(f"box {format_box(box)} is inverted: write x1,y1,x2,y2 with x1 <= x2 and y1 <= y2")
        if min(box) < 0 or x2 > width or y2 > height:
            raise DemoError(f"box {format_box(box)} leaves the image ({width} x {height} pixels)")
        return box

    # -- a turn -----------------------------------------------------------------------------------------------

    def _messages(self, question: str) -> list[dict]:
        messages = []
        for k, (user, assistant) in enumerate(self.turns):
            messages.append(self._user_message(user, first=k == 0))
            messages.append({"role": "assistant", "content": assistant})
        messages.append(self._user_message(question, first=not self.turns))
        return messages

    @staticmethod
    def _user_message(text: str, first: bool) -> dict:
        if first:
            return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
        return {"role": "user", "content": text}

    def ask(self, question: str, boxes=(), settings: GenerationSettings | None = None) -> Reply:
        """Ask ``question`` about the image. ``boxes`` (pixel xyxy) are added to the conversation first, numbered
        from :attr:`next_box_index`, and must be mentioned in the question as ``[i]``."""
        import torch

        if self.image is None:
            raise DemoError("load an image first")
        question = (question or "").strip()
        if not question:
            raise DemoError("type a question")
        settings = (settings or self.settings).validate()
        new_boxes = [self.check_box(b) for b in (boxes or [])]
        first_new = len(self.boxes)
        referenced = {int(i) for group in _REF_RE.findall(question) for i in group.split(",")}
        total = first_new + len(new_boxes)
        unknown = sorted(i for i in referenced if i >= total)
        if unknown:
            known = f"boxes [0] to [{total - 1}]" if total > 1 else ("only box [0]" if total else "no boxes yet")
            raise DemoError(
                f"the question refers to box {', '.join(f'[{i}]' for i in unknown)} but the conversation has {known}; "
                "add a box first, or write \\[ for a literal bracket"
            )
        unused = [first_new + k for k in range(len(new_boxes)) if first_new + k not in referenced]
        if unused:
            raise DemoError(
                f"box {', '.join(f'[{i}]' for i in unused)} is not mentioned in the question; refer to it as "
                f"[{unused[0]}] (e.g. 'What is in region [{unused[0]}]?')"
            )
        user_records = [BoxRecord(first_new + k, b, "user") for k, b in enumerate(new_boxes)]
        all_boxes = [r.box for r in self.boxes] + new_boxes

        processor, model = self.processor, self.model
        use_sam = model.sam is not None and processor.image_processor.sam_image_size is not None
        text = processor.apply_chat_template(self._messages(question), add_generation_prompt=True)
        try:
            inputs = processor(
                images=self.image, text=text, boxes=all_boxes or None, return_sam_pixel_values=use_sam
            )
        except ValueError as err:
            raise DemoError(str(err)) from err
        image_sizes = inputs.pop("image_sizes")
        inputs = inputs.to(model.device)
        kwargs = settings.generate_kwargs()
        if settings.mode == "sample" and settings.seed is not None:
            torch.manual_seed(int(settings.seed))
        eos = processor.tokenizer.eos_token_id
        pad = processor.tokenizer.pad_token_id
        self.progress(f"generating ({settings.describe()}) ...")
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                **inputs, **kwargs, return_dict_in_generate=True, eos_token_id=eos,
                pad_token_id=pad if pad is not None else eos,
            )
        seconds = time.perf_counter() - start
        result = processor.post_process_generation(output, image_sizes)[0]
        new_tokens = int(output.sequences.shape[1] - output.prompt_length)
        self.progress(f"answered in {seconds:.1f} s ({new_tokens} new tokens)")

        entities = []
        for k, raw in enumerate(result["entities"]):
            mask = raw.get("mask")
            score = raw.get("score")
            if mask is not None and score is not None and score < self.iou_threshold:
                mask = None
            entities.append(
                GroundedEntity(
                    index=total + k, text=raw["text"], span=tuple(raw["span"]), box=raw["box"],
                    box_normalized=raw["box_normalized"], mask=mask, score=score,
                    color=DRAW_COLORS[k % len(DRAW_COLORS)],
                )
            )
        answer = result["text"]
        reply = Reply(
            question=question, text=answer, entities=entities, image=None, user_boxes=user_records,
            seconds=seconds, new_tokens=new_tokens, settings=settings.describe(),
        )
        reply.image = self.draw(reply)
        # commit the turn
        self.boxes.extend(user_records)
        for e in entities:
            self.boxes.append(BoxRecord(e.index, e.box if e.box is not None else [0.0, 0.0, 0.0, 0.0], "model", e.text))
        self.turns.append((question, history_text(answer, entities, processor)))
        self.replies.append(reply)
        return reply

    # -- drawing ----------------------------------------------------------------------------------------------

    def draw(self, reply: Reply) -> PIL.Image.Image:
        """The image with the user's boxes of the turn (grey) and the answer's masks and boxes (colours)."""
        canvas = self._draw_user_boxes(self.display_image, reply.user_boxes)
        masked = [e for e in reply.entities if e.mask is not None]
        if masked:
            canvas = draw_masks(canvas, [e.mask for e in masked], [e.color for e in masked])
        boxed = [e for e in reply.entities if e.box is not None]
        if boxed:
            canvas = draw_grounding(
                canvas, [{"box": self._scaled(e.box)} for e in boxed], labels=[str(e.index) for e in boxed],
                colors=[e.color for e in boxed],
            )
        return canvas if canvas is not self.display_image else self.display_image.copy()

    def draw_pending(self, boxes=(), corner: tuple[float, float] | None = None) -> PIL.Image.Image:
        """:attr:`display_image` with the boxes for the next question (grey, labelled with the numbers they will
        get) and ``corner`` (image pixels, the first click of a box) marked with a cross."""
        records = [BoxRecord(self.next_box_index + k, list(b), "user") for k, b in enumerate(boxes)]
        canvas = self._draw_user_boxes(self.display_image, records)
        if corner is not None:
            canvas = canvas.copy() if canvas is self.display_image else canvas
            draw = PIL.ImageDraw.Draw(canvas)
            x, y = (v * self.scale for v in corner)
            arm = max(6, round(max(canvas.size) / 40))
            width = max(1, round(max(canvas.size) / 256))
            for color, extra in (((255, 255, 255), 2 * width), (PIL.ImageColor.getrgb(USER_BOX_COLOR), 0)):
                draw.line([(x - arm, y), (x + arm, y)], fill=color, width=width + extra)
                draw.line([(x, y - arm), (x, y + arm)], fill=color, width=width + extra)
        return canvas if canvas is not self.display_image else self.display_image.copy()

    def _scaled(self, box) -> list[float]:
        return [float(v) * self.scale for v in box]

    def _draw_user_boxes(self, canvas: PIL.Image.Image, records: list[BoxRecord]) -> PIL.Image.Image:
        if not records:
            return canvas
        return draw_grounding(
            canvas, [{"box": self._scaled(r.box)} for r in records], labels=[str(r.index) for r in records],
            colors=[USER_BOX_COLOR],
        )


def draw_masks(image: PIL.Image.Image, masks, colors, fill_alpha: float = MASK_FILL_ALPHA,
               outline_width: int | None = None) -> PIL.Image.Image:
    """Masks as an outline in their colour over a light fill (``fill_alpha``), so that the object's own colours stay
    visible; a mask of another size than ``image`` is resized to it."""
    arr = np.asarray(image.convert("RGB")).astype(np.float32)
    height, width = arr.shape[:2]
    outline_width = outline_width or max(1, round(max(width, height) / 256))
    for mask, color in zip(masks, colors):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (height, width):
            mask = np.asarray(PIL.Image.fromarray(mask).resize((width, height), PIL.Image.NEAREST), dtype=bool)
        if not mask.any():
            continue
        rgb = np.asarray(PIL.ImageColor.getrgb(color)[:3], dtype=np.float32)
        eroded = PIL.Image.fromarray(mask).convert("L").filter(PIL.ImageFilter.MinFilter(2 * outline_width + 1))
        outline = mask & ~(np.asarray(eroded) > 0)
        arr[mask] = (1 - fill_alpha) * arr[mask] + fill_alpha * rgb
        arr[outline] = rgb
    return PIL.Image.fromarray(np.round(arr).clip(0, 255).astype(np.uint8), mode="RGB")


def history_text(answer: str, entities: list[GroundedEntity], processor) -> str:
    """The answer as it goes back into the prompt: text escaped, ``[i]`` after each grounded phrase."""
    cuts = {}
    for e in entities:
        cuts.setdefault(e.span[1], []).append(e.index)
    out, last = [], 0
    for position in sorted(cuts):
        out.append(processor.escape_text(answer[last:position]))
        out.append(" [" + ",".join(str(i) for i in cuts[position]) + "]")
        last = position
    out.append(processor.escape_text(answer[last:]))
    return "".join(out).strip()


# --------------------------------------------------------------------------------------------------------------
# Rendering of answers
# --------------------------------------------------------------------------------------------------------------


def _spans(text: str, entities: list[GroundedEntity]):
    """Yield (plain_text, None) and (phrase, [entities]) pieces in order (entities that share a span together)."""
    groups: dict[tuple[int, int], list[GroundedEntity]] = {}
    for e in entities:
        groups.setdefault(tuple(e.span), []).append(e)
    last = 0
    for (start, end), group in sorted(groups.items()):
        start = max(start, last)
        if start > last:
            yield text[last:start], None
        yield text[start:end], group
        last = max(last, end)
    if last < len(text):
        yield text[last:], None


def answer_html(reply: Reply) -> str:
    """The answer as HTML: every grounded phrase underlined in the colour of its box, followed by its ``[i]``."""
    parts = []
    for piece, group in _spans(reply.text, reply.entities):
        if group is None:
            parts.append(html.escape(piece))
            continue
        color = group[0].color
        boxes = "; ".join(f"[{e.index}] {format_box(e.box)}" if e.box is not None else f"[{e.index}]" for e in group)
        indices = " ".join(
            f'<sup class="nc-ref" style="color:{e.color}">[{e.index}]</sup>' for e in group
        )
        parts.append(
            f'<span class="nc-phrase" data-index="{group[0].index}" data-color="{color}" title="{html.escape(boxes)}" '
            f'style="border-bottom:3px solid {color};background:{color}33;border-radius:3px;padding:0 2px">'
            f"{html.escape(piece)}</span>{indices}"
        )
    return "".join(parts)


SINGLE_TURN_NOTE = (
    "This model was trained on single-question conversations: it answers a follow-up question less reliably than "
    "the first. For the best answers, start a new conversation before each question."
)
FOLLOW_UP_NOTE = "A follow-up question sees this conversation; for an unrelated question, start a new conversation."


def conversation_note(session: ChatSession) -> str:
    """What to tell the user under a conversation that has answers: that follow-ups see it, and, for a model trained
    on single-turn conversations (:func:`training_max_turns`), that a new conversation per question works best."""
    if not session.replies:
        return ""
    return SINGLE_TURN_NOTE if session.max_turns == 1 else FOLLOW_UP_NOTE


def conversation_html(session: ChatSession) -> str:
    """The whole conversation as HTML (for the web page)."""
    if not session.replies:
        return '<div class="nc-empty">Upload an image, then ask a question (or use an example below).</div>'
    rows = []
    for reply in session.replies:
        boxes = ""
        if reply.user_boxes:
            boxes = " ".join(f'<span class="nc-user-box">[{b.index}] {format_box(b.box)}</span>' for b in reply.user_boxes)
            boxes = f'<div class="nc-user-boxes">{boxes}</div>'
        legend = ""
        if reply.entities:
            items = []
            for e in reply.entities:
                where = format_box(e.box) if e.box is not None else "no box"
                score = f", score {e.score:.2f}" if e.score is not None else ""
                items.append(
                    f'<li><span class="nc-swatch" style="background:{e.color}"></span> [{e.index}] '
                    f"{html.escape(e.text) or '(no phrase)'}: {where}{score}</li>"
                )
            legend = f'<ul class="nc-legend">{"".join(items)}</ul>'
        rows.append(
            f'<div class="nc-turn"><div class="nc-user"><b>You:</b> {html.escape(reply.question)}{boxes}</div>'
            f'<div class="nc-assistant"><b>NExT-Chat:</b> <span class="nc-answer">{answer_html(reply)}</span>'
            f'{legend}<div class="nc-meta">{html.escape(reply.settings)}; {reply.new_tokens} tokens in '
            f"{reply.seconds:.1f} s</div></div></div>"
        )
    note_class = "nc-note nc-note-single-turn" if session.max_turns == 1 else "nc-note"
    rows.append(f'<div class="{note_class}">{html.escape(conversation_note(session))}</div>')
    return "".join(rows)


def _ansi(color: str) -> str:
    r, g, b = PIL.ImageColor.getrgb(color)[:3]
    return f"\x1b[1;38;2;{r};{g};{b}m"


def answer_terminal(reply: Reply, color: bool = False) -> str:
    """The answer for a terminal: the text (phrases in their box colour when ``color``) with ``[i]`` after each
    grounded phrase, then one line per grounded box."""
    parts = []
    for piece, group in _spans(reply.text, reply.entities):
        if group is None:
            parts.append(piece)
            continue
        refs = "[" + ",".join(str(e.index) for e in group) + "]"
        if color:
            parts.append(f"{_ansi(group[0].color)}{piece} {refs}\x1b[0m")
        else:
            parts.append(f"{piece} {refs}")
    lines = ["".join(parts)]
    for e in reply.entities:
        where = format_box(e.box) if e.box is not None else "no box"
        score = f"  score {e.score:.2f}" if e.score is not None else ""
        mask = f"  mask {int(e.mask.sum())} px" if e.mask is not None else ""
        name = f"{_ansi(e.color)}{e.color}\x1b[0m" if color else e.color
        lines.append(f"  [{e.index}] {e.text!r}: box {where}{score}{mask}  colour {name}")
    return "\n".join(lines)
