"""Settings: embedded defaults, then a config file, then ``HELPLINE_*`` environment variables.

With nothing set, Helpline runs on SQLite in ``./var``, an in-process cache
and the offline model, unless ``ANTHROPIC_API_KEY`` is set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.errors import ConfigError

__all__ = ["Settings", "load_settings"]

ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HELPLINE_", env_nested_delimiter="__",
                                      extra="forbid")

    flows_dir: Path = ROOT / "flows"
    prompts_dir: Path = ROOT / "prompts"
    # SQLite runs on one store-owned worker thread (3.5x faster per turn than
    # aiosqlite, measured in bench/); `sqlite+aiosqlite:///` selects aiosqlite.
    database_url: str = f"sqlite:///{ROOT / 'var' / 'helpline.db'}"
    #: The demo shop's SQLite file; None keeps it in memory (re-seeded at every start).
    shop_database_path: Path | None = None
    #: ``auto`` uses Claude when ANTHROPIC_API_KEY is set, the offline model otherwise.
    model: Literal["auto", "offline", "claude"] = "auto"
    anthropic_base_url: str | None = None
    decision_model: str = "sonnet"
    summary_model: str = "haiku"
    route_model: str = "haiku"
    model_timeout: float = Field(default=30.0, gt=0, le=600)
    model_max_retries: int = Field(default=2, ge=0, le=10)
    #: Use the count-tokens endpoint when a request nears the flow's token budget.
    count_tokens: bool = False
    #: Words of the AI disclosure (per language); the message itself cannot be turned off.
    disclosure: dict[str, str] | None = None

    # -- server ----------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: Public base URL (for links printed at start-up and webhook set-up).
    public_url: str | None = None
    #: Channel plugins to load (entry points in the helpline.channels group); None = all.
    channels: list[str] | None = None
    #: Secret for signing web chat session tokens; generated per start when unset.
    secret_key: str | None = None
    #: Origins allowed to open the web chat socket (besides the server's own).
    allowed_origins: list[str] = Field(default_factory=list)
    #: Seconds a handoff may wait for an agent before the bot apologises and offers a callback.
    handoff_queue_timeout: float = Field(default=600.0, gt=0)
    #: Agent accounts: name -> argon2 password hash (``helpline hash-password``).
    agents: dict[str, str] = Field(default_factory=dict)

    # -- model layer (engine/llm, docs/model-layer.md) --------------------------
    #: Redis for the shared response cache and cross-process coalescing; None = in-process.
    redis_url: str | None = None
    #: Model calls in flight per process, in total and per model id.
    model_concurrency: int = Field(default=16, ge=1, le=1024)
    model_concurrency_per_model: int = Field(default=8, ge=1, le=1024)
    #: Calls that may wait for a slot, and how long; beyond either: a "busy" reply.
    model_queue_bound: int = Field(default=64, ge=0, le=100_000)
    model_queue_timeout: float = Field(default=10.0, gt=0, le=600)
    #: Seconds one model call may take in total (queue, attempts, backoff) before the fallback.
    turn_budget_seconds: float = Field(default=45.0, gt=0, le=600)
    #: Whole-call attempts on an unavailable model (on top of the SDK's retries).
    model_attempts: int = Field(default=2, ge=1, le=10)
    retry_wait_initial: float = Field(default=0.5, ge=0, le=60)
    retry_wait_max: float = Field(default=4.0, ge=0, le=120)
    #: Consecutive failures that open the circuit breaker, and seconds until a probe.
    breaker_failures: int = Field(default=5, ge=1, le=1000)
    breaker_reset_seconds: float = Field(default=30.0, gt=0, le=3600)
    #: FAQ micro-batching window (0 turns batching off) and questions per batched call.
    batch_window_ms: int = Field(default=100, ge=0, le=5000)
    batch_max_questions: int = Field(default=8, ge=1, le=32)
    #: Near-duplicate similarity: ``hashing`` (built in) or ``minilm`` (optional package).
    embedder: Literal["hashing", "minilm"] = "hashing"
    similarity_threshold: float | None = Field(default=None, gt=0, le=1)
    #: Response cache: TTL per policy, entries of the in-process cache, route caching.
    cache_ttl_faq: float = Field(default=86_400.0, ge=0)
    cache_ttl_short: float = Field(default=300.0, ge=0)
    cache_max_entries: int = Field(default=10_000, ge=1)
    route_cache: Literal["never", "short", "faq"] = "faq"
    #: Ask Claude to screen restricted content before each decision.
    content_classifier: bool = False

    # -- telegram (channels/telegram) --------------------------------------------
    #: Bot token from @BotFather (``<bot id>:<secret>``); the channel is off without one.
    telegram_token: SecretStr | None = None
    #: ``polling`` needs no public URL (one poller per token); ``webhook`` serves
    #: ``POST /telegram/webhook`` and needs ``telegram_webhook_secret``.
    telegram_mode: Literal["polling", "webhook"] = "polling"
    #: Sent by Telegram as ``X-Telegram-Bot-Api-Secret-Token``: 1-256 of ``[A-Za-z0-9_-]``.
    telegram_webhook_secret: SecretStr | None = None
    #: Bot API server base URL (a local Bot API server, a test fake); None = api.telegram.org.
    telegram_api_base: str | None = None
    #: getUpdates long-poll timeout, seconds.
    telegram_poll_timeout: int = Field(default=30, ge=0, le=50)
    #: Treat Telegram users as anonymous demo customers (``demo:telegram:<id>``, who may
    #: see every demo order) instead of ``telegram:<id>``. For demos only.
    telegram_demo_customers: bool = False

    # -- slack (channels/slack; the ``slack`` extra) ------------------------------
    #: Bot token (``xoxb-``); the Slack channel is off without one.
    slack_bot_token: SecretStr | None = None
    #: Verifies Events API requests (v0 signatures); needed in ``events`` mode.
    slack_signing_secret: SecretStr | None = None
    #: App-level token (``xapp-``, scope ``connections:write``); needed in ``socket`` mode.
    slack_app_token: SecretStr | None = None
    #: ``events``: Slack POSTs to ``/slack/events`` (public URL needed); ``socket``:
    #: Socket Mode, an outgoing WebSocket (for development; not for Marketplace apps).
    slack_mode: Literal["events", "socket"] = "events"
    #: Web API base URL (a test fake); None = https://slack.com/api/.
    slack_api_base: str | None = None
    #: Channel id of the agents' workspace: handoffs from every channel are posted there
    #: as threads agents claim and answer in. None = off.
    slack_agents_channel: str | None = None
    #: Demo deployments: Slack customers may see every demo order (``demo:slack:...``).
    slack_demo_customers: bool = False

    def resolved_model(self) -> str:
        if self.model == "auto":
            return "claude" if os.environ.get("ANTHROPIC_API_KEY") else "offline"
        return self.model


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from an optional YAML file, overridden by environment and ``overrides``."""
    values: dict[str, Any] = {}
    path = config_file or (Path(os.environ["HELPLINE_CONFIG"]) if os.environ.get(
        "HELPLINE_CONFIG") else None)
    if path is not None:
        from ruamel.yaml import YAML

        try:
            data = YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
        except Exception as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config file must be a mapping")
        values.update(data)
    # Environment variables win over the file; explicit overrides win over both.
    env_settings = Settings()
    for name in Settings.model_fields:
        if f"HELPLINE_{name.upper()}" in os.environ:
            values[name] = getattr(env_settings, name)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(values)
    except Exception as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc
