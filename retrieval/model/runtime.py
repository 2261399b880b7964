"""Runtimes for one model: its towers exported once to ONNX and run on ONNX Runtime, or open_clip on torch.

An export lives in the user cache, content-addressed (`exports/<key>/`): the key hashes what the model is (its
weights' SHA-256 or tag, its architecture and config), the export code's version and the ONNX opset, so any index
built with the same weights finds it, and a cleared cache or a copied index re-exports. `OnnxEncoder` imports no
torch: Pillow/numpy preprocessing (`preprocess.py`) and CLIP's tokenizer (`tokenizer.py`) are the ones every
runtime uses. `retrieval.model.choose` picks the runtime: `--runtime` / `$CLIPDEX_RUNTIME` (auto, onnx or torch).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipdex.retrieval.config import ModelSpec
from clipdex.retrieval.errors import ModelError
from clipdex.retrieval.model.weights import cache_root
from clipdex.retrieval.store.lock import held

if TYPE_CHECKING:  # imported when first used, after a search's towers start opening (Pillow, regex: 0.05 s)
    from PIL import Image

    from clipdex.retrieval.imaging.decode import DecodeOptions
    from clipdex.retrieval.model.preprocess import Preprocess
    from clipdex.retrieval.model.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

EXPORT_VERSION = 1  # bump when what the export writes changes: old exports are then re-made, never misread
OPSET = 18
RUNTIMES = ("auto", "onnx", "torch")
PRECISIONS = ("fp32", "int8")  # int8: the towers' weights quantised (ONNX Runtime's dynamic quantisation)
META = "export.json"
# Images per ONNX Runtime call. Its arena keeps the largest batch's activations for the session's life, so a batch of
# 64 ViT-B images held 1.8 GB where rclip's 8 hold 0.9 (benchmarks/RESULTS.md); a CPU is no faster on more.
IMAGE_CHUNK = 8
PROBE_TEXTS = [
    "a photo of a dog",
    "two red squares and a blue circle on a green background",
    "",
    "Ünïcödé, emoji 🎉 and punctuation!?",
    "a very long caption " * 30,
]


def probe_pixels(size: tuple[int, int]) -> np.ndarray:
    """Three random images of the model's input size: what a graph is checked on against the one it came from."""
    height, width = size
    return np.random.default_rng(0).standard_normal((3, 3, height, width)).astype(np.float32)


