"""Reading YAML while remembering where every key and value came from.

ruamel.yaml (YAML 1.2) is used instead of PyYAML because YAML 1.1 reads the
key ``on:`` as the boolean ``True`` and ``yes``/``no`` as booleans, which
would silently break flow files; ruamel also keeps line and column marks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError

from engine.errors import Problem

__all__ = ["Located", "load_located"]

Path_ = tuple[str | int, ...]

#: Flow files are small; a huge file is a mistake or an attack on the loader.
MAX_FLOW_BYTES = 1_000_000
#: The line breaks YAML counts (so ``lines`` agrees with ruamel's line numbers).
_LINE_BREAK = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")


@dataclass
class Located:
    """Plain data (dicts, lists, scalars) plus a location for every path in it."""

    file: str
    data: Any
    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    #: The source text, one entry per line.
    lines: list[str] = field(default_factory=list)

    def where(self, path: Path_, *, key: bool = False) -> tuple[int | None, int | None]:
        """1-based (line, column) of ``path``, or of its nearest located ancestor."""
        table = self.keys if key else self.values
        probe = self._as_written(path)
        while probe:
            if probe in table:
                return table[probe]
            if not key and probe in self.keys:
                return self.keys[probe]
            probe = probe[:-1]
        return (1, 1)

    def _as_written(self, path: Path_) -> Path_:
        """``path`` as the file spells it.

        The schema reads the shorthands ``done: x`` and ``done: {to: x}`` as one-item
        lists, so its paths say ``done.0.to``; in the file there is no index ``0``.
        """
        out: list[str | int] = []
        node = self.data
        for part in path:
            if part == 0 and isinstance(node, dict | str):
                continue  # a shorthand for a one-item list
            out.append(part)
            if isinstance(node, dict) and isinstance(part, str):
                node = node.get(part)
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                node = None
        return tuple(out)

    def scalar_start(self, path: Path_) -> tuple[int | None, int | None]:
        """1-based (line, column) of the first character of the text of the scalar at ``path``.

        That is after an opening quote, or on the first content line of a ``|``/``>``
        block scalar; positions inside the text (a guard's error column, a template's
        error line) are counted from here.
        """
        line, col = self.where(path)
        if line is None or col is None or not 0 < line <= len(self.lines):
            return line, col
        char = self.lines[line - 1][col - 1:col]
        if char in ("'", '"'):
            return line, col + 1
        if char in ("|", ">"):
            for number in range(line + 1, len(self.lines) + 1):
                content = self.lines[number - 1]
                if content.strip():
                    return number, len(content) - len(content.lstrip()) + 1
        return line, col

    def problem(self, path: Path_, message: str, hint: str = "", *, key: bool = False,
                severity: str = "error") -> Problem:
        line, column = self.where(path, key=key)
        return Problem(self.file, line, column, message, hint, severity)


def _plain(node: Any, path: Path_, out: Located) -> Any:
    if isinstance(node, CommentedMap):
        result: dict[str, Any] = {}
        for k, v in node.items():
            child = (*path, str(k))
            kl, kc = node.lc.key(k)
            out.keys[child] = (kl + 1, kc + 1)
            vl, vc = node.lc.value(k)
            out.values[child] = (vl + 1, vc + 1)
            result[str(k)] = _plain(v, child, out)
        return result
    if isinstance(node, CommentedSeq):
        items: list[Any] = []
        for i, v in enumerate(node):
            child = (*path, i)
            il, ic = node.lc.item(i)
            out.values[child] = (il + 1, ic + 1)
            items.append(_plain(v, child, out))
        return items
    if isinstance(node, str):
        return str(node)  # drop ruamel's scalar string subclasses
    return node


def load_located(path: Path) -> tuple[Located | None, list[Problem]]:
    """Parse one YAML file. Returns the located data or the problems that stopped it."""
    name = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, [Problem(name, None, None, f"cannot read file: {exc.strerror}",
                              "check the path and the file's permissions")]
    if len(raw) > MAX_FLOW_BYTES:
        return None, [Problem(name, None, None, f"file is {len(raw)} bytes; the limit is "
                              f"{MAX_FLOW_BYTES}", "split the flow into smaller flows")]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[:exc.start]
        bad_line = before.count(b"\n") + 1
        bad_col = len(before) - (before.rfind(b"\n") + 1) + 1  # in bytes
        return None, [Problem(name, bad_line, bad_col, f"not UTF-8 text (byte {exc.start})",
                              "save the file as UTF-8")]
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        doc = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        hint = "check indentation, quotes and colons on this line"
        if isinstance(exc, DuplicateKeyError):
            hint = "every key may appear only once in a mapping; remove or rename one"
        elif exc.context_mark and exc.problem and "end of stream" in exc.problem:
            # An unclosed quote or bracket: where it was opened, not the end of the file.
            mark = exc.context_mark
            hint = "close the quote or bracket opened here"
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        return None, [Problem(name, line, col, f"invalid YAML: {what}", hint)]
    except Exception as exc:  # ruamel raises several non-marked errors (e.g. duplicate keys)
        return None, [Problem(name, None, None, f"invalid YAML: {exc}",
                              "check the file's YAML syntax")]
    if not isinstance(doc, CommentedMap):
        return None, [Problem(name, 1, 1, "a flow file must be a mapping at the top level",
                              "start the file with `flow: <name>`")]
    located = Located(name, None, lines=_LINE_BREAK.split(text))
    located.data = _plain(doc, (), located)
    return located, []
