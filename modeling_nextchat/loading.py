"""Load a NExT-Chat model for inference from a full model folder / Hub id OR a PEFT (LoRA) adapter folder.

    from nextchat.loading import load_pretrained

    model, processor = load_pretrained("path/to/checkpoint-500")            # adapter folder or full folder
    model, processor = load_pretrained("adapter/", base_model="base-folder")  # override the adapter's base

A folder with model weights (``model.safetensors`` or a sharded index, next to ``config.json``) is a full model.
A folder with ``adapter_config.json`` (what ``PeftModel.save_pretrained`` and a LoRA Trainer's ``checkpoint-N/``
write) is an adapter: its base model is ``base_model`` when given, else the ``base_model_name_or_path`` recorded
in ``adapter_config.json``. The adapter (LoRA weights and every ``modules_to_save`` copy, e.g. ``lm_head``,
``embed_tokens``, ``loc_decoder``) is applied with ``peft.PeftModel.from_pretrained`` and merged into the base
(``merge_and_unload``), so the result is a plain ``NextChatForConditionalGeneration``. The processor comes from
``processor`` when given, else from the adapter folder when it holds processor files, else from the base.

This module is part of the ``nextchat`` package only (it is not shipped as Hub remote code).
"""

from __future__ import annotations

import json
import os
from typing import Any


ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PROCESSOR_FILE_NAMES = ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json")


class LoadingError(ValueError):
    """A path that is neither a NExT-Chat model folder nor a PEFT adapter folder (or an adapter without a base)."""


def _is_local(path: str) -> bool:
    return os.path.isdir(path)


def _has_any(folder: str, names) -> bool:
    return any(os.path.isfile(os.path.join(folder, n)) for n in names)


def is_adapter_folder(path: str) -> bool:
    """Whether ``path`` is a local PEFT adapter folder (``adapter_config.json`` and no full model weights)."""
    return (
        _is_local(path)
        and os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME))
        and not _has_any(path, MODEL_WEIGHT_NAMES)
    )


def is_model_folder(path: str) -> bool:
    """Whether ``path`` is a local full model folder (``config.json`` and model weights)."""
    return _is_local(path) and os.path.isfile(os.path.join(path, "config.json")) and _has_any(path, MODEL_WEIGHT_NAMES)


def has_processor_files(path: str) -> bool:
    return _is_local(path) and _has_any(path, PROCESSOR_FILE_NAMES)


