"""Typed entities: the values a flow collects from a customer.

A flow file declares entities by name with a ``type:`` and type-specific
options, for example::

    entities:
      order_id:
        type: string
        pattern: "HL\\d{8}"
        normalize: upper
        description: order number
        examples: [HL20481234]
      reason:
        type: enum
        values:
          damaged:
            synonyms: [damaged, broken, 坏了, 破损]
            label: {en: Damaged item, zh: 商品破损}

The flow loader owns ``type`` and the conversational keys (``ask``,
``reprompt``, ``pin``, ``max_attempts``, and whatever else its own schema
declares, such as ``description``); it passes everything else to
:meth:`EntityType.from_options` of the class registered under that type name in
:data:`ENTITY_TYPES` (or calls :func:`build_entity`). Errors in those options
raise :class:`EntityOptionError`, a ``ValueError`` naming the option.

Every entity type offers:

* :meth:`EntityType.parse` validates and normalises one proposed value (from
  the model's tool call or typed by the customer) and returns its canonical,
  JSON-compatible form, or raises :class:`~engine.errors.EntityValueError`
  whose reason says what was expected.
* :meth:`EntityType.extract` finds candidate values in free customer text and
  returns :class:`Match` objects with offsets into that text and a confidence.
  The offline model relies on it, so it copes with Chinese, English and mixed
  phrasing, full-width characters, typos and Chinese numerals.
* :meth:`EntityType.json_schema` describes the canonical value for the model's
  tool schema; :meth:`EntityType.describe` is a short text for prompts.

Canonical values:

=========  =========================================================
type       canonical value
=========  =========================================================
string     ``str`` (after ``normalize``)
integer    ``int``
money      ``{"amount": "129.00", "currency": "CNY"}`` (amount is a
           string with exactly two decimals, never a float)
date       ``"YYYY-MM-DD"``
enum       the canonical key, e.g. ``"damaged"``
email      ``str``, domain lower-cased
phone      E.164 ``str``, e.g. ``"+8613812345678"``
=========  =========================================================
"""

from __future__ import annotations

import abc
import bisect
import calendar
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Literal, Self, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from engine import textnorm
from engine.errors import EntityValueError
from engine.textnorm import CN_NUMERAL_CHARS, chinese_number, edit_distance, fold, normalize, stem

__all__ = [
    "ENTITY_TYPES",
    "DateEntity",
    "EmailEntity",
    "EntityOptionError",
    "EntityOptions",
    "EntityType",
    "EnumEntity",
    "IntegerEntity",
    "JSONValue",
    "Match",
    "MoneyEntity",
    "PhoneEntity",
    "StringEntity",
    "build_entity",
]

JSONValue: TypeAlias = "str | int | float | bool | list[JSONValue] | dict[str, JSONValue] | None"

# Values end up in prompts, logs and guards; nothing a customer legitimately
# types for one entity is longer than this.
MAX_VALUE_LENGTH = 1000
# Control characters other than whitespace are never part of a value.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Trailing punctuation customers add to a bare value ("HL20481234。", "yes!").
_EDGE_PUNCT = " \t\r\n.,;:!?。，、；：！？…~～\"'`[]【】<>《》「」"


# --- errors and results ---------------------------------------------------------


class EntityOptionError(ValueError):
    """An entity's options in a flow file are invalid.

    ``option`` is the dotted path of the offending option inside the entity
    (``"pattern"``, ``"values.damaged.label.zh"``) or ``None`` when the problem
    is not tied to one option; the loader uses it to point at the YAML line.
    """

    def __init__(self, entity: str, type_name: str, option: str | None, message: str) -> None:
        self.entity = entity
        self.type_name = type_name
        self.option = option
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" option {self.option!r}:" if self.option else ""
        return f"entity {self.entity!r} (type {self.type_name}):{where} {self.message}"


@dataclass(frozen=True, slots=True)
class Match:
    """A candidate value found in customer text.

    ``start``/``end`` are offsets into the text given to ``extract`` (so
    ``text[start:end]`` is what the customer wrote) and ``confidence`` is in
    ``0..1``: about 0.9 for an unambiguous, exactly written value, lower for
    fuzzy matches and values without context (a bare number).
    """

    value: JSONValue
    start: int
    end: int
    confidence: float


# --- options ---------------------------------------------------------------------


class EntityOptions(BaseModel):
    """Options every entity type accepts.

    ``description``: what the value is, in a few words, for prompts and error
    hints ("order number"). ``examples``: sample values; each one must parse
    under the entity's own rules, which catches a wrong ``pattern`` when the
    flow is loaded rather than when a customer is talking.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str | None = Field(default=None, min_length=1, max_length=200)
    examples: tuple[str | int | float, ...] = ()


def _format_validation_error(
    entity: str, type_name: str, fields: Iterable[str], error: ValidationError
) -> EntityOptionError:
    """Turn pydantic's error into one EntityOptionError naming the first bad option."""
    details = error.errors(include_url=False)
    first = details[0]
    option = ".".join(str(p) for p in first["loc"]) or None
    message = str(first["msg"])
    if first["type"] == "extra_forbidden" and len(first["loc"]) == 1:
        unknown = str(first["loc"][0])
        known = sorted(fields)
        message = f"unknown option {unknown!r}; known options: {', '.join(known)}"
        close = _closest(unknown, known)
        if close:
            message += f" (did you mean {close!r}?)"
    elif first["type"] == "extra_forbidden":
        message = f"unknown key {first['loc'][-1]!r}"
    elif first["type"] == "missing":
        message = "this option is required"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if len(details) > 1:
        message += f" (and {len(details) - 1} more problem(s) in this entity)"
    return EntityOptionError(entity, type_name, option, message)


def _closest(word: str, candidates: Iterable[str], max_distance: int = 2) -> str | None:
    best: tuple[int, str] | None = None
    for cand in candidates:
        dist = edit_distance(word.lower(), cand.lower(), max_distance)
        if dist <= max_distance and (best is None or dist < best[0]):
            best = (dist, cand)
    return best[1] if best else None


# --- shared helpers -----------------------------------------------------------------


def _clean_text_value(entity: str, value: object, *, allow_int: bool = False) -> str:
    """Common first step of parse() for text-like types: check type, NFKC, trim."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise EntityValueError(entity, value, f"expected text, got {type(value).__name__}")
    if isinstance(value, int):
        if not allow_int:
            raise EntityValueError(entity, value, "expected text, got a number")
        value = str(value)
    if len(value) > MAX_VALUE_LENGTH:
        raise EntityValueError(
            entity, value, f"is {len(value)} characters long; at most {MAX_VALUE_LENGTH} allowed"
        )
    if _CONTROL_RE.search(value):
        raise EntityValueError(entity, value, "contains control characters")
    text = normalize(value).strip(_EDGE_PUNCT)
    if not text:
        raise EntityValueError(entity, value, "is empty")
    return text


def _resolve_overlaps(matches: Iterable[Match]) -> list[Match]:
    """Keep the best of overlapping matches (longest, then most confident), in text order."""
    ranked = sorted(matches, key=lambda m: (-(m.end - m.start), -m.confidence, m.start))
    starts: list[int] = []
    kept: list[Match] = []
    for match in ranked:
        i = bisect.bisect_right(starts, match.start)
        if i > 0 and kept[i - 1].end > match.start:
            continue
        if i < len(kept) and kept[i].start < match.end:
            continue
        starts.insert(i, match.start)
        kept.insert(i, match)
    return kept


def _whole_message(text: str, start: int, end: int, filler: str = "") -> bool:
    """True if text outside [start, end) is only whitespace, punctuation or ``filler`` chars."""
    strip = _EDGE_PUNCT + filler
    return not text[:start].strip(strip) and not text[end:].strip(strip)


# --- base class ---------------------------------------------------------------------


class EntityType(abc.ABC):
    """Base of every entity type.

    Subclasses set ``type_name`` (the YAML ``type:``) and ``Options`` (a
    pydantic model deriving from :class:`EntityOptions`, ``extra="forbid"``),
    and implement :meth:`parse`, :meth:`extract`, :meth:`json_schema` and
    :meth:`_detail`. Instances are immutable after construction and safe to
    share between conversations and threads (caches only memoise pure results).
    """

    type_name: ClassVar[str]
    Options: ClassVar[type[EntityOptions]] = EntityOptions

    name: str
    options: EntityOptions

    def __init__(self, name: str, options: EntityOptions) -> None:
        if not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} needs {self.Options.__name__} options")
        self.name = name
        self.options = options

    @classmethod
    def from_options(cls, name: str, options: Mapping[str, object]) -> Self:
        """Build the entity ``name`` from its type-specific options (as read from YAML).

        Raises :class:`EntityOptionError` (a ``ValueError``) naming the option
        that is wrong, including unknown options and examples that do not parse.
        """
        try:
            model = cls.Options.model_validate(dict(options))
        except ValidationError as exc:
            raise _format_validation_error(
                name, cls.type_name, cls.Options.model_fields, exc
            ) from None
        try:
            entity = cls(name, model)
        except ValueError as exc:
            if isinstance(exc, EntityOptionError):
                raise
            raise EntityOptionError(name, cls.type_name, None, str(exc)) from None
        for index, example in enumerate(model.examples):
            try:
                entity.parse(example)
            except EntityValueError as exc:
                raise EntityOptionError(
                    name,
                    cls.type_name,
                    f"examples.{index}",
                    f"example does not parse: {exc.reason}",
                ) from None
        return entity

    @abc.abstractmethod
    def parse(self, value: object, *, today: date | None = None) -> JSONValue:
        """Validate ``value`` and return its canonical form, or raise EntityValueError.

        ``today`` only matters for dates (relative dates, bounds); every type
        accepts it so callers can treat entities uniformly.
        """

    @abc.abstractmethod
    def extract(self, text: str, *, today: date | None = None) -> list[Match]:
        """Candidate values in free ``text``, ordered by position. Never raises on any str."""

    @abc.abstractmethod
    def json_schema(self) -> dict[str, JSONValue]:
        """JSON-schema fragment for the canonical value (for the model's tool schema)."""

    @abc.abstractmethod
    def _detail(self) -> str:
        """Type-specific part of describe(), e.g. "a whole number from 1 to 10"."""

    def describe(self) -> str:
        """Short human text for prompts, e.g. ``"order number like HL20481234"``."""
        detail = self._detail()
        head = self.options.description
        text = f"{head}: {detail}" if head else detail
        if self.options.examples:
            text += f", like {self.options.examples[0]}"
        return text

    def _schema(self, fragment: dict[str, JSONValue]) -> dict[str, JSONValue]:
        fragment["description"] = self.describe()
        return fragment

    def _error(self, value: object, reason: str) -> EntityValueError:
        return EntityValueError(self.name, value, reason)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# --- string -----------------------------------------------------------------------


class StringOptions(EntityOptions):
    """Options of ``type: string``.

    ``pattern``: a Python regular expression the whole value must match
    (implicitly anchored). Required for extraction from free text; checked to
    compile when the flow loads. ``normalize``: ``upper`` / ``lower`` change
    the case of the value (and make the pattern case-insensitive), ``none``
    keeps it. ``min_length`` / ``max_length``: bounds on the normalised value.
    ``allow_separators``: accept the value typed with spaces or dashes inside
    (``HL 2048-1234``); they are removed before matching.
    """

    pattern: str | None = Field(default=None, min_length=1)
    normalize: Literal["upper", "lower", "none"] = "none"
    min_length: int | None = Field(default=None, ge=0)
    max_length: int | None = Field(default=None, ge=1, le=MAX_VALUE_LENGTH)
    allow_separators: bool = False

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            compiled = re.compile(value)
        except re.error as exc:
            where = f" at position {exc.pos}" if exc.pos is not None else ""
            raise ValueError(f"regular expression does not compile{where}: {exc.msg}") from None
        if compiled.fullmatch(""):
            raise ValueError("regular expression matches the empty string; make it require text")
        flags, body = _split_pattern(value)
        try:
            re.compile(f"{flags}(?<![A-Za-z0-9])(?:{body})(?![A-Za-z0-9])")
        except re.error as exc:
            raise ValueError(f"regular expression cannot be searched for: {exc.msg}") from None
        return value

    @model_validator(mode="after")
    def _lengths_ordered(self) -> StringOptions:
        if (
            self.min_length is not None
            and self.max_length is not None
            and self.min_length > self.max_length
        ):
            raise ValueError(f"min_length {self.min_length} is above max_length {self.max_length}")
        return self


_GLOBAL_FLAGS_RE = re.compile(r"\(\?[aiLmsux]+\)")


def _split_pattern(pattern: str) -> tuple[str, str]:
    """Split a pattern into leading global flags and a body without outer anchors.

    Flow authors often write ``^HL\\d{8}$``; the value must match whole anyway,
    and anchors would stop the pattern from being found inside a message.
    Global flags such as ``(?i)`` must stay at the very start once wrapped.
    """
    flags = ""
    while m := _GLOBAL_FLAGS_RE.match(pattern):
        flags += m.group()
        pattern = pattern[m.end() :]
    if pattern.startswith("^"):
        pattern = pattern[1:]
    elif pattern.startswith("\\A"):
        pattern = pattern[2:]
    if pattern.endswith("\\Z") and not pattern.endswith("\\\\Z"):
        pattern = pattern[:-2]
    elif pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1]
    return flags, pattern


