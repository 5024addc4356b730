"""The ``helpline`` command line: chat, validate, schema, graph (and serve)."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.config import ROOT, load_settings
from engine.errors import HelplineError, Problem

app = typer.Typer(help="Helpline: customer-support conversations as YAML state machines.",
                  no_args_is_help=True, add_completion=False)
console = Console()
err = Console(stderr=True)

FlowsArg = Annotated[list[Path], typer.Argument(help="Flow files or directories.")]


def _default_actions() -> frozenset[str]:
    """Names registered by the demo application (the registry flows are checked against)."""
    from engine.demo.actions import build_actions
    from engine.demo.shop import Shop

    return build_actions(Shop()).names()


def _print_problems(problems: list[Problem]) -> None:
    for p in problems:
        style = "red" if p.severity == "error" else "yellow"
        err.print(f"[{style}]{escape(str(p))}[/{style}]", highlight=False, soft_wrap=True)


@app.command()
def validate(
    paths: FlowsArg = None,  # type: ignore[assignment]
    prompts: Annotated[Path | None, typer.Option(help="Prompt templates directory.")] = None,
    strict: Annotated[bool, typer.Option(help="Treat warnings as errors.")] = False,
) -> None:
    """Check flow files: schema, graph, guards, templates and actions. Exits 1 on errors."""
    from engine.flow.loader import validate_paths

    paths = paths or [ROOT / "flows"]
    flows, problems = validate_paths(paths, prompts or ROOT / "prompts", _default_actions())
    _print_problems(problems)
    errors = [p for p in problems if p.severity == "error" or strict]
    if errors:
        err.print(f"[red]{len(errors)} error(s)[/red] in {len(paths)} path(s)")
        raise typer.Exit(1)
    names = ", ".join(f.name for f in flows)
    console.print(f"[green]ok[/green]: {len(flows)} flow(s) valid ({names})")


@app.command()
def schema(
    output: Annotated[Path | None, typer.Option("--output", "-o",
                                                   help="Write here instead of stdout.")] = None,
) -> None:
    """Write the JSON Schema of flow files (for editor completion)."""
    from engine.flow.jsonschema import flow_json_schema

    text = json.dumps(flow_json_schema(), indent=2, ensure_ascii=False) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        console.print(f"wrote {output}")


@app.command()
def graph(
    flow_file: Annotated[Path, typer.Argument(help="The flow file.")],
    prompts: Annotated[Path | None, typer.Option(help="Prompt templates directory.")] = None,
) -> None:
    """Print a Mermaid diagram of a flow's state machine."""
    from engine.flow.loader import validate_paths

    flows, problems = validate_paths([flow_file], prompts or ROOT / "prompts",
                                     _default_actions())
    if not len(flows):
        _print_problems(problems)
        raise typer.Exit(1)
    flow = next(iter(flows))
    kinds = {name: s.kind for name, s in flow.states.items()}
    sys.stdout.write(flow.machine.mermaid(title=f"{flow.name} v{flow.version}", kinds=kinds))


@app.command()
def chat(
    flow: Annotated[str | None, typer.Option(help="Only this flow (skips routing).")] = None,
    model: Annotated[str | None, typer.Option(help="offline or claude.")] = None,
    show_state: Annotated[bool, typer.Option("--show-state",
                                             help="Show state and entities each turn.")] = False,
    config: Annotated[Path | None, typer.Option(help="Config file (YAML).")] = None,
) -> None:
    """Chat with the demo flows in the terminal. /state, /rate N, /new, /quit."""
    if model not in (None, "offline", "claude"):
        raise typer.BadParameter("use offline or claude", param_hint="--model")
    try:
        asyncio.run(_chat(flow, model, show_state, config))
    except HelplineError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except (KeyboardInterrupt, EOFError):
        console.print()


