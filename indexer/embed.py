"""`clipdex embed`: embeddings in clip-retrieval's layout, at any size, to a local folder or any fsspec URL.

Partition n is `img_emb/img_emb_n.npy` or `text_emb/text_emb_n.npy` with `metadata/metadata_n.parquet`, row j of
each describing one item (`image_path`, `caption`), which `clipdex import` and clip-retrieval users' tools read.
Images and texts are separate items, so a partition holds one kind, as `clipdex export` writes them.

Resumable per partition. The first run writes a plan: which files (or caption rows) go to which partition
(`plan/plan_n.parquet`, then `clipdex-embed.json` naming the model). A partition is done once its metadata file
exists, which is written last, each file through a temporary name and a rename (an object store's PUT is atomic
the same way). A re-run skips done partitions, finishes the others from the plan, and plans files that are new
since into new partitions. Files that fail are left out of the vectors and listed in `failures/failures_n.parquet`.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipdex.indexer.engines import EngineConfig, encode_decoded, open_engine
from clipdex.indexer.sources import check_roots, no_images_error, scan_root
from clipdex.retrieval.config import EncoderConfig, ModelSpec
from clipdex.retrieval.errors import InputError
from clipdex.retrieval.imaging.captions import open_texts
from clipdex.retrieval.imaging.decode import DEFAULT_MAX_PIXELS
from clipdex.retrieval.model import weights
from clipdex.retrieval.paths import canonical

PLAN = "clipdex-embed.json"
PARTITION_ROWS = 100_000
_FOLDER = {"image": "img_emb", "text": "text_emb"}


@dataclass(frozen=True)
class EmbedConfig:
    paths: tuple[Path, ...]
    out: str  # a folder, or an fsspec URL (s3://bucket/prefix, gs://..., memory://...)
    encoder: EncoderConfig | None = None  # None: the plan's model, to finish a run; else the default model
    device: str = "auto"
    texts: tuple[Path, ...] = ()
    text_column: str | None = None
    image_column: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    batch_size: int = 64
    partition_rows: int = PARTITION_ROWS
    max_pixels: int = DEFAULT_MAX_PIXELS
    exclude: tuple[str, ...] = ()
    float16: bool = False


@dataclass
class EmbedSummary:
    out: str
    images: int = 0  # vectors written by this run
    texts: int = 0
    failed: int = 0
    partitions: int = 0  # in the plan
    written: int = 0  # partitions written by this run (the others were done before)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "images": self.images,
            "texts": self.texts,
            "failed": self.failed,
            "partitions": self.partitions,
            "written": self.written,
            "failures": [{"path": p, "error": e} for p, e in self.failures],
        }


class Output:
    """The output location through fsspec; every file lands whole (a temporary name, then a rename)."""

    def __init__(self, url: str):
        import fsspec

        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise InputError(f"cannot write to {url}: {e}") from None
        self.root = self.root.rstrip("/") or "/"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return bool(self.fs.exists(self.path(*parts)))

    def read(self, *parts: str) -> bytes:
        with self.fs.open(self.path(*parts), "rb") as f:
            return bytes(f.read())

    def write(self, data: bytes, *parts: str) -> None:
        final = self.path(*parts)
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{final}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, final)
        except BaseException as e:
            with contextlib.suppress(OSError):  # a half-written part is never left behind
                self.fs.rm(tmp)
            if isinstance(e, OSError) and not e.filename and "://" not in final:
                e.filename = final
            raise


def run_embed(config: EmbedConfig) -> EmbedSummary:
    roots = [canonical(p) for p in config.paths]
    if not roots and not config.texts:
        raise InputError("nothing to embed: give folders or image files, and/or --texts FILE")
    check_roots(roots)
    for root in roots:
        if not root.exists():
            raise no_images_error(root)
    sources = [
        open_texts(f, text_column=config.text_column, image_column=config.image_column, require_images=False)
        for f in dict.fromkeys(canonical(f) for f in config.texts)
    ]
    out = Output(config.out)
    earlier = json.loads(out.read(PLAN)) if out.exists(PLAN) else None  # the plan of an earlier run, read once
    if config.encoder is not None and earlier is not None:  # a different architecture is refused before it loads
        asked = Path(config.encoder.model).stem if config.encoder.model.endswith(".json") else config.encoder.model
        if asked != earlier["model"]["name"]:
            raise _other_model(out, earlier["model"])
    if config.encoder is not None:
        encoder_config = config.encoder
    elif earlier is not None:
        encoder_config = _plan_encoder(earlier, config.device)
    else:
        encoder_config = EncoderConfig(device=config.device)
    from clipdex.retrieval.model.encoder import load_encoder  # torch: once the inputs are known to be good

    encoder = load_encoder(encoder_config)
    plan = _check_plan(out, earlier, encoder.spec, encoder.dim)
    _extend_plan(out, plan, roots, sources, config)
    summary = EmbedSummary(out=config.out, partitions=len(plan["partitions"]))
    todo = [p for p in plan["partitions"] if not out.exists("metadata", f"metadata_{p['n']}.parquet")]
    if not todo:
        return summary
    engine = open_engine(config.engine, encoder)
    try:
        images = [p for p in todo if p["kind"] == "image"]
        if images:
            _embed_images(out, images, engine, encoder, config, summary)
        for part in (p for p in todo if p["kind"] == "text"):
            _embed_texts(out, part, engine, config, summary)
    finally:
        engine.close()
    return summary


def _plan_encoder(plan: dict[str, Any], device: str) -> EncoderConfig:
    """The model an unfinished output was planned with (its config JSON and checkpoint found again)."""
    spec = ModelSpec.from_json(plan["model"])
    model = spec.model_arg(Path(tempfile.mkdtemp(prefix="clipdex-embed-"))) if spec.config is not None else spec.name
    checkpoint = weights.locate(spec)
    return EncoderConfig(model=model, pretrained=str(checkpoint) if checkpoint else spec.pretrained, device=device)


def _check_plan(out: Output, plan: dict[str, Any] | None, spec: ModelSpec, dim: int) -> dict[str, Any]:
    """The earlier run's plan if it was made with this model (else an error), or a new, empty one."""
    if plan is None:
        if out.exists("metadata") and out.fs.ls(out.path("metadata")):
            raise InputError(f"{out.root} holds embeddings clipdex did not plan; embed into a new --out")
        return {"format": 1, "model": spec.to_json(), "dim": dim, "partitions": [], "texts": {}}
    if not ModelSpec.from_json(plan["model"]).same_model(spec) or plan["dim"] != dim:
        raise _other_model(out, plan["model"])
    return plan


