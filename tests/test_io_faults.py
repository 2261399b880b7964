"""A failing disk, for real: Debian's libfiu injects I/O errors (EIO) into a running `clipdex` process at the
`posix/io/*` failure points (open, read, write, fsync, rename, close...) with a small probability, enabled with
`fiu-ctrl` once the run has started. The run fails in one line or records the files it could not read; the index
stays consistent (`check`); a re-run without faults gives exactly the right items.

Skipped where fiu-utils or a C compiler is missing (`.ci/run` installs fiu-utils).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run
from corpus import make_images
from typer.testing import CliRunner

from clipdex.retrieval.maintain.check import check_index

FIU = Path("/usr/lib/fiu")
SHIM = Path(__file__).parent / "faults" / "glibc_malloc.c"


@pytest.fixture(scope="module")
def preload(tmp_path_factory) -> str:
    """LD_PRELOAD for a process that fiu-ctrl can inject faults into: allocations straight from glibc (see the
    shim's comment), then libfiu's remote control and POSIX wrappers."""
    if not (FIU / "fiu_posix_preload.so").is_file() or shutil.which("fiu-ctrl") is None:
        pytest.skip("fiu-utils is not installed (apt-get install fiu-utils)")
    if shutil.which("cc") is None:
        pytest.skip("no C compiler for the allocation shim")
    shim = tmp_path_factory.mktemp("fiu") / "glibc_malloc.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(SHIM)], check=True)
    return f"{shim} {FIU / 'fiu_run_preload.so'} {FIU / 'fiu_posix_preload.so'}"


def _has_open(pid: int, suffix: str) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").endswith(suffix) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def run_with_faults(preload: str, args: list[object], *, started: str, probability: float, fifo: Path):
    """Run `clipdex ARGS` in a process of its own; once it has a file ending in `started` open (start-up is over),
    enable every posix/io failure point at `probability`, each failure an EIO. Returns (exit code, stdout, stderr)."""
    env = dict(os.environ, LD_PRELOAD=preload, FIU_ENABLE="", FIU_CTRL_FIFO=str(fifo))
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipdex", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not _has_open(proc.pid, started) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        subprocess.run(
            [
                "fiu-ctrl",
                "-f",
                str(fifo),
                "-c",
                f"enable_random name=posix/io/*,probability={probability},failinfo=5",
                str(proc.pid),
            ],
            check=True,
        )
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _said_cleanly(code: int, err: str) -> None:
    """A run that meets a failing disk exits (never dies of a signal); if it fails it says so in one line, no
    traceback, after any warnings of its own. The faults hit stderr too: a line cut short (a short write, then a
    failed one) is all it could say."""
    assert code >= 0, f"killed by signal {-code}: {err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    notes = [line for line in lines if line.startswith("clipdex: ")]  # warnings: a photo or folder it could not read
    if code != 0:
        errors = lines[len(notes) :]
        assert lines[: len(notes)] == notes and len(errors) <= 1, err
        if errors and err.endswith("\n"):  # written whole
            assert errors[0].startswith("error: ") and "I/O error" in errors[0], lines


def _paths(index: Path) -> list[str]:
    """Every indexed image, offline ones included: a run that could not list a folder (an I/O error on it) keeps its
    items, hidden from searches until it is read again (`--offline show` shows them, flagged)."""
    hits = json.loads(
        run(CliRunner(), "search", "a shape", "--index", index, "--json", "--no-server", "-k", 200, "--offline", "show")
    )
    return [h["path"] for h in hits["results"]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_index_run_meeting_io_errors_stays_consistent_and_a_rerun_is_exact(preload, tmp_path, tiny_model, seed):
    photos = tmp_path / "photos"
    index = tmp_path / "idx"
    make_images(photos, 10, seed=300 + seed)
    run(CliRunner(), "index", photos, "--index", index, *tiny_model.cli_args())
    make_images(photos / "more", 30, seed=310 + seed)
    before = set(_paths(index))

    code, _, err = run_with_faults(
        preload,
        ["index", photos, "--index", index, "--workers", 0, "--batch-size", 4, "--commit-every", 1, "--json"],
        started="catalog.duckdb",  # the model is loaded and the writer open
        probability=0.01,
        fifo=tmp_path / "fiu",
    )
    _said_cleanly(code, err)
    report = check_index(index)
    assert report.ok, report.problems
    assert before <= set(_paths(index)), err  # what was published before is still there

    run(CliRunner(), "index", photos, "--index", index)  # the disk is well again
    assert check_index(index).ok
    paths = _paths(index)
    assert len(paths) == len(set(paths)) == 40
    assert set(paths) == {str(p.resolve()) for p in photos.rglob("*.png")}


def test_a_build_meeting_io_errors_keeps_the_last_index(preload, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    index = tmp_path / "idx"
    make_images(photos, 40, seed=320)
    run(CliRunner(), "index", photos, "--index", index, *tiny_model.cli_args())
    want = _paths(index)
    for attempt in range(3):
        code, _, err = run_with_faults(
            preload,
            ["build", "--index", index, "--index-type", "HNSW16" if attempt % 2 == 0 else "Flat", "--json"],
            started="catalog.duckdb",
            probability=0.02,
            fifo=tmp_path / f"fiu{attempt}",
        )
        _said_cleanly(code, err)
        report = check_index(index)
        assert report.ok, report.problems
        assert json.loads(run(CliRunner(), "info", "--index", index, "--json"))["counts"]["images"] == 40
    run(CliRunner(), "build", "--index", index, "--index-type", "Flat")
    assert check_index(index).ok and _paths(index) == want
