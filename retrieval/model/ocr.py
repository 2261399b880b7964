"""Reading the words in images (`clipdex index --ocr`): RapidOCR, whose wheel ships PP-OCRv4's detection and
recognition models (and a 0°/180° text-direction classifier) and runs them on ONNX Runtime, offline.

Chosen over Tesseract (Debian's 5.3) on this project's test images (words rendered on photo-like backgrounds,
rotated): RapidOCR read every one whose words were in the frame, at 0.14-0.22 s an image on 2 cores, Tesseract none,
at about the same time (benchmarks/RESULTS.md). Photos are read at most OCR_SIDE pixels on their long side, and
smaller ones as they are (RapidOCR's own default enlarges every image to 736 pixels on its short side): on 2 cores a
1600x1200 frame took 0.95 s and a 1024x768 one 0.12 s, and text in 480x360 images was read as well at 0.12 s an
image as at 0.19 s enlarged. Lines without a letter or digit (a "+" read in a drawing of a cross) are left out, and
so are lone characters read with less than LONE_CONFIDENCE (a round blob read as "O": 13 times in 150 photo-like
pictures without words).
"""

from __future__ import annotations

import re
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.retrieval.errors import InputError
from clipdex.retrieval.imaging.decode import MAX_FILE_BYTES, decode_image
from clipdex.retrieval.imaging.files import read_regular

OCR_SIDE = 1280  # pixels on the long side an image is read at (at most)
MIN_CONFIDENCE = 0.5  # recognised lines scoring less are left out
LONE_CONFIDENCE = 0.9  # a line of one character needs this much: a round blob is read as "O" at 0.5-0.75
PACKAGE = "rapidocr-onnxruntime"
_WORDLIKE = re.compile(r"\w")


def engine_name() -> str:
    """The OCR engine and its version, as the manifest records it; a one-line error when it is not installed."""
    try:
        return f"{PACKAGE} {metadata.version(PACKAGE)}"
    except metadata.PackageNotFoundError:
        raise InputError(f"--ocr needs {PACKAGE}: pip install {PACKAGE}") from None


class WordReader:
    """Reads the words in image files, one at a time (the models are loaded on first use, once)."""

    def __init__(self) -> None:
        self._engine: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._engine is None:
                engine_name()  # a clear error when the package is missing
                from rapidocr_onnxruntime import RapidOCR

                self._engine = RapidOCR(
                    text_score=MIN_CONFIDENCE, print_verbose=False, det_limit_type="max", det_limit_side_len=OCR_SIDE
                )
            return self._engine

    def read_file(self, path: Path, *, max_pixels: int) -> str:
        """The words in an image file, line by line, top to bottom ("" when there are none)."""
        decoded = decode_image(read_regular(path, MAX_FILE_BYTES)[0], max_pixels=max_pixels, draft=(OCR_SIDE, OCR_SIDE))
        image = decoded.image
        if max(image.size) > OCR_SIDE:
            image = image.copy()
            image.thumbnail((OCR_SIDE, OCR_SIDE))
        return self.read(np.asarray(image))

    def read(self, rgb: np.ndarray) -> str:
        """The words in an RGB array (height, width, 3)."""
        found, _ = self._load()(np.ascontiguousarray(rgb[:, :, ::-1]))  # OpenCV's order: BGR
        lines = [(str(text).strip(), float(score)) for _, text, score in found or ()]
        kept = [
            line
            for line, score in lines
            if _WORDLIKE.search(line) and score >= (MIN_CONFIDENCE if len(line) > 1 else LONE_CONFIDENCE)
        ]
        return "\n".join(kept)
