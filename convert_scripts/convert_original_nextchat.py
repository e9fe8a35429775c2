"""Convert an original NExT-Chat checkpoint into a self-contained Hugging Face folder.

The original code (`NExT-ChatV/NExT-Chat`, transformers 4.31) saves `NextChatForSegLM` /
`NextChatForCausalLM` as `pytorch_model-0000N-of-0000M.bin` shards (or a single `.bin`, or safetensors)
next to a `config.json` (a `LlamaConfig` with `mm_*` fields), a slow LLaMA tokenizer with five added
tokens, and a path to a CLIP tower. This script turns such a folder into one that loads with a single
`from_pretrained` call:

    nextchat-convert AoZhang/nextchat-7b-336 ./nextchat-7b-336-hf \\
        --vision-tower openai/clip-vit-large-patch14-336 --dtype bf16

What it does, in order (nothing is written before every check has passed):

1. *Read* the tensor inventory (names, shapes, dtypes) of every weight file without loading the tensors:
   safetensors are opened lazily, pickles with `torch.load(weights_only=True, mmap=True)`.
2. *Infer the configuration*: LLaMA sizes and vocabulary from the original `config.json` (cross-checked
   against the tensor shapes), the CLIP config from `--vision-tower` (or the checkpoint's `mm_vision_tower`
   resolved relative to the checkpoint folder), SAM sizes from the shapes of `sam.model.*` (or of
   `--sam-checkpoint`), and the five token ids from the checkpoint's tokenizer, never assumed.
3. *Map keys* (see `map_original_key`): every original tensor is used exactly once and every tensor of
   `NextChatForConditionalGeneration` is filled, with identical shapes; otherwise `ConversionError` lists
   the offending keys. The only tensors dropped on purpose are buffers the model recomputes: the rotary
   `inv_freq` of transformers 4.31 (checked against the rope settings of the config) and, in checkpoints
   written by older transformers, CLIP's `embeddings.position_ids` (checked to be 0..n-1).
4. *Write* the folder with `save_pretrained`: sharded safetensors in the chosen dtype, `config.json` with
   the token ids, `generation_config.json`, the tokenizer (`NextChatLlamaTokenizer`, shipped as remote code,
   which gives exactly the ids of the original's transformers 4.31 slow tokenizer, following the source's
   `legacy` flag, which it records; see `load_original_tokenizer`), the processor (tokenizer + image processor + chat template, with
   `original_legacy` set to that flag), the flat remote code (written by the model's `save_pretrained`), and
   a model card.

Memory: tensors stay memory-mapped from the original files (file-backed pages the kernel can drop) and
are converted one by one; the model skeleton lives on the `meta` device. The resident copy is therefore
the converted weights in the output dtype when the dtype changes, and nothing when it does not (the default:
the dtype the checkpoint stores); `safetensors` writes each shard straight from the tensors' memory. For the
published 7B-336 (15.5 GB of 16-bit shards) that is about 1 GB of process memory as stored, about 16.5 GB with
`--dtype bf16`/`fp16` from the other 16-bit type, and about 32 GB with `--dtype fp32` (too much for a 32 GB machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from ..configuration.configuration_nextchat import NEXTCHAT_SPECIAL_TOKENS


logger = logging.getLogger(__name__)

# The attribute in which the original code writes the id of each NExT-Chat token onto the CLIP config at run time
# (keyed by the config field, as `NEXTCHAT_SPECIAL_TOKENS`).
_CLIP_TOKEN_ATTRIBUTES = {
    "image_token_id": "im_patch_token",
    "image_start_token_id": "im_start_token",
    "image_end_token_id": "im_end_token",
    "trigger_token_id": "at_token",
    "box_token_id": "box_token",
}

# Attributes the original code writes onto the CLIP config at run time; they are not CLIP settings.
_CLIP_RUNTIME_ATTRIBUTES = ("use_im_start_end", *_CLIP_TOKEN_ATTRIBUTES.values())

# Keys of an original `config.json` that describe the LLaMA language model, copied into `text_config`.
_LLAMA_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "initializer_range",
    "pretraining_tp",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "head_dim",
)

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_ROTARY_INV_FREQ = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
# Buffer that CLIP checkpoints written by transformers < 4.31 store; recomputed by the model (checked, then dropped).
_CLIP_POSITION_IDS = "model.vision_tower.vision_model.embeddings.position_ids"


class ConversionError(ValueError):
    """The original checkpoint cannot be converted as it is; the message says what is wrong and where."""


def _tqdm(iterable=None, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def _format_keys(title: str, keys: Iterable[str], details: dict[str, str] | None = None) -> str:
    keys = sorted(keys)
    lines = [f"{title} ({len(keys)}):"]
    for key in keys:
        lines.append(f"  {key}" + (f"  {details[key]}" if details and key in details else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------


@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str


class CheckpointReader:
    """Lazy, memory-mapped access to the tensors of a checkpoint (a folder or a single weight file).

    Accepted layouts: `model.safetensors` / `model-0000N-of-0000M.safetensors` (+ index), `pytorch_model.bin` /
    `pytorch_model-0000N-of-0000M.bin` (+ index), or any single `.safetensors` / `.bin` / `.pth` / `.pt` file.
    When a folder holds both safetensors and pickles, safetensors win. Pickles are read with
    `torch.load(weights_only=True, mmap=True)` (falling back to a plain `weights_only=True` load, with a
    warning, for files in the pre-1.6 non-zip format, which cannot be memory-mapped).
    """

    def __init__(self, path: str | os.PathLike, progress: bool = True, description: str = "Reading checkpoint"):
        self.path = Path(path)
        self.files = self._weight_files(self.path)
        self.format = "safetensors" if self.files[0].suffix == ".safetensors" else "pickle"
        self.infos: dict[str, TensorInfo] = {}
        self._handles: dict[str, Any] = {}
        duplicates = []
        for file in _tqdm(self.files, desc=description, unit="file", disable=not progress):
            for name, info in self._inventory(file).items():
                if name in self.infos:
                    duplicates.append(f"{name} (in {self.infos[name].file} and {file.name})")
                self.infos[name] = info
        if duplicates:
            raise ConversionError(_format_keys(f"tensors stored in more than one file of {self.path}", duplicates))
        self._check_index()

    # -- discovery -----------------------------------------------------------------------------------
    @staticmethod
    def _weight_files(path: Path) -> list[Path]:
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise ConversionError(f"`original_dir`: {path} is neither a folder nor a weight file")
        for index_name, pattern in (
            ("model.safetensors.index.json", "*.safetensors"),
            ("pytorch_model.bin.index.json", "*.bin"),
        ):
            index = path / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted({path / name for name in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise ConversionError(f"{index} names shard files that are not in {path}: {missing}")
                return files
            found = sorted(path.glob(pattern))
            if pattern == "*.bin":
                found = [f for f in found if f.name.startswith("pytorch_model")] or [
                    f for f in found if f.name not in ("training_args.bin", "optimizer.bin", "scheduler.bin")
                ]
            if found:
                return found
        raise ConversionError(
            f"no weights found in {path}: expected model*.safetensors or pytorch_model*.bin "
            f"(with their index when sharded); the folder holds {sorted(p.name for p in path.iterdir())}"
        )

    def _check_index(self):
        if not self.path.is_dir():
            return
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if not index.is_file() or (self.format == "safetensors") != index_name.startswith("model."):
                continue
            weight_map = json.loads(index.read_text())["weight_map"]
            wrong = {
                k: f"index says {v}, found in {self.infos[k].file}"
                for k, v in weight_map.items()
                if k in self.infos and self.infos[k].file != v
            }
            absent = set(weight_map) - set(self.infos)
            unlisted = set(self.infos) - set(weight_map)
            problems = []
            if absent:
                problems.append(_format_keys("keys listed in the index but absent from the shards", absent))
            if unlisted:
                problems.append(_format_keys("keys in the shards but not listed in the index", unlisted))
            if wrong:
                problems.append(_format_keys("keys in another shard than the index says", wrong, wrong))
            if problems:
                raise ConversionError(f"{index} does not match its shards:\n" + "\n".join(problems))

    # -- access --------------------------------------------------------------------------------------
    def _inventory(self, file: Path) -> dict[str, TensorInfo]:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            handle = safe_open(str(file), framework="pt")
            self._handles[file.name] = handle
            infos = {}
            for name in handle.keys():
                piece = handle.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise ConversionError(f"{file}: tensor {name} has unsupported dtype {piece.get_dtype()}")
                infos[name] = TensorInfo(tuple(piece.get_shape()), dtype, file.name)
            return infos
        state_dict = self._load_pickle(file)
        if not isinstance(state_dict, dict):
            raise ConversionError(f"{file} does not hold a state dict (found {type(state_dict).__name__})")
        if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict) and len(state_dict) <= 3:
            state_dict = state_dict["state_dict"]
        not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
        if not_tensors:
            raise ConversionError(_format_keys(f"{file}: entries that are not tensors", not_tensors))
        self._handles[file.name] = state_dict
        return {k: TensorInfo(tuple(v.shape), v.dtype, file.name) for k, v in state_dict.items()}

    @staticmethod
    def _load_pickle(file: Path):
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "zip" not in str(error).lower() and "mmap" not in str(error).lower():
                raise
            warnings.warn(
                f"{file.name} is in the legacy (non-zip) pickle format and cannot be memory-mapped; "
                "it is loaded into memory in full."
            )
            return torch.load(file, map_location="cpu", weights_only=True)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, name: str) -> torch.Tensor:
        handle = self._handles[self.infos[name].file]
        if isinstance(handle, dict):
            return handle[name]
        return handle.get_tensor(name)


# ------------------------------------------------------------------------------------------------------
# Key mapping
# ------------------------------------------------------------------------------------------------------


def map_original_key(key: str) -> str | None:
    """Name in `NextChatForConditionalGeneration` of an original NExT-Chat state-dict key.

    Returns `None` for the rotary `inv_freq` buffers and CLIP's `position_ids` buffer (recomputed by the model,
    checked against the config, then dropped) and raises `KeyError` for keys
    the original model does not have.

    | original                                    | converted                                       |
    | ------------------------------------------- | ----------------------------------------------- |
    | `model.{embed_tokens,layers,norm}.*`        | `model.language_model.{embed_tokens,layers,norm}.*` |
    | `model.mm_projector.*`                      | `model.mm_projector.*`                          |
    | `model.vision_tower.vision_model.*`         | `model.vision_tower.*`                          |
    | `loc_encoder.*`                             | `model.loc_encoder.*`                           |
    | `lm_head.*`, `loc_decoder.*`, `seg_prompt_mlp.*` | unchanged                                  |
    | `sam.model.*`                               | `sam.*`                                         |
    """
    if _ROTARY_INV_FREQ.match(key) or key == _CLIP_POSITION_IDS:
        return None
    for prefix in ("model.embed_tokens.", "model.layers.", "model.norm."):
        if key.startswith(prefix):
            return "model.language_model." + key[len("model.") :]
    if key.startswith("model.mm_projector."):
        return key
    if key.startswith("model.vision_tower.vision_model."):
        return "model.vision_tower." + key[len("model.vision_tower.vision_model.") :]
    if key.startswith("loc_encoder."):
        return "model." + key
    if key.startswith(("lm_head.", "loc_decoder.", "seg_prompt_mlp.")):
        return key
    if key.startswith("sam.model."):
        return "sam." + key[len("sam.model.") :]
    raise KeyError(key)


def map_sam_checkpoint_key(key: str) -> str:
    """Official `sam_vit_h_4b8939.pth` key (`image_encoder.*`, ...) -> converted name (`sam.image_encoder.*`)."""
    if key.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")):
        return "sam." + key
    raise KeyError(key)


_CLIP_VISION_TOP_LEVEL = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def map_clip_key(key: str, flat: bool = False) -> str | None:
    """Key of a CLIP checkpoint -> converted name, `None` for tensors that are not part of the vision tower.

    transformers 4.x `CLIPVisionModel` / `CLIPModel` files name the vision weights `vision_model.*` (the text tower,
    projections and `logit_scale` of a `CLIPModel` are skipped); a `CLIPVisionModel` saved by transformers 5 has no
    `vision_model.` level (`flat=True`). The `embeddings.position_ids` buffer of old files is recomputed.
    """
    if flat:
        rest = key if key.startswith(_CLIP_VISION_TOP_LEVEL) else None
    else:
        rest = key[len("vision_model.") :] if key.startswith("vision_model.") else None
    if rest is None or rest == "embeddings.position_ids":
        return None
    return "model.vision_tower." + rest


# ------------------------------------------------------------------------------------------------------
# Configuration inference
# ------------------------------------------------------------------------------------------------------


def _layer_count(keys: Iterable[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if not indices:
        return 0
    if indices != set(range(max(indices) + 1)):
        raise ConversionError(f"layers under `{prefix}` are not numbered 0..n-1: {sorted(indices)}")
    return max(indices) + 1


def infer_sam_config(shapes: dict[str, tuple[int, ...]], prefix: str = "sam.") -> dict[str, Any]:
    """SAM sizes (segment-anything builder names) from the shapes of a SAM state dict.

    `shapes` maps keys `<prefix>image_encoder.*`, `<prefix>prompt_encoder.*` ... to shapes. Embed dim and
    grid come from `pos_embed` (1, g, g, E), the patch size from the patch-embedding kernel, the depth from
    the block count, the head count from the head dim of `rel_pos_h` (E / head_dim), the global-attention
    blocks from the `rel_pos_h` length (2g - 1 for global blocks, 2w - 1 for windowed ones, giving the
    window w), and the prompt width from `no_mask_embed`.
    """
    enc = prefix + "image_encoder."
    required = [enc + "pos_embed", enc + "patch_embed.proj.weight", prefix + "prompt_encoder.no_mask_embed.weight"]
    missing = [k for k in required if k not in shapes]
    if missing:
        raise ConversionError(_format_keys("cannot infer the SAM sizes, these tensors are missing", missing))
    pos = shapes[enc + "pos_embed"]
    if len(pos) != 4 or pos[1] != pos[2]:
        raise ConversionError(f"`{enc}pos_embed` should have shape (1, g, g, embed_dim), got {pos}")
    grid, embed_dim = pos[1], pos[3]
    kernel = shapes[enc + "patch_embed.proj.weight"]
    if len(kernel) != 4 or kernel[2] != kernel[3] or kernel[0] != embed_dim:
        raise ConversionError(f"`{enc}patch_embed.proj.weight` has unexpected shape {kernel}")
    patch = kernel[2]
    depth = _layer_count(shapes, enc + "blocks.")
    if depth == 0:
        raise ConversionError(f"no `{enc}blocks.*` tensors found")
    head_dims, global_blocks, windows = set(), [], set()
    for i in range(depth):
        key = f"{enc}blocks.{i}.attn.rel_pos_h"
        if key not in shapes:
            raise ConversionError(f"`{key}` is missing: only SAM image encoders with relative positions are supported")
        length, head_dim = shapes[key]
        head_dims.add(head_dim)
        if length == 2 * grid - 1:
            global_blocks.append(i)
        elif length % 2 == 1:
            windows.add((length + 1) // 2)
        else:
            raise ConversionError(f"`{key}` has length {length}, which matches neither global (2*{grid}-1) nor a window")
    if len(head_dims) != 1 or len(windows) > 1:
        raise ConversionError(
            f"inconsistent SAM attention shapes: head dims {sorted(head_dims)}, windows {sorted(windows)}"
        )
    head_dim = head_dims.pop()
    if embed_dim % head_dim:
        raise ConversionError(f"SAM embed dim {embed_dim} is not a multiple of the rel-pos head dim {head_dim}")
    window = windows.pop() if windows else 14  # all blocks global: the window size is unused
    return {
        "image_size": grid * patch,
        "patch_size": patch,
        "encoder_embed_dim": embed_dim,
        "encoder_depth": depth,
        "encoder_num_heads": embed_dim // head_dim,
        "encoder_global_attn_indexes": global_blocks,
        "window_size": window,
        "prompt_embed_dim": shapes[prefix + "prompt_encoder.no_mask_embed.weight"][-1],
    }


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} not found") from None


def _hub_download(repo_id: str, argument: str, allow_patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as error:
        raise ConversionError(
            f"`{argument}`: {repo_id!r} is not a local folder and could not be fetched from the Hub "
            f"({type(error).__name__}: {error})"
        ) from error


def _is_hub_id(name: str) -> bool:
    return not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def resolve_vision_tower(vision_tower: str | None, original_dir: Path, original_config: dict) -> Path:
    """Local folder holding the CLIP config (weights are fetched later, only when the checkpoint lacks them).

    `vision_tower` may be a folder, or a Hub id (its config fetched with `huggingface_hub.snapshot_download`). When
    it is `None`, the checkpoint's `mm_vision_tower` is used, relative to the checkpoint folder when relative.
    """
    if vision_tower is None:
        name = original_config.get("mm_vision_tower")
        if not name:
            raise ConversionError("`vision_tower`: the original config has no `mm_vision_tower`; pass --vision-tower")
        candidate = Path(name) if os.path.isabs(name) else original_dir / name
        if (candidate / "config.json").is_file():
            return candidate
        hint = Path(name).name
        raise ConversionError(
            f"`vision_tower`: the checkpoint's mm_vision_tower {name!r} is not a folder with a config.json here "
            f"({candidate}); pass --vision-tower with a local CLIP folder or a Hub id (for the published model: "
            f"--vision-tower openai/{hint if hint.startswith('clip-') else 'clip-vit-large-patch14-336'})"
        )
    if os.path.isdir(vision_tower):
        if not (Path(vision_tower) / "config.json").is_file():
            raise ConversionError(f"`vision_tower`: {vision_tower} has no config.json")
        return Path(vision_tower)
    if not _is_hub_id(vision_tower):
        raise ConversionError(f"`vision_tower`: {vision_tower!r} is neither a folder nor a Hub repository id")
    return _hub_download(vision_tower, "vision_tower", ["config.json", "preprocessor_config.json"])


def _clip_weights_reader(vision_tower: str | None, tower_dir: Path, progress: bool) -> CheckpointReader:
    """Reader over the CLIP weights of the vision tower (for checkpoints saved without `model.vision_tower.*`)."""
    if vision_tower is not None and not os.path.isdir(vision_tower):
        tower_dir = _hub_download(vision_tower, "vision_tower", ["*.json", "*.safetensors"])
        if not list(tower_dir.glob("*.safetensors")):
            tower_dir = _hub_download(vision_tower, "vision_tower", ["*.json", "pytorch_model*.bin"])
    return CheckpointReader(tower_dir, progress=progress, description="Reading CLIP weights")


def build_vision_config(tower_dir: Path):
    """`CLIPVisionConfig` of a CLIP folder (a `CLIPVisionModel` config, or a full `CLIPModel` config whose
    `vision_config` is used, with the legacy `vision_config_dict` overrides of transformers 4 configs applied).

    Only `CLIPVisionConfig` fields are kept: the token ids the original code wrote onto the tower config at run time
    (`at_token`, `box_token`, ...) and generic legacy keys are dropped."""
    from transformers import CLIPVisionConfig

    raw = _read_json(tower_dir / "config.json")
    if raw.get("model_type") == "clip":
        raw = {**(raw.get("vision_config") or {}), **(raw.get("vision_config_dict") or {})}
    elif raw.get("model_type") not in (None, "clip_vision_model"):
        raise ConversionError(
            f"`vision_tower`: {tower_dir / 'config.json'} has model_type {raw.get('model_type')!r}, "
            "expected 'clip' or 'clip_vision_model'"
        )
    known = set(CLIPVisionConfig().to_dict()) - {
        "_name_or_path", "architectures", "transformers_version", "model_type", "torch_dtype", "dtype",
    }
    return CLIPVisionConfig(**{k: v for k, v in raw.items() if k in known})


def build_text_config(original_config: dict):
    from transformers import LlamaConfig

    kwargs = {k: original_config[k] for k in _LLAMA_CONFIG_KEYS if k in original_config}
    rope = {"rope_theta": float(original_config.get("rope_theta", 10000.0))}
    if original_config.get("rope_scaling"):
        scaling = dict(original_config["rope_scaling"])
        scaling.setdefault("rope_type", scaling.pop("type", "default"))
        rope.update(scaling)
    else:
        rope["rope_type"] = "default"
    kwargs["rope_parameters"] = rope
    kwargs["tie_word_embeddings"] = bool(original_config.get("tie_word_embeddings", False))
    kwargs["use_cache"] = True  # the original sets False for training; generation wants the cache
    return LlamaConfig(**kwargs)


def _json_or_empty(path: Path) -> dict:
    return _read_json(path) if path.is_file() else {}


def read_original_tokenizer_settings(original_dir: Path) -> dict:
    """How transformers 4.31's slow `LlamaTokenizer` (the original's pin) tokenised with this folder's files.

    Returns `legacy` (`tokenizer_config.json`'s flag; absent or null means True, 4.31's default), `add_bos_token`,
    `add_eos_token`, `model_max_length`, `special` (role -> token content: bos, eos, unk, pad) and `strip`
    (content -> `(lstrip, rstrip)` for every token 4.31 never split: the special tokens and `added_tokens.json`).
    4.31 stripped the whitespace on both sides of a token that is a plain string (every token of
    `added_tokens.json`, which `from_pretrained` re-adds as strings, and a special token that
    `special_tokens_map.json` gives as a string) and followed the flags of one that is an `AddedToken` (a dict in
    `special_tokens_map.json` or `tokenizer_config.json`; `LlamaTokenizer.__init__` wraps a string bos/eos/unk/pad
    of `tokenizer_config.json` into `AddedToken(lstrip=False, rstrip=False)`)."""
    config = _json_or_empty(original_dir / "tokenizer_config.json")
    special_map = _json_or_empty(original_dir / "special_tokens_map.json")
    added = _json_or_empty(original_dir / "added_tokens.json")
    legacy = config.get("legacy")
    if legacy is None:
        legacy = True
    if not isinstance(legacy, bool):
        raise ConversionError(f"tokenizer_config.json in {original_dir}: `legacy` must be true, false or absent, got {legacy!r}")
    defaults = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}
    special, flags = {}, {}
    for role, default in defaults.items():
        value = config.get(role, default)
        if isinstance(value, str):
            value = {"content": value, "lstrip": False, "rstrip": False}  # wrapped by LlamaTokenizer.__init__
        if role in special_map:
            value = special_map[role]  # set on the tokenizer after __init__, as it is (a string stays a string)
        if value is None:
            continue
        content = value["content"] if isinstance(value, dict) else value
        special[role] = content
        if isinstance(value, dict):
            flags[content] = (bool(value.get("lstrip", False)), bool(value.get("rstrip", False)))
    for value in special_map.get("additional_special_tokens") or []:
        if isinstance(value, dict):
            flags[value["content"]] = (bool(value.get("lstrip", False)), bool(value.get("rstrip", False)))
    strip = {content: flags.get(content, (True, True)) for content in list(special.values()) + list(added)}
    return {
        "legacy": legacy,
        "add_bos_token": bool(config.get("add_bos_token", True)),
        "add_eos_token": bool(config.get("add_eos_token", False)),
        "model_max_length": config.get("model_max_length"),
        "special": special,
        "strip": strip,
        "added_tokens": {str(t): int(i) for t, i in added.items()},
    }


def _check_sentencepiece_model(original_dir: Path):
    """The SentencePiece settings the converted pipeline reproduces: BPE, identity normalisation, dummy prefix on,
    extra whitespace kept, whitespace as prefix. Returns the model proto."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:
        raise ConversionError("reading tokenizer.model needs the `sentencepiece` package: pip install sentencepiece") from error
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((original_dir / "tokenizer.model").read_bytes())
    normalizer, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        problems.append("model_type is not BPE")
    if normalizer.name not in ("identity", "") or normalizer.precompiled_charsmap:
        problems.append(f"normalization {normalizer.name!r} is not identity")
    if not normalizer.add_dummy_prefix:
        problems.append("add_dummy_prefix is off")
    if normalizer.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is on")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix is on")
    if problems:
        raise ConversionError(
            f"{original_dir / 'tokenizer.model'} is not a LLaMA-style SentencePiece model ({'; '.join(problems)}); "
            "the converted tokenizer could not reproduce its ids"
        )
    return proto


