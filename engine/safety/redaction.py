"""PII redaction: personal data is replaced by placeholders before any text reaches the model.

What is detected (:class:`PiiKind`):

``EMAIL``
    ``local@domain.tld``; plus-addressing and sub-domains included.
``PHONE``
    Chinese mobiles ``1[3-9]x xxxx xxxx`` with optional ``+86``/``0086`` and space or
    dash grouping; Chinese landlines written with an area code that is set off by a
    separator or parentheses (``010-12345678``, ``(0755) 1234 5678``); international
    numbers written with a leading ``+`` (``+44 20 7946 0958``, ``+1 (415) 555-2671``).
``CARD``
    Payment cards: 13-19 digits, optionally grouped by spaces or dashes, that pass the
    Luhn check.
``CN_ID``
    Chinese resident identity numbers: 18 characters (last may be ``X``) with a real
    province code, a real birth date and a valid ISO 7064 MOD 11-2 check character.
    The old 15-digit form has no check digit, so it is only accepted right after a
    word such as 身份证 or "ID card".
``IBAN``
    Country code, two check digits and the BBAN (spaces allowed), with the exact
    length registered for that country and a valid ISO 7064 MOD 97-10 checksum.

Every detected value is replaced by a placeholder such as ``[PHONE_1]``. The mapping
lives in a :class:`PiiVault`, one per conversation, so the same value always gets the
same placeholder across turns and the engine can put originals back (``restore``)
where a real value is needed: a confirmation sent to the same customer or an action
argument. The vault holds raw personal data; persist it with the conversation state and
never log it. :class:`Finding` only carries kind, offsets and placeholder, so findings
are safe to log.

Why the false-positive guards exist: a shop conversation is full of digits that are not
personal data (order numbers ``HL24110387``, tracking numbers ``SF123456789012``,
amounts, dates, postal codes, product models, 18-19 digit marketplace order numbers).
Redacting them would blind the model to exactly the information it needs, so every
kind is confirmed by a checksum or structure check, and the patterns refuse to start
or end inside a longer run of letters or digits:

* a number glued to letters (``SF…``, ``HL…``) is an identifier, never a phone or card;
* cards must start with a digit that card networks use (2-6, 8), be grouped like a card
  (no separators, or groups of 3-6 digits), pass Luhn, and an ungrouped run right
  after "order"/"tracking"/"SKU"/a courier name/订单/运单/快递… is taken as that
  number, as is a 13-digit run that is a valid EAN-13 barcode (unless "card"/卡 is
  nearby). An ungrouped run with no context that passes Luhn (1 in 10 random numbers)
  is still treated as a card: when in doubt, redact;
* resident IDs need a province code, a birth date that exists and is not in the future,
  and the check character, so random 18-digit order numbers do not qualify;
* landlines need a real area code set off by a separator or parentheses, so dates,
  amounts and plain digit strings never qualify; 400/800 service numbers are not
  personal and are left alone;
* international numbers need the ``+`` prefix and 8-15 digits in total (exactly 11
  for ``+1``).

Speed and safety of the scanner: all patterns are compiled once. E-mail addresses are
looked for only around each ``@``; everything else is tried only at candidate starts
(a digit run, ``+`` or ``(`` followed by at least seven digits, or a digit run right
after two letters for IBANs) found by one prefilter regex that begins with a character
class, so plain text is skipped inside the regex engine. At a candidate, one combined
alternation (in priority order) is matched and validated; if validation fails the later
alternatives are tried at the same place. Every repetition is bounded or separated by a
mandatory character and every pattern is anchored by a look-behind that stops it from
starting inside a run, so the scan is linear in the input length even for hostile input
(100 KB of digits, spaces, dots or ``@``). A typical 300-character message takes about
10-40 µs. Full-width digits, letters and punctuation (common with Chinese input methods)
are mapped to ASCII on a same-length copy used for detection, so offsets stay valid.

A second, optional layer is :class:`ContentClassifier`: an async classifier that can
refuse restricted content with :class:`ContentPolicyError`. Only :class:`NoopClassifier`
ships here; a model-backed classifier lives with the model layer.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from engine.errors import HelplineError

__all__ = [
    "DEFAULT_MASKED_KINDS",
    "Classification",
    "ContentClassifier",
    "ContentPolicyError",
    "Finding",
    "NoopClassifier",
    "PiiKind",
    "PiiSpan",
    "PiiVault",
    "Redacted",
    "Redactor",
    "VaultFormatError",
    "enforce_content_policy",
    "normalize_for_detection",
]


class PiiKind(StrEnum):
    """Kinds of personal data the redactor detects; the value is the placeholder prefix."""

    EMAIL = "EMAIL"
    PHONE = "PHONE"
    CARD = "CARD"
    CN_ID = "CN_ID"
    IBAN = "IBAN"


#: Kinds shown only as ``****`` plus the last four characters when restored for display.
DEFAULT_MASKED_KINDS: frozenset[PiiKind] = frozenset({PiiKind.CARD, PiiKind.CN_ID, PiiKind.IBAN})

# --------------------------------------------------------------------------- errors


class ContentPolicyError(HelplineError):
    """A content classifier refused the text; ``category`` says why (e.g. ``"self_harm"``)."""

    def __init__(self, category: str) -> None:
        self.category = category
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"content refused by policy: category {self.category!r}"


class VaultFormatError(HelplineError, ValueError):
    """A serialised :class:`PiiVault` is malformed; ``reason`` says which part."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"PII vault JSON is invalid: {self.reason} (persist it with PiiVault.to_json())"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class PiiSpan:
    """A detected value located in the text: ``text[start:end]``. Carries no value."""

    kind: PiiKind
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Finding:
    """One redacted value: where it was and which placeholder replaced it.

    Holds no raw value, so ``repr``/``str`` are safe to log.
    """

    kind: PiiKind
    start: int
    end: int
    placeholder: str


