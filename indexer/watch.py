"""Keep an index current with its folders: `clipdex watch` and `clipdex serve --watch`.

File-system events come from watchfiles (inotify on Linux, the platform's own elsewhere), or from its polling
where a mount sends none (network shares, FUSE, some external drives: `polls`). Events are not acted on one by
one: they are gathered until the folders are quiet, then one ordinary incremental run (`run_index`) brings the
index up to date, so a burst of thousands of copied photos is a few runs, a rename keeps its vector (the run finds
the content hash it already holds), and the one-writer lock applies as to `clipdex index`. A file still being
written (changed within the last `settle_s` seconds) is left for a later run; files that are not images (an
editor's or a browser's temporary `.part`, `.tmp`, `~` files) and hidden ones are never indexed. The first run
catches up with whatever changed while nothing watched. A root that goes away (an unplugged drive) keeps its
items offline, as in `clipdex index`, and is watched again when it comes back. A run that fails (another writer
holds the index, a full disk) is tried again, less often while it keeps failing. Idle, the watcher sleeps in the
kernel, waking every second or two for a few `stat` calls (is a root gone or back? is a copy whole?).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clipdex.indexer.config import IndexConfig, Summary
from clipdex.indexer.pipeline import EncoderCache, run_index
from clipdex.indexer.sources import IGNORE_FILE
from clipdex.retrieval.errors import ClipdexError, Interrupted
from clipdex.retrieval.imaging.files import is_image_file, skipped
from clipdex.retrieval.paths import canonical, is_at_or_under

log = logging.getLogger(__name__)

SETTLE_S = 2.0  # a file unchanged this long is whole: a copy or a save still under way is left for later
QUIET_MS = 500  # events are gathered until the folders have been quiet this long ...
GATHER_MS = 5000  # ... or for this long at most, so a long copy is indexed as it goes
TICK_S = 5.0  # how often an idle watcher checks that its roots are (still) there
RETRY_S, MAX_RETRY_S = 1.0, 60.0  # a run that failed (another writer holds the index) is tried again after this
# What downloads, copies and editors write before the real name exists (never folders of photos).
TEMPORARY_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".tmp", ".temp", ".swp", "~")
# File systems whose changes made elsewhere send no events here: watched by polling.
POLLED_FILESYSTEMS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "davfs", "lustre", "gpfs",
        "fuse.sshfs", "fuse.rclone", "fuse.s3fs", "fuse.gcsfuse", "fuse.mergerfs", "fuse.glusterfs", "virtiofs",
    }
)  # fmt: skip


@dataclass
class WatchConfig:
    index: IndexConfig  # the folders and settings of every run (`paths` are the watched roots)
    poll: bool | None = None  # None: poll the roots on network and FUSE mounts, listen for events elsewhere
    poll_delay_ms: int = 1000
    settle_s: float = SETTLE_S
    quiet_ms: int = QUIET_MS
    gather_ms: int = GATHER_MS
    tick_s: float = TICK_S


@dataclass
class WatchStatus:
    """What a watcher is doing, for a server's page and for tests; read from other threads."""

    indexing: bool = False
    runs: int = 0
    last: dict[str, Any] | None = None  # the last run's summary
    last_error: str | None = None
    offline: list[str] = field(default_factory=list)  # roots and folders that are away (kept offline)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def to_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "indexing": self.indexing,
                "runs": self.runs,
                "last": self.last,
                "error": self.last_error,
                "offline": list(self.offline),
            }


