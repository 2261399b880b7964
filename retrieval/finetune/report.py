"""What a fine-tuning run leaves for a person: train_log.jsonl, report.json and a plot of its curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipdex.retrieval.store.atomic import atomic_write_bytes

LOG = "train_log.jsonl"
REPORT = "report.json"
PLOT = "training.png"


class TrainLog:
    """Appends one JSON object per line: a step (loss, lr) or an epoch (validation recall)."""

    def __init__(self, out: Path, *, keep_epochs_below: int | None = None):
        self.path = out / LOG
        kept: list[str] = []
        if keep_epochs_below is not None and self.path.exists():  # resuming: drop what the killed epoch wrote
            kept = [
                ln for ln in self.path.read_text().splitlines() if json.loads(ln).get("epoch", 0) < keep_epochs_below
            ]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def write_report(out: Path, report: dict[str, Any]) -> Path:
    path = out / REPORT
    atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode())
    return path


def plot(out: Path, records: list[dict[str, Any]], *, title: str, loss: str = "contrastive loss") -> Path:
    """Training loss per step (with its per-epoch mean) and validation recall per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    epochs = [r for r in records if "val" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    if steps:
        by_epoch: dict[int, list[float]] = {}
        for r in steps:
            by_epoch.setdefault(r["epoch"], []).append(r["loss"])
        # epoch e's steps spread over (e - 1, e], where its recall is plotted on the right
        x = [e - 1 + (j + 1) / len(losses) for e, losses in by_epoch.items() for j in range(len(losses))]
        left.plot(x, [v for losses in by_epoch.values() for v in losses], color="#9bb7d4", linewidth=0.8, label="step")
        means = [sum(v) / len(v) for v in by_epoch.values()]
        left.plot(list(by_epoch), means, "o-", color="#1f4e79", label="epoch mean")
        left.legend(frameon=False)
    left.set(title="training loss", xlabel="epoch", ylabel=loss)
    for direction, style in (("text_to_image", "-"), ("image_to_text", "--")):
        for k, colour in (("R@1", "#c0504d"), ("R@5", "#4f81bd"), ("R@10", "#9bbb59")):
            ys = [100 * r["val"][direction][k] for r in epochs]
            label = f"{'text→image' if direction == 'text_to_image' else 'image→text'} {k}"
            right.plot([r["epoch"] for r in epochs], ys, style, marker="o", color=colour, label=label)
    right.set(title="validation recall (epoch 0: before training)", xlabel="epoch", ylabel="recall (%)", ylim=(0, 100))
    right.legend(frameon=False, fontsize=7, ncol=2)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    path = out / PLOT
    fig.savefig(path)
    plt.close(fig)
    return path
