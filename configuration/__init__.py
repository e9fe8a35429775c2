from .configuration_nextchat import SAM_VIT_H_CONFIG, NextChatConfig


__all__ = ["NextChatConfig", "SAM_VIT_H_CONFIG"]
