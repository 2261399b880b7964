"""Decode one image file into an RGB PIL image, safely: pixel limit checked before decoding."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from clipdex.retrieval.errors import ImageDecodeError, InputError
from clipdex.retrieval.imaging.files import NotRegularFile, read_regular

DEFAULT_MAX_PIXELS = 178_956_970  # twice PIL's own bomb threshold: a 13k x 13k photo still passes
# What decoding one image may hold in memory, estimated from its header before any pixel is decoded (mode, bit
# depth, the DCT-scaled size of a JPEG, the copies conversion and orientation make); scaled with a raised pixel
# limit. A pixel count alone let a 329 KB 16-bit PNG of 13000x13000 take 4.4 GB.
DECODE_BUDGET = 512 << 20
DECODES_AT_ONCE = max(2, min(4, os.cpu_count() or 2))  # per process: a server's threads wait their turn
_DECODING = threading.BoundedSemaphore(DECODES_AT_ONCE)
# bytes a pixel takes in each mode PIL decodes to (first frame only: later frames are never loaded)
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}
MAX_FILE_BYTES = 1 << 30  # an "image" file over 1 GiB is refused unread
# Past this aspect ratio an image is cut to its centre before preprocessing: resizing the short side
# of a 100000x1 strip to 224 pixels would allocate gigabytes, and the centre crop discards the rest anyway.
MAX_ASPECT = 32.0


@functools.cache
def register_heif() -> bool:
    """Teach Pillow to open HEIC/HEIF (phone photos) through pillow-heif, once; AVIF is Pillow's own."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def read_query_image(path: Path) -> bytes:
    """A query image's bytes, or one clear line saying why not."""
    try:
        data, st = read_regular(path, MAX_FILE_BYTES)
        if max(st.st_size, len(data)) > MAX_FILE_BYTES:
            raise InputError(f"query image {path} is over {MAX_FILE_BYTES >> 20} MiB")
        return data
    except NotRegularFile as e:
        raise InputError(f"query image {path} is {e.strerror}") from None
    except FileNotFoundError:
        raise InputError(f"query image not found: {path}") from None
    except OSError as e:
        raise InputError(f"cannot read query image {path}: {e.strerror or e}") from e


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image
    width: int
    height: int
    meta: PhotoMeta = field(default_factory=lambda: PhotoMeta())


@dataclass(frozen=True)
class PhotoMeta:
    """What a photo's EXIF says: when it was taken (POSIX seconds, the camera's clock read as UTC, as EXIF gives no
    zone), which camera, where (decimal degrees)."""

    taken_at: float | None = None
    camera: str | None = None
    lat: float | None = None
    lon: float | None = None


@dataclass(frozen=True)
class DecodeOptions:
    """How files become images, the same for indexing and for query images (see Encoder.decode_options)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    exif_transpose: bool = True
    max_aspect: float | None = None
    draft: tuple[int, int] | None = None  # a JPEG is DCT-scaled down to no less than this (width, height)

    def decode(self, data: bytes) -> DecodedImage:
        return decode_image(
            data,
            max_pixels=self.max_pixels,
            exif_transpose=self.exif_transpose,
            max_aspect=self.max_aspect,
            draft=self.draft,
        )


_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_limit(max_pixels: int) -> Iterator[None]:
    """Lift PIL's process-wide bomb limit only while decoding under a higher limit of our own (checked before
    any pixel is decoded), and restore it after, so other code in the process keeps PIL's protection."""
    if max_pixels <= DEFAULT_MAX_PIXELS:
        yield
        return
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = True,
    max_aspect: float | None = None,
    draft: tuple[int, int] | None = None,
) -> DecodedImage:
    """Decode bytes to RGB, taking the first frame of animations and applying EXIF orientation.

    Evaluation turns `exif_transpose` off because the benchmark protocol (CLIP_benchmark) ignores it. `draft` lets
    JPEG decoding scale down by up to 8x on the way (thumbnails need no more); `width` and `height` stay the file's.
    """
    if not data:
        raise ImageDecodeError("empty file")
    register_heif()
    try:
        # Between PIL's limit and twice it PIL only warns (the CLI silences that warning: our own limit decides)
        with _pil_limit(max_pixels):
            img: Image.Image = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
                    "(raise it with --max-pixels)"
                )
            img.seek(0)
            if draft is not None:
                img.draft("RGB", draft)
            need, budget = decode_bytes(img, exif_transpose), _budget(max_pixels)
            if need > budget:
                raise ImageDecodeError(
                    f"{width}x{height} {img.mode} would take {need >> 20} MiB to decode, over the "
                    f"{budget >> 20} MiB budget (raise it with --max-pixels)"
                )
            with _DECODING:
                meta = photo_meta(img)  # a PNG's EXIF may follow its pixels: reading it decodes them
                img.load()
                if exif_transpose:
                    img = ImageOps.exif_transpose(img) or img
                rgb = _to_rgb(img)
                if max_aspect is not None:
                    rgb = _cap_aspect(rgb, max_aspect)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"refused, over the limit: {e} (raise it with --max-pixels)") from e
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError("not a readable image (not an image, or a format Pillow cannot read)") from e
    except Exception as e:  # PIL raises many types for broken files; all mean "not an image"
        raise ImageDecodeError(f"not a readable image ({type(e).__name__}: {_sentence(e)})") from e
    return DecodedImage(image=rgb, width=width, height=height, meta=meta)