# Separators tolerated inside a value when allow_separators is on.
_SEPARATORS_RE = re.compile(r"[\s\-_.·]+")
# A chain of ASCII-alphanumeric runs joined by single separators: "HL 2048-1234".
# Possessive runs and the lookbehind keep this linear on long unbroken digit strings.
_ALNUM_CHAIN_RE = re.compile(r"(?<![a-z0-9])[a-z0-9]++(?:(?: ?- ?| {1,2})[a-z0-9]++)+")
_ALNUM_RUN_RE = re.compile(r"[a-z0-9]+")
_MAX_CHAIN_RUNS = 8


class StringEntity(EntityType):
    """``type: string``: text, usually constrained by a ``pattern`` (order numbers, models)."""

    type_name = "string"
    Options = StringOptions
    options: StringOptions

    def __init__(self, name: str, options: EntityOptions) -> None:
        super().__init__(name, options)
        flags = re.IGNORECASE if self.options.normalize != "none" else 0
        pattern = self.options.pattern
        self._full: re.Pattern[str] | None = None
        self._search: re.Pattern[str] | None = None
        self._loose: re.Pattern[str] | None = None
        if pattern is not None:
            self._full = re.compile(pattern, flags)
            # \b does not separate CJK from Latin (both are \w), so "订单HL2048"
            # would never match; ASCII-alphanumeric lookarounds do. Extraction
            # runs on folded (lower-cased) text, hence IGNORECASE there always;
            # parse() re-checks the case-sensitive pattern on the original.
            flags_prefix, body = _split_pattern(pattern)
            self._search = re.compile(
                f"{flags_prefix}(?<![A-Za-z0-9])(?:{body})(?![A-Za-z0-9])", re.IGNORECASE
            )
            self._loose = re.compile(f"{flags_prefix}(?:{body})", re.IGNORECASE)

    def _normalise(self, text: str) -> str:
        if self.options.normalize == "upper":
            return text.upper()
        if self.options.normalize == "lower":
            return text.lower()
        return text

    def _check(self, original: object, text: str) -> str:
        """Apply case, length and pattern rules to an already-trimmed value."""
        if (
            self.options.allow_separators
            and self._full is not None
            and not self._full.fullmatch(text)
        ):
            joined = _SEPARATORS_RE.sub("", text)
            if joined:
                text = joined
        text = self._normalise(text)
        opts = self.options
        if opts.min_length is not None and len(text) < opts.min_length:
            raise self._error(
                original, f"is {len(text)} characters; at least {opts.min_length} needed"
            )
        if opts.max_length is not None and len(text) > opts.max_length:
            raise self._error(
                original, f"is {len(text)} characters; at most {opts.max_length} allowed"
            )
        if self._full is not None and not self._full.fullmatch(text):
            raise self._error(original, f"expected {self.describe()}")
        return text

    def parse(self, value: object, *, today: date | None = None) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self._error(value, f"expected text, got {type(value).__name__}")
        raw = str(value)
        if len(raw) > MAX_VALUE_LENGTH:
            raise self._error(
                value, f"is {len(raw)} characters long; at most {MAX_VALUE_LENGTH} allowed"
            )
        if _CONTROL_RE.search(raw):
            raise self._error(value, "contains control characters")
        # NFKC folds full-width characters but keeps case: case is the
        # normalize option's business, not ours.
        text = " ".join(unicodedata.normalize("NFKC", raw).split()).strip(_EDGE_PUNCT)
        if not text:
            raise self._error(value, "is empty")
        return self._check(value, text)

    def extract(self, text: str, *, today: date | None = None) -> list[Match]:
        if self._search is None or not text:
            return []
        if len(text) <= MAX_VALUE_LENGTH:
            # The whole message is the value (the answer to "what's your order
            # number?", or a free-text pattern such as an address).
            whole = self._accept(text)
            if whole is not None:
                start = len(text) - len(text.lstrip(_EDGE_PUNCT))
                end = len(text.rstrip(_EDGE_PUNCT))
                return [Match(whole, start, max(start, end), 1.0)]
        folded = fold(text)
        found: list[Match] = []
        for m in self._search.finditer(folded):
            if m.end() == m.start():
                continue
            value = self._accept(text[m.start() : m.end()])
            if value is not None:
                found.append(Match(value, m.start(), m.end(), 0.95))
        if self.options.allow_separators:
            found.extend(self._extract_separated(text, folded))
            return _resolve_overlaps(found)
        return found

    def _accept(self, surface: str) -> str | None:
        try:
            return self.parse(surface)
        except EntityValueError:
            return None

    def _extract_separated(self, text: str, folded: str) -> Iterable[Match]:
        """Values typed with separators inside ("HL 2048-1234", "138 1234 5678").

        Each chain of alphanumeric runs is searched with its separators
        removed; a candidate must start and end on run boundaries. The pattern
        is only tried where it can start, so ordinary English sentences (long
        chains of words) cost one failed match per word.
        """
        assert self._loose is not None
        for chain in _ALNUM_CHAIN_RE.finditer(folded):
            runs = [r.span() for r in _ALNUM_RUN_RE.finditer(folded, chain.start(), chain.end())]
            compressed = "".join(folded[a:b] for a, b in runs)
            offsets: list[int] = []
            ends: list[int] = []
            pos = 0
            for a, b in runs:
                offsets.append(pos)
                pos += b - a
                ends.append(pos)
            for i, offset in enumerate(offsets):
                if self._loose.match(compressed, offset) is None:
                    continue
                # Longest join first: "HL 2048 1234" beats "HL 2048".
                for j in range(min(len(runs), i + _MAX_CHAIN_RUNS) - 1, i, -1):
                    if not self._loose.fullmatch(compressed, offset, ends[j]):
                        continue
                    start, end = runs[i][0], runs[j][1]
                    value = self._accept(text[start:end])
                    if value is not None:
                        yield Match(value, start, end, 0.85)
                        break

    def json_schema(self) -> dict[str, JSONValue]:
        # No "pattern": Python regex syntax is not ECMA-262 and the model may
        # return another case or separators that parse() normalises anyway.
        fragment: dict[str, JSONValue] = {"type": "string"}
        if self.options.min_length is not None:
            fragment["minLength"] = self.options.min_length
        fragment["maxLength"] = self.options.max_length or MAX_VALUE_LENGTH
        return self._schema(fragment)

    def _detail(self) -> str:
        return "text" if self._full is None else "text in a fixed format"

    def describe(self) -> str:
        head = self.options.description or self._detail()
        if self.options.examples:
            return f"{head} like {self.options.examples[0]}"
        if self.options.pattern is not None:
            return f"{head} matching /{self.options.pattern}/"
        return head


# --- numbers shared by integer and money ------------------------------------------------

_EN_NUMBERS: dict[str, int] = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
    "a dozen": 12,
    "dozen": 12,
    "a couple": 2,
    "a couple of": 2,
    "a pair of": 2,
}
_EN_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_EN_UNITS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_EN_NUMBER_ALT = (
    rf"(?:{'|'.join(_EN_TENS)})(?:[- ](?:{'|'.join(_EN_UNITS)}))?"
    rf"|{'|'.join(sorted((k for k in _EN_NUMBERS if k not in _EN_TENS), key=len, reverse=True))}"
)


def _english_number(words: str) -> int | None:
    words = " ".join(words.replace("-", " ").split())
    if words in _EN_NUMBERS:
        return _EN_NUMBERS[words]
    parts = words.split(" ")
    if len(parts) == 2 and parts[0] in _EN_TENS and parts[1] in _EN_UNITS:
        return _EN_NUMBERS[parts[0]] + _EN_NUMBERS[parts[1]]
    return None


_CN_NUM_CLASS = f"[{CN_NUMERAL_CHARS}]"
# Measure words (classifiers) and English count units that follow a quantity.
_MEASURE_WORDS = (
    "个|件|台|只|条|双|套|把|瓶|盒|箱|包|张|本|部|份|支|副|对|位|人|单|笔|次|批|袋|罐|顶"
    "|块儿|款|样"
)
_EN_COUNT_UNITS = frozenset(
    {"x", "pcs", "pc", "piece", "pieces", "unit", "units", "item", "items", "times", "qty"}
)
_MEASURE_RE = re.compile(rf"\s*(?:{_MEASURE_WORDS})")
# After a number, these mean it is not a quantity: dates, times, durations, money,
# percentages, discounts, and digit groups of phone numbers or codes ("139-1234").
_NOT_QUANTITY_AFTER_RE = re.compile(
    r"\s*(?:年|月|日|号|號|点|點|时|時|分|秒|天|周|小时|个月|个小时|个星期|个礼拜|星期|礼拜"
    r"|%|折|成|元|块(?!儿)|毛|角|刀|岁|星|[:/\-][0-9]|[.,][0-9]|"
    r"(?:yuan|kuai|rmb|cny|usd|dollars?|bucks?|euros?|pounds?|am|pm|st|nd|rd|th"
    r"|days?|weeks?|months?|years?|hours?|hrs?|minutes?|mins?|ago)(?![a-z]))"
)
_NOT_QUANTITY_BEFORE_RE = re.compile(
    r"(?:[¥$€£₩/:+]|[0-9]-|第|周|星期|礼拜|每|(?<![a-z])(?:rmb|cny|usd|no\.?|#))\s*$"
)
# Chinese words that contain numeral characters without being numbers.
_CN_NON_NUMBERS = frozenset({"千万", "万一", "一一", "十分", "一二", "三三", "两两"})


