"""Tests for engine.safety.output_filter."""

from __future__ import annotations

import time
from typing import Any

import pytest

from engine.safety.output_filter import (
    CONTACT_MARKERS,
    LINK_MARKERS,
    FilteredOutput,
    filter_output,
    reply_language,
)
from engine.safety.redaction import PiiKind, PiiVault, Redactor

SHOP = ["shop.example"]
LINK_EN, LINK_ZH = LINK_MARKERS["en"], LINK_MARKERS["zh"]
CONTACT_EN, CONTACT_ZH = CONTACT_MARKERS["en"], CONTACT_MARKERS["zh"]


def _filter(
    text: str,
    *,
    vault: PiiVault | None = None,
    allowed_domains: list[str] = SHOP,
    **kwargs: Any,
) -> FilteredOutput:
    return filter_output(text, vault=vault, allowed_domains=allowed_domains, **kwargs)


def _vault() -> PiiVault:
    text = "我的邮箱 zhang@mail.example，卡 4111 1111 1111 1111，手机 138 1234 5678"
    return Redactor().redact(text).vault


# --------------------------------------------------------------------------- links


@pytest.mark.parametrize(
    "link",
    [
        "https://evil.example.net/login?x=1",
        "http://1.2.3.4/pay",
        "www.scam.io",
        "evil.com",
        "EVIL.COM/path?q=1",
        "login.bank-secure.cn/verify",
        "https://shop.example@evil.com/",
        "https://evil.com/?next=shop.example",
        "https://shop.example.evil.com/",
        "https://evilshop.example/",
        "weixin://dl/chat?abc",
    ],
)
def test_links_outside_the_allow_list_are_removed(link: str) -> None:
    result = _filter(f"Please visit {link} today.")
    assert result.text == f"Please visit {LINK_EN} today."
    assert result.removed == (link,)


@pytest.mark.parametrize(
    "link",
    [
        "https://shop.example/orders/HL24110387",
        "https://help.shop.example/faq#returns",
        "www.shop.example",
        "shop.example/returns",
        "http://SHOP.EXAMPLE:8080/x",
    ],
)
def test_allowed_domain_and_subdomains_are_kept(link: str) -> None:
    text = f"Please visit {link} today."
    assert _filter(text) == FilteredOutput(text, ())


def test_allow_list_entries_are_normalised() -> None:
    text = "see https://help.shop.example/x"
    allowed = ["https://www.Shop.Example/", " "]
    assert _filter(text, allowed_domains=allowed).text == text


def test_markdown_links() -> None:
    text = "See [our policy](https://shop.example/policy) or [click here](http://bad.com)."
    result = _filter(text)
    assert result.text == f"See [our policy](https://shop.example/policy) or {LINK_EN}."
    assert result.removed == ("[click here](http://bad.com)",)


def test_markdown_link_label_is_still_checked() -> None:
    text = "[call 138 1234 5678](https://shop.example/contact)"
    assert _filter(text).text == f"[call {CONTACT_EN}](https://shop.example/contact)"


def test_relative_markdown_links_are_kept() -> None:
    text = "See [returns](/help/returns) and [top](#top)."
    assert _filter(text).text == text


def test_url_trailing_punctuation_and_parentheses() -> None:
    assert _filter("(see https://evil.com/path).").text == f"(see {LINK_EN})."
    result = _filter("wiki https://evil.com/a_(b), ok")
    assert result.removed == ("https://evil.com/a_(b)",)


def test_schemes_without_host_are_removed() -> None:
    result = _filter("x javascript:alert(1) y data:text/html,hi")
    assert result.text == f"x {LINK_EN} y {LINK_EN}"


def test_chinese_reply_gets_chinese_markers() -> None:
    result = _filter("请访问 evil.com 或 https://phish.cn/a，也可以打 13812345678。")
    assert result.text == f"请访问 {LINK_ZH} 或 {LINK_ZH}，也可以打 {CONTACT_ZH}。"


def test_language_override() -> None:
    assert _filter("visit evil.com", language="zh-CN").text == f"visit {LINK_ZH}"
    assert _filter("访问 evil.com", language="en").text == f"访问 {LINK_EN}"
    assert reply_language("hello") == "en" and reply_language("你好") == "zh"


def test_full_width_obfuscated_domain() -> None:
    result = _filter("访问ｗｗｗ．ｅｖｉｌ．ｃｏｍ领取优惠")
    assert result.text == f"访问{LINK_ZH}领取优惠"
    assert result.removed == ("ｗｗｗ．ｅｖｉｌ．ｃｏｍ",)


# --------------------------------------------------------------------------- contacts


def test_emails_removed_unless_domain_allowed() -> None:
    text = "Write to help@shop.example or scammer@gmail.com."
    result = _filter(text)
    assert result.text == f"Write to help@shop.example or {CONTACT_EN}."
    assert result.removed == ("scammer@gmail.com",)


def test_mailto_and_tel_links_are_contacts() -> None:
    result = _filter("mailto:someone@evil.com or tel:+14155552671, mailto:help@shop.example")
    assert result.text == f"{CONTACT_EN} or {CONTACT_EN}, mailto:help@shop.example"