@dataclass(frozen=True, slots=True)
class _Entry:
    placeholder: str
    kind: PiiKind
    key: str  # canonical form used to recognise the same value again
    value: str  # the original spelling, as first seen

    def __repr__(self) -> str:
        return f"_Entry({self.placeholder})"


_PLACEHOLDER_RE = re.compile(r"\[(EMAIL|PHONE|CARD|CN_ID|IBAN)_([1-9][0-9]{0,5})\]")


class PiiVault:
    """Placeholder <-> original value mapping for one conversation.

    The same ``(kind, canonical value)`` always maps to the same placeholder, numbered
    per kind in order of first appearance. The vault contains raw personal data:
    persist it (``to_json``) with the conversation state, never log it; ``repr`` shows
    only the number of entries.
    """

    __slots__ = ("_by_key", "_by_placeholder", "_counts")

    _FORMAT = 1

    def __init__(self) -> None:
        self._by_key: dict[tuple[PiiKind, str], _Entry] = {}
        self._by_placeholder: dict[str, _Entry] = {}
        self._counts: dict[PiiKind, int] = {}

    def placeholder_for(self, kind: PiiKind, key: str, value: str) -> str:
        """Return the placeholder for ``(kind, key)``, allocating one for a new value."""
        entry = self._by_key.get((kind, key))
        if entry is None:
            n = self._counts.get(kind, 0) + 1
            self._counts[kind] = n
            entry = _Entry(f"[{kind.value}_{n}]", kind, key, value)
            self._add(entry)
        return entry.placeholder

    def _add(self, entry: _Entry) -> None:
        self._by_key[(entry.kind, entry.key)] = entry
        self._by_placeholder[entry.placeholder] = entry

    def value_of(self, placeholder: str) -> str | None:
        """The original value behind ``placeholder``, or ``None`` if unknown."""
        entry = self._by_placeholder.get(placeholder)
        return entry.value if entry is not None else None

    def kind_of(self, placeholder: str) -> PiiKind | None:
        """The kind behind ``placeholder``, or ``None`` if unknown."""
        entry = self._by_placeholder.get(placeholder)
        return entry.kind if entry is not None else None

    def placeholders(self) -> tuple[str, ...]:
        """All placeholders, in allocation order."""
        return tuple(self._by_placeholder)

    def restore(
        self,
        text: str,
        *,
        mask: Collection[PiiKind] = (),
        unknown: Callable[[str], str] | None = None,
    ) -> str:
        """Put original values back in place of the placeholders in ``text``.

        Kinds in ``mask`` are shown as ``****`` and their last four characters (use
        :data:`DEFAULT_MASKED_KINDS` for text shown to a customer). A placeholder not in
        this vault is left as is, or replaced by ``unknown(placeholder)`` when given.
        """
        if "[" not in text:
            return text

        def sub(m: re.Match[str]) -> str:
            entry = self._by_placeholder.get(m.group(0))
            if entry is None:
                return unknown(m.group(0)) if unknown is not None else m.group(0)
            if entry.kind in mask:
                return "****" + entry.key[-4:]
            return entry.value

        return _PLACEHOLDER_RE.sub(sub, text)

    def to_json(self) -> str:
        """Serialise for storage with the conversation state (contains raw PII)."""
        entries = [
            {"p": e.placeholder, "k": e.kind.value, "key": e.key, "v": e.value}
            for e in self._by_placeholder.values()
        ]
        return json.dumps({"format": self._FORMAT, "entries": entries}, ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str) -> PiiVault:
        """Rebuild a vault serialised by :meth:`to_json`; raises :class:`VaultFormatError`."""
        try:
            raw: Any = json.loads(data)
        except (TypeError, ValueError) as exc:
            raise VaultFormatError(f"not JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != cls._FORMAT:
            raise VaultFormatError(f"expected an object with format {cls._FORMAT}")
        entries = raw.get("entries")
        if not isinstance(entries, list):
            raise VaultFormatError("'entries' must be a list")
        vault = cls()
        for i, item in enumerate(entries):
            if not isinstance(item, dict) or not all(
                isinstance(item.get(f), str) for f in ("p", "k", "key", "v")
            ):
                raise VaultFormatError(f"entry {i} must have string fields p, k, key, v")
            m = _PLACEHOLDER_RE.fullmatch(item["p"])
            if m is None or m.group(1) != item["k"]:
                raise VaultFormatError(f"entry {i}: placeholder {item['p']!r} does not match kind")
            if item["p"] in vault._by_placeholder:
                raise VaultFormatError(f"entry {i}: duplicate placeholder {item['p']!r}")
            kind = PiiKind(item["k"])
            vault._add(_Entry(item["p"], kind, item["key"], item["v"]))
            vault._counts[kind] = max(vault._counts.get(kind, 0), int(m.group(2)))
        return vault

    def __len__(self) -> int:
        return len(self._by_placeholder)

    def __contains__(self, placeholder: object) -> bool:
        return placeholder in self._by_placeholder

    def __repr__(self) -> str:
        return f"PiiVault({len(self)} entries)"


@dataclass(frozen=True, slots=True)
class Redacted:
    """Result of :meth:`Redactor.redact`: the safe text, what was replaced, and the vault."""

    text: str
    found: tuple[Finding, ...]
    vault: PiiVault


# --------------------------------------------------------------------------- normalisation

# Full-width digits, letters and the punctuation that can be part of a value (＠＋－（）．／％＿),
# the ideographic and no-break spaces and the usual dash look-alikes map to ASCII one code
# point for one, so offsets are preserved. Full-width ，：；？ are left alone: they are
# separators either way and are too common in Chinese text to pay for.
_NEEDS_NORMALISE = re.compile(
    "[\u00a0\u2010-\u2014\u202f\u2212\u3000\uff05\uff08\uff09\uff0b\uff0d-\uff19"
    "\uff20-\uff3a\uff3f\uff41-\uff5a]"
)
_NORMALISED: dict[str, str] = {chr(cp): chr(cp - 0xFEE0) for cp in range(0xFF01, 0xFF5F)}
_NORMALISED.update({"\u3000": " ", "\u00a0": " ", "\u202f": " ", "\u2212": "-"})
_NORMALISED.update({chr(cp): "-" for cp in range(0x2010, 0x2015)})


def _normalised_char(m: re.Match[str]) -> str:
    return _NORMALISED[m.group(0)]


def normalize_for_detection(text: str) -> str:
    """Map full-width digits, letters, value punctuation and odd spaces/dashes to ASCII.

    The result has exactly the same length as ``text``, so offsets found in it
    apply to the original.
    """
    if text.isascii():
        return text
    return _NEEDS_NORMALISE.sub(_normalised_char, text)


# --------------------------------------------------------------------------- patterns

_EMAIL = (
    r"(?<![A-Za-z0-9._%+\-])"
    r"[A-Za-z0-9_%+\-](?:[A-Za-z0-9._%+\-]{0,63})"
    r"@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62})(?:\.[A-Za-z0-9\-]{1,63})*\.[A-Za-z]{2,24}"
    r"(?![A-Za-z0-9\-])"
)
_CN_ID18 = (
    r"(?<![A-Za-z0-9])[1-9][0-9]{5} ?(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])"
    r"(?:0[1-9]|[12][0-9]|3[01]) ?[0-9]{3}[0-9Xx](?![A-Za-z0-9])"
)
_CN_ID15 = (
    r"(?<![A-Za-z0-9])[1-9][0-9]{5}[0-9]{2}(?:0[1-9]|1[0-2])"
    r"(?:0[1-9]|[12][0-9]|3[01])[0-9]{3}(?![A-Za-z0-9])"
)
_CARD = r"(?<![A-Za-z0-9])[2-68](?:[ \-]?[0-9]){12,18}(?![0-9])"
_MOBILE = (
    r"(?<![A-Za-z0-9+])(?:(?:\+|00)86[ \-]?|\(\+?86\) ?)?"
    r"1[3-9][0-9](?:[ \-]?[0-9]{4}){2}(?![0-9])"
)
_LANDLINE = (
    r"(?<![A-Za-z0-9])(?:\(0[1-9][0-9]{1,2}\)[ \-]?|0[1-9][0-9]{1,2}[ \-])"
    r"[1-9][0-9]{2,3}[ \-]?[0-9]{4}(?![0-9])"
)
_INTL_SEP = r"(?:[ .\-]?\([0-9]{1,4}\)[ .\-]?|[ .\-])"
_INTL = (
    r"(?<![A-Za-z0-9+])\+[1-9](?:[0-9]{0,2}(?:" + _INTL_SEP + r"[0-9]{1,6}){1,6}"
    r"|[0-9]{7,14})(?![0-9])"
)

# Priority order: at a given position the first alternative that matches *and*
# validates wins. E-mail addresses are found separately (around each '@', see
# ``_find_emails``) and take precedence, so ``13812345678@163.com`` is one e-mail.
_ALTERNATIVES: tuple[tuple[str, PiiKind, str], ...] = (
    ("id18", PiiKind.CN_ID, _CN_ID18),
    ("card", PiiKind.CARD, _CARD),
    ("id15", PiiKind.CN_ID, _CN_ID15),
    ("mobile", PiiKind.PHONE, _MOBILE),
    ("landline", PiiKind.PHONE, _LANDLINE),
    ("intl", PiiKind.PHONE, _INTL),
)
_SINGLE: dict[str, re.Pattern[str]] = {name: re.compile(p) for name, _, p in _ALTERNATIVES}
_KIND_OF: dict[str, PiiKind] = {name: kind for name, kind, _ in _ALTERNATIVES}
_EMAIL_RE = re.compile(_EMAIL)

# Candidate starts. Every digit-led alternative needs at least seven digits, so a
# candidate is a digit run, '+' or '(' (not glued to a letter or digit) followed by six
# more digits within short separator gaps; an IBAN candidate is a digit run that follows
# exactly two letters. Starting with a character class lets the regex engine skip plain
# text quickly, and the scanner only tries the full patterns at these few places.
_CANDIDATE = re.compile(
    r"[0-9+(](?:"
    r"(?<=(?<![A-Za-z0-9])[A-Za-z]{2}[0-9])(?P<iban>)"  # the IBAN starts two characters back
    r"|(?<![A-Za-z0-9+].)(?=(?:[ \-().+]{0,3}[0-9]){6})"
    r")"
)

# Longest local part and domain considered around an '@'.
_EMAIL_LOCAL_MAX = 64
_EMAIL_DOMAIN_MAX = 255

# --------------------------------------------------------------------------- validators

# Province-level codes (GB/T 2260); 71 Taiwan, 81 Hong Kong, 82 Macao, 83 Taiwan residents.
_CN_PROVINCES = frozenset(
    str(code)
    for code in (
        11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43,
        44, 45, 46, 50, 51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83,
    )
)  # fmt: skip
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"

# Registered IBAN lengths (SWIFT IBAN registry).
_IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
    "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}  # fmt: skip

# An ungrouped digit run right after one of these words is that kind of number,
# not a card; a card word in the same window overrides. "ean" / "sku" catch barcodes.
_CONTEXT_WINDOW = 24
_NOT_CARD_WORDS = re.compile(
    r"订单|单号|运单|快递|物流|包裹|发票|条码|货号|编码|顺丰|圆通|中通|申通|韵达|极兔|邮政|京东"
    r"|(?<![a-z])(?:orders?|tracking|waybill|shipment|parcel|invoice|consignment|sku|barcode"
    r"|ean|ref|reference|sf|yt|zto|sto|jd|ems|dhl|fedex|ups)(?![a-z])",
    re.IGNORECASE,
)
_CARD_SEPARATOR = re.compile(r"[ \-]")
_CARD_WORDS = re.compile(r"卡|card|visa|master|amex|银联|unionpay", re.IGNORECASE)
_ID_WORDS = re.compile(r"身份证|证件号|id\s*card|identity", re.IGNORECASE)


def luhn_ok(digits: str) -> bool:
    """Luhn (mod 10) check of a string of ASCII digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _ean13_ok(digits: str) -> bool:
    """GS1 check digit of an EAN-13 barcode (weights 1, 3 from the left)."""
    total = sum((ord(c) - 48) * (3 if i & 1 else 1) for i, c in enumerate(digits[:12]))
    return (10 - total % 10) % 10 == ord(digits[12]) - 48


def cn_id_check_char(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character for the first 17 digits of a resident ID."""
    s = sum((ord(c) - 48) * w for c, w in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[s % 11]


_IBAN_LETTERS = str.maketrans({chr(c): str(c - 55) for c in range(ord("A"), ord("Z") + 1)})


def iban_ok(iban: str) -> bool:
    """ISO 7064 MOD 97-10 check of a compact, upper-case IBAN."""
    moved = (iban[4:] + iban[:4]).translate(_IBAN_LETTERS)
    return moved.isdigit() and moved.isascii() and int(moved) % 97 == 1


def _birth_date_ok(yyyymmdd: str) -> bool:
    try:
        born = date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8]))
    except ValueError:
        return False
    return date(1900, 1, 1) <= born <= date.today()