def export_key(spec: ModelSpec) -> str:
    """What identifies an export: the weights (by content when local), the architecture, the export's code."""
    what = {
        "name": spec.name,
        "weights": spec.checkpoint_sha256 or spec.pretrained,
        "config": spec.config,
        "export": EXPORT_VERSION,
        "opset": OPSET,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def export_dir(spec: ModelSpec) -> Path:
    return cache_root() / "exports" / export_key(spec)


def find_export(spec: ModelSpec, precision: str = "fp32") -> Path | None:
    """The export for this model at this precision, if it was made (and not refused)."""
    folder = export_dir(spec)
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    if precision != "fp32":
        meta = (meta.get("precisions") or {}).get(precision) or {}
    return folder if meta.get("ok") else None


def graph_name(tower: str, precision: str, *, optimised: bool = False, packed: str | None = None) -> str:
    """`image.onnx`, `text.int8.onnx`, `image.mapped.onnx`, `image.packed-<tag>.onnx`: the graphs of an export
    folder. An optimised graph keeps its weights beside it (`_weights_of`); a packed one is this machine's
    (`packing_tag`)."""
    parts = [tower] + ([precision] if precision != "fp32" else [])
    if optimised:
        parts.append(f"packed-{packed}" if packed else "mapped")
    return ".".join(parts) + ".onnx"


def _weights_of(graph: Path) -> Path:
    return graph.with_suffix(".weights")


# ONNX Runtime 1.31.1 crashed (segmentation fault) running a text graph it had saved with packed weights; 1.32 runs
# every graph clipdex saves that way, to the bit of the portable graph's vectors (tests/test_runtime.py).
PACKED_SINCE = (1, 32)
# Bump when how a kept graph is made changes (2: GELUs reordered for ONNX Runtime's fusion; 3: attention written as
# ONNX Runtime's operator, `fusion.py`): packed graphs are then made again. A portable graph kept before stays as it
# was, correct and a little slower.
KEPT_VERSION = 3


def packing_tag(providers: Sequence[str], precision: str) -> str | None:
    """The tag of a graph saved with its weights packed by this ONNX Runtime for this CPU, or None where graphs are
    kept portable: below fp32 (a fully optimised int8 graph strays from fp32), on another execution provider, or on
    an ONNX Runtime older than `PACKED_SINCE`. MLAS packs a matrix's weights into panels for its kernels at every
    session start, into fresh memory: 0.2 s of the 0.45 s a ViT-B-32 image tower takes to open. Saved beside the
    graph, the packed weights are mapped like the others instead. Their layout is ONNX Runtime's and the CPU's, so
    the tag hashes both, and a copied cache or an upgrade packs again."""
    import onnxruntime as ort

    if precision != "fp32" or list(providers) != ["CPUExecutionProvider"]:
        return None
    version = tuple(int(part) for part in re.findall(r"\d+", ort.__version__)[:2])
    if version < PACKED_SINCE:
        return None
    machine = f"{KEPT_VERSION} {ort.__version__} {platform.machine()} {_cpu_features()}"
    return hashlib.sha256(machine.encode()).hexdigest()[:16]


@functools.cache
def _cpu_features() -> str:
    """The CPU's instruction sets as the kernel lists them (the first core's `flags`, `Features` on Arm)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return " ".join(sorted(value.split()))
    except OSError:
        pass
    return platform.processor()


def _publish_optimised(work: Path, optimised: Path) -> None:
    """Move a graph optimised into `work` (and its weights) beside the export: the weights first, so that a graph
    found there always has them. The graph names its weights file by name alone, which stays the same. Graphs kept
    by earlier versions with their weights inside (`*.opt.onnx`) go; so do, when it is packed, the tower's portable
    graph and its graphs packed for another CPU or ONNX Runtime, which this machine will not read (their weights
    are the size of the model, packed ones twice that)."""
    made = work / optimised.name
    if not made.is_file():
        return
    weights = _weights_of(made)
    if weights.is_file():
        os.replace(weights, _weights_of(optimised))
    os.replace(made, optimised)
    prefix, _, kind = optimised.name.removesuffix(".onnx").rpartition(".")
    stale = [f"{prefix}.opt.onnx"]
    if kind.startswith("packed-"):
        mine = f"{prefix}.{kind}."
        stale += [f.name for f in optimised.parent.glob(f"{prefix}.packed-*") if not f.name.startswith(mine)]
        stale += [f"{prefix}.mapped.onnx", f"{prefix}.mapped.weights"]
    for name in sorted(stale, key=lambda name: not name.endswith(".onnx")):  # no graph is left without its weights
        with contextlib.suppress(OSError):
            (optimised.parent / name).unlink()


def check_precision(value: str) -> str:
    if value not in PRECISIONS:
        raise ModelError(f"unknown precision {value!r}: use {' or '.join(PRECISIONS)}")
    return value


def refused_export(spec: ModelSpec) -> str | None:
    """Why this model's export was refused (its towers did not agree with torch), if it was."""
    try:
        meta = json.loads((export_dir(spec) / META).read_text())
    except (OSError, ValueError):
        return None
    return None if meta.get("ok") else str(meta.get("reason", "refused"))


def asked_runtime(runtime: str | None) -> str:
    value = (runtime or os.environ.get("CLIPDEX_RUNTIME") or "auto").lower()
    if value not in RUNTIMES:
        raise ModelError(f"unknown runtime {value!r}: use auto, onnx or torch")
    return value


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if device in ("auto", "cuda") or device.startswith("cuda:"):
        wanted = [p for p in ("CUDAExecutionProvider", "OpenVINOExecutionProvider") if p in available] + wanted
    return wanted


class OnnxEncoder:
    """An exported model on ONNX Runtime, with the same interface as `Encoder` for what indexing and queries use:
    L2-normalised float32 vectors from texts, PIL images or preprocessed pixels."""

    runtime = "onnx"

    def __init__(
        self,
        folder: Path,
        spec: ModelSpec,
        *,
        device: str = "auto",
        threads: int | None = None,
        precision: str = "fp32",
    ):
        meta = json.loads((folder / META).read_text())
        self.folder = folder
        self.spec = spec
        self.precision = precision
        self.dim = int(meta["dim"])
        self._preprocess = meta["preprocess"]
        self._context_length = int(meta["context_length"])
        self.trim_text = bool(meta["trim_text"])
        self.device = device
        self._threads = threads
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.providers = _providers(device)

    @functools.cached_property
    def tokenizer(self) -> ClipTokenizer:
        """Made when texts are first encoded (0.06-0.1 s): indexing photos needs none."""
        from clipdex.retrieval.model.tokenizer import ClipTokenizer

        return ClipTokenizer(self._context_length)

    @functools.cached_property
    def preprocess(self) -> Preprocess:
        """Made when first used: opening a tower needs neither it nor Pillow, so a search's towers start opening
        before they are imported (`warm_later`)."""
        from clipdex.retrieval.model.preprocess import Preprocess

        return Preprocess.from_json(self._preprocess)

    @property
    def crops_center(self) -> bool:
        return self.preprocess.crops_center

    def decode_options(self, max_pixels: int | None = None) -> DecodeOptions:
        """How images are decoded for this model: with `max_pixels` (else the default limit), drafted down to its
        input's size."""
        from clipdex.retrieval.imaging.decode import DEFAULT_MAX_PIXELS, MAX_ASPECT, DecodeOptions

        return DecodeOptions(
            max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
            max_aspect=MAX_ASPECT if self.crops_center else None,
            draft=self.preprocess.draft,
        )

    def warm(self, towers: Iterable[str]) -> None:
        """Open these towers' sessions now ("text", "image"), and make the tokenizer for the text tower. ONNX Runtime
        releases the GIL while it makes a session, so a thread warming the towers runs beside whatever the caller
        does meanwhile (`warm_later`)."""
        for tower in towers:
            self._session(tower)  # first: the GIL is free while it opens, for the caller's thread to go on
            if tower == "text":
                self.tokenizer  # noqa: B018  # made here, not by the first query

    def warm_later(self, towers: Iterable[str]) -> threading.Thread:
        """`warm` in a thread of its own, started now. Not a daemon: the interpreter waits for it before finalising,
        which a thread still inside ONNX Runtime must not meet. A failure is left to the first encode, which meets it
        again and reports it."""

        def run() -> None:
            try:
                self.warm(towers)
            except Exception:
                log.debug("warming the towers %s failed", towers, exc_info=True)

        thread = threading.Thread(target=run, name="clipdex-warm")
        thread.start()
        return thread

    def _session(self, tower: str) -> Any:
        """The tower's session, made on first use. The graph is optimised once and kept beside the export."""
        session = self._sessions.get(tower)
        if session is not None:
            return session
        with self._lock:  # the server's threads: one session per tower, one writer of its optimised graph
            return self._sessions.get(tower) or self._open_session(tower)

    def optimised_graph(self, tower: str) -> Path:
        """Where the tower's optimised graph is kept: packed for this machine where it can be (`packing_tag`)."""
        packed = packing_tag(self.providers, self.precision)
        return self.folder / graph_name(tower, self.precision, optimised=True, packed=packed)

    def _open_session(self, tower: str) -> Any:
        import onnxruntime as ort

        optimised = self.optimised_graph(tower)
        session = self._saved_session(ort, optimised)
        if session is None:
            # one process at a time writes a graph and its weights, so they always match (a read-only cache keeps
            # nothing, and goes on without the lock)
            with held(optimised.with_name(f".{optimised.name}.lock")):
                session = self._saved_session(ort, optimised) or self._optimised_session(ort, tower, optimised)
        self._sessions[tower] = session
        return session

    def _saved_session(self, ort: Any, optimised: Path) -> Any:
        """A session on the optimised graph kept beside the export, or None when there is none (or it was damaged).

        A portable graph (`*.mapped.onnx`) has the fusions that hold on any CPU (layer norm, GELU, scaled MatMul:
        "extended"); the layout ones ("all") depend on the CPU, so they are redone at each start, which is quick. A
        packed graph (`*.packed-<tag>.onnx`) has them all, and MLAS's packed weights too. Either keeps its weights in
        a file of its own, which ONNX Runtime maps into memory instead of parsing and copying them out of the graph:
        a ViT-B-32 text tower's session opens in 0.12 s instead of 0.35 s, and its pages are the page cache's."""
        if not optimised.is_file():
            return None
        try:
            return ort.InferenceSession(
                str(optimised), sess_options=self._options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                providers=self.providers,
            )  # fmt: skip
        except Exception:  # a saved graph or its weights cut short (a failing disk when written): made again
            for path in (optimised, _weights_of(optimised)):
                with contextlib.suppress(OSError):
                    path.unlink()
            return None

    def _optimised_session(self, ort: Any, tower: str, optimised: Path) -> Any:
        """A session on the export's graph, optimised now and kept as `optimised` with its weights beside it."""
        from clipdex.retrieval.model.fusion import kept_graph

        source = self.folder / graph_name(tower, self.precision)
        graph = kept_graph(source, attention=list(self.providers) == ["CPUExecutionProvider"])
        work = self.folder / f".{optimised.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        packed = ".packed-" in optimised.name
        level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if packed else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options = self._options(level)
        options.optimized_model_filepath = str(work / optimised.name)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", _weights_of(optimised).name
        )
        # small tensors stay in the graph: shape inference reads some (an Unsqueeze's axes) and cannot from a file
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        if packed:
            options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        try:
            try:
                work.mkdir(exist_ok=True)
                session = ort.InferenceSession(graph, sess_options=options, providers=self.providers)
            except Exception:  # the optimised graph could not be written (a full or failing disk): not kept now
                session = self._unsaved_session(ort, source, graph)
            with contextlib.suppress(OSError):  # a read-only or full cache: optimised again next time
                _publish_optimised(work, optimised)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # the graph as every later session loads it, so that this run's vectors are theirs to the last bit (the
        # layout optimisations redone at load change a convolution's rounding)
        return self._saved_session(ort, optimised) or session

    def _unsaved_session(self, ort: Any, source: Path, graph: str | bytes) -> Any:
        options = self._options(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        try:
            return ort.InferenceSession(graph, sess_options=options, providers=self.providers)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"cannot load the exported graph {source}: {first}") from None

    def _options(self, level: Any) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self._threads:
            options.intra_op_num_threads = self._threads
        options.log_severity_level = 4
        # ONNX Runtime's own log (its environment's, and each session's above): only what kills it. A mapped weights
        # file that fails to close, or a session whose weights fail to read, on a failing disk, was logged as a
        # second, coloured error line beside clipdex's one-line error; every failure that matters reaches clipdex as
        # an exception.
        ort.set_default_logger_severity(4)
        options.graph_optimization_level = level
        return options

    def encode_images(self, pixels: Any) -> np.ndarray:
        """Encode a preprocessed batch (N, 3, H, W)."""
        x = np.ascontiguousarray(np.asarray(pixels, dtype=np.float32))
        return _normalised(self._run("image", "pixels", x))

    def encode_pixels(self, pixels: Sequence[Any]) -> np.ndarray:
        """Encode preprocessed images (each 3, H, W), stacked a run of `IMAGE_CHUNK` at a time, the runs `_run`
        makes of a stacked batch (the same vectors, to the bit): an index run's batch of 64 photos is not also held
        as one 50 MB array beside its decoded pixels."""
        runs = [pixels[i : i + IMAGE_CHUNK] for i in range(0, len(pixels), IMAGE_CHUNK)]
        vectors = [self.encode_images(np.stack([np.asarray(p, dtype=np.float32) for p in run])) for run in runs]
        return np.concatenate(vectors) if vectors else np.empty((0, self.dim), dtype=np.float32)

    def encode_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encode_images(np.stack([self.preprocess(im) for im in images]))

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        return encode_distinct(texts, self.dim, batch_size, self._encode_text_batch)

    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:
        """Tokens cut to the batch's longest text when that is exact (a causal tower)."""
        tokens = self.tokenizer(texts)
        return _normalised(self._run("text", "tokens", self._trim(tokens)))

    def _trim(self, tokens: np.ndarray) -> np.ndarray:
        """Cut after the last text's end token, when the text tower takes any length."""
        if not self.trim_text:
            return tokens
        return tokens[:, : int(((tokens != 0) * np.arange(1, tokens.shape[1] + 1)).max())]

    def _run(self, tower: str, name: str, x: np.ndarray) -> np.ndarray:
        """The tower on a batch. Below fp32 each row runs alone: dynamic quantisation scales activations by the
        whole batch, so a vector would otherwise depend on its batch mates (a photo would not find itself)."""
        session = self._session(tower)
        if self.precision != "fp32":
            parts = [x[i : i + 1] if name != "tokens" else self._trim(x[i : i + 1]) for i in range(len(x))]
        elif name == "pixels" and len(x) > IMAGE_CHUNK:
            parts = [x[i : i + IMAGE_CHUNK] for i in range(0, len(x), IMAGE_CHUNK)]
        else:
            return session.run(None, {name: x})[0]
        return np.concatenate([session.run(None, {name: part})[0] for part in parts])


def encode_distinct(
    texts: Sequence[str], dim: int, batch_size: int, encode_batch: Callable[[list[str]], np.ndarray]
) -> np.ndarray:
    """Encode each distinct text once, in batches of similar length so trimming cuts the most; rows in `texts`'
    order. What both runtimes' `encode_texts` do around their own batch encoder."""
    unique = list(dict.fromkeys(texts))
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
    encoded = np.empty((len(unique), dim), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        encoded[rows] = encode_batch([unique[i] for i in rows])
    position = {t: i for i, t in enumerate(unique)}
    return encoded[[position[t] for t in texts]] if texts else encoded


def _normalised(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def runtime_of(spec: ModelSpec, precision: str = "fp32") -> str:
    """Which runtime answers this model's queries by default: what `clipdex info` says."""
    if find_export(spec, precision) is not None:
        return f"onnx (ONNX Runtime, CPU, {precision})"
    if precision != "fp32":
        return f"onnx at {precision} (not made yet: the next query makes it)"
    reason = refused_export(spec)
    return f"torch (export refused: {reason})" if reason else "torch (not exported yet: the next query exports it)"
