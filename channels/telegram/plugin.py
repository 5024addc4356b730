"""Entry point of the Telegram channel (``helpline.channels``: ``telegram``).

``make(context)`` returns None when no bot token is configured, so a server
without Telegram settings never imports aiogram (the ``telegram`` extra).
Settings (``HELPLINE_TELEGRAM_*``): ``telegram_token``, ``telegram_mode``
(``polling`` or ``webhook``), ``telegram_webhook_secret`` (required for
webhooks), ``telegram_api_base`` (a local Bot API server or a test fake),
``telegram_poll_timeout``, ``telegram_demo_customers``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from engine.errors import ConfigError

if TYPE_CHECKING:
    from channels.telegram.channel import TelegramChannel
    from engine.config import Settings
    from engine.server.context import ServerContext

__all__ = ["TelegramConfig", "make"]

_TOKEN_RE = re.compile(r"[0-9]+:[A-Za-z0-9_-]+")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")


@dataclass(frozen=True, slots=True)
class TelegramConfig:
    token: str
    mode: Literal["polling", "webhook"] = "polling"
    webhook_secret: str | None = None
    api_base: str | None = None
    poll_timeout: int = 30
    demo_customers: bool = False
    #: Where Telegram reaches the server; in webhook mode the webhook is set to
    #: ``<public_url>/telegram/webhook`` at start-up (else set it yourself).
    public_url: str | None = None

    @property
    def bot_id(self) -> int:
        return int(self.token.split(":", 1)[0])

    def __repr__(self) -> str:  # never print the token or the secret
        return (f"TelegramConfig(bot_id={self.bot_id}, mode={self.mode!r}, "
                f"api_base={self.api_base!r})")

    @classmethod
    def from_settings(cls, settings: Settings) -> TelegramConfig | None:
        """The channel's configuration, None without a token; ConfigError when invalid."""
        if settings.telegram_token is None:
            return None
        token = settings.telegram_token.get_secret_value().strip()
        if not _TOKEN_RE.fullmatch(token):
            raise ConfigError("telegram_token: expected a bot token like 123456789:AAE... "
                              "(from @BotFather)")
        secret = (settings.telegram_webhook_secret.get_secret_value()
                  if settings.telegram_webhook_secret is not None else None)
        if secret is not None and not _SECRET_RE.fullmatch(secret):
            raise ConfigError("telegram_webhook_secret: 1-256 characters of A-Z, a-z, 0-9, "
                              "_ and - (Telegram's rule for secret_token)")
        if settings.telegram_mode == "webhook" and secret is None:
            raise ConfigError("telegram_mode is webhook but telegram_webhook_secret is unset: "
                              "without it anyone could post updates to /telegram/webhook")
        return cls(token=token, mode=settings.telegram_mode, webhook_secret=secret,
                   api_base=settings.telegram_api_base,
                   poll_timeout=settings.telegram_poll_timeout,
                   demo_customers=settings.telegram_demo_customers,
                   public_url=settings.public_url)


def make(context: ServerContext) -> TelegramChannel | None:
    """Entry point: the Telegram channel, or None when no token is configured."""
    config = TelegramConfig.from_settings(context.settings)
    if config is None:
        return None
    try:
        from channels.telegram.channel import TelegramChannel
    except ImportError as exc:
        raise ConfigError(f"telegram_token is set but aiogram is missing ({exc}); "
                          "install the extra: pip install 'helpline[telegram]'") from exc
    channel = TelegramChannel(context, config)
    context.extras[channel.name] = channel
    return channel