def _region_ok(digits: str) -> bool:
    # 9 + province: the 2023 permanent-residence ID for foreigners uses the same layout.
    return digits[:2] in _CN_PROVINCES or (digits[0] == "9" and digits[1:3] in _CN_PROVINCES)


# A validator receives the normalised text and the candidate match; it returns the
# (possibly shortened) end offset and the canonical key, or None to reject.
_Validated = tuple[int, str] | None


def _check_email(norm: str, m: re.Match[str]) -> _Validated:
    value = m.group(0)
    if ".." in value or value.split("@", 1)[0].endswith("."):
        return None
    return m.end(), value.lower()


# One pattern per registered length: exactly that many characters, spaces allowed
# between them, and not followed by another letter or digit.
_IBAN_BODY: dict[int, re.Pattern[str]] = {
    n: re.compile(rf"[A-Za-z]{{2}}[0-9]{{2}}(?: ?[A-Za-z0-9]){{{n - 4}}}(?![A-Za-z0-9])")
    for n in set(_IBAN_LENGTHS.values())
}


def _match_iban(norm: str, start: int) -> _Validated:
    """An IBAN starting at ``start`` (two letters, then digits), or None."""
    length = _IBAN_LENGTHS.get(norm[start : start + 2].upper())
    if length is None:
        return None
    m = _IBAN_BODY[length].match(norm, start)
    if m is None:
        return None
    iban = m.group(0).replace(" ", "").upper()
    if not iban_ok(iban):
        return None
    return m.end(), iban