def _other_model(out: Output, planned: dict[str, Any]) -> InputError:
    return InputError(
        f"{out.root} holds embeddings from {planned['name']} / {planned['pretrained']}; "
        "give the same --model/--pretrained to finish it (or neither), or embed into a new --out"
    )


def _extend_plan(out: Output, plan: dict[str, Any], roots: list[Path], sources: list[Any], config: EmbedConfig) -> None:
    """Give partitions to the files and caption files not in the plan yet; write their lists, then the plan."""
    planned = set()
    for part in plan["partitions"]:
        if part["kind"] == "image":
            planned.update(_plan_rows(out, part["n"]).column("image_path").to_pylist())
    found = sorted({str(e.path) for root in roots for e in scan_root(root, config.exclude)} - planned)
    new: list[tuple[str, pa.Table]] = []
    for start in range(0, len(found), config.partition_rows):
        new.append(
            ("image", pa.table({"image_path": pa.array(found[start : start + config.partition_rows], pa.string())}))
        )
    for source in sources:
        st = source.path.stat()
        seen = plan["texts"].get(str(source.path))
        if seen is not None:
            if (seen["size"], seen["mtime"]) != (st.st_size, st.st_mtime):
                raise InputError(f"{source.path} changed since it was planned; embed it into a new --out")
            continue
        for table in _text_tables(source, config.partition_rows):
            new.append(("text", table))
        plan["texts"][str(source.path)] = {"size": st.st_size, "mtime": st.st_mtime}
    first = 1 + max((p["n"] for p in plan["partitions"]), default=-1)
    for n, (kind, table) in enumerate(new, start=first):
        out.write(_parquet(table), "plan", f"plan_{n}.parquet")
        plan["partitions"].append({"n": n, "kind": kind, "rows": table.num_rows})
    if new or not out.exists(PLAN):
        out.write(json.dumps(plan, indent=1).encode(), PLAN)


def _text_tables(source: Any, rows: int) -> Iterator[pa.Table]:
    batch: dict[str, list[Any]] = {"caption": [], "image_path": [], "line": [], "error": []}
    for row in source:
        batch["caption"].append(row.text or None)
        batch["image_path"].append(str(row.image) if row.image is not None else None)
        batch["line"].append(row.line)
        batch["error"].append(row.error)
        if len(batch["caption"]) >= rows:
            yield _text_table(batch, source.path)
            batch = {k: [] for k in batch}
    if batch["caption"]:
        yield _text_table(batch, source.path)