# --- integer ---------------------------------------------------------------------------


class IntegerOptions(EntityOptions):
    """Options of ``type: integer``: ``min`` and ``max`` are inclusive bounds."""

    min: int | None = None
    max: int | None = None

    @model_validator(mode="after")
    def _bounds_ordered(self) -> IntegerOptions:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


_INT_PARSE_RE = re.compile(
    rf"(?:x\s*)?(?P<sign>[-+])?\s*(?:(?P<arabic>\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.0+)?"
    rf"|(?P<cn>{_CN_NUM_CLASS}+)|(?P<en>{_EN_NUMBER_ALT}))"
    rf"\s*(?:{_MEASURE_WORDS}|x|pcs|pc|pieces?|units?|items?|times)?"
)
_INT_EXTRACT_RE = re.compile(
    rf"(?P<arabic>(?<![0-9.,])(?:\d{{1,3}}(?:,\d{{3}})+|\d++)(?![0-9]))|(?P<cn>{_CN_NUM_CLASS}++)"
)
# English number words found in text (word by word, cheaper than a regex alternation).
_EN_EXTRACT_WORDS = frozenset(
    k for k in _EN_NUMBERS if " " not in k and k not in ("zero", "hundred")
)
_MAX_INT_DIGITS = 15  # longer digit runs are ids, never quantities
_TAIL_WORD_RE = re.compile(r"\s?([a-z]+)")


class IntegerEntity(EntityType):
    """``type: integer``: whole numbers, e.g. a quantity. Reads 3, ３, 三, 两个, three."""

    type_name = "integer"
    Options = IntegerOptions
    options: IntegerOptions

    def _bounds_reason(self, number: int) -> str | None:
        lo, hi = self.options.min, self.options.max
        if lo is not None and number < lo:
            return f"must be at least {lo}"
        if hi is not None and number > hi:
            return f"must be at most {hi}"
        return None

    def parse(self, value: object, *, today: date | None = None) -> int:
        number: int
        if isinstance(value, bool):
            raise self._error(value, "expected a whole number, got a yes/no value")
        if isinstance(value, int):
            number = value
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise self._error(value, "expected a whole number, got a non-finite number")
            if not value.is_integer():
                raise self._error(value, f"{value:g} is not a whole number")
            number = int(value)
        elif isinstance(value, str):
            number = self._parse_text(value)
        else:
            raise self._error(value, f"expected a whole number, got {type(value).__name__}")
        reason = self._bounds_reason(number)
        if reason:
            raise self._error(value, reason)
        return number

    def _parse_text(self, value: str) -> int:
        text = _clean_text_value(self.name, value)
        m = _INT_PARSE_RE.fullmatch(text)
        if m is None:
            if re.fullmatch(r"[-+]?\d+\.\d+", text):
                raise self._error(value, f"{text} is not a whole number")
            raise self._error(value, "expected a whole number such as 3, 三 or three")
        number = self._number_of(m)
        if number is None:
            if m.group("arabic") is not None:
                raise self._error(value, "is too large")
            raise self._error(value, "expected a whole number such as 3, 三 or three")
        return -number if m.group("sign") == "-" else number

    @staticmethod
    def _number_of(m: re.Match[str]) -> int | None:
        if m.group("arabic") is not None:
            digits = m.group("arabic").replace(",", "")
            return int(digits) if len(digits) <= _MAX_INT_DIGITS else None
        if m.group("cn") is not None:
            return chinese_number(m.group("cn"))
        return _english_number(m.group("en"))

    def extract(self, text: str, *, today: date | None = None) -> list[Match]:
        folded = fold(text)
        found: list[Match] = []
        for m in _INT_EXTRACT_RE.finditer(folded):
            start, end = m.span()
            kind = "arabic" if m.group("arabic") is not None else "cn"
            conf = self._confidence(folded, kind, m.group(), start, end)
            if conf is None:
                continue
            number = self._number_of(m)
            if number is None or self._bounds_reason(number):
                continue
            found.append(Match(number, start, end, conf))
        found.extend(self._extract_words(text, folded))
        found.sort(key=lambda match: match.start)
        return found

    def _extract_words(self, text: str, folded: str) -> Iterable[Match]:
        """English number words: "three", "twenty-one", "a dozen"."""
        spans = textnorm.word_spans(text)
        skip_until = -1
        for index, (word, start, end) in enumerate(spans):
            if word not in _EN_EXTRACT_WORDS or start < skip_until:
                continue
            number = _EN_NUMBERS[word]
            if word in _EN_TENS and index + 1 < len(spans):
                unit, unit_start, unit_end = spans[index + 1]
                if unit in _EN_UNITS and folded[end:unit_start] in ("-", " "):
                    number += _EN_NUMBERS[unit]
                    end = unit_end
                    skip_until = unit_end
            if word == "dozen" and index > 0 and spans[index - 1][0] == "a":
                start = spans[index - 1][1]
            conf = self._confidence(folded, "en", word, start, end)
            if conf is None or self._bounds_reason(number):
                continue
            yield Match(number, start, end, conf)

    def _confidence(
        self, folded: str, kind: str, surface: str, start: int, end: int
    ) -> float | None:
        """How likely this number is a quantity, or None to skip it."""
        after = folded[end : end + 12]
        before = folded[max(0, start - 8) : start]
        if _NOT_QUANTITY_AFTER_RE.match(after) or _NOT_QUANTITY_BEFORE_RE.search(before):
            return None
        measured = bool(_MEASURE_RE.match(after))
        tail = _TAIL_WORD_RE.match(after)
        if tail and tail.group(1) in _EN_COUNT_UNITS:
            measured = True
        if kind == "arabic":
            # Glued letters mean an id or a model ("iphone15", "hl2048", "15pro"),
            # except "x3", "3x" and "3pcs", which are counts.
            if before[-1:].isascii() and before[-1:].isalpha():
                if before[-1] != "x" or before[-2:-1].isalpha():
                    return None
                measured = True
            if after[:1].isascii() and after[:1].isalpha() and not measured:
                return None
            if len(surface.replace(",", "")) > 6 and not measured:
                return None  # a long bare digit run is an id or a phone number
        elif kind == "cn":
            if surface in _CN_NON_NUMBERS or (
                len(surface) > 1 and all(c in "零〇一二三四五六七八九" for c in surface)
            ):
                return None  # idioms and digit-by-digit codes, not quantities
            if not measured and len(surface) == 1 and not _whole_message(folded, start, end):
                return None  # a lone 一/三 is usually part of a word (一下, 三星)
        if _whole_message(folded, start, end, "个件台只条双套把瓶盒箱包张本部份支副对x"):
            return 0.95
        if measured:
            return 0.9
        if surface in ("one", "dozen"):
            return 0.3  # "the blue one", "one of them"
        return 0.6

    def json_schema(self) -> dict[str, JSONValue]:
        fragment: dict[str, JSONValue] = {"type": "integer"}
        if self.options.min is not None:
            fragment["minimum"] = self.options.min
        if self.options.max is not None:
            fragment["maximum"] = self.options.max
        return self._schema(fragment)

    def _detail(self) -> str:
        lo, hi = self.options.min, self.options.max
        if lo is not None and hi is not None:
            return f"a whole number from {lo} to {hi}"
        if lo is not None:
            return f"a whole number of at least {lo}"
        if hi is not None:
            return f"a whole number of at most {hi}"
        return "a whole number"


# --- money -----------------------------------------------------------------------------

# ISO 4217 codes we know how to read. A flow naming anything else is a typo
# ("CYN"), caught at load time.
KNOWN_CURRENCIES = frozenset(
    {
        "AUD", "CAD", "CHF", "CNY", "EUR", "GBP", "HKD", "JPY", "KRW", "MOP", "MYR", "NZD",
        "SGD", "THB", "TWD", "USD",
    }
)  # fmt: skip
_DOLLAR_CURRENCIES = frozenset({"USD", "HKD", "SGD", "AUD", "CAD", "NZD", "TWD"})
# Marker -> currency; "$" / "dollar" resolve through _DOLLAR, "元"/"块" through _YUAN.
_DOLLAR = "$"
_YUAN = "元"
_CURRENCY_MARKERS: dict[str, str] = {
    "$": _DOLLAR,
    "us$": "USD",
    "hk$": "HKD",
    "nt$": "TWD",
    "s$": "SGD",
    "a$": "AUD",
    "c$": "CAD",
    "nz$": "NZD",
    "¥": "¥",
    "€": "EUR",
    "£": "GBP",
    "₩": "KRW",
    "元": _YUAN,
    "圆": _YUAN,
    "块": _YUAN,
    "块钱": _YUAN,
    "人民币": "CNY",
    "美元": "USD",
    "美金": "USD",
    "刀": _DOLLAR,
    "欧元": "EUR",
    "英镑": "GBP",
    "港币": "HKD",
    "港元": "HKD",
    "日元": "JPY",
    "日币": "JPY",
    "円": "JPY",
    "韩元": "KRW",
    "台币": "TWD",
    "新台币": "TWD",
    "新币": "SGD",
    "澳门币": "MOP",
    "yuan": _YUAN,
    "kuai": _YUAN,
    "rmb": "CNY",
    "dollar": _DOLLAR,
    "dollars": _DOLLAR,
    "buck": _DOLLAR,
    "bucks": _DOLLAR,
    "euro": "EUR",
    "euros": "EUR",
    "pound": "GBP",
    "pounds": "GBP",
    "quid": "GBP",
    "yen": "JPY",
    **{code.lower(): code for code in KNOWN_CURRENCIES},
}
_JIAO_MARKERS = ("毛钱", "毛", "角")


def _alternation(items: Iterable[str]) -> str:
    return "|".join(re.escape(i) for i in sorted(items, key=len, reverse=True))


_PREFIX_MARKERS = [m for m in _CURRENCY_MARKERS if not m.isalpha() or m.isascii()]
_SUFFIX_MARKERS = [m for m in _CURRENCY_MARKERS if m not in ("$", "€", "£", "₩") and "$" not in m]
_ASCII_WORD_MARKERS = [m for m in _CURRENCY_MARKERS if m.isascii() and m.isalpha()]
_SYMBOL_PREFIXES = [m for m in _PREFIX_MARKERS if not m.isalpha()]
_CN_DIGIT_CLASS = "[零〇一二两三四五六七八九]"