_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATETIME_ORIGINAL, _DATETIME, _MAKE, _MODEL = 0x9003, 0x0132, 0x010F, 0x0110


def decode_bytes(img: Image.Image, exif_transpose: bool = True) -> int:
    """The memory decoding `img` (opened, not loaded, drafted if it is to be) to RGB takes at its peak: its own
    pixels, the RGB copy, a turned copy when EXIF says it is turned, and the 8-bit step of a 16/32-bit image."""
    w, h = img.size
    own = _MODE_BYTES.get(img.mode, 2 if img.mode.startswith("I;16") else 4)
    copies = 0 if img.mode == "RGB" else 3
    if img.mode.startswith("I") or img.mode == "F":
        copies += own + 2  # the array read out of it, the 8-bit result and its grey image
    exif = img.info.get("exif") if img.format == "PNG" else img.getexif()  # a PNG's getexif decodes the pixels
    turned = exif_transpose and exif is not None and _orientation(exif) not in (1, None)
    return w * h * (own + copies + (3 if turned else 0))


def _orientation(exif: Any) -> int | None:
    if isinstance(exif, bytes | bytearray):
        parsed = Image.Exif()
        parsed.load(bytes(exif))
        exif = parsed
    return exif.get(0x0112, 1)


def _budget(max_pixels: int) -> int:
    return max(DECODE_BUDGET, int(DECODE_BUDGET * max_pixels / DEFAULT_MAX_PIXELS))


def photo_meta(img: Image.Image) -> PhotoMeta:
    """EXIF capture time, camera make and model, and GPS position; None for whatever is missing or malformed."""
    try:
        exif = img.getexif()
    except Exception:  # a broken EXIF block never fails the image
        return PhotoMeta()
    if not exif:
        return PhotoMeta()
    try:
        sub = exif.get_ifd(_EXIF_IFD)
    except Exception:
        sub = {}
    taken = _exif_time(sub.get(_DATETIME_ORIGINAL) or exif.get(_DATETIME))
    make, model = (str(exif.get(t) or "").strip(" \x00") for t in (_MAKE, _MODEL))
    camera = (model if make and model.lower().startswith(make.lower()) else f"{make} {model}").strip() or None
    lat = lon = None
    try:
        gps = exif.get_ifd(_GPS_IFD)
        lat, lon = _degrees(gps.get(2), gps.get(1), "S"), _degrees(gps.get(4), gps.get(3), "W")
    except Exception:
        pass
    if lat is None or lon is None or not (-90 <= lat <= 90 and -180 <= lon <= 180):
        lat = lon = None
    return PhotoMeta(taken, camera, lat, lon)


def _exif_time(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return (
            datetime.strptime(value.strip(" \x00")[:19], "%Y:%m:%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
        )
    except ValueError:
        return None


def _degrees(dms: object, ref: object, negative: str) -> float | None:
    try:
        d, m, sec = (float(x) for x in dms)  # type: ignore[attr-defined]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = d + m / 60 + sec / 3600
    return -value if isinstance(ref, str) and ref.strip().upper() == negative else value


def _sentence(e: Exception) -> str:
    """An exception's message without Python object reprs (`<_io.BytesIO object at 0x7f...>`)."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e)).strip() or type(e).__name__


def _cap_aspect(img: Image.Image, max_aspect: float) -> Image.Image:
    w, h = img.size
    if w > h * max_aspect:
        keep = max(1, int(h * max_aspect))
        return img.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h))
    if h > w * max_aspect:
        keep = max(1, int(w * max_aspect))
        return img.crop((0, (h - keep) // 2, w, (h - keep) // 2 + keep))
    return img


_BAND = 256  # rows converted at a time from 16/32 bits


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL's convert("RGB") clips 16/32-bit values at 255; scale the real range instead, a band of rows at a time
        # (whole, the float64 copies of a 13000x13000 image took 2.7 GB)
        arr = np.asarray(img)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        out = np.empty(arr.shape, dtype=np.uint8)
        for r in range(0, arr.shape[0], _BAND):
            band = arr[r : r + _BAND].astype(np.float64)
            out[r : r + _BAND] = np.clip(band / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(out, "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(scaled.astype(np.uint8), "L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img
