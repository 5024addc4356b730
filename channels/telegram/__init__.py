"""The Telegram channel (aiogram 3): long polling or a webhook, inline keyboards, handoff.

``convert`` holds the pure converters (updates to ``Inbound``, ``Outbound`` to
``sendMessage`` calls), ``sender`` the ordered per-chat outbound queue (429 and
403 handling), ``queues`` the per-chat FIFO workers, ``channel`` the plugin's
I/O, and ``plugin`` the entry point, which imports aiogram only when a bot token
is configured. See ``channels/telegram/README.md``.
"""
