"""What the server's parts share: the application, the handoff desk, metrics, settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.app import App
from engine.config import Settings
from engine.handoff import HandoffDesk
from engine.metrics import Metrics

__all__ = ["ServerContext"]


@dataclass
class ServerContext:
    settings: Settings
    app: App
    desk: HandoffDesk
    metrics: Metrics
    #: Free-form per-plugin state (e.g. connected web chat sockets), by plugin name.
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def engine(self) -> Any:
        return self.app.engine
