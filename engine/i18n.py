"""Languages: which one a customer writes in, and picking localised text.

Conversations carry one of ``en``, ``zh`` or ``mixed``. Text in flows is
either one string or a mapping per language; :func:`pick` resolves it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

__all__ = ["DEFAULT_DISCLOSURE", "Language", "pick", "reply_language"]

Language = Literal["en", "zh", "mixed"]

#: The AI disclosure every conversation starts with (a flow or the config may
#: override the words, never remove the message).
DEFAULT_DISCLOSURE: Mapping[str, str] = {
    "en": "Hi! I am an AI assistant. You can ask for a human at any time.",
    "zh": "您好！我是 AI 智能助手，您可以随时要求转接人工客服。",
}


def reply_language(language: str) -> str:
    """The key used to pick localised text for a conversation language.

    Mixed-language customers mostly write English sentences with Chinese
    nouns in them ("my 快递 still not arrived"), so English reads best; a flow
    may still provide a dedicated ``mixed`` text.
    """
    return "zh" if language == "zh" else "en"


def pick(text: str | Mapping[str, str], language: str) -> str:
    """The text for ``language``, falling back to English, then any language."""
    if isinstance(text, str):
        return text
    if language == "mixed" and "mixed" in text:
        return text["mixed"]
    key = reply_language(language)
    if key in text:
        return text[key]
    if "en" in text:
        return text["en"]
    return next(iter(text.values()), "")