def _money_regex(*, english_numbers: bool) -> re.Pattern[str]:
    # English number words ("twenty bucks") are an expensive alternation tried
    # at every position; extraction only includes them when the message
    # contains an English currency word.
    words = f"|(?<![a-z])(?:{_EN_NUMBER_ALT})(?![a-z])" if english_numbers else ""
    return re.compile(
        rf"""
        (?P<neg>-\s*)?
        (?:
            (?P<pre>{_alternation(_SYMBOL_PREFIXES)}
               |(?<![a-z])(?:{_alternation(_ASCII_WORD_MARKERS)})(?![a-z]))
            \s*(?P<neg2>-\s*)?
          | (?<![a-z0-9.,$¥€£₩])
        )
        (?P<num>\d{{1,3}}(?:,\d{{3}})+(?:\.\d+)?|\d++(?:\.\d+)?
           |{_CN_NUM_CLASS}++{words})
        (?P<wan>\s*[万萬])?
        (?:\s*(?P<suf>{_alternation(m for m in _SUFFIX_MARKERS if not m.isascii())}
             |{_alternation(_JIAO_MARKERS)}
             |(?<![a-z])(?:{_alternation(_ASCII_WORD_MARKERS)})(?![a-z])))?
        (?:\s*(?P<jiao>\d|{_CN_DIGIT_CLASS})\s*(?:角|毛)?(?:钱)?
           (?:\s*(?P<fen>\d|{_CN_DIGIT_CLASS})\s*分)?)?
        """,
        re.VERBOSE,
    )


_MONEY_RE = _money_regex(english_numbers=True)
_MONEY_RE_DIGITS = _money_regex(english_numbers=False)
_NUMBERISH_RE = re.compile(f"[0-9{CN_NUMERAL_CHARS}]")
_ASCII_MARKER_SET = frozenset(_ASCII_WORD_MARKERS)
_MONEY_CUES_RE = re.compile(
    r"(?:paid|pay|cost|costs|price|priced|refund|charged|charge|spent|total|amount|worth|"
    r"付了|付|花了|价格|价钱|退|退款|金额|扣了|收了|共|一共|总共|多少钱)\s*(?:of|is|was|me|了|是|为)?\s*[:：]?\s*$"
)
_NAN_WORDS = frozenset({"nan", "inf", "-inf", "+inf", "infinity", "-infinity", "+infinity"})
_MONEY_LIMIT = Decimal(10) ** 12
_PLAIN_AMOUNT_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_CENT = Decimal("0.01")


class MoneyOptions(EntityOptions):
    """Options of ``type: money``.

    ``currency``: ISO 4217 code used when the customer gives no currency
    (default ``CNY``). ``currencies``: every accepted code (default: just
    ``currency``). ``min`` / ``max``: inclusive bounds on the amount, in
    whatever accepted currency it is given (set one currency if that matters).
    Amounts always have two decimals; a third non-zero decimal is rejected.
    """

    currency: str = "CNY"
    currencies: tuple[str, ...] | None = None
    min: Decimal | None = Field(default=None, ge=0)
    max: Decimal | None = Field(default=None, ge=0)

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        return _check_currency_code(value)

    @field_validator("currencies")
    @classmethod
    def _known_currencies(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must list at least one currency")
        return tuple(_check_currency_code(v) for v in value)

    @model_validator(mode="after")
    def _consistent(self) -> MoneyOptions:
        if self.currencies is not None and self.currency not in self.currencies:
            raise ValueError(
                f"currency {self.currency} is not in currencies {list(self.currencies)}"
            )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        for bound in (self.min, self.max):
            if bound is not None and bound != bound.quantize(_CENT):
                raise ValueError(f"bound {bound} has more than 2 decimals")
        return self


def _check_currency_code(value: str) -> str:
    code = value.strip().upper()
    if code not in KNOWN_CURRENCIES:
        hint = _closest(code, KNOWN_CURRENCIES, 1)
        extra = f" (did you mean {hint}?)" if hint else ""
        raise ValueError(
            f"unknown currency {value!r}{extra}; known: {', '.join(sorted(KNOWN_CURRENCIES))}"
        )
    return code


class _MoneyProblem(Exception):
    """Internal: a money-looking text that is not an acceptable amount."""


class MoneyEntity(EntityType):
    """``type: money``: an amount and currency: ¥129, 129元, 一百二十九块, $20, 129.50 CNY."""

    type_name = "money"
    Options = MoneyOptions
    options: MoneyOptions

    @property
    def currencies(self) -> tuple[str, ...]:
        return self.options.currencies or (self.options.currency,)

    def _resolve_currency(self, marker: str | None) -> str:
        default = self.options.currency
        if marker is None:
            return default
        target = _CURRENCY_MARKERS[marker]
        if target == _DOLLAR:
            if default in _DOLLAR_CURRENCIES:
                return default
            allowed = [c for c in self.currencies if c in _DOLLAR_CURRENCIES]
            return allowed[0] if len(allowed) == 1 else "USD"
        if target == _YUAN:
            # 元 is the generic word for the unit in HK, Macau and Taiwan too.
            return default if default in ("HKD", "MOP", "TWD") else "CNY"
        if target == "¥":
            return default if default in ("CNY", "JPY") else "CNY"
        return target

    def _canonical(self, amount: Decimal, currency: str) -> dict[str, JSONValue]:
        if not amount.is_finite():
            raise _MoneyProblem("is not a number")
        if amount < 0:
            raise _MoneyProblem("must not be negative")
        if amount >= _MONEY_LIMIT:
            raise _MoneyProblem("is implausibly large")
        quantized = amount.quantize(_CENT)
        if quantized != amount:
            raise _MoneyProblem("has more than 2 decimal places")
        if currency not in self.currencies:
            raise _MoneyProblem(
                f"currency {currency} is not accepted here "
                f"(accepted: {', '.join(self.currencies)})"
            )
        if self.options.min is not None and quantized < self.options.min:
            raise _MoneyProblem(f"must be at least {self._bound_text(self.options.min)}")
        if self.options.max is not None and quantized > self.options.max:
            raise _MoneyProblem(f"must be at most {self._bound_text(self.options.max)}")
        return {"amount": f"{quantized:.2f}", "currency": currency}

    def _bound_text(self, bound: Decimal) -> str:
        # Bounds apply to the amount whatever its currency; name the currency
        # only when there is just one.
        only = self.currencies[0] if len(self.currencies) == 1 else ""
        return f"{bound:.2f} {only}".rstrip()

    def parse(self, value: object, *, today: date | None = None) -> dict[str, JSONValue]:
        try:
            return self._parse(value)
        except _MoneyProblem as exc:
            raise self._error(value, str(exc)) from None

    def _parse(self, value: object) -> dict[str, JSONValue]:
        if isinstance(value, bool):
            raise _MoneyProblem("expected an amount of money, got a yes/no value")
        if isinstance(value, Mapping):
            return self._parse_mapping(value)
        if isinstance(value, int | float | Decimal):
            return self._canonical(self._decimal(value), self.options.currency)
        if not isinstance(value, str):
            raise _MoneyProblem(f"expected an amount of money, got {type(value).__name__}")
        text = _clean_text_value(self.name, value)
        if text.replace(" ", "") in _NAN_WORDS:
            raise _MoneyProblem("is not a number")
        m = _MONEY_RE.fullmatch(text)
        if m is None:
            if re.search(r"\d\.\d{3,}", text):
                raise _MoneyProblem("has more than 2 decimal places")
            code = re.search(r"[a-z]{3}", text)
            if (
                code
                and re.fullmatch(r"[\d.,\s]*[a-z]{3}[\d.,\s]*", text)
                and re.search(r"\d", text)
            ):
                raise _MoneyProblem(f"unknown currency {code.group().upper()!r}")
            raise _MoneyProblem(
                "expected an amount of money such as ¥129, 129元, 129.50 CNY or $20"
            )
        return self._from_match(m, bare_ok=True)

    def _parse_mapping(self, value: Mapping[Any, Any]) -> dict[str, JSONValue]:
        unknown = set(value) - {"amount", "currency"}
        if unknown:
            raise _MoneyProblem(f"unexpected field(s) {sorted(map(str, unknown))}")
        if "amount" not in value:
            raise _MoneyProblem('needs an "amount" field')
        currency = value.get("currency") or self.options.currency
        if not isinstance(currency, str):
            raise _MoneyProblem("currency must be an ISO code such as CNY")
        code = currency.strip().upper()
        if code == "RMB":
            code = "CNY"
        if code not in KNOWN_CURRENCIES:
            raise _MoneyProblem(f"unknown currency {currency!r}")
        amount = value["amount"]
        if isinstance(amount, str):
            plain = amount.strip().replace(",", "")
            if _PLAIN_AMOUNT_RE.fullmatch(plain):
                return self._canonical(self._amount(plain), code)
            # The amount carries its own wording ("¥129", "一百元"); it must not
            # contradict the currency field ("$20" with currency CNY).
            inner = self._parse(amount)
            if "currency" in value and inner["currency"] != code:
                raise _MoneyProblem(f"amount is in {inner['currency']} but currency says {code}")
            return inner
        if isinstance(amount, bool) or not isinstance(amount, int | float | Decimal):
            raise _MoneyProblem("amount must be a number or a string such as '129.00'")
        return self._canonical(self._decimal(amount), code)

    @staticmethod
    def _decimal(number: float | Decimal) -> Decimal:
        if isinstance(number, float):
            if not math.isfinite(number):
                raise _MoneyProblem("is not a number")
            # repr-based conversion: 129.5 -> Decimal("129.5"), never 129.4999...
            return Decimal(repr(number))
        return Decimal(number)

    def _from_match(self, m: re.Match[str], *, bare_ok: bool) -> dict[str, JSONValue]:
        if m.group("neg") or m.group("neg2"):
            raise _MoneyProblem("must not be negative")
        pre, suf, num = m.group("pre"), m.group("suf"), m.group("num")
        jiao_marker = suf in _JIAO_MARKERS
        if jiao_marker:
            suf = None
        if pre is None and suf is None and not jiao_marker and not bare_ok:
            raise _MoneyProblem("no currency")
        # Words ("twenty") and Chinese numerals need a unit to be money at all.
        is_arabic = num[0].isdigit()
        if not is_arabic and pre is None and suf is None and not jiao_marker:
            raise _MoneyProblem("no currency")
        if num[0].isascii() and num[0].isalpha() and (suf is None or not suf.isascii()):
            raise _MoneyProblem("no currency")
        amount = self._amount(num)
        if m.group("wan"):
            amount *= 10_000
        if jiao_marker:
            if m.group("wan") or pre is not None or m.group("jiao"):
                raise _MoneyProblem("unreadable amount")
            amount /= 10
        elif m.group("jiao"):
            if suf is None or _CURRENCY_MARKERS[suf] != _YUAN:
                raise _MoneyProblem("unreadable amount")
            amount += self._digit(m.group("jiao")) / Decimal(10)
            if m.group("fen"):
                amount += self._digit(m.group("fen")) / Decimal(100)
        currency_pre = self._resolve_currency(pre) if pre else None
        currency_suf = self._resolve_currency(suf) if suf else None
        if currency_pre and currency_suf and currency_pre != currency_suf:
            raise _MoneyProblem(f"names two currencies ({currency_pre} and {currency_suf})")
        return self._canonical(amount, currency_pre or currency_suf or self.options.currency)

    @staticmethod
    def _digit(text: str) -> int:
        return int(text) if text.isdigit() and text.isascii() else chinese_number(text) or 0

    @staticmethod
    def _amount(num: str) -> Decimal:
        if num[0].isdigit() and num[0].isascii():
            digits = num.replace(",", "")
            if len(digits.split(".")[0]) > 13:
                raise _MoneyProblem("is implausibly large")
            try:
                return Decimal(digits)
            except InvalidOperation:
                raise _MoneyProblem("is not a number") from None
        value = chinese_number(num)
        if value is None:
            value = _english_number(num)
        if value is None:
            raise _MoneyProblem("unreadable amount")
        return Decimal(value)

    def extract(self, text: str, *, today: date | None = None) -> list[Match]:
        folded = fold(text)
        currency_words = not _ASCII_MARKER_SET.isdisjoint(textnorm.words(text))
        if not currency_words and _NUMBERISH_RE.search(folded) is None:
            return []  # fast path: no digit, no Chinese numeral, no currency word
        regex = _MONEY_RE if currency_words else _MONEY_RE_DIGITS
        found: list[Match] = []
        for m in regex.finditer(folded):
            start, end = m.span()
            if m.group("neg"):
                continue  # "-50" in free text is rarely a price; never guess a sign
            # Do not include trailing whitespace consumed by optional groups.
            while end > start and folded[end - 1].isspace():
                end -= 1
            explicit = bool(m.group("pre") or m.group("suf"))
            if explicit:
                conf = 0.95
            else:
                conf_or_none = self._bare_confidence(folded, m, start, end)
                if conf_or_none is None:
                    continue
                conf = conf_or_none
            try:
                value = self._from_match(m, bare_ok=not explicit)
            except _MoneyProblem:
                continue
            found.append(Match(value, start, end, conf))
        return found

    def _bare_confidence(
        self, folded: str, m: re.Match[str], start: int, end: int
    ) -> float | None:
        """A number without currency: money only as a whole answer or after a price cue."""
        num = m.group("num")
        if not (num[0].isdigit() and num[0].isascii()):
            return None
        after = folded[end : end + 8]
        if after[:1].isascii() and after[:1].isalpha():
            return None  # "15pro", "3pcs"
        if _NOT_QUANTITY_AFTER_RE.match(after):
            return None  # a date, a time, a percentage, a malformed "3,12"
        if _MEASURE_RE.match(after):
            return None  # "3个" is a quantity
        if len(num.replace(",", "").split(".")[0]) > 7:
            return None  # ids and phone numbers
        if _whole_message(folded, start, end):
            return 0.7
        if _MONEY_CUES_RE.search(folded[max(0, start - 16) : start]):
            return 0.6
        return None

    def json_schema(self) -> dict[str, JSONValue]:
        return self._schema(
            {
                "type": "object",
                "properties": {
                    "amount": {
                        "type": "string",
                        "pattern": r"^[0-9]+(\.[0-9]{1,2})?$",
                        "description": "amount with at most 2 decimals, e.g. 129.00",
                    },
                    "currency": {"type": "string", "enum": list(self.currencies)},
                },
                "required": ["amount", "currency"],
                "additionalProperties": False,
            }
        )

    def _detail(self) -> str:
        text = f"an amount of money in {' or '.join(self.currencies)}"
        lo, hi = self.options.min, self.options.max
        if lo is not None and hi is not None:
            text += f" from {lo:.2f} to {hi:.2f}"
        elif lo is not None:
            text += f" of at least {lo:.2f}"
        elif hi is not None:
            text += f" of at most {hi:.2f}"
        return text


# --- date ------------------------------------------------------------------------------

_BOUND_RE = re.compile(r"today\s*(?:(?P<sign>[-+])\s*(?P<days>\d{1,5})\s*(?:d|days?)?)?")


@dataclass(frozen=True, slots=True)
class _DateBound:
    """A date bound: a fixed date, or today plus an offset in days."""

    fixed: date | None
    offset: int

    def resolve(self, today: date) -> date:
        return self.fixed if self.fixed is not None else today + timedelta(days=self.offset)

    def __str__(self) -> str:
        if self.fixed is not None:
            return self.fixed.isoformat()
        if self.offset == 0:
            return "today"
        return f"today{self.offset:+d}d"


def _parse_bound(value: object) -> _DateBound:
    if isinstance(value, datetime):
        return _DateBound(value.date(), 0)
    if isinstance(value, date):
        return _DateBound(value, 0)
    if not isinstance(value, str):
        raise ValueError("must be an ISO date (2026-01-31) or today, today-90d, today+30d")
    text = value.strip().lower()
    m = _BOUND_RE.fullmatch(text)
    if m:
        days = int(m.group("days") or 0)
        return _DateBound(None, -days if m.group("sign") == "-" else days)
    try:
        return _DateBound(date.fromisoformat(text), 0)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a date bound; use an ISO date (2026-01-31) "
            "or today, today-90d, today+30d"
        ) from None


