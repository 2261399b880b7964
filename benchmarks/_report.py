"""Shared output for benchmark scripts: a JSON file and a markdown table, plus the machine description."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

_VECTORS = [("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("asimd", "NEON")]  # widest first


def machine() -> dict[str, Any]:
    """What a result was measured on. Under a hypervisor the CPU's name can be a generic one ("AMD EPYC" for two
    machines whose float32 GEMM differed 3-fold), so its widest vector instructions are given too."""
    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    vector = next((name for flag, name in _VECTORS if flag in flags), None)
    if vector and flags & {"avx512_vnni", "avx_vnni"}:
        vector += " VNNI"
    return {
        "cpu": cpu or platform.processor() or platform.machine(),
        "vector": vector,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out: Path, name: str, payload: dict[str, Any], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