def load_original_tokenizer(original_dir: Path):
    r"""The checkpoint's tokenizer as a `NextChatLlamaTokenizer` whose plain `tokenizer(text)` gives the ids
    transformers 4.31's slow `LlamaTokenizer` gave (the version the original code pins),
    under either `legacy` flag. Returns `(tokenizer, token_ids)`; the source's `legacy` flag is
    `tokenizer.init_kwargs["legacy"]` (saved to `tokenizer_config.json`) and, through `build_processor`, the
    processor's `original_legacy`.

    `NextChatLlamaTokenizer` (`processing/tokenization_nextchat.py`, saved next to the tokenizer with an `auto_map`,
    so `AutoTokenizer` needs `trust_remote_code=True` where `nextchat` is not imported) is a Python tokenizer: it
    splits and strips as 4.31 did (Python's `str.strip`, a typed `▁` read as a space first under `legacy=False`)
    and encodes every stretch of text with the BPE model of `tokenizer.json` as SentencePiece does, cutting the `▁`
    off the first piece where 4.31 cut it. `tokenizer.json` also holds a complete `tokenizers` pipeline, for
    tools that read it without this class; that pipeline gives the same ids except where noted below.

    What 4.31 did, and how the `tokenizers` pipeline in `tokenizer.json` approximates it:

    * The text is split on the added tokens and `<s>`, `</s>`, `<unk>`; whitespace next to a token is stripped as
      4.31 stripped it (`read_original_tokenizer_settings`): added tokens get `lstrip=rstrip=True`, special tokens
      their own flags (normally none). The tokens are matched on the raw text (`normalized=False`), so every
      stretch of text between them is normalised and encoded on its own.
    * `legacy=True`: every stretch is encoded by SentencePiece with its dummy prefix: normalizer
      `Prepend("▁")` + `Replace(" ", "▁")`, no pre-tokenizer (`Metaspace` would not add the `▁` to a stretch that
      starts with a space, SentencePiece does).
    * `legacy=False`: `▁` in the text is read as a space; only the stretch at the very start gets the prefix:
      `Metaspace(prepend_scheme="first")`, and a stretch that starts with a space gets one more `▁` (SentencePiece
      encodes it with its prefix) through `Replace(Regex("\A "), "▁ ")`. 4.31 encoded the other stretches with
      the prefix and cut the `▁` off the first piece; a `tokenizers` pipeline encodes them without the prefix,
      which differs where the `▁` took part in a merge (`the` after `<boxes>`: 4.31 cut `▁the` to `the`, `<unk>`
      when that is no piece). `NextChatLlamaTokenizer` and `NextChatProcessor` reproduce that exactly.
    * The BPE model keeps SentencePiece's unknown handling: `byte_fallback` as the model has it (transformers 5
      forces it on, which silently drops unknown characters when the model has no byte pieces), `<unk>` for a run
      of unknown characters (`fuse_unk`).

    Other differences of the bare `tokenizers` pipeline: it strips Unicode whitespace next to a token but not the
    ASCII separators U+001C..U+001F that Python's `str.strip` also removed; with `legacy=False` a typed `▁` right
    next to a token is not stripped (4.31 turned it into a space first). `NextChatLlamaTokenizer` and the processor
    have none of these differences (tests/test_tokenizer_fidelity.py).
    """
    from tokenizers import Tokenizer
    from transformers import AddedToken, LlamaTokenizer

    from nextchat.processing.tokenization_nextchat import NextChatLlamaTokenizer

    if not (original_dir / "tokenizer.model").is_file():
        raise ConversionError(f"{original_dir} has no tokenizer.model (the original slow LLaMA tokenizer)")
    proto = _check_sentencepiece_model(original_dir)
    settings = read_original_tokenizer_settings(original_dir)
    legacy = settings["legacy"]
    stated = _json_or_empty(original_dir / "tokenizer_config.json").get("legacy") is not None
    logger.info(
        "tokenizer: legacy=%s (%s)", legacy, "tokenizer_config.json" if stated else "not set: transformers 4.31's default"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaTokenizer.from_pretrained(str(original_dir), legacy=legacy)  # BPE vocab and merges of the model
    data = json.loads(base.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    pieces = {p.piece: i for i, p in enumerate(proto.pieces)}
    if any(vocab.get(piece) != i for piece, i in pieces.items()):
        raise ConversionError(f"the BPE vocabulary built from {original_dir / 'tokenizer.model'} does not keep its piece ids")
    unk_piece = proto.pieces[proto.trainer_spec.unk_id].piece
    data["model"].update(byte_fallback=bool(proto.trainer_spec.byte_fallback), unk_token=unk_piece, fuse_unk=True)

    ids = {}
    for token in NEXTCHAT_SPECIAL_TOKENS.values():
        token_id = settings["added_tokens"].get(token)
        if token_id is None:
            raise ConversionError(
                f"the checkpoint's tokenizer in {original_dir} does not know {token!r}; "
                f"NExT-Chat checkpoints add {list(NEXTCHAT_SPECIAL_TOKENS.values())} (added_tokens.json)"
            )
        ids[token] = token_id
    added = []
    special_tokens = {}
    for role, content in settings["special"].items():
        if content in settings["added_tokens"] or content in special_tokens:
            continue
        if content not in pieces:
            raise ConversionError(f"the special token {role}={content!r} is not a piece of {original_dir / 'tokenizer.model'}")
        lstrip, rstrip = settings["strip"][content]
        special_tokens[content] = AddedToken(content, lstrip=lstrip, rstrip=rstrip, normalized=False, special=True)
        added.append({"id": pieces[content], "content": content, "single_word": False, "lstrip": lstrip,
                      "rstrip": rstrip, "normalized": False, "special": True})
    for content, token_id in sorted(settings["added_tokens"].items(), key=lambda item: item[1]):
        lstrip, rstrip = settings["strip"][content]
        added.append({"id": token_id, "content": content, "single_word": False, "lstrip": lstrip, "rstrip": rstrip,
                      "normalized": False, "special": False})
    data["added_tokens"] = sorted(added, key=lambda item: item["id"])
    if legacy:
        data["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ]}
        data["pre_tokenizer"] = None
    else:
        data["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "Replace", "pattern": {"Regex": "\\A "}, "content": "▁ "},
        ]}
        data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}

    special = settings["special"]
    kwargs = {role: special_tokens.get(special[role], special[role]) for role in ("bos_token", "eos_token", "unk_token") if role in special}
    kwargs["pad_token"] = special.get("pad_token") or special.get("unk_token")  # the original pads with <unk> (id 0)
    if isinstance(settings["model_max_length"], int):
        kwargs["model_max_length"] = settings["model_max_length"]
    tokenizer = NextChatLlamaTokenizer(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        add_bos_token=settings["add_bos_token"],
        add_eos_token=settings["add_eos_token"],
        legacy=legacy,
        padding_side="left",  # batched generation pads on the left; training collators may override
        **kwargs,
    )
    moved = {t: tokenizer.convert_tokens_to_ids(t) for t in ids if tokenizer.convert_tokens_to_ids(t) != ids[t]}
    if moved:
        raise ConversionError(f"the converted tokenizer moved the added tokens: {moved} (expected {ids})")
    return tokenizer, ids


# ------------------------------------------------------------------------------------------------------
# Conversion plan
# ------------------------------------------------------------------------------------------------------


@dataclass
class ConversionPlan:
    """Where each tensor of the converted model comes from: `sources[target] = (reader, source_key)`."""

    config: Any
    sources: dict[str, tuple[CheckpointReader, str]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _check_text_shapes(text_config, infos: dict[str, TensorInfo]):
    h = text_config.hidden_size
    n_layers = _layer_count(infos, "model.layers.")
    problems = []
    if n_layers != text_config.num_hidden_layers:
        problems.append(f"config num_hidden_layers={text_config.num_hidden_layers} but the checkpoint has {n_layers} layers")
    embed = infos.get("model.embed_tokens.weight")
    if embed is None:
        problems.append("model.embed_tokens.weight is missing")
    elif embed.shape != (text_config.vocab_size, h):
        problems.append(f"model.embed_tokens.weight is {list(embed.shape)}, config says vocab_size={text_config.vocab_size}, hidden_size={h}")
    k_proj = infos.get("model.layers.0.self_attn.k_proj.weight")
    head_dim = getattr(text_config, "head_dim", None) or h // text_config.num_attention_heads
    if k_proj is not None and k_proj.shape[0] != text_config.num_key_value_heads * head_dim:
        problems.append(
            f"k_proj has {k_proj.shape[0]} rows, config says {text_config.num_key_value_heads} kv heads x {head_dim}"
        )
    gate = infos.get("model.layers.0.mlp.gate_proj.weight")
    if gate is not None and gate.shape[0] != text_config.intermediate_size:
        problems.append(f"gate_proj has {gate.shape[0]} rows, config says intermediate_size={text_config.intermediate_size}")
    if problems:
        raise ConversionError("the original config.json does not match its weights:\n  " + "\n  ".join(problems))


def _check_rotary(reader: CheckpointReader, text_config) -> list[str]:
    """The 4.31 `inv_freq` buffers are dropped; they must agree with the rope settings of `text_config`."""
    dropped = [k for k in reader.keys() if _ROTARY_INV_FREQ.match(k)]
    if not dropped:
        return dropped
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    theta = text_config.rope_parameters.get("rope_theta", 10000.0)
    expected = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    rope_type = text_config.rope_parameters.get("rope_type", "default")
    for key in dropped:
        stored = reader.get(key).float()
        if rope_type == "default" and (stored.shape != expected.shape or not torch.allclose(stored, expected, rtol=1e-3)):
            raise ConversionError(
                f"{key} does not match rope_theta={theta} and head_dim={head_dim} from config.json; "
                "the converted model would use different rotary frequencies"
            )
    return dropped


def plan_conversion(
    original_dir: str | os.PathLike,
    vision_tower: str | None = None,
    sam_checkpoint: str | None = None,
    progress: bool = True,
) -> tuple[ConversionPlan, Any, dict]:
    """Read the checkpoint, infer `NextChatConfig` and map every tensor, without writing anything.

    Returns `(plan, tokenizer, info)`; raises `ConversionError` when anything does not add up.
    """
    from nextchat.configuration import NextChatConfig

    original_dir = Path(original_dir)
    original_config = _read_json(original_dir / "config.json")
    reader = CheckpointReader(original_dir, progress=progress)
    infos = reader.infos

    unknown = []
    for key in reader.keys():
        try:
            map_original_key(key)
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ConversionError(_format_keys("unexpected keys in the original checkpoint (not part of NExT-Chat)", unknown))

    # ---- language model
    text_config = build_text_config(original_config)
    _check_text_shapes(text_config, infos)
    dropped = _check_rotary(reader, text_config)

    # ---- tokens
    tokenizer, token_ids = load_original_tokenizer(original_dir)
    too_big = {t: i for t, i in token_ids.items() if i >= text_config.vocab_size}
    if too_big:
        raise ConversionError(f"token ids {too_big} are outside the checkpoint's vocab_size={text_config.vocab_size}")

    # ---- vision tower
    if not original_config.get("mm_use_im_start_end", True):
        raise ConversionError("`mm_use_im_start_end` is False in the original config; only the <im_start>/<im_end> layout is supported")
    tower_dir = resolve_vision_tower(vision_tower, original_dir, original_config)
    vision_config = build_vision_config(tower_dir)
    tower_raw = _read_json(tower_dir / "config.json")
    for config_field, field_name in _CLIP_TOKEN_ATTRIBUTES.items():
        token = NEXTCHAT_SPECIAL_TOKENS[config_field]
        if field_name in tower_raw and tower_raw[field_name] != token_ids[token]:
            raise ConversionError(
                f"the vision tower config says {field_name}={tower_raw[field_name]} but the tokenizer gives {token}={token_ids[token]}"
            )
    if _CLIP_POSITION_IDS in reader:
        num_positions = (vision_config.image_size // vision_config.patch_size) ** 2 + 1
        if not torch.equal(reader.get(_CLIP_POSITION_IDS).flatten().long(), torch.arange(num_positions)):
            raise ConversionError(f"{_CLIP_POSITION_IDS} is not 0..{num_positions - 1}; it cannot be dropped safely")
        dropped.append(_CLIP_POSITION_IDS)
    clip_in_checkpoint = any(k.startswith("model.vision_tower.") for k in reader.keys())
    clip_reader = None
    if not clip_in_checkpoint:
        try:
            clip_reader = _clip_weights_reader(vision_tower, tower_dir, progress)
        except ConversionError as error:
            raise ConversionError(
                f"the checkpoint has no model.vision_tower.* weights and none could be read from the vision tower "
                f"{tower_dir}: {error}"
            ) from None

    # ---- projector
    mm_hidden = original_config.get("mm_hidden_size", vision_config.hidden_size)
    if mm_hidden != vision_config.hidden_size:
        raise ConversionError(f"original mm_hidden_size={mm_hidden} but the CLIP hidden size is {vision_config.hidden_size}")
    projector_linears = sorted(
        {int(m.group(1)) for k in reader.keys() if (m := re.match(r"model\.mm_projector\.(\d+)\.weight$", k))}
    )
    if not projector_linears:
        raise ConversionError("the checkpoint has no model.mm_projector.* weights (use_mm_proj)")
    projector_depth = len(projector_linears)
    if "mm_depth" in original_config and original_config["mm_depth"] != projector_depth:
        raise ConversionError(f"mm_depth={original_config['mm_depth']} but the checkpoint has {projector_depth} projector layers")

    # ---- SAM
    sam_shapes = {map_original_key(k): v.shape for k, v in infos.items() if k.startswith("sam.model.")}
    sam_reader = None
    has_seg_mlp = any(k.startswith("seg_prompt_mlp.") for k in reader.keys())
    notes = []
    if sam_shapes:
        if sam_checkpoint is not None:
            raise ConversionError(
                "`sam_checkpoint`: the checkpoint already contains SAM weights (sam.model.*); "
                "drop --sam-checkpoint (it would be ignored)"
            )
        sam_config = infer_sam_config(sam_shapes)
    elif sam_checkpoint is not None:
        sam_reader = CheckpointReader(sam_checkpoint, progress=progress, description="Reading SAM checkpoint")
        bad = []
        for k in sam_reader.keys():
            try:
                map_sam_checkpoint_key(k)
            except KeyError:
                bad.append(k)
        if bad:
            raise ConversionError(
                _format_keys(f"`sam_checkpoint` {sam_checkpoint}: keys that are not official SAM keys", bad)
            )
        sam_config = infer_sam_config({map_sam_checkpoint_key(k): v.shape for k, v in sam_reader.infos.items()})
        notes.append(f"SAM weights taken from {sam_checkpoint}")
    elif has_seg_mlp:
        raise ConversionError(
            "the checkpoint has seg_prompt_mlp.* but no SAM weights (sam.model.*): it needs SAM, pass "
            "--sam-checkpoint /path/to/sam_vit_h_4b8939.pth"
        )
    else:
        sam_config = None
        warnings.warn(
            "the checkpoint has no SAM weights (sam.model.*) and no seg_prompt_mlp: converting a box-only model "
            "(sam_config=None, no masks). Pass --sam-checkpoint sam_vit_h_4b8939.pth to add SAM."
        )
        notes.append("box-only model: no SAM weights in the checkpoint")

    num_seg_prompt_tokens = 4
    if sam_config is not None and "seg_prompt_mlp.2.weight" in infos:
        out = infos["seg_prompt_mlp.2.weight"].shape[0]
        if out % sam_config["prompt_embed_dim"]:
            raise ConversionError(
                f"seg_prompt_mlp.2.weight has {out} outputs, not a multiple of SAM's prompt width {sam_config['prompt_embed_dim']}"
            )
        num_seg_prompt_tokens = out // sam_config["prompt_embed_dim"]

    config = NextChatConfig(
        text_config=text_config,
        vision_config=vision_config,
        sam_config=sam_config,
        vision_feature_layer=original_config.get("mm_vision_select_layer", -1),
        projector_depth=projector_depth,
        num_seg_prompt_tokens=num_seg_prompt_tokens,
        **{config_field: token_ids[token] for config_field, token in NEXTCHAT_SPECIAL_TOKENS.items()},
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
    )

    plan = ConversionPlan(config=config, dropped=dropped, notes=notes)
    for key in reader.keys():
        target = map_original_key(key)
        if target is not None:
            plan.sources[target] = (reader, key)
    if clip_reader is not None:
        flat = not any(k.startswith("vision_model.") for k in clip_reader.keys())
        for key in clip_reader.keys():
            target = map_clip_key(key, flat=flat)
            if target is not None:
                plan.sources[target] = (clip_reader, key)
        notes.append(f"CLIP weights taken from {tower_dir}")
    if sam_reader is not None:
        for key in sam_reader.keys():
            plan.sources[map_sam_checkpoint_key(key)] = (sam_reader, key)
    info = {"tower_dir": tower_dir, "token_ids": token_ids, "original_config": original_config, "reader": reader}
    return plan, tokenizer, info


def check_plan_against_model(plan: ConversionPlan, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]):
    """Every model tensor filled, every source used once, every shape equal; else `ConversionError`."""
    missing = sorted(set(expected) - set(plan.sources))
    unexpected = sorted(set(plan.sources) - set(expected))
    mismatched = {}
    for target in sorted(set(expected) & set(plan.sources)):
        reader, key = plan.sources[target]
        shape = reader.infos[key].shape
        if tuple(shape) != tuple(expected[target][0]):
            mismatched[key] = f"-> {target}: checkpoint {list(shape)}, model {list(expected[target][0])}"
    problems = []
    if missing:
        problems.append(_format_keys("model tensors that the checkpoint does not provide (missing keys)", missing))
    if unexpected:
        details = {t: f"(from {plan.sources[t][1]})" for t in unexpected}
        problems.append(_format_keys("checkpoint tensors that the model has no place for (unexpected keys)", unexpected, details))
    if mismatched:
        problems.append(_format_keys("tensors whose shapes differ (mis-shaped keys)", mismatched, mismatched))
    if problems:
        raise ConversionError("the checkpoint does not match the inferred model:\n" + "\n".join(problems))


# ------------------------------------------------------------------------------------------------------
# Outputs besides the weights
# ------------------------------------------------------------------------------------------------------


def default_generation_settings(config) -> dict:
    """Greedy decoding, the setting of the original evaluation (RES, region captions, POPE: `num_beams=1`).

    The original demo decoded with 5 beams (`generate`'s own default there, `do_sample` unset), which is slower and
    is not what the published numbers used; pass `num_beams=5` to `generate` to get it. `max_new_tokens=1024` is the
    demo's cap. The pad token is `<unk>` (id 0), as in the original builder; `use_cache=True` because box feedback
    during generation relies on the cache.
    """
    text = config.text_config
    return {
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "pad_token_id": text.pad_token_id if text.pad_token_id is not None else 0,
        "do_sample": False,
        "num_beams": 1,
        "max_new_tokens": 1024,
        "use_cache": True,
    }


def _original_license(original_dir: Path) -> str | None:
    readme = original_dir / "README.md"
    if not readme.is_file():
        return None
    match = re.search(r"^---\s*$(.*?)^---\s*$", readme.read_text(errors="replace"), flags=re.S | re.M)
    if match:
        found = re.search(r"^license:\s*(\S+)", match.group(1), flags=re.M)
        if found:
            return found.group(1).strip("'\"")
    return None


def _tokenization_note(legacy: bool | None) -> str:
    if legacy is None:
        return ""
    return (
        f"Tokenisation: the original tokenizer (transformers 4.31, slow) has `legacy: {str(legacy).lower()}`; the "
        f"tokenizer here (`NextChatLlamaTokenizer`, remote code: `AutoTokenizer.from_pretrained(repo, "
        f"trust_remote_code=True)`) and the processor (`original_legacy={legacy}`) give exactly its ids.\n"
    )


def write_model_card(
    output_dir: Path,
    config,
    token_ids: dict,
    license: str,
    base_model: list[str],
    source: str,
    repo_id: str | None,
    dtype: torch.dtype,
    tokenizer_legacy: bool | None = None,
):
    sam = config.sam_config
    text = config.text_config
    name = repo_id or output_dir.name
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", f"license: {license}"]
    if base_model:
        front.append("base_model:")
        front += [f"- {b}" for b in base_model]
    front += ["tags:", "- nextchat", "- pix2emb", "- grounding", "- referring-expression-segmentation", "---", ""]
    sizes = (
        f"LLaMA {text.num_hidden_layers} layers x {text.hidden_size} (vocab {text.vocab_size}), "
        f"CLIP {config.vision_config.num_hidden_layers} layers x {config.vision_config.hidden_size} at "
        f"{config.vision_config.image_size} px, "
        + (
            f"SAM image encoder {sam['encoder_depth']} blocks x {sam['encoder_embed_dim']} at {sam['image_size']} px"
            if sam
            else "no SAM (box-only)"
        )
    )
    body = f"""# {name}

NExT-Chat (pix2emb): a LLaVA-style chat model that also outputs boxes and, through SAM, masks.
Converted from the original checkpoint `{source}` with `nextchat-convert`; weights stored as `{str(dtype).split('.')[-1]}` safetensors.

Sizes: {sizes}.
Special tokens (ids taken from the original tokenizer): {", ".join(f"`{t}`={i}" for t, i in token_ids.items())}.
{_tokenization_note(tokenizer_legacy)}
Every box is written as the pair `<at> <boxes>` after the phrase it grounds: the hidden state at `<at>` is decoded into a
normalised xyxy box (in the frame of the image padded to a centred white square), and the `<boxes>` position receives an
embedding of that box.

## Usage

```python
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

repo = "{name}"
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, dtype=torch.bfloat16)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

image = Image.open("cat.jpg")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Where is the cat in the image?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
out = model.generate(**inputs, return_dict_in_generate=True, max_new_tokens=64)
print(processor.post_process_generation(out, inputs["image_sizes"]))
```

With the `nextchat` package installed, `from nextchat import NextChatForConditionalGeneration, NextChatProcessor` works
without `trust_remote_code`.

Generation defaults (`generation_config.json`): greedy decoding, as in the original evaluation; the original demo used
5-beam search (`num_beams=5`).

## License and provenance

The weights derive from Vicuna-7B v1.5 (Llama 2 Community License), CLIP ViT-L/14-336 (MIT) and SAM ViT-H (Apache-2.0),
fine-tuned by the NExT-Chat authors (https://github.com/NExT-ChatV/NExT-Chat). Paper: *NExT-Chat: An LMM for Chat,
Detection and Segmentation* (Zhang et al., 2023).
"""
    (output_dir / "README.md").write_text("\n".join(front) + body)


def build_processor(tokenizer, tower_dir: Path, config, original_legacy: bool | None = None):
    """`NextChatProcessor` of the converted model: the converted tokenizer and a `NextChatImageProcessor` whose CLIP
    settings come from the vision tower's `preprocessor_config.json` (the image processor the original loaded) and
    whose SAM size comes from `config.sam_config` (`None`: box-only). `original_legacy` (default: the converted
    tokenizer's `legacy`, i.e. the source's flag) makes the processor tokenise as the original's 4.31 tokenizer."""
    from nextchat.processing import NextChatImageProcessor, NextChatProcessor

    raw = {}
    if (tower_dir / "preprocessor_config.json").is_file():
        raw = _read_json(tower_dir / "preprocessor_config.json")
    size = config.vision_config.image_size
    kwargs = {
        k: raw[k]
        for k in ("do_resize", "resample", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
        if k in raw
    }
    shortest = raw.get("size", {}).get("shortest_edge", size) if isinstance(raw.get("size"), dict) else size
    if shortest != size:
        raise ConversionError(
            f"the vision tower's preprocessor_config.json resizes to {shortest} px but the CLIP config says {size} px"
        )
    image_processor = NextChatImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        sam_image_size=config.sam_config["image_size"] if config.sam_config is not None else None,
        **kwargs,
    )
    if original_legacy is None:
        original_legacy = tokenizer.init_kwargs.get("legacy")
    return NextChatProcessor(
        image_processor, tokenizer, image_seq_length=config.image_seq_length, original_legacy=original_legacy
    )


def _save_processor_or_tokenizer(output_dir: Path, tokenizer, tower_dir: Path, config) -> str:
    """Save the processor (tokenizer + image processor + chat template); without `nextchat.processing`, the
    tokenizer and the tower's CLIP image-processor config only (with a warning)."""
    try:
        processor = build_processor(tokenizer, tower_dir, config)
    except ImportError as error:
        warnings.warn(f"nextchat.processing is not available ({error}); writing the tokenizer and CLIP preprocessor only")
    else:
        processor.save_pretrained(str(output_dir))
        return "processor"
    tokenizer.save_pretrained(str(output_dir))
    preprocessor = tower_dir / "preprocessor_config.json"
    if preprocessor.is_file():
        (output_dir / "preprocessor_config.json").write_text(preprocessor.read_text())
    return "tokenizer"


# ------------------------------------------------------------------------------------------------------
# Main entry points
# ------------------------------------------------------------------------------------------------------


def _resolve_original(original_dir: str) -> tuple[Path, str | None]:
    if os.path.isdir(original_dir):
        return Path(original_dir), None
    if not _is_hub_id(original_dir) or "/" not in original_dir:
        raise ConversionError(f"`original_dir`: {original_dir!r} is neither a folder nor a Hub repository id")
    # weights in one format only: safetensors when the repository has them, else the pickles
    path = _hub_download(original_dir, "original_dir", ["*.json", "*.model", "*.safetensors", "README.md"])
    if not list(path.glob("*.safetensors")):
        path = _hub_download(original_dir, "original_dir", ["*.json", "*.model", "pytorch_model*.bin", "README.md"])
    return path, original_dir


def convert_original_checkpoint(
    original_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    vision_tower: str | None = None,
    sam_checkpoint: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    push_to_hub: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    license: str | None = None,
    base_model: list[str] | None = None,
    progress: bool = True,
    hub_api=None,
) -> Path:
    """Convert an original NExT-Chat checkpoint folder into a Hugging Face folder; returns `output_dir`.

    Args:
        original_dir: folder (or Hub id) of the original checkpoint: `config.json`, weights
            (`pytorch_model*.bin` with index, a single `.bin`, or safetensors) and the slow-tokenizer files.
        output_dir: where to write the converted folder (created; existing files with the same names are replaced).
        vision_tower: CLIP folder or Hub id holding its `config.json` (and weights, used only when the
            checkpoint has no `model.vision_tower.*`). Defaults to the checkpoint's `mm_vision_tower`, relative
            to `original_dir` when relative.
        sam_checkpoint: official SAM checkpoint (`sam_vit_h_4b8939.pth` layout) for checkpoints without
            `sam.model.*` keys.
        dtype: `"bf16"`, `"fp16"`, `"fp32"` or a `torch.dtype`; default: the dtype the checkpoint stores its
            language-model weights in.
        max_shard_size: largest safetensors shard (`save_pretrained`'s argument), e.g. `"5GB"`.
        push_to_hub: repository id to upload the folder to with `huggingface_hub.HfApi.upload_folder`.
        private, token: passed to `create_repo` / `upload_folder`.
        license, base_model: model-card metadata (`license` defaults to the original README's, else apache-2.0).
        progress: show progress bars.
        hub_api: an `huggingface_hub.HfApi` to use for the upload (default: `HfApi(token=token)`).
    """
    from nextchat import NextChatForConditionalGeneration

    original_path, source_repo = _resolve_original(str(original_dir))
    output_dir = Path(output_dir)
    plan, tokenizer, info = plan_conversion(original_path, vision_tower, sam_checkpoint, progress=progress)
    reader: CheckpointReader = info["reader"]
    config = plan.config

    if dtype is None:
        torch_dtype = reader.infos["model.embed_tokens.weight"].dtype
    elif isinstance(dtype, torch.dtype):
        torch_dtype = dtype
    elif str(dtype).lower() in _DTYPES:
        torch_dtype = _DTYPES[str(dtype).lower()]
    else:
        raise ConversionError(f"`dtype`: expected one of bf16, fp16, fp32, got {dtype!r}")
    if not torch_dtype.is_floating_point:
        raise ConversionError(f"`dtype`: expected a floating-point dtype, got {torch_dtype}")

    # The model skeleton, without memory: only the names and shapes of its state dict matter here.
    with torch.device("meta"):
        model = NextChatForConditionalGeneration(config)
    model.to(torch_dtype)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    check_plan_against_model(plan, expected)

    # Convert tensor by tensor: memory-mapped source -> output dtype (a view when the dtype is unchanged).
    state_dict = {}
    for target in _tqdm(list(expected), desc="Converting tensors", unit="tensor", disable=not progress):
        source_reader, key = plan.sources[target]
        tensor = source_reader.get(key)
        if tensor.is_floating_point() and tensor.dtype != expected[target][1]:
            tensor = tensor.to(expected[target][1])
        state_dict[target] = tensor

    output_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.update(**default_generation_settings(config))
    model.save_pretrained(str(output_dir), state_dict=state_dict, max_shard_size=max_shard_size)
    del state_dict

    saved = _save_processor_or_tokenizer(output_dir, tokenizer, info["tower_dir"], config)
    _verify_tokenizer_round_trip(output_dir, tokenizer, info["token_ids"])

    if license is None:
        license = _original_license(original_path) or "apache-2.0"
    if base_model is None:
        base_model = [source_repo] if source_repo else []
    write_model_card(
        output_dir, config, info["token_ids"], license, base_model, source_repo or str(original_dir), push_to_hub, torch_dtype,
        tokenizer_legacy=tokenizer.init_kwargs.get("legacy"),
    )
    for note in plan.notes:
        logger.info(note)
    logger.info("wrote %s (%s, %s)", output_dir, saved, torch_dtype)

    if push_to_hub:
        push_folder_to_hub(output_dir, push_to_hub, private=private, token=token, api=hub_api)
    return output_dir


def _verify_tokenizer_round_trip(output_dir: Path, tokenizer, token_ids: dict):
    """Reload the saved tokenizer and check it gives the same ids as the one converted in memory."""
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = AutoTokenizer.from_pretrained(str(output_dir))
    samples = [
        "A chat between a curious user and an artificial intelligence assistant. USER: <im_start><im_patch><im_end> "
        "Where is the dog? ASSISTANT: Answer: <at> <boxes> .",
        "What is region <at> <boxes>? It is a cat <at> <boxes> <at> <boxes> , ok",
    ]
    for text in samples:
        before, after = tokenizer(text).input_ids, reloaded(text).input_ids
        if before != after:
            raise ConversionError(
                f"the saved tokenizer in {output_dir} tokenises differently after reloading:\n  {text!r}\n"
                f"  in memory: {before}\n  reloaded:  {after}"
            )
    moved = {t: reloaded.convert_tokens_to_ids(t) for t, i in token_ids.items() if reloaded.convert_tokens_to_ids(t) != i}
    if moved:
        raise ConversionError(f"the saved tokenizer changed token ids: {moved}, expected {token_ids}")


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, private: bool | None = None, token: str | None = None, api=None):
    """Upload a converted folder with huggingface_hub's standard `create_repo` + `upload_folder`."""
    from huggingface_hub import HfApi

    api = api or HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        folder_path=str(folder),
        repo_id=getattr(repo, "repo_id", repo_id),
        repo_type="model",
        commit_message="Upload NExT-Chat converted with nextchat-convert",
    )


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextchat-convert",
        description="Convert an original NExT-Chat checkpoint (e.g. AoZhang/nextchat-7b-336) into a Hugging Face folder.",
    )
    parser.add_argument("original_dir", help="original checkpoint folder, or its Hub id")
    parser.add_argument("output_dir", help="folder to write")
    parser.add_argument(
        "--vision-tower",
        default=None,
        help="CLIP folder or Hub id with its config.json (default: the checkpoint's mm_vision_tower); "
        "for the published model: openai/clip-vit-large-patch14-336",
    )
    parser.add_argument("--sam-checkpoint", default=None, help="sam_vit_h_4b8939.pth, for checkpoints without SAM weights")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="output dtype (default: as stored)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the result to this Hub repository")
    parser.add_argument("--private", action="store_true", default=None, help="create the Hub repository as private")
    parser.add_argument("--license", default=None, help="model-card license (default: the original README's, else apache-2.0)")
    parser.add_argument("--base-model", action="append", default=None, help="model-card base_model entry (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert_original_checkpoint(
            args.original_dir,
            args.output_dir,
            vision_tower=args.vision_tower,
            sam_checkpoint=args.sam_checkpoint,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            push_to_hub=args.push_to_hub,
            private=args.private,
            license=args.license,
            base_model=args.base_model,
            progress=not args.no_progress,
        )
    except ConversionError as error:
        print(f"nextchat-convert: error: {error}", file=__import__("sys").stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
