"""Run a clipdex command in this process and print, as JSON on stderr's last line, the most anonymous memory
(RssAnon: heap, not the page cache of mapped files) that each on-disk index build held above what the process
held when it began, sampled every millisecond. `--memory` bounds exactly that build (retrieval.build)."""

from __future__ import annotations

import json
import sys
import threading
import time

from clipdex.cli.main import main
from clipdex.retrieval.ann import build


def anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


builds: list[dict[str, int]] = []
unmeasured = build.build_on_disk


def measured(live, *args, **kwargs):  # type: ignore[no-untyped-def]
    base, peak, done = anon(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        return unmeasured(live, *args, **kwargs)
    finally:
        done.set()
        watcher.join()
        builds.append({"held": max(peak[0], anon()) - base, "vectors": len(live), "dim": live.dim})


build.build_on_disk = measured
sys.argv = ["clipdex", *sys.argv[1:]]
code = 0
try:
    main()
except SystemExit as e:
    code = int(e.code or 0)
print(json.dumps(builds), file=sys.stderr)
sys.exit(code)