def polls(root: Path) -> bool:
    """Whether changes under `root` need polling: it lies on a network or FUSE file system (/proc/mounts)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    best, kind = "", ""
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if is_at_or_under(str(root), point) and len(point) > len(best):
            best, kind = point, parts[2]
    return kind in POLLED_FILESYSTEMS or (kind.startswith("fuse.") and kind != "fuse.portal")


def relevant(path: str) -> bool:
    """Whether a change at `path` can change the index: an image file, a folder (or what was one: a deleted path
    has no type), an ignore file; never a hidden file, or a file that is not an image (temporary files)."""
    name = os.path.basename(path)
    if name == IGNORE_FILE:
        return True
    if skipped(name):
        return False
    if is_image_file(Path(name)):
        return True
    if name.lower().endswith(TEMPORARY_SUFFIXES):
        return False
    return not os.path.isfile(path)  # a folder, or a deleted path that may have been one


class Watcher:
    """Watch `config.index.paths` and keep `config.index.index_dir` current until `stop` is set."""

    def __init__(self, config: WatchConfig, *, on_run: Callable[[Summary, float], None] | None = None):
        self.config = config
        self.roots = [canonical(p) for p in config.index.paths]
        self.stop = threading.Event()
        self.status = WatchStatus()
        self._on_run = on_run
        self._pending: dict[str, float] = {}  # a changed path → when its change was seen
        self._stamps: dict[str, tuple[tuple[int, int], float]] = {}  # its (size, mtime) → since when it is so
        self._retry_s = RETRY_S
        self._encoder = EncoderCache()  # the model, loaded by the first run and kept for the next ones
        self._dirty = True  # the first run catches up with what changed while nothing watched

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Catch up, then index what changes until `stop` is set."""
        import watchfiles

        while not self.stop.is_set():
            present = self._present()
            with self.status.lock:
                self.status.offline = [str(r) for r in self.roots if r not in dict(present)]
            if present:
                self._listen(watchfiles, present)
                continue
            self._maybe_index()  # every root is away: their items are marked offline, once
            if self.stop.wait(self.config.tick_s):
                return
            self._dirty = self._dirty or any(r.exists() for r in self.roots)

    def _present(self) -> list[tuple[Path, int]]:
        """The roots that are there, each with its device: a drive mounted on (or unmounted from) a root folder
        changes the device under the same path, and the watch must then be made again (the old one watches the
        folder underneath)."""
        out = []
        for root in self.roots:
            try:
                out.append((root, root.stat().st_dev))
            except OSError:
                continue
        return out

    def _listen(self, watchfiles: Any, present: list[tuple[Path, int]]) -> None:
        """Gather events until a run is due, or the set of roots that are there changes (then watched anew). The
        first run comes once the system watches, so nothing that changed before (while no watcher ran, or between
        two watches) is missed."""
        poll = self.config.poll if self.config.poll is not None else any(polls(r) for r, _ in present)
        first_seen: float | None = None
        self._dirty = True
        try:
            for changes in watchfiles.watch(
                *(r for r, _ in present),
                watch_filter=lambda change, path: relevant(path),
                debounce=self.config.gather_ms,
                step=self.config.quiet_ms,
                stop_event=self.stop,
                rust_timeout=int(self._timeout_s() * 1000),
                yield_on_timeout=True,
                force_polling=poll,
                poll_delay_ms=self.config.poll_delay_ms,
                ignore_permission_denied=True,
            ):
                now = time.monotonic()
                for _, path in changes:
                    self._pending.setdefault(path, now)
                    self._dirty = True
                    first_seen = first_seen or now
                if self._present() != present:  # unplugged, unmounted or back: watch the new set
                    self._dirty = True
                    self._maybe_index()
                    return
                if self._dirty and self._settled_enough(first_seen):
                    self._maybe_index()
                    first_seen = None
        except (OSError, RuntimeError) as e:
            # A root vanished under the watch, or the system's watcher failed ("error in underlying watcher": a
            # file gone between a poll's listing and its stat, too many inotify watches): watched anew, and the
            # run that follows catches up with whatever the failure hid.
            log.info("watching again after: %s", e)
            self._dirty = True
            self.stop.wait(min(self.config.tick_s, 1.0))

    def _timeout_s(self) -> float:
        return min(self.config.tick_s, max(self.config.settle_s, 0.2))

    def _settled_enough(self, first_seen: float | None) -> bool:
        """Run when every changed file is whole, or once changes have been waiting for `gather_ms` (a long copy is
        indexed as it goes, the files still being written left for the next run)."""
        if not self._unsettled():
            return True
        return first_seen is not None and time.monotonic() - first_seen >= self.config.gather_ms / 1000

    def _unsettled(self) -> set[str]:
        """Changed files whose size or mtime changed within the last `settle_s` seconds (of the watcher's clock: an
        mtime set in the future or kept from the source by `cp -p` says nothing about whether a copy is whole)."""
        now = time.monotonic()
        busy = set()
        for path, seen in self._pending.items():
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not os.path.isfile(path):
                continue
            stamp = (st.st_size, st.st_mtime_ns)
            since = self._stamps.get(path)
            if since is None or since[0] != stamp:
                since = (stamp, seen if since is None else now)
                self._stamps[path] = since
            if now - since[1] < self.config.settle_s:
                busy.add(str(canonical(path)))
        return busy

    # -- one run --------------------------------------------------------------------------------------------------

    def _maybe_index(self) -> None:
        if not self._dirty:
            return
        busy = self._unsettled()
        config = replace(self.config.index, defer=frozenset(busy))
        with self.status.lock:
            self.status.indexing = True
        t0 = time.monotonic()
        try:
            summary = run_index(config, keep=self._encoder)
        except Interrupted:
            raise
        except Exception as e:
            # `clipdex index` holding the lock, a full or failing disk, a catalog another process has open: nothing
            # is lost (a run commits or leaves the index as it was), and the same run is tried again, less and less
            # often while it keeps failing
            self._failed(str(e) if isinstance(e, ClipdexError) else f"{type(e).__name__}: {e}")
            self.stop.wait(self._retry_s)
            self._retry_s = min(self._retry_s * 2, MAX_RETRY_S)
            return
        finally:
            with self.status.lock:
                self.status.indexing = False
        seconds = time.monotonic() - t0
        self._pending = {p: t for p, t in self._pending.items() if str(canonical(p)) in busy}
        self._stamps = {p: s for p, s in self._stamps.items() if p in self._pending}
        self._dirty = bool(self._pending)
        offline = _offline(self.config.index.index_dir)
        with self.status.lock:
            self.status.offline = offline if offline is not None else self.status.offline
            self.status.runs += 1
            self.status.last = {**summary.to_json(), "deferred": summary.deferred, "seconds": round(seconds, 3)}
            self.status.last_error = None
        self._retry_s = RETRY_S
        if self._on_run is not None:
            self._on_run(summary, seconds)

    def _failed(self, message: str) -> None:
        with self.status.lock:
            if message != self.status.last_error:  # said once while it lasts
                log.warning("watch: %s", message)
            self.status.last_error = message

    def start(self) -> threading.Thread:
        """Run in a daemon thread (`serve --watch`); `stop.set()` ends it."""
        thread = threading.Thread(target=self._run_in_thread, name="clipdex-watch", daemon=True)
        thread.start()
        return thread

    def _run_in_thread(self) -> None:
        try:
            self.run()
        except Exception as e:  # said on the page and in the log, not lost with the thread
            self._failed(f"the watcher stopped: {e}")
            log.exception("the watcher stopped")


def _offline(index_dir: Path) -> list[str] | None:
    """What the index keeps offline after a run (missing and unmounted roots, unreadable folders)."""
    from clipdex.retrieval.store.manifest import read_manifest

    try:
        return list(read_manifest(index_dir).offline)
    except (ClipdexError, OSError):
        return None
