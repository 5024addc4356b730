"""The web chat channel: a WebSocket protocol, session tokens and an embeddable widget.

``protocol`` is the sans-I/O core (frames, validation, converters), ``session``
issues and verifies tokens, ``plugin`` is the thin Starlette layer the server
loads through the ``helpline.channels`` entry point. See ``docs/web-protocol.md``.
"""
