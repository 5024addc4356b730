"""The demo flows' actions, bound to a :class:`~engine.demo.shop.Shop`.

:func:`build_actions` returns a registry with five actions:

========================  ===========  ==========================================
name                      side effect  reads
========================  ===========  ==========================================
``lookup_order``          no           entity ``order_id``
``issue_refund``          yes          entities ``order_id``, ``reason``
``track_parcel``          no           entity ``order_id`` or ``tracking_no``
``open_lost_claim``       yes          entity ``order_id`` or ``tracking_no``
``change_address``        yes          entities ``order_id``, ``new_address``
========================  ===========  ==========================================

Identity rule: an order is only visible to the conversation's customer, i.e. when
the order's ``customer_id`` equals ``ctx.customer``. Demo sessions (web and CLI
visitors, the evaluation harness) are anonymous, so a customer id starting with
``demo:`` may see every order. Any other customer asking about someone else's
order gets exactly what they would get for an order that does not exist
(``found: false`` and nothing else), so the answer never tells them it exists.

Policy comes from the flow (``ctx.policy``) and is enforced here, in code:

- ``refund_auto_approve_max``: ``{"amount": "500.00", "currency": "CNY"}``; a refund
  above it, or any refund when it is missing, raises
  :class:`~engine.errors.PolicyViolation` (the engine hands the conversation to a
  human). The refunded amount is always the order's amount from the shop, never a
  number from the conversation.
- ``refund_window_days`` (default 30): days after delivery a refund is allowed.
- ``parcel_stuck_after_days`` (default 5): days without a tracking update after
  which a parcel counts as stuck.

Results are JSON: money as strings (``"129.00"``), times and dates in ISO 8601.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from engine.actions import ActionContext, ActionRegistry, ActionResult
from engine.demo.shop import (
    STUCK_AFTER_DAYS,
    Order,
    Shop,
    ShopError,
    money,
    normalize_order_id,
    normalize_tracking_no,
)
from engine.errors import ActionError, PolicyViolation

__all__ = [
    "DEFAULT_REFUND_WINDOW_DAYS",
    "DEMO_CUSTOMER_PREFIX",
    "REFUND_ETA_DAYS",
    "build_actions",
    "refund_block_reason",
]

#: Customers whose id starts with this may see every order (anonymous demo sessions).
DEMO_CUSTOMER_PREFIX = "demo:"
DEFAULT_REFUND_WINDOW_DAYS = 30
#: Working days until an approved refund reaches the original payment method.
REFUND_ETA_DAYS = 3


def refund_block_reason(order: Order, days_since_delivery: int | None, window: int) -> str | None:
    """Why ``order`` cannot be refunded (cap aside), or ``None`` when it can."""
    if order.status == "refunded":
        return "already_refunded"
    if order.status == "cancelled":
        return "cancelled"
    if order.status != "delivered" or days_since_delivery is None:
        return "not_delivered"
    if days_since_delivery > window:
        return "outside_window"
    return None


def build_actions(shop: Shop) -> ActionRegistry:
    """A registry of the demo actions, each a closure over ``shop``."""
    registry = ActionRegistry()

    async def lookup_order(ctx: ActionContext) -> ActionResult:
        """Look up the customer's order: status, amount, items and whether it can be refunded.

        Data: found, order_id, customer_matches, status, amount, currency, placed_at,
        delivered_at, days_since_delivery, items, item_summary, tracking_no, carrier,
        refundable, refund_block_reason, within_auto_cap. When the order is not found
        (or is not this customer's) every field but ``found`` and ``order_id`` is empty
        and ``refund_block_reason`` is ``"not_found"``.
        """
        raw = _required(ctx, "order_id", "lookup_order")
        order = await _visible_order(shop, ctx, order_id=raw)
        if order is None:
            return ActionResult(data=_order_not_found(normalize_order_id(raw)))
        now = shop.now()
        days = order.days_since_delivery(now)
        block = refund_block_reason(order, days, _refund_window(ctx, "lookup_order"))
        cap = _refund_cap(ctx)
        shipment = await shop.get_shipment(order.id)
        data = {
            "found": True,
            "order_id": order.id,
            "customer_matches": order.customer_id == ctx.customer,
            "status": order.status,
            "amount": money(order.amount),
            "currency": order.currency,
            "placed_at": order.placed_at.isoformat(),
            "delivered_at": None if order.delivered_at is None else order.delivered_at.isoformat(),
            "days_since_delivery": days,
            "items": [item.to_json() for item in order.items],
            "item_summary": ", ".join(
                f"{item.name} x{item.quantity}" if item.quantity > 1 else item.name
                for item in order.items
            ),
            "tracking_no": None if shipment is None else shipment.tracking_no,
            "carrier": None if shipment is None else shipment.carrier,
            "refundable": block is None,
            "refund_block_reason": block,
            "within_auto_cap": cap is not None
            and cap[1] == order.currency
            and order.amount <= cap[0],
        }
        return ActionResult(data=data, entities=_normalised(ctx, "order_id", order.id))

    async def issue_refund(ctx: ActionContext) -> ActionResult:
        """Refund the order's full amount, within the auto-approval cap of the flow's policy.

        Data: refund_id, order_id, amount, currency, status, eta_days. Raises
        PolicyViolation when the order is not refundable or its amount is above the
        cap (or no cap is configured), so a human decides.
        """
        name = "issue_refund"
        raw = _required(ctx, "order_id", name)
        order = await _visible_order(shop, ctx, order_id=raw)
        if order is None:
            raise ActionError(name, f"order {normalize_order_id(raw)} not found for this customer")
        # A retried turn finds the refund its first attempt made, even though the
        # order now reads "refunded".
        refund = await shop.find_refund(ctx.idempotency_key)
        if refund is None:
            block = refund_block_reason(
                order, order.days_since_delivery(shop.now()), _refund_window(ctx, name)
            )
            if block is not None:
                raise PolicyViolation(name, f"order {order.id} is not refundable: {block}")
            _check_cap(name, ctx, order.amount, order.currency)
            reason = str(ctx.entities.get("reason") or "unspecified")
            try:
                refund = await shop.create_refund(
                    order.id, order.amount, reason, ctx.idempotency_key
                )
            except ShopError as exc:
                raise ActionError(name, str(exc)) from exc
        elif refund.order_id != order.id:
            raise ActionError(name, f"idempotency key was used for order {refund.order_id}")
        return ActionResult(
            data={
                "refund_id": refund.id,
                "order_id": refund.order_id,
                "amount": money(refund.amount),
                "currency": refund.currency,
                "status": refund.status,
                "eta_days": REFUND_ETA_DAYS,
            }
        )

    async def track_parcel(ctx: ActionContext) -> ActionResult:
        """Track the parcel of an order (by order id or tracking number): status, ETA, last event.

        Data: found, shipped, order_id, order_status, tracking_no, carrier, carrier_zh,
        status, eta, last_update, days_since_update, stuck, last_event (time, location,
        location_en, location_zh, description_en, description_zh). Establishes the
        entity order_id when the parcel was found by tracking number.
        """
        order = await _order_from_parcel_entities(shop, ctx, "track_parcel")
        if order is None:
            return ActionResult(data=_parcel_not_found())
        shipment = await shop.get_shipment(order.id)
        data: dict[str, Any] = {
            **_parcel_not_found(),
            "found": True,
            "order_id": order.id,
            "order_status": order.status,
        }
        if shipment is not None:
            now = shop.now()
            events = await shop.tracking_events(order.id)
            data.update(
                shipped=True,
                tracking_no=shipment.tracking_no,
                carrier=shipment.carrier,
                carrier_zh=shipment.carrier_zh,
                status=shipment.status,
                eta=None if shipment.eta is None else shipment.eta.isoformat(),
                last_update=shipment.last_update.isoformat(),
                days_since_update=shipment.days_since_update(now),
                stuck=shipment.is_stuck(now, _stuck_after(ctx, "track_parcel")),
                last_event=events[-1].to_json() if events else None,
            )
        return ActionResult(data=data, entities=_normalised(ctx, "order_id", order.id))

    async def open_lost_claim(ctx: ActionContext) -> ActionResult:
        """Open a lost-parcel claim with the carrier, only for a parcel that is stuck.

        Data: opened, already_open, claim_id, status, order_id, tracking_no, carrier,
        reason. ``reason`` says why nothing was opened: not_found, not_shipped,
        delivered or not_stuck (null when opened).
        """
        name = "open_lost_claim"
        order = await _order_from_parcel_entities(shop, ctx, name)
        if order is None:
            return ActionResult(data=_claim_result(None, reason="not_found"))
        shipment = await shop.get_shipment(order.id)
        if shipment is None:
            return ActionResult(data=_claim_result(order.id, reason="not_shipped"))
        if shipment.status == "delivered":
            return ActionResult(data=_claim_result(order.id, reason="delivered"))
        if not shipment.is_stuck(shop.now(), _stuck_after(ctx, name)):
            return ActionResult(data=_claim_result(order.id, reason="not_stuck"))
        try:
            claim = await shop.open_claim(order.id, ctx.idempotency_key)
        except ShopError as exc:
            raise ActionError(name, str(exc)) from exc
        data = _claim_result(order.id, reason=None)
        data.update(
            opened=True,
            already_open=claim.idempotency_key != ctx.idempotency_key,
            claim_id=claim.id,
            status=claim.status,
            tracking_no=claim.tracking_no,
            carrier=claim.carrier,
        )
        return ActionResult(data=data)

    async def change_address(ctx: ActionContext) -> ActionResult:
        """Change the delivery address of an order that has not shipped yet.

        Data: changed, reason, change_id, order_id, new_address. ``reason`` says why
        nothing changed: not_found, already_shipped or cancelled (null when changed).
        """
        name = "change_address"
        raw = _required(ctx, "order_id", name)
        new_address = _required(ctx, "new_address", name)
        order = await _visible_order(shop, ctx, order_id=raw)
        result: dict[str, Any] = {
            "changed": False,
            "reason": None,
            "change_id": None,
            "order_id": normalize_order_id(raw) if order is None else order.id,
            "new_address": None,
        }
        if order is None:
            result["reason"] = "not_found"
            return ActionResult(data=result)
        try:
            change = await shop.change_address(order.id, new_address, ctx.idempotency_key)
        except ShopError as exc:
            if exc.code in ("already_shipped", "cancelled"):
                result["reason"] = exc.code
                return ActionResult(data=result)
            raise ActionError(name, str(exc)) from exc
        result.update(changed=True, change_id=change.id, new_address=change.new_address)
        return ActionResult(data=result)

    registry.add("lookup_order", lookup_order)
    registry.add("issue_refund", issue_refund, side_effect=True)
    registry.add("track_parcel", track_parcel)
    registry.add("open_lost_claim", open_lost_claim, side_effect=True)
    registry.add("change_address", change_address, side_effect=True)
    return registry


# --- Identity -------------------------------------------------------------------------------


def _may_see(ctx: ActionContext, order: Order) -> bool:
    return order.customer_id == ctx.customer or ctx.customer.startswith(DEMO_CUSTOMER_PREFIX)


async def _visible_order(shop: Shop, ctx: ActionContext, *, order_id: str) -> Order | None:
    order = await shop.get_order(order_id)
    return order if order is not None and _may_see(ctx, order) else None


async def _order_from_parcel_entities(shop: Shop, ctx: ActionContext, name: str) -> Order | None:
    """The order named by entity ``order_id``, else by entity ``tracking_no``."""
    order_id = _entity(ctx, "order_id")
    tracking_no = _entity(ctx, "tracking_no")
    if order_id is None and tracking_no is None:
        raise ActionError(name, "needs entity order_id or tracking_no; collect one first")
    order = None if order_id is None else await shop.get_order(order_id)
    # A tracking number sometimes lands in order_id: customers mix the two up.
    for number in (tracking_no, order_id):
        if order is None and number is not None:
            order = await shop.find_order_by_tracking(normalize_tracking_no(number))
    return order if order is not None and _may_see(ctx, order) else None


# --- Entities and policy --------------------------------------------------------------------


def _entity(ctx: ActionContext, name: str) -> str | None:
    value = ctx.entities.get(name)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _required(ctx: ActionContext, name: str, action: str) -> str:
    value = _entity(ctx, name)
    if value is None:
        raise ActionError(action, f"needs entity {name!r}; collect it before this state")
    return value


def _normalised(ctx: ActionContext, name: str, value: str) -> Mapping[str, Any]:
    """Set the entity to the shop's spelling of it when the customer typed it differently."""
    return {} if ctx.entities.get(name) == value else {name: value}


def _refund_window(ctx: ActionContext, action: str) -> int:
    return _days_policy(ctx, action, "refund_window_days", DEFAULT_REFUND_WINDOW_DAYS)


def _stuck_after(ctx: ActionContext, action: str) -> int:
    return _days_policy(ctx, action, "parcel_stuck_after_days", STUCK_AFTER_DAYS)


def _days_policy(ctx: ActionContext, action: str, key: str, default: int) -> int:
    value = ctx.policy.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ActionError(action, f"policy {key} must be a whole number of days, not {value!r}")
    return value


def _refund_cap(ctx: ActionContext) -> tuple[Decimal, str] | None:
    """``policy.refund_auto_approve_max`` as (amount, currency); ``None`` if not set."""
    cap = ctx.policy.get("refund_auto_approve_max")
    if cap is None:
        return None
    try:
        if not isinstance(cap, Mapping):
            raise TypeError
        amount = Decimal(str(cap["amount"]))
        currency = str(cap["currency"])
    except (KeyError, TypeError, InvalidOperation):
        raise ActionError(
            "issue_refund",
            f"policy refund_auto_approve_max must look like "
            f'{{amount: "500.00", currency: CNY}}, not {cap!r}',
        ) from None
    if not amount.is_finite():
        raise ActionError("issue_refund", f"policy refund_auto_approve_max amount is {amount}")
    return amount, currency


def _check_cap(name: str, ctx: ActionContext, amount: Decimal, currency: str) -> None:
    cap = _refund_cap(ctx)
    if cap is None:
        raise PolicyViolation(
            name,
            "no auto-approval cap configured (policy refund_auto_approve_max); "
            "needs human approval",
        )
    cap_amount, cap_currency = cap
    if currency != cap_currency:
        raise PolicyViolation(
            name,
            f"refund in {currency} but the auto-approval cap is in {cap_currency}; "
            "needs human approval",
        )
    if amount > cap_amount:
        raise PolicyViolation(
            name,
            f"refund of {money(amount)} {currency} exceeds the auto-approval cap of "
            f"{money(cap_amount)} {cap_currency}; needs human approval",
        )


# --- Result shapes --------------------------------------------------------------------------


def _order_not_found(order_id: str) -> dict[str, Any]:
    return {
        "found": False,
        "order_id": order_id,
        "customer_matches": False,
        "status": None,
        "amount": None,
        "currency": None,
        "placed_at": None,
        "delivered_at": None,
        "days_since_delivery": None,
        "items": [],
        "item_summary": None,
        "tracking_no": None,
        "carrier": None,
        "refundable": False,
        "refund_block_reason": "not_found",
        "within_auto_cap": False,
    }


def _parcel_not_found() -> dict[str, Any]:
    return {
        "found": False,
        "shipped": False,
        "order_id": None,
        "order_status": None,
        "tracking_no": None,
        "carrier": None,
        "carrier_zh": None,
        "status": None,
        "eta": None,
        "last_update": None,
        "days_since_update": None,
        "stuck": False,
        "last_event": None,
    }


def _claim_result(order_id: str | None, *, reason: str | None) -> dict[str, Any]:
    return {
        "opened": False,
        "already_open": False,
        "claim_id": None,
        "status": None,
        "order_id": order_id,
        "tracking_no": None,
        "carrier": None,
        "reason": reason,
    }
