from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from hypothesis import HealthCheck, settings
from PIL import Image
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from corpus import train_tiny_model, write_tiny_config

# Stateful tests: a short run by default; `pytest --hypothesis-profile=long` for many more steps (RESULTS.md).
settings.register_profile(
    "clipdex", max_examples=4, stateful_step_count=12, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "long", max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile("clipdex")


@dataclass(frozen=True)
class TinyModel:
    config: Path
    weights: Path

    @property
    def name(self) -> str:
        return self.config.stem

    def cli_args(self) -> list[str]:
        return ["--model", str(self.config), "--pretrained", str(self.weights)]


@pytest.fixture(scope="session", autouse=True)
def weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoint copies that indexes keep (retrieval.weights) go to a test folder, not the user's cache."""
    import os

    folder = tmp_path_factory.mktemp("clipdex-cache")
    os.environ["CLIPDEX_CACHE"] = str(folder)  # inherited by the subprocesses tests start
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    folder = tmp_path_factory.mktemp("model")
    config = write_tiny_config(folder)
    weights = train_tiny_model(config, folder / "tiny-clip.pt")
    return TinyModel(config, weights)


class Reference:
    """Brute-force cosine search with open_clip used directly: PIL open, preprocess, full-length text.

    A JPEG is opened at the DCT scale clipdex decodes it at (Pillow's `draft` to the model's input size, part of
    the decoding rule for indexes and queries); everything after is open_clip's own."""

    def __init__(self, model: TinyModel):
        open_clip.add_model_config(model.config)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model.name, pretrained=str(model.weights)
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model.name)

    @torch.no_grad()
    def images(self, paths: list[Path]) -> np.ndarray:
        side = max(self.model.visual.preprocess_cfg["size"])
        images = []
        for p in paths:
            image = Image.open(p)
            image.draft("RGB", (side, side))  # a no-op but for JPEGs
            images.append(self.preprocess(image.convert("RGB")))
        batch = torch.stack(images)
        return self.model.encode_image(batch, normalize=True).numpy()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        return self.model.encode_text(self.tokenizer(texts), normalize=True).numpy()


@pytest.fixture(scope="session")
def reference(tiny_model: TinyModel) -> Reference:
    return Reference(tiny_model)


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


def run(cli: CliRunner, *args: object, code: int = 0) -> str:
    """Invoke the CLI in-process; assert its exit code; return stdout."""
    from clipdex.cli.main import app

    result = cli.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def search_json(cli: CliRunner, index: Path, *args: object) -> dict:
    import json

    return json.loads(run(cli, "search", *args, "--index", index, "--json"))


def brute_force(query: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = corpus @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def assert_same_ranking(
    got_keys: list[str], got_scores: list[float], want_keys: list[str], want_scores: np.ndarray
) -> None:
    """Equal top-k, allowing only neighbours whose scores tie to float precision to swap."""
    assert len(got_keys) == len(want_keys)
    np.testing.assert_allclose(got_scores, want_scores, atol=2e-5)
    for i, (g, w) in enumerate(zip(got_keys, want_keys, strict=True)):
        if g != w:
            tied = [j for j in range(len(want_keys)) if abs(want_scores[j] - want_scores[i]) < 2e-5]
            assert g in [want_keys[j] for j in tied], f"rank {i + 1}: got {g}, want {w}"


LOCAL = "http://localhost"  # the base URL of a TestClient: a Host the server answers to (not "testserver")


@contextlib.contextmanager
def serving(app: object) -> Iterator[str]:
    """Run an ASGI app on uvicorn on a free loopback port in a thread; yield its base URL; stop it after."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def counts(summary: dict) -> dict:
    """The counts of an `index --json` summary (it also lists failures and notes)."""
    return {k: summary[k] for k in ("added", "updated", "removed", "unchanged", "failed")}


@contextlib.contextmanager
def clipdex_serve(index: Path) -> Iterator[tuple[object, int]]:
    """A real `clipdex serve` process for `index` on a free loopback port, ready (it has said "serving"); yields
    (process, port) and stops it with Ctrl-C after."""
    import signal
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipdex", "serve", "--index", str(index), "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # "clipdex: serving ... at http://127.0.0.1:PORT/"
        assert f":{port}/" in line, line
        yield proc, port
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
