"""Calibrate the near-duplicate threshold of the FAQ batching window.

    python bench/calibrate_embedder.py [--embedder hashing|minilm]

Scores every labelled pair of ``bench/data/faq_pairs.yaml`` and picks the
threshold: the lowest similarity above every "different question" pair (no
false merge on the set), plus a safety margin of 0.05, rounded up to 0.01.
Precision is what matters: a false merge gives a customer an answer to
someone else's question, a missed merge only costs one model call.
Writes ``bench/results/embedder_calibration.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.llm.embedder import load_embedder  # noqa: E402

MARGIN = 0.05


PAIRS = ROOT / "bench" / "data" / "faq_pairs.yaml"


def load_pairs(section: str = "pairs", path: Path = PAIRS) -> list[tuple[bool, str, str]]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [(bool(same), str(a), str(b)) for same, a, b in data.get(section, [])]


def evaluate(scores: list[tuple[bool, float]], threshold: float) -> dict[str, float]:
    tp = sum(1 for same, s in scores if same and s >= threshold)
    fp = sum(1 for same, s in scores if not same and s >= threshold)
    fn = sum(1 for same, s in scores if same and s < threshold)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"threshold": threshold, "precision": round(precision, 3),
            "recall": round(recall, 3), "false_merges": fp, "merged": tp, "missed": fn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedder", default="hashing")
    args = parser.parse_args()
    embedder = load_embedder(args.embedder)
    pairs = load_pairs()
    scores: list[tuple[bool, float]] = []
    rows = []
    for same, a, b in pairs:
        va, vb = embedder.embed([a, b])
        score = embedder.similarity(va, vb)
        scores.append((same, score))
        rows.append({"same": same, "a": a, "b": b, "score": round(score, 3)})
    holdout: list[tuple[bool, float]] = []
    for same, a, b in load_pairs("holdout"):
        va, vb = embedder.embed([a, b])
        holdout.append((same, embedder.similarity(va, vb)))
    worst_negative = max(s for same, s in scores if not same)
    chosen = math.ceil((worst_negative + MARGIN) * 100) / 100
    sweep = [evaluate(scores, t / 100) for t in range(40, 100, 5)]
    result = {
        "embedder": embedder.name,
        "pairs": len(pairs),
        "positives": sum(1 for same, _ in scores if same),
        "negatives": sum(1 for same, _ in scores if not same),
        "highest_negative": round(worst_negative, 3),
        "lowest_positive": round(min(s for same, s in scores if same), 3),
        "margin": MARGIN,
        "chosen": evaluate(scores, chosen),
        "configured": evaluate(scores, embedder.threshold),
        "holdout_pairs": len(holdout),
        "holdout_at_configured": evaluate(holdout, embedder.threshold),
        "sweep": sweep,
        "hardest_negatives": sorted((r for r in rows if not r["same"]),
                                    key=lambda r: -float(r["score"]))[:5],
        "missed_positives": sorted((r for r in rows if r["same"]
                                    and float(r["score"]) < embedder.threshold),
                                   key=lambda r: float(r["score"])),
    }
    out = ROOT / "bench" / "results" / "embedder_calibration.json"
    out.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("embedder", "pairs", "highest_negative",
                                              "lowest_positive", "chosen", "configured",
                                              "holdout_at_configured")},
                     ensure_ascii=False, indent=2))
    for row in result["hardest_negatives"]:
        print("negative", row["score"], row["a"], "|", row["b"])
    for row in result["missed_positives"]:
        print("missed  ", row["score"], row["a"], "|", row["b"])


if __name__ == "__main__":
    main()
