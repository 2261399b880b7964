"""Searches answered by a running `clipdex serve` of the same index, so that `clipdex search` skips loading torch.

A server on loopback registers itself in the user's cache (`servers/<index digest>.json`, readable by the user
only): its URL, process id and token. `clipdex search` asks it first and gets the very JSON it would have
computed itself; when no live server is registered, or it does not answer, the search runs in-process. Standard
library only: importing this costs nothing.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipdex.retrieval.model.weights import cache_root, index_digest
from clipdex.retrieval.store.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from clipdex.retrieval.search.request import SearchRequest

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # a query image of many megapixels takes a while to decode on a small machine


def registration_path(index_dir: Path) -> Path:
    return cache_root() / "servers" / f"{index_digest(index_dir)}.json"


def register(index_dir: Path, url: str, token: str | None) -> Path:
    """Record a server for `index_dir`; returns the file, for `unregister`."""
    path = registration_path(index_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"url": url, "pid": os.getpid(), "token": token, "index": str(index_dir.resolve())}
    atomic_write_bytes(path, json.dumps(entry).encode(), durable=False, unique=True, mode=0o600)  # holds the token
    return path


def unregister(path: Path) -> None:
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():  # a newer server may have taken the slot
            path.unlink()
    except (OSError, ValueError):
        pass


def live_server(index_dir: Path) -> dict[str, Any] | None:
    try:
        entry = json.loads(registration_path(index_dir).read_text())
        os.kill(int(entry["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if entry.get("index") != str(index_dir.resolve()):
        return None
    return entry


def search_via_server(index_dir: Path, asked: SearchRequest) -> dict[str, Any] | None:
    """The server's answer (as `results_json`) to a search request, its image files sent as uploads; None when no
    live server answers it. The search then runs locally, which also gives the same error a local search would for a
    request the server refuses (its limits on k and query length are tighter than the CLI's)."""
    entry = live_server(index_dir)
    if entry is None:
        return None
    headers = {"Accept": "application/json"}
    if entry.get("token"):
        headers["Authorization"] = f"Bearer {entry['token']}"
    base = str(entry["url"]).rstrip("/")
    fields, files = asked.wire_fields(), asked.files()
    if not files:
        request = urllib.request.Request(f"{base}/api/search?" + urllib.parse.urlencode(fields), headers=headers)
    else:
        boundary = uuid.uuid4().hex
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        request = urllib.request.Request(
            f"{base}/api/search", data=_multipart(boundary, fields, files), headers=headers, method="POST"
        )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        log.info("the server for %s answered %s (%s); searching here", index_dir, e.code, _error_message(e))
        return None
    except (OSError, ValueError) as e:
        log.info("the server for %s did not answer (%s); searching here", index_dir, e)
        return None


def _error_message(e: urllib.error.HTTPError) -> str | None:
    try:
        return str(json.loads(e.read())["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _multipart(boundary: str, fields: list[tuple[str, str]], files: list[tuple[str, bytes]]) -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields
    ]
    parts += [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="query"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()
