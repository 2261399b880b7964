"""manifest.json: the typed entry point of an index directory, and the checks on the directory itself.

The manifest names the model, the embedding width, the ANN settings and the current published snapshot.
It is replaced atomically, so a reader sees one snapshot or the next, never a mix.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipdex.retrieval import weights
from clipdex.retrieval.atomic import atomic_write_bytes
from clipdex.retrieval.config import EncoderConfig, ModelSpec
from clipdex.retrieval.errors import IndexFormatError, IndexNotFoundError, InputError

FORMAT_VERSION = 2  # 2: canonical paths, caption links (`link`), full rows in the snapshot
MANIFEST = "manifest.json"
MODEL_DIR = "model"
VECTOR_DTYPE_RULE = "float32 while a kind is exact-search sized, float16 past it (per shard, in the .npy header)"


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
    ann_settings: dict[str, Any] | None = None  # what the user asked for (retrieval.build.AnnSettings)
    ann: dict[str, dict[str, Any]] = field(default_factory=dict)  # per kind: how its index was chosen and tuned
    snapshot: Snapshot = field(default_factory=Snapshot)
    roots: list[str] = field(default_factory=list)  # folders and files given to `clipdex index`, canonical

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = self.model.to_json()
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
            ann_settings=data.get("ann_settings"),
            ann=dict(data.get("ann") or {}),
            roots=list(data.get("roots") or []),
            snapshot=Snapshot(
                generation=int(snapshot.get("generation", 0)),
                files=dict(snapshot.get("files") or {}),
                sha256=dict(snapshot.get("sha256") or {}),
                published=snapshot.get("published"),
            ),
        )


def check_index_dir(index_dir: Path) -> None:
    """Refuse an --index that names something other than a folder, before anything is created."""
    if index_dir.exists() and not index_dir.is_dir():
        raise InputError(f"--index {index_dir} is a file, not an index folder; give a folder (new or existing)")


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
        raise IndexFormatError(f"{path} is damaged ({e}); rebuild the index") from e
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
        raise IndexFormatError(f"{path} is damaged (bad or missing field: {e}); rebuild the index") from e


def write_manifest(index_dir: Path, manifest: Manifest) -> None:
    atomic_write_bytes(index_dir / MANIFEST, (json.dumps(manifest.to_json(), indent=2) + "\n").encode())


def model_config_path(index_dir: Path, spec: ModelSpec) -> Path:
    """Where an index keeps a copy of the model-config JSON it was built with."""
    return index_dir / MODEL_DIR / f"{spec.name}.json"


def index_model(index_dir: Path, spec: ModelSpec | None = None) -> str:
    """The --model value that rebuilds an index's architecture: its name, or the config JSON kept in the index."""
    spec = spec or read_manifest(index_dir).model
    return str(model_config_path(index_dir, spec)) if spec.config is not None else spec.name


def index_encoder_config(index_dir: Path, *, device: str = "auto") -> tuple[EncoderConfig, ModelSpec]:
    """The encoder config that reloads the model an index was built with: its checkpoint where it was recorded,
    or the content-addressed copy when the file has moved (retrieval.weights)."""
    spec = read_manifest(index_dir).model
    model = index_model(index_dir, spec)
    checkpoint = weights.locate(spec)
    pretrained = str(checkpoint) if checkpoint is not None else spec.pretrained
    return EncoderConfig(model=model, pretrained=pretrained, device=device), spec