class DateOptions(EntityOptions):
    """Options of ``type: date``.

    ``min`` / ``max``: inclusive bounds, each an ISO date (``2026-01-31``) or
    relative to the conversation's today: ``today``, ``today-90d``,
    ``today+30d``. An order date is ``max: today``; a delivery appointment is
    ``min: today+1d``. Dates without a year (``11月2日``, ``Nov 2``) and bare
    weekdays resolve to the occurrence closest to today that fits the bounds.
    """

    min: str | None = None
    max: str | None = None

    @field_validator("min", "max", mode="before")
    @classmethod
    def _bound_text(cls, value: object) -> object:
        if value is None:
            return None
        bound = _parse_bound(value)  # raises ValueError with the accepted forms
        return str(bound)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> DateOptions:
        if self.min is not None and self.max is not None:
            lo, hi = _parse_bound(self.min), _parse_bound(self.max)
            # Only comparable when both are of the same kind.
            if (lo.fixed is None) == (hi.fixed is None) and lo.resolve(date.today()) > hi.resolve(
                date.today()
            ):
                raise ValueError(f"min {self.min} is after max {self.max}")
        return self


_MONTHS: dict[str, int] = {}
for _index, _month in enumerate(calendar.month_name):
    if _month:
        _MONTHS[_month.lower()] = _index
        _MONTHS[_month[:3].lower()] = _index
_MONTHS["sept"] = 9
_MONTH_ALT = _alternation(_MONTHS)
_WEEKDAYS_EN: dict[str, int] = {}
for _index, _day in enumerate(calendar.day_name):
    _WEEKDAYS_EN[_day.lower()] = _index
_WEEKDAY_ABBR: dict[str, int] = {
    "mon": 0, "tue": 1, "tues": 1, "wed": 2, "weds": 2, "thu": 3, "thur": 3, "thurs": 3,
    "fri": 4, "sat": 5, "sun": 6,
}  # fmt: skip
_WEEKDAYS_ZH: dict[str, int] = {
    "一": 0, "1": 0, "二": 1, "2": 1, "三": 2, "3": 2, "四": 3, "4": 3, "五": 4, "5": 4,
    "六": 5, "6": 5, "日": 6, "天": 6, "7": 6,
}  # fmt: skip
_RELATIVE_DAYS: dict[str, int] = {
    "today": 0,
    "tonight": 0,
    "this morning": 0,
    "this afternoon": 0,
    "this evening": 0,
    "yesterday": -1,
    "last night": -1,
    "tomorrow": 1,
    "the day before yesterday": -2,
    "day before yesterday": -2,
    "the day after tomorrow": 2,
    "day after tomorrow": 2,
    "今天": 0,
    "今日": 0,
    "今儿": 0,
    "今早": 0,
    "今晚": 0,
    "昨天": -1,
    "昨日": -1,
    "昨儿": -1,
    "昨晚": -1,
    "前天": -2,
    "大前天": -3,
    "明天": 1,
    "明日": 1,
    "后天": 2,
    "大后天": 3,
}
_CN_DAY = r"[一二三]?十[一二三四五六七八九]?|[一二三四五六七八九]"
_CN_MONTH = r"十[一二]?|[一二三四五六七八九]"

# One pattern per date form; each handler turns a match into candidate dates.
_DATE_PATTERNS: list[tuple[str, str]] = [
    (
        "iso",
        r"(?<![0-9a-z])(?P<y>\d{4})\s*(?P<sep>[-/.])\s*(?P<m>\d{1,2})\s*(?P=sep)\s*(?P<d>\d{1,2})"
        r"(?:t\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:z|[+-]\d{2}:?\d{2})?)?(?![0-9])",
    ),
    (
        "dmy",
        r"(?<![0-9a-z])(?P<a>\d{1,2})(?P<sep>[-/.])(?P<b>\d{1,2})(?P=sep)(?P<y>\d{4})(?![0-9])",
    ),
    ("md", r"(?<![0-9/.,])(?P<m>\d{1,2})/(?P<d>\d{1,2})(?![0-9/])"),
    (
        "zh",
        rf"(?:(?<![0-9])(?P<y>\d{{4}}|[〇零一二三四五六七八九]{{4}})\s*年\s*)?"
        rf"(?<![0-9])(?P<m>\d{{1,2}}|{_CN_MONTH})\s*月份?\s*"
        rf"(?P<d>\d{{1,2}}|{_CN_DAY})(?![0-9])\s*(?:日|号|號)?",
    ),
    ("zh_day", rf"(?<![0-9月])(?P<d>\d{{1,2}}|{_CN_DAY})\s*(?:号|號)(?![码碼])"),
    (
        "en_md",
        rf"(?<![a-z])(?P<mon>{_MONTH_ALT})\.?\s+(?P<d>\d{{1,2}})(?:st|nd|rd|th)?(?![0-9a-z])"
        rf"(?:,?\s*(?P<y>\d{{4}})(?![0-9]))?",
    ),
    (
        "en_dm",
        rf"(?<![a-z0-9])(?:the\s+)?(?P<d>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?"
        rf"(?P<mon>{_MONTH_ALT})\.?(?![a-z])(?:,?\s*(?P<y>\d{{4}})(?![0-9]))?",
    ),
    ("en_day", r"(?<![a-z0-9])the\s+(?P<d>\d{1,2})(?:st|nd|rd|th)(?![a-z0-9])"),
    (
        "relative",
        rf"(?<![a-z])(?P<rel>{_alternation(k for k in _RELATIVE_DAYS if k.isascii())})(?![a-z])"
        rf"|(?P<relzh>{_alternation(k for k in _RELATIVE_DAYS if not k.isascii())})",
    ),
    (
        "ago",
        rf"(?<![a-z0-9])(?P<n>\d{{1,3}}|a|an|{_EN_NUMBER_ALT})\s+(?P<unit>days?|weeks?)\s+ago(?![a-z])"
        rf"|(?P<nzh>\d{{1,3}}|[一二两三四五六七八九十]{{1,3}})\s*(?:个)?(?P<unitzh>天|日|周|星期|礼拜)\s*(?:以)?前",
    ),
    (
        "weekday_en",
        rf"(?<![a-z])(?:(?P<rel>last|past|this|next|coming)\s+)?(?P<wd>{_alternation(_WEEKDAYS_EN)})(?![a-z])"
        rf"|(?<![a-z])(?P<rel2>last|this|next)\s+(?P<wd2>{_alternation(_WEEKDAY_ABBR)})\.?(?![a-z])",
    ),
    (
        "weekday_zh",
        r"(?<![一二三四五六七八九十两0-9几每])(?P<rel>上上|下下|上|这|本|下)?个?(?:周|星期|礼拜)"
        r"(?P<wd>[一二三四五六日天1-7])(?![0-9一二三四五六七八九十])",
    ),
]
_DATE_RES = [(kind, re.compile(pattern)) for kind, pattern in _DATE_PATTERNS]
_REL_WORDS_EN = frozenset(
    w for k in _RELATIVE_DAYS if k.isascii() for w in k.split() if w not in ("the", "day", "this")
)
_WEEKDAY_WORDS = frozenset(_WEEKDAYS_EN) | frozenset(_WEEKDAY_ABBR)
_DIGIT_RE = re.compile(r"[0-9]")