def _text_table(batch: dict[str, list[Any]], path: Path) -> pa.Table:
    return pa.table(
        {
            "caption": pa.array(batch["caption"], pa.string()),
            "image_path": pa.array(batch["image_path"], pa.string()),
            "source": pa.array([str(path)] * len(batch["caption"]), pa.string()),
            "line": pa.array(batch["line"], pa.int64()),
            "error": pa.array(batch["error"], pa.string()),
        }
    )


def _plan_rows(out: Output, n: int) -> pa.Table:
    return pq.read_table(io.BytesIO(out.read("plan", f"plan_{n}.parquet")))


def _embed_images(
    out: Output, parts: list[dict[str, Any]], engine: Any, encoder: Any, config: EmbedConfig, summary: EmbedSummary
) -> None:
    """One engine run over every unfinished image partition, cut back into partitions as results stream in."""
    lists = [_plan_rows(out, p["n"]).column("image_path").to_pylist() for p in parts]
    paths = [Path(p) for names in lists for p in names]
    batches = engine.images(paths, known_hashes=frozenset(), max_pixels=config.max_pixels, batch_size=config.batch_size)
    pending: list[Any] = []
    offset = 0
    for part, names in zip(parts, lists, strict=True):
        while len(pending) < len(names):
            batch = next(batches)
            encode_decoded(encoder, batch)
            pending.extend(batch)
        mine, pending = pending[: len(names)], pending[len(names) :]
        ok = [d for d in mine if d.vector is not None]
        failures = [(names[i], d.error or "not decoded") for i, d in enumerate(mine) if d.vector is None]
        assert all(offset <= d.index < offset + len(names) for d in mine)  # results come back in order
        offset += len(names)
        ok_names = [str(paths[d.index]) for d in ok]
        meta = pa.table(
            {
                "image_path": pa.array(ok_names, pa.string()),
                "caption": pa.nulls(len(ok), pa.string()),
                "width": pa.array([d.width for d in ok], pa.int64()),
                "height": pa.array([d.height for d in ok], pa.int64()),
                "size": pa.array([d.size for d in ok], pa.int64()),
                "hash": pa.array([d.hash for d in ok], pa.string()),
            }
        )
        vectors = np.stack([d.vector for d in ok]) if ok else np.zeros((0, encoder.dim), np.float32)
        _write_partition(out, part["n"], "image", vectors, meta, failures, config)
        summary.images += len(ok)
        _count(summary, failures)


def _embed_texts(out: Output, part: dict[str, Any], engine: Any, config: EmbedConfig, summary: EmbedSummary) -> None:
    rows = _plan_rows(out, part["n"])
    errors = rows.column("error").to_pylist()
    captions = rows.column("caption").to_pylist()
    ok = [i for i, (c, e) in enumerate(zip(captions, errors, strict=True)) if e is None and c]
    failures = [
        (f"{rows.column('source')[i].as_py()}:{rows.column('line')[i].as_py()}", errors[i] or "empty caption")
        for i in range(rows.num_rows)
        if i not in set(ok)
    ]
    vectors = engine.encode_texts([captions[i] for i in ok], batch_size=config.batch_size)
    kept = rows.take(pa.array(ok, pa.int64()))
    meta = pa.table({"caption": kept.column("caption"), "image_path": kept.column("image_path")})
    _write_partition(out, part["n"], "text", vectors, meta, failures, config)
    summary.texts += len(ok)
    _count(summary, failures)


def _count(summary: EmbedSummary, failures: list[tuple[str, str]]) -> None:
    summary.written += 1
    summary.failed += len(failures)
    summary.failures.extend(failures)


def _write_partition(
    out: Output,
    n: int,
    kind: str,
    vectors: np.ndarray,
    meta: pa.Table,
    failures: list[tuple[str, str]],
    config: EmbedConfig,
) -> None:
    """Vectors, failures, then the metadata that marks the partition done."""
    buf = io.BytesIO()
    np.save(buf, vectors.astype(np.float16 if config.float16 else np.float32), allow_pickle=False)
    folder = _FOLDER[kind]
    out.write(buf.getvalue(), folder, f"{folder}_{n}.npy")
    if failures:
        table = pa.table({"path": [p for p, _ in failures], "error": [e for _, e in failures]})
        out.write(_parquet(table), "failures", f"failures_{n}.parquet")
    out.write(_parquet(meta), "metadata", f"metadata_{n}.parquet")


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
