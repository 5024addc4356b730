"""The offline model: deterministic decisions with no network and no key.

It reads what the flow declares: entity types extract values from the
customer's text (patterns, enums with synonyms, amounts, dates), intents are
recognised by fuzzy similarity to the flow's examples (typo-tolerant English
words, Chinese character bigrams, negation-aware), routing uses each flow's
router examples, and satisfaction comes from a sentiment lexicon. It leaves
``reply`` empty so the engine answers with the state's ``say``/``ask`` texts.

Used when no API key is configured, in tests, and as the fallback when Claude
is unavailable, so it must be good on realistic phrasing, not only keywords.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from engine.flow.compiled import Flow
from engine.models.base import (
    Decision,
    DecisionRequest,
    HistoryItem,
    Model,
    RouteDecision,
    RouteRequest,
    SummaryRequest,
)
from engine.signals import asks_for_human, estimate_satisfaction
from engine.textnorm import cjk_bigrams, edit_distance, normalize

__all__ = ["OfflineModel", "Similarity", "similarity"]

_WORD = re.compile(r"[a-z][a-z']*")
_CJK_RUN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]+")
_STOP = frozenset("""
a an the i me my mine we our you your it its is are was were be been am do does did
to of in on at for with from and or but so if this that these those there here
can could would will shall should may might must please pls just hi hello hey
want wanna like need get got have has had 's s thing some any about
""".split())
_NEGATORS = frozenset({"no", "not", "never", "don't", "dont", "doesn't", "didn't", "isn't",
                       "nope", "nah", "wasn't", "won't", "cannot", "can't"})
_ZH_NEGATION = re.compile(r"不|没|别|未|非")
# Chinese negation inside fixed expressions that mean something positive.
_ZH_NOT_NEGATION = re.compile(r"没问题|不错|不客气|没事")

#: Minimum similarity for an intent or a route to count.
INTENT_THRESHOLD = 0.5
ROUTE_THRESHOLD = 0.34


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s", "'s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


@dataclass(frozen=True, slots=True)
class _Features:
    words: tuple[str, ...]
    bigrams: frozenset[str]
    chars: frozenset[str]
    negated: bool
    cjk_len: int


@lru_cache(maxsize=8192)
def _features(norm: str) -> _Features:
    words = tuple(_stem(w) for w in _WORD.findall(norm) if w not in _STOP)
    runs = _CJK_RUN.findall(norm)
    bigrams = frozenset(b for r in runs for b in cjk_bigrams(r))
    chars = frozenset(c for r in runs for c in r)
    cleaned = _ZH_NOT_NEGATION.sub("", norm)
    negated = bool(set(_WORD.findall(norm)) & _NEGATORS) or bool(_ZH_NEGATION.search(cleaned))
    return _Features(words, bigrams, chars, negated, sum(len(r) for r in runs))


def _word_score(word: str, candidates: Iterable[str]) -> float:
    """1.0 for an exact word, 0.8 for a likely typo of it, else 0."""
    # Typos keep the first letter and the length, nearly always ("refnud",
    # "recieved", "ordr"); requiring both keeps "crack" from matching "track".
    limit = 2 if len(word) >= 9 else 1 if len(word) >= 5 else 0
    best = 0.0
    for c in candidates:
        if c == word:
            return 1.0
        if limit and c[:1] == word[:1] and abs(len(c) - len(word)) <= limit and \
                edit_distance(c, word, limit) <= limit:
            best = 0.8
    return best


class Similarity:
    """How well a message matches an example phrase (0..1), negation-aware.

    The score is the larger of the example's coverage by the message (long
    messages that contain the phrase) and, slightly discounted, the message's
    coverage by the example (short messages such as "退款" or "refund" that
    are part of a longer example).
    """

    @staticmethod
    def score(message: _Features, example: _Features) -> float:
        recall: list[tuple[float, int]] = []
        precision: list[tuple[float, int]] = []
        if example.words:
            hits = [_word_score(w, message.words) for w in example.words]
            recall.append((sum(hits) / len(example.words), len(example.words)))
            if message.words:
                back = [_word_score(w, example.words) for w in message.words]
                precision.append((sum(back) / len(message.words), len(message.words)))
        if example.cjk_len:
            if example.cjk_len == 1 or not example.bigrams:
                hit_c = len(example.chars & message.chars) / max(len(example.chars), 1)
            else:
                hit_c = len(example.bigrams & message.bigrams) / len(example.bigrams)
            recall.append((hit_c, max(1, example.cjk_len // 2)))
            if message.bigrams and example.bigrams:
                back_c = len(example.bigrams & message.bigrams) / len(message.bigrams)
                precision.append((back_c, max(1, message.cjk_len // 2)))
        if not recall:
            return 0.0
        score = _weighted(recall)
        if precision:
            score = max(score, 0.85 * _weighted(precision))
        if message.negated != example.negated:
            score *= 0.45
        return score


def _weighted(parts: list[tuple[float, int]]) -> float:
    total = sum(w for _, w in parts)
    return sum(s * w for s, w in parts) / total


def similarity(message: str, example: str) -> float:
    return Similarity.score(_features(normalize(message)), _features(normalize(example)))


def _best(message: _Features, examples: Sequence[str]) -> tuple[float, int]:
    """Best score and the matched example's size (longer matches win ties)."""
    best, size = 0.0, 0
    for ex in examples:
        feats = _features(normalize(ex))
        s = Similarity.score(message, feats)
        n = len(feats.words) + feats.cjk_len
        if s > best + 1e-9 or (abs(s - best) <= 1e-9 and n > size):
            best, size = s, n
    return best, size


