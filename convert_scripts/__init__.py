"""Conversion of original NExT-Chat checkpoints (console script `nextchat-convert`)."""

from .convert_original_nextchat import (
    CheckpointReader,
    ConversionError,
    convert_original_checkpoint,
    infer_sam_config,
    main,
    map_original_key,
    plan_conversion,
    push_folder_to_hub,
)


__all__ = [
    "CheckpointReader",
    "ConversionError",
    "convert_original_checkpoint",
    "infer_sam_config",
    "main",
    "map_original_key",
    "plan_conversion",
    "push_folder_to_hub",
]
