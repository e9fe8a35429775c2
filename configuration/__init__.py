from .configuration_nextchat import NEXTCHAT_SPECIAL_TOKENS, SAM_VIT_H_CONFIG, NextChatConfig


__all__ = ["NEXTCHAT_SPECIAL_TOKENS", "NextChatConfig", "SAM_VIT_H_CONFIG"]
