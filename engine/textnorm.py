"""Text normalisation shared by entity extraction and the offline model.

Customers write in Chinese, English or both, often with full-width characters
(``ＨＬ２０４８１２３４``), curly quotes, typos and numbers written in Chinese
(``一百二十九``). Everything here is pure, dependency-free and fast: a customer
message is usually under 200 characters and every entity of a flow is
extracted from it on every turn.

Two kinds of normalisation exist on purpose:

* :func:`normalize` is for *comparing* text. It applies NFKC, lower-cases and
  collapses whitespace, so its output may be shorter or longer than the input.
* :func:`fold` is for *searching* text. It returns a string of exactly the same
  length as its input, so positions found in the folded text are positions in
  the original message (entity matches report ``start``/``end`` offsets).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Literal

__all__ = [
    "Language",
    "chinese_number",
    "cjk_bigrams",
    "detect_language",
    "edit_distance",
    "fold",
    "has_cjk",
    "is_cjk_char",
    "normalize",
    "stem",
    "tokens",
    "word_spans",
    "words",
]

Language = Literal["en", "zh", "mixed"]

# Han ideographs only: the basic block, extension A, the compatibility block and
# the supplementary planes (extensions B onwards). Kana and Hangul are not
# counted as Chinese on purpose: detect_language() must not call Japanese "zh".
_HAN_CLASS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_HAN_RE = re.compile(f"[{_HAN_CLASS}]")
_HAN_RUN_RE = re.compile(f"[{_HAN_CLASS}]+")
# A "word" is a run of ASCII letters and digits, plus Latin-1/Latin Extended-A/B
# letters (café, naïve), with inner apostrophes kept so "didn't" stays one word.
_WORD_CHARS = "a-z0-9\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f"
_WORD_RE = re.compile(f"[{_WORD_CHARS}]+(?:'[{_WORD_CHARS}]+)*")
_TOKEN_RE = re.compile(f"[{_WORD_CHARS}]+(?:'[{_WORD_CHARS}]+)*|[{_HAN_CLASS}]")
_SPACE_RE = re.compile(r"\s+")
_DIGIT_RE = re.compile(r"\d")


def _build_fold_table() -> dict[int, str]:
    table: dict[int, str] = {}
    # Full-width ASCII variants (U+FF01..U+FF5E) map to ASCII by a fixed offset.
    for code in range(0xFF01, 0xFF5F):
        table[code] = chr(code - 0xFEE0)
    # The full-width comma stays: in Chinese it separates list items, so
    # "3，129元" is two numbers, while "3,129" written with an ASCII comma is
    # a thousands separator. NFKC-based normalize() still folds it.
    del table[0xFF0C]
    table[0x3000] = " "  # ideographic space
    table[0xFFE5] = "¥"  # full-width yen/yuan sign
    table[0xFFE0] = "¢"
    table[0xFFE1] = "£"
    table[0xFFE6] = "₩"
    for code in (0x2018, 0x2019, 0x201B, 0x2032):  # curly single quotes, prime
        table[code] = "'"
    for code in (0x201C, 0x201D, 0x201F, 0x2033):
        table[code] = '"'
    for code in (0x2010, 0x2011, 0x2012, 0x2013, 0x2014, 0x2015, 0x2212, 0xFE63):
        table[code] = "-"  # hyphens, dashes and the minus sign
    # Control characters, odd spaces and zero-width characters become plain
    # spaces, so they split tokens instead of hiding inside them. Newlines are
    # kept because they end a clause (negation does not cross them).
    for code in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]:
        if chr(code) != "\n":
            table[code] = " "
    for code in [0xA0, *range(0x2000, 0x200E), 0x202F, 0x205F, 0x2060, 0xFEFF]:
        table[code] = " "
    table[0x2028] = "\n"
    table[0x2029] = "\n"
    return table


_FOLD_TABLE = _build_fold_table()


@lru_cache(maxsize=128)
def fold(text: str) -> str:
    """Fold ``text`` for searching, keeping its length and character positions.

    Full-width ASCII becomes ASCII (``ＨＬ２０`` → ``hl20``), curly quotes and
    dashes become ASCII, control and zero-width characters become spaces, and
    everything is lower-cased. ``len(fold(t)) == len(t)`` always holds.

    Cached: every entity of a flow folds the same customer message.
    """
    folded = text.translate(_FOLD_TABLE)
    lowered = folded.lower()
    if len(lowered) == len(folded):
        return lowered
    # A handful of characters (e.g. "İ") lower-case to two code points; keep
    # those unchanged so offsets stay aligned.
    return "".join(c if len(low := c.lower()) != 1 else low for c in folded)


def normalize(text: str) -> str:
    """Normalise ``text`` for comparison: NFKC, lower-case, single spaces, trimmed.

    NFKC folds full-width characters (``ＨＬ``, ``，``, ``１２``) and
    compatibility forms. Control characters count as whitespace.
    """
    text = unicodedata.normalize("NFKC", text.translate(_FOLD_TABLE))
    return _SPACE_RE.sub(" ", text.lower()).strip()


def is_cjk_char(char: str) -> bool:
    """True if ``char`` is a single Han ideograph."""
    return _HAN_RE.fullmatch(char) is not None


def has_cjk(text: str) -> bool:
    """True if ``text`` contains at least one Han ideograph."""
    return _HAN_RE.search(text) is not None


@lru_cache(maxsize=128)
def _word_spans(text: str) -> tuple[tuple[str, int, int], ...]:
    return tuple((m.group(), m.start(), m.end()) for m in _WORD_RE.finditer(fold(text)))


def word_spans(text: str) -> tuple[tuple[str, int, int], ...]:
    """Words of ``text`` (as :func:`words`) with their ``start``/``end`` offsets in ``text``."""
    return _word_spans(text)


def words(text: str) -> list[str]:
    """Latin-script words of ``text``: folded, lower-cased runs of letters and digits.

    Inner apostrophes are kept (``didn't``); Chinese characters are skipped.
    """
    return [w for w, _, _ in _word_spans(text)]


def cjk_bigrams(text: str) -> list[str]:
    """Overlapping character bigrams of every run of Han characters in ``text``.

    A run of a single character yields that character, so nothing is lost:
    ``"我没收到，坏"`` → ``["我没", "没收", "收到", "坏"]``.
    """
    grams: list[str] = []
    for run in _HAN_RUN_RE.findall(normalize(text)):
        if len(run) == 1:
            grams.append(run)
        else:
            grams.extend(run[i : i + 2] for i in range(len(run) - 1))
    return grams


def tokens(text: str) -> list[str]:
    """Words and single Han characters of ``text``, in order of appearance.

    ``"订单HL2048没到 yet"`` → ``["订", "单", "hl2048", "没", "到", "yet"]``.
    """
    return _TOKEN_RE.findall(fold(text))


def detect_language(text: str, default: Language = "en") -> Language:
    """Guess whether ``text`` is Chinese, English or a mix of both.

    Han characters are weighed against Latin words, one word counting as 1.5
    characters (a Chinese word is about two characters, an English one about
    five letters, and brand names in Chinese text should not flip it to mixed).
    Words containing digits (order numbers, models, prices) are ignored. The
    Chinese share decides: ``>= 0.6`` is ``"zh"``, ``<= 0.15`` is ``"en"``
    (a stray character in a long English message), anything between is
    ``"mixed"``. ``default`` is returned when there is no signal at all (only
    digits, emoji or punctuation), so callers can pass the conversation's
    current language.
    """
    han = len(_HAN_RE.findall(text))
    latin = sum(1 for w in words(text) if not _DIGIT_RE.search(w))
    if han == 0 and latin == 0:
        return default
    share = han / (han + 1.5 * latin)
    if share >= 0.6:
        return "zh"
    if share <= 0.15:
        return "en"
    return "mixed"


def edit_distance(a: str, b: str, max_distance: int | None = None) -> int:
    """Optimal-string-alignment distance between ``a`` and ``b``.

    Insertions, deletions, substitutions and swaps of two adjacent characters
    each cost 1, so both ``recieved``/``received`` and ``refnud``/``refund``
    are at distance 1. With ``max_distance``, the computation stops early and
    returns ``max_distance + 1`` for anything further apart (the usual case
    when matching a word against a vocabulary).
    """
    if a == b:
        return 0
    la, lb = len(a), len(b)
    limit = max(la, lb) if max_distance is None else max_distance
    if abs(la - lb) > limit:
        return limit + 1
    # Common prefixes and suffixes never change the distance; dropping them
    # makes the typical one-typo comparison nearly free.
    start = 0
    while start < la and start < lb and a[start] == b[start]:
        start += 1
    end_a, end_b = la, lb
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a -= 1
        end_b -= 1
    a, b = a[start:end_a], b[start:end_b]
    la, lb = len(a), len(b)
    if la == 0 or lb == 0:
        dist = max(la, lb)
        return dist if dist <= limit else limit + 1
    big = limit + 1
    prev2: list[int] = []
    prev = [j if j <= limit else big for j in range(lb + 1)]
    for i in range(1, la + 1):
        cur = [big] * (lb + 1)
        if i <= limit:
            cur[0] = i
        lo = max(1, i - limit)
        hi = min(lb, i + limit)
        ca = a[i - 1]
        row_min = cur[0]
        for j in range(lo, hi + 1):
            cb = b[j - 1]
            value = prev[j - 1] + (ca != cb)
            if prev[j] + 1 < value:
                value = prev[j] + 1
            if cur[j - 1] + 1 < value:
                value = cur[j - 1] + 1
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb and prev2[j - 2] + 1 < value:
                value = prev2[j - 2] + 1
            if value > big:
                value = big
            cur[j] = value
            if value < row_min:
                row_min = value
        if row_min > limit:
            return big
        prev2, prev = prev, cur
    result = prev[lb]
    return result if result <= limit else big


# Suffixes for the light stemmer, longest first. Each maps to its replacement.
_STEM_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("ingly", ""),
    ("edly", ""),
    ("ies", "y"),
    ("ied", "y"),
    ("ing", ""),
    ("ed", ""),
    ("es", ""),
    ("ly", ""),
    ("s", ""),
    ("e", ""),
)
_VOWELS = frozenset("aeiouy")


@lru_cache(maxsize=4096)
def stem(word: str) -> str:
    """A deliberately light English stemmer for matching, not linguistics.

    It strips one common inflection so ``arrive``, ``arrived``, ``arriving``
    and ``arrives`` all become ``arriv``, and undoubles a final consonant
    (``stopped`` → ``stop``). Words of three letters or fewer are unchanged.
    Both sides of a comparison must be stemmed the same way.
    """
    if len(word) <= 3 or not word.isascii():
        return word
    for suffix, replacement in _STEM_SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            if suffix == "s" and word.endswith(("ss", "us", "is")):
                continue  # "miss", "status", "this" are not plurals
            base = word[: len(word) - len(suffix)] + replacement
            if not any(ch in _VOWELS for ch in base):
                continue  # "bed" must not become "b"
            if (
                suffix in ("ing", "ed", "edly", "ingly")
                and len(base) >= 4
                and base[-1] == base[-2]
                and base[-1] not in "lsz"
                and base[-1] not in _VOWELS
            ):
                base = base[:-1]  # stopped -> stop, shipped -> ship
            return base
    return word


# --- Chinese numerals ---------------------------------------------------------

_CN_DIGITS: dict[str, int] = {
    "零": 0,
    "〇": 0,
    "一": 1,
    "壹": 1,
    "二": 2,
    "贰": 2,
    "貳": 2,
    "两": 2,
    "兩": 2,
    "三": 3,
    "叁": 3,
    "參": 3,
    "四": 4,
    "肆": 4,
    "五": 5,
    "伍": 5,
    "六": 6,
    "陆": 6,
    "陸": 6,
    "七": 7,
    "柒": 7,
    "八": 8,
    "捌": 8,
    "九": 9,
    "玖": 9,
}
_CN_UNITS: dict[str, int] = {"十": 10, "拾": 10, "百": 100, "佰": 100, "千": 1000, "仟": 1000}
_CN_BIG: dict[str, int] = {"万": 10_000, "萬": 10_000, "亿": 100_000_000, "億": 100_000_000}
CN_NUMERAL_CHARS = "".join([*_CN_DIGITS, *_CN_UNITS, *_CN_BIG])
_ARABIC_RUN_RE = re.compile(r"\d+")
_MAX_NUMERAL_LEN = 24  # longer runs are not numbers a customer would write


def chinese_number(text: str) -> int | None:
    """Value of a Chinese numeral, or ``None`` if ``text`` is not one.

    Handles unit forms (``十二`` 12, ``一百二十`` 120, ``一千零五`` 1005,
    ``两万`` 20000), colloquial elision (``一百二`` 120, ``三千五`` 3500,
    ``两万五`` 25000), financial characters (``壹佰贰拾``), digit-by-digit
    forms of two or more digits (``二〇二六`` 2026) and Arabic digits mixed
    with units (``3万``, ``1千2``). Surrounding whitespace is ignored; anything
    else (measure words, signs, decimals) makes it not a numeral.
    """
    text = text.strip()
    if not text or len(text) > _MAX_NUMERAL_LEN:
        return None
    if all(c in _CN_DIGITS for c in text):
        if len(text) == 1:
            return _CN_DIGITS[text]
        if "两" in text or "兩" in text:
            return None  # 两 is never read digit by digit
        return int("".join(str(_CN_DIGITS[c]) for c in text))
    total = 0  # completed 亿/万 groups
    section = 0  # value inside the current group
    digit: int | None = None  # pending digit waiting for its unit
    last_unit = 0  # last unit seen in this section (for 一百二 = 120)
    big_unit = 0  # last 万/亿 seen (for 两万五 = 25000)
    zero_seen = False  # 一百零五: a zero cancels the elision rule
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char.isdigit() and char.isascii():
            run = _ARABIC_RUN_RE.match(text, pos)
            assert run is not None
            if digit is not None:
                return None
            digit = int(run.group())
            pos = run.end()
            continue
        pos += 1
        if char in _CN_DIGITS:
            value = _CN_DIGITS[char]
            if value == 0:
                if digit is not None:
                    return None
                zero_seen = True
                continue
            if digit is not None:
                return None  # two digits in a row inside a unit form
            digit = value
        elif char in _CN_UNITS:
            unit = _CN_UNITS[char]
            if last_unit and unit >= last_unit:
                return None  # 十百, 百百: units must decrease
            if digit is None:
                if unit == 10 and section == 0 and not zero_seen:
                    digit = 1  # 十二 = 12
                else:
                    return None
            section += digit * unit
            digit = None
            last_unit = unit
            zero_seen = False
        elif char in _CN_BIG:
            unit = _CN_BIG[char]
            if digit is not None:
                section += digit
                digit = None
            if section == 0 and total == 0:
                return None
            if big_unit and unit >= big_unit and unit != 100_000_000:
                return None  # 万万
            total = (total + section) * unit if unit == 100_000_000 else total + section * unit
            section = 0
            last_unit = 0
            big_unit = unit
            zero_seen = False
        else:
            return None
    if digit is not None:
        if not zero_seen and last_unit >= 100:
            digit *= last_unit // 10  # 一百二 = 120, 三千五 = 3500
        elif not zero_seen and last_unit == 0 and big_unit and section == 0:
            digit *= big_unit // 10  # 两万五 = 25000
        section += digit
    return total + section