def _check_id18(norm: str, m: re.Match[str]) -> _Validated:
    compact = m.group(0).replace(" ", "").upper()
    if not _region_ok(compact) or not _birth_date_ok(compact[6:14]):
        return None
    if cn_id_check_char(compact[:17]) != compact[17]:
        return None
    return m.end(), compact


def _check_id15(norm: str, m: re.Match[str]) -> _Validated:
    digits = m.group(0)
    if not _region_ok(digits) or not _birth_date_ok("19" + digits[6:12]):
        return None
    before = norm[max(0, m.start() - _CONTEXT_WINDOW) : m.start()]
    if _ID_WORDS.search(before) is None:
        return None  # no check digit: only trusted when introduced as an ID number
    return m.end(), digits


def _card_groups(raw: str, offset: int) -> list[tuple[str, int]]:
    """Digit groups of a card candidate, each with its end offset in the text."""
    groups: list[tuple[str, int]] = []
    pos = offset
    for group in _CARD_SEPARATOR.split(raw):
        pos += len(group)
        groups.append((group, pos))
        pos += 1
    return groups


def _check_card(norm: str, m: re.Match[str]) -> _Validated:
    groups = _card_groups(m.group(0), m.start())
    # Try the longest prefix of whole groups first: a CVV or an unrelated number may
    # follow the card ("4111 1111 1111 1111 123").
    for n in range(len(groups), 0, -1):
        head = groups[:n]
        digits = "".join(g for g, _ in head)
        if len(digits) < 13:
            return None
        if n > 1 and not (len(head[0][0]) >= 4 and all(3 <= len(g) <= 6 for g, _ in head)):
            continue  # not grouped like a card (e.g. a date followed by a phone)
        if len(digits) > 19 or not luhn_ok(digits):
            continue
        if n == 1:
            before = norm[max(0, m.start() - _CONTEXT_WINDOW) : m.start()]
            if not _CARD_WORDS.search(before) and (
                _NOT_CARD_WORDS.search(before) or (len(digits) == 13 and _ean13_ok(digits))
            ):
                return None  # an order / tracking / barcode number that happens to pass Luhn
        return head[-1][1], digits
    return None


