"""A small web chat test client on ``websockets.asyncio.client`` (what a browser does)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Origin

Frame = dict[str, Any]


async def new_session(base_url: str, **body: Any) -> Frame:
    """``POST /chat/session``: a token and a session id."""
    async with httpx.AsyncClient(base_url=base_url) as http:
        response = await http.post("/chat/session", json=body)
        response.raise_for_status()
        data: Frame = response.json()
        return data


class ChatClient:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.last_seq = 0

    @classmethod
    async def open(cls, ws_url: str, *, origin: str | None = None) -> ChatClient:
        ws = await connect(ws_url, origin=Origin(origin) if origin else None,
                           open_timeout=5, close_timeout=2, max_queue=None)
        return cls(ws)

    @classmethod
    async def start(cls, ws_url: str, token: str, *, last_seq: int | None = None,
                    origin: str | None = None) -> tuple[ChatClient, list[Frame]]:
        """Connect and authenticate; returns the client and ready + replay frames."""
        client = await cls.open(ws_url, origin=origin)
        auth: Frame = {"type": "auth", "token": token}
        if last_seq is not None:
            auth["last_seq"] = last_seq
        await client.send(auth)
        ready = await client.recv()
        assert ready["type"] == "ready", ready
        frames = [ready]
        # The replay follows at once; a ping's pong marks its end.
        frames += await client.until_pong()
        return client, frames

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.ws.close()

    async def send(self, frame: Frame) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self, timeout: float = 5.0) -> Frame:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame: Frame = json.loads(raw)
        if frame.get("type") in ("message", "ack"):
            self.last_seq = max(self.last_seq, frame["seq"])
        elif frame.get("type") == "resync":
            self.last_seq = max([self.last_seq, *(m["seq"] for m in frame["messages"])])
        return frame

    async def recv_until(self, done: Callable[[Frame], bool], timeout: float = 5.0) -> list[Frame]:
        frames: list[Frame] = []
        while True:
            frame = await self.recv(timeout)
            frames.append(frame)
            if done(frame):
                return frames

    async def until_pong(self) -> list[Frame]:
        """Everything the server sends before answering a ping (the pong excluded)."""
        await self.send({"type": "ping"})
        frames = await self.recv_until(lambda f: f["type"] == "pong")
        return frames[:-1]

    async def say(self, text: str, *, id: str | None = None) -> list[Frame]:
        """Send a message and collect frames until the turn ends (typing off)."""
        await self.send({"type": "message", "id": id or uuid.uuid4().hex, "text": text})
        return await self.turn()

    async def turn(self) -> list[Frame]:
        return await self.recv_until(lambda f: f == {"type": "typing", "on": False})

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, list[Frame]]:
        """Read until the server closes; returns the close code and the frames before it."""
        from websockets.exceptions import ConnectionClosed

        frames: list[Frame] = []
        try:
            while True:
                frames.append(await self.recv(timeout))
        except ConnectionClosed:
            pass
        code = self.ws.close_code
        return code, frames


def messages(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if f["type"] == "message"]