def _date_triggered(kind: str, folded: str, words: frozenset[str], digit: bool) -> bool:
    """Cheap necessary condition for a date pattern to match; most messages have no date.

    Running a dozen regexes over every message would dominate extraction
    time, so each pattern only runs when a character or word it needs occurs.
    """
    if kind in ("iso", "dmy", "md"):
        return digit
    if kind == "zh":
        return "月" in folded
    if kind == "zh_day":
        return "号" in folded or "號" in folded
    if kind in ("en_md", "en_dm"):
        return not words.isdisjoint(_MONTHS)
    if kind == "en_day":
        return digit and "the" in words
    if kind == "relative":
        return not words.isdisjoint(_REL_WORDS_EN) or any(c in folded for c in "今昨前明后")
    if kind == "ago":
        return "ago" in words or "前" in folded
    if kind == "weekday_en":
        return not words.isdisjoint(_WEEKDAY_WORDS)
    if kind == "weekday_zh":
        return "周" in folded or "星期" in folded or "礼拜" in folded
    return True  # pragma: no cover


_DATE_CONFIDENCE = {
    "iso": 0.95,
    "dmy": 0.85,
    "md": 0.6,
    "zh": 0.95,
    "zh_day": 0.5,
    "en_md": 0.9,
    "en_dm": 0.9,
    "en_day": 0.5,
    "relative": 0.9,
    "ago": 0.85,
    "weekday_en": 0.8,
    "weekday_zh": 0.85,
}


class _DateProblem(Exception):
    """Internal: a date-looking text that is not a valid date."""


def _make_date(year: int, month: int, day: int) -> date:
    if not 1 <= month <= 12:
        raise _DateProblem(f"month {month} does not exist")
    try:
        return date(year, month, day)
    except ValueError:
        raise _DateProblem(
            f"{calendar.month_name[month]} {day} does not exist in {year}"
        ) from None


def _int_or_cn(text: str) -> int:
    if text.isascii() and text.isdigit():
        return int(text)
    value = chinese_number(text)
    if value is None:
        value = _english_number(text)
    if value is None:
        raise _DateProblem(f"cannot read the number {text!r}")
    return value


class DateEntity(EntityType):
    """``type: date``: a calendar day: 2026-11-02, 2026/11/02, 11月2日, Nov 2, 昨天, 上周一."""

    type_name = "date"
    Options = DateOptions
    options: DateOptions

    def __init__(self, name: str, options: EntityOptions) -> None:
        super().__init__(name, options)
        self._min = _parse_bound(self.options.min) if self.options.min is not None else None
        self._max = _parse_bound(self.options.max) if self.options.max is not None else None

    def _bounds(self, today: date) -> tuple[date | None, date | None]:
        lo = self._min.resolve(today) if self._min else None
        hi = self._max.resolve(today) if self._max else None
        return lo, hi

    def _in_bounds(self, day: date, today: date) -> bool:
        lo, hi = self._bounds(today)
        return (lo is None or day >= lo) and (hi is None or day <= hi)

    def _bounds_reason(self, day: date, today: date) -> str:
        lo, hi = self._bounds(today)
        if lo is not None and day < lo:
            earliest = self._bound_text(self._min, lo)
            return f"{day.isoformat()} is too early; the earliest accepted date is {earliest}"
        assert hi is not None
        latest = self._bound_text(self._max, hi)
        return f"{day.isoformat()} is too late; the latest accepted date is {latest}"

    @staticmethod
    def _bound_text(bound: _DateBound | None, resolved: date) -> str:
        if bound is not None and bound.fixed is None:
            if bound.offset == 0:
                return f"today ({resolved.isoformat()})"
            return f"{bound} ({resolved.isoformat()})"
        return resolved.isoformat()

    def _pick(self, candidates: Sequence[date], today: date) -> date:
        """Choose among candidate readings: inside the bounds, closest to today, past on ties."""
        if not candidates:
            raise _DateProblem("is not a date")
        fitting = [d for d in candidates if self._in_bounds(d, today)]
        if not fitting:
            best = min(candidates, key=lambda d: (abs((d - today).days), d))
            raise _DateProblem(self._bounds_reason(best, today))
        return min(fitting, key=lambda d: (abs((d - today).days), d))

    def _candidates(self, kind: str, m: re.Match[str], today: date) -> list[date]:
        """Every date a match can mean (several when the year or week is implied)."""
        g = m.groupdict()
        if kind == "iso":
            return [_make_date(self._year(g["y"]), int(g["m"]), int(g["d"]))]
        if kind == "dmy":
            a, b, year = int(g["a"]), int(g["b"]), self._year(g["y"])
            if g["sep"] == "." or a > 12:
                return [_make_date(year, b, a)]  # dotted dates are day-first (02.11.2026)
            if b > 12 or a == b:
                return [_make_date(year, a, b)]
            raise _DateProblem(
                f"is ambiguous ({year}-{a:02d}-{b:02d} or {year}-{b:02d}-{a:02d}); "
                "write it as YYYY-MM-DD"
            )
        if kind in ("md", "zh", "en_md", "en_dm"):
            month = _MONTHS[g["mon"]] if kind.startswith("en") else _int_or_cn(g["m"])
            day = _int_or_cn(g["d"])
            if g.get("y"):
                return [_make_date(self._year(g["y"]), month, day)]
            if not 1 <= month <= 12:
                raise _DateProblem(f"month {month} does not exist")
            if not 1 <= day <= 31:
                raise _DateProblem(f"day {day} does not exist")
            options = []
            for year in (today.year - 1, today.year, today.year + 1):
                try:
                    options.append(date(year, month, day))
                except ValueError:
                    continue
            if not options:
                raise _DateProblem(f"{calendar.month_name[month]} {day} does not exist")
            return options
        if kind in ("zh_day", "en_day"):
            day = _int_or_cn(g["d"])
            if not 1 <= day <= 31:
                raise _DateProblem(f"day {day} does not exist")
            options = []
            for delta in (-1, 0, 1):
                year, month = today.year, today.month + delta
                if month == 0:
                    year, month = year - 1, 12
                elif month == 13:
                    year, month = year + 1, 1
                try:
                    options.append(date(year, month, day))
                except ValueError:
                    continue
            return options
        if kind == "relative":
            key = " ".join((g["rel"] or g["relzh"]).split())
            return [today + timedelta(days=_RELATIVE_DAYS[key])]
        if kind == "ago":
            if g["n"] is not None:
                n = 1 if g["n"] in ("a", "an") else _int_or_cn(g["n"])
                per = 7 if g["unit"].startswith("week") else 1
            else:
                n = _int_or_cn(g["nzh"])
                per = 1 if g["unitzh"] in ("天", "日") else 7
            if n > 3660:
                raise _DateProblem("is too far back")
            return [today - timedelta(days=n * per)]
        if kind == "weekday_en":
            rel = g["rel"] or g["rel2"]
            wd = _WEEKDAYS_EN[g["wd"]] if g["wd"] else _WEEKDAY_ABBR[g["wd2"]]
            return self._weekday_en(today, wd, rel)
        if kind == "weekday_zh":
            wd = _WEEKDAYS_ZH[g["wd"]]
            monday = today - timedelta(days=today.weekday())
            weeks = {"上上": -2, "上": -1, "这": 0, "本": 0, "下": 1, "下下": 2}
            if g["rel"] is None:
                return self._weekday_en(today, wd, None)
            return [monday + timedelta(days=7 * weeks[g["rel"]] + wd)]
        raise AssertionError(kind)  # pragma: no cover

    @staticmethod
    def _weekday_en(today: date, weekday: int, rel: str | None) -> list[date]:
        back = (today.weekday() - weekday) % 7
        previous = today - timedelta(days=back or 7)  # strictly before today
        upcoming = today + timedelta(days=(weekday - today.weekday()) % 7 or 7)
        if rel in ("last", "past"):
            return [previous]
        if rel in ("next", "coming"):
            return [upcoming]
        if rel == "this":
            return [today - timedelta(days=today.weekday()) + timedelta(days=weekday)]
        # Bare "Monday": today if it is Monday, else the nearest either way.
        return [today] if back == 0 else [previous, upcoming]

    @staticmethod
    def _year(text: str) -> int:
        year = _int_or_cn(text)
        if not 1900 <= year <= 2200:
            raise _DateProblem(f"year {year} is out of range")
        return year

    def parse(self, value: object, *, today: date | None = None) -> str:
        today = today or date.today()
        if isinstance(value, datetime):
            day = value.date()
        elif isinstance(value, date):
            day = value
        elif isinstance(value, str):
            text = _clean_text_value(self.name, value)
            text = re.sub(r"^(?:on|the|at|in|on the|在|是)\s*", "", text)
            try:
                day = self._parse_text(text, today)
            except _DateProblem as exc:
                raise self._error(value, str(exc)) from None
        else:
            raise self._error(value, f"expected a date, got {type(value).__name__}")
        if not self._in_bounds(day, today):
            raise self._error(value, self._bounds_reason(day, today))
        return day.isoformat()

    def _parse_text(self, text: str, today: date) -> date:
        for kind, regex in _DATE_RES:
            m = regex.fullmatch(text)
            if m is not None:
                return self._pick(self._candidates(kind, m, today), today)
        raise _DateProblem(
            "expected a date such as 2026-11-02, 11月2日, Nov 2, yesterday or 上周一"
        )

    def extract(self, text: str, *, today: date | None = None) -> list[Match]:
        today = today or date.today()
        folded = fold(text)
        words = frozenset(textnorm.words(text))
        digit = _DIGIT_RE.search(folded) is not None
        found: list[Match] = []
        for kind, regex in _DATE_RES:
            if not _date_triggered(kind, folded, words, digit):
                continue
            for m in regex.finditer(folded):
                start, end = m.span()
                while end > start and folded[end - 1].isspace():
                    end -= 1
                try:
                    day = self._pick(self._candidates(kind, m, today), today)
                except _DateProblem:
                    continue
                conf = _DATE_CONFIDENCE[kind]
                if kind == "relative" and day == today:
                    # "到今天还没发货" (still not shipped as of today): today is
                    # more often the reference point than the date asked for.
                    conf = 0.7
                found.append(Match(day.isoformat(), start, end, conf))
        return _resolve_overlaps(found)

    def json_schema(self) -> dict[str, JSONValue]:
        return self._schema({"type": "string", "format": "date"})

    def _detail(self) -> str:
        text = "a date (YYYY-MM-DD)"
        if self._min is not None:
            text += f", not before {self._min}"
        if self._max is not None:
            text += f", not after {self._max}"
        return text