def _check_mobile(norm: str, m: re.Match[str]) -> _Validated:
    return m.end(), _NON_DIGITS.sub("", m.group(0))[-11:]


_AREA_CODE = re.compile(r"\(?(0[0-9]+)")


def _check_landline(norm: str, m: re.Match[str]) -> _Validated:
    raw = m.group(0)
    area = _AREA_CODE.match(raw)
    if area is None:  # pragma: no cover - the pattern guarantees an area code
        return None
    code = area.group(1)
    if len(code) == 3 and not (code == "010" or code.startswith("02")):
        return None
    if len(code) == 4 and code[1] in "12":
        return None
    return m.end(), _NON_DIGITS.sub("", raw)


_INTL_TAIL = re.compile(r"[ .\-][0-9]{1,6}$")
_NON_DIGITS = re.compile(r"[^0-9]")


def _intl_digits_ok(digits: str) -> bool:
    if not 8 <= len(digits) <= 15:
        return False
    return digits[0] != "1" or len(digits) == 11  # NANP: +1 and exactly ten digits


def _check_intl(norm: str, m: re.Match[str]) -> _Validated:
    raw = m.group(0)
    digits = _NON_DIGITS.sub("", raw)
    # Too long for E.164 (or for NANP): an unrelated number may follow ("... 2671 2 pcs");
    # drop trailing groups until the number fits.
    while not _intl_digits_ok(digits) and len(digits) > 8:
        tail = _INTL_TAIL.search(raw)
        if tail is None:
            break
        raw = raw[: tail.start()]
        digits = _NON_DIGITS.sub("", raw)
    if not _intl_digits_ok(digits):
        return None
    return m.start() + len(raw), "+" + digits


