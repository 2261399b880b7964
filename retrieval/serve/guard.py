"""What applies to every request before any route runs: the `Host` it names, the site it comes from, and the
headers every answer carries.

A page on any website can re-point its own name at 127.0.0.1 (DNS rebinding) and, being "same origin" with itself,
read whatever a local server answers. So only requests that name this server are answered: on a loopback bind a
loopback address or `localhost` with the server's port, plus the names given with `--allowed-host`; on another bind
those names, or the bound address. Requests that say they come from another site (an `Origin` that is not this
server's, `Sec-Fetch-Site: cross-site`) are refused on `/api`, where the results, paths and image files are. Every
answer carries a Content-Security-Policy that allows only this server, and asks not to be framed, sniffed, embedded
by another site or named in a Referer.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
)

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def allowed_names(bind: str, extra: Iterable[str]) -> frozenset[str]:
    """The host names a server bound to `bind` answers to."""
    names = {n.strip().lower().strip("[]") for n in extra if n.strip()}
    if is_loopback(bind):
        return frozenset(names | LOOPBACK_NAMES)
    return frozenset(names or {bind.lower().strip("[]")})


def is_loopback(name: str) -> bool:
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None] | None:
    """`name[:port]` or `[v6][:port]` → (name, port); None when it is not a host."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, _, port_text = value.partition(":")
        if ":" in port_text:  # an IPv6 literal without brackets is not a Host
            return None
        port_text = port_text if _ else None
    if not name or (port_text is not None and not (port_text.isdigit() and 0 < int(port_text) < 65536)):
        return None
    return name, int(port_text) if port_text is not None else None


class HostGuard:
    """ASGI middleware: refuse foreign `Host`s everywhere and cross-site requests on `/api`; add the headers."""

    def __init__(self, app: ASGIApp, *, bind: str, port: int, allowed: Iterable[str] = ()):
        self.app = app
        self.port = port
        self.names = allowed_names(bind, allowed)
        self.loopback = is_loopback(bind)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._refusal(scope, headers)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if refusal is not None:
            status, text = refusal
            body = json.dumps({"error": text}).encode()
            start = {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
            await send_with_headers(start)
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: dict[str, Any], headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host")
        if host is None:
            return 400, "the request names no Host; send one that names this server (HTTP/1.1)"
        if not self.host_ok(host, scope):
            return 400, (
                f"this server does not answer to the host {host!r}; it answers to "
                f"{', '.join(sorted(self.names))} on its port (serve it under another name with --allowed-host NAME)"
            )
        if not scope.get("path", "").startswith("/api/"):
            return None
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"http://{host.strip().lower()}":
            return 403, f"requests from another site ({origin}) are refused"
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return 403, "requests from another site are refused"
        return None

    def host_ok(self, value: str, scope: dict[str, Any]) -> bool:
        parsed = split_host(value)
        if parsed is None:
            return False
        name, port = parsed
        server = scope.get("server")
        listening = server[1] if server and server[1] else self.port  # the socket's own port (a test binds port 0)
        if (port or 80) != listening:
            return False
        return name in self.names or (self.loopback and is_loopback(name))
