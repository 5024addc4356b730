"""A demo order backend: customers, orders, shipments, refunds and claims in SQLite.

The demo flows (refund, logistics) need a shop to talk to. :class:`Shop` keeps
one in its own SQLite database, separate from the conversation store: in memory
by default (one connection shared across the engine, so every session sees the
same data), or in a file when a path is given.

The data is seeded deterministically from a fixed random seed and a fixed
"today" (default 2026-11-21): the same seed and day always give the same
customers, order ids, tracking numbers and events. The shop's clock
(:meth:`Shop.now`) stands still at 14:00 China time on that day unless a
``clock`` is passed, so "delivered 5 days ago" stays true whenever the demo runs.

The orders the demo and its evaluation rely on have fixed ids, listed once in
this module (``ORDER_SMALL``, ``ORDER_BIG`` ...); :func:`eval_placeholders` maps
the placeholders of ``eval/customers.yaml`` to them. About 27 more orders are
generated around them so the shop does not look staged.

The shop knows order states, not business policy: the refund cap and the refund
window belong to the flow's policy and are checked by the actions
(:mod:`engine.demo.actions`). The shop only refuses what is impossible, such as
refunding a cancelled order or changing the address of a parcel on its way.

Money is stored as integer fen (cents) and handed out as :class:`~decimal.Decimal`
with two places; times are stored in UTC and handed out in China Standard
Time (UTC+8). Every record has ``to_json()`` with money as strings (``"129.00"``)
and ISO dates, because action results are stored as JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, cast, get_args

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import registry
from sqlalchemy.pool import StaticPool
from sqlmodel import Field, SQLModel, col, delete, func, select, update
from sqlmodel.ext.asyncio.session import AsyncSession

from engine.errors import HelplineError

__all__ = [
    "CURRENCY",
    "DEFAULT_SEED",
    "DEFAULT_TODAY",
    "ORDER_BIG",
    "ORDER_CANCELLED",
    "ORDER_LOST",
    "ORDER_LOST_2",
    "ORDER_OLD",
    "ORDER_OTHER",
    "ORDER_OUT_FOR_DELIVERY",
    "ORDER_PAID",
    "ORDER_REFUNDED",
    "ORDER_SHIPPED",
    "ORDER_SLOW",
    "ORDER_SMALL",
    "ORDER_TRANSIT",
    "SHOP_TZ",
    "STUCK_AFTER_DAYS",
    "TRACKING_LOST",
    "TRACKING_TRANSIT",
    "AddressChange",
    "Claim",
    "Customer",
    "Order",
    "OrderItem",
    "OrderStatus",
    "Refund",
    "RefundStatus",
    "Shipment",
    "ShipmentStatus",
    "Shop",
    "ShopError",
    "TrackingEvent",
    "eval_placeholders",
    "money",
    "normalize_order_id",
    "normalize_tracking_no",
]

OrderStatus = Literal["paid", "shipped", "in_transit", "delivered", "refunded", "cancelled"]
ShipmentStatus = Literal[
    "label_created", "in_transit", "out_for_delivery", "delivered", "exception", "lost"
]
RefundStatus = Literal["approved", "pending_review"]
ClaimStatus = Literal["submitted"]

CURRENCY = "CNY"
DEFAULT_TODAY = date(2026, 11, 21)
DEFAULT_SEED = 20261121
#: China Standard Time; China has no daylight saving, so a fixed offset is exact.
SHOP_TZ = timezone(timedelta(hours=8), "CST")
#: A parcel with no tracking update for this many days counts as stuck.
STUCK_AFTER_DAYS = 5
_CLOCK_TIME = time(14, 0)

# --- The orders the demo flows and the evaluation rely on ------------------------------
# Keep these in one place: tests, the eval harness and the seed all read them here.

ORDER_SMALL = "HL26110842"  # delivered 5 days ago, 129.00: refunded automatically
ORDER_OTHER = "HL26110517"  # delivered 9 days ago, 239.00, same customer as ORDER_SMALL
ORDER_BIG = "HL26110903"  # delivered 3 days ago, 2,899.00 laptop: above the cap
ORDER_TRANSIT = "HL26111876"  # in transit, last tracking event 2 hours ago
TRACKING_TRANSIT = "SF142087315630"
ORDER_LOST = "HL26110295"  # exception, no tracking update for 12 days
TRACKING_LOST = "YT7309825516043"
ORDER_LOST_2 = "HL26110631"  # lost, no tracking update for 10 days
ORDER_SLOW = "HL26111454"  # in transit, but no update for 6 days: stuck
ORDER_OUT_FOR_DELIVERY = "HL26111733"
ORDER_SHIPPED = "HL26112011"  # label created yesterday: too late to change the address
ORDER_PAID = "HL26112105"  # paid, not shipped: the address can still change
ORDER_REFUNDED = "HL26110388"  # refunded already
ORDER_CANCELLED = "HL26111920"
ORDER_OLD = "HL26092714"  # delivered 48 days ago: outside a 30-day refund window

_FILLER_ORDERS = 27


def eval_placeholders() -> dict[str, str]:
    """Values for the placeholders in ``eval/customers.yaml`` (seeded shop, any seed)."""
    return {
        "order_small": ORDER_SMALL,
        "order_big": ORDER_BIG,
        "order_transit": ORDER_TRANSIT,
        "tracking": TRACKING_TRANSIT,
        "order_lost": ORDER_LOST,
        "order_other": ORDER_OTHER,
    }


class ShopError(HelplineError):
    """The shop refused an operation. ``code`` is a stable machine-readable reason.

    Codes: ``order_not_found``, ``already_refunded``, ``cancelled``, ``not_delivered``,
    ``invalid_amount``, ``already_shipped``, ``no_shipment``, ``delivered``,
    ``invalid_address``, ``idempotency_conflict``.
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"shop: {self.code}: {self.message}"


# --- Helpers ------------------------------------------------------------------------------


def money(value: Decimal) -> str:
    """``Decimal("129") -> "129.00"``: how money appears in JSON."""
    return f"{value.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):.2f}"


def _cents(value: Decimal) -> int:
    try:
        exact = value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    except InvalidOperation:
        raise ShopError("invalid_amount", f"{value!r} is not an amount of money") from None
    if exact != value:
        raise ShopError("invalid_amount", f"{value} has more than two decimal places")
    return int(exact * 100)


