"""The one guarded image decoder: JPEG or PNG file -> RGB pixels, or an `ImageError`.

The header is read first, so an image that claims a billion pixels (a decompression bomb) or a
file far larger than any allowed image is refused before it is decompressed or read whole; a
truncated file is caught by its missing end marker, which OpenCV would otherwise pass with grey
rows. Used by every Ray task that opens an image (training, evaluation, inference, detection).
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from psm_model.errors import PsmError, redact_secrets

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_METADATA_BYTES = 16 << 20  # EXIF, ICC profiles, thumbnails: a few MB in practice
# SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageError(PsmError, ValueError):
    """An image that cannot be decoded safely; the message starts with its path. `reason` is the
    skip-count key: missing_image, unreadable_image, corrupt_image, too_large."""

    def __init__(self, message: str, reason: str = "corrupt_image"):
        super().__init__(message)
        self.reason = reason


def decode_image(path: str | os.PathLike, max_pixels: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a JPEG or PNG (gray, RGBA and CMYK become RGB), or ImageError for a
    missing, truncated or corrupt file, or one whose header declares more than `max_pixels` pixels.
    EXIF orientation is ignored, as COCO annotations (and the official loader) use stored pixels.
    """
    if "://" in str(path):
        data = _read(str(path), max_pixels)
        path = redact_secrets(str(path))  # the messages below name it
    else:
        data = _read_file(path, max_pixels)
    return decode_image_bytes(data, max_pixels, str(path))


def decode_image_bytes(data: bytes, max_pixels: int, source: str) -> np.ndarray:
    """`decode_image` of bytes in memory (a request body): the same checks, the same pixels; the
    ImageError's message starts with `source`."""
    if not data:
        raise ImageError(f"{source}: empty file")
    try:
        width, height = _header_size(data)
    except ValueError as e:
        raise ImageError(f"{source}: {e}") from None
    if width <= 0 or height <= 0:
        raise ImageError(f"{source}: header declares {width}x{height} pixels: an empty image")
    if width * height > max_pixels:
        raise ImageError(
            f"{source}: header declares {width}x{height} pixels; allowed: 1 to {max_pixels:,}",
            "too_large",
        )
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:
        raise ImageError(f"{source}: cannot decode: {e}") from None
    if bgr is None:  # check before any colour conversion (cvtColor on None hides the cause)
        raise ImageError(f"{source}: corrupt or truncated image data")
    if bgr.shape[:2] != (height, width):
        raise ImageError(
            f"{source}: decoded {bgr.shape[1]}x{bgr.shape[0]}, header says {width}x{height}"
        )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the frame header, once an end-of-image marker follows the scan (OpenCV
    4 decodes a truncated JPEG with only a warning: grey rows)."""
    i, n, size = 2, len(data), None
    while True:
        if i >= n or data[i] != 0xFF:
            raise ValueError(f"JPEG: no marker at byte {i} (truncated or corrupt header)")
        while i < n and data[i] == 0xFF:  # fill bytes may precede a marker
            i += 1
        if i + 2 >= n:
            raise ValueError("JPEG: truncated header")
        marker = data[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # stand-alone markers have no length
            continue
        if marker == 0xD9:
            raise ValueError("JPEG: end of image before any scan")
        length = int.from_bytes(data[i : i + 2], "big")
        if marker in _JPEG_SOF:
            if i + 7 > n:
                raise ValueError("JPEG: truncated frame header")
            size = (
                int.from_bytes(data[i + 5 : i + 7], "big"),
                int.from_bytes(data[i + 3 : i + 5], "big"),
            )
        if marker == 0xDA:  # start of scan: entropy-coded data follows, up to EOI
            if size is None:
                raise ValueError("JPEG: scan before any frame header")
            if data.rfind(b"\xff\xd9") < i + length:
                raise ValueError("JPEG: no end-of-image marker after the scan (truncated file)")
            return size
        if length < 2:
            raise ValueError(f"JPEG: segment length {length} at byte {i}")
        i += length


def _read_file(path: str | os.PathLike, max_pixels: int) -> bytes:
    try:
        with open(path, "rb") as f:
            # no file of an allowed size is this long (4 bytes a pixel, headers and metadata):
            # refuse it before reading, as a multi-GB file would exhaust the task's memory
            _check_size(path, os.fstat(f.fileno()).st_size, max_pixels)
            return f.read()
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found", "missing_image") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror or e}", "unreadable_image") from e


def _read(uri: str, max_pixels: int) -> bytes:
    """An object of a store (data.root=s3://...), read inside the task that decodes it."""
    from pipelines.uris import filesystem

    shown = redact_secrets(uri)
    try:
        fs, where = filesystem(uri)
        with fs.open_input_file(where) as f:  # its size from the store, before the body
            _check_size(shown, f.size(), max_pixels)
            return f.read()
    except FileNotFoundError:
        raise ImageError(f"{shown}: object not found", "missing_image") from None
    except OSError as e:
        raise ImageError(
            f"{shown}: cannot read: {redact_secrets(str(e))}", "unreadable_image"
        ) from e


def _check_size(path: object, size: int, max_pixels: int) -> None:
    limit = max_pixels * 4 + _MAX_METADATA_BYTES
    if size > limit:
        raise ImageError(
            f"{path}: file of {size:,} bytes; an image of at most {max_pixels:,} pixels has at "
            f"most {limit:,}",
            "too_large",
        )


def _header_size(data: bytes) -> tuple[int, int]:
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data.startswith(_PNG_SIGNATURE):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ValueError("PNG: truncated or missing IHDR header")
        if data.rfind(b"IEND") < 0:
            raise ValueError("PNG: no IEND chunk (truncated file)")
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    raise ValueError("not a JPEG or PNG file (the formats read here)")
