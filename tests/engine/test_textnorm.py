"""Tests for engine.textnorm: normalisation, tokens, language, edit distance, Chinese numerals."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.textnorm import (
    chinese_number,
    cjk_bigrams,
    detect_language,
    edit_distance,
    fold,
    has_cjk,
    is_cjk_char,
    normalize,
    stem,
    tokens,
    word_spans,
    words,
)

# --- normalize / fold -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ＨＬ２０４８１２３４", "hl20481234"),
        ("  Hello\t\n  World  ", "hello world"),
        ("订单　号：ＨＬ１２", "订单 号:hl12"),  # ideographic space, full-width colon
        ("1，299", "1,299"),  # NFKC folds the full-width comma
        ("Don’t", "don't"),
        ("a\x00b\x07c", "a b c"),  # control characters count as whitespace
        ("", ""),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "ＨＬ２０４８１２３４",
        "İstanbul ﬁ ㎏ Ⅻ",  # characters whose lower-case or NFKC form is longer
        "emoji 😀👍🏽 text",
        "\x00\x01\u200b\ufeff\u2028",
        "混合 Mixed ＡＢＣ",
    ],
)
def test_fold_keeps_length_and_positions(text: str) -> None:
    folded = fold(text)
    assert len(folded) == len(text)


def test_fold_maps_full_width_and_case() -> None:
    assert fold("ＨＬ２０４８") == "hl2048"
    assert fold("￥１２９") == "¥129"
    assert fold("a–b—c−d") == "a-b-c-d"
    assert fold("x\u200by") == "x y"


def test_fold_keeps_full_width_comma() -> None:
    # "3，129元" lists two numbers in Chinese; it must not become "3,129".
    assert fold("3，129") == "3，129"


@given(st.text(max_size=300))
def test_fold_length_property(text: str) -> None:
    assert len(fold(text)) == len(text)


# --- tokens --------------------------------------------------------------------------


def test_words_are_latin_runs_with_apostrophes() -> None:
    assert words("I didn't get ＨＬ２０４８, 没收到!") == ["i", "didn't", "get", "hl2048"]
    assert words("café naïve") == ["café", "naïve"]
    assert words("全是中文") == []


def test_word_spans_point_into_original_text() -> None:
    text = "订单ＨＬ２０４８ never arrived"
    for word, start, end in word_spans(text):
        assert fold(text)[start:end] == word
    assert [w for w, _, _ in word_spans(text)] == ["hl2048", "never", "arrived"]


def test_tokens_interleave_words_and_han_characters() -> None:
    assert tokens("订单HL2048没到 yet") == ["订", "单", "hl2048", "没", "到", "yet"]


def test_cjk_bigrams() -> None:
    assert cjk_bigrams("我没收到，坏") == ["我没", "没收", "收到", "坏"]
    assert cjk_bigrams("my 快递 still") == ["快递"]
    assert cjk_bigrams("english only") == []


def test_has_cjk_and_is_cjk_char() -> None:
    assert has_cjk("my 快递")
    assert not has_cjk("ＨＬ２０４８ hello")
    assert not has_cjk("こんにちは")  # kana is not Chinese
    assert is_cjk_char("快")
    assert not is_cjk_char("a")
    assert not is_cjk_char("快递")


# --- detect_language ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("where is my order?", "en"),
        ("我的快递怎么还没到", "zh"),
        ("my 快递 still not arrived", "mixed"),
        ("I want to 退货", "mixed"),
        ("我的iPhone坏了", "zh"),  # a brand name does not make it mixed
        ("请问 refund 怎么弄", "zh"),
        ("订单HL20481234还没到", "zh"),  # order numbers are ignored
        ("HL20481234 still not here", "en"),
        ("Thanks so much for all your help today, it was great, 谢", "en"),
    ],
)
def test_detect_language(text: str, expected: str) -> None:
    assert detect_language(text) == expected


def test_detect_language_without_signal_returns_default() -> None:
    assert detect_language("HL20481234") == "en"
    assert detect_language("123 456 !!! 😀", default="zh") == "zh"
    assert detect_language("", default="mixed") == "mixed"


# --- edit_distance ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("refund", "refund", 0),
        ("refnud", "refund", 1),  # adjacent swap costs 1
        ("recieved", "received", 1),
        ("arived", "arrived", 1),
        ("kitten", "sitting", 3),
        ("", "abc", 3),
        ("abc", "", 3),
        ("ca", "abc", 3),  # OSA, not full Damerau: no edit inside a swapped pair
        ("快递", "快地", 1),
    ],
)
def test_edit_distance_unbounded(a: str, b: str, distance: int) -> None:
    assert edit_distance(a, b) == distance
    assert edit_distance(b, a) == distance


def test_edit_distance_bounded_stops_early() -> None:
    assert edit_distance("kitten", "sitting", 1) == 2
    assert edit_distance("abc", "xyz", 1) == 2
    assert edit_distance("short", "a much longer string", 2) == 3
    assert edit_distance("damaged", "damgaed", 1) == 1
    assert edit_distance("receive", "receipt", 2) == 2


@given(st.text(max_size=12), st.text(max_size=12), st.integers(0, 4))
def test_edit_distance_bounded_agrees_with_unbounded(a: str, b: str, limit: int) -> None:
    full = edit_distance(a, b)
    bounded = edit_distance(a, b, limit)
    assert bounded == (full if full <= limit else limit + 1)


def test_edit_distance_is_fast_on_long_strings() -> None:
    a = "x" * 5000
    b = "y" * 5000
    started = time.perf_counter()
    assert edit_distance(a, b, 2) == 3
    assert edit_distance(a, a + "z", 2) == 1
    assert time.perf_counter() - started < 0.5


# --- stem ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "group",
    [
        ("arrive", "arrived", "arriving", "arrives"),
        ("damage", "damaged", "damages"),
        ("refund", "refunds", "refunded", "refunding"),
        ("receive", "received", "receiving"),
        ("stop", "stopped", "stopping"),
        ("change", "changed", "changing"),
    ],
)
def test_stem_conflates_inflections(group: tuple[str, ...]) -> None:
    assert len({stem(w) for w in group}) == 1


def test_stem_leaves_short_and_special_words() -> None:
    assert stem("bed") == "bed"
    assert stem("miss") == "miss"
    assert stem("this") == "this"
    assert stem("status") == "status"
    assert stem("快递") == "快递"


# --- chinese_number --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("零", 0),
        ("三", 3),
        ("两", 2),
        ("十", 10),
        ("十二", 12),
        ("二十", 20),
        ("一百二十", 120),
        ("一百二十九", 129),
        ("一百零五", 105),
        ("一千零五", 1005),
        ("两百", 200),
        ("一百二", 120),  # colloquial elision
        ("三千五", 3500),
        ("两万五", 25000),
        ("三万五千", 35000),
        ("一万零五", 10005),
        ("十万", 100000),
        ("一亿三千万", 130_000_000),
        ("壹佰贰拾", 120),  # financial characters
        ("二〇二六", 2026),  # digit by digit
        ("一二三", 123),
        ("3万", 30000),
        ("1千2", 1200),
        ("15", 15),
        (" 十二 ", 12),
    ],
)
def test_chinese_number(text: str, value: int) -> None:
    assert chinese_number(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "百",
        "十百",
        "百百",
        "一二百",
        "三个",
        "三点五",
        "负三",
        "abc",
        "两两",
        "万万",
        "一" * 30,
    ],
)
def test_chinese_number_rejects(text: str) -> None:
    assert chinese_number(text) is None


@given(st.text(alphabet="零〇一二两三四五六七八九十百千万亿壹贰拾佰0123456789", max_size=30))
def test_chinese_number_never_raises(text: str) -> None:
    result = chinese_number(text)
    assert result is None or result >= 0


# --- hostile input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a" * 10_000,
        "快" * 10_000,
        "1" * 10_000,
        "\x00\xff" * 5_000,
        "😀" * 5_000,
        "".join(chr(c) for c in range(0, 0x3000, 3)),
    ],
)
def test_functions_survive_hostile_text(text: str) -> None:
    started = time.perf_counter()
    normalize(text)
    fold(text)
    words(text)
    tokens(text)
    cjk_bigrams(text)
    detect_language(text)
    has_cjk(text)
    chinese_number(text)
    assert time.perf_counter() - started < 0.5