def _from_cents(cents: int) -> Decimal:
    return (Decimal(cents) / 100).quantize(Decimal("0.01"))


def _to_db(moment: datetime) -> datetime:
    if moment.utcoffset() is None:
        raise ValueError("the shop stores timezone-aware datetimes only")
    return moment.astimezone(UTC)


def _from_db(moment: datetime) -> datetime:
    # SQLModel hands aware datetimes back in UTC; SQLite itself keeps no offset.
    if moment.utcoffset() is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(SHOP_TZ)


def _opt_from_db(moment: datetime | None) -> datetime | None:
    return None if moment is None else _from_db(moment)


def _iso(moment: datetime | date | None) -> str | None:
    return None if moment is None else moment.isoformat()


def normalize_order_id(raw: str) -> str:
    """``" hl 2611-0842 " -> "HL26110842"``: customers type ids loosely."""
    return "".join(ch for ch in raw if ch.isalnum()).upper()


def normalize_tracking_no(raw: str) -> str:
    """Tracking numbers get the same treatment as order ids."""
    return normalize_order_id(raw)


def _record_id(prefix: str, idempotency_key: str) -> str:
    """A stable record id derived from the idempotency key: retries see the same id."""
    digest = hashlib.sha256(f"{prefix}:{idempotency_key}".encode()).digest()
    return f"{prefix}{int.from_bytes(digest[:8], 'big') % 10**10:010d}"


# --- Records handed out by the shop -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Customer:
    id: str
    name: str
    name_zh: str
    email: str
    phone: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "name_zh": self.name_zh,
            "email": self.email,
            "phone": self.phone,
        }


@dataclass(frozen=True, slots=True)
class OrderItem:
    sku: str
    name: str
    name_zh: str
    quantity: int
    unit_price: Decimal

    @property
    def line_total(self) -> Decimal:
        return self.unit_price * self.quantity

    def to_json(self) -> dict[str, Any]:
        return {
            "sku": self.sku,
            "name": self.name,
            "name_zh": self.name_zh,
            "quantity": self.quantity,
            "unit_price": money(self.unit_price),
        }


@dataclass(frozen=True, slots=True)
class Order:
    id: str
    customer_id: str
    status: OrderStatus
    amount: Decimal
    currency: str
    placed_at: datetime
    shipped_at: datetime | None
    delivered_at: datetime | None
    shipping_address: str
    items: tuple[OrderItem, ...]

    def days_since_delivery(self, now: datetime) -> int | None:
        """Calendar days in China time since delivery; ``None`` if not delivered."""
        if self.delivered_at is None:
            return None
        return (now.astimezone(SHOP_TZ).date() - self.delivered_at.astimezone(SHOP_TZ).date()).days

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "customer_id": self.customer_id,
            "status": self.status,
            "amount": money(self.amount),
            "currency": self.currency,
            "placed_at": _iso(self.placed_at),
            "shipped_at": _iso(self.shipped_at),
            "delivered_at": _iso(self.delivered_at),
            "shipping_address": self.shipping_address,
            "items": [item.to_json() for item in self.items],
        }


