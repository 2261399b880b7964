"""How long a client may take to send a request: its headers within HEADERS_S of connecting (or of the request
before ending), its body within BODY_S after them. uvicorn bounds only the idle time between requests, so a client
that never ends its headers held a connection, and a task, for as long as it liked."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADERS_S = 10.0
BODY_S = 60.0


class TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol (httptools) that closes a connection whose request arrives too slowly."""

    _read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(HEADERS_S)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._read_timer is None:
            self._arm(HEADERS_S)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(BODY_S)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _too_slow(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.close()
