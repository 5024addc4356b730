"""Filter model output before it is sent to a customer.

The model must not send customers elsewhere or hand out contact details: a
hallucinated hotline, a phishing link or "add me on WeChat" is a safety incident
even when the rest of the answer is right. :func:`filter_output` therefore

* removes links that do not point to an allowed domain: ``http(s)://`` and other
  scheme URLs (``mailto:``, ``tel:``, ``weixin://``, ``javascript:`` ...), ``www.``
  addresses, bare domains such as ``example.com`` and markdown links
  ``[text](url)`` (the whole link, so a misleading label does not survive);
* removes contact details: e-mail addresses (unless their domain is allowed), phone
  numbers (the detectors of :mod:`engine.safety.redaction`, plus 400/800 service
  numbers; unless listed in ``allowed_phones``) and WeChat/QQ handles introduced
  by 微信/WeChat/QQ;
* puts back placeholders (``[EMAIL_1]``) that the model echoed, from the
  conversation's own :class:`~engine.safety.redaction.PiiVault`: the customer's own
  data shown to the same customer. Cards, resident IDs and IBANs are shown masked
  (``****1111``) by default. A placeholder the vault does not know is removed.

Each removal is replaced by a neutral marker in the reply's language: Chinese
markers (``[链接已移除]``, ``[联系方式已隐藏]``) when the text contains CJK
characters, English ones (``[link removed]``, ``[contact details removed]``)
otherwise; ``language`` overrides the guess.

False-positive guards: bare domains are only recognised with a known top-level
domain (written in lower case for two-letter country codes, so ``Thanks.It`` or
``install.sh`` are left alone, and file names like ``manual.pdf`` never match);
phone numbers use the same checksum- and context-aware detectors as redaction, so
order numbers, amounts and dates in a reply are untouched. Links and contacts that
overlap are resolved left to right, so a phone-like path inside an allowed URL is
not cut out of it.

``FilteredOutput.removed`` holds the removed strings: model output, possibly
personal data, so do not log it verbatim.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from engine.safety.redaction import (
    DEFAULT_MASKED_KINDS,
    PiiKind,
    PiiVault,
    Redactor,
    normalize_for_detection,
)

__all__ = [
    "CONTACT_MARKERS",
    "LINK_MARKERS",
    "FilteredOutput",
    "filter_output",
    "reply_language",
]

Language = Literal["en", "zh"]

LINK_MARKERS: dict[Language, str] = {"en": "[link removed]", "zh": "[链接已移除]"}
CONTACT_MARKERS: dict[Language, str] = {
    "en": "[contact details removed]",
    "zh": "[联系方式已隐藏]",
}


@dataclass(frozen=True, slots=True)
class FilteredOutput:
    """Text safe to send, and the strings that were removed from it (do not log verbatim)."""

    text: str
    removed: tuple[str, ...]


# --------------------------------------------------------------------------- patterns

_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")

# Characters a URL may contain here: printable ASCII without quotes, angle brackets,
# square brackets, braces, backtick, pipe, backslash and caret.
_URL_CHARS = r"[A-Za-z0-9\-._~:/?#@!$&*+,;=%()]"
_TRAILING_PUNCT = ".,;:!?)'\""

# Long generic TLDs match in any case; two-letter country codes only in lower case.
_TLD_ANY_CASE = (
    "com|net|org|info|biz|xyz|top|shop|store|online|site|app|dev|link|club|vip|ltd"
    "|wang|xin|live|life|world|today|tech|space|website|fun|icu|cloud|email|click|help"
    "|support|news|blog|page|mobi|asia|name|travel|jobs|work"
)
_TLD_LOWER = (
    "cn|io|co|me|cc|tv|ai|ly|gl|gg|la|ws|to|tk|ml|ga|cf|gq|pw|uk|us|de|jp|hk|tw|mo|sg"
    "|my|kr|au|ca|eu|nl|fr|es|it|ru|in|br|mx|ch|se|fi|dk|cz|be|ie|nz|za|ph|th|vn|tr|ua"
    "|ae|sa|ir|pk|bd|ng|ke|ar|cl|pe"
)
_DOMAIN = (
    r"(?:[A-Za-z0-9][A-Za-z0-9\-]{0,62}\.)+"
    r"(?:(?i:" + _TLD_ANY_CASE + r")|(?:" + _TLD_LOWER + r"))(?![A-Za-z0-9\-])"
)

_LINKS = re.compile(
    # [label](target): target must look like a link, so "[EMAIL_1](见上)" is not one.
    r"\[(?P<label>[^\[\]\n]{0,500})\]\((?P<target>"
    r"(?:[A-Za-z][A-Za-z0-9+.\-]{1,15}:|www\.|/|\#)[^()\s]{0,2048}"
    r"|" + _DOMAIN + r"(?:[/?#][^()\s]{0,2048})?"
    r")\)"
    r"|(?P<url>(?<![A-Za-z0-9])(?i:(?:https?|ftp|weixin|file)://|www\.)" + _URL_CHARS + r"+)"
    r"|(?P<scheme>(?<![A-Za-z0-9])(?i:mailto|tel|sms|javascript|data):" + _URL_CHARS + r"+)"
    r"|(?P<domain>(?<![A-Za-z0-9@.\-_/])" + _DOMAIN + r"(?:[/?#]" + _URL_CHARS + r"*)?)"
)

_SERVICE_NUMBER = re.compile(r"(?<![A-Za-z0-9])[48]00[ \-]?[0-9]{3}[ \-]?[0-9]{4}(?![0-9])")
_IM_HANDLE = re.compile(
    r"(?<![A-Za-z])(?i:微信号?|weixin|wechat|vx|qq号?)\s{0,3}(?i:号|id)?\s{0,3}[:：是为]?\s{0,3}"
    r"(?P<handle>[A-Za-z][A-Za-z0-9_\-]{5,19}|[1-9][0-9]{4,11})(?![A-Za-z0-9_\-])"
)
_PLACEHOLDER = re.compile(r"\[(?:EMAIL|PHONE|CARD|CN_ID|IBAN)_[1-9][0-9]{0,5}\]")

_CONTACT_DETECTOR = Redactor(kinds=(PiiKind.EMAIL, PiiKind.PHONE))

# --------------------------------------------------------------------------- helpers


def reply_language(text: str) -> Language:
    """``"zh"`` if the text contains CJK characters, else ``"en"``."""
    return "zh" if _CJK.search(text) else "en"


def _normalise_domains(domains: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for d in domains:
        d = d.strip().lower()
        if "://" in d:
            d = urlsplit(d).hostname or ""
        d = d.split("/", 1)[0].strip(".")
        d = d.removeprefix("www.")
        if d:
            out.append(d)
    return tuple(out)


def _host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    if not host:
        return False
    host = host.lower().strip(".")
    return any(host == d or host.endswith("." + d) for d in allowed)


def _url_host(url: str) -> str | None:
    if "://" not in url:
        url = "http://" + url
    try:
        return urlsplit(url).hostname
    except ValueError:  # malformed (e.g. a bad IPv6 literal): treat as not allowed
        return None


def _link_target_allowed(target: str, allowed: tuple[str, ...], phones: set[str]) -> bool:
    lowered = target.lower()
    if lowered.startswith(("/", "#")) and not lowered.startswith("//"):
        return True  # relative link to the shop's own site
    if lowered.startswith("mailto:"):
        address = target[7:].split("?", 1)[0]
        return _host_allowed(address.rpartition("@")[2], allowed)
    if lowered.startswith(("tel:", "sms:")):
        return _phone_allowed(target[4:], phones)
    if lowered.startswith(("javascript:", "data:", "vbscript:")):
        return False
    return _host_allowed(_url_host(target), allowed)


def _phone_key(value: str) -> str:
    return re.sub(r"[^0-9]", "", value).lstrip("0")


def _phone_allowed(value: str, phones: set[str]) -> bool:
    key = _phone_key(value)
    return any(min(len(key), len(p)) >= 7 and (key.endswith(p) or p.endswith(key)) for p in phones)


def _strip_trailing(text: str, start: int, end: int) -> int:
    """Drop trailing punctuation from a URL match; keep ')' when it closes a '('."""
    while end > start and text[end - 1] in _TRAILING_PUNCT:
        if text[end - 1] == ")" and text.count("(", start, end) >= text.count(")", start, end):
            break
        end -= 1
    return end


# --------------------------------------------------------------------------- filter

_Span = tuple[int, int, str, bool]  # start, end, "link" | "contact", allowed


def _find_spans(norm: str, allowed: tuple[str, ...], phones: set[str]) -> list[_Span]:
    spans: list[_Span] = []
    for m in _LINKS.finditer(norm):
        if m.group("target") is not None:
            ok = _link_target_allowed(m.group("target"), allowed, phones)
            if ok:  # keep the link; only its target is claimed, the label is still checked
                spans.append((m.start("target"), m.end("target"), "link", True))
            else:
                spans.append((m.start(), m.end(), "link", False))
            continue
        end = _strip_trailing(norm, m.start(), m.end())
        value = norm[m.start() : end]
        ok = _link_target_allowed(value, allowed, phones)
        is_contact = m.group("scheme") is not None and not value.lower().startswith(
            ("javascript:", "data:")
        )
        spans.append((m.start(), end, "contact" if is_contact else "link", ok))
    for pii in _CONTACT_DETECTOR.detect(norm):
        value = norm[pii.start : pii.end]
        if pii.kind is PiiKind.EMAIL:
            ok = _host_allowed(value.rpartition("@")[2], allowed)
        else:
            ok = _phone_allowed(value, phones)
        spans.append((pii.start, pii.end, "contact", ok))
    for m in _SERVICE_NUMBER.finditer(norm):
        spans.append((m.start(), m.end(), "contact", _phone_allowed(m.group(0), phones)))
    for m in _IM_HANDLE.finditer(norm):
        spans.append((m.start("handle"), m.end("handle"), "contact", False))
    # Left to right; at the same start the longer span wins; overlaps are dropped.
    spans.sort(key=lambda s: (s[0], -s[1]))
    kept: list[_Span] = []
    last_end = 0
    for span in spans:
        if span[0] >= last_end:
            kept.append(span)
            last_end = span[1]
    return kept


def filter_output(
    text: str,
    *,
    vault: PiiVault | None,
    allowed_domains: Collection[str] = (),
    restore_placeholders: bool = True,
    allowed_phones: Collection[str] = (),
    mask_kinds: Collection[PiiKind] = DEFAULT_MASKED_KINDS,
    language: str | None = None,
) -> FilteredOutput:
    """Remove links and contact details the customer must not get; restore placeholders.

    ``allowed_domains`` (e.g. ``["shop.example"]``) allows that domain and its
    sub-domains for links and e-mail addresses; ``allowed_phones`` allows the shop's
    own numbers (compared by digits). With ``restore_placeholders`` the placeholders
    known to ``vault`` are replaced by the customer's values (``mask_kinds`` masked)
    and unknown ones removed; without it placeholders are left as they are.
    ``language`` (``"zh..."`` / ``"en..."``) picks the marker language; by default
    it follows the text.
    """
    lang: Language
    if language is not None:
        lang = "zh" if language.lower().startswith("zh") else "en"
    else:
        lang = reply_language(text)
    allowed = _normalise_domains(allowed_domains)
    phones = {k for k in (_phone_key(p) for p in allowed_phones) if k}
    markers = {"link": LINK_MARKERS[lang], "contact": CONTACT_MARKERS[lang]}

    removed: list[str] = []
    norm = normalize_for_detection(text)
    parts: list[str] = []
    last = 0
    for start, end, category, ok in _find_spans(norm, allowed, phones):
        if ok:
            continue
        parts.append(text[last:start])
        parts.append(markers[category])
        removed.append(text[start:end])
        last = end
    parts.append(text[last:])
    out = "".join(parts)

    if restore_placeholders and _PLACEHOLDER.search(out):
        active = vault if vault is not None else PiiVault()

        def unknown(placeholder: str) -> str:
            removed.append(placeholder)
            return markers["contact"]

        out = active.restore(out, mask=frozenset(mask_kinds), unknown=unknown)
    return FilteredOutput(out, tuple(removed))