async def _chat(flow_name: str | None, model: str | None, show_state: bool,
                config: Path | None) -> None:
    from engine.app import build_app
    from engine.core.types import Inbound
    from engine.store.base import ConversationKey

    settings = load_settings(config)
    application = await build_app(settings, model=model)
    engine = application.engine
    if flow_name is not None:
        if flow_name not in engine.flows:
            known = ", ".join(f.name for f in engine.flows)
            raise HelplineError(f"unknown flow {flow_name!r} (flows: {known})")
        engine.flows.flows = {flow_name: engine.flows[flow_name]}
    console.print(f"[dim]model: {engine.model.name} · flows: "
                  f"{', '.join(f.name for f in engine.flows)} · /state /rate N /new /quit[/dim]")
    key = ConversationKey("cli", "local", uuid.uuid4().hex[:12])
    try:
        while True:
            try:
                text = console.input("[bold cyan]you>[/bold cyan] ").strip()
            except EOFError:
                break
            if not text:
                continue
            if text in ("/quit", "/exit"):
                break
            if text == "/new":
                key = ConversationKey("cli", "local", uuid.uuid4().hex[:12])
                console.print("[dim]new conversation[/dim]")
                continue
            if text == "/state":
                await _show_state(application.store, key)
                continue
            rating = None
            kind = "text"
            if text.startswith("/rate"):
                parts = text.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    console.print("[dim]usage: /rate 1..5[/dim]")
                    continue
                rating, kind = int(parts[1]), "rating"
            inbound = Inbound(key=key, text=text, customer="demo:cli",
                              received_at=datetime.now(UTC), kind=kind,  # type: ignore[arg-type]
                              rating=rating, channel_message_id=uuid.uuid4().hex)
            result = await engine.handle(inbound)
            for out in result.outbound:
                style = {"disclosure": "dim italic", "handoff": "yellow"}.get(out.kind, "green")
                console.print(f"[bold]bot>[/bold] [{style}]{out.text}[/{style}]", highlight=False)
                if out.quick_replies:
                    labels = "  ".join(f"[{q.label}]" for q in out.quick_replies)
                    console.print(f"     [dim]{labels}[/dim]", highlight=False)
            if result.outcome is not None and result.outcome.muted:
                console.print("[dim](a human agent owns this conversation; message stored)[/dim]")
            if show_state:
                await _show_state(application.store, key)
    finally:
        await application.close()


async def _show_state(store: object, key: object) -> None:
    from engine.store.base import ConversationKey, Store

    assert isinstance(store, Store) and isinstance(key, ConversationKey)
    conv = await store.load(key)
    if conv is None:
        console.print("[dim](no conversation yet)[/dim]")
        return
    table = Table(title=f"{conv.flow or '-'} / {conv.state or '-'} · owner {conv.owner} · "
                        f"lang {conv.language}", show_header=True)
    table.add_column("entity")
    table.add_column("value")
    table.add_column("turn")
    table.add_column("source")
    for name, item in conv.entities.items():
        table.add_row(name, json.dumps(item["v"], ensure_ascii=False), str(item["t"]),
                      item["s"])
    console.print(table)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    model: Annotated[str | None, typer.Option(help="offline or claude.")] = None,
    config: Annotated[Path | None, typer.Option(help="Config file (YAML).")] = None,
) -> None:
    """Start the server: web chat, agent console, channel webhooks, /metrics."""
    import uvicorn

    from engine.server.app import create_app

    if model not in (None, "offline", "claude"):
        raise typer.BadParameter("use offline or claude", param_hint="--model")
    try:
        settings = load_settings(config, host=host, port=port)
    except HelplineError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if settings.secret_key is None:
        # Keep chat sessions and agent logins valid across restarts of a
        # single-machine deployment (make run); production sets secret_key.
        settings = settings.model_copy(update={"secret_key": _local_secret()})
    base = settings.public_url or f"http://{settings.host}:{settings.port}"

    def ready(context: object) -> None:
        console.print(f"[bold green]Helpline is running[/bold green] "
                      f"(model: {settings.resolved_model() if model is None else model})")
        console.print(f"  web chat       {base}/chat/")
        console.print(f"  agent console  {base}/agent/")
        console.print(f"  metrics        {base}/metrics")
        console.print(f"  health         {base}/healthz  {base}/readyz")

    application = create_app(settings, model=model, on_ready=ready)
    # ws_max_size: the web chat refuses frames over 16 KiB itself; this stops
    # uvicorn from buffering anything much larger before the app sees it.
    uvicorn.run(application, host=settings.host, port=settings.port, ws="websockets-sansio",
                ws_max_size=65536, log_level="info", timeout_graceful_shutdown=10,
                lifespan="on")


def _local_secret() -> str:
    """A random secret kept in ``var/secret.key`` (created once, readable by the owner only)."""
    import os
    import secrets

    path = ROOT / "var" / "secret.key"
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secret + "\n")
        return secret


@app.command("hash-password")
def hash_password(
    password: Annotated[str, typer.Option(prompt=True, hide_input=True,
                                          confirmation_prompt=True)],
) -> None:
    """Hash an agent password for the `agents:` section of the config file."""
    from argon2 import PasswordHasher

    console.print(PasswordHasher().hash(password))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