@dataclass(frozen=True, slots=True)
class Shipment:
    order_id: str
    tracking_no: str
    carrier: str
    carrier_zh: str
    status: ShipmentStatus
    shipped_at: datetime
    eta: date | None
    last_update: datetime

    def days_since_update(self, now: datetime) -> int:
        """Whole days since the last tracking event."""
        return max(0, (now - self.last_update) // timedelta(days=1))

    def is_stuck(self, now: datetime, after_days: int = STUCK_AFTER_DAYS) -> bool:
        """Exception or lost, or undelivered with no update for ``after_days`` days."""
        if self.status in ("exception", "lost"):
            return True
        return self.status != "delivered" and self.days_since_update(now) >= after_days

    def to_json(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "tracking_no": self.tracking_no,
            "carrier": self.carrier,
            "carrier_zh": self.carrier_zh,
            "status": self.status,
            "shipped_at": _iso(self.shipped_at),
            "eta": _iso(self.eta),
            "last_update": _iso(self.last_update),
        }


@dataclass(frozen=True, slots=True)
class TrackingEvent:
    at: datetime
    status: ShipmentStatus
    location_en: str
    location_zh: str
    description_en: str
    description_zh: str

    @property
    def location(self) -> str:
        """``"Shenzhen sorting centre / 深圳转运中心"``."""
        return f"{self.location_en} / {self.location_zh}"

    def to_json(self) -> dict[str, Any]:
        return {
            "time": _iso(self.at),
            "status": self.status,
            "location": self.location,
            "location_en": self.location_en,
            "location_zh": self.location_zh,
            "description_en": self.description_en,
            "description_zh": self.description_zh,
        }


@dataclass(frozen=True, slots=True)
class Refund:
    id: str
    order_id: str
    amount: Decimal
    currency: str
    reason: str
    status: RefundStatus
    idempotency_key: str
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "order_id": self.order_id,
            "amount": money(self.amount),
            "currency": self.currency,
            "reason": self.reason,
            "status": self.status,
            "created_at": _iso(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class Claim:
    id: str
    order_id: str
    tracking_no: str
    carrier: str
    status: ClaimStatus
    idempotency_key: str
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "order_id": self.order_id,
            "tracking_no": self.tracking_no,
            "carrier": self.carrier,
            "status": self.status,
            "created_at": _iso(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class AddressChange:
    id: str
    order_id: str
    old_address: str
    new_address: str
    idempotency_key: str
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "order_id": self.order_id,
            "old_address": self.old_address,
            "new_address": self.new_address,
            "created_at": _iso(self.created_at),
        }


# --- Tables (their own metadata: never mixed with the conversation store) --------------

_registry = registry()


class _ShopTable(SQLModel, registry=_registry):
    pass


class CustomerRow(_ShopTable, table=True):
    __tablename__ = "customers"
    id: str = Field(primary_key=True)
    name: str
    name_zh: str
    email: str
    phone: str


class OrderRow(_ShopTable, table=True):
    __tablename__ = "orders"
    id: str = Field(primary_key=True)
    customer_id: str = Field(foreign_key="customers.id", index=True)
    status: str
    amount_cents: int
    currency: str
    placed_at: datetime
    shipped_at: datetime | None = None
    delivered_at: datetime | None = None
    shipping_address: str


class OrderItemRow(_ShopTable, table=True):
    __tablename__ = "order_items"
    id: int | None = Field(default=None, primary_key=True)
    order_id: str = Field(foreign_key="orders.id", index=True)
    sku: str
    name: str
    name_zh: str
    quantity: int
    unit_price_cents: int


class ShipmentRow(_ShopTable, table=True):
    __tablename__ = "shipments"
    order_id: str = Field(primary_key=True, foreign_key="orders.id")
    tracking_no: str = Field(unique=True, index=True)
    carrier: str
    carrier_zh: str
    status: str
    shipped_at: datetime
    eta: date | None = None
    last_update: datetime


class TrackingEventRow(_ShopTable, table=True):
    __tablename__ = "tracking_events"
    id: int | None = Field(default=None, primary_key=True)
    order_id: str = Field(foreign_key="shipments.order_id", index=True)
    at: datetime
    status: str
    location_en: str
    location_zh: str
    description_en: str
    description_zh: str


class RefundRow(_ShopTable, table=True):
    __tablename__ = "refunds"
    id: str = Field(primary_key=True)
    order_id: str = Field(foreign_key="orders.id", index=True)
    amount_cents: int
    currency: str
    reason: str
    status: str
    idempotency_key: str = Field(unique=True)
    created_at: datetime


class ClaimRow(_ShopTable, table=True):
    __tablename__ = "claims"
    id: str = Field(primary_key=True)
    order_id: str = Field(foreign_key="orders.id", index=True)
    tracking_no: str
    carrier: str
    status: str
    idempotency_key: str = Field(unique=True)
    created_at: datetime


class AddressChangeRow(_ShopTable, table=True):
    __tablename__ = "address_changes"
    id: str = Field(primary_key=True)
    order_id: str = Field(foreign_key="orders.id", index=True)
    old_address: str
    new_address: str
    idempotency_key: str = Field(unique=True)
    created_at: datetime


_TABLES: tuple[type[_ShopTable], ...] = (
    TrackingEventRow,
    ShipmentRow,
    RefundRow,
    ClaimRow,
    AddressChangeRow,
    OrderItemRow,
    OrderRow,
    CustomerRow,
)


def _order_status(value: str) -> OrderStatus:
    if value not in get_args(OrderStatus):
        raise ValueError(f"unknown order status {value!r} in the shop database")
    return cast(OrderStatus, value)


def _shipment_status(value: str) -> ShipmentStatus:
    if value not in get_args(ShipmentStatus):
        raise ValueError(f"unknown shipment status {value!r} in the shop database")
    return cast(ShipmentStatus, value)


def _refund_status(value: str) -> RefundStatus:
    if value not in get_args(RefundStatus):
        raise ValueError(f"unknown refund status {value!r} in the shop database")
    return cast(RefundStatus, value)


def _customer(row: CustomerRow) -> Customer:
    return Customer(row.id, row.name, row.name_zh, row.email, row.phone)


def _order(row: OrderRow, items: Sequence[OrderItemRow]) -> Order:
    return Order(
        id=row.id,
        customer_id=row.customer_id,
        status=_order_status(row.status),
        amount=_from_cents(row.amount_cents),
        currency=row.currency,
        placed_at=_from_db(row.placed_at),
        shipped_at=_opt_from_db(row.shipped_at),
        delivered_at=_opt_from_db(row.delivered_at),
        shipping_address=row.shipping_address,
        items=tuple(
            OrderItem(i.sku, i.name, i.name_zh, i.quantity, _from_cents(i.unit_price_cents))
            for i in items
        ),
    )


def _shipment(row: ShipmentRow) -> Shipment:
    return Shipment(
        order_id=row.order_id,
        tracking_no=row.tracking_no,
        carrier=row.carrier,
        carrier_zh=row.carrier_zh,
        status=_shipment_status(row.status),
        shipped_at=_from_db(row.shipped_at),
        eta=row.eta,
        last_update=_from_db(row.last_update),
    )


def _event(row: TrackingEventRow) -> TrackingEvent:
    return TrackingEvent(
        at=_from_db(row.at),
        status=_shipment_status(row.status),
        location_en=row.location_en,
        location_zh=row.location_zh,
        description_en=row.description_en,
        description_zh=row.description_zh,
    )


def _refund(row: RefundRow) -> Refund:
    return Refund(
        id=row.id,
        order_id=row.order_id,
        amount=_from_cents(row.amount_cents),
        currency=row.currency,
        reason=row.reason,
        status=_refund_status(row.status),
        idempotency_key=row.idempotency_key,
        created_at=_from_db(row.created_at),
    )


def _claim(row: ClaimRow) -> Claim:
    if row.status != "submitted":
        raise ValueError(f"unknown claim status {row.status!r} in the shop database")
    return Claim(
        id=row.id,
        order_id=row.order_id,
        tracking_no=row.tracking_no,
        carrier=row.carrier,
        status="submitted",
        idempotency_key=row.idempotency_key,
        created_at=_from_db(row.created_at),
    )


def _address_change(row: AddressChangeRow) -> AddressChange:
    return AddressChange(
        id=row.id,
        order_id=row.order_id,
        old_address=row.old_address,
        new_address=row.new_address,
        idempotency_key=row.idempotency_key,
        created_at=_from_db(row.created_at),
    )


_Row = TypeVar("_Row", RefundRow, ClaimRow, AddressChangeRow)


# --- The shop -------------------------------------------------------------------------------


class Shop:
    """The demo order backend. ``await shop.open()`` before use, ``close()`` after.

    Args:
        path: SQLite file; ``None`` (default) keeps the shop in memory, shared by
            everything that holds this :class:`Shop`. A file that already holds
            orders is used as it is, not seeded again.
        today: the day the seed data is built around.
        seed: the random seed for the generated orders.
        clock: returns the current time; by default the clock stands still at
            14:00 China time on ``today`` so the seeded data never ages.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        today: date = DEFAULT_TODAY,
        seed: int = DEFAULT_SEED,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.today = today
        self.seed = seed
        self._clock = clock
        self._engine: AsyncEngine | None = None
        # One session at a time. The in-memory database is a single connection shared
        # by every session (StaticPool), so overlapping sessions would share, and end,
        # each other's transactions; it also makes check-then-write atomic here.
        # Unique idempotency keys and conditional updates guard against other
        # processes sharing a database file.
        self._lock = asyncio.Lock()

    # Lifecycle

    async def open(self) -> None:
        """Create the engine and the tables; seed the data when the database is empty."""
        if self._engine is not None:
            return
        if self.path is None:
            self._engine = create_async_engine(
                "sqlite+aiosqlite://",
                poolclass=StaticPool,
                connect_args={"check_same_thread": False},
            )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._engine = create_async_engine(f"sqlite+aiosqlite:///{self.path}")
        async with self._engine.begin() as conn:
            await conn.run_sync(_registry.metadata.create_all)
        async with self._session() as session:
            count = (await session.exec(select(func.count()).select_from(OrderRow))).one()
            if count == 0:
                await self._seed(session)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def reset(self) -> None:
        """Delete everything and seed again: a fresh shop for the next scripted customer."""
        async with self._session() as session:
            for table in _TABLES:
                await session.exec(delete(table))
            await self._seed(session)  # one transaction: nobody sees a half-empty shop

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def now(self) -> datetime:
        """The shop's current time, timezone-aware."""
        if self._clock is not None:
            return self._clock().astimezone(SHOP_TZ)
        return datetime.combine(self.today, _CLOCK_TIME, SHOP_TZ)

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        """A session holding the shop's lock; never open one inside another."""
        if self._engine is None:
            raise RuntimeError("the shop is not open; await shop.open() first")
        async with self._lock, AsyncSession(self._engine, expire_on_commit=False) as session:
            yield session

    # Reads

    async def get_customer(self, customer_id: str) -> Customer | None:
        async with self._session() as session:
            row = await session.get(CustomerRow, customer_id)
        return None if row is None else _customer(row)

    async def get_order(self, order_id: str) -> Order | None:
        """The order, or ``None``. The id is normalised (case, spaces, dashes)."""
        async with self._session() as session:
            return await self._load_order(session, normalize_order_id(order_id))

    async def orders_for_customer(self, customer_id: str) -> list[Order]:
        """The customer's orders, newest first."""
        async with self._session() as session:
            ids = (
                await session.exec(
                    select(OrderRow.id)
                    .where(OrderRow.customer_id == customer_id)
                    .order_by(col(OrderRow.placed_at).desc())
                )
            ).all()
            orders = [await self._load_order(session, order_id) for order_id in ids]
        return [order for order in orders if order is not None]

    async def find_order_by_tracking(self, tracking_no: str) -> Order | None:
        async with self._session() as session:
            shipment = (
                await session.exec(
                    select(ShipmentRow).where(
                        ShipmentRow.tracking_no == normalize_tracking_no(tracking_no)
                    )
                )
            ).first()
            if shipment is None:
                return None
            return await self._load_order(session, shipment.order_id)

    async def get_shipment(self, order_id: str) -> Shipment | None:
        async with self._session() as session:
            row = await session.get(ShipmentRow, normalize_order_id(order_id))
        return None if row is None else _shipment(row)

    async def tracking_events(self, order_id: str) -> list[TrackingEvent]:
        """The order's tracking events, oldest first (empty if not shipped)."""
        async with self._session() as session:
            rows = (
                await session.exec(
                    select(TrackingEventRow)
                    .where(TrackingEventRow.order_id == normalize_order_id(order_id))
                    .order_by(col(TrackingEventRow.at), col(TrackingEventRow.id))
                )
            ).all()
        return [_event(row) for row in rows]

    async def find_refund(self, idempotency_key: str) -> Refund | None:
        """The refund created with this idempotency key, if any."""
        async with self._session() as session:
            row = await self._by_key(session, RefundRow, idempotency_key)
        return None if row is None else _refund(row)

    async def refunds_for_order(self, order_id: str) -> list[Refund]:
        async with self._session() as session:
            rows = (
                await session.exec(
                    select(RefundRow)
                    .where(RefundRow.order_id == normalize_order_id(order_id))
                    .order_by(col(RefundRow.created_at))
                )
            ).all()
        return [_refund(row) for row in rows]

    async def claims_for_order(self, order_id: str) -> list[Claim]:
        async with self._session() as session:
            rows = (
                await session.exec(
                    select(ClaimRow).where(ClaimRow.order_id == normalize_order_id(order_id))
                )
            ).all()
        return [_claim(row) for row in rows]

    # Writes (each idempotent on its key)

    async def create_refund(
        self,
        order_id: str,
        amount: Decimal,
        reason: str,
        idempotency_key: str,
        *,
        status: RefundStatus = "approved",
    ) -> Refund:
        """Refund a delivered order; an approved refund marks the order ``refunded``.

        The same ``idempotency_key`` returns the refund it created before, whatever
        the other arguments. Policy (cap, window) is the caller's job.

        Raises:
            ShopError: ``order_not_found``, ``already_refunded``, ``cancelled``,
                ``not_delivered``, ``invalid_amount`` or ``idempotency_conflict``.
        """
        order_id = normalize_order_id(order_id)
        async with self._session() as session:
            existing = await self._by_key(session, RefundRow, idempotency_key)
            if existing is not None:
                return _refund(self._same_order(existing, order_id, idempotency_key))
            order = await session.get(OrderRow, order_id)
            if order is None:
                raise ShopError("order_not_found", f"no order {order_id}")
            if order.status == "refunded":
                raise ShopError("already_refunded", f"order {order_id} was refunded already")
            if order.status == "cancelled":
                raise ShopError("cancelled", f"order {order_id} was cancelled, nothing to refund")
            if order.status != "delivered":
                raise ShopError("not_delivered", f"order {order_id} is {order.status}")
            cents = _cents(amount)
            if not 0 < cents <= order.amount_cents:
                raise ShopError(
                    "invalid_amount",
                    f"refund must be above 0 and at most the order's "
                    f"{money(_from_cents(order.amount_cents))} {order.currency}",
                )
            row = RefundRow(
                id=_record_id("RF", idempotency_key),
                order_id=order_id,
                amount_cents=cents,
                currency=order.currency,
                reason=reason,
                status=status,
                idempotency_key=idempotency_key,
                created_at=_to_db(self.now()),
            )
            if status == "approved":
                result = await session.exec(
                    update(OrderRow)
                    .where(col(OrderRow.id) == order_id, col(OrderRow.status) == "delivered")
                    .values(status="refunded")
                )
                if result.rowcount != 1:  # another process refunded it a moment ago
                    await session.rollback()
                    raise ShopError("already_refunded", f"order {order_id} changed; try again")
            session.add(row)
            return _refund(await self._commit_keyed(session, row, RefundRow, order_id))

    async def open_claim(self, order_id: str, idempotency_key: str) -> Claim:
        """Open a lost-parcel claim with the carrier for a shipped, undelivered parcel.

        One claim per order: asking again (with any key) returns the open claim.
        Whether the parcel is stuck enough to claim is the caller's decision.

        Raises:
            ShopError: ``order_not_found``, ``no_shipment``, ``delivered`` or
                ``idempotency_conflict``.
        """
        order_id = normalize_order_id(order_id)
        async with self._session() as session:
            existing = await self._by_key(session, ClaimRow, idempotency_key)
            if existing is not None:
                return _claim(self._same_order(existing, order_id, idempotency_key))
            if await session.get(OrderRow, order_id) is None:
                raise ShopError("order_not_found", f"no order {order_id}")
            shipment = await session.get(ShipmentRow, order_id)
            if shipment is None:
                raise ShopError("no_shipment", f"order {order_id} has not shipped")
            if shipment.status == "delivered":
                raise ShopError("delivered", f"order {order_id} was delivered")
            open_claim = (
                await session.exec(select(ClaimRow).where(ClaimRow.order_id == order_id))
            ).first()
            if open_claim is not None:
                return _claim(open_claim)
            row = ClaimRow(
                id=_record_id("CL", idempotency_key),
                order_id=order_id,
                tracking_no=shipment.tracking_no,
                carrier=shipment.carrier,
                status="submitted",
                idempotency_key=idempotency_key,
                created_at=_to_db(self.now()),
            )
            session.add(row)
            return _claim(await self._commit_keyed(session, row, ClaimRow, order_id))

    async def change_address(
        self, order_id: str, new_address: str, idempotency_key: str
    ) -> AddressChange:
        """Change the shipping address of an order that has not shipped yet.

        Raises:
            ShopError: ``order_not_found``, ``already_shipped`` (shipped, in transit,
                delivered or refunded), ``cancelled``, ``invalid_address`` or
                ``idempotency_conflict``.
        """
        order_id = normalize_order_id(order_id)
        new_address = " ".join(new_address.split())
        async with self._session() as session:
            existing = await self._by_key(session, AddressChangeRow, idempotency_key)
            if existing is not None:
                return _address_change(self._same_order(existing, order_id, idempotency_key))
            if not new_address:
                raise ShopError("invalid_address", "the new address is empty")
            order = await session.get(OrderRow, order_id)
            if order is None:
                raise ShopError("order_not_found", f"no order {order_id}")
            if order.status == "cancelled":
                raise ShopError("cancelled", f"order {order_id} was cancelled")
            if order.status != "paid":
                raise ShopError("already_shipped", f"order {order_id} is {order.status}")
            row = AddressChangeRow(
                id=_record_id("AC", idempotency_key),
                order_id=order_id,
                old_address=order.shipping_address,
                new_address=new_address,
                idempotency_key=idempotency_key,
                created_at=_to_db(self.now()),
            )
            result = await session.exec(
                update(OrderRow)
                .where(col(OrderRow.id) == order_id, col(OrderRow.status) == "paid")
                .values(shipping_address=new_address)
            )
            if result.rowcount != 1:  # shipped by another process a moment ago
                await session.rollback()
                raise ShopError("already_shipped", f"order {order_id} changed; try again")
            session.add(row)
            return _address_change(
                await self._commit_keyed(session, row, AddressChangeRow, order_id)
            )

    # Internals

    async def _load_order(self, session: AsyncSession, order_id: str) -> Order | None:
        row = await session.get(OrderRow, order_id)
        if row is None:
            return None
        items = (
            await session.exec(
                select(OrderItemRow)
                .where(OrderItemRow.order_id == order_id)
                .order_by(col(OrderItemRow.id))
            )
        ).all()
        return _order(row, items)

    @staticmethod
    async def _by_key(session: AsyncSession, table: type[_Row], key: str) -> _Row | None:
        return (await session.exec(select(table).where(table.idempotency_key == key))).first()

    @staticmethod
    def _same_order(row: _Row, order_id: str, key: str) -> _Row:
        if row.order_id != order_id:
            raise ShopError(
                "idempotency_conflict",
                f"key {key!r} was used for order {row.order_id}, not {order_id}",
            )
        return row

    async def _commit_keyed(
        self, session: AsyncSession, row: _Row, table: type[_Row], order_id: str
    ) -> _Row:
        """Commit; if another process committed the same key first, return its row."""
        key = row.idempotency_key
        try:
            await session.commit()
        except IntegrityError:
            await session.rollback()
            winner = await self._by_key(session, table, key)
            if winner is None:
                raise
            return self._same_order(winner, order_id, key)
        return row

    async def _seed(self, session: AsyncSession) -> None:
        """Insert the seed rows and commit."""
        # Built around ``today``, not the clock: a running clock lets the data age.
        seeded_at = datetime.combine(self.today, _CLOCK_TIME, SHOP_TZ)
        customers, orders, items, shipments, events, refunds = _build_seed(
            seeded_at, random.Random(self.seed)
        )
        for rows in (customers, orders, [*items, *shipments, *refunds], events):
            session.add_all(rows)
            await session.flush()  # parents before children
        await session.commit()


# --- Seed data ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Product:
    sku: str
    name: str
    name_zh: str
    price: str


_PRODUCTS: dict[str, _Product] = {
    p.sku: p
    for p in (
        _Product("AUR-X2", "Aurora X2 wireless earbuds", "Aurora X2 无线耳机", "129.00"),
        _Product("NIM-14S", "Nimbus 14 laptop sleeve", "Nimbus 14 笔记本内胆包", "89.00"),
        _Product("KTL-P17", "Kettle Pro 1.7L", "Kettle Pro 1.7L 电热水壶", "239.00"),
        _Product("NIM-14P", "Nimbus 14 Pro laptop", "Nimbus 14 Pro 笔记本电脑", "2899.00"),
        _Product("LUM-D1", "Lumen D1 desk lamp", "Lumen D1 护眼台灯", "159.00"),
        _Product("CAS-C20", "Cascade 20W USB-C charger", "Cascade 20W USB-C 充电器", "59.00"),
        _Product("ORB-S3", "Orbit S3 smartwatch", "Orbit S3 智能手表", "899.00"),
        _Product("TER-B5", "Terra B5 Bluetooth speaker", "Terra B5 蓝牙音箱", "329.00"),
        _Product("ZEN-M8", "Zenith M8 robot vacuum", "Zenith M8 扫地机器人", "1699.00"),
        _Product("ECH-K7", "Echo K7 mechanical keyboard", "Echo K7 机械键盘", "459.00"),
        _Product("BRZ-F3", "Breeze F3 desk fan", "Breeze F3 桌面风扇", "199.00"),
        _Product("FLO-T1", "Flow T1 insulated tumbler", "Flow T1 保温杯", "79.00"),
    )
}
# Everyday products for the generated orders (the laptop and the vacuum stay rare).
_FILLER_SKUS = ("AUR-X2", "NIM-14S", "KTL-P17", "LUM-D1", "CAS-C20", "TER-B5", "ECH-K7",
                "BRZ-F3", "FLO-T1", "ORB-S3", "ZEN-M8")  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Place:
    en: str
    zh: str


@dataclass(frozen=True, slots=True)
class _City:
    transit: _Place
    hub: _Place
    station: _Place


_WAREHOUSE = _Place("Shenzhen Longhua warehouse", "深圳龙华仓")
_ORIGIN_HUB = _Place("Shenzhen sorting centre", "深圳转运中心")
_CITIES: dict[str, _City] = {
    "shenzhen": _City(
        _Place("Dongguan hub", "东莞转运中心"),
        _Place("Shenzhen Nanshan hub", "深圳南山集散中心"),
        _Place("Nanshan Keyuan delivery station", "南山科苑营业点"),
    ),
    "shanghai": _City(
        _Place("Hangzhou sorting centre", "杭州转运中心"),
        _Place("Shanghai Qingpu hub", "上海青浦转运中心"),
        _Place("Xuhui Tianlin delivery station", "徐汇田林营业点"),
    ),
    "beijing": _City(
        _Place("Wuhan hub", "武汉转运中心"),
        _Place("Beijing Shunyi hub", "北京顺义转运中心"),
        _Place("Chaoyang Wangjing delivery station", "朝阳望京营业点"),
    ),
    "hangzhou": _City(
        _Place("Shanghai Qingpu hub", "上海青浦转运中心"),
        _Place("Hangzhou Xiaoshan sorting centre", "杭州萧山转运中心"),
        _Place("Xihu Wensan delivery station", "西湖文三营业点"),
    ),
    "chengdu": _City(
        _Place("Changsha hub", "长沙转运中心"),
        _Place("Chengdu Shuangliu hub", "成都双流转运中心"),
        _Place("Wuhou Kehua delivery station", "武侯科华营业点"),
    ),
    "wuhan": _City(
        _Place("Changsha hub", "长沙转运中心"),
        _Place("Wuhan Dongxihu hub", "武汉东西湖转运中心"),
        _Place("Hongshan Guanggu delivery station", "洪山光谷营业点"),
    ),
    "guangzhou": _City(
        _Place("Dongguan hub", "东莞转运中心"),
        _Place("Guangzhou Baiyun hub", "广州白云转运中心"),
        _Place("Tianhe Zhujiang delivery station", "天河珠江营业点"),
    ),
    "nanjing": _City(
        _Place("Shanghai Qingpu hub", "上海青浦转运中心"),
        _Place("Nanjing Jiangning hub", "南京江宁转运中心"),
        _Place("Gulou Hunan Road delivery station", "鼓楼湖南路营业点"),
    ),
}


@dataclass(frozen=True, slots=True)
class _SeedCustomer:
    id: str
    name: str
    name_zh: str
    email: str
    phone: str
    city: str
    address: str


_CUSTOMERS: tuple[_SeedCustomer, ...] = (
    _SeedCustomer("CU100231", "Li Wei", "李伟", "li.wei@example.cn", "138****2041",
                  "shenzhen", "广东省深圳市南山区科苑南路88号华润大厦1203室"),
    _SeedCustomer("CU100232", "Wang Fang", "王芳", "wangfang88@example.cn", "139****7710",
                  "shanghai", "上海市徐汇区田林路200号3号楼502室"),
    _SeedCustomer("CU100233", "Zhang Min", "张敏", "zhangmin@example.cn", "186****3359",
                  "beijing", "北京市朝阳区望京街10号望京SOHO T2 1806"),
    _SeedCustomer("CU100234", "Chen Jie", "陈杰", "chenjie.hz@example.cn", "135****0826",
                  "hangzhou", "浙江省杭州市西湖区文三路398号东信大厦8楼"),
    _SeedCustomer("CU100235", "Liu Yang", "刘洋", "liuyang@example.cn", "150****6612",
                  "chengdu", "四川省成都市武侯区科华北路65号世外桃源广场A座1702"),
    _SeedCustomer("CU100236", "Emily Carter", "艾米莉", "emily.carter@example.com",
                  "137****4488", "shanghai", "上海市静安区南京西路1266号恒隆广场2座3105"),
    _SeedCustomer("CU100237", "Zhao Lei", "赵磊", "zhaolei@example.cn", "158****9023",
                  "wuhan", "湖北省武汉市洪山区光谷大道77号金融港B栋1104"),
    _SeedCustomer("CU100238", "Huang Ting", "黄婷", "huangting@example.cn", "189****5137",
                  "guangzhou", "广东省广州市天河区珠江新城华夏路16号富力盈凯大厦2208"),
    _SeedCustomer("CU100239", "Sun Hao", "孙浩", "sunhao@example.cn", "133****7761",
                  "nanjing", "江苏省南京市鼓楼区湖南路1号凤凰国际大厦905"),
    _SeedCustomer("CU100240", "Daniel Okafor", "丹尼尔", "d.okafor@example.com",
                  "176****0394", "beijing", "北京市海淀区中关村大街27号中关村大厦1510"),
)  # fmt: skip

_CARRIERS: dict[str, tuple[str, str]] = {
    "SF": ("SF Express", "顺丰速运"),
    "YT": ("YTO Express", "圆通速递"),
    "JDV": ("JD Logistics", "京东物流"),
}
_TRACKING_DIGITS = {"SF": 12, "YT": 13, "JDV": 12}


@dataclass(frozen=True, slots=True)
class _ShipPlan:
    tracking_no: str
    status: ShipmentStatus
    shipped_days_ago: float
    last_update_days_ago: float
    eta_in_days: int | None  # relative to today; None once delivered

    @property
    def carrier_code(self) -> str:
        return next(code for code in ("JDV", "SF", "YT") if self.tracking_no.startswith(code))


@dataclass(frozen=True, slots=True)
class _Plan:
    order_id: str
    customer_id: str
    items: tuple[tuple[str, int], ...]
    status: OrderStatus
    placed_days_ago: float
    ship: _ShipPlan | None = None
    refund_reason: str | None = None


_SCENARIOS: tuple[_Plan, ...] = (
    _Plan(ORDER_SMALL, "CU100232", (("AUR-X2", 1),), "delivered", 10.2,
          _ShipPlan("SF118603942275", "delivered", 9.1, 5.1, None)),
    _Plan(ORDER_OTHER, "CU100232", (("KTL-P17", 1),), "delivered", 15.9,
          _ShipPlan("JDV002318845091", "delivered", 15.0, 9.2, None)),
    _Plan(ORDER_BIG, "CU100233", (("NIM-14P", 1),), "delivered", 7.3,
          _ShipPlan("SF127745016384", "delivered", 6.4, 3.1, None)),
    _Plan(ORDER_TRANSIT, "CU100234", (("LUM-D1", 1), ("CAS-C20", 1)), "in_transit", 2.9,
          _ShipPlan(TRACKING_TRANSIT, "in_transit", 2.1, 2 / 24, 1)),
    _Plan(ORDER_LOST, "CU100235", (("ORB-S3", 1),), "in_transit", 17.1,
          _ShipPlan(TRACKING_LOST, "exception", 16.2, 12.3, -11)),
    _Plan(ORDER_LOST_2, "CU100237", (("TER-B5", 1),), "in_transit", 14.8,
          _ShipPlan("SF135590287716", "lost", 14.1, 10.4, -9)),
    _Plan(ORDER_SLOW, "CU100239", (("ECH-K7", 1),), "in_transit", 8.6,
          _ShipPlan("JDV002377120458", "in_transit", 7.9, 6.2, -3)),
    _Plan(ORDER_OUT_FOR_DELIVERY, "CU100231", (("BRZ-F3", 1), ("FLO-T1", 2)), "in_transit",
          3.4, _ShipPlan("SF140016628853", "out_for_delivery", 2.6, 0.15, 0)),
    _Plan(ORDER_SHIPPED, "CU100238", (("NIM-14S", 1),), "shipped", 1.3,
          _ShipPlan("YT7311406629187", "label_created", 0.9, 0.9, 3)),
    _Plan(ORDER_PAID, "CU100236", (("ZEN-M8", 1),), "paid", 0.2),
    _Plan(ORDER_REFUNDED, "CU100240", (("AUR-X2", 1), ("CAS-C20", 1)), "refunded", 18.5,
          _ShipPlan("SF109982345617", "delivered", 17.6, 12.4, None), "damaged"),
    _Plan(ORDER_CANCELLED, "CU100231", (("ORB-S3", 1),), "cancelled", 2.2),
    _Plan(ORDER_OLD, "CU100234", (("LUM-D1", 1),), "delivered", 55.3,
          _ShipPlan("YT7288019345526", "delivered", 54.5, 48.2, None)),
)  # fmt: skip

_STAGES: dict[ShipmentStatus, tuple[str, ...]] = {
    "label_created": ("created",),
    "in_transit": ("created", "picked_up", "departed_origin", "arrived_transit"),
    "out_for_delivery": (
        "created", "picked_up", "departed_origin", "arrived_transit", "arrived_hub",
        "out_for_delivery",
    ),
    "delivered": (
        "created", "picked_up", "departed_origin", "arrived_transit", "arrived_hub",
        "out_for_delivery", "delivered",
    ),
    "exception": ("created", "picked_up", "departed_origin", "arrived_transit", "exception"),
    "lost": ("created", "picked_up", "departed_origin", "arrived_transit", "lost"),
}  # fmt: skip


def _stage_event(
    stage: str, city: _City, carrier: tuple[str, str]
) -> tuple[ShipmentStatus, _Place, str, str]:
    """(status, place, description en, description zh) of one journey stage."""
    table: dict[str, tuple[ShipmentStatus, _Place, str, str]] = {
        "created": ("label_created", _WAREHOUSE,
                    "Shipping label created, waiting for pickup", "已下单，等待快递员揽收"),
        "picked_up": ("in_transit", _WAREHOUSE,
                      f"Picked up by {carrier[0]}", f"{carrier[1]}已揽收"),
        "departed_origin": ("in_transit", _ORIGIN_HUB,
                            "Departed the sorting centre for the next stop",
                            "快件已离开转运中心，发往下一站"),
        "arrived_transit": ("in_transit", city.transit,
                            "Arrived at the transit hub", "快件已到达中转站"),
        "arrived_hub": ("in_transit", city.hub,
                        "Arrived at the destination sorting centre", "快件已到达目的地转运中心"),
        "out_for_delivery": ("out_for_delivery", city.station,
                             "Out for delivery with the courier", "快递员正在派送"),
        "delivered": ("delivered", city.station,
                      "Delivered, signed for by the recipient", "已签收，签收人：本人"),
        "exception": ("exception", city.transit,
                      "Delivery exception: shipping label damaged, parcel held for checks",
                      "派送异常：面单破损，快件滞留待核实"),
        "lost": ("lost", city.transit,
                 "Parcel could not be located at the hub; the carrier is investigating",
                 "快件在转运中心未找到，承运商正在核查"),
    }  # fmt: skip
    return table[stage]


def _build_seed(
    now: datetime, rng: random.Random
) -> tuple[
    list[CustomerRow],
    list[OrderRow],
    list[OrderItemRow],
    list[ShipmentRow],
    list[TrackingEventRow],
    list[RefundRow],
]:
    """Rows for the demo shop; only ``now`` and ``rng`` decide what they contain."""

    def ago(days: float) -> datetime:
        return (now - timedelta(days=days)).replace(second=0, microsecond=0)

    plans = [*_SCENARIOS, *_filler_plans(now, rng)]
    by_id = {c.id: c for c in _CUSTOMERS}
    customers = [CustomerRow(id=c.id, name=c.name, name_zh=c.name_zh, email=c.email,
                             phone=c.phone) for c in _CUSTOMERS]  # fmt: skip
    orders: list[OrderRow] = []
    items: list[OrderItemRow] = []
    shipments: list[ShipmentRow] = []
    events: list[TrackingEventRow] = []
    refunds: list[RefundRow] = []
    for plan in plans:
        customer = by_id[plan.customer_id]
        amount = 0
        for sku, quantity in plan.items:
            product = _PRODUCTS[sku]
            price = _cents(Decimal(product.price))
            amount += price * quantity
            items.append(OrderItemRow(order_id=plan.order_id, sku=sku, name=product.name,
                                      name_zh=product.name_zh, quantity=quantity,
                                      unit_price_cents=price))  # fmt: skip
        delivered_at: datetime | None = None
        shipped_at: datetime | None = None
        ship = plan.ship
        if ship is not None:
            shipped_at = ago(ship.shipped_days_ago)
            last_update = ago(ship.last_update_days_ago)
            carrier = _CARRIERS[ship.carrier_code]
            stages = _STAGES[ship.status]
            span = last_update - shipped_at
            for index, stage in enumerate(stages):
                at = last_update if index == len(stages) - 1 else (
                    shipped_at + span * index / max(1, len(stages) - 1)
                )  # fmt: skip
                status, place, text_en, text_zh = _stage_event(
                    stage, _CITIES[customer.city], carrier
                )
                events.append(TrackingEventRow(
                    order_id=plan.order_id, at=_to_db(at.replace(second=0, microsecond=0)),
                    status=status, location_en=place.en, location_zh=place.zh,
                    description_en=text_en, description_zh=text_zh,
                ))  # fmt: skip
            if ship.status == "delivered":
                delivered_at = last_update
            eta = (
                delivered_at.date()
                if delivered_at is not None
                else now.date() + timedelta(days=ship.eta_in_days or 0)
            )
            shipments.append(ShipmentRow(
                order_id=plan.order_id, tracking_no=ship.tracking_no, carrier=carrier[0],
                carrier_zh=carrier[1], status=ship.status, shipped_at=_to_db(shipped_at),
                eta=eta, last_update=_to_db(last_update),
            ))  # fmt: skip
        orders.append(OrderRow(
            id=plan.order_id, customer_id=customer.id, status=plan.status,
            amount_cents=amount, currency=CURRENCY, placed_at=_to_db(ago(plan.placed_days_ago)),
            shipped_at=None if shipped_at is None else _to_db(shipped_at),
            delivered_at=None if delivered_at is None else _to_db(delivered_at),
            shipping_address=customer.address,
        ))  # fmt: skip
        if plan.refund_reason is not None and delivered_at is not None:
            key = f"seed:{plan.order_id}"
            refunds.append(RefundRow(
                id=_record_id("RF", key), order_id=plan.order_id, amount_cents=amount,
                currency=CURRENCY, reason=plan.refund_reason, status="approved",
                idempotency_key=key, created_at=_to_db(delivered_at + timedelta(hours=20)),
            ))  # fmt: skip
    return customers, orders, items, shipments, events, refunds


def _filler_plans(now: datetime, rng: random.Random) -> list[_Plan]:
    """Ordinary orders around the scenarios: never stuck, never refunded."""
    used_ids = {plan.order_id for plan in _SCENARIOS}
    used_tracking = {plan.ship.tracking_no for plan in _SCENARIOS if plan.ship is not None}
    plans: list[_Plan] = []
    for _ in range(_FILLER_ORDERS):
        customer = rng.choice(_CUSTOMERS)
        age = round(rng.uniform(0.3, 70.0), 2)
        skus = rng.sample(_FILLER_SKUS, k=rng.choice((1, 1, 1, 2, 2, 3)))
        items = tuple((sku, rng.choice((1, 1, 1, 2))) for sku in skus)
        placed_day = (now - timedelta(days=age)).date()
        order_id = f"HL{placed_day:%y%m%d}{rng.randrange(10, 100)}"
        while order_id in used_ids:
            order_id = f"HL{placed_day:%y%m%d}{rng.randrange(10, 100)}"
        used_ids.add(order_id)
        code = rng.choice(("SF", "SF", "YT", "JDV"))
        tracking_no = _random_tracking(rng, code)
        while tracking_no in used_tracking:
            tracking_no = _random_tracking(rng, code)
        used_tracking.add(tracking_no)
        shipped_ago = round(age - rng.uniform(0.15, 0.6), 2)
        status: OrderStatus
        ship: _ShipPlan | None
        if age < 1.0:
            if rng.random() < 0.5:
                status, ship = "paid", None
            else:
                status = "shipped"
                ship = _ShipPlan(tracking_no, "label_created", shipped_ago, shipped_ago, 3)
        elif age < 4.0:
            status = "in_transit"
            last = round(rng.uniform(0.05, min(0.9, shipped_ago)), 2)
            ship = _ShipPlan(tracking_no, "in_transit", shipped_ago, last, rng.choice((1, 2)))
        elif rng.random() < 0.08:
            status, ship = "cancelled", None
        else:
            status = "delivered"
            delivered_ago = round(shipped_ago - rng.uniform(1.5, 3.2), 2)
            ship = _ShipPlan(tracking_no, "delivered", shipped_ago, delivered_ago, None)
        plans.append(_Plan(order_id, customer.id, items, status, age, ship))
    return plans


def _random_tracking(rng: random.Random, code: str) -> str:
    digits = _TRACKING_DIGITS[code]
    return f"{code}{rng.randrange(10 ** (digits - 1), 10**digits)}"