@pytest.mark.parametrize(
    "phone",
    ["138 1234 5678", "+86 139-8765-4321", "010-12345678", "+44 20 7946 0958", "400-820-8820"],
)
def test_phone_numbers_are_removed(phone: str) -> None:
    result = _filter(f"Call {phone} now")
    assert result.text == f"Call {CONTACT_EN} now"
    assert result.removed == (phone,)


def test_allowed_phones_match_by_digits() -> None:
    text = "热线 400 820 8820，或 0755-8888 6666，或 13812345678"
    result = _filter(text, allowed_phones=["400-820-8820", "+86 755 8888 6666"])
    assert result.text == f"热线 400 820 8820，或 0755-8888 6666，或 {CONTACT_ZH}"


@pytest.mark.parametrize(
    ("text", "handle"),
    [
        ("加我微信：kefu_2024 领红包", "kefu_2024"),
        ("微信号是 abc12345", "abc12345"),
        ("WeChat ID: shop-helper-88", "shop-helper-88"),
        ("QQ：12345678", "12345678"),
        ("qq号 987654321", "987654321"),
    ],
)
def test_im_handles_are_removed(text: str, handle: str) -> None:
    result = _filter(text)
    assert result.removed == (handle,)
    assert handle not in result.text


def test_phone_inside_allowed_url_is_not_cut() -> None:
    text = "详情 https://shop.example/orders/13812345678 请查看"
    assert _filter(text).text == text


# --------------------------------------------------------------------------- placeholders


def test_placeholders_restored_with_sensitive_kinds_masked() -> None:
    text = "确认邮件已发送到[EMAIL_1]，退款将退回卡[CARD_1]，我们会致电[PHONE_1]。"
    result = _filter(text, vault=_vault())
    assert result.text == (
        "确认邮件已发送到zhang@mail.example，退款将退回卡****1111，我们会致电138 1234 5678。"
    )
    assert result.removed == ()


def test_restored_customer_data_is_not_filtered_again() -> None:
    # mail.example is not an allowed domain, but it is the customer's own address.
    assert "zhang@mail.example" in _filter("sent to [EMAIL_1]", vault=_vault()).text


def test_mask_kinds_can_be_changed() -> None:
    result = _filter("card [CARD_1]", vault=_vault(), mask_kinds=())
    assert result.text == "card 4111 1111 1111 1111"
    result = _filter("mail [EMAIL_1]", vault=_vault(), mask_kinds={PiiKind.EMAIL})
    assert result.text == "mail ****mple"


def test_unknown_placeholders_are_removed() -> None:
    result = _filter("call [PHONE_9] or [EMAIL_1]", vault=_vault())
    assert result.text == f"call {CONTACT_EN} or zhang@mail.example"
    assert result.removed == ("[PHONE_9]",)
    assert _filter("mail [EMAIL_1]", vault=None).text == f"mail {CONTACT_EN}"


def test_restore_can_be_disabled() -> None:
    text = "mail [EMAIL_1], visit evil.com"
    result = _filter(text, vault=_vault(), restore_placeholders=False)
    assert result.text == f"mail [EMAIL_1], visit {LINK_EN}"


def test_placeholder_followed_by_parenthesis_is_not_a_markdown_link() -> None:
    assert _filter("[EMAIL_1](见上)", vault=_vault()).text == "zhang@mail.example(见上)"


# --------------------------------------------------------------------------- no false positives


@pytest.mark.parametrize(
    "text",
    [
        "Your order HL24110387 (¥1,299.00) ships 2026-11-21 via SF123456789012.",
        "您的订单HL24110387已发货，付款2899元，2026年11月21日送达，邮编518000。",
        "The Kettle Pro 1.7L (model X2) has firmware v1.2.3; see manual.pdf, e.g. page 4.",
        "Thanks.It works. Run install.sh, then read readme.md and app.py.",
        "Dr.Smith said i.e. the U.S. version costs $12.50 at 3 p.m.",
        "数量 x3，单价 ¥299，合计 ¥897。",
        "Your reference is 8234567890123456.",
        "",
    ],
)
def test_shop_replies_pass_unchanged(text: str) -> None:
    assert _filter(text) == FilteredOutput(text, ())


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "text",
    [
        "a." * 50_000,
        "a" * 100_000,
        "http://" + "a" * 100_000,
        "[" * 100_000,
        "[a](" * 25_000,
        "@" * 100_000,
        "微信" * 50_000,
        "微信" + " " * 100_000,
        "wechat id" + "\t" * 100_000 + ":",
        "1 " * 50_000,
        "x.com/" * 16_000,
    ],
    ids=[
        "dots",
        "letters",
        "long-url",
        "brackets",
        "md-open",
        "ats",
        "wechat",
        "wechat-spaces",
        "wechat-tabs",
        "digits",
        "urls",
    ],
)
def test_hostile_output_stays_linear(text: str) -> None:
    start = time.perf_counter()
    filter_output(text, vault=PiiVault(), allowed_domains=SHOP)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0