_VALIDATORS: dict[str, Callable[[str, re.Match[str]], _Validated]] = {
    "id18": _check_id18,
    "card": _check_card,
    "id15": _check_id15,
    "mobile": _check_mobile,
    "landline": _check_landline,
    "intl": _check_intl,
}


_EMAIL_LOCAL_CHARS = frozenset(string.ascii_letters + string.digits + "._%+-")


def _find_emails(norm: str) -> list[tuple[PiiKind, int, int, str]]:
    """E-mail hits, found by looking around each '@' only (bounded windows: linear time)."""
    hits: list[tuple[PiiKind, int, int, str]] = []
    n = len(norm)
    pos = 0
    while (at := norm.find("@", pos)) >= 0:
        # Walk back over the local part (at most 64 characters, never into a previous hit).
        start = at
        floor = max(pos, at - _EMAIL_LOCAL_MAX)
        while start > floor and norm[start - 1] in _EMAIL_LOCAL_CHARS:
            start -= 1
        hi = min(n, at + 1 + _EMAIL_DOMAIN_MAX)
        m = _EMAIL_RE.match(norm, start, hi) if start < at else None
        result = _check_email(norm, m) if m is not None and not m.end() == hi < n else None
        if m is None or result is None:
            pos = at + 1
            continue
        hits.append((PiiKind.EMAIL, m.start(), result[0], result[1]))
        pos = m.end()
    return hits


