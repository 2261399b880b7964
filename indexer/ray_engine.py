"""Decode and encode on a Ray cluster with Ray Data (`pip install "clipdex[ray]"`).

Two stages over the list of paths: CPU tasks read, hash, decode and preprocess files (exactly as local workers do,
with the same `ImageFiles`), then an actor pool, one model per actor and a GPU per actor where the cluster has
GPUs, encodes the pixels. Ray Data streams blocks between the stages with back-pressure, so memory stays bounded
whatever the corpus size, and returns results in input order (`preserve_order`) to the writer in this process.
Tasks are retried and actors restarted when a worker is lost; a killed driver loses only what it had not yet
committed, which the next run encodes again.

The model travels with the job: its config and, for a local checkpoint, its bytes go through the object store, so
workers need clipdex installed but not the user's files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.retrieval.config import EncoderConfig, ModelSpec
from clipdex.retrieval.errors import InputError
from clipdex.retrieval.imaging.decode import PhotoMeta
from clipdex.retrieval.imaging.loader import Decoded, ImageFiles
from clipdex.retrieval.model.encoder import Encoder
from clipdex.retrieval.store.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

_INFO = ("size", "mtime", "hash", "width", "height", "error", "vanished")


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError('--engine ray needs Ray: pip install "clipdex[ray]"') from None
    return ray


class RayEngine:
    text_chunk = 65_536  # texts per Ray Data job: large enough that scheduling costs little

    def __init__(self, encoder: Encoder, *, address: str | None = None):
        spec = encoder.spec
        if spec.pretrained is None and not spec.name.startswith(("hf-hub:", "local-dir:")):
            raise InputError(
                "--engine ray needs model weights (--pretrained): random weights would differ from worker to worker"
            )
        ray = self.ray = _import_ray()
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines would drown our output
        self.started = not ray.is_initialized()
        if self.started:
            try:
                ray.init(
                    address=address,
                    include_dashboard=False,
                    configure_logging=False,
                    log_to_driver=False,
                    runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
                )
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise InputError(f"cannot start or reach {where}: {str(e).strip().splitlines()[0][:200]}") from None
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # the writer assigns ids in input order, as a local run does
        context.enable_progress_bars = False
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        # GPU actors where there are GPUs; otherwise a quarter of the CPUs encode and the rest decode
        self.actors = self.gpus if self.gpus else max(1, cpus // 4)
        self.actor_cpus = 1 if self.gpus else max(1, min(4, cpus // (2 * self.actors)))
        self.model = _shippable(ray, spec)
        self.preprocess = encoder.preprocess
        self.decode_options = encoder.decode_options
        self.dim = encoder.dim

    def _pool(self) -> dict[str, Any]:
        return {
            "compute": self.ray.data.ActorPoolStrategy(min_size=1, max_size=self.actors),
            "num_gpus": 1 if self.gpus else 0,
            "num_cpus": self.actor_cpus,
        }  # Ray Data's defaults replace a lost actor and retry its batch (max_restarts, max_task_retries: -1)

    def images(
        self, paths: Sequence[Path], *, known_hashes: frozenset[str], max_pixels: int, batch_size: int
    ) -> Iterator[list[Decoded]]:
        if not paths:
            return
        data = self.ray.data
        items = [{"index": i, "path": str(p)} for i, p in enumerate(paths)]
        blocks = max(1, min(len(items) // max(batch_size, 1), 1000))
        ds = data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(
            _decode_batch,
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=1,
            fn_kwargs={
                "preprocess": self.preprocess,
                "options": self.decode_options(max_pixels),
                "known_hashes": self.ray.put(known_hashes),
            },
        )  # a task lost with its worker is retried (Ray's default)
        ds = ds.map_batches(
            _ImageActor, batch_size=batch_size, batch_format="numpy", fn_constructor_args=(self.model,), **self._pool()
        )
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
            yield [_decoded(batch, j) for j in range(len(batch["index"]))]

    def encode_texts(self, texts: list[str], *, batch_size: int) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        data = self.ray.data
        size = max(batch_size, 256)
        ds = data.from_items([{"text": t} for t in texts], override_num_blocks=max(1, min(len(texts) // size, 200)))
        ds = ds.map_batches(
            _TextActor, batch_size=size, batch_format="numpy", fn_constructor_args=(self.model,), **self._pool()
        )
        out = [b["vector"] for b in ds.iter_batches(batch_size=size, batch_format="numpy")]
        return np.concatenate(out).astype(np.float32, copy=False)

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


def _shippable(ray: Any, spec: ModelSpec) -> dict[str, Any]:
    """What a worker needs to load the same model: the spec, the config JSON of a custom architecture, and the
    bytes of a local checkpoint (through the object store)."""
    weights = None
    if spec.checkpoint_sha256 and spec.pretrained and Path(spec.pretrained).is_file():
        weights = ray.put(Path(spec.pretrained).read_bytes())
    return {"spec": spec.to_json(), "weights": weights, "suffix": Path(spec.pretrained or "").suffix}


def _worker_encoder(model: dict[str, Any]) -> Encoder:
    import ray
    import torch

    from clipdex.retrieval.model.encoder import load_encoder

    spec = ModelSpec.from_json(model["spec"])
    folder = Path(tempfile.gettempdir()) / f"clipdex-ray-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    name, pretrained = spec.model_arg(folder), spec.pretrained
    if model["weights"] is not None:
        local = folder / f"{spec.checkpoint_sha256}{model['suffix']}"
        if not local.is_file():
            atomic_write_bytes(local, ray.get(model["weights"]), durable=False, unique=True)  # a worker's cache
        pretrained = str(local)
    gpus = ray.get_gpu_ids()
    device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        with contextlib.suppress(Exception):
            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    config = EncoderConfig(model=name, pretrained=pretrained, device=device)
    return load_encoder(config, expect=spec if spec.checkpoint_sha256 else None)


def _decode_batch(
    batch: dict[str, np.ndarray], *, preprocess: Any, options: Any, known_hashes: Any
) -> dict[str, np.ndarray]:
    """Read, hash, decode and preprocess a batch of files, as the local DataLoader workers do."""
    import ray

    if not isinstance(known_hashes, frozenset):
        known_hashes = ray.get(known_hashes)
    files = ImageFiles([Path(p) for p in batch["path"]], preprocess, known_hashes=known_hashes, options=options)
    decoded = [files[j] for j in range(len(files))]
    shape = next((tuple(d.pixels.shape) for d in decoded if d.pixels is not None), (0,))
    pixels = np.zeros((len(decoded), *shape), dtype=np.float32)
    for j, d in enumerate(decoded):
        if d.pixels is not None:
            pixels[j] = d.pixels.numpy()
    return {
        "index": batch["index"],
        "info": np.array([_info(d) for d in decoded], dtype=object),
        "has_pixels": np.array([d.pixels is not None for d in decoded], dtype=bool),
        "pixels": pixels,
    }


class _ImageActor:
    def __init__(self, model: dict[str, Any]):
        self.encoder = _worker_encoder(model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n, mask = len(batch["index"]), batch["has_pixels"]
        vectors = np.zeros((n, self.encoder.dim), dtype=np.float32)
        if mask.any():
            vectors[mask] = self.encoder.encode_images(torch.from_numpy(np.ascontiguousarray(batch["pixels"][mask])))
        return {"index": batch["index"], "info": batch["info"], "has_vector": mask, "vector": vectors}


class _TextActor:
    def __init__(self, model: dict[str, Any]):
        self.encoder = _worker_encoder(model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        return {"vector": self.encoder.encode_texts(texts, batch_size=len(texts))}


def _info(d: Decoded) -> str:
    info = {k: getattr(d, k) for k in _INFO}
    info["meta"] = asdict(d.meta) if d.meta is not None else None
    return json.dumps(info)


def _decoded(batch: dict[str, np.ndarray], j: int) -> Decoded:
    info = json.loads(batch["info"][j])
    meta = info.pop("meta")
    d = Decoded(int(batch["index"][j]), **info)
    d.meta = PhotoMeta(**{f.name: meta.get(f.name) for f in fields(PhotoMeta)}) if meta is not None else None
    if batch["has_vector"][j]:
        d.vector = np.array(batch["vector"][j], dtype=np.float32)
    return d
