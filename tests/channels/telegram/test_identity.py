"""Who the customer is comes from Telegram: ``telegram:<user id>`` outside demo deployments."""

from __future__ import annotations

import pytest

from engine.demo.shop import ORDER_SMALL
from tests.channels.telegram.conftest import Customer, LiveServer


@pytest.mark.telegram_settings(telegram_demo_customers=False)
async def test_an_unlinked_telegram_user_sees_no_shop_orders(telegram_server: LiveServer,
                                                             customer: Customer) -> None:
    await customer.say(f"refund for {ORDER_SMALL} please, it arrived broken")
    assert "couldn't find an order" in customer.seen[-1].text
    records = await telegram_server.records(customer.chat)
    assert records[0].author == "customer"
    assert await telegram_server.context.app.shop.refunds_for_order(ORDER_SMALL) == []