def read_adapter_config(path: str, argument: str = "path") -> dict:
    try:
        with open(os.path.join(path, ADAPTER_CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise LoadingError(f"`{argument}`: {path!r} has an unreadable {ADAPTER_CONFIG_NAME} ({err})") from err
    if not isinstance(config, dict):
        raise LoadingError(f"`{argument}`: {path!r}: {ADAPTER_CONFIG_NAME} is not a JSON object")
    return config


def _hub_adapter_config(path: str) -> dict | None:
    """The adapter config of a Hub repo id (None when it is not an adapter repo or cannot be reached)."""
    if os.path.exists(path) or _looks_like_path(path):
        return None
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(path, ADAPTER_CONFIG_NAME)
    except Exception:  # noqa: BLE001 - not an adapter repo, offline, not a repo id ...
        return None
    with open(local, encoding="utf-8") as f:
        return json.load(f)


def describe_source(path: str, base_model: str | None = None) -> dict:
    """``{"kind": "model" | "adapter", "path", "base_model"}`` for ``path`` (no weights are loaded).

    Raises :class:`LoadingError` naming the argument when ``path`` is a local folder that is neither, or an adapter
    whose base model cannot be resolved."""
    path = os.fspath(path)
    if _is_local(path):
        if is_model_folder(path):
            return {"kind": "model", "path": path, "base_model": None}
        if is_adapter_folder(path):
            config = read_adapter_config(path)
            if not _has_any(path, ADAPTER_WEIGHT_NAMES):
                raise LoadingError(
                    f"`path`: {path!r} has {ADAPTER_CONFIG_NAME} but no adapter weights "
                    f"({' or '.join(ADAPTER_WEIGHT_NAMES)})"
                )
            return {"kind": "adapter", "path": path, "base_model": _resolve_base(path, config, base_model)}
        present = sorted(os.listdir(path))[:12]
        raise LoadingError(
            f"`path`: {path!r} is neither a NExT-Chat model folder nor a PEFT adapter folder (a model folder has "
            f"config.json and model.safetensors, as written by save_pretrained / nextchat-convert; an adapter folder "
            f"has {ADAPTER_CONFIG_NAME} and adapter_model.safetensors, as written by PeftModel.save_pretrained or a "
            f"LoRA run's checkpoint-N/); it holds {present}"
        )
    if os.path.exists(path):
        raise LoadingError(f"`path`: {path!r} is a file; pass the folder (or Hub id) of a model or an adapter")
    hub_config = _hub_adapter_config(path)
    if hub_config is not None:
        return {"kind": "adapter", "path": path, "base_model": _resolve_base(path, hub_config, base_model)}
    if _looks_like_path(path):
        raise LoadingError(f"`path`: {path!r} does not exist (and is not a Hub id such as 'org/name')")
    return {"kind": "model", "path": path, "base_model": None}


def _looks_like_path(name: str) -> bool:
    """A name that can only be a local path (a Hub id is ``name`` or ``org/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _resolve_base(path: str, config: dict, base_model: str | None) -> str:
    if base_model is not None:
        base = os.fspath(base_model)
        if os.path.isdir(base) and not is_model_folder(base):
            raise LoadingError(
                f"`base_model`: {base!r} is not a full NExT-Chat model folder (config.json and model weights)"
            )
        if os.path.isdir(base) or not _looks_like_path(base):
            return base
        raise LoadingError(f"`base_model`: {base!r} does not exist")
    base = config.get("base_model_name_or_path")
    if not base:
        raise LoadingError(
            f"the adapter {path!r} does not record its base model (`base_model_name_or_path` is empty in "
            f"{ADAPTER_CONFIG_NAME}); pass `base_model=` (--base-model) with the model it was trained on"
        )
    if _looks_like_path(base) and not os.path.isdir(base):
        raise LoadingError(
            f"the adapter {path!r} names the base model {base!r}, which does not exist here; pass `base_model=` "
            "(--base-model) with the folder or Hub id of the model it was trained on"
        )
    if os.path.isdir(base) and not is_model_folder(base):
        raise LoadingError(
            f"the adapter {path!r} names the base model {base!r}, which is not a full NExT-Chat model folder; pass "
            "`base_model=` (--base-model) with the model it was trained on"
        )
    return base


def _adapter_vocab_size(path: str) -> int | None:
    """The vocabulary size of the adapter's saved ``embed_tokens`` / ``lm_head`` copies, when it saves them."""
    weights = os.path.join(path, "adapter_model.safetensors") if _is_local(path) else None
    if not weights or not os.path.isfile(weights):
        return None
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            if key.endswith(("embed_tokens.weight", "lm_head.weight")) and "lora_" not in key:
                return int(f.get_slice(key).get_shape()[0])
    return None


def _to_dtype(dtype):
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise LoadingError(f"`dtype` must be a torch.dtype, 'auto' or a name such as 'bfloat16', got {dtype!r}")


def load_pretrained(
    path: str,
    device: Any = None,
    dtype: Any = None,
    *,
    base_model: str | None = None,
    processor: str | None = None,
    merge: bool = True,
    model_kwargs: dict | None = None,
):
    """Load ``(model, processor)`` from a full NExT-Chat folder / Hub id or a PEFT adapter folder.

    Args:
        path: a model folder or Hub id (``config.json`` + weights), or an adapter folder (``adapter_config.json`` +
            ``adapter_model.safetensors``, e.g. a LoRA run's ``checkpoint-N/`` or final output folder).
        device: where to put the model (e.g. ``"cuda"``, ``"cpu"``); default: leave it where it loaded (cpu).
        dtype: weights dtype (``torch.bfloat16``, ``"float32"``, ``"auto"``); default: the transformers default.
        base_model: for an adapter, the base model (folder or Hub id) instead of the adapter's
            ``base_model_name_or_path``.
        processor: processor folder / Hub id; default: the adapter folder when it holds processor files, else the
            base model (for a full model: ``path``).
        merge: merge the adapter into the base (``merge_and_unload``) and return the plain model (default); with
            ``False`` the ``PeftModel`` is returned.
        model_kwargs: more ``from_pretrained`` keyword arguments for the (base) model.

    The model is returned in eval mode. Raises :class:`LoadingError` (a ``ValueError``) naming the argument when a
    path is neither kind of folder or an adapter's base model cannot be resolved.
    """
    from nextchat import NextChatForConditionalGeneration, NextChatProcessor

    if path is None or not str(path).strip():
        raise LoadingError("`path` is empty; pass a model folder, an adapter folder or a Hub id")
    path = os.fspath(path)
    if base_model is not None and not str(base_model).strip():
        raise LoadingError("`base_model` is empty")
    source = describe_source(path, base_model)
    if base_model is not None and source["kind"] == "model":
        raise LoadingError(
            f"`base_model` was given but {path!r} is a full model folder, not an adapter folder ({ADAPTER_CONFIG_NAME})"
        )
    kwargs = dict(model_kwargs or {})
    torch_dtype = _to_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    model_path = source["base_model"] if source["kind"] == "adapter" else path
    model = NextChatForConditionalGeneration.from_pretrained(model_path, **kwargs)
    if getattr(model.config, "model_type", None) != "nextchat":
        raise LoadingError(f"{model_path!r} is not a NExT-Chat model (model_type={model.config.model_type!r})")

    if source["kind"] == "adapter":
        try:
            from peft import PeftModel
        except ImportError as err:  # pragma: no cover - peft is a declared dependency of the training extra
            raise ImportError(f"{path!r} is a PEFT adapter folder; loading it needs `pip install peft`") from err
        vocab = _adapter_vocab_size(path)
        if vocab is not None and vocab != model.get_input_embeddings().weight.shape[0]:
            # the adapter was trained after adding tokens: give the base the same table size first
            model.resize_token_embeddings(vocab, mean_resizing=False)
        model = PeftModel.from_pretrained(model, path, is_trainable=False)
        if merge:
            model = model.merge_and_unload()
        if processor is None and has_processor_files(path):
            processor = path
    processor_path = processor if processor is not None else model_path
    if _is_local(processor_path) and not has_processor_files(processor_path):
        argument = "processor" if processor is not None else ("base_model" if base_model is not None else "path")
        raise LoadingError(
            f"`{argument}`: {processor_path!r} has no processor files ({', '.join(PROCESSOR_FILE_NAMES)}); pass "
            "`processor=` (--processor) with the processor saved with this model"
        )
    loaded_processor = NextChatProcessor.from_pretrained(processor_path)
    if device is not None:
        model.to(device)
    model.eval()
    return model, loaded_processor


__all__ = [
    "LoadingError",
    "describe_source",
    "has_processor_files",
    "is_adapter_folder",
    "is_model_folder",
    "load_pretrained",
]