# --- enum ------------------------------------------------------------------------------


class EnumLabel(BaseModel):
    """Display labels of one enum value, per language."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    en: str | None = Field(default=None, min_length=1)
    zh: str | None = Field(default=None, min_length=1)


class EnumValue(BaseModel):
    """One enum value: ``synonyms`` customers use (any language) and display ``label``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    synonyms: tuple[str, ...] = ()
    label: EnumLabel = EnumLabel()


_KEY_STRIP_RE = re.compile(r"[\W_]+")


def _key(text: str) -> str:
    """Comparison key without case, spaces or punctuation ("Not received!" → "notreceived")."""
    return _KEY_STRIP_RE.sub("", normalize(text))


class EnumOptions(EntityOptions):
    """Options of ``type: enum``.

    ``values``: canonical value → ``{synonyms: [...], label: {en, zh}}``. A
    plain list of canonical values is accepted for enums without synonyms.
    Canonical values are what guards compare against (``reason == "damaged"``).
    Synonyms may be Chinese (matched as substrings) or English (matched as
    words or phrases, tolerating typos and inflections). A synonym may not be
    shared by two values. Extraction uses the synonyms; a value without
    synonyms is found by its canonical name. parse() also accepts labels.
    """

    values: dict[str, EnumValue]

    @field_validator("values", mode="before")
    @classmethod
    def _list_form(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return {v: {} for v in value} if all(isinstance(v, str) for v in value) else value
        if isinstance(value, Mapping):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @field_validator("values")
    @classmethod
    def _check_values(cls, value: dict[str, EnumValue]) -> dict[str, EnumValue]:
        if not value:
            raise ValueError("needs at least one value")
        owner: dict[str, str] = {}
        for canonical, spec in value.items():
            if not canonical.strip() or canonical != canonical.strip() or len(canonical) > 64:
                raise ValueError(
                    f"value name {canonical!r} must be 1-64 characters, no edge spaces"
                )
            if not _key(canonical):
                raise ValueError(f"value name {canonical!r} has no letters or digits")
            names = [canonical, *spec.synonyms]
            names += [label for label in (spec.label.en, spec.label.zh) if label]
            for name in names:
                key = _key(name)
                if not key:
                    raise ValueError(f"synonym {name!r} of {canonical!r} has no letters or digits")
                other = owner.setdefault(key, canonical)
                if other != canonical:
                    raise ValueError(f"{name!r} is used by both {other!r} and {canonical!r}")
        return value


_NEGATIONS_EN = frozenset(
    {
        "not", "no", "never", "dont", "don't", "didnt", "didn't", "doesnt", "doesn't", "isnt",
        "isn't", "wasnt", "wasn't", "arent", "aren't", "werent", "weren't", "havent", "haven't",
        "hasnt", "hasn't", "hadnt", "hadn't", "cannot", "cant", "can't", "wont", "won't",
        "without", "nor", "neither", "hardly",
    }
)  # fmt: skip
# Chinese negation right before a match, optionally followed by a connector
# (没有被损坏, 不是质量问题, 并没有坏).
_NEGATION_ZH_RE = re.compile(
    r"(?:没有|没|不是|不|未|并非|并没有|并不|无|别)(?:被|有|是|太|怎么)?\s*$"
)
_CLAUSE_BREAK_RE = re.compile(r"[,.;!?:，。；！？：\n]|\bbut\b|但|可是")
_MAX_FUZZY_CACHE = 4096


def _tolerance(word: str) -> int:
    """Typos allowed in a synonym word: none below 5 letters, 1 from 5, 2 from 9.

    Measured on the stem, so inflection endings do not buy extra typos
    ("scratched" is "scratch": one typo, and "catches" is not a match).
    """
    if len(word) >= 9:
        return 2
    if len(word) >= 5:
        return 1
    return 0


@dataclass(frozen=True, slots=True)
class _Phrase:
    value: str
    stems: tuple[str, ...]


def _deletes(word: str, depth: int) -> set[str]:
    """Every string obtained by deleting up to ``depth`` characters (SymSpell index keys)."""
    result = {word}
    frontier = {word}
    for _ in range(depth):
        frontier = {w[:i] + w[i + 1 :] for w in frontier for i in range(len(w))}
        result |= frontier
    return result


class EnumEntity(EntityType):
    """``type: enum``: one of a fixed set of values, found through bilingual synonyms."""

    type_name = "enum"
    Options = EnumOptions
    options: EnumOptions

    def __init__(self, name: str, options: EntityOptions) -> None:
        super().__init__(name, options)
        values = self.options.values
        self._by_key: dict[str, str] = {}
        cjk: dict[str, str] = {}
        phrases: list[_Phrase] = []
        for canonical, spec in values.items():
            for label in (canonical, spec.label.en, spec.label.zh, *spec.synonyms):
                if label:
                    self._by_key[_key(label)] = canonical
            surfaces = list(spec.synonyms) or [canonical.replace("_", " ").replace("-", " ")]
            for surface in surfaces:
                folded = " ".join(fold(normalize(surface)).split())
                if textnorm.has_cjk(folded):
                    # Customers do not put spaces inside Chinese phrases.
                    cjk[folded.replace(" ", "")] = canonical
                else:
                    stems = tuple(stem(w) for w in textnorm.words(folded))
                    if stems:
                        phrases.append(_Phrase(canonical, stems))
        self._cjk_values = cjk
        self._cjk_re = re.compile(_alternation(cjk)) if cjk else None
        # Index English phrases by their first stem; fuzzy lookups go through a
        # deletion index (SymSpell) so a message costs a few dict lookups per
        # word instead of an edit distance against every synonym word.
        self._phrases_by_first: dict[str, list[_Phrase]] = {}
        self._tolerance: dict[str, int] = {}
        for phrase in phrases:
            self._phrases_by_first.setdefault(phrase.stems[0], []).append(phrase)
        for canonical, spec in values.items():
            for surface in list(spec.synonyms) or [canonical.replace("_", " ")]:
                for word in textnorm.words(fold(normalize(surface))):
                    s = stem(word)
                    self._tolerance[s] = _tolerance(s)
        self._delete_index: dict[str, set[str]] = {}
        for s, tol in self._tolerance.items():
            if tol and len(s) >= 4:
                for key in _deletes(s, tol):
                    self._delete_index.setdefault(key, set()).add(s)
        self._max_tol = max(self._tolerance.values(), default=0)
        self._longest_stem = max(map(len, self._tolerance), default=0)
        self._fuzzy_cache: dict[str, dict[str, int]] = {}

    def label(self, value: object, language: str) -> str:
        """The customer-facing label of a canonical value (``language``: en or zh)."""
        spec = self.options.values.get(str(value))
        if spec is None:
            return str(value)
        text = spec.label.zh if language == "zh" else spec.label.en
        return text or spec.label.en or str(value)

    def parse(self, value: object, *, today: date | None = None) -> str:
        text = _clean_text_value(self.name, value, allow_int=True)
        canonical = self._by_key.get(_key(text))
        if canonical is not None:
            return canonical
        choices = list(self.options.values)
        hint = _closest(_key(text), {_key(c): c for c in choices}, 2)
        reason = f"is not one of: {', '.join(choices)}"
        if hint:
            reason += f" (did you mean {self._by_key.get(hint, hint)!r}?)"
        raise self._error(value, reason)

    def _word_costs(self, text_stem: str) -> dict[str, int]:
        """Synonym stems within tolerance of ``text_stem`` and their edit costs (memoised)."""
        cached = self._fuzzy_cache.get(text_stem)
        if cached is not None:
            return cached
        costs: dict[str, int] = {}
        if text_stem in self._tolerance:
            costs[text_stem] = 0
        if (
            self._max_tol
            and 3 <= len(text_stem) <= self._longest_stem + self._max_tol
            and text_stem.isascii()
        ):
            seen: set[str] = set()
            for key in _deletes(text_stem, self._max_tol):
                for cand in self._delete_index.get(key, ()):
                    if cand in seen or cand == text_stem:
                        continue
                    seen.add(cand)
                    # Typos rarely hit the first letter, while real words one
                    # edit away from a synonym often differ there ("track" vs
                    # "crack", "brush" vs "crush"): require it, or a swap of
                    # the first two letters ("rfeund").
                    if text_stem[0] != cand[0] and text_stem[:2] != cand[1::-1]:
                        continue
                    tol = self._tolerance[cand]
                    dist = edit_distance(text_stem, cand, tol)
                    if dist <= tol:
                        costs[cand] = dist
        if len(self._fuzzy_cache) >= _MAX_FUZZY_CACHE:
            self._fuzzy_cache.clear()  # bounded memory; the cache refills from live traffic
        self._fuzzy_cache[text_stem] = costs
        return costs

    def _negated(self, folded: str, spans: Sequence[tuple[str, int, int]], index: int) -> bool:
        """A negation word in the two words (or Chinese characters) before the match."""
        start = spans[index][1] if index < len(spans) else len(folded)
        return self._negated_at(folded, start, spans, index)

    def _negated_at(
        self, folded: str, start: int, spans: Sequence[tuple[str, int, int]], index: int
    ) -> bool:
        before = folded[max(0, start - 6) : start]
        if _NEGATION_ZH_RE.search(before):
            return True
        for back in (1, 2):
            j = index - back
            if j < 0:
                break
            word, _, word_end = spans[j]
            if _CLAUSE_BREAK_RE.search(folded, word_end, start):
                break
            if word in _NEGATIONS_EN and (back == 1 or word != "no"):
                # "no damage" is negated, but "No it's broken" is an answer.
                return True
        return False

    def extract(self, text: str, *, today: date | None = None) -> list[Match]:
        folded = fold(text)
        stripped = folded.strip(_EDGE_PUNCT)
        if stripped and len(stripped) <= 64:
            whole = self._by_key.get(_key(stripped))
            if whole is not None:
                start = folded.index(stripped)
                return [Match(whole, start, start + len(stripped), 1.0)]
        found: list[Match] = []
        spans = textnorm.word_spans(text)
        if self._cjk_re is not None:
            starts = [s[1] for s in spans]
            for m in self._cjk_re.finditer(folded):
                index = bisect.bisect_left(starts, m.start())
                if self._negated_at(folded, m.start(), spans, index):
                    continue
                conf = 0.7 if len(m.group()) == 1 else 0.9
                found.append(Match(self._cjk_values[m.group()], m.start(), m.end(), conf))
        if self._phrases_by_first:
            found.extend(self._extract_phrases(folded, spans))
        return _resolve_overlaps(found)

    def _extract_phrases(
        self, folded: str, spans: Sequence[tuple[str, int, int]]
    ) -> Iterable[Match]:
        stems = [stem(w) for w, _, _ in spans]
        costs = [self._word_costs(s) for s in stems]
        for i, first_costs in enumerate(costs):
            for first, first_cost in first_costs.items():
                for phrase in self._phrases_by_first.get(first, ()):
                    result = self._match_phrase(phrase, i, costs, spans, folded)
                    if result is None:
                        continue
                    end_index, edits, gaps = result
                    if self._negated(folded, spans, i):
                        continue
                    conf = 0.9 - 0.15 * (edits + first_cost) - 0.1 * gaps
                    yield Match(
                        phrase.value, spans[i][1], spans[end_index][2], round(max(conf, 0.3), 2)
                    )

    @staticmethod
    def _match_phrase(
        phrase: _Phrase,
        i: int,
        costs: Sequence[dict[str, int]],
        spans: Sequence[tuple[str, int, int]],
        folded: str,
    ) -> tuple[int, int, int] | None:
        """Match the rest of ``phrase`` after word ``i``: (last index, edits, skipped words)."""
        pos, edits, gaps = i, 0, 0
        for target in phrase.stems[1:]:
            nxt = pos + 1
            if nxt < len(costs) and target in costs[nxt]:
                edits += costs[nxt][target]
                pos = nxt
                continue
            # Allow one filler word in a multi-word phrase ("never actually
            # arrived"), but not a negation and not across a clause break.
            skip = pos + 2
            if (
                gaps == 0
                and skip < len(costs)
                and target in costs[skip]
                and spans[pos + 1][0] not in _NEGATIONS_EN
                and not _CLAUSE_BREAK_RE.search(folded, spans[pos][2], spans[skip][1])
            ):
                edits += costs[skip][target]
                gaps += 1
                pos = skip
                continue
            return None
        if pos > i and _CLAUSE_BREAK_RE.search(folded, spans[i][2], spans[pos][1]):
            return None
        return pos, edits, gaps

    def json_schema(self) -> dict[str, JSONValue]:
        return self._schema({"type": "string", "enum": list(self.options.values)})

    def _detail(self) -> str:
        parts = []
        for canonical, spec in self.options.values.items():
            labels = [x for x in (spec.label.en, spec.label.zh) if x]
            parts.append(f"{canonical} ({' / '.join(labels)})" if labels else canonical)
        return "one of " + ", ".join(parts)


# --- email -----------------------------------------------------------------------------

_EMAIL_LOCAL = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_EMAIL_DOMAIN = r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,24}"
_EMAIL_RE = re.compile(
    rf"(?<![a-z0-9!#$%&'*+/=?^_`{{|}}~.-])(?P<local>{_EMAIL_LOCAL})@(?P<domain>{_EMAIL_DOMAIN})"
    r"(?![a-z0-9-]|\.[a-z0-9])",
    re.IGNORECASE,
)


