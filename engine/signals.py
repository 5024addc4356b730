"""Deterministic conversation signals: asking for a human, and frustration.

The engine checks explicit requests for a human itself, whatever the model
says, because "you can ask for a human at any time" is a promise made in the
AI disclosure. The sentiment lexicon backs the offline model's satisfaction
estimate.
"""

from __future__ import annotations

import re

__all__ = ["asks_for_human", "estimate_satisfaction"]

# Phrases are matched on normalised text (lower case, half-width). English
# ones need word boundaries so "agentic" or "humane" do not match.
_HUMAN_EN = re.compile(
    r"\b(?:(?:real|live|actual)\s+(?:person|human|agent|people)|human(?:\s+being)?|"
    r"(?:customer\s+service\s+|support\s+|sales\s+)?(?:agent|representative|rep|operator)|"
    r"speak\s+(?:to|with)\s+(?:a\s+|someone|somebody)|talk\s+to\s+(?:a\s+)?(?:person|someone|"
    r"somebody)|someone\s+real|staff\s+member|a\s+manager)\b"
)
_HUMAN_ZH = re.compile(
    r"转人工|人工客服|人工服务|找人工|要人工|真人|客服人员|人工|接线员|找经理|投诉经理"
)
# "I am not a robot / this is not about agents" style negations are rare in
# support chats; the one that matters is "no need for a human".
_HUMAN_NEG = re.compile(
    r"(?:no|don't|do not)\s+need\s+(?:a\s+)?(?:human|agent)|不用人工|不需要人工"
)


def asks_for_human(normalised: str) -> bool:
    """Whether the (normalised) customer text explicitly asks for a person."""
    if _HUMAN_NEG.search(normalised):
        return False
    return bool(_HUMAN_EN.search(normalised) or _HUMAN_ZH.search(normalised))


_VERY_NEG = re.compile(
    r"\b(?:worst|useless|terrible|horrible|awful|ridiculous|pathetic|scam|furious|angry|"
    r"outrageous|disgusting|unacceptable|fed up|sick of|waste of time|hate|garbage|rubbish|"
    r"incompetent|stupid)\b|"
    r"垃圾|太差|最差|气死|生气|愤怒|骗子|无语|恶心|什么破|废物|没用|投诉|受够了|太慢了|离谱"
)
_NEG = re.compile(
    r"\b(?:annoyed|annoying|frustrat\w*|disappointed|unhappy|upset|still\s+(?:not|no|waiting)|"
    r"again|why\s+(?:is|does|hasn't|isn't)|bad|slow|wrong|not\s+happy|come\s+on)\b|"
    r"失望|不满|着急|烦|怎么还|为什么还|不满意|很慢|差评"
)
_POS = re.compile(
    r"\b(?:thanks?|thank\s+you|great|perfect|awesome|excellent|helpful|appreciate|cheers|"
    r"love\s+it|nice)\b|谢谢|感谢|太好了|很好|不错|满意|棒"
)


def estimate_satisfaction(normalised: str) -> int:
    """A 1-5 satisfaction estimate from the wording of one message (3 is neutral)."""
    very = len(_VERY_NEG.findall(normalised))
    neg = len(_NEG.findall(normalised))
    pos = len(_POS.findall(normalised))
    exclaim = normalised.count("!") + normalised.count("！")
    if very >= 1 and pos == 0:
        return 1 if very >= 2 or exclaim >= 1 or neg >= 1 else 2
    if neg >= 2 and pos == 0:
        return 2
    if neg == 1 and pos == 0:
        return 3
    if pos >= 1 and very == 0 and neg == 0:
        return 5 if pos >= 2 else 4
    return 3
