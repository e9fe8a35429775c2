"""nextchat.training: the data path, `NextChatTrainer`, stage presets and LoRA, and the training-only objectives."""

from .attention_supervision import AttentionSupervision


__all__ = ["AttentionSupervision"]
