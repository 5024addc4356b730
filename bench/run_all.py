"""Run every benchmark in ``bench/`` in sequence, then rebuild the README's performance table.

    python bench/run_all.py                  # every benchmark, default (full) settings: long
    python bench/run_all.py --only turns     # some of them (names as in BENCHMARKS)
    python bench/run_all.py --readme-only    # only rebuild the README table from the results

Each benchmark runs as its own subprocess (``python bench/<name>.py``, no
arguments, so with its default, full settings) and writes its results to
``bench/results/<name>.json`` and its markdown section to
``bench/results/<name>.md``. A script that does not exist (yet) is skipped with
a note; a benchmark that fails does not stop the others.

Then ``README.md`` is rewritten from the marker line ``<!-- perf-table -->`` to
the end of the file: the marker, then one table with a row per
``bench/results/*.md`` section. A section names its row itself with a line

    README row: | <what> | <result> |

(``bench/turns.py`` and ``bench/llm_layer.py`` write one); for a section without
that line the row is its first sentence and a count of the goals it marks met
or missed. Everything above the marker is left as it is.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
README = ROOT / "README.md"
MARKER = "<!-- perf-table -->"


@dataclass(frozen=True)
class Benchmark:
    name: str  # bench/<name>.py, bench/results/<name>.md
    title: str  # the README row's label when the section names none


#: In the order they run and appear in the README.
BENCHMARKS = (
    Benchmark("turns", "per-turn cost (`bench/turns.py`)"),
    Benchmark("memory", "conversation memory (`bench/memory.py`)"),
    Benchmark("llm_layer", "model layer (`bench/llm_layer.py`)"),
    Benchmark("ws_load", "web chat load (`bench/ws_load.py`)"),
)


# --------------------------------------------------------------------------- running


def run_benchmarks(names: list[str]) -> list[tuple[str, str]]:
    """Run the benchmarks one after another; (name, outcome) for each."""
    outcomes: list[tuple[str, str]] = []
    for bench in BENCHMARKS:
        if bench.name not in names:
            continue
        script = BENCH / f"{bench.name}.py"
        if not script.exists():
            note = f"skipped: {script.relative_to(ROOT)} does not exist yet"
            print(f"== {bench.name}: {note}", flush=True)
            outcomes.append((bench.name, note))
            continue
        print(f"== {bench.name}: {sys.executable} {script.relative_to(ROOT)}", flush=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, str(script)], cwd=ROOT, check=False)
        minutes = (time.perf_counter() - started) / 60
        outcome = (f"ok ({minutes:.1f} min)" if done.returncode == 0
                   else f"FAILED with exit code {done.returncode} ({minutes:.1f} min); see "
                   "its output above")
        print(f"== {bench.name}: {outcome}", flush=True)
        outcomes.append((bench.name, outcome))
    return outcomes


# --------------------------------------------------------------------------- README

_README_ROW = re.compile(r"^README row:\s*(\|.*\|)\s*$", re.MULTILINE)
_MEASURED = re.compile(r"\bMeasured (\d{4}-\d{2}-\d{2})")


def _cells(row: str) -> list[str]:
    """The cells of a markdown table row (``| a | b |``)."""
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def _first_sentence(text: str) -> str:
    """The first sentence of the section's first paragraph (headings skipped), unless
    that paragraph only describes the machine ("Measured <date> on ...")."""
    for block in re.split(r"\n\s*\n", text):
        block = " ".join(block.split())
        if not block or block.startswith("#"):
            continue
        if block.startswith(("|", "- ", "README row:", "Measured ")):
            return ""
        match = re.match(r"(.+?[.;:])(\s|$)", block)
        return (match.group(1) if match else block).rstrip(".;:")
    return ""


def _goal_counts(text: str) -> tuple[int, int]:
    """Cells of the section's tables that mark a goal met or missed."""
    met = missed = 0
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        for cell in _cells(line):
            if "**missed**" in cell:
                missed += 1
            elif re.search(r"(^|:\s*)met$", cell):
                met += 1
    return met, missed


def readme_row(name: str, title: str, text: str) -> tuple[str, str, str]:
    """(label, result, measured) of one results section."""
    measured_match = _MEASURED.search(text)
    measured = measured_match.group(1) if measured_match else "-"
    match = _README_ROW.search(text)
    if match:
        cells = _cells(match.group(1))
        if len(cells) >= 2:
            return cells[0], "; ".join(c for c in cells[1:] if c), measured
    met, missed = _goal_counts(text)
    parts = [_first_sentence(text)]
    if met or missed:
        parts.append(f"goals: {met} met, {missed} **missed**" if missed
                     else f"goals: {met} met")
    result = "; ".join(p for p in parts if p) or "see the results file"
    return title, result, measured


def perf_table(results: Path = RESULTS) -> str:
    """The README's table: a row per ``results/*.md``, known benchmarks first."""
    known = {b.name: b for b in BENCHMARKS}
    files = sorted(results.glob("*.md"),
                   key=lambda p: ([b.name for b in BENCHMARKS].index(p.stem)
                                  if p.stem in known else len(known), p.stem))
    lines = [
        "| Benchmark | Result | Measured | Details |",
        "|---|---|---|---|",
    ]
    for path in files:
        bench = known.get(path.stem)
        title = bench.title if bench else f"`{path.stem}`"
        label, result, measured = readme_row(path.stem, title,
                                             path.read_text(encoding="utf-8"))
        link = path.relative_to(ROOT).as_posix()
        lines.append(f"| {label} | {result} | {measured} | [{path.name}]({link}) |")
    if len(lines) == 2:
        lines.append("| - | no results yet: run `make bench` | - | - |")
    missing = [b.name for b in BENCHMARKS if not (results / f"{b.name}.md").exists()]
    if missing:
        lines += ["", "Not measured yet: " + ", ".join(f"`bench/{m}.py`" for m in missing)
                  + "."]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path = README, results: Path = RESULTS) -> bool:
    """Replace everything from the marker line to the end; whether the file changed."""
    text = readme.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if line.strip() == MARKER), None)
    if at is None:
        raise SystemExit(f"{readme}: no line {MARKER!r} to put the performance table after")
    new = "".join(lines[:at]) + MARKER + "\n\n" + perf_table(results)
    if new == text:
        return False
    readme.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--readme-only", action="store_true",
                        help="only rebuild the README table from bench/results/*.md")
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS],
                        help="run only these benchmarks (the README table is rebuilt anyway)")
    args = parser.parse_args(argv)
    outcomes: list[tuple[str, str]] = []
    if not args.readme_only:
        outcomes = run_benchmarks(args.only or [b.name for b in BENCHMARKS])
    changed = update_readme()
    print(f"{README.relative_to(ROOT)}: performance table "
          f"{'rewritten' if changed else 'unchanged'}")
    if outcomes:
        print("\nSummary:")
        for name, outcome in outcomes:
            print(f"  {name:<10} {outcome}")
    return 1 if any(o.startswith("FAILED") for _, o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
