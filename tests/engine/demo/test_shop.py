"""The demo shop backend and the actions the demo flows call."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from engine.actions import ActionContext, ActionRegistry, ActionResult
from engine.demo import shop as shop_module
from engine.demo.actions import build_actions
from engine.demo.shop import (
    DEFAULT_TODAY,
    ORDER_BIG,
    ORDER_CANCELLED,
    ORDER_LOST,
    ORDER_LOST_2,
    ORDER_OLD,
    ORDER_OTHER,
    ORDER_OUT_FOR_DELIVERY,
    ORDER_PAID,
    ORDER_REFUNDED,
    ORDER_SHIPPED,
    ORDER_SLOW,
    ORDER_SMALL,
    ORDER_TRANSIT,
    SHOP_TZ,
    TRACKING_LOST,
    TRACKING_TRANSIT,
    Shop,
    ShopError,
    eval_placeholders,
)
from engine.errors import ActionError, PolicyViolation

POLICY: dict[str, Any] = {"refund_auto_approve_max": {"amount": "500.00", "currency": "CNY"}}
DEMO = "demo:web-7f3a"


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    async with Shop() as opened:
        yield opened


@pytest.fixture
def actions(shop: Shop) -> ActionRegistry:
    return build_actions(shop)


def ctx(
    customer: str = DEMO,
    key: str = "conv-1:turn-3",
    policy: Mapping[str, Any] = POLICY,
    **entities: Any,
) -> ActionContext:
    return ActionContext(
        conversation_id="conv-1",
        customer=customer,
        flow="refund",
        state="act",
        entities=entities,
        results={},
        policy=policy,
        idempotency_key=key,
    )


async def run(registry: ActionRegistry, name: str, context: ActionContext) -> ActionResult:
    result = await registry.get(name).fn(context)
    json.dumps(dict(result.data))  # results are stored as JSON
    return result


async def snapshot(shop: Shop) -> list[Any]:
    """Every seeded row, in a stable order, as plain values."""
    rows: list[Any] = []
    async with shop._session() as session:
        for table in sorted(shop_module._TABLES, key=lambda t: str(t.__tablename__)):
            found = (await session.exec(select(table))).all()
            rows.extend(sorted(repr(row.model_dump()) for row in found))
    return rows


# --- Seed ----------------------------------------------------------------------------------


async def test_seed_is_deterministic() -> None:
    async with Shop() as first, Shop() as second:
        assert await snapshot(first) == await snapshot(second)


async def test_another_seed_keeps_the_scenario_orders() -> None:
    async with Shop() as first, Shop(seed=7) as second:
        assert await snapshot(first) != await snapshot(second)
        for order_id in (ORDER_SMALL, ORDER_BIG, ORDER_TRANSIT, ORDER_LOST, ORDER_OTHER):
            assert await first.get_order(order_id) == await second.get_order(order_id)


async def test_seed_covers_every_state(shop: Shop) -> None:
    async with shop._session() as session:
        orders = (await session.exec(select(shop_module.OrderRow))).all()
        shipments = (await session.exec(select(shop_module.ShipmentRow))).all()
    assert 38 <= len(orders) <= 45
    assert set(Counter(o.status for o in orders)) == {
        "paid",
        "shipped",
        "in_transit",
        "delivered",
        "refunded",
        "cancelled",
    }
    assert {
        "label_created",
        "in_transit",
        "out_for_delivery",
        "delivered",
        "exception",
        "lost",
    } <= {s.status for s in shipments}
    assert all(o.id.startswith("HL") and len(o.id) == 10 and o.id[2:].isdigit() for o in orders)
    assert len({s.tracking_no for s in shipments}) == len(shipments)


async def test_seed_includes_small_big_old_and_stuck_orders(shop: Shop) -> None:
    now = shop.now()
    async with shop._session() as session:
        ids = (await session.exec(select(shop_module.OrderRow.id))).all()
    orders = [o for o in [await shop.get_order(i) for i in ids] if o is not None]
    delivered = [o for o in orders if o.status == "delivered"]
    small = [o for o in delivered if o.amount <= 500 and (o.days_since_delivery(now) or 0) <= 30]
    assert len(small) >= 3
    assert any(o.amount > 500 for o in delivered)
    assert any((o.days_since_delivery(now) or 0) > 30 for o in delivered)
    stuck = []
    for order in orders:
        shipment = await shop.get_shipment(order.id)
        if (
            shipment is not None
            and shipment.days_since_update(now) >= 9
            and shipment.status in ("exception", "lost")
        ):
            stuck.append(order.id)
    assert set(stuck) == {ORDER_LOST, ORDER_LOST_2}


async def test_seed_is_built_around_today() -> None:
    async with Shop(today=date(2027, 3, 1)) as later:
        order = await later.get_order(ORDER_SMALL)
        assert order is not None and order.delivered_at is not None
        assert order.days_since_delivery(later.now()) == 5
        assert order.delivered_at.date() == date(2027, 2, 24)


def test_clock_defaults_to_today_in_china() -> None:
    shop = Shop()
    assert shop.now() == datetime(2026, 11, 21, 14, 0, tzinfo=SHOP_TZ)
    assert shop.today == DEFAULT_TODAY
    moving = Shop(clock=lambda: datetime(2026, 11, 25, 0, 0, tzinfo=SHOP_TZ))
    assert moving.now().day == 25


# --- Eval placeholders ---------------------------------------------------------------------


async def test_eval_placeholders_point_at_the_right_orders(shop: Shop) -> None:
    values = eval_placeholders()
    assert set(values) == {
        "order_small",
        "order_big",
        "order_transit",
        "tracking",
        "order_lost",
        "order_other",
    }
    now = shop.now()
    for name in ("order_small", "order_other"):
        order = await shop.get_order(values[name])
        assert order is not None and order.status == "delivered"
        assert order.amount <= Decimal("500.00")
        assert (order.days_since_delivery(now) or 99) <= 30
    assert values["order_small"] != values["order_other"]

    big = await shop.get_order(values["order_big"])
    assert big is not None and big.status == "delivered" and big.amount == Decimal("2899.00")
    assert (big.days_since_delivery(now) or 99) <= 30

    transit = await shop.get_shipment(values["order_transit"])
    assert transit is not None and transit.status == "in_transit"
    assert transit.tracking_no == values["tracking"] == TRACKING_TRANSIT
    assert not transit.is_stuck(now) and now - transit.last_update < timedelta(hours=12)
    found = await shop.find_order_by_tracking(values["tracking"])
    assert found is not None and found.id == values["order_transit"]

    lost = await shop.get_shipment(values["order_lost"])
    assert lost is not None and lost.is_stuck(now) and lost.days_since_update(now) >= 9


# --- Reads ---------------------------------------------------------------------------------


async def test_get_order(shop: Shop) -> None:
    order = await shop.get_order(ORDER_SMALL)
    assert order is not None
    assert order.items[0].name == "Aurora X2 wireless earbuds"
    assert order.amount == sum(i.line_total for i in order.items) == Decimal("129.00")
    assert order.currency == "CNY" and order.customer_id == "CU100232"
    assert order.placed_at.tzinfo is not None and order.placed_at.utcoffset() == timedelta(hours=8)
    assert await shop.get_order(" hl 2611-0842 ") == order
    assert await shop.get_order("HL00000000") is None
    data = order.to_json()
    assert data["amount"] == "129.00" and data["items"][0]["unit_price"] == "129.00"
    assert data["placed_at"].endswith("+08:00")
    json.dumps(data)


async def test_customer_and_their_orders(shop: Shop) -> None:
    customer = await shop.get_customer("CU100232")
    assert customer is not None and customer.name == "Wang Fang"
    mine = [o.id for o in await shop.orders_for_customer("CU100232")]
    assert ORDER_SMALL in mine and ORDER_OTHER in mine
    assert mine.index(ORDER_SMALL) < mine.index(ORDER_OTHER)  # newest first
    assert await shop.get_customer("CU000000") is None


async def test_shipment_and_tracking_events(shop: Shop) -> None:
    shipment = await shop.get_shipment(ORDER_TRANSIT)
    assert shipment is not None and shipment.carrier == "SF Express"
    assert shipment.tracking_no.startswith("SF") and len(shipment.tracking_no) == 14
    assert shipment.eta == DEFAULT_TODAY + timedelta(days=1)
    events = await shop.tracking_events(ORDER_TRANSIT)
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert events[-1].at == shipment.last_update
    assert events[0].location == "Shenzhen Longhua warehouse / 深圳龙华仓"
    assert any(
        e.location_en == "Shenzhen sorting centre" and e.location_zh == "深圳转运中心"
        for e in events
    )
    assert all(e.description_en and e.description_zh for e in events)
    assert await shop.tracking_events(ORDER_PAID) == []
    assert await shop.get_shipment(ORDER_PAID) is None
    lost = await shop.tracking_events(ORDER_LOST)
    assert lost[-1].status == "exception"


async def test_find_order_by_tracking(shop: Shop) -> None:
    order = await shop.find_order_by_tracking(TRACKING_LOST.lower())
    assert order is not None and order.id == ORDER_LOST
    assert await shop.find_order_by_tracking("SF000000000000") is None


async def test_stuck_rule(shop: Shop) -> None:
    now = shop.now()
    slow = await shop.get_shipment(ORDER_SLOW)
    assert slow is not None and slow.status == "in_transit"
    assert slow.days_since_update(now) == 6 and slow.is_stuck(now)
    assert not slow.is_stuck(now, after_days=7)
    fresh = await shop.get_shipment(ORDER_OUT_FOR_DELIVERY)
    assert fresh is not None and not fresh.is_stuck(now)


# --- Writes --------------------------------------------------------------------------------


async def test_create_refund_is_idempotent(shop: Shop) -> None:
    refund = await shop.create_refund(ORDER_SMALL, Decimal("129.00"), "damaged", "k1")
    assert refund.id.startswith("RF") and refund.id[2:].isdigit()
    assert refund.status == "approved" and refund.to_json()["amount"] == "129.00"
    again = await shop.create_refund(ORDER_SMALL, Decimal("129.00"), "damaged", "k1")
    assert again == refund
    order = await shop.get_order(ORDER_SMALL)
    assert order is not None and order.status == "refunded"
    assert await shop.find_refund("k1") == refund
    assert await shop.refunds_for_order(ORDER_SMALL) == [refund]
    with pytest.raises(ShopError) as error:
        await shop.create_refund(ORDER_SMALL, Decimal("129.00"), "damaged", "k2")
    assert error.value.code == "already_refunded"
    with pytest.raises(ShopError) as error:
        await shop.create_refund(ORDER_OTHER, Decimal("239.00"), "damaged", "k1")
    assert error.value.code == "idempotency_conflict"


@pytest.mark.parametrize(
    ("order_id", "amount", "code"),
    [
        (ORDER_CANCELLED, "899.00", "cancelled"),
        (ORDER_TRANSIT, "218.00", "not_delivered"),
        (ORDER_REFUNDED, "188.00", "already_refunded"),
        ("HL00000000", "1.00", "order_not_found"),
        (ORDER_OTHER, "239.01", "invalid_amount"),
        (ORDER_OTHER, "0", "invalid_amount"),
        (ORDER_OTHER, "12.345", "invalid_amount"),
    ],
)
async def test_create_refund_refuses(shop: Shop, order_id: str, amount: str, code: str) -> None:
    with pytest.raises(ShopError) as error:
        await shop.create_refund(order_id, Decimal(amount), "damaged", "k")
    assert error.value.code == code
    assert await shop.find_refund("k") is None


async def test_pending_review_refund_leaves_the_order_alone(shop: Shop) -> None:
    refund = await shop.create_refund(
        ORDER_BIG, Decimal("2899.00"), "damaged", "k", status="pending_review"
    )
    assert refund.status == "pending_review"
    order = await shop.get_order(ORDER_BIG)
    assert order is not None and order.status == "delivered"


async def test_open_claim_is_idempotent(shop: Shop) -> None:
    claim = await shop.open_claim(ORDER_LOST, "k1")
    assert claim.id.startswith("CL") and claim.status == "submitted"
    assert claim.tracking_no == TRACKING_LOST and claim.carrier == "YTO Express"
    assert await shop.open_claim(ORDER_LOST, "k1") == claim
    assert await shop.open_claim(ORDER_LOST, "k2") == claim  # one claim per order
    assert await shop.claims_for_order(ORDER_LOST) == [claim]
    for order_id, code in (
        (ORDER_SMALL, "delivered"),
        (ORDER_PAID, "no_shipment"),
        ("HL00000000", "order_not_found"),
    ):
        with pytest.raises(ShopError) as error:
            await shop.open_claim(order_id, f"k-{order_id}")
        assert error.value.code == code


async def test_change_address_before_shipping_only(shop: Shop) -> None:
    change = await shop.change_address(ORDER_PAID, "  上海市浦东新区  世纪大道100号 ", "k1")
    assert change.new_address == "上海市浦东新区 世纪大道100号"
    assert change.old_address.startswith("上海市静安区")
    assert await shop.change_address(ORDER_PAID, "ignored on retry", "k1") == change
    order = await shop.get_order(ORDER_PAID)
    assert order is not None and order.shipping_address == change.new_address
    for order_id, code in (
        (ORDER_SHIPPED, "already_shipped"),
        (ORDER_TRANSIT, "already_shipped"),
        (ORDER_CANCELLED, "cancelled"),
    ):
        with pytest.raises(ShopError) as error:
            await shop.change_address(order_id, "somewhere", f"k-{order_id}")
        assert error.value.code == code
    with pytest.raises(ShopError) as error:
        await shop.change_address(ORDER_PAID, "   ", "k-empty")
    assert error.value.code == "invalid_address"


async def test_reset_reseeds(shop: Shop) -> None:
    await shop.create_refund(ORDER_SMALL, Decimal("129.00"), "damaged", "k1")
    await shop.reset()
    order = await shop.get_order(ORDER_SMALL)
    assert order is not None and order.status == "delivered"
    assert await shop.find_refund("k1") is None
    assert await snapshot(shop) == await snapshot(shop)


async def test_file_database_persists_and_is_not_reseeded(tmp_path: Path) -> None:
    path = tmp_path / "var" / "shop.db"
    async with Shop(path) as first:
        await first.create_refund(ORDER_SMALL, Decimal("129.00"), "damaged", "k1")
    async with Shop(path) as second:
        order = await second.get_order(ORDER_SMALL)
        assert order is not None and order.status == "refunded"
        assert await second.find_refund("k1") is not None


async def test_concurrent_calls_share_one_refund(shop: Shop) -> None:
    refunds = await asyncio.gather(
        *(shop.create_refund(ORDER_SMALL, Decimal("129.00"), "damaged", "k") for _ in range(5))
    )
    reads = await asyncio.gather(*(shop.get_order(ORDER_SMALL) for _ in range(5)))
    assert len(set(refunds)) == 1
    assert {order.status for order in reads if order is not None} == {"refunded"}


async def test_a_key_committed_by_another_process_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "shop.db"
    async with Shop(path) as first, Shop(path) as second:
        won = await first.change_address(ORDER_PAID, "杭州市西湖区1号", "k")
        calls = 0
        by_key = Shop._by_key

        async def blind_once(session: Any, table: Any, key: str) -> Any:
            # The second process checked the key just before the first one committed.
            nonlocal calls
            calls += 1
            return None if calls == 1 else await by_key(session, table, key)

        monkeypatch.setattr(second, "_by_key", blind_once)
        assert await second.change_address(ORDER_PAID, "another address", "k") == won
        assert calls == 2
        order = await second.get_order(ORDER_PAID)
        assert order is not None and order.shipping_address == "杭州市西湖区1号"


async def test_closed_shop_says_so() -> None:
    with pytest.raises(RuntimeError, match="open"):
        await Shop().get_order(ORDER_SMALL)


# --- Actions -------------------------------------------------------------------------------


def test_registry(actions: ActionRegistry) -> None:
    assert list(actions) == [
        "change_address",
        "issue_refund",
        "lookup_order",
        "open_lost_claim",
        "track_parcel",
    ]
    side_effects = {name for name in actions if actions.get(name).side_effect}
    assert side_effects == {"change_address", "issue_refund", "open_lost_claim"}
    assert all(actions.get(name).description for name in actions)


async def test_lookup_order(actions: ActionRegistry) -> None:
    result = await run(actions, "lookup_order", ctx(order_id=ORDER_SMALL))
    data = result.data
    assert data["found"] is True and data["order_id"] == ORDER_SMALL
    assert data["status"] == "delivered" and data["amount"] == "129.00"
    assert data["currency"] == "CNY" and data["days_since_delivery"] == 5
    assert data["items"][0]["name"] == "Aurora X2 wireless earbuds"
    assert data["item_summary"] == "Aurora X2 wireless earbuds"
    assert data["refundable"] is True and data["refund_block_reason"] is None
    assert data["within_auto_cap"] is True
    assert data["customer_matches"] is False  # visible because it is a demo session
    assert data["tracking_no"] is not None and data["carrier"] == "SF Express"
    assert result.entities == {}


async def test_lookup_order_normalises_the_id(actions: ActionRegistry) -> None:
    result = await run(actions, "lookup_order", ctx(order_id="hl2611 0842"))
    assert result.data["found"] is True
    assert result.entities == {"order_id": ORDER_SMALL}


@pytest.mark.parametrize(
    ("order_id", "reason", "within_cap"),
    [
        (ORDER_OTHER, None, True),
        (ORDER_BIG, None, False),
        (ORDER_REFUNDED, "already_refunded", True),
        (ORDER_OLD, "outside_window", True),
        (ORDER_TRANSIT, "not_delivered", True),
        (ORDER_PAID, "not_delivered", False),
        (ORDER_CANCELLED, "cancelled", False),
        ("HL00000000", "not_found", False),
    ],
)
async def test_lookup_order_refund_block_reasons(
    actions: ActionRegistry, order_id: str, reason: str | None, within_cap: bool
) -> None:
    data = (await run(actions, "lookup_order", ctx(order_id=order_id))).data
    assert data["refund_block_reason"] == reason
    assert data["refundable"] is (reason is None)
    assert data["within_auto_cap"] is within_cap


async def test_lookup_order_refund_window_comes_from_policy(actions: ActionRegistry) -> None:
    policy = {**POLICY, "refund_window_days": 60}
    data = (await run(actions, "lookup_order", ctx(policy=policy, order_id=ORDER_OLD))).data
    assert data["refundable"] is True
    with pytest.raises(ActionError, match="refund_window_days"):
        await run(
            actions, "lookup_order", ctx(policy={"refund_window_days": "x"}, order_id=ORDER_OLD)
        )


async def test_identity_rule(actions: ActionRegistry) -> None:
    owner = await run(actions, "lookup_order", ctx(customer="CU100232", order_id=ORDER_SMALL))
    assert owner.data["found"] is True and owner.data["customer_matches"] is True
    stranger = await run(actions, "lookup_order", ctx(customer="CU100233", order_id=ORDER_SMALL))
    missing = await run(actions, "lookup_order", ctx(customer="CU100233", order_id="HL00000000"))
    assert stranger.data["found"] is False
    # Someone else's order looks exactly like one that does not exist.
    assert {**stranger.data, "order_id": None} == {**missing.data, "order_id": None}
    assert "demo" not in ORDER_SMALL
    telegram = ctx(customer="telegram:5512", order_id=ORDER_TRANSIT)
    assert (await run(actions, "track_parcel", telegram)).data["found"] is False
    with pytest.raises(ActionError, match="not found"):
        await run(actions, "issue_refund", ctx(customer="CU100233", order_id=ORDER_SMALL))
    claim = await run(actions, "open_lost_claim", ctx(customer="CU100232", order_id=ORDER_LOST))
    assert claim.data == {**claim.data, "opened": False, "reason": "not_found"}
    change = await run(
        actions, "change_address", ctx(customer="CU100231", order_id=ORDER_PAID, new_address="x")
    )
    assert change.data["changed"] is False and change.data["reason"] == "not_found"


async def test_actions_need_their_entities(actions: ActionRegistry) -> None:
    for name in ("lookup_order", "issue_refund", "track_parcel", "open_lost_claim"):
        with pytest.raises(ActionError, match="entity"):
            await run(actions, name, ctx())
    with pytest.raises(ActionError, match="new_address"):
        await run(actions, "change_address", ctx(order_id=ORDER_PAID))


async def test_issue_refund(shop: Shop, actions: ActionRegistry) -> None:
    # The amount comes from the shop, never from the conversation.
    context = ctx(order_id=ORDER_SMALL, reason="damaged", amount="0.01")
    result = await run(actions, "issue_refund", context)
    assert result.data == {
        "refund_id": result.data["refund_id"],
        "order_id": ORDER_SMALL,
        "amount": "129.00",
        "currency": "CNY",
        "status": "approved",
        "eta_days": 3,
    }
    refund = await shop.find_refund(context.idempotency_key)
    assert refund is not None and refund.reason == "damaged"
    assert refund.id == result.data["refund_id"]


async def test_issue_refund_retry_returns_the_same_refund(
    shop: Shop, actions: ActionRegistry
) -> None:
    first = await run(actions, "issue_refund", ctx(order_id=ORDER_SMALL, reason="damaged"))
    retry = await run(actions, "issue_refund", ctx(order_id=ORDER_SMALL, reason="damaged"))
    assert retry.data == first.data
    assert len(await shop.refunds_for_order(ORDER_SMALL)) == 1
    with pytest.raises(PolicyViolation, match="already_refunded"):
        await run(actions, "issue_refund", ctx(key="conv-1:turn-9", order_id=ORDER_SMALL))


async def test_issue_refund_above_the_cap_needs_a_human(
    shop: Shop, actions: ActionRegistry
) -> None:
    # Whatever the conversation claims, the cap is checked in code on the shop's amount.
    context = ctx(order_id=ORDER_BIG, reason="damaged", amount="100.00", approved=True)
    with pytest.raises(PolicyViolation) as error:
        await run(actions, "issue_refund", context)
    assert error.value.action == "issue_refund"
    assert error.value.reason == (
        "refund of 2899.00 CNY exceeds the auto-approval cap of 500.00 CNY; needs human approval"
    )
    assert await shop.refunds_for_order(ORDER_BIG) == []
    order = await shop.get_order(ORDER_BIG)
    assert order is not None and order.status == "delivered"


async def test_issue_refund_follows_the_policy_cap(actions: ActionRegistry) -> None:
    low = {"refund_auto_approve_max": {"amount": "100", "currency": "CNY"}}
    with pytest.raises(PolicyViolation, match=r"cap of 100\.00 CNY"):
        await run(actions, "issue_refund", ctx(policy=low, order_id=ORDER_SMALL))
    with pytest.raises(PolicyViolation, match="no auto-approval cap"):
        await run(actions, "issue_refund", ctx(policy={}, order_id=ORDER_SMALL))
    usd = {"refund_auto_approve_max": {"amount": "500.00", "currency": "USD"}}
    with pytest.raises(PolicyViolation, match="USD"):
        await run(actions, "issue_refund", ctx(policy=usd, order_id=ORDER_SMALL))
    with pytest.raises(ActionError, match="refund_auto_approve_max"):
        bad = {"refund_auto_approve_max": "500"}
        await run(actions, "issue_refund", ctx(policy=bad, order_id=ORDER_SMALL))
    exactly = {"refund_auto_approve_max": {"amount": 129, "currency": "CNY"}}
    result = await run(actions, "issue_refund", ctx(policy=exactly, order_id=ORDER_SMALL))
    assert result.data["status"] == "approved"


@pytest.mark.parametrize(
    ("order_id", "reason"),
    [
        (ORDER_REFUNDED, "already_refunded"),
        (ORDER_OLD, "outside_window"),
        (ORDER_TRANSIT, "not_delivered"),
        (ORDER_CANCELLED, "cancelled"),
    ],
)
async def test_issue_refund_rechecks_refundability(
    actions: ActionRegistry, order_id: str, reason: str
) -> None:
    with pytest.raises(PolicyViolation, match=reason):
        await run(actions, "issue_refund", ctx(order_id=order_id, reason="damaged"))


async def test_track_parcel_by_order_id(actions: ActionRegistry) -> None:
    result = await run(actions, "track_parcel", ctx(order_id=ORDER_TRANSIT))
    data = result.data
    assert data["found"] is True and data["shipped"] is True
    assert data["tracking_no"] == TRACKING_TRANSIT and data["carrier"] == "SF Express"
    assert data["status"] == "in_transit" and data["order_status"] == "in_transit"
    assert data["eta"] == "2026-11-22" and data["days_since_update"] == 0
    assert data["stuck"] is False
    event = data["last_event"]
    assert event["location_en"] and event["location_zh"] and event["description_zh"]
    assert event["time"] == data["last_update"]
    assert result.entities == {}


async def test_track_parcel_by_tracking_number(actions: ActionRegistry) -> None:
    result = await run(actions, "track_parcel", ctx(tracking_no=TRACKING_TRANSIT))
    assert result.data["order_id"] == ORDER_TRANSIT
    assert result.entities == {"order_id": ORDER_TRANSIT}
    mixed_up = await run(actions, "track_parcel", ctx(order_id=TRACKING_TRANSIT))
    assert mixed_up.data["found"] is True
    assert mixed_up.entities == {"order_id": ORDER_TRANSIT}


async def test_track_parcel_stuck_and_missing(actions: ActionRegistry) -> None:
    lost = (await run(actions, "track_parcel", ctx(order_id=ORDER_LOST))).data
    assert lost["stuck"] is True and lost["status"] == "exception"
    assert lost["days_since_update"] >= 9
    slow = (await run(actions, "track_parcel", ctx(order_id=ORDER_SLOW))).data
    assert slow["stuck"] is True and slow["status"] == "in_transit"
    patient = {**POLICY, "parcel_stuck_after_days": 10}
    slow = (await run(actions, "track_parcel", ctx(policy=patient, order_id=ORDER_SLOW))).data
    assert slow["stuck"] is False
    paid = (await run(actions, "track_parcel", ctx(order_id=ORDER_PAID))).data
    assert paid["found"] is True and paid["shipped"] is False and paid["order_status"] == "paid"
    nothing = (await run(actions, "track_parcel", ctx(tracking_no="SF000000000000"))).data
    assert nothing["found"] is False and nothing["stuck"] is False


async def test_open_lost_claim(shop: Shop, actions: ActionRegistry) -> None:
    first = await run(actions, "open_lost_claim", ctx(order_id=ORDER_LOST))
    assert first.data["opened"] is True and first.data["already_open"] is False
    assert first.data["claim_id"].startswith("CL") and first.data["status"] == "submitted"
    assert first.data["reason"] is None and first.data["tracking_no"] == TRACKING_LOST
    retry = await run(actions, "open_lost_claim", ctx(order_id=ORDER_LOST))
    assert retry.data == first.data
    later = await run(actions, "open_lost_claim", ctx(key="conv-2:turn-1", order_id=ORDER_LOST))
    assert later.data == {**first.data, "already_open": True}
    assert len(await shop.claims_for_order(ORDER_LOST)) == 1
    by_tracking = await run(actions, "open_lost_claim", ctx(key="k9", tracking_no=TRACKING_LOST))
    assert by_tracking.data["claim_id"] == first.data["claim_id"]


@pytest.mark.parametrize(
    ("order_id", "reason"),
    [
        (ORDER_TRANSIT, "not_stuck"),
        (ORDER_SMALL, "delivered"),
        (ORDER_PAID, "not_shipped"),
        ("HL00000000", "not_found"),
    ],
)
async def test_open_lost_claim_only_for_stuck_parcels(
    shop: Shop, actions: ActionRegistry, order_id: str, reason: str
) -> None:
    data = (await run(actions, "open_lost_claim", ctx(order_id=order_id))).data
    assert data["opened"] is False and data["reason"] == reason and data["claim_id"] is None
    assert await shop.claims_for_order(order_id) == []


async def test_change_address(shop: Shop, actions: ActionRegistry) -> None:
    context = ctx(order_id=ORDER_PAID, new_address="上海市浦东新区世纪大道100号")
    result = await run(actions, "change_address", context)
    assert result.data["changed"] is True and result.data["reason"] is None
    assert result.data["change_id"].startswith("AC")
    assert result.data["new_address"] == "上海市浦东新区世纪大道100号"
    assert await run(actions, "change_address", context) == result
    order = await shop.get_order(ORDER_PAID)
    assert order is not None and order.shipping_address == "上海市浦东新区世纪大道100号"


@pytest.mark.parametrize(
    ("order_id", "reason"),
    [
        (ORDER_SHIPPED, "already_shipped"),
        (ORDER_SMALL, "already_shipped"),
        (ORDER_CANCELLED, "cancelled"),
    ],
)
async def test_change_address_refused(
    shop: Shop, actions: ActionRegistry, order_id: str, reason: str
) -> None:
    before = await shop.get_order(order_id)
    context = ctx(order_id=order_id, new_address="北京市海淀区1号")
    data = (await run(actions, "change_address", context)).data
    assert data == {
        "changed": False,
        "reason": reason,
        "change_id": None,
        "order_id": order_id,
        "new_address": None,
    }
    assert await shop.get_order(order_id) == before


async def test_actions_use_the_shop_clock() -> None:
    later = datetime(2026, 12, 30, 12, 0, tzinfo=SHOP_TZ)
    async with Shop(clock=lambda: later) as shop:
        registry = build_actions(shop)
        data = (await run(registry, "lookup_order", ctx(order_id=ORDER_SMALL))).data
        assert data["refund_block_reason"] == "outside_window"
        assert data["days_since_delivery"] == 44