class EmailOptions(EntityOptions):
    """Options of ``type: email``: none besides ``description`` and ``examples``."""


class EmailEntity(EntityType):
    """``type: email``: a pragmatic address check (no quoted local parts, no IDN domains)."""

    type_name = "email"
    Options = EmailOptions
    options: EmailOptions

    @staticmethod
    def _canonical(local: str, domain: str) -> str:
        return f"{local}@{domain.lower()}"

    def parse(self, value: object, *, today: date | None = None) -> str:
        text = _clean_text_value(self.name, value)
        # _clean_text_value lower-cases; the local part keeps the case typed.
        raw = unicodedata.normalize("NFKC", str(value)).strip().strip(_EDGE_PUNCT)
        raw = raw.replace("。", ".")
        if raw.lower().startswith("mailto:"):
            raw = raw[7:]
        m = _EMAIL_RE.fullmatch(raw)
        if m is None:
            if "@" not in text:
                reason = "has no @; expected an email address like name@example.com"
            elif text.count("@") > 1:
                reason = "has more than one @"
            elif "." not in text.split("@", 1)[1]:
                reason = "the part after @ has no dot; expected a domain like example.com"
            elif " " in text:
                reason = "contains spaces"
            else:
                reason = "is not a valid email address like name@example.com"
            raise self._error(value, reason)
        if len(m.group("local")) > 64 or len(raw) > 254:
            raise self._error(value, "is too long for an email address")
        return self._canonical(m.group("local"), m.group("domain"))

    def extract(self, text: str, *, today: date | None = None) -> list[Match]:
        if "@" not in text and "＠" not in text:
            return []  # fast path: most messages have no address
        searchable = text.translate(_EMAIL_FOLD)
        return [
            Match(self._canonical(m.group("local"), m.group("domain")), m.start(), m.end(), 0.95)
            for m in _EMAIL_RE.finditer(searchable)
            if len(m.group("local")) <= 64 and m.end() - m.start() <= 254
        ]

    def json_schema(self) -> dict[str, JSONValue]:
        return self._schema({"type": "string", "format": "email"})

    def _detail(self) -> str:
        return "an email address"


# Full-width forms and the Chinese full stop ("abc@qq。com") fold to ASCII, same length.
_EMAIL_FOLD = {**{c: chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)}, ord("。"): "."}


# --- phone -----------------------------------------------------------------------------

_PHONE_RE = re.compile(
    r"""
    (?<![a-z0-9+])
    (?:
        (?P<intl>(?:\+|00)\s?[1-9][0-9]{0,3}
            (?:[ .-]{0,2}(?:\(0\)\s?)?(?:\([0-9]{1,4}\)|[0-9]{1,5})){1,6})
      | (?P<cn>(?:\(\s?\+?86\s?\)\s?|86[ -])?1[ -]?[3-9](?:[ -]?[0-9]){9})
      | (?P<land>(?:\(0[1-9][0-9]{1,2}\)|0[1-9][0-9]{1,2})[ -]?[0-9]{3,4}[ -]?[0-9]{4})
    )
    (?![0-9a-z])
    """,
    re.VERBOSE,
)
_CN_MOBILE_RE = re.compile(r"1[3-9][0-9]{9}")
_CN_LANDLINE_RE = re.compile(r"(?:10|2[0-9]|[3-9][0-9]{2})[0-9]{7,8}")
_PHONE_CHARS_RE = re.compile(r"[0-9+()\s.\-]+")


class PhoneOptions(EntityOptions):
    """Options of ``type: phone``.

    ``international``: also accept numbers outside China, written with their
    country code (``+44 20 7946 0958``, ``0044…``). ``landline``: also accept
    Chinese fixed-line numbers with their area code (``010-6552 9988``).
    Chinese mobiles (``138 1234 5678``, ``+86 138…``) are always accepted.
    """

    international: bool = True
    landline: bool = True


class PhoneEntity(EntityType):
    """``type: phone``: a phone number, canonically E.164 (``+8613812345678``)."""

    type_name = "phone"
    Options = PhoneOptions
    options: PhoneOptions

    def _from_match(self, m: re.Match[str]) -> tuple[str, float]:
        """E.164 form and confidence of a phone-looking match, or ValueError with the reason."""
        if m.group("intl"):
            digits = re.sub(r"\(0\)", "", m.group("intl"))
            digits = re.sub(r"[^0-9]", "", digits.replace("+", "", 1))
            if m.group("intl").startswith("00"):
                digits = digits[2:]
            if digits.startswith("86"):
                return self._chinese(digits[2:]), 0.95
            if not self.options.international:
                raise ValueError("only Chinese numbers are accepted here")
            if not 8 <= len(digits) <= 15:
                raise ValueError(
                    f"has {len(digits)} digits; international numbers have 8 to 15 "
                    "including the country code"
                )
            return "+" + digits, 0.9
        if m.group("cn"):
            digits = re.sub(r"[^0-9]", "", m.group("cn"))
            if len(digits) == 13:
                digits = digits[2:]  # leading 86
            return self._chinese(digits), 0.95
        digits = re.sub(r"[^0-9]", "", m.group("land"))
        return self._chinese(digits[1:]), 0.8

    def _chinese(self, national: str) -> str:
        national = national.lstrip("0") if len(national) > 11 else national
        if _CN_MOBILE_RE.fullmatch(national):
            return "+86" + national
        if _CN_LANDLINE_RE.fullmatch(national):
            if not self.options.landline:
                raise ValueError("only mobile numbers are accepted here")
            return "+86" + national
        raise ValueError(
            "is not a valid Chinese number (mobiles have 11 digits starting 13-19); "
            "numbers from other countries need their country code, e.g. +44 20 7946 0958"
        )

    def parse(self, value: object, *, today: date | None = None) -> str:
        text = _clean_text_value(self.name, value, allow_int=True)
        if text.startswith("tel:"):
            text = text[4:]
        if not _PHONE_CHARS_RE.fullmatch(text):
            raise self._error(value, "contains characters that are not part of a phone number")
        m = _PHONE_RE.fullmatch(text)
        if m is not None:
            try:
                return self._from_match(m)[0]
            except ValueError as exc:
                raise self._error(value, str(exc)) from None
        digits = re.sub(r"[^0-9]", "", text)
        if digits.startswith("1") and len(digits) != 11 and not text.startswith(("+", "00")):
            reason = f"has {len(digits)} digits; a Chinese mobile number has 11 (138 1234 5678)"
        elif digits.startswith("0") and not text.startswith("00"):
            reason = (
                "has no country code; write it with one, e.g. +44 20 7946 0958, "
                "or a Chinese landline with its area code, e.g. 010-6552 9988"
            )
        else:
            reason = (
                "is not a phone number; expected a Chinese mobile like 138 1234 5678 "
                "or an international number like +44 20 7946 0958"
            )
        raise self._error(value, reason)

    def extract(self, text: str, *, today: date | None = None) -> list[Match]:
        folded = fold(text)
        found: list[Match] = []
        for m in _PHONE_RE.finditer(folded):
            if m.group("land") and not re.search(r"[ ()-]", m.group("land")):
                continue  # an unseparated 0-prefixed digit run is more likely an id
            try:
                value, conf = self._from_match(m)
            except ValueError:
                continue
            start, end = m.span()
            found.append(Match(value, start, end, conf))
        return found

    def json_schema(self) -> dict[str, JSONValue]:
        return self._schema({"type": "string", "pattern": r"^\+[1-9][0-9]{7,14}$"})

    def _detail(self) -> str:
        text = "a phone number (Chinese mobile like 138 1234 5678"
        if self.options.international:
            text += ", or international with country code like +44 20 7946 0958"
        return text + ")"


# --- registry ----------------------------------------------------------------------------

ENTITY_TYPES: dict[str, type[EntityType]] = {
    cls.type_name: cls
    for cls in (
        StringEntity,
        IntegerEntity,
        MoneyEntity,
        DateEntity,
        EnumEntity,
        EmailEntity,
        PhoneEntity,
    )
}


def build_entity(name: str, type_name: str, options: Mapping[str, object]) -> EntityType:
    """Build an entity from its YAML ``type:`` and type-specific options.

    Raises :class:`EntityOptionError` for an unknown type (suggesting the
    closest known name) or invalid options.
    """
    cls = ENTITY_TYPES.get(type_name)
    if cls is None:
        close = _closest(type_name, ENTITY_TYPES)
        hint = f" (did you mean {close!r}?)" if close else ""
        raise EntityOptionError(
            name,
            type_name,
            "type",
            f"unknown entity type {type_name!r}{hint}; known: {', '.join(ENTITY_TYPES)}",
        )
    return cls.from_options(name, options)
