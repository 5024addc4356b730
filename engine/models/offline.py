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

import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
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
to of in on at for with from and or but so if this that these those there here can
could would will shall should may might must please pls just hi hello hey want wanna
like need get got have has had 's s thing some any about
""".split())
_NEGATORS = frozenset({"no", "not", "never", "don't", "dont", "doesn't", "didn't", "isn't",
                       "nope", "nah", "wasn't", "won't", "cannot", "can't"})
_ZH_NEGATION = re.compile(r"不|没|别|未|非")
# Chinese negation inside fixed expressions that mean something positive.
_ZH_NOT_NEGATION = re.compile(r"没问题|不错|不客气|没事")

#: Minimum similarity for an intent or a route to count.
INTENT_THRESHOLD = 0.6
ROUTE_THRESHOLD = 0.34


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s", "'s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


@dataclass(frozen=True, slots=True)
class _Features:
    words: tuple[str, ...]
    wordset: frozenset[str]
    bigrams: frozenset[str]
    chars: frozenset[str]
    negated: bool
    cjk_len: int
    question: bool


@lru_cache(maxsize=8192)
def _features(norm: str) -> _Features:
    words = tuple(_stem(w) for w in _WORD.findall(norm) if w not in _STOP)
    runs = _CJK_RUN.findall(norm)
    bigrams = frozenset(b for r in runs for b in cjk_bigrams(r))
    chars = frozenset(c for r in runs for c in r)
    cleaned = _ZH_NOT_NEGATION.sub("", norm)
    negated = bool(set(_WORD.findall(norm)) & _NEGATORS) or bool(_ZH_NEGATION.search(cleaned))
    question = "?" in norm or "？" in norm or norm.rstrip("。.!！ ").endswith(("吗", "呢"))
    return _Features(words, frozenset(words), bigrams, chars, negated,
                     sum(len(r) for r in runs), question)


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


def _coverage(items: Iterable[str], other: Collection[str], idf: Mapping[str, float],
              fuzzy: bool) -> tuple[float, float]:
    """(IDF-weighted share of ``items`` found in ``other``, total weight)."""
    got = total = 0.0
    for item in items:
        weight = idf.get(item, _UNSEEN_IDF)
        total += weight
        if fuzzy:
            got += weight * _word_score(item, other)
        elif item in other:
            got += weight
    return (got / total if total else 0.0), total


class Similarity:
    """How well a message matches one example phrase (0..1).

    Words, Chinese bigrams and Chinese characters are weighted by inverse
    document frequency over the examples being compared, so "return" decides
    between "return my order" and "track my order", not "order". The score is
    the larger of the example's coverage by the message (long messages that
    contain the phrase) and, discounted, the message's coverage by the example
    (short messages such as "退钱" that are part of a longer example).
    """

    @staticmethod
    def score(message: _Features, example: _Features, idf: Mapping[str, float],
              view: _View | None = None, *, precision_path: bool = True) -> float:
        recall: list[tuple[float, float]] = []
        precision: list[tuple[float, float]] = []
        if example.words:
            if view is None:
                recall.append(_coverage(example.words, message.words, idf, True))
                if message.words:
                    precision.append(_coverage(message.words, example.words, idf, True))
            else:
                recall.append(view.recall(example, idf))
                if message.words:
                    precision.append(view.precision(example, idf))
        if example.cjk_len == 1 and message.cjk_len > 3:
            # One-character examples ("对", "行", "是") match short answers, not
            # a character inside a longer sentence ("银行", "问题是").
            recall.append((0.0, 1.0))
        elif example.cjk_len:
            bigram = _coverage(example.bigrams, message.bigrams, idf, False) \
                if example.bigrams else (0.0, 0.0)
            chars = _coverage(example.chars, message.chars, idf, False)
            # Characters catch split words ("退个款" for "退款"), at a discount.
            if bigram[0] >= 0.8 * chars[0] and example.bigrams:
                recall.append(bigram)
            else:
                recall.append((0.8 * chars[0], chars[1]))
            if message.bigrams and example.bigrams:
                precision.append(_coverage(message.bigrams, example.bigrams, idf, False))
        if not recall:
            return 0.0
        score = _weighted(recall)
        if precision_path:
            if precision:
                score = max(score, 0.85 * _weighted(precision))
            return score
        # Intents: an example must be matched whole, and the more of the
        # message it explains the surer the match ("go ahead" answers a
        # read-back; "can it go to my other card?" only shares a word).
        if example.cjk_len and example.cjk_len <= 4 and score < 0.999:
            return 0.0
        covered = _weighted(precision) if precision else 0.0
        return score * (0.6 + 0.4 * covered)


def _weighted(parts: list[tuple[float, float]]) -> float:
    total = sum(w for _, w in parts)
    return sum(s * w for s, w in parts) / total if total else 0.0


_UNSEEN_IDF = 1.0


class _View:
    """A message's word matches against one index's vocabulary, computed once."""

    __slots__ = ("hits", "near", "words")

    def __init__(self, message: _Features, near: Callable[[str], tuple[str, ...]]) -> None:
        self.words = message.words
        self.hits: dict[str, float] = {}
        self.near: dict[str, frozenset[str]] = {}
        for word in message.words:
            self.hits[word] = 1.0
            close = frozenset(near(word))
            self.near[word] = close
            for v in close:
                if v != word:
                    self.hits.setdefault(v, 0.8)

    def recall(self, example: _Features, idf: Mapping[str, float]) -> tuple[float, float]:
        got = total = 0.0
        for w in example.words:
            weight = idf.get(w, _UNSEEN_IDF)
            total += weight
            got += weight * self.hits.get(w, 0.0)
        return (got / total if total else 0.0), total

    def precision(self, example: _Features, idf: Mapping[str, float]) -> tuple[float, float]:
        got = total = 0.0
        words = example.wordset
        for w in self.words:
            weight = idf.get(w, _UNSEEN_IDF)
            total += weight
            if w in words:
                got += weight
            elif self.near[w] & words:
                got += 0.8 * weight
        return (got / total if total else 0.0), total


class _Index:
    """Examples of several labels (intents or flows), prepared for scoring."""

    def __init__(self, labelled: Sequence[tuple[str, Sequence[str]]]) -> None:
        self.items: list[tuple[str, _Features, int]] = []
        self.negative: set[str] = set()
        df: dict[str, int] = {}
        for label, examples in labelled:
            for ex in examples:
                feats = _features(normalize(ex))
                self.items.append((label, feats, len(feats.words) + feats.cjk_len))
                if feats.negated:
                    self.negative.add(label)
                for token in {*feats.words, *feats.bigrams, *feats.chars}:
                    df[token] = df.get(token, 0) + 1
        n = max(len(self.items), 1)
        self.idf = {t: math.log(1.0 + n / d) for t, d in df.items()}
        # Inverted index: only examples sharing a token with the message are
        # scored (a state has dozens of examples; a message touches a few).
        self.by_token: dict[str, list[int]] = {}
        for i, (_, feats, _) in enumerate(self.items):
            for token in {*feats.words, *feats.chars}:
                self.by_token.setdefault(token, []).append(i)
        self.vocab = frozenset(t for t in self.by_token if t.isascii())
        self._fuzzy: dict[str, tuple[str, ...]] = {}

    def _near(self, word: str) -> tuple[str, ...]:
        found = self._fuzzy.get(word)
        if found is None:
            found = tuple(v for v in self.vocab if v != word and _word_score(word, (v,)) > 0)
            if len(self._fuzzy) < 4096:
                self._fuzzy[word] = found
        return found

    def candidates(self, message: _Features) -> set[int]:
        out: set[int] = set()
        for word in message.words:
            out.update(self.by_token.get(word, ()))
            for near in self._near(word):
                out.update(self.by_token.get(near, ()))
        for char in message.chars:
            out.update(self.by_token.get(char, ()))
        return out

    def rank(self, message: _Features, *, negation: bool,
             precision_path: bool = True) -> list[tuple[float, int, str]]:
        """Best (score, size, label) per label, best first.

        ``precision_path`` lets a short message count by how much of it an
        example covers ("退钱" in "能退钱吗"): right for routing, wrong for
        intents, where "thanks" is not "no thanks".
        """
        best: dict[str, tuple[float, int, str]] = {}
        view = _View(message, self._near)
        for i in self.candidates(message):
            label, feats, size = self.items[i]
            score = Similarity.score(message, feats, self.idf, view,
                                     precision_path=precision_path)
            # "that's not right" must not confirm. Labels with negative
            # examples of their own (deny, cancel) are exempt: their
            # positive-looking examples ("cancel") still fit "nah cancel it".
            if negation and message.negated and not feats.negated \
                    and label not in self.negative:
                score *= 0.45
            if negation and message.question and not feats.question:
                # A question asks; it rarely confirms or declines anything.
                score *= 0.8
            if label not in best or (score, size) > best[label][:2]:
                best[label] = (score, size, label)
        return sorted(best.values(), reverse=True)


@lru_cache(maxsize=1024)
def _index(labelled: tuple[tuple[str, tuple[str, ...]], ...]) -> _Index:
    return _Index(labelled)


def similarity(message: str, example: str) -> float:
    """Similarity of one message to one example (uniform weights)."""
    return Similarity.score(_features(normalize(message)), _features(normalize(example)), {})


_SMALL_TALK = re.compile(
    r"[?？]|\b(?:hello|hi|hey|thanks|thank you|haha|lol|ok cool|how are you|by the way|btw|"
    r"weather|weekend|joke|bored|what's up|good (?:morning|afternoon|evening))\b|"
    r"你好|在吗|哈哈|谢谢|顺便|天气|周末|无聊|早上好|晚上好|请问一下"
)


def is_small_talk(norm: str) -> bool:
    """Questions and chit-chat: not an answer to what the bot asked."""
    return bool(_SMALL_TALK.search(norm))


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
        # In-process: reading the unredacted text sends nothing anywhere.
        text = request.raw_text if request.raw_text is not None else request.text
        norm = normalize(text)
        flow = request.flow
        state = flow.states[request.state]
        asking = request.missing[0] if request.missing else None
        entities = self.extract(flow, text, state.collect, asking)
        transition = self.intent(norm, [(t.name, t.examples) for t in state.intents])
        wants_human = asks_for_human(norm)
        off_topic = not entities and transition is None and not wants_human and \
            is_small_talk(norm)
        # The offline model has no view of its own to drift: it echoes the
        # store, so the engine's memory check is a deterministic no-op here.
        echo = {n: request.entities.get(n) for n in flow.pinned} if request.check_memory \
            else None
        return Decision(
            reply=None,
            entities=entities,
            transition=transition,
            satisfaction=estimate_satisfaction(norm),
            wants_human=wants_human,
            source="customer",
            model=self.name,
            off_topic=off_topic,
            pinned_echo=echo,
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
        index = _index(tuple((name, tuple(examples)) for name, examples in triggers))
        ranked = index.rank(_features(norm), negation=True, precision_path=False)
        if not ranked:
            return None
        score, _, name = ranked[0]
        return name if score >= self.intent_threshold else None

    async def route(self, request: RouteRequest) -> RouteDecision:
        norm = normalize(request.raw_text if request.raw_text is not None else request.text)
        if asks_for_human(norm):
            return RouteDecision(None, wants_human=True, confidence=1.0)
        satisfaction = estimate_satisfaction(norm)
        index = _index(tuple((c.flow, tuple(c.examples)) for c in request.candidates))
        # Negation says nothing about the topic ("快递还没到" is about delivery).
        ranked = index.rank(_features(norm), negation=False)
        best = ranked[0] if ranked else None
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
