"""Entry point of the Slack channel (``helpline.channels``: ``slack``).

:func:`make` returns None when Slack is not configured, without importing
slack-bolt, so a server without the ``slack`` extra still starts. Configured
means a bot token plus what the mode needs: the signing secret in ``events``
mode, the app-level token in ``socket`` mode.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from channels.slack.channel import SlackChannel
    from engine.server.context import ServerContext

__all__ = ["make"]

logger = logging.getLogger(__name__)

_EXTRA = ("slack_bolt", "slack_sdk", "aiohttp")


def make(context: ServerContext) -> SlackChannel | None:
    """The Slack channel plugin, or None when it is not configured."""
    settings = context.settings
    if settings.slack_bot_token is None:
        return None
    if settings.slack_mode == "events" and settings.slack_signing_secret is None:
        logger.warning("slack_bot_token is set but slack_signing_secret is not: events mode "
                       "cannot verify requests; the Slack channel is off")
        return None
    if settings.slack_mode == "socket" and settings.slack_app_token is None:
        logger.warning("slack_mode is socket but slack_app_token (xapp-) is not set; "
                       "the Slack channel is off")
        return None
    try:
        from channels.slack.channel import SlackChannel
    except ModuleNotFoundError as missing:
        if missing.name is not None and missing.name.split(".")[0] in _EXTRA:
            raise ImportError(f"the Slack channel is configured but {missing.name} is missing; "
                              "install it with: pip install 'helpline[slack]'") from missing
        raise
    return SlackChannel(context)
