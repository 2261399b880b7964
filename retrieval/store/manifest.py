"""manifest.json: the typed entry point of an index directory, and the checks on the directory itself.

The manifest names the model, the embedding width, the ANN settings and the current published snapshot.
It is replaced atomically, so a reader sees one snapshot or the next, never a mix.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipdex.retrieval.config import ModelSpec
from clipdex.retrieval.errors import IndexFormatError, IndexNotFoundError, InputError
from clipdex.retrieval.store.atomic import atomic_write_bytes

FORMAT_VERSION = 2  # 2: canonical paths, caption links (`link`), full rows in the snapshot
MANIFEST = "manifest.json"
MODEL_DIR = "model"
DEFAULT_TARGET_RECALL = 0.95
VECTOR_DTYPE_RULE = "float32 while a kind is exact-search sized, float16 past it (per shard, in the .npy header)"


@dataclass(frozen=True)
class AnnSettings:
    """What the user asked for; stored in the manifest (`ann_settings`) so later publishes keep it."""

    index_type: str | None = None  # a FAISS factory string; None: automatic
    memory: int | None = None  # bytes the index may take; None: no limit (on disk: what the build may hold)
    target_recall: float = DEFAULT_TARGET_RECALL
    on_disk: bool = False  # inverted lists in a file beside the index, memory-mapped: corpora larger than RAM

    def to_json(self) -> dict[str, Any]:
        return {
            "index_type": self.index_type,
            "memory": self.memory,
            "target_recall": self.target_recall,
            "on_disk": self.on_disk,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> AnnSettings:
        data = data or {}
        return cls(
            data.get("index_type"),
            data.get("memory"),
            data.get("target_recall", DEFAULT_TARGET_RECALL),
            bool(data.get("on_disk", False)),
        )


@dataclass(frozen=True)
class AnnRecord:
    """How one kind's index was chosen and tuned: the manifest's `ann` section for that kind."""

    factory: str
    reason: str = ""
    bytes_estimate: int = 0  # what the index takes in memory
    trained_n: int = 0  # vectors when it was trained: past twice or half that, it is trained anew
    n: int = 0
    on_disk: bool = False  # inverted lists in a file beside the index
    params: str = ""  # a faiss ParameterSpace string, e.g. "nprobe=16"
    recall_at_10: float | None = None
    queries: int = 0  # tuning queries
    curve: list[list[Any]] = field(default_factory=list)  # [params, recall@10] as tuning went

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.on_disk:
            del data["on_disk"]  # only on-disk indexes say so (format 2 as written)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AnnRecord:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["curve"] = [list(step) for step in values.get("curve") or []]
        return cls(**{"factory": "", **values})


@dataclass
class Snapshot:
    """The published generation: one FAISS file per kind and a parquet of items, with their checksums."""

    generation: int = 0
    files: dict[str, str] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    published: float | None = None


@dataclass
class Manifest:
    model: ModelSpec
    dim: int
    format_version: int = FORMAT_VERSION
    created: float = field(default_factory=time.time)
    metric: str = "cosine"
    vector_dtype: str = VECTOR_DTYPE_RULE
    counts: dict[str, int] = field(default_factory=lambda: {"images": 0, "texts": 0, "failed": 0})
    index_types: dict[str, str] = field(default_factory=dict)
    ann_settings: AnnSettings | None = None  # what the user asked for
    ann: dict[str, AnnRecord] = field(default_factory=dict)  # per kind (images, texts): how its index was made
    snapshot: Snapshot = field(default_factory=Snapshot)
    roots: list[str] = field(default_factory=list)  # folders and files given to `clipdex index`, canonical
    precision: str = "fp32"  # what the model ran at to make the vectors: queries run at the same (model.precision)
    forgotten: list[str] = field(default_factory=list)  # removed with --forget: indexing a folder above skips them
    offline: list[str] = field(default_factory=list)  # roots and folders unreadable at the last run: items kept
    devices: dict[str, int] = field(default_factory=dict)  # a root folder → its device when it last held images
    rerank: str | None = None  # the re-ranking head attached (`finetune --method rerank --index`): a file in model/
    ocr: str | None = None  # the OCR engine that reads the words in new images (`index --ocr`); None: off

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = self.model.to_json()
        data["ann_settings"] = self.ann_settings.to_json() if self.ann_settings is not None else None
        data["ann"] = {kind: record.to_json() for kind, record in self.ann.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        snapshot = data.get("snapshot") or {}
        return cls(
            model=ModelSpec.from_json(data["model"]),
            dim=int(data["dim"]),
            format_version=int(data["format_version"]),
            created=float(data.get("created") or 0.0),
            metric=data.get("metric", "cosine"),
            vector_dtype=data.get("vector_dtype", VECTOR_DTYPE_RULE),
            counts=dict(data.get("counts") or {}),
            index_types=dict(data.get("index_types") or {}),
            ann_settings=AnnSettings.from_json(data["ann_settings"]) if data.get("ann_settings") else None,
            ann={kind: AnnRecord.from_json(record) for kind, record in (data.get("ann") or {}).items()},
            roots=list(data.get("roots") or []),
            precision=str(data.get("precision") or "fp32"),
            forgotten=list(data.get("forgotten") or []),
            offline=list(data.get("offline") or []),
            devices={str(k): int(v) for k, v in (data.get("devices") or {}).items()},
            rerank=data.get("rerank") or None,
            ocr=data.get("ocr") or None,
            snapshot=Snapshot(
                generation=int(snapshot.get("generation", 0)),
                files=dict(snapshot.get("files") or {}),
                sha256=dict(snapshot.get("sha256") or {}),
                published=snapshot.get("published"),
            ),
        )


# What clipdex itself writes in an index folder: a folder holding only these (a run killed before its first
# manifest, say) may become an index; one holding anything else is someone's folder.
_OWN = re.compile(
    r"(manifest\.json|catalog\.duckdb|write\.lock|vectors|model)(\..*)?|(images|texts|items|words)-\d+\..+|\..*"
)


_REPAIR = "repair it from the published snapshot: `clipdex check --repair --index "


def check_index_dir(index_dir: Path) -> None:
    """Refuse an --index that names something other than an index folder (new, empty or clipdex's), before anything
    is created or written: a file, or a folder of the user's own (a photo folder given as its own index)."""
    if index_dir.exists() and not index_dir.is_dir():
        raise InputError(f"--index {index_dir} is a file, not an index folder; give a folder (new or existing)")
    if not index_dir.is_dir() or (index_dir / MANIFEST).exists():
        return
    try:
        foreign = sorted(p.name for p in index_dir.iterdir() if not _OWN.fullmatch(p.name))
    except OSError:
        return  # unreadable: what opens it next says so
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(
            f"--index {index_dir} is not a clipdex index and holds other files ({shown}); an index folder must be "
            f"new, empty or an index: give another, e.g. --index {index_dir.with_name(index_dir.name + '.clipdex')}"
        )


def read_manifest(index_dir: Path) -> Manifest:
    check_index_dir(index_dir)
    if not index_dir.is_dir():
        raise IndexNotFoundError(
            f"index directory not found: {index_dir} (create one with `clipdex index PATH --index {index_dir}`)"
        )
    path = index_dir / MANIFEST
    if not path.is_file():
        raise IndexNotFoundError(f"{index_dir} holds no clipdex index (no {MANIFEST}); create one with `clipdex index`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{path} is damaged ({e}); {_REPAIR}{index_dir}`") from e
    if not isinstance(data, dict) or "format_version" not in data:
        raise IndexFormatError(f"{path} is not a clipdex manifest")
    version = data["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IndexFormatError(
            f"{index_dir} has index format {version}, newer than this clipdex reads ({FORMAT_VERSION}); upgrade clipdex"
        )
    try:
        return Manifest.from_json(data)
    except (KeyError, TypeError, ValueError) as e:
        raise IndexFormatError(f"{path} is damaged (bad or missing field: {e}); {_REPAIR}{index_dir}`") from e


def write_manifest(index_dir: Path, manifest: Manifest) -> None:
    atomic_write_bytes(index_dir / MANIFEST, (json.dumps(manifest.to_json(), indent=2) + "\n").encode())


def model_config_path(index_dir: Path, spec: ModelSpec) -> Path:
    """Where an index keeps a copy of the model-config JSON it was built with."""
    return index_dir / MODEL_DIR / f"{spec.name}.json"


def write_model_config(index_dir: Path, spec: ModelSpec) -> Path:
    """Keep a copy of the model-config JSON in the index (a spec made from a config file)."""
    path = model_config_path(index_dir, spec)
    path.parent.mkdir(exist_ok=True)
    atomic_write_bytes(path, json.dumps(spec.config, indent=2).encode())
    return path


def model_config_intact(index_dir: Path, spec: ModelSpec) -> bool:
    """Whether the index's copy of its model-config JSON is the manifest's (true where there is none to keep)."""
    if spec.config is None:
        return True
    try:
        return json.loads(model_config_path(index_dir, spec).read_text(encoding="utf-8")) == spec.config
    except (OSError, ValueError):
        return False


def index_model(index_dir: Path, spec: ModelSpec | None = None) -> str:
    """The --model value that rebuilds an index's architecture: its name, or the config JSON kept in the index."""
    spec = spec or read_manifest(index_dir).model
    return str(model_config_path(index_dir, spec)) if spec.config is not None else spec.name
