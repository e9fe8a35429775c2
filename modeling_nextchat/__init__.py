"""NExT-Chat (pix2emb) for Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from .configuration import NextChatConfig
from .modeling_nextchat import (
    NextChatCausalLMOutputWithPast,
    NextChatForConditionalGeneration,
    NextChatModel,
    NextChatPreTrainedModel,
)
from .generation_nextchat import NextChatGenerateOutput


AutoConfig.register("nextchat", NextChatConfig, exist_ok=True)
for _auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto_class.register(NextChatConfig, NextChatForConditionalGeneration, exist_ok=True)


__all__ = [
    "NextChatConfig",
    "NextChatPreTrainedModel",
    "NextChatModel",
    "NextChatForConditionalGeneration",
    "NextChatCausalLMOutputWithPast",
    "NextChatGenerateOutput",
]
