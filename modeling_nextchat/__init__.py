"""NExT-Chat (pix2emb) for Hugging Face transformers."""

from .configuration import NextChatConfig


__all__ = ["NextChatConfig"]