# --------------------------------------------------------------------------- redactor


class Redactor:
    """Finds personal data in text and replaces it with vault placeholders.

    ``kinds`` restricts detection to a subset (default: all). Instances are immutable
    and thread-safe; build one and reuse it.
    """

    __slots__ = ("_combined", "_emails", "_iban", "_kinds", "_names")

    def __init__(self, kinds: Iterable[PiiKind] | None = None) -> None:
        wanted = frozenset(PiiKind) if kinds is None else frozenset(kinds)
        self._kinds = wanted
        self._emails = PiiKind.EMAIL in wanted
        self._iban = PiiKind.IBAN in wanted
        # IBANs are tried from their own candidates; the rest share one alternation.
        self._names = tuple(name for name, kind, _ in _ALTERNATIVES if kind in wanted)
        self._combined: re.Pattern[str] | None = (
            re.compile("|".join(f"(?P<{name}>{_SINGLE[name].pattern})" for name in self._names))
            if self._names
            else None
        )

    @property
    def kinds(self) -> frozenset[PiiKind]:
        return self._kinds

    def detect(self, text: str) -> tuple[PiiSpan, ...]:
        """Locate personal data without touching a vault."""
        norm = normalize_for_detection(text)
        return tuple(PiiSpan(kind, s, e) for kind, s, e, _ in self._scan(norm))

    def _scan(self, norm: str) -> list[tuple[PiiKind, int, int, str]]:
        """Non-overlapping ``(kind, start, end, canonical key)`` hits, in text order."""
        emails = _find_emails(norm) if self._emails and "@" in norm else []
        if self._combined is None and not self._iban:
            return emails
        hits: list[tuple[PiiKind, int, int, str]] = []
        n_emails = len(emails)
        ei = 0  # first e-mail that does not end before the scan position
        pos = 0
        while (c := _CANDIDATE.search(norm, pos)) is not None:
            is_iban = c.group("iban") is not None
            start = c.start() - 2 if is_iban else c.start()
            while ei < n_emails and emails[ei][2] <= start:
                ei += 1
            next_email = emails[ei][1] if ei < n_emails else len(norm) + 1
            if next_email <= start:  # inside an e-mail address
                pos = max(emails[ei][2], c.end())
                continue
            hit = self._hit_at(norm, start, is_iban)
            if hit is None or hit[2] > next_email:
                pos = c.end()
                continue
            hits.append(hit)
            pos = hit[2]
        if emails:
            hits.extend(emails)
            hits.sort(key=lambda hit: hit[1])
        return hits

    def _hit_at(
        self, norm: str, start: int, is_iban: bool
    ) -> tuple[PiiKind, int, int, str] | None:
        """The highest-priority kind that matches and validates at ``start``."""
        if is_iban:
            result = _match_iban(norm, start) if self._iban else None
            return None if result is None else (PiiKind.IBAN, start, *result)
        if self._combined is None or (m := self._combined.match(norm, start)) is None:
            return None
        name = m.lastgroup or ""
        if (result := _VALIDATORS[name](norm, m)) is not None:
            return (_KIND_OF[name], start, *result)
        # The alternatives before `name` did not match here; try the later ones.
        names = self._names
        for other in names[names.index(name) + 1 :]:
            om = _SINGLE[other].match(norm, start)
            if om is not None and (result := _VALIDATORS[other](norm, om)) is not None:
                return (_KIND_OF[other], start, *result)
        return None

    def redact(self, text: str, vault: PiiVault | None = None) -> Redacted:
        """Replace personal data in ``text`` by placeholders recorded in ``vault``.

        A new vault is created when none is given; the given vault is updated in place
        (and returned in the result) so placeholders stay stable across turns.
        """
        if vault is None:
            vault = PiiVault()
        hits = self._scan(normalize_for_detection(text))
        if not hits:
            return Redacted(text, (), vault)
        parts: list[str] = []
        found: list[Finding] = []
        last = 0
        for kind, start, end, key in hits:
            placeholder = vault.placeholder_for(kind, key, text[start:end])
            parts.append(text[last:start])
            parts.append(placeholder)
            found.append(Finding(kind, start, end, placeholder))
            last = end
        parts.append(text[last:])
        return Redacted("".join(parts), tuple(found), vault)


# --------------------------------------------------------------------------- classifier


@dataclass(frozen=True, slots=True)
class Classification:
    """Verdict of a :class:`ContentClassifier`; ``category`` names the restriction."""

    restricted: bool
    category: str | None = None


@runtime_checkable
class ContentClassifier(Protocol):
    """Optional second safety layer: decides whether (already redacted) text is restricted."""

    async def classify(self, text: str) -> Classification: ...


class NoopClassifier:
    """A classifier that restricts nothing (the default until a real one is configured)."""

    async def classify(self, text: str) -> Classification:
        return Classification(restricted=False, category=None)


async def enforce_content_policy(classifier: ContentClassifier, text: str) -> Classification:
    """Classify ``text``; raise :class:`ContentPolicyError` if it is restricted."""
    verdict = await classifier.classify(text)
    if verdict.restricted:
        raise ContentPolicyError(verdict.category or "unspecified")
    return verdict