class OfflineModel(Model):
    """Deterministic model; see the module docstring."""

    name = "offline"
    history_turns = 0

    def __init__(self, *, intent_threshold: float = INTENT_THRESHOLD,
                 route_threshold: float = ROUTE_THRESHOLD) -> None:
        self.intent_threshold = intent_threshold
        self.route_threshold = route_threshold

    async def decide(self, request: DecisionRequest) -> Decision:
        return self.decide_now(request)

    def decide_now(self, request: DecisionRequest) -> Decision:
        """The decision, synchronously (the offline model never waits)."""
        norm = normalize(request.text)
        flow = request.flow
        state = flow.states[request.state]
        asking = request.missing[0] if request.missing else None
        entities = self.extract(flow, request.text, state.collect, asking)
        transition = self.intent(norm, [(t.name, t.examples) for t in state.intents])
        return Decision(
            reply=None,
            entities=entities,
            transition=transition,
            satisfaction=estimate_satisfaction(norm),
            wants_human=asks_for_human(norm),
            source="customer",
            model=self.name,
        )

    def extract(self, flow: Flow, text: str, collecting: Sequence[str],
                asking: str | None) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name, entity in flow.entities.items():
            # Free-text entities (addresses) are the whole answer to their own
            # question, and noise anywhere else.
            if entity.capture == "when_asked" and name != asking:
                continue
            matches = entity.type.extract(text)
            if not matches:
                continue
            # The last mention wins: customers correct themselves at the end
            # ("not HL1, it's HL2").
            best = max(matches, key=lambda m: (m.confidence, m.start))
            best = max((m for m in matches if m.confidence >= best.confidence - 0.05),
                       key=lambda m: m.start)
            # Values for entities the state is not asking for must be clear
            # mentions, not fuzzy guesses.
            floor = 0.5 if name in collecting else 0.8
            if best.confidence >= floor:
                found[name] = best.value
        return found

    def intent(self, norm: str, triggers: Sequence[tuple[str, Sequence[str]]]) -> str | None:
        if not triggers:
            return None
        message = _features(norm)
        scored = []
        for name, examples in triggers:
            score, size = _best(message, examples)
            scored.append((score, size, name))
        scored.sort(reverse=True)
        score, _, name = scored[0]
        return name if score >= self.intent_threshold else None

    async def route(self, request: RouteRequest) -> RouteDecision:
        norm = normalize(request.text)
        if asks_for_human(norm):
            return RouteDecision(None, wants_human=True, confidence=1.0)
        satisfaction = estimate_satisfaction(norm)
        message = _features(norm)
        best: tuple[float, int, str] | None = None
        for c in request.candidates:
            score, size = _best(message, c.examples)
            if best is None or (score, size) > best[:2]:
                best = (score, size, c.flow)
        if best is None or best[0] < self.route_threshold:
            return RouteDecision(None, confidence=best[0] if best else 0.0,
                                 satisfaction=satisfaction)
        return RouteDecision(best[2], confidence=best[0], satisfaction=satisfaction)

    async def summarise(self, request: SummaryRequest) -> str:
        return extractive_summary(request.previous, request.turns, request.pinned)


def extractive_summary(previous: str, turns: Sequence[HistoryItem], pinned: Any) -> str:
    """A short extractive summary: the customer's substantive lines, newest last."""
    lines = [ln for ln in previous.splitlines() if ln.strip()]
    for item in turns:
        if item.role != "customer":
            continue
        text = " ".join(item.text.split())
        if len(normalize(text)) < 4:
            continue
        lines.append(f"- customer: {text[:160]}")
    return "\n".join(lines[-12:])
