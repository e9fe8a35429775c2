"""nextchat.demo: chat with NExT-Chat from the command line (`nextchat-chat`) or a local web page (`nextchat-demo`).

The engine (:class:`ChatSession`) needs only the package's own dependencies; the web page needs gradio and imports
it in :mod:`nextchat.demo.web` only.
"""

from .core import (
    DRAW_COLORS,
    EXAMPLE_PROMPTS,
    ChatSession,
    DemoError,
    GenerationSettings,
    GroundedEntity,
    Reply,
    answer_html,
    answer_terminal,
    default_model_dir,
    load_model,
)


__all__ = [
    "DRAW_COLORS",
    "EXAMPLE_PROMPTS",
    "ChatSession",
    "DemoError",
    "GenerationSettings",
    "GroundedEntity",
    "Reply",
    "answer_html",
    "answer_terminal",
    "default_model_dir",
    "load_model",
]
